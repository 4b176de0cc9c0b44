//! Cross-signing through the driver and the in-process router: bootstrap,
//! own devices cross-signed (by importing the private keys or by an SSK
//! signature), pinning and its changes, verification violations and the
//! sharing policies built on them, and the server-side forgeries newt must
//! refuse.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use newt_test_support::*;

use std::sync::Arc;

use newt::{
    DeviceTrust, Error, IdentityRejection, IdentityTrust, MegolmError, OwnIdentityTrust, RoomId,
    RoomSettings, SenderTrust, SharingPolicy,
};
use newt_proto::account::OwnAccount;
use newt_proto::identities::{CrossSigningError, KeyUsage, PrivateCrossSigningIdentity};
use newt_router::Router;
use newt_store::MemoryStore;
use serde_json::json;

fn room(name: &str) -> RoomId {
    RoomId::parse(format!("!{name}:hs")).unwrap()
}

/// Bootstraps (or resets) `d`'s identity, uploads it and fetches it back.
/// Returns the master key (unpadded base64).
async fn trust(d: &SimDevice, user: &str, device: &str) -> Option<DeviceTrust> {
    d.machine.device_trust(&uid(user), &did(device)).await.unwrap()
}

async fn identity(d: &SimDevice, user: &str) -> Option<IdentityTrust> {
    d.machine.user_identity_state(&uid(user)).await.unwrap()
}

/// `user`'s master key as `d` has it stored (what its user would compare).
async fn master_of(d: &SimDevice, user: &str) -> String {
    d.machine.master_key(&uid(user)).await.unwrap().unwrap()
}

fn withheld_code(result: Result<newt::DecryptedRoomEvent, SimError>) -> String {
    match result {
        Err(SimError::Newt(Error::Megolm(MegolmError::MissingSession {
            withheld: Some(w),
            ..
        }))) => w.code,
        other => panic!("expected a withheld explanation, got {other:?}"),
    }
}

#[tokio::test]
async fn own_devices_are_cross_signed_by_import_or_by_ssk_signature() {
    let router = Arc::new(Router::new());
    let alice = [uid("@alice:hs")];
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let a2 = dev(&router, "@alice:hs", "A2").await;
    let a3 = dev(&router, "@alice:hs", "A3").await;
    settle(&[&a1, &a2, &a3], &alice).await;
    assert_eq!(a1.machine.own_identity_state().await.unwrap(), None);

    bootstrap(&a1).await;
    // A1 holds the private master key: it trusts the identity, and is itself
    // cross-signed; A2 is known but not cross-signed.
    assert_eq!(a1.machine.own_identity_state().await.unwrap(), Some(OwnIdentityTrust::Verified));
    assert_eq!(identity(&a1, "@alice:hs").await, Some(IdentityTrust::Verified));
    assert_eq!(trust(&a1, "@alice:hs", "A2").await, Some(DeviceTrust::NotCrossSigned));

    // A2 sees the identity but has not verified it: A1 is cross-signed by an
    // identity A2 does not trust yet.
    a2.sync().await.unwrap();
    assert_eq!(a2.machine.own_identity_state().await.unwrap(), Some(OwnIdentityTrust::Unverified));
    assert_eq!(trust(&a2, "@alice:hs", "A1").await, Some(DeviceTrust::CrossSignedByUntrustedOwner));

    // Path 1: A2 imports the private keys (as from secret storage) and signs
    // itself with the SSK.
    let keys = a1.machine.export_cross_signing_keys().await.unwrap().unwrap();
    a2.machine.import_cross_signing_keys(&keys).await.unwrap();
    assert_eq!(a2.machine.own_identity_state().await.unwrap(), Some(OwnIdentityTrust::Verified));
    assert_eq!(trust(&a2, "@alice:hs", "A1").await, Some(DeviceTrust::CrossSignedByVerifiedOwner));
    let body = a2.machine.cross_sign_own_device(&did("A2")).await.unwrap();
    post(&a2, "/keys/signatures/upload", &body);
    a1.sync().await.unwrap();
    assert_eq!(trust(&a1, "@alice:hs", "A2").await, Some(DeviceTrust::CrossSignedByVerifiedOwner));

    // Path 2: A1 signs A3 with the SSK (after verifying it some other way).
    let body = a1.machine.cross_sign_own_device(&did("A3")).await.unwrap();
    post(&a1, "/keys/signatures/upload", &body);
    a1.sync().await.unwrap();
    a2.sync().await.unwrap();
    assert_eq!(trust(&a1, "@alice:hs", "A3").await, Some(DeviceTrust::CrossSignedByVerifiedOwner));
    assert_eq!(trust(&a2, "@alice:hs", "A3").await, Some(DeviceTrust::CrossSignedByVerifiedOwner));

    // Importing keys that are not our identity's is refused (and before our
    // identity is known, there is nothing to check them against).
    let a4 = SimDevice::open(router.clone(), "@alice:hs", "A4", Arc::new(MemoryStore::new()))
        .await
        .unwrap();
    assert!(matches!(a4.machine.import_cross_signing_keys(&keys).await, Err(Error::NoIdentity(_))));
    a3.sync().await.unwrap();
    let mut wrong = keys.clone();
    wrong.master = PrivateCrossSigningIdentity::new(uid("@alice:hs")).export_seeds().master.clone();
    assert!(matches!(
        a3.machine.import_cross_signing_keys(&wrong).await,
        Err(Error::CrossSigning(CrossSigningError::PublicKeyMismatch(KeyUsage::Master)))
    ));

    // A message from A2 decrypts on A1 as verified, with no local verification.
    a2.share_room_key(&room("own"), &alice, &RoomSettings::default()).await.unwrap();
    let event = a2.send_text(&room("own"), "from A2").await.unwrap();
    a1.sync().await.unwrap();
    let decrypted = a1.decrypt(&room("own"), &event).await.unwrap();
    assert_eq!(decrypted.trust, SenderTrust::Verified);
    // A3 does not trust the identity (no private master key, no
    // interactive verification): the same message is unverified there.
    a3.sync().await.unwrap();
    assert_eq!(a3.decrypt(&room("own"), &event).await.unwrap().trust, SenderTrust::Unverified);
}

