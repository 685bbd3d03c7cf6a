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
use crate::{MergeConfig, MergeError, ServerState, Strategy, TensorSource, Weighting};
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

/// Check that a source holds tensor `meta` with exactly the layout's dtype, shape and byte length.
fn check_layout(
    src: &mut dyn TensorSource,
    meta: &TensorMeta,
    len: usize,
    origin: &str,
) -> Result<(), MergeError> {
    let (dtype, shape, found) = src.describe(&meta.name)?;
    if dtype != meta.dtype || shape != meta.shape || found != len {
        return Err(MergeError::LayoutMismatch {
            origin: origin.to_string(),
            tensor: meta.name.clone(),
            expected: describe(meta.dtype, &meta.shape, len),
            found: describe(dtype, &shape, found),
        });
    }
    Ok(())
}

/// Elements `start..start + cnt` of tensor `meta` from `src`, which must be exactly that many bytes.
fn read_slice(
    src: &mut dyn TensorSource,
    meta: &TensorMeta,
    start: usize,
    cnt: usize,
    origin: &str,
) -> Result<Vec<u8>, MergeError> {
    let size = dtype_size(meta.dtype).unwrap_or(1);
    let bytes = src.read_elements(&meta.name, start, cnt)?;
    if bytes.len() != cnt * size {
        return Err(MergeError::LayoutMismatch {
            origin: origin.to_string(),
            tensor: meta.name.clone(),
            expected: format!("{} bytes at element {start}", cnt * size),
            found: format!("{} bytes", bytes.len()),
        });
    }
    Ok(bytes)
}

/// The slices `(start, count)` covering `numel` elements, `chunk` at a time.
fn slices(numel: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..numel.div_ceil(chunk)).map(move |k| {
        let start = k * chunk;
        (start, chunk.min(numel - start))
    })
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
    let mut current: Option<(TensorMeta, Vec<u8>)> = None;
    let report = merge_streaming(
        layout,
        base,
        contributions,
        config,
        server,
        |meta, piece| {
            match current.as_mut() {
                Some((m, data)) if m.name == meta.name => data.extend_from_slice(&piece),
                _ => {
                    if let Some((m, data)) = current.replace((meta.clone(), piece)) {
                        sink(&m, data)?;
                    }
                }
            }
            Ok(())
        },
    )?;
    if let Some((m, data)) = current.take() {
        sink(&m, data)?;
    }
    Ok(report)
}

