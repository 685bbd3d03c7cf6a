//! HQ's quality gate and federation view (issue 16): `ferry-server eval`, `diff`, `republish`, `report`, and the
//! evaluator behind `merge --require-eval`. The evaluation is ferry-train's (`ferry_train::evaluate`, the call
//! `ferry-client eval` makes through ferry-site); the gate, the diff and the republished round are ferry-merge's;
//! this module parses, loads and prints.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ferry_bundle::{escape, escape_path, short, Bundle};
use ferry_cli::{describe, outln, print_json, read_secret_key};
use ferry_merge::EvalRecord;
use ferry_train::data::{DataSpec, Dataset, LoadConfig};
use ferry_train::Arch;

/// HQ's validation data, loaded once for the architecture it evaluates.
pub struct Evaluator {
    spec: String,
    arch: Arch,
    data: Dataset,
}

impl Evaluator {
    /// Load `spec` at `arch`'s input size.
    pub fn load(spec: &DataSpec, arch: Arch, limit: Option<usize>) -> Result<Evaluator> {
        let cfg = LoadConfig {
            limit,
            input: Some(arch.input()),
            classes: Some(arch.classes()),
            ..LoadConfig::default()
        };
        let data = spec
            .load(&cfg)
            .with_context(|| format!("loading {}", escape(&spec.to_string())))?;
        Ok(Evaluator {
            spec: spec.to_string(),
            arch,
            data,
        })
    }

    /// For the federation in HQ's state `dir` (its architecture from the ledger).
    pub fn for_state(dir: &Path, spec: &DataSpec) -> Result<Evaluator> {
        let s = ferry_merge::hq::status(dir)?;
        let Some(name) = s.arch else {
            anyhow::bail!(
                "the federation in {} has no architecture ferry can evaluate (it started from --weights)",
                escape_path(dir)
            );
        };
        Evaluator::load(spec, Arch::from_name(&name)?, None)
    }

    /// Evaluate a verified bundle's weights (`ferry_train::evaluate`, as a site's `eval`).
    pub fn evaluate(&self, bundle: &Bundle) -> Result<EvalRecord, String> {
        let arch = bundle.manifest.arch.as_deref().unwrap_or("");
        if arch != self.arch.name() {
            return Err(format!(
                "the bundle's architecture is {:?}, the data was loaded for {}",
                escape(arch),
                self.arch
            ));
        }
        let model = ferry_train::Model::from_safetensors(
            self.arch,
            bundle.payload(),
            &ferry_train::Device::Cpu,
        )
        .map_err(|e| e.to_string())?;
        let e = ferry_train::evaluate(&model, &self.data, 256).map_err(|e| e.to_string())?;
        Ok(EvalRecord {
            time: ferry_bundle::unix_now(),
            data: self.spec.clone(),
            samples: e.samples as u64,
            accuracy: e.accuracy,
            char_accuracy: e.char_accuracy,
            loss: e.loss,
        })
    }
}

fn eval_line(e: &EvalRecord) -> String {
    let chars = e
        .char_accuracy
        .map(|c| format!(", {:.1}% of characters", 100.0 * c))
        .unwrap_or_default();
    format!(
        "{:.1}% exact{chars} on {} samples of {} (loss {:.3})",
        100.0 * e.accuracy,
        e.samples,
        escape(&e.data),
        e.loss
    )
}

/// What `merge --require-eval` prints after a merge the gate passed: the two scores it recorded.
pub fn print_gate(state: &Path) -> Result<()> {
    let s = ferry_merge::hq::status(state)?;
    let n = s.rounds.len();
    if n < 2 {
        return Ok(());
    }
    if let (Some(before), Some(after)) =
        (s.rounds[n - 2].evals.last(), s.rounds[n - 1].evals.last())
    {
        outln!(
            "quality gate passed: round {} reads {}; round {} read {:.1}%",
            s.rounds[n - 1].round,
            eval_line(after),
            s.rounds[n - 2].round,
            100.0 * before.accuracy
        );
    }
    Ok(())
}

