//! The container: header frame, signature, payload frame. The only code that turns bundle bytes into trusted
//! data, in this order: header → key → signature → manifest → payload hash → decompress (capped) → tensors.

use std::io::Read;
use std::path::Path;

use crate::error::{OpenError, SealError};
use crate::fsutil;
use crate::keys::{KeyError, Keyring, Role, SecretKey};
use crate::manifest::{BundleKind, Draft, Manifest, PayloadInfo, Signer, FORMAT_VERSION};
use crate::payload::{canonical_header, Payload};
use crate::tensor::{TensorMeta, TensorRef};

/// zstd skippable-frame magic used for the ferry header (0x184D2A5E, little-endian on disk).
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// Magic at the start of the header frame's content.
pub const HEADER_MAGIC: &[u8; 8] = b"FERRYBDL";
/// Domain separation prefix of the signed message (followed by the manifest bytes).
pub const SIGNATURE_DOMAIN: &[u8] = b"ferry-bundle-v1\0";
/// Largest bundle file read by default (8 GiB).
pub const MAX_BUNDLE_BYTES: u64 = 8 << 30;

const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Fixed part of the header frame's content: magic, version, reserved, key id, manifest length.
const FIXED: usize = 8 + 2 + 2 + 8 + 4;
const SIG_LEN: usize = 64;

/// Bounds on what a reader accepts, so a hostile file costs bounded memory and time.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest bundle file.
    pub max_bundle_bytes: u64,
    /// Largest manifest.
    pub max_manifest_bytes: u32,
    /// Largest decompressed payload.
    pub max_payload_bytes: u64,
    /// Largest zstd window (log2 bytes) the decoder will allocate.
    pub window_log_max: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bundle_bytes: MAX_BUNDLE_BYTES,
            max_manifest_bytes: 64 << 20,
            max_payload_bytes: 16 << 30,
            window_log_max: 27,
        }
    }
}

/// A verified bundle: manifest trusted, payload decompressed and checked tensor by tensor.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The verified manifest.
    pub manifest: Manifest,
    /// SHA-256 of the whole bundle file, lower-case hex: the bundle's name in ledgers and manifests.
    pub hash: String,
    /// Size of the bundle file.
    pub file_len: u64,
    payload: Vec<u8>,
    metas: Vec<TensorMeta>,
}

impl Bundle {
    /// The plain safetensors file inside.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
    /// Take the plain safetensors file.
    pub fn into_payload(self) -> Vec<u8> {
        self.payload
    }
    /// Tensor names, dtypes and shapes, sorted by name.
    pub fn metas(&self) -> &[TensorMeta] {
        &self.metas
    }
    /// Tensors in sorted-name order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorRef<'_>> {
        crate::payload::tensor_refs(&self.payload, &self.metas)
    }
    /// The signer's role.
    pub fn signer_role(&self) -> Role {
        self.manifest.signer.role
    }
}

/// A newly sealed bundle.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The file bytes.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`.
    pub hash: String,
    /// The signed manifest.
    pub manifest: Manifest,
}

impl Sealed {
    /// The conventional file name: `global-r<N>.ferry` or `<site>-r<N>.ferry`.
    pub fn file_name(&self) -> String {
        match (&self.manifest.kind, &self.manifest.site) {
            (BundleKind::Update, Some(site)) => {
                format!("{}-r{}.ferry", site.id, self.manifest.round)
            }
            _ => format!("global-r{}.ferry", self.manifest.round),
        }
    }

    /// Write to `dir/<file_name>` atomically, never overwriting, then read it back from the medium.
    pub fn write_to_dir(&self, dir: &Path) -> Result<std::path::PathBuf, SealError> {
        fsutil::ensure_dir(dir)?;
        let path = dir.join(self.file_name());
        fsutil::write_new_verified(&path, &self.bytes)?;
        Ok(path)
    }
}

