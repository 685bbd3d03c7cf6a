//! Keys, key files and the keyring of trusted public keys.
//!
//! Key files are small text files (`field: value` lines, `#` comments) so an operator can read them and compare a
//! key's full fingerprint over the phone. Trust is only ever what the operator names with `--trust` (or what an
//! offline root key vouches for, [`crate::keylist`]): a bundle never brings its own key.
//!
//! A secret key file is either plain (`ferry-secret-key: 1`, the seed in hex) or protected by a passphrase
//! (`ferry-secret-key: 2`, the seed encrypted with age's scrypt recipient, issue 15 §4), so that a lost PC or a
//! copied disk does not give the key away. Secret bytes are wiped from memory when dropped (`zeroize`).
//!
//! Every ferry key is also an X25519 key for age (issue 15 §5), derived, not stored: the recipient is the
//! Montgomery form of the Ed25519 public key ([`PublicKey::recipient`]) and the identity is the Ed25519 secret
//! scalar ([`SecretKey::age_identity`]), the conversion libsodium and age's `ssh-ed25519` recipients use. So the
//! key an operator already compared over the phone (its fingerprint) also names whom a bundle is encrypted to,
//! a protected `.key` protects the decryption key too, and there is no second key file to lose or mix up.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use age::secrecy::{ExposeSecret, SecretString};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use zeroize::{Zeroize, Zeroizing};

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
    /// The federation's offline root key: signs only the short, expiring list of current HQ keys
    /// ([`crate::keylist`]), never a bundle or a revocation list.
    Root,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Hq => "hq",
            Role::Site => "site",
            Role::Root => "root",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Role, KeyError> {
        match s {
            "hq" => Ok(Role::Hq),
            "site" => Ok(Role::Site),
            "root" => Ok(Role::Root),
            other => Err(KeyError::Invalid(format!(
                "unknown role {:?} (expected hq, site or root)",
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
    #[error("{}: not a valid ferry key file: {why}", crate::escape_path(.path))]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A secret key file is readable by other users.
    #[error("{}: secret key file is readable by group or others (mode {mode:o}); run `chmod 600` on it", crate::escape_path(.path))]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// A public key file was given where the secret key is needed (`--key site-a.pub`, issue 17).
    #[error("{}: this is a public key; this option takes the secret key made with it ({}), which stays on the machine that signs", crate::escape_path(.0), crate::escape_path(&.0.with_extension("key")))]
    PublicNotSecret(PathBuf),
    /// A value (id, role) is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A `--trust` path held no public keys.
    #[error("{}: no public keys (*.pub) found to trust", crate::escape_path(.0))]
    NoTrustedKeys(PathBuf),
    /// Two different keys claim the same key id.
    #[error("two different trusted keys share key id {0}")]
    KeyIdCollision(String),
    /// Two different trusted keys claim the same role and id (issue 15 §8): one of them is not who it says.
    #[error("two different trusted keys both claim to be {role} {id:?} (key ids {first} and {second}); trust only one of them")]
    DuplicateId {
        /// The role both claim.
        role: Role,
        /// The id both claim.
        id: String,
        /// Key id of the key loaded first.
        first: String,
        /// Key id of the other.
        second: String,
    },
    /// The secret key file is protected by a passphrase and none was available.
    #[error("{}: this secret key is protected by a passphrase; set FERRY_PASSPHRASE or run the command in a terminal to be asked for it", crate::escape_path(.0))]
    NeedsPassphrase(PathBuf),
    /// The passphrase did not decrypt the key (or the protected part was altered).
    #[error("{}: wrong passphrase, or the protected key was altered", crate::escape_path(.0))]
    WrongPassphrase(PathBuf),
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
    let d = fingerprint(role, id, key);
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

/// The full fingerprint of a public key: the whole SHA-256 whose first 8 bytes are the key id. 256 bits, so two
/// people reading it to each other over the phone compare the key itself, not a 64-bit prefix that an attacker
/// can match with a few days of computing (issue 15 §4).
pub fn fingerprint(role: Role, id: &str, key: &VerifyingKey) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(KEY_ID_DOMAIN);
    h.update(role.to_string().as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    h.finalize().into()
}

/// A fingerprint as it is read aloud: 16 groups of 4 lower-case hex digits (the first four groups are the key
/// id).
pub fn fingerprint_text(fp: &[u8; 32]) -> String {
    let hex = hex::encode(fp);
    let groups: Vec<&str> = (0..16).map(|i| &hex[4 * i..4 * i + 4]).collect();
    groups.join(" ")
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
    /// The key's full fingerprint, grouped for reading aloud ([`fingerprint_text`]).
    pub fn fingerprint(&self) -> String {
        fingerprint_text(&fingerprint(self.role, &self.id, &self.key))
    }
    /// A public key from its parts (role, id and the 32 key bytes), checking the id and the curve point.
    pub fn from_parts(role: Role, id: &str, key: &[u8; 32]) -> Result<PublicKey, KeyError> {
        validate_id("id", id)?;
        let key = VerifyingKey::from_bytes(key)
            .map_err(|_| KeyError::Invalid("not a valid Ed25519 public key".into()))?;
        Ok(PublicKey {
            role,
            id: id.to_string(),
            key,
        })
    }
    /// The 32 public key bytes in hex.
    pub fn key_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }
    /// The Ed25519 verifying key.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }

    /// The age X25519 recipient of this key (`age1…`): the Montgomery form of the Ed25519 public key, so the
    /// key's fingerprint also pins whom a payload is encrypted to (issue 15 §5).
    pub fn recipient_text(&self) -> String {
        age_bech32(AGE_RECIPIENT_HRP, self.key.to_montgomery().as_bytes())
    }

    /// The key an age recipient was derived from ([`PublicKey::recipient_text`]), given the role, id and key
    /// id the manifest lists with it: an X25519 point is two Ed25519 points (the sign of x is lost), and the
    /// key id, which hashes the full key, picks the one (issue 15 §5: HQ re-encrypts the next global to the
    /// recipients its current global names, without the operator retyping them).
    pub fn from_recipient(
        role: Role,
        id: &str,
        key_id_hex: &str,
        recipient: &str,
    ) -> Result<PublicKey, KeyError> {
        let bad =
            |why: &str| KeyError::Invalid(format!("recipient of {}: {why}", crate::escape(id)));
        let (hrp, data) = bech32::decode(recipient).map_err(|_| bad("not an age1… recipient"))?;
        let u: [u8; 32] = data.try_into().map_err(|_| bad("not 32 bytes"))?;
        if hrp.as_str() != AGE_RECIPIENT_HRP || age_bech32(AGE_RECIPIENT_HRP, &u) != recipient {
            return Err(bad("not a canonical age1… recipient"));
        }
        let point = curve25519_dalek::montgomery::MontgomeryPoint(u);
        for sign in [0u8, 1] {
            let Some(ed) = point.to_edwards(sign) else {
                continue;
            };
            if let Ok(k) = PublicKey::from_parts(role, id, &ed.compress().to_bytes()) {
                if k.key_id_hex() == key_id_hex && k.recipient_text() == recipient {
                    return Ok(k);
                }
            }
        }
        Err(bad("no Ed25519 key with this key id gives it"))
    }

    /// [`PublicKey::recipient_text`] as the age crate's recipient.
    pub fn recipient(&self) -> age::x25519::Recipient {
        // The text is age's own encoding of 32 bytes, which age always parses back.
        self.recipient_text()
            .parse()
            .unwrap_or_else(|e| unreachable!("age rejected its own recipient encoding: {e}"))
    }

    /// The `.pub` file text.
    pub fn to_file_text(&self) -> String {
        format!(
            "# ferry public key (Ed25519). Give this file to whoever must trust {} {}.\n\
             # Compare the fingerprint over the phone before trusting it.\n\
             ferry-public-key: 1\nrole: {}\nid: {}\nkey-id: {}\nfingerprint: {}\nkey: {}\n",
            self.role,
            self.id,
            self.role,
            self.id,
            self.key_id_hex(),
            self.fingerprint(),
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
        // Optional (files written before issue 15 lack it); when present it must be the key's.
        if let Some(fp) = f.map.get("fingerprint") {
            if fp.replace(' ', "") != pk.fingerprint().replace(' ', "") {
                return Err(f.malformed("fingerprint does not match the key".into()));
            }
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

/// A public key as a record in a signed list or a state file: role, id, key id and the key itself, all text.
/// [`KeyRecord::to_key`] checks that they agree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// The key's role.
    pub role: Role,
    /// The key's id field.
    pub id: String,
    /// Its key id, 16 lower-case hex digits.
    pub key_id: String,
    /// The 32-byte Ed25519 public key, 64 lower-case hex digits.
    pub key: String,
}

impl From<&PublicKey> for KeyRecord {
    fn from(k: &PublicKey) -> KeyRecord {
        KeyRecord {
            role: k.role,
            id: k.id.clone(),
            key_id: k.key_id_hex(),
            key: k.key_hex(),
        }
    }
}

impl KeyRecord {
    /// The public key, checking the id, the key's encoding and curve point, and that `key_id` is its key id.
    pub fn to_key(&self) -> Result<PublicKey, String> {
        let mut raw = [0u8; 32];
        if self.key.len() != 64
            || self.key.bytes().any(|b| b.is_ascii_uppercase())
            || hex::decode_to_slice(&self.key, &mut raw).is_err()
        {
            return Err("a key is not 64 lower-case hex digits".into());
        }
        let pk = PublicKey::from_parts(self.role, &self.id, &raw).map_err(|e| e.to_string())?;
        if pk.key_id_hex() != self.key_id {
            return Err(format!(
                "key {:?}: key_id does not match the key",
                crate::escape(&self.id)
            ));
        }
        Ok(pk)
    }
}

/// A secret signing key with its role and id. Never leaves the machine it was made on. The seed is wiped from
/// memory when the key is dropped (ed25519-dalek's `zeroize` feature).
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

/// How a new secret key file is protected: with a passphrase, through age's scrypt recipient.
pub struct Protection {
    passphrase: SecretString,
    work_factor: Option<u8>,
}

impl Protection {
    /// Protect with `passphrase` at age's default scrypt work factor (about one second on this machine).
    pub fn passphrase(passphrase: SecretString) -> Protection {
        Protection {
            passphrase,
            work_factor: None,
        }
    }

    /// Protect with `passphrase` at scrypt work factor `2^log_n`: for tests, which cannot wait a second per key.
    pub fn with_work_factor(passphrase: SecretString, log_n: u8) -> Protection {
        Protection {
            passphrase,
            work_factor: Some(log_n),
        }
    }
}

/// age's Bech32 prefixes of X25519 recipients and identities.
const AGE_RECIPIENT_HRP: &str = "age";
const AGE_SECRET_HRP: &str = "age-secret-key-";

/// 32 key bytes in age's Bech32 text form (lower case; identities are shown upper case).
fn age_bech32(hrp: &str, bytes: &[u8]) -> String {
    let hrp = bech32::Hrp::parse(hrp).unwrap_or_else(|e| unreachable!("fixed prefix: {e}"));
    bech32::encode_lower::<bech32::Bech32>(hrp, bytes)
        .unwrap_or_else(|e| unreachable!("32 bytes fit a Bech32 string: {e}"))
}

/// The first line of the age armour that holds a protected key's seed.
const ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";

impl SecretKey {
    /// Make a new key from the operating system's random source.
    pub fn generate(role: Role, id: &str) -> Result<SecretKey, KeyError> {
        validate_id("id", id)?;
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut seed[..])
            .map_err(|e| KeyError::Invalid(format!("no randomness available: {e}")))?;
        Ok(SecretKey::from_seed(role, id, *seed))
    }

    /// A key from a fixed seed: for test vectors only, never for real federations.
    pub fn from_seed(role: Role, id: &str, mut seed: [u8; 32]) -> SecretKey {
        let key = SigningKey::from_bytes(&seed);
        seed.zeroize();
        SecretKey {
            role,
            id: id.to_string(),
            key,
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

    /// The age X25519 identity of this key: the Ed25519 secret scalar (SHA-512 of the seed, first half; X25519
    /// clamps it), whose public half is [`PublicKey::recipient`] (issue 15 §5).
    pub fn age_identity(&self) -> age::x25519::Identity {
        let text = self.age_identity_text();
        text.expose_secret()
            .parse()
            .unwrap_or_else(|e| unreachable!("age rejected its own identity encoding: {e}"))
    }

    /// The age identity as text (`AGE-SECRET-KEY-1…`), which `age -d -i FILE` reads: how an operator decrypts a
    /// payload with the standard tool (`ferry-client age-identity`).
    pub fn age_identity_text(&self) -> SecretString {
        let scalar = Zeroizing::new(self.key.to_scalar_bytes());
        let text = Zeroizing::new(age_bech32(AGE_SECRET_HRP, &scalar[..]));
        SecretString::from(text.to_uppercase())
    }

    /// The text of an age identity file for [`SecretKey::age_identity`], which `age -d -i FILE` reads: two
    /// comment lines naming the key, then the identity. Wiped from memory when dropped.
    pub fn age_identity_file_text(&self) -> Zeroizing<String> {
        let public = self.public();
        Zeroizing::new(format!(
            "# age identity derived from ferry key {} {} (key id {}); keep it private (mode 0600)\n\
             # public key: {}\n{}\n",
            self.role,
            self.id,
            public.key_id_hex(),
            public.recipient_text(),
            self.age_identity_text().expose_secret()
        ))
    }

    /// Sign `message` (the caller adds the domain prefix).
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    fn secret_line(&self) -> Zeroizing<String> {
        let mut seed = self.key.to_bytes();
        let line = Zeroizing::new(format!("secret: {}\n", hex::encode(seed)));
        seed.zeroize();
        line
    }

    fn file_head(&self, version: u8, what: &str) -> String {
        format!(
            "# ferry SECRET key (Ed25519) for {} {}{what}. Keep it private (mode 0600); never copy it to a stick.\n\
             ferry-secret-key: {version}\nrole: {}\nid: {}\nkey-id: {}\n",
            self.role,
            self.id,
            self.role,
            self.id,
            self.public().key_id_hex(),
        )
    }

    fn to_file_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(self.file_head(1, ""));
        text.push_str(&self.secret_line());
        text
    }

    /// The text of a passphrase-protected key file: the public fields in the clear, then the `secret:` line
    /// encrypted to the passphrase with age (scrypt) in age's ASCII armour. `age -d` on the armoured part
    /// recovers the line with the standard age tool.
    fn to_protected_text(&self, protection: &Protection) -> Result<String, KeyError> {
        use std::io::Write;
        let mut recipient = age::scrypt::Recipient::new(protection.passphrase.clone());
        if let Some(log_n) = protection.work_factor {
            recipient.set_work_factor(log_n);
        }
        let fail = |e: &dyn fmt::Display| KeyError::Invalid(format!("cannot protect the key: {e}"));
        let encryptor =
            age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
                .map_err(|e| fail(&e))?;
        let mut armored = Vec::new();
        let armor =
            age::armor::ArmoredWriter::wrap_output(&mut armored, age::armor::Format::AsciiArmor)
                .map_err(|e| fail(&e))?;
        let mut w = encryptor.wrap_output(armor).map_err(|e| fail(&e))?;
        w.write_all(self.secret_line().as_bytes())
            .map_err(|e| fail(&e))?;
        w.finish().and_then(|a| a.finish()).map_err(|e| fail(&e))?;
        let armored = String::from_utf8(armored).map_err(|e| fail(&e))?;
        Ok(format!(
            "{}# The secret is encrypted with a passphrase (age, scrypt). Standard tools can read it:\n\
             #   sed -n '/BEGIN AGE/,$p' THIS-FILE | age -d\n{armored}",
            self.file_head(2, ", protected by a passphrase")
        ))
    }

    /// Read a secret key file, refusing one that group or others can read. A passphrase-protected key needs
    /// [`SecretKey::read_with`]; here it is refused with [`KeyError::NeedsPassphrase`].
    pub fn read(path: &Path) -> Result<SecretKey, KeyError> {
        SecretKey::read_with(path, || Err(KeyError::NeedsPassphrase(path.to_path_buf())))
    }

    /// Whether the key file at `path` is passphrase-protected (without reading the secret).
    pub fn is_protected(path: &Path) -> Result<bool, KeyError> {
        let bytes = Zeroizing::new(fsutil::read_capped(path, MAX_KEY_FILE)?);
        Ok(std::str::from_utf8(&bytes).is_ok_and(|t| t.contains(ARMOR_BEGIN)))
    }

    /// Read a secret key file; `passphrase` is asked only if the file is protected.
    pub fn read_with(
        path: &Path,
        passphrase: impl FnOnce() -> Result<SecretString, KeyError>,
    ) -> Result<SecretKey, KeyError> {
        let bytes = Zeroizing::new(fsutil::read_capped(path, MAX_KEY_FILE)?);
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Malformed {
            path: path.to_path_buf(),
            why: "not UTF-8 text".into(),
        })?;
        // A .pub file is readable by all on purpose: say what it is rather than asking for `chmod 600`.
        if text
            .lines()
            .any(|l| l.trim_start().starts_with("ferry-public-key:"))
        {
            return Err(KeyError::PublicNotSecret(path.to_path_buf()));
        }
        check_private(path)?;
        let (head, armor) = match text.find(ARMOR_BEGIN) {
            Some(i) => (&text[..i], Some(&text[i..])),
            None => (text, None),
        };
        let (f, version) = Fields::parse_versioned(head, path, "ferry-secret-key", &["1", "2"])?;
        let role: Role = f
            .get("role")?
            .parse()
            .map_err(|e| f.malformed(format!("{e}")))?;
        let id = f.get("id")?.to_string();
        validate_id("id", &id).map_err(|e| f.malformed(e.to_string()))?;
        let seed = match (version, armor) {
            ("1", None) => f.hex32("secret")?,
            ("2", Some(armor)) => {
                if f.map.contains_key("secret") {
                    return Err(f.malformed("a protected key holds no plain `secret` field".into()));
                }
                let plain = decrypt_secret(armor, passphrase()?, path)?;
                let text = std::str::from_utf8(&plain)
                    .map_err(|_| f.malformed("the protected part is not text".into()))?;
                let inner = Fields::parse_lines(text, path)?;
                inner.hex32("secret")?
            }
            ("1", Some(_)) => {
                return Err(
                    f.malformed("an age-encrypted part in a version-1 (plain) key file".into())
                )
            }
            _ => {
                return Err(f.malformed(
                    "a version-2 key file must hold its secret encrypted (age armour)".into(),
                ))
            }
        };
        let sk = SecretKey::from_seed(role, &id, *seed);
        if f.get("key-id")? != sk.public().key_id_hex() {
            return Err(f.malformed("key-id does not match the secret".into()));
        }
        Ok(sk)
    }

    /// Write `<dir>/<id>.key` (mode 0600) and `<dir>/<id>.pub`, refusing to overwrite either.
    /// Returns the two paths.
    pub fn write_pair(&self, dir: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
        self.write_pair_as(dir, self.to_file_text())
    }

    /// [`SecretKey::write_pair`] with the secret protected by a passphrase.
    pub fn write_pair_protected(
        &self,
        dir: &Path,
        protection: &Protection,
    ) -> Result<(PathBuf, PathBuf), KeyError> {
        self.write_pair_as(dir, Zeroizing::new(self.to_protected_text(protection)?))
    }

    fn write_pair_as(
        &self,
        dir: &Path,
        secret_text: Zeroizing<String>,
    ) -> Result<(PathBuf, PathBuf), KeyError> {
        fsutil::ensure_dir(dir)?;
        let secret_path = dir.join(format!("{}.key", self.id));
        let public_path = dir.join(format!("{}.pub", self.id));
        for p in [&secret_path, &public_path] {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(FsError::Exists(p.clone()).into());
            }
        }
        fsutil::write_new_private(&secret_path, secret_text.as_bytes())?;
        fsutil::write_new(&public_path, self.public().to_file_text().as_bytes())?;
        Ok((secret_path, public_path))
    }
}

/// Decrypt the armoured `secret:` line of a protected key with the passphrase. Every failure of the
/// passphrase or of the ciphertext's integrity is one error: the message leaks nothing.
fn decrypt_secret(
    armor: &str,
    passphrase: SecretString,
    path: &Path,
) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    use std::io::Read;
    let malformed = |why: &str| KeyError::Malformed {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let decryptor = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(armor.as_bytes()))
        .map_err(|_| malformed("the protected part is not a readable age file"))?;
    if !decryptor.is_scrypt() {
        return Err(malformed(
            "the protected part is not encrypted with a passphrase",
        ));
    }
    let identity = age::scrypt::Identity::new(passphrase);
    let mut reader = decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::ExcessiveWork { .. } => {
                malformed("its scrypt work factor is larger than this machine accepts")
            }
            _ => KeyError::WrongPassphrase(path.to_path_buf()),
        })?;
    let mut out = Zeroizing::new(Vec::new());
    (&mut reader)
        .take(1024)
        .read_to_end(&mut out)
        .map_err(|_| KeyError::WrongPassphrase(path.to_path_buf()))?;
    Ok(out)
}

/// The passphrase as the age crate takes it.
pub fn passphrase(text: String) -> SecretString {
    SecretString::from(text)
}

/// Whether two passphrases are equal (for "type it again" prompts).
pub fn same_passphrase(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret() == b.expose_secret()
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
            crate::escape_path(path)
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
    /// Parse the `field: value` lines, then require the version field `magic` to be `1`.
    pub(crate) fn parse(
        text: &'a str,
        path: &'a Path,
        magic: &str,
    ) -> Result<Fields<'a>, KeyError> {
        Fields::parse_versioned(text, path, magic, &["1"]).map(|(f, _)| f)
    }

    /// Parse the `field: value` lines, then require the version field `magic` to be one of `versions`.
    fn parse_versioned(
        text: &'a str,
        path: &'a Path,
        magic: &str,
        versions: &[&'static str],
    ) -> Result<(Fields<'a>, &'static str), KeyError> {
        let f = Fields::parse_lines(text, path)?;
        match f.map.get(magic) {
            Some(v) => match versions.iter().find(|x| *x == v) {
                Some(v) => Ok((f, v)),
                None => Err(f.malformed(format!(
                    "{magic} version {:?} is not supported; upgrade ferry",
                    crate::escape(v)
                ))),
            },
            None => Err(f.malformed(format!(
                "missing `{magic}: 1` line (is this the right kind of key file?)"
            ))),
        }
    }

    fn parse_lines(text: &'a str, path: &'a Path) -> Result<Fields<'a>, KeyError> {
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
        Ok(f)
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

    fn hex32(&self, k: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        let mut out = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(self.get(k)?, &mut out[..])
            .map_err(|_| self.malformed(format!("`{k}` is not 64 hex digits")))?;
        Ok(out)
    }
}

/// The public keys an operator trusts, by key id, and the operator's own decryption identities (issue 15 §5).
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<[u8; 8], PublicKey>,
    revoked: std::collections::BTreeSet<[u8; 8]>,
    revoked_bundles: std::collections::BTreeSet<String>,
    identities: Vec<DecryptionKey>,
}

/// One of the operator's own keys, as an age X25519 identity that opens payloads encrypted to it.
#[derive(Clone)]
pub struct DecryptionKey {
    /// The key's id (site id or HQ id), for messages.
    pub id: String,
    /// Its recipient, `age1…`.
    pub recipient: String,
    identity: age::x25519::Identity,
}

impl fmt::Debug for DecryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DecryptionKey({} {})", self.id, self.recipient)
    }
}

