//! An in-process stand-in for the parts of a homeserver that end-to-end
//! encryption uses: `/keys/upload`, `/keys/query`, `/keys/claim`,
//! `/keys/device_signing/upload`, `/keys/signatures/upload`,
//! `/sendToDevice`, room messages, and the crypto fields of `/sync`.
//!
//! It is deliberately implementation-neutral: it speaks JSON bodies and
//! paths, so newt and other implementations (the interop tests drive
//! matrix-sdk-crypto through it) meet on the same wire format. It behaves
//! like Synapse where it matters: one-time keys are handed out once each,
//! in upload order, then the fallback key; device-list changes are
//! announced to every other device; to-device messages are queued per
//! device and delivered once; user-signing keys and the signatures a
//! user-signing key made are shown only to their owner. It checks no
//! signatures and needs no UIA: tests use it to play a malicious server too.
//!
//! ```
//! use newt_router::Router;
//! use serde_json::json;
//!
//! let router = Router::new();
//! let r = router.handle("@a:hs", "A", "POST", "/keys/upload",
//!     &json!({"one_time_keys": {"signed_curve25519:AAAA": {"key": "k"}}})).unwrap();
//! assert_eq!(r["one_time_key_counts"]["signed_curve25519"], 1);
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

/// A request the router does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// Unknown endpoint.
    #[error("unknown endpoint {0} {1}")]
    UnknownEndpoint(String, String),
    /// The body is malformed.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Poisoned lock.
    #[error("router state poisoned")]
    Poisoned,
}

type DeviceKey = (String, String);

#[derive(Default)]
struct State {
    device_keys: BTreeMap<DeviceKey, Value>,
    one_time_keys: BTreeMap<DeviceKey, VecDeque<(String, Value)>>,
    uploaded_key_ids: BTreeMap<DeviceKey, std::collections::BTreeSet<String>>,
    duplicate_key_uploads: u64,
    fallback_keys: BTreeMap<DeviceKey, (String, Value, bool)>,
    inbox: BTreeMap<DeviceKey, Vec<Value>>,
    changed: BTreeMap<DeviceKey, BTreeSet<String>>,
    rooms: BTreeMap<String, Vec<Value>>,
    next_event: u64,
    next_batch: u64,
    /// Cross-signing keys: user -> usage (`master`, ...) -> key object.
    cross_signing: BTreeMap<String, BTreeMap<String, Value>>,
}

/// The router. Share it behind an `Arc` between simulated devices.
#[derive(Default)]
pub struct Router {
    state: Mutex<State>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

/// The crypto parts of one `/sync` response for one device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncBatch {
    /// `to_device.events`.
    pub to_device: Vec<Value>,
    /// `device_lists.changed`.
    pub changed: Vec<String>,
    /// `device_lists.left`.
    pub left: Vec<String>,
    /// `device_one_time_keys_count.signed_curve25519`.
    pub one_time_key_count: u64,
    /// `device_unused_fallback_key_types`.
    pub unused_fallback_key_types: Vec<String>,
    /// `next_batch`.
    pub next_batch: String,
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, RouterError> {
        self.state.lock().map_err(|_| RouterError::Poisoned)
    }

    /// Handles one client request from `user`/`device`. `path` is below
    /// `/_matrix/client/v3`.
    pub fn handle(
        &self,
        user: &str,
        device: &str,
        method: &str,
        path: &str,
        body: &Value,
    ) -> Result<Value, RouterError> {
        let mut st = self.lock()?;
        let me = (user.to_owned(), device.to_owned());
        match (method, path) {
            ("POST", "/keys/upload") => Ok(st.upload(&me, body)),
            ("POST", "/keys/query") => st.query(user, body),
            ("POST", "/keys/device_signing/upload") => st.device_signing_upload(user, body),
            ("POST", "/keys/signatures/upload") => st.signatures_upload(user, body),
            ("POST", "/keys/claim") => st.claim(body),
            ("PUT", p) if p.starts_with("/sendToDevice/") => {
                let event_type = p
                    .trim_start_matches("/sendToDevice/")
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                st.send_to_device(user, &event_type, body)?;
                Ok(json!({}))
            }
            _ => Err(RouterError::UnknownEndpoint(method.to_owned(), path.to_owned())),
        }
    }

