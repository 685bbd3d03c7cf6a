//! Adam (Kingma & Ba 2015, as in PyTorch's `torch.optim.Adam` without weight decay) over a model's trainable
//! tensors in sorted-name order, with a linear learning-rate warm-up and an optional cosine decay. Written here rather than using
//! `candle_nn::AdamW` because the moments and the step count must be saved in the site state and carried from round
//! to round (the field study kept each site's Adam state across rounds), and AdamW does not expose them.

use std::collections::BTreeMap;

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, Device, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

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
    /// Cosine decay after the warm-up; `None` keeps `lr` flat.
    pub decay: Option<CosineDecay>,
}

/// A cosine learning-rate decay (Loshchilov & Hutter 2017, without restarts) on the optimizer's lifetime step
/// count: from `lr` at the end of the warm-up down to `lr · floor` at step `until`, flat after that. A floor above
/// zero keeps a site that trains past the planned steps (an extra round) learning rather than frozen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineDecay {
    /// The step at which the decay reaches its floor.
    pub until: u64,
    /// The final learning rate as a fraction of `lr`, in `[0, 1]`.
    pub floor: f64,
}

impl CosineDecay {
    /// The floor ferry uses unless told otherwise: 1 % of the peak.
    pub const DEFAULT_FLOOR: f64 = 0.01;
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
            decay: None,
        }
    }
}

impl AdamConfig {
    /// The learning rate used for step number `step` (1-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.lr * step as f64 / self.warmup as f64;
        }
        match self.decay {
            Some(d) if d.until > self.warmup => {
                let t = (step.min(d.until) - self.warmup) as f64 / (d.until - self.warmup) as f64;
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                self.lr * (d.floor + (1.0 - d.floor) * cos)
            }
            Some(d) => self.lr * d.floor,
            None => self.lr,
        }
    }
}

/// Adam's state: the step count and the first and second moments of every trainable tensor.
#[derive(Debug)]
pub struct Adam {
    arch: Arch,
    step: u64,
    /// By tensor name: (first moment, second moment).
    moments: BTreeMap<String, Moments>,
}

/// One tensor's moments: host vectors on the CPU (updated by one fused pass, issue 7), device tensors elsewhere.
#[derive(Debug)]
enum Moments {
    Host(Vec<f32>, Vec<f32>),
    Device(Tensor, Tensor),
}

impl Moments {
    fn new(
        m: Vec<f32>,
        v: Vec<f32>,
        shape: &[usize],
        device: &Device,
    ) -> Result<Moments, TrainError> {
        if device.is_cpu() {
            return Ok(Moments::Host(m, v));
        }
        Ok(Moments::Device(
            Tensor::from_vec(m, shape, device)?,
            Tensor::from_vec(v, shape, device)?,
        ))
    }

    fn to_vecs(&self) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
        Ok(match self {
            Moments::Host(m, v) => (m.clone(), v.clone()),
            Moments::Device(m, v) => (m.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?),
        })
    }
}