impl DecryptionKey {
    /// The age identity.
    pub fn identity(&self) -> &age::x25519::Identity {
        &self.identity
    }

    /// Read an age identity file (what `age-identity` writes: `#` comment lines, then one `AGE-SECRET-KEY-1…`
    /// line); `id` names it in messages. It opens payloads encrypted to it but signs nothing: how HQ keeps a
    /// retired key's power to read what was encrypted to it without keeping its power to sign. Like a secret
    /// key file, it must not be readable by group or others.
    pub fn read_identity_file(path: &Path, id: &str) -> Result<DecryptionKey, KeyError> {
        let malformed = |why: &str| KeyError::Malformed {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        check_private(path)?;
        let bytes = Zeroizing::new(fsutil::read_capped(path, MAX_KEY_FILE)?);
        let text = std::str::from_utf8(&bytes).map_err(|_| malformed("not UTF-8 text"))?;
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let line = lines
            .next()
            .ok_or_else(|| malformed("no age identity (AGE-SECRET-KEY-1…) in it"))?;
        if lines.next().is_some() {
            return Err(malformed("more than one age identity in it"));
        }
        let identity: age::x25519::Identity = line
            .parse()
            .map_err(|_| malformed("not an age X25519 identity (AGE-SECRET-KEY-1…)"))?;
        Ok(DecryptionKey {
            id: id.to_string(),
            recipient: identity.to_public().to_string(),
            identity,
        })
    }
}

impl Keyring {
    /// An empty keyring (verifies nothing).
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Add one key; adding the same key twice is harmless. A different key with the same key id, or with the
    /// same role and id as a key already trusted, is refused: two keys that both claim to be `hq` mean one of
    /// them is an impostor (issue 15 §8), and the operator must say which to trust.
    pub fn add(&mut self, key: PublicKey) -> Result<(), KeyError> {
        let id = key.key_id();
        match self.keys.get(&id) {
            Some(existing) if existing != &key => Err(KeyError::KeyIdCollision(hex::encode(id))),
            Some(_) => Ok(()),
            None => {
                if let Some(other) = self
                    .keys
                    .values()
                    .find(|k| k.role == key.role && k.id == key.id)
                {
                    return Err(KeyError::DuplicateId {
                        role: key.role,
                        id: key.id.clone(),
                        first: other.key_id_hex(),
                        second: key.key_id_hex(),
                    });
                }
                self.keys.insert(id, key);
                Ok(())
            }
        }
    }

