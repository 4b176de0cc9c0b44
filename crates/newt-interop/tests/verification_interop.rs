//! Verification over to-device between a newt device and a
//! matrix-sdk-crypto 0.18 device of the same user, through newt-router:
//! SAS with either side starting (both show the same emoji and end up
//! trusting the other device), and, with the reference holding the
//! cross-signing keys, newt joining that identity by SAS and by QR code in
//! both roles (mode 0x01 shown by the reference, 0x02 shown by newt).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use matrix_sdk_crypto::matrix_sdk_qrcode::QrVerificationData;
use matrix_sdk_crypto::types::requests::AnyOutgoingRequest;
use matrix_sdk_crypto::{Sas, VerificationRequest};
use newt::{DeviceTrust, LocalTrust, OwnIdentityTrust, VerificationState};
use newt_interop::ruma::events::key::verification::VerificationMethod;
use newt_interop::RefDevice;
use newt_router::Router;
use newt_test_support::{dev, did, uid, SimDevice};
use ruma::TransactionId;

const ALICE: &str = "@alice:localhost";
const NEWT_DEV: &str = "NEWTDEV";
const REF_DEV: &str = "REFDEV";

async fn pair() -> (SimDevice, RefDevice) {
    let router = Arc::new(Router::new());
    let newt = dev(&router, ALICE, NEWT_DEV).await;
    let reference = RefDevice::open(router.clone(), ALICE, REF_DEV).await.unwrap();
    reference.flush().await.unwrap();
    let alice = RefDevice::user_id(ALICE).unwrap();
    reference.machine.update_tracked_users([alice.as_ref()]).await.unwrap();
    reference.flush().await.unwrap();
    newt.sync().await.unwrap();
    newt.machine.update_tracked_users([uid(ALICE)]).await.unwrap();
    newt.flush().await.unwrap();
    let devices = newt.machine.devices(&uid(ALICE)).await.unwrap();
    assert!(devices.iter().any(|d| d.device_id.as_str() == REF_DEV), "newt knows the reference");
    (newt, reference)
}

fn sas(reference: &RefDevice, flow: &str) -> Sas {
    let alice = RefDevice::user_id(ALICE).unwrap();
    *reference.machine.get_verification(&alice, flow).unwrap().sas_v1().unwrap()
}

/// Both compare emoji, both confirm, both end verified.
async fn compare_and_confirm(newt: &SimDevice, reference: &RefDevice, flow: &str) {
    let sas = sas(reference, flow);
    assert!(
        sas.can_be_presented(),
        "{:?} {:?}",
        sas.cancel_info(),
        newt.machine.verification_state(flow).await
    );
    assert_eq!(newt.machine.verification_state(flow).await, Some(VerificationState::KeysExchanged));
    let theirs = sas.emoji_index().unwrap();
    assert_eq!(newt.machine.sas_emoji_indices(flow).await, Some(theirs));
    let ref_numbers = sas.decimals().unwrap();
    let newt_numbers = newt.machine.sas_decimals(flow).await.unwrap();
    assert_eq!(
        (ref_numbers.0, ref_numbers.1, ref_numbers.2),
        (newt_numbers[0], newt_numbers[1], newt_numbers[2])
    );

    let (requests, signatures) = sas.confirm().await.unwrap();
    for r in requests {
        reference.send_verification(r).await.unwrap();
    }
    if let Some(sig) = signatures {
        reference
            .send(&TransactionId::new(), &AnyOutgoingRequest::SignatureUpload(sig))
            .await
            .unwrap();
    }
    newt.machine.confirm_sas(flow).await.unwrap();
    newt.flush().await.unwrap();
    for _ in 0..3 {
        newt.sync().await.unwrap();
        reference.sync().await.unwrap();
    }
    assert!(sas.is_done(), "reference: {:?}", sas.cancel_info());
    assert_eq!(newt.machine.verification_state(flow).await, Some(VerificationState::Done));

    let alice = RefDevice::user_id(ALICE).unwrap();
    let device =
        reference.machine.get_device(&alice, NEWT_DEV.into(), None).await.unwrap().unwrap();
    assert!(device.is_verified());
    let record = newt
        .machine
        .devices(&uid(ALICE))
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.device_id == did(REF_DEV))
        .unwrap();
    assert_eq!(record.local_trust, LocalTrust::Verified);
}

