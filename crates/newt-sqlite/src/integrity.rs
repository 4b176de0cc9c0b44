//! The integrity record: how a store notices rows that were deleted, or put
//! back from an older copy of the file, by someone who can write the file
//! but does not hold the key.
//!
//! Sealing binds a value to its row, not to a moment: an old sealed copy of
//! a row still opens. So one more sealed `meta` row, `integrity`, says what
//! the rows should be:
//!
//! - `counter`: how many durable commits the store has made since the
//!   record was created (schema version 3); every [`apply`] adds one,
//!   except a commit of replay records alone, which a power cut may undo
//!   (see the crate docs, "Durability and crashes").
//! - `sums`: per table, the sum modulo 2^256 of the keyed digests of its
//!   rows ([`Cipher::digest_row`]: HMAC-SHA256 over the row's associated
//!   data, that is its table and key columns, and its sealed value).
//! - `singletons`: the digest of each `singletons` row (the account, the
//!   sync token, our private cross-signing keys), so that each can be
//!   checked on its own, at every read.
//!
//! Every commit seals the record again, so it is kept small (about 450
//! bytes) and in a fixed binary layout rather than JSON: sealing and opening
//! it is most of what it adds to a commit. The record, its layout and its
//! arithmetic are [`newt_store_crypto::IntegrityRecord`], shared with the
//! other backends; this module keeps it in `meta`, numbers the tables by
//! their place in [`TABLES`], and reads the rows it accounts for.
//!
//! Each commit updates the record in its own transaction: for every row it
//! writes or removes, it subtracts the digest of the row it finds there and
//! adds the digest of the row it leaves. A sum therefore equals the sum of
//! its table's digests as long as only the store writes the file. Any other
//! change (a row deleted, added, or replaced by an older copy) makes them
//! differ, and because commits subtract what they find, not what the record
//! expected, the difference stays until a check sees it: a later write does
//! not launder it. The digests are keyed and the record is sealed, so an
//! attacker can neither compute a sum nor swap in a record that fits; an
//! older copy of the record no longer fits the rows written since, unless
//! the whole store goes back with it (which only a counter kept outside the
//! file can reveal).
//!
//! A sum can only be checked by reading its whole table ([`verify`]). Every
//! open checks the singletons (a few rows); the rest costs a read of the
//! whole store, so it is left to
//! [`SqliteStore::verify_integrity`](crate::SqliteStore::verify_integrity).
//!
//! [`apply`]: newt_store::Store::apply

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Transaction};

use newt_store::StoreError;
use newt_store_crypto::IntegrityRecord;
pub(crate) use newt_store_crypto::{tampered, CounterFloor, Digest};

use crate::cipher::{Cipher, RowCipher};
use crate::keys;
use crate::retry::TxError;
use crate::schema::{Table, TableSql, SINGLETONS, TABLES};
use crate::store::{query_sealed, SealedRow};

/// The `meta` name of the record.
const META_INTEGRITY: &str = "integrity";

/// The digest of a row as stored.
pub(crate) fn digest_of_row(cipher: &Cipher, table: &Table, (keys, sealed): &SealedRow) -> Digest {
    Digest::of(cipher.row_digest(table.name, keys, sealed))
}

/// The integrity record of this store's [`TABLES`], as sealed in `meta`.
#[derive(Debug)]
pub(crate) struct Integrity(IntegrityRecord);

impl Deref for Integrity {
    type Target = IntegrityRecord;

    fn deref(&self) -> &IntegrityRecord {
        &self.0
    }
}

impl DerefMut for Integrity {
    fn deref_mut(&mut self) -> &mut IntegrityRecord {
        &mut self.0
    }
}

impl Integrity {
    /// The record of an empty store.
    fn empty() -> Self {
        Integrity(IntegrityRecord::empty(TABLES.len()))
    }

    /// Reads and opens the record; a store without one has lost it.
    pub(crate) fn load(conn: &Connection, cipher: &Cipher) -> Result<Self, TxError> {
        let sealed: Option<Vec<u8>> = conn
            .prepare_cached("SELECT value FROM meta WHERE name = ?1")?
            .query_row([META_INTEGRITY], |row| row.get(0))
            .optional()?;
        let sealed = sealed.ok_or_else(|| tampered("the integrity record was deleted"))?;
        Ok(Integrity(IntegrityRecord::open(cipher, &sealed, TABLES.len())?))
    }

