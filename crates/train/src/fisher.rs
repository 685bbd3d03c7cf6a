//! A model's diagonal Fisher estimate on a site's labelled data (issue 14): what a site ships next to its update
//! for HQ's Fisher-weighted merge (`ferry-server merge --strategy fisher`, Matena & Raffel 2022).
//!
//! The empirical Fisher's diagonal, estimated from mini-batches: for each batch of `batch` samples, the squared
//! gradient of the training loss with respect to every trainable tensor, averaged over the batches. A batch
//! gradient's square is the per-sample Fisher divided by the batch size plus the squared mean gradient, so the
//! estimate is the Fisher up to a factor per tensor; HQ divides each tensor's values by their mean anyway, so
//! only the relative importance of the parameters within a tensor counts. BatchNorm statistics and counters are
//! not trained by gradient and get none (the merge has its own rules for them).

use std::collections::BTreeMap;
use std::time::Instant;

use crate::arch::Arch;
use crate::data::Dataset;
use crate::error::TrainError;
use crate::model::{write_safetensors_with, HostTensor, Mode, Model};
use crate::train::{batch, check_data, epoch_order, loss};

/// How the estimate is taken.
#[derive(Debug, Clone, PartialEq)]
pub struct FisherConfig {
    /// Samples used, the first ones of a seeded shuffle (0: all of the data).
    pub samples: usize,
    /// Samples per gradient.
    pub batch: usize,
    /// Shuffle seed.
    pub seed: u64,
}

impl Default for FisherConfig {
    fn default() -> Self {
        FisherConfig {
            samples: 2000,
            batch: 16,
            seed: 0,
        }
    }
}

