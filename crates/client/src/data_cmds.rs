//! `ferry-client check-data` and `predict` (issue 16, the labelling barrier): look at a dataset before training
//! on it, and let the model propose the labels an operator then corrects. The reading is
//! `ferry_train::data` and `ferry_train::predict`; this module parses, prints and writes the CSV.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ferry_bundle::{escape, escape_path};
use ferry_cli::{count, outln, print_json};
use ferry_site::{load_site_model, site_arch, EvalTarget, SiteState};
use ferry_train::data::folder::{self, BadFile, TextEncoding};
use ferry_train::data::{DataSpec, LoadConfig};
use ferry_train::{device, DeviceChoice};

/// `ferry-client check-data`: a report on a dataset, without training.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-client check-data folder:/data/plates/labels.csv\n  ferry-client check-data --state site/ folder:/data/plates?labels=filename\n  ferry-client check-data folder:excel.csv --labels-encoding cp949 --json\n\nCounts the samples, shows how often each label (each plate character) occurs, and lists every\nunreadable image, bad label line and label character the model cannot read. Exits non-zero when it\nfinds a problem; train with --skip-bad to leave those samples out."
)]
pub struct CheckDataArgs {
    /// The dataset: folder:LABELS.csv, folder:DIR?labels=filename, plates:..., idx:...
    #[arg(value_name = "SPEC")]
    pub data: DataSpec,
    /// A site state: check the labels against its model's alphabet (default: every plate character ferry knows).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// The labels CSV's encoding: auto (UTF-8, else CP949), utf-8 or cp949.
    #[arg(long, value_name = "ENC")]
    pub labels_encoding: Option<TextEncoding>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `ferry-client predict`: what the site's model reads.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-client predict --state site/ --data folder:/data/new-plates --out /data/new-plates/labels.csv\n  ferry-client predict --state site/ /data/new-plates/cam2-0001.png\n\nWith --data, writes a labels CSV (path,label; UTF-8 with a byte-order mark, so Excel shows Hangul) of\nwhat the model reads on every image. Correct the wrong labels, then train on it:\n  ferry-client train --state site/ --data folder:/data/new-plates/labels.csv\nA CSV already there is never overwritten (it may hold corrections).",
    override_usage = "ferry-client predict --state <DIR> (--data <SPEC> --out <CSV> | <IMAGE>...) [OPTIONS]"
)]
pub struct PredictArgs {
    /// Site state directory.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Which model: auto (the local model if trained from the current global, else the global), global, local,
    /// deployed.
    #[arg(long, default_value = "auto", value_name = "MODEL")]
    pub model: EvalTarget,
    /// Images to read: folder:DIR (every .png/.jpg in it) or folder:LABELS.csv (the images it lists).
    #[arg(long, value_name = "SPEC", requires = "out", conflicts_with = "images")]
    pub data: Option<DataSpec>,
    /// The labels CSV to write (must not exist).
    #[arg(long, value_name = "CSV", requires = "data")]
    pub out: Option<PathBuf>,
    /// Device to compute on: cpu or cuda.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: DeviceChoice,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Image files to read.
    #[arg(value_name = "IMAGE", required_unless_present = "data")]
    pub images: Vec<PathBuf>,
}

fn where_line(b: &BadFile) -> String {
    match b.line {
        Some(l) => format!("line {l:<5} {}", escape_path(&b.path)),
        None => escape_path(&b.path),
    }
}

/// Warn about the samples `--skip-bad` left out (train, eval, recalibrate).
pub fn report_skipped(skipped: &[BadFile]) {
    for b in skipped {
        eprintln!("warning: skipped {}: {}", where_line(b), escape(&b.reason));
    }
    if !skipped.is_empty() {
        eprintln!(
            "warning: {} left out (--skip-bad); `ferry-client check-data` lists them all",
            count(skipped.len() as u64, "sample")
        );
    }
}

/// Run `ferry-client check-data`.
pub fn run_check_data(a: &CheckDataArgs) -> Result<()> {
    let mut spec = a.data.clone();
    if let (Some(enc), Some(o)) = (a.labels_encoding, spec.folder_options_mut()) {
        o.encoding = enc;
    }
    let (classes, input) = match &a.state {
        Some(dir) => {
            let state = SiteState::open(dir)?;
            let (_, arch) = site_arch(&state)?;
            (Some(arch.classes()), Some(arch.input()))
        }
        None => (None, None),
    };
    let cfg = LoadConfig {
        classes,
        input,
        ..LoadConfig::default()
    };
    let report = spec
        .check(&cfg)
        .with_context(|| format!("checking {}", escape(&spec.to_string())))?;
    let unknown: usize = report.outside_alphabet.values().sum();
    if a.json {
        let escaped = |m: &BTreeMap<String, usize>| -> BTreeMap<String, usize> {
            m.iter().map(|(k, v)| (escape(k), *v)).collect()
        };
        let bad: Vec<serde_json::Value> = report
            .bad
            .iter()
            .map(|b| {
                serde_json::json!({"line": b.line, "path": escape_path(&b.path), "reason": escape(&b.reason)})
            })
            .collect();
        print_json(&serde_json::json!({
            "data": escape(&spec.to_string()), "encoding": report.encoding, "listed": report.listed,
            "usable": report.usable, "task": report.task, "histogram": escaped(&report.histogram),
            "outside_alphabet": escaped(&report.outside_alphabet), "bad": bad,
        }))?;
    } else {
        outln!(
            "{}: {} listed, {} usable ({}; labels read from {})",
            escape(&spec.to_string()),
            count(report.listed as u64, "sample"),
            report.usable,
            report.task.unwrap_or("no usable label"),
            report.encoding
        );
        if !report.histogram.is_empty() {
            outln!(
                "label histogram ({}):",
                if report.task == Some("plate") {
                    "plate characters"
                } else {
                    "classes"
                }
            );
            for (label, n) in &report.histogram {
                outln!("  {:<6} {n}", escape(label));
            }
        }
        if !report.bad.is_empty() {
            outln!("bad samples ({}):", report.bad.len());
            for b in &report.bad {
                outln!("  {}: {}", where_line(b), escape(&b.reason));
            }
        }
        if !report.outside_alphabet.is_empty() {
            let list: Vec<String> = report
                .outside_alphabet
                .iter()
                .map(|(c, n)| format!("{} ({n})", escape(c)))
                .collect();
            outln!(
                "label characters the model cannot read: {}",
                list.join(", ")
            );
        }
    }
    if !report.bad.is_empty() || unknown > 0 {
        anyhow::bail!(
            "found {} and {} the model cannot read; fix them, or train with --skip-bad to leave bad samples out",
            count(report.bad.len() as u64, "bad sample"),
            count(unknown as u64, "label character")
        );
    }
    if !a.json {
        outln!("no problems found");
    }
    Ok(())
}