/// One Adam step for a tensor whose moments live on the device (CUDA): updates `m` and `v` and returns the amount
/// to subtract from the parameter. The gradient is detached first: candle detaches the gradient flowing into each
/// node, but a convolution's weight gradient is then computed from the node's input, and when that input is an
/// activation the gradient carries the step's graph. Moments computed from it would chain every step's graph
/// together (m(t) -> m(t-1) -> ...): on an H200 training ran out of its 139 GiB within a few hundred steps.
fn device_step(
    m: &mut Tensor,
    v: &mut Tensor,
    g: &Tensor,
    cfg: &AdamConfig,
    lr: f64,
    (c1, c2): (f64, f64),
) -> Result<Tensor, TrainError> {
    let g = g.detach();
    *m = ((&*m * cfg.beta1)? + (&g * (1.0 - cfg.beta1))?)?;
    *v = ((&*v * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
    let denom = ((&*v / c2)?.sqrt()? + cfg.eps)?;
    Ok(((&*m * (lr / c1))? / denom)?)
}

/// One Adam step for one CPU tensor in a single pass: moments updated in place, the parameter (the in-place
/// destination) moved, with the same arithmetic as the generic path.
struct FusedStep<'a> {
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
    beta1: f32,
    beta2: f32,
    /// `lr / (1 - beta1^t)`.
    step: f32,
    /// `1 / (1 - beta2^t)`.
    inv_c2: f32,
    eps: f32,
}

impl<'a> FusedStep<'a> {
    /// The update with learning rate `lr` and bias corrections `c1 = 1 − β1^t`, `c2 = 1 − β2^t`.
    fn new(
        (m, v): (&'a mut [f32], &'a mut [f32]),
        cfg: &AdamConfig,
        lr: f64,
        (c1, c2): (f64, f64),
    ) -> Self {
        FusedStep {
            moments: Mutex::new((m, v)),
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            step: (lr / c1) as f32,
            inv_c2: (1.0 / c2) as f32,
            eps: cfg.eps as f32,
        }
    }
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "ferry-adam-step"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        grad: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (dst, grad) else {
            bail!("adam: only f32 is supported")
        };
        let (Some((p0, p1)), Some((g0, g1))) =
            (dst_l.contiguous_offsets(), g_l.contiguous_offsets())
        else {
            bail!("adam: parameter and gradient must be contiguous")
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let mut guard = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        let (m, v) = &mut *guard;
        if [g.len(), m.len(), v.len()] != [p.len(); 3] {
            bail!("adam: gradient or moments do not match the parameter")
        }
        let (b1, b2) = (self.beta1, self.beta2);
        let update = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = *m * b1 + g * (1.0 - b1);
                *v = *v * b2 + g * g * (1.0 - b2);
                *p -= self.step * *m / ((*v * self.inv_c2).sqrt() + self.eps);
            }
        };
        // Elementwise, so splitting over threads changes no result.
        const PIECE: usize = 1 << 15;
        p.par_chunks_mut(PIECE)
            .zip(g.par_chunks(PIECE))
            .zip(m.par_chunks_mut(PIECE))
            .zip(v.par_chunks_mut(PIECE))
            .for_each(|(((p, g), m), v)| update(p, g, m, v));
        Ok(())
    }
}

