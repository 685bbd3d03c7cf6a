//! `ferry-client train`, `eval` and `recalibrate` (issue 4): argument structs, progress bars and printing over
//! `ferry_site`. Stage one is clap (`*Args`, no I/O); stage two opens the state, takes the effective settings
//! (flags, else the state's `ferry.toml`, else the defaults: `config_cmd::Effective`, the resolution `round`
//! and `config` use), picks the device and loads the data at the model's input size; the work is one library
//! call.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ferry_cli::{count, outln, print_json};
use ferry_site::{
    eval_site, fisher_site, recalibrate_site, site_arch, train_site, EvalTarget, SiteState,
};
use ferry_train::data::{DataSpec, Dataset, LoadConfig};
use ferry_train::fisher::FisherConfig;

use crate::config_cmd::{Effective, SettingFlags};
use ferry_train::{
    device, AdamConfig, Arch, CosineDecay, DeviceChoice, EpochStats, StepStats, TrainConfig,
    TrainObserver,
};
use indicatif::{ProgressBar, ProgressStyle};

/// Options shared by the three commands: where the state is and what data to use. Every one but `--state`
/// may be left out when the state's `ferry.toml` holds it (issue 16): the resolution is `round`'s and
/// `config`'s ([`Effective::resolve`]), flags first.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Site state directory.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Local data: idx:DIR, idx:DIR:test, plates:loose|tight|mixed|clean:N[:SEED], folder:LABELS.csv or
    /// folder:DIR?labels=filename (docs/training.md). Default: ferry.toml's data (eval: eval-data).
    #[arg(long, value_name = "SPEC")]
    pub data: Option<DataSpec>,
    /// Leave out (and list) unreadable images and bad label lines of a folder dataset instead of refusing it.
    #[arg(long)]
    pub skip_bad: bool,
    /// The labels CSV's encoding: auto (UTF-8, else CP949), utf-8 or cp949.
    #[arg(long, value_name = "ENC")]
    pub labels_encoding: Option<ferry_train::data::folder::TextEncoding>,
    /// Use only the first N samples (ferry.toml [train]: limit).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Render generated plates with this TTF/OTF font instead of the built-in Unifont.
    #[arg(long, value_name = "TTF")]
    pub font: Option<PathBuf>,
    /// Device to compute on: cpu or cuda (cuda needs a build with `--features cuda`) (ferry.toml [train]:
    /// device; default cpu).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceChoice>,
}

/// Which remembered data a command takes when `--data` is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataSetting {
    /// `data`: train and recalibrate.
    Train,
    /// `eval-data`: eval.
    Eval,
}

/// What stage two hands the command: the state, its model, the device, the data, and the effective settings.
struct Resolved {
    state: SiteState,
    arch: Arch,
    dev: ferry_train::Device,
    data: Dataset,
    eff: Effective,
}

impl DataArgs {
    /// These flags as settings flags (`recipe` adds `train`'s); `--data` stands for `which` setting.
    fn flags(&self, which: DataSetting, recipe: SettingFlags) -> SettingFlags {
        let mut f = SettingFlags {
            device: self.device,
            limit: self.limit,
            ..recipe
        };
        match which {
            DataSetting::Train => f.data = self.data.clone(),
            DataSetting::Eval => f.eval_data = self.data.clone(),
        }
        f
    }

