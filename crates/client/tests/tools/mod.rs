//! Both tools for the client tests that run a whole federation: this package's `ferry-client`, and
//! `ferry-server` taken from beside it (built by `cargo test --workspace`, scripts/test.sh, or
//! `cargo test -p ferry-client -p ferry-server`).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Output;

pub fn client_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry-client"))
}

pub fn client<S: AsRef<OsStr>>(args: &[S]) -> Output {
    ferry_testdata::cli::run(&client_bin(), args)
}

pub fn server<S: AsRef<OsStr>>(args: &[S]) -> Output {
    ferry_testdata::cli::run(
        &ferry_testdata::cli::sibling(&client_bin(), "ferry-server"),
        args,
    )
}
