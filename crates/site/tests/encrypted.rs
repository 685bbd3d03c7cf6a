//! Issue 15 §5 at a site, on real files: a global encrypted to the site imports with the site's key, an update
//! exported encrypted to HQ opens only with HQ's key, and every file that holds weights is written 0600.

use ferry_bundle::{
    open_file, seal, Draft, Dtype, Keyring, OpenError, Payload, Role, SecretKey, TensorRef,
};
use ferry_site::{ExportError, ImportPolicy, ImportTrust, LocalRun, SiteState};

fn hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
}
fn site_a() -> SecretKey {
    SecretKey::from_seed(Role::Site, "site-a", [2; 32])
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

fn trust() -> ImportTrust {
    let mut keys = Keyring::new();
    keys.add(hq().public()).unwrap();
    ImportTrust {
        keys,
        federation: Some("city".into()),
        ..ImportTrust::default()
    }
}

#[cfg(unix)]
fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn an_encrypted_round_trip_through_a_site_keeps_weights_private() {
    let state_dir = tempfile::tempdir().unwrap();
    let usb = tempfile::tempdir().unwrap();
    let state = SiteState::at(state_dir.path());
    let policy = ImportPolicy::default();

    // HQ's global, encrypted to site-a (and HQ), on the stick.
    let draft = Draft {
        encrypt_to: vec![site_a().public(), hq().public()],
        ..Draft::initial("city", None)
    };
    let g0 = seal(draft, &payload(0.0), &hq(), 3).unwrap();
    let g0_path = g0.write_to_dir(usb.path()).unwrap();

    // Without the site's key the import is refused before anything is created.
    let prepared = state.prepare_import(&trust(), &policy).unwrap();
    let err = open_file(&g0_path, prepared.keyring()).unwrap_err();
    assert!(matches!(err, OpenError::Encrypted(_)), "{err}");
    assert!(!state_dir.path().join("global.json").exists());

    // With it (`import --identity keys/site-a.key`), the global installs.
    let mut ring = prepared.keyring().clone();
    ring.add_identity(&site_a());
    let bundle = open_file(&g0_path, &ring).unwrap();
    state
        .import_new(&bundle, "global-r0.ferry", &policy, &prepared)
        .unwrap();
    assert_eq!(state.global_weights().unwrap(), payload(0.0).bytes());

    let lock = state.lock().unwrap();
    let run = LocalRun {
        samples: 100,
        epochs: 1,
        steps: 4,
    };
    let local = state
        .record_local(&lock, payload(0.5).bytes(), run)
        .unwrap();
    state.write_optimizer(&lock, payload(9.0).bytes()).unwrap();
    state.write_checkpoint(&lock, payload(8.0).bytes()).unwrap();
    state
        .write_deployed(&lock, payload(7.0).bytes(), 10)
        .unwrap();

    // An update may be encrypted to HQ only.
    let err = state
        .export_to(&lock, &site_a(), usb.path(), 3, false, &[site_a().public()])
        .unwrap_err();
    assert!(matches!(err, ExportError::NotHqRecipient(_)), "{err}");
    assert!(!usb.path().join("site-a-r0.ferry").exists());

    let (path, sealed) = state
        .export_to(&lock, &site_a(), usb.path(), 3, false, &[hq().public()])
        .unwrap();
    assert_eq!(sealed.manifest.format, 3);
    // HQ reads it with its own key; the site itself cannot (it encrypted to HQ only).
    let mut hq_ring = Keyring::new();
    hq_ring.add(site_a().public()).unwrap();
    let mut site_ring = hq_ring.clone();
    hq_ring.add_identity(&hq());
    assert_eq!(
        open_file(&path, &hq_ring).unwrap().payload(),
        payload(0.5).bytes()
    );
    site_ring.add_identity(&site_a());
    assert!(matches!(
        open_file(&path, &site_ring).unwrap_err(),
        OpenError::NotARecipient { .. }
    ));

    #[cfg(unix)]
    {
        let dir = state_dir.path();
        for p in [
            dir.join("current.safetensors"),
            state.weights_path(&ferry_bundle::sha256_hex(payload(0.0).bytes())),
            state.weights_path(&local.weights_sha256),
            state.optimizer_path(),
            state.checkpoint_path(),
            dir.join("deployed.safetensors"),
            path.clone(),
        ] {
            assert_eq!(mode(&p), 0o600, "{} holds weights", p.display());
        }
    }
}
