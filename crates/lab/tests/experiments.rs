//! End-to-end runs of `ferry-lab seed-table` and `ferry-lab fedavg` at a size CI can afford (issue 5): the table's
//! structure, the bytes carried against the bundle files actually written, and that federated training beats a
//! site training alone on its own skewed data.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_lab::seed_table::{self, SeedTableConfig};
use ferry_lab::split::{split, SplitKind};
use ferry_train::data::{DataSpec, Split};
use ferry_train::optim::Adam;
use ferry_train::{evaluate, AdamConfig, Arch, Device, Model, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sizes of the bundle files in `usb`: (updates, globals by round).
fn usb_files(usb: &Path) -> (u64, Vec<(u64, u64)>) {
    let (mut updates, mut globals) = (0, Vec::new());
    for e in std::fs::read_dir(usb).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let len = e.metadata().unwrap().len();
        if let Some(r) = name
            .strip_prefix("global-r")
            .and_then(|s| s.strip_suffix(".ferry"))
        {
            globals.push((r.parse().unwrap(), len));
        } else {
            assert!(
                name.starts_with("site-") && name.ends_with(".ferry"),
                "{name}"
            );
            updates += len;
        }
    }
    globals.sort();
    (updates, globals)
}

/// What a federation of `sites` sites carried in `rounds` rounds: every update, and each global that was
/// trained from (rounds 0..rounds) once per site. The last global stays at HQ.
fn expected_bytes(usb: &Path, sites: u64, rounds: u64) -> u64 {
    let (updates, globals) = usb_files(usb);
    assert_eq!(
        globals.len() as u64,
        rounds + 1,
        "globals r0..r{rounds} in {}",
        usb.display()
    );
    updates
        + sites
            * globals
                .iter()
                .filter(|g| g.0 < rounds)
                .map(|g| g.1)
                .sum::<u64>()
}

