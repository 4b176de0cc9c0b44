//! Writes the benchmark fixtures: real vodozemac accounts with signed device
//! keys and signed one-time keys, key exports, and Megolm events. The
//! largest `/keys/query` fixture also carries every user's cross-signing
//! keys (master and self-signing, the latter signed by the former), and its
//! devices are signed by their owner's self-signing key.
//!
//! `gen-fixtures DIR [--smoke]`. Nothing here is committed; `benches/run.sh`
//! generates into `target/bench-fixtures/`.

// A bench tool: a failure is reported and ends the run, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use newt_bench::*;
use newt_proto::export::{encrypt_export, ExportedRoomKey};
use newt_proto::ids::UserId;
use newt_proto::json::sign_json;
use newt_proto::vodozemac::megolm::{GroupSession, InboundGroupSession, SessionConfig};
use newt_proto::vodozemac::olm::Account;
use newt_proto::vodozemac::Ed25519SecretKey;
use serde_json::{json, Map, Value};

struct PoolDevice {
    user: String,
    device: String,
    account: Account,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = Path::new(args.first().map(String::as_str).unwrap_or("target/bench-fixtures"));
    let smoke = args.iter().any(|a| a == "--smoke");
    std::fs::create_dir_all(dir).expect("create fixture dir");
    let t = Instant::now();

    let query_sizes: &[usize] =
        if smoke { &[100, 150, 163, 2000] } else { &[150, 163, 1000, 2000, 10_000] };
    let claim_sizes: &[usize] = if smoke { &[163] } else { &[163, 1000, 10_000] };
    let export_sizes: &[usize] = if smoke { &[1000] } else { &[1000, 100_000] };
    let pool_size = query_sizes.iter().copied().max().unwrap_or(0);

    let mut pool: Vec<PoolDevice> = device_ids(pool_size)
        .into_iter()
        .map(|(user, device)| PoolDevice { user, device, account: Account::new() })
        .collect();
    let device_keys: Vec<Value> = pool.iter().map(signed_device_keys).collect();
    for &n in query_sizes {
        let cross_signed = n == pool_size;
        let mut identities: BTreeMap<&str, CrossSigning> = BTreeMap::new();
        let mut by_user: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
        for (d, keys) in pool.iter().zip(&device_keys).take(n) {
            let mut keys = keys.clone();
            if cross_signed {
                let identity = identities.entry(&d.user).or_insert_with(CrossSigning::new);
                identity.sign(&d.user, &mut keys);
            }
            by_user.entry(&d.user).or_default().insert(d.device.clone(), keys);
        }
        let users = by_user.len();
        let mut response = json!({ "device_keys": by_user, "failures": {} });
        if cross_signed {
            let (mut master, mut self_signing) = (Map::new(), Map::new());
            for (user, identity) in &identities {
                let (m, s) = identity.public_keys(user);
                master.insert((*user).to_owned(), m);
                self_signing.insert((*user).to_owned(), s);
            }
            response["master_keys"] = Value::Object(master);
            response["self_signing_keys"] = Value::Object(self_signing);
        }
        write_json(&query_file(dir, n), &response);
        // What handling the response must verify at least: each device's
        // self-signature, and each self-signing key's signature by its
        // master key (the devices' cross-signatures are checked when their
        // trust is asked for).
        let verifications = n + if cross_signed { users } else { 0 };
        let meta = json!({ "devices": n, "users": users, "cross_signed": cross_signed,
            "ed25519_verifications": verifications });
        write_json(&query_file(dir, n).with_extension("meta.json"), &meta);
    }

    // One signed one-time key per device, the same in every claim size.
    let max_claim = claim_sizes.iter().copied().max().unwrap_or(0);
    let otks: Vec<(String, Value)> =
        pool.iter_mut().take(max_claim).map(signed_one_time_key).collect();
    for &n in claim_sizes {
        let mut by_user: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
        for (d, (key_id, key)) in pool.iter().zip(&otks).take(n) {
            by_user
                .entry(&d.user)
                .or_default()
                .insert(d.device.clone(), json!({ key_id.clone(): key.clone() }));
        }
        let response = json!({ "one_time_keys": by_user, "failures": {} });
        write_json(&claim_file(dir, n), &response);
    }

    // Key exports: sessions of pool devices, 100 per room.
    let max_export = export_sizes.iter().copied().max().unwrap_or(0);
    let mut exported = Vec::with_capacity(max_export);
    for i in 0..max_export {
        let sender = &pool[i % pool.len()];
        let group = GroupSession::new(SessionConfig::version_1());
        exported.push(exported_key(&format!("!r{:05}:bench.test", i / 100), sender, &group));
    }
    for &n in export_sizes {
        let file = encrypt_export(&exported[..n], PASSPHRASE, EXPORT_ROUNDS).expect("export");
        std::fs::write(export_file(dir, n), file).expect("write export");
    }

