//! `ferry-merge`: HQ's half of a federated round (issue 3). A pure, streaming merge engine over verified
//! tensors ([`merge`], with the strategies of [`Strategy`] and per-tensor rules for integers and BatchNorm),
//! the server-optimizer state that survives between rounds ([`ServerState`]), and the HQ ledger that refuses
//! stale, replayed and foreign updates ([`Ledger`]). Verifying bundles, spooling payloads and sealing the
//! output are the caller's (ferry-server); nothing here reads untrusted bytes except through
//! [`SafetensorsFile`], which checks every offset. See `docs/merging.md` for the user's view.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod config;
mod engine;
mod error;
pub mod hq;
mod ledger;
mod state;
mod tensor;

pub use config::{BnPair, BnRules, FedAdamConfig, FedAvgMConfig, MergeConfig, Strategy, Weighting};
pub use engine::{merge, Contribution, ContributionReport, MergeReport, TensorReport, TensorRule};
pub use error::{LedgerError, MergeError};
pub use ledger::{
    Contributor, CurrentGlobal, Ledger, LedgerData, LedgerStatus, RoundEntry, UpdateInfo,
    LEDGER_FILE,
};
pub use safetensors::Dtype;
pub use state::{ServerState, STATE_FILE};
pub use tensor::{
    MemorySource, OwnedTensor, SafetensorsFile, TensorMeta, TensorSource, MAX_HEADER_LEN,
};
