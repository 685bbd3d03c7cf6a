//! The "CLI polish" of issue 17, through the `ferry-server` binary: every subcommand's `--help` shows an example
//! (the top-level one starts a federation with `--state`), `init` without `--state` refuses and says why, a merge
//! or revoke on a missing HQ state says how to create it and creates nothing, a public key for a secret key is
//! named as such, and `init`, `emit`, `revoke` and `merge` report in JSON.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;

use ferry_bundle::{seal, Draft, Dtype, Payload, Role, SecretKey, TensorRef};
use serde_json::Value;

fn server<S: AsRef<OsStr>>(args: &[S]) -> Output {
    ferry_testdata::cli::run(Path::new(env!("CARGO_BIN_EXE_ferry-server")), args)
}

#[track_caller]
fn success(o: &Output) -> String {
    ferry_testdata::cli::ok(o)
}

#[track_caller]
fn json(o: &Output) -> Value {
    ferry_testdata::cli::json(o)
}

/// A refusal: exit status 1 and exactly one line on stderr, `ferry-server: ...`.
#[track_caller]
fn refusal(o: &Output) -> String {
    ferry_testdata::cli::refused_alone("ferry-server", o)
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

/// HQ's and site-a's key pairs in `dir/keys`, initial weights in `dir/init.safetensors`.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let keys = dir.join("keys");
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
        .write_pair(&keys)
        .unwrap();
    SecretKey::from_seed(Role::Site, "site-a", [2; 32])
        .write_pair(&keys)
        .unwrap();
    let w = dir.join("init.safetensors");
    std::fs::write(&w, payload(0.0).bytes()).unwrap();
    (keys, w)
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
fn every_subcommand_shows_an_example_and_init_examples_give_a_state() {
    let top = success(&server(&["--help"]));
    let commands = subcommands(&top);
    assert!(
        commands.len() >= 15 && commands.iter().any(|c| c == "sign-hq-keys"),
        "the command list was not read from --help: {commands:?}"
    );
    let mut missing = Vec::new();
    for c in &commands {
        let help = success(&server(&[c.as_str(), "--help"]));
        if !help.contains("Example") {
            missing.push(c.clone());
        }
        if c == "init" {
            for l in help.lines().filter(|l| l.contains("ferry-server init ")) {
                assert!(l.contains("--state"), "init example without --state: {l}");
            }
        }
    }
    assert!(missing.is_empty(), "no example in --help of {missing:?}");
    let inits: Vec<&str> = top
        .lines()
        .filter(|l| l.contains("ferry-server init "))
        .collect();
    assert!(!inits.is_empty(), "{top}");
    assert!(inits.iter().all(|l| l.contains("--state")), "{inits:?}");
}

#[test]
fn init_without_a_state_refuses_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (keys, w) = setup(dir);
    let out = dir.join("bundles");
    let o = server(&[
        OsStr::new("init"),
        OsStr::new("--key"),
        keys.join("hq.key").as_os_str(),
        OsStr::new("--weights"),
        w.as_os_str(),
        OsStr::new("--federation"),
        OsStr::new("city"),
        OsStr::new("--out"),
        out.as_os_str(),
    ]);
    let err = refusal(&o);
    assert!(
        err.contains("init needs --state DIR") && err.contains("merge"),
        "{err}"
    );
    assert!(!out.exists(), "a refused init wrote {}", out.display());
}