/// The estimate: per trainable tensor (by `state_dict` name), one value ≥ 0 per element.
#[derive(Debug, Clone, PartialEq)]
pub struct FisherEstimate {
    /// Mean squared batch gradient, per trainable tensor.
    pub tensors: BTreeMap<String, Vec<f32>>,
    /// Samples it was taken on.
    pub samples: usize,
    /// Batches (gradients) averaged.
    pub batches: usize,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl FisherEstimate {
    /// The estimate as a safetensors file: F32 tensors named and shaped like `arch`'s (no metadata).
    pub fn to_safetensors(&self, arch: Arch) -> Result<Vec<u8>, TrainError> {
        let host = self
            .tensors
            .iter()
            .map(|(n, v)| (n.clone(), HostTensor::F32(v.clone())))
            .collect();
        write_safetensors_with(&host, Some(arch), None)
    }
}

/// The diagonal Fisher estimate of `model` on `data` (labels used: the empirical Fisher). The model's weights
/// are not changed; its BatchNorm running statistics may be (the gradients are taken in training mode, as
/// training takes them), so estimate on a copy that is not written back. `progress(done, total)` is called
/// after every batch.
pub fn diagonal_fisher(
    model: &mut Model,
    data: &Dataset,
    cfg: &FisherConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<FisherEstimate, TrainError> {
    if cfg.batch == 0 {
        return Err(TrainError::Config(
            "the Fisher estimate needs a batch of at least 1".into(),
        ));
    }
    let arch = model.arch();
    check_data(arch, data)?;
    let start = Instant::now();
    let mut order = epoch_order(data.len(), cfg.seed, 0, 0);
    if cfg.samples > 0 {
        order.truncate(cfg.samples);
    }
    let trainable: Vec<String> = arch
        .tensors()
        .into_iter()
        .filter(|s| s.kind.is_trainable())
        .map(|s| s.name)
        .collect();
    let vars = model.vars();
    let mut sums: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let total = order.len().div_ceil(cfg.batch);
    for (b, idx) in order.chunks(cfg.batch).enumerate() {
        let (x, y) = batch(data, idx, model.device())?;
        let step = model.open_step();
        let logits = model.forward(&x, Mode::Train)?;
        let l = loss(arch, &logits, &y)?;
        let lv = l.to_scalar::<f32>()?;
        if !lv.is_finite() {
            return Err(TrainError::Diverged { loss: lv, step: 0 });
        }
        let grads = step.backward(&l)?;
        for name in &trainable {
            let var = vars.get(name).ok_or_else(|| TrainError::WeightsMismatch {
                arch: arch.name(),
                detail: format!("tensor `{name}` is missing"),
            })?;
            // A tensor the loss does not reach (none in ferry's models) has a zero gradient.
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            let acc = sums
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; g.len()]);
            for (a, v) in acc.iter_mut().zip(&g) {
                *a += f64::from(*v) * f64::from(*v);
            }
        }
        progress(b + 1, total);
    }
    let batches = total.max(1) as f64;
    let mut tensors = BTreeMap::new();
    for name in trainable {
        let numel = vars
            .get(&name)
            .map(|v| v.as_tensor().elem_count())
            .unwrap_or(0);
        let values = match sums.remove(&name) {
            Some(s) => s.iter().map(|v| (v / batches) as f32).collect(),
            None => vec![0.0; numel],
        };
        tensors.insert(name, values);
    }
    Ok(FisherEstimate {
        tensors,
        samples: order.len(),
        batches: total,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::tiny;
    use candle_core::Device;

    #[test]
    fn the_estimate_covers_every_trainable_tensor_is_non_negative_and_tracks_the_loss() {
        let data = tiny(Arch::MnistCnn, 64, 5);
        let mut model = Model::init(Arch::MnistCnn, 3, &crate::Device::Cpu).unwrap();
        let before = model.to_safetensors().unwrap();
        let cfg = FisherConfig {
            samples: 32,
            batch: 8,
            seed: 1,
        };
        let mut calls = Vec::new();
        let est = diagonal_fisher(&mut model, &data, &cfg, &mut |d, t| calls.push((d, t))).unwrap();
        assert_eq!(calls, [(1, 4), (2, 4), (3, 4), (4, 4)]);
        assert_eq!((est.samples, est.batches), (32, 4));
        let trainable: Vec<String> = Arch::MnistCnn
            .tensors()
            .into_iter()
            .filter(|s| s.kind.is_trainable())
            .map(|s| s.name)
            .collect();
        assert_eq!(est.tensors.keys().cloned().collect::<Vec<_>>(), trainable);
        for spec in Arch::MnistCnn
            .tensors()
            .into_iter()
            .filter(|s| s.kind.is_trainable())
        {
            let v = &est.tensors[&spec.name];
            assert_eq!(v.len(), spec.numel(), "{}", spec.name);
            assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0));
            assert!(v.iter().any(|x| *x > 0.0), "{} has no signal", spec.name);
        }
        // The weights are untouched, and the same settings give the same estimate.
        assert_eq!(model.to_safetensors().unwrap(), before);
        let again = diagonal_fisher(&mut model, &data, &cfg, &mut |_, _| {}).unwrap();
        assert_eq!(again.tensors, est.tensors);
        // Against a hand-made reference for the output bias: the mean over batches of (∂L/∂b)², where for the
        // mean cross-entropy ∂L/∂b_c = mean over the batch of (softmax_c − onehot_c).
        let order = epoch_order(data.len(), 1, 0, 0);
        let mut want = vec![0f64; 10];
        for idx in order[..32].chunks(8) {
            let (x, _) = batch(&data, idx, &Device::Cpu).unwrap();
            let logits = model
                .forward(&x, Mode::Eval)
                .unwrap()
                .reshape((idx.len(), 10))
                .unwrap();
            let p = candle_nn::ops::softmax_last_dim(&logits)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut g = [0f64; 10];
            for (row, &i) in p.iter().zip(idx) {
                let label = data.label(i)[0] as usize;
                for c in 0..10 {
                    g[c] +=
                        (f64::from(row[c]) - f64::from(u8::from(c == label))) / idx.len() as f64;
                }
            }
            for c in 0..10 {
                want[c] += g[c] * g[c] / 4.0;
            }
        }
        let head = est
            .tensors
            .iter()
            .filter(|(n, v)| n.ends_with(".bias") && v.len() == 10)
            .map(|(_, v)| v)
            .next_back()
            .unwrap();
        for (got, want) in head.iter().zip(&want) {
            assert!(
                (f64::from(*got) - want).abs() <= 1e-4 * want.max(1e-6) + 1e-9,
                "{got} vs {want}"
            );
        }
    }
}
