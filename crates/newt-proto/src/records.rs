//! Persistent state: the records a [`Store`](../../newt_store) keeps.
//!
//! Each record is the serialisable form of one piece of protocol state, kept
//! apart from the live vodozemac types (as vodozemac keeps pickles apart from
//! sessions). New fields get `#[serde(default)]` so old stores keep loading.
//! Records that hold secrets have a redacting `Debug`.
//!
//! Records are JSON, but the vodozemac pickles inside them are not: serde
//! writes their key bytes as JSON arrays of numbers (an inbound Megolm
//! session took 700 bytes, an Olm session 1.4 KB). They are stored as
//! base64 of MessagePack instead, 60-70 % of that; see [`pickle_encoding`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vodozemac::megolm::{GroupSessionPickle, InboundGroupSessionPickle};
use vodozemac::olm::{AccountPickle, SessionPickle};

use crate::ids::{DeviceId, RoomId, UserId};

pub mod pickle_encoding {
    //! The serde form of the vodozemac pickles inside records
    //! (`#[serde(with = "pickle_encoding")]`).
    //!
    //! Written as one string: unpadded base64 of the pickle as MessagePack
    //! with named fields (like JSON, it does not depend on the order of
    //! vodozemac's fields, and fields it adds with defaults read from older
    //! pickles). Read from that string or from the JSON object that stores
    //! wrote before, so that existing stores keep loading and are rewritten
    //! in the new form as their records change. The MessagePack bytes live
    //! only in zeroised buffers ([`SecretBuf`](crate::secret::SecretBuf)).

    use std::fmt;
    use std::marker::PhantomData;

    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use base64::Engine;
    use serde::de::{self, DeserializeOwned, MapAccess, Visitor};
    use serde::{Deserializer, Serialize, Serializer};
    use zeroize::Zeroizing;

    /// Pickles nest a few levels; stored bytes may not ask for more (rmp's
    /// own limit, 1024, is deep for small stacks such as wasm's).
    const MAX_DEPTH: usize = 32;

    /// Writes `pickle` as base64 of MessagePack.
    pub fn serialize<T: Serialize, S: Serializer>(pickle: &T, s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = crate::secret::SecretBuf::with_capacity(1024);
        rmp_serde::encode::write_named(&mut bytes, pickle).map_err(serde::ser::Error::custom)?;
        let bytes = bytes.into_inner();
        let text = Zeroizing::new(STANDARD_NO_PAD.encode(&*bytes));
        s.serialize_str(&text)
    }

    /// A copy of `pickle` (vodozemac's pickles are not `Clone`), made
    /// through MessagePack in a buffer that is wiped afterwards: no copy of
    /// the secret is left behind, as a `serde_json::Value` round trip would.
    pub fn copy<T: Serialize + DeserializeOwned>(
        pickle: &T,
    ) -> Result<T, rmp_serde::decode::Error> {
        let mut bytes = crate::secret::SecretBuf::with_capacity(1024);
        rmp_serde::encode::write_named(&mut bytes, pickle)
            .map_err(|e| rmp_serde::decode::Error::Uncategorized(e.to_string()))?;
        let bytes = bytes.into_inner();
        let mut de = rmp_serde::Deserializer::from_read_ref(&bytes[..]);
        de.set_max_depth(MAX_DEPTH);
        T::deserialize(&mut de)
    }

    /// Reads a pickle in either form.
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        d.deserialize_any(PickleVisitor(PhantomData))
    }

    struct PickleVisitor<T>(PhantomData<T>);

    impl<'de, T: DeserializeOwned> Visitor<'de> for PickleVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a vodozemac pickle (base64 of MessagePack, or a JSON object)")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
            let bytes = Zeroizing::new(
                STANDARD_NO_PAD.decode(text).map_err(|e| E::custom(format!("pickle: {e}")))?,
            );
            let mut de = rmp_serde::Deserializer::from_read_ref(&bytes[..]);
            de.set_max_depth(MAX_DEPTH);
            T::deserialize(&mut de).map_err(|e| E::custom(format!("pickle: {e}")))
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
}