/// `ferry-server eval`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-server eval --trust keys/hq.pub --data folder:/data/hq-validation/labels.csv bundles/global-r4.ferry\n  ferry-server eval --trust keys/ --state hq/ --data plates:mixed:500:99 /media/usb/site-b-r4.ferry --json\n\nVerifies the bundle (a global or a site's update) against --trust, then evaluates its weights on HQ's\nown data. With --state, the result of a global HQ produced is recorded in the ledger (ferry-server status,\nreport)."
)]
pub struct EvalArgs {
    /// Trusted public keys (.pub files or folders): HQ's for a global, the sites' for an update.
    #[arg(long, required = true)]
    pub trust: Vec<PathBuf>,
    /// HQ's validation data: folder:LABELS.csv, plates:..., idx:... (docs/training.md).
    #[arg(long, value_name = "SPEC")]
    pub data: DataSpec,
    /// HQ state directory: record the result in the ledger when the bundle is one of its globals.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Use only the first N samples.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The global or update bundle.
    pub bundle: PathBuf,
}

/// Run `ferry-server eval`.
pub fn eval(a: &EvalArgs) -> Result<()> {
    let ring = ferry_cli::load_keyring(&a.trust)?;
    let bundle = ferry_cli::open_bundle(&a.bundle, &ring)?;
    let Some(arch) = bundle.manifest.arch.as_deref() else {
        anyhow::bail!(
            "{} carries weights of no architecture ferry knows (started from --weights): nothing to evaluate",
            escape_path(&a.bundle)
        );
    };
    let arch = Arch::from_name(arch)?;
    let ev = Evaluator::load(&a.data, arch, a.limit)?;
    let rec = ev.evaluate(&bundle).map_err(anyhow::Error::msg)?;
    let recorded = match &a.state {
        Some(dir) => ferry_merge::hq::record_eval(dir, &bundle.hash, rec.clone())?,
        None => None,
    };
    if a.json {
        return print_json(&serde_json::json!({
            "file": escape_path(&a.bundle), "hash": bundle.hash, "round": bundle.manifest.round,
            "kind": bundle.manifest.kind, "arch": arch.name(), "eval": rec, "recorded_round": recorded,
        }));
    }
    outln!(
        "{}: {}",
        escape_path(&a.bundle),
        describe(&bundle.manifest, &bundle.hash)
    );
    outln!("{}", eval_line(&rec));
    match (recorded, &a.state) {
        (Some(r), _) => outln!("recorded in the ledger with round {r}"),
        (None, Some(_)) => {
            outln!("not recorded: this bundle is not a global of the ledger")
        }
        (None, None) => {}
    }
    Ok(())
}

/// `ferry-server diff`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-server diff --trust keys/ bundles/global-r3.ferry bundles/global-r4.ferry\n  ferry-server diff --trust keys/ bundles/global-r4.ferry /media/usb/site-b-r4.ferry --json\n\nVerifies both bundles, then shows per tensor the L2 norm of the difference (B - A), that norm relative\nto A's tensor, and the largest absolute difference."
)]
pub struct DiffArgs {
    /// Trusted public keys (.pub files or folders) that signed the bundles.
    #[arg(long, required = true)]
    pub trust: Vec<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The first bundle (the reference).
    pub a: PathBuf,
    /// The second bundle.
    pub b: PathBuf,
}

/// Run `ferry-server diff`.
pub fn diff(a: &DiffArgs) -> Result<()> {
    let ring = ferry_cli::load_keyring(&a.trust)?;
    let ba = ferry_cli::open_bundle(&a.a, &ring)?;
    let bb = ferry_cli::open_bundle(&a.b, &ring)?;
    let d = ferry_merge::diff::diff(&ba, &bb)
        .with_context(|| format!("{} and {}", escape_path(&a.a), escape_path(&a.b)))?;
    if a.json {
        return print_json(&serde_json::json!({
            "a": {"file": escape_path(&a.a), "hash": ba.hash, "round": ba.manifest.round},
            "b": {"file": escape_path(&a.b), "hash": bb.hash, "round": bb.manifest.round},
            "total_l2": d.total_l2, "tensors": d.tensors,
        }));
    }
    outln!(
        "A {}: {}",
        escape_path(&a.a),
        describe(&ba.manifest, &ba.hash)
    );
    outln!(
        "B {}: {}",
        escape_path(&a.b),
        describe(&bb.manifest, &bb.hash)
    );
    outln!(
        "{:<40} {:>14} {:>10} {:>12}",
        "tensor",
        "L2(B-A)",
        "relative",
        "max |B-A|"
    );
    for t in &d.tensors {
        let rel = t
            .relative
            .map_or_else(|| "-".to_string(), |r| format!("{r:.4}"));
        outln!(
            "{:<40} {:>14.6} {:>10} {:>12.6}",
            t.name,
            t.l2,
            rel,
            t.max_abs
        );
    }
    outln!("total L2 over float tensors: {:.6}", d.total_l2);
    Ok(())
}

