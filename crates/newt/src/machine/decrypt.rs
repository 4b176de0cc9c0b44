//! Decrypting room events (one, or a batch run ahead on every core) with
//! the cache of unpickled inbound sessions, and asking for missing keys.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use newt_proto::changes::Changes;
use newt_proto::devices::parse_device_keys;
use newt_proto::identities::UserIdentity;
use newt_proto::ids::{RoomId, UserId};
use newt_proto::megolm::{
    decrypt_room_event_with, finish_room_event, live_inbound, megolm_decrypt, needs_cross_signing,
    parse_room_event, CheckedPlaintext, DecryptedRoomEvent, EncryptedRoomEvent, MegolmError,
    SenderContext,
};
use newt_proto::records::{
    DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, LocalTrust, MessageIndexRecord,
};
use newt_proto::vodozemac::megolm::{InboundGroupSession, MegolmMessage};

use crate::Error;

use super::{Machine, State, TrustMaterial, INBOUND_CACHE_SIZE};

/// A bounded LRU of unpickled inbound Megolm sessions with their records.
/// An entry is dropped when this process writes its session and on any
/// failed commit; a session another process improved (a lower first index)
/// is reloaded when the cached copy cannot decrypt an event.
#[derive(Default)]
pub(super) struct InboundCache {
    entries: HashMap<(RoomId, String), CachedInbound>,
    tick: u64,
}

struct CachedInbound {
    record: InboundGroupSessionRecord,
    live: InboundGroupSession,
    used: u64,
}

/// What one decrypt call (one event, or a batch) reads once: the senders'
/// devices and identities, our trust material, and the replay records of the
/// batch not yet committed, by (session ID, index).
#[derive(Default)]
struct DecryptContext {
    devices: HashMap<UserId, Vec<DeviceRecord>>,
    owners: HashMap<UserId, Option<UserIdentity>>,
    material: Option<Arc<TrustMaterial>>,
    pending: HashMap<(String, u32), MessageIndexRecord>,
}

impl InboundCache {
    fn get_mut(&mut self, key: &(RoomId, String)) -> Option<&mut CachedInbound> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(key)?;
        entry.used = tick;
        Some(entry)
    }

    fn insert(&mut self, record: InboundGroupSessionRecord, live: InboundGroupSession) {
        if self.entries.len() >= INBOUND_CACHE_SIZE {
            let oldest = self.entries.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.tick += 1;
        let key = (record.room_id.clone(), record.session_id.clone());
        self.entries.insert(key, CachedInbound { record, live, used: self.tick });
    }

    pub(super) fn remove(&mut self, room_id: &RoomId, session_id: &str) {
        if !self.entries.is_empty() {
            self.entries.remove(&(room_id.clone(), session_id.to_owned()));
        }
    }

    /// Drops every entry (a commit failed: the cache may be ahead of the store).
    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }
}

impl Machine {
    /// Decrypts an `m.room.encrypted` room event (the whole event JSON).
    ///
    /// When the key is missing the error is [`MegolmError::MissingSession`],
    /// carrying the withheld notice if the sender told us why.
    pub async fn decrypt_room_event(
        &self,
        room_id: &RoomId,
        event: &Value,
    ) -> Result<DecryptedRoomEvent, Error> {
        let parsed = parse_room_event(event)?;
        // The replay check reads then writes: hold the lock so two decrypts
        // of different events at one index cannot both pass.
        let mut st = self.inner.state.lock().await;
        let mut ctx = DecryptContext::default();
        let (decrypted, record) =
            self.decrypt_parsed(&mut st, &mut ctx, room_id, parsed, None).await?;
        if let Some(record) = record {
            let changes = Changes { message_indices: vec![record], ..Default::default() };
            self.commit(&mut st, changes, false).await?;
        }
        Ok(decrypted)
    }

