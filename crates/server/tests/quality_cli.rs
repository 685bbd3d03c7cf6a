//! HQ's quality gate through the `ferry-server` binary and real files (issue 16): `eval` on HQ's data (the same
//! numbers as ferry-train's evaluation, recorded in the ledger), `merge --require-eval` refusing a global below
//! `--min-accuracy` (nothing written) and recording both scores when it passes, `diff`, `republish` (a site
//! imports the re-issued global), and `report` rendering the ledger's numbers.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;

use ferry_bundle::{Draft, Dtype, Keyring, Payload, Role, SecretKey, TensorRef};
use ferry_site::{ImportPolicy, ImportTrust, SiteState};
use ferry_train::data::{DataSpec, LoadConfig};
use ferry_train::Arch;
use serde_json::Value;

const DATA: &str = "plates:loose:24:5";

fn server<S: AsRef<OsStr>>(args: &[S]) -> Output {
    ferry_testdata::cli::run(Path::new(env!("CARGO_BIN_EXE_ferry-server")), args)
}

#[track_caller]
fn success(o: &Output) -> String {
    ferry_testdata::cli::ok(o)
}

#[track_caller]
fn json(o: &Output) -> Value {
    ferry_testdata::cli::json(o)
}

/// A refusal: exit status 1 and exactly one line on stderr, `ferry-server: ...`.
#[track_caller]
fn refusal(o: &Output) -> String {
    ferry_testdata::cli::refused_alone("ferry-server", o)
}

fn walk(dir: &Path, m: &mut BTreeMap<String, Vec<u8>>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, m);
            } else if p.file_name().unwrap() != "lock" {
                m.insert(p.display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
}

struct Hq {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    keys: PathBuf,
    state: PathBuf,
    out: PathBuf,
    hq_ring: Keyring,
}

impl Hq {
    /// Keys for HQ and site-a, and a plate-ctc federation at round 0.
    fn start() -> Hq {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let keys = dir.join("keys");
        let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]);
        hq.write_pair(&keys).unwrap();
        SecretKey::from_seed(Role::Site, "site-a", [2; 32])
            .write_pair(&keys)
            .unwrap();
        let mut hq_ring = Keyring::new();
        hq_ring.add(hq.public()).unwrap();
        let h = Hq {
            state: dir.join("hq"),
            out: dir.join("bundles"),
            keys,
            dir,
            hq_ring,
            _tmp: tmp,
        };
        success(&server(&[
            "init",
            "--key",
            h.key().to_str().unwrap(),
            "--arch",
            "plate-ctc",
            "--seed",
            "3",
            "--federation",
            "city",
            "--state",
            h.state.to_str().unwrap(),
            "--out",
            h.out.to_str().unwrap(),
        ]));
        h
    }

    fn key(&self) -> PathBuf {
        self.keys.join("hq.key")
    }

    fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        walk(&self.state, &mut m);
        walk(&self.out, &mut m);
        m
    }

    /// site-a's update on `global`: its weights scaled by `scale` (what a site's training would change).
    fn update(&self, global: &Path, scale: f32) -> PathBuf {
        let g = ferry_bundle::open_file(global, &self.hq_ring).unwrap();
        let datas: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = g
            .tensors()
            .map(|t| {
                let data = if t.dtype == Dtype::F32 && !t.name.contains("running_var") {
                    t.data
                        .chunks_exact(4)
                        .flat_map(|c| {
                            (f32::from_le_bytes(c.try_into().unwrap()) * scale).to_le_bytes()
                        })
                        .collect()
                } else {
                    t.data.to_vec()
                };
                (t.name.to_string(), t.dtype, t.shape.to_vec(), data)
            })
            .collect();
        let refs: Vec<TensorRef<'_>> = datas
            .iter()
            .map(|(n, d, s, b)| TensorRef {
                name: n,
                dtype: *d,
                shape: s,
                data: b,
            })
            .collect();
        let key = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
        let draft = Draft::update_for(&g.manifest, &g.hash, key.id(), 50);
        let sealed =
            ferry_bundle::seal(draft, &Payload::from_tensors(&refs).unwrap(), &key, 3).unwrap();
        sealed.write_to_dir(&self.dir.join("usb")).unwrap()
    }

    fn merge(&self, update: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "merge",
            "--key",
            self.key().to_str().unwrap(),
            "--trust",
            self.keys.to_str().unwrap(),
            "--state",
            self.state.to_str().unwrap(),
            "--out",
            self.out.to_str().unwrap(),
            "--min-sites",
            "1",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(update.to_str().unwrap().to_string());
        server(&args)
    }
}

