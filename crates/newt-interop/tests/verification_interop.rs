//! SAS verification over to-device between a newt device and a
//! matrix-sdk-crypto 0.18 device of the same user, through newt-router,
//! with either side starting: both show the same emoji and end up
//! trusting the other device.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use matrix_sdk_crypto::types::requests::AnyOutgoingRequest;
use matrix_sdk_crypto::Sas;
use newt::{DeviceId, LocalTrust, UserId, VerificationState};
use newt_cli::SimDevice;
use newt_interop::RefDevice;
use newt_router::Router;
use newt_store::MemoryStore;
use ruma::TransactionId;

const ALICE: &str = "@alice:localhost";
const NEWT_DEV: &str = "NEWTDEV";
const REF_DEV: &str = "REFDEV";

async fn pair() -> (SimDevice, RefDevice) {
    let router = Arc::new(Router::new());
    let newt = SimDevice::open(router.clone(), ALICE, NEWT_DEV, Arc::new(MemoryStore::new()))
        .await
        .unwrap();
    let reference = RefDevice::open(router.clone(), ALICE, REF_DEV).await.unwrap();
    newt.flush().await.unwrap();
    reference.flush().await.unwrap();
    let alice = RefDevice::user_id(ALICE).unwrap();
    reference.machine.update_tracked_users([alice.as_ref()]).await.unwrap();
    reference.flush().await.unwrap();
    newt.sync().await.unwrap();
    newt.machine.update_tracked_users([UserId::parse(ALICE).unwrap()]).await.unwrap();
    newt.flush().await.unwrap();
    let devices = newt.machine.devices(&UserId::parse(ALICE).unwrap()).await.unwrap();
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
        .devices(&UserId::parse(ALICE).unwrap())
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.device_id == DeviceId::parse(REF_DEV).unwrap())
        .unwrap();
    assert_eq!(record.local_trust, LocalTrust::Verified);
}

#[tokio::test]
async fn newt_requests_and_starts_reference_accepts() {
    let (newt, reference) = pair().await;
    let alice = RefDevice::user_id(ALICE).unwrap();
    let (flow, request) = newt
        .machine
        .request_verification(&UserId::parse(ALICE).unwrap(), &DeviceId::parse(REF_DEV).unwrap())
        .await
        .unwrap();
    newt.send(&request).await.unwrap();
    reference.sync().await.unwrap();
    let ref_request = reference.machine.get_verification_request(&alice, &flow).unwrap();
    reference.send_verification(ref_request.accept().unwrap()).await.unwrap();
    newt.sync().await.unwrap();
    assert_eq!(newt.machine.verification_state(&flow).await, Some(VerificationState::Ready));
    newt.machine.start_sas(&flow).await.unwrap();
    newt.flush().await.unwrap();
    reference.sync().await.unwrap();
    reference.send_verification(sas(&reference, &flow).accept().unwrap()).await.unwrap();
    newt.sync().await.unwrap(); // accept -> our key
    reference.sync().await.unwrap(); // key -> its key
    newt.sync().await.unwrap();
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