    /// Seals and writes the record (inside the caller's transaction).
    pub(crate) fn save(&self, conn: &Connection, cipher: &Cipher) -> Result<(), TxError> {
        let sealed = self.0.seal(cipher)?;
        // An update in place changes one page; a replace would also rewrite
        // the index entry of `name`.
        let updated = conn
            .prepare_cached("UPDATE meta SET value = ?2 WHERE name = ?1")?
            .execute((META_INTEGRITY, &sealed))?;
        if updated == 0 {
            conn.prepare_cached("INSERT INTO meta(name, value) VALUES (?1, ?2)")?
                .execute((META_INTEGRITY, &sealed))?;
        }
        Ok(())
    }

    /// Accounts for the row of `table` at `primary_key` going from `old` to
    /// `new` (digests; `None` for no row), as a commit writes or removes it.
    /// A singleton must be the copy last written; if it is not, the commit
    /// is refused.
    pub(crate) fn replace(
        &mut self,
        table: &Table,
        primary_key: &[Value],
        old: Option<Digest>,
        new: Option<Digest>,
    ) -> Result<(), StoreError> {
        let singleton =
            if table.name == SINGLETONS.name { Some(singleton_name(primary_key)?) } else { None };
        self.0.replace_row(table_index(table)?, singleton, old, new)
    }

    fn sum(&self, table: &Table) -> Result<Digest, StoreError> {
        self.0.sum(table_index(table)?)
    }
}

/// The position of `table` in [`TABLES`]: the record's number for it.
fn table_index(table: &Table) -> Result<usize, StoreError> {
    table
        .index()
        .ok_or_else(|| StoreError::Backend(format!("{} is not in TABLES", table.name).into()))
}

/// Reads the singleton `name` and checks it against the record; the row
/// stays sealed.
pub(crate) fn checked_singleton(
    conn: &Connection,
    cipher: &Cipher,
    record: &Integrity,
    name: &str,
) -> Result<Option<SealedRow>, TxError> {
    let sql = SINGLETONS.select_sql(&SINGLETONS.primary_key_where());
    let row = query_sealed(conn, &SINGLETONS, &sql, &[Value::Text(name.into())])?.pop();
    record.check_singleton(name, row.as_ref().map(|r| digest_of_row(cipher, &SINGLETONS, r)))?;
    Ok(row)
}

/// The digest of the row of `table` at `primary_key`, if there is one.
pub(crate) fn stored_digest(
    conn: &Connection,
    cipher: &Cipher,
    table: &Table,
    primary_key: &[Value],
) -> Result<Option<Digest>, TxError> {
    let sql = table.select_sql(&table.primary_key_where());
    let row = query_sealed(conn, table, &sql, primary_key)?.pop();
    Ok(row.map(|r| digest_of_row(cipher, table, &r)))
}

/// Checks every row of `tables` against the record (for `singletons`, each
/// row on its own too), inside the caller's read transaction, and returns
/// the record.
pub(crate) fn verify(
    conn: &Connection,
    cipher: &Cipher,
    tables: &[&Table],
) -> Result<Integrity, TxError> {
    let record = Integrity::load(conn, cipher)?;
    for table in tables {
        let mut singletons = BTreeMap::new();
        let sum = scan(conn, cipher, table, &mut singletons)?;
        if table.name == SINGLETONS.name {
            for name in record.singleton_names().chain(singletons.keys().map(String::as_str)) {
                record.check_singleton(name, singletons.get(name).copied())?;
            }
        }
        if record.sum(table)? != sum {
            return Err(tampered(format!(
                "rows of {} were deleted, added or put back from an older copy",
                table.name
            ))
            .into());
        }
    }
    Ok(record)
}

