//! Enrolment kits (issue 16): the folder HQ writes onto a stick for a new site, and the site reads to bind its
//! state to one federation, one site id and HQ's key.
//!
//! A kit folder holds:
//! - `kit.json`: the [`KitManifest`] (federation, architecture and model fingerprint, the site's id, HQ's
//!   public keys, the revocation list it carries);
//! - `kit.json.sig`: HQ's detached signature over `kit.json` ([`crate::filesig`]);
//! - `hq.pub`: HQ's public key file, for the operator to check its fingerprint over the phone;
//! - `revocations-<serial>.ferry-rev`: HQ's newest revocation list, when it has one;
//! - with a federation root key (issue 15 §4): `root.pub`, the root's public key, and
//!   `hq-keys-<serial>.ferry-keys`, the root-signed list of current HQ keys ([`crate::keylist`]), which must name
//!   every HQ key of the kit. A site enrolled from such a kit pins the root, not HQ's key, so it later accepts a
//!   new HQ key under a newer root-signed list;
//! - `README.txt`: what the operator does with it;
//! - `reply/<site>.pub`, once the site has enrolled: the site's public key, for HQ.
//!
//! The signature binds the manifest to the HQ key it names, so a kit altered on the way (another site id,
//! federation or revocation list) does not verify. A kit forged whole, with another key, does verify against
//! its own key: that is what the HQ key's fingerprint, read over the phone, is for (`ferry-client enroll
//! --hq-fingerprint`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::filesig::{self, FileSigError};
use crate::fsutil::{self, FsError};
use crate::keys::{KeyRecord, Keyring, PublicKey, Role, SecretKey};

/// `kit.json`'s format tag.
pub const KIT_FORMAT: &str = "ferry-kit/1";
/// The manifest's file name in a kit folder.
pub const MANIFEST_FILE: &str = "kit.json";
/// HQ's signature over the manifest.
pub const SIGNATURE_FILE: &str = "kit.json.sig";
/// HQ's public key file, for the operator.
pub const HQ_KEY_FILE: &str = "hq.pub";
/// The operator's instructions.
pub const README_FILE: &str = "README.txt";
/// The federation root's public key, in a root kit.
pub const ROOT_KEY_FILE: &str = "root.pub";
/// The folder a site writes its public key into for HQ.
pub const REPLY_DIR: &str = "reply";
/// Largest `kit.json` read.
const MAX_MANIFEST: u64 = 64 << 10;
/// Largest revocation list read from a kit.
const MAX_LIST: u64 = 16 << 20;

/// Why a kit could not be written or read. Nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    /// Reading or writing a file failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The folder is not a kit, or its manifest is malformed.
    #[error("{}: not a valid ferry enrolment kit: {why}", crate::escape_path(.path))]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong (escaped).
        why: String,
    },
    /// The manifest's signature does not verify under the HQ key it names.
    #[error("{}: the kit's signature does not verify ({source}): it was altered after HQ wrote it; ask HQ for a new kit", crate::escape_path(.path))]
    Signature {
        /// The kit folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: FileSigError,
    },
    /// A file the manifest names does not match its hash.
    #[error("{}: does not match the hash the kit names: it was altered or damaged; ask HQ for a new kit", crate::escape_path(.0))]
    FileChanged(PathBuf),
    /// The folder to write into is already there.
    #[error("{} already exists; remove it or write the kit elsewhere", crate::escape_path(.0))]
    Exists(PathBuf),
}

/// A file a kit carries beside its manifest, named by hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitFile {
    /// Its name inside the kit folder.
    pub file: String,
    /// SHA-256 of its bytes.
    pub sha256: String,
}

/// `kit.json`: what HQ binds a new site to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitManifest {
    /// `ferry-kit/1`.
    pub format: String,
    /// The federation.
    pub federation: String,
    /// The architecture the federation trains, when ferry can train it.
    pub arch: Option<String>,
    /// The model fingerprint every global of the federation carries.
    pub model_fingerprint: String,
    /// The site's id: its key's id and the name on its updates.
    pub site: String,
    /// HQ's public keys.
    pub hq_keys: Vec<KeyRecord>,
    /// HQ's newest revocation list, if any (`revocations-<serial>.ferry-rev`).
    pub revocations: Option<KitFile>,
    /// When HQ wrote the kit (seconds since the epoch).
    pub created: u64,
    /// The federation's root key, when it has one: the site pins it instead of HQ's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<KeyRecord>,
    /// With `root`: the root-signed list of HQ keys (`hq-keys-<serial>.ferry-keys`), naming every key in
    /// `hq_keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hq_key_list: Option<KitFile>,
}

