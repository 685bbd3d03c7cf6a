#!/usr/bin/env python3
"""Independent reader for ferry bundles (formats 1, 2 and 3), written from docs/bundle-format.md alone.

    python3 scripts/ferry_verify.py --trust keys/hq.pub FILE [--out model.safetensors]
    python3 scripts/ferry_verify.py --trust keys/hq.pub --identity site-a.age FILE   # format 3 (encrypted)

Verifies everything the specification says a reader must (header, trusted key by key id, strict Ed25519
signature, manifest, signer and role rules, compressed length and hash, single zstd frame of the declared size,
capped decompression, decompressed hash, canonical safetensors header, per-tensor hashes, fingerprint), prints
a summary of the manifest, and optionally writes the verified safetensors payload. A format-3 bundle's payload
is an age file (spec §6a): its signature and ciphertext hash are checked first, then it is decrypted with the age
identity file `ferry-client age-identity` writes (--identity), and the plaintext must match its signed hash
before it is decompressed.

Exit status: 0 verified, 1 refused, 2 usage or environment error (missing Python modules, unreadable key).

Needs: pip install cryptography zstandard (and pyrage, for format 3 only)

Signatures: `cryptography` (OpenSSL) checks S < L and compares R byte for byte, but does not reject small-order
points; this script adds that check in pure Python, so it matches the strict semantics of the Rust reader
(ed25519-dalek verify_strict).
"""

import argparse
import hashlib
import json
import os
import stat
import sys
import unicodedata

FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)
ENCRYPTED_FORMAT_VERSION = 3
ENCRYPTION_SCHEME = "age-x25519"
MAX_RECIPIENTS = 1024
SKIPPABLE_MAGIC = 0x184D2A5E
HEADER_MAGIC = b"FERRYBDL"
ZSTD_MAGIC = 0xFD2FB528
# Each format version signs under its own domain (spec §3, §11).
SIGNATURE_DOMAINS = {1: b"ferry-bundle-v1\x00", 2: b"ferry-bundle-v2\x00", 3: b"ferry-bundle-v3\x00"}
KEY_ID_DOMAIN = b"ferry-key-id-v1\x00"
FIXED = 8 + 2 + 2 + 8 + 4  # header-frame content before the manifest
SIG_LEN = 64

MAX_BUNDLE_BYTES = 8 << 30
MAX_MANIFEST_BYTES = 64 << 20
MAX_PAYLOAD_BYTES = 16 << 30
MAX_WINDOW_BYTES = 1 << 27
MAX_KEY_FILE = 64 * 1024
MAX_NAME_BYTES = 1024
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

# Unicode White_Space (what the Rust reference trims); Python's str.strip() would also strip U+001C..U+001F.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B)) + \
    "\u2028\u2029\u202f\u205f\u3000"


class Refused(Exception):
    """The bundle (or a key file) is not acceptable: exit 1."""


class EnvError(Exception):
    """Usage or environment problem: exit 2."""


def sha256_hex(b):
    return hashlib.sha256(b).hexdigest()


def is_hash(s):
    return isinstance(s, str) and len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def valid_id(s):
    """[a-z0-9][a-z0-9._-]{0,63}"""
    if not isinstance(s, str) or not (1 <= len(s) <= 64):
        return False
    ok = "abcdefghijklmnopqrstuvwxyz0123456789._-"
    return all(c in ok for c in s) and s[0] not in "._-"


def valid_name(s):
    try:
        n = len(s.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return 1 <= n <= MAX_NAME_BYTES and not any(unicodedata.category(c) == "Cc" for c in s)


def show(s):
    """Print-safe form of an untrusted string."""
    return s.encode("unicode_escape").decode("ascii").replace('"', '\\"')


# --------------------------------------------------------------------------------------------------------------
# Ed25519: small-order check (spec §3), pure Python.

_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode_point(b):
    """Decode a 32-byte Edwards point as curve25519-dalek does (y taken mod p); None if not on the curve."""
    v = int.from_bytes(b, "little")
    sign = v >> 255
    y = (v & ((1 << 255) - 1)) % _P
    u = (y * y - 1) % _P
    w = (_D * y * y + 1) % _P
    x2 = u * pow(w, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
        if (x * x - x2) % _P != 0:
            return None
    if (x & 1) != sign:
        x = (_P - x) % _P
    return (x, y)


def _add(p, q):
    (x1, y1), (x2, y2) = p, q
    t = _D * x1 * x2 * y1 * y2 % _P
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, _P - 2, _P) % _P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, _P - 2, _P) % _P
    return (x3, y3)


