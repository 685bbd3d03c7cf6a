//! Properties of the reader under random damage (issue 6): any mutation of a valid bundle (bit flips,
//! truncations, insertions, deletions, splices from another signed bundle) never verifies and never panics;
//! hostile content re-signed by a trusted key never panics and, if it verifies, is exactly what was signed; and
//! `Payload::from_safetensors` never panics on damaged safetensors. Case counts are modest so the file runs in
//! seconds; raise `PROPTEST_CASES` for a longer soak.

use std::sync::OnceLock;

use ferry_bundle::{
    assemble, inspect, open, seal, sha256_hex, BundleKind, Draft, Dtype, Keyring, Limits, Payload,
    Role, SecretKey, SiteInfo, TensorRef,
};
use proptest::prelude::*;

struct Fixture {
    hq: SecretKey,
    ring: Keyring,
    global: Vec<u8>,
    update: Vec<u8>,
    payload: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]);
        let site = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
        let w: Vec<u8> = (0..12)
            .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
            .collect();
        let n = 3i64.to_le_bytes();
        let p = Payload::from_tensors(&[
            TensorRef {
                name: "fc.weight",
                dtype: Dtype::F32,
                shape: &[3, 4],
                data: &w,
            },
            TensorRef {
                name: "steps",
                dtype: Dtype::I64,
                shape: &[],
                data: &n,
            },
        ])
        .expect("payload");
        let draft = |kind, site: Option<SiteInfo>, base: Option<String>| Draft {
            kind,
            federation: "prop".into(),
            arch: None,
            round: 0,
            base,
            site,
            contributors: vec![],
            strategy: (kind == BundleKind::Global).then(|| "init".to_string()),
            revocations: None,
            created: 1_700_000_000,
            expires: None,
            encrypt_to: Vec::new(),
        };
        let g = seal(draft(BundleKind::Global, None, None), &p, &hq, 3).expect("global");
        let u = seal(
            draft(
                BundleKind::Update,
                Some(SiteInfo {
                    id: "site-a".into(),
                    samples: 9,
                }),
                Some(g.hash.clone()),
            ),
            &p,
            &site,
            3,
        )
        .expect("update");
        let mut ring = Keyring::new();
        ring.add(hq.public()).expect("hq");
        ring.add(site.public()).expect("site");
        Fixture {
            hq,
            ring,
            global: g.bytes,
            update: u.bytes,
            payload: p.bytes().to_vec(),
        }
    })
}

/// One way of damaging a file. Positions are fractions of the current length so they always land inside.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: f64,
        bit: u8,
    },
    Truncate {
        keep: f64,
    },
    Insert {
        at: f64,
        bytes: Vec<u8>,
    },
    Delete {
        at: f64,
        len: usize,
    },
    /// Copy `len` bytes of the other signed bundle, from `from`, over this one at `at`.
    Splice {
        at: f64,
        from: f64,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let frac = 0.0..1.0f64;
    prop_oneof![
        4 => (frac.clone(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => frac.clone().prop_map(|keep| Mutation::Truncate { keep }),
        2 => (frac.clone(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (frac.clone(), 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        2 => (frac.clone(), frac, 1usize..128).prop_map(|(at, from, len)| Mutation::Splice { at, from, len }),
    ]
}

fn pos(len: usize, f: f64) -> usize {
    ((len as f64) * f) as usize
}

fn apply(bytes: &mut Vec<u8>, other: &[u8], m: &Mutation) {
    match m {
        Mutation::Flip { at, bit } => {
            if !bytes.is_empty() {
                let i = pos(bytes.len(), *at).min(bytes.len() - 1);
                bytes[i] ^= 1 << bit;
            }
        }
        Mutation::Truncate { keep } => bytes.truncate(pos(bytes.len(), *keep)),
        Mutation::Insert { at, bytes: ins } => {
            let i = pos(bytes.len(), *at);
            bytes.splice(i..i, ins.iter().copied());
        }
        Mutation::Delete { at, len } => {
            let i = pos(bytes.len(), *at);
            let end = (i + len).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Splice { at, from, len } => {
            let src = pos(other.len(), *from);
            let piece = &other[src..(src + len).min(other.len())];
            let i = pos(bytes.len(), *at);
            let end = (i + piece.len()).min(bytes.len());
            bytes.splice(i..end, piece.iter().copied());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn mutated_bundles_never_verify(
        update in any::<bool>(),
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let f = fixture();
        let (orig, other) = if update { (&f.update, &f.global) } else { (&f.global, &f.update) };
        let mut bytes = orig.clone();
        for m in &ms {
            apply(&mut bytes, other, m);
        }
        prop_assume!(&bytes != orig);
        let _ = inspect(&bytes);
        let r = open(&bytes, &f.ring, &Limits::default());
        prop_assert!(r.is_err(), "a damaged bundle verified after {:?}", ms);
    }

    /// What a trusted key signs may be hostile; the reader must still not panic, and whatever verifies is
    /// exactly the signed payload.
    #[test]
    fn resigned_hostile_content_never_panics(
        in_manifest in any::<bool>(),
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let f = fixture();
        let g = &f.global;
        let ml = u32::from_le_bytes(g[28..32].try_into().unwrap()) as usize;
        let mut manifest = g[32..32 + ml].to_vec();
        let mut payload = g[32 + ml + 64..].to_vec();
        let target = if in_manifest { &mut manifest } else { &mut payload };
        for m in &ms {
            apply(target, &f.update, m);
        }
        let bytes = assemble(&manifest, &f.hq, &payload);
        let _ = inspect(&bytes);
        let limits = Limits { max_payload_bytes: 1 << 20, ..Limits::default() };
        if let Ok(b) = open(&bytes, &f.ring, &limits) {
            prop_assert_eq!(sha256_hex(b.payload()), b.manifest.payload.sha256.clone());
            prop_assert_eq!(b.payload(), &f.payload[..]);
        }
    }

    #[test]
    fn damaged_safetensors_never_panic(ms in prop::collection::vec(mutation(), 1..4)) {
        let f = fixture();
        let mut bytes = f.payload.clone();
        let other = Payload::from_tensors(&[]).expect("empty").bytes().to_vec();
        for m in &ms {
            apply(&mut bytes, &other, m);
        }
        if let Ok(p) = Payload::from_safetensors(&bytes) {
            // Whatever is accepted comes out canonical: re-reading it is the identity.
            let again = Payload::from_safetensors(p.bytes()).expect("canonical payload re-reads");
            prop_assert_eq!(again.bytes(), p.bytes());
        }
    }
}
