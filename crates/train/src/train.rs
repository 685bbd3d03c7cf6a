//! The trainer, evaluation and BatchNorm recalibration over in-memory datasets (issue 4). No files, no progress
//! bars: the site wrappers (`site`) add the state directory and the CLI adds the bars through [`TrainObserver`].
//!
//! Reproducibility: the only randomness is the per-epoch shuffle and augmentation ([`crate::augment`]), drawn
//! from ChaCha8 seeded by `(seed, round, epoch)`, so training on CPU is bit-identical run to run, and an
//! interrupted run resumed from an epoch checkpoint reproduces the uninterrupted run exactly.

use std::time::Instant;

use candle_core::{Device, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::arch::{Arch, Reader};
use crate::augment::{Augment, Augmenter};
use crate::data::{Dataset, Task};
use crate::error::TrainError;
use crate::model::{Mode, Model};
use crate::optim::{Adam, AdamConfig};

/// Training settings. `Default` is the field study's: Adam, lr 2.5e-4, batch 64, warm-up 1000, one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Local epochs (passes over the dataset).
    pub epochs: u32,
    /// Images per optimizer step (the last batch of an epoch may be smaller).
    pub batch: usize,
    /// Seed of the shuffling order.
    pub seed: u64,
    /// Optimizer settings.
    pub adam: AdamConfig,
    /// Random changes to each training image, drawn afresh every epoch ([`Augment::none`]: none).
    pub augment: Augment,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch: 64,
            seed: 0,
            adam: AdamConfig::default(),
            augment: Augment::none(),
        }
    }
}

impl TrainConfig {
    fn check(&self) -> Result<(), TrainError> {
        if self.batch == 0 {
            return Err(TrainError::Config("--batch must be at least 1".into()));
        }
        if !(self.adam.lr.is_finite() && self.adam.lr > 0.0) {
            return Err(TrainError::Config(format!(
                "--lr must be a positive number, not {}",
                self.adam.lr
            )));
        }
        if let Some(d) = self.adam.decay {
            if !(0.0..=1.0).contains(&d.floor) {
                return Err(TrainError::Config(format!(
                    "the learning-rate floor must be a fraction between 0 and 1, not {}",
                    d.floor
                )));
            }
        }
        Ok(())
    }
}

/// Progress after one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Epoch being run (0-based).
    pub epoch: u32,
    /// Epochs in this run.
    pub epochs: u32,
    /// Batches done in this epoch (1-based).
    pub batch: usize,
    /// Batches per epoch.
    pub batches: usize,
    /// Optimizer steps over the site's lifetime (persisted between rounds).
    pub step: u64,
    /// Loss of this batch (mean cross-entropy over character slots).
    pub loss: f32,
    /// Accuracy (exact match) over the epoch so far, 0..1.
    pub accuracy: f64,
    /// Training throughput over the epoch so far.
    pub images_per_sec: f64,
    /// Learning rate used for this step.
    pub lr: f64,
}

/// Result of one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochStats {
    /// Epoch (0-based).
    pub epoch: u32,
    /// Mean batch loss.
    pub loss: f64,
    /// Training accuracy (exact match) over the epoch, 0..1.
    pub accuracy: f64,
    /// Images seen.
    pub images: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Throughput.
    pub images_per_sec: f64,
}

/// Receives progress; every method has an empty default. `()` ignores everything.
pub trait TrainObserver {
    /// A training run starts `epochs` epochs of `batches` batches each, beginning at epoch `first_epoch`.
    fn on_start(&mut self, _first_epoch: u32, _epochs: u32, _batches: usize) {}
    /// An optimizer step finished.
    fn on_step(&mut self, _stats: &StepStats) {}
    /// An epoch finished (and, in a site run, its checkpoint was written).
    fn on_epoch(&mut self, _stats: &EpochStats) {}
    /// A note for the operator (e.g. "resuming from epoch 2").
    fn on_note(&mut self, _note: &str) {}
}

impl TrainObserver for () {}

/// Result of a training run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Epochs run by this call (fewer than configured when resuming).
    pub epochs_run: u32,
    /// Optimizer steps taken by this call.
    pub steps: u64,
    /// Optimizer steps over the site's lifetime.
    pub total_steps: u64,
    /// Samples in the training set.
    pub samples: usize,
    /// Mean loss of the last epoch run (NaN if none was run).
    pub loss: f64,
    /// Training accuracy of the last epoch run, 0..1 (NaN if none was run).
    pub accuracy: f64,
    /// Throughput over the whole call.
    pub images_per_sec: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Check that `data` fits `arch` (input shape and label layout) and is not empty.
