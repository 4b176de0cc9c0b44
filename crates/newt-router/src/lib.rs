//! An in-process stand-in for the parts of a homeserver that end-to-end
//! encryption uses: `/keys/upload`, `/keys/query`, `/keys/claim`,
//! `/sendToDevice`, room messages, and the crypto fields of `/sync`.
//!
//! It is deliberately implementation-neutral: it speaks JSON bodies and
//! paths, so newt and other implementations (the interop tests drive
//! matrix-sdk-crypto through it) meet on the same wire format. It behaves
//! like Synapse where it matters: one-time keys are handed out once each,
//! in upload order, then the fallback key; device-list changes are
//! announced to every other device; to-device messages are queued per
//! device and delivered once.
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
            ("POST", "/keys/query") => st.query(body),
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
            "origin_server_ts": 1_700_000_000_000u64 + st.next_event,
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

impl State {
    fn upload(&mut self, me: &DeviceKey, body: &Value) -> Value {
        if let Some(keys) = body.get("device_keys").filter(|k| k.is_object()) {
            let is_new = self.device_keys.get(me) != Some(keys);
            self.device_keys.insert(me.clone(), keys.clone());
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

    fn query(&self, body: &Value) -> Result<Value, RouterError> {
        let users = body
            .get("device_keys")
            .and_then(Value::as_object)
            .ok_or(RouterError::BadRequest("device_keys"))?;
        let mut out = Map::new();
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
        }
        Ok(json!({ "device_keys": out, "failures": {} }))
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
