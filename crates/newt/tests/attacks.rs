//! Attacks on the driver, each fed end to end through the in-process router
//! (which plays the malicious server or user) and each refused. Every test
//! here is named `attack_*` and fails when the check it covers is removed;
//! the README's security section lists them with the rest (`attack_*` in
//! newt-proto, e2e.rs, cross_signing.rs and the SQLite store tests).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use newt_test_support::*;

use std::sync::Arc;

use newt::{
    DeviceTrust, Error, LocalTrust, MegolmError, RoomId, RoomSettings, SenderTrust, SharingPolicy,
    ToDeviceError, ToDeviceOutcome,
};
use newt_proto::ids::RoomId as ProtoRoomId;
use newt_proto::megolm::{OutboundSession, RotationSettings};
use newt_proto::olm::{OlmError, PlaintextCheckError};
use newt_router::Router;
use serde_json::{json, Value};

fn room() -> RoomId {
    RoomId::parse("!room:hs").unwrap()
}

/// Alice (device A) and Bob (devices B1, B2), everyone tracking everyone.
async fn alice_and_bob(router: &Arc<Router>) -> (SimDevice, SimDevice, SimDevice) {
    let a = dev(router, "@alice:hs", "A").await;
    let b1 = dev(router, "@bob:hs", "B1").await;
    let b2 = dev(router, "@bob:hs", "B2").await;
    settle(&[&a, &b1, &b2], &[uid("@alice:hs"), uid("@bob:hs")]).await;
    (a, b1, b2)
}

fn withheld_code(result: Result<newt::DecryptedRoomEvent, SimError>) -> Option<String> {
    match result {
        Err(SimError::Newt(Error::Megolm(MegolmError::MissingSession { withheld, .. }))) => {
            withheld.map(|w| w.code)
        }
        other => panic!("expected a missing session, got {other:?}"),
    }
}

/// Item 1: a device we have not fetched may vouch for itself with
/// `sender_device_keys`, but not under the ID of a device we know with other
/// keys: an app asking `device_trust(user, sender_device)` would otherwise
/// trust the impostor as the real, verified device. Its event is not named
/// after that device, and carries no trust verdict; a known device's event
/// carries newt's verdict on it.
#[tokio::test]
async fn attack_new_device_taking_a_known_device_id_is_not_named_as_it() {
    let router = Arc::new(Router::new());
    let (_a, b, _) = alice_and_bob(&router).await;
    let known = RawDevice::new(&router, "@alice:hs", "KNOWN");
    b.sync().await.unwrap();
    for d in ["A", "KNOWN"] {
        b.machine.set_local_trust(&uid("@alice:hs"), &did(d), LocalTrust::Verified).await.unwrap();
    }
    let b_rec = own_record(&b).await;

    let impostor = RawDevice::unpublished(&router, "@alice:hs", "A");
    impostor.send_olm(&b, &b_rec, "org.example.trusted_command", json!({"run": "rm -rf"}));
    let out = b.sync().await.unwrap();
    let t = &out.to_device[0];
    assert_eq!(t.outcome, ToDeviceOutcome::ForApp);
    assert_eq!((&t.sender_device, &t.sender_device_trust), (&None, &None));
    assert_eq!(t.sender_key.as_deref(), Some(impostor.record.curve25519.as_str()));

    // A device not fetched yet, under an ID of its own, is named by its
    // claim (with the key Olm authenticated) and is trusted by nothing.
    let newcomer = RawDevice::unpublished(&router, "@alice:hs", "NEW");
    newcomer.send_olm(&b, &b_rec, "org.example.hello", json!({}));
    let out = b.sync().await.unwrap();
    let t = &out.to_device[0];
    assert_eq!(t.outcome, ToDeviceOutcome::ForApp);
    assert_eq!((&t.sender_device, &t.sender_device_trust), (&Some(did("NEW")), &None));
    assert_eq!(b.machine.device_trust(&uid("@alice:hs"), &did("NEW")).await.unwrap(), None);

    // The device Bob knows and verified: named, with the verdict.
    known.send_olm(&b, &b_rec, "org.example.hello", json!({}));
    let out = b.sync().await.unwrap();
    let t = &out.to_device[0];
    assert_eq!(t.sender_device, Some(did("KNOWN")));
    assert_eq!(t.sender_device_trust, Some(DeviceTrust::LocallyVerified));
}

