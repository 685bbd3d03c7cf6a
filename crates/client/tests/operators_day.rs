//! The operators' day (issue 16), through both real binaries on real files: HQ enrols two sites with kits on a
//! stick, each site enrols from its kit, and two whole rounds run with nothing but `enroll` and `round` (after
//! HQ's one-time keygen and init). Then the refusals: another site's key for export, a forged or foreign kit, a
//! global of another federation, an update from a site that is not a member, settings that make no sense.
//!
//! `ferry-server` is HQ's binary, in another package: it is taken from beside this package's binary, which
//! `cargo test --workspace` (scripts/test.sh) and `cargo test -p ferry-client -p ferry-server` build.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn client_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry-client"))
}

fn server_bin() -> PathBuf {
    let p = client_bin().with_file_name(format!("ferry-server{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.is_file(),
        "{} is not built: run `cargo test -p ferry-client -p ferry-server`, or scripts/test.sh, which build both tools",
        p.display()
    );
    p
}

fn run<S: AsRef<OsStr>>(bin: &Path, args: &[S]) -> Output {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .env_remove("FERRY_PASSPHRASE")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !t.chars().any(|c| c.is_control() && c != '\n'),
        "raw control character reached the terminal: {t:?}"
    );
    t
}

/// Success; stdout returned.
#[track_caller]
fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    text(&o);
    String::from_utf8(o.stdout).unwrap()
}

/// A refusal of `tool`: exit 1, one line on stderr naming the tool; the line returned.
#[track_caller]
fn refused(tool: &str, o: Output) -> String {
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    // Progress (epoch lines, notes) may come first; the error is one line, the last.
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let prefix = format!("{tool}: ");
    assert_eq!(
        err.lines().filter(|l| l.starts_with(&prefix)).count(),
        1,
        "not one error line: {err:?}"
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with(&prefix), "{err}");
    last.to_string()
}

fn client<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run(&client_bin(), args)
}

fn server<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run(&server_bin(), args)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Every file under `dir` with its bytes, for "nothing changed" checks.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                v.extend(snapshot(&path));
            } else if path.file_name().unwrap() != "lock" {
                v.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    v.sort();
    v
}

/// A federation `city` of plate-ctc at HQ (`hq/`, with `hq/ferry.toml` naming the key and the stick `usb/`),
/// the round-0 global on the stick, and kits for `sites` written by `ferry-server enroll`.
struct Fed {
    dir: tempfile::TempDir,
}

