//! plate-cnn on generated plates (issue 4): how well a short local run reads plates. Ignored by default (about a
//! minute in release); run with `cargo test --release -p ferry-train --test plates -- --ignored --nocapture`.

use ferry_train::data::{DataSpec, LoadConfig};
use ferry_train::{evaluate, train, Adam, AdamConfig, Arch, Device, Model, TrainConfig};

#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn plate_cnn_reads_generated_plates() {
    let epochs: u32 = std::env::var("FERRY_EPOCHS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let n: usize = std::env::var("FERRY_PLATES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let load = |s: String| {
        s.parse::<DataSpec>()
            .unwrap()
            .load(&LoadConfig::default())
            .unwrap()
    };
    let train_set = load(format!("plates:mixed:{n}:1"));
    let test_set = load("plates:mixed:500:2".to_string());
    let arch = Arch::PlateCnn;
    let mut model = Model::init(arch, 0, &Device::Cpu).unwrap();
    let mut adam = Adam::new(arch, &Device::Cpu).unwrap();
    let cfg = TrainConfig {
        epochs,
        adam: AdamConfig {
            lr: 1e-3,
            warmup: 100,
            ..AdamConfig::default()
        },
        ..TrainConfig::default()
    };
    let s = train(&mut model, &mut adam, &train_set, &cfg, &mut ()).unwrap();
    let e = evaluate(&model, &test_set, 256).unwrap();
    println!(
        "plate-cnn, {n} plates x {epochs} epochs ({} steps, {:.0} img/s): exact {:.1} %, characters {:.1} %",
        s.steps,
        s.images_per_sec,
        100.0 * e.accuracy,
        100.0 * e.char_accuracy.unwrap_or(0.0)
    );
}
