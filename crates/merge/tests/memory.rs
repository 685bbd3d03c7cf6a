//! Issue 13: the memory of HQ's merge does not grow with the number of sites, even when one tensor holds almost
//! all of the model. The whole round (`hq::merge_round`: verify each update from its file into scratch, merge
//! slice by slice, compress and sign the next global, store it, write it out) runs in this process under an
//! allocator that counts live heap bytes, so the peak is exact and does not depend on timing or on the page
//! cache. zstd's own buffers (C allocations) are not counted; they depend on the level, not on the sites, and
//! `ferry-lab bench merge` measures the whole process's peak RSS.
//!
//! This file holds a single test on purpose: the counter sees every thread of the test binary. The margin allowed
//! between 3 and 9 sites (8 MiB) is below what one more whole tensor per site would add (6 × 8 MiB), and above
//! the few MiB the buffers in flight between the reader, compressor and hashing threads vary by from run to run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_bundle::{seal, Draft, Dtype, Keyring, Payload, Role, SecretKey, TensorRef};
use ferry_merge::hq::{self, RoundConfig};
use ferry_merge::{MergeConfig, Strategy};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only the byte counts are recorded.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: usize = 1 << 20;
/// The model: 8 MiB of f32, `embed.weight` holding all of it but 16 KiB.
const MODEL_BYTES: usize = 8 * MIB;

/// A model whose big tensor is noise from a cheap generator (so it is not compressible to nothing), shifted by
/// `shift`.
fn model(seed: u64, shift: f32) -> Payload {
    let small = 64 * 64;
    let rows = (MODEL_BYTES / 4 - small) / 256;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut gen = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04 + shift;
                v.to_le_bytes()
            })
            .collect()
    };
    let (embed, fc) = (gen(rows * 256), gen(small));
    Payload::from_tensors(&[
        TensorRef {
            name: "embed.weight",
            dtype: Dtype::F32,
            shape: &[rows, 256],
            data: &embed,
        },
        TensorRef {
            name: "fc.weight",
            dtype: Dtype::F32,
            shape: &[64, 64],
            data: &fc,
        },
    ])
    .unwrap()
}

struct Fed {
    _tmp: tempfile::TempDir,
    hq: SecretKey,
    ring: Keyring,
    template: PathBuf,
    updates: Vec<PathBuf>,
}

/// HQ state at round 0 and `sites` updates on a stick.
fn federation(sites: usize) -> Fed {
    let tmp = tempfile::tempdir().unwrap();
    let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]);
    let template = tmp.path().join("hq");
    let (_, g0) = hq::init(
        &template,
        &hq,
        &model(1, 0.0),
        "mem",
        None,
        &tmp.path().join("g0"),
        1,
    )
    .unwrap();
    let mut ring = Keyring::new();
    ring.add(hq.public()).unwrap();
    let usb = tmp.path().join("usb");
    let mut updates = Vec::new();
    for i in 0..sites {
        let id = format!("site-{i}");
        let key = SecretKey::from_seed(Role::Site, &id, [10 + i as u8; 32]);
        ring.add(key.public()).unwrap();
        let draft = Draft::update_for(&g0.manifest, &g0.hash, &id, 100 + i as u64);
        let sealed = seal(draft, &model(100 + i as u64, 0.001 * i as f32), &key, 1).unwrap();
        updates.push(sealed.write_to_dir(&usb).unwrap());
    }
    Fed {
        _tmp: tmp,
        hq,
        ring,
        template,
        updates,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The peak of live heap bytes during one merge round of `fed`'s updates (a fresh copy of its HQ state).
fn peak_of_round(fed: &Fed, strategy: Strategy, chunk_elements: usize, run: &str) -> usize {
    let work = fed._tmp.path().join(run);
    let state = work.join("state");
    copy_dir(&fed.template, &state);
    let config = RoundConfig {
        merge: MergeConfig {
            strategy,
            chunk_elements,
            ..MergeConfig::default()
        },
        level: 1,
        ..RoundConfig::default()
    };
    PEAK.store(LIVE.load(Ordering::SeqCst), Ordering::SeqCst);
    let before = LIVE.load(Ordering::SeqCst);
    let outcome = hq::merge_round(
        &state,
        &fed.hq,
        &fed.ring,
        &[],
        &fed.updates,
        &config,
        &work.join("out"),
    )
    .unwrap();
    let peak = PEAK.load(Ordering::SeqCst) - before;
    assert_eq!(outcome.report.contributions.len(), fed.updates.len());
    drop(outcome);
    std::fs::remove_dir_all(&work).unwrap();
    peak
}

#[test]
fn merge_memory_does_not_grow_with_the_number_of_sites() {
    let (few, many) = (federation(3), federation(9));
    let limit = 3 * MODEL_BYTES + 64 * MIB;
    // The default slice for the averaging strategies. The robust ones hold a slice of every input, capped at
    // 64 MiB in all, so their slice is set small enough here that the cap does not apply.
    for (strategy, chunk) in [
        (Strategy::FedAvg, MergeConfig::default().chunk_elements),
        (Strategy::FedAdam, MergeConfig::default().chunk_elements),
        (Strategy::Median, 1 << 14),
        (Strategy::TrimmedMean, 1 << 14),
    ] {
        let a = peak_of_round(&few, strategy, chunk, &format!("{strategy}-3"));
        let b = peak_of_round(&many, strategy, chunk, &format!("{strategy}-9"));
        eprintln!(
            "{strategy}: peak heap {:.1} MiB with 3 sites, {:.1} MiB with 9 (model {} MiB)",
            a as f64 / MIB as f64,
            b as f64 / MIB as f64,
            MODEL_BYTES / MIB
        );
        assert!(
            b <= a + 8 * MIB,
            "{strategy}: the peak grew from {a} bytes (3 sites) to {b} bytes (9 sites)"
        );
        assert!(
            a <= limit && b <= limit,
            "{strategy}: peak {a} / {b} bytes over 3 x model + 64 MiB"
        );
    }
}