def is_small_order(point):
    p = point
    for _ in range(3):
        p = _add(p, p)
    return p == (0, 1)


def verify_strict(public_key, message, signature, Ed25519PublicKey, InvalidSignature):
    """Ed25519 verification with verify_strict semantics (spec §3)."""
    R = signature[:32]
    s = int.from_bytes(signature[32:], "little")
    L = 2**252 + 27742317777372353535851937790883648493
    if s >= L:
        return False
    a_point = _decode_point(public_key)
    r_point = _decode_point(R)
    if a_point is None or r_point is None or is_small_order(a_point) or is_small_order(r_point):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------------------------
# Keys (spec §8).

def _key_hash(role, ident, public_key):
    h = hashlib.sha256()
    h.update(KEY_ID_DOMAIN)
    h.update(role.encode("ascii"))
    h.update(b"\x00")
    h.update(ident.encode("utf-8"))
    h.update(b"\x00")
    h.update(public_key)
    return h.digest()


def key_id(role, ident, public_key):
    return _key_hash(role, ident, public_key)[:8]


def fingerprint_of(role, ident, public_key):
    """The full fingerprint (spec §8.1) as 64 hex digits; the key id is its first 16."""
    return _key_hash(role, ident, public_key).hex()


def parse_fields(text, path, magic):
    fields = {}
    for line in text.split("\n"):
        line = line.strip(WHITESPACE)
        if not line or line.startswith("#"):
            continue
        if ":" not in line:
            raise Refused(f"{path}: not a valid ferry key file: line {show(line)!r} is not `field: value`")
        k, v = line.split(":", 1)
        k, v = k.strip(WHITESPACE), v.strip(WHITESPACE)
        if k in fields:
            raise Refused(f"{path}: not a valid ferry key file: field {show(k)!r} appears twice")
        fields[k] = v
    if magic not in fields:
        raise Refused(f"{path}: not a valid ferry key file: missing `{magic}: 1` line")
    if fields[magic] != "1":
        raise Refused(f"{path}: {magic} version {show(fields[magic])!r} is not supported; upgrade ferry")
    for k in ("role", "id", "key", "key-id"):
        if k not in fields:
            raise Refused(f"{path}: not a valid ferry key file: missing field `{k}`")
    return fields


def load_public_key(path):
    with open(path, "rb") as f:
        data = f.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise Refused(f"{path}: larger than {MAX_KEY_FILE} bytes, not a key file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(f"{path}: not a valid ferry key file: not UTF-8 text")
    f = parse_fields(text, path, "ferry-public-key")
    role, ident, key_hex = f["role"], f["id"], f["key"]
    if role not in ("hq", "site", "root"):
        raise Refused(f"{path}: unknown role {show(role)!r} (expected hq, site or root)")
    if not valid_id(ident):
        raise Refused(f"{path}: id {show(ident)!r} is not allowed")
    if len(key_hex) != 64 or any(c not in "0123456789abcdefABCDEF" for c in key_hex):
        raise Refused(f"{path}: `key` is not 64 hex digits")
    pub = bytes.fromhex(key_hex)
    if _decode_point(pub) is None:
        raise Refused(f"{path}: key is not a valid Ed25519 public key")
    kid = key_id(role, ident, pub)
    if f["key-id"] != kid.hex():
        raise Refused(f"{path}: key-id does not match the key")
    # Optional (spec §8.3): the full fingerprint, grouped for reading aloud; when present it must be the key's.
    if "fingerprint" in f and f["fingerprint"].replace(" ", "") != fingerprint_of(role, ident, pub):
        raise Refused(f"{path}: fingerprint does not match the key")
    return {"role": role, "id": ident, "key": pub, "key_id": kid, "path": path}


def load_trust(paths):
    ring = {}
    for p in paths:
        if os.path.isdir(p):
            files = sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(".pub"))
            files = [x for x in files if os.path.isfile(x)]
            if not files:
                raise EnvError(f"{p}: no public keys (*.pub) found to trust")
        else:
            files = [p]
        for fpath in files:
            try:
                k = load_public_key(fpath)
            except OSError as e:
                raise EnvError(f"{fpath}: {e.strerror}")
            except Refused as e:
                raise EnvError(str(e))
            old = ring.get(k["key_id"])
            if old is not None and (old["role"], old["id"], old["key"]) != (k["role"], k["id"], k["key"]):
                raise EnvError(f"two different trusted keys share key id {k['key_id'].hex()}")
            if old is None:
                for other in ring.values():
                    if (other["role"], other["id"]) == (k["role"], k["id"]):
                        raise EnvError(f"two different trusted keys both claim to be {k['role']} {k['id']!r} "
                                       f"(key ids {other['key_id'].hex()} and {k['key_id'].hex()}); "
                                       "trust only one of them")
            ring[k["key_id"]] = k
    return ring


