//! Whom a site's update is encrypted to (issue 15 §5), for `export` and `round`: `--encrypt-to hq.pub`, else
//! with `--encrypt` (or ferry.toml's `encrypt = true`) the HQ keys the site pinned at enrolment or its first
//! import, so the operator does not name HQ's key again; `--no-encrypt` overrides the file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ferry_bundle::PublicKey;
use ferry_site::SiteState;

/// The recipient flags of `export`.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Encrypt the update's payload to HQ's key (.pub; repeatable): a lost stick then reveals no weights.
    /// Example: --encrypt-to keys/hq.pub
    #[arg(long, value_name = "PUB")]
    pub encrypt_to: Vec<PathBuf>,
    /// Encrypt the update to the HQ key(s) this site pinned at enrolment or its first import (ferry.toml:
    /// `encrypt = true`).
    #[arg(long, conflicts_with = "encrypt_to")]
    pub encrypt: bool,
    /// Write the update in the clear even when ferry.toml says `encrypt = true`.
    #[arg(long, conflicts_with_all = ["encrypt_to", "encrypt"])]
    pub no_encrypt: bool,
}

impl EncryptArgs {
    /// The keys to encrypt to; empty: in the clear.
    pub fn resolve(&self, state: &SiteState) -> Result<Vec<PublicKey>> {
        if self.no_encrypt {
            return Ok(Vec::new());
        }
        if !self.encrypt_to.is_empty() {
            return ferry_cli::encrypt_to_keys(&self.encrypt_to);
        }
        if self.encrypt {
            return Ok(state.pinned_hq_keys()?);
        }
        from_settings(state)
    }
}

/// With ferry.toml's `encrypt = true`, the pinned HQ keys; otherwise none (in the clear).
pub fn from_settings(state: &SiteState) -> Result<Vec<PublicKey>> {
    if state.settings()?.and_then(|s| s.encrypt) == Some(true) {
        return Ok(state.pinned_hq_keys()?);
    }
    Ok(Vec::new())
}
