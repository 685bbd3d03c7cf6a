//! Errors of the site's operations. Every variant means nothing in the state directory was changed.

use std::path::PathBuf;

use ferry_bundle::fsutil::{FsError, LockError};
use ferry_bundle::keylist::KeyListError;
use ferry_bundle::revocation::RevocationError;
use ferry_bundle::{KeyError, SealError};
use ferry_train::TrainError;

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
    /// The folder is not a site state directory (yet).
    #[error("{} holds no site state: import a global into it first", ferry_bundle::escape_path(.0))]
    NoState(PathBuf),
    /// A lock guard of another state directory was passed.
    #[error("internal error: the lock held is for {}, not for this state directory", ferry_bundle::escape_path(.0))]
    WrongLock(PathBuf),
    /// A state file is damaged.
    #[error("{}: site state is damaged ({why}); restore it from a backup or re-import the current global into a fresh --state directory", ferry_bundle::escape_path(.path))]
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
        /// Bundle's federation (escaped).
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
    /// A first import needs the federation to pin (issue 15 §3).
    #[error("this is the site's first global: name the federation it must belong to with --federation (or enrol the site), so that a global of another federation cannot be slipped in first")]
    NeedsFederation,
    /// A first import needs an HQ key or a root to pin.
    #[error("this is the site's first global: give HQ's public key with --trust, or the federation's root key with --root and the HQ key list with --hq-keys")]
    NeedsHqKey,
    /// `--federation` names another federation than the one pinned.
    #[error("this site is pinned to federation {pinned:?}, not {given:?}")]
    PinnedFederation {
        /// The pinned federation.
        pinned: String,
        /// What was given (escaped).
        given: String,
    },
    /// An HQ key that the pin does not cover was offered (issue 15 §4).
    #[error("HQ key {key} ({id}) is not one this site pinned ({pinned}); a new HQ key is accepted only under the federation root's signature (--hq-keys, with a root pinned by --root)")]
    UnpinnedHqKey {
        /// Key id offered.
        key: String,
        /// Its id field.
        id: String,
        /// Key ids pinned.
        pinned: String,
    },
    /// `--root` names another root than the pinned one.
    #[error("this site pins root key {pinned}; refusing root key {given}")]
    RootMismatch {
        /// Pinned root key id.
        pinned: String,
        /// Given root key id.
        given: String,
    },
    /// A root cannot be adopted without continuity.
    #[error("refusing root key {root}: its HQ key list does not name the HQ key this site pinned ({pinned})")]
    RootWithoutContinuity {
        /// The root's key id.
        root: String,
        /// Pinned HQ key ids.
        pinned: String,
    },
    /// `export --encrypt` on a site that has pinned no HQ key yet (issue 15 §5).
    #[error("this site has pinned no HQ key yet (enrolment or the first import pins one): give HQ's key with --encrypt-to hq.pub")]
    NoPinnedHqKey,
    /// A root is pinned but no HQ key list was ever given.
    #[error("this site pins a root key but holds no list of HQ keys signed by it: give one with --hq-keys")]
    NeedsHqKeyList,
    /// An invalid pin was to be written.
    #[error("invalid pin: {0}")]
    InvalidPin(String),
    /// A key file problem.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A revocation list was refused.
    #[error("{source_name}: {source}")]
    Revocation {
        /// The file (escaped).
        source_name: String,
        /// Why.
        #[source]
        source: RevocationError,
    },
    /// An HQ key list was refused.
    #[error("{source_name}: {source}")]
    KeyList {
        /// The file (escaped).
        source_name: String,
        /// Why.
        #[source]
        source: KeyListError,
    },
    /// The global names a revocation list the site does not hold (issue 15 §2).
    #[error("this global requires revocation list {serial} (sha256 {hash}), which this site does not hold; import again with --revocations naming that list (it travels with the global)")]
    MissingRevocationList {
        /// The list's serial.
        serial: u64,
        /// Its hash (short).
        hash: String,
    },
    /// Round current + 1 whose base is not the global the site holds: a fork (issue 15 §3).
    #[error("refusing fork: this global is round {found} but is based on {base}, not on the round-{current} global this site holds ({current_hash})")]
    Fork {
        /// Round held.
        current: u64,
        /// Hash held (short).
        current_hash: String,
        /// Round offered.
        found: u64,
        /// The offered global's base (short).
        base: String,
    },
    /// Something signed has expired and the site refuses expired files (`--refuse-expired`).
    #[error("{0} (refused because of --refuse-expired; get a fresh one from HQ)")]
    Expired(String),
    /// Nothing has been imported yet.
    #[error("no global imported yet in {}: import one first", ferry_bundle::escape_path(.0))]
    NoGlobal(PathBuf),
    /// No local model exists.
    #[error("no trained local model in {}: train one first", ferry_bundle::escape_path(.0))]
    NoLocal(PathBuf),
    /// The local model was trained from an older global.
    #[error("the local model was trained from round {trained_round}, but the site now holds round {current_round}: train again")]
    StaleLocal {
        /// Round it was trained from.
        trained_round: u64,
        /// Round held now.
        current_round: u64,
    },
    /// The current global carries weights ferry cannot train (no architecture).
    #[error("this global carries foreign weights (no architecture): ferry cannot train it; import and re-pack only")]
    ForeignWeights,
    /// No recalibrated model exists for the current global.
    #[error("no recalibrated model for the current global: recalibrate first")]
    NoDeployed,
    /// A training state file (checkpoint, optimizer state, deployed model) cannot be used.
    #[error("{}: {detail}; delete the file: the next training or recalibration rebuilds it", ferry_bundle::escape_path(.path))]
    TrainingState {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Training, evaluation or recalibration failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// No global in a folder could be imported.
    #[error("no global in {dir} can be imported: {why}")]
    NoUsableGlobal {
        /// The folder (escaped).
        dir: String,
        /// Each file and why (escaped).
        why: String,
    },
    /// `ferry.toml` could not be read.
    #[error("{}: {why}", ferry_bundle::escape_path(.path))]
    Settings {
        /// The file.
        path: PathBuf,
        /// What is wrong (escaped).
        why: String,
    },
    /// The enrolment kit could not be read or verified.
    #[error(transparent)]
    Kit(#[from] ferry_bundle::kit::KitError),
    /// The state directory already belongs to a site.
    #[error("{} already holds a site state ({what}); enrol into a new, empty --state folder", ferry_bundle::escape_path(.path))]
    AlreadyEnrolled {
        /// The state directory.
        path: PathBuf,
        /// What it holds (escaped).
        what: String,
    },
}

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
    /// An update for this round already left the site.
    #[error("an update for round {round} was already exported ({file}, {}); HQ refuses two updates of one site in a round, so carry that one, or pass --again to replace it (the audit log records which file superseded which)", ferry_bundle::short(.sha256))]
    AlreadyExported {
        /// The round.
        round: u64,
        /// The file written then (escaped).
        file: String,
        /// Its hash.
        sha256: String,
    },
    /// `export --fisher` without an estimate for the local model.
    #[error("no Fisher estimate for the local model: run ferry-client fisher after training, then export --fisher")]
    NoFisher,
    /// An update was to be encrypted to a key that is not HQ's (issue 15 §5).
    #[error("an update is encrypted to HQ only, and {0} is not an HQ key")]
    NotHqRecipient(String),
    /// The key is not the one this site enrolled with.
    #[error("{given} is not this site's key: this state was enrolled as {site} (key {key_id}); export with {site}'s own key (ferry.toml `key`, or --key)")]
    WrongSiteKey {
        /// The key given: its id and key id (escaped).
        given: String,
        /// The enrolled site.
        site: String,
        /// The enrolled key's id.
        key_id: String,
    },
}

impl From<FsError> for ExportError {
    fn from(e: FsError) -> Self {
        ExportError::Site(e.into())
    }
}