#[tokio::test]
async fn cross_signed_own_device_is_trusted_for_key_requests() {
    let router = Arc::new(Router::new());
    let alice = [uid("@alice:hs")];
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let a2 = dev(&router, "@alice:hs", "A2").await;
    settle(&[&a1, &a2], &alice).await;
    bootstrap(&a1).await;
    a2.sync().await.unwrap();
    // An Olm channel from A1 to A2, for the answers.
    let claim = a1.machine.get_missing_sessions(alice.clone()).await.unwrap().unwrap();
    a1.send(&claim).await.unwrap();

    // A1 has a room key A2 lacks (shared with nobody); A2 asks for it.
    let ask = |name: &'static str| {
        let (a1, a2) = (a1.clone(), a2.clone());
        async move {
            a1.share_room_key(&room(name), &[], &RoomSettings::default()).await.unwrap();
            let event = a1.send_text(&room(name), "history").await.unwrap();
            a2.machine.request_room_key(&room(name), &event).await.unwrap();
            a2.flush().await.unwrap();
            let answered = a1.sync().await.unwrap();
            a2.sync().await.unwrap();
            (event, answered)
        }
    };
    // A2 is neither locally verified nor cross-signed: refused.
    let (event, answered) = ask("before").await;
    assert!(answered.to_device.iter().any(|t| matches!(
        &t.outcome,
        newt::ToDeviceOutcome::Rejected(newt::ToDeviceError::KeyShare(_))
    )));
    assert!(a2.decrypt(&room("before"), &event).await.is_err());

    // A1 signs A2 with the SSK; A2 trusts the identity through the imported
    // keys. Each now trusts the other for key sharing, with no local marks.
    let body = a1.machine.cross_sign_own_device(&did("A2")).await.unwrap();
    post(&a1, "/keys/signatures/upload", &body);
    let keys = a1.machine.export_cross_signing_keys().await.unwrap().unwrap();
    a2.machine.import_cross_signing_keys(&keys).await.unwrap();
    a1.sync().await.unwrap();
    a2.sync().await.unwrap();
    assert_eq!(trust(&a1, "@alice:hs", "A2").await, Some(DeviceTrust::CrossSignedByVerifiedOwner));
    let (event, answered) = ask("after").await;
    assert!(answered
        .to_device
        .iter()
        .any(|t| t.outcome == newt::ToDeviceOutcome::KeyRequestAnswered));
    let decrypted = a2.decrypt(&room("after"), &event).await.unwrap();
    assert_eq!(decrypted.content["body"], "history");
    assert_eq!(decrypted.trust, SenderTrust::Unauthenticated);
}

