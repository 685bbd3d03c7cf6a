//! A site's remembered settings (issue 16): `ferry.toml` in the state directory, so an operator does not retype
//! ten flag values every round. It holds the site's key, the HQ keys to trust on a first import, the stick,
//! the data and the training recipe:
//!
//! ```toml
//! key = "keys/site-b.key"        # relative paths are relative to the state directory
//! stick = "/media/usb"
//! data = "folder:/data/plates/labels.csv"
//! eval-data = "folder:/data/plates/test.csv"
//! encrypt = true                 # updates encrypted to the pinned HQ key (issue 15 §5)
//!
//! [train]
//! epochs = 1
//! lr = 0.002
//! warmup = 50
//! batch = 64
//! augment = "plates"             # or "none", or "shift=2,contrast=0.2,brightness=0.1"
//! ```
//!
//! Every field is optional; a flag given to a command overrides the file, and the file overrides the built-in
//! default (the command decides, `ferry-client config` shows which won). [`recipe_warnings`] says when a recipe
//! makes no sense for the data.

use std::path::{Path, PathBuf};

use ferry_bundle::fsutil;
use ferry_bundle::tomlfile::{self, TomlFileError};
use serde::{Deserialize, Serialize};

use crate::{SiteError, SiteLock, SiteState};

/// The settings file's name in a site's state directory.
pub const SETTINGS_FILE: &str = "ferry.toml";
/// Largest settings file read.
const MAX_SETTINGS: u64 = 1 << 20;

/// `ferry.toml` at a site. Paths as written (see [`SiteSettings::resolve`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SiteSettings {
    /// The site's secret key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// HQ public keys (files or folders) for a first import without a kit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust: Option<Vec<PathBuf>>,
    /// Where the stick is mounted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stick: Option<PathBuf>,
    /// The local training data (a `--data` spec).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The local evaluation data (a `--data` spec), evaluated after training in a round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<String>,
    /// Encrypt every update (`round`, `export`) to the HQ keys the site pinned (issue 15 §5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<bool>,
    /// Ship the local model's Fisher estimate with every update, for HQ's `--strategy fisher` (issue 14): `round`
    /// takes it after training, `export` adds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fisher: Option<bool>,
    /// The training recipe.
    #[serde(default, skip_serializing_if = "TrainRecipe::is_empty")]
    pub train: TrainRecipe,
}

/// The `[train]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainRecipe {
    /// Local epochs per round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// Peak learning rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Linear warm-up steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup: Option<u64>,
    /// Images per step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// Shuffling seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `cpu` or `cuda`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Use only the first N samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Training-image augmentation (`none`, `plates` or `shift=2,contrast=0.2,brightness=0.1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub augment: Option<String>,
}

impl TrainRecipe {
    fn is_empty(&self) -> bool {
        *self == TrainRecipe::default()
    }
}

impl SiteSettings {
    /// Parse settings text (`path` for messages).
    pub fn parse(text: &str, path: &Path) -> Result<SiteSettings, SiteError> {
        tomlfile::parse(text).map_err(|why| SiteError::Settings {
            path: path.to_path_buf(),
            why,
        })
    }

    /// The settings as TOML text (`path`, the file they are for, names it in an error).
    pub fn to_toml(&self, path: &Path) -> Result<String, SiteError> {
        tomlfile::to_text(self).map_err(|why| SiteError::Settings {
            path: path.to_path_buf(),
            why,
        })
    }

    /// Relative paths made relative to the state directory `dir` (where the file is).
    pub fn resolve(mut self, dir: &Path) -> SiteSettings {
        let abs = tomlfile::relative_to(dir);
        self.key = self.key.map(&abs);
        self.stick = self.stick.map(&abs);
        self.trust = self.trust.map(|v| v.into_iter().map(&abs).collect());
        self
    }
}

impl SiteState {
    /// Where the settings file is.
    pub fn settings_path(&self) -> PathBuf {
        self.dir().join(SETTINGS_FILE)
    }

