//! Helpers shared by the driver's integration tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use newt::UserId;
use newt_cli::SimDevice;
use newt_proto::ids::DeviceId;
use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, MessageIndexRecord,
    OlmSessionRecord, OutboundGroupSessionRecord, TrackedUser, WithheldRecord,
};
use newt_router::Router;
use newt_store::{Changes, MemoryStore, SessionCursor, Store, StoreError};
use serde_json::Value;

/// A user ID known to be valid.
pub(crate) fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

/// A device ID known to be valid.
pub(crate) fn did(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

/// A device on a fresh memory store, keys uploaded.
pub(crate) async fn dev(router: &Arc<Router>, user: &str, device: &str) -> SimDevice {
    let d =
        SimDevice::open(router.clone(), user, device, Arc::new(MemoryStore::new())).await.unwrap();
    d.flush().await.unwrap();
    d
}

/// [`dev`] on a [`FlakyStore`], returned with it so a test can make it fail.
pub(crate) async fn flaky_dev(
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
pub(crate) async fn settle(devices: &[&SimDevice], users: &[UserId]) {
    for d in devices {
        d.sync().await.unwrap();
        d.machine.update_tracked_users(users.iter().cloned()).await.unwrap();
        d.flush().await.unwrap();
    }
}

/// `d` creates and uploads its user's cross-signing keys, then syncs;
/// returns the master key.
pub(crate) async fn bootstrap(d: &SimDevice) -> String {
    let master = d.bootstrap_cross_signing().await.unwrap();
    d.sync().await.unwrap();
    master
}

/// Devices (`(user, device)`) on one router, every device tracking every
/// listed user, and each user's cross-signing identity created by that
/// user's first listed device (and seen by everyone).
pub(crate) async fn cross_signed(router: &Arc<Router>, devices: &[(&str, &str)]) -> Vec<SimDevice> {
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
pub(crate) async fn alice_pair() -> (Arc<Router>, SimDevice, SimDevice) {
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
pub(crate) fn post(d: &SimDevice, path: &str, body: &Value) -> Value {
    d.router().handle(d.user.as_str(), d.device.as_str(), "POST", path, body).unwrap()
}

/// A store that fails `apply` while `fail` is set (after letting `pass`
/// more through), and reads of devices while `fail_reads` is set; the
/// first of `race`, if any, is applied just before each `apply` (another
/// process writing in between).
pub(crate) struct FlakyStore {
    pub(crate) inner: MemoryStore,
    pub(crate) fail: AtomicBool,
    pub(crate) pass: std::sync::atomic::AtomicUsize,
    pub(crate) fail_reads: AtomicBool,
    pub(crate) race: std::sync::Mutex<std::collections::VecDeque<Changes>>,
}

impl FlakyStore {
    pub(crate) fn new() -> Self {
        Self {
            inner: MemoryStore::new(),
            fail: AtomicBool::new(false),
            pass: std::sync::atomic::AtomicUsize::new(0),
            fail_reads: AtomicBool::new(false),
            race: std::sync::Mutex::new(std::collections::VecDeque::new()),
        }
    }
}

#[async_trait::async_trait]
impl Store for FlakyStore {
    async fn account(&self) -> Result<Option<AccountRecord>, StoreError> {
        self.inner.account().await
    }
    async fn olm_sessions(&self, k: &str) -> Result<Vec<OlmSessionRecord>, StoreError> {
        self.inner.olm_sessions(k).await
    }
    async fn inbound_group_session(
        &self,
        r: &newt_proto::ids::RoomId,
        s: &str,
    ) -> Result<Option<InboundGroupSessionRecord>, StoreError> {
        self.inner.inbound_group_session(r, s).await
    }
    async fn inbound_group_sessions_page(
        &self,
        a: SessionCursor,
        l: usize,
    ) -> Result<Vec<InboundGroupSessionRecord>, StoreError> {
        self.inner.inbound_group_sessions_page(a, l).await
    }
    async fn outbound_group_session(
        &self,
        r: &newt_proto::ids::RoomId,
    ) -> Result<Option<OutboundGroupSessionRecord>, StoreError> {
        self.inner.outbound_group_session(r).await
    }
    async fn devices(&self, u: &newt_proto::ids::UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("I/O error".into()));
        }
        self.inner.devices(u).await
    }
    async fn tracked_users(&self) -> Result<Vec<TrackedUser>, StoreError> {
        self.inner.tracked_users().await
    }
    async fn key_request(&self, id: &str) -> Result<Option<KeyRequestRecord>, StoreError> {
        self.inner.key_request(id).await
    }
    async fn key_request_for_session(
        &self,
        r: &newt_proto::ids::RoomId,
        s: &str,
    ) -> Result<Option<KeyRequestRecord>, StoreError> {
        self.inner.key_request_for_session(r, s).await
    }
    async fn unsent_key_requests(&self) -> Result<Vec<KeyRequestRecord>, StoreError> {
        self.inner.unsent_key_requests().await
    }
    async fn withheld(
        &self,
        r: &newt_proto::ids::RoomId,
        s: &str,
    ) -> Result<Option<WithheldRecord>, StoreError> {
        self.inner.withheld(r, s).await
    }
    async fn message_index(
        &self,
        r: &newt_proto::ids::RoomId,
        s: &str,
        i: u32,
    ) -> Result<Option<MessageIndexRecord>, StoreError> {
        self.inner.message_index(r, s, i).await
    }
    async fn sync_token(&self) -> Result<Option<String>, StoreError> {
        self.inner.sync_token().await
    }
    async fn identity(
        &self,
        u: &newt_proto::ids::UserId,
    ) -> Result<Option<newt_proto::identities::IdentityRecord>, StoreError> {
        self.inner.identity(u).await
    }
    async fn private_identity(
        &self,
    ) -> Result<Option<newt_proto::identities::PrivateIdentityRecord>, StoreError> {
        self.inner.private_identity().await
    }
    async fn apply(&self, c: Changes) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst)
            && self
                .pass
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            return Err(StoreError::Backend("disk full".into()));
        }
        let race = self.race.lock().unwrap().pop_front();
        if let Some(other) = race {
            self.inner.apply(other).await?;
        }
        self.inner.apply(c).await
    }
}
