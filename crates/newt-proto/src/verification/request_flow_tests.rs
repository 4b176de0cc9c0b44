//! Request flows driven against each other, message by message, with
//! virtual time: the handshake, the hand-over to SAS and QR, fan-out,
//! cancels, timeouts, and messages from the wrong user or device.

use super::*;
use crate::verification::sas::ExpectedKeys;
use vodozemac::Ed25519SecretKey;

const T0: u64 = 1_000_000;
const ALL: VerificationMethods = VerificationMethods { sas: true, show_qr: true, scan_qr: true };

#[derive(Clone)]
struct Side {
    user: UserId,
    device: DeviceId,
    device_key: Ed25519PublicKey,
    master: Ed25519PublicKey,
}

fn side(user: &str, device: &str) -> Side {
    Side {
        user: UserId::parse(user).unwrap(),
        device: DeviceId::parse(device).unwrap(),
        device_key: Ed25519SecretKey::new().public_key(),
        master: Ed25519SecretKey::new().public_key(),
    }
}

/// Another device of `of`'s user (same master key).
fn own_device(of: &Side, device: &str) -> Side {
    Side {
        device: DeviceId::parse(device).unwrap(),
        device_key: Ed25519SecretKey::new().public_key(),
        ..of.clone()
    }
}

/// What `me`'s driver would load for a flow with `them`.
fn keys(me: &Side, them: &Side) -> FixedKeys {
    FixedKeys {
        ids: SasIds {
            own_user: me.user.clone(),
            own_device: me.device.clone(),
            own_device_key: me.device_key,
            own_master_key: Some(me.master),
            other_user: them.user.clone(),
            other: ExpectedKeys {
                device_id: them.device.clone(),
                device_key: them.device_key,
                master_key: Some(them.master),
                cross_signing_key_ids: vec![],
            },
        },
        believed_own_master: Some(me.master),
        can_sign_users: true,
    }
}

fn msg<'a>(from: &'a Side, out: &'a OutgoingContent) -> Incoming<'a> {
    Incoming {
        sender: &from.user,
        sender_device: None,
        event_type: out.event_type,
        content: &out.content,
    }
}

/// Delivers `msgs` from `from` to `to` (`to` owning the keys of `from`
/// whenever it asks); returns the flow and everything it sent back.
fn deliver(
    me: &Side,
    mut to: RequestFlow,
    from: &Side,
    msgs: &[OutgoingContent],
    now: u64,
) -> (RequestFlow, Vec<OutgoingContent>, Option<VerifiedKeys>) {
    let mut out = Vec::new();
    let mut verified = None;
    for m in msgs {
        let mut step = to.receive(&msg(from, m), ALL, None, now);
        if step.needs_keys.is_some() {
            step = step.flow.receive(&msg(from, m), ALL, Some(keys(me, from)), now);
        }
        to = step.flow;
        out.extend(step.outgoing);
        verified = verified.or(step.verified);
    }
    (to, out, verified)
}

fn request_msg(txn: &str, from: &Side, methods: &[&str], ts: u64) -> OutgoingContent {
    OutgoingContent {
        event_type: event_types::REQUEST,
        content: json!({
            "transaction_id": txn, "from_device": from.device, "methods": methods, "timestamp": ts,
        }),
    }
}

fn ready_msg(txn: &str, from: &Side, methods: &[&str]) -> OutgoingContent {
    OutgoingContent {
        event_type: event_types::READY,
        content: json!({ "transaction_id": txn, "from_device": from.device, "methods": methods }),
    }
}

fn step_ok(action: Action) -> RequestStep {
    action.map_err(|r| r.reason).unwrap()
}

fn code_of(flow: &RequestFlow) -> (CancelCode, bool) {
    let c = flow.cancelled().unwrap_or_else(|| panic!("not cancelled: {:?}", flow.state()));
    (c.code.clone(), c.by_us)
}

