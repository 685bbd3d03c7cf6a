//! Training, evaluation and recalibration against a site's state directory (issue 4): what `ferry-client train`,
//! `eval` and `recalibrate` call.
//!
//! Files this module owns in the state directory (next to `ferry_bundle::site`'s):
//! - `optimizer.safetensors`: Adam's moments (`exp_avg.*`, `exp_avg_sq.*`) and lifetime `step`, carried from round
//!   to round as in the field study. Replaced atomically at the end of each training run.
//! - `train-checkpoint.safetensors`: model (`model.*`) and optimizer (`adam.*`) after the last finished epoch of a
//!   run in progress, plus the run's identity in the metadata; one file, written atomically after every epoch, so
//!   there is never half a checkpoint. A new `train` with the same base global, data and settings resumes after the
//!   last finished epoch with the same step count (and reproduces the uninterrupted run bit for bit on CPU);
//!   anything else discards it and starts cleanly from the global. Removed once the local model is recorded.
//! - `deployed.safetensors` + `deployed.json`: the current global with BatchNorm statistics recalibrated on local
//!   data, for the site's recogniser. Recalibration writes here, never over the global (which must stay what HQ
//!   sent, for verification and rollback checks) nor over the local update (a recalibration is not training and
//!   must not be exported as if it were one).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::Device;
use ferry_bundle::fsutil;
use ferry_bundle::site::{GlobalRecord, LocalRecord, SiteState};
use serde::{Deserialize, Serialize};

use crate::arch::Arch;
use crate::data_api::Dataset;
use crate::error::TrainError;
use crate::model::{read_any_safetensors, write_safetensors_with, Model};
use crate::optim::Adam;
use crate::train::{self, Evaluation, Recalibration, TrainConfig, TrainObserver, TrainSummary};

/// Adam state carried between rounds.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Epoch checkpoint of a run in progress.
pub const CHECKPOINT_FILE: &str = "train-checkpoint.safetensors";
/// Recalibrated model for the site's recogniser.
pub const DEPLOYED_FILE: &str = "deployed.safetensors";
/// Record of [`DEPLOYED_FILE`].
pub const DEPLOYED_RECORD: &str = "deployed.json";

/// Largest state file read back (a model plus two moments is ~3× the model; ferry's models are a few MB).
const MAX_STATE_FILE: u64 = 1 << 30;
const CHECKPOINT_KEY: &str = "ferry.checkpoint";

/// The current global and its architecture, or the reason ferry cannot train it.
pub fn site_arch(state: &SiteState) -> Result<(GlobalRecord, Arch), TrainError> {
    let global = state
        .current()?
        .ok_or_else(|| TrainError::NoGlobal(state.dir().to_path_buf()))?;
    let arch = match global.arch.as_deref() {
        None => return Err(TrainError::ForeignWeights),
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
    /// Optimizer step when this round's training started.
    start_step: u64,
    /// Epochs finished.
    epochs_done: u32,
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

fn write_checkpoint(
    path: &std::path::Path,
    model: &Model,
    adam: &Adam,
    info: &RunInfo,
) -> Result<(), TrainError> {
    let mut all = BTreeMap::new();
    for (k, v) in model.to_host()? {
        all.insert(format!("model.{k}"), v);
    }
    for (k, v) in adam.to_host()? {
        all.insert(format!("adam.{k}"), v);
    }
    let json = serde_json::to_string(info).map_err(|e| TrainError::Config(e.to_string()))?;
    let bytes = write_safetensors_with(
        &all,
        None,
        Some(HashMap::from([(CHECKPOINT_KEY.to_string(), json)])),
    )?;
    fsutil::write_replace(path, &bytes)?;
    Ok(())
}

fn read_checkpoint(
    path: &std::path::Path,
    arch: Arch,
    device: &Device,
) -> Result<Option<(Model, Adam, RunInfo)>, TrainError> {
    if !path.exists() {
        return Ok(None);
    }
    let damaged = |detail: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        detail,
    };
    let bytes = fsutil::read_capped(path, MAX_STATE_FILE)?;
    let (all, meta) = read_any_safetensors(&bytes).map_err(|e| damaged(e.to_string()))?;
    let info: RunInfo = meta
        .get(CHECKPOINT_KEY)
        .ok_or_else(|| damaged("no run record".into()))
        .and_then(|j| serde_json::from_str(j).map_err(|e| damaged(e.to_string())))?;
    if info.arch != arch.name() {
        // Another model's run: not ours to resume.
        return Ok(Some((
            Model::init(arch, 0, device)?,
            Adam::new(arch, device)?,
            info,
        )));
    }
    let (mut m, mut a) = (BTreeMap::new(), BTreeMap::new());
    for (k, v) in all {
        if let Some(n) = k.strip_prefix("model.") {
            m.insert(n.to_string(), v);
        } else if let Some(n) = k.strip_prefix("adam.") {
            a.insert(n.to_string(), v);
        } else {
            return Err(damaged(format!("unexpected tensor `{k}`")));
        }
    }
    let model = Model::from_host(arch, m, device).map_err(|e| damaged(e.to_string()))?;
    let adam = Adam::from_host(arch, a, device).map_err(|e| damaged(e.to_string()))?;
    Ok(Some((model, adam, info)))
}

fn remove_if_present(path: &std::path::Path) -> Result<(), TrainError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(fsutil::FsError::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()),
    }
}