    /// Forget a trusted key (its revocation, if any, stays).
    pub fn remove(&mut self, key_id: &[u8; 8]) -> Option<PublicKey> {
        self.keys.remove(key_id)
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

    /// Withdraw one bundle by its file hash (lower-case hex): it no longer verifies, whoever signed it.
    pub fn revoke_bundle(&mut self, sha256: &str) {
        self.revoked_bundles.insert(sha256.to_string());
    }

    /// Whether the bundle with this file hash was withdrawn.
    pub fn is_bundle_revoked(&self, sha256: &str) -> bool {
        self.revoked_bundles.contains(sha256)
    }

    /// The trusted key with this id.
    pub fn get(&self, key_id: &[u8; 8]) -> Option<&PublicKey> {
        self.keys.get(key_id)
    }

    /// All trusted keys, by key id.
    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }

    /// Add one of the operator's own secret keys as a decryption identity: payloads encrypted to its recipient
    /// can then be read (`--identity`).
    pub fn add_identity(&mut self, key: &SecretKey) {
        let recipient = key.public().recipient_text();
        if !self.identities.iter().any(|i| i.recipient == recipient) {
            self.identities.push(DecryptionKey {
                id: key.id().to_string(),
                recipient,
                identity: key.age_identity(),
            });
        }
    }

