//! [`SqliteStore`]: opening, key changes, and the keyed reads of
//! [`Store`].

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection, TransactionBehavior};
use serde::de::DeserializeOwned;

use newt_proto::identities::{IdentityRecord, PrivateIdentityRecord};
use newt_proto::ids::{RoomId, UserId};
use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, MessageIndexRecord,
    OlmSessionRecord, OutboundGroupSessionRecord, TrackedUser, WithheldRecord,
};
use newt_store::{Changes, SessionCursor, Store, StoreError};

use crate::apply::{self, ACCOUNT, PRIVATE_IDENTITY, SYNC_TOKEN};
use crate::cipher::{withheld_key, Cipher, Kind, RowCipher};
use crate::integrity::{self, CounterFloor, Integrity};
use crate::keys::{self, DataKey, StoreKey};
use crate::retry::{install_busy_handler, sqlite_error, with_retry, TxError};
use crate::schema::{
    self, Table, TableSql, APPLICATION_ID, DEVICES, IDENTITIES, INBOUND, KEY_REQUESTS,
    MESSAGE_INDICES, MIGRATIONS, OLM_SESSIONS, OUTBOUND, SCHEMA_VERSION, SINGLETONS, TABLES,
    TRACKED_USERS, WITHHELD,
};

/// A [`Store`] in one SQLite file, encrypted at rest. See the
/// [crate documentation](crate) for the guarantees and how they are kept.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    cipher: Cipher,
    data_key: DataKey,
    path: PathBuf,
    floor: CounterFloor,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the store at `path`, creating it if there is no file or an empty
    /// one. Blocks for the passphrase KDF (a few hundred milliseconds) when
    /// `key` is a passphrase.
    ///
    /// Errors, all of which leave the file's bytes untouched:
    /// [`StoreError::WrongKey`] if `key` does not open it;
    /// [`StoreError::Corrupt`] if the file is not an SQLite database, is
    /// truncated, or is another program's database, or (with a message
    /// starting "tampering detected") if the account, sync token, private
    /// cross-signing keys or an identity was deleted or put back from an
    /// older copy (see [Threat model](crate#threat-model));
    /// [`StoreError::TooNew`] if a newer build wrote it.
    pub fn open(path: impl AsRef<Path>, key: StoreKey) -> Result<Self, StoreError> {
        let path = path.as_ref();
        crate::file::inspect(path)?;
        let mut conn = Connection::open(path).map_err(sqlite_error)?;
        configure(&mut conn).map_err(sqlite_error)?;
        let (data_key, cipher) = unlock_or_create(&mut conn, &key)?;
        // Only now, with the key proven, may anything be written.
        let mode: String = with_retry(|| {
            Ok(conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?)
        })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!("journal mode {mode} instead of WAL").into()));
        }
        schema::migrate(&mut conn, &cipher, MIGRATIONS)?;
        // The singletons (account, sync token, private keys): a few rows
        // whose loss or rollback matters most. Every other table, identities
        // included (one row per user: thousands), is left to
        // `verify_integrity`, so opening costs the same however many there are.
        let record = with_retry(|| {
            read_transaction(&mut conn, |tx| integrity::verify(tx, &cipher, &[&SINGLETONS]))
        })?;
        let floor = CounterFloor::new(record.counter);
        Ok(Self { conn: Mutex::new(conn), cipher, data_key, path: path.to_owned(), floor })
    }

    /// How many durable commits this store has made (since it was created,
    /// or upgraded to schema version 3). It only grows, and no power cut
    /// takes it back (commits of replay records alone, which one may undo,
    /// do not count). An app that keeps the last value it saw outside the
    /// file (e.g. in the platform keychain) and finds a lower one at the
    /// next open knows the whole file was put back to an older copy: the
    /// one rollback the store cannot see by itself. See
    /// [Threat model](crate#threat-model).
    pub fn commit_counter(&self) -> Result<u64, StoreError> {
        let record =
            self.with_conn(|conn| read_transaction(conn, |tx| Integrity::load(tx, &self.cipher)))?;
        self.floor.observe(record.counter)?;
        Ok(record.counter)
    }

    /// Checks every row of every table against the integrity record: Olm
    /// and Megolm sessions, replay records, devices and the rest, beyond
    /// the singletons and identities that [`open`](Self::open) checks.
    /// Reads and hashes the whole store, under one read transaction
    /// (other calls on this handle wait; other processes do not), so it
    /// suits a background task after start-up rather than every open.
    ///
    /// [`StoreError::Corrupt`] (message starting "tampering detected") names
    /// the first table found with rows deleted, added or put back from an
    /// older copy.
    pub fn verify_integrity(&self) -> Result<(), StoreError> {
        let record = self.with_conn(|conn| {
            read_transaction(conn, |tx| integrity::verify(tx, &self.cipher, TABLES))
        })?;
        self.floor.observe(record.counter)
    }

    /// Re-wraps the store's data key for `new_key`; nothing else is
    /// re-encrypted. Other processes with the store open keep working; the
    /// old key no longer opens it. Blocks for the KDF when `new_key` is a
    /// passphrase.
    pub fn change_key(&self, new_key: StoreKey) -> Result<(), StoreError> {
        let material = keys::wrap(&self.data_key, &new_key)?;
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            keys::write(&tx, &self.cipher, &material)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Sets a new passphrase: shorthand for
    /// [`change_key`](Self::change_key)`(StoreKey::Passphrase(..))`.
    pub fn change_passphrase(&self, new_passphrase: impl Into<String>) -> Result<(), StoreError> {
        self.change_key(StoreKey::Passphrase(new_passphrase.into()))
    }

    /// The path the store was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with_conn<T>(
        &self,
        mut work: impl FnMut(&mut Connection) -> Result<T, TxError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock()?;
        with_retry(|| work(&mut conn))
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Backend("SQLite connection mutex poisoned".into()))
    }

    fn read<T: DeserializeOwned + Send>(
        &self,
        table: &Table,
        tail: &str,
        params: &[Value],
    ) -> Result<Vec<T>, StoreError> {
        let sql = table.select_sql(tail);
        // Decrypting and parsing happen after the lock is released.
        let rows = self.with_conn(|conn| query_sealed(conn, table, &sql, params))?;
        open_rows(&self.cipher, table, &rows)
    }

    /// One `SELECT` per parameter set, under one lock and one read
    /// transaction (one snapshot, and the WAL's shared-memory lock taken
    /// once); the rows are opened after the lock is released, on every core
    /// when there are many.
    fn read_many<T: DeserializeOwned + Send>(
        &self,
        table: &Table,
        tail: &str,
        params: &[Vec<Value>],
    ) -> Result<Vec<T>, StoreError> {
        let sql = table.select_sql(tail);
        let rows = self.with_conn(|conn| {
            let tx = conn.transaction()?;
            let mut rows = Vec::new();
            for p in params {
                rows.extend(query_sealed(&tx, table, &sql, p)?);
            }
            tx.commit()?;
            Ok(rows)
        })?;
        open_rows(&self.cipher, table, &rows)
    }

    fn read_one<T: DeserializeOwned + Send>(
        &self,
        table: &Table,
        tail: &str,
        params: &[Value],
    ) -> Result<Option<T>, StoreError> {
        Ok(self.read(table, tail, params)?.pop())
    }

    /// Reads the singleton `name` and the integrity record in one read
    /// transaction, and refuses a row that is not the one last written.
    fn read_singleton<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let (record, row) = self.with_conn(|conn| {
            read_transaction(conn, |tx| {
                let record = Integrity::load(tx, &self.cipher)?;
                let row = integrity::checked_singleton(tx, &self.cipher, &record, name)?;
                Ok((record, row))
            })
        })?;
        self.floor.observe(record.counter)?;
        row.map(|(keys, sealed)| self.cipher.open_json(SINGLETONS.name, &keys, &sealed)).transpose()
    }
}

