//! [`MemoryStore`]: the reference backend. State lives in a mutex-guarded set
//! of ordered maps; records are stored as serialised JSON so that a read
//! always returns an independent copy (pickles are not `Clone`). Outbound
//! sessions, written after every encryption and rarely read, are kept as
//! records and copied (through JSON) when read.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use newt_proto::identities::{IdentityRecord, PrivateIdentityRecord};
use newt_proto::ids::{RoomId, UserId};
use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, MessageIndexRecord,
    OlmSessionRecord, OutboundGroupSessionRecord, TrackedUser, WithheldRecord,
};
/// A record serialised as JSON bytes: compact, and every read is an
/// independent copy (pickles are not `Clone`). Not wiped when replaced:
/// this store's contents are the secrets for as long as the process lives,
/// and wiping every replaced Olm session cost a fifth of a room key share
/// (zeroising is a byte-at-a-time volatile write).
type Value = Vec<u8>;

use crate::{
    check_generation, check_generation_value, check_outbound_generation, Changes, SessionCursor,
    Store, StoreError,
};

type Key2 = (String, String);

#[derive(Default)]
struct Inner {
    account: Option<Value>,
    /// With each session's generation, so the generation rule needs no parse.
    olm_sessions: BTreeMap<Key2, (u64, Value)>,
    inbound: BTreeMap<Key2, Value>,
    outbound: BTreeMap<String, OutboundGroupSessionRecord>,
    devices: BTreeMap<Key2, DeviceRecord>,
    tracked: BTreeMap<String, TrackedUser>,
    key_requests: BTreeMap<String, KeyRequestRecord>,
    /// By (room, session, sender).
    withheld: BTreeMap<(String, String, String), WithheldRecord>,
    indices: BTreeMap<(String, String, u32), MessageIndexRecord>,
    sync_token: Option<String>,
    identities: BTreeMap<String, IdentityRecord>,
    private_identity: Option<PrivateIdentityRecord>,
}

/// An in-memory [`Store`]: nothing survives the process. For tests, bots that
/// do not need persistence, and as the model every backend must match.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner.lock().map_err(|_| StoreError::Corrupt("memory store mutex poisoned".into()))
    }
}