impl KitManifest {
    /// A manifest for `site` of `federation`, signed by `hq` (the caller fills in `revocations`).
    pub fn new(
        federation: &str,
        arch: Option<&str>,
        model_fingerprint: &str,
        site: &str,
        hq: &PublicKey,
    ) -> KitManifest {
        KitManifest {
            format: KIT_FORMAT.into(),
            federation: federation.into(),
            arch: arch.map(str::to_string),
            model_fingerprint: model_fingerprint.into(),
            site: site.into(),
            hq_keys: vec![KeyRecord::from(hq)],
            revocations: None,
            created: crate::unix_now(),
            root: None,
            hq_key_list: None,
        }
    }

    /// Make this a root kit: `root` and its signed list of HQ keys `list` (the file's bytes). The list must
    /// verify under `root`, be of this federation and name every HQ key of the kit.
    pub fn with_root(mut self, root: &PublicKey, list: &[u8]) -> Result<KitManifest, String> {
        let (l, _) = check_root_list(&self, root, list)?;
        self.root = Some(KeyRecord::from(root));
        self.hq_key_list = Some(KitFile {
            file: format!("hq-keys-{}.{}", l.serial, crate::keylist::EXTENSION),
            sha256: crate::sha256_hex(list),
        });
        Ok(self)
    }

    /// The root key a root kit names (checked by [`KitManifest::validate`]).
    pub fn root_key(&self) -> Result<Option<PublicKey>, String> {
        self.root.as_ref().map(KeyRecord::to_key).transpose()
    }

    /// Check the fields (ids, keys, hashes), returning HQ's keys.
    pub fn validate(&self) -> Result<Vec<PublicKey>, String> {
        if self.format != KIT_FORMAT {
            return Err(format!(
                "format is {:?}, expected {KIT_FORMAT:?} (written by a newer ferry?)",
                crate::escape(&self.format)
            ));
        }
        crate::keys::validate_id("federation", &self.federation).map_err(|e| e.to_string())?;
        crate::keys::validate_id("site", &self.site).map_err(|e| e.to_string())?;
        if let Some(a) = &self.arch {
            crate::keys::validate_id("architecture", a).map_err(|e| e.to_string())?;
        }
        if !crate::is_sha256_hex(&self.model_fingerprint) {
            return Err("the model fingerprint is not a SHA-256".into());
        }
        let keys: Vec<PublicKey> = self
            .hq_keys
            .iter()
            .map(KeyRecord::to_key)
            .collect::<Result<_, _>>()?;
        if keys.is_empty() || keys.iter().any(|k| k.role != Role::Hq) {
            return Err("the kit must name HQ's keys, and only hq keys".into());
        }
        if let Some(r) = &self.revocations {
            if !crate::is_sha256_hex(&r.sha256) || !safe_name(&r.file) {
                return Err("the revocation list entry is malformed".into());
            }
        }
        match (self.root_key()?, &self.hq_key_list) {
            (Some(root), Some(l)) => {
                if root.role != Role::Root {
                    return Err(format!(
                        "the kit's root key is a {} key, not a root key",
                        root.role
                    ));
                }
                if !crate::is_sha256_hex(&l.sha256) || !safe_name(&l.file) {
                    return Err("the HQ key list entry is malformed".into());
                }
            }
            (None, None) => {}
            _ => return Err("a root kit names both the root key and its HQ key list".into()),
        }
        Ok(keys)
    }
}

