//! Real bundles on disk: round trips for every carried dtype, and tampering of every kind refused.

use ferry_bundle::{
    assemble, compress, open, open_file, seal, BundleKind, Draft, Dtype, Keyring, Limits,
    OpenError, Payload, Role, SealError, SecretKey, TensorRef,
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

struct Tensors {
    f32: Vec<u8>,
    f16: Vec<u8>,
    bf16: Vec<u8>,
    i64: Vec<u8>,
    u8: Vec<u8>,
}

fn tensors() -> Tensors {
    Tensors {
        f32: (0..24)
            .flat_map(|i| (i as f32 * 0.25 - 1.0).to_le_bytes())
            .collect(),
        f16: (0..6)
            .flat_map(|i| half::f16::from_f32(i as f32 / 3.0).to_le_bytes())
            .collect(),
        bf16: (0..4)
            .flat_map(|i| half::bf16::from_f32(-(i as f32) * 1.5).to_le_bytes())
            .collect(),
        i64: 1234i64.to_le_bytes().to_vec(),
        u8: vec![0, 1, 2, 255],
    }
}

fn payload(t: &Tensors) -> Payload {
    Payload::from_tensors(&[
        TensorRef {
            name: "conv1.weight",
            dtype: Dtype::F32,
            shape: &[2, 3, 2, 2],
            data: &t.f32,
        },
        TensorRef {
            name: "head.weight",
            dtype: Dtype::F16,
            shape: &[2, 3],
            data: &t.f16,
        },
        TensorRef {
            name: "bn1.running_var",
            dtype: Dtype::BF16,
            shape: &[4],
            data: &t.bf16,
        },
        TensorRef {
            name: "bn1.num_batches_tracked",
            dtype: Dtype::I64,
            shape: &[],
            data: &t.i64,
        },
        TensorRef {
            name: "mask",
            dtype: Dtype::U8,
            shape: &[4],
            data: &t.u8,
        },
    ])
    .unwrap()
}

fn global(p: &Payload) -> ferry_bundle::Sealed {
    seal(
        Draft::initial("city", Some("plate-cnn".into())),
        p,
        &hq(),
        3,
    )
    .unwrap()
}

#[test]
fn round_trip_every_dtype_through_a_file() {
    let t = tensors();
    let p = payload(&t);
    let g = global(&p);
    let dir = tempfile::tempdir().unwrap();
    let path = g.write_to_dir(dir.path()).unwrap();
    assert_eq!(path.file_name().unwrap(), "global-r0.ferry");
    let b = open_file(&path, &ring(&[&hq()])).unwrap();
    assert_eq!(b.hash, g.hash);
    assert_eq!(b.manifest.kind, BundleKind::Global);
    // The payload is a safetensors file with exactly the input tensors.
    let st = safetensors::SafeTensors::deserialize(b.payload()).unwrap();
    assert_eq!(st.len(), 5);
    for (name, data, dtype, shape) in [
        ("conv1.weight", &t.f32, Dtype::F32, vec![2, 3, 2, 2]),
        ("head.weight", &t.f16, Dtype::F16, vec![2, 3]),
        ("bn1.running_var", &t.bf16, Dtype::BF16, vec![4]),
        ("bn1.num_batches_tracked", &t.i64, Dtype::I64, vec![]),
        ("mask", &t.u8, Dtype::U8, vec![4]),
    ] {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.data(), &data[..], "{name}");
        assert_eq!(v.dtype(), dtype);
        assert_eq!(v.shape(), &shape[..]);
    }
    // An update made from it names it as base, and verifies for its own site.
    let a = site("site-a", 2);
    let u = seal(
        Draft::update_for(&b.manifest, &b.hash, "site-a", 800),
        &p,
        &a,
        3,
    )
    .unwrap();
    let ub = open(&u.bytes, &ring(&[&a]), &Limits::default()).unwrap();
    assert_eq!(ub.manifest.base.as_deref(), Some(g.hash.as_str()));
    assert_eq!(ub.manifest.site.as_ref().unwrap().samples, 800);
    assert_eq!(u.file_name(), "site-a-r0.ferry");
    // Plain zstd decoders skip the header frame: the whole file decompresses to the safetensors file.
    let plain = zstd::stream::decode_all(&g.bytes[..]).unwrap();
    assert_eq!(plain, b.payload());
}

