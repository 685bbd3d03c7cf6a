//! HQ's round on disk: the one path from sticks to the next global that `ferry-server` and `ferry-lab` share.
//!
//! verify each update (one at a time), streaming its payload into a scratch file in the state dir as it is
//! checked → check the batch against the ledger → merge slice by slice, compressing and hashing the next global
//! as it is computed → sign it → store it in the state dir → commit the ledger → write it to the outgoing stick. The state dir (`--state`):
//! - `ledger.json`: the ledger (commit point of a round);
//! - `globals/<hash>.ferry`: every global HQ signed, so the current one can be re-emitted (`emit`) and serves
//!   as the base of the next merge;
//! - `server/<global-hash>.safetensors`: server-optimizer state after producing that global (fedavgm/fedadam);
//! - `revocations/<sha256>.ferry-rev`: every revocation list HQ signed or was given (issue 15 §2). They apply to
//!   every later merge, and each new global names the newest one (serial and hash), which `merge` and `emit`
//!   also write next to the global for the sites.
//!
//! A crash before the ledger commit leaves the ledger on the old round (the orphan files are harmless); a crash
//! after it leaves the new global in `globals/`, and `emit` writes it to a stick.

use std::path::{Path, PathBuf};

use ferry_bundle::fsutil::{self, FsError};
use ferry_bundle::revocation::{self, RevocationError, Verified};
use ferry_bundle::tensor::TensorMeta;
use ferry_bundle::{
    BundleKind, BundleWriter, Draft, Keyring, OpenError, Payload, RevocationRef, SealError, Sealed,
    SecretKey,
};

use crate::engine::merge_streaming;
use crate::{
    Contribution, ContributorStats, EvalRecord, Ledger, LedgerError, LedgerStatus, MergeConfig,
    MergeError, MergeReport, PayloadFile, RoundExtras, ServerState, UpdateInfo,
};

/// Why an HQ operation failed. Nothing was committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HqError {
    /// A bundle did not verify.
    #[error("{}: {source}", ferry_bundle::escape_path(.path))]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// A revocation list was refused (nothing stored).
    #[error("{name}: {source}")]
    Revocation {
        /// The file (escaped).
        name: String,
        /// Why.
        #[source]
        source: RevocationError,
    },
    /// A file given as an update is a global.
    #[error("{}: this is a global bundle, not a site update", ferry_bundle::escape_path(.0))]
    NotAnUpdate(PathBuf),
    /// Fewer updates than `--min-sites`.
    #[error("only {got} update(s) given, but a merge needs at least {min} (--min-sites); wait for the other sites' updates, or pass --min-sites {got} to merge without them")]
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
    #[error("{}: HQ state is damaged ({why}); restore the state directory from backup", ferry_bundle::escape_path(.path))]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A stored global is encrypted to keys HQ does not hold: HQ's key changed and the old one was not retired.
    #[error("{}: HQ's stored global is encrypted to keys it cannot open now ({why}); if HQ's key changed, run `ferry-server retire-key --state <STATE> --key <OLD KEY>` first", ferry_bundle::escape_path(.path))]
    StoreLocked {
        /// The stored global.
        path: PathBuf,
        /// The reader's words.
        why: String,
    },
    /// The step HQ runs on the merged model before sealing it ([`Refiner`]: distillation, recalibration)
    /// failed or returned a different model.
    #[error("after the merge, {what}: {why}; nothing written, the ledger is unchanged")]
    Refine {
        /// The step (its description).
        what: String,
        /// Why.
        why: String,
    },
    /// The quality gate could not evaluate a global (issue 16).
    #[error("the quality gate could not evaluate {what}: {why}; nothing written, the ledger is unchanged")]
    Eval {
        /// Which global ("the current global (round 3)", "the merged global").
        what: String,
        /// Why.
        why: String,
    },
    /// The merged global scores below the current one or below `--min-accuracy` (issue 16).
    #[error("refused: the merged global reads {:.2}% of {} exactly, below {why}; nothing written, the ledger is unchanged (look at the updates with `ferry-server diff`, merge without the suspect one, or lower --min-accuracy)", 100.0 * .accuracy, ferry_bundle::escape(.data))]
    BelowGate {
        /// The merged global's accuracy.
        accuracy: f64,
        /// The data spec.
        data: String,
        /// What it fell below, in words.
        why: String,
    },
    /// The current global's recipient list does not give back the keys to encrypt the next global to.
    #[error(
        "the current global's recipients cannot be reused ({0}); give the keys with --encrypt-to"
    )]
    Recipients(String),
    /// `republish --from-round` names a round the ledger cannot re-issue.
    #[error("cannot republish round {from}: {why}")]
    Republish {
        /// The round asked for.
        from: u64,
        /// Why not.
        why: String,
    },
    /// Writing the new global to the output failed after the round was committed.
    #[error("round {round} is committed in the ledger, but writing it to {} failed ({source}); run `ferry-server emit --state ... --out ...` to write it again", ferry_bundle::escape_path(.out))]
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

/// Default [`RoundConfig::min_sites`].
pub const DEFAULT_MIN_SITES: usize = 2;

