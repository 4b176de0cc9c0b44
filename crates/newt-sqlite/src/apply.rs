//! [`Store::apply`](newt_store::Store::apply) for SQLite: every value is
//! hashed, sealed and digested first, outside any lock, then one
//! `BEGIN IMMEDIATE` transaction checks the account generation and runs the
//! prepared statements: removals first, then upserts in list order (a later
//! entry for the same key wins), all or nothing. The same transaction
//! updates the integrity record (see [`integrity`]): one
//! primary-key lookup per row written, and one more small sealed row.

use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection, TransactionBehavior};
use serde::{Deserialize, Serialize};

use newt_proto::records::{AccountRecord, OlmSessionRecord};
use newt_store::{
    check_generation, check_generation_value, check_outbound_generation, Changes, StoreError,
};

use crate::cipher::{withheld_key, Cipher, Kind, RowCipher};
use crate::integrity::{self, CounterFloor, Digest, Integrity};
use crate::retry::TxError;
use crate::schema::{
    Table, TableSql, DEVICES, IDENTITIES, INBOUND, KEY_REQUESTS, MESSAGE_INDICES, OLM_SESSIONS,
    OUTBOUND, SINGLETONS, TRACKED_USERS, WITHHELD,
};
use crate::store::query;

pub(crate) use newt_store_crypto::tables::{ACCOUNT, PRIVATE_IDENTITY, SYNC_TOKEN};

/// One prepared statement execution.
struct Write {
    table: &'static Table,
    sql: String,
    /// The primary key first, then (upserts) the other key columns and the
    /// sealed value.
    params: Vec<Value>,
    /// The digest of the row an upsert writes; `None` for a removal.
    digest: Option<Digest>,
}

/// A [`Changes`] turned into sealed rows, ready to commit (and to commit
/// again if the database was busy).
pub(crate) struct Prepared {
    account: Option<AccountRecord>,
    /// (sender key hash, session hash, incoming generation) of each Olm session.
    olm_generations: Vec<(Value, Value, u64)>,
    /// (room hash, removed by the same changes, incoming session ID and
    /// generation) of each outbound session.
    outbound_generations: Vec<(Value, bool, String, u64)>,
    writes: Vec<Write>,
    /// Only replay records: committed without waiting for the disk (see
    /// the crate docs, "Durability and crashes").
    replay_only: bool,
}

/// Only the generation of a stored record (the rest of the value is skipped,
/// not built).
#[derive(Deserialize)]
struct GenerationOnly {
    #[serde(default)]
    session_id: String,
    #[serde(default)]
    generation: u64,
}

/// Hashes and seals everything in `changes`.
pub(crate) fn prepare(cipher: &Cipher, changes: Changes) -> Result<Prepared, StoreError> {
    let replay_only = !changes.message_indices.is_empty() && changes.holds_only_message_indices();
    let mut writes = Vec::new();
    let delete = |table: &'static Table, by: &[&str], params: Vec<Value>| Write {
        table,
        sql: table.delete_sql(by),
        params,
        digest: None,
    };

    for room in &changes.removed_outbound_group_sessions {
        writes.push(delete(&OUTBOUND, &["room_hash"], vec![cipher.key(Kind::Room, room.as_str())]));
    }
    for (user, device) in &changes.removed_devices {
        writes.push(delete(
            &DEVICES,
            &["user_hash", "device_hash"],
            vec![cipher.key(Kind::User, user.as_str()), cipher.key(Kind::Device, device.as_str())],
        ));
    }
    for user in &changes.untracked_users {
        writes.push(delete(
            &TRACKED_USERS,
            &["user_hash"],
            vec![cipher.key(Kind::User, user.as_str())],
        ));
    }
    for id in &changes.removed_key_requests {
        writes.push(delete(&KEY_REQUESTS, &["request_hash"], vec![cipher.key(Kind::Request, id)]));
    }

    if let Some(account) = &changes.account {
        writes.push(upsert(cipher, &SINGLETONS, vec![Value::Text(ACCOUNT.into())], account)?);
    }
    let mut olm_generations = Vec::with_capacity(changes.olm_sessions.len());
    for s in &changes.olm_sessions {
        let keys = vec![
            cipher.key(Kind::SenderKey, &s.sender_key),
            cipher.key(Kind::OlmSession, &s.session_id),
        ];
        olm_generations.push((keys[0].clone(), keys[1].clone(), s.generation));
        writes.push(upsert(cipher, &OLM_SESSIONS, keys, s)?);
    }
    // Imports write thousands of these: seal them on every core.
    writes.extend(newt_store::parallel::map_parallel(&changes.inbound_group_sessions, |s| {
        let keys = vec![
            cipher.key(Kind::Room, s.room_id.as_str()),
            cipher.key(Kind::MegolmSession, &s.session_id),
            Value::Integer(i64::from(s.backed_up)),
        ];
        upsert(cipher, &INBOUND, keys, s)
    })?);
    let mut outbound_generations = Vec::with_capacity(changes.outbound_group_sessions.len());
    for s in &changes.outbound_group_sessions {
        let room = cipher.key(Kind::Room, s.room_id.as_str());
        let removed = changes.removed_outbound_group_sessions.contains(&s.room_id);
        outbound_generations.push((room.clone(), removed, s.session_id.clone(), s.generation));
        writes.push(upsert(cipher, &OUTBOUND, vec![room], s)?);
    }
    for d in &changes.devices {
        let keys = vec![
            cipher.key(Kind::User, d.user_id.as_str()),
            cipher.key(Kind::Device, d.device_id.as_str()),
        ];
        writes.push(upsert(cipher, &DEVICES, keys, d)?);
    }
    for t in &changes.tracked_users {
        writes.push(upsert(
            cipher,
            &TRACKED_USERS,
            vec![cipher.key(Kind::User, t.user_id.as_str())],
            t,
        )?);
    }
    for r in &changes.key_requests {
        let keys = vec![
            cipher.key(Kind::Request, &r.request_id),
            cipher.key(Kind::Room, r.room_id.as_str()),
            cipher.key(Kind::MegolmSession, &r.session_id),
            Value::Integer(i64::from(r.sent)),
        ];
        writes.push(upsert(cipher, &KEY_REQUESTS, keys, r)?);
    }
    for w in &changes.withheld {
        let keys = vec![
            cipher.key(Kind::Room, w.room_id.as_str()),
            cipher.key(Kind::WithheldSender, &withheld_key(&w.session_id, &w.sender)),
        ];
        writes.push(upsert(cipher, &WITHHELD, keys, w)?);
    }
    for m in &changes.message_indices {
        let keys = vec![
            cipher.key(Kind::Room, m.room_id.as_str()),
            cipher.key(Kind::MegolmSession, &m.session_id),
            Value::Integer(i64::from(m.index)),
        ];
        writes.push(upsert(cipher, &MESSAGE_INDICES, keys, m)?);
    }
    if let Some(token) = &changes.sync_token {
        writes.push(upsert(cipher, &SINGLETONS, vec![Value::Text(SYNC_TOKEN.into())], token)?);
    }
    for i in &changes.identities {
        writes.push(upsert(
            cipher,
            &IDENTITIES,
            vec![cipher.key(Kind::User, i.user_id.as_str())],
            i,
        )?);
    }
    if let Some(private) = &changes.private_identity {
        writes.push(upsert(
            cipher,
            &SINGLETONS,
            vec![Value::Text(PRIVATE_IDENTITY.into())],
            private,
        )?);
    }
    Ok(Prepared {
        account: changes.account,
        olm_generations,
        outbound_generations,
        writes,
        replay_only,
    })
}

