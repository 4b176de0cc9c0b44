//! Two connections to one database, as two tabs have: the generation
//! rules, checked inside each readwrite transaction, refuse the stale
//! writer, also when both commit at once; a newer version from another
//! tab closes this connection instead of being blocked by it.

use futures::future::join;
use newt_indexeddb::{IndexedDbStore, StoreKey};
use newt_store::{Changes, Store, StoreError};
use vodozemac::olm::Account;
use wasm_bindgen_test::wasm_bindgen_test;

use crate::common::{account, copy, fresh_name, olm_session, outbound, raw_open, room};

const KEY: [u8; 32] = [4; 32];

async fn two_tabs(prefix: &str) -> (String, IndexedDbStore, IndexedDbStore) {
    let name = fresh_name(prefix);
    let a = IndexedDbStore::open(&name, StoreKey::Raw(KEY)).await.unwrap();
    let b = IndexedDbStore::open(&name, StoreKey::Raw(KEY)).await.unwrap();
    (name, a, b)
}

fn stale(result: Result<(), StoreError>, found: u64) {
    match result {
        Err(StoreError::StaleGeneration { found: f, .. }) => assert_eq!(f, found),
        other => panic!("expected StaleGeneration (found {found}), got {other:?}"),
    }
}

#[wasm_bindgen_test]
async fn the_stale_tab_is_refused_for_account_olm_and_outbound() {
    let (_name, a, b) = two_tabs("tabs").await;
    let acct = account("@tabs-alice:example.org", "TABSDEVICE", 0);
    let mut peer = Account::new();
    let olm = olm_session(&mut peer);
    let room_id = room("!tabs-room:example.org");
    let out = outbound(&room_id);
    a.apply(Changes {
        account: Some(copy(&acct)),
        olm_sessions: vec![copy(&olm)],
        outbound_group_sessions: vec![copy(&out)],
        ..Default::default()
    })
    .await
    .unwrap();

    // Both tabs loaded generation 0; tab A commits generation 1 first.
    let (loaded_a, loaded_b) = (b.account().await.unwrap().unwrap(), a.account().await.unwrap());
    assert_eq!(loaded_a.generation, 0);
    assert_eq!(loaded_b.unwrap().generation, 0);
    let mut next = copy(&acct);
    next.generation = 1;
    next.uploaded_one_time_key_count = 11;
    let mut olm_next = copy(&olm);
    olm_next.generation = 1;
    olm_next.last_used_at += 1;
    let mut out_next = copy(&out);
    out_next.generation = 1;
    out_next.message_count = 1;
    let changes = |which: usize| match which {
        0 => Changes { account: Some(copy(&next)), ..Default::default() },
        1 => Changes { olm_sessions: vec![copy(&olm_next)], ..Default::default() },
        _ => Changes { outbound_group_sessions: vec![copy(&out_next)], ..Default::default() },
    };
    for which in 0..3 {
        a.apply(changes(which)).await.unwrap();
        // Tab B, from the same generation 0, is refused and writes nothing.
        let mut from_b = changes(which);
        from_b.sync_token = Some("s_from_b".into());
        if let Some(acct) = &mut from_b.account {
            acct.uploaded_one_time_key_count = 99;
        }
        stale(b.apply(from_b).await, 1);
    }
    let stored = b.account().await.unwrap().unwrap();
    assert_eq!((stored.generation, stored.uploaded_one_time_key_count), (1, 11));
    assert_eq!(
        b.olm_sessions(&olm.sender_key).await.unwrap()[0].last_used_at,
        olm_next.last_used_at
    );
    assert_eq!(b.outbound_group_session(&room_id).await.unwrap().unwrap().message_count, 1);
    assert_eq!(b.sync_token().await.unwrap(), None);
}

#[wasm_bindgen_test]
async fn of_two_tabs_committing_at_once_exactly_one_wins() {
    let (_name, a, b) = two_tabs("race").await;
    let acct = account("@race-alice:example.org", "RACEDEVICE", 0);
    a.apply(Changes { account: Some(copy(&acct)), ..Default::default() }).await.unwrap();
    for round in 1..=5u64 {
        let mut from_a = copy(&acct);
        from_a.generation = round;
        from_a.uploaded_one_time_key_count = 100 + round;
        let mut from_b = copy(&from_a);
        from_b.uploaded_one_time_key_count = 200 + round;
        let (ra, rb) = join(
            a.apply(Changes { account: Some(from_a), ..Default::default() }),
            b.apply(Changes { account: Some(from_b), ..Default::default() }),
        )
        .await;
        let winner = match (ra, rb) {
            (Ok(()), Err(e)) => {
                stale(Err(e), round);
                100
            }
            (Err(e), Ok(())) => {
                stale(Err(e), round);
                200
            }
            other => panic!("round {round}: {other:?}"),
        };
        let stored = a.account().await.unwrap().unwrap();
        assert_eq!(stored.uploaded_one_time_key_count, winner + round);
    }
}

#[wasm_bindgen_test]
async fn a_newer_version_in_another_tab_closes_this_connection() {
    let (name, a, b) = two_tabs("versionchange").await;
    assert!(!a.is_closed());
    // Would wait for ever if either connection stayed open.
    raw_open(&name, Some(2)).await.close();
    assert!(a.is_closed() && b.is_closed());
    let err = a.account().await.unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    let err = b.apply(Changes { sync_token: Some("s".into()), ..Default::default() }).await;
    assert!(matches!(err, Err(StoreError::Backend(_))), "{err:?}");
}
