//! Incoming sync data: tracked users, device-list changes, key counts and
//! to-device events (Olm decryption, room keys, key requests, unwedging).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use newt_proto::changes::Changes;
use newt_proto::ids::{RoomId, UserId};
use newt_proto::key_requests::{
    accept_forwarded_key, answer_request, parse_request, request_content,
};
use newt_proto::megolm::{parse_withheld, session_from_room_key, should_replace};
use newt_proto::olm::{self, OlmError, OlmSession, KEY_CARRYING_TYPES};
use newt_proto::records::{DeviceRecord, InboundGroupSessionRecord, TrackedUser};
use newt_proto::OLM_V1;

use crate::requests::OutgoingRequest;
use crate::Error;

use super::{
    clone_record, to_device_request, Machine, ProcessedToDevice, State, SyncChanges, SyncOutcome,
    ToDeviceError, ToDeviceOutcome, UNWEDGE_INTERVAL_MS, VERIFICATION_PREFIX,
};

impl Machine {
    /// Starts tracking the device lists of `users` (e.g. the members of an
    /// encrypted room). New users are queried on the next
    /// [`outgoing_requests`](Self::outgoing_requests).
    pub async fn update_tracked_users(
        &self,
        users: impl IntoIterator<Item = UserId>,
    ) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let tracked: BTreeSet<UserId> =
            self.store().tracked_users().await?.into_iter().map(|t| t.user_id).collect();
        let mut changes = Changes::default();
        for u in users {
            if !tracked.contains(&u) {
                changes.tracked_users.push(TrackedUser { user_id: u, outdated: true });
            }
        }
        self.commit(&mut st, changes, false).await
    }

    /// Processes the crypto parts of a sync response. Returns only after the
    /// to-device results, the ratchets they advanced, the one-time keys they
    /// consumed and `next_batch` are committed together.
    ///
    /// A room key request (`m.room_key_request`) from one of our trusted
    /// devices for a session we hold is answered over Olm
    /// ([`ToDeviceOutcome::KeyRequestAnswered`], the answer comes out of
    /// [`outgoing_requests`](Self::outgoing_requests)). With no Olm session
    /// to that device yet it waits in memory
    /// ([`ToDeviceOutcome::KeyRequestWaiting`]): `outgoing_requests` claims
    /// a one-time key of the device and the claim's answer makes the
    /// session and answers it, after checking it again. A restart forgets
    /// waiting requests (the requester's next request is handled afresh).
    pub async fn receive_sync(&self, sync: SyncChanges) -> Result<SyncOutcome, Error> {
        let mut st = self.inner.state.lock().await;
        self.refresh_account(&mut st).await?;
        let now = self.now();
        let mut changes = Changes::default();
        let mut account_changed = false;

        // Device lists.
        let tracked: BTreeSet<UserId> =
            self.store().tracked_users().await?.into_iter().map(|t| t.user_id).collect();
        for u in sync.changed_users {
            if tracked.contains(&u) {
                if st.queries_in_flight.contains(&u) {
                    st.changed_during_query.insert(u.clone());
                }
                changes.tracked_users.push(TrackedUser { user_id: u, outdated: true });
            }
        }
        for u in sync.left_users {
            if u != self.inner.user_id && tracked.contains(&u) {
                changes.untracked_users.push(u);
            }
        }

        // One-time and fallback keys.
        account_changed |= st.account.update_key_counts(
            sync.one_time_key_count,
            sync.unused_fallback_key_types.as_deref(),
            now,
        );

        // To-device events.
        let checkpoint = Self::flow_checkpoint(&st);
        let mut batch = Batch::default();
        let mut outcome = SyncOutcome::default();
        for event in &sync.to_device_events {
            let processed =
                match self.process_to_device(&mut st, &mut batch, &mut changes, event, now).await {
                    Ok(processed) => processed,
                    Err(e) => {
                        // Nothing is committed: this sync will come again.
                        self.rollback_flows(&mut st, &checkpoint);
                        return Err(e);
                    }
                };
            account_changed |= batch.account_changed;
            batch.account_changed = false;
            outcome.to_device.push(processed);
        }
        for (_, sessions) in batch.olm_sessions {
            for i in sessions.dirty {
                if let Some(s) = sessions.live.get(i) {
                    changes.olm_sessions.push(s.to_record());
                }
            }
        }
        // Only now that this sync's pre-key messages were decrypted: a device
        // back online after the grace period still reads those waiting for it.
        account_changed |= st.account.forget_previous_fallback_key_if_due(now);
        changes.sync_token = sync.next_batch;
        self.settle_flows(&mut st, &checkpoint, Ok(()), changes, account_changed).await?;
        self.poll_verification_timeouts(&mut st, now).await?;
        st.queued.extend(batch.requests);
        Ok(outcome)
    }

    /// Every tracked user's stored devices by Curve25519 key, read once per
    /// sync batch and only when an Olm message came from a key none of its
    /// sender's devices has (so at most one scan per batch, and only after
    /// Olm authenticated the message).
    async fn key_holders<'b>(
        &self,
        batch: &'b mut Batch,
    ) -> Result<&'b HashMap<String, Vec<DeviceRecord>>, Error> {
        if batch.key_holders.is_none() {
            let users: Vec<UserId> =
                self.store().tracked_users().await?.into_iter().map(|t| t.user_id).collect();
            let mut holders: HashMap<String, Vec<DeviceRecord>> = HashMap::new();
            for d in self.store().devices_of(&users).await? {
                holders.entry(d.curve25519.clone()).or_default().push(d);
            }
            batch.key_holders = Some(holders);
        }
        Ok(batch.key_holders.get_or_insert_with(HashMap::new))
    }

    async fn sessions_for<'b>(
        &self,
        batch: &'b mut Batch,
        sender_key: &str,
    ) -> Result<&'b mut BatchSessions, Error> {
        if !batch.olm_sessions.contains_key(sender_key) {
            let live = self
                .store()
                .olm_sessions(sender_key)
                .await?
                .into_iter()
                .map(OlmSession::from_record)
                .collect();
            batch
                .olm_sessions
                .insert(sender_key.to_owned(), BatchSessions { live, dirty: BTreeSet::new() });
        }
        batch.olm_sessions.get_mut(sender_key).ok_or(Error::Internal("session cache"))
    }

    async fn process_to_device(
        &self,
        st: &mut State,
        batch: &mut Batch,
        changes: &mut Changes,
        event: &Value,
        now: u64,
    ) -> Result<ProcessedToDevice, Error> {
        let sender_str = event.get("sender").and_then(Value::as_str).unwrap_or_default().to_owned();
        let event_type = event.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
        let content = event.get("content").cloned().unwrap_or(Value::Null);
        let reject = |t: String, e: ToDeviceError| ProcessedToDevice {
            sender: sender_str.clone(),
            event_type: t,
            content: Value::Null,
            encrypted: false,
            sender_device: None,
            sender_key: None,
            sender_device_trust: None,
            outcome: ToDeviceOutcome::Rejected(e),
        };
        let Ok(sender) = UserId::parse(sender_str.as_str()) else {
            return Ok(reject(event_type, ToDeviceError::Malformed("sender")));
        };
        if !content.is_object() {
            return Ok(reject(event_type, ToDeviceError::Malformed("content")));
        }

        if event_type != "m.room.encrypted" {
            if KEY_CARRYING_TYPES.contains(&event_type.as_str()) {
                return Ok(reject(event_type.clone(), ToDeviceError::NotOverOlm(event_type)));
            }
            let outcome = match event_type.as_str() {
                "m.room_key.withheld" => match parse_withheld(&sender, &content) {
                    Some(w) => {
                        changes.withheld.push(w);
                        ToDeviceOutcome::WithheldStored
                    }
                    None => ToDeviceOutcome::Handled,
                },
                "m.room_key_request" => {
                    self.handle_key_request(st, batch, &sender, &content, now).await?
                }
                t if t.starts_with(VERIFICATION_PREFIX) => {
                    self.handle_verification_event(st, changes, &sender, t, &content, now).await?
                }
                _ => ToDeviceOutcome::ForApp,
            };
            return Ok(ProcessedToDevice {
                sender: sender_str,
                event_type,
                content,
                encrypted: false,
                sender_device: None,
                sender_key: None,
                sender_device_trust: None,
                outcome,
            });
        }

        if content.get("algorithm").and_then(Value::as_str) != Some(OLM_V1) {
            return Ok(reject(event_type, ToDeviceError::Malformed("algorithm")));
        }
        let sender_key = match content.get("sender_key").and_then(Value::as_str) {
            Some(k) => k.trim_end_matches('=').to_owned(),
            None => return Ok(reject(event_type, ToDeviceError::Malformed("sender_key"))),
        };
        let sender_devices = self.store().devices(&sender).await?;
        let sessions = self.sessions_for(batch, &sender_key).await?;
        let result = olm::decrypt(
            &mut st.account,
            &sender,
            &content,
            &mut sessions.live,
            &sender_devices,
            now,
        );
        let decrypted = match result {
            Ok(d) => {
                sessions.dirty.insert(d.session_index);
                batch.account_changed |= d.account_changed;
                d.event
            }
            Err(e) => {
                if let OlmError::Wedged { sender_key } = &e {
                    self.note_wedged(st, &sender_devices, sender_key, now);
                }
                return Ok(reject(event_type, e.into()));
            }
        };
        if !sender_devices.iter().any(|d| d.curve25519 == sender_key) {
            // A key none of the sender's known devices has, authenticated by
            // Olm: refused if another user's known device has these keys.
            let holders = self.key_holders(batch).await?.get(&sender_key);
            let holders = holders.map(Vec::as_slice).unwrap_or(&[]);
            if let Err(e) = olm::check_key_owner(&decrypted, holders) {
                return Ok(reject(event_type, OlmError::Check(e).into()));
            }
        }
        let sender_device = decrypted.sender_device.as_ref().map(|d| d.device_id.clone());
        let inner_type = decrypted.event_type.clone();
        let outcome = match inner_type.as_str() {
            "m.room_key" => match session_from_room_key(&decrypted) {
                Ok(record) => self.store_inbound(batch, changes, record).await?,
                Err(e) => ToDeviceOutcome::Rejected(e.into()),
            },
            "m.forwarded_room_key" => {
                let room = decrypted
                    .content
                    .get("room_id")
                    .and_then(Value::as_str)
                    .and_then(|r| RoomId::parse(r).ok());
                let session_id =
                    decrypted.content.get("session_id").and_then(Value::as_str).unwrap_or_default();
                let pending = match &room {
                    Some(room) => self.store().key_request_for_session(room, session_id).await?,
                    None => None,
                };
                let own_curve = st.account.curve25519_key().to_base64();
                let material = self.trust_material().await?;
                let accepted = {
                    let root = material.root(&st.account);
                    accept_forwarded_key(
                        &root,
                        &self.inner.user_id,
                        &own_curve,
                        &decrypted,
                        pending.as_ref(),
                    )
                };
                match accepted {
                    Ok(record) => {
                        if let Some(p) = pending {
                            changes.removed_key_requests.push(p.request_id.clone());
                            // Tell our other devices to stop looking.
                            let cancel = request_content(&self.inner.device_id, &p, None, true);
                            let id = st.next_id();
                            batch.requests.push(to_device_request(
                                id,
                                "m.room_key_request",
                                [(self.inner.user_id.clone(), "*".to_owned(), cancel)],
                            ));
                        }
                        self.store_inbound(batch, changes, record).await?
                    }
                    Err(e) => ToDeviceOutcome::Rejected(e.into()),
                }
            }
            "m.room_key_request" => {
                self.handle_key_request(st, batch, &sender, &decrypted.content, now).await?
            }
            "m.dummy" => ToDeviceOutcome::Handled,
            t if t.starts_with(VERIFICATION_PREFIX) => {
                self.handle_verification_event(st, changes, &sender, t, &decrypted.content, now)
                    .await?
            }
            _ => ToDeviceOutcome::ForApp,
        };
        let mut content = decrypted.content;
        if matches!(inner_type.as_str(), "m.room_key" | "m.forwarded_room_key") {
            // Stored (or refused) here: the app gets what the key was for,
            // not the key.
            if let Some(Value::String(mut key)) =
                content.as_object_mut().and_then(|c| c.remove("session_key"))
            {
                zeroize::Zeroize::zeroize(&mut key);
            }
        }
        let stored_sender = decrypted.sender_device.as_ref().filter(|d| {
            !d.deleted
                && sender_devices
                    .iter()
                    .any(|s| s.device_id == d.device_id && s.curve25519 == d.curve25519)
        });
        let sender_device_trust = match (&outcome, stored_sender) {
            (ToDeviceOutcome::ForApp, Some(d)) => Some(self.trust_in_device(st, d).await?),
            _ => None,
        };
        Ok(ProcessedToDevice {
            sender: sender_str,
            event_type: inner_type,
            content,
            encrypted: true,
            sender_device,
            sender_key: Some(decrypted.sender_key),
            sender_device_trust,
            outcome,
        })
    }

    fn note_wedged(
        &self,
        st: &mut State,
        sender_devices: &[DeviceRecord],
        sender_key: &str,
        now: u64,
    ) {
        let recent = st
            .last_unwedge
            .get(sender_key)
            .is_some_and(|t| now.saturating_sub(*t) < UNWEDGE_INTERVAL_MS);
        if recent {
            return;
        }
        if let Some(d) = sender_devices.iter().find(|d| d.curve25519 == sender_key && !d.deleted) {
            st.wedged.insert((d.user_id.clone(), d.device_id.clone()));
        }
    }

    async fn store_inbound(
        &self,
        batch: &mut Batch,
        changes: &mut Changes,
        record: InboundGroupSessionRecord,
    ) -> Result<ToDeviceOutcome, Error> {
        let key = (record.room_id.clone(), record.session_id.clone());
        let existing = match batch.inbound.get(&key) {
            Some(i) => changes.inbound_group_sessions.get(*i).map(clone_record).transpose()?,
            None => self.store().inbound_group_session(&key.0, &key.1).await?,
        };
        if let Some(existing) = existing {
            match should_replace(&existing, &record) {
                Ok(true) => {}
                Ok(false) => return Ok(ToDeviceOutcome::Handled),
                Err(e) => return Ok(ToDeviceOutcome::Rejected(e.into())),
            }
        }
        batch.inbound.insert(key.clone(), changes.inbound_group_sessions.len());
        changes.inbound_group_sessions.push(record);
        Ok(ToDeviceOutcome::RoomKeyStored(key.0, key.1))
    }

    async fn handle_key_request(
        &self,
        st: &mut State,
        batch: &mut Batch,
        sender: &UserId,
        content: &Value,
        now: u64,
    ) -> Result<ToDeviceOutcome, Error> {
        let request = match parse_request(sender, content) {
            Ok(r) => r,
            Err(e) => return Ok(ToDeviceOutcome::Rejected(e.into())),
        };
        let from_self = sender == &self.inner.user_id && request.device_id == self.inner.device_id;
        if from_self {
            // Our own request (or cancellation) echoed back by a `*` fan-out.
            return Ok(ToDeviceOutcome::Handled);
        }
        if request.cancellation {
            st.waiting_key_requests.cancel(&request);
            return Ok(ToDeviceOutcome::Handled);
        }
        let own_devices = if sender == &self.inner.user_id {
            self.store().devices(sender).await?
        } else {
            Vec::new()
        };
        let requester = own_devices.iter().find(|d| d.device_id == request.device_id);
        let session = match (&request.room_id, &request.session_id) {
            (Some(r), Some(s)) => self.store().inbound_group_session(r, s).await?,
            _ => None,
        };
        let own_curve = st.account.curve25519_key().to_base64();
        let material = self.trust_material().await?;
        let answer = {
            let root = material.root(&st.account);
            answer_request(
                &root,
                &self.inner.user_id,
                &own_curve,
                &request,
                requester,
                session.as_ref(),
            )
        };
        let forwarded = match answer {
            Ok(c) => c,
            Err(e) => return Ok(ToDeviceOutcome::Rejected(e.into())),
        };
        let Some(device) = requester else { return Ok(ToDeviceOutcome::Handled) };
        let sessions = self.sessions_for(batch, &device.curve25519).await?;
        let Some(i) = olm::preferred_session(&sessions.live) else {
            // No channel to the device yet, and the requester may never ask
            // again: the request waits until `outgoing_requests` has claimed
            // a one-time key of the device and the claim's answer made the
            // session (answered then, after `answer_request` is asked again).
            drop(forwarded);
            st.waiting_key_requests.push(request);
            return Ok(ToDeviceOutcome::KeyRequestWaiting);
        };
        let encrypted = match olm::encrypt(
            &st.account,
            &mut sessions.live[i],
            device,
            "m.forwarded_room_key",
            forwarded,
        ) {
            Ok(c) => c,
            Err(e) => return Ok(ToDeviceOutcome::Rejected(e.into())),
        };
        sessions.dirty.insert(i);
        let _ = now;
        let id = st.next_id();
        batch.requests.push(to_device_request(
            id,
            "m.room.encrypted",
            [(device.user_id.clone(), device.device_id.to_string(), encrypted)],
        ));
        Ok(ToDeviceOutcome::KeyRequestAnswered)
    }
}

#[derive(Default)]
struct Batch {
    olm_sessions: BTreeMap<String, BatchSessions>,
    /// Every tracked user's devices by Curve25519 key (see
    /// [`Machine::key_holders`]), loaded at most once per batch.
    key_holders: Option<HashMap<String, Vec<DeviceRecord>>>,
    inbound: BTreeMap<(RoomId, String), usize>,
    requests: Vec<OutgoingRequest>,
    account_changed: bool,
}

struct BatchSessions {
    live: Vec<OlmSession>,
    dirty: BTreeSet<usize>,
}
