//! Whom HQ encrypts the next global to (issue 15 §5), for `merge`, `round` and `republish`: `--encrypt-to`,
//! else `ferry.toml`'s `encrypt-to`, else the keys the current global is encrypted to (ferry-merge reads them
//! from the stored global's signed manifest), so an encrypted federation stays encrypted without the operator
//! retyping the list. `--no-encrypt` goes back to the clear.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use ferry_merge::hq::EncryptTo;
use ferry_merge::settings::HqSettings;

/// The recipient flags of `merge` and `republish`.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Encrypt the global's payload to these keys (the member sites' .pub files, or a folder of them;
    /// repeatable): a lost stick then reveals no weights. HQ's own key is added. Without it: ferry.toml's
    /// encrypt-to, else the keys the current global is encrypted to. Example: --encrypt-to keys/sites/
    #[arg(long, value_name = "PUB")]
    pub encrypt_to: Vec<PathBuf>,
    /// Write the global in the clear even when the current one is encrypted.
    #[arg(long, conflicts_with = "encrypt_to")]
    pub no_encrypt: bool,
}

impl EncryptArgs {
    /// The recipients for the HQ state at `state`.
    pub fn resolve(&self, state: &Path) -> Result<EncryptTo> {
        if self.no_encrypt {
            return Ok(EncryptTo::Clear);
        }
        if !self.encrypt_to.is_empty() {
            return Ok(EncryptTo::Keys(ferry_cli::encrypt_to_keys(
                &self.encrypt_to,
            )?));
        }
        from_settings(state)
    }
}

/// `ferry.toml`'s `encrypt-to` (an empty list: in the clear), else the current global's recipients.
pub fn from_settings(state: &Path) -> Result<EncryptTo> {
    match HqSettings::load(state)?.and_then(|s| s.encrypt_to) {
        Some(paths) if paths.is_empty() => Ok(EncryptTo::Clear),
        Some(paths) => Ok(EncryptTo::Keys(ferry_cli::encrypt_to_keys(&paths)?)),
        None => Ok(EncryptTo::Same),
    }
}
