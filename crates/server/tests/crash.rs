//! Crash safety and locking of `ferry-server init --state` and `merge`.
//!
//! Each command is killed (`std::process::abort`, through the `FERRY_FAILPOINT` / `FERRY_FAILPOINT_TORN` test hook
//! in `ferry_bundle::fsutil`) right before each of its durable steps in turn, on a fresh copy of the state. After
//! every crash the test checks that
//! (a) no file under a final name is partial: every `.ferry` file in the out dir and in `globals/` verifies, and
//!     only `.ferry-tmp-*` files may be left over;
//! (b) the ledger is on the old round or the new one (`ferry-server status --json`), and the global it names is
//!     stored in `globals/` and verifies;
//! (c) the documented recovery works: before the ledger commit, re-running the command completes the round; after
//!     it, the command refuses to run again (the round is done) and `ferry-server emit` writes the global to the
//!     out dir, or refuses to overwrite it when the crash came after it reached its final name there, in which case
//!     that file is the complete, verified global.
//!
//! The recovery story is written down in `docs/threat-model.md` ("Crash safety").

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_bundle::fsutil::DirLock;
use ferry_bundle::{
    open_file, seal, Bundle, BundleKind, Draft, Dtype, Keyring, Payload, Role, SecretKey, TensorRef,
};
use serde_json::Value;

const SIGABRT: i32 = 6;
/// Give up counting steps past this (a command that never completes under the hook).
const MAX_STEPS: usize = 100;
/// Durable steps, as measured (also in docs/threat-model.md).
const INIT_STEPS: usize = 12;
const MERGE_STEPS: usize = 14;

fn hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
}

fn site(id: &str, seed: u8) -> SecretKey {
    SecretKey::from_seed(Role::Site, id, [seed; 32])
}

fn payload(v: f32) -> Payload {
    let data: Vec<u8> = (0..16).flat_map(|i| (v + i as f32).to_le_bytes()).collect();
    Payload::from_tensors(&[TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[16],
        data: &data,
    }])
    .unwrap()
}

fn hq_ring() -> Keyring {
    let mut ring = Keyring::new();
    ring.add(hq().public()).unwrap();
    ring
}

/// Keys, initial weights, an HQ state template at round 0, and two site updates for round 0.
struct Fixture {
    root: tempfile::TempDir,
    g0: Bundle,
}

impl Fixture {
    fn new() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let keys = root.path().join("keys");
        hq().write_pair(&keys).unwrap();
        let inp = root.path().join("in");
        std::fs::create_dir(&inp).unwrap();
        std::fs::write(inp.join("init.safetensors"), payload(0.0).bytes()).unwrap();
        let (path, _) = ferry_merge::hq::init(
            &root.path().join("template"),
            &hq(),
            &payload(0.0),
            "city",
            None,
            &root.path().join("out0"),
            3,
        )
        .unwrap();
        let g0 = open_file(&path, &hq_ring()).unwrap();
        for (i, id) in ["site-a", "site-b"].iter().enumerate() {
            let key = site(id, 2 + i as u8);
            key.write_pair(&keys).unwrap();
            let draft = Draft::update_for(&g0.manifest, &g0.hash, id, 10 * (i as u64 + 1));
            let s = seal(draft, &payload(1.0 + i as f32), &key, 3).unwrap();
            s.write_to_dir(&inp).unwrap();
        }
        Fixture { root, g0 }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    /// `cases/<name>/`, holding a copy of the round-0 template as `state/` when `with_state`; `out/` is not made.
    fn case(&self, name: &str, with_state: bool) -> Case {
        let dir = self.path("cases").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        if with_state {
            copy_dir(&self.path("template"), &dir.join("state"));
        }
        Case {
            state: dir.join("state"),
            out: dir.join("out"),
        }
    }

    fn key(&self) -> OsString {
        self.path("keys/hq.key").into()
    }

    fn init_args(&self, c: &Case) -> Vec<OsString> {
        vec![
            "init".into(),
            "--key".into(),
            self.key(),
            "--weights".into(),
            self.path("in/init.safetensors").into(),
            "--federation".into(),
            "city".into(),
            "--out".into(),
            c.out.clone().into(),
            "--state".into(),
            c.state.clone().into(),
        ]
    }