/// Alice asks Bob's device; Bob accepts. Returns both flows, ready.
fn ready_pair(alice: &Side, bob: &Side) -> (RequestFlow, RequestFlow) {
    let (a, request) = RequestFlow::request_device("t1".into(), keys(alice, bob), ALL, T0);
    assert!(matches!(a.state(), RequestState::Requested));
    let request = OutgoingContent { event_type: event_types::REQUEST, content: request };
    let b = RequestFlow::received_to_device("t1", &msg(alice, &request), ALL, T0 + 10).unwrap();
    assert!(matches!(b.state(), RequestState::RequestReceived));
    // Bob's driver is asked for Alice's keys, then accepts with them.
    let asked = step_ok(b.accept(ALL, None, T0 + 20));
    assert_eq!(asked.needs_keys.as_ref(), Some(&alice.device));
    assert!(asked.outgoing.is_empty());
    let accepted = step_ok(asked.flow.accept(ALL, Some(keys(bob, alice)), T0 + 20));
    assert_eq!(accepted.outgoing.len(), 1);
    assert_eq!(accepted.outgoing[0].event_type, event_types::READY);
    assert_eq!(accepted.outgoing[0].content["from_device"], bob.device.as_str());
    assert_eq!(accepted.outgoing[0].content["transaction_id"], "t1");
    let (a, out, _) = deliver(alice, a, bob, &accepted.outgoing, T0 + 30);
    assert!(out.is_empty());
    assert!(matches!(a.state(), RequestState::Ready(_)));
    (a, accepted.flow)
}

#[test]
fn request_content_is_what_matrix_sdk_crypto_expects() {
    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    let (flow, content) = RequestFlow::request_device("txn".into(), keys(&alice, &bob), ALL, T0);
    assert_eq!(
        content,
        json!({
            "from_device": "ALICE",
            "methods": ["m.sas.v1", "m.qr_code.show.v1", "m.qr_code.scan.v1", "m.reciprocate.v1"],
            "timestamp": T0,
            "transaction_id": "txn",
        })
    );
    assert_eq!(flow.other_device(), Some(&bob.device));
    assert_eq!(flow.deadline(), T0 + VERIFICATION_TIMEOUT_MS);
    let room = room_request_content(&alice.user, &alice.device, &bob.user, ALL);
    assert_eq!(room["msgtype"], MSGTYPE_REQUEST);
    assert_eq!(room["to"], "@bob:hs");
    assert_eq!(room["from_device"], "ALICE");
}

#[test]
fn request_ready_then_sas_runs_to_done_through_the_flows() {
    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    let (a, b) = ready_pair(&alice, &bob);
    let started = step_ok(a.start_sas(ALL));
    assert!(matches!(started.flow.state(), RequestState::Sas(SasState::Started(_))));
    let (b, accept, _) = deliver(&bob, b, &alice, &started.outgoing, T0 + 40);
    assert!(matches!(b.state(), RequestState::Sas(SasState::Accepted(_))));
    let (a, key, _) = deliver(&alice, started.flow, &bob, &accept, T0 + 50);
    let (b, key_back, _) = deliver(&bob, b, &alice, &key, T0 + 60);
    let (a, _, _) = deliver(&alice, a, &bob, &key_back, T0 + 70);
    for f in [&a, &b] {
        assert!(matches!(f.state(), RequestState::Sas(SasState::KeysExchanged(_))));
    }
    let a_mac = step_ok(a.confirm_sas(T0 + 80));
    let b_mac = step_ok(b.confirm_sas(T0 + 80));
    let (a, a_done, a_verified) = deliver(&alice, a_mac.flow, &bob, &b_mac.outgoing, T0 + 90);
    assert!(a_verified.is_none(), "Alice still waits for Bob's done");
    let (b, b_done, b_verified) =
        deliver(&bob, b_mac.flow, &alice, &[a_mac.outgoing, a_done].concat(), T0 + 90);
    assert_eq!(b_verified.unwrap().device_key, Some(alice.device_key));
    assert!(b.is_finished());
    let (a, _, a_verified) = deliver(&alice, a, &bob, &b_done, T0 + 95);
    let a_verified = a_verified.unwrap();
    assert_eq!(
        (a_verified.device_key, a_verified.master_key),
        (Some(bob.device_key), Some(bob.master))
    );
    assert!(a.is_finished());
}

