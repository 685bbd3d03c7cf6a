//! Errors of the site's operations. Every variant means nothing in the state directory was changed.

use std::path::PathBuf;

use ferry_bundle::fsutil::{FsError, LockError};
use ferry_bundle::SealError;
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
    #[error("{} holds no site state: import a global into it first", .0.display())]
    NoState(PathBuf),
    /// A lock guard of another state directory was passed.
    #[error("internal error: the lock held is for {}, not for this state directory", .0.display())]
    WrongLock(PathBuf),
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
    /// Nothing has been imported yet.
    #[error("no global imported yet in {}: import one first", .0.display())]
    NoGlobal(PathBuf),
    /// No local model exists.
    #[error("no trained local model in {}: train one first", .0.display())]
    NoLocal(PathBuf),
    /// The current global carries weights ferry cannot train (no architecture).
    #[error("this global carries foreign weights (no architecture): ferry cannot train it; import and re-pack only")]
    ForeignWeights,
    /// No recalibrated model exists for the current global.
    #[error("no recalibrated model for the current global: recalibrate first")]
    NoDeployed,
    /// A training state file (checkpoint, optimizer state, deployed model) cannot be used.
    #[error("{}: {detail}; delete the file: the next training or recalibration rebuilds it", .path.display())]
    TrainingState {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Training, evaluation or recalibration failed.
    #[error(transparent)]
    Train(#[from] TrainError),
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
    /// The local model was trained from an older global.
    #[error("the local model was trained from round {trained_round}, but the site now holds round {current_round}: train again")]
    StaleLocal {
        /// Round it was trained from.
        trained_round: u64,
        /// Round held now.
        current_round: u64,
    },
}

impl From<FsError> for ExportError {
    fn from(e: FsError) -> Self {
        ExportError::Site(e.into())
    }
}
