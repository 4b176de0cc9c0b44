//! Megolm (`m.megolm.v1.aes-sha2`): room encryption.
//!
//! Inbound sessions are keyed by (room ID, session ID) and bound to the room
//! they arrived for. A stored session is only replaced by a copy of the same
//! ratchet that starts at a lower index. Decryption checks that the payload's
//! `room_id` is the event's room and the session's room, that the event's
//! sender owns the session, and that no other event was seen at the same
//! (session, index) (replay detection).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};
use vodozemac::megolm::{
    DecryptedMessage, ExportedSessionKey, GroupSession, InboundGroupSession, MegolmMessage,
    SessionConfig, SessionKey, SessionOrdering,
};

use crate::account::OwnAccount;
use crate::export::ExportedRoomKey;
use crate::identities::{TrustRoot, UserIdentity};
use crate::ids::{DeviceId, RoomId, UserId};
use crate::json::strip_padding;
use crate::olm::DecryptedToDevice;
use crate::records::{
    DeviceRecord, InboundGroupSessionRecord, MessageIndexRecord, OutboundGroupSessionRecord,
    SessionSource, SharedWith, WithheldRecord, WithheldTo,
};
use crate::trust::{sender_trust, with_cross_signing, SenderTrust};
use crate::MEGOLM_V1;

/// Default rotation: 100 messages.
pub const DEFAULT_ROTATION_PERIOD_MSGS: u64 = 100;
/// Default rotation: one week.
pub const DEFAULT_ROTATION_PERIOD_MS: u64 = 7 * 24 * 3600 * 1000;

/// Room encryption settings (from `m.room.encryption`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationSettings {
    /// Rotate after this many messages.
    pub rotation_period_msgs: u64,
    /// Rotate after this many milliseconds.
    pub rotation_period_ms: u64,
}

impl Default for RotationSettings {
    fn default() -> Self {
        Self {
            rotation_period_msgs: DEFAULT_ROTATION_PERIOD_MSGS,
            rotation_period_ms: DEFAULT_ROTATION_PERIOD_MS,
        }
    }
}

impl RotationSettings {
    /// Reads `rotation_period_msgs`/`rotation_period_ms` from an
    /// `m.room.encryption` content; missing or invalid values take the defaults.
    pub fn from_encryption_content(content: &Value) -> Self {
        let d = Self::default();
        Self {
            rotation_period_msgs: content
                .get("rotation_period_msgs")
                .and_then(Value::as_u64)
                .filter(|n| *n > 0)
                .unwrap_or(d.rotation_period_msgs),
            rotation_period_ms: content
                .get("rotation_period_ms")
                .and_then(Value::as_u64)
                .filter(|n| *n > 0)
                .unwrap_or(d.rotation_period_ms),
        }
    }
}

/// Megolm errors, by who is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MegolmError {
    /// The event or key content is malformed.
    #[error("malformed Megolm content: {0}")]
    Malformed(&'static str),
    /// We do not have the session.
    #[error("unknown session {session_id} in {room_id}")]
    MissingSession {
        /// Room.
        room_id: RoomId,
        /// Session.
        session_id: String,
        /// The event's sender's withheld notice for the session, if one
        /// arrived: why the sender says we did not get the key. It is the
        /// sender's claim, not a fact: notices travel unencrypted, so the
        /// server could have forged it. Notices are kept per sender; one
        /// from anybody else is never shown here.
        withheld: Option<Box<WithheldRecord>>,
    },
    /// The message index is below the first index we have.
    #[error("message index {index} is before the first known index {first_known}")]
    UnknownIndex {
        /// Index of the message.
        index: u32,
        /// First index we can decrypt.
        first_known: u32,
    },
    /// The ciphertext failed vodozemac's checks (which one, typed).
    #[error("Megolm decryption failed: {0}")]
    Decryption(DecryptionFailure),
    /// The payload's `room_id` is not the event's room, or the session is bound to another room.
    #[error("room mismatch: event in {event_room}, payload/session says {other}")]
    RoomMismatch {
        /// The event's room.
        event_room: String,
        /// The room in the payload or the session.
        other: String,
    },
    /// The event's sender is not the user who shared the session.
    #[error("event sender {sender} does not own the session (shared by {owner})")]
    SenderMismatch {
        /// Event sender.
        sender: String,
        /// Who shared the session.
        owner: String,
    },
    /// The same (session, index) was seen with another event: replay.
    #[error("duplicate message index {index}: possible replay attack")]
    Replay {
        /// The index.
        index: u32,
    },
    /// The `m.room_key` does not match its session ID.
    #[error("room key session_id does not match the key")]
    SessionIdMismatch,
    /// A key for an existing session came from a different creator.
    #[error("room key for an existing session has a different sender key")]
    SenderKeyMismatch,
}

