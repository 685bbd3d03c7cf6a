//! Generator of the adversarial test kit in `crates/bundle/tests/testkit/` (issue 6).
//!
//! Run `cargo run -p ferry-bundle --example make_testkit` to rewrite the kit. Everything is deterministic: fixed
//! key seeds, fixed `created` timestamps, a fixed-seed generator for the "random" offsets, and hand-built zstd
//! frames where the library's compressor would not make the hostile shape, so a re-run reproduces the committed
//! files byte for byte (`tests/testkit.rs` checks that). The format of the kit and how to add a vector are in
//! `docs/testkit.md`.
//!
//! Hostile-but-validly-signed bundles are made with [`ferry_bundle::assemble`], which signs whatever it is given:
//! those vectors show that the checks *after* the signature catch them, not the signature. Revocation lists are
//! written here by an independent implementation of the format in `src/revocation.rs` (straight from the spec,
//! with `ed25519_dalek` and the fixed seeds), so the kit cross-checks the module rather than echoing it.

use std::path::{Path, PathBuf};

use ferry_bundle::manifest::{EncryptedTo, Encryption, Manifest, Signer};
use ferry_bundle::{
    assemble, assemble_version, compress, seal, sha256_hex, BundleKind, Contributor, Draft, Dtype,
    Payload, Role, SecretKey, SiteInfo, TensorRef,
};

/// Fixed creation time of every vector (2023-11-14).
const CREATED: u64 = 1_700_000_000;
/// The federation every vector belongs to.
const FEDERATION: &str = "kit";
/// zstd level for honest frames.
const LEVEL: i32 = 3;
/// The "trust everything honest" keyring of most vectors.
const STD: &str = "hq+site-a+site-b";

/// The fixed test keys: (file stem, role, id, seed), one table shared with the tests that open the kit.
use ferry_testdata::KIT_KEYS as KEYS;

/// A kit key's secret half (the test adds it as a decryption identity for `id=<stem>` in the trust column).
pub fn key(stem: &str) -> SecretKey {
    let (_, role, id, seed) = KEYS
        .iter()
        .find(|k| k.0 == stem)
        .unwrap_or_else(|| panic!("no test key {stem}"));
    let role: Role = role.parse().expect("the key table names hq, site or root");
    SecretKey::from_seed(role, id, [*seed; 32])
}

fn seed_of(stem: &str) -> [u8; 32] {
    [KEYS.iter().find(|k| k.0 == stem).expect("key").3; 32]
}

/// One row of `expectations.tsv`: what `reader` must say about `file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Vector file name.
    pub file: String,
    /// `open`, `inspect`, `safetensors` or `revocation`.
    pub reader: &'static str,
    /// Keyring: `+`-joined key stems from `keys/`, `!stem` revoked, `-` for none.
    pub trust: String,
    /// `ok:<sha256 of the payload>`, `ok`, `ok-manifest-invalid`, `ok:<n>` (revocations) or an error variant.
    pub expect: String,
    /// `-`, or what is wrong with the reader today (the row is checked by the ignored `known_bugs` test).
    pub bug: String,
    /// What the vector is.
    pub comment: String,
}

/// The whole kit: files and table rows.
#[derive(Default)]
pub struct Kit {
    /// File name and bytes.
    pub files: Vec<(String, Vec<u8>)>,
    /// Expectations.
    pub rows: Vec<Row>,
}

impl Kit {
    fn file(&mut self, name: &str, bytes: Vec<u8>) {
        assert!(
            !self.files.iter().any(|(n, _)| n == name),
            "duplicate vector {name}"
        );
        self.files.push((name.to_string(), bytes));
    }

    fn row(
        &mut self,
        file: &str,
        reader: &'static str,
        trust: &str,
        expect: &str,
        bug: &str,
        comment: &str,
    ) {
        self.rows.push(Row {
            file: file.into(),
            reader,
            trust: trust.into(),
            expect: expect.into(),
            bug: bug.into(),
            comment: comment.into(),
        });
    }

    /// A bundle vector: `open` with `trust` must give `open`, `inspect` must give `inspect`.
    fn bundle(
        &mut self,
        name: &str,
        bytes: Vec<u8>,
        trust: &str,
        open: &str,
        inspect: &str,
        comment: &str,
    ) {
        self.bundle_bug(name, bytes, trust, open, "-", inspect, comment);
    }

    #[allow(clippy::too_many_arguments)]
    fn bundle_bug(
        &mut self,
        name: &str,
        bytes: Vec<u8>,
        trust: &str,
        open: &str,
        bug: &str,
        inspect: &str,
        comment: &str,
    ) {
        let name = format!("{name}.ferry");
        self.file(&name, bytes);
        self.row(&name, "open", trust, open, bug, comment);
        self.row(&name, "inspect", "-", inspect, "-", comment);
    }

    /// A raw safetensors vector for `Payload::from_safetensors`.
    fn raw(&mut self, name: &str, bytes: Vec<u8>, expect: &str, bug: &str, comment: &str) {
        let name = format!("{name}.safetensors");
        self.file(&name, bytes);
        self.row(&name, "safetensors", "-", expect, bug, comment);
    }

    /// The table as TSV.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "# ferry bundle test kit: generated by `cargo run -p ferry-bundle --example make_testkit`; do not edit.\n\
             # file\treader\ttrust\texpect\tbug\tcomment\n",
        );
        let mut rows = self.rows.clone();
        rows.sort_by(|a, b| (&a.file, a.reader).cmp(&(&b.file, b.reader)));
        for r in rows {
            for field in [&r.file, &r.trust, &r.expect, &r.bug, &r.comment] {
                assert!(!field.contains(['\t', '\n']), "tab or newline in {field:?}");
            }
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}\n",
                r.file, r.reader, r.trust, r.expect, r.bug, r.comment
            ));
        }
        out
    }
}

/// A tiny deterministic generator (SplitMix64) for "random" offsets and data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The honest model: an F32 matrix, an F16 vector, a rank-0 I64 and a zero-element U8 tensor.
struct Model {
    w: Vec<u8>,
    h: Vec<u8>,
    n: Vec<u8>,
}

impl Model {
    fn new(scale: f32) -> Model {
        Model {
            w: f32s(&(0..6).map(|i| (i as f32 - 2.5) * scale).collect::<Vec<_>>()),
            h: [0x3c00u16, 0x4000, 0xbc00, 0x0000]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            n: 42i64.to_le_bytes().to_vec(),
        }
    }
    fn refs(&self) -> Vec<TensorRef<'_>> {
        vec![
            TensorRef {
                name: "fc.weight",
                dtype: Dtype::F32,
                shape: &[2, 3],
                data: &self.w,
            },
            TensorRef {
                name: "fc.bias",
                dtype: Dtype::F16,
                shape: &[4],
                data: &self.h,
            },
            TensorRef {
                name: "bn.num_batches_tracked",
                dtype: Dtype::I64,
                shape: &[],
                data: &self.n,
            },
            TensorRef {
                name: "mask",
                dtype: Dtype::U8,
                shape: &[0, 3],
                data: &[],
            },
        ]
    }
    fn payload(&self) -> Payload {
        Payload::from_tensors(&self.refs()).expect("honest payload")
    }
}

fn draft_global(round: u64, base: Option<String>, contributors: Vec<Contributor>) -> Draft {
    Draft {
        kind: BundleKind::Global,
        federation: FEDERATION.into(),
        arch: None,
        round,
        base,
        site: None,
        contributors,
        strategy: Some(if round == 0 { "init" } else { "fedavg" }.into()),
        revocations: None,
        created: CREATED,
        expires: None,
        encrypt_to: Vec::new(),
    }
}

fn draft_update(base: &str, site: &str, samples: u64) -> Draft {
    Draft {
        kind: BundleKind::Update,
        federation: FEDERATION.into(),
        arch: None,
        round: 0,
        base: Some(base.into()),
        site: Some(SiteInfo {
            id: site.into(),
            samples,
        }),
        contributors: Vec::new(),
        strategy: None,
        revocations: None,
        created: CREATED,
        expires: None,
        encrypt_to: Vec::new(),
    }
}

/// Manifest bytes as `seal` writes them.
fn json(m: &Manifest) -> Vec<u8> {
    serde_json::to_vec(m).expect("manifest serialises")
}

/// Point a manifest's payload fields at `plain` (decompressed) and `compressed`.
fn describe(m: &mut Manifest, plain: &[u8], compressed: &[u8]) {
    m.payload.len = plain.len() as u64;
    m.payload.sha256 = sha256_hex(plain);
    m.payload.compressed_len = compressed.len() as u64;
    m.payload.compressed_sha256 = sha256_hex(compressed);
}

/// Sign `m` (payload fields pointed at `plain`/`compressed`) with `k` over `compressed`.
fn signed(m: &Manifest, k: &SecretKey, plain: &[u8], compressed: &[u8]) -> Vec<u8> {
    let mut m = m.clone();
    describe(&mut m, plain, compressed);
    assemble(&json(&m), k, compressed)
}

fn manifest_len(bundle: &[u8]) -> usize {
    u32::from_le_bytes(bundle[28..32].try_into().expect("4 bytes")) as usize
}

/// Hand-built zstd frame: optional 8-byte content size, optional window descriptor (without it the frame is
/// single-segment and must declare its size), then `blocks`.
fn frame(content_size: Option<u64>, window_log: Option<u8>, blocks: &[Vec<u8>]) -> Vec<u8> {
    let mut out = 0xFD2F_B528u32.to_le_bytes().to_vec();
    let fcs_flag: u8 = if content_size.is_some() { 3 } else { 0 };
    let single = window_log.is_none();
    assert!(
        !single || content_size.is_some(),
        "single-segment frames declare their size"
    );
    out.push((fcs_flag << 6) | (u8::from(single) << 5));
    if let Some(w) = window_log {
        out.push((w - 10) << 3);
    }
    if let Some(n) = content_size {
        out.extend_from_slice(&n.to_le_bytes());
    }
    let last = blocks.len().saturating_sub(1);
    for (i, b) in blocks.iter().enumerate() {
        let mut b = b.clone();
        if i == last {
            b[0] |= 1;
        }
        out.extend_from_slice(&b);
    }
    out
}

fn block_header(kind: u32, size: usize) -> [u8; 3] {
    let v = ((size as u32) << 3) | (kind << 1);
    [v as u8, (v >> 8) as u8, (v >> 16) as u8]
}

/// Raw blocks of at most 128 KiB holding `data`.
fn raw_blocks(data: &[u8]) -> Vec<Vec<u8>> {
    if data.is_empty() {
        return vec![block_header(0, 0).to_vec()];
    }
    data.chunks(128 << 10)
        .map(|c| {
            let mut b = block_header(0, c.len()).to_vec();
            b.extend_from_slice(c);
            b
        })
        .collect()
}

/// `count` RLE blocks of 128 KiB of zeros each: 4 bytes that decompress to 128 KiB.
fn rle_blocks(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|_| {
            let mut b = block_header(1, 128 << 10).to_vec();
            b.push(0);
            b
        })
        .collect()
}

/// A safetensors file from a header string and data, exactly as given.
fn st(header: &str, data: &[u8]) -> Vec<u8> {
    st_bytes(header.as_bytes(), data)
}

