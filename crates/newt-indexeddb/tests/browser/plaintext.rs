//! Nothing readable is stored: every record of every object store (keys,
//! values, index fields, the key material), dumped as IndexedDB holds it,
//! holds none of the identifiers, keys and pickles the test wrote, nor
//! the store key.

use base64::Engine;
use newt_indexeddb::{IndexedDbStore, StoreKey};
use newt_proto::identities::IdentityRecord;
use newt_proto::records::{KeyRequestRecord, MessageIndexRecord, TrackedUser, WithheldRecord};
use newt_store::{Changes, Store};
use serde_json::Value;
use vodozemac::olm::Account;
use wasm_bindgen_test::wasm_bindgen_test;

use crate::common::*;

const RAW_KEY: [u8; 32] = *b"raw-store-key-bytes-0123456789ab";

/// Every byte string that must not appear, with a label.
struct Needles(Vec<(String, Vec<u8>)>);

impl Needles {
    fn text(&mut self, label: &str, value: &str) {
        self.0.push((label.into(), value.as_bytes().to_vec()));
    }

    /// A key: its raw bytes, its base64 and its JSON array form.
    fn key(&mut self, label: &str, bytes: &[u8]) {
        self.0.push((format!("{label} (raw)"), bytes.to_vec()));
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        self.text(&format!("{label} (base64)"), b64.trim_end_matches('='));
        let json = serde_json::to_string(bytes).unwrap();
        self.text(&format!("{label} (json)"), &json[..json.len().min(40)]);
    }

    /// Every byte array of 16 bytes or more, and every long string, inside
    /// a serialised pickle.
    fn pickle(&mut self, label: &str, pickle: &Value) {
        match pickle {
            Value::Array(items)
                if items.len() >= 16
                    && items.iter().all(|v| v.as_u64().is_some_and(|n| n < 256)) =>
            {
                let bytes: Vec<u8> = items.iter().map(|v| v.as_u64().unwrap() as u8).collect();
                self.key(label, &bytes);
            }
            Value::Array(items) => items.iter().for_each(|v| self.pickle(label, v)),
            Value::Object(map) => {
                map.iter().for_each(|(k, v)| self.pickle(&format!("{label}.{k}"), v))
            }
            Value::String(s) if s.len() >= 16 => self.text(label, s),
            _ => {}
        }
    }

    fn found_in(&self, records: &[(String, Vec<u8>)]) -> Vec<String> {
        let mut found = Vec::new();
        for (store, bytes) in records {
            for (label, needle) in &self.0 {
                if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                    found.push(format!("{label} in {store}"));
                }
            }
        }
        found
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap()
}

#[wasm_bindgen_test]
async fn no_plaintext_in_any_record() {
    let name = fresh_name("plaintext");
    let store = IndexedDbStore::open(&name, StoreKey::Raw(RAW_KEY)).await.unwrap();
    let mut needles = Needles(Vec::new());
    needles.key("raw store key", &RAW_KEY);

    let me = "@plaintext-alice:example.org";
    let peer_user = "@plaintext-bob:example.org";
    let room_id = room("!plaintext-room:example.org");
    let mut peer = Account::new();
    let acct = account(me, "PLAINTEXTDEVICE", 0);
    let olm = olm_session(&mut peer);
    let sessions: Vec<_> = (0..5).map(|_| inbound(&room_id, &olm.sender_key)).collect();
    let out = outbound(&room_id);
    let dev = device_record(peer_user, "PLAINPEERDEVICE", &peer);
    let request = KeyRequestRecord {
        request_id: "plaintext-request-id".into(),
        room_id: room_id.clone(),
        session_id: sessions[0].session_id.clone(),
        sent: false,
    };
    let withheld = WithheldRecord {
        room_id: room_id.clone(),
        session_id: sessions[1].session_id.clone(),
        sender: user(peer_user),
        code: "m.unverified".into(),
        reason: Some("plaintext withheld reason".into()),
    };
    let index = MessageIndexRecord {
        room_id: room_id.clone(),
        session_id: sessions[2].session_id.clone(),
        index: 3,
        event_id: "$plaintext-event-id".into(),
        origin_server_ts: 1,
    };
    let identity: IdentityRecord = serde_json::from_value(serde_json::json!({
        "user_id": peer_user,
        "master_key": { "user_id": peer_user, "usage": ["master"],
                        "keys": { "ed25519:plaintextmasterkeyid": "plaintextmasterkeyid" } },
        "self_signing_key": { "user_id": peer_user, "usage": ["self_signing"],
                              "keys": { "ed25519:plaintextselfsigningid": "plaintextselfsigningid" } },
    }))
    .unwrap_or_else(|e| panic!("identity record: {e}"));

    for text in [
        me,
        peer_user,
        "plaintext-alice",
        "plaintext-bob",
        "!plaintext-room",
        "PLAINTEXTDEVICE",
        "PLAINPEERDEVICE",
        "plaintext-request-id",
        "plaintext withheld reason",
        "$plaintext-event-id",
        "plaintext_sync_token",
        "PLAINPEERDEVICE display name",
        "m.megolm.v1.aes-sha2",
        "m.unverified",
        "plaintextmasterkeyid",
        "plaintextselfsigningid",
    ] {
        needles.text(text, text);
    }
    needles.text("olm session id", &olm.session_id);
    needles.text("sender key", &olm.sender_key);
    needles.text("peer ed25519", &dev.ed25519);
    needles.text("outbound session id", &out.session_id);
    for s in &sessions {
        needles.text("inbound session id", &s.session_id);
        needles.pickle("inbound pickle", &to_json(&s.pickle));
    }
    needles.pickle("account pickle", &to_json(&acct.pickle));
    needles.pickle("olm pickle", &to_json(&olm.pickle));
    needles.pickle("outbound pickle", &to_json(&out.pickle));
    assert!(needles.0.len() > 100, "only {} needles", needles.0.len());

    let changes = Changes {
        account: Some(acct),
        olm_sessions: vec![olm],
        inbound_group_sessions: sessions,
        outbound_group_sessions: vec![out],
        devices: vec![dev],
        tracked_users: vec![TrackedUser { user_id: user(peer_user), outdated: true }],
        key_requests: vec![request],
        withheld: vec![withheld],
        message_indices: vec![index],
        sync_token: Some("plaintext_sync_token".into()),
        identities: vec![identity],
        ..Default::default()
    };
    store.apply(changes).await.unwrap();

    let (_, records) = dump(&name).await;
    // Every object store that was written holds records, and the scanner
    // finds what is there: the names of the meta records.
    let stores: std::collections::BTreeSet<&str> =
        records.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(stores.len(), 11, "{stores:?}");
    let mut control = Needles(Vec::new());
    control.text("meta name", "key_check");
    assert_eq!(control.found_in(&records).len(), 1);

    let hits = needles.found_in(&records);
    assert!(hits.is_empty(), "plaintext stored: {hits:#?}");
}
