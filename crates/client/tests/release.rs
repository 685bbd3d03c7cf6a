//! What a release and the `.deb` rely on (issue 17): `completions` and `man` generate from the clap definitions,
//! and `verify-file` checks a detached signature over a release's `SHA256SUMS`, refusing a changed file or a key
//! the operator did not name with one line and exit status 1.

use std::path::Path;
use std::process::{Command, Output};

use ferry_bundle::{filesig, Role, SecretKey};

fn client(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry-client"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn completions_and_man_pages_come_from_the_clap_definitions() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let s = stdout(&client(&["completions", shell], dir.path()));
        assert!(
            s.contains("ferry-client") && s.contains("import"),
            "{shell}"
        );
    }
    let page = stdout(&client(&["man"], dir.path()));
    assert!(
        page.starts_with(".ie") || page.contains(".TH ferry-client 1"),
        "{page}"
    );
    stdout(&client(&["man", "--out", "man"], dir.path()));
    let import = std::fs::read_to_string(dir.path().join("man/ferry-client-import.1")).unwrap();
    assert!(import.contains("ferry\\-client import"), "{import}");
    for cmd in [
        "keygen",
        "pack",
        "export",
        "verify-file",
        "completions",
        "man",
    ] {
        assert!(
            dir.path()
                .join(format!("man/ferry-client-{cmd}.1"))
                .is_file(),
            "{cmd}"
        );
    }
}

#[test]
fn verify_file_checks_a_release_signature() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let release = SecretKey::generate(Role::Hq, "ferry-release").unwrap();
    release.write_pair(&d.join("keys")).unwrap();
    let other = SecretKey::generate(Role::Hq, "other").unwrap();
    other.write_pair(&d.join("other")).unwrap();
    std::fs::write(d.join("SHA256SUMS"), "00  ferry-client\n").unwrap();
    filesig::sign_file(&d.join("SHA256SUMS"), &d.join("SHA256SUMS.sig"), &release).unwrap();

    let ok = stdout(&client(
        &[
            "verify-file",
            "--trust",
            "keys/ferry-release.pub",
            "SHA256SUMS",
        ],
        d,
    ));
    assert!(ok.starts_with("OK") && ok.contains("ferry-release"), "{ok}");

    let refused = |args: &[&str], needle: &str| {
        let o = client(args, d);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("ferry-client: ") && err.contains(needle),
            "{err}"
        );
    };
    refused(
        &["verify-file", "--trust", "other/other.pub", "SHA256SUMS"],
        "not among your trusted keys",
    );
    std::fs::write(d.join("SHA256SUMS"), "01  ferry-client\n").unwrap();
    refused(
        &[
            "verify-file",
            "--trust",
            "keys/ferry-release.pub",
            "SHA256SUMS",
        ],
        "does not verify",
    );
    refused(
        &[
            "verify-file",
            "--trust",
            "keys",
            "--sig",
            "missing.sig",
            "SHA256SUMS",
        ],
        "missing.sig",
    );
}
