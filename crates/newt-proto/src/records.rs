//! Persistent state: the records a [`Store`](../../newt_store) keeps.
//!
//! Each record is the serialisable form of one piece of protocol state, kept
//! apart from the live vodozemac types (as vodozemac keeps pickles apart from
//! sessions). New fields get `#[serde(default)]` so old stores keep loading.
//! Records that hold secrets have a redacting `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vodozemac::megolm::{GroupSessionPickle, InboundGroupSessionPickle};
use vodozemac::olm::{AccountPickle, SessionPickle};

use crate::ids::{DeviceId, RoomId, UserId};

/// Our own device: identity keys, one-time and fallback keys.
#[derive(Serialize, Deserialize)]
pub struct AccountRecord {
    /// Our user.
    pub user_id: UserId,
    /// Our device.
    pub device_id: DeviceId,
    /// vodozemac's account state (secret).
    pub pickle: AccountPickle,
    /// Whether the device keys were uploaded successfully.
    pub shared: bool,
    /// The server's count of our unclaimed one-time keys, from the last sync.
    pub uploaded_one_time_key_count: u64,
    /// When the current fallback key was created (ms since the epoch).
    #[serde(default)]
    pub fallback_key_created_at: Option<u64>,
    /// Incremented on every write: lets processes sharing a store notice that
    /// another process changed the account.
    #[serde(default)]
    pub generation: u64,
    /// When a process took the right to upload the pending keys (ms): other
    /// processes sharing the store do not upload them meanwhile.
    #[serde(default)]
    pub upload_lease_since: Option<u64>,
}

impl fmt::Debug for AccountRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountRecord")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("pickle", &"<redacted>")
            .field("shared", &self.shared)
            .field("uploaded_one_time_key_count", &self.uploaded_one_time_key_count)
            .field("generation", &self.generation)
            .finish()
    }
}

/// One Olm session with another device.
#[derive(Serialize, Deserialize)]
pub struct OlmSessionRecord {
    /// The other device's Curve25519 identity key (unpadded base64): the lookup key.
    pub sender_key: String,
    /// vodozemac's session ID.
    pub session_id: String,
    /// vodozemac's session state (secret). Boxed: it is 3.7 KB, and
    /// records move through batches of thousands.
    pub pickle: Box<SessionPickle>,
    /// Creation time (ms since the epoch).
    pub created_at: u64,
    /// Last successful decryption (ms), or creation time if none yet.
    pub last_used_at: u64,
    /// Incremented on every write, like the account's: a store refuses a
    /// write based on an older state of the session (another process
    /// advanced the ratchet meanwhile).
    #[serde(default)]
    pub generation: u64,
}

impl fmt::Debug for OlmSessionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OlmSessionRecord")
            .field("sender_key", &self.sender_key)
            .field("session_id", &self.session_id)
            .field("pickle", &"<redacted>")
            .field("created_at", &self.created_at)
            .field("last_used_at", &self.last_used_at)
            .field("generation", &self.generation)
            .finish()
    }
}

/// Where an inbound Megolm session came from, which bounds how far it is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionSource {
    /// An `m.room_key` from the creator, over Olm.
    RoomKey,
    /// An `m.forwarded_room_key` from one of our own trusted devices.
    Forwarded,
    /// A key export file or backup.
    Imported,
}

/// A Megolm session we can decrypt with, keyed by (room ID, session ID).
#[derive(Serialize, Deserialize)]
pub struct InboundGroupSessionRecord {
    /// The room this session is bound to.
    pub room_id: RoomId,
    /// The session ID (unpadded base64 of the Megolm signing key).
    pub session_id: String,
    /// Curve25519 key of the device that created the session.
    pub sender_key: String,
    /// The Ed25519 key the creator claimed (`sender_claimed_keys.ed25519`).
    pub sender_claimed_ed25519: String,
    /// The user who shared it with us over Olm, when it came as `m.room_key`.
    #[serde(default)]
    pub sender_user_id: Option<UserId>,
    /// How we got it.
    pub source: SessionSource,
    /// Curve25519 keys of forwarders, oldest first.
    #[serde(default)]
    pub forwarding_chain: Vec<String>,
    /// The first message index we can decrypt.
    pub first_known_index: u32,
    /// `shared_history` flag from the key.
    #[serde(default)]
    pub shared_history: bool,
    /// vodozemac's session state (secret).
    pub pickle: InboundGroupSessionPickle,
    /// Whether the session was uploaded to server-side backup.
    #[serde(default)]
    pub backed_up: bool,
}

impl fmt::Debug for InboundGroupSessionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundGroupSessionRecord")
            .field("room_id", &self.room_id)
            .field("session_id", &self.session_id)
            .field("sender_key", &self.sender_key)
            .field("source", &self.source)
            .field("first_known_index", &self.first_known_index)
            .field("pickle", &"<redacted>")
            .finish()
    }
}