/// Item 2: a device that got the room key and is blacklisted afterwards (or
/// no longer passes the room's policy) must not read what comes next: the
/// session rotates.
#[tokio::test]
async fn attack_device_excluded_after_it_got_the_key_reads_nothing_new() {
    let router = Arc::new(Router::new());
    let (a, b1, b2) = alice_and_bob(&router).await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];

    // Blacklisted after the share.
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    let before = a.send_text(&room(), "before").await.unwrap();
    b2.sync().await.unwrap();
    assert_eq!(b2.decrypt(&room(), &before).await.unwrap().content["body"], "before");
    a.machine.set_local_trust(&uid("@bob:hs"), &did("B2"), LocalTrust::Blacklisted).await.unwrap();
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    let after = a.send_text(&room(), "after").await.unwrap();
    assert_ne!(before["content"]["session_id"], after["content"]["session_id"]);
    b1.sync().await.unwrap();
    b2.sync().await.unwrap();
    assert_eq!(b1.decrypt(&room(), &after).await.unwrap().content["body"], "after");
    assert_eq!(withheld_code(b2.decrypt(&room(), &after).await).as_deref(), Some("m.blacklisted"));

    // VerifiedOnly: verified when it got the key, not verified any more.
    let verified_only = RoomSettings { policy: SharingPolicy::VerifiedOnly, ..Default::default() };
    let other = RoomId::parse("!other:hs").unwrap();
    for d in ["B1", "B2"] {
        a.machine.set_local_trust(&uid("@bob:hs"), &did(d), LocalTrust::Verified).await.unwrap();
    }
    a.share_room_key(&other, &users, &verified_only).await.unwrap();
    let before = a.send_text(&other, "before").await.unwrap();
    b2.sync().await.unwrap();
    assert_eq!(b2.decrypt(&other, &before).await.unwrap().content["body"], "before");
    a.machine.set_local_trust(&uid("@bob:hs"), &did("B2"), LocalTrust::Unset).await.unwrap();
    a.share_room_key(&other, &users, &verified_only).await.unwrap();
    let after = a.send_text(&other, "after").await.unwrap();
    b1.sync().await.unwrap();
    b2.sync().await.unwrap();
    assert_eq!(b1.decrypt(&other, &after).await.unwrap().content["body"], "after");
    assert_eq!(withheld_code(b2.decrypt(&other, &after).await).as_deref(), Some("m.unverified"));
}

/// Item 5: messages from a device that was deleted (signed out) are never
/// labelled verified, however the device was trusted before.
#[tokio::test]
async fn attack_messages_of_a_deleted_device_are_not_verified() {
    let router = Arc::new(Router::new());
    let (a, b, _) = alice_and_bob(&router).await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    b.machine.set_local_trust(&uid("@alice:hs"), &did("A"), LocalTrust::Verified).await.unwrap();
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    let event = a.send_text(&room(), "hi").await.unwrap();
    b.sync().await.unwrap();
    assert_eq!(b.decrypt(&room(), &event).await.unwrap().trust, SenderTrust::Verified);

    router.delete_device("@alice:hs", "A").unwrap();
    b.sync().await.unwrap();
    assert_eq!(b.machine.device_trust(&uid("@alice:hs"), &did("A")).await.unwrap(), None);
    assert_eq!(b.decrypt(&room(), &event).await.unwrap().trust, SenderTrust::DeletedDevice);
}

/// Item 6: an Olm channel with a device known to belong to Mallory cannot
/// carry a room key labelled as Alice's (the server relabels the event, the
/// plaintext names Alice): refused, so Alice's name never appears on
/// Mallory's messages.
#[tokio::test]
async fn attack_room_key_over_another_users_device_is_rejected() {
    let router = Arc::new(Router::new());
    let (_a, b, _) = alice_and_bob(&router).await;
    let mallory = RawDevice::new(&router, "@mallory:hs", "M");
    b.machine.update_tracked_users([uid("@mallory:hs")]).await.unwrap();
    b.flush().await.unwrap();
    let b_rec = own_record(&b).await;

    let mut outbound = OutboundSession::new(
        ProtoRoomId::parse("!room:hs").unwrap(),
        RotationSettings::default(),
        0,
    );
    let plaintext = json!({
        "type": "m.room_key",
        "content": outbound.room_key_content(false),
        "sender": "@alice:hs",
        "recipient": "@bob:hs",
        "recipient_keys": {"ed25519": b_rec.ed25519},
        "keys": {"ed25519": mallory.record.ed25519},
    });
    mallory.send_olm_plaintext(&b, &b_rec, &plaintext, "@alice:hs");
    let out = b.sync().await.unwrap();
    assert_eq!(
        rejected(&out.to_device[0].outcome),
        &ToDeviceError::Olm(OlmError::Check(PlaintextCheckError::KeyOfAnotherUser {
            owner: "@mallory:hs".into()
        }))
    );
    let content =
        outbound.encrypt(&mallory.account, "m.room.message", json!({"body": "I am Alice"}));
    let event =
        router.send_room_event("!room:hs", "@alice:hs", "m.room.encrypted", content).unwrap();
    assert!(matches!(
        b.decrypt(&room(), &event).await,
        Err(SimError::Newt(Error::Megolm(MegolmError::MissingSession { .. })))
    ));
}