    /// The site's settings with paths resolved, or `None` when there is no `ferry.toml` (or no state yet).
    pub fn settings(&self) -> Result<Option<SiteSettings>, SiteError> {
        let loaded = tomlfile::load::<SiteSettings>(&self.settings_path(), MAX_SETTINGS).map_err(
            |e| match e {
                TomlFileError::Invalid { path, why } => SiteError::Settings { path, why },
                TomlFileError::Fs(e) => e.into(),
                other => SiteError::Settings {
                    path: self.settings_path(),
                    why: other.to_string(),
                },
            },
        )?;
        Ok(loaded.map(|s| s.resolve(self.dir())))
    }

    /// Write `ferry.toml` (replacing it), with `header` as a comment block above the settings.
    pub fn write_settings(
        &self,
        lock: &SiteLock<'_>,
        settings: &SiteSettings,
        header: &str,
    ) -> Result<(), SiteError> {
        self.check_lock(lock)?;
        let mut text = String::new();
        for line in header.lines() {
            text.push_str("# ");
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&settings.to_toml(&self.settings_path())?);
        Ok(fsutil::write_replace(
            &self.settings_path(),
            text.as_bytes(),
        )?)
    }
}

/// Things about a recipe that make no sense for `samples` training samples, in words: a warm-up longer than a
/// round (the site then trains at a fraction of the peak learning rate), a batch larger than the data, no
/// epochs, a learning rate out of any useful range.
pub fn recipe_warnings(
    samples: usize,
    batch: usize,
    epochs: u32,
    warmup: u64,
    lr: f64,
) -> Vec<String> {
    let mut w = Vec::new();
    if samples == 0 {
        w.push("the training data holds no samples".into());
        return w;
    }
    if epochs == 0 {
        w.push("epochs is 0: a round would send back the global unchanged".into());
    }
    if batch > samples {
        w.push(format!(
            "batch {batch} is larger than the {samples} training samples: each epoch is one small step"
        ));
    }
    let steps = (samples.div_ceil(batch.max(1)) as u64).saturating_mul(epochs.into());
    if warmup > steps && steps > 0 {
        let pct = 100.0 * steps as f64 / warmup as f64;
        w.push(format!(
            "warm-up is {warmup} steps but a round here is {steps} steps ({samples} samples, batch {batch}, {epochs} epoch{}): the first round ends at {pct:.1} % of the peak learning rate; set warmup to about {} (ferry.toml [train] warmup, or --warmup)",
            if epochs == 1 { "" } else { "s" },
            (steps / 2).max(1)
        ));
    }
    if !(lr.is_finite() && lr > 0.0 && lr < 1.0) {
        w.push(format!(
            "learning rate {lr} is outside (0, 1): training would do nothing or diverge"
        ));
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_unknown_keys_are_refused() {
        let s = SiteSettings {
            key: Some("keys/site-b.key".into()),
            data: Some("plates:loose:300".into()),
            train: TrainRecipe {
                warmup: Some(50),
                ..TrainRecipe::default()
            },
            ..SiteSettings::default()
        };
        let text = s.to_toml(Path::new("ferry.toml")).unwrap();
        assert!(
            text.contains("[train]") && text.contains("warmup = 50"),
            "{text}"
        );
        assert_eq!(SiteSettings::parse(&text, Path::new("f")).unwrap(), s);
        let e = SiteSettings::parse("kee = \"x\"\n", Path::new("ferry.toml")).unwrap_err();
        assert!(
            e.to_string().contains("ferry.toml") && e.to_string().contains("kee"),
            "{e}"
        );
        let r = s.resolve(Path::new("/state"));
        assert_eq!(r.key.unwrap(), Path::new("/state/keys/site-b.key"));
    }

    #[test]
    fn the_default_warmup_on_300_images_is_half_a_percent() {
        let w = recipe_warnings(300, 64, 1, 1000, 2.5e-4);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("0.5 % of the peak"), "{w:?}");
        assert!(recipe_warnings(300, 64, 1, 2, 2.5e-4).is_empty());
        assert_eq!(recipe_warnings(8, 64, 0, 0, 5.0).len(), 3);
    }
}
