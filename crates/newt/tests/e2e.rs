//! End-to-end behaviour of the driver, and the security rules, through the
//! in-process router. Malicious inputs come from a `RawDevice`: an attacker
//! built from newt-proto primitives that can Olm-encrypt anything.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use newt_test_support::*;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use newt::{
    DecryptionFailure, Error, ExportError, ImportOptions, LocalTrust, ManualClock, MegolmError,
    RoomId, RoomSettings, RotationSettings, SenderTrust, SharingPolicy, ToDeviceError,
    ToDeviceOutcome, DEFAULT_MAX_ROUNDS,
};
use newt_proto::account::{OwnAccount, FALLBACK_KEY_GRACE_MS};
use newt_proto::ids::{DeviceId, RoomId as ProtoRoomId};
use newt_proto::key_requests::KeyShareError;
use newt_proto::olm::{OlmError, OlmSession};
use newt_proto::records::DeviceRecord;
use newt_router::Router;
use newt_store::{MemoryStore, Store};
use serde_json::{json, Value};

fn room() -> RoomId {
    RoomId::parse("!room:hs").unwrap()
}

#[tokio::test]
async fn messages_flow_and_late_device_gets_only_new_keys() {
    let router = Arc::new(Router::new());
    let (a1, a2, b1) = (
        dev(&router, "@alice:hs", "A1").await,
        dev(&router, "@alice:hs", "A2").await,
        dev(&router, "@bob:hs", "B1").await,
    );
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a1, &a2, &b1], &users).await;
    a1.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    for d in [&a2, &b1] {
        let out = d.sync().await.unwrap();
        assert!(
            out.to_device.iter().any(|t| matches!(t.outcome, ToDeviceOutcome::RoomKeyStored(..))),
            "{out:?}"
        );
    }
    let first = a1.send_text(&room(), "one").await.unwrap();
    for d in [&a1, &a2, &b1] {
        assert_eq!(d.decrypt(&room(), &first).await.unwrap().content["body"], "one");
    }
    // Alice's own device sees her message as from a verified (own) device;
    // Bob knows Alice's device but has not verified it.
    assert_eq!(a1.decrypt(&room(), &first).await.unwrap().trust, SenderTrust::Verified);
    assert_eq!(b1.decrypt(&room(), &first).await.unwrap().trust, SenderTrust::Unverified);

    let b2 = dev(&router, "@bob:hs", "B2").await;
    a1.sync().await.unwrap();
    // Same session (no one left): B2 gets the key at the current index only.
    a1.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    b2.sync().await.unwrap();
    let second = a1.send_text(&room(), "two").await.unwrap();
    assert_eq!(b2.decrypt(&room(), &second).await.unwrap().content["body"], "two");
    match b2.decrypt(&room(), &first).await {
        Err(SimError::Newt(Error::Megolm(MegolmError::UnknownIndex {
            index: 0,
            first_known: 1,
        }))) => {}
        other => panic!("B2 must not read the message from before it joined: {other:?}"),
    }
}

/// Enough devices that claiming sessions and encrypting the room key run on
/// several threads (`newt_proto::parallel`, four whatever the machine's
/// cores): every device still gets its own key, and the advanced Olm
/// sessions are stored (a second share over the same sessions works).
#[tokio::test]
async fn a_room_key_reaches_forty_devices_twice() {
    newt::set_max_threads(4);
    let router = Arc::new(Router::new());
    let alice = dev(&router, "@alice:hs", "A1").await;
    let mut bobs = Vec::new();
    for i in 0..40 {
        bobs.push(dev(&router, "@bob:hs", &format!("B{i}")).await);
    }
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&alice], &users).await;
    let room2 = RoomId::parse("!second:hs").unwrap();
    for (room, body) in [(room(), "first"), (room2, "second")] {
        let requests = alice.share_room_key(&room, &users, &RoomSettings::default()).await.unwrap();
        assert!(requests >= 1);
        let event = alice.send_text(&room, body).await.unwrap();
        for b in &bobs {
            let out = b.sync().await.unwrap();
            let stored = out
                .to_device
                .iter()
                .filter(|t| matches!(t.outcome, ToDeviceOutcome::RoomKeyStored(..)))
                .count();
            assert_eq!(stored, 1, "{}: {out:?}", b.device);
            assert_eq!(b.decrypt(&room, &event).await.unwrap().content["body"], body);
        }
    }
}

#[tokio::test]
async fn rotation_by_count_and_when_a_member_leaves() {
    let router = Arc::new(Router::new());
    let (a, b, c) = (
        dev(&router, "@alice:hs", "A").await,
        dev(&router, "@bob:hs", "B").await,
        dev(&router, "@carol:hs", "C").await,
    );
    let all = [uid("@alice:hs"), uid("@bob:hs"), uid("@carol:hs")];
    settle(&[&a, &b, &c], &all).await;
    let settings = RoomSettings {
        rotation: RotationSettings { rotation_period_msgs: 2, ..Default::default() },
        ..Default::default()
    };
    a.share_room_key(&room(), &all, &settings).await.unwrap();
    let e1 = a.send_text(&room(), "1").await.unwrap();
    let e2 = a.send_text(&room(), "2").await.unwrap();
    assert_eq!(e1["content"]["session_id"], e2["content"]["session_id"]);
    // Worn out after two messages: encrypting needs a new share.
    assert!(matches!(
        a.send_text(&room(), "3").await,
        Err(SimError::Newt(Error::NoOutboundSession(_)))
    ));
    a.share_room_key(&room(), &all, &settings).await.unwrap();
    let e3 = a.send_text(&room(), "3").await.unwrap();
    assert_ne!(e3["content"]["session_id"], e2["content"]["session_id"]);
    // Carol leaves: the next share rotates, and she cannot read what follows.
    let remaining = [uid("@alice:hs"), uid("@bob:hs")];
    a.share_room_key(&room(), &remaining, &settings).await.unwrap();
    let e4 = a.send_text(&room(), "4").await.unwrap();
    assert_ne!(e4["content"]["session_id"], e3["content"]["session_id"]);
    b.sync().await.unwrap();
    c.sync().await.unwrap();
    assert_eq!(b.decrypt(&room(), &e4).await.unwrap().content["body"], "4");
    assert!(matches!(
        c.decrypt(&room(), &e4).await,
        Err(SimError::Newt(Error::Megolm(MegolmError::MissingSession { .. })))
    ));
    assert_eq!(c.decrypt(&room(), &e3).await.unwrap().content["body"], "3");
}

#[tokio::test]
async fn blacklisted_device_gets_withheld_and_learns_why() {
    let router = Arc::new(Router::new());
    let (a, b) = (dev(&router, "@alice:hs", "A").await, dev(&router, "@bob:hs", "B").await);
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    a.machine
        .set_local_trust(&uid("@bob:hs"), &DeviceId::parse("B").unwrap(), LocalTrust::Blacklisted)
        .await
        .unwrap();
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    let out = b.sync().await.unwrap();
    assert!(out.to_device.iter().any(|t| t.outcome == ToDeviceOutcome::WithheldStored));
    let e = a.send_text(&room(), "secret").await.unwrap();
    match b.decrypt(&room(), &e).await {
        Err(SimError::Newt(Error::Megolm(MegolmError::MissingSession {
            withheld: Some(w),
            ..
        }))) => {
            assert_eq!(w.code, "m.blacklisted");
            assert_eq!(w.sender.as_str(), "@alice:hs");
        }
        other => panic!("expected a withheld explanation, got {other:?}"),
    }
    // With the AllDevices policy on a fresh session, Bob does get the key.
    a.machine.discard_room_key(&room()).await.unwrap();
    a.share_room_key(
        &room(),
        &users,
        &RoomSettings { policy: SharingPolicy::AllDevices, ..Default::default() },
    )
    .await
    .unwrap();
    b.sync().await.unwrap();
    let e = a.send_text(&room(), "now you can").await.unwrap();
    assert_eq!(b.decrypt(&room(), &e).await.unwrap().content["body"], "now you can");
}

