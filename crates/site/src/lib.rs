//! `ferry-site`: a site's half of a federated round. It owns the site's state directory — every file in it and
//! the lock that guards it ([`SiteState`], [`SiteLock`]) — and the steps of a round at a site:
//! import a verified global ([`SiteState::import`]), train it on local data ([`train_site`]), evaluate or
//! recalibrate it ([`eval_site`], [`recalibrate_site`]), and export the local model as a signed update
//! ([`SiteState::export`]). Bundles are read and sealed by ferry-bundle; the arithmetic is ferry-train's.
//! The HQ half is `ferry_merge::hq`. See `docs/architecture.md`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod audit;
mod enroll;
mod error;
mod exchange;
mod pick;
pub mod settings;
mod state;
mod trust;
mod work;

pub use audit::{AuditAction, AuditEntry, AuditTensor};
pub use enroll::Enrolled;
pub use error::{ExportError, SiteError};
pub use exchange::{ExportOptions, ImportOutcome, ImportPolicy, DEFAULT_MAX_ROUND_JUMP};
pub use pick::Picked;
pub use settings::{recipe_warnings, SiteSettings, TrainRecipe};
pub use state::{
    DeployedRecord, GlobalRecord, LocalRecord, LocalRun, SiteLock, SitePin, SiteState,
};
pub use trust::{ImportTrust, PreparedTrust};
pub use work::{
    eval_site, fisher_site, load_site_model, recalibrate_site, site_arch, train_site, EvalTarget,
    SiteTrainSummary,
};
