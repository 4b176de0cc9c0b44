//! newt ⇄ matrix-sdk-crypto 0.18, in-process through newt-router, both
//! directions: device and one-time keys, Olm to-device, Megolm room
//! events, and key export files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use newt::{RoomId, RoomSettings, SenderTrust, ToDeviceOutcome, UserId};
use newt_interop::matrix_sdk_common::deserialized_responses::{
    VerificationLevel, VerificationState,
};
use newt_interop::matrix_sdk_crypto::{decrypt_room_key_export, encrypt_room_key_export};
use newt_interop::RefDevice;
use newt_router::Router;
use newt_store::MemoryStore;
use newt_test_support::{dev, SimDevice};
use serde_json::{json, Value};

const ALICE: &str = "@alice:localhost";
const NEWT_DEV: &str = "NEWTDEV";
const BOB: &str = "@bob:localhost";
const REF_DEV: &str = "REFDEV";
const ROOM: &str = "!interop:localhost";

struct World {
    router: Arc<Router>,
    newt: SimDevice,
    reference: RefDevice,
}

/// Both devices created and their keys uploaded.
async fn world() -> World {
    let router = Arc::new(Router::new());
    let newt = SimDevice::open(router.clone(), ALICE, NEWT_DEV, Arc::new(MemoryStore::new()))
        .await
        .unwrap();
    let reference = RefDevice::open(router.clone(), BOB, REF_DEV).await.unwrap();
    assert!(newt.flush().await.unwrap() >= 1, "newt uploads its keys");
    assert!(reference.flush().await.unwrap() >= 1, "the reference uploads its keys");
    World { router, newt, reference }
}

fn alice() -> UserId {
    UserId::parse(ALICE).unwrap()
}
fn bob() -> UserId {
    UserId::parse(BOB).unwrap()
}
fn room() -> RoomId {
    RoomId::parse(ROOM).unwrap()
}
fn ref_room() -> newt_interop::ruma::OwnedRoomId {
    RefDevice::room(ROOM).unwrap()
}
fn ref_alice() -> newt_interop::ruma::OwnedUserId {
    RefDevice::user_id(ALICE).unwrap()
}
fn ref_bob() -> newt_interop::ruma::OwnedUserId {
    RefDevice::user_id(BOB).unwrap()
}

/// newt gets the reference's device into its store (track + query).
async fn newt_learns_bob(w: &World) {
    w.newt.machine.update_tracked_users([bob()]).await.unwrap();
    w.newt.flush().await.unwrap();
}

/// Shares newt's room key with the reference and lets the reference
/// receive it; returns the reference's sync outcome.
async fn newt_shares_with_reference(w: &World) -> newt_interop::RefSyncOutcome {
    let n =
        w.newt.share_room_key(&room(), &[alice(), bob()], &RoomSettings::default()).await.unwrap();
    assert_eq!(n, 1, "one to-device request carries the room key");
    w.reference.sync().await.unwrap()
}

/// Shares the reference's room key with newt; returns the room key
/// session IDs newt stored from that sync.
async fn reference_shares_with_newt(w: &World) -> Vec<String> {
    let n = w.reference.share_room_key(&ref_room(), &[ref_alice()]).await.unwrap();
    assert_eq!(n, 1, "one to-device request carries the room key");
    newt_learns_bob(w).await;
    let outcome = w.newt.sync().await.unwrap();
    let mut stored = Vec::new();
    for e in &outcome.to_device {
        assert_eq!(e.sender, BOB);
        if let ToDeviceOutcome::RoomKeyStored(r, s) = &e.outcome {
            assert_eq!(r, &room());
            assert!(e.encrypted);
            assert_eq!(e.event_type, "m.room_key");
            assert_eq!(e.sender_device.as_ref().map(|d| d.as_str()), Some(REF_DEV));
            stored.push(s.clone());
        } else {
            panic!("unexpected to-device outcome at newt: {e:?}");
        }
    }
    stored
}

