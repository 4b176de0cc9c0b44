//! The schema v3 fixtures: `tests/fixtures/v3-raw.sqlite` (opened with a
//! raw key) and `tests/fixtures/v3-passphrase.sqlite` (opened with a
//! passphrase, after one passphrase change), written once by
//! [`write_v3_fixtures`] with the at-rest cipher as it was inside
//! newt-sqlite, before it moved to `newt-store-crypto`. Both hold the
//! records in `tests/fixtures/v3.json`; every later build must open them
//! with the same key and read those records back. Provenance:
//! `tests/fixtures/README.md`.
//!
//! To regenerate (never, once committed: the point is that old bytes open):
//! `NEWT_WRITE_FIXTURE=v3 cargo test -p newt-sqlite --test store -- --ignored write_v3_fixtures`

use std::path::{Path, PathBuf};

use newt_proto::identities::{IdentityRecord, PrivateIdentityRecord};
use newt_proto::records::{KeyRequestRecord, MessageIndexRecord, TrackedUser, WithheldRecord};
use newt_sqlite::{SqliteStore, StoreKey};
use newt_store::{Changes, Store, StoreError};
use serde_json::{json, Value};
use vodozemac::olm::Account;

use crate::common::*;

/// The raw key of `v3-raw.sqlite`: the bytes 0, 1, ..., 31.
fn raw_key() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}
/// The passphrase `v3-passphrase.sqlite` was created with, then changed from.
const FIRST_PASSPHRASE: &str = "newt schema v3 fixture, first passphrase";
/// The passphrase that opens `v3-passphrase.sqlite`.
const PASSPHRASE: &str = "newt schema v3 fixture";
const ROOM: &str = "!fixture-v3:example.org";
const ME: &str = "@fixture:example.org";
const PEER: &str = "@peer:example.org";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The records both fixtures hold, as `v3.json` lists them (pickles hold
/// secrets and are not `Clone`: each store gets its records from this
/// JSON, so both hold exactly what it says).
fn manifest() -> Value {
    let room_id = room(ROOM);
    let mut peer = Account::new();
    let olm = olm_session(&mut peer);
    let mut sessions: Vec<_> = (0..3).map(|_| inbound(&room_id, &olm.sender_key)).collect();
    // The flag is a key column in the associated data.
    sessions[2].backed_up = true;
    let request = KeyRequestRecord {
        request_id: "fixture-v3-request".into(),
        room_id: room_id.clone(),
        session_id: sessions[0].session_id.clone(),
        sent: false,
    };
    let withheld = WithheldRecord {
        room_id: room_id.clone(),
        session_id: "withheld-session-v3".into(),
        sender: user(PEER),
        code: "m.unverified".into(),
        reason: Some("fixture".into()),
    };
    let index = MessageIndexRecord {
        room_id: room_id.clone(),
        session_id: sessions[1].session_id.clone(),
        index: 7,
        event_id: "$fixture-v3-event".into(),
        origin_server_ts: 1_700_000_000_007,
    };
    let identity = IdentityRecord {
        user_id: user(PEER),
        master_key: json!({ "user_id": PEER, "usage": ["master"],
                            "keys": { "ed25519:peer-master": "peer-master" } }),
        self_signing_key: json!({ "user_id": PEER, "usage": ["self_signing"] }),
        user_signing_key: None,
        pinned_master_key: Some("peer-master".into()),
        previously_verified: true,
        locally_verified: false,
    };
    let private = PrivateIdentityRecord {
        user_id: user(ME),
        master: Some("fixture-master-seed".into()),
        self_signing: Some("fixture-ssk-seed".into()),
        user_signing: None,
    };
    let first_account = to_json(&account(ME, "FIXTUREDEVICE", 0));
    let mut account = first_account.clone();
    account["generation"] = json!(1);
    account["uploaded_one_time_key_count"] = json!(5);
    json!({
        "first_account": first_account,
        "account": account,
        "olm_session": to_json(&olm),
        "inbound": sessions.iter().map(to_json).collect::<Vec<_>>(),
        "outbound": to_json(&outbound(&room_id)),
        "device": to_json(&device_record(PEER, "PEERDEVICE", &peer)),
        "tracked": to_json(&TrackedUser { user_id: user(PEER), outdated: true }),
        "key_request": to_json(&request),
        "withheld": to_json(&withheld),
        "message_index": to_json(&index),
        "sync_token": "fixture_v3_sync_token",
        "identity": to_json(&identity),
        "private_identity": to_json(&private),
        "commit_counter": 2,
    })
}

fn from<T: serde::de::DeserializeOwned>(value: &Value) -> T {
    serde_json::from_value(value.clone()).unwrap()
}

/// The two commits that wrote each fixture: everything (with the account
/// at generation 0), then the account once more (so the commit counter is
/// 2 and the account row is not the first copy written).
fn commits(m: &Value) -> [Changes; 2] {
    let first = Changes {
        account: Some(from(&m["first_account"])),
        olm_sessions: vec![from(&m["olm_session"])],
        inbound_group_sessions: from(&m["inbound"]),
        outbound_group_sessions: vec![from(&m["outbound"])],
        devices: vec![from(&m["device"])],
        tracked_users: vec![from(&m["tracked"])],
        key_requests: vec![from(&m["key_request"])],
        withheld: vec![from(&m["withheld"])],
        message_indices: vec![from(&m["message_index"])],
        sync_token: Some(from(&m["sync_token"])),
        identities: vec![from(&m["identity"])],
        private_identity: Some(from(&m["private_identity"])),
        ..Default::default()
    };
    let second = Changes { account: Some(from(&m["account"])), ..Default::default() };
    [first, second]
}

fn write(path: &Path, key: StoreKey, manifest: &Value) {
    let _ = std::fs::remove_file(path);
    let store = SqliteStore::open(path, key).unwrap();
    let rt = runtime();
    for changes in commits(manifest) {
        rt.block_on(store.apply(changes)).unwrap();
    }
    assert_eq!(store.commit_counter().unwrap(), 2);
    store.verify_integrity().unwrap();
    drop(store); // checkpoints the WAL into the file
    for companion in &store_files(path)[1..] {
        assert!(!companion.exists(), "{} left behind", companion.display());
    }
}

#[test]
#[ignore = "writes the committed v3 fixtures; run once by hand"]
fn write_v3_fixtures() {
    if std::env::var("NEWT_WRITE_FIXTURE").as_deref() != Ok("v3") {
        return;
    }
    let manifest = manifest();
    write(&fixtures().join("v3-raw.sqlite"), StoreKey::Raw(raw_key()), &manifest);
    let path = fixtures().join("v3-passphrase.sqlite");
    write(&path, StoreKey::Passphrase(FIRST_PASSPHRASE.into()), &manifest);
    SqliteStore::open(&path, StoreKey::Passphrase(FIRST_PASSPHRASE.into()))
        .unwrap()
        .change_passphrase(PASSPHRASE)
        .unwrap();
    let json = serde_json::to_string_pretty(&manifest).unwrap();
    std::fs::write(fixtures().join("v3.json"), json + "\n").unwrap();
}

/// Opens a copy of the fixture `name` with `key` (after checking that
/// `wrong` is refused), reads every record of `v3.json` back, and writes
/// to it once more.
async fn opens_and_reads_back(name: &str, key: impl Fn() -> StoreKey, wrong: StoreKey) {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("v3.json")).unwrap()).unwrap();
    let original = fixtures().join(name);
    let original_digest = digest(&original).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::copy(&original, &path).unwrap();

    let refused = SqliteStore::open(&path, wrong);
    assert!(matches!(refused, Err(StoreError::WrongKey)), "{refused:?}");
    assert_eq!(digest(&path), Some(original_digest), "a wrong key wrote to the file");
    let store = SqliteStore::open(&path, key()).unwrap();
    let room_id = room(ROOM);
    let peer = user(PEER);

    assert_eq!(to_json(&store.account().await.unwrap().unwrap()), manifest["account"]);
    let olm = &manifest["olm_session"];
    let sessions = store.olm_sessions(olm["sender_key"].as_str().unwrap()).await.unwrap();
    assert_eq!(to_json(&sessions), json!([olm]));
    for session in manifest["inbound"].as_array().unwrap() {
        let id = session["session_id"].as_str().unwrap();
        let read = store.inbound_group_session(&room_id, id).await.unwrap().unwrap();
        assert_eq!(&to_json(&read), session);
    }
    assert_eq!(store.inbound_group_sessions_page(None, 10).await.unwrap().len(), 3);
    let read = store.outbound_group_session(&room_id).await.unwrap();
    assert_eq!(to_json(&read), manifest["outbound"]);
    assert_eq!(to_json(&store.devices(&peer).await.unwrap()), json!([manifest["device"]]));
    assert_eq!(to_json(&store.tracked_users().await.unwrap()), json!([manifest["tracked"]]));
    let request = &manifest["key_request"];
    let read = store.key_request(request["request_id"].as_str().unwrap()).await.unwrap();
    assert_eq!(to_json(&read), *request);
    let read = store
        .key_request_for_session(&room_id, request["session_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(to_json(&read), *request);
    assert_eq!(to_json(&store.unsent_key_requests().await.unwrap()), json!([request]));
    let withheld = store.withheld(&room_id, "withheld-session-v3", &peer).await.unwrap();
    assert_eq!(to_json(&withheld), manifest["withheld"]);
    let index = &manifest["message_index"];
    let read =
        store.message_index(&room_id, index["session_id"].as_str().unwrap(), 7).await.unwrap();
    assert_eq!(to_json(&read), *index);
    assert_eq!(to_json(&store.sync_token().await.unwrap()), manifest["sync_token"]);
    assert_eq!(to_json(&store.identity(&peer).await.unwrap()), manifest["identity"]);
    assert_eq!(to_json(&store.private_identity().await.unwrap()), manifest["private_identity"]);
    // The integrity record fits every row and counts the two commits.
    store.verify_integrity().unwrap();
    assert_eq!(json!(store.commit_counter().unwrap()), manifest["commit_counter"]);

    // Still a working store: the account moves on, and a reopen sees it.
    let mut account = store.account().await.unwrap().unwrap();
    account.generation += 1;
    store.apply(Changes { account: Some(account), ..Default::default() }).await.unwrap();
    drop(store);
    let store = SqliteStore::open(&path, key()).unwrap();
    assert_eq!(store.account().await.unwrap().unwrap().generation, 2);
    assert_eq!(store.commit_counter().unwrap(), 3);
    store.verify_integrity().unwrap();
    assert_eq!(digest(&original), Some(original_digest), "the committed fixture changed");
}

#[tokio::test]
async fn v3_raw_key_fixture_opens_and_reads_back() {
    let mut wrong = raw_key();
    wrong[31] ^= 1;
    opens_and_reads_back("v3-raw.sqlite", || StoreKey::Raw(raw_key()), StoreKey::Raw(wrong)).await;
}

#[tokio::test]
async fn v3_passphrase_fixture_opens_and_reads_back() {
    let key = || StoreKey::Passphrase(PASSPHRASE.into());
    // The first passphrase was changed away from: it no longer opens it.
    let wrong = StoreKey::Passphrase(FIRST_PASSPHRASE.into());
    opens_and_reads_back("v3-passphrase.sqlite", key, wrong).await;
}
