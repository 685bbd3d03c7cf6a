//! The "CLI polish" of issue 17, through the `ferry-client` binary: every subcommand's `--help` shows an example,
//! a closed stdout is a quiet exit, errors are one clear line (a directory for a bundle, a public key for a secret
//! key, a path said once), `pack` names the tensor that does not fit and how to fix it, a refused command leaves a
//! state folder that did not exist absent, `--json` where a command reports something, dates in UTC and plurals.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ferry_bundle::{seal, Draft, Dtype, Payload, Role, SecretKey, TensorRef};
use serde_json::Value;

fn hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
}

fn site() -> SecretKey {
    SecretKey::from_seed(Role::Site, "site-a", [2; 32])
}

fn client<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry-client"))
        .args(args)
        .stdin(Stdio::null())
        .env_remove("FERRY_PASSPHRASE")
        .output()
        .unwrap()
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

/// Success with nothing on stderr; stdout returned.
fn success(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    printable(o);
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&success(o)).unwrap_or_else(|e| panic!("not JSON ({e}): {o:?}"))
}

struct Tensor {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
}

fn t(name: &'static str, dtype: Dtype, shape: &[usize]) -> Tensor {
    Tensor {
        name,
        dtype,
        shape: shape.to_vec(),
    }
}

/// Zero-filled tensors of the given layout.
fn payload(tensors: &[Tensor]) -> Payload {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| vec![0u8; ferry_bundle::tensor::byte_len(t.dtype, &t.shape).unwrap()])
        .collect();
    let refs: Vec<TensorRef<'_>> = tensors
        .iter()
        .zip(&data)
        .map(|(t, d)| TensorRef {
            name: t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data: d,
        })
        .collect();
    Payload::from_tensors(&refs).unwrap()
}

/// The model of the pack tests: a BatchNorm layer and a linear layer.
fn model() -> Vec<Tensor> {
    vec![
        t("bn.num_batches_tracked", Dtype::I64, &[]),
        t("bn.weight", Dtype::F32, &[4]),
        t("fc.weight", Dtype::F32, &[2, 4]),
    ]
}

/// `keys/` with both key pairs, and a round-0 global of federation `city` holding `p` at `dir/name`.
fn setup(dir: &Path, name: &str, p: &Payload, arch: Option<&str>) -> PathBuf {
    let keys = dir.join("keys");
    if !keys.exists() {
        hq().write_pair(&keys).unwrap();
        site().write_pair(&keys).unwrap();
    }
    let s = seal(
        Draft::initial("city", arch.map(str::to_string)),
        p,
        &hq(),
        3,
    )
    .unwrap();
    let g = dir.join(name);
    std::fs::write(&g, &s.bytes).unwrap();
    g
}

/// The subcommands `--help` lists under "Commands:", without clap's own `help`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn every_subcommand_shows_an_example() {
    let top = success(&client(&["--help"]));
    assert!(top.contains("ferry-client import --trust"), "{top}");
    let commands = subcommands(&top);
    assert!(
        commands.len() >= 15 && commands.iter().any(|c| c == "recalibrate"),
        "the command list was not read from --help: {commands:?}"
    );
    let missing: Vec<&String> = commands
        .iter()
        .filter(|c| !success(&client(&[c.as_str(), "--help"])).contains("Example"))
        .collect();
    assert!(missing.is_empty(), "no example in --help of {missing:?}");
}

