//! Issue 16 at HQ through real files: the ledger's timestamps, weights, distances and evaluations; the quality
//! gate that refuses a worse global (nothing written, ledger unchanged); republishing an earlier global as the
//! next round; the per-tensor diff; and ledgers written before issue 16 still load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_bundle::{Bundle, Draft, Dtype, Keyring, Payload, Role, SecretKey, TensorRef};
use ferry_merge::hq::{self, EvalGate, HqError, RoundConfig};
use ferry_merge::{EvalRecord, Ledger, LEDGER_FILE};

struct Fed {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    out: PathBuf,
    usb: PathBuf,
    hq: SecretKey,
    sites: Vec<SecretKey>,
    ring: Keyring,
    hq_ring: Keyring,
}

/// One F32 tensor `w` of 4 values and an I64 counter.
fn payload(w: [f32; 4], count: i64) -> Payload {
    let d: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    let c = count.to_le_bytes();
    Payload::from_tensors(&[
        TensorRef {
            name: "bn.num_batches_tracked",
            dtype: Dtype::I64,
            shape: &[],
            data: &c,
        },
        TensorRef {
            name: "w",
            dtype: Dtype::F32,
            shape: &[4],
            data: &d,
        },
    ])
    .unwrap()
}

fn w_of(b: &Bundle) -> Vec<f32> {
    let t = b.tensors().find(|t| t.name == "w").unwrap();
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The "evaluation" of these tests: the mean of `w`, as an accuracy. Real bundles, a real verified payload.
fn score(b: &Bundle) -> Result<EvalRecord, String> {
    let w = w_of(b);
    Ok(EvalRecord {
        time: ferry_bundle::unix_now(),
        data: "mean-of-w".into(),
        samples: w.len() as u64,
        accuracy: f64::from(w.iter().sum::<f32>()) / w.len() as f64,
        char_accuracy: None,
        loss: 0.0,
    })
}

impl Fed {
    fn new(w0: f32) -> (Fed, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]);
        let sites: Vec<SecretKey> = ["site-a", "site-b"]
            .iter()
            .enumerate()
            .map(|(i, id)| SecretKey::from_seed(Role::Site, id, [10 + i as u8; 32]))
            .collect();
        let mut ring = Keyring::new();
        for s in &sites {
            ring.add(s.public()).unwrap();
        }
        let mut hq_ring = Keyring::new();
        hq_ring.add(hq.public()).unwrap();
        let fed = Fed {
            state: tmp.path().join("hq"),
            out: tmp.path().join("bundles"),
            usb: tmp.path().join("usb"),
            hq,
            sites,
            ring,
            hq_ring,
            _tmp: tmp,
        };
        let g0 = hq::init(
            &fed.state,
            &fed.hq,
            &payload([w0; 4], 0),
            "city",
            None,
            &fed.out,
            3,
        )
        .unwrap()
        .0;
        (fed, g0)
    }

    fn update(&self, i: usize, global: &Path, w: f32, samples: u64) -> PathBuf {
        let g = ferry_bundle::open_file(global, &self.hq_ring).unwrap();
        let key = &self.sites[i];
        let draft = Draft::update_for(&g.manifest, &g.hash, key.id(), samples);
        let sealed = ferry_bundle::seal(draft, &payload([w; 4], 1), key, 3).unwrap();
        // One folder per update: a stick holds one file per site and round.
        sealed
            .write_to_dir(&self.usb.join(&sealed.hash[..12]))
            .unwrap()
    }

    fn merge(
        &self,
        files: &[PathBuf],
        gate: Option<&mut EvalGate<'_>>,
    ) -> Result<hq::RoundOutcome, HqError> {
        hq::merge_round_with(
            &self.state,
            &self.hq,
            &self.ring,
            &[],
            files,
            &RoundConfig::default(),
            &self.out,
            None,
            gate,
        )
    }

    fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        for root in [&self.state, &self.out] {
            for e in walk(root) {
                if e.file_name().unwrap() != "lock" {
                    m.insert(e.display().to_string(), std::fs::read(&e).unwrap());
                }
            }
        }
        m
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
    }
    v
}

