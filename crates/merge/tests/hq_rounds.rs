//! HQ and sites through real files: init → sites pack → merge → import → pack → merge, checked against an
//! independent reference; every refusal leaves the out dir and the HQ state byte-identical.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_bundle::{seal, Draft, Dtype, Keyring, Payload, Role, SecretKey, TensorRef};
use ferry_merge::hq::{self, CappedSamples, HqError, RoundConfig};
use ferry_merge::{LedgerError, MergeConfig, MergeError, Strategy};

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

/// One model's tensors: conv (F32), BN stats (F32) and counter (I64), a head in F16, an embedding in BF16.
#[derive(Clone)]
struct Model {
    conv: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    count: i64,
    head: Vec<f32>,
    emb: Vec<f32>,
}

fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Model {
    fn at(x: f32) -> Model {
        Model {
            conv: (0..6).map(|i| x + i as f32 * 0.5).collect(),
            mean: vec![x, -x, 0.5 * x],
            var: vec![1.0 + x.abs(), 2.0, 0.5],
            count: (x.abs() * 10.0) as i64,
            head: vec![x * 0.1, 1.0 - x * 0.2],
            emb: vec![x * 3.0, -1.0],
        }
    }

    fn payload(&self) -> Payload {
        let (conv, mean, var) = (
            bytes_f32(&self.conv),
            bytes_f32(&self.mean),
            bytes_f32(&self.var),
        );
        let count = self.count.to_le_bytes();
        let head: Vec<u8> = self
            .head
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        let emb: Vec<u8> = self
            .emb
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        Payload::from_tensors(&[
            TensorRef {
                name: "conv1.weight",
                dtype: Dtype::F32,
                shape: &[2, 3],
                data: &conv,
            },
            TensorRef {
                name: "bn1.running_mean",
                dtype: Dtype::F32,
                shape: &[3],
                data: &mean,
            },
            TensorRef {
                name: "bn1.running_var",
                dtype: Dtype::F32,
                shape: &[3],
                data: &var,
            },
            TensorRef {
                name: "bn1.num_batches_tracked",
                dtype: Dtype::I64,
                shape: &[],
                data: &count,
            },
            TensorRef {
                name: "head.weight",
                dtype: Dtype::F16,
                shape: &[2],
                data: &head,
            },
            TensorRef {
                name: "emb.weight",
                dtype: Dtype::BF16,
                shape: &[2],
                data: &emb,
            },
        ])
        .unwrap()
    }
}

fn read_tensors(payload: &[u8]) -> BTreeMap<String, (Dtype, Vec<u8>)> {
    let st = safetensors::SafeTensors::deserialize(payload).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.data().to_vec())))
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

