//! Running ferry's two binaries in tests (issue 16): the helpers every CLI test file had a copy of.
//!
//! - [`run`]: a binary with arguments, no stdin, no `FERRY_PASSPHRASE` from the caller's environment;
//! - [`printable`]: stdout and stderr together, asserting no raw control character reached the terminal (file
//!   names and other untrusted text must arrive escaped);
//! - [`ok`] / [`json`]: a success, its stdout (parsed);
//! - [`refused`] / [`refused_alone`]: a refusal, exit status 1 with one `TOOL: ...` line on stderr (the last;
//!   with `_alone`, the only line);
//! - [`snapshot`]: every file under a folder with its bytes, for "nothing was written" checks;
//! - [`setting_row`]: one setting's row of `config --json`;
//! - [`sibling`]: the other tool, built beside this package's binary.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The row of setting `name` (`name`, `value`, `origin`) in the JSON `ferry-client config --json` or
/// `ferry-server config --json` printed; panics, showing the JSON, when there is none.
pub fn setting_row(config: &serde_json::Value, name: &str) -> serde_json::Value {
    config["settings"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no {name} row: {config}"))
}

/// Run `bin` with `args`: stdin closed, `FERRY_PASSPHRASE` removed.
pub fn run<S: AsRef<OsStr>>(bin: &Path, args: &[S]) -> Output {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .env_remove("FERRY_PASSPHRASE")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

/// Stdout and stderr, asserting they hold no control character but the newline.
#[track_caller]
pub fn printable(o: &Output) -> String {
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

/// A success (printable); its stdout.
#[track_caller]
pub fn ok(o: impl Borrow<Output>) -> String {
    let o = o.borrow();
    let text = printable(o);
    assert!(o.status.success(), "{text}");
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

/// A success whose stdout is one JSON value.
#[track_caller]
pub fn json(o: impl Borrow<Output>) -> serde_json::Value {
    let out = ok(o);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// A refusal by `tool`: exit status 1, exactly one `tool: ...` line on stderr, and it is the last (progress and
/// notes may come before it). Returns that line.
#[track_caller]
pub fn refused(tool: &str, o: impl Borrow<Output>) -> String {
    let o = o.borrow();
    let text = printable(o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let prefix = format!("{tool}: ");
    assert_eq!(
        err.lines().filter(|l| l.starts_with(&prefix)).count(),
        1,
        "not one error line: {err:?}"
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with(&prefix), "{err:?}");
    last.to_string()
}

/// A refusal by `tool` with nothing else on stderr: exit status 1, stderr exactly one line `tool: ...`.
#[track_caller]
pub fn refused_alone(tool: &str, o: impl Borrow<Output>) -> String {
    let o = o.borrow();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    refused(tool, o)
}

/// A path as an argument (the tests' temporary paths are UTF-8).
pub fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 test path")
}

/// Every file under `dir` (recursively, but for `lock` files) with its bytes; empty if `dir` is missing.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.file_name().is_some_and(|n| n != "lock") {
                let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                out.insert(p, bytes);
            }
        }
    }
    let mut m = BTreeMap::new();
    walk(dir, &mut m);
    m
}

/// The program `name` built beside `bin` (ferry-server beside ferry-client): FAILS, naming the build command,
/// when it was not built.
#[track_caller]
pub fn sibling(bin: &Path, name: &str) -> PathBuf {
    let p = bin.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.is_file(),
        "{} is not built: run `cargo test -p ferry-client -p ferry-server`, or scripts/test.sh, which build both tools",
        p.display()
    );
    p
}
