//! SAS verification driven by the machine, over to-device messages through
//! the in-process router: two devices of one user verify each other, a
//! man in the middle swapping keys is caught, and a user-reported mismatch
//! cancels.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use newt_test_support::*;

use std::sync::Arc;

use newt::{
    CancelCode, DeviceTrust, LocalTrust, OwnIdentityTrust, RequestKind, RoomId, RoomSettings,
    VerificationState,
};
use newt_proto::vodozemac::sas::Sas;
use newt_router::Router;
use serde_json::json;

/// Syncs the devices in turn a few rounds (each sync sends what it caused).
async fn pump(devices: &[&SimDevice], rounds: usize) {
    for _ in 0..rounds {
        for d in devices {
            d.sync().await.unwrap();
        }
    }
}

/// A1 requests, A2 accepts, A1 starts: returns the flow ID (same on both).
async fn request_and_start(a1: &SimDevice, a2: &SimDevice) -> String {
    let (flow, request) =
        a1.machine.request_verification(&uid("@alice:hs"), &did("A2")).await.unwrap();
    assert!(
        matches!(request.kind, RequestKind::ToDevice { ref event_type, .. } if event_type == "m.key.verification.request")
    );
    a1.send(&request).await.unwrap();
    assert_eq!(a1.machine.verification_state(&flow).await, Some(VerificationState::Requested));
    a2.sync().await.unwrap();
    let flows = a2.machine.verification_flows().await;
    assert_eq!(flows.len(), 1);
    assert_eq!(
        (&flows[0].other_user, flows[0].other_device.as_ref(), &flows[0].flow_id),
        (&uid("@alice:hs"), Some(&did("A1")), &flow)
    );
    assert_eq!(flows[0].room_id, None);
    assert_eq!(flows[0].state, VerificationState::RequestReceived);
    assert_eq!(
        a2.machine.verification_state(&flow).await,
        Some(VerificationState::RequestReceived)
    );
    a2.machine.accept_verification(&flow).await.unwrap();
    a2.flush().await.unwrap();
    a1.sync().await.unwrap();
    assert_eq!(a1.machine.verification_state(&flow).await, Some(VerificationState::Ready));
    a1.machine.start_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();
    flow
}

async fn state(d: &SimDevice, flow: &str) -> VerificationState {
    d.machine.verification_state(flow).await.unwrap()
}

async fn local_trust(d: &SimDevice, device: &str) -> LocalTrust {
    let devices = d.machine.devices(&uid("@alice:hs")).await.unwrap();
    devices.into_iter().find(|r| r.device_id == did(device)).unwrap().local_trust
}