// ---------------------------------------------------------------------------
// 1. Device keys and one-time keys.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn reference_queries_and_claims_newt_device() {
    let w = world().await;
    let keys = w.newt.machine.identity_keys().await;
    let (newt_curve, newt_ed) = (keys.curve25519, keys.ed25519);

    // Query + claim.
    assert!(
        w.reference.establish_sessions(&[ref_alice()]).await.unwrap(),
        "a /keys/claim went out"
    );
    let device = w
        .reference
        .machine
        .get_device(&ref_alice(), NEWT_DEV.into(), None)
        .await
        .unwrap()
        .expect("the reference knows newt's device");
    assert_eq!(device.curve25519_key().unwrap().to_base64(), newt_curve);
    assert_eq!(device.ed25519_key().unwrap().to_base64(), newt_ed);
    // The device keys' self-signature checked out: the reference stores only
    // valid devices, and newt's device advertises both algorithms.
    assert!(device.algorithms().iter().any(|a| a.as_str() == "m.olm.v1.curve25519-aes-sha2"));
    assert!(device.algorithms().iter().any(|a| a.as_str() == "m.megolm.v1.aes-sha2"));

    // The claimed one-time key's signature verified and a session exists.
    let missing = w
        .reference
        .machine
        .get_missing_sessions([ref_alice()].iter().map(|u| u.as_ref()))
        .await
        .unwrap();
    assert!(missing.is_none(), "the reference has an Olm session with newt's device");
    let sessions =
        w.reference.machine.store().get_sessions(&newt_curve).await.unwrap().expect("sessions");
    assert_eq!(sessions.len(), 1);

    // And it works: an Olm-encrypted to-device message reaches newt.
    let content = json!({"n": 1, "text": "hello newt, from the reference"});
    assert_eq!(
        w.reference
            .send_custom_to_device(&ref_alice(), NEWT_DEV, "org.example.interop", &content)
            .await
            .unwrap(),
        1
    );
    newt_learns_bob(&w).await;
    let outcome = w.newt.sync().await.unwrap();
    assert_eq!(outcome.to_device.len(), 1);
    let e = &outcome.to_device[0];
    assert_eq!(e.outcome, ToDeviceOutcome::ForApp, "{e:?}");
    assert!(e.encrypted);
    assert_eq!(e.event_type, "org.example.interop");
    assert_eq!(e.content, content);
    assert_eq!(e.sender, BOB);
    assert_eq!(e.sender_device.as_ref().map(|d| d.as_str()), Some(REF_DEV));
}

#[tokio::test]
async fn newt_queries_and_claims_reference_device() {
    let w = world().await;
    let ref_keys = w.reference.machine.identity_keys();

    newt_learns_bob(&w).await;
    let devices = w.newt.machine.devices(&bob()).await.unwrap();
    assert_eq!(devices.len(), 1, "{devices:?}");
    let d = &devices[0];
    assert_eq!(d.device_id.as_str(), REF_DEV);
    assert_eq!(d.curve25519, ref_keys.curve25519.to_base64());
    assert_eq!(d.ed25519, ref_keys.ed25519.to_base64());
    assert!(d.algorithms.iter().any(|a| a == "m.megolm.v1.aes-sha2"));

    // Claim: one of the reference's signed one-time keys.
    let claim = w.newt.machine.get_missing_sessions([bob()]).await.unwrap().expect("a claim");
    let (method, path) = claim.kind.method_and_path();
    let response = w.router.handle(ALICE, NEWT_DEV, method, &path, claim.kind.body()).unwrap();
    let claimed =
        response["one_time_keys"][BOB][REF_DEV].as_object().expect("a key was handed out");
    assert_eq!(claimed.len(), 1);
    assert!(claimed.keys().all(|k| k.starts_with("signed_curve25519:")));
    w.newt.machine.mark_request_sent(&claim.id, &response).await.unwrap();
    assert!(
        w.newt.machine.get_missing_sessions([bob()]).await.unwrap().is_none(),
        "newt has a session"
    );

    // The reference sees its one-time key count drop and tops it up.
    let outcome = w.reference.sync().await.unwrap();
    assert_eq!(outcome.requests_sent, 1, "a /keys/upload replacing the claimed key");
    assert_eq!(w.reference.sync().await.unwrap().requests_sent, 0, "and then nothing");
}

