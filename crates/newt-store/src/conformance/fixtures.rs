//! Real records for backends' own tests (beside [`run_all`](super::run_all)):
//! the pickles come from live vodozemac accounts and sessions, the IDs are
//! parsed. One set, so that every backend's tests (SQLite, IndexedDB) build
//! the same records.

use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, LocalTrust, OlmSessionRecord,
    OutboundGroupSessionRecord, SessionSource,
};
use newt_proto::vodozemac::megolm::{
    GroupSession, InboundGroupSession, SessionConfig as MegolmConfig,
};
use newt_proto::vodozemac::olm::{Account, SessionConfig as OlmConfig};
use serde::Serialize;

/// A user ID (panics on an invalid one: test input).
pub fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

/// A device ID.
pub fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).unwrap()
}

/// A room ID.
pub fn room(id: &str) -> RoomId {
    RoomId::parse(id).unwrap()
}

/// A record as JSON, to compare records that are not `PartialEq`.
pub fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap()
}

/// An account record of a fresh vodozemac account with five one-time keys
/// and a fallback key, at `generation`.
pub fn account(user_id: &str, device_id: &str, generation: u64) -> AccountRecord {
    let mut live = Account::new();
    live.generate_one_time_keys(5);
    live.generate_fallback_key();
    AccountRecord {
        user_id: user(user_id),
        device_id: device(device_id),
        pickle: live.pickle(),
        shared: true,
        uploaded_one_time_key_count: 0,
        fallback_key_created_at: Some(1_700_000_000_000),
        fallback_key_published_at: None,
        generation,
        upload_lease_since: None,
    }
}

/// A real Olm session with `peer` (whose Curve25519 key is the sender key).
pub fn olm_session(peer: &mut Account) -> OlmSessionRecord {
    peer.generate_one_time_keys(1);
    let otk = *peer.one_time_keys().values().next().unwrap();
    peer.mark_keys_as_published();
    let session = Account::new()
        .create_outbound_session(OlmConfig::version_1(), peer.curve25519_key(), otk)
        .unwrap();
    OlmSessionRecord {
        sender_key: peer.curve25519_key().to_base64(),
        session_id: session.session_id(),
        pickle: Box::new(session.pickle()),
        created_at: 1_700_000_000_000,
        last_used_at: 1_700_000_000_000,
        generation: 0,
    }
}

/// A real inbound Megolm session of `room_id`, as if from `sender_key`.
pub fn inbound(room_id: &RoomId, sender_key: &str) -> InboundGroupSessionRecord {
    let outbound = GroupSession::new(MegolmConfig::version_1());
    let session = InboundGroupSession::new(&outbound.session_key(), MegolmConfig::version_1());
    InboundGroupSessionRecord {
        room_id: room_id.clone(),
        session_id: session.session_id(),
        sender_key: sender_key.into(),
        sender_claimed_ed25519: "claimed-ed25519-key".into(),
        sender_user_id: None,
        source: SessionSource::RoomKey,
        forwarding_chain: Vec::new(),
        first_known_index: 0,
        shared_history: false,
        pickle: session.pickle(),
        backed_up: false,
    }
}

/// A real outbound Megolm session of `room_id`, at generation 0.
pub fn outbound(room_id: &RoomId) -> OutboundGroupSessionRecord {
    let session = GroupSession::new(MegolmConfig::version_1());
    OutboundGroupSessionRecord {
        room_id: room_id.clone(),
        session_id: session.session_id(),
        pickle: session.pickle(),
        created_at: 1_700_000_000_000,
        message_count: 0,
        rotation_period_msgs: 100,
        rotation_period_ms: 604_800_000,
        shared_with: Default::default(),
        withheld_to: Default::default(),
        generation: 0,
    }
}

/// A device record of `user_id`'s `device_id` with `peer`'s identity keys.
pub fn device_record(user_id: &str, device_id: &str, peer: &Account) -> DeviceRecord {
    DeviceRecord {
        user_id: user(user_id),
        device_id: device(device_id),
        curve25519: peer.curve25519_key().to_base64(),
        ed25519: peer.ed25519_key().to_base64(),
        algorithms: vec!["m.olm.v1.curve25519-aes-sha2".into(), "m.megolm.v1.aes-sha2".into()],
        display_name: Some(format!("{device_id} display name")),
        keys: serde_json::json!({ "user_id": user_id, "device_id": device_id }).into(),
        local_trust: LocalTrust::Unset,
        deleted: false,
    }
}