/// Sign `payload` under `key` with the caller's `draft`. Checks that the key's role may sign this kind of bundle.
pub fn seal(
    draft: Draft,
    payload: &Payload,
    key: &SecretKey,
    level: i32,
) -> Result<Sealed, SealError> {
    match (draft.kind, key.role()) {
        (BundleKind::Global, Role::Hq) => {}
        (BundleKind::Global, Role::Site) => {
            return Err(KeyError::WrongRole(format!(
                "site key {:?} cannot sign a global bundle",
                key.id()
            ))
            .into())
        }
        (BundleKind::Update, Role::Site) => match &draft.site {
            Some(s) if s.id == key.id() => {}
            Some(s) => {
                return Err(KeyError::WrongRole(format!(
                    "key of site {:?} cannot sign an update for site {:?}",
                    key.id(),
                    s.id
                ))
                .into())
            }
            None => {
                return Err(SealError::InvalidDraft(
                    "an update must name its site".into(),
                ))
            }
        },
        (BundleKind::Update, Role::Hq) => {
            return Err(KeyError::WrongRole("an HQ key cannot sign a site update".into()).into())
        }
    }
    let compressed = compress(payload.bytes(), level)?;
    let public = key.public();
    let manifest = Manifest {
        format: FORMAT_VERSION,
        kind: draft.kind,
        federation: draft.federation,
        arch: draft.arch,
        model_fingerprint: payload.fingerprint(),
        round: draft.round,
        base: draft.base,
        site: draft.site,
        contributors: draft.contributors,
        strategy: draft.strategy,
        payload: PayloadInfo {
            codec: "zstd".into(),
            compressed_len: compressed.len() as u64,
            compressed_sha256: crate::sha256_hex(&compressed),
            len: payload.bytes().len() as u64,
            sha256: crate::sha256_hex(payload.bytes()),
        },
        tensors: payload.entries.clone(),
        signer: Signer {
            id: public.id.clone(),
            role: public.role,
            key_id: public.key_id_hex(),
        },
        created: draft.created,
    };
    manifest.validate().map_err(SealError::InvalidDraft)?;
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| SealError::InvalidDraft(e.to_string()))?;
    let bytes = assemble(&manifest_bytes, key, &compressed);
    let hash = crate::sha256_hex(&bytes);
    Ok(Sealed {
        bytes,
        hash,
        manifest,
    })
}

/// Assemble a bundle from raw manifest bytes and a compressed payload, signing whatever it is given.
/// No role or consistency checks: this is how test vectors make hostile-but-validly-signed files.
/// Real bundles come from [`seal`].
pub fn assemble(manifest_bytes: &[u8], key: &SecretKey, compressed: &[u8]) -> Vec<u8> {
    let public = key.public();
    let mut message = Vec::with_capacity(SIGNATURE_DOMAIN.len() + manifest_bytes.len());
    message.extend_from_slice(SIGNATURE_DOMAIN);
    message.extend_from_slice(manifest_bytes);
    let signature = key.sign(&message);

    let content_len = FIXED + manifest_bytes.len() + SIG_LEN;
    let mut bytes = Vec::with_capacity(8 + content_len + compressed.len());
    bytes.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&(content_len as u32).to_le_bytes());
    bytes.extend_from_slice(HEADER_MAGIC);
    bytes.extend_from_slice(&(FORMAT_VERSION as u16).to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes());
    bytes.extend_from_slice(&public.key_id());
    bytes.extend_from_slice(&(manifest_bytes.len() as u32).to_le_bytes());
    bytes.extend_from_slice(manifest_bytes);
    bytes.extend_from_slice(&signature);
    bytes.extend_from_slice(compressed);
    bytes
}

