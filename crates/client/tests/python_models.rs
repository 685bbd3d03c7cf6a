//! `python/ferry_models.py`, the PyTorch classes of ferry's models (issue 16), against ferry itself: for every
//! architecture, a site's `current.safetensors` (written by `ferry-client import` from a real global, BatchNorm
//! statistics recalibrated so they are not the identity) loads into the PyTorch class with `strict=True`, and the
//! logits on the same images match ferry's within 1e-4 of their scale; for the plate readers, `read_images` (the
//! shift-averaged reading, decoded by `read_plates`) reads what `ferry-client predict` reads.
//!
//! Needs the Python of `scripts/test.sh` (torch and safetensors); without it the test fails with the setup command.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Tensor;
use ferry_bundle::{Draft, Dtype, Payload, Role, SecretKey, TensorRef};
use ferry_train::data::plates;
use ferry_train::data::PlateStyle;
use ferry_train::{Arch, Device, Mode, Model};

const CHECK: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import load_file
import ferry_models

arch, weights, io = sys.argv[2], sys.argv[3], sys.argv[4]
model = ferry_models.load(weights, arch)           # strict=True
tensors = load_file(io)
with torch.inference_mode():
    out = model(tensors["x"])
ref = tensors["logits"].reshape(out.shape)
diff = (out - ref).abs().max().item()
scale = ref.abs().max().item()
readings = ferry_models.read_images(model, arch, tensors["x"]) if arch != "mnist-cnn" else []
print(json.dumps({"diff": diff, "scale": scale, "readings": readings,
                  "keys": len(model.state_dict())}, ensure_ascii=False))
"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Images for `arch`: generated plates, or a deterministic pattern for the MNIST CNN.
fn images(arch: Arch, n: usize) -> ferry_train::data::Dataset {
    match arch {
        Arch::MnistCnn => {
            let images: Vec<f32> = (0..n * 28 * 28)
                .map(|i| ((i * 37 % 101) as f32) / 100.0)
                .collect();
            ferry_train::data::Dataset {
                images,
                channels: 1,
                height: 28,
                width: 28,
                labels: vec![0; n],
                task: ferry_train::data::Task::Classes { classes: 10 },
                styles: None,
            }
        }
        _ => plates::generate_with(
            PlateStyle::Mixed,
            n,
            21,
            None,
            &plates::RenderConfig::for_classes(Some(arch.classes())),
        )
        .unwrap(),
    }
}

#[test]
fn pytorch_classes_load_ferrys_weights_strictly_and_match_its_outputs() {
    let py = ferry_testdata::python();
    let probe = Command::new(&py)
        .args(["-c", "import torch, safetensors.torch"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => panic!(
            "{} cannot import torch and safetensors ({other:?}): {}",
            py.to_string_lossy(),
            ferry_testdata::SETUP
        ),
    }
    for arch in Arch::ALL {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // A global with non-trivial BatchNorm statistics, imported by the site as its current model: HQ's
        // shipped start where there is one (a trained reader, so that the readings are plates and the syntax
        // decoding has real choices to make), else initial weights with recalibrated statistics.
        let data = images(arch, 24);
        let shipped = repo_root().join(format!(
            "crates/lab/assets/hq-start-{}.safetensors",
            arch.name()
        ));
        let model = if shipped.exists() {
            Model::from_safetensors(arch, &std::fs::read(&shipped).unwrap(), &Device::Cpu).unwrap()
        } else {
            let mut model = Model::init(arch, 5, &Device::Cpu).unwrap();
            ferry_train::recalibrate(&mut model, &data, 3).unwrap();
            model
        };
        let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]);
        hq.write_pair(&dir.join("keys")).unwrap();
        let payload = Payload::from_safetensors(&model.to_safetensors().unwrap()).unwrap();
        let sealed = ferry_bundle::seal(
            Draft::initial("city", Some(arch.name().into())),
            &payload,
            &hq,
            3,
        )
        .unwrap();
        let g = sealed.write_to_dir(&dir.join("usb")).unwrap();
        let state = dir.join("site");
        let o = Command::new(env!("CARGO_BIN_EXE_ferry-client"))
            .args(["import", "--federation", "city", "--trust"])
            .arg(dir.join("keys/hq.pub"))
            .arg("--state")
            .arg(&state)
            .arg(&g)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        let current = state.join("current.safetensors");

        // ferry's logits and readings on the images, from the file the site holds.
        let ferry =
            Model::from_safetensors(arch, &std::fs::read(&current).unwrap(), &Device::Cpu).unwrap();
        let (c, h, w) = arch.input();
        let x = Tensor::from_slice(
            &data.images,
            (data.len(), c, h, w),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let logits = ferry.forward(&x, Mode::Eval).unwrap();
        let shape = logits.dims().to_vec();
        let lv = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let readings = ferry_train::predict::read(&ferry, &data.images, 64).unwrap();
        let (xb, lb) = (f32_bytes(&data.images), f32_bytes(&lv));
        let io = Payload::from_tensors(&[
            TensorRef {
                name: "logits",
                dtype: Dtype::F32,
                shape: &shape,
                data: &lb,
            },
            TensorRef {
                name: "x",
                dtype: Dtype::F32,
                shape: &[data.len(), c, h, w],
                data: &xb,
            },
        ])
        .unwrap();
        let io_path = dir.join("io.safetensors");
        std::fs::write(&io_path, io.bytes()).unwrap();

        let o = Command::new(&py)
            .arg("-c")
            .arg(CHECK)
            .arg(repo_root().join("python"))
            .arg(arch.name())
            .arg(&current)
            .arg(&io_path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{arch}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let (diff, scale) = (v["diff"].as_f64().unwrap(), v["scale"].as_f64().unwrap());
        assert!(scale > 0.0, "{arch}: {v}");
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{arch}: logits differ by {diff} (scale {scale})"
        );
        assert_eq!(
            v["keys"].as_u64().unwrap() as usize,
            arch.tensors().len(),
            "{arch}: every tensor of ferry's model is in the PyTorch state_dict"
        );
        if arch != Arch::MnistCnn {
            let py_readings: Vec<String> = v["readings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect();
            assert_eq!(py_readings, readings, "{arch}");
            if shipped.exists() {
                let right = (0..data.len())
                    .filter(|&i| readings[i] == plates::decode(data.label(i)))
                    .count();
                assert!(right >= 8, "{arch}: HQ's start read {right} of 24 plates");
            }
        }
    }
}
