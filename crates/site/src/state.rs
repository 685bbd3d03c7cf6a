//! A site's state directory: the one owner of every file in it, and of the records that say what they hold.
//!
//! Layout (every write atomic; the JSON records are the commit points; weights are content-addressed, so a crash
//! between two writes never leaves a record pointing at the wrong bytes):
//! - `global.json`: the current global ([`GlobalRecord`]), with the one before it inside (`previous`), so one
//!   rename installs both.
//! - `weights/<sha256>.safetensors`: plain safetensors files named by their hash.
//! - `current.safetensors`: a copy of the current global's weights at a stable path, for the recogniser.
//! - `local.json`: the trained local model waiting to be exported ([`LocalRecord`]).
//! - `optimizer.safetensors`: the site's Adam moments and lifetime step, carried from round to round.
//! - `train-checkpoint.safetensors`: model and optimizer after the last finished epoch of a run in progress.
//! - `deployed.safetensors` + `deployed.json`: the current global with BatchNorm statistics recalibrated on local
//!   data ([`DeployedRecord`]).
//! - `pin.json`: whom the site believes ([`SitePin`], issue 15 §3): its federation, and either the HQ keys seen
//!   at the first import or the federation's root key. Written by the first import (`--federation`, `--root`)
//!   or by enrolment (issue 16), before or with the first global.
//! - `hq-keys.ferry-keys`: the newest list of HQ keys signed by the pinned root (`ferry_bundle::keylist`).
//! - `revocations/<sha256>.ferry-rev`: every revocation list the site verified, applied on every later import
//!   (issue 15 §2).
//! - `audit.jsonl`: one line per bundle imported or exported (`crate::audit`, issue 16), append-only.
//! - `ferry.toml`: the remembered settings (`crate::settings`, issue 16), written by enrolment, edited by hand.
//! - `keys/<site>.key`, `keys/<site>.pub`: the site's key pair when enrolment made it (issue 16).
//! - `lock`: held while a command changes the state ([`SiteLock`]).
//!
//! Reading needs no lock. Every method that changes a file takes a [`SiteLock`], so the compiler makes sure the
//! caller holds the directory's lock.

use std::path::{Path, PathBuf};

use ferry_bundle::fsutil::{self, DirLock, FsError};
use ferry_bundle::is_sha256_hex as is_hash;
use ferry_bundle::keys::KeyRecord;
use ferry_bundle::revocation::{self, Verified};
use ferry_bundle::PublicKey;
use serde::{Deserialize, Serialize};

use crate::SiteError;

/// File names inside a site state directory.
mod files {
    pub const GLOBAL: &str = "global.json";
    pub const LOCAL: &str = "local.json";
    pub const WEIGHTS: &str = "weights";
    pub const CURRENT_MODEL: &str = "current.safetensors";
    pub const OPTIMIZER: &str = "optimizer.safetensors";
    pub const CHECKPOINT: &str = "train-checkpoint.safetensors";
    pub const DEPLOYED: &str = "deployed.safetensors";
    pub const DEPLOYED_RECORD: &str = "deployed.json";
    pub const PIN: &str = "pin.json";
    pub const HQ_KEYS: &str = "hq-keys.ferry-keys";
    pub const REVOCATIONS: &str = "revocations";
}

/// The format tag of `pin.json`.
const PIN_FORMAT: &str = "ferry-site-pin/1";

/// Largest state record read.
const MAX_RECORD: u64 = 16 << 20;
/// Largest weights file read from the state directory.
pub(crate) const MAX_WEIGHTS: u64 = 16 << 30;
/// Largest training-state file read (a model plus two Adam moments is about 3× the model).
const MAX_TRAINING_STATE: u64 = 3 * MAX_WEIGHTS;

/// The global a site currently holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalRecord {
    /// Round.
    pub round: u64,
    /// SHA-256 of the global bundle file.
    pub hash: String,
    /// Federation.
    pub federation: String,
    /// Architecture, if ferry can train it.
    pub arch: Option<String>,
    /// Model fingerprint.
    pub model_fingerprint: String,
    /// SHA-256 of the plain safetensors payload (`weights/<this>.safetensors`).
    pub payload_sha256: String,
    /// Sample count behind it (sum over contributors; 0 for an `init` global).
    pub samples: u64,
    /// When it was imported (seconds since the epoch).
    pub imported_at: u64,
    /// The file it was imported from, as given, escaped.
    pub source: String,
    /// When the global goes stale (its signed `expires`; `null` for a format-1 global).
    #[serde(default)]
    pub expires: Option<u64>,
    /// The global held before this one (its own `previous` is dropped).
    #[serde(default)]
    pub previous: Option<Box<GlobalRecord>>,
}

