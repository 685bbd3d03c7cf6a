//! What a merge is asked to do: the [`Strategy`], the [`Weighting`], clipping, server-optimizer settings and the
//! BatchNorm naming rules ([`BnRules`]). Names parse from the strings the CLI takes (`--strategy`, `--weights`,
//! `--bn-names`).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::MergeError;

/// How the updates are combined (issue 3). See `docs/merging.md` for when to use which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Strategy {
    /// Weighted average of the updates (McMahan et al. 2017).
    #[default]
    FedAvg,
    /// Server momentum on the pseudo-gradient `base − average` (Hsu et al. 2019; Reddi et al. 2021).
    FedAvgM,
    /// Server Adam on the pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).
    FedAdam,
    /// Coordinate-wise median of the updates (Yin et al. 2018).
    Median,
    /// Coordinate-wise trimmed mean: drop the `trim` largest and smallest values of each coordinate.
    TrimmedMean,
    /// Fisher-weighted average (Matena & Raffel 2022): each parameter weighted by the site's diagonal Fisher
    /// estimate shipped in its update (`ferry.fisher/` tensors), normalised and bounded per tensor
    /// ([`MergeConfig::fisher_bound`]).
    Fisher,
}

impl Strategy {
    /// The CLI name (`fedavg`, `fedavgm`, `fedadam`, `median`, `trimmed-mean`).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::FedAvg => "fedavg",
            Strategy::FedAvgM => "fedavgm",
            Strategy::FedAdam => "fedadam",
            Strategy::Median => "median",
            Strategy::TrimmedMean => "trimmed-mean",
            Strategy::Fisher => "fisher",
        }
    }

    /// Whether the strategy keeps server-optimizer state between rounds.
    pub fn is_stateful(self) -> bool {
        matches!(self, Strategy::FedAvgM | Strategy::FedAdam)
    }

    /// Whether the strategy is coordinate-wise robust (ignores weights).
    pub fn is_robust(self) -> bool {
        matches!(self, Strategy::Median | Strategy::TrimmedMean)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = MergeError;
    fn from_str(s: &str) -> Result<Self, MergeError> {
        Ok(match s {
            "fedavg" => Strategy::FedAvg,
            "fedavgm" => Strategy::FedAvgM,
            "fedadam" => Strategy::FedAdam,
            "median" => Strategy::Median,
            "trimmed-mean" | "trimmed_mean" | "trimmedmean" => Strategy::TrimmedMean,
            "fisher" => Strategy::Fisher,
            _ => return Err(MergeError::UnknownStrategy(s.to_string())),
        })
    }
}

/// How much each update counts in the averaging strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Weighting {
    /// Proportional to the signed sample count of each update (FedAvg proper).
    #[default]
    Samples,
    /// Every update counts the same (the plain mean of the field study; `--weights equal`).
    Equal,
}

impl fmt::Display for Weighting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Weighting::Samples => "samples",
            Weighting::Equal => "equal",
        })
    }
}

impl FromStr for Weighting {
    type Err = MergeError;
    fn from_str(s: &str) -> Result<Self, MergeError> {
        match s {
            "samples" => Ok(Weighting::Samples),
            "equal" => Ok(Weighting::Equal),
            _ => Err(MergeError::UnknownWeighting(s.to_string())),
        }
    }
}

/// FedAvgM settings: `m ← β·m + Δ`, `x ← x − lr·m`, with `Δ = base − average`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FedAvgMConfig {
    /// Server learning rate (default 1.0: with β = 0 this is FedAvg).
    pub lr: f64,
    /// Momentum β (default 0.9, the value Hsu et al. and Reddi et al. use).
    pub beta: f64,
}

impl Default for FedAvgMConfig {
    fn default() -> Self {
        FedAvgMConfig { lr: 1.0, beta: 0.9 }
    }
}

/// FedAdam settings (Reddi et al. 2021, Algorithm 2): `m ← β1·m + (1−β1)·Δ`, `v ← β2·v + (1−β2)·Δ²`,
/// `x ← x − η·m/(√v + τ)`, with `Δ = base − average`, `m₀ = 0`, `v₀ = τ²`, no bias correction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FedAdamConfig {
    /// Server learning rate η (default 1e-2; the paper tunes it per task over 10^-3 … 10^1).
    pub lr: f64,
    /// β1 (default 0.9, as in the paper).
    pub beta1: f64,
    /// β2 (default 0.99, as in the paper).
    pub beta2: f64,
    /// Adaptivity τ (default 1e-3, the paper's default).
    pub tau: f64,
}

