//! A site's state directory: the imported global, the previous one, and the local update waiting to go out.
//!
//! Layout (all written atomically; the JSON records are the commit points, the weights are content-addressed so
//! a crash between two writes never leaves a record pointing at the wrong bytes):
//! - `global.json`: the current global ([`GlobalRecord`]), with the one before it inside (`previous`), so one
//!   rename installs both.
//! - `weights/<sha256>.safetensors`: plain safetensors files named by their hash.
//! - `current.safetensors`: a copy of the current global's weights at a stable path, for the recogniser.
//! - `local.json`: the trained local model waiting to be exported ([`LocalRecord`]).
//! - `lock`: held while a command changes the state.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{self, DirLock, FsError, LockError};
use crate::keys::SecretKey;
use crate::manifest::{is_hash, BundleKind};
use crate::manifest::{Draft, SiteInfo};
use crate::{Bundle, Payload, SealError, Sealed};

/// Why `export` failed. Nothing was written to the stick.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// State problem.
    #[error(transparent)]
    Site(#[from] SiteError),
    /// Sealing or writing the bundle failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The local model was trained from an older global.
    #[error("the local model was trained from round {trained_round}, but the site now holds round {current_round}; run `ferry-client train` again")]
    StaleLocal {
        /// Round it was trained from.
        trained_round: u64,
        /// Round held now.
        current_round: u64,
    },
}

/// Largest state record read.
const MAX_RECORD: u64 = 16 << 20;
/// Largest weights file read from the state directory.
const MAX_WEIGHTS: u64 = 16 << 30;
/// Default largest round jump accepted by `import`.
pub const DEFAULT_MAX_ROUND_JUMP: u64 = 100;

/// Why a site-state operation failed. Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SiteError {
    /// File system failure.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Another process holds the state.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A state file is damaged.
    #[error("{}: site state is damaged ({why}); restore it from a backup or re-import the current global into a fresh --state directory", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Only globals can be imported.
    #[error("this is a site update, not a global; only HQ's global bundles can be imported")]
    NotAGlobal,
    /// The global belongs to another federation.
    #[error("this global belongs to federation {found:?}, but this site is in {expected:?}")]
    WrongFederation {
        /// Site's federation.
        expected: String,
        /// Bundle's federation.
        found: String,
    },
    /// An older (or same-round but different) global: a rollback.
    #[error("refusing rollback: this global is round {found} ({found_hash}), but the site already holds round {current} ({current_hash})")]
    Rollback {
        /// Round held.
        current: u64,
        /// Hash held (short).
        current_hash: String,
        /// Round offered.
        found: u64,
        /// Hash offered (short).
        found_hash: String,
    },
    /// A round far ahead of the one held.
    #[error("refusing round jump: this global is round {found}, the site holds round {current}, and at most {max} rounds may be skipped (--max-round-jump)")]
    RoundJump {
        /// Round held.
        current: u64,
        /// Round offered.
        found: u64,
        /// Allowed jump.
        max: u64,
    },
    /// The global has a different model layout than the one held.
    #[error("this global's model layout (fingerprint {found}) differs from the one this site holds ({expected}); HQ must start a new federation to change the model")]
    ModelChanged {
        /// Held fingerprint (short).
        expected: String,
        /// Offered fingerprint (short).
        found: String,
    },
    /// The global holds NaN or infinity.
    #[error(
        "this global's tensor {0:?} holds NaN or infinity; refusing to install a broken model"
    )]
    NonFinite(String),
    /// Nothing has been imported yet.
    #[error("no global imported yet in {}; run `ferry-client import` first", .0.display())]
    NoGlobal(PathBuf),
    /// No local update exists.
    #[error("no trained local model in {}; run `ferry-client train` first", .0.display())]
    NoLocal(PathBuf),
}

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
    /// The file it was imported from, as given.
    pub source: String,
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
    /// SHA-256 of its safetensors (`weights/<this>.safetensors`). Filled in by [`SiteState::write_local`].
    #[serde(default)]
    pub weights_sha256: String,
    /// Hash of the update bundle it was exported as, once exported.
    #[serde(default)]
    pub exported: Option<String>,
}

/// What `import` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    /// The global was installed.
    Installed {
        /// The global held before, if any.
        previous: Option<GlobalRecord>,
    },
    /// The site already holds exactly this global: nothing to do.
    AlreadyCurrent,
}

/// A site's state directory.
#[derive(Debug, Clone)]
pub struct SiteState {
    dir: PathBuf,
}

