//! Revocation lists: HQ-signed lists of key ids, and of bundle hashes, that must no longer verify (issue 6,
//! issue 15 §2).
//!
//! When a stick with a site's secret key is lost, or a site machine is compromised, HQ signs a small list of
//! the key ids to refuse and carries it to every site with the next global. A list can also withdraw single
//! bundles by their file hash (a poisoned global, a bad update). Every ferry tool that loads `--trust` keys also
//! loads the lists given with `--revocations` and applies them to the [`Keyring`]; from then on
//! [`crate::open`] refuses bundles by those keys with [`crate::OpenError::RevokedKey`], before their signature is
//! even checked, and withdrawn bundles with [`crate::OpenError::RevokedBundle`]. Revocation is monotone: a reader
//! applies the union of every valid list it is given, so an older list carried by an attacker cannot un-revoke
//! anything. HQ and every site also store each list they verified in their state directory and apply the stored
//! lists on every later command, so a revocation sticks without the flag.
//!
//! The file is a signed envelope (`crate::envelope`: magic `FERRYREV`, version, reserved, signing key id,
//! body length, JSON body, Ed25519 signature over the domain ‖ body; nothing may follow). Only an HQ key may
//! sign a list, and a list may not revoke its own signer (to retire an HQ key, sign with the new one).
//!
//! Versions:
//! - **2** (written since issue 15): domain `ferry-revocations-v2\0`; the body adds `expires` (seconds since the
//!   epoch: a list past it still applies, but `status` warns that a newer one is due) and `bundles` (withdrawn
//!   bundle hashes).
//! - **1**: domain `ferry-revocations-v1\0`; the body has neither field. Still read, and applied the same way.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::envelope::{self, EnvelopeError};
use crate::fsutil::{self, FsError};
use crate::keys::{validate_id, Keyring, Role, SecretKey};

/// Magic at the start of a revocation list file.
pub const MAGIC: &[u8; 8] = b"FERRYREV";
/// The version this crate writes.
pub const VERSION: u16 = 2;
/// Domain separation prefix of the signed message of a version-2 list (followed by the body).
pub const SIGNATURE_DOMAIN: &[u8] = b"ferry-revocations-v2\0";
/// Domain of a version-1 list.
pub const SIGNATURE_DOMAIN_V1: &[u8] = b"ferry-revocations-v1\0";
/// Largest body accepted.
pub const MAX_BODY_BYTES: u32 = 1 << 20;
/// Conventional file extension.
pub const EXTENSION: &str = "ferry-rev";
/// Longest reason accepted, in bytes.
const MAX_REASON: usize = 1024;

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
    /// The list is for another federation (issue 15 §2).
    #[error(
        "revocation list {serial} is for federation {found:?}, but this is federation {expected:?}"
    )]
    WrongFederation {
        /// The list's serial.
        serial: u64,
        /// The list's federation (escaped).
        found: String,
        /// The federation of the state that would apply it.
        expected: String,
    },
}

impl From<EnvelopeError> for RevocationError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::TooShort(n) => RevocationError::TooShort(n),
            EnvelopeError::WrongMagic => RevocationError::WrongMagic,
            EnvelopeError::UnsupportedVersion(v) => RevocationError::UnsupportedVersion(v),
            EnvelopeError::Malformed(why) => RevocationError::Malformed(why),
        }
    }
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

/// One withdrawn bundle (version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedBundle {
    /// SHA-256 of the bundle file, 64 lower-case hex digits (its name everywhere, `docs/bundle-format.md` §9).
    pub sha256: String,
    /// Why, in words (shown to operators, escaped).
    pub reason: String,
}

/// The signed body of a revocation list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationList {
    /// Body format: 2 (1 for lists read from the first version).
    pub format: u32,
    /// Federation the list is for.
    pub federation: String,
    /// Increases with every list HQ issues (for display and record keeping; revocation is monotone anyway).
    pub serial: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// When a newer list is due (seconds since the epoch); always set in version 2, absent in version 1.
    pub expires: Option<u64>,
    /// The signing key (filled in by [`sign`]).
    pub signer: ListSigner,
    /// The keys to refuse.
    pub revoked: Vec<Revoked>,
    /// The bundles to refuse (version 2).
    #[serde(default)]
    pub bundles: Vec<RevokedBundle>,
}

