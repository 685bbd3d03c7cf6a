//! The container: header frame, signature, payload frame. The only code that turns bundle bytes into trusted
//! data, in this order: header → key → signature → manifest → payload hash → decompress (capped) → tensors.

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{OpenError, SealError};
use crate::fsutil;
use crate::keys::{KeyError, Keyring, Role, SecretKey};
use crate::manifest::{
    BundleKind, Draft, EncryptedTo, Encryption, Manifest, PayloadInfo, Signer,
    ENCRYPTED_FORMAT_VERSION, ENCRYPTION_SCHEME, FORMAT_VERSION, READ_VERSIONS,
};
use crate::payload::{canonical_header, Payload};
use crate::stream::{self, Fanout, FrameProblem, FrameWalker, TensorHashes, CHUNK};
use crate::tensor::{TensorMeta, TensorRef};

/// zstd skippable-frame magic used for the ferry header (0x184D2A5E, little-endian on disk).
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// Magic at the start of the header frame's content.
pub const HEADER_MAGIC: &[u8; 8] = b"FERRYBDL";
/// Domain separation prefix of the signed message of the current format (followed by the manifest bytes).
pub const SIGNATURE_DOMAIN: &[u8] = b"ferry-bundle-v2\0";

/// The signature domain of header version `version`: each version signs under its own, so a signature of one
/// version can never be taken for another (`docs/bundle-format.md` §11).
fn signature_domain(version: u16) -> &'static [u8] {
    match version {
        1 => b"ferry-bundle-v1\0",
        3 => b"ferry-bundle-v3\0",
        _ => SIGNATURE_DOMAIN,
    }
}
/// Largest bundle file read by default (8 GiB).
pub const MAX_BUNDLE_BYTES: u64 = 8 << 30;

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

    fn from_opened(o: Opened<Vec<u8>>) -> Bundle {
        Bundle {
            metas: o.manifest.tensor_metas(),
            manifest: o.manifest,
            hash: o.hash,
            file_len: o.file_len,
            payload: o.payload,
        }
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

    /// Write to `dir/<file_name>` atomically, never overwriting, then read it back from the medium. The file is
    /// created 0600: it holds weights, which are personal data (issue 15 §5); the stick's file system may not keep
    /// the mode, the sender's disk does.
    pub fn write_to_dir(&self, dir: &Path) -> Result<std::path::PathBuf, SealError> {
        fsutil::ensure_dir(dir)?;
        let path = dir.join(self.file_name());
        fsutil::write_new_verified_private(&path, &self.bytes)?;
        Ok(path)
    }
}

/// Refuse a key whose role may not sign the drafted kind of bundle.
fn check_signer(draft: &Draft, key: &SecretKey) -> Result<(), SealError> {
    match (draft.kind, key.role()) {
        (BundleKind::Global, Role::Hq) => Ok(()),
        (BundleKind::Global, Role::Site) => Err(KeyError::WrongRole(format!(
            "site key {:?} cannot sign a global bundle",
            key.id()
        ))
        .into()),
        (BundleKind::Update, Role::Site) => match &draft.site {
            Some(s) if s.id == key.id() => Ok(()),
            Some(s) => Err(KeyError::WrongRole(format!(
                "key of site {:?} cannot sign an update for site {:?}",
                key.id(),
                s.id
            ))
            .into()),
            None => Err(SealError::InvalidDraft(
                "an update must name its site".into(),
            )),
        },
        (BundleKind::Update, Role::Hq) => {
            Err(KeyError::WrongRole("an HQ key cannot sign a site update".into()).into())
        }
        (_, Role::Root) => Err(KeyError::WrongRole(
            "a root key signs only lists of HQ keys, never a bundle".into(),
        )
        .into()),
    }
}

/// Sign `payload` under `key` with the caller's `draft`. Checks that the key's role may sign this kind of bundle.
pub fn seal(
    draft: Draft,
    payload: &Payload,
    key: &SecretKey,
    level: i32,
) -> Result<Sealed, SealError> {
    let mut w = BundleWriter::new(draft, payload.metas.clone(), key, level)?;
    let data = payload
        .bytes()
        .get(w.header_len..)
        .ok_or_else(|| SealError::InvalidDraft("payload is shorter than its header".into()))?;
    for piece in data.chunks(CHUNK) {
        let mut chunk = w.buffer(piece.len());
        chunk.extend_from_slice(piece);
        w.write(chunk)?;
    }
    w.finish()
}

/// Payloads at least this large are compressed on zstd's worker threads. Below it zstd compresses on the
/// calling thread anyway (`ZSTDMT_JOBSIZE_MIN`), and small bundles stay byte-identical to older ferry.
const MT_MIN: usize = 1 << 20;

/// Seals a canonical payload that arrives as a stream of tensor bytes (HQ's merge writes the next global tensor
/// by tensor, without holding it): the payload is compressed on zstd's worker threads (`zstdmt`) while worker
/// threads hash it whole, tensor by tensor, and hash and collect the compressed bytes. [`seal`] is this writer
/// fed from memory.
///
/// The compressed bytes are collected behind room for the header, whose length is known in advance except for
/// the digits of the compressed length (predicted to be those of the payload's length; when wrong, the bytes are
/// moved once).
pub struct BundleWriter<'k> {
    draft: Draft,
    metas: Vec<TensorMeta>,
    key: &'k SecretKey,
    cctx: zstd::zstd_safe::CCtx<'static>,
    input: Fanout,
    whole: std::thread::JoinHandle<Sha256>,
    tensors: std::thread::JoinHandle<TensorHashes>,
    out_tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    collector: std::thread::JoinHandle<Result<Collected, String>>,
    header_len: usize,
    expected: u64,
    written: u64,
    prefix: usize,
    failed: Option<String>,
}

impl std::fmt::Debug for BundleWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleWriter")
            .field("expected", &self.expected)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

/// What the collector thread of a [`BundleWriter`] gathered: the bundle's bytes behind room for the header, and
/// the compressed payload's length and hash; when encrypting, the bytes are the age file and its hash comes too.
struct Collected {
    bytes: Vec<u8>,
    compressed_len: u64,
    compressed: Sha256,
    ciphertext: Option<Sha256>,
}

