//! Format interop: bundles made by ferry are read by tools that share no code with it.
//!
//! - `scripts/ferry_verify.py`, the independent reader written from `docs/bundle-format.md`, accepts a real bundle
//!   and refuses it with one byte flipped;
//! - the payload `ferry-client unpack` writes loads with `safetensors.numpy` and `safetensors.torch` with the values
//!   that were packed, for every dtype we test;
//! - a safetensors file written by Python the way PyTorch writes one (with `__metadata__`) ships through
//!   `ferry-client pack` and comes back with the same tensors;
//! - plain `zstd -d` yields the safetensors payload;
//! - an encrypted (format 3) bundle: the independent reader decrypts it with the age identity file
//!   `ferry-client age-identity` writes (through `pyrage`), after checking the signature and the ciphertext's
//!   hash, and the standard `age` CLI plus `zstd -d` yield the payload exactly as docs/bundle-format.md §6a says.
//!
//! Needs a Python with numpy, safetensors, cryptography, zstandard, pyrage and torch, and the `zstd` and `age`
//! CLIs: `scripts/test.sh` sets them up without root (a `.venv/` and Debian's `zstd` and `age` unpacked under
//! `target/test-data/`), and
//! `ferry_testdata` says where the test looks. Without them the test fails; it never skips (issue 17).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_bundle::{Draft, Dtype, Payload, Role, SecretKey, TensorRef};

fn client() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry-client"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn verifier() -> PathBuf {
    repo_root().join("scripts/ferry_verify.py")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn ok(o: Output) -> Output {
    assert!(o.status.success(), "command failed: {}", text(&o));
    o
}

/// The Python interpreter, after checking it has every module the interop checks import; panics with the setup
/// command when one is missing.
fn python_checked() -> std::ffi::OsString {
    ferry_testdata::python_with(
        "cryptography, zstandard, numpy, safetensors.numpy, safetensors.torch, torch",
    )
}

fn python(code: &str, args: &[&Path]) -> Output {
    run(Command::new(ferry_testdata::python())
        .arg("-c")
        .arg(code)
        .args(args))
}

fn le_bytes<T: Copy, const N: usize>(xs: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    xs.iter().flat_map(|&x| f(x)).collect()
}

/// Values packed into the global; the Python checks below repeat them literally.
const W: [f32; 6] = [0.5, -1.25, 3.0, 1e-3, -7.5, 100.0];
/// F16 bit patterns of 1.0, -2.0, 0.5, 65504.0.
const H: [u16; 4] = [0x3c00, 0xc000, 0x3800, 0x7bff];
/// BF16 bit patterns of 1.0, -2.0, 3.0.
const B: [u16; 3] = [0x3f80, 0xc000, 0x4040];
const STEPS: i64 = 7;
const U: [u8; 5] = [0, 1, 127, 128, 255];

