//! Opening: a wrong key writes nothing, a newer schema is refused
//! untouched, a passphrase store reopens after a passphrase change, and
//! what was committed is there after a reopen.

use newt_indexeddb::{delete_store, IndexedDbStore, StoreKey};
use newt_proto::records::TrackedUser;
use newt_store::{Changes, Store, StoreError};
use wasm_bindgen_test::wasm_bindgen_test;

use crate::common::{account, dump, fresh_name, raw_open, user};

async fn filled(name: &str, key: StoreKey) {
    let store = IndexedDbStore::open(name, key).await.unwrap();
    let changes = Changes {
        account: Some(account("@open-alice:example.org", "OPENDEVICE", 0)),
        tracked_users: vec![TrackedUser { user_id: user("@open-bob:example.org"), outdated: true }],
        sync_token: Some("s_open".into()),
        ..Default::default()
    };
    store.apply(changes).await.unwrap();
}

#[wasm_bindgen_test]
async fn wrong_key_is_refused_and_nothing_is_written() {
    let name = fresh_name("wrong-key");
    filled(&name, StoreKey::Raw([1; 32])).await;
    let before = dump(&name).await;
    assert!(before.1.len() >= 6, "{} records", before.1.len());
    let mut wrong = [1; 32];
    wrong[0] ^= 0x80;
    for key in [StoreKey::Raw(wrong), StoreKey::Passphrase("not the key".into())] {
        let err = IndexedDbStore::open(&name, key).await.unwrap_err();
        assert!(matches!(err, StoreError::WrongKey), "{err:?}");
        assert_eq!(dump(&name).await, before);
    }
    let store = IndexedDbStore::open(&name, StoreKey::Raw([1; 32])).await.unwrap();
    assert_eq!(store.sync_token().await.unwrap().as_deref(), Some("s_open"));
    assert_eq!(store.tracked_users().await.unwrap().len(), 1);
    assert_eq!(store.account().await.unwrap().unwrap().device_id.as_str(), "OPENDEVICE");
}

#[wasm_bindgen_test]
async fn a_newer_schema_is_refused_untouched() {
    let name = fresh_name("too-new");
    filled(&name, StoreKey::Raw([2; 32])).await;
    // What a newer build would do: open at a higher version.
    raw_open(&name, Some(7)).await.close();
    let before = dump(&name).await;
    assert_eq!(before.0, 7);
    let err = IndexedDbStore::open(&name, StoreKey::Raw([2; 32])).await.unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 7, supported: 1 }), "{err:?}");
    assert_eq!(dump(&name).await, before);
}

#[wasm_bindgen_test]
async fn another_database_is_not_a_newt_store() {
    let name = fresh_name("foreign");
    raw_open(&name, Some(1)).await.close();
    let err = IndexedDbStore::open(&name, StoreKey::Raw([3; 32])).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
}

#[wasm_bindgen_test]
async fn passphrase_change_and_reopen() {
    let name = fresh_name("passphrase");
    filled(&name, StoreKey::Passphrase("correct horse".into())).await;
    let store =
        IndexedDbStore::open(&name, StoreKey::Passphrase("correct horse".into())).await.unwrap();
    store.change_passphrase("battery staple").await.unwrap();
    drop(store);
    let err = IndexedDbStore::open(&name, StoreKey::Passphrase("correct horse".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::WrongKey), "{err:?}");
    let store =
        IndexedDbStore::open(&name, StoreKey::Passphrase("battery staple".into())).await.unwrap();
    assert_eq!(store.sync_token().await.unwrap().as_deref(), Some("s_open"));
    drop(store);
    delete_store(&name).await.unwrap();
    // Deleted: the name opens as a new, empty store (with any key).
    let store = IndexedDbStore::open(&name, StoreKey::Raw([9; 32])).await.unwrap();
    assert!(store.account().await.unwrap().is_none());
}