/// The bundle's bytes being written, hashed past the header's room (the ciphertext's hash, issue 15 §5).
struct HashedTail {
    bytes: Vec<u8>,
    hash: Sha256,
}

impl Write for HashedTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hash.update(buf);
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The recipients a draft encrypts to, as the manifest lists them (deduplicated, in the caller's order).
fn encrypted_to(draft: &Draft) -> Vec<EncryptedTo> {
    let mut out: Vec<EncryptedTo> = Vec::new();
    for k in &draft.encrypt_to {
        let recipient = k.recipient_text();
        if !out.iter().any(|r| r.recipient == recipient) {
            out.push(EncryptedTo {
                role: k.role,
                id: k.id.clone(),
                key_id: k.key_id_hex(),
                recipient,
            });
        }
    }
    out
}

fn zerr(code: usize) -> SealError {
    SealError::Compress(zstd::zstd_safe::get_error_name(code).to_string())
}

impl<'k> BundleWriter<'k> {
    /// Start a bundle of the model `metas` (sorted by name, as a [`Payload`] has them) under `draft`, signed by
    /// `key` when finished. The role check comes first, before any work.
    pub fn new(
        draft: Draft,
        metas: Vec<TensorMeta>,
        key: &'k SecretKey,
        level: i32,
    ) -> Result<BundleWriter<'k>, SealError> {
        check_signer(&draft, key)?;
        let header = canonical_header(&metas)
            .ok_or_else(|| SealError::Safetensors("model is too large".into()))?;
        let lens: Vec<u64> = metas
            .iter()
            .map(|m| m.byte_len().map(|l| l as u64))
            .collect::<Option<_>>()
            .ok_or_else(|| SealError::Safetensors("model is too large".into()))?;
        let expected = header.len() as u64 + lens.iter().sum::<u64>();
        let mut cctx = zstd::zstd_safe::CCtx::create();
        use zstd::zstd_safe::CParameter as P;
        for p in [
            P::CompressionLevel(level),
            P::ContentSizeFlag(true),
            P::ChecksumFlag(true),
        ] {
            cctx.set_parameter(p).map_err(zerr)?;
        }
        if expected >= MT_MIN as u64 {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            cctx.set_parameter(P::NbWorkers(threads.clamp(1, 8) as u32))
                .map_err(zerr)?;
        }
        cctx.set_pledged_src_size(Some(expected)).map_err(zerr)?;

        let (whole_tx, whole) = stream::spawn_fold(Sha256::new());
        let (tensor_tx, tensors) = stream::spawn_fold(TensorHashes::new(header.clone(), lens));
        // Encryption (issue 15 §5): an age file to the draft's recipients, whose plaintext is the zstd frame.
        let recipients = encrypted_to(&draft);
        let encryptor = if recipients.is_empty() {
            None
        } else {
            let keys: Vec<age::x25519::Recipient> =
                draft.encrypt_to.iter().map(|k| k.recipient()).collect();
            Some(
                age::Encryptor::with_recipients(keys.iter().map(|r| r as &dyn age::Recipient))
                    .map_err(|e| SealError::Encrypt(e.to_string()))?,
            )
        };
        // The header predicted with the compressed length's digits taken from the payload's length.
        let public = key.public();
        let probe = manifest_for(
            &draft,
            &metas,
            &public,
            PayloadInfo {
                codec: "zstd".into(),
                compressed_len: expected,
                compressed_sha256: "0".repeat(64),
                len: expected,
                sha256: "0".repeat(64),
            },
            (!recipients.is_empty()).then(|| Encryption {
                scheme: ENCRYPTION_SCHEME.into(),
                recipients: recipients.clone(),
                len: expected,
                sha256: "0".repeat(64),
            }),
            vec![String::new(); metas.len()],
        );
        let prefix = 8 + FIXED + SIG_LEN + serde_json::to_vec(&probe).map_or(0, |m| m.len());
        let (out_tx, out_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        // Room for the whole bundle up front (zstd's bound on the compressed size): growing the buffer by
        // doubling would copy it and, for a moment, hold it twice (issue 13). Capacity not written to is only
        // reserved address space, not memory; where even that is refused (strict overcommit), the buffer grows.
        let bound = usize::try_from(expected)
            .map_or(0, zstd::zstd_safe::compress_bound)
            .saturating_add(prefix);
        let collector = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = bytes.try_reserve_exact(bound);
            bytes.resize(prefix, 0);
            let mut h = Sha256::new();
            let mut compressed_len = 0u64;
            let Some(encryptor) = encryptor else {
                for c in out_rx {
                    h.update(&c);
                    compressed_len += c.len() as u64;
                    bytes.extend_from_slice(&c);
                }
                return Ok(Collected {
                    bytes,
                    compressed_len,
                    compressed: h,
                    ciphertext: None,
                });
            };
            let tail = HashedTail {
                bytes,
                hash: Sha256::new(),
            };
            let mut w = encryptor.wrap_output(tail).map_err(|e| e.to_string())?;
            for c in out_rx {
                h.update(&c);
                compressed_len += c.len() as u64;
                w.write_all(&c).map_err(|e| e.to_string())?;
            }
            let tail = w.finish().map_err(|e| e.to_string())?;
            Ok(Collected {
                bytes: tail.bytes,
                compressed_len,
                compressed: h,
                ciphertext: Some(tail.hash),
            })
        });
        let mut w = BundleWriter {
            draft,
            metas,
            key,
            cctx,
            input: Fanout::new(vec![whole_tx, tensor_tx]),
            whole,
            tensors,
            out_tx,
            collector,
            header_len: header.len(),
            expected,
            written: 0,
            prefix,
            failed: None,
        };
        w.write(header)?;
        Ok(w)
    }

    /// An empty chunk buffer with room for `cap` bytes (recycled when the workers are done with one).
    pub fn buffer(&mut self, cap: usize) -> Vec<u8> {
        self.input.buffer(cap)
    }

    /// The next bytes of the payload: tensor data, in the layout's order, packed.
    pub fn write(&mut self, chunk: Vec<u8>) -> Result<(), SealError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.written += chunk.len() as u64;
        if self.written > self.expected {
            return Err(SealError::InvalidDraft(
                "more tensor bytes than the layout holds".into(),
            ));
        }
        let chunk = self.input.send(chunk);
        self.compress(
            &chunk,
            zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_continue,
        )
    }

    fn compress(
        &mut self,
        data: &[u8],
        end: zstd::zstd_safe::zstd_sys::ZSTD_EndDirective,
    ) -> Result<(), SealError> {
        let mut input = zstd::zstd_safe::InBuffer::around(data);
        loop {
            let mut out = Vec::with_capacity(CHUNK);
            let left = {
                let mut o = zstd::zstd_safe::OutBuffer::around(&mut out);
                self.cctx.compress_stream2(&mut o, &mut input, end)
            };
            let left = left.map_err(|code| {
                let e = zerr(code);
                self.failed = Some(e.to_string());
                e
            })?;
            let full = out.len() == out.capacity();
            if !out.is_empty() && self.out_tx.send(out).is_err() {
                return Err(SealError::Compress("the collector stopped".into()));
            }
            let done = match end {
                zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end => left == 0,
                _ => input.pos() == data.len() && !full,
            };
            if done {
                return Ok(());
            }
        }
    }

    /// End the payload, then sign: the manifest gets the payload's, tensors' and compressed bytes' hashes.
    pub fn finish(mut self) -> Result<Sealed, SealError> {
        if self.written != self.expected {
            return Err(SealError::InvalidDraft(format!(
                "the payload holds {} bytes, its layout {}",
                self.written, self.expected
            )));
        }
        self.compress(
            &[],
            zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end,
        )?;
        let BundleWriter {
            draft,
            metas,
            key,
            input,
            whole,
            tensors,
            out_tx,
            collector,
            prefix,
            expected,
            ..
        } = self;
        drop(input);
        drop(out_tx);
        let payload_sha = hex::encode(stream::join(whole).finalize());
        let tensors = stream::join(tensors);
        let collected = stream::join(collector).map_err(SealError::Encrypt)?;
        let mut bytes = collected.bytes;
        let on_disk = (bytes.len() - prefix) as u64;
        let public = key.public();
        let encryption = collected.ciphertext.map(|h| Encryption {
            scheme: ENCRYPTION_SCHEME.into(),
            recipients: encrypted_to(&draft),
            len: on_disk,
            sha256: hex::encode(h.finalize()),
        });
        let manifest = manifest_for(
            &draft,
            &metas,
            &public,
            PayloadInfo {
                codec: "zstd".into(),
                compressed_len: collected.compressed_len,
                compressed_sha256: hex::encode(collected.compressed.finalize()),
                len: expected,
                sha256: payload_sha,
            },
            encryption,
            tensors.digests().iter().map(hex::encode).collect(),
        );
        manifest.validate().map_err(SealError::InvalidDraft)?;
        let manifest_bytes =
            serde_json::to_vec(&manifest).map_err(|e| SealError::InvalidDraft(e.to_string()))?;
        let header = header_frame(manifest.format as u16, &manifest_bytes, key);
        if header.len() == prefix {
            bytes[..prefix].copy_from_slice(&header);
        } else {
            // Moved in place (within the reserved room when the header is longer), never held twice.
            bytes.splice(..prefix, header);
        }
        let hash = crate::sha256_hex(&bytes);
        Ok(Sealed {
            bytes,
            hash,
            manifest,
        })
    }
}

