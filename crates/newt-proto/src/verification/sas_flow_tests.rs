//! Two SAS flows driven against each other, message by message, with
//! virtual time.

use super::*;
use crate::ids::RoomId;
use vodozemac::Ed25519SecretKey;

const T0: u64 = 1_000_000;

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

fn ids(me: &Side, them: &Side) -> SasIds {
    SasIds {
        own_user: me.user.clone(),
        own_device: me.device.clone(),
        own_device_key: me.device_key,
        own_master_key: Some(me.master),
        other_user: them.user.clone(),
        other: ExpectedKeys {
            device_id: them.device.clone(),
            device_key: them.device_key,
            master_key: Some(them.master),
            cross_signing_key_ids: vec![format!("ed25519:{}", them.master.to_base64())],
        },
    }
}

fn flow() -> FlowId {
    FlowId::ToDevice("txn1".into())
}

fn created(me: &Side, them: &Side, flow: FlowId) -> SasState {
    SasState::Created(Created::new(ids(me, them), flow, T0).unwrap())
}

/// Delivers every message in `msgs` to `to`; returns the new state and
/// what it sent back.
fn deliver(
    mut to: SasState,
    msgs: &[OutgoingContent],
    now: u64,
) -> (SasState, Vec<OutgoingContent>) {
    let mut out = Vec::new();
    for m in msgs {
        let step = to.receive(m.event_type, &m.content, now);
        to = step.state;
        out.extend(step.outgoing);
    }
    (to, out)
}

fn keys_exchanged(state: &SasState) -> &KeysExchanged {
    match state {
        SasState::KeysExchanged(k) => k,
        other => panic!("expected KeysExchanged, got {other:?}"),
    }
}

fn cancelled(state: &SasState) -> &Cancelled {
    match state {
        SasState::Cancelled(c) => c,
        other => panic!("expected Cancelled, got {other:?}"),
    }
}

/// Runs start → accept → keys; returns (alice = starter, bob = accepter).
fn to_keys_exchanged(alice: &Side, bob: &Side, flow: FlowId) -> (SasState, SasState) {
    let SasState::Created(a) = created(alice, bob, flow.clone()) else { unreachable!() };
    let (a, start) = a.start();
    let (b, accept) = deliver(created(bob, alice, flow), &[start], T0);
    assert_eq!(accept[0].event_type, event_types::ACCEPT);
    let (a, a_key) = deliver(SasState::Started(a), &accept, T0);
    assert_eq!(a_key[0].event_type, event_types::KEY);
    let (b, b_key) = deliver(b, &a_key, T0);
    let (a, none) = deliver(a, &b_key, T0);
    assert!(none.is_empty());
    (a, b)
}

fn confirm(state: SasState, now: u64) -> (SasState, Vec<OutgoingContent>) {
    match state {
        SasState::KeysExchanged(k) => {
            let step = k.confirm(now);
            (step.state, step.outgoing)
        }
        other => panic!("expected KeysExchanged, got {other:?}"),
    }
}

fn run_to_done(alice: &Side, bob: &Side, flow: FlowId) -> (Done, Done) {
    let (a, b) = to_keys_exchanged(alice, bob, flow);
    assert_eq!(keys_exchanged(&a).emoji(), keys_exchanged(&b).emoji());
    assert_eq!(keys_exchanged(&a).decimals(), keys_exchanged(&b).decimals());
    assert!(keys_exchanged(&a).emoji().is_some());
    assert_eq!(keys_exchanged(&a).agreed().mac, MacMethod::HkdfHmacSha256V2);
    let (a, a_mac) = confirm(a, T0 + 1);
    assert!(matches!(a, SasState::Confirmed(_)));
    // Bob gets Alice's MAC before his user confirmed: kept, not acted on.
    let (b, nothing) = deliver(b, &a_mac, T0 + 2);
    assert!(nothing.is_empty());
    let (b, b_out) = confirm(b, T0 + 3);
    assert_eq!(
        b_out.iter().map(|o| o.event_type).collect::<Vec<_>>(),
        [event_types::MAC, event_types::DONE]
    );
    let (a, a_done) = deliver(a, &b_out, T0 + 4);
    let (b, _) = deliver(b, &a_done, T0 + 5);
    match (a, b) {
        (SasState::Done(a), SasState::Done(b)) => (a, b),
        other => panic!("not done: {other:?}"),
    }
}