fn st_bytes(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn ok(payload: &[u8]) -> String {
    format!("ok:{}", sha256_hex(payload))
}

/// Build every vector.
pub fn build() -> Kit {
    let mut kit = Kit::default();
    let hq = key("hq");
    let site_a = key("site-a");
    let site_b = key("site-b");

    let model = Model::new(0.5);
    let p = model.payload();
    let g0 = seal(draft_global(0, None, vec![]), &p, &hq, LEVEL).expect("global r0");
    let upd = seal(
        draft_update(&g0.hash, "site-a", 120),
        &Model::new(0.25).payload(),
        &site_a,
        LEVEL,
    )
    .expect("update");
    let g1 = seal(
        draft_global(
            1,
            Some(g0.hash.clone()),
            vec![Contributor {
                bundle: upd.hash.clone(),
                site: "site-a".into(),
                samples: 120,
            }],
        ),
        &Model::new(0.375).payload(),
        &hq,
        LEVEL,
    )
    .expect("global r1");
    let compressed = compress(p.bytes(), LEVEL).expect("compress");
    let m0 = &g0.manifest;

    // ---- valid: the positive controls ----
    kit.bundle(
        "valid-global-r0",
        g0.bytes.clone(),
        STD,
        &ok(p.bytes()),
        "ok",
        "honest round-0 global (rank-0 and zero-element tensors included)",
    );
    kit.bundle(
        "valid-global-r1",
        g1.bytes.clone(),
        "hq",
        &ok(Model::new(0.375).payload().bytes()),
        "ok",
        "honest round-1 global with one contributor, only the hq key trusted",
    );
    kit.bundle(
        "valid-update-site-a",
        upd.bytes.clone(),
        STD,
        &ok(Model::new(0.25).payload().bytes()),
        "ok",
        "honest site-a update on the round-0 global",
    );
    // Spec §6.6: an update may carry its site's Fisher estimate under `ferry.fisher/`.
    let with_fisher = {
        let model = Model::new(0.25).payload();
        let target = model
            .metas()
            .iter()
            .find(|t| t.dtype == Dtype::F32 && t.numel().unwrap_or(0) > 0)
            .expect("an F32 tensor");
        let values = (0..target.numel().unwrap_or(0))
            .map(|i| i as f32 * 0.5)
            .collect();
        let fisher = std::collections::BTreeMap::from([(target.name.clone(), values)]);
        ferry_bundle::fisher::attach(&model, &fisher).expect("attach")
    };
    let upd_fisher = seal(
        draft_update(&g0.hash, "site-a", 120),
        &with_fisher,
        &site_a,
        LEVEL,
    )
    .expect("update with Fisher tensors");
    kit.bundle(
        "valid-update-with-fisher",
        upd_fisher.bytes.clone(),
        STD,
        &ok(with_fisher.bytes()),
        "ok",
        "honest site-a update carrying a Fisher tensor (§6.6); the payload holds the model and the estimate",
    );

    container(&mut kit, &g0.bytes, &upd.bytes);
    manifest(&mut kit, m0, &hq, &compressed, p.bytes());
    compression(&mut kit, m0, &hq, p.bytes());
    safetensors_signed(&mut kit, m0, &hq, &p);
    safetensors_raw(&mut kit, &model);
    signatures(&mut kit, &g0, &upd, &g1, &site_b);
    revocations(&mut kit);
    key_lists(&mut kit);
    versions(&mut kit, &g0, &upd, &g1);
    escapes(&mut kit, m0, &hq, &compressed, p.bytes());
    encrypted(&mut kit, &upd);
    kit
}

/// A format-1 manifest, field for field in the order format 1 writers used (no `revocations`, no `expires`).
#[derive(serde::Serialize)]
struct ManifestV1<'a> {
    format: u32,
    kind: BundleKind,
    federation: &'a str,
    arch: &'a Option<String>,
    model_fingerprint: &'a str,
    round: u64,
    base: &'a Option<String>,
    site: &'a Option<SiteInfo>,
    contributors: &'a [Contributor],
    strategy: &'a Option<String>,
    payload: &'a ferry_bundle::manifest::PayloadInfo,
    tensors: &'a [ferry_bundle::TensorEntry],
    signer: &'a Signer,
    created: u64,
}

fn json_v1(m: &Manifest) -> Vec<u8> {
    serde_json::to_vec(&ManifestV1 {
        format: 1,
        kind: m.kind,
        federation: &m.federation,
        arch: &m.arch,
        model_fingerprint: &m.model_fingerprint,
        round: m.round,
        base: &m.base,
        site: &m.site,
        contributors: &m.contributors,
        strategy: &m.strategy,
        payload: &m.payload,
        tensors: &m.tensors,
        signer: &m.signer,
        created: m.created,
    })
    .expect("v1 manifest serialises")
}

/// The compressed payload of a sealed bundle.
fn payload_of(b: &ferry_bundle::Sealed) -> &[u8] {
    &b.bytes[32 + manifest_len(&b.bytes) + 64..]
}

/// Format versions (issue 15): format-1 bundles stay readable, each version signs under its own domain, and
/// the fields format 2 adds are checked.
fn versions(
    kit: &mut Kit,
    g0: &ferry_bundle::Sealed,
    upd: &ferry_bundle::Sealed,
    g1: &ferry_bundle::Sealed,
) {
    let hq = key("hq");
    let c = "version";
    let plain0 = Model::new(0.5).payload();
    let v1_global = assemble_version(1, &json_v1(&g0.manifest), &hq, payload_of(g0));
    kit.bundle(
        &format!("valid-{c}1-global-r0"),
        v1_global.clone(),
        STD,
        &ok(plain0.bytes()),
        "ok",
        "a format-1 global (no expires, no revocations), signed under ferry-bundle-v1: still verifies",
    );
    kit.bundle(
        &format!("valid-{c}1-update-site-a"),
        assemble_version(1, &json_v1(&upd.manifest), &key("site-a"), payload_of(upd)),
        STD,
        &ok(Model::new(0.25).payload().bytes()),
        "ok",
        "a format-1 update: still verifies, so HQ still merges updates from sites not yet upgraded",
    );
    let mut b = v1_global.clone();
    b[16] = 2;
    kit.bundle(
        &format!("{c}-1-relabelled-2"),
        b,
        STD,
        "BadSignature",
        "ok-manifest-invalid",
        "a format-1 bundle whose header says version 2: signed under the other domain",
    );
    let mut b = g0.bytes.clone();
    b[16] = 1;
    kit.bundle(
        &format!("{c}-2-relabelled-1"),
        b,
        STD,
        "BadSignature",
        "ok-manifest-invalid",
        "a format-2 bundle whose header says version 1: signed under the other domain",
    );
    let mut with_expires = String::from_utf8(json_v1(&g0.manifest)).expect("utf8");
    with_expires.pop();
    with_expires.push_str(",\"expires\":1800000000}");
    kit.bundle(
        &format!("{c}-1-with-expires"),
        assemble_version(1, with_expires.as_bytes(), &hq, payload_of(g0)),
        STD,
        "InvalidManifest",
        "ok-manifest-invalid",
        "a format-1 manifest holding the format-2 field expires: refused like any unknown field",
    );
    let mut m = g0.manifest.clone();
    m.format = 1;
    kit.bundle(
        &format!("{c}-format-1-in-2-header"),
        assemble(&json(&m), &hq, payload_of(g0)),
        STD,
        "InvalidManifest",
        "ok-manifest-invalid",
        "a format-2 header and domain over a manifest saying format 1",
    );
    let mut m = g0.manifest.clone();
    m.expires = None;
    kit.bundle(
        &format!("{c}-2-global-without-expires"),
        assemble(&json(&m), &hq, payload_of(g0)),
        STD,
        "InvalidManifest",
        "ok-manifest-invalid",
        "a format-2 global that does not say when it expires",
    );
    let mut m = upd.manifest.clone();
    m.expires = Some(CREATED + 1);
    kit.bundle(
        &format!("{c}-2-update-with-expires"),
        assemble(&json(&m), &key("site-a"), payload_of(upd)),
        STD,
        "InvalidManifest",
        "ok-manifest-invalid",
        "an update naming an expiry (only globals expire)",
    );
    let mut m = upd.manifest.clone();
    m.revocations = Some(ferry_bundle::RevocationRef {
        serial: 1,
        sha256: "ab".repeat(32),
    });
    kit.bundle(
        &format!("{c}-2-update-with-revocations"),
        assemble(&json(&m), &key("site-a"), payload_of(upd)),
        STD,
        "InvalidManifest",
        "ok-manifest-invalid",
        "an update naming a revocation list (only globals do)",
    );
    let mut m = g1.manifest.clone();
    m.revocations = Some(ferry_bundle::RevocationRef {
        serial: 3,
        sha256: "AB".repeat(32),
    });
    kit.bundle(
        &format!("{c}-2-revocations-bad-hash"),
        assemble(&json(&m), &hq, payload_of(g1)),
        STD,
        "InvalidManifest",
        "ok-manifest-invalid",
        "a global naming a revocation list by an upper-case hash",
    );
    let mut m = g1.manifest.clone();
    m.revocations = Some(ferry_bundle::RevocationRef {
        serial: 3,
        sha256: "ab".repeat(32),
    });
    kit.bundle(
        &format!("valid-{c}2-global-names-revocations"),
        assemble(&json(&m), &hq, payload_of(g1)),
        STD,
        &ok(Model::new(0.375).payload().bytes()),
        "ok",
        "a round-1 global naming revocation list 3 by hash (sites must hold it; the reader only checks the form)",
    );
    kit.bundle(
        "sig-bundle-revoked-by-hash",
        g0.bytes.clone(),
        &format!("{STD}+bundle={}", g0.hash),
        "RevokedBundle",
        "ok",
        "an honest global withdrawn by hash in an applied revocation list",
    );
}

/// Escape sequences in the manifest (issue 15 §7): serde's "unknown field" and "unknown variant" messages
/// quote the text, so every message must come out escaped (the test checks every error for control
/// characters). File names with escape sequences are tested on real files, in `crates/client/tests`.
fn escapes(kit: &mut Kit, m0: &Manifest, hq: &SecretKey, compressed: &[u8], plain: &[u8]) {
    let c = "escape";
    let base = String::from_utf8(json(&{
        let mut m = m0.clone();
        describe(&mut m, plain, compressed);
        m
    }))
    .expect("utf8");
    let cases = [
        (
            "unknown-field",
            base.replacen('{', "{\"\\u001b[31mred\\u001b[0m\":1,", 1),
            "an unknown manifest field whose name is an ANSI colour sequence",
        ),
        (
            "unknown-variant-kind",
            base.replacen("\"kind\":\"global\"", "\"kind\":\"\\u001b[2J\\u001b[H\"", 1),
            "a kind value that clears the screen",
        ),
        (
            "unknown-variant-role",
            base.replacen("\"role\":\"hq\"", "\"role\":\"\\u001b]0;pwned\\u0007\"", 1),
            "a signer role that sets the terminal title (OSC)",
        ),
        (
            "unknown-field-nested",
            base.replacen("\"payload\":{", "\"payload\":{\"\\u009b31m\":0,", 1),
            "an unknown payload field holding a C1 control (CSI, U+009B)",
        ),
        (
            "codec",
            base.replacen("\"codec\":\"zstd\"", "\"codec\":\"\\u001b[5mzstd\"", 1),
            "a codec with an escape sequence (a validation message quotes it)",
        ),
    ];
    for (name, text, comment) in cases {
        assert_ne!(text, base, "{name}: the edit did not apply");
        kit.bundle(
            &format!("manifest-{c}-{name}"),
            assemble(text.as_bytes(), hq, compressed),
            STD,
            "InvalidManifest",
            "ok-manifest-invalid",
            comment,
        );
    }
}