/// A trained local model waiting to be exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRecord {
    /// Hash of the global it was trained from.
    pub base_hash: String,
    /// That global's round.
    pub round: u64,
    /// Training samples behind it.
    pub samples: u64,
    /// Local epochs run.
    pub epochs: u32,
    /// Optimizer steps run in this round.
    pub steps: u64,
    /// When training finished.
    pub trained_at: u64,
    /// SHA-256 of its safetensors (`weights/<this>.safetensors`).
    pub weights_sha256: String,
    /// Hash of the update bundle it was exported as, once exported.
    #[serde(default)]
    pub exported: Option<String>,
    /// SHA-256 of its diagonal Fisher estimate (`weights/<this>.safetensors`, F32 tensors named like the model's),
    /// once `ferry-client fisher` took one (issue 14). Training a new local model drops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fisher_sha256: Option<String>,
}

/// What a training run reports about the local model it produced: the facts [`SiteState::record_local`] turns
/// into a [`LocalRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRun {
    /// Training samples behind it (the FedAvg weight).
    pub samples: u64,
    /// Local epochs run.
    pub epochs: u32,
    /// Optimizer steps run in this round.
    pub steps: u64,
}

/// Whom a site believes (issue 15 §3): the federation it is in, and the HQ keys (or the root key that vouches for
/// HQ keys) it accepts globals from. Made once, by the first import or by enrolment (issue 16), and never
/// changed by a bundle: a global of another federation, or signed by an HQ key the pin does not cover, is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SitePin {
    /// `ferry-site-pin/1`.
    pub format: String,
    /// The federation.
    pub federation: String,
    /// The site's own id, when enrolment bound one (issue 16); `null` when pinned by a first import.
    pub site: Option<String>,
    /// The HQ keys pinned at the first import; empty when a root is pinned (HQ keys then come from the
    /// newest root-signed list, `hq-keys.ferry-keys`).
    pub hq_keys: Vec<KeyRecord>,
    /// The federation's offline root key, if the site pins one.
    pub root: Option<KeyRecord>,
    /// The site's own public key, when enrolment made it (issue 16): exports with another key are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_key: Option<KeyRecord>,
    /// The model fingerprint the enrolment kit named: a first global of another model is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_fingerprint: Option<String>,
    /// When it was pinned (seconds since the epoch).
    pub pinned_at: u64,
    /// How: `first import`, `enrolment`, or `first import (root added ...)`.
    pub how: String,
}

impl SitePin {
    /// A pin for `federation` that trusts `hq_keys` directly (no root).
    pub fn with_hq_keys(federation: &str, hq_keys: &[PublicKey], how: &str) -> SitePin {
        SitePin::new(
            federation,
            hq_keys.iter().map(KeyRecord::from).collect(),
            None,
            how,
        )
    }

    /// A pin for `federation` that trusts the HQ keys `root` vouches for.
    pub fn with_root(federation: &str, root: &PublicKey, how: &str) -> SitePin {
        SitePin::new(federation, Vec::new(), Some(KeyRecord::from(root)), how)
    }

    fn new(
        federation: &str,
        hq_keys: Vec<KeyRecord>,
        root: Option<KeyRecord>,
        how: &str,
    ) -> SitePin {
        SitePin {
            format: PIN_FORMAT.into(),
            federation: federation.to_string(),
            site: None,
            hq_keys,
            root,
            site_key: None,
            model_fingerprint: None,
            pinned_at: ferry_bundle::unix_now(),
            how: how.to_string(),
        }
    }

    /// The pinned root key, checked.
    pub fn root_key(&self) -> Result<Option<PublicKey>, String> {
        self.root.as_ref().map(KeyRecord::to_key).transpose()
    }

    /// The pinned HQ keys, checked.
    pub fn hq_public_keys(&self) -> Result<Vec<PublicKey>, String> {
        self.hq_keys.iter().map(KeyRecord::to_key).collect()
    }

