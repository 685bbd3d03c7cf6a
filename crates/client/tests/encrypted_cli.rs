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
