//! Throughput measurement (issue 7): training and inference steps per second on synthetic data, for
//! `ferry-lab bench train|infer` and `cargo bench -p ferry-train`. The numbers are compared with the PyTorch twin
//! in `bench/torch_twin.py` (see `docs/performance.md`).
//!
//! The input is random with a fixed seed and the model is freshly initialised (seed 1), so two runs do the same
//! arithmetic; the threads are rayon's (candle's CPU matmul and ferry's ops read `RAYON_NUM_THREADS`).

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::arch::Arch;
use crate::error::TrainError;
use crate::model::{Mode, Model, Ops};
use crate::optim::{Adam, AdamConfig};

/// One measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchResult {
    /// Architecture name (`plate-cnn`, `mnist-cnn`).
    pub model: String,
    /// Trainable parameters of the architecture.
    pub params: usize,
    /// Images per step.
    pub batch: usize,
    /// Worker threads (rayon's current thread count).
    pub threads: usize,
    /// Images per second over the measured steps.
    pub img_per_s: f64,
    /// Milliseconds per step over the measured steps.
    pub ms_per_step: f64,
    /// The layer implementation timed.
    pub ops: Ops,
}

/// A random batch of `arch`'s input shape (uniform in [0, 1)) and random labels, from a fixed seed.
fn synthetic(arch: Arch, batch: usize, device: &Device) -> Result<(Tensor, Tensor), TrainError> {
    let (c, h, w) = arch.input();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.random::<f32>())
        .collect();
    let classes = arch.classes() as u32;
    let y: Vec<u32> = match arch.reader() {
        crate::arch::Reader::Slots => (0..batch * arch.slots())
            .map(|_| rng.random_range(0..classes))
            .collect(),
        // A sequence reader's labels are plates: 7 or 8 digits and syllables (no region), right-aligned.
        crate::arch::Reader::Ctc { .. } => (0..batch)
            .flat_map(|_| {
                let len = rng.random_range(7..=8usize);
                let mut plate = vec![0u32; arch.slots() - len];
                plate.extend(
                    (0..len).map(|_| rng.random_range(1..crate::data::plates::BASE_CLASSES as u32)),
                );
                plate
            })
            .collect(),
    };
    Ok((
        Tensor::from_vec(x, (batch, c, h, w), device)?,
        Tensor::from_vec(y, batch * arch.slots(), device)?,
    ))
}

fn check(batch: usize, steps: usize) -> Result<(), TrainError> {
    if batch == 0 || steps == 0 {
        return Err(TrainError::Config(
            "--batch and --steps must be at least 1".into(),
        ));
    }
    Ok(())
}

fn result(arch: Arch, batch: usize, steps: usize, seconds: f64, ops: Ops) -> BenchResult {
    let seconds = seconds.max(1e-9);
    BenchResult {
        model: arch.name().to_string(),
        params: arch.parameter_count(),
        batch,
        threads: rayon_threads(),
        img_per_s: (batch * steps) as f64 / seconds,
        ms_per_step: seconds * 1e3 / steps as f64,
        ops,
    }
}

/// The thread count candle's CPU kernels and ferry's ops use.
fn rayon_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// A freshly initialised model (seed 1) running `ops`, and a synthetic batch, on the CPU.
fn setup(arch: Arch, batch: usize, ops: Ops) -> Result<(Model, Tensor, Tensor), TrainError> {
    let dev = Device::Cpu;
    let (x, y) = synthetic(arch, batch, &dev)?;
    let mut model = Model::init(arch, 1, &dev)?;
    model.set_ops(ops);
    Ok((model, x, y))
}

/// Runs `step` `warmup_steps` times untimed, then `steps` times timed.
fn time_steps(
    (arch, batch, ops): (Arch, usize, Ops),
    steps: usize,
    warmup_steps: usize,
    mut step: impl FnMut() -> Result<(), TrainError>,
) -> Result<BenchResult, TrainError> {
    for _ in 0..warmup_steps {
        step()?;
    }
    let start = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    Ok(result(
        arch,
        batch,
        steps,
        start.elapsed().as_secs_f64(),
        ops,
    ))
}

/// Time `steps` training steps (forward, loss, backward, Adam update: the trainer's own step) after
/// `warmup_steps` untimed ones, on the CPU, with the layers' `ops`.
pub fn bench_train(
    arch: Arch,
    batch: usize,
    steps: usize,
    warmup_steps: usize,
    ops: Ops,
) -> Result<BenchResult, TrainError> {
    check(batch, steps)?;
    let (mut model, x, y) = setup(arch, batch, ops)?;
    let mut adam = Adam::new(arch, &Device::Cpu)?;
    // No warm-up ramp: the bench measures full-size steps.
    let cfg = AdamConfig {
        warmup: 0,
        ..AdamConfig::default()
    };
    time_steps((arch, batch, ops), steps, warmup_steps, || {
        crate::train::train_step(&mut model, &mut adam, &x, &y, &cfg).map(|_| ())
    })
}

/// Time `steps` inference forward passes (BatchNorm with running statistics) after `warmup_steps` untimed ones, on
/// the CPU, with the layers' `ops`.
pub fn bench_infer(
    arch: Arch,
    batch: usize,
    steps: usize,
    warmup_steps: usize,
    ops: Ops,
) -> Result<BenchResult, TrainError> {
    check(batch, steps)?;
    let (model, x, _) = setup(arch, batch, ops)?;
    time_steps((arch, batch, ops), steps, warmup_steps, || {
        model.forward(&x, Mode::Eval).map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_reports_its_settings() {
        for arch in Arch::ALL {
            for ops in [Ops::Fused, Ops::Generic] {
                let r = bench_train(arch, 2, 1, 1, ops).unwrap();
                assert_eq!((r.model.as_str(), r.batch, r.ops), (arch.name(), 2, ops));
                assert_eq!(r.params, arch.parameter_count());
                assert!(r.img_per_s > 0.0 && r.ms_per_step > 0.0);
                let r = bench_infer(arch, 3, 2, 0, ops).unwrap();
                assert_eq!(r.batch, 3);
            }
        }
        assert!(bench_train(Arch::MnistCnn, 0, 1, 0, Ops::Fused).is_err());
    }
}
