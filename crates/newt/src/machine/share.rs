//! Sending in a room: sharing the room key over Olm (and withheld notices),
//! recording who got it, encrypting events, discarding the session.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;

use newt_proto::changes::Changes;
use newt_proto::identities::{DeviceTrust, IdentityTrust};
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::megolm::OutboundSession;
use newt_proto::olm::{self, OlmSession};
use newt_proto::records::{DeviceRecord, ShareInfo};
use newt_proto::sharing::{audience_shrank, plan_share, withheld_content};
use newt_store::StoreError;

use crate::requests::OutgoingRequest;
use crate::Error;

use super::{to_device_request, Machine, Pending, RoomSettings, State, TO_DEVICE_CHUNK};

/// The chunks of one `share_room_key` call: who got the key is recorded in
/// the outbound session once, when the last chunk is reported sent (one
/// write per share instead of one per chunk). If some chunk is never
/// reported, nothing is recorded and the next share sends the key again,
/// which is harmless.
pub(super) struct ShareBatch {
    room_id: RoomId,
    session_id: String,
    remaining: usize,
    devices: Vec<(UserId, DeviceId, String, u32)>,
    withheld: Vec<(UserId, DeviceId, String)>,
}

impl Machine {
    /// Shares the room key of `room_id` with every device of `members`,
    /// rotating the outbound session first if it expired or a member or
    /// device left. Returns the to-device requests to send (they are also
    /// handed out by [`outgoing_requests`](Self::outgoing_requests) if not
    /// marked sent). Call after the members' device lists were queried and
    /// [`get_missing_sessions`](Self::get_missing_sessions) answered.
    pub async fn share_room_key(
        &self,
        room_id: &RoomId,
        members: impl IntoIterator<Item = UserId>,
        settings: &RoomSettings,
    ) -> Result<Vec<OutgoingRequest>, Error> {
        let mut st = self.inner.state.lock().await;
        let members: BTreeSet<UserId> = members.into_iter().collect();
        // Another process (e.g. a notification extension encrypting in this
        // room) may write the outbound session or an Olm session between
        // our reads and our commit: the commit is refused, nothing is
        // written, and the share runs again on what is stored now. What the
        // refused attempt encrypted was never handed out.
        match self.share_room_key_once(&mut st, room_id, &members, settings).await {
            Err(Error::Store(StoreError::StaleGeneration { .. })) => {
                self.share_room_key_once(&mut st, room_id, &members, settings).await
            }
            result => result,
        }
    }