/// The manifest of a bundle drafted as `draft` holding the model `metas` with tensor hashes `sha256s`.
fn manifest_for(
    draft: &Draft,
    metas: &[TensorMeta],
    public: &crate::keys::PublicKey,
    payload: PayloadInfo,
    encryption: Option<Encryption>,
    sha256s: Vec<String>,
) -> Manifest {
    let expires = match draft.kind {
        BundleKind::Global => Some(
            draft.expires.unwrap_or(
                draft
                    .created
                    .saturating_add(crate::manifest::DEFAULT_GLOBAL_VALIDITY),
            ),
        ),
        BundleKind::Update => draft.expires,
    };
    Manifest {
        format: if encryption.is_some() {
            ENCRYPTED_FORMAT_VERSION
        } else {
            FORMAT_VERSION
        },
        kind: draft.kind,
        federation: draft.federation.clone(),
        arch: draft.arch.clone(),
        model_fingerprint: crate::tensor::fingerprint(metas.iter()),
        round: draft.round,
        base: draft.base.clone(),
        site: draft.site.clone(),
        contributors: draft.contributors.clone(),
        strategy: draft.strategy.clone(),
        revocations: draft.revocations.clone(),
        payload,
        encryption,
        tensors: metas
            .iter()
            .zip(sha256s)
            .map(|(m, sha256)| crate::manifest::TensorEntry {
                name: m.name.clone(),
                dtype: crate::tensor::dtype_name(m.dtype).to_string(),
                shape: m.shape.clone(),
                sha256,
            })
            .collect(),
        signer: Signer {
            id: public.id.clone(),
            role: public.role,
            key_id: public.key_id_hex(),
        },
        created: draft.created,
        expires,
    }
}

/// The header frame over `manifest_bytes` under header version `version` and its signature domain, signed by
/// `key`: everything of a bundle before its payload.
fn header_frame(version: u16, manifest_bytes: &[u8], key: &SecretKey) -> Vec<u8> {
    let public = key.public();
    let domain = signature_domain(version);
    let mut message = Vec::with_capacity(domain.len() + manifest_bytes.len());
    message.extend_from_slice(domain);
    message.extend_from_slice(manifest_bytes);
    let signature = key.sign(&message);
    let content_len = FIXED + manifest_bytes.len() + SIG_LEN;
    let mut bytes = Vec::with_capacity(8 + content_len);
    bytes.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&(content_len as u32).to_le_bytes());
    bytes.extend_from_slice(HEADER_MAGIC);
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes());
    bytes.extend_from_slice(&public.key_id());
    bytes.extend_from_slice(&(manifest_bytes.len() as u32).to_le_bytes());
    bytes.extend_from_slice(manifest_bytes);
    bytes.extend_from_slice(&signature);
    bytes
}