/// Our outbound session for a room, in live form.
pub struct OutboundSession {
    /// The vodozemac session.
    pub session: GroupSession,
    /// Everything else.
    pub meta: OutboundMeta,
}

/// Metadata of an outbound session.
#[derive(Debug, Clone)]
pub struct OutboundMeta {
    /// The room.
    pub room_id: RoomId,
    /// Creation time (ms).
    pub created_at: u64,
    /// Messages encrypted.
    pub message_count: u64,
    /// Rotation settings.
    pub settings: RotationSettings,
    /// Devices that got the key (shared with the records written from it;
    /// change it with `Arc::make_mut`).
    pub shared_with: Arc<SharedWith>,
    /// Devices that got a withheld notice, with the code.
    pub withheld_to: Arc<WithheldTo>,
    /// The generation of the record this state was loaded from or last
    /// written as (see [`OutboundGroupSessionRecord::generation`]).
    pub generation: u64,
}

impl OutboundSession {
    /// A new session for `room_id`.
    pub fn new(room_id: RoomId, settings: RotationSettings, now: u64) -> Self {
        Self {
            session: GroupSession::new(SessionConfig::version_1()),
            meta: OutboundMeta {
                room_id,
                created_at: now,
                message_count: 0,
                settings,
                shared_with: Arc::default(),
                withheld_to: Arc::default(),
                generation: 0,
            },
        }
    }

    /// From a record.
    pub fn from_record(r: OutboundGroupSessionRecord) -> Self {
        Self {
            session: GroupSession::from_pickle(r.pickle),
            meta: OutboundMeta {
                room_id: r.room_id,
                created_at: r.created_at,
                message_count: r.message_count,
                settings: RotationSettings {
                    rotation_period_msgs: r.rotation_period_msgs,
                    rotation_period_ms: r.rotation_period_ms,
                },
                shared_with: r.shared_with,
                withheld_to: r.withheld_to,
                generation: r.generation,
            },
        }
    }

    /// To a record, at the session's current generation (bump
    /// `meta.generation` first when writing over a stored record). Cheap:
    /// the share maps are shared, not copied.
    pub fn to_record(&self) -> OutboundGroupSessionRecord {
        OutboundGroupSessionRecord {
            room_id: self.meta.room_id.clone(),
            session_id: self.session.session_id(),
            pickle: self.session.pickle(),
            created_at: self.meta.created_at,
            message_count: self.meta.message_count,
            rotation_period_msgs: self.meta.settings.rotation_period_msgs,
            rotation_period_ms: self.meta.settings.rotation_period_ms,
            shared_with: Arc::clone(&self.meta.shared_with),
            withheld_to: Arc::clone(&self.meta.withheld_to),
            generation: self.meta.generation,
        }
    }

    /// The session ID.
    pub fn session_id(&self) -> String {
        self.session.session_id()
    }

    /// Whether the session is worn out by count or age (or its settings
    /// changed to something stricter).
    pub fn expired(&self, settings: &RotationSettings, now: u64) -> bool {
        let msgs = settings.rotation_period_msgs.min(self.meta.settings.rotation_period_msgs);
        let ms = settings.rotation_period_ms.min(self.meta.settings.rotation_period_ms);
        self.meta.message_count >= msgs || now.saturating_sub(self.meta.created_at) >= ms
    }

    /// The `m.room_key` content for this session at its current index.
    pub fn room_key_content(&self, shared_history: bool) -> Value {
        let mut c = json!({
            "algorithm": MEGOLM_V1,
            "room_id": self.meta.room_id,
            "session_id": self.session.session_id(),
            "session_key": self.session.session_key().to_base64(),
        });
        if shared_history {
            c["shared_history"] = Value::Bool(true);
        }
        c
    }

    /// The inbound copy of our own session, so we can read our own messages.
    pub fn own_inbound(&self, own: &OwnAccount) -> InboundGroupSessionRecord {
        let inbound =
            InboundGroupSession::new(&self.session.session_key(), SessionConfig::version_1());
        InboundGroupSessionRecord {
            room_id: self.meta.room_id.clone(),
            session_id: self.session.session_id(),
            sender_key: own.curve25519_key().to_base64(),
            sender_claimed_ed25519: own.ed25519_key().to_base64(),
            sender_user_id: Some(own.user_id().clone()),
            source: SessionSource::RoomKey,
            forwarding_chain: Vec::new(),
            first_known_index: inbound.first_known_index(),
            shared_history: false,
            pickle: inbound.pickle(),
            backed_up: false,
        }
    }

