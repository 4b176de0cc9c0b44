//! Verification transports and methods beyond to-device SAS with one
//! device, between newt devices through the in-process router: SAS in an
//! encrypted room between two users, QR codes in all three modes (in a
//! room and to-device), a request fanned out to all our devices (the
//! others get `m.accepted`), and `m.unknown_transaction` for a flow we do
//! not know.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use newt_test_support::*;

use std::sync::Arc;

use newt::{
    CancelCode, DeviceTrust, IdentityTrust, OwnIdentityTrust, RequestKind, RoomId, RoomSettings,
    ScanError, VerificationState,
};
use newt_router::Router;
use serde_json::json;

async fn state(d: &SimDevice, flow: &str) -> VerificationState {
    d.machine.verification_state(flow).await.unwrap()
}

/// A device's view of a room: feeds it every room event it has not seen
/// (its own echoes included, as a real timeline does) and sends what the
/// flows queued.
struct Timeline<'a> {
    device: &'a SimDevice,
    room: RoomId,
    seen: usize,
}

impl<'a> Timeline<'a> {
    fn new(device: &'a SimDevice, room: &RoomId) -> Self {
        let seen = device.router().room_events(room.as_str()).unwrap().len();
        Self { device, room: room.clone(), seen }
    }

    async fn catch_up(&mut self) {
        let events = self.device.router().room_events(self.room.as_str()).unwrap();
        for e in &events[self.seen..] {
            self.device.machine.receive_room_verification_event(&self.room, e).await.unwrap();
        }
        self.seen = events.len();
        self.device.flush().await.unwrap();
    }
}

/// Alice (A1) and Bob (B), both with cross-signing, sharing the encrypted
/// room `!dm:hs` (both sent their room keys).
async fn alice_and_bob() -> (Arc<Router>, SimDevice, SimDevice, RoomId) {
    let router = Arc::new(Router::new());
    let mut devices = cross_signed(&router, &[("@alice:hs", "A1"), ("@bob:hs", "B")]).await;
    let room = share_dm(&devices.iter().collect::<Vec<_>>()).await;
    let b = devices.pop().unwrap();
    let a1 = devices.pop().unwrap();
    assert_eq!(
        a1.machine.user_identity_state(&uid("@bob:hs")).await.unwrap(),
        Some(IdentityTrust::Pinned)
    );
    (router, a1, b, room)
}

/// Every device sends its room key for `!dm:hs` to every member; then all
/// sync.
async fn share_dm(devices: &[&SimDevice]) -> RoomId {
    let room = RoomId::parse("!dm:hs").unwrap();
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    for d in devices {
        d.share_room_key(&room, &users, &RoomSettings::default()).await.unwrap();
    }
    for d in devices {
        d.sync().await.unwrap();
    }
    room
}

/// Alice asks Bob in the room; Bob accepts; both are ready. Returns the
/// flow ID (the request's event ID).
async fn in_room_ready(
    a1: &SimDevice,
    b: &SimDevice,
    room: &RoomId,
    ta: &mut Timeline<'_>,
    tb: &mut Timeline<'_>,
) -> String {
    let content = a1.machine.room_verification_request_content(&uid("@bob:hs")).await;
    assert_eq!(content["msgtype"], "m.key.verification.request");
    assert_eq!(content["to"], "@bob:hs");
    let event = a1.send_event(room, "m.room.message", content).await.unwrap();
    assert_eq!(event["type"], "m.room.encrypted", "the request goes encrypted");
    let flow = event["event_id"].as_str().unwrap().to_owned();
    a1.machine.room_verification_request_sent(room, &flow, &uid("@bob:hs")).await.unwrap();
    assert_eq!(state(a1, &flow).await, VerificationState::Requested);
    tb.catch_up().await;
    let flows = b.machine.verification_flows().await;
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].flow_id, flow);
    assert_eq!(flows[0].room_id.as_ref(), Some(room));
    assert_eq!(flows[0].other_device.as_ref(), Some(&did("A1")));
    b.machine.accept_verification(&flow).await.unwrap();
    // The ready goes out as an in-room message.
    let queued = b.machine.outgoing_requests().await.unwrap();
    assert!(queued.iter().any(|r| matches!(&r.kind,
        RequestKind::RoomMessage { event_type, body, .. }
            if event_type == "m.key.verification.ready"
                && body["m.relates_to"] == json!({"rel_type": "m.reference", "event_id": flow}))));
    for r in &queued {
        b.send(r).await.unwrap();
    }
    ta.catch_up().await;
    assert_eq!(state(a1, &flow).await, VerificationState::Ready);
    assert_eq!(state(b, &flow).await, VerificationState::Ready);
    flow
}

