//! `ferry-client round` (issue 16): a site's whole round in one command, with the remembered settings.
//!
//! 1. import: the newest global on the stick that verifies and passes the import checks
//!    (`SiteState::pick_global`), with the revocation lists on the stick and, at a site that pins the
//!    federation's root key, the newest root-signed HQ key list on it;
//! 2. train, with the recipe from flags / `ferry.toml` / defaults;
//! 3. evaluate on `eval-data`, if set;
//! 4. export the update to the stick;
//! 5. say in plain words what to carry back.
//!
//! Each step looks at the state first and skips what is done (the global already held, a local model already
//! trained from it, an update already exported), and training resumes from its last epoch checkpoint, so after
//! a power cut the same command continues where it stopped.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ferry_bundle::{escape, escape_path, short};
use ferry_cli::{count, outln};
use ferry_site::{
    eval_site, fisher_site, site_arch, train_site, EvalTarget, ExportOptions, ImportOutcome,
    ImportPolicy, ImportTrust, SiteState, DEFAULT_MAX_ROUND_JUMP,
};
use ferry_train::data::LoadConfig;
use ferry_train::fisher::FisherConfig;
use ferry_train::{device, AdamConfig, EpochStats, TrainConfig, TrainObserver};

use crate::config_cmd::{Effective, SettingFlags};

/// `ferry-client round`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-client round --state site/                      # everything from site/ferry.toml\n  ferry-client round --state site/ --stick /media/usb --epochs 2\n\nImports the newest global on the stick (saying why it skipped the other files), trains it on the\nlocal data, evaluates it on eval-data if set, exports the update to the stick and says what to\ncarry back. Interrupted (a power cut), run it again: it continues where it stopped."
)]
pub struct RoundArgs {
    /// The site's state directory (made by `ferry-client enroll`).
    #[arg(long)]
    pub state: PathBuf,
    #[command(flatten)]
    pub flags: SettingFlags,
    /// Refuse a global more than this many rounds ahead of the one held.
    #[arg(long, default_value_t = DEFAULT_MAX_ROUND_JUMP)]
    pub max_round_jump: u64,
    /// Print one JSON object instead of the step lines: the steps done (or skipped, and why), the files written,
    /// and what to carry. Notes, warnings and epoch lines stay on stderr.
    #[arg(long)]
    pub json: bool,
}

/// What a round did: printed as step lines, or as one JSON object with `--json` ([`Report::to_json`]).
#[derive(Debug, Default)]
struct Report {
    /// The site's id and federation (from the enrolment pin).
    site: Option<String>,
    federation: Option<String>,
    /// The round of the global trained from.
    round: u64,
    /// The stick looked at.
    stick: String,
    /// One object per step: `step`, `status` (`done`, `already-done` or `skipped`), `summary` (the words the
    /// text output prints) and the step's numbers.
    steps: Vec<serde_json::Value>,
    /// Files this run wrote (the update on the stick), escaped.
    written: Vec<String>,
    /// What to carry back to HQ: file, bytes, tensors, to, note.
    carry: Option<serde_json::Value>,
    /// Files on the stick passed over, and why: file, why.
    skipped: Vec<serde_json::Value>,
    /// Warnings (also printed on stderr).
    warnings: Vec<String>,
}

impl Report {
    /// Record a step; in text mode print its line (`N name  summary`).
    fn step(
        &mut self,
        json: bool,
        name: &'static str,
        status: &'static str,
        summary: String,
        mut extra: serde_json::Value,
    ) -> Result<()> {
        if !json {
            let n = self.steps.len() + 1;
            outln!("{n} {name:<9} {summary}");
        }
        extra["step"] = name.into();
        extra["status"] = status.into();
        extra["summary"] = summary.into();
        self.steps.push(extra);
        Ok(())
    }

    fn warn(&mut self, warnings: &[String]) {
        for w in warnings {
            eprintln!("warning: {w}");
            self.warnings.push(w.clone());
        }
    }

    fn skip(&mut self, file: &Path, why: &str) {
        let file = escape(&file.file_name().unwrap_or_default().to_string_lossy());
        eprintln!("note: skipped {file}: {why}");
        self.skipped
            .push(serde_json::json!({"file": file, "why": why}));
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "site": self.site, "federation": self.federation, "round": self.round, "stick": self.stick,
            "steps": self.steps, "written": self.written, "carry": self.carry, "skipped": self.skipped,
            "warnings": self.warnings,
        })
    }
}

/// One line per finished epoch, on stderr.
struct EpochLines;

impl TrainObserver for EpochLines {
    fn on_epoch(&mut self, e: &EpochStats) {
        eprintln!(
            "  epoch {}: loss {:.3}, train accuracy {:.1}%, {:.0} img/s (checkpoint saved)",
            e.epoch + 1,
            e.loss,
            100.0 * e.accuracy,
            e.images_per_sec
        );
    }
    fn on_note(&mut self, note: &str) {
        eprintln!("  {note}");
    }
}