#[tokio::test]
async fn own_devices_verify_each_other_by_sas() {
    let (router, a1, a2) = alice_pair().await;
    assert_eq!(a2.machine.own_identity_state().await.unwrap(), Some(OwnIdentityTrust::Unverified));

    // A room key only A2 has (Bob blacklisted A1), and an Olm session
    // A2 -> A1 so A2 can answer A1's key request.
    let room = RoomId::parse("!room:hs").unwrap();
    let bob = dev(&router, "@bob:hs", "B").await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a1, &a2, &bob], &users).await;
    bob.machine
        .set_local_trust(&uid("@alice:hs"), &did("A1"), LocalTrust::Blacklisted)
        .await
        .unwrap();
    bob.share_room_key(&room, &users, &RoomSettings::default()).await.unwrap();
    let event = bob.send_text(&room, "for verified devices").await.unwrap();
    a2.share_room_key(
        &RoomId::parse("!other:hs").unwrap(),
        &[uid("@alice:hs")],
        &RoomSettings::default(),
    )
    .await
    .unwrap();
    pump(&[&a1, &a2], 1).await;
    assert!(a2.decrypt(&room, &event).await.is_ok());
    assert!(a1.decrypt(&room, &event).await.is_err());

    let flow = request_and_start(&a1, &a2).await;
    // start -> accept -> key -> key.
    pump(&[&a2, &a1], 2).await;
    assert_eq!(state(&a1, &flow).await, VerificationState::KeysExchanged);
    assert_eq!(state(&a2, &flow).await, VerificationState::KeysExchanged);
    let e1 = a1.machine.sas_emoji(&flow).await.unwrap();
    let e2 = a2.machine.sas_emoji(&flow).await.unwrap();
    assert_eq!(e1, e2);
    assert_eq!(
        a1.machine.sas_emoji_indices(&flow).await,
        a2.machine.sas_emoji_indices(&flow).await
    );
    let d1 = a1.machine.sas_decimals(&flow).await.unwrap();
    assert_eq!(Some(d1), a2.machine.sas_decimals(&flow).await);
    assert!(d1.iter().all(|d| (1000..=9191).contains(d)));

    a1.machine.confirm_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();
    assert_eq!(state(&a1, &flow).await, VerificationState::Confirmed);
    a2.sync().await.unwrap(); // A1's MAC, kept until A2's user confirms
    assert_eq!(state(&a2, &flow).await, VerificationState::KeysExchanged);
    assert_eq!(local_trust(&a2, "A1").await, LocalTrust::Unset);
    a2.machine.confirm_sas(&flow).await.unwrap();
    a2.flush().await.unwrap();
    pump(&[&a1, &a2], 2).await;
    assert_eq!(state(&a1, &flow).await, VerificationState::Done);
    assert_eq!(state(&a2, &flow).await, VerificationState::Done);

    // Both verified the other device.
    assert_eq!(local_trust(&a1, "A2").await, LocalTrust::Verified);
    assert_eq!(local_trust(&a2, "A1").await, LocalTrust::Verified);
    // A1 MACed the master key it trusts: A2 now trusts our identity.
    assert_eq!(a2.machine.own_identity_state().await.unwrap(), Some(OwnIdentityTrust::Verified));
    assert_eq!(
        a2.machine.device_trust(&uid("@alice:hs"), &did("A1")).await.unwrap(),
        Some(DeviceTrust::LocallyVerified)
    );
    // A1 held the SSK: it signed A2 and uploaded the signature; after the
    // re-query A2 is cross-signed for everyone, e.g. Bob.
    pump(&[&a1, &a2, &bob], 1).await;
    assert_eq!(
        a1.machine.device_trust(&uid("@alice:hs"), &did("A2")).await.unwrap(),
        Some(DeviceTrust::LocallyVerified)
    );
    bob.machine.update_tracked_users([uid("@alice:hs")]).await.unwrap();
    bob.flush().await.unwrap();
    assert_eq!(
        bob.machine.device_trust(&uid("@alice:hs"), &did("A2")).await.unwrap(),
        Some(DeviceTrust::CrossSignedByPinnedOwner)
    );

    // Key forwarding follows verification: A1 asks, A2 answers, A1 decrypts.
    a1.machine.request_room_key(&room, &event).await.unwrap();
    a1.flush().await.unwrap();
    pump(&[&a2, &a1], 1).await;
    let decrypted = a1.decrypt(&room, &event).await.unwrap();
    assert_eq!(decrypted.content["body"], "for verified devices");
}

/// What `d` would send now: the event types of its to-device requests
/// (anything else by its debug form).
async fn pending_types(d: &SimDevice) -> Vec<String> {
    let sent = d.machine.outgoing_requests().await.unwrap();
    sent.iter()
        .map(|r| match &r.kind {
            RequestKind::ToDevice { event_type, .. } => event_type.clone(),
            other => format!("{other:?}"),
        })
        .collect()
}