// ---------------------------------------------------------------------------
// 2. Olm to-device, both directions.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn olm_newt_to_reference_room_key() {
    let w = world().await;
    let outcome = newt_shares_with_reference(&w).await;
    assert_eq!(outcome.undecryptable(), 0);
    let decrypted = outcome.decrypted();
    assert_eq!(decrypted.len(), 1, "{:?}", outcome.to_device);
    let e = &decrypted[0];
    assert_eq!(e["type"], "m.room_key");
    assert_eq!(e["sender"], ALICE);
    assert_eq!(e["content"]["algorithm"], "m.megolm.v1.aes-sha2");
    assert_eq!(e["content"]["room_id"], ROOM);
    // The reference stored the inbound session.
    assert_eq!(outcome.room_keys.len(), 1);
    let info = &outcome.room_keys[0];
    assert_eq!(info.room_id.as_str(), ROOM);
    assert_eq!(info.session_id, e["content"]["session_id"].as_str().unwrap());
    let newt_curve = w.newt.machine.identity_keys().await.curve25519;
    assert_eq!(info.sender_key.to_base64(), newt_curve);
    // ... under the same session ID newt encrypts with.
    let event = w.newt.send_text(&room(), "probe").await.unwrap();
    assert_eq!(event["content"]["session_id"].as_str(), Some(info.session_id.as_str()));

    // A second Olm message over the same (now established) session.
    assert!(w.newt.machine.discard_room_key(&room()).await.is_ok());
    let outcome = newt_shares_with_reference(&w).await;
    assert_eq!(outcome.decrypted().len(), 1);
    assert_eq!(outcome.room_keys.len(), 1);
    assert_ne!(outcome.room_keys[0].session_id, info.session_id, "rotated");
}

#[tokio::test]
async fn olm_reference_to_newt_room_key() {
    let w = world().await;
    let stored = reference_shares_with_newt(&w).await;
    assert_eq!(stored.len(), 1);
    let event = w.reference.send_text(&ref_room(), "probe").await.unwrap();
    assert_eq!(event["content"]["session_id"].as_str(), Some(stored[0].as_str()));
}

#[tokio::test]
async fn olm_reference_custom_to_device_both_session_directions() {
    // newt starts the Olm session (pre-key message newt → reference), then
    // the reference answers over the session newt created.
    let w = world().await;
    let outcome = newt_shares_with_reference(&w).await;
    assert_eq!(outcome.decrypted().len(), 1);
    let content = json!({"reply": "over newt's session", "list": [1, 2, 3]});
    w.reference.establish_sessions(&[ref_alice()]).await.unwrap();
    assert_eq!(
        w.reference
            .send_custom_to_device(&ref_alice(), NEWT_DEV, "org.example.reply", &content)
            .await
            .unwrap(),
        1
    );
    let outcome = w.newt.sync().await.unwrap();
    assert_eq!(outcome.to_device.len(), 1);
    assert_eq!(outcome.to_device[0].outcome, ToDeviceOutcome::ForApp, "{:?}", outcome.to_device[0]);
    assert_eq!(outcome.to_device[0].content, content);
}