    /// Deletes a device (a logout): its keys and queued messages go, and
    /// every other device sees its user in `device_lists.changed`.
    pub fn delete_device(&self, user: &str, device: &str) -> Result<(), RouterError> {
        let mut st = self.lock()?;
        let me = (user.to_owned(), device.to_owned());
        st.device_keys.remove(&me);
        st.one_time_keys.remove(&me);
        st.fallback_keys.remove(&me);
        st.inbox.remove(&me);
        let others: Vec<DeviceKey> = st.device_keys.keys().cloned().collect();
        for other in others {
            st.changed.entry(other).or_default().insert(user.to_owned());
        }
        Ok(())
    }

    /// The crypto parts of a sync for `user`/`device`; to-device events and
    /// device-list changes are delivered once.
    pub fn sync(&self, user: &str, device: &str) -> Result<SyncBatch, RouterError> {
        let mut st = self.lock()?;
        let me = (user.to_owned(), device.to_owned());
        st.next_batch += 1;
        Ok(SyncBatch {
            to_device: st.inbox.remove(&me).unwrap_or_default(),
            changed: st.changed.remove(&me).map(|s| s.into_iter().collect()).unwrap_or_default(),
            left: Vec::new(),
            one_time_key_count: st.one_time_keys.get(&me).map(|q| q.len() as u64).unwrap_or(0),
            unused_fallback_key_types: match st.fallback_keys.get(&me) {
                Some((_, _, false)) => vec!["signed_curve25519".to_owned()],
                _ => Vec::new(),
            },
            next_batch: format!("s{}", st.next_batch),
        })
    }

    /// Stores a room event from `sender` and returns the full event as
    /// clients see it (with `event_id`, `origin_server_ts`, `room_id`).
    pub fn send_room_event(
        &self,
        room_id: &str,
        sender: &str,
        event_type: &str,
        content: Value,
    ) -> Result<Value, RouterError> {
        let mut st = self.lock()?;
        st.next_event += 1;
        let event = json!({
            "type": event_type,
            "sender": sender,
            "content": content,
            "event_id": format!("$event{}", st.next_event),
            "origin_server_ts": now_ms(),
            "room_id": room_id,
        });
        st.rooms.entry(room_id.to_owned()).or_default().push(event.clone());
        Ok(event)
    }

    /// How many one-time keys were uploaded under a key ID the same device
    /// had already uploaded (a well-behaved client never does).
    pub fn duplicate_one_time_key_uploads(&self) -> Result<u64, RouterError> {
        Ok(self.lock()?.duplicate_key_uploads)
    }

    /// Every event of a room, in order.
    pub fn room_events(&self, room_id: &str) -> Result<Vec<Value>, RouterError> {
        Ok(self.lock()?.rooms.get(room_id).cloned().unwrap_or_default())
    }
}

/// Adds `old`'s signatures that `new` lacks.
fn merge_signatures(new: &mut Value, old: &Value) {
    let Some(Value::Object(old_sigs)) = old.get("signatures") else { return };
    if !new.get("signatures").is_some_and(Value::is_object) {
        new["signatures"] = json!({});
    }
    for (signer, sigs) in old_sigs {
        let (Some(sigs), Some(Value::Object(new_sigs))) =
            (sigs.as_object(), new.get_mut("signatures"))
        else {
            continue;
        };
        let entry = new_sigs.entry(signer.clone()).or_insert_with(|| json!({}));
        if let Value::Object(entry) = entry {
            for (key_id, sig) in sigs {
                entry.entry(key_id.clone()).or_insert_with(|| sig.clone());
            }
        }
    }
}