    /// Decrypts several `m.room.encrypted` events of one room (a timeline
    /// page, a backfill) with the same checks as
    /// [`decrypt_room_event`](Self::decrypt_room_event), one result per
    /// event in order. The replay records of the whole batch are committed
    /// together, once, before any plaintext is returned; a replay is
    /// detected within the batch as well as against earlier batches. The
    /// sender's devices and identity are read once per sender per batch.
    /// A storage failure fails the whole call (and returns no plaintext).
    pub async fn decrypt_room_events(
        &self,
        room_id: &RoomId,
        events: &[Value],
    ) -> Result<Vec<Result<DecryptedRoomEvent, Error>>, Error> {
        let mut st = self.inner.state.lock().await;
        let mut ctx = DecryptContext::default();
        let mut out = Vec::with_capacity(events.len());
        let parsed: Vec<_> = events.iter().map(parse_room_event).collect();
        let mut ahead = self.decrypt_ahead(&mut st, room_id, &parsed).await?.into_iter();
        for parsed in parsed {
            let ahead = ahead.next().flatten();
            let parsed = match parsed {
                Ok(p) => p,
                Err(e) => {
                    out.push(Err(e.into()));
                    continue;
                }
            };
            match self.decrypt_parsed(&mut st, &mut ctx, room_id, parsed, ahead).await {
                Ok((decrypted, record)) => {
                    if let Some(record) = record {
                        ctx.pending.insert((record.session_id.clone(), record.index), record);
                    }
                    out.push(Ok(decrypted));
                }
                Err(Error::Store(e)) => return Err(e.into()),
                Err(e) => out.push(Err(e)),
            }
        }
        let records = ctx.pending.into_values().collect();
        let changes = Changes { message_indices: records, ..Default::default() };
        self.commit(&mut st, changes, false).await?;
        Ok(out)
    }

    /// The Megolm step of a batch's events (signature, MAC, cipher), run
    /// ahead on every core: for each session with enough events in the
    /// batch, each thread decrypts a contiguous share of them with its own
    /// copy of the cached session. An event left `None` (a small group, an
    /// unknown session, a failure) takes the ordinary path, which decrypts
    /// it again and reports the error; nothing here is a verdict.
    async fn decrypt_ahead(
        &self,
        st: &mut State,
        room_id: &RoomId,
        parsed: &[Result<EncryptedRoomEvent, MegolmError>],
    ) -> Result<Vec<Option<CheckedPlaintext>>, Error> {
        const MIN_PER_THREAD: usize = 32;
        let mut ahead = vec![None; parsed.len()];
        let mut by_session: BTreeMap<&str, Vec<(usize, &MegolmMessage)>> = BTreeMap::new();
        for (i, p) in parsed.iter().enumerate() {
            if let Ok(p) = p {
                by_session.entry(p.session_id.as_str()).or_default().push((i, &p.message));
            }
        }
        for (session_id, messages) in by_session {
            let threads = newt_proto::parallel::threads_for(messages.len(), MIN_PER_THREAD);
            if threads < 2 {
                continue;
            }
            let key = (room_id.clone(), session_id.to_owned());
            if st.inbound.get_mut(&key).is_none() {
                let Some(record) = self.store().inbound_group_session(room_id, session_id).await?
                else {
                    continue;
                };
                let Ok(live) = live_inbound(&record) else { continue };
                st.inbound.insert(record, live);
            }
            let Some(entry) = st.inbound.get_mut(&key) else { continue };
            let per_thread = messages.len().div_ceil(threads);
            let jobs: Vec<_> = newt_proto::parallel::owned_chunks(messages, per_thread)
                .into_iter()
                .map(|chunk| (InboundGroupSession::from_pickle(entry.live.pickle()), chunk))
                .collect();
            let done = newt_proto::parallel::map_owned(jobs, 1, |(mut copy, chunk)| {
                chunk
                    .into_iter()
                    .map(|(i, message)| (i, megolm_decrypt(&mut copy, message).ok()))
                    .collect::<Vec<_>>()
            });
            for (i, decrypted) in done.into_iter().flatten() {
                ahead[i] = decrypted;
            }
        }
        Ok(ahead)
    }