/// Schema version 3: the integrity record, built from the rows as they are
/// (they are trusted once, at the upgrade), and the key check that says the
/// store keeps one.
pub(crate) fn create(tx: &Transaction<'_>, cipher: &Cipher) -> Result<(), TxError> {
    if keys::keeps_integrity_record(tx, cipher)? {
        // Someone set the schema version back, so that the record would be
        // rebuilt around whatever rows are there now.
        return Err(tampered("the schema version was set back below 3").into());
    }
    let mut record = Integrity::empty();
    let mut singletons = BTreeMap::new();
    for (index, table) in TABLES.iter().enumerate() {
        let sum = scan(tx, cipher, table, &mut singletons)?;
        record.set_sum(index, sum)?;
    }
    for (name, digest) in &singletons {
        record.set_singleton(name, *digest);
    }
    record.save(tx, cipher)?;
    keys::write_key_check(tx, cipher)
}

/// The sum of the digests of `table`'s rows; for `singletons`, each row's
/// digest also goes into `singletons`.
fn scan(
    conn: &Connection,
    cipher: &Cipher,
    table: &Table,
    singletons: &mut BTreeMap<String, Digest>,
) -> Result<Digest, TxError> {
    let mut statement = conn.prepare(&table.select_sql(""))?;
    let mut rows = statement.query([])?;
    let mut sum = Digest::default();
    while let Some(row) = rows.next()? {
        let keys = (0..table.keys.len()).map(|i| row.get(i)).collect::<Result<Vec<Value>, _>>()?;
        let sealed: Vec<u8> = row.get(table.keys.len())?;
        let digest = Digest::of(cipher.row_digest(table.name, &keys, &sealed));
        sum = sum.wrapping_add(digest);
        if table.name == SINGLETONS.name {
            singletons.insert(singleton_name(&keys)?.to_owned(), digest);
        }
    }
    Ok(sum)
}

fn singleton_name(primary_key: &[Value]) -> Result<&str, StoreError> {
    match primary_key {
        [Value::Text(name)] => Ok(name),
        _ => Err(StoreError::Corrupt("a singletons row without a name".into())),
    }
}

#[cfg(test)]
mod tests {
    //! The record's own arithmetic and layout are tested in
    //! newt-store-crypto; these test how this store's tables map onto it.

    use super::*;

    #[test]
    fn a_singleton_must_be_the_copy_last_written() {
        let mut record = Integrity::empty();
        let name = [Value::Text("account".into())];
        let (first, second) = (Digest::of([1; 32]), Digest::of([2; 32]));
        record.replace(&SINGLETONS, &name, None, Some(first)).unwrap();
        record.check_singleton("account", Some(first)).unwrap();
        // Written again: the first copy is no longer the one.
        record.replace(&SINGLETONS, &name, Some(first), Some(second)).unwrap();
        for found in [Some(first), None] {
            assert!(matches!(
                record.check_singleton("account", found),
                Err(StoreError::Corrupt(_))
            ));
            let refused = record.replace(&SINGLETONS, &name, found, Some(first));
            assert!(matches!(refused, Err(StoreError::Corrupt(_))));
        }
        assert!(record.check_singleton("sync_token", Some(first)).is_err());
        assert_eq!(record.sum(&SINGLETONS).unwrap(), second);
        // Another table's rows are not singletons, and go to their own sum.
        let devices = crate::schema::DEVICES;
        let key = [Value::Blob(vec![1]), Value::Blob(vec![2])];
        record.replace(&devices, &key, None, Some(first)).unwrap();
        assert_eq!(record.sum(&devices).unwrap(), first);
        assert_eq!(record.sum(&SINGLETONS).unwrap(), second);
    }

    #[test]
    fn every_table_has_a_sum_and_the_record_stays_small() {
        let mut record = Integrity::empty();
        for (i, table) in TABLES.iter().enumerate() {
            record
                .replace(table, &[Value::Text("x".into())], None, Some(Digest::of([i as u8; 32])))
                .unwrap();
        }
        for name in ["private_identity", "sync_token"] {
            record.set_singleton(name, Digest::of([name.len() as u8; 32]));
        }
        let bytes = record.to_bytes().unwrap();
        assert!(bytes.len() < 500, "{} bytes", bytes.len());
        let unknown = Table { name: "unknown", keys: &["k"], primary_key: 1 };
        assert!(record.replace(&unknown, &[Value::Null], None, None).is_err());
    }
}
