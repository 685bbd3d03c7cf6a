//! The ferry bundle: the one file that crosses the air gap, and the trust around it (keys, revocation lists).
//!
//! A bundle is a zstd skippable frame holding a signed manifest, followed by one zstd frame holding a plain
//! safetensors file. Everything that reads bytes from a stick lives in this crate, and reads them in one order:
//! signature and payload hash first, then decompression (capped at the signed length), then parsing.
//! The byte-level specification is `docs/bundle-format.md`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod container;
mod envelope;
pub mod filesig;
pub mod fisher;
pub mod fsutil;
pub mod keylist;
pub mod keys;
pub mod kit;
pub mod manifest;
pub mod payload;
pub mod revocation;
mod stream;
pub mod tensor;
pub mod tomlfile;

mod error;

pub use container::{
    assemble, assemble_version, compress, identify_file, inspect, inspect_file, open, open_file,
    open_file_into, seal, Bundle, BundleWriter, Identity, Inspected, Limits, Opened, Sealed,
    MAX_BUNDLE_BYTES,
};
pub use error::{OpenError, SealError};
pub use keys::{KeyError, Keyring, PublicKey, Role, SecretKey};
pub use manifest::{
    BundleKind, Contributor, Draft, EncryptedTo, Encryption, Manifest, RevocationRef, SiteInfo,
    TensorEntry,
};
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

/// A Unix time as operators read it, always in UTC: `2026-12-02 06:30 UTC` (issue 17). Machine output (JSON,
/// state records) keeps the number; this is for messages and human-readable listings only.
pub fn utc(secs: u64) -> String {
    // Days to a civil date: Howard Hinnant's `civil_from_days`, on the proleptic Gregorian calendar.
    let days = (secs / 86_400) as i64;
    let (hour, minute) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02} UTC")
}

/// The first 12 characters of a hash, for messages.
pub fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Print-safe form of a string that came from untrusted input: control characters and quotes escaped.
pub fn escape(s: &str) -> String {
    s.escape_debug().to_string()
}

/// Print-safe form of a path (issue 15 §7): a file name on a stick is chosen by whoever wrote the stick, so it is
/// escaped like any other untrusted string before it reaches a terminal or a state file. Bytes that are not
/// UTF-8 show as U+FFFD.
pub fn escape_path(p: &std::path::Path) -> String {
    escape(&p.to_string_lossy())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates_match_the_calendar() {
        // calendar.timegm((2026, 12, 2, 6, 30, 0)) and friends, in Python.
        assert_eq!(super::utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(super::utc(1_796_193_000), "2026-12-02 06:30 UTC");
        assert_eq!(super::utc(951_868_799), "2000-02-29 23:59 UTC");
        assert_eq!(super::utc(4_107_542_400), "2100-03-01 00:00 UTC");
    }
}
