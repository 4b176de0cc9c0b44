//! Two processes sharing one SQLite store: an app that sends and a
//! notification extension that receives, running concurrently on separate
//! connections (as two processes would), each with its own in-memory
//! `Machine`. Every conflict surfaces as `StaleGeneration` (never "database
//! is locked", never a silently lost ratchet step); retrying the operation
//! succeeds, no Olm message is lost in either direction, and no one-time
//! key ID is uploaded twice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use newt::{Error, RoomId, RoomSettings, SyncChanges, ToDeviceOutcome, UserId};
use newt_router::Router;
use newt_sqlite::{SqliteStore, StoreKey};
use newt_store::{MemoryStore, StoreError};
use newt_test_support::{SimDevice, SimError};

const ROUNDS: usize = 25;

fn stale(e: &SimError) -> bool {
    matches!(e, SimError::Newt(Error::Store(StoreError::StaleGeneration { .. })))
}

/// Runs `op` until it does not fail with a generation conflict.
macro_rules! retry {
    ($conflicts:ident, $op:expr) => {{
        loop {
            match $op {
                Err(e) if stale(&e) => $conflicts += 1,
                other => break other.unwrap(),
            }
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_and_extension_share_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alice.sqlite");
    let key = [9u8; 32];
    let router = Arc::new(Router::new());
    let alice_id = UserId::parse("@alice:hs").unwrap();
    let bob_id = UserId::parse("@bob:hs").unwrap();
    let users = vec![alice_id.clone(), bob_id.clone()];

    let app = SimDevice::open(
        router.clone(),
        "@alice:hs",
        "A",
        Arc::new(SqliteStore::open(&path, StoreKey::Raw(key)).unwrap()),
    )
    .await
    .unwrap();
    app.flush().await.unwrap();
    let ext = SimDevice::open(
        router.clone(),
        "@alice:hs",
        "A",
        Arc::new(SqliteStore::open(&path, StoreKey::Raw(key)).unwrap()),
    )
    .await
    .unwrap();
    let bob = SimDevice::open(router.clone(), "@bob:hs", "B", Arc::new(MemoryStore::new()))
        .await
        .unwrap();
    bob.flush().await.unwrap();
    for d in [&app, &bob] {
        d.sync().await.unwrap();
        d.machine.update_tracked_users(users.clone()).await.unwrap();
        d.flush().await.unwrap();
    }

    // Bob keeps sending Alice new room keys (Olm); the extension receives
    // them while the app keeps sending Bob room keys over the same Olm
    // channel: both processes advance the same Olm session.
    let bob_rooms: Vec<RoomId> =
        (0..ROUNDS).map(|i| RoomId::parse(format!("!bob{i}:hs")).unwrap()).collect();
    let app_rooms: Vec<RoomId> =
        (0..ROUNDS).map(|i| RoomId::parse(format!("!app{i}:hs")).unwrap()).collect();

    let ext_task = {
        let (ext, bob, users, bob_rooms) =
            (ext.clone(), bob.clone(), users.clone(), bob_rooms.clone());
        tokio::spawn(async move {
            let mut conflicts = 0usize;
            let mut stored = Vec::new();
            for room in &bob_rooms {
                bob.share_room_key(room, &users, &RoomSettings::default()).await.unwrap();
                let batch: SyncChanges = ext.next_sync().unwrap();
                // A failed commit hands nothing out; the same batch is retried
                // (the server re-sends it: the token did not advance).
                let out = retry!(
                    conflicts,
                    ext.machine.receive_sync(batch.clone()).await.map_err(SimError::from)
                );
                for t in out.to_device {
                    if let ToDeviceOutcome::RoomKeyStored(r, _) = t.outcome {
                        stored.push(r);
                    }
                }
            }
            (stored, conflicts)
        })
    };
    let app_task = {
        let (app, users, app_rooms) = (app.clone(), users.clone(), app_rooms.clone());
        tokio::spawn(async move {
            let mut conflicts = 0usize;
            for room in &app_rooms {
                retry!(conflicts, app.share_room_key(room, &users, &RoomSettings::default()).await);
                retry!(conflicts, app.flush().await);
            }
            conflicts
        })
    };
    let (stored, ext_conflicts) = ext_task.await.unwrap();
    let app_conflicts = app_task.await.unwrap();

    // Every room key Bob sent reached the extension exactly once.
    assert_eq!(stored, bob_rooms, "extension lost or reordered Olm messages");
    // Every room key the app sent decrypts at Bob: no Olm message lost.
    let out = bob.sync().await.unwrap();
    let mut got: Vec<RoomId> = out
        .to_device
        .iter()
        .filter_map(|t| match &t.outcome {
            ToDeviceOutcome::RoomKeyStored(r, _) => Some(r.clone()),
            _ => None,
        })
        .collect();
    let rejected: Vec<_> = out
        .to_device
        .iter()
        .filter(|t| matches!(t.outcome, ToDeviceOutcome::Rejected(_)))
        .collect();
    assert!(rejected.is_empty(), "Bob could not decrypt: {rejected:?}");
    got.sort();
    let mut want = app_rooms.clone();
    want.sort();
    assert_eq!(got, want);
    // Both processes read what the other wrote.
    let e = bob.send_text(&bob_rooms[0], "hi both").await.unwrap();
    assert_eq!(app.decrypt(&bob_rooms[0], &e).await.unwrap().content["body"], "hi both");
    assert_eq!(ext.decrypt(&bob_rooms[0], &e).await.unwrap().content["body"], "hi both");
    // Both processes upload keys for the same device: never the same key twice.
    assert_eq!(router.duplicate_one_time_key_uploads().unwrap(), 0);
    eprintln!("generation conflicts retried: extension {ext_conflicts}, app {app_conflicts}");
}