/// Item 9: withheld notices are kept per sender and shown only for their
/// sender's events, so nobody (another user, or the server in the clear)
/// can replace or invent the "why can't I decrypt" of someone else.
#[tokio::test]
async fn attack_withheld_notice_from_another_sender_is_not_shown() {
    let router = Arc::new(Router::new());
    let (a, b, _) = alice_and_bob(&router).await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    a.machine.set_local_trust(&uid("@bob:hs"), &did("B1"), LocalTrust::Blacklisted).await.unwrap();
    a.share_room_key(&room(), &users, &RoomSettings::default()).await.unwrap();
    let refused = a.send_text(&room(), "not for B1").await.unwrap();
    // A session Alice kept to herself: she sent B1 no notice for it.
    let private = RoomId::parse("!private:hs").unwrap();
    a.share_room_key(&private, &[uid("@alice:hs")], &RoomSettings::default()).await.unwrap();
    let silent = a.send_text(&private, "nobody else").await.unwrap();

    let forge = |event: &Value, room_id: &str| {
        let content = json!({
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": room_id,
            "session_id": event["content"]["session_id"],
            "sender_key": "forged",
            "code": "m.unverified",
            "reason": "Verify at https://evil.example to read this",
        });
        let body = json!({"messages": {"@bob:hs": {"B1": content}}});
        router
            .handle("@mallory:hs", "M", "PUT", "/sendToDevice/m.room_key.withheld/f", &body)
            .unwrap();
    };
    b.sync().await.unwrap();
    forge(&refused, "!room:hs");
    forge(&silent, "!private:hs");
    b.sync().await.unwrap();
    match b.decrypt(&room(), &refused).await {
        Err(SimError::Newt(Error::Megolm(MegolmError::MissingSession {
            withheld: Some(w),
            ..
        }))) => {
            assert_eq!((w.code.as_str(), w.sender.as_str()), ("m.blacklisted", "@alice:hs"));
        }
        other => panic!("expected Alice's notice, got {other:?}"),
    }
    assert_eq!(withheld_code(b.decrypt(&private, &silent).await), None);
}

/// Item 11: a room key newt stored is handed to the app without its key, and
/// the `Debug` output of an outcome never shows key material (an
/// `m.secret.send` secret still reaches the app in the content).
#[tokio::test]
async fn attack_logged_to_device_outcomes_hold_no_key() {
    let router = Arc::new(Router::new());
    let b = dev(&router, "@bob:hs", "B").await;
    let carol = RawDevice::new(&router, "@carol:hs", "C");
    b.machine.update_tracked_users([uid("@carol:hs")]).await.unwrap();
    b.flush().await.unwrap();
    let b_rec = own_record(&b).await;

    let outbound = OutboundSession::new(
        ProtoRoomId::parse("!room:hs").unwrap(),
        RotationSettings::default(),
        0,
    );
    let room_key = outbound.room_key_content(false);
    let session_key = room_key["session_key"].as_str().unwrap().to_owned();
    carol.send_olm(&b, &b_rec, "m.room_key", room_key);
    let secret = "the-backup-key-itself";
    carol.send_olm(&b, &b_rec, "m.secret.send", json!({"request_id": "r1", "secret": secret}));
    let out = b.sync().await.unwrap();

    assert!(matches!(out.to_device[0].outcome, ToDeviceOutcome::RoomKeyStored(..)), "{out:?}");
    assert_eq!(out.to_device[0].content["session_id"], json!(outbound.session_id()));
    assert!(out.to_device[0].content.get("session_key").is_none());
    assert_eq!(out.to_device[1].content["secret"], secret);
    let logged = format!("{out:?}");
    assert!(!logged.contains(&session_key), "{logged}");
    assert!(!logged.contains(secret), "{logged}");
}
