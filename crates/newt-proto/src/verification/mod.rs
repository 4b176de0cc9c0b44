//! Interactive key verification (spec "Key verification"): SAS and QR codes.
//!
//! Everything here is sans-IO: a flow consumes incoming event content plus
//! `now` and produces outgoing content; the driver routes messages by flow
//! ID and sends what comes out.
//!
//! ```text
//!   incoming m.key.verification.* content, now, (keys the flow asked for)
//!                    |
//!                    v
//!   RequestFlow (Requested | RequestReceived -> Ready -> Sas(SasState) | Qr(QrState), or Cancelled)
//!                    |
//!                    v
//!   outgoing content (request, ready, start, accept, key, mac, done, cancel),
//!   "need the keys of device X", VerifiedKeys when done
//! ```
//!
//! - [`request_flow`]: one verification from the request on (request,
//!   ready, cancel, timeout), handing over to SAS or QR.
//! - [`sas`]: the SAS computations (commitment, info strings, emoji and
//!   decimals, MACs and their verification).
//! - [`sas_flow`]: one SAS flow as a state machine.
//! - [`qr`]: the binary QR payload.
//! - [`qr_flow`]: one QR-code verification (show, scan, reciprocate) as a state machine.
//! - [`emoji`]: the SAS emoji table.

pub mod emoji;
pub mod qr;
pub mod qr_flow;
pub mod request_flow;
pub mod sas;
pub mod sas_flow;

use std::fmt;

use serde_json::{json, Map, Value};

use crate::ids::RoomId;

/// How long a verification may take: 10 minutes.
pub const VERIFICATION_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// Why a verification was cancelled (`m.key.verification.cancel` `code`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CancelCode {
    /// `m.user`: the user cancelled or declined.
    User,
    /// `m.timeout`: the verification timed out.
    Timeout,
    /// `m.unknown_transaction`: unknown transaction ID.
    UnknownTransaction,
    /// `m.unknown_method`: no common key agreement, hash, MAC or SAS method.
    UnknownMethod,
    /// `m.unexpected_message`: a message out of order or not expected.
    UnexpectedMessage,
    /// `m.key_mismatch`: a key failed verification.
    KeyMismatch,
    /// `m.user_mismatch`: the verified user is not the expected one.
    UserMismatch,
    /// `m.invalid_message`: the message was invalid.
    InvalidMessage,
    /// `m.accepted`: another device accepted the request.
    Accepted,
    /// `m.mismatched_commitment`: the SAS commitment did not match.
    MismatchedCommitment,
    /// `m.mismatched_sas`: the users said the SAS differ.
    MismatchedSas,
    /// Any other code (custom codes use Java package naming).
    Other(String),
}

impl CancelCode {
    /// The wire string, e.g. `m.key_mismatch`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::User => "m.user",
            Self::Timeout => "m.timeout",
            Self::UnknownTransaction => "m.unknown_transaction",
            Self::UnknownMethod => "m.unknown_method",
            Self::UnexpectedMessage => "m.unexpected_message",
            Self::KeyMismatch => "m.key_mismatch",
            Self::UserMismatch => "m.user_mismatch",
            Self::InvalidMessage => "m.invalid_message",
            Self::Accepted => "m.accepted",
            Self::MismatchedCommitment => "m.mismatched_commitment",
            Self::MismatchedSas => "m.mismatched_sas",
            Self::Other(s) => s,
        }
    }

    /// Parses a wire string; unknown codes are kept as [`CancelCode::Other`].
    pub fn from_wire(code: &str) -> Self {
        match code {
            "m.user" => Self::User,
            "m.timeout" => Self::Timeout,
            "m.unknown_transaction" => Self::UnknownTransaction,
            "m.unknown_method" => Self::UnknownMethod,
            "m.unexpected_message" => Self::UnexpectedMessage,
            "m.key_mismatch" => Self::KeyMismatch,
            "m.user_mismatch" => Self::UserMismatch,
            "m.invalid_message" => Self::InvalidMessage,
            "m.accepted" => Self::Accepted,
            "m.mismatched_commitment" => Self::MismatchedCommitment,
            "m.mismatched_sas" => Self::MismatchedSas,
            other => Self::Other(other.to_owned()),
        }
    }

    /// A human-readable reason to send along with the code.
    pub fn default_reason(&self) -> &'static str {
        match self {
            Self::User => "The user cancelled the verification",
            Self::Timeout => "The verification timed out",
            Self::UnknownTransaction => "Unknown transaction",
            Self::UnknownMethod => "No common method",
            Self::UnexpectedMessage => "Unexpected message",
            Self::KeyMismatch => "A key did not verify",
            Self::UserMismatch => "Unexpected user or device",
            Self::InvalidMessage => "Invalid message",
            Self::Accepted => "Accepted by another device",
            Self::MismatchedCommitment => "Mismatched commitment",
            Self::MismatchedSas => "The short authentication strings did not match",
            Self::Other(_) => "Cancelled",
        }
    }
}

impl fmt::Display for CancelCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identifier of a verification flow and the transport it runs over.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FlowId {
    /// To-device: the request's `transaction_id`.
    ToDevice(String),
    /// In a room: the request event's ID, referenced by `m.relates_to`.
    InRoom {
        /// The room (the driver sends there).
        room_id: RoomId,
        /// The `m.key.verification.request` event ID.
        event_id: String,
    },
}

