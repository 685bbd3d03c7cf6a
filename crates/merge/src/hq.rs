//! HQ's round on disk: the one path from sticks to the next global that `ferry-server` and `ferry-lab` share.
//!
//! verify each update (one at a time) → spool its verified payload to the state dir → check the batch against
//! the ledger → stream-merge tensor by tensor → seal the next global → store it in the state dir → commit the
//! ledger → write it to the outgoing stick. The state dir (`--state`):
//! - `ledger.json`: the ledger (commit point of a round);
//! - `globals/<hash>.ferry`: every global HQ signed, so the current one can be re-emitted (`emit`) and serves
//!   as the base of the next merge;
//! - `server/<global-hash>.safetensors`: server-optimizer state after producing that global (fedavgm/fedadam).
//!
//! A crash before the ledger commit leaves the ledger on the old round (the orphan files are harmless); a crash
//! after it leaves the new global in `globals/`, and `emit` writes it to a stick.

use std::path::{Path, PathBuf};

use ferry_bundle::fsutil::{self, FsError};
use ferry_bundle::tensor::{TensorMeta, TensorRef};
use ferry_bundle::{BundleKind, Draft, Keyring, OpenError, Payload, SealError, Sealed, SecretKey};

use crate::{
    merge, Contribution, Ledger, LedgerError, LedgerStatus, MergeConfig, MergeError, MergeReport,
    PayloadFile, ServerState, UpdateInfo,
};

/// Why an HQ operation failed. Nothing was committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HqError {
    /// A bundle did not verify.
    #[error("{}: {source}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// A file given as an update is a global.
    #[error("{}: this is a global bundle, not a site update", .0.display())]
    NotAnUpdate(PathBuf),
    /// Fewer updates than `--min-sites`.
    #[error("only {got} update(s) given, but --min-sites is {min}; wait for more sites or lower --min-sites")]
    TooFewSites {
        /// Updates given.
        got: usize,
        /// Required.
        min: usize,
    },
    /// The key is not an HQ key.
    #[error("{0} is a site key; only an hq key can sign globals")]
    NotHqKey(String),
    /// The ledger refused.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The merge refused.
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// Sealing failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// File system.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// HQ's own stored state does not verify.
    #[error("{}: HQ state is damaged ({why}); restore the state directory from backup", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Writing the new global to the output failed after the round was committed.
    #[error("round {round} is committed in the ledger, but writing it to {} failed ({source}); run `ferry-server emit --state ... --out ...` to write it again", .out.display())]
    EmitAfterCommit {
        /// The committed round.
        round: u64,
        /// Output dir.
        out: PathBuf,
        /// Why.
        #[source]
        source: SealError,
    },
}

/// Options of one merge round.
#[derive(Debug, Clone)]
pub struct RoundConfig {
    /// Strategy and per-tensor settings.
    pub merge: MergeConfig,
    /// Refuse fewer updates than this.
    pub min_sites: usize,
    /// Cap each update's signed sample count at this (flagged in the report).
    pub max_samples: Option<u64>,
    /// zstd level of the output.
    pub level: i32,
}

impl Default for RoundConfig {
    fn default() -> Self {
        RoundConfig {
            merge: MergeConfig::default(),
            min_sites: 1,
            max_samples: None,
            level: 3,
        }
    }
}

/// What a round produced.
#[derive(Debug)]
pub struct RoundOutcome {
    /// The new global's path in the output dir.
    pub path: PathBuf,
    /// The new global.
    pub sealed: Sealed,
    /// Per-site weights, distances, clipping, and per-tensor rules.
    pub report: MergeReport,
    /// Sites whose sample counts were capped by `max_samples`.
    pub capped: Vec<String>,
}

fn globals_path(dir: &Path, hash: &str) -> PathBuf {
    dir.join("globals").join(format!("{hash}.ferry"))
}

fn server_state_path(dir: &Path, global: &str) -> PathBuf {
    dir.join("server").join(format!("{global}.safetensors"))
}

fn hq_ring(key: &SecretKey) -> Result<Keyring, HqError> {
    let mut ring = Keyring::new();
    ring.add(key.public()).map_err(SealError::from)?;
    Ok(ring)
}

