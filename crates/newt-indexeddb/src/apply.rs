//! [`Store::apply`](newt_store::Store::apply) for IndexedDB: every value
//! is hashed and sealed first, before any transaction opens (an IndexedDB
//! transaction commits by itself as soon as nothing is pending on it, so
//! nothing slow may run inside one). Then one `readwrite` transaction over
//! every object store the changes touch reads the stored generations and
//! checks them, makes the removals, then the puts in list order (a later
//! entry for the same key wins), and commits; any failure aborts it, and
//! nothing is written.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use web_sys::{IdbDatabase, IdbTransaction};

use newt_proto::records::AccountRecord;
use newt_store::{
    check_generation, check_generation_value, check_outbound_generation, Changes, StoreError,
};
use newt_store_crypto::tables::{
    Table, ACCOUNT, DEVICES, IDENTITIES, INBOUND, KEY_REQUESTS, MESSAGE_INDICES, OLM_SESSIONS,
    OUTBOUND, PRIVATE_IDENTITY, SINGLETONS, SYNC_TOKEN, TRACKED_USERS, WITHHELD,
};
use newt_store_crypto::{withheld_key, Cipher, Kind};

use crate::idb::{self, Durability};
use crate::layout::{self, Column};

/// One write: a put of a sealed record, or a removal by primary key.
struct Write {
    table: &'static Table,
    /// Every key column (a put) or the primary key (a removal).
    keys: Vec<Column>,
    /// The sealed value; `None` for a removal.
    sealed: Option<Vec<u8>>,
}

/// A [`Changes`] turned into sealed records, ready to commit.
pub(crate) struct Prepared {
    account: Option<AccountRecord>,
    /// The primary key and incoming generation of each Olm session.
    olm_generations: Vec<(Vec<Column>, u64)>,
    /// (room hash, removed by the same changes, incoming session ID and
    /// generation) of each outbound session.
    outbound_generations: Vec<(Column, bool, String, u64)>,
    writes: Vec<Write>,
    /// Only replay records: committed with relaxed durability (see the
    /// crate docs, "Durability").
    pub(crate) replay_only: bool,
}

/// Only the generation of a stored record (the rest is skipped).
#[derive(Deserialize)]
struct GenerationOnly {
    #[serde(default)]
    session_id: String,
    #[serde(default)]
    generation: u64,
}

fn hash(cipher: &Cipher, kind: Kind, value: &str) -> Column {
    Column::Hash(cipher.hash(kind, value))
}

fn flag(value: bool) -> Column {
    Column::Integer(i64::from(value))
}

/// Hashes and seals everything in `changes`: removals first, then puts.
pub(crate) fn prepare(cipher: &Cipher, changes: Changes) -> Result<Prepared, StoreError> {
    let replay_only = !changes.message_indices.is_empty() && changes.holds_only_message_indices();
    let mut writes = Vec::new();
    let delete = |table: &'static Table, keys: Vec<Column>| Write { table, keys, sealed: None };

    for room in &changes.removed_outbound_group_sessions {
        writes.push(delete(&OUTBOUND, vec![hash(cipher, Kind::Room, room.as_str())]));
    }
    for (user, device) in &changes.removed_devices {
        let keys = vec![
            hash(cipher, Kind::User, user.as_str()),
            hash(cipher, Kind::Device, device.as_str()),
        ];
        writes.push(delete(&DEVICES, keys));
    }
    for user in &changes.untracked_users {
        writes.push(delete(&TRACKED_USERS, vec![hash(cipher, Kind::User, user.as_str())]));
    }
    for id in &changes.removed_key_requests {
        writes.push(delete(&KEY_REQUESTS, vec![hash(cipher, Kind::Request, id)]));
    }

    if let Some(account) = &changes.account {
        writes.push(put(cipher, &SINGLETONS, vec![Column::Text(ACCOUNT)], account)?);
    }
    let mut olm_generations = Vec::with_capacity(changes.olm_sessions.len());
    for s in &changes.olm_sessions {
        let keys = vec![
            hash(cipher, Kind::SenderKey, &s.sender_key),
            hash(cipher, Kind::OlmSession, &s.session_id),
        ];
        olm_generations.push((keys.clone(), s.generation));
        writes.push(put(cipher, &OLM_SESSIONS, keys, s)?);
    }
    for s in &changes.inbound_group_sessions {
        let keys = vec![
            hash(cipher, Kind::Room, s.room_id.as_str()),
            hash(cipher, Kind::MegolmSession, &s.session_id),
            flag(s.backed_up),
        ];
        writes.push(put(cipher, &INBOUND, keys, s)?);
    }
    let mut outbound_generations = Vec::with_capacity(changes.outbound_group_sessions.len());
    for s in &changes.outbound_group_sessions {
        let room = hash(cipher, Kind::Room, s.room_id.as_str());
        let removed = changes.removed_outbound_group_sessions.contains(&s.room_id);
        outbound_generations.push((room.clone(), removed, s.session_id.clone(), s.generation));
        writes.push(put(cipher, &OUTBOUND, vec![room], s)?);
    }
    for d in &changes.devices {
        let keys = vec![
            hash(cipher, Kind::User, d.user_id.as_str()),
            hash(cipher, Kind::Device, d.device_id.as_str()),
        ];
        writes.push(put(cipher, &DEVICES, keys, d)?);
    }
    for t in &changes.tracked_users {
        let keys = vec![hash(cipher, Kind::User, t.user_id.as_str())];
        writes.push(put(cipher, &TRACKED_USERS, keys, t)?);
    }
    for r in &changes.key_requests {
        let keys = vec![
            hash(cipher, Kind::Request, &r.request_id),
            hash(cipher, Kind::Room, r.room_id.as_str()),
            hash(cipher, Kind::MegolmSession, &r.session_id),
            flag(r.sent),
        ];
        writes.push(put(cipher, &KEY_REQUESTS, keys, r)?);
    }
    for w in &changes.withheld {
        let keys = vec![
            hash(cipher, Kind::Room, w.room_id.as_str()),
            hash(cipher, Kind::WithheldSender, &withheld_key(&w.session_id, &w.sender)),
        ];
        writes.push(put(cipher, &WITHHELD, keys, w)?);
    }
    for m in &changes.message_indices {
        let keys = vec![
            hash(cipher, Kind::Room, m.room_id.as_str()),
            hash(cipher, Kind::MegolmSession, &m.session_id),
            Column::Integer(i64::from(m.index)),
        ];
        writes.push(put(cipher, &MESSAGE_INDICES, keys, m)?);
    }
    if let Some(token) = &changes.sync_token {
        writes.push(put(cipher, &SINGLETONS, vec![Column::Text(SYNC_TOKEN)], token)?);
    }
    for i in &changes.identities {
        let keys = vec![hash(cipher, Kind::User, i.user_id.as_str())];
        writes.push(put(cipher, &IDENTITIES, keys, i)?);
    }
    if let Some(private) = &changes.private_identity {
        writes.push(put(cipher, &SINGLETONS, vec![Column::Text(PRIVATE_IDENTITY)], private)?);
    }
    Ok(Prepared {
        account: changes.account,
        olm_generations,
        outbound_generations,
        writes,
        replay_only,
    })
}

