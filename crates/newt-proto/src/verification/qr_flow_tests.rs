//! A shower and a scanner driven against each other in all three modes,
//! plus the attacks: a wrong secret, a code carrying other keys, a code of
//! another flow.

use super::*;
use crate::ids::{DeviceId, UserId};
use crate::verification::sas::ExpectedKeys;
use vodozemac::Ed25519SecretKey;

const T0: u64 = 1_000_000;

#[derive(Clone)]
struct Side {
    user: UserId,
    device: DeviceId,
    device_key: Ed25519PublicKey,
    master: Ed25519PublicKey,
}

fn key() -> Ed25519PublicKey {
    Ed25519SecretKey::new().public_key()
}

fn side(user: &str, device: &str, master: Ed25519PublicKey) -> Side {
    Side {
        user: UserId::parse(user).unwrap(),
        device: DeviceId::parse(device).unwrap(),
        device_key: key(),
        master,
    }
}

/// `me`'s view of a flow with `them`; `trusts_own_master` says whether
/// `me` trusts its own user's master key.
fn ids(me: &Side, them: &Side, trusts_own_master: bool) -> SasIds {
    SasIds {
        own_user: me.user.clone(),
        own_device: me.device.clone(),
        own_device_key: me.device_key,
        own_master_key: trusts_own_master.then_some(me.master),
        other_user: them.user.clone(),
        other: ExpectedKeys {
            device_id: them.device.clone(),
            device_key: them.device_key,
            master_key: Some(them.master),
            cross_signing_key_ids: vec![],
        },
    }
}

fn flow() -> FlowId {
    FlowId::ToDevice("qr-txn".into())
}

fn deliver(mut to: QrState, msgs: &[OutgoingContent], now: u64) -> (QrState, Vec<OutgoingContent>) {
    let mut out = Vec::new();
    for m in msgs {
        let step = to.receive(m.event_type, &m.content, now);
        to = step.state;
        out.extend(step.outgoing);
    }
    (to, out)
}