/// [`in_room_ready`], then Alice starts SAS and both exchange keys.
async fn in_room_keys_exchanged(
    a1: &SimDevice,
    b: &SimDevice,
    room: &RoomId,
    ta: &mut Timeline<'_>,
    tb: &mut Timeline<'_>,
) -> String {
    let flow = in_room_ready(a1, b, room, ta, tb).await;
    a1.machine.start_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();
    for _ in 0..3 {
        tb.catch_up().await;
        ta.catch_up().await;
    }
    assert_eq!(state(a1, &flow).await, VerificationState::KeysExchanged);
    assert_eq!(state(b, &flow).await, VerificationState::KeysExchanged);
    flow
}

async fn identities_verified_both_ways(a1: &SimDevice, b: &SimDevice) {
    for _ in 0..2 {
        a1.sync().await.unwrap();
        b.sync().await.unwrap();
    }
    assert_eq!(
        a1.machine.user_identity_state(&uid("@bob:hs")).await.unwrap(),
        Some(IdentityTrust::Verified)
    );
    assert_eq!(
        b.machine.user_identity_state(&uid("@alice:hs")).await.unwrap(),
        Some(IdentityTrust::Verified)
    );
    // Bob's device is cross-signed by a now verified identity.
    assert!(matches!(
        a1.machine.device_trust(&uid("@bob:hs"), &did("B")).await.unwrap(),
        Some(DeviceTrust::CrossSignedByVerifiedOwner | DeviceTrust::LocallyVerified)
    ));
}

#[tokio::test]
async fn sas_in_a_room_between_two_users() {
    let (_router, a1, b, room) = alice_and_bob().await;
    let mut ta = Timeline::new(&a1, &room);
    let mut tb = Timeline::new(&b, &room);
    let flow = in_room_keys_exchanged(&a1, &b, &room, &mut ta, &mut tb).await;
    let emoji = a1.machine.sas_emoji(&flow).await;
    assert!(emoji.is_some());
    assert_eq!(emoji, b.machine.sas_emoji(&flow).await);
    a1.machine.confirm_sas(&flow).await.unwrap();
    b.machine.confirm_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();
    b.flush().await.unwrap();
    for _ in 0..3 {
        ta.catch_up().await;
        tb.catch_up().await;
    }
    assert_eq!(state(&a1, &flow).await, VerificationState::Done);
    assert_eq!(state(&b, &flow).await, VerificationState::Done);
    identities_verified_both_ways(&a1, &b).await;
}