/// The optimizer state carried from earlier rounds, or a fresh one.
fn load_optimizer(state: &SiteState, arch: Arch, device: &Device) -> Result<Adam, TrainError> {
    let path = state.dir().join(OPTIMIZER_FILE);
    if !path.exists() {
        return Adam::new(arch, device);
    }
    let bytes = fsutil::read_capped(&path, MAX_STATE_FILE)?;
    Adam::from_safetensors(arch, &bytes, device)
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
/// (`samples` = the size of `data`). Holds the state lock throughout.
pub fn train_site(
    state: &SiteState,
    data: &Dataset,
    cfg: &TrainConfig,
    device: &Device,
    obs: &mut dyn TrainObserver,
) -> Result<SiteTrainSummary, TrainError> {
    let _lock = state.lock()?;
    let (global, arch) = site_arch(state)?;
    train::check_data(arch, data)?;
    let ckpt_path = state.dir().join(CHECKPOINT_FILE);
    let mut info = RunInfo {
        base_hash: global.hash.clone(),
        arch: arch.name().to_string(),
        data: data_fingerprint(data),
        samples: data.len(),
        batch: cfg.batch,
        lr: cfg.adam.lr,
        warmup: cfg.adam.warmup,
        seed: cfg.seed,
        start_step: 0,
        epochs_done: 0,
    };
    let resumed = match read_checkpoint(&ckpt_path, arch, device) {
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
        Err(e @ TrainError::Checkpoint { .. }) => {
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
            let first = old.epochs_done;
            (m, a, first)
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
            write_checkpoint(&ckpt_path, m, a, &info)
        },
    )?;
    let round_steps = adam.step() - info.start_step;
    // Commit order: optimizer, then the local record (the commit point), then drop the checkpoint. A crash in
    // between leaves a finished checkpoint, and the next `train` finalises from it without training again.
    fsutil::write_replace(&state.dir().join(OPTIMIZER_FILE), &adam.to_safetensors()?)?;
    let rec = LocalRecord {
        base_hash: global.hash.clone(),
        round: global.round,
        samples: data.len() as u64,
        epochs: cfg.epochs,
        steps: round_steps,
        trained_at: ferry_bundle::unix_now(),
        weights_sha256: String::new(),
        exported: None,
    };
    state.write_local(&model.to_safetensors()?, &rec)?;
    remove_if_present(&ckpt_path)?;
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
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s {
            "auto" => Ok(EvalTarget::Auto),
            "global" => Ok(EvalTarget::Global),
            "local" => Ok(EvalTarget::Local),
            "deployed" => Ok(EvalTarget::Deployed),
            other => Err(TrainError::Config(format!(
                "unknown model `{other}`: use auto, global, local or deployed"
            ))),
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

/// Record of a recalibrated model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployedRecord {
    /// Hash of the global whose BatchNorm statistics were recalibrated.
    pub base_hash: String,
    /// Its round.
    pub round: u64,
    /// Samples the statistics were estimated on.
    pub samples: u64,
    /// When (seconds since the epoch).
    pub recalibrated_at: u64,
}

fn read_deployed(state: &SiteState, global: &GlobalRecord) -> Result<Option<Vec<u8>>, TrainError> {
    let rec_path = state.dir().join(DEPLOYED_RECORD);
    if !rec_path.exists() {
        return Ok(None);
    }
    let rec: DeployedRecord = serde_json::from_slice(&fsutil::read_capped(&rec_path, 1 << 16)?)
        .map_err(|e| TrainError::Checkpoint {
            path: rec_path.clone(),
            detail: e.to_string(),
        })?;
    if rec.base_hash != global.hash {
        return Ok(None);
    }
    Ok(Some(fsutil::read_capped(
        &state.dir().join(DEPLOYED_FILE),
        MAX_STATE_FILE,
    )?))
}

/// Evaluate one of the site's models on `data`. Returns the model actually evaluated and the result.
pub fn eval_site(
    state: &SiteState,
    data: &Dataset,
    target: EvalTarget,
    batch: usize,
    device: &Device,
) -> Result<(EvalTarget, Evaluation), TrainError> {
    let (global, arch) = site_arch(state)?;
    let local_fresh = state.local()?.is_some_and(|l| l.base_hash == global.hash);
    let (which, bytes) = match target {
        EvalTarget::Auto if local_fresh => (EvalTarget::Local, state.local_weights()?.1),
        EvalTarget::Auto | EvalTarget::Global => (EvalTarget::Global, state.global_weights()?),
        EvalTarget::Local => (EvalTarget::Local, state.local_weights()?.1),
        EvalTarget::Deployed => match read_deployed(state, &global)? {
            Some(b) => (EvalTarget::Deployed, b),
            None => {
                return Err(TrainError::Config(
                    "no recalibrated model for the current global: run `ferry-client recalibrate` first".into(),
                ))
            }
        },
    };
    let model = Model::from_safetensors(arch, &bytes, device)?;
    Ok((which, train::evaluate(&model, data, batch)?))
}

/// Recalibrate the current global's BatchNorm statistics on `data` and write the result as the deployed model
/// (`deployed.safetensors`, `deployed.json`). Returns the recalibration and where the model was written.
pub fn recalibrate_site(
    state: &SiteState,
    data: &Dataset,
    batch: usize,
    device: &Device,
) -> Result<(Recalibration, PathBuf), TrainError> {
    let _lock = state.lock()?;
    let (global, arch) = site_arch(state)?;
    let mut model = Model::from_safetensors(arch, &state.global_weights()?, device)?;
    let r = train::recalibrate(&mut model, data, batch)?;
    let path = state.dir().join(DEPLOYED_FILE);
    fsutil::write_replace(&path, &model.to_safetensors()?)?;
    let rec = DeployedRecord {
        base_hash: global.hash,
        round: global.round,
        samples: r.samples as u64,
        recalibrated_at: ferry_bundle::unix_now(),
    };
    let json = serde_json::to_vec_pretty(&rec).map_err(|e| TrainError::Config(e.to_string()))?;
    fsutil::write_replace(&state.dir().join(DEPLOYED_RECORD), &json)?;
    Ok((r, path))
}
