//! Interoperability harness: the reference implementation,
//! matrix-sdk-crypto 0.18 (`OlmMachine`, in-memory store), driven through
//! newt's in-process [`Router`], so that newt (`newt_test_support::SimDevice`) and
//! the reference meet on the same wire format.
//!
//! [`RefDevice`] does what a client built on matrix-sdk-crypto does with
//! HTTP and `/sync`: each outgoing request is serialised with ruma's own
//! HTTP serialisation (so the router sees exactly the JSON body the
//! reference would put on the wire), handed to [`Router::handle`], and the
//! router's JSON answer is parsed back with ruma's
//! `IncomingResponse::try_from_http_response`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use matrix_sdk_common::deserialized_responses::{
    AlgorithmInfo, ProcessedToDeviceEvent, VerificationState,
};
use matrix_sdk_crypto::store::types::RoomKeyInfo;
use matrix_sdk_crypto::types::events::room::encrypted::EncryptedEvent;
use matrix_sdk_crypto::types::requests::{
    AnyOutgoingRequest, OutgoingVerificationRequest, ToDeviceRequest,
};
use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine,
    TrustRequirement,
};
use newt_router::Router;
use ruma::api::auth_scheme::{AccessToken, SendAccessToken};
use ruma::api::client::keys::{claim_keys, get_keys, upload_keys, upload_signatures};
use ruma::api::client::sync::sync_events::DeviceLists;
use ruma::api::client::to_device::send_event_to_device;
use ruma::api::path_builder::VersionHistory;
use ruma::api::{IncomingResponse, OutgoingRequest, SupportedVersions};
use ruma::events::AnyMessageLikeEventContent;
use ruma::serde::Raw;
use ruma::{
    OneTimeKeyAlgorithm, OwnedDeviceId, OwnedRoomId, OwnedUserId, RoomId, TransactionId, UInt,
    UserId,
};
use serde_json::Value;

pub use matrix_sdk_common;
pub use matrix_sdk_crypto;
pub use ruma;

/// Errors of the harness (test code: any error, as a string if need be).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The prefix the router's paths are relative to.
const CLIENT_PREFIX: &str = "/_matrix/client/v3";

/// One HTTP request as the router takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct WireRequest {
    /// `POST`, `PUT`, ...
    pub method: String,
    /// The path below `/_matrix/client/v3`.
    pub path: String,
    /// The JSON body.
    pub body: Value,
}

/// Serialises a ruma request exactly as a matrix-sdk client would send it.
fn to_wire<R>(request: R) -> Result<WireRequest, Error>
where
    R: OutgoingRequest<Authentication = AccessToken, PathBuilder = VersionHistory>,
{
    let versions = SupportedVersions::from_parts(&["v1.11".to_owned()], &BTreeMap::new());
    let http: http::Request<Vec<u8>> = request.try_into_http_request(
        "https://localhost",
        SendAccessToken::IfRequired("token"),
        Cow::Owned(versions),
    )?;
    let path = http.uri().path();
    let path = percent_decode(
        path.strip_prefix(CLIENT_PREFIX).ok_or_else(|| format!("unexpected path {path}"))?,
    );
    let body =
        if http.body().is_empty() { Value::Null } else { serde_json::from_slice(http.body())? };
    Ok(WireRequest { method: http.method().as_str().to_owned(), path, body })
}

/// Decodes `%XX` escapes in a URL path (event types and transaction IDs
/// are percent-encoded by ruma).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(Ok(b)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the router's JSON answer into a ruma response type.
fn from_wire<R: IncomingResponse>(json: &Value) -> Result<R, Error> {
    let response = http::Response::builder().status(200).body(serde_json::to_vec(json)?)?;
    R::try_from_http_response(response).map_err(|e| format!("bad response: {e}").into())
}