impl Fed {
    fn new() -> Fed {
        let tmp = tempfile::tempdir().unwrap();
        let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]);
        let sites: Vec<SecretKey> = ["site-a", "site-b", "site-c"]
            .iter()
            .enumerate()
            .map(|(i, id)| SecretKey::from_seed(Role::Site, id, [10 + i as u8; 32]))
            .collect();
        let mut ring = Keyring::new();
        for s in &sites[..2] {
            ring.add(s.public()).unwrap();
        }
        let mut hq_ring = Keyring::new();
        hq_ring.add(hq.public()).unwrap();
        let state = tmp.path().join("hq");
        let out = tmp.path().join("bundles");
        let usb = tmp.path().join("usb");
        Fed {
            state,
            out,
            usb,
            hq,
            sites,
            ring,
            hq_ring,
            _tmp: tmp,
        }
    }

    /// Site `i` verifies `global`, "trains" to `model` and writes its update with `samples` to the stick: what
    /// `ferry-client pack` (or `export`) does.
    fn site_round(&self, i: usize, global: &Path, model: &Model, samples: u64) -> PathBuf {
        self.site_update(i, global, model, samples, &self.usb)
    }

    /// [`Fed::site_round`] into any folder.
    fn site_update(
        &self,
        i: usize,
        global: &Path,
        model: &Model,
        samples: u64,
        out: &Path,
    ) -> PathBuf {
        let g = ferry_bundle::open_file(global, &self.hq_ring).unwrap();
        let key = &self.sites[i];
        let draft = Draft::update_for(&g.manifest, &g.hash, key.id(), samples);
        let sealed = ferry_bundle::seal(draft, &model.payload(), key, 3).unwrap();
        sealed.write_to_dir(out).unwrap()
    }

    /// HQ starts federation `city` from `Model::at(0.0)`, its payload encrypted to site-a and site-b (issue 15
    /// §5); returns the round-0 global's path and what was sealed.
    fn start_encrypted(&self) -> (PathBuf, ferry_bundle::Sealed) {
        let draft = Draft {
            encrypt_to: self.sites[..2].iter().map(|s| s.public()).collect(),
            ..Draft::initial("city", Some("test".into()))
        };
        hq::init_with(
            &self.state,
            &self.hq,
            &Model::at(0.0).payload(),
            draft,
            &self.out,
            3,
        )
        .unwrap()
    }

    /// site-a and site-b each read `global` with their own key and send `Model::at(1.0)` / `Model::at(3.0)` (100
    /// samples each), encrypted to HQ's key (format 3), to the stick.
    fn encrypted_updates(&self, global: &Path) -> Vec<PathBuf> {
        [(0, 1.0f32), (1, 3.0)]
            .into_iter()
            .map(|(i, x)| {
                let mut ring = self.hq_ring.clone();
                ring.add_identity(&self.sites[i]);
                let g = ferry_bundle::open_file(global, &ring).unwrap();
                let draft = Draft {
                    encrypt_to: vec![self.hq.public()],
                    ..Draft::update_for(&g.manifest, &g.hash, self.sites[i].id(), 100)
                };
                let s = seal(draft, &Model::at(x).payload(), &self.sites[i], 3).unwrap();
                assert_eq!(s.manifest.format, 3);
                s.write_to_dir(&self.usb).unwrap()
            })
            .collect()
    }

    /// HQ starts federation `city` from `Model::at(0.0)`; returns the round-0 global's path.
    fn start(&self) -> PathBuf {
        hq::init(
            &self.state,
            &self.hq,
            &Model::at(0.0).payload(),
            "city",
            None,
            &self.out,
            3,
        )
        .unwrap()
        .0
    }

    /// Merge `files`, expecting a refusal that `ok` accepts and that changes nothing on disk.
    fn refused(
        &self,
        files: &[PathBuf],
        cfg: &RoundConfig,
        ring: &Keyring,
        ok: &dyn Fn(&HqError) -> bool,
    ) -> HqError {
        self.refused_with(&[], files, cfg, ring, ok)
    }

    /// [`Fed::refused`], with revocation lists given to the merge (file name, bytes).
    fn refused_with(
        &self,
        lists: &[(String, Vec<u8>)],
        files: &[PathBuf],
        cfg: &RoundConfig,
        ring: &Keyring,
        ok: &dyn Fn(&HqError) -> bool,
    ) -> HqError {
        let before = self.snapshot();
        let err =
            hq::merge_round(&self.state, &self.hq, ring, lists, files, cfg, &self.out).unwrap_err();
        assert!(ok(&err), "unexpected: {err}");
        assert_eq!(self.snapshot(), before, "state changed after: {err}");
        err
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

/// The defaults, except that one site may merge alone: most tests here are about something else.
fn fedavg() -> RoundConfig {
    RoundConfig {
        min_sites: 1,
        ..RoundConfig::default()
    }
}

#[test]
fn two_rounds_match_an_independent_reference() {
    let fed = Fed::new();
    let (g0, _) = hq::init(
        &fed.state,
        &fed.hq,
        &Model::at(0.0).payload(),
        "city",
        Some("test"),
        &fed.out,
        3,
    )
    .unwrap();
    let (a, b) = (Model::at(1.0), Model::at(3.0));
    let ua = fed.site_round(0, &g0, &a, 100);
    let ub = fed.site_round(1, &g0, &b, 300);
    // Input order does not matter: merge in both orders into two copies of the state.
    let copy = fed.state.parent().unwrap().join("hq-copy");
    std::fs::create_dir_all(copy.join("globals")).unwrap();
    for f in walk(&fed.state) {
        let rel = f.strip_prefix(&fed.state).unwrap();
        std::fs::copy(&f, copy.join(rel)).unwrap();
    }
    let r1 = hq::merge_round(
        &fed.state,
        &fed.hq,
        &fed.ring,
        &[],
        &[ua.clone(), ub.clone()],
        &fedavg(),
        &fed.out,
    )
    .unwrap();
    let out2 = fed.state.parent().unwrap().join("bundles2");
    let r1b = hq::merge_round(&copy, &fed.hq, &fed.ring, &[], &[ub, ua], &fedavg(), &out2).unwrap();
    let g1 = ferry_bundle::open_file(&r1.path, &fed.hq_ring).unwrap();
    let g1b = ferry_bundle::open_file(&r1b.path, &fed.hq_ring).unwrap();
    assert_eq!(
        g1.payload(),
        g1b.payload(),
        "payload depends on input order"
    );
    assert_eq!(g1.manifest.round, 1);
    assert_eq!(g1.manifest.contributors.len(), 2);

    // Reference, computed here: weights 1/4 and 3/4.
    let t = read_tensors(g1.payload());
    let (wa, wb) = (0.25f64, 0.75f64);
    let avg = |x: &[f32], y: &[f32]| -> Vec<f32> {
        x.iter()
            .zip(y)
            .map(|(p, q)| (wa * *p as f64 + wb * *q as f64) as f32)
            .collect()
    };
    assert_eq!(f32s(&t["conv1.weight"].1), avg(&a.conv, &b.conv));
    let mean = avg(&a.mean, &b.mean);
    assert_eq!(f32s(&t["bn1.running_mean"].1), mean);
    let pooled: Vec<f32> = (0..3)
        .map(|i| {
            let mu = wa * a.mean[i] as f64 + wb * b.mean[i] as f64;
            (wa * (a.var[i] as f64 + (a.mean[i] as f64 - mu).powi(2))
                + wb * (b.var[i] as f64 + (b.mean[i] as f64 - mu).powi(2))) as f32
        })
        .collect();
    let got = f32s(&t["bn1.running_var"].1);
    for (g, p) in got.iter().zip(&pooled) {
        assert!((g - p).abs() < 1e-6, "pooled var {got:?} vs {pooled:?}");
    }
    assert_ne!(
        got,
        avg(&a.var, &b.var),
        "variance must be pooled, not averaged"
    );
    assert_eq!(
        t["bn1.num_batches_tracked"],
        // An integer follows the strategy: the weighted average, rounded.
        (
            Dtype::I64,
            ((wa * a.count as f64 + wb * b.count as f64).round() as i64)
                .to_le_bytes()
                .to_vec()
        )
    );
    let head: Vec<u8> = avg(&a.head, &b.head)
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect();
    assert_eq!(t["head.weight"], (Dtype::F16, head));
    let emb: Vec<u8> = avg(&a.emb, &b.emb)
        .iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect();
    assert_eq!(t["emb.weight"], (Dtype::BF16, emb));

    // Round 2 from the imported global.
    let ua2 = fed.site_round(0, &r1.path, &Model::at(2.0), 100);
    let ub2 = fed.site_round(1, &r1.path, &Model::at(2.0), 100);
    let r2 = hq::merge_round(
        &fed.state,
        &fed.hq,
        &fed.ring,
        &[],
        &[ua2, ub2],
        &fedavg(),
        &fed.out,
    )
    .unwrap();
    let g2 = ferry_bundle::open_file(&r2.path, &fed.hq_ring).unwrap();
    assert_eq!(g2.manifest.round, 2);
    assert_eq!(g2.manifest.base.as_deref(), Some(g1.hash.as_str()));
    assert_eq!(
        f32s(&read_tensors(g2.payload())["conv1.weight"].1),
        Model::at(2.0).conv
    );
    let status = hq::status(&fed.state).unwrap();
    assert_eq!(status.round, 2);
    assert_eq!(status.rounds.len(), 3);
}

#[test]
fn every_refusal_writes_nothing_and_leaves_the_state() {
    let fed = Fed::new();
    let g0 = fed.start();
    let ua = fed.site_round(0, &g0, &Model::at(1.0), 10);
    let ub = fed.site_round(1, &g0, &Model::at(2.0), 10);
    let r1 = hq::merge_round(
        &fed.state,
        &fed.hq,
        &fed.ring,
        &[],
        std::slice::from_ref(&ua),
        &fedavg(),
        &fed.out,
    )
    .unwrap();
    let check =
        |files: &[PathBuf], cfg: &RoundConfig, ring: &Keyring, ok: &dyn Fn(&HqError) -> bool| {
            fed.refused(files, cfg, ring, ok);
        };
    // Stale: site B's update is based on round 0, HQ is at round 1.
    check(std::slice::from_ref(&ub), &fedavg(), &fed.ring, &|e| {
        matches!(e, HqError::Ledger(LedgerError::Stale { .. }))
    });
    // Replay.
    check(std::slice::from_ref(&ua), &fedavg(), &fed.ring, &|e| {
        matches!(e, HqError::Ledger(LedgerError::Replay { .. }))
    });
    // Same site twice in one round.
    let a1 = fed.site_round(0, &r1.path, &Model::at(1.5), 10);
    let dup_dir = fed.usb.join("dup");
    std::fs::create_dir_all(&dup_dir).unwrap();
    let a1_again = fed.site_update(0, &r1.path, &Model::at(1.7), 11, &dup_dir);
    check(&[a1.clone(), a1_again], &fedavg(), &fed.ring, &|e| {
        matches!(e, HqError::Ledger(LedgerError::DuplicateSite { .. }))
    });
    // Unknown key (site-c is not trusted).
    let uc = fed.site_round(2, &r1.path, &Model::at(1.0), 11);
    check(&[a1.clone(), uc], &fedavg(), &fed.ring, &|e| {
        matches!(
            e,
            HqError::Open {
                source: ferry_bundle::OpenError::UntrustedKey(_),
                ..
            }
        )
    });
    // A global offered as an update.
    check(
        std::slice::from_ref(&r1.path),
        &fedavg(),
        &fed.hq_ring,
        &|e| matches!(e, HqError::NotAnUpdate(_)),
    );
    // Fewer than --min-sites.
    check(
        std::slice::from_ref(&a1),
        &RoundConfig {
            min_sites: 2,
            ..fedavg()
        },
        &fed.ring,
        &|e| matches!(e, HqError::TooFewSites { .. }),
    );
    // A different model layout, validly signed.
    let g1 = ferry_bundle::open_file(&r1.path, &fed.hq_ring).unwrap();
    let other = {
        let d = bytes_f32(&[1.0, 2.0]);
        let p = Payload::from_tensors(&[TensorRef {
            name: "x",
            dtype: Dtype::F32,
            shape: &[2],
            data: &d,
        }])
        .unwrap();
        let s = seal(
            Draft::update_for(&g1.manifest, &g1.hash, "site-b", 5),
            &p,
            &fed.sites[1],
            3,
        )
        .unwrap();
        s.write_to_dir(&fed.usb.join("other")).unwrap()
    };
    check(&[a1.clone(), other], &fedavg(), &fed.ring, &|e| {
        matches!(e, HqError::Ledger(LedgerError::FingerprintMismatch { .. }))
    });
    // A bad strategy setting is refused by the engine before anything is written.
    let cfg = RoundConfig {
        merge: MergeConfig {
            strategy: Strategy::TrimmedMean,
            trim: 1,
            ..Default::default()
        },
        ..fedavg()
    };
    check(std::slice::from_ref(&a1), &cfg, &fed.ring, &|e| {
        matches!(e, HqError::Merge(MergeError::TrimTooLarge { .. }))
    });
    // After all that, a good round still goes through.
    hq::merge_round(
        &fed.state,
        &fed.hq,
        &fed.ring,
        &[],
        &[a1],
        &fedavg(),
        &fed.out,
    )
    .unwrap();
}

#[test]
fn server_momentum_survives_between_runs() {
    let fed = Fed::new();
    let cfg = RoundConfig {
        merge: MergeConfig {
            strategy: Strategy::FedAvgM,
            ..Default::default()
        },
        ..fedavg()
    };
    let x0 = Model::at(0.0);
    let (g0, _) = hq::init(
        &fed.state,
        &fed.hq,
        &x0.payload(),
        "city",
        None,
        &fed.out,
        3,
    )
    .unwrap();
    let u1 = fed.site_round(0, &g0, &Model::at(1.0), 10);
    let r1 = hq::merge_round(&fed.state, &fed.hq, &fed.ring, &[], &[u1], &cfg, &fed.out).unwrap();
    let u2 = fed.site_round(0, &r1.path, &Model::at(1.5), 10);
    // A separate call reloads the server state from disk.
    let r2 = hq::merge_round(&fed.state, &fed.hq, &fed.ring, &[], &[u2], &cfg, &fed.out).unwrap();
    // Reference (lr 1, beta 0.9): d1 = x0 - u1, m1 = d1, x1 = x0 - m1; d2 = x1 - u2, m2 = 0.9 m1 + d2, x2 = x1 - m2.
    let g1 = read_tensors(
        ferry_bundle::open_file(&r1.path, &fed.hq_ring)
            .unwrap()
            .payload(),
    );
    let g2 = read_tensors(
        ferry_bundle::open_file(&r2.path, &fed.hq_ring)
            .unwrap()
            .payload(),
    );
    let (u1c, u2c) = (Model::at(1.0).conv, Model::at(1.5).conv);
    for i in 0..6 {
        let x0i = x0.conv[i] as f64;
        let m1 = x0i - u1c[i] as f64;
        let x1 = (x0i - m1) as f32;
        assert_eq!(f32s(&g1["conv1.weight"].1)[i], x1);
        let m2 = 0.9 * m1 + (x1 as f64 - u2c[i] as f64);
        let x2 = (x1 as f64 - m2) as f32;
        assert!(
            (f32s(&g2["conv1.weight"].1)[i] - x2).abs() < 1e-5,
            "coordinate {i}"
        );
    }
    assert!(
        walk(&fed.state.join("server")).len() >= 2,
        "server state is stored per global"
    );
}

#[test]
fn server_state_of_another_global_or_damaged_refuses_the_merge() {
    let fed = Fed::new();
    let cfg = RoundConfig {
        merge: MergeConfig {
            strategy: Strategy::FedAvgM,
            ..Default::default()
        },
        ..fedavg()
    };
    let g0 = fed.start();
    let u1 = fed.site_round(0, &g0, &Model::at(1.0), 10);
    let r1 = hq::merge_round(&fed.state, &fed.hq, &fed.ring, &[], &[u1], &cfg, &fed.out).unwrap();
    let u2 = fed.site_round(0, &r1.path, &Model::at(1.5), 10);
    let current = fed
        .state
        .join("server")
        .join(format!("{}.safetensors", r1.sealed.hash));
    let good = std::fs::read(&current).unwrap();
    // The state stored under the current global's name, but bound to another global (restored from another
    // backup, say): refused, nothing written.
    let (state, _) = ferry_merge::ServerState::from_bytes(&good, &current).unwrap();
    std::fs::write(&current, state.to_bytes(&"e".repeat(64)).unwrap()).unwrap();
    let err = fed.refused(std::slice::from_ref(&u2), &cfg, &fed.ring, &|e| {
        matches!(e, HqError::Merge(MergeError::StateGlobalMismatch { .. }))
    });
    assert!(err.to_string().contains("reset"), "{err}");
    // Damaged: refused the same way.
    std::fs::write(&current, &good[..good.len() / 2]).unwrap();
    fed.refused(std::slice::from_ref(&u2), &cfg, &fed.ring, &|e| {
        matches!(e, HqError::Merge(MergeError::StateCorrupt { .. }))
    });
    // The real state back: the round goes through.
    std::fs::write(&current, &good).unwrap();
    hq::merge_round(&fed.state, &fed.hq, &fed.ring, &[], &[u2], &cfg, &fed.out).unwrap();
}

/// Revocation that sticks at HQ (issue 15 §2): a list given once is stored and applies to every later merge,
/// each global names the newest list and the list travels next to it; a list of another federation, or signed
/// by a key HQ does not trust, is refused with nothing written.
#[test]
fn revocation_lists_are_stored_applied_and_named_by_every_later_global() {
    use ferry_bundle::revocation::{self, RevocationError, RevocationList, Revoked, RevokedBundle};
    let fed = Fed::new();
    let g0 = fed.start();
    let mut ring = fed.ring.clone();
    ring.add(fed.hq.public()).unwrap();
    let ua = fed.site_round(0, &g0, &Model::at(1.0), 10);
    let ub = fed.site_round(1, &g0, &Model::at(2.0), 10);
    let sign = |federation: &str, revoked: Vec<Revoked>, bundles: Vec<RevokedBundle>| {
        revocation::sign(
            &RevocationList::new(federation, 1, 0, u64::MAX, revoked, bundles),
            &fed.hq,
        )
        .unwrap()
    };
    let site_b = Revoked {
        key_id: fed.sites[1].public().key_id_hex(),
        role: Role::Site,
        id: "site-b".into(),
        reason: "laptop stolen".into(),
    };
    let ua_only = std::slice::from_ref(&ua);
    // Another federation's list, signed by this very HQ key.
    let foreign = sign("other-city", vec![site_b.clone()], vec![]);
    fed.refused_with(
        &[("foreign.ferry-rev".into(), foreign)],
        ua_only,
        &fedavg(),
        &ring,
        &|e| {
            matches!(
                e,
                HqError::Revocation {
                    source: RevocationError::WrongFederation { .. },
                    ..
                }
            )
        },
    );
    // A list signed by a key HQ does not trust.
    let rogue = SecretKey::from_seed(Role::Hq, "hq", [99; 32]);
    let rogue_list = revocation::sign(
        &RevocationList::new("city", 1, 0, u64::MAX, vec![], vec![]),
        &rogue,
    )
    .unwrap();
    fed.refused_with(
        &[("rogue.ferry-rev".into(), rogue_list)],
        ua_only,
        &fedavg(),
        &ring,
        &|e| matches!(e, HqError::Revocation { .. }),
    );
    let revoked = |e: &HqError| {
        matches!(
            e,
            HqError::Open {
                source: ferry_bundle::OpenError::RevokedKey(_),
                ..
            }
        )
    };
    // The list revoking site-b, given once: site-b's update is refused in this merge (nothing stored)...
    let list = sign("city", vec![site_b], vec![]);
    let list_hash = ferry_bundle::sha256_hex(&list);
    let given = [("revocations-1.ferry-rev".to_string(), list.clone())];
    fed.refused_with(&given, &[ua.clone(), ub], &fedavg(), &ring, &revoked);
    // ...and in every later merge without the flag, once a merge stored it.
    let r1 = hq::merge_round(
        &fed.state,
        &fed.hq,
        &ring,
        &given,
        &[ua],
        &fedavg(),
        &fed.out,
    )
    .unwrap();
    let named = r1
        .sealed
        .manifest
        .revocations
        .clone()
        .expect("names the list");
    assert_eq!(
        (named.serial, named.sha256.as_str()),
        (1, list_hash.as_str())
    );
    assert_eq!(
        std::fs::read(r1.revocations.as_ref().unwrap()).unwrap(),
        list
    );
    assert_eq!(hq::stored_revocations(&fed.state).unwrap().len(), 1);
    let b1 = fed.site_round(1, &r1.path, &Model::at(2.0), 10);
    let a1 = fed.site_round(0, &r1.path, &Model::at(1.5), 10);
    fed.refused(&[a1.clone(), b1], &fedavg(), &ring, &revoked);
    // A bundle withdrawn by hash (revoke --bundle, stored by `revoke --state`) is refused too.
    let withdraw = revocation::sign(
        &RevocationList::new(
            "city",
            2,
            0,
            u64::MAX,
            vec![],
            vec![RevokedBundle {
                sha256: ferry_bundle::sha256_hex(&std::fs::read(&a1).unwrap()),
                reason: "poisoned".into(),
            }],
        ),
        &fed.hq,
    )
    .unwrap();
    hq::store_revocation(&fed.state, &fed.hq, &withdraw).unwrap();
    fed.refused(&[a1], &fedavg(), &ring, &|e| {
        matches!(
            e,
            HqError::Open {
                source: ferry_bundle::OpenError::RevokedBundle(_),
                ..
            }
        )
    });
}

#[test]
fn defaults_refuse_a_one_site_merge_and_cap_a_huge_sample_count() {
    let fed = Fed::new();
    let g0 = fed.start();
    let ua = fed.site_round(0, &g0, &Model::at(1.0), 100);
    // A stolen site-b key signs the largest count there is.
    let ub = fed.site_round(1, &g0, &Model::at(2.0), u64::MAX);

    // A courier who brings only one update gets no merge unless HQ asks for one explicitly.
    let e = fed.refused(
        std::slice::from_ref(&ua),
        &RoundConfig::default(),
        &fed.ring,
        &|e| matches!(e, HqError::TooFewSites { got: 1, min: 2 }),
    );
    assert!(e.to_string().contains("--min-sites 1"), "{e}");

    // Site b's count is weighted as 10 x the lower median (100): weights 100/1100 and 1000/1100.
    let r = hq::merge_round(
        &fed.state,
        &fed.hq,
        &fed.ring,
        &[],
        &[ua, ub],
        &RoundConfig::default(),
        &fed.out,
    )
    .unwrap();
    assert_eq!(
        r.capped,
        vec![CappedSamples {
            site: "site-b".into(),
            declared: u64::MAX,
            used: 1000,
            bound: "--max-sample-ratio",
        }]
    );
    let weight = |site: &str| {
        r.report
            .contributions
            .iter()
            .find(|c| c.site == site)
            .and_then(|c| c.weight)
            .unwrap()
    };
    assert!((weight("site-b") - 1000.0 / 1100.0).abs() < 1e-12);
    assert!((weight("site-a") - 100.0 / 1100.0).abs() < 1e-12);
    let g1 = ferry_bundle::open_file(&r.path, &fed.hq_ring).unwrap();
    let conv = f32s(&read_tensors(g1.payload())["conv1.weight"].1);
    let want = ((100.0 * 1.0 + 1000.0 * 2.0) / 1100.0) as f32;
    assert!((conv[0] - want).abs() < 1e-6, "{} vs {want}", conv[0]);
    // The global records the count it used, and the ledger the same.
    let b = g1
        .manifest
        .contributors
        .iter()
        .find(|c| c.site == "site-b")
        .unwrap();
    assert_eq!(b.samples, 1000);
}

/// Issue 15 §5 at HQ: a global encrypted to the sites (and HQ), updates encrypted to HQ. HQ reads its stored
/// encrypted global and the encrypted updates with its own key, and the next global is encrypted again.
#[test]
fn an_encrypted_round_reads_with_hq_s_key_and_encrypts_the_next_global() {
    let fed = Fed::new();
    let sites: Vec<_> = fed.sites[..2].iter().map(|s| s.public()).collect();
    let (g0, sealed0) = fed.start_encrypted();
    let e0 = sealed0
        .manifest
        .encryption
        .as_ref()
        .expect("encrypted global");
    let ids: Vec<&str> = e0.recipients.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        ["site-a", "site-b", "hq"],
        "HQ is added to read its own store"
    );
    // Each site reads the global with its own key and sends an update encrypted to HQ.
    let updates = fed.encrypted_updates(&g0);
    let config = RoundConfig {
        min_sites: 2,
        encrypt_to: hq::EncryptTo::Keys(sites),
        ..RoundConfig::default()
    };
    // `fed.ring` holds no identity: HQ's key is its identity.
    let r1 = hq::merge_round(
        &fed.state,
        &fed.hq,
        &fed.ring,
        &[],
        &updates,
        &config,
        &fed.out,
    )
    .unwrap();
    assert_eq!(r1.sealed.manifest.format, 3);
    let mut site_ring = fed.hq_ring.clone();
    site_ring.add_identity(&fed.sites[1]);
    let g1 = ferry_bundle::open_file(&r1.path, &site_ring).unwrap();
    let conv = f32s(&read_tensors(g1.payload())["conv1.weight"].1);
    assert!(conv
        .iter()
        .zip(Model::at(2.0).conv)
        .all(|(a, b)| (a - b).abs() < 1e-5));
    // Without a key the global verifies only up to its ciphertext.
    assert!(matches!(
        ferry_bundle::open_file(&r1.path, &fed.hq_ring).unwrap_err(),
        ferry_bundle::OpenError::Encrypted(_)
    ));
}