fn done(state: &QrState) -> &VerifiedKeys {
    match state {
        QrState::Done(d) => &d.verified,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn cancelled(state: &QrState) -> &Cancelled {
    match state {
        QrState::Cancelled(c) => c,
        other => panic!("expected Cancelled, got {other:?}"),
    }
}

/// Runs show → scan → reciprocate → confirm → done both ways.
fn run(
    shower: (&Side, &Side, bool),
    scanner: (&Side, &Side, bool),
) -> (VerifiedKeys, VerifiedKeys, QrMode) {
    let (s_me, s_them, s_trust) = shower;
    let (c_me, c_them, c_trust) = scanner;
    let shown = show(&ids(s_me, s_them, s_trust), Some(s_me.master), flow(), T0).unwrap();
    let bytes = shown.bytes().unwrap();
    let mode = QrPayload::decode(&bytes).unwrap().mode;
    let step = scan(&ids(c_me, c_them, c_trust), Some(c_me.master), flow(), &bytes, T0).unwrap();
    assert!(matches!(step.state, QrState::Reciprocated(_)), "{:?}", step.state);
    assert_eq!(step.outgoing.len(), 1);
    assert_eq!(step.outgoing[0].content["method"], METHOD_RECIPROCATE_V1);
    let scanner_state = step.state;
    let (shower_state, back) = deliver(QrState::Shown(shown), &step.outgoing, T0 + 1);
    assert!(back.is_empty());
    assert!(matches!(shower_state, QrState::Scanned(_)));
    let confirmed = shower_state.confirm(T0 + 1);
    assert_eq!(confirmed.outgoing[0].event_type, event_types::DONE);
    assert!(matches!(confirmed.state, QrState::Confirmed(_)));
    let (scanner_state, scanner_done) = deliver(scanner_state, &confirmed.outgoing, T0 + 2);
    assert_eq!(scanner_done.len(), 1);
    assert_eq!(scanner_done[0].event_type, event_types::DONE);
    let (shower_state, _) = deliver(confirmed.state, &scanner_done, T0 + 3);
    (done(&shower_state).clone(), done(&scanner_state).clone(), mode)
}

#[test]
fn mode_0_other_user_both_sides_verify_the_other_master_key() {
    let alice = side("@alice:hs", "ALICE1", key());
    let bob = side("@bob:hs", "BOB1", key());
    let (shower, scanner, mode) = run((&alice, &bob, true), (&bob, &alice, true));
    assert_eq!(mode, QrMode::VerifyingAnotherUser);
    assert_eq!((shower.master_key, shower.device_key), (Some(bob.master), None));
    assert_eq!((scanner.master_key, scanner.device_key), (Some(alice.master), None));
    assert_eq!(shower.user_id, bob.user);
    assert_eq!(scanner.user_id, alice.user);
}

#[test]
fn mode_1_trusted_shower_verifies_the_device_scanner_trusts_the_master_key() {
    let master = key();
    let old = side("@alice:hs", "OLD", master);
    let new = side("@alice:hs", "NEW", master);
    let (shower, scanner, mode) = run((&old, &new, true), (&new, &old, false));
    assert_eq!(mode, QrMode::SelfVerifyingMasterKeyTrusted);
    assert_eq!((shower.device_key, shower.master_key), (Some(new.device_key), None));
    assert_eq!((scanner.device_key, scanner.master_key), (None, Some(master)));
}

#[test]
fn mode_2_untrusted_shower_trusts_the_master_key_scanner_verifies_the_device() {
    let master = key();
    let new = side("@alice:hs", "NEW", master);
    let old = side("@alice:hs", "OLD", master);
    let (shower, scanner, mode) = run((&new, &old, false), (&old, &new, true));
    assert_eq!(mode, QrMode::SelfVerifyingMasterKeyUntrusted);
    assert_eq!((shower.device_key, shower.master_key), (None, Some(master)));
    assert_eq!((scanner.device_key, scanner.master_key), (Some(new.device_key), None));
}

#[test]
fn nothing_to_show_without_a_trusted_master_key_for_another_user() {
    let alice = side("@alice:hs", "ALICE1", key());
    let bob = side("@bob:hs", "BOB1", key());
    assert!(show(&ids(&alice, &bob, false), Some(alice.master), flow(), T0).is_none());
    let mut no_master = ids(&alice, &bob, true);
    no_master.other.master_key = None;
    assert!(show(&no_master, Some(alice.master), flow(), T0).is_none());
}

#[test]
fn a_wrong_secret_cancels_with_key_mismatch() {
    let alice = side("@alice:hs", "ALICE1", key());
    let bob = side("@bob:hs", "BOB1", key());
    let shown = show(&ids(&alice, &bob, true), Some(alice.master), flow(), T0).unwrap();
    let mut forged = shown.payload.clone();
    forged.secret = vec![7; 16];
    let start = forged.reciprocate_start(&flow(), "BOB1");
    let (state, out) = deliver(QrState::Shown(shown), &[start], T0);
    assert_eq!(cancelled(&state).code, CancelCode::KeyMismatch);
    assert_eq!(out[0].content["code"], "m.key_mismatch");
}

#[test]
fn a_code_with_a_swapped_key_cancels_the_scan_with_key_mismatch() {
    let alice = side("@alice:hs", "ALICE1", key());
    let bob = side("@bob:hs", "BOB1", key());
    // A man in the middle shows a code with his own master key for Alice.
    let mallory = Side { master: key(), ..alice.clone() };
    let shown = show(&ids(&mallory, &bob, true), Some(mallory.master), flow(), T0).unwrap();
    let step =
        scan(&ids(&bob, &alice, true), Some(bob.master), flow(), &shown.bytes().unwrap(), T0)
            .unwrap();
    assert_eq!(cancelled(&step.state).code, CancelCode::KeyMismatch);
    assert_eq!(step.outgoing[0].event_type, event_types::CANCEL);
    // And a code claiming a different master key for the scanner.
    let wrong_for_bob = Side { master: key(), ..bob.clone() };
    let shown = show(&ids(&alice, &wrong_for_bob, true), Some(alice.master), flow(), T0).unwrap();
    let step =
        scan(&ids(&bob, &alice, true), Some(bob.master), flow(), &shown.bytes().unwrap(), T0)
            .unwrap();
    assert_eq!(cancelled(&step.state).code, CancelCode::KeyMismatch);
}

#[test]
fn a_code_of_another_flow_or_mode_is_an_error_not_a_cancel() {
    let alice = side("@alice:hs", "ALICE1", key());
    let bob = side("@bob:hs", "BOB1", key());
    let shown = show(&ids(&alice, &bob, true), Some(alice.master), flow(), T0).unwrap();
    let bytes = shown.bytes().unwrap();
    let other = FlowId::ToDevice("other".into());
    assert_eq!(
        scan(&ids(&bob, &alice, true), Some(bob.master), other, &bytes, T0).unwrap_err(),
        ScanError::OtherFlow { found: "qr-txn".into() }
    );
    // A self-verification code scanned in a flow with another user.
    let me2 = side("@alice:hs", "ALICE2", alice.master);
    let self_code = show(&ids(&alice, &me2, true), Some(alice.master), flow(), T0).unwrap();
    assert_eq!(
        scan(&ids(&bob, &alice, true), Some(bob.master), flow(), &self_code.bytes().unwrap(), T0)
            .unwrap_err(),
        ScanError::WrongMode
    );
    assert!(matches!(
        scan(&ids(&bob, &alice, true), Some(bob.master), flow(), b"MATRIX", T0),
        Err(ScanError::Payload(_))
    ));
}

#[test]
fn sas_messages_timeouts_and_cancels() {
    let alice = side("@alice:hs", "ALICE1", key());
    let bob = side("@bob:hs", "BOB1", key());
    let shown = || show(&ids(&alice, &bob, true), Some(alice.master), flow(), T0).unwrap();
    // A SAS start where a reciprocation was expected.
    let mut sas_start = Map::new();
    sas_start.insert("method".into(), "m.sas.v1".into());
    flow().decorate(&mut sas_start);
    let msg = OutgoingContent { event_type: event_types::START, content: Value::Object(sas_start) };
    let (state, _) = deliver(QrState::Shown(shown()), &[msg], T0);
    assert_eq!(cancelled(&state).code, CancelCode::UnknownMethod);
    // A mac in a QR flow is unexpected.
    let mut mac = Map::new();
    flow().decorate(&mut mac);
    let msg = OutgoingContent { event_type: event_types::MAC, content: Value::Object(mac) };
    let (state, _) = deliver(QrState::Shown(shown()), &[msg], T0);
    assert_eq!(cancelled(&state).code, CancelCode::UnexpectedMessage);
    // Their cancel is recorded, never answered.
    let cancel = cancel_content(&flow(), &CancelCode::User);
    let (state, out) = deliver(QrState::Shown(shown()), &[cancel], T0);
    assert_eq!(cancelled(&state), &Cancelled { code: CancelCode::User, by_us: false });
    assert!(out.is_empty());
    // Timeout.
    let step = QrState::Shown(shown()).poll_timeout(T0 + VERIFICATION_TIMEOUT_MS);
    assert_eq!(cancelled(&step.state).code, CancelCode::Timeout);
    assert!(QrState::Shown(shown()).poll_timeout(T0 + 1).state.timeout_at().is_some());
    // Messages of another flow are ignored.
    let other = cancel_content(&FlowId::ToDevice("other".into()), &CancelCode::User);
    let (state, _) = deliver(QrState::Shown(shown()), &[other], T0);
    assert!(matches!(state, QrState::Shown(_)));
}

#[test]
fn mode_2_is_only_scanned_by_a_device_that_trusts_the_master_key() {
    let master = key();
    let new = side("@alice:hs", "NEW", master);
    let other_new = side("@alice:hs", "NEW2", master);
    let shown = show(&ids(&new, &other_new, false), Some(master), flow(), T0).unwrap();
    assert_eq!(shown.payload.mode, QrMode::SelfVerifyingMasterKeyUntrusted);
    // Two devices that both merely have the (maybe server-substituted)
    // master key stored cannot vouch for it to each other.
    assert_eq!(
        scan(&ids(&other_new, &new, false), Some(master), flow(), &shown.bytes().unwrap(), T0)
            .unwrap_err(),
        ScanError::MasterKeyNotTrusted
    );
}

#[test]
fn confirming_after_the_deadline_times_out() {
    let alice = side("@alice:hs", "ALICE1", key());
    let bob = side("@bob:hs", "BOB1", key());
    let shown = show(&ids(&alice, &bob, true), Some(alice.master), flow(), T0).unwrap();
    let start = shown.payload.reciprocate_start(&flow(), "BOB1");
    let (state, _) = deliver(QrState::Shown(shown), &[start], T0);
    let step = state.confirm(T0 + VERIFICATION_TIMEOUT_MS);
    assert_eq!(cancelled(&step.state).code, CancelCode::Timeout);
}

#[test]
fn their_done_before_our_confirmation_finishes_on_confirm() {
    let alice = side("@alice:hs", "ALICE1", key());
    let bob = side("@bob:hs", "BOB1", key());
    let shown = show(&ids(&alice, &bob, true), Some(alice.master), flow(), T0).unwrap();
    let start = shown.payload.reciprocate_start(&flow(), "BOB1");
    let (state, _) = deliver(QrState::Shown(shown), &[start], T0);
    let mut done_msg = Map::new();
    flow().decorate(&mut done_msg);
    let msg = OutgoingContent { event_type: event_types::DONE, content: Value::Object(done_msg) };
    let (state, _) = deliver(state, &[msg], T0);
    assert!(matches!(state, QrState::Scanned(_)));
    let step = state.confirm(T0 + 1);
    assert_eq!(done(&step.state).master_key, Some(bob.master));
}