/// Runs `work` in one read transaction: one snapshot of the file, however
/// many statements.
fn read_transaction<T>(
    conn: &mut Connection,
    work: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, TxError>,
) -> Result<T, TxError> {
    let tx = conn.transaction()?;
    let value = work(&tx)?;
    tx.commit()?;
    Ok(value)
}

/// Per-connection settings; none of them writes to the file.
fn configure(conn: &mut Connection) -> rusqlite::Result<()> {
    install_busy_handler(conn)?;
    // Room for every statement the store runs (about 25).
    conn.set_prepared_statement_cache_capacity(64);
    // FULL in WAL mode syncs the WAL on every commit: a commit that returned
    // survives a power cut. NORMAL would only sync at checkpoints and could
    // lose the last acknowledged transactions.
    conn.pragma_update(None, "synchronous", "FULL")?;
    // macOS: fsync does not flush the drive's cache; F_FULLFSYNC does.
    conn.pragma_update(None, "fullfsync", "ON")?;
    conn.pragma_update(None, "checkpoint_fullfsync", "ON")?;
    // Freed pages are zeroed: old ratchet states do not linger (best effort;
    // the WAL keeps old pages until the next checkpoint).
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(())
}

/// Unlocks an existing store, or creates a new one in an empty database.
fn unlock_or_create(
    conn: &mut Connection,
    key: &StoreKey,
) -> Result<(DataKey, Cipher), StoreError> {
    let mut header = with_retry(|| schema::header(conn))?;
    if header.version == 0 && header.objects == 0 {
        // The slow KDF runs before the write lock is taken.
        let (data_key, cipher, material) = keys::generate(key)?;
        let created = with_retry(|| {
            let mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Backend(format!("journal mode {mode}").into()).into());
            }
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = schema::header(&tx)?;
            if now.version != 0 || now.objects != 0 {
                // Another process created it since we looked.
                return Ok(false);
            }
            schema::create(&tx, &cipher, MIGRATIONS)?;
            keys::write(&tx, &cipher, &material)?;
            tx.commit()?;
            Ok(true)
        })?;
        if created {
            return Ok((data_key, cipher));
        }
        header = with_retry(|| schema::header(conn))?;
    }
    if header.application_id != APPLICATION_ID || header.version == 0 {
        return Err(StoreError::Corrupt("the database is not a newt store".into()));
    }
    if header.version > SCHEMA_VERSION {
        return Err(StoreError::TooNew { found: header.version, supported: SCHEMA_VERSION });
    }
    let material = with_retry(|| keys::read(conn))?
        .ok_or_else(|| StoreError::Corrupt("the store's key material is missing".into()))?;
    keys::unlock(&material, key)
}