/// Bob's last step in a room (Alice's `done`, which finishes his side and
/// records her identity as verified) cannot be stored: that event fails,
/// Bob sends a cancel and no signature upload, and trusts nothing, even
/// after a sync. The decryption of each event (its replay record) is let
/// through, so that the flow's own commit is the one that fails.
#[tokio::test]
async fn an_in_room_step_that_cannot_be_stored_is_cancelled() {
    use std::sync::atomic::Ordering::SeqCst;
    let router = Arc::new(Router::new());
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let (b, flaky) = flaky_dev(&router, "@bob:hs", "B").await;
    let users = [uid("@alice:hs"), uid("@bob:hs")];
    settle(&[&a1, &b], &users).await;
    bootstrap(&a1).await;
    bootstrap(&b).await;
    settle(&[&a1, &b], &users).await;
    let room = share_dm(&[&a1, &b]).await;
    let mut ta = Timeline::new(&a1, &room);
    let mut tb = Timeline::new(&b, &room);
    let flow = in_room_keys_exchanged(&a1, &b, &room, &mut ta, &mut tb).await;
    // Bob confirms first; Alice sees his MAC and confirms.
    b.machine.confirm_sas(&flow).await.unwrap();
    b.flush().await.unwrap();
    ta.catch_up().await;
    a1.machine.confirm_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();

    // Bob reads Alice's messages with every flow commit failing, until one
    // fails; Alice answers in between.
    let mut failed = Vec::new();
    for _ in 0..4 {
        let events = router.room_events(room.as_str()).unwrap();
        for (i, event) in events.iter().enumerate().skip(tb.seen) {
            flaky.pass.store(1, SeqCst);
            flaky.fail.store(true, SeqCst);
            let result = b.machine.receive_room_verification_event(&room, event).await;
            flaky.fail.store(false, SeqCst);
            tb.seen = i + 1;
            match result {
                Ok(()) => {}
                Err(newt::Error::Store(_)) => failed.push(i),
                Err(e) => panic!("event {i}: {e:?}"),
            }
        }
        if !failed.is_empty() {
            break;
        }
        b.flush().await.unwrap();
        ta.catch_up().await;
    }
    assert_eq!(failed.len(), 1, "exactly the finishing step fails: {failed:?}");
    let custom = CancelCode::Other(newt::STORE_FAILURE.to_owned());
    let cancelled = VerificationState::Cancelled { code: custom.clone(), by_us: true };
    assert_eq!(state(&b, &flow).await, cancelled);
    assert_eq!(
        b.machine.user_identity_state(&uid("@alice:hs")).await.unwrap(),
        Some(IdentityTrust::Pinned)
    );
    let sent = b.machine.outgoing_requests().await.unwrap();
    let kinds: Vec<String> = sent
        .iter()
        .map(|r| match &r.kind {
            RequestKind::RoomMessage { event_type, .. } => event_type.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    // Alice's MAC (checked, nothing to store) had Bob queue his `done`
    // before her `done` failed; that step returned Ok, so its `done` stays.
    // Nothing of the failed step goes out but the cancel.
    assert_eq!(kinds, ["m.key.verification.done", "m.key.verification.cancel"]);
    for r in &sent {
        b.send(r).await.unwrap();
    }
    ta.catch_up().await;
    // Alice finishes on Bob's `done` (she checked his MAC, his user
    // confirmed); his cancel comes after it and changes nothing.
    assert_eq!(state(&a1, &flow).await, VerificationState::Done);
    // Bob's view of Alice is unchanged after a sync too.
    b.sync().await.unwrap();
    assert_eq!(
        b.machine.user_identity_state(&uid("@alice:hs")).await.unwrap(),
        Some(IdentityTrust::Pinned)
    );
}

#[tokio::test]
async fn qr_in_a_room_between_two_users() {
    let (_router, a1, b, room) = alice_and_bob().await;
    let mut ta = Timeline::new(&a1, &room);
    let mut tb = Timeline::new(&b, &room);
    let flow = in_room_ready(&a1, &b, &room, &mut ta, &mut tb).await;
    let code = a1.machine.qr_code(&flow).await.unwrap().expect("Alice can show a code");
    assert_eq!(&code[..6], b"MATRIX");
    assert_eq!(code[7], 0x00, "mode: verifying another user");
    assert_eq!(a1.machine.qr_code(&flow).await.unwrap(), Some(code.clone()), "stable");
    // A code of another flow is refused without touching this one.
    let mut other = code.clone();
    other[10] ^= 1;
    assert!(matches!(
        b.machine.scan_qr_code(&flow, &other).await,
        Err(newt::Error::QrScan(ScanError::OtherFlow { .. }))
    ));
    assert_eq!(state(&b, &flow).await, VerificationState::Ready);
    b.machine.scan_qr_code(&flow, &code).await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(state(&b, &flow).await, VerificationState::Confirmed);
    ta.catch_up().await;
    assert_eq!(state(&a1, &flow).await, VerificationState::QrScanned);
    a1.machine.confirm_qr_scanned(&flow).await.unwrap();
    a1.flush().await.unwrap();
    tb.catch_up().await;
    ta.catch_up().await;
    assert_eq!(state(&a1, &flow).await, VerificationState::Done);
    assert_eq!(state(&b, &flow).await, VerificationState::Done);
    identities_verified_both_ways(&a1, &b).await;
}

#[tokio::test]
async fn a_qr_code_with_a_foreign_key_cancels_with_key_mismatch() {
    let (_router, a1, b, room) = alice_and_bob().await;
    let mut ta = Timeline::new(&a1, &room);
    let mut tb = Timeline::new(&b, &room);
    let flow = in_room_ready(&a1, &b, &room, &mut ta, &mut tb).await;
    let mut code = a1.machine.qr_code(&flow).await.unwrap().unwrap();
    // Flip a bit of the first key (Alice's master key, as Bob would check it).
    let first_key_at = 10 + flow.len();
    code[first_key_at] ^= 0x40;
    b.machine.scan_qr_code(&flow, &code).await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(
        state(&b, &flow).await,
        VerificationState::Cancelled { code: CancelCode::KeyMismatch, by_us: true }
    );
    ta.catch_up().await;
    assert_eq!(
        state(&a1, &flow).await,
        VerificationState::Cancelled { code: CancelCode::KeyMismatch, by_us: false }
    );
    // Nothing was signed.
    a1.sync().await.unwrap();
    b.sync().await.unwrap();
    assert_eq!(
        b.machine.user_identity_state(&uid("@alice:hs")).await.unwrap(),
        Some(IdentityTrust::Pinned)
    );
}

/// `from` requests, `to` accepts over to-device: both ready.
async fn to_device_ready(from: &SimDevice, to: &SimDevice) -> String {
    let (flow, request) = from.machine.request_verification(&to.user, &to.device).await.unwrap();
    from.send(&request).await.unwrap();
    to.sync().await.unwrap();
    to.machine.accept_verification(&flow).await.unwrap();
    to.flush().await.unwrap();
    from.sync().await.unwrap();
    assert_eq!(state(from, &flow).await, VerificationState::Ready);
    flow
}

/// `shower` shows, `scanner` scans, both finish.
async fn show_and_scan(shower: &SimDevice, scanner: &SimDevice, flow: &str, mode: u8) {
    let code = shower.machine.qr_code(flow).await.unwrap().expect("a code to show");
    assert_eq!(code[7], mode);
    scanner.machine.scan_qr_code(flow, &code).await.unwrap();
    scanner.flush().await.unwrap();
    shower.sync().await.unwrap();
    assert_eq!(state(shower, flow).await, VerificationState::QrScanned);
    shower.machine.confirm_qr_scanned(flow).await.unwrap();
    shower.flush().await.unwrap();
    scanner.sync().await.unwrap();
    shower.sync().await.unwrap();
    assert_eq!(state(shower, flow).await, VerificationState::Done);
    assert_eq!(state(scanner, flow).await, VerificationState::Done);
    for _ in 0..2 {
        shower.sync().await.unwrap();
        scanner.sync().await.unwrap();
    }
}

async fn new_device_is_trusted_both_ways(a1: &SimDevice, a2: &SimDevice) {
    assert_eq!(a2.machine.own_identity_state().await.unwrap(), Some(OwnIdentityTrust::Verified));
    // A1 verified A2 and signed it with the self-signing key.
    let trust = a1.machine.device_trust(&uid("@alice:hs"), &did("A2")).await.unwrap().unwrap();
    assert!(trust.is_verified(), "{trust:?}");
    assert_eq!(
        a2.machine.device_trust(&uid("@alice:hs"), &did("A1")).await.unwrap(),
        Some(DeviceTrust::CrossSignedByVerifiedOwner)
    );
}

#[tokio::test]
async fn qr_self_verification_trusted_device_shows_mode_1() {
    let (_router, a1, a2) = alice_pair().await;
    let flow = to_device_ready(&a1, &a2).await;
    show_and_scan(&a1, &a2, &flow, 0x01).await;
    new_device_is_trusted_both_ways(&a1, &a2).await;
}

#[tokio::test]
async fn qr_self_verification_new_device_shows_mode_2() {
    let (_router, a1, a2) = alice_pair().await;
    let flow = to_device_ready(&a2, &a1).await;
    show_and_scan(&a2, &a1, &flow, 0x02).await;
    new_device_is_trusted_both_ways(&a1, &a2).await;
}

#[tokio::test]
async fn a_request_to_all_own_devices_is_taken_by_the_first_to_answer() {
    let router = Arc::new(Router::new());
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let a2 = dev(&router, "@alice:hs", "A2").await;
    let a3 = dev(&router, "@alice:hs", "A3").await;
    settle(&[&a1, &a2, &a3], &[uid("@alice:hs")]).await;
    settle(&[&a1, &a2, &a3], &[uid("@alice:hs")]).await;
    let (flow, request) = a1.machine.request_own_verification().await.unwrap();
    a1.send(&request).await.unwrap();
    a2.sync().await.unwrap();
    a3.sync().await.unwrap();
    assert_eq!(state(&a2, &flow).await, VerificationState::RequestReceived);
    assert_eq!(state(&a3, &flow).await, VerificationState::RequestReceived);
    a2.machine.accept_verification(&flow).await.unwrap();
    a2.flush().await.unwrap();
    a1.sync().await.unwrap();
    assert_eq!(state(&a1, &flow).await, VerificationState::Ready);
    let flows = a1.machine.verification_flows().await;
    assert_eq!(flows[0].other_device.as_ref(), Some(&did("A2")));
    a3.sync().await.unwrap();
    assert_eq!(
        state(&a3, &flow).await,
        VerificationState::Cancelled { code: CancelCode::Accepted, by_us: false }
    );
    // A3 can no longer take part; A1 and A2 carry on.
    assert!(a3.machine.accept_verification(&flow).await.is_err());
    a1.machine.start_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();
    for _ in 0..2 {
        a2.sync().await.unwrap();
        a1.sync().await.unwrap();
    }
    assert_eq!(state(&a1, &flow).await, VerificationState::KeysExchanged);
    assert_eq!(state(&a2, &flow).await, VerificationState::KeysExchanged);
}

#[tokio::test]
async fn a_start_for_an_unknown_flow_is_answered_with_unknown_transaction() {
    let router = Arc::new(Router::new());
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let a2 = dev(&router, "@alice:hs", "A2").await;
    settle(&[&a1, &a2], &[uid("@alice:hs")]).await;
    a1.sync().await.unwrap();
    let start = json!({
        "transaction_id": "nobody-knows", "from_device": "A1", "method": "m.sas.v1",
        "key_agreement_protocols": ["curve25519-hkdf-sha256"], "hashes": ["sha256"],
        "message_authentication_codes": ["hkdf-hmac-sha256.v2"],
        "short_authentication_string": ["decimal"],
    });
    router
        .handle(
            "@alice:hs",
            "A1",
            "PUT",
            "/sendToDevice/m.key.verification.start/t1",
            &json!({"messages": {"@alice:hs": {"A2": start}}}),
        )
        .unwrap();
    a2.sync().await.unwrap();
    let batch = a1.next_sync().unwrap();
    let cancel = batch
        .to_device_events
        .iter()
        .find(|e| e["type"] == "m.key.verification.cancel")
        .expect("A2 answered with a cancel");
    assert_eq!(cancel["content"]["code"], "m.unknown_transaction");
    assert_eq!(cancel["content"]["transaction_id"], "nobody-knows");
    // A cancel for an unknown flow is never answered.
    let bogus_cancel = json!({"transaction_id": "other", "code": "m.user", "reason": "x"});
    router
        .handle(
            "@alice:hs",
            "A1",
            "PUT",
            "/sendToDevice/m.key.verification.cancel/t2",
            &json!({"messages": {"@alice:hs": {"A2": bogus_cancel}}}),
        )
        .unwrap();
    a2.sync().await.unwrap();
    assert!(a1.next_sync().unwrap().to_device_events.is_empty());
}

/// Bob's master key changes while a SAS flow runs (a reset, or a server
/// swapping keys): the MACs cover the keys fixed at the start, so Alice
/// verifies Bob's device but signs no master key: not the new one (never
/// MACed) and not the old one (no longer Bob's).
#[tokio::test]
async fn a_master_key_replaced_mid_flow_is_never_signed() {
    let (router, a1, b, _room) = alice_and_bob().await;
    let flow = to_device_ready(&a1, &b).await;
    a1.machine.start_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();
    for _ in 0..2 {
        b.sync().await.unwrap();
        a1.sync().await.unwrap();
    }
    assert_eq!(state(&a1, &flow).await, VerificationState::KeysExchanged);
    // Bob's identity is replaced; Alice learns it before confirming.
    bootstrap(&b).await;
    a1.sync().await.unwrap();
    a1.flush().await.unwrap();
    assert_eq!(
        a1.machine.user_identity_state(&uid("@bob:hs")).await.unwrap(),
        Some(IdentityTrust::PinnedChanged)
    );
    // From here on, every request Alice sends is inspected.
    async fn send_checked(d: &SimDevice) {
        loop {
            let requests = d.machine.outgoing_requests().await.unwrap();
            if requests.is_empty() {
                return;
            }
            for r in &requests {
                assert!(
                    !matches!(r.kind, RequestKind::SignaturesUpload { .. }),
                    "no signature is uploaded for a master key outside the MACed set: {r:?}"
                );
                d.send(r).await.unwrap();
            }
        }
    }
    a1.machine.confirm_sas(&flow).await.unwrap();
    send_checked(&a1).await;
    b.machine.confirm_sas(&flow).await.unwrap();
    b.flush().await.unwrap();
    b.sync().await.unwrap();
    for _ in 0..2 {
        a1.machine.receive_sync(a1.next_sync().unwrap()).await.unwrap();
        send_checked(&a1).await;
        b.sync().await.unwrap();
    }
    assert_eq!(state(&a1, &flow).await, VerificationState::Done);
    assert_eq!(state(&b, &flow).await, VerificationState::Done);
    a1.sync().await.unwrap();
    assert_ne!(
        a1.machine.user_identity_state(&uid("@bob:hs")).await.unwrap(),
        Some(IdentityTrust::Verified)
    );
    // No signature by Alice on any master key of Bob reached the server.
    let q = router
        .handle("@alice:hs", "A1", "POST", "/keys/query", &json!({"device_keys": {"@bob:hs": []}}))
        .unwrap();
    let sigs = &q["master_keys"]["@bob:hs"]["signatures"];
    assert!(sigs.get("@alice:hs").is_none(), "{sigs}");
    // The device key was MACed and checked: the device is verified.
    assert_eq!(
        a1.machine.device_trust(&uid("@bob:hs"), &did("B")).await.unwrap(),
        Some(DeviceTrust::LocallyVerified)
    );
}

/// Alice asks Bob in a room; Bob has two devices; when one answers, the
/// other sees its `ready` in the room and drops the request (`m.accepted`).
#[tokio::test]
async fn an_in_room_request_answered_by_another_of_our_devices_is_taken() {
    let router = Arc::new(Router::new());
    let devices =
        cross_signed(&router, &[("@alice:hs", "A1"), ("@bob:hs", "B"), ("@bob:hs", "B2")]).await;
    let room = share_dm(&devices.iter().collect::<Vec<_>>()).await;
    let [a1, b, b2] = &devices[..] else { unreachable!() };
    let (a1, b, b2) = (a1.clone(), b.clone(), b2.clone());
    let (mut ta, mut tb, mut tb2) =
        (Timeline::new(&a1, &room), Timeline::new(&b, &room), Timeline::new(&b2, &room));
    let content = a1.machine.room_verification_request_content(&uid("@bob:hs")).await;
    let event = a1.send_event(&room, "m.room.message", content).await.unwrap();
    let flow = event["event_id"].as_str().unwrap().to_owned();
    a1.machine.room_verification_request_sent(&room, &flow, &uid("@bob:hs")).await.unwrap();
    tb.catch_up().await;
    tb2.catch_up().await;
    assert_eq!(state(&b2, &flow).await, VerificationState::RequestReceived);
    b.machine.accept_verification(&flow).await.unwrap();
    b.flush().await.unwrap();
    tb2.catch_up().await;
    assert_eq!(
        state(&b2, &flow).await,
        VerificationState::Cancelled { code: CancelCode::Accepted, by_us: false }
    );
    assert!(b2.machine.accept_verification(&flow).await.is_err());
    ta.catch_up().await;
    assert_eq!(state(&a1, &flow).await, VerificationState::Ready);
    let flows = a1.machine.verification_flows().await;
    assert_eq!(flows[0].other_device.as_ref(), Some(&did("B")));
    // Bob's other device cannot interfere with the flow Alice runs with B.
    let cancel = json!({
        "code": "m.user", "reason": "not me",
        "m.relates_to": {"rel_type": "m.reference", "event_id": flow},
    });
    b2.send_event(&room, "m.key.verification.cancel", cancel).await.unwrap();
    ta.catch_up().await;
    assert_eq!(state(&a1, &flow).await, VerificationState::Ready);
}

/// Messages a malicious or confused peer (or server) can inject into an
/// in-room flow are ignored: a to-device message naming the flow, a
/// plaintext event in an encrypted flow, a second delivery of an event, and
/// another user's request reusing the flow ID.
#[tokio::test]
async fn injected_messages_do_not_drive_an_in_room_flow() {
    let (router, a1, b, room) = alice_and_bob().await;
    let mallory = dev(&router, "@mallory:hs", "M").await;
    settle(&[&mallory], &[uid("@alice:hs")]).await;
    let mut ta = Timeline::new(&a1, &room);
    let mut tb = Timeline::new(&b, &room);
    let flow = in_room_ready(&a1, &b, &room, &mut ta, &mut tb).await;

    // A to-device cancel from Bob naming the in-room flow.
    let cancel = json!({"transaction_id": flow, "code": "m.user", "reason": "x",
        "m.relates_to": {"rel_type": "m.reference", "event_id": flow}});
    router
        .handle(
            "@bob:hs",
            "B",
            "PUT",
            "/sendToDevice/m.key.verification.cancel/t1",
            &json!({"messages": {"@alice:hs": {"A1": cancel}}}),
        )
        .unwrap();
    a1.sync().await.unwrap();
    assert_eq!(state(&a1, &flow).await, VerificationState::Ready);

    // A plaintext cancel "from Bob" in a flow whose messages are encrypted.
    router
        .send_room_event(
            room.as_str(),
            "@bob:hs",
            "m.key.verification.cancel",
            json!({"code": "m.user", "reason": "x",
                "m.relates_to": {"rel_type": "m.reference", "event_id": flow}}),
        )
        .unwrap();
    ta.catch_up().await;
    assert_eq!(state(&a1, &flow).await, VerificationState::Ready);

    // Mallory asks Alice to-device, reusing the flow ID: ignored, so the
    // flow ID keeps meaning the flow with Bob.
    let request = json!({"transaction_id": flow, "from_device": "M",
        "methods": ["m.sas.v1"], "timestamp": newt_now()});
    router
        .handle(
            "@mallory:hs",
            "M",
            "PUT",
            "/sendToDevice/m.key.verification.request/t2",
            &json!({"messages": {"@alice:hs": {"A1": request}}}),
        )
        .unwrap();
    a1.sync().await.unwrap();
    let flows = a1.machine.verification_flows().await;
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].other_user, uid("@bob:hs"));

    // The SAS runs; then the whole timeline is delivered again: no effect.
    a1.machine.start_sas(&flow).await.unwrap();
    a1.flush().await.unwrap();
    for _ in 0..3 {
        tb.catch_up().await;
        ta.catch_up().await;
    }
    assert_eq!(state(&a1, &flow).await, VerificationState::KeysExchanged);
    ta.seen = 0;
    ta.catch_up().await;
    assert_eq!(state(&a1, &flow).await, VerificationState::KeysExchanged);
    assert_eq!(state(&b, &flow).await, VerificationState::KeysExchanged);
}