    /// Encrypts a room event, producing the `m.room.encrypted` content.
    /// `m.relates_to` is copied to the cleartext, as the spec requires.
    pub fn encrypt(&mut self, own: &OwnAccount, event_type: &str, content: Value) -> Value {
        self.encrypt_ref(own, event_type, &content)
    }

    /// [`encrypt`](Self::encrypt) without taking the content (it is only
    /// serialised, never copied).
    pub fn encrypt_ref(&mut self, own: &OwnAccount, event_type: &str, content: &Value) -> Value {
        #[derive(serde::Serialize)]
        struct Payload<'a> {
            #[serde(rename = "type")]
            event_type: &'a str,
            content: &'a Value,
            room_id: &'a RoomId,
        }
        let relates_to = content.get("m.relates_to").cloned();
        let payload = Payload { event_type, content, room_id: &self.meta.room_id };
        // Serialising a `Value` and borrowed strings cannot fail.
        let payload = serde_json::to_string(&payload).unwrap_or_default();
        let message = self.session.encrypt(payload);
        self.meta.message_count += 1;
        let mut out = json!({
            "algorithm": MEGOLM_V1,
            "ciphertext": message.to_base64(),
            "session_id": self.session.session_id(),
            "sender_key": own.curve25519_key().to_base64(),
            "device_id": own.device_id(),
        });
        if let Some(rel) = relates_to {
            out["m.relates_to"] = rel;
        }
        out
    }
}

/// Parses an `m.room_key` that arrived over Olm into a session record.
pub fn session_from_room_key(
    event: &DecryptedToDevice,
) -> Result<InboundGroupSessionRecord, MegolmError> {
    let c = &event.content;
    if c.get("algorithm").and_then(Value::as_str) != Some(MEGOLM_V1) {
        return Err(MegolmError::Malformed("algorithm"));
    }
    let room_id = c
        .get("room_id")
        .and_then(Value::as_str)
        .and_then(|r| RoomId::parse(r).ok())
        .ok_or(MegolmError::Malformed("room_id"))?;
    let session_id =
        c.get("session_id").and_then(Value::as_str).ok_or(MegolmError::Malformed("session_id"))?;
    let key = c
        .get("session_key")
        .and_then(Value::as_str)
        .ok_or(MegolmError::Malformed("session_key"))?;
    // Parsing checks the key's signature.
    let key = SessionKey::from_base64(strip_padding(key))
        .map_err(|_| MegolmError::Malformed("session_key"))?;
    let session = InboundGroupSession::new(&key, SessionConfig::version_1());
    if session.session_id() != strip_padding(session_id) {
        return Err(MegolmError::SessionIdMismatch);
    }
    Ok(InboundGroupSessionRecord {
        room_id,
        session_id: session.session_id(),
        sender_key: event.sender_key.clone(),
        sender_claimed_ed25519: event.sender_ed25519.clone(),
        sender_user_id: Some(event.sender.clone()),
        source: SessionSource::RoomKey,
        forwarding_chain: Vec::new(),
        first_known_index: session.first_known_index(),
        shared_history: c.get("shared_history").and_then(Value::as_bool).unwrap_or(false),
        pickle: session.pickle(),
        backed_up: false,
    })
}

/// Builds a session record from an exported key (file import, backup, or a
/// forwarded key), with the given source.
pub fn session_from_export(
    key: &ExportedRoomKey,
    source: SessionSource,
) -> Result<InboundGroupSessionRecord, MegolmError> {
    if key.algorithm != MEGOLM_V1 {
        return Err(MegolmError::Malformed("algorithm"));
    }
    let room_id =
        RoomId::parse(key.room_id.as_str()).map_err(|_| MegolmError::Malformed("room_id"))?;
    let exported = ExportedSessionKey::from_base64(strip_padding(&key.session_key))
        .map_err(|_| MegolmError::Malformed("session_key"))?;
    let session = InboundGroupSession::import(&exported, SessionConfig::version_1());
    if session.session_id() != strip_padding(&key.session_id) {
        return Err(MegolmError::SessionIdMismatch);
    }
    Ok(InboundGroupSessionRecord {
        room_id,
        session_id: session.session_id(),
        sender_key: strip_padding(&key.sender_key).to_owned(),
        sender_claimed_ed25519: key
            .sender_claimed_keys
            .get("ed25519")
            .map(|k| strip_padding(k).to_owned())
            .unwrap_or_default(),
        sender_user_id: None,
        source,
        forwarding_chain: key.forwarding_curve25519_key_chain.clone(),
        first_known_index: session.first_known_index(),
        shared_history: key.shared_history,
        pickle: session.pickle(),
        backed_up: false,
    })
}

