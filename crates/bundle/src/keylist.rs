//! Lists of HQ keys signed by the federation's offline root key (issue 15 §4), after TUF's root role.
//!
//! HQ's key signs every global, so it is online often and may leak. The **root key** is made once, kept offline
//! (a USB key in a safe), and signs only one kind of file: a short, expiring list naming the HQ key(s) the
//! federation uses now. Sites pin the root (at enrolment, or with `ferry-client import --root` on the first
//! import) and from then on accept an HQ key only if the newest root-signed list they hold names it. To replace a
//! leaked HQ key, the root signs a new list (higher serial) naming the new key; the list travels on the stick
//! with the first global the new key signs; sites verify it under the pinned root and switch.
//!
//! The file (`*.ferry-keys`) is a signed envelope (`crate::envelope`): magic `FERRYKEY`, version 1, the root's key
//! id, the JSON body ([`HqKeyList`]), and an Ed25519 signature over `ferry-hq-keys-v1\0` ‖ body. Nothing but a key
//! of role `root` may sign one, and a root key signs nothing else (`seal` and `open` refuse it).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::envelope::{self, EnvelopeError};
use crate::fsutil::{self, FsError};
use crate::keys::{validate_id, KeyRecord, PublicKey, Role, SecretKey};
use crate::revocation::ListSigner;

/// Magic at the start of an HQ key list.
pub const MAGIC: &[u8; 8] = b"FERRYKEY";
/// The version this crate reads and writes.
pub const VERSION: u16 = 1;
/// Domain separation prefix of the signed message (followed by the body).
pub const SIGNATURE_DOMAIN: &[u8] = b"ferry-hq-keys-v1\0";
/// Largest body accepted.
pub const MAX_BODY_BYTES: u32 = 64 << 10;
/// Conventional file extension.
pub const EXTENSION: &str = "ferry-keys";
/// Most HQ keys one list may name.
const MAX_KEYS: usize = 16;

/// Why an HQ key list was refused. Nothing was applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyListError {
    /// The file could not be read.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Too short to hold a header.
    #[error("not a ferry HQ key list: the file is too short ({0} bytes)")]
    TooShort(usize),
    /// The first bytes are not `FERRYKEY`.
    #[error("not a ferry HQ key list: wrong magic bytes")]
    WrongMagic,
    /// A version this ferry does not know.
    #[error("HQ key list version {0} is newer than this ferry understands; upgrade ferry")]
    UnsupportedVersion(u16),
    /// Lengths or reserved bytes are wrong.
    #[error("damaged HQ key list: {0}")]
    Malformed(&'static str),
    /// Signed by another key than the pinned root.
    #[error("HQ key list signed by key {found}, but this site pins root key {pinned}")]
    UntrustedRoot {
        /// The header's key id.
        found: String,
        /// The pinned root's key id.
        pinned: String,
    },
    /// The signature does not verify.
    #[error("HQ key list signature does not verify: the file was altered, or it is not from the root key")]
    BadSignature,
    /// The signed body is not a valid list.
    #[error("signed HQ key list is invalid: {0}")]
    Invalid(String),
    /// Only a root key may sign a list.
    #[error("{0}")]
    WrongRole(String),
    /// The list is for another federation.
    #[error("HQ key list {serial} is for federation {found:?}, but this site is in {expected:?}")]
    WrongFederation {
        /// The list's serial.
        serial: u64,
        /// Its federation (escaped).
        found: String,
        /// The site's.
        expected: String,
    },
    /// An older list than the one held, or a different list with the same serial.
    #[error("refusing HQ key list {found}: this site holds list {held}, and only a newer one replaces it")]
    Rollback {
        /// Serial held.
        held: u64,
        /// Serial offered.
        found: u64,
    },
}

impl From<EnvelopeError> for KeyListError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::TooShort(n) => KeyListError::TooShort(n),
            EnvelopeError::WrongMagic => KeyListError::WrongMagic,
            EnvelopeError::UnsupportedVersion(v) => KeyListError::UnsupportedVersion(v),
            EnvelopeError::Malformed(why) => KeyListError::Malformed(why),
        }
    }
}

/// One HQ key named by the list.
pub type ListedKey = KeyRecord;

/// The signed body of an HQ key list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HqKeyList {
    /// Body format, 1.
    pub format: u32,
    /// The federation the keys serve.
    pub federation: String,
    /// Increases with every list the root signs; a site replaces its list only with a higher serial.
    pub serial: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// When the list expires (seconds since the epoch): sites warn after it (or refuse, with `--refuse-expired`).
    pub expires: u64,
    /// The root key that signs (filled in by [`sign`]).
    pub signer: ListSigner,
    /// The HQ keys the federation uses now.
    pub hq_keys: Vec<ListedKey>,
}

impl HqKeyList {
    /// A list naming `keys` (HQ public keys), to be signed by [`sign`].
    pub fn new(
        federation: &str,
        serial: u64,
        created: u64,
        expires: u64,
        keys: &[PublicKey],
    ) -> HqKeyList {
        HqKeyList {
            format: 1,
            federation: federation.to_string(),
            serial,
            created,
            expires,
            signer: ListSigner {
                role: Role::Root,
                id: String::new(),
                key_id: String::new(),
            },
            hq_keys: keys.iter().map(KeyRecord::from).collect(),
        }
    }