/// Default [`RoundConfig::max_sample_ratio`]: a site may declare up to 10 times the lower median of the counts
/// (the field study's sites held about the same number of images each).
pub const DEFAULT_MAX_SAMPLE_RATIO: u64 = 10;

/// A sample count the merge did not use as signed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CappedSamples {
    /// The site.
    pub site: String,
    /// The count it signed.
    pub declared: u64,
    /// The count the merge weighted it by.
    pub used: u64,
    /// Which bound applied: `--max-samples` or `--max-sample-ratio`.
    pub bound: &'static str,
}

/// Options of one merge round.
#[derive(Debug, Clone)]
pub struct RoundConfig {
    /// Strategy and per-tensor settings.
    pub merge: MergeConfig,
    /// Refuse fewer updates than this (default 2: a courier who drops the other sites' files must not produce
    /// a one-site "merge" unnoticed).
    pub min_sites: usize,
    /// Cap each update's signed sample count at this (flagged in the report).
    pub max_samples: Option<u64>,
    /// Cap a sample count above this many times the lower median of all the updates' counts (0: off). One site,
    /// or a stolen site key, cannot then take the merge over by signing a huge count.
    pub max_sample_ratio: u64,
    /// zstd level of the output.
    pub level: i32,
    /// How long the new global stays fresh, in seconds (its signed `expires` is its creation time plus this).
    pub valid_for: u64,
    /// Whom the new global's payload is encrypted to (the member sites; issue 15 §5). HQ's own key is added,
    /// so HQ can read its stored global in the next round. Default: the same keys as the current global.
    pub encrypt_to: EncryptTo,
}

/// Whom a new global (`merge`, `republish`) is encrypted to (issue 15 §5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EncryptTo {
    /// The keys the current global is encrypted to, read from its signed manifest in HQ's store; in the clear if
    /// it is. An encrypted federation so stays encrypted without the operator retyping the recipients.
    #[default]
    Same,
    /// These keys (HQ's own is added). Empty: in the clear.
    Keys(Vec<ferry_bundle::PublicKey>),
    /// In the clear, even when the current global is encrypted.
    Clear,
}

impl EncryptTo {
    /// The keys for a global based on `current` (HQ's own key not yet added).
    pub fn keys_after(
        &self,
        current: &ferry_bundle::Manifest,
    ) -> Result<Vec<ferry_bundle::PublicKey>, HqError> {
        match self {
            EncryptTo::Keys(k) => Ok(k.clone()),
            EncryptTo::Clear => Ok(Vec::new()),
            EncryptTo::Same => recipients_of(current),
        }
    }
}

/// The keys a global's payload is encrypted to, back from its manifest's recipient list (empty: in the clear).
pub fn recipients_of(
    manifest: &ferry_bundle::Manifest,
) -> Result<Vec<ferry_bundle::PublicKey>, HqError> {
    let Some(enc) = &manifest.encryption else {
        return Ok(Vec::new());
    };
    enc.recipients
        .iter()
        .map(|r| {
            ferry_bundle::PublicKey::from_recipient(r.role, &r.id, &r.key_id, &r.recipient)
                .map_err(|e| HqError::Recipients(e.to_string()))
        })
        .collect()
}

impl Default for RoundConfig {
    fn default() -> Self {
        RoundConfig {
            merge: MergeConfig::default(),
            min_sites: DEFAULT_MIN_SITES,
            max_samples: None,
            max_sample_ratio: DEFAULT_MAX_SAMPLE_RATIO,
            level: 3,
            valid_for: ferry_bundle::manifest::DEFAULT_GLOBAL_VALIDITY,
            encrypt_to: EncryptTo::Same,
        }
    }
}

/// A step HQ runs on the merged model before it is sealed (issue 14): ensemble distillation, BatchNorm
/// re-estimation, or choosing between the merge and the site models on HQ's own data. ferry-merge knows no ML,
/// so the step is a callback that the caller (`ferry-server merge --distill/--recalibrate/--select`, `ferry-lab`)
/// builds from `ferry-train`. It gets a [`RefineInput`] (the architecture the base global names, the merged model
/// and every verified update, each as plain safetensors bytes in memory) and returns the [`Refined`] model, which
/// must have exactly the merged model's tensors (names, dtypes, shapes) and finite values. Its description, and
/// the note it returns, are appended to the strategy the global and the ledger record.
pub struct Refiner<'a> {
    /// What the step does, e.g. `distill epochs=2 lr=0.0005 data=idx:/data:test`.
    pub describe: String,
    /// The step, or a one-line error.
    pub run: RefineFn<'a>,
}

/// What a [`Refiner`] is given.
#[derive(Debug, Clone, Copy)]
pub struct RefineInput<'a> {
    /// The architecture the base global names.
    pub arch: Option<&'a str>,
    /// The merged model (safetensors).
    pub merged: &'a [u8],
    /// Every verified update's model (safetensors, the merged model's tensors only), in the merge's order.
    pub updates: &'a [SiteModel],
}

/// One verified update's model, as a [`Refiner`] sees it.
#[derive(Debug, Clone)]
pub struct SiteModel {
    /// The site that signed it.
    pub site: String,
    /// Its model (safetensors).
    pub model: Vec<u8>,
}

