//! Detached signatures over any file, made with a ferry key: how a release's `SHA256SUMS` is signed (issue 17).
//!
//! A signature file (`<file>.sig`) is a small text file in the key files' `field: value` style:
//! ```text
//! # ferry file signature. Check it: ferry-client verify-file --trust <signer>.pub <file>
//! ferry-file-signature: 1
//! key-id: <16 hex digits>
//! signature: <128 hex digits>
//! ```
//! The Ed25519 signature is over `"ferry-file-signature-v1\0" || key-id (8 bytes) || SHA-256(file)`. The domain
//! prefix differs from the bundle's and the revocation list's, so no signature can be taken for another kind; the
//! key id is signed so that a signature names exactly one (role, id, key). Nothing else in the `.sig` file is
//! trusted: who signed is what the verifier's keyring says about that key id.

use std::path::Path;

use sha2::Digest;

use crate::fsutil::{self, FsError};
use crate::keys::{Fields, KeyError, Keyring, PublicKey, SecretKey};

/// Domain separation for file signatures.
const FILE_SIGNATURE_DOMAIN: &[u8] = b"ferry-file-signature-v1\0";
/// A signature file is tiny; anything bigger is not one.
const MAX_SIG_FILE: u64 = 4 * 1024;

/// Why a file signature could not be made or does not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileSigError {
    /// Reading or writing a file failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The signature file is not one.
    #[error("{}: not a valid ferry file signature: {why}", .path.display())]
    Malformed {
        /// The signature file.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The signing key is not among the trusted keys.
    #[error("signed by key {0}, which is not among your trusted keys")]
    UntrustedKey(String),
    /// The signing key was revoked.
    #[error("signed by key {0}, which has been revoked")]
    RevokedKey(String),
    /// The signature does not match the file.
    #[error("the signature does not verify: the file was altered, or it is not the file that was signed")]
    BadSignature,
}

fn message(key_id: &[u8; 8], digest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(FILE_SIGNATURE_DOMAIN.len() + 8 + 32);
    m.extend_from_slice(FILE_SIGNATURE_DOMAIN);
    m.extend_from_slice(key_id);
    m.extend_from_slice(digest);
    m
}

/// SHA-256 of a file, read in pieces (the file may be large; only the `.sig` file is read whole).
fn sha256_file(path: &Path) -> Result<Vec<u8>, FsError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| FsError::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(h.finalize().to_vec()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FsError::io(path, e)),
        }
    }
}

/// The text of a signature file for `bytes`, signed by `key`.
pub fn sign(bytes: &[u8], key: &SecretKey) -> String {
    sign_digest(&sha2::Sha256::digest(bytes), key)
}

fn sign_digest(digest: &[u8], key: &SecretKey) -> String {
    let public = key.public();
    let key_id = public.key_id();
    let sig = key.sign(&message(&key_id, digest));
    format!(
        "# ferry file signature by {} {}. Check it: ferry-client verify-file --trust {}.pub <file>\n\
         ferry-file-signature: 1\nkey-id: {}\nsignature: {}\n",
        public.role,
        public.id,
        public.id,
        hex::encode(key_id),
        hex::encode(sig)
    )
}

/// Check `bytes` against the signature file text `sig` (`sig_path` is only used in messages); returns the trusted
/// key that signed.
pub fn verify<'k>(
    bytes: &[u8],
    sig: &str,
    sig_path: &Path,
    keyring: &'k Keyring,
) -> Result<&'k PublicKey, FileSigError> {
    verify_digest(&sha2::Sha256::digest(bytes), sig, sig_path, keyring)
}

fn verify_digest<'k>(
    digest: &[u8],
    sig: &str,
    sig_path: &Path,
    keyring: &'k Keyring,
) -> Result<&'k PublicKey, FileSigError> {
    let malformed = |e: KeyError| match e {
        KeyError::Malformed { why, .. } => FileSigError::Malformed {
            path: sig_path.to_path_buf(),
            why,
        },
        other => FileSigError::Malformed {
            path: sig_path.to_path_buf(),
            why: other.to_string(),
        },
    };
    let f = Fields::parse(sig, sig_path, "ferry-file-signature").map_err(malformed)?;
    let hex_field = |name: &str, out: &mut [u8]| -> Result<(), FileSigError> {
        let digits = out.len() * 2;
        hex::decode_to_slice(f.get(name).map_err(malformed)?, out).map_err(|_| {
            FileSigError::Malformed {
                path: sig_path.to_path_buf(),
                why: format!("`{name}` is not {digits} hex digits"),
            }
        })
    };
    let mut key_id = [0u8; 8];
    hex_field("key-id", &mut key_id)?;
    let mut signature = [0u8; 64];
    hex_field("signature", &mut signature)?;
    let key_hex = hex::encode(key_id);
    if keyring.is_revoked(&key_id) {
        return Err(FileSigError::RevokedKey(key_hex));
    }
    let key = keyring
        .get(&key_id)
        .ok_or(FileSigError::UntrustedKey(key_hex))?;
    key.verifying_key()
        .verify_strict(
            &message(&key_id, digest),
            &ed25519_dalek::Signature::from_bytes(&signature),
        )
        .map_err(|_| FileSigError::BadSignature)?;
    Ok(key)
}