/// `ferry-server republish`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example (round 5 turned out bad; go back to round 4's weights):\n  ferry-server republish --key keys/hq.key --state hq/ --from-round 4 --out /media/usb/\n\nSites refuse a global older than the one they hold, so a rollback is a new round: this signs round 4's\nweights as round N+1 (based on the current global), records it in the ledger and writes\nglobal-r<N+1>.ferry. Sites import it like any new global. It is encrypted to the same keys as the current\nglobal unless --encrypt-to or --no-encrypt says otherwise."
)]
pub struct RepublishArgs {
    /// HQ's secret key.
    #[arg(long)]
    pub key: PathBuf,
    /// HQ state directory.
    #[arg(long)]
    pub state: PathBuf,
    /// The round whose global's weights to re-issue.
    #[arg(long, value_name = "N")]
    pub from_round: u64,
    /// Directory to write the new global into.
    #[arg(long, default_value = "bundles")]
    pub out: PathBuf,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    pub level: i32,
    /// Days until the new global expires.
    #[arg(long, default_value_t = ferry_bundle::manifest::DEFAULT_GLOBAL_VALIDITY / 86_400)]
    pub valid_days: u64,
    /// --encrypt-to PUB / --no-encrypt (default: as the current global).
    #[command(flatten)]
    pub encrypt: crate::recipients::EncryptArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run `ferry-server republish`.
pub fn republish(a: &RepublishArgs) -> Result<()> {
    let key = read_secret_key(&a.key)?;
    let (path, sealed) = ferry_merge::hq::republish(
        &a.state,
        &key,
        a.from_round,
        a.level,
        a.valid_days.saturating_mul(86_400),
        &a.encrypt.resolve(&a.state)?,
        &a.out,
    )?;
    if a.json {
        return print_json(&serde_json::json!({
            "file": escape_path(&path), "hash": sealed.hash, "round": sealed.manifest.round,
            "from_round": a.from_round, "manifest": sealed.manifest,
        }));
    }
    outln!(
        "wrote {} ({} bytes): the weights of round {} re-issued as {}",
        escape_path(&path),
        sealed.bytes.len(),
        a.from_round,
        describe(&sealed.manifest, &sealed.hash)
    );
    Ok(())
}

/// `ferry-server report`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferry-server report --state hq/ --out hq-report/\n  xdg-open hq-report/index.html\n\nWrites index.html (rounds, contributors with their samples, merge weights and distances, and HQ's\nevaluations) and the plots accuracy.png and distance.png, from the ledger alone."
)]
pub struct ReportArgs {
    /// HQ state directory.
    #[arg(long)]
    pub state: PathBuf,
    /// Folder to write the report into (created if missing).
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
}

/// Escape text for HTML (after the terminal escape: a name from a stick never carries markup or control
/// characters into the page).
fn html(s: &str) -> String {
    escape(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The report page of a ledger. `plots` names the PNGs written beside it.
pub fn report_html(s: &ferry_merge::LedgerStatus, plots: &[&str]) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>ferry federation {fed}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #bbb;padding:.25em .6em;text-align:left}}td.n{{text-align:right}}\
         img{{max-width:100%}}</style></head><body>\n\
         <h1>Federation {fed}</h1>\n<p>architecture {arch} &middot; model {model} &middot; current round {round} \
         (global <code>{global}</code>)</p>\n",
        fed = html(&s.federation),
        arch = html(s.arch.as_deref().unwrap_or("(foreign weights)")),
        model = html(short(&s.model_fingerprint)),
        round = s.round,
        global = html(short(&s.global)),
    );
    for p in plots {
        let _ = writeln!(h, "<p><img src=\"{p}\" alt=\"{p}\"></p>");
    }
    h.push_str(
        "<h2>Rounds</h2>\n<table><tr><th>round</th><th>global</th><th>made</th><th>how</th>\
         <th>HQ evaluation</th></tr>\n",
    );
    for r in &s.rounds {
        let time = r.time.map_or_else(|| "-".to_string(), ferry_bundle::utc);
        let evals: Vec<String> = r
            .evals
            .iter()
            .map(|e| {
                format!(
                    "{:.2}% on {} ({} samples, {})",
                    100.0 * e.accuracy,
                    html(&e.data),
                    e.samples,
                    ferry_bundle::utc(e.time)
                )
            })
            .collect();
        let _ = writeln!(
            h,
            "<tr><td class=\"n\">{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.round,
            html(short(&r.global)),
            time,
            html(&r.strategy),
            if evals.is_empty() {
                "-".to_string()
            } else {
                evals.join("<br>")
            }
        );
    }
    h.push_str(
        "</table>\n<h2>Contributors</h2>\n<table><tr><th>round</th><th>site</th><th>samples</th>\
         <th>weight</th><th>distance</th><th>update</th></tr>\n",
    );
    for r in &s.rounds {
        for c in &r.contributors {
            let st = r.stats.iter().find(|x| x.bundle == c.bundle);
            let weight = st
                .and_then(|x| x.weight)
                .map_or_else(|| "-".to_string(), |w| format!("{w:.4}"));
            let dist = st.map_or_else(|| "-".to_string(), |x| format!("{:.4}", x.distance));
            let _ = writeln!(
                h,
                "<tr><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{weight}</td>\
                 <td class=\"n\">{dist}</td><td><code>{}</code></td></tr>",
                r.round,
                html(&c.site),
                c.samples,
                html(short(&c.bundle))
            );
        }
    }
    h.push_str(
        "</table>\n<p>Written by ferry-server report from the ledger.</p>\n</body></html>\n",
    );
    h
}

