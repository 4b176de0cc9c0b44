//! Olm session establishment: the `/keys/claim` for devices without a
//! session (or with a wedged one), and its answer.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde_json::{json, Value};

use newt_proto::changes::Changes;
use newt_proto::ids::{DeviceId, UserId};
use newt_proto::olm::{self, handle_keys_claim, keys_claim_body, OlmSession};

use crate::requests::{OutgoingRequest, RequestKind};
use crate::Error;

use super::{to_device_request, Machine, Pending, State, CLAIM_FAILURE_BACKOFF_MS};

impl Machine {
    /// The `/keys/claim` request for devices of `users` that have no Olm
    /// session yet (and for wedged channels), or `None` if there are none.
    /// Devices whose last claim failed are skipped for 15 minutes.
    pub async fn get_missing_sessions(
        &self,
        users: impl IntoIterator<Item = UserId>,
    ) -> Result<Option<OutgoingRequest>, Error> {
        let mut st = self.inner.state.lock().await;
        let now = self.now();
        let own_curve = st.account.curve25519_key().to_base64();
        if st.in_flight.values().any(|p| matches!(p, Pending::KeysClaim(_))) {
            return Ok(None);
        }
        let users: BTreeSet<UserId> = users.into_iter().collect();
        let users: Vec<UserId> = users.into_iter().collect();
        let mut candidates = Vec::new();
        for d in self.store().devices_of(&users).await? {
            if d.deleted || d.curve25519 == own_curve {
                continue;
            }
            let key = (d.user_id, d.device_id);
            if st.wedged.contains(&key)
                || st.claim_failures.get(&key).is_some_and(|until| *until > now)
            {
                continue;
            }
            candidates.push((key, d.curve25519));
        }
        // One batched read: which of these devices already have a session.
        let keys: Vec<&str> = candidates.iter().map(|(_, k)| k.as_str()).collect();
        let with_session: HashSet<String> =
            self.store().sender_keys_with_olm_sessions(&keys).await?;
        let mut missing: Vec<(UserId, DeviceId)> = st.wedged.iter().cloned().collect();
        missing.extend(
            candidates
                .into_iter()
                .filter(|(_, curve)| !with_session.contains(curve))
                .map(|(k, _)| k),
        );
        if missing.is_empty() {
            return Ok(None);
        }
        // Sorted and unique, as the request body and the retry bookkeeping expect.
        missing.sort_unstable();
        missing.dedup();
        let id = st.next_id();
        let body = keys_claim_body(&missing);
        st.in_flight.insert(id.clone(), Pending::KeysClaim(missing));
        Ok(Some(OutgoingRequest { id, kind: RequestKind::KeysClaim { body } }))
    }

    /// The `/keys/claim` answer: new Olm sessions (an `m.dummy` over each
    /// one that replaces a wedged channel), and a back-off for failures.
    pub(super) async fn handle_claim_response(
        &self,
        st: &mut State,
        requested: &[(UserId, DeviceId)],
        response: &Value,
    ) -> Result<(), Error> {
        if !response.is_object() {
            return Err(Error::BadResponse("keys/claim: not an object"));
        }
        let now = self.now();
        let mut devices = BTreeMap::new();
        let users: BTreeSet<&UserId> = requested.iter().map(|(u, _)| u).collect();
        let users: Vec<UserId> = users.into_iter().cloned().collect();
        for d in self.store().devices_of(&users).await? {
            devices.insert((d.user_id.clone(), d.device_id.clone()), d);
        }
        let outcome = handle_keys_claim(&st.account, requested, &devices, response, now);
        let mut changes = Changes::default();
        for (u, d, _) in &outcome.failures {
            st.claim_failures.insert((u.clone(), d.clone()), now + CLAIM_FAILURE_BACKOFF_MS);
        }
        let mut dummies = Vec::new();
        for (u, d, record) in outcome.sessions {
            let key = (u, d);
            st.claim_failures.remove(&key);
            if st.wedged.remove(&key) {
                // A fresh session to unwedge the channel: announce it with m.dummy.
                if let Some(device) = devices.get(&key) {
                    let mut live = OlmSession::from_record(record);
                    st.last_unwedge.insert(device.curve25519.clone(), now);
                    if let Ok(c) =
                        olm::encrypt(&st.account, &mut live, device, "m.dummy", json!({}))
                    {
                        dummies.push((key.0.clone(), key.1.to_string(), c));
                    }
                    changes.olm_sessions.push(live.to_record());
                    continue;
                }
            }
            changes.olm_sessions.push(record);
        }
        self.commit(st, changes, false).await?;
        if !dummies.is_empty() {
            let id = st.next_id();
            st.queued.push(to_device_request(id, "m.room.encrypted", dummies));
        }
        Ok(())
    }
}