fn newt_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A fanned-out request declined by one device is withdrawn from the
/// others; a `ready` from a device we have not queried yet is not fatal.
#[tokio::test]
async fn a_declined_fan_out_is_withdrawn_from_the_other_devices() {
    let router = Arc::new(Router::new());
    let a1 = dev(&router, "@alice:hs", "A1").await;
    let a2 = dev(&router, "@alice:hs", "A2").await;
    let a3 = dev(&router, "@alice:hs", "A3").await;
    settle(&[&a1, &a2, &a3], &[uid("@alice:hs")]).await;
    settle(&[&a1, &a2, &a3], &[uid("@alice:hs")]).await;
    let (flow, request) = a1.machine.request_own_verification().await.unwrap();
    a1.send(&request).await.unwrap();
    a2.sync().await.unwrap();
    a3.sync().await.unwrap();
    a2.machine.cancel_verification(&flow).await.unwrap();
    a2.flush().await.unwrap();
    a1.sync().await.unwrap();
    assert_eq!(
        state(&a1, &flow).await,
        VerificationState::Cancelled { code: CancelCode::User, by_us: false }
    );
    a3.sync().await.unwrap();
    assert_eq!(
        state(&a3, &flow).await,
        VerificationState::Cancelled { code: CancelCode::User, by_us: false }
    );
}