#[test]
fn inspect_into_a_closed_pipe_exits_quietly() {
    // 4000 tensors: several hundred kilobytes of listing, more than a pipe holds, so the tool is still writing
    // when the reader goes away (`inspect ... | head`).
    let names: Vec<&'static str> = (0..4000)
        .map(|i| &*Box::leak(format!("layer{i:04}.weight").into_boxed_str()))
        .collect();
    let tensors: Vec<Tensor> = names.iter().map(|n| t(n, Dtype::F32, &[1])).collect();
    let dir = tempfile::tempdir().unwrap();
    let g = setup(dir.path(), "global-r0.ferry", &payload(&tensors), None);
    for json in [false, true] {
        let mut args = vec![OsStr::new("inspect"), g.as_os_str()];
        if json {
            args.push(OsStr::new("--json"));
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-client"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 64];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut first)
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "json {json}: {o:?}");
        assert!(
            o.stderr.is_empty(),
            "json {json}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn a_directory_given_for_a_bundle_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let usb = dir.path().join("usb-\u{1b}[2J");
    std::fs::create_dir(&usb).unwrap();
    setup(
        dir.path(),
        "usb-\u{1b}[2J/global-r0.ferry",
        &payload(&model()),
        None,
    );
    let state = dir.path().join("site");
    let hq_pub = dir.path().join("keys/hq.pub");
    let o = client(&[
        OsStr::new("import"),
        OsStr::new("--federation"),
        OsStr::new("city"),
        OsStr::new("--trust"),
        hq_pub.as_os_str(),
        OsStr::new("--state"),
        state.as_os_str(),
        usb.as_os_str(),
    ]);
    // `import` takes a folder since issue 16 (the stick): it picks the newest global in it.
    let out = success(&o);
    assert!(out.contains("imported round 0"), "{out}");
    for cmd in [&["inspect"][..], &["verify", "--trust"]] {
        let mut args: Vec<&OsStr> = cmd.iter().map(OsStr::new).collect();
        if cmd.len() > 1 {
            args.push(hq_pub.as_os_str());
        }
        args.push(usb.as_os_str());
        let o = client(&args);
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        assert!(printable(&o).contains("is a directory; give the bundle file in it"));
    }
}

#[test]
fn a_public_key_for_a_secret_key_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let g = setup(dir.path(), "global-r0.ferry", &payload(&model()), None);
    let weights = dir.path().join("w.safetensors");
    std::fs::write(&weights, payload(&model()).bytes()).unwrap();
    let usb = dir.path().join("usb");
    let pub_key = dir.path().join("keys/site-a.pub");
    let o = client(&[
        OsStr::new("pack"),
        OsStr::new("--key"),
        pub_key.as_os_str(),
        OsStr::new("--weights"),
        weights.as_os_str(),
        OsStr::new("--samples"),
        OsStr::new("10"),
        OsStr::new("--base"),
        g.as_os_str(),
        OsStr::new("--trust"),
        dir.path().join("keys/hq.pub").as_os_str(),
        OsStr::new("--out"),
        usb.as_os_str(),
    ]);
    let err = refusal(&o);
    assert!(
        err.contains("site-a.pub: this is a public key; this option takes the secret key")
            && err.contains("site-a.key"),
        "{err}"
    );
    assert!(!err.contains("chmod"), "{err}");
    assert!(!usb.exists());
    let o = client(&[
        OsStr::new("export"),
        OsStr::new("--state"),
        dir.path().as_os_str(),
        OsStr::new("--key"),
        dir.path().join("keys/hq.pub").as_os_str(),
    ]);
    assert!(refusal(&o).contains("hq.pub: this is a public key"));
}

#[test]
fn an_io_error_names_its_path_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-global.ferry");
    let err = refusal(&client(&[OsStr::new("inspect"), missing.as_os_str()]));
    assert_eq!(err.matches("no-such-global.ferry").count(), 1, "{err}");
    let g = setup(dir.path(), "global-r0.ferry", &payload(&model()), None);
    let weights = dir.path().join("no-such-weights.safetensors");
    let err = refusal(&client(&[
        OsStr::new("pack"),
        OsStr::new("--key"),
        dir.path().join("keys/site-a.key").as_os_str(),
        OsStr::new("--weights"),
        weights.as_os_str(),
        OsStr::new("--samples"),
        OsStr::new("10"),
        OsStr::new("--base"),
        g.as_os_str(),
        OsStr::new("--trust"),
        dir.path().join("keys/hq.pub").as_os_str(),
    ]));
    assert_eq!(err.matches("no-such-weights").count(), 1, "{err}");
}

#[test]
fn pack_names_the_tensor_that_differs_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let g = setup(dir.path(), "global-r0.ferry", &payload(&model()), None);
    let usb = dir.path().join("usb");
    let (key, hq_pub) = (
        dir.path().join("keys/site-a.key"),
        dir.path().join("keys/hq.pub"),
    );
    let w = dir.path().join("w.safetensors");
    let pack = |weights: &[Tensor], json: bool| {
        std::fs::write(&w, payload(weights).bytes()).unwrap();
        let mut args = vec![
            OsStr::new("pack"),
            OsStr::new("--key"),
            key.as_os_str(),
            OsStr::new("--weights"),
            w.as_os_str(),
            OsStr::new("--samples"),
            OsStr::new("10"),
            OsStr::new("--base"),
            g.as_os_str(),
            OsStr::new("--trust"),
            hq_pub.as_os_str(),
            OsStr::new("--out"),
            usb.as_os_str(),
        ];
        if json {
            args.push(OsStr::new("--json"));
        }
        client(&args)
    };
    let prefixed = vec![
        t("module.bn.num_batches_tracked", Dtype::I64, &[]),
        t("module.bn.weight", Dtype::F32, &[4]),
        t("module.fc.weight", Dtype::F32, &[2, 4]),
    ];
    let half = vec![
        t("bn.num_batches_tracked", Dtype::I64, &[]),
        t("bn.weight", Dtype::F32, &[4]),
        t("fc.weight", Dtype::F16, &[2, 4]),
    ];
    let no_count = vec![
        t("bn.weight", Dtype::F32, &[4]),
        t("fc.weight", Dtype::F32, &[2, 4]),
    ];
    let mut extra = model();
    extra.push(t("fc.bias", Dtype::F32, &[2]));
    let cases: [(&str, Vec<Tensor>, &[&str]); 4] = [
        (
            "module. prefix",
            prefixed,
            &[
                "start with `module.`",
                "module.state_dict()",
                "removeprefix",
            ],
        ),
        (
            "F16",
            half,
            &["\"fc.weight\" is F16", "F32", "model.float()"],
        ),
        (
            "missing num_batches_tracked",
            no_count,
            &[
                "\"bn.num_batches_tracked\"",
                "is missing",
                "model.state_dict()",
            ],
        ),
        (
            "extra tensor",
            extra,
            &["\"fc.bias\" is not in the base global's model", "remove it"],
        ),
    ];
    for (what, weights, expect) in cases {
        let err = refusal(&pack(&weights, false));
        assert!(
            err.contains("does not fit the base global's model"),
            "{what}: {err}"
        );
        for e in expect {
            assert!(err.contains(e), "{what}: {e:?} missing from {err}");
        }
        assert!(!usb.exists(), "{what}: a refused pack wrote to the stick");
    }
    let v = json(&pack(&model(), true));
    assert_eq!(v["manifest"]["kind"], "update");
    assert_eq!(v["manifest"]["site"]["samples"], 10);
    let file = PathBuf::from(v["file"].as_str().unwrap());
    assert_eq!(file, usb.join("site-a-r0.ferry"));
    assert_eq!(
        v["hash"].as_str().unwrap(),
        ferry_bundle::sha256_hex(&std::fs::read(&file).unwrap())
    );
}