// ---------------------------------------------------------------------------
// 3. Megolm room events, both directions.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn megolm_newt_to_reference() {
    let w = world().await;
    let outcome = newt_shares_with_reference(&w).await;
    let session_id = outcome.room_keys[0].session_id.clone();
    for i in 0..5 {
        let body = format!("newt → reference #{i}");
        let event = w.newt.send_text(&room(), &body).await.unwrap();
        let d = w.reference.decrypt(&ref_room(), &event).await.unwrap();
        assert_eq!(d.event["type"], "m.room.message");
        assert_eq!(d.event["content"]["body"], body.as_str());
        assert_eq!(d.event["content"]["msgtype"], "m.text");
        assert_eq!(d.event["sender"], ALICE);
        assert_eq!(d.session_id.as_deref(), Some(session_id.as_str()));
        // The reference tied the session to newt's device (its keys match the
        // Olm channel and the claimed Ed25519 key); it is merely not cross-signed.
        assert_eq!(d.sender_device.as_deref(), Some(NEWT_DEV));
        assert_eq!(
            d.verification_state,
            VerificationState::Unverified(VerificationLevel::UnsignedDevice),
            "{d:?}"
        );
    }
}

#[tokio::test]
async fn megolm_reference_to_newt() {
    let w = world().await;
    let stored = reference_shares_with_newt(&w).await;
    for i in 0..5u32 {
        let body = format!("reference → newt #{i}");
        let event = w.reference.send_text(&ref_room(), &body).await.unwrap();
        let decrypted = w.newt.decrypt(&room(), &event).await.unwrap();
        assert_eq!(decrypted.event_type, "m.room.message");
        assert_eq!(decrypted.content["body"], body.as_str());
        assert_eq!(decrypted.content["msgtype"], "m.text");
        assert_eq!(decrypted.sender, bob());
        assert_eq!(decrypted.sender_device.as_ref().map(|d| d.as_str()), Some(REF_DEV));
        assert_eq!(decrypted.session_id, stored[0]);
        assert_eq!(decrypted.message_index, i);
        assert_eq!(
            decrypted.trust,
            SenderTrust::Unverified,
            "the session belongs to the reference's device"
        );
    }
}

#[tokio::test]
async fn megolm_conversation_both_ways() {
    let w = world().await;
    newt_shares_with_reference(&w).await;
    reference_shares_with_newt(&w).await;
    for i in 0..3 {
        let a = format!("alice says {i}");
        let e = w.newt.send_text(&room(), &a).await.unwrap();
        assert_eq!(
            w.reference.decrypt(&ref_room(), &e).await.unwrap().event["content"]["body"],
            a.as_str()
        );
        let b = format!("bob says {i}");
        let e = w.reference.send_text(&ref_room(), &b).await.unwrap();
        assert_eq!(w.newt.decrypt(&room(), &e).await.unwrap().content["body"], b.as_str());
    }
    // Both sides decrypt their own messages too.
    let events = w.router.room_events(ROOM).unwrap();
    assert_eq!(events.len(), 6);
    for e in &events {
        let by_newt = w.newt.decrypt(&room(), e).await.unwrap().content["body"].clone();
        let by_ref =
            w.reference.decrypt(&ref_room(), e).await.unwrap().event["content"]["body"].clone();
        assert_eq!(by_newt, by_ref);
        assert!(matches!(by_newt, Value::String(_)));
    }
}

// ---------------------------------------------------------------------------
// 4. Key export files, both directions.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn key_export_newt_to_reference() {
    let w = world().await;
    // newt creates a session nobody else received.
    w.newt.share_room_key(&room(), &[alice()], &RoomSettings::default()).await.unwrap();
    let event = w.newt.send_text(&room(), "exported by newt").await.unwrap();
    assert!(w.reference.decrypt(&ref_room(), &event).await.is_err(), "no key yet");

    let file = w.newt.machine.export_room_keys("interop passphrase", 10_000, None).await.unwrap();
    let keys = decrypt_room_key_export(file.as_bytes(), "interop passphrase").unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].session_id, event["content"]["session_id"].as_str().unwrap());
    let result =
        w.reference.machine.store().import_exported_room_keys(keys, |_, _| {}).await.unwrap();
    assert_eq!((result.imported_count, result.total_count), (1, 1));

    let d = w.reference.decrypt(&ref_room(), &event).await.unwrap();
    assert_eq!(d.event["content"]["body"], "exported by newt");
    assert_eq!(d.session_id.as_deref(), event["content"]["session_id"].as_str());
}

