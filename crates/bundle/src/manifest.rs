//! The signed manifest: what a bundle claims about itself.
//!
//! Serialised as JSON (UTF-8, `serde_json`'s compact form). The signature covers the exact bytes in the file,
//! never a re-encoding, so the JSON writer's choices do not matter to a verifier.

use serde::{Deserialize, Serialize};

use crate::keys::{validate_id, Role};
use crate::tensor::{byte_len, fingerprint, parse_dtype, valid_name, TensorMeta};

/// The only format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

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
    /// Signed sample count.
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
    /// Codec, lengths and hashes of the payload.
    pub payload: PayloadInfo,
    /// Every tensor, sorted by name (byte order), unique.
    pub tensors: Vec<TensorEntry>,
    /// The signing key.
    pub signer: Signer,
    /// Creation time, seconds since the Unix epoch (UTC).
    pub created: u64,
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
    /// Creation time (seconds since the epoch); `crate::unix_now()` for real bundles.
    pub created: u64,
}

use crate::is_sha256_hex as is_hash;

impl Manifest {
    /// Check everything that can be checked from the manifest alone. Run on every manifest read, after its
    /// signature has verified.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT_VERSION {
            return Err(format!(
                "manifest format {} (expected {FORMAT_VERSION})",
                self.format
            ));
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
            created: crate::unix_now(),
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
            created: crate::unix_now(),
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
