//! Issue 15 through the `ferry-client` binary: what reaches the operator's terminal (§7), passphrase-protected
//! keys (§4), the pinned first import (§3), and the shape of every refusal: one line on stderr, exit status 1,
//! nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ferry_bundle::{seal, Draft, Dtype, Payload, Role, SecretKey, TensorRef};

fn hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
}

fn payload(v: f32) -> Payload {
    let d: Vec<u8> = (0..4).flat_map(|i| (v + i as f32).to_le_bytes()).collect();
    Payload::from_tensors(&[TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[4],
        data: &d,
    }])
    .unwrap()
}

/// `keys/hq.pub` and a round-0 global of federation `city` at `path`.
fn setup(dir: &Path, global_name: &str) -> (PathBuf, PathBuf) {
    let keys = dir.join("keys");
    hq().write_pair(&keys).unwrap();
    let s = seal(Draft::initial("city", None), &payload(0.0), &hq(), 3).unwrap();
    let g = dir.join(global_name);
    std::fs::write(&g, &s.bytes).unwrap();
    (keys.join("hq.pub"), g)
}

fn client(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-client"));
    cmd.args(args)
        .stdin(Stdio::null())
        .env_remove("FERRY_PASSPHRASE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// `ferry-client import [--federation F] --trust HQ --state STATE FILE`.
fn import(federation: Option<&str>, hq_pub: &Path, state: &Path, file: &Path) -> Output {
    let mut args = vec![os("import")];
    if let Some(f) = federation {
        args.extend([os("--federation"), os(f)]);
    }
    args.extend([
        os("--trust"),
        hq_pub.as_os_str(),
        os("--state"),
        state.as_os_str(),
        file.as_os_str(),
    ]);
    client(&args, &[])
}

/// Stdout and stderr hold no control character but the newline.
fn printable(o: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "raw control character reached the terminal: {text:?}"
    );
    text
}

/// A refusal: exit status 1 and exactly one line on stderr, `ferry-client: ...`.
fn refusal(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("ferry-client: "), "{err:?}");
    printable(o);
    err
}

#[test]
fn file_names_with_escape_sequences_are_printed_and_stored_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let evil = "global-\u{1b}[31m\u{1b}]0;pwned\u{7}-r0.ferry";
    let (hq_pub, g) = setup(dir.path(), evil);
    let broken = dir.path().join("broken-\u{1b}[2J.ferry");
    std::fs::write(&broken, b"not a bundle").unwrap();

    let o = client(&[os("inspect"), g.as_os_str()], &[]);
    assert!(o.status.success(), "{o:?}");
    assert!(printable(&o).contains("\\u{1b}[31m"));
    let o = client(&[os("inspect"), broken.as_os_str()], &[]);
    assert!(refusal(&o).contains("not a ferry bundle"));
    for json in [false, true] {
        let mut args = vec![os("verify"), os("--trust"), hq_pub.as_os_str()];
        if json {
            args.push(os("--json"));
        }
        args.extend([g.as_os_str(), broken.as_os_str()]);
        let o = client(&args, &[]);
        assert_eq!(o.status.code(), Some(1));
        printable(&o);
    }
    // A refused import prints the name escaped; an accepted one stores it escaped, and status replays it so.
    let state = dir.path().join("site");
    let o = import(Some("city"), &hq_pub, &state, &broken);
    refusal(&o);
    assert!(!state.exists(), "a refused import created the state");
    let o = import(Some("city"), &hq_pub, &state, &g);
    assert!(o.status.success(), "{o:?}");
    printable(&o);
    let record = std::fs::read_to_string(state.join("global.json")).unwrap();
    assert!(
        !record.contains('\u{1b}') && record.contains("\\\\u{1b}"),
        "{record}"
    );
    let o = client(&[os("status"), os("--state"), state.as_os_str()], &[]);
    assert!(o.status.success());
    assert!(printable(&o).contains("\\u{1b}[31m"));
}

#[test]
fn the_first_import_needs_a_federation_and_a_refusal_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (hq_pub, g) = setup(dir.path(), "global-r0.ferry");
    let state = dir.path().join("site");
    let err = refusal(&import(None, &hq_pub, &state, &g));
    assert!(err.contains("--federation"), "{err}");
    let err = refusal(&import(Some("elsewhere"), &hq_pub, &state, &g));
    assert!(err.contains("belongs to federation"), "{err}");
    assert!(!state.exists());
    let help = client(&[os("import"), os("--help")], &[]);
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--federation",
        "--root",
        "--hq-keys",
        "--refuse-expired",
        "--revocations",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(help.contains("Example"), "{help}");
}

#[test]
fn a_protected_key_is_used_only_with_its_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let (hq_pub, g) = setup(dir.path(), "global-r0.ferry");
    let keys = dir.path().join("keys");
    let o = client(
        &[
            os("keygen"),
            os("--id"),
            os("site-a"),
            os("--out"),
            keys.as_os_str(),
            os("--protect"),
        ],
        &[("FERRY_PASSPHRASE", "a long passphrase")],
    );
    assert!(o.status.success(), "{o:?}");
    let out = printable(&o);
    let fp = SecretKey::read_with(&keys.join("site-a.key"), || {
        Ok(ferry_bundle::keys::passphrase("a long passphrase".into()))
    })
    .unwrap()
    .public()
    .fingerprint();
    assert!(
        out.contains(&fp),
        "keygen did not print the full fingerprint: {out}"
    );
    let o = client(
        &[os("fingerprint"), keys.join("site-a.pub").as_os_str()],
        &[],
    );
    assert!(printable(&o).contains(&fp));

    let weights = dir.path().join("w.safetensors");
    std::fs::write(&weights, payload(1.0).bytes()).unwrap();
    let usb = dir.path().join("usb");
    let key = keys.join("site-a.key");
    let pack = |pass: &str| {
        client(
            &[
                os("pack"),
                os("--key"),
                key.as_os_str(),
                os("--weights"),
                weights.as_os_str(),
                os("--samples"),
                os("10"),
                os("--base"),
                g.as_os_str(),
                os("--trust"),
                hq_pub.as_os_str(),
                os("--out"),
                usb.as_os_str(),
            ],
            &[("FERRY_PASSPHRASE", pass)],
        )
    };
    let err = refusal(&pack("not it"));
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(!usb.exists(), "a refused pack wrote to the stick");
    let o = pack("a long passphrase");
    assert!(o.status.success(), "{o:?}");
    assert!(usb.join("site-a-r0.ferry").exists());
}