impl Default for FedAdamConfig {
    fn default() -> Self {
        FedAdamConfig {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

/// One BatchNorm naming convention: the suffix of the running mean and of the matching running variance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BnPair {
    /// E.g. `running_mean`.
    pub mean: String,
    /// E.g. `running_var`.
    pub var: String,
}

/// How BatchNorm statistics are recognised by name. A tensor matches a suffix when its name is the suffix or
/// ends with `.suffix` or `/suffix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BnRules {
    /// Mean/variance suffix pairs (default: PyTorch and candle `running_mean`/`running_var`, Keras
    /// `moving_mean`/`moving_variance`).
    pub pairs: Vec<BnPair>,
    /// Suffixes of batch counters merged by the max rule even when stored as floats (default
    /// `num_batches_tracked`).
    pub counters: Vec<String>,
}

impl Default for BnRules {
    fn default() -> Self {
        BnRules {
            pairs: vec![
                BnPair {
                    mean: "running_mean".into(),
                    var: "running_var".into(),
                },
                BnPair {
                    mean: "moving_mean".into(),
                    var: "moving_variance".into(),
                },
            ],
            counters: vec!["num_batches_tracked".into()],
        }
    }
}

impl FromStr for BnRules {
    type Err = MergeError;
    /// Parse `--bn-names` syntax: comma-separated `MEAN:VAR` suffix pairs, e.g.
    /// `running_mean:running_var,moving_mean:moving_variance`. Counters keep their default.
    fn from_str(s: &str) -> Result<Self, MergeError> {
        let mut pairs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (m, v) = part.split_once(':').ok_or_else(|| {
                MergeError::BadConfig(format!(
                    "--bn-names entry {part:?} is not MEAN_SUFFIX:VAR_SUFFIX"
                ))
            })?;
            let (m, v) = (m.trim(), v.trim());
            if m.is_empty() || v.is_empty() || m == v {
                return Err(MergeError::BadConfig(format!(
                    "--bn-names entry {part:?} needs two different, non-empty suffixes"
                )));
            }
            pairs.push(BnPair {
                mean: m.into(),
                var: v.into(),
            });
        }
        Ok(BnRules {
            pairs,
            counters: BnRules::default().counters,
        })
    }
}

pub(crate) fn has_suffix<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    let prefix = name.strip_suffix(suffix)?;
    (prefix.is_empty() || prefix.ends_with('.') || prefix.ends_with('/')).then_some(prefix)
}

/// Everything a merge needs besides its inputs. `MergeConfig::default()` is plain sample-weighted FedAvg.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergeConfig {
    /// The strategy (`--strategy`).
    pub strategy: Strategy,
    /// The weighting for fedavg, fedavgm, fedadam and the BatchNorm statistics under them (`--weights`).
    pub weighting: Weighting,
    /// K for `trimmed-mean`: values dropped from each end of every coordinate (`--trim`, default 1).
    pub trim: usize,
    /// Clip each update's L2 distance from the base to this (`--clip-norm`).
    pub clip_norm: Option<f64>,
    /// FedAvgM settings.
    pub fedavgm: FedAvgMConfig,
    /// FedAdam settings.
    pub fedadam: FedAdamConfig,
    /// BatchNorm naming rules (`--bn-names`).
    pub bn: BnRules,
    /// Elements per slice when the robust strategies read a tensor in slices (default 1 Mi: 50 inputs use
    /// about 400 MB of f64 buffers).
    pub chunk_elements: usize,
    /// Bound R on each site's BatchNorm statistics under the averaging strategies (`--bn-bound`, default
    /// [`DEFAULT_BN_BOUND`]; 0 turns it off): a running mean is kept within R of the base global's standard
    /// deviations from the base's mean, a running variance within a factor R² of the base's. Statistics are not
    /// trained by gradient, so without a bound one site could set them to anything (issue 15).
    pub bn_bound: f64,
    /// Bound B of the `fisher` strategy (`--fisher-bound`, default [`DEFAULT_FISHER_BOUND`], at least 1): each
    /// site's Fisher values are divided by their mean over the tensor and clamped to `[1/B, B]`, so a site
    /// weighs at most B times its FedAvg weight on any parameter, and that on at most a fraction (1 + 1/B)/B of
    /// a tensor's parameters (issue 14; the threat model). B = 1 is FedAvg.
    pub fisher_bound: f64,
}