#[test]
fn full_flow_to_device() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let (a, b) = run_to_done(&alice, &bob, flow());
    assert_eq!(a.verified.device_key, Some(bob.device_key));
    assert_eq!(a.verified.master_key, Some(bob.master));
    assert_eq!(a.verified.user_id, bob.user);
    assert_eq!(b.verified.device_key, Some(alice.device_key));
    assert_eq!(b.verified.master_key, Some(alice.master));
}

#[test]
fn full_flow_in_room() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let flow =
        FlowId::InRoom { room_id: RoomId::parse("!dm:hs").unwrap(), event_id: "$req".into() };
    let (a, _) = run_to_done(&alice, &bob, flow);
    assert_eq!(a.verified.device_key, Some(bob.device_key));
}

#[test]
fn mac_tampered_in_transit_is_key_mismatch() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let (a, b) = to_keys_exchanged(&alice, &bob, flow());
    let (_, mut a_mac) = confirm(a, T0);
    // Replace the device key MAC with the one for some other key.
    a_mac[0].content["mac"]["ed25519:ALICE"] = json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let (b, out) = deliver(b, &a_mac, T0);
    assert_eq!(cancelled(&b).code, CancelCode::KeyMismatch);
    assert_eq!(out[0].content["code"], "m.key_mismatch");
}

#[test]
fn mac_for_a_different_device_key_is_key_mismatch() {
    // Bob expects a different key for Alice's device than she really has:
    // what a server swapping device keys would cause.
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let mut alice_as_bob_sees_her = side("@alice:hs", "ALICE");
    alice_as_bob_sees_her.master = alice.master;
    let SasState::Created(a) = created(&alice, &bob, flow()) else { unreachable!() };
    let (a, start) = a.start();
    let (b, accept) = deliver(created(&bob, &alice_as_bob_sees_her, flow()), &[start], T0);
    let (a, a_key) = deliver(SasState::Started(a), &accept, T0);
    let (b, b_key) = deliver(b, &a_key, T0);
    let (a, _) = deliver(a, &b_key, T0);
    let (_, a_mac) = confirm(a, T0);
    let (b, _) = confirm(b, T0);
    let (b, _) = deliver(b, &a_mac, T0);
    assert_eq!(cancelled(&b).code, CancelCode::KeyMismatch);
}

#[test]
fn commitment_mismatch_is_detected() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let SasState::Created(a) = created(&alice, &bob, flow()) else { unreachable!() };
    let (a, start) = a.start();
    let (_, accept) = deliver(created(&bob, &alice, flow()), &[start], T0);
    let (a, _) = deliver(SasState::Started(a), &accept, T0);
    // A MITM answers with its own key, not the committed one.
    let mitm = vodozemac::sas::Sas::new();
    let key = OutgoingContent {
        event_type: event_types::KEY,
        content: json!({"key": mitm.public_key().to_base64(), "transaction_id": "txn1"}),
    };
    let (a, out) = deliver(a, &[key], T0);
    assert_eq!(cancelled(&a).code, CancelCode::MismatchedCommitment);
    assert_eq!(out[0].content["code"], "m.mismatched_commitment");
}

#[test]
fn start_collision_smaller_user_wins() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let SasState::Created(a) = created(&alice, &bob, flow()) else { unreachable!() };
    let SasState::Created(b) = created(&bob, &alice, flow()) else { unreachable!() };
    let (a, a_start) = a.start();
    let (b, b_start) = b.start();
    // Alice ignores Bob's start (alice < bob) ...
    let (a, out) = deliver(SasState::Started(a), &[b_start], T0);
    assert!(out.is_empty() && matches!(a, SasState::Started(_)));
    // ... and Bob drops his own and accepts Alice's.
    let (b, accept) = deliver(SasState::Started(b), &[a_start], T0);
    assert!(matches!(b, SasState::Accepted(_)));
    let (a, a_key) = deliver(a, &accept, T0);
    let (b, b_key) = deliver(b, &a_key, T0);
    let (a, _) = deliver(a, &b_key, T0);
    assert_eq!(keys_exchanged(&a).emoji(), keys_exchanged(&b).emoji());
}