impl FlowId {
    /// The ID used in SAS/MAC info strings and QR codes.
    pub fn as_str(&self) -> &str {
        match self {
            Self::ToDevice(t) => t,
            Self::InRoom { event_id, .. } => event_id,
        }
    }

    /// Adds the flow's `transaction_id` or `m.relates_to` to `content`.
    pub fn decorate(&self, content: &mut Map<String, Value>) {
        match self {
            Self::ToDevice(t) => {
                content.insert("transaction_id".into(), json!(t));
            }
            Self::InRoom { event_id, .. } => {
                content.insert(
                    "m.relates_to".into(),
                    json!({ "rel_type": "m.reference", "event_id": event_id }),
                );
            }
        }
    }

    /// Whether `content` belongs to this flow.
    pub fn matches(&self, content: &Value) -> bool {
        match self {
            Self::ToDevice(t) => {
                content.get("transaction_id").and_then(Value::as_str) == Some(t.as_str())
            }
            Self::InRoom { event_id, .. } => {
                let rel = content.get("m.relates_to");
                rel.and_then(|r| r.get("rel_type")).and_then(Value::as_str) == Some("m.reference")
                    && rel.and_then(|r| r.get("event_id")).and_then(Value::as_str)
                        == Some(event_id.as_str())
            }
        }
    }
}

/// A message to send: event type and content (with the flow ID already in).
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingContent {
    /// E.g. `m.key.verification.accept`.
    pub event_type: &'static str,
    /// The content, including `transaction_id` or `m.relates_to`.
    pub content: Value,
}

/// Event types of the verification framework.
pub mod event_types {
    /// `m.key.verification.request`
    pub const REQUEST: &str = "m.key.verification.request";
    /// `m.key.verification.ready`
    pub const READY: &str = "m.key.verification.ready";
    /// `m.key.verification.start`
    pub const START: &str = "m.key.verification.start";
    /// `m.key.verification.accept`
    pub const ACCEPT: &str = "m.key.verification.accept";
    /// `m.key.verification.key`
    pub const KEY: &str = "m.key.verification.key";
    /// `m.key.verification.mac`
    pub const MAC: &str = "m.key.verification.mac";
    /// `m.key.verification.done`
    pub const DONE: &str = "m.key.verification.done";
    /// `m.key.verification.cancel`
    pub const CANCEL: &str = "m.key.verification.cancel";
}

/// Where an incoming message stands before a flow's own rules apply.
pub(crate) enum Triage {
    /// Another flow's message: ignore.
    NotThisFlow,
    /// The flow's deadline passed: cancel with `m.timeout`.
    TimedOut,
    /// They cancelled: record it, never answer.
    CancelledByThem(sas_flow::Cancelled),
    /// For the flow to handle.
    Handle,
}

/// The checks every running flow makes first on an incoming message.
pub(crate) fn triage(
    flow: &FlowId,
    deadline: u64,
    event_type: &str,
    content: &Value,
    now: u64,
) -> Triage {
    if !flow.matches(content) {
        Triage::NotThisFlow
    } else if now >= deadline {
        Triage::TimedOut
    } else if event_type == event_types::CANCEL {
        let code = content.get("code").and_then(Value::as_str).unwrap_or("m.unknown");
        Triage::CancelledByThem(sas_flow::Cancelled {
            code: CancelCode::from_wire(code),
            by_us: false,
        })
    } else {
        Triage::Handle
    }
}

/// The cancel content for `code` in `flow`.
pub fn cancel_content(flow: &FlowId, code: &CancelCode) -> OutgoingContent {
    let mut content = Map::new();
    content.insert("code".into(), json!(code.as_str()));
    content.insert("reason".into(), json!(code.default_reason()));
    flow.decorate(&mut content);
    OutgoingContent { event_type: event_types::CANCEL, content: Value::Object(content) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_codes_round_trip() {
        let all = [
            CancelCode::User,
            CancelCode::Timeout,
            CancelCode::UnknownTransaction,
            CancelCode::UnknownMethod,
            CancelCode::UnexpectedMessage,
            CancelCode::KeyMismatch,
            CancelCode::UserMismatch,
            CancelCode::InvalidMessage,
            CancelCode::Accepted,
            CancelCode::MismatchedCommitment,
            CancelCode::MismatchedSas,
            CancelCode::Other("org.example.custom".into()),
        ];
        for code in all {
            assert_eq!(CancelCode::from_wire(code.as_str()), code);
        }
        assert_eq!(CancelCode::KeyMismatch.as_str(), "m.key_mismatch");
    }

    #[test]
    fn flow_ids_decorate_and_match() {
        let t = FlowId::ToDevice("txn".into());
        let r =
            FlowId::InRoom { room_id: RoomId::parse("!r:hs").unwrap(), event_id: "$req".into() };
        for flow in [&t, &r] {
            let c = cancel_content(flow, &CancelCode::User);
            assert!(flow.matches(&c.content));
            assert_eq!(c.content["code"], "m.user");
        }
        assert!(!t.matches(&cancel_content(&r, &CancelCode::User).content));
        assert!(
            !r.matches(&json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": "$req"}}))
        );
    }
}