impl Inner {
    /// The stored Olm sessions with `sender_key`, still serialised.
    fn olm_values<'a>(&'a self, sender_key: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.olm_sessions
            .range((sender_key.to_owned(), String::new())..)
            .take_while(move |((k, _), _)| k == sender_key)
            .map(|(_, (_, v))| v)
    }

    /// `user`'s devices.
    fn devices_of(&self, user: &UserId) -> impl Iterator<Item = &DeviceRecord> {
        let user = user.to_string();
        self.devices
            .range((user.clone(), String::new())..)
            .take_while(move |((u, _), _)| *u == user)
            .map(|(_, d)| d)
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[cfg_attr(not(target_arch = "wasm32"), async_trait::async_trait)]
#[cfg_attr(target_arch = "wasm32", async_trait::async_trait(?Send))]
impl Store for MemoryStore {
    async fn account(&self) -> Result<Option<AccountRecord>, StoreError> {
        self.lock()?.account.as_ref().map(from_value).transpose()
    }

    async fn olm_sessions(&self, sender_key: &str) -> Result<Vec<OlmSessionRecord>, StoreError> {
        self.lock()?.olm_values(sender_key).map(from_value).collect()
    }

    async fn devices_of(&self, users: &[UserId]) -> Result<Vec<DeviceRecord>, StoreError> {
        let inner = self.lock()?;
        let found: Vec<&DeviceRecord> = users.iter().flat_map(|u| inner.devices_of(u)).collect();
        // Thousands of records to copy out for a room key share.
        crate::parallel::map_parallel(&found, |d| Ok((*d).clone()))
    }

    async fn olm_sessions_of(
        &self,
        sender_keys: &[&str],
    ) -> Result<Vec<OlmSessionRecord>, StoreError> {
        let inner = self.lock()?;
        let found: Vec<&Value> = sender_keys.iter().flat_map(|k| inner.olm_values(k)).collect();
        // A room key share reads thousands: parse them on every core.
        crate::parallel::map_parallel(&found, |v| from_value(v))
    }

    async fn inbound_group_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<InboundGroupSessionRecord>, StoreError> {
        let inner = self.lock()?;
        inner.inbound.get(&(room_id.to_string(), session_id.to_owned())).map(from_value).transpose()
    }

    async fn inbound_group_sessions_page(
        &self,
        after: SessionCursor,
        limit: usize,
    ) -> Result<Vec<InboundGroupSessionRecord>, StoreError> {
        use std::ops::Bound;
        let inner = self.lock()?;
        let start = match after {
            Some((room, session)) => Bound::Excluded((room.to_string(), session)),
            None => Bound::Unbounded,
        };
        let page: Vec<&Value> =
            inner.inbound.range((start, Bound::Unbounded)).take(limit).map(|(_, v)| v).collect();
        // Parsing a pickle decompresses its Ed25519 key: worth the cores.
        crate::parallel::map_parallel(&page, |v| from_value(v))
    }

    async fn outbound_group_session(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<OutboundGroupSessionRecord>, StoreError> {
        let inner = self.lock()?;
        inner.outbound.get(room_id.as_str()).map(|r| from_value(&to_value(r)?)).transpose()
    }

    async fn devices(&self, user_id: &UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        Ok(self.lock()?.devices_of(user_id).cloned().collect())
    }

    async fn tracked_users(&self) -> Result<Vec<TrackedUser>, StoreError> {
        Ok(self.lock()?.tracked.values().cloned().collect())
    }

    async fn key_request(&self, request_id: &str) -> Result<Option<KeyRequestRecord>, StoreError> {
        Ok(self.lock()?.key_requests.get(request_id).cloned())
    }

    async fn key_request_for_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<KeyRequestRecord>, StoreError> {
        Ok(self
            .lock()?
            .key_requests
            .values()
            .find(|r| &r.room_id == room_id && r.session_id == session_id)
            .cloned())
    }

    async fn unsent_key_requests(&self) -> Result<Vec<KeyRequestRecord>, StoreError> {
        Ok(self.lock()?.key_requests.values().filter(|r| !r.sent).cloned().collect())
    }

    async fn withheld(
        &self,
        room_id: &RoomId,
        session_id: &str,
        sender: &UserId,
    ) -> Result<Option<WithheldRecord>, StoreError> {
        let key = (room_id.to_string(), session_id.to_owned(), sender.to_string());
        Ok(self.lock()?.withheld.get(&key).cloned())
    }

    async fn message_index(
        &self,
        room_id: &RoomId,
        session_id: &str,
        index: u32,
    ) -> Result<Option<MessageIndexRecord>, StoreError> {
        Ok(self.lock()?.indices.get(&(room_id.to_string(), session_id.to_owned(), index)).cloned())
    }

    async fn sync_token(&self) -> Result<Option<String>, StoreError> {
        Ok(self.lock()?.sync_token.clone())
    }

    async fn identity(&self, user_id: &UserId) -> Result<Option<IdentityRecord>, StoreError> {
        Ok(self.lock()?.identities.get(user_id.as_str()).cloned())
    }

    async fn private_identity(&self) -> Result<Option<PrivateIdentityRecord>, StoreError> {
        Ok(self.lock()?.private_identity.clone())
    }

    async fn sender_keys_with_olm_sessions(
        &self,
        sender_keys: &[&str],
    ) -> Result<HashSet<String>, StoreError> {
        let inner = self.lock()?;
        Ok(sender_keys
            .iter()
            .filter(|k| inner.olm_values(k).next().is_some())
            .map(|k| (*k).to_owned())
            .collect())
    }

    async fn inbound_group_sessions(
        &self,
        keys: &[(RoomId, String)],
    ) -> Result<Vec<InboundGroupSessionRecord>, StoreError> {
        let inner = self.lock()?;
        keys.iter()
            .filter_map(|(room, session)| inner.inbound.get(&(room.to_string(), session.clone())))
            .map(from_value)
            .collect()
    }

    async fn apply(&self, changes: Changes) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        // Validate and serialise everything before touching the maps: all or nothing.
        if let Some(account) = &changes.account {
            let stored: Option<AccountRecord> =
                inner.account.as_ref().map(from_value).transpose()?;
            if let Some(stored) = &stored {
                if stored.user_id != account.user_id || stored.device_id != account.device_id {
                    return Err(StoreError::AccountMismatch);
                }
            }
            check_generation(stored.as_ref(), account)?;
        }
        for s in &changes.olm_sessions {
            let key = (s.sender_key.clone(), s.session_id.clone());
            let stored = inner.olm_sessions.get(&key).map(|(generation, _)| *generation);
            check_generation_value(stored, s.generation)?;
        }
        for s in &changes.outbound_group_sessions {
            let stored = if changes.removed_outbound_group_sessions.contains(&s.room_id) {
                None
            } else {
                inner.outbound.get(s.room_id.as_str())
            };
            check_outbound_generation(
                stored.map(|r| (r.session_id.as_str(), r.generation)),
                (&s.session_id, s.generation),
            )?;
        }
        let account = changes.account.as_ref().map(to_value).transpose()?;
        // A room key share writes thousands of sessions, an import thousands
        // of Megolm sessions: serialise them on every core.
        let olm = crate::parallel::map_parallel(&changes.olm_sessions, |s| {
            let key = (s.sender_key.clone(), s.session_id.clone());
            Ok((key, (s.generation, to_value(s)?)))
        })?;
        let inbound = crate::parallel::map_parallel(&changes.inbound_group_sessions, |s| {
            Ok(((s.room_id.to_string(), s.session_id.clone()), to_value(s)?))
        })?;

        for room in &changes.removed_outbound_group_sessions {
            inner.outbound.remove(room.as_str());
        }
        for (user, device) in &changes.removed_devices {
            inner.devices.remove(&(user.to_string(), device.to_string()));
        }
        for user in &changes.untracked_users {
            inner.tracked.remove(user.as_str());
        }
        for id in &changes.removed_key_requests {
            inner.key_requests.remove(id);
        }

        if let Some(account) = account {
            inner.account = Some(account);
        }
        inner.olm_sessions.extend(olm);
        inner.inbound.extend(inbound);
        for s in changes.outbound_group_sessions {
            inner.outbound.insert(s.room_id.to_string(), s);
        }
        for d in changes.devices {
            inner.devices.insert((d.user_id.to_string(), d.device_id.to_string()), d);
        }
        for t in changes.tracked_users {
            inner.tracked.insert(t.user_id.to_string(), t);
        }
        for r in changes.key_requests {
            inner.key_requests.insert(r.request_id.clone(), r);
        }
        for w in changes.withheld {
            let key = (w.room_id.to_string(), w.session_id.clone(), w.sender.to_string());
            inner.withheld.insert(key, w);
        }
        for m in changes.message_indices {
            inner.indices.insert((m.room_id.to_string(), m.session_id.clone(), m.index), m);
        }
        if let Some(token) = changes.sync_token {
            inner.sync_token = Some(token);
        }
        for i in changes.identities {
            inner.identities.insert(i.user_id.to_string(), i);
        }
        if let Some(private) = changes.private_identity {
            inner.private_identity = Some(private);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_conformance() {
        crate::conformance::run_all(|| async { MemoryStore::new() }).await;
    }
}