/// Our own device: identity keys, one-time and fallback keys.
#[derive(Serialize, Deserialize)]
pub struct AccountRecord {
    /// Our user.
    pub user_id: UserId,
    /// Our device.
    pub device_id: DeviceId,
    /// vodozemac's account state (secret).
    #[serde(with = "pickle_encoding")]
    pub pickle: AccountPickle,
    /// Whether the device keys were uploaded successfully.
    pub shared: bool,
    /// The server's count of our unclaimed one-time keys, from the last sync.
    pub uploaded_one_time_key_count: u64,
    /// When the current fallback key was created (ms since the epoch).
    #[serde(default)]
    pub fallback_key_created_at: Option<u64>,
    /// When the current fallback key was uploaded (ms since the epoch);
    /// `None` while it waits for upload. The previous fallback key is
    /// forgotten an hour after this.
    #[serde(default)]
    pub fallback_key_published_at: Option<u64>,
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
    #[serde(with = "pickle_encoding")]
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
    #[serde(with = "pickle_encoding")]
    pub pickle: InboundGroupSessionPickle,
    /// Whether the session was uploaded to server-side backup.
    #[serde(default)]
    pub backed_up: bool,
}

impl InboundGroupSessionRecord {
    /// A copy of the record (the pickle is copied without leaving an
    /// unwiped copy of the ratchet behind; see [`pickle_encoding::copy`]).
    pub fn try_clone(&self) -> Result<Self, rmp_serde::decode::Error> {
        Ok(Self {
            room_id: self.room_id.clone(),
            session_id: self.session_id.clone(),
            sender_key: self.sender_key.clone(),
            sender_claimed_ed25519: self.sender_claimed_ed25519.clone(),
            sender_user_id: self.sender_user_id.clone(),
            source: self.source,
            forwarding_chain: self.forwarding_chain.clone(),
            first_known_index: self.first_known_index,
            shared_history: self.shared_history,
            pickle: pickle_encoding::copy(&self.pickle)?,
            backed_up: self.backed_up,
        })
    }
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
    #[serde(with = "pickle_encoding")]
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
/// Kept per (room, session, sender) and shown only for events of its sender.
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

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use serde_json::{json, Value};
    use vodozemac::megolm::{
        ExportedSessionKey, GroupSession, InboundGroupSession, SessionConfig as MegolmConfig,
    };
    use vodozemac::olm::{Account, OlmMessage, SessionConfig as OlmConfig};

    use super::*;

