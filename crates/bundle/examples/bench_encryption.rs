//! What encrypting the payload costs (issue 15 §5): seal, verify and unpack a model of N MiB in the clear and
//! encrypted to one recipient, through real files, on the library calls the tools use.
//!
//! `cargo run --release -p ferry-bundle --example bench_encryption -- 256` (the size in MiB; default 256).
//! The model is F32 values with the entropy of trained weights (a fixed-seed generator's mantissas), so zstd
//! compresses it about as much as a real model. Prints one line per step and a JSON summary.

use std::time::Instant;

use ferry_bundle::{
    identify_file, open_file_into, seal, Draft, Dtype, Keyring, Payload, Role, SecretKey, TensorRef,
};

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("size in MiB"))
        .unwrap_or(256);
    let n = mib * (1 << 20) / 4;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..n)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Small weights around zero: sign, a narrow exponent range, a random mantissa.
            let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
            x.to_le_bytes()
        })
        .collect();
    let payload = Payload::from_tensors(&[TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[n],
        data: &data,
    }])
    .expect("payload");
    drop(data);
    let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]);
    let site = SecretKey::from_seed(Role::Site, "site-a", [2; 32]);
    let mut ring = Keyring::new();
    ring.add(site.public()).expect("key");
    ring.add_identity(&hq);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rows = Vec::new();
    for (label, encrypt_to) in [("clear", vec![]), ("encrypted", vec![hq.public()])] {
        let sub = dir.path().join(label);
        let t = Instant::now();
        let draft = Draft {
            encrypt_to,
            ..Draft::update("bench", None, 0, &"ab".repeat(32), "site-a", 1)
        };
        let sealed = seal(draft, &payload, &site, 3).expect("seal");
        let path = sealed.write_to_dir(&sub).expect("write");
        let pack = t.elapsed().as_secs_f64();
        let size = sealed.bytes.len();
        drop(sealed);
        let t = Instant::now();
        identify_file(&path, &ring).expect("identify");
        let identify = t.elapsed().as_secs_f64();
        let t = Instant::now();
        open_file_into(&path, &ring, std::io::sink()).expect("verify");
        let verify = t.elapsed().as_secs_f64();
        let out = sub.join("model.safetensors");
        let t = Instant::now();
        ferry_bundle::fsutil::write_new_with(&out, |f| {
            open_file_into(&path, &ring, std::io::BufWriter::new(f)).map(|_| ())
        })
        .expect("unpack");
        let unpack = t.elapsed().as_secs_f64();
        println!(
            "{label:<9} {mib} MiB model: bundle {size} bytes; pack {pack:.2} s, verify (signature + hash only) \
             {identify:.2} s, verify {verify:.2} s, unpack {unpack:.2} s"
        );
        rows.push(
            serde_json::json!({"payload": label, "model_mib": mib, "bundle_bytes": size,
            "pack_s": pack, "identify_s": identify, "verify_s": verify, "unpack_s": unpack}),
        );
    }
    println!("{}", serde_json::Value::Array(rows));
}