impl Fed {
    fn new(sites: &[&str]) -> Fed {
        let fed = Fed {
            dir: tempfile::tempdir().unwrap(),
        };
        let keys = fed.path("keys");
        ok(server(&["keygen", "--id", "hq", "--out", p(&keys)]));
        ok(server(&[
            "init",
            "--key",
            p(&keys.join("hq.key")),
            "--arch",
            "plate-ctc",
            "--seed",
            "1",
            "--federation",
            "city",
            "--state",
            p(&fed.path("hq")),
            "--out",
            p(&fed.path("usb")),
        ]));
        std::fs::write(
            fed.path("hq/ferry.toml"),
            "key = \"../keys/hq.key\"\nstick = \"../usb\"\n",
        )
        .unwrap();
        for s in sites {
            let out = ok(server(&[
                "enroll",
                "--state",
                p(&fed.path("hq")),
                "--site",
                s,
            ]));
            assert!(out.contains(&format!("wrote the kit for {s}")), "{out}");
        }
        fed
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// HQ's key fingerprint as `ferry-client fingerprint` prints it (what HQ reads over the phone).
    fn hq_fingerprint(&self) -> String {
        let v: Value = serde_json::from_str(&ok(client(&[
            "fingerprint",
            "--json",
            p(&self.path("keys/hq.pub")),
        ])))
        .unwrap();
        v["fingerprint"].as_str().unwrap().to_string()
    }

    /// `ferry-client enroll` of `site` from its kit, training on 8 plates of seed `seed` in batches of 4.
    fn enroll(&self, site: &str, seed: u32) -> String {
        ok(client(&[
            "enroll",
            p(&self.path(&format!("usb/kit-{site}"))),
            "--state",
            p(&self.path(site)),
            "--hq-fingerprint",
            &self.hq_fingerprint(),
            "--data",
            &format!("plates:loose:8:{seed}"),
            "--eval-data",
            "plates:loose:4:99",
            "--batch",
            "4",
            "--warmup",
            "2",
        ]))
    }

    fn site_round(&self, site: &str) -> String {
        ok(client(&["round", "--state", p(&self.path(site))]))
    }

    fn hq_round(&self) -> String {
        ok(server(&["round", "--state", p(&self.path("hq"))]))
    }

    fn hq_status(&self) -> Value {
        serde_json::from_str(&ok(server(&[
            "status",
            "--json",
            "--state",
            p(&self.path("hq")),
        ])))
        .unwrap()
    }
}

#[test]
fn two_sites_and_hq_run_two_rounds_with_only_enroll_and_round() {
    let fed = Fed::new(&["site-a", "site-b"]);
    let kit = fed.path("usb/kit-site-a");
    for f in ["kit.json", "kit.json.sig", "hq.pub", "README.txt"] {
        assert!(kit.join(f).is_file(), "{f} missing from the kit");
    }
    let readme = std::fs::read_to_string(kit.join("README.txt")).unwrap();
    assert!(readme.contains(&fed.hq_fingerprint()), "{readme}");

    // HQ knows its members before any key came back: waiting for both.
    let st = fed.hq_status();
    assert_eq!(st["members"].as_array().unwrap().len(), 2, "{st}");
    assert!(st["members"][0]["key_id"].is_null(), "{st}");

    for (site, seed) in [("site-a", 1), ("site-b", 2)] {
        let out = fed.enroll(site, seed);
        assert!(
            out.contains(&format!("enrolled {site} in federation city")),
            "{out}"
        );
        assert!(fed
            .path(&format!("usb/kit-{site}/reply/{site}.pub"))
            .is_file());
        assert!(fed.path(&format!("{site}/keys/{site}.key")).is_file());
        let toml = std::fs::read_to_string(fed.path(&format!("{site}/ferry.toml"))).unwrap();
        assert!(
            toml.contains("warmup = 2") && toml.contains("stick = "),
            "{toml}"
        );
    }

    // site-b encrypts its updates to the HQ key its enrolment pinned (issue 15 §5): one line in ferry.toml.
    let toml = fed.path("site-b/ferry.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("encrypt = true\n{text}")).unwrap();

    // Round 0 at the sites: import, train, evaluate, export, and the words about what to carry.
    for site in ["site-a", "site-b"] {
        let out = fed.site_round(site);
        assert!(out.contains("1 import    imported round 0"), "{out}");
        assert!(
            out.contains("2 train     trained plate-ctc from round 0 on 8 samples"),
            "{out}"
        );
        assert!(
            out.contains("3 evaluate  local model on 4 samples"),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "Carry {}",
                p(&fed.path(&format!("usb/{site}-r0.ferry")))
            )),
            "{out}"
        );
        assert!(out.contains("no images, no labels"), "{out}");
    }
    // site-b's update is format 3 (encrypted), site-a's format 2; HQ's round below merges both with its own key.
    for (site, version) in [("site-a", 2u16), ("site-b", 3)] {
        let b = std::fs::read(fed.path(&format!("usb/{site}-r0.ferry"))).unwrap();
        assert_eq!(u16::from_le_bytes([b[16], b[17]]), version, "{site}");
    }
    // A second run finds everything done and writes nothing.
    let before = snapshot(&fed.path("usb"));
    let out = fed.site_round("site-a");
    assert!(out.contains("round 0 is already imported"), "{out}");
    assert!(out.contains("2 train     already trained"), "{out}");
    assert!(out.contains("4 export    already on the stick"), "{out}");
    assert_eq!(snapshot(&fed.path("usb")), before);

    // HQ's status with the stick (remembered in hq/ferry.toml): both updates arrived.
    let st = fed.hq_status();
    assert_eq!(st["members"][0]["sent"], true, "{st}");

    // HQ: adds the two replies, merges, writes global-r1.
    let out = fed.hq_round();
    assert!(
        out.contains("added site-a's key") && out.contains("added site-b's key"),
        "{out}"
    );
    // The report lists contributors in bundle-hash order.
    assert!(out.contains("merged round 0 (fedavg): "), "{out}");
    assert!(
        out.contains("site-a (8 samples") && out.contains("site-b (8 samples"),
        "{out}"
    );
    assert!(
        out.contains("Carry ") && out.contains("usb/global-r1.ferry ("),
        "{out}"
    );

