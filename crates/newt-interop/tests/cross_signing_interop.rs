//! matrix-sdk-crypto 0.18 accepts the cross-signing identity newt
//! bootstraps and uploads (through newt-router): same master key, and
//! newt's device cross-signed by its owner.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use newt_interop::RefDevice;
use newt_router::Router;
use newt_test_support::dev;

const ALICE: &str = "@alice:localhost";
const NEWT_DEV: &str = "NEWTDEV";
const BOB: &str = "@bob:localhost";
const REF_DEV: &str = "REFDEV";

#[tokio::test]
async fn reference_accepts_newt_cross_signing_identity() {
    let router = Arc::new(Router::new());
    let newt = dev(&router, ALICE, NEWT_DEV).await;
    let reference = RefDevice::open(router.clone(), BOB, REF_DEV).await.unwrap();
    reference.flush().await.unwrap();

    let master = newt.bootstrap_cross_signing().await.unwrap();

    let alice = RefDevice::user_id(ALICE).unwrap();
    reference.machine.update_tracked_users([alice.as_ref()]).await.unwrap();
    reference.flush().await.unwrap();
    let identity = reference
        .machine
        .get_identity(&alice, None)
        .await
        .unwrap()
        .expect("the reference stored newt's identity")
        .other()
        .expect("another user's identity");
    assert_eq!(identity.master_key().get_first_key().unwrap().to_base64(), master);
    let device =
        reference.machine.get_device(&alice, NEWT_DEV.into(), None).await.unwrap().unwrap();
    assert!(device.is_cross_signed_by_owner(), "newt's SSK signature on its device checks out");
}