/// Assemble a bundle from raw manifest bytes and a compressed payload, signing whatever it is given.
/// No role or consistency checks: this is how test vectors make hostile-but-validly-signed files.
/// Real bundles come from [`seal`].
pub fn assemble(manifest_bytes: &[u8], key: &SecretKey, compressed: &[u8]) -> Vec<u8> {
    assemble_version(FORMAT_VERSION as u16, manifest_bytes, key, compressed)
}

/// [`assemble`] under header version `version` and its signature domain: how the test kit writes bundles of
/// older formats, which readers must keep reading.
pub fn assemble_version(
    version: u16,
    manifest_bytes: &[u8],
    key: &SecretKey,
    compressed: &[u8],
) -> Vec<u8> {
    let mut bytes = header_frame(version, manifest_bytes, key);
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

/// A bundle whose signature, manifest and every payload hash verified, its decompressed payload written to the
/// caller's `W` ([`open_file_into`]): a `Vec<u8>`, a scratch file, or `std::io::sink()` to check without keeping.
#[derive(Debug)]
pub struct Opened<W> {
    /// The verified manifest.
    pub manifest: Manifest,
    /// SHA-256 of the whole bundle file, lower-case hex.
    pub hash: String,
    /// Size of the bundle file.
    pub file_len: u64,
    /// Where the verified payload went.
    pub payload: W,
}

impl<W> Opened<W> {
    /// Tensor names, dtypes and shapes, sorted by name.
    pub fn metas(&self) -> Vec<TensorMeta> {
        self.manifest.tensor_metas()
    }
}

/// A bundle whose header, signature, manifest and compressed payload hash verified, without decompressing the
/// payload ([`identify_file`]): enough to name it and trust what its manifest says, since the signed hash pins
/// every payload byte. Whether the payload decompresses to the tensors the manifest lists is not checked.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The verified manifest.
    pub manifest: Manifest,
    /// SHA-256 of the whole bundle file, lower-case hex.
    pub hash: String,
    /// Size of the bundle file.
    pub file_len: u64,
}

/// How far [`read_bundle`] goes after the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Depth {
    /// Up to the compressed payload's hash.
    Identify,
    /// Everything: decompress and check the tensors.
    Full,
}

/// The header frame as read, not yet verified.
struct HeaderFrame {
    version: u16,
    key_id: [u8; 8],
    manifest_len: usize,
    /// Bytes 0 to the end of the signature: where the file hash starts.
    bytes: Vec<u8>,
}