#[tokio::test]
async fn device_without_keys_gets_no_olm_and_is_not_claimed_again() {
    let router = Arc::new(Router::new());
    let a = dev(&router, "@alice:hs", "A").await;
    // A device that uploaded device keys but no one-time or fallback keys.
    let mut bare = OwnAccount::new(uid("@bob:hs"), DeviceId::parse("BARE").unwrap());
    router
        .handle(
            "@bob:hs",
            "BARE",
            "POST",
            "/keys/upload",
            &json!({"device_keys": bare.device_keys()}),
        )
        .unwrap();
    let _ = &mut bare;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a], &users).await;
    let claim = a
        .machine
        .get_missing_sessions(users.iter().cloned())
        .await
        .unwrap()
        .expect("a claim for BARE");
    let (m, p) = claim.kind.method_and_path();
    let resp = router.handle("@alice:hs", "A", m, &p, claim.kind.body()).unwrap();
    a.machine.mark_request_sent(&claim.id, &resp).await.unwrap();
    // The failure is remembered: no claim on the next send.
    assert!(a.machine.get_missing_sessions(users.iter().cloned()).await.unwrap().is_none());
    let reqs = a
        .machine
        .share_room_key(&room(), users.iter().cloned(), &RoomSettings::default())
        .await
        .unwrap();
    let withheld: Vec<_> = reqs.iter().filter(|r| matches!(&r.kind, newt::RequestKind::ToDevice { event_type, .. } if event_type == "m.room_key.withheld")).collect();
    assert_eq!(withheld.len(), 1);
    assert_eq!(withheld[0].kind.body()["messages"]["@bob:hs"]["BARE"]["code"], "m.no_olm");
}

/// Alice (A) and Bob (B) tracking each other; Bob holds Alice's room key.
async fn alice_shared_with_bob() -> (Arc<Router>, SimDevice, SimDevice) {
    let router = Arc::new(Router::new());
    let (a, b) = (dev(&router, "@alice:hs", "A").await, dev(&router, "@bob:hs", "B").await);
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    b.sync().await.unwrap();
    (router, a, b)
}

#[tokio::test]
async fn replayed_megolm_event_is_rejected() {
    let (_router, a, b) = alice_shared_with_bob().await;
    let e = a.send_text(&room(), "pay Bob 10").await.unwrap();
    assert_eq!(b.decrypt(&room(), &e).await.unwrap().content["body"], "pay Bob 10");
    // Decrypting the same event again is normal.
    assert!(b.decrypt(&room(), &e).await.is_ok());
    let mut replay = e.clone();
    replay["event_id"] = json!("$replayed");
    assert!(matches!(
        b.decrypt(&room(), &replay).await,
        Err(SimError::Newt(Error::Megolm(MegolmError::Replay { index: 0 })))
    ));
}

#[tokio::test]
async fn room_key_without_olm_is_rejected() {
    let router = Arc::new(Router::new());
    let (a, b) = (dev(&router, "@alice:hs", "A").await, dev(&router, "@bob:hs", "B").await);
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    // Alice's real key content, sent in the clear by the server or anyone.
    let outbound = newt_proto::megolm::OutboundSession::new(
        ProtoRoomId::parse("!room:hs").unwrap(),
        Default::default(),
        0,
    );
    let content = outbound.room_key_content(false);
    for t in ["m.room_key", "m.forwarded_room_key", "m.secret.send"] {
        router
            .handle(
                "@alice:hs",
                "A",
                "PUT",
                &format!("/sendToDevice/{t}/1"),
                &json!({"messages": {"@bob:hs": {"B": content}}}),
            )
            .unwrap();
    }
    let out = b.sync().await.unwrap();
    assert_eq!(out.to_device.len(), 3);
    for t in &out.to_device {
        assert!(matches!(rejected(&t.outcome), ToDeviceError::NotOverOlm(_)), "{t:?}");
    }
    assert!(b
        .machine
        .decrypt_room_event(
            &room(),
            &json!({
                "event_id": "$x", "sender": "@alice:hs", "origin_server_ts": 1,
                "content": outbound.clone_for_test_encrypt(),
            })
        )
        .await
        .is_err());
}

trait CloneForTest {
    fn clone_for_test_encrypt(&self) -> Value;
}

impl CloneForTest for newt_proto::megolm::OutboundSession {
    fn clone_for_test_encrypt(&self) -> Value {
        json!({"algorithm": "m.megolm.v1.aes-sha2", "session_id": self.session_id(), "ciphertext": "AwgAEhA"})
    }
}

/// Sets up Alice's device A (the victim), with an outstanding key request
/// for a session of Bob's, and returns (router, A, Bob's event, Bob's session key content).
async fn forwarding_setup() -> (Arc<Router>, SimDevice, SimDevice, Value) {
    let router = Arc::new(Router::new());
    let (a, b) = (dev(&router, "@alice:hs", "A").await, dev(&router, "@bob:hs", "B").await);
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    // Bob sends to a room key Alice never got.
    let b_only = [uid("@bob:hs")];
    b.share_room_key(&room(), &b_only, &RoomSettings::default()).await.unwrap();
    let e = b.send_text(&room(), "for Alice's eyes, via a forward").await.unwrap();
    (router, a, b, e)
}

fn forwarded_content(b_export: &newt_proto::export::ExportedRoomKey) -> Value {
    json!({
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": b_export.room_id,
        "session_id": b_export.session_id,
        "session_key": b_export.session_key,
        "sender_key": b_export.sender_key,
        "sender_claimed_ed25519_key": b_export.sender_claimed_keys.get("ed25519").cloned().unwrap_or_default(),
        "forwarding_curve25519_key_chain": [],
    })
}

async fn bob_key(b: &SimDevice) -> newt_proto::export::ExportedRoomKey {
    let file = b.machine.export_room_keys("pw", 1, None).await.unwrap();
    newt_proto::export::decrypt_export(&file, "pw").unwrap().remove(0)
}

#[tokio::test]
async fn forwarded_key_rules() {
    let (router, a, b, e) = forwarding_setup().await;
    let key = bob_key(&b).await;
    let a_rec = own_record(&a).await;
    // Alice's other device, which Alice verified.
    let a2 = RawDevice::new(&router, "@alice:hs", "A2");
    a.sync().await.unwrap();
    a.machine.update_tracked_users([uid("@alice:hs")]).await.unwrap();
    a.flush().await.unwrap();
    a.machine
        .set_local_trust(&uid("@alice:hs"), &DeviceId::parse("A2").unwrap(), LocalTrust::Verified)
        .await
        .unwrap();

    // 1. Unrequested: rejected.
    a2.send_olm(&a, &a_rec, "m.forwarded_room_key", forwarded_content(&key));
    let out = a.sync().await.unwrap();
    assert_eq!(
        rejected(&out.to_device[0].outcome),
        &ToDeviceError::KeyShare(KeyShareError::Unrequested)
    );
    assert!(a.decrypt(&room(), &e).await.is_err());

    // Alice asks for the key.
    a.machine.request_room_key(&room(), &e).await.unwrap();
    let first = a.machine.outgoing_requests().await.unwrap();
    assert_eq!(first.len(), 1);
    // Handed out but not reported sent: in flight, not repeated.
    assert!(a.machine.outgoing_requests().await.unwrap().is_empty());
    a.send(&first[0]).await.unwrap();
    assert_eq!(a.flush().await.unwrap(), 0);

    // 2. From another user's device (Mallory), even though requested: rejected.
    let mallory = RawDevice::new(&router, "@mallory:hs", "M");
    mallory.send_olm(&a, &a_rec, "m.forwarded_room_key", forwarded_content(&key));
    let out = a.sync().await.unwrap();
    assert_eq!(out.to_device[0].event_type, "m.room_key_request");
    assert_eq!(out.to_device[0].outcome, ToDeviceOutcome::Handled, "our own request, echoed");
    assert!(
        matches!(
            rejected(&out.to_device[1].outcome),
            ToDeviceError::KeyShare(KeyShareError::NotOwnUser(_))
        ),
        "{out:?}"
    );

    // 3. From our own but unverified device: rejected.
    let a3 = RawDevice::new(&router, "@alice:hs", "A3");
    a.sync().await.unwrap();
    a.flush().await.unwrap();
    assert!(a
        .machine
        .devices(&uid("@alice:hs"))
        .await
        .unwrap()
        .iter()
        .any(|d| d.device_id.as_str() == "A3"));
    a3.send_olm(&a, &a_rec, "m.forwarded_room_key", forwarded_content(&key));
    let out = a.sync().await.unwrap();
    assert_eq!(
        rejected(&out.to_device[0].outcome),
        &ToDeviceError::KeyShare(KeyShareError::UntrustedDevice)
    );
    assert!(a.decrypt(&room(), &e).await.is_err());

    // 4. Requested, from our verified device: accepted, and the request is cancelled.
    a2.send_olm(&a, &a_rec, "m.forwarded_room_key", forwarded_content(&key));
    let out = a.sync().await.unwrap();
    assert!(matches!(out.to_device[0].outcome, ToDeviceOutcome::RoomKeyStored(..)), "{out:?}");
    let d = a.decrypt(&room(), &e).await.unwrap();
    assert_eq!(d.content["body"], "for Alice's eyes, via a forward");
    assert_eq!(d.trust, SenderTrust::Unauthenticated);
}