#[test]
fn start_collision_same_user_compares_devices() {
    let one = side("@me:hs", "AAA");
    let mut two = side("@me:hs", "BBB");
    two.master = one.master;
    let SasState::Created(a) = created(&one, &two, flow()) else { unreachable!() };
    let SasState::Created(b) = created(&two, &one, flow()) else { unreachable!() };
    let (a, a_start) = a.start();
    let (b, b_start) = b.start();
    let (a, out) = deliver(SasState::Started(a), &[b_start], T0);
    assert!(out.is_empty() && matches!(a, SasState::Started(_)));
    let (b, _) = deliver(SasState::Started(b), &[a_start], T0);
    assert!(matches!(b, SasState::Accepted(_)));
}

#[test]
fn start_collision_different_methods_cancels() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let SasState::Created(a) = created(&alice, &bob, flow()) else { unreachable!() };
    let (a, _) = a.start();
    let qr = OutgoingContent {
        event_type: event_types::START,
        content: json!({"method": "m.reciprocate.v1", "from_device": "BOB", "secret": "x", "transaction_id": "txn1"}),
    };
    let (a, _) = deliver(SasState::Started(a), &[qr], T0);
    assert_eq!(cancelled(&a).code, CancelCode::UnexpectedMessage);
}

#[test]
fn legacy_mac_only_when_v2_not_offered() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let SasState::Created(a) = created(&alice, &bob, flow()) else { unreachable!() };
    let (a, mut start) = a.start();
    // An old client offering only the legacy MAC.
    start.content["message_authentication_codes"] = json!(["hkdf-hmac-sha256"]);
    let Started { ctx, sas, .. } = a;
    let a = Started { ctx, sas, start_content: start.content.clone() };
    let (b, accept) = deliver(created(&bob, &alice, flow()), &[start], T0);
    assert_eq!(accept[0].content["message_authentication_code"], "hkdf-hmac-sha256");
    let (a, a_key) = deliver(SasState::Started(a), &accept, T0);
    let (b, b_key) = deliver(b, &a_key, T0);
    let (a, _) = deliver(a, &b_key, T0);
    assert_eq!(keys_exchanged(&a).agreed().mac, MacMethod::HkdfHmacSha256Legacy);
    let (a, a_mac) = confirm(a, T0);
    let (b, b_out) = confirm(b, T0);
    let (b, b_done) = deliver(b, &a_mac, T0);
    let (a, a_done) = deliver(a, &b_out, T0);
    let (a, _) = deliver(a, &b_done, T0);
    let (b, _) = deliver(b, &a_done, T0);
    assert!(matches!((a, b), (SasState::Done(_), SasState::Done(_))));
}

/// Alice starts (offering the v2 and legacy MACs), Bob accepts honestly,
/// and someone on the path rewrites `field` of the `accept` to `value`
/// before Alice sees it: Alice must cancel with `m.unknown_method` and send
/// nothing else (no `key`).
fn tampered_accept_is_refused(field: &str, value: &str) {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let SasState::Created(a) = created(&alice, &bob, flow()) else { unreachable!() };
    let (a, start) = a.start();
    let (_, mut accept) = deliver(created(&bob, &alice, flow()), &[start], T0);
    assert_ne!(accept[0].content[field], value, "Bob chose {value} himself");
    accept[0].content[field] = json!(value);
    let (a, out) = deliver(SasState::Started(a), &accept, T0);
    assert_eq!(cancelled(&a), &Cancelled { code: CancelCode::UnknownMethod, by_us: true });
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].event_type, event_types::CANCEL);
    assert_eq!(out[0].content["code"], "m.unknown_method");
}

