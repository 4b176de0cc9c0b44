//! What is written is read back after reopening, and key changes re-wrap
//! the data key.

use newt_proto::records::{KeyRequestRecord, TrackedUser};
use newt_sqlite::{SqliteStore, StoreKey};
use newt_store::{Changes, Store, StoreError};
use vodozemac::olm::Account;

use crate::common::*;

#[tokio::test]
async fn records_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    let room_id = room("!persist:example.org");
    let mut peer = Account::new();
    let acct = account("@me:example.org", "MYDEVICE", 4);
    let olm = olm_session(&mut peer);
    let sessions: Vec<_> = (0..20).map(|_| inbound(&room_id, "sender")).collect();
    let out = outbound(&room_id);
    let dev = device_record("@peer:example.org", "PEERDEVICE", &peer);
    let expected = (
        to_json(&acct),
        to_json(&olm),
        sessions.iter().map(to_json).collect::<Vec<_>>(),
        to_json(&out),
        to_json(&dev),
    );
    let first_session = sessions[0].session_id.clone();
    let sender_key = olm.sender_key.clone();
    {
        let store = SqliteStore::open(&path, StoreKey::Raw([1; 32])).unwrap();
        let changes = Changes {
            account: Some(acct),
            olm_sessions: vec![olm],
            inbound_group_sessions: sessions,
            outbound_group_sessions: vec![out],
            devices: vec![dev.clone()],
            sync_token: Some("token".into()),
            ..Default::default()
        };
        store.apply(changes).await.unwrap();
    }
    let store = SqliteStore::open(&path, StoreKey::Raw([1; 32])).unwrap();
    assert_eq!(to_json(&store.account().await.unwrap().unwrap()), expected.0);
    assert_eq!(
        to_json(&store.olm_sessions(&sender_key).await.unwrap()),
        serde_json::json!([expected.1])
    );
    let read = store.inbound_group_session(&room_id, &first_session).await.unwrap().unwrap();
    assert_eq!(to_json(&read), expected.2[0]);
    let mut all: Vec<_> =
        store.inbound_group_sessions_page(None, 1000).await.unwrap().iter().map(to_json).collect();
    let mut want = expected.2.clone();
    all.sort_by_key(|v| v.to_string());
    want.sort_by_key(|v| v.to_string());
    assert_eq!(all, want);
    assert_eq!(
        to_json(&store.outbound_group_session(&room_id).await.unwrap().unwrap()),
        expected.3
    );
    assert_eq!(store.devices(&user("@peer:example.org")).await.unwrap(), vec![dev]);
    assert_eq!(store.sync_token().await.unwrap().as_deref(), Some("token"));
}

#[tokio::test]
async fn changing_the_passphrase_rewraps_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    let alice = TrackedUser { user_id: user("@alice:example.org"), outdated: true };
    {
        let store = SqliteStore::open(&path, StoreKey::Passphrase("first".into())).unwrap();
        store
            .apply(Changes { tracked_users: vec![alice.clone()], ..Default::default() })
            .await
            .unwrap();
        store.change_passphrase("second").unwrap();
        // The open store keeps working with its data key.
        let request = KeyRequestRecord {
            request_id: "r".into(),
            room_id: room("!r:example.org"),
            session_id: "s".into(),
            sent: false,
        };
        store.apply(Changes { key_requests: vec![request], ..Default::default() }).await.unwrap();
    }
    let wrong = SqliteStore::open(&path, StoreKey::Passphrase("first".into()));
    assert!(matches!(wrong, Err(StoreError::WrongKey)), "{wrong:?}");
    let store = SqliteStore::open(&path, StoreKey::Passphrase("second".into())).unwrap();
    assert_eq!(store.tracked_users().await.unwrap(), vec![alice.clone()]);
    assert!(store.key_request("r").await.unwrap().is_some());

    // From a passphrase to a raw key, and the passphrase stops working.
    store.change_key(StoreKey::Raw([9; 32])).unwrap();
    drop(store);
    assert!(matches!(
        SqliteStore::open(&path, StoreKey::Passphrase("second".into())),
        Err(StoreError::WrongKey)
    ));
    let store = SqliteStore::open(&path, StoreKey::Raw([9; 32])).unwrap();
    assert_eq!(store.tracked_users().await.unwrap(), vec![alice]);
}

#[tokio::test]
async fn two_handles_in_one_process_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    let a = SqliteStore::open(&path, StoreKey::Raw([3; 32])).unwrap();
    let b = SqliteStore::open(&path, StoreKey::Raw([3; 32])).unwrap();
    a.apply(Changes { account: Some(account("@me:example.org", "DEV", 0)), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(b.account().await.unwrap().unwrap().generation, 0);
    b.apply(Changes { account: Some(account("@me:example.org", "DEV", 1)), ..Default::default() })
        .await
        .unwrap();
    // `a` still believes generation 0: its write is stale.
    let stale = a
        .apply(Changes {
            account: Some(account("@me:example.org", "DEV", 1)),
            ..Default::default()
        })
        .await;
    assert!(
        matches!(stale, Err(StoreError::StaleGeneration { expected: 0, found: 1 })),
        "{stale:?}"
    );
}

#[tokio::test]
async fn swapped_ciphertexts_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    let room_id = room("!swap:example.org");
    let sessions: Vec<_> = (0..2).map(|_| inbound(&room_id, "sender")).collect();
    let ids: Vec<String> = sessions.iter().map(|s| s.session_id.clone()).collect();
    {
        let store = SqliteStore::open(&path, StoreKey::Raw([5; 32])).unwrap();
        let changes = Changes { inbound_group_sessions: sessions, ..Default::default() };
        store.apply(changes).await.unwrap();
    }
    // Someone with write access to the file swaps the two sealed values.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TEMP TABLE v AS SELECT rowid AS id, value FROM inbound_group_sessions;
             UPDATE inbound_group_sessions SET value =
                 (SELECT value FROM v WHERE v.id <> inbound_group_sessions.rowid);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path, StoreKey::Raw([5; 32])).unwrap();
    for id in &ids {
        let read = store.inbound_group_session(&room_id, id).await;
        assert!(matches!(read, Err(StoreError::Corrupt(_))), "{read:?}");
    }
}
