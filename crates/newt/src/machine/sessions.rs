//! Olm session establishment: the `/keys/claim` for devices without a
//! session (or with a wedged one), and its answer; and the key requests
//! that wait for a session with their requester (claimed for by
//! `outgoing_requests`, answered over the new session).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde_json::{json, Value};

use newt_proto::changes::Changes;
use newt_proto::ids::{DeviceId, UserId};
use newt_proto::key_requests::{answer_request, check_requester};
use newt_proto::olm::{self, handle_keys_claim, keys_claim_body, OlmSession};
use newt_proto::records::DeviceRecord;

use crate::requests::{OutgoingRequest, RequestKind};
use crate::Error;

use super::identity::TrustMaterial;
use super::{to_device_request, Machine, Pending, State, CLAIM_FAILURE_BACKOFF_MS};

/// Encrypted `m.forwarded_room_key`s for one device, oldest request first.
type Answers = Vec<(DeviceRecord, Vec<Value>)>;

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
        let material = if st.waiting_key_requests.is_empty() {
            None
        } else {
            Some(self.trust_material().await?)
        };
        let mut dummies = Vec::new();
        let mut answers: Answers = Vec::new();
        for (u, d, record) in outcome.sessions {
            let key = (u, d);
            st.claim_failures.remove(&key);
            let unwedge = st.wedged.remove(&key);
            let waiting = st.waiting_key_requests.has_device(&key.0, &key.1);
            let device = match devices.get(&key) {
                Some(device) if unwedge || waiting => device,
                _ => {
                    changes.olm_sessions.push(record);
                    continue;
                }
            };
            let mut live = OlmSession::from_record(record);
            if unwedge {
                // A fresh session to unwedge the channel: announce it with m.dummy.
                st.last_unwedge.insert(device.curve25519.clone(), now);
                if let Ok(c) = olm::encrypt(&st.account, &mut live, device, "m.dummy", json!({})) {
                    dummies.push((key.0.clone(), key.1.to_string(), c));
                }
            }
            if let (true, Some(material)) = (waiting, &material) {
                let forwarded = self.answer_waiting(st, material, device, &mut live).await?;
                answers.push((device.clone(), forwarded));
            }
            changes.olm_sessions.push(live.to_record());
        }
        self.commit(st, changes, false).await?;
        if !dummies.is_empty() {
            let id = st.next_id();
            st.queued.push(to_device_request(id, "m.room.encrypted", dummies));
        }
        Self::queue_answers(st, answers);
        Ok(())
    }

    /// What `outgoing_requests` does for the key requests waiting for an
    /// Olm session: drops those whose device is no longer a trusted own
    /// device (blacklisted, deleted, trust withdrawn), answers those whose
    /// device has a session by now (it sent us a pre-key message, or the
    /// app claimed one), and returns a `/keys/claim` for the rest — unless
    /// a claim is in flight (its answer is awaited) or the device's last
    /// claim failed less than 15 minutes ago.
    pub(super) async fn serve_waiting_key_requests(
        &self,
        st: &mut State,
    ) -> Result<Option<OutgoingRequest>, Error> {
        if st.waiting_key_requests.is_empty() {
            return Ok(None);
        }
        let now = self.now();
        let users: BTreeSet<UserId> =
            st.waiting_key_requests.devices().into_iter().map(|(u, _)| u).collect();
        let users: Vec<UserId> = users.into_iter().collect();
        let mut devices = BTreeMap::new();
        for d in self.store().devices_of(&users).await? {
            devices.insert((d.user_id.clone(), d.device_id.clone()), d);
        }
        let material = self.trust_material().await?;
        let own_curve = st.account.curve25519_key().to_base64();
        {
            let root = material.root(&st.account);
            let own_user = &self.inner.user_id;
            st.waiting_key_requests.retain(|r| {
                let device = devices.get(&(r.sender.clone(), r.device_id.clone()));
                check_requester(&root, own_user, &own_curve, r, device).is_ok()
            });
        }
        let waiting: Vec<&DeviceRecord> =
            st.waiting_key_requests.devices().iter().filter_map(|k| devices.get(k)).collect();
        let keys: Vec<&str> = waiting.iter().map(|d| d.curve25519.as_str()).collect();
        let with_session: HashSet<String> =
            self.store().sender_keys_with_olm_sessions(&keys).await?;
        let mut changes = Changes::default();
        let mut answers: Answers = Vec::new();
        let mut missing = Vec::new();
        for device in waiting {
            if !with_session.contains(&device.curve25519) {
                missing.push((device.user_id.clone(), device.device_id.clone()));
                continue;
            }
            let mut sessions: Vec<OlmSession> = self
                .store()
                .olm_sessions(&device.curve25519)
                .await?
                .into_iter()
                .map(OlmSession::from_record)
                .collect();
            let Some(i) = olm::preferred_session(&sessions) else { continue };
            let forwarded = self.answer_waiting(st, &material, device, &mut sessions[i]).await?;
            changes.olm_sessions.push(sessions[i].to_record());
            answers.push((device.clone(), forwarded));
        }
        if !answers.is_empty() {
            self.commit(st, changes, false).await?;
            Self::queue_answers(st, answers);
        }
        let claim_in_flight = st.in_flight.values().any(|p| matches!(p, Pending::KeysClaim(_)));
        missing.retain(|key| st.claim_failures.get(key).is_none_or(|until| *until <= now));
        if claim_in_flight || missing.is_empty() {
            return Ok(None);
        }
        let id = st.next_id();
        let body = keys_claim_body(&missing);
        st.in_flight.insert(id.clone(), Pending::KeysClaim(missing));
        Ok(Some(OutgoingRequest { id, kind: RequestKind::KeysClaim { body } }))
    }

    /// Encrypts, on `session`, the answers to the key requests waiting for
    /// `device`, each decided again by `answer_request` (the device may
    /// have been blacklisted, or the session be gone, since it asked);
    /// refused ones are left out. The requests stay waiting until
    /// [`queue_answers`](Self::queue_answers), after the commit.
    async fn answer_waiting(
        &self,
        st: &State,
        material: &TrustMaterial,
        device: &DeviceRecord,
        session: &mut OlmSession,
    ) -> Result<Vec<Value>, Error> {
        let own_curve = st.account.curve25519_key().to_base64();
        let mut out = Vec::new();
        for request in st.waiting_key_requests.of_device(&device.user_id, &device.device_id) {
            let inbound = match (&request.room_id, &request.session_id) {
                (Some(r), Some(s)) => self.store().inbound_group_session(r, s).await?,
                _ => None,
            };
            let root = material.root(&st.account);
            let answer = answer_request(
                &root,
                &self.inner.user_id,
                &own_curve,
                &request,
                Some(device),
                inbound.as_ref(),
            );
            let Ok(forwarded) = answer else { continue };
            if let Ok(c) =
                olm::encrypt(&st.account, session, device, "m.forwarded_room_key", forwarded)
            {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// After the commit of the sessions they advanced: the waiting requests
    /// of the answered devices are done, and their answers are queued (the
    /// n-th answer of every device in the n-th to-device request).
    fn queue_answers(st: &mut State, answers: Answers) {
        let mut rounds: Vec<Vec<(UserId, String, Value)>> = Vec::new();
        for (device, forwarded) in answers {
            st.waiting_key_requests.take_device(&device.user_id, &device.device_id);
            for (n, content) in forwarded.into_iter().enumerate() {
                if rounds.len() <= n {
                    rounds.push(Vec::new());
                }
                rounds[n].push((device.user_id.clone(), device.device_id.to_string(), content));
            }
        }
        for messages in rounds {
            let id = st.next_id();
            st.queued.push(to_device_request(id, "m.room.encrypted", messages));
        }
    }
}