fn write_global(
    hq: &SecretKey,
    federation: &str,
    tensors: &[TensorRef<'_>],
    out: &Path,
) -> (PathBuf, Vec<u8>) {
    let payload = Payload::from_tensors(tensors).unwrap();
    let sealed = ferry_bundle::seal(Draft::initial(federation, None), &payload, hq, 3).unwrap();
    (sealed.write_to_dir(out).unwrap(), payload.bytes().to_vec())
}

const CHECK_VALUES: &str = r#"
import sys, json, struct
import numpy as np
from safetensors import safe_open
path = sys.argv[1]
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
assert n % 8 == 0 and "__metadata__" not in header, header
assert list(header) == sorted(header), list(header)
data = raw[8 + n:]

# BF16 is not a numpy dtype (safetensors.numpy.load_file refuses the whole file for it): check it through the
# raw header and bytes.
e = header["proj.bf16"]
assert e["dtype"] == "BF16" and e["shape"] == [3], e
a, b = e["data_offsets"]
bits = struct.unpack("<3H", data[a:b])
assert bits == (0x3f80, 0xc000, 0x4040), bits
assert (np.array(bits, dtype=np.uint32) << 16).view(np.float32).tolist() == [1.0, -2.0, 3.0]

# Everything else through safetensors' numpy loader (what load_file does, tensor by tensor).
with safe_open(path, framework="numpy") as f:
    assert sorted(f.keys()) == ["bn.num_batches_tracked", "conv.weight", "emb.bytes", "head.half", "proj.bf16"]
    t = {k: f.get_tensor(k) for k in f.keys() if k != "proj.bf16"}
w = t["conv.weight"]
assert w.dtype == np.float32 and w.shape == (2, 3), (w.dtype, w.shape)
assert w.tolist() == np.array([[0.5, -1.25, 3.0], [1e-3, -7.5, 100.0]], dtype=np.float32).tolist(), w
h = t["head.half"]
assert h.dtype == np.float16 and h.shape == (4,) and h.tolist() == [1.0, -2.0, 0.5, 65504.0], h
s = t["bn.num_batches_tracked"]
assert s.dtype == np.int64 and s.shape == () and int(s) == 7, (s.dtype, s.shape, s)
u = t["emb.bytes"]
assert u.dtype == np.uint8 and u.tolist() == [0, 1, 127, 128, 255], u
print("numpy ok")
"#;

const CHECK_TORCH: &str = r#"
import sys
import torch
from safetensors.torch import load_file
t = load_file(sys.argv[1])
assert t["conv.weight"].dtype == torch.float32 and t["conv.weight"].shape == (2, 3)
assert t["conv.weight"].flatten().tolist() == torch.tensor([0.5, -1.25, 3.0, 1e-3, -7.5, 100.0]).tolist()
assert t["head.half"].dtype == torch.float16 and t["head.half"].tolist() == [1.0, -2.0, 0.5, 65504.0]
assert t["proj.bf16"].dtype == torch.bfloat16 and t["proj.bf16"].tolist() == [1.0, -2.0, 3.0]
assert t["bn.num_batches_tracked"].dtype == torch.int64 and t["bn.num_batches_tracked"].dim() == 0
assert int(t["bn.num_batches_tracked"]) == 7
assert t["emb.bytes"].dtype == torch.uint8 and t["emb.bytes"].tolist() == [0, 1, 127, 128, 255]
print("torch ok")
"#;

/// The tensors a PyTorch site would save: written by numpy, in insertion (not sorted) order, with the
/// `{"format": "pt"}` metadata `safetensors.torch.save_file` adds.
const WRITE_STATE_DICT: &str = r#"
import sys
import numpy as np
from safetensors.numpy import save_file
rng = np.random.default_rng(1234)
sd = {
    "fc2.weight": rng.standard_normal((4, 3)).astype(np.float32),
    "fc1.bias": rng.standard_normal(3).astype(np.float16),
    "bn.num_batches_tracked": np.array(42, dtype=np.int64),
    "fc1.weight": rng.standard_normal((3, 5)).astype(np.float32),
    "mask": np.array([1, 0, 1, 1], dtype=np.uint8),
}
save_file(sd, sys.argv[1], metadata={"format": "pt"})
np.savez(sys.argv[2], **sd)
"#;

const COMPARE_STATE_DICT: &str = r#"
import sys, json, struct
import numpy as np
from safetensors.numpy import load_file
got = load_file(sys.argv[1])
want = dict(np.load(sys.argv[2]))
assert sorted(got) == sorted(want), (sorted(got), sorted(want))
for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    assert got[k].tobytes() == want[k].tobytes(), k
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
assert "__metadata__" not in header and list(header) == sorted(header), header
print("state_dict ok")
"#;

#[test]
fn bundles_interoperate_with_python_and_zstd() {
    let py = python_checked();
    let zstd = ferry_testdata::program("zstd");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = d.join("keys");
    let bundles = d.join("bundles");

    // Keys: HQ through the library (ferry-server's binary is not available to this crate's tests), the site
    // through `ferry-client keygen`.
    let hq = SecretKey::generate(Role::Hq, "hq").unwrap();
    let (_, hq_pub) = hq.write_pair(&keys).unwrap();
    ok(run(client()
        .args(["keygen", "--id", "site-a", "--out"])
        .arg(&keys)));
    let site_pub = keys.join("site-a.pub");
    let site_key = keys.join("site-a.key");

    // A global holding F32, F16, BF16, a rank-0 I64 and U8.
    let w = le_bytes(&W, f32::to_le_bytes);
    let h = le_bytes(&H, u16::to_le_bytes);
    let b = le_bytes(&B, u16::to_le_bytes);
    let s = STEPS.to_le_bytes();
    let (global, payload) = write_global(
        &hq,
        "interop",
        &[
            TensorRef {
                name: "conv.weight",
                dtype: Dtype::F32,
                shape: &[2, 3],
                data: &w,
            },
            TensorRef {
                name: "head.half",
                dtype: Dtype::F16,
                shape: &[4],
                data: &h,
            },
            TensorRef {
                name: "proj.bf16",
                dtype: Dtype::BF16,
                shape: &[3],
                data: &b,
            },
            TensorRef {
                name: "bn.num_batches_tracked",
                dtype: Dtype::I64,
                shape: &[],
                data: &s,
            },
            TensorRef {
                name: "emb.bytes",
                dtype: Dtype::U8,
                shape: &[5],
                data: &U,
            },
        ],
        &bundles,
    );
    assert_eq!(global.file_name().unwrap(), "global-r0.ferry");

    // (a) The independent reader accepts it, writes the same payload, and refuses every tampered copy.
    let py_out = d.join("py.safetensors");
    let o = ok(run(Command::new(&py)
        .arg(verifier())
        .arg("--trust")
        .arg(&hq_pub)
        .arg(&global)
        .arg("--out")
        .arg(&py_out)));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.starts_with("OK"), "{stdout}");
    assert!(
        stdout.contains("interop") && stdout.contains("proj.bf16"),
        "{stdout}"
    );
    assert_eq!(std::fs::read(&py_out).unwrap(), payload);

    let bytes = std::fs::read(&global).unwrap();
    let manifest_len = u32::from_le_bytes(bytes[28..32].try_into().unwrap()) as usize;
    let flips = [
        ("version", 16),
        ("key id", 20),
        ("manifest", 32 + manifest_len / 2),
        ("signature", 32 + manifest_len + 40),
        ("payload", bytes.len() - 10),
        ("payload checksum", bytes.len() - 1),
    ];
    for (what, at) in flips {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        let path = d.join(format!("flipped-{at}.ferry"));
        std::fs::write(&path, &bad).unwrap();
        let o = run(Command::new(&py)
            .arg(verifier())
            .arg("--trust")
            .arg(&hq_pub)
            .arg(&path));
        assert_eq!(
            o.status.code(),
            Some(1),
            "a flipped {what} byte (offset {at}) must be refused: {}",
            text(&o)
        );
        // The Rust reader agrees.
        let o = run(client()
            .arg("verify")
            .arg("--trust")
            .arg(&hq_pub)
            .arg(&path));
        assert_eq!(o.status.code(), Some(1), "{what}: {}", text(&o));
    }
    let truncated = d.join("truncated.ferry");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1]).unwrap();
    let o = run(Command::new(&py)
        .arg(verifier())
        .arg("--trust")
        .arg(&hq_pub)
        .arg(&truncated));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // Signed, but by a key the operator did not name.
    let o = run(Command::new(&py)
        .arg(verifier())
        .arg("--trust")
        .arg(&site_pub)
        .arg(&global));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("not among your trusted keys"));

    // (b) `unpack` writes a plain safetensors file that numpy's safetensors reads with the packed values.
    let unpacked = d.join("model.safetensors");
    ok(run(client()
        .arg("unpack")
        .arg("--trust")
        .arg(&hq_pub)
        .arg(&global)
        .arg("--out")
        .arg(&unpacked)));
    assert_eq!(std::fs::read(&unpacked).unwrap(), payload);
    ok(python(CHECK_VALUES, &[&unpacked]));

    // (c) PyTorch's loader.
    ok(python(CHECK_TORCH, &[&unpacked]));

    // Plain `zstd -d` skips the header frame and yields the payload.
    let o = ok(run(Command::new(&zstd).arg("-dcq").arg(&global)));
    assert_eq!(
        o.stdout, payload,
        "zstd -d must yield the safetensors payload"
    );

    // A PyTorch site: Python writes its state_dict as safetensors, `ferry-client pack` ships it.
    let hq_state = d.join("hq-weights");
    let base_tensors: Vec<(&str, Dtype, Vec<usize>)> = vec![
        ("bn.num_batches_tracked", Dtype::I64, vec![]),
        ("fc1.bias", Dtype::F16, vec![3]),
        ("fc1.weight", Dtype::F32, vec![3, 5]),
        ("fc2.weight", Dtype::F32, vec![4, 3]),
        ("mask", Dtype::U8, vec![4]),
    ];
    let zeros: Vec<Vec<u8>> = base_tensors
        .iter()
        .map(|(_, dt, shape)| vec![0u8; dt.bitsize() / 8 * shape.iter().product::<usize>()])
        .collect();
    let refs: Vec<TensorRef<'_>> = base_tensors
        .iter()
        .zip(&zeros)
        .map(|((name, dtype, shape), data)| TensorRef {
            name,
            dtype: *dtype,
            shape,
            data,
        })
        .collect();
    let (base, _) = write_global(&hq, "pytorch-site", &refs, &hq_state);

    let weights = d.join("state_dict.safetensors");
    let originals = d.join("state_dict.npz");
    ok(python(WRITE_STATE_DICT, &[&weights, &originals]));
    let stick = d.join("stick");
    ok(run(client()
        .arg("pack")
        .arg("--key")
        .arg(&site_key)
        .arg("--weights")
        .arg(&weights)
        .args(["--samples", "640"])
        .arg("--base")
        .arg(&base)
        .arg("--trust")
        .arg(&hq_pub)
        .arg("--out")
        .arg(&stick)));
    let update = stick.join("site-a-r0.ferry");
    let o = ok(run(Command::new(&py)
        .arg(verifier())
        .arg("--trust")
        .arg(&keys)
        .arg(&update)));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("update from site-a (640 samples)"),
        "{stdout}"
    );
    let back = d.join("update.safetensors");
    ok(run(client()
        .arg("unpack")
        .arg("--trust")
        .arg(&site_pub)
        .arg(&update)
        .arg("--out")
        .arg(&back)));
    ok(python(COMPARE_STATE_DICT, &[&back, &originals]));
}

