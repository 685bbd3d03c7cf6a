//! Site import and export on real bundles: freshness rules, refusals that leave the state (or the absence of one)
//! untouched, one export per global, locking.

use std::collections::BTreeMap;
use std::path::Path;

use ferry_bundle::{
    open, seal, Bundle, Contributor, Draft, Dtype, Keyring, Limits, Payload, Role, SecretKey,
    TensorRef,
};
use ferry_site::{ImportOutcome, ImportPolicy, LocalRun, SiteError, SiteState};

fn jump(max_round_jump: u64) -> ImportPolicy {
    ImportPolicy { max_round_jump }
}

fn hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
}

fn payload(v: f32) -> Payload {
    let d: Vec<u8> = (0..8).flat_map(|i| (v + i as f32).to_le_bytes()).collect();
    Payload::from_tensors(&[TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[8],
        data: &d,
    }])
    .unwrap()
}

/// A global of `round`, chained after `prev` (hash), in `federation`.
fn global(round: u64, prev: Option<&str>, federation: &str, v: f32) -> Bundle {
    let mut d = Draft::initial(federation, Some("plate-cnn".into()));
    d.round = round;
    d.base = prev.map(str::to_string);
    if round > 0 {
        d.strategy = Some("fedavg".into());
        d.contributors = vec![Contributor {
            bundle: "a".repeat(64),
            site: "site-a".into(),
            samples: 10,
        }];
    }
    let s = seal(d, &payload(v), &hq(), 3).unwrap();
    let mut ring = Keyring::new();
    ring.add(hq().public()).unwrap();
    open(&s.bytes, &ring, &Limits::default()).unwrap()
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in walk(dir) {
        if e.file_name().is_some_and(|n| n != "lock") {
            out.insert(
                e.strip_prefix(dir).unwrap().display().to_string(),
                std::fs::read(&e).unwrap(),
            );
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn imports_in_order_and_refuses_rollback_jumps_and_foreign_globals() {
    let dir = tempfile::tempdir().unwrap();
    let state = SiteState::at(&dir.path().join("site"));
    let g0 = global(0, None, "city", 0.0);
    let g1 = global(1, Some(&g0.hash), "city", 1.0);
    let g1_other = global(1, Some(&g0.hash), "city", 5.0);
    let g2 = global(2, Some(&g1.hash), "city", 2.0);

    assert!(matches!(
        state.import_new(&g0, "g0", &jump(10)).unwrap(),
        ImportOutcome::Installed { previous: None }
    ));
    let lock = state.lock().unwrap();
    assert_eq!(
        std::fs::read(state.current_model_path()).unwrap(),
        g0.payload()
    );
    assert!(matches!(
        state.import(&lock, &g1, "g1", &jump(10)).unwrap(),
        ImportOutcome::Installed { previous: Some(_) }
    ));
    assert_eq!(state.current().unwrap().unwrap().round, 1);
    assert_eq!(state.previous().unwrap().unwrap().hash, g0.hash);
    assert_eq!(state.global_weights().unwrap(), g1.payload());
    // Re-importing the current global is a no-op success.
    assert_eq!(
        state.import(&lock, &g1, "g1 again", &jump(10)).unwrap(),
        ImportOutcome::AlreadyCurrent
    );

    let before = snapshot(state.dir());
    type IsExpected = fn(&SiteError) -> bool;
    let refusals: Vec<(Bundle, IsExpected)> = vec![
        (g0.clone(), |e| matches!(e, SiteError::Rollback { .. })),
        (g1_other.clone(), |e| {
            matches!(e, SiteError::Rollback { .. })
        }),
        (global(50, Some(&g1.hash), "city", 3.0), |e| {
            matches!(e, SiteError::RoundJump { .. })
        }),
        (global(2, Some(&g1.hash), "other-city", 3.0), |e| {
            matches!(e, SiteError::WrongFederation { .. })
        }),
    ];
    for (b, is_expected) in refusals {
        let err = state.import(&lock, &b, "x", &jump(10)).unwrap_err();
        assert!(is_expected(&err), "unexpected {err:?}");
        assert_eq!(snapshot(state.dir()), before, "state changed after {err}");
    }
    // A model with another layout.
    let other_layout = {
        let d: Vec<u8> = vec![0; 8];
        let p = Payload::from_tensors(&[TensorRef {
            name: "v",
            dtype: Dtype::F32,
            shape: &[2],
            data: &d,
        }])
        .unwrap();
        let mut dr = Draft::initial("city", None);
        dr.round = 2;
        dr.base = Some(g1.hash.clone());
        let s = seal(dr, &p, &hq(), 3).unwrap();
        let mut ring = Keyring::new();
        ring.add(hq().public()).unwrap();
        open(&s.bytes, &ring, &Limits::default()).unwrap()
    };
    assert!(matches!(
        state.import(&lock, &other_layout, "x", &jump(10)),
        Err(SiteError::ModelChanged { .. })
    ));
    assert_eq!(snapshot(state.dir()), before);
    // An update is not a global.
    let a = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
    let u = seal(
        Draft::update_for(&g1.manifest, &g1.hash, "site-a", 3),
        &payload(9.0),
        &a,
        3,
    )
    .unwrap();
    let mut ring = Keyring::new();
    ring.add(a.public()).unwrap();
    let ub = open(&u.bytes, &ring, &Limits::default()).unwrap();
    assert!(matches!(
        state.import(&lock, &ub, "x", &jump(10)),
        Err(SiteError::NotAGlobal)
    ));
    assert_eq!(snapshot(state.dir()), before);

    assert!(matches!(
        state.import(&lock, &g2, "g2", &jump(1)).unwrap(),
        ImportOutcome::Installed { .. }
    ));
    assert_eq!(state.previous().unwrap().unwrap().hash, g1.hash);
}

#[test]
fn a_refused_first_import_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("new-site");
    let state = SiteState::at(&fresh);
    let a = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
    let g0 = global(0, None, "city", 0.0);
    let u = seal(
        Draft::update_for(&g0.manifest, &g0.hash, "site-a", 3),
        &payload(9.0),
        &a,
        3,
    )
    .unwrap();
    let mut ring = Keyring::new();
    ring.add(a.public()).unwrap();
    let update = open(&u.bytes, &ring, &Limits::default()).unwrap();
    assert!(matches!(
        state.import_new(&update, "x", &jump(10)),
        Err(SiteError::NotAGlobal)
    ));
    assert!(!fresh.exists(), "a refused import created the state folder");
    // Commands that need a state say so instead of creating one.
    assert!(matches!(
        SiteState::open(&fresh),
        Err(SiteError::NoState(_))
    ));
    assert!(matches!(state.lock(), Err(SiteError::NoState(_))));
    assert!(!fresh.exists());
}

#[test]
fn a_lock_of_another_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (
        SiteState::at(&dir.path().join("one")),
        SiteState::at(&dir.path().join("two")),
    );
    let g0 = global(0, None, "city", 0.0);
    one.import_new(&g0, "g0", &jump(10)).unwrap();
    two.import_new(&g0, "g0", &jump(10)).unwrap();
    let lock_one = one.lock().unwrap();
    let before = snapshot(two.dir());
    let err = two
        .record_local(
            &lock_one,
            payload(0.5).bytes(),
            LocalRun {
                samples: 1,
                epochs: 1,
                steps: 1,
            },
        )
        .unwrap_err();
    assert!(matches!(err, SiteError::WrongLock(_)), "{err}");
    assert_eq!(snapshot(two.dir()), before);
}

#[test]
fn local_model_exports_once_per_global_and_goes_stale_on_import() {
    let dir = tempfile::tempdir().unwrap();
    let usb = tempfile::tempdir().unwrap();
    let state = SiteState::at(dir.path());
    let a = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
    let g0 = global(0, None, "city", 0.0);
    state.import_new(&g0, "g0", &jump(10)).unwrap();
    assert!(!state.pending_export().unwrap());
    let lock = state.lock().unwrap();
    let run = LocalRun {
        samples: 1234,
        epochs: 1,
        steps: 20,
    };
    let rec = state
        .record_local(&lock, payload(0.5).bytes(), run)
        .unwrap();
    assert_eq!((rec.base_hash.as_str(), rec.round), (g0.hash.as_str(), 0));
    assert_eq!(state.local().unwrap(), Some(rec));
    assert!(state.pending_export().unwrap());
    let (path, sealed) = state.export(&lock, &a, usb.path(), 3).unwrap();
    assert_eq!(path.file_name().unwrap(), "site-a-r0.ferry");
    assert_eq!(sealed.manifest.site.as_ref().unwrap().samples, 1234);
    assert_eq!(sealed.manifest.base.as_deref(), Some(g0.hash.as_str()));
    assert!(!state.pending_export().unwrap());
    // Exporting again would overwrite the stick's file: refused, nothing changed.
    assert!(state.export(&lock, &a, usb.path(), 3).is_err());

    let g1 = global(1, Some(&g0.hash), "city", 1.0);
    state.import(&lock, &g1, "g1", &jump(10)).unwrap();
    let err = state.export(&lock, &a, usb.path(), 3).unwrap_err();
    assert!(err.to_string().contains("train"), "{err}");
}

#[test]
fn damaged_state_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let state = SiteState::at(dir.path());
    state
        .import_new(&global(0, None, "city", 0.0), "g0", &jump(10))
        .unwrap();
    std::fs::write(dir.path().join("global.json"), b"{not json").unwrap();
    assert!(matches!(state.current(), Err(SiteError::Corrupt { .. })));
    std::fs::write(dir.path().join("global.json"), br#"{"round":0,"hash":"x","federation":"c","arch":null,"model_fingerprint":"y","payload_sha256":"../../etc/passwd","samples":0,"imported_at":0,"source":""}"#).unwrap();
    assert!(matches!(
        state.global_weights(),
        Err(SiteError::Corrupt { .. })
    ));
    // Two processes cannot hold the state at once.
    let _held = state.lock().unwrap();
    assert!(state.lock().is_err());
}
