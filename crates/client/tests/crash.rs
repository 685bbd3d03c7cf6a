//! Crash safety and locking of `ferry-client import` and `export`.
//!
//! Each command is killed (`std::process::abort`, through the `FERRY_FAILPOINT` / `FERRY_FAILPOINT_TORN` test hook
//! in `ferry_bundle::fsutil`) right before each of its durable steps in turn, on a fresh copy of the state. After
//! every crash the test checks that
//! (a) no file under a final name is partial: every `.ferry` file on the stick verifies, every weights file in the
//!     state matches its hash, and only `.ferry-tmp-*` files may be left over;
//! (b) the state is the old one or the new one (`ferry-client status --json` works and names one of the two);
//! (c) the documented recovery works: re-running `import` completes the import (and repairs `current.safetensors`
//!     when the crash came after the commit); re-running `export` either completes it or, when the crash came after
//!     the bundle reached its final name, refuses to overwrite it, and that file is the complete, verified export.
//!
//! The recovery story is written down in `docs/threat-model.md` ("Crash safety").
//!
//! It also checks that a second process cannot change a state another one holds, and that a full or read-only
//! stick gives a clean error with nothing written (on a small tmpfs, mounted in a private mount namespace; as a
//! normal user, inside an unprivileged user namespace, so the test runs without root and never skips).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_bundle::fsutil::DirLock;
use ferry_bundle::{
    open, open_file, seal, sha256_hex, Bundle, BundleKind, Contributor, Draft, Dtype, Keyring,
    Limits, Payload, Role, SecretKey, TensorRef,
};
use ferry_site::{ImportPolicy, ImportTrust, LocalRun, SiteState};
use serde_json::Value;

const SIGABRT: i32 = 6;
/// Give up counting steps past this (a command that never completes under the hook).
const MAX_STEPS: usize = 100;
/// Durable steps, as measured (also in docs/threat-model.md).
const IMPORT_STEPS: usize = 9;
const EXPORT_STEPS: usize = 6;

fn hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
}

fn site() -> SecretKey {
    SecretKey::from_seed(Role::Site, "site-a", [2; 32])
}

/// A one-tensor model of `n` f32 values: `v + i` when `noisy` is false, incompressible noise in [1, 2) otherwise.
fn payload(v: f32, n: usize, noisy: bool) -> Payload {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ v.to_bits() as u64;
    let data: Vec<u8> = (0..n)
        .flat_map(|i| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let f = if noisy {
                f32::from_bits(((x >> 41) as u32) | 0x3f80_0000)
            } else {
                v + i as f32
            };
            f.to_le_bytes()
        })
        .collect();
    Payload::from_tensors(&[TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[n],
        data: &data,
    }])
    .unwrap()
}

fn hq_ring() -> Keyring {
    let mut ring = Keyring::new();
    ring.add(hq().public()).unwrap();
    ring
}

fn site_ring() -> Keyring {
    let mut ring = Keyring::new();
    ring.add(site().public()).unwrap();
    ring
}

/// A global of `round` after `prev`, written to `path`.
fn global(round: u64, prev: Option<&str>, p: &Payload, path: &Path) -> Bundle {
    let mut d = Draft::initial("city", Some("plate-cnn".into()));
    d.round = round;
    d.base = prev.map(str::to_string);
    if round > 0 {
        d.strategy = Some("fedavg".into());
        d.contributors = vec![Contributor {
            bundle: "a".repeat(64),
            site: "site-a".into(),
            samples: 10,
        }];
    }
    let s = seal(d, p, &hq(), 3).unwrap();
    std::fs::write(path, &s.bytes).unwrap();
    open(&s.bytes, &hq_ring(), &Limits::default()).unwrap()
}

/// Keys, globals r0 and r1, and a state template that holds r0 and a local model trained from it.
struct Fixture {
    root: tempfile::TempDir,
    g0: Bundle,
    g1: Bundle,
    local: Vec<u8>,
    local_rec: Value,
}