    async fn share_room_key_once(
        &self,
        st: &mut State,
        room_id: &RoomId,
        members: &BTreeSet<UserId>,
        settings: &RoomSettings,
    ) -> Result<Vec<OutgoingRequest>, Error> {
        let now = self.now();
        let mut devices_by_user: BTreeMap<UserId, Vec<DeviceRecord>> =
            members.iter().map(|u| (u.clone(), Vec::new())).collect();
        let member_list: Vec<UserId> = members.iter().cloned().collect();
        for d in self.store().devices_of(&member_list).await? {
            if let Some(devices) = devices_by_user.get_mut(&d.user_id) {
                devices.push(d);
            }
        }
        let device_trust =
            if settings.policy.needs_device_trust() || settings.block_on_verification_violation {
                let material = self.trust_material().await?;
                let mut identities = BTreeMap::new();
                for u in members.iter().filter(|u| **u != self.inner.user_id) {
                    if let Some(i) = self.user_identity(u).await? {
                        identities.insert(u.clone(), i);
                    }
                }
                let root = material.root(&st.account);
                if settings.block_on_verification_violation {
                    let violating: Vec<UserId> = identities
                        .values()
                        .filter(|i| root.identity_trust(i) == IdentityTrust::VerificationViolation)
                        .map(|i| i.user_id().clone())
                        .collect();
                    if !violating.is_empty() {
                        return Err(Error::VerificationViolation(violating));
                    }
                }
                let mut trust = BTreeMap::new();
                for d in devices_by_user.values().flatten() {
                    let t = root.device_trust(identities.get(&d.user_id), d);
                    trust.insert((d.user_id.clone(), d.device_id.clone()), t);
                }
                trust
            } else {
                BTreeMap::new()
            };
        let trust_of = |d: &DeviceRecord| {
            device_trust
                .get(&(d.user_id.clone(), d.device_id.clone()))
                .copied()
                .unwrap_or(DeviceTrust::Unknown)
        };
        let mut changes = Changes::default();
        // The store's record, not the cache: it has other processes' writes.
        // An update is one generation past the stored record; a new session
        // starts at generation 0 (the store's rule for outbound sessions).
        let mut outbound = match self.store().outbound_group_session(room_id).await? {
            Some(r) => {
                let mut s = OutboundSession::from_record(r);
                if s.expired(&settings.rotation, now)
                    || audience_shrank(&s, members, &devices_by_user, trust_of, settings.policy)
                {
                    None
                } else {
                    s.meta.generation += 1;
                    Some(s)
                }
            }
            None => None,
        };
        if outbound.is_none() {
            let s = OutboundSession::new(room_id.clone(), settings.rotation.clone(), now);
            changes.inbound_group_sessions.push(s.own_inbound(&st.account));
            outbound = Some(s);
        }
        let Some(outbound) = outbound else {
            return Err(Error::NoOutboundSession(room_id.clone()));
        };

        let all: Vec<DeviceRecord> = devices_by_user.into_values().flatten().collect();
        // Every recipient's Olm sessions in one read, unpickled on every core.
        let keys: BTreeSet<&str> = all.iter().map(|d| d.curve25519.as_str()).collect();
        let keys: Vec<&str> = keys.into_iter().collect();
        let mut sessions: BTreeMap<String, Vec<OlmSession>> =
            keys.iter().map(|k| ((*k).to_owned(), Vec::new())).collect();
        let records = self.store().olm_sessions_of(&keys).await?;
        for live in newt_proto::parallel::map_owned(records, 64, OlmSession::from_record) {
            if let Some(list) = sessions.get_mut(&live.sender_key) {
                list.push(live);
            }
        }
        let plan = plan_share(
            &st.account,
            &outbound,
            &all,
            |d| sessions.get(&d.curve25519).is_some_and(|s| !s.is_empty()),
            trust_of,
            settings.policy,
        );
        let room_key = outbound.room_key_content(settings.shared_history);
        let index = outbound.session.message_index();
        let mut messages = Vec::new();
        let mut shared = Vec::new();
        // Encrypt to each recipient key on every core (its sessions move into
        // the job); a second device with the same key, if any, waits for a
        // second, sequential round.
        let mut jobs = Vec::with_capacity(plan.share.len());
        let mut second_round = Vec::new();
        changes.olm_sessions.reserve(plan.share.len());
        for d in &plan.share {
            match sessions.remove(&d.curve25519) {
                Some(live) => jobs.push((d, live)),
                None => second_round.push(d),
            }
        }
        let plaintext = olm::OlmPlaintext::new(&st.account, "m.room_key", &room_key)
            .map_err(|_| Error::Internal("olm encryption failed"))?;
        let encrypt_to = |d: &DeviceRecord, live: &mut [OlmSession]| {
            olm::preferred_session(live).map(|i| {
                plaintext.encrypt(&mut live[i], d).map(|content| (content, live[i].to_record()))
            })
        };
        let mut outcomes = Vec::with_capacity(plan.share.len());
        let encrypted = newt_proto::parallel::map_owned(jobs, 16, |(d, mut live)| {
            let result = encrypt_to(d, &mut live);
            (d, live, result)
        });
        for (d, live, result) in encrypted {
            sessions.insert(d.curve25519.clone(), live);
            outcomes.push((d, result));
        }
        for d in second_round {
            let result = sessions.get_mut(&d.curve25519).and_then(|live| encrypt_to(d, live));
            outcomes.push((d, result));
        }
        // A recipient without an Olm session gets nothing here.
        for (d, result) in outcomes {
            let Some(result) = result else { continue };
            let (content, record) = result.map_err(|_| Error::Internal("olm encryption failed"))?;
            changes.olm_sessions.push(record);
            messages.push((d.user_id.clone(), d.device_id.to_string(), content));
            shared.push((d.user_id.clone(), d.device_id.clone(), d.curve25519.clone(), index));
        }
        let mut withheld_messages = Vec::new();
        let mut withheld = Vec::new();
        for (d, code) in &plan.withhold {
            withheld_messages.push((
                d.user_id.clone(),
                d.device_id.to_string(),
                withheld_content(&st.account, &outbound, *code),
            ));
            withheld.push((d.user_id.clone(), d.device_id.clone(), code.as_str().to_owned()));
        }
        let session_id = outbound.session_id();
        changes.outbound_group_sessions.push(outbound.to_record());
        st.outbound.remove(room_id);
        self.commit(st, changes, false).await?;
        st.outbound.insert(room_id.clone(), outbound);

        let mut out = Vec::new();
        let batch = st.next_id();
        let chunk_count = messages.chunks(TO_DEVICE_CHUNK).count()
            + withheld_messages.chunks(TO_DEVICE_CHUNK).count();
        if chunk_count > 0 {
            st.share_batches.insert(
                batch.clone(),
                ShareBatch {
                    room_id: room_id.clone(),
                    session_id: session_id.clone(),
                    remaining: chunk_count,
                    devices: Vec::new(),
                    withheld: Vec::new(),
                },
            );
        }
        let mut shared_iter = shared.into_iter();
        for chunk in newt_proto::parallel::owned_chunks(messages, TO_DEVICE_CHUNK) {
            let id = st.next_id();
            let devices: Vec<_> = shared_iter.by_ref().take(chunk.len()).collect();
            let pending =
                Pending::RoomKeyShare { batch: batch.clone(), devices, withheld: Vec::new() };
            st.in_flight.insert(id.clone(), pending);
            out.push(to_device_request(id, "m.room.encrypted", chunk));
        }
        let mut withheld_iter = withheld.into_iter();
        for chunk in newt_proto::parallel::owned_chunks(withheld_messages, TO_DEVICE_CHUNK) {
            let id = st.next_id();
            let w: Vec<_> = withheld_iter.by_ref().take(chunk.len()).collect();
            let pending =
                Pending::RoomKeyShare { batch: batch.clone(), devices: Vec::new(), withheld: w };
            st.in_flight.insert(id.clone(), pending);
            out.push(to_device_request(id, "m.room_key.withheld", chunk));
        }
        Ok(out)
    }