#[test]
fn seed_table_small_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SeedTableConfig {
        out: dir.path().join("st"),
        total_epochs: 2,
        samples_per_site: 64,
        val: 40,
        e_sweep: vec![1, 2],
        lr: 1e-3,
        warmup: None,
        batch: 32,
        cosine: true,
        seed: 3,
        ..SeedTableConfig::default()
    };
    let rows = seed_table::run(&cfg).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "site-a",
            "site-b",
            "centralised",
            "one-shot",
            "fedavg-e1",
            "fedavg-e2"
        ]
    );
    for r in &rows {
        assert!((0.0..=1.0).contains(&r.accuracy), "{r:?}");
        assert!((0.0..=1.0).contains(&r.char_accuracy), "{r:?}");
        // Every row is evaluated at epoch 0 and ends at the budget T.
        assert_eq!(r.curve.first().unwrap().0, 0);
        assert_eq!(r.curve.last().unwrap().0, cfg.total_epochs);
        let (trips, curve_len) = match r.name.as_str() {
            "one-shot" => (1, 2),
            "fedavg-e1" => (2, 3),
            "fedavg-e2" => (1, 2),
            _ => (0, cfg.total_epochs as usize + 1),
        };
        assert_eq!(
            (r.round_trips, r.curve.len()),
            (trips, curve_len),
            "{}",
            r.name
        );
        if trips == 0 {
            assert_eq!(r.bytes_carried, 0, "{}", r.name);
        } else {
            let usb = cfg.out.join("rows").join(&r.name).join("usb");
            assert!(r.bytes_carried > 0);
            assert_eq!(
                r.bytes_carried,
                expected_bytes(&usb, 2, trips),
                "{}",
                r.name
            );
        }
    }
    // The one-shot average is not either site's model: it is a different point on the curve. At this size every
    // row reads ~0 plates exactly and accuracy says nothing about who wins (the fedavg test below makes that
    // claim, on data where it is robust); here only the structure is checked.
    for f in [
        "table.md",
        "table.csv",
        "results.json",
        "accuracy.png",
        "accuracy-chars.png",
        "trips.png",
    ] {
        assert!(cfg.out.join(f).is_file(), "{f}");
    }
    let csv = std::fs::read_to_string(cfg.out.join("table.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + rows.len());
    let json = seed_table::json(&cfg, &rows);
    assert_eq!(json["rows"][4]["name"], "fedavg-e1");
    assert_eq!(json["rows"][4]["round_trips"], 2);
}

/// `seed-table --few-trips` (issue 14): the one- and two-trip rows exist, each through real bundles with its trips
/// and bytes, the Fisher rows carry the estimates, HQ's choices are recorded, and the two-trip rows fork the
/// FedAvg run of T/2 epochs per round (run for them when --e-sweep lacks it).
#[test]
fn seed_table_few_trips_rows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SeedTableConfig {
        out: dir.path().join("st"),
        total_epochs: 2,
        samples_per_site: 48,
        val: 30,
        e_sweep: vec![2],
        batch: 16,
        seed: 5,
        few_trips: true,
        hq_plates: 40,
        pretrain_epochs: 1,
        ..SeedTableConfig::default()
    };
    let rows = seed_table::run(&cfg).unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no row {name}"))
    };
    // T/2 = 1 epoch per round was not in --e-sweep: its FedAvg row ran for the two-trip rows.
    assert_eq!(row("fedavg-e1").round_trips, 2);
    for (name, trips) in [
        ("best-site", 1),
        ("ensemble", 1),
        ("one-shot-fisher", 1),
        ("one-shot-select", 1),
        ("one-shot-distill", 1),
        ("one-shot-recal", 1),
        ("one-shot-site-recal", 1),
        ("two-trip-select", 2),
        ("two-trip-fisher", 2),
        ("two-trip-distill", 2),
        ("two-trip-recal", 2),
        ("two-trip-site-recal", 2),
        ("one-shot-pretrain", 1),
        ("two-trip-pretrain", 2),
    ] {
        let r = row(name);
        assert_eq!(r.round_trips, trips, "{name}");
        assert!((0.0..=1.0).contains(&r.accuracy), "{name}");
        assert!(!r.note.is_empty(), "{name}");
        assert_eq!(r.curve.last().unwrap().0, cfg.total_epochs, "{name}");
    }
    // The same trips carry the same bundles, but for the Fisher rows, whose updates carry the estimates.
    let one = row("one-shot").bytes_carried;
    for name in [
        "best-site",
        "ensemble",
        "one-shot-select",
        "one-shot-distill",
        "one-shot-recal",
        "one-shot-site-recal",
    ] {
        assert_eq!(row(name).bytes_carried, one, "{name}");
    }
    assert!(row("one-shot-fisher").bytes_carried > one);
    let two = row("fedavg-e1").bytes_carried;
    assert_eq!(row("two-trip-distill").bytes_carried, two);
    assert_eq!(row("two-trip-site-recal").bytes_carried, two);
    // Each site deployed its own recalibrated model (ferry-client recalibrate's file, not the global).
    for site in ["site-a", "site-b"] {
        let deployed = cfg
            .out
            .join("trips/one-shot-site-recal/sites")
            .join(site)
            .join("deployed.safetensors");
        assert!(deployed.is_file(), "{}", deployed.display());
    }
    assert!(row("two-trip-fisher").bytes_carried > two);
    assert!(row("ensemble").char_accuracy.is_nan());
    // The warm start: HQ's round 0 alone carries nothing; the pretrained rows carry what FedAvg carries.
    assert_eq!(
        (
            row("hq-pretrained").round_trips,
            row("hq-pretrained").bytes_carried
        ),
        (0, 0)
    );
    assert!(row("hq-pretrained").note.contains("clean plates"));
    let ratio = row("two-trip-pretrain").bytes_carried as f64 / two as f64;
    assert!((0.95..1.05).contains(&ratio), "{ratio}");
    assert!(row("one-shot-fisher").note.contains("bound"));
    // HQ's steps say what they did in HQ's ledger, on HQ's own plates.
    let ledger = |rel: &str| {
        std::fs::read_to_string(cfg.out.join("trips").join(rel).join("hq/ledger.json")).unwrap()
    };
    assert!(ledger("one-shot/fisher-b0").contains("fisher weights=samples bound=3"));
    assert!(ledger("one-shot-distill").contains("then distill"));
    assert!(ledger("one-shot-recal").contains("then recalibrate data=hq-clean-plates"));
    // --select seals what its note names: the merge (one-shot's global) or a site's own model (that site's row).
    let select = row("one-shot-select");
    let kept = ["site-a", "site-b"]
        .into_iter()
        .find(|s| select.note.contains(&format!("(kept {s}'s model: ")))
        .unwrap_or("one-shot");
    if kept == "one-shot" {
        assert!(select.note.contains("(kept the merge: "), "{}", select.note);
    }
    assert_eq!(select.accuracy, row(kept).accuracy, "{}", select.note);
    assert!(ledger("one-shot-select").contains("then select data=hq-tune-plates (kept "));
    assert_eq!(
        ledger("two-trip-select")
            .matches("then select data=hq-tune-plates (kept ")
            .count(),
        2
    );
    let ratio = row("two-trip-select").bytes_carried as f64 / two as f64;
    assert!((0.95..1.05).contains(&ratio), "{ratio}");
    let table = std::fs::read_to_string(cfg.out.join("table.md")).unwrap();
    assert!(table.contains("two-trip-recal"), "{table}");
    assert!(cfg.out.join("trips.png").is_file());
}

