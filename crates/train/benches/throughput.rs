//! `cargo bench -p ferry-train [-- MODEL...]`: training and inference images/s at batch 64 on synthetic data
//! (issue 7), one line per measurement. `RAYON_NUM_THREADS` sets the threads, `FERRY_BENCH_STEPS` the measured
//! steps (default 30), `FERRY_BENCH_REPEAT` how often each measurement is repeated (default 3; all are printed, so
//! the spread under load shows). See `docs/performance.md` for the PyTorch side.

use ferry_train::bench::{bench_infer, bench_train, BenchResult};
use ferry_train::{Arch, Ops};

// The same allocator as ferry's binaries (issue 7: glibc malloc's page faults halved training speed).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let steps = env("FERRY_BENCH_STEPS", 30);
    let repeat = env("FERRY_BENCH_REPEAT", 3);
    let batch = env("FERRY_BENCH_BATCH", 64);
    // `cargo bench` passes `--bench`; everything else naming a model selects it.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for arch in Arch::ALL {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == arch.name()) {
            continue;
        }
        for (what, f) in [
            (
                "train",
                bench_train as fn(Arch, usize, usize, usize, Ops) -> _,
            ),
            ("infer", bench_infer),
        ] {
            let runs: Vec<BenchResult> = (0..repeat)
                .map(|_| f(arch, batch, steps, 3, Ops::Fused).expect("bench"))
                .collect();
            let ips: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.img_per_s)).collect();
            let r = &runs[0];
            println!(
                "{:<10} {what}: batch {} threads {} img/s [{}] ({:.1} ms/step first run)",
                r.model,
                r.batch,
                r.threads,
                ips.join(", "),
                r.ms_per_step
            );
        }
    }
}
