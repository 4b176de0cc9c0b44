//! An attacker who can write the store's file but does not hold its key
//! deletes rows or puts back older sealed copies of them (see the crate
//! docs, "Threat model"). The account and the other singletons are refused
//! at open and at every read or write of them, the identities at open, with
//! nothing written; every other table is caught by `verify_integrity`; a
//! rollback of the whole file between two opens shows only in the commit
//! counter.

use std::path::{Path, PathBuf};

use newt_proto::identities::IdentityRecord;
use newt_proto::records::{MessageIndexRecord, OlmSessionRecord};
use newt_sqlite::{SqliteStore, StoreKey};
use newt_store::{Changes, Store, StoreError};
use serde_json::json;
use vodozemac::olm::Account;

use crate::common::*;

const KEY: [u8; 32] = [0xA7; 32];
const ME: &str = "@me:example.org";
const MY_DEVICE: &str = "MYDEVICE";
const ACCOUNT_ROW: &str = "singletons WHERE name = 'account'";

fn open(path: &Path) -> Result<SqliteStore, StoreError> {
    SqliteStore::open(path, StoreKey::Raw(KEY))
}

fn new_store() -> (tempfile::TempDir, PathBuf, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    let store = open(&path).unwrap();
    (dir, path, store)
}

fn assert_tampering<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(StoreError::Corrupt(message)) if message.starts_with("tampering detected") => {}
        other => panic!("{what}: expected a tampering error, got {other:?}"),
    }
}

async fn write_account(store: &SqliteStore, generation: u64) {
    let account = account(ME, MY_DEVICE, generation);
    store.apply(Changes { account: Some(account), ..Default::default() }).await.unwrap();
}

/// The attacker's side: plain SQL on the file, no key.
struct Attacker(rusqlite::Connection);

impl Attacker {
    fn on(path: &Path) -> Self {
        Attacker(rusqlite::Connection::open(path).unwrap())
    }

    /// Copies the sealed value of the one row `row` selects ("table WHERE ...").
    fn copy(&self, row: &str) -> Vec<u8> {
        self.0.query_row(&format!("SELECT value FROM {row}"), [], |r| r.get(0)).unwrap()
    }

    /// Puts a copied value back into the row.
    fn put_back(&self, row: &str, value: &[u8]) {
        let (table, condition) = row.split_once(" WHERE ").unwrap();
        let changed =
            self.0.execute(&format!("UPDATE {table} SET value = ?1 WHERE {condition}"), [value]);
        assert_eq!(changed.unwrap(), 1, "{row}");
    }

    fn delete(&self, row: &str) {
        assert_eq!(self.0.execute(&format!("DELETE FROM {row}"), []).unwrap(), 1, "{row}");
    }
}

/// Opening fails as tampering, and leaves the file and its WAL as they were.
fn open_is_refused_untouched(path: &Path) {
    let files = store_files(path);
    let before: Vec<_> = files.iter().map(|f| digest(f)).collect();
    assert_tampering(open(path), "open");
    let after: Vec<_> = files.iter().map(|f| digest(f)).collect();
    assert_eq!(before[0], after[0], "the store file changed");
    assert!(after[1].is_none() || after[1] == before[1], "the WAL changed");
}

#[tokio::test]
async fn attack_restored_old_account_row_is_detected() {
    let (_dir, path, store) = new_store();
    write_account(&store, 1).await;
    let old = Attacker::on(&path).copy(ACCOUNT_ROW);
    write_account(&store, 2).await;
    drop(store);

    // The old copy still opens under the key: only the integrity record
    // can tell it is not the account last written.
    Attacker::on(&path).put_back(ACCOUNT_ROW, &old);
    open_is_refused_untouched(&path);
    assert_eq!(Attacker::on(&path).copy(ACCOUNT_ROW), old, "the store rewrote the row");
}

#[tokio::test]
async fn attack_restored_old_account_row_is_refused_by_a_running_store() {
    let (_dir, path, store) = new_store();
    write_account(&store, 1).await;
    let attacker = Attacker::on(&path);
    let old = attacker.copy(ACCOUNT_ROW);
    write_account(&store, 2).await;
    let counter = store.commit_counter().unwrap();

    attacker.put_back(ACCOUNT_ROW, &old);
    assert_tampering(store.account().await, "account read");
    // A write of the account would be checked against the old copy's
    // generation (and a process reloading it would reuse one-time keys):
    // refused, nothing written.
    let next = Changes { account: Some(account(ME, MY_DEVICE, 2)), ..Default::default() };
    assert_tampering(store.apply(next).await, "account write");
    assert_eq!(attacker.copy(ACCOUNT_ROW), old);
    assert_eq!(store.commit_counter().unwrap(), counter);
}