/// Exports a stored session at its first known index.
pub fn export_session(r: &InboundGroupSessionRecord) -> Result<ExportedRoomKey, MegolmError> {
    let session = InboundGroupSession::from_pickle(clone_pickle(r)?);
    Ok(ExportedRoomKey {
        algorithm: MEGOLM_V1.to_owned(),
        room_id: r.room_id.to_string(),
        sender_key: r.sender_key.clone(),
        session_id: r.session_id.clone(),
        session_key: session.export_at_first_known_index().to_base64(),
        sender_claimed_keys: BTreeMap::from([(
            "ed25519".to_owned(),
            r.sender_claimed_ed25519.clone(),
        )]),
        forwarding_curve25519_key_chain: r.forwarding_chain.clone(),
        shared_history: r.shared_history,
    })
}

/// [`export_session`] for a record the caller no longer needs: its pickle
/// and strings are moved instead of copied (bulk export).
pub fn export_record(r: InboundGroupSessionRecord) -> ExportedRoomKey {
    let InboundGroupSessionRecord {
        room_id,
        session_id,
        sender_key,
        sender_claimed_ed25519,
        forwarding_chain,
        shared_history,
        pickle,
        ..
    } = r;
    let session = InboundGroupSession::from_pickle(pickle);
    ExportedRoomKey {
        algorithm: MEGOLM_V1.to_owned(),
        room_id: room_id.to_string(),
        sender_key,
        session_id,
        session_key: session.export_at_first_known_index().to_base64(),
        sender_claimed_keys: BTreeMap::from([("ed25519".to_owned(), sender_claimed_ed25519)]),
        forwarding_curve25519_key_chain: forwarding_chain,
        shared_history,
    }
}

fn clone_pickle(
    r: &InboundGroupSessionRecord,
) -> Result<vodozemac::megolm::InboundGroupSessionPickle, MegolmError> {
    crate::records::pickle_encoding::copy(&r.pickle)
        .map_err(|_| MegolmError::Malformed("stored session pickle"))
}

/// Decides whether `new` should replace `existing`: only a copy of the same
/// ratchet (same sender key, connected) that starts at a lower index.
pub fn should_replace(
    existing: &InboundGroupSessionRecord,
    new: &InboundGroupSessionRecord,
) -> Result<bool, MegolmError> {
    if existing.sender_key != new.sender_key {
        return Err(MegolmError::SenderKeyMismatch);
    }
    let mut a = InboundGroupSession::from_pickle(clone_pickle(existing)?);
    let mut b = InboundGroupSession::from_pickle(clone_pickle(new)?);
    Ok(matches!(b.compare(&mut a), SessionOrdering::Better))
}

/// The parts of an `m.room.encrypted` room event that Megolm needs.
#[derive(Debug, Clone)]
pub struct EncryptedRoomEvent {
    /// `event_id`.
    pub event_id: String,
    /// `sender`.
    pub sender: UserId,
    /// `origin_server_ts`.
    pub origin_server_ts: u64,
    /// `content.session_id`.
    pub session_id: String,
    /// `content.ciphertext`, decoded.
    pub message: MegolmMessage,
    /// Cleartext `content.m.relates_to`.
    pub relates_to: Option<Value>,
}

