//! newt's [`Store`](newt_store::Store) for the browser, over IndexedDB,
//! encrypted at rest with the scheme of [`newt_store_crypto`] that
//! newt-sqlite uses too. It exists on `wasm32` only (on other targets this
//! crate is empty) and works in a window or a worker.
//!
//! ```ignore
//! use newt_indexeddb::{IndexedDbStore, StoreKey};
//!
//! // In the web app, once the user has logged in (a passphrase runs
//! // Argon2id, about a second; a raw 32-byte key kept elsewhere does not).
//! let store = IndexedDbStore::open("newt-crypto-@alice:example.org", StoreKey::Passphrase(pass)).await?;
//! let machine = newt::Machine::open(store, ..).await?;
//! // ... sign-out:
//! drop(machine);
//! newt_indexeddb::delete_store("newt-crypto-@alice:example.org").await?;
//! ```
//!
//! # What is encrypted
//!
//! Everything but the layout. Each record is its JSON sealed with
//! AES-256-GCM under a key derived from a random data key, with associated
//! data naming its table and key columns (so a value cannot be moved to
//! another record); identifiers (user, device, room and session IDs,
//! Curve25519 keys, request IDs) appear only as HMAC-SHA256 keyed lookup
//! hashes. The data key is stored wrapped by a key derived from the
//! [`StoreKey`]: HKDF for a raw key, Argon2id (64 MiB, 3 passes) for a
//! passphrase; [`IndexedDbStore::change_passphrase`] re-wraps it and
//! nothing else. A wrong key is
//! [`StoreError::WrongKey`](newt_store::StoreError::WrongKey), and the
//! database is only read until the key is proven. The scheme is the one
//! of newt-sqlite byte for byte (same tables, same key column order, same
//! associated data), so the two backends cannot drift.
//!
//! Left in the clear: how many records each object store holds and how
//! large each is, which records share a room or user hash, three values
//! the indexes need (an inbound session's `backed_up` flag, a key
//! request's `sent` flag, a replay record's message index), and the KDF
//! parameters and salt.
//!
//! # Layout
//!
//! One database per store, named by the app; its IndexedDB version is the
//! schema version ([`StoreError::TooNew`](newt_store::StoreError::TooNew)
//! for a database a newer build wrote, left untouched). `meta` holds the
//! key material (`kek`, `data_key`, `key_check`); every table of
//! [`newt_store_crypto::tables`] is an object store of records
//! `{<key columns>, value}` keyed by the table's primary key columns (lookup
//! hashes as binary keys, ordered bytewise). Key ranges on key prefixes
//! serve the reads by sender key, by user and the paging of inbound
//! sessions (in hash order, every session once); key requests have an
//! index by session and one by `sent`.
//!
//! # Durability
//!
//! Each [`apply`](newt_store::Store::apply) is one `readwrite` transaction
//! over the object stores it touches: the generation rules (account, Olm
//! sessions, outbound Megolm sessions) are checked on the records read
//! inside it, removals come before puts, and any failure aborts it, so a
//! commit is all or nothing. It is opened with `durability: "strict"`: the
//! browser reports it complete only once it is flushed to disk, so a power
//! cut loses nothing newt acknowledged. One exception, as in newt-sqlite: a
//! commit of Megolm replay records alone (what decrypting an event
//! writes) is `"relaxed"`; a power cut right after it can lose the replay
//! check of an event already shown, nothing else. (web-sys exposes
//! `durability` only under `--cfg=web_sys_unstable_apis`; the store sets it
//! on the options object itself, so no special build flags are needed, and
//! a browser that does not know the option ignores it.)
//!
//! # Several tabs
//!
//! Tabs of one app open the same database, each on its own connection.
//! IndexedDB runs their `readwrite` transactions one at a time, and the
//! generation rules, checked inside each, make a tab that loaded the
//! account or a session before another tab changed it fail with
//! [`StaleGeneration`](newt_store::StoreError::StaleGeneration) and reload,
//! instead of overwriting the newer state. If another tab opens the
//! database at a newer schema version, or deletes it, this connection
//! closes at once rather than block it; every later call fails with
//! [`StoreError::Backend`](newt_store::StoreError::Backend), and
//! [`IndexedDbStore::is_closed`] says so.
//!
//! # Not yet
//!
//! newt-sqlite's integrity record (which notices records deleted or put
//! back from an older copy) is not kept here yet.

#[cfg(target_arch = "wasm32")]
mod apply;
#[cfg(target_arch = "wasm32")]
mod idb;
#[cfg(target_arch = "wasm32")]
mod layout;
#[cfg(target_arch = "wasm32")]
mod store;

#[cfg(target_arch = "wasm32")]
pub use newt_store_crypto::StoreKey;
#[cfg(target_arch = "wasm32")]
pub use store::{delete_store, IndexedDbStore};