/// `path` as the labels CSV at `out` names it: relative to the CSV's folder when inside it, else absolute.
fn csv_path(out_dir: &Path, image: &Path) -> Option<String> {
    let abs = std::fs::canonicalize(image).ok()?;
    let rel = abs.strip_prefix(out_dir).unwrap_or(&abs);
    rel.to_str().map(str::to_string)
}

/// Run `ferry-client predict`.
pub fn run_predict(a: &PredictArgs) -> Result<()> {
    let state = SiteState::open(&a.state)?;
    let (_, arch) = site_arch(&state)?;
    let dev = device::select(&a.device)?;
    // The images first: a missing one is refused before the model is loaded.
    let (paths, mut bad): (Vec<PathBuf>, Vec<BadFile>) = match &a.data {
        Some(spec) => {
            let DataSpec::Folder { path, options } = spec else {
                anyhow::bail!(
                    "predict reads image files: give --data folder:DIR or folder:LABELS.csv, not {}",
                    escape(&spec.to_string())
                );
            };
            let listing = folder::list(path, options, true)
                .with_context(|| format!("listing {}", escape(&spec.to_string())))?;
            (
                listing.entries.into_iter().map(|e| e.path).collect(),
                listing.bad,
            )
        }
        None => (a.images.clone(), Vec::new()),
    };
    let out = match (&a.data, &a.out) {
        (Some(_), Some(out)) => {
            if out.exists() {
                anyhow::bail!(
                    "{} already exists (it may hold corrections); choose another --out or move it away",
                    escape_path(out)
                );
            }
            let dir = match out.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(p) => p.to_path_buf(),
                None => PathBuf::from("."),
            };
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("the folder of {}", escape_path(out)))?;
            Some((out.clone(), dir))
        }
        _ => None,
    };
    let input = arch.input();
    let mut pixels = Vec::new();
    let mut read_paths = Vec::new();
    for p in paths {
        match folder::decode_image(&p, input) {
            Ok(px) => {
                pixels.extend(px);
                read_paths.push(p);
            }
            Err(reason) if a.data.is_some() => bad.push(BadFile {
                line: None,
                path: p,
                reason: format!("cannot use the image: {reason}"),
            }),
            Err(reason) => {
                anyhow::bail!("cannot use image {}: {}", escape_path(&p), escape(&reason))
            }
        }
    }
    if read_paths.is_empty() {
        anyhow::bail!("no image could be read: nothing to predict");
    }
    let (which, model) = load_site_model(&state, a.model, &dev)?;
    let texts = ferry_train::predict::read(&model, &pixels, 64).context("reading the images")?;
    for b in &bad {
        eprintln!("warning: skipped {}: {}", where_line(b), escape(&b.reason));
    }
    let Some((out, out_dir)) = out else {
        if a.json {
            return print_json(&serde_json::json!({
                "model": which.to_string(), "arch": arch.name(),
                "readings": read_paths.iter().zip(&texts).map(|(p, t)| serde_json::json!({
                    "image": escape_path(p), "label": escape(t)})).collect::<Vec<_>>(),
            }));
        }
        for (p, t) in read_paths.iter().zip(&texts) {
            outln!("{}  {}", escape_path(p), escape(t));
        }
        return Ok(());
    };
    let mut w = csv::Writer::from_writer(b"\xEF\xBB\xBF".to_vec());
    w.write_record(["path", "label"])?;
    let mut written = 0u64;
    for (p, t) in read_paths.iter().zip(&texts) {
        let Some(name) = csv_path(&out_dir, p) else {
            eprintln!(
                "warning: skipped {}: its name is not UTF-8 text, which a CSV cannot hold",
                escape_path(p)
            );
            continue;
        };
        w.write_record([name.as_str(), t.as_str()])?;
        written += 1;
    }
    w.flush().context("writing the CSV")?;
    let bytes = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("writing the CSV: {}", e.error()))?;
    ferry_bundle::fsutil::write_new(&out, &bytes)?;
    if a.json {
        return print_json(&serde_json::json!({
            "model": which.to_string(), "arch": arch.name(), "file": escape_path(&out),
            "images": written, "skipped": bad.len(),
        }));
    }
    outln!(
        "wrote {}: what the {which} {arch} model reads on {}; correct the wrong labels, then train with --data folder:{}",
        escape_path(&out),
        count(written, "image"),
        escape_path(&out)
    );
    Ok(())
}