/// A Fashion-MNIST-like IDX dataset: 10 classes, each a fixed random blob pattern, drawn with a random shift of up
/// to 2 pixels, random contrast and noise. Easy to learn, but not from a handful of classes.
fn write_idx(dir: &Path, prefix: &str, n: usize, seed: u64) {
    let mut protos = ChaCha8Rng::seed_from_u64(99);
    let proto: Vec<Vec<f32>> = (0..10)
        .map(|_| {
            let mut p = vec![0f32; 28 * 28];
            for _ in 0..6 {
                let (cy, cx) = (
                    protos.random_range(6..22) as f32,
                    protos.random_range(6..22) as f32,
                );
                let r = protos.random_range(2.0..5.0f32);
                for y in 0..28 {
                    for x in 0..28 {
                        let d = ((y as f32 - cy).powi(2) + (x as f32 - cx).powi(2)).sqrt();
                        if d < r {
                            p[y * 28 + x] = 1.0;
                        }
                    }
                }
            }
            p
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut images = Vec::with_capacity(16 + n * 784);
    images.extend_from_slice(&0x0803u32.to_be_bytes());
    for d in [n as u32, 28, 28] {
        images.extend_from_slice(&d.to_be_bytes());
    }
    let mut labels = Vec::with_capacity(8 + n);
    labels.extend_from_slice(&0x0801u32.to_be_bytes());
    labels.extend_from_slice(&(n as u32).to_be_bytes());
    for _ in 0..n {
        let c = rng.random_range(0..10u8);
        labels.push(c);
        let (dy, dx) = (rng.random_range(-2..=2i32), rng.random_range(-2..=2i32));
        let contrast = rng.random_range(0.5..1.0f32);
        for y in 0..28i32 {
            for x in 0..28i32 {
                let (sy, sx) = (y - dy, x - dx);
                let v = if (0..28).contains(&sy) && (0..28).contains(&sx) {
                    proto[c as usize][(sy * 28 + sx) as usize]
                } else {
                    0.0
                };
                let noisy = v * contrast + rng.random_range(0.0..0.3f32);
                images.push((noisy.clamp(0.0, 1.0) * 255.0) as u8);
            }
        }
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
}

fn fake_fashion(dir: &Path) -> PathBuf {
    let d = dir.join("idx");
    std::fs::create_dir_all(&d).unwrap();
    write_idx(&d, "train", 600, 1);
    write_idx(&d, "t10k", 300, 2);
    d
}

/// `ferry-lab fedavg ARGS --out OUT --json JSON` through the binary, which must succeed; the JSON it wrote.
fn fedavg_json(args: &[&str], out: &Path, json: &Path) -> serde_json::Value {
    let status = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .arg("fedavg")
        .args(args)
        .arg("--out")
        .arg(out)
        .arg("--json")
        .arg(json)
        .status()
        .unwrap();
    assert!(status.success(), "ferry-lab fedavg {args:?}");
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

#[test]
fn fedavg_through_the_binary_beats_a_site_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = fake_fashion(tmp.path());
    let out = tmp.path().join("run");
    let json = tmp.path().join("rows.json");
    let (rounds, epochs, seed) = (3u32, 1u32, 5u64);
    // The FedAvg paper's pathological non-IID split: sorted by label, 2 shards per site, so each site sees about
    // half of the classes.
    let data = format!("idx:{}", idx.display());
    let (r, e, sd) = (rounds.to_string(), epochs.to_string(), seed.to_string());
    let v = fedavg_json(
        &[
            "--data",
            &data,
            "--sites",
            "2",
            "--split",
            "shards",
            "--rounds",
            &r,
            "--local-epochs",
            &e,
            "--batch",
            "10",
            "--seed",
            &sd,
            "--target",
            "0.5",
        ],
        &out,
        &json,
    );
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), rounds as usize + 1);
    let mut last_bytes = 0;
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["round"], i as u64);
        let acc = r["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        let b = r["bytes_carried"].as_u64().unwrap();
        assert!(i == 0 || b > last_bytes, "bytes grow every round");
        last_bytes = b;
    }
    assert_eq!(
        last_bytes,
        expected_bytes(&out.join("usb"), 2, u64::from(rounds))
    );
    for f in ["rounds.md", "rounds.csv", "results.json", "accuracy.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let fed_acc = rows.last().unwrap()["accuracy"].as_f64().unwrap();

    // Each site alone, same split, same budget (rounds × epochs), same optimizer: it never sees the other half of
    // the classes, so it cannot get much past half of the test set; the federated model, which learnt all
    // classes through the averaged bundles, must beat the weaker of the two (and in practice both).
    let train = DataSpec::Idx {
        dir: idx.clone(),
        split: Split::Train,
    }
    .load(&Default::default())
    .unwrap();
    let test = DataSpec::Idx {
        dir: idx,
        split: Split::Test,
    }
    .load(&Default::default())
    .unwrap();
    let parts = split(&train, 2, SplitKind::Shards { per_site: 2 }, seed).unwrap();
    let mut alone = Vec::new();
    for p in &parts {
        let data = train.subset(p);
        let mut model = Model::init(Arch::MnistCnn, seed, &Device::Cpu).unwrap();
        let mut adam = Adam::new(Arch::MnistCnn, &Device::Cpu).unwrap();
        let cfg = TrainConfig {
            epochs: rounds * epochs,
            batch: 10,
            seed,
            adam: AdamConfig {
                lr: 1e-3,
                warmup: v["warmup"].as_u64().unwrap(),
                ..AdamConfig::default()
            },
            augment: ferry_train::Augment::none(),
        };
        ferry_train::train(&mut model, &mut adam, &data, &cfg, &mut ()).unwrap();
        alone.push(evaluate(&model, &test, 256).unwrap().accuracy);
    }
    let weaker = alone.iter().copied().fold(f64::INFINITY, f64::min);
    eprintln!("federated {fed_acc:.3}, sites alone {alone:?}");
    assert!(
        fed_acc > weaker + 0.1,
        "federated {fed_acc} vs sites alone {alone:?}"
    );

    // --sites 1: the centralised baseline, all the data at one site, through the same bundles (its update is
    // the next global); it learns every class too.
    let v = fedavg_json(
        &[
            "--data", &data, "--sites", "1", "--rounds", &r, "--batch", "10", "--seed", &sd,
        ],
        &tmp.path().join("central"),
        &tmp.path().join("central.json"),
    );
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), rounds as usize + 1);
    let central_acc = rows.last().unwrap()["accuracy"].as_f64().unwrap();
    assert!(
        central_acc > weaker + 0.1,
        "centralised {central_acc} vs sites alone {alone:?}"
    );
}