impl HeaderFrame {
    fn manifest_bytes(&self) -> &[u8] {
        &self.bytes[8 + FIXED..8 + FIXED + self.manifest_len]
    }
    fn signature(&self) -> [u8; SIG_LEN] {
        let mut s = [0u8; SIG_LEN];
        s.copy_from_slice(&self.bytes[8 + FIXED + self.manifest_len..]);
        s
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Read into `buf` until it is full or the source ends; the count read.
fn read_full<R: Read + ?Sized>(src: &mut R, buf: &mut [u8]) -> Result<usize, OpenError> {
    let mut at = 0;
    while at < buf.len() {
        match src.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(OpenError::Read(e)),
        }
    }
    Ok(at)
}

/// Read the header frame of a `file_len`-byte bundle: the fixed 32 bytes first, checked, and only then the
/// manifest and signature they announce (at most `limits.max_manifest_bytes`).
fn read_header<R: Read + ?Sized>(
    src: &mut R,
    file_len: u64,
    limits: &Limits,
) -> Result<HeaderFrame, OpenError> {
    let fixed = 8 + FIXED;
    let mut bytes = vec![0u8; fixed];
    let got = read_full(src, &mut bytes)?;
    // The magic first, on whatever arrived: a short file of something else is "not a bundle", and only a file
    // that starts like one is "too short".
    let magic_ok = bytes[..got.min(4)] == SKIPPABLE_MAGIC.to_le_bytes()[..got.min(4)]
        && (got <= 8 || bytes[8..got.min(16)] == HEADER_MAGIC[..got.min(16) - 8]);
    if !magic_ok {
        return Err(OpenError::WrongMagic);
    }
    if got < fixed || file_len < fixed as u64 {
        return Err(OpenError::TooShort(got.min(file_len as usize)));
    }
    let version = u16::from_le_bytes([bytes[16], bytes[17]]);
    if !READ_VERSIONS.contains(&u32::from(version)) {
        return Err(OpenError::UnsupportedVersion(version));
    }
    if file_len > limits.max_bundle_bytes {
        return Err(OpenError::MalformedHeader(
            "the file is larger than a bundle may be",
        ));
    }
    if bytes[18] != 0 || bytes[19] != 0 {
        return Err(OpenError::MalformedHeader("reserved bytes are not zero"));
    }
    let frame_len = u32_at(&bytes, 4).ok_or(OpenError::MalformedHeader("truncated"))? as usize;
    let manifest_len = u32_at(&bytes, 28).ok_or(OpenError::MalformedHeader("truncated"))?;
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
    let truncated = OpenError::MalformedHeader("file ends inside the header (truncated)");
    if file_len < frame_end as u64 {
        return Err(truncated);
    }
    let mut key_id = [0u8; 8];
    key_id.copy_from_slice(&bytes[20..28]);
    bytes.resize(frame_end, 0);
    if read_full(src, &mut bytes[fixed..])? < frame_end - fixed {
        return Err(truncated);
    }
    Ok(HeaderFrame {
        version,
        key_id,
        manifest_len,
        bytes,
    })
}

/// Check the key, the signature and then the manifest of a header frame: the manifest is parsed only after its
/// signature verified.
fn verify_header(h: &HeaderFrame, keyring: &Keyring) -> Result<Manifest, OpenError> {
    let key_hex = hex::encode(h.key_id);
    if keyring.is_revoked(&h.key_id) {
        return Err(OpenError::RevokedKey(key_hex));
    }
    let key = keyring
        .get(&h.key_id)
        .ok_or_else(|| OpenError::UntrustedKey(key_hex.clone()))?;
    let domain = signature_domain(h.version);
    let mut message = Vec::with_capacity(domain.len() + h.manifest_len);
    message.extend_from_slice(domain);
    message.extend_from_slice(h.manifest_bytes());
    let sig = ed25519_dalek::Signature::from_bytes(&h.signature());
    key.verifying_key()
        .verify_strict(&message, &sig)
        .map_err(|_| OpenError::BadSignature)?;

    // From here on the manifest was signed by a trusted key.
    let manifest =
        Manifest::parse(h.version, h.manifest_bytes()).map_err(OpenError::InvalidManifest)?;
    manifest.validate().map_err(OpenError::InvalidManifest)?;
    if u32::from(h.version) != manifest.format {
        return Err(OpenError::InvalidManifest(format!(
            "manifest format {} differs from the header's version {}",
            manifest.format, h.version
        )));
    }
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
    Ok(manifest)
}

/// Read and verify a bundle of `file_len` bytes from `src` (positioned at its start), writing the verified
/// payload to `out` (`Depth::Full`). The one reader behind [`open`], [`open_file`], [`open_file_into`] and
/// [`identify_file`].
///
/// Order, as `docs/bundle-format.md` §5 gives it: header → key → signature → manifest → payload length. Then the
/// payload streams through once: its chunks are hashed (whole file, compressed payload) on worker threads while
/// this thread follows the zstd frame and decompresses it (capped at the signed length) into `out`, and the
/// decompressed bytes are hashed (whole payload, each tensor) on two more workers. The verdicts are then taken
/// in the specification's order, so the compressed payload's hash is checked before anything about its
/// contents is believed: until then the decompressed bytes sit in `out`, unused, and a caller gets them only in
/// an `Ok`.
fn read_bundle<R: Read, W: Write>(
    mut src: R,
    file_len: u64,
    keyring: &Keyring,
    limits: &Limits,
    depth: Depth,
    out: W,
) -> Result<Opened<W>, OpenError> {
    let h = read_header(&mut src, file_len, limits)?;
    let manifest = verify_header(&h, keyring)?;
    let p = &manifest.payload;
    // What sits on disk after the header: the zstd frame, or (format 3) the age file holding it.
    let (disk_len, disk_sha) = match &manifest.encryption {
        Some(e) => (e.len, &e.sha256),
        None => (p.compressed_len, &p.compressed_sha256),
    };
    let payload_len = file_len - h.bytes.len() as u64;
    if payload_len != disk_len {
        return Err(OpenError::PayloadLength {
            expected: disk_len,
            actual: payload_len,
        });
    }
    // An encrypted payload is read only with an identity the signed manifest names (issue 15 §5); without
    // one, the refusal comes before any payload byte is read.
    let identities: Option<Vec<&age::x25519::Identity>> = match (&manifest.encryption, depth) {
        (Some(e), Depth::Full) => {
            let ours = keyring.identities();
            if ours.is_empty() {
                return Err(OpenError::Encrypted(e.describe_recipients()));
            }
            let named: Vec<&age::x25519::Identity> = ours
                .iter()
                .filter(|i| e.recipients.iter().any(|r| r.recipient == i.recipient))
                .map(|i| i.identity())
                .collect();
            if named.is_empty() {
                return Err(OpenError::NotARecipient {
                    to: e.describe_recipients(),
                    yours: ours
                        .iter()
                        .map(|i| format!("{} {}", i.id, i.recipient))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            Some(named)
        }
        _ => None,
    };
    let metas = manifest.tensor_metas();
    let header = canonical_header(&metas);
    let decode = depth == Depth::Full && p.len <= limits.max_payload_bytes;
    let mut file_hash = Sha256::new();
    file_hash.update(&h.bytes);
    let mut out = out;

    let s = {
        let (file_tx, file_h) = stream::spawn_fold(file_hash);
        let (disk_tx, disk_h) = stream::spawn_fold(Sha256::new());
        let mut disk = Fanout::new(vec![file_tx, disk_tx]);
        let mut inflate = decode.then(|| {
            let (whole_tx, whole_h) = stream::spawn_fold(Sha256::new());
            let lens = metas.iter().map(|m| m.byte_len().unwrap_or(0) as u64);
            let check = TensorHashes::new(header.clone().unwrap_or_default(), lens);
            let (check_tx, check_h) = stream::spawn_fold(check);
            (
                Inflate::new(Fanout::new(vec![whole_tx, check_tx]), p.len, &mut out),
                whole_h,
                check_h,
            )
        });
        let mut walker = FrameWalker::new();
        let mut tee = Tee {
            src: &mut src,
            left: disk_len,
            fanout: &mut disk,
            err: None,
        };
        let mut decrypted = None;
        match &identities {
            None => {
                // In the clear (or only identified): the bytes on disk are what the decoder follows.
                let plain = manifest.encryption.is_none();
                loop {
                    let want = (CHUNK as u64).min(tee.left) as usize;
                    if want == 0 {
                        break;
                    }
                    let Some(chunk) = tee.next_chunk(want) else {
                        break;
                    };
                    if plain {
                        walker.feed(&chunk);
                        if let Some((inf, _, _)) = inflate.as_mut() {
                            inf.feed(&chunk, &walker, limits);
                        }
                    }
                }
            }
            Some(ids) => {
                // Encrypted: age decrypts while the ciphertext streams past the hash workers; the plaintext (the
                // zstd frame) is hashed and followed like a payload in the clear. Nothing it yields is believed
                // before the ciphertext's hash has been checked, below.
                let (plain_tx, plain_h) = stream::spawn_fold(Sha256::new());
                let mut plain = Fanout::new(vec![plain_tx]);
                let mut plain_len = 0u64;
                let failed = decrypt_into(&mut tee, ids, |buf: Vec<u8>| {
                    plain_len += buf.len() as u64;
                    let chunk = plain.send(buf);
                    walker.feed(&chunk);
                    if let Some((inf, _, _)) = inflate.as_mut() {
                        inf.feed(&chunk, &walker, limits);
                    }
                    plain.buffer(CHUNK)
                });
                // Whatever age did not read is still hashed: the ciphertext verdict needs every byte.
                while tee.left > 0 && tee.err.is_none() {
                    let want = (CHUNK as u64).min(tee.left) as usize;
                    if tee.next_chunk(want).is_none() {
                        break;
                    }
                }
                drop(plain);
                decrypted = Some((failed, plain_len, stream::join(plain_h).finalize().into()));
            }
        }
        let (read_err, left) = (tee.err.take(), tee.left);
        // A file that grew after its length was read: bytes past the signed length are refused too.
        let mut probe = [0u8; 1];
        let extra = if left == 0 && read_err.is_none() {
            read_full(&mut src, &mut probe).unwrap_or(0) as u64
        } else {
            0
        };
        drop(disk);
        let decoded = inflate.map(|(inf, whole_h, check_h)| {
            let d = inf.finish();
            (d, stream::join(whole_h), stream::join(check_h))
        });
        Streamed {
            read_err,
            short_by: left,
            extra,
            file_digest: stream::join(file_h).finalize().into(),
            comp_digest: stream::join(disk_h).finalize().into(),
            decrypted,
            frame: walker.finish(),
            decoded: decoded.map(|(d, whole, check)| {
                let tensors = match header {
                    Some(_) if check.layout_ok(d.produced) => {
                        match manifest
                            .tensors
                            .iter()
                            .zip(check.digests())
                            .position(|(e, digest)| hex::encode(digest) != e.sha256)
                        {
                            Some(i) => Err(Some(i)),
                            None => Ok(()),
                        }
                    }
                    _ => Err(None),
                };
                (d, whole.finalize().into(), tensors)
            }),
        }
    };

    // The verdicts, in the specification's order.
    if let Some(e) = s.read_err {
        return Err(OpenError::Read(e));
    }
    if s.short_by > 0 || s.extra > 0 {
        return Err(OpenError::PayloadLength {
            expected: disk_len,
            actual: disk_len - s.short_by + s.extra,
        });
    }
    if hex::encode(s.comp_digest) != *disk_sha {
        return Err(OpenError::PayloadHash);
    }
    if let Some((failed, plain_len, plain_digest)) = &s.decrypted {
        if let Some(why) = failed {
            return Err(OpenError::Decrypt(why.clone()));
        }
        if *plain_len != p.compressed_len || hex::encode(plain_digest) != p.compressed_sha256 {
            return Err(OpenError::DecryptedHash);
        }
    }
    let hash = hex::encode(s.file_digest);
    if depth == Depth::Full {
        check_payload(&s, p, limits, &metas)?;
    }
    if keyring.is_bundle_revoked(&hash) {
        return Err(OpenError::RevokedBundle(crate::short(&hash).to_string()));
    }
    Ok(Opened {
        manifest,
        hash,
        file_len,
        payload: out,
    })
}

/// The payload's bytes on disk as [`read_bundle`] reads them: at most the signed length, each piece handed to
/// the hash workers as it passes, whether this thread pulls it in chunks or age's decryptor pulls it through
/// [`Read`]. A read error is kept for the verdicts (and passed on to the puller).
struct Tee<'a, R> {
    src: &'a mut R,
    left: u64,
    fanout: &'a mut Fanout,
    err: Option<std::io::Error>,
}

impl<R: Read> Tee<'_, R> {
    /// The next `want` bytes (fewer at the end of the file), or `None` at the end or on an error.
    fn next_chunk(&mut self, want: usize) -> Option<std::sync::Arc<Vec<u8>>> {
        let mut buf = self.fanout.buffer(want);
        match (&mut *self.src).take(want as u64).read_to_end(&mut buf) {
            Ok(0) => None,
            Ok(n) => {
                self.left -= n as u64;
                Some(self.fanout.send(buf))
            }
            Err(e) => {
                self.err = Some(e);
                None
            }
        }
    }
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let want = (out.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        match self.src.read(&mut out[..want]) {
            Ok(n) => {
                if n > 0 {
                    self.left -= n as u64;
                    let mut buf = self.fanout.buffer(n);
                    buf.extend_from_slice(&out[..n]);
                    self.fanout.send(buf);
                }
                Ok(n)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let kept = std::io::Error::new(e.kind(), e.to_string());
                self.err = Some(e);
                Err(kept)
            }
        }
    }
}

/// Decrypt the age file `tee` reads with `identities`, handing the plaintext to `sink` in chunks of up to
/// [`CHUNK`] bytes (`sink` returns the next empty buffer). Returns why decryption failed, if it did: a header
/// age cannot read, no stanza for these identities, or a chunk that does not authenticate (age's STREAM).
/// The plaintext is bounded by the ciphertext, which is bounded by its signed length.
fn decrypt_into<R: Read>(
    tee: &mut Tee<'_, R>,
    identities: &[&age::x25519::Identity],
    mut sink: impl FnMut(Vec<u8>) -> Vec<u8>,
) -> Option<String> {
    let reader = std::io::BufReader::with_capacity(CHUNK, &mut *tee);
    let decryptor = match age::Decryptor::new_buffered(reader) {
        Ok(d) => d,
        Err(e) => return Some(format!("not a readable age file: {e}")),
    };
    let mut plain = match decryptor.decrypt(identities.iter().map(|i| *i as &dyn age::Identity)) {
        Ok(r) => r,
        Err(age::DecryptError::NoMatchingKeys) => {
            return Some("no recipient stanza of the age file is for it".into())
        }
        Err(e) => return Some(e.to_string()),
    };
    let mut buf = Vec::with_capacity(CHUNK);
    loop {
        buf.clear();
        match (&mut plain).take(CHUNK as u64).read_to_end(&mut buf) {
            Ok(0) => return None,
            Ok(_) => buf = sink(std::mem::take(&mut buf)),
            Err(e) => return Some(format!("the ciphertext does not authenticate: {e}")),
        }
    }
}

/// Whether every tensor's bytes matched its signed hash: `Err(None)` when the layout itself was wrong,
/// `Err(Some(i))` when tensor `i`'s hash differs.
type TensorVerdict = Result<(), Option<usize>>;

/// What streaming a payload found, judged afterwards by [`check_payload`].
struct Streamed {
    read_err: Option<std::io::Error>,
    short_by: u64,
    extra: u64,
    file_digest: [u8; 32],
    /// SHA-256 of the payload bytes on disk: the zstd frame, or the age file when encrypted.
    comp_digest: [u8; 32],
    /// When decrypted: why decryption failed (if it did), the plaintext's length and SHA-256.
    decrypted: Option<(Option<String>, u64, [u8; 32])>,
    frame: Result<(), FrameProblem>,
    /// When decompressed: what the decoder did, the payload's SHA-256, the layout's verdict.
    decoded: Option<(Decoded, [u8; 32], TensorVerdict)>,
}

/// Everything after the compressed payload's hash: frame, decompression, payload hash, tensors.
fn check_payload(
    s: &Streamed,
    p: &PayloadInfo,
    limits: &Limits,
    metas: &[TensorMeta],
) -> Result<(), OpenError> {
    if p.len > limits.max_payload_bytes {
        return Err(OpenError::Decompress {
            expected: p.len,
            why: "larger than this reader accepts".into(),
        });
    }
    if let Some((
        Decoded {
            write_failed: Some(e),
            ..
        },
        _,
        _,
    )) = &s.decoded
    {
        return Err(OpenError::Write(std::io::Error::new(
            e.kind(),
            e.to_string(),
        )));
    }
    let frame_err = |why: &str| OpenError::PayloadFrame(why.to_string());
    match s.frame {
        Ok(()) => {}
        Err(FrameProblem::NotZstd) => return Err(frame_err("it does not start with a zstd frame")),
        Err(FrameProblem::Extra) => return Err(frame_err("extra data after the first frame")),
        Err(FrameProblem::Damaged) => return Err(frame_err("the frame is damaged or truncated")),
    }
    let Some((d, whole, tensors)) = &s.decoded else {
        return Err(frame_err("the frame is damaged or truncated"));
    };
    match d.head {
        Head::Ok => {}
        Head::Window => {
            return Err(frame_err(
                "its window is larger than ferry allows (2^27 bytes)",
            ))
        }
        Head::Damaged => return Err(frame_err("the frame header is damaged")),
        Head::SizeDiffers => {
            return Err(frame_err("the frame declares a different size than signed"))
        }
        Head::NoSize => return Err(frame_err("the frame does not declare its size")),
    }
    let err = |why: String| OpenError::Decompress {
        expected: p.len,
        why,
    };
    if let Some(why) = &d.failed {
        return Err(err(why.clone()));
    }
    if d.produced != p.len {
        return Err(err(format!("got {} bytes", d.produced)));
    }
    if hex::encode(whole) != p.sha256 {
        return Err(OpenError::DecompressedHash);
    }
    match tensors {
        Ok(()) => Ok(()),
        Err(None) => Err(OpenError::TensorTable),
        Err(Some(i)) => Err(OpenError::TensorHash(crate::escape(
            metas.get(*i).map_or("", |m| m.name.as_str()),
        ))),
    }
}

/// The frame header's verdict, taken before anything is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    Ok,
    Damaged,
    Window,
    SizeDiffers,
    NoSize,
}

/// What the decoder did.
struct Decoded {
    head: Head,
    produced: u64,
    failed: Option<String>,
    write_failed: Option<std::io::Error>,
}

/// The decompressing side of [`read_bundle`]: a zstd stream decoder, started only once the frame header has
/// arrived and passed the window and size checks, writing at most the signed length (plus one byte, to tell
/// "too long") to the output and to the payload's hash workers.
struct Inflate<'o, W> {
    fanout: Fanout,
    dctx: Option<zstd::zstd_safe::DCtx<'static>>,
    head: Option<Head>,
    expected: u64,
    produced: u64,
    finished: bool,
    failed: Option<String>,
    write_failed: Option<std::io::Error>,
    out: &'o mut W,
}

