//! [`IndexedDbStore`]: opening, key changes, closing, and the keyed reads
//! of [`Store`].

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;
use std::rc::Rc;

use js_sys::{Reflect, Uint8Array};
use serde::de::DeserializeOwned;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{IdbDatabase, IdbObjectStore, IdbTransaction};

use newt_proto::identities::{IdentityRecord, PrivateIdentityRecord};
use newt_proto::ids::{RoomId, UserId};
use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, MessageIndexRecord,
    OlmSessionRecord, OutboundGroupSessionRecord, TrackedUser, WithheldRecord,
};
use newt_store::{Changes, SessionCursor, Store, StoreError};
use newt_store_crypto::tables::{
    Table, ACCOUNT, DEVICES, IDENTITIES, INBOUND, KEY_REQUESTS, MESSAGE_INDICES, OLM_SESSIONS,
    OUTBOUND, PRIVATE_IDENTITY, SINGLETONS, SYNC_TOKEN, TABLES, TRACKED_USERS, WITHHELD,
};
use newt_store_crypto::{
    generate, seal_key_check, unlock, withheld_key, wrap, Cipher, DataKey, KeyMaterial, Kind,
    StoreKey, WrappedDataKey,
};

use crate::apply;
use crate::idb::{self, Durability};
use crate::layout::{
    self, Column, SealedRow, KEY_REQUESTS_BY_SENT, KEY_REQUESTS_BY_SESSION, META, SCHEMA_VERSION,
};

/// `meta` names of the key material.
const META_KEK: &str = "kek";
const META_DATA_KEY: &str = "data_key";
const META_KEY_CHECK: &str = "key_check";

/// A [`Store`] in one IndexedDB database, encrypted at rest. See the
/// [crate documentation](crate) for how it is laid out and what it keeps.
pub struct IndexedDbStore {
    db: IdbDatabase,
    name: String,
    cipher: Cipher,
    data_key: DataKey,
    /// Set when another connection asked for a newer version (or to delete
    /// the database) and this one closed.
    closed: Rc<Cell<bool>>,
    /// The `versionchange` handler, owned so that it lives as long as the
    /// connection.
    _on_version_change: Closure<dyn FnMut(web_sys::Event)>,
}

impl fmt::Debug for IndexedDbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IndexedDbStore").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Drop for IndexedDbStore {
    fn drop(&mut self) {
        self.db.set_onversionchange(None);
        self.db.close();
    }
}

impl IndexedDbStore {
    /// Opens the store in the IndexedDB database `name`, creating it if
    /// there is none. Runs the passphrase KDF (Argon2id, 64 MiB: about a
    /// second in a browser) when `key` is a passphrase.
    ///
    /// Errors: [`StoreError::WrongKey`] if `key` does not open it, and
    /// nothing is written; [`StoreError::TooNew`] if a newer build wrote
    /// it (left untouched); [`StoreError::Corrupt`] if the database is
    /// not a newt store; [`StoreError::Backend`] if IndexedDB is not
    /// available (e.g. some private browsing modes) or fails.
    pub async fn open(name: &str, key: StoreKey) -> Result<Self, StoreError> {
        let db = open_database(name).await?;
        let closed = Rc::new(Cell::new(false));
        let on_version_change = {
            let (db, closed) = (db.clone(), closed.clone());
            Closure::<dyn FnMut(web_sys::Event)>::new(move |_event: web_sys::Event| {
                // Another tab upgrades or deletes the database: let it, and
                // report every later call on this handle as closed.
                closed.set(true);
                db.close();
            })
        };
        db.set_onversionchange(Some(on_version_change.as_ref().unchecked_ref()));
        let (data_key, cipher) = match unlock_or_create(&db, &key).await {
            Ok(unlocked) => unlocked,
            Err(e) => {
                db.set_onversionchange(None);
                db.close();
                return Err(e);
            }
        };
        Ok(Self {
            db,
            name: name.to_owned(),
            cipher,
            data_key,
            closed,
            _on_version_change: on_version_change,
        })
    }

    /// Re-wraps the store's data key for `new_key`; nothing else is
    /// re-encrypted. Other connections keep working; the old key no longer
    /// opens the store.
    pub async fn change_key(&self, new_key: StoreKey) -> Result<(), StoreError> {
        let wrapped = wrap(&self.data_key, &new_key)?;
        let tx = self.transaction(&[META], Some(Durability::Strict))?;
        let done = idb::completion(&tx);
        write_key_material(&tx, &self.cipher, &wrapped)?;
        idb::settle("change key", done).await.map(drop)
    }

