//! Site import: freshness rules on real bundles, and refusals that leave the state untouched.

use std::collections::BTreeMap;
use std::path::Path;

use ferry_bundle::site::{ImportOutcome, LocalRecord, SiteError, SiteState};
use ferry_bundle::{
    open, seal, Bundle, Contributor, Draft, Dtype, Keyring, Limits, Payload, Role, SecretKey,
    TensorRef,
};

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
    let state = SiteState::open(dir.path()).unwrap();
    let g0 = global(0, None, "city", 0.0);
    let g1 = global(1, Some(&g0.hash), "city", 1.0);
    let g1_other = global(1, Some(&g0.hash), "city", 5.0);
    let g2 = global(2, Some(&g1.hash), "city", 2.0);

    assert!(matches!(
        state.import(&g0, "g0", 10).unwrap(),
        ImportOutcome::Installed { previous: None }
    ));
    assert_eq!(
        std::fs::read(state.current_model_path()).unwrap(),
        g0.payload()
    );
    assert!(matches!(
        state.import(&g1, "g1", 10).unwrap(),
        ImportOutcome::Installed { previous: Some(_) }
    ));
    assert_eq!(state.current().unwrap().unwrap().round, 1);
    assert_eq!(state.previous().unwrap().unwrap().hash, g0.hash);
    assert_eq!(state.global_weights().unwrap(), g1.payload());
    // Re-importing the current global is a no-op success.
    assert_eq!(
        state.import(&g1, "g1 again", 10).unwrap(),
        ImportOutcome::AlreadyCurrent
    );

    let before = snapshot(dir.path());
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
        let err = state.import(&b, "x", 10).unwrap_err();
        assert!(is_expected(&err), "unexpected {err:?}");
        assert_eq!(snapshot(dir.path()), before, "state changed after {err}");
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
        state.import(&other_layout, "x", 10),
        Err(SiteError::ModelChanged { .. })
    ));
    assert_eq!(snapshot(dir.path()), before);
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
        state.import(&ub, "x", 10),
        Err(SiteError::NotAGlobal)
    ));
    assert_eq!(snapshot(dir.path()), before);

    assert!(matches!(
        state.import(&g2, "g2", 1).unwrap(),
        ImportOutcome::Installed { .. }
    ));
    assert_eq!(state.previous().unwrap().unwrap().hash, g1.hash);
}

#[test]
fn local_model_exports_once_per_global_and_goes_stale_on_import() {
    let dir = tempfile::tempdir().unwrap();
    let usb = tempfile::tempdir().unwrap();
    let state = SiteState::open(dir.path()).unwrap();
    let a = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
    let g0 = global(0, None, "city", 0.0);
    state.import(&g0, "g0", 10).unwrap();
    assert!(!state.pending_export().unwrap());
    let rec = LocalRecord {
        base_hash: g0.hash.clone(),
        round: 0,
        samples: 1234,
        epochs: 1,
        steps: 20,
        trained_at: 0,
        weights_sha256: String::new(),
        exported: None,
    };
    state.write_local(payload(0.5).bytes(), &rec).unwrap();
    assert!(state.pending_export().unwrap());
    let (path, sealed) = state.export(&a, usb.path(), 3).unwrap();
    assert_eq!(path.file_name().unwrap(), "site-a-r0.ferry");
    assert_eq!(sealed.manifest.site.as_ref().unwrap().samples, 1234);
    assert_eq!(sealed.manifest.base.as_deref(), Some(g0.hash.as_str()));
    assert!(!state.pending_export().unwrap());
    // Exporting again would overwrite the stick's file: refused, nothing changed.
    assert!(state.export(&a, usb.path(), 3).is_err());

    let g1 = global(1, Some(&g0.hash), "city", 1.0);
    state.import(&g1, "g1", 10).unwrap();
    let err = state.export(&a, usb.path(), 3).unwrap_err();
    assert!(err.to_string().contains("train"), "{err}");
}

#[test]
fn damaged_state_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let state = SiteState::open(dir.path()).unwrap();
    state
        .import(&global(0, None, "city", 0.0), "g0", 10)
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