#[tokio::test]
async fn attack_deleted_account_row_is_detected() {
    let (_dir, path, store) = new_store();
    write_account(&store, 1).await;
    let attacker = Attacker::on(&path);
    attacker.delete(ACCOUNT_ROW);
    // Read as "no account", this would make a new one; refused instead.
    assert_tampering(store.account().await, "account read");
    let fresh = Changes { account: Some(account(ME, MY_DEVICE, 0)), ..Default::default() };
    assert_tampering(store.apply(fresh).await, "account write");
    drop(store);
    drop(attacker);
    open_is_refused_untouched(&path);
}

#[tokio::test]
async fn attack_on_the_other_singletons_is_detected() {
    let rows =
        ["singletons WHERE name = 'sync_token'", "singletons WHERE name = 'private_identity'"];
    for row in rows {
        for delete in [false, true] {
            let (_dir, path, store) = new_store();
            let write = |n: u32| Changes {
                sync_token: Some(format!("token-{n}")),
                private_identity: Some(newt_proto::identities::PrivateIdentityRecord {
                    user_id: user(ME),
                    master: Some(format!("master-seed-{n}")),
                    self_signing: None,
                    user_signing: None,
                }),
                ..Default::default()
            };
            store.apply(write(1)).await.unwrap();
            let old = Attacker::on(&path).copy(row);
            store.apply(write(2)).await.unwrap();
            if delete {
                Attacker::on(&path).delete(row);
            } else {
                Attacker::on(&path).put_back(row, &old);
            }
            let read = if row.contains("sync_token") {
                store.sync_token().await.map(drop)
            } else {
                store.private_identity().await.map(drop)
            };
            assert_tampering(read, row);
            drop(store);
            open_is_refused_untouched(&path);
        }
    }
}

fn identity(master: &str, previously_verified: bool) -> IdentityRecord {
    IdentityRecord {
        user_id: user("@bob:example.org"),
        master_key: json!({ "user_id": "@bob:example.org", "usage": ["master"],
                            "keys": { format!("ed25519:{master}"): master } }),
        self_signing_key: json!({ "user_id": "@bob:example.org", "usage": ["self_signing"] }),
        user_signing_key: None,
        pinned_master_key: Some(master.into()),
        previously_verified,
        locally_verified: false,
    }
}

#[tokio::test]
async fn attack_deleted_identity_is_detected() {
    let (_dir, path, store) = new_store();
    let bob = Changes { identities: vec![identity("bob-master", true)], ..Default::default() };
    store.apply(bob).await.unwrap();
    drop(store);
    // Without the row, Bob's next master key would be pinned on first sight
    // and the verification violation would go unseen.
    Attacker::on(&path).delete("identities");
    // Not checked at open (one row per user: opening would grow with them).
    let store = open(&path).unwrap();
    assert_tampering(store.verify_integrity(), "verify_integrity");
}

#[tokio::test]
async fn attack_restored_old_identity_is_detected() {
    let (_dir, path, store) = new_store();
    let write = |i| Changes { identities: vec![i], ..Default::default() };
    store.apply(write(identity("bob-master", false))).await.unwrap();
    let old = Attacker::on(&path).copy("identities");
    // Bob gets verified: a later change of his key is a violation.
    store.apply(write(identity("bob-master", true))).await.unwrap();
    drop(store);
    Attacker::on(&path).put_back("identities WHERE 1", &old);
    let store = open(&path).unwrap();
    assert_tampering(store.verify_integrity(), "verify_integrity");
}

fn replay_record(index: u32, event: &str) -> MessageIndexRecord {
    MessageIndexRecord {
        room_id: room("!room:example.org"),
        session_id: "megolm-session".into(),
        index,
        event_id: event.into(),
        origin_server_ts: 1_700_000_000_000,
    }
}

#[tokio::test]
async fn attack_deleted_replay_record_is_detected_by_verify_integrity() {
    let (_dir, path, store) = new_store();
    let records = (0..5).map(|i| replay_record(i, &format!("$event{i}"))).collect();
    store.apply(Changes { message_indices: records, ..Default::default() }).await.unwrap();
    store.verify_integrity().unwrap();
    drop(store);

    Attacker::on(&path).delete("message_indices WHERE message_index = 3");
    // Not checked at open: replay records grow with every event decrypted.
    let store = open(&path).unwrap();
    let room_id = room("!room:example.org");
    assert!(store.message_index(&room_id, "megolm-session", 3).await.unwrap().is_none());
    assert_tampering(store.verify_integrity(), "verify_integrity");
    // The replayed event is taken for a new one and recorded: the deletion
    // still shows (commits subtract what they find, not what they expect).
    let replayed =
        Changes { message_indices: vec![replay_record(3, "$replay")], ..Default::default() };
    store.apply(replayed).await.unwrap();
    assert_tampering(store.verify_integrity(), "verify_integrity after a write");
}