pub fn check_data(arch: Arch, data: &Dataset) -> Result<(), TrainError> {
    let (c, h, w) = arch.input();
    if (data.channels, data.height, data.width) != (c, h, w) {
        return Err(TrainError::DataMismatch {
            arch: arch.name(),
            detail: format!(
                "images are {}x{}x{} (CxHxW), the model takes {c}x{h}x{w}",
                data.channels, data.height, data.width
            ),
        });
    }
    // Plate data may use fewer tokens than the model reads (one-line plates only) but never another layout;
    // a token outside the model's classes (a region name for plate-cnn) is caught with the labels below.
    let fits = match (data.task, arch.task()) {
        (Task::Plate { slots: a, .. }, Task::Plate { slots: b, .. }) => a == b,
        (d, m) => d == m,
    };
    if !fits {
        return Err(TrainError::DataMismatch {
            arch: arch.name(),
            detail: format!(
                "labels are {:?}, the model predicts {:?}",
                data.task,
                arch.task()
            ),
        });
    }
    if data.is_empty() {
        return Err(TrainError::EmptyDataset);
    }
    let classes = arch.classes() as u32;
    if let Some(bad) = data.labels.iter().find(|&&l| l >= classes) {
        let detail = match data.task {
            Task::Plate { .. } => format!(
                "plate token '{}' (class {bad}) is not one the model reads (it has {classes} classes{})",
                crate::data::plates::decode(&[*bad]),
                if classes as usize == crate::data::plates::BASE_CLASSES {
                    ": one-line plates only, no region names"
                } else {
                    ""
                }
            ),
            Task::Classes { .. } => {
                format!("label {bad} is out of range (the model has {classes} classes)")
            }
        };
        return Err(TrainError::DataMismatch {
            arch: arch.name(),
            detail,
        });
    }
    Ok(())
}

/// Images of `idx` as a `(n, c, h, w)` tensor and their labels as a flat `(n * slots)` u32 tensor.
pub(crate) fn batch(
    data: &Dataset,
    idx: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor), TrainError> {
    augmented_batch(data, idx, device, None)
}

/// [`batch`], each image changed by `augmenter` where there is one.
fn augmented_batch(
    data: &Dataset,
    idx: &[usize],
    device: &Device,
    mut augmenter: Option<&mut Augmenter>,
) -> Result<(Tensor, Tensor), TrainError> {
    let per = data.channels * data.height * data.width;
    let mut x = Vec::with_capacity(idx.len() * per);
    let mut y = Vec::with_capacity(idx.len() * data.slots());
    for &i in idx {
        let at = x.len();
        x.extend_from_slice(data.image(i));
        if let Some(a) = augmenter.as_deref_mut() {
            a.apply(&mut x[at..], data.channels, data.height, data.width);
        }
        y.extend_from_slice(data.label(i));
    }
    let x = Tensor::from_vec(
        x,
        (idx.len(), data.channels, data.height, data.width),
        device,
    )?;
    let y = Tensor::from_vec(y, idx.len() * data.slots(), device)?;
    Ok((x, y))
}

/// The training loss of `logits` against flat labels `(n * slots)`: mean cross-entropy over all character slots
/// of `(n, slots, classes)` logits for a slot reader, the CTC loss of each plate's lines for a sequence reader
/// ([`crate::ctc`]).
pub(crate) fn loss(arch: Arch, logits: &Tensor, labels: &Tensor) -> Result<Tensor, TrainError> {
    match arch.reader() {
        Reader::Slots => {
            let (n, s, c) = logits.dims3()?;
            Ok(candle_nn::loss::cross_entropy(
                &logits.reshape((n * s, c))?,
                labels,
            )?)
        }
        Reader::Ctc { rows, .. } => {
            let labels = labels.to_vec1::<u32>()?;
            let targets = ctc_targets(&labels, arch.slots(), rows)?;
            crate::ctc::loss(logits, rows, &targets)
        }
    }
}

/// Per sample, one target per output row: a plate's lines ([`crate::data::plates::lines`]).
fn ctc_targets(labels: &[u32], slots: usize, rows: usize) -> Result<Vec<Vec<u32>>, TrainError> {
    if rows != 2 {
        return Err(TrainError::Config(format!(
            "a CTC plate reader needs 2 output rows (a plate's two lines), not {rows}"
        )));
    }
    Ok(labels
        .chunks(slots)
        .flat_map(crate::data::plates::lines)
        .collect())
}

/// The one-pixel shifts (rows down, columns right; edges repeated) whose readings a CTC plate reader averages
/// with the image's own. The readers pool 2×2 twice, so a shift of one pixel changes which pixels each pooling
/// window sees, and their errors on the shifted copies are partly independent. Chosen on the tuning set
/// (docs/experiments.md): the image and these two shifts read 95.05 % of its plates against 93.60 % unshifted,
/// at three times the reading cost; the four one-pixel shifts read 95.40 % at five times the cost.
pub const READING_SHIFTS: [(isize, isize); 2] = [(1, 0), (0, 1)];

/// The scores a model reads `x` by, given its plain `logits` on `x`: for a CTC plate reader, the mean
/// log-probabilities over `x` and its [`READING_SHIFTS`] (`(N, T, K)`, each step's classes comparable as logits);
/// for any other model, `logits` itself. [`predictions`] turns them into labels.
pub fn reading_scores(model: &Model, x: &Tensor, logits: &Tensor) -> Result<Tensor, TrainError> {
    reading_scores_with(model, x, logits, &READING_SHIFTS)
}