/// What a [`Refiner`] returns.
#[derive(Debug, Clone)]
pub struct Refined {
    /// The model to seal (safetensors, the merged model's tensors).
    pub model: Vec<u8>,
    /// What the step found, recorded after its description (e.g. which model a selection kept).
    pub note: Option<String>,
}

/// The function of a [`Refiner`].
pub type RefineFn<'a> = Box<dyn FnMut(RefineInput<'_>) -> Result<Refined, String> + 'a>;

impl std::fmt::Debug for Refiner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refiner")
            .field("describe", &self.describe)
            .finish_non_exhaustive()
    }
}

/// The tensors of `layout`, read from `source`, as a safetensors file in memory.
fn safetensors_of(
    layout: &[TensorMeta],
    source: &mut dyn crate::TensorSource,
) -> Result<Vec<u8>, MergeError> {
    let mut owned = Vec::with_capacity(layout.len());
    for meta in layout {
        owned.push((meta.name.as_str(), source.read(&meta.name)?));
    }
    encode_safetensors(&owned)
}

fn encode_safetensors(tensors: &[(&str, crate::OwnedTensor)]) -> Result<Vec<u8>, MergeError> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
            .map_err(|e| MergeError::BadLayout(format!("{name}: {e}")))?;
        views.push((*name, view));
    }
    safetensors::serialize(views, None).map_err(|e| MergeError::BadLayout(e.to_string()))
}

/// Run `refiner` on the merged tensors and return the refined ones in `layout` order, checked.
fn refine(
    refiner: &mut Refiner<'_>,
    arch: Option<&str>,
    layout: &[TensorMeta],
    merged: Vec<(TensorMeta, Vec<u8>)>,
    updates: &[SiteModel],
) -> Result<(Vec<Vec<u8>>, Option<String>), HqError> {
    let bad = |why: String| HqError::Refine {
        what: refiner.describe.clone(),
        why,
    };
    let owned: Vec<(&str, crate::OwnedTensor)> = merged
        .iter()
        .map(|(m, d)| {
            (
                m.name.as_str(),
                crate::OwnedTensor {
                    dtype: m.dtype,
                    shape: m.shape.clone(),
                    data: d.clone(),
                },
            )
        })
        .collect();
    let merged_bytes = encode_safetensors(&owned)?;
    drop(owned);
    let refined = (refiner.run)(RefineInput {
        arch,
        merged: &merged_bytes,
        updates,
    })
    .map_err(&bad)?;
    let payload = Payload::from_safetensors_vec(refined.model).map_err(|e| bad(e.to_string()))?;
    if payload.metas() != layout {
        return Err(bad(
            "the refined model's tensors differ from the merged model's".into(),
        ));
    }
    let mut out = Vec::with_capacity(layout.len());
    for t in payload.tensors() {
        let float = matches!(
            t.dtype,
            crate::Dtype::F64 | crate::Dtype::F32 | crate::Dtype::F16 | crate::Dtype::BF16
        );
        if float && !crate::tensor::for_each_f64(t.dtype, t.data, |_, x| x.is_finite()) {
            return Err(bad(format!("tensor {} is not finite", t.name)));
        }
        out.push(t.data.to_vec());
    }
    Ok((out, refined.note))
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
    /// Sample counts capped by `max_samples` or `max_sample_ratio`.
    pub capped: Vec<CappedSamples>,
    /// The revocation list the global names, written next to it in the output dir.
    pub revocations: Option<PathBuf>,
}

fn globals_path(dir: &Path, hash: &str) -> PathBuf {
    dir.join("globals").join(format!("{hash}.ferry"))
}

fn server_state_path(dir: &Path, global: &str) -> PathBuf {
    dir.join("server").join(format!("{global}.safetensors"))
}

fn revocations_dir(dir: &Path) -> PathBuf {
    dir.join("revocations")
}

/// Every revocation list stored in HQ's state, sorted by serial.
pub fn stored_revocations(dir: &Path) -> Result<Vec<Verified>, HqError> {
    revocation::read_stored_dir(&revocations_dir(dir))
        .map_err(|(path, why)| HqError::Corrupt { path, why })
}

/// Verify revocation lists given to a command (`--revocations`: file name, bytes) against `keyring` and the
/// federation, and apply them and the stored ones to a copy of `keyring`. Returns that keyring and the lists
/// not stored yet. Nothing is written.
fn prepare_revocations(
    dir: &Path,
    federation: &str,
    keyring: &Keyring,
    given: &[(String, Vec<u8>)],
) -> Result<(Keyring, Vec<Verified>, Vec<Verified>), HqError> {
    let stored = stored_revocations(dir)?;
    let mut ring = keyring.clone();
    for v in &stored {
        v.list.apply(&mut ring);
    }
    let mut new: Vec<Verified> = Vec::new();
    for (name, bytes) in given {
        let err = |source| HqError::Revocation {
            name: ferry_bundle::escape(name),
            source,
        };
        let v = revocation::verify_file(bytes.clone(), &ring).map_err(err)?;
        v.list.check_federation(federation).map_err(err)?;
        if !stored.iter().chain(&new).any(|s| s.sha256 == v.sha256) {
            new.push(v);
        }
    }
    for v in &new {
        v.list.apply(&mut ring);
    }
    Ok((ring, stored, new))
}