    /// One chunk of a share was sent; when it was the last of its share,
    /// who got the key (and who was told why not) is recorded in the
    /// outbound session (see [`ShareBatch`]).
    pub(super) async fn share_chunk_sent(
        &self,
        st: &mut State,
        batch: &str,
        devices: Vec<(UserId, DeviceId, String, u32)>,
        withheld: Vec<(UserId, DeviceId, String)>,
    ) -> Result<(), Error> {
        let Some(b) = st.share_batches.get_mut(batch) else { return Ok(()) };
        b.devices.extend(devices);
        b.withheld.extend(withheld);
        b.remaining -= 1;
        if b.remaining > 0 {
            return Ok(());
        }
        let Some(b) = st.share_batches.remove(batch) else { return Ok(()) };
        // The cached session if it is still this one; if another
        // process wrote it since, the commit is refused: re-read.
        let mut cached = st.outbound.remove(&b.room_id);
        for attempt in 0..2 {
            let mut session = match cached.take() {
                Some(s) if s.session_id() == b.session_id => s,
                _ => match self.store().outbound_group_session(&b.room_id).await? {
                    Some(r) if r.session_id == b.session_id => OutboundSession::from_record(r),
                    _ => return Ok(()), // rotated or discarded meanwhile
                },
            };
            let shared_with = Arc::make_mut(&mut session.meta.shared_with);
            for (u, d, sender_key, message_index) in &b.devices {
                let info =
                    ShareInfo { sender_key: sender_key.clone(), message_index: *message_index };
                shared_with.entry(u.clone()).or_default().insert(d.clone(), info);
            }
            let withheld_to = Arc::make_mut(&mut session.meta.withheld_to);
            for (u, d, code) in &b.withheld {
                withheld_to.entry(u.clone()).or_default().insert(d.clone(), code.clone());
            }
            match self.commit_outbound(st, &b.room_id, session).await {
                Err(Error::Store(StoreError::StaleGeneration { .. })) if attempt == 0 => {}
                result => return result,
            }
        }
        Ok(())
    }

    /// Stores `session` one generation on and, once stored, caches it as
    /// the room's live session. If another process wrote the room's session
    /// since this copy was loaded, the store refuses with
    /// [`StoreError::StaleGeneration`], nothing is written or cached, and
    /// the caller reloads from the store.
    async fn commit_outbound(
        &self,
        st: &mut State,
        room_id: &RoomId,
        mut session: OutboundSession,
    ) -> Result<(), Error> {
        session.meta.generation += 1;
        let changes =
            Changes { outbound_group_sessions: vec![session.to_record()], ..Default::default() };
        self.commit(st, changes, false).await?;
        st.outbound.insert(room_id.clone(), session);
        Ok(())
    }

    /// Encrypts a room event with the room's outbound session. The advanced
    /// ratchet is committed before the ciphertext is returned.
    pub async fn encrypt_room_event(
        &self,
        room_id: &RoomId,
        event_type: &str,
        content: Value,
    ) -> Result<Value, Error> {
        let mut st = self.inner.state.lock().await;
        let now = self.now();
        // The live session is cached; every advance is committed (generation
        // checked) before the ciphertext is returned. If another process
        // wrote the room's session since, the commit is refused: reload,
        // encrypt again, and never return the refused ciphertext.
        for attempt in 0..2 {
            let cached = if attempt == 0 { st.outbound.remove(room_id) } else { None };
            let mut session = match cached {
                Some(s) => s,
                None => OutboundSession::from_record(
                    self.store()
                        .outbound_group_session(room_id)
                        .await?
                        .ok_or_else(|| Error::NoOutboundSession(room_id.clone()))?,
                ),
            };
            let settings = session.meta.settings.clone();
            if session.expired(&settings, now) {
                return Err(Error::NoOutboundSession(room_id.clone()));
            }
            let encrypted = session.encrypt_ref(&st.account, event_type, &content);
            match self.commit_outbound(&mut st, room_id, session).await {
                Err(Error::Store(StoreError::StaleGeneration { .. })) if attempt == 0 => {}
                result => return result.map(|()| encrypted),
            }
        }
        Err(Error::NoOutboundSession(room_id.clone()))
    }

    /// Discards the outbound session of a room, so the next share rotates.
    pub async fn discard_room_key(&self, room_id: &RoomId) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        st.outbound.remove(room_id);
        let changes = Changes {
            removed_outbound_group_sessions: vec![room_id.clone()],
            ..Default::default()
        };
        self.commit(&mut st, changes, false).await
    }
}