/// [`reading_scores`] over other shifts `(rows down, columns right)`, each shorter than the image (negative: up,
/// left); for measuring which shifts to read with.
pub fn reading_scores_with(
    model: &Model,
    x: &Tensor,
    logits: &Tensor,
    shifts: &[(isize, isize)],
) -> Result<Tensor, TrainError> {
    if !matches!(model.arch().reader(), Reader::Ctc { .. }) {
        return Ok(logits.clone());
    }
    // Detached: a forward pass through trainable weights keeps its activations in its graph, and the sum would
    // hold every pass's at once.
    let mut sum = candle_nn::ops::log_softmax(&logits.detach(), D::Minus1)?;
    for &(dy, dx) in shifts {
        let shifted = shift(&shift(x, 2, dy)?, 3, dx)?;
        let lp = model.forward(&shifted, Mode::Eval)?.detach();
        sum = (sum + candle_nn::ops::log_softmax(&lp, D::Minus1)?)?;
    }
    Ok((sum / (1 + shifts.len()) as f64)?)
}

/// `x` moved by `by` pixels along `dim` (towards higher indices when positive), the edge row or column repeated
/// into the gap.
fn shift(x: &Tensor, dim: usize, by: isize) -> Result<Tensor, TrainError> {
    let len = x.dim(dim)?;
    let n = by.unsigned_abs();
    if n == 0 {
        return Ok(x.clone());
    }
    if n >= len {
        return Err(TrainError::Config(format!(
            "a reading shift of {by} pixels does not fit {len} pixels"
        )));
    }
    let (edge, kept) = if by > 0 {
        (x.narrow(dim, 0, 1)?, x.narrow(dim, 0, len - n)?)
    } else {
        (x.narrow(dim, len - 1, 1)?, x.narrow(dim, n, len - n)?)
    };
    let mut dims = edge.dims().to_vec();
    dims[dim] = n;
    let pad = edge.broadcast_as(dims)?.contiguous()?;
    Ok(if by > 0 {
        Tensor::cat(&[&pad, &kept], dim)?
    } else {
        Tensor::cat(&[&kept, &pad], dim)?
    })
}

/// How a CTC reader's outputs become a plate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoding {
    /// The most likely plate of a valid format ([`crate::data::plates::syntax`]): how ferry reads plates.
    Syntax,
    /// Arg-max per step, repeats collapsed, blanks dropped: any string, valid or not (kept to measure what the
    /// syntax adds).
    Greedy,
}

/// What a model read for each sample, as [`crate::data::plates::encode`] lays labels out: `slots` class ids,
/// right-aligned with blanks in front, from its logits or its [`reading_scores`]. A CTC reader is decoded to the
/// most likely valid plate ([`Decoding::Syntax`]).
pub fn predictions(arch: Arch, logits: &Tensor) -> Result<Vec<u32>, TrainError> {
    predictions_with(arch, logits, Decoding::Syntax)
}

/// [`predictions`] with a chosen decoding (a greedy reading's extra characters beyond `slots` are cut from
/// the front).
pub fn predictions_with(
    arch: Arch,
    logits: &Tensor,
    decoding: Decoding,
) -> Result<Vec<u32>, TrainError> {
    Ok(readings(arch, logits, decoding)?.0)
}

/// The predictions, and per sample whether a CTC reader read more than `slots` characters.
fn readings(
    arch: Arch,
    logits: &Tensor,
    decoding: Decoding,
) -> Result<(Vec<u32>, Vec<bool>), TrainError> {
    match arch.reader() {
        Reader::Slots => Ok((
            logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?,
            Vec::new(),
        )),
        Reader::Ctc { rows, .. } => {
            let dims = logits.dims3()?;
            let host = logits.flatten_all()?.to_vec1::<f32>()?;
            let seqs = match decoding {
                Decoding::Syntax => {
                    crate::ctc::decode_syntax(&host, dims, rows, crate::data::plates::syntax())
                }
                Decoding::Greedy => crate::ctc::decode(&host, dims, rows),
            };
            let slots = arch.slots();
            let mut out = Vec::with_capacity(dims.0 * slots);
            let mut overlong = Vec::with_capacity(dims.0);
            for seq in seqs {
                let keep = &seq[seq.len().saturating_sub(slots)..];
                out.extend(std::iter::repeat_n(0, slots - keep.len()));
                out.extend_from_slice(keep);
                overlong.push(seq.len() > slots);
            }
            Ok((out, overlong))
        }
    }
}