#[test]
fn a_refused_command_leaves_a_missing_or_empty_state_folder_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "global-r0.ferry", &payload(&model()), None);
    let broken = dir.path().join("broken.ferry");
    std::fs::write(&broken, b"not a bundle").unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let hq_pub = dir.path().join("keys/hq.pub");
    let key = dir.path().join("keys/site-a.key");
    let usb = dir.path().join("usb");
    for state in [dir.path().join("missing"), empty.clone()] {
        let s = state.as_os_str();
        let runs: Vec<Vec<&OsStr>> = vec![
            vec![
                OsStr::new("import"),
                OsStr::new("--federation"),
                OsStr::new("city"),
                OsStr::new("--trust"),
                hq_pub.as_os_str(),
                OsStr::new("--state"),
                s,
                broken.as_os_str(),
            ],
            vec![
                OsStr::new("train"),
                OsStr::new("--state"),
                s,
                OsStr::new("--data"),
                OsStr::new("plates:loose:8"),
            ],
            vec![
                OsStr::new("export"),
                OsStr::new("--state"),
                s,
                OsStr::new("--key"),
                key.as_os_str(),
                OsStr::new("--out"),
                usb.as_os_str(),
            ],
        ];
        for args in runs {
            let err = refusal(&client(&args));
            assert!(!err.contains("lock"), "{args:?}: {err}");
            if state == empty {
                let left: Vec<_> = std::fs::read_dir(&empty).unwrap().flatten().collect();
                assert!(
                    left.is_empty(),
                    "{args:?} left {left:?} in an empty state folder"
                );
            } else {
                assert!(!state.exists(), "{args:?} created the state folder");
            }
        }
    }
    assert!(!usb.exists());
}