#[tokio::test]
async fn key_export_reference_to_newt() {
    let w = world().await;
    // The reference creates a session nobody else received.
    w.reference.share_room_key(&ref_room(), &[ref_bob()]).await.unwrap();
    let events = [
        w.reference.send_text(&ref_room(), "exported by the reference #0").await.unwrap(),
        w.reference.send_text(&ref_room(), "exported by the reference #1").await.unwrap(),
    ];

    let keys = w.reference.machine.store().export_room_keys(|_| true).await.unwrap();
    assert_eq!(keys.len(), 1);
    let file = encrypt_room_key_export(&keys, "interop passphrase", 10_000).unwrap();

    // A fresh newt device imports it.
    let fresh = dev(&w.router, ALICE, "NEWTFRESH").await;
    assert!(fresh.decrypt(&room(), &events[0]).await.is_err(), "no key yet");
    let summary = fresh
        .machine
        .import_room_keys(&file, "interop passphrase", &newt::ImportOptions::default(), None)
        .await
        .unwrap();
    assert_eq!((summary.total, summary.imported, summary.skipped), (1, 1, 0));
    for (i, e) in events.iter().enumerate() {
        let decrypted = fresh.decrypt(&room(), e).await.unwrap();
        assert_eq!(decrypted.content["body"], format!("exported by the reference #{i}"));
        assert_eq!(decrypted.session_id, keys[0].session_id);
        assert_eq!(
            decrypted.trust,
            SenderTrust::Unauthenticated,
            "imported keys prove nothing about the sender"
        );
    }
}

// ---------------------------------------------------------------------------
// Extras: fallback keys and withheld notices, both directions.
// ---------------------------------------------------------------------------

/// Claims `user`/`device`'s one-time keys (as some other client would)
/// until the server hands out the fallback key; returns how many one-time
/// keys were drained and the fallback key's ID.
fn drain_one_time_keys(router: &Router, user: &str, device: &str) -> (usize, String) {
    let claim = json!({"one_time_keys": {user: {device: "signed_curve25519"}}});
    for drained in 0..1000 {
        let r = router.handle("@drain:localhost", "DRAIN", "POST", "/keys/claim", &claim).unwrap();
        let keys = r["one_time_keys"][user][device].as_object().expect("a key");
        let (id, key) = keys.iter().next().unwrap();
        if key["fallback"] == true {
            return (drained, id.clone());
        }
    }
    panic!("no fallback key");
}

#[tokio::test]
async fn fallback_key_reference_claims_newt() {
    let w = world().await;
    let (drained, fallback_id) = drain_one_time_keys(&w.router, ALICE, NEWT_DEV);
    assert!(drained > 0, "newt uploaded one-time keys");
    // The reference gets newt's fallback key: the only key left.
    assert!(w.reference.establish_sessions(&[ref_alice()]).await.unwrap());
    let content = json!({"via": "fallback key"});
    w.reference
        .send_custom_to_device(&ref_alice(), NEWT_DEV, "org.example.fallback", &content)
        .await
        .unwrap();
    newt_learns_bob(&w).await;
    let outcome = w.newt.sync().await.unwrap();
    assert_eq!(outcome.to_device.len(), 1);
    assert_eq!(outcome.to_device[0].outcome, ToDeviceOutcome::ForApp, "{:?}", outcome.to_device[0]);
    assert_eq!(outcome.to_device[0].content, content);
    // newt refilled its one-time keys: the next claim gets one of those, and
    // once they are gone, a fallback key again.
    // Its used fallback key was replaced by a new one.
    let (refilled, new_fallback_id) = drain_one_time_keys(&w.router, ALICE, NEWT_DEV);
    assert!(refilled > 0);
    assert_ne!(new_fallback_id, fallback_id, "newt rotated its used fallback key");
}

