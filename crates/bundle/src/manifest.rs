//! The signed manifest: what a bundle claims about itself.
//!
//! Serialised as JSON (UTF-8, `serde_json`'s compact form). The signature covers the exact bytes in the file,
//! never a re-encoding, so the JSON writer's choices do not matter to a verifier.
//!
//! Two versions are read ([`READ_VERSIONS`]); only the current one is written. Version 2 (issue 15 §2, §3) adds
//! two fields: `revocations` (a global names the newest revocation list by serial and file hash, so a site that
//! lacks it refuses the global until it is given the list) and `expires` (when a global is stale: sites warn
//! after it). A version-1 manifest is parsed by its own, exact field list ([`Manifest::parse`]), so a
//! version-1 manifest holding a version-2 field is refused like any unknown field.
//!
//! Version 3 (issue 15 §5) is version 2 plus one field, `encryption`, and is written only for a bundle whose
//! payload is encrypted to its recipients' keys: a bundle in the clear stays version 2, byte for byte what an
//! older ferry writes and reads. The `encryption` object names the recipients and pins the ciphertext by
//! length and hash, so a reader verifies the signature and the ciphertext before it decrypts anything.

use serde::{Deserialize, Serialize};

use crate::keys::{validate_id, Role};
use crate::tensor::{byte_len, fingerprint, parse_dtype, valid_name, TensorMeta};

/// The format version this crate writes for a bundle in the clear.
pub const FORMAT_VERSION: u32 = 2;
/// The format version this crate writes for a bundle whose payload is encrypted (issue 15 §5).
pub const ENCRYPTED_FORMAT_VERSION: u32 = 3;
/// Every format version this crate reads (`docs/bundle-format.md` §11).
pub const READ_VERSIONS: &[u32] = &[1, 2, 3];
/// The one encryption scheme: age (v1) to X25519 recipients, STREAM payload.
pub const ENCRYPTION_SCHEME: &str = "age-x25519";
/// Most recipients one payload may be encrypted to (every site of a large federation, with room).
pub const MAX_RECIPIENTS: usize = 1024;
/// How long a global stays fresh by default: 90 days. Air-gapped rounds are slow (a courier a month is common),
/// and an expired global only causes a warning unless a site asks for refusals.
pub const DEFAULT_GLOBAL_VALIDITY: u64 = 90 * 24 * 3600;

/// Whether a bundle is a site's update or HQ's global model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleKind {
    /// Produced at a site, signed by that site's key, based on a global.
    Update,
    /// Produced at HQ (by `init` or `merge`), signed by an HQ key.
    Global,
}

impl std::fmt::Display for BundleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BundleKind::Update => "update",
            BundleKind::Global => "global",
        })
    }
}

/// The site that produced an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteInfo {
    /// Site id (equals the signing key's id).
    pub id: String,
    /// Number of training samples behind this update (the FedAvg weight).
    pub samples: u64,
}

/// One update merged into a global.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contributor {
    /// SHA-256 of the update bundle file.
    pub bundle: String,
    /// Site id.
    pub site: String,
    /// The sample count the merge weighted the update by: the count the site signed, or less where HQ capped
    /// it (`--max-samples`, `--max-sample-ratio`).
    pub samples: u64,
}

/// The payload's codec and integrity data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadInfo {
    /// Always `"zstd"` in format 1.
    pub codec: String,
    /// Bytes of the compressed payload (the zstd frame after the header frame).
    pub compressed_len: u64,
    /// SHA-256 of the compressed payload.
    pub compressed_sha256: String,
    /// Bytes of the decompressed safetensors file.
    pub len: u64,
    /// SHA-256 of the decompressed safetensors file.
    pub sha256: String,
}

/// One tensor, bound by name, dtype, shape and data hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// Tensor name (never used as a path).
    pub name: String,
    /// safetensors dtype name, e.g. `F32`.
    pub dtype: String,
    /// Shape; `[]` for a scalar.
    pub shape: Vec<usize>,
    /// SHA-256 of the tensor's little-endian bytes.
    pub sha256: String,
}