impl Adam {
    /// Fresh state (step 0, zero moments) for a model of `arch`.
    pub fn new(arch: Arch, device: &Device) -> Result<Adam, TrainError> {
        let mut moments = BTreeMap::new();
        for spec in arch.tensors().into_iter().filter(|s| s.kind.is_trainable()) {
            let n = spec.numel();
            let z = Moments::new(vec![0.0; n], vec![0.0; n], &spec.shape, device)?;
            moments.insert(spec.name, z);
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
        for (name, moments) in self.moments.iter_mut() {
            let Some(var) = vars.get(name) else { continue };
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let (m, v) = match moments {
                Moments::Host(m, v) => {
                    let step =
                        FusedStep::new((m.as_mut_slice(), v.as_mut_slice()), cfg, lr, (c1, c2));
                    var.as_tensor().inplace_op2(&g.contiguous()?, &step)?;
                    continue;
                }
                Moments::Device(m, v) => (m, v),
            };
            let delta = device_step(m, v, g, cfg, lr, (c1, c2))?;
            var.set(&var.as_tensor().sub(&delta)?)?;
        }
        Ok(lr)
    }

    /// Host copies of the state: tensors named `exp_avg.<name>` and `exp_avg_sq.<name>` plus the I64 scalar `step`.
    pub fn to_host(&self) -> Result<BTreeMap<String, HostTensor>, TrainError> {
        let mut out = BTreeMap::new();
        for (name, moments) in &self.moments {
            let (m, v) = moments.to_vecs()?;
            out.insert(format!("exp_avg.{name}"), HostTensor::F32(m));
            out.insert(format!("exp_avg_sq.{name}"), HostTensor::F32(v));
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
            let mut take = |prefix: &str| -> Result<Vec<f32>, TrainError> {
                let key = format!("{prefix}.{}", spec.name);
                match host.remove(&key) {
                    Some(HostTensor::F32(v))
                        if v.len() == spec.numel() && v.iter().all(|x| x.is_finite()) =>
                    {
                        Ok(v)
                    }
                    _ => Err(bad(format!("`{key}` is missing or does not fit {arch}"))),
                }
            };
            let m = take("exp_avg")?;
            let v = take("exp_avg_sq")?;
            moments.insert(spec.name, Moments::new(m, v, &spec.shape, device)?);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_moments_never_hold_the_backward_graph() {
        // The weight gradient of a convolution whose input is an activation carries the step's graph; moments
        // that kept it would chain every step's activations together (on CUDA: out of memory within minutes).
        let dev = Device::Cpu;
        let x = Tensor::from_vec(
            (0..32).map(|i| i as f32 / 32.0).collect(),
            (1, 2, 4, 4),
            &dev,
        )
        .unwrap();
        let w1 = candle_core::Var::from_vec(vec![0.5f32, -1.0], (1, 2, 1, 1), &dev).unwrap();
        let w2 = candle_core::Var::from_vec(
            (0..9).map(|i| i as f32 / 9.0).collect(),
            (1, 1, 3, 3),
            &dev,
        )
        .unwrap();
        let hidden = x
            .conv2d(w1.as_tensor(), 0, 1, 1, 1)
            .unwrap()
            .relu()
            .unwrap();
        let out = hidden.conv2d(w2.as_tensor(), 1, 1, 1, 1).unwrap();
        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(w2.as_tensor()).unwrap();
        assert!(g.track_op(), "the premise: this gradient carries its graph");
        let zeros = || Tensor::zeros((1, 1, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let (mut m, mut v) = (zeros(), zeros());
        let cfg = AdamConfig::default();
        for _ in 0..2 {
            let delta = device_step(&mut m, &mut v, g, &cfg, 1e-2, (0.1, 0.001)).unwrap();
            assert!(!m.track_op() && !v.track_op() && !delta.track_op());
        }
    }

    #[test]
    fn fused_step_matches_the_generic_candle_update() {
        let dev = Device::Cpu;
        let n = 37;
        let vals = |k: u64| -> Vec<f32> {
            (0..n as u64)
                .map(|i| (((i + 1) * (k * 7919 + 13)) % 101) as f32 / 101.0 - 0.5)
                .collect()
        };
        let cfg = AdamConfig::default();
        let p = Tensor::from_vec(vals(1), n, &dev).unwrap();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (mut mt, mut vt) = (
            Tensor::zeros(n, candle_core::DType::F32, &dev).unwrap(),
            Tensor::zeros(n, candle_core::DType::F32, &dev).unwrap(),
        );
        let mut reference = p.copy().unwrap();
        for t in 1..=3i32 {
            let g = Tensor::from_vec(vals(t as u64 + 1), n, &dev).unwrap();
            let lr = 1e-2;
            let (c1, c2) = (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t));
            let step = FusedStep::new((m.as_mut_slice(), v.as_mut_slice()), &cfg, lr, (c1, c2));
            p.inplace_op2(&g, &step).unwrap();
            let delta = device_step(&mut mt, &mut vt, &g, &cfg, lr, (c1, c2)).unwrap();
            reference = (reference - delta).unwrap();
        }
        let (a, b) = (
            p.to_vec1::<f32>().unwrap(),
            reference.to_vec1::<f32>().unwrap(),
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6, "{x} vs {y}");
        }
        for (x, y) in m.iter().zip(mt.to_vec1::<f32>().unwrap()) {
            assert!((x - y).abs() <= 1e-7, "{x} vs {y}");
        }
    }
}
