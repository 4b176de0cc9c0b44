//! In-room verification between two users, newt (Alice) and
//! matrix-sdk-crypto 0.18 (Bob), in an encrypted room through newt-router:
//! SAS with either side requesting, and QR codes with either side showing.
//! After each flow both sides report the other user's identity as
//! verified (each signed the other's master key with its user-signing
//! key and uploaded the signature).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use matrix_sdk_crypto::matrix_sdk_qrcode::qrcode::Color;
use matrix_sdk_crypto::matrix_sdk_qrcode::QrVerificationData;
use matrix_sdk_crypto::Verification;
use newt::{IdentityTrust, RoomId, RoomSettings, VerificationState};
use newt_interop::ruma::events::key::verification::VerificationMethod;
use newt_interop::ruma::events::room::message::RoomMessageEventContent;
use newt_interop::ruma::{OwnedEventId, OwnedRoomId};
use newt_interop::RefDevice;
use newt_router::Router;
use newt_test_support::{dev, uid, SimDevice};

const ALICE: &str = "@alice:localhost";
const BOB: &str = "@bob:localhost";
const NEWT_DEV: &str = "NEWTDEV";
const REF_DEV: &str = "REFDEV";
const ROOM: &str = "!dm:localhost";

struct World {
    newt: SimDevice,
    reference: RefDevice,
    room: RoomId,
    ref_room: OwnedRoomId,
    newt_seen: usize,
    ref_seen: usize,
}

impl World {
    async fn new() -> Self {
        let router = Arc::new(Router::new());
        let newt = dev(&router, ALICE, NEWT_DEV).await;
        let reference = RefDevice::open(router.clone(), BOB, REF_DEV).await.unwrap();
        reference.flush().await.unwrap();

        newt.bootstrap_cross_signing().await.unwrap();
        reference.bootstrap_cross_signing().await.unwrap();

        let (alice, bob) = (uid(ALICE), uid(BOB));
        let (ref_alice, ref_bob) =
            (RefDevice::user_id(ALICE).unwrap(), RefDevice::user_id(BOB).unwrap());
        reference
            .machine
            .update_tracked_users([ref_alice.as_ref(), ref_bob.as_ref()])
            .await
            .unwrap();
        reference.flush().await.unwrap();
        newt.sync().await.unwrap();
        newt.machine.update_tracked_users([alice.clone(), bob.clone()]).await.unwrap();
        newt.flush().await.unwrap();

        let room = RoomId::parse(ROOM).unwrap();
        let ref_room = RefDevice::room(ROOM).unwrap();
        newt.share_room_key(&room, &[alice, bob], &RoomSettings::default()).await.unwrap();
        reference.sync().await.unwrap();
        reference.share_room_key(&ref_room, &[ref_alice, ref_bob]).await.unwrap();
        newt.sync().await.unwrap();
        let w = Self { newt, reference, room, ref_room, newt_seen: 0, ref_seen: 0 };
        assert_eq!(w.newt_view_of_bob().await, Some(IdentityTrust::Pinned));
        assert!(!w.reference_view_of_alice().await);
        w
    }

    async fn newt_catch_up(&mut self) {
        let events = self.newt.router().room_events(ROOM).unwrap();
        for e in &events[self.newt_seen..] {
            self.newt.machine.receive_room_verification_event(&self.room, e).await.unwrap();
        }
        self.newt_seen = events.len();
        self.newt.flush().await.unwrap();
    }

    async fn ref_catch_up(&mut self) {
        self.reference.feed_room(&self.ref_room, &mut self.ref_seen).await.unwrap();
    }

