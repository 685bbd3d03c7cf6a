//! The adversarial test kit (issue 6): every file in `tests/testkit/` through every reader that applies to it,
//! checked against `tests/testkit/expectations.tsv`, with bounded time and memory; the kit is regenerated and
//! compared byte for byte. The file-level attacks on a site's state directory (symlinked output, read-only
//! medium, input changed after verifying, signed NaN) run the same kit in `crates/site/tests/testkit_files.rs`.
//!
//! The list of vectors comes from the directory: a file without expectations, or an expectation without a file,
//! fails the run. Rows whose `bug` column is set describe a reader defect: they must not panic and stay bounded
//! here, and the ignored `known_bugs` test asserts their correct outcome (run it with `--ignored`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_bundle::keys::PublicKey;
use ferry_bundle::{inspect, open, open_file, sha256_hex, Keyring, Limits, Payload};

#[allow(dead_code)]
#[path = "../examples/make_testkit.rs"]
mod make_testkit;

/// Longest any reader may take on one vector (they take milliseconds; this leaves room for a busy machine).
const TIME_LIMIT: Duration = Duration::from_secs(2);
/// Most memory any reader may hold at once on one vector. The bomb declares 64 GiB.
const MEMORY_LIMIT: usize = 64 << 20;

// ---- a per-thread peak-allocation meter, so each vector's memory can be bounded ----

struct Meter;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(add: usize, sub: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get().saturating_add(add).saturating_sub(sub);
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: defers every operation to the system allocator; the bookkeeping touches only const-initialised
// thread-locals (no allocation, no destructor).
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), 0);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(0, layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), 0);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size, layout.size());
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// Run `f`, returning its result, the time it took and the most memory it held beyond what was live before.
fn measured<T>(f: impl FnOnce() -> T) -> (T, Duration, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    let peak = PEAK.with(Cell::get) - base;
    (out, took, peak)
}

// ---- the table ----

fn kit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("testkit")
}

struct Row {
    file: String,
    reader: String,
    trust: String,
    expect: String,
    bug: String,
    comment: String,
}

fn rows() -> Vec<Row> {
    let text =
        std::fs::read_to_string(kit_dir().join("expectations.tsv")).expect("expectations.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 6, "expectations.tsv: not 6 columns: {l:?}");
            Row {
                file: f[0].into(),
                reader: f[1].into(),
                trust: f[2].into(),
                expect: f[3].into(),
                bug: f[4].into(),
                comment: f[5].into(),
            }
        })
        .collect()
}

/// The readers a file must have rows for, by its extension.
fn readers_for(file: &str) -> &'static [&'static str] {
    if file.ends_with(".ferry") {
        &["inspect", "open"]
    } else if file.ends_with(".safetensors") {
        &["safetensors"]
    } else if file.ends_with(".ferry-rev") {
        &["revocation"]
    } else if file.ends_with(".ferry-keys") {
        &["keylist"]
    } else {
        &[]
    }
}

/// `+`-joined key stems from `keys/`; `!stem` revokes that key; `bundle=<sha256>` withdraws that bundle;
/// `id=stem` adds that kit key as a decryption identity (encrypted vectors; its seed is the generator's); `-` is
/// the empty keyring.
fn keyring(trust: &str) -> Keyring {
    let mut ring = Keyring::new();
    for stem in trust.split('+').filter(|s| *s != "-") {
        if let Some(stem) = stem.strip_prefix("id=") {
            ring.add_identity(&make_testkit::key(stem));
            continue;
        }
        if let Some(hash) = stem.strip_prefix("bundle=") {
            ring.revoke_bundle(hash);
            continue;
        }
        let (revoke, stem) = match stem.strip_prefix('!') {
            Some(s) => (true, s),
            None => (false, stem),
        };
        let pk = PublicKey::read(&kit_dir().join("keys").join(format!("{stem}.pub")))
            .unwrap_or_else(|e| panic!("key {stem}: {e}"));
        if revoke {
            ring.revoke(pk.key_id());
        } else {
            ring.add(pk).expect("add key");
        }
    }
    ring
}

/// The variant name of an error: `Decompress { .. }` → `Decompress`.
fn variant(e: &impl std::fmt::Debug) -> String {
    format!("{e:?}")
        .chars()
        .take_while(|c| c.is_alphanumeric())
        .collect()
}

