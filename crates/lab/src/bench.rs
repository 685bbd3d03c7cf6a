//! `ferry-lab bench train|infer` (issue 7's measurements, wired here): images per second of a training or
//! inference step, optionally on a rayon pool of a given size.

use anyhow::Result;
use ferry_train::bench::{bench_infer, bench_train, BenchResult};
use ferry_train::{Arch, Ops};

/// What to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchKind {
    /// Forward, loss, backward, Adam update.
    Train,
    /// Forward in inference mode.
    Infer,
}

/// Time `steps` steps after `warmup` untimed ones, on `threads` worker threads (`None`: rayon's default, which
/// reads `RAYON_NUM_THREADS`), with the layers' `ops` (fused, or candle's generic ops as the baseline).
pub fn run(
    kind: BenchKind,
    arch: Arch,
    batch: usize,
    steps: usize,
    warmup: usize,
    threads: Option<usize>,
    ops: Ops,
) -> Result<BenchResult> {
    let go = || match kind {
        BenchKind::Train => bench_train(arch, batch, steps, warmup, ops),
        BenchKind::Infer => bench_infer(arch, batch, steps, warmup, ops),
    };
    Ok(match threads {
        Some(t) => rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()?
            .install(go)?,
        None => go()?,
    })
}
