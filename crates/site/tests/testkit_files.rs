//! The testkit's file-level attacks on a real site state directory (issue 6): a symlinked output, a read-only
//! medium, a stick changed after verifying, and a signed global holding NaN. The vectors are ferry-bundle's
//! (`crates/bundle/tests/testkit/`), read through the same verifying reader as `ferry-client`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_bundle::keys::PublicKey;
use ferry_bundle::{open, open_file, sha256_hex, Keyring, Limits, Role, SecretKey};
use ferry_site::{ExportError, ImportPolicy, LocalRun, SiteError, SiteState};

fn kit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bundle/tests/testkit")
}

/// `+`-joined key stems from the kit's `keys/`.
fn keyring(trust: &str) -> Keyring {
    let mut ring = Keyring::new();
    for stem in trust.split('+') {
        let pk = PublicKey::read(&kit_dir().join("keys").join(format!("{stem}.pub")))
            .unwrap_or_else(|e| panic!("key {stem}: {e}"));
        ring.add(pk).expect("add key");
    }
    ring
}

fn test_key(stem: &str, role: Role, seed: u8) -> SecretKey {
    SecretKey::from_seed(role, stem, [seed; 32])
}

fn policy() -> ImportPolicy {
    ImportPolicy::default()
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            let name = p.strip_prefix(root).expect("prefix").display().to_string();
            out.insert(name, std::fs::read(&p).expect("read"));
        }
    }
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut m);
    }
    m.remove("lock");
    m
}

/// A site state holding the kit's round-0 global and a trained local model, ready to export.
fn site_ready_to_export(dir: &Path) -> SiteState {
    let ring = keyring("hq+site-a");
    let g = open_file(&kit_dir().join("valid-global-r0.ferry"), &ring).expect("valid global");
    let state = SiteState::at(dir);
    state.import_new(&g, "kit", &policy()).expect("import");
    let lock = state.lock().expect("lock");
    let run = LocalRun {
        samples: 10,
        epochs: 1,
        steps: 1,
    };
    state.record_local(&lock, g.payload(), run).expect("local");
    state
}

#[test]
fn input_changed_after_verifying_is_never_reread() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("global.ferry");
    let r0 = std::fs::read(kit_dir().join("valid-global-r0.ferry")).expect("r0");
    let r1 = std::fs::read(kit_dir().join("valid-global-r1.ferry")).expect("r1");
    std::fs::write(&path, &r0).expect("write");
    let ring = keyring("hq");
    let b = open_file(&path, &ring).expect("verifies");
    // The stick is swapped under us: another valid bundle, then garbage, at the same path.
    std::fs::write(&path, &r1).expect("swap");
    assert_eq!(
        b.hash,
        sha256_hex(&r0),
        "the bundle is named by the bytes that verified"
    );
    assert_eq!(
        b.payload(),
        open(&r0, &ring, &Limits::default()).expect("r0").payload()
    );
    std::fs::write(&path, b"garbage").expect("swap");
    let state = SiteState::at(&tmp.path().join("state"));
    state
        .import_new(&b, "stick", &policy())
        .expect("import what was verified");
    assert_eq!(
        state.current().expect("rec").expect("some").hash,
        sha256_hex(&r0)
    );
    assert_eq!(
        std::fs::read(state.current_model_path()).expect("model"),
        b.payload()
    );
}

#[test]
fn a_signed_non_finite_global_verifies_but_is_never_installed() {
    let ring = keyring("hq");
    for v in ["st-signed-nan.ferry", "st-signed-inf.ferry"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = SiteState::at(&tmp.path().join("state"));
        let before = snapshot(state.dir());
        let b = open_file(&kit_dir().join(v), &ring).expect("open checks origin, not values");
        let err = state
            .import_new(&b, v, &policy())
            .expect_err("installed NaN weights");
        assert!(matches!(err, SiteError::NonFinite(_)), "{v}: {err:?}");
        assert_eq!(snapshot(state.dir()), before, "{v}: state changed");
    }
}

#[cfg(unix)]
#[test]
fn export_refuses_a_symlinked_output_and_leaves_state_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = site_ready_to_export(&tmp.path().join("state"));
    let before = snapshot(state.dir());
    let out = tmp.path().join("stick");
    std::fs::create_dir(&out).expect("stick");
    let victim = tmp.path().join("victim");
    std::os::unix::fs::symlink(&victim, out.join("site-a-r0.ferry")).expect("symlink");
    let key = test_key("site-a", Role::Site, 2);
    let lock = state.lock().expect("lock");
    let err = state
        .export(&lock, &key, &out, 3)
        .expect_err("wrote through a symlink");
    assert!(err.to_string().contains("site-a-r0.ferry"), "{err}");
    assert!(!victim.exists(), "followed the symlink");
    assert_eq!(snapshot(state.dir()), before, "state changed");
    assert_eq!(
        std::fs::read_dir(&out).expect("ls").count(),
        1,
        "temp files left on the stick"
    );
    // The next run, on a clean stick, succeeds.
    let clean = tmp.path().join("clean");
    let (path, sealed) = state.export(&lock, &key, &clean, 3).expect("export");
    assert_eq!(std::fs::read(path).expect("read"), sealed.bytes);
}

#[cfg(unix)]
#[test]
fn export_to_a_read_only_medium_fails_cleanly() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = site_ready_to_export(&tmp.path().join("state"));
    let before = snapshot(state.dir());
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).expect("dir");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    // Root ignores mode bits: fall back to a directory no one can create files in.
    let probe = ro.join("probe");
    let out = if std::fs::write(&probe, b"").is_ok() {
        std::fs::remove_file(&probe).expect("rm");
        PathBuf::from("/proc/self")
    } else {
        ro.clone()
    };
    let key = test_key("site-a", Role::Site, 2);
    let lock = state.lock().expect("lock");
    let err = state
        .export(&lock, &key, &out, 3)
        .expect_err("wrote to a read-only medium");
    assert!(
        matches!(err, ExportError::Seal(ferry_bundle::SealError::Fs(_))),
        "{err:?}"
    );
    assert_eq!(snapshot(state.dir()), before, "state changed");
    assert!(
        state.pending_export().expect("pending"),
        "marked exported although nothing was written"
    );
    if out == ro {
        assert_eq!(std::fs::read_dir(&ro).expect("ls").count(), 0);
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).expect("chmod back");
}