#[test]
fn the_ledger_records_time_weights_distances_and_the_gates_scores() {
    let (fed, g0) = Fed::new(0.5);
    let a = fed.update(0, &g0, 0.7, 300);
    let b = fed.update(1, &g0, 0.9, 100);
    let mut evaluate = score;
    let mut gate = EvalGate {
        min_accuracy: Some(0.6),
        evaluate: &mut evaluate,
    };
    let before = ferry_bundle::unix_now();
    let out = fed.merge(&[a, b], Some(&mut gate)).unwrap();
    let after = ferry_bundle::unix_now();
    let merged = ferry_bundle::open_file(&out.path, &fed.hq_ring).unwrap();
    // FedAvg by samples: 0.75 * 0.7 + 0.25 * 0.9.
    for v in w_of(&merged) {
        assert!((v - 0.75).abs() < 1e-6, "{v}");
    }

    let data = Ledger::peek(&fed.state).unwrap();
    let r0 = &data.history[0];
    let r1 = &data.history[1];
    assert!(r0.time.is_some());
    let t = r1.time.unwrap();
    assert!(
        (before..=after).contains(&t),
        "{t} not in {before}..={after}"
    );
    // Weights and distances as the merge report gave them: 2 L2 of a 4-vector moved by 0.2 and 0.4.
    let by_site: BTreeMap<&str, _> = r1.stats.iter().map(|s| (s.site.as_str(), s)).collect();
    assert_eq!(by_site.len(), 2);
    assert!((by_site["site-a"].weight.unwrap() - 0.75).abs() < 1e-12);
    assert!((by_site["site-b"].weight.unwrap() - 0.25).abs() < 1e-12);
    assert!((by_site["site-a"].distance - 0.4).abs() < 1e-6);
    assert!((by_site["site-b"].distance - 0.8).abs() < 1e-6);
    for (c, s) in out
        .report
        .contributions
        .iter()
        .map(|c| (c, by_site[c.site.as_str()]))
    {
        assert_eq!(
            (c.weight, c.distance, &c.bundle),
            (s.weight, s.distance, &s.bundle)
        );
    }
    // The gate's two scores: the current global's on round 0, the merged one's on round 1.
    assert_eq!(r0.evals.len(), 1);
    assert!((r0.evals[0].accuracy - 0.5).abs() < 1e-9);
    assert_eq!(r1.evals.len(), 1);
    assert!((r1.evals[0].accuracy - 0.75).abs() < 1e-6);
    assert_eq!(r1.evals[0].data, "mean-of-w");
    // status prints them.
    let shown = hq::status(&fed.state).unwrap().to_string();
    assert!(
        shown.contains("site-a (300, weight 0.7500, distance 0.4000)"),
        "{shown}"
    );
    assert!(
        shown.contains("eval mean-of-w: 75.0% on 4 samples"),
        "{shown}"
    );
    assert!(shown.contains(&ferry_bundle::utc(t)), "{shown}");
}

#[test]
fn the_gate_refuses_a_worse_global_and_writes_nothing() {
    let (fed, g0) = Fed::new(0.5);
    let before = fed.snapshot();
    let mut evaluate = score;
    // Below the current global (0.5).
    let worse = [fed.update(0, &g0, 0.2, 100), fed.update(1, &g0, 0.4, 100)];
    let mut gate = EvalGate {
        min_accuracy: None,
        evaluate: &mut evaluate,
    };
    let e = fed.merge(&worse, Some(&mut gate)).unwrap_err();
    assert!(
        matches!(&e, HqError::BelowGate { accuracy, .. } if (accuracy - 0.3).abs() < 1e-6),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("30.00%") && msg.contains("round 0") && msg.contains("50.00%"),
        "{msg}"
    );
    assert!(
        msg.contains("nothing written, the ledger is unchanged"),
        "{msg}"
    );
    assert_eq!(fed.snapshot(), before);

    // Better than the current one, but below --min-accuracy.
    let better = [fed.update(0, &g0, 0.6, 100), fed.update(1, &g0, 0.6, 100)];
    let mut gate = EvalGate {
        min_accuracy: Some(0.9),
        evaluate: &mut evaluate,
    };
    let e = fed.merge(&better, Some(&mut gate)).unwrap_err();
    assert!(e.to_string().contains("below --min-accuracy 0.9"), "{e}");
    assert_eq!(fed.snapshot(), before);

    // An evaluation that fails refuses too.
    let mut failing = |_: &Bundle| -> Result<EvalRecord, String> { Err("no data".into()) };
    let mut gate = EvalGate {
        min_accuracy: None,
        evaluate: &mut failing,
    };
    let e = fed.merge(&better, Some(&mut gate)).unwrap_err();
    assert!(
        matches!(&e, HqError::Eval { why, .. } if why == "no data"),
        "{e}"
    );
    assert_eq!(fed.snapshot(), before);

    // Without a gate the same updates merge, and the ledger has no evaluation.
    fed.merge(&worse, None).unwrap();
    let data = Ledger::peek(&fed.state).unwrap();
    assert_eq!(data.current.round, 1);
    assert!(data.history.iter().all(|r| r.evals.is_empty()));
}

