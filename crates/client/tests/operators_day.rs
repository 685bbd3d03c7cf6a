//! The operators' day (issue 16), through both real binaries on real files: HQ enrols two sites with kits on a
//! stick, each site enrols from its kit, and two whole rounds run with nothing but `enroll` and `round` (after
//! HQ's one-time keygen and init). Then the refusals: another site's key for export, a forged or foreign kit, a
//! global of another federation, an update from a site that is not a member, settings that make no sense.
//!
//! `ferry-server` is HQ's binary, in another package: it is taken from beside this package's binary, which
//! `cargo test --workspace` (scripts/test.sh) and `cargo test -p ferry-client -p ferry-server` build.

use std::path::{Path, PathBuf};

use ferry_testdata::cli::{arg as p, ok, refused, setting_row, snapshot};
use serde_json::Value;

mod tools;
use tools::{client, server};

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
    let row = |name: &str| setting_row(&v, name);
    assert_eq!(row("data")["value"], "plates:loose:8:1", "{v}");
    assert_eq!(row("data")["origin"], "file", "{v}");
    assert_eq!(row("train.epochs")["origin"], "flag", "{v}");
    assert_eq!(row("train.lr")["origin"], "default", "{v}");
    assert_eq!(row("train.augment")["origin"], "default", "{v}");
    assert!(
        row("train.augment")["value"]
            .as_str()
            .unwrap()
            .starts_with("plates for the CTC plate readers"),
        "{v}"
    );
    // ferry.toml's augmentation, then a flag over it; a spec that means nothing is refused in one line.
    let toml = state.join("ferry.toml");
    let saved = std::fs::read_to_string(&toml).unwrap();
    let with_augment = if saved.contains("[train]\n") {
        saved.replace("[train]\n", "[train]\naugment = \"shift=1\"\n")
    } else {
        format!("{saved}\n[train]\naugment = \"shift=1\"\n")
    };
    std::fs::write(&toml, &with_augment).unwrap();
    let v: Value =
        serde_json::from_str(&ok(client(&["config", "--state", p(&state), "--json"]))).unwrap();
    let aug = setting_row(&v, "train.augment");
    assert_eq!(
        (aug["value"].as_str(), aug["origin"].as_str()),
        (Some("rows=1,cols=1,contrast=0,brightness=0"), Some("file")),
        "{v}"
    );
    std::fs::write(&toml, with_augment.replace("shift=1", "zoom=2")).unwrap();
    let err = refused("ferry-client", client(&["config", "--state", p(&state)]));
    assert!(
        err.contains("[train] augment") && err.contains("unknown augmentation \"zoom\""),
        "{err}"
    );
    // The same as a flag: clap's usage error (exit 2), naming the flag and why.
    let o = client(&["config", "--state", p(&state), "--augment", "shift=-1"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--augment") && err.contains("whole number of pixels"),
        "{err}"
    );
    std::fs::write(&toml, saved).unwrap();
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
    let get = |n: &str| setting_row(&v, n);
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

#[test]
fn after_enrolment_train_eval_export_and_import_take_the_remembered_settings() {
    let fed = Fed::new(&["site-a"]);
    fed.enroll("site-a", 1);
    let state = fed.path("site-a");
    let toml = state.join("ferry.toml");

    // import: no --trust, no file: the kit's pin and the stick from ferry.toml.
    let out = ok(client(&["import", "--state", p(&state)]));
    assert!(out.contains("imported round 0"), "{out}");

    // train: data, batch and warm-up from ferry.toml (8 plates, 4, 2); --batch given overrides the file.
    let v: Value = serde_json::from_str(&ok(client(&[
        "train",
        "--state",
        p(&state),
        "--batch",
        "8",
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["samples"], 8, "{v}");
    assert_eq!(v["batch"], 8, "{v}");
    assert_eq!(v["warmup"], 2, "{v}");
    assert_eq!(v["epochs"], 1, "{v}");
    assert_eq!(v["steps"], 1, "{v}");
    // A CTC plate reader trains on augmented images unless told otherwise; a flag turns it off.
    assert_eq!(v["augment"], "plates", "{v}");
    let v: Value = serde_json::from_str(&ok(client(&[
        "train",
        "--state",
        p(&state),
        "--augment",
        "none",
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["augment"], "none", "{v}");

    // eval: eval-data from ferry.toml (4 plates); --data overrides it.
    let v: Value =
        serde_json::from_str(&ok(client(&["eval", "--state", p(&state), "--json"]))).unwrap();
    assert_eq!(v["samples"], 4, "{v}");
    let v: Value = serde_json::from_str(&ok(client(&[
        "eval",
        "--state",
        p(&state),
        "--data",
        "plates:loose:6:5",
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["samples"], 6, "{v}");

    // export: --out overrides the stick; the key is ferry.toml's.
    let scratch = fed.path("scratch");
    let out = ok(client(&[
        "export",
        "--state",
        p(&state),
        "--out",
        p(&scratch),
    ]));
    assert!(out.contains("site-a-r0.ferry"), "{out}");
    assert!(scratch.join("site-a-r0.ferry").is_file());
    assert!(!fed.path("usb/site-a-r0.ferry").exists());
    // Again with nothing but --again: key and stick from ferry.toml.
    let out = ok(client(&["export", "--state", p(&state), "--again"]));
    assert!(fed.path("usb/site-a-r0.ferry").is_file(), "{out}");

    // Without ferry.toml each command says which flag (or setting) is missing, and writes nothing.
    let saved = std::fs::read(&toml).unwrap();
    std::fs::remove_file(&toml).unwrap();
    let before = snapshot(&state);
    let err = refused("ferry-client", client(&["train", "--state", p(&state)]));
    assert!(
        err.contains("give --data SPEC") && err.contains("ferry.toml"),
        "{err}"
    );
    let err = refused(
        "ferry-client",
        client(&["export", "--state", p(&state), "--again"]),
    );
    assert!(err.contains("give --key FILE"), "{err}");
    let err = refused("ferry-client", client(&["import", "--state", p(&state)]));
    assert!(err.contains("which global?"), "{err}");
    assert_eq!(snapshot(&state), before);
    std::fs::write(&toml, saved).unwrap();
}

#[test]
fn hq_merge_takes_key_trust_and_strategy_from_ferry_toml_and_flags_override_it() {
    let fed = Fed::new(&["site-a", "site-b"]);
    for (site, seed) in [("site-a", 1), ("site-b", 2)] {
        fed.enroll(site, seed);
        fed.site_round(site);
    }
    let hq = fed.path("hq");
    for site in ["site-a", "site-b"] {
        ok(server(&[
            "enroll",
            "--state",
            p(&hq),
            "--add-reply",
            p(&fed.path(&format!("usb/kit-{site}"))),
        ]));
    }
    std::fs::write(
        hq.join("ferry.toml"),
        "key = \"../keys/hq.key\"\nstick = \"../usb\"\n[merge]\nstrategy = \"median\"\n",
    )
    .unwrap();
    let updates = [
        fed.path("usb/site-a-r0.ferry"),
        fed.path("usb/site-b-r0.ferry"),
    ];
    let mut args: Vec<String> = vec!["merge".into(), "--state".into(), p(&hq).into()];
    args.extend(updates.iter().map(|u| p(u).to_string()));

    // A flag overrides the file (and the default): three sites needed, two updates: refused, nothing written.
    let before = (snapshot(&hq), snapshot(&fed.path("usb")));
    let mut strict = args.clone();
    strict.extend(["--min-sites".into(), "3".into()]);
    let err = refused("ferry-server", server(&strict));
    assert!(err.contains('3'), "{err}");
    assert_eq!((snapshot(&hq), snapshot(&fed.path("usb"))), before);

    // No --key, no --trust, no --out, no --strategy: HQ's key and stick and the median from ferry.toml, the
    // members' keys trusted.
    let mut json = args.clone();
    json.push("--json".into());
    let v: Value = serde_json::from_str(&ok(server(&json))).unwrap();
    assert_eq!(v["round"], 1, "{v}");
    assert!(fed.path("usb/global-r1.ferry").is_file());
    let st = fed.hq_status();
    let r1 = st["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["round"] == 1)
        .unwrap()
        .clone();
    assert_eq!(r1["strategy"], "median", "{st}");

    // Without a member list or trust the merge says where trust comes from.
    let bare = fed.path("bare");
    ok(server(&[
        "init",
        "--key",
        p(&fed.path("keys/hq.key")),
        "--arch",
        "plate-ctc",
        "--seed",
        "1",
        "--federation",
        "city",
        "--state",
        p(&bare),
        "--out",
        p(&fed.path("bare-out")),
    ]));
    let mut a: Vec<String> = vec![
        "merge".into(),
        "--state".into(),
        p(&bare).into(),
        "--key".into(),
        p(&fed.path("keys/hq.key")).into(),
    ];
    a.extend(updates.iter().map(|u| p(u).to_string()));
    let err = refused("ferry-server", server(&a));
    assert!(
        err.contains("no site key to trust") && err.contains("--trust"),
        "{err}"
    );
}

#[test]
fn round_json_at_both_ends_names_the_steps_the_files_and_what_to_carry() {
    let fed = Fed::new(&["site-a", "site-b"]);
    for (site, seed) in [("site-a", 1), ("site-b", 2)] {
        fed.enroll(site, seed);
    }
    let round_json = |site: &str| -> Value {
        serde_json::from_str(&ok(client(&[
            "round",
            "--state",
            p(&fed.path(site)),
            "--json",
        ])))
        .unwrap()
    };
    let v = round_json("site-a");
    let steps: Vec<(&str, &str)> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("import", "done"),
            ("train", "done"),
            ("evaluate", "done"),
            ("export", "done")
        ],
        "{v}"
    );
    assert_eq!(v["site"], "site-a", "{v}");
    assert_eq!(v["round"], 0, "{v}");
    assert_eq!(v["steps"][1]["samples"], 8, "{v}");
    assert_eq!(v["steps"][2]["samples"], 4, "{v}");
    let file = fed.path("usb/site-a-r0.ferry");
    assert_eq!(v["written"], serde_json::json!([p(&file)]), "{v}");
    assert_eq!(v["carry"]["file"], p(&file), "{v}");
    assert_eq!(v["carry"]["to"], "HQ", "{v}");
    assert_eq!(
        v["carry"]["bytes"],
        std::fs::metadata(&file).unwrap().len(),
        "{v}"
    );
    assert!(v["carry"]["tensors"].as_u64().unwrap() > 0, "{v}");
    // Run again: every step already done, nothing written.
    let v = round_json("site-a");
    assert!(
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] != "done"),
        "{v}"
    );
    assert_eq!(v["written"], serde_json::json!([]), "{v}");
    assert_eq!(v["carry"]["file"], p(&file), "{v}");

    // HQ: nothing from site-b yet is fine (min-sites 1); the reply keys, the merge, what to carry.
    let v: Value = serde_json::from_str(&ok(server(&[
        "round",
        "--state",
        p(&fed.path("hq")),
        "--min-sites",
        "1",
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["merged"], true, "{v}");
    assert_eq!(v["round"], 0, "{v}");
    assert_eq!(v["new_round"], 1, "{v}");
    let added: Vec<&str> = v["keys_added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["site"].as_str().unwrap())
        .collect();
    assert_eq!(added, ["site-a", "site-b"], "{v}");
    assert_eq!(v["contributors"][0]["site"], "site-a", "{v}");
    assert_eq!(v["contributors"][0]["samples"], 8, "{v}");
    assert_eq!(v["waiting"], serde_json::json!(["site-b"]), "{v}");
    let global = fed.path("usb/global-r1.ferry");
    assert!(global.is_file());
    // HQ's stick is `../usb` relative to hq/ (its ferry.toml), so compare the files themselves.
    let carried = PathBuf::from(v["carry"]["files"][0].as_str().unwrap());
    assert_eq!(
        carried.canonicalize().unwrap(),
        global.canonicalize().unwrap(),
        "{v}"
    );
    assert_eq!(v["written"], v["carry"]["files"], "{v}");
    assert_eq!(v["carry"]["to"], "every site", "{v}");
    // Nothing new: merged false, nothing to carry (the global is on the stick already).
    let v: Value = serde_json::from_str(&ok(server(&[
        "round",
        "--state",
        p(&fed.path("hq")),
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["merged"], false, "{v}");
    assert_eq!(v["round"], 1, "{v}");
    assert_eq!(v["carry"], Value::Null, "{v}");
    assert_eq!(v["waiting"], serde_json::json!(["site-a", "site-b"]), "{v}");
}

#[test]
fn a_root_kit_pins_the_root_and_a_new_hq_key_is_accepted_only_with_a_list_it_signed() {
    let dir = tempfile::tempdir().unwrap();
    let path = |rel: &str| dir.path().join(rel);
    let keys = path("keys");
    ok(server(&["keygen", "--id", "hq", "--out", p(&keys)]));
    ok(server(&[
        "keygen",
        "--root",
        "--id",
        "root",
        "--out",
        p(&keys),
    ]));
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
        p(&path("hq")),
        "--out",
        p(&path("usb")),
    ]));
    let sign_list = |serial: &str, hq_pub: &Path, root_key: &Path, out: &Path| {
        ok(server(&[
            "sign-hq-keys",
            "--root-key",
            p(root_key),
            "--hq",
            p(hq_pub),
            "--federation",
            "city",
            "--serial",
            serial,
            "--out",
            p(out),
        ]))
    };
    sign_list(
        "1",
        &keys.join("hq.pub"),
        &keys.join("root.key"),
        &keys.join("hq-keys-1.ferry-keys"),
    );
    // HQ remembers its root and the current list in ferry.toml; the kit carries both.
    std::fs::write(
        path("hq/ferry.toml"),
        "key = \"../keys/hq.key\"\nstick = \"../usb\"\nroot = \"../keys/root.pub\"\nhq-keys = \"../keys/hq-keys-1.ferry-keys\"\n",
    )
    .unwrap();
    let root_fp = {
        let v: Value = serde_json::from_str(&ok(client(&[
            "fingerprint",
            "--json",
            p(&keys.join("root.pub")),
        ])))
        .unwrap();
        v["fingerprint"].as_str().unwrap().to_string()
    };
    let out = ok(server(&[
        "enroll",
        "--state",
        p(&path("hq")),
        "--site",
        "site-a",
    ]));
    assert!(
        out.contains(&format!("root key fingerprint {root_fp}")),
        "{out}"
    );
    let kit = path("usb/kit-site-a");
    assert_eq!(
        std::fs::read(kit.join("hq-keys-1.ferry-keys")).unwrap(),
        std::fs::read(keys.join("hq-keys-1.ferry-keys")).unwrap()
    );
    assert!(kit.join("root.pub").is_file());
    let readme = std::fs::read_to_string(kit.join("README.txt")).unwrap();
    assert!(readme.contains(&root_fp), "{readme}");

    // The site enrols, checking the root's fingerprint, and pins the root.
    let state = path("site-a");
    let out = ok(client(&[
        "enroll",
        p(&kit),
        "--state",
        p(&state),
        "--hq-fingerprint",
        &root_fp,
        "--data",
        "plates:loose:8:1",
        "--batch",
        "4",
        "--warmup",
        "2",
    ]));
    assert!(out.contains("this site pins the root"), "{out}");
    let st: Value =
        serde_json::from_str(&ok(client(&["status", "--state", p(&state), "--json"]))).unwrap();
    assert!(st["pin"]["root"].is_object(), "{st}");
    // HQ's round puts the list beside the global for the sites.
    ok(server(&["round", "--state", p(&path("hq"))]));
    assert!(path("usb/hq-keys-1.ferry-keys").is_file());
    let out = fed_round(&state, None);
    assert!(out.contains("1 import    imported round 0"), "{out}");

    // HQ changes its key (the old one may have leaked): a new key, the root's list naming it, and ferry.toml
    // pointing at both. HQ's next round, from the same state, verifies its stored round 0 (signed by the old key)
    // and signs round 1 with the new key.
    let keys2 = path("keys2");
    ok(server(&["keygen", "--id", "hq-2027", "--out", p(&keys2)]));
    sign_list(
        "2",
        &keys2.join("hq-2027.pub"),
        &keys.join("root.key"),
        &keys.join("hq-keys-2.ferry-keys"),
    );
    std::fs::write(
        path("hq/ferry.toml"),
        "key = \"../keys2/hq-2027.key\"\nstick = \"../usb\"\nroot = \"../keys/root.pub\"\nhq-keys = \"../keys/hq-keys-2.ferry-keys\"\n[merge]\nmin-sites = 1\n",
    )
    .unwrap();
    let out = ok(server(&["round", "--state", p(&path("hq"))]));
    assert!(path("usb/global-r1.ferry").is_file(), "{out}");
    assert!(path("usb/hq-keys-2.ferry-keys").is_file(), "{out}");
    let ring_of = |pubkey: &Path| {
        let mut ring = ferry_bundle::Keyring::new();
        ring.add(ferry_bundle::PublicKey::read(pubkey).unwrap())
            .unwrap();
        ring
    };
    ferry_bundle::open_file(
        &path("usb/global-r1.ferry"),
        &ring_of(&keys2.join("hq-2027.pub")),
    )
    .unwrap();
    assert!(
        ferry_bundle::open_file(&path("usb/global-r1.ferry"), &ring_of(&keys.join("hq.pub")))
            .is_err(),
        "round 1 must be signed by the new key only"
    );

    // The new global on a stick without the root's new list: refused.
    let usb2 = path("usb2");
    std::fs::create_dir_all(&usb2).unwrap();
    std::fs::copy(path("usb/global-r1.ferry"), usb2.join("global-r1.ferry")).unwrap();
    let before = snapshot(&state);
    let o = client(&["round", "--state", p(&state), "--stick", p(&usb2)]);
    let err = refused("ferry-client", o);
    assert!(err.contains("global-r1.ferry"), "{err}");
    assert_eq!(snapshot(&state), before);

    // A list naming the new key but signed by another root: passed over with a note, still refused.
    ok(server(&[
        "keygen",
        "--root",
        "--id",
        "root",
        "--out",
        p(&path("rogue")),
    ]));
    sign_list(
        "5",
        &keys2.join("hq-2027.pub"),
        &path("rogue/root.key"),
        &usb2.join("hq-keys-5.ferry-keys"),
    );
    let o = client(&["round", "--state", p(&state), "--stick", p(&usb2)]);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    refused("ferry-client", o);
    assert!(stderr.contains("skipped hq-keys-5.ferry-keys"), "{stderr}");
    assert_eq!(snapshot(&state), before);

    // The stick HQ wrote, with the root's list beside the global: accepted, the list stored.
    let out = fed_round(&state, None);
    assert!(out.contains("1 import    imported round 1"), "{out}");
    assert_eq!(
        std::fs::read(state.join("hq-keys.ferry-keys")).unwrap(),
        std::fs::read(keys.join("hq-keys-2.ferry-keys")).unwrap()
    );
}

/// `ferry-client round --state STATE [--stick STICK]`, stdout.
fn fed_round(state: &Path, stick: Option<&Path>) -> String {
    let mut a = vec!["round".to_string(), "--state".into(), p(state).into()];
    if let Some(s) = stick {
        a.extend(["--stick".into(), p(s).into()]);
    }
    ok(client(&a))
}