/// A plain `m.room_key_request` from `from` to `to` for the session of `event`.
fn send_key_request(
    router: &Router,
    from: (&str, &str),
    to: (&str, &str),
    request_id: &str,
    event: &Value,
) {
    let content = json!({"action": "request", "requesting_device_id": from.1, "request_id": request_id,
        "body": {"algorithm": "m.megolm.v1.aes-sha2", "room_id": "!room:hs",
                 "session_id": event["content"]["session_id"]}});
    let body = json!({"messages": {to.0: {to.1: content}}});
    router.handle(from.0, from.1, "PUT", "/sendToDevice/m.room_key_request/1", &body).unwrap();
}

#[tokio::test]
async fn key_requests_answered_only_for_verified_own_devices() {
    let router = Arc::new(Router::new());
    let (a1, a2, b) = (
        dev(&router, "@alice:hs", "A1").await,
        dev(&router, "@alice:hs", "A2").await,
        dev(&router, "@bob:hs", "B").await,
    );
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a1, &a2, &b], &users).await;
    // Only A1 gets the key (Bob shares before A2 is... simulate by blacklisting A2 at Bob).
    b.machine
        .set_local_trust(
            &uid("@alice:hs"),
            &DeviceId::parse("A2").unwrap(),
            LocalTrust::Blacklisted,
        )
        .await
        .unwrap();
    b.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    a1.sync().await.unwrap();
    a2.sync().await.unwrap();
    let e = b.send_text(&room(), "hello alice").await.unwrap();
    assert!(a2.decrypt(&room(), &e).await.is_err());
    // A1 needs an Olm session to A2 to answer; A1 shares its own room key with A2 for that.
    a1.share_room_key(
        &RoomId::parse("!other:hs").unwrap(),
        &[uid("@alice:hs")],
        &RoomSettings::default(),
    )
    .await
    .unwrap();
    a2.sync().await.unwrap();

    // A2 asks; A1 has not verified A2: refused.
    a2.machine.request_room_key(&room(), &e).await.unwrap();
    a2.flush().await.unwrap();
    let out = a1.sync().await.unwrap();
    let req = out.to_device.iter().find(|t| t.event_type == "m.room_key_request").unwrap();
    assert_eq!(rejected(&req.outcome), &ToDeviceError::KeyShare(KeyShareError::UntrustedDevice));

    // Bob asks A1 for the same key: refused (not our user).
    send_key_request(&router, ("@bob:hs", "B"), ("@alice:hs", "A1"), "r1", &e);
    let out = a1.sync().await.unwrap();
    assert!(matches!(
        rejected(&out.to_device[0].outcome),
        ToDeviceError::KeyShare(KeyShareError::NotOwnUser(_))
    ));

    // After A1 verifies A2, A2's retry is answered and A2 decrypts.
    a1.machine
        .set_local_trust(&uid("@alice:hs"), &DeviceId::parse("A2").unwrap(), LocalTrust::Verified)
        .await
        .unwrap();
    a2.machine
        .set_local_trust(&uid("@alice:hs"), &DeviceId::parse("A1").unwrap(), LocalTrust::Verified)
        .await
        .unwrap();
    send_key_request(&router, ("@alice:hs", "A2"), ("@alice:hs", "A1"), "again", &e);
    let out = a1.sync().await.unwrap();
    assert_eq!(out.to_device[0].outcome, ToDeviceOutcome::KeyRequestAnswered);
    let out = a2.sync().await.unwrap();
    assert!(
        out.to_device.iter().any(|t| matches!(t.outcome, ToDeviceOutcome::RoomKeyStored(..))),
        "{out:?}"
    );
    assert_eq!(a2.decrypt(&room(), &e).await.unwrap().content["body"], "hello alice");
}

/// Alice's A1 holds a room key (`event` is encrypted with it); her new
/// device `name` appears, A1 and it trust each other locally, and neither
/// has an Olm session with the other (A1 never claims one itself).
async fn new_device_without_olm(router: &Arc<Router>, a1: &SimDevice, name: &str) -> SimDevice {
    let alice = [uid("@alice:hs")];
    let new = dev(router, "@alice:hs", name).await;
    settle(&[a1, &new], &alice).await;
    for (d, other) in [(a1, name), (&new, "A1")] {
        d.machine.set_local_trust(&alice[0], &did(other), LocalTrust::Verified).await.unwrap();
    }
    new
}

/// A1 with a room key and a message under it, before any other device.
async fn a1_with_a_key(router: &Arc<Router>) -> (SimDevice, Value) {
    let a1 = dev(router, "@alice:hs", "A1").await;
    let alice = [uid("@alice:hs")];
    settle(&[&a1], &alice).await;
    a1.share_room_key(&room(), &alice, &RoomSettings::default()).await.unwrap();
    let e = a1.send_text(&room(), "before the new device").await.unwrap();
    (a1, e)
}

/// `asker` asks for the key of `event`; `a1` takes the sync (without
/// sending anything) and its outcome for the request is returned with the
/// request's content.
async fn ask_a1(a1: &SimDevice, asker: &SimDevice, event: &Value) -> (ToDeviceOutcome, Value) {
    assert!(asker.decrypt(&room(), event).await.is_err());
    asker.machine.request_room_key(&room(), event).await.unwrap();
    asker.flush().await.unwrap();
    let out = a1.machine.receive_sync(a1.next_sync().unwrap()).await.unwrap();
    let req = out.to_device.iter().find(|t| t.event_type == "m.room_key_request").unwrap();
    (req.outcome.clone(), req.content.clone())
}

fn claims(requests: &[newt::OutgoingRequest]) -> Vec<&Value> {
    requests
        .iter()
        .filter_map(|r| match &r.kind {
            newt::RequestKind::KeysClaim { body } => Some(body),
            _ => None,
        })
        .collect()
}

fn to_device_to<'r>(requests: &'r [newt::OutgoingRequest], device: &str) -> Vec<&'r Value> {
    requests
        .iter()
        .filter_map(|r| match &r.kind {
            newt::RequestKind::ToDevice { body, .. } => body["messages"]["@alice:hs"].get(device),
            _ => None,
        })
        .collect()
}

/// Sends `requests` from `d` and reports them.
async fn send_all(d: &SimDevice, requests: &[newt::OutgoingRequest]) {
    for r in requests {
        d.send(r).await.unwrap();
    }
}

/// matrix-sdk-crypto asks once per session: a request from a trusted own
/// device we have no Olm session with waits, newt claims a one-time key of
/// the device by itself and answers over the new session.
#[tokio::test]
async fn key_request_without_olm_session_waits_for_a_claim_and_is_answered() {
    let router = Arc::new(Router::new());
    let (a1, e) = a1_with_a_key(&router).await;
    let a2 = new_device_without_olm(&router, &a1, "A2").await;
    let (outcome, request) = ask_a1(&a1, &a2, &e).await;
    assert_eq!(outcome, ToDeviceOutcome::KeyRequestWaiting);
    // The same request again (a redelivered sync) waits once.
    send_to_a1(&router, "A2", &request);
    let out = a1.machine.receive_sync(a1.next_sync().unwrap()).await.unwrap();
    assert_eq!(out.to_device[0].outcome, ToDeviceOutcome::KeyRequestWaiting);

    // outgoing_requests: a claim of A2's one-time key, nothing for A2 yet.
    let requests = a1.machine.outgoing_requests().await.unwrap();
    let claim = claims(&requests);
    assert_eq!(claim.len(), 1, "{requests:?}");
    assert!(claim[0]["one_time_keys"]["@alice:hs"].get("A2").is_some());
    assert!(to_device_to(&requests, "A2").is_empty());
    // In flight: not claimed twice.
    assert!(claims(&a1.machine.outgoing_requests().await.unwrap()).is_empty());
    send_all(&a1, &requests).await;

    // The claim's answer made the session: one answer, then nothing more.
    let requests = a1.machine.outgoing_requests().await.unwrap();
    assert_eq!(to_device_to(&requests, "A2").len(), 1, "{requests:?}");
    send_all(&a1, &requests).await;
    assert_eq!(a1.flush().await.unwrap(), 0);

    let out = a2.sync().await.unwrap();
    assert!(
        out.to_device.iter().any(|t| t.event_type == "m.forwarded_room_key"
            && matches!(t.outcome, ToDeviceOutcome::RoomKeyStored(..))),
        "{out:?}"
    );
    assert_eq!(a2.decrypt(&room(), &e).await.unwrap().content["body"], "before the new device");
}

