//! Where ferry's tests find the real data and outside tools they check against (issue 17): Fashion-MNIST, the
//! Nanum and DejaVu fonts, the `zstd` CLI and a Python with numpy, safetensors, cryptography, zstandard and
//! PyTorch.
//!
//! `scripts/test.sh` provides all of them without root: the Debian packages are fetched with `apt-get download`
//! and unpacked into [`data_dir`] (default `target/test-data/`, so a packaged file sits at the same relative path
//! as on a Debian system), and the Python packages are installed into a virtualenv at `.venv/`. The lookups here
//! try, in order:
//! - a file: `$FERRY_TEST_DATA/<path>` (default `target/test-data/<path>`), then `/<path>` (installed system-wide);
//! - a program: the same two places under `usr/bin/`, then `PATH`;
//! - Python: `$FERRY_PYTHON`, then `.venv/bin/python3`, then `python3` on `PATH`.
//!
//! A test whose data or tool is missing **fails** with one line naming the setup command: a test that passes
//! without testing would hide exactly what it exists to catch.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod cli;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// What every "not found" message tells the reader to do.
pub const SETUP: &str =
    "run scripts/test.sh, which fetches the test data and tools without root (see README, Testing)";

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where `scripts/test.sh` unpacks the Debian packages the tests read: `$FERRY_TEST_DATA`, or `target/test-data`.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("FERRY_TEST_DATA") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join("target/test-data"),
    }
}

/// `rel` (a path as a Debian package installs it, without the leading `/`) in [`data_dir`] or under `/`.
/// Panics with the setup command when it is in neither.
#[track_caller]
pub fn file(what: &str, rel: &str) -> PathBuf {
    let places = [data_dir().join(rel), Path::new("/").join(rel)];
    if let Some(p) = places.iter().find(|p| p.exists()) {
        return p.clone();
    }
    panic!(
        "{what} not found (looked for {} and {}): {SETUP}",
        places[0].display(),
        places[1].display()
    );
}

/// The Fashion-MNIST IDX directory (Debian's `dataset-fashion-mnist`).
#[track_caller]
pub fn fashion_mnist() -> PathBuf {
    let labels = file(
        "Fashion-MNIST",
        "usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz",
    );
    labels.parent().expect("a file has a parent").to_path_buf()
}

/// A font file from a Debian font package, e.g. `("fonts-nanum", "usr/share/fonts/truetype/nanum/NanumGothicBold.ttf")`.
#[track_caller]
pub fn font(package: &str, rel: &str) -> PathBuf {
    file(&format!("{rel} ({package})"), rel)
}

/// A program: `usr/bin/<name>` in [`data_dir`], then `/usr/bin/<name>`, then `PATH`.
#[track_caller]
pub fn program(name: &str) -> PathBuf {
    let rel = format!("usr/bin/{name}");
    let mut places = vec![data_dir().join(&rel), Path::new("/").join(&rel)];
    places.extend(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).map(|d| d.join(name)),
    );
    if let Some(p) = places.iter().find(|p| p.is_file()) {
        return p.clone();
    }
    panic!(
        "the {name} program was not found (in {} or PATH): {SETUP}",
        data_dir().join("usr/bin").display()
    );
}

/// The fixed keys of the bundle testkit (`crates/bundle/tests/testkit`): (file stem, role, id, seed byte). The
/// generator (`crates/bundle/examples/make_testkit.rs`) makes them and the tests that open the kit rebuild their
/// secret halves from this one table. Never use these keys anywhere but tests.
pub const KIT_KEYS: &[(&str, &str, &str, u8)] = &[
    ("hq", "hq", "hq", 1),
    ("site-a", "site", "site-a", 2),
    ("site-b", "site", "site-b", 3),
    ("site-c", "site", "site-c", 4),
    ("rogue-hq", "hq", "hq", 9),
    ("root", "root", "root", 5),
    ("hq-2027", "hq", "hq-2027", 10),
    ("rogue-root", "root", "root", 6),
];

/// [`python`], after checking it imports `modules` (`"numpy, zstandard"`); panics with the setup command otherwise,
/// so a missing module fails the test instead of skipping it.
pub fn python_with(modules: &str) -> OsString {
    let py = python();
    let probe = std::process::Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .output();
    let why = match probe {
        Ok(o) if o.status.success() => return py,
        Ok(o) => format!(
            "{} lacks a module ({})",
            py.to_string_lossy(),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .trim()
        ),
        Err(e) => format!("{} cannot be run ({e})", py.to_string_lossy()),
    };
    panic!("{why}: {SETUP}");
}

/// The Python interpreter the interop tests run: `$FERRY_PYTHON`, `.venv/bin/python3`, or `python3`.
pub fn python() -> OsString {
    if let Some(p) = std::env::var_os("FERRY_PYTHON").filter(|p| !p.is_empty()) {
        return p;
    }
    let venv = repo_root().join(".venv/bin/python3");
    if venv.is_file() {
        return venv.into_os_string();
    }
    "python3".into()
}
