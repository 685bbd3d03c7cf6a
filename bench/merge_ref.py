#!/usr/bin/env python3
"""merge_ref.py — the Python merge reference of issue 13: what a user at HQ could write with numpy, safetensors,
zstandard, hashlib and PyNaCl. It does the same work as `ferry-server merge` on the same files:

  verify each bundle (Ed25519 over the domain-separated manifest, compressed-payload SHA-256, decompress capped
  at the signed length, payload SHA-256, tensor SHA-256s) -> weighted average in float64 (fedavg by signed
  sample counts; --strategy median / trimmed-mean coordinate-wise) -> safetensors -> zstd level 3 with content
  size and checksum -> hashes -> signed manifest -> the next global on disk.

Inputs come from `ferry-lab bench merge --dir DIR` (DIR/inputs.json), which runs this script in its rounds with
--python bench/merge_ref.py, so the ratio comes from one run:

  ferry-lab bench merge --sites 4 --size-mb 64 --python bench/merge_ref.py --json
  python3 bench/merge_ref.py DIR/inputs.json            # alone; prints one JSON line

Needs: pip install numpy safetensors zstandard pynacl
"""
import argparse
import hashlib
import json
import os
import struct
import sys
import time

import numpy as np
import zstandard
from nacl.signing import SigningKey, VerifyKey
from safetensors.numpy import load as st_load, save as st_save

# The signature domain of each clear format (docs/bundle-format.md §3); formats 1 and 2 share the payload fields
# this script reads. The output is written as format 1, which is the same work.
DOMAINS = {1: b"ferry-bundle-v1\0", 2: b"ferry-bundle-v2\0"}
DOMAIN = DOMAINS[1]


def key_fields(path):
    out = {}
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def trusted(folder):
    ring = {}
    for name in os.listdir(folder):
        if name.endswith(".pub"):
            f = key_fields(os.path.join(folder, name))
            ring[bytes.fromhex(f["key-id"])] = VerifyKey(bytes.fromhex(f["key"]))
    return ring


def verify(path, ring):
    data = open(path, "rb").read()
    magic, frame = struct.unpack_from("<II", data, 0)
    if magic != 0x184D2A5E or data[8:16] != b"FERRYBDL":
        raise SystemExit(f"{path}: not a ferry bundle")
    (version,) = struct.unpack_from("<H", data, 16)
    if version not in DOMAINS:
        raise SystemExit(f"{path}: bundle format {version} is not one this script reads")
    key_id = data[20:28]
    (mlen,) = struct.unpack_from("<I", data, 28)
    manifest_bytes = data[32:32 + mlen]
    sig = data[32 + mlen:96 + mlen]
    ring[key_id].verify(DOMAINS[version] + manifest_bytes, sig)
    m = json.loads(manifest_bytes)
    comp = data[96 + mlen:]
    p = m["payload"]
    if len(comp) != p["compressed_len"] or hashlib.sha256(comp).hexdigest() != p["compressed_sha256"]:
        raise SystemExit(f"{path}: payload does not match its signed hash")
    payload = zstandard.ZstdDecompressor().decompress(comp, max_output_size=p["len"])
    if hashlib.sha256(payload).hexdigest() != p["sha256"]:
        raise SystemExit(f"{path}: decompressed payload does not match its signed hash")
    (hlen,) = struct.unpack_from("<Q", payload, 0)
    view = memoryview(payload)
    offset = 8 + hlen
    header = json.loads(payload[8:8 + hlen])
    for t in m["tensors"]:
        b, e = header[t["name"]]["data_offsets"]
        if hashlib.sha256(view[offset + b:offset + e]).hexdigest() != t["sha256"]:
            raise SystemExit(f"{path}: tensor {t['name']} does not match its signed hash")
    return m, hashlib.sha256(data).hexdigest(), st_load(payload)


def combine(updates, strategy, trim):
    names = sorted(updates[0][2])
    total = sum(m["site"]["samples"] for m, _, _ in updates)
    out = {}
    for name in names:
        dtype = updates[0][2][name].dtype
        if strategy == "fedavg":
            acc = np.zeros(updates[0][2][name].shape, dtype=np.float64)
            for m, _, t in updates:
                acc += (m["site"]["samples"] / total) * t[name].astype(np.float64)
        else:
            stack = np.sort(np.stack([t[name].astype(np.float64) for _, _, t in updates]), axis=0)
            if strategy == "median":
                acc = np.median(stack, axis=0)
            else:
                acc = stack[trim:len(updates) - trim].mean(axis=0)
        out[name] = acc.astype(dtype)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs")
    ap.add_argument("--strategy", default="fedavg", choices=["fedavg", "median", "trimmed-mean"])
    ap.add_argument("--trim", type=int, default=1)
    a = ap.parse_args()
    cfg = json.load(open(a.inputs))
    start = time.perf_counter()

    hq = key_fields(cfg["hq_key"])
    sk = SigningKey(bytes.fromhex(hq["secret"]))
    ring = trusted(cfg["trust"])
    base, base_hash, _ = verify(cfg["global"], ring)
    updates = [verify(u, ring) for u in cfg["updates"]]
    merged = combine(updates, a.strategy, a.trim)

    payload = st_save(merged)
    comp = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True).compress(payload)
    (hlen,) = struct.unpack_from("<Q", payload, 0)
    header = json.loads(payload[8:8 + hlen])
    view = memoryview(payload)
    tensors = []
    for name in sorted(merged):
        b, e = header[name]["data_offsets"]
        tensors.append({"name": name, "dtype": header[name]["dtype"], "shape": header[name]["shape"],
                        "sha256": hashlib.sha256(view[8 + hlen + b:8 + hlen + e]).hexdigest()})
    manifest = {
        "format": 1, "kind": "global", "federation": base["federation"], "arch": base["arch"],
        "model_fingerprint": base["model_fingerprint"], "round": base["round"] + 1, "base": base_hash,
        "site": None,
        "contributors": sorted(({"bundle": h, "site": m["site"]["id"], "samples": m["site"]["samples"]}
                                for m, h, _ in updates), key=lambda c: c["bundle"]),
        "strategy": a.strategy,
        "payload": {"codec": "zstd", "compressed_len": len(comp),
                    "compressed_sha256": hashlib.sha256(comp).hexdigest(), "len": len(payload),
                    "sha256": hashlib.sha256(payload).hexdigest()},
        "tensors": tensors, "signer": base["signer"], "created": int(time.time()),
    }
    mb = json.dumps(manifest, separators=(",", ":")).encode()
    sig = sk.sign(DOMAIN + mb).signature
    head = struct.pack("<II", 0x184D2A5E, 24 + len(mb) + 64) + b"FERRYBDL" + struct.pack("<HH", 1, 0)
    head += bytes.fromhex(hq["key-id"]) + struct.pack("<I", len(mb)) + mb + sig
    os.makedirs(cfg["out"], exist_ok=True)
    out = os.path.join(cfg["out"], f"global-r{base['round'] + 1}.ferry")
    with open(out + ".tmp", "wb") as f:
        f.write(head)
        f.write(comp)
        f.flush()
        os.fsync(f.fileno())
    os.replace(out + ".tmp", out)
    print(json.dumps({"what": "python merge", "seconds": time.perf_counter() - start, "out": out}))


if __name__ == "__main__":
    sys.exit(main())