    // Round 1: each site picks global-r1 over global-r0 and says why.
    for site in ["site-a", "site-b"] {
        let o = client(&["round", "--state", p(&fed.path(site))]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let out = ok(o);
        assert!(out.contains("1 import    imported round 1"), "{out}");
        assert!(
            err.contains("skipped global-r0.ferry: round 0, older than round 1 chosen"),
            "{err}"
        );
        assert!(out.contains(&format!("usb/{site}-r1.ferry")), "{out}");
    }
    let out = fed.hq_round();
    assert!(out.contains("merged round 1"), "{out}");
    assert!(fed.path("usb/global-r2.ferry").is_file());

    // The ledger: two merged rounds, both sites in each.
    let st = fed.hq_status();
    assert_eq!(st["round"], 2, "{st}");
    let rounds = st["rounds"].as_array().unwrap();
    let merged: Vec<&Value> = rounds
        .iter()
        .filter(|r| r["round"].as_u64() > Some(0))
        .collect();
    assert_eq!(merged.len(), 2, "{st}");
    for r in merged {
        let mut sites: Vec<&str> = r["contributors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["site"].as_str().unwrap())
            .collect();
        sites.sort();
        assert_eq!(sites, ["site-a", "site-b"], "{st}");
    }
    // Run again: nothing for round 2 yet, HQ says whom it waits for.
    let out = fed.hq_round();
    assert!(
        out.contains("no update for round 2 on the stick yet"),
        "{out}"
    );
    assert!(out.contains("waiting for site-a, site-b"), "{out}");
    // And the site's audit log shows both exports.
    let log = ok(client(&["log", "--state", p(&fed.path("site-a"))]));
    assert_eq!(
        log.lines().filter(|l| l.contains("export")).count(),
        2,
        "{log}"
    );
}

#[test]
fn another_sites_key_is_refused_for_export() {
    let fed = Fed::new(&["site-a", "site-b"]);
    fed.enroll("site-a", 1);
    fed.enroll("site-b", 2);
    // site-b trains (and exports with its own key into a scratch folder, to prove the state is ready).
    let b = fed.path("site-b");
    let key_a = fed.path("site-a/keys/site-a.key");
    let scratch = fed.path("scratch");
    let o = client(&[
        "round",
        "--state",
        p(&b),
        "--key",
        p(&key_a),
        "--stick",
        p(&fed.path("usb")),
    ]);
    let err = refused("ferry-client", o);
    assert!(
        err.contains("is not this site's key: this state was enrolled as site-b"),
        "{err}"
    );
    assert!(!fed.path("usb/site-a-r0.ferry").exists() && !fed.path("usb/site-b-r0.ferry").exists());
    let err = refused(
        "ferry-client",
        client(&[
            "export",
            "--state",
            p(&b),
            "--key",
            p(&key_a),
            "--out",
            p(&scratch),
        ]),
    );
    assert!(err.contains("enrolled as site-b"), "{err}");
    assert!(!scratch.exists());
    // A key made elsewhere under site-b's own name is refused too.
    ok(client(&[
        "keygen",
        "--id",
        "site-b",
        "--out",
        p(&fed.path("other")),
    ]));
    let err = refused(
        "ferry-client",
        client(&[
            "export",
            "--state",
            p(&b),
            "--key",
            p(&fed.path("other/site-b.key")),
            "--out",
            p(&scratch),
        ]),
    );
    assert!(err.contains("not this site's key"), "{err}");
    // With its own key (from ferry.toml) it goes through.
    let out = ok(client(&[
        "export",
        "--state",
        p(&b),
        "--key",
        p(&fed.path("site-b/keys/site-b.key")),
        "--out",
        p(&scratch),
    ]));
    assert!(out.contains("site-b-r0.ferry"), "{out}");
}

#[test]
fn a_forged_or_foreign_kit_and_a_foreign_global_are_refused() {
    let fed = Fed::new(&["site-a"]);
    let kit = fed.path("usb/kit-site-a");
    let state = fed.path("site-a");

    // The wrong fingerprint: refused, nothing created.
    let err = refused(
        "ferry-client",
        client(&[
            "enroll",
            p(&kit),
            "--state",
            p(&state),
            "--hq-fingerprint",
            "0000 1111",
        ]),
    );
    assert!(err.contains("did not come from your HQ"), "{err}");
    assert!(!state.exists());

    // A kit altered on the way (another site id): HQ's signature no longer verifies.
    let forged = fed.path("forged");
    std::fs::create_dir(&forged).unwrap();
    for e in std::fs::read_dir(&kit).unwrap().flatten() {
        std::fs::copy(e.path(), forged.join(e.file_name())).unwrap();
    }
    let json = std::fs::read_to_string(forged.join("kit.json")).unwrap();
    std::fs::write(forged.join("kit.json"), json.replace("site-a", "site-z")).unwrap();
    let err = refused(
        "ferry-client",
        client(&["enroll", p(&forged), "--state", p(&state)]),
    );
    assert!(err.contains("signature does not verify"), "{err}");
    assert!(!state.exists());
    assert!(!forged.join("reply").exists());

    // A second federation (its own HQ) on the same stick: its kit enrols nothing into a state of this one,
    // and its global is passed over by this site's round.
    let other = tempfile::tempdir().unwrap();
    let ok_dir = |rel: &str| other.path().join(rel);
    ok(server(&[
        "keygen",
        "--id",
        "hq",
        "--out",
        p(&ok_dir("keys")),
    ]));
    ok(server(&[
        "init",
        "--key",
        p(&ok_dir("keys/hq.key")),
        "--arch",
        "plate-ctc",
        "--seed",
        "2",
        "--federation",
        "harbour",
        "--state",
        p(&ok_dir("hq")),
        "--out",
        p(&ok_dir("usb")),
    ]));
    ok(server(&[
        "enroll",
        "--state",
        p(&ok_dir("hq")),
        "--key",
        p(&ok_dir("keys/hq.key")),
        "--site",
        "site-a",
        "--out",
        p(&ok_dir("usb/kit-site-a")),
    ]));

    fed.enroll("site-a", 1);
    let before = snapshot(&state);
    let err = refused(
        "ferry-client",
        client(&["enroll", p(&ok_dir("usb/kit-site-a")), "--state", p(&state)]),
    );
    assert!(
        err.contains("already holds a site state (federation city, site site-a)"),
        "{err}"
    );
    assert_eq!(snapshot(&state), before);

    // Only the foreign global on the stick: the round refuses, saying why; the state is unchanged.
    let stick2 = fed.path("stick2");
    std::fs::create_dir(&stick2).unwrap();
    std::fs::copy(
        ok_dir("usb/global-r0.ferry"),
        stick2.join("global-r0.ferry"),
    )
    .unwrap();
    let err = refused(
        "ferry-client",
        client(&["round", "--state", p(&state), "--stick", p(&stick2)]),
    );
    assert!(
        err.contains("no global in") && err.contains("global-r0.ferry"),
        "{err}"
    );
    assert_eq!(snapshot(&state), before);
    // import of that file, and of that folder: refused too.
    let err = refused(
        "ferry-client",
        client(&[
            "import",
            "--state",
            p(&state),
            p(&stick2.join("global-r0.ferry")),
        ]),
    );
    assert!(err.contains("harbour") || err.contains("not"), "{err}");
    refused(
        "ferry-client",
        client(&["import", "--state", p(&state), p(&stick2)]),
    );
    assert_eq!(snapshot(&state), before);

    // Both globals on one stick: `import FOLDER` takes this federation's and says why it skipped the other.
    std::fs::copy(
        fed.path("usb/global-r0.ferry"),
        stick2.join("global-r0-city.ferry"),
    )
    .unwrap();
    let o = client(&["import", "--state", p(&state), p(&stick2)]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let out = ok(o);
    assert!(out.contains("imported round 0"), "{out}");
    assert!(
        err.contains("note: skipped") && err.contains("global-r0.ferry"),
        "{err}"
    );
}

#[test]
fn hq_refuses_a_round_with_an_update_from_a_site_that_is_not_a_member() {
    let fed = Fed::new(&["site-a", "site-b"]);
    for (s, seed) in [("site-a", 1), ("site-b", 2)] {
        fed.enroll(s, seed);
        fed.site_round(s);
    }
    // site-x, never enrolled, packs an update of round 0 from the global's own weights.
    let usb = fed.path("usb");
    ok(client(&[
        "keygen",
        "--id",
        "site-x",
        "--out",
        p(&fed.path("x")),
    ]));
    ok(client(&[
        "unpack",
        "--trust",
        p(&fed.path("keys/hq.pub")),
        p(&usb.join("global-r0.ferry")),
        "--out",
        p(&fed.path("x/w.safetensors")),
    ]));
    ok(client(&[
        "pack",
        "--key",
        p(&fed.path("x/site-x.key")),
        "--weights",
        p(&fed.path("x/w.safetensors")),
        "--samples",
        "8",
        "--base",
        p(&usb.join("global-r0.ferry")),
        "--trust",
        p(&fed.path("keys/hq.pub")),
        "--out",
        p(&usb),
    ]));
    let ledger = std::fs::read(fed.path("hq/ledger.json")).unwrap();
    let err = refused(
        "ferry-server",
        server(&["round", "--state", p(&fed.path("hq"))]),
    );
    assert!(
        err.contains("site-x-r0.ferry")
            && err.contains("site-x is not a member of federation city"),
        "{err}"
    );
    assert_eq!(std::fs::read(fed.path("hq/ledger.json")).unwrap(), ledger);
    assert!(!usb.join("global-r1.ferry").exists());
    // HQ's status names who sent and who is missing: site-x is not a member, so not listed.
    let out = ok(server(&["status", "--state", p(&fed.path("hq"))]));
    assert!(out.contains("every member's update is on"), "{out}");
    // Off the stick, the round merges the members.
    std::fs::remove_file(usb.join("site-x-r0.ferry")).unwrap();
    let out = fed.hq_round();
    assert!(out.contains("merged round 0"), "{out}");
}

#[test]
fn settings_show_where_they_came_from_and_warn_about_a_recipe_that_makes_no_sense() {
    let fed = Fed::new(&["site-a"]);
    fed.enroll("site-a", 1);
    let state = fed.path("site-a");
    let v: Value = serde_json::from_str(&ok(client(&[
        "config",
        "--state",
        p(&state),
        "--epochs",
        "3",
        "--json",
    ])))
    .unwrap();
    let row = |name: &str| {
        v["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {v}"))
    };
    assert_eq!(row("data")["value"], "plates:loose:8:1", "{v}");
    assert_eq!(row("data")["origin"], "file", "{v}");
    assert_eq!(row("train.epochs")["origin"], "flag", "{v}");
    assert_eq!(row("train.lr")["origin"], "default", "{v}");
    assert!(
        row("key")["value"]
            .as_str()
            .unwrap()
            .ends_with("keys/site-a.key"),
        "{v}"
    );

    // The default warm-up with 300 images: half a percent of the peak learning rate.
    let o = client(&[
        "config",
        "--state",
        p(&state),
        "--data",
        "plates:loose:300",
        "--batch",
        "64",
        "--warmup",
        "1000",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    ok(o);
    assert!(
        err.contains("ends at 0.5 % of the peak learning rate"),
        "{err}"
    );

    // A damaged ferry.toml is one line naming the file and the line.
    std::fs::write(
        state.join("ferry.toml"),
        "data = \"plates:loose:8\"\nepochs = 2\n",
    )
    .unwrap();
    let err = refused("ferry-client", client(&["round", "--state", p(&state)]));
    assert!(
        err.contains("ferry.toml") && err.contains("line 2"),
        "{err}"
    );

    // HQ: the file's strategy, a flag's min-sites, the default validity.
    std::fs::write(
        fed.path("hq/ferry.toml"),
        "key = \"../keys/hq.key\"\nstick = \"../usb\"\n[merge]\nstrategy = \"median\"\n",
    )
    .unwrap();
    let v: Value = serde_json::from_str(&ok(server(&[
        "config",
        "--state",
        p(&fed.path("hq")),
        "--min-sites",
        "3",
        "--json",
    ])))
    .unwrap();
    let s = v["settings"].as_array().unwrap();
    let get = |n: &str| s.iter().find(|r| r["name"] == n).unwrap().clone();
    assert_eq!(
        (
            get("merge.strategy")["value"].clone(),
            get("merge.strategy")["origin"].clone()
        ),
        ("median".into(), "file".into())
    );
    assert_eq!(get("merge.min-sites")["origin"], "flag");
    assert_eq!(get("merge.valid-days")["origin"], "default");
    assert!(
        v["warnings"][0]
            .as_str()
            .unwrap()
            .contains("min-sites is 3"),
        "{v}"
    );
}