/// A plate-cnn global (round 0, seed 0) at `dir/global-r0.ferry`.
fn plate_global(dir: &Path) -> PathBuf {
    let model = ferry_train::Model::init(
        ferry_train::Arch::from_name("plate-cnn").unwrap(),
        0,
        &ferry_train::Device::Cpu,
    )
    .unwrap();
    let p = Payload::from_safetensors(&model.to_safetensors().unwrap()).unwrap();
    setup(dir, "global-r0.ferry", &p, Some("plate-cnn"))
}

#[test]
fn a_round_reports_in_json_utc_dates_and_proper_plurals() {
    let dir = tempfile::tempdir().unwrap();
    let g = plate_global(dir.path());
    let state = dir.path().join("site");
    let s = state.as_os_str();
    let hq_pub = dir.path().join("keys/hq.pub");

    // Human output of inspect: dates in UTC, no "(s)", a round-0 global said as such.
    let out = success(&client(&[OsStr::new("inspect"), g.as_os_str()]));
    assert!(
        out.lines()
            .any(|l| l.starts_with("created     20") && l.ends_with(" UTC")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("expires     20") && l.ends_with(" UTC")),
        "{out}"
    );
    assert!(!out.contains("unix") && !out.contains("(s)"), "{out}");
    let v = json(&client(&[
        OsStr::new("inspect"),
        OsStr::new("--json"),
        g.as_os_str(),
    ]));
    assert!(
        v["manifest"]["created"].is_u64(),
        "JSON keeps the number: {v}"
    );

    let v = json(&client(&[
        OsStr::new("import"),
        OsStr::new("--json"),
        OsStr::new("--federation"),
        OsStr::new("city"),
        OsStr::new("--trust"),
        hq_pub.as_os_str(),
        OsStr::new("--state"),
        s,
        g.as_os_str(),
    ]));
    assert_eq!(v["installed"], true, "{v}");
    assert_eq!(v["round"], 0);
    assert_eq!(v["manifest"]["arch"], "plate-cnn");
    let v = json(&client(&[
        OsStr::new("import"),
        OsStr::new("--json"),
        OsStr::new("--state"),
        s,
        g.as_os_str(),
    ]));
    assert_eq!(v["installed"], false, "{v}");

    // Two runs with different shuffling seeds: the second starts again from the global, not from the first
    // one's checkpoint.
    let train = |json: bool| {
        let mut args: Vec<&OsStr> = [
            "train",
            "--data",
            "plates:loose:8",
            "--batch",
            "4",
            "--epochs",
            "1",
        ]
        .iter()
        .map(OsStr::new)
        .collect();
        args.extend([OsStr::new("--state"), s, OsStr::new("--seed")]);
        args.push(OsStr::new(if json { "1" } else { "0" }));
        if json {
            args.push(OsStr::new("--json"));
        }
        client(&args)
    };
    let out = success(&train(false));
    assert!(out.contains("on 8 samples: 1 epoch, "), "{out}");
    let v = json(&train(true));
    assert_eq!(
        (v["samples"].as_u64(), v["epochs"].as_u64()),
        (Some(8), Some(1)),
        "{v}"
    );
    assert!(v["loss"].is_f64() && v["steps"].is_u64(), "{v}");

    // A cosine decay: a floor outside [0, 1] is refused before any training, a sound one trains.
    let decay = |floor: &str| {
        client(
            &[
                "train",
                "--data",
                "plates:loose:8",
                "--batch",
                "4",
                "--decay-until",
                "4",
                "--decay-floor",
                floor,
                "--state",
            ]
            .iter()
            .map(OsStr::new)
            .chain([s])
            .collect::<Vec<_>>(),
        )
    };
    let err = refusal(&decay("1.5"));
    assert!(
        err.contains("learning-rate floor must be a fraction between 0 and 1, not 1.5"),
        "{err}"
    );
    assert!(success(&decay("0.1")).contains("on 8 samples: 1 epoch, "));

    let out = success(&client(&[OsStr::new("status"), OsStr::new("--state"), s]));
    assert!(out.contains("(8 samples, 1 epoch)"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("imported    20") && l.contains(" UTC from ")),
        "{out}"
    );
    assert!(!out.contains("unix") && !out.contains("(s)"), "{out}");

    let usb = dir.path().join("usb");
    let v = json(&client(&[
        OsStr::new("export"),
        OsStr::new("--json"),
        OsStr::new("--state"),
        s,
        OsStr::new("--key"),
        dir.path().join("keys/site-a.key").as_os_str(),
        OsStr::new("--out"),
        usb.as_os_str(),
    ]));
    assert_eq!(v["manifest"]["site"]["samples"], 8, "{v}");
    let update = PathBuf::from(v["file"].as_str().unwrap());
    assert!(update.is_file());

    let site_pub = dir.path().join("keys/site-a.pub");
    let out = dir.path().join("update.safetensors");
    let v = json(&client(&[
        OsStr::new("unpack"),
        OsStr::new("--json"),
        OsStr::new("--trust"),
        site_pub.as_os_str(),
        update.as_os_str(),
        OsStr::new("--out"),
        out.as_os_str(),
    ]));
    assert_eq!(PathBuf::from(v["file"].as_str().unwrap()), out);
    assert_eq!(
        v["bytes"].as_u64(),
        Some(std::fs::metadata(&out).unwrap().len())
    );
    let text = success(&client(&[
        OsStr::new("verify"),
        OsStr::new("--trust"),
        site_pub.as_os_str(),
        update.as_os_str(),
    ]));
    assert!(text.contains("update from site-a (8 samples)"), "{text}");

    // The audit log (issue 16): the import and the export, each with its hash and tensor list.
    let v = json(&client(&[
        OsStr::new("log"),
        OsStr::new("--json"),
        OsStr::new("--state"),
        s,
    ]));
    let entries = v.as_array().expect("a JSON array");
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["import", "export"], "{v}");
    let exported = &entries[1];
    let update_bytes = std::fs::read(&update).unwrap();
    assert_eq!(exported["size"].as_u64(), Some(update_bytes.len() as u64));
    assert_eq!(exported["signer"], "site-a");
    assert!(!exported["tensors"].as_array().unwrap().is_empty(), "{v}");
    let text = success(&client(&[
        OsStr::new("log"),
        OsStr::new("--tensors"),
        OsStr::new("--state"),
        s,
    ]));
    assert!(text.contains(" UTC  export"), "{text}");
    assert!(text.contains("signed by site site-a"), "{text}");

    // A second export for the same round is refused; --again replaces it and the log says so.
    let usb2 = dir.path().join("usb2");
    let o = client(&[
        OsStr::new("export"),
        OsStr::new("--state"),
        s,
        OsStr::new("--key"),
        dir.path().join("keys/site-a.key").as_os_str(),
        OsStr::new("--out"),
        usb2.as_os_str(),
    ]);
    assert!(refusal(&o).contains("--again"), "{o:?}");
    assert!(!usb2.exists(), "a refused export wrote {}", usb2.display());
    let v = json(&client(&[
        OsStr::new("export"),
        OsStr::new("--again"),
        OsStr::new("--json"),
        OsStr::new("--state"),
        s,
        OsStr::new("--key"),
        dir.path().join("keys/site-a.key").as_os_str(),
        OsStr::new("--out"),
        usb2.as_os_str(),
    ]));
    let again = v["hash"].as_str().unwrap().to_string();
    let text = success(&client(&[OsStr::new("log"), OsStr::new("--state"), s]));
    assert!(text.contains("replaces the update"), "{text}");
    let v = json(&client(&[
        OsStr::new("log"),
        OsStr::new("--json"),
        OsStr::new("--state"),
        s,
    ]));
    assert_eq!(v[2]["sha256"].as_str(), Some(again.as_str()));
    assert_eq!(v[2]["supersedes"], entries[1]["sha256"]);
}

#[test]
fn keygen_and_fingerprint_report_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let v = json(&client(&[
        OsStr::new("keygen"),
        OsStr::new("--json"),
        OsStr::new("--id"),
        OsStr::new("site-b"),
        OsStr::new("--out"),
        keys.as_os_str(),
    ]));
    assert_eq!(
        (v["role"].as_str(), v["id"].as_str()),
        (Some("site"), Some("site-b")),
        "{v}"
    );
    let public = PathBuf::from(v["public"].as_str().unwrap());
    assert_eq!(public, keys.join("site-b.pub"));
    let again = json(&client(&[
        OsStr::new("fingerprint"),
        OsStr::new("--json"),
        public.as_os_str(),
    ]));
    assert_eq!(again["fingerprint"], v["fingerprint"]);
    assert_eq!(again["key_id"], v["key_id"]);
}
