//! The schema v1 fixture: `tests/fixtures/v1.sqlite`, written once by
//! [`write_v1_fixture`] and kept in the repository, with the records it
//! holds in `tests/fixtures/v1.json`. Every later build must open it,
//! migrate it (to v2: identities; to v3: the integrity record) and read the
//! same records back.
//!
//! To regenerate (only ever for v1, which is already committed):
//! `NEWT_WRITE_FIXTURE=1 cargo test -p newt-sqlite --test store -- --ignored write_v1_fixture`

use std::path::PathBuf;

use newt_proto::records::pickle_encoding;
use newt_proto::records::{KeyRequestRecord, MessageIndexRecord, TrackedUser, WithheldRecord};
use newt_sqlite::{SqliteStore, StoreKey};
use newt_store::{Changes, Store, StoreError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use vodozemac::megolm::{GroupSessionPickle, InboundGroupSessionPickle};
use vodozemac::olm::{Account, AccountPickle, SessionPickle};

use crate::common::*;

/// Also in `src/schema.rs`'s migration test.
const PASSPHRASE: &str = "newt schema v1 fixture";
const ROOM: &str = "!fixture:example.org";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A record read back, with its pickle as v1 wrote it: vodozemac's JSON
/// object (records now hold a compact string, see `pickle_encoding`).
fn as_v1<P: Serialize + DeserializeOwned>(mut record: Value) -> Value {
    let pickle: P = pickle_encoding::deserialize(record["pickle"].take()).unwrap();
    record["pickle"] = serde_json::to_value(pickle).unwrap();
    record
}

#[test]
#[ignore = "writes the committed v1 fixture; run once by hand"]
fn write_v1_fixture() {
    if std::env::var("NEWT_WRITE_FIXTURE").as_deref() != Ok("1") {
        return;
    }
    let db = fixtures().join("v1.sqlite");
    let _ = std::fs::remove_file(&db);
    let room_id = room(ROOM);
    let mut peer = Account::new();
    let acct = account("@fixture:example.org", "FIXTUREDEVICE", 3);
    let olm = olm_session(&mut peer);
    // The schema migration test counts these three.
    let sessions: Vec<_> = (0..3).map(|_| inbound(&room_id, &olm.sender_key)).collect();
    let out = outbound(&room_id);
    let dev = device_record("@peer:example.org", "PEERDEVICE", &peer);
    let tracked = TrackedUser { user_id: user("@peer:example.org"), outdated: false };
    let request = KeyRequestRecord {
        request_id: "fixture-request".into(),
        room_id: room_id.clone(),
        session_id: sessions[0].session_id.clone(),
        sent: true,
    };
    let withheld = WithheldRecord {
        room_id: room_id.clone(),
        session_id: "withheld-session".into(),
        sender: user("@peer:example.org"),
        code: "m.unverified".into(),
        reason: None,
    };
    let index = MessageIndexRecord {
        room_id: room_id.clone(),
        session_id: sessions[1].session_id.clone(),
        index: 5,
        event_id: "$fixture-event".into(),
        origin_server_ts: 1_700_000_000_005,
    };
    let manifest = json!({
        "account": to_json(&acct),
        "olm_session": to_json(&olm),
        "inbound": sessions.iter().map(to_json).collect::<Vec<_>>(),
        "outbound": to_json(&out),
        "device": to_json(&dev),
        "tracked": to_json(&tracked),
        "key_request": to_json(&request),
        "withheld": to_json(&withheld),
        "message_index": to_json(&index),
        "sync_token": "fixture_sync_token",
    });
    let store = SqliteStore::open(&db, StoreKey::Passphrase(PASSPHRASE.into())).unwrap();
    let changes = Changes {
        account: Some(acct),
        olm_sessions: vec![olm],
        inbound_group_sessions: sessions,
        outbound_group_sessions: vec![out],
        devices: vec![dev],
        tracked_users: vec![tracked],
        key_requests: vec![request],
        withheld: vec![withheld],
        message_indices: vec![index],
        sync_token: Some("fixture_sync_token".into()),
        ..Default::default()
    };
    runtime().block_on(store.apply(changes)).unwrap();
    drop(store); // checkpoints the WAL into the file
    let json = serde_json::to_string_pretty(&manifest).unwrap();
    std::fs::write(fixtures().join("v1.json"), json + "\n").unwrap();
}

#[tokio::test]
async fn v1_fixture_opens_and_reads_back() {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("v1.json")).unwrap()).unwrap();
    let original = fixtures().join("v1.sqlite");
    let original_digest = digest(&original).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.sqlite");
    std::fs::copy(&original, &path).unwrap();

    let wrong = SqliteStore::open(&path, StoreKey::Passphrase("not it".into()));
    assert!(matches!(wrong, Err(StoreError::WrongKey)), "{wrong:?}");
    let store = SqliteStore::open(&path, StoreKey::Passphrase(PASSPHRASE.into())).unwrap();
    let room_id = room(ROOM);

    // Fields added since v1 load with their defaults.
    let mut account = manifest["account"].clone();
    for added in ["upload_lease_since", "fallback_key_published_at"] {
        if account.get(added).is_none() {
            account[added] = json!(null);
        }
    }
    let read = to_json(&store.account().await.unwrap().unwrap());
    assert_eq!(as_v1::<AccountPickle>(read), account);
    let mut olm = manifest["olm_session"].clone();
    let sessions = store.olm_sessions(olm["sender_key"].as_str().unwrap()).await.unwrap();
    // Written before Olm sessions had a generation: it loads as generation 0.
    if olm.get("generation").is_none() {
        olm["generation"] = json!(0);
    }
    assert_eq!(sessions.len(), 1);
    assert_eq!(as_v1::<SessionPickle>(to_json(&sessions[0])), olm);
    for session in manifest["inbound"].as_array().unwrap() {
        let id = session["session_id"].as_str().unwrap();
        let read = store.inbound_group_session(&room_id, id).await.unwrap().unwrap();
        assert_eq!(&as_v1::<InboundGroupSessionPickle>(to_json(&read)), session);
    }
    assert_eq!(store.inbound_group_sessions_page(None, 10).await.unwrap().len(), 3);
    // Written before outbound sessions had a generation: it loads as 0.
    let mut outbound = manifest["outbound"].clone();
    if outbound.get("generation").is_none() {
        outbound["generation"] = json!(0);
    }
    let read = to_json(&store.outbound_group_session(&room_id).await.unwrap().unwrap());
    assert_eq!(as_v1::<GroupSessionPickle>(read), outbound);
    assert_eq!(
        to_json(&store.devices(&user("@peer:example.org")).await.unwrap()),
        json!([manifest["device"]])
    );
    assert_eq!(to_json(&store.tracked_users().await.unwrap()), json!([manifest["tracked"]]));
    let request = store.key_request("fixture-request").await.unwrap();
    assert_eq!(to_json(&request), manifest["key_request"]);
    let withheld =
        store.withheld(&room_id, "withheld-session", &user("@peer:example.org")).await.unwrap();
    assert_eq!(to_json(&withheld), manifest["withheld"]);
    // A notice written before they were kept per sender is only its sender's.
    let other = user("@other:example.org");
    assert!(store.withheld(&room_id, "withheld-session", &other).await.unwrap().is_none());
    let index = &manifest["message_index"];
    let read =
        store.message_index(&room_id, index["session_id"].as_str().unwrap(), 5).await.unwrap();
    assert_eq!(to_json(&read), *index);
    assert_eq!(store.sync_token().await.unwrap().as_deref(), Some("fixture_sync_token"));
    // Opening migrated it to v2: the cross-signing reads work and are empty.
    assert!(store.identity(&user("@peer:example.org")).await.unwrap().is_none());
    assert!(store.private_identity().await.unwrap().is_none());
    // And to v3: an integrity record that fits every row, counting from 0.
    store.verify_integrity().unwrap();
    assert_eq!(store.commit_counter().unwrap(), 0);

    // The fixture is still usable as a store: the account moves on.
    let mut account = store.account().await.unwrap().unwrap();
    account.generation += 1;
    store.apply(Changes { account: Some(account), ..Default::default() }).await.unwrap();
    assert_eq!(store.account().await.unwrap().unwrap().generation, 4);
    assert_eq!(store.commit_counter().unwrap(), 1);
    store.verify_integrity().unwrap();
    assert_eq!(digest(&original).unwrap(), original_digest, "the committed fixture changed");
}