# --------------------------------------------------------------------------------------------------------------
# Manifest (spec §4).

def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise Refused(f"signed manifest is invalid: duplicate field {show(k)!r}")
        out[k] = v
    return out


def _parse_int(text):
    # serde_json reads "-0" as a float, so a sign is never allowed where an unsigned integer is expected.
    if text.startswith("-"):
        raise Refused(f"signed manifest is invalid: negative number {text} where an unsigned integer is expected")
    return int(text)


def _reject_constant(c):
    raise Refused(f"signed manifest is invalid: {c} is not allowed")


def parse_manifest_json(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("signed manifest is invalid: not UTF-8")
    if text.startswith("\ufeff"):
        raise Refused("signed manifest is invalid: byte-order mark")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                          parse_int=_parse_int)
    except (ValueError, RecursionError) as e:
        raise Refused(f"signed manifest is invalid: {e}")


def _check_object(obj, where, required, optional=()):
    if not isinstance(obj, dict):
        raise Refused(f"signed manifest is invalid: {where} is not an object")
    for k in obj:
        if k not in required and k not in optional:
            raise Refused(f"signed manifest is invalid: unknown field {show(k)!r} in {where}")
    for k in required:
        if k not in obj:
            raise Refused(f"signed manifest is invalid: missing field `{k}` in {where}")
    for k in optional:
        obj.setdefault(k, None)


def _int(v, what, maximum=U64_MAX):
    if type(v) is not int or not (0 <= v <= maximum):
        raise Refused(f"signed manifest is invalid: {what} is not an integer in range")
    return v


def _str(v, what):
    if not isinstance(v, str):
        raise Refused(f"signed manifest is invalid: {what} is not a string")
    try:
        v.encode("utf-8")  # refuses lone surrogates ("\ud800")
    except UnicodeEncodeError:
        raise Refused(f"signed manifest is invalid: {what} holds a lone surrogate")
    return v


def _opt_str(v, what):
    return None if v is None else _str(v, what)


def check_manifest_types(m, version):
    """§4.1 and §4.2: exact fields (per format version), JSON types."""
    optional = ["arch", "base", "site", "strategy"]
    if version >= 2:
        optional += ["revocations", "expires"]
    if version >= ENCRYPTED_FORMAT_VERSION:
        optional += ["encryption"]
    _check_object(m, "manifest",
                  ["format", "kind", "federation", "model_fingerprint", "round", "contributors", "payload",
                   "tensors", "signer", "created"],
                  optional)
    if version >= 2:
        if m["revocations"] is not None:
            _check_object(m["revocations"], "revocations", ["serial", "sha256"])
            _int(m["revocations"]["serial"], "revocations.serial")
            _str(m["revocations"]["sha256"], "revocations.sha256")
        if m["expires"] is not None:
            _int(m["expires"], "expires")
    else:
        m["revocations"] = None
        m["expires"] = None
    if version < ENCRYPTED_FORMAT_VERSION:
        m["encryption"] = None
    elif m["encryption"] is not None:
        e = m["encryption"]
        _check_object(e, "encryption", ["scheme", "recipients", "len", "sha256"])
        _str(e["scheme"], "encryption.scheme")
        if not isinstance(e["recipients"], list):
            raise Refused("signed manifest is invalid: encryption.recipients is not an array")
        for r in e["recipients"]:
            _check_object(r, "recipient", ["role", "id", "key_id", "recipient"])
            if r["role"] not in ("hq", "site", "root"):
                raise Refused("signed manifest is invalid: a recipient's role is not \"hq\", \"site\" or \"root\"")
            _str(r["id"], "recipient id")
            _str(r["key_id"], "recipient key_id")
            _str(r["recipient"], "recipient")
        _int(e["len"], "encryption.len")
        _str(e["sha256"], "encryption.sha256")
    _int(m["format"], "format", U32_MAX)
    if m["kind"] not in ("update", "global"):
        raise Refused("signed manifest is invalid: kind is not \"update\" or \"global\"")
    _str(m["federation"], "federation")
    _opt_str(m["arch"], "arch")
    _str(m["model_fingerprint"], "model_fingerprint")
    _int(m["round"], "round")
    _opt_str(m["base"], "base")
    if m["site"] is not None:
        _check_object(m["site"], "site", ["id", "samples"])
        _str(m["site"]["id"], "site.id")
        _int(m["site"]["samples"], "site.samples")
    if not isinstance(m["contributors"], list):
        raise Refused("signed manifest is invalid: contributors is not an array")
    for c in m["contributors"]:
        _check_object(c, "contributor", ["bundle", "site", "samples"])
        _str(c["bundle"], "contributor.bundle")
        _str(c["site"], "contributor.site")
        _int(c["samples"], "contributor.samples")
    _opt_str(m["strategy"], "strategy")
    p = m["payload"]
    _check_object(p, "payload", ["codec", "compressed_len", "compressed_sha256", "len", "sha256"])
    _str(p["codec"], "payload.codec")
    _int(p["compressed_len"], "payload.compressed_len")
    _str(p["compressed_sha256"], "payload.compressed_sha256")
    _int(p["len"], "payload.len")
    _str(p["sha256"], "payload.sha256")
    if not isinstance(m["tensors"], list):
        raise Refused("signed manifest is invalid: tensors is not an array")
    for t in m["tensors"]:
        _check_object(t, "tensor", ["name", "dtype", "shape", "sha256"])
        _str(t["name"], "tensor name")
        _str(t["dtype"], "tensor dtype")
        if not isinstance(t["shape"], list):
            raise Refused("signed manifest is invalid: tensor shape is not an array")
        for d in t["shape"]:
            _int(d, "tensor dimension")
        _str(t["sha256"], "tensor sha256")
    s = m["signer"]
    _check_object(s, "signer", ["id", "role", "key_id"])
    _str(s["id"], "signer.id")
    if s["role"] not in ("hq", "site", "root"):
        raise Refused("signed manifest is invalid: signer.role is not \"hq\", \"site\" or \"root\"")
    _str(s["key_id"], "signer.key_id")
    _int(m["created"], "created")


