//! The Fisher-weighted merge through both real binaries on real files (issue 14): two sites train a real
//! plate-ctc model, take its Fisher estimate (`ferry-client fisher`), ship it with the update (`export
//! --fisher`), and HQ merges with `--strategy fisher`. The update unpacks to the plain model; the global carries
//! no Fisher tensor. Then the refusals, each one line with nothing written: an update without an estimate under
//! `--strategy fisher`, `export --fisher` with none taken, a PyTorch site's estimate of the wrong dtype.
//!
//! `ferry-server` is taken from beside this package's binary, which `cargo test --workspace` builds.

use std::path::{Path, PathBuf};
use std::process::Output;

use ferry_bundle::{Dtype, Keyring, Payload, TensorRef};
use ferry_testdata::cli::{arg as p, json, ok, refused, snapshot};

mod tools;
use tools::{client, server};

struct Fed {
    dir: tempfile::TempDir,
}

impl Fed {
    /// HQ (keys in `keys/`, state `hq/`, round 0 of plate-ctc in `usb/`) and sites `site-a`, `site-b` with their
    /// keys in `keys/`, each having imported round 0 and trained one epoch on 8 plates of its own.
    fn trained() -> Fed {
        let fed = Fed {
            dir: tempfile::tempdir().unwrap(),
        };
        let keys = fed.path("keys");
        ok(server(&["keygen", "--id", "hq", "--out", p(&keys)]));
        for s in ["site-a", "site-b"] {
            ok(client(&["keygen", "--id", s, "--out", p(&keys)]));
        }
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
        for (i, s) in ["site-a", "site-b"].iter().enumerate() {
            ok(client(&[
                "import",
                "--federation",
                "city",
                "--trust",
                p(&keys.join("hq.pub")),
                "--state",
                p(&fed.path(s)),
                p(&fed.path("usb/global-r0.ferry")),
            ]));
            ok(client(&[
                "train",
                "--state",
                p(&fed.path(s)),
                "--data",
                &fed.data(i),
                "--batch",
                "4",
                "--warmup",
                "2",
            ]));
        }
        fed
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn data(&self, i: usize) -> String {
        format!("plates:loose:8:{}", 10 + i)
    }

    fn fisher(&self, i: usize) -> Output {
        let s = ["site-a", "site-b"][i];
        client(&[
            "fisher",
            "--state",
            p(&self.path(s)),
            "--data",
            &self.data(i),
            "--batch",
            "4",
            "--json",
        ])
    }

    fn export(&self, i: usize, fisher: bool) -> Output {
        let s = ["site-a", "site-b"][i];
        let mut args = vec![
            "export".to_string(),
            "--state".into(),
            p(&self.path(s)).into(),
            "--key".into(),
            p(&self.path(&format!("keys/{s}.key"))).into(),
            "--out".into(),
            p(&self.path(&format!("out-{s}"))).into(),
            "--json".into(),
        ];
        if fisher {
            args.push("--fisher".into());
        }
        client(&args)
    }

    fn merge(&self, files: &[&Path]) -> Output {
        let mut args: Vec<String> = [
            "merge",
            "--key",
            p(&self.path("keys/hq.key")),
            "--trust",
            p(&self.path("keys")),
            "--state",
            p(&self.path("hq")),
            "--out",
            p(&self.path("usb")),
            "--strategy",
            "fisher",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(files.iter().map(|f| p(f).to_string()));
        server(&args)
    }
}

fn ring(fed: &Fed) -> Keyring {
    let mut ring = Keyring::new();
    for k in ["hq", "site-a", "site-b"] {
        ring.add(ferry_bundle::PublicKey::read(&fed.path(&format!("keys/{k}.pub"))).unwrap())
            .unwrap();
    }
    ring
}

#[test]
fn sites_ship_fisher_estimates_and_hq_merges_by_them() {
    let fed = Fed::trained();

    // export --fisher before any estimate: refused, nothing written.
    let before = snapshot(&fed.path("site-a"));
    let err = refused("ferry-client", fed.export(0, true));
    assert!(
        err.contains("no Fisher estimate") && err.contains("ferry-client fisher"),
        "{err}"
    );
    assert_eq!(snapshot(&fed.path("site-a")), before);
    assert!(!fed.path("out-site-a").exists());

    let mut updates = Vec::new();
    for i in 0..2 {
        let v = json(fed.fisher(i));
        assert_eq!(v["samples"], 8, "{v}");
        assert_eq!(v["batches"], 2, "{v}");
        let u = json(fed.export(i, true));
        updates.push(PathBuf::from(u["file"].as_str().unwrap()));
    }

    // The update carries one Fisher tensor per trainable tensor, signed and hashed like the model.
    let global = ferry_bundle::open_file(&fed.path("usb/global-r0.ferry"), &ring(&fed)).unwrap();
    let update = ferry_bundle::open_file(&updates[0], &ring(&fed)).unwrap();
    let names: Vec<&str> = update
        .manifest
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let fisher: Vec<&&str> = names
        .iter()
        .filter(|n| n.starts_with("ferry.fisher/"))
        .collect();
    assert!(!fisher.is_empty());
    assert_eq!(fisher.len() + global.manifest.tensors.len(), names.len());
    for f in &fisher {
        let model = f.strip_prefix("ferry.fisher/").unwrap();
        assert!(names.contains(&model), "{f}");
        assert!(
            !model.contains("running_"),
            "no estimate for a BatchNorm statistic: {f}"
        );
    }
    let est = Payload::from_safetensors(update.payload()).unwrap();
    let (_, values) = ferry_bundle::fisher::split(&est).unwrap();
    assert!(values
        .values()
        .flatten()
        .all(|v| v.is_finite() && *v >= 0.0));
    assert!(values.values().flatten().any(|v| *v > 0.0));

    // unpack gives the model alone: the same tensors as the global, loadable with strict=True.
    let unpacked = fed.path("a.safetensors");
    let out = ok(client(&[
        "unpack",
        "--trust",
        p(&fed.path("keys")),
        p(&updates[0]),
        "--out",
        p(&unpacked),
    ]));
    assert!(out.contains("Fisher tensors left out"), "{out}");
    let model = Payload::from_safetensors(&std::fs::read(&unpacked).unwrap()).unwrap();
    assert_eq!(model.fingerprint(), global.manifest.model_fingerprint);

    // HQ merges by the estimates; the global holds the model only.
    let v = json(fed.merge(&[&updates[0], &updates[1]]));
    assert!(
        v.to_string().contains("fisher weights=samples bound=10"),
        "{v}"
    );
    let r1 = ferry_bundle::open_file(&fed.path("usb/global-r1.ferry"), &ring(&fed)).unwrap();
    assert_eq!(
        r1.manifest.model_fingerprint,
        global.manifest.model_fingerprint
    );
    assert!(r1
        .manifest
        .strategy
        .as_deref()
        .is_some_and(|s| s.starts_with("fisher ")));

    // An operator's site: `fisher = true` in ferry.toml makes `round` take the estimate and ship it.
    std::fs::write(
        fed.path("site-a/ferry.toml"),
        "key = \"../keys/site-a.key\"\nstick = \"../usb\"\ndata = \"plates:loose:8:10\"\nfisher = true\n\n[train]\nbatch = 4\nwarmup = 2\n",
    )
    .unwrap();
    let config = ok(client(&["config", "--state", p(&fed.path("site-a"))]));
    assert!(
        config
            .lines()
            .any(|l| l.contains("fisher") && l.contains("true") && l.contains("ferry.toml")),
        "{config}"
    );
    let out = ok(client(&["round", "--state", p(&fed.path("site-a"))]));
    assert!(out.contains("Fisher estimate"), "{out}");
    let u2 = ferry_bundle::open_file(&fed.path("usb/site-a-r1.ferry"), &ring(&fed)).unwrap();
    assert_eq!(u2.manifest.round, 1);
    assert!(u2
        .manifest
        .tensors
        .iter()
        .any(|t| t.name.starts_with("ferry.fisher/")));
}

#[test]
fn fisher_merge_refuses_an_update_without_an_estimate_and_writes_nothing() {
    let fed = Fed::trained();
    json(fed.fisher(0));
    let a = PathBuf::from(json(fed.export(0, true))["file"].as_str().unwrap());
    let b = PathBuf::from(json(fed.export(1, false))["file"].as_str().unwrap());
    let hq = snapshot(&fed.path("hq"));
    let usb = snapshot(&fed.path("usb"));
    let err = refused("ferry-server", fed.merge(&[&a, &b]));
    assert!(
        err.contains("site-b")
            && err.contains("no Fisher estimate")
            && err.contains("export --fisher"),
        "{err}"
    );
    assert_eq!(snapshot(&fed.path("hq")), hq);
    assert_eq!(snapshot(&fed.path("usb")), usb);

    // A PyTorch site packs its own estimate; one in F16 is refused by name, one in F32 ships.
    let weights = fed.path("b.safetensors");
    ok(client(&[
        "unpack",
        "--trust",
        p(&fed.path("keys")),
        p(&b),
        "--out",
        p(&weights),
    ]));
    let model = Payload::from_safetensors(&std::fs::read(&weights).unwrap()).unwrap();
    let first = model.metas()[0].clone();
    let n = first.numel().unwrap();
    let write = |dtype: Dtype, size: usize| {
        let data = vec![0u8; n * size];
        let f = Payload::from_tensors(&[TensorRef {
            name: &first.name,
            dtype,
            shape: &first.shape,
            data: &data,
        }])
        .unwrap();
        let path = fed.path(&format!("fisher-{size}.safetensors"));
        std::fs::write(&path, f.bytes()).unwrap();
        path
    };
    let pack = |fisher: &Path| {
        client(&[
            "pack",
            "--key",
            p(&fed.path("keys/site-b.key")),
            "--weights",
            p(&weights),
            "--samples",
            "8",
            "--base",
            p(&fed.path("usb/global-r0.ferry")),
            "--trust",
            p(&fed.path("keys/hq.pub")),
            "--out",
            p(&fed.path("packed")),
            "--fisher",
            p(fisher),
            "--json",
        ])
    };
    let err = refused("ferry-client", pack(&write(Dtype::F16, 2)));
    assert!(err.contains("F16") && err.contains("F32"), "{err}");
    assert!(!fed.path("packed").exists());
    let v = json(pack(&write(Dtype::F32, 4)));
    let tensors = v["manifest"]["tensors"].as_array().unwrap();
    assert!(tensors
        .iter()
        .any(|t| t["name"] == format!("ferry.fisher/{}", first.name)));
}
