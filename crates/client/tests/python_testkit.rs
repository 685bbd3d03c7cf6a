//! The independent Python reader over the whole bundle test kit (issue 15): `scripts/ferry_verify.py`, written
//! from `docs/bundle-format.md` alone, must give every `.ferry` vector of `crates/bundle/tests/testkit/` the
//! verdict `expectations.tsv` gives the Rust reader in its `open` row: verified, with the signed payload, or
//! refused (exit 1) with its own one-line message; never a usage error (exit 2), a traceback or a raw control
//! character. `interop.rs` runs the same script on bundles ferry writes; this runs it on the hostile ones.
//!
//! Every disagreement is collected and the test fails once, listing them all.
//!
//! Needs a Python with cryptography, zstandard and pyrage (`scripts/test.sh` makes `.venv/`); without it the test
//! fails with `ferry_testdata::SETUP`, it never skips (issue 17).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_bundle::{sha256_hex, PublicKey, Role, SecretKey};

fn kit_dir() -> PathBuf {
    ferry_testdata::repo_root().join("crates/bundle/tests/testkit")
}

fn kit_pub(stem: &str) -> PathBuf {
    kit_dir().join("keys").join(format!("{stem}.pub"))
}

/// The age identity file of kit key `stem`, written as `ferry-client age-identity` writes it.
fn identity_file(stem: &str, dir: &Path) -> PathBuf {
    let &(_, role, id, seed) = ferry_testdata::KIT_KEYS
        .iter()
        .find(|k| k.0 == stem)
        .unwrap_or_else(|| panic!("id={stem}: not a kit key with a known seed"));
    let role: Role = role.parse().unwrap();
    let sk = SecretKey::from_seed(role, id, [seed; 32]);
    let public = PublicKey::read(&kit_pub(stem)).unwrap_or_else(|e| panic!("key {stem}: {e}"));
    assert_eq!(
        sk.public().key_hex(),
        public.key_hex(),
        "the seed of kit key {stem} differs from the generator's"
    );
    let path = dir.join(format!("{stem}.age"));
    if !path.exists() {
        write_private(&path, sk.age_identity_file_text().as_bytes());
    }
    path
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// What the script must say about a vector.
#[derive(Debug)]
enum Want {
    /// Exit 0, the payload it writes hashing to this.
    Verified { payload_sha256: String },
    /// Exit 0, reporting this bundle hash: the row's keyring withdraws the bundle, which the script leaves to its
    /// caller (it reads no revocation lists, spec §5 step 5); what it owes the caller is the hash to compare.
    VerifiedWithdrawn { bundle_sha256: String },
    /// Exit 1 with the script's own refusal line.
    Refused,
}

/// The command line for one `open` row: `trust` is the table's keyring column.
fn arguments(trust: &str, expect: &str, scratch: &Path) -> (Vec<OsString>, Want) {
    let mut args: Vec<OsString> = Vec::new();
    let mut withdrawn = None;
    let items: Vec<&str> = trust.split('+').filter(|s| *s != "-").collect();
    // A revoked key is left out of --trust: the script reads no revocation lists (spec §5 step 5), and an
    // untrusted key is refused as a revoked one is.
    let revoked: Vec<&str> = items.iter().filter_map(|s| s.strip_prefix('!')).collect();
    for &item in &items {
        if let Some(stem) = item.strip_prefix("id=") {
            args.push("--identity".into());
            args.push(identity_file(stem, scratch).into());
        } else if let Some(hash) = item.strip_prefix("bundle=") {
            withdrawn = Some(hash.to_string());
        } else if !item.starts_with('!') && !revoked.contains(&item) {
            args.push("--trust".into());
            args.push(kit_pub(item).into());
        }
    }
    if !args.iter().any(|a| a == "--trust") {
        // The script needs a --trust (none is a usage error, exit 2). A root key stands for the empty keyring:
        // spec §8.6 lets it sign only lists of HQ keys, so no bundle verifies with it.
        args.push("--trust".into());
        args.push(kit_pub("root").into());
    }
    let want = match (expect.strip_prefix("ok:"), withdrawn) {
        (Some(hash), _) => Want::Verified {
            payload_sha256: hash.to_string(),
        },
        (None, Some(hash)) => Want::VerifiedWithdrawn {
            bundle_sha256: hash,
        },
        (None, None) => Want::Refused,
    };
    (args, want)
}

/// The last non-empty line of the script's output, for the report.
fn last_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    let out = String::from_utf8_lossy(&o.stdout);
    let line = err
        .lines()
        .chain(out.lines())
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("(no output)");
    // Shown escaped: a defect here may well be a raw escape sequence.
    line.escape_debug().to_string()
}

