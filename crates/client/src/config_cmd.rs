//! `ferry-client config` and the settings `round` works with (issue 16): each setting from its flag, else the
//! state's `ferry.toml` (`ferry_site::settings`), else the built-in default, and where it came from.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ferry_cli::settings::{pick, print_settings, Origin, SettingRow};
use ferry_site::{recipe_warnings, SiteSettings, SiteState};
use ferry_train::data::DataSpec;
use ferry_train::{AdamConfig, Arch, Augment, DeviceChoice};

/// The settings `round` and `config` take as flags; every one overrides `ferry.toml`.
#[derive(Debug, Args, Default)]
pub struct SettingFlags {
    /// This site's secret key (ferry.toml: key).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// HQ's public key (.pub or a folder of them) for a first import without a kit (ferry.toml: trust).
    #[arg(long, value_name = "PUB")]
    pub trust: Vec<PathBuf>,
    /// Where the stick is mounted (ferry.toml: stick).
    #[arg(long)]
    pub stick: Option<PathBuf>,
    /// Local training data: idx:DIR, plates:STYLE:N[:SEED] or folder:LABELS.csv (ferry.toml: data).
    #[arg(long, value_name = "SPEC")]
    pub data: Option<DataSpec>,
    /// Local evaluation data, evaluated after training (ferry.toml: eval-data).
    #[arg(long, value_name = "SPEC")]
    pub eval_data: Option<DataSpec>,
    /// Local epochs per round (ferry.toml [train]: epochs).
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Peak learning rate (ferry.toml [train]: lr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps (ferry.toml [train]: warmup).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Images per step (ferry.toml [train]: batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Shuffling seed (ferry.toml [train]: seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu or cuda (ferry.toml [train]: device).
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// Use only the first N samples (ferry.toml [train]: limit).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Changes to each training image, drawn afresh every epoch: none, plates (3 px shifts, contrast ±30 %,
    /// brightness ±0.15) or pairs such as shift=2,contrast=0.2,brightness=0.1. Default: plates for the CTC plate
    /// readers, none otherwise (ferry.toml [train]: augment).
    #[arg(long, value_name = "SPEC")]
    pub augment: Option<Augment>,
}

impl SettingFlags {
    /// The flags given, as settings to remember (`enroll` writes them into `ferry.toml`).
    /// Paths are made absolute: a relative path in `ferry.toml` is read relative to the state directory, while
    /// the flag's was relative to where the command ran.
    pub fn to_settings(&self) -> SiteSettings {
        let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        let mut s = SiteSettings {
            key: self.key.as_ref().map(abs),
            trust: (!self.trust.is_empty()).then(|| self.trust.iter().map(abs).collect()),
            stick: self.stick.as_ref().map(abs),
            data: self.data.as_ref().map(ToString::to_string),
            eval_data: self.eval_data.as_ref().map(ToString::to_string),
            ..SiteSettings::default()
        };
        s.train.epochs = self.epochs;
        s.train.lr = self.lr;
        s.train.warmup = self.warmup;
        s.train.batch = self.batch;
        s.train.seed = self.seed;
        s.train.device = self.device.as_ref().map(ToString::to_string);
        s.train.limit = self.limit;
        s.train.augment = self.augment.as_ref().map(ToString::to_string);
        s
    }
}

/// The effective settings of a site, each with where it came from.
#[derive(Debug)]
pub struct Effective {
    pub key: (Option<PathBuf>, Origin),
    pub stick: (Option<PathBuf>, Origin),
    pub trust: (Option<Vec<PathBuf>>, Origin),
    pub data: (Option<DataSpec>, Origin),
    pub eval_data: (Option<DataSpec>, Origin),
    pub epochs: (Option<u32>, Origin),
    pub lr: (Option<f64>, Origin),
    pub warmup: (Option<u64>, Origin),
    pub batch: (Option<usize>, Origin),
    pub seed: (Option<u64>, Origin),
    pub device: (Option<DeviceChoice>, Origin),
    pub limit: (Option<usize>, Origin),
    /// `None`: the architecture's default ([`Augment::default_for`]).
    pub augment: (Option<Augment>, Origin),
    /// ferry.toml's `encrypt` (`--encrypt` / `--no-encrypt` on `export` and `round` override it).
    pub encrypt: (Option<bool>, Origin),
    /// ferry.toml's `fisher` (`export --fisher` turns it on for one export).
    pub fisher: (Option<bool>, Origin),
}

fn parse_from_file<T: std::str::FromStr>(
    file: &std::path::Path,
    name: &str,
    v: Option<&String>,
) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    v.map(|s| {
        s.parse::<T>().map_err(|e| {
            anyhow::anyhow!(
                "{}: {name} {:?}: {e}",
                ferry_bundle::escape_path(file),
                ferry_bundle::escape(s)
            )
        })
    })
    .transpose()
}

impl Effective {
    /// Resolve the settings of the state at `state` (whose `ferry.toml` may be missing) under `flags`.
    pub fn resolve(state: &SiteState, flags: &SettingFlags) -> Result<Effective> {
        let file = state.settings()?.unwrap_or_default();
        let path = state.settings_path();
        let adam = AdamConfig::default();
        let t = &file.train;
        Ok(Effective {
            key: pick(flags.key.clone(), file.key.clone(), None),
            stick: pick(flags.stick.clone(), file.stick.clone(), None),
            trust: pick(
                (!flags.trust.is_empty()).then(|| flags.trust.clone()),
                file.trust.clone(),
                None,
            ),
            data: pick(
                flags.data.clone(),
                parse_from_file(&path, "data", file.data.as_ref())?,
                None,
            ),
            eval_data: pick(
                flags.eval_data.clone(),
                parse_from_file(&path, "eval-data", file.eval_data.as_ref())?,
                None,
            ),
            epochs: pick(flags.epochs, t.epochs, Some(1)),
            lr: pick(flags.lr, t.lr, Some(adam.lr)),
            warmup: pick(flags.warmup, t.warmup, Some(adam.warmup)),
            batch: pick(flags.batch, t.batch, Some(64)),
            seed: pick(flags.seed, t.seed, Some(0)),
            device: pick(
                flags.device,
                parse_from_file(&path, "[train] device", t.device.as_ref())?,
                Some(DeviceChoice::default()),
            ),
            limit: pick(flags.limit, t.limit, None),
            augment: pick(
                flags.augment,
                parse_from_file(&path, "[train] augment", t.augment.as_ref())?,
                None,
            ),
            encrypt: pick(None, file.encrypt, Some(false)),
            fisher: pick(None, file.fisher, Some(false)),
        })
    }

    /// The key file that signs this site's updates, or the error that says where to set it.
    pub fn key(&self, state: &SiteState) -> Result<PathBuf> {
        match &self.key.0 {
            Some(k) => Ok(k.clone()),
            None => anyhow::bail!(
                "which key signs this site's updates? give --key FILE, or set `key = \"...\"` in {}",
                ferry_bundle::escape_path(&state.settings_path())
            ),
        }
    }

    /// The recipe's numbers (every one has a default).
    pub fn recipe(&self) -> (u32, f64, u64, usize, u64) {
        (
            self.epochs.0.unwrap_or(1),
            self.lr.0.unwrap_or(AdamConfig::default().lr),
            self.warmup.0.unwrap_or(AdamConfig::default().warmup),
            self.batch.0.unwrap_or(64).max(1),
            self.seed.0.unwrap_or(0),
        )
    }

    /// The augmentation `arch` trains with: the setting, or the architecture's default.
    pub fn augment(&self, arch: Arch) -> Augment {
        self.augment.0.unwrap_or_else(|| Augment::default_for(arch))
    }

    /// Warnings about the recipe for `samples` training samples.
    pub fn warnings(&self, samples: usize) -> Vec<String> {
        let (epochs, lr, warmup, batch, _) = self.recipe();
        recipe_warnings(samples, batch, epochs, warmup, lr)
    }

    fn rows(&self) -> Vec<SettingRow> {
        vec![
            SettingRow::path("key", &self.key),
            SettingRow::paths("trust", &self.trust),
            SettingRow::path("stick", &self.stick),
            SettingRow::new("data", &self.data),
            SettingRow::new("eval-data", &self.eval_data),
            SettingRow::new("train.epochs", &self.epochs),
            SettingRow::new("train.lr", &self.lr),
            SettingRow::new("train.warmup", &self.warmup),
            SettingRow::new("train.batch", &self.batch),
            SettingRow::new("train.seed", &self.seed),
            SettingRow::new("train.device", &self.device),
            SettingRow::new("train.limit", &self.limit),
            match &self.augment {
                (None, _) => SettingRow::new(
                    "train.augment",
                    &(
                        Some("plates for the CTC plate readers, none otherwise"),
                        Origin::Default,
                    ),
                ),
                picked => SettingRow::new("train.augment", picked),
            },
            SettingRow::new("encrypt", &self.encrypt),
            SettingRow::new("fisher", &self.fisher),
        ]
    }
}

/// `ferry-client config`: the effective settings and where each came from.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-client config --state site/\n  ferry-client config --state site/ --epochs 3 --json\n\nSettings live in <STATE>/ferry.toml (enroll writes it; edit it by hand). A flag given to `round`\noverrides the file. Warnings say when the recipe makes no sense for the data (e.g. a warm-up longer\nthan a round); for plates:STYLE:N data the count is known without loading it, for other data `round`\nchecks it when it loads the data."
)]
pub struct ConfigArgs {
    /// The site's state directory.
    #[arg(long)]
    pub state: PathBuf,
    #[command(flatten)]
    pub flags: SettingFlags,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The number of samples a spec gives, when known without loading it.
fn known_count(spec: &DataSpec, limit: Option<usize>) -> Option<usize> {
    match spec {
        DataSpec::Plates { n, .. } => Some(limit.map_or(*n, |l| l.min(*n))),
        _ => None,
    }
}

pub fn run_config(a: &ConfigArgs) -> Result<()> {
    let state = SiteState::at(&a.state);
    let eff = Effective::resolve(&state, &a.flags).context("reading the settings")?;
    let warnings = match eff
        .data
        .0
        .as_ref()
        .and_then(|d| known_count(d, eff.limit.0))
    {
        Some(n) => eff.warnings(n),
        None => Vec::new(),
    };
    let file = state.settings_path();
    let file = if file.exists() {
        ferry_bundle::escape_path(&file)
    } else {
        format!("{} (none yet)", ferry_bundle::escape_path(&file))
    };
    print_settings(&file, &eff.rows(), &warnings, a.json)
}