#[test]
fn attack_accept_downgrading_the_mac_to_legacy_is_refused() {
    // MSC3783: `hkdf-hmac-sha256` must not be used when both sides support
    // v2, and our start offered v2.
    tampered_accept_is_refused("message_authentication_code", MAC_LEGACY);
}

#[test]
fn attack_accept_downgrading_the_key_agreement_to_legacy_is_refused() {
    // We never offer the deprecated `curve25519` (its HKDF info leaves out
    // the keys and devices), so an accept choosing it is refused.
    tampered_accept_is_refused("key_agreement_protocol", "curve25519");
}

#[test]
fn accepting_a_start_picks_v2_whenever_offered() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    for (macs, picked) in [
        (json!(["hkdf-hmac-sha256", "hkdf-hmac-sha256.v2"]), "hkdf-hmac-sha256.v2"),
        (
            json!(["hkdf-hmac-sha256", "org.matrix.msc3783.hkdf-hmac-sha256"]),
            "org.matrix.msc3783.hkdf-hmac-sha256",
        ),
    ] {
        // Legacy listed first, for both the MAC and the key agreement.
        let start = json!({
            "method": "m.sas.v1", "from_device": "ALICE", "transaction_id": "txn1",
            "key_agreement_protocols": ["curve25519", "curve25519-hkdf-sha256"],
            "hashes": ["sha256"], "message_authentication_codes": macs,
            "short_authentication_string": ["decimal", "emoji"],
        });
        let msg = OutgoingContent { event_type: event_types::START, content: start };
        let (b, accept) = deliver(created(&bob, &alice, flow()), &[msg], T0);
        assert!(matches!(b, SasState::Accepted(_)));
        assert_eq!(accept[0].content["message_authentication_code"], picked);
        assert_eq!(accept[0].content["key_agreement_protocol"], "curve25519-hkdf-sha256");
    }
}

#[test]
fn unsupported_methods_are_unknown_method() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let base = json!({
        "method": "m.sas.v1", "from_device": "ALICE", "transaction_id": "txn1",
        "key_agreement_protocols": ["curve25519-hkdf-sha256"], "hashes": ["sha256"],
        "message_authentication_codes": ["hkdf-hmac-sha256.v2"],
        "short_authentication_string": ["decimal"],
    });
    for (field, value, code) in [
        ("key_agreement_protocols", json!(["curve25519"]), CancelCode::UnknownMethod),
        ("hashes", json!(["sha512"]), CancelCode::UnknownMethod),
        ("message_authentication_codes", json!(["hmac-sha256"]), CancelCode::UnknownMethod),
        ("short_authentication_string", json!(["words"]), CancelCode::UnknownMethod),
        ("hashes", json!("sha256"), CancelCode::InvalidMessage),
        ("from_device", json!("MALLORY"), CancelCode::UserMismatch),
    ] {
        let mut start = base.clone();
        start[field] = value;
        let msg = OutgoingContent { event_type: event_types::START, content: start };
        let (b, _) = deliver(created(&bob, &alice, flow()), &[msg], T0);
        assert_eq!(cancelled(&b).code, code, "{field}");
    }
    // Decimal only: no emoji offered.
    let msg = OutgoingContent { event_type: event_types::START, content: base };
    let (b, accept) = deliver(created(&bob, &alice, flow()), &[msg], T0);
    assert!(matches!(b, SasState::Accepted(_)));
    assert_eq!(accept[0].content["short_authentication_string"], json!(["decimal"]));
}