/// Store a revocation list HQ just signed (`ferry-server revoke --state`): it must be of this federation and
/// verify under HQ's key. From then on it applies to every merge and the next global names it.
pub fn store_revocation(dir: &Path, key: &SecretKey, bytes: &[u8]) -> Result<Verified, HqError> {
    let ledger = Ledger::load(dir)?;
    let name = "the new revocation list".to_string();
    let (_, _, new) = prepare_revocations(
        dir,
        &ledger.data().federation,
        &hq_ring(key)?,
        &[(name, bytes.to_vec())],
    )?;
    let v = match new.into_iter().next() {
        Some(v) => v,
        None => revocation::verify_file(bytes.to_vec(), &hq_ring(key)?).map_err(|source| {
            HqError::Revocation {
                name: "the new revocation list".into(),
                source,
            }
        })?,
    };
    revocation::store(&revocations_dir(dir), &v)?;
    Ok(v)
}

/// Write the newest stored revocation list next to a global in `out` (`revocations-<serial>.ferry-rev`), so
/// the courier carries it to the sites; a file already there with the same bytes is kept.
fn write_newest_revocation(dir: &Path, out: &Path) -> Result<Option<PathBuf>, HqError> {
    let stored = stored_revocations(dir)?;
    let Some(v) = revocation::newest(&stored) else {
        return Ok(None);
    };
    let path = out.join(format!(
        "revocations-{}.{}",
        v.list.serial,
        revocation::EXTENSION
    ));
    fsutil::write_new_or_same(&path, &v.bytes)?;
    Ok(Some(path))
}

fn hq_ring(key: &SecretKey) -> Result<Keyring, HqError> {
    let mut ring = Keyring::new();
    ring.add(key.public()).map_err(SealError::from)?;
    ring.add_identity(key);
    Ok(ring)
}

/// The keys HQ's stored globals verify under: `key` and every HQ key the ledger recorded as a signer, so that
/// after a rotation the new key reads what the old one signed. The ledger pins each stored global's hash, so
/// this widens nothing an attacker without write access to HQ's state could use. Retired keys' decryption
/// identities ([`retire_key`]) open what was encrypted to them.
fn store_ring(dir: &Path, data: &crate::LedgerData, key: &SecretKey) -> Result<Keyring, HqError> {
    let mut ring = hq_ring(key)?;
    for k in data.signers()? {
        if k != key.public() {
            ring.add(k).map_err(SealError::from)?;
        }
    }
    add_retired(dir, &mut ring)?;
    Ok(ring)
}

fn retired_dir(dir: &Path) -> PathBuf {
    dir.join("retired")
}

/// Add the decryption identity of every retired HQ key in HQ's state (`retired/<key id>.age`) to `ring`.
fn add_retired(dir: &Path, ring: &mut Keyring) -> Result<(), HqError> {
    let retired = retired_dir(dir);
    let entries = match std::fs::read_dir(&retired) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(FsError::Io {
                path: retired,
                source: e,
            }
            .into())
        }
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| FsError::Io {
                path: retired.clone(),
                source: e,
            })?
            .path();
        if path.extension().is_some_and(|x| x == "age") {
            paths.push(path);
        }
    }
    paths.sort();
    for path in paths {
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let id = format!("retired HQ key {}", ferry_bundle::escape(&stem));
        let d = ferry_bundle::keys::DecryptionKey::read_identity_file(&path, &id).map_err(|e| {
            HqError::Corrupt {
                path: path.clone(),
                why: e.to_string(),
            }
        })?;
        ring.add_decryption_key(d);
    }
    Ok(())
}

/// What [`retire_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    /// The decryption identity kept in HQ's state.
    pub identity: PathBuf,
    /// Whether the ledger learnt the key as a signer of stored globals (false: it already knew it).
    pub newly_recorded: bool,
}

/// Keep a retired HQ key's power to *read* in HQ's state, after a rotation (`ferry-server retire-key`): its age
/// decryption identity goes to `retired/<key id>.age` (mode 0600), so merges and republishes still open updates
/// and stored globals encrypted to it, and the ledger records it as a signer of stored globals. Its power to
/// sign is not kept: the identity cannot sign, and the key file itself can then be destroyed.
pub fn retire_key(dir: &Path, old: &SecretKey) -> Result<Retired, HqError> {
    if old.role() != ferry_bundle::Role::Hq {
        return Err(HqError::NotHqKey(old.id().to_string()));
    }
    let mut ledger = Ledger::load(dir)?;
    let public = old.public();
    fsutil::ensure_dir(&retired_dir(dir))?;
    let identity = retired_dir(dir).join(format!("{}.age", public.key_id_hex()));
    let text = old.age_identity_file_text();
    if identity.exists() {
        // Same key, same derived identity: a second retire-key is a no-op, never a second file.
        fsutil::write_new_or_same(&identity, text.as_bytes())?;
    } else {
        fsutil::write_new_verified_private(&identity, text.as_bytes())?;
    }
    let newly_recorded = ledger.record_signer(&public)?;
    Ok(Retired {
        identity,
        newly_recorded,
    })
}