/// newt asks the reference device, which accepts; newt starts SAS and the
/// reference accepts it; keys are exchanged. Returns the flow ID.
async fn newt_requests_and_starts(newt: &SimDevice, reference: &RefDevice) -> String {
    let alice = RefDevice::user_id(ALICE).unwrap();
    let (flow, request) =
        newt.machine.request_verification(&uid(ALICE), &did(REF_DEV)).await.unwrap();
    newt.send(&request).await.unwrap();
    reference.sync().await.unwrap();
    let ref_request = reference.machine.get_verification_request(&alice, &flow).unwrap();
    reference.send_verification(ref_request.accept().unwrap()).await.unwrap();
    newt.sync().await.unwrap();
    assert_eq!(newt.machine.verification_state(&flow).await, Some(VerificationState::Ready));
    newt.machine.start_sas(&flow).await.unwrap();
    newt.flush().await.unwrap();
    reference.sync().await.unwrap();
    reference.send_verification(sas(reference, &flow).accept().unwrap()).await.unwrap();
    newt.sync().await.unwrap(); // accept -> our key
    reference.sync().await.unwrap(); // key -> its key
    newt.sync().await.unwrap();
    flow
}

#[tokio::test]
async fn newt_requests_and_starts_reference_accepts() {
    let (newt, reference) = pair().await;
    let flow = newt_requests_and_starts(&newt, &reference).await;
    compare_and_confirm(&newt, &reference, &flow).await;
}

#[tokio::test]
async fn reference_requests_and_starts_newt_accepts() {
    let (newt, reference) = pair().await;
    let alice = RefDevice::user_id(ALICE).unwrap();
    let device =
        reference.machine.get_device(&alice, NEWT_DEV.into(), None).await.unwrap().unwrap();
    let (ref_request, out) = device.request_verification();
    reference.send_verification(out).await.unwrap();
    let flow = ref_request.flow_id().as_str().to_owned();
    newt.sync().await.unwrap();
    assert_eq!(
        newt.machine.verification_state(&flow).await,
        Some(VerificationState::RequestReceived)
    );
    newt.machine.accept_verification(&flow).await.unwrap();
    newt.flush().await.unwrap();
    reference.sync().await.unwrap();
    assert!(ref_request.is_ready());
    let (_, start) = ref_request.start_sas().await.unwrap().unwrap();
    reference.send_verification(start).await.unwrap();
    newt.sync().await.unwrap(); // start -> accept (newt accepts on its own)
    reference.sync().await.unwrap(); // accept -> its key
    newt.sync().await.unwrap(); // key -> our key
    reference.sync().await.unwrap();
    compare_and_confirm(&newt, &reference, &flow).await;
}

/// Like [`pair`], but the reference created Alice's cross-signing identity
/// (it holds the private keys and trusts the master key); newt only knows
/// the public identity and does not trust it yet.
async fn pair_with_reference_identity() -> (SimDevice, RefDevice) {
    let (newt, reference) = pair().await;
    reference.bootstrap_cross_signing().await.unwrap();
    newt.sync().await.unwrap();
    newt.flush().await.unwrap();
    reference.sync().await.unwrap();
    assert_eq!(
        newt.machine.own_identity_state().await.unwrap(),
        Some(OwnIdentityTrust::Unverified)
    );
    (newt, reference)
}

/// After self-verification: newt trusts the master key the reference
/// created, the reference signed newt's device with its self-signing key
/// and sees it verified, and newt sees the reference's device as verified.
async fn assert_newt_joined_the_identity(newt: &SimDevice, reference: &RefDevice) {
    for _ in 0..2 {
        reference.sync().await.unwrap();
        newt.sync().await.unwrap();
    }
    assert_eq!(newt.machine.own_identity_state().await.unwrap(), Some(OwnIdentityTrust::Verified));
    let alice = RefDevice::user_id(ALICE).unwrap();
    let device =
        reference.machine.get_device(&alice, NEWT_DEV.into(), None).await.unwrap().unwrap();
    assert!(device.is_verified(), "the reference verified newt's device");
    assert!(device.is_cross_signed_by_owner(), "and signed it with the self-signing key");
    let trust = newt.machine.device_trust(&uid(ALICE), &did(REF_DEV)).await.unwrap().unwrap();
    // Verified directly (SAS) or through the now trusted identity (QR).
    assert!(
        matches!(trust, DeviceTrust::LocallyVerified | DeviceTrust::CrossSignedByVerifiedOwner),
        "{trust:?}"
    );
}

fn all_methods() -> Vec<VerificationMethod> {
    vec![
        VerificationMethod::SasV1,
        VerificationMethod::QrCodeShowV1,
        VerificationMethod::QrCodeScanV1,
        VerificationMethod::ReciprocateV1,
    ]
}

/// The reference asks newt (to-device, all methods); newt accepts.
async fn reference_asks(newt: &SimDevice, reference: &RefDevice) -> VerificationRequest {
    let alice = RefDevice::user_id(ALICE).unwrap();
    let device =
        reference.machine.get_device(&alice, NEWT_DEV.into(), None).await.unwrap().unwrap();
    let (request, out) = device.request_verification_with_methods(all_methods());
    reference.send_verification(out).await.unwrap();
    let flow = request.flow_id().as_str().to_owned();
    newt.sync().await.unwrap();
    newt.machine.accept_verification(&flow).await.unwrap();
    newt.flush().await.unwrap();
    reference.sync().await.unwrap();
    assert!(request.is_ready());
    request
}

