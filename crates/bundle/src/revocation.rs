//! Revocation lists: HQ-signed lists of key ids that must no longer verify (issue 6).
//!
//! When a stick with a site's secret key is lost, or a site machine is compromised, HQ signs a small list of
//! the key ids to refuse and carries it to every site with the next global. Every ferry tool that loads
//! `--trust` keys also loads the lists given with `--revocations` and applies them to the [`Keyring`]; from
//! then on [`crate::open`] refuses bundles by those keys with [`crate::OpenError::RevokedKey`], before their
//! signature is even checked. Revocation is monotone: a reader applies the union of every valid list it is
//! given, so an older list carried by an attacker cannot un-revoke anything.
//!
//! File layout (all integers little-endian), modelled on the bundle header:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `FERRYREV` |
//! | 8 | 2 | version, 1 |
//! | 10 | 2 | reserved, 0 |
//! | 12 | 8 | key id of the signing HQ key |
//! | 20 | 4 | body length `n` (at most 1 MiB) |
//! | 24 | n | body: JSON [`RevocationList`] |
//! | 24 + n | 64 | Ed25519 signature over `ferry-revocations-v1\0` ‖ body |
//!
//! Nothing may follow the signature. The domain prefix differs from the bundle's, so a signature over a list can
//! never be replayed as a bundle signature or the other way round. Only an HQ key may sign a list, and a list
//! may not revoke its own signer (to retire an HQ key, sign with the new one).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{self, FsError};
use crate::keys::{validate_id, Keyring, Role, SecretKey};

/// Magic at the start of a revocation list file.
pub const MAGIC: &[u8; 8] = b"FERRYREV";
/// The only version this crate reads and writes.
pub const VERSION: u16 = 1;
/// Domain separation prefix of the signed message (followed by the body).
pub const SIGNATURE_DOMAIN: &[u8] = b"ferry-revocations-v1\0";
/// Largest body accepted.
pub const MAX_BODY_BYTES: u32 = 1 << 20;
/// Conventional file extension.
pub const EXTENSION: &str = "ferry-rev";

const FIXED: usize = 8 + 2 + 2 + 8 + 4;
const SIG_LEN: usize = 64;

/// Why a revocation list was refused. Nothing was applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationError {
    /// The file could not be read.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Too short to hold a header.
    #[error("not a ferry revocation list: the file is too short ({0} bytes)")]
    TooShort(usize),
    /// The first bytes are not `FERRYREV`.
    #[error("not a ferry revocation list: wrong magic bytes")]
    WrongMagic,
    /// A version this ferry does not know.
    #[error("revocation list version {0} is newer than this ferry understands; upgrade ferry")]
    UnsupportedVersion(u16),
    /// Lengths or reserved bytes are wrong.
    #[error("damaged revocation list: {0}")]
    Malformed(&'static str),
    /// The signing key is not trusted.
    #[error(
        "revocation list signed by key {0}, which is not among your trusted keys (check --trust)"
    )]
    UntrustedKey(String),
    /// The signing key is itself revoked.
    #[error("revocation list signed by key {0}, which has been revoked")]
    RevokedKey(String),
    /// The signing key is not an HQ key.
    #[error("revocation list signed by {0}, which is not an hq key; only hq may revoke keys")]
    NotHq(String),
    /// The signature does not verify.
    #[error("revocation list signature does not verify: the file was altered, or it is not from the key it names")]
    BadSignature,
    /// The signed body is not a valid list.
    #[error("signed revocation list is invalid: {0}")]
    Invalid(String),
    /// Only an HQ key may sign a list.
    #[error("{0}")]
    WrongRole(String),
}

/// Who signed the list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListSigner {
    /// Always `hq`.
    pub role: Role,
    /// The HQ key's id field.
    pub id: String,
    /// The signing key id, 16 hex digits.
    pub key_id: String,
}

/// One revoked key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// Key id, 16 lower-case hex digits (what bundle headers name).
    pub key_id: String,
    /// The key's role, for people reading the list.
    pub role: Role,
    /// The key's id field (site id or HQ id), for people reading the list.
    pub id: String,
    /// Why, in words (shown to operators, escaped).
    pub reason: String,
}

/// The signed body of a revocation list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationList {
    /// Body format, 1.
    pub format: u32,
    /// Federation the list is for.
    pub federation: String,
    /// Increases with every list HQ issues (for display and record keeping; revocation is monotone anyway).
    pub serial: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The signing key (filled in by [`sign`]).
    pub signer: ListSigner,
    /// The keys to refuse.
    pub revoked: Vec<Revoked>,
}

fn is_key_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_key_id(s: &str) -> Option<[u8; 8]> {
    let mut out = [0u8; 8];
    (is_key_id(s) && hex::decode_to_slice(s, &mut out).is_ok()).then_some(out)
}

