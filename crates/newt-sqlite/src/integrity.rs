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
//!   rows ([`Cipher::row_digest`]: HMAC-SHA256 over the row's table, key
//!   columns and sealed value).
//! - `singletons`: the digest of each `singletons` row (the account, the
//!   sync token, our private cross-signing keys), so that each can be
//!   checked on its own, at every read.
//!
//! Every commit seals the record again, so it is kept small (about 450
//! bytes) and in a fixed binary layout rather than JSON: sealing and opening
//! it is most of what it adds to a commit.
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
//! open checks the singletons and the identities (small tables); the rest
//! costs a read of the whole store, so it is left to
//! [`SqliteStore::verify_integrity`](crate::SqliteStore::verify_integrity).
//!
//! [`apply`]: newt_store::Store::apply

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Transaction};

use newt_store::StoreError;

use crate::cipher::{associated_data, Cipher};
use crate::keys;
use crate::retry::TxError;
use crate::schema::{Table, SINGLETONS, TABLES};
use crate::store::{query_sealed, SealedRow};

/// The `meta` name of the record.
const META_INTEGRITY: &str = "integrity";
/// The first byte of the record's layout (see [`Integrity::to_bytes`]).
const LAYOUT_V1: u8 = 1;

/// A row digest, or a sum of them: a 256-bit number in four 64-bit limbs,
/// least significant first. Sums wrap around (modulo 2^256).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Digest([u64; 4]);

impl Digest {
    /// The digest of a row, from [`Cipher::row_digest`] (or a sum, from
    /// [`Digest::to_bytes`]).
    pub(crate) fn of(bytes: [u8; 32]) -> Self {
        let mut limbs = [0u64; 4];
        for (limb, chunk) in limbs.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(chunk);
            *limb = u64::from_le_bytes(le);
        }
        Digest(limbs)
    }

    fn to_bytes(self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        for (chunk, limb) in bytes.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&limb.to_le_bytes());
        }
        bytes
    }

    /// The digest of a row as stored.
    pub(crate) fn of_row(cipher: &Cipher, table: &Table, (keys, sealed): &SealedRow) -> Self {
        Digest::of(cipher.row_digest(table.name, keys, sealed))
    }

    fn add(self, other: Digest) -> Digest {
        let mut sum = [0u64; 4];
        let mut carry = false;
        for (i, limb) in sum.iter_mut().enumerate() {
            let (s, c1) = self.0[i].overflowing_add(other.0[i]);
            let (s, c2) = s.overflowing_add(u64::from(carry));
            *limb = s;
            carry = c1 || c2;
        }
        Digest(sum)
    }

    fn sub(self, other: Digest) -> Digest {
        let mut difference = [0u64; 4];
        let mut borrow = false;
        for (i, limb) in difference.iter_mut().enumerate() {
            let (d, b1) = self.0[i].overflowing_sub(other.0[i]);
            let (d, b2) = d.overflowing_sub(u64::from(borrow));
            *limb = d;
            borrow = b1 || b2;
        }
        Digest(difference)
    }
}

/// The integrity record, as sealed in `meta`.
#[derive(Debug)]
pub(crate) struct Integrity {
    /// Commits since the record was created.
    pub(crate) counter: u64,
    /// The sum of each table's row digests, in the order of [`TABLES`].
    sums: [Digest; TABLES.len()],
    /// Per `singletons` name: the digest of that row (absent: no row).
    singletons: BTreeMap<String, Digest>,
}

impl Integrity {
    /// The record of an empty store.
    fn empty() -> Self {
        Integrity {
            counter: 0,
            sums: [Digest::default(); TABLES.len()],
            singletons: BTreeMap::new(),
        }
    }

    /// Reads and opens the record; a store without one has lost it.
    pub(crate) fn load(conn: &Connection, cipher: &Cipher) -> Result<Self, TxError> {
        let sealed: Option<Vec<u8>> = conn
            .prepare_cached("SELECT value FROM meta WHERE name = ?1")?
            .query_row([META_INTEGRITY], |row| row.get(0))
            .optional()?;
        let sealed = sealed.ok_or_else(|| tampered("the integrity record was deleted"))?;
        Ok(Integrity::from_bytes(&cipher.open(&record_ad(), &sealed)?)?)
    }

