//! HQ's remembered settings (issue 16): `ferry.toml` in HQ's state directory.
//!
//! ```toml
//! key = "../keys/hq.key"     # relative paths are relative to the state directory
//! stick = "/media/usb"
//! trust = ["../keys/"]       # extra site keys, beside the member list's
//! encrypt-to = ["../keys/sites/"]  # encrypt every new global to these keys (issue 15 §5)
//! root = "../keys/root.pub"  # with a root key: kits carry it and the list below
//! hq-keys = "../keys/hq-keys-1.ferry-keys"
//!
//! [merge]
//! strategy = "fedavg"
//! min-sites = 2
//! ```
//!
//! Every field is optional; a flag given to a command overrides the file, the file overrides the built-in
//! default (`ferry-server config` shows which won).

use std::path::{Path, PathBuf};

use ferry_bundle::fsutil::FsError;
use ferry_bundle::tomlfile::{self, TomlFileError};
use serde::{Deserialize, Serialize};

/// The settings file's name in HQ's state directory.
pub const SETTINGS_FILE: &str = "ferry.toml";
const MAX_SETTINGS: u64 = 1 << 20;

/// Why `ferry.toml` could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// File system.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Not valid settings.
    #[error("{}: {why}", ferry_bundle::escape_path(.path))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (escaped, one line).
        why: String,
    },
}

/// `ferry.toml` at HQ. Paths as written until [`HqSettings::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HqSettings {
    /// HQ's secret key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Site keys (files or folders) trusted beside the members' keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust: Option<Vec<PathBuf>>,
    /// Where the stick is mounted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stick: Option<PathBuf>,
    /// Encrypt every new global to these keys (`.pub` files or folders; issue 15 §5); `[]`: in the clear.
    /// Unset: the keys the current global is encrypted to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt_to: Option<Vec<PathBuf>>,
    /// The federation's root public key (`root.pub`), when it has one: kits then carry it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// The current root-signed list of HQ keys (`.ferry-keys`): kits carry it, `round` copies it to the stick.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hq_keys: Option<PathBuf>,
    /// The merge.
    #[serde(default, skip_serializing_if = "MergeSettings::is_empty")]
    pub merge: MergeSettings,
}

/// The `[merge]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MergeSettings {
    /// fedavg, fedavgm, fedadam, median, trimmed-mean or fisher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Refuse fewer updates than this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_sites: Option<usize>,
    /// Clip each update's distance from the current global.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
    /// Server learning rate (fedavgm, fedadam).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_lr: Option<f64>,
    /// Days until a new global expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_days: Option<u64>,
}

impl MergeSettings {
    fn is_empty(&self) -> bool {
        *self == MergeSettings::default()
    }
}

impl HqSettings {
    /// Parse settings text (`path` for messages).
    pub fn parse(text: &str, path: &Path) -> Result<HqSettings, SettingsError> {
        tomlfile::parse(text).map_err(|why| SettingsError::Invalid {
            path: path.to_path_buf(),
            why,
        })
    }

    /// The settings of the HQ state at `dir` with relative paths resolved against it, or `None` without a file.
    pub fn load(dir: &Path) -> Result<Option<HqSettings>, SettingsError> {
        let path = dir.join(SETTINGS_FILE);
        let loaded = tomlfile::load::<HqSettings>(&path, MAX_SETTINGS).map_err(|e| match e {
            TomlFileError::Invalid { path, why } => SettingsError::Invalid { path, why },
            TomlFileError::Fs(e) => SettingsError::Fs(e),
            other => SettingsError::Invalid {
                path: path.clone(),
                why: other.to_string(),
            },
        })?;
        let Some(s) = loaded else {
            return Ok(None);
        };
        if let Some(st) = &s.merge.strategy {
            st.parse::<crate::Strategy>()
                .map_err(|e| SettingsError::Invalid {
                    path: path.clone(),
                    why: format!("[merge] strategy: {e}"),
                })?;
        }
        Ok(Some(s.resolve(dir)))
    }

    /// Relative paths made relative to `dir`.
    pub fn resolve(mut self, dir: &Path) -> HqSettings {
        let abs = tomlfile::relative_to(dir);
        self.key = self.key.map(&abs);
        self.stick = self.stick.map(&abs);
        self.root = self.root.map(&abs);
        self.hq_keys = self.hq_keys.map(&abs);
        self.trust = self.trust.map(|v| v.into_iter().map(&abs).collect());
        self.encrypt_to = self.encrypt_to.map(|v| v.into_iter().map(&abs).collect());
        self
    }

    /// The settings path of the HQ state at `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(SETTINGS_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resolves_and_refuses_unknown_keys_and_strategies() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(HqSettings::load(d.path()).unwrap(), None);
        std::fs::write(
            d.path().join(SETTINGS_FILE),
            "key = \"k/hq.key\"\n[merge]\nstrategy = \"median\"\nmin-sites = 3\n",
        )
        .unwrap();
        let s = HqSettings::load(d.path()).unwrap().unwrap();
        assert_eq!(s.key.unwrap(), d.path().join("k/hq.key"));
        assert_eq!(s.merge.min_sites, Some(3));
        std::fs::write(
            d.path().join(SETTINGS_FILE),
            "[merge]\nstrategy = \"best\"\n",
        )
        .unwrap();
        let e = HqSettings::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("strategy") && !e.contains('\n'), "{e}");
        std::fs::write(d.path().join(SETTINGS_FILE), "\n\nmin_sites = 2\n").unwrap();
        let e = HqSettings::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("line 3") && !e.contains('\n'), "{e}");
    }
}
