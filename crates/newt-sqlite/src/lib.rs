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
//! The scheme is [`newt_store_crypto`]'s, shared with the browser's store so
//! that the two cannot drift; its crate docs give it byte by byte. In short:
//!
//! Every record is stored as its JSON (vodozemac pickles inside it as
//! base64 of MessagePack, see `newt_proto::records::pickle_encoding`),
//! sealed with AES-256-GCM under a fresh random 96-bit nonce; the associated data is the table name and the row's
//! key columns, so a ciphertext cannot be moved to another row. Identifiers
//! (user, room, device and session IDs, Curve25519 keys, request IDs) are
//! stored only as HMAC-SHA256 keyed hashes. These keys, and the one of the
//! row digests (see [Threat model](#threat-model)), are derived with
//! HKDF-SHA256 from a random 32-byte data key, with distinct info strings
//! (`newt-sqlite value encryption v1`, `newt-sqlite lookup hash v1`,
//! `newt-sqlite row digest v1`).
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
//! # Threat model
//!
//! The store protects its contents from someone who gets the file (a
//! backup, a lost disk, another program on the device) but not the key.
//!
//! **Reading the file** (with its `-wal` and `-shm` companions, and any old
//! copy) yields no plaintext: no identifier, key, pickle or event ID, and
//! not the passphrase (each guess costs an Argon2id run). It does show:
//! how many rows each table has and how large each value is (so roughly
//! how many devices, sessions and decrypted events there are); which rows
//! share a room or user hash; three values left in the clear for the
//! indexes (an inbound session's `backed_up`, a key request's `sent`, a
//! replay record's message index); the KDF parameters and salt; and, from
//! file times and WAL growth, when and how much the store writes (a replay
//! record per decrypted event, for one).
//!
//! **Writing the file** without the key, one can neither forge nor alter a
//! value, nor move one to another row or table (the associated data binds
//! it to its table and key columns, flags included), nor make the store
//! take another key. One can corrupt the file (a typed error, not a
//! crash), delete rows, and put back older sealed copies of single rows or
//! of the whole file. Those do harm: an older account reuses one-time keys
//! that were already used; a missing one gets replaced by a new account;
//! an older Olm or outbound Megolm session reuses message keys; a missing
//! replay record lets a replayed event through; a missing or older identity
//! hides that a user's master key changed, or was once verified.
//!
//! **What the store detects.** An integrity record (one more sealed row,
//! written in the transaction of every [`apply`]) holds a counter of
//! durable commits, a keyed digest of each table and one of each singleton
//! row (the scheme is described in `src/integrity.rs`). Tampering is
//! reported as [`StoreError::Corrupt`](newt_store::StoreError::Corrupt)
//! with a message starting "tampering detected", and the store writes
//! nothing:
//!
//! - the account, the sync token and our private cross-signing keys,
//!   deleted or put back from an older copy: at open, and at every read and
//!   write of them;
//! - every other table (identities, Olm and Megolm sessions, replay
//!   records, devices, ...): by [`SqliteStore::verify_integrity`], which
//!   reads the whole store and so is not part of every open (there is an
//!   identity per user and a replay record per decrypted event; checking
//!   10,000 identities made an open seven times slower). Apps may run it
//!   at start-up in the background, or now and then. A tampered row stays visible to it even
//!   after the store has written that row again, because a commit accounts
//!   for the row it finds, not for the one it expected;
//! - the integrity record deleted, or the schema version set back so that
//!   the record would be rebuilt around the rows left: at open;
//! - the whole file put back to an older copy while a handle has it open
//!   (the commit counter went down): at the handle's next read of a
//!   singleton, write, or [`SqliteStore::commit_counter`].
//!
//! **What it does not detect.** A rollback of the whole file, rows and
//! record together, between two opens: nothing in the file tells an old
//! copy from the current one. An app narrows that gap by keeping
//! [`SqliteStore::commit_counter`] outside the file (the platform
//! keychain) and comparing it at open; commits of Megolm replay records
//! alone do not advance the counter (a power cut may undo them, and a
//! keychain value must never be ahead of the file), so a rollback to the
//! last durable commit, dropping only replay records written since, is
//! invisible to it. Tampering with the tables checked
//! only by [`SqliteStore::verify_integrity`] takes effect until it runs
//! (a replay record deleted before the replayed event arrives lets that
//! event through; the next check reports it). A store upgraded from an
//! earlier schema version trusts its rows as they are at the upgrade, and
//! an attacker who kept its key-check row from before the upgrade can put
//! that back, set the schema version back, and have the record rebuilt.
//!
//! **Upgrading to schema v3.** A process of an older newt that still has
//! the file open keeps writing without updating the integrity record, and
//! the next check then reports tampering that did not happen. Close every
//! process on the store (an app and its notification extension) before the
//! first open by a newer newt.
//!
//! Cost: per commit, one primary-key lookup per row written and one more
//! sealed row of about 450 bytes (no extra fsync); per singleton read, a
//! read of that row too; per open, a read of the singletons.
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
//! private cross-signing keys are a sealed singleton; and to version 3,
//! which adds the integrity record, see [Threat model](#threat-model)).
//! `tests/fixtures/v3-raw.sqlite` and `v3-passphrase.sqlite` are version 3
//! stores written before the cipher moved to `newt_store_crypto`, opened by
//! every later build (provenance in `tests/fixtures/README.md`). A
//! file that is not an SQLite database, is truncated, belongs to another
//! program, or was written by a newer version is refused with a typed error
//! and left untouched.
//!
//! [`apply`]: newt_store::Store::apply
//! [`inbound_group_sessions_page`]: newt_store::Store::inbound_group_sessions_page

mod apply;
mod cipher;
mod file;
mod integrity;
mod keys;
mod retry;
mod schema;
mod store;

pub use keys::StoreKey;
pub use store::SqliteStore;