#[test]
fn qr_hand_over_show_and_scan() {
    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    let (a, b) = ready_pair(&alice, &bob);
    let (a, bytes) = a.qr_code(ALL, T0 + 40).map_err(|r| r.reason).unwrap();
    let bytes = bytes.unwrap();
    let (a, again) = a.qr_code(ALL, T0 + 41).map_err(|r| r.reason).unwrap();
    assert_eq!(again.as_deref(), Some(&bytes[..]), "the same code on every call");
    let scanned = step_ok(b.scan_qr(ALL, &bytes, T0 + 50));
    assert!(matches!(scanned.flow.state(), RequestState::Qr(QrState::Reciprocated(_))));
    let (a, out, _) = deliver(&alice, a, &bob, &scanned.outgoing, T0 + 60);
    assert!(out.is_empty());
    assert!(matches!(a.state(), RequestState::Qr(QrState::Scanned(_))));
    let confirmed = step_ok(a.confirm_qr_scanned(T0 + 70));
    let (_, done_back, b_verified) =
        deliver(&bob, scanned.flow, &alice, &confirmed.outgoing, T0 + 80);
    assert_eq!(b_verified.unwrap().master_key, Some(alice.master));
    let (a, _, a_verified) = deliver(&alice, confirmed.flow, &bob, &done_back, T0 + 90);
    assert_eq!(a_verified.unwrap().master_key, Some(bob.master));
    assert!(a.is_finished());
}

#[test]
fn a_reciprocate_without_a_shown_code_is_an_unknown_method() {
    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    let (a, b) = ready_pair(&alice, &bob);
    let (_, bytes) = b.qr_code(ALL, T0 + 40).map_err(|r| r.reason).unwrap();
    let scanned = step_ok(a.scan_qr(ALL, &bytes.unwrap(), T0 + 50));
    // Bob's flow is a fresh one that never showed its code.
    let (_, b2) = ready_pair(&alice, &bob);
    let (b2, out, _) = deliver(&bob, b2, &alice, &scanned.outgoing, T0 + 60);
    assert_eq!(code_of(&b2), (CancelCode::UnknownMethod, true));
    assert_eq!(out[0].content["code"], "m.unknown_method");
}

#[test]
fn methods_intersect_sas_or_one_shows_and_the_other_scans() {
    let theirs = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let sas_only = VerificationMethods { sas: true, show_qr: false, scan_qr: false };
    let show_only = VerificationMethods { sas: false, show_qr: true, scan_qr: false };
    assert!(sas_only.common(&theirs(&[METHOD_SAS_V1])));
    assert!(!sas_only.common(&theirs(&[METHOD_QR_SCAN_V1, METHOD_RECIPROCATE_V1])));
    assert!(show_only.common(&theirs(&[METHOD_QR_SCAN_V1, METHOD_RECIPROCATE_V1])));
    // Scanning needs reciprocate, and two showers cannot meet.
    assert!(!show_only.common(&theirs(&[METHOD_QR_SCAN_V1])));
    assert!(!show_only.common(&theirs(&[METHOD_QR_SHOW_V1, METHOD_RECIPROCATE_V1])));
    assert_eq!(show_only.to_wire(), json!([METHOD_QR_SHOW_V1, METHOD_RECIPROCATE_V1]));
    assert_eq!(sas_only.to_wire(), json!([METHOD_SAS_V1]));

    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    // A request with nothing in common is ignored ...
    let request = request_msg("t", &bob, &[METHOD_QR_SHOW_V1], T0);
    assert!(RequestFlow::received_to_device("t", &msg(&bob, &request), sas_only, T0).is_none());
    // ... and a ready with nothing in common cancels.
    let (a, _) = RequestFlow::request_device("t".into(), keys(&alice, &bob), sas_only, T0);
    let step =
        a.receive(&msg(&bob, &ready_msg("t", &bob, &[METHOD_QR_SHOW_V1])), sas_only, None, T0);
    assert_eq!(code_of(&step.flow), (CancelCode::UnknownMethod, true));
    // SAS only when both offered it; QR only when they can scan.
    let (a, _) = RequestFlow::request_device("t".into(), keys(&alice, &bob), ALL, T0);
    let ready = ready_msg("t", &bob, &[METHOD_QR_SHOW_V1, METHOD_RECIPROCATE_V1]);
    let a = a.receive(&msg(&bob, &ready), ALL, None, T0).flow;
    let refused = a.start_sas(ALL).unwrap_err();
    assert_eq!(refused.reason, Refusal::State("SAS is not a method both sides offered"));
    let (_, code) = refused.flow.qr_code(ALL, T0).map_err(|r| r.reason).unwrap();
    assert_eq!(code, None, "they cannot scan");
}

