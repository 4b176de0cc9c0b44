//! The database layout: one object store per table of
//! [`newt_store_crypto::tables`], its records JavaScript objects with one
//! property per key column and the sealed `value`, and the schema
//! versions that create them.
//!
//! A record of `olm_sessions`, for example, is
//! `{sender_key_hash: Uint8Array(32), session_hash: Uint8Array(32), value: Uint8Array}`
//! with the key path `["sender_key_hash", "session_hash"]`: the primary
//! key columns of the table, always as an array. IndexedDB orders binary
//! keys bytewise and arrays element by element, a shorter prefix first, so
//! a prefix of the key path is a key range (`[a]` to `[a, []]`: an array
//! sorts after every binary key) and the reads by sender key, by user and
//! the paging of inbound sessions need no index of their own.

use js_sys::{Array, Object, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{IdbDatabase, IdbIndexParameters, IdbObjectStoreParameters, IdbTransaction};

use newt_store::StoreError;
use newt_store_crypto::tables::{Table, KEY_REQUESTS, TABLES};
use newt_store_crypto::{associated_data, Cipher, KeyColumn};

/// The schema version this build writes: the database's IndexedDB version.
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// The object store of the key material (`kek`, `data_key`, `key_check`),
/// records `{name, value}` keyed by `name`, as newt-sqlite's `meta` table.
pub(crate) const META: &str = "meta";

/// The index of key requests by (room hash, session hash).
pub(crate) const KEY_REQUESTS_BY_SESSION: &str = "by_session";
/// The index of key requests by their `sent` flag (0 or 1).
pub(crate) const KEY_REQUESTS_BY_SENT: &str = "by_sent";

/// Creates or upgrades the object stores, from `old` (0 for a new
/// database) to [`SCHEMA_VERSION`], in the version-change transaction.
pub(crate) fn upgrade(db: &IdbDatabase, _tx: &IdbTransaction, old: u32) -> Result<(), JsValue> {
    if old < 1 {
        create_v1(db)?;
    }
    Ok(())
}

/// Schema version 1: `meta` and one object store per table.
fn create_v1(db: &IdbDatabase) -> Result<(), JsValue> {
    let params = IdbObjectStoreParameters::new();
    params.set_key_path(&JsValue::from_str("name"));
    db.create_object_store_with_optional_parameters(META, &params)?;
    for table in TABLES {
        let params = IdbObjectStoreParameters::new();
        params.set_key_path(&strings(&table.keys[..table.primary_key]));
        let store = db.create_object_store_with_optional_parameters(table.name, &params)?;
        if table.name == KEY_REQUESTS.name {
            let unique = IdbIndexParameters::new();
            unique.set_unique(false);
            store.create_index_with_str_sequence_and_optional_parameters(
                KEY_REQUESTS_BY_SESSION,
                &strings(&["room_hash", "session_hash"]),
                &unique,
            )?;
            store.create_index_with_str_and_optional_parameters(
                KEY_REQUESTS_BY_SENT,
                "sent",
                &unique,
            )?;
        }
    }
    Ok(())
}

fn strings(names: &[&str]) -> JsValue {
    names.iter().map(|s| JsValue::from_str(s)).collect::<Array>().into()
}

/// One key column's value as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Column {
    /// A flag or an index (a JavaScript number).
    Integer(i64),
    /// A singleton's name (a string).
    Text(&'static str),
    /// A lookup hash (a `Uint8Array`).
    Hash(newt_store_crypto::Hash),
}

impl Column {
    fn key_column(&self) -> KeyColumn<'_> {
        match self {
            Column::Integer(i) => KeyColumn::Integer(*i),
            Column::Text(t) => KeyColumn::Text(t),
            Column::Hash(h) => KeyColumn::Blob(h),
        }
    }

    /// The column as a JavaScript value (a key part or a property).
    pub(crate) fn to_js(&self) -> JsValue {
        match self {
            // Flags and indexes (u32 at most) are exact as f64.
            Column::Integer(i) => JsValue::from_f64(*i as f64),
            Column::Text(t) => JsValue::from_str(t),
            Column::Hash(h) => Uint8Array::from(&h[..]).into(),
        }
    }
}

/// The associated data of a row of `table` with the key columns `keys`.
pub(crate) fn row_ad(table: &Table, keys: &[Column]) -> Vec<u8> {
    associated_data(table.name, keys.iter().map(Column::key_column))
}

/// A key (or a key prefix) of `table`'s object store: the columns as an
/// array.
pub(crate) fn key(columns: &[Column]) -> JsValue {
    columns.iter().map(Column::to_js).collect::<Array>().into()
}