impl SiteState {
    /// Open (creating if missing) a state directory.
    pub fn open(dir: &Path) -> Result<SiteState, SiteError> {
        fsutil::ensure_dir(dir)?;
        fsutil::ensure_dir(&dir.join("weights"))?;
        Ok(SiteState {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Take the state lock (held until dropped).
    pub fn lock(&self) -> Result<DirLock, SiteError> {
        Ok(DirLock::acquire(&self.dir)?)
    }

    fn read_record<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, SiteError> {
        let path = self.dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = fsutil::read_capped(&path, MAX_RECORD)?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SiteError::Corrupt {
                path,
                why: e.to_string(),
            })
    }

    fn write_record<T: Serialize>(&self, name: &str, rec: &T) -> Result<(), SiteError> {
        let mut bytes = serde_json::to_vec_pretty(rec).map_err(|e| SiteError::Corrupt {
            path: self.dir.join(name),
            why: e.to_string(),
        })?;
        bytes.push(b'\n');
        Ok(fsutil::write_replace(&self.dir.join(name), &bytes)?)
    }

    /// The path of content-addressed weights.
    pub fn weights_path(&self, sha256: &str) -> PathBuf {
        self.dir
            .join("weights")
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
        if crate::sha256_hex(&bytes) != sha256 {
            return Err(SiteError::Corrupt {
                path,
                why: "weights do not match their recorded hash".into(),
            });
        }
        Ok(bytes)
    }

    /// Store weights under their hash (no-op if already there); returns the hash.
    pub fn store_weights(&self, bytes: &[u8]) -> Result<String, SiteError> {
        let sha = crate::sha256_hex(bytes);
        let path = self.weights_path(&sha);
        if path.exists() && self.read_weights(&sha).is_ok() {
            return Ok(sha);
        }
        if path.exists() {
            fsutil::write_replace(&path, bytes)?;
        } else {
            fsutil::write_new(&path, bytes)?;
        }
        Ok(sha)
    }

    /// The current global, if one was imported.
    pub fn current(&self) -> Result<Option<GlobalRecord>, SiteError> {
        self.read_record("global.json")
    }

    /// The global held before the current one.
    pub fn previous(&self) -> Result<Option<GlobalRecord>, SiteError> {
        Ok(self.current()?.and_then(|c| c.previous.map(|p| *p)))
    }

    /// The current global's plain safetensors bytes.
    pub fn global_weights(&self) -> Result<Vec<u8>, SiteError> {
        let rec = self
            .current()?
            .ok_or_else(|| SiteError::NoGlobal(self.dir.clone()))?;
        self.read_weights(&rec.payload_sha256)
    }

    /// Path of the current global's plain safetensors file (for the deployed recogniser).
    pub fn global_weights_path(&self) -> Result<PathBuf, SiteError> {
        let rec = self
            .current()?
            .ok_or_else(|| SiteError::NoGlobal(self.dir.clone()))?;
        Ok(self.weights_path(&rec.payload_sha256))
    }

    /// `current.safetensors`: a stable path to the current global's plain weights, for the deployed recogniser.
    pub fn current_model_path(&self) -> PathBuf {
        self.dir.join("current.safetensors")
    }

    fn write_current_model(&self, payload: &[u8]) -> Result<(), SiteError> {
        Ok(fsutil::write_replace(&self.current_model_path(), payload)?)
    }

    /// The local model waiting to be exported (or already exported: see `exported`).
    pub fn local(&self) -> Result<Option<LocalRecord>, SiteError> {
        self.read_record("local.json")
    }

    /// The local model's safetensors bytes.
    pub fn local_weights(&self) -> Result<(LocalRecord, Vec<u8>), SiteError> {
        let rec = self
            .local()?
            .ok_or_else(|| SiteError::NoLocal(self.dir.clone()))?;
        let w = self.read_weights(&rec.weights_sha256)?;
        Ok((rec, w))
    }

    /// Record a trained local model (weights first, then the record: the record is the commit point).
    pub fn write_local(
        &self,
        weights_safetensors: &[u8],
        rec: &LocalRecord,
    ) -> Result<(), SiteError> {
        let sha = self.store_weights(weights_safetensors)?;
        let mut rec = rec.clone();
        rec.weights_sha256 = sha;
        rec.exported = None;
        self.write_record("local.json", &rec)?;
        self.collect_garbage()
    }

    /// Mark the local model as exported in the update bundle with this hash.
    pub fn mark_exported(&self, bundle_hash: &str) -> Result<(), SiteError> {
        let mut rec = self
            .local()?
            .ok_or_else(|| SiteError::NoLocal(self.dir.clone()))?;
        rec.exported = Some(bundle_hash.to_string());
        self.write_record("local.json", &rec)
    }

    /// Install a verified global after the freshness checks. Re-importing the current global is a no-op.
    /// The caller holds the lock.
    pub fn import(
        &self,
        bundle: &Bundle,
        source: &str,
        max_round_jump: u64,
    ) -> Result<ImportOutcome, SiteError> {
        let m = &bundle.manifest;
        if m.kind != BundleKind::Global {
            return Err(SiteError::NotAGlobal);
        }
        let current = self.current()?;
        if let Some(cur) = &current {
            if cur.hash == bundle.hash {
                // Repair the deployed copy if a crash came between the commit and its refresh.
                if fsutil::read_capped(&self.current_model_path(), MAX_WEIGHTS)
                    .ok()
                    .as_deref()
                    != Some(bundle.payload())
                {
                    self.write_current_model(bundle.payload())?;
                }
                return Ok(ImportOutcome::AlreadyCurrent);
            }
            if cur.federation != m.federation {
                return Err(SiteError::WrongFederation {
                    expected: cur.federation.clone(),
                    found: m.federation.clone(),
                });
            }
            if m.round <= cur.round {
                return Err(SiteError::Rollback {
                    current: cur.round,
                    current_hash: crate::short(&cur.hash).to_string(),
                    found: m.round,
                    found_hash: crate::short(&bundle.hash).to_string(),
                });
            }
            if m.round - cur.round > max_round_jump {
                return Err(SiteError::RoundJump {
                    current: cur.round,
                    found: m.round,
                    max: max_round_jump,
                });
            }
            if cur.model_fingerprint != m.model_fingerprint {
                return Err(SiteError::ModelChanged {
                    expected: crate::short(&cur.model_fingerprint).to_string(),
                    found: crate::short(&m.model_fingerprint).to_string(),
                });
            }
        }
        // HQ never signs non-finite weights; a global that has them came from a broken or hostile HQ.
        if let Some(t) = bundle
            .tensors()
            .find(|t| !crate::payload::all_finite(t.dtype, t.data))
        {
            return Err(SiteError::NonFinite(crate::escape(t.name)));
        }
        let payload_sha256 = self.store_weights(bundle.payload())?;
        let rec = GlobalRecord {
            round: m.round,
            hash: bundle.hash.clone(),
            federation: m.federation.clone(),
            arch: m.arch.clone(),
            model_fingerprint: m.model_fingerprint.clone(),
            payload_sha256,
            samples: m
                .contributors
                .iter()
                .fold(0u64, |acc, c| acc.saturating_add(c.samples)),
            imported_at: crate::unix_now(),
            source: source.to_string(),
            previous: current.clone().map(|mut c| {
                c.previous = None;
                Box::new(c)
            }),
        };
        // The commit point: until this rename the site holds the old global.
        self.write_record("global.json", &rec)?;
        self.write_current_model(bundle.payload())?;
        self.collect_garbage()?;
        Ok(ImportOutcome::Installed { previous: current })
    }

    /// Seal the local model as an update bundle for the current global, write it into `out_dir` (atomically,
    /// read back), and mark the local model exported. The caller holds the lock.
    pub fn export(
        &self,
        key: &SecretKey,
        out_dir: &Path,
        level: i32,
    ) -> Result<(PathBuf, Sealed), ExportError> {
        let cur = self
            .current()?
            .ok_or_else(|| SiteError::NoGlobal(self.dir.clone()))?;
        let (local, weights) = self.local_weights()?;
        if local.base_hash != cur.hash {
            return Err(ExportError::StaleLocal {
                trained_round: local.round,
                current_round: cur.round,
            });
        }
        let payload = Payload::from_safetensors(&weights)?;
        if payload.fingerprint() != cur.model_fingerprint {
            return Err(SiteError::Corrupt {
                path: self.weights_path(&local.weights_sha256),
                why: "local model's layout differs from the global it was trained from".into(),
            }
            .into());
        }
        let draft = Draft {
            kind: BundleKind::Update,
            federation: cur.federation.clone(),
            arch: cur.arch.clone(),
            round: cur.round,
            base: Some(cur.hash.clone()),
            site: Some(SiteInfo {
                id: key.id().to_string(),
                samples: local.samples,
            }),
            contributors: Vec::new(),
            strategy: None,
            created: crate::unix_now(),
        };
        let sealed = crate::seal(draft, &payload, key, level)?;
        let path = sealed.write_to_dir(out_dir)?;
        self.mark_exported(&sealed.hash)?;
        Ok((path, sealed))
    }

    /// Whether the local model is trained but not yet exported for the current global.
    pub fn pending_export(&self) -> Result<bool, SiteError> {
        let (Some(cur), Some(local)) = (self.current()?, self.local()?) else {
            return Ok(false);
        };
        Ok(local.base_hash == cur.hash && local.exported.is_none())
    }

    /// Remove weights no record points at (best effort: a leftover file only costs disk).
    fn collect_garbage(&self) -> Result<(), SiteError> {
        let mut keep = Vec::new();
        for rec in [self.current()?, self.previous()?].into_iter().flatten() {
            keep.push(rec.payload_sha256);
        }
        if let Some(l) = self.local()? {
            keep.push(l.weights_sha256);
        }
        let dir = self.dir.join("weights");
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