/// Run `ferry-server report`.
pub fn report(a: &ReportArgs) -> Result<()> {
    let s = ferry_merge::hq::status(&a.state)?;
    ferry_bundle::fsutil::ensure_dir(&a.out)?;
    let mut plots = Vec::new();
    // Accuracy per round, one line per evaluation data set.
    let mut acc: Vec<ferry_plot::Series> = Vec::new();
    for r in &s.rounds {
        for e in &r.evals {
            let name = escape(&e.data);
            let i = match acc.iter().position(|x| x.name == name) {
                Some(i) => i,
                None => {
                    acc.push(ferry_plot::Series {
                        name,
                        points: Vec::new(),
                    });
                    acc.len() - 1
                }
            };
            // The last evaluation of a round on a data set stands for it.
            acc[i].points.retain(|p| p.0 != r.round as f64);
            acc[i].points.push((r.round as f64, e.accuracy));
        }
    }
    // Distance from the base per site and round.
    let mut dist: Vec<ferry_plot::Series> = Vec::new();
    for r in &s.rounds {
        for st in &r.stats {
            let name = escape(&st.site);
            let i = match dist.iter().position(|x| x.name == name) {
                Some(i) => i,
                None => {
                    dist.push(ferry_plot::Series {
                        name,
                        points: Vec::new(),
                    });
                    dist.len() - 1
                }
            };
            dist[i].points.push((r.round as f64, st.distance));
        }
    }
    // Plots go through a temporary name and a rename, like every file ferry writes.
    let write_plot =
        |name: &str, draw: &dyn Fn(&Path) -> Result<(), ferry_plot::PlotError>| -> Result<()> {
            let tmp = a.out.join(format!(".{name}.tmp.png"));
            draw(&tmp)?;
            let bytes = std::fs::read(&tmp).with_context(|| escape_path(&tmp))?;
            let _ = std::fs::remove_file(&tmp);
            ferry_bundle::fsutil::write_replace(&a.out.join(name), &bytes)?;
            Ok(())
        };
    if !acc.is_empty() {
        write_plot("accuracy.png", &|p: &Path| {
            ferry_plot::plot_accuracy(p, "HQ evaluation per round", "round", &acc)
        })?;
        plots.push("accuracy.png");
    }
    if !dist.is_empty() {
        write_plot("distance.png", &|p: &Path| {
            ferry_plot::plot_lines(
                p,
                "Update distance from the base global",
                "round",
                "L2 distance",
                None,
                &dist,
            )
        })?;
        plots.push("distance.png");
    }
    let page = report_html(&s, &plots);
    let index = a.out.join("index.html");
    ferry_bundle::fsutil::write_replace(&index, page.as_bytes())?;
    outln!(
        "wrote {} ({} rounds{})",
        escape_path(&index),
        s.rounds.len(),
        if plots.is_empty() {
            String::new()
        } else {
            format!(", plots {}", plots.join(", "))
        }
    );
    Ok(())
}