/// Runs a `SELECT` built by [`Table::select_sql`] and opens every row.
pub(crate) fn query<T: DeserializeOwned + Send>(
    conn: &Connection,
    cipher: &Cipher,
    table: &Table,
    sql: &str,
    params: &[Value],
) -> Result<Vec<T>, TxError> {
    let rows = query_sealed(conn, table, sql, params)?;
    Ok(open_rows(cipher, table, &rows)?)
}

/// A row as stored: its key columns and its sealed value.
pub(crate) type SealedRow = (Vec<Value>, Vec<u8>);

/// Runs a `SELECT` built by [`Table::select_sql`]; the rows stay sealed.
pub(crate) fn query_sealed(
    conn: &Connection,
    table: &Table,
    sql: &str,
    params: &[Value],
) -> Result<Vec<SealedRow>, TxError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(params_from_iter(params))?;
    let mut sealed_rows = Vec::new();
    while let Some(row) = rows.next()? {
        let keys = (0..table.keys.len()).map(|i| row.get(i)).collect::<Result<Vec<Value>, _>>()?;
        let sealed: Vec<u8> = row.get(table.keys.len())?;
        sealed_rows.push((keys, sealed));
    }
    Ok(sealed_rows)
}

/// Opens rows read by [`query_sealed`], on every core when there are many
/// (parsing a Megolm pickle decompresses its Ed25519 key).
fn open_rows<T: DeserializeOwned + Send>(
    cipher: &Cipher,
    table: &Table,
    rows: &[SealedRow],
) -> Result<Vec<T>, StoreError> {
    newt_store::parallel::map_parallel(rows, |(keys, sealed)| {
        cipher.open_json(table.name, keys, sealed)
    })
}