/// The revocation list a global requires (format 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationRef {
    /// The list's serial.
    pub serial: u64,
    /// SHA-256 of the list file (`*.ferry-rev`).
    pub sha256: String,
}

/// How the payload is encrypted (format 3): to whom, and the ciphertext's length and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// Always `"age-x25519"`: an age v1 file to X25519 recipients, whose plaintext is the zstd frame.
    pub scheme: String,
    /// Every key the payload is encrypted to.
    pub recipients: Vec<EncryptedTo>,
    /// Bytes of the age file (the payload region on disk).
    pub len: u64,
    /// SHA-256 of the age file.
    pub sha256: String,
}

/// One recipient of an encrypted payload: a ferry key, named as such and by its age recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptedTo {
    /// The key's role.
    pub role: Role,
    /// The key's id (site id or HQ id).
    pub id: String,
    /// The key id, 16 lower-case hex digits.
    pub key_id: String,
    /// The age X25519 recipient derived from the key, `age1…`.
    pub recipient: String,
}

impl Encryption {
    /// The recipients for a message: `hq (age1…), site-a (age1…)`, escaped.
    pub fn describe_recipients(&self) -> String {
        self.recipients
            .iter()
            .map(|r| format!("{} {}", crate::escape(&r.id), crate::escape(&r.recipient)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn validate(&self) -> Result<(), String> {
        if self.scheme != ENCRYPTION_SCHEME {
            return Err(format!(
                "encryption scheme {:?} is not supported",
                crate::escape(&self.scheme)
            ));
        }
        if self.recipients.is_empty() || self.recipients.len() > MAX_RECIPIENTS {
            return Err(format!(
                "an encrypted payload names 1 to {MAX_RECIPIENTS} recipients"
            ));
        }
        if !is_hash(&self.sha256) {
            return Err("encryption.sha256 is not a lower-case SHA-256 hex string".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.recipients {
            validate_id("recipient id", &r.id).map_err(|e| e.to_string())?;
            if r.key_id.len() != 16
                || !r
                    .key_id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err("a recipient's key_id is not 16 lower-case hex digits".into());
            }
            let parsed: Result<age::x25519::Recipient, _> = r.recipient.parse();
            if !parsed.is_ok_and(|p| p.to_string() == r.recipient) {
                return Err(format!(
                    "recipient {:?} is not an age X25519 recipient",
                    crate::escape(&r.recipient)
                ));
            }
            if !seen.insert(r.recipient.as_str()) {
                return Err("a recipient is listed twice".into());
            }
        }
        Ok(())
    }
}

/// Who signed the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signer {
    /// The key's id field (site id or HQ id).
    pub id: String,
    /// The key's role.
    pub role: Role,
    /// The key id, 16 hex digits (see `docs/bundle-format.md`).
    pub key_id: String,
}

/// The signed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version, 1.
    pub format: u32,
    /// Update or global.
    pub kind: BundleKind,
    /// Federation name; bundles of another federation are refused.
    pub federation: String,
    /// Model architecture name (e.g. `plate-cnn`) when ferry knows how to train it; `null` for foreign weights.
    pub arch: Option<String>,
    /// SHA-256 over the sorted tensor names, dtypes and shapes.
    pub model_fingerprint: String,
    /// Round number: a global's round, or for an update the round of the global it is based on.
    pub round: u64,
    /// Update: hash of the global it is based on. Global: hash of the previous global (`null` at round 0).
    pub base: Option<String>,
    /// Update only: the producing site and its sample count.
    pub site: Option<SiteInfo>,
    /// Global only: the updates merged into it (empty for `init`).
    pub contributors: Vec<Contributor>,
    /// Global only: how it was made (`init`, `fedavg`, ...).
    pub strategy: Option<String>,
    /// Global only (format 2): the newest revocation list HQ holds, which a site must hold too.
    pub revocations: Option<RevocationRef>,
    /// Codec, lengths and hashes of the payload (of the zstd frame: the plaintext, when encrypted).
    pub payload: PayloadInfo,
    /// Format 3 only, and always set there: to whom the payload is encrypted, and the ciphertext's length and
    /// hash. Not written at all in format 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Every tensor, sorted by name (byte order), unique.
    pub tensors: Vec<TensorEntry>,
    /// The signing key.
    pub signer: Signer,
    /// Creation time, seconds since the Unix epoch (UTC).
    pub created: u64,
    /// Global only (format 2, always set there): when it goes stale, seconds since the Unix epoch.
    pub expires: Option<u64>,
}

/// A format-2 manifest, field for field: no `encryption`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestV2 {
    format: u32,
    kind: BundleKind,
    federation: String,
    arch: Option<String>,
    model_fingerprint: String,
    round: u64,
    base: Option<String>,
    site: Option<SiteInfo>,
    contributors: Vec<Contributor>,
    strategy: Option<String>,
    revocations: Option<RevocationRef>,
    payload: PayloadInfo,
    tensors: Vec<TensorEntry>,
    signer: Signer,
    created: u64,
    expires: Option<u64>,
}

/// A format-1 manifest, field for field: no `revocations`, no `expires`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestV1 {
    format: u32,
    kind: BundleKind,
    federation: String,
    arch: Option<String>,
    model_fingerprint: String,
    round: u64,
    base: Option<String>,
    site: Option<SiteInfo>,
    contributors: Vec<Contributor>,
    strategy: Option<String>,
    payload: PayloadInfo,
    tensors: Vec<TensorEntry>,
    signer: Signer,
    created: u64,
}

