//! Sending in a room: sharing the room key over Olm (and withheld notices),
//! recording who got it, encrypting events, discarding the session.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use newt_proto::changes::Changes;
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::megolm::OutboundSession;
use newt_proto::sharing::{
    self, recipient_keys, KeyDelivery, MemberTrust, ShareError, ShareInput, WithheldDelivery,
};
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
    devices: Vec<KeyDelivery>,
    withheld: Vec<WithheldDelivery>,
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
        let member_list: Vec<UserId> = members.iter().cloned().collect();
        let devices = self.store().devices_of(&member_list).await?;
        // Identities and our private keys only when the settings look at
        // trust.
        let trust_material = if settings.needs_trust() {
            let material = self.trust_material().await?;
            let mut identities = BTreeMap::new();
            for u in members.iter().filter(|u| **u != self.inner.user_id) {
                if let Some(i) = self.user_identity(u).await? {
                    identities.insert(u.clone(), i);
                }
            }
            Some((material, identities))
        } else {
            None
        };
        // The store's record, not the cache: it has other processes' writes.
        let stored = self.store().outbound_group_session(room_id).await?;
        let olm_sessions = self.store().olm_sessions_of(&recipient_keys(&devices)).await?;
        let roots = trust_material
            .as_ref()
            .map(|(material, identities)| (material.root(&st.account), identities));
        let trust = roots.as_ref().map(|(root, identities)| MemberTrust { root, identities });
        let input = ShareInput { room_id, members, devices, stored, olm_sessions, trust, settings };
        let share = sharing::share(&st.account, input, now).map_err(share_error)?;

        let session_id = share.outbound.session_id();
        st.outbound.remove(room_id);
        self.commit(st, share.changes, false).await?;
        st.outbound.insert(room_id.clone(), share.outbound);

        let mut out = Vec::new();
        let batch = st.next_id();
        let chunk_count = share.room_keys.len().div_ceil(TO_DEVICE_CHUNK)
            + share.withheld.len().div_ceil(TO_DEVICE_CHUNK);
        if chunk_count > 0 {
            st.share_batches.insert(
                batch.clone(),
                ShareBatch {
                    room_id: room_id.clone(),
                    session_id,
                    remaining: chunk_count,
                    devices: Vec::new(),
                    withheld: Vec::new(),
                },
            );
        }
        for chunk in newt_proto::parallel::owned_chunks(share.room_keys, TO_DEVICE_CHUNK) {
            let id = st.next_id();
            let (devices, messages) = split_chunk(chunk, |d| (&d.user_id, &d.device_id));
            let pending =
                Pending::RoomKeyShare { batch: batch.clone(), devices, withheld: Vec::new() };
            st.in_flight.insert(id.clone(), pending);
            out.push(to_device_request(id, "m.room.encrypted", messages));
        }
        for chunk in newt_proto::parallel::owned_chunks(share.withheld, TO_DEVICE_CHUNK) {
            let id = st.next_id();
            let (withheld, messages) = split_chunk(chunk, |w| (&w.user_id, &w.device_id));
            let pending =
                Pending::RoomKeyShare { batch: batch.clone(), devices: Vec::new(), withheld };
            st.in_flight.insert(id.clone(), pending);
            out.push(to_device_request(id, "m.room_key.withheld", messages));
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
        devices: Vec<KeyDelivery>,
        withheld: Vec<WithheldDelivery>,
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
            let changes = sharing::record_delivery(&mut session, &b.devices, &b.withheld);
            match self.commit_outbound(st, &b.room_id, session, changes).await {
                Err(Error::Store(StoreError::StaleGeneration { .. })) if attempt == 0 => {}
                result => return result,
            }
        }
        Ok(())
    }

    /// Commits `changes`, which write `session` (at its next generation),
    /// and, once stored, caches it as the room's live session. If another
    /// process wrote the room's session since this copy was loaded, the
    /// store refuses with [`StoreError::StaleGeneration`], nothing is
    /// written or cached, and the caller reloads from the store.
    async fn commit_outbound(
        &self,
        st: &mut State,
        room_id: &RoomId,
        session: OutboundSession,
        changes: Changes,
    ) -> Result<(), Error> {
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
            session.meta.generation += 1;
            let changes = Changes {
                outbound_group_sessions: vec![session.to_record()],
                ..Default::default()
            };
            match self.commit_outbound(&mut st, room_id, session, changes).await {
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

/// The core's refusal as the driver's error.
fn share_error(e: ShareError) -> Error {
    match e {
        ShareError::VerificationViolation(users) => Error::VerificationViolation(users),
        ShareError::TrustMissing => Error::Internal("share: trust not loaded"),
        _ => Error::Internal("olm encryption failed"),
    }
}

/// A chunk of (recipient, content) as the recipients (for the follow-up)
/// and the (user, device, content) triples of a to-device request.
fn split_chunk<T>(
    chunk: Vec<(T, Value)>,
    device_of: impl Fn(&T) -> (&UserId, &DeviceId),
) -> (Vec<T>, Vec<(UserId, String, Value)>) {
    let mut recipients = Vec::with_capacity(chunk.len());
    let mut messages = Vec::with_capacity(chunk.len());
    for (recipient, content) in chunk {
        let (user_id, device_id) = device_of(&recipient);
        messages.push((user_id.clone(), device_id.to_string(), content));
        recipients.push(recipient);
    }
    (recipients, messages)
}
