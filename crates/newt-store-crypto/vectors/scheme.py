#!/usr/bin/env python3
"""Writes scheme.json: newt's at-rest scheme (see the crate docs of
newt-store-crypto) computed independently of its Rust code, with Python's
hmac and hashlib and OpenSSL through `cryptography` (AES-GCM, Argon2id).

Run from this directory: python3 scheme.py  (cryptography >= 44)
Every nonce and salt is fixed here so the output is reproducible; the
stores themselves draw them at random.
"""
import hashlib
import hmac
import json
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id


def hkdf_sha256(salt, ikm, info, length=32):
    """RFC 5869; no salt is HashLen zero bytes."""
    prk = hmac.new(salt or b"\0" * 32, ikm, hashlib.sha256).digest()
    okm, block, i = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
        i += 1
    return okm[:length]


def associated_data(table, keys):
    ad = b"newt-sqlite row v1\0" + table.encode() + b"\0"
    for tag, value in keys:
        data = struct.pack(">q", value) if tag == "i" else (
            value.encode() if tag == "t" else value)
        ad += tag.encode() + struct.pack(">I", len(data)) + data
    return ad


def seal(key, nonce, ad, plaintext):
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


data_key = bytes(range(0x20, 0x40))
value_key = hkdf_sha256(None, data_key, b"newt-sqlite value encryption v1")
lookup_key = hkdf_sha256(None, data_key, b"newt-sqlite lookup hash v1")
digest_key = hkdf_sha256(None, data_key, b"newt-sqlite row digest v1")


def lookup(kind, identifier):
    return hmac.new(lookup_key, kind.encode() + b"\0" + identifier.encode(),
                    hashlib.sha256).digest()


def digest_row(ad, sealed):
    return hmac.new(digest_key, struct.pack(">Q", len(ad)) + ad + sealed,
                    hashlib.sha256).digest()


identifiers = [
    ("user", "@alice:example.org"),
    ("device", "ALICEDEVICE"),
    ("room", "!room:example.org"),
    ("megolm_session", "megolm-session-id"),
    ("olm_session", "olm-session-id"),
    ("sender_key", "curve25519-key"),
    ("request", "request-id"),
    ("withheld_session_sender", "megolm-session-id\n@bob:example.org"),
]
hashes = [{"kind": k, "identifier": i, "hash": lookup(k, i).hex()} for k, i in identifiers]

room = lookup("room", "!room:example.org")
session = lookup("megolm_session", "megolm-session-id")
rows = []
for table, keys, plaintext, nonce in [
    ("inbound_group_sessions", [("b", room), ("b", session), ("i", 1)],
     b'{"session_id":"megolm-session-id"}', bytes([1] * 12)),
    ("singletons", [("t", "sync_token")], b'"s72594_4483_1934"', bytes([2] * 12)),
]:
    ad = associated_data(table, keys)
    sealed = seal(value_key, nonce, ad, plaintext)
    rows.append({
        "table": table,
        "keys": [{"tag": t, "value": v.hex() if t == "b" else v} for t, v in keys],
        "plaintext": plaintext.decode(),
        "associated_data": ad.hex(),
        "sealed": sealed.hex(),
        "digest": digest_row(ad, sealed).hex(),
    })

key_check = seal(value_key, bytes([3] * 12),
                 associated_data("meta", [("t", "key_check")]), b"newt-sqlite key check v2")


def wrapped(kek, kek_json, nonce):
    return seal(kek, nonce, b"newt-sqlite data key v1\0" + kek_json, data_key)


raw_key = bytes(range(0x00, 0x20))
raw_salt = bytes(range(0xa0, 0xb0))
raw_kek_json = json.dumps({"alg": "hkdf_sha256", "salt": list(raw_salt)},
                          separators=(",", ":")).encode()
raw_kek = hkdf_sha256(raw_salt, raw_key, b"newt-sqlite key wrapping v1")

passphrase = "correct horse battery staple"
pass_salt = bytes(range(0xb0, 0xc0))
# Small costs keep the test fast; the stores use m = 65536, t = 3, p = 1.
m_kib, t, p = 256, 2, 1
pass_kek_json = json.dumps({"alg": "argon2id", "m_kib": m_kib, "t": t, "p": p,
                            "salt": list(pass_salt)}, separators=(",", ":")).encode()
pass_kek = Argon2id(salt=pass_salt, length=32, iterations=t, lanes=p,
                    memory_cost=m_kib).derive(passphrase.encode())


def le_number(digest):
    return int.from_bytes(digest, "little")


# An integrity record of a store of three tables: table 0 holds the two
# rows above (the sync token is a singleton), tables 1 and 2 are empty.
total = (le_number(bytes.fromhex(rows[0]["digest"])) +
         le_number(bytes.fromhex(rows[1]["digest"]))) % 2**256
record = bytes([1]) + struct.pack(">Q", 2) + bytes([3])
record += total.to_bytes(32, "little") + bytes(32) + bytes(32)
record += bytes([len(b"sync_token")]) + b"sync_token" + bytes.fromhex(rows[1]["digest"])
sealed_record = seal(value_key, bytes([4] * 12),
                     associated_data("meta", [("t", "integrity")]), record)

out = {
    "about": "newt at-rest scheme, computed by vectors/scheme.py (Python hmac/hashlib, "
             "OpenSSL AES-GCM and Argon2id via cryptography); see newt-store-crypto's docs",
    "data_key": data_key.hex(),
    "value_key": value_key.hex(),
    "lookup_key": lookup_key.hex(),
    "digest_key": digest_key.hex(),
    "hashes": hashes,
    "rows": rows,
    "key_check": key_check.hex(),
    "raw": {"key": raw_key.hex(), "kek_json": raw_kek_json.decode(), "kek": raw_kek.hex(),
            "wrapped_data_key": wrapped(raw_kek, raw_kek_json, bytes([5] * 12)).hex()},
    "passphrase": {"passphrase": passphrase, "kek_json": pass_kek_json.decode(),
                   "kek": pass_kek.hex(),
                   "wrapped_data_key": wrapped(pass_kek, pass_kek_json, bytes([6] * 12)).hex()},
    "integrity": {"tables": 3, "counter": 2, "bytes": record.hex(),
                  "sealed": sealed_record.hex()},
}
with open("scheme.json", "w") as f:
    json.dump(out, f, indent=2)
    f.write("\n")
