//! `ferry-lab`: demo, experiments and benchmarks.
mod report;

fn main() {}