impl Fixture {
    fn new(local_elems: usize, noisy: bool) -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let keys = root.path().join("keys");
        hq().write_pair(&keys).unwrap();
        site().write_pair(&keys).unwrap();
        let inp = root.path().join("in");
        std::fs::create_dir(&inp).unwrap();
        let g0 = global(
            0,
            None,
            &payload(0.0, local_elems, noisy),
            &inp.join("global-r0.ferry"),
        );
        let g1 = global(
            1,
            Some(&g0.hash),
            &payload(1.0, local_elems, noisy),
            &inp.join("global-r1.ferry"),
        );
        let local = payload(0.5, local_elems, noisy).bytes().to_vec();
        let state = SiteState::at(&root.path().join("template"));
        let policy = ImportPolicy::default();
        let trust = ImportTrust {
            keys: hq_ring(),
            federation: Some("city".into()),
            ..ImportTrust::default()
        };
        let prepared = state.prepare_import(&trust, &policy).unwrap();
        state
            .import_new(&g0, "global-r0.ferry", &policy, &prepared)
            .unwrap();
        let lock = state.lock().unwrap();
        let run = LocalRun {
            samples: 10,
            epochs: 1,
            steps: 1,
        };
        state.record_local(&lock, &local, run).unwrap();
        drop(lock);
        let local_rec = serde_json::to_value(state.local().unwrap().unwrap()).unwrap();
        Fixture {
            root,
            g0,
            g1,
            local,
            local_rec,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    /// A fresh copy of the template state under `cases/<name>/state`, with an empty `out/` beside it.
    fn case(&self, name: &str) -> Case {
        let dir = self.path("cases").join(name);
        copy_dir(&self.path("template"), &dir.join("state"));
        std::fs::create_dir_all(dir.join("out")).unwrap();
        Case {
            state: dir.join("state"),
            out: dir.join("out"),
        }
    }

    fn import_args(&self, c: &Case) -> Vec<OsString> {
        vec![
            "import".into(),
            "--trust".into(),
            self.path("keys/hq.pub").into(),
            "--state".into(),
            c.state.clone().into(),
            self.path("in/global-r1.ferry").into(),
        ]
    }

    fn export_args(&self, c: &Case) -> Vec<OsString> {
        vec![
            "export".into(),
            "--state".into(),
            c.state.clone().into(),
            "--key".into(),
            self.path("keys/site-a.key").into(),
            "--out".into(),
            c.out.clone().into(),
        ]
    }
}

struct Case {
    state: PathBuf,
    out: PathBuf,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Every file under `dir` (but the lock file) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else if p.file_name().is_some_and(|n| n != "lock") {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn is_temp(name: &str) -> bool {
    name.starts_with(".ferry-tmp-")
}

fn client(args: &[OsString], failpoint: Option<(&str, usize)>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-client"));
    cmd.args(args)
        .env_remove("FERRY_FAILPOINT")
        .env_remove("FERRY_FAILPOINT_TORN");
    if let Some((var, n)) = failpoint {
        cmd.env(var, n.to_string());
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run ferry-client: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {:?} (signal {:?})\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        o.status.signal(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A clean failure: exit code 1 (not a crash) with `needle` in the message.
#[track_caller]
fn refused(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(needle), "expected {needle:?} in: {}", text(o));
}

fn status(state: &Path) -> Value {
    let o = client(
        &[
            "status".into(),
            "--json".into(),
            "--state".into(),
            state.into(),
        ],
        None,
    );
    assert!(o.status.success(), "status failed: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Run the command made by `args` with the failpoint `var` at steps 1, 2, ... on a fresh case each time, calling
/// `check` after each crash, until the command completes. Returns its number of durable steps.
fn crash_each_step(
    fx: &Fixture,
    label: &str,
    var: &str,
    args: impl Fn(&Case) -> Vec<OsString>,
    check: impl Fn(&Case, usize),
) -> usize {
    for n in 1..=MAX_STEPS {
        let case = fx.case(&format!("{label}-{var}-{n}"));
        let o = client(&args(&case), Some((var, n)));
        if o.status.success() {
            return n - 1;
        }
        assert_eq!(
            o.status.signal(),
            Some(SIGABRT),
            "{label} with {var}={n} should have been killed at the failpoint: {}",
            text(&o)
        );
        check(&case, n);
    }
    panic!("{label} did not complete within {MAX_STEPS} failpoints");
}

/// (a) for the state: every weights file matches its name; nothing but temp files and the known names.
#[track_caller]
fn check_state_files(state: &Path, ctx: &str) {
    for name in names(&state.join("weights")) {
        if is_temp(&name) {
            continue;
        }
        let sha = name
            .strip_suffix(".safetensors")
            .unwrap_or_else(|| panic!("{ctx}: unexpected file weights/{name}"));
        let bytes = std::fs::read(state.join("weights").join(&name)).unwrap();
        assert_eq!(sha256_hex(&bytes), sha, "{ctx}: weights/{name} is partial");
    }
    for name in names(state) {
        assert!(
            is_temp(&name)
                || [
                    "global.json",
                    "local.json",
                    "pin.json",
                    "current.safetensors",
                    "weights",
                    "lock",
                    // Trust the first import pins (issue 15): written before the record, kept on a retry.
                    "pin.json",
                    "revocations",
                    "hq-keys.ferry-keys",
                    "audit.jsonl",
                ]
                .contains(&name.as_str()),
            "{ctx}: unexpected file {name} in the state"
        );
    }
}

fn hash_of(v: &Value) -> Option<&str> {
    v.get("hash").and_then(Value::as_str)
}

#[test]
fn import_crash_at_every_step_leaves_old_or_new_state_and_the_next_import_completes() {
    let fx = Fixture::new(16, false);
    let (old, new) = (fx.g0.hash.as_str(), fx.g1.hash.as_str());
    let mut counts = Vec::new();
    for var in ["FERRY_FAILPOINT", "FERRY_FAILPOINT_TORN"] {
        let stale_model = std::cell::Cell::new(0);
        let steps = crash_each_step(
            &fx,
            "import",
            var,
            |c| fx.import_args(c),
            |c, n| {
                let ctx = format!("import crashed by {var}={n}");
                check_state_files(&c.state, &ctx);
                // (b) old or new, never mixed.
                let s = status(&c.state);
                assert_eq!(s["local"], fx.local_rec, "{ctx}: local model changed");
                let held = hash_of(&s["global"]).unwrap().to_string();
                let model = std::fs::read(c.state.join("current.safetensors")).unwrap();
                if held == old {
                    // The previous record may already name the global held (it is written before the commit).
                    let prev = hash_of(&s["previous"]);
                    assert!(
                        prev.is_none() || prev == Some(old),
                        "{ctx}: previous {prev:?}"
                    );
                    assert_eq!(
                        model,
                        fx.g0.payload(),
                        "{ctx}: model replaced before the commit"
                    );
                } else {
                    assert_eq!(held, new, "{ctx}: a third global");
                    assert_eq!(hash_of(&s["previous"]), Some(old), "{ctx}");
                    // Between the commit and the refresh of current.safetensors, the deployed copy is the old one;
                    // the next import repairs it.
                    if model != fx.g1.payload() {
                        assert_eq!(model, fx.g0.payload(), "{ctx}: deployed model is torn");
                        stale_model.set(stale_model.get() + 1);
                    }
                }
                // (c) the next import completes it.
                let o = client(&fx.import_args(c), None);
                assert!(o.status.success(), "{ctx}: re-import failed: {}", text(&o));
                if held == new {
                    assert!(
                        String::from_utf8_lossy(&o.stdout).contains("already current"),
                        "{ctx}: {}",
                        text(&o)
                    );
                }
                let s = status(&c.state);
                assert_eq!(hash_of(&s["global"]), Some(new), "{ctx}");
                assert_eq!(hash_of(&s["previous"]), Some(old), "{ctx}");
                assert_eq!(s["local"], fx.local_rec, "{ctx}");
                assert_eq!(
                    std::fs::read(c.state.join("current.safetensors")).unwrap(),
                    fx.g1.payload(),
                    "{ctx}: deployed model not repaired"
                );
                check_state_files(&c.state, &ctx);
                let kept: BTreeSet<String> = names(&c.state.join("weights"))
                    .into_iter()
                    .filter(|n| !is_temp(n))
                    .collect();
                let want: BTreeSet<String> = [
                    sha256_hex(fx.g0.payload()),
                    sha256_hex(fx.g1.payload()),
                    sha256_hex(&fx.local),
                ]
                .iter()
                .map(|h| format!("{h}.safetensors"))
                .collect();
                assert_eq!(kept, want, "{ctx}: weights left after the re-import");
            },
        );
        eprintln!(
            "import: {steps} durable steps; {var}: current.safetensors stale (repaired by re-import) after {} crash(es)",
            stale_model.get()
        );
        assert_eq!(
            stale_model.get(),
            3,
            "{var}: crashes between the commit and the model refresh"
        );
        counts.push(steps);
    }
    assert_eq!(
        counts,
        [IMPORT_STEPS, IMPORT_STEPS],
        "import's durable steps changed: update IMPORT_STEPS and docs/threat-model.md"
    );
}

/// (a) for the stick: nothing but temp files and a complete, verified `site-a-r0.ferry` that is this export.
/// Returns the export's bundle hash if it is there.
#[track_caller]
fn check_stick(fx: &Fixture, out: &Path, ctx: &str) -> Option<String> {
    let mut found = None;
    for name in names(out) {
        if is_temp(&name) {
            continue;
        }
        assert_eq!(
            name, "site-a-r0.ferry",
            "{ctx}: unexpected file on the stick"
        );
        let b = open_file(&out.join(&name), &site_ring())
            .unwrap_or_else(|e| panic!("{ctx}: {name} is on the stick but does not verify: {e}"));
        assert_eq!(b.manifest.kind, BundleKind::Update, "{ctx}");
        assert_eq!(b.manifest.round, 0, "{ctx}");
        assert_eq!(
            b.manifest.base.as_deref(),
            Some(fx.g0.hash.as_str()),
            "{ctx}"
        );
        assert_eq!(
            b.manifest.site.as_ref().map(|s| (s.id.as_str(), s.samples)),
            Some(("site-a", 10)),
            "{ctx}"
        );
        assert_eq!(
            b.payload(),
            fx.local,
            "{ctx}: the export holds other weights"
        );
        found = Some(b.hash);
    }
    found
}

#[test]
fn export_crash_at_every_step_never_leaves_a_partial_bundle_and_recovery_is_documented() {
    let fx = Fixture::new(16, false);
    let mut counts = Vec::new();
    for var in ["FERRY_FAILPOINT", "FERRY_FAILPOINT_TORN"] {
        let on_stick = std::cell::Cell::new(0);
        let steps = crash_each_step(
            &fx,
            "export",
            var,
            |c| fx.export_args(c),
            |c, n| {
                let ctx = format!("export crashed by {var}={n}");
                let written = check_stick(&fx, &c.out, &ctx);
                check_state_files(&c.state, &ctx);
                // (b) the global is untouched; the local model is marked exported only once the bundle is on the
                // stick, and then as exactly that bundle.
                let s = status(&c.state);
                assert_eq!(hash_of(&s["global"]), Some(fx.g0.hash.as_str()), "{ctx}");
                let mut local = s["local"].clone();
                let exported = local["exported"].take();
                let mut want = fx.local_rec.clone();
                want["exported"] = Value::Null;
                assert_eq!(local, want, "{ctx}: local record changed");
                if let Some(h) = exported.as_str() {
                    assert_eq!(
                        Some(h),
                        written.as_deref(),
                        "{ctx}: marked exported as a bundle not on the stick"
                    );
                }
                assert_eq!(
                    s["pending_export"],
                    Value::Bool(exported.is_null()),
                    "{ctx}"
                );
                // (c) re-run.
                let before = snapshot(&c.state);
                let o = client(&fx.export_args(c), None);
                match written {
                    // The bundle reached its final name: export refuses to overwrite it and changes nothing; the
                    // file already there is the complete export (checked above), so carry that one.
                    Some(h) => {
                        on_stick.set(on_stick.get() + 1);
                        refused(&o, "already exists");
                        assert_eq!(
                            snapshot(&c.state),
                            before,
                            "{ctx}: refused re-export changed the state"
                        );
                        assert_eq!(check_stick(&fx, &c.out, &ctx), Some(h), "{ctx}");
                    }
                    // Nothing under the final name: the re-run writes it and marks it exported.
                    None => {
                        assert!(o.status.success(), "{ctx}: re-export failed: {}", text(&o));
                        let h = check_stick(&fx, &c.out, &ctx).expect("no bundle after re-export");
                        let s = status(&c.state);
                        assert_eq!(s["local"]["exported"].as_str(), Some(h.as_str()), "{ctx}");
                        assert_eq!(s["pending_export"], Value::Bool(false), "{ctx}");
                    }
                }
            },
        );
        eprintln!(
            "export: {steps} durable steps; {var}: bundle already on the stick after {} crash(es)",
            on_stick.get()
        );
        // The bundle is linked at step 2: from the crash before step 3 on it is there.
        assert_eq!(on_stick.get(), steps - 2, "{var}");
        counts.push(steps);
    }
    assert_eq!(
        counts,
        [EXPORT_STEPS, EXPORT_STEPS],
        "export's durable steps changed: update EXPORT_STEPS and docs/threat-model.md"
    );
}

#[test]
fn failpoint_values_that_are_not_step_numbers_are_ignored() {
    let fx = Fixture::new(16, false);
    for (i, bad) in ["", "0", "-1", "x", "1.5"].iter().enumerate() {
        let c = fx.case(&format!("bad-{i}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-client"));
        let o = cmd
            .args(fx.export_args(&c))
            .env("FERRY_FAILPOINT", bad)
            .env_remove("FERRY_FAILPOINT_TORN")
            .output()
            .unwrap();
        assert!(o.status.success(), "FERRY_FAILPOINT={bad:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("ignoring FERRY_FAILPOINT"),
            "{}",
            text(&o)
        );
        assert!(check_stick(&fx, &c.out, bad).is_some());
    }
}

#[test]
fn import_and_export_refuse_a_state_another_process_holds() {
    let fx = Fixture::new(16, false);
    let c = fx.case("locked");
    let before = snapshot(&c.state);
    let held = DirLock::acquire(&c.state).unwrap();
    for args in [fx.import_args(&c), fx.export_args(&c)] {
        let o = client(&args, None);
        refused(&o, "in use by another ferry process");
        assert_eq!(
            snapshot(&c.state),
            before,
            "{args:?} changed a locked state"
        );
        assert!(names(&c.out).is_empty(), "{args:?} wrote to the stick");
    }
    drop(held);
    // Released: both go through.
    for args in [fx.export_args(&c), fx.import_args(&c)] {
        let o = client(&args, None);
        assert!(o.status.success(), "{}", text(&o));
    }
}

/// Run `ferry-client args` with a tmpfs (mount `options`) at `stick`, in a private mount namespace made by
/// `unshare` (with a user namespace when not root, so no root is needed), and return its output and the names it
/// left on the stick. The tmpfs goes away with the namespace. Panics when the namespace or the mount cannot be had.
fn client_on_tmpfs(args: &[OsString], stick: &Path, options: &str) -> (Output, BTreeSet<String>) {
    const NO_MOUNT: i32 = 97;
    std::fs::create_dir_all(stick).unwrap();
    let listing = stick.with_extension("left");
    // The mount, then the command, then the listing, all inside the namespace.
    let script = format!(
        r#"mount -t tmpfs -o "$1" tmpfs "$2" || exit {NO_MOUNT}; stick=$2; listing=$3; shift 3
"$@"; rc=$?; ls -A "$stick" > "$listing"; exit $rc"#
    );
    let mut cmd = Command::new("unshare");
    // Who we are: the owner of the directory just made.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(stick).unwrap()) == 0;
    if !root {
        cmd.args(["--user", "--map-root-user"]);
    }
    cmd.args(["--mount", "sh", "-c", &script, "sh", options])
        .arg(stick)
        .arg(&listing)
        .arg(env!("CARGO_BIN_EXE_ferry-client"))
        .args(args)
        .env_remove("FERRY_FAILPOINT")
        .env_remove("FERRY_FAILPOINT_TORN");
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run unshare (util-linux): {e}"));
    assert_ne!(
        o.status.code(),
        Some(NO_MOUNT),
        "cannot mount a tmpfs in a private namespace: this test needs root or unprivileged user namespaces \
         (unshare --user); {}",
        text(&o)
    );
    let left = std::fs::read_to_string(&listing)
        .unwrap_or_else(|e| panic!("{}: {e}; {}", listing.display(), text(&o)));
    (o, left.lines().map(str::to_owned).collect())
}

#[test]
fn export_to_a_full_or_read_only_stick_fails_cleanly_and_changes_nothing() {
    // 64 Ki incompressible f32 values: a 256 KiB bundle for a 64 KiB stick.
    let fx = Fixture::new(64 << 10, true);
    let c = fx.case("stick");
    let before = snapshot(&c.state);
    for (stick, options, why) in [
        ("full", "size=64k", "No space left on device"),
        ("ro", "ro,size=1m", "Read-only file system"),
    ] {
        let mut args = fx.export_args(&c);
        let stick = fx.path(stick);
        *args.last_mut().unwrap() = stick.clone().into();
        let (o, left) = client_on_tmpfs(&args, &stick, options);
        refused(&o, why);
        assert!(left.is_empty(), "{why}: left {left:?} on the stick");
        assert_eq!(snapshot(&c.state), before, "{why}: state changed");
        assert_eq!(status(&c.state)["pending_export"], Value::Bool(true));
    }
    // The same export to a stick with room works.
    let o = client(&fx.export_args(&c), None);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn import_crash_before_the_commit_keeps_the_previous_record() {
    let fx = Fixture::new(16, false);
    for n in 1..=IMPORT_STEPS {
        let c = fx.case(&format!("previous-{n}"));
        let o = client(&fx.import_args(&c), Some(("FERRY_FAILPOINT", n)));
        assert_eq!(o.status.signal(), Some(SIGABRT), "{}", text(&o));
        let s = status(&c.state);
        if hash_of(&s["global"]) == Some(fx.g0.hash.as_str()) {
            assert!(
                s["previous"].is_null(),
                "crash before step {n}: the site still holds round 0 but the previous record was rewritten to {}",
                s["previous"]
            );
        }
    }
}