#[test]
fn merge_and_revoke_on_a_missing_state_say_how_to_create_it_and_create_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (keys, _) = setup(dir);
    // An update that would verify: the refusal is about the state, not the file.
    let draft = Draft::update("city", None, 0, &"a".repeat(64), "site-a", 10);
    let site = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
    let update = dir.join("site-a-r0.ferry");
    std::fs::write(&update, seal(draft, &payload(1.0), &site, 3).unwrap().bytes).unwrap();
    let empty = dir.join("hq-empty");
    std::fs::create_dir(&empty).unwrap();
    let out = dir.join("bundles");
    let list = dir.join("revocations-1.ferry-rev");
    for state in [dir.join("hq-f2"), empty.clone()] {
        let o = server(&[
            OsStr::new("merge"),
            OsStr::new("--key"),
            keys.join("hq.key").as_os_str(),
            OsStr::new("--trust"),
            keys.as_os_str(),
            OsStr::new("--state"),
            state.as_os_str(),
            OsStr::new("--out"),
            out.as_os_str(),
            update.as_os_str(),
        ]);
        let err = refusal(&o);
        let name = state.file_name().unwrap().to_str().unwrap();
        assert!(
            err.contains(&format!("ferry-server init --state {}", state.display())),
            "{err}"
        );
        if name == "hq-f2" {
            assert!(err.contains("does not exist"), "{err}");
        }
        assert!(!err.contains("lock"), "{err}");
        let o = server(&[
            OsStr::new("revoke"),
            OsStr::new("--key"),
            keys.join("hq.key").as_os_str(),
            OsStr::new("--federation"),
            OsStr::new("city"),
            OsStr::new("--serial"),
            OsStr::new("1"),
            OsStr::new("--revoke"),
            keys.join("site-a.pub").as_os_str(),
            OsStr::new("--state"),
            state.as_os_str(),
            OsStr::new("--out"),
            list.as_os_str(),
        ]);
        refusal(&o);
        let hq_key = keys.join("hq.key");
        let status = [
            OsStr::new("status"),
            OsStr::new("--state"),
            state.as_os_str(),
        ];
        let emit = [
            OsStr::new("emit"),
            OsStr::new("--key"),
            hq_key.as_os_str(),
            OsStr::new("--state"),
            state.as_os_str(),
            OsStr::new("--out"),
            out.as_os_str(),
        ];
        for args in [&status[..], &emit[..]] {
            assert!(refusal(&server(args)).contains("ferry-server init --state"));
        }
    }
    assert!(
        !dir.join("hq-f2").exists(),
        "a refused command created the state"
    );
    let left: Vec<_> = std::fs::read_dir(&empty).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in the empty state folder: {left:?}");
    assert!(!out.exists() && !list.exists());
}

#[test]
fn a_public_key_for_hq_s_secret_key_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (keys, w) = setup(dir);
    let state = dir.join("hq");
    let o = server(&[
        OsStr::new("init"),
        OsStr::new("--key"),
        keys.join("hq.pub").as_os_str(),
        OsStr::new("--weights"),
        w.as_os_str(),
        OsStr::new("--federation"),
        OsStr::new("city"),
        OsStr::new("--state"),
        state.as_os_str(),
    ]);
    let err = refusal(&o);
    assert!(
        err.contains("hq.pub: this is a public key") && err.contains("hq.key"),
        "{err}"
    );
    assert!(!err.contains("chmod") && !state.exists(), "{err}");
}