#[tokio::test]
async fn a_ready_from_an_unknown_device_is_not_fatal() {
    let (router, a1, _b, room) = alice_and_bob().await;
    let content = a1.machine.room_verification_request_content(&uid("@bob:hs")).await;
    let event = a1.send_event(&room, "m.room.message", content).await.unwrap();
    let flow = event["event_id"].as_str().unwrap().to_owned();
    a1.machine.room_verification_request_sent(&room, &flow, &uid("@bob:hs")).await.unwrap();
    let mut ta = Timeline::new(&a1, &room);
    // A plaintext ready naming a device Alice has never seen.
    router
        .send_room_event(
            room.as_str(),
            "@bob:hs",
            "m.key.verification.ready",
            json!({"from_device": "NEWPHONE", "methods": ["m.sas.v1"],
                "m.relates_to": {"rel_type": "m.reference", "event_id": flow}}),
        )
        .unwrap();
    ta.catch_up().await;
    assert_eq!(state(&a1, &flow).await, VerificationState::Requested);
}

#[tokio::test]
async fn methods_follow_what_the_app_can_do() {
    let (_router, a1, b, room) = alice_and_bob().await;
    // Bob's app has no camera and no QR renderer.
    b.machine
        .set_verification_methods(newt::VerificationMethods {
            sas: true,
            show_qr: false,
            scan_qr: false,
        })
        .await;
    let mut ta = Timeline::new(&a1, &room);
    let mut tb = Timeline::new(&b, &room);
    let flow = in_room_ready(&a1, &b, &room, &mut ta, &mut tb).await;
    assert_eq!(a1.machine.qr_code(&flow).await.unwrap(), None, "Bob cannot scan");
    assert_eq!(b.machine.qr_code(&flow).await.unwrap(), None, "Bob cannot show");
    assert!(b.machine.scan_qr_code(&flow, b"MATRIX").await.is_err());
    // SAS is still possible.
    b.machine.start_sas(&flow).await.unwrap();
}

/// Registering an in-room request refuses our own user and a flow ID that
/// is already in use (no second flow may shadow the first).
#[tokio::test]
async fn in_room_request_registration_refuses_bad_input() {
    let (_router, a1, b, room) = alice_and_bob().await;
    let own = a1.machine.room_verification_request_sent(&room, "$x", &uid("@alice:hs")).await;
    assert!(matches!(own, Err(newt::Error::VerificationState(_))), "{own:?}");
    let mut ta = Timeline::new(&a1, &room);
    let mut tb = Timeline::new(&b, &room);
    let flow = in_room_ready(&a1, &b, &room, &mut ta, &mut tb).await;
    let again = a1.machine.room_verification_request_sent(&room, &flow, &uid("@bob:hs")).await;
    assert!(matches!(again, Err(newt::Error::VerificationState(_))), "{again:?}");
    assert_eq!(state(&a1, &flow).await, VerificationState::Ready, "the first flow is untouched");
    assert!(a1.machine.verification_state("$x").await.is_none());
}
