//! Fuzz the bundle reader: `inspect` and `open` on the raw input, then the same header, manifest and payload
//! re-signed with the fixed test key the header names, so mutations also reach everything behind the signature
//! (manifest validation, payload framing, decompression, tensor checks). Seed the corpus with the test kit
//! (docs/testkit.md). Any panic, or a verified bundle whose payload is not the signed one, is a finding.
#![no_main]

use std::sync::OnceLock;

use ferry_bundle::{assemble_version, inspect, open, sha256_hex, Keyring, Limits, Role, SecretKey};
use libfuzzer_sys::fuzz_target;

/// The test kit's keys (crates/bundle/examples/make_testkit.rs): never used outside tests.
fn keys() -> &'static (Vec<SecretKey>, Keyring) {
    static K: OnceLock<(Vec<SecretKey>, Keyring)> = OnceLock::new();
    K.get_or_init(|| {
        let keys = vec![
            SecretKey::from_seed(Role::Hq, "hq", [1; 32]),
            SecretKey::from_seed(Role::Site, "site-a", [2; 32]),
            SecretKey::from_seed(Role::Site, "site-b", [3; 32]),
        ];
        let mut ring = Keyring::new();
        for k in &keys {
            ring.add(k.public()).expect("test key");
        }
        (keys, ring)
    })
}

fn check(bytes: &[u8], ring: &Keyring) {
    // Small payload limit: the fuzzer must not be able to ask for gigabytes.
    let limits = Limits {
        max_payload_bytes: 64 << 20,
        ..Limits::default()
    };
    if let Ok(b) = open(bytes, ring, &limits) {
        assert_eq!(sha256_hex(b.payload()), b.manifest.payload.sha256);
        assert_eq!(b.hash, sha256_hex(bytes));
    }
}

fuzz_target!(|data: &[u8]| {
    let (keys, ring) = keys();
    let _ = inspect(data);
    check(data, ring);
    if data.len() < 32 {
        return;
    }
    let ml = u32::from_le_bytes([data[28], data[29], data[30], data[31]]) as usize;
    let Some(payload) = data.get(32 + ml + 64..) else {
        return;
    };
    let manifest = &data[32..32 + ml];
    let key = keys
        .iter()
        .find(|k| k.public().key_id()[..] == data[20..28])
        .unwrap_or(&keys[0]);
    // Re-signed under the header's format version (1 or 2), so both versions' checks are reached.
    let version = if data[16..18] == [1, 0] { 1 } else { 2 };
    check(&assemble_version(version, manifest, key, payload), ring);
});
