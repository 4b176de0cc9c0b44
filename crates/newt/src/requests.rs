//! Outgoing requests: what the caller must send to the homeserver.
//!
//! newt never does HTTP. It hands out [`OutgoingRequest`]s, each with an ID;
//! the caller sends it and reports the response with
//! [`Machine::mark_request_sent`](crate::Machine::mark_request_sent).

use serde_json::Value;

/// One request to send to the homeserver.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingRequest {
    /// The ID to pass back to `mark_request_sent`.
    pub id: String,
    /// What to send.
    pub kind: RequestKind,
}

/// The request kinds, with their JSON bodies.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RequestKind {
    /// `POST /_matrix/client/v3/keys/upload`.
    KeysUpload {
        /// Request body.
        body: Value,
    },
    /// `POST /_matrix/client/v3/keys/query`.
    KeysQuery {
        /// Request body.
        body: Value,
    },
    /// `POST /_matrix/client/v3/keys/claim`.
    KeysClaim {
        /// Request body.
        body: Value,
    },
    /// `POST /_matrix/client/v3/keys/signatures/upload` (cross-signing
    /// signatures made after a verification).
    SignaturesUpload {
        /// Request body.
        body: Value,
    },
    /// `PUT /_matrix/client/v3/sendToDevice/{event_type}/{txn_id}`.
    ToDevice {
        /// The event type in the URL.
        event_type: String,
        /// The transaction ID in the URL (use the request `id`).
        txn_id: String,
        /// Request body: `{"messages": {user: {device: content}}}`.
        body: Value,
    },
    /// `PUT /_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}`:
    /// an in-room verification message. In an encrypted room, encrypt it
    /// first ([`Machine::encrypt_room_event`](crate::Machine::encrypt_room_event)
    /// with `event_type` and `body`) and send the `m.room.encrypted` result.
    /// Under `SharingPolicy::CrossSignedOnly`/`VerifiedOnly` the device being
    /// verified may not hold the room key: send the flow's messages (the
    /// request included) unencrypted then, consistently (a flow is handled
    /// as all-encrypted or all-plaintext, fixed by its first message).
    RoomMessage {
        /// The room.
        room_id: String,
        /// The event type (e.g. `m.key.verification.ready`).
        event_type: String,
        /// The transaction ID in the URL (use the request `id`).
        txn_id: String,
        /// The event content (with its `m.relates_to`).
        body: Value,
    },
}

impl RequestKind {
    /// The HTTP method and the path: [`method`](Self::method) and
    /// [`path`](Self::path) together.
    pub fn method_and_path(&self) -> (&'static str, String) {
        (self.method(), self.path())
    }

    /// The HTTP method: `POST` or `PUT`.
    pub fn method(&self) -> &'static str {
        match self {
            Self::KeysUpload { .. }
            | Self::KeysQuery { .. }
            | Self::KeysClaim { .. }
            | Self::SignaturesUpload { .. } => "POST",
            Self::ToDevice { .. } | Self::RoomMessage { .. } => "PUT",
        }
    }

    /// The path below `/_matrix/client/v3`, with its parameters
    /// percent-encoded (room IDs hold `!` and `:`, event types and
    /// transaction IDs may hold anything).
    ///
    /// ```
    /// use newt::RequestKind;
    /// let kind = RequestKind::RoomMessage {
    ///     room_id: "!room:example.org".into(),
    ///     event_type: "m.key.verification.ready".into(),
    ///     txn_id: "newt-1".into(),
    ///     body: serde_json::json!({}),
    /// };
    /// assert_eq!(kind.method(), "PUT");
    /// assert_eq!(kind.path(), "/rooms/%21room%3Aexample.org/send/m.key.verification.ready/newt-1");
    /// assert_eq!(kind.body_string(), "{}");
    /// ```
    pub fn path(&self) -> String {
        match self {
            Self::KeysUpload { .. } => "/keys/upload".into(),
            Self::KeysQuery { .. } => "/keys/query".into(),
            Self::KeysClaim { .. } => "/keys/claim".into(),
            Self::SignaturesUpload { .. } => "/keys/signatures/upload".into(),
            Self::ToDevice { event_type, txn_id, .. } => {
                format!("/sendToDevice/{}/{}", encode(event_type), encode(txn_id))
            }
            Self::RoomMessage { room_id, event_type, txn_id, .. } => {
                format!("/rooms/{}/send/{}/{}", encode(room_id), encode(event_type), encode(txn_id))
            }
        }
    }

    /// The JSON body as a string, ready to send.
    pub fn body_string(&self) -> String {
        self.body().to_string()
    }

    /// The JSON body.
    pub fn body(&self) -> &Value {
        match self {
            Self::KeysUpload { body }
            | Self::KeysQuery { body }
            | Self::KeysClaim { body }
            | Self::SignaturesUpload { body }
            | Self::ToDevice { body, .. }
            | Self::RoomMessage { body, .. } => body,
        }
    }
}

/// Percent-encodes a path segment: everything but RFC 3986's unreserved
/// characters.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
