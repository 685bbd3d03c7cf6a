//! `ferry-merge`: HQ's half of a federated round (issue 3). A pure, streaming merge engine over verified
//! tensors ([`merge`], with the strategies of [`Strategy`] and per-tensor rules for integers and BatchNorm),
//! the server-optimizer state that survives between rounds ([`ServerState`]), and the HQ ledger that refuses
//! stale, replayed and foreign updates ([`Ledger`]), and HQ's round on disk ([`hq`]). Nothing here parses
//! untrusted bytes: updates arrive as bundles ferry-bundle has verified, and are read back through
//! [`PayloadFile`]. See `docs/merging.md` for the user's view.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod config;
pub mod diff;
mod engine;
mod error;
pub mod hq;
mod ledger;
pub mod members;
pub mod settings;
mod state;
mod tensor;

pub use config::{
    BnPair, BnRules, FedAdamConfig, FedAvgMConfig, MergeConfig, Strategy, Weighting,
    DEFAULT_BN_BOUND, DEFAULT_FISHER_BOUND,
};
pub use engine::{
    merge, merge_streaming, Contribution, ContributionReport, MergeReport, TensorReport, TensorRule,
};
pub use error::{LedgerError, MergeError};
pub use ledger::{
    ContributorStats, CurrentGlobal, EvalRecord, Ledger, LedgerData, LedgerStatus, RoundEntry,
    RoundExtras, UpdateInfo, LEDGER_FILE,
};
pub use safetensors::Dtype;
pub use state::ServerState;
pub use tensor::{MemorySource, OwnedTensor, PayloadFile, TensorSource};
