//! The public result and option types of [`Machine`]'s calls: what a sync
//! delivered and what became of it, room settings, `/keys/query` reports,
//! key import options and summaries.
//!
//! [`Machine`]: crate::Machine

use serde_json::Value;

use newt_proto::devices::RejectedDevice;
use newt_proto::export::DEFAULT_MAX_ROUNDS;
use newt_proto::identities::{CrossSigningError, DeviceTrust};
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::key_requests::KeyShareError;
use newt_proto::megolm::MegolmError;
use newt_proto::olm::{OlmError, KEY_CARRYING_TYPES};

// Defined in the core, which decides with them (`sharing::share`).
pub use newt_proto::sharing::RoomSettings;

/// What a sync delivered that the crypto layer needs.
#[derive(Debug, Clone, Default)]
pub struct SyncChanges {
    /// `to_device.events`.
    pub to_device_events: Vec<Value>,
    /// `device_lists.changed`.
    pub changed_users: Vec<UserId>,
    /// `device_lists.left`.
    pub left_users: Vec<UserId>,
    /// `device_one_time_keys_count.signed_curve25519` (absent means 0 when
    /// the map is present; pass `None` when the map is absent).
    pub one_time_key_count: Option<u64>,
    /// `device_unused_fallback_key_types`, if the server sent it.
    pub unused_fallback_key_types: Option<Vec<String>>,
    /// `next_batch`: committed together with the to-device results.
    pub next_batch: Option<String>,
}

/// What happened to one to-device event.
///
/// Room keys that newt stored (`m.room_key`, `m.forwarded_room_key`) come
/// without their `session_key`. The content of every key-carrying type
/// ([`KEY_CARRYING_TYPES`]: e.g. an `m.secret.send` secret, handed to the
/// app) is left out of the `Debug` output, so logging an outcome never logs
/// a key.
#[derive(Clone, PartialEq)]
pub struct ProcessedToDevice {
    /// The `sender` of the event.
    pub sender: String,
    /// The (inner, if it was encrypted) event type.
    pub event_type: String,
    /// The (decrypted) content; `Null` when the event was rejected.
    pub content: Value,
    /// Whether it arrived Olm-encrypted.
    pub encrypted: bool,
    /// The sending device, when known: the stored device (from
    /// `/keys/query`) whose Curve25519 key the Olm channel authenticated,
    /// or, for a device not fetched yet, the ID in its self-signed
    /// `sender_device_keys` (never the ID of a known device with other
    /// keys). Check [`sender_key`](Self::sender_key) against the device's
    /// keys before trusting a handed-through event from it.
    pub sender_device: Option<DeviceId>,
    /// The sending device's Curve25519 key, authenticated by Olm
    /// (unpadded base64); `None` for events that did not arrive over Olm.
    pub sender_key: Option<String>,
    /// For an Olm-encrypted event handed to the app
    /// ([`ToDeviceOutcome::ForApp`], e.g. `m.secret.send`): newt's verdict
    /// on the sending device, when it is a device known from `/keys/query`
    /// whose keys the Olm channel matched (and not deleted). `None` for a
    /// device that only vouched for itself: trust nothing it says. Use this
    /// rather than looking [`sender_device`](Self::sender_device) up later.
    pub sender_device_trust: Option<DeviceTrust>,
    /// What newt did with it.
    pub outcome: ToDeviceOutcome,
}

impl std::fmt::Debug for ProcessedToDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = KEY_CARRYING_TYPES.contains(&self.event_type.as_str());
        let content: &dyn std::fmt::Debug = if secret { &"<redacted>" } else { &self.content };
        f.debug_struct("ProcessedToDevice")
            .field("sender", &self.sender)
            .field("event_type", &self.event_type)
            .field("content", content)
            .field("encrypted", &self.encrypted)
            .field("sender_device", &self.sender_device)
            .field("sender_key", &self.sender_key)
            .field("sender_device_trust", &self.sender_device_trust)
            .field("outcome", &self.outcome)
            .finish()
    }
}