#[tokio::test]
async fn pinned_identity_reset_shows_as_pinned_changed() {
    let router = Arc::new(Router::new());
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let b1 = dev(&router, "@bob:hs", "B1").await;
    settle(&[&a1, &b1], &users).await;
    assert_eq!(identity(&b1, "@alice:hs").await, None);
    let first = bootstrap(&a1).await;
    b1.sync().await.unwrap();
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::Pinned));
    assert_eq!(trust(&b1, "@alice:hs", "A1").await, Some(DeviceTrust::CrossSignedByPinnedOwner));

    // Alice resets her identity.
    let second = bootstrap(&a1).await;
    assert_ne!(first, second);
    b1.sync().await.unwrap();
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::PinnedChanged));
    assert_eq!(trust(&b1, "@alice:hs", "A1").await, Some(DeviceTrust::CrossSignedByUntrustedOwner));
    // Bob accepts the new identity; the pin survives a re-query.
    b1.machine.acknowledge_identity_change(&uid("@alice:hs")).await.unwrap();
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::Pinned));
    b1.machine.update_tracked_users(users.clone()).await.unwrap();
    b1.sync().await.unwrap();
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::Pinned));
}

#[tokio::test]
async fn verified_identity_change_is_a_violation_that_can_block_sharing() {
    let router = Arc::new(Router::new());
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let b1 = dev(&router, "@bob:hs", "B1").await;
    settle(&[&a1, &b1], &users).await;
    bootstrap(&a1).await;
    bootstrap(&b1).await;
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::Pinned));

    // Bob verifies Alice: his USK signs her master key.
    let body = b1
        .machine
        .verify_user_identity(&uid("@alice:hs"), &master_of(&b1, "@alice:hs").await)
        .await
        .unwrap();
    assert_eq!(post(&b1, "/keys/signatures/upload", &body)["failures"], json!({}));
    b1.sync().await.unwrap();
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::Verified));
    assert_eq!(trust(&b1, "@alice:hs", "A1").await, Some(DeviceTrust::CrossSignedByVerifiedOwner));
    // Alice does not see Bob's signature (the server hides USK signatures).
    a1.sync().await.unwrap();
    assert_eq!(identity(&a1, "@bob:hs").await, Some(IdentityTrust::Pinned));

    // Alice's messages decrypt as verified on Bob's side.
    a1.share_room_key(&room("r"), &users, &RoomSettings::default()).await.unwrap();
    let event = a1.send_text(&room("r"), "hi").await.unwrap();
    b1.sync().await.unwrap();
    assert_eq!(b1.decrypt(&room("r"), &event).await.unwrap().trust, SenderTrust::Verified);

    // Alice resets her identity: a violation for Bob.
    bootstrap(&a1).await;
    b1.sync().await.unwrap();
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::VerificationViolation));
    assert_eq!(b1.decrypt(&room("r"), &event).await.unwrap().trust, SenderTrust::Unverified);

    let blocking = RoomSettings { block_on_verification_violation: true, ..Default::default() };
    match b1.share_room_key(&room("r"), &users, &blocking).await {
        Err(SimError::Newt(Error::VerificationViolation(who))) => {
            assert_eq!(who, vec![uid("@alice:hs")]);
        }
        other => panic!("expected a verification violation, got {other:?}"),
    }
    // Without the flag it is a warning only (the state above), not a block.
    b1.share_room_key(&room("r"), &users, &RoomSettings::default()).await.unwrap();
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::VerificationViolation));

    // Acknowledging withdraws the verification and pins the new identity.
    b1.machine.acknowledge_identity_change(&uid("@alice:hs")).await.unwrap();
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::Pinned));
    b1.share_room_key(&room("r2"), &users, &blocking).await.unwrap();
}