/// `ferry-lab fedavg --few-trips` through the binary (issue 14): every row is there with its trips, the bytes
/// carried follow the trips, HQ's tuning choices are recorded, the FedAvg rows are the curve every row is
/// matched against, and the outputs (table, csv, json, plot) are written.
#[test]
fn few_trips_rows_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = fake_fashion(tmp.path());
    let out = tmp.path().join("trips");
    let json = tmp.path().join("trips.json");
    let o = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .args(["fedavg", "--data"])
        .arg(format!("idx:{}", idx.display()))
        .args(["--sites", "2", "--split", "dirichlet:0.5", "--rounds", "2"])
        .args(["--local-epochs", "1", "--batch", "16", "--seed", "3"])
        .args([
            "--few-trips",
            "--hq-samples",
            "100",
            "--distill-epochs",
            "1",
        ])
        .args(["--pretrain-epochs", "1", "--server-lrs", "1,2", "--out"])
        .arg(&out)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    // HQ's data is named exactly: the last 100 training images, which no site holds.
    assert!(
        stdout.contains("training-file images 500..580")
            && stdout.contains("sites split images 0..500"),
        "{stdout}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no row {name}: {rows:?}"))
    };
    let trips = |name: &str| row(name)["round_trips"].as_u64().unwrap();
    let bytes = |name: &str| row(name)["bytes_carried"].as_u64().unwrap();
    for (name, t) in [
        ("best-site", 1),
        ("ensemble", 1),
        ("one-shot-avg", 1),
        ("one-shot-distill", 1),
        ("two-trip-distill", 2),
        ("two-trip-fedavgm", 2),
        ("hq-pretrained", 0),
        ("one-shot-pretrain", 1),
        ("one-shot-pretrain-distill", 1),
        ("two-trip-pretrain", 2),
        ("two-trip-pretrain-distill", 2),
        ("one-shot-fisher", 1),
        ("two-trip-fisher", 2),
        ("one-shot-select", 1),
        ("two-trip-select", 2),
        ("fedavg-2", 2),
    ] {
        assert_eq!(trips(name), t, "{name}");
        let acc = row(name)["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{name}: {acc}");
    }
    // Bytes carried: the one-trip rows carry the same files; a second trip carries about as much again (the
    // same tensors, compressed: the sizes differ by what zstd finds).
    let one = bytes("one-shot-avg");
    assert!(one > 0);
    assert_eq!(bytes("one-shot-distill"), one);
    assert_eq!(bytes("one-shot-select"), one);
    for two in [
        "two-trip-select",
        "two-trip-distill",
        "fedavg-2",
        "two-trip-fedavgm",
        "two-trip-pretrain",
    ] {
        let ratio = bytes(two) as f64 / one as f64;
        assert!((1.9..2.1).contains(&ratio), "{two}: {ratio}");
    }
    assert_eq!(bytes("hq-pretrained"), 0);
    // The Fisher rows' updates carry the estimates too (one F32 value per trainable weight), and the update
    // each site replaced by its Fisher export is not counted.
    let fisher = bytes("one-shot-fisher") as f64 / one as f64;
    assert!((1.05..2.0).contains(&fisher), "one-shot-fisher: {fisher}");
    let note = row("one-shot-fisher")["note"].as_str().unwrap();
    assert!(note.contains("bound"), "{note}");
    // HQ's choice of the FedAvgM server lr is recorded with the row.
    let note = row("two-trip-fedavgm")["note"].as_str().unwrap();
    assert!(note.contains("server lr"), "{note}");
    // A row matched by FedAvg names the first FedAvg trip count reaching it: one-shot-avg is fedavg-1 itself.
    assert_eq!(row("one-shot-avg")["fedavg_trips_to_match"], 1);
    let curve = [
        row("one-shot-avg")["accuracy"].as_f64().unwrap(),
        row("fedavg-2")["accuracy"].as_f64().unwrap(),
    ];
    for r in rows {
        let acc = r["accuracy"].as_f64().unwrap();
        match r["fedavg_trips_to_match"].as_u64() {
            Some(k) => {
                assert!(curve[k as usize - 1] >= acc, "{r}");
                assert!(curve[..k as usize - 1].iter().all(|&c| c < acc), "{r}");
            }
            None => assert!(curve.iter().all(|&c| c < acc), "{r}"),
        }
    }
    // The distilled and recalibrated globals say so in HQ's ledger.
    let ledger = |branch: &str| {
        std::fs::read_to_string(out.join(branch).join("hq").join("ledger.json")).unwrap()
    };
    assert!(ledger("distill").contains("then distill"));
    assert_eq!(
        ledger("select")
            .matches("then select data=hq-tune (kept ")
            .count(),
        2
    );
    // --select seals the merge (one-shot-avg's global) or the site model HQ reads best (best-site's score).
    let note = row("one-shot-select")["note"].as_str().unwrap();
    let tune = |name: &str| row(name)["hq_tune_accuracy"].as_f64().unwrap();
    if note.contains("(kept the merge: ") {
        assert_eq!(
            row("one-shot-select")["accuracy"],
            row("one-shot-avg")["accuracy"]
        );
    } else {
        assert!(note.contains("'s model: "), "{note}");
        assert_eq!(tune("one-shot-select"), tune("best-site"), "{note}");
    }
    assert!(ledger("fisher-b0").contains("fisher weights=samples bound=3"));
    assert!(!ledger("fedavg").contains("then "));
    for f in ["trips.md", "trips.csv", "trips.json", "trips.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

/// Runs `ferry-lab seed-table ARGS` at a tiny size (1 epoch, 16 plates per site, 8 validation plates, E = 1)
/// into `dir/name`, and returns its stdout and the settings its `--json` file records.
fn tiny_seed_table(dir: &Path, name: &str, args: &[&str]) -> (String, serde_json::Value) {
    let json = dir.join(format!("{name}.json"));
    let o = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .arg("seed-table")
        .args(args)
        .args(["--total-epochs", "1", "--samples-per-site", "16"])
        .args(["--val", "8", "--e-sweep", "1", "--out"])
        .arg(dir.join(name))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        v["config"].clone(),
    )
}