fn container(kit: &mut Kit, g: &[u8], upd: &[u8]) {
    let ml = manifest_len(g);
    let header_end = 32 + ml + 64;
    let c = "container";
    kit.bundle(
        &format!("{c}-empty"),
        vec![],
        STD,
        "TooShort",
        "TooShort",
        "zero-byte file",
    );
    kit.bundle(
        &format!("{c}-one-byte"),
        vec![0x5e],
        STD,
        "TooShort",
        "TooShort",
        "one byte",
    );
    let mut b = g.to_vec();
    b[0] = 0x50;
    kit.bundle(
        &format!("{c}-wrong-skippable-magic"),
        b,
        STD,
        "WrongMagic",
        "WrongMagic",
        "skippable-frame magic 0x184D2A50 instead of ..5E",
    );
    let mut b = g.to_vec();
    b[8..16].copy_from_slice(b"FERRYBDM");
    kit.bundle(
        &format!("{c}-wrong-header-magic"),
        b,
        STD,
        "WrongMagic",
        "WrongMagic",
        "FERRYBDM instead of FERRYBDL",
    );
    let mut b = compress(b"not a bundle at all, just a zstd frame of text", LEVEL).expect("zstd");
    b.resize(64, 0);
    kit.bundle(
        &format!("{c}-plain-zstd-frame"),
        b,
        STD,
        "WrongMagic",
        "WrongMagic",
        "an ordinary zstd frame, no ferry header",
    );
    kit.bundle(
        &format!("{c}-safetensors-not-bundle"),
        Model::new(1.0).payload().bytes().to_vec(),
        STD,
        "WrongMagic",
        "WrongMagic",
        "a plain safetensors file offered as a bundle",
    );
    for (v, what) in [
        (4u16, "version-4"),
        (0, "version-0"),
        (0xffff, "version-65535"),
    ] {
        let mut b = g.to_vec();
        b[16..18].copy_from_slice(&v.to_le_bytes());
        kit.bundle(
            &format!("{c}-unknown-{what}"),
            b,
            STD,
            "UnsupportedVersion",
            "UnsupportedVersion",
            "header version is not 1, 2 or 3: a clear 'newer format' error",
        );
    }
    let mut b = g.to_vec();
    b[18] = 1;
    kit.bundle(
        &format!("{c}-reserved-nonzero"),
        b,
        STD,
        "MalformedHeader",
        "MalformedHeader",
        "reserved header bytes are not zero",
    );

    // Truncation at every section boundary, then at a few fixed pseudo-random offsets.
    let boundaries = [
        (4, "in-skippable-magic", "TooShort"),
        (8, "after-frame-length", "TooShort"),
        (16, "after-header-magic", "TooShort"),
        (20, "after-version", "TooShort"),
        (28, "after-key-id", "TooShort"),
        (32, "after-manifest-length", "MalformedHeader"),
        (32 + ml / 2, "in-manifest", "MalformedHeader"),
        (32 + ml, "after-manifest", "MalformedHeader"),
        (32 + ml + 32, "in-signature", "MalformedHeader"),
        (header_end - 1, "one-before-payload", "MalformedHeader"),
        (header_end, "at-payload", "PayloadLength"),
        (header_end + 4, "after-zstd-magic", "PayloadLength"),
        ((header_end + g.len()) / 2, "in-payload", "PayloadLength"),
        (g.len() - 1, "last-byte", "PayloadLength"),
    ];
    for (at, what, err) in boundaries {
        let inspect = if err == "PayloadLength" { "ok" } else { err };
        kit.bundle(
            &format!("{c}-truncated-{what}"),
            g[..at].to_vec(),
            STD,
            err,
            inspect,
            &format!("truncated to {at} bytes"),
        );
    }
    let mut rng = Rng(6);
    for _ in 0..3 {
        let at = 1 + rng.below(g.len() - 1);
        let (err, inspect) = if at < 32 {
            ("TooShort", "TooShort")
        } else if at < header_end {
            ("MalformedHeader", "MalformedHeader")
        } else {
            ("PayloadLength", "ok")
        };
        kit.bundle(
            &format!("{c}-truncated-at-{at}"),
            g[..at].to_vec(),
            STD,
            err,
            inspect,
            &format!("truncated at pseudo-random offset {at}"),
        );
    }

    let mut b = g.to_vec();
    b.push(0);
    kit.bundle(
        &format!("{c}-trailing-zero-byte"),
        b,
        STD,
        "PayloadLength",
        "ok",
        "one zero byte after the payload",
    );
    let mut b = g.to_vec();
    b.extend_from_slice(b"\n# appended by hand\n");
    kit.bundle(
        &format!("{c}-trailing-text"),
        b,
        STD,
        "PayloadLength",
        "ok",
        "text appended after the payload",
    );
    let mut b = g.to_vec();
    b.extend_from_slice(upd);
    kit.bundle(
        &format!("{c}-two-bundles-concatenated"),
        b,
        STD,
        "PayloadLength",
        "ok",
        "a global followed by a whole update",
    );

    // Oversized header lengths.
    let mut b = g.to_vec();
    b[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
    kit.bundle(
        &format!("{c}-manifest-length-4gib"),
        b,
        STD,
        "MalformedHeader",
        "MalformedHeader",
        "manifest length 0xFFFFFFFF, over the 64 MiB limit",
    );
    let mut b = g.to_vec();
    let big = 60u32 << 20;
    b[28..32].copy_from_slice(&big.to_le_bytes());
    b[4..8].copy_from_slice(&(24 + big + 64).to_le_bytes());
    kit.bundle(
        &format!("{c}-manifest-length-past-eof"),
        b,
        STD,
        "MalformedHeader",
        "MalformedHeader",
        "consistent lengths claiming a 60 MiB manifest in a small file",
    );
    let mut b = g.to_vec();
    b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    kit.bundle(
        &format!("{c}-frame-length-4gib"),
        b,
        STD,
        "MalformedHeader",
        "MalformedHeader",
        "skippable frame length 0xFFFFFFFF",
    );
    let mut b = g.to_vec();
    let fl = u32::from_le_bytes(b[4..8].try_into().expect("4")) - 1;
    b[4..8].copy_from_slice(&fl.to_le_bytes());
    kit.bundle(
        &format!("{c}-frame-length-off-by-one"),
        b,
        STD,
        "MalformedHeader",
        "MalformedHeader",
        "frame length one less than key id + manifest + signature",
    );
}

fn manifest(kit: &mut Kit, m0: &Manifest, hq: &SecretKey, compressed: &[u8], plain: &[u8]) {
    let c = "manifest";
    let raw = |kit: &mut Kit, name: &str, bytes: &[u8], comment: &str| {
        kit.bundle(
            &format!("{c}-{name}"),
            assemble(bytes, hq, compressed),
            STD,
            "InvalidManifest",
            "ok-manifest-invalid",
            comment,
        );
    };
    let mut m = m0.clone();
    describe(&mut m, plain, compressed);
    let good = String::from_utf8(json(&m)).expect("utf8");
    raw(kit, "empty", b"", "validly signed zero-byte manifest");
    raw(
        kit,
        "not-json",
        b"round=1\nkind=global\n",
        "validly signed text that is not JSON",
    );
    raw(
        kit,
        "not-utf8",
        b"{\"format\":1,\"kind\":\"gl\xffobal\"}",
        "validly signed manifest with a non-UTF-8 byte",
    );
    raw(
        kit,
        "deeply-nested",
        format!("{}{}", "[".repeat(20_000), "]".repeat(20_000)).as_bytes(),
        "validly signed 20000-deep JSON array: a recursion limit, not a stack overflow",
    );
    raw(
        kit,
        "nested-in-field",
        good.replacen(
            "\"arch\":null",
            &format!("\"arch\":{}1{}", "[".repeat(5000), "]".repeat(5000)),
            1,
        )
        .as_bytes(),
        "deep nesting inside a known field",
    );
    raw(
        kit,
        "unknown-field",
        good.replacen('{', "{\"trusted\":true,", 1).as_bytes(),
        "an extra top-level field (deny_unknown_fields)",
    );
    raw(
        kit,
        "duplicate-round",
        good.replacen("\"round\":0", "\"round\":0,\"round\":7", 1)
            .as_bytes(),
        "the round field twice: no last-one-wins ambiguity",
    );
    raw(
        kit,
        "format-3",
        good.replacen("\"format\":2", "\"format\":3", 1).as_bytes(),
        "manifest format 3 inside a version-2 header",
    );
    raw(
        kit,
        "bad-codec",
        good.replacen("\"codec\":\"zstd\"", "\"codec\":\"gzip\"", 1)
            .as_bytes(),
        "codec other than zstd",
    );
    raw(
        kit,
        "uppercase-hash",
        good.replacen(&m.payload.sha256, &m.payload.sha256.to_uppercase(), 1)
            .as_bytes(),
        "payload hash in upper case: hashes have one spelling",
    );
    raw(
        kit,
        "federation-path",
        good.replacen("\"federation\":\"kit\"", "\"federation\":\"../kit\"", 1)
            .as_bytes(),
        "federation name that is a path",
    );
    raw(
        kit,
        "global-with-site",
        good.replacen(
            "\"site\":null",
            "\"site\":{\"id\":\"site-a\",\"samples\":1}",
            1,
        )
        .as_bytes(),
        "a global that names a site",
    );
    raw(
        kit,
        "round0-with-base",
        good.replacen(
            "\"base\":null",
            &format!("\"base\":\"{}\"", "a".repeat(64)),
            1,
        )
        .as_bytes(),
        "a round-0 global naming a previous global",
    );
    {
        // §6.6: a global never carries a Fisher tensor (fingerprint recomputed, so that rule is what refuses).
        let mut fm = m.clone();
        let target = fm
            .tensors
            .iter()
            .find(|t| t.dtype == "F32")
            .cloned()
            .expect("an F32 tensor");
        fm.tensors.push(ferry_bundle::manifest::TensorEntry {
            name: format!("ferry.fisher/{}", target.name),
            ..target
        });
        fm.tensors.sort_by(|a, b| a.name.cmp(&b.name));
        fm.model_fingerprint = ferry_bundle::tensor::fingerprint(fm.tensor_metas().iter());
        raw(
            kit,
            "global-with-fisher",
            &json(&fm),
            "a global carrying a Fisher tensor: only updates may (§6.6)",
        );
    }
    raw(
        kit,
        "fingerprint-wrong",
        good.replacen(&m.model_fingerprint, &"0".repeat(64), 1)
            .as_bytes(),
        "model fingerprint not matching the tensor list",
    );
    raw(
        kit,
        "round-negative",
        good.replacen("\"round\":0", "\"round\":-1", 1).as_bytes(),
        "negative round",
    );
    raw(
        kit,
        "round-2pow64",
        good.replacen("\"round\":0", "\"round\":18446744073709551616", 1)
            .as_bytes(),
        "round 2^64, out of u64",
    );
    raw(
        kit,
        "tensors-unsorted",
        {
            let mut m = m.clone();
            m.tensors.reverse();
            json(&m)
        }
        .as_slice(),
        "tensor list not sorted by name",
    );
}

fn compression(kit: &mut Kit, m0: &Manifest, hq: &SecretKey, plain: &[u8]) {
    let c = "compression";
    let len = plain.len() as u64;
    let b = |m: &Manifest, frame: &[u8]| signed(m, hq, plain, frame);

    // A decompression bomb: 48 bytes of RLE blocks declaring 64 GiB, declared honestly in the signed manifest.
    let bomb_len = 64u64 << 30;
    let bomb = frame(Some(bomb_len), Some(27), &rle_blocks(8));
    let mut m = m0.clone();
    describe(&mut m, plain, &bomb);
    m.payload.len = bomb_len;
    kit.bundle(
        &format!("{c}-bomb-64gib-declared"),
        assemble(&json(&m), hq, &bomb),
        STD,
        "Decompress",
        "ok",
        "signed 64 GiB payload from a 48-byte frame: refused before allocating (limit 16 GiB)",
    );
    // The same bomb behind a false content size: the frame and manifest say `len`, the blocks make 32 MiB.
    let lying = frame(Some(len), Some(27), &rle_blocks(256));
    kit.bundle(&format!("{c}-bomb-false-content-size"), b(m0, &lying), STD, "Decompress", "ok", "frame declares the signed length but its blocks make 32 MiB: decoding stops at the signed length");
    let short = frame(Some(len), Some(20), &raw_blocks(&plain[..plain.len() - 8]));
    kit.bundle(
        &format!("{c}-content-size-too-large"),
        b(m0, &short),
        STD,
        "Decompress",
        "ok",
        "frame declares the signed length but holds 8 bytes less",
    );
    let nosize = frame(None, Some(20), &raw_blocks(plain));
    kit.bundle(
        &format!("{c}-no-content-size"),
        b(m0, &nosize),
        STD,
        "PayloadFrame",
        "ok",
        "frame without a content size field",
    );
    let nosize_lib = {
        let mut c = zstd::bulk::Compressor::new(LEVEL).expect("zstd");
        c.include_contentsize(false).expect("param");
        c.compress(plain).expect("compress")
    };
    kit.bundle(
        &format!("{c}-no-content-size-libzstd"),
        b(m0, &nosize_lib),
        STD,
        "PayloadFrame",
        "ok",
        "libzstd frame written with include_contentsize(false)",
    );
    // The window the frame header declares must be within 2^27, whatever the content size: a 256 MiB frame
    // (signed as such) with a 2^28 window, and a small frame that declares a 2^31 window.
    let wide_len = 1u64 << 28;
    let wide = frame(Some(wide_len), Some(28), &raw_blocks(plain));
    let mut m = m0.clone();
    describe(&mut m, plain, &wide);
    m.payload.len = wide_len;
    kit.bundle(
        &format!("{c}-window-log-28"),
        assemble(&json(&m), hq, &wide),
        STD,
        "PayloadFrame",
        "ok",
        "256 MiB frame with a 2^28 window, over the 2^27 limit: refused from the header, nothing allocated",
    );
    let small = frame(Some(len), Some(31), &raw_blocks(plain));
    kit.bundle(
        &format!("{c}-window-log-31-small-frame"),
        b(m0, &small),
        STD,
        "PayloadFrame",
        "ok",
        "small frame declaring a 2^31 window (libzstd would clamp it to the content size; ferry refuses it)",
    );
    let single_big = frame(Some(wide_len), None, &raw_blocks(plain));
    let mut m = m0.clone();
    describe(&mut m, plain, &single_big);
    m.payload.len = wide_len;
    kit.bundle(
        &format!("{c}-single-segment-256mib"),
        assemble(&json(&m), hq, &single_big),
        STD,
        "PayloadFrame",
        "ok",
        "single-segment frame declaring 256 MiB: its window is its size, over the limit",
    );
    // A frame within every limit that declares 1 GiB and holds 1 MiB: signed honestly, refused when the
    // content ends early, but only after the reader has reserved the declared size.
    let gib = 1u64 << 30;
    let hollow = frame(Some(gib), Some(27), &rle_blocks(8));
    let mut m = m0.clone();
    describe(&mut m, plain, &hollow);
    m.payload.len = gib;
    kit.bundle_bug(
        &format!("{c}-declares-1gib-holds-1mib"),
        assemble(&json(&m), hq, &hollow),
        STD,
        "Decompress",
        "-",
        "ok",
        "1 GiB declared and signed, 2^27 window, 32 bytes of RLE blocks making 1 MiB",
    );
    let at_limit = frame(Some(len), Some(27), &raw_blocks(plain));
    kit.bundle(
        &format!("{c}-window-log-27-valid"),
        b(m0, &at_limit),
        STD,
        &ok(plain),
        "ok",
        "hand-built frame with a 2^27 window (the limit): VALID",
    );
    let single = frame(Some(len), None, &raw_blocks(plain));
    kit.bundle(
        &format!("{c}-single-segment-valid"),
        b(m0, &single),
        STD,
        &ok(plain),
        "ok",
        "hand-built single-segment frame of raw blocks: VALID",
    );

    let honest = compress(plain, LEVEL).expect("zstd");
    let mut m = m0.clone();
    describe(&mut m, plain, &honest);
    m.payload.len += 1;
    kit.bundle(
        &format!("{c}-signed-length-plus-one"),
        assemble(&json(&m), hq, &honest),
        STD,
        "PayloadFrame",
        "ok",
        "signed decompressed length one more than the frame's",
    );
    m.payload.len -= 2;
    kit.bundle(
        &format!("{c}-signed-length-minus-one"),
        assemble(&json(&m), hq, &honest),
        STD,
        "PayloadFrame",
        "ok",
        "signed decompressed length one less than the frame's",
    );
    let mut m = m0.clone();
    describe(&mut m, plain, &honest);
    m.payload.sha256 = sha256_hex(b"something else");
    kit.bundle(
        &format!("{c}-decompressed-hash-wrong"),
        assemble(&json(&m), hq, &honest),
        STD,
        "DecompressedHash",
        "ok",
        "signed hash of the decompressed payload does not match",
    );

    let mut two = honest.clone();
    two.extend_from_slice(&compress(b"", LEVEL).expect("zstd"));
    kit.bundle(
        &format!("{c}-two-frames"),
        b(m0, &two),
        STD,
        "PayloadFrame",
        "ok",
        "a second (empty) zstd frame after the payload, all signed",
    );
    let mut skip = honest.clone();
    skip.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    skip.extend_from_slice(&4u32.to_le_bytes());
    skip.extend_from_slice(b"hide");
    kit.bundle(
        &format!("{c}-trailing-skippable-frame"),
        b(m0, &skip),
        STD,
        "PayloadFrame",
        "ok",
        "a skippable frame hiding bytes after the payload, all signed",
    );
    let half = plain.len() / 2;
    let mut split = compress(&plain[..half], LEVEL).expect("zstd");
    split.extend_from_slice(&compress(&plain[half..], LEVEL).expect("zstd"));
    kit.bundle(
        &format!("{c}-split-across-frames"),
        b(m0, &split),
        STD,
        "PayloadFrame",
        "ok",
        "payload split over two frames (a plain decoder would join them)",
    );
    kit.bundle(
        &format!("{c}-not-zstd"),
        b(m0, plain),
        STD,
        "PayloadFrame",
        "ok",
        "the safetensors bytes stored uncompressed",
    );
    kit.bundle(
        &format!("{c}-empty-payload"),
        b(m0, &[]),
        STD,
        "PayloadFrame",
        "ok",
        "zero-byte payload, signed",
    );
    kit.bundle(
        &format!("{c}-truncated-frame"),
        b(m0, &honest[..honest.len() / 2]),
        STD,
        "PayloadFrame",
        "ok",
        "half a zstd frame, signed as such",
    );
    let mut bad_block = frame(Some(len), Some(20), &raw_blocks(plain));
    let first_block = 4 + 1 + 1 + 8;
    bad_block[first_block] |= 0b110;
    kit.bundle(
        &format!("{c}-reserved-block-type"),
        b(m0, &bad_block),
        STD,
        "PayloadFrame",
        "ok",
        "block type 3 (reserved)",
    );
    let mut sum = honest.clone();
    let n = sum.len();
    sum[n - 1] ^= 0xff;
    kit.bundle(
        &format!("{c}-checksum-wrong"),
        b(m0, &sum),
        STD,
        "Decompress",
        "ok",
        "frame content checksum wrong, the compressed bytes signed as they are",
    );
    let mut dict = frame(Some(len), Some(20), &raw_blocks(plain));
    dict[4] |= 1;
    dict.insert(6, 7);
    kit.bundle(
        &format!("{c}-needs-dictionary"),
        b(m0, &dict),
        STD,
        "Decompress",
        "ok",
        "frame that names dictionary id 7",
    );
}

fn safetensors_signed(kit: &mut Kit, m0: &Manifest, hq: &SecretKey, p: &Payload) {
    let c = "st-signed";
    let plain = p.bytes();
    let hl = 8 + u64::from_le_bytes(plain[..8].try_into().expect("8")) as usize;
    let header = std::str::from_utf8(&plain[8..hl])
        .expect("utf8")
        .to_string();
    let data = &plain[hl..];
    // A hostile payload under the honest tensor list, signed with matching payload hashes: the check of the
    // header against the one rebuilt from the signed list is what refuses it.
    let hostile = |kit: &mut Kit, name: &str, bytes: Vec<u8>, comment: &str| {
        let frame = compress(&bytes, LEVEL).expect("zstd");
        kit.bundle(
            &format!("{c}-{name}"),
            signed(m0, hq, &bytes, &frame),
            STD,
            "TensorTable",
            "ok",
            comment,
        );
    };
    let mut b = plain.to_vec();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    hostile(
        kit,
        "header-length-huge",
        b,
        "safetensors header length 2^64-1",
    );
    let mut b = plain.to_vec();
    b[..8].copy_from_slice(&(plain.len() as u64).to_le_bytes());
    hostile(
        kit,
        "header-length-past-eof",
        b,
        "safetensors header length past the end",
    );
    let mut b = plain.to_vec();
    b[9] = 0xff;
    hostile(
        kit,
        "header-not-utf8",
        b,
        "non-UTF-8 byte in the safetensors header",
    );
    hostile(
        kit,
        "header-not-json",
        st(&" ".repeat(header.len()), data),
        "header of spaces",
    );
    hostile(
        kit,
        "header-deeply-nested",
        st(
            &format!("{}{}", "[".repeat(50_000), "]".repeat(50_000)),
            data,
        ),
        "50000-deep JSON header",
    );
    hostile(
        kit,
        "header-with-metadata",
        st(
            &header.replacen('{', "{\"__metadata__\":{\"format\":\"pt\"},", 1),
            data,
        ),
        "extra __metadata__ (canonical payloads carry none)",
    );
    hostile(
        kit,
        "header-unpadded",
        st(header.trim_end(), data),
        "header without the canonical padding",
    );
    let mut b = plain.to_vec();
    b.extend_from_slice(&[0; 8]);
    hostile(
        kit,
        "data-trailing-bytes",
        b,
        "8 bytes after the last tensor",
    );
    hostile(
        kit,
        "data-missing-bytes",
        plain[..plain.len() - 4].to_vec(),
        "last tensor 4 bytes short",
    );
    hostile(
        kit,
        "offsets-swapped",
        st(
            &header
                .replacen("[0,8]", "@", 1)
                .replacen("[8,16]", "[0,8]", 1)
                .replacen('@', "[8,16]", 1),
            data,
        ),
        "data offsets pointing at another tensor",
    );

    // Manifests whose tensor list itself is hostile: refused when the signed manifest is validated.
    let listed = |kit: &mut Kit, name: &str, m: Manifest, comment: &str| {
        kit.bundle(
            &format!("{c}-{name}"),
            signed(&m, hq, plain, &compress(plain, LEVEL).expect("zstd")),
            STD,
            "InvalidManifest",
            "ok-manifest-invalid",
            comment,
        );
    };
    let mut m = m0.clone();
    let dup = m.tensors[0].clone();
    m.tensors.insert(0, dup);
    listed(
        kit,
        "duplicate-name-identical",
        m,
        "the same tensor entry twice",
    );
    let mut m = m0.clone();
    let mut dup = m.tensors[0].clone();
    dup.shape = vec![1];
    m.tensors.insert(1, dup);
    listed(
        kit,
        "duplicate-name-different",
        m,
        "two entries with one name and different shapes",
    );
    for (dtype, name) in [
        ("F8_E4M3", "dtype-f8"),
        ("F4", "dtype-f4"),
        ("f32", "dtype-lowercase"),
    ] {
        let mut m = m0.clone();
        m.tensors[0].dtype = dtype.into();
        listed(kit, name, m, &format!("unsupported dtype {dtype}"));
    }
    let mut m = m0.clone();
    m.tensors[0].shape = vec![1 << 32, 1 << 32, 1 << 32];
    listed(kit, "shape-overflow", m, "shape product overflows usize");
    for (n, name, comment) in [
        (String::new(), "name-empty", "empty tensor name"),
        ("w".repeat(2000), "name-2000-bytes", "2000-byte tensor name"),
        (
            "fc.\u{1b}[2Jweight".to_string(),
            "name-escape-sequence",
            "tensor name with a terminal escape sequence",
        ),
        (
            "fc\0weight".to_string(),
            "name-nul",
            "tensor name with a NUL",
        ),
        (
            "fc\nweight".to_string(),
            "name-newline",
            "tensor name with a newline",
        ),
    ] {
        let mut m = m0.clone();
        m.tensors[0].name = n;
        listed(kit, name, m, comment);
    }

    // Valid: odd-but-legal names and shapes, sealed honestly.
    let one = 1.5f32.to_le_bytes();
    for (name, tensor, comment) in [
        (
            "name-dotdot-path-valid",
            "../../etc/passwd",
            "tensor named ../../etc/passwd: VALID as a name, never used as a path",
        ),
        (
            "name-rtl-override-valid",
            "fc.\u{202e}thgiew",
            "tensor name with U+202E: VALID, escaped when printed",
        ),
        (
            "name-1024-bytes-valid",
            &"n".repeat(1024),
            "tensor name of exactly 1024 bytes: VALID",
        ),
    ] {
        let p = Payload::from_tensors(&[TensorRef {
            name: tensor,
            dtype: Dtype::F32,
            shape: &[1],
            data: &one,
        }])
        .expect("valid");
        let s = seal(draft_global(0, None, vec![]), &p, hq, LEVEL).expect("seal");
        kit.bundle(
            &format!("{c}-{name}"),
            s.bytes,
            STD,
            &ok(p.bytes()),
            "ok",
            comment,
        );
    }
    let p2 = Payload::from_tensors(&[
        TensorRef {
            name: "scalar",
            dtype: Dtype::F64,
            shape: &[],
            data: &2.5f64.to_le_bytes(),
        },
        TensorRef {
            name: "empty",
            dtype: Dtype::F32,
            shape: &[0],
            data: &[],
        },
        TensorRef {
            name: "empty3d",
            dtype: Dtype::BF16,
            shape: &[4, 0, 2],
            data: &[],
        },
        TensorRef {
            name: "flag",
            dtype: Dtype::BOOL,
            shape: &[],
            data: &[1],
        },
    ])
    .expect("valid");
    let s = seal(draft_global(0, None, vec![]), &p2, hq, LEVEL).expect("seal");
    kit.bundle(
        &format!("{c}-zero-element-and-rank0-valid"),
        s.bytes,
        STD,
        &ok(p2.bytes()),
        "ok",
        "rank-0 and zero-element tensors only: VALID",
    );
    let empty = Payload::from_tensors(&[]).expect("valid");
    let s = seal(draft_global(0, None, vec![]), &empty, hq, LEVEL).expect("seal");
    kit.bundle(
        &format!("{c}-no-tensors-valid"),
        s.bytes,
        STD,
        &ok(empty.bytes()),
        "ok",
        "a model with no tensors: VALID (the merge refuses it)",
    );

    // Non-finite values: seal refuses them, so only a hostile signer can ship them.
    for (name, value, comment) in [
        ("nan", f32::NAN, "F32 NaN in fc.weight"),
        ("inf", f32::NEG_INFINITY, "F32 -inf in fc.weight"),
    ] {
        let mut b = plain.to_vec();
        let at = plain.len() - data.len() + tensor_offset(&header, "fc.weight");
        b[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let mut m = m0.clone();
        let i = m
            .tensors
            .iter()
            .position(|t| t.name == "fc.weight")
            .expect("fc.weight");
        m.tensors[i].sha256 = sha256_hex(&b[at..at + 24]);
        let frame = compress(&b, LEVEL).expect("zstd");
        kit.bundle_bug(
            &format!("{c}-{name}"),
            signed(&m, hq, &b, &frame),
            STD,
            &ok(&b),
            "-",
            "ok",
            &format!(
                "{comment}, validly signed with matching hashes: VALID for open, which checks origin; \
                 SiteState::import and the merge refuse the values"
            ),
        );
    }
    let mut m = m0.clone();
    m.tensors[0].sha256 = sha256_hex(b"not this tensor");
    let frame = compress(plain, LEVEL).expect("zstd");
    kit.bundle(
        &format!("{c}-tensor-hash-wrong"),
        signed(&m, hq, plain, &frame),
        STD,
        "TensorHash",
        "ok",
        "signed per-tensor hash does not match its bytes",
    );
}

/// Byte offset of `name`'s data in a canonical header.
fn tensor_offset(header: &str, name: &str) -> usize {
    let v: serde_json::Value = serde_json::from_str(header).expect("json");
    v[name]["data_offsets"][0].as_u64().expect("offset") as usize
}

fn safetensors_raw(kit: &mut Kit, model: &Model) {
    let c = "st-raw";
    let f = f32s(&[1.0, 2.0, 3.0, 4.0]);
    let t = |name: &str, dtype: &str, shape: &str, a: usize, b: usize| {
        format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{shape}],\"data_offsets\":[{a},{b}]}}"
        )
    };
    let err = "Safetensors";
    let mut b = st(&format!("{{{}}}", t("w", "F32", "4", 0, 16)), &f);
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    kit.raw(
        &format!("{c}-header-length-huge"),
        b,
        err,
        "-",
        "header length 2^64-1",
    );
    let mut b = st(&format!("{{{}}}", t("w", "F32", "4", 0, 16)), &f);
    b[..8].copy_from_slice(&200_000_000u64.to_le_bytes());
    kit.raw(
        &format!("{c}-header-length-200mb"),
        b,
        err,
        "-",
        "header length 200 MB, above safetensors' 100 MB cap",
    );
    let mut b = st(&format!("{{{}}}", t("w", "F32", "4", 0, 16)), &f);
    b[..8].copy_from_slice(&1000u64.to_le_bytes());
    kit.raw(
        &format!("{c}-header-length-past-eof"),
        b,
        err,
        "-",
        "header length past the end of the file",
    );
    kit.raw(
        &format!("{c}-too-short"),
        vec![1, 0, 0],
        err,
        "-",
        "three bytes",
    );
    kit.raw(&format!("{c}-empty"), vec![], err, "-", "zero-byte file");
    kit.raw(
        &format!("{c}-header-not-utf8"),
        st_bytes(b"{\"w\xff\":{}}", &[]),
        err,
        "-",
        "non-UTF-8 header",
    );
    kit.raw(
        &format!("{c}-header-not-json"),
        st("{\"w\":", &f),
        err,
        "-",
        "truncated JSON header",
    );
    kit.raw(
        &format!("{c}-header-deeply-nested"),
        st(
            &format!("{{\"a\":{}{}}}", "[".repeat(20_000), "]".repeat(20_000)),
            &[],
        ),
        err,
        "-",
        "20000-deep JSON: a recursion limit, not a stack overflow",
    );
    kit.raw(
        &format!("{c}-offsets-overlap"),
        st(
            &format!(
                "{{{},{}}}",
                t("a", "F32", "2", 0, 8),
                t("b", "F32", "3", 4, 16)
            ),
            &f,
        ),
        err,
        "-",
        "b starts inside a",
    );
    kit.raw(
        &format!("{c}-offsets-gap"),
        st(
            &format!(
                "{{{},{}}}",
                t("a", "F32", "1", 0, 4),
                t("b", "F32", "2", 8, 16)
            ),
            &f,
        ),
        err,
        "-",
        "4 unclaimed bytes between a and b",
    );
    kit.raw(
        &format!("{c}-offsets-reversed"),
        st(&format!("{{{}}}", t("a", "F32", "0", 16, 0)), &f),
        err,
        "-",
        "end before start",
    );
    kit.raw(
        &format!("{c}-shape-length-mismatch"),
        st(&format!("{{{}}}", t("w", "F32", "5", 0, 16)), &f),
        err,
        "-",
        "shape x dtype (20 bytes) != byte length (16)",
    );
    kit.raw(
        &format!("{c}-shape-overflow"),
        st(
            &format!(
                "{{{}}}",
                t("w", "F32", "4294967296,4294967296,4294967296", 0, 16)
            ),
            &f,
        ),
        err,
        "-",
        "shape product overflows",
    );
    kit.raw(
        &format!("{c}-data-trailing-bytes"),
        st(&format!("{{{}}}", t("w", "F32", "3", 0, 12)), &f),
        err,
        "-",
        "4 bytes after the last tensor",
    );
    kit.raw(
        &format!("{c}-duplicate-name-conflicting"),
        st(
            &format!(
                "{{{},{}}}",
                t("w", "F32", "2", 0, 8),
                t("w", "F32", "2", 8, 16)
            ),
            &f,
        ),
        err,
        "-",
        "w twice with different offsets (JSON last-wins leaves a gap)",
    );
    kit.raw(
        &format!("{c}-duplicate-name-identical"),
        st(
            &format!(
                "{{{},{}}}",
                t("w", "F32", "4", 0, 16),
                t("w", "F32", "4", 0, 16)
            ),
            &f,
        ),
        "DuplicateTensor",
        "-",
        "w declared twice, identically",
    );
    kit.raw(
        &format!("{c}-duplicate-name-shadowed"),
        st(&format!("{{{},{}}}", t("w", "I8", "1000", 0, 1000), t("w", "F32", "4", 0, 16)), &f),
        "DuplicateTensor",
        "-",
        "w twice: a bogus first entry shadowed by a valid second one (parsers that keep the first disagree)",
    );
    kit.raw(
        &format!("{c}-dtype-f8"),
        st(&format!("{{{}}}", t("w", "F8_E4M3", "16", 0, 16)), &f),
        "UnsupportedDtype",
        "-",
        "F8_E4M3: parsed by safetensors, not carried by ferry",
    );
    kit.raw(
        &format!("{c}-dtype-unknown"),
        st(&format!("{{{}}}", t("w", "Q4", "16", 0, 16)), &f),
        err,
        "-",
        "dtype safetensors does not know",
    );
    let mut nan = f.clone();
    nan[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    kit.raw(
        &format!("{c}-f32-nan"),
        st(&format!("{{{}}}", t("w", "F32", "4", 0, 16)), &nan),
        "NonFinite",
        "-",
        "F32 NaN",
    );
    let inf: Vec<u8> = [0x3c00u16, 0x7c00]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    kit.raw(
        &format!("{c}-f16-inf"),
        st(&format!("{{{}}}", t("h", "F16", "2", 0, 4)), &inf),
        "NonFinite",
        "-",
        "F16 +inf",
    );
    let bnan: Vec<u8> = [0x3f80u16, 0x7fc1]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    kit.raw(
        &format!("{c}-bf16-nan"),
        st(&format!("{{{}}}", t("h", "BF16", "2", 0, 4)), &bnan),
        "NonFinite",
        "-",
        "BF16 NaN",
    );
    let dnan = f64::NAN.to_le_bytes();
    kit.raw(
        &format!("{c}-f64-nan"),
        st(&format!("{{{}}}", t("d", "F64", "", 0, 8)), &dnan),
        "NonFinite",
        "-",
        "rank-0 F64 NaN",
    );
    for (name, tensor, expect, comment) in [
        (
            "name-empty",
            String::new(),
            "BadTensorName",
            "empty tensor name",
        ),
        (
            "name-2000-bytes",
            "x".repeat(2000),
            "BadTensorName",
            "2000-byte tensor name",
        ),
        (
            "name-escape-sequence",
            "\\u001b]0;pwned\\u0007".to_string(),
            "BadTensorName",
            "terminal escape sequence in the name",
        ),
        (
            "name-nul",
            "w\\u0000".to_string(),
            "BadTensorName",
            "NUL in the name",
        ),
        (
            "name-dotdot-path-valid",
            "../../etc/passwd".to_string(),
            "",
            "../../etc/passwd: VALID as a name, never a path",
        ),
    ] {
        let b = st(&format!("{{{}}}", t(&tensor, "F32", "4", 0, 16)), &f);
        let expect = if expect.is_empty() {
            let real =
                serde_json::from_str::<String>(&format!("\"{tensor}\"")).expect("json string");
            let p = Payload::from_tensors(&[TensorRef {
                name: &real,
                dtype: Dtype::F32,
                shape: &[4],
                data: &f,
            }])
            .expect("valid");
            ok(p.bytes())
        } else {
            expect.to_string()
        };
        kit.raw(&format!("{c}-{name}"), b, &expect, "-", comment);
    }
    // Valid files, as PyTorch might write them.
    let scalar = 7i32.to_le_bytes();
    let b = st(
        &format!(
            "{{\"__metadata__\":{{\"format\":\"pt\"}},{},{},{}}}  ",
            t("s", "I32", "", 0, 4),
            t("z", "F32", "0,5", 4, 4),
            t("w", "F32", "2,2", 4, 20)
        ),
        &[&scalar[..], &f].concat(),
    );
    let expect = Payload::from_tensors(&[
        TensorRef {
            name: "s",
            dtype: Dtype::I32,
            shape: &[],
            data: &scalar,
        },
        TensorRef {
            name: "z",
            dtype: Dtype::F32,
            shape: &[0, 5],
            data: &[],
        },
        TensorRef {
            name: "w",
            dtype: Dtype::F32,
            shape: &[2, 2],
            data: &f,
        },
    ])
    .expect("valid");
    kit.raw(
        &format!("{c}-zero-element-and-rank0-valid"),
        b,
        &ok(expect.bytes()),
        "-",
        "rank-0 and zero-element tensors, __metadata__ and unsorted offsets: VALID, canonicalised",
    );
    let p = model.payload();
    kit.raw(
        &format!("{c}-canonical-valid"),
        p.bytes().to_vec(),
        &ok(p.bytes()),
        "-",
        "a canonical ferry payload: VALID and unchanged",
    );
    kit.raw(
        &format!("{c}-no-tensors-valid"),
        st("{}", &[]),
        &ok(Payload::from_tensors(&[]).expect("empty").bytes()),
        "-",
        "an empty header: VALID",
    );
}

fn signatures(
    kit: &mut Kit,
    g0: &ferry_bundle::Sealed,
    upd: &ferry_bundle::Sealed,
    g1: &ferry_bundle::Sealed,
    site_b: &SecretKey,
) {
    let c = "sig";
    let g = &g0.bytes;
    let ml = manifest_len(g);
    let sig = 32 + ml;
    let hq = key("hq");
    let site_a = key("site-a");

    let mut b = g.to_vec();
    b[sig..sig + 64].fill(0);
    kit.bundle(
        &format!("{c}-zeroed"),
        b,
        STD,
        "BadSignature",
        "ok",
        "signature all zeros",
    );
    let mut b = g.to_vec();
    b[sig..sig + 64].fill(0xff);
    kit.bundle(
        &format!("{c}-all-ff"),
        b,
        STD,
        "BadSignature",
        "ok",
        "signature all 0xFF (S out of range)",
    );
    let mut b = g.to_vec();
    b.drain(sig..sig + 64);
    kit.bundle(&format!("{c}-stripped"), b, STD, "BadSignature", "ok", "signature bytes removed, lengths left: the payload's first 64 bytes are read as the signature");
    let mut b = g.to_vec();
    b.drain(sig..sig + 64);
    let fl = u32::from_le_bytes(b[4..8].try_into().expect("4")) - 64;
    b[4..8].copy_from_slice(&fl.to_le_bytes());
    kit.bundle(
        &format!("{c}-stripped-lengths-fixed"),
        b,
        STD,
        "MalformedHeader",
        "MalformedHeader",
        "signature removed and the frame length shortened to match",
    );

    // S + L: the same signature in its malleable, non-canonical form (refused by verify_strict).
    let mut b = g.to_vec();
    add_l(&mut b[sig + 32..sig + 64]);
    kit.bundle(
        &format!("{c}-non-canonical-s-plus-l"),
        b,
        STD,
        "BadSignature",
        "ok",
        "S replaced by S + L (ed25519 malleability)",
    );
    // A small-order R with S = 0, the classic forgery that non-strict verifiers accept for weak keys.
    let mut b = g.to_vec();
    b[sig..sig + 64].fill(0);
    b[sig] = 1;
    kit.bundle(
        &format!("{c}-identity-r-zero-s"),
        b,
        STD,
        "BadSignature",
        "ok",
        "R = identity point, S = 0",
    );

    kit.bundle(
        &format!("{c}-untrusted-key"),
        g.to_vec(),
        "site-a+site-b",
        "UntrustedKey",
        "ok",
        "honest global, hq key not trusted",
    );
    kit.bundle(
        &format!("{c}-no-keys"),
        g.to_vec(),
        "-",
        "UntrustedKey",
        "ok",
        "honest global, empty keyring",
    );
    let p = Model::new(0.5).payload();
    let rogue = seal(draft_global(0, None, vec![]), &p, &key("rogue-hq"), LEVEL).expect("seal");
    kit.bundle(
        &format!("{c}-rogue-hq-same-id"),
        rogue.bytes.clone(),
        STD,
        "UntrustedKey",
        "ok",
        "signed by another key that also calls itself hq",
    );
    let mut b = rogue.bytes.clone();
    b[20..28].copy_from_slice(&hq.public().key_id());
    kit.bundle(
        &format!("{c}-trusted-key-id-other-signer"),
        b,
        STD,
        "BadSignature",
        "ok",
        "header names the trusted hq key id over a signature by the rogue hq key",
    );
    kit.bundle(&format!("{c}-weak-key-trusted"), weak_key_bundle(g0), "weak", "BadSignature", "ok", "a trusted small-order (identity) public key and R = identity, S = 0: only verify_strict refuses it");

    // Manifest bytes edited after signing (same length, so only the signature can notice).
    for (name, from, to, inspect) in [
        (
            "round",
            "\"round\":0".to_string(),
            "\"round\":9".to_string(),
            // Unverified, the edited manifest is also inconsistent: round 9 without a previous global.
            "ok-manifest-invalid",
        ),
        (
            "created",
            format!("\"created\":{CREATED}"),
            format!("\"created\":{}", CREATED + 1),
            "ok",
        ),
    ] {
        let mut b = g.to_vec();
        edit(&mut b, ml, &from, &to);
        kit.bundle(
            &format!("{c}-edited-global-{name}"),
            b,
            STD,
            "BadSignature",
            inspect,
            &format!("global manifest edited after signing: {from} -> {to}"),
        );
    }
    let ul = manifest_len(&upd.bytes);
    let base = upd.manifest.base.clone().expect("base");
    let mut flipped = base.clone().into_bytes();
    flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
    for (name, from, to) in [
        (
            "samples",
            "\"samples\":120".to_string(),
            "\"samples\":999".to_string(),
        ),
        (
            "base",
            base.clone(),
            String::from_utf8(flipped).expect("hex"),
        ),
        (
            "site-id",
            "\"id\":\"site-a\",\"samples\"".to_string(),
            "\"id\":\"site-b\",\"samples\"".to_string(),
        ),
    ] {
        let mut b = upd.bytes.clone();
        edit(&mut b, ul, &from, &to);
        kit.bundle(
            &format!("{c}-edited-update-{name}"),
            b,
            STD,
            "BadSignature",
            "ok",
            "update manifest edited after signing",
        );
    }

    // Tensor data swapped between two validly signed bundles of the same size (global r0 and r1 differ only
    // in values): the header of one over the payload of the other.
    let g1l = manifest_len(&g1.bytes);
    let mut b = g[..sig + 64].to_vec();
    b.extend_from_slice(&g1.bytes[32 + g1l + 64..]);
    let open = if b.len() - (sig + 64) == g0.manifest.payload.compressed_len as usize {
        "PayloadHash"
    } else {
        "PayloadLength"
    };
    kit.bundle(
        &format!("{c}-payload-swapped"),
        b,
        STD,
        open,
        "ok",
        "the r0 global's header and signature over the r1 global's payload",
    );

    // Role violations, validly signed.
    let compressed = compress(p.bytes(), LEVEL).expect("zstd");
    let mut m = g0.manifest.clone();
    m.signer = Signer {
        id: "site-a".into(),
        role: Role::Site,
        key_id: site_a.public().key_id_hex(),
    };
    kit.bundle(
        &format!("{c}-site-key-signs-global"),
        signed(&m, &site_a, p.bytes(), &compressed),
        STD,
        "RoleViolation",
        "ok",
        "site-a's key signs a global",
    );
    let mut m = upd.manifest.clone();
    m.signer = Signer {
        id: "hq".into(),
        role: Role::Hq,
        key_id: hq.public().key_id_hex(),
    };
    kit.bundle(
        &format!("{c}-hq-key-signs-update"),
        signed(&m, &hq, p.bytes(), &compressed),
        STD,
        "RoleViolation",
        "ok",
        "the hq key signs site-a's update",
    );
    let mut m = upd.manifest.clone();
    m.signer = Signer {
        id: "site-b".into(),
        role: Role::Site,
        key_id: site_b.public().key_id_hex(),
    };
    kit.bundle(
        &format!("{c}-update-for-another-site"),
        signed(&m, site_b, p.bytes(), &compressed),
        STD,
        "RoleViolation",
        "ok",
        "site-b's key signs an update that names site-a",
    );
    let mut m = g0.manifest.clone();
    m.signer.id = "hq2".into();
    kit.bundle(
        &format!("{c}-signer-named-wrong"),
        signed(&m, &hq, p.bytes(), &compressed),
        STD,
        "SignerMismatch",
        "ok",
        "manifest names signer hq2, verified by hq",
    );
    let mut m = g0.manifest.clone();
    m.signer.role = Role::Site;
    kit.bundle(
        &format!("{c}-signer-role-wrong"),
        signed(&m, &hq, p.bytes(), &compressed),
        STD,
        "SignerMismatch",
        "ok",
        "manifest says the hq key is a site key",
    );

    // Revoked keys (the keyring's revocation as a revocation list applies it).
    kit.bundle(
        &format!("{c}-revoked-site-key"),
        upd.bytes.clone(),
        "hq+site-a+site-b+!site-a",
        "RevokedKey",
        "ok",
        "honest site-a update after site-a's key was revoked",
    );
    kit.bundle(
        &format!("{c}-revoked-hq-key"),
        g.to_vec(),
        "hq+!hq",
        "RevokedKey",
        "ok",
        "honest global after the hq key was revoked",
    );
    kit.bundle(
        &format!("{c}-revoked-untrusted-key"),
        upd.bytes.clone(),
        "hq+!site-a",
        "RevokedKey",
        "ok",
        "revocation wins even for a key that is not trusted",
    );
    kit.bundle(
        &format!("{c}-other-key-revoked"),
        upd.bytes.clone(),
        "hq+site-a+site-b+!site-b",
        &ok(Model::new(0.25).payload().bytes()),
        "ok",
        "site-b revoked, site-a's update still VALID",
    );
}

/// Add the group order L to a 32-byte little-endian scalar in place.
fn add_l(s: &mut [u8]) {
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut carry = 0u16;
    for (x, l) in s.iter_mut().zip(L) {
        let v = *x as u16 + l as u16 + carry;
        *x = v as u8;
        carry = v >> 8;
    }
    assert_eq!(carry, 0, "S + L fits in 256 bits");
}

fn edit(b: &mut [u8], manifest_len: usize, from: &str, to: &str) {
    assert_eq!(from.len(), to.len(), "same-length edit");
    let m = &b[32..32 + manifest_len];
    let at = m
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} not in manifest"));
    b[32 + at..32 + at + to.len()].copy_from_slice(to.as_bytes());
}

