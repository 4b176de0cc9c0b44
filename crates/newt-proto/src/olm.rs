//! Olm (`m.olm.v1.curve25519-aes-sha2`): to-device encryption between devices.
//!
//! Decryption applies every receiver check of the spec (plaintext `sender`,
//! `recipient`, `recipient_keys`, `keys`, and `sender_device_keys` when
//! present) before anything is returned. Pre-key messages are matched to an
//! existing session by session ID first, so a retried pre-key message never
//! creates a duplicate session; a one-time key is consumed only when a new
//! session decrypted successfully. The session used for sending is the one
//! that most recently decrypted something.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use vodozemac::olm::{OlmMessage, PreKeyMessage, Session, SessionConfig};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey};
use zeroize::Zeroizing;

use crate::account::{OwnAccount, SIGNED_CURVE25519};
use crate::devices::parse_device_keys;
use crate::ids::{DeviceId, UserId};
use crate::json::{b64_decode, b64_encode, strip_padding, verify_json, JsonError};
use crate::records::{DeviceRecord, LocalTrust, OlmSessionRecord};
use crate::secret::SecretBuf;
use crate::OLM_V1;

/// Event types that carry keys: accepted only when they arrived over Olm.
pub const KEY_CARRYING_TYPES: [&str; 4] =
    ["m.room_key", "m.forwarded_room_key", "m.secret.send", "m.room_key_bundle"];

/// An Olm session with another device, in live form.
pub struct OlmSession {
    /// The other device's Curve25519 key (unpadded base64).
    pub sender_key: String,
    /// The vodozemac session (boxed: it is 3.7 KB and sessions move through
    /// batches of thousands).
    pub session: Box<Session>,
    /// Creation time (ms).
    pub created_at: u64,
    /// Last successful decryption (ms), or creation time.
    pub last_used_at: u64,
    /// The generation it was loaded at (0 for a new session).
    pub generation: u64,
}

impl OlmSession {
    /// From a stored record.
    pub fn from_record(r: OlmSessionRecord) -> Self {
        Self {
            sender_key: r.sender_key,
            session: Box::new(Session::from_pickle(*r.pickle)),
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            generation: r.generation,
        }
    }

    /// A session created now.
    pub fn new(sender_key: String, session: Session, now: u64) -> Self {
        Self {
            sender_key,
            session: Box::new(session),
            created_at: now,
            last_used_at: now,
            generation: 0,
        }
    }

    /// To a record for storing: the next generation after the one it was
    /// loaded at, so the store can refuse a write from stale state.
    pub fn to_record(&self) -> OlmSessionRecord {
        OlmSessionRecord {
            sender_key: self.sender_key.clone(),
            session_id: self.session.session_id(),
            pickle: Box::new(self.session.pickle()),
            created_at: self.created_at,
            last_used_at: self.last_used_at,
            generation: self.generation + 1,
        }
    }
}

/// Index of the session to send with: most recently used, then newest.
pub fn preferred_session(sessions: &[OlmSession]) -> Option<usize> {
    sessions.iter().enumerate().max_by_key(|(_, s)| (s.last_used_at, s.created_at)).map(|(i, _)| i)
}

/// Olm errors. Each says what was wrong with the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OlmError {
    /// The content is not an Olm `m.room.encrypted` content.
    #[error("malformed Olm event: {0}")]
    Malformed(&'static str),
    /// The ciphertext map has no entry for our Curve25519 key.
    #[error("the event was not encrypted for this device")]
    NotForUs,
    /// No session could decrypt a normal message: the channel is wedged.
    #[error("no Olm session with {sender_key} could decrypt the message")]
    Wedged {
        /// The sender's Curve25519 key.
        sender_key: String,
    },
    /// A pre-key message could not start a session.
    #[error("could not create an inbound Olm session: {0}")]
    SessionCreation(String),
    /// The decrypted bytes are not a JSON object.
    #[error("Olm plaintext is not valid JSON")]
    PlaintextNotJson,
    /// A plaintext check failed: the event is discarded.
    #[error("Olm plaintext check failed: {0}")]
    Check(#[from] PlaintextCheckError),
    /// Encryption failed.
    #[error("Olm encryption failed: {0}")]
    Encryption(String),
}

/// The plaintext checks of the spec (§ "m.olm.v1.curve25519-aes-sha2").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlaintextCheckError {
    /// A required plaintext field is missing.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// `sender` differs from the to-device event's sender.
    #[error("plaintext sender {claimed} differs from event sender {actual}")]
    Sender {
        /// In the plaintext.
        claimed: String,
        /// On the event.
        actual: String,
    },
    /// `recipient` is not our user.
    #[error("plaintext recipient is not us")]
    Recipient,
    /// `recipient_keys.ed25519` is not our device's key.
    #[error("plaintext recipient_keys is not our Ed25519 key")]
    RecipientKeys,
    /// `keys.ed25519` differs from the sending device's key.
    #[error("plaintext keys.ed25519 is not the sending device's key")]
    SenderKeys,
    /// `sender_device_keys` is invalid or does not match the sender.
    #[error("invalid sender_device_keys: {0}")]
    SenderDeviceKeys(String),
    /// The Olm sender key belongs to a known device of another user: the
    /// event claims a sender the channel does not authenticate.
    #[error("the sender key belongs to a device of {owner}")]
    KeyOfAnotherUser {
        /// The user whose device owns the key.
        owner: String,
    },
}

