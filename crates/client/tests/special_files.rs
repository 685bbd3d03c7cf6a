//! Files that are not bundles in the way a stick can hold them (issue 15 §6): an 8 GiB sparse file with a bundle's
//! name, a symbolic link to `/dev/zero` (a character device reports length 0), and a FIFO (opening one blocks
//! until a writer comes). Every command that reads a bundle (inspect, verify, unpack, import, pack --base) must
//! refuse each at once, in little memory, with a one-line error and nothing written. Each command runs as a child
//! process under a deadline, so a regression shows as a failure, never as a hung test run.
#![cfg(unix)]

use ferry_bundle::{Role, SecretKey};

mod special;

#[test]
fn every_reading_command_refuses_special_and_huge_files_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let keys = dir.join("keys");
    let hq = SecretKey::generate(Role::Hq, "hq").expect("key");
    hq.write_pair(&keys).expect("hq key");
    SecretKey::generate(Role::Site, "site-a")
        .expect("key")
        .write_pair(&keys)
        .expect("site key");
    let weights = dir.join("w.safetensors");
    std::fs::write(
        &weights,
        ferry_bundle::Payload::from_tensors(&[ferry_bundle::TensorRef {
            name: "w",
            dtype: ferry_bundle::Dtype::F32,
            shape: &[1],
            data: &1f32.to_le_bytes(),
        }])
        .expect("payload")
        .bytes(),
    )
    .expect("weights");
    let hq_pub = keys.join("hq.pub");
    let os = |s: &str| std::ffi::OsString::from(s);
    for (file, expect) in special::hostile(dir) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let out = dir.join(format!("{name}.safetensors"));
        let state = dir.join(format!("state-{name}"));
        let stick = dir.join(format!("stick-{name}"));
        let cases: Vec<(&str, Vec<std::ffi::OsString>)> = vec![
            ("inspect", vec![os("inspect"), file.clone().into()]),
            (
                "verify",
                vec![
                    os("verify"),
                    os("--trust"),
                    hq_pub.clone().into(),
                    file.clone().into(),
                ],
            ),
            (
                "unpack",
                vec![
                    os("unpack"),
                    os("--trust"),
                    hq_pub.clone().into(),
                    file.clone().into(),
                    os("--out"),
                    out.clone().into(),
                ],
            ),
            (
                "import",
                vec![
                    os("import"),
                    os("--federation"),
                    os("city"),
                    os("--trust"),
                    hq_pub.clone().into(),
                    os("--state"),
                    state.clone().into(),
                    file.clone().into(),
                ],
            ),
            (
                "pack --base",
                vec![
                    os("pack"),
                    os("--key"),
                    keys.join("site-a.key").into(),
                    os("--weights"),
                    weights.clone().into(),
                    os("--samples"),
                    os("10"),
                    os("--base"),
                    file.clone().into(),
                    os("--trust"),
                    hq_pub.clone().into(),
                    os("--out"),
                    stick.clone().into(),
                ],
            ),
        ];
        for (cmd, args) in cases {
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            let r = special::run(env!("CARGO_BIN_EXE_ferry-client"), &args);
            // "verify" prints its FAIL line on stdout and a summary on stderr.
            let expect = if cmd == "verify" {
                "1 of 1 bundle failed verification"
            } else {
                expect
            };
            special::check(&format!("{cmd} {name}"), &r, expect);
        }
        assert!(!out.exists(), "unpack wrote {}", out.display());
        assert!(!state.exists(), "import created {}", state.display());
        assert!(
            std::fs::read_dir(&stick).map_or(true, |mut d| d.next().is_none()),
            "pack wrote into {}",
            stick.display()
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".ferry-tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    }
}