/// Parses a raw room event.
pub fn parse_room_event(event: &Value) -> Result<EncryptedRoomEvent, MegolmError> {
    let content = event.get("content").ok_or(MegolmError::Malformed("content"))?;
    if content.get("algorithm").and_then(Value::as_str) != Some(MEGOLM_V1) {
        return Err(MegolmError::Malformed("algorithm"));
    }
    let ciphertext = content
        .get("ciphertext")
        .and_then(Value::as_str)
        .ok_or(MegolmError::Malformed("ciphertext"))?;
    let message = MegolmMessage::from_base64(strip_padding(ciphertext))
        .map_err(|_| MegolmError::Malformed("ciphertext"))?;
    Ok(EncryptedRoomEvent {
        event_id: event
            .get("event_id")
            .and_then(Value::as_str)
            .ok_or(MegolmError::Malformed("event_id"))?
            .to_owned(),
        sender: event
            .get("sender")
            .and_then(Value::as_str)
            .and_then(|s| UserId::parse(s).ok())
            .ok_or(MegolmError::Malformed("sender"))?,
        origin_server_ts: event.get("origin_server_ts").and_then(Value::as_u64).unwrap_or(0),
        session_id: strip_padding(
            content
                .get("session_id")
                .and_then(Value::as_str)
                .ok_or(MegolmError::Malformed("session_id"))?,
        )
        .to_owned(),
        message,
        relates_to: content.get("m.relates_to").cloned(),
    })
}

/// A decrypted room event.
#[derive(Debug, Clone, PartialEq)]
pub struct DecryptedRoomEvent {
    /// The inner event type.
    pub event_type: String,
    /// The inner content (with the cleartext `m.relates_to`, if any).
    pub content: Value,
    /// The sender.
    pub sender: UserId,
    /// The sending device, when known and matching the session.
    pub sender_device: Option<DeviceId>,
    /// What we know about the sender.
    pub trust: SenderTrust,
    /// The Megolm message index.
    pub message_index: u32,
    /// The session ID.
    pub session_id: String,
}

/// What a room event's sender is judged against, loaded by the driver before
/// the decryption so that one call returns the final [`SenderTrust`].
#[derive(Clone, Copy)]
pub struct SenderContext<'a> {
    /// The sender's known devices (for our own user, this device too, with
    /// [`LocalTrust::Verified`](crate::records::LocalTrust::Verified)).
    pub devices: &'a [DeviceRecord],
    /// Our trust root and the sender's identity (`None` for our own user,
    /// whose devices the root judges with our own identity), when
    /// [`needs_cross_signing`] asked for them; without them a known,
    /// not locally verified device stays [`SenderTrust::Unverified`].
    pub cross_signing: Option<(&'a TrustRoot<'a>, Option<&'a UserIdentity>)>,
}

impl<'a> SenderContext<'a> {
    /// A context of devices only (no cross-signing).
    pub fn devices(devices: &'a [DeviceRecord]) -> Self {
        Self { devices, cross_signing: None }
    }
}

/// Whether an event of `session` from a sender with `devices` can only be
/// labelled once cross-signing is known: its device is known and owns the
/// session but is not locally verified. The driver then loads our trust
/// root and the sender's identity into the [`SenderContext`]; otherwise it
/// need not read them.
pub fn needs_cross_signing(session: &InboundGroupSessionRecord, devices: &[DeviceRecord]) -> bool {
    sender_trust(session, devices) == SenderTrust::Unverified
}

/// Decrypts a parsed room event with its session.
///
/// `seen` is the replay record at the event's index, if any; when the event
/// is the first at its index, a new record is returned for persisting.
pub fn decrypt_room_event(
    room_id: &RoomId,
    event: &EncryptedRoomEvent,
    session: &InboundGroupSessionRecord,
    sender: &SenderContext<'_>,
    seen: Option<&MessageIndexRecord>,
) -> Result<(DecryptedRoomEvent, Option<MessageIndexRecord>), MegolmError> {
    let mut inbound = live_inbound(session)?;
    decrypt_room_event_with(room_id, event, session, &mut inbound, sender, seen)
}

/// The live vodozemac session of a stored record (the record is kept).
pub fn live_inbound(r: &InboundGroupSessionRecord) -> Result<InboundGroupSession, MegolmError> {
    Ok(InboundGroupSession::from_pickle(clone_pickle(r)?))
}

/// [`decrypt_room_event`] with a live session the caller keeps (a cache):
/// `inbound` must be the session of `session` (e.g. from [`live_inbound`]).
/// Every check is the same; decrypting does not change what the session can
/// decrypt, so a cached session stays equivalent to its record.
pub fn decrypt_room_event_with(
    room_id: &RoomId,
    event: &EncryptedRoomEvent,
    session: &InboundGroupSessionRecord,
    inbound: &mut InboundGroupSession,
    sender: &SenderContext<'_>,
    seen: Option<&MessageIndexRecord>,
) -> Result<(DecryptedRoomEvent, Option<MessageIndexRecord>), MegolmError> {
    check_session_room(room_id, session)?;
    let decrypted = megolm_decrypt(inbound, &event.message)?;
    finish_room_event(room_id, event, session, decrypted, sender, seen)
}