    async fn both_catch_up(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.ref_catch_up().await;
            self.newt_catch_up().await;
        }
    }

    fn ref_request(&self, flow: &str) -> matrix_sdk_crypto::VerificationRequest {
        let alice = RefDevice::user_id(ALICE).unwrap();
        self.reference
            .machine
            .get_verification_request(&alice, flow)
            .expect("reference knows the flow")
    }

    async fn newt_view_of_bob(&self) -> Option<IdentityTrust> {
        self.newt.machine.user_identity_state(&uid(BOB)).await.unwrap()
    }

    async fn reference_view_of_alice(&self) -> bool {
        let alice = RefDevice::user_id(ALICE).unwrap();
        self.reference
            .machine
            .get_identity(&alice, None)
            .await
            .unwrap()
            .expect("the reference knows Alice's identity")
            .is_verified()
    }

    /// Both sides re-query after the signature uploads and see the other
    /// user as verified.
    async fn assert_verified_both_ways(&mut self) {
        for _ in 0..2 {
            self.newt.sync().await.unwrap();
            self.reference.sync().await.unwrap();
        }
        assert_eq!(self.newt_view_of_bob().await, Some(IdentityTrust::Verified));
        assert!(self.reference_view_of_alice().await, "the reference verified Alice's identity");
    }

    /// newt (Alice) sends an in-room request; the reference (Bob) accepts.
    async fn newt_requests(&mut self) -> String {
        let bob = uid(BOB);
        let content = self.newt.machine.room_verification_request_content(&bob).await;
        let event = self.newt.send_event(&self.room, "m.room.message", content).await.unwrap();
        let flow = event["event_id"].as_str().unwrap().to_owned();
        self.newt.machine.room_verification_request_sent(&self.room, &flow, &bob).await.unwrap();
        self.ref_catch_up().await;
        let request = self.ref_request(&flow);
        // A phone app would offer to scan too (the reference's `accept()`
        // offers SAS, showing and reciprocating only).
        let methods = vec![
            VerificationMethod::SasV1,
            VerificationMethod::QrCodeShowV1,
            VerificationMethod::QrCodeScanV1,
            VerificationMethod::ReciprocateV1,
        ];
        self.reference
            .send_verification(request.accept_with_methods(methods).unwrap())
            .await
            .unwrap();
        self.newt_catch_up().await;
        assert_eq!(
            self.newt.machine.verification_state(&flow).await,
            Some(VerificationState::Ready)
        );
        assert!(request.is_ready());
        flow
    }

    /// The reference (Bob) sends an in-room request; newt (Alice) accepts.
    async fn reference_requests(&mut self) -> String {
        let alice = RefDevice::user_id(ALICE).unwrap();
        let identity = self
            .reference
            .machine
            .get_identity(&alice, None)
            .await
            .unwrap()
            .unwrap()
            .other()
            .unwrap();
        let msgtype = identity.verification_request_content(None);
        let content = serde_json::to_value(RoomMessageEventContent::new(msgtype)).unwrap();
        let event =
            self.reference.send_event(&self.ref_room, "m.room.message", &content).await.unwrap();
        let flow = event["event_id"].as_str().unwrap().to_owned();
        let event_id: OwnedEventId = flow.as_str().try_into().unwrap();
        identity.request_verification(&self.ref_room, &event_id, None);
        // The reference skips its own request when it reads the timeline.
        self.ref_seen = self.reference_router_len();
        self.newt_catch_up().await;
        assert_eq!(
            self.newt.machine.verification_state(&flow).await,
            Some(VerificationState::RequestReceived)
        );
        self.newt.machine.accept_verification(&flow).await.unwrap();
        self.newt.flush().await.unwrap();
        self.ref_catch_up().await;
        assert!(self.ref_request(&flow).is_ready());
        flow
    }

    fn reference_router_len(&self) -> usize {
        self.newt.router().room_events(ROOM).unwrap().len()
    }

    /// SAS from ready to done, comparing the emoji of both sides.
    async fn sas(&mut self, flow: &str, newt_starts: bool) {
        if newt_starts {
            self.newt.machine.start_sas(flow).await.unwrap();
            self.newt.flush().await.unwrap();
            self.ref_catch_up().await;
            let sas = self.ref_sas(flow);
            self.reference.send_verification(sas.accept().unwrap()).await.unwrap();
        } else {
            let (_, start) = self.ref_request(flow).start_sas().await.unwrap().unwrap();
            self.reference.send_verification(start).await.unwrap();
        }
        self.both_catch_up(3).await;
        let sas = self.ref_sas(flow);
        assert!(sas.can_be_presented(), "{:?}", sas.cancel_info());
        assert_eq!(
            self.newt.machine.sas_emoji_indices(flow).await,
            Some(sas.emoji_index().unwrap())
        );
        let (requests, signatures) = sas.confirm().await.unwrap();
        for r in requests {
            self.reference.send_verification(r).await.unwrap();
        }
        if let Some(sig) = signatures {
            self.reference
                .send(
                    &newt_interop::ruma::TransactionId::new(),
                    &matrix_sdk_crypto::types::requests::AnyOutgoingRequest::SignatureUpload(sig),
                )
                .await
                .unwrap();
        }
        self.newt.machine.confirm_sas(flow).await.unwrap();
        self.newt.flush().await.unwrap();
        self.both_catch_up(3).await;
        assert!(sas.is_done(), "reference: {:?}", sas.cancel_info());
        assert_eq!(self.newt.machine.verification_state(flow).await, Some(VerificationState::Done));
    }

    fn ref_sas(&self, flow: &str) -> matrix_sdk_crypto::Sas {
        let alice = RefDevice::user_id(ALICE).unwrap();
        match self.reference.machine.get_verification(&alice, flow) {
            Some(Verification::SasV1(s)) => *s,
            other => panic!("no SAS in the reference: {other:?}"),
        }
    }
}

