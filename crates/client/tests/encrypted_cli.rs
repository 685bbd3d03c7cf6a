//! Issue 15 §5 through the `ferry-client` binary: a global encrypted to the site. Without the site's key every
//! reading command refuses in one line naming the recipients and writes nothing; `verify` still checks the
//! signature and the ciphertext; with `--identity` the global imports and unpacks; `age-identity` writes the key
//! for the standard `age` tool, mode 0600.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use ferry_bundle::{seal, Draft, Dtype, Payload, Role, SecretKey, TensorRef};

fn hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
}
fn site_a() -> SecretKey {
    SecretKey::from_seed(Role::Site, "site-a", [2; 32])
}

fn payload() -> Payload {
    let d: Vec<u8> = (0..4)
        .flat_map(|i| (i as f32 + 0.5).to_le_bytes())
        .collect();
    Payload::from_tensors(&[TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[4],
        data: &d,
    }])
    .unwrap()
}

fn client(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry-client"))
        .args(args)
        .stdin(Stdio::null())
        .env_remove("FERRY_PASSPHRASE")
        .output()
        .unwrap()
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// A refusal: exit status 1 and exactly one line on stderr.
fn refusal(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("ferry-client: "), "{err:?}");
    err
}

#[test]
fn an_encrypted_global_needs_the_site_key_and_nothing_is_written_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    hq().write_pair(&keys).unwrap();
    site_a().write_pair(&keys).unwrap();
    let (hq_pub, site_key) = (keys.join("hq.pub"), keys.join("site-a.key"));
    let draft = Draft {
        encrypt_to: vec![site_a().public(), hq().public()],
        ..Draft::initial("city", None)
    };
    let g = seal(draft, &payload(), &hq(), 3)
        .unwrap()
        .write_to_dir(dir.path())
        .unwrap();
    let recipient = site_a().public().recipient_text();

    // verify: no key needed for the signature and the ciphertext; it says the payload is encrypted.
    let o = client(&[
        os("verify"),
        os("--trust"),
        hq_pub.as_os_str(),
        g.as_os_str(),
    ]);
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("OK "), "{out}");
    assert!(
        out.contains(&format!("payload encrypted to site-a {recipient}")),
        "{out}"
    );

    // import and unpack without the key: one line naming the recipients, no state, no output.
    let state = dir.path().join("site");
    let import = |extra: &[&std::ffi::OsStr]| {
        let mut args = vec![
            os("import"),
            os("--federation"),
            os("city"),
            os("--trust"),
            hq_pub.as_os_str(),
            os("--state"),
            state.as_os_str(),
        ];
        args.extend_from_slice(extra);
        args.push(g.as_os_str());
        client(&args)
    };
    let err = refusal(&import(&[]));
    assert!(
        err.contains(&format!("payload is encrypted to site-a {recipient}, hq "))
            && err.contains("pass --identity"),
        "{err}"
    );
    assert!(!state.exists(), "a refused import created the state");
    let out = dir.path().join("model.safetensors");
    let unpack = |extra: &[&std::ffi::OsStr]| {
        let mut args = vec![os("unpack"), os("--trust"), hq_pub.as_os_str()];
        args.extend_from_slice(extra);
        args.extend([g.as_os_str(), os("--out"), out.as_os_str()]);
        client(&args)
    };
    assert!(refusal(&unpack(&[])).contains("payload is encrypted to"));
    assert!(!out.exists());
    // The wrong key (HQ's .key is not at the site, but a key of another site would be): named as such.
    let other = SecretKey::from_seed(Role::Site, "site-b", [3; 32]);
    other.write_pair(&keys).unwrap();
    let err = refusal(&unpack(&[
        os("--identity"),
        keys.join("site-b.key").as_os_str(),
    ]));
    assert!(err.contains("not to your identity (site-b "), "{err}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".ferry-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // With the site's key: import and unpack work, and the weights are the global's.
    let o = import(&[os("--identity"), site_key.as_os_str()]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read(state.join("current.safetensors")).unwrap(),
        payload().bytes()
    );
    let o = unpack(&[os("--identity"), site_key.as_os_str()]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read(&out).unwrap(), payload().bytes());

    // The age identity for the standard tool: private, and the key's recipient.
    let id_file = dir.path().join("site-a.age");
    let o = client(&[
        os("age-identity"),
        os("--key"),
        site_key.as_os_str(),
        os("--out"),
        id_file.as_os_str(),
    ]);
    assert!(o.status.success(), "{o:?}");
    let text = std::fs::read_to_string(&id_file).unwrap();
    assert!(text.contains(&format!("# public key: {recipient}\nAGE-SECRET-KEY-1")));
    check_private(&id_file);
    check_private(&state.join("current.safetensors"));
}

#[cfg(unix)]
fn check_private(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", p.display());
}

#[cfg(not(unix))]
fn check_private(_: &Path) {}

/// The header's format version (2: clear, 3: encrypted payload).
fn version(p: &Path) -> u16 {
    let b = std::fs::read(p).unwrap();
    u16::from_le_bytes([b[16], b[17]])
}

/// HQ's view: HQ's key opens what is encrypted to it.
fn hq_ring() -> ferry_bundle::Keyring {
    let mut r = ferry_bundle::Keyring::new();
    r.add(site_a().public()).unwrap();
    r.add_identity(&hq());
    r
}

