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