    // The Megolm room: one session of pool device 0, and its events.
    let sender = &pool[0];
    let mut group = GroupSession::new(SessionConfig::version_1());
    let key = exported_key(ROOM, sender, &group);
    let file = encrypt_export(&[key], PASSPHRASE, EXPORT_ROUNDS).expect("export");
    std::fs::write(megolm_session_file(dir), file).expect("write session");
    let sender_key = sender.account.curve25519_key().to_base64();
    let events: Vec<Value> = (0..EVENTS)
        .map(|i| {
            let payload = json!({
                "type": "m.room.message",
                "content": { "msgtype": "m.text", "body": format!("benchmark message number {i}") },
                "room_id": ROOM,
            });
            let message = group.encrypt(payload.to_string());
            json!({
                "type": "m.room.encrypted",
                "sender": sender.user,
                "event_id": format!("$event{i}:bench.test"),
                "origin_server_ts": 1_700_000_000_000u64 + i as u64,
                "room_id": ROOM,
                "content": {
                    "algorithm": "m.megolm.v1.aes-sha2",
                    "ciphertext": message.to_base64(),
                    "session_id": group.session_id(),
                    "sender_key": sender_key,
                    "device_id": sender.device,
                },
            })
        })
        .collect();
    write_json(&megolm_events_file(dir), &Value::Array(events));
    eprintln!("fixtures written to {} in {:.1?}", dir.display(), t.elapsed());
}

fn signed_device_keys(d: &PoolDevice) -> Value {
    let keys = d.account.identity_keys();
    let mut value = json!({
        "user_id": d.user,
        "device_id": d.device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", d.device): keys.curve25519.to_base64(),
            format!("ed25519:{}", d.device): keys.ed25519.to_base64(),
        },
    });
    sign(d, &mut value);
    value
}

/// One user's master and self-signing keys.
struct CrossSigning {
    master: Ed25519SecretKey,
    self_signing: Ed25519SecretKey,
}

impl CrossSigning {
    fn new() -> Self {
        Self { master: Ed25519SecretKey::new(), self_signing: Ed25519SecretKey::new() }
    }

    fn key_id(key: &Ed25519SecretKey) -> String {
        format!("ed25519:{}", key.public_key().to_base64())
    }

    /// Adds the self-signing key's signature to `device_keys`.
    fn sign(&self, user: &str, device_keys: &mut Value) {
        let user = UserId::parse(user.to_owned()).expect("user id");
        let key_id = Self::key_id(&self.self_signing);
        sign_json(device_keys, &user, &key_id, |m| self.self_signing.sign(m)).expect("sign");
    }

    /// The `master_keys` and `self_signing_keys` entries of `user`.
    fn public_keys(&self, user: &str) -> (Value, Value) {
        let key = |k: &Ed25519SecretKey, usage: &str| {
            json!({ "user_id": user, "usage": [usage],
                "keys": { Self::key_id(k): k.public_key().to_base64() } })
        };
        let master = key(&self.master, "master");
        let mut self_signing = key(&self.self_signing, "self_signing");
        let owner = UserId::parse(user.to_owned()).expect("user id");
        sign_json(&mut self_signing, &owner, &Self::key_id(&self.master), |m| self.master.sign(m))
            .expect("sign");
        (master, self_signing)
    }
}

fn signed_one_time_key(d: &mut PoolDevice) -> (String, Value) {
    d.account.generate_one_time_keys(1);
    let (id, key) = d.account.one_time_keys().into_iter().next().expect("one-time key");
    d.account.mark_keys_as_published();
    let mut value = json!({ "key": key.to_base64() });
    sign(d, &mut value);
    (format!("signed_curve25519:{}", id.to_base64()), value)
}

fn sign(d: &PoolDevice, value: &mut Value) {
    let user = UserId::parse(d.user.clone()).expect("user id");
    sign_json(value, &user, &format!("ed25519:{}", d.device), |m| d.account.sign(m)).expect("sign");
}

fn exported_key(room: &str, sender: &PoolDevice, group: &GroupSession) -> ExportedRoomKey {
    let mut inbound = InboundGroupSession::new(&group.session_key(), SessionConfig::version_1());
    let session_key = inbound.export_at(0).expect("export at 0").to_base64();
    ExportedRoomKey {
        algorithm: "m.megolm.v1.aes-sha2".into(),
        room_id: room.into(),
        sender_key: sender.account.curve25519_key().to_base64(),
        session_id: group.session_id(),
        session_key,
        sender_claimed_keys: BTreeMap::from([(
            "ed25519".to_owned(),
            sender.account.ed25519_key().to_base64(),
        )]),
        forwarding_curve25519_key_chain: Vec::new(),
        shared_history: false,
    }
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_vec(value).expect("json")).expect("write fixture");
}