/// Sign the file at `file` and write the signature to `sig_path`, refusing to overwrite one.
pub fn sign_file(file: &Path, sig_path: &Path, key: &SecretKey) -> Result<(), FileSigError> {
    let digest = sha256_file(file)?;
    fsutil::write_new(sig_path, sign_digest(&digest, key).as_bytes())?;
    Ok(())
}

/// Verify the file at `file` against the signature file at `sig_path`; returns the key that signed.
pub fn verify_file<'k>(
    file: &Path,
    sig_path: &Path,
    keyring: &'k Keyring,
) -> Result<&'k PublicKey, FileSigError> {
    let sig = fsutil::read_capped(sig_path, MAX_SIG_FILE)?;
    let sig = std::str::from_utf8(&sig).map_err(|_| FileSigError::Malformed {
        path: sig_path.to_path_buf(),
        why: "not UTF-8 text".into(),
    })?;
    verify_digest(&sha256_file(file)?, sig, sig_path, keyring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::test_ring as ring;
    use crate::keys::Role;

    #[test]
    fn signs_and_verifies_and_refuses_changes() {
        let rel = SecretKey::from_seed(Role::Hq, "ferry-release", [7; 32]);
        let other = SecretKey::from_seed(Role::Hq, "other", [8; 32]);
        let p = Path::new("SHA256SUMS.sig");
        let data = b"abc  ferry-client\n";
        let sig = sign(data, &rel);
        let trusted = ring(&[&rel]);
        assert_eq!(verify(data, &sig, p, &trusted).unwrap().id, "ferry-release");
        // A changed file, a key not trusted, a revoked key, a flipped signature digit, garbage.
        assert!(matches!(
            verify(b"abd  ferry-client\n", &sig, p, &trusted),
            Err(FileSigError::BadSignature)
        ));
        assert!(matches!(
            verify(data, &sig, p, &ring(&[&other])),
            Err(FileSigError::UntrustedKey(_))
        ));
        let mut revoked = trusted.clone();
        revoked.revoke(rel.public().key_id());
        assert!(matches!(
            verify(data, &sig, p, &revoked),
            Err(FileSigError::RevokedKey(_))
        ));
        let line = sig.lines().find(|l| l.starts_with("signature: ")).unwrap();
        let last = line.chars().last().unwrap();
        let flipped = sig.replace(
            line,
            &format!(
                "{}{}",
                &line[..line.len() - 1],
                if last == '0' { '1' } else { '0' }
            ),
        );
        assert!(matches!(
            verify(data, &flipped, p, &trusted),
            Err(FileSigError::BadSignature)
        ));
        for bad in [
            "",
            "garbage",
            "ferry-file-signature: 2\n",
            "ferry-file-signature: 1\nkey-id: zz\n",
        ] {
            assert!(
                matches!(
                    verify(data, bad, p, &trusted),
                    Err(FileSigError::Malformed { .. })
                ),
                "{bad:?}"
            );
        }
        // Another key's signature relabelled with the trusted key's id does not verify.
        let forged = sign(data, &other).replace(
            &hex::encode(other.public().key_id()),
            &hex::encode(rel.public().key_id()),
        );
        assert!(matches!(
            verify(data, &forged, p, &trusted),
            Err(FileSigError::BadSignature)
        ));
    }

    #[test]
    fn file_round_trip_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed(Role::Site, "s1", [9; 32]);
        let f = dir.path().join("SHA256SUMS");
        let s = dir.path().join("SHA256SUMS.sig");
        std::fs::write(&f, b"x").unwrap();
        sign_file(&f, &s, &key).unwrap();
        assert_eq!(verify_file(&f, &s, &ring(&[&key])).unwrap().id, "s1");
        assert!(matches!(
            sign_file(&f, &s, &key),
            Err(FileSigError::Fs(FsError::Exists(_)))
        ));
    }
}