/// A device we shared an outbound session with, and at which index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareInfo {
    /// The device's Curve25519 key at the time of sharing.
    pub sender_key: String,
    /// The message index the device received the key at.
    pub message_index: u32,
}

/// Our outbound Megolm session for a room.
#[derive(Serialize, Deserialize)]
pub struct OutboundGroupSessionRecord {
    /// The room.
    pub room_id: RoomId,
    /// The session ID.
    pub session_id: String,
    /// vodozemac's session state (secret).
    pub pickle: GroupSessionPickle,
    /// Creation time (ms).
    pub created_at: u64,
    /// Messages encrypted so far.
    pub message_count: u64,
    /// Rotation after this many messages.
    pub rotation_period_msgs: u64,
    /// Rotation after this many milliseconds.
    pub rotation_period_ms: u64,
    /// Devices that received the key, confirmed by a sent to-device request.
    /// Shared (`Arc`) so that writing the record after each encryption does
    /// not copy a map that grows with the audience.
    #[serde(default, with = "arc_map")]
    pub shared_with: Arc<SharedWith>,
    /// Devices that were sent a withheld notice for this session.
    #[serde(default, with = "arc_map")]
    pub withheld_to: Arc<WithheldTo>,
    /// Incremented on every write, like an Olm session's: a store refuses a
    /// write based on an older state of the session (another process
    /// encrypted, shared or rotated meanwhile). A new session for a room
    /// starts one past the record it replaces, or at 0 when there is none.
    #[serde(default)]
    pub generation: u64,
}

/// Who received an outbound session's key, by user and device.
pub type SharedWith = BTreeMap<UserId, BTreeMap<DeviceId, ShareInfo>>;
/// Who was told an outbound session's key is withheld, with the code.
pub type WithheldTo = BTreeMap<UserId, BTreeMap<DeviceId, String>>;

/// Serde for `Arc<T>` fields without serde's `rc` feature.
mod arc_map {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<T: Serialize, S: Serializer>(
        value: &Arc<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        value.as_ref().serialize(s)
    }

    pub(super) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Arc<T>, D::Error> {
        T::deserialize(d).map(Arc::new)
    }
}

impl fmt::Debug for OutboundGroupSessionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundGroupSessionRecord")
            .field("room_id", &self.room_id)
            .field("session_id", &self.session_id)
            .field("message_count", &self.message_count)
            .field("generation", &self.generation)
            .field("pickle", &"<redacted>")
            .finish()
    }
}

/// The local (user-decided) trust in a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalTrust {
    /// No decision.
    #[default]
    Unset,
    /// Verified by the user.
    Verified,
    /// Blacklisted: never send keys to it.
    Blacklisted,
}

/// A device of some user (possibly our own), from a verified `/keys/query`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The owner.
    pub user_id: UserId,
    /// The device ID.
    pub device_id: DeviceId,
    /// Curve25519 identity key, unpadded base64.
    pub curve25519: String,
    /// Ed25519 fingerprint key, unpadded base64.
    pub ed25519: String,
    /// Algorithms the device advertises.
    pub algorithms: Vec<String>,
    /// `unsigned.device_display_name`, if any.
    #[serde(default)]
    pub display_name: Option<String>,
    /// The signed DeviceKeys object exactly as received (for re-checks and
    /// cross-signing). Shared, so copying a record out of a store does not
    /// copy the tree.
    pub keys: Arc<Value>,
    /// The user's decision about this device.
    #[serde(default)]
    pub local_trust: LocalTrust,
    /// The server no longer lists this device.
    #[serde(default)]
    pub deleted: bool,
}

/// A user whose device list we follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackedUser {
    /// The user.
    pub user_id: UserId,
    /// The device list must be (re-)queried.
    pub outdated: bool,
}

/// An `m.room_key_request` we sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRequestRecord {
    /// The `request_id`.
    pub request_id: String,
    /// Room of the wanted session.
    pub room_id: RoomId,
    /// Wanted session.
    pub session_id: String,
    /// Whether the request was handed to the caller to be sent.
    pub sent: bool,
}

/// An `m.room_key.withheld` we received, kept to explain decryption failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WithheldRecord {
    /// The room.
    pub room_id: RoomId,
    /// The session.
    pub session_id: String,
    /// Who withheld it.
    pub sender: UserId,
    /// The withheld code, e.g. `m.unverified`.
    pub code: String,
    /// Human-readable reason, if any.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The first event seen at a Megolm message index: the replay-detection record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageIndexRecord {
    /// The room.
    pub room_id: RoomId,
    /// The session.
    pub session_id: String,
    /// The Megolm message index.
    pub index: u32,
    /// Event ID of the first event that decrypted at this index.
    pub event_id: String,
    /// Its `origin_server_ts`.
    pub origin_server_ts: u64,
}