    fn validate(&self) -> Result<(), String> {
        if self.format != PIN_FORMAT {
            return Err(format!(
                "format is {:?}, expected {PIN_FORMAT:?} (written by a newer ferry?)",
                ferry_bundle::escape(&self.format)
            ));
        }
        ferry_bundle::keys::validate_id("federation", &self.federation)
            .map_err(|e| e.to_string())?;
        let hq = self.hq_public_keys()?;
        if hq.iter().any(|k| k.role != ferry_bundle::Role::Hq) {
            return Err("a pinned HQ key is not an hq key".into());
        }
        if let Some(k) = &self.site_key {
            let pk = k.to_key()?;
            if pk.role != ferry_bundle::Role::Site || Some(&pk.id) != self.site.as_ref() {
                return Err("the pinned site key is not this site's key".into());
            }
        }
        match self.root_key()? {
            Some(r) if r.role != ferry_bundle::Role::Root => {
                Err("the pinned root is not a root key".into())
            }
            Some(_) if !hq.is_empty() => Err("a pin holds a root or HQ keys, not both".into()),
            None if hq.is_empty() => Err("a pin holds no key".into()),
            _ => Ok(()),
        }
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

/// A site's state directory.
#[derive(Debug, Clone)]
pub struct SiteState {
    dir: PathBuf,
}

/// The state directory's lock, held until dropped. Methods that change the state take one.
#[derive(Debug)]
pub struct SiteLock<'a> {
    state: &'a SiteState,
    _lock: DirLock,
}

impl SiteState {
    /// The state directory at `dir`. Nothing is read or created until a method needs it.
    pub fn at(dir: &Path) -> SiteState {
        SiteState {
            dir: dir.to_path_buf(),
        }
    }

    /// The state directory at `dir`, which must exist (a site that imported a global).
    pub fn open(dir: &Path) -> Result<SiteState, SiteError> {
        let state = SiteState::at(dir);
        if !state.exists() {
            return Err(SiteError::NoState(dir.to_path_buf()));
        }
        Ok(state)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory exists.
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    /// Take the state lock (held until the guard is dropped). The directory must exist.
    pub fn lock(&self) -> Result<SiteLock<'_>, SiteError> {
        if !self.exists() {
            return Err(SiteError::NoState(self.dir.clone()));
        }
        Ok(SiteLock {
            state: self,
            _lock: DirLock::acquire(&self.dir)?,
        })
    }

    /// Create the directory if needed and take the lock: for the first import, once the bundle has been
    /// verified and checked, so a refused import leaves nothing behind.
    pub(crate) fn create_and_lock(&self) -> Result<SiteLock<'_>, SiteError> {
        fsutil::ensure_dir(&self.dir)?;
        fsutil::ensure_dir(&self.dir.join(files::WEIGHTS))?;
        self.lock()
    }