/// Issue 15 §5: a site encrypts its update to the HQ key it pinned, without naming it again (`export
/// --encrypt`, or ferry.toml's `encrypt = true`, which `round` follows too); `--no-encrypt` overrides the file;
/// `pack --encrypt-to` encrypts a PyTorch-made update, to HQ keys only.
#[test]
fn a_site_encrypts_its_update_to_the_pinned_hq_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    hq().write_pair(&keys).unwrap();
    site_a().write_pair(&keys).unwrap();
    let (hq_pub, site_key) = (keys.join("hq.pub"), keys.join("site-a.key"));
    let g = seal(Draft::initial("city", None), &payload(), &hq(), 3)
        .unwrap()
        .write_to_dir(dir.path())
        .unwrap();
    let state = dir.path().join("site");
    // The first import pins HQ's key.
    let o = client(&[
        os("import"),
        os("--federation"),
        os("city"),
        os("--trust"),
        hq_pub.as_os_str(),
        os("--state"),
        state.as_os_str(),
        g.as_os_str(),
    ]);
    assert!(o.status.success(), "{o:?}");
    // "Training": a local model recorded as the training command does.
    let trained: Vec<u8> = (0..4)
        .flat_map(|i| (i as f32 - 7.25).to_le_bytes())
        .collect();
    let trained = Payload::from_tensors(&[TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[4],
        data: &trained,
    }])
    .unwrap();
    {
        let s = ferry_site::SiteState::open(&state).unwrap();
        let lock = s.lock().unwrap();
        let run = ferry_site::LocalRun {
            samples: 10,
            epochs: 1,
            steps: 1,
        };
        s.record_local(&lock, trained.bytes(), run).unwrap();
    }
    let usb = dir.path().join("usb");
    let export = |extra: &[&str]| {
        let mut args = vec![
            os("export"),
            os("--state"),
            state.as_os_str(),
            os("--key"),
            site_key.as_os_str(),
            os("--out"),
            usb.as_os_str(),
        ];
        args.extend(extra.iter().map(|s| os(s)));
        client(&args)
    };
    let update = usb.join("site-a-r0.ferry");

    // --encrypt: to the pinned HQ key, which opens it; without a key nothing is read.
    let o = export(&["--encrypt"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(version(&update), 3);
    let b = ferry_bundle::open_file(&update, &hq_ring()).unwrap();
    let enc = b.manifest.encryption.as_ref().unwrap();
    let ids: Vec<&str> = enc.recipients.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["hq"]);
    assert_eq!(enc.recipients[0].recipient, hq().public().recipient_text());
    assert_eq!(b.payload(), trained.bytes());
    let mut no_key = ferry_bundle::Keyring::new();
    no_key.add(site_a().public()).unwrap();
    assert!(matches!(
        ferry_bundle::open_file(&update, &no_key).unwrap_err(),
        ferry_bundle::OpenError::Encrypted(_)
    ));
    // --encrypt with --encrypt-to is a usage error; nothing written.
    let before = std::fs::read(&update).unwrap();
    let o = export(&[
        "--again",
        "--encrypt",
        "--encrypt-to",
        hq_pub.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert_eq!(std::fs::read(&update).unwrap(), before);

    // ferry.toml's `encrypt = true` is the standing choice; --no-encrypt overrides it.
    std::fs::remove_file(&update).unwrap();
    std::fs::write(state.join("ferry.toml"), "encrypt = true\n").unwrap();
    let o = client(&[os("config"), os("--state"), state.as_os_str()]);
    assert!(o.status.success(), "{o:?}");
    let shown = String::from_utf8_lossy(&o.stdout).to_string();
    let line = shown
        .lines()
        .find(|l| l.trim_start().starts_with("encrypt "));
    assert!(
        line.is_some_and(|l| l.contains("true") && l.contains("(ferry.toml)")),
        "{shown}"
    );
    let o = export(&["--again"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(version(&update), 3);
    std::fs::remove_file(&update).unwrap();
    let o = export(&["--again", "--no-encrypt"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(version(&update), 2);
    assert!(ferry_bundle::open_file(&update, &no_key).is_ok());

    // pack --encrypt-to: HQ keys only (nothing written otherwise), then format 3 for HQ.
    let weights = dir.path().join("trained.safetensors");
    std::fs::write(&weights, trained.bytes()).unwrap();
    let packed = dir.path().join("packed");
    let pack = |to: &Path| {
        client(&[
            os("pack"),
            os("--key"),
            site_key.as_os_str(),
            os("--weights"),
            weights.as_os_str(),
            os("--samples"),
            os("10"),
            os("--base"),
            g.as_os_str(),
            os("--trust"),
            hq_pub.as_os_str(),
            os("--out"),
            packed.as_os_str(),
            os("--encrypt-to"),
            to.as_os_str(),
        ])
    };
    let err = refusal(&pack(&keys.join("site-a.pub")));
    assert!(
        err.contains("encrypted to HQ only") && err.contains("site-a"),
        "{err}"
    );
    assert!(!packed.exists());
    let o = pack(&hq_pub);
    assert!(o.status.success(), "{o:?}");
    let p = packed.join("site-a-r0.ferry");
    assert_eq!(version(&p), 3);
    assert_eq!(
        ferry_bundle::open_file(&p, &hq_ring()).unwrap().payload(),
        trained.bytes()
    );
    assert!(matches!(
        ferry_bundle::open_file(&p, &no_key).unwrap_err(),
        ferry_bundle::OpenError::Encrypted(_)
    ));
}