impl<'o, W: Write> Inflate<'o, W> {
    fn new(fanout: Fanout, expected: u64, out: &'o mut W) -> Self {
        Inflate {
            fanout,
            dctx: None,
            head: None,
            expected,
            produced: 0,
            finished: false,
            failed: None,
            write_failed: None,
            out,
        }
    }

    /// Decide, from the frame header, whether to decode at all (before any byte is decoded).
    fn start(&mut self, header: &[u8], limits: &Limits) {
        let head = match (
            frame_window_size(header),
            zstd::zstd_safe::get_frame_content_size(header),
        ) {
            (None, _) => Head::Damaged,
            (Some(w), _) if w > 1u64 << limits.window_log_max => Head::Window,
            (_, Ok(Some(n))) if n == self.expected => Head::Ok,
            (_, Ok(Some(_))) => Head::SizeDiffers,
            _ => Head::NoSize,
        };
        self.head = Some(head);
        if head != Head::Ok {
            return;
        }
        let mut dctx = zstd::zstd_safe::DCtx::create();
        match dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
            limits.window_log_max,
        )) {
            Ok(_) => self.dctx = Some(dctx),
            Err(code) => self.failed = Some(zstd::zstd_safe::get_error_name(code).to_string()),
        }
    }

    fn feed(&mut self, chunk: &[u8], walker: &FrameWalker, limits: &Limits) {
        if self.head.is_none() {
            match walker.header() {
                Some(header) => {
                    let header = header.to_vec();
                    self.start(&header, limits)
                }
                None if walker.failed() => self.head = Some(Head::Damaged),
                None => return,
            }
        }
        if self.finished || self.failed.is_some() || self.write_failed.is_some() {
            return;
        }
        let Some(dctx) = self.dctx.as_mut() else {
            return;
        };
        let mut input = zstd::zstd_safe::InBuffer::around(chunk);
        loop {
            // At most one byte past the signed length, so "too long" shows without decoding a bomb.
            let room = (self.expected + 1 - self.produced).min(CHUNK as u64) as usize;
            if room == 0 {
                return;
            }
            let mut buf = self.fanout.buffer(room);
            if buf.capacity() > room {
                buf = Vec::with_capacity(room);
            }
            let res = {
                let mut output = zstd::zstd_safe::OutBuffer::around(&mut buf);
                dctx.decompress_stream(&mut output, &mut input)
            };
            let n = buf.len();
            if n > 0 {
                self.produced += n as u64;
                if let Err(e) = self.out.write_all(&buf) {
                    self.write_failed = Some(e);
                    return;
                }
                self.fanout.send(buf);
            }
            match res {
                Err(code) => {
                    self.failed = Some(zstd::zstd_safe::get_error_name(code).to_string());
                    return;
                }
                Ok(0) => {
                    self.finished = true;
                    return;
                }
                Ok(_) if input.pos() == chunk.len() && n < room => return,
                Ok(_) => {}
            }
        }
    }

    fn finish(self) -> Decoded {
        let head = self.head.unwrap_or(Head::Damaged);
        let failed = match (&self.failed, head, self.finished) {
            (Some(f), _, _) => Some(f.clone()),
            (None, Head::Ok, false) if self.produced <= self.expected => {
                Some("the frame ends early".to_string())
            }
            _ => None,
        };
        Decoded {
            head,
            produced: self.produced,
            failed,
            write_failed: self.write_failed,
        }
    }
}

