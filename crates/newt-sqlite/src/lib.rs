//! newt's SQLite [`Store`](newt_store::Store): encrypted at rest, crash-safe,
//! multi-process safe; the default store on native platforms.
//!
//! ```
//! use newt_sqlite::{SqliteStore, StoreKey};
//! use newt_store::{Changes, Store};
//! use newt_proto::ids::UserId;
//! use newt_proto::records::TrackedUser;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("crypto.sqlite");
//!
//! let store = SqliteStore::open(&path, StoreKey::Passphrase("correct horse".into()))?;
//! let mut changes = Changes::default();
//! let alice = UserId::parse("@alice:example.org")?;
//! changes.tracked_users.push(TrackedUser { user_id: alice, outdated: true });
//! store.apply(changes).await?;
//!
//! store.change_passphrase("battery staple")?;
//! drop(store);
//!
//! let store = SqliteStore::open(&path, StoreKey::Passphrase("battery staple".into()))?;
//! assert_eq!(store.tracked_users().await?.len(), 1);
//! assert!(SqliteStore::open(&path, StoreKey::Passphrase("correct horse".into())).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Encryption at rest
//!
//! Every record is stored as its JSON (vodozemac pickles inside it as
//! base64 of MessagePack, see `newt_proto::records::pickle_encoding`),
//! sealed with AES-256-GCM under a fresh random 96-bit nonce; the associated data is the table name and the row's
//! key columns, so a ciphertext cannot be moved to another row. Identifiers
//! (user, room, device and session IDs, Curve25519 keys, request IDs) are
//! stored only as HMAC-SHA256 keyed hashes. Both keys are derived with
//! HKDF-SHA256 from a random 32-byte data key, with distinct info strings
//! (`newt-sqlite value encryption v1`, `newt-sqlite lookup hash v1`).
//! What is visible without the key: row counts and sizes, which rows share
//! a room or user hash, three flags/counters (an inbound session's
//! `backed_up`, a key request's `sent`, a replay record's message index), and
//! the KDF parameters and salt.
//!
//! The data key is stored wrapped (AES-256-GCM) by a key derived from the
//! [`StoreKey`]: HKDF for [`StoreKey::Raw`], Argon2id (64 MiB, 3 passes) for
//! [`StoreKey::Passphrase`], run once per open. Argon2id is memory-hard,
//! which PBKDF2 is not, so a GPU guessing passphrases gains far less.
//! [`SqliteStore::change_key`] re-wraps the data key only. A wrong key is
//! [`StoreError::WrongKey`](newt_store::StoreError::WrongKey) and writes
//! nothing: the file is only read until the key is proven.
//!
//! Because identifiers are hashed, [`inbound_group_sessions_page`] pages in
//! hash order, not by room ID: every session is visited exactly once, which
//! is what bulk readers (export, backup) need.
//!
//! # Durability and crashes
//!
//! The database runs in WAL mode with `synchronous = FULL`: each commit
//! syncs the WAL before [`apply`] returns, so a power cut loses nothing that
//! was acknowledged (with `NORMAL`, the last commits before a power cut could
//! roll back after they were acknowledged, which would break "persist before
//! acknowledge": a lost ratchet step or sync token). The cost is one fsync
//! per [`apply`]. On macOS `fullfsync` is on too, since plain fsync there
//! does not flush the drive cache. Each [`apply`] is one `BEGIN IMMEDIATE`
//! transaction: after a crash, a change is either wholly there or not at all.
//!
//! One exception: a change made of Megolm replay records alone (what
//! decrypting a room event writes) is committed with `synchronous = NORMAL`.
//! It survives a crash of the application at once, and a power cut from the
//! next durable commit on (which syncs the WAL holding it); only a power cut
//! in between can lose it, and with it the replay check of that one index
//! (an event already decrypted and shown). That saves the fsync on every
//! decryption (decrypting one event: 287 → 73 µs on the benchmark machine).
//! Ratchet state, keys, trust and sync tokens are always committed with
//! `FULL`.
//!
//! # Several processes
//!
//! Any number of processes may open the same file. Writers queue on SQLite's
//! lock (`busy_timeout`), and anything still reported as busy is retried
//! inside the store with backoff, so no caller ever sees "database is
//! locked". The account's generation check
//! ([`check_generation`](newt_store::check_generation)) runs inside the
//! writing transaction: a process that loaded the account before another
//! process changed it gets [`StaleGeneration`](newt_store::StoreError) and
//! must reload, instead of overwriting.
//!
//! # Threads and async
//!
//! [`Store`](newt_store::Store) is async, SQLite is not. The store holds one
//! connection behind a `std::sync::Mutex` and does the work inline in each
//! call: the statements are short (one keyed lookup, or one transaction per
//! [`apply`]) and the fsync dominates. Inline work keeps the store free of a
//! runtime dependency and of a thread per store. A caller on a busy
//! multi-threaded executor that cannot afford a blocked worker for the
//! duration of an fsync (or, under contention, of another process's write)
//! can call it from `spawn_blocking`. [`SqliteStore::open`] and
//! [`SqliteStore::change_key`] are plain blocking functions, since a
//! passphrase makes them run a deliberately slow KDF.
//!
//! # Schema
//!
//! The schema version is `PRAGMA user_version`; `PRAGMA application_id`
//! marks the file as a newt store. Migrations run in order at open, one
//! transaction each. `tests/fixtures/v1.sqlite` is a store written by schema
//! version 1 and is opened by the tests of every later version (it migrates
//! to version 2, which adds the `identities` table for cross-signing; our
//! private cross-signing keys are a sealed singleton). A file that
//! is not an SQLite database, is truncated, belongs to another program, or
//! was written by a newer version is refused with a typed error and left
//! untouched.
//!
//! [`apply`]: newt_store::Store::apply
//! [`inbound_group_sessions_page`]: newt_store::Store::inbound_group_sessions_page

mod apply;
mod cipher;
mod file;
mod keys;
mod retry;
mod schema;
mod store;

pub use keys::StoreKey;
pub use store::SqliteStore;