/// `seed-table --preset standard` starts from the standard budget's recipe (batch 32, lr 2e-3, cosine, 2,000
/// validation plates) and a flag overrides only its own setting: here the size, so the run stays tiny.
#[test]
fn a_seed_table_preset_sets_the_recipe_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--preset", "standard", "--arch", "plate-ctc-deep"];
    let (_, c) = tiny_seed_table(dir.path(), "st", &args);
    assert_eq!(c["batch"], 32, "{c}");
    assert_eq!(c["lr"], 2e-3, "{c}");
    assert_eq!(c["cosine"], true, "{c}");
    assert_eq!(c["total_epochs"], 1, "{c}");
    assert_eq!(c["samples_per_site"], 16, "{c}");
    assert_eq!(c["val"], 8, "{c}");
    assert_eq!(c["e_sweep"], serde_json::json!([1]), "{c}");
    assert_eq!(c["arch"], "plate-ctc-deep", "{c}");
    refuses_a_non_plate_model("seed-table", "--out", &dir.path().join("refused"));
    let quick = SeedTableConfig::preset(seed_table::Preset::Quick);
    let field = SeedTableConfig::preset(seed_table::Preset::FieldStudy);
    assert_eq!((quick.batch, quick.cosine), (64, false));
    assert_eq!(
        (field.samples_per_site, field.total_epochs, field.warmup),
        (80_000, 70, Some(1000))
    );
}