fn limit(limit: usize) -> Value {
    Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX))
}

#[cfg_attr(not(target_arch = "wasm32"), async_trait::async_trait)]
#[cfg_attr(target_arch = "wasm32", async_trait::async_trait(?Send))]
impl Store for SqliteStore {
    async fn account(&self) -> Result<Option<AccountRecord>, StoreError> {
        self.read_singleton(ACCOUNT)
    }

    async fn olm_sessions(&self, sender_key: &str) -> Result<Vec<OlmSessionRecord>, StoreError> {
        let key = self.cipher.key(Kind::SenderKey, sender_key);
        self.read(&OLM_SESSIONS, "WHERE sender_key_hash = ?1", &[key])
    }

    async fn inbound_group_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<InboundGroupSessionRecord>, StoreError> {
        let room = self.cipher.key(Kind::Room, room_id.as_str());
        let session = self.cipher.key(Kind::MegolmSession, session_id);
        self.read_one(&INBOUND, "WHERE room_hash = ?1 AND session_hash = ?2", &[room, session])
    }

    /// Pages in the order of the hashed key (room hash, session hash): the
    /// plain IDs are not stored, so their order is not available. The cursor
    /// (the last record's room and session ID) is hashed to resume, so every
    /// session is visited exactly once.
    async fn inbound_group_sessions_page(
        &self,
        after: SessionCursor,
        limit_to: usize,
    ) -> Result<Vec<InboundGroupSessionRecord>, StoreError> {
        const ORDER: &str = "ORDER BY room_hash, session_hash LIMIT";
        match after {
            None => self.read(&INBOUND, &format!("{ORDER} ?1"), &[limit(limit_to)]),
            Some((room_id, session_id)) => {
                let room = self.cipher.key(Kind::Room, room_id.as_str());
                let session = self.cipher.key(Kind::MegolmSession, &session_id);
                self.read(
                    &INBOUND,
                    &format!("WHERE (room_hash, session_hash) > (?1, ?2) {ORDER} ?3"),
                    &[room, session, limit(limit_to)],
                )
            }
        }
    }