/// The identity point as a public key.
const IDENTITY: [u8; 32] = {
    let mut k = [0u8; 32];
    k[0] = 1;
    k
};

/// A bundle "signed" by the identity key: R = identity, S = 0 verifies under cofactored or non-strict checks.
fn weak_key_bundle(g0: &ferry_bundle::Sealed) -> Vec<u8> {
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&IDENTITY).expect("identity decodes");
    let kid = ferry_bundle::keys::key_id(Role::Hq, "weak", &vk);
    let mut m = g0.manifest.clone();
    m.signer = Signer {
        id: "weak".into(),
        role: Role::Hq,
        key_id: hex::encode(kid),
    };
    let any = SecretKey::from_seed(Role::Hq, "weak", [0; 32]);
    let mut b = assemble(
        &json(&m),
        &any,
        &g0.bytes[32 + manifest_len(&g0.bytes) + 64..],
    );
    b[20..28].copy_from_slice(&kid);
    let ml = manifest_len(&b);
    b[32 + ml..32 + ml + 64].fill(0);
    b[32 + ml] = 1;
    b
}

fn weak_pub_text() -> String {
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&IDENTITY).expect("identity decodes");
    format!(
        "# ferry public key (Ed25519). TEST ONLY: the identity point, a weak key no honest tool makes.\n\
         ferry-public-key: 1\nrole: hq\nid: weak\nkey-id: {}\nkey: {}\n",
        hex::encode(ferry_bundle::keys::key_id(Role::Hq, "weak", &vk)),
        hex::encode(IDENTITY)
    )
}

