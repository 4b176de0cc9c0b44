//! SAS verification (`m.sas.v1`) over to-device messages, driven by the
//! [`Machine`]: the request/ready handshake here, the SAS itself in
//! [`newt_proto::verification::sas_flow`].
//!
//! Flows are kept in memory only, keyed by (other user, transaction ID): a
//! restart forgets them (the other side times out or the user starts
//! again). The keys being verified are fixed when the flow is created (our
//! request) or accepted (their request), from the stored device and
//! identity; what a finished flow proved is written to the store.

use newt_proto::vodozemac::Ed25519PublicKey;
use serde_json::{json, Map, Value};

use newt_proto::changes::Changes;
use newt_proto::identities::{signatures_upload_body, OwnIdentity, OwnIdentityTrust, TrustRoot};
use newt_proto::ids::{DeviceId, UserId};
use newt_proto::records::LocalTrust;
use newt_proto::verification::emoji::Emoji;
use newt_proto::verification::sas::{ExpectedKeys, METHOD_SAS_V1};
use newt_proto::verification::sas_flow::{
    Cancelled, Created, SasIds, SasState, SasStep, VerifiedKeys,
};
use newt_proto::verification::{
    cancel_content, event_types, CancelCode, FlowId, OutgoingContent, VERIFICATION_TIMEOUT_MS,
};

use super::{to_device_request, Machine, State, ToDeviceOutcome};
use crate::clock::now_ms;
use crate::requests::{OutgoingRequest, RequestKind};
use crate::Error;

/// A request whose timestamp is older than this is ignored (ms).
const REQUEST_MAX_AGE_MS: u64 = VERIFICATION_TIMEOUT_MS;
/// A request whose timestamp is this far in the future is ignored (ms).
const REQUEST_MAX_FUTURE_MS: u64 = 5 * 60 * 1000;

/// Where a verification flow stands, as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerificationState {
    /// We sent the request; waiting for the other device's `ready`.
    Requested,
    /// The other device asked; [`Machine::accept_verification`] answers.
    RequestReceived,
    /// Both sides are ready: either side may start SAS.
    Ready,
    /// SAS started; the keys are being exchanged.
    Started,
    /// The emoji / decimals can be compared: confirm or cancel.
    KeysExchanged,
    /// We confirmed; waiting for the other side.
    Confirmed,
    /// Finished: the other device (and possibly identity) is verified.
    Done,
    /// Cancelled, with the code, and whether we cancelled.
    Cancelled {
        /// Why.
        code: CancelCode,
        /// Whether we sent the cancel.
        by_us: bool,
    },
}

// Few flows live at once; boxing the SAS state would only add indirection.
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// We sent the request.
    Requested,
    /// They sent the request.
    RequestReceived,
    /// Ready exchanged (SAS in `Created`) or SAS under way.
    Sas(SasState),
    /// Cancelled before SAS started.
    Cancelled(Cancelled),
}

/// One flow.
pub(crate) struct Flow {
    flow: FlowId,
    other_user: UserId,
    other_device: DeviceId,
    /// Fixed at creation (our request) or acceptance (their request).
    ids: Option<SasIds>,
    deadline: u64,
    phase: Phase,
}

impl Flow {
    fn state(&self) -> VerificationState {
        match &self.phase {
            Phase::Requested => VerificationState::Requested,
            Phase::RequestReceived => VerificationState::RequestReceived,
            Phase::Cancelled(c) | Phase::Sas(SasState::Cancelled(c)) => {
                VerificationState::Cancelled { code: c.code.clone(), by_us: c.by_us }
            }
            Phase::Sas(SasState::Created(_)) => VerificationState::Ready,
            Phase::Sas(SasState::Started(_) | SasState::Accepted(_) | SasState::KeySent(_)) => {
                VerificationState::Started
            }
            Phase::Sas(SasState::KeysExchanged(_)) => VerificationState::KeysExchanged,
            Phase::Sas(SasState::Confirmed(_) | SasState::WaitingForDone(_)) => {
                VerificationState::Confirmed
            }
            Phase::Sas(SasState::Done(_)) => VerificationState::Done,
        }
    }