impl From<ManifestV1> for ManifestV2 {
    /// A format-1 manifest is a format-2 one without a revocation list or an expiry.
    fn from(m: ManifestV1) -> ManifestV2 {
        ManifestV2 {
            format: m.format,
            kind: m.kind,
            federation: m.federation,
            arch: m.arch,
            model_fingerprint: m.model_fingerprint,
            round: m.round,
            base: m.base,
            site: m.site,
            contributors: m.contributors,
            strategy: m.strategy,
            revocations: None,
            payload: m.payload,
            tensors: m.tensors,
            signer: m.signer,
            created: m.created,
            expires: None,
        }
    }
}

impl ManifestV2 {
    /// The manifest of a bundle in the clear (formats 1 and 2 have no `encryption`).
    fn into_manifest(self) -> Manifest {
        Manifest {
            format: self.format,
            kind: self.kind,
            federation: self.federation,
            arch: self.arch,
            model_fingerprint: self.model_fingerprint,
            round: self.round,
            base: self.base,
            site: self.site,
            contributors: self.contributors,
            strategy: self.strategy,
            revocations: self.revocations,
            payload: self.payload,
            encryption: None,
            tensors: self.tensors,
            signer: self.signer,
            created: self.created,
            expires: self.expires,
        }
    }
}

/// What the caller decides about a new bundle; the rest of the manifest is computed when sealing.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Update or global.
    pub kind: BundleKind,
    /// Federation name.
    pub federation: String,
    /// Architecture, if known.
    pub arch: Option<String>,
    /// Round.
    pub round: u64,
    /// Base / previous global hash.
    pub base: Option<String>,
    /// Update only.
    pub site: Option<SiteInfo>,
    /// Global only.
    pub contributors: Vec<Contributor>,
    /// Global only.
    pub strategy: Option<String>,
    /// Global only: the revocation list sites must hold.
    pub revocations: Option<RevocationRef>,
    /// Creation time (seconds since the epoch); `crate::unix_now()` for real bundles.
    pub created: u64,
    /// Global only: when it goes stale (seconds since the epoch). A global sealed without one gets
    /// `created` + [`DEFAULT_GLOBAL_VALIDITY`].
    pub expires: Option<u64>,
    /// The keys the payload is encrypted to (issue 15 §5): HQ for an update, the member sites for a global.
    /// Empty: the payload is in the clear (format 2).
    pub encrypt_to: Vec<crate::keys::PublicKey>,
}