/// The body of a version-1 list, exactly: it has no `expires` or `bundles`, and a version-1 body holding them
/// is refused like any unknown field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevocationListV1 {
    format: u32,
    federation: String,
    serial: u64,
    created: u64,
    signer: ListSigner,
    revoked: Vec<Revoked>,
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
    /// A version-2 list to be signed by [`sign`]; the signer is filled in there.
    pub fn new(
        federation: &str,
        serial: u64,
        created: u64,
        expires: u64,
        revoked: Vec<Revoked>,
        bundles: Vec<RevokedBundle>,
    ) -> RevocationList {
        RevocationList {
            format: VERSION.into(),
            federation: federation.to_string(),
            serial,
            created,
            expires: Some(expires),
            signer: ListSigner {
                role: Role::Hq,
                id: String::new(),
                key_id: String::new(),
            },
            revoked,
            bundles,
        }
    }

    /// Check everything that can be checked from the body alone.
    pub fn validate(&self) -> Result<(), String> {
        match (self.format, self.expires) {
            (2, Some(_)) => {}
            (2, None) => return Err("a version-2 list must say when it expires".into()),
            (1, None) if self.bundles.is_empty() => {}
            (1, _) => return Err("a version-1 list has no expiry or bundles".into()),
            (f, _) => return Err(format!("list format {f} (expected 1 or 2)")),
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
            if r.reason.len() > MAX_REASON {
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
        let mut seen = BTreeSet::new();
        for b in &self.bundles {
            if !crate::is_sha256_hex(&b.sha256) {
                return Err(format!(
                    "revoked bundle {:?} is not a lower-case SHA-256 hex string",
                    crate::escape(&b.sha256)
                ));
            }
            if b.reason.len() > MAX_REASON {
                return Err("a reason is longer than 1024 bytes".into());
            }
            if !seen.insert(b.sha256.as_str()) {
                return Err(format!("bundle {} is listed twice", b.sha256));
            }
        }
        Ok(())
    }

    /// Refuse a list of another federation (issue 15 §2): HQ and sites apply only their own federation's lists.
    pub fn check_federation(&self, federation: &str) -> Result<(), RevocationError> {
        if self.federation == federation {
            Ok(())
        } else {
            Err(RevocationError::WrongFederation {
                serial: self.serial,
                found: crate::escape(&self.federation),
                expected: federation.to_string(),
            })
        }
    }

    /// Mark every listed key and bundle revoked in `ring`; returns how many key entries were applied.
    pub fn apply(&self, ring: &mut Keyring) -> usize {
        let mut n = 0;
        for r in &self.revoked {
            if let Some(id) = parse_key_id(&r.key_id) {
                ring.revoke(id);
                n += 1;
            }
        }
        for b in &self.bundles {
            ring.revoke_bundle(&b.sha256);
        }
        n
    }

    /// Whether the list has expired at `now` (seconds since the epoch). A version-1 list never expires.
    pub fn expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| now > e)
    }
}

/// A list that verified, with the exact bytes it verified from (what a state directory stores) and their
/// SHA-256 (what a global names, [`crate::manifest::RevocationRef`]).
#[derive(Debug, Clone)]
pub struct Verified {
    /// The list.
    pub list: RevocationList,
    /// The file bytes.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`, lower-case hex.
    pub sha256: String,
}

/// Sign `list` with an HQ key, filling in its signer; returns the file bytes (version 2).
pub fn sign(list: &RevocationList, key: &SecretKey) -> Result<Vec<u8>, RevocationError> {
    if key.role() != Role::Hq {
        return Err(RevocationError::WrongRole(format!(
            "{} key {:?} cannot sign a revocation list; only an hq key may",
            key.role(),
            key.id()
        )));
    }
    let public = key.public();
    let mut list = list.clone();
    list.format = VERSION.into();
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
    Ok(envelope::write(
        MAGIC,
        VERSION,
        SIGNATURE_DOMAIN,
        key,
        &body,
    ))
}

/// Parse a body of `version` (after its signature verified, or for a stored list).
fn parse_body(version: u16, body: &[u8]) -> Result<RevocationList, RevocationError> {
    let invalid = |e: serde_json::Error| RevocationError::Invalid(crate::escape(&e.to_string()));
    let list = if version == 1 {
        let v1: RevocationListV1 = serde_json::from_slice(body).map_err(invalid)?;
        RevocationList {
            format: v1.format,
            federation: v1.federation,
            serial: v1.serial,
            created: v1.created,
            expires: None,
            signer: v1.signer,
            revoked: v1.revoked,
            bundles: Vec::new(),
        }
    } else {
        serde_json::from_slice(body).map_err(invalid)?
    };
    if list.format != u32::from(version) {
        return Err(RevocationError::Invalid(format!(
            "the body says format {}, the header version {version}",
            list.format
        )));
    }
    list.validate().map_err(RevocationError::Invalid)?;
    Ok(list)
}