    /// Seals and writes the record (inside the caller's transaction).
    pub(crate) fn save(&self, conn: &Connection, cipher: &Cipher) -> Result<(), TxError> {
        let sealed = cipher.seal(&record_ad(), &self.to_bytes())?;
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

    /// The layout: [`LAYOUT_V1`]; the counter (8 bytes, big-endian); the
    /// number of sums (1 byte) and each sum (32 bytes); then each singleton
    /// digest as its name's length (1 byte), its name and the digest.
    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(512);
        bytes.push(LAYOUT_V1);
        bytes.extend_from_slice(&self.counter.to_be_bytes());
        bytes.push(self.sums.len() as u8);
        for sum in &self.sums {
            bytes.extend_from_slice(&sum.to_bytes());
        }
        for (name, digest) in &self.singletons {
            bytes.push(name.len() as u8);
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(&digest.to_bytes());
        }
        bytes
    }

    fn from_bytes(mut bytes: &[u8]) -> Result<Self, StoreError> {
        let mut take = |n: usize| -> Result<&[u8], StoreError> {
            if bytes.len() < n {
                return Err(StoreError::Corrupt("the integrity record is cut short".into()));
            }
            let (head, rest) = bytes.split_at(n);
            bytes = rest;
            Ok(head)
        };
        let digest = |b: &[u8]| Digest::of(b.try_into().unwrap_or([0; 32]));
        let (layout, counter, count) = (take(1)?[0], take(8)?, take(1)?[0]);
        if layout != LAYOUT_V1 || usize::from(count) != TABLES.len() {
            return Err(StoreError::Corrupt(format!(
                "integrity record layout {layout} with {count} tables"
            )));
        }
        let mut record = Integrity::empty();
        record.counter = u64::from_be_bytes(counter.try_into().unwrap_or_default());
        for sum in &mut record.sums {
            *sum = digest(take(32)?);
        }
        while let Ok(len) = take(1) {
            let name = String::from_utf8(take(usize::from(len[0]))?.to_vec())
                .map_err(|_| StoreError::Corrupt("integrity record: a name is not UTF-8".into()))?;
            record.singletons.insert(name, digest(take(32)?));
        }
        Ok(record)
    }

    fn sum(&mut self, table: &Table) -> Result<&mut Digest, StoreError> {
        match TABLES.iter().position(|t| t.name == table.name) {
            Some(index) => Ok(&mut self.sums[index]),
            None => Err(StoreError::Backend(format!("{} is not in TABLES", table.name).into())),
        }
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
        if table.name == SINGLETONS.name {
            let name = singleton_name(primary_key)?;
            self.check_singleton(name, old)?;
            match new {
                Some(digest) => self.singletons.insert(name.to_owned(), digest),
                None => self.singletons.remove(name),
            };
        }
        let sum = self.sum(table)?;
        if let Some(old) = old {
            *sum = sum.sub(old);
        }
        if let Some(new) = new {
            *sum = sum.add(new);
        }
        Ok(())
    }

    /// Checks that the singleton `name` is the row last written (`found`:
    /// the digest of the row there, `None` if there is none).
    pub(crate) fn check_singleton(
        &self,
        name: &str,
        found: Option<Digest>,
    ) -> Result<(), StoreError> {
        match (self.singletons.get(name), found) {
            (Some(written), Some(found)) if *written == found => Ok(()),
            (None, None) => Ok(()),
            (Some(_), None) => Err(tampered(format!("the {name} row was deleted"))),
            (None, Some(_)) => {
                Err(tampered(format!("there is a {name} row that this store never wrote")))
            }
            (Some(_), Some(_)) => Err(tampered(format!(
                "the {name} row is not the one last written (an older copy was put back)"
            ))),
        }
    }
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
    record.check_singleton(name, row.as_ref().map(|r| Digest::of_row(cipher, &SINGLETONS, r)))?;
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
    Ok(row.map(|r| Digest::of_row(cipher, table, &r)))
}