/// The files with extension `ext` in the stick's top folder (`ferry-rev` revocation lists, `ferry-keys` HQ key
/// lists), sorted.
fn stick_files(stick: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    let entries = std::fs::read_dir(stick)
        .with_context(|| format!("reading the stick {}", escape_path(stick)))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with('.') && name.ends_with(&format!(".{ext}")) {
            v.push(e.path());
        }
    }
    v.sort();
    Ok(v)
}

/// For a site that pins a root key: the newest root-signed HQ key list on the stick that this site accepts
/// (a new HQ key travels this way), set as `trust.hq_keys`. Lists that do not verify under the pinned root, are
/// of another federation or older than the one held are passed over with a note.
fn take_hq_key_list(
    state: &SiteState,
    stick: &Path,
    trust: &mut ImportTrust,
    policy: &ImportPolicy,
    report: &mut Report,
) -> Result<()> {
    let Some(root) = state.pin()?.and_then(|p| p.root_key().ok().flatten()) else {
        return Ok(());
    };
    let mut best: Option<(u64, (String, Vec<u8>))> = None;
    for p in stick_files(stick, ferry_bundle::keylist::EXTENSION)? {
        let bytes = match ferry_bundle::keylist::read_bytes(&p) {
            Ok(b) => b,
            Err(e) => {
                report.skip(&p, &e.to_string());
                continue;
            }
        };
        let mut t = trust.clone();
        t.hq_keys = Some((escape_path(&p), bytes.clone()));
        if let Err(e) = state.prepare_import(&t, policy) {
            report.skip(&p, &e.to_string());
            continue;
        }
        let serial = ferry_bundle::keylist::verify(&bytes, &root).map_or(0, |(l, _)| l.serial);
        if best.as_ref().is_none_or(|(s, _)| serial > *s) {
            best = Some((serial, (escape_path(&p), bytes)));
        }
    }
    if let Some((_, list)) = best {
        trust.hq_keys = Some(list);
    }
    Ok(())
}