    /// Sets a new passphrase: shorthand for
    /// [`change_key`](Self::change_key)`(StoreKey::Passphrase(..))`.
    pub async fn change_passphrase(
        &self,
        new_passphrase: impl Into<String>,
    ) -> Result<(), StoreError> {
        self.change_key(StoreKey::Passphrase(new_passphrase.into())).await
    }

    /// The database name the store was opened with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the connection was closed because another tab upgraded or
    /// deleted the database (every call then fails; open the store again).
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    fn transaction(
        &self,
        stores: &[&str],
        durability: Option<Durability>,
    ) -> Result<IdbTransaction, StoreError> {
        if self.closed.get() {
            return Err(closed());
        }
        idb::transaction(&self.db, stores, durability).map_err(|e| {
            if self.closed.get() {
                closed()
            } else {
                e
            }
        })
    }

    fn read_tx(&self, table: &Table) -> Result<(IdbTransaction, IdbObjectStore), StoreError> {
        let tx = self.transaction(&[table.name], None)?;
        let store = tx.object_store(table.name).map_err(|e| idb::js_error("store", e))?;
        Ok((tx, store))
    }

    /// The record of `table` at the primary key `keys`.
    async fn get<T: DeserializeOwned>(
        &self,
        table: &'static Table,
        keys: &[Column],
    ) -> Result<Option<T>, StoreError> {
        let (tx, _) = self.read_tx(table)?;
        let row = apply::get(&tx, table, keys).await?;
        row.map(|r| r.open(&self.cipher, table)).transpose()
    }

    /// The records of `table` in the key range or key `query` (undefined:
    /// all), at most `limit`.
    async fn get_all<T: DeserializeOwned>(
        &self,
        table: &'static Table,
        query: &JsValue,
        limit: Option<u32>,
    ) -> Result<Vec<T>, StoreError> {
        let (_tx, store) = self.read_tx(table)?;
        let all = idb::request("getAll", || match limit {
            Some(limit) => store.get_all_with_key_and_limit(query, limit),
            None => store.get_all_with_key(query),
        })
        .await?;
        self.open_rows(table, layout::rows(table, &all)?)
    }

    /// The records of `table` under each key prefix of `prefixes`, in one
    /// transaction: every request is made before the first is awaited.
    async fn get_all_of<T: DeserializeOwned>(
        &self,
        table: &'static Table,
        prefixes: &[Vec<Column>],
    ) -> Result<Vec<T>, StoreError> {
        if prefixes.is_empty() {
            return Ok(Vec::new());
        }
        let (_tx, store) = self.read_tx(table)?;
        let mut pending = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            let range = layout::prefix_range(prefix)?;
            let request = store.get_all_with_key(&range).map_err(|e| idb::js_error("getAll", e))?;
            pending.push(idb::promise(&request));
        }
        let mut found = Vec::new();
        for promise in pending {
            let all = idb::settle("getAll", promise).await?;
            found.extend(self.open_rows::<T>(table, layout::rows(table, &all)?)?);
        }
        Ok(found)
    }

    fn open_rows<T: DeserializeOwned>(
        &self,
        table: &Table,
        rows: Vec<SealedRow>,
    ) -> Result<Vec<T>, StoreError> {
        rows.iter().map(|r| r.open(&self.cipher, table)).collect()
    }

    fn hash(&self, kind: Kind, value: &str) -> Column {
        Column::Hash(self.cipher.hash(kind, value))
    }

    /// The durability the browser gives a transaction opened as the store
    /// opens its commits (for the tests).
    #[cfg(test)]
    pub(crate) fn durability_of_commit(&self, replay_only: bool) -> Option<String> {
        let d = if replay_only { Durability::Relaxed } else { Durability::Strict };
        let tx = self.transaction(&[SINGLETONS.name], Some(d)).ok()?;
        idb::durability_of(&tx)
    }
}

fn closed() -> StoreError {
    StoreError::Backend(
        "the IndexedDB connection was closed: another tab upgraded or deleted the database".into(),
    )
}

/// Deletes the store's database `name` (sign-out). Open connections to it
/// (this page's or another tab's) close themselves first.
pub async fn delete_store(name: &str) -> Result<(), StoreError> {
    idb::delete(name).await
}

