//! The glue between a newt [`Machine`] and the in-process
//! [`Router`]: what a real client does with HTTP and `/sync`, done in
//! memory. The demo and the end-to-end tests are built on [`SimDevice`].

use std::sync::Arc;

use newt::{
    Clock, DecryptedRoomEvent, DeviceId, Machine, OutgoingRequest, RequestKind, RoomId,
    RoomSettings, SyncChanges, SyncOutcome, SystemClock, UserId,
};
use newt_router::Router;
use newt_store::Store;
use serde_json::Value;

/// Anything that can go wrong in a simulation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// newt failed.
    #[error(transparent)]
    Newt(#[from] newt::Error),
    /// The router refused a request.
    #[error(transparent)]
    Router(#[from] newt_router::RouterError),
    /// A bad identifier.
    #[error(transparent)]
    Id(#[from] newt::IdError),
    /// The router answered with failures (e.g. a signature it refused).
    #[error("rejected: {0}")]
    Rejected(String),
    /// A file-system error (creating a store directory).
    #[error("I/O error: {0}")]
    Io(String),
}

/// One simulated device: a newt machine talking to the router.
#[derive(Debug, Clone)]
pub struct SimDevice {
    /// The machine.
    pub machine: Machine,
    /// Its user.
    pub user: UserId,
    /// Its device.
    pub device: DeviceId,
    router: Arc<Router>,
}

impl SimDevice {
    /// Opens a device on `store`.
    pub async fn open(
        router: Arc<Router>,
        user: &str,
        device: &str,
        store: Arc<dyn Store>,
    ) -> Result<Self, SimError> {
        Self::open_with_clock(router, user, device, store, Arc::new(SystemClock)).await
    }

    /// [`open`](Self::open) with time from `clock` (a [`newt::ManualClock`]
    /// in tests that move time).
    pub async fn open_with_clock(
        router: Arc<Router>,
        user: &str,
        device: &str,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SimError> {
        let user = UserId::parse(user)?;
        let device = DeviceId::parse(device)?;
        let machine = Machine::open_with_clock(store, user.clone(), device.clone(), clock).await?;
        Ok(Self { machine, user, device, router })
    }

    /// Sends one request through the router and reports the response.
    /// In-room messages are encrypted (every simulated room is encrypted)
    /// and posted to the room.
    pub async fn send(&self, request: &OutgoingRequest) -> Result<(), SimError> {
        if let RequestKind::RoomMessage { room_id, event_type, body, .. } = &request.kind {
            let room = RoomId::parse(room_id)?;
            let event = self.send_event(&room, event_type, body.clone()).await?;
            let response = serde_json::json!({ "event_id": event["event_id"] });
            self.machine.mark_request_sent(&request.id, &response).await?;
            return Ok(());
        }
        let (method, path) = request.kind.method_and_path();
        let response = self.router.handle(
            self.user.as_str(),
            self.device.as_str(),
            method,
            &path,
            request.kind.body(),
        )?;
        self.machine.mark_request_sent(&request.id, &response).await?;
        Ok(())
    }

    /// Sends every outgoing request and reports the responses, until none
    /// are left. Returns how many requests went out.
    pub async fn flush(&self) -> Result<usize, SimError> {
        let mut sent = 0;
        loop {
            let requests = self.machine.outgoing_requests().await?;
            if requests.is_empty() {
                return Ok(sent);
            }
            for r in &requests {
                self.send(r).await?;
                sent += 1;
            }
        }
    }

    /// The next sync, as the router would return it.
    pub fn next_sync(&self) -> Result<SyncChanges, SimError> {
        let batch = self.router.sync(self.user.as_str(), self.device.as_str())?;
        Ok(SyncChanges {
            to_device_events: batch.to_device,
            changed_users: batch
                .changed
                .iter()
                .filter_map(|u| UserId::parse(u.as_str()).ok())
                .collect(),
            left_users: batch.left.iter().filter_map(|u| UserId::parse(u.as_str()).ok()).collect(),
            one_time_key_count: Some(batch.one_time_key_count),
            unused_fallback_key_types: Some(batch.unused_fallback_key_types),
            next_batch: Some(batch.next_batch),
        })
    }

    /// Syncs once and then flushes the requests the sync caused.
    pub async fn sync(&self) -> Result<SyncOutcome, SimError> {
        let changes = self.next_sync()?;
        let outcome = self.machine.receive_sync(changes).await?;
        self.flush().await?;
        Ok(outcome)
    }

    /// Makes sure every device of `members` has the room key: track and
    /// query them, claim missing Olm sessions, share. Returns the number of
    /// to-device requests sent for the share.
    pub async fn share_room_key(
        &self,
        room: &RoomId,
        members: &[UserId],
        settings: &RoomSettings,
    ) -> Result<usize, SimError> {
        self.machine.update_tracked_users(members.iter().cloned()).await?;
        self.flush().await?;
        if let Some(claim) = self.machine.get_missing_sessions(members.iter().cloned()).await? {
            self.send(&claim).await?;
        }
        let requests = self.machine.share_room_key(room, members.iter().cloned(), settings).await?;
        let n = requests.len();
        for r in &requests {
            self.send(r).await?;
        }
        self.flush().await?;
        Ok(n)
    }

    /// Creates this user's cross-signing keys and uploads them and the
    /// signature on this device (what a client does after the
    /// user-interactive auth); returns the master key (unpadded base64).
    /// The next sync sees the identity.
    pub async fn bootstrap_cross_signing(&self) -> Result<String, SimError> {
        let requests = self.machine.bootstrap_cross_signing().await?;
        for (path, body) in [
            ("/keys/device_signing/upload", &requests.device_signing_upload),
            ("/keys/signatures/upload", &requests.signatures_upload),
        ] {
            let response =
                self.router.handle(self.user.as_str(), self.device.as_str(), "POST", path, body)?;
            match response.get("failures") {
                Some(f) if f.as_object().is_some_and(|f| !f.is_empty()) => {
                    return Err(SimError::Rejected(format!("{path}: {f}")));
                }
                _ => {}
            }
        }
        let master = requests.device_signing_upload["master_key"]["keys"]
            .as_object()
            .and_then(|keys| keys.values().next())
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Ok(master)
    }

    /// Encrypts and sends a text message; returns the event as the server stores it.
    pub async fn send_text(&self, room: &RoomId, body: &str) -> Result<Value, SimError> {
        let content = serde_json::json!({ "msgtype": "m.text", "body": body });
        self.send_event(room, "m.room.message", content).await
    }

    /// Encrypts and sends an event; returns the event as the server stores it.
    pub async fn send_event(
        &self,
        room: &RoomId,
        event_type: &str,
        content: Value,
    ) -> Result<Value, SimError> {
        let encrypted = self.machine.encrypt_room_event(room, event_type, content).await?;
        Ok(self.router.send_room_event(
            room.as_str(),
            self.user.as_str(),
            "m.room.encrypted",
            encrypted,
        )?)
    }

    /// Decrypts a room event.
    pub async fn decrypt(
        &self,
        room: &RoomId,
        event: &Value,
    ) -> Result<DecryptedRoomEvent, SimError> {
        Ok(self.machine.decrypt_room_event(room, event).await?)
    }

    /// The router this device talks to.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }
}