/// Issue 15: HQ changes its key in an encrypted federation. Its stored round 0 and the sites' updates are
/// still encrypted to the old key: with the new key alone the merge is refused by name and nothing changes;
/// once the old key is retired into HQ's state (its decryption identity, not the key) the round merges, and
/// the next global is signed by the new key and encrypted to the sites and the new key, not the old one.
#[test]
fn a_retired_hq_key_still_opens_what_was_encrypted_to_it_and_new_globals_leave_it_out() {
    let fed = Fed::new();
    let (g0, _) = fed.start_encrypted();
    // The sites have not heard of the rotation yet: their updates are encrypted to the old key.
    let updates = fed.encrypted_updates(&g0);
    let new_hq = SecretKey::from_seed(Role::Hq, "hq-2027", [2; 32]);
    let config = RoundConfig {
        min_sites: 2,
        ..RoundConfig::default()
    };
    let before = fed.snapshot();
    let err = hq::merge_round(
        &fed.state,
        &new_hq,
        &fed.ring,
        &[],
        &updates,
        &config,
        &fed.out,
    )
    .unwrap_err();
    assert!(matches!(err, HqError::StoreLocked { .. }), "{err}");
    assert!(err.to_string().contains("ferry-server retire-key"), "{err}");
    assert_eq!(fed.snapshot(), before);

    // Only an HQ key can be retired; retiring one keeps a 0600 identity, and doing it twice changes nothing.
    assert!(matches!(
        hq::retire_key(&fed.state, &fed.sites[0]),
        Err(HqError::NotHqKey(_))
    ));
    let retired = hq::retire_key(&fed.state, &fed.hq).unwrap();
    assert!(!retired.newly_recorded, "init recorded round 0's signer");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&retired.identity)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let after_first = fed.snapshot();
    assert_eq!(hq::retire_key(&fed.state, &fed.hq).unwrap(), retired);
    assert_eq!(fed.snapshot(), after_first);
    let identity = std::fs::read_to_string(&retired.identity).unwrap();
    assert!(identity.contains("AGE-SECRET-KEY-1"), "{identity}");
    assert!(
        !identity.to_lowercase().contains(&"01".repeat(32)),
        "the retired file must not hold the signing key's seed (Fed::new seeds HQ with [1; 32])"
    );

    let r1 = hq::merge_round(
        &fed.state,
        &new_hq,
        &fed.ring,
        &[],
        &updates,
        &config,
        &fed.out,
    )
    .unwrap();
    let e1 = r1
        .sealed
        .manifest
        .encryption
        .as_ref()
        .expect("still encrypted");
    let ids: Vec<&str> = e1.recipients.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["site-a", "site-b", "hq-2027"]);
    let ring_of = |signer: &SecretKey, reader: &SecretKey| {
        let mut ring = Keyring::new();
        ring.add(signer.public()).unwrap();
        ring.add_identity(reader);
        ring
    };
    let g1 = ferry_bundle::open_file(&r1.path, &ring_of(&new_hq, &fed.sites[0])).unwrap();
    let conv = f32s(&read_tensors(g1.payload())["conv1.weight"].1);
    assert!(conv
        .iter()
        .zip(Model::at(2.0).conv)
        .all(|(a, b)| (a - b).abs() < 1e-5));
    // Signed by the new key only, and the old key no longer reads it.
    assert!(ferry_bundle::open_file(&r1.path, &ring_of(&fed.hq, &fed.sites[0])).is_err());
    assert!(matches!(
        ferry_bundle::open_file(&r1.path, &ring_of(&new_hq, &fed.hq)).unwrap_err(),
        ferry_bundle::OpenError::NotARecipient { .. }
    ));
    // The new key re-emits round 1 from the store.
    let out2 = fed.out.with_file_name("again");
    hq::emit(&fed.state, &new_hq, &out2).unwrap();
}

