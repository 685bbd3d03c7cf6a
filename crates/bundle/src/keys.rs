//! Keys, key files and the keyring of trusted public keys.
//!
//! Key files are small text files (`field: value` lines, `#` comments) so an operator can read them and check a
//! key id over the phone. Trust is only ever what the operator names with `--trust`: a bundle never brings its
//! own key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::fsutil::{self, FsError};

/// Domain separation for key ids, so a key id can never be confused with another hash.
const KEY_ID_DOMAIN: &[u8] = b"ferry-key-id-v1\0";
/// Key files are tiny; anything bigger is not a key file.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// What a key is allowed to sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Headquarters: signs global bundles (and revocation lists).
    Hq,
    /// A site: signs updates for its own site id only.
    Site,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Hq => "hq",
            Role::Site => "site",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Role, KeyError> {
        match s {
            "hq" => Ok(Role::Hq),
            "site" => Ok(Role::Site),
            other => Err(KeyError::Invalid(format!(
                "unknown role {:?} (expected hq or site)",
                crate::escape(other)
            ))),
        }
    }
}

/// Why a key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading or writing a key file failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A key file is malformed.
    #[error("{}: not a valid ferry key file: {why}", .path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A secret key file is readable by other users.
    #[error("{}: secret key file is readable by group or others (mode {mode:o}); run `chmod 600` on it", .path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// A value (id, role) is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A `--trust` path held no public keys.
    #[error("{}: no public keys (*.pub) found to trust", .0.display())]
    NoTrustedKeys(PathBuf),
    /// Two different keys claim the same key id.
    #[error("two different trusted keys share key id {0}")]
    KeyIdCollision(String),
    /// The key's role does not allow this operation.
    #[error("{0}")]
    WrongRole(String),
}

/// Check an identifier (site id, HQ id, federation name): it ends up in file names, so it is kept to
/// `[a-z0-9][a-z0-9._-]{0,63}`.
pub fn validate_id(what: &str, id: &str) -> Result<(), KeyError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && id.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(KeyError::Invalid(format!(
            "{what} {:?} is not allowed: use 1-64 characters a-z 0-9 . _ - starting with a letter or digit",
            crate::escape(id)
        )))
    }
}

/// The short id of a public key: the first 8 bytes of SHA-256 over a domain prefix, the role, the id and the
/// key. Binding role and id means an edited `.pub` file (a site key relabelled `hq`) no longer matches its
/// own key id, and a bundle's key id names exactly one (role, id, key).
pub fn key_id(role: Role, id: &str, key: &VerifyingKey) -> [u8; 8] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(KEY_ID_DOMAIN);
    h.update(role.to_string().as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

/// A public key with the role and id it was issued for.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// What the key may sign.
    pub role: Role,
    /// The site id (or HQ id) the key belongs to.
    pub id: String,
    key: VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PublicKey({} {} {})",
            self.role,
            self.id,
            self.key_id_hex()
        )
    }
}

impl PublicKey {
    /// The key's short id.
    pub fn key_id(&self) -> [u8; 8] {
        key_id(self.role, &self.id, &self.key)
    }
    /// The key's short id in hex.
    pub fn key_id_hex(&self) -> String {
        hex::encode(self.key_id())
    }
    /// The Ed25519 verifying key.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }

    /// The `.pub` file text.
    pub fn to_file_text(&self) -> String {
        format!(
            "# ferry public key (Ed25519). Give this file to whoever must trust {} {}.\n\
             ferry-public-key: 1\nrole: {}\nid: {}\nkey-id: {}\nkey: {}\n",
            self.role,
            self.id,
            self.role,
            self.id,
            self.key_id_hex(),
            hex::encode(self.key.as_bytes())
        )
    }

    /// Parse `.pub` file text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<PublicKey, KeyError> {
        let f = Fields::parse(text, path, "ferry-public-key")?;
        let role: Role = f
            .get("role")?
            .parse()
            .map_err(|e| f.malformed(format!("{e}")))?;
        let id = f.get("id")?.to_string();
        validate_id("id", &id).map_err(|e| f.malformed(e.to_string()))?;
        let bytes = f.hex32("key")?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| f.malformed("key is not a valid Ed25519 public key".into()))?;
        let pk = PublicKey { role, id, key };
        if f.get("key-id")? != pk.key_id_hex() {
            return Err(f.malformed("key-id does not match the key".into()));
        }
        Ok(pk)
    }

    /// Read a `.pub` file.
    pub fn read(path: &Path) -> Result<PublicKey, KeyError> {
        let bytes = fsutil::read_capped(path, MAX_KEY_FILE)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Malformed {
            path: path.to_path_buf(),
            why: "not UTF-8 text".into(),
        })?;
        PublicKey::parse(text, path)
    }
}