/// What newt did with a to-device event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ToDeviceOutcome {
    /// Not a crypto event: for the application.
    ForApp,
    /// A room key was stored (room, session).
    RoomKeyStored(RoomId, String),
    /// A key request was answered with a forwarded key.
    KeyRequestAnswered,
    /// A key request newt will answer (it passed every check) but cannot
    /// yet: there is no Olm session with the requesting device. It waits
    /// in memory (at most
    /// [`MAX_WAITING_KEY_REQUESTS`](newt_proto::key_requests::MAX_WAITING_KEY_REQUESTS),
    /// the oldest dropped; a repeated request ID is kept once; the
    /// requester's cancellation removes it); the next
    /// [`Machine::outgoing_requests`](crate::Machine::outgoing_requests)
    /// includes a `/keys/claim` for the device, and when that claim's answer
    /// is reported ([`Machine::mark_request_sent`](crate::Machine::mark_request_sent))
    /// the request is checked again (the device may have been blacklisted
    /// meanwhile) and answered by a to-device request of a later
    /// `outgoing_requests`. A restart forgets waiting requests.
    KeyRequestWaiting,
    /// A withheld notice was stored.
    WithheldStored,
    /// Handled internally (dummy, cancellation, duplicate key, ...).
    Handled,
    /// Rejected: the event broke a rule or could not be decrypted.
    Rejected(ToDeviceError),
}

/// Why a to-device event was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ToDeviceError {
    /// A key-carrying event arrived without Olm encryption.
    #[error("{0} must arrive Olm-encrypted")]
    NotOverOlm(String),
    /// Olm decryption or a plaintext check failed.
    #[error(transparent)]
    Olm(#[from] OlmError),
    /// The room key was invalid.
    #[error(transparent)]
    Megolm(#[from] MegolmError),
    /// A forwarded key or key request was refused.
    #[error(transparent)]
    KeyShare(#[from] KeyShareError),
    /// The event itself is malformed.
    #[error("malformed to-device event: {0}")]
    Malformed(&'static str),
}

/// The result of [`Machine::receive_sync`](crate::Machine::receive_sync).
#[derive(Debug, Clone, Default)]
pub struct SyncOutcome {
    /// Every to-device event, in order, with what happened to it.
    pub to_device: Vec<ProcessedToDevice>,
}

/// What a `/keys/query` response contained that newt refused; see
/// [`Machine::take_keys_query_reports`](crate::Machine::take_keys_query_reports).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeysQueryReport {
    /// Devices refused (bad signature, mismatched IDs, changed key).
    pub rejected: Vec<RejectedDevice>,
    /// Cross-signing identities refused (not stored; a previously stored
    /// identity of the user is kept as it was).
    pub rejected_identities: Vec<RejectedIdentity>,
}

impl KeysQueryReport {
    /// Nothing was refused.
    pub fn is_empty(&self) -> bool {
        self.rejected.is_empty() && self.rejected_identities.is_empty()
    }
}

/// A user's cross-signing keys that were refused.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedIdentity {
    /// The user.
    pub user_id: UserId,
    /// Why.
    pub reason: IdentityRejection,
}

/// Why a user's cross-signing keys were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityRejection {
    /// A key is malformed, or a signature by the master key is missing or
    /// wrong (e.g. a self-signing key the master key did not sign).
    #[error(transparent)]
    Invalid(#[from] CrossSigningError),
    /// One of the user's device IDs equals a cross-signing key ID: the user's
    /// identity and that device are refused (the key-ID namespaces clash).
    #[error("device {0} has the ID of one of the user's cross-signing keys")]
    DeviceIdCollision(String),
}

/// Summary of a key import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImportSummary {
    /// Keys in the file.
    pub total: usize,
    /// Keys stored (new, or better than what we had).
    pub imported: usize,
    /// Keys skipped (not Megolm, invalid, or not better).
    pub skipped: usize,
}

/// How to read a key export file ([`Machine::import_room_keys`]).
///
/// [`Machine::import_room_keys`]: crate::Machine::import_room_keys
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportOptions {
    /// The most PBKDF2 rounds the file may ask for; a file asking for more
    /// fails with [`ExportError::TooManyRounds`](crate::ExportError::TooManyRounds)
    /// before any key derivation. The default, [`DEFAULT_MAX_ROUNDS`]
    /// (5,000,000), is ten times what Element writes; raise it only for a
    /// file the user trusts to be worth the wait.
    pub max_rounds: u32,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self { max_rounds: DEFAULT_MAX_ROUNDS }
    }
}
