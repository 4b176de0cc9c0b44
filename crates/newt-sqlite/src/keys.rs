//! Where the key material lives: three rows of the `meta` table, `kek`
//! (how the key-encryption key is derived), `data_key` (the wrapped data
//! key) and `key_check`. What they hold, and how a [`StoreKey`] unlocks
//! them, is [`newt_store_crypto`]'s (see its "Key hierarchy").
//!
//! The key check also says whether the store keeps an integrity record
//! (see [`integrity`](crate::integrity)): `v2` since schema version 3, `v1`
//! before. No store can be opened without its key check, so an attacker
//! cannot make a store look older than its integrity record by deleting
//! the record and setting the schema version back.

use rusqlite::{Connection, OptionalExtension};

pub use newt_store_crypto::StoreKey;
pub(crate) use newt_store_crypto::{generate, unlock, wrap, DataKey};
use newt_store_crypto::{seal_key_check, KeyMaterial, WrappedDataKey};

use crate::cipher::Cipher;
use crate::retry::TxError;

/// `meta` rows.
const META_KEK: &str = "kek";
const META_DATA_KEY: &str = "data_key";
const META_KEY_CHECK: &str = "key_check";

/// Reads the key material; `None` if any row is missing.
pub(crate) fn read(conn: &Connection) -> Result<Option<KeyMaterial>, TxError> {
    let get = |name: &str| -> Result<Option<Vec<u8>>, rusqlite::Error> {
        conn.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
            .query_row([name], |row| row.get(0))
            .optional()
    };
    Ok(match (get(META_KEK)?, get(META_DATA_KEY)?, get(META_KEY_CHECK)?) {
        (Some(kek), Some(data_key), Some(key_check)) => {
            Some(KeyMaterial { kek, data_key, key_check })
        }
        _ => None,
    })
}

/// Whether the key check says the store keeps an integrity record (false
/// for a store from before schema version 3, and for a store being created).
pub(crate) fn keeps_integrity_record(conn: &Connection, cipher: &Cipher) -> Result<bool, TxError> {
    let sealed: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM meta WHERE name = ?1")?
        .query_row([META_KEY_CHECK], |row| row.get(0))
        .optional()?;
    match sealed {
        None => Ok(false),
        Some(sealed) => Ok(newt_store_crypto::keeps_integrity_record(cipher, &sealed)?),
    }
}

/// Seals the key check that says the store keeps an integrity record
/// (inside the caller's transaction, which writes that record).
pub(crate) fn write_key_check(conn: &Connection, cipher: &Cipher) -> Result<(), TxError> {
    let key_check = seal_key_check(cipher)?;
    conn.prepare_cached("INSERT OR REPLACE INTO meta(name, value) VALUES (?1, ?2)")?
        .execute((META_KEY_CHECK, key_check))?;
    Ok(())
}

/// Writes the wrapped data key (inside the caller's transaction), and the
/// key check sealed under `cipher`, the data key that `wrapped` wraps.
pub(crate) fn write(
    conn: &Connection,
    cipher: &Cipher,
    wrapped: &WrappedDataKey,
) -> Result<(), TxError> {
    let mut put =
        conn.prepare_cached("INSERT OR REPLACE INTO meta(name, value) VALUES (?1, ?2)")?;
    put.execute((META_KEK, &wrapped.kek))?;
    put.execute((META_DATA_KEY, &wrapped.data_key))?;
    write_key_check(conn, cipher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use newt_store::StoreError;

    /// The rows written for a new store unlock with its key only, and say
    /// that it keeps an integrity record.
    #[test]
    fn written_key_material_reads_back_and_unlocks() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL)",
        )
        .unwrap();
        assert!(read(&conn).unwrap().is_none());
        let key = StoreKey::Raw([1; 32]);
        let (data_key, cipher, wrapped) = generate(&key).unwrap();
        assert!(!keeps_integrity_record(&conn, &cipher).unwrap());
        write(&conn, &cipher, &wrapped).unwrap();
        let material = read(&conn).unwrap().unwrap();
        let (unlocked, _) = unlock(&material, &key).unwrap();
        assert_eq!(*unlocked, *data_key);
        assert!(keeps_integrity_record(&conn, &cipher).unwrap());
        assert!(matches!(unlock(&material, &StoreKey::Raw([2; 32])), Err(StoreError::WrongKey)));
    }
}
