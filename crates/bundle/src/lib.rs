//! The ferry bundle: the one file that crosses the air gap, and the trust around it (keys, revocation lists).
//!
//! A bundle is a zstd skippable frame holding a signed manifest, followed by one zstd frame holding a plain
//! safetensors file. Everything that reads bytes from a stick lives in this crate, and reads them in one order:
//! signature and payload hash first, then decompression (capped at the signed length), then parsing.
//! The byte-level specification is `docs/bundle-format.md`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod container;
pub mod filesig;
pub mod fsutil;
pub mod keys;
pub mod manifest;
pub mod payload;
pub mod revocation;
pub mod tensor;

mod error;

pub use container::{
    assemble, compress, inspect, open, open_file, seal, Bundle, Inspected, Limits, Sealed,
    MAX_BUNDLE_BYTES,
};
pub use error::{OpenError, SealError};
pub use keys::{KeyError, Keyring, PublicKey, Role, SecretKey};
pub use manifest::{BundleKind, Contributor, Draft, Manifest, SiteInfo, TensorEntry};
pub use payload::Payload;
pub use safetensors::Dtype;
pub use tensor::{TensorMeta, TensorRef};

/// Lower-case hex SHA-256 of `bytes`: how ferry names every hash it shows or stores.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Whether `s` is a lower-case SHA-256 hex string: how every hash ferry stores is written.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Seconds since the Unix epoch, for manifests and state records.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The first 12 characters of a hash, for messages.
pub fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Print-safe form of a string that came from untrusted input: control characters and quotes escaped.
pub fn escape(s: &str) -> String {
    s.escape_debug().to_string()
}