/// Verify a root-signed HQ key list for the kit `m`: signed by `root`, of the kit's federation, naming every HQ
/// key of the kit (the key that signs the kit is one the root vouches for). Returns the list and its keys.
fn check_root_list(
    m: &KitManifest,
    root: &PublicKey,
    bytes: &[u8],
) -> Result<(crate::keylist::HqKeyList, Vec<PublicKey>), String> {
    let (list, keys) = crate::keylist::verify(bytes, root).map_err(|e| e.to_string())?;
    list.check_federation(&m.federation)
        .map_err(|e| e.to_string())?;
    for k in &m.hq_keys {
        let k = k.to_key()?;
        if !keys.contains(&k) {
            return Err(format!(
                "HQ key {} ({}) is not in the root-signed HQ key list {}",
                crate::escape(&k.id),
                k.key_id_hex(),
                list.serial
            ));
        }
    }
    Ok((list, keys))
}

/// A plain file name (no folder, no leading dot), as kit entries must be.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// A kit that verified: its manifest, HQ's keys and the revocation list it carries.
#[derive(Debug, Clone)]
pub struct Kit {
    /// The kit folder.
    pub dir: PathBuf,
    /// The signed manifest.
    pub manifest: KitManifest,
    /// HQ's keys, checked.
    pub hq_keys: Vec<PublicKey>,
    /// The revocation list: (file name for messages, bytes), its hash checked against the manifest.
    pub revocations: Option<(String, Vec<u8>)>,
    /// A root kit's root key.
    pub root: Option<PublicKey>,
    /// A root kit's HQ key list: (file name for messages, bytes), verified under `root`.
    pub hq_key_list: Option<(String, Vec<u8>)>,
}

/// Write a kit folder at `dir` (which must not exist): the manifest, HQ's signature over it, HQ's public key,
/// the revocation list `revocations` (its bytes; the manifest names its file and hash), for a root kit
/// ([`KitManifest::with_root`]) `root.pub` and the HQ key list `hq_key_list` (its bytes), and `readme`. Each file
/// is written atomically; a kit interrupted half way fails to verify and is written again.
pub fn write(
    dir: &Path,
    manifest: &KitManifest,
    key: &SecretKey,
    revocations: Option<&[u8]>,
    hq_key_list: Option<&[u8]>,
    readme: &str,
) -> Result<(), KitError> {
    let malformed = |why: String| KitError::Malformed {
        path: dir.join(MANIFEST_FILE),
        why,
    };
    manifest.validate().map_err(malformed)?;
    if !manifest.hq_keys.contains(&KeyRecord::from(&key.public())) {
        return Err(malformed(
            "the signing key is not among the kit's HQ keys".into(),
        ));
    }
    match (&manifest.revocations, revocations) {
        (Some(r), Some(bytes)) if crate::sha256_hex(bytes) == r.sha256 => {}
        (None, None) => {}
        _ => {
            return Err(malformed(
                "the revocation list and its entry disagree".into(),
            ))
        }
    }
    let root = manifest.root_key().map_err(malformed)?;
    match (&root, &manifest.hq_key_list, hq_key_list) {
        (Some(root), Some(l), Some(bytes)) if crate::sha256_hex(bytes) == l.sha256 => {
            check_root_list(manifest, root, bytes).map_err(malformed)?;
        }
        (None, None, None) => {}
        _ => return Err(malformed("the HQ key list and its entry disagree".into())),
    }
    if std::fs::symlink_metadata(dir).is_ok() {
        return Err(KitError::Exists(dir.to_path_buf()));
    }
    fsutil::ensure_dir(dir)?;
    let mut json = serde_json::to_vec_pretty(manifest).map_err(|e| malformed(e.to_string()))?;
    json.push(b'\n');
    if let (Some(r), Some(bytes)) = (&manifest.revocations, revocations) {
        fsutil::write_new_verified(&dir.join(&r.file), bytes)?;
    }
    if let (Some(root), Some(l), Some(bytes)) = (&root, &manifest.hq_key_list, hq_key_list) {
        fsutil::write_new_verified(&dir.join(&l.file), bytes)?;
        fsutil::write_new_verified(&dir.join(ROOT_KEY_FILE), root.to_file_text().as_bytes())?;
    }
    fsutil::write_new_verified(
        &dir.join(HQ_KEY_FILE),
        key.public().to_file_text().as_bytes(),
    )?;
    fsutil::write_new_verified(&dir.join(README_FILE), readme.as_bytes())?;
    fsutil::write_new_verified(
        &dir.join(SIGNATURE_FILE),
        filesig::sign(&json, key).as_bytes(),
    )?;
    // The manifest last: a folder without it is not a kit.
    fsutil::write_new_verified(&dir.join(MANIFEST_FILE), &json)?;
    Ok(())
}