/// The keys a global is encrypted to: the caller's (the member sites), plus HQ's own key, so HQ can read the
/// global it stores (issue 15 §5). None: in the clear.
fn with_hq(
    mut encrypt_to: Vec<ferry_bundle::PublicKey>,
    key: &SecretKey,
) -> Vec<ferry_bundle::PublicKey> {
    if encrypt_to.is_empty() {
        return encrypt_to;
    }
    // After a rotation the current global names the old HQ key: the next one goes to the key that signs now.
    encrypt_to.retain(|k| k.role != ferry_bundle::Role::Hq || *k == key.public());
    encrypt_to.push(key.public());
    encrypt_to
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
    let draft = Draft::initial(federation, arch.map(str::to_string));
    init_with(dir, key, payload, draft, out, level)
}

/// [`init`] from a round-0 draft the caller filled in (federation, architecture, expiry).
pub fn init_with(
    dir: &Path,
    key: &SecretKey,
    payload: &Payload,
    draft: Draft,
    out: &Path,
    level: i32,
) -> Result<(PathBuf, Sealed), HqError> {
    if key.role() != ferry_bundle::Role::Hq {
        return Err(HqError::NotHqKey(key.id().to_string()));
    }
    if dir.join(crate::LEDGER_FILE).exists() {
        return Err(LedgerError::Exists(dir.to_path_buf()).into());
    }
    let federation = draft.federation.clone();
    let arch = draft.arch.clone();
    let draft = Draft {
        encrypt_to: with_hq(draft.encrypt_to, key),
        ..draft
    };
    let sealed = ferry_bundle::seal(draft, payload, key, level)?;
    fsutil::ensure_dir(&dir.join("globals"))?;
    fsutil::write_new_or_same(&globals_path(dir, &sealed.hash), &sealed.bytes)?;
    Ledger::init(
        dir,
        &federation,
        arch.as_deref(),
        &sealed.manifest.model_fingerprint,
        &sealed.hash,
        &key.public(),
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
    let (bytes, bundle) = read_current(dir, &current.hash, &store_ring(dir, ledger.data(), key)?)?;
    let name = format!("global-r{}.ferry", bundle.manifest.round);
    fsutil::ensure_dir(out)?;
    let path = out.join(name);
    fsutil::write_new_verified(&path, &bytes)?;
    write_newest_revocation(dir, out)?;
    Ok(path)
}

/// A global from HQ's store, verified under `ring` ([`store_ring`]) and checked against the ledger's `hash`.
fn read_current(
    dir: &Path,
    hash: &str,
    ring: &Keyring,
) -> Result<(Vec<u8>, ferry_bundle::Bundle), HqError> {
    let path = globals_path(dir, hash);
    let bytes = fsutil::read_capped(&path, ferry_bundle::MAX_BUNDLE_BYTES)?;
    let bundle = ferry_bundle::open(&bytes, ring, &ferry_bundle::Limits::default())
        .map_err(|e| stored_global_error(&path, e))?;
    if bundle.hash != hash {
        return Err(HqError::Corrupt {
            path,
            why: "stored global does not match the ledger's hash".into(),
        });
    }
    Ok((bytes, bundle))
}

/// A stored global that does not open: locked to keys HQ no longer holds, or damaged.
fn stored_global_error(path: &Path, e: ferry_bundle::OpenError) -> HqError {
    use ferry_bundle::OpenError as E;
    match e {
        E::Encrypted(_) | E::NotARecipient { .. } => HqError::StoreLocked {
            path: path.to_path_buf(),
            why: e.to_string(),
        },
        e => HqError::Corrupt {
            path: path.to_path_buf(),
            why: e.to_string(),
        },
    }
}

/// Cap every sample count above `ratio` times the lower median of all the counts (no-op for `ratio` 0 or a
/// single update). The lower median, so that with two sites the smaller count is the reference.
fn cap_sample_ratio(infos: &mut [UpdateInfo], ratio: u64, capped: &mut Vec<CappedSamples>) {
    if ratio == 0 || infos.len() < 2 {
        return;
    }
    let mut counts: Vec<u64> = infos.iter().map(|u| u.samples).collect();
    counts.sort_unstable();
    let limit = counts[(counts.len() - 1) / 2].saturating_mul(ratio);
    for u in infos.iter_mut().filter(|u| u.samples > limit) {
        if let Some(c) = capped.iter_mut().find(|c| c.site == u.site) {
            c.used = limit;
            c.bound = "--max-sample-ratio";
        } else {
            capped.push(CappedSamples {
                site: u.site.clone(),
                declared: u.samples,
                used: limit,
                bound: "--max-sample-ratio",
            });
        }
        u.samples = limit;
    }
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

/// Merge update bundle files into the next global. Verifies every file against `keyring` (with every stored
/// revocation list and the `revocations` given — file name, bytes — applied) before anything is parsed,
/// refuses the batch on any problem (nothing written, ledger unchanged), and otherwise stores the given lists,
/// commits the round and writes `global-r<N+1>.ferry` (naming the newest list) and that list into `out`.
pub fn merge_round(
    dir: &Path,
    key: &SecretKey,
    keyring: &Keyring,
    revocations: &[(String, Vec<u8>)],
    files: &[PathBuf],
    config: &RoundConfig,
    out: &Path,
) -> Result<RoundOutcome, HqError> {
    merge_round_with(
        dir,
        key,
        keyring,
        revocations,
        files,
        config,
        out,
        None,
        None,
    )
}

/// The quality gate of `ferry-server merge --require-eval` (issue 16): before anything is stored, the merged
/// global and the current one are evaluated on HQ's own data, and the merge is refused when the merged global
/// scores below the current one or below `min_accuracy`. Both scores are recorded in the ledger with the round.
pub struct EvalGate<'a> {
    /// Refuse a merged global whose accuracy (0..1) is below this.
    pub min_accuracy: Option<f64>,
    /// Evaluate a verified global on HQ's data. ferry-merge knows no ML: the caller brings the evaluation
    /// (ferry-server's goes through ferry-train).
    pub evaluate: &'a mut dyn FnMut(&ferry_bundle::Bundle) -> Result<EvalRecord, String>,
}

impl std::fmt::Debug for EvalGate<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalGate")
            .field("min_accuracy", &self.min_accuracy)
            .finish_non_exhaustive()
    }
}

