//! The schema: its version, its migrations, and the tables of versions 1
//! and 2 (version 3 adds no table, only the integrity record in `meta`).
//!
//! The version lives in SQLite's `PRAGMA user_version`, next to
//! `PRAGMA application_id` = "newt", which tells a newt store apart from any
//! other SQLite file. [`MIGRATIONS`] lists every step; a new schema version
//! appends one. Each step runs in its own `BEGIN IMMEDIATE` transaction that
//! re-reads the version first, so two processes opening an old store at once
//! migrate it exactly once.
//!
//! Every table keeps its identifiers as keyed hashes (see
//! [`cipher`](crate::cipher)) and its record as one sealed `value`.

use rusqlite::{Connection, Transaction, TransactionBehavior};

use newt_store::StoreError;

use crate::cipher::Cipher;
use crate::integrity;
use crate::retry::{with_retry, TxError};

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: u32 = 3;
/// `PRAGMA application_id` of a newt store: "newt" in ASCII.
pub(crate) const APPLICATION_ID: i32 = 0x6e65_7774;

/// One schema step: brings a store from `version - 1` to `version`.
pub(crate) struct Migration {
    /// The version after this step.
    pub(crate) version: u32,
    /// The step, run inside a transaction; it may re-encrypt with the cipher.
    pub(crate) run: fn(&Transaction<'_>, &Cipher) -> Result<(), TxError>,
}

/// Every schema step, oldest first.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, run: create_v1 },
    Migration { version: 2, run: create_v2 },
    Migration { version: 3, run: integrity::create },
];

pub(crate) use newt_store_crypto::tables::{
    Table, DEVICES, IDENTITIES, INBOUND, KEY_REQUESTS, MESSAGE_INDICES, OLM_SESSIONS, OUTBOUND,
    SINGLETONS, TABLES, TRACKED_USERS, WITHHELD,
};

/// The SQL of a [`Table`] (its name and key columns come from
/// [`newt_store_crypto::tables`], shared with the other backends).
pub(crate) trait TableSql {
    /// `INSERT OR REPLACE` of every key column and the value.
    fn upsert_sql(&self) -> String;
    /// `SELECT` of every key column and the value, then `tail` (a `WHERE`
    /// clause, an `ORDER BY`, ...).
    fn select_sql(&self, tail: &str) -> String;
    /// `WHERE` on the primary key, as `?1`, `?2`, ...
    fn primary_key_where(&self) -> String;
    /// `DELETE` by the given columns.
    fn delete_sql(&self, by: &[&str]) -> String;
}

impl TableSql for Table {
    /// `INSERT OR REPLACE` of every key column and the value.
    fn upsert_sql(&self) -> String {
        let placeholders: Vec<String> =
            (1..=self.keys.len() + 1).map(|i| format!("?{i}")).collect();
        format!(
            "INSERT OR REPLACE INTO {} ({}, value) VALUES ({})",
            self.name,
            self.keys.join(", "),
            placeholders.join(", ")
        )
    }

    /// `SELECT` of every key column and the value, then `tail` (a `WHERE`
    /// clause, an `ORDER BY`, ...).
    fn select_sql(&self, tail: &str) -> String {
        format!("SELECT {}, value FROM {} {tail}", self.keys.join(", "), self.name)
    }

    /// `WHERE` on the primary key, as `?1`, `?2`, ...
    fn primary_key_where(&self) -> String {
        let clauses: Vec<String> = self.keys[..self.primary_key]
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = ?{}", i + 1))
            .collect();
        format!("WHERE {}", clauses.join(" AND "))
    }

    /// `DELETE` by the given columns.
    fn delete_sql(&self, by: &[&str]) -> String {
        let clauses: Vec<String> =
            by.iter().enumerate().map(|(i, c)| format!("{c} = ?{}", i + 1)).collect();
        format!("DELETE FROM {} WHERE {}", self.name, clauses.join(" AND "))
    }
}

