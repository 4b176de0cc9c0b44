//! Room key requests (`m.room_key_request`) and forwarded keys
//! (`m.forwarded_room_key`).
//!
//! We ask only our own devices. We answer only our own devices that we trust
//! ([`crate::trust::is_trusted_own_device`]). We accept a forwarded key only
//! if it arrived over Olm from a trusted own device *and* answers a request
//! we made for exactly that (room, session).
//!
//! A request we would answer but cannot yet, because we have no Olm session
//! with the requesting device, waits in [`WaitingKeyRequests`] (bounded,
//! deduplicated by request ID, removed by a cancellation) until the driver
//! has made one; [`answer_request`] is asked again then.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{json, Value};

use crate::export::ExportedRoomKey;
use crate::identities::TrustRoot;
use crate::ids::{DeviceId, RoomId, UserId};
use crate::megolm::{export_session, session_from_export, MegolmError};
use crate::olm::DecryptedToDevice;
use crate::records::{DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, SessionSource};
use crate::trust::is_trusted_own_device;
use crate::MEGOLM_V1;

/// Why a forwarded key or a key request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyShareError {
    /// The content is malformed.
    #[error("malformed content: {0}")]
    Malformed(&'static str),
    /// The sender is another user: keys are only exchanged between our own devices.
    #[error("{0} is not our own user")]
    NotOwnUser(String),
    /// The sending device is not one of our verified devices (or is unknown).
    #[error("the device is not a trusted device of ours")]
    UntrustedDevice,
    /// We did not ask for this session.
    #[error("no outstanding request for this session")]
    Unrequested,
    /// The key itself is bad.
    #[error("bad key: {0}")]
    Key(#[from] MegolmError),
    /// We do not have the requested session.
    #[error("session not found")]
    NotFound,
}

/// The `m.room_key_request` content (request or cancellation).
pub fn request_content(
    own_device: &DeviceId,
    request: &KeyRequestRecord,
    sender_key: Option<&str>,
    cancel: bool,
) -> Value {
    if cancel {
        return json!({
            "action": "request_cancellation",
            "requesting_device_id": own_device,
            "request_id": request.request_id,
        });
    }
    let mut body = json!({
        "algorithm": MEGOLM_V1,
        "room_id": request.room_id,
        "session_id": request.session_id,
    });
    if let Some(k) = sender_key {
        body["sender_key"] = json!(k);
    }
    json!({
        "action": "request",
        "requesting_device_id": own_device,
        "request_id": request.request_id,
        "body": body,
    })
}

/// A parsed incoming key request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingKeyRequest {
    /// Requesting user.
    pub sender: UserId,
    /// Requesting device.
    pub device_id: DeviceId,
    /// The request ID.
    pub request_id: String,
    /// Room of the wanted session (absent for cancellations).
    pub room_id: Option<RoomId>,
    /// Wanted session (absent for cancellations).
    pub session_id: Option<String>,
    /// True for `request_cancellation`.
    pub cancellation: bool,
}

/// Parses an `m.room_key_request` content.
pub fn parse_request(
    sender: &UserId,
    content: &Value,
) -> Result<IncomingKeyRequest, KeyShareError> {
    let action =
        content.get("action").and_then(Value::as_str).ok_or(KeyShareError::Malformed("action"))?;
    let device_id = content
        .get("requesting_device_id")
        .and_then(Value::as_str)
        .and_then(|d| DeviceId::parse(d).ok())
        .ok_or(KeyShareError::Malformed("requesting_device_id"))?;
    let request_id = content
        .get("request_id")
        .and_then(Value::as_str)
        .ok_or(KeyShareError::Malformed("request_id"))?;
    let cancellation = match action {
        "request" => false,
        "request_cancellation" => true,
        _ => return Err(KeyShareError::Malformed("action")),
    };
    let body = content.get("body");
    let room_id = body
        .and_then(|b| b.get("room_id"))
        .and_then(Value::as_str)
        .and_then(|r| RoomId::parse(r).ok());
    let session_id =
        body.and_then(|b| b.get("session_id")).and_then(Value::as_str).map(str::to_owned);
    if !cancellation && (room_id.is_none() || session_id.is_none()) {
        return Err(KeyShareError::Malformed("body"));
    }
    Ok(IncomingKeyRequest {
        sender: sender.clone(),
        device_id,
        request_id: request_id.to_owned(),
        room_id,
        session_id,
        cancellation,
    })
}

/// Decides whether to answer `request`, and with what `m.forwarded_room_key`
/// content. `requester` is the requesting device as we know it; `session`
/// the wanted session if we have it; `root` decides whether the requester
/// is trusted (locally verified or cross-signed by our verified identity).
pub fn answer_request(
    root: &TrustRoot<'_>,
    own_user: &UserId,
    own_curve25519: &str,
    request: &IncomingKeyRequest,
    requester: Option<&DeviceRecord>,
    session: Option<&InboundGroupSessionRecord>,
) -> Result<Value, KeyShareError> {
    check_requester(root, own_user, own_curve25519, request, requester)?;
    let session = session.ok_or(KeyShareError::NotFound)?;
    let export = export_session(session)?;
    Ok(forwarded_content(&export, own_curve25519))
}