// ---- revocation lists (format of src/revocation.rs, written independently here) ----

const REV_MAGIC: &[u8; 8] = b"FERRYREV";
const REV_DOMAIN: &[u8] = b"ferry-revocations-v1\0";
const REV_DOMAIN_V2: &[u8] = b"ferry-revocations-v2\0";

// ---- lists of HQ keys signed by the root (format of src/keylist.rs, written independently here) ----

const KEYS_MAGIC: &[u8; 8] = b"FERRYKEY";
const KEYS_DOMAIN: &[u8] = b"ferry-hq-keys-v1\0";

fn keys_body(signer: &str, serial: u64, listed: &[&str]) -> String {
    let (_, role, id, _) = KEYS.iter().find(|k| k.0 == signer).expect("key");
    let entries: Vec<String> = listed
        .iter()
        .map(|stem| {
            let k = key(stem).public();
            format!(
                "{{\"role\":\"{}\",\"id\":\"{}\",\"key_id\":\"{}\",\"key\":\"{}\"}}",
                k.role,
                k.id,
                k.key_id_hex(),
                hex::encode(k.verifying_key().as_bytes())
            )
        })
        .collect();
    format!(
        "{{\"format\":1,\"federation\":\"{FEDERATION}\",\"serial\":{serial},\"created\":{CREATED},\"expires\":{},\"signer\":{{\"role\":\"{role}\",\"id\":\"{id}\",\"key_id\":\"{}\"}},\"hq_keys\":[{}]}}",
        CREATED + 365 * 86_400,
        key(signer).public().key_id_hex(),
        entries.join(",")
    )
}