/// (exactly matched samples, correct characters) of a batch. A CTC reader's plate is exact only if it read
/// exactly the label's characters (not more); characters compare position by position, right-aligned.
fn hits(arch: Arch, logits: &Tensor, labels: &[u32]) -> Result<(usize, usize), TrainError> {
    let slots = arch.slots();
    let (pred, overlong) = readings(arch, logits, Decoding::Syntax)?;
    let mut exact = 0;
    let mut chars = 0;
    for (i, (p, l)) in pred.chunks(slots).zip(labels.chunks(slots)).enumerate() {
        let ok = p.iter().zip(l).filter(|(a, b)| a == b).count();
        chars += ok;
        exact += usize::from(ok == slots && !overlong.get(i).copied().unwrap_or(false));
    }
    Ok((exact, chars))
}

/// One optimizer step on a batch: forward in training mode, mean cross-entropy, backward, Adam update, and
/// `num_batches_tracked += 1`. Returns the logits, the loss and the learning rate used. The images are a plain
/// tensor, not a `Var`, so backward computes no gradient for them (issue 7).
pub(crate) fn train_step(
    model: &mut Model,
    adam: &mut Adam,
    x: &Tensor,
    y: &Tensor,
    cfg: &AdamConfig,
) -> Result<(Tensor, f32, f64), TrainError> {
    // The step's fused ops hand their parameters' gradients to the step, not to candle's store (see
    // `param_grads`); the guard closes the step however this function returns.
    let step = model.open_step();
    let logits = model.forward(x, Mode::Train)?;
    let l = loss(model.arch(), &logits, y)?;
    let lv = l.to_scalar::<f32>()?;
    if !lv.is_finite() {
        return Err(TrainError::Diverged {
            loss: lv,
            step: adam.step() + 1,
        });
    }
    let grads = step.backward(&l)?;
    let lr = adam.update(model, &grads, cfg)?;
    model.count_batch();
    Ok((logits, lv, lr))
}

/// The sample order of one epoch: a ChaCha8 shuffle seeded by `(seed, round, epoch)`.
pub fn epoch_order(samples: usize, seed: u64, round: u64, epoch: u32) -> Vec<usize> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&round.to_le_bytes());
    key[16..20].copy_from_slice(&epoch.to_le_bytes());
    key[24..].copy_from_slice(b"ferryord");
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut order: Vec<usize> = (0..samples).collect();
    order.shuffle(&mut rng);
    order
}