#[test]
fn any_flipped_byte_is_refused_with_the_error_of_its_region() {
    let p = payload(&tensors());
    let g = global(&p);
    let keys = ring(&[&hq()]);
    let manifest_len = u32::from_le_bytes(g.bytes[28..32].try_into().unwrap()) as usize;
    let sig_start = 32 + manifest_len;
    let payload_start = sig_start + 64;
    for i in 0..g.bytes.len() {
        let mut bad = g.bytes.clone();
        bad[i] ^= 0x01;
        let err =
            open(&bad, &keys, &Limits::default()).expect_err(&format!("flip at {i} verified"));
        let ok = match i {
            0..=3 | 8..=15 => matches!(err, OpenError::WrongMagic),
            4..=7 | 28..=31 => matches!(err, OpenError::MalformedHeader(_)),
            // 2 -> 3, a version this reader reads (issue 15 §5): its signature domain differs.
            16 => matches!(err, OpenError::BadSignature),
            17 => matches!(err, OpenError::UnsupportedVersion(_)),
            18..=19 => matches!(err, OpenError::MalformedHeader(_)),
            20..=27 => matches!(err, OpenError::UntrustedKey(_)),
            _ if i < payload_start => matches!(err, OpenError::BadSignature),
            _ => matches!(err, OpenError::PayloadHash),
        };
        assert!(ok, "flip at byte {i}: unexpected {err:?}");
    }
}

#[test]
fn truncation_and_trailing_bytes_are_refused() {
    let g = global(&payload(&tensors()));
    let keys = ring(&[&hq()]);
    for n in 0..g.bytes.len() {
        assert!(
            open(&g.bytes[..n], &keys, &Limits::default()).is_err(),
            "truncated to {n} verified"
        );
    }
    let mut long = g.bytes.clone();
    long.extend_from_slice(b"extra");
    assert!(matches!(
        open(&long, &keys, &Limits::default()),
        Err(OpenError::PayloadLength { .. })
    ));
}

#[test]
fn wrong_keys_and_roles_are_refused() {
    let p = payload(&tensors());
    let g = global(&p);
    let a = site("site-a", 2);
    let b_key = site("site-b", 3);
    // Untrusted: only site keys in the ring.
    assert!(matches!(
        open(&g.bytes, &ring(&[&a]), &Limits::default()),
        Err(OpenError::UntrustedKey(_))
    ));
    // Same id and role, another secret (a key id collision is impossible, so it is simply untrusted).
    let fake_hq = SecretKey::from_seed(Role::Hq, "hq", [9; 32]);
    let forged = seal(Draft::initial("city", None), &p, &fake_hq, 3).unwrap();
    assert!(matches!(
        open(&forged.bytes, &ring(&[&hq()]), &Limits::default()),
        Err(OpenError::UntrustedKey(_))
    ));
    // A header naming the trusted HQ key id over a signature by another key.
    let mut named = forged.bytes.clone();
    named[20..28].copy_from_slice(&hq().public().key_id());
    assert!(matches!(
        open(&named, &ring(&[&hq()]), &Limits::default()),
        Err(OpenError::BadSignature)
    ));
    // A zeroed signature.
    let ml = u32::from_le_bytes(g.bytes[28..32].try_into().unwrap()) as usize;
    let mut zeroed = g.bytes.clone();
    zeroed[32 + ml..32 + ml + 64].fill(0);
    assert!(matches!(
        open(&zeroed, &ring(&[&hq()]), &Limits::default()),
        Err(OpenError::BadSignature)
    ));

    // seal refuses what open would refuse.
    assert!(matches!(
        seal(Draft::initial("city", None), &p, &a, 3),
        Err(SealError::Key(_))
    ));
    let base = open(&g.bytes, &ring(&[&hq()]), &Limits::default()).unwrap();
    assert!(matches!(
        seal(
            Draft::update_for(&base.manifest, &base.hash, "site-b", 1),
            &p,
            &a,
            3
        ),
        Err(SealError::Key(_))
    ));
    assert!(matches!(
        seal(
            Draft::update_for(&base.manifest, &base.hash, "hq", 1),
            &p,
            &hq(),
            3
        ),
        Err(SealError::Key(_))
    ));

    // A site key posing as HQ: a validly signed global from a site key.
    let compressed = compress(p.bytes(), 3).unwrap();
    let mut m = g.manifest.clone();
    m.signer = ferry_bundle::manifest::Signer {
        id: "site-a".into(),
        role: Role::Site,
        key_id: a.public().key_id_hex(),
    };
    let posing = assemble(&serde_json::to_vec(&m).unwrap(), &a, &compressed);
    assert!(matches!(
        open(&posing, &ring(&[&hq(), &a]), &Limits::default()),
        Err(OpenError::RoleViolation(_))
    ));
    // A site signing an update for another site.
    let u = seal(
        Draft::update_for(&base.manifest, &base.hash, "site-b", 5),
        &p,
        &b_key,
        3,
    )
    .unwrap();
    let mut m = u.manifest.clone();
    m.signer = ferry_bundle::manifest::Signer {
        id: "site-a".into(),
        role: Role::Site,
        key_id: a.public().key_id_hex(),
    };
    let other = assemble(&serde_json::to_vec(&m).unwrap(), &a, &compressed);
    assert!(matches!(
        open(&other, &ring(&[&a, &b_key]), &Limits::default()),
        Err(OpenError::RoleViolation(_))
    ));
    // The manifest claims another signer than the key that verified it.
    let mut m = g.manifest.clone();
    m.signer.id = "hq2".into();
    let mismatch = assemble(&serde_json::to_vec(&m).unwrap(), &hq(), &compressed);
    assert!(matches!(
        open(&mismatch, &ring(&[&hq()]), &Limits::default()),
        Err(OpenError::SignerMismatch { .. })
    ));
}

