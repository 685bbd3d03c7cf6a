//! mnist-cnn on real Fashion-MNIST (issue 4): Debian's `dataset-fashion-mnist`, which `scripts/test.sh` fetches
//! (issue 17). The test fails when the files are absent; it never skips.
//!
//! The bound: one epoch over the first 3,000 training images (47 steps of batch 64, lr 2e-3, warm-up 10) reached
//! 76.4 % on the first 1,000 test images when measured (73.8 % with lr 1e-3); the test asks for 70 %, leaving a
//! margin for other CPUs' floating-point rounding. Takes ~20 s in the dev profile.

use ferry_train::data::{DataSpec, LoadConfig};
use ferry_train::{evaluate, train, Adam, AdamConfig, Arch, Device, Model, TrainConfig};

#[test]
fn mnist_cnn_learns_fashion_mnist_in_one_short_epoch() {
    let dir = ferry_testdata::fashion_mnist();
    let dir = dir.display();
    let load = |spec: &str, n| {
        let spec: DataSpec = spec.parse().unwrap();
        spec.load(&LoadConfig {
            limit: Some(n),
            ..LoadConfig::default()
        })
        .unwrap()
    };
    let train_set = load(&format!("idx:{dir}"), 3000);
    let test_set = load(&format!("idx:{dir}:test"), 1000);
    let arch = Arch::MnistCnn;
    let mut model = Model::init(arch, 0, &Device::Cpu).unwrap();
    let mut adam = Adam::new(arch, &Device::Cpu).unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch: 64,
        seed: 0,
        adam: AdamConfig {
            lr: 2e-3,
            warmup: 10,
            ..AdamConfig::default()
        },
        augment: ferry_train::Augment::none(),
    };
    let s = train(&mut model, &mut adam, &train_set, &cfg, &mut ()).unwrap();
    let e = evaluate(&model, &test_set, 256).unwrap();
    eprintln!(
        "fashion-mnist: {:.1} % test accuracy after {} steps ({:.0} img/s)",
        100.0 * e.accuracy,
        s.steps,
        s.images_per_sec
    );
    assert!(e.accuracy >= 0.70, "test accuracy {:.3}", e.accuracy);
}