/// A refiner's result without a note.
fn refined(model: Vec<u8>) -> hq::Refined {
    hq::Refined { model, note: None }
}

/// Issue 14: a refiner (what `ferry-server merge --distill` hands the merge) sees the merged model and every
/// update with its site, its output is what HQ signs and records (with its description and note), and a
/// refiner that fails, changes the layout or returns a non-finite value refuses the round with nothing written.
#[test]
fn a_refiner_sees_the_merge_and_the_updates_and_its_output_is_signed() {
    let fed = Fed::new();
    let g0 = fed.start();
    let a = fed.site_round(0, &g0, &Model::at(1.0), 100);
    let b = fed.site_round(1, &g0, &Model::at(3.0), 100);
    let files = vec![a, b];
    let cfg = RoundConfig::default();

    // Failing, layout-changing and non-finite refiners: refused, nothing changes.
    let refuse = |run: hq::RefineFn<'static>| {
        let before = fed.snapshot();
        let mut r = hq::Refiner {
            describe: "test-step".into(),
            run,
        };
        let err = hq::merge_round_with(
            &fed.state,
            &fed.hq,
            &fed.ring,
            &[],
            &files,
            &cfg,
            &fed.out,
            Some(&mut r),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, HqError::Refine { .. }), "{err}");
        assert!(err.to_string().contains("test-step"), "{err}");
        assert_eq!(fed.snapshot(), before, "state changed after: {err}");
        err
    };
    refuse(Box::new(|_| Err("out of HQ data".into())));
    // Another layout: only the conv weights.
    let e = refuse(Box::new(|_| {
        let conv = bytes_f32(&Model::at(2.0).conv);
        Ok(refined(
            Payload::from_tensors(&[TensorRef {
                name: "conv1.weight",
                dtype: Dtype::F32,
                shape: &[2, 3],
                data: &conv,
            }])
            .unwrap()
            .bytes()
            .to_vec(),
        ))
    }));
    assert!(e.to_string().contains("differ"), "{e}");
    // Not a safetensors file at all.
    refuse(Box::new(|_| {
        let mut p = Model::at(2.0).payload().bytes().to_vec();
        p.truncate(p.len() - 4);
        Ok(refined(p))
    }));
    // A NaN in the conv weights: patched into the bytes, since ferry's own payload builder refuses one.
    let mut nan_bytes = Model::at(2.0).payload().bytes().to_vec();
    let data_start = 8 + u64::from_le_bytes(nan_bytes[..8].try_into().unwrap()) as usize;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&nan_bytes).unwrap();
    let at = data_start + meta.info("conv1.weight").unwrap().data_offsets.0;
    nan_bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = refuse(Box::new(move |_| Ok(refined(nan_bytes.clone()))));
    assert!(e.to_string().contains("NaN or infinity"), "{e}");

    // A refiner that checks its inputs and returns the merge plus 1 on the conv weights, with a note.
    let mut seen = Vec::new();
    let mut sites = Vec::new();
    let mut r = hq::Refiner {
        describe: "plus-one".into(),
        run: Box::new(|input| {
            assert_eq!(input.arch, None);
            let m = read_tensors(input.merged);
            seen.push(f32s(&m["conv1.weight"].1));
            for u in input.updates {
                seen.push(f32s(&read_tensors(&u.model)["conv1.weight"].1));
                sites.push(u.site.clone());
            }
            let mut out = Model::at(2.0);
            out.conv = f32s(&m["conv1.weight"].1).iter().map(|x| x + 1.0).collect();
            Ok(hq::Refined {
                model: out.payload().bytes().to_vec(),
                note: Some("plus one everywhere".into()),
            })
        }),
    };
    let out = hq::merge_round_with(
        &fed.state,
        &fed.hq,
        &fed.ring,
        &[],
        &files,
        &cfg,
        &fed.out,
        Some(&mut r),
        None,
    )
    .unwrap();
    drop(r);
    // The merge of x=1 and x=3 (equal samples) is x=2; the updates come in bundle-hash order.
    assert_eq!(seen[0], Model::at(2.0).conv);
    let mut ups = vec![seen[1].clone(), seen[2].clone()];
    ups.sort_by(|x, y| x[0].total_cmp(&y[0]));
    assert_eq!(ups, vec![Model::at(1.0).conv, Model::at(3.0).conv]);
    let g1 = ferry_bundle::open_file(&out.path, &fed.hq_ring).unwrap();
    let conv = f32s(&read_tensors(g1.payload())["conv1.weight"].1);
    let want: Vec<f32> = Model::at(2.0).conv.iter().map(|x| x + 1.0).collect();
    assert_eq!(conv, want);
    sites.sort();
    assert_eq!(sites, vec!["site-a".to_string(), "site-b".to_string()]);
    // The note is recorded after the step's description, in the global and in the ledger alike.
    let strategy = g1.manifest.strategy.clone().unwrap();
    assert!(
        strategy.ends_with("then plus-one (plus one everywhere)"),
        "{strategy}"
    );
    let status = hq::status(&fed.state).unwrap();
    assert_eq!(status.round, 1);
    assert_eq!(status.rounds.last().unwrap().strategy, strategy);
}