    /// Check everything that can be checked from the body alone, and return the named keys.
    pub fn keys(&self) -> Result<Vec<PublicKey>, String> {
        if self.format != 1 {
            return Err(format!("list format {} (expected 1)", self.format));
        }
        validate_id("federation", &self.federation).map_err(|e| e.to_string())?;
        validate_id("signer id", &self.signer.id).map_err(|e| e.to_string())?;
        if self.signer.role != Role::Root {
            return Err("the signer is not a root key".into());
        }
        if self.hq_keys.is_empty() || self.hq_keys.len() > MAX_KEYS {
            return Err(format!("a list names 1 to {MAX_KEYS} HQ keys"));
        }
        let mut ring = crate::Keyring::new();
        let mut out = Vec::new();
        for k in &self.hq_keys {
            if k.role != Role::Hq {
                return Err(format!(
                    "{} key {:?} is listed, but a list names only hq keys",
                    k.role,
                    crate::escape(&k.id)
                ));
            }
            let pk = k.to_key()?;
            ring.add(pk.clone()).map_err(|e| e.to_string())?;
            out.push(pk);
        }
        Ok(out)
    }

    /// Refuse a list of another federation.
    pub fn check_federation(&self, federation: &str) -> Result<(), KeyListError> {
        if self.federation == federation {
            Ok(())
        } else {
            Err(KeyListError::WrongFederation {
                serial: self.serial,
                found: crate::escape(&self.federation),
                expected: federation.to_string(),
            })
        }
    }

    /// Whether the list has expired at `now`.
    pub fn expired(&self, now: u64) -> bool {
        now > self.expires
    }
}

/// Sign `list` with the root key, filling in its signer; returns the file bytes.
pub fn sign(list: &HqKeyList, root: &SecretKey) -> Result<Vec<u8>, KeyListError> {
    if root.role() != Role::Root {
        return Err(KeyListError::WrongRole(format!(
            "{} key {:?} cannot sign a list of HQ keys; only the root key may",
            root.role(),
            root.id()
        )));
    }
    let public = root.public();
    let mut list = list.clone();
    list.signer = ListSigner {
        role: Role::Root,
        id: public.id.clone(),
        key_id: public.key_id_hex(),
    };
    list.keys().map_err(KeyListError::Invalid)?;
    let body = serde_json::to_vec(&list).map_err(|e| KeyListError::Invalid(e.to_string()))?;
    if body.len() > MAX_BODY_BYTES as usize {
        return Err(KeyListError::Invalid("the list is too large".into()));
    }
    Ok(envelope::write(
        MAGIC,
        VERSION,
        SIGNATURE_DOMAIN,
        root,
        &body,
    ))
}

/// Verify a list against the pinned root key: header, signer is the root, strict signature over the bytes as
/// read, then the body. Returns the list and the HQ keys it names.
pub fn verify(bytes: &[u8], root: &PublicKey) -> Result<(HqKeyList, Vec<PublicKey>), KeyListError> {
    let env = envelope::parse(bytes, MAGIC, &[VERSION], MAX_BODY_BYTES)?;
    if root.role != Role::Root {
        return Err(KeyListError::WrongRole(format!(
            "{} key {:?} is pinned as the root, but it is not a root key",
            root.role, root.id
        )));
    }
    if env.key_id != root.key_id() {
        return Err(KeyListError::UntrustedRoot {
            found: hex::encode(env.key_id),
            pinned: root.key_id_hex(),
        });
    }
    if !env.verifies(root, SIGNATURE_DOMAIN) {
        return Err(KeyListError::BadSignature);
    }
    let list: HqKeyList = serde_json::from_slice(env.body)
        .map_err(|e| KeyListError::Invalid(crate::escape(&e.to_string())))?;
    let keys = list.keys().map_err(KeyListError::Invalid)?;
    if list.signer.key_id != root.key_id_hex() || list.signer.id != root.id {
        return Err(KeyListError::Invalid(format!(
            "the list names signer {} {} but was verified with {} {}",
            crate::escape(&list.signer.id),
            crate::escape(&list.signer.key_id),
            root.id,
            root.key_id_hex()
        )));
    }
    Ok((list, keys))
}

/// Read a list file (bounded).
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, KeyListError> {
    Ok(fsutil::read_capped(
        path,
        envelope::max_file_len(MAX_BODY_BYTES),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> SecretKey {
        SecretKey::from_seed(Role::Root, "root", [7; 32])
    }

    #[test]
    fn sign_verify_and_refusals() {
        let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]).public();
        let list = HqKeyList::new("kit", 2, 10, 20, std::slice::from_ref(&hq));
        let bytes = sign(&list, &root()).unwrap();
        let (back, keys) = verify(&bytes, &root().public()).unwrap();
        assert_eq!(keys, vec![hq.clone()]);
        assert_eq!(back.serial, 2);
        assert!(back.expired(21) && !back.expired(20));
        // Only a root key signs; a list is checked against the pinned root only.
        assert!(matches!(
            sign(&list, &SecretKey::from_seed(Role::Hq, "hq", [1; 32])),
            Err(KeyListError::WrongRole(_))
        ));
        let other = SecretKey::from_seed(Role::Root, "root", [8; 32]);
        assert!(matches!(
            verify(&bytes, &other.public()),
            Err(KeyListError::UntrustedRoot { .. })
        ));
        let mut edited = bytes.clone();
        let at = edited.len() - 70;
        edited[at] ^= 1;
        assert!(verify(&edited, &root().public()).is_err());
        // A list may name only hq keys.
        let site = SecretKey::from_seed(Role::Site, "site-a", [2; 32]).public();
        assert!(matches!(
            sign(&HqKeyList::new("kit", 3, 0, 1, &[site]), &root()),
            Err(KeyListError::Invalid(_))
        ));
    }
}