#[tokio::test]
async fn sas_in_room_newt_requests_and_starts() {
    let mut w = World::new().await;
    let flow = w.newt_requests().await;
    w.sas(&flow, true).await;
    w.assert_verified_both_ways().await;
}

#[tokio::test]
async fn sas_in_room_reference_requests_and_starts() {
    let mut w = World::new().await;
    let flow = w.reference_requests().await;
    w.sas(&flow, false).await;
    w.assert_verified_both_ways().await;
}

#[tokio::test]
async fn qr_in_room_newt_shows_reference_scans() {
    let mut w = World::new().await;
    let flow = w.newt_requests().await;
    let code = w.newt.machine.qr_code(&flow).await.unwrap().expect("newt shows a code");
    // newt's rendering (feature `qr-matrix`) is module for module the
    // reference's rendering of the same payload.
    let ours = newt::QrMatrix::render(&code).unwrap();
    let data = QrVerificationData::from_bytes(code).unwrap();
    let theirs = data.to_qr_code().unwrap();
    assert_eq!(ours.width, theirs.width());
    let dark: Vec<bool> = theirs.to_colors().into_iter().map(|c| c == Color::Dark).collect();
    assert_eq!(ours.modules, dark);
    let qr = w.ref_request(&flow).scan_qr_code(data).await.unwrap().expect("reference scans");
    w.reference.send_verification(qr.reciprocate().unwrap()).await.unwrap();
    w.newt_catch_up().await;
    assert_eq!(w.newt.machine.verification_state(&flow).await, Some(VerificationState::QrScanned));
    w.newt.machine.confirm_qr_scanned(&flow).await.unwrap();
    w.newt.flush().await.unwrap();
    w.both_catch_up(2).await;
    assert!(qr.is_done(), "reference: {:?}", qr.cancel_info());
    assert_eq!(w.newt.machine.verification_state(&flow).await, Some(VerificationState::Done));
    w.assert_verified_both_ways().await;
}

#[tokio::test]
async fn qr_in_room_reference_shows_newt_scans() {
    let mut w = World::new().await;
    let flow = w.reference_requests().await;
    let qr =
        w.ref_request(&flow).generate_qr_code().await.unwrap().expect("reference shows a code");
    let code = qr.to_bytes().unwrap();
    assert_eq!(code[7], 0x00, "mode: verifying another user");
    w.newt.machine.scan_qr_code(&flow, &code).await.unwrap();
    w.newt.flush().await.unwrap();
    w.ref_catch_up().await;
    assert!(qr.has_been_scanned(), "reference: {:?}", qr.cancel_info());
    w.reference.send_verification(qr.confirm_scanning().unwrap()).await.unwrap();
    w.both_catch_up(2).await;
    assert!(qr.is_done(), "reference: {:?}", qr.cancel_info());
    assert_eq!(w.newt.machine.verification_state(&flow).await, Some(VerificationState::Done));
    w.assert_verified_both_ways().await;
}
