//! HQ's own training for few-trip federation (issue 14): the warm start ([`pretrain`]), ensemble distillation (FedDF, Lin et al. 2020) and the
//! ensemble's own evaluation. HQ starts a student from the parameter merge and trains it to match the averaged
//! soft predictions of the site models on **HQ's own data** (labels unused); the site models are the updates
//! HQ already received, so nothing but weights crosses the air gap.
//!
//! Deterministic: the teachers' soft targets are computed once, in dataset order; the student's batches follow
//! [`crate::train::epoch_order`] seeded by `(seed, 0, epoch)`; on the CPU every step is bit-identical run to
//! run.

use std::time::Instant;

use candle_core::{Tensor, D};

use crate::arch::Arch;
use crate::data::Dataset;
use crate::device::Device;
use crate::error::TrainError;
use crate::model::{Mode, Model};
use crate::optim::{Adam, AdamConfig};
use crate::train::{check_data, epoch_order, EpochStats, StepStats, TrainObserver};

/// Settings of a distillation run. `Default` is what `ferry-server merge --distill` uses unless told otherwise
/// (chosen on HQ's own tuning slice of Fashion-MNIST, issue 14; see `docs/merging.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct DistillConfig {
    /// Passes over HQ's data.
    pub epochs: u32,
    /// Images per step.
    pub batch: usize,
    /// Adam's learning rate (a fresh Adam: HQ carries no optimizer state between rounds).
    pub lr: f64,
    /// Softmax temperature of teachers and student (the loss is scaled by T², Hinton et al. 2015).
    pub temperature: f64,
    /// Seed of the batch order.
    pub seed: u64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            epochs: 2,
            batch: 64,
            lr: 5e-4,
            temperature: 1.0,
            seed: 0,
        }
    }
}

impl DistillConfig {
    fn check(&self) -> Result<(), TrainError> {
        if self.batch == 0 || self.epochs == 0 {
            return Err(TrainError::Config(
                "distillation needs at least 1 epoch and a batch of at least 1".into(),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainError::Config(format!(
                "the distillation learning rate must be a positive number, not {}",
                self.lr
            )));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(TrainError::Config(format!(
                "the distillation temperature must be a positive number, not {}",
                self.temperature
            )));
        }
        Ok(())
    }
}

/// What a distillation run did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DistillSummary {
    /// Teachers (site models) averaged.
    pub teachers: usize,
    /// HQ samples distilled on.
    pub samples: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// The student's KL divergence to the ensemble on the distillation data before training (at temperature 1).
    pub kl_before: f64,
    /// The same after training.
    pub kl_after: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The images of `idx` as an `(n, c, h, w)` tensor.
fn images(
    data: &Dataset,
    idx: &[usize],
    device: &candle_core::Device,
) -> Result<Tensor, TrainError> {
    let mut x = Vec::with_capacity(idx.len() * data.image_len());
    for &i in idx {
        x.extend_from_slice(data.image(i));
    }
    Ok(Tensor::from_vec(
        x,
        (idx.len(), data.channels, data.height, data.width),
        device,
    )?)
}

/// Logits as `(rows, classes)`: a slot reader's `(n, slots, classes)` and a sequence reader's per-column
/// outputs alike, one softmax per row.
fn rows(logits: &Tensor) -> Result<Tensor, TrainError> {
    let c = logits.dim(D::Minus1)?;
    let n = logits.elem_count() / c.max(1);
    Ok(logits.reshape((n, c))?)
}

/// The ensemble's soft prediction for every sample of `data`: the average over `teachers` of
/// The average of `softmax(logits / temperature)` over `first` and `rest` on the samples `idx`, on the host. Taking
/// the first model apart makes an empty ensemble unrepresentable.
fn mean_softmax(
    first: &Model,
    rest: &[Model],
    data: &Dataset,
    idx: &[usize],
    temperature: f64,
) -> Result<Tensor, TrainError> {
    // Detached: a teacher's forward pass keeps its activations in its graph, and the sum would hold every
    // teacher's at once.
    let probs = |t: &Model| -> Result<Tensor, TrainError> {
        let x = images(data, idx, t.device())?;
        let logits = t.forward(&x, Mode::Eval)?.detach();
        Ok(candle_nn::ops::softmax_last_dim(&(logits / temperature)?)?
            .to_device(&candle_core::Device::Cpu)?)
    };
    let mut sum = probs(first)?;
    for t in rest {
        sum = (sum + probs(t)?)?;
    }
    Ok((sum / (1 + rest.len()) as f64)?)
}

/// `softmax(logits / temperature)`, as `(samples, rows per sample × classes)` host values in dataset order.
fn soft_targets(
    teachers: &[Model],
    data: &Dataset,
    temperature: f64,
    batch: usize,
) -> Result<Vec<Vec<f32>>, TrainError> {
    let Some(first) = teachers.first() else {
        return Err(TrainError::Config(
            "distillation needs at least one teacher".into(),
        ));
    };
    let arch = first.arch();
    if let Some(t) = teachers.iter().find(|t| t.arch() != arch) {
        return Err(TrainError::Config(format!(
            "teachers of different architectures ({arch} and {})",
            t.arch()
        )));
    }
    check_data(arch, data)?;
    let all: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(data.len());
    for idx in all.chunks(batch.max(1)) {
        let mean = mean_softmax(first, &teachers[1..], data, idx, temperature)?;
        let flat = mean.flatten_all()?.to_vec1::<f32>()?;
        let per = flat.len() / idx.len();
        out.extend(flat.chunks(per).map(<[f32]>::to_vec));
    }
    Ok(out)
}

/// The soft targets of `idx`, flat (reshaped to the logits' rows by [`soft_loss`]).
fn target_tensor(
    targets: &[Vec<f32>],
    idx: &[usize],
    device: &candle_core::Device,
) -> Result<Tensor, TrainError> {
    let mut t = Vec::with_capacity(idx.len() * targets.first().map_or(0, Vec::len));
    for &i in idx {
        t.extend_from_slice(&targets[i]);
    }
    let n = t.len();
    Ok(Tensor::from_vec(t, n, device)?)
}

/// `Σ p·(log p − log_softmax(z/T)) / rows`, and the differentiable part `−Σ p·log_softmax(z/T) / rows · T²`.
fn soft_loss(
    logits: &Tensor,
    target: &Tensor,
    temperature: f64,
) -> Result<(Tensor, f64), TrainError> {
    let z = (rows(logits)? / temperature)?;
    let n = z.dim(0)? as f64;
    let target = &target.reshape(z.shape())?;
    let logq = candle_nn::ops::log_softmax(&z, D::Minus1)?;
    let cross = ((target * &logq)?.sum_all()?.neg()? / n)?;
    let host = target.flatten_all()?.to_vec1::<f32>()?;
    let entropy: f64 = host
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -f64::from(p) * f64::from(p).ln())
        .sum::<f64>()
        / n;
    let kl = f64::from(cross.to_scalar::<f32>()?) - entropy;
    Ok(((cross * (temperature * temperature))?, kl))
}

