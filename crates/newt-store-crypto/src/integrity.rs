//! The integrity record: how a store notices rows that were deleted, or
//! put back from an older copy, by someone who can write the store but
//! does not hold the key (see the [crate docs](crate#integrity-record)).
//!
//! This module holds the record and its arithmetic; reading the rows it
//! accounts for is the backend's part.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use newt_store::StoreError;

use crate::cipher::{associated_data, Cipher, KeyColumn};

/// The first byte of the record's layout (see [`IntegrityRecord::to_bytes`]).
const LAYOUT_V1: u8 = 1;

/// A row digest, or a sum of them: a 256-bit number in four 64-bit limbs,
/// least significant first. Sums wrap around (modulo 2^256).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest([u64; 4]);

impl Digest {
    /// The number whose little-endian bytes are `bytes` (a row digest from
    /// [`Cipher::digest_row`], or a sum from [`Digest::to_bytes`]).
    pub fn of(bytes: [u8; 32]) -> Self {
        let mut limbs = [0u64; 4];
        for (limb, chunk) in limbs.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(chunk);
            *limb = u64::from_le_bytes(le);
        }
        Digest(limbs)
    }

    /// The little-endian bytes of the number.
    pub fn to_bytes(self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        for (chunk, limb) in bytes.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&limb.to_le_bytes());
        }
        bytes
    }

    /// The sum modulo 2^256.
    #[must_use]
    pub fn wrapping_add(self, other: Digest) -> Digest {
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

    /// The difference modulo 2^256.
    #[must_use]
    pub fn wrapping_sub(self, other: Digest) -> Digest {
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

/// The integrity record: a commit counter, one digest sum per table
/// (tables are numbered by the backend, in a fixed order), and the digest
/// of each singleton row by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrityRecord {
    /// Durable commits since the record was created.
    pub counter: u64,
    /// The sum of each table's row digests.
    sums: Vec<Digest>,
    /// Per singleton name: the digest of that row (absent: no row).
    singletons: BTreeMap<String, Digest>,
}

impl IntegrityRecord {
    /// The record of an empty store with `tables` tables.
    pub fn empty(tables: usize) -> Self {
        IntegrityRecord {
            counter: 0,
            sums: vec![Digest::default(); tables],
            singletons: BTreeMap::new(),
        }
    }

    /// Seals the record for storage (a fresh nonce each time).
    pub fn seal(&self, cipher: &Cipher) -> Result<Vec<u8>, StoreError> {
        cipher.seal(&record_ad(), &self.to_bytes()?)
    }

    /// Opens a record sealed by [`seal`](Self::seal) for a store of
    /// `tables` tables.
    pub fn open(cipher: &Cipher, sealed: &[u8], tables: usize) -> Result<Self, StoreError> {
        IntegrityRecord::from_bytes(&cipher.open(&record_ad(), sealed)?, tables)
    }

    /// The layout: a version byte, 1; the counter (8 bytes, big-endian); the
    /// number of sums (1 byte) and each sum (32 bytes); then each singleton
    /// digest as its name's length (1 byte), its name and the digest, in
    /// name order.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StoreError> {
        let too_long = |what: &str| StoreError::Backend(format!("integrity record: {what}").into());
        let mut bytes = Vec::with_capacity(512);
        bytes.push(LAYOUT_V1);
        bytes.extend_from_slice(&self.counter.to_be_bytes());
        bytes.push(u8::try_from(self.sums.len()).map_err(|_| too_long("too many tables"))?);
        for sum in &self.sums {
            bytes.extend_from_slice(&sum.to_bytes());
        }
        for (name, digest) in &self.singletons {
            bytes.push(u8::try_from(name.len()).map_err(|_| too_long("a name is too long"))?);
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(&digest.to_bytes());
        }
        Ok(bytes)
    }

    /// Parses [`to_bytes`](Self::to_bytes)'s layout; a record of another
    /// number of tables is [`StoreError::Corrupt`].
    pub fn from_bytes(mut bytes: &[u8], tables: usize) -> Result<Self, StoreError> {
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
        if layout != LAYOUT_V1 || usize::from(count) != tables {
            return Err(StoreError::Corrupt(format!(
                "integrity record layout {layout} with {count} tables"
            )));
        }
        let mut record = IntegrityRecord::empty(tables);
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

    /// The sum of table `table`'s row digests.
    pub fn sum(&self, table: usize) -> Result<Digest, StoreError> {
        self.sums.get(table).copied().ok_or_else(|| no_table(table))
    }

    /// Sets the sum of table `table` (when a record is built from the rows).
    pub fn set_sum(&mut self, table: usize, sum: Digest) -> Result<(), StoreError> {
        *self.sums.get_mut(table).ok_or_else(|| no_table(table))? = sum;
        Ok(())
    }

    /// Sets the digest of the singleton `name` (when a record is built
    /// from the rows).
    pub fn set_singleton(&mut self, name: &str, digest: Digest) {
        self.singletons.insert(name.to_owned(), digest);
    }

    /// The names of the singletons the record holds a digest of.
    pub fn singleton_names(&self) -> impl Iterator<Item = &str> {
        self.singletons.keys().map(String::as_str)
    }

    /// Accounts for a row of table `table` going from `old` to `new`
    /// (digests; `None` for no row), as a commit writes or removes it. For
    /// a singleton row (`singleton`: its name), the row found must be the
    /// copy last written; if it is not, the commit must be refused.
    pub fn replace_row(
        &mut self,
        table: usize,
        singleton: Option<&str>,
        old: Option<Digest>,
        new: Option<Digest>,
    ) -> Result<(), StoreError> {
        let mut sum = self.sum(table)?;
        if let Some(name) = singleton {
            self.check_singleton(name, old)?;
            match new {
                Some(digest) => self.singletons.insert(name.to_owned(), digest),
                None => self.singletons.remove(name),
            };
        }
        if let Some(old) = old {
            sum = sum.wrapping_sub(old);
        }
        if let Some(new) = new {
            sum = sum.wrapping_add(new);
        }
        self.set_sum(table, sum)
    }

    /// Checks that the singleton `name` is the row last written (`found`:
    /// the digest of the row there, `None` if there is none).
    pub fn check_singleton(&self, name: &str, found: Option<Digest>) -> Result<(), StoreError> {
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

/// The associated data of the sealed record: that of a `meta` row named
/// `integrity`, where newt-sqlite keeps it.
fn record_ad() -> Vec<u8> {
    associated_data("meta", [KeyColumn::Text("integrity")])
}

fn no_table(table: usize) -> StoreError {
    StoreError::Backend(format!("the integrity record has no table {table}").into())
}

/// The highest commit counter one store handle has seen. The counter only
/// grows, so a lower one later means the whole store was put back to an
/// older copy while it was open.
#[derive(Debug)]
pub struct CounterFloor(AtomicU64);

impl CounterFloor {
    /// A floor at `counter`, the counter found at open.
    pub fn new(counter: u64) -> Self {
        CounterFloor(AtomicU64::new(counter))
    }

    /// Notes the counter of a commit this handle just made.
    pub fn raise(&self, counter: u64) {
        self.0.fetch_max(counter, Ordering::AcqRel);
    }

    /// Notes `counter` as seen; an error if an earlier one was higher.
    pub fn observe(&self, counter: u64) -> Result<(), StoreError> {
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

/// An attack on the stored data, as reported: [`StoreError::Corrupt`] with
/// a message that starts with "tampering detected".
pub fn tampered(what: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("tampering detected: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLES: usize = 10;
    const SINGLETONS: usize = 0;

    #[test]
    fn sums_carry_wrap_and_undo() {
        let max = Digest([u64::MAX; 4]);
        let one = Digest([1, 0, 0, 0]);
        assert_eq!(max.wrapping_add(one), Digest::default());
        assert_eq!(Digest::default().wrapping_sub(one), max);
        assert_eq!(Digest([u64::MAX, 0, 0, 0]).wrapping_add(one), Digest([0, 1, 0, 0]));
        assert_eq!(Digest([0, 1, 0, 0]).wrapping_sub(one), Digest([u64::MAX, 0, 0, 0]));
        let a = Digest::of([7; 32]);
        let b = Digest::of([200; 32]);
        assert_eq!(a.wrapping_add(b).wrapping_sub(a), b);
        assert_eq!(a.wrapping_add(b), b.wrapping_add(a));
        let mut bytes = [0u8; 32];
        bytes[0] = 1;
        assert_eq!(Digest::of(bytes), one);
        assert_eq!(one.to_bytes(), bytes);
    }

    #[test]
    fn a_singleton_must_be_the_copy_last_written() {
        let mut record = IntegrityRecord::empty(TABLES);
        let account = Some("account");
        let (first, second) = (Digest::of([1; 32]), Digest::of([2; 32]));
        record.replace_row(SINGLETONS, account, None, Some(first)).unwrap();
        record.check_singleton("account", Some(first)).unwrap();
        // Written again: the first copy is no longer the one.
        record.replace_row(SINGLETONS, account, Some(first), Some(second)).unwrap();
        for found in [Some(first), None] {
            assert!(matches!(
                record.check_singleton("account", found),
                Err(StoreError::Corrupt(m)) if m.starts_with("tampering detected")
            ));
            let refused = record.replace_row(SINGLETONS, account, found, Some(first));
            assert!(matches!(refused, Err(StoreError::Corrupt(_))));
        }
        assert!(record.check_singleton("sync_token", Some(first)).is_err());
        assert_eq!(record.sum(SINGLETONS).unwrap(), second);
        assert!(record.replace_row(TABLES, None, None, Some(first)).is_err());
    }

    #[test]
    fn the_record_round_trips_sealed_and_stays_small() {
        let mut record = IntegrityRecord::empty(TABLES);
        record.counter = 0x0102_0304_0506_0708;
        for table in 0..TABLES {
            record.set_sum(table, Digest::of([table as u8; 32])).unwrap();
        }
        for name in ["account", "private_identity", "sync_token"] {
            record.set_singleton(name, Digest::of([name.len() as u8; 32]));
        }
        let bytes = record.to_bytes().unwrap();
        assert!(bytes.len() < 500, "{} bytes", bytes.len());
        assert_eq!(bytes[..10], [1, 1, 2, 3, 4, 5, 6, 7, 8, TABLES as u8]);
        assert_eq!(IntegrityRecord::from_bytes(&bytes, TABLES).unwrap(), record);
        for cut in [0, 1, 9, 10, 100, bytes.len() - 1] {
            assert!(IntegrityRecord::from_bytes(&bytes[..cut], TABLES).is_err(), "cut at {cut}");
        }
        assert!(IntegrityRecord::from_bytes(&bytes, TABLES + 1).is_err());

        let cipher = Cipher::new(&[4; 32]).unwrap();
        let sealed = record.seal(&cipher).unwrap();
        assert_eq!(IntegrityRecord::open(&cipher, &sealed, TABLES).unwrap(), record);
        let other = Cipher::new(&[5; 32]).unwrap();
        assert!(IntegrityRecord::open(&other, &sealed, TABLES).is_err());
        let mut flipped = sealed.clone();
        flipped[30] ^= 4;
        assert!(IntegrityRecord::open(&cipher, &flipped, TABLES).is_err());
        // Sealed for another row, e.g. the key check's, it does not open.
        let elsewhere = associated_data("meta", [KeyColumn::Text("key_check")]);
        let moved = cipher.seal(&elsewhere, &bytes).unwrap();
        assert!(IntegrityRecord::open(&cipher, &moved, TABLES).is_err());
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