#[test]
fn republish_reissues_an_earlier_global_as_the_next_round() {
    let (fed, g0) = Fed::new(0.5);
    let r1 = fed
        .merge(
            &[fed.update(0, &g0, 0.7, 100), fed.update(1, &g0, 0.7, 100)],
            None,
        )
        .unwrap();
    let r2 = fed
        .merge(
            &[
                fed.update(0, &r1.path, 0.1, 100),
                fed.update(1, &r1.path, 0.1, 100),
            ],
            None,
        )
        .unwrap();

    // Refusals first: nothing written.
    let before = fed.snapshot();
    for (from, why) in [(2, "it is the current global"), (7, "rounds are 0 to 2")] {
        let e = hq::republish(
            &fed.state,
            &fed.hq,
            from,
            3,
            86_400,
            &Default::default(),
            &fed.out,
        )
        .unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
        assert_eq!(fed.snapshot(), before);
    }
    let e = hq::republish(
        &fed.state,
        &fed.sites[0],
        1,
        3,
        86_400,
        &Default::default(),
        &fed.out,
    )
    .unwrap_err();
    assert!(matches!(e, HqError::NotHqKey(_)), "{e}");
    assert_eq!(fed.snapshot(), before);

    let (path, sealed) = hq::republish(
        &fed.state,
        &fed.hq,
        1,
        3,
        86_400,
        &Default::default(),
        &fed.out,
    )
    .unwrap();
    assert_eq!(path.file_name().unwrap(), "global-r3.ferry");
    let g3 = ferry_bundle::open_file(&path, &fed.hq_ring).unwrap();
    let g1 = ferry_bundle::open_file(&r1.path, &fed.hq_ring).unwrap();
    let g2 = ferry_bundle::open_file(&r2.path, &fed.hq_ring).unwrap();
    // Round 1's weights, as round 3, based on round 2's global (what a site holding round 2 accepts).
    assert_eq!(g3.payload(), g1.payload());
    assert_eq!(g3.manifest.round, 3);
    assert_eq!(g3.manifest.base.as_deref(), Some(g2.hash.as_str()));
    assert!(g3.manifest.contributors.is_empty());
    assert_eq!(g3.manifest.strategy.as_deref(), Some("republish r1"));
    assert_eq!(g3.hash, sealed.hash);
    let data = Ledger::peek(&fed.state).unwrap();
    assert_eq!(data.current.round, 3);
    assert_eq!(data.history[3].republished_from, Some(1));
    assert!(hq::status(&fed.state)
        .unwrap()
        .to_string()
        .contains("weights of round 1"));

    // The federation goes on from it: updates based on round 3 merge into round 4.
    let r4 = fed
        .merge(
            &[
                fed.update(0, &path, 0.8, 100),
                fed.update(1, &path, 0.8, 100),
            ],
            None,
        )
        .unwrap();
    assert_eq!(r4.sealed.manifest.round, 4);
    // And an update still based on round 2 is stale.
    let stale = fed.update(0, &r2.path, 0.8, 100);
    let e = fed.merge(&[stale.clone(), stale], None).unwrap_err();
    assert!(e.to_string().contains("round-2"), "{e}");
}