#[test]
fn the_first_of_our_devices_to_answer_takes_the_flow_the_others_are_withdrawn_from() {
    let me = side("@me:hs", "NEW");
    let (d2, d3) = (own_device(&me, "D2"), own_device(&me, "D3"));
    let (flow, content) = RequestFlow::request_own_devices(
        "fan".into(),
        me.user.clone(),
        &me.device,
        vec![d2.device.clone(), d3.device.clone()],
        ALL,
        T0,
    );
    assert_eq!(content["from_device"], "NEW");
    assert_eq!(flow.other_device(), None);
    // D2 answers: the flow asks for D2's keys, then takes D2.
    let ready = ready_msg("fan", &d2, &[METHOD_SAS_V1]);
    let asked = flow.receive(&msg(&d2, &ready), ALL, None, T0 + 1);
    assert_eq!(asked.needs_keys.as_ref(), Some(&d2.device));
    assert!(asked.withdrawn.is_none() && matches!(asked.flow.state(), RequestState::Requested));
    let step = asked.flow.receive(&msg(&d2, &ready), ALL, Some(keys(&me, &d2)), T0 + 1);
    let withdrawn = step.withdrawn.unwrap();
    assert_eq!(withdrawn.devices, vec![d3.device.clone()]);
    assert_eq!(withdrawn.cancel.content["code"], "m.accepted");
    assert_eq!(withdrawn.cancel.content["transaction_id"], "fan");
    assert!(step.outgoing.is_empty());
    assert_eq!(step.flow.other_device(), Some(&d2.device));
    assert_eq!(step.flow.requested_devices(), &[d2.device.clone()]);
    // D3 answering later is not the flow's device: ignored.
    let late =
        step.flow.receive(&msg(&d3, &ready_msg("fan", &d3, &[METHOD_SAS_V1])), ALL, None, T0 + 2);
    assert!(late.outgoing.is_empty() && late.needs_keys.is_none());
    assert!(matches!(late.flow.state(), RequestState::Ready(_)));
}

#[test]
fn a_fanned_out_request_declined_by_one_device_is_withdrawn_from_all() {
    let me = side("@me:hs", "NEW");
    let (d2, d3) = (own_device(&me, "D2"), own_device(&me, "D3"));
    let devices = vec![d2.device.clone(), d3.device.clone()];
    let (flow, _) = RequestFlow::request_own_devices(
        "fan".into(),
        me.user.clone(),
        &me.device,
        devices,
        ALL,
        T0,
    );
    let cancel = cancel_content(&FlowId::ToDevice("fan".into()), &CancelCode::User);
    let step = flow.receive(&msg(&d2, &cancel), ALL, None, T0 + 1);
    assert_eq!(code_of(&step.flow), (CancelCode::User, false));
    assert_eq!(step.outgoing, vec![cancel], "the same cancel, to every device asked");
}

