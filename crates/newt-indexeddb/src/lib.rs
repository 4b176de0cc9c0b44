//! newt's [`Store`](newt_store::Store) for the browser, over IndexedDB
//! (issue 12). **A skeleton**: this crate holds the plan, and no store
//! yet. What is settled so far is the part every backend shares, the
//! at-rest scheme of [`newt_store_crypto`], which newt-sqlite already
//! uses; the store is to be written against it, as below.
//!
//! # Plan
//!
//! - **One database per store**, named by the app; its IndexedDB version
//!   is the schema version (`onupgradeneeded` runs the migrations in
//!   order; a database newer than this build is
//!   [`StoreError::TooNew`](newt_store::StoreError::TooNew), untouched).
//! - **Object stores named and keyed like newt-sqlite's tables**, so a
//!   record's associated data ([`newt_store_crypto::associated_data`]:
//!   table name and key columns) is the same in both backends: each value
//!   an object `{<key columns>, value}` whose key path is the primary-key
//!   columns (lookup hashes as `ArrayBuffer`s, which IndexedDB orders
//!   bytewise, so paging inbound sessions in hash order works as in
//!   SQLite). Indexes for the keyed reads: Olm sessions by sender key,
//!   devices by user, key requests by session and unsent ones, inbound
//!   sessions not backed up. The table list and key columns should move
//!   from newt-sqlite's `src/schema.rs` into newt-store-crypto first, so
//!   that both backends read them from one place.
//! - **`meta`** holds the key material ([`newt_store_crypto::KeyMaterial`])
//!   and the sealed [`newt_store_crypto::IntegrityRecord`], as in SQLite.
//!   [`newt_store_crypto::unlock`] runs before anything is written: a wrong
//!   key is [`StoreError::WrongKey`](newt_store::StoreError::WrongKey) and
//!   leaves the database as it was.
//! - **`apply` is one `readwrite` transaction** over every store it
//!   touches: the generation checks (account, Olm, outbound) read inside
//!   it, removals before upserts, the integrity record updated in it.
//!   Durability `"strict"` for everything except a commit of replay
//!   records alone (newt-sqlite's rule). Everything is sealed before the
//!   transaction opens: an IndexedDB transaction commits itself when it
//!   has no pending request across an `await`.
//! - **Tabs**: two connections (two tabs) rely on the generation rules and
//!   the upload lease, as two SQLite processes do. A `versionchange` from
//!   another tab closes this connection and reports it; it never blocks.
//!
//! The browser tests (headless Chromium, `wasm-bindgen-test`) and the
//! conformance suite come with the store.
