//! Helpers shared by the driver's integration tests.

#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use newt::{ManualClock, ToDeviceError, ToDeviceOutcome, UserId};
use newt_cli::SimDevice;
use newt_proto::account::OwnAccount;
use newt_proto::devices::parse_device_keys;
use newt_proto::ids::DeviceId;
use newt_proto::json::b64_encode;
use newt_proto::olm::{self, OlmSession};
use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, MessageIndexRecord,
    OlmSessionRecord, OutboundGroupSessionRecord, TrackedUser, WithheldRecord,
};
use newt_router::Router;
use newt_store::{Changes, MemoryStore, SessionCursor, Store, StoreError};
use serde_json::{json, Value};

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

/// A clock for devices that share virtual time (set to November 2023).
pub(crate) fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_700_000_000_000))
}

/// [`dev`] with time from `clock`, which the test moves.
pub(crate) async fn timed_dev(
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

/// `d`'s own device record, as another device would store it.
pub(crate) async fn own_record(d: &SimDevice) -> DeviceRecord {
    parse_device_keys(&d.user, d.device.as_str(), &d.machine.device_keys().await).unwrap()
}

/// The error of a rejected to-device event (panics on any other outcome).
pub(crate) fn rejected(outcome: &ToDeviceOutcome) -> &ToDeviceError {
    match outcome {
        ToDeviceOutcome::Rejected(e) => e,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// An attacker device: a real account and real Olm, arbitrary plaintext.
pub(crate) struct RawDevice {
    pub(crate) account: OwnAccount,
    pub(crate) record: DeviceRecord,
    pub(crate) router: Arc<Router>,
}

impl RawDevice {
    pub(crate) fn new(router: &Arc<Router>, user: &str, device: &str) -> Self {
        let mut raw = Self::unpublished(router, user, device);
        let body = raw.account.keys_upload_body().unwrap();
        router.handle(user, device, "POST", "/keys/upload", &body).unwrap();
        raw.account.mark_keys_uploaded(Some(50), 0);
        raw
    }

    /// A device whose keys were never uploaded: nobody can know them, but it
    /// can still claim keys and send (the router checks no access token).
    pub(crate) fn unpublished(router: &Arc<Router>, user: &str, device: &str) -> Self {
        let mut account = OwnAccount::new(uid(user), DeviceId::parse(device).unwrap());
        account.prepare_initial_upload(0);
        let record = parse_device_keys(account.user_id(), device, &account.device_keys()).unwrap();
        Self { account, record, router: router.clone() }
    }

    /// `sender` is what the server puts on the event (a malicious server
    /// can put anyone).
    pub(crate) fn send_olm_plaintext(
        &self,
        target: &SimDevice,
        target_keys: &DeviceRecord,
        plaintext: &Value,
        sender: &str,
    ) {
        let (mut session, _) = self.claim_session(target_keys);
        let message = session.session.encrypt(serde_json::to_vec(plaintext).unwrap()).unwrap();
        let (message_type, body) = message.to_parts();
        let content = json!({
            "algorithm": "m.olm.v1.curve25519-aes-sha2",
            "sender_key": self.record.curve25519,
            "ciphertext": {target_keys.curve25519.clone(): {"type": message_type, "body": b64_encode(body)}},
        });
        let body = json!({"messages": {target.user.as_str(): {target.device.as_str(): content}}});
        let path = "/sendToDevice/m.room.encrypted/raw";
        self.router.handle(sender, self.record.device_id.as_str(), "PUT", path, &body).unwrap();
    }

    /// Claims a one-time key of `target` and sends it an Olm event with an
    /// arbitrary inner type and content.
    pub(crate) fn send_olm(
        &self,
        target: &SimDevice,
        target_keys: &DeviceRecord,
        event_type: &str,
        content: Value,
    ) {
        self.send_olm_as(target, target_keys, target_keys, event_type, content)
    }

    /// Like `send_olm`, but the plaintext names `recipient` as the recipient.
    pub(crate) fn send_olm_as(
        &self,
        target: &SimDevice,
        target_keys: &DeviceRecord,
        recipient: &DeviceRecord,
        event_type: &str,
        content: Value,
    ) {
        let (mut session, _) = self.claim_session(target_keys);
        self.send_on(&mut session, target, target_keys, recipient, event_type, content);
    }

    /// Claims a key of the device `target_keys` (a one-time key while it has
    /// any, then its fallback key) and starts an Olm session on it. Returns
    /// the session and the signed key object that was claimed.
    pub(crate) fn claim_session(&self, target_keys: &DeviceRecord) -> (OlmSession, Value) {
        let (user, device) = (target_keys.user_id.as_str(), target_keys.device_id.as_str());
        let claim = json!({"one_time_keys": {user: {device: "signed_curve25519"}}});
        let resp = self
            .router
            .handle(
                self.account.user_id().as_str(),
                self.record.device_id.as_str(),
                "POST",
                "/keys/claim",
                &claim,
            )
            .unwrap();
        let claimed = resp["one_time_keys"][user][device].as_object().unwrap();
        let key = claimed.values().next().unwrap().clone();
        let devices = BTreeMap::from([(
            (target_keys.user_id.clone(), target_keys.device_id.clone()),
            target_keys.clone(),
        )]);
        let mut out = olm::handle_keys_claim(
            &self.account,
            &[(target_keys.user_id.clone(), target_keys.device_id.clone())],
            &devices,
            &resp,
            0,
        );
        (OlmSession::from_record(out.sessions.remove(0).2), key)
    }

    /// Olm-encrypts an event on `session` and sends it to `target`, naming
    /// `recipient` as the recipient in the plaintext.
    pub(crate) fn send_on(
        &self,
        session: &mut OlmSession,
        target: &SimDevice,
        target_keys: &DeviceRecord,
        recipient: &DeviceRecord,
        event_type: &str,
        content: Value,
    ) {
        let mut encrypted =
            olm::encrypt(&self.account, session, recipient, event_type, content).unwrap();
        if recipient.curve25519 != target_keys.curve25519 {
            let ct = encrypted["ciphertext"].as_object_mut().unwrap();
            let v = ct.remove(&recipient.curve25519).unwrap();
            ct.insert(target_keys.curve25519.clone(), v);
        }
        self.send_raw(target, "m.room.encrypted", encrypted);
    }

    pub(crate) fn send_raw(&self, target: &SimDevice, event_type: &str, content: Value) {
        let body = json!({"messages": {target.user.as_str(): {target.device.as_str(): content}}});
        self.router
            .handle(
                self.account.user_id().as_str(),
                self.record.device_id.as_str(),
                "PUT",
                &format!("/sendToDevice/{event_type}/x"),
                &body,
            )
            .unwrap();
    }
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
        u: &newt_proto::ids::UserId,
    ) -> Result<Option<WithheldRecord>, StoreError> {
        self.inner.withheld(r, s, u).await
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