#[test]
fn in_a_room_another_of_our_devices_answering_ends_our_received_request() {
    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    let bob2 = own_device(&bob, "BOB2");
    let room = RoomId::parse("!r:hs").unwrap();
    let content = room_request_content(&alice.user, &alice.device, &bob.user, ALL);
    let request = Incoming {
        sender: &alice.user,
        sender_device: None,
        event_type: "m.room.message",
        content: &content,
    };
    let flow =
        RequestFlow::received_in_room(&room, "$req", &request, T0, &bob.user, ALL, T0).unwrap();
    assert_eq!(flow.flow_id().as_str(), "$req");
    // Our own echo (our device) changes nothing ...
    let ours = json!({ "from_device": "BOB", "methods": [METHOD_SAS_V1] });
    let flow = flow.own_event(event_types::READY, &ours, &bob.device).flow;
    assert!(matches!(flow.state(), RequestState::RequestReceived));
    // ... BOB2's ready ends it with m.accepted, sending nothing.
    let theirs = json!({ "from_device": bob2.device, "methods": [METHOD_SAS_V1] });
    let step = flow.own_event(event_types::READY, &theirs, &bob.device);
    assert!(step.outgoing.is_empty());
    assert_eq!(code_of(&step.flow), (CancelCode::Accepted, false));
    // A request not addressed to us, or sent by us, is no flow.
    let to_other = room_request_content(&alice.user, &alice.device, &alice.user, ALL);
    let request = Incoming { content: &to_other, ..request };
    assert!(RequestFlow::received_in_room(&room, "$x", &request, T0, &bob.user, ALL, T0).is_none());
    let from_us = Incoming { sender: &bob.user, content: &content, ..request };
    assert!(RequestFlow::received_in_room(&room, "$y", &from_us, T0, &bob.user, ALL, T0).is_none());
}

#[test]
fn their_cancel_ends_the_flow_and_is_never_answered() {
    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    let cancel = cancel_content(&FlowId::ToDevice("t1".into()), &CancelCode::User);
    let (a, _) = RequestFlow::request_device("t1".into(), keys(&alice, &bob), ALL, T0);
    let (a, out, _) = deliver(&alice, a, &bob, &[cancel.clone()], T0 + 1);
    assert!(out.is_empty(), "one device asked: nobody else to tell");
    assert_eq!(code_of(&a), (CancelCode::User, false));
    // Once ready (and SAS under way) too.
    let (a, b) = ready_pair(&alice, &bob);
    let (a, out, _) = deliver(&alice, a, &bob, &[cancel.clone()], T0 + 40);
    assert!(out.is_empty());
    assert_eq!(code_of(&a), (CancelCode::User, false));
    let b = step_ok(b.start_sas(ALL)).flow;
    let (b, out, _) = deliver(&bob, b, &alice, &[cancel], T0 + 50);
    assert!(out.is_empty());
    assert_eq!(code_of(&b), (CancelCode::User, false));
    // A finished flow ignores everything, a cancel of ours included.
    let step = b.cancel(CancelCode::User);
    assert!(step.outgoing.is_empty());
    assert_eq!(code_of(&step.flow), (CancelCode::User, false));
}

#[test]
fn our_cancel_and_unexpected_messages() {
    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    let (a, _) = RequestFlow::request_device("t1".into(), keys(&alice, &bob), ALL, T0);
    let step = a.cancel(CancelCode::User);
    assert_eq!(step.outgoing[0].content["code"], "m.user");
    assert_eq!(code_of(&step.flow), (CancelCode::User, true));
    // A start before ready is out of order.
    let (a, _) = RequestFlow::request_device("t1".into(), keys(&alice, &bob), ALL, T0);
    let start = OutgoingContent {
        event_type: event_types::START,
        content: json!({ "transaction_id": "t1", "from_device": "BOB", "method": METHOD_SAS_V1 }),
    };
    let (a, out, _) = deliver(&alice, a, &bob, &[start], T0 + 1);
    assert_eq!(code_of(&a), (CancelCode::UnexpectedMessage, true));
    assert_eq!(out[0].content["code"], "m.unexpected_message");
    // A ready without from_device is invalid.
    let (a, _) = RequestFlow::request_device("t1".into(), keys(&alice, &bob), ALL, T0);
    let bad = OutgoingContent {
        event_type: event_types::READY,
        content: json!({ "transaction_id": "t1", "methods": [METHOD_SAS_V1] }),
    };
    let (a, _, _) = deliver(&alice, a, &bob, &[bad], T0 + 1);
    assert_eq!(code_of(&a), (CancelCode::InvalidMessage, true));
    // Only their ready and start naming an unknown flow get an answer.
    let ready = ready_msg("nope", &bob, &[METHOD_SAS_V1]);
    let (to, cancel) = unknown_flow_cancel("nope", ready.event_type, &ready.content).unwrap();
    assert_eq!(
        (to, cancel.content["code"].clone()),
        (bob.device.clone(), json!("m.unknown_transaction"))
    );
    let their_cancel = cancel_content(&FlowId::ToDevice("nope".into()), &CancelCode::User);
    assert!(unknown_flow_cancel("nope", event_types::CANCEL, &their_cancel.content).is_none());
}