/// Run one epoch (number `epoch`, shuffled by `(cfg.seed, round, epoch)`), updating `model` and `adam`.
pub fn train_epoch(
    model: &mut Model,
    adam: &mut Adam,
    data: &Dataset,
    cfg: &TrainConfig,
    round: u64,
    epoch: u32,
    obs: &mut dyn TrainObserver,
) -> Result<EpochStats, TrainError> {
    cfg.check()?;
    check_data(model.arch(), data)?;
    if adam.arch() != model.arch() {
        return Err(TrainError::OptimizerState(format!(
            "it belongs to {}, the model is {}",
            adam.arch(),
            model.arch()
        )));
    }
    cfg.augment.check(data.height, data.width)?;
    let order = epoch_order(data.len(), cfg.seed, round, epoch);
    let batches = order.len().div_ceil(cfg.batch);
    let mut augmenter =
        (!cfg.augment.is_none()).then(|| cfg.augment.for_epoch(cfg.seed, round, epoch));
    let start = Instant::now();
    let (mut seen, mut exact, mut loss_sum) = (0usize, 0usize, 0f64);
    for (b, idx) in order.chunks(cfg.batch).enumerate() {
        let (x, y) = augmented_batch(data, idx, model.device(), augmenter.as_mut())?;
        let (logits, lv, lr) = train_step(model, adam, &x, &y, &cfg.adam)?;
        let labels: Vec<u32> = idx
            .iter()
            .flat_map(|&i| data.label(i).iter().copied())
            .collect();
        exact += hits(model.arch(), &logits, &labels)?.0;
        seen += idx.len();
        loss_sum += f64::from(lv);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        obs.on_step(&StepStats {
            epoch,
            epochs: cfg.epochs,
            batch: b + 1,
            batches,
            step: adam.step(),
            loss: lv,
            accuracy: exact as f64 / seen as f64,
            images_per_sec: seen as f64 / secs,
            lr,
        });
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(EpochStats {
        epoch,
        loss: loss_sum / batches.max(1) as f64,
        accuracy: exact as f64 / seen.max(1) as f64,
        images: seen,
        seconds,
        images_per_sec: seen as f64 / seconds.max(1e-9),
    })
}

/// Train `cfg.epochs` epochs from the start (round 0 shuffling). The site wrapper adds checkpoints and resuming.
pub fn train(
    model: &mut Model,
    adam: &mut Adam,
    data: &Dataset,
    cfg: &TrainConfig,
    obs: &mut dyn TrainObserver,
) -> Result<TrainSummary, TrainError> {
    train_epochs(model, adam, data, cfg, 0, 0, obs, |_, _, _| Ok(()))
}

/// Train epochs `first..cfg.epochs` with round `round`'s shuffling, calling `after_epoch` after each one (the site
/// wrapper writes its checkpoint there).
#[allow(clippy::too_many_arguments)]
pub fn train_epochs<E: From<TrainError>>(
    model: &mut Model,
    adam: &mut Adam,
    data: &Dataset,
    cfg: &TrainConfig,
    round: u64,
    first: u32,
    obs: &mut dyn TrainObserver,
    mut after_epoch: impl FnMut(&Model, &Adam, u32) -> Result<(), E>,
) -> Result<TrainSummary, E> {
    cfg.check()?;
    check_data(model.arch(), data)?;
    let start = Instant::now();
    let step0 = adam.step();
    obs.on_start(first, cfg.epochs, data.len().div_ceil(cfg.batch));
    let mut last = None;
    let mut images = 0;
    for epoch in first..cfg.epochs {
        let stats = train_epoch(model, adam, data, cfg, round, epoch, obs)?;
        after_epoch(model, adam, epoch + 1)?;
        images += stats.images;
        obs.on_epoch(&stats);
        last = Some(stats);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(TrainSummary {
        epochs_run: cfg.epochs.saturating_sub(first),
        steps: adam.step() - step0,
        total_steps: adam.step(),
        samples: data.len(),
        loss: last.as_ref().map_or(f64::NAN, |s| s.loss),
        accuracy: last.as_ref().map_or(f64::NAN, |s| s.accuracy),
        images_per_sec: images as f64 / seconds.max(1e-9),
        seconds,
    })
}

/// Accuracy of a model on a dataset.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Evaluation {
    /// Samples evaluated.
    pub samples: usize,
    /// Exact-match accuracy (every character of a plate right), 0..1. For plain classification, the accuracy.
    pub accuracy: f64,
    /// Per-character accuracy for plates (`None` for plain classification).
    pub char_accuracy: Option<f64>,
    /// Mean cross-entropy over character slots.
    pub loss: f64,
}

/// Evaluate `model` (BatchNorm in inference mode, nothing changes) on `data`, `batch` images at a time: the loss
/// on its plain logits, the accuracies on what it reads ([`reading_scores`], [`predictions`]).
pub fn evaluate(
    model: &Model,
    data: &Dataset,
    batch_size: usize,
) -> Result<Evaluation, TrainError> {
    check_data(model.arch(), data)?;
    let bs = batch_size.max(1);
    let slots = data.slots();
    let (mut exact, mut chars, mut loss_sum) = (0usize, 0usize, 0f64);
    let all: Vec<usize> = (0..data.len()).collect();
    for idx in all.chunks(bs) {
        let (x, y) = batch(data, idx, model.device())?;
        // Detached: nothing is trained here, and the graph would keep the pass's activations alive.
        let logits = model.forward(&x, Mode::Eval)?.detach();
        loss_sum +=
            f64::from(loss(model.arch(), &logits, &y)?.to_scalar::<f32>()?) * idx.len() as f64;
        let labels = y.to_vec1::<u32>()?;
        let (e, c) = hits(model.arch(), &reading_scores(model, &x, &logits)?, &labels)?;
        exact += e;
        chars += c;
    }
    let n = data.len();
    Ok(Evaluation {
        samples: n,
        accuracy: exact as f64 / n as f64,
        char_accuracy: (slots > 1).then(|| chars as f64 / (n * slots) as f64),
        loss: loss_sum / n as f64,
    })
}

/// What a recalibration did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Recalibration {
    /// Samples whose statistics were averaged.
    pub samples: usize,
    /// Batches run.
    pub batches: usize,
}

/// Re-estimate every BatchNorm layer's running mean and variance on `data` (labels unused), changing no other
/// tensor. The new statistics are the cumulative average over all samples of the per-batch statistics (weight
/// `n_batch / n_seen`, i.e. PyTorch's `momentum=None` and `torch.optim.swa_utils.update_bn`), so the result does not
/// depend on a momentum and the old statistics are forgotten entirely; `num_batches_tracked` becomes the number of
/// batches, as after `update_bn`. Batches run in dataset order. A model without BatchNorm is left unchanged.
pub fn recalibrate(
    model: &mut Model,
    data: &Dataset,
    batch_size: usize,
) -> Result<Recalibration, TrainError> {
    check_data(model.arch(), data)?;
    if !model.has_batch_norm() {
        return Ok(Recalibration {
            samples: 0,
            batches: 0,
        });
    }
    let bs = batch_size.max(1);
    let all: Vec<usize> = (0..data.len()).collect();
    let mut seen = 0usize;
    let mut batches = 0usize;
    for idx in all.chunks(bs) {
        let (x, _) = batch(data, idx, model.device())?;
        seen += idx.len();
        batches += 1;
        model.forward(&x, Mode::Recalibrate(idx.len() as f64 / seen as f64))?;
    }
    model.set_batches_tracked(i64::try_from(batches).unwrap_or(i64::MAX));
    Ok(Recalibration {
        samples: seen,
        batches,
    })
}