/// A2's last step (A1's `done`, which finishes the flow and records A1 as
/// verified) fails, either at the commit or at a store read before it: the
/// sync fails, A2 sends neither a signature upload nor anything else but a
/// cancel, records nothing, and the same sync delivered again changes
/// nothing (the flow stays cancelled).
#[tokio::test]
async fn a_finished_flow_that_cannot_be_stored_is_cancelled() {
    for fail_reads in [false, true] {
        let router = Arc::new(Router::new());
        let a1 = dev(&router, "@alice:hs", "A1").await;
        let (a2, flaky) = flaky_dev(&router, "@alice:hs", "A2").await;
        settle(&[&a1, &a2], &[uid("@alice:hs")]).await;
        let flow = request_and_start(&a1, &a2).await;
        pump(&[&a2, &a1], 2).await;
        a1.machine.confirm_sas(&flow).await.unwrap();
        a1.flush().await.unwrap();
        a2.sync().await.unwrap(); // A1's MAC
        a2.machine.confirm_sas(&flow).await.unwrap();
        a2.flush().await.unwrap();
        a1.sync().await.unwrap(); // A2's MAC: A1 is done and sends `done`
        assert_eq!(state(&a1, &flow).await, VerificationState::Done);
        assert_eq!(state(&a2, &flow).await, VerificationState::Confirmed);

        let sync = a2.next_sync().unwrap();
        let switch = if fail_reads { &flaky.fail_reads } else { &flaky.fail };
        switch.store(true, std::sync::atomic::Ordering::SeqCst);
        let result = a2.machine.receive_sync(sync.clone()).await;
        switch.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(result, Err(newt::Error::Store(_))), "{result:?}");
        let custom = CancelCode::Other(newt::STORE_FAILURE.to_owned());
        let cancelled = VerificationState::Cancelled { code: custom, by_us: true };
        assert_eq!(state(&a2, &flow).await, cancelled);
        assert_eq!(local_trust(&a2, "A1").await, LocalTrust::Unset);
        assert_eq!(pending_types(&a2).await, ["m.key.verification.cancel"]);

        // The same sync again (its token was not stored): the flow is over.
        a2.machine.receive_sync(sync).await.unwrap();
        assert_eq!(state(&a2, &flow).await, cancelled);
        assert_eq!(local_trust(&a2, "A1").await, LocalTrust::Unset);
    }
}

/// A sync that moves a flow without changing its public state (their
/// `accept` makes us send our key; both are "started") fails to commit: the
/// key is not sent, and the flow is cancelled rather than left waiting for
/// a key that never went out.
#[tokio::test]
async fn a_step_that_cannot_be_stored_is_cancelled_even_when_the_state_looks_the_same() {
    let router = Arc::new(Router::new());
    let (a1, flaky) = flaky_dev(&router, "@alice:hs", "A1").await;
    let a2 = dev(&router, "@alice:hs", "A2").await;
    settle(&[&a1, &a2], &[uid("@alice:hs")]).await;
    let flow = request_and_start(&a1, &a2).await;
    a2.sync().await.unwrap(); // start -> A2 accepts
    assert_eq!(state(&a1, &flow).await, VerificationState::Started);
    let sync = a1.next_sync().unwrap();
    // Something else in the same sync must be written, or the commit is empty.
    let mut sync_with_token = sync.clone();
    sync_with_token.next_batch = Some("next".into());
    flaky.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let result = a1.machine.receive_sync(sync_with_token).await;
    flaky.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(result, Err(newt::Error::Store(_))), "{result:?}");
    let custom = CancelCode::Other(newt::STORE_FAILURE.to_owned());
    assert_eq!(state(&a1, &flow).await, VerificationState::Cancelled { code: custom, by_us: true });
    assert_eq!(pending_types(&a1).await, ["m.key.verification.cancel"]);
}

/// A user action whose store read fails (accepting a request reads the
/// other device's keys) fails, sends nothing and leaves the flow as it was:
/// accepting again works, and the flow goes on to the end.
#[tokio::test]
async fn an_action_whose_store_read_fails_leaves_the_flow_to_retry() {
    let router = Arc::new(Router::new());
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let (a2, flaky) = flaky_dev(&router, "@alice:hs", "A2").await;
    settle(&[&a1, &a2], &[uid("@alice:hs")]).await;
    let (flow, request) =
        a1.machine.request_verification(&uid("@alice:hs"), &did("A2")).await.unwrap();
    a1.send(&request).await.unwrap();
    a2.sync().await.unwrap();
    assert_eq!(state(&a2, &flow).await, VerificationState::RequestReceived);

    flaky.fail_reads.store(true, std::sync::atomic::Ordering::SeqCst);
    let result = a2.machine.accept_verification(&flow).await;
    flaky.fail_reads.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(result, Err(newt::Error::Store(_))), "{result:?}");
    assert_eq!(state(&a2, &flow).await, VerificationState::RequestReceived);
    assert_eq!(pending_types(&a2).await, Vec::<String>::new());

    a2.machine.accept_verification(&flow).await.unwrap();
    a2.flush().await.unwrap();
    a1.sync().await.unwrap();
    assert_eq!(state(&a1, &flow).await, VerificationState::Ready);
    a1.machine.start_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();
    pump(&[&a2, &a1], 2).await;
    assert_eq!(a1.machine.sas_emoji(&flow).await, a2.machine.sas_emoji(&flow).await);
    for d in [&a1, &a2] {
        d.machine.confirm_sas(&flow).await.unwrap();
        d.flush().await.unwrap();
    }
    pump(&[&a1, &a2], 2).await;
    assert_eq!(state(&a1, &flow).await, VerificationState::Done);
    assert_eq!(state(&a2, &flow).await, VerificationState::Done);
    assert_eq!(local_trust(&a2, "A1").await, LocalTrust::Verified);
}