/// What a reference sync produced.
#[derive(Debug, Clone, Default)]
pub struct RefSyncOutcome {
    /// The processed to-device events, in order.
    pub to_device: Vec<ProcessedToDeviceEvent>,
    /// Room keys the sync stored.
    pub room_keys: Vec<RoomKeyInfo>,
    /// Requests sent by the flush after the sync.
    pub requests_sent: usize,
}

impl RefSyncOutcome {
    /// The decrypted to-device events, as JSON (`type`, `sender`, `content`, ...).
    pub fn decrypted(&self) -> Vec<Value> {
        self.to_device
            .iter()
            .filter_map(|e| match e {
                ProcessedToDeviceEvent::Decrypted { raw, .. } => {
                    serde_json::from_str(raw.json().get()).ok()
                }
                _ => None,
            })
            .collect()
    }

    /// How many events could not be decrypted.
    pub fn undecryptable(&self) -> usize {
        self.to_device
            .iter()
            .filter(|e| matches!(e, ProcessedToDeviceEvent::UnableToDecrypt { .. }))
            .count()
    }
}

/// A room event the reference decrypted.
#[derive(Debug, Clone)]
pub struct RefDecrypted {
    /// The decrypted event JSON (`type`, `content`, `room_id`, `sender`, ...).
    pub event: Value,
    /// The Megolm session ID.
    pub session_id: Option<String>,
    /// The sending device, if the reference could tie the session to one.
    pub sender_device: Option<String>,
    /// The reference's verdict on the sender.
    pub verification_state: VerificationState,
}

/// A matrix-sdk-crypto `OlmMachine` (in-memory store) talking to the router.
#[derive(Debug, Clone)]
pub struct RefDevice {
    /// The reference machine.
    pub machine: OlmMachine,
    /// Its user.
    pub user: OwnedUserId,
    /// Its device.
    pub device: OwnedDeviceId,
    router: Arc<Router>,
}

/// The most permissive decryption settings: decrypt from any device.
pub fn untrusted() -> DecryptionSettings {
    DecryptionSettings { sender_device_trust_requirement: TrustRequirement::Untrusted }
}

impl RefDevice {
    /// Creates a reference device with an in-memory store.
    pub async fn open(router: Arc<Router>, user: &str, device: &str) -> Result<Self, Error> {
        let user: OwnedUserId = user.try_into()?;
        let device: OwnedDeviceId = device.into();
        let machine = OlmMachine::new(&user, &device).await;
        Ok(Self { machine, user, device, router })
    }

    /// Sends one request through the router; returns the router's JSON.
    fn route(&self, wire: &WireRequest) -> Result<Value, Error> {
        Ok(self.router.handle(
            self.user.as_str(),
            self.device.as_str(),
            &wire.method,
            &wire.path,
            &wire.body,
        )?)
    }

    /// Translates one of the reference's outgoing requests into the wire
    /// form. `None` for requests the router has no endpoint for (room
    /// messages).
    pub fn wire_request(request: &AnyOutgoingRequest) -> Result<Option<WireRequest>, Error> {
        Ok(Some(match request {
            AnyOutgoingRequest::KeysUpload(r) => to_wire(r.clone())?,
            AnyOutgoingRequest::KeysQuery(r) => {
                let mut q = get_keys::v3::Request::new();
                q.device_keys = r.device_keys.clone();
                q.timeout = r.timeout;
                to_wire(q)?
            }
            AnyOutgoingRequest::KeysClaim(r) => to_wire(r.clone())?,
            AnyOutgoingRequest::ToDeviceRequest(r) => to_device_wire(r)?,
            AnyOutgoingRequest::SignatureUpload(r) => to_wire(r.clone())?,
            AnyOutgoingRequest::RoomMessage(_) => return Ok(None),
        }))
    }