/// [`recalibrate`] on a model given as safetensors bytes (what HQ's `merge --recalibrate` and the lab's
/// `*-recal` rows run on a merged global), returning the recalibrated model's bytes.
pub fn recalibrate_safetensors(
    arch: crate::Arch,
    weights: &[u8],
    data: &Dataset,
    batch_size: usize,
) -> Result<(Vec<u8>, Recalibration), TrainError> {
    let mut model = Model::from_safetensors(arch, weights, &crate::Device::Cpu)?;
    let r = recalibrate(&mut model, data, batch_size)?;
    Ok((model.to_safetensors()?, r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HostTensor;
    use crate::testutil::tiny;

    fn quick(epochs: u32) -> TrainConfig {
        TrainConfig {
            epochs,
            batch: 16,
            seed: 5,
            adam: AdamConfig {
                lr: 2e-3,
                warmup: 4,
                ..AdamConfig::default()
            },
            augment: Augment::none(),
        }
    }

    fn fresh(arch: Arch) -> (Model, Adam) {
        (
            Model::init(arch, 11, &Device::Cpu).unwrap(),
            Adam::new(arch, &Device::Cpu).unwrap(),
        )
    }

    /// A CTC plate reader reads the mean log-probabilities of the image and its one-pixel shifts down and right
    /// (edges repeated), shifted here pixel by pixel on the host; any other reader reads its plain logits.
    #[test]
    fn reading_averages_the_image_and_its_one_pixel_shifts() {
        let data = tiny(Arch::PlateCtcV2, 3, 9);
        let (c, h, w) = Arch::PlateCtcV2.input();
        let model = Model::init(Arch::PlateCtcV2, 4, &Device::Cpu).unwrap();
        let x = Tensor::from_slice(&data.images, (3, c, h, w), &Device::Cpu).unwrap();
        let logits = model.forward(&x, Mode::Eval).unwrap();
        let scores = reading_scores(&model, &x, &logits).unwrap();
        let mut expected = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        for (dy, dx) in [(1isize, 0isize), (0, 1)] {
            let mut moved = vec![0f32; data.images.len()];
            for (i, m) in moved.iter_mut().enumerate() {
                let (img, y, xx) = (i / (h * w), i / w % h, i % w);
                let sy = (y as isize - dy).clamp(0, h as isize - 1) as usize;
                let sx = (xx as isize - dx).clamp(0, w as isize - 1) as usize;
                *m = data.images[img * h * w + sy * w + sx];
            }
            let xs = Tensor::from_vec(moved, (3, c, h, w), &Device::Cpu).unwrap();
            let lp = model.forward(&xs, Mode::Eval).unwrap();
            expected = (expected + candle_nn::ops::log_softmax(&lp, D::Minus1).unwrap()).unwrap();
        }
        let expected = (expected / 3.0).unwrap();
        crate::testutil::assert_close("shift-averaged reading", &scores, &expected, 1e-5);
        // The shifts change what the reader sees: the average is not the plain reading.
        let plain = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let moved = (&scores - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(moved.to_scalar::<f32>().unwrap() > 1e-3);

        // Longer shifts, up and left, for measurements.
        let scores = reading_scores_with(&model, &x, &logits, &[(-2, -3)]).unwrap();
        let mut moved = vec![0f32; data.images.len()];
        for (i, m) in moved.iter_mut().enumerate() {
            let (img, y, xx) = (i / (h * w), i / w % h, i % w);
            *m = data.images[img * h * w + (y + 2).min(h - 1) * w + (xx + 3).min(w - 1)];
        }
        let xs = Tensor::from_vec(moved, (3, c, h, w), &Device::Cpu).unwrap();
        let lp = model.forward(&xs, Mode::Eval).unwrap();
        let expected =
            ((plain.clone() + candle_nn::ops::log_softmax(&lp, D::Minus1).unwrap()).unwrap() / 2.0)
                .unwrap();
        crate::testutil::assert_close("shifted up 2, left 3", &scores, &expected, 1e-5);
        assert!(reading_scores_with(&model, &x, &logits, &[(32, 0)]).is_err());

        let cnn = Model::init(Arch::PlateCnn, 4, &Device::Cpu).unwrap();
        let l = cnn.forward(&x, Mode::Eval).unwrap();
        crate::testutil::assert_close(
            "plate-cnn reading",
            &reading_scores(&cnn, &x, &l).unwrap(),
            &l,
            0.0,
        );
    }

    /// An augmentation that does not fit the images is refused before any step; one that fits trains the
    /// model away from the unaugmented run.
    #[test]
    fn augmentation_is_checked_before_training_and_changes_what_is_learnt() {
        let arch = Arch::PlateCtcV2;
        let data = tiny(arch, 16, 2);
        let (mut model, mut adam) = fresh(arch);
        let before = model.to_safetensors().unwrap();
        let wrecked = TrainConfig {
            augment: Augment {
                shift_cols: data.width,
                ..Augment::plates()
            },
            ..quick(1)
        };
        let err = train(&mut model, &mut adam, &data, &wrecked, &mut ()).unwrap_err();
        assert!(matches!(err, TrainError::Config(_)), "{err}");
        assert_eq!(model.to_safetensors().unwrap(), before);
        assert_eq!(adam.step(), 0);

        let augmented = TrainConfig {
            augment: Augment::plates(),
            ..quick(1)
        };
        train(&mut model, &mut adam, &data, &augmented, &mut ()).unwrap();
        let (mut plain, mut plain_adam) = fresh(arch);
        train(&mut plain, &mut plain_adam, &data, &quick(1), &mut ()).unwrap();
        assert_eq!(adam.step(), plain_adam.step());
        assert_ne!(
            model.to_safetensors().unwrap(),
            plain.to_safetensors().unwrap()
        );
    }

    /// Issue 7: the fused CPU ops train exactly like candle's generic ops (the CUDA path's ops): same loss curve,
    /// same weights and BatchNorm statistics after several Adam steps, within float tolerance.
    #[test]
    fn fused_ops_follow_the_plain_candle_loss_curve() {
        for arch in Arch::ALL {
            let data = tiny(arch, 24, 3);
            let cfg = AdamConfig {
                lr: 2e-3,
                warmup: 0,
                ..AdamConfig::default()
            };
            let run = |generic: bool| {
                let (mut model, mut adam) = fresh(arch);
                if generic {
                    model.set_ops(crate::model::Ops::Generic);
                }
                let mut losses = Vec::new();
                for step in 0..6 {
                    let idx: Vec<usize> = (0..16).map(|i| (i + 4 * step) % 24).collect();
                    let (x, y) = batch(&data, &idx, &Device::Cpu).unwrap();
                    losses.push(train_step(&mut model, &mut adam, &x, &y, &cfg).unwrap().1);
                }
                (losses, model.to_host().unwrap())
            };
            let (fused_losses, fused) = run(false);
            let (plain_losses, plain) = run(true);
            assert!(
                plain_losses[5] < plain_losses[0],
                "{arch:?}: the reference path learns"
            );
            // CTC's alignment posteriors amplify the float rounding in which the two paths differ.
            let tol = match arch.reader() {
                Reader::Slots => 1e-4,
                Reader::Ctc { .. } => 1e-2,
            };
            for (step, (a, b)) in fused_losses.iter().zip(&plain_losses).enumerate() {
                assert!(
                    (a - b).abs() <= tol * b.abs().max(1.0),
                    "{arch:?} step {step}: loss {a} vs {b}"
                );
            }
            for (name, tensor) in &plain {
                match (tensor, &fused[name]) {
                    (HostTensor::F32(p), HostTensor::F32(f)) => {
                        let scale = p.iter().fold(1f32, |m, v| m.max(v.abs()));
                        let diff = p.iter().zip(f).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                        assert!(
                            diff <= 10.0 * tol * scale,
                            "{arch:?} {name}: max difference {diff}"
                        );
                    }
                    (p, f) => assert_eq!(p, f, "{arch:?} {name}"),
                }
            }
        }
    }

    /// 12 epochs (48 steps): the loss is read in inference mode (BatchNorm's running statistics), and after 8
    /// epochs the deepest reader's had not come down yet (plate-ctc-deep-v4: 22.7 → 35.5; 5.8 after 12).
    #[test]
    fn loss_decreases() {
        for arch in Arch::ALL {
            let data = tiny(arch, 64, 1);
            let (mut m, mut a) = fresh(arch);
            let before = evaluate(&m, &data, 64).unwrap().loss;
            train(&mut m, &mut a, &data, &quick(12), &mut ()).unwrap();
            let after = evaluate(&m, &data, 64).unwrap().loss;
            assert!(after < before * 0.7, "{arch}: loss {before} -> {after}");
        }
    }

    #[test]
    fn training_is_reproducible_for_a_seed() {
        let data = tiny(Arch::PlateCnn, 40, 2);
        let run = || {
            let (mut m, mut a) = fresh(Arch::PlateCnn);
            train(&mut m, &mut a, &data, &quick(1), &mut ()).unwrap();
            (m.to_safetensors().unwrap(), a.to_safetensors().unwrap())
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn resuming_after_an_epoch_reproduces_the_uninterrupted_run() {
        let arch = Arch::PlateCnn;
        let data = tiny(arch, 40, 3);
        let (mut m, mut a) = fresh(arch);
        let whole = train_epochs(
            &mut m,
            &mut a,
            &data,
            &quick(2),
            9,
            0,
            &mut (),
            |_, _, _| Ok::<_, TrainError>(()),
        )
        .unwrap();

        let (mut m1, mut a1) = fresh(arch);
        train_epochs(
            &mut m1,
            &mut a1,
            &data,
            &quick(1),
            9,
            0,
            &mut (),
            |_, _, _| Ok::<_, TrainError>(()),
        )
        .unwrap();
        // "Interrupt": keep only the bytes, as a checkpoint would.
        let (mb, ab) = (m1.to_safetensors().unwrap(), a1.to_safetensors().unwrap());
        let mut m2 = Model::from_safetensors(arch, &mb, &Device::Cpu).unwrap();
        let mut a2 = Adam::from_safetensors(arch, &ab, &Device::Cpu).unwrap();
        let rest = train_epochs(
            &mut m2,
            &mut a2,
            &data,
            &quick(2),
            9,
            1,
            &mut (),
            |_, _, _| Ok::<_, TrainError>(()),
        )
        .unwrap();

        assert_eq!(a2.step(), a.step());
        assert_eq!(whole.total_steps, rest.total_steps);
        assert_eq!(rest.epochs_run, 1);
        assert_eq!(m2.to_safetensors().unwrap(), m.to_safetensors().unwrap());
        assert_eq!(a2.to_safetensors().unwrap(), a.to_safetensors().unwrap());
    }

    #[test]
    fn recalibration_changes_only_batch_norm_statistics() {
        let arch = Arch::PlateCnn;
        let (mut m, _) = fresh(arch);
        let before = m.to_host().unwrap();
        let data = tiny(arch, 24, 4);
        let r = recalibrate(&mut m, &data, 10).unwrap();
        assert_eq!((r.samples, r.batches), (24, 3));
        let after = m.to_host().unwrap();
        for spec in arch.tensors() {
            let (b, a) = (&before[&spec.name], &after[&spec.name]);
            if spec.kind.is_bn_stat() {
                assert_ne!(b, a, "{} should have been re-estimated", spec.name);
            } else {
                assert_eq!(b, a, "{} must not change", spec.name);
            }
        }
        assert_eq!(after["bn1.num_batches_tracked"], HostTensor::I64(3));
    }

    #[test]
    fn recalibration_is_the_cumulative_average_over_samples() {
        // With uneven batches (10, 10, 4) the result must equal one pass over all 24 samples at once for the first
        // layer's mean (the first layer's input does not depend on earlier statistics).
        let arch = Arch::PlateCnn;
        let data = tiny(arch, 24, 4);
        let (mut a, _) = fresh(arch);
        let (mut b, _) = fresh(arch);
        recalibrate(&mut a, &data, 10).unwrap();
        recalibrate(&mut b, &data, 24).unwrap();
        let HostTensor::F32(x) = &a.to_host().unwrap()["bn1.running_mean"] else {
            panic!()
        };
        let HostTensor::F32(y) = &b.to_host().unwrap()["bn1.running_mean"] else {
            panic!()
        };
        for (x, y) in x.iter().zip(y) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn evaluation_changes_nothing_and_reports_per_character_accuracy() {
        let arch = Arch::PlateCnn;
        let (m, _) = fresh(arch);
        let before = m.to_host().unwrap();
        let e = evaluate(&m, &tiny(arch, 20, 5), 8).unwrap();
        assert_eq!(before, m.to_host().unwrap());
        assert_eq!(e.samples, 20);
        assert!(e.char_accuracy.is_some());
        assert!((0.0..=1.0).contains(&e.accuracy));
    }

    #[test]
    fn data_that_does_not_fit_is_refused() {
        let (m, _) = fresh(Arch::PlateCnn);
        let err = evaluate(&m, &tiny(Arch::MnistCnn, 4, 1), 8).unwrap_err();
        assert!(matches!(err, TrainError::DataMismatch { .. }), "{err}");
        let mut empty = tiny(Arch::PlateCnn, 1, 1);
        empty.images.clear();
        empty.labels.clear();
        assert!(matches!(
            evaluate(&m, &empty, 8),
            Err(TrainError::EmptyDataset)
        ));
    }

    #[test]
    fn warmup_is_linear_then_flat() {
        let c = AdamConfig {
            lr: 1.0,
            warmup: 4,
            ..AdamConfig::default()
        };
        assert_eq!(
            [c.lr_at(1), c.lr_at(2), c.lr_at(4), c.lr_at(100)],
            [0.25, 0.5, 1.0, 1.0]
        );
    }

    #[test]
    fn cosine_decay_follows_warmup_and_stops_at_its_floor() {
        let c = AdamConfig {
            lr: 1.0,
            warmup: 4,
            decay: Some(crate::CosineDecay {
                until: 104,
                floor: 0.1,
            }),
            ..AdamConfig::default()
        };
        let at = |s| c.lr_at(s);
        assert_eq!([at(2), at(4)], [0.5, 1.0]);
        // Halfway through the decay: the midpoint between the peak and the floor.
        assert!((at(54) - 0.55).abs() < 1e-12, "{}", at(54));
        assert!(at(30) > at(54) && at(54) > at(90));
        assert!((at(104) - 0.1).abs() < 1e-12);
        assert!((at(10_000) - 0.1).abs() < 1e-12);
        // A decay that ends inside the warm-up leaves the floor after it.
        let short = AdamConfig {
            decay: Some(crate::CosineDecay {
                until: 2,
                floor: 0.1,
            }),
            ..c
        };
        assert!((short.lr_at(50) - 0.1).abs() < 1e-12);
    }
}