/// The key range of every record whose key starts with `prefix`.
pub(crate) fn prefix_range(prefix: &[Column]) -> Result<JsValue, StoreError> {
    let lower = key(prefix);
    let upper: Array = prefix.iter().map(Column::to_js).collect();
    // An array sorts after every number, string and binary key.
    upper.push(&Array::new());
    web_sys::IdbKeyRange::bound(&lower, &upper)
        .map(JsValue::from)
        .map_err(|e| crate::idb::js_error("key range", e))
}

/// A record ready to be put: its object (key columns and sealed value).
pub(crate) fn sealed_record(
    table: &Table,
    keys: &[Column],
    sealed: &[u8],
) -> Result<JsValue, StoreError> {
    let object = Object::new();
    for (name, column) in table.keys.iter().zip(keys) {
        set(&object, name, &column.to_js())?;
    }
    set(&object, "value", &Uint8Array::from(sealed).into())?;
    Ok(object.into())
}

fn set(object: &Object, name: &str, value: &JsValue) -> Result<(), StoreError> {
    Reflect::set(object, &JsValue::from_str(name), value)
        .map(drop)
        .map_err(|e| crate::idb::js_error("record", e))
}

/// A record as read: its key columns and its sealed value, still sealed.
#[derive(Debug)]
pub(crate) struct SealedRow {
    /// Key columns in the table's order, as read back from the record.
    pub(crate) keys: Vec<StoredColumn>,
    /// The sealed value.
    pub(crate) sealed: Vec<u8>,
}

/// A key column as read back (owned: a singleton's name is any string).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StoredColumn {
    /// A number.
    Integer(i64),
    /// A string.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl StoredColumn {
    fn key_column(&self) -> KeyColumn<'_> {
        match self {
            StoredColumn::Integer(i) => KeyColumn::Integer(*i),
            StoredColumn::Text(t) => KeyColumn::Text(t),
            StoredColumn::Blob(b) => KeyColumn::Blob(b),
        }
    }
}

impl SealedRow {
    /// Reads a record of `table` (the key columns it holds, not the ones
    /// asked for: the associated data checks that they belong together).
    pub(crate) fn from_js(table: &Table, record: &JsValue) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("{}: {what}", table.name));
        if !record.is_object() {
            return Err(corrupt("a record is not an object"));
        }
        let mut keys = Vec::with_capacity(table.keys.len());
        for name in table.keys {
            let value = Reflect::get(record, &JsValue::from_str(name))
                .map_err(|_| corrupt("unreadable key column"))?;
            keys.push(if let Some(n) = value.as_f64() {
                if n.fract() != 0.0 || !(0.0..=9.0e15).contains(&n) {
                    return Err(corrupt("a key column is not an integer"));
                }
                StoredColumn::Integer(n as i64)
            } else if let Some(s) = value.as_string() {
                StoredColumn::Text(s)
            } else if let Some(bytes) = value.dyn_ref::<Uint8Array>() {
                StoredColumn::Blob(bytes.to_vec())
            } else {
                return Err(corrupt("a key column of an unknown type"));
            });
        }
        let value = Reflect::get(record, &JsValue::from_str("value"))
            .map_err(|_| corrupt("unreadable value"))?;
        let sealed = value
            .dyn_ref::<Uint8Array>()
            .map(Uint8Array::to_vec)
            .ok_or_else(|| corrupt("the value is not bytes"))?;
        Ok(SealedRow { keys, sealed })
    }

    /// The associated data of this row.
    pub(crate) fn ad(&self, table: &Table) -> Vec<u8> {
        associated_data(table.name, self.keys.iter().map(StoredColumn::key_column))
    }

    /// Opens the sealed value.
    pub(crate) fn open<T: serde::de::DeserializeOwned>(
        &self,
        cipher: &Cipher,
        table: &Table,
    ) -> Result<T, StoreError> {
        cipher.open_record(&self.ad(table), &self.sealed).map_err(|e| match e {
            StoreError::Corrupt(message) => {
                StoreError::Corrupt(format!("{}: {message}", table.name))
            }
            other => other,
        })
    }
}

/// Every record of a `getAll` result.
pub(crate) fn rows(table: &Table, all: &JsValue) -> Result<Vec<SealedRow>, StoreError> {
    let all: &Array = all
        .dyn_ref()
        .ok_or_else(|| StoreError::Corrupt(format!("{}: getAll gave no array", table.name)))?;
    all.iter().map(|record| SealedRow::from_js(table, &record)).collect()
}

/// The record of a `get` result, if there is one.
pub(crate) fn row(table: &Table, found: &JsValue) -> Result<Option<SealedRow>, StoreError> {
    if found.is_undefined() {
        return Ok(None);
    }
    SealedRow::from_js(table, found).map(Some)
}