/// Apply `gate` to the sealed next global: evaluate it and the current one, refuse when it falls below.
/// Returns (the current global's evaluation, the next one's).
fn run_gate(
    gate: &mut EvalGate<'_>,
    dir: &Path,
    key: &SecretKey,
    store: &Keyring,
    current: &crate::CurrentGlobal,
    sealed: &Sealed,
) -> Result<(EvalRecord, EvalRecord), HqError> {
    let (_, cur) = read_current(dir, &current.hash, store)?;
    let next = ferry_bundle::open(
        &sealed.bytes,
        &hq_ring(key)?,
        &ferry_bundle::Limits::default(),
    )
    .map_err(|e| HqError::Eval {
        what: "the merged global".into(),
        why: e.to_string(),
    })?;
    let before = (gate.evaluate)(&cur).map_err(|why| HqError::Eval {
        what: format!("the current global (round {})", current.round),
        why,
    })?;
    let after = (gate.evaluate)(&next).map_err(|why| HqError::Eval {
        what: "the merged global".into(),
        why,
    })?;
    let below = |why: String| HqError::BelowGate {
        accuracy: after.accuracy,
        data: after.data.clone(),
        why,
    };
    if after.accuracy < before.accuracy {
        return Err(below(format!(
            "the current global's (round {}) {:.2}%",
            current.round,
            100.0 * before.accuracy
        )));
    }
    if let Some(min) = gate.min_accuracy.filter(|m| after.accuracy < *m) {
        return Err(below(format!("--min-accuracy {min}")));
    }
    Ok((before, after))
}

/// Where [`merge_round_with`] sends the merged tensors: straight into the next global, or held for a refiner.
enum Sink<'r, 'f, 'k> {
    Stream(Box<BundleWriter<'k>>),
    Hold(Vec<(TensorMeta, Vec<u8>)>, &'r mut Refiner<'f>),
}