fn keys_file(signer: &str, body: &str) -> Vec<u8> {
    signed_file(KEYS_MAGIC, 1, KEYS_DOMAIN, signer, body.as_bytes())
}

fn key_lists(kit: &mut Kit) {
    let mut list = |name: &str, bytes: Vec<u8>, expect: &str, comment: &str| {
        let name = format!("keylist-{name}.ferry-keys");
        kit.file(&name, bytes);
        kit.row(&name, "keylist", "root", expect, "-", comment);
    };
    let good = keys_body("root", 1, &["hq"]);
    list(
        "valid-one-key",
        keys_file("root", &good),
        "ok:1",
        "the root names the hq key",
    );
    list(
        "valid-rotation",
        keys_file("root", &keys_body("root", 2, &["hq", "hq-2027"])),
        "ok:2",
        "serial 2 naming the old and the new hq key during a change",
    );
    list(
        "two-keys-same-id",
        keys_file("root", &keys_body("root", 2, &["hq", "rogue-hq"])),
        "Invalid",
        "two different keys that both call themselves hq",
    );
    list(
        "signed-by-hq",
        keys_file("hq", &keys_body("hq", 1, &["hq"])),
        "UntrustedRoot",
        "the hq key signs a list of hq keys: only the pinned root may",
    );
    list(
        "rogue-root",
        keys_file("rogue-root", &keys_body("rogue-root", 1, &["rogue-hq"])),
        "UntrustedRoot",
        "another key calling itself root names a rogue hq key",
    );
    let mut b = keys_file("root", &good);
    let at = 24 + good.find("\"serial\":1").expect("serial") + 9;
    b[at] = b'9';
    list(
        "edited-serial",
        b,
        "BadSignature",
        "the serial edited after signing",
    );
    list(
        "names-site-key",
        keys_file("root", &keys_body("root", 1, &["site-a"])),
        "Invalid",
        "a site key listed as an hq key",
    );
    list(
        "names-nothing",
        keys_file("root", &keys_body("root", 1, &[])),
        "Invalid",
        "an empty list of hq keys",
    );
    list(
        "key-id-mismatch",
        keys_file(
            "root",
            &good.replacen(
                &key("hq").public().key_id_hex(),
                &key("site-b").public().key_id_hex(),
                1,
            ),
        ),
        "Invalid",
        "a listed key whose key_id is another key's",
    );
    list(
        "unknown-field-escape",
        keys_file(
            "root",
            &good.replacen('{', "{\"\\u001b]0;pwned\\u0007\":1,", 1),
        ),
        "Invalid",
        "an unknown field whose name holds an OSC escape sequence",
    );
    list(
        "revocation-domain-signature",
        signed_file(KEYS_MAGIC, 1, REV_DOMAIN_V2, "root", good.as_bytes()),
        "BadSignature",
        "the body signed under the revocation-list domain",
    );
    let mut b = keys_file("root", &good);
    b[8] = 2;
    list("version-2", b, "UnsupportedVersion", "format version 2");
    let b = keys_file("root", &good);
    list(
        "truncated",
        b[..b.len() - 1].to_vec(),
        "Malformed",
        "last byte missing",
    );
    list("empty", vec![], "TooShort", "zero-byte file");
    list(
        "revocation-list-offered",
        rev_file("hq", rev_body("hq", 1, &[]).as_bytes()),
        "WrongMagic",
        "a revocation list offered as a list of hq keys",
    );
}

