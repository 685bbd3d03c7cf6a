//! An encrypted federation through the `ferry-server` binary and real files (issue 15 §5): `init
//! --encrypt-to` once, then `merge` and `republish` keep encrypting to the same sites without the operator
//! retyping them; `--encrypt-to` replaces the list, ferry.toml's `encrypt-to` is the standing choice, and
//! `--no-encrypt` goes back to the clear. Each global is checked by opening it with each site's key and
//! without one.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ferry_bundle::{Draft, Dtype, Keyring, OpenError, Payload, Role, SecretKey, TensorRef};

fn server<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry-server"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[track_caller]
fn success(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[track_caller]
fn refusal(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("ferry-server: "), "{err:?}");
    err
}

fn hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
}
fn site(i: usize) -> SecretKey {
    SecretKey::from_seed(
        Role::Site,
        ["site-a", "site-b", "site-c"][i],
        [2 + i as u8; 32],
    )
}

fn model(x: f32) -> Payload {
    let w: Vec<u8> = (0..4096)
        .flat_map(|i| (x + i as f32 * 1e-3).to_le_bytes())
        .collect();
    Payload::from_tensors(&[TensorRef {
        name: "fc.weight",
        dtype: Dtype::F32,
        shape: &[64, 64],
        data: &w,
    }])
    .unwrap()
}

struct Hq {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    state: PathBuf,
    out: PathBuf,
}

impl Hq {
    /// HQ with keys in `keys/` and three site keys in `keys/sites/`, after `init --encrypt-to enc/`, where `enc`
    /// holds site-a's and site-b's `.pub` files: site-c has a key but is not a recipient. Round 0 is
    /// `model(0.0)` in `out/global-r0.ferry`.
    fn encrypted() -> Hq {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let sites = dir.join("keys/sites");
        hq().write_pair(&dir.join("keys")).unwrap();
        for i in 0..3 {
            site(i).write_pair(&sites).unwrap();
        }
        let enc = dir.join("enc");
        std::fs::create_dir_all(&enc).unwrap();
        for id in ["site-a", "site-b"] {
            std::fs::copy(
                sites.join(format!("{id}.pub")),
                enc.join(format!("{id}.pub")),
            )
            .unwrap();
        }
        let weights = dir.join("init.safetensors");
        std::fs::write(&weights, model(0.0).bytes()).unwrap();
        let h = Hq {
            state: dir.join("hq"),
            out: dir.join("bundles"),
            dir,
            _tmp: tmp,
        };
        success(&h.run(
            "init",
            &[
                "--weights",
                Hq::s(&weights),
                "--federation",
                "city",
                "--encrypt-to",
                Hq::s(&enc),
            ],
        ));
        h
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }
    fn key(&self) -> PathBuf {
        self.dir.join("keys/hq.key")
    }
    fn run(&self, cmd: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            cmd.to_string(),
            "--key".into(),
            Hq::s(&self.key()).into(),
            "--state".into(),
            Hq::s(&self.state).into(),
            "--out".into(),
            Hq::s(&self.out).into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        server(&args)
    }
    /// Both sites' updates on `global`, encrypted to HQ, in a fresh folder.
    fn updates(&self, global: &Path, round: u64) -> Vec<String> {
        (0..2)
            .map(|i| {
                let g = ferry_bundle::open_file(global, &ring(Some(i))).unwrap();
                let draft = Draft {
                    encrypt_to: vec![hq().public()],
                    ..Draft::update_for(&g.manifest, &g.hash, site(i).id(), 100)
                };
                let s = ferry_bundle::seal(draft, &model(i as f32 + round as f32), &site(i), 3)
                    .unwrap();
                let p = s
                    .write_to_dir(&self.dir.join(format!("usb-{round}")))
                    .unwrap();
                p.to_str().unwrap().to_string()
            })
            .collect()
    }
}

/// HQ's public key, plus site `i`'s identity.
fn ring(i: Option<usize>) -> Keyring {
    let mut r = Keyring::new();
    r.add(hq().public()).unwrap();
    if let Some(i) = i {
        r.add_identity(&site(i));
    }
    r
}