    /// Add a decryption identity read with [`DecryptionKey::read_identity_file`] (a retired key's).
    pub fn add_decryption_key(&mut self, key: DecryptionKey) {
        if !self.identities.iter().any(|i| i.recipient == key.recipient) {
            self.identities.push(key);
        }
    }

    /// The decryption identities added with [`Keyring::add_identity`] and [`Keyring::add_decryption_key`].
    pub fn identities(&self) -> &[DecryptionKey] {
        &self.identities
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

    fn fast(pass: &str) -> Protection {
        Protection::with_work_factor(passphrase(pass.into()), 2)
    }

    #[test]
    fn an_age_identity_file_reads_back_as_the_key_s_decryption_identity() {
        let dir = tempfile::tempdir().unwrap();
        let sk = SecretKey::generate(Role::Hq, "hq-2026").unwrap();
        let path = dir.path().join("old.age");
        fsutil::write_new_private(&path, sk.age_identity_file_text().as_bytes()).unwrap();
        let d = DecryptionKey::read_identity_file(&path, "hq-2026 (retired)").unwrap();
        assert_eq!(d.recipient, sk.public().recipient_text());
        assert_eq!(d.id, "hq-2026 (retired)");
        let mut ring = Keyring::new();
        ring.add_decryption_key(d.clone());
        ring.add_decryption_key(d);
        assert_eq!(ring.identities().len(), 1);

        let bad = |name: &str, text: String| {
            let p = dir.path().join(name);
            fsutil::write_new_private(&p, text.as_bytes()).unwrap();
            DecryptionKey::read_identity_file(&p, "x")
                .unwrap_err()
                .to_string()
        };
        let two = format!("{0}{0}", sk.age_identity_file_text().as_str());
        assert!(bad("two.age", two).contains("more than one age identity"));
        assert!(bad("none.age", "# only a comment\n".into()).contains("no age identity"));
        assert!(bad("junk.age", "AGE-SECRET-KEY-1NOTBECH32\n".into())
            .contains("not an age X25519 identity"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                DecryptionKey::read_identity_file(&path, "x"),
                Err(KeyError::Permissions { mode: 0o644, .. })
            ));
        }
    }