/// What ferry-train's evaluation (the call `ferry-client eval` makes) says of a global on `DATA`.
fn reference_accuracy(global: &Path, ring: &Keyring) -> f64 {
    let g = ferry_bundle::open_file(global, ring).unwrap();
    let arch = Arch::PlateCtc;
    let model =
        ferry_train::Model::from_safetensors(arch, g.payload(), &ferry_train::Device::Cpu).unwrap();
    let data = DATA
        .parse::<DataSpec>()
        .unwrap()
        .load(&LoadConfig {
            input: Some(arch.input()),
            classes: Some(arch.classes()),
            ..LoadConfig::default()
        })
        .unwrap();
    ferry_train::evaluate(&model, &data, 256).unwrap().accuracy
}

#[test]
fn eval_gate_diff_republish_and_report() {
    let h = Hq::start();
    let g0 = h.out.join("global-r0.ferry");
    let keys = h.keys.to_str().unwrap().to_string();

    // eval: verified, evaluated with ferry-train's numbers, recorded in the ledger with round 0.
    let v = json(&server(&[
        "eval",
        "--trust",
        &keys,
        "--data",
        DATA,
        "--state",
        h.state.to_str().unwrap(),
        "--json",
        g0.to_str().unwrap(),
    ]));
    let acc0 = reference_accuracy(&g0, &h.hq_ring);
    assert_eq!(v["eval"]["accuracy"].as_f64().unwrap(), acc0);
    assert_eq!(v["eval"]["samples"], 24);
    assert_eq!(v["recorded_round"], 0);
    // A bundle signed by no trusted key is refused before anything is read.
    let e = refusal(&server(&[
        "eval",
        "--trust",
        h.keys.join("site-a.pub").to_str().unwrap(),
        "--data",
        DATA,
        g0.to_str().unwrap(),
    ]));
    assert!(e.contains("global-r0.ferry"), "{e}");

    // merge --require-eval --min-accuracy: refused below the bar, nothing written.
    let u = h.update(&g0, 1.0);
    let before = h.snapshot();
    let e = refusal(&h.merge(&u, &["--require-eval", DATA, "--min-accuracy", "0.99"]));
    assert!(e.contains("below --min-accuracy 0.99"), "{e}");
    assert!(e.contains("nothing written"), "{e}");
    assert_eq!(h.snapshot(), before);
    // An unreadable evaluation set refuses too, naming it.
    let e = refusal(&h.merge(&u, &["--require-eval", "folder:/nonexistent/labels.csv"]));
    assert!(e.contains("labels.csv"), "{e}");
    assert_eq!(h.snapshot(), before);

    // The same update with the gate alone passes (unchanged weights score what the current global scores),
    // and both scores land in the ledger.
    let out = success(&h.merge(&u, &["--require-eval", DATA]));
    assert!(out.contains("quality gate passed"), "{out}");
    let g1 = h.out.join("global-r1.ferry");
    assert_eq!(reference_accuracy(&g1, &h.hq_ring), acc0);
    let st = json(&server(&[
        "status",
        "--state",
        h.state.to_str().unwrap(),
        "--json",
    ]));
    let r1 = &st["rounds"][1];
    assert_eq!(r1["evals"][0]["accuracy"].as_f64().unwrap(), acc0);
    assert_eq!(r1["evals"][0]["data"], DATA);
    assert_eq!(st["rounds"][0]["evals"].as_array().unwrap().len(), 2);
    assert_eq!(r1["stats"][0]["site"], "site-a");
    assert_eq!(r1["stats"][0]["weight"].as_f64().unwrap(), 1.0);
    let distance = r1["stats"][0]["distance"].as_f64().unwrap();
    assert_eq!(distance, 0.0);
    assert!(r1["time"].as_u64().unwrap() > 1_700_000_000);

    // diff: the update scaled by 1.1 against round 1.
    let u2 = h.update(&g1, 1.1);
    let d = json(&server(&[
        "diff",
        "--trust",
        &keys,
        "--json",
        g1.to_str().unwrap(),
        u2.to_str().unwrap(),
    ]));
    let a = ferry_bundle::open_file(&g1, &h.hq_ring).unwrap();
    let fc1 = a.tensors().find(|t| t.name == "fc1.weight").unwrap();
    let norm: f64 = fc1
        .data
        .chunks_exact(4)
        .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())).powi(2))
        .sum::<f64>()
        .sqrt();
    let t = d["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "fc1.weight")
        .unwrap();
    let rel = t["relative"].as_f64().unwrap();
    assert!((rel - 0.1).abs() < 1e-5, "{rel}");
    assert!((t["l2"].as_f64().unwrap() - 0.1 * norm).abs() < 1e-4 * norm);
    let text = success(&server(&[
        "diff",
        "--trust",
        &keys,
        g1.to_str().unwrap(),
        u2.to_str().unwrap(),
    ]));
    assert!(
        text.contains("fc1.weight") && text.contains("total L2"),
        "{text}"
    );
    // A tampered bundle is refused before any number is printed.
    let mut bytes = std::fs::read(&u2).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    let bad = h.dir.join("tampered.ferry");
    std::fs::write(&bad, bytes).unwrap();
    refusal(&server(&[
        "diff",
        "--trust",
        &keys,
        g1.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]));

    // republish round 0's weights as round 2; a site that holds round 1 imports it.
    let site = SiteState::at(&h.dir.join("site"));
    let policy = ImportPolicy::default();
    let import = |p: &Path| {
        let trust = ImportTrust {
            keys: h.hq_ring.clone(),
            federation: Some("city".into()),
            ..ImportTrust::default()
        };
        let prepared = site.prepare_import(&trust, &policy).unwrap();
        let b = ferry_bundle::open_file(p, prepared.keyring()).unwrap();
        site.import_new(&b, &p.display().to_string(), &policy, &prepared)
    };
    import(&g0).unwrap();
    import(&g1).unwrap();
    let e = refusal(&server(&[
        "republish",
        "--key",
        h.key().to_str().unwrap(),
        "--state",
        h.state.to_str().unwrap(),
        "--from-round",
        "9",
        "--out",
        h.out.to_str().unwrap(),
    ]));
    assert!(e.contains("cannot republish round 9"), "{e}");
    let v = json(&server(&[
        "republish",
        "--key",
        h.key().to_str().unwrap(),
        "--state",
        h.state.to_str().unwrap(),
        "--from-round",
        "0",
        "--out",
        h.out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["round"], 2);
    let g2 = h.out.join("global-r2.ferry");
    import(&g2).unwrap();
    let current = std::fs::read(site.current_model_path()).unwrap();
    let original = ferry_bundle::open_file(&g0, &h.hq_ring).unwrap();
    assert_eq!(
        current,
        original.payload(),
        "the site holds round 0's weights again"
    );

    // report: the page shows the ledger's numbers, the plots are PNGs.
    let report = h.dir.join("report");
    success(&server(&[
        "report",
        "--state",
        h.state.to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
    ]));
    let page = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert!(page.contains(&format!("{:.2}%", 100.0 * acc0)), "{page}");
    assert!(page.contains(DATA) && page.contains("site-a"), "{page}");
    assert!(
        page.contains("<td class=\"n\">1.0000</td>"),
        "weight: {page}"
    );
    assert!(page.contains(&format!("{distance:.4}")), "{page}");
    assert!(page.contains("republish r0"), "{page}");
    for png in ["accuracy.png", "distance.png"] {
        let b = std::fs::read(report.join(png)).unwrap();
        assert_eq!(&b[1..4], b"PNG", "{png}");
        assert!(page.contains(png));
    }
}

/// Tensors of a bundle, by name.
fn tensors_of(path: &Path, ring: &Keyring) -> BTreeMap<String, Vec<u8>> {
    let b = ferry_bundle::open_file(path, ring).unwrap();
    b.tensors()
        .map(|t| (t.name.to_string(), t.data.to_vec()))
        .collect()
}

/// HQ's own training steps through the binary (issue 14): `init --pretrain` trains round 0 on HQ's data,
/// `merge --distill` and `merge --recalibrate` change the merged model before it is signed and say so in
/// the strategy, `merge --select` seals the model its recorded note names, and unreadable HQ data refuses the
/// round in one line with nothing written.
#[test]
fn hq_pretrain_distill_recalibrate_and_select_through_the_binary() {
    let h = Hq::start();
    let g0 = h.out.join("global-r0.ferry");
    const HQ_DATA: &str = "plates:loose:32:11";

    // init --pretrain: the same seed, trained on HQ's data, is another round 0.
    let pre_state = h.dir.join("hq-pre");
    let pre_out = h.dir.join("bundles-pre");
    let text = success(&server(&[
        "init",
        "--key",
        h.key().to_str().unwrap(),
        "--arch",
        "plate-ctc",
        "--seed",
        "3",
        "--federation",
        "city",
        "--state",
        pre_state.to_str().unwrap(),
        "--out",
        pre_out.to_str().unwrap(),
        "--pretrain",
        HQ_DATA,
        "--pretrain-epochs",
        "1",
        "--pretrain-batch",
        "16",
    ]));
    assert!(text.contains("global-r0.ferry"), "{text}");
    let plain = tensors_of(&g0, &h.hq_ring);
    let pretrained = tensors_of(&pre_out.join("global-r0.ferry"), &h.hq_ring);
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        pretrained.keys().collect::<Vec<_>>()
    );
    assert_ne!(plain["fc1.weight"], pretrained["fc1.weight"]);
    // Unloadable pretraining data: one line, no state, no bundle.
    let bad_state = h.dir.join("hq-bad");
    let e = refusal(&server(&[
        "init",
        "--key",
        h.key().to_str().unwrap(),
        "--arch",
        "plate-ctc",
        "--federation",
        "city",
        "--state",
        bad_state.to_str().unwrap(),
        "--out",
        h.dir.join("bundles-bad").to_str().unwrap(),
        "--pretrain",
        "folder:/nonexistent/labels.csv",
    ]));
    assert!(e.contains("labels.csv"), "{e}");
    assert!(!bad_state.exists() && !h.dir.join("bundles-bad").exists());

    // merge --distill with unreadable data: refused, nothing written.
    let u = h.update(&g0, 1.05);
    let before = h.snapshot();
    let e = refusal(&h.merge(&u, &["--distill", "folder:/nonexistent/labels.csv"]));
    assert!(
        e.contains("after the merge") && e.contains("labels.csv"),
        "{e}"
    );
    assert!(e.contains("nothing written"), "{e}");
    assert_eq!(h.snapshot(), before);

    // merge --distill: the signed global is the distilled model, not the plain merge (which is the update).
    let text = success(&h.merge(&u, &["--distill", HQ_DATA, "--distill-epochs", "1"]));
    assert!(text.contains("global-r1.ferry"), "{text}");
    let g1 = h.out.join("global-r1.ferry");
    let b1 = ferry_bundle::open_file(&g1, &h.hq_ring).unwrap();
    let strategy = b1.manifest.strategy.clone().unwrap();
    assert!(strategy.contains("then distill"), "{strategy}");
    assert!(strategy.contains(HQ_DATA), "{strategy}");
    let merged = tensors_of(&u, &h.hq_ring_with_site());
    let distilled = tensors_of(&g1, &h.hq_ring);
    assert_ne!(merged["fc1.weight"], distilled["fc1.weight"]);

    // merge --recalibrate: only the BatchNorm statistics move; the weights are the plain merge's.
    let u2 = h.update(&g1, 1.0);
    success(&h.merge(&u2, &["--recalibrate", HQ_DATA]));
    let g2 = h.out.join("global-r2.ferry");
    let b2 = ferry_bundle::open_file(&g2, &h.hq_ring).unwrap();
    assert!(b2
        .manifest
        .strategy
        .clone()
        .unwrap()
        .contains("then recalibrate"));
    let recal = tensors_of(&g2, &h.hq_ring);
    let update = tensors_of(&u2, &h.hq_ring_with_site());
    let mut stats_moved = 0;
    for (name, data) in &recal {
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            stats_moved += usize::from(*data != update[name]);
        } else if !name.ends_with("num_batches_tracked") {
            assert_eq!(*data, update[name], "{name} changed");
        }
    }
    assert!(stats_moved > 0, "no BatchNorm statistic was re-estimated");
    // --distill and --recalibrate together are refused by the argument parser.
    let o = h.merge(&u2, &["--distill", HQ_DATA, "--recalibrate", HQ_DATA]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");

    // merge --distill --select: HQ evaluates the distilled merge and the site's model on its labelled plates and
    // seals the one the recorded note names, with both scores in the strategy.
    let u3 = h.update(&g2, 1.1);
    let o = h.merge(
        &u3,
        &[
            "--distill",
            HQ_DATA,
            "--distill-epochs",
            "1",
            "--select",
            HQ_DATA,
        ],
    );
    success(&o);
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("selection on HQ's data: kept "), "{said}");
    let g3 = h.out.join("global-r3.ferry");
    let strategy = ferry_bundle::open_file(&g3, &h.hq_ring)
        .unwrap()
        .manifest
        .strategy
        .unwrap();
    assert!(
        strategy.contains(&format!(
            "then distill epochs=1 lr=0.0005 t=1 data={HQ_DATA} then select data={HQ_DATA} (kept "
        )),
        "{strategy}"
    );
    let sealed = tensors_of(&g3, &h.hq_ring);
    let site = tensors_of(&u3, &h.hq_ring_with_site());
    if strategy.contains("(kept site-a's model: ") {
        assert!(strategy.contains("; the merge "), "{strategy}");
        assert_eq!(sealed, site);
    } else {
        assert!(strategy.contains("(kept the merge: "), "{strategy}");
        assert!(strategy.contains("; site-a's model "), "{strategy}");
        assert_ne!(
            sealed["fc1.weight"], site["fc1.weight"],
            "the distilled merge was not sealed"
        );
    }
    // Unreadable selection data: refused in one line, nothing written.
    let u4 = h.update(&g3, 1.0);
    let before = h.snapshot();
    let e = refusal(&h.merge(&u4, &["--select", "folder:/nonexistent/labels.csv"]));
    assert!(e.contains("select") && e.contains("labels.csv"), "{e}");
    assert_eq!(h.snapshot(), before);
}

impl Hq {
    /// HQ's ring plus site-a's key, to read site-a's updates.
    fn hq_ring_with_site(&self) -> Keyring {
        let mut ring = self.hq_ring.clone();
        ring.add(SecretKey::from_seed(Role::Site, "site-a", [2; 32]).public())
            .unwrap();
        ring
    }
}