    /// One decryption under the state lock: the session from the cache (or
    /// the store), what the core asks for to judge the sender (their
    /// devices; their identity and our trust root only when
    /// [`needs_cross_signing`]), then one core call for every check of
    /// [`decrypt_room_event_with`], the replay record (`ctx.pending` first,
    /// then the store) and the sender's final trust. `ahead` is the event's
    /// Megolm decryption if [`Self::decrypt_ahead`] did it. Returns the new
    /// replay record to commit, if the index is new.
    async fn decrypt_parsed(
        &self,
        st: &mut State,
        ctx: &mut DecryptContext,
        room_id: &RoomId,
        parsed: EncryptedRoomEvent,
        mut ahead: Option<CheckedPlaintext>,
    ) -> Result<(DecryptedRoomEvent, Option<MessageIndexRecord>), Error> {
        let key = (room_id.clone(), parsed.session_id.clone());
        if !ctx.devices.contains_key(&parsed.sender) {
            let mut devices = self.store().devices(&parsed.sender).await?;
            if parsed.sender == self.inner.user_id {
                // Our own device is not stored among the devices; it is trusted by definition.
                if let Ok(mut own) = parse_device_keys(
                    &self.inner.user_id,
                    self.inner.device_id.as_str(),
                    &st.account.device_keys(),
                ) {
                    own.local_trust = LocalTrust::Verified;
                    devices.push(own);
                }
            }
            ctx.devices.insert(parsed.sender.clone(), devices);
        }
        let index = parsed.message.message_index();
        let seen = match ctx.pending.get(&(parsed.session_id.clone(), index)) {
            Some(record) => Some(record.clone()),
            None => self.store().message_index(room_id, &parsed.session_id, index).await?,
        };
        let own_user = parsed.sender == self.inner.user_id;
        let mut result = None;
        for attempt in 0..2 {
            let cached = attempt == 0 && st.inbound.get_mut(&key).is_some();
            if !cached {
                st.inbound.remove(&key.0, &key.1);
                let Some(record) =
                    self.store().inbound_group_session(room_id, &parsed.session_id).await?
                else {
                    let withheld = self
                        .store()
                        .withheld(room_id, &parsed.session_id, &parsed.sender)
                        .await?
                        .map(Box::new);
                    return Err(MegolmError::MissingSession {
                        room_id: room_id.clone(),
                        session_id: parsed.session_id,
                        withheld,
                    }
                    .into());
                };
                let live = live_inbound(&record)?;
                st.inbound.insert(record, live);
            }
            let sender_devices = ctx.devices.get(&parsed.sender).map_or(&[][..], Vec::as_slice);
            let entry = st.inbound.get_mut(&key).ok_or(Error::Internal("session cache"))?;
            if needs_cross_signing(&entry.record, sender_devices) {
                // Read once per sender, and our material once, per call.
                if !own_user && !ctx.owners.contains_key(&parsed.sender) {
                    let owner = self.user_identity(&parsed.sender).await?;
                    ctx.owners.insert(parsed.sender.clone(), owner);
                }
                let owner_known =
                    own_user || ctx.owners.get(&parsed.sender).is_some_and(Option::is_some);
                if owner_known && ctx.material.is_none() {
                    ctx.material = Some(self.trust_material().await?);
                }
            }
            // Our own devices are judged by our identity; another user's by
            // theirs, so without it there is nothing to judge by.
            let owner =
                ctx.owners.get(&parsed.sender).and_then(Option::as_ref).filter(|_| !own_user);
            let root = ctx
                .material
                .as_ref()
                .filter(|_| own_user || owner.is_some())
                .map(|m| m.root(&st.account));
            let sender = SenderContext {
                devices: sender_devices,
                cross_signing: root.as_ref().map(|r| (r, owner)),
            };
            let entry = st.inbound.get_mut(&key).ok_or(Error::Internal("session cache"))?;
            let r = match ahead.take() {
                Some(decrypted) => finish_room_event(
                    room_id,
                    &parsed,
                    &entry.record,
                    decrypted,
                    &sender,
                    seen.as_ref(),
                ),
                None => decrypt_room_event_with(
                    room_id,
                    &parsed,
                    &entry.record,
                    &mut entry.live,
                    &sender,
                    seen.as_ref(),
                ),
            };
            // Another process may have stored a copy of the session that
            // starts earlier: a cached copy that cannot reach the index is
            // reloaded once.
            let retry = cached && matches!(r, Err(MegolmError::UnknownIndex { .. }));
            result = Some(r);
            if !retry {
                break;
            }
        }
        Ok(result.ok_or(Error::Internal("session cache"))??)
    }

    /// Asks our other devices for the key of an undecryptable event. The
    /// request goes out with the next [`outgoing_requests`](Self::outgoing_requests).
    pub async fn request_room_key(&self, room_id: &RoomId, event: &Value) -> Result<(), Error> {
        let parsed = parse_room_event(event)?;
        let mut st = self.inner.state.lock().await;
        if self.store().key_request_for_session(room_id, &parsed.session_id).await?.is_some() {
            return Ok(());
        }
        let request_id = st.next_id();
        let record = KeyRequestRecord {
            request_id,
            room_id: room_id.clone(),
            session_id: parsed.session_id,
            sent: false,
        };
        let changes = Changes { key_requests: vec![record], ..Default::default() };
        self.commit(&mut st, changes, false).await
    }
}
