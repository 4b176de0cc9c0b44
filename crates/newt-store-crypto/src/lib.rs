//! newt's at-rest encryption, one scheme for every store backend
//! (`newt-sqlite` on native platforms, IndexedDB in the browser), so that
//! the backends cannot drift apart. It holds no storage code: a backend
//! decides where the bytes go; this crate decides what they are.
//!
//! The labels below say `newt-sqlite` because the scheme was first
//! written there; they are part of the format (changing one would make
//! every existing store unreadable), not a statement about the backend.
//!
//! # Key hierarchy
//!
//! ```text
//! StoreKey::Raw(32 bytes)  ── HKDF-SHA256(salt, "newt-sqlite key wrapping v1") ──┐
//! StoreKey::Passphrase     ── Argon2id v0x13 (m = 64 MiB, t = 3, p = 1, salt) ───┴─> KEK
//! KEK ── AES-256-GCM ──> wrapped data key (random, 32 bytes, never changes)
//! data key ── HKDF-SHA256(no salt, info) ──> value key   "newt-sqlite value encryption v1"
//!                                        ──> lookup key  "newt-sqlite lookup hash v1"
//!                                        ──> digest key  "newt-sqlite row digest v1"
//! ```
//!
//! The KEK's parameters are stored as JSON next to the wrapped key
//! (`{"alg":"hkdf_sha256","salt":[..16 bytes..]}` or
//! `{"alg":"argon2id","m_kib":65536,"t":3,"p":1,"salt":[..]}`); reading
//! them back bounds Argon2id's costs (1 GiB, 64 passes, 16 lanes) so that
//! a hostile store cannot make us allocate without bound. The wrapped data
//! key is `seal(KEK, "newt-sqlite data key v1\0" || kek_json, data key)`:
//! the parameters cannot be swapped without the unwrap failing. A *key
//! check*, `seal(value key, associated_data("meta", [Text("key_check")]),
//! "newt-sqlite key check v2")`, confirms the unwrapped key is the one the
//! values were written with (`… v1`: an SQLite store from before it kept
//! an integrity record). A key that fails either step is
//! [`StoreError::WrongKey`](newt_store::StoreError::WrongKey), and the
//! backend must have written nothing before that point.
//!
//! Changing the key or passphrase is [`wrap`] of the same data key with
//! fresh parameters and salt: nothing else is re-encrypted.
//! [`KeyMaterial`] is what a backend stores (three byte strings, none of
//! them secret); [`unlock`] turns it and a [`StoreKey`] into the
//! [`Cipher`] everything else uses.
//!
//! # Values
//!
//! A record is stored as its JSON, sealed with AES-256-GCM under the value
//! key and a fresh random 96-bit nonce: `nonce (12) || ciphertext || tag
//! (16)` ([`Cipher::seal_record`]). Random nonces are safe here: a store
//! writes far fewer than 2^32 values under one data key.
//!
//! # Associated data
//!
//! A value's associated data names its table and every key column of its
//! row ([`associated_data`]), so a ciphertext moved to another row or
//! another table fails to open instead of being read as that row's value:
//!
//! ```text
//! "newt-sqlite row v1\0" || table || 0x00 || for each key column: tag (1) || len (4, BE) || bytes
//! tags: 'n' null, 'i' integer (8 bytes BE), 'r' float (8 bytes BE), 't' UTF-8 text, 'b' bytes
//! ```
//!
//! The key columns are the lookup hashes and the few values kept in the
//! clear for indexes (a flag is an integer 0 or 1), in a fixed order per
//! table; a singleton (account, sync token, private cross-signing keys) is
//! keyed by its name as text. A backend that lays its records out
//! differently must still build the same associated data for the same
//! record, so that both follow one scheme (newt-sqlite's tables and
//! column orders are in its `src/schema.rs`).
//!
//! # Lookup keys
//!
//! Identifiers (user, room, device and session IDs, Curve25519 keys,
//! request IDs) are never stored in the clear, only as
//! `HMAC-SHA256(lookup key, label || 0x00 || identifier)`
//! ([`Cipher::hash`]), the label naming the [`Kind`] of identifier, so that
//! equal strings of two kinds hash apart. Being keyed, the hashes reveal
//! nothing to whoever lacks the key, not even which well-known IDs are
//! there; being deterministic, they serve as index keys. A withheld notice
//! is keyed by its session and sender together ([`withheld_key`]).
//!
//! # Integrity record
//!
//! Sealing binds a value to its row, not to a moment: an old sealed copy
//! of a row still opens. So one more sealed value, the
//! [`IntegrityRecord`], says what the rows should be: a counter of durable
//! commits, per table the sum modulo 2^256 of its rows' digests
//! ([`Cipher::digest_row`]: `HMAC-SHA256(digest key, len(ad) (8, BE) || ad
//! || sealed value)`, read as a little-endian number), and the digest of
//! each singleton row by name. Every commit updates it in the same
//! transaction, subtracting the digest of each row it finds and adding
//! that of the row it leaves, so any change not made by the store (a row
//! deleted, added, or replaced by an older copy) makes a sum differ, and
//! stays visible until a check sees it. Its associated data is that of a
//! `meta` row named `integrity`. [`CounterFloor`] notices the counter going
//! back while a handle is open. Which tables are checked when is the
//! backend's choice (newt-sqlite: singletons at every read, the rest on
//! demand).
//!
//! # Known answers
//!
//! `vectors/scheme.json` is a store's worth of this scheme computed by an
//! independent implementation (`vectors/scheme.py`: Python's `hmac` and
//! `hashlib`, and OpenSSL through `cryptography`), and
//! `tests/scheme_vector.rs` checks this crate against it: a backend in
//! another language can check itself against the same file.

mod cipher;
mod integrity;
mod keys;
pub mod tables;

pub use cipher::{associated_data, withheld_key, Cipher, Hash, KeyColumn, Kind};
pub use integrity::{tampered, CounterFloor, Digest, IntegrityRecord};
pub use keys::{
    generate, keeps_integrity_record, seal_key_check, unlock, wrap, DataKey, KeyMaterial, StoreKey,
    WrappedDataKey,
};
