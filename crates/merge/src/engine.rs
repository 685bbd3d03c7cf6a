//! The streaming merge engine (issue 3). Tensors are visited in sorted-name order, twice: a first pass reads
//! every input once to check it (layout, NaN/Inf) and to measure each update's L2 distance from the base (the
//! norm report, and `--clip-norm`); the second pass combines tensor by tensor and hands each result to the
//! caller's sink. Nothing reaches the sink unless every input passed the first pass, and the server-optimizer
//! state is only changed once the last tensor has been written. Memory stays near one f64 accumulator plus one
//! input tensor (robust strategies: one slice of every input).
//!
//! Determinism: updates are combined in the order of their bundle hashes, in f64, so the same inputs in any
//! order give byte-identical output.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use safetensors::Dtype;
use serde::Serialize;

use crate::config::has_suffix;
use crate::state::Moments;
use crate::tensor::{decode_f64, encode_f64, for_each_f64, max_f64_into, max_into};
use crate::{MergeConfig, MergeError, OwnedTensor, ServerState, Strategy, TensorSource, Weighting};
use ferry_bundle::tensor::{dtype_size, is_float, is_int, TensorMeta};

/// One verified update to merge.
pub struct Contribution<'a> {
    /// The site id (from the verified manifest).
    pub site: String,
    /// The update bundle's hash, hex; also the combining order.
    pub bundle: String,
    /// The signed sample count.
    pub samples: u64,
    /// The update's tensors.
    pub source: &'a mut dyn TensorSource,
}

impl fmt::Debug for Contribution<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Contribution")
            .field("site", &self.site)
            .field("bundle", &self.bundle)
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}

/// The rule that produced one output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum TensorRule {
    /// Weighted average of the (clipped) updates.
    Average,
    /// Weighted average, then a FedAvgM server step.
    Momentum,
    /// Weighted average, then a FedAdam server step.
    Adam,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
    /// BatchNorm running mean: weighted average.
    BnMean,
    /// BatchNorm running variance: pooled, `Σ wᵢ(σᵢ² + (μᵢ − μ)²)`.
    BnVarPooled,
    /// BatchNorm running variance without a matching mean tensor: weighted average.
    BnVarAverage,
    /// Integer, boolean or counter tensor: element-wise maximum.
    Max,
}

impl fmt::Display for TensorRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TensorRule::Average => "weighted average",
            TensorRule::Momentum => "average + server momentum",
            TensorRule::Adam => "average + server adam",
            TensorRule::Median => "coordinate median",
            TensorRule::TrimmedMean => "coordinate trimmed mean",
            TensorRule::BnMean => "bn mean: weighted average",
            TensorRule::BnVarPooled => "bn var: pooled variance",
            TensorRule::BnVarAverage => "bn var: weighted average (no matching mean)",
            TensorRule::Max => "max",
        })
    }
}

/// What happened to one update.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContributionReport {
    /// The site id.
    pub site: String,
    /// The bundle hash.
    pub bundle: String,
    /// The signed sample count.
    pub samples: u64,
    /// The weight used (sums to 1; `1/n` for the robust strategies, which ignore weights).
    pub weight: f64,
    /// L2 distance of the update from the base over the trainable float tensors (not BatchNorm statistics or
    /// counters), before clipping.
    pub distance: f64,
    /// Whether `--clip-norm` scaled the update down.
    pub clipped: bool,
    /// The factor the update's difference from the base was multiplied by (1 when not clipped).
    pub scale: f64,
}

/// One output tensor and the rule that made it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorReport {
    /// The tensor name.
    pub name: String,
    /// Its dtype, as safetensors writes it.
    pub dtype: String,
    /// The rule.
    pub rule: TensorRule,
}

/// The norm report and rule list of a merge, for the operator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergeReport {
    /// The strategy used.
    pub strategy: Strategy,
    /// [`MergeConfig::describe`] of the configuration.
    pub config: String,
    /// Every update, in combining order (by bundle hash).
    pub contributions: Vec<ContributionReport>,
    /// Every output tensor in sorted-name order.
    pub tensors: Vec<TensorReport>,
}