def byte_len(dtype, shape):
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
        if n > U64_MAX:
            return None
    return n


def fingerprint(tensors):
    h = hashlib.sha256()
    for t in tensors:
        dims = ",".join(str(d) for d in t["shape"])
        h.update(f"{t['name']}\t{t['dtype']}\t{dims}\n".encode("utf-8"))
    return h.hexdigest()


def validate_manifest(m):
    """§4.3, in the reference order."""
    def bad(why):
        raise Refused(f"signed manifest is invalid: {why}")

    if m["format"] not in READ_VERSIONS:
        bad(f"manifest format {m['format']} (this reader reads {list(READ_VERSIONS)})")
    encrypted = m["format"] >= ENCRYPTED_FORMAT_VERSION
    if encrypted and m["encryption"] is None:
        bad("a format-3 manifest must describe its encryption")
    if not encrypted and m["encryption"] is not None:
        bad("only a format-3 manifest may describe an encryption")
    if encrypted:
        validate_encryption(m["encryption"], bad)
    if m["revocations"] is not None and not is_hash(m["revocations"]["sha256"]):
        bad("revocations.sha256 is not a lower-case SHA-256 hex string")
    if not valid_id(m["federation"]):
        bad("federation is not a valid id")
    if m["arch"] is not None and not valid_id(m["arch"]):
        bad("arch is not a valid id")
    if not valid_id(m["signer"]["id"]):
        bad("signer id is not a valid id")
    for what, h in (("model_fingerprint", m["model_fingerprint"]),
                    ("payload.compressed_sha256", m["payload"]["compressed_sha256"]),
                    ("payload.sha256", m["payload"]["sha256"])):
        if not is_hash(h):
            bad(f"{what} is not a lower-case SHA-256 hex string")
    if m["payload"]["codec"] != "zstd":
        bad(f"codec {show(m['payload']['codec'])!r} is not supported")
    if m["base"] is not None and not is_hash(m["base"]):
        bad("base is not a lower-case SHA-256 hex string")
    if m["kind"] == "update":
        if m["site"] is None:
            bad("an update must name its site")
        if not valid_id(m["site"]["id"]):
            bad("site id is not a valid id")
        if m["base"] is None:
            bad("an update must name the global it is based on")
        if m["contributors"] or m["strategy"] is not None:
            bad("an update cannot list contributors or a strategy")
        if m["revocations"] is not None or m["expires"] is not None:
            bad("an update cannot name a revocation list or an expiry")
    else:
        if m["site"] is not None:
            bad("a global cannot name a site")
        if (m["round"] == 0) != (m["base"] is None):
            bad("a global names a previous global exactly when its round is above 0")
        if m["format"] >= 2 and m["expires"] is None:
            bad("a format-2 global must say when it expires")
        for c in m["contributors"]:
            if not valid_id(c["site"]):
                bad("contributor site is not a valid id")
            if not is_hash(c["bundle"]):
                bad("contributor bundle is not a SHA-256 hex string")
    prev = None
    for t in m["tensors"]:
        if not valid_name(t["name"]):
            bad(f"tensor name {show(t['name'])!r} is not allowed")
        key = t["name"].encode("utf-8")
        if prev is not None and prev >= key:
            bad("tensors are not sorted by name, or a name repeats")
        prev = key
        if t["dtype"] not in DTYPE_SIZES:
            bad(f"tensor {show(t['name'])!r}: unsupported dtype")
        if byte_len(t["dtype"], t["shape"]) is None:
            bad(f"tensor {show(t['name'])!r}: shape is too large")
        if not is_hash(t["sha256"]):
            bad(f"tensor {show(t['name'])!r}: sha256 is not a SHA-256 hex string")
    check_fisher(m, bad)
    if fingerprint(m["tensors"]) != m["model_fingerprint"]:
        bad("model_fingerprint does not match the tensor list")


