//! Training, evaluation and recalibration against a site's state (what `ferry-client train`, `eval` and
//! `recalibrate` call): ferry-train does the arithmetic, [`SiteState`] holds every file.
//!
//! - Training resumes: after each finished epoch the model, the optimizer and the run's identity ([`RunInfo`]) are
//!   written as one checkpoint. A new run with the same base global, data and settings resumes after the last
//!   finished epoch with the same step count (and reproduces the uninterrupted run bit for bit on CPU); anything
//!   else discards the checkpoint and starts cleanly from the global.
//! - Adam's moments and lifetime step are carried from round to round, as in the field study.
//! - Recalibration writes the deployed model, never over the global (which must stay what HQ sent, for
//!   verification and rollback checks) nor over the local update (a recalibration is not training and must not be
//!   exported as if it were one).

use candle_core::Device;
use ferry_train::data::Dataset;
use ferry_train::fisher::{diagonal_fisher, FisherConfig, FisherEstimate};
use ferry_train::{
    checkpoint, train, Adam, Arch, Evaluation, Model, Recalibration, TrainConfig, TrainError,
    TrainObserver, TrainSummary,
};
use serde::{Deserialize, Serialize};

use crate::state::{GlobalRecord, LocalRun, SiteLock, SiteState};
use crate::SiteError;

/// The current global and its architecture, or the reason ferry cannot train it.
pub fn site_arch(state: &SiteState) -> Result<(GlobalRecord, Arch), SiteError> {
    let global = state.require_current()?;
    let arch = match global.arch.as_deref() {
        None => return Err(SiteError::ForeignWeights),
        Some(name) => Arch::from_name(name)?,
    };
    Ok((global, arch))
}

/// What identifies a training run, so a checkpoint is only resumed by the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunInfo {
    base_hash: String,
    arch: String,
    data: String,
    samples: usize,
    batch: usize,
    lr: f64,
    warmup: u64,
    seed: u64,
    /// The augmentation (`Augment`'s spec); checkpoints from before augmentation existed trained without it.
    #[serde(default = "no_augment")]
    augment: String,
    /// Optimizer step when this round's training started.
    start_step: u64,
    /// Epochs finished.
    epochs_done: u32,
}

fn no_augment() -> String {
    ferry_train::Augment::none().to_string()
}

impl RunInfo {
    fn same_run(&self, other: &RunInfo) -> bool {
        let key = |r: &RunInfo| {
            (
                r.base_hash.clone(),
                r.arch.clone(),
                r.data.clone(),
                r.samples,
                r.batch,
                r.warmup,
                r.seed,
                r.augment.clone(),
            )
        };
        key(self) == key(other) && self.lr.to_bits() == other.lr.to_bits()
    }
}

/// A fingerprint of the dataset's contents (shape, labels and pixels).
fn data_fingerprint(data: &Dataset) -> String {
    let mut bytes = Vec::with_capacity(data.images.len() * 4 + data.labels.len() * 4 + 24);
    for d in [data.channels, data.height, data.width] {
        bytes.extend_from_slice(&(d as u64).to_le_bytes());
    }
    bytes.extend(data.labels.iter().flat_map(|l| l.to_le_bytes()));
    bytes.extend(data.images.iter().flat_map(|p| p.to_le_bytes()));
    ferry_bundle::sha256_hex(&bytes)
}

/// The checkpoint left by an interrupted run, if it belongs to `arch`. A damaged one is an error the caller
/// reports and then ignores.
fn read_checkpoint(
    state: &SiteState,
    arch: Arch,
    device: &Device,
) -> Result<Option<(Model, Adam, RunInfo)>, SiteError> {
    let Some(bytes) = state.checkpoint()? else {
        return Ok(None);
    };
    let damaged = |detail: String| SiteError::TrainingState {
        path: state.checkpoint_path(),
        detail,
    };
    let note = checkpoint::note(&bytes).map_err(|e| damaged(e.to_string()))?;
    let info: RunInfo = serde_json::from_str(&note).map_err(|e| damaged(e.to_string()))?;
    if info.arch != arch.name() {
        // Another model's run: not ours to resume.
        return Ok(None);
    }
    let (model, adam, _) =
        checkpoint::decode(arch, &bytes, device).map_err(|e| damaged(e.to_string()))?;
    Ok(Some((model, adam, info)))
}