/// Compress a payload the way [`seal`] does: one zstd frame with its content size and a checksum.
pub fn compress(data: &[u8], level: i32) -> Result<Vec<u8>, SealError> {
    let mut c =
        zstd::bulk::Compressor::new(level).map_err(|e| SealError::Compress(e.to_string()))?;
    c.include_contentsize(true)
        .map_err(|e| SealError::Compress(e.to_string()))?;
    c.include_checksum(true)
        .map_err(|e| SealError::Compress(e.to_string()))?;
    c.compress(data)
        .map_err(|e| SealError::Compress(e.to_string()))
}

/// The header of a bundle, parsed but not verified.
struct Header<'a> {
    version: u16,
    key_id: [u8; 8],
    manifest_bytes: &'a [u8],
    signature: [u8; 64],
    payload: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn parse_header<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Header<'a>, OpenError> {
    if bytes.len() < 8 + FIXED {
        return Err(OpenError::TooShort(bytes.len()));
    }
    if u32_at(bytes, 0) != Some(SKIPPABLE_MAGIC) || bytes.get(8..16) != Some(&HEADER_MAGIC[..]) {
        return Err(OpenError::WrongMagic);
    }
    let version = u16::from_le_bytes([bytes[16], bytes[17]]);
    if version != FORMAT_VERSION as u16 {
        return Err(OpenError::UnsupportedVersion(version));
    }
    if bytes.len() as u64 > limits.max_bundle_bytes {
        return Err(OpenError::MalformedHeader(
            "the file is larger than a bundle may be",
        ));
    }
    if bytes[18] != 0 || bytes[19] != 0 {
        return Err(OpenError::MalformedHeader("reserved bytes are not zero"));
    }
    let frame_len = u32_at(bytes, 4).ok_or(OpenError::MalformedHeader("truncated"))? as usize;
    let manifest_len = u32_at(bytes, 28).ok_or(OpenError::MalformedHeader("truncated"))?;
    if manifest_len > limits.max_manifest_bytes {
        return Err(OpenError::MalformedHeader(
            "manifest is larger than allowed",
        ));
    }
    let manifest_len = manifest_len as usize;
    if frame_len != FIXED + manifest_len + SIG_LEN {
        return Err(OpenError::MalformedHeader(
            "frame length disagrees with manifest length",
        ));
    }
    let frame_end = 8 + frame_len;
    if bytes.len() < frame_end {
        return Err(OpenError::MalformedHeader(
            "file ends inside the header (truncated)",
        ));
    }
    let mut key_id = [0u8; 8];
    key_id.copy_from_slice(&bytes[20..28]);
    let manifest_bytes = &bytes[32..32 + manifest_len];
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&bytes[32 + manifest_len..frame_end]);
    Ok(Header {
        version,
        key_id,
        manifest_bytes,
        signature,
        payload: &bytes[frame_end..],
    })
}

/// Read a bundle file (once, capped) and [`open`] it.
pub fn open_file(path: &Path, keyring: &Keyring) -> Result<Bundle, OpenError> {
    let limits = Limits::default();
    let bytes = fsutil::read_capped(path, limits.max_bundle_bytes)?;
    open(&bytes, keyring, &limits)
}