/// Verify bundle bytes already in memory against trusted keys, then decompress and check the payload. Nothing is
/// parsed before the signature and the compressed payload's hash have verified.
pub fn open(bytes: &[u8], keyring: &Keyring, limits: &Limits) -> Result<Bundle, OpenError> {
    let o = read_bundle(
        bytes,
        bytes.len() as u64,
        keyring,
        limits,
        Depth::Full,
        Vec::new(),
    )?;
    Ok(Bundle::from_opened(o))
}

/// Read and verify a bundle file: only a regular file is opened ([`fsutil::open_regular`]: a FIFO, a device or
/// a directory is refused before anything is read), its 32-byte header is checked before anything else is read,
/// and the payload is read once, as a stream, up to its signed length.
pub fn open_file(path: &Path, keyring: &Keyring) -> Result<Bundle, OpenError> {
    open_file_into(path, keyring, Vec::new()).map(Bundle::from_opened)
}

/// [`open_file`], writing the verified payload to `out` instead of memory: a scratch file (HQ's merge), a
/// temp file about to become the user's output (`unpack`), or `std::io::sink()` (`verify`). The bytes reach
/// `out` while the file is read, before the checks that end reading; on an error, whatever reached `out` is not
/// verified and must be thrown away (a scratch file removed, a temp file never linked).
pub fn open_file_into<W: Write>(
    path: &Path,
    keyring: &Keyring,
    out: W,
) -> Result<Opened<W>, OpenError> {
    let (file, len) = fsutil::open_regular(path)?;
    read_bundle(file, len, keyring, &Limits::default(), Depth::Full, out)
}