fn check_session_room(
    room_id: &RoomId,
    session: &InboundGroupSessionRecord,
) -> Result<(), MegolmError> {
    if &session.room_id != room_id {
        return Err(MegolmError::RoomMismatch {
            event_room: room_id.to_string(),
            other: session.room_id.to_string(),
        });
    }
    Ok(())
}

/// Which of vodozemac's checks a Megolm ciphertext failed (its
/// `DecryptionError`, without the unknown index, which is
/// [`MegolmError::UnknownIndex`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecryptionFailure {
    /// The message's signature by the session key is invalid.
    #[error("invalid signature")]
    Signature,
    /// The message authentication code is invalid.
    #[error("invalid MAC")]
    Mac,
    /// The MAC has the wrong length.
    #[error("MAC of {found} bytes, {expected} expected")]
    MacLength {
        /// The expected length.
        expected: usize,
        /// The length found.
        found: usize,
    },
    /// The plaintext is not padded correctly.
    #[error("invalid padding")]
    Padding,
}

/// A Megolm plaintext that passed vodozemac's signature and MAC checks,
/// bound to the session that decrypted it. Only [`megolm_decrypt`] makes
/// one, so [`finish_room_event`] cannot be handed a plaintext that skipped
/// those checks or came from another session.
#[derive(Clone)]
pub struct CheckedPlaintext {
    message: DecryptedMessage,
    session_id: String,
}

impl std::fmt::Debug for CheckedPlaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedPlaintext")
            .field("session_id", &self.session_id)
            .field("message_index", &self.message.message_index)
            .finish_non_exhaustive()
    }
}

/// vodozemac's Megolm decryption alone (signature, MAC, cipher): the costly
/// step, which a batch may run ahead on other threads with copies of the
/// session (see [`finish_room_event`]).
pub fn megolm_decrypt(
    inbound: &mut InboundGroupSession,
    message: &MegolmMessage,
) -> Result<CheckedPlaintext, MegolmError> {
    let decrypted = inbound.decrypt(message).map_err(|e| match e {
        vodozemac::megolm::DecryptionError::UnknownMessageIndex(first, index) => {
            MegolmError::UnknownIndex { index, first_known: first }
        }
        vodozemac::megolm::DecryptionError::Signature(_) => {
            MegolmError::Decryption(DecryptionFailure::Signature)
        }
        vodozemac::megolm::DecryptionError::InvalidMAC(_) => {
            MegolmError::Decryption(DecryptionFailure::Mac)
        }
        vodozemac::megolm::DecryptionError::InvalidMACLength(expected, found) => {
            MegolmError::Decryption(DecryptionFailure::MacLength { expected, found })
        }
        vodozemac::megolm::DecryptionError::InvalidPadding(_) => {
            MegolmError::Decryption(DecryptionFailure::Padding)
        }
    })?;
    Ok(CheckedPlaintext { message: decrypted, session_id: inbound.session_id() })
}