/// A secret signing key with its role and id. Never leaves the machine it was made on.
pub struct SecretKey {
    role: Role,
    id: String,
    key: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SecretKey({} {} {})",
            self.role,
            self.id,
            self.public().key_id_hex()
        )
    }
}

impl SecretKey {
    /// Make a new key from the operating system's random source.
    pub fn generate(role: Role, id: &str) -> Result<SecretKey, KeyError> {
        validate_id("id", id)?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| KeyError::Invalid(format!("no randomness available: {e}")))?;
        Ok(SecretKey::from_seed(role, id, seed))
    }

    /// A key from a fixed seed: for test vectors only, never for real federations.
    pub fn from_seed(role: Role, id: &str, seed: [u8; 32]) -> SecretKey {
        SecretKey {
            role,
            id: id.to_string(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            role: self.role,
            id: self.id.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Sign `message` (the caller adds the domain prefix).
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    fn to_file_text(&self) -> String {
        format!(
            "# ferry SECRET key (Ed25519) for {} {}. Keep it private (mode 0600); never copy it to a stick.\n\
             ferry-secret-key: 1\nrole: {}\nid: {}\nkey-id: {}\nsecret: {}\n",
            self.role,
            self.id,
            self.role,
            self.id,
            self.public().key_id_hex(),
            hex::encode(self.key.to_bytes())
        )
    }

    /// Read a secret key file, refusing one that group or others can read.
    pub fn read(path: &Path) -> Result<SecretKey, KeyError> {
        check_private(path)?;
        let bytes = fsutil::read_capped(path, MAX_KEY_FILE)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Malformed {
            path: path.to_path_buf(),
            why: "not UTF-8 text".into(),
        })?;
        let f = Fields::parse(text, path, "ferry-secret-key")?;
        let role: Role = f
            .get("role")?
            .parse()
            .map_err(|e| f.malformed(format!("{e}")))?;
        let id = f.get("id")?.to_string();
        validate_id("id", &id).map_err(|e| f.malformed(e.to_string()))?;
        let seed = f.hex32("secret")?;
        let sk = SecretKey::from_seed(role, &id, seed);
        if f.get("key-id")? != sk.public().key_id_hex() {
            return Err(f.malformed("key-id does not match the secret".into()));
        }
        Ok(sk)
    }

    /// Write `<dir>/<id>.key` (mode 0600) and `<dir>/<id>.pub`, refusing to overwrite either.
    /// Returns the two paths.
    pub fn write_pair(&self, dir: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
        fsutil::ensure_dir(dir)?;
        let secret_path = dir.join(format!("{}.key", self.id));
        let public_path = dir.join(format!("{}.pub", self.id));
        for p in [&secret_path, &public_path] {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(FsError::Exists(p.clone()).into());
            }
        }
        fsutil::write_new_private(&secret_path, self.to_file_text().as_bytes())?;
        fsutil::write_new(&public_path, self.public().to_file_text().as_bytes())?;
        Ok((secret_path, public_path))
    }
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| FsError::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Off Unix there are no mode bits: on Windows who may read a file is its ACL, which the standard library cannot
/// read and this crate (no `unsafe`) does not parse. Rather than pretend to check, say so once per process
/// (issue 17).
#[cfg(not(unix))]
fn check_private(path: &Path) -> Result<(), KeyError> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        eprintln!(
            "warning: {}: who may read this secret key is not checked on this system; keep keys in a folder only \
             you can open (under your user profile), never on a shared drive or a stick",
            path.display()
        )
    });
    Ok(())
}

/// `field: value` lines of a key file (and of a file signature, [`crate::filesig`]).
pub(crate) struct Fields<'a> {
    path: &'a Path,
    map: BTreeMap<&'a str, &'a str>,
}

impl<'a> Fields<'a> {
    pub(crate) fn parse(
        text: &'a str,
        path: &'a Path,
        magic: &str,
    ) -> Result<Fields<'a>, KeyError> {
        let mut map = BTreeMap::new();
        let mut f = Fields {
            path,
            map: BTreeMap::new(),
        };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                return Err(f.malformed(format!(
                    "line {:?} is not `field: value`",
                    crate::escape(line)
                )));
            };
            if map.insert(k.trim(), v.trim()).is_some() {
                return Err(
                    f.malformed(format!("field {:?} appears twice", crate::escape(k.trim())))
                );
            }
        }
        f.map = map;
        match f.map.get(magic) {
            Some(&"1") => Ok(f),
            Some(v) => Err(f.malformed(format!(
                "{magic} version {:?} is not supported; upgrade ferry",
                crate::escape(v)
            ))),
            None => Err(f.malformed(format!(
                "missing `{magic}: 1` line (is this the right kind of key file?)"
            ))),
        }
    }

    fn malformed(&self, why: String) -> KeyError {
        KeyError::Malformed {
            path: self.path.to_path_buf(),
            why,
        }
    }

    pub(crate) fn get(&self, k: &str) -> Result<&'a str, KeyError> {
        self.map
            .get(k)
            .copied()
            .ok_or_else(|| self.malformed(format!("missing field `{k}`")))
    }

    fn hex32(&self, k: &str) -> Result<[u8; 32], KeyError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(self.get(k)?, &mut out)
            .map_err(|_| self.malformed(format!("`{k}` is not 64 hex digits")))?;
        Ok(out)
    }
}