/// Sends `d`'s outgoing requests, replacing the `key` of any
/// `m.key.verification.key` with a fresh one.
async fn flush_swapping_key(d: &SimDevice) -> bool {
    let mut swapped = false;
    for mut r in d.machine.outgoing_requests().await.unwrap() {
        if let RequestKind::ToDevice { event_type, body, .. } = &mut r.kind {
            if event_type == "m.key.verification.key" {
                for per_user in body["messages"].as_object_mut().unwrap().values_mut() {
                    for content in per_user.as_object_mut().unwrap().values_mut() {
                        content["key"] = json!(Sas::new().public_key().to_base64());
                        swapped = true;
                    }
                }
            }
        }
        d.send(&r).await.unwrap();
    }
    swapped
}

async fn nothing_verified(a1: &SimDevice, a2: &SimDevice) {
    assert_eq!(local_trust(a1, "A2").await, LocalTrust::Unset);
    assert_eq!(local_trust(a2, "A1").await, LocalTrust::Unset);
    assert_eq!(a2.machine.own_identity_state().await.unwrap(), Some(OwnIdentityTrust::Unverified));
}

#[tokio::test]
async fn swapped_key_of_the_accepting_side_breaks_the_commitment() {
    let (_router, a1, a2) = alice_pair().await;
    let flow = request_and_start(&a1, &a2).await;
    a2.sync().await.unwrap(); // start -> accept
    a1.sync().await.unwrap(); // accept -> A1's key
                              // A2 answers with its key; the man in the middle replaces it.
    let changes = a2.next_sync().unwrap();
    a2.machine.receive_sync(changes).await.unwrap();
    assert!(flush_swapping_key(&a2).await);
    pump(&[&a1, &a2], 2).await;
    assert_eq!(
        state(&a1, &flow).await,
        VerificationState::Cancelled { code: CancelCode::MismatchedCommitment, by_us: true }
    );
    assert_eq!(
        state(&a2, &flow).await,
        VerificationState::Cancelled { code: CancelCode::MismatchedCommitment, by_us: false }
    );
    nothing_verified(&a1, &a2).await;
}

#[tokio::test]
async fn swapped_key_of_the_starting_side_fails_the_macs() {
    let (_router, a1, a2) = alice_pair().await;
    let flow = request_and_start(&a1, &a2).await;
    a2.sync().await.unwrap(); // start -> accept
                              // A1 sends its key; the man in the middle replaces it.
    let changes = a1.next_sync().unwrap();
    a1.machine.receive_sync(changes).await.unwrap();
    assert!(flush_swapping_key(&a1).await);
    pump(&[&a2, &a1], 1).await;
    // Both can show a SAS, but they differ; careless users confirm anyway.
    assert_ne!(a1.machine.sas_emoji(&flow).await, a2.machine.sas_emoji(&flow).await);
    a1.machine.confirm_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();
    a2.machine.confirm_sas(&flow).await.unwrap();
    a2.flush().await.unwrap();
    pump(&[&a1, &a2], 2).await;
    for d in [&a1, &a2] {
        match state(d, &flow).await {
            VerificationState::Cancelled { code, .. } => assert_eq!(code, CancelCode::KeyMismatch),
            other => panic!("expected a cancel, got {other:?}"),
        }
    }
    nothing_verified(&a1, &a2).await;
}