    #[test]
    fn protected_keys_need_the_right_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let sk = SecretKey::generate(Role::Hq, "hq").unwrap();
        let (sp, _) = sk
            .write_pair_protected(dir.path(), &fast("correct horse"))
            .unwrap();
        let text = std::fs::read_to_string(&sp).unwrap();
        assert!(text.contains("ferry-secret-key: 2") && text.contains(ARMOR_BEGIN));
        assert!(!text.contains("secret:"), "the seed is in the clear");
        assert!(SecretKey::is_protected(&sp).unwrap());
        // No passphrase: a clear refusal, not a garbled key.
        assert!(matches!(
            SecretKey::read(&sp),
            Err(KeyError::NeedsPassphrase(_))
        ));
        assert!(matches!(
            SecretKey::read_with(&sp, || Ok(passphrase("wrong".into()))),
            Err(KeyError::WrongPassphrase(_))
        ));
        let back = SecretKey::read_with(&sp, || Ok(passphrase("correct horse".into()))).unwrap();
        assert_eq!(back.public(), sk.public());
        // The public fields are bound to the encrypted secret by the key id.
        let edited = text.replace("id: hq", "id: hq2");
        std::fs::write(&sp, edited).unwrap();
        assert!(matches!(
            SecretKey::read_with(&sp, || Ok(passphrase("correct horse".into()))),
            Err(KeyError::Malformed { .. })
        ));
        // A flipped ciphertext character is the same error as a wrong passphrase.
        let mut flipped = text.clone().into_bytes();
        let at = text.find(ARMOR_BEGIN).unwrap() + ARMOR_BEGIN.len() + 60;
        flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
        std::fs::write(&sp, flipped).unwrap();
        assert!(SecretKey::read_with(&sp, || Ok(passphrase("correct horse".into()))).is_err());
        // A plain key never asks.
        let (plain, _) = SecretKey::generate(Role::Site, "site-a")
            .unwrap()
            .write_pair(&dir.path().join("plain"))
            .unwrap();
        assert!(!SecretKey::is_protected(&plain).unwrap());
        SecretKey::read_with(&plain, || panic!("asked for a passphrase")).unwrap();
    }