/// Default [`MergeConfig::fisher_bound`]. Chosen on HQ's tuning slice (docs/experiments.md, few trips).
pub const DEFAULT_FISHER_BOUND: f64 = 10.0;

/// Default [`MergeConfig::bn_bound`]: a site's BatchNorm mean may sit 100 base standard deviations from the
/// base's and its variance a factor 10⁴ away. Generous on purpose: round 1 starts from the initial statistics
/// (mean 0, variance 1), which real data moves a long way; the bound is there to stop absurd values (a variance
/// of 10³⁰), not to second-guess training. `median` and `trimmed-mean` bound every site more tightly.
pub const DEFAULT_BN_BOUND: f64 = 100.0;

impl Default for MergeConfig {
    fn default() -> Self {
        MergeConfig {
            strategy: Strategy::FedAvg,
            weighting: Weighting::Samples,
            trim: 1,
            clip_norm: None,
            fedavgm: FedAvgMConfig::default(),
            fedadam: FedAdamConfig::default(),
            bn: BnRules::default(),
            chunk_elements: 1 << 20,
            bn_bound: DEFAULT_BN_BOUND,
            fisher_bound: DEFAULT_FISHER_BOUND,
        }
    }
}

impl MergeConfig {
    /// Check the numbers are usable (the engine calls this before reading anything).
    pub fn validate(&self) -> Result<(), MergeError> {
        let bad = |s: String| Err(MergeError::BadConfig(s));
        if let Some(c) = self.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("--clip-norm must be a positive number, not {c}"));
            }
        }
        let m = self.fedavgm;
        let unit = |x: f64| (0.0..1.0).contains(&x);
        if !(m.lr.is_finite() && m.lr > 0.0 && unit(m.beta)) {
            return bad(format!(
                "fedavgm needs lr > 0 and 0 <= beta < 1 (got lr {}, beta {})",
                m.lr, m.beta
            ));
        }
        let a = self.fedadam;
        if !(a.lr.is_finite()
            && a.lr > 0.0
            && unit(a.beta1)
            && unit(a.beta2)
            && a.tau.is_finite()
            && a.tau > 0.0)
        {
            return bad(format!(
                "fedadam needs lr > 0, 0 <= beta1, beta2 < 1 and tau > 0 (got lr {}, beta1 {}, beta2 {}, tau {})",
                a.lr, a.beta1, a.beta2, a.tau
            ));
        }
        if !(self.bn_bound == 0.0 || (self.bn_bound.is_finite() && self.bn_bound >= 1.0)) {
            return bad(format!(
                "--bn-bound must be 0 (off) or at least 1, not {}",
                self.bn_bound
            ));
        }
        if !(self.fisher_bound.is_finite() && self.fisher_bound >= 1.0) {
            return bad(format!(
                "--fisher-bound must be a number of at least 1, not {}",
                self.fisher_bound
            ));
        }
        if self.chunk_elements == 0 {
            return bad("chunk_elements must be at least 1".into());
        }
        Ok(())
    }

    /// A one-line description for the ledger and the report, e.g. `fedavg weights=samples clip=5`.
    pub fn describe(&self) -> String {
        let mut s = self.strategy.to_string();
        match self.strategy {
            Strategy::FedAvg => s += &format!(" weights={}", self.weighting),
            Strategy::FedAvgM => {
                s += &format!(
                    " weights={} lr={} beta={}",
                    self.weighting, self.fedavgm.lr, self.fedavgm.beta
                )
            }
            Strategy::FedAdam => {
                let a = self.fedadam;
                s += &format!(
                    " weights={} lr={} beta1={} beta2={} tau={}",
                    self.weighting, a.lr, a.beta1, a.beta2, a.tau
                )
            }
            Strategy::Median => {}
            Strategy::TrimmedMean => s += &format!(" trim={}", self.trim),
            Strategy::Fisher => {
                s += &format!(" weights={} bound={}", self.weighting, self.fisher_bound)
            }
        }
        if let Some(c) = self.clip_norm {
            s += &format!(" clip={c}");
        }
        // Only a non-default bound is named, so globals merged under the default describe themselves as before.
        if self.bn_bound != DEFAULT_BN_BOUND && !self.strategy.is_robust() {
            s += &format!(" bn-bound={}", self.bn_bound);
        }
        s
    }
}
