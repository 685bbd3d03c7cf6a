//! Encrypted payloads (issue 15 §5) on real files: an update encrypted to HQ, a global to the sites. The
//! signature and the ciphertext's hash are checked before anything decrypted is believed; a reader without the
//! right key is told whom the payload is for, and nothing reaches its output.

use std::cell::Cell;
use std::io::Write;
use std::rc::Rc;

use ferry_bundle::{
    assemble_version, identify_file, open_file, open_file_into, seal, Draft, Dtype, Keyring,
    OpenError, Payload, Role, SecretKey, TensorRef,
};

fn hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
}
fn site(id: &str, seed: u8) -> SecretKey {
    SecretKey::from_seed(Role::Site, id, [seed; 32])
}
fn ring(keys: &[&SecretKey]) -> Keyring {
    let mut r = Keyring::new();
    for k in keys {
        r.add(k.public()).unwrap();
    }
    r
}

/// A model of a few hundred KiB (more than one age STREAM chunk of 64 KiB), values that do not compress to
/// nothing.
fn payload() -> Payload {
    let w: Vec<u8> = (0..100_000u32)
        .flat_map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / 1e7).to_le_bytes())
        .collect();
    let b: Vec<u8> = [0.5f32, -0.5]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    Payload::from_tensors(&[
        TensorRef {
            name: "fc.weight",
            dtype: Dtype::F32,
            shape: &[1000, 100],
            data: &w,
        },
        TensorRef {
            name: "fc.bias",
            dtype: Dtype::F32,
            shape: &[2],
            data: &b,
        },
    ])
    .unwrap()
}

fn base_hash() -> String {
    "ab".repeat(32)
}

/// site-a's update, encrypted to HQ, written to `dir`.
fn encrypted_update(dir: &std::path::Path) -> (std::path::PathBuf, ferry_bundle::Sealed) {
    let draft = Draft {
        encrypt_to: vec![hq().public()],
        ..Draft::update("demo", None, 0, &base_hash(), "site-a", 1200)
    };
    let sealed = seal(draft, &payload(), &site("site-a", 2), 3).unwrap();
    let path = sealed.write_to_dir(dir).unwrap();
    (path, sealed)
}

/// HQ's view: site-a trusted, HQ's own key as the identity.
fn hq_ring() -> Keyring {
    let mut r = ring(&[&site("site-a", 2), &site("site-b", 3)]);
    r.add_identity(&hq());
    r
}

/// The header frame's length (where the payload starts).
fn header_len(bytes: &[u8]) -> usize {
    8 + u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize
}

/// An output that records whether anything reached it.
#[derive(Debug, Clone, Default)]
struct Watched(Rc<Cell<usize>>);

impl Write for Watched {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.set(self.0.get() + buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_update_encrypted_to_hq_round_trips_and_is_format_3() {
    let dir = tempfile::tempdir().unwrap();
    let (path, sealed) = encrypted_update(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(u16::from_le_bytes([bytes[16], bytes[17]]), 3);
    let m = &sealed.manifest;
    assert_eq!(m.format, 3);
    let e = m.encryption.as_ref().expect("encryption");
    assert_eq!(e.scheme, "age-x25519");
    assert_eq!(e.recipients.len(), 1);
    assert_eq!(e.recipients[0].id, "hq");
    assert_eq!(e.recipients[0].recipient, hq().public().recipient_text());
    // The payload region is an age file (binary), exactly as long as signed; its plaintext is the zstd frame.
    let region = &bytes[header_len(&bytes)..];
    assert!(region.starts_with(b"age-encryption.org/v1\n"));
    assert_eq!(region.len() as u64, e.len);
    assert_eq!(ferry_bundle::sha256_hex(region), e.sha256);
    // No plaintext weights in the file: the first tensor bytes do not appear.
    let plain = payload();
    let n = plain.bytes().len();
    let probe = &plain.bytes()[n - 4096..n - 4000];
    assert!(!bytes.windows(probe.len()).any(|w| w == probe));

    let b = open_file(&path, &hq_ring()).unwrap();
    assert_eq!(b.payload(), payload().bytes());
    assert_eq!(b.hash, sealed.hash);
    assert!(b.manifest.is_encrypted());

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a bundle holds weights: written 0600");
    }
}

#[test]
fn a_clear_bundle_stays_format_2() {
    let sealed = seal(
        Draft::update("demo", None, 0, &base_hash(), "site-a", 1),
        &payload(),
        &site("site-a", 2),
        3,
    )
    .unwrap();
    assert_eq!(sealed.manifest.format, 2);
    assert!(sealed.manifest.encryption.is_none());
    let text = String::from_utf8_lossy(&sealed.bytes[32..header_len(&sealed.bytes) - 64]);
    assert!(
        !text.contains("encryption"),
        "format 2 has no encryption field"
    );
}

#[test]
fn without_an_identity_the_reader_names_the_recipients_and_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, sealed) = encrypted_update(dir.path());
    let out = Watched::default();
    let err = open_file_into(&path, &ring(&[&site("site-a", 2)]), out.clone()).unwrap_err();
    assert!(matches!(err, OpenError::Encrypted(_)), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "payload is encrypted to hq {}; pass --identity with one of their secret keys to read it",
            hq().public().recipient_text()
        )
    );
    assert_eq!(out.0.get(), 0);
    // The signature and the ciphertext still verify without a key.
    let id = identify_file(&path, &ring(&[&site("site-a", 2)])).unwrap();
    assert_eq!(id.hash, sealed.hash);
}

