//! The request/ready handshake: asking (one device, all our own, in a
//! room), accepting, a request or `ready` arriving, cancelling, timeouts.

use serde_json::{json, Map, Value};

use newt_proto::changes::Changes;
use newt_proto::identities::{KeyUsage, OwnIdentityTrust};
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::verification::sas::ExpectedKeys;
use newt_proto::verification::sas_flow::{Created, SasIds, SasState};
use newt_proto::verification::{
    cancel_content, event_types, CancelCode, FlowId, OutgoingContent, VERIFICATION_TIMEOUT_MS,
};

use crate::machine::{to_device_request, Machine, Pending, State};
use crate::requests::OutgoingRequest;
use crate::Error;

use super::{
    methods_of, new_transaction_id, parse_key, str_field, Fixed, Flow, Phase, VerificationMethods,
    MSGTYPE_REQUEST,
};

impl Machine {
    /// The keys a flow with `user`/`device` verifies, fixed now: the stored
    /// device key and the user's stored master key. Also our own master key
    /// as stored (trusted or not), and whether we can sign other users.
    async fn fixed_keys(
        &self,
        st: &State,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Fixed, Error> {
        let record = self
            .store()
            .devices(user)
            .await?
            .into_iter()
            .find(|d| &d.device_id == device && !d.deleted)
            .ok_or(Error::UnknownDevice)?;
        let device_key = parse_key(&record.ed25519).ok_or(Error::UnknownDevice)?;
        let material = self.trust_material().await?;
        let (own, private) = (&material.own, &material.private);
        let own_trusted = own.is_some()
            && material.root(&st.account).own_identity_trust() == OwnIdentityTrust::Verified;
        let believed_own_master = own.as_ref().map(|o| o.master_key().public_key());
        let own_master_key = believed_own_master.filter(|_| own_trusted);
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
        let ids = SasIds {
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
        };
        let can_sign_users = own_trusted
            && private.as_ref().is_some_and(|p| p.public_key(KeyUsage::UserSigning).is_some());
        Ok(Fixed { ids, believed_own_master, can_sign_users })
    }

    fn request_content(&self, flow: &FlowId, now: u64, methods: VerificationMethods) -> Value {
        let mut content = Map::new();
        content.insert("from_device".into(), json!(self.inner.device_id));
        content.insert("methods".into(), methods.to_wire());
        content.insert("timestamp".into(), json!(now));
        flow.decorate(&mut content);
        Value::Object(content)
    }

    /// Asks `device` of `user` (one of ours, or another user's) to verify
    /// over to-device messages. The device must be known (queried).
    /// Returns the flow ID and the `m.key.verification.request` to send.
    pub async fn request_verification(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<(String, OutgoingRequest), Error> {
        let mut st = self.inner.state.lock().await;
        let now = self.now();
        let fixed = self.fixed_keys(&st, user, device).await?;
        let txn = new_transaction_id();
        let flow = FlowId::ToDevice(txn.clone());
        let content = self.request_content(&flow, now, st.flows.methods);
        let id = st.next_id();
        let request = to_device_request(
            id.clone(),
            event_types::REQUEST,
            [(user.clone(), device.to_string(), content)],
        );
        st.in_flight.insert(id, Pending::Other);
        let mut f = Self::new_flow(flow, user, now, Phase::Requested);
        f.other_device = Some(device.clone());
        f.requested_devices = vec![device.clone()];
        f.fix(fixed);
        st.flows.insert((user.clone(), txn.clone()), f);
        Ok((txn, request))
    }

    /// Asks all our other (known, not deleted) devices to verify this one:
    /// the first to answer `ready` takes the flow, the others receive
    /// `m.key.verification.cancel` with `m.accepted`. Returns the flow ID and
    /// the request to send.
    pub async fn request_own_verification(&self) -> Result<(String, OutgoingRequest), Error> {
        let mut st = self.inner.state.lock().await;
        let now = self.now();
        let own = self.inner.user_id.clone();
        let devices: Vec<DeviceId> = self
            .store()
            .devices(&own)
            .await?
            .into_iter()
            .filter(|d| !d.deleted && d.device_id != self.inner.device_id)
            .map(|d| d.device_id)
            .collect();
        if devices.is_empty() {
            return Err(Error::UnknownDevice);
        }
        let txn = new_transaction_id();
        let flow = FlowId::ToDevice(txn.clone());
        let content = self.request_content(&flow, now, st.flows.methods);
        let id = st.next_id();
        let request = to_device_request(
            id.clone(),
            event_types::REQUEST,
            devices.iter().map(|d| (own.clone(), d.to_string(), content.clone())),
        );
        st.in_flight.insert(id, Pending::Other);
        let mut f = Self::new_flow(flow, &own, now, Phase::Requested);
        f.requested_devices = devices;
        st.flows.insert((own, txn.clone()), f);
        Ok((txn, request))
    }

    /// The content of an in-room request to verify `user` (an
    /// `m.room.message` with `msgtype` `m.key.verification.request`). Send
    /// it to a room shared with `user` (encrypted if the room is), then
    /// call [`Machine::room_verification_request_sent`] with its event ID.
    pub async fn room_verification_request_content(&self, user: &UserId) -> Value {
        let methods = self.inner.state.lock().await.flows.methods;
        json!({
            "msgtype": MSGTYPE_REQUEST,
            "body": format!(
                "{} is asking to verify your key, but your client does not support in-chat key verification.",
                self.inner.user_id
            ),
            "from_device": self.inner.device_id,
            "methods": methods.to_wire(),
            "to": user,
        })
    }

    /// Registers the in-room request we sent as event `event_id` in
    /// `room_id` to `user`; the event ID is the flow ID. The keys (the
    /// answering device's and `user`'s master key) are fixed when its
    /// `ready` arrives, from what is stored then: query `user` first.
    /// Call this before passing the room's later events in (a `ready` for
    /// a request not registered yet is ignored).
    pub async fn room_verification_request_sent(
        &self,
        room_id: &RoomId,
        event_id: &str,
        user: &UserId,
    ) -> Result<(), Error> {
        if user == &self.inner.user_id {
            return Err(Error::VerificationState("in-room verification is with another user"));
        }
        let mut st = self.inner.state.lock().await;
        if st.flows.id_in_use(event_id) {
            return Err(Error::VerificationState("a flow with this ID exists"));
        }
        let flow = FlowId::InRoom { room_id: room_id.clone(), event_id: event_id.to_owned() };
        let f = Self::new_flow(flow, user, self.now(), Phase::Requested);
        st.flows.insert((user.clone(), event_id.to_owned()), f);
        Ok(())
    }

    /// Sets the methods this device offers in later requests and
    /// `ready`s (see [`VerificationMethods`]).
    pub async fn set_verification_methods(&self, methods: VerificationMethods) {
        self.inner.state.lock().await.flows.methods = methods;
    }

    /// Accepts a request we received: sends `ready` (the keys of the other
    /// device are fixed now, so it must be known).
    pub async fn accept_verification(&self, flow_id: &str) -> Result<(), Error> {
        self.with_flow(flow_id, async |m, st, flow, _| {
            let device = match (&flow.phase, &flow.other_device) {
                (Phase::RequestReceived, Some(d)) => d.clone(),
                _ => return Err(Error::VerificationState("no request to accept")),
            };
            if !st.flows.methods.common(&flow.their_methods) {
                return Err(Error::VerificationState("no verification method in common"));
            }
            let fixed = m.fixed_keys(st, &flow.other_user, &device).await?;
            let out = match Created::new(fixed.ids.clone(), flow.flow.clone(), m.now()) {
                Ok(created) => {
                    let mut content = Map::new();
                    content.insert("from_device".into(), json!(m.inner.device_id));
                    content.insert("methods".into(), st.flows.methods.to_wire());
                    flow.flow.decorate(&mut content);
                    flow.fix(fixed);
                    flow.phase = Phase::Sas(SasState::Created(created));
                    OutgoingContent {
                        event_type: event_types::READY,
                        content: Value::Object(content),
                    }
                }
                Err(code) => flow.cancel_handshake(code),
            };
            m.queue_verification(st, flow, vec![out]);
            Ok(())
        })
        .await
    }

    /// Cancels a flow (`m.user`); a finished flow stays as it is.
    pub async fn cancel_verification(&self, flow_id: &str) -> Result<(), Error> {
        self.with_flow(flow_id, async |m, st, flow, changes| {
            m.cancel_flow(st, flow, CancelCode::User, changes).await
        })
        .await
    }

    /// Cancels `flow` with `code` (sending the cancel) unless it finished.
    async fn cancel_flow(
        &self,
        st: &mut State,
        flow: &mut Flow,
        code: CancelCode,
        changes: &mut Changes,
    ) -> Result<(), Error> {
        if flow.is_finished() {
            return Ok(());
        }
        match std::mem::replace(&mut flow.phase, Phase::RequestReceived) {
            // A cancel never finishes with verified keys.
            Phase::Sas(state) => self.apply_step(st, flow, state.cancel(code), changes).await,
            Phase::Qr(state) => self.apply_qr_step(st, flow, state.cancel(code), changes).await,
            Phase::Requested | Phase::RequestReceived => {
                let out = flow.cancel_handshake(code);
                self.queue_verification(st, flow, vec![out]);
                Ok(())
            }
            cancelled @ Phase::Cancelled(_) => {
                flow.phase = cancelled;
                Ok(())
            }
        }
    }

    /// Records a request from `sender`'s device `from`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn request_received(
        &self,
        st: &mut State,
        changes: &mut Changes,
        sender: &UserId,
        from: DeviceId,
        methods: Vec<String>,
        flow_id: FlowId,
        now: u64,
    ) -> Result<(), Error> {
        // Accepting needs the device's keys: fetch them if unknown.
        let known = self.store().devices(sender).await?.iter().any(|d| d.device_id == from);
        if !known {
            self.mark_outdated(st, changes, sender.clone());
        }
        let key = (sender.clone(), flow_id.as_str().to_owned());
        let mut flow = Self::new_flow(flow_id, sender, now, Phase::RequestReceived);
        flow.other_device = Some(from.clone());
        flow.requested_devices = vec![from];
        flow.their_methods = methods;
        st.flows.insert(key, flow);
        Ok(())
    }

    /// The other side's `ready` to our request: fixes the device (and its
    /// keys) that answered; other devices of a fanned-out request get
    /// `m.accepted`.
    pub(super) async fn on_ready(
        &self,
        st: &mut State,
        changes: &mut Changes,
        flow: &mut Flow,
        content: &Value,
        sender_device: Option<&DeviceId>,
        now: u64,
    ) -> Result<(), Error> {
        let from = str_field(content, "from_device").and_then(|d| DeviceId::parse(d).ok());
        if let (Some(from), Some(sent_by)) = (&from, sender_device) {
            if from != sent_by {
                // A device answering in another device's name.
                return Ok(());
            }
        }
        let Some(from) = from else {
            let out = flow.cancel_handshake(CancelCode::InvalidMessage);
            self.queue_verification(st, flow, vec![out]);
            return Ok(());
        };
        let allowed = match (&flow.flow, &flow.other_device) {
            (_, Some(d)) => d == &from,
            (FlowId::ToDevice(_), None) => flow.requested_devices.contains(&from),
            (FlowId::InRoom { .. }, None) => true,
        };
        if !allowed {
            // Not a device we asked: ignore it (never cancel for others).
            return Ok(());
        }
        let methods = methods_of(content);
        if !st.flows.methods.common(&methods) {
            let out = flow.cancel_handshake(CancelCode::UnknownMethod);
            self.queue_verification(st, flow, vec![out]);
            return Ok(());
        }
        let fixed = match flow.fixed() {
            Some(fixed) => fixed,
            None => match self.fixed_keys(st, &flow.other_user, &from).await {
                Ok(fixed) => fixed,
                Err(Error::UnknownDevice) => {
                    // A device we have not queried yet: fetch its keys and
                    // keep waiting (another device may answer, or this
                    // one again once known).
                    self.mark_outdated(st, changes, flow.other_user.clone());
                    return Ok(());
                }
                Err(e) => return Err(e),
            },
        };
        // The others we asked learn that this device took the flow.
        let others: Vec<DeviceId> =
            flow.requested_devices.iter().filter(|d| **d != from).cloned().collect();
        if !others.is_empty() {
            let cancel = cancel_content(&flow.flow, &CancelCode::Accepted);
            let id = st.next_id();
            st.queued.push(to_device_request(
                id,
                event_types::CANCEL,
                others
                    .iter()
                    .map(|d| (flow.other_user.clone(), d.to_string(), cancel.content.clone())),
            ));
        }
        flow.other_device = Some(from.clone());
        flow.requested_devices = vec![from];
        flow.their_methods = methods;
        match Created::new(fixed.ids.clone(), flow.flow.clone(), now) {
            Ok(created) => {
                flow.fix(fixed);
                flow.phase = Phase::Sas(SasState::Created(created));
            }
            Err(code) => {
                let out = flow.cancel_handshake(code);
                self.queue_verification(st, flow, vec![out]);
            }
        }
        Ok(())
    }

    /// Cancels flows past their deadline (`m.timeout`) and forgets finished
    /// flows ten minutes after their deadline.
    pub(in crate::machine) async fn poll_verification_timeouts(
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
            // A timeout never finishes with verified keys: nothing to store.
            let result =
                self.cancel_flow(st, &mut flow, CancelCode::Timeout, &mut Changes::default()).await;
            st.flows.insert(key, flow);
            result?;
        }
        Ok(())
    }
}
