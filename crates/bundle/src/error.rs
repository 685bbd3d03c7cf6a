//! Errors of reading (opening) and writing (sealing) bundles.
//!
//! Crypto failures are deliberately collapsed: a bad signature says only that it does not verify.

use crate::fsutil::FsError;
use crate::keys::KeyError;

/// Why a bundle was refused. Every variant means the file was not trusted and nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file could not be read.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Too short to hold even a bundle header.
    #[error("not a ferry bundle: the file is too short ({0} bytes)")]
    TooShort(usize),
    /// The first bytes are not a ferry header.
    #[error("not a ferry bundle: wrong magic bytes")]
    WrongMagic,
    /// The header says a format version this ferry does not know.
    #[error("bundle format version {0} is not one this ferry reads (it reads versions 1, 2 and 3); if the bundle is newer, upgrade ferry")]
    UnsupportedVersion(u16),
    /// The header frame is damaged.
    #[error("damaged bundle header: {0}")]
    MalformedHeader(&'static str),
    /// The signing key is not among the trusted keys.
    #[error("signed by key {0}, which is not among your trusted keys (check --trust)")]
    UntrustedKey(String),
    /// The signing key was revoked.
    #[error("signed by key {0}, which has been revoked")]
    RevokedKey(String),
    /// The bundle itself was withdrawn by a revocation list (issue 15 §2).
    #[error("bundle {0} was withdrawn by a revocation list; do not use it")]
    RevokedBundle(String),
    /// The signature does not verify.
    #[error(
        "signature does not verify: the bundle was altered, or it is not from the key it names"
    )]
    BadSignature,
    /// The signed manifest is not valid (this means a trusted key signed garbage). The text is escaped.
    #[error("signed manifest is invalid: {0}")]
    InvalidManifest(String),
    /// The manifest's signer does not match the trusted key that verified it.
    #[error("manifest names signer {named:?} but was verified with key {actual:?}")]
    SignerMismatch {
        /// Signer as named in the manifest.
        named: String,
        /// The trusted key that verified it.
        actual: String,
    },
    /// A key signed a kind of bundle its role does not allow.
    #[error("{0}")]
    RoleViolation(String),
    /// The compressed payload's length differs from the signed length.
    #[error("payload is {actual} bytes but the manifest signed {expected}: the file is truncated or has extra bytes")]
    PayloadLength {
        /// Signed length.
        expected: u64,
        /// Found length.
        actual: u64,
    },
    /// The compressed payload's hash differs from the signed hash.
    #[error("payload does not match its signed hash: the file was altered or damaged")]
    PayloadHash,
    /// The payload is not exactly one zstd frame with a declared size.
    #[error("payload is not a single zstd frame of the signed size: {0}")]
    PayloadFrame(String),
    /// Decompression failed or produced a different length than signed.
    #[error("payload does not decompress to the signed {expected} bytes: {why}")]
    Decompress {
        /// Signed decompressed length.
        expected: u64,
        /// What went wrong.
        why: String,
    },
    /// The decompressed bytes differ from the signed hash.
    #[error("decompressed payload does not match its signed hash")]
    DecompressedHash,
    /// The safetensors header inside is not the one the manifest describes.
    #[error("payload's safetensors header does not match the signed tensor list")]
    TensorTable,
    /// A tensor's bytes differ from its signed hash.
    #[error("tensor {0:?} does not match its signed hash")]
    TensorHash(String),
    /// The payload is encrypted and no identity was given to decrypt it (issue 15 §5).
    #[error(
        "payload is encrypted to {0}; pass --identity with one of their secret keys to read it"
    )]
    Encrypted(String),
    /// The payload is encrypted, but to none of the identities given.
    #[error("payload is encrypted to {to}, not to your identity ({yours}); pass --identity with one of their secret keys")]
    NotARecipient {
        /// The recipients the manifest names (escaped).
        to: String,
        /// The identities given.
        yours: String,
    },
    /// The ciphertext verified against its signed hash but did not decrypt with an identity the manifest names:
    /// the signer encrypted it to a different key than it says.
    #[error(
        "payload does not decrypt with your identity ({0}), although the signed manifest names it"
    )]
    Decrypt(String),
    /// The decrypted payload differs from the signed length or hash.
    #[error("decrypted payload does not match its signed hash")]
    DecryptedHash,
    /// Reading the file failed part way (an I/O error of the medium).
    #[error("reading the bundle failed: {0}")]
    Read(#[source] std::io::Error),
    /// Writing the verified payload where the caller asked (a scratch or output file) failed.
    #[error("writing the payload failed: {0}")]
    Write(#[source] std::io::Error),
}

/// Why a bundle could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The input weights are not a usable safetensors file.
    #[error("weights are not a valid safetensors file: {0}")]
    Safetensors(String),
    /// A tensor has a dtype ferry does not carry.
    #[error("tensor {name:?} has dtype {dtype}, which ferry does not carry (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL)")]
    UnsupportedDtype {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A tensor name is empty, too long, or contains control characters.
    #[error("tensor name {0:?} is not allowed (empty, over 1024 bytes, or containing control characters)")]
    BadTensorName(String),
    /// Two tensors share a name.
    #[error("tensor name {0:?} appears twice")]
    DuplicateTensor(String),
    /// A float tensor holds NaN or infinity.
    #[error("tensor {0:?} contains NaN or infinity; refusing to ship broken weights")]
    NonFinite(String),
    /// A tensor's byte length disagrees with its dtype and shape.
    #[error("tensor {0:?} has a byte length that does not match its dtype and shape")]
    TensorLength(String),
    /// The key may not sign this kind of bundle.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The draft manifest is inconsistent.
    #[error("{0}")]
    InvalidDraft(String),
    /// Writing failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Compression failed.
    #[error("compression failed: {0}")]
    Compress(String),
    /// Encrypting the payload failed (issue 15 §5).
    #[error("encrypting the payload failed: {0}")]
    Encrypt(String),
}