#[tokio::test]
async fn cross_signed_only_and_verified_only_withhold_as_unverified() {
    let router = Arc::new(Router::new());
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let b1 = dev(&router, "@bob:hs", "B1").await;
    let b2 = dev(&router, "@bob:hs", "B2").await;
    settle(&[&a1, &b1, &b2], &users).await;
    bootstrap(&a1).await;
    bootstrap(&b1).await; // cross-signs B1, not B2
    a1.sync().await.unwrap();
    assert_eq!(trust(&a1, "@bob:hs", "B1").await, Some(DeviceTrust::CrossSignedByPinnedOwner));
    assert_eq!(trust(&a1, "@bob:hs", "B2").await, Some(DeviceTrust::NotCrossSigned));

    let cross_signed =
        RoomSettings { policy: SharingPolicy::CrossSignedOnly, ..Default::default() };
    a1.share_room_key(&room("cs"), &users, &cross_signed).await.unwrap();
    let event = a1.send_text(&room("cs"), "for cross-signed devices").await.unwrap();
    b1.sync().await.unwrap();
    b2.sync().await.unwrap();
    assert_eq!(
        b1.decrypt(&room("cs"), &event).await.unwrap().content["body"],
        "for cross-signed devices"
    );
    assert_eq!(withheld_code(b2.decrypt(&room("cs"), &event).await), "m.unverified");

    // VerifiedOnly: Bob's identity is only pinned, so both are withheld ...
    let verified = RoomSettings { policy: SharingPolicy::VerifiedOnly, ..Default::default() };
    a1.share_room_key(&room("v1"), &users, &verified).await.unwrap();
    let event = a1.send_text(&room("v1"), "verified only").await.unwrap();
    b1.sync().await.unwrap();
    b2.sync().await.unwrap();
    assert_eq!(withheld_code(b1.decrypt(&room("v1"), &event).await), "m.unverified");
    assert_eq!(withheld_code(b2.decrypt(&room("v1"), &event).await), "m.unverified");

    // ... until Alice verifies Bob: then his cross-signed device gets keys.
    let body = a1
        .machine
        .verify_user_identity(&uid("@bob:hs"), &master_of(&a1, "@bob:hs").await)
        .await
        .unwrap();
    post(&a1, "/keys/signatures/upload", &body);
    a1.sync().await.unwrap();
    assert_eq!(trust(&a1, "@bob:hs", "B1").await, Some(DeviceTrust::CrossSignedByVerifiedOwner));
    a1.share_room_key(&room("v2"), &users, &verified).await.unwrap();
    let event = a1.send_text(&room("v2"), "verified only").await.unwrap();
    b1.sync().await.unwrap();
    b2.sync().await.unwrap();
    assert_eq!(b1.decrypt(&room("v2"), &event).await.unwrap().content["body"], "verified only");
    assert_eq!(withheld_code(b2.decrypt(&room("v2"), &event).await), "m.unverified");
}

#[tokio::test]
async fn device_id_equal_to_a_cross_signing_key_id_refuses_the_user() {
    let router = Arc::new(Router::new());
    let a1 = dev(&router, "@alice:hs", "A1").await;
    a1.sync().await.unwrap();
    let master = bootstrap(&a1).await;
    // The server adds a device whose ID is Alice's master key.
    let mut fake = OwnAccount::new(uid("@alice:hs"), did(&master));
    fake.prepare_initial_upload(0);
    router
        .handle(
            "@alice:hs",
            &master,
            "POST",
            "/keys/upload",
            &json!({ "device_keys": fake.device_keys() }),
        )
        .unwrap();

    let b1 = dev(&router, "@bob:hs", "B1").await;
    settle(&[&b1], &[uid("@alice:hs")]).await;
    let reports = b1.machine.take_keys_query_reports().await;
    let rejected: Vec<_> = reports.iter().flat_map(|r| r.rejected_identities.iter()).collect();
    assert_eq!(rejected.len(), 1, "{reports:?}");
    assert_eq!(rejected[0].user_id, uid("@alice:hs"));
    assert_eq!(rejected[0].reason, IdentityRejection::DeviceIdCollision(master.clone()));
    assert_eq!(identity(&b1, "@alice:hs").await, None);
    assert_eq!(trust(&b1, "@alice:hs", &master).await, None);
    // Alice's real device is still known, but vouched for by nothing.
    assert_eq!(trust(&b1, "@alice:hs", "A1").await, Some(DeviceTrust::Unknown));
}