/// Checks that `preset` (its `--preset` name `flag`) is the standard budget with `arch` and FedAvg at `e_sweep`,
/// and that a tiny run of it starts every row from HQ's shipped start for `arch` at the fine-tuning rate, says so
/// and records it. Returns the run's folder for further runs.
fn check_hq_preset(
    preset: seed_table::Preset,
    flag: &str,
    arch: &str,
    e_sweep: &[u32],
) -> tempfile::TempDir {
    let config = SeedTableConfig::preset(preset);
    let standard = SeedTableConfig::preset(seed_table::Preset::Standard);
    let budget =
        |c: &SeedTableConfig| (c.samples_per_site, c.total_epochs, c.val, c.batch, c.cosine);
    assert_eq!(budget(&config), budget(&standard), "{flag}");
    assert_eq!(config.e_sweep, e_sweep, "{flag}");
    let dir = tempfile::tempdir().unwrap();
    let (stdout, c) = tiny_seed_table(dir.path(), flag, &["--preset", flag]);
    assert!(
        stdout.contains(&format!("round 0 of every row: {arch} HQ's shipped start")),
        "{stdout}"
    );
    assert_eq!(c["arch"], arch, "{c}");
    assert_eq!(c["start"], "shipped", "{c}");
    assert_eq!(c["lr"], ferry_lab::start::WARM_LR, "{c}");
    dir
}

/// `seed-table --preset hq-deep` is the standard budget with the deeper reader, every row from HQ's shipped start
/// at the fine-tuning rate, and FedAvg at E = 1 and 5: the run says so and records it, and `--arch` and `--lr`
/// still override the preset's.
#[test]
fn the_hq_deep_preset_starts_the_deeper_reader_from_hqs_start() {
    let dir = check_hq_preset(
        seed_table::Preset::HqDeep,
        "hq-deep",
        "plate-ctc-deep-v2",
        &[1, 5],
    );
    let args = [
        "--preset",
        "hq-deep",
        "--arch",
        "plate-ctc-v2",
        "--lr",
        "1e-3",
    ];
    let (stdout, c) = tiny_seed_table(dir.path(), "v2", &args);
    assert!(
        stdout.contains("round 0 of every row: plate-ctc-v2 HQ's shipped start"),
        "{stdout}"
    );
    assert_eq!(c["arch"], "plate-ctc-v2", "{c}");
    assert_eq!(c["lr"], 1e-3, "{c}");
}

/// `seed-table --preset hq-v3` is the standard budget with plate-ctc-deep-v3 from HQ's shipped start for it, at
/// the fine-tuning rate, with one FedAvg row (E = 5): the run says so and records it.
#[test]
fn the_hq_v3_preset_starts_plate_ctc_deep_v3_from_hqs_start() {
    check_hq_preset(seed_table::Preset::HqV3, "hq-v3", "plate-ctc-deep-v3", &[5]);
}

/// `seed-table --preset hq-v4` is hq-v3 with plate-ctc-deep-v4, from HQ's shipped start for it.
#[test]
fn the_hq_v4_preset_starts_plate_ctc_deep_v4_from_hqs_start() {
    check_hq_preset(seed_table::Preset::HqV4, "hq-v4", "plate-ctc-deep-v4", &[5]);
}