    /// Stage two: open the state, take the effective settings (flags, then ferry.toml, then defaults), check its
    /// model can be trained, pick the device, load the data at its input size.
    fn resolve(&self, which: DataSetting, recipe: SettingFlags) -> Result<Resolved> {
        let state = SiteState::open(&self.state)?;
        let eff = Effective::resolve(&state, &self.flags(which, recipe))
            .context("reading the settings")?;
        let (spec, name) = match which {
            DataSetting::Train => (&eff.data.0, "data"),
            DataSetting::Eval => (&eff.eval_data.0, "eval-data"),
        };
        let Some(spec) = spec.clone() else {
            anyhow::bail!(
                "what data? give --data SPEC, or set `{name} = \"folder:/data/labels.csv\"` in {}",
                ferry_bundle::escape_path(&state.settings_path())
            );
        };
        let (_, arch) = site_arch(&state)?;
        let dev = device::select(&eff.device.0.unwrap_or_default())?;
        let cfg = LoadConfig {
            limit: eff.limit.0,
            font: self.font.clone(),
            input: Some(arch.input()),
            classes: Some(arch.classes()),
        };
        let mut spec = spec;
        if let Some(o) = spec.folder_options_mut() {
            o.skip_bad |= self.skip_bad;
            o.encoding = self.labels_encoding.unwrap_or(o.encoding);
        }
        let (data, skipped) = spec
            .load_checked(&cfg)
            .with_context(|| format!("loading {}", ferry_bundle::escape(&spec.to_string())))?;
        crate::data_cmds::report_skipped(&skipped);
        Ok(Resolved {
            state,
            arch,
            dev,
            data,
            eff,
        })
    }
}

/// `ferry-client train`: train the imported global on local data.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-client train --state site/                     # data and recipe from site/ferry.toml\n  ferry-client train --state site/ --data folder:/data/plates/labels.csv --epochs 2\n  ferry-client train --state site/ --data plates:loose:2000 --epochs 1 --json\n\nResumable: run it again after an interruption and it continues from the last finished epoch."
)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Local epochs (ferry.toml [train]: epochs; default 1).
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Peak learning rate, Adam (ferry.toml [train]: lr; default 2.5e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps, counted over the site's lifetime: the Adam state persists between rounds
    /// (ferry.toml [train]: warmup; default 1000).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Cosine learning-rate decay after the warm-up, ending at this step of the site's lifetime (the same count as
    /// --warmup; plan it as rounds × epochs × steps per epoch). 0 keeps the rate flat.
    #[arg(long, default_value_t = 0, value_name = "STEP")]
    pub decay_until: u64,
    /// Where the decay ends, as a fraction of --lr.
    #[arg(long, default_value_t = CosineDecay::DEFAULT_FLOOR, value_name = "FRACTION")]
    pub decay_floor: f64,
    /// Images per step (ferry.toml [train]: batch; default 64).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Seed of the shuffling order (ferry.toml [train]: seed; default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Changes to each training image, drawn afresh every epoch: none, plates (3 px shifts, contrast ±30 %,
    /// brightness ±0.15) or pairs such as shift=2,contrast=0.2,brightness=0.1 (ferry.toml [train]: augment;
    /// default plates for the CTC plate readers, none otherwise).
    #[arg(long, value_name = "SPEC")]
    pub augment: Option<ferry_train::Augment>,
    /// Print one JSON object instead of a sentence (the progress bars stay on stderr).
    #[arg(long)]
    pub json: bool,
}

/// `ferry-client eval`: accuracy of the site's model on local data.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-client eval --state site/                      # eval-data from site/ferry.toml\n  ferry-client eval --state site/ --data folder:/data/plates/test.csv\n  ferry-client eval --state site/ --data idx:data/fashion-mnist:test --model global --json"
)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Which model: auto (the local model if trained from the current global, else the global), global, local,
    /// deployed (recalibrated).
    #[arg(long, default_value = "auto", value_name = "MODEL")]
    pub model: EvalTarget,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// `ferry-client recalibrate`: re-estimate BatchNorm statistics on local data (labels unused).
#[derive(Debug, Args)]
#[command(
    after_help = "Example (new cameras, same model):\n  ferry-client recalibrate --state site/ --data folder:/data/plates/last-week.csv\n\nWrites the deployed model; the global and the local update stay as they are."
)]
pub struct RecalibrateArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// `ferry-client fisher`: the local model's diagonal Fisher estimate, for `export --fisher` (issue 14).
#[derive(Debug, Args)]
#[command(
    after_help = "Example (after train, before export; the same data as training):\n  ferry-client fisher --state site/\n  ferry-client export --state site/ --fisher --out /media/usb/\n\nHQ then merges with --strategy fisher: each parameter counts by how much this site's data pins it down. The estimate leaves the site inside the update. Like the weights it is computed from local data (squared gradients of the local model), so treat it as the update is treated: export --encrypt encrypts both."
)]
pub struct FisherArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Samples the estimate is taken on (the first of a seeded shuffle; 0: all).
    #[arg(long, default_value_t = FisherConfig::default().samples)]
    pub samples: usize,
    /// Samples per gradient.
    #[arg(long, default_value_t = FisherConfig::default().batch)]
    pub batch: usize,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// Progress bars for a training run: one bar per epoch showing loss, accuracy and images/s.