/// A plaintext `m.room_key_request` content from Alice's `from` to A1.
fn send_to_a1(router: &Router, from: &str, content: &Value) {
    let body = json!({"messages": {"@alice:hs": {"A1": content}}});
    router.handle("@alice:hs", from, "PUT", "/sendToDevice/m.room_key_request/t", &body).unwrap();
}

/// A device blacklisted after it asked gets nothing: not when the claim
/// it waited for completes, and no claim at all when it is blacklisted
/// before the claim goes out.
#[tokio::test]
async fn waiting_key_request_of_a_device_blacklisted_meanwhile_is_not_answered() {
    let router = Arc::new(Router::new());
    let (a1, e) = a1_with_a_key(&router).await;
    let alice = uid("@alice:hs");

    // Blacklisted while the claim is in flight: the session is made, no answer.
    let a2 = new_device_without_olm(&router, &a1, "A2").await;
    assert_eq!(ask_a1(&a1, &a2, &e).await.0, ToDeviceOutcome::KeyRequestWaiting);
    let requests = a1.machine.outgoing_requests().await.unwrap();
    assert_eq!(claims(&requests).len(), 1, "{requests:?}");
    a1.machine.set_local_trust(&alice, &did("A2"), LocalTrust::Blacklisted).await.unwrap();
    send_all(&a1, &requests).await;
    let requests = a1.machine.outgoing_requests().await.unwrap();
    assert!(to_device_to(&requests, "A2").is_empty(), "{requests:?}");
    send_all(&a1, &requests).await;
    // Trusted again: the dropped request stays dropped.
    a1.machine.set_local_trust(&alice, &did("A2"), LocalTrust::Verified).await.unwrap();
    assert_eq!(a1.flush().await.unwrap(), 0);
    let out = a2.sync().await.unwrap();
    assert!(!out.to_device.iter().any(|t| t.event_type == "m.forwarded_room_key"), "{out:?}");
    assert!(a2.decrypt(&room(), &e).await.is_err());

    // Blacklisted before A1 sends anything: no claim of its one-time key.
    let a3 = new_device_without_olm(&router, &a1, "A3").await;
    assert_eq!(ask_a1(&a1, &a3, &e).await.0, ToDeviceOutcome::KeyRequestWaiting);
    a1.machine.set_local_trust(&alice, &did("A3"), LocalTrust::Blacklisted).await.unwrap();
    let requests = a1.machine.outgoing_requests().await.unwrap();
    assert!(claims(&requests).is_empty(), "{requests:?}");
    send_all(&a1, &requests).await;
    a1.machine.set_local_trust(&alice, &did("A3"), LocalTrust::Verified).await.unwrap();
    assert_eq!(a1.flush().await.unwrap(), 0);
    let out = a3.sync().await.unwrap();
    assert!(!out.to_device.iter().any(|t| t.event_type == "m.forwarded_room_key"), "{out:?}");
    assert!(a3.decrypt(&room(), &e).await.is_err());
}

/// The requester's cancellation removes its waiting request (another
/// request ID does not); and a request whose device meanwhile made a
/// session with us (a pre-key message) is answered without a claim.
#[tokio::test]
async fn waiting_key_request_is_cancelled_or_answered_over_a_session_the_requester_made() {
    let router = Arc::new(Router::new());
    let (a1, e) = a1_with_a_key(&router).await;
    let a2 = new_device_without_olm(&router, &a1, "A2").await;
    let (outcome, request) = ask_a1(&a1, &a2, &e).await;
    assert_eq!(outcome, ToDeviceOutcome::KeyRequestWaiting);
    let cancel = |id: &Value| json!({"action": "request_cancellation", "requesting_device_id": "A2", "request_id": id});
    send_to_a1(&router, "A2", &cancel(&json!("another request")));
    send_to_a1(&router, "A2", &cancel(&request["request_id"]));
    let out = a1.machine.receive_sync(a1.next_sync().unwrap()).await.unwrap();
    assert_eq!(out.to_device.len(), 2);
    assert!(out.to_device.iter().all(|t| t.outcome == ToDeviceOutcome::Handled), "{out:?}");
    let requests = a1.machine.outgoing_requests().await.unwrap();
    assert!(claims(&requests).is_empty(), "{requests:?}");
    send_all(&a1, &requests).await;
    // Even with a session to A2 made now, the cancelled request is not answered.
    let claim = a1.machine.get_missing_sessions([uid("@alice:hs")]).await.unwrap().unwrap();
    a1.send(&claim).await.unwrap();
    assert_eq!(a1.flush().await.unwrap(), 0);

    // Asked again (a new request ID); then A2 makes the Olm session itself
    // (it shares a room key with A1): answered over it, nothing claimed.
    let a3 = new_device_without_olm(&router, &a1, "A3").await;
    assert_eq!(ask_a1(&a1, &a3, &e).await.0, ToDeviceOutcome::KeyRequestWaiting);
    let other_room = RoomId::parse("!other:hs").unwrap();
    a3.share_room_key(&other_room, &[uid("@alice:hs")], &RoomSettings::default()).await.unwrap();
    let out = a1.machine.receive_sync(a1.next_sync().unwrap()).await.unwrap();
    assert!(
        out.to_device.iter().any(|t| matches!(t.outcome, ToDeviceOutcome::RoomKeyStored(..))),
        "{out:?}"
    );
    let requests = a1.machine.outgoing_requests().await.unwrap();
    assert!(claims(&requests).is_empty(), "{requests:?}");
    assert_eq!(to_device_to(&requests, "A3").len(), 1, "{requests:?}");
    send_all(&a1, &requests).await;
    a3.sync().await.unwrap();
    assert_eq!(a3.decrypt(&room(), &e).await.unwrap().content["body"], "before the new device");
    // A2's request stayed cancelled.
    let out = a2.sync().await.unwrap();
    assert!(!out.to_device.iter().any(|t| t.event_type == "m.forwarded_room_key"), "{out:?}");
}

#[tokio::test]
async fn olm_plaintext_forgeries_rejected_end_to_end() {
    let router = Arc::new(Router::new());
    let b = dev(&router, "@bob:hs", "B").await;
    let b_rec = own_record(&b).await;
    let mallory = RawDevice::new(&router, "@mallory:hs", "M");
    b.machine.update_tracked_users([uid("@mallory:hs")]).await.unwrap();
    b.flush().await.unwrap();
    // Mallory's ciphertext claims to be from Alice in the plaintext.
    let mut forged_record = b_rec.clone();
    forged_record.user_id = uid("@carol:hs"); // recipient = Carol, not Bob
    mallory.send_olm_as(&b, &b_rec, &forged_record, "m.room_key", json!({}));
    let out = b.sync().await.unwrap();
    assert!(matches!(rejected(&out.to_device[0].outcome), ToDeviceError::Olm(OlmError::Check(_))));
}