/// Opens the database at [`SCHEMA_VERSION`], creating or upgrading its
/// object stores; a newer database is [`StoreError::TooNew`] and left
/// alone.
async fn open_database(name: &str) -> Result<IdbDatabase, StoreError> {
    let db = match idb::open(name, Some(SCHEMA_VERSION), layout::upgrade).await {
        Ok(db) => db,
        Err(e) if idb::error_name(&e).as_deref() == Some("VersionError") => {
            // Opened without a version, an existing database is not
            // upgraded: only its version is read.
            let db = idb::open(name, None, |_, _, _| Ok(()))
                .await
                .map_err(|e| idb::js_error("open", e))?;
            let found = db.version() as u32;
            db.close();
            return Err(StoreError::TooNew { found, supported: SCHEMA_VERSION });
        }
        Err(e) => return Err(idb::js_error("open", e)),
    };
    let names = db.object_store_names();
    let ours =
        std::iter::once(META).chain(TABLES.iter().map(|t| t.name)).all(|n| names.contains(n));
    if !ours {
        db.close();
        return Err(StoreError::Corrupt("the database is not a newt store".into()));
    }
    Ok(db)
}

/// Unlocks the store, or gives a new one its key. Nothing is written
/// before the key is proven: a new store's key material is written only
/// if there is none (a readwrite transaction that reads first, so that two
/// tabs creating one store at once agree on one key).
async fn unlock_or_create(
    db: &IdbDatabase,
    key: &StoreKey,
) -> Result<(DataKey, Cipher), StoreError> {
    let tx = idb::transaction(db, &[META], None)?;
    if let Some(material) = read_key_material(&tx).await? {
        return unlock(&material, key);
    }
    // The slow KDF runs outside any transaction.
    let (data_key, cipher, wrapped) = generate(key)?;
    let tx = idb::transaction(db, &[META], Some(Durability::Strict))?;
    let done = idb::completion(&tx);
    let raced = match read_key_material(&tx).await {
        Ok(Some(material)) => Some(material),
        Ok(None) => {
            write_key_material(&tx, &cipher, &wrapped)?;
            None
        }
        Err(e) => {
            let _aborted = tx.abort();
            let _settled = idb::settle("abort", done).await;
            return Err(e);
        }
    };
    idb::settle("create", done).await?;
    match raced {
        // Another tab created the store since we looked: its key it is.
        Some(material) => unlock(&material, key),
        None => Ok((data_key, cipher)),
    }
}

/// The key material in `meta`; `None` for a new store, an error if only
/// part of it is there.
async fn read_key_material(tx: &IdbTransaction) -> Result<Option<KeyMaterial>, StoreError> {
    let meta = tx.object_store(META).map_err(|e| idb::js_error("store", e))?;
    let mut pending = Vec::with_capacity(3);
    for name in [META_KEK, META_DATA_KEY, META_KEY_CHECK] {
        let request = meta.get(&JsValue::from_str(name)).map_err(|e| idb::js_error("get", e))?;
        pending.push(idb::promise(&request));
    }
    let mut found = Vec::with_capacity(3);
    for promise in pending {
        let record = idb::settle("get", promise).await?;
        found.push(if record.is_undefined() { None } else { Some(meta_bytes(&record)?) });
    }
    match (found.pop().flatten(), found.pop().flatten(), found.pop().flatten()) {
        (Some(key_check), Some(data_key), Some(kek)) => {
            Ok(Some(KeyMaterial { kek, data_key, key_check }))
        }
        (None, None, None) => Ok(None),
        _ => Err(StoreError::Corrupt("the store's key material is incomplete".into())),
    }
}

fn meta_bytes(record: &JsValue) -> Result<Vec<u8>, StoreError> {
    Reflect::get(record, &JsValue::from_str("value"))
        .ok()
        .and_then(|v| v.dyn_into::<Uint8Array>().ok())
        .map(|v| v.to_vec())
        .ok_or_else(|| StoreError::Corrupt("a meta record is not bytes".into()))
}

/// Puts the wrapped data key and the key check into `meta` (requests made
/// on `tx`; its completion tells whether they were written).
fn write_key_material(
    tx: &IdbTransaction,
    cipher: &Cipher,
    wrapped: &WrappedDataKey,
) -> Result<(), StoreError> {
    let meta = tx.object_store(META).map_err(|e| idb::js_error("store", e))?;
    let key_check = seal_key_check(cipher)?;
    for (name, value) in
        [(META_KEK, &wrapped.kek), (META_DATA_KEY, &wrapped.data_key), (META_KEY_CHECK, &key_check)]
    {
        let record = js_sys::Object::new();
        let set = |field: &str, v: &JsValue| Reflect::set(&record, &JsValue::from_str(field), v);
        set("name", &JsValue::from_str(name))
            .and_then(|_| set("value", &Uint8Array::from(&value[..]).into()))
            .and_then(|_| meta.put(&record))
            .map_err(|e| idb::js_error("put", e))?;
    }
    Ok(())
}

