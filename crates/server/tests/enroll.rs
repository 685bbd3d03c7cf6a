//! `ferry-server enroll` and its member list (issue 16), through the binary on real files: a kit holds what a
//! site needs, signed by HQ, and HQ's newest revocation list; the member list refuses a second kit for a site
//! whose key HQ holds, a reply from a site that is not a member, a reply that is not a site key, and a second
//! key for a member.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

use ferry_bundle::{Role, SecretKey};
use ferry_testdata::cli::{arg as p, ok};

fn server<S: AsRef<OsStr>>(args: &[S]) -> Output {
    ferry_testdata::cli::run(Path::new(env!("CARGO_BIN_EXE_ferry-server")), args)
}

/// A refusal: exit 1, stderr exactly one line `ferry-server: ...`.
#[track_caller]
fn refused(o: Output) -> String {
    ferry_testdata::cli::refused_alone("ferry-server", o)
}

fn members(hq: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(hq.join("members.json")).unwrap()).unwrap()
}

#[test]
fn a_kit_is_signed_and_complete_and_the_member_list_guards_each_site_key() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (keys, hq, usb) = (dir.join("keys"), dir.join("hq"), dir.join("usb"));
    let hq_key = keys.join("hq.key");
    ok(server(&["keygen", "--id", "hq", "--out", p(&keys)]));
    ok(server(&[
        "init",
        "--key",
        p(&hq_key),
        "--arch",
        "mnist-cnn",
        "--federation",
        "city",
        "--state",
        p(&hq),
        "--out",
        p(&usb),
    ]));
    // A revocation list stored at HQ travels in every kit written after it.
    let bad = SecretKey::from_seed(Role::Site, "site-z", [9; 32]);
    bad.write_pair(&keys).unwrap();
    ok(server(&[
        "revoke",
        "--key",
        p(&hq_key),
        "--federation",
        "city",
        "--serial",
        "1",
        "--revoke",
        p(&keys.join("site-z.pub")),
        "--state",
        p(&hq),
        "--out",
        p(&dir.join("rev-1.ferry-rev")),
    ]));

    // No stick known and no --out: one line saying where to set it; nothing enrolled.
    let err = refused(server(&[
        "enroll",
        "--state",
        p(&hq),
        "--key",
        p(&hq_key),
        "--site",
        "site-b",
    ]));
    assert!(
        err.contains("where is the stick?") && err.contains("ferry.toml"),
        "{err}"
    );
    assert!(!hq.join("members.json").exists());
    let err = refused(server(&[
        "enroll",
        "--state",
        p(&hq),
        "--key",
        p(&hq_key),
        "--site",
        "../b",
        "--stick",
        p(&usb),
    ]));
    assert!(err.contains("site"), "{err}");

    // The stick remembered in ferry.toml: the kit goes to <stick>/kit-site-b.
    std::fs::write(
        hq.join("ferry.toml"),
        format!("key = {:?}\nstick = \"../usb\"\n", p(&hq_key)),
    )
    .unwrap();
    let out = ok(server(&["enroll", "--state", p(&hq), "--site", "site-b"]));
    let hq_pub = ferry_bundle::PublicKey::read(&keys.join("hq.pub")).unwrap();
    assert!(out.contains(&hq_pub.fingerprint()), "{out}");
    let kit = ferry_bundle::kit::read(&usb.join("kit-site-b")).unwrap();
    let ledger: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hq.join("ledger.json")).unwrap()).unwrap();
    assert_eq!(kit.manifest.site, "site-b");
    assert_eq!(kit.manifest.federation, "city");
    assert_eq!(kit.manifest.arch.as_deref(), Some("mnist-cnn"));
    assert_eq!(
        kit.manifest.model_fingerprint,
        ledger["model_fingerprint"].as_str().unwrap()
    );
    assert_eq!(kit.hq_keys, vec![hq_pub]);
    let (name, list) = kit
        .revocations
        .expect("the kit carries HQ's revocation list");
    assert!(name.ends_with("revocations-1.ferry-rev"), "{name}");
    assert_eq!(list, std::fs::read(dir.join("rev-1.ferry-rev")).unwrap());
    let readme = std::fs::read_to_string(usb.join("kit-site-b/README.txt")).unwrap();
    assert!(
        readme.contains("ferry-client enroll /media/usb/kit-site-b"),
        "{readme}"
    );
    let m = members(&hq);
    assert_eq!(m["members"][0]["site"], "site-b");
    assert!(m["members"][0]["key"].is_null());

    // The same folder again: refused; a new kit elsewhere renews the member (no key yet).
    let err = refused(server(&["enroll", "--state", p(&hq), "--site", "site-b"]));
    assert!(err.contains("already exists"), "{err}");
    ok(server(&[
        "enroll",
        "--state",
        p(&hq),
        "--site",
        "site-b",
        "--out",
        p(&dir.join("kit2")),
    ]));
    assert_eq!(members(&hq)["members"].as_array().unwrap().len(), 1);

    // Replies: a non-member, an HQ key, then site-b's key; then another key for site-b.
    let reply = |id: &str, seed: u8, role: Role| {
        let r = dir.join(format!("reply-{id}-{seed}"));
        let k = SecretKey::from_seed(role, id, [seed; 32]);
        let sub = r.join("reply");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("{id}.pub")), k.public().to_file_text()).unwrap();
        (r, k)
    };
    let before = std::fs::read(hq.join("members.json")).unwrap();
    let (r, _) = reply("site-c", 3, Role::Site);
    let err = refused(server(&["enroll", "--state", p(&hq), "--add-reply", p(&r)]));
    assert!(err.contains("site-c is not a member"), "{err}");
    let (r, _) = reply("site-b", 4, Role::Hq);
    let err = refused(server(&["enroll", "--state", p(&hq), "--add-reply", p(&r)]));
    assert!(err.contains("a site's reply holds its site key"), "{err}");
    assert_eq!(std::fs::read(hq.join("members.json")).unwrap(), before);

    let (r, kb) = reply("site-b", 5, Role::Site);
    let out = ok(server(&["enroll", "--state", p(&hq), "--add-reply", p(&r)]));
    assert!(
        out.contains("added site-b's key") && out.contains(&kb.public().fingerprint()),
        "{out}"
    );
    assert_eq!(
        members(&hq)["members"][0]["key"]["key_id"],
        kb.public().key_id_hex()
    );
    let out = ok(server(&["enroll", "--state", p(&hq), "--add-reply", p(&r)]));
    assert!(out.contains("already in the member list"), "{out}");
    let (r2, _) = reply("site-b", 6, Role::Site);
    let err = refused(server(&[
        "enroll",
        "--state",
        p(&hq),
        "--add-reply",
        p(&r2),
    ]));
    assert!(err.contains("site-b is a member with key"), "{err}");
    let err = refused(server(&[
        "enroll",
        "--state",
        p(&hq),
        "--site",
        "site-b",
        "--out",
        p(&dir.join("kit3")),
    ]));
    assert!(err.contains("already enrolled with key"), "{err}");
    assert!(!dir.join("kit3").exists());

    // Status lists the member, and with the stick, whom HQ waits for.
    let out = ok(server(&["status", "--state", p(&hq)]));
    assert!(
        out.contains("members     1") && out.contains("site-b"),
        "{out}"
    );
    assert!(out.contains("round 0: waiting for site-b"), "{out}");
}
