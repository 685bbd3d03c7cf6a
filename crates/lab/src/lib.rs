//! `ferry-lab`: the demo and the experiments of issue 5, built from the same library calls and real files as
//! `ferry-server` and `ferry-client` (keys, signed bundles on a "USB" folder, HQ's ledger, site state
//! directories), plus the training benchmarks. The binary (`main.rs`) only parses flags and calls [`demo::run`],
//! [`seed_table::run`], [`fedavg::run`] or [`bench::run`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod bench;
pub mod bench_io;
pub mod demo;
pub mod fed;
pub mod fedavg;
pub mod gallery;
pub mod plates;
pub mod progress;
pub mod report;
pub mod seed_table;
pub mod seed_trips;
pub mod split;
pub mod start;
pub mod trips;