    /// fedavgm, so the round also stores server-optimizer state before the commit.
    fn merge_args(&self, c: &Case) -> Vec<OsString> {
        vec![
            "merge".into(),
            "--key".into(),
            self.key(),
            "--trust".into(),
            self.path("keys/site-a.pub").into(),
            "--trust".into(),
            self.path("keys/site-b.pub").into(),
            "--strategy".into(),
            "fedavgm".into(),
            "--state".into(),
            c.state.clone().into(),
            "--out".into(),
            c.out.clone().into(),
            self.path("in/site-a-r0.ferry").into(),
            self.path("in/site-b-r0.ferry").into(),
        ]
    }

    fn emit_args(&self, c: &Case) -> Vec<OsString> {
        vec![
            "emit".into(),
            "--key".into(),
            self.key(),
            "--state".into(),
            c.state.clone().into(),
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

/// The names in `dir` (none when it does not exist).
fn names(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn is_temp(name: &str) -> bool {
    name.starts_with(".ferry-tmp-")
}

fn server(args: &[OsString], failpoint: Option<(&str, usize)>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-server"));
    cmd.args(args)
        .env_remove("FERRY_FAILPOINT")
        .env_remove("FERRY_FAILPOINT_TORN");
    if let Some((var, n)) = failpoint {
        cmd.env(var, n.to_string());
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run ferry-server: {e}"))
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

/// `ferry-server status --json`, or None when the state holds no ledger yet.
fn status(state: &Path) -> Option<Value> {
    let o = server(
        &[
            "status".into(),
            "--json".into(),
            "--state".into(),
            state.into(),
        ],
        None,
    );
    if !o.status.success() {
        refused(&o, "holds no ledger");
        return None;
    }
    Some(serde_json::from_slice(&o.stdout).unwrap())
}

/// (a) every `.ferry` file in `dir` verifies as a global; others are temp files. Returns hash per file name.
#[track_caller]
fn check_globals(dir: &Path, ctx: &str) -> BTreeMap<String, Bundle> {
    let mut out = BTreeMap::new();
    for name in names(dir) {
        if is_temp(&name) {
            continue;
        }
        assert!(name.ends_with(".ferry"), "{ctx}: unexpected file {name}");
        let b = open_file(&dir.join(&name), &hq_ring()).unwrap_or_else(|e| {
            panic!(
                "{ctx}: {} is there but does not verify: {e}",
                dir.join(&name).display()
            )
        });
        assert_eq!(b.manifest.kind, BundleKind::Global, "{ctx}");
        out.insert(name, b);
    }
    out
}

/// Checks after a crash, shared by init and merge. Returns the ledger's (round, global) if there is a ledger.
#[track_caller]
fn check_after_crash(c: &Case, new_round: u64, ctx: &str) -> Option<(u64, String)> {
    let stored = check_globals(&c.state.join("globals"), ctx);
    for (name, b) in &stored {
        assert_eq!(name, &format!("{}.ferry", b.hash), "{ctx}: misnamed global");
    }
    let emitted = check_globals(&c.out, ctx);
    let ledger = status(&c.state).map(|s| {
        (
            s["round"].as_u64().unwrap(),
            s["global"].as_str().unwrap().to_string(),
        )
    });
    if let Some((round, hash)) = &ledger {
        assert!(
            *round + 1 == new_round || *round == new_round,
            "{ctx}: ledger at round {round}"
        );
        assert!(
            stored.contains_key(&format!("{hash}.ferry")),
            "{ctx}: the ledger names a global that is not stored"
        );
    }
    // The out dir gets the new global only after the commit, and then exactly the committed one.
    for (name, b) in &emitted {
        assert_eq!(name, &format!("global-r{new_round}.ferry"), "{ctx}");
        assert_eq!(
            ledger.as_ref().map(|l| (l.0, l.1.as_str())),
            Some((new_round, b.hash.as_str())),
            "{ctx}: out dir holds a global the ledger has not committed"
        );
    }
    ledger
}

/// After the commit: running the command again is refused with `again`, and `emit` writes the global (or
/// refuses to overwrite the complete copy already there). Returns whether the copy was already there.
#[track_caller]
fn check_emit_recovery(
    fx: &Fixture,
    c: &Case,
    args: &[OsString],
    again: &str,
    round: u64,
    hash: &str,
    ctx: &str,
) -> bool {
    let ledger = std::fs::read(c.state.join("ledger.json")).unwrap();
    refused(&server(args, None), again);
    assert_eq!(
        std::fs::read(c.state.join("ledger.json")).unwrap(),
        ledger,
        "{ctx}: ledger changed"
    );
    let name = format!("global-r{round}.ferry");
    let there = c.out.join(&name).exists();
    let o = server(&fx.emit_args(c), None);
    if there {
        refused(&o, "already exists");
    } else {
        assert!(o.status.success(), "{ctx}: emit failed: {}", text(&o));
    }
    let emitted = check_globals(&c.out, ctx);
    assert_eq!(
        emitted.get(&name).map(|b| b.hash.as_str()),
        Some(hash),
        "{ctx}"
    );
    there
}

/// Globals stored in `globals/` that the ledger does not name (left by a crash before the commit).
fn orphans(c: &Case, ledger_hash: Option<&str>) -> Vec<String> {
    names(&c.state.join("globals"))
        .into_iter()
        .filter(|n| !is_temp(n) && Some(n.trim_end_matches(".ferry")) != ledger_hash)
        .collect()
}

/// Run the command made by `args` with the failpoint `var` at steps 1, 2, ... on a fresh case each time, calling
/// `check` after each crash, until the command completes. Returns its number of durable steps.
fn crash_each_step(
    fx: &Fixture,
    label: &str,
    var: &str,
    with_state: bool,
    args: impl Fn(&Case) -> Vec<OsString>,
    mut check: impl FnMut(&Case, usize),
) -> usize {
    for n in 1..=MAX_STEPS {
        let case = fx.case(&format!("{label}-{var}-{n}"), with_state);
        let o = server(&args(&case), Some((var, n)));
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

/// A re-run before the commit completes the round, even where the crashed run already stored a byte-identical
/// global in `globals/` (the same second): that file is accepted as already written.
#[track_caller]
fn rerun_before_commit(o: &Output, _orphans: &[String], ctx: &str) {
    assert!(o.status.success(), "{ctx}: re-run failed: {}", text(o));
}

#[test]
fn merge_crash_at_every_step_leaves_old_or_new_round_and_recovery_works() {
    let fx = Fixture::new();
    let mut counts = Vec::new();
    for var in ["FERRY_FAILPOINT", "FERRY_FAILPOINT_TORN"] {
        let mut committed = 0;
        let steps = crash_each_step(
            &fx,
            "merge",
            var,
            true,
            |c| fx.merge_args(c),
            |c, n| {
                let ctx = format!("merge crashed by {var}={n}");
                let (round, hash) = check_after_crash(c, 1, &ctx).expect("ledger lost");
                if round == 0 {
                    assert_eq!(hash, fx.g0.hash, "{ctx}");
                    let left = orphans(c, Some(&hash));
                    let o = server(&fx.merge_args(c), None);
                    rerun_before_commit(&o, &left, &ctx);
                    let (round, hash) = check_after_crash(c, 1, &ctx).unwrap();
                    assert_eq!(round, 1, "{ctx}: re-run did not commit");
                    let out = check_globals(&c.out, &ctx);
                    assert_eq!(out["global-r1.ferry"].hash, hash, "{ctx}");
                    assert_eq!(out["global-r1.ferry"].manifest.contributors.len(), 2);
                } else {
                    committed += 1;
                    assert!(
                        c.state.join(format!("server/{hash}.safetensors")).exists(),
                        "{ctx}: committed without its server state"
                    );
                    check_emit_recovery(
                        &fx,
                        c,
                        &fx.merge_args(c),
                        "already merged in round 1",
                        1,
                        &hash,
                        &ctx,
                    );
                }
            },
        );
        eprintln!(
            "merge: {steps} durable steps; {var}: {committed} crash(es) after the ledger commit (recovered by emit); \
            "
        );
        // The commit is the ledger rename; after it come the fsync of the state dir, the fsync for the new out
        // dir, and the 3 steps writing the global into it.
        assert_eq!(committed, 5, "{var}");
        counts.push(steps);
    }
    assert_eq!(
        counts,
        [MERGE_STEPS, MERGE_STEPS],
        "merge's durable steps changed: update MERGE_STEPS and docs/threat-model.md"
    );
}

#[test]
fn init_crash_at_every_step_leaves_no_or_a_whole_federation_and_recovery_works() {
    let fx = Fixture::new();
    let mut counts = Vec::new();
    for var in ["FERRY_FAILPOINT", "FERRY_FAILPOINT_TORN"] {
        let mut committed = 0;
        let steps = crash_each_step(
            &fx,
            "init",
            var,
            false,
            |c| fx.init_args(c),
            |c, n| {
                let ctx = format!("init crashed by {var}={n}");
                match check_after_crash(c, 0, &ctx) {
                    None => {
                        let left = orphans(c, None);
                        let o = server(&fx.init_args(c), None);
                        rerun_before_commit(&o, &left, &ctx);
                        let (round, hash) = check_after_crash(c, 0, &ctx).expect("no ledger");
                        assert_eq!(round, 0, "{ctx}");
                        let out = check_globals(&c.out, &ctx);
                        assert_eq!(out["global-r0.ferry"].hash, hash, "{ctx}");
                    }
                    Some((round, hash)) => {
                        committed += 1;
                        check_emit_recovery(
                            &fx,
                            c,
                            &fx.init_args(c),
                            "already holds a ledger",
                            round,
                            &hash,
                            &ctx,
                        );
                    }
                }
            },
        );
        eprintln!(
            "init --state: {steps} durable steps; {var}: {committed} crash(es) after the ledger commit \
             (recovered by emit);"
        );
        // As for merge: the ledger commit is followed by 5 steps.
        assert_eq!(committed, 5, "{var}");
        counts.push(steps);
    }
    assert_eq!(
        counts,
        [INIT_STEPS, INIT_STEPS],
        "init's durable steps changed: update INIT_STEPS and docs/threat-model.md"
    );
}

/// Wait for the start of the next second, so two commands run right after this see the same `unix_now()`.
fn align_to_second() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_nanos(
        1_000_000_000 - u64::from(now.subsec_nanos()) + 1_000_000,
    ));
}

/// Crash `args` at the first step after which `globals/` holds a global the ledger does not name, then re-run
/// it at once (within the same second, so it seals the same bytes): the re-run must succeed.
fn rerun_after_orphan_global(
    fx: &Fixture,
    label: &str,
    with_state: bool,
    args: impl Fn(&Case) -> Vec<OsString>,
) {
    let ledger_hash =
        |c: &Case| status(&c.state).map(|s| s["global"].as_str().unwrap().to_string());
    for n in 1..=MAX_STEPS {
        let probe = fx.case(&format!("{label}-probe-{n}"), with_state);
        let o = server(&args(&probe), Some(("FERRY_FAILPOINT", n)));
        assert_eq!(
            o.status.signal(),
            Some(SIGABRT),
            "no orphan window found: {}",
            text(&o)
        );
        if orphans(&probe, ledger_hash(&probe).as_deref()).is_empty() {
            continue;
        }
        let c = fx.case(&format!("{label}-bug-{n}"), with_state);
        align_to_second();
        let o = server(&args(&c), Some(("FERRY_FAILPOINT", n)));
        assert_eq!(o.status.signal(), Some(SIGABRT));
        let o = server(&args(&c), None);
        assert!(
            o.status.success(),
            "{label} re-run after a crash at step {n} (stored global, ledger not committed) failed: {}",
            text(&o)
        );
        return;
    }
}

#[test]
fn rerun_after_a_crash_between_storing_and_committing_a_merged_global_succeeds() {
    let fx = Fixture::new();
    rerun_after_orphan_global(&fx, "merge", true, |c| fx.merge_args(c));
}

#[test]
fn rerun_after_a_crash_between_storing_and_committing_the_initial_global_succeeds() {
    let fx = Fixture::new();
    rerun_after_orphan_global(&fx, "init", false, |c| fx.init_args(c));
}

#[test]
fn merge_refuses_a_state_another_process_holds() {
    let fx = Fixture::new();
    let c = fx.case("locked", true);
    let before = snapshot(&c.state);
    let held = DirLock::acquire(&c.state).unwrap();
    for args in [fx.merge_args(&c), fx.emit_args(&c)] {
        refused(&server(&args, None), "in use by another ferry process");
        assert_eq!(
            snapshot(&c.state),
            before,
            "{args:?} changed a locked state"
        );
        assert!(names(&c.out).is_empty(), "{args:?} wrote to the out dir");
    }
    drop(held);
    let o = server(&fx.merge_args(&c), None);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_merge_after_a_crashed_merge_leaves_no_spool_behind() {
    let fx = Fixture::new();
    let c = fx.case("spool", true);
    // Spooling is scratch, not a durable step (issue 13): step 1, storing the new global, comes after every
    // update and the base were spooled.
    let o = server(&fx.merge_args(&c), Some(("FERRY_FAILPOINT", 1)));
    assert_eq!(o.status.signal(), Some(SIGABRT), "{}", text(&o));
    let o = server(&fx.merge_args(&c), None);
    assert!(o.status.success(), "{}", text(&o));
    let spools: Vec<String> = names(&c.state)
        .into_iter()
        .filter(|n| n.starts_with(".spool-"))
        .collect();
    assert!(spools.is_empty(), "left in the state: {spools:?}");
}