/// Every check of [`decrypt_room_event_with`] after the Megolm decryption,
/// for a message `decrypted` by [`megolm_decrypt`] with a copy of the live
/// session of `session` (the signature and MAC checks happened there; a
/// plaintext of another session is refused here). Prefer
/// [`decrypt_room_event_with`]; this split exists so a batch can run the
/// Megolm step on other threads.
pub fn finish_room_event(
    room_id: &RoomId,
    event: &EncryptedRoomEvent,
    session: &InboundGroupSessionRecord,
    decrypted: CheckedPlaintext,
    sender: &SenderContext<'_>,
    seen: Option<&MessageIndexRecord>,
) -> Result<(DecryptedRoomEvent, Option<MessageIndexRecord>), MegolmError> {
    check_session_room(room_id, session)?;
    if decrypted.session_id != session.session_id || event.session_id != session.session_id {
        return Err(MegolmError::Malformed("plaintext of another session"));
    }
    let decrypted = decrypted.message;
    let payload: Value = serde_json::from_slice(&decrypted.plaintext)
        .map_err(|_| MegolmError::Malformed("payload JSON"))?;
    let payload_room = payload
        .get("room_id")
        .and_then(Value::as_str)
        .ok_or(MegolmError::Malformed("payload room_id"))?;
    if payload_room != room_id.as_str() {
        return Err(MegolmError::RoomMismatch {
            event_room: room_id.to_string(),
            other: payload_room.to_owned(),
        });
    }
    if let Some(owner) = &session.sender_user_id {
        if owner != &event.sender {
            return Err(MegolmError::SenderMismatch {
                sender: event.sender.to_string(),
                owner: owner.to_string(),
            });
        }
    }
    let index = decrypted.message_index;
    let new_record = match seen {
        Some(s) if s.event_id != event.event_id || s.origin_server_ts != event.origin_server_ts => {
            return Err(MegolmError::Replay { index });
        }
        Some(_) => None,
        None => Some(MessageIndexRecord {
            room_id: room_id.clone(),
            session_id: session.session_id.clone(),
            index,
            event_id: event.event_id.clone(),
            origin_server_ts: event.origin_server_ts,
        }),
    };
    let event_type = payload
        .get("type")
        .and_then(Value::as_str)
        .ok_or(MegolmError::Malformed("payload type"))?
        .to_owned();
    let mut content = payload
        .get("content")
        .filter(|c| c.is_object())
        .cloned()
        .ok_or(MegolmError::Malformed("payload content"))?;
    if let Some(obj) = content.as_object_mut() {
        obj.remove("m.relates_to");
        if let Some(rel) = &event.relates_to {
            obj.insert("m.relates_to".into(), rel.clone());
        }
    }
    let device = sender.devices.iter().find(|d| {
        d.curve25519 == session.sender_key && d.ed25519 == session.sender_claimed_ed25519
    });
    let mut trust = sender_trust(session, sender.devices);
    if let (Some(device), Some((root, owner))) = (device, sender.cross_signing) {
        trust = with_cross_signing(trust, Some(root.device_trust(owner, device)));
    }
    let sender_device = device.map(|d| d.device_id.clone());
    Ok((
        DecryptedRoomEvent {
            event_type,
            content,
            sender: event.sender.clone(),
            sender_device,
            trust,
            message_index: index,
            session_id: session.session_id.clone(),
        },
        new_record,
    ))
}