    #[test]
    fn fingerprints_are_full_length_and_checked_in_pub_files() {
        let pk = SecretKey::from_seed(Role::Hq, "hq", [1; 32]).public();
        let fp = pk.fingerprint();
        assert_eq!(fp.split(' ').count(), 16);
        assert!(fp.replace(' ', "").starts_with(&pk.key_id_hex()));
        let text = pk.to_file_text();
        assert!(text.contains(&format!("fingerprint: {fp}")));
        let p = Path::new("x.pub");
        let mut wrong = fp.clone().into_bytes();
        let last = wrong.len() - 1;
        wrong[last] = if wrong[last] == b'0' { b'1' } else { b'0' };
        let edited = text.replace(&fp, std::str::from_utf8(&wrong).unwrap());
        assert!(PublicKey::parse(&edited, p).is_err());
        // Files written before fingerprints still load.
        let old: String = text
            .lines()
            .filter(|l| !l.starts_with("fingerprint"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(PublicKey::parse(&old, p).unwrap(), pk);
    }

    #[test]
    fn two_keys_claiming_the_same_role_and_id_are_refused() {
        let mut ring = Keyring::new();
        ring.add(SecretKey::from_seed(Role::Hq, "hq", [1; 32]).public())
            .unwrap();
        // The same key again is harmless.
        ring.add(SecretKey::from_seed(Role::Hq, "hq", [1; 32]).public())
            .unwrap();
        let err = ring
            .add(SecretKey::from_seed(Role::Hq, "hq", [9; 32]).public())
            .unwrap_err();
        assert!(
            matches!(err, KeyError::DuplicateId { role: Role::Hq, .. }),
            "{err}"
        );
        assert_eq!(ring.len(), 1);
        // The same id in another role is another key.
        ring.add(SecretKey::from_seed(Role::Site, "hq", [3; 32]).public())
            .unwrap();
        // Loading a folder with both is refused.
        let dir = tempfile::tempdir().unwrap();
        for (name, seed) in [("hq.pub", 1u8), ("rogue.pub", 9)] {
            std::fs::write(
                dir.path().join(name),
                SecretKey::from_seed(Role::Hq, "hq", [seed; 32])
                    .public()
                    .to_file_text(),
            )
            .unwrap();
        }
        assert!(matches!(
            Keyring::load(&[dir.path().to_path_buf()]),
            Err(KeyError::DuplicateId { .. })
        ));
    }
}