impl RevocationList {
    /// A list to be signed by [`sign`]; the signer is filled in there.
    pub fn new(
        federation: &str,
        serial: u64,
        created: u64,
        revoked: Vec<Revoked>,
    ) -> RevocationList {
        RevocationList {
            format: 1,
            federation: federation.to_string(),
            serial,
            created,
            signer: ListSigner {
                role: Role::Hq,
                id: String::new(),
                key_id: String::new(),
            },
            revoked,
        }
    }

    /// Check everything that can be checked from the body alone.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != 1 {
            return Err(format!("list format {} (expected 1)", self.format));
        }
        validate_id("federation", &self.federation).map_err(|e| e.to_string())?;
        validate_id("signer id", &self.signer.id).map_err(|e| e.to_string())?;
        if self.signer.role != Role::Hq {
            return Err("the signer is not an hq key".into());
        }
        if !is_key_id(&self.signer.key_id) {
            return Err("signer key_id is not 16 lower-case hex digits".into());
        }
        let mut seen = BTreeSet::new();
        for r in &self.revoked {
            if !is_key_id(&r.key_id) {
                return Err(format!(
                    "revoked key_id {:?} is not 16 lower-case hex digits",
                    crate::escape(&r.key_id)
                ));
            }
            validate_id("revoked id", &r.id).map_err(|e| e.to_string())?;
            if r.reason.len() > 1024 {
                return Err("a reason is longer than 1024 bytes".into());
            }
            if !seen.insert(r.key_id.as_str()) {
                return Err(format!("key {} is listed twice", r.key_id));
            }
            if r.key_id == self.signer.key_id {
                return Err(
                    "the list revokes the key that signs it; sign with the new hq key".into(),
                );
            }
        }
        Ok(())
    }

    /// Mark every listed key revoked in `ring`; returns how many entries were applied.
    pub fn apply(&self, ring: &mut Keyring) -> usize {
        let mut n = 0;
        for r in &self.revoked {
            if let Some(id) = parse_key_id(&r.key_id) {
                ring.revoke(id);
                n += 1;
            }
        }
        n
    }
}

/// Sign `list` with an HQ key, filling in its signer; returns the file bytes.
pub fn sign(list: &RevocationList, key: &SecretKey) -> Result<Vec<u8>, RevocationError> {
    if key.role() != Role::Hq {
        return Err(RevocationError::WrongRole(format!(
            "site key {:?} cannot sign a revocation list; only an hq key may",
            key.id()
        )));
    }
    let public = key.public();
    let mut list = list.clone();
    list.signer = ListSigner {
        role: Role::Hq,
        id: public.id.clone(),
        key_id: public.key_id_hex(),
    };
    list.validate().map_err(RevocationError::Invalid)?;
    let body = serde_json::to_vec(&list).map_err(|e| RevocationError::Invalid(e.to_string()))?;
    if body.len() > MAX_BODY_BYTES as usize {
        return Err(RevocationError::Invalid(
            "the list is larger than 1 MiB".into(),
        ));
    }
    let mut message = SIGNATURE_DOMAIN.to_vec();
    message.extend_from_slice(&body);
    let signature = key.sign(&message);
    let mut out = Vec::with_capacity(FIXED + body.len() + SIG_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&public.key_id());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&signature);
    Ok(out)
}

/// Verify a list's bytes against the trusted keys: header, signer (trusted, not revoked, HQ), strict signature
/// over the bytes as read, then the body. Nothing is parsed before the signature verifies.
pub fn verify(bytes: &[u8], keyring: &Keyring) -> Result<RevocationList, RevocationError> {
    if bytes.len() < FIXED + SIG_LEN {
        return Err(RevocationError::TooShort(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(RevocationError::WrongMagic);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(RevocationError::UnsupportedVersion(version));
    }
    if bytes[10] != 0 || bytes[11] != 0 {
        return Err(RevocationError::Malformed("reserved bytes are not zero"));
    }
    let mut key_id = [0u8; 8];
    key_id.copy_from_slice(&bytes[12..20]);
    let body_len = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    if body_len > MAX_BODY_BYTES {
        return Err(RevocationError::Malformed("the body is larger than 1 MiB"));
    }
    let body_end = FIXED + body_len as usize;
    if bytes.len() != body_end + SIG_LEN {
        return Err(RevocationError::Malformed(
            "the file length disagrees with the body length (truncated or extra bytes)",
        ));
    }
    let key_hex = hex::encode(key_id);
    if keyring.is_revoked(&key_id) {
        return Err(RevocationError::RevokedKey(key_hex));
    }
    let key = keyring
        .get(&key_id)
        .ok_or_else(|| RevocationError::UntrustedKey(key_hex.clone()))?;
    if key.role != Role::Hq {
        return Err(RevocationError::NotHq(format!(
            "{} {} {}",
            key.role, key.id, key_hex
        )));
    }
    let body = &bytes[FIXED..body_end];
    let mut message = SIGNATURE_DOMAIN.to_vec();
    message.extend_from_slice(body);
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&bytes[body_end..]);
    key.verifying_key()
        .verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| RevocationError::BadSignature)?;

    // Signed by a trusted HQ key from here on.
    let list: RevocationList =
        serde_json::from_slice(body).map_err(|e| RevocationError::Invalid(e.to_string()))?;
    list.validate().map_err(RevocationError::Invalid)?;
    if list.signer.key_id != key_hex || list.signer.id != key.id {
        return Err(RevocationError::Invalid(format!(
            "the list names signer {} {} but was verified with {} {}",
            crate::escape(&list.signer.id),
            crate::escape(&list.signer.key_id),
            key.id,
            key_hex
        )));
    }
    Ok(list)
}

