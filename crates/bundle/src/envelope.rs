//! The envelope of ferry's small signed files: revocation lists (`FERRYREV`, [`crate::revocation`]) and lists of
//! HQ keys signed by the root key (`FERRYKEY`, [`crate::keylist`]). One layout, one parser, so the two file types
//! refuse damaged input the same way. Each type has its own magic and its own signature domain, so a signature
//! over one can never be replayed as the other, or as a bundle.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic |
//! | 8 | 2 | version (u16, little-endian) |
//! | 10 | 2 | reserved, 0 |
//! | 12 | 8 | key id of the signing key |
//! | 20 | 4 | body length `n` (u32, little-endian) |
//! | 24 | n | body: JSON |
//! | 24 + n | 64 | Ed25519 signature over `domain` ‖ body (strict verification) |
//!
//! Nothing may follow the signature.

use crate::keys::{PublicKey, SecretKey};

const FIXED: usize = 8 + 2 + 2 + 8 + 4;
const SIG_LEN: usize = 64;

/// Largest file of this kind for a body limit: what a bounded read may take.
pub(crate) const fn max_file_len(max_body: u32) -> u64 {
    (FIXED + SIG_LEN) as u64 + max_body as u64
}

/// A parsed, not yet verified, envelope.
pub(crate) struct Envelope<'a> {
    pub version: u16,
    pub key_id: [u8; 8],
    pub body: &'a [u8],
    signature: [u8; 64],
}

/// Why an envelope is unreadable, before any key is looked at.
pub(crate) enum EnvelopeError {
    TooShort(usize),
    WrongMagic,
    UnsupportedVersion(u16),
    Malformed(&'static str),
}

/// Parse the envelope: length, magic, version (one of `versions`), reserved bytes, body length.
pub(crate) fn parse<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    versions: &[u16],
    max_body: u32,
) -> Result<Envelope<'a>, EnvelopeError> {
    if bytes.len() < FIXED + SIG_LEN {
        return Err(EnvelopeError::TooShort(bytes.len()));
    }
    if &bytes[..8] != magic {
        return Err(EnvelopeError::WrongMagic);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if !versions.contains(&version) {
        return Err(EnvelopeError::UnsupportedVersion(version));
    }
    if bytes[10] != 0 || bytes[11] != 0 {
        return Err(EnvelopeError::Malformed("reserved bytes are not zero"));
    }
    let mut key_id = [0u8; 8];
    key_id.copy_from_slice(&bytes[12..20]);
    let body_len = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    if body_len > max_body {
        return Err(EnvelopeError::Malformed("the body is larger than allowed"));
    }
    let body_end = FIXED + body_len as usize;
    if bytes.len() != body_end + SIG_LEN {
        return Err(EnvelopeError::Malformed(
            "the file length disagrees with the body length (truncated or extra bytes)",
        ));
    }
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&bytes[body_end..]);
    Ok(Envelope {
        version,
        key_id,
        body: &bytes[FIXED..body_end],
        signature,
    })
}

impl Envelope<'_> {
    /// Whether the signature verifies strictly with `key` over `domain` ‖ body.
    pub(crate) fn verifies(&self, key: &PublicKey, domain: &[u8]) -> bool {
        let mut message = domain.to_vec();
        message.extend_from_slice(self.body);
        key.verifying_key()
            .verify_strict(
                &message,
                &ed25519_dalek::Signature::from_bytes(&self.signature),
            )
            .is_ok()
    }
}

/// Sign `body` under `domain` with `key` and lay out the file.
pub(crate) fn write(
    magic: &[u8; 8],
    version: u16,
    domain: &[u8],
    key: &SecretKey,
    body: &[u8],
) -> Vec<u8> {
    let mut message = domain.to_vec();
    message.extend_from_slice(body);
    let signature = key.sign(&message);
    let mut out = Vec::with_capacity(FIXED + body.len() + SIG_LEN);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&key.public().key_id());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&signature);
    out
}
