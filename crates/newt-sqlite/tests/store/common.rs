//! Helpers shared by the integration tests: real records, file digests and
//! child processes.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, LocalTrust, OlmSessionRecord,
    OutboundGroupSessionRecord, SessionSource,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use vodozemac::megolm::{GroupSession, InboundGroupSession, SessionConfig as MegolmConfig};
use vodozemac::olm::{Account, SessionConfig as OlmConfig};

pub(crate) fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

pub(crate) fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).unwrap()
}

pub(crate) fn room(id: &str) -> RoomId {
    RoomId::parse(id).unwrap()
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap()
}

pub(crate) fn account(user_id: &str, device_id: &str, generation: u64) -> AccountRecord {
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
pub(crate) fn olm_session(peer: &mut Account) -> OlmSessionRecord {
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

pub(crate) fn inbound(room_id: &RoomId, sender_key: &str) -> InboundGroupSessionRecord {
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

pub(crate) fn outbound(room_id: &RoomId) -> OutboundGroupSessionRecord {
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

pub(crate) fn device_record(user_id: &str, device_id: &str, peer: &Account) -> DeviceRecord {
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

/// SHA-256 of a file's bytes, `None` if it does not exist.
pub(crate) fn digest(path: &Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|bytes| Sha256::digest(bytes).into())
}

/// The store file and its WAL and shared-memory companions.
pub(crate) fn store_files(path: &Path) -> [std::path::PathBuf; 3] {
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    [path.to_owned(), with("-wal"), with("-shm")]
}

/// Runs one of this binary's ignored `child_*` tests in a new process, with
/// `env` set and stdout piped.
pub(crate) fn spawn_child(test: &str, env: &[(&str, String)]) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([test, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().unwrap()
}

/// Reads a child's pipe to the end on another thread, so that the child
/// never blocks on a full pipe buffer.
pub(crate) fn drain(
    mut pipe: impl std::io::Read + Send + 'static,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text).unwrap();
        text
    })
}

/// A single-threaded runtime for the synchronous child tests.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().unwrap()
}