/// Schema version 1. Primary keys and indexes cover every hot-path lookup:
/// inbound session by (room, session), Olm sessions by sender key (prefix of
/// the primary key), devices by user (prefix), key requests by session and
/// unsent ones, and inbound sessions not yet backed up.
const V1: &str = "
CREATE TABLE meta (
    name TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE singletons (
    name TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE olm_sessions (
    sender_key_hash BLOB NOT NULL,
    session_hash BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (sender_key_hash, session_hash)
);
CREATE TABLE inbound_group_sessions (
    room_hash BLOB NOT NULL,
    session_hash BLOB NOT NULL,
    backed_up INTEGER NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (room_hash, session_hash)
);
CREATE INDEX inbound_group_sessions_not_backed_up
    ON inbound_group_sessions (room_hash, session_hash) WHERE backed_up = 0;
CREATE TABLE outbound_group_sessions (
    room_hash BLOB PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE devices (
    user_hash BLOB NOT NULL,
    device_hash BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (user_hash, device_hash)
);
CREATE TABLE tracked_users (
    user_hash BLOB PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE key_requests (
    request_hash BLOB PRIMARY KEY NOT NULL,
    room_hash BLOB NOT NULL,
    session_hash BLOB NOT NULL,
    sent INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX key_requests_by_session ON key_requests (room_hash, session_hash, request_hash);
CREATE INDEX key_requests_unsent ON key_requests (request_hash) WHERE sent = 0;
CREATE TABLE withheld (
    room_hash BLOB NOT NULL,
    session_hash BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (room_hash, session_hash)
);
CREATE TABLE message_indices (
    room_hash BLOB NOT NULL,
    session_hash BLOB NOT NULL,
    message_index INTEGER NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (room_hash, session_hash, message_index)
);
";

fn create_v1(tx: &Transaction<'_>, _cipher: &Cipher) -> Result<(), TxError> {
    tx.execute_batch(V1)?;
    Ok(())
}

/// Schema version 2: cross-signing. Public identities get their own table
/// keyed by the user hash; our private keys are one more singleton
/// (`private_identity`), so they need no table.
const V2: &str = "
CREATE TABLE identities (
    user_hash BLOB PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
";

fn create_v2(tx: &Transaction<'_>, _cipher: &Cipher) -> Result<(), TxError> {
    tx.execute_batch(V2)?;
    Ok(())
}

/// The identifying pragmas of an opened file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    /// `PRAGMA user_version`: the schema version, 0 for a new file.
    pub(crate) version: u32,
    /// `PRAGMA application_id`.
    pub(crate) application_id: i32,
    /// Number of schema objects (0 for a new, empty database).
    pub(crate) objects: i64,
}

/// Reads the header pragmas (reads only).
pub(crate) fn header(conn: &Connection) -> Result<Header, TxError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let application_id: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let objects: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    Ok(Header {
        version: u32::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("schema version {version}")))?,
        application_id,
        objects,
    })
}

/// Creates every table of a new store inside the caller's transaction.
pub(crate) fn create(
    tx: &Transaction<'_>,
    cipher: &Cipher,
    migrations: &[Migration],
) -> Result<(), TxError> {
    check_order(migrations)?;
    for migration in migrations {
        (migration.run)(tx, cipher)?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", newest(migrations))?;
    Ok(())
}

/// Brings an unlocked store up to the newest of `migrations`, one step per
/// transaction. A store newer than the newest step is [`StoreError::TooNew`].
pub(crate) fn migrate(
    conn: &mut Connection,
    cipher: &Cipher,
    migrations: &[Migration],
) -> Result<(), StoreError> {
    check_order(migrations)?;
    for migration in migrations {
        with_retry(|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let found = header(&tx)?.version;
            if found > newest(migrations) {
                return Err(StoreError::TooNew { found, supported: newest(migrations) }.into());
            }
            if found >= migration.version {
                return Ok(());
            }
            (migration.run)(&tx, cipher)?;
            tx.pragma_update(None, "user_version", migration.version)?;
            tx.commit()?;
            Ok(())
        })?;
    }
    Ok(())
}

fn newest(migrations: &[Migration]) -> u32 {
    migrations.last().map_or(0, |m| m.version)
}

fn check_order(migrations: &[Migration]) -> Result<(), StoreError> {
    let in_order = migrations.iter().enumerate().all(|(i, m)| m.version as usize == i + 1);
    if in_order {
        Ok(())
    } else {
        Err(StoreError::Backend("schema migrations are not numbered 1, 2, 3, ...".into()))
    }
}

#[cfg(test)]
mod tests {
    //! Migration tests against the committed v1 fixture (see
    //! `tests/fixture.rs` for how it was made and what it holds).

    use super::*;
    use crate::keys::{self, StoreKey};

    /// A future version 4 as a test sees it: a step that must run once,
    /// after v1 to v3, and see their data, tables and integrity record.
    fn v4_hook(tx: &Transaction<'_>, _cipher: &Cipher) -> Result<(), TxError> {
        let inbound: i64 =
            tx.query_row("SELECT count(*) FROM inbound_group_sessions", [], |r| r.get(0))?;
        let identities: i64 = tx.query_row("SELECT count(*) FROM identities", [], |r| r.get(0))?;
        let integrity: i64 =
            tx.query_row("SELECT count(*) FROM meta WHERE name = 'integrity'", [], |r| r.get(0))?;
        tx.execute_batch(
            "CREATE TABLE v4_marker (seen_inbound INTEGER NOT NULL, seen_identities INTEGER NOT NULL,
                                     seen_integrity INTEGER NOT NULL)",
        )?;
        tx.execute(
            "INSERT INTO v4_marker (seen_inbound, seen_identities, seen_integrity) VALUES (?1, ?2, ?3)",
            [inbound, identities, integrity],
        )?;
        Ok(())
    }

    /// The passphrase `tests/fixture.rs` wrote the fixture with.
    const FIXTURE_PASSPHRASE: &str = "newt schema v1 fixture";

    const WITH_V4: &[Migration] = &[
        Migration { version: 1, run: create_v1 },
        Migration { version: 2, run: create_v2 },
        Migration { version: 3, run: integrity::create },
        Migration { version: 4, run: v4_hook },
    ];

    fn fixture_copy() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite");
        let fixture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1.sqlite");
        std::fs::copy(fixture, &path).unwrap();
        (dir, path)
    }

    fn unlock_fixture(conn: &Connection) -> Cipher {
        let material = keys::read(conn).unwrap().unwrap();
        let key = StoreKey::Passphrase(FIXTURE_PASSPHRASE.into());
        keys::unlock(&material, &key).unwrap().1
    }

    #[test]
    fn v1_fixture_migrates_to_the_newest_version() {
        let (_dir, path) = fixture_copy();
        let mut conn = Connection::open(&path).unwrap();
        assert_eq!(header(&conn).unwrap().version, 1);
        let cipher = unlock_fixture(&conn);
        assert!(!keys::keeps_integrity_record(&conn, &cipher).unwrap());
        migrate(&mut conn, &cipher, MIGRATIONS).unwrap();
        assert_eq!(header(&conn).unwrap().version, SCHEMA_VERSION);
        let identities: i64 =
            conn.query_row("SELECT count(*) FROM identities", [], |r| r.get(0)).unwrap();
        assert_eq!(identities, 0);
        // v3: the record fits the fixture's rows, and the key check says so.
        assert!(keys::keeps_integrity_record(&conn, &cipher).unwrap());
        let record = integrity::verify(&conn, &cipher, TABLES).unwrap();
        assert_eq!(record.counter, 0);
        // Idempotent.
        migrate(&mut conn, &cipher, MIGRATIONS).unwrap();
        assert_eq!(header(&conn).unwrap().version, 3);
    }

    #[test]
    fn v1_fixture_migrates_through_v2_and_v3_to_v4_in_order() {
        let (_dir, path) = fixture_copy();
        let mut conn = Connection::open(&path).unwrap();
        let before = header(&conn).unwrap();
        assert_eq!(before.version, 1);
        assert_eq!(before.application_id, APPLICATION_ID);
        let cipher = unlock_fixture(&conn);

        migrate(&mut conn, &cipher, WITH_V4).unwrap();
        assert_eq!(header(&conn).unwrap().version, 4);
        // v1 did not run again (its CREATE TABLEs would have failed), v2 to
        // v4 ran once each, in order, and v4 saw the fixture's sessions,
        // v2's table and v3's record.
        let seen: Vec<(i64, i64, i64)> = conn
            .prepare("SELECT seen_inbound, seen_identities, seen_integrity FROM v4_marker")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(seen, vec![(3, 0, 1)]);

        // Migrating again is a no-op; an older build now refuses the store.
        migrate(&mut conn, &cipher, WITH_V4).unwrap();
        assert_eq!(header(&conn).unwrap().version, 4);
        assert!(matches!(
            migrate(&mut conn, &cipher, MIGRATIONS),
            Err(StoreError::TooNew { found: 4, supported: 3 })
        ));
    }

    #[test]
    fn new_store_runs_every_step_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("new.sqlite")).unwrap();
        let cipher = Cipher::new(&[9; 32]).unwrap();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        create(&tx, &cipher, WITH_V4).unwrap();
        tx.commit().unwrap();
        let h = header(&conn).unwrap();
        assert_eq!((h.version, h.application_id), (4, APPLICATION_ID));
        let seen: (i64, i64) = conn
            .query_row("SELECT seen_inbound, seen_integrity FROM v4_marker", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(seen, (0, 1));
    }

    #[test]
    fn misnumbered_migrations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("new.sqlite")).unwrap();
        let cipher = Cipher::new(&[9; 32]).unwrap();
        let gap: &[Migration] = &[Migration { version: 2, run: create_v2 }];
        assert!(migrate(&mut conn, &cipher, gap).is_err());
    }

    #[test]
    fn sql_is_well_formed() {
        assert_eq!(
            INBOUND.upsert_sql(),
            "INSERT OR REPLACE INTO inbound_group_sessions (room_hash, session_hash, backed_up, value) VALUES (?1, ?2, ?3, ?4)"
        );
        assert_eq!(
            DEVICES.delete_sql(&["user_hash", "device_hash"]),
            "DELETE FROM devices WHERE user_hash = ?1 AND device_hash = ?2"
        );
    }
}