fn put<T: Serialize>(
    cipher: &Cipher,
    table: &'static Table,
    keys: Vec<Column>,
    record: &T,
) -> Result<Write, StoreError> {
    let sealed = cipher.seal_record(&layout::row_ad(table, &keys), record)?;
    Ok(Write { table, keys, sealed: Some(sealed) })
}

/// Commits prepared changes in one `readwrite` transaction: `"strict"`
/// durability unless they are replay records alone.
pub(crate) async fn commit(
    db: &IdbDatabase,
    cipher: &Cipher,
    prepared: &Prepared,
) -> Result<(), StoreError> {
    let mut stores: BTreeSet<&str> = prepared.writes.iter().map(|w| w.table.name).collect();
    if prepared.account.is_some() {
        stores.insert(SINGLETONS.name);
    }
    let stores: Vec<&str> = stores.into_iter().collect();
    let durability = if prepared.replay_only { Durability::Relaxed } else { Durability::Strict };
    let tx = idb::transaction(db, &stores, Some(durability))?;
    let done = idb::completion(&tx);
    if let Err(error) = check_and_write(&tx, cipher, prepared).await {
        // Nothing of the transaction is kept; its own abort error is not
        // the one to report.
        let _aborted = tx.abort();
        let _settled = idb::settle("abort", done).await;
        return Err(error);
    }
    idb::settle("commit", done).await.map(drop)
}

/// The checks and the writes, inside the transaction.
async fn check_and_write(
    tx: &IdbTransaction,
    cipher: &Cipher,
    prepared: &Prepared,
) -> Result<(), StoreError> {
    if let Some(incoming) = &prepared.account {
        let found = get(tx, &SINGLETONS, &[Column::Text(ACCOUNT)]).await?;
        let stored: Option<AccountRecord> =
            found.map(|row| row.open(cipher, &SINGLETONS)).transpose()?;
        if let Some(stored) = &stored {
            if stored.user_id != incoming.user_id || stored.device_id != incoming.device_id {
                return Err(StoreError::AccountMismatch);
            }
        }
        check_generation(stored.as_ref(), incoming)?;
    }
    for (keys, generation) in &prepared.olm_generations {
        let found = get(tx, &OLM_SESSIONS, keys).await?;
        let stored: Option<GenerationOnly> =
            found.map(|row| row.open(cipher, &OLM_SESSIONS)).transpose()?;
        check_generation_value(stored.map(|s| s.generation), *generation)?;
    }
    for (room, removed, session_id, generation) in &prepared.outbound_generations {
        let stored: Option<GenerationOnly> = if *removed {
            None
        } else {
            let found = get(tx, &OUTBOUND, std::slice::from_ref(room)).await?;
            found.map(|row| row.open(cipher, &OUTBOUND)).transpose()?
        };
        check_outbound_generation(
            stored.as_ref().map(|s| (s.session_id.as_str(), s.generation)),
            (session_id, *generation),
        )?;
    }
    // Requests on one transaction run in the order they are made; their
    // failures abort it, which the completion reports.
    for write in &prepared.writes {
        let store = tx.object_store(write.table.name).map_err(|e| idb::js_error("store", e))?;
        let made = match &write.sealed {
            None => store.delete(&layout::key(&write.keys)),
            Some(sealed) => store.put(&layout::sealed_record(write.table, &write.keys, sealed)?),
        };
        made.map_err(|e| idb::js_error("write", e))?;
    }
    Ok(())
}

/// The record of `table` at the primary key `keys`, inside `tx`.
pub(crate) async fn get(
    tx: &IdbTransaction,
    table: &'static Table,
    keys: &[Column],
) -> Result<Option<layout::SealedRow>, StoreError> {
    let store = tx.object_store(table.name).map_err(|e| idb::js_error("store", e))?;
    let found = idb::request("get", || store.get(&layout::key(keys))).await?;
    layout::row(table, &found)
}