/// A to-device event decrypted and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct DecryptedToDevice {
    /// The sender (checked against the plaintext).
    pub sender: UserId,
    /// The sending device's Curve25519 key: the Olm channel's authenticated key.
    pub sender_key: String,
    /// The sending device's Ed25519 key as claimed in the plaintext; checked
    /// against the device when the device is known.
    pub sender_ed25519: String,
    /// The sending device, when known (from `/keys/query` or `sender_device_keys`).
    pub sender_device: Option<DeviceRecord>,
    /// The inner event type.
    pub event_type: String,
    /// The inner content.
    pub content: Value,
}

/// The result of decrypting one Olm event.
#[derive(Debug)]
pub struct OlmDecryption {
    /// The checked event.
    pub event: DecryptedToDevice,
    /// Index into the caller's session list of the session that decrypted
    /// (a new inbound session is appended): persist that one.
    pub session_index: usize,
    /// True when a new inbound session consumed a one-time key: persist the account.
    pub account_changed: bool,
}

/// The sender key and our ciphertext of an Olm `m.room.encrypted` content.
pub fn parse_olm_content(
    content: &Value,
    our_curve25519: &str,
) -> Result<(String, OlmMessage), OlmError> {
    if content.get("algorithm").and_then(Value::as_str) != Some(OLM_V1) {
        return Err(OlmError::Malformed("algorithm"));
    }
    let sender_key = content
        .get("sender_key")
        .and_then(Value::as_str)
        .ok_or(OlmError::Malformed("sender_key"))?;
    let sender_key = Curve25519PublicKey::from_base64(strip_padding(sender_key))
        .map_err(|_| OlmError::Malformed("sender_key"))?
        .to_base64();
    let ours =
        content.get("ciphertext").and_then(|c| c.get(our_curve25519)).ok_or(OlmError::NotForUs)?;
    let msg_type = ours.get("type").and_then(Value::as_u64).ok_or(OlmError::Malformed("type"))?;
    let body = ours.get("body").and_then(Value::as_str).ok_or(OlmError::Malformed("body"))?;
    let bytes = b64_decode(body).map_err(|_| OlmError::Malformed("body base64"))?;
    let message = OlmMessage::from_parts(msg_type as usize, &bytes)
        .map_err(|_| OlmError::Malformed("olm message"))?;
    Ok((sender_key, message))
}

/// Decrypts an Olm to-device event from `sender`.
///
/// `sessions` are the live sessions with the event's sender key (the caller
/// keeps them across a batch so consecutive messages see each other's
/// ratchet state); a new inbound session is appended. `sender_devices` are
/// the stored devices of `sender` (deleted ones included; see
/// [`check_plaintext`]). Nothing is returned unless every
/// plaintext check passed; on a failed check the session state has still
/// advanced, which is harmless (the message is consumed either way).
pub fn decrypt(
    own: &mut OwnAccount,
    sender: &UserId,
    content: &Value,
    sessions: &mut Vec<OlmSession>,
    sender_devices: &[DeviceRecord],
    now: u64,
) -> Result<OlmDecryption, OlmError> {
    let our_curve = own.curve25519_key().to_base64();
    let (sender_key, message) = parse_olm_content(content, &our_curve)?;
    if sessions.iter().any(|s| s.sender_key != sender_key) {
        return Err(OlmError::Malformed("sessions of another sender key"));
    }
    let (plaintext, session_index, account_changed) =
        decrypt_message(own, &sender_key, &message, sessions, now)?;
    // The plaintext of a room key or a secret: wiped once parsed.
    let plaintext = Zeroizing::new(plaintext);
    let event = check_plaintext(own, sender, &sender_key, &plaintext, sender_devices)?;
    Ok(OlmDecryption { event, session_index, account_changed })
}