#[test]
fn out_of_order_and_foreign_messages() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    // A MAC before any key exchange.
    let mac = OutgoingContent {
        event_type: event_types::MAC,
        content: json!({"mac": {}, "keys": "x", "transaction_id": "txn1"}),
    };
    let SasState::Created(a) = created(&alice, &bob, flow()) else { unreachable!() };
    let (a, _) = a.start();
    let (a, _) = deliver(SasState::Started(a), &[mac.clone()], T0);
    assert_eq!(cancelled(&a).code, CancelCode::UnexpectedMessage);
    // Another flow's message is ignored.
    let SasState::Created(a) = created(&alice, &bob, flow()) else { unreachable!() };
    let (a, _) = a.start();
    let mut other = mac;
    other.content["transaction_id"] = json!("other");
    let (a, out) = deliver(SasState::Started(a), &[other], T0);
    assert!(out.is_empty() && matches!(a, SasState::Started(_)));
    // Their cancel ends the flow without an answer.
    let cancel = cancel_content(&flow(), &CancelCode::User);
    let (a, out) = deliver(a, &[cancel], T0);
    assert!(out.is_empty());
    assert_eq!(cancelled(&a), &Cancelled { code: CancelCode::User, by_us: false });
}

#[test]
fn timeout_after_ten_minutes() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let (a, _) = to_keys_exchanged(&alice, &bob, flow());
    assert_eq!(a.timeout_at(), Some(T0 + VERIFICATION_TIMEOUT_MS));
    let step = a.poll_timeout(T0 + VERIFICATION_TIMEOUT_MS - 1);
    assert!(step.outgoing.is_empty());
    let step = step.state.poll_timeout(T0 + VERIFICATION_TIMEOUT_MS);
    assert_eq!(cancelled(&step.state).code, CancelCode::Timeout);
    assert_eq!(step.outgoing[0].content["code"], "m.timeout");
    // A late confirm times out too.
    let (a, _) = to_keys_exchanged(&alice, &bob, flow());
    let (a, out) = confirm(a, T0 + VERIFICATION_TIMEOUT_MS + 5);
    assert_eq!(cancelled(&a).code, CancelCode::Timeout);
    assert_eq!(out.len(), 1);
}

#[test]
fn sas_mismatch_and_user_cancel() {
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    let (a, _) = to_keys_exchanged(&alice, &bob, flow());
    let SasState::KeysExchanged(k) = a else { unreachable!() };
    let step = k.mismatch();
    assert_eq!(cancelled(&step.state).code, CancelCode::MismatchedSas);
    assert_eq!(step.outgoing[0].content["code"], "m.mismatched_sas");
    let (a, _) = to_keys_exchanged(&alice, &bob, flow());
    let step = a.cancel(CancelCode::User);
    assert_eq!(step.outgoing[0].content["code"], "m.user");
    // A finished flow ignores everything.
    let step = step.state.receive(event_types::DONE, &json!({"transaction_id": "txn1"}), T0);
    assert!(step.outgoing.is_empty() && step.state.is_finished());
}

#[test]
fn device_id_clashing_with_cross_signing_key_is_refused() {
    let alice = side("@alice:hs", "ALICE");
    let mut bob = side("@bob:hs", "BOB");
    bob.device = DeviceId::parse(bob.master.to_base64()).unwrap();
    assert_eq!(Created::new(ids(&alice, &bob), flow(), T0).err(), Some(CancelCode::KeyMismatch));
}

#[test]
fn accept_without_method_is_fine_but_a_wrong_method_is_not() {
    // The spec's `accept` has no `method`; matrix-sdk-crypto sends none.
    let alice = side("@alice:hs", "ALICE");
    let bob = side("@bob:hs", "BOB");
    for (method, ok) in [(None, true), (Some(json!("m.sas.v1")), true), (Some(json!("m.x")), false)]
    {
        let SasState::Created(a) = created(&alice, &bob, flow()) else { unreachable!() };
        let (a, start) = a.start();
        let (_, mut accept) = deliver(created(&bob, &alice, flow()), &[start], T0);
        let fields = accept[0].content.as_object_mut().unwrap();
        match &method {
            Some(m) => fields.insert("method".into(), m.clone()),
            None => fields.remove("method"),
        };
        let (a, out) = deliver(SasState::Started(a), &accept, T0);
        if ok {
            assert!(matches!(a, SasState::KeySent(_)), "{method:?}");
            assert_eq!(out[0].event_type, event_types::KEY);
        } else {
            assert_eq!(cancelled(&a).code, CancelCode::UnknownMethod);
        }
    }
}