#[async_trait::async_trait(?Send)]
impl Store for IndexedDbStore {
    async fn account(&self) -> Result<Option<AccountRecord>, StoreError> {
        self.get(&SINGLETONS, &[Column::Text(ACCOUNT)]).await
    }

    async fn olm_sessions(&self, sender_key: &str) -> Result<Vec<OlmSessionRecord>, StoreError> {
        let range = layout::prefix_range(&[self.hash(Kind::SenderKey, sender_key)])?;
        self.get_all(&OLM_SESSIONS, &range, None).await
    }

    async fn inbound_group_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<InboundGroupSessionRecord>, StoreError> {
        let keys =
            [self.hash(Kind::Room, room_id.as_str()), self.hash(Kind::MegolmSession, session_id)];
        self.get(&INBOUND, &keys).await
    }

    /// Pages in key order, that is by (room hash, session hash): the plain
    /// IDs are not stored. The cursor is hashed to resume, so every session
    /// is visited exactly once.
    async fn inbound_group_sessions_page(
        &self,
        after: SessionCursor,
        limit: usize,
    ) -> Result<Vec<InboundGroupSessionRecord>, StoreError> {
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let range = match after {
            None => JsValue::UNDEFINED,
            Some((room_id, session_id)) => {
                let after = layout::key(&[
                    self.hash(Kind::Room, room_id.as_str()),
                    self.hash(Kind::MegolmSession, &session_id),
                ]);
                web_sys::IdbKeyRange::lower_bound_with_open(&after, true)
                    .map_err(|e| idb::js_error("key range", e))?
                    .into()
            }
        };
        self.get_all(&INBOUND, &range, Some(limit)).await
    }

    async fn outbound_group_session(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<OutboundGroupSessionRecord>, StoreError> {
        self.get(&OUTBOUND, &[self.hash(Kind::Room, room_id.as_str())]).await
    }

    async fn devices(&self, user_id: &UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        let range = layout::prefix_range(&[self.hash(Kind::User, user_id.as_str())])?;
        self.get_all(&DEVICES, &range, None).await
    }

    async fn tracked_users(&self) -> Result<Vec<TrackedUser>, StoreError> {
        self.get_all(&TRACKED_USERS, &JsValue::UNDEFINED, None).await
    }

    async fn key_request(&self, request_id: &str) -> Result<Option<KeyRequestRecord>, StoreError> {
        self.get(&KEY_REQUESTS, &[self.hash(Kind::Request, request_id)]).await
    }

    /// The first of the session's requests in request-hash order, from the
    /// `by_session` index (its entries for one key are in primary-key
    /// order).
    async fn key_request_for_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<KeyRequestRecord>, StoreError> {
        let (_tx, store) = self.read_tx(&KEY_REQUESTS)?;
        let index = store.index(KEY_REQUESTS_BY_SESSION).map_err(|e| idb::js_error("index", e))?;
        let key = layout::key(&[
            self.hash(Kind::Room, room_id.as_str()),
            self.hash(Kind::MegolmSession, session_id),
        ]);
        let found = idb::request("get", || index.get(&key)).await?;
        layout::row(&KEY_REQUESTS, &found)?.map(|r| r.open(&self.cipher, &KEY_REQUESTS)).transpose()
    }

    async fn unsent_key_requests(&self) -> Result<Vec<KeyRequestRecord>, StoreError> {
        let (_tx, store) = self.read_tx(&KEY_REQUESTS)?;
        let index = store.index(KEY_REQUESTS_BY_SENT).map_err(|e| idb::js_error("index", e))?;
        let all =
            idb::request("getAll", || index.get_all_with_key(&JsValue::from_f64(0.0))).await?;
        self.open_rows(&KEY_REQUESTS, layout::rows(&KEY_REQUESTS, &all)?)
    }

    async fn withheld(
        &self,
        room_id: &RoomId,
        session_id: &str,
        sender: &UserId,
    ) -> Result<Option<WithheldRecord>, StoreError> {
        let room = self.hash(Kind::Room, room_id.as_str());
        let by_sender = self.hash(Kind::WithheldSender, &withheld_key(session_id, sender));
        self.get(&WITHHELD, &[room, by_sender]).await
    }

    async fn message_index(
        &self,
        room_id: &RoomId,
        session_id: &str,
        index: u32,
    ) -> Result<Option<MessageIndexRecord>, StoreError> {
        let keys = [
            self.hash(Kind::Room, room_id.as_str()),
            self.hash(Kind::MegolmSession, session_id),
            Column::Integer(i64::from(index)),
        ];
        self.get(&MESSAGE_INDICES, &keys).await
    }

    async fn sync_token(&self) -> Result<Option<String>, StoreError> {
        self.get(&SINGLETONS, &[Column::Text(SYNC_TOKEN)]).await
    }

    async fn identity(&self, user_id: &UserId) -> Result<Option<IdentityRecord>, StoreError> {
        self.get(&IDENTITIES, &[self.hash(Kind::User, user_id.as_str())]).await
    }

    async fn private_identity(&self) -> Result<Option<PrivateIdentityRecord>, StoreError> {
        self.get(&SINGLETONS, &[Column::Text(PRIVATE_IDENTITY)]).await
    }

    async fn apply(&self, changes: Changes) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let prepared = apply::prepare(&self.cipher, changes)?;
        if self.closed.get() {
            return Err(closed());
        }
        apply::commit(&self.db, &self.cipher, &prepared).await.map_err(|e| {
            if self.closed.get() {
                closed()
            } else {
                e
            }
        })
    }

