//! The at-rest cipher of [`newt_store_crypto`] on SQLite rows: a row's key
//! columns are SQL values, and its associated data is built from them.
//!
//! The scheme (keys, value format, associated data, lookup hashes, row
//! digests) is described in that crate; this module only maps
//! [`Value`]s onto its [`KeyColumn`]s.

use rusqlite::types::Value;
use serde::de::DeserializeOwned;
use serde::Serialize;

use newt_store::StoreError;
use newt_store_crypto::{associated_data, KeyColumn};
pub(crate) use newt_store_crypto::{withheld_key, Cipher, Kind};

/// The associated data of the row (`table`, `keys`).
pub(crate) fn row_ad(table: &str, keys: &[Value]) -> Vec<u8> {
    associated_data(table, keys.iter().map(column))
}

fn column(value: &Value) -> KeyColumn<'_> {
    match value {
        Value::Null => KeyColumn::Null,
        Value::Integer(i) => KeyColumn::Integer(*i),
        Value::Real(r) => KeyColumn::Real(*r),
        Value::Text(t) => KeyColumn::Text(t),
        Value::Blob(b) => KeyColumn::Blob(b),
    }
}

/// [`Cipher`] on SQLite rows.
pub(crate) trait RowCipher {
    /// The keyed hash of an identifier, as an SQL parameter.
    fn key(&self, kind: Kind, value: &str) -> Value;
    /// Serialises `record` and seals it for the row (`table`, `keys`).
    fn seal_json<T: Serialize>(
        &self,
        table: &str,
        keys: &[Value],
        record: &T,
    ) -> Result<Vec<u8>, StoreError>;
    /// Opens a value sealed for the row (`table`, `keys`) and deserialises it.
    fn open_json<T: DeserializeOwned>(
        &self,
        table: &str,
        keys: &[Value],
        sealed: &[u8],
    ) -> Result<T, StoreError>;
    /// The keyed digest of the row as stored.
    fn row_digest(&self, table: &str, keys: &[Value], sealed: &[u8]) -> [u8; 32];
}

impl RowCipher for Cipher {
    fn key(&self, kind: Kind, value: &str) -> Value {
        Value::Blob(self.hash(kind, value).to_vec())
    }

    fn seal_json<T: Serialize>(
        &self,
        table: &str,
        keys: &[Value],
        record: &T,
    ) -> Result<Vec<u8>, StoreError> {
        self.seal_record(&row_ad(table, keys), record)
    }

    fn open_json<T: DeserializeOwned>(
        &self,
        table: &str,
        keys: &[Value],
        sealed: &[u8],
    ) -> Result<T, StoreError> {
        self.open_record(&row_ad(table, keys), sealed).map_err(|e| match e {
            StoreError::Corrupt(message) if message.starts_with("undecodable") => {
                StoreError::Corrupt(format!("{table}: {message}"))
            }
            other => other,
        })
    }

    fn row_digest(&self, table: &str, keys: &[Value], sealed: &[u8]) -> [u8; 32] {
        self.digest_row(&row_ad(table, keys), sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(byte: u8) -> Cipher {
        Cipher::new(&[byte; 32]).unwrap()
    }

    #[test]
    fn values_round_trip_only_in_their_row() {
        let c = cipher(1);
        let keys = [c.key(Kind::Room, "!a:x"), Value::Integer(3)];
        let sealed = c.seal_json("t", &keys, &"hello").unwrap();
        let back: String = c.open_json("t", &keys, &sealed).unwrap();
        assert_eq!(back, "hello");
        // Another table, another row, another flag, another key: all refuse.
        assert!(c.open_json::<String>("u", &keys, &sealed).is_err());
        let other = [c.key(Kind::Room, "!b:x"), Value::Integer(3)];
        assert!(c.open_json::<String>("t", &other, &sealed).is_err());
        let flag = [keys[0].clone(), Value::Integer(4)];
        assert!(c.open_json::<String>("t", &flag, &sealed).is_err());
        assert!(cipher(2).open_json::<String>("t", &keys, &sealed).is_err());
    }

    #[test]
    fn undecodable_values_name_their_table() {
        let c = cipher(1);
        let keys = [Value::Text("account".into())];
        let sealed = c.seal_json("singletons", &keys, &"not a number").unwrap();
        match c.open_json::<u64>("singletons", &keys, &sealed) {
            Err(StoreError::Corrupt(message)) => {
                assert!(message.starts_with("singletons: undecodable value"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Every SQL storage class maps to the key column of the same class, so
    /// the associated data of a row is what newt-sqlite sealed it with
    /// before the scheme moved to newt-store-crypto (the committed v3
    /// fixtures hold such rows; `tests/store/fixture_v3.rs` reads them).
    #[test]
    fn sql_values_map_to_their_key_columns() {
        let values = [
            Value::Null,
            Value::Integer(-2),
            Value::Real(0.5),
            Value::Text("account".into()),
            Value::Blob(vec![1, 2]),
        ];
        let expected = [
            KeyColumn::Null,
            KeyColumn::Integer(-2),
            KeyColumn::Real(0.5),
            KeyColumn::Text("account"),
            KeyColumn::Blob(&[1, 2]),
        ];
        let mapped: Vec<KeyColumn<'_>> = values.iter().map(column).collect();
        assert_eq!(mapped, expected);
    }
}