/// Verify bundle bytes against trusted keys, then decompress and check the payload. Nothing is parsed before the
/// signature and the compressed payload's hash have verified.
pub fn open(bytes: &[u8], keyring: &Keyring, limits: &Limits) -> Result<Bundle, OpenError> {
    let h = parse_header(bytes, limits)?;
    let key_hex = hex::encode(h.key_id);
    if keyring.is_revoked(&h.key_id) {
        return Err(OpenError::RevokedKey(key_hex));
    }
    let key = keyring
        .get(&h.key_id)
        .ok_or_else(|| OpenError::UntrustedKey(key_hex.clone()))?;
    let mut message = Vec::with_capacity(SIGNATURE_DOMAIN.len() + h.manifest_bytes.len());
    message.extend_from_slice(SIGNATURE_DOMAIN);
    message.extend_from_slice(h.manifest_bytes);
    let sig = ed25519_dalek::Signature::from_bytes(&h.signature);
    key.verifying_key()
        .verify_strict(&message, &sig)
        .map_err(|_| OpenError::BadSignature)?;

    // From here on the manifest was signed by a trusted key.
    let manifest: Manifest = serde_json::from_slice(h.manifest_bytes)
        .map_err(|e| OpenError::InvalidManifest(e.to_string()))?;
    manifest.validate().map_err(OpenError::InvalidManifest)?;
    debug_assert_eq!(h.version as u32, manifest.format);
    if manifest.signer.key_id != key_hex
        || manifest.signer.id != key.id
        || manifest.signer.role != key.role
    {
        return Err(OpenError::SignerMismatch {
            named: format!(
                "{} {} {}",
                manifest.signer.role,
                crate::escape(&manifest.signer.id),
                crate::escape(&manifest.signer.key_id)
            ),
            actual: format!("{} {} {}", key.role, key.id, key_hex),
        });
    }
    check_role(&manifest, key.role, &key.id)?;

    let p = &manifest.payload;
    if h.payload.len() as u64 != p.compressed_len {
        return Err(OpenError::PayloadLength {
            expected: p.compressed_len,
            actual: h.payload.len() as u64,
        });
    }
    if crate::sha256_hex(h.payload) != p.compressed_sha256 {
        return Err(OpenError::PayloadHash);
    }
    if p.len > limits.max_payload_bytes {
        return Err(OpenError::Decompress {
            expected: p.len,
            why: "larger than this reader accepts".into(),
        });
    }
    let payload = decompress(h.payload, p.len, limits)?;
    if crate::sha256_hex(&payload) != p.sha256 {
        return Err(OpenError::DecompressedHash);
    }
    let metas = manifest.tensor_metas();
    check_tensors(&payload, &metas, &manifest)?;
    Ok(Bundle {
        hash: crate::sha256_hex(bytes),
        file_len: bytes.len() as u64,
        manifest,
        payload,
        metas,
    })
}

fn check_role(m: &Manifest, role: Role, id: &str) -> Result<(), OpenError> {
    match (m.kind, role) {
        (BundleKind::Global, Role::Hq) => Ok(()),
        (BundleKind::Global, Role::Site) => Err(OpenError::RoleViolation(format!(
            "site key {id:?} signed a global bundle; only an hq key may"
        ))),
        (BundleKind::Update, Role::Hq) => Err(OpenError::RoleViolation(
            "an hq key signed a site update; only the site's own key may".into(),
        )),
        (BundleKind::Update, Role::Site) => match m.site_id() {
            Some(s) if s == id => Ok(()),
            other => Err(OpenError::RoleViolation(format!(
                "key of site {id:?} signed an update for site {:?}",
                crate::escape(other.unwrap_or(""))
            ))),
        },
    }
}

fn decompress(frame: &[u8], expected: u64, limits: &Limits) -> Result<Vec<u8>, OpenError> {
    let frame_err = |why: &str| OpenError::PayloadFrame(why.to_string());
    if u32_at(frame, 0) != Some(ZSTD_MAGIC) {
        return Err(frame_err("it does not start with a zstd frame"));
    }
    match zstd::zstd_safe::find_frame_compressed_size(frame) {
        Ok(n) if n == frame.len() => {}
        Ok(_) => return Err(frame_err("extra data after the first frame")),
        Err(_) => return Err(frame_err("the frame is damaged or truncated")),
    }
    match frame_window_size(frame) {
        Some(w) if w <= 1u64 << limits.window_log_max => {}
        Some(_) => {
            return Err(frame_err(
                "its window is larger than ferry allows (2^27 bytes)",
            ))
        }
        None => return Err(frame_err("the frame header is damaged")),
    }
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n == expected => {}
        Ok(Some(_)) => return Err(frame_err("the frame declares a different size than signed")),
        _ => return Err(frame_err("the frame does not declare its size")),
    }
    let err = |why: String| OpenError::Decompress { expected, why };
    let mut dec =
        zstd::stream::read::Decoder::with_buffer(frame).map_err(|e| err(e.to_string()))?;
    dec.window_log_max(limits.window_log_max)
        .map_err(|e| err(e.to_string()))?;
    // Reserve only a little up front: the buffer grows with what actually decodes, so a small frame that
    // declares a huge size costs nothing before it is refused.
    let mut out = Vec::with_capacity(expected.min(16 << 20) as usize);
    dec.take(expected + 1)
        .read_to_end(&mut out)
        .map_err(|e| err(e.to_string()))?;
    if out.len() as u64 != expected {
        return Err(err(format!("got {} bytes", out.len())));
    }
    Ok(out)
}