fn decrypt_message(
    own: &mut OwnAccount,
    sender_key: &str,
    message: &OlmMessage,
    sessions: &mut Vec<OlmSession>,
    now: u64,
) -> Result<(Vec<u8>, usize, bool), OlmError> {
    match message {
        OlmMessage::PreKey(pre_key) => {
            let id = pre_key.session_id();
            if let Some(i) = sessions.iter().position(|s| s.session.session_id() == id) {
                // A retried pre-key message for a session we have: never
                // create a duplicate; if it fails, the session is wedged.
                return match sessions[i].session.decrypt(message) {
                    Ok(p) => {
                        sessions[i].last_used_at = now;
                        Ok((p, i, false))
                    }
                    Err(_) => Err(OlmError::Wedged { sender_key: sender_key.to_owned() }),
                };
            }
            let (session, plaintext) = create_inbound(own, sender_key, pre_key)?;
            sessions.push(OlmSession::new(sender_key.to_owned(), session, now));
            Ok((plaintext, sessions.len() - 1, true))
        }
        OlmMessage::Normal(_) => {
            // Most recently used first: the likeliest to decrypt.
            let mut order: Vec<usize> = (0..sessions.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(sessions[i].last_used_at));
            for i in order {
                if let Ok(p) = sessions[i].session.decrypt(message) {
                    sessions[i].last_used_at = now;
                    return Ok((p, i, false));
                }
            }
            Err(OlmError::Wedged { sender_key: sender_key.to_owned() })
        }
    }
}

fn create_inbound(
    own: &mut OwnAccount,
    sender_key: &str,
    pre_key: &PreKeyMessage,
) -> Result<(Session, Vec<u8>), OlmError> {
    let their = Curve25519PublicKey::from_base64(sender_key)
        .map_err(|_| OlmError::Malformed("sender_key"))?;
    let result = own
        .inner_mut()
        .create_inbound_session(SessionConfig::version_1(), their, pre_key)
        .map_err(|e| OlmError::SessionCreation(e.to_string()))?;
    Ok((result.session, result.plaintext))
}

fn field<'a>(
    v: &'a Value,
    path: &[&str],
    name: &'static str,
) -> Result<&'a str, PlaintextCheckError> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p).ok_or(PlaintextCheckError::MissingField(name))?;
    }
    cur.as_str().ok_or(PlaintextCheckError::MissingField(name))
}

/// Applies the receiver checks to a decrypted Olm plaintext.
///
/// `sender_devices` are the stored devices of `sender`, deleted ones
/// included. The sending device is the stored record of `sender_key` (its
/// flags kept); only when none is stored does the self-signed
/// `sender_device_keys` name it, and never with the ID of a known device
/// that has other keys. When no stored device of the sender has the key,
/// the caller also runs [`check_key_owner`].
pub fn check_plaintext(
    own: &OwnAccount,
    sender: &UserId,
    sender_key: &str,
    plaintext: &[u8],
    sender_devices: &[DeviceRecord],
) -> Result<DecryptedToDevice, OlmError> {
    let v: Value = serde_json::from_slice(plaintext).map_err(|_| OlmError::PlaintextNotJson)?;
    if !v.is_object() {
        return Err(OlmError::PlaintextNotJson);
    }
    let claimed_sender = field(&v, &["sender"], "sender")?;
    if claimed_sender != sender.as_str() {
        return Err(PlaintextCheckError::Sender {
            claimed: claimed_sender.into(),
            actual: sender.to_string(),
        }
        .into());
    }
    if field(&v, &["recipient"], "recipient")? != own.user_id().as_str() {
        return Err(PlaintextCheckError::Recipient.into());
    }
    if strip_padding(field(&v, &["recipient_keys", "ed25519"], "recipient_keys")?)
        != own.ed25519_key().to_base64()
    {
        return Err(PlaintextCheckError::RecipientKeys.into());
    }
    let claimed_ed = strip_padding(field(&v, &["keys", "ed25519"], "keys")?).to_owned();
    let event_type = field(&v, &["type"], "type")?.to_owned();
    let content = v
        .get("content")
        .filter(|c| c.is_object())
        .cloned()
        .ok_or(PlaintextCheckError::MissingField("content"))?;

    // The Olm channel authenticates the Curve25519 key, so the stored record
    // of that key decides who sent this, flags included: a deleted or
    // blacklisted device stays one, and where two records share the key
    // (only a copied key does that) the most restricted one counts.
    let mut sender_device = sender_devices
        .iter()
        .filter(|d| d.curve25519 == sender_key && &d.user_id == sender)
        .max_by_key(|d| (d.deleted, d.local_trust == LocalTrust::Blacklisted))
        .cloned();
    if let Some(d) = &sender_device {
        if d.ed25519 != claimed_ed {
            return Err(PlaintextCheckError::SenderKeys.into());
        }
    }
    if let Some(sdk) = v.get("sender_device_keys").filter(|x| !x.is_null()) {
        let device = check_sender_device_keys(sender, sender_key, &claimed_ed, sdk)?;
        // A device we have not fetched yet vouches for itself. It is named
        // only under an ID no known device has with other keys: an impostor
        // (or a device ID reused with new keys, which `/keys/query` refuses
        // too) is left unnamed, so nothing looked up by its ID applies.
        let taken = sender_devices.iter().any(|d| {
            d.user_id == device.user_id
                && d.device_id == device.device_id
                && (d.curve25519 != device.curve25519 || d.ed25519 != device.ed25519)
        });
        if sender_device.is_none() && !taken {
            sender_device = Some(device);
        }
    }
    Ok(DecryptedToDevice {
        sender: sender.clone(),
        sender_key: sender_key.to_owned(),
        sender_ed25519: claimed_ed,
        sender_device,
        event_type,
        content,
    })
}