/// The public keys an operator trusts, by key id.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<[u8; 8], PublicKey>,
    revoked: std::collections::BTreeSet<[u8; 8]>,
}

impl Keyring {
    /// An empty keyring (verifies nothing).
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Add one key; adding the same key twice is harmless.
    pub fn add(&mut self, key: PublicKey) -> Result<(), KeyError> {
        let id = key.key_id();
        match self.keys.get(&id) {
            Some(existing) if existing != &key => Err(KeyError::KeyIdCollision(hex::encode(id))),
            _ => {
                self.keys.insert(id, key);
                Ok(())
            }
        }
    }

    /// Load each `--trust` path: a `.pub` file, or a directory whose `*.pub` files are all trusted.
    pub fn load(paths: &[PathBuf]) -> Result<Keyring, KeyError> {
        let mut ring = Keyring::new();
        for path in paths {
            let meta = std::fs::metadata(path).map_err(|e| FsError::io(path, e))?;
            if meta.is_dir() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|e| FsError::io(path, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "pub"))
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(KeyError::NoTrustedKeys(path.clone()));
                }
                for f in files {
                    ring.add(PublicKey::read(&f)?)?;
                }
            } else {
                ring.add(PublicKey::read(path)?)?;
            }
        }
        Ok(ring)
    }

    /// Mark a key id revoked: bundles it signed no longer verify.
    pub fn revoke(&mut self, key_id: [u8; 8]) {
        self.revoked.insert(key_id);
    }

    /// Whether the key id is revoked.
    pub fn is_revoked(&self, key_id: &[u8; 8]) -> bool {
        self.revoked.contains(key_id)
    }

    /// The trusted key with this id.
    pub fn get(&self, key_id: &[u8; 8]) -> Option<&PublicKey> {
        self.keys.get(key_id)
    }

    /// All trusted keys, by key id.
    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }

    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A keyring trusting the public halves of `keys` (for tests).
#[cfg(test)]
pub(crate) fn test_ring(keys: &[&SecretKey]) -> Keyring {
    let mut r = Keyring::new();
    for k in keys {
        r.add(k.public()).unwrap();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_secret_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let sk = SecretKey::generate(Role::Site, "site-a").unwrap();
        let (sp, pp) = sk.write_pair(dir.path()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&sp).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let back = SecretKey::read(&sp).unwrap();
        assert_eq!(back.public(), sk.public());
        assert_eq!(PublicKey::read(&pp).unwrap(), sk.public());
        // Refuses to overwrite.
        assert!(matches!(
            sk.write_pair(dir.path()),
            Err(KeyError::Fs(FsError::Exists(_)))
        ));
    }

    #[cfg(unix)]
    #[test]
    fn refuses_group_readable_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (sp, _) = SecretKey::generate(Role::Hq, "hq")
            .unwrap()
            .write_pair(dir.path())
            .unwrap();
        std::fs::set_permissions(&sp, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            SecretKey::read(&sp),
            Err(KeyError::Permissions { mode: 0o640, .. })
        ));
    }

    #[test]
    fn rejects_bad_ids_and_tampered_key_files() {
        for bad in [
            "",
            "Site",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            &"a".repeat(65),
            "a b",
            "é",
        ] {
            assert!(validate_id("id", bad).is_err(), "{bad:?}");
        }
        let pk = SecretKey::generate(Role::Site, "s1").unwrap().public();
        let text = pk.to_file_text();
        let p = Path::new("x.pub");
        assert!(PublicKey::parse(&text, p).is_ok());
        assert!(
            PublicKey::parse(&text.replace("role: site", "role: hq"), p).is_err(),
            "role is bound by key-id"
        );
        assert!(
            PublicKey::parse(&text.replace("id: s1", "id: s2"), p).is_err(),
            "id is bound by key-id"
        );
        assert!(PublicKey::parse(
            &text.replace("ferry-public-key: 1", "ferry-public-key: 2"),
            p
        )
        .is_err());
        let key_hex = hex::encode(pk.verifying_key().as_bytes());
        let mut other = key_hex.clone().into_bytes();
        other[0] = if other[0] == b'0' { b'1' } else { b'0' };
        let swapped = text.replace(&key_hex, std::str::from_utf8(&other).unwrap());
        assert!(PublicKey::parse(&swapped, p).is_err());
        assert!(PublicKey::parse("garbage", p).is_err());
    }
}