/// What `row.reader` says about `bytes`, measured. `None` for readers checked elsewhere.
fn run(row: &Row, bytes: &[u8]) -> Option<(String, Duration, usize)> {
    let ring = keyring(&row.trust);
    let (got, took, mem) = match row.reader.as_str() {
        "open" => {
            let (r, took, mem) = measured(|| open(bytes, &ring, &Limits::default()));
            let got = match &r {
                Ok(b) => format!("ok:{}", sha256_hex(b.payload())),
                Err(e) => variant(e),
            };
            // The file path reads once and gives the same answer.
            let f = match open_file(&kit_dir().join(&row.file), &ring) {
                Ok(b) => format!("ok:{}", sha256_hex(b.payload())),
                Err(e) => variant(&e),
            };
            assert_eq!(f, got, "{}: open_file and open disagree", row.file);
            if let Err(e) = &r {
                // Messages are printable: no raw control characters from the file reach a terminal.
                let msg = e.to_string();
                assert!(
                    !msg.chars().any(char::is_control),
                    "{}: control character in {msg:?}",
                    row.file
                );
            }
            (got, took, mem)
        }
        "inspect" => {
            let (r, took, mem) = measured(|| inspect(bytes));
            let got = match r {
                Ok(i) if i.manifest.is_ok() => "ok".to_string(),
                Ok(i) => {
                    // `inspect` shows this text without any key: it must be escaped (issue 15 §7).
                    let msg = i.manifest.err().unwrap_or_default();
                    assert!(
                        !msg.chars().any(char::is_control),
                        "{}: control character in {msg:?}",
                        row.file
                    );
                    "ok-manifest-invalid".to_string()
                }
                Err(e) => variant(&e),
            };
            (got, took, mem)
        }
        "keylist" => {
            let root = PublicKey::read(&kit_dir().join("keys").join(format!("{}.pub", row.trust)))
                .expect("root key");
            let (r, took, mem) = measured(|| ferry_bundle::keylist::verify(bytes, &root));
            let got = match &r {
                Ok((_, keys)) => format!("ok:{}", keys.len()),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        !msg.chars().any(char::is_control),
                        "{}: control character in {msg:?}",
                        row.file
                    );
                    variant(e)
                }
            };
            (got, took, mem)
        }
        "safetensors" => {
            let (r, took, mem) = measured(|| Payload::from_safetensors(bytes));
            let got = match &r {
                Ok(p) => format!("ok:{}", sha256_hex(p.bytes())),
                Err(e) => variant(e),
            };
            if let Err(e) = &r {
                let msg = e.to_string();
                assert!(
                    !msg.chars().any(char::is_control),
                    "{}: control character in {msg:?}",
                    row.file
                );
            }
            (got, took, mem)
        }
        // Checked by `revocation::tests::testkit_vectors` in src/revocation.rs.
        "revocation" => return None,
        other => panic!("{}: unknown reader {other:?}", row.file),
    };
    Some((got, took, mem))
}

#[test]
fn directory_and_expectations_agree() {
    let rows = rows();
    let mut table: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in &rows {
        table.entry(&r.file).or_default().push(&r.reader);
    }
    let mut files = Vec::new();
    for e in std::fs::read_dir(kit_dir()).expect("testkit dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() && e.file_name() != "expectations.tsv" {
            files.push(e.file_name().into_string().expect("UTF-8 name"));
        }
    }
    files.sort();
    let mut problems = Vec::new();
    for f in &files {
        let mut want = readers_for(f).to_vec();
        want.sort();
        let mut have = table.get(f.as_str()).cloned().unwrap_or_default();
        have.sort();
        if want.is_empty() {
            problems.push(format!("{f}: unknown kind of vector (extension)"));
        } else if have != want {
            problems.push(format!(
                "{f}: expectations for {have:?}, want exactly {want:?}"
            ));
        }
    }
    for f in table.keys() {
        if !files.iter().any(|x| x == f) {
            problems.push(format!("{f}: in expectations.tsv but not in the directory"));
        }
    }
    assert!(
        problems.is_empty(),
        "testkit and expectations.tsv disagree:\n{}",
        problems.join("\n")
    );
    assert!(files.len() > 100, "only {} vectors", files.len());
}

#[test]
fn every_vector_gives_its_expected_outcome_in_bounded_time_and_memory() {
    let mut failures = Vec::new();
    for row in rows() {
        let bytes = std::fs::read(kit_dir().join(&row.file)).expect("vector");
        let Some((got, took, mem)) = run(&row, &bytes) else {
            continue;
        };
        if took > TIME_LIMIT {
            failures.push(format!("{} [{}]: took {took:?}", row.file, row.reader));
        }
        if row.bug != "-" {
            // Outcome and memory of a known defect are checked by `known_bugs`.
            continue;
        }
        if mem > MEMORY_LIMIT {
            failures.push(format!("{} [{}]: held {mem} bytes", row.file, row.reader));
        }
        if got != row.expect {
            failures.push(format!(
                "{} [{}]: expected {}, got {got} ({})",
                row.file, row.reader, row.expect, row.comment
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Reader defects found by the kit: rows with a `bug` note. Fails until they are fixed; then clear the note.
#[test]
fn known_bugs() {
    let mut failures = Vec::new();
    for row in rows().into_iter().filter(|r| r.bug != "-") {
        let bytes = std::fs::read(kit_dir().join(&row.file)).expect("vector");
        if let Some((got, _, mem)) = run(&row, &bytes) {
            if got != row.expect {
                failures.push(format!(
                    "{} [{}]: expected {}, got {got}: {}",
                    row.file, row.reader, row.expect, row.bug
                ));
            }
            if mem > MEMORY_LIMIT {
                failures.push(format!(
                    "{} [{}]: held {mem} bytes: {}",
                    row.file, row.reader, row.bug
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).expect("dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            walk(&p, base, out);
        } else {
            let rel = p
                .strip_prefix(base)
                .expect("prefix")
                .to_string_lossy()
                .into_owned();
            out.insert(rel, std::fs::read(&p).expect("read"));
        }
    }
}

#[test]
fn regenerating_reproduces_the_committed_kit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_testkit::write(tmp.path()).expect("generate");
    let (mut fresh, mut committed) = (BTreeMap::new(), BTreeMap::new());
    walk(tmp.path(), tmp.path(), &mut fresh);
    walk(&kit_dir(), &kit_dir(), &mut committed);
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&fresh),
        names(&committed),
        "run `cargo run -p ferry-bundle --example make_testkit`"
    );
    for (name, bytes) in &fresh {
        assert!(&committed[name] == bytes, "{name} differs from a fresh generation: the generator is not deterministic, or the kit is stale");
    }
    let total: usize = committed.values().map(Vec::len).sum();
    assert!(
        total < 2 << 20,
        "the kit is {total} bytes; keep it under 2 MB"
    );
}