    /// Sends one outgoing request and marks it as sent with the parsed
    /// response. Returns false for requests that were skipped.
    pub async fn send(
        &self,
        request_id: &TransactionId,
        request: &AnyOutgoingRequest,
    ) -> Result<bool, Error> {
        if let AnyOutgoingRequest::RoomMessage(r) = request {
            self.send_room_message(request_id, &r.room_id, &r.content).await?;
            return Ok(true);
        }
        let Some(wire) = Self::wire_request(request)? else { return Ok(false) };
        let json = self.route(&wire)?;
        match request {
            AnyOutgoingRequest::KeysUpload(_) => {
                let r: upload_keys::v3::Response = from_wire(&json)?;
                self.machine.mark_request_as_sent(request_id, &r).await?;
            }
            AnyOutgoingRequest::KeysQuery(_) => {
                let r: get_keys::v3::Response = from_wire(&json)?;
                self.machine.mark_request_as_sent(request_id, &r).await?;
            }
            AnyOutgoingRequest::KeysClaim(_) => {
                let r: claim_keys::v3::Response = from_wire(&json)?;
                self.machine.mark_request_as_sent(request_id, &r).await?;
            }
            AnyOutgoingRequest::ToDeviceRequest(_) => {
                let r: send_event_to_device::v3::Response = from_wire(&json)?;
                self.machine.mark_request_as_sent(request_id, &r).await?;
            }
            AnyOutgoingRequest::SignatureUpload(_) => {
                let r: upload_signatures::v3::Response = from_wire(&json)?;
                self.machine.mark_request_as_sent(request_id, &r).await?;
            }
            AnyOutgoingRequest::RoomMessage(_) => return Ok(false),
        }
        Ok(true)
    }

    /// Sends a to-device request (from `share_room_key` or
    /// `encrypt_content_for_devices`) and marks it sent.
    pub async fn send_to_device(&self, request: &ToDeviceRequest) -> Result<(), Error> {
        let json = self.route(&to_device_wire(request)?)?;
        let r: send_event_to_device::v3::Response = from_wire(&json)?;
        self.machine.mark_request_as_sent(&request.txn_id, &r).await?;
        Ok(())
    }

    /// Sends a verification message: to-device, or encrypted into its room.
    pub async fn send_verification(
        &self,
        request: OutgoingVerificationRequest,
    ) -> Result<(), Error> {
        match request {
            OutgoingVerificationRequest::ToDevice(r) => self.send_to_device(&r).await,
            OutgoingVerificationRequest::InRoom(r) => {
                self.send_room_message(&r.txn_id, &r.room_id, &r.content).await
            }
        }
    }

    /// Encrypts an in-room message, posts it, and marks the request sent
    /// with the event ID the router gave it.
    async fn send_room_message(
        &self,
        request_id: &TransactionId,
        room: &RoomId,
        content: &AnyMessageLikeEventContent,
    ) -> Result<(), Error> {
        let event_type = ruma::events::MessageLikeEventContent::event_type(content).to_string();
        let json = serde_json::to_value(content)?;
        let event = self.send_event(room, &event_type, &json).await?;
        let event_id: ruma::OwnedEventId =
            event["event_id"].as_str().ok_or("no event_id")?.try_into()?;
        let response = ruma::api::client::message::send_message_event::v3::Response::new(event_id);
        self.machine.mark_request_as_sent(request_id, &response).await?;
        Ok(())
    }

    /// Feeds the room events after `*seen` to the reference's verification
    /// machine (decrypting encrypted ones), then flushes what it queued.
    pub async fn feed_room(&self, room: &RoomId, seen: &mut usize) -> Result<(), Error> {
        let events = self.router.room_events(room.as_str())?;
        for event in events.get(*seen..).unwrap_or_default() {
            let clear = if event["type"] == "m.room.encrypted" {
                self.decrypt(room, event).await?.event
            } else {
                event.clone()
            };
            let parsed: ruma::events::AnyMessageLikeEvent = serde_json::from_value(clear)?;
            self.machine.receive_verification_event(&parsed).await?;
        }
        *seen = events.len();
        self.flush().await?;
        Ok(())
    }