/// Start a federation: seal round 0 from `payload`, record it in a new ledger at `dir`, write it to `out`.
pub fn init(
    dir: &Path,
    key: &SecretKey,
    payload: &Payload,
    federation: &str,
    arch: Option<&str>,
    out: &Path,
    level: i32,
) -> Result<(PathBuf, Sealed), HqError> {
    if key.role() != ferry_bundle::Role::Hq {
        return Err(HqError::NotHqKey(key.id().to_string()));
    }
    if dir.join(crate::LEDGER_FILE).exists() {
        return Err(LedgerError::Exists(dir.to_path_buf()).into());
    }
    let sealed = ferry_bundle::seal(
        Draft::initial(federation, arch.map(str::to_string)),
        payload,
        key,
        level,
    )?;
    fsutil::ensure_dir(&dir.join("globals"))?;
    fsutil::write_new_or_same(&globals_path(dir, &sealed.hash), &sealed.bytes)?;
    Ledger::init(
        dir,
        federation,
        arch,
        &sealed.manifest.model_fingerprint,
        &sealed.hash,
    )?;
    let path = sealed
        .write_to_dir(out)
        .map_err(|source| HqError::EmitAfterCommit {
            round: 0,
            out: out.to_path_buf(),
            source,
        })?;
    Ok((path, sealed))
}

/// The federation's status.
pub fn status(dir: &Path) -> Result<LedgerStatus, HqError> {
    Ok(LedgerStatus::from(&Ledger::peek(dir)?))
}

/// Write the current global from the state dir to `out` again (after a failed write, or for another stick).
pub fn emit(dir: &Path, key: &SecretKey, out: &Path) -> Result<PathBuf, HqError> {
    let ledger = Ledger::load(dir)?;
    let current = ledger.current().clone();
    let (bytes, bundle) = read_current(dir, &current.hash, key)?;
    let name = format!("global-r{}.ferry", bundle.manifest.round);
    fsutil::ensure_dir(out)?;
    let path = out.join(name);
    fsutil::write_new_verified(&path, &bytes)?;
    Ok(path)
}

