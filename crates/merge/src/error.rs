//! The two error enums of the crate: [`MergeError`] for combining tensors and the server-optimizer state,
//! [`LedgerError`] for the HQ ledger. Every message is one sentence an HQ operator can act on (issue 3).

use std::path::PathBuf;

use ferry_bundle::fsutil::{FsError, LockError};
use safetensors::Dtype;

/// Why a merge (or loading/saving the server-optimizer state) was refused. Nothing is written when one is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// No update was given to merge.
    #[error("no updates to merge; pass at least one verified update bundle")]
    NoContributions,
    /// The same bundle was passed twice.
    #[error("bundle {bundle} was given twice; pass each update once")]
    DuplicateBundle {
        /// The bundle hash.
        bundle: String,
    },
    /// Sample weighting needs a positive sample count from every site.
    #[error("site {site} declares 0 training samples, so it cannot be weighted by samples; drop it or use --weights equal")]
    ZeroSamples {
        /// The site id.
        site: String,
    },
    /// The weights do not add up to anything usable.
    #[error("the contribution weights add up to {total}; check the sample counts or use --weights equal")]
    BadTotalWeight {
        /// The sum of the raw weights.
        total: f64,
    },
    /// A NaN or infinite value was found in an input.
    #[error("{origin} holds a NaN or infinite value in tensor {tensor}; that update is broken, leave it out of the merge")]
    NonFinite {
        /// `site <id>` or `the base global`.
        origin: String,
        /// The tensor name.
        tensor: String,
    },
    /// A BatchNorm running variance below zero: no training produces one.
    #[error("{origin} holds a negative value in the BatchNorm running variance {tensor}; that update is broken or hostile, leave it out of the merge")]
    NegativeVariance {
        /// `site <id>`.
        origin: String,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor's dtype, shape or byte length differs from the model layout.
    #[error("{origin} has tensor {tensor} as {found}, but the model layout says {expected}; the update was made for another model")]
    LayoutMismatch {
        /// `site <id>` or `the base global`.
        origin: String,
        /// The tensor name.
        tensor: String,
        /// The layout's dtype and shape.
        expected: String,
        /// What the input holds.
        found: String,
    },
    /// `--strategy fisher` and an update without the Fisher estimate of a trainable tensor.
    #[error("{origin} carries no Fisher estimate for tensor {tensor}; --strategy fisher needs updates exported with --fisher (ferry-client fisher, then export --fisher), or merge with another strategy")]
    NoFisher {
        /// `site <id> (bundle …)`.
        origin: String,
        /// The model tensor.
        tensor: String,
    },
    /// A negative Fisher value: a squared gradient never is.
    #[error("{origin} holds a negative value in the Fisher estimate of {tensor}; that update is broken or hostile, leave it out of the merge")]
    NegativeFisher {
        /// `site <id> (bundle …)`.
        origin: String,
        /// The model tensor.
        tensor: String,
    },
    /// A tensor of the layout is missing from an input.
    #[error("{origin} has no tensor {tensor}; the update was made for another model")]
    MissingTensor {
        /// The source's label (site, base or file).
        origin: String,
        /// The tensor name.
        tensor: String,
    },
    /// The layout itself is unusable.
    #[error("the model layout is invalid: {0}")]
    BadLayout(String),
    /// A tensor uses a dtype the merge engine has no rule for.
    #[error("tensor {tensor} has dtype {dtype}, which ferry cannot merge; convert the model to F32/F16/BF16 or an integer type")]
    UnsupportedDtype {
        /// The tensor name.
        tensor: String,
        /// Its dtype.
        dtype: Dtype,
    },
    /// The merged value does not fit the tensor's dtype.
    #[error("the merged tensor {tensor} overflows {dtype} (or is not finite); lower the server learning rate or check the updates with the norm report")]
    ResultOverflow {
        /// The tensor name.
        tensor: String,
        /// Its dtype.
        dtype: Dtype,
    },
    /// Trimmed mean would drop every value.
    #[error("--trim {trim} drops {trim} values from each end, which needs more than {n_needed} updates, but only {n} were given; lower --trim or add updates", n_needed = 2 * trim)]
    TrimTooLarge {
        /// The K of trimmed-mean.
        trim: usize,
        /// The number of updates.
        n: usize,
    },
    /// A strategy name that is not known.
    #[error(
        "unknown strategy {0:?}; use fedavg, fedavgm, fedadam, median, trimmed-mean or fisher"
    )]
    UnknownStrategy(String),
    /// A weighting name that is not known.
    #[error("unknown weighting {0:?}; use samples or equal")]
    UnknownWeighting(String),
    /// A configuration value is out of range.
    #[error("invalid merge setting: {0}")]
    BadConfig(String),
    /// The server-optimizer state was produced for another global than the current one.
    #[error("the server-optimizer state in {} belongs to global {state_global}, but the current global is {current}; reset the server state to restart the optimizer from zero", ferry_bundle::escape_path(.path))]
    StateGlobalMismatch {
        /// The state file.
        path: PathBuf,
        /// The global hash recorded in the state.
        state_global: String,
        /// The ledger's current global hash.
        current: String,
    },
    /// The state holds another server optimizer's moments.
    #[error("the server-optimizer state holds {state} moments but --strategy {requested} was asked for; keep {state} or reset the server state to switch")]
    StrategySwitch {
        /// The strategy the state was built by.
        state: String,
        /// The strategy asked for now.
        requested: String,
    },
    /// The state does not fit the model.
    #[error("the server-optimizer state does not match tensor {tensor} of the model; reset the server state")]
    StateMismatch {
        /// The tensor name.
        tensor: String,
    },
    /// The state file cannot be parsed.
    #[error("the server-optimizer state file {} is damaged ({reason}); restore it from backup or reset the server state", ferry_bundle::escape_path(.path))]
    StateCorrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading a tensor failed at the operating-system level.
    #[error("reading {}: {source}", ferry_bundle::escape_path(.path))]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Writing the merged tensor (by the caller's sink) failed.
    #[error("writing the merged tensor {tensor} failed: {reason}")]
    Output {
        /// The tensor name.
        tensor: String,
        /// What the sink reported.
        reason: String,
    },
    /// A file operation on the HQ state dir failed.
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Why the HQ ledger refused an update, a round or a load. Nothing is written when one is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// `init` found a ledger already.
    #[error("{} already holds a ledger; use it, or choose an empty --state directory for a new federation", ferry_bundle::escape_path(.0))]
    Exists(PathBuf),
    /// The HQ state directory does not exist.
    #[error("the HQ state {} does not exist; create it with `ferry-server init --state {} --key ... --federation ...`, or give the --state folder `init` made", ferry_bundle::escape_path(.0), ferry_bundle::escape_path(.0))]
    NoState(PathBuf),
    /// `load` found no ledger.
    #[error("{} holds no ledger; run `ferry-server init --state {}` first", ferry_bundle::escape_path(.0), ferry_bundle::escape_path(.0))]
    Missing(PathBuf),
    /// The ledger file cannot be parsed or is inconsistent.
    #[error("the ledger {} is damaged ({reason}); restore it from backup", ferry_bundle::escape_path(.path))]
    Corrupt {
        /// The ledger file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A value passed in is unusable (an empty site id, a hash that is not hex).
    #[error("invalid ledger input: {0}")]
    BadInput(String),
    /// The update was trained on an older (or unknown) global.
    #[error("update {bundle} from site {site} is stale: it was trained on {based_on}, but the current global is round {current_round}; the site must import the current global and train again")]
    Stale {
        /// The site id.
        site: String,
        /// The update bundle hash.
        bundle: String,
        /// A description of its base (`round N (hash)` or `unknown global <hash>`).
        based_on: String,
        /// The current round.
        current_round: u64,
    },
    /// The bundle was merged in an earlier round.
    #[error("update {bundle} from site {site} was already merged in round {round}; remove it from the stick")]
    Replay {
        /// The site id.
        site: String,
        /// The bundle hash.
        bundle: String,
        /// The round that merged it.
        round: u64,
    },
    /// The same bundle appears twice in one batch.
    #[error("update {bundle} was given twice; pass each update once")]
    DuplicateBundle {
        /// The bundle hash.
        bundle: String,
    },
    /// Two updates from one site in one batch.
    #[error("site {site} sent more than one update for this round ({first} and {second}); keep only the one to merge")]
    DuplicateSite {
        /// The site id.
        site: String,
        /// One bundle hash.
        first: String,
        /// The other.
        second: String,
    },
    /// The update belongs to another federation.
    #[error("update {bundle} from site {site} belongs to federation {found:?}, not {expected:?}; it was brought to the wrong HQ")]
    WrongFederation {
        /// The site id.
        site: String,
        /// The bundle hash.
        bundle: String,
        /// The update's federation.
        found: String,
        /// This ledger's federation.
        expected: String,
    },
    /// The update's model fingerprint differs from the federation's model.
    #[error("update {bundle} from site {site} is for model {found}, but this federation's model is {expected}; the site trained another architecture")]
    FingerprintMismatch {
        /// The site id.
        site: String,
        /// The bundle hash.
        bundle: String,
        /// The update's fingerprint.
        found: String,
        /// The ledger's fingerprint.
        expected: String,
    },
    /// The update is based on the current global but claims another round.
    #[error("update {bundle} from site {site} says round {found} but its base is the round-{expected} global; the bundle's manifest is inconsistent, ask the site to pack it again")]
    WrongRound {
        /// The site id.
        site: String,
        /// The bundle hash.
        bundle: String,
        /// The update's round.
        found: u64,
        /// The current round.
        expected: u64,
    },
    /// No update was given.
    #[error("no updates given; pass at least one update bundle")]
    EmptyBatch,
    /// The state directory is locked by another process.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A file operation failed.
    #[error(transparent)]
    Fs(#[from] FsError),
}