/// The check of an event whose sender key none of the sender's stored
/// devices has: refused when `holders` (stored devices of any user with that
/// key) include another user's device with the very keys the plaintext
/// claims (`keys.ed25519` too). A device record under another user with the
/// same Curve25519 key but another Ed25519 key proves nothing (anyone can
/// copy a Curve25519 key into keys they sign) and does not count.
pub fn check_key_owner(
    event: &DecryptedToDevice,
    holders: &[DeviceRecord],
) -> Result<(), PlaintextCheckError> {
    let owner = holders.iter().find(|d| {
        d.user_id != event.sender
            && d.curve25519 == event.sender_key
            && d.ed25519 == event.sender_ed25519
    });
    match owner {
        Some(d) => Err(PlaintextCheckError::KeyOfAnotherUser { owner: d.user_id.to_string() }),
        None => Ok(()),
    }
}

fn check_sender_device_keys(
    sender: &UserId,
    sender_key: &str,
    claimed_ed: &str,
    sdk: &Value,
) -> Result<DeviceRecord, PlaintextCheckError> {
    let bad = |s: &str| PlaintextCheckError::SenderDeviceKeys(s.to_owned());
    let device_id = sdk.get("device_id").and_then(Value::as_str).ok_or_else(|| bad("device_id"))?;
    if sdk.get("user_id").and_then(Value::as_str) != Some(sender.as_str()) {
        return Err(bad("user_id is not the sender"));
    }
    let device = parse_device_keys(sender, device_id, sdk).map_err(|e| bad(&e.to_string()))?;
    if device.curve25519 != sender_key {
        return Err(bad("curve25519 key is not the sender key"));
    }
    if device.ed25519 != claimed_ed {
        return Err(bad("ed25519 key differs from keys.ed25519"));
    }
    Ok(device)
}

/// Encrypts an event for `recipient` with `session`, producing the
/// `m.room.encrypted` to-device content. The session advances: persist it.
pub fn encrypt(
    own: &OwnAccount,
    session: &mut OlmSession,
    recipient: &DeviceRecord,
    event_type: &str,
    content: Value,
) -> Result<Value, OlmError> {
    OlmPlaintext::new(own, event_type, &content)?.encrypt(session, recipient)
}

/// An Olm plaintext (see [`encrypt`]) with the parts that do not depend on
/// the recipient serialised once: sharing a room key encrypts the same
/// content for thousands of devices. Only `recipient` and `recipient_keys`
/// are written per device.
pub struct OlmPlaintext {
    /// `{"type":…,"content":…,"sender":…,"keys":{…},"sender_device_keys":{…}`
    /// (no closing brace). Secret: the content of `m.room_key` is the key.
    head: Zeroizing<Vec<u8>>,
    sender_key: String,
}

impl OlmPlaintext {
    /// The plaintext of an `event_type` event with `content`, from `own`.
    pub fn new(own: &OwnAccount, event_type: &str, content: &Value) -> Result<Self, OlmError> {
        let json = |e: serde_json::Error| OlmError::Encryption(e.to_string());
        let mut head = SecretBuf::with_capacity(1024);
        head.push(b"{\"type\":");
        serde_json::to_writer(&mut head, event_type).map_err(json)?;
        head.push(b",\"content\":");
        serde_json::to_writer(&mut head, content).map_err(json)?;
        head.push(b",\"sender\":");
        serde_json::to_writer(&mut head, own.user_id()).map_err(json)?;
        head.push(b",\"keys\":{\"ed25519\":");
        serde_json::to_writer(&mut head, &own.ed25519_key().to_base64()).map_err(json)?;
        head.push(b"},\"sender_device_keys\":");
        serde_json::to_writer(&mut head, &own.device_keys()).map_err(json)?;
        Ok(Self { head: head.into_inner(), sender_key: own.curve25519_key().to_base64() })
    }

    /// The bytes encrypted for `recipient`.
    fn bytes_for(&self, recipient: &DeviceRecord) -> Result<Zeroizing<Vec<u8>>, OlmError> {
        let json = |e: serde_json::Error| OlmError::Encryption(e.to_string());
        let mut bytes = SecretBuf::with_capacity(self.head.len() + 160);
        bytes.push(&self.head);
        bytes.push(b",\"recipient\":");
        serde_json::to_writer(&mut bytes, &recipient.user_id).map_err(json)?;
        bytes.push(b",\"recipient_keys\":{\"ed25519\":");
        serde_json::to_writer(&mut bytes, &recipient.ed25519).map_err(json)?;
        bytes.push(b"}}");
        Ok(bytes.into_inner())
    }