pub fn run_round(a: &RoundArgs) -> Result<()> {
    let state = SiteState::open(&a.state)?;
    let eff = Effective::resolve(&state, &a.flags).context("reading the settings")?;
    let Some(stick) = eff.stick.0.clone() else {
        anyhow::bail!(
            "where is the stick? give --stick PATH, or set `stick = \"/media/usb\"` in {}",
            escape_path(&state.settings_path())
        );
    };
    if !stick.is_dir() {
        anyhow::bail!(
            "the stick {} is not mounted (no such folder)",
            escape_path(&stick)
        );
    }
    let policy = ImportPolicy {
        max_round_jump: a.max_round_jump,
        ..ImportPolicy::default()
    };
    let json = a.json;
    let mut report = Report {
        stick: escape_path(&stick),
        ..Report::default()
    };

    // 1. Import.
    let keys = match &eff.trust.0 {
        Some(t) => ferry_cli::load_keyring(t)?,
        None => ferry_bundle::Keyring::new(),
    };
    let mut trust = ImportTrust {
        keys,
        ..ImportTrust::default()
    };
    // A newer HQ key list first: the revocation lists may be signed by the HQ key it brings.
    take_hq_key_list(&state, &stick, &mut trust, &policy, &mut report)?;
    // Lists that do not verify for this site (another federation's, damaged) are passed over, not fatal.
    for p in stick_files(&stick, ferry_bundle::revocation::EXTENSION)? {
        let one = ferry_cli::read_revocation_files(std::slice::from_ref(&p))?;
        let mut t = trust.clone();
        t.revocations.extend(one.clone());
        match state.prepare_import(&t, &policy) {
            Ok(_) => trust.revocations.extend(one),
            Err(e) => report.skip(&p, &e.to_string()),
        }
    }
    let prepared = state.prepare_import(&trust, &policy)?;
    let picked = state.pick_global(&stick, &prepared, &policy)?;
    for (p, why) in &picked.skipped {
        report.skip(p, why);
    }
    let round = picked.bundle.manifest.round;
    report.round = round;
    let numbers = serde_json::json!({
        "round": round, "file": escape_path(&picked.path), "hash": picked.bundle.hash,
    });
    match state.import_new(
        &picked.bundle,
        &picked.path.display().to_string(),
        &policy,
        &prepared,
    )? {
        ImportOutcome::AlreadyCurrent { warnings } => {
            report.step(
                json,
                "import",
                "already-done",
                format!(
                    "round {round} is already imported ({})",
                    short(&picked.bundle.hash)
                ),
                numbers,
            )?;
            report.warn(&warnings);
        }
        ImportOutcome::Installed { warnings, .. } => {
            report.step(
                json,
                "import",
                "done",
                format!(
                    "imported round {round} from {} ({})",
                    escape_path(&picked.path),
                    short(&picked.bundle.hash)
                ),
                numbers,
            )?;
            report.warn(&warnings);
        }
    }

    // 2. Train (and 3. evaluate) unless the local model of this global exists already.
    let (global, arch) = site_arch(&state)?;
    let dev_choice = eff.device.0.unwrap_or_default();
    let dev = device::select(&dev_choice)?;
    let load = |spec: &ferry_train::data::DataSpec| {
        spec.load(&LoadConfig {
            limit: eff.limit.0,
            font: None,
            input: Some(arch.input()),
            classes: Some(arch.classes()),
        })
        .with_context(|| format!("loading {spec}"))
    };
    let fresh = state.local()?.filter(|l| l.base_hash == global.hash);
    let exported = fresh.as_ref().and_then(|l| l.exported.clone());
    if let Some(l) = &fresh {
        report.step(
            json,
            "train",
            "already-done",
            format!(
                "already trained from round {} ({}, {})",
                l.round,
                count(l.samples, "sample"),
                count(l.epochs.into(), "epoch")
            ),
            serde_json::json!({"round": l.round, "samples": l.samples, "epochs": l.epochs}),
        )?;
    } else {
        let Some(spec) = eff.data.0.as_ref() else {
            anyhow::bail!(
                "what data does this site train on? give --data SPEC, or set `data = \"folder:/data/labels.csv\"` in {}",
                escape_path(&state.settings_path())
            );
        };
        let data = load(spec)?;
        report.warn(&eff.warnings(data.len()));
        let (epochs, lr, warmup, batch, seed) = eff.recipe();
        let cfg = TrainConfig {
            epochs,
            batch,
            seed,
            adam: AdamConfig {
                lr,
                warmup,
                ..AdamConfig::default()
            },
            augment: eff.augment(arch),
        };
        let lock = state.lock()?;
        let s =
            train_site(&state, &lock, &data, &cfg, &dev, &mut EpochLines).context("training")?;
        drop(lock);
        let resumed = s
            .resumed_after
            .map(|e| format!(", resumed after epoch {e}"))
            .unwrap_or_default();
        report.step(
            json,
            "train",
            "done",
            format!(
                "trained {arch} from round {} on {}: {}, {}{resumed}; loss {:.3}",
                s.base.round,
                count(s.train.samples as u64, "sample"),
                count(epochs.into(), "epoch"),
                count(s.round_steps, "step"),
                s.train.loss
            ),
            serde_json::json!({
                "round": s.base.round, "samples": s.train.samples, "epochs": epochs,
                "steps": s.round_steps, "resumed_after": s.resumed_after, "loss": s.train.loss,
                "accuracy": s.train.accuracy,
            }),
        )?;
    }
    match (eff.eval_data.0.as_ref(), &exported) {
        (Some(spec), None) => {
            let data = load(spec)?;
            let (which, e) =
                eval_site(&state, &data, EvalTarget::Auto, 256, &dev).context("evaluating")?;
            let chars = e
                .char_accuracy
                .map(|c| format!(", {:.1}% of characters", 100.0 * c))
                .unwrap_or_default();
            report.step(
                json,
                "evaluate",
                "done",
                format!(
                    "{which} model on {}: {:.1}% correct{chars}",
                    count(e.samples as u64, "sample"),
                    100.0 * e.accuracy
                ),
                serde_json::json!({
                    "model": which.to_string(), "samples": e.samples, "accuracy": e.accuracy,
                    "char_accuracy": e.char_accuracy, "loss": e.loss,
                }),
            )?;
        }
        (Some(_), Some(_)) => report.step(
            json,
            "evaluate",
            "skipped",
            "skipped: the update already left".into(),
            serde_json::json!({}),
        )?,
        (None, _) => report.step(
            json,
            "evaluate",
            "skipped",
            "skipped: no eval-data set (ferry.toml eval-data, or --eval-data)".into(),
            serde_json::json!({}),
        )?,
    }

    // 4. Export.
    let cur = state.require_current()?;
    let (file, bytes, tensors) = match exported {
        Some(hash) => {
            let entry = state.last_export(&cur.federation, cur.round)?;
            // The file the audit log names, or (a crash before the log line) the conventional name.
            let site = state.pin()?.and_then(|p| p.site).unwrap_or_default();
            let on_stick = entry
                .as_ref()
                .map(|e| PathBuf::from(&e.file))
                .and_then(|p| p.file_name().map(|n| stick.join(n)))
                .or_else(|| Some(stick.join(format!("{site}-r{}.ferry", cur.round))))
                .filter(|p| std::fs::read(p).is_ok_and(|b| ferry_bundle::sha256_hex(&b) == hash));
            let Some(path) = on_stick else {
                anyhow::bail!(
                    "the update of round {} left earlier ({}), but it is not on this stick: carry the stick it went to, or replace it with `ferry-client export --again`",
                    cur.round,
                    short(&hash)
                );
            };
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let tensors = entry.map(|e| e.tensors.len()).unwrap_or(0);
            report.step(
                json,
                "export",
                "already-done",
                format!("already on the stick: {}", escape_path(&path)),
                serde_json::json!({"file": escape_path(&path), "hash": hash}),
            )?;
            (path, size, tensors)
        }
        None => {
            let key = ferry_cli::read_secret_key(&eff.key(&state)?)?;
            let lock = state.lock()?;
            if state.last_export(&cur.federation, cur.round)?.is_none() {
                remove_unrecorded_update(&stick, &key, &cur.hash, cur.round)?;
            }
            let encrypt_to = crate::encrypt::from_settings(&state)?;
            // ferry.toml `fisher = true` (HQ merges with --strategy fisher): the estimate goes with the update.
            let fisher = eff.fisher.0 == Some(true);
            let have = state.local()?.is_some_and(|l| l.fisher_sha256.is_some());
            if fisher && !have {
                let Some(spec) = eff.data.0.as_ref() else {
                    anyhow::bail!(
                        "`fisher = true` needs the training data for the estimate: set `data` in {}",
                        escape_path(&state.settings_path())
                    );
                };
                let data = load(spec)?;
                let est = fisher_site(
                    &state,
                    &lock,
                    &data,
                    &FisherConfig::default(),
                    &dev,
                    &mut |_, _| {},
                )
                .context("taking the Fisher estimate")?;
                report.step(
                    json,
                    "fisher",
                    "done",
                    format!(
                        "Fisher estimate of the local model on {} ({:.1} s)",
                        count(est.samples as u64, "sample"),
                        est.seconds
                    ),
                    serde_json::json!({"samples": est.samples, "seconds": est.seconds}),
                )?;
            }
            let options = ExportOptions {
                level: 3,
                again: false,
                encrypt_to,
                fisher,
            };
            let (path, sealed) = state.export_with(&lock, &key, &stick, &options)?;
            report.step(
                json,
                "export",
                "done",
                format!("wrote {} ({})", escape_path(&path), short(&sealed.hash)),
                serde_json::json!({"file": escape_path(&path), "hash": sealed.hash}),
            )?;
            report.written.push(escape_path(&path));
            (
                path,
                sealed.bytes.len() as u64,
                sealed.manifest.tensors.len(),
            )
        }
    };

    // 5. What to carry.
    let pin = state.pin()?;
    report.site = pin
        .as_ref()
        .and_then(|p| p.site.clone())
        .map(|s| escape(&s));
    report.federation = Some(escape(&cur.federation));
    let site = report.site.clone().unwrap_or_else(|| "this site".into());
    let note = format!(
        "It holds the model's weights only ({}), signed by {site}: no images, no labels. `ferry-client log --state {}` lists what left.",
        count(tensors as u64, "tensor"),
        escape_path(&a.state)
    );
    if json {
        report.carry = Some(serde_json::json!({
            "file": escape_path(&file), "bytes": bytes, "tensors": tensors, "to": "HQ", "note": note,
        }));
        return ferry_cli::print_json(&report.to_json());
    }
    outln!();
    outln!(
        "Carry {} ({}) back to HQ on this stick.",
        escape_path(&file),
        count(bytes, "byte")
    );
    outln!("{note}");
    Ok(())
}

/// A power cut between writing the update to the stick and recording it leaves a file the state does not know:
/// exporting again would refuse to overwrite it. If that file is this site's own update of the current global
/// (it verifies under this site's key) and the audit log records no export for the round, it never left this
/// PC: remove it, and the export writes it again.
fn remove_unrecorded_update(
    stick: &Path,
    key: &ferry_bundle::SecretKey,
    base: &str,
    round: u64,
) -> Result<()> {
    let path = stick.join(format!("{}-r{round}.ferry", key.id()));
    if !path.is_file() {
        return Ok(());
    }
    let mut ring = ferry_bundle::Keyring::new();
    ring.add(key.public())?;
    if let Ok(b) = ferry_bundle::open_file(&path, &ring) {
        if b.manifest.base.as_deref() == Some(base) {
            eprintln!(
                "note: {} was written by an interrupted run and never recorded; writing it again",
                escape_path(&path)
            );
            std::fs::remove_file(&path)
                .with_context(|| format!("removing {}", escape_path(&path)))?;
        }
    }
    Ok(())
}