fn read_current(
    dir: &Path,
    hash: &str,
    key: &SecretKey,
) -> Result<(Vec<u8>, ferry_bundle::Bundle), HqError> {
    let path = globals_path(dir, hash);
    let bytes = fsutil::read_capped(&path, ferry_bundle::MAX_BUNDLE_BYTES)?;
    let bundle = ferry_bundle::open(&bytes, &hq_ring(key)?, &ferry_bundle::Limits::default())
        .map_err(|e| HqError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
    if bundle.hash != hash {
        return Err(HqError::Corrupt {
            path,
            why: "stored global does not match the ledger's hash".into(),
        });
    }
    Ok((bytes, bundle))
}

/// Remove `.spool-*` directories a crashed merge left behind (we hold the ledger lock, so none is in use).
fn remove_stale_spools(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".spool-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The server-optimizer state stored with the global `global` (`server/<global>.safetensors`), or the empty
/// state when that global has none (every stateless merge, and round 0).
fn read_server_state(dir: &Path, global: &str) -> Result<ServerState, HqError> {
    let path = server_state_path(dir, global);
    if !path.exists() {
        return Ok(ServerState::new());
    }
    // Two f32 moments of the model: far below any bundle ferry reads.
    let bytes = fsutil::read_capped(&path, 2 * ferry_bundle::MAX_BUNDLE_BYTES)?;
    let (state, bound) = ServerState::from_bytes(&bytes, &path)?;
    if bound != global {
        return Err(MergeError::StateGlobalMismatch {
            path,
            state_global: bound,
            current: global.to_string(),
        }
        .into());
    }
    Ok(state)
}

/// Merge update bundle files into the next global. Verifies every file against `keyring` before anything is
/// parsed, refuses the batch on any problem (nothing written, ledger unchanged), and otherwise commits the
/// round and writes `global-r<N+1>.ferry` into `out`.
pub fn merge_round(
    dir: &Path,
    key: &SecretKey,
    keyring: &Keyring,
    files: &[PathBuf],
    config: &RoundConfig,
    out: &Path,
) -> Result<RoundOutcome, HqError> {
    if key.role() != ferry_bundle::Role::Hq {
        return Err(HqError::NotHqKey(key.id().to_string()));
    }
    let mut ledger = Ledger::load(dir)?;
    if files.len() < config.min_sites {
        return Err(HqError::TooFewSites {
            got: files.len(),
            min: config.min_sites,
        });
    }
    let current = ledger.current().clone();
    let (_, base) = read_current(dir, &current.hash, key)?;

    remove_stale_spools(dir);
    let spool = tempfile::Builder::new()
        .prefix(".spool-")
        .tempdir_in(dir)
        .map_err(|e| FsError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
    let mut infos = Vec::new();
    let mut sources = Vec::new();
    let mut capped = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let bundle = ferry_bundle::open_file(path, keyring).map_err(|source| HqError::Open {
            path: path.clone(),
            source,
        })?;
        let m = &bundle.manifest;
        let Some(site) = m.site.as_ref().filter(|_| m.kind == BundleKind::Update) else {
            return Err(HqError::NotAnUpdate(path.clone()));
        };
        let mut samples = site.samples;
        if let Some(max) = config.max_samples {
            if samples > max {
                capped.push(site.id.clone());
                samples = max;
            }
        }
        let info = UpdateInfo {
            site: site.id.clone(),
            bundle: bundle.hash.clone(),
            base: m.base.clone().unwrap_or_default(),
            round: m.round,
            federation: m.federation.clone(),
            fingerprint: m.model_fingerprint.clone(),
            samples,
        };
        // Check as we go, so a stale or foreign bundle is refused before the next one is even read.
        ledger.check_update(&info)?;
        infos.push(info);
        sources.push(PayloadFile::spool(spool.path(), &format!("u{i}"), &bundle)?);
    }
    ledger.check_batch(&infos)?;

    let layout: Vec<TensorMeta> = base.metas().to_vec();
    let mut base_source = PayloadFile::spool(spool.path(), "base", &base)?;
    let mut server = read_server_state(dir, &current.hash)?;

    let mut contributions: Vec<Contribution<'_>> = infos
        .iter()
        .zip(sources.iter_mut())
        .map(|(u, s)| Contribution {
            site: u.site.clone(),
            bundle: u.bundle.clone(),
            samples: u.samples,
            source: s,
        })
        .collect();
    let mut merged: Vec<(TensorMeta, Vec<u8>)> = Vec::with_capacity(layout.len());
    let report = merge(
        &layout,
        &mut base_source,
        &mut contributions,
        &config.merge,
        &mut server,
        |meta, data| {
            merged.push((meta.clone(), data));
            Ok(())
        },
    )?;
    drop(contributions);
    let refs: Vec<TensorRef<'_>> = merged
        .iter()
        .map(|(m, d)| TensorRef {
            name: &m.name,
            dtype: m.dtype,
            shape: &m.shape,
            data: d,
        })
        .collect();
    let payload = Payload::from_tensors(&refs)?;
    drop(refs);
    drop(merged);

    let mut contributors: Vec<_> = infos.iter().map(UpdateInfo::contributor).collect();
    contributors.sort_by(|a, b| a.bundle.cmp(&b.bundle));
    let draft = Draft {
        kind: BundleKind::Global,
        federation: base.manifest.federation.clone(),
        arch: base.manifest.arch.clone(),
        round: current.round + 1,
        base: Some(current.hash.clone()),
        site: None,
        contributors: contributors.clone(),
        strategy: Some(config.merge.describe()),
        created: ferry_bundle::unix_now(),
    };
    let sealed = ferry_bundle::seal(draft, &payload, key, config.level)?;

    // Store, then commit. Until `record_round` renames the ledger, the federation is on the old round.
    fsutil::ensure_dir(&dir.join("globals"))?;
    fsutil::write_new_or_same(&globals_path(dir, &sealed.hash), &sealed.bytes)?;
    if config.merge.strategy.is_stateful() {
        fsutil::ensure_dir(&dir.join("server"))?;
        fsutil::write_replace(
            &server_state_path(dir, &sealed.hash),
            &server.to_bytes(&sealed.hash)?,
        )?;
    }
    let round = ledger.record_round(&sealed.hash, &config.merge.describe(), &contributors)?;
    drop(spool);
    let path = sealed
        .write_to_dir(out)
        .map_err(|source| HqError::EmitAfterCommit {
            round,
            out: out.to_path_buf(),
            source,
        })?;
    Ok(RoundOutcome {
        path,
        sealed,
        report,
        capped,
    })
}