FISHER_PREFIX = "ferry.fisher/"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def check_fisher(m, bad):
    """Spec §6.6: `ferry.fisher/X` tensors only in an update, each F32 with the shape of a float model tensor X."""
    by_name = {t["name"]: t for t in m["tensors"]}
    for t in m["tensors"]:
        if not t["name"].startswith(FISHER_PREFIX):
            continue
        if m["kind"] != "update":
            bad(f"a global carries the Fisher tensor {show(t['name'])!r}; only updates may")
        target = by_name.get(t["name"][len(FISHER_PREFIX):])
        if target is None or target["name"].startswith(FISHER_PREFIX):
            bad(f"Fisher tensor {show(t['name'])!r} has no model tensor")
        if target["dtype"] not in FLOAT_DTYPES:
            bad(f"Fisher tensor {show(t['name'])!r} belongs to a tensor that is not a float tensor")
        if t["dtype"] != "F32" or t["shape"] != target["shape"]:
            bad(f"Fisher tensor {show(t['name'])!r} must be F32 with the shape of its model tensor")


def _pyrage():
    try:
        import pyrage
        import pyrage.x25519
    except ImportError as e:
        raise EnvError(f"{e}: reading format 3 (encrypted payloads) needs `pip install pyrage`")
    return pyrage


def validate_encryption(e, bad):
    """Rule 1a (spec §4.3)."""
    if e["scheme"] != ENCRYPTION_SCHEME:
        bad(f"encryption scheme {show(e['scheme'])!r} is not supported")
    if not (1 <= len(e["recipients"]) <= MAX_RECIPIENTS):
        bad(f"an encrypted payload names 1 to {MAX_RECIPIENTS} recipients")
    if not is_hash(e["sha256"]):
        bad("encryption.sha256 is not a lower-case SHA-256 hex string")
    x25519 = _pyrage().x25519
    seen = set()
    for r in e["recipients"]:
        if not valid_id(r["id"]):
            bad("recipient id is not a valid id")
        if len(r["key_id"]) != 16 or any(c not in "0123456789abcdef" for c in r["key_id"]):
            bad("a recipient's key_id is not 16 lower-case hex digits")
        try:
            ok = str(x25519.Recipient.from_str(r["recipient"])) == r["recipient"]
        except Exception:  # pyrage.RecipientError, and anything else it raises on malformed text
            ok = False
        if not ok:
            bad(f"recipient {show(r['recipient'])!r} is not an age X25519 recipient")
        if r["recipient"] in seen:
            bad("a recipient is listed twice")
        seen.add(r["recipient"])


def describe_recipients(e):
    return ", ".join(f"{show(r['id'])} {show(r['recipient'])}" for r in e["recipients"])


def load_identities(paths):
    """Age X25519 identities from identity files (`ferry-client age-identity` writes one): (identity, recipient)."""
    if not paths:
        return []
    x25519 = _pyrage().x25519
    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_KEY_FILE + 1)
        except OSError as e:
            raise EnvError(f"{path}: {e.strerror}")
        if len(data) > MAX_KEY_FILE:
            raise EnvError(f"{path}: larger than {MAX_KEY_FILE} bytes, not an age identity file")
        try:
            lines = data.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            raise EnvError(f"{path}: not an age identity file: not UTF-8 text")
        found = 0
        for line in lines:
            line = line.strip(WHITESPACE)
            if not line or line.startswith("#"):
                continue
            try:
                ident = x25519.Identity.from_str(line)
            except Exception:
                raise EnvError(f"{path}: not an age identity file: a line is not an AGE-SECRET-KEY-1 identity")
            out.append((ident, str(ident.to_public())))
            found += 1
        if not found:
            raise EnvError(f"{path}: no age identity (AGE-SECRET-KEY-1...) in it")
    return out