    /// Refuse a guard that does not lock this directory.
    pub(crate) fn check_lock(&self, lock: &SiteLock<'_>) -> Result<(), SiteError> {
        if std::ptr::eq(lock.state, self) || lock.state.dir == self.dir {
            Ok(())
        } else {
            Err(SiteError::WrongLock(lock.state.dir.clone()))
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read_record<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, SiteError> {
        let path = self.path(name);
        let Some(bytes) = read_if_present(&path, MAX_RECORD)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SiteError::Corrupt {
                path,
                why: e.to_string(),
            })
    }

    fn write_record<T: Serialize>(
        &self,
        lock: &SiteLock<'_>,
        name: &str,
        rec: &T,
    ) -> Result<(), SiteError> {
        self.check_lock(lock)?;
        let mut bytes = serde_json::to_vec_pretty(rec).map_err(|e| SiteError::Corrupt {
            path: self.path(name),
            why: e.to_string(),
        })?;
        bytes.push(b'\n');
        Ok(fsutil::write_replace(&self.path(name), &bytes)?)
    }

    /// The path of content-addressed weights.
    pub fn weights_path(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(files::WEIGHTS)
            .join(format!("{sha256}.safetensors"))
    }

    /// Read content-addressed weights, checking their hash.
    pub fn read_weights(&self, sha256: &str) -> Result<Vec<u8>, SiteError> {
        let path = self.weights_path(sha256);
        if !is_hash(sha256) {
            return Err(SiteError::Corrupt {
                path,
                why: "record names an invalid hash".into(),
            });
        }
        let bytes = fsutil::read_capped(&path, MAX_WEIGHTS)?;
        if ferry_bundle::sha256_hex(&bytes) != sha256 {
            return Err(SiteError::Corrupt {
                path,
                why: "weights do not match their recorded hash".into(),
            });
        }
        Ok(bytes)
    }

    /// Store weights under their hash (no-op if a good copy is already there); returns the hash.
    pub(crate) fn store_weights(
        &self,
        lock: &SiteLock<'_>,
        bytes: &[u8],
    ) -> Result<String, SiteError> {
        self.check_lock(lock)?;
        let sha = ferry_bundle::sha256_hex(bytes);
        let path = self.weights_path(&sha);
        fsutil::ensure_dir(&self.dir.join(files::WEIGHTS))?;
        if path.exists() {
            if self.read_weights(&sha).is_err() {
                // A damaged copy (bit rot, a torn write before the record existed): replace it.
                fsutil::write_replace_private(&path, bytes)?;
            }
        } else {
            fsutil::write_new_private(&path, bytes)?;
        }
        Ok(sha)
    }

    /// The current global, if one was imported.
    pub fn current(&self) -> Result<Option<GlobalRecord>, SiteError> {
        self.read_record(files::GLOBAL)
    }

    /// The current global, or [`SiteError::NoGlobal`].
    pub fn require_current(&self) -> Result<GlobalRecord, SiteError> {
        self.current()?
            .ok_or_else(|| SiteError::NoGlobal(self.dir.clone()))
    }

    /// The global held before the current one.
    pub fn previous(&self) -> Result<Option<GlobalRecord>, SiteError> {
        Ok(self.current()?.and_then(|c| c.previous.map(|p| *p)))
    }

    /// Install `rec` as the current global (the commit point of an import), then refresh the recogniser's copy.
    pub(crate) fn commit_global(
        &self,
        lock: &SiteLock<'_>,
        rec: &GlobalRecord,
        payload: &[u8],
    ) -> Result<(), SiteError> {
        self.write_record(lock, files::GLOBAL, rec)?;
        self.write_current_model(lock, payload)?;
        self.collect_garbage()
    }

    /// The current global's plain safetensors bytes.
    pub fn global_weights(&self) -> Result<Vec<u8>, SiteError> {
        self.read_weights(&self.require_current()?.payload_sha256)
    }

    /// `current.safetensors`: a stable path to the current global's plain weights, for the deployed recogniser.
    pub fn current_model_path(&self) -> PathBuf {
        self.path(files::CURRENT_MODEL)
    }

    /// Rewrite `current.safetensors` unless it already holds `payload` (repairs a crash between the commit and
    /// the refresh).
    pub(crate) fn write_current_model(
        &self,
        lock: &SiteLock<'_>,
        payload: &[u8],
    ) -> Result<(), SiteError> {
        self.check_lock(lock)?;
        let path = self.current_model_path();
        if read_if_present(&path, MAX_WEIGHTS)?.as_deref() == Some(payload) {
            return Ok(());
        }
        Ok(fsutil::write_replace_private(&path, payload)?)
    }

    /// The local model waiting to be exported (or already exported: see `exported`).
    pub fn local(&self) -> Result<Option<LocalRecord>, SiteError> {
        self.read_record(files::LOCAL)
    }

    /// The local model's record and safetensors bytes.
    pub fn local_weights(&self) -> Result<(LocalRecord, Vec<u8>), SiteError> {
        let rec = self
            .local()?
            .ok_or_else(|| SiteError::NoLocal(self.dir.clone()))?;
        let w = self.read_weights(&rec.weights_sha256)?;
        Ok((rec, w))
    }

    /// Whether a local model was trained from the current global.
    pub fn local_is_fresh(&self) -> Result<bool, SiteError> {
        let (Some(cur), Some(local)) = (self.current()?, self.local()?) else {
            return Ok(false);
        };
        Ok(local.base_hash == cur.hash)
    }

    /// Record weights trained from the current global as the site's local model (weights first, then the record:
    /// the record is the commit point).
    pub fn record_local(
        &self,
        lock: &SiteLock<'_>,
        weights_safetensors: &[u8],
        run: LocalRun,
    ) -> Result<LocalRecord, SiteError> {
        let cur = self.require_current()?;
        let weights_sha256 = self.store_weights(lock, weights_safetensors)?;
        let rec = LocalRecord {
            base_hash: cur.hash,
            round: cur.round,
            samples: run.samples,
            epochs: run.epochs,
            steps: run.steps,
            trained_at: ferry_bundle::unix_now(),
            weights_sha256,
            exported: None,
            fisher_sha256: None,
        };
        self.write_record(lock, files::LOCAL, &rec)?;
        self.collect_garbage()?;
        Ok(rec)
    }

    /// Record the local model's diagonal Fisher estimate (a safetensors file of F32 tensors named like the
    /// model's), for `export --fisher`: the file first, then the record. The local model must be the one
    /// trained from the current global.
    pub fn record_fisher(
        &self,
        lock: &SiteLock<'_>,
        fisher_safetensors: &[u8],
    ) -> Result<LocalRecord, SiteError> {
        let cur = self.require_current()?;
        let mut rec = self
            .local()?
            .ok_or_else(|| SiteError::NoLocal(self.dir.clone()))?;
        if rec.base_hash != cur.hash {
            return Err(SiteError::StaleLocal {
                trained_round: rec.round,
                current_round: cur.round,
            });
        }
        rec.fisher_sha256 = Some(self.store_weights(lock, fisher_safetensors)?);
        self.write_record(lock, files::LOCAL, &rec)?;
        self.collect_garbage()?;
        Ok(rec)
    }

    /// The local model's Fisher estimate, if `ferry-client fisher` took one for it.
    pub fn local_fisher(&self) -> Result<Option<Vec<u8>>, SiteError> {
        match self.local()?.and_then(|l| l.fisher_sha256) {
            Some(sha) => Ok(Some(self.read_weights(&sha)?)),
            None => Ok(None),
        }
    }

    /// Mark the local model as exported in the update bundle with this hash.
    pub(crate) fn mark_exported(
        &self,
        lock: &SiteLock<'_>,
        bundle_hash: &str,
    ) -> Result<(), SiteError> {
        let mut rec = self
            .local()?
            .ok_or_else(|| SiteError::NoLocal(self.dir.clone()))?;
        rec.exported = Some(bundle_hash.to_string());
        self.write_record(lock, files::LOCAL, &rec)
    }

    /// Whether the local model is trained but not yet exported for the current global.
    pub fn pending_export(&self) -> Result<bool, SiteError> {
        Ok(self.local_is_fresh()? && self.local()?.is_some_and(|l| l.exported.is_none()))
    }

    /// The optimizer state carried from earlier rounds, if any.
    pub fn optimizer(&self) -> Result<Option<Vec<u8>>, SiteError> {
        read_if_present(&self.optimizer_path(), MAX_TRAINING_STATE)
    }

    /// Where the optimizer state lives (for messages).
    pub fn optimizer_path(&self) -> PathBuf {
        self.path(files::OPTIMIZER)
    }

    /// Replace the optimizer state.
    pub fn write_optimizer(&self, lock: &SiteLock<'_>, bytes: &[u8]) -> Result<(), SiteError> {
        self.check_lock(lock)?;
        Ok(fsutil::write_replace_private(
            &self.optimizer_path(),
            bytes,
        )?)
    }

    /// The checkpoint of a training run in progress, if any.
    pub fn checkpoint(&self) -> Result<Option<Vec<u8>>, SiteError> {
        read_if_present(&self.checkpoint_path(), MAX_TRAINING_STATE)
    }

    /// Where the training checkpoint lives (for messages).
    pub fn checkpoint_path(&self) -> PathBuf {
        self.path(files::CHECKPOINT)
    }

    /// Replace the training checkpoint (one file, so there is never half a checkpoint).
    pub fn write_checkpoint(&self, lock: &SiteLock<'_>, bytes: &[u8]) -> Result<(), SiteError> {
        self.check_lock(lock)?;
        Ok(fsutil::write_replace_private(
            &self.checkpoint_path(),
            bytes,
        )?)
    }

    /// Drop the training checkpoint once its run is recorded.
    pub fn remove_checkpoint(&self, lock: &SiteLock<'_>) -> Result<(), SiteError> {
        self.check_lock(lock)?;
        let path = self.checkpoint_path();
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FsError::Io { path, source }.into()),
        }
    }

    /// The recalibrated model of the current global, if one was made for it.
    pub fn deployed(&self) -> Result<Option<(DeployedRecord, Vec<u8>)>, SiteError> {
        let Some(rec) = self.read_record::<DeployedRecord>(files::DEPLOYED_RECORD)? else {
            return Ok(None);
        };
        if rec.base_hash != self.require_current()?.hash {
            return Ok(None);
        }
        let path = self.path(files::DEPLOYED);
        let bytes = fsutil::read_capped(&path, MAX_WEIGHTS)?;
        Ok(Some((rec, bytes)))
    }

    /// Record the current global recalibrated on `samples` local samples as the deployed model. Returns where
    /// the weights were written.
    pub fn write_deployed(
        &self,
        lock: &SiteLock<'_>,
        weights_safetensors: &[u8],
        samples: u64,
    ) -> Result<PathBuf, SiteError> {
        self.check_lock(lock)?;
        let cur = self.require_current()?;
        let path = self.path(files::DEPLOYED);
        // Weights first, then the record that names their global: a crash between the two leaves a record for
        // an older global, which `deployed` ignores.
        fsutil::write_replace_private(&path, weights_safetensors)?;
        let rec = DeployedRecord {
            base_hash: cur.hash,
            round: cur.round,
            samples,
            recalibrated_at: ferry_bundle::unix_now(),
        };
        self.write_record(lock, files::DEPLOYED_RECORD, &rec)?;
        Ok(path)
    }

    /// Whom the site believes, if it is pinned yet.
    pub fn pin(&self) -> Result<Option<SitePin>, SiteError> {
        let Some(pin) = self.read_record::<SitePin>(files::PIN)? else {
            return Ok(None);
        };
        pin.validate().map_err(|why| SiteError::Corrupt {
            path: self.path(files::PIN),
            why,
        })?;
        Ok(Some(pin))
    }

    /// Write the pin. Enrolment (issue 16) calls this on a new state directory; an import calls it with the
    /// first global. Replacing a pin is the caller's decision (an import only extends one: a root added under
    /// the pinned HQ key's continuity).
    pub fn write_pin(&self, lock: &SiteLock<'_>, pin: &SitePin) -> Result<(), SiteError> {
        pin.validate().map_err(SiteError::InvalidPin)?;
        self.write_record(lock, files::PIN, pin)
    }

    /// The newest root-signed HQ key list the site holds (its bytes), if any.
    pub fn hq_key_list(&self) -> Result<Option<Vec<u8>>, SiteError> {
        read_if_present(&self.path(files::HQ_KEYS), 1 << 20)
    }

    /// Store a root-signed HQ key list that verified (replacing an older one).
    pub fn write_hq_key_list(&self, lock: &SiteLock<'_>, bytes: &[u8]) -> Result<(), SiteError> {
        self.check_lock(lock)?;
        Ok(fsutil::write_replace(&self.path(files::HQ_KEYS), bytes)?)
    }

    /// Every revocation list the site verified and stored, sorted by serial.
    pub fn revocation_lists(&self) -> Result<Vec<Verified>, SiteError> {
        revocation::read_stored_dir(&self.path(files::REVOCATIONS))
            .map_err(|(path, why)| SiteError::Corrupt { path, why })
    }

    /// Store a revocation list that verified, under its hash (no-op if it is there already).
    pub(crate) fn store_revocation_list(
        &self,
        lock: &SiteLock<'_>,
        list: &Verified,
    ) -> Result<(), SiteError> {
        self.check_lock(lock)?;
        revocation::store(&self.path(files::REVOCATIONS), list)?;
        Ok(())
    }

    /// Remove weights no record points at (best effort: a leftover file only costs disk).
    fn collect_garbage(&self) -> Result<(), SiteError> {
        let mut keep = Vec::new();
        if let Some(cur) = self.current()? {
            keep.push(cur.payload_sha256.clone());
            if let Some(prev) = cur.previous {
                keep.push(prev.payload_sha256);
            }
        }
        if let Some(l) = self.local()? {
            keep.push(l.weights_sha256);
            keep.extend(l.fisher_sha256);
        }
        let dir = self.dir.join(files::WEIGHTS);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let stem = name.strip_suffix(".safetensors").unwrap_or("");
                if is_hash(stem) && !keep.iter().any(|k| k == stem) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }
}

/// A whole file, or `None` when it does not exist.
pub(crate) fn read_if_present(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, SiteError> {
    match fsutil::read_capped(path, limit) {
        Ok(b) => Ok(Some(b)),
        Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
