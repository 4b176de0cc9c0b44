//! Setting up devices on a router: fresh, timed or on a failing store,
//! tracking each other, cross-signed; and small shorthands the tests share.

use std::sync::Arc;

use newt::{ManualClock, ToDeviceError, ToDeviceOutcome, UserId};
use newt_proto::devices::parse_device_keys;
use newt_proto::ids::DeviceId;
use newt_proto::records::DeviceRecord;
use newt_router::Router;
use newt_store::MemoryStore;
use serde_json::Value;

use crate::{FlakyStore, SimDevice};

/// A user ID known to be valid.
pub fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

/// A device ID known to be valid.
pub fn did(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

/// A device on a fresh memory store, keys uploaded.
pub async fn dev(router: &Arc<Router>, user: &str, device: &str) -> SimDevice {
    let d =
        SimDevice::open(router.clone(), user, device, Arc::new(MemoryStore::new())).await.unwrap();
    d.flush().await.unwrap();
    d
}

/// A clock for devices that share virtual time (set to November 2023).
pub fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_700_000_000_000))
}

/// [`dev`] with time from `clock`, which the test moves.
pub async fn timed_dev(
    router: &Arc<Router>,
    user: &str,
    device: &str,
    clock: &Arc<ManualClock>,
) -> SimDevice {
    let store = Arc::new(MemoryStore::new());
    let d = SimDevice::open_with_clock(router.clone(), user, device, store, clock.clone())
        .await
        .unwrap();
    d.flush().await.unwrap();
    d
}

/// [`dev`] on a [`FlakyStore`], returned with it so a test can make it fail.
pub async fn flaky_dev(
    router: &Arc<Router>,
    user: &str,
    device: &str,
) -> (SimDevice, Arc<FlakyStore>) {
    let store = Arc::new(FlakyStore::new());
    let d = SimDevice::open(router.clone(), user, device, store.clone()).await.unwrap();
    d.flush().await.unwrap();
    (d, store)
}

/// Everyone syncs and tracks everyone.
pub async fn settle(devices: &[&SimDevice], users: &[UserId]) {
    for d in devices {
        d.sync().await.unwrap();
        d.machine.update_tracked_users(users.iter().cloned()).await.unwrap();
        d.flush().await.unwrap();
    }
}

/// `d` creates and uploads its user's cross-signing keys, then syncs;
/// returns the master key.
pub async fn bootstrap(d: &SimDevice) -> String {
    let master = d.bootstrap_cross_signing().await.unwrap();
    d.sync().await.unwrap();
    master
}

/// Devices (`(user, device)`) on one router, every device tracking every
/// listed user, and each user's cross-signing identity created by that
/// user's first listed device (and seen by everyone).
pub async fn cross_signed(router: &Arc<Router>, devices: &[(&str, &str)]) -> Vec<SimDevice> {
    let mut out = Vec::new();
    for (user, device) in devices {
        out.push(dev(router, user, device).await);
    }
    let mut users: Vec<UserId> = Vec::new();
    for d in &out {
        if !users.contains(&d.user) {
            users.push(d.user.clone());
        }
    }
    let all: Vec<&SimDevice> = out.iter().collect();
    settle(&all, &users).await;
    for user in &users {
        if let Some(first) = out.iter().find(|d| &d.user == user) {
            bootstrap(first).await;
        }
    }
    settle(&all, &users).await;
    out
}

/// Two devices of Alice: A1 created the cross-signing identity (holds the
/// private keys), A2 is new and does not trust it yet; both know each
/// other and the identity.
pub async fn alice_pair() -> (Arc<Router>, SimDevice, SimDevice) {
    let router = Arc::new(Router::new());
    let mut devices = cross_signed(&router, &[("@alice:hs", "A1"), ("@alice:hs", "A2")]).await;
    let a2 = devices.pop().unwrap();
    let a1 = devices.pop().unwrap();
    assert_ne!(
        a2.machine.own_identity_state().await.unwrap(),
        Some(newt::OwnIdentityTrust::Verified)
    );
    (router, a1, a2)
}

/// A raw POST from `d` (for bodies newt returns but does not send itself).
pub fn post(d: &SimDevice, path: &str, body: &Value) -> Value {
    d.router().handle(d.user.as_str(), d.device.as_str(), "POST", path, body).unwrap()
}

/// `d`'s own device record, as another device would store it.
pub async fn own_record(d: &SimDevice) -> DeviceRecord {
    parse_device_keys(&d.user, d.device.as_str(), &d.machine.device_keys().await).unwrap()
}

/// The error of a rejected to-device event (panics on any other outcome).
pub fn rejected(outcome: &ToDeviceOutcome) -> &ToDeviceError {
    match outcome {
        ToDeviceOutcome::Rejected(e) => e,
        other => panic!("expected a rejection, got {other:?}"),
    }
}