/// The ids a global is encrypted to, sorted (empty: in the clear), from its verified manifest.
fn recipients(path: &Path) -> Vec<String> {
    let b = ferry_bundle::identify_file(path, &ring(None)).unwrap();
    let raw = std::fs::read(path).unwrap();
    let version = u16::from_le_bytes([raw[16], raw[17]]);
    match &b.manifest.encryption {
        Some(e) => {
            assert_eq!(version, 3);
            let mut ids: Vec<String> = e.recipients.iter().map(|r| r.id.clone()).collect();
            ids.sort();
            ids
        }
        None => {
            assert_eq!(version, 2);
            Vec::new()
        }
    }
}

#[test]
fn an_encrypted_federation_s_merge_and_republish_stay_encrypted_to_the_sites() {
    let h = Hq::encrypted();
    let (keys, sites) = (h.dir.join("keys"), h.dir.join("keys/sites"));
    let g0 = h.out.join("global-r0.ferry");
    assert_eq!(recipients(&g0), ["hq", "site-a", "site-b"]);

    // merge without --encrypt-to: the same recipients.
    let mut args = vec!["--trust", Hq::s(&sites), "--min-sites", "2"];
    let u1 = h.updates(&g0, 1);
    args.extend(u1.iter().map(String::as_str));
    success(&h.run("merge", &args));
    let g1 = h.out.join("global-r1.ferry");
    assert_eq!(recipients(&g1), ["hq", "site-a", "site-b"]);

    // republish without --encrypt-to: format 3, to the same keys; each site opens it, nobody else does.
    success(&h.run("republish", &["--from-round", "0"]));
    let g2 = h.out.join("global-r2.ferry");
    assert_eq!(recipients(&g2), ["hq", "site-a", "site-b"]);
    for i in 0..2 {
        let g = ferry_bundle::open_file(&g2, &ring(Some(i))).unwrap();
        assert_eq!(g.payload(), model(0.0).bytes(), "round 0's weights");
    }
    assert!(matches!(
        ferry_bundle::open_file(&g2, &ring(None)).unwrap_err(),
        OpenError::Encrypted(_)
    ));
    assert!(matches!(
        ferry_bundle::open_file(&g2, &ring(Some(2))).unwrap_err(),
        OpenError::NotARecipient { .. }
    ));
    // The binary's own reader: refused without an identity, in one line, nothing written.
    let unpacked = h.dir.join("unpacked.safetensors");
    let e = refusal(&server(&[
        "unpack",
        "--trust",
        Hq::s(&keys.join("hq.pub")),
        "--out",
        Hq::s(&unpacked),
        Hq::s(&g2),
    ]));
    assert!(
        e.contains("encrypted to") && e.contains("--identity"),
        "{e}"
    );
    assert!(!unpacked.exists());
    success(&server(&[
        "unpack",
        "--trust",
        Hq::s(&keys.join("hq.pub")),
        "--identity",
        Hq::s(&sites.join("site-b.key")),
        "--out",
        Hq::s(&unpacked),
        Hq::s(&g2),
    ]));
    assert_eq!(std::fs::read(&unpacked).unwrap(), model(0.0).bytes());

    // --encrypt-to replaces the list, and the next republish keeps the new one.
    success(&h.run(
        "republish",
        &[
            "--from-round",
            "1",
            "--encrypt-to",
            Hq::s(&sites.join("site-a.pub")),
        ],
    ));
    assert_eq!(recipients(&h.out.join("global-r3.ferry")), ["hq", "site-a"]);
    success(&h.run("republish", &["--from-round", "0"]));
    assert_eq!(recipients(&h.out.join("global-r4.ferry")), ["hq", "site-a"]);

    // ferry.toml's encrypt-to is the standing choice (relative to the state folder); a flag still wins.
    std::fs::write(
        h.state.join("ferry.toml"),
        "encrypt-to = [\"../keys/sites/site-c.pub\"]\n",
    )
    .unwrap();
    success(&h.run("republish", &["--from-round", "0"]));
    assert_eq!(recipients(&h.out.join("global-r5.ferry")), ["hq", "site-c"]);
    let encrypt_to_setting = || {
        let o = server(&["config", "--state", Hq::s(&h.state), "--json"]);
        assert!(o.status.success(), "{o:?}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let row = ferry_testdata::cli::setting_row(&v, "encrypt-to");
        (
            row["value"].as_str().unwrap().to_string(),
            row["origin"].as_str().unwrap().to_string(),
        )
    };
    let (value, origin) = encrypt_to_setting();
    assert!(value.ends_with("site-c.pub"), "{value}");
    assert_eq!(origin, "file");
    let both = h.run(
        "republish",
        &["--from-round", "0", "--no-encrypt", "--encrypt-to", "x.pub"],
    );
    assert_eq!(both.status.code(), Some(2), "a usage error: {both:?}");
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    success(&h.run("republish", &["--from-round", "0", "--no-encrypt"]));
    assert!(recipients(&h.out.join("global-r6.ferry")).is_empty());
    std::fs::write(h.state.join("ferry.toml"), "encrypt-to = []\n").unwrap();
    success(&h.run("republish", &["--from-round", "0"]));
    assert!(recipients(&h.out.join("global-r7.ferry")).is_empty());
    assert_eq!(
        encrypt_to_setting(),
        ("nobody (in the clear)".to_string(), "file".to_string())
    );
    std::fs::remove_file(h.state.join("ferry.toml")).unwrap();
    assert_eq!(
        encrypt_to_setting(),
        ("as the current global".to_string(), "unset".to_string())
    );
}

/// Issue 15: HQ replaces its key in an encrypted federation. With the new key alone the merge is refused in one
/// line that names `retire-key`, and nothing is written; `retire-key` keeps the old key's decryption identity
/// (only an HQ key, and only once), after which the old `.key` file can be deleted and the new key merges the
/// updates that were encrypted to the old one. The new global is encrypted to the sites and the new key.
#[test]
fn after_retire_key_the_new_hq_key_merges_what_was_encrypted_to_the_old_one() {
    let h = Hq::encrypted();
    let (keys, sites) = (h.dir.join("keys"), h.dir.join("keys/sites"));
    let updates = h.updates(&h.out.join("global-r0.ferry"), 1);
    let new_hq = SecretKey::from_seed(Role::Hq, "hq-2027", [9; 32]);
    let keys2 = h.dir.join("keys2");
    let (new_key, _) = new_hq.write_pair(&keys2).unwrap();
    let merge = || {
        let mut args = vec![
            "merge",
            "--key",
            Hq::s(&new_key),
            "--state",
            Hq::s(&h.state),
            "--out",
            Hq::s(&h.out),
            "--trust",
            Hq::s(&sites),
            "--min-sites",
            "2",
        ];
        args.extend(updates.iter().map(String::as_str));
        server(&args)
    };
    let ledger = || std::fs::read(h.state.join("ledger.json")).unwrap();
    let before = ledger();
    let e = refusal(&merge());
    assert!(e.contains("ferry-server retire-key"), "{e}");
    assert_eq!(ledger(), before);
    assert!(!h.out.join("global-r1.ferry").exists());

    let e = refusal(&server(&[
        "retire-key",
        "--state",
        Hq::s(&h.state),
        "--key",
        Hq::s(&sites.join("site-a.key")),
    ]));
    assert!(e.contains("site key"), "{e}");
    let retire = || {
        success(&server(&[
            "retire-key",
            "--json",
            "--state",
            Hq::s(&h.state),
            "--key",
            Hq::s(&keys.join("hq.key")),
        ]))
    };
    let v: serde_json::Value = serde_json::from_str(&retire()).unwrap();
    assert_eq!(v["key_id"], hq().public().key_id_hex());
    let identity = PathBuf::from(v["identity"].as_str().unwrap());
    assert!(identity.starts_with(&h.state) && identity.extension().unwrap() == "age");
    let kept = std::fs::read(&identity).unwrap();
    let again: serde_json::Value = serde_json::from_str(&retire()).unwrap();
    assert_eq!(again["newly_recorded"], false);
    assert_eq!(std::fs::read(&identity).unwrap(), kept);

    // The old signing key is gone; its identity in HQ's state is enough.
    std::fs::remove_file(keys.join("hq.key")).unwrap();
    success(&merge());
    let g1 = h.out.join("global-r1.ferry");
    let mut ring = Keyring::new();
    ring.add(new_hq.public()).unwrap();
    let b = ferry_bundle::identify_file(&g1, &ring).unwrap();
    let mut ids: Vec<String> = b
        .manifest
        .encryption
        .as_ref()
        .expect("still encrypted")
        .recipients
        .iter()
        .map(|r| r.id.clone())
        .collect();
    ids.sort();
    assert_eq!(ids, ["hq-2027", "site-a", "site-b"]);
    ring.add_identity(&site(1));
    let g = ferry_bundle::open_file(&g1, &ring).unwrap();
    assert_eq!(g.manifest.round, 1);
}
