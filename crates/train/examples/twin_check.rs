//! Writes what `bench/torch_twin.py check` needs to show the PyTorch twin is the same network as ferry's (issue 12):
//! a model's weights (PyTorch `state_dict` names, for `load_state_dict(strict=True)`) after a few training steps on
//! generated plates (so the BatchNorm statistics are not the initial ones), and a batch of plates with the logits
//! ferry computes for them in inference mode.
//!
//! `cargo run --release -p ferry-train --example twin_check -- ARCH OUT_DIR`, then
//! `python3 bench/torch_twin.py check --model ARCH --dir OUT_DIR`.
use std::collections::HashMap;

use ferry_train::data::{plates, PlateStyle};
use ferry_train::{train, Adam, AdamConfig, Arch, Device, Mode, Model, TrainConfig};
use safetensors::tensor::{Dtype, TensorView};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arch = Arch::from_name(&a[1]).unwrap();
    let out = std::path::PathBuf::from(&a[2]);
    std::fs::create_dir_all(&out).unwrap();
    let data = plates::generate(PlateStyle::Mixed, 64, 5, None).unwrap();
    let data = if arch.classes() < plates::charset().len() {
        plates::generate_with(
            PlateStyle::Mixed,
            64,
            5,
            None,
            &plates::RenderConfig::for_classes(Some(arch.classes())),
        )
        .unwrap()
    } else {
        data
    };
    let mut model = Model::init(arch, 3, &Device::Cpu).unwrap();
    let mut adam = Adam::new(arch, &Device::Cpu).unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch: 16,
        seed: 1,
        adam: AdamConfig {
            lr: 1e-3,
            warmup: 1,
            ..AdamConfig::default()
        },
        augment: ferry_train::Augment::none(),
    };
    train(&mut model, &mut adam, &data, &cfg, &mut ()).unwrap();
    std::fs::write(
        out.join("weights.safetensors"),
        model.to_safetensors().unwrap(),
    )
    .unwrap();
    let n = 8;
    let (c, h, w) = arch.input();
    let x = candle_core::Tensor::from_vec(
        data.images[..n * c * h * w].to_vec(),
        (n, c, h, w),
        &Device::Cpu,
    )
    .unwrap();
    let y = model.forward(&x, Mode::Eval).unwrap();
    let bytes = |t: &candle_core::Tensor| -> Vec<u8> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    };
    let (xb, yb) = (bytes(&x), bytes(&y));
    let views = vec![
        (
            "x",
            TensorView::new(Dtype::F32, x.dims().to_vec(), &xb).unwrap(),
        ),
        (
            "logits",
            TensorView::new(Dtype::F32, y.dims().to_vec(), &yb).unwrap(),
        ),
    ];
    let meta: Option<HashMap<String, String>> = None;
    std::fs::write(
        out.join("io.safetensors"),
        safetensors::serialize(views, meta).unwrap(),
    )
    .unwrap();
    println!("wrote {} (logits {:?})", out.display(), y.dims());
}