    /// Encrypts for `recipient` with `session`: the `m.room.encrypted`
    /// content.
    pub fn encrypt(
        &self,
        session: &mut OlmSession,
        recipient: &DeviceRecord,
    ) -> Result<Value, OlmError> {
        let bytes = self.bytes_for(recipient)?;
        let message =
            session.session.encrypt(&*bytes).map_err(|e| OlmError::Encryption(e.to_string()))?;
        let (msg_type, body) = message.to_parts();
        let mut entry = serde_json::Map::new();
        entry.insert("type".to_owned(), Value::from(msg_type));
        entry.insert("body".to_owned(), Value::String(b64_encode(body)));
        let mut ciphertext = serde_json::Map::new();
        ciphertext.insert(recipient.curve25519.clone(), Value::Object(entry));
        let mut out = serde_json::Map::new();
        out.insert("algorithm".to_owned(), Value::from(OLM_V1));
        out.insert("sender_key".to_owned(), Value::String(self.sender_key.clone()));
        out.insert("ciphertext".to_owned(), Value::Object(ciphertext));
        Ok(Value::Object(out))
    }
}

/// The `/keys/claim` body for devices without a session.
pub fn keys_claim_body(devices: &[(UserId, DeviceId)]) -> Value {
    let mut users = serde_json::Map::new();
    for (u, d) in devices {
        if !users.contains_key(u.as_str()) {
            users.insert(u.to_string(), Value::Object(serde_json::Map::new()));
        }
        if let Some(Value::Object(devices)) = users.get_mut(u.as_str()) {
            devices.insert(d.to_string(), Value::from(SIGNED_CURVE25519));
        }
    }
    let mut body = serde_json::Map::new();
    body.insert("one_time_keys".to_owned(), Value::Object(users));
    Value::Object(body)
}

/// Why no session could be made with a device after a claim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimError {
    /// The server returned no key for the device.
    #[error("no one-time key returned")]
    NoKey,
    /// The one-time key's signature does not verify with the device's key.
    #[error("one-time key signature: {0}")]
    Signature(JsonError),
    /// The key is malformed.
    #[error("malformed one-time key")]
    Malformed,
    /// The device is not known (query it first).
    #[error("unknown device")]
    UnknownDevice,
    /// vodozemac refused (e.g. a non-contributory key).
    #[error("session creation failed: {0}")]
    Session(String),
}

/// What a `/keys/claim` response produced.
#[derive(Default)]
pub struct ClaimOutcome {
    /// New sessions (persist them).
    pub sessions: Vec<(UserId, DeviceId, OlmSessionRecord)>,
    /// Devices for which no session could be made, and why.
    pub failures: Vec<(UserId, DeviceId, ClaimError)>,
}

impl std::fmt::Debug for ClaimOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimOutcome")
            .field("sessions", &self.sessions.len())
            .field("failures", &self.failures)
            .finish()
    }
}

/// Creates outbound sessions from a `/keys/claim` response for the devices
/// that were `requested`. Every one-time key's signature is verified with the
/// device's Ed25519 key before use.
pub fn handle_keys_claim(
    own: &OwnAccount,
    requested: &[(UserId, DeviceId)],
    devices: &BTreeMap<(UserId, DeviceId), DeviceRecord>,
    response: &Value,
    now: u64,
) -> ClaimOutcome {
    let mut out = ClaimOutcome::default();
    let keys = response.get("one_time_keys");
    let mut done = BTreeSet::new();
    // Cheap lookups first, in request order; then the sessions (a signature
    // check and three X25519 agreements each) on every core.
    let mut jobs = Vec::new();
    for (user, device_id) in requested {
        if !done.insert((user, device_id)) {
            continue;
        }
        let Some(device) = devices.get(&(user.clone(), device_id.clone())) else {
            out.failures.push((user.clone(), device_id.clone(), ClaimError::UnknownDevice));
            continue;
        };
        let key_obj = keys
            .and_then(|k| k.get(user.as_str()))
            .and_then(|u| u.get(device_id.as_str()))
            .and_then(Value::as_object)
            .and_then(|m| m.iter().find(|(id, _)| id.starts_with("signed_curve25519:")));
        match key_obj {
            Some((_, key_obj)) => jobs.push((user, device_id, device, key_obj)),
            None => out.failures.push((user.clone(), device_id.clone(), ClaimError::NoKey)),
        }
    }
    let made = crate::parallel::map(&jobs, 8, |(_, _, device, key_obj)| {
        session_from_key(own, device, key_obj, now)
    });
    for ((user, device_id, _, _), result) in jobs.into_iter().zip(made) {
        match result {
            Ok(record) => out.sessions.push((user.clone(), device_id.clone(), record)),
            Err(e) => out.failures.push((user.clone(), device_id.clone(), e)),
        }
    }
    out
}