/// Verify a bundle file's header, signature, manifest and compressed payload hash, and compute its hash, without
/// decompressing: what `pack --base` needs to name the global an update is based on.
pub fn identify_file(path: &Path, keyring: &Keyring) -> Result<Identity, OpenError> {
    let (file, len) = fsutil::open_regular(path)?;
    let o = read_bundle(
        file,
        len,
        keyring,
        &Limits::default(),
        Depth::Identify,
        std::io::sink(),
    )?;
    Ok(Identity {
        manifest: o.manifest,
        hash: o.hash,
        file_len: o.file_len,
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
        (_, Role::Root) => Err(OpenError::RoleViolation(
            "a root key signed a bundle; it may sign only lists of HQ keys".into(),
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
    inspect_from(bytes, bytes.len() as u64)
}

/// [`inspect`] a file: a regular file only, its header read first, the rest only hashed as it streams past.
pub fn inspect_file(path: &Path) -> Result<Inspected, OpenError> {
    let (file, len) = fsutil::open_regular(path)?;
    inspect_from(file, len)
}

fn inspect_from<R: Read>(mut src: R, file_len: u64) -> Result<Inspected, OpenError> {
    let h = read_header(&mut src, file_len, &Limits::default())?;
    let manifest = Manifest::parse(h.version, h.manifest_bytes())
        .and_then(|m| m.validate().map(|_| m))
        .and_then(|m| {
            if u32::from(h.version) == m.format {
                Ok(m)
            } else {
                Err("manifest format differs from the header's version".into())
            }
        });
    let mut hasher = Sha256::new();
    hasher.update(&h.bytes);
    let mut buf = vec![0u8; CHUNK.min((file_len - h.bytes.len() as u64) as usize + 1)];
    let mut payload_len = 0u64;
    loop {
        let n = read_full(&mut src, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        payload_len += n as u64;
    }
    Ok(Inspected {
        version: h.version,
        key_id: hex::encode(h.key_id),
        manifest,
        header_len: h.bytes.len() as u64,
        payload_len,
        hash: hex::encode(hasher.finalize()),
        file_len: h.bytes.len() as u64 + payload_len,
    })
}

#[cfg(test)]
mod tests {
    /// zstd's multithreaded output depends on the job layout, never on how many threads ran the jobs: the same
    /// payload seals to the same bytes on a 2-core and a 64-core machine.
    #[test]
    fn multithreaded_compression_does_not_depend_on_the_thread_count() {
        let data: Vec<u8> = (0..(24u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8 & 0x1f)
            .collect();
        let run = |workers: u32| {
            use zstd::zstd_safe::CParameter as P;
            let mut c = zstd::zstd_safe::CCtx::create();
            c.set_parameter(P::CompressionLevel(3)).unwrap();
            c.set_parameter(P::ChecksumFlag(true)).unwrap();
            c.set_parameter(P::NbWorkers(workers)).unwrap();
            let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
            c.compress2(&mut out, &data).unwrap();
            out
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(5));
        assert_eq!(zstd::stream::decode_all(&one[..]).unwrap(), data);
    }
}