use crate::is_sha256_hex as is_hash;

impl Manifest {
    /// Parse manifest bytes of header version `version` (1 or 2) under that version's exact field list. Messages
    /// are escaped: serde's "unknown field" and "unknown variant" errors quote text from the file (issue 15 §7).
    pub fn parse(version: u16, bytes: &[u8]) -> Result<Manifest, String> {
        let err = |e: serde_json::Error| crate::escape(&e.to_string());
        match version {
            1 => {
                let m: ManifestV1 = serde_json::from_slice(bytes).map_err(err)?;
                Ok(ManifestV2::from(m).into_manifest())
            }
            2 => {
                let m: ManifestV2 = serde_json::from_slice(bytes).map_err(err)?;
                Ok(m.into_manifest())
            }
            _ => serde_json::from_slice(bytes).map_err(err),
        }
    }

    /// Check everything that can be checked from the manifest alone. Run on every manifest read, after its
    /// signature has verified.
    pub fn validate(&self) -> Result<(), String> {
        if !READ_VERSIONS.contains(&self.format) {
            return Err(format!(
                "manifest format {} (this ferry reads {READ_VERSIONS:?})",
                self.format
            ));
        }
        match (&self.encryption, self.format >= ENCRYPTED_FORMAT_VERSION) {
            (Some(e), true) => e.validate()?,
            (None, true) => return Err("a format-3 manifest must describe its encryption".into()),
            (Some(_), false) => {
                return Err("only a format-3 manifest may describe an encryption".into())
            }
            (None, false) => {}
        }
        if let Some(r) = &self.revocations {
            if !is_hash(&r.sha256) {
                return Err("revocations.sha256 is not a lower-case SHA-256 hex string".into());
            }
        }
        validate_id("federation", &self.federation).map_err(|e| e.to_string())?;
        if let Some(arch) = &self.arch {
            validate_id("arch", arch).map_err(|e| e.to_string())?;
        }
        validate_id("signer id", &self.signer.id).map_err(|e| e.to_string())?;
        for (what, h) in [
            ("model_fingerprint", &self.model_fingerprint),
            ("payload.compressed_sha256", &self.payload.compressed_sha256),
            ("payload.sha256", &self.payload.sha256),
        ] {
            if !is_hash(h) {
                return Err(format!("{what} is not a lower-case SHA-256 hex string"));
            }
        }
        if self.payload.codec != "zstd" {
            return Err(format!(
                "codec {:?} is not supported",
                crate::escape(&self.payload.codec)
            ));
        }
        if let Some(b) = &self.base {
            if !is_hash(b) {
                return Err("base is not a lower-case SHA-256 hex string".into());
            }
        }
        match self.kind {
            BundleKind::Update => {
                let site = self.site.as_ref().ok_or("an update must name its site")?;
                validate_id("site id", &site.id).map_err(|e| e.to_string())?;
                if self.base.is_none() {
                    return Err("an update must name the global it is based on".into());
                }
                if !self.contributors.is_empty() || self.strategy.is_some() {
                    return Err("an update cannot list contributors or a strategy".into());
                }
                if self.revocations.is_some() || self.expires.is_some() {
                    return Err("an update cannot name a revocation list or an expiry".into());
                }
            }
            BundleKind::Global => {
                if self.site.is_some() {
                    return Err("a global cannot name a site".into());
                }
                if (self.round == 0) != self.base.is_none() {
                    return Err(
                        "a global names a previous global exactly when its round is above 0".into(),
                    );
                }
                if self.format >= 2 && self.expires.is_none() {
                    return Err("a format-2 global must say when it expires".into());
                }
                for c in &self.contributors {
                    validate_id("contributor site", &c.site).map_err(|e| e.to_string())?;
                    if !is_hash(&c.bundle) {
                        return Err("contributor bundle is not a SHA-256 hex string".into());
                    }
                }
            }
        }
        let mut prev: Option<&str> = None;
        for t in &self.tensors {
            if !valid_name(&t.name) {
                return Err(format!(
                    "tensor name {:?} is not allowed (empty, over {} bytes, or containing control characters)",
                    crate::escape(&t.name),
                    crate::tensor::MAX_NAME_BYTES
                ));
            }
            if prev.is_some_and(|p| p >= t.name.as_str()) {
                return Err("tensors are not sorted by name, or a name repeats".into());
            }
            prev = Some(&t.name);
            let dtype = parse_dtype(&t.dtype)
                .ok_or_else(|| format!("tensor {:?}: unsupported dtype", t.name))?;
            if byte_len(dtype, &t.shape).is_none() {
                return Err(format!("tensor {:?}: shape is too large", t.name));
            }
            if !is_hash(&t.sha256) {
                return Err(format!(
                    "tensor {:?}: sha256 is not a SHA-256 hex string",
                    t.name
                ));
            }
        }
        crate::fisher::check_tensor_list(self.kind == BundleKind::Update, &self.tensor_metas())?;
        if fingerprint(self.tensor_metas().iter()) != self.model_fingerprint {
            return Err("model_fingerprint does not match the tensor list".into());
        }
        Ok(())
    }