/// Read and verify the kit at `dir`: the manifest parses and is valid, HQ's signature over it verifies under a
/// key it names, the revocation list it carries matches its hash, and a root kit's HQ key list matches its hash,
/// verifies under the root it names and names the kit's HQ keys. Nothing in the folder but the manifest, its
/// signature and those lists is read (`root.pub` is for the operator; the signed manifest holds the root).
pub fn read(dir: &Path) -> Result<Kit, KitError> {
    let path = dir.join(MANIFEST_FILE);
    let malformed = |why: String| KitError::Malformed {
        path: path.clone(),
        why,
    };
    if !dir.is_dir() {
        return Err(KitError::Malformed {
            path: dir.to_path_buf(),
            why: "not a folder (give the kit folder HQ wrote, e.g. /media/usb/kit-site-b)".into(),
        });
    }
    let bytes = match fsutil::read_capped(&path, MAX_MANIFEST) {
        Ok(b) => b,
        Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(malformed(format!("no {MANIFEST_FILE} in it")))
        }
        Err(e) => return Err(e.into()),
    };
    let manifest: KitManifest =
        serde_json::from_slice(&bytes).map_err(|e| malformed(crate::escape(&e.to_string())))?;
    let hq_keys = manifest
        .validate()
        .map_err(|e| malformed(crate::escape(&e)))?;
    let mut ring = Keyring::new();
    for k in &hq_keys {
        ring.add(k.clone()).map_err(|e| malformed(e.to_string()))?;
    }
    filesig::verify_file(&path, &dir.join(SIGNATURE_FILE), &ring).map_err(|source| {
        KitError::Signature {
            path: dir.to_path_buf(),
            source,
        }
    })?;
    let revocations = match &manifest.revocations {
        Some(r) => {
            let p = dir.join(&r.file);
            let bytes = fsutil::read_capped(&p, MAX_LIST)?;
            if crate::sha256_hex(&bytes) != r.sha256 {
                return Err(KitError::FileChanged(p));
            }
            Some((crate::escape_path(&p), bytes))
        }
        None => None,
    };
    let root = manifest
        .root_key()
        .map_err(|e| malformed(crate::escape(&e)))?;
    let hq_key_list = match (&root, &manifest.hq_key_list) {
        (Some(root), Some(l)) => {
            let p = dir.join(&l.file);
            let bytes = fsutil::read_capped(&p, MAX_LIST)?;
            if crate::sha256_hex(&bytes) != l.sha256 {
                return Err(KitError::FileChanged(p));
            }
            check_root_list(&manifest, root, &bytes).map_err(|why| KitError::Malformed {
                path: p.clone(),
                why: crate::escape(&why),
            })?;
            Some((crate::escape_path(&p), bytes))
        }
        _ => None,
    };
    Ok(Kit {
        dir: dir.to_path_buf(),
        manifest,
        hq_keys,
        revocations,
        root,
        hq_key_list,
    })
}

