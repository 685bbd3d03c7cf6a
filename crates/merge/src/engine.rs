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
use crate::tensor::{decode_int, encode_f64, encode_int, for_each_f64, max_f64_into};
use crate::{MergeConfig, MergeError, ServerState, Strategy, TensorSource, Weighting};
use ferry_bundle::fisher;
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
    /// Weighted average, each parameter also weighted by the sites' bounded Fisher values (`fisher`).
    Fisher,
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
    /// Counter stored as a float (`num_batches_tracked` as f32): element-wise maximum.
    Max,
    /// Integer or boolean tensor under an averaging strategy: weighted average, rounded (a boolean by weighted
    /// majority).
    IntAverage,
    /// Integer or boolean tensor under `median`: coordinate median (the lower middle value's side, rounded down).
    IntMedian,
    /// Integer or boolean tensor under `trimmed-mean`: coordinate trimmed mean, rounded.
    IntTrimmedMean,
}

impl fmt::Display for TensorRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TensorRule::Average => "weighted average",
            TensorRule::Fisher => "fisher-weighted average",
            TensorRule::Momentum => "average + server momentum",
            TensorRule::Adam => "average + server adam",
            TensorRule::Median => "coordinate median",
            TensorRule::TrimmedMean => "coordinate trimmed mean",
            TensorRule::BnMean => "bn mean: weighted average",
            TensorRule::BnVarPooled => "bn var: pooled variance",
            TensorRule::BnVarAverage => "bn var: weighted average (no matching mean)",
            TensorRule::Max => "counter: max",
            TensorRule::IntAverage => "integer: weighted average, rounded",
            TensorRule::IntMedian => "integer: coordinate median",
            TensorRule::IntTrimmedMean => "integer: coordinate trimmed mean, rounded",
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
    /// The weight used (the weights sum to 1). `None` under the robust strategies (median, trimmed mean), which
    /// give every update the same say whatever its sample count.
    pub weight: Option<f64>,
    /// L2 distance of the update from the base over the trainable float tensors (not BatchNorm statistics or
    /// counters), before clipping.
    pub distance: f64,
    /// Whether `--clip-norm` scaled the update down.
    pub clipped: bool,
    /// The factor the update's difference from the base was multiplied by (1 when not clipped).
    pub scale: f64,
    /// Elements of the update's BatchNorm statistics that `--bn-bound` pulled back towards the base global's.
    pub bn_bounded: u64,
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
    /// A BatchNorm running mean, with its variance's index.
    BnMean(Option<usize>),
    /// A BatchNorm running variance, with its mean's index.
    BnVar(Option<usize>),
    /// Integer or boolean data.
    Int,
    /// A counter stored as a float.
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
            if is_int(t.dtype) {
                return Kind::Int;
            }
            if config
                .bn
                .counters
                .iter()
                .any(|c| has_suffix(&t.name, c).is_some())
            {
                return Kind::Max;
            }
            let partner = |prefix: &str, suffix: &str| {
                index
                    .get(format!("{prefix}{suffix}").as_str())
                    .copied()
                    .filter(|&j| is_float(layout[j].dtype) && layout[j].shape == t.shape)
            };
            for p in &config.bn.pairs {
                if let Some(prefix) = has_suffix(&t.name, &p.var) {
                    return Kind::BnVar(partner(prefix, &p.mean));
                }
                if let Some(prefix) = has_suffix(&t.name, &p.mean) {
                    return Kind::BnMean(partner(prefix, &p.var));
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
///   `Σ wᵢ(σᵢ² + (μᵢ − μ)²)` with `μ = Σ wᵢμᵢ` (never a server-optimizer step, never clipped), each site's
///   statistics first bounded relative to the base's ([`MergeConfig::bn_bound`]); a negative variance refuses
///   the update; under median / trimmed-mean both are taken coordinate-wise like every float tensor;
/// - integer and boolean tensors: the strategy's rule in integer arithmetic (median, trimmed mean rounded,
///   weighted average rounded; a boolean by weighted majority), dtype kept;
/// - counters stored as floats (`num_batches_tracked` as f32): element-wise maximum.
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
                } else if matches!(kind, Kind::BnVar(_)) {
                    let mut negative = false;
                    visit_finite(meta, &t, &origins[i], |_, x| negative |= x < 0.0)?;
                    if negative {
                        return Err(MergeError::NegativeVariance {
                            origin: origins[i].clone(),
                            tensor: meta.name.clone(),
                        });
                    }
                } else {
                    visit_finite(meta, &t, &origins[i], |_, _| {})?;
                }
            }
        }
    }
    let fisher_means = if strategy == Strategy::Fisher {
        fisher_means(
            &layout,
            &lens,
            &kinds,
            contributions,
            &order,
            &origins,
            chunk,
        )?
    } else {
        HashMap::new()
    };
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
        bn_bounded: vec![0; n],
        fisher_means,
    };
    let mut new_moments: BTreeMap<String, Moments> = BTreeMap::new();
    let mut tensors = Vec::with_capacity(layout.len());
    for ((meta, &len), kind) in layout.iter().zip(&lens).zip(&kinds) {
        let numel = len / dtype_size(meta.dtype).unwrap_or(1);
        let robust = strategy.is_robust() && !matches!(kind, Kind::Max | Kind::Int);
        let rule = match *kind {
            Kind::Max => TensorRule::Max,
            Kind::Int => match strategy {
                Strategy::Median => TensorRule::IntMedian,
                Strategy::TrimmedMean => TensorRule::IntTrimmedMean,
                _ => TensorRule::IntAverage,
            },
            _ if robust && strategy == Strategy::Median => TensorRule::Median,
            _ if robust => TensorRule::TrimmedMean,
            Kind::Trainable => match strategy {
                Strategy::FedAvgM => TensorRule::Momentum,
                Strategy::FedAdam => TensorRule::Adam,
                Strategy::Fisher => TensorRule::Fisher,
                _ => TensorRule::Average,
            },
            Kind::BnMean(_) => TensorRule::BnMean,
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
        let per_input = robust || *kind == Kind::Int;
        for (start, cnt) in slices(numel, if per_input { robust_chunk } else { chunk }) {
            let s = Slice { meta, start, cnt };
            let at = |j: usize| Slice {
                meta: &layout[j],
                start,
                cnt,
            };
            let bytes = match *kind {
                Kind::Max => ctx.max(&s)?,
                Kind::Int => ctx.int(&s)?,
                _ if robust => ctx.robust(&s, base, clip)?,
                Kind::Trainable => {
                    let old = server.tensors.get(&meta.name);
                    let vals = ctx.trainable(&s, base, old, moments.as_mut())?;
                    encode(meta, &vals)?
                }
                Kind::BnMean(var) => {
                    let bound = ctx.mean_bound(base, &s, var.map(at).as_ref())?;
                    encode(meta, &ctx.weighted(&s, &bound)?)?
                }
                Kind::BnVar(None) => {
                    let bound = ctx.var_bound(base, &s)?;
                    encode(meta, &ctx.weighted(&s, &bound)?)?
                }
                Kind::BnVar(Some(j)) => encode(meta, &ctx.pooled_var(base, &s, &at(j))?)?,
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
                weight: (!strategy.is_robust()).then_some(weight),
                distance: distances[i],
                clipped: scales[i] < 1.0,
                scale: scales[i],
                bn_bounded: ctx.bn_bounded[i],
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
    /// Per contribution (by index): BatchNorm statistic elements the bound pulled back.
    bn_bounded: Vec<u64>,
    /// `fisher` strategy: per trainable tensor, each contribution's (by index) mean Fisher value over it.
    fisher_means: HashMap<String, Vec<f64>>,
}

/// The Fisher tensor of model tensor `meta`, as the format lays it out (F32, the model tensor's shape).
fn fisher_meta(meta: &TensorMeta) -> TensorMeta {
    TensorMeta {
        name: fisher::name_for(&meta.name),
        dtype: Dtype::F32,
        shape: meta.shape.clone(),
    }
}

/// The `fisher` strategy's first pass: every update must carry a Fisher estimate of every trainable tensor,
/// finite and non-negative; returns each one's mean over its tensor (what normalises it).
fn fisher_means(
    layout: &[TensorMeta],
    lens: &[usize],
    kinds: &[Kind],
    contributions: &mut [Contribution<'_>],
    order: &[usize],
    origins: &[String],
    chunk: usize,
) -> Result<HashMap<String, Vec<f64>>, MergeError> {
    let mut means = HashMap::new();
    for ((meta, &len), kind) in layout.iter().zip(lens).zip(kinds) {
        if *kind != Kind::Trainable || !is_float(meta.dtype) {
            continue;
        }
        let fmeta = fisher_meta(meta);
        let numel = len / dtype_size(meta.dtype).unwrap_or(1);
        let mut per_input = vec![0f64; contributions.len()];
        for &i in order {
            let src = &mut *contributions[i].source;
            let no_fisher = || MergeError::NoFisher {
                origin: origins[i].clone(),
                tensor: meta.name.clone(),
            };
            match src.describe(&fmeta.name) {
                Err(MergeError::MissingTensor { .. }) => return Err(no_fisher()),
                Err(e) => return Err(e),
                Ok(_) => check_layout(src, &fmeta, numel * 4, &origins[i])?,
            }
            let mut sum = 0f64;
            let mut negative = false;
            for (start, cnt) in slices(numel, chunk) {
                let t = read_slice(src, &fmeta, start, cnt, &origins[i])?;
                visit_finite(&fmeta, &t, &origins[i], |_, x| {
                    negative |= x < 0.0;
                    sum += x;
                })?;
            }
            if negative {
                return Err(MergeError::NegativeFisher {
                    origin: origins[i].clone(),
                    tensor: meta.name.clone(),
                });
            }
            per_input[i] = sum / numel.max(1) as f64;
        }
        means.insert(meta.name.clone(), per_input);
    }
    Ok(means)
}

/// Below this, a base variance counts as this when bounding a site's statistics: a channel the base global
/// never saw vary must still let sites' statistics move a little.
const VAR_FLOOR: f64 = 1e-2;

/// The bound on one slice of a BatchNorm statistic, per element, from the base global's statistics.
enum StatBound {
    None,
    Range { lo: Vec<f64>, hi: Vec<f64> },
}

impl StatBound {
    /// Clamp `v` into the range; the number of elements moved.
    fn apply(&self, v: &mut [f64]) -> u64 {
        let StatBound::Range { lo, hi } = self else {
            return 0;
        };
        let mut moved = 0;
        for ((x, &l), &h) in v.iter_mut().zip(lo).zip(hi) {
            let c = x.clamp(l, h);
            if c != *x {
                *x = c;
                moved += 1;
            }
        }
        moved
    }
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

    /// Element-wise maximum over the updates of a counter stored as a float.
    fn max(&mut self, s: &Slice<'_>) -> Result<Vec<u8>, MergeError> {
        let meta = s.meta;
        let mut acc = vec![f64::NEG_INFINITY; s.cnt];
        for k in 0..self.order.len() {
            let i = self.order[k];
            let t = self.read(i, s)?;
            visit_finite(meta, &t, &self.origins[i], |_, _| {})?;
            max_f64_into(&mut acc, meta.dtype, &t);
        }
        encode(meta, &acc)
    }

    /// An integer or boolean slice, combined the way the strategy combines floats, in exact integer arithmetic
    /// where it can be (median, trimmed mean, all-equal inputs) and rounded otherwise.
    fn int(&mut self, s: &Slice<'_>) -> Result<Vec<u8>, MergeError> {
        let (meta, cnt) = (s.meta, s.cnt);
        let n = self.order.len();
        let mut cols = vec![0i128; n * cnt];
        let mut vals = Vec::with_capacity(cnt);
        for k in 0..n {
            let t = self.read(self.order[k], s)?;
            if !decode_int(meta.dtype, &t, &mut vals) || vals.len() != cnt {
                return Err(MergeError::UnsupportedDtype {
                    tensor: meta.name.clone(),
                    dtype: meta.dtype,
                });
            }
            cols[k * cnt..(k + 1) * cnt].copy_from_slice(&vals);
        }
        let trim = self.config.trim;
        let mut column = vec![0i128; n];
        let mut out = Vec::with_capacity(cnt);
        for j in 0..cnt {
            for k in 0..n {
                column[k] = cols[k * cnt + j];
            }
            out.push(match self.config.strategy {
                Strategy::Median => {
                    column.sort_unstable();
                    if n % 2 == 1 {
                        column[n / 2]
                    } else {
                        (column[n / 2 - 1] + column[n / 2]).div_euclid(2)
                    }
                }
                Strategy::TrimmedMean => {
                    column.sort_unstable();
                    let kept = &column[trim..n - trim];
                    let len = kept.len() as i128;
                    (2 * kept.iter().sum::<i128>() + len).div_euclid(2 * len)
                }
                _ if column.iter().all(|&x| x == column[0]) => column[0],
                _ => {
                    let avg: f64 = column
                        .iter()
                        .zip(self.weights)
                        .map(|(&x, &w)| w * x as f64)
                        .sum();
                    avg.round() as i128
                }
            });
        }
        encode_int(meta.dtype, &out).ok_or_else(|| MergeError::UnsupportedDtype {
            tensor: meta.name.clone(),
            dtype: meta.dtype,
        })
    }

    /// The base global's slice of a float tensor.
    fn base_values(base: &mut dyn TensorSource, s: &Slice<'_>) -> Result<Vec<f64>, MergeError> {
        let bytes = read_slice(base, s.meta, s.start, s.cnt, BASE)?;
        let mut v = Vec::with_capacity(s.cnt);
        visit_finite(s.meta, &bytes, BASE, |_, x| v.push(x))?;
        Ok(v)
    }

    /// The bound on sites' running means: within R base standard deviations of the base's mean. No bound
    /// without the matching variance, or with `--bn-bound 0`.
    fn mean_bound(
        &self,
        base: &mut dyn TensorSource,
        mean: &Slice<'_>,
        var: Option<&Slice<'_>>,
    ) -> Result<StatBound, MergeError> {
        let r = self.config.bn_bound;
        let Some(var) = var.filter(|_| r > 0.0) else {
            return Ok(StatBound::None);
        };
        let m = Self::base_values(base, mean)?;
        let v = Self::base_values(base, var)?;
        let width: Vec<f64> = v.iter().map(|&v| r * v.max(VAR_FLOOR).sqrt()).collect();
        Ok(StatBound::Range {
            lo: m.iter().zip(&width).map(|(m, w)| m - w).collect(),
            hi: m.iter().zip(&width).map(|(m, w)| m + w).collect(),
        })
    }

    /// The bound on sites' running variances: within a factor R² of the base's (no bound with `--bn-bound 0`).
    fn var_bound(
        &self,
        base: &mut dyn TensorSource,
        var: &Slice<'_>,
    ) -> Result<StatBound, MergeError> {
        let r2 = self.config.bn_bound * self.config.bn_bound;
        if r2 == 0.0 {
            return Ok(StatBound::None);
        }
        let v = Self::base_values(base, var)?;
        Ok(StatBound::Range {
            lo: v.iter().map(|&v| v / r2).collect(),
            hi: v.iter().map(|&v| v.max(VAR_FLOOR) * r2).collect(),
        })
    }

    /// The `k`-th update's slice of a BatchNorm statistic, bounded (counted when `count`).
    fn stat(
        &mut self,
        k: usize,
        s: &Slice<'_>,
        bound: &StatBound,
        count: bool,
    ) -> Result<Vec<f64>, MergeError> {
        let i = self.order[k];
        let t = self.read(i, s)?;
        let mut v = Vec::with_capacity(s.cnt);
        visit_finite(s.meta, &t, &self.origins[i], |_, x| v.push(x))?;
        let moved = bound.apply(&mut v);
        if count {
            self.bn_bounded[i] += moved;
        }
        Ok(v)
    }

    /// `Σ wᵢ xᵢ` over the updates' bounded statistics (no clipping: statistics are not trained by gradient).
    fn weighted(&mut self, s: &Slice<'_>, bound: &StatBound) -> Result<Vec<f64>, MergeError> {
        let mut acc = vec![0f64; s.cnt];
        for k in 0..self.order.len() {
            let w = self.weights[k];
            for (a, x) in acc.iter_mut().zip(self.stat(k, s, bound, true)?) {
                *a += w * x;
            }
        }
        Ok(acc)
    }

    /// Pooled BatchNorm variance: `Σ wᵢ(σᵢ² + (μᵢ − μ)²)`, `μ = Σ wᵢμᵢ`, over bounded statistics (two passes
    /// over the means, for accuracy when the means are large compared with the spread).
    fn pooled_var(
        &mut self,
        base: &mut dyn TensorSource,
        var: &Slice<'_>,
        mean: &Slice<'_>,
    ) -> Result<Vec<f64>, MergeError> {
        let mean_bound = self.mean_bound(base, mean, Some(var))?;
        let var_bound = self.var_bound(base, var)?;
        let mut mu = vec![0f64; var.cnt];
        for k in 0..self.order.len() {
            let w = self.weights[k];
            for (a, x) in mu.iter_mut().zip(self.stat(k, mean, &mean_bound, false)?) {
                *a += w * x;
            }
        }
        let mut acc = vec![0f64; var.cnt];
        for k in 0..self.order.len() {
            let w = self.weights[k];
            let mi = self.stat(k, mean, &mean_bound, false)?;
            let vi = self.stat(k, var, &var_bound, true)?;
            for j in 0..acc.len() {
                let d = mi[j] - mu[j];
                acc[j] += w * (vi[j] + d * d);
            }
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
        if strategy == Strategy::Fisher {
            return self.fisher_weighted(s, &b);
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

    /// A slice of a trainable tensor under `fisher`: `Σ wᵢ fᵢ xᵢ / Σ wᵢ fᵢ`, where `fᵢ` is site i's Fisher value
    /// divided by its mean over the tensor and clamped to `[1/B, B]` (a site whose estimate is all zeros
    /// counts 1 everywhere). `b` is the base's slice when some update is clipped.
    fn fisher_weighted(&mut self, s: &Slice<'_>, b: &[f64]) -> Result<Vec<f64>, MergeError> {
        let (meta, cnt) = (s.meta, s.cnt);
        let fmeta = fisher_meta(meta);
        let bound = self.config.fisher_bound;
        let mut num = vec![0f64; cnt];
        let mut den = vec![0f64; cnt];
        let mut fw = Vec::with_capacity(cnt);
        for k in 0..self.order.len() {
            let i = self.order[k];
            let (w, sc) = (self.weights[k], self.scales[i]);
            let mean = self
                .fisher_means
                .get(&meta.name)
                .and_then(|m| m.get(i))
                .copied()
                .unwrap_or(0.0);
            let f = read_slice(
                self.contributions[i].source,
                &fmeta,
                s.start,
                cnt,
                &self.origins[i],
            )?;
            fw.clear();
            visit_finite(&fmeta, &f, &self.origins[i], |_, x| {
                let factor = if mean > 0.0 {
                    (x / mean).clamp(1.0 / bound, bound)
                } else {
                    1.0
                };
                fw.push(w * factor);
            })?;
            let t = self.read(i, s)?;
            visit_finite(meta, &t, &self.origins[i], |j, x| {
                let v = if sc < 1.0 { b[j] + sc * (x - b[j]) } else { x };
                num[j] += fw[j] * v;
                den[j] += fw[j];
            })?;
        }
        Ok(num.iter().zip(&den).map(|(n, d)| n / d).collect())
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