    async fn outbound_group_session(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<OutboundGroupSessionRecord>, StoreError> {
        let room = self.cipher.key(Kind::Room, room_id.as_str());
        self.read_one(&OUTBOUND, "WHERE room_hash = ?1", &[room])
    }

    async fn devices(&self, user_id: &UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        let user = self.cipher.key(Kind::User, user_id.as_str());
        self.read(&DEVICES, "WHERE user_hash = ?1", &[user])
    }

    async fn tracked_users(&self) -> Result<Vec<TrackedUser>, StoreError> {
        self.read(&TRACKED_USERS, "", &[])
    }

    async fn key_request(&self, request_id: &str) -> Result<Option<KeyRequestRecord>, StoreError> {
        let request = self.cipher.key(Kind::Request, request_id);
        self.read_one(&KEY_REQUESTS, "WHERE request_hash = ?1", &[request])
    }

    async fn key_request_for_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<KeyRequestRecord>, StoreError> {
        let room = self.cipher.key(Kind::Room, room_id.as_str());
        let session = self.cipher.key(Kind::MegolmSession, session_id);
        self.read_one(
            &KEY_REQUESTS,
            "WHERE room_hash = ?1 AND session_hash = ?2 ORDER BY request_hash LIMIT 1",
            &[room, session],
        )
    }

    async fn unsent_key_requests(&self) -> Result<Vec<KeyRequestRecord>, StoreError> {
        self.read(&KEY_REQUESTS, "WHERE sent = 0", &[])
    }

    async fn withheld(
        &self,
        room_id: &RoomId,
        session_id: &str,
        sender: &UserId,
    ) -> Result<Option<WithheldRecord>, StoreError> {
        let room = self.cipher.key(Kind::Room, room_id.as_str());
        let tail = "WHERE room_hash = ?1 AND session_hash = ?2";
        let key = self.cipher.key(Kind::WithheldSender, &withheld_key(session_id, sender));
        if let Some(found) = self.read_one(&WITHHELD, tail, &[room.clone(), key])? {
            return Ok(Some(found));
        }
        // A row from before notices were kept per sender: only its own sender's.
        let legacy = self.cipher.key(Kind::MegolmSession, session_id);
        let found: Option<WithheldRecord> = self.read_one(&WITHHELD, tail, &[room, legacy])?;
        Ok(found.filter(|w| &w.sender == sender))
    }

    async fn message_index(
        &self,
        room_id: &RoomId,
        session_id: &str,
        index: u32,
    ) -> Result<Option<MessageIndexRecord>, StoreError> {
        let room = self.cipher.key(Kind::Room, room_id.as_str());
        let session = self.cipher.key(Kind::MegolmSession, session_id);
        self.read_one(
            &MESSAGE_INDICES,
            "WHERE room_hash = ?1 AND session_hash = ?2 AND message_index = ?3",
            &[room, session, Value::Integer(i64::from(index))],
        )
    }

    async fn sync_token(&self) -> Result<Option<String>, StoreError> {
        self.read_singleton(SYNC_TOKEN)
    }

    async fn identity(&self, user_id: &UserId) -> Result<Option<IdentityRecord>, StoreError> {
        let user = self.cipher.key(Kind::User, user_id.as_str());
        self.read_one(&IDENTITIES, "WHERE user_hash = ?1", &[user])
    }

    async fn private_identity(&self) -> Result<Option<PrivateIdentityRecord>, StoreError> {
        self.read_singleton(PRIVATE_IDENTITY)
    }

    /// One existence probe per key on the index, under one lock; no session
    /// is read or decrypted.
    async fn sender_keys_with_olm_sessions(
        &self,
        sender_keys: &[&str],
    ) -> Result<HashSet<String>, StoreError> {
        let hashed: Vec<(Value, &str)> =
            sender_keys.iter().map(|k| (self.cipher.key(Kind::SenderKey, k), *k)).collect();
        self.with_conn(|conn| {
            // One read transaction for all the probes.
            let tx = conn.transaction()?;
            let mut found = HashSet::new();
            {
                let mut statement = tx.prepare_cached(
                    "SELECT 1 FROM olm_sessions WHERE sender_key_hash = ?1 LIMIT 1",
                )?;
                for (hash, key) in &hashed {
                    if statement.exists([hash])? {
                        found.insert((*key).to_owned());
                    }
                }
            }
            tx.commit()?;
            Ok(found)
        })
    }

    /// Point reads on the primary key, under one lock and one read
    /// transaction.
    async fn inbound_group_sessions(
        &self,
        keys: &[(RoomId, String)],
    ) -> Result<Vec<InboundGroupSessionRecord>, StoreError> {
        let hashed: Vec<Vec<Value>> = keys
            .iter()
            .map(|(room, session)| {
                vec![
                    self.cipher.key(Kind::Room, room.as_str()),
                    self.cipher.key(Kind::MegolmSession, session),
                ]
            })
            .collect();
        self.read_many(&INBOUND, "WHERE room_hash = ?1 AND session_hash = ?2", &hashed)
    }

    async fn devices_of(&self, users: &[UserId]) -> Result<Vec<DeviceRecord>, StoreError> {
        let hashed: Vec<Vec<Value>> =
            users.iter().map(|u| vec![self.cipher.key(Kind::User, u.as_str())]).collect();
        self.read_many(&DEVICES, "WHERE user_hash = ?1", &hashed)
    }

    async fn olm_sessions_of(
        &self,
        sender_keys: &[&str],
    ) -> Result<Vec<OlmSessionRecord>, StoreError> {
        let hashed: Vec<Vec<Value>> =
            sender_keys.iter().map(|k| vec![self.cipher.key(Kind::SenderKey, k)]).collect();
        self.read_many(&OLM_SESSIONS, "WHERE sender_key_hash = ?1", &hashed)
    }

    async fn apply(&self, changes: Changes) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let prepared = apply::prepare(&self.cipher, changes)?;
        self.with_conn(|conn| apply::commit(conn, &self.cipher, &self.floor, &prepared))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit of replay records alone is relaxed (see the crate docs);
    /// the connection is back at FULL right after it, whatever comes next.
    #[test]
    fn relaxed_replay_commits_leave_the_connection_at_full() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db"), StoreKey::Raw([1; 32])).unwrap();
        let sync = |store: &SqliteStore| -> i64 {
            store.lock().unwrap().pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap()
        };
        assert_eq!(sync(&store), 2);
        let room = RoomId::parse("!r:hs").unwrap();
        let index = |i: u32| MessageIndexRecord {
            room_id: room.clone(),
            session_id: "s".into(),
            index: i,
            event_id: format!("$e{i}"),
            origin_server_ts: 1,
        };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let replay = Changes { message_indices: vec![index(1)], ..Default::default() };
            store.apply(replay).await.unwrap();
            assert_eq!(sync(&store), 2);
            // Not a durable commit: the counter an app keeps stays behind it.
            assert_eq!(store.commit_counter().unwrap(), 0);
            let mixed = Changes {
                message_indices: vec![index(2)],
                sync_token: Some("t".into()),
                ..Default::default()
            };
            store.apply(mixed).await.unwrap();
            assert_eq!(sync(&store), 2);
            assert_eq!(store.commit_counter().unwrap(), 1);
            for i in [1, 2] {
                let stored = store.message_index(&room, "s", i).await.unwrap().unwrap();
                assert_eq!(stored.event_id, format!("$e{i}"));
            }
        });
    }

    /// Every hot-path read is answered from an index, never a table scan.
    #[test]
    fn hot_paths_use_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db"), StoreKey::Raw([1; 32])).unwrap();
        let conn = store.lock().unwrap();
        let cases: &[(&Table, &str)] = &[
            (&SINGLETONS, "WHERE name = ?1"),
            (&OLM_SESSIONS, "WHERE sender_key_hash = ?1"),
            (&INBOUND, "WHERE room_hash = ?1 AND session_hash = ?2"),
            (&INBOUND, "WHERE (room_hash, session_hash) > (?1, ?2) ORDER BY room_hash, session_hash LIMIT ?3"),
            (&INBOUND, "WHERE backed_up = 0 ORDER BY room_hash, session_hash"),
            (&OUTBOUND, "WHERE room_hash = ?1"),
            (&DEVICES, "WHERE user_hash = ?1"),
            (&KEY_REQUESTS, "WHERE request_hash = ?1"),
            (&KEY_REQUESTS, "WHERE room_hash = ?1 AND session_hash = ?2 ORDER BY request_hash LIMIT 1"),
            (&KEY_REQUESTS, "WHERE sent = 0"),
            (&WITHHELD, "WHERE room_hash = ?1 AND session_hash = ?2"),
            (&MESSAGE_INDICES, "WHERE room_hash = ?1 AND session_hash = ?2 AND message_index = ?3"),
            (&IDENTITIES, "WHERE user_hash = ?1"),
        ];
        // What a commit looks up for every row it writes.
        let by_primary_key: Vec<(&Table, String)> =
            TABLES.iter().map(|t| (*t, t.primary_key_where())).collect();
        let cases = cases
            .iter()
            .map(|(t, w)| (*t, *w))
            .chain(by_primary_key.iter().map(|(t, w)| (*t, w.as_str())));
        for (table, tail) in cases {
            let sql = format!("EXPLAIN QUERY PLAN {}", table.select_sql(tail));
            let params: Vec<Value> = (0..sql.matches('?').count()).map(|_| Value::Null).collect();
            let plan: Vec<String> = conn
                .prepare(&sql)
                .unwrap()
                .query_map(params_from_iter(&params), |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let plan = plan.join("; ");
            assert!(plan.contains("USING"), "{sql}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
            assert!(!plan.starts_with("SCAN") || plan.contains("INDEX"), "{sql}: {plan}");
        }
    }

    #[test]
    fn debug_shows_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db"), StoreKey::Raw([0xAB; 32])).unwrap();
        let shown = format!("{store:?}");
        assert!(shown.contains("s.db") && !shown.contains("171"), "{shown}");
    }
}