#[tokio::test]
async fn attack_restored_old_olm_session_is_detected_by_verify_integrity() {
    let (_dir, path, store) = new_store();
    let session = olm_session(&mut Account::new());
    // Generations 0 and 1 of one session (records are not Clone).
    let at = |generation| {
        let mut copy: OlmSessionRecord = serde_json::from_value(to_json(&session)).unwrap();
        copy.generation = generation;
        Changes { olm_sessions: vec![copy], ..Default::default() }
    };
    store.apply(at(0)).await.unwrap();
    let old = Attacker::on(&path).copy("olm_sessions");
    store.apply(at(1)).await.unwrap();

    // The ratchet goes back one step: its next message keys are used again.
    Attacker::on(&path).put_back("olm_sessions WHERE 1", &old);
    assert_tampering(store.verify_integrity(), "verify_integrity");
    // The generation check passes against the old copy, so this write goes
    // through, and the rollback still shows afterwards.
    store.apply(at(1)).await.unwrap();
    assert_tampering(store.verify_integrity(), "verify_integrity after a write");
}

#[tokio::test]
async fn attack_deleted_integrity_record_is_detected() {
    let (_dir, path, store) = new_store();
    write_account(&store, 1).await;
    drop(store);
    let attacker = Attacker::on(&path);
    attacker.delete("meta WHERE name = 'integrity'");
    attacker.delete(ACCOUNT_ROW);
    drop(attacker);
    open_is_refused_untouched(&path);
}

#[tokio::test]
async fn attack_schema_version_set_back_to_rebuild_the_integrity_record_is_detected() {
    let (_dir, path, store) = new_store();
    write_account(&store, 1).await;
    drop(store);
    // Schema version 3 built the record from the rows it found; an attacker
    // would like it built again, around the rows they left.
    let attacker = Attacker::on(&path);
    attacker.delete("meta WHERE name = 'integrity'");
    attacker.delete(ACCOUNT_ROW);
    attacker.0.pragma_update(None, "user_version", 2).unwrap();
    drop(attacker);
    open_is_refused_untouched(&path);
}

#[tokio::test]
async fn attack_whole_file_rollback_shows_only_in_the_commit_counter() {
    let (dir, path, store) = new_store();
    write_account(&store, 1).await;
    drop(store);
    let saved = dir.path().join("saved.sqlite");
    std::fs::copy(&path, &saved).unwrap();

    let store = open(&path).unwrap();
    write_account(&store, 2).await;
    // What an app keeps outside the file, e.g. in the keychain.
    let keychain = store.commit_counter().unwrap();
    drop(store);

    std::fs::copy(&saved, &path).unwrap();
    // Rows and record went back together: the store cannot tell...
    let store = open(&path).unwrap();
    assert_eq!(store.account().await.unwrap().unwrap().generation, 1);
    store.verify_integrity().unwrap();
    // ...but the counter kept outside it can.
    assert!(store.commit_counter().unwrap() < keychain);
}

#[tokio::test]
async fn attack_whole_store_rolled_back_under_a_running_store_is_detected() {
    let (dir, path, store) = new_store();
    write_account(&store, 1).await;
    let saved = dir.path().join("saved.sqlite");
    let attacker = Attacker::on(&path);
    attacker.0.execute("VACUUM INTO ?1", [saved.to_str().unwrap()]).unwrap();
    write_account(&store, 2).await;
    store.account().await.unwrap();

    // Every row of every table, the record included, back to the copy.
    attacker.0.execute("ATTACH ?1 AS saved", [saved.to_str().unwrap()]).unwrap();
    let tables: Vec<String> = attacker
        .0
        .prepare("SELECT name FROM saved.sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let restore: String = tables
        .iter()
        .map(|t| format!("DELETE FROM main.{t}; INSERT INTO main.{t} SELECT * FROM saved.{t};"))
        .collect();
    attacker.0.execute_batch(&format!("BEGIN; {restore} COMMIT;")).unwrap();

    assert_tampering(store.account().await, "account read");
    assert_tampering(store.commit_counter(), "commit counter");
    let write = Changes { sync_token: Some("t".into()), ..Default::default() };
    assert_tampering(store.apply(write).await, "write");
}