/// The requester half of [`answer_request`]: the request comes from our own
/// user and `requester` (the requesting device as we know it) is one of our
/// trusted devices. Used on its own to decide whether a waiting request is
/// still worth making an Olm session for.
pub fn check_requester(
    root: &TrustRoot<'_>,
    own_user: &UserId,
    own_curve25519: &str,
    request: &IncomingKeyRequest,
    requester: Option<&DeviceRecord>,
) -> Result<(), KeyShareError> {
    if &request.sender != own_user {
        return Err(KeyShareError::NotOwnUser(request.sender.to_string()));
    }
    let device = requester.ok_or(KeyShareError::UntrustedDevice)?;
    if device.user_id != request.sender || device.device_id != request.device_id {
        return Err(KeyShareError::UntrustedDevice);
    }
    if !is_trusted_own_device(root, own_user, own_curve25519, device) {
        return Err(KeyShareError::UntrustedDevice);
    }
    Ok(())
}

/// The most key requests [`WaitingKeyRequests`] keeps; the oldest is
/// dropped for a newer one.
pub const MAX_WAITING_KEY_REQUESTS: usize = 256;

/// Key requests that [`answer_request`] accepted but that wait for an Olm
/// session with the requesting device (a requester such as
/// matrix-sdk-crypto asks once per session and does not ask again).
///
/// In memory, in arrival order: at most [`MAX_WAITING_KEY_REQUESTS`] (the
/// oldest dropped first), one per (user, device, request ID), and a
/// cancellation of that request ID from that device removes it. Whoever
/// takes requests out must ask [`answer_request`] again: trust or the
/// session may have changed while they waited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaitingKeyRequests {
    queue: VecDeque<IncomingKeyRequest>,
}

impl WaitingKeyRequests {
    /// Keeps `request` waiting. Returns false (and keeps nothing) for a
    /// cancellation or a request ID that device already has waiting.
    pub fn push(&mut self, request: IncomingKeyRequest) -> bool {
        if request.cancellation || self.queue.iter().any(|w| same_request(w, &request)) {
            return false;
        }
        while self.queue.len() >= MAX_WAITING_KEY_REQUESTS {
            self.queue.pop_front();
        }
        self.queue.push_back(request);
        true
    }

    /// Removes the waiting request that `cancellation` names (same user,
    /// device and request ID). Returns whether one was waiting.
    pub fn cancel(&mut self, cancellation: &IncomingKeyRequest) -> bool {
        let before = self.queue.len();
        self.queue.retain(|w| !same_request(w, cancellation));
        self.queue.len() != before
    }

    /// The devices with requests waiting.
    pub fn devices(&self) -> BTreeSet<(UserId, DeviceId)> {
        self.queue.iter().map(|w| (w.sender.clone(), w.device_id.clone())).collect()
    }

    /// Whether `device` of `user` has requests waiting.
    pub fn has_device(&self, user: &UserId, device: &DeviceId) -> bool {
        self.queue.iter().any(|w| &w.sender == user && &w.device_id == device)
    }

    /// The requests of `device` of `user`, oldest first (they stay).
    pub fn of_device(&self, user: &UserId, device: &DeviceId) -> Vec<IncomingKeyRequest> {
        self.queue.iter().filter(|w| &w.sender == user && &w.device_id == device).cloned().collect()
    }

    /// Keeps only the requests for which `keep` is true.
    pub fn retain(&mut self, keep: impl FnMut(&IncomingKeyRequest) -> bool) {
        self.queue.retain(keep);
    }

    /// Takes out the requests of `device` of `user`, oldest first.
    pub fn take_device(&mut self, user: &UserId, device: &DeviceId) -> Vec<IncomingKeyRequest> {
        let (taken, kept) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|w| &w.sender == user && &w.device_id == device);
        self.queue = kept;
        taken.into()
    }

    /// The requests waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

fn same_request(a: &IncomingKeyRequest, b: &IncomingKeyRequest) -> bool {
    a.sender == b.sender && a.device_id == b.device_id && a.request_id == b.request_id
}

fn forwarded_content(key: &ExportedRoomKey, forwarder_curve25519: &str) -> Value {
    let mut chain = key.forwarding_curve25519_key_chain.clone();
    chain.push(forwarder_curve25519.to_owned());
    json!({
        "algorithm": key.algorithm,
        "room_id": key.room_id,
        "session_id": key.session_id,
        "session_key": key.session_key,
        "sender_key": key.sender_key,
        "sender_claimed_ed25519_key": key.sender_claimed_keys.get("ed25519").cloned().unwrap_or_default(),
        "forwarding_curve25519_key_chain": chain,
    })
}