/// The reply folder of the kit at `dir`.
pub fn reply_dir(dir: &Path) -> PathBuf {
    dir.join(REPLY_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hq() -> SecretKey {
        SecretKey::from_seed(Role::Hq, "hq", [1; 32])
    }

    fn manifest() -> KitManifest {
        KitManifest::new(
            "city",
            Some("plate-ctc"),
            &"ab".repeat(32),
            "site-b",
            &hq().public(),
        )
    }

    #[test]
    fn a_written_kit_reads_back_and_an_altered_one_does_not() {
        let d = tempfile::tempdir().unwrap();
        let kit = d.path().join("kit-site-b");
        write(&kit, &manifest(), &hq(), None, None, "read me\n").unwrap();
        let k = read(&kit).unwrap();
        assert_eq!(k.manifest, manifest_with_time(k.manifest.created));
        assert_eq!(k.hq_keys, vec![hq().public()]);
        assert!(matches!(
            write(&kit, &manifest(), &hq(), None, None, ""),
            Err(KitError::Exists(_))
        ));

        // Another site id, same signature: refused.
        let text = std::fs::read_to_string(kit.join(MANIFEST_FILE)).unwrap();
        std::fs::write(kit.join(MANIFEST_FILE), text.replace("site-b", "site-c")).unwrap();
        assert!(
            matches!(read(&kit), Err(KitError::Signature { .. })),
            "{:?}",
            read(&kit)
        );

        // A kit signed by a key it does not name cannot be written.
        let other = SecretKey::from_seed(Role::Hq, "hq", [9; 32]);
        assert!(write(&d.path().join("k2"), &manifest(), &other, None, None, "").is_err());
        assert!(!d.path().join("k2").exists());
    }

    fn manifest_with_time(t: u64) -> KitManifest {
        let mut m = manifest();
        m.created = t;
        m
    }

    #[test]
    fn a_damaged_manifest_or_list_is_one_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let kit = d.path().join("kit");
        let list = b"not really a list".to_vec();
        let mut m = manifest();
        m.revocations = Some(KitFile {
            file: "revocations-1.ferry-rev".into(),
            sha256: crate::sha256_hex(&list),
        });
        write(&kit, &m, &hq(), Some(&list), None, "").unwrap();
        assert_eq!(read(&kit).unwrap().revocations.unwrap().1, list);
        std::fs::write(kit.join("revocations-1.ferry-rev"), b"changed").unwrap();
        assert!(matches!(read(&kit), Err(KitError::FileChanged(_))));
        std::fs::write(kit.join(MANIFEST_FILE), b"{\"format\": \"\x1b[31m\"").unwrap();
        let e = read(&kit).unwrap_err().to_string();
        assert!(
            e.contains("not a valid ferry enrolment kit") && !e.contains('\x1b'),
            "{e}"
        );
        assert!(read(d.path().join("missing").as_path()).is_err());
    }

    fn root() -> SecretKey {
        SecretKey::from_seed(Role::Root, "root", [5; 32])
    }

    fn key_list(federation: &str, keys: &[PublicKey], signer: &SecretKey) -> Vec<u8> {
        let now = crate::unix_now();
        crate::keylist::sign(
            &crate::keylist::HqKeyList::new(federation, 3, now, now + 1000, keys),
            signer,
        )
        .unwrap()
    }

    #[test]
    fn a_root_kit_carries_the_root_and_a_list_naming_its_hq_key() {
        let d = tempfile::tempdir().unwrap();
        let list = key_list("city", &[hq().public()], &root());
        let m = manifest().with_root(&root().public(), &list).unwrap();
        assert_eq!(m.hq_key_list.as_ref().unwrap().file, "hq-keys-3.ferry-keys");
        let kit = d.path().join("kit");
        write(&kit, &m, &hq(), None, Some(&list), "").unwrap();
        let k = read(&kit).unwrap();
        assert_eq!(k.root, Some(root().public()));
        assert_eq!(k.hq_key_list.unwrap().1, list);
        assert_eq!(
            std::fs::read_to_string(kit.join(ROOT_KEY_FILE)).unwrap(),
            root().public().to_file_text()
        );

        // A list that does not name the kit's HQ key, of another federation, or not signed by the root.
        let other = SecretKey::from_seed(Role::Hq, "hq-2", [7; 32]);
        for (bad, why) in [
            (
                key_list("city", &[other.public()], &root()),
                "not in the root-signed",
            ),
            (key_list("town", &[hq().public()], &root()), "town"),
            (
                key_list(
                    "city",
                    &[hq().public()],
                    &SecretKey::from_seed(Role::Root, "root", [6; 32]),
                ),
                "pins root key",
            ),
        ] {
            let e = manifest().with_root(&root().public(), &bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        // A list swapped on the stick for another one: its hash no longer matches.
        let newer = key_list("city", &[hq().public(), other.public()], &root());
        std::fs::write(kit.join("hq-keys-3.ferry-keys"), &newer).unwrap();
        assert!(matches!(read(&kit), Err(KitError::FileChanged(_))));
        // A manifest naming a root without its list does not validate.
        let mut half = manifest();
        half.root = Some(KeyRecord::from(&root().public()));
        assert!(write(&d.path().join("k3"), &half, &hq(), None, None, "").is_err());
        assert!(!d.path().join("k3").exists());
    }
}