fn rev_body(signer: &str, serial: u64, revoked: &[(&str, &str)]) -> String {
    let (_, role, id, _) = KEYS.iter().find(|k| k.0 == signer).expect("key");
    let entries: Vec<String> = revoked
        .iter()
        .map(|(stem, reason)| {
            let k = key(stem);
            format!(
                "{{\"key_id\":\"{}\",\"role\":\"{}\",\"id\":\"{}\",\"reason\":\"{}\"}}",
                k.public().key_id_hex(),
                k.role(),
                k.id(),
                reason
            )
        })
        .collect();
    format!(
        "{{\"format\":1,\"federation\":\"{FEDERATION}\",\"serial\":{serial},\"created\":{CREATED},\"signer\":{{\"role\":\"{role}\",\"id\":\"{id}\",\"key_id\":\"{}\"}},\"revoked\":[{}]}}",
        key(signer).public().key_id_hex(),
        entries.join(",")
    )
}

fn rev_file(signer: &str, body: &[u8]) -> Vec<u8> {
    signed_file(REV_MAGIC, 1, REV_DOMAIN, signer, body)
}

/// A small signed file (the envelope of `src/envelope.rs`, written independently here).
fn signed_file(magic: &[u8; 8], version: u16, domain: &[u8], signer: &str, body: &[u8]) -> Vec<u8> {
    use ed25519_dalek::Signer as _;
    let sk = ed25519_dalek::SigningKey::from_bytes(&seed_of(signer));
    let mut msg = domain.to_vec();
    msg.extend_from_slice(body);
    let sig = sk.sign(&msg).to_bytes();
    let mut out = magic.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&key(signer).public().key_id());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&sig);
    out
}

fn revocations(kit: &mut Kit) {
    let c = "revocation";
    let mut rev = |name: &str, bytes: Vec<u8>, trust: &str, expect: &str, comment: &str| {
        let name = format!("{c}-{name}.ferry-rev");
        kit.file(&name, bytes);
        kit.row(&name, "revocation", trust, expect, "-", comment);
    };
    let good = rev_body(
        "hq",
        3,
        &[
            ("site-c", "stick lost on 2023-11-10"),
            ("site-b", "laptop stolen"),
        ],
    );
    rev(
        "valid-two-keys",
        rev_file("hq", good.as_bytes()),
        STD,
        "ok:2",
        "hq revokes site-c and site-b",
    );
    rev(
        "valid-empty",
        rev_file("hq", rev_body("hq", 1, &[]).as_bytes()),
        STD,
        "ok:0",
        "an empty list (serial 1)",
    );
    rev(
        "site-signed",
        rev_file(
            "site-a",
            rev_body("site-a", 1, &[("site-b", "x")]).as_bytes(),
        ),
        STD,
        "NotHq",
        "a site key signs a list",
    );
    rev(
        "rogue-hq",
        rev_file(
            "rogue-hq",
            good.replace(
                &key("hq").public().key_id_hex(),
                &key("rogue-hq").public().key_id_hex(),
            )
            .as_bytes(),
        ),
        STD,
        "UntrustedKey",
        "an untrusted hq key signs a list",
    );
    rev(
        "signer-revoked",
        rev_file("hq", good.as_bytes()),
        "hq+!hq",
        "RevokedKey",
        "the signing hq key is itself revoked",
    );
    rev(
        "revokes-its-signer",
        rev_file("hq", rev_body("hq", 2, &[("hq", "rotating")]).as_bytes()),
        STD,
        "Invalid",
        "a list revoking the key that signs it (use the new hq key)",
    );
    rev(
        "duplicate-entry",
        rev_file(
            "hq",
            rev_body("hq", 2, &[("site-b", "a"), ("site-b", "b")]).as_bytes(),
        ),
        STD,
        "Invalid",
        "the same key id twice",
    );
    rev(
        "unknown-field",
        rev_file("hq", good.replacen('{', "{\"unrevoke\":[],", 1).as_bytes()),
        STD,
        "Invalid",
        "an extra field (deny_unknown_fields)",
    );
    rev(
        "bad-key-id",
        rev_file(
            "hq",
            good.replacen(&key("site-b").public().key_id_hex(), "XYZ", 1)
                .as_bytes(),
        ),
        STD,
        "Invalid",
        "a key id that is not 16 hex digits",
    );
    let mut b = rev_file("hq", good.as_bytes());
    let at = 24 + good.find("laptop").expect("reason");
    b[at] = b'L';
    rev(
        "edited-after-signing",
        b,
        STD,
        "BadSignature",
        "a reason edited after signing",
    );
    let mut b = rev_file("hq", good.as_bytes());
    let n = b.len();
    b[n - 64..].fill(0);
    rev(
        "zeroed-signature",
        b,
        STD,
        "BadSignature",
        "signature all zeros",
    );
    let bundle_sig = {
        // A bundle-domain signature over the list body: domain separation refuses it.
        let mut b = assemble(good.as_bytes(), &key("hq"), &[]);
        let sig = b.split_off(b.len() - 64);
        let mut out = rev_file("hq", good.as_bytes());
        let n = out.len();
        out[n - 64..].copy_from_slice(&sig);
        out
    };
    rev(
        "bundle-domain-signature",
        bundle_sig,
        STD,
        "BadSignature",
        "the body signed under the bundle domain instead",
    );
    let b = rev_file("hq", good.as_bytes());
    rev(
        "truncated",
        b[..b.len() - 1].to_vec(),
        STD,
        "Malformed",
        "last byte missing",
    );
    let mut b = rev_file("hq", good.as_bytes());
    b.push(0);
    rev(
        "trailing-byte",
        b,
        STD,
        "Malformed",
        "one byte after the signature",
    );
    rev("empty", vec![], STD, "TooShort", "zero-byte file");
    let mut b = rev_file("hq", good.as_bytes());
    b[..8].copy_from_slice(b"FERRYBDL");
    rev("wrong-magic", b, STD, "WrongMagic", "a bundle magic");
    let mut b = rev_file("hq", good.as_bytes());
    b[8] = 3;
    rev(
        "version-3",
        b,
        STD,
        "UnsupportedVersion",
        "format version 3",
    );

    // Version 2 (issue 15 §2): an expiry and withdrawn bundles, under its own signature domain.
    let v2 = |body: &str| signed_file(REV_MAGIC, 2, REV_DOMAIN_V2, "hq", body.as_bytes());
    let bundles = format!(
        ",\"bundles\":[{{\"sha256\":\"{}\",\"reason\":\"poisoned global\"}}]",
        "ab".repeat(32)
    );
    let good2 = good
        .replacen("\"format\":1", "\"format\":2", 1)
        .replacen(
            "\"signer\"",
            &format!("\"expires\":{},\"signer\"", CREATED + 86_400),
            1,
        )
        .trim_end_matches('}')
        .to_string()
        + &bundles
        + "}";
    rev(
        "valid-v2-keys-and-bundles",
        v2(&good2),
        STD,
        "ok:2",
        "a version-2 list: two keys, one withdrawn bundle, an expiry",
    );
    rev(
        "v2-without-expires",
        v2(&good2.replacen(&format!("\"expires\":{},", CREATED + 86_400), "", 1)),
        STD,
        "Invalid",
        "a version-2 list that does not say when it expires",
    );
    rev(
        "v2-bad-bundle-hash",
        v2(&good2.replacen(&"ab".repeat(32), &"AB".repeat(32), 1)),
        STD,
        "Invalid",
        "a withdrawn bundle hash in upper case",
    );
    rev(
        "v1-with-bundles",
        rev_file(
            "hq",
            (good.trim_end_matches('}').to_string() + &bundles + "}").as_bytes(),
        ),
        STD,
        "Invalid",
        "a version-1 list carrying the version-2 field bundles",
    );
    rev(
        "v2-body-under-v1-header",
        rev_file("hq", good2.as_bytes()),
        STD,
        "Invalid",
        "a version-2 body signed and labelled as version 1",
    );
    let mut b = v2(&good2);
    b[8] = 1;
    rev(
        "v2-relabelled-v1",
        b,
        STD,
        "BadSignature",
        "a version-2 list whose header says version 1: the domains differ",
    );
    rev(
        "v2-unknown-field-escape",
        v2(&good2.replacen('{', "{\"\\u001b[31mred\":1,", 1)),
        STD,
        "Invalid",
        "an unknown field whose name holds an escape sequence (the message must not carry it raw)",
    );
    let mut b = rev_file("hq", good.as_bytes());
    b[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    rev(
        "body-length-4gib",
        b,
        STD,
        "Malformed",
        "body length 0xFFFFFFFF",
    );
}

/// Write the kit into `dir` (which must exist): vectors, `keys/*.pub` and `expectations.tsv`.
pub fn write(dir: &Path) -> std::io::Result<()> {
    let kit = build();
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys)?;
    for (stem, ..) in KEYS {
        std::fs::write(
            keys.join(format!("{stem}.pub")),
            key(stem).public().to_file_text(),
        )?;
    }
    std::fs::write(keys.join("weak.pub"), weak_pub_text())?;
    for (name, bytes) in &kit.files {
        std::fs::write(dir.join(name), bytes)?;
    }
    std::fs::write(dir.join("expectations.tsv"), kit.table())
}

/// The kit's directory in the source tree.
pub fn kit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("testkit")
}

fn main() -> std::io::Result<()> {
    let dir = kit_dir();
    // Start clean so a renamed vector does not leave its old file behind.
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    write(&dir)?;
    let kit = build();
    let total: usize = kit.files.iter().map(|(_, b)| b.len()).sum();
    println!(
        "wrote {} vectors ({} bytes) and {} expectations to {}",
        kit.files.len(),
        total,
        kit.rows.len(),
        dir.display()
    );
    Ok(())
}

// ---- encrypted (format 3, issue 15 §5) ----
//
// The age crate draws its file key, ephemeral keys and nonce from the operating system, so `seal` cannot make a
// committed vector twice. The encrypted vectors are therefore written by an age v1 writer of the generator's own
// (https://age-encryption.org/v1: X25519 stanzas, header MAC, STREAM), from the spec and with fixed "random"
// bytes from the SplitMix64: deterministic like the rest of the kit, and a second implementation of age that the
// reader (the age crate) must agree with. Fixed randomness is what a test vector needs and what no real
// encryption may ever use.

/// HMAC-SHA-256 (RFC 2104).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    let mut out = [0u8; 32];
    out.copy_from_slice(&outer.finalize());
    out
}

/// HKDF-SHA-256 (RFC 5869) with 32 bytes of output.
fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[u8]) -> [u8; 32] {
    let prk = hmac_sha256(salt, ikm);
    let mut t = info.to_vec();
    t.push(1);
    hmac_sha256(&prk, &t)
}