/// Issue 15 §5: HQ remembers whom the federation's globals are encrypted to. With no `--encrypt-to`, the next
/// merge and a republish (HQ's rollback) are encrypted to the keys the current global names; a republished
/// global of an encrypted federation is format 3, opens for each site, and is refused without a key. A new list
/// replaces the old one, and `Clear` goes back to the clear.
#[test]
fn an_encrypted_federation_stays_encrypted_through_merge_and_republish() {
    let fed = Fed::new();
    let sites: Vec<_> = fed.sites[..2].iter().map(|s| s.public()).collect();
    let draft = Draft {
        encrypt_to: sites.clone(),
        ..Draft::initial("city", Some("test".into()))
    };
    let (g0, _) = hq::init_with(
        &fed.state,
        &fed.hq,
        &Model::at(0.0).payload(),
        draft,
        &fed.out,
        3,
    )
    .unwrap();
    let ring_of = |i: usize| {
        let mut ring = fed.hq_ring.clone();
        ring.add_identity(&fed.sites[i]);
        ring
    };
    let recipients = |path: &Path| -> Vec<String> {
        let b = ferry_bundle::identify_file(path, &fed.hq_ring).unwrap();
        match &b.manifest.encryption {
            Some(e) => e.recipients.iter().map(|r| r.id.clone()).collect(),
            None => Vec::new(),
        }
    };
    let update = |i: usize, global: &Path, x: f32| {
        let g = ferry_bundle::open_file(global, &ring_of(i)).unwrap();
        let draft = Draft {
            encrypt_to: vec![fed.hq.public()],
            ..Draft::update_for(&g.manifest, &g.hash, fed.sites[i].id(), 100)
        };
        let s = ferry_bundle::seal(draft, &Model::at(x).payload(), &fed.sites[i], 3).unwrap();
        s.write_to_dir(&fed.usb).unwrap()
    };
    let merge = |updates: &[PathBuf], encrypt_to: hq::EncryptTo| {
        let config = RoundConfig {
            min_sites: 2,
            encrypt_to,
            ..RoundConfig::default()
        };
        hq::merge_round(
            &fed.state,
            &fed.hq,
            &fed.ring,
            &[],
            updates,
            &config,
            &fed.out,
        )
        .unwrap()
    };

    // Round 1, no recipients given: the same as round 0's.
    let r1 = merge(
        &[update(0, &g0, 1.0), update(1, &g0, 3.0)],
        hq::EncryptTo::Same,
    );
    assert_eq!(r1.sealed.manifest.format, 3);
    assert_eq!(recipients(&r1.path), ["site-a", "site-b", "hq"]);

    // Round 2: republish round 0's weights, no recipients given.
    let (g2, sealed2) = hq::republish(
        &fed.state,
        &fed.hq,
        0,
        3,
        86_400,
        &Default::default(),
        &fed.out,
    )
    .unwrap();
    assert_eq!(sealed2.manifest.format, 3);
    let raw = std::fs::read(&g2).unwrap();
    assert_eq!(u16::from_le_bytes([raw[16], raw[17]]), 3, "header version");
    assert_eq!(recipients(&g2), ["site-a", "site-b", "hq"]);
    for i in 0..2 {
        let g = ferry_bundle::open_file(&g2, &ring_of(i)).unwrap();
        assert_eq!(
            read_tensors(g.payload()),
            read_tensors(Model::at(0.0).payload().bytes())
        );
    }
    // A site without its key, and a site not on the list, read nothing.
    let e = ferry_bundle::open_file(&g2, &fed.hq_ring).unwrap_err();
    assert!(matches!(e, ferry_bundle::OpenError::Encrypted(_)), "{e}");
    assert!(e.to_string().contains("site-a"), "{e}");
    let e = ferry_bundle::open_file(&g2, &ring_of(2)).unwrap_err();
    assert!(
        matches!(e, ferry_bundle::OpenError::NotARecipient { .. }),
        "{e}"
    );
    // The stick holds no weight bytes in the clear.
    let conv = bytes_f32(&Model::at(0.0).conv);
    assert!(!raw.windows(conv.len()).any(|w| w == conv.as_slice()));

    // Round 3: a new list replaces the old one (site-b left); round 4 keeps it.
    let r3 = merge(
        &[update(0, &g2, 1.0), update(1, &g2, 1.0)],
        hq::EncryptTo::Keys(vec![fed.sites[0].public()]),
    );
    assert_eq!(recipients(&r3.path), ["site-a", "hq"]);
    let (g4, _) = hq::republish(
        &fed.state,
        &fed.hq,
        1,
        3,
        86_400,
        &Default::default(),
        &fed.out,
    )
    .unwrap();
    assert_eq!(recipients(&g4), ["site-a", "hq"]);
    assert!(matches!(
        ferry_bundle::open_file(&g4, &ring_of(1)).unwrap_err(),
        ferry_bundle::OpenError::NotARecipient { .. }
    ));

    // Back to the clear only when asked; the federation then stays clear.
    let (g5, sealed5) = hq::republish(
        &fed.state,
        &fed.hq,
        1,
        3,
        86_400,
        &hq::EncryptTo::Clear,
        &fed.out,
    )
    .unwrap();
    assert_eq!(sealed5.manifest.format, 2);
    assert!(recipients(&g5).is_empty());
    let (g6, _) = hq::republish(
        &fed.state,
        &fed.hq,
        1,
        3,
        86_400,
        &Default::default(),
        &fed.out,
    )
    .unwrap();
    assert!(recipients(&g6).is_empty());
    ferry_bundle::open_file(&g6, &fed.hq_ring).unwrap();
}