/// Why the script's answer `o` is not `want`, if it is not.
fn disagreement(o: &Output, want: &Want, bundle: &[u8], out: &Path) -> Option<String> {
    let (Ok(stdout), Ok(stderr)) = (
        std::str::from_utf8(&o.stdout),
        std::str::from_utf8(&o.stderr),
    ) else {
        return Some("output is not UTF-8".into());
    };
    if stdout
        .chars()
        .chain(stderr.chars())
        .any(|c| c.is_control() && c != '\n')
    {
        return Some("raw control character in the output".into());
    }
    if !stderr.is_empty() {
        // A traceback exits 1 too; only a usage error (exit 2) may write to stderr.
        return Some("wrote to stderr".into());
    }
    match want {
        Want::Refused => {
            if o.status.code() != Some(1) || !stdout.starts_with("FAIL  ") {
                return Some("not refused with exit 1 and a FAIL line".into());
            }
        }
        Want::Verified { .. } | Want::VerifiedWithdrawn { .. } => {
            if o.status.code() != Some(0) {
                return Some("not verified".into());
            }
            let reported = stdout.lines().find_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.len() == 3 && w[0] == "bundle" && w[1] == "sha256").then(|| w[2].to_string())
            });
            if reported.as_deref() != Some(&sha256_hex(bundle)) {
                return Some(format!("reports bundle hash {reported:?}, not the file's"));
            }
            match want {
                Want::Verified { payload_sha256 } => match std::fs::read(out) {
                    Ok(p) if sha256_hex(&p) == *payload_sha256 => {}
                    Ok(p) => return Some(format!("--out payload hashes to {}", sha256_hex(&p))),
                    Err(e) => return Some(format!("--out {}: {e}", out.display())),
                },
                Want::VerifiedWithdrawn { bundle_sha256 }
                    if reported.as_deref() != Some(bundle_sha256) =>
                {
                    return Some(format!("the withdrawn hash is {bundle_sha256}"));
                }
                _ => {}
            }
        }
    }
    None
}

#[test]
fn python_testkit_agrees_with_expectations() {
    let py = ferry_testdata::python_with("cryptography, zstandard, pyrage");
    let script = ferry_testdata::repo_root().join("scripts/ferry_verify.py");
    let scratch = tempfile::tempdir().unwrap();
    let table =
        std::fs::read_to_string(kit_dir().join("expectations.tsv")).expect("expectations.tsv");
    // file → (trust, expect) of its `open` row.
    let rows: std::collections::BTreeMap<&str, (&str, &str)> = table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 6, "expectations.tsv: not 6 columns: {l:?}");
            (f[1] == "open").then_some((f[0], (f[2], f[3])))
        })
        .collect();

    // The vectors come from the directory, so a new one is checked without touching this file.
    let mut files: Vec<String> = std::fs::read_dir(kit_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ferry"))
        .collect();
    files.sort();
    assert!(files.len() >= 100, "only {} .ferry vectors", files.len());

    let mut wrong = Vec::new();
    for (n, file) in files.iter().enumerate() {
        let Some(&(trust, expect)) = rows.get(file.as_str()) else {
            wrong.push(format!("{file}: no `open` row in expectations.tsv"));
            continue;
        };
        let bundle = std::fs::read(kit_dir().join(file)).unwrap();
        let (mut args, want) = arguments(trust, expect, scratch.path());
        let out = scratch.path().join(format!("{n}.safetensors"));
        if !matches!(want, Want::Refused) {
            args.push("--out".into());
            args.push(out.clone().into());
        }
        // Run from the kit, so that messages name the vector as the table does.
        let o = Command::new(&py)
            .current_dir(kit_dir())
            .arg(&script)
            .args(&args)
            .arg(file)
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", py.to_string_lossy()));
        if let Some(why) = disagreement(&o, &want, &bundle, &out) {
            wrong.push(format!(
                "{file}: expected {expect}, python exit {:?}: {why}; last line: {}",
                o.status.code(),
                last_line(&o)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "scripts/ferry_verify.py disagrees with expectations.tsv on {} of {} vectors:\n{}",
        wrong.len(),
        files.len(),
        wrong.join("\n")
    );
}