/// [`merge`], handing the output to `sink` as it is computed: each tensor as consecutive slices of its bytes
/// (in sorted-name order, a tensor's slices in element order, an empty tensor as one empty slice). Every input
/// is read slice by slice too, so memory stays at one slice per input plus the accumulator, whatever the size of
/// a tensor and the number of sites (issue 13). The output bytes are the same as [`merge`]'s: each element is
/// computed alone, and the sums run in the same order.
pub fn merge_streaming(
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

    // Slices: the averaging rules hold one f64 accumulator slice and one input slice; the robust rules one
    // f64 slice of every input, so their slice shrinks with the number of sites (about 64 MiB in all).
    let chunk = config.chunk_elements.max(1);
    let robust_chunk = chunk.min(((8 << 20) / n).max(1024));

    // Pass 1: check every input, measure distances from the base.
    let origins: Vec<String> = contributions.iter().map(site_origin).collect();
    let mut sq = vec![0f64; n];
    let mut bvals = Vec::new();
    for ((meta, &len), kind) in layout.iter().zip(&lens).zip(&kinds) {
        let trainable = *kind == Kind::Trainable;
        if trainable {
            check_layout(base, meta, len, BASE)?;
        }
        for &i in &order {
            check_layout(contributions[i].source, meta, len, &origins[i])?;
        }
        if !trainable && !is_float(meta.dtype) {
            continue;
        }
        let numel = len / dtype_size(meta.dtype).unwrap_or(1);
        for (start, cnt) in slices(numel, chunk) {
            if trainable {
                let b = read_slice(base, meta, start, cnt, BASE)?;
                bvals.clear();
                visit_finite(meta, &b, BASE, |_, x| bvals.push(x))?;
            }
            for &i in &order {
                let t = read_slice(contributions[i].source, meta, start, cnt, &origins[i])?;
                let acc = &mut sq[i];
                if trainable {
                    visit_finite(meta, &t, &origins[i], |j, x| {
                        let d = x - bvals[j];
                        *acc += d * d;
                    })?;
                } else {
                    visit_finite(meta, &t, &origins[i], |_, _| {})?;
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

    // Pass 2: combine, slice by slice.
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
        let numel = len / dtype_size(meta.dtype).unwrap_or(1);
        let robust = strategy.is_robust() && *kind != Kind::Max;
        let rule = match *kind {
            Kind::Max => TensorRule::Max,
            _ if robust && strategy == Strategy::Median => TensorRule::Median,
            _ if robust => TensorRule::TrimmedMean,
            Kind::Trainable => match strategy {
                Strategy::FedAvgM => TensorRule::Momentum,
                Strategy::FedAdam => TensorRule::Adam,
                _ => TensorRule::Average,
            },
            Kind::BnMean => TensorRule::BnMean,
            Kind::BnVar(None) => TensorRule::BnVarAverage,
            Kind::BnVar(Some(_)) => TensorRule::BnVarPooled,
        };
        let clip = *kind == Kind::Trainable && scales.iter().any(|&s| s < 1.0);
        let mut moments =
            (strategy.is_stateful() && *kind == Kind::Trainable && !robust).then(|| Moments {
                m: Vec::with_capacity(numel),
                v: Vec::with_capacity(if strategy == Strategy::FedAdam {
                    numel
                } else {
                    0
                }),
            });
        if numel == 0 {
            sink(meta, Vec::new())?;
        }
        for (start, cnt) in slices(numel, if robust { robust_chunk } else { chunk }) {
            let s = Slice { meta, start, cnt };
            let bytes = match *kind {
                Kind::Max => ctx.max(&s)?,
                _ if robust => ctx.robust(&s, base, clip)?,
                Kind::Trainable => {
                    let old = server.tensors.get(&meta.name);
                    let vals = ctx.trainable(&s, base, old, moments.as_mut())?;
                    encode(meta, &vals)?
                }
                Kind::BnMean | Kind::BnVar(None) => encode(meta, &ctx.weighted(&s)?)?,
                Kind::BnVar(Some(j)) => {
                    let mean = Slice {
                        meta: &layout[j],
                        start,
                        cnt,
                    };
                    encode(meta, &ctx.pooled_var(&s, &mean)?)?
                }
            };
            sink(meta, bytes)?;
        }
        if let Some(mo) = moments {
            new_moments.insert(meta.name.clone(), mo);
        }
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

/// Elements `start..start + cnt` of one tensor.
struct Slice<'m> {
    meta: &'m TensorMeta,
    start: usize,
    cnt: usize,
}

impl Ctx<'_, '_> {
    fn read(&mut self, i: usize, s: &Slice<'_>) -> Result<Vec<u8>, MergeError> {
        read_slice(
            self.contributions[i].source,
            s.meta,
            s.start,
            s.cnt,
            &self.origins[i],
        )
    }

    /// Element-wise maximum over the updates, in the tensor's own dtype.
    fn max(&mut self, s: &Slice<'_>) -> Result<Vec<u8>, MergeError> {
        let meta = s.meta;
        if is_int(meta.dtype) {
            let mut acc: Option<Vec<u8>> = None;
            for k in 0..self.order.len() {
                let t = self.read(self.order[k], s)?;
                match acc.as_mut() {
                    None => acc = Some(t),
                    Some(a) => {
                        max_into(meta.dtype, a, &t);
                    }
                }
            }
            return acc.ok_or(MergeError::NoContributions);
        }
        let mut acc = vec![f64::NEG_INFINITY; s.cnt];
        for k in 0..self.order.len() {
            let i = self.order[k];
            let t = self.read(i, s)?;
            visit_finite(meta, &t, &self.origins[i], |_, _| {})?;
            max_f64_into(&mut acc, meta.dtype, &t);
        }
        encode(meta, &acc)
    }

    /// `Σ wᵢ xᵢ` over the updates (no clipping).
    fn weighted(&mut self, s: &Slice<'_>) -> Result<Vec<f64>, MergeError> {
        let mut acc = vec![0f64; s.cnt];
        for k in 0..self.order.len() {
            let (i, w) = (self.order[k], self.weights[k]);
            let t = self.read(i, s)?;
            visit_finite(s.meta, &t, &self.origins[i], |j, x| acc[j] += w * x)?;
        }
        Ok(acc)
    }

    /// Pooled BatchNorm variance: `Σ wᵢ(σᵢ² + (μᵢ − μ)²)`, `μ = Σ wᵢμᵢ` (two passes over the means, for
    /// accuracy when the means are large compared with the spread).
    fn pooled_var(&mut self, var: &Slice<'_>, mean: &Slice<'_>) -> Result<Vec<f64>, MergeError> {
        let mu = self.weighted(mean)?;
        let mut acc = vec![0f64; mu.len()];
        let mut mi = Vec::new();
        for k in 0..self.order.len() {
            let (i, w) = (self.order[k], self.weights[k]);
            let m = self.read(i, mean)?;
            decode_f64(mean.meta.dtype, &m, &mut mi);
            let v = self.read(i, var)?;
            visit_finite(var.meta, &v, &self.origins[i], |j, s2| {
                let d = mi[j] - mu[j];
                acc[j] += w * (s2 + d * d);
            })?;
        }
        Ok(acc)
    }

    /// A slice of a trainable float tensor under fedavg / fedavgm / fedadam. `old` is the tensor's server state;
    /// the slice's new moments are appended to `moments`.
    fn trainable(
        &mut self,
        s: &Slice<'_>,
        base: &mut dyn TensorSource,
        old: Option<&Moments>,
        moments: Option<&mut Moments>,
    ) -> Result<Vec<f64>, MergeError> {
        let (meta, cnt) = (s.meta, s.cnt);
        let strategy = self.config.strategy;
        let need_base = strategy.is_stateful() || self.scales.iter().any(|&s| s < 1.0);
        let mut b = Vec::new();
        if need_base {
            let t = read_slice(base, meta, s.start, cnt, BASE)?;
            visit_finite(meta, &t, BASE, |_, x| b.push(x))?;
        }
        let mut avg = vec![0f64; cnt];
        for k in 0..self.order.len() {
            let i = self.order[k];
            let (w, sc) = (self.weights[k], self.scales[i]);
            let t = self.read(i, s)?;
            if sc < 1.0 {
                visit_finite(meta, &t, &self.origins[i], |j, x| {
                    avg[j] += w * (b[j] + sc * (x - b[j]))
                })?;
            } else {
                visit_finite(meta, &t, &self.origins[i], |j, x| avg[j] += w * x)?;
            }
        }
        let Some(mo) = moments else {
            return Ok(avg);
        };
        let at = |v: &[f32], j: usize| v.get(s.start + j).map(|&x| f64::from(x));
        match strategy {
            Strategy::FedAvgM => {
                let c = self.config.fedavgm;
                for j in 0..cnt {
                    let delta = b[j] - avg[j];
                    let m_old = old.and_then(|o| at(&o.m, j)).unwrap_or(0.0);
                    let m_new = c.beta * m_old + delta;
                    avg[j] = b[j] - c.lr * m_new;
                    mo.m.push(m_new as f32);
                }
            }
            Strategy::FedAdam => {
                let c = self.config.fedadam;
                for j in 0..cnt {
                    let delta = b[j] - avg[j];
                    let m_old = old.and_then(|o| at(&o.m, j)).unwrap_or(0.0);
                    // Reddi et al. start v at τ² (v₋₁ ≥ τ²).
                    let v_old = old.and_then(|o| at(&o.v, j)).unwrap_or(c.tau * c.tau);
                    let m_new = c.beta1 * m_old + (1.0 - c.beta1) * delta;
                    let v_new = c.beta2 * v_old + (1.0 - c.beta2) * delta * delta;
                    avg[j] = b[j] - c.lr * m_new / (v_new.sqrt() + c.tau);
                    mo.m.push(m_new as f32);
                    mo.v.push(v_new as f32);
                }
            }
            _ => {}
        }
        Ok(avg)
    }

    /// Median or trimmed mean of one slice, coordinate by coordinate, from a slice of every input.
    fn robust(
        &mut self,
        s: &Slice<'_>,
        base: &mut dyn TensorSource,
        clip: bool,
    ) -> Result<Vec<u8>, MergeError> {
        let (meta, cnt) = (s.meta, s.cnt);
        let n = self.order.len();
        let trim = if self.config.strategy == Strategy::TrimmedMean {
            self.config.trim
        } else {
            0
        };
        let mut b = Vec::new();
        if clip {
            let bytes = read_slice(base, meta, s.start, cnt, BASE)?;
            visit_finite(meta, &bytes, BASE, |_, x| b.push(x))?;
        }
        let mut cols = vec![0f64; n * cnt];
        for k in 0..n {
            let i = self.order[k];
            let sc = self.scales[i];
            let bytes = self.read(i, s)?;
            let col = &mut cols[k * cnt..(k + 1) * cnt];
            visit_finite(meta, &bytes, &self.origins[i], |j, x| {
                col[j] = if clip && sc < 1.0 {
                    b[j] + sc * (x - b[j])
                } else {
                    x
                };
            })?;
        }
        let mut column = vec![0f64; n];
        let mut res = Vec::with_capacity(cnt);
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
        encode(meta, &res)
    }
}