/// The optimizer state carried from earlier rounds, or a fresh one.
fn load_optimizer(state: &SiteState, arch: Arch, device: &Device) -> Result<Adam, SiteError> {
    match state.optimizer()? {
        None => Ok(Adam::new(arch, device)?),
        Some(bytes) => {
            Adam::from_safetensors(arch, &bytes, device).map_err(|e| SiteError::TrainingState {
                path: state.optimizer_path(),
                detail: e.to_string(),
            })
        }
    }
}

/// What a site training run did.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteTrainSummary {
    /// The global trained from.
    pub base: GlobalRecord,
    /// The architecture.
    pub arch: Arch,
    /// `Some(epochs)` when the run resumed after that many finished epochs.
    pub resumed_after: Option<u32>,
    /// Optimizer steps in this round (resumed epochs included): what the local record says.
    pub round_steps: u64,
    /// The trainer's summary of this call.
    pub train: TrainSummary,
}

/// Train the current global on `data` for `cfg.epochs` epochs and record the result as the site's local model
/// (`samples` = the size of `data`).
pub fn train_site(
    state: &SiteState,
    lock: &SiteLock<'_>,
    data: &Dataset,
    cfg: &TrainConfig,
    device: &Device,
    obs: &mut dyn TrainObserver,
) -> Result<SiteTrainSummary, SiteError> {
    state.check_lock(lock)?;
    let (global, arch) = site_arch(state)?;
    train::check_data(arch, data)?;
    let mut info = RunInfo {
        base_hash: global.hash.clone(),
        arch: arch.name().to_string(),
        data: data_fingerprint(data),
        samples: data.len(),
        batch: cfg.batch,
        lr: cfg.adam.lr,
        warmup: cfg.adam.warmup,
        seed: cfg.seed,
        augment: cfg.augment.to_string(),
        start_step: 0,
        epochs_done: 0,
    };
    let resumed = match read_checkpoint(state, arch, device) {
        Ok(Some((m, a, old))) if old.same_run(&info) && old.epochs_done <= cfg.epochs => {
            Some((m, a, old))
        }
        Ok(Some(_)) => {
            obs.on_note(
                "discarding the checkpoint of a different training run; starting from the global",
            );
            None
        }
        Ok(None) => None,
        Err(e @ SiteError::TrainingState { .. }) => {
            obs.on_note(&format!("{e}; starting from the global instead"));
            None
        }
        Err(e) => return Err(e),
    };
    let (mut model, mut adam, first) = match resumed {
        Some((m, a, old)) => {
            obs.on_note(&format!(
                "resuming after epoch {} of {} (step {})",
                old.epochs_done,
                cfg.epochs,
                a.step()
            ));
            info.start_step = old.start_step;
            (m, a, old.epochs_done)
        }
        None => {
            let model = Model::from_safetensors(arch, &state.global_weights()?, device)?;
            let adam = load_optimizer(state, arch, device)?;
            info.start_step = adam.step();
            (model, adam, 0)
        }
    };
    let summary = train::train_epochs(
        &mut model,
        &mut adam,
        data,
        cfg,
        global.round,
        first,
        obs,
        |m, a, done| {
            let info = RunInfo {
                epochs_done: done,
                ..info.clone()
            };
            let note =
                serde_json::to_string(&info).map_err(|e| TrainError::Config(e.to_string()))?;
            state.write_checkpoint(lock, &checkpoint::encode(m, a, &note)?)
        },
    )?;
    let round_steps = adam.step() - info.start_step;
    // Commit order: optimizer, then the local record (the commit point), then drop the checkpoint. A crash in
    // between leaves a finished checkpoint, and the next `train` finalises from it without training again.
    state.write_optimizer(lock, &adam.to_safetensors()?)?;
    state.record_local(
        lock,
        &model.to_safetensors()?,
        LocalRun {
            samples: data.len() as u64,
            epochs: cfg.epochs,
            steps: round_steps,
        },
    )?;
    state.remove_checkpoint(lock)?;
    Ok(SiteTrainSummary {
        base: global,
        arch,
        resumed_after: (first > 0).then_some(first),
        round_steps,
        train: summary,
    })
}