#[test]
fn a_wrong_identity_is_refused_by_name_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = encrypted_update(dir.path());
    let mut r = ring(&[&site("site-a", 2)]);
    r.add_identity(&site("site-b", 3));
    let out = Watched::default();
    let err = open_file_into(&path, &r, out.clone()).unwrap_err();
    assert!(matches!(err, OpenError::NotARecipient { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!(
        "payload is encrypted to hq {}, not to your identity (site-b {})",
        hq().public().recipient_text(),
        site("site-b", 3).public().recipient_text()
    )));
    assert!(!msg.contains('\n'));
    assert_eq!(out.0.get(), 0);
}

#[test]
fn a_tampered_ciphertext_is_refused_by_its_hash_before_decryption() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = encrypted_update(dir.path());
    let clean = std::fs::read(&path).unwrap();
    let start = header_len(&clean);
    // In the age header, in the middle of the STREAM, and the last byte (the final chunk's tag).
    for at in [
        start + 30,
        start + (clean.len() - start) / 2,
        clean.len() - 1,
    ] {
        let mut bad = clean.clone();
        bad[at] ^= 0x01;
        let p = dir.path().join(format!("bad-{at}.ferry"));
        std::fs::write(&p, &bad).unwrap();
        let err = open_file(&p, &hq_ring()).unwrap_err();
        // The hash verdict, not age's: the ciphertext is judged before anything decrypted is.
        assert!(matches!(err, OpenError::PayloadHash), "byte {at}: {err}");
        let err = identify_file(&p, &ring(&[&site("site-a", 2)])).unwrap_err();
        assert!(matches!(err, OpenError::PayloadHash), "byte {at}: {err}");
    }
    // Truncated by one byte: the signed length.
    let p = dir.path().join("short.ferry");
    std::fs::write(&p, &clean[..clean.len() - 1]).unwrap();
    assert!(matches!(
        open_file(&p, &hq_ring()).unwrap_err(),
        OpenError::PayloadLength { .. }
    ));
}

#[test]
fn an_altered_recipient_list_breaks_the_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = encrypted_update(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let hq_r = hq().public().recipient_text();
    let other = site("site-b", 3).public().recipient_text();
    assert_eq!(hq_r.len(), other.len());
    let at = bytes
        .windows(hq_r.len())
        .position(|w| w == hq_r.as_bytes())
        .expect("recipient in the manifest");
    bytes[at..at + other.len()].copy_from_slice(other.as_bytes());
    let p = dir.path().join("recipients.ferry");
    std::fs::write(&p, &bytes).unwrap();
    let mut r = hq_ring();
    r.add_identity(&site("site-b", 3));
    assert!(matches!(
        open_file(&p, &r).unwrap_err(),
        OpenError::BadSignature
    ));
}