/// Verify a list's bytes against the trusted keys: header, signer (trusted, not revoked, HQ), strict signature
/// over the bytes as read, then the body. Nothing is parsed before the signature verifies.
pub fn verify(bytes: &[u8], keyring: &Keyring) -> Result<RevocationList, RevocationError> {
    let env = envelope::parse(bytes, MAGIC, &[1, VERSION], MAX_BODY_BYTES)?;
    let key_hex = hex::encode(env.key_id);
    if keyring.is_revoked(&env.key_id) {
        return Err(RevocationError::RevokedKey(key_hex));
    }
    let key = keyring
        .get(&env.key_id)
        .ok_or_else(|| RevocationError::UntrustedKey(key_hex.clone()))?;
    if key.role != Role::Hq {
        return Err(RevocationError::NotHq(format!(
            "{} {} {}",
            key.role, key.id, key_hex
        )));
    }
    let domain = if env.version == 1 {
        SIGNATURE_DOMAIN_V1
    } else {
        SIGNATURE_DOMAIN
    };
    if !env.verifies(key, domain) {
        return Err(RevocationError::BadSignature);
    }

    // Signed by a trusted HQ key from here on.
    let list = parse_body(env.version, env.body)?;
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

/// [`verify`], keeping the bytes and their hash.
pub fn verify_file(bytes: Vec<u8>, keyring: &Keyring) -> Result<Verified, RevocationError> {
    let list = verify(&bytes, keyring)?;
    Ok(Verified {
        list,
        sha256: crate::sha256_hex(&bytes),
        bytes,
    })
}

/// Read a list that this machine verified and stored in its own state directory earlier. The envelope and the
/// body are checked again; the signature is not, because the key that signed it may since have been retired
/// (state directories are trusted storage, `docs/threat-model.md`).
pub fn read_stored(bytes: Vec<u8>) -> Result<Verified, RevocationError> {
    let env = envelope::parse(&bytes, MAGIC, &[1, VERSION], MAX_BODY_BYTES)?;
    let list = parse_body(env.version, env.body)?;
    if list.signer.key_id != hex::encode(env.key_id) {
        return Err(RevocationError::Invalid(
            "the list names another signer than its header".into(),
        ));
    }
    Ok(Verified {
        list,
        sha256: crate::sha256_hex(&bytes),
        bytes,
    })
}

/// Every list stored in `dir` (a state directory's folder of verified lists, `<sha256>.ferry-rev`, written by
/// [`store`]), sorted by serial. A missing folder holds none. A damaged file is an error naming it: state
/// directories are trusted storage, so damage there needs a person.
pub fn read_stored_dir(dir: &Path) -> Result<Vec<Verified>, (PathBuf, String)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err((dir.to_path_buf(), e.to_string())),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(stem) = name.strip_suffix(".ferry-rev") else {
            continue;
        };
        if !crate::is_sha256_hex(stem) {
            continue;
        }
        let path = e.path();
        let v = read_bytes(&path)
            .and_then(read_stored)
            .map_err(|e| (path.clone(), e.to_string()))?;
        if v.sha256 != stem {
            return Err((
                path,
                "the list does not match the hash it is stored under".into(),
            ));
        }
        out.push(v);
    }
    out.sort_by(|a, b| (a.list.serial, &a.sha256).cmp(&(b.list.serial, &b.sha256)));
    Ok(out)
}

/// Store a verified list in `dir` as `<sha256>.ferry-rev` (atomic; a file already there with the same bytes is
/// kept). Returns its path.
pub fn store(dir: &Path, list: &Verified) -> Result<PathBuf, FsError> {
    fsutil::ensure_dir(dir)?;
    let path = dir.join(format!("{}.{EXTENSION}", list.sha256));
    fsutil::write_new_or_same(&path, &list.bytes)?;
    Ok(path)
}

/// The list a new global names (issue 15 §2): the stored list with the highest serial (ties: the later hash).
pub fn newest(lists: &[Verified]) -> Option<&Verified> {
    lists
        .iter()
        .max_by(|a, b| (a.list.serial, &a.sha256).cmp(&(b.list.serial, &b.sha256)))
}

/// Read a list file (bounded).
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, RevocationError> {
    Ok(fsutil::read_capped(
        path,
        envelope::max_file_len(MAX_BODY_BYTES),
    )?)
}

/// Read and [`verify`] a list file.
pub fn read(path: &Path, keyring: &Keyring) -> Result<RevocationList, RevocationError> {
    verify(&read_bytes(path)?, keyring)
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
            1_800_000_000,
            vec![Revoked {
                key_id: a.public().key_id_hex(),
                role: Role::Site,
                id: "site-a".into(),
                reason: "lost".into(),
            }],
            vec![RevokedBundle {
                sha256: "ab".repeat(32),
                reason: "poisoned".into(),
            }],
        );
        let bytes = sign(&list, &hq()).unwrap();
        let mut keys = ring(&[&hq(), &a]);
        let back = verify(&bytes, &keys).unwrap();
        assert_eq!(back.revoked, list.revoked);
        assert_eq!(back.signer.key_id, hq().public().key_id_hex());
        assert_eq!(back.apply(&mut keys), 1);
        assert!(keys.is_revoked(&a.public().key_id()));
        assert!(keys.is_bundle_revoked(&"ab".repeat(32)));
        assert!(back.check_federation("kit").is_ok());
        assert!(matches!(
            back.check_federation("other"),
            Err(RevocationError::WrongFederation { serial: 1, .. })
        ));
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
            sign(
                &RevocationList::new("kit", 1, 0, 1, vec![entry], vec![]),
                &hq(),
            )
            .unwrap(),
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
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        !msg.chars().any(char::is_control),
                        "{}: control character in {msg:?}",
                        f[0]
                    );
                    format!("{e:?}")
                        .chars()
                        .take_while(|c| c.is_alphanumeric())
                        .collect()
                }
            };
            assert_eq!(got, f[3], "{}: {}", f[0], f[5]);
            checked += 1;
        }
        assert!(checked > 10, "only {checked} revocation vectors");
    }
}