impl MergeReport {
    /// Updates whose distance from the base exceeds `factor` times the median distance of the other updates:
    /// the ones to look at before trusting the merge (a site whose update is scaled ×100 shows here).
    pub fn outliers(&self, factor: f64) -> Vec<&ContributionReport> {
        let d: Vec<f64> = self.contributions.iter().map(|c| c.distance).collect();
        self.contributions
            .iter()
            .enumerate()
            .filter(|(i, c)| {
                let mut others: Vec<f64> = d
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| j != i)
                    .map(|(_, &x)| x)
                    .collect();
                median_in_place(&mut others).is_some_and(|m| c.distance > factor * m)
            })
            .map(|(_, c)| c)
            .collect()
    }
}

fn median_in_place(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Trainable,
    BnMean,
    BnVar(Option<usize>),
    Max,
}

fn classify(layout: &[TensorMeta], config: &MergeConfig) -> Vec<Kind> {
    let index: HashMap<&str, usize> = layout
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    layout
        .iter()
        .map(|t| {
            if is_int(t.dtype)
                || config
                    .bn
                    .counters
                    .iter()
                    .any(|c| has_suffix(&t.name, c).is_some())
            {
                return Kind::Max;
            }
            for p in &config.bn.pairs {
                if let Some(prefix) = has_suffix(&t.name, &p.var) {
                    let mean = index
                        .get(format!("{prefix}{}", p.mean).as_str())
                        .copied()
                        .filter(|&j| is_float(layout[j].dtype) && layout[j].shape == t.shape);
                    return Kind::BnVar(mean);
                }
                if has_suffix(&t.name, &p.mean).is_some() {
                    return Kind::BnMean;
                }
            }
            Kind::Trainable
        })
        .collect()
}

fn describe(dtype: Dtype, shape: &[usize], len: usize) -> String {
    format!("{dtype} {shape:?} ({len} bytes)")
}

/// Read a tensor and check it against the layout and, for floats, that every value is finite.
fn read_checked(
    src: &mut dyn TensorSource,
    meta: &TensorMeta,
    len: usize,
    origin: &str,
) -> Result<OwnedTensor, MergeError> {
    let t = src.read(&meta.name)?;
    if t.dtype != meta.dtype || t.shape != meta.shape || t.data.len() != len {
        return Err(MergeError::LayoutMismatch {
            origin: origin.to_string(),
            tensor: meta.name.clone(),
            expected: describe(meta.dtype, &meta.shape, len),
            found: describe(t.dtype, &t.shape, t.data.len()),
        });
    }
    Ok(t)
}

/// Visit float data, refusing a NaN or infinity.
fn visit_finite(
    meta: &TensorMeta,
    data: &[u8],
    origin: &str,
    mut f: impl FnMut(usize, f64),
) -> Result<(), MergeError> {
    let ok = for_each_f64(meta.dtype, data, |i, x| {
        if x.is_finite() {
            f(i, x);
            true
        } else {
            false
        }
    });
    if ok {
        Ok(())
    } else {
        Err(MergeError::NonFinite {
            origin: origin.to_string(),
            tensor: meta.name.clone(),
        })
    }
}

const BASE: &str = "the base global";

fn site_origin(c: &Contribution<'_>) -> String {
    format!("site {} (bundle {})", c.site, c.bundle)
}