/// The mean KL divergence `KL(ensemble ‖ student)` per prediction row on `data`, at temperature 1: how far the
/// student is from the ensemble of `teachers`.
pub fn kl_to_ensemble(
    student: &Model,
    teachers: &[Model],
    data: &Dataset,
    batch: usize,
) -> Result<f64, TrainError> {
    let targets = soft_targets(teachers, data, 1.0, batch)?;
    kl_on(student, &targets, data, batch)
}

fn kl_on(
    student: &Model,
    targets: &[Vec<f32>],
    data: &Dataset,
    batch: usize,
) -> Result<f64, TrainError> {
    let all: Vec<usize> = (0..data.len()).collect();
    let (mut sum, mut n) = (0f64, 0usize);
    for idx in all.chunks(batch.max(1)) {
        let x = images(data, idx, student.device())?;
        let logits = student.forward(&x, Mode::Eval)?;
        let t = target_tensor(targets, idx, student.device())?;
        let (_, kl) = soft_loss(&logits, &t, 1.0)?;
        sum += kl * idx.len() as f64;
        n += idx.len();
    }
    Ok(sum / n.max(1) as f64)
}

/// Accuracy of the ensemble's averaged softmax on `data` (for classifiers: the class with the highest mean
/// probability; for plate readers: exact match of the slot-wise or column-wise argmax read as the model reads).
/// Not one deployable model, but the ceiling a one-trip merge aims at.
pub fn ensemble_accuracy(
    teachers: &[Model],
    data: &Dataset,
    batch: usize,
) -> Result<f64, TrainError> {
    let Some(first) = teachers.first() else {
        return Err(TrainError::Config(
            "an ensemble needs at least one model".into(),
        ));
    };
    let arch = first.arch();
    let all: Vec<usize> = (0..data.len()).collect();
    let mut exact = 0usize;
    for idx in all.chunks(batch.max(1)) {
        let mean = mean_softmax(first, &teachers[1..], data, idx, 1.0)?;
        // Probabilities read through the model's own decoder: argmax is unchanged by the log.
        let pred = crate::train::predictions(arch, &(mean + 1e-12)?.log()?)?;
        let slots = arch.slots();
        for (p, &i) in pred.chunks(slots).zip(idx) {
            exact += usize::from(p == data.label(i));
        }
    }
    Ok(exact as f64 / data.len().max(1) as f64)
}