#[tokio::test]
async fn sas_new_newt_device_joins_the_reference_identity() {
    let (newt, reference) = pair_with_reference_identity().await;
    let request = reference_asks(&newt, &reference).await;
    let flow = request.flow_id().as_str().to_owned();
    let (_, start) = request.start_sas().await.unwrap().unwrap();
    reference.send_verification(start).await.unwrap();
    newt.sync().await.unwrap();
    reference.sync().await.unwrap();
    newt.sync().await.unwrap();
    reference.sync().await.unwrap();
    compare_and_confirm(&newt, &reference, &flow).await;
    assert_newt_joined_the_identity(&newt, &reference).await;
}

#[tokio::test]
async fn qr_reference_shows_mode_1_newt_scans() {
    let (newt, reference) = pair_with_reference_identity().await;
    let request = reference_asks(&newt, &reference).await;
    let flow = request.flow_id().as_str().to_owned();
    let qr = request.generate_qr_code().await.unwrap().expect("the reference shows a code");
    let code = qr.to_bytes().unwrap();
    assert_eq!(code[7], 0x01, "self-verification, the showing device trusts the master key");
    newt.machine.scan_qr_code(&flow, &code).await.unwrap();
    newt.flush().await.unwrap();
    reference.sync().await.unwrap();
    assert!(qr.has_been_scanned(), "{:?}", qr.cancel_info());
    reference.send_verification(qr.confirm_scanning().unwrap()).await.unwrap();
    newt.sync().await.unwrap();
    reference.sync().await.unwrap();
    assert_eq!(newt.machine.verification_state(&flow).await, Some(VerificationState::Done));
    assert!(qr.is_done(), "{:?}", qr.cancel_info());
    assert_newt_joined_the_identity(&newt, &reference).await;
}

#[tokio::test]
async fn qr_newt_shows_mode_2_reference_scans() {
    let (newt, reference) = pair_with_reference_identity().await;
    let request = reference_asks(&newt, &reference).await;
    let flow = request.flow_id().as_str().to_owned();
    let code = newt.machine.qr_code(&flow).await.unwrap().expect("newt shows a code");
    assert_eq!(
        code[7], 0x02,
        "self-verification, the showing device does not trust the master key"
    );
    let data = QrVerificationData::from_bytes(code).unwrap();
    let qr = request.scan_qr_code(data).await.unwrap().expect("the reference scans");
    reference.send_verification(qr.reciprocate().unwrap()).await.unwrap();
    newt.sync().await.unwrap();
    assert_eq!(newt.machine.verification_state(&flow).await, Some(VerificationState::QrScanned));
    newt.machine.confirm_qr_scanned(&flow).await.unwrap();
    newt.flush().await.unwrap();
    reference.sync().await.unwrap();
    newt.sync().await.unwrap();
    assert!(qr.is_done(), "{:?}", qr.cancel_info());
    assert_eq!(newt.machine.verification_state(&flow).await, Some(VerificationState::Done));
    assert_newt_joined_the_identity(&newt, &reference).await;
}

/// The mirror image: newt created Alice's cross-signing identity; the
/// reference device joins it by SAS. The reference then trusts the master
/// key newt made, sees newt's device as verified, and newt signed the
/// reference's device with its self-signing key.
#[tokio::test]
async fn sas_reference_device_joins_the_newt_identity() {
    let (newt, reference) = pair().await;
    newt.bootstrap_cross_signing().await.unwrap();
    newt.sync().await.unwrap();
    reference.sync().await.unwrap();
    let alice = RefDevice::user_id(ALICE).unwrap();
    let own = reference.machine.get_identity(&alice, None).await.unwrap().unwrap().own().unwrap();
    assert!(!own.is_verified(), "the reference does not trust newt's master key yet");

    let flow = newt_requests_and_starts(&newt, &reference).await;
    compare_and_confirm(&newt, &reference, &flow).await;
    for _ in 0..2 {
        newt.sync().await.unwrap();
        reference.sync().await.unwrap();
    }

    let own = reference.machine.get_identity(&alice, None).await.unwrap().unwrap().own().unwrap();
    assert!(own.is_verified(), "the reference now trusts the master key newt created");
    let newt_device =
        reference.machine.get_device(&alice, NEWT_DEV.into(), None).await.unwrap().unwrap();
    assert!(newt_device.is_cross_signed_by_owner() && newt_device.is_verified());
    let ref_device =
        reference.machine.get_device(&alice, REF_DEV.into(), None).await.unwrap().unwrap();
    assert!(
        ref_device.is_cross_signed_by_owner(),
        "newt signed the reference's device with its self-signing key"
    );
    assert_eq!(
        newt.machine.device_trust(&uid(ALICE), &did(REF_DEV)).await.unwrap(),
        Some(DeviceTrust::LocallyVerified)
    );
}