    /// One `count` per key on the key range, in one transaction; no
    /// session is read or decrypted.
    async fn sender_keys_with_olm_sessions(
        &self,
        sender_keys: &[&str],
    ) -> Result<HashSet<String>, StoreError> {
        let mut found = HashSet::new();
        if sender_keys.is_empty() {
            return Ok(found);
        }
        let (_tx, store) = self.read_tx(&OLM_SESSIONS)?;
        let mut pending = Vec::with_capacity(sender_keys.len());
        for key in sender_keys {
            let range = layout::prefix_range(&[self.hash(Kind::SenderKey, key)])?;
            let request = store.count_with_key(&range).map_err(|e| idb::js_error("count", e))?;
            pending.push((*key, idb::promise(&request)));
        }
        for (key, promise) in pending {
            if idb::settle("count", promise).await?.as_f64().unwrap_or(0.0) > 0.0 {
                found.insert(key.to_owned());
            }
        }
        Ok(found)
    }

    /// Point reads on the primary key, in one transaction.
    async fn inbound_group_sessions(
        &self,
        keys: &[(RoomId, String)],
    ) -> Result<Vec<InboundGroupSessionRecord>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let (_tx, store) = self.read_tx(&INBOUND)?;
        let mut pending = Vec::with_capacity(keys.len());
        for (room, session) in keys {
            let key = layout::key(&[
                self.hash(Kind::Room, room.as_str()),
                self.hash(Kind::MegolmSession, session),
            ]);
            let request = store.get(&key).map_err(|e| idb::js_error("get", e))?;
            pending.push(idb::promise(&request));
        }
        let mut found = Vec::new();
        for promise in pending {
            let record = idb::settle("get", promise).await?;
            if let Some(row) = layout::row(&INBOUND, &record)? {
                found.push(row.open(&self.cipher, &INBOUND)?);
            }
        }
        Ok(found)
    }

    async fn devices_of(&self, users: &[UserId]) -> Result<Vec<DeviceRecord>, StoreError> {
        let prefixes: Vec<Vec<Column>> =
            users.iter().map(|u| vec![self.hash(Kind::User, u.as_str())]).collect();
        self.get_all_of(&DEVICES, &prefixes).await
    }

    async fn olm_sessions_of(
        &self,
        sender_keys: &[&str],
    ) -> Result<Vec<OlmSessionRecord>, StoreError> {
        let prefixes: Vec<Vec<Column>> =
            sender_keys.iter().map(|k| vec![self.hash(Kind::SenderKey, k)]).collect();
        self.get_all_of(&OLM_SESSIONS, &prefixes).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

    /// The browser reports the durability the store asks for: strict for
    /// every commit but one of replay records alone.
    #[wasm_bindgen_test]
    async fn commits_are_strict_except_replay_records_alone() {
        let name = format!("newt-unit-durability-{}", js_sys::Math::random());
        let store = IndexedDbStore::open(&name, StoreKey::Raw([5; 32])).await.unwrap();
        assert_eq!(store.durability_of_commit(false).as_deref(), Some("strict"));
        assert_eq!(store.durability_of_commit(true).as_deref(), Some("relaxed"));
    }
}