/// Parses an `m.room_key.withheld` content from `sender`.
pub fn parse_withheld(sender: &UserId, content: &Value) -> Option<WithheldRecord> {
    let room_id = RoomId::parse(content.get("room_id")?.as_str()?).ok()?;
    Some(WithheldRecord {
        room_id,
        session_id: content.get("session_id")?.as_str()?.to_owned(),
        sender: sender.clone(),
        code: content.get("code")?.as_str()?.to_owned(),
        reason: content.get("reason").and_then(Value::as_str).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> OwnAccount {
        OwnAccount::new(UserId::parse("@alice:hs").unwrap(), DeviceId::parse("A").unwrap())
    }

    fn room() -> RoomId {
        RoomId::parse("!r:hs").unwrap()
    }

    fn event(content: Value, id: &str, ts: u64) -> Value {
        json!({"event_id": id, "sender": "@alice:hs", "origin_server_ts": ts, "content": content, "type": "m.room.encrypted"})
    }

    /// A plaintext checked by another session's MAC and signature cannot be
    /// finished as this session's event.
    #[test]
    fn attack_plaintext_of_another_session_is_not_finished() {
        let a = own();
        let mut first = OutboundSession::new(room(), RotationSettings::default(), 0);
        let mut second = OutboundSession::new(room(), RotationSettings::default(), 0);
        let first_record = first.own_inbound(&a);
        let second_record = second.own_inbound(&a);
        let c = second.encrypt(&a, "m.room.message", json!({"body": "second"}));
        let _ = first.encrypt(&a, "m.room.message", json!({"body": "first"}));
        let parsed = parse_room_event(&event(c, "$e", 1)).unwrap();
        let mut live = live_inbound(&second_record).unwrap();
        let checked = megolm_decrypt(&mut live, &parsed.message).unwrap();
        let err = finish_room_event(
            &room(),
            &parsed,
            &first_record,
            checked.clone(),
            &SenderContext::devices(&[]),
            None,
        )
        .unwrap_err();
        assert_eq!(err, MegolmError::Malformed("plaintext of another session"));
        let (ok, _) = finish_room_event(
            &room(),
            &parsed,
            &second_record,
            checked,
            &SenderContext::devices(&[]),
            None,
        )
        .unwrap();
        assert_eq!(ok.content["body"], "second");
    }

    /// The sender's identity is only worth reading for a known device that
    /// owns the session and is not locally verified.
    #[test]
    fn cross_signing_is_only_needed_for_a_known_unverified_device() {
        let a = own();
        let out = OutboundSession::new(room(), RotationSettings::default(), 0);
        let inbound = out.own_inbound(&a);
        let mut device =
            crate::devices::parse_device_keys(a.user_id(), "A", &a.device_keys()).unwrap();
        assert!(!needs_cross_signing(&inbound, &[]));
        assert!(needs_cross_signing(&inbound, std::slice::from_ref(&device)));
        device.local_trust = crate::records::LocalTrust::Verified;
        assert!(!needs_cross_signing(&inbound, std::slice::from_ref(&device)));
    }

    #[test]
    fn encrypt_decrypt_replay_and_room_checks() {
        let a = own();
        let mut out = OutboundSession::new(room(), RotationSettings::default(), 0);
        let inbound = out.own_inbound(&a);
        let c = out.encrypt(
            &a,
            "m.room.message",
            json!({"body": "hi", "m.relates_to": {"rel_type": "m.thread", "event_id": "$t"}}),
        );
        assert_eq!(c["m.relates_to"]["event_id"], "$t");
        let ev = parse_room_event(&event(c.clone(), "$1", 10)).unwrap();
        let (d, rec) =
            decrypt_room_event(&room(), &ev, &inbound, &SenderContext::devices(&[]), None).unwrap();
        assert_eq!(d.content["body"], "hi");
        assert_eq!(d.trust, SenderTrust::UnknownDevice);
        let rec = rec.unwrap();
        // Same event again: fine, no new record.
        let (_, again) =
            decrypt_room_event(&room(), &ev, &inbound, &SenderContext::devices(&[]), Some(&rec))
                .unwrap();
        assert!(again.is_none());
        // Same index, other event ID: replay.
        let ev2 = parse_room_event(&event(c.clone(), "$2", 10)).unwrap();
        assert_eq!(
            decrypt_room_event(&room(), &ev2, &inbound, &SenderContext::devices(&[]), Some(&rec))
                .unwrap_err(),
            MegolmError::Replay { index: 0 }
        );
        // Event delivered in another room.
        let other = RoomId::parse("!other:hs").unwrap();
        assert!(matches!(
            decrypt_room_event(&other, &ev, &inbound, &SenderContext::devices(&[]), None),
            Err(MegolmError::RoomMismatch { .. })
        ));
        // Sender who does not own the session.
        let mut forged = event(c, "$3", 11);
        forged["sender"] = json!("@mallory:hs");
        let ev3 = parse_room_event(&forged).unwrap();
        assert!(matches!(
            decrypt_room_event(&room(), &ev3, &inbound, &SenderContext::devices(&[]), None),
            Err(MegolmError::SenderMismatch { .. })
        ));
    }

    #[test]
    fn payload_room_mismatch_rejected() {
        // A session legitimately bound to !r carrying a payload that claims another room.
        let a = own();
        let mut out = OutboundSession::new(room(), RotationSettings::default(), 0);
        let inbound = out.own_inbound(&a);
        let msg = out.session.encrypt(
            json!({"type": "m.room.message", "content": {}, "room_id": "!elsewhere:hs"})
                .to_string(),
        );
        let c = json!({"algorithm": MEGOLM_V1, "ciphertext": msg.to_base64(), "session_id": out.session_id()});
        let ev = parse_room_event(&event(c, "$1", 1)).unwrap();
        assert!(matches!(
            decrypt_room_event(&room(), &ev, &inbound, &SenderContext::devices(&[]), None),
            Err(MegolmError::RoomMismatch { .. })
        ));
    }

    #[test]
    fn rotation_by_count_and_age() {
        let a = own();
        let s = RotationSettings { rotation_period_msgs: 2, rotation_period_ms: 1000 };
        let mut out = OutboundSession::new(room(), s.clone(), 0);
        assert!(!out.expired(&s, 10));
        out.encrypt(&a, "m.x", json!({}));
        out.encrypt(&a, "m.x", json!({}));
        assert!(out.expired(&s, 10));
        let fresh = OutboundSession::new(room(), s.clone(), 0);
        assert!(fresh.expired(&s, 1000));
    }

    #[test]
    fn replace_only_with_lower_index() {
        let a = own();
        let mut out = OutboundSession::new(room(), RotationSettings::default(), 0);
        let early = out.own_inbound(&a);
        out.encrypt(&a, "m.x", json!({}));
        let late = out.own_inbound(&a);
        assert_eq!(late.first_known_index, 1);
        assert!(should_replace(&late, &early).unwrap());
        assert!(!should_replace(&early, &late).unwrap());
    }
}