#[test]
fn a_signed_manifest_must_match_the_payload_it_carries() {
    let t = tensors();
    let p = payload(&t);
    let g = global(&p);
    let keys = ring(&[&hq()]);
    // Tensor data swapped in from another validly signed bundle: payload hashes no longer match.
    let mut t2 = tensors();
    t2.f32[0] ^= 1;
    let other = global(&payload(&t2));
    let ml = u32::from_le_bytes(g.bytes[28..32].try_into().unwrap()) as usize;
    let oml = u32::from_le_bytes(other.bytes[28..32].try_into().unwrap()) as usize;
    let mut swapped = g.bytes[..32 + ml + 64].to_vec();
    swapped.extend_from_slice(&other.bytes[32 + oml + 64..]);
    assert!(open(&swapped, &keys, &Limits::default()).is_err());

    // Trusted key signs a manifest whose tensor hashes are wrong but payload hashes right.
    let mut m = g.manifest.clone();
    m.tensors[0].sha256 = "0".repeat(64);
    let bad = assemble(
        &serde_json::to_vec(&m).unwrap(),
        &hq(),
        &compress(p.bytes(), 3).unwrap(),
    );
    assert!(matches!(
        open(&bad, &keys, &Limits::default()),
        Err(OpenError::TensorHash(_))
    ));

    // A signed decompressed length that differs from the frame's.
    let mut m = g.manifest.clone();
    m.payload.len += 1;
    let bad = assemble(
        &serde_json::to_vec(&m).unwrap(),
        &hq(),
        &compress(p.bytes(), 3).unwrap(),
    );
    assert!(matches!(
        open(&bad, &keys, &Limits::default()),
        Err(OpenError::PayloadFrame(_))
    ));

    // A decompression bomb: 1 GiB of zeros declared honestly but above the reader's limit.
    let big = compress(&vec![0u8; 64 << 20], 19).unwrap();
    let mut m = g.manifest.clone();
    m.payload.len = 64 << 20;
    m.payload.compressed_len = big.len() as u64;
    m.payload.compressed_sha256 = ferry_bundle::sha256_hex(&big);
    let bomb = assemble(&serde_json::to_vec(&m).unwrap(), &hq(), &big);
    let limits = Limits {
        max_payload_bytes: 1 << 20,
        ..Limits::default()
    };
    assert!(matches!(
        open(&bomb, &keys, &limits),
        Err(OpenError::Decompress { .. })
    ));
}

#[test]
fn writing_never_overwrites_or_follows_symlinks() {
    let g = global(&payload(&tensors()));
    let dir = tempfile::tempdir().unwrap();
    g.write_to_dir(dir.path()).unwrap();
    let before = std::fs::read(dir.path().join("global-r0.ferry")).unwrap();
    assert!(matches!(
        g.write_to_dir(dir.path()),
        Err(SealError::Fs(ferry_bundle::fsutil::FsError::Exists(_)))
    ));
    assert_eq!(
        std::fs::read(dir.path().join("global-r0.ferry")).unwrap(),
        before
    );
    #[cfg(unix)]
    {
        let other = tempfile::tempdir().unwrap();
        let target = other.path().join("victim");
        std::os::unix::fs::symlink(&target, other.path().join("global-r0.ferry")).unwrap();
        assert!(g.write_to_dir(other.path()).is_err());
        assert!(!target.exists(), "wrote through a symlink");
    }
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["global-r0.ferry"]);
}
