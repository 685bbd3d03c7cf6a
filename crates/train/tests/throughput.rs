//! Training throughput (issue 4): images/s for both models on random data. Ignored by default; run with
//! `cargo test --release -p ferry-train --test throughput -- --ignored --nocapture`.
//! `FERRY_DEVICE=cuda` measures on the GPU (needs `--features cuda`), `FERRY_STEPS` sets the steps (default 60).

use ferry_train::data::Dataset;
use ferry_train::{device, Adam, Arch, Model, TrainConfig};

fn random(arch: Arch, n: usize) -> Dataset {
    let (c, h, w) = arch.input();
    let mut s = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let images = (0..n * c * h * w)
        .map(|_| (next() % 1000) as f32 / 1000.0)
        .collect();
    let labels = (0..n * arch.slots())
        .map(|_| (next() % arch.classes() as u64) as u32)
        .collect();
    Dataset {
        images,
        channels: c,
        height: h,
        width: w,
        labels,
        task: arch.task(),
        styles: None,
    }
}

#[test]
#[ignore = "a measurement, not a check: run with --release -- --ignored --nocapture"]
fn images_per_second() {
    let dev_name = std::env::var("FERRY_DEVICE").unwrap_or_else(|_| "cpu".into());
    let steps: usize = std::env::var("FERRY_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dev =
        device::select(&dev_name.parse().expect("FERRY_DEVICE is cpu or cuda")).expect("device");
    for arch in Arch::ALL {
        let cfg = TrainConfig {
            batch: 64,
            ..TrainConfig::default()
        };
        let data = random(arch, cfg.batch * steps);
        let mut model = Model::init(arch, 1, &dev).unwrap();
        let mut adam = Adam::new(arch, &dev).unwrap();
        // One warm-up epoch on a few batches (allocator, kernels), then the measured one.
        let warm = random(arch, cfg.batch * 3);
        ferry_train::train(&mut model, &mut adam, &warm, &cfg, &mut ()).unwrap();
        let s = ferry_train::train(&mut model, &mut adam, &data, &cfg, &mut ()).unwrap();
        println!(
            "{dev_name} {arch}: {:.0} img/s ({} steps of batch {}, {:.1} s, {} parameters)",
            s.images_per_sec,
            s.steps,
            cfg.batch,
            s.seconds,
            arch.parameter_count()
        );
    }
}