def decrypt_payload(m, region, identities):
    """Steps 9 (format 3), 9a-9c: the age file's signed length and hash, then decryption with an identity the
    manifest names, then the plaintext's signed length and hash. Returns the zstd frame."""
    e = m["encryption"]
    p = m["payload"]
    if len(region) != e["len"]:
        raise Refused(f"payload is {len(region)} bytes but the manifest signed {e['len']}: "
                      "the file is truncated or has extra bytes")
    if sha256_hex(region) != e["sha256"]:
        raise Refused("payload does not match its signed hash: the file was altered or damaged")
    to = describe_recipients(e)
    if not identities:
        raise Refused(f"payload is encrypted to {to}; pass --identity with one of their secret keys to read it")
    listed = {r["recipient"] for r in e["recipients"]}
    usable = [i for i, rcpt in identities if rcpt in listed]
    if not usable:
        yours = ", ".join(rcpt for _, rcpt in identities)
        raise Refused(f"payload is encrypted to {to}, not to your identity ({yours}); "
                      "pass --identity with one of their secret keys")
    pyrage = _pyrage()
    try:
        frame = pyrage.decrypt(bytes(region), usable)
    except pyrage.DecryptError as err:
        raise Refused(f"payload does not decrypt with your identity ({show(str(err))}), "
                      "although the signed manifest names it")
    if len(frame) != p["compressed_len"] or sha256_hex(frame) != p["compressed_sha256"]:
        raise Refused("decrypted payload does not match its signed hash")
    return frame


def check_signer_and_role(m, key, key_id_hex):
    s = m["signer"]
    if s["key_id"] != key_id_hex or s["id"] != key["id"] or s["role"] != key["role"]:
        raise Refused(f"manifest names signer {s['role']} {show(s['id'])} {show(s['key_id'])} but was verified "
                      f"with key {key['role']} {key['id']} {key_id_hex}")
    if key["role"] == "root":
        raise Refused("a root key signed a bundle; it may sign only lists of HQ keys")
    if m["kind"] == "global" and key["role"] != "hq":
        raise Refused(f"site key {key['id']!r} signed a global bundle; only an hq key may")
    if m["kind"] == "update":
        if key["role"] != "site":
            raise Refused("an hq key signed a site update; only the site's own key may")
        if m["site"]["id"] != key["id"]:
            raise Refused(f"key of site {key['id']!r} signed an update for site {show(m['site']['id'])!r}")


# --------------------------------------------------------------------------------------------------------------
# Payload (spec §6).