/// Read and [`verify`] a list file.
pub fn read(path: &Path, keyring: &Keyring) -> Result<RevocationList, RevocationError> {
    let bytes = fsutil::read_capped(path, (FIXED + SIG_LEN) as u64 + MAX_BODY_BYTES as u64)?;
    verify(&bytes, keyring)
}

/// Load every `--revocations` file: each is verified against `keyring` as loaded from `--trust` (lists do not
/// vouch for each other), then all are applied. Returns the lists. Fails without applying anything if any
/// list is refused.
pub fn load(
    paths: &[PathBuf],
    keyring: &mut Keyring,
) -> Result<Vec<RevocationList>, RevocationError> {
    let lists = paths
        .iter()
        .map(|p| read(p, keyring))
        .collect::<Result<Vec<_>, _>>()?;
    for l in &lists {
        l.apply(keyring);
    }
    Ok(lists)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::test_ring as ring;

    fn hq() -> SecretKey {
        SecretKey::from_seed(Role::Hq, "hq", [1; 32])
    }

    #[test]
    fn sign_verify_apply_round_trip() {
        let a = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
        let list = RevocationList::new(
            "kit",
            1,
            1_700_000_000,
            vec![Revoked {
                key_id: a.public().key_id_hex(),
                role: Role::Site,
                id: "site-a".into(),
                reason: "lost".into(),
            }],
        );
        let bytes = sign(&list, &hq()).unwrap();
        let mut keys = ring(&[&hq(), &a]);
        let back = verify(&bytes, &keys).unwrap();
        assert_eq!(back.revoked, list.revoked);
        assert_eq!(back.signer.key_id, hq().public().key_id_hex());
        assert_eq!(back.apply(&mut keys), 1);
        assert!(keys.is_revoked(&a.public().key_id()));
        // Sites cannot sign lists.
        assert!(matches!(
            sign(&list, &a),
            Err(RevocationError::WrongRole(_))
        ));
        // A list cannot revoke its signer.
        let mut own = list.clone();
        own.revoked[0].key_id = hq().public().key_id_hex();
        assert!(matches!(
            sign(&own, &hq()),
            Err(RevocationError::Invalid(_))
        ));
    }

    #[test]
    fn load_applies_nothing_when_one_list_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
        let entry = Revoked {
            key_id: a.public().key_id_hex(),
            role: Role::Site,
            id: "site-a".into(),
            reason: "lost".into(),
        };
        let good = dir.path().join("good.ferry-rev");
        std::fs::write(
            &good,
            sign(&RevocationList::new("kit", 1, 0, vec![entry]), &hq()).unwrap(),
        )
        .unwrap();
        let bad = dir.path().join("bad.ferry-rev");
        std::fs::write(&bad, b"FERRYREV").unwrap();
        let mut keys = ring(&[&hq(), &a]);
        assert!(load(&[good.clone(), bad], &mut keys).is_err());
        assert!(!keys.is_revoked(&a.public().key_id()));
        assert_eq!(load(&[good], &mut keys).unwrap().len(), 1);
        assert!(keys.is_revoked(&a.public().key_id()));
    }

    /// The `revocation` rows of the test kit (`tests/testkit/expectations.tsv`), whose files are written by an
    /// independent implementation in `examples/make_testkit.rs`. `tests/testkit.rs` checks the other readers.
    #[test]
    fn testkit_vectors() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testkit");
        let table = std::fs::read_to_string(dir.join("expectations.tsv")).unwrap();
        let mut checked = 0;
        for line in table.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split('\t').collect();
            if f[1] != "revocation" {
                continue;
            }
            let mut keys = Keyring::new();
            for stem in f[2].split('+').filter(|s| *s != "-") {
                let (revoke, stem) = match stem.strip_prefix('!') {
                    Some(s) => (true, s),
                    None => (false, stem),
                };
                let pk =
                    crate::keys::PublicKey::read(&dir.join("keys").join(format!("{stem}.pub")))
                        .unwrap();
                if revoke {
                    keys.revoke(pk.key_id());
                } else {
                    keys.add(pk).unwrap();
                }
            }
            let bytes = std::fs::read(dir.join(f[0])).unwrap();
            let got = match verify(&bytes, &keys) {
                Ok(l) => format!("ok:{}", l.revoked.len()),
                Err(e) => format!("{e:?}")
                    .chars()
                    .take_while(|c| c.is_alphanumeric())
                    .collect(),
            };
            assert_eq!(got, f[3], "{}: {}", f[0], f[5]);
            checked += 1;
        }
        assert!(checked > 10, "only {checked} revocation vectors");
    }
}