#[test]
fn requests_too_old_or_too_new_are_ignored() {
    let bob = side("@bob:hs", "BOB");
    let now = T0 + REQUEST_MAX_AGE_MS;
    let received = |ts| {
        let request = request_msg("t", &bob, &[METHOD_SAS_V1], ts);
        RequestFlow::received_to_device("t", &msg(&bob, &request), ALL, now).is_some()
    };
    assert!(!received(T0), "exactly the timeout old");
    assert!(received(T0 + 1));
    assert!(received(now + REQUEST_MAX_FUTURE_MS));
    assert!(!received(now + REQUEST_MAX_FUTURE_MS + 1));
    // No timestamp counts as the epoch.
    let mut request = request_msg("t", &bob, &[METHOD_SAS_V1], 0);
    request.content.as_object_mut().unwrap().remove("timestamp");
    assert!(RequestFlow::received_to_device("t", &msg(&bob, &request), ALL, now).is_none());
}

#[test]
fn an_unanswered_request_times_out_at_its_deadline() {
    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    let (a, _) = RequestFlow::request_device("t1".into(), keys(&alice, &bob), ALL, T0);
    let deadline = T0 + VERIFICATION_TIMEOUT_MS;
    let step = a.poll_timeout(deadline - 1);
    assert!(step.outgoing.is_empty() && matches!(step.flow.state(), RequestState::Requested));
    let step = step.flow.poll_timeout(deadline);
    assert_eq!(step.outgoing[0].content["code"], "m.timeout");
    assert_eq!(code_of(&step.flow), (CancelCode::Timeout, true));
    // The flow-wide deadline also ends SAS under way.
    let (a, _) = ready_pair(&alice, &bob);
    let a = step_ok(a.start_sas(ALL)).flow;
    let step = a.poll_timeout(deadline);
    assert_eq!(code_of(&step.flow), (CancelCode::Timeout, true));
    assert!(matches!(step.flow.state(), RequestState::Sas(SasState::Cancelled(_))));
}