    /// A pickle written through [`pickle_encoding`] as a record field.
    fn encode<T: Serialize>(pickle: &T) -> Value {
        let mut out = Vec::new();
        pickle_encoding::serialize(pickle, &mut serde_json::Serializer::new(&mut out)).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn decode<T: DeserializeOwned>(field: &Value) -> Result<T, serde_json::Error> {
        let text = serde_json::to_vec(field).unwrap();
        pickle_encoding::deserialize(&mut serde_json::Deserializer::from_slice(&text))
    }

    /// vodozemac's own JSON form of a pickle: the oracle for "the same
    /// state" (pickles are not `PartialEq`), and what stores held before.
    fn vodozemac_json<T: Serialize>(pickle: &T) -> Value {
        serde_json::to_value(pickle).unwrap()
    }

    /// Writes each kind of pickle, checks the stored form is a string a
    /// fraction of the old size, and reads back exactly the same state.
    fn check_round_trip<T: Serialize + DeserializeOwned>(name: &str, pickle: T, most: f64) {
        let old = vodozemac_json(&pickle);
        let stored = encode(&pickle);
        let Value::String(text) = &stored else { panic!("{name}: stored as {stored}") };
        let (new_len, old_len) = (text.len() + 2, old.to_string().len());
        assert!(
            (new_len as f64) < most * old_len as f64,
            "{name}: {new_len} bytes stored, {old_len} before"
        );
        let back: T = decode(&stored).unwrap();
        assert_eq!(vodozemac_json(&back), old, "{name}");
        // And the form stores wrote before still reads, to the same state.
        let back: T = decode(&old).unwrap();
        assert_eq!(vodozemac_json(&back), old, "{name} (old form)");
    }

    #[test]
    fn every_pickle_kind_is_stored_compactly_and_read_back_whole() {
        let mut alice = Account::new();
        let mut bob = Account::new();
        bob.generate_one_time_keys(3);
        alice.generate_one_time_keys(2);
        let otk = *bob.one_time_keys().values().next().unwrap();
        let mut outbound = alice
            .create_outbound_session(OlmConfig::version_1(), bob.curve25519_key(), otk)
            .unwrap();
        let OlmMessage::PreKey(first) = outbound.encrypt("one").unwrap() else {
            panic!("expected a pre-key message")
        };
        let mut inbound = bob
            .create_inbound_session(OlmConfig::version_1(), alice.curve25519_key(), &first)
            .unwrap()
            .session;
        // Give the session a receiving chain and a skipped message key.
        let skipped = inbound.encrypt("two").unwrap();
        let _ = skipped;
        let reply = inbound.encrypt("three").unwrap();
        outbound.decrypt(&reply).unwrap();

        let mut group = GroupSession::new(MegolmConfig::version_1());
        let inbound_group =
            InboundGroupSession::new(&group.session_key(), MegolmConfig::version_1());
        group.encrypt("advance the ratchet");

        check_round_trip("account", alice.pickle(), 0.75);
        check_round_trip("olm session", Box::new(outbound.pickle()), 0.75);
        check_round_trip("olm session, active ratchet", Box::new(inbound.pickle()), 0.75);

        check_round_trip("inbound group session", inbound_group.pickle(), 0.75);
        check_round_trip("outbound group session", group.pickle(), 0.75);
    }

    #[test]
    fn an_inbound_record_written_before_the_compact_form_still_loads() {
        let group = GroupSession::new(MegolmConfig::version_1());
        let session = InboundGroupSession::new(&group.session_key(), MegolmConfig::version_1());
        let old = json!({
            "room_id": "!room:example.org",
            "session_id": session.session_id(),
            "sender_key": "sender",
            "sender_claimed_ed25519": "ed",
            "source": "imported",
            "first_known_index": 0,
            "pickle": vodozemac_json(&session.pickle()),
        });
        let record: InboundGroupSessionRecord = serde_json::from_value(old).unwrap();
        let live = InboundGroupSession::from_pickle(record.pickle);
        assert_eq!(live.session_id(), session.session_id());
    }

    #[test]
    fn a_damaged_pickle_is_an_error() {
        let good = encode(
            &InboundGroupSession::new(
                &GroupSession::new(MegolmConfig::version_1()).session_key(),
                MegolmConfig::version_1(),
            )
            .pickle(),
        );
        let text = good.as_str().unwrap();
        for (what, bad) in [
            ("not base64", json!("not base64!")),
            ("cut short", json!(text[..text.len() / 2])),
            ("another type", json!("kQE")),
            ("a number", json!(7)),
        ] {
            assert!(decode::<InboundGroupSessionPickle>(&bad).is_err(), "{what} was accepted");
        }
        // A field nested 100,000 levels deep (serde buffers the Olm sending
        // ratchet, an internally tagged enum, whole): an error, not a stack
        // overflow.
        let mut deep = vec![0x81, 0xaf];
        deep.extend_from_slice(b"sending_ratchet");
        deep.extend(std::iter::repeat_n(0x91, 100_000));
        deep.push(0xc0);
        let deep =
            json!(base64::Engine::encode(&base64::engine::general_purpose::STANDARD_NO_PAD, deep));
        assert!(decode::<Box<SessionPickle>>(&deep).is_err());
    }

    /// Pickles in the stored form, written by newt with vodozemac 0.11.1. If
    /// a vodozemac upgrade changes a pickle's fields, these fail before any
    /// store does. The inbound session is the first of matrix-rust-sdk's
    /// `TEST_EXPORT` (test-vectors/key-export.json), imported.
    const INBOUND_0_11: &str = concat!(
        "hK9pbml0aWFsX3JhdGNoZXSCpWlubmVy3ACAQSjM1My1bA5XzPjM/My5c8ymD8z5EsytzIxwLTc5zMrM",
        "zsyJzNLMmyciDcyPf8zozIEAcszjzKnMsMzXPywuOsyUzOMMzJ3Ml8yrWczOzMvMoT8VzI3MjsyIzMwR",
        "EwRHzLQPNi7M4F3MlGR5zI0BzKHMjcyAfMyiEXtrzLjMncyYzPRIWkJtdFbMuA7MhhN4NMzezJQRzIVr",
        "I8yDzMVIzM88BsyAzOI/zMbMxMyVzPDM9syqc1rM4zIfP2LMpczGp2NvdW50ZXIAq3NpZ25pbmdfa2V5",
        "xCDyx00aCYt+3yizKUsr2KPcii0EvJBC5978qeCJbgOmrbRzaWduaW5nX2tleV92ZXJpZmllZMKmY29u",
        "Zmlngad2ZXJzaW9uolYx",
    );
    /// A receiving Olm session with an active ratchet, one receiving chain
    /// and two messages sent; its session ID was recorded when it was made.
    const OLM_0_11: &str = concat!(
        "hKxzZXNzaW9uX2tleXODrGlkZW50aXR5X2tledwAIMyUzOTM8syIXAHM/QTM0cyJzPzMgFDMjFPMi8y5",
        "zN3MuczhzKbMvcyuzLBxYMyDzJzM4czsRFuoYmFzZV9rZXncACBMD1YEzObMwTUuzK/MoszqzLXM2Mzx",
        "zJnMl3zM/cy1zPAcUsyPzMdTzNDM98zkOy4ROKxvbmVfdGltZV9rZXncACDMuGDM4symzMIuXE9PzLDM",
        "vQzMtUHM9B9hOjPM6B5vzKwyFy7MqMy1BMy7zKUHr3NlbmRpbmdfcmF0Y2hldIWkdHlwZaZhY3RpdmWy",
        "cGFyZW50X3JhdGNoZXRfa2V53AAgKMzyzKRvemLMwcyJzKTM3iRjGg7Mz8zSdBZ8N3hNIVfMqsyUR8yY",
        "zOctzMAGrXJhdGNoZXRfY291bnSBpUtub3duAa5hY3RpdmVfcmF0Y2hldIKocm9vdF9rZXncACBWzN0C",
        "YMykdgkoD8yazL4OWVIHzOdEzMM9Hcy6zOMJaMzAzK7MkEPMvjfMmm6rcmF0Y2hldF9rZXncACBlZwrM",
        "g2bMosydKRDMiszJzJHMmQZqzLDM/TPMsMzPzPDMiMzZzKorzKTM3BMOzIdkzOW1c3ltbWV0cmljX2tl",
        "eV9yYXRjaGV0gqNrZXncACA9zJNVzLfMn2czzJ3M/szsD8zVzMjM7SAiY1PM8szOzKXM5Xp4zOnMycy3",
        "zLxAF0JgpWluZGV4ArByZWNlaXZpbmdfY2hhaW5zgaVpbm5lcpGEq3JhdGNoZXRfa2V53AAgKMzyzKRv",
        "emLMwcyJzKTM3iRjGg7Mz8zSdBZ8N3hNIVfMqsyUR8yYzOctzMAGrGhrZGZfcmF0Y2hldIKja2V53AAg",
        "zNFCzLnMwxTMqsyLcC8iExcEzOY8zIMpNczXTBsJzNvMpcyJfBvM/cyezP3M0BalaW5kZXgBtHNraXBw",
        "ZWRfbWVzc2FnZV9rZXlzgaVpbm5lcpCtcmF0Y2hldF9jb3VudIGlS25vd24ApmNvbmZpZ4GndmVyc2lv",
        "bqJWMQ",
    );
    const OLM_0_11_SESSION_ID: &str = "JWRK3wZoF+Bx89gNEbI17a2bZJrIeDycN3gZ6nLhngk";

    #[test]
    fn pickles_written_with_vodozemac_0_11_still_load() {
        let vectors: Value =
            serde_json::from_str(include_str!("../../../test-vectors/key-export.json")).unwrap();
        let key = &vectors["exports"][0]["expected"]["sessions"][0];
        let exported =
            ExportedSessionKey::from_base64(key["session_key"].as_str().unwrap()).unwrap();
        let imported = InboundGroupSession::import(&exported, MegolmConfig::version_1());
        // The same session, imported now, is written the same way.
        assert_eq!(encode(&imported.pickle()), json!(INBOUND_0_11));
        let pickle: InboundGroupSessionPickle = decode(&json!(INBOUND_0_11)).unwrap();
        let live = InboundGroupSession::from_pickle(pickle);
        assert_eq!(live.session_id(), key["session_id"].as_str().unwrap());
        let again = live.export_at_first_known_index().to_base64();
        assert_eq!(again, key["session_key"].as_str().unwrap().trim_end_matches('='));

        let pickle: Box<SessionPickle> = decode(&json!(OLM_0_11)).unwrap();
        let live = vodozemac::olm::Session::from_pickle(*pickle);
        assert_eq!(live.session_id(), OLM_0_11_SESSION_ID);
        assert_eq!(encode(&Box::new(live.pickle())), json!(OLM_0_11));
    }
}