/// Base64, standard alphabet, no padding (age's encoding).
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let byte = |i: usize| u32::from(*c.get(i).unwrap_or(&0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..=c.len() {
            s.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    s
}

fn chacha(key: &[u8; 32], nonce: &[u8; 12], plain: &[u8]) -> Vec<u8> {
    use chacha20poly1305::aead::{Aead, KeyInit};
    chacha20poly1305::ChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(key))
        .encrypt(chacha20poly1305::Nonce::from_slice(nonce), plain)
        .expect("ChaCha20-Poly1305 encrypts any length the kit uses")
}

/// What to break in an age file the kit writes (the ciphertext hash is then signed over the broken file).
#[derive(Default, Clone, Copy)]
struct AgeFault {
    /// A header MAC that is not the file key's.
    mac: bool,
    /// One flipped bit in the first STREAM chunk's ciphertext.
    stream: bool,
}

/// An age v1 file of `plain` to the X25519 `recipients` (u-coordinates), randomness from `rng`.
fn age_file(plain: &[u8], recipients: &[[u8; 32]], rng: &mut Rng, fault: AgeFault) -> Vec<u8> {
    use curve25519_dalek::montgomery::MontgomeryPoint;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n.div_ceil(8))
            .flat_map(|_| rng.next().to_le_bytes())
            .take(n)
            .collect()
    };
    let file_key = random(16);
    let mut header = String::from("age-encryption.org/v1\n");
    for r in recipients {
        let e: [u8; 32] = random(32).try_into().expect("32 bytes");
        let share = MontgomeryPoint::mul_base_clamped(e).to_bytes();
        let shared = MontgomeryPoint(*r).mul_clamped(e).to_bytes();
        let salt = [share, *r].concat();
        let wrap = hkdf_sha256(&shared, &salt, b"age-encryption.org/v1/X25519");
        let body = chacha(&wrap, &[0; 12], &file_key);
        header.push_str(&format!("-> X25519 {}\n{}\n", b64(&share), b64(&body)));
    }
    header.push_str("---");
    let mut mac = hmac_sha256(&hkdf_sha256(&file_key, &[], b"header"), header.as_bytes());
    if fault.mac {
        mac[0] ^= 1;
    }
    let mut out = format!("{header} {}\n", b64(&mac)).into_bytes();
    let nonce = random(16);
    out.extend_from_slice(&nonce);
    let key = hkdf_sha256(&file_key, &nonce, b"payload");
    let chunks: Vec<&[u8]> = if plain.is_empty() {
        vec![&[]]
    } else {
        plain.chunks(64 << 10).collect()
    };
    for (i, c) in chunks.iter().enumerate() {
        let mut n = [0u8; 12];
        n[3..11].copy_from_slice(&(i as u64).to_be_bytes());
        n[11] = u8::from(i + 1 == chunks.len());
        let mut sealed = chacha(&key, &n, c);
        if fault.stream && i == 0 {
            sealed[0] ^= 1;
        }
        out.extend_from_slice(&sealed);
    }
    out
}

/// The X25519 u-coordinate of a kit key (its age recipient, `docs/bundle-format.md` §8.8).
fn x25519_of(stem: &str) -> [u8; 32] {
    key(stem)
        .public()
        .verifying_key()
        .to_montgomery()
        .to_bytes()
}

/// How `manifest`'s signer encrypts its payload: to `named` (in the manifest) with an age file to `actual`.
struct Sealing<'a> {
    named: &'a [&'a str],
    actual: &'a [&'a str],
    fault: AgeFault,
    seed: u64,
}

/// A format-3 bundle signed by `k`: `m` (payload fields pointed at `plain`/`frame`), encrypted to `s.named` in
/// the manifest and to `s.actual` in the age file, whose plaintext is `encrypted` (normally `frame`).
fn encrypted_bundle(
    m: &Manifest,
    k: &SecretKey,
    plain: &[u8],
    frame: &[u8],
    encrypted: &[u8],
    s: &Sealing<'_>,
) -> Vec<u8> {
    let actual: Vec<[u8; 32]> = s.actual.iter().map(|stem| x25519_of(stem)).collect();
    let region = age_file(encrypted, &actual, &mut Rng(s.seed), s.fault);
    let mut m = m.clone();
    describe(&mut m, plain, frame);
    m.format = 3;
    m.encryption = Some(Encryption {
        scheme: "age-x25519".into(),
        recipients: s
            .named
            .iter()
            .map(|stem| {
                let p = key(stem).public();
                EncryptedTo {
                    role: p.role,
                    id: p.id.clone(),
                    key_id: p.key_id_hex(),
                    recipient: p.recipient_text(),
                }
            })
            .collect(),
        len: region.len() as u64,
        sha256: sha256_hex(&region),
    });
    assemble_version(3, &json(&m), k, &region)
}

/// Flip one bit of `bytes` at `at`.
fn flipped(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 1;
    b
}

fn encrypted(kit: &mut Kit, upd: &ferry_bundle::Sealed) {
    const WITH_HQ: &str = "hq+site-a+site-b+id=hq";
    let site_a = key("site-a");
    let hq = key("hq");
    let model = Model::new(0.25).payload();
    let frame = compress(model.bytes(), LEVEL).expect("compress");
    let honest = Sealing {
        named: &["hq"],
        actual: &["hq"],
        fault: AgeFault::default(),
        seed: 0xA9E,
    };
    let u = encrypted_bundle(
        &upd.manifest,
        &site_a,
        model.bytes(),
        &frame,
        &frame,
        &honest,
    );
    let start = 8 + u32::from_le_bytes(u[4..8].try_into().expect("4 bytes")) as usize;
    kit.bundle(
        "encrypted-valid-update-to-hq",
        u.clone(),
        WITH_HQ,
        &ok(model.bytes()),
        "ok",
        "site-a's update encrypted to HQ (format 3), read with HQ's identity",
    );
    kit.bundle(
        "encrypted-update-no-identity",
        u.clone(),
        STD,
        "Encrypted",
        "ok",
        "the same update read without any identity: refused before the payload, naming the recipients",
    );
    kit.bundle(
        "encrypted-update-wrong-identity",
        u.clone(),
        "hq+site-a+site-b+id=site-b",
        "NotARecipient",
        "ok",
        "the same update read with site-b's identity, which it is not encrypted to",
    );
    kit.bundle(
        "encrypted-update-version-relabelled-2",
        {
            let mut b = u.clone();
            b[16] = 2;
            b
        },
        WITH_HQ,
        "BadSignature",
        "ok-manifest-invalid",
        "header version 3 → 2: the v2 signature domain does not verify (and a format-2 manifest has no encryption)",
    );
    for (what, at, expect) in [
        ("age-header", start + 30, "PayloadHash"),
        ("stream", start + (u.len() - start) * 3 / 4, "PayloadHash"),
        ("last-tag", u.len() - 1, "PayloadHash"),
    ] {
        kit.bundle(
            &format!("encrypted-ciphertext-flipped-{what}"),
            flipped(&u, at),
            WITH_HQ,
            expect,
            "ok",
            &format!(
                "one bit of the age file flipped ({what}): refused by the signed ciphertext hash, before age sees it"
            ),
        );
    }
    kit.bundle(
        "encrypted-ciphertext-truncated",
        u[..u.len() - 1].to_vec(),
        WITH_HQ,
        "PayloadLength",
        "ok",
        "the age file's last byte cut off",
    );
    kit.bundle(
        "encrypted-ciphertext-extra-byte",
        [u.as_slice(), &[0]].concat(),
        WITH_HQ,
        "PayloadLength",
        "ok",
        "one byte after the age file",
    );
    let text = String::from_utf8_lossy(&u[32..start - 64]).to_string();
    let in_list = 32 + text.find("\"recipient\":\"age1").expect("recipient") + 20;
    kit.bundle(
        "encrypted-recipient-list-edited",
        flipped(&u, in_list),
        WITH_HQ,
        "BadSignature",
        "ok-manifest-invalid",
        "one character of the signed recipient list changed after signing",
    );
    kit.bundle(
        "encrypted-to-another-key-than-named",
        encrypted_bundle(
            &upd.manifest,
            &site_a,
            model.bytes(),
            &frame,
            &frame,
            &Sealing {
                actual: &["site-c"],
                ..honest
            },
        ),
        WITH_HQ,
        "Decrypt",
        "ok",
        "validly signed, names HQ, but the age file is encrypted to site-c: HQ's identity does not decrypt it",
    );
    let other = compress(Model::new(0.75).payload().bytes(), LEVEL).expect("compress");
    kit.bundle(
        "encrypted-plaintext-not-the-signed-frame",
        encrypted_bundle(
            &upd.manifest,
            &site_a,
            model.bytes(),
            &frame,
            &other,
            &honest,
        ),
        WITH_HQ,
        "DecryptedHash",
        "ok",
        "validly signed, the age file decrypts, but to another zstd frame than payload.compressed_sha256 names",
    );
    for (what, fault) in [
        (
            "header-mac-wrong",
            AgeFault {
                mac: true,
                ..AgeFault::default()
            },
        ),
        (
            "stream-chunk-forged",
            AgeFault {
                stream: true,
                ..AgeFault::default()
            },
        ),
    ] {
        kit.bundle(
            &format!("encrypted-{what}"),
            encrypted_bundle(
                &upd.manifest,
                &site_a,
                model.bytes(),
                &frame,
                &frame,
                &Sealing { fault, ..honest },
            ),
            WITH_HQ,
            "Decrypt",
            "ok",
            &format!("validly signed over an age file whose {what}: age refuses it"),
        );
    }

    // A global to two sites and HQ, more than one 64 KiB STREAM chunk, read by site-b.
    let mut rng = Rng(0x5EED);
    let noise: Vec<u8> = (0..20_000)
        .flat_map(|_| ((rng.next() >> 40) as f32 / 1e6).to_le_bytes())
        .collect();
    let big = Payload::from_tensors(&[TensorRef {
        name: "fc.weight",
        dtype: Dtype::F32,
        shape: &[100, 200],
        data: &noise,
    }])
    .expect("payload");
    let big_frame = compress(big.bytes(), LEVEL).expect("compress");
    assert!(big_frame.len() > 64 << 10, "two STREAM chunks");
    let g = seal(draft_global(0, None, vec![]), &big, &hq, LEVEL).expect("global");
    kit.bundle(
        "encrypted-valid-global-to-two-sites",
        encrypted_bundle(
            &g.manifest,
            &hq,
            big.bytes(),
            &big_frame,
            &big_frame,
            &Sealing {
                named: &["site-a", "site-b", "hq"],
                actual: &["site-a", "site-b", "hq"],
                fault: AgeFault::default(),
                seed: 0x61,
            },
        ),
        "hq+id=site-b",
        &ok(big.bytes()),
        "ok",
        "a global encrypted to site-a, site-b and HQ (two STREAM chunks), read with site-b's identity",
    );

    // Manifests that break rule 1a, validly signed over an honest age file.
    let manifest_case = |named: Vec<EncryptedTo>, scheme: &str, format: u32| {
        let region = age_file(&frame, &[x25519_of("hq")], &mut Rng(7), AgeFault::default());
        let mut m = upd.manifest.clone();
        describe(&mut m, model.bytes(), &frame);
        m.format = format;
        m.encryption = Some(Encryption {
            scheme: scheme.into(),
            recipients: named,
            len: region.len() as u64,
            sha256: sha256_hex(&region),
        });
        assemble_version(format as u16, &json(&m), &site_a, &region)
    };
    let to = |stem: &str| {
        let p = key(stem).public();
        EncryptedTo {
            role: p.role,
            id: p.id.clone(),
            key_id: p.key_id_hex(),
            recipient: p.recipient_text(),
        }
    };
    let upper = EncryptedTo {
        recipient: to("hq").recipient.to_uppercase(),
        ..to("hq")
    };
    for (what, named, scheme, format, comment) in [
        (
            "no-recipients",
            vec![],
            "age-x25519",
            3,
            "an encryption naming no recipient",
        ),
        (
            "recipient-twice",
            vec![to("hq"), to("hq")],
            "age-x25519",
            3,
            "HQ listed twice",
        ),
        (
            "recipient-upper-case",
            vec![upper],
            "age-x25519",
            3,
            "a recipient in upper case (age writes lower case)",
        ),
        (
            "scheme-escape",
            vec![to("hq")],
            "age\u{1b}[31m-x25519",
            3,
            "an unknown scheme holding an escape sequence (the message must escape it)",
        ),
        (
            "format-2-with-encryption",
            vec![to("hq")],
            "age-x25519",
            2,
            "a format-2 bundle (v2 domain) whose manifest holds encryption, an unknown field there",
        ),
    ] {
        kit.bundle(
            &format!("encrypted-manifest-{what}"),
            manifest_case(named, scheme, format),
            "hq+site-a+site-b+id=hq",
            "InvalidManifest",
            "ok-manifest-invalid",
            comment,
        );
    }
    let mut m = upd.manifest.clone();
    describe(&mut m, model.bytes(), &frame);
    m.format = 3;
    kit.bundle(
        "encrypted-manifest-format-3-without-encryption",
        assemble_version(3, &json(&m), &site_a, &frame),
        STD,
        "InvalidManifest",
        "ok-manifest-invalid",
        "a format-3 bundle over a clear payload whose manifest describes no encryption",
    );
}