#[test]
fn attack_messages_from_the_wrong_user_or_device_are_ignored() {
    let (alice, bob, eve) =
        (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"), side("@eve:hs", "EVE"));
    let room = RoomId::parse("!r:hs").unwrap();
    // Another user answering Alice's request to Bob (same flow ID).
    let (a, _) = RequestFlow::request_device("t1".into(), keys(&alice, &bob), ALL, T0);
    let forged = ready_msg("t1", &bob, &[METHOD_SAS_V1]);
    let step = a.receive(&msg(&eve, &forged), ALL, Some(keys(&alice, &eve)), T0 + 1);
    assert!(step.needs_keys.is_none() && step.outgoing.is_empty());
    assert!(matches!(step.flow.state(), RequestState::Requested), "Eve's ready ignored");
    // ... or cancelling it.
    let cancel = cancel_content(&FlowId::ToDevice("t1".into()), &CancelCode::User);
    let step = step.flow.receive(&msg(&eve, &cancel), ALL, None, T0 + 1);
    assert!(matches!(step.flow.state(), RequestState::Requested), "Eve's cancel ignored");
    // In a room, a ready from a device in another device's name.
    let flow = RequestFlow::room_request_sent(room.clone(), "$req".into(), bob.user.clone(), T0);
    let bob2 = own_device(&bob, "BOB2");
    let ready = json!({
        "from_device": "BOB", "methods": [METHOD_SAS_V1],
        "m.relates_to": { "rel_type": "m.reference", "event_id": "$req" },
    });
    let forged = Incoming {
        sender: &bob.user,
        sender_device: Some(&bob2.device),
        event_type: event_types::READY,
        content: &ready,
    };
    let step = flow.receive(&forged, ALL, Some(keys(&alice, &bob)), T0 + 1);
    assert!(matches!(step.flow.state(), RequestState::Requested), "BOB2 posing as BOB ignored");
    // Once the flow is with BOB, a message provably from BOB2 is ignored.
    let real = Incoming { sender_device: Some(&bob.device), ..forged };
    let flow = step.flow.receive(&real, ALL, Some(keys(&alice, &bob)), T0 + 2).flow;
    assert!(matches!(flow.state(), RequestState::Ready(_)));
    let cancel = cancel_content(flow.flow_id(), &CancelCode::User);
    let from_bob2 = Incoming {
        sender: &bob.user,
        sender_device: Some(&bob2.device),
        event_type: event_types::CANCEL,
        content: &cancel.content,
    };
    let flow = flow.receive(&from_bob2, ALL, None, T0 + 3).flow;
    assert!(matches!(flow.state(), RequestState::Ready(_)), "BOB2's cancel ignored");
    // A start naming another device than the flow's is refused.
    let (a, _) = ready_pair(&alice, &bob);
    let start = OutgoingContent {
        event_type: event_types::START,
        content: json!({ "transaction_id": "t1", "from_device": "BOB2", "method": METHOD_SAS_V1 }),
    };
    let (a, _, _) = deliver(&alice, a, &bob, &[start], T0 + 40);
    assert_eq!(code_of(&a), (CancelCode::UserMismatch, true));
}

#[test]
fn refused_actions_leave_the_flow_as_it_was() {
    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    let (a, _) = RequestFlow::request_device("t1".into(), keys(&alice, &bob), ALL, T0);
    let refused = a.accept(ALL, Some(keys(&alice, &bob)), T0).unwrap_err();
    assert_eq!(refused.reason, Refusal::State("no request to accept"));
    let refused = refused.flow.start_sas(ALL).unwrap_err();
    assert_eq!(refused.reason, Refusal::State("SAS is not a method both sides offered"));
    let refused = refused.flow.confirm_sas(T0).unwrap_err();
    assert_eq!(refused.reason, Refusal::State("SAS not started"));
    let refused = refused.flow.scan_qr(ALL, b"junk", T0).unwrap_err();
    assert_eq!(refused.reason, Refusal::State("not ready"));
    assert!(matches!(refused.flow.state(), RequestState::Requested));
    let (a, _) = ready_pair(&alice, &bob);
    let refused = a.scan_qr(ALL, b"junk", T0).unwrap_err();
    assert!(matches!(refused.reason, Refusal::Scan(_)));
    assert!(matches!(refused.flow.state(), RequestState::Ready(_)));
    let no_scan = VerificationMethods { scan_qr: false, ..ALL };
    let refused = refused.flow.scan_qr(no_scan, b"junk", T0).unwrap_err();
    assert_eq!(refused.reason, Refusal::State("scanning is not a method we offered"));
}

#[test]
fn abort_cancels_any_unfinished_or_done_flow_and_repeats_our_cancel() {
    let (alice, bob) = (side("@alice:hs", "ALICE"), side("@bob:hs", "BOB"));
    let failure = CancelCode::Other("org.newt.store_failure".into());
    let (a, _) = ready_pair(&alice, &bob);
    let step = a.abort(failure.clone());
    assert_eq!(code_of(&step.flow), (failure.clone(), true));
    assert_eq!(step.outgoing[0].content["code"], "org.newt.store_failure");
    // Ours again: the same cancel once more.
    let again = step.flow.abort(failure.clone());
    assert_eq!(again.outgoing[0].content["code"], "org.newt.store_failure");
    // Theirs: nothing.
    let (a, _) = RequestFlow::request_device("t1".into(), keys(&alice, &bob), ALL, T0);
    let cancel = cancel_content(&FlowId::ToDevice("t1".into()), &CancelCode::User);
    let (a, _, _) = deliver(&alice, a, &bob, &[cancel], T0 + 1);
    let step = a.abort(failure);
    assert!(step.outgoing.is_empty());
    assert_eq!(code_of(&step.flow), (CancelCode::User, false));
}