#[tokio::test]
async fn fallback_key_newt_claims_reference() {
    let w = world().await;
    // matrix-sdk-crypto creates its fallback key only once a sync shows the
    // server supports them (`device_unused_fallback_key_types` present).
    assert_eq!(w.reference.sync().await.unwrap().requests_sent, 1, "the fallback key upload");
    let (drained, _) = drain_one_time_keys(&w.router, BOB, REF_DEV);
    assert!(drained > 0, "the reference uploaded one-time keys");
    let n =
        w.newt.share_room_key(&room(), &[alice(), bob()], &RoomSettings::default()).await.unwrap();
    assert_eq!(n, 1);
    let outcome = w.reference.sync().await.unwrap();
    assert_eq!(outcome.undecryptable(), 0, "{:?}", outcome.to_device);
    assert_eq!(outcome.room_keys.len(), 1);
    let event = w.newt.send_text(&room(), "sent after a fallback-key session").await.unwrap();
    let d = w.reference.decrypt(&ref_room(), &event).await.unwrap();
    assert_eq!(d.event["content"]["body"], "sent after a fallback-key session");
}

#[tokio::test]
async fn withheld_reference_blacklists_newt() {
    use newt_interop::matrix_sdk_crypto::LocalTrust as RefTrust;
    let w = world().await;
    w.reference.establish_sessions(&[ref_alice()]).await.unwrap();
    let device =
        w.reference.machine.get_device(&ref_alice(), NEWT_DEV.into(), None).await.unwrap().unwrap();
    device.set_local_trust(RefTrust::BlackListed).await.unwrap();
    w.reference.share_room_key(&ref_room(), &[ref_alice()]).await.unwrap();
    let event = w.reference.send_text(&ref_room(), "not for newt").await.unwrap();
    let session_id = event["content"]["session_id"].as_str().unwrap().to_owned();

    newt_learns_bob(&w).await;
    let outcome = w.newt.sync().await.unwrap();
    assert_eq!(outcome.to_device.len(), 1, "{:?}", outcome.to_device);
    assert_eq!(outcome.to_device[0].event_type, "m.room_key.withheld");
    assert_eq!(outcome.to_device[0].outcome, ToDeviceOutcome::WithheldStored);
    match w.newt.machine.decrypt_room_event(&room(), &event).await {
        Err(newt::Error::Megolm(newt::MegolmError::MissingSession {
            session_id: s,
            withheld: Some(withheld),
            ..
        })) => {
            assert_eq!(s, session_id);
            assert_eq!(withheld.code, "m.blacklisted");
            assert_eq!(withheld.sender, bob());
        }
        other => panic!("expected a withheld missing session, got {other:?}"),
    }
}

#[tokio::test]
async fn withheld_newt_blacklists_reference() {
    use newt_interop::matrix_sdk_crypto::MegolmError as RefMegolmError;
    let w = world().await;
    newt_learns_bob(&w).await;
    w.newt
        .machine
        .set_local_trust(
            &bob(),
            &newt::DeviceId::parse(REF_DEV).unwrap(),
            newt::LocalTrust::Blacklisted,
        )
        .await
        .unwrap();
    let n =
        w.newt.share_room_key(&room(), &[alice(), bob()], &RoomSettings::default()).await.unwrap();
    assert_eq!(n, 1, "only the withheld notice goes out");
    let event = w.newt.send_text(&room(), "not for the reference").await.unwrap();
    let outcome = w.reference.sync().await.unwrap();
    assert!(outcome.room_keys.is_empty());
    let err = w.reference.decrypt(&ref_room(), &event).await.unwrap_err();
    match err.downcast_ref::<RefMegolmError>() {
        Some(RefMegolmError::MissingRoomKey(Some(code))) => {
            assert_eq!(code.as_str(), "m.blacklisted")
        }
        other => panic!("expected MissingRoomKey(m.blacklisted), got {other:?} ({err})"),
    }
}
