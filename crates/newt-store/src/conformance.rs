//! The backend conformance suite: the behaviour every [`Store`] must have.
//!
//! A backend's tests call [`run_all`] with a function that makes a fresh,
//! empty store; every check gets its own store and asserts the values it
//! reads back, not merely that nothing failed. Records are real: the pickles
//! come from live vodozemac accounts and sessions.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use newt_store::MemoryStore;
//! newt_store::conformance::run_all(|| async { MemoryStore::new() }).await;
//! # });
//! ```
//!
//! Orders that the trait leaves to the backend (the order of a user's
//! devices, of tracked users, of pages of inbound sessions) are compared as
//! sets; paging is checked for "every session exactly once, pages no longer
//! than the limit", which a backend that hashes its keys can meet.

// A test suite: failing loudly is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod fixtures;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::OnceLock;

use newt_proto::identities::{IdentityRecord, PrivateIdentityRecord};
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, LocalTrust,
    MessageIndexRecord, OlmSessionRecord, OutboundGroupSessionRecord, SessionSource, TrackedUser,
    WithheldRecord,
};
use serde::Serialize;
use serde_json::{json, Value};
use vodozemac::megolm::{GroupSession, InboundGroupSession, SessionConfig as MegolmConfig};
use vodozemac::olm::{Account, SessionConfig as OlmConfig};

use crate::{Changes, Store, StoreError};

/// Runs every conformance check, each against a fresh store from `make`.
/// Panics (with the check's name on stderr) at the first difference.
pub async fn run_all<S: Store, F: Future<Output = S>>(make: impl Fn() -> F) {
    check("account_round_trip", account_round_trip(make().await)).await;
    check("account_generation_rule", account_generation_rule(make().await)).await;
    check("stale_generation_writes_nothing", stale_generation_writes_nothing(make().await)).await;
    check("account_mismatch", account_mismatch(make().await)).await;
    check("olm_sessions_by_sender_key", olm_sessions_by_sender_key(make().await)).await;
    check("inbound_group_session_get_upsert", inbound_get_upsert(make().await)).await;
    check("inbound_group_sessions_paging", inbound_paging(make().await)).await;
    check("outbound_group_sessions", outbound_sessions(make().await)).await;
    check("outbound_generation_rule", outbound_generation_rule(make().await)).await;
    check("sender_keys_with_olm_sessions", sender_keys_with_olm_sessions(make().await)).await;
    check("inbound_group_sessions_batch", inbound_batch(make().await)).await;
    check("devices_and_olm_sessions_batch", devices_and_olm_batch(make().await)).await;
    check("devices_by_user", devices_by_user(make().await)).await;
    check("tracked_users", tracked_users(make().await)).await;
    check("key_requests", key_requests(make().await)).await;
    check("withheld", withheld(make().await)).await;
    check("message_indices", message_indices(make().await)).await;
    check("sync_token", sync_token(make().await)).await;
    check("identities_by_user", identities_by_user(make().await)).await;
    check("private_identity", private_identity(make().await)).await;
    check("later_entry_wins", later_entry_wins(make().await)).await;
    check("empty_changes", empty_changes(make().await)).await;
    check("failed_apply_changes_nothing", failed_apply_changes_nothing(make().await)).await;
}

async fn check(name: &str, test: impl Future<Output = ()>) {
    eprintln!("store conformance: {name}");
    test.await;
}

// ---------------------------------------------------------------- checks

async fn account_round_trip(store: impl Store) {
    assert!(store.account().await.unwrap().is_none());
    let first = account(ALICE, DEVICE, 7);
    let expected = to_json(&first);
    apply(&store, Changes { account: Some(first), ..Default::default() }).await;
    assert_eq!(to_json(&store.account().await.unwrap().unwrap()), expected);

    let mut next = account(ALICE, DEVICE, 8);
    next.shared = true;
    next.uploaded_one_time_key_count = 42;
    next.fallback_key_created_at = Some(1_700_000_000_000);
    next.fallback_key_published_at = Some(1_700_000_060_000);
    let expected = to_json(&next);
    apply(&store, Changes { account: Some(next), ..Default::default() }).await;
    let stored = store.account().await.unwrap().unwrap();
    assert_eq!(to_json(&stored), expected);
    assert_eq!(stored.generation, 8);
    assert!(stored.shared);
}

async fn account_generation_rule(store: impl Store) {
    // The first write may carry any generation.
    apply(&store, Changes { account: Some(account(ALICE, DEVICE, 5)), ..Default::default() }).await;
    let stored = to_json(&store.account().await.unwrap().unwrap());
    // Anything but stored + 1 is stale, and leaves the stored account alone.
    for generation in [5, 4, 7, 0, u64::MAX] {
        let err = store
            .apply(Changes {
                account: Some(account(ALICE, DEVICE, generation)),
                ..Default::default()
            })
            .await
            .unwrap_err();
        match err {
            StoreError::StaleGeneration { found, .. } => assert_eq!(found, 5),
            other => panic!("generation {generation}: expected StaleGeneration, got {other:?}"),
        }
        assert_eq!(to_json(&store.account().await.unwrap().unwrap()), stored);
    }
    apply(&store, Changes { account: Some(account(ALICE, DEVICE, 6)), ..Default::default() }).await;
    assert_eq!(store.account().await.unwrap().unwrap().generation, 6);
}

async fn stale_generation_writes_nothing(store: impl Store) {
    apply(&store, Changes { account: Some(account(ALICE, DEVICE, 1)), ..Default::default() }).await;
    let before = snapshot(&store).await;
    let mut changes = everything(1);
    changes.account = Some(account(ALICE, DEVICE, 1)); // stale: 2 expected
    let err = store.apply(changes).await.unwrap_err();
    assert!(matches!(err, StoreError::StaleGeneration { found: 1, .. }), "{err:?}");
    assert_eq!(snapshot(&store).await, before);
}