#[tokio::test]
async fn wedged_session_is_replaced_once_per_hour() {
    let router = Arc::new(Router::new());
    let a = dev(&router, "@alice:hs", "A").await;
    let clock = manual_clock();
    let b = timed_dev(&router, "@bob:hs", "B", &clock).await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    b.sync().await.unwrap();
    // Bob replies so both sides have a two-way session (Alice's next messages are type 1).
    b.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    a.sync().await.unwrap();
    a.machine.discard_room_key(&room()).await.unwrap();
    let reqs = a
        .machine
        .share_room_key(&room(), users.iter().cloned(), &RoomSettings::default())
        .await
        .unwrap();
    // Corrupt the Olm message in transit.
    let mut body = reqs[0].kind.body().clone();
    let ct = body["messages"]["@bob:hs"]["B"]["ciphertext"].as_object_mut().unwrap();
    let entry = ct.values_mut().next().unwrap();
    assert_eq!(entry["type"], 1);
    let mut bytes = newt_proto::json::b64_decode(entry["body"].as_str().unwrap()).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    entry["body"] = json!(newt_proto::json::b64_encode(&bytes));
    router.handle("@alice:hs", "A", "PUT", "/sendToDevice/m.room.encrypted/1", &body).unwrap();
    let sync = b.next_sync().unwrap();
    let out = b.machine.receive_sync(sync).await.unwrap();
    assert!(matches!(
        rejected(&out.to_device[0].outcome),
        ToDeviceError::Olm(OlmError::Wedged { .. })
    ));
    // Bob claims a new key for Alice's device even though a session exists, and sends m.dummy.
    let claim =
        b.machine.get_missing_sessions([uid("@alice:hs")]).await.unwrap().expect("unwedging claim");
    let (m, p) = claim.kind.method_and_path();
    let resp = router.handle("@bob:hs", "B", m, &p, claim.kind.body()).unwrap();
    b.machine.mark_request_sent(&claim.id, &resp).await.unwrap();
    b.flush().await.unwrap();
    let out = a.sync().await.unwrap();
    assert!(
        out.to_device.iter().any(|t| t.event_type == "m.dummy"
            && t.encrypted
            && t.outcome == ToDeviceOutcome::Handled),
        "{out:?}"
    );
    // A second failure within the hour does not start yet another session ...
    clock.advance(59 * 60 * 1000);
    router.handle("@alice:hs", "A", "PUT", "/sendToDevice/m.room.encrypted/2", &body).unwrap();
    b.sync().await.unwrap();
    assert!(b.machine.get_missing_sessions([uid("@alice:hs")]).await.unwrap().is_none());
    // ... one after the hour does.
    clock.advance(60 * 1000 + 1);
    router.handle("@alice:hs", "A", "PUT", "/sendToDevice/m.room.encrypted/3", &body).unwrap();
    b.sync().await.unwrap();
    assert!(b.machine.get_missing_sessions([uid("@alice:hs")]).await.unwrap().is_some());
}

/// Bob on `store`, with time from `clock`.
async fn bob_on(
    router: &Arc<Router>,
    store: &Arc<MemoryStore>,
    clock: &Arc<ManualClock>,
) -> SimDevice {
    SimDevice::open_with_clock(router.clone(), "@bob:hs", "B", store.clone(), clock.clone())
        .await
        .unwrap()
}

/// Bob after two senders each claimed his fallback key (his one-time keys
/// used up first) and he rotated it and uploaded the new one; each sender
/// keeps its Olm session on the old key.
struct AfterFallbackRotation {
    router: Arc<Router>,
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    senders: [RawDevice; 2],
    sessions: Vec<OlmSession>,
    b: SimDevice,
    b_rec: DeviceRecord,
}

impl AfterFallbackRotation {
    async fn new(senders: [(&str, &str); 2]) -> Self {
        let router = Arc::new(Router::new());
        let store = Arc::new(MemoryStore::new());
        let clock = manual_clock();
        let senders = senders.map(|(user, device)| RawDevice::new(&router, user, device));
        let b = bob_on(&router, &store, &clock).await;
        b.flush().await.unwrap();
        let b_rec = own_record(&b).await;
        for _ in 0..50 {
            let (_, key) = senders[0].claim_session(&b_rec);
            assert!(key.get("fallback").is_none());
        }
        let claimed: Vec<_> = senders.iter().map(|s| s.claim_session(&b_rec)).collect();
        assert_eq!(claimed[0].1["fallback"], true);
        assert!(claimed.iter().all(|(_, key)| *key == claimed[0].1), "one fallback key");
        // Bob learns the fallback key was used, rotates and uploads the new one.
        b.sync().await.unwrap();
        let stored = store.account().await.unwrap().unwrap();
        assert!(stored.fallback_key_published_at.is_some(), "upload time recorded");
        let sessions = claimed.into_iter().map(|(session, _)| session).collect();
        Self { router, store, clock, senders, sessions, b, b_rec }
    }

    /// Sender `i` writes to Bob on its old-key session; Bob syncs.
    async fn old_key_message(&mut self, i: usize) -> newt::SyncOutcome {
        let (b, b_rec) = (&self.b, &self.b_rec);
        self.senders[i].send_on(&mut self.sessions[i], b, b_rec, b_rec, "m.dummy", json!({}));
        b.sync().await.unwrap()
    }
}

fn no_session_on_the_old_key(out: &newt::SyncOutcome) {
    assert!(
        matches!(
            rejected(&out.to_device[0].outcome),
            ToDeviceError::Olm(OlmError::SessionCreation(_))
        ),
        "{out:?}"
    );
}

/// Bob's previous fallback key is forgotten an hour after its successor was
/// uploaded, and that is committed: a pre-key message made with it decrypts
/// within the hour (in flight) and fails after it, in a machine reopened on
/// the store.
#[tokio::test]
async fn attack_old_fallback_key_is_forgotten_an_hour_after_its_successor_is_uploaded() {
    let mut scene = AfterFallbackRotation::new([("@mallory:hs", "M"), ("@eve:hs", "E")]).await;
    let out = scene.old_key_message(0).await;
    assert_eq!(out.to_device[0].outcome, ToDeviceOutcome::Handled, "{out:?}");

    scene.clock.advance(FALLBACK_KEY_GRACE_MS);
    let generation = scene.store.account().await.unwrap().unwrap().generation;
    // A sync with nothing else in it: forgetting alone must be committed.
    let out = scene.b.sync().await.unwrap();
    assert!(out.to_device.is_empty());
    let stored = scene.store.account().await.unwrap().unwrap();
    assert!(stored.generation > generation, "not committed");

    scene.b = bob_on(&scene.router, &scene.store, &scene.clock).await;
    no_session_on_the_old_key(&scene.old_key_message(1).await);
}

/// A pre-key message made with the old fallback key and waiting for Bob
/// while he was offline past the hour still decrypts in the sync that brings
/// it: the key is forgotten only after that sync's events were decrypted.
#[tokio::test]
async fn old_fallback_key_message_waiting_past_the_hour_still_decrypts() {
    let mut scene = AfterFallbackRotation::new([("@carol:hs", "C"), ("@eve:hs", "E")]).await;
    let (b, b_rec) = (&scene.b, &scene.b_rec);
    scene.senders[0].send_on(&mut scene.sessions[0], b, b_rec, b_rec, "m.dummy", json!({}));
    scene.clock.advance(FALLBACK_KEY_GRACE_MS);
    let out = scene.b.sync().await.unwrap();
    assert_eq!(out.to_device[0].outcome, ToDeviceOutcome::Handled, "{out:?}");

    no_session_on_the_old_key(&scene.old_key_message(1).await);
}

/// Alice shares the room key again, to Bob's new device B2, while another
/// process on the same store (a notification extension encrypting in the
/// room) writes the outbound session `writes` times, each just before one
/// of the share's commits. Returns Alice, B2, the store, the session's
/// generation before, and what the share returned.
async fn share_racing(
    writes: u64,
) -> (SimDevice, SimDevice, Arc<FlakyStore>, u64, Result<Vec<newt::OutgoingRequest>, Error>) {
    let router = Arc::new(Router::new());
    let (a, flaky) = flaky_dev(&router, "@alice:hs", "A").await;
    let b = dev(&router, "@bob:hs", "B1").await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    b.sync().await.unwrap();

    let b2 = dev(&router, "@bob:hs", "B2").await;
    a.sync().await.unwrap();
    a.machine.update_tracked_users(users.iter().cloned()).await.unwrap();
    a.flush().await.unwrap();
    let claim = a.machine.get_missing_sessions(users.iter().cloned()).await.unwrap().unwrap();
    a.send(&claim).await.unwrap();
    let proto_room = ProtoRoomId::parse("!room:hs").unwrap();
    let stored = flaky.inner.outbound_group_session(&proto_room).await.unwrap().unwrap();
    let generation = stored.generation;
    for n in 1..=writes {
        let mut other = flaky.inner.outbound_group_session(&proto_room).await.unwrap().unwrap();
        other.generation = generation + n;
        let write =
            newt_store::Changes { outbound_group_sessions: vec![other], ..Default::default() };
        flaky.race.lock().unwrap().push_back(write);
    }
    let result =
        a.machine.share_room_key(&room(), users.iter().cloned(), &RoomSettings::default()).await;
    assert!(flaky.race.lock().unwrap().is_empty(), "the other process wrote first");
    (a, b2, flaky, generation, result)
}

