//! `ferry-server merge` given an 8 GiB sparse file, a symbolic link to `/dev/zero` or a FIFO as an update
//! (issue 15 §6): refused at once, in little memory, with a one-line error; the ledger unchanged, no spool left
//! behind, nothing written.
#![cfg(unix)]

use std::ffi::OsString;

use ferry_bundle::{Dtype, Payload, Role, SecretKey, TensorRef};

#[path = "../../client/tests/special/mod.rs"]
mod special;

#[test]
fn merge_refuses_special_and_huge_files_at_once_and_leaves_the_state() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let keys = dir.join("keys");
    SecretKey::generate(Role::Hq, "hq")
        .expect("key")
        .write_pair(&keys)
        .expect("hq");
    let weights = dir.join("w.safetensors");
    let one = 1f32.to_le_bytes();
    let p = Payload::from_tensors(&[TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[1],
        data: &one,
    }])
    .expect("payload");
    std::fs::write(&weights, p.bytes()).expect("weights");
    let bin = env!("CARGO_BIN_EXE_ferry-server");
    let state = dir.join("hq");
    let os = |s: &str| OsString::from(s);
    let init: Vec<OsString> = vec![
        os("init"),
        os("--key"),
        keys.join("hq.key").into(),
        os("--weights"),
        weights.into(),
        os("--federation"),
        os("f"),
        os("--state"),
        state.clone().into(),
        os("--out"),
        dir.join("g").into(),
    ];
    let args: Vec<&std::ffi::OsStr> = init.iter().map(|a| a.as_os_str()).collect();
    assert_eq!(special::run(bin, &args).code, Some(0), "init");
    let ledger = std::fs::read(state.join("ledger.json")).expect("ledger");
    for (file, expect) in special::hostile(dir) {
        let merge: Vec<OsString> = vec![
            os("merge"),
            os("--key"),
            keys.join("hq.key").into(),
            os("--trust"),
            keys.clone().into(),
            os("--state"),
            state.clone().into(),
            os("--out"),
            dir.join("out").into(),
            // One file per merge here: the hostile file must be what refuses it, not the site count.
            os("--min-sites"),
            os("1"),
            file.clone().into(),
        ];
        let args: Vec<&std::ffi::OsStr> = merge.iter().map(|a| a.as_os_str()).collect();
        let r = special::run(bin, &args);
        special::check(&format!("merge {}", file.display()), &r, expect);
        assert_eq!(
            std::fs::read(state.join("ledger.json")).expect("ledger"),
            ledger
        );
        let spools: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".spool-"))
            .collect();
        assert!(spools.is_empty(), "spool left: {spools:?}");
        assert!(!dir.join("out").exists(), "merge wrote its output");
    }
}