struct Bars {
    bar: Option<ProgressBar>,
    batches: usize,
}

impl Bars {
    fn style() -> ProgressStyle {
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }
}

impl TrainObserver for Bars {
    fn on_start(&mut self, _first: u32, _epochs: u32, batches: usize) {
        self.batches = batches;
    }

    fn on_step(&mut self, s: &StepStats) {
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(self.batches as u64).with_style(Bars::style());
            b.set_prefix(format!("{}/{}", s.epoch + 1, s.epochs));
            b
        });
        bar.set_position(s.batch as u64);
        bar.set_message(format!(
            "loss {:.3}  acc {:.1}%  {:.0} img/s",
            s.loss,
            100.0 * s.accuracy,
            s.images_per_sec
        ));
    }

    fn on_epoch(&mut self, e: &EpochStats) {
        if let Some(bar) = self.bar.take() {
            bar.finish_with_message(format!(
                "loss {:.3}  acc {:.1}%  {:.0} img/s  (checkpoint saved)",
                e.loss,
                100.0 * e.accuracy,
                e.images_per_sec
            ));
        }
    }

    fn on_note(&mut self, note: &str) {
        match &self.bar {
            Some(bar) => bar.println(note),
            None => eprintln!("{note}"),
        }
    }
}

/// Run `ferry-client train`.
pub fn run_train(args: &TrainArgs) -> Result<()> {
    let recipe = SettingFlags {
        epochs: args.epochs,
        lr: args.lr,
        warmup: args.warmup,
        batch: args.batch,
        seed: args.seed,
        augment: args.augment,
        ..SettingFlags::default()
    };
    let Resolved {
        state,
        arch,
        dev,
        data,
        eff,
    } = args.data.resolve(DataSetting::Train, recipe)?;
    // Said after training (a refusal stays one line): what in the recipe makes no sense for this data.
    let warnings = eff.warnings(data.len());
    let (epochs, lr, warmup, batch, seed) = eff.recipe();
    let device = eff.device.0.unwrap_or_default();
    let cfg = TrainConfig {
        epochs,
        batch,
        seed,
        adam: AdamConfig {
            lr,
            warmup,
            decay: (args.decay_until > 0).then_some(CosineDecay {
                until: args.decay_until,
                floor: args.decay_floor,
            }),
            ..AdamConfig::default()
        },
        augment: eff.augment(arch),
    };
    let mut bars = Bars {
        bar: None,
        batches: 0,
    };
    let lock = state.lock()?;
    let s = train_site(&state, &lock, &data, &cfg, &dev, &mut bars).context("training")?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if args.json {
        return print_json(&serde_json::json!({
            "arch": arch.name(), "round": s.base.round, "base": s.base.hash, "samples": s.train.samples,
            "epochs": epochs, "batch": batch, "lr": lr, "warmup": warmup, "augment": cfg.augment.to_string(), "steps": s.round_steps, "resumed_after": s.resumed_after,
            "loss": s.train.loss, "accuracy": s.train.accuracy, "images_per_sec": s.train.images_per_sec,
            "device": device.to_string(),
        }));
    }
    let resumed = s
        .resumed_after
        .map(|e| format!(", resumed after epoch {e}"))
        .unwrap_or_default();
    outln!(
        "trained {arch} from round {} on {}: {}, {}{resumed}; loss {:.3}, train accuracy {:.1}%, {:.0} img/s on {}; run `ferry-client export` next",
        s.base.round,
        count(s.train.samples as u64, "sample"),
        count(epochs.into(), "epoch"),
        count(s.round_steps, "step"),
        s.train.loss,
        100.0 * s.train.accuracy,
        s.train.images_per_sec,
        device,
    );
    Ok(())
}