/// One write of another process between the share's reads and its commit:
/// the commit is refused and the share runs again, instead of failing; the
/// new device gets the key and reads the next message.
#[tokio::test]
async fn a_share_racing_another_process_is_redone_not_refused() {
    let (a, b2, flaky, generation, result) = share_racing(1).await;
    let requests = result.unwrap();
    let proto_room = ProtoRoomId::parse("!room:hs").unwrap();
    let after = flaky.inner.outbound_group_session(&proto_room).await.unwrap().unwrap();
    assert_eq!(after.generation, generation + 2, "the redone share built on the other write");
    for r in &requests {
        a.send(r).await.unwrap();
    }
    let out = b2.sync().await.unwrap();
    assert!(
        out.to_device.iter().any(|t| matches!(t.outcome, ToDeviceOutcome::RoomKeyStored(..))),
        "{out:?}"
    );
    let event = a.send_text(&room(), "after the race").await.unwrap();
    assert_eq!(b2.decrypt(&room(), &event).await.unwrap().content["body"], "after the race");
}

/// Another write before the second attempt too: the share gives up with
/// the store's refusal, hands out nothing, and leaves the other process's
/// session as it wrote it.
#[tokio::test]
async fn a_share_racing_another_process_twice_is_refused_and_sends_nothing() {
    let (a, b2, flaky, generation, result) = share_racing(2).await;
    assert!(
        matches!(result, Err(Error::Store(newt_store::StoreError::StaleGeneration { .. }))),
        "{result:?}"
    );
    let proto_room = ProtoRoomId::parse("!room:hs").unwrap();
    let after = flaky.inner.outbound_group_session(&proto_room).await.unwrap().unwrap();
    assert_eq!(after.generation, generation + 2, "only the other process's writes");
    a.flush().await.unwrap();
    let out = b2.sync().await.unwrap();
    assert!(
        !out.to_device.iter().any(|t| matches!(t.outcome, ToDeviceOutcome::RoomKeyStored(..))),
        "{out:?}"
    );
}

#[tokio::test]
async fn nothing_is_acknowledged_before_it_is_persisted() {
    let router = Arc::new(Router::new());
    let a = dev(&router, "@alice:hs", "A").await;
    let (b, flaky) = flaky_dev(&router, "@bob:hs", "B").await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    let sync = b.next_sync().unwrap();
    assert_eq!(sync.to_device_events.len(), 1);
    let token_before = flaky.sync_token().await.unwrap();
    flaky.fail.store(true, Ordering::SeqCst);
    // The commit fails: no plaintext is handed out, nothing is half-written,
    // and the consumed one-time key is still in the stored account.
    assert!(matches!(b.machine.receive_sync(sync.clone()).await, Err(Error::Store(_))));
    assert_eq!(flaky.sync_token().await.unwrap(), token_before);
    assert!(flaky.inner.inbound_group_sessions_page(None, 10).await.unwrap().is_empty());
    // The server re-delivers the same batch (the token did not advance): it works now.
    flaky.fail.store(false, Ordering::SeqCst);
    let out = b.machine.receive_sync(sync.clone()).await.unwrap();
    assert!(matches!(out.to_device[0].outcome, ToDeviceOutcome::RoomKeyStored(..)), "{out:?}");
    assert_eq!(flaky.sync_token().await.unwrap(), sync.next_batch);
    let e = a.send_text(&room(), "after the retry").await.unwrap();
    assert_eq!(b.decrypt(&room(), &e).await.unwrap().content["body"], "after the retry");
}

#[tokio::test]
async fn export_import_round_trip_and_bad_passphrase() {
    let (router, a, b) = alice_shared_with_bob().await;
    let e = a.send_text(&room(), "history").await.unwrap();
    let counts = std::sync::Mutex::new(Vec::new());
    let progress = |n: u64, _: u64| counts.lock().unwrap().push(n);
    let bytes =
        b.machine.export_room_keys_to(Vec::new(), "pass", 1000, Some(&progress)).await.unwrap();
    assert_eq!(counts.into_inner().unwrap(), vec![1]);
    let file = String::from_utf8(bytes).unwrap();
    assert!(file.starts_with("-----BEGIN MEGOLM SESSION DATA-----\n"));
    assert!(file.ends_with("-----END MEGOLM SESSION DATA-----\n"));
    let fresh = dev(&router, "@bob:hs", "B9").await;
    assert!(matches!(
        fresh.machine.import_room_keys(&file, "wrong", &ImportOptions::default(), None).await,
        Err(Error::Export(_))
    ));
    let calls = std::sync::Mutex::new(Vec::new());
    let progress = |d: u64, t: u64| calls.lock().unwrap().push((d, t));
    let options = ImportOptions::default();
    let s = fresh.machine.import_room_keys(&file, "pass", &options, Some(&progress)).await.unwrap();
    assert_eq!((s.total, s.imported, s.skipped), (1, 1, 0));
    assert_eq!(calls.into_inner().unwrap(), vec![(1, 1)]);
    assert_eq!(fresh.decrypt(&room(), &e).await.unwrap().content["body"], "history");
    // Importing again changes nothing.
    let s = fresh.machine.import_room_keys(&file, "pass", &options, None).await.unwrap();
    assert_eq!((s.imported, s.skipped), (0, 1));
}

/// `file` (a key export) with its PBKDF2 round count replaced by `rounds`.
fn with_rounds(file: &str, rounds: u32) -> String {
    use newt_proto::export::{FOOTER, HEADER};
    use newt_proto::json::{b64_decode, b64_encode};
    let body = file.split_once(HEADER).unwrap().1.split_once(FOOTER).unwrap().0;
    let mut payload = b64_decode(body).unwrap();
    // Version (1 byte), salt (16), IV (16), then the count, big-endian.
    payload[33..37].copy_from_slice(&rounds.to_be_bytes());
    format!("{HEADER}\n{}\n{FOOTER}\n", b64_encode(&payload))
}

#[tokio::test]
async fn attack_export_file_asking_for_too_many_rounds_is_refused_by_import() {
    let (router, a, b) = alice_shared_with_bob().await;
    let e = a.send_text(&room(), "history").await.unwrap();
    let file = b.machine.export_room_keys("pass", 2000, None).await.unwrap();
    let fresh = dev(&router, "@bob:hs", "B9").await;
    // A limit below the file's count: refused, nothing imported.
    let low = ImportOptions { max_rounds: 1000 };
    let refused = fresh.machine.import_room_keys(&file, "pass", &low, None).await;
    assert!(
        matches!(
            refused,
            Err(Error::Export(ExportError::TooManyRounds { rounds: 2000, max: 1000 }))
        ),
        "{refused:?}"
    );
    assert!(fresh.decrypt(&room(), &e).await.is_err());
    // Raised to the file's count: imported.
    let raised = ImportOptions { max_rounds: 2000 };
    let s = fresh.machine.import_room_keys(&file, "pass", &raised, None).await.unwrap();
    assert_eq!((s.total, s.imported), (1, 1));
    assert_eq!(fresh.decrypt(&room(), &e).await.unwrap().content["body"], "history");
    // A hostile file asking for u32::MAX rounds (over an hour of CPU) is
    // refused by the default limit before any derivation, so this returns at
    // once (without the check it would run for hours; the low limit above
    // fails first).
    let hostile = with_rounds(&file, u32::MAX);
    let refused =
        fresh.machine.import_room_keys(&hostile, "pass", &ImportOptions::default(), None).await;
    assert!(
        matches!(
            refused,
            Err(Error::Export(ExportError::TooManyRounds {
                rounds: u32::MAX,
                max: DEFAULT_MAX_ROUNDS
            }))
        ),
        "{refused:?}"
    );
}