fn upsert<T: Serialize>(
    cipher: &Cipher,
    table: &'static Table,
    keys: Vec<Value>,
    record: &T,
) -> Result<Write, StoreError> {
    let sealed = cipher.seal_json(table.name, &keys, record)?;
    let digest = Digest::of(cipher.row_digest(table.name, &keys, &sealed));
    let mut params = keys;
    params.push(Value::Blob(sealed));
    Ok(Write { table, sql: table.upsert_sql(), params, digest: Some(digest) })
}

/// Commits prepared changes in one immediate transaction. The account
/// checks read the stored account inside that transaction, so no other
/// process can change it between the check and the write.
pub(crate) fn commit(
    conn: &mut Connection,
    cipher: &Cipher,
    floor: &CounterFloor,
    prepared: &Prepared,
) -> Result<(), TxError> {
    // Every commit sets its own durability (a pragma, no I/O), and a relaxed
    // one puts FULL back at once, so it never leaks into another write.
    let sync = if prepared.replay_only { "NORMAL" } else { "FULL" };
    conn.pragma_update(None, "synchronous", sync)?;
    let result = commit_in_transaction(conn, cipher, floor, prepared);
    if prepared.replay_only {
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    result
}

fn commit_in_transaction(
    conn: &mut Connection,
    cipher: &Cipher,
    floor: &CounterFloor,
    prepared: &Prepared,
) -> Result<(), TxError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut record = Integrity::load(&tx, cipher)?;
    floor.observe(record.counter)?;
    if let Some(incoming) = &prepared.account {
        // The generation is checked against the account last written, not
        // an older copy put back in its place.
        let stored: Option<AccountRecord> =
            match integrity::checked_singleton(&tx, cipher, &record, ACCOUNT)? {
                Some((keys, sealed)) => Some(cipher.open_json(SINGLETONS.name, &keys, &sealed)?),
                None => None,
            };
        if let Some(stored) = &stored {
            if stored.user_id != incoming.user_id || stored.device_id != incoming.device_id {
                return Err(StoreError::AccountMismatch.into());
            }
        }
        check_generation(stored.as_ref(), incoming)?;
    }
    for (sender, session, generation) in &prepared.olm_generations {
        let stored: Option<OlmSessionRecord> = query(
            &tx,
            cipher,
            &OLM_SESSIONS,
            &OLM_SESSIONS.select_sql("WHERE sender_key_hash = ?1 AND session_hash = ?2"),
            &[sender.clone(), session.clone()],
        )?
        .pop();
        check_generation_value(stored.map(|s| s.generation), *generation)?;
    }
    for (room, removed, session_id, generation) in &prepared.outbound_generations {
        let stored: Option<GenerationOnly> = if *removed {
            None
        } else {
            query(
                &tx,
                cipher,
                &OUTBOUND,
                &OUTBOUND.select_sql("WHERE room_hash = ?1"),
                std::slice::from_ref(room),
            )?
            .pop()
        };
        check_outbound_generation(
            stored.as_ref().map(|s| (s.session_id.as_str(), s.generation)),
            (session_id, *generation),
        )?;
    }
    for write in &prepared.writes {
        let primary_key = &write.params[..write.table.primary_key];
        let old = integrity::stored_digest(&tx, cipher, write.table, primary_key)?;
        record.replace(write.table, primary_key, old, write.digest)?;
        tx.prepare_cached(&write.sql)?.execute(params_from_iter(&write.params))?;
    }
    // The counter counts durable commits only: a power cut can undo a
    // relaxed one, and the counter an app keeps must never be ahead of the
    // file it finds after one.
    if !prepared.replay_only {
        record.counter += 1;
    }
    record.save(&tx, cipher)?;
    tx.commit()?;
    floor.raise(record.counter);
    Ok(())
}