/// [`merge_round`] with HQ's optional steps. `refiner` runs on the merged model before it is sealed (issue 14:
/// distillation or recalibration at HQ); without one the global streams to the bundle as the merge computes it,
/// with one the merged model and the updates are held in memory (fine for the models ferry trains). `gate`
/// ([`EvalGate`]) runs after the next global is sealed and before anything is stored: a refusal leaves the state
/// and the ledger as they were.
#[allow(clippy::too_many_arguments)]
pub fn merge_round_with(
    dir: &Path,
    key: &SecretKey,
    keyring: &Keyring,
    revocations: &[(String, Vec<u8>)],
    files: &[PathBuf],
    config: &RoundConfig,
    out: &Path,
    refiner: Option<&mut Refiner<'_>>,
    gate: Option<&mut EvalGate<'_>>,
) -> Result<RoundOutcome, HqError> {
    if key.role() != ferry_bundle::Role::Hq {
        return Err(HqError::NotHqKey(key.id().to_string()));
    }
    let mut ledger = Ledger::load(dir)?;
    let (mut ring, stored_lists, new_lists) =
        prepare_revocations(dir, &ledger.data().federation, keyring, revocations)?;
    let store = store_ring(dir, ledger.data(), key)?;
    // HQ's key opens updates encrypted to it (issue 15 §5), and so do retired HQ keys (updates a site encrypted
    // before it learnt of a rotation): the store's identities, read from HQ's state once.
    for identity in store.identities() {
        ring.add_decryption_key(identity.clone());
    }
    let keyring = &ring;
    if files.len() < config.min_sites {
        return Err(HqError::TooFewSites {
            got: files.len(),
            min: config.min_sites,
        });
    }
    let current = ledger.current().clone();

    remove_stale_spools(dir);
    let spool = tempfile::Builder::new()
        .prefix(".spool-")
        .tempdir_in(dir)
        .map_err(|e| FsError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
    // The base global from HQ's own store, verified as it is decompressed into the spool.
    let base_path = globals_path(dir, &current.hash);
    let (mut base_source, base) = PayloadFile::verify(spool.path(), "base", &base_path, &store)
        .map_err(|e| stored_global_error(&base_path, e))?;
    if base.hash != current.hash {
        return Err(HqError::Corrupt {
            path: base_path,
            why: "stored global does not match the ledger's hash".into(),
        });
    }
    let mut infos = Vec::new();
    let mut sources = Vec::new();
    let mut capped = Vec::new();
    for (i, path) in files.iter().enumerate() {
        // Each update streams once from the stick into a scratch file, which the merge reads only if the
        // whole bundle verified.
        let (source, bundle) = PayloadFile::verify(spool.path(), &format!("u{i}"), path, keyring)
            .map_err(|source| HqError::Open {
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
                capped.push(CappedSamples {
                    site: site.id.clone(),
                    declared: site.samples,
                    used: max,
                    bound: "--max-samples",
                });
                samples = max;
            }
        }
        let info = UpdateInfo {
            site: site.id.clone(),
            bundle: bundle.hash.clone(),
            base: m.base.clone().unwrap_or_default(),
            round: m.round,
            federation: m.federation.clone(),
            // The model's layout: Fisher tensors (issue 14) ride along but are not part of the model.
            fingerprint: ferry_bundle::fisher::model_fingerprint(&m.tensor_metas()),
            samples,
        };
        // Check as we go, so a stale or foreign bundle is refused before the next one is even read.
        ledger.check_update(&info)?;
        infos.push(info);
        sources.push(source);
    }
    ledger.check_batch(&infos)?;
    cap_sample_ratio(&mut infos, config.max_sample_ratio, &mut capped);

    let layout: Vec<TensorMeta> = base.metas();
    let mut server = read_server_state(dir, &current.hash)?;

    let mut contributors: Vec<_> = infos.iter().map(UpdateInfo::contributor).collect();
    contributors.sort_by(|a, b| a.bundle.cmp(&b.bundle));
    let all_lists: Vec<Verified> = stored_lists.into_iter().chain(new_lists.clone()).collect();
    let created = ferry_bundle::unix_now();
    let strategy = config.merge.describe();
    let encrypt_to = with_hq(config.encrypt_to.keys_after(&base.manifest)?, key);
    let draft = |strategy: &str| Draft {
        kind: BundleKind::Global,
        federation: base.manifest.federation.clone(),
        arch: base.manifest.arch.clone(),
        round: current.round + 1,
        base: Some(current.hash.clone()),
        site: None,
        contributors: contributors.clone(),
        strategy: Some(strategy.to_string()),
        revocations: revocation::newest(&all_lists).map(|v| RevocationRef {
            serial: v.list.serial,
            sha256: v.sha256.clone(),
        }),
        created,
        expires: Some(created.saturating_add(config.valid_for)),
        encrypt_to: encrypt_to.clone(),
    };
    // Without a refiner the next global is compressed and hashed as the merge computes it, slice by slice: it
    // is never held uncompressed. With one, the merged model is held and the global sealed after the refiner,
    // whose note (what a selection kept) the strategy records.
    let mut sink = match refiner {
        Some(r) => Sink::Hold(Vec::new(), r),
        None => Sink::Stream(Box::new(BundleWriter::new(
            draft(&strategy),
            layout.clone(),
            key,
            config.level,
        )?)),
    };
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
    let report = merge_streaming(
        &layout,
        &mut base_source,
        &mut contributions,
        &config.merge,
        &mut server,
        |meta, data| match &mut sink {
            Sink::Hold(held, _) => {
                match held.last_mut() {
                    Some((m, d)) if m.name == meta.name => d.extend_from_slice(&data),
                    _ => held.push((meta.clone(), data)),
                }
                Ok(())
            }
            Sink::Stream(writer) => writer.write(data).map_err(|e| MergeError::Output {
                tensor: meta.name.clone(),
                reason: e.to_string(),
            }),
        },
    )?;
    let (writer, describe) = match sink {
        Sink::Stream(writer) => (writer, strategy),
        Sink::Hold(held, r) => {
            let mut updates = Vec::with_capacity(contributions.len());
            for c in contributions.iter_mut() {
                updates.push(SiteModel {
                    site: c.site.clone(),
                    model: safetensors_of(&layout, &mut *c.source)?,
                });
            }
            let (refined, note) =
                refine(r, base.manifest.arch.as_deref(), &layout, held, &updates)?;
            let describe = match note {
                Some(note) => format!("{strategy} then {} ({note})", r.describe),
                None => format!("{strategy} then {}", r.describe),
            };
            let mut writer = Box::new(BundleWriter::new(
                draft(&describe),
                layout.clone(),
                key,
                config.level,
            )?);
            for (meta, data) in layout.iter().zip(refined) {
                writer.write(data).map_err(|e| MergeError::Output {
                    tensor: meta.name.clone(),
                    reason: e.to_string(),
                })?;
            }
            (writer, describe)
        }
    };
    drop(contributions);
    drop(sources);
    drop(base_source);
    let sealed = writer.finish()?;
    let mut extras = RoundExtras {
        time: created,
        stats: report
            .contributions
            .iter()
            .map(|c| ContributorStats {
                bundle: c.bundle.clone(),
                site: c.site.clone(),
                weight: c.weight,
                distance: c.distance,
                clipped: c.clipped,
            })
            .collect(),
        signer: Some(key.public()),
        ..RoundExtras::default()
    };
    if let Some(gate) = gate {
        let (before, after) = run_gate(gate, dir, key, &store, &current, &sealed)?;
        extras.base_evals = vec![before];
        extras.evals = vec![after];
    }

    // Store, then commit. Until `record_round` renames the ledger, the federation is on the old round.
    for v in &new_lists {
        revocation::store(&revocations_dir(dir), v)?;
    }
    fsutil::ensure_dir(&dir.join("globals"))?;
    fsutil::write_new_or_same(&globals_path(dir, &sealed.hash), &sealed.bytes)?;
    if config.merge.strategy.is_stateful() {
        fsutil::ensure_dir(&dir.join("server"))?;
        fsutil::write_replace(
            &server_state_path(dir, &sealed.hash),
            &server.to_bytes(&sealed.hash)?,
        )?;
    }
    let round = ledger.record_round_with(&sealed.hash, &describe, &contributors, extras)?;
    drop(spool);
    let path = sealed
        .write_to_dir(out)
        .map_err(|source| HqError::EmitAfterCommit {
            round,
            out: out.to_path_buf(),
            source,
        })?;
    let revocations = write_newest_revocation(dir, out)?;
    Ok(RoundOutcome {
        path,
        sealed,
        report,
        capped,
        revocations,
    })
}

/// The verified global of round `n` from HQ's store.
pub fn global_of_round(
    dir: &Path,
    key: &SecretKey,
    n: u64,
) -> Result<ferry_bundle::Bundle, HqError> {
    let data = Ledger::peek(dir)?;
    let Some(entry) = data.history.iter().find(|r| r.round == n) else {
        return Err(HqError::Republish {
            from: n,
            why: format!("the ledger's rounds are 0 to {}", data.current.round),
        });
    };
    Ok(read_current(dir, &entry.global, &store_ring(dir, &data, key)?)?.1)
}

/// Record an evaluation of a global in the ledger, if HQ produced it (`ferry-server eval --state`). Returns
/// its round, or `None` when the ledger does not hold that global (nothing written).
pub fn record_eval(dir: &Path, global: &str, eval: EvalRecord) -> Result<Option<u64>, HqError> {
    let mut ledger = Ledger::load(dir)?;
    Ok(ledger.record_eval(global, eval)?)
}

/// Re-sign the weights of round `from`'s global as the next round (`ferry-server republish`): HQ's rollback
/// of a bad global, since sites refuse an older round. The new global is based on the current one (so sites
/// accept it as the next round), lists no contributors, names the newest revocation list, and is recorded in
/// the ledger with `republished_from`; it is written to `out` like a merged one. Any server-optimizer state
/// starts afresh from it.
pub fn republish(
    dir: &Path,
    key: &SecretKey,
    from: u64,
    level: i32,
    valid_for: u64,
    encrypt_to: &EncryptTo,
    out: &Path,
) -> Result<(PathBuf, Sealed), HqError> {
    if key.role() != ferry_bundle::Role::Hq {
        return Err(HqError::NotHqKey(key.id().to_string()));
    }
    let mut ledger = Ledger::load(dir)?;
    let current = ledger.current().clone();
    let Some(entry) = ledger.round(from).cloned() else {
        return Err(HqError::Republish {
            from,
            why: format!("the ledger's rounds are 0 to {}", current.round),
        });
    };
    if from == current.round {
        return Err(HqError::Republish {
            from,
            why: "it is the current global; `ferry-server emit` writes it again".into(),
        });
    }
    let store = store_ring(dir, ledger.data(), key)?;
    let (_, old) = read_current(dir, &entry.global, &store)?;
    let (_, cur) = read_current(dir, &current.hash, &store)?;
    let payload = Payload::from_tensors(&old.tensors().collect::<Vec<_>>())?;
    let stored = stored_revocations(dir)?;
    let created = ferry_bundle::unix_now();
    let draft = Draft {
        kind: BundleKind::Global,
        federation: cur.manifest.federation.clone(),
        arch: cur.manifest.arch.clone(),
        round: current.round + 1,
        base: Some(current.hash.clone()),
        site: None,
        contributors: Vec::new(),
        strategy: Some(format!("republish r{from}")),
        revocations: revocation::newest(&stored).map(|v| RevocationRef {
            serial: v.list.serial,
            sha256: v.sha256.clone(),
        }),
        created,
        expires: Some(created.saturating_add(valid_for)),
        // By default to the keys the current global is encrypted to: a rollback of an encrypted federation
        // must not put the weights on the stick in the clear (issue 15 §5).
        encrypt_to: with_hq(encrypt_to.keys_after(&cur.manifest)?, key),
    };
    let sealed = ferry_bundle::seal(draft, &payload, key, level)?;
    fsutil::ensure_dir(&dir.join("globals"))?;
    fsutil::write_new_or_same(&globals_path(dir, &sealed.hash), &sealed.bytes)?;
    let round = ledger.record_republish(&sealed.hash, from, created, &key.public())?;
    let path = sealed
        .write_to_dir(out)
        .map_err(|source| HqError::EmitAfterCommit {
            round,
            out: out.to_path_buf(),
            source,
        })?;
    write_newest_revocation(dir, out)?;
    Ok((path, sealed))
}