#[tokio::test]
async fn self_signing_key_not_signed_by_the_master_key_is_rejected() {
    let router = Arc::new(Router::new());
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let b1 = dev(&router, "@bob:hs", "B1").await;
    settle(&[&a1, &b1], &[uid("@alice:hs")]).await;
    // A server (or a bug) pairs Alice's master key with a self-signing key
    // signed by some other master key.
    let real = PrivateCrossSigningIdentity::new(uid("@alice:hs"));
    let other = PrivateCrossSigningIdentity::new(uid("@alice:hs"));
    post(
        &a1,
        "/keys/device_signing/upload",
        &json!({
            "master_key": real.public_key_json(KeyUsage::Master).unwrap(),
            "self_signing_key": other.public_key_json(KeyUsage::SelfSigning).unwrap(),
            "user_signing_key": real.public_key_json(KeyUsage::UserSigning).unwrap(),
        }),
    );
    b1.sync().await.unwrap();
    let reports = b1.machine.take_keys_query_reports().await;
    let rejected: Vec<_> = reports.iter().flat_map(|r| r.rejected_identities.iter()).collect();
    assert_eq!(rejected.len(), 1, "{reports:?}");
    assert!(
        matches!(&rejected[0].reason, IdentityRejection::Invalid(CrossSigningError::Signature(_))),
        "{rejected:?}"
    );
    assert_eq!(identity(&b1, "@alice:hs").await, None);
    // Alice's own device refuses it too.
    a1.sync().await.unwrap();
    assert_eq!(a1.machine.own_identity_state().await.unwrap(), None);
}

/// A server that swaps a user's identity between what our user compared and
/// the confirmation gets nothing signed; nor does a changed identity that
/// was not acknowledged.
#[tokio::test]
async fn attack_identity_swapped_before_verification_is_not_signed() {
    let router = Arc::new(Router::new());
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let b1 = dev(&router, "@bob:hs", "B1").await;
    settle(&[&a1, &b1], &users).await;
    bootstrap(&a1).await;
    bootstrap(&b1).await;
    // Bob compares Alice's master key ...
    let compared = master_of(&b1, "@alice:hs").await;
    // ... the identity is replaced before he confirms (a reset, or a server
    // that swapped it), and Bob's device has fetched the new one.
    let swapped = bootstrap(&a1).await;
    assert_ne!(compared, swapped);
    b1.sync().await.unwrap();
    assert_eq!(master_of(&b1, "@alice:hs").await, swapped);
    match b1.machine.verify_user_identity(&uid("@alice:hs"), &compared).await {
        Err(Error::CrossSigning(CrossSigningError::MasterKeyMismatch { expected, found })) => {
            assert_eq!((expected, found), (compared, swapped.clone()));
        }
        other => panic!("expected a master key mismatch, got {other:?}"),
    }
    // Even naming the new key: the identity changed since it was pinned.
    match b1.machine.verify_user_identity(&uid("@alice:hs"), &swapped).await {
        Err(Error::CrossSigning(CrossSigningError::IdentityChanged(t))) => {
            assert_eq!(t, IdentityTrust::PinnedChanged);
        }
        other => panic!("expected a refusal of the changed identity, got {other:?}"),
    }
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::PinnedChanged));
    // Once acknowledged, the new identity can be verified.
    b1.machine.acknowledge_identity_change(&uid("@alice:hs")).await.unwrap();
    let body = b1.machine.verify_user_identity(&uid("@alice:hs"), &swapped).await.unwrap();
    assert_eq!(post(&b1, "/keys/signatures/upload", &body)["failures"], json!({}));
    b1.sync().await.unwrap();
    assert_eq!(identity(&b1, "@alice:hs").await, Some(IdentityTrust::Verified));
}