/// Wall-clock milliseconds, as a homeserver stamps `origin_server_ts`.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl State {
    fn upload(&mut self, me: &DeviceKey, body: &Value) -> Value {
        if let Some(keys) = body.get("device_keys").filter(|k| k.is_object()) {
            let mut keys = keys.clone();
            // Like Synapse: signatures others added (cross-signing) stay
            // when the device re-uploads the same keys.
            if let Some(old) = self.device_keys.get(me) {
                if old.get("keys") == keys.get("keys") {
                    merge_signatures(&mut keys, old);
                }
            }
            let is_new = self.device_keys.get(me) != Some(&keys);
            self.device_keys.insert(me.clone(), keys);
            if is_new {
                let others: Vec<DeviceKey> =
                    self.device_keys.keys().filter(|k| *k != me).cloned().collect();
                for other in others {
                    self.changed.entry(other).or_default().insert(me.0.clone());
                }
            }
        }
        if let Some(otks) = body.get("one_time_keys").and_then(Value::as_object) {
            let seen = self.uploaded_key_ids.entry(me.clone()).or_default();
            let queue = self.one_time_keys.entry(me.clone()).or_default();
            for (id, key) in otks {
                // A real server rejects a re-used key ID; count them so tests
                // can assert a client never does it.
                if !seen.insert(id.clone()) {
                    self.duplicate_key_uploads += 1;
                    continue;
                }
                queue.push_back((id.clone(), key.clone()));
            }
        }
        if let Some(fallback) = body.get("fallback_keys").and_then(Value::as_object) {
            if let Some((id, key)) = fallback.iter().next() {
                self.fallback_keys.insert(me.clone(), (id.clone(), key.clone(), false));
            }
        }
        let count = self.one_time_keys.get(me).map(|q| q.len()).unwrap_or(0);
        json!({ "one_time_key_counts": { "signed_curve25519": count } })
    }

    /// Announces a change of `user`'s keys to every device, the user's own
    /// included (cross-signing changes concern the user's other devices too).
    fn announce(&mut self, user: &str) {
        let all: Vec<DeviceKey> = self.device_keys.keys().cloned().collect();
        for d in all {
            self.changed.entry(d).or_default().insert(user.to_owned());
        }
    }

    fn device_signing_upload(&mut self, user: &str, body: &Value) -> Result<Value, RouterError> {
        let mut keys = BTreeMap::new();
        for (field, usage) in [
            ("master_key", "master"),
            ("self_signing_key", "self_signing"),
            ("user_signing_key", "user_signing"),
        ] {
            if let Some(key) = body.get(field).filter(|k| k.is_object()) {
                if key.get("user_id").and_then(Value::as_str) != Some(user) {
                    return Err(RouterError::BadRequest("cross-signing key of another user"));
                }
                keys.insert(usage.to_owned(), key.clone());
            }
        }
        if keys.is_empty() {
            return Err(RouterError::BadRequest("no cross-signing key"));
        }
        self.cross_signing.entry(user.to_owned()).or_default().extend(keys);
        self.announce(user);
        Ok(json!({}))
    }

    /// Merges the signatures `signer` made (only those) into stored device
    /// keys and cross-signing keys.
    fn signatures_upload(&mut self, signer: &str, body: &Value) -> Result<Value, RouterError> {
        let users = body.as_object().ok_or(RouterError::BadRequest("body"))?;
        let mut failures = Map::new();
        let mut touched = BTreeSet::new();
        for (user, per_key) in users {
            let Some(per_key) = per_key.as_object() else { continue };
            for (key_id, object) in per_key {
                let Some(Value::Object(new)) = object.get("signatures").and_then(|s| s.get(signer))
                else {
                    continue;
                };
                let target = match self.device_keys.get_mut(&(user.clone(), key_id.clone())) {
                    Some(device) => Some(device),
                    None => self.cross_signing.get_mut(user).and_then(|keys| {
                        keys.values_mut().find(|k| {
                            k.get("keys")
                                .and_then(Value::as_object)
                                .is_some_and(|m| m.values().any(|v| v.as_str() == Some(key_id)))
                        })
                    }),
                };
                let Some(target) = target else {
                    if let Value::Object(per_user) =
                        failures.entry(user.clone()).or_insert_with(|| json!({}))
                    {
                        per_user.insert(
                            key_id.clone(),
                            json!({ "errcode": "M_NOT_FOUND", "error": "unknown key" }),
                        );
                    }
                    continue;
                };
                if !target.get("signatures").is_some_and(Value::is_object) {
                    target["signatures"] = json!({});
                }
                let sigs = &mut target["signatures"];
                if !sigs.get(signer).is_some_and(Value::is_object) {
                    sigs[signer] = json!({});
                }
                if let Some(Value::Object(existing)) = sigs.get_mut(signer) {
                    existing.extend(new.clone());
                }
                touched.insert(user.clone());
            }
        }
        for user in touched {
            self.announce(&user);
        }
        Ok(json!({ "failures": failures }))
    }

    /// `requester`'s view of `owner`'s cross-signing key `usage`: a master
    /// key keeps only the owner's and the requester's signatures.
    fn cross_signing_key(&self, requester: &str, owner: &str, usage: &str) -> Option<Value> {
        let mut key = self.cross_signing.get(owner)?.get(usage)?.clone();
        if usage == "master" {
            if let Some(Value::Object(sigs)) = key.get_mut("signatures") {
                sigs.retain(|signer, _| signer == owner || signer == requester);
            }
        }
        Some(key)
    }

    fn query(&self, requester: &str, body: &Value) -> Result<Value, RouterError> {
        let users = body
            .get("device_keys")
            .and_then(Value::as_object)
            .ok_or(RouterError::BadRequest("device_keys"))?;
        let mut out = Map::new();
        let (mut master, mut self_signing, mut user_signing) = (Map::new(), Map::new(), Map::new());
        for (user, wanted) in users {
            let wanted: Vec<&str> = wanted
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut devices = Map::new();
            for ((u, d), keys) in &self.device_keys {
                if u == user && (wanted.is_empty() || wanted.contains(&d.as_str())) {
                    devices.insert(d.clone(), keys.clone());
                }
            }
            out.insert(user.clone(), Value::Object(devices));
            for (usage, map) in [
                ("master", &mut master),
                ("self_signing", &mut self_signing),
                ("user_signing", &mut user_signing),
            ] {
                if usage == "user_signing" && user != requester {
                    continue;
                }
                if let Some(key) = self.cross_signing_key(requester, user, usage) {
                    map.insert(user.clone(), key);
                }
            }
        }
        Ok(json!({
            "device_keys": out,
            "master_keys": master,
            "self_signing_keys": self_signing,
            "user_signing_keys": user_signing,
            "failures": {},
        }))
    }

    fn claim(&mut self, body: &Value) -> Result<Value, RouterError> {
        let wanted = body
            .get("one_time_keys")
            .and_then(Value::as_object)
            .ok_or(RouterError::BadRequest("one_time_keys"))?;
        let mut out = Map::new();
        for (user, devices) in wanted {
            let Some(devices) = devices.as_object() else { continue };
            let mut user_out = Map::new();
            for device in devices.keys() {
                let key = (user.clone(), device.clone());
                let claimed = match self.one_time_keys.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(k) => Some(k),
                    None => self.fallback_keys.get_mut(&key).map(|(id, v, used)| {
                        *used = true;
                        (id.clone(), v.clone())
                    }),
                };
                if let Some((id, v)) = claimed {
                    user_out.insert(device.clone(), json!({ id: v }));
                }
            }
            out.insert(user.clone(), Value::Object(user_out));
        }
        Ok(json!({ "one_time_keys": out, "failures": {} }))
    }

    fn send_to_device(
        &mut self,
        sender: &str,
        event_type: &str,
        body: &Value,
    ) -> Result<(), RouterError> {
        let messages = body
            .get("messages")
            .and_then(Value::as_object)
            .ok_or(RouterError::BadRequest("messages"))?;
        for (user, devices) in messages {
            let Some(devices) = devices.as_object() else { continue };
            for (device, content) in devices {
                let targets: Vec<DeviceKey> = if device == "*" {
                    self.device_keys.keys().filter(|(u, _)| u == user).cloned().collect()
                } else {
                    vec![(user.clone(), device.clone())]
                };
                for t in targets {
                    let event = json!({ "type": event_type, "sender": sender, "content": content });
                    self.inbox.entry(t).or_default().push(event);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_time_keys_once_then_fallback() {
        let r = Router::new();
        r.handle(
            "@b:hs",
            "B",
            "POST",
            "/keys/upload",
            &json!({
                "one_time_keys": {"signed_curve25519:1": {"key": "one"}},
                "fallback_keys": {"signed_curve25519:F": {"key": "fb", "fallback": true}},
            }),
        )
        .unwrap();
        let claim = json!({"one_time_keys": {"@b:hs": {"B": "signed_curve25519"}}});
        let first = r.handle("@a:hs", "A", "POST", "/keys/claim", &claim).unwrap();
        assert_eq!(first["one_time_keys"]["@b:hs"]["B"]["signed_curve25519:1"]["key"], "one");
        let second = r.handle("@a:hs", "A", "POST", "/keys/claim", &claim).unwrap();
        assert_eq!(second["one_time_keys"]["@b:hs"]["B"]["signed_curve25519:F"]["key"], "fb");
        let sync = r.sync("@b:hs", "B").unwrap();
        assert_eq!(sync.one_time_key_count, 0);
        assert!(sync.unused_fallback_key_types.is_empty());
    }

    #[test]
    fn cross_signing_keys_and_hidden_user_signing_signatures() {
        let r = Router::new();
        for (u, d) in [("@a:hs", "A"), ("@b:hs", "B")] {
            r.handle(u, d, "POST", "/keys/upload", &json!({"device_keys": {"device_id": d}}))
                .unwrap();
        }
        let key = |u: &str, usage: &str, k: &str| json!({"user_id": u, "usage": [usage], "keys": {format!("ed25519:{k}"): k}});
        r.handle(
            "@a:hs",
            "A",
            "POST",
            "/keys/device_signing/upload",
            &json!({
                "master_key": key("@a:hs", "master", "AM"),
                "self_signing_key": key("@a:hs", "self_signing", "AS"),
                "user_signing_key": key("@a:hs", "user_signing", "AU"),
            }),
        )
        .unwrap();
        assert_eq!(r.sync("@b:hs", "B").unwrap().changed, vec!["@a:hs".to_owned()]);
        // B signs A's master key with its USK: only B sees that signature.
        let sig = json!({"@a:hs": {"AM": {"signatures": {"@b:hs": {"ed25519:BU": "sig"}}}}});
        let out = r.handle("@b:hs", "B", "POST", "/keys/signatures/upload", &sig).unwrap();
        assert_eq!(out["failures"], json!({}));
        let q = json!({"device_keys": {"@a:hs": []}});
        let by_b = r.handle("@b:hs", "B", "POST", "/keys/query", &q).unwrap();
        assert_eq!(by_b["master_keys"]["@a:hs"]["signatures"]["@b:hs"]["ed25519:BU"], "sig");
        assert!(by_b["user_signing_keys"].get("@a:hs").is_none());
        assert_eq!(by_b["self_signing_keys"]["@a:hs"]["keys"]["ed25519:AS"], "AS");
        let by_a = r.handle("@a:hs", "A", "POST", "/keys/query", &q).unwrap();
        assert!(by_a["master_keys"]["@a:hs"]["signatures"].get("@b:hs").is_none());
        assert_eq!(by_a["user_signing_keys"]["@a:hs"]["keys"]["ed25519:AU"], "AU");
        // An SSK signature on A's device lands in its device keys.
        let dev = json!({"@a:hs": {"A": {"signatures": {"@a:hs": {"ed25519:AS": "dsig"}}}}});
        r.handle("@a:hs", "A", "POST", "/keys/signatures/upload", &dev).unwrap();
        let by_b = r.handle("@b:hs", "B", "POST", "/keys/query", &q).unwrap();
        assert_eq!(by_b["device_keys"]["@a:hs"]["A"]["signatures"]["@a:hs"]["ed25519:AS"], "dsig");
    }

    #[test]
    fn re_upload_keeps_cross_signing_signatures() {
        let r = Router::new();
        let keys = json!({"user_id": "@a:hs", "device_id": "D", "keys": {"ed25519:D": "k"},
            "signatures": {"@a:hs": {"ed25519:D": "self"}}});
        r.handle("@a:hs", "D", "POST", "/keys/upload", &json!({"device_keys": keys})).unwrap();
        r.handle(
            "@a:hs",
            "D",
            "POST",
            "/keys/signatures/upload",
            &json!({"@a:hs": {"D": {"user_id": "@a:hs", "device_id": "D", "keys": {"ed25519:D": "k"},
                "signatures": {"@a:hs": {"ed25519:SSK": "cross"}}}}}),
        )
        .unwrap();
        r.handle("@a:hs", "D", "POST", "/keys/upload", &json!({"device_keys": keys})).unwrap();
        let q = r
            .handle("@a:hs", "D", "POST", "/keys/query", &json!({"device_keys": {"@a:hs": []}}))
            .unwrap();
        let sigs = &q["device_keys"]["@a:hs"]["D"]["signatures"]["@a:hs"];
        assert_eq!(sigs["ed25519:D"], "self");
        assert_eq!(sigs["ed25519:SSK"], "cross");
    }

    #[test]
    fn to_device_wildcard_and_once() {
        let r = Router::new();
        for d in ["A1", "A2"] {
            r.handle("@a:hs", d, "POST", "/keys/upload", &json!({"device_keys": {"device_id": d}}))
                .unwrap();
        }
        r.handle(
            "@b:hs",
            "B",
            "PUT",
            "/sendToDevice/m.x/1",
            &json!({"messages": {"@a:hs": {"*": {"n": 1}}}}),
        )
        .unwrap();
        assert_eq!(r.sync("@a:hs", "A1").unwrap().to_device.len(), 1);
        assert_eq!(r.sync("@a:hs", "A2").unwrap().to_device[0]["content"]["n"], 1);
        assert!(r.sync("@a:hs", "A2").unwrap().to_device.is_empty());
        // A1 learned about A2's upload.
        assert!(r.sync("@a:hs", "A1").unwrap().changed.is_empty());
    }
}