/// The window size a zstd frame header declares (RFC 8878 §3.1.1.1). libzstd skips its own window limit when
/// it can decode a frame in one pass, so the limit is checked here, from the header.
fn frame_window_size(frame: &[u8]) -> Option<u64> {
    let fhd = *frame.get(4)?;
    let single_segment = fhd & 0x20 != 0;
    if !single_segment {
        let wd = *frame.get(5)?;
        let window_log = 10 + u64::from(wd >> 3);
        let base = 1u64 << window_log;
        return Some(base + (base / 8) * u64::from(wd & 7));
    }
    // Single segment: the window is the content size, which follows the optional dictionary id.
    let dict_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_len = [1usize, 2, 4, 8][usize::from(fhd >> 6)];
    let at = 5 + dict_len;
    let b = frame.get(at..at + fcs_len)?;
    let mut v = [0u8; 8];
    v[..fcs_len].copy_from_slice(b);
    let size = u64::from_le_bytes(v);
    Some(if fcs_len == 2 { size + 256 } else { size })
}

fn check_tensors(
    payload: &[u8],
    metas: &[TensorMeta],
    manifest: &Manifest,
) -> Result<(), OpenError> {
    let header = canonical_header(metas).ok_or(OpenError::TensorTable)?;
    if payload.get(..header.len()) != Some(&header[..]) {
        return Err(OpenError::TensorTable);
    }
    let data_len: usize = metas.iter().map(|m| m.byte_len().unwrap_or(0)).sum();
    if header.len().checked_add(data_len) != Some(payload.len()) {
        return Err(OpenError::TensorTable);
    }
    for (t, entry) in crate::payload::tensor_refs(payload, metas).zip(&manifest.tensors) {
        if crate::sha256_hex(t.data) != entry.sha256 {
            return Err(OpenError::TensorHash(crate::escape(t.name)));
        }
    }
    Ok(())
}

/// What `inspect` can tell without trusting anything.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// Format version from the header.
    pub version: u16,
    /// Key id named in the header (unverified).
    pub key_id: String,
    /// The manifest as parsed (unverified), or why it could not be parsed.
    pub manifest: Result<Manifest, String>,
    /// Header frame size in bytes.
    pub header_len: u64,
    /// Bytes after the header (the compressed payload).
    pub payload_len: u64,
    /// SHA-256 of the whole file.
    pub hash: String,
    /// Whole file size.
    pub file_len: u64,
}

/// Parse a bundle's header and manifest without verifying anything. For display only: nothing here is trusted.
pub fn inspect(bytes: &[u8]) -> Result<Inspected, OpenError> {
    let h = parse_header(bytes, &Limits::default())?;
    let manifest = serde_json::from_slice::<Manifest>(h.manifest_bytes)
        .map_err(|e| e.to_string())
        .and_then(|m| m.validate().map(|_| m));
    Ok(Inspected {
        version: h.version,
        key_id: hex::encode(h.key_id),
        manifest,
        header_len: (bytes.len() - h.payload.len()) as u64,
        payload_len: h.payload.len() as u64,
        hash: crate::sha256_hex(bytes),
        file_len: bytes.len() as u64,
    })
}