    /// The tensor list as (name, dtype, shape). Call after [`Manifest::validate`].
    pub fn tensor_metas(&self) -> Vec<TensorMeta> {
        self.tensors
            .iter()
            .filter_map(|t| {
                Some(TensorMeta {
                    name: t.name.clone(),
                    dtype: parse_dtype(&t.dtype)?,
                    shape: t.shape.clone(),
                })
            })
            .collect()
    }

    /// The update's site id, if this is an update.
    pub fn site_id(&self) -> Option<&str> {
        self.site.as_ref().map(|s| s.id.as_str())
    }

    /// Whether the payload is encrypted (format 3).
    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
    }

    /// Whether this global has expired at `now` (a format-1 global never does).
    pub fn expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| now > e)
    }
}

impl Draft {
    /// A round-0 global made by `init`.
    pub fn initial(federation: &str, arch: Option<String>) -> Draft {
        Draft {
            kind: BundleKind::Global,
            federation: federation.to_string(),
            arch,
            round: 0,
            base: None,
            site: None,
            contributors: Vec::new(),
            strategy: Some("init".into()),
            revocations: None,
            created: crate::unix_now(),
            expires: None,
            encrypt_to: Vec::new(),
        }
    }

    /// A site's update trained from the global with file hash `base_hash` (of `federation`, `arch`, `round`).
    pub fn update(
        federation: &str,
        arch: Option<String>,
        round: u64,
        base_hash: &str,
        site: &str,
        samples: u64,
    ) -> Draft {
        Draft {
            kind: BundleKind::Update,
            federation: federation.to_string(),
            arch,
            round,
            base: Some(base_hash.to_string()),
            site: Some(SiteInfo {
                id: site.to_string(),
                samples,
            }),
            contributors: Vec::new(),
            strategy: None,
            revocations: None,
            created: crate::unix_now(),
            expires: None,
            encrypt_to: Vec::new(),
        }
    }

    /// A site's update trained from the global `base` (whose file hash is `base_hash`): same federation, round
    /// and architecture as the base.
    pub fn update_for(base: &Manifest, base_hash: &str, site: &str, samples: u64) -> Draft {
        Draft::update(
            &base.federation,
            base.arch.clone(),
            base.round,
            base_hash,
            site,
            samples,
        )
    }
}