async fn account_mismatch(store: impl Store) {
    apply(&store, Changes { account: Some(account(ALICE, DEVICE, 0)), ..Default::default() }).await;
    let before = snapshot(&store).await;
    for (user, device) in [(BOB, DEVICE), (ALICE, OTHER_DEVICE)] {
        let changes = Changes {
            account: Some(account(user, device, 1)),
            sync_token: Some("s_mismatch".into()),
            tracked_users: vec![tracked(BOB, true)],
            ..Default::default()
        };
        let err = store.apply(changes).await.unwrap_err();
        assert!(matches!(err, StoreError::AccountMismatch), "{user} {device}: {err:?}");
        assert_eq!(snapshot(&store).await, before);
    }
    apply(&store, Changes { account: Some(account(ALICE, DEVICE, 1)), ..Default::default() }).await;
    assert_eq!(store.account().await.unwrap().unwrap().generation, 1);
}

async fn olm_sessions_by_sender_key(store: impl Store) {
    let mut bob = Account::new();
    let mut carol = Account::new();
    let bob_key = bob.curve25519_key().to_base64();
    let carol_key = carol.curve25519_key().to_base64();
    let with_bob: Vec<OlmSessionRecord> = (0..3).map(|i| olm_session(&mut bob, 100 + i)).collect();
    let with_carol: Vec<OlmSessionRecord> =
        (0..2).map(|i| olm_session(&mut carol, 200 + i)).collect();
    let mut expect_bob = sorted_json(&with_bob, |s| s.session_id.clone());
    let expect_carol = sorted_json(&with_carol, |s| s.session_id.clone());
    let bob_ids: Vec<String> = with_bob.iter().map(|s| s.session_id.clone()).collect();

    let mut sessions = with_bob;
    sessions.extend(with_carol);
    apply(&store, Changes { olm_sessions: sessions, ..Default::default() }).await;
    let read = store.olm_sessions(&bob_key).await.unwrap();
    assert_eq!(sorted_json(&read, |s| s.session_id.clone()), expect_bob);
    let read = store.olm_sessions(&carol_key).await.unwrap();
    assert_eq!(sorted_json(&read, |s| s.session_id.clone()), expect_carol);
    assert!(store
        .olm_sessions(&Account::new().curve25519_key().to_base64())
        .await
        .unwrap()
        .is_empty());

    // An upsert replaces by (sender key, session ID) ...
    let mut updated = olm_session(&mut bob, 999);
    updated.session_id = bob_ids[1].clone();
    // A write based on a stale copy of the session is refused, atomically.
    let stale = olm_session(&mut bob, 998);
    let mut stale = OlmSessionRecord { session_id: bob_ids[1].clone(), generation: 0, ..stale };
    stale.last_used_at = 998;
    let err = store
        .apply(Changes {
            olm_sessions: vec![stale],
            tracked_users: vec![tracked(ALICE, true)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::StaleGeneration { found: 0, .. }), "{err:?}");
    assert!(store.tracked_users().await.unwrap().is_empty());
    // The next generation is accepted.
    updated.generation = 1;
    let updated_json = to_json(&updated);
    apply(&store, Changes { olm_sessions: vec![updated], ..Default::default() }).await;
    let read = store.olm_sessions(&bob_key).await.unwrap();
    assert_eq!(read.len(), 3);
    let replaced = read.iter().find(|s| s.session_id == bob_ids[1]).unwrap();
    assert_eq!(to_json(replaced), updated_json);
    assert_eq!(replaced.last_used_at, 999);
    expect_bob.retain(|s| s["session_id"] != json!(bob_ids[1]));
    let mut others = sorted_json(&read, |s| s.session_id.clone());
    others.retain(|s| s["session_id"] != json!(bob_ids[1]));
    assert_eq!(others, expect_bob);

    // ... and the same session ID under another sender key is another session.
    let mut twin = olm_session(&mut carol, 300);
    twin.session_id = bob_ids[0].clone();
    apply(&store, Changes { olm_sessions: vec![twin], ..Default::default() }).await;
    assert_eq!(store.olm_sessions(&carol_key).await.unwrap().len(), 3);
    assert_eq!(store.olm_sessions(&bob_key).await.unwrap().len(), 3);
}

async fn inbound_get_upsert(store: impl Store) {
    let room_a = room(ROOM_A);
    let room_b = room(ROOM_B);
    let session = inbound(&room_a);
    let id = session.session_id.clone();
    assert!(store.inbound_group_session(&room_a, &id).await.unwrap().is_none());
    let expected = to_json(&session);
    apply(&store, Changes { inbound_group_sessions: vec![session], ..Default::default() }).await;
    assert_eq!(
        to_json(&store.inbound_group_session(&room_a, &id).await.unwrap().unwrap()),
        expected
    );
    // Keyed by room too: the same session ID in another room is not found.
    assert!(store.inbound_group_session(&room_b, &id).await.unwrap().is_none());

    let mut better = inbound(&room_a);
    better.session_id = id.clone();
    better.first_known_index = 0;
    better.backed_up = true;
    better.source = SessionSource::Forwarded;
    better.forwarding_chain = vec!["forwarder-curve-key".into()];
    let expected = to_json(&better);
    apply(&store, Changes { inbound_group_sessions: vec![better], ..Default::default() }).await;
    let read = store.inbound_group_session(&room_a, &id).await.unwrap().unwrap();
    assert_eq!(to_json(&read), expected);
    assert!(read.backed_up);

    let mut elsewhere = inbound(&room_b);
    elsewhere.session_id = id.clone();
    let elsewhere_json = to_json(&elsewhere);
    apply(&store, Changes { inbound_group_sessions: vec![elsewhere], ..Default::default() }).await;
    assert_eq!(
        to_json(&store.inbound_group_session(&room_b, &id).await.unwrap().unwrap()),
        elsewhere_json
    );
    assert_eq!(
        to_json(&store.inbound_group_session(&room_a, &id).await.unwrap().unwrap()),
        expected
    );
}

async fn inbound_paging(store: impl Store) {
    const COUNT: usize = 250;
    let rooms = [room(ROOM_A), room(ROOM_B), room("!third:example.org")];
    let sessions: Vec<InboundGroupSessionRecord> =
        (0..COUNT).map(|i| inbound(&rooms[i % rooms.len()])).collect();
    let expected: BTreeSet<String> = sessions.iter().map(|s| to_json(s).to_string()).collect();
    assert_eq!(expected.len(), COUNT);
    assert!(store.inbound_group_sessions_page(None, 100).await.unwrap().is_empty());
    // Written in two commits, to page over more than one write.
    let mut sessions = sessions;
    let second = sessions.split_off(COUNT / 2);
    apply(&store, Changes { inbound_group_sessions: sessions, ..Default::default() }).await;
    apply(&store, Changes { inbound_group_sessions: second, ..Default::default() }).await;

    assert!(store.inbound_group_sessions_page(None, 0).await.unwrap().is_empty());
    for limit in [100, 7, COUNT, COUNT + 1] {
        let mut seen = BTreeSet::new();
        let mut cursor = None;
        let mut pages = Vec::new();
        loop {
            let page = store.inbound_group_sessions_page(cursor.clone(), limit).await.unwrap();
            assert!(page.len() <= limit, "page of {} over limit {limit}", page.len());
            if page.is_empty() {
                break;
            }
            pages.push(page.len());
            for s in &page {
                assert!(seen.insert(to_json(s).to_string()), "limit {limit}: a session came twice");
            }
            let last = page.last().unwrap();
            cursor = Some((last.room_id.clone(), last.session_id.clone()));
            assert!(pages.len() <= COUNT, "paging does not end");
        }
        assert_eq!(seen, expected, "limit {limit}: not every session was visited");
        // Only the last page may be short.
        let full = COUNT / limit;
        assert!(pages[..full].iter().all(|&n| n == limit), "limit {limit}: {pages:?}");
    }
}

async fn outbound_sessions(store: impl Store) {
    let room_a = room(ROOM_A);
    let room_b = room(ROOM_B);
    assert!(store.outbound_group_session(&room_a).await.unwrap().is_none());
    let a = outbound(&room_a, 0);
    let b = outbound(&room_b, 3);
    let (a_json, b_json) = (to_json(&a), to_json(&b));
    let a_session = a.session_id.clone();
    apply(&store, Changes { outbound_group_sessions: vec![a, b], ..Default::default() }).await;
    assert_eq!(to_json(&store.outbound_group_session(&room_a).await.unwrap().unwrap()), a_json);
    assert_eq!(to_json(&store.outbound_group_session(&room_b).await.unwrap().unwrap()), b_json);

    // An update of the room's session (one generation later) replaces it.
    let mut shared = outbound(&room_a, 5);
    shared.session_id = a_session;
    shared.generation = 1;
    std::sync::Arc::make_mut(&mut shared.shared_with).entry(user(BOB)).or_default().insert(
        device(DEVICE),
        newt_proto::records::ShareInfo { sender_key: "bob-curve".into(), message_index: 5 },
    );
    let shared_json = to_json(&shared);
    apply(&store, Changes { outbound_group_sessions: vec![shared], ..Default::default() }).await;
    assert_eq!(
        to_json(&store.outbound_group_session(&room_a).await.unwrap().unwrap()),
        shared_json
    );

    // Removal and upsert of one room in one Changes: removal first, so the
    // new session stays.
    let rotated = outbound(&room_a, 0);
    let rotated_json = to_json(&rotated);
    apply(
        &store,
        Changes {
            removed_outbound_group_sessions: vec![room_a.clone()],
            outbound_group_sessions: vec![rotated],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        to_json(&store.outbound_group_session(&room_a).await.unwrap().unwrap()),
        rotated_json
    );

    // Removal alone discards it; the other room is untouched.
    apply(
        &store,
        Changes { removed_outbound_group_sessions: vec![room_a.clone()], ..Default::default() },
    )
    .await;
    assert!(store.outbound_group_session(&room_a).await.unwrap().is_none());
    assert_eq!(to_json(&store.outbound_group_session(&room_b).await.unwrap().unwrap()), b_json);
    // Removing what is not there is fine.
    apply(&store, Changes { removed_outbound_group_sessions: vec![room_a], ..Default::default() })
        .await;
}

async fn outbound_generation_rule(store: impl Store) {
    let room_a = room(ROOM_A);
    // Nothing stored: only a new session (generation 0) may be written.
    refused(
        &store,
        Changes {
            outbound_group_sessions: vec![OutboundGroupSessionRecord {
                generation: 3,
                ..outbound(&room_a, 0)
            }],
            ..Default::default()
        },
    )
    .await;
    assert!(store.outbound_group_session(&room_a).await.unwrap().is_none());
    let first = outbound(&room_a, 0);
    let session_id = first.session_id.clone();
    apply(&store, Changes { outbound_group_sessions: vec![first], ..Default::default() }).await;
    // Then an update of that session is exactly one past the stored
    // generation; anything else is stale and writes nothing (not even the
    // other parts of the changes).
    for generation in [0, 2, 5] {
        refused(
            &store,
            Changes {
                outbound_group_sessions: vec![OutboundGroupSessionRecord {
                    generation,
                    session_id: session_id.clone(),
                    ..outbound(&room_a, 7)
                }],
                sync_token: Some("stale".into()),
                ..Default::default()
            },
        )
        .await;
        let stored = store.outbound_group_session(&room_a).await.unwrap().unwrap();
        assert_eq!((stored.session_id, stored.generation), (session_id.clone(), 0));
        assert_eq!(store.sync_token().await.unwrap(), None);
    }
    let next = OutboundGroupSessionRecord {
        generation: 1,
        session_id: session_id.clone(),
        ..outbound(&room_a, 1)
    };
    apply(&store, Changes { outbound_group_sessions: vec![next], ..Default::default() }).await;
    assert_eq!(store.outbound_group_session(&room_a).await.unwrap().unwrap().generation, 1);
    // A stale copy of another session (one this room rotated away from, at
    // the generation the stored one expects next) is refused too.
    refused(
        &store,
        Changes {
            outbound_group_sessions: vec![OutboundGroupSessionRecord {
                generation: 2,
                ..outbound(&room_a, 9)
            }],
            ..Default::default()
        },
    )
    .await;
    let stored = store.outbound_group_session(&room_a).await.unwrap().unwrap();
    assert_eq!((stored.session_id, stored.generation), (session_id.clone(), 1));
    // A discarded session cannot be written back from a stale copy...
    apply(
        &store,
        Changes { removed_outbound_group_sessions: vec![room_a.clone()], ..Default::default() },
    )
    .await;
    refused(
        &store,
        Changes {
            outbound_group_sessions: vec![OutboundGroupSessionRecord {
                generation: 2,
                ..outbound(&room_a, 2)
            }],
            ..Default::default()
        },
    )
    .await;
    assert!(store.outbound_group_session(&room_a).await.unwrap().is_none());
    // ...but a new session may take its place.
    apply(
        &store,
        Changes { outbound_group_sessions: vec![outbound(&room_a, 0)], ..Default::default() },
    )
    .await;
    assert_eq!(store.outbound_group_session(&room_a).await.unwrap().unwrap().generation, 0);
}

async fn sender_keys_with_olm_sessions(store: impl Store) {
    let mut peer = Account::new();
    let with_two = olm_session(&mut peer, 0);
    let key = with_two.sender_key.clone();
    let mut second = olm_session(&mut peer, 0);
    second.session_id = format!("{}-second", second.session_id);
    let mut other_peer = Account::new();
    let other = olm_session(&mut other_peer, 0);
    let other_key = other.sender_key.clone();
    apply(&store, Changes { olm_sessions: vec![with_two, second, other], ..Default::default() })
        .await;
    let unknown = Account::new().curve25519_key().to_base64();
    let asked = [key.as_str(), unknown.as_str(), other_key.as_str(), key.as_str()];
    let found = store.sender_keys_with_olm_sessions(&asked).await.unwrap();
    let expected: std::collections::HashSet<String> = [key, other_key].into_iter().collect();
    assert_eq!(found, expected);
    assert!(store.sender_keys_with_olm_sessions(&[]).await.unwrap().is_empty());
    assert!(store.sender_keys_with_olm_sessions(&[unknown.as_str()]).await.unwrap().is_empty());
}

async fn inbound_batch(store: impl Store) {
    let room_a = room(ROOM_A);
    let room_b = room(ROOM_B);
    let a = inbound(&room_a);
    let b = inbound(&room_b);
    let (a_key, b_key) = (a.session_id.clone(), b.session_id.clone());
    let (a_json, b_json) = (to_json(&a), to_json(&b));
    apply(&store, Changes { inbound_group_sessions: vec![a, b], ..Default::default() }).await;
    let asked = vec![
        (room_b.clone(), b_key.clone()),
        (room_a.clone(), "absent".to_owned()),
        // The right session ID in the wrong room is absent.
        (room_b.clone(), a_key.clone()),
        (room_a.clone(), a_key.clone()),
    ];
    let found = json_set(&store.inbound_group_sessions(&asked).await.unwrap());
    assert_eq!(found, json_set(&[a_json, b_json]));
    assert!(store.inbound_group_sessions(&[]).await.unwrap().is_empty());
}

/// The batched reads return exactly what the single reads return, together.
async fn devices_and_olm_batch(store: impl Store) {
    let mut devices: Vec<DeviceRecord> =
        ["ALICE1", "ALICE2"].iter().map(|d| device_record(ALICE, d)).collect();
    devices.push(device_record(BOB, "BOB1"));
    let mut peers = [Account::new(), Account::new()];
    let mut sessions = vec![olm_session(&mut peers[0], 0), olm_session(&mut peers[1], 0)];
    let mut second = olm_session(&mut peers[0], 1);
    second.session_id = format!("{}-second", second.session_id);
    sessions.push(second);
    let keys: Vec<String> = peers.iter().map(|p| p.curve25519_key().to_base64()).collect();
    apply(
        &store,
        Changes { devices: devices.clone(), olm_sessions: sessions, ..Default::default() },
    )
    .await;

    let users = [user(CAROL), user(BOB), user(ALICE)];
    let mut expected = Vec::new();
    for u in &users {
        expected.extend(store.devices(u).await.unwrap());
    }
    assert_eq!(sorted_devices(store.devices_of(&users).await.unwrap()), sorted_devices(expected));
    assert_eq!(sorted_devices(store.devices_of(&users).await.unwrap()), sorted_devices(devices));
    assert!(store.devices_of(&[]).await.unwrap().is_empty());

    let unknown = Account::new().curve25519_key().to_base64();
    let asked = [keys[1].as_str(), unknown.as_str(), keys[0].as_str()];
    let mut expected = Vec::new();
    for k in asked {
        expected.extend(store.olm_sessions(k).await.unwrap());
    }
    let expected = json_set(&expected);
    let found = json_set(&store.olm_sessions_of(&asked).await.unwrap());
    assert_eq!(found.len(), 3);
    assert_eq!(found, expected);
    assert!(store.olm_sessions_of(&[unknown.as_str()]).await.unwrap().is_empty());
}

async fn devices_by_user(store: impl Store) {
    let alice_devices: Vec<DeviceRecord> =
        ["ALICE1", "ALICE2", "ALICE3"].iter().map(|d| device_record(ALICE, d)).collect();
    let bob_device = device_record(BOB, "BOB1");
    assert!(store.devices(&user(ALICE)).await.unwrap().is_empty());
    let mut all = alice_devices.clone();
    all.push(bob_device.clone());
    apply(&store, Changes { devices: all, ..Default::default() }).await;
    assert_eq!(sorted_devices(store.devices(&user(ALICE)).await.unwrap()), alice_devices);
    assert_eq!(store.devices(&user(BOB)).await.unwrap(), vec![bob_device.clone()]);
    assert!(store.devices(&user(CAROL)).await.unwrap().is_empty());

    // Upsert by (user, device).
    let mut verified = device_record(ALICE, "ALICE2");
    verified.local_trust = LocalTrust::Verified;
    verified.deleted = true;
    apply(&store, Changes { devices: vec![verified.clone()], ..Default::default() }).await;
    let read = sorted_devices(store.devices(&user(ALICE)).await.unwrap());
    assert_eq!(read, vec![alice_devices[0].clone(), verified.clone(), alice_devices[2].clone()]);

    // Removal; removal and upsert together keep the upsert.
    let mut back = device_record(ALICE, "ALICE3");
    back.display_name = Some("re-added".into());
    apply(
        &store,
        Changes {
            removed_devices: vec![
                (user(ALICE), device("ALICE1")),
                (user(ALICE), device("ALICE3")),
                (user(ALICE), device("NEVER")),
            ],
            devices: vec![back.clone()],
            ..Default::default()
        },
    )
    .await;
    let read = sorted_devices(store.devices(&user(ALICE)).await.unwrap());
    assert_eq!(read, vec![verified, back]);
    assert_eq!(store.devices(&user(BOB)).await.unwrap(), vec![bob_device]);
}

async fn tracked_users(store: impl Store) {
    assert!(store.tracked_users().await.unwrap().is_empty());
    let users = vec![tracked(ALICE, true), tracked(BOB, true), tracked(CAROL, false)];
    apply(&store, Changes { tracked_users: users.clone(), ..Default::default() }).await;
    assert_eq!(sorted_tracked(store.tracked_users().await.unwrap()), users);

    apply(&store, Changes { tracked_users: vec![tracked(BOB, false)], ..Default::default() }).await;
    let read = sorted_tracked(store.tracked_users().await.unwrap());
    assert_eq!(read, vec![tracked(ALICE, true), tracked(BOB, false), tracked(CAROL, false)]);

    // Untrack; untrack and track in one Changes keeps the tracking.
    apply(
        &store,
        Changes {
            untracked_users: vec![user(ALICE), user(CAROL), user("@nobody:example.org")],
            tracked_users: vec![tracked(CAROL, true)],
            ..Default::default()
        },
    )
    .await;
    let read = sorted_tracked(store.tracked_users().await.unwrap());
    assert_eq!(read, vec![tracked(BOB, false), tracked(CAROL, true)]);
}

async fn key_requests(store: impl Store) {
    let room_a = room(ROOM_A);
    let room_b = room(ROOM_B);
    let r1 = key_request("req-1", &room_a, "session-1", false);
    let r2 = key_request("req-2", &room_a, "session-2", true);
    let r3 = key_request("req-3", &room_b, "session-1", false);
    assert!(store.key_request("req-1").await.unwrap().is_none());
    assert!(store.unsent_key_requests().await.unwrap().is_empty());
    apply(
        &store,
        Changes { key_requests: vec![r1.clone(), r2.clone(), r3.clone()], ..Default::default() },
    )
    .await;

    assert_eq!(store.key_request("req-2").await.unwrap(), Some(r2.clone()));
    assert!(store.key_request("req-4").await.unwrap().is_none());
    assert_eq!(
        store.key_request_for_session(&room_a, "session-1").await.unwrap(),
        Some(r1.clone())
    );
    assert_eq!(
        store.key_request_for_session(&room_b, "session-1").await.unwrap(),
        Some(r3.clone())
    );
    assert!(store.key_request_for_session(&room_b, "session-2").await.unwrap().is_none());
    assert_eq!(
        sorted_requests(store.unsent_key_requests().await.unwrap()),
        vec![r1.clone(), r3.clone()]
    );

    // Marking sent is an upsert; removal deletes by ID.
    let r1_sent = key_request("req-1", &room_a, "session-1", true);
    apply(
        &store,
        Changes {
            key_requests: vec![r1_sent.clone()],
            removed_key_requests: vec!["req-3".into(), "req-missing".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(store.key_request("req-1").await.unwrap(), Some(r1_sent.clone()));
    assert!(store.key_request("req-3").await.unwrap().is_none());
    assert!(store.key_request_for_session(&room_b, "session-1").await.unwrap().is_none());
    assert!(store.unsent_key_requests().await.unwrap().is_empty());
    assert_eq!(store.key_request_for_session(&room_a, "session-1").await.unwrap(), Some(r1_sent));

    // Removal and upsert of one ID together keep the upsert.
    apply(
        &store,
        Changes {
            removed_key_requests: vec!["req-2".into()],
            key_requests: vec![key_request("req-2", &room_a, "session-2", false)],
            ..Default::default()
        },
    )
    .await;
    let unsent = store.unsent_key_requests().await.unwrap();
    assert_eq!(unsent, vec![key_request("req-2", &room_a, "session-2", false)]);
}

/// Notices are kept per (room, session, sender): another sender's notice
/// for the same session neither replaces nor shows as the first one's.
async fn withheld(store: impl Store) {
    let room_a = room(ROOM_A);
    let bob = user(BOB);
    assert!(store.withheld(&room_a, "session-1", &bob).await.unwrap().is_none());
    let w = withheld_record(&room_a, "session-1", "m.unverified");
    apply(&store, Changes { withheld: vec![w.clone()], ..Default::default() }).await;
    assert_eq!(store.withheld(&room_a, "session-1", &bob).await.unwrap(), Some(w.clone()));
    assert!(store.withheld(&room_a, "session-2", &bob).await.unwrap().is_none());
    assert!(store.withheld(&room(ROOM_B), "session-1", &bob).await.unwrap().is_none());
    assert!(store.withheld(&room_a, "session-1", &user(CAROL)).await.unwrap().is_none());
    let mut carols = withheld_record(&room_a, "session-1", "m.blacklisted");
    carols.sender = user(CAROL);
    apply(&store, Changes { withheld: vec![carols.clone()], ..Default::default() }).await;
    assert_eq!(store.withheld(&room_a, "session-1", &bob).await.unwrap(), Some(w));
    assert_eq!(store.withheld(&room_a, "session-1", &user(CAROL)).await.unwrap(), Some(carols));
    let replaced = withheld_record(&room_a, "session-1", "m.blacklisted");
    apply(&store, Changes { withheld: vec![replaced.clone()], ..Default::default() }).await;
    assert_eq!(store.withheld(&room_a, "session-1", &bob).await.unwrap(), Some(replaced));
}

async fn message_indices(store: impl Store) {
    let room_a = room(ROOM_A);
    let m0 = message_index(&room_a, "session-1", 0, "$e0");
    let m7 = message_index(&room_a, "session-1", 7, "$e7");
    assert!(store.message_index(&room_a, "session-1", 0).await.unwrap().is_none());
    apply(&store, Changes { message_indices: vec![m0.clone(), m7.clone()], ..Default::default() })
        .await;
    assert_eq!(store.message_index(&room_a, "session-1", 0).await.unwrap(), Some(m0));
    assert_eq!(store.message_index(&room_a, "session-1", 7).await.unwrap(), Some(m7));
    assert!(store.message_index(&room_a, "session-1", 1).await.unwrap().is_none());
    assert!(store.message_index(&room_a, "session-2", 0).await.unwrap().is_none());
    assert!(store.message_index(&room(ROOM_B), "session-1", 0).await.unwrap().is_none());
    let replaced = message_index(&room_a, "session-1", 7, "$other");
    apply(&store, Changes { message_indices: vec![replaced.clone()], ..Default::default() }).await;
    assert_eq!(store.message_index(&room_a, "session-1", 7).await.unwrap(), Some(replaced));
}

async fn sync_token(store: impl Store) {
    assert!(store.sync_token().await.unwrap().is_none());
    apply(&store, Changes { sync_token: Some("s1_2_3".into()), ..Default::default() }).await;
    assert_eq!(store.sync_token().await.unwrap().as_deref(), Some("s1_2_3"));
    apply(&store, Changes { sync_token: Some("s4_5_6".into()), ..Default::default() }).await;
    assert_eq!(store.sync_token().await.unwrap().as_deref(), Some("s4_5_6"));
    // A commit without a token leaves it.
    apply(&store, Changes { tracked_users: vec![tracked(ALICE, true)], ..Default::default() })
        .await;
    assert_eq!(store.sync_token().await.unwrap().as_deref(), Some("s4_5_6"));
}

async fn identities_by_user(store: impl Store) {
    assert!(store.identity(&user(ALICE)).await.unwrap().is_none());
    let alice = identity_record(ALICE, "master-a-1");
    let bob = identity_record(BOB, "master-b-1");
    apply(&store, Changes { identities: vec![alice.clone(), bob.clone()], ..Default::default() })
        .await;
    assert_eq!(store.identity(&user(ALICE)).await.unwrap(), Some(alice));
    assert_eq!(store.identity(&user(BOB)).await.unwrap(), Some(bob.clone()));
    assert!(store.identity(&user(CAROL)).await.unwrap().is_none());
    // Upsert by user; within one commit the later entry wins.
    let mut acked = identity_record(ALICE, "master-a-2");
    acked.pinned_master_key = Some("master-a-2".into());
    acked.previously_verified = true;
    acked.user_signing_key = Some(json!({ "usage": ["user_signing"] }));
    apply(
        &store,
        Changes {
            identities: vec![identity_record(ALICE, "master-a-x"), acked.clone()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(store.identity(&user(ALICE)).await.unwrap(), Some(acked));
    assert_eq!(store.identity(&user(BOB)).await.unwrap(), Some(bob));
}

async fn private_identity(store: impl Store) {
    assert!(store.private_identity().await.unwrap().is_none());
    let first = private_identity_record("seed-1");
    apply(&store, Changes { private_identity: Some(first.clone()), ..Default::default() }).await;
    assert_eq!(store.private_identity().await.unwrap(), Some(first.clone()));
    // A commit without it leaves it.
    apply(&store, Changes { sync_token: Some("t".into()), ..Default::default() }).await;
    assert_eq!(store.private_identity().await.unwrap(), Some(first));
    let mut second = private_identity_record("seed-2");
    second.user_signing = None;
    apply(&store, Changes { private_identity: Some(second.clone()), ..Default::default() }).await;
    assert_eq!(store.private_identity().await.unwrap(), Some(second));
}

async fn later_entry_wins(store: impl Store) {
    let room_a = room(ROOM_A);
    let first = inbound(&room_a);
    let id = first.session_id.clone();
    let mut second = inbound(&room_a);
    second.session_id = id.clone();
    second.first_known_index = 9;
    let second_json = to_json(&second);
    apply(
        &store,
        Changes {
            inbound_group_sessions: vec![first, second],
            tracked_users: vec![tracked(BOB, true), tracked(BOB, false)],
            key_requests: vec![
                key_request("req", &room_a, "s", false),
                key_request("req", &room_a, "s", true),
            ],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        to_json(&store.inbound_group_session(&room_a, &id).await.unwrap().unwrap()),
        second_json
    );
    assert_eq!(store.tracked_users().await.unwrap(), vec![tracked(BOB, false)]);
    assert!(store.key_request("req").await.unwrap().unwrap().sent);
    assert!(store.unsent_key_requests().await.unwrap().is_empty());
}

async fn empty_changes(store: impl Store) {
    apply(&store, everything(1)).await;
    let before = snapshot(&store).await;
    apply(&store, Changes::default()).await;
    assert_eq!(snapshot(&store).await, before);
}

async fn failed_apply_changes_nothing(store: impl Store) {
    apply(&store, Changes { account: Some(account(ALICE, DEVICE, 3)), ..everything(1) }).await;
    let before = snapshot(&store).await;
    assert!(before["inbound"].as_array().unwrap().len() == 2, "{before}");

    // A commit that removes and replaces everything, then fails its account
    // check, must leave every earlier value as it was.
    let mut changes = everything(2);
    changes.account = Some(account(ALICE, DEVICE, 3));
    changes.removed_outbound_group_sessions = vec![room(ROOM_A), room(ROOM_B)];
    changes.removed_devices = vec![(user(ALICE), device("ALICE1")), (user(BOB), device("BOB1"))];
    changes.untracked_users = vec![user(ALICE), user(BOB)];
    changes.removed_key_requests = vec!["req-1".into(), "req-2".into()];
    let err = store.apply(changes).await.unwrap_err();
    assert!(matches!(err, StoreError::StaleGeneration { found: 3, .. }), "{err:?}");
    assert_eq!(snapshot(&store).await, before);

    // The same commit with the right generation goes through whole.
    let mut changes = everything(2);
    changes.account = Some(account(ALICE, DEVICE, 4));
    changes.devices.clear();
    changes.removed_devices = vec![(user(BOB), device("BOB1"))];
    apply(&store, changes).await;
    let after = snapshot(&store).await;
    assert_ne!(after, before);
    assert_eq!(after["account"]["generation"], json!(4));
    assert_eq!(after["sync_token"], json!("token-2"));
    assert_eq!(after["devices"][BOB], json!([]));
    assert_eq!(after["identity"]["self_signing_key"]["n"], json!(2));
    assert_eq!(after["private_identity"]["master"], json!("seed-2"));
}

// ---------------------------------------------------------------- helpers

const ALICE: &str = "@alice:example.org";
const BOB: &str = "@bob:example.org";
const CAROL: &str = "@carol:example.org";
const DEVICE: &str = "ALICEDEVICE";
const OTHER_DEVICE: &str = "OTHERDEVICE";
const ROOM_A: &str = "!room-a:example.org";
const ROOM_B: &str = "!room-b:example.org";

/// Applies `changes`, which the generation rule must refuse.
async fn refused(store: &impl Store, changes: Changes) {
    let err = store.apply(changes).await.unwrap_err();
    assert!(matches!(err, StoreError::StaleGeneration { .. }), "{err:?}");
}

async fn apply(store: &impl Store, changes: Changes) {
    store.apply(changes).await.unwrap();
}

fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap()
}

/// Records as a set of their JSON texts (for reads whose order is free).
fn json_set<T: Serialize>(records: &[T]) -> BTreeSet<String> {
    records.iter().map(|r| to_json(r).to_string()).collect()
}

fn sorted_json<T: Serialize>(records: &[T], key: impl Fn(&T) -> String) -> Vec<Value> {
    let mut keyed: Vec<(String, Value)> = records.iter().map(|r| (key(r), to_json(r))).collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed.into_iter().map(|(_, v)| v).collect()
}

fn sorted_devices(mut devices: Vec<DeviceRecord>) -> Vec<DeviceRecord> {
    devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    devices
}

fn sorted_tracked(mut users: Vec<TrackedUser>) -> Vec<TrackedUser> {
    users.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    users
}

fn sorted_requests(mut requests: Vec<KeyRequestRecord>) -> Vec<KeyRequestRecord> {
    requests.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    requests
}

fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).unwrap()
}

fn room(id: &str) -> RoomId {
    RoomId::parse(id).unwrap()
}

fn account(user_id: &str, device_id: &str, generation: u64) -> AccountRecord {
    let mut live = Account::new();
    live.generate_one_time_keys(3);
    live.generate_fallback_key();
    AccountRecord {
        user_id: user(user_id),
        device_id: device(device_id),
        pickle: live.pickle(),
        shared: false,
        uploaded_one_time_key_count: 0,
        fallback_key_created_at: None,
        fallback_key_published_at: None,
        generation,
        upload_lease_since: None,
    }
}

/// A real outbound Olm session from a fresh account to `peer`.
fn olm_session(peer: &mut Account, created_at: u64) -> OlmSessionRecord {
    peer.generate_one_time_keys(1);
    let otk = *peer.one_time_keys().values().next().unwrap();
    peer.mark_keys_as_published();
    let session = Account::new()
        .create_outbound_session(OlmConfig::version_1(), peer.curve25519_key(), otk)
        .unwrap();
    OlmSessionRecord {
        sender_key: peer.curve25519_key().to_base64(),
        session_id: session.session_id(),
        pickle: Box::new(session.pickle()),
        created_at,
        last_used_at: created_at,
        generation: 0,
    }
}

/// A real inbound Megolm session for `room_id`.
fn inbound(room_id: &RoomId) -> InboundGroupSessionRecord {
    let outbound = GroupSession::new(MegolmConfig::version_1());
    let session = InboundGroupSession::new(&outbound.session_key(), MegolmConfig::version_1());
    InboundGroupSessionRecord {
        room_id: room_id.clone(),
        session_id: session.session_id(),
        sender_key: sender_curve_key().to_owned(),
        sender_claimed_ed25519: "claimed-ed25519".into(),
        sender_user_id: Some(user(BOB)),
        source: SessionSource::RoomKey,
        forwarding_chain: Vec::new(),
        first_known_index: session.first_known_index(),
        shared_history: false,
        pickle: session.pickle(),
        backed_up: false,
    }
}

fn sender_curve_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| Account::new().curve25519_key().to_base64())
}

/// A real outbound Megolm session for `room_id`.
fn outbound(room_id: &RoomId, message_count: u64) -> OutboundGroupSessionRecord {
    let session = GroupSession::new(MegolmConfig::version_1());
    OutboundGroupSessionRecord {
        room_id: room_id.clone(),
        session_id: session.session_id(),
        pickle: session.pickle(),
        created_at: 1_700_000_000_000,
        message_count,
        rotation_period_msgs: 100,
        rotation_period_ms: 604_800_000,
        shared_with: Default::default(),
        withheld_to: Default::default(),
        generation: 0,
    }
}

fn device_record(user_id: &str, device_id: &str) -> DeviceRecord {
    let keys = Account::new();
    DeviceRecord {
        user_id: user(user_id),
        device_id: device(device_id),
        curve25519: keys.curve25519_key().to_base64(),
        ed25519: keys.ed25519_key().to_base64(),
        algorithms: vec!["m.olm.v1.curve25519-aes-sha2".into(), "m.megolm.v1.aes-sha2".into()],
        display_name: Some(format!("{device_id}'s phone")),
        keys: json!({ "user_id": user_id, "device_id": device_id }).into(),
        local_trust: LocalTrust::Unset,
        deleted: false,
    }
}

fn tracked(user_id: &str, outdated: bool) -> TrackedUser {
    TrackedUser { user_id: user(user_id), outdated }
}

fn key_request(id: &str, room_id: &RoomId, session_id: &str, sent: bool) -> KeyRequestRecord {
    KeyRequestRecord {
        request_id: id.into(),
        room_id: room_id.clone(),
        session_id: session_id.into(),
        sent,
    }
}

fn identity_record(user_id: &str, master: &str) -> IdentityRecord {
    IdentityRecord {
        user_id: user(user_id),
        master_key: json!({ "user_id": user_id, "usage": ["master"], "keys": { master: master } }),
        self_signing_key: json!({ "user_id": user_id, "usage": ["self_signing"] }),
        user_signing_key: None,
        pinned_master_key: None,
        previously_verified: false,
        locally_verified: false,
    }
}

fn private_identity_record(seed: &str) -> PrivateIdentityRecord {
    PrivateIdentityRecord {
        user_id: user(ALICE),
        master: Some(seed.into()),
        self_signing: Some(format!("{seed}-ssk")),
        user_signing: Some(format!("{seed}-usk")),
    }
}

fn withheld_record(room_id: &RoomId, session_id: &str, code: &str) -> WithheldRecord {
    WithheldRecord {
        room_id: room_id.clone(),
        session_id: session_id.into(),
        sender: user(BOB),
        code: code.into(),
        reason: Some("because".into()),
    }
}

fn message_index(
    room_id: &RoomId,
    session_id: &str,
    index: u32,
    event: &str,
) -> MessageIndexRecord {
    MessageIndexRecord {
        room_id: room_id.clone(),
        session_id: session_id.into(),
        index,
        event_id: event.into(),
        origin_server_ts: 1_700_000_000_000 + u64::from(index),
    }
}

/// One of everything, tagged with `n` where a value can differ: used to
/// check that a failed commit writes none of it.
fn everything(n: u64) -> Changes {
    let room_a = room(ROOM_A);
    let room_b = room(ROOM_B);
    let mut inbound_a = inbound(&room_a);
    inbound_a.session_id = format!("inbound-a-{n}");
    let mut inbound_b = inbound(&room_b);
    inbound_b.session_id = "inbound-b".into();
    inbound_b.first_known_index = n as u32;
    let mut olm = olm_session(&mut fixed_peer(), n);
    olm.session_id = format!("olm-{n}");
    let mut alice_device = device_record(ALICE, "ALICE1");
    alice_device.display_name = Some(format!("phone {n}"));
    Changes {
        account: None,
        olm_sessions: vec![olm],
        inbound_group_sessions: vec![inbound_a, inbound_b],
        outbound_group_sessions: vec![
            // New sessions each time: generation 0 may replace any session.
            outbound(&room_a, n),
            outbound(&room_b, n),
        ],
        removed_outbound_group_sessions: Vec::new(),
        devices: vec![alice_device, device_record(BOB, "BOB1")],
        removed_devices: Vec::new(),
        tracked_users: vec![tracked(ALICE, n.is_multiple_of(2)), tracked(BOB, true)],
        untracked_users: Vec::new(),
        key_requests: vec![
            key_request("req-1", &room_a, "inbound-b", n.is_multiple_of(2)),
            key_request("req-2", &room_b, "inbound-b", false),
        ],
        removed_key_requests: Vec::new(),
        withheld: vec![withheld_record(&room_a, "inbound-b", &format!("m.code.{n}"))],
        message_indices: vec![message_index(&room_a, "inbound-b", 0, &format!("$event-{n}"))],
        sync_token: Some(format!("token-{n}")),
        identities: vec![{
            let mut i = identity_record(BOB, "master-b");
            i.self_signing_key["n"] = json!(n);
            i
        }],
        private_identity: Some(private_identity_record(&format!("seed-{n}"))),
    }
}

/// The peer of every [`everything`] Olm session.
fn fixed_peer() -> Account {
    static PEER: OnceLock<Value> = OnceLock::new();
    let pickle = PEER.get_or_init(|| to_json(&Account::new().pickle()));
    Account::from_pickle(serde_json::from_value(pickle.clone()).unwrap())
}

/// Everything a store holds under the keys [`everything`] uses, as JSON.
async fn snapshot(store: &impl Store) -> Value {
    let room_a = room(ROOM_A);
    let room_b = room(ROOM_B);
    let peer_key = fixed_peer().curve25519_key().to_base64();
    let mut inbound = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.inbound_group_sessions_page(cursor, 1).await.unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some((last.room_id.clone(), last.session_id.clone()));
        inbound.push(to_json(last).to_string());
    }
    inbound.sort();
    let mut devices = serde_json::Map::new();
    for u in [ALICE, BOB, CAROL] {
        devices.insert(u.into(), to_json(&sorted_devices(store.devices(&user(u)).await.unwrap())));
    }
    let mut requests = Vec::new();
    for id in ["req-1", "req-2"] {
        requests.push(to_json(&store.key_request(id).await.unwrap()));
    }
    json!({
        "account": to_json(&store.account().await.unwrap()),
        "olm": sorted_json(&store.olm_sessions(&peer_key).await.unwrap(), |s| s.session_id.clone()),
        "inbound": inbound,
        "inbound_b": to_json(&store.inbound_group_session(&room_b, "inbound-b").await.unwrap()),
        "outbound": [
            to_json(&store.outbound_group_session(&room_a).await.unwrap()),
            to_json(&store.outbound_group_session(&room_b).await.unwrap()),
        ],
        "devices": devices,
        "tracked": to_json(&sorted_tracked(store.tracked_users().await.unwrap())),
        "requests": requests,
        "request_for_session": to_json(&store.key_request_for_session(&room_b, "inbound-b").await.unwrap()),
        "unsent": to_json(&sorted_requests(store.unsent_key_requests().await.unwrap())),
        "withheld": to_json(&store.withheld(&room_a, "inbound-b", &user(BOB)).await.unwrap()),
        "index": to_json(&store.message_index(&room_a, "inbound-b", 0).await.unwrap()),
        "sync_token": store.sync_token().await.unwrap(),
        "identity": to_json(&store.identity(&user(BOB)).await.unwrap()),
        "private_identity": to_json(&store.private_identity().await.unwrap()),
    })
}