/// Run `ferry-client eval`.
pub fn run_eval(args: &EvalArgs) -> Result<()> {
    let Resolved {
        state,
        arch,
        dev,
        data,
        ..
    } = args
        .data
        .resolve(DataSetting::Eval, SettingFlags::default())?;
    let (which, e) = eval_site(&state, &data, args.model, 256, &dev).context("evaluating")?;
    if args.json {
        let out = serde_json::json!({
            "model": which.to_string(),
            "arch": arch.name(),
            "samples": e.samples,
            "accuracy": e.accuracy,
            "char_accuracy": e.char_accuracy,
            "loss": e.loss,
        });
        outln!("{out}");
    } else {
        let chars = e
            .char_accuracy
            .map(|c| format!(", {:.1}% of characters", 100.0 * c))
            .unwrap_or_default();
        let what = if e.char_accuracy.is_some() {
            "plates read exactly"
        } else {
            "accuracy"
        };
        outln!(
            "{which} {arch} model on {}: {:.1}% {what}{chars} (loss {:.3})",
            count(e.samples as u64, "sample"),
            100.0 * e.accuracy,
            e.loss
        );
    }
    Ok(())
}

/// Run `ferry-client recalibrate`.
pub fn run_recalibrate(args: &RecalibrateArgs) -> Result<()> {
    let Resolved {
        state,
        arch,
        dev,
        data,
        ..
    } = args
        .data
        .resolve(DataSetting::Train, SettingFlags::default())?;
    let spinner = ProgressBar::new_spinner().with_message(format!(
        "re-estimating BatchNorm statistics on {} samples",
        data.len()
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let lock = state.lock()?;
    let res = recalibrate_site(&state, &lock, &data, args.batch, &dev).context("recalibrating");
    spinner.finish_and_clear();
    let (r, path) = res?;
    if args.json {
        return print_json(&serde_json::json!({
            "arch": arch.name(), "samples": r.samples, "batches": r.batches,
            "file": ferry_bundle::escape_path(&path),
        }));
    }
    if r.batches == 0 {
        outln!("{arch} has no BatchNorm layers: nothing to recalibrate; wrote the global unchanged to {}", ferry_bundle::escape_path(&path));
    } else {
        outln!(
            "recalibrated {arch} BatchNorm statistics on {} ({}); deployed model written to {} (the global and the local update are unchanged)",
            count(r.samples as u64, "sample"),
            count(r.batches as u64, "batch"),
            ferry_bundle::escape_path(&path)
        );
    }
    Ok(())
}

pub fn run_fisher(args: &FisherArgs) -> Result<()> {
    let Resolved {
        state,
        arch,
        dev,
        data,
        ..
    } = args
        .data
        .resolve(DataSetting::Train, SettingFlags::default())?;
    let cfg = FisherConfig {
        samples: args.samples,
        batch: args.batch,
        seed: 0,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("fisher [{bar:30}] {pos}/{len} batches")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let lock = state.lock()?;
    let res = fisher_site(&state, &lock, &data, &cfg, &dev, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .context("taking the Fisher estimate");
    bar.finish_and_clear();
    let est = res?;
    let values: usize = est.tensors.values().map(Vec::len).sum();
    if args.json {
        return print_json(&serde_json::json!({
            "arch": arch.name(), "samples": est.samples, "batches": est.batches,
            "tensors": est.tensors.len(), "values": values, "seconds": est.seconds,
        }));
    }
    outln!(
        "Fisher estimate of the local {arch} model: {} over {} tensors, from {} ({}) in {:.1} s; export --fisher ships it with the update",
        count(values as u64, "value"),
        est.tensors.len(),
        count(est.samples as u64, "sample"),
        count(est.batches as u64, "batch"),
        est.seconds
    );
    Ok(())
}