/// Which of a site's models to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvalTarget {
    /// The local model if one was trained from the current global, else the global.
    #[default]
    Auto,
    /// The current global as imported.
    Global,
    /// The trained local model.
    Local,
    /// The recalibrated model (`recalibrate`).
    Deployed,
}

impl std::str::FromStr for EvalTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EvalTarget::Auto),
            "global" => Ok(EvalTarget::Global),
            "local" => Ok(EvalTarget::Local),
            "deployed" => Ok(EvalTarget::Deployed),
            other => Err(format!(
                "unknown model `{}`: use auto, global, local or deployed",
                ferry_bundle::escape(other)
            )),
        }
    }
}

impl std::fmt::Display for EvalTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EvalTarget::Auto => "auto",
            EvalTarget::Global => "global",
            EvalTarget::Local => "local",
            EvalTarget::Deployed => "deployed",
        })
    }
}

/// Load one of the site's models (`ferry-client eval`, `predict`). Returns the model actually loaded.
pub fn load_site_model(
    state: &SiteState,
    target: EvalTarget,
    device: &Device,
) -> Result<(EvalTarget, Model), SiteError> {
    let (_, arch) = site_arch(state)?;
    let (which, bytes) = match target {
        EvalTarget::Auto if state.local_is_fresh()? => {
            (EvalTarget::Local, state.local_weights()?.1)
        }
        EvalTarget::Auto | EvalTarget::Global => (EvalTarget::Global, state.global_weights()?),
        EvalTarget::Local => (EvalTarget::Local, state.local_weights()?.1),
        EvalTarget::Deployed => match state.deployed()? {
            Some((_, b)) => (EvalTarget::Deployed, b),
            None => return Err(SiteError::NoDeployed),
        },
    };
    Ok((which, Model::from_safetensors(arch, &bytes, device)?))
}

/// Evaluate one of the site's models on `data`. Returns the model actually evaluated and the result.
pub fn eval_site(
    state: &SiteState,
    data: &Dataset,
    target: EvalTarget,
    batch: usize,
    device: &Device,
) -> Result<(EvalTarget, Evaluation), SiteError> {
    let (which, model) = load_site_model(state, target, device)?;
    Ok((which, train::evaluate(&model, data, batch)?))
}

/// Recalibrate the current global's BatchNorm statistics on `data` and record the result as the deployed model.
/// Returns the recalibration and where the model was written.
pub fn recalibrate_site(
    state: &SiteState,
    lock: &SiteLock<'_>,
    data: &Dataset,
    batch: usize,
    device: &Device,
) -> Result<(Recalibration, std::path::PathBuf), SiteError> {
    state.check_lock(lock)?;
    let (_, arch) = site_arch(state)?;
    let mut model = Model::from_safetensors(arch, &state.global_weights()?, device)?;
    let r = train::recalibrate(&mut model, data, batch)?;
    let path = state.write_deployed(lock, &model.to_safetensors()?, r.samples as u64)?;
    Ok((r, path))
}

/// Take the local model's diagonal Fisher estimate on `data` (`ferry-client fisher`, issue 14) and record it
/// for `export --fisher`. The local model must be the one trained from the current global; it is not changed.
/// `progress(done, total)` after every batch.
pub fn fisher_site(
    state: &SiteState,
    lock: &SiteLock<'_>,
    data: &Dataset,
    cfg: &FisherConfig,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<FisherEstimate, SiteError> {
    state.check_lock(lock)?;
    let (cur, arch) = site_arch(state)?;
    let (local, weights) = state.local_weights()?;
    if local.base_hash != cur.hash {
        return Err(SiteError::StaleLocal {
            trained_round: local.round,
            current_round: cur.round,
        });
    }
    let mut model = Model::from_safetensors(arch, &weights, device)?;
    let estimate = diagonal_fisher(&mut model, data, cfg, progress)?;
    state.record_fisher(lock, &estimate.to_safetensors(arch)?)?;
    Ok(estimate)
}