/// Train `student` (the parameter merge) to match the averaged soft predictions of `teachers` on `data`
/// (labels unused). A fresh Adam at `cfg.lr`, no warm-up. Progress goes to `obs` as in training (the loss is
/// the distillation loss).
pub fn distill(
    student: &mut Model,
    teachers: &[Model],
    data: &Dataset,
    cfg: &DistillConfig,
    obs: &mut dyn TrainObserver,
) -> Result<DistillSummary, TrainError> {
    cfg.check()?;
    let arch = student.arch();
    if let Some(t) = teachers.iter().find(|t| t.arch() != arch) {
        return Err(TrainError::Config(format!(
            "the student is {arch}, a teacher is {}",
            t.arch()
        )));
    }
    check_data(arch, data)?;
    let start = Instant::now();
    let targets = soft_targets(teachers, data, cfg.temperature, cfg.batch)?;
    let t1 = if cfg.temperature == 1.0 {
        targets.clone()
    } else {
        soft_targets(teachers, data, 1.0, cfg.batch)?
    };
    let kl_before = kl_on(student, &t1, data, cfg.batch)?;
    let adam_cfg = AdamConfig {
        lr: cfg.lr,
        warmup: 0,
        ..AdamConfig::default()
    };
    let mut adam = Adam::new(arch, student.device())?;
    let batches = data.len().div_ceil(cfg.batch);
    obs.on_start(0, cfg.epochs, batches);
    for epoch in 0..cfg.epochs {
        let order = epoch_order(data.len(), cfg.seed, 0, epoch);
        let t0 = Instant::now();
        let (mut seen, mut loss_sum) = (0usize, 0f64);
        for (b, idx) in order.chunks(cfg.batch).enumerate() {
            let x = images(data, idx, student.device())?;
            let target = target_tensor(&targets, idx, student.device())?;
            let step = student.open_step();
            let logits = student.forward(&x, Mode::Train)?;
            let (loss, kl) = soft_loss(&logits, &target, cfg.temperature)?;
            if !kl.is_finite() {
                return Err(TrainError::Diverged {
                    loss: kl as f32,
                    step: adam.step() + 1,
                });
            }
            let grads = step.backward(&loss)?;
            let lr = adam.update(student, &grads, &adam_cfg)?;
            student.count_batch();
            seen += idx.len();
            loss_sum += kl;
            obs.on_step(&StepStats {
                epoch,
                epochs: cfg.epochs,
                batch: b + 1,
                batches,
                step: adam.step(),
                loss: kl as f32,
                accuracy: f64::NAN,
                images_per_sec: seen as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                lr,
            });
        }
        let seconds = t0.elapsed().as_secs_f64();
        obs.on_epoch(&EpochStats {
            epoch,
            loss: loss_sum / batches.max(1) as f64,
            accuracy: f64::NAN,
            images: seen,
            seconds,
            images_per_sec: seen as f64 / seconds.max(1e-9),
        });
    }
    let kl_after = kl_on(student, &t1, data, cfg.batch)?;
    Ok(DistillSummary {
        teachers: teachers.len(),
        samples: data.len(),
        steps: adam.step(),
        kl_before,
        kl_after,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// [`distill`] on safetensors bytes, as HQ holds them after a merge: `merged` is the student's start,
/// `teachers` the site updates. Returns the student's safetensors bytes (same tensors, BatchNorm statistics as
/// the student's training left them) and the summary. CPU only.
pub fn distill_safetensors(
    arch: Arch,
    merged: &[u8],
    teachers: &[&[u8]],
    data: &Dataset,
    cfg: &DistillConfig,
    obs: &mut dyn TrainObserver,
) -> Result<(Vec<u8>, DistillSummary), TrainError> {
    let device = Device::Cpu;
    let mut student = Model::from_safetensors(arch, merged, &device)?;
    let teachers = teachers
        .iter()
        .map(|t| Model::from_safetensors(arch, t, &device))
        .collect::<Result<Vec<_>, _>>()?;
    let summary = distill(&mut student, &teachers, data, cfg, obs)?;
    Ok((student.to_safetensors()?, summary))
}

/// Settings of HQ's warm start (`ferry-server init --pretrain`, issue 14): round 0 trained on HQ's own
/// labelled data before the first trip, so that the sites start in one basin.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainConfig {
    /// Epochs over HQ's data.
    pub epochs: u32,
    /// Images per step.
    pub batch: usize,
    /// Adam's peak learning rate (warm-up: 0.8 of an epoch).
    pub lr: f64,
    /// Seed of the shuffles.
    pub seed: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            epochs: 2,
            batch: 64,
            lr: 1e-3,
            seed: 0,
        }
    }
}

/// Train `model` on HQ's `data` per `cfg` with a fresh Adam (HQ's optimizer state is not carried to the sites).
pub fn pretrain(
    model: &mut Model,
    data: &Dataset,
    cfg: &PretrainConfig,
    obs: &mut dyn TrainObserver,
) -> Result<crate::TrainSummary, TrainError> {
    let batches = data.len().div_ceil(cfg.batch.max(1)) as u64;
    let tcfg = crate::TrainConfig {
        epochs: cfg.epochs,
        batch: cfg.batch,
        seed: cfg.seed,
        adam: AdamConfig {
            lr: cfg.lr,
            warmup: (batches * 4 / 5).max(1),
            ..AdamConfig::default()
        },
        augment: crate::Augment::none(),
    };
    let mut adam = Adam::new(model.arch(), model.device())?;
    crate::train::train(model, &mut adam, data, &tcfg, obs)
}