#[test]
fn a_payload_encrypted_to_another_key_than_signed_does_not_decrypt() {
    // The signer encrypts to site-b but names HQ: the ciphertext hash is right (the signer computed it), so
    // the refusal is age's, named as such.
    let payload = payload();
    let key = site("site-a", 2);
    let draft = Draft {
        encrypt_to: vec![site("site-b", 3).public()],
        ..Draft::update("demo", None, 0, &base_hash(), "site-a", 1200)
    };
    let sealed = seal(draft, &payload, &key, 3).unwrap();
    let start = header_len(&sealed.bytes);
    let mut m = sealed.manifest.clone();
    let e = m.encryption.as_mut().unwrap();
    e.recipients[0].role = Role::Hq;
    e.recipients[0].id = "hq".into();
    e.recipients[0].key_id = hq().public().key_id_hex();
    e.recipients[0].recipient = hq().public().recipient_text();
    let forged = assemble_version(
        3,
        &serde_json::to_vec(&m).unwrap(),
        &key,
        &sealed.bytes[start..],
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("site-a-r0.ferry");
    std::fs::write(&p, &forged).unwrap();
    let out = Watched::default();
    let err = open_file_into(&p, &hq_ring(), out.clone()).unwrap_err();
    assert!(matches!(err, OpenError::Decrypt(_)), "{err}");
    assert_eq!(out.0.get(), 0);
}

#[test]
fn a_global_encrypted_to_two_sites_opens_for_each_and_not_for_a_third() {
    let dir = tempfile::tempdir().unwrap();
    let draft = Draft {
        encrypt_to: vec![site("site-a", 2).public(), site("site-b", 3).public()],
        ..Draft::initial("demo", None)
    };
    let sealed = seal(draft, &payload(), &hq(), 3).unwrap();
    let path = sealed.write_to_dir(dir.path()).unwrap();
    for (id, seed) in [("site-a", 2), ("site-b", 3)] {
        let mut r = ring(&[&hq()]);
        r.add_identity(&site(id, seed));
        assert_eq!(open_file(&path, &r).unwrap().payload(), payload().bytes());
    }
    let mut r = ring(&[&hq()]);
    r.add_identity(&site("site-c", 4));
    assert!(matches!(
        open_file(&path, &r).unwrap_err(),
        OpenError::NotARecipient { .. }
    ));
}

#[test]
fn the_age_identity_is_the_key_s_recipient() {
    for k in [hq(), site("site-a", 2)] {
        assert_eq!(
            k.age_identity().to_public().to_string(),
            k.public().recipient_text()
        );
        assert!(k.public().recipient_text().starts_with("age1"));
        let file = k.age_identity_file_text();
        assert!(file.contains("\nAGE-SECRET-KEY-1"));
        assert!(file.contains(&format!("# public key: {}", k.public().recipient_text())));
    }
    assert_ne!(
        hq().public().recipient_text(),
        site("site-a", 2).public().recipient_text()
    );
}

#[test]
fn a_recipient_gives_back_the_key_it_was_derived_from() {
    // Both signs of x occur among these keys: the key id must pick the right one each time.
    let keys: Vec<SecretKey> = (0u8..32)
        .map(|i| SecretKey::from_seed(Role::Site, &format!("site-{i}"), [i; 32]))
        .chain([hq()])
        .collect();
    for k in &keys {
        let p = k.public();
        let back = ferry_bundle::PublicKey::from_recipient(
            p.role,
            &p.id,
            &p.key_id_hex(),
            &p.recipient_text(),
        )
        .unwrap();
        assert_eq!(back, p);
    }
    let p = site("site-a", 2).public();
    let other = site("site-b", 3).public();
    for (role, id, key_id, recipient, why) in [
        (
            Role::Site,
            "site-a",
            other.key_id_hex(),
            p.recipient_text(),
            "key id",
        ),
        (
            Role::Hq,
            "site-a",
            p.key_id_hex(),
            p.recipient_text(),
            "key id",
        ),
        (
            Role::Site,
            "site-b",
            p.key_id_hex(),
            p.recipient_text(),
            "key id",
        ),
        (
            Role::Site,
            "site-a",
            p.key_id_hex(),
            other.recipient_text(),
            "key id",
        ),
        (
            Role::Site,
            "site-a",
            p.key_id_hex(),
            p.recipient_text().to_uppercase(),
            "canonical",
        ),
        (
            Role::Site,
            "site-a",
            p.key_id_hex(),
            "age1qqqq".into(),
            "recipient",
        ),
    ] {
        let e = ferry_bundle::PublicKey::from_recipient(role, id, &key_id, &recipient)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why) && e.starts_with("recipient of "), "{e}");
    }
}