/// Merge `contributions` onto `base` with `config`, handing each output tensor to `sink` in sorted-name order.
///
/// `layout` is the model's tensor list (every input must hold exactly these names, dtypes and shapes for the
/// tensors listed; the caller has compared fingerprints). `server` is the server-optimizer state for the
/// current global (see [`ServerState::load`]); fedavgm and fedadam update it, and only when the whole merge
/// succeeded. Per-tensor rules:
/// - trainable float tensors (F64/F32/F16/BF16): the strategy, accumulated in f64, written back in the
///   original dtype rounded to nearest;
/// - BatchNorm running means ([`crate::BnRules`]): weighted average; running variances: pooled variance
///   `Σ wᵢ(σᵢ² + (μᵢ − μ)²)` with `μ = Σ wᵢμᵢ` (never a server-optimizer step, never clipped); under median /
///   trimmed-mean both are taken coordinate-wise like every float tensor;
/// - integer and boolean tensors, and BatchNorm counters (`num_batches_tracked`): element-wise maximum, dtype
///   kept.
pub fn merge(
    layout: &[TensorMeta],
    base: &mut dyn TensorSource,
    contributions: &mut [Contribution<'_>],
    config: &MergeConfig,
    server: &mut ServerState,
    mut sink: impl FnMut(&TensorMeta, Vec<u8>) -> Result<(), MergeError>,
) -> Result<MergeReport, MergeError> {
    config.validate()?;
    let n = contributions.len();
    if n == 0 {
        return Err(MergeError::NoContributions);
    }
    let strategy = config.strategy;
    if strategy == Strategy::TrimmedMean && 2 * config.trim >= n {
        return Err(MergeError::TrimTooLarge {
            trim: config.trim,
            n,
        });
    }

    // Combining order: by bundle hash, so the caller's order cannot change a single bit.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| contributions[a].bundle.cmp(&contributions[b].bundle));
    for w in order.windows(2) {
        if contributions[w[0]].bundle == contributions[w[1]].bundle {
            return Err(MergeError::DuplicateBundle {
                bundle: contributions[w[0]].bundle.clone(),
            });
        }
    }
    let weights = weights(contributions, &order, config)?;

    // The layout, sorted and checked.
    let mut layout: Vec<TensorMeta> = layout.to_vec();
    layout.sort_by(|a, b| a.name.cmp(&b.name));
    let mut lens = Vec::with_capacity(layout.len());
    for (i, t) in layout.iter().enumerate() {
        if i > 0 && layout[i - 1].name == t.name {
            return Err(MergeError::BadLayout(format!(
                "tensor {} is listed twice",
                t.name
            )));
        }
        if !is_float(t.dtype) && !is_int(t.dtype) {
            return Err(MergeError::UnsupportedDtype {
                tensor: t.name.clone(),
                dtype: t.dtype,
            });
        }
        let len = t.byte_len().ok_or_else(|| {
            MergeError::BadLayout(format!("the shape {:?} of {} overflows", t.shape, t.name))
        })?;
        lens.push(len);
    }
    let kinds = classify(&layout, config);

    // Server state: only the optimizer that built it may continue it.
    if let Some(s) = server.strategy {
        if !server.is_empty() && s != strategy {
            return Err(MergeError::StrategySwitch {
                state: s.to_string(),
                requested: strategy.to_string(),
            });
        }
    }
    if strategy.is_stateful() {
        let trainable: HashMap<&str, usize> = layout
            .iter()
            .zip(&kinds)
            .filter(|(_, k)| **k == Kind::Trainable)
            .map(|(t, _)| (t.name.as_str(), t.numel().unwrap_or(0)))
            .collect();
        for (name, mo) in &server.tensors {
            if trainable.get(name.as_str()) != Some(&mo.m.len()) {
                return Err(MergeError::StateMismatch {
                    tensor: name.clone(),
                });
            }
        }
    }

    // Pass 1: check every input, measure distances from the base.
    let origins: Vec<String> = contributions.iter().map(site_origin).collect();
    let mut sq = vec![0f64; n];
    let mut bvals = Vec::new();
    for ((meta, &len), kind) in layout.iter().zip(&lens).zip(&kinds) {
        if *kind == Kind::Trainable {
            let b = read_checked(base, meta, len, BASE)?;
            bvals.clear();
            visit_finite(meta, &b.data, BASE, |_, x| bvals.push(x))?;
            for &i in &order {
                let t = read_checked(contributions[i].source, meta, len, &origins[i])?;
                let acc = &mut sq[i];
                visit_finite(meta, &t.data, &origins[i], |j, x| {
                    let d = x - bvals[j];
                    *acc += d * d;
                })?;
            }
        } else {
            for &i in &order {
                let t = read_checked(contributions[i].source, meta, len, &origins[i])?;
                if is_float(meta.dtype) {
                    visit_finite(meta, &t.data, &origins[i], |_, _| {})?;
                }
            }
        }
    }
    let distances: Vec<f64> = sq.iter().map(|s| s.sqrt()).collect();
    let scales: Vec<f64> = distances
        .iter()
        .map(|&d| match config.clip_norm {
            Some(c) if d > c => c / d,
            _ => 1.0,
        })
        .collect();

    // Pass 2: combine.
    let mut ctx = Ctx {
        contributions,
        order: &order,
        origins: &origins,
        weights: &weights,
        scales: &scales,
        config,
    };
    let mut new_moments: BTreeMap<String, Moments> = BTreeMap::new();
    let mut tensors = Vec::with_capacity(layout.len());
    for ((meta, &len), kind) in layout.iter().zip(&lens).zip(&kinds) {
        let (rule, bytes) = match *kind {
            Kind::Max => (TensorRule::Max, ctx.max(meta, len)?),
            _ if strategy.is_robust() => {
                let clip = *kind == Kind::Trainable && scales.iter().any(|&s| s < 1.0);
                let rule = if strategy == Strategy::Median {
                    TensorRule::Median
                } else {
                    TensorRule::TrimmedMean
                };
                (rule, ctx.robust(meta, len, base, clip)?)
            }
            Kind::Trainable => {
                let (rule, vals) = ctx.trainable(meta, len, base, server, &mut new_moments)?;
                (rule, encode(meta, &vals)?)
            }
            Kind::BnMean => (TensorRule::BnMean, encode(meta, &ctx.weighted(meta, len)?)?),
            Kind::BnVar(None) => (
                TensorRule::BnVarAverage,
                encode(meta, &ctx.weighted(meta, len)?)?,
            ),
            Kind::BnVar(Some(j)) => (
                TensorRule::BnVarPooled,
                encode(meta, &ctx.pooled_var(meta, len, &layout[j], lens[j])?)?,
            ),
        };
        sink(meta, bytes)?;
        tensors.push(TensorReport {
            name: meta.name.clone(),
            dtype: meta.dtype.to_string(),
            rule,
        });
    }

    if strategy.is_stateful() {
        server.tensors = new_moments;
        server.strategy = Some(strategy);
        server.step += 1;
    }

    let contributions = order
        .iter()
        .zip(&weights)
        .map(|(&i, &weight)| {
            let c = &ctx.contributions[i];
            ContributionReport {
                site: c.site.clone(),
                bundle: c.bundle.clone(),
                samples: c.samples,
                weight,
                distance: distances[i],
                clipped: scales[i] < 1.0,
                scale: scales[i],
            }
        })
        .collect();
    Ok(MergeReport {
        strategy,
        config: config.describe(),
        contributions,
        tensors,
    })
}

/// The weights in combining order (`weights[k]` belongs to `order[k]`).
fn weights(
    contributions: &[Contribution<'_>],
    order: &[usize],
    config: &MergeConfig,
) -> Result<Vec<f64>, MergeError> {
    let n = order.len();
    if config.strategy.is_robust() || config.weighting == Weighting::Equal {
        return Ok(vec![1.0 / n as f64; n]);
    }
    let mut total: u128 = 0;
    for &i in order {
        let c = &contributions[i];
        if c.samples == 0 {
            return Err(MergeError::ZeroSamples {
                site: c.site.clone(),
            });
        }
        total += u128::from(c.samples);
    }
    let total = total as f64;
    if !(total.is_finite() && total > 0.0) {
        return Err(MergeError::BadTotalWeight { total });
    }
    Ok(order
        .iter()
        .map(|&i| contributions[i].samples as f64 / total)
        .collect())
}

fn encode(meta: &TensorMeta, vals: &[f64]) -> Result<Vec<u8>, MergeError> {
    encode_f64(meta.dtype, vals).ok_or_else(|| MergeError::ResultOverflow {
        tensor: meta.name.clone(),
        dtype: meta.dtype,
    })
}

struct Ctx<'c, 'a> {
    contributions: &'c mut [Contribution<'a>],
    order: &'c [usize],
    origins: &'c [String],
    weights: &'c [f64],
    scales: &'c [f64],
    config: &'c MergeConfig,
}

impl Ctx<'_, '_> {
    fn read(&mut self, i: usize, meta: &TensorMeta, len: usize) -> Result<OwnedTensor, MergeError> {
        read_checked(self.contributions[i].source, meta, len, &self.origins[i])
    }

    /// Element-wise maximum over the updates, in the tensor's own dtype.
    fn max(&mut self, meta: &TensorMeta, len: usize) -> Result<Vec<u8>, MergeError> {
        if is_int(meta.dtype) {
            let mut acc: Option<Vec<u8>> = None;
            for k in 0..self.order.len() {
                let t = self.read(self.order[k], meta, len)?;
                match acc.as_mut() {
                    None => acc = Some(t.data),
                    Some(a) => {
                        max_into(meta.dtype, a, &t.data);
                    }
                }
            }
            return acc.ok_or(MergeError::NoContributions);
        }
        let numel = len / dtype_size(meta.dtype).unwrap_or(1);
        let mut acc = vec![f64::NEG_INFINITY; numel];
        for k in 0..self.order.len() {
            let i = self.order[k];
            let t = self.read(i, meta, len)?;
            visit_finite(meta, &t.data, &self.origins[i], |_, _| {})?;
            max_f64_into(&mut acc, meta.dtype, &t.data);
        }
        encode(meta, &acc)
    }

    /// `Σ wᵢ xᵢ` over the updates (no clipping).
    fn weighted(&mut self, meta: &TensorMeta, len: usize) -> Result<Vec<f64>, MergeError> {
        let numel = len / dtype_size(meta.dtype).unwrap_or(1);
        let mut acc = vec![0f64; numel];
        for k in 0..self.order.len() {
            let (i, w) = (self.order[k], self.weights[k]);
            let t = self.read(i, meta, len)?;
            visit_finite(meta, &t.data, &self.origins[i], |j, x| acc[j] += w * x)?;
        }
        Ok(acc)
    }

    /// Pooled BatchNorm variance: `Σ wᵢ(σᵢ² + (μᵢ − μ)²)`, `μ = Σ wᵢμᵢ` (two passes over the means, for
    /// accuracy when the means are large compared with the spread).
    fn pooled_var(
        &mut self,
        var: &TensorMeta,
        var_len: usize,
        mean: &TensorMeta,
        mean_len: usize,
    ) -> Result<Vec<f64>, MergeError> {
        let mu = self.weighted(mean, mean_len)?;
        let mut acc = vec![0f64; mu.len()];
        let mut mi = Vec::new();
        for k in 0..self.order.len() {
            let (i, w) = (self.order[k], self.weights[k]);
            let m = self.read(i, mean, mean_len)?;
            decode_f64(mean.dtype, &m.data, &mut mi);
            let v = self.read(i, var, var_len)?;
            visit_finite(var, &v.data, &self.origins[i], |j, s2| {
                let d = mi[j] - mu[j];
                acc[j] += w * (s2 + d * d);
            })?;
        }
        Ok(acc)
    }

    /// A trainable float tensor under fedavg / fedavgm / fedadam.
    fn trainable(
        &mut self,
        meta: &TensorMeta,
        len: usize,
        base: &mut dyn TensorSource,
        server: &ServerState,
        new_moments: &mut BTreeMap<String, Moments>,
    ) -> Result<(TensorRule, Vec<f64>), MergeError> {
        let strategy = self.config.strategy;
        let need_base = strategy.is_stateful() || self.scales.iter().any(|&s| s < 1.0);
        let mut b = Vec::new();
        if need_base {
            let t = read_checked(base, meta, len, BASE)?;
            visit_finite(meta, &t.data, BASE, |_, x| b.push(x))?;
        }
        let numel = len / dtype_size(meta.dtype).unwrap_or(1);
        let mut avg = vec![0f64; numel];
        for k in 0..self.order.len() {
            let i = self.order[k];
            let (w, s) = (self.weights[k], self.scales[i]);
            let t = self.read(i, meta, len)?;
            if s < 1.0 {
                visit_finite(meta, &t.data, &self.origins[i], |j, x| {
                    avg[j] += w * (b[j] + s * (x - b[j]))
                })?;
            } else {
                visit_finite(meta, &t.data, &self.origins[i], |j, x| avg[j] += w * x)?;
            }
        }
        let old = server.tensors.get(&meta.name);
        match strategy {
            Strategy::FedAvgM => {
                let c = self.config.fedavgm;
                let mut m = Vec::with_capacity(numel);
                for j in 0..numel {
                    let delta = b[j] - avg[j];
                    let m_old = old.map_or(0.0, |o| f64::from(o.m[j]));
                    let m_new = c.beta * m_old + delta;
                    avg[j] = b[j] - c.lr * m_new;
                    m.push(m_new as f32);
                }
                new_moments.insert(meta.name.clone(), Moments { m, v: Vec::new() });
                Ok((TensorRule::Momentum, avg))
            }
            Strategy::FedAdam => {
                let c = self.config.fedadam;
                let (mut m, mut v) = (Vec::with_capacity(numel), Vec::with_capacity(numel));
                for j in 0..numel {
                    let delta = b[j] - avg[j];
                    let m_old = old.map_or(0.0, |o| f64::from(o.m[j]));
                    // Reddi et al. start v at τ² (v₋₁ ≥ τ²).
                    let v_old = old.map_or(c.tau * c.tau, |o| f64::from(o.v[j]));
                    let m_new = c.beta1 * m_old + (1.0 - c.beta1) * delta;
                    let v_new = c.beta2 * v_old + (1.0 - c.beta2) * delta * delta;
                    avg[j] = b[j] - c.lr * m_new / (v_new.sqrt() + c.tau);
                    m.push(m_new as f32);
                    v.push(v_new as f32);
                }
                new_moments.insert(meta.name.clone(), Moments { m, v });
                Ok((TensorRule::Adam, avg))
            }
            _ => Ok((TensorRule::Average, avg)),
        }
    }

    /// Median or trimmed mean, coordinate by coordinate, reading `chunk_elements` of every input at a time.
    fn robust(
        &mut self,
        meta: &TensorMeta,
        len: usize,
        base: &mut dyn TensorSource,
        clip: bool,
    ) -> Result<Vec<u8>, MergeError> {
        let size = dtype_size(meta.dtype).unwrap_or(1);
        let numel = len / size;
        let n = self.order.len();
        let trim = if self.config.strategy == Strategy::TrimmedMean {
            self.config.trim
        } else {
            0
        };
        let chunk = self.config.chunk_elements.max(1);
        let mut out = Vec::with_capacity(len);
        let mut b = Vec::new();
        let mut cols = Vec::new();
        let mut column = vec![0f64; n];
        let mut res = Vec::new();
        let mut start = 0;
        while start < numel {
            let cnt = chunk.min(numel - start);
            let short = |origin: &str, got: usize| MergeError::LayoutMismatch {
                origin: origin.to_string(),
                tensor: meta.name.clone(),
                expected: format!("{} bytes at element {start}", cnt * size),
                found: format!("{got} bytes"),
            };
            b.clear();
            if clip {
                let bytes = base.read_elements(&meta.name, start, cnt)?;
                if bytes.len() != cnt * size {
                    return Err(short(BASE, bytes.len()));
                }
                visit_finite(meta, &bytes, BASE, |_, x| b.push(x))?;
            }
            cols.clear();
            cols.resize(n * cnt, 0f64);
            for k in 0..n {
                let i = self.order[k];
                let s = self.scales[i];
                let bytes = self.contributions[i]
                    .source
                    .read_elements(&meta.name, start, cnt)?;
                if bytes.len() != cnt * size {
                    return Err(short(&self.origins[i], bytes.len()));
                }
                let col = &mut cols[k * cnt..(k + 1) * cnt];
                visit_finite(meta, &bytes, &self.origins[i], |j, x| {
                    col[j] = if clip && s < 1.0 {
                        b[j] + s * (x - b[j])
                    } else {
                        x
                    };
                })?;
            }
            res.clear();
            for j in 0..cnt {
                for k in 0..n {
                    column[k] = cols[k * cnt + j];
                }
                column.sort_by(f64::total_cmp);
                res.push(if trim == 0 && self.config.strategy == Strategy::Median {
                    if n % 2 == 1 {
                        column[n / 2]
                    } else {
                        (column[n / 2 - 1] + column[n / 2]) / 2.0
                    }
                } else {
                    let kept = &column[trim..n - trim];
                    kept.iter().sum::<f64>() / kept.len() as f64
                });
            }
            out.extend_from_slice(&encode(meta, &res)?);
            start += cnt;
        }
        Ok(out)
    }
}