#[tokio::test]
async fn garbage_from_the_network_is_a_typed_error_not_a_panic() {
    let router = Arc::new(Router::new());
    let (a, b) = (dev(&router, "@alice:hs", "A").await, dev(&router, "@bob:hs", "B").await);
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    let curve = b.machine.identity_keys().await.curve25519;
    let garbage = vec![
        json!(null),
        json!([]),
        json!({"type": "m.room.encrypted"}),
        json!({"type": "m.room.encrypted", "sender": "not a user", "content": {}}),
        json!({"type": "m.room.encrypted", "sender": "@alice:hs", "content": []}),
        json!({"type": "m.room.encrypted", "sender": "@alice:hs", "content": {"algorithm": "m.olm.v1.curve25519-aes-sha2"}}),
        json!({"type": "m.room.encrypted", "sender": "@alice:hs", "content": {"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": "AAAA", "ciphertext": {curve.clone(): {"type": 0, "body": "AwoA"}}}}),
        json!({"type": "m.room.encrypted", "sender": "@alice:hs", "content": {"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": curve.clone(), "ciphertext": {curve.clone(): {"type": 7, "body": 3}}}}),
        json!({"type": "m.room_key.withheld", "sender": "@alice:hs", "content": {"code": 5}}),
        json!({"type": "m.room_key_request", "sender": "@alice:hs", "content": {"action": "request"}}),
    ];
    let n = garbage.len();
    let out = b
        .machine
        .receive_sync(newt::SyncChanges {
            to_device_events: garbage,
            next_batch: Some("t1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(out.to_device.len(), n);
    let rejected_count =
        out.to_device.iter().filter(|t| matches!(t.outcome, ToDeviceOutcome::Rejected(_))).count();
    assert!(rejected_count >= 7, "{out:?}");

    // Malformed HTTP responses: typed errors.
    b.machine.update_tracked_users([uid("@carol:hs")]).await.unwrap();
    let reqs = b.machine.outgoing_requests().await.unwrap();
    let query =
        reqs.iter().find(|r| matches!(r.kind, newt::RequestKind::KeysQuery { .. })).unwrap();
    assert!(matches!(
        b.machine.mark_request_sent(&query.id, &json!({"device_keys": "x"})).await,
        Err(Error::KeysQuery(_))
    ));
    assert!(matches!(
        b.machine.mark_request_sent("never-issued", &json!({})).await,
        Err(Error::UnknownRequest(_))
    ));
    // Room events that are not Megolm.
    for e in [
        json!({}),
        json!({"content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "!!"}, "sender": "@a:hs", "event_id": "$1"}),
    ] {
        assert!(matches!(
            b.decrypt(&room(), &e).await,
            Err(SimError::Newt(Error::Megolm(MegolmError::Malformed(_))))
        ));
    }
    // The machine still works afterwards.
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    b.sync().await.unwrap();
    let e = a.send_text(&room(), "still fine").await.unwrap();
    assert_eq!(b.decrypt(&room(), &e).await.unwrap().content["body"], "still fine");
}

#[tokio::test]
async fn large_share_is_recorded_once_all_chunks_are_sent() {
    let router = Arc::new(Router::new());
    let a = dev(&router, "@alice:hs", "A").await;
    // 300 devices of Bob, uploaded directly (real keys and signatures).
    for i in 0..300 {
        RawDevice::new(&router, "@bob:hs", &format!("B{i}"));
    }
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a], &users).await;
    let claim = a.machine.get_missing_sessions(users.iter().cloned()).await.unwrap().unwrap();
    a.send(&claim).await.unwrap();
    let settings = RoomSettings::default();
    let reqs = a.machine.share_room_key(&room(), users.iter().cloned(), &settings).await.unwrap();
    let count = |reqs: &[newt::OutgoingRequest]| -> usize {
        reqs.iter()
            .map(|r| r.kind.body()["messages"]["@bob:hs"].as_object().map_or(0, |m| m.len()))
            .sum()
    };
    assert_eq!(reqs.len(), 2, "300 messages in chunks of 250");
    assert_eq!(count(&reqs), 300);
    // Only the first chunk reported: nothing recorded yet, a new share covers all again.
    a.send(&reqs[0]).await.unwrap();
    let again = a.machine.share_room_key(&room(), users.iter().cloned(), &settings).await.unwrap();
    assert_eq!(count(&again), 300);
    // All chunks of that share reported: recorded once, the next share sends nothing.
    for r in &again {
        a.send(r).await.unwrap();
    }
    let none = a.machine.share_room_key(&room(), users.iter().cloned(), &settings).await.unwrap();
    assert_eq!(count(&none), 0);
}

#[tokio::test]
async fn opening_a_store_of_another_account_is_refused() {
    let router = Arc::new(Router::new());
    let store = Arc::new(MemoryStore::new());
    let a = SimDevice::open(router.clone(), "@alice:hs", "A", store.clone()).await.unwrap();
    let keys = a.machine.identity_keys().await;
    drop(a);
    for (user, device) in [("@mallory:hs", "A"), ("@alice:hs", "OTHER")] {
        match SimDevice::open(router.clone(), user, device, store.clone()).await {
            Err(SimError::Newt(Error::AccountMismatch { user_id, device_id })) => {
                assert_eq!((user_id.as_str(), device_id.as_str()), ("@alice:hs", "A"));
            }
            other => panic!("{user}/{device}: expected AccountMismatch, got {other:?}"),
        }
    }
    // The rightful owner still opens it, with the same identity keys.
    let again = SimDevice::open(router, "@alice:hs", "A", store).await.unwrap();
    assert_eq!(again.machine.identity_keys().await, keys);
}

#[tokio::test]
async fn batched_decryption_rejects_replays_within_and_across_batches() {
    let router = Arc::new(Router::new());
    let a = dev(&router, "@alice:hs", "A").await;
    let b_store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let b = SimDevice::open(router.clone(), "@bob:hs", "B", b_store.clone()).await.unwrap();
    b.flush().await.unwrap();
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    b.sync().await.unwrap();
    let e0 = a.send_text(&room(), "zero").await.unwrap();
    let e1 = a.send_text(&room(), "one").await.unwrap();
    let with_id = |e: &Value, id: &str| {
        let mut e = e.clone();
        e["event_id"] = json!(id);
        e
    };
    let is_replay = |r: &Result<newt::DecryptedRoomEvent, Error>, index: u32| matches!(r, Err(Error::Megolm(MegolmError::Replay { index: i })) if *i == index);

    // Within one batch: the same event twice is fine, another event at an
    // index already seen in this batch is a replay; a malformed event fails
    // alone.
    let batch = [e0.clone(), e1.clone(), e0.clone(), with_id(&e0, "$replay0"), json!({})];
    let out = b.machine.decrypt_room_events(&room(), &batch).await.unwrap();
    assert_eq!(out.len(), 5);
    assert_eq!(out[0].as_ref().unwrap().content["body"], "zero");
    assert_eq!(out[1].as_ref().unwrap().content["body"], "one");
    assert_eq!(out[2].as_ref().unwrap().content["body"], "zero");
    assert!(is_replay(&out[3], 0), "{:?}", out[3]);
    assert!(matches!(out[4], Err(Error::Megolm(MegolmError::Malformed(_)))), "{:?}", out[4]);

    // Across batches, and against single decryption, in both directions.
    let out = b.machine.decrypt_room_events(&room(), &[with_id(&e1, "$replay1"), e1.clone()]).await;
    let out = out.unwrap();
    assert!(is_replay(&out[0], 1), "{:?}", out[0]);
    assert!(out[1].is_ok());
    assert!(is_replay(&b.machine.decrypt_room_event(&room(), &with_id(&e0, "$r")).await, 0));
    let e2 = a.send_text(&room(), "two").await.unwrap();
    assert!(b.decrypt(&room(), &e2).await.is_ok());
    let out = b.machine.decrypt_room_events(&room(), &[with_id(&e2, "$replay2")]).await.unwrap();
    assert!(is_replay(&out[0], 2), "{:?}", out[0]);

    // The replay records were committed: another machine on the same store
    // (a restart, or a second process) rejects the replays too.
    let b2 = newt::Machine::open(b_store, uid("@bob:hs"), did("B")).await.unwrap();
    let out = b2
        .decrypt_room_events(&room(), &[with_id(&e0, "$x"), with_id(&e1, "$y"), e2.clone()])
        .await
        .unwrap();
    assert!(is_replay(&out[0], 0) && is_replay(&out[1], 1), "{out:?}");
    assert_eq!(out[2].as_ref().unwrap().content["body"], "two");
}

/// A batch large enough that its Megolm step runs ahead on several threads
/// (`Machine::decrypt_ahead`, four whatever the machine's cores): every
/// verdict is the one a single decryption gives, in the batch's order.
#[tokio::test]
async fn a_large_batch_keeps_every_check_and_its_order() {
    newt::set_max_threads(4);
    let router = Arc::new(Router::new());
    let a = dev(&router, "@alice:hs", "A").await;
    let b = dev(&router, "@bob:hs", "B").await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    b.sync().await.unwrap();
    let mut batch = Vec::new();
    // 90: under the default rotation (100 messages), one session.
    for i in 0..90 {
        batch.push(a.send_text(&room(), &format!("m{i}")).await.unwrap());
    }
    // A forged ciphertext, a replay of index 7 under another event ID, and
    // an event of a session Bob never received.
    let mut forged = batch[50].clone();
    let ciphertext = forged["content"]["ciphertext"].as_str().unwrap().to_owned();
    let flip = if &ciphertext[30..31] == "A" { "B" } else { "A" };
    forged["content"]["ciphertext"] =
        json!(format!("{}{flip}{}", &ciphertext[..30], &ciphertext[31..]));
    batch[50] = forged;
    let mut replay = batch[7].clone();
    replay["event_id"] = json!("$replayed7");
    batch.insert(70, replay);
    let mut unknown = batch[3].clone();
    unknown["content"]["session_id"] = json!("unknownsession");
    batch.insert(80, unknown);

    let out = b.machine.decrypt_room_events(&room(), &batch).await.unwrap();
    assert_eq!(out.len(), 92);
    for (i, r) in out.iter().enumerate() {
        match i {
            // The signature covers the ciphertext: vodozemac checks it first.
            50 => assert!(
                matches!(
                    r,
                    Err(Error::Megolm(MegolmError::Decryption(DecryptionFailure::Signature)))
                ),
                "{r:?}"
            ),
            70 => {
                assert!(matches!(r, Err(Error::Megolm(MegolmError::Replay { index: 7 }))), "{r:?}")
            }
            80 => assert!(
                matches!(r, Err(Error::Megolm(MegolmError::MissingSession { .. }))),
                "{r:?}"
            ),
            _ => {
                let n = if i < 70 {
                    i
                } else if i < 80 {
                    i - 1
                } else {
                    i - 2
                };
                let event = r.as_ref().unwrap();
                assert_eq!(event.content["body"], format!("m{n}"), "event {i}");
                assert_eq!(event.message_index as usize, n, "event {i}");
            }
        }
    }
}

/// The Megolm message index of an `m.room.encrypted` content.
fn megolm_index(content: &Value) -> u32 {
    let ciphertext = content["ciphertext"].as_str().unwrap();
    newt_proto::vodozemac::megolm::MegolmMessage::from_base64(ciphertext).unwrap().message_index()
}

#[tokio::test]
async fn cached_outbound_session_never_reuses_an_index_of_another_process() {
    let router = Arc::new(Router::new());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = SimDevice::open(router.clone(), "@alice:hs", "A", store.clone()).await.unwrap();
    a.flush().await.unwrap();
    let b = dev(&router, "@bob:hs", "B").await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a, &b], &users).await;
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    // A second process (a notification extension) on the same store.
    let other = newt::Machine::open(store.clone(), uid("@alice:hs"), did("A")).await.unwrap();
    let text = |body: &str| json!({ "msgtype": "m.text", "body": body });
    let mut indices = Vec::new();
    for (m, body) in [(&a.machine, "a1"), (&a.machine, "a2"), (&other, "o1"), (&a.machine, "a3")] {
        let c = m.encrypt_room_event(&room(), "m.room.message", text(body)).await.unwrap();
        indices.push(megolm_index(&c));
    }
    // `a` had the session cached at index 2 when `other` used index 2: its
    // next write was refused, it reloaded and used index 3.
    assert_eq!(indices, [0, 1, 2, 3]);
    let stored = store.outbound_group_session(&ProtoRoomId::parse("!room:hs").unwrap()).await;
    let stored = stored.unwrap().unwrap();
    assert_eq!((stored.message_count, stored.generation), (4, 5));
    // Sharing again from the other process (e.g. to a new device) is seen
    // too: the shared_with it recorded survives `a`'s next encryption.
    let before = stored.shared_with.clone();
    let c = a.machine.encrypt_room_event(&room(), "m.room.message", text("a4")).await.unwrap();
    assert_eq!(megolm_index(&c), 4);
    let after = store.outbound_group_session(&ProtoRoomId::parse("!room:hs").unwrap()).await;
    assert_eq!(after.unwrap().unwrap().shared_with, before);
    // A discard by the other process is not undone by `a`'s cached copy.
    other.discard_room_key(&room()).await.unwrap();
    assert!(matches!(
        a.machine.encrypt_room_event(&room(), "m.room.message", text("a5")).await,
        Err(Error::NoOutboundSession(_))
    ));
    assert!(store
        .outbound_group_session(&ProtoRoomId::parse("!room:hs").unwrap())
        .await
        .unwrap()
        .is_none());
}

/// Item 3 of the hardening: a device that was deleted (signed out) keeps
/// its stored record, flags included, when it writes again: attaching its
/// own cross-signed device keys does not make it a trusted own device
/// again, so its forwarded key is refused although we asked for the key.
#[tokio::test]
async fn attack_deleted_own_device_vouching_for_itself_is_not_trusted() {
    let router = Arc::new(Router::new());
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    let (a1, b) = (dev(&router, "@alice:hs", "A1").await, dev(&router, "@bob:hs", "B").await);
    settle(&[&a1, &b], &users).await;
    bootstrap(&a1).await;
    // A2: Alice's other device, cross-signed by her, so A1 trusts it.
    let a2 = RawDevice::new(&router, "@alice:hs", "A2");
    a1.sync().await.unwrap();
    let body = a1.machine.cross_sign_own_device(&did("A2")).await.unwrap();
    assert_eq!(post(&a1, "/keys/signatures/upload", &body)["failures"], json!({}));
    a1.sync().await.unwrap();
    assert!(a1
        .machine
        .device_trust(&uid("@alice:hs"), &did("A2"))
        .await
        .unwrap()
        .unwrap()
        .is_verified());
    let query = json!({"device_keys": {"@alice:hs": ["A2"]}});
    let signed_keys = post(&a1, "/keys/query", &query)["device_keys"]["@alice:hs"]["A2"].clone();

    // A1 asks its devices for a key of Bob's it never got ...
    b.share_room_key(&room(), &[uid("@bob:hs")], &RoomSettings::default()).await.unwrap();
    let e = b.send_text(&room(), "for Alice's devices only").await.unwrap();
    a1.machine.request_room_key(&room(), &e).await.unwrap();
    a1.flush().await.unwrap();
    // ... A2 is signed out, and what is left of it answers.
    router.delete_device("@alice:hs", "A2").unwrap();
    a1.sync().await.unwrap();
    assert_eq!(a1.machine.device_trust(&uid("@alice:hs"), &did("A2")).await.unwrap(), None);
    let a1_rec = own_record(&a1).await;
    let plaintext = json!({
        "type": "m.forwarded_room_key",
        "content": forwarded_content(&bob_key(&b).await),
        "sender": "@alice:hs",
        "recipient": "@alice:hs",
        "recipient_keys": {"ed25519": a1_rec.ed25519},
        "keys": {"ed25519": a2.record.ed25519},
        "sender_device_keys": signed_keys,
    });
    a2.send_olm_plaintext(&a1, &a1_rec, &plaintext, "@alice:hs");
    let out = a1.sync().await.unwrap();
    let forwarded = out.to_device.iter().find(|t| t.event_type == "m.forwarded_room_key").unwrap();
    assert_eq!(
        rejected(&forwarded.outcome),
        &ToDeviceError::KeyShare(KeyShareError::UntrustedDevice)
    );
    assert!(a1.decrypt(&room(), &e).await.is_err());
}