    /// Creates and uploads a cross-signing identity (master, self-signing
    /// and user-signing keys) and signs this device with it.
    pub async fn bootstrap_cross_signing(&self) -> Result<(), Error> {
        let requests = self.machine.bootstrap_cross_signing(false).await?;
        if let Some(upload) = &requests.upload_keys_req {
            self.send(upload.request_id(), upload.request()).await?;
        }
        let keys = &requests.upload_signing_keys_req;
        let body = serde_json::json!({
            "master_key": keys.master_key,
            "self_signing_key": keys.self_signing_key,
            "user_signing_key": keys.user_signing_key,
        });
        self.router.handle(
            self.user.as_str(),
            self.device.as_str(),
            "POST",
            "/keys/device_signing/upload",
            &body,
        )?;
        self.send(
            &TransactionId::new(),
            &AnyOutgoingRequest::SignatureUpload(requests.upload_signatures_req.clone()),
        )
        .await?;
        Ok(())
    }

    /// Sends every outgoing request until none are left (skipped kinds do
    /// not count). Returns how many went out.
    pub async fn flush(&self) -> Result<usize, Error> {
        let mut sent = 0;
        for _ in 0..16 {
            let mut progressed = false;
            for r in self.machine.outgoing_requests().await? {
                if self.send(r.request_id(), r.request()).await? {
                    sent += 1;
                    progressed = true;
                }
            }
            if !progressed {
                return Ok(sent);
            }
        }
        Err("outgoing requests never settle".into())
    }

    /// Syncs once from the router (to-device events, device lists, key
    /// counts) and then flushes the requests the sync caused.
    pub async fn sync(&self) -> Result<RefSyncOutcome, Error> {
        let batch = self.router.sync(self.user.as_str(), self.device.as_str())?;
        let mut to_device_events = Vec::new();
        for e in &batch.to_device {
            to_device_events.push(Raw::from_json(serde_json::value::to_raw_value(e)?));
        }
        let mut device_lists = DeviceLists::new();
        for u in &batch.changed {
            device_lists.changed.push(u.as_str().try_into()?);
        }
        for u in &batch.left {
            device_lists.left.push(u.as_str().try_into()?);
        }
        let counts = BTreeMap::from([(
            OneTimeKeyAlgorithm::SignedCurve25519,
            UInt::try_from(batch.one_time_key_count)?,
        )]);
        let fallback: Vec<OneTimeKeyAlgorithm> = batch
            .unused_fallback_key_types
            .iter()
            .map(|a| OneTimeKeyAlgorithm::from(a.as_str()))
            .collect();
        let changes = EncryptionSyncChanges {
            to_device_events,
            changed_devices: &device_lists,
            one_time_keys_counts: &counts,
            unused_fallback_keys: Some(&fallback),
            next_batch_token: Some(batch.next_batch.clone()),
        };
        let (to_device, room_keys) =
            self.machine.receive_sync_changes(changes, &untrusted()).await?;
        let requests_sent = self.flush().await?;
        Ok(RefSyncOutcome { to_device, room_keys, requests_sent })
    }

