//! Adam (Kingma & Ba 2015, as in PyTorch's `torch.optim.Adam` without weight decay) over a model's trainable
//! tensors in sorted-name order, with a linear learning-rate warm-up. Written here rather than using
//! `candle_nn::AdamW` because the moments and the step count must be saved in the site state and carried from round
//! to round (the field study kept each site's Adam state across rounds), and AdamW does not expose them.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};

use crate::arch::Arch;
use crate::error::TrainError;
use crate::model::{HostTensor, Model};

/// Adam settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamConfig {
    /// Peak learning rate (reached after the warm-up).
    pub lr: f64,
    /// Steps of linear warm-up from 0 to `lr`, counted on the optimizer's lifetime step count (so the warm-up
    /// happens once per site, not once per round).
    pub warmup: u64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
}

impl Default for AdamConfig {
    /// The field study's settings: lr 2.5e-4, warm-up 1000, PyTorch's betas and eps.
    fn default() -> Self {
        AdamConfig {
            lr: 2.5e-4,
            warmup: 1000,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl AdamConfig {
    /// The learning rate used for step number `step` (1-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup == 0 || step >= self.warmup {
            self.lr
        } else {
            self.lr * step as f64 / self.warmup as f64
        }
    }
}

/// Adam's state: the step count and the first and second moments of every trainable tensor.
#[derive(Debug)]
pub struct Adam {
    arch: Arch,
    step: u64,
    /// By tensor name: (first moment, second moment).
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl Adam {
    /// Fresh state (step 0, zero moments) for a model of `arch`.
    pub fn new(arch: Arch, device: &Device) -> Result<Adam, TrainError> {
        let mut moments = BTreeMap::new();
        for spec in arch.tensors().into_iter().filter(|s| s.kind.is_trainable()) {
            let z = Tensor::zeros(spec.shape.as_slice(), candle_core::DType::F32, device)?;
            moments.insert(spec.name, (z.clone(), z));
        }
        Ok(Adam {
            arch,
            step: 0,
            moments,
        })
    }

    /// Steps taken so far (over all rounds).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The architecture this state belongs to.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Apply one update from `grads` to the model's trainable tensors, returning the learning rate used.
    pub fn update(
        &mut self,
        model: &Model,
        grads: &GradStore,
        cfg: &AdamConfig,
    ) -> Result<f64, TrainError> {
        self.step += 1;
        let t = self.step as i32;
        let lr = cfg.lr_at(self.step);
        let c1 = 1.0 - cfg.beta1.powi(t);
        let c2 = 1.0 - cfg.beta2.powi(t);
        let vars = model.vars();
        for (name, (m, v)) in self.moments.iter_mut() {
            let Some(var) = vars.get(name) else { continue };
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            *m = ((&*m * cfg.beta1)? + (g * (1.0 - cfg.beta1))?)?;
            *v = ((&*v * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
            let denom = ((&*v / c2)?.sqrt()? + cfg.eps)?;
            let delta = ((&*m * (lr / c1))? / denom)?;
            var.set(&var.as_tensor().sub(&delta)?)?;
        }
        Ok(lr)
    }

    /// Host copies of the state: tensors named `exp_avg.<name>` and `exp_avg_sq.<name>` plus the I64 scalar `step`.
    pub fn to_host(&self) -> Result<BTreeMap<String, HostTensor>, TrainError> {
        let mut out = BTreeMap::new();
        for (name, (m, v)) in &self.moments {
            out.insert(
                format!("exp_avg.{name}"),
                HostTensor::F32(m.flatten_all()?.to_vec1()?),
            );
            out.insert(
                format!("exp_avg_sq.{name}"),
                HostTensor::F32(v.flatten_all()?.to_vec1()?),
            );
        }
        out.insert(
            "step".into(),
            HostTensor::I64(i64::try_from(self.step).unwrap_or(i64::MAX)),
        );
        Ok(out)
    }

    /// Rebuild the state from [`Adam::to_host`]'s output, checking it belongs to `arch`.
    pub fn from_host(
        arch: Arch,
        mut host: BTreeMap<String, HostTensor>,
        device: &Device,
    ) -> Result<Adam, TrainError> {
        let bad = |d: String| TrainError::OptimizerState(d);
        let step = match host.remove("step") {
            Some(HostTensor::I64(s)) if s >= 0 => s as u64,
            _ => return Err(bad("no valid `step` counter".into())),
        };
        let mut moments = BTreeMap::new();
        for spec in arch.tensors().into_iter().filter(|s| s.kind.is_trainable()) {
            let mut take = |prefix: &str| -> Result<Tensor, TrainError> {
                let key = format!("{prefix}.{}", spec.name);
                match host.remove(&key) {
                    Some(HostTensor::F32(v))
                        if v.len() == spec.numel() && v.iter().all(|x| x.is_finite()) =>
                    {
                        Ok(Tensor::from_vec(v, spec.shape.as_slice(), device)?)
                    }
                    _ => Err(bad(format!("`{key}` is missing or does not fit {arch}"))),
                }
            };
            let m = take("exp_avg")?;
            let v = take("exp_avg_sq")?;
            moments.insert(spec.name, (m, v));
        }
        if let Some(extra) = host.keys().next() {
            return Err(bad(format!("unexpected tensor `{extra}`")));
        }
        Ok(Adam {
            arch,
            step,
            moments,
        })
    }

    /// Serialise as safetensors (the architecture name in the metadata).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, TrainError> {
        crate::model::write_safetensors(&self.to_host()?, None)
    }

    /// Parse [`Adam::to_safetensors`]'s output.
    pub fn from_safetensors(arch: Arch, bytes: &[u8], device: &Device) -> Result<Adam, TrainError> {
        let (host, _) = crate::model::read_any_safetensors(bytes)
            .map_err(|e| TrainError::OptimizerState(e.to_string()))?;
        Adam::from_host(arch, host, device)
    }
}
