//! Helpers: fresh database names, real records, and a raw dump of a
//! database (every record of every object store, as IndexedDB holds it).

use std::cell::Cell;

use js_sys::{Array, Object, Reflect, Uint8Array};
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, LocalTrust, OlmSessionRecord,
    OutboundGroupSessionRecord, SessionSource,
};
use vodozemac::megolm::{GroupSession, InboundGroupSession, SessionConfig as MegolmConfig};
use vodozemac::olm::{Account, SessionConfig as OlmConfig};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{IdbDatabase, IdbRequest};

thread_local! {
    static COUNTER: Cell<u32> = const { Cell::new(0) };
}

/// A database name no earlier run used (the browser profile is fresh per
/// run, but the tests of one run share it).
pub(crate) fn fresh_name(prefix: &str) -> String {
    let n = COUNTER.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    format!("newt-test-{prefix}-{n}-{}", js_sys::Math::random())
}

pub(crate) fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

pub(crate) fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).unwrap()
}

pub(crate) fn room(id: &str) -> RoomId {
    RoomId::parse(id).unwrap()
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

async fn settle(request: IdbRequest) -> JsValue {
    let promise = js_sys::Promise::new(&mut |resolve, reject| {
        request.set_onsuccess(Some(&resolve));
        request.set_onerror(Some(&reject));
    });
    JsFuture::from(promise).await.unwrap();
    request.result().unwrap()
}

/// Opens `name` raw, at whatever version it has (a missing database is
/// created empty, version 1).
pub(crate) async fn raw_open(name: &str, version: Option<u32>) -> IdbDatabase {
    let factory: web_sys::IdbFactory =
        Reflect::get(&js_sys::global(), &"indexedDB".into()).unwrap().unchecked_into();
    let request = match version {
        Some(v) => factory.open_with_u32(name, v).unwrap(),
        None => factory.open(name).unwrap(),
    };
    settle(request.unchecked_into()).await.unchecked_into()
}

/// Every record of every object store of `name`, each as one byte string
/// (every property: bytes as they are, strings as UTF-8, numbers as
/// text), with the database version; sorted, so two dumps compare.
pub(crate) async fn dump(name: &str) -> (u32, Vec<(String, Vec<u8>)>) {
    let db = raw_open(name, None).await;
    let version = db.version() as u32;
    let names = db.object_store_names();
    let mut records = Vec::new();
    for i in 0..names.length() {
        let store_name = names.get(i).unwrap();
        let tx = db.transaction_with_str(&store_name).unwrap();
        let store = tx.object_store(&store_name).unwrap();
        let all: Array = settle(store.get_all().unwrap()).await.unchecked_into();
        for record in all.iter() {
            records.push((store_name.clone(), flatten(&record)));
        }
    }
    db.close();
    records.sort();
    (version, records)
}

fn flatten(value: &JsValue) -> Vec<u8> {
    if let Some(bytes) = value.dyn_ref::<Uint8Array>() {
        bytes.to_vec()
    } else if let Some(s) = value.as_string() {
        s.into_bytes()
    } else if let Some(n) = value.as_f64() {
        n.to_string().into_bytes()
    } else if let Some(array) = value.dyn_ref::<Array>() {
        array.iter().flat_map(|v| flatten(&v)).collect()
    } else if value.is_object() {
        let mut out = Vec::new();
        for entry in Object::entries(value.unchecked_ref()).iter() {
            let entry: Array = entry.unchecked_into();
            out.extend(flatten(&entry.get(0)));
            out.push(0);
            out.extend(flatten(&entry.get(1)));
            out.push(0);
        }
        out
    } else {
        format!("{value:?}").into_bytes()
    }
}

/// A copy of a record (records hold secrets and are not `Clone`).
pub(crate) fn copy<T: serde::Serialize + serde::de::DeserializeOwned>(record: &T) -> T {
    serde_json::from_value(serde_json::to_value(record).unwrap()).unwrap()
}