/// Accepts an `m.forwarded_room_key` that arrived over Olm (`event`), if
/// it answers `pending` (our request for that session, looked up by the
/// caller) and comes from a trusted own device (decided by `root`).
pub fn accept_forwarded_key(
    root: &TrustRoot<'_>,
    own_user: &UserId,
    own_curve25519: &str,
    event: &DecryptedToDevice,
    pending: Option<&KeyRequestRecord>,
) -> Result<InboundGroupSessionRecord, KeyShareError> {
    if &event.sender != own_user {
        return Err(KeyShareError::NotOwnUser(event.sender.to_string()));
    }
    let device = event.sender_device.as_ref().ok_or(KeyShareError::UntrustedDevice)?;
    // The device must be the one behind the Olm channel and be trusted.
    if device.curve25519 != event.sender_key
        || !is_trusted_own_device(root, own_user, own_curve25519, device)
    {
        return Err(KeyShareError::UntrustedDevice);
    }
    let c = &event.content;
    let text = |k: &'static str| {
        c.get(k).and_then(Value::as_str).map(str::to_owned).ok_or(KeyShareError::Malformed(k))
    };
    let room_id = text("room_id")?;
    let session_id = text("session_id")?;
    let pending = pending.ok_or(KeyShareError::Unrequested)?;
    if pending.room_id.as_str() != room_id || pending.session_id != session_id {
        return Err(KeyShareError::Unrequested);
    }
    let mut chain: Vec<String> = c
        .get("forwarding_curve25519_key_chain")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    chain.push(event.sender_key.clone());
    let key = ExportedRoomKey {
        algorithm: text("algorithm")?,
        room_id,
        sender_key: text("sender_key")?,
        session_id,
        session_key: text("session_key")?,
        sender_claimed_keys: BTreeMap::from([(
            "ed25519".to_owned(),
            text("sender_claimed_ed25519_key")?,
        )]),
        forwarding_curve25519_key_chain: chain,
        shared_history: c.get("shared_history").and_then(Value::as_bool).unwrap_or(false),
    };
    Ok(session_from_export(&key, SessionSource::Forwarded)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn request(device: &str, id: &str) -> IncomingKeyRequest {
        let content = json!({
            "action": "request", "requesting_device_id": device, "request_id": id,
            "body": {"algorithm": MEGOLM_V1, "room_id": "!r:hs", "session_id": "s"},
        });
        parse_request(&UserId::parse("@alice:hs").unwrap(), &content).unwrap()
    }

    fn cancellation(user: &str, device: &str, id: &str) -> IncomingKeyRequest {
        let content = json!({
            "action": "request_cancellation", "requesting_device_id": device, "request_id": id,
        });
        parse_request(&UserId::parse(user).unwrap(), &content).unwrap()
    }

    #[test]
    fn waiting_requests_are_deduplicated_cancelled_and_bounded() {
        let mut w = WaitingKeyRequests::default();
        assert!(w.push(request("A2", "r1")));
        assert!(!w.push(request("A2", "r1")), "same request ID from the same device");
        assert!(w.push(request("A3", "r1")), "same ID, another device");
        assert!(!w.push(cancellation("@alice:hs", "A2", "r2")), "a cancellation never waits");
        assert_eq!(w.len(), 2);

        // A cancellation names user, device and request ID.
        assert!(!w.cancel(&cancellation("@bob:hs", "A2", "r1")));
        assert!(!w.cancel(&cancellation("@alice:hs", "A3", "r2")));
        assert!(w.cancel(&cancellation("@alice:hs", "A2", "r1")));
        assert!(
            !w.has_device(&UserId::parse("@alice:hs").unwrap(), &DeviceId::parse("A2").unwrap())
        );
        assert_eq!(w.len(), 1);

        // Bounded: the oldest go first.
        for i in 0..MAX_WAITING_KEY_REQUESTS {
            assert!(w.push(request("A4", &format!("n{i}"))));
        }
        assert_eq!(w.len(), MAX_WAITING_KEY_REQUESTS);
        let alice = UserId::parse("@alice:hs").unwrap();
        assert!(!w.has_device(&alice, &DeviceId::parse("A3").unwrap()), "the oldest was dropped");
        assert!(w.push(request("A3", "again")));
        assert_eq!(w.of_device(&alice, &DeviceId::parse("A3").unwrap()).len(), 1);
        let a4 = w.take_device(&alice, &DeviceId::parse("A4").unwrap());
        assert_eq!(a4.len(), MAX_WAITING_KEY_REQUESTS - 1);
        assert_eq!(a4[0].request_id, "n1", "oldest first; n0 was dropped for A3's");
        assert_eq!(w.devices().len(), 1);
        assert_eq!(w.take_device(&alice, &DeviceId::parse("A3").unwrap()).len(), 1);
        assert!(w.is_empty());
    }
}