/// Issue 15 §5: a format-3 bundle read by tools that share no code with ferry's reader. The Python reader
/// (pyrage for age) checks the signature and the ciphertext hash before it decrypts, and the plaintext's signed
/// hash after; the standard `age` CLI (Debian's 1.1.1) and `zstd -d` yield the payload with the exact commands
/// of docs/bundle-format.md §6a.
#[test]
fn encrypted_bundles_interoperate_with_python_and_the_age_cli() {
    let py = ferry_testdata::python_with("cryptography, zstandard, pyrage");
    let age = ferry_testdata::program("age");
    let zstd = ferry_testdata::program("zstd");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = d.join("keys");
    let hq = SecretKey::generate(Role::Hq, "hq").unwrap();
    let (_, hq_pub) = hq.write_pair(&keys).unwrap();
    for id in ["site-a", "site-b"] {
        ok(run(client()
            .args(["keygen", "--id", id, "--out"])
            .arg(&keys)));
    }
    let site_a = ferry_bundle::PublicKey::read(&keys.join("site-a.pub")).unwrap();
    // More than one 64 KiB age STREAM chunk, values that do not compress away.
    let w: Vec<u8> = (0..40_000u32)
        .flat_map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / 1e7).to_le_bytes())
        .collect();
    let payload = Payload::from_tensors(&[TensorRef {
        name: "fc.weight",
        dtype: Dtype::F32,
        shape: &[200, 200],
        data: &w,
    }])
    .unwrap();
    let draft = Draft {
        encrypt_to: vec![site_a.clone(), hq.public()],
        ..Draft::initial("interop", None)
    };
    let sealed = ferry_bundle::seal(draft, &payload, &hq, 3).unwrap();
    assert_eq!(sealed.manifest.format, 3);
    let global = sealed.write_to_dir(&d.join("bundles")).unwrap();
    let bytes = std::fs::read(&global).unwrap();

    // The age identity files, as an operator makes them.
    let identity = |id: &str| {
        let out = d.join(format!("{id}.age"));
        ok(run(client()
            .arg("age-identity")
            .arg("--key")
            .arg(keys.join(format!("{id}.key")))
            .arg("--out")
            .arg(&out)));
        out
    };
    let (id_a, id_b) = (identity("site-a"), identity("site-b"));

    let verify = |file: &Path, extra: &[&std::ffi::OsStr]| {
        run(Command::new(&py)
            .arg(verifier())
            .arg("--trust")
            .arg(&hq_pub)
            .args(extra)
            .arg(file))
    };
    let refused = |o: &Output, want: &str| {
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{}", text(o));
        assert!(
            out.starts_with("FAIL") && out.contains(want),
            "want {want:?}: {}",
            text(o)
        );
    };

    // (a) The Python reader decrypts with site-a's identity and writes the payload, private.
    let py_out = d.join("py.safetensors");
    let o = ok(verify(
        &global,
        &[
            "--identity".as_ref(),
            id_a.as_os_str(),
            "--out".as_ref(),
            py_out.as_os_str(),
        ],
    ));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.starts_with("OK") && stdout.contains("format      3"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "encrypted   age to site-a {}",
            site_a.recipient_text()
        )),
        "{stdout}"
    );
    assert_eq!(std::fs::read(&py_out).unwrap(), payload.bytes());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&py_out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    // (b) Without an identity: the signature and ciphertext verify, then a refusal naming the recipients; with
    // site-b's: not a recipient.
    refused(
        &verify(&global, &[]),
        &format!(
            "payload is encrypted to site-a {}, hq {}; pass --identity",
            site_a.recipient_text(),
            hq.public().recipient_text()
        ),
    );
    refused(
        &verify(&global, &["--identity".as_ref(), id_b.as_os_str()]),
        "not to your identity (age1",
    );

    // (c) Tampering: any ciphertext byte is refused by the signed hash, before age sees it; the recipient list
    // is signed.
    let h = 8 + u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    let manifest = String::from_utf8_lossy(&bytes[32..h - 64]).to_string();
    let in_list = 32 + manifest.find("\"recipient\":\"age1").unwrap() + 20;
    for (what, at, want) in [
        (
            "age header",
            h + 30,
            "payload does not match its signed hash",
        ),
        (
            "STREAM chunk",
            h + (bytes.len() - h) / 2,
            "payload does not match its signed hash",
        ),
        (
            "last tag byte",
            bytes.len() - 1,
            "payload does not match its signed hash",
        ),
        ("recipient list", in_list, "signature does not verify"),
    ] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        let path = d.join(format!("flipped-{at}.ferry"));
        std::fs::write(&path, &bad).unwrap();
        let o = verify(&path, &["--identity".as_ref(), id_a.as_os_str()]);
        assert!(
            o.status.code() == Some(1) && String::from_utf8_lossy(&o.stdout).contains(want),
            "a flipped {what} byte: {}",
            text(&o)
        );
    }

    // (d) The standard tools, with the exact commands of docs/bundle-format.md §6a.
    let recipe = |id: &Path, out: &Path| {
        run(Command::new("bash")
            .arg("-c")
            .arg(
                "set -eo pipefail; H=$(( $(od -An -tu4 -j4 -N4 \"$1\") + 8 )); \
                 tail -c +$((H + 1)) \"$1\" | \"$2\" -d -i \"$3\" | \"$4\" -d -o \"$5\"",
            )
            .arg("bash")
            .arg(&global)
            .arg(&age)
            .arg(id)
            .arg(&zstd)
            .arg(out))
    };
    let cli_out = d.join("cli.safetensors");
    ok(recipe(&id_a, &cli_out));
    assert_eq!(std::fs::read(&cli_out).unwrap(), payload.bytes());
    let o = run(Command::new(&age).arg("--version"));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("1.1"),
        "{}",
        text(&o)
    );
    // age itself refuses site-b's identity.
    let o = recipe(&id_b, &d.join("b.safetensors"));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no identity matched"),
        "{}",
        text(&o)
    );
}