    fn is_finished(&self) -> bool {
        match &self.phase {
            Phase::Cancelled(_) => true,
            Phase::Sas(s) => s.is_finished(),
            Phase::Requested | Phase::RequestReceived => false,
        }
    }

    /// Cancels a flow that has not reached SAS; returns the cancel to send.
    fn cancel_handshake(&mut self, code: CancelCode) -> OutgoingContent {
        let out = cancel_content(&self.flow, &code);
        self.phase = Phase::Cancelled(Cancelled { code, by_us: true });
        out
    }
}

fn str_field<'a>(content: &'a Value, field: &str) -> Option<&'a str> {
    content.get(field).and_then(Value::as_str)
}

fn offers_sas(content: &Value) -> bool {
    content
        .get("methods")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|v| v.as_str() == Some(METHOD_SAS_V1)))
}

fn parse_key(b64: &str) -> Option<Ed25519PublicKey> {
    Ed25519PublicKey::from_base64(b64.trim_end_matches('=')).ok()
}

impl Machine {
    /// The keys a flow with `user`/`device` verifies, fixed now: the stored
    /// device key and the user's stored master key.
    async fn sas_ids(&self, st: &State, user: &UserId, device: &DeviceId) -> Result<SasIds, Error> {
        let record = self
            .store()
            .devices(user)
            .await?
            .into_iter()
            .find(|d| &d.device_id == device && !d.deleted)
            .ok_or(Error::UnknownDevice)?;
        let device_key = parse_key(&record.ed25519).ok_or(Error::UnknownDevice)?;
        let (own, private) = self.trust_material().await?;
        let own_trusted = own.as_ref().is_some_and(|o| {
            TrustRoot::new(&st.account, Some(o), private.as_ref()).own_identity_trust()
                == OwnIdentityTrust::Verified
        });
        let own_master_key =
            own.as_ref().filter(|_| own_trusted).map(|o| o.master_key().public_key());
        let their_keys = if user == &self.inner.user_id {
            own.as_ref().map(|o| o.keys().clone())
        } else {
            self.user_identity(user).await?.map(|i| i.keys().clone())
        };
        let (master_key, cross_signing_key_ids) = match &their_keys {
            Some(k) => {
                let mut ids = vec![k.master.key_id(), k.self_signing.key_id()];
                ids.extend(k.user_signing.as_ref().map(|u| u.key_id()));
                (Some(k.master.public_key()), ids)
            }
            None => (None, Vec::new()),
        };
        Ok(SasIds {
            own_user: self.inner.user_id.clone(),
            own_device: self.inner.device_id.clone(),
            own_device_key: st.account.ed25519_key(),
            own_master_key,
            other_user: user.clone(),
            other: ExpectedKeys {
                device_id: device.clone(),
                device_key,
                master_key,
                cross_signing_key_ids,
            },
        })
    }

    fn queue_verification(&self, st: &mut State, flow: &Flow, outgoing: Vec<OutgoingContent>) {
        for out in outgoing {
            let id = st.next_id();
            let request = to_device_request(
                id,
                out.event_type,
                [(flow.other_user.clone(), flow.other_device.to_string(), out.content)],
            );
            st.queued.push(request);
        }
    }