def zstd_frame_header(frame):
    """Parse a zstd frame header (RFC 8878 §3.1.1.1): (declared content size or None, window size)."""
    if len(frame) < 6 or int.from_bytes(frame[:4], "little") != ZSTD_MAGIC:
        raise Refused("payload is not a single zstd frame of the signed size: it does not start with a zstd frame")
    fhd = frame[4]
    fcs_flag, single, reserved, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, fhd & 3
    if reserved:
        raise Refused("payload is not a single zstd frame of the signed size: the frame is damaged")
    pos = 5
    window = None
    if not single:
        wd = frame[pos]
        exponent, mantissa = wd >> 3, wd & 7
        base = 1 << (10 + exponent)
        window = base + (base // 8) * mantissa
        pos += 1
    pos += (0, 1, 2, 4)[did_flag]
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if fcs_size == 0:
        raise Refused("payload is not a single zstd frame of the signed size: the frame does not declare its size")
    if len(frame) < pos + fcs_size:
        raise Refused("payload is not a single zstd frame of the signed size: the frame is damaged or truncated")
    fcs = int.from_bytes(frame[pos:pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
    if single:
        window = fcs
    return fcs, window


def canonical_header(tensors):
    parts = []
    offset = 0
    for t in tensors:
        end = offset + byte_len(t["dtype"], t["shape"])
        name = t["name"].replace("\\", "\\\\").replace('"', '\\"')
        shape = ",".join(str(d) for d in t["shape"])
        parts.append(f'"{name}":{{"dtype":"{t["dtype"]}","shape":[{shape}],"data_offsets":[{offset},{end}]}}')
        offset = end
    js = ("{" + ",".join(parts) + "}").encode("utf-8")
    js += b" " * (-len(js) % 8)
    return len(js).to_bytes(8, "little") + js, offset


# --------------------------------------------------------------------------------------------------------------
# The whole check (spec §5).

def verify(data, ring, max_payload=MAX_PAYLOAD_BYTES, identities=()):
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        import zstandard
    except ImportError as e:
        raise EnvError(f"{e}: run `pip install cryptography zstandard` (or .ci/run)")

    # 1-4: header.
    if len(data) < 8 + FIXED:
        raise Refused(f"not a ferry bundle: the file is too short ({len(data)} bytes)")
    if int.from_bytes(data[0:4], "little") != SKIPPABLE_MAGIC or data[8:16] != HEADER_MAGIC:
        raise Refused("not a ferry bundle: wrong magic bytes")
    version = int.from_bytes(data[16:18], "little")
    if version not in READ_VERSIONS:
        if version > FORMAT_VERSION:
            raise Refused(f"bundle format version {version} is newer than this reader understands; upgrade ferry")
        raise Refused(f"bundle format version {version} is not a known ferry format")
    if data[18:20] != b"\x00\x00":
        raise Refused("damaged bundle header: reserved bytes are not zero")
    frame_len = int.from_bytes(data[4:8], "little")
    m_len = int.from_bytes(data[28:32], "little")
    if m_len > MAX_MANIFEST_BYTES:
        raise Refused("damaged bundle header: manifest is larger than allowed")
    if frame_len != FIXED + m_len + SIG_LEN:
        raise Refused("damaged bundle header: frame length disagrees with manifest length")
    if len(data) < 8 + frame_len:
        raise Refused("damaged bundle header: file ends inside the header (truncated)")
    kid = bytes(data[20:28])
    manifest_raw = bytes(data[32:32 + m_len])
    signature = bytes(data[32 + m_len:8 + frame_len])
    payload = data[8 + frame_len:]

    # 5-6: trusted key by key id, strict signature.
    key = ring.get(kid)
    if key is None:
        raise Refused(f"signed by key {kid.hex()}, which is not among your trusted keys (check --trust)")
    if not verify_strict(key["key"], SIGNATURE_DOMAINS[version] + manifest_raw, signature, Ed25519PublicKey,
                         InvalidSignature):
        raise Refused("signature does not verify: the bundle was altered, or it is not from the key it names")

    # 7-8: manifest, validation, signer and role.
    m = parse_manifest_json(manifest_raw)
    check_manifest_types(m, version)
    validate_manifest(m)
    if m["format"] != version:
        raise Refused(f"signed manifest is invalid: manifest format {m['format']} differs from the header's "
                      f"version {version}")
    check_signer_and_role(m, key, kid.hex())

    # 9: compressed length and hash; in format 3 the ciphertext's, then 9a-9c (decrypt, plaintext hash).
    p = m["payload"]
    if m["encryption"] is not None:
        payload = decrypt_payload(m, payload, identities)
    if len(payload) != p["compressed_len"]:
        raise Refused(f"payload is {len(payload)} bytes but the manifest signed {p['compressed_len']}: "
                      "the file is truncated or has extra bytes")
    if sha256_hex(payload) != p["compressed_sha256"]:
        raise Refused("payload does not match its signed hash: the file was altered or damaged")

    # 10-12: one frame, declared size, capped decompression.
    expected = p["len"]
    if expected > max_payload:
        raise Refused(f"payload does not decompress to the signed {expected} bytes: larger than this reader accepts")
    fcs, window = zstd_frame_header(payload)
    if fcs != expected:
        raise Refused("payload is not a single zstd frame of the signed size: "
                      "the frame declares a different size than signed")
    if window > MAX_WINDOW_BYTES:
        raise Refused(f"payload does not decompress to the signed {expected} bytes: zstd window of {window} "
                      f"bytes exceeds the 2^27 limit")
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    try:
        # The frame declares `expected` (checked above), so the output buffer is exactly the signed size;
        # allow_extra_data=False refuses anything after the first frame.
        out = dctx.decompress(payload, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise Refused(f"payload is not a single zstd frame of the signed size: {e}")
    if len(out) != expected:
        raise Refused(f"payload does not decompress to the signed {expected} bytes: got {len(out)} bytes")

    # 13: decompressed hash.
    if sha256_hex(out) != p["sha256"]:
        raise Refused("decompressed payload does not match its signed hash")

    # 14: canonical safetensors header, byte for byte, and exact length.
    header, data_len = canonical_header(m["tensors"])
    if out[:len(header)] != header or len(header) + data_len != len(out):
        raise Refused("payload's safetensors header does not match the signed tensor list")

    # 15: per-tensor hashes.
    offset = len(header)
    for t in m["tensors"]:
        n = byte_len(t["dtype"], t["shape"])
        if sha256_hex(out[offset:offset + n]) != t["sha256"]:
            raise Refused(f"tensor {show(t['name'])!r} does not match its signed hash")
        offset += n

    # 16: fingerprint (already part of validate_manifest; repeated here as the spec's last step).
    if fingerprint(m["tensors"]) != m["model_fingerprint"]:
        raise Refused("model_fingerprint does not match the tensor list")

    return m, out, sha256_hex(data)


def summary(m, file_hash, path):
    lines = []
    if m["kind"] == "update":
        who = f"update from {show(m['site']['id'])} ({m['site']['samples']} samples)"
    else:
        who = f"global ({len(m['contributors'])} contributor(s), strategy {show(m['strategy'] or '-')})"
    lines.append(f"OK    {path}")
    lines.append(f"  kind        {who}")
    lines.append(f"  federation  {m['federation']}")
    lines.append(f"  arch        {m['arch'] or '(foreign weights)'}")
    lines.append(f"  round       {m['round']}")
    lines.append(f"  format      {m['format']}")
    lines.append(f"  base        {m['base'] or '(none)'}")
    if m.get("revocations"):
        lines.append(f"  revocations list {m['revocations']['serial']} (sha256 {m['revocations']['sha256']})")
    if m.get("expires") is not None:
        lines.append(f"  expires     {m['expires']} (unix seconds)")
    if m.get("encryption"):
        lines.append(f"  encrypted   age to {describe_recipients(m['encryption'])} "
                     f"({m['encryption']['len']} bytes, sha256 {m['encryption']['sha256']})")
    for c in m["contributors"]:
        lines.append(f"  contributor {c['site']} {c['samples']} samples, bundle {c['bundle']}")
    lines.append(f"  signer      {m['signer']['role']} {m['signer']['id']} [{m['signer']['key_id']}]")
    lines.append(f"  created     {m['created']} (unix seconds)")
    lines.append(f"  fingerprint {m['model_fingerprint']}")
    lines.append(f"  payload     {m['payload']['len']} bytes ({m['payload']['compressed_len']} zstd), "
                 f"sha256 {m['payload']['sha256']}")
    lines.append(f"  bundle      sha256 {file_hash}")
    lines.append(f"  tensors     {len(m['tensors'])}")
    for t in m["tensors"]:
        lines.append(f"    {show(t['name']):<40} {t['dtype']:<5} {t['shape']}")
    return "\n".join(lines)


def write_new(path, data, mode=0o644):
    """Write a new file, never replacing an existing one (or following a symlink there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Verify a ferry bundle (formats 1, 2 and 3) independently of the Rust tools.",
        epilog="Exit status: 0 verified, 1 refused, 2 usage or environment error.")
    ap.add_argument("--trust", action="append", required=True,
                    help="a trusted .pub file or a directory of them (repeatable)")
    ap.add_argument("--identity", action="append", default=[],
                    help="an age identity file (`ferry-client age-identity` writes one) to decrypt a format-3 "
                         "payload (repeatable)")
    ap.add_argument("--out", help="write the verified safetensors payload here (must not exist)")
    ap.add_argument("--json", action="store_true", help="print the verified manifest as JSON")
    ap.add_argument("file", help="the .ferry bundle")
    a = ap.parse_args(argv)
    try:
        ring = load_trust(a.trust)
        identities = load_identities(a.identity)
        try:
            st = os.stat(a.file)
        except OSError as e:
            raise Refused(f"{a.file}: {e.strerror}")
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{a.file}: not a regular file")
        if st.st_size > MAX_BUNDLE_BYTES:
            raise Refused(f"{a.file} is {st.st_size} bytes, more than the {MAX_BUNDLE_BYTES}-byte limit")
        with open(a.file, "rb") as f:
            data = f.read(MAX_BUNDLE_BYTES + 1)
        if len(data) > MAX_BUNDLE_BYTES:
            raise Refused(f"{a.file} grew past the {MAX_BUNDLE_BYTES}-byte limit")
        m, payload, file_hash = verify(data, ring, identities=identities)
        if a.out:
            try:
                # Weights that travelled encrypted stay private on disk (spec §6a).
                write_new(a.out, payload, 0o600 if m["encryption"] else 0o644)
            except FileExistsError:
                raise EnvError(f"{a.out} already exists; refusing to overwrite it")
            except OSError as e:
                raise EnvError(f"{a.out}: {e.strerror}")
    except Refused as e:
        print(f"FAIL  {a.file}  {e}")
        return 1
    except EnvError as e:
        print(f"ferry_verify: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({"file": a.file, "ok": True, "hash": file_hash, "manifest": m}))
    else:
        print(summary(m, file_hash, a.file))
        if a.out:
            print(f"wrote {a.out} ({len(payload)} bytes, {len(m['tensors'])} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