/// `seed-table --hq-start`: every row starts from HQ's shipped start (the sealed round 0 of a FedAvg row is it,
/// tensor for tensor, and every row reads the same at epoch 0, where random weights read nothing), fine-tuned at
/// the lower rate unless `--lr` says otherwise; an architecture HQ ships no start for, and a `--start-from` file of
/// another architecture, are refused in one line with nothing written.
#[test]
fn the_seed_table_starts_every_row_from_hqs_start_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rows.json");
    let out = dir.path().join("st");
    let o = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .args(["seed-table", "--hq-start", "--arch", "plate-ctc-v2"])
        .args(["--total-epochs", "1", "--samples-per-site", "16"])
        .args(["--val", "40", "--e-sweep", "1", "--out"])
        .arg(&out)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("round 0 of every row: plate-ctc-v2 HQ's shipped start"),
        "{stdout}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["config"]["start"], "shipped");
    assert_eq!(v["config"]["lr"], 5e-4);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    let epoch0: Vec<f64> = rows
        .iter()
        .map(|r| r["curve"][0][1].as_f64().unwrap())
        .collect();
    assert!(
        epoch0[0] > 0.2,
        "HQ's start reads plates at epoch 0: {epoch0:?}"
    );
    assert!(epoch0.iter().all(|&a| a == epoch0[0]), "{epoch0:?}");

    assert_eq!(
        sealed_round0(&out.join("rows").join("fedavg-e1"), Arch::PlateCtcV2),
        shipped_tensors(Arch::PlateCtcV2),
        "round 0 is HQ's shipped start"
    );

    // An explicit rate wins over the fine-tuning default.
    let json2 = dir.path().join("rows2.json");
    let o = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .args(["seed-table", "--hq-start", "--lr", "1e-4"])
        .args(["--total-epochs", "1", "--samples-per-site", "8"])
        .args(["--val", "8", "--e-sweep", "1", "--out"])
        .arg(dir.path().join("st2"))
        .arg("--json")
        .arg(&json2)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json2).unwrap()).unwrap();
    assert_eq!(v["config"]["lr"], 1e-4);

    // HQ ships no plate-ctc start: refused by name, nothing written.
    let small = [
        "--total-epochs",
        "1",
        "--samples-per-site",
        "8",
        "--val",
        "8",
    ];
    let refused = dir.path().join("refused");
    let err = refused_in_one_line(
        &[
            &["seed-table", "--hq-start", "--arch", "plate-ctc"],
            &small[..],
        ]
        .concat(),
        "--out",
        &refused,
    );
    assert!(err.contains("HQ ships no start for plate-ctc"), "{err}");

    // --start-from a model of another architecture: refused by name, nothing written.
    let other = dir.path().join("ctc.safetensors");
    write_model(&other, Arch::PlateCtc, 1);
    let other_arg = other.to_str().unwrap();
    let err = refused_in_one_line(
        &[
            &[
                "seed-table",
                "--arch",
                "plate-ctc-v2",
                "--start-from",
                other_arg,
            ],
            &small[..],
        ]
        .concat(),
        "--out",
        &refused,
    );
    assert!(err.contains("HQ's start"), "{err}");
}

/// `ferry-lab demo --arch`: plate-ctc-deep goes through the whole loop (HQ initialises it, both sites train it,
/// the merged global reads as it), and a model that is not a plate reader is refused before anything is written.
#[test]
fn the_demo_runs_the_reader_it_is_given_and_refuses_a_non_plate_model() {
    let tmp = tempfile::tempdir().unwrap();
    refuses_a_non_plate_model("demo", "--dir", &tmp.path().join("refused"));

    let dir = tmp.path().join("deep");
    let stdout = small_demo(
        &["--arch", "plate-ctc-deep", "--samples", "48", "--val", "16"],
        &dir,
    );
    assert!(stdout.contains("plate-ctc-deep"), "{stdout}");
    assert!(dir.join("summary.csv").is_file());
    // The global HQ signed names the architecture; a site imports it and trains that network.
    let global = std::fs::read(dir.join("usb").join("global-r1.ferry")).unwrap();
    assert!(
        global.windows(14).any(|w| w == b"plate-ctc-deep"),
        "the round-1 global names plate-ctc-deep"
    );
}