    /// Asks `device` of `user` (one of ours, or another user's) to verify
    /// by SAS. The device must be known (queried). Returns the flow ID and
    /// the `m.key.verification.request` to send (also the ID to pass to
    /// the other verification methods).
    pub async fn request_verification(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<(String, OutgoingRequest), Error> {
        let mut st = self.inner.state.lock().await;
        let now = now_ms();
        let ids = self.sas_ids(&st, user, device).await?;
        let txn = format!("newt-verif-{}", st.next_id());
        let flow = FlowId::ToDevice(txn.clone());
        let mut content = Map::new();
        content.insert("from_device".into(), json!(self.inner.device_id));
        content.insert("methods".into(), json!([METHOD_SAS_V1]));
        content.insert("timestamp".into(), json!(now));
        flow.decorate(&mut content);
        let id = st.next_id();
        let request = to_device_request(
            id.clone(),
            event_types::REQUEST,
            [(user.clone(), device.to_string(), Value::Object(content))],
        );
        st.in_flight.insert(id, super::Pending::Other);
        st.flows.insert(
            (user.clone(), txn.clone()),
            Flow {
                flow,
                other_user: user.clone(),
                other_device: device.clone(),
                ids: Some(ids),
                deadline: now.saturating_add(VERIFICATION_TIMEOUT_MS),
                phase: Phase::Requested,
            },
        );
        Ok((txn, request))
    }

    fn flow_key(st: &State, flow_id: &str) -> Result<(UserId, String), Error> {
        st.flows
            .keys()
            .find(|(_, t)| t == flow_id)
            .cloned()
            .ok_or_else(|| Error::UnknownFlow(flow_id.to_owned()))
    }

    /// Accepts a request we received: sends `ready` (the keys of the other
    /// device are fixed now, so it must be known).
    pub async fn accept_verification(&self, flow_id: &str) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id)?;
        let (user, device) = match st.flows.get(&key) {
            Some(f) if matches!(f.phase, Phase::RequestReceived) => {
                (f.other_user.clone(), f.other_device.clone())
            }
            _ => return Err(Error::VerificationState("no request to accept")),
        };
        let ids = self.sas_ids(&st, &user, &device).await?;
        let now = now_ms();
        let Some(mut flow) = st.flows.remove(&key) else {
            return Err(Error::UnknownFlow(flow_id.to_owned()));
        };
        let out = match Created::new(ids.clone(), flow.flow.clone(), now) {
            Ok(created) => {
                let mut content = Map::new();
                content.insert("from_device".into(), json!(self.inner.device_id));
                content.insert("methods".into(), json!([METHOD_SAS_V1]));
                flow.flow.decorate(&mut content);
                flow.ids = Some(ids);
                flow.phase = Phase::Sas(SasState::Created(created));
                OutgoingContent { event_type: event_types::READY, content: Value::Object(content) }
            }
            Err(code) => flow.cancel_handshake(code),
        };
        self.queue_verification(&mut st, &flow, vec![out]);
        st.flows.insert(key, flow);
        Ok(())
    }

    /// Starts SAS in a ready flow (either side may).
    pub async fn start_sas(&self, flow_id: &str) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id)?;
        let Some(mut flow) = st.flows.remove(&key) else {
            return Err(Error::UnknownFlow(flow_id.to_owned()));
        };
        let phase = std::mem::replace(&mut flow.phase, Phase::RequestReceived);
        let (phase, result) = match phase {
            Phase::Sas(SasState::Created(created)) => {
                let (started, out) = created.start();
                self.queue_verification(&mut st, &flow, vec![out]);
                (Phase::Sas(SasState::Started(started)), Ok(()))
            }
            other => (other, Err(Error::VerificationState("not ready"))),
        };
        flow.phase = phase;
        st.flows.insert(key, flow);
        result
    }

    /// The seven emoji (symbol, name) to compare, once keys are exchanged.
    pub async fn sas_emoji(&self, flow_id: &str) -> Option<[(&'static str, &'static str); 7]> {
        let st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id).ok()?;
        match &st.flows.get(&key)?.phase {
            Phase::Sas(SasState::KeysExchanged(k)) => {
                k.emoji().map(|e: [Emoji; 7]| e.map(|e| (e.symbol, e.description)))
            }
            _ => None,
        }
    }

    /// The seven emoji as indices into the spec table (0..64), for
    /// comparison with other implementations.
    pub async fn sas_emoji_indices(&self, flow_id: &str) -> Option<[u8; 7]> {
        let st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id).ok()?;
        match &st.flows.get(&key)?.phase {
            Phase::Sas(SasState::KeysExchanged(k)) => k.emoji().map(|e| e.map(|e| e.number)),
            _ => None,
        }
    }

    /// The three numbers to compare, once keys are exchanged.
    pub async fn sas_decimals(&self, flow_id: &str) -> Option<[u16; 3]> {
        let st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id).ok()?;
        match &st.flows.get(&key)?.phase {
            Phase::Sas(SasState::KeysExchanged(k)) => k.decimals(),
            _ => None,
        }
    }

    /// The user says the SAS match: sends our MAC. When both MACs check,
    /// the verified keys are recorded (see [`Machine::receive_sync`]).
    pub async fn confirm_sas(&self, flow_id: &str) -> Result<(), Error> {
        self.sas_action(flow_id, |state, now| match state {
            SasState::KeysExchanged(k) => Ok(k.confirm(now)),
            other => Err(Box::new(other)),
        })
        .await
    }

    /// The user says the SAS differ: cancels with `m.mismatched_sas`.
    pub async fn sas_mismatch(&self, flow_id: &str) -> Result<(), Error> {
        self.sas_action(flow_id, |state, _| match state {
            SasState::KeysExchanged(k) => Ok(k.mismatch()),
            other => Err(Box::new(other)),
        })
        .await
    }

    async fn sas_action(
        &self,
        flow_id: &str,
        action: impl FnOnce(SasState, u64) -> Result<SasStep, Box<SasState>>,
    ) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id)?;
        let Some(mut flow) = st.flows.remove(&key) else {
            return Err(Error::UnknownFlow(flow_id.to_owned()));
        };
        let phase = std::mem::replace(&mut flow.phase, Phase::RequestReceived);
        let mut changes = Changes::default();
        let result = match phase {
            Phase::Sas(state) => match action(state, now_ms()) {
                Ok(step) => self.apply_step(&mut st, &mut flow, step, &mut changes).await,
                Err(state) => {
                    flow.phase = Phase::Sas(*state);
                    Err(Error::VerificationState("the SAS cannot be confirmed now"))
                }
            },
            other => {
                flow.phase = other;
                Err(Error::VerificationState("SAS not started"))
            }
        };
        st.flows.insert(key, flow);
        result?;
        self.commit(&mut st, changes, false).await
    }

    /// Cancels a flow (`m.user`); a finished flow stays as it is.
    pub async fn cancel_verification(&self, flow_id: &str) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id)?;
        let Some(mut flow) = st.flows.remove(&key) else {
            return Err(Error::UnknownFlow(flow_id.to_owned()));
        };
        let phase = std::mem::replace(&mut flow.phase, Phase::RequestReceived);
        let result = match phase {
            Phase::Sas(state) => {
                let step = state.cancel(CancelCode::User);
                // A cancel never finishes with verified keys: nothing to store.
                self.apply_step(&mut st, &mut flow, step, &mut Changes::default()).await
            }
            Phase::Requested | Phase::RequestReceived => {
                let out = flow.cancel_handshake(CancelCode::User);
                self.queue_verification(&mut st, &flow, vec![out]);
                Ok(())
            }
            cancelled @ Phase::Cancelled(_) => {
                flow.phase = cancelled;
                Ok(())
            }
        };
        st.flows.insert(key, flow);
        result
    }

    /// Where flow `flow_id` stands; `None` for an unknown flow (finished
    /// flows are forgotten 20 minutes after they were created).
    pub async fn verification_state(&self, flow_id: &str) -> Option<VerificationState> {
        let st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id).ok()?;
        st.flows.get(&key).map(Flow::state)
    }

    /// The flows (other user, other device, flow ID) that are not finished,
    /// e.g. to find an incoming request.
    pub async fn verification_flows(&self) -> Vec<(UserId, DeviceId, String)> {
        let st = self.inner.state.lock().await;
        st.flows
            .iter()
            .filter(|(_, f)| !f.is_finished())
            .map(|((u, t), f)| (u.clone(), f.other_device.clone(), t.clone()))
            .collect()
    }

    /// Applies one SAS step: queues what it sends, and records what a
    /// finished flow verified.
    async fn apply_step(
        &self,
        st: &mut State,
        flow: &mut Flow,
        step: SasStep,
        changes: &mut Changes,
    ) -> Result<(), Error> {
        let was_done = matches!(flow.phase, Phase::Sas(SasState::Done(_)));
        self.queue_verification(st, flow, step.outgoing);
        let verified = match &step.state {
            SasState::Done(done) if !was_done => Some(done.verified.clone()),
            _ => None,
        };
        flow.phase = Phase::Sas(step.state);
        if let Some(verified) = verified {
            self.record_verified(st, changes, &verified).await?;
        }
        Ok(())
    }

    /// Records what a finished flow proved: the device is verified (our
    /// own: also signed with our SSK if we hold it); another user's master
    /// key is signed with our USK; our own master key is trusted.
    /// The store changes go into `changes`, committed by the caller.
    async fn record_verified(
        &self,
        st: &mut State,
        changes: &mut Changes,
        verified: &VerifiedKeys,
    ) -> Result<(), Error> {
        let own_user = verified.user_id == self.inner.user_id;
        let (own, private) = self.trust_material().await?;
        let mut uploads = Vec::new();
        if let Some(device_key) = verified.device_key {
            let device = self
                .store()
                .devices(&verified.user_id)
                .await?
                .into_iter()
                .find(|d| d.device_id == verified.device_id && !d.deleted);
            if let Some(mut device) = device.filter(|d| parse_key(&d.ed25519) == Some(device_key)) {
                device.local_trust = LocalTrust::Verified;
                if own_user {
                    if let Some(signed) = private
                        .as_ref()
                        .filter(|p| own.as_ref().is_some_and(|o| p.matches(o).is_ok()))
                        .and_then(|p| p.sign_device(&device.keys).ok())
                    {
                        uploads.push((
                            verified.user_id.clone(),
                            device.device_id.to_string(),
                            signed,
                        ));
                    }
                }
                changes.devices.push(device);
            }
        }
        if let Some(master) = verified.master_key {
            if own_user {
                if let Some(mut own) =
                    own.clone().filter(|o: &OwnIdentity| o.master_key().public_key() == master)
                {
                    own.mark_locally_verified();
                    changes.identities.push(own.to_record());
                }
            } else if let Some(identity) = self.user_identity(&verified.user_id).await? {
                if identity.master_key().public_key() == master {
                    if let Some(signed) = private
                        .as_ref()
                        .filter(|p| own.as_ref().is_some_and(|o| p.matches(o).is_ok()))
                        .and_then(|p| p.sign_user(identity.master_key()).ok())
                    {
                        uploads.push((verified.user_id.clone(), master.to_base64(), signed));
                    }
                }
            }
        }
        if !uploads.is_empty() {
            let id = st.next_id();
            let body = signatures_upload_body(uploads);
            st.queued.push(OutgoingRequest { id, kind: RequestKind::SignaturesUpload { body } });
            self.mark_outdated(st, changes, verified.user_id.clone());
        }
        Ok(())
    }

    /// Handles one incoming `m.key.verification.*` to-device event from
    /// `sender`.
    pub(super) async fn handle_verification_event(
        &self,
        st: &mut State,
        changes: &mut Changes,
        sender: &UserId,
        event_type: &str,
        content: &Value,
        now: u64,
    ) -> Result<ToDeviceOutcome, Error> {
        let Some(txn) = str_field(content, "transaction_id") else {
            return Ok(ToDeviceOutcome::Handled);
        };
        let key = (sender.clone(), txn.to_owned());
        if event_type == event_types::REQUEST {
            let from = str_field(content, "from_device").and_then(|d| DeviceId::parse(d).ok());
            let ts = content.get("timestamp").and_then(Value::as_u64).unwrap_or(0);
            let fresh = ts.saturating_add(REQUEST_MAX_AGE_MS) > now
                && ts <= now.saturating_add(REQUEST_MAX_FUTURE_MS);
            if let (Some(from), true, true, false) =
                (from, fresh, offers_sas(content), st.flows.contains_key(&key))
            {
                // Accepting needs the device's keys: fetch them if unknown.
                let known = self.store().devices(sender).await?.iter().any(|d| d.device_id == from);
                if !known {
                    self.mark_outdated(st, changes, sender.clone());
                }
                st.flows.insert(
                    key,
                    Flow {
                        flow: FlowId::ToDevice(txn.to_owned()),
                        other_user: sender.clone(),
                        other_device: from,
                        ids: None,
                        deadline: now.saturating_add(VERIFICATION_TIMEOUT_MS),
                        phase: Phase::RequestReceived,
                    },
                );
            }
            return Ok(ToDeviceOutcome::Handled);
        }
        let Some(mut flow) = st.flows.remove(&key) else {
            return Ok(ToDeviceOutcome::Handled);
        };
        let phase = std::mem::replace(&mut flow.phase, Phase::RequestReceived);
        let result = match (phase, event_type) {
            (Phase::Requested, event_types::READY) => {
                let from = str_field(content, "from_device");
                let created = flow.ids.clone().map(|ids| Created::new(ids, flow.flow.clone(), now));
                match (from == Some(flow.other_device.as_str()), offers_sas(content), created) {
                    (true, true, Some(Ok(created))) => {
                        flow.phase = Phase::Sas(SasState::Created(created));
                    }
                    (true, false, _) => {
                        let out = flow.cancel_handshake(CancelCode::UnknownMethod);
                        self.queue_verification(st, &flow, vec![out]);
                    }
                    (_, _, Some(Err(code))) => {
                        let out = flow.cancel_handshake(code);
                        self.queue_verification(st, &flow, vec![out]);
                    }
                    _ => {
                        let out = flow.cancel_handshake(CancelCode::UserMismatch);
                        self.queue_verification(st, &flow, vec![out]);
                    }
                }
                Ok(())
            }
            (Phase::Requested | Phase::RequestReceived, event_types::CANCEL) => {
                let code = str_field(content, "code").unwrap_or("m.unknown");
                flow.phase =
                    Phase::Cancelled(Cancelled { code: CancelCode::from_wire(code), by_us: false });
                Ok(())
            }
            (Phase::Sas(state), _) => {
                // A start must name the device the flow is with.
                if event_type == event_types::START
                    && str_field(content, "from_device") != Some(flow.other_device.as_str())
                {
                    let step = state.cancel(CancelCode::UserMismatch);
                    self.apply_step(st, &mut flow, step, changes).await
                } else {
                    let step = state.receive(event_type, content, now);
                    self.apply_step(st, &mut flow, step, changes).await
                }
            }
            (phase @ Phase::Cancelled(_), _) => {
                flow.phase = phase;
                Ok(())
            }
            (phase, _) => {
                flow.phase = phase;
                let out = flow.cancel_handshake(CancelCode::UnexpectedMessage);
                self.queue_verification(st, &flow, vec![out]);
                Ok(())
            }
        };
        st.flows.insert(key, flow);
        result.map(|()| ToDeviceOutcome::Handled)
    }

    /// Cancels flows past their deadline (`m.timeout`) and forgets finished
    /// flows ten minutes after their deadline.
    pub(super) async fn poll_verification_timeouts(
        &self,
        st: &mut State,
        now: u64,
    ) -> Result<(), Error> {
        let expired: Vec<(UserId, String)> = st
            .flows
            .iter()
            .filter(|(_, f)| !f.is_finished() && now >= f.deadline)
            .map(|(k, _)| k.clone())
            .collect();
        st.flows.retain(|_, f| {
            !(f.is_finished() && now >= f.deadline.saturating_add(VERIFICATION_TIMEOUT_MS))
        });
        for key in expired {
            let Some(mut flow) = st.flows.remove(&key) else { continue };
            let phase = std::mem::replace(&mut flow.phase, Phase::RequestReceived);
            match phase {
                Phase::Sas(state) => {
                    let step = state.poll_timeout(now);
                    let step = if step.state.is_finished() {
                        step
                    } else {
                        step.state.cancel(CancelCode::Timeout)
                    };
                    // A timeout never finishes with verified keys.
                    self.apply_step(st, &mut flow, step, &mut Changes::default()).await?;
                }
                _ => {
                    let out = flow.cancel_handshake(CancelCode::Timeout);
                    self.queue_verification(st, &flow, vec![out]);
                }
            }
            st.flows.insert(key, flow);
        }
        Ok(())
    }
}