#[test]
fn eval_results_are_recorded_for_the_ledgers_globals_only() {
    let (fed, g0) = Fed::new(0.5);
    let g = ferry_bundle::open_file(&g0, &fed.hq_ring).unwrap();
    let rec = score(&g).unwrap();
    assert_eq!(
        hq::record_eval(&fed.state, &g.hash, rec.clone()).unwrap(),
        Some(0)
    );
    let before = fed.snapshot();
    let other = "ab".repeat(32);
    assert_eq!(
        hq::record_eval(&fed.state, &other, rec.clone()).unwrap(),
        None
    );
    assert_eq!(fed.snapshot(), before);
    assert_eq!(
        Ledger::peek(&fed.state).unwrap().history[0].evals,
        vec![rec]
    );
    let round0 = hq::global_of_round(&fed.state, &fed.hq, 0).unwrap();
    assert_eq!(round0.hash, g.hash);
}

#[test]
fn diff_measures_every_tensor() {
    let (fed, g0) = Fed::new(0.5);
    let u = fed.update(0, &g0, 0.7, 10);
    let a = ferry_bundle::open_file(&g0, &fed.hq_ring).unwrap();
    let b = ferry_bundle::open_file(&u, &fed.ring).unwrap();
    let d = ferry_merge::diff::diff(&a, &b).unwrap();
    assert_eq!(d.tensors.len(), 2);
    let counter = &d.tensors[0];
    assert_eq!(
        (
            counter.name.as_str(),
            counter.l2,
            counter.max_abs,
            counter.relative
        ),
        ("bn.num_batches_tracked", 1.0, 1.0, None)
    );
    let w = &d.tensors[1];
    assert_eq!(
        (w.name.as_str(), w.dtype.as_str(), w.shape.clone()),
        ("w", "F32", vec![4])
    );
    // 4 elements moved by 0.2: L2 0.4, relative to |(0.5,0.5,0.5,0.5)| = 1.
    assert!((w.l2 - 0.4).abs() < 1e-6 && (w.max_abs - 0.2).abs() < 1e-6);
    assert!((w.relative.unwrap() - 0.4).abs() < 1e-6);
    assert!((d.total_l2 - 0.4).abs() < 1e-6);
    assert_eq!(ferry_merge::diff::diff(&a, &a).unwrap().total_l2, 0.0);

    // Another model's bundle is refused with what differs.
    let other = Payload::from_tensors(&[TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[1],
        data: &1f32.to_le_bytes(),
    }])
    .unwrap();
    let draft = Draft::initial("city", None);
    let sealed = ferry_bundle::seal(draft, &other, &fed.hq, 3).unwrap();
    let o = ferry_bundle::open(&sealed.bytes, &fed.hq_ring, &Default::default()).unwrap();
    let e = ferry_merge::diff::diff(&a, &o).unwrap_err();
    assert!(e.to_string().contains("different models"), "{e}");
}

#[test]
fn a_ledger_written_before_issue_16_still_loads() {
    let (fed, g0) = Fed::new(0.5);
    fed.merge(
        &[fed.update(0, &g0, 0.7, 100), fed.update(1, &g0, 0.7, 100)],
        None,
    )
    .unwrap();
    // Strip every field issue 16 added, as an older ferry wrote the file.
    let path = fed.state.join(LEDGER_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for r in v["history"].as_array_mut().unwrap() {
        let r = r.as_object_mut().unwrap();
        for k in ["time", "stats", "evals", "republished_from"] {
            r.remove(k);
        }
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let data = Ledger::peek(&fed.state).unwrap();
    assert_eq!(data.current.round, 1);
    assert!(data
        .history
        .iter()
        .all(|r| r.time.is_none() && r.stats.is_empty()));
    let shown = hq::status(&fed.state).unwrap().to_string();
    assert!(shown.contains("site-a (100)"), "{shown}");
    // Statistics naming a bundle the round does not list are refused as damage.
    v["history"][1]["stats"] = serde_json::json!([{
        "bundle": "cd".repeat(32), "site": "x", "weight": 1.0, "distance": 0.0
    }]);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let e = Ledger::peek(&fed.state).unwrap_err();
    assert!(e.to_string().contains("statistics"), "{e}");
}