/// Checks every row of `tables` against the record (for `singletons`, each
/// row on its own too), inside the caller's read transaction, and returns
/// the record.
pub(crate) fn verify(
    conn: &Connection,
    cipher: &Cipher,
    tables: &[&Table],
) -> Result<Integrity, TxError> {
    let mut record = Integrity::load(conn, cipher)?;
    for table in tables {
        let mut singletons = BTreeMap::new();
        let sum = scan(conn, cipher, table, &mut singletons)?;
        if table.name == SINGLETONS.name {
            for name in record.singletons.keys().chain(singletons.keys()) {
                record.check_singleton(name, singletons.get(name).copied())?;
            }
        }
        if *record.sum(table)? != sum {
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
    for table in TABLES {
        let sum = scan(tx, cipher, table, &mut record.singletons)?;
        *record.sum(table)? = sum;
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
        sum = sum.add(digest);
        if table.name == SINGLETONS.name {
            singletons.insert(singleton_name(&keys)?.to_owned(), digest);
        }
    }
    Ok(sum)
}

fn record_ad() -> Vec<u8> {
    associated_data("meta", &[Value::Text(META_INTEGRITY.into())])
}

fn singleton_name(primary_key: &[Value]) -> Result<&str, StoreError> {
    match primary_key {
        [Value::Text(name)] => Ok(name),
        _ => Err(StoreError::Corrupt("a singletons row without a name".into())),
    }
}

/// The highest commit counter this store handle has seen. The counter only
/// grows, so a lower one later means the whole file was put back to an
/// older copy while it was open.
#[derive(Debug)]
pub(crate) struct CounterFloor(AtomicU64);

impl CounterFloor {
    /// A floor at `counter`, the counter found at open.
    pub(crate) fn new(counter: u64) -> Self {
        CounterFloor(AtomicU64::new(counter))
    }

    /// Notes the counter of a commit this handle just made.
    pub(crate) fn raise(&self, counter: u64) {
        self.0.fetch_max(counter, Ordering::AcqRel);
    }

    /// Notes `counter` as seen; an error if an earlier one was higher.
    pub(crate) fn observe(&self, counter: u64) -> Result<(), StoreError> {
        let highest = self.0.fetch_max(counter, Ordering::AcqRel);
        if counter < highest {
            return Err(tampered(format!(
                "the commit counter went back from {highest} to {counter}: \
                 the file was replaced by an older copy"
            )));
        }
        Ok(())
    }
}

/// An attack on the file, as reported: [`StoreError::Corrupt`] with a
/// message that starts with "tampering detected".
pub(crate) fn tampered(what: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("tampering detected: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_carry_wrap_and_undo() {
        let max = Digest([u64::MAX; 4]);
        let one = Digest([1, 0, 0, 0]);
        assert_eq!(max.add(one), Digest::default());
        assert_eq!(Digest::default().sub(one), max);
        assert_eq!(Digest([u64::MAX, 0, 0, 0]).add(one), Digest([0, 1, 0, 0]));
        let a = Digest::of([7; 32]);
        let b = Digest::of([200; 32]);
        assert_eq!(a.add(b).sub(a), b);
        assert_eq!(a.add(b), b.add(a));
    }

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
        assert_eq!(*record.sum(&SINGLETONS).unwrap(), second);
    }

    #[test]
    fn the_record_round_trips_and_stays_small() {
        let mut record = Integrity::empty();
        record.counter = 0x0102_0304_0506_0708;
        for (i, table) in TABLES.iter().enumerate() {
            *record.sum(table).unwrap() = Digest::of([i as u8; 32]);
        }
        for name in ["account", "private_identity", "sync_token"] {
            record.singletons.insert(name.into(), Digest::of([name.len() as u8; 32]));
        }
        let bytes = record.to_bytes();
        assert!(bytes.len() < 500, "{} bytes", bytes.len());
        let back = Integrity::from_bytes(&bytes).unwrap();
        assert_eq!(
            (back.counter, back.sums, &back.singletons),
            (record.counter, record.sums, &record.singletons)
        );
        for cut in [0, 1, 9, 10, 100, bytes.len() - 1] {
            assert!(Integrity::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn the_counter_floor_only_rises() {
        let floor = CounterFloor::new(5);
        floor.observe(5).unwrap();
        floor.observe(9).unwrap();
        assert!(matches!(floor.observe(8), Err(StoreError::Corrupt(_))));
        floor.observe(9).unwrap();
        floor.raise(10);
        floor.raise(7);
        assert!(floor.observe(9).is_err());
        floor.observe(10).unwrap();
    }
}