    /// Tracks `users`, queries their keys, and claims one-time keys for
    /// devices without an Olm session. Returns whether a claim was sent.
    pub async fn establish_sessions(&self, users: &[OwnedUserId]) -> Result<bool, Error> {
        self.machine.update_tracked_users(users.iter().map(|u| u.as_ref())).await?;
        self.flush().await?;
        match self.machine.get_missing_sessions(users.iter().map(|u| u.as_ref())).await? {
            Some((id, request)) => {
                self.send(&id, &AnyOutgoingRequest::KeysClaim(request)).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Shares the room key of `room` with every device of `users`
    /// (`CollectStrategy::AllDevices`), after establishing Olm sessions.
    /// Returns how many to-device requests went out.
    pub async fn share_room_key(
        &self,
        room: &RoomId,
        users: &[OwnedUserId],
    ) -> Result<usize, Error> {
        self.establish_sessions(users).await?;
        let settings = EncryptionSettings {
            sharing_strategy: CollectStrategy::AllDevices,
            ..Default::default()
        };
        let requests =
            self.machine.share_room_key(room, users.iter().map(|u| u.as_ref()), settings).await?;
        for r in &requests {
            self.send_to_device(r).await?;
        }
        Ok(requests.len())
    }

    /// Olm-encrypts an arbitrary to-device event for one device of `user`
    /// (the Olm session must exist) and sends it. Returns how many devices
    /// it was encrypted for.
    pub async fn send_custom_to_device(
        &self,
        user: &UserId,
        device: &str,
        event_type: &str,
        content: &Value,
    ) -> Result<usize, Error> {
        let target = self
            .machine
            .get_device(user, device.into(), None)
            .await?
            .ok_or_else(|| format!("unknown device {user} {device}"))?;
        let (requests, withheld) = self
            .machine
            .encrypt_content_for_devices(
                vec![(*target).clone()],
                event_type,
                content,
                CollectStrategy::AllDevices,
            )
            .await?;
        if !withheld.is_empty() {
            return Err(format!("not encrypted for {} device(s)", withheld.len()).into());
        }
        let mut n = 0;
        for r in &requests {
            n += r.messages.values().map(|m| m.len()).sum::<usize>();
            self.send_to_device(r).await?;
        }
        Ok(n)
    }

    /// Encrypts `content` as an event of `event_type` and posts it to the
    /// room; returns the event as the server stores it.
    pub async fn send_event(
        &self,
        room: &RoomId,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, Error> {
        let raw: Raw<AnyMessageLikeEventContent> =
            Raw::from_json(serde_json::value::to_raw_value(content)?);
        let encrypted = self.machine.encrypt_room_event_raw(room, event_type, &raw).await?;
        let content: Value = serde_json::from_str(encrypted.content.json().get())?;
        Ok(self.router.send_room_event(
            room.as_str(),
            self.user.as_str(),
            "m.room.encrypted",
            content,
        )?)
    }

    /// Encrypts and posts an `m.text` message.
    pub async fn send_text(&self, room: &RoomId, body: &str) -> Result<Value, Error> {
        self.send_event(
            room,
            "m.room.message",
            &serde_json::json!({ "msgtype": "m.text", "body": body }),
        )
        .await
    }

    /// Decrypts a room event (as the router stores it).
    pub async fn decrypt(&self, room: &RoomId, event: &Value) -> Result<RefDecrypted, Error> {
        let raw: Raw<EncryptedEvent> = Raw::from_json(serde_json::value::to_raw_value(event)?);
        let decrypted = self.machine.decrypt_room_event(&raw, room, &untrusted()).await?;
        let info = &decrypted.encryption_info;
        let session_id = match &info.algorithm_info {
            AlgorithmInfo::MegolmV1AesSha2 { session_id, .. } => session_id.clone(),
            _ => None,
        };
        Ok(RefDecrypted {
            event: serde_json::from_str(decrypted.event.json().get())?,
            session_id,
            sender_device: info.sender_device.as_ref().map(|d| d.to_string()),
            verification_state: info.verification_state.clone(),
        })
    }

    /// A room ID from a string.
    pub fn room(room: &str) -> Result<OwnedRoomId, Error> {
        Ok(room.try_into()?)
    }

    /// A user ID from a string.
    pub fn user_id(user: &str) -> Result<OwnedUserId, Error> {
        Ok(<&UserId>::try_from(user)?.to_owned())
    }
}

fn to_device_wire(r: &ToDeviceRequest) -> Result<WireRequest, Error> {
    to_wire(send_event_to_device::v3::Request::new_raw(
        r.event_type.clone(),
        r.txn_id.clone(),
        r.messages.clone(),
    ))
}