#[tokio::test]
async fn a_mismatch_reported_by_the_user_cancels() {
    let (_router, a1, a2) = alice_pair().await;
    let flow = request_and_start(&a1, &a2).await;
    pump(&[&a2, &a1], 2).await;
    assert_eq!(state(&a2, &flow).await, VerificationState::KeysExchanged);
    a2.machine.sas_mismatch(&flow).await.unwrap();
    a2.flush().await.unwrap();
    a1.sync().await.unwrap();
    assert_eq!(
        state(&a2, &flow).await,
        VerificationState::Cancelled { code: CancelCode::MismatchedSas, by_us: true }
    );
    assert_eq!(
        state(&a1, &flow).await,
        VerificationState::Cancelled { code: CancelCode::MismatchedSas, by_us: false }
    );
    // Too late to confirm.
    assert!(a1.machine.confirm_sas(&flow).await.is_err());
    nothing_verified(&a1, &a2).await;
}

#[tokio::test]
async fn cancelled_requests_and_unknown_devices() {
    let (_router, a1, a2) = alice_pair().await;
    assert!(a1.machine.request_verification(&uid("@alice:hs"), &did("NOPE")).await.is_err());
    let (flow, request) =
        a1.machine.request_verification(&uid("@alice:hs"), &did("A2")).await.unwrap();
    a1.send(&request).await.unwrap();
    a2.sync().await.unwrap();
    a2.machine.cancel_verification(&flow).await.unwrap();
    a2.flush().await.unwrap();
    a1.sync().await.unwrap();
    assert_eq!(
        state(&a1, &flow).await,
        VerificationState::Cancelled { code: CancelCode::User, by_us: false }
    );
    assert!(a1.machine.start_sas(&flow).await.is_err());
    assert!(a2.machine.verification_flows().await.is_empty());

    // A request older than ten minutes, or without m.sas.v1, is ignored.
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as u64;
    for (txn, ts, methods) in [
        ("old", now - 11 * 60 * 1000, json!(["m.sas.v1"])),
        ("qr", now, json!(["m.qr_code.show.v1"])),
    ] {
        let content = json!({"from_device": "A1", "methods": methods, "timestamp": ts,
            "transaction_id": txn});
        a1.router()
            .handle(
                "@alice:hs",
                "A1",
                "PUT",
                &format!("/sendToDevice/m.key.verification.request/{txn}"),
                &json!({"messages": {"@alice:hs": {"A2": content}}}),
            )
            .unwrap();
    }
    a2.sync().await.unwrap();
    assert!(a2.machine.verification_flows().await.is_empty());
}

#[tokio::test]
async fn users_verify_each_other_and_sign_the_other_master_key() {
    let router = Arc::new(Router::new());
    let mut devices = cross_signed(&router, &[("@alice:hs", "A1"), ("@bob:hs", "B")]).await;
    let b = devices.pop().unwrap();
    let a1 = devices.pop().unwrap();
    assert_eq!(
        a1.machine.user_identity_state(&uid("@bob:hs")).await.unwrap(),
        Some(newt::IdentityTrust::Pinned)
    );

    let (flow, request) =
        b.machine.request_verification(&uid("@alice:hs"), &did("A1")).await.unwrap();
    b.send(&request).await.unwrap();
    a1.sync().await.unwrap();
    a1.machine.accept_verification(&flow).await.unwrap();
    a1.flush().await.unwrap();
    b.sync().await.unwrap();
    b.machine.start_sas(&flow).await.unwrap();
    b.flush().await.unwrap();
    pump(&[&a1, &b], 2).await;
    assert_eq!(a1.machine.sas_emoji(&flow).await, b.machine.sas_emoji(&flow).await);
    assert!(a1.machine.sas_emoji(&flow).await.is_some());
    a1.machine.confirm_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();
    b.machine.confirm_sas(&flow).await.unwrap();
    b.flush().await.unwrap();
    pump(&[&a1, &b], 3).await;
    assert_eq!(state(&a1, &flow).await, VerificationState::Done);
    assert_eq!(state(&b, &flow).await, VerificationState::Done);

    // Each signed the other's master key with its USK (uploaded, re-queried).
    assert_eq!(
        a1.machine.user_identity_state(&uid("@bob:hs")).await.unwrap(),
        Some(newt::IdentityTrust::Verified)
    );
    assert_eq!(
        b.machine.user_identity_state(&uid("@alice:hs")).await.unwrap(),
        Some(newt::IdentityTrust::Verified)
    );
    assert_eq!(
        a1.machine.device_trust(&uid("@bob:hs"), &did("B")).await.unwrap(),
        Some(DeviceTrust::LocallyVerified)
    );
}