fn session_from_key(
    own: &OwnAccount,
    device: &DeviceRecord,
    key_obj: &Value,
    now: u64,
) -> Result<OlmSessionRecord, ClaimError> {
    let ed = Ed25519PublicKey::from_base64(&device.ed25519).map_err(|_| ClaimError::Malformed)?;
    verify_json(key_obj, &device.user_id, &format!("ed25519:{}", device.device_id), &ed)
        .map_err(ClaimError::Signature)?;
    let otk = key_obj.get("key").and_then(Value::as_str).ok_or(ClaimError::Malformed)?;
    let otk =
        Curve25519PublicKey::from_base64(strip_padding(otk)).map_err(|_| ClaimError::Malformed)?;
    let identity =
        Curve25519PublicKey::from_base64(&device.curve25519).map_err(|_| ClaimError::Malformed)?;
    let session = own
        .inner()
        .create_outbound_session(SessionConfig::version_1(), identity, otk)
        .map_err(|e| ClaimError::Session(e.to_string()))?;
    Ok(OlmSession::new(device.curve25519.clone(), session, now).to_record())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// The plaintext written piecewise is exactly the JSON object the
    /// protocol defines (compared as parsed JSON: field order is free).
    #[test]
    fn plaintext_pieces_make_the_whole_object() {
        let me = dev("@me:hs", "ME");
        let them = dev("@them:hs", "THEM");
        let content = json!({ "quote\"d": "line\nbreak", "n": [1, 2.5, null], "u": "\u{1F600}" });
        let plaintext = OlmPlaintext::new(&me.acc, "m.room_key", &content).unwrap();
        let parsed: Value =
            serde_json::from_slice(&plaintext.bytes_for(&them.rec).unwrap()).unwrap();
        let expected = json!({
            "type": "m.room_key",
            "content": content,
            "sender": "@me:hs",
            "recipient": "@them:hs",
            "recipient_keys": { "ed25519": them.rec.ed25519 },
            "keys": { "ed25519": me.acc.ed25519_key().to_base64() },
            "sender_device_keys": me.acc.device_keys(),
        });
        assert_eq!(parsed, expected);
    }
    use crate::devices::parse_device_keys;
    use crate::records::LocalTrust;

    pub(crate) struct Dev {
        pub acc: OwnAccount,
        pub rec: DeviceRecord,
    }

    pub(crate) fn dev(user: &str, device: &str) -> Dev {
        let mut acc =
            OwnAccount::new(UserId::parse(user).unwrap(), DeviceId::parse(device).unwrap());
        acc.prepare_initial_upload(0);
        let rec = parse_device_keys(acc.user_id(), device, &acc.device_keys()).unwrap();
        Dev { acc, rec }
    }

    pub(crate) fn claim(from: &Dev, to: &mut Dev) -> OlmSession {
        let body = to.acc.keys_upload_body().unwrap();
        to.acc.mark_keys_uploaded(Some(50), 0);
        let (id, key) = body["one_time_keys"].as_object().unwrap().iter().next().unwrap();
        let resp = json!({"one_time_keys": {to.rec.user_id.as_str(): {to.rec.device_id.as_str(): {id: key}}}});
        let devices =
            BTreeMap::from([((to.rec.user_id.clone(), to.rec.device_id.clone()), to.rec.clone())]);
        let mut out = handle_keys_claim(
            &from.acc,
            &[(to.rec.user_id.clone(), to.rec.device_id.clone())],
            &devices,
            &resp,
            1,
        );
        assert!(out.failures.is_empty(), "{:?}", out.failures);
        OlmSession::from_record(out.sessions.remove(0).2)
    }

    #[test]
    fn round_trip_and_no_duplicate_session() {
        let alice = dev("@alice:hs", "A");
        let mut bob = dev("@bob:hs", "B");
        let mut s = claim(&alice, &mut bob);
        let c1 = encrypt(&alice.acc, &mut s, &bob.rec, "m.test", json!({"n": 1})).unwrap();
        let mut sessions = Vec::new();
        let d =
            decrypt(&mut bob.acc, alice.acc.user_id(), &c1, &mut sessions, &[alice.rec.clone()], 5)
                .unwrap();
        assert_eq!(d.event.content, json!({"n": 1}));
        assert_eq!(d.event.sender_device.as_ref().map(|d| d.device_id.as_str()), Some("A"));
        assert!(d.account_changed);
        // Another pre-key message of the same session: decrypts with it, no new session.
        let c2 = encrypt(&alice.acc, &mut s, &bob.rec, "m.test", json!({"n": 2})).unwrap();
        let d2 =
            decrypt(&mut bob.acc, alice.acc.user_id(), &c2, &mut sessions, &[alice.rec.clone()], 6)
                .unwrap();
        assert!(!d2.account_changed);
        assert_eq!(sessions.len(), 1);
        // Replaying the first message to a fresh copy of the account fails: the one-time key is gone.
        let mut again = Vec::new();
        assert!(decrypt(
            &mut bob.acc,
            alice.acc.user_id(),
            &c1,
            &mut again,
            &[alice.rec.clone()],
            7
        )
        .is_err());
        assert_eq!(d2.event.content, json!({"n": 2}));
    }

    fn forge(alice: &Dev, s: &mut OlmSession, bob: &Dev, edit: impl FnOnce(&mut Value)) -> Value {
        let mut pt = json!({
            "type": "m.room_key", "content": {},
            "sender": alice.acc.user_id(), "recipient": bob.acc.user_id(),
            "recipient_keys": {"ed25519": bob.rec.ed25519}, "keys": {"ed25519": alice.rec.ed25519},
        });
        edit(&mut pt);
        let m = s.session.encrypt(serde_json::to_vec(&pt).unwrap()).unwrap();
        let (t, b) = m.to_parts();
        json!({"algorithm": OLM_V1, "sender_key": alice.rec.curve25519,
               "ciphertext": {bob.rec.curve25519.clone(): {"type": t, "body": b64_encode(b)}}})
    }

    #[test]
    fn plaintext_checks_reject_forgeries() {
        let alice = dev("@alice:hs", "A");
        let mallory = dev("@mallory:hs", "M");
        let cases: Vec<(Box<dyn Fn(&mut Value)>, fn(&OlmError) -> bool)> = vec![
            (Box::new(|v| v["sender"] = json!("@mallory:hs")), |e| {
                matches!(e, OlmError::Check(PlaintextCheckError::Sender { .. }))
            }),
            (Box::new(|v| v["recipient"] = json!("@carol:hs")), |e| {
                matches!(e, OlmError::Check(PlaintextCheckError::Recipient))
            }),
            (Box::new(|v| v["recipient_keys"]["ed25519"] = json!("AAAA")), |e| {
                matches!(e, OlmError::Check(PlaintextCheckError::RecipientKeys))
            }),
            (Box::new(move |v| v["keys"]["ed25519"] = json!(mallory.rec.ed25519.clone())), |e| {
                matches!(e, OlmError::Check(PlaintextCheckError::SenderKeys))
            }),
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("recipient_keys");
                }),
                |e| matches!(e, OlmError::Check(PlaintextCheckError::MissingField(_))),
            ),
        ];
        for (edit, check) in cases {
            let mut bob = dev("@bob:hs", "B");
            let mut s = claim(&alice, &mut bob);
            let c = forge(&alice, &mut s, &bob, |v| edit(v));
            let err = decrypt(
                &mut bob.acc,
                alice.acc.user_id(),
                &c,
                &mut Vec::new(),
                &[alice.rec.clone()],
                1,
            )
            .unwrap_err();
            assert!(check(&err), "unexpected {err:?}");
        }
    }

    #[test]
    fn sender_device_keys_must_match() {
        let alice = dev("@alice:hs", "A");
        let other = dev("@alice:hs", "A2");
        let mut bob = dev("@bob:hs", "B");
        let mut s = claim(&alice, &mut bob);
        // Unknown sender device, sender_device_keys of another device: rejected.
        let c = forge(&alice, &mut s, &bob, |v| v["sender_device_keys"] = other.acc.device_keys());
        let err =
            decrypt(&mut bob.acc, alice.acc.user_id(), &c, &mut Vec::new(), &[], 1).unwrap_err();
        assert!(
            matches!(err, OlmError::Check(PlaintextCheckError::SenderDeviceKeys(_))),
            "{err:?}"
        );
    }

    /// Decrypts at `bob` a message of `from` whose plaintext (made by
    /// [`forge`], as if from `from`) went through `edit`, given `stored`.
    fn receive(
        from: &Dev,
        stored: &[DeviceRecord],
        edit: impl FnOnce(&mut Value),
    ) -> Result<DecryptedToDevice, OlmError> {
        let mut bob = dev("@bob:hs", "B");
        let mut s = claim(from, &mut bob);
        let c = forge(from, &mut s, &bob, edit);
        decrypt(&mut bob.acc, from.acc.user_id(), &c, &mut Vec::new(), stored, 1).map(|d| d.event)
    }

    /// A device we do not know, vouching for itself under the ID of a device
    /// we know with other keys (deleted or not), is an impostor: its event is
    /// not named after that device.
    #[test]
    fn attack_sender_device_keys_taking_a_known_device_id_are_not_named() {
        let real = dev("@alice:hs", "A");
        let impostor = dev("@alice:hs", "A");
        for deleted in [false, true] {
            let mut stored = real.rec.clone();
            stored.deleted = deleted;
            let sdk = impostor.acc.device_keys();
            let event = receive(&impostor, &[stored], |v| v["sender_device_keys"] = sdk).unwrap();
            assert_eq!(event.sender_device, None);
        }
        // An ID nobody has: the claim names the device.
        let sdk = impostor.acc.device_keys();
        let event = receive(&impostor, &[], |v| v["sender_device_keys"] = sdk).unwrap();
        assert_eq!(event.sender_device.map(|d| d.device_id.to_string()), Some("A".into()));
    }

    /// The stored record of the sender key wins over `sender_device_keys`,
    /// with its flags: a deleted, blacklisted device stays one, also when a
    /// live record was given a copy of its key.
    #[test]
    fn attack_stored_record_with_its_flags_wins_over_sender_device_keys() {
        let alice = dev("@alice:hs", "A");
        let mut stored = alice.rec.clone();
        stored.deleted = true;
        stored.local_trust = LocalTrust::Blacklisted;
        let mut copy = alice.rec.clone();
        copy.device_id = DeviceId::parse("COPY").unwrap();
        for devices in [vec![stored.clone()], vec![copy.clone(), stored.clone()]] {
            let sdk = alice.acc.device_keys();
            let event = receive(&alice, &devices, |v| v["sender_device_keys"] = sdk).unwrap();
            let device = event.sender_device.unwrap();
            assert!(device.deleted);
            assert_eq!(device.local_trust, LocalTrust::Blacklisted);
        }
    }

    /// A sender key that a known device of another user holds, with the
    /// keys the plaintext claims, cannot speak for the event's sender; a
    /// record that only copied the Curve25519 key proves nothing.
    #[test]
    fn attack_sender_key_of_another_users_device_is_rejected() {
        let mallory = dev("@mallory:hs", "M");
        let mut bob = dev("@bob:hs", "B");
        let mut s = claim(&mallory, &mut bob);
        // Mallory's channel, under Alice's name (the server relabels the event).
        let c = forge(&mallory, &mut s, &bob, |v| v["sender"] = json!("@alice:hs"));
        let alice = UserId::parse("@alice:hs").unwrap();
        let event = decrypt(&mut bob.acc, &alice, &c, &mut Vec::new(), &[], 1).unwrap().event;
        assert_eq!(event.sender_device, None);
        let err = check_key_owner(&event, &[mallory.rec.clone()]).unwrap_err();
        assert_eq!(err, PlaintextCheckError::KeyOfAnotherUser { owner: "@mallory:hs".into() });
        // Carol published Mallory's Curve25519 key under her own Ed25519 key.
        let mut copied = dev("@carol:hs", "C").rec;
        copied.curve25519 = mallory.rec.curve25519.clone();
        assert_eq!(check_key_owner(&event, &[copied]), Ok(()));
    }

    #[test]
    fn bad_one_time_key_signature_rejected() {
        let alice = dev("@alice:hs", "A");
        let bob = dev("@bob:hs", "B");
        let body = bob.acc.keys_upload_body().unwrap();
        let (id, key) = body["one_time_keys"].as_object().unwrap().iter().next().unwrap();
        let mut key = key.clone();
        key["key"] = json!(alice.acc.curve25519_key().to_base64()); // swapped key, old signature
        let resp = json!({"one_time_keys": {"@bob:hs": {"B": {id: key}}}});
        let devices = BTreeMap::from([(
            (bob.rec.user_id.clone(), bob.rec.device_id.clone()),
            bob.rec.clone(),
        )]);
        let out = handle_keys_claim(
            &alice.acc,
            &[(bob.rec.user_id.clone(), bob.rec.device_id.clone())],
            &devices,
            &resp,
            1,
        );
        assert!(out.sessions.is_empty());
        assert!(matches!(out.failures[0].2, ClaimError::Signature(JsonError::BadSignature { .. })));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut bob = dev("@bob:hs", "B");
        let alice = UserId::parse("@alice:hs").unwrap();
        let our = bob.rec.curve25519.clone();
        for c in [
            json!(null),
            json!({"algorithm": OLM_V1}),
            json!({"algorithm": OLM_V1, "sender_key": "x", "ciphertext": {}}),
            json!({"algorithm": OLM_V1, "sender_key": our, "ciphertext": {our.clone(): {"type": 0, "body": "!!"}}}),
            json!({"algorithm": OLM_V1, "sender_key": our, "ciphertext": {our.clone(): {"type": 1, "body": "AwAA"}}}),
        ] {
            assert!(decrypt(&mut bob.acc, &alice, &c, &mut Vec::new(), &[], 0).is_err());
        }
    }
}