#[test]
fn init_emit_merge_and_revoke_report_in_json_and_plurals() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (keys, w) = setup(dir);
    let state = dir.join("hq");
    let out = dir.join("bundles");
    let hq_key = keys.join("hq.key");
    let init = |json: bool| {
        let mut a = vec![
            OsStr::new("init"),
            OsStr::new("--key"),
            hq_key.as_os_str(),
            OsStr::new("--weights"),
            w.as_os_str(),
            OsStr::new("--federation"),
            OsStr::new("city"),
            OsStr::new("--state"),
            state.as_os_str(),
            OsStr::new("--out"),
            out.as_os_str(),
        ];
        if json {
            a.push(OsStr::new("--json"));
        }
        server(&a)
    };
    let v = json(&init(true));
    assert_eq!(v["manifest"]["round"], 0, "{v}");
    let g0 = PathBuf::from(v["file"].as_str().unwrap());
    assert_eq!(g0, out.join("global-r0.ferry"));
    assert_eq!(
        v["hash"].as_str().unwrap(),
        ferry_bundle::sha256_hex(&std::fs::read(&g0).unwrap())
    );
    let err = refusal(&init(false));
    assert!(err.contains("already holds a ledger"), "{err}");

    let stick = dir.join("stick");
    let v = json(&server(&[
        OsStr::new("emit"),
        OsStr::new("--json"),
        OsStr::new("--key"),
        hq_key.as_os_str(),
        OsStr::new("--state"),
        state.as_os_str(),
        OsStr::new("--out"),
        stick.as_os_str(),
    ]));
    assert_eq!(
        PathBuf::from(v["file"].as_str().unwrap()),
        stick.join("global-r0.ferry")
    );

    // Human output of a round-0 global: no "0 contributor(s)".
    let text = success(&server(&[
        OsStr::new("verify"),
        OsStr::new("--trust"),
        keys.join("hq.pub").as_os_str(),
        g0.as_os_str(),
    ]));
    assert!(
        text.contains("global (initial model), federation city, round 0, 1 tensor,"),
        "{text}"
    );

    let g0_bundle = ferry_bundle::open_file(&g0, &{
        let mut r = ferry_bundle::Keyring::new();
        r.add(SecretKey::from_seed(Role::Hq, "hq", [1; 32]).public())
            .unwrap();
        r
    })
    .unwrap();
    let site = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
    let update = dir.join("site-a-r0.ferry");
    let draft = Draft::update_for(&g0_bundle.manifest, &g0_bundle.hash, "site-a", 10);
    std::fs::write(&update, seal(draft, &payload(1.0), &site, 3).unwrap().bytes).unwrap();
    let merge = |json: bool| {
        let mut a = vec![
            OsStr::new("merge"),
            OsStr::new("--key"),
            hq_key.as_os_str(),
            OsStr::new("--trust"),
            keys.as_os_str(),
            OsStr::new("--state"),
            state.as_os_str(),
            OsStr::new("--out"),
            out.as_os_str(),
            // One site here: the default asks for two.
            OsStr::new("--min-sites"),
            OsStr::new("1"),
        ];
        if json {
            a.push(OsStr::new("--json"));
        }
        a.push(update.as_os_str());
        server(&a)
    };
    let text = success(&merge(false));
    assert!(
        text.contains("global (1 contributor), federation city, round 1,"),
        "{text}"
    );

    let list = dir.join("revocations-1.ferry-rev");
    let v = json(&server(&[
        OsStr::new("revoke"),
        OsStr::new("--json"),
        OsStr::new("--key"),
        hq_key.as_os_str(),
        OsStr::new("--federation"),
        OsStr::new("city"),
        OsStr::new("--serial"),
        OsStr::new("1"),
        OsStr::new("--revoke"),
        keys.join("site-a.pub").as_os_str(),
        OsStr::new("--state"),
        state.as_os_str(),
        OsStr::new("--out"),
        list.as_os_str(),
    ]));
    assert_eq!(PathBuf::from(v["file"].as_str().unwrap()), list);
    assert_eq!(v["list"]["serial"], 1, "{v}");
    assert_eq!(
        v["sha256"].as_str().unwrap(),
        ferry_bundle::sha256_hex(&std::fs::read(&list).unwrap())
    );
    let list2 = dir.join("revocations-2.ferry-rev");
    let text = success(&server(&[
        OsStr::new("revoke"),
        OsStr::new("--key"),
        hq_key.as_os_str(),
        OsStr::new("--federation"),
        OsStr::new("city"),
        OsStr::new("--serial"),
        OsStr::new("2"),
        OsStr::new("--revoke"),
        keys.join("site-a.pub").as_os_str(),
        OsStr::new("--out"),
        list2.as_os_str(),
    ]));
    assert!(text.contains("revoking 1 key and 0 bundles"), "{text}");
}