/// `ferry-lab demo --rounds 1 --local-test 8 ARGS --dir DIR`, which must succeed; returns its standard output.
fn small_demo(args: &[&str], dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .args(["demo", "--rounds", "1", "--local-test", "8"])
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `ferry-lab COMMAND --arch mnist-cnn OUT_FLAG out`: refused in one line naming the model, nothing written.
fn refuses_a_non_plate_model(command: &str, out_flag: &str, out: &Path) {
    let err = refused_in_one_line(&[command, "--arch", "mnist-cnn"], out_flag, out);
    assert!(
        err.contains("plate reader") && err.contains("mnist-cnn"),
        "{command}: {err}"
    );
}

/// Writes initial weights of `arch` (from `seed`) to `path` as a safetensors file.
fn write_model(path: &Path, arch: Arch, seed: u64) {
    let model = Model::init(arch, seed, &Device::Cpu).unwrap();
    std::fs::write(path, model.to_safetensors().unwrap()).unwrap();
}

/// Runs `ferry-lab ARGS OUT_FLAG OUT`, which must be refused with a one-line error and nothing written at `OUT`;
/// returns the error.
fn refused_in_one_line(args: &[&str], out_flag: &str, out: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .args(args)
        .arg(out_flag)
        .arg(out)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{args:?}");
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(!out.exists(), "{args:?}: nothing written for a refused run");
    err
}

/// The round 0 HQ sealed into the federation at `dir`: `usb/global-r0.ferry`, verified against `keys/hq.pub`, as
/// an `arch` model's safetensors.
fn sealed_round0(dir: &Path, arch: Arch) -> Vec<u8> {
    let mut hq = ferry_bundle::Keyring::new();
    hq.add(ferry_bundle::PublicKey::read(&dir.join("keys").join("hq.pub")).unwrap())
        .unwrap();
    let r0 = ferry_bundle::open_file(&dir.join("usb").join("global-r0.ferry"), &hq).unwrap();
    Model::from_safetensors(arch, r0.payload(), &Device::Cpu)
        .unwrap()
        .to_safetensors()
        .unwrap()
}

/// HQ's shipped start for `arch`, as a model's safetensors (what a sealed round 0 of it reads back as).
fn shipped_tensors(arch: Arch) -> Vec<u8> {
    Model::from_safetensors(
        arch,
        ferry_lab::start::shipped_start(arch).unwrap(),
        &Device::Cpu,
    )
    .unwrap()
    .to_safetensors()
    .unwrap()
}

/// `ferry-lab demo` by default seals HQ's shipped start as round 0 (tensor for tensor) and fine-tunes it at the
/// lower rate; `--scratch` seals random weights from the seed instead.
#[test]
fn the_demo_starts_from_hqs_shipped_start_unless_told_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let arch = ferry_lab::demo::DemoConfig::default().arch;
    let r0 = |dir: &Path| sealed_round0(dir, arch);
    let shipped = shipped_tensors(arch);

    let warm = tmp.path().join("shipped");
    let stdout = small_demo(&["--samples", "32", "--val", "8"], &warm);
    assert!(stdout.contains("HQ's shipped start"), "{stdout}");
    assert!(stdout.contains("Adam lr 0.0005"), "{stdout}");
    assert_eq!(r0(&warm), shipped, "round 0 is HQ's shipped start");

    let cold = tmp.path().join("scratch");
    let stdout = small_demo(&["--samples", "32", "--val", "8", "--scratch"], &cold);
    assert!(stdout.contains("initialised from seed 1"), "{stdout}");
    assert!(stdout.contains("Adam lr 0.002"), "{stdout}");
    let random = Model::init(arch, 1, &Device::Cpu)
        .unwrap()
        .to_safetensors()
        .unwrap();
    assert_eq!(r0(&cold), random, "round 0 is the seed's random weights");
}

/// `ferry-lab demo --start-from FILE`: HQ seals the given weights as round 0 (the signed global-r0 carries exactly
/// them), and a file that is not a model of `--arch` is refused in one line before anything is written.
#[test]
fn the_demo_starts_from_the_weights_hq_gives_it() {
    let tmp = tempfile::tempdir().unwrap();
    let start = tmp.path().join("hq-start.safetensors");
    let model = Model::init(Arch::PlateCtcV2, 42, &Device::Cpu).unwrap();
    std::fs::write(&start, model.to_safetensors().unwrap()).unwrap();

    let dir = tmp.path().join("warm");
    let start_arg = start.to_str().unwrap();
    let stdout = small_demo(
        &[
            "--arch",
            "plate-ctc-v2",
            "--samples",
            "32",
            "--val",
            "8",
            "--start-from",
            start_arg,
        ],
        &dir,
    );
    assert!(stdout.contains("HQ's warm start from"), "{stdout}");
    assert_eq!(
        sealed_round0(&dir, Arch::PlateCtcV2),
        model.to_safetensors().unwrap(),
        "round 0 is HQ's start, tensor for tensor"
    );

    // A plate-ctc model given for a plate-ctc-v2 demo: refused by name, nothing written.
    let other = tmp.path().join("other.safetensors");
    write_model(&other, Arch::PlateCtc, 1);
    let err = refused_in_one_line(
        &[
            "demo",
            "--arch",
            "plate-ctc-v2",
            "--start-from",
            other.to_str().unwrap(),
        ],
        "--dir",
        &tmp.path().join("refused"),
    );
    assert!(
        err.contains("HQ's start") && err.contains("other.safetensors"),
        "{err}"
    );
}
