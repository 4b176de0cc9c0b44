//! The other side's verification messages: to-device events, in-room
//! events, and feeding each into its flow.

use serde_json::Value;

use newt_proto::changes::Changes;
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::verification::qr::METHOD_RECIPROCATE_V1;
use newt_proto::verification::qr_flow::QrState;
use newt_proto::verification::sas_flow::{Cancelled, SasState};
use newt_proto::verification::{cancel_content, event_types, CancelCode, FlowId};

use crate::machine::{to_device_request, Machine, State, ToDeviceOutcome};
use crate::Error;

use super::{fresh, methods_of, str_field, Flow, Phase, MSGTYPE_REQUEST};

impl Machine {
    /// Handles one incoming `m.key.verification.*` to-device event from
    /// `sender`.
    pub(in crate::machine) async fn handle_verification_event(
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
        let from = str_field(content, "from_device").and_then(|d| DeviceId::parse(d).ok());
        if event_type == event_types::REQUEST {
            let ts = content.get("timestamp").and_then(Value::as_u64).unwrap_or(0);
            let methods = methods_of(content);
            let usable = fresh(ts, now) && st.flows.methods.common(&methods);
            if let (Some(from), true, false) = (from, usable, st.flows.id_in_use(txn)) {
                self.request_received(
                    st,
                    changes,
                    sender,
                    from,
                    methods,
                    FlowId::ToDevice(txn.to_owned()),
                    now,
                )
                .await?;
            }
            return Ok(ToDeviceOutcome::Handled);
        }
        // Only to-device flows are driven by to-device messages.
        let to_device_flow = st.flows.get(&key).map(|f| matches!(f.flow, FlowId::ToDevice(_)));
        if to_device_flow == Some(false) {
            return Ok(ToDeviceOutcome::Handled);
        }
        let Some(mut flow) = st.flows.remove(&key) else {
            // Tell a device that starts or answers a flow we do not know
            // (never answer a cancel or done: no ping-pong).
            if let (Some(from), event_types::READY | event_types::START) = (from, event_type) {
                let cancel = cancel_content(
                    &FlowId::ToDevice(txn.to_owned()),
                    &CancelCode::UnknownTransaction,
                );
                let id = st.next_id();
                st.queued.push(to_device_request(
                    id,
                    event_types::CANCEL,
                    [(sender.clone(), from.to_string(), cancel.content)],
                ));
            }
            return Ok(ToDeviceOutcome::Handled);
        };
        let result = self.advance(st, changes, &mut flow, event_type, content, None, now).await;
        st.flows.insert(key, flow);
        result.map(|()| ToDeviceOutcome::Handled)
    }

    /// Handles one in-room verification event of `room_id`: an
    /// `m.room.message` with `msgtype` `m.key.verification.request`
    /// addressed to us, or an `m.key.verification.*` event referencing a
    /// request. Pass events as they come in the timeline: encrypted ones
    /// (`m.room.encrypted`) are decrypted here; events that are not about
    /// verification are ignored. What the flow sends is queued as
    /// [`RequestKind::RoomMessage`](crate::RequestKind::RoomMessage) requests.
    pub async fn receive_room_verification_event(
        &self,
        room_id: &RoomId,
        event: &Value,
    ) -> Result<(), Error> {
        // For an encrypted event we also learn the sending device.
        let encrypted = event.get("type").and_then(Value::as_str) == Some("m.room.encrypted");
        let event_id = event.get("event_id").and_then(Value::as_str).map(str::to_owned);
        let (sender, event_type, content, sender_device) = if encrypted {
            let d = self.decrypt_room_event(room_id, event).await?;
            (d.sender, d.event_type, d.content, d.sender_device)
        } else {
            let sender = event
                .get("sender")
                .and_then(Value::as_str)
                .and_then(|s| UserId::parse(s).ok())
                .ok_or(Error::VerificationState("event without a valid sender"))?;
            let t = event.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
            (sender, t, event.get("content").cloned().unwrap_or(Value::Null), None)
        };
        let now = self.now();
        let mut st = self.inner.state.lock().await;
        let mut changes = Changes::default();
        let checkpoint = Self::flow_checkpoint(&st);
        let own_user = self.inner.user_id.clone();
        if event_type == "m.room.message" {
            let ts = event.get("origin_server_ts").and_then(Value::as_u64).unwrap_or(0);
            let from = str_field(&content, "from_device").and_then(|d| DeviceId::parse(d).ok());
            let methods = methods_of(&content);
            let to_us = str_field(&content, "to") == Some(own_user.as_str());
            let usable = st.flows.methods.common(&methods);
            let mut received = Ok(());
            if let (Some(MSGTYPE_REQUEST), Some(event_id), Some(from), true, true, true) = (
                str_field(&content, "msgtype"),
                event_id.as_deref(),
                from,
                to_us && sender != own_user,
                fresh(ts, now),
                usable,
            ) {
                if !st.flows.id_in_use(event_id) {
                    let flow =
                        FlowId::InRoom { room_id: room_id.clone(), event_id: event_id.to_owned() };
                    received = self
                        .request_received(&mut st, &mut changes, &sender, from, methods, flow, now)
                        .await;
                    let key = (sender.clone(), event_id.to_owned());
                    if let (Ok(()), Some(f)) = (&received, st.flows.get_mut(&key)) {
                        f.room_encrypted = Some(encrypted);
                    }
                }
            }
            return self.settle_flows(&mut st, &checkpoint, received, changes, false).await;
        }
        if !event_type.starts_with("m.key.verification.") {
            return Ok(());
        }
        let relation = content.get("m.relates_to");
        let related = match (
            relation.and_then(|r| r.get("rel_type")).and_then(Value::as_str),
            relation.and_then(|r| r.get("event_id")).and_then(Value::as_str),
        ) {
            (Some("m.reference"), Some(id)) => id.to_owned(),
            _ => return Ok(()),
        };
        if sender == own_user {
            // Our own echo, or another of our devices answering (or
            // declining) a request we also received: that ends ours.
            let other_device = match event_type.as_str() {
                event_types::READY | event_types::START => str_field(&content, "from_device")
                    .filter(|d| *d != self.inner.device_id.as_str())
                    .map(|_| CancelCode::Accepted),
                // A cancel carries no `from_device`; our own cancels end
                // our flow already, so this one is another device's.
                event_types::CANCEL => {
                    Some(CancelCode::from_wire(str_field(&content, "code").unwrap_or("m.unknown")))
                }
                _ => None,
            };
            if let Some(code) = other_device {
                for flow in st.flows.values_mut() {
                    if flow.flow.as_str() == related && matches!(flow.phase, Phase::RequestReceived)
                    {
                        flow.phase =
                            Phase::Cancelled(Cancelled { code: code.clone(), by_us: false });
                    }
                }
            }
            return Ok(());
        }
        let key = (sender.clone(), related);
        let Some(mut flow) = st.flows.remove(&key) else { return Ok(()) };
        let in_this_room = matches!(&flow.flow, FlowId::InRoom { room_id: r, .. } if r == room_id);
        // Once the flow is with one device, an encrypted message provably
        // sent by another device of the user is not part of it.
        let from_other_device = matches!(
            (&sender_device, &flow.other_device),
            (Some(sent_by), Some(with)) if sent_by != with
        );
        // A flow's messages are all encrypted or all not: a plaintext one
        // in an encrypted flow could come from any device (or the server).
        let consistent = flow.room_encrypted.is_none_or(|e| e == encrypted);
        // A timeline may deliver an event twice: handle it once.
        let fresh_event = event_id.as_ref().is_none_or(|id| !flow.seen_events.contains(id));
        let result = if in_this_room && !from_other_device && consistent && fresh_event {
            flow.room_encrypted = Some(encrypted);
            flow.seen_events.extend(event_id);
            let device = sender_device.as_ref();
            self.advance(&mut st, &mut changes, &mut flow, &event_type, &content, device, now).await
        } else {
            Ok(())
        };
        st.flows.insert(key, flow);
        self.settle_flows(&mut st, &checkpoint, result, changes, false).await
    }

    /// Feeds one message of the other side into `flow`; `sender_device` is
    /// the device that provably sent it, when known (encrypted in-room).
    #[allow(clippy::too_many_arguments)]
    async fn advance(
        &self,
        st: &mut State,
        changes: &mut Changes,
        flow: &mut Flow,
        event_type: &str,
        content: &Value,
        sender_device: Option<&DeviceId>,
        now: u64,
    ) -> Result<(), Error> {
        if flow.is_finished() {
            return Ok(());
        }
        let phase = std::mem::replace(&mut flow.phase, Phase::RequestReceived);
        match (phase, event_type) {
            (Phase::Requested, event_types::READY) => {
                flow.phase = Phase::Requested;
                self.on_ready(st, changes, flow, content, sender_device, now).await
            }
            (phase @ (Phase::Requested | Phase::RequestReceived), event_types::CANCEL) => {
                let code = CancelCode::from_wire(str_field(content, "code").unwrap_or("m.unknown"));
                // A fanned-out request declined by one device is withdrawn
                // from the others (a to-device cancel does not say which
                // device sent it; the decliner ignores a cancel for a flow
                // it cancelled).
                if matches!(phase, Phase::Requested) && flow.requested_devices.len() > 1 {
                    self.queue_verification(st, flow, vec![cancel_content(&flow.flow, &code)]);
                }
                flow.phase = Phase::Cancelled(Cancelled { code, by_us: false });
                Ok(())
            }
            (Phase::Sas(state), _) => {
                let from_ok = str_field(content, "from_device")
                    == flow.other_device.as_ref().map(DeviceId::as_str);
                let reciprocate = str_field(content, "method") == Some(METHOD_RECIPROCATE_V1);
                if event_type == event_types::START && !from_ok {
                    // A start must name the device the flow is with.
                    self.apply_step(st, flow, state.cancel(CancelCode::UserMismatch), changes).await
                } else if event_type == event_types::START
                    && reciprocate
                    && matches!(state, SasState::Created(_))
                {
                    // They scanned our code.
                    match flow.qr_shown.take() {
                        Some(shown) => {
                            let step = QrState::Shown(shown).receive(event_type, content, now);
                            self.apply_qr_step(st, flow, step, changes).await
                        }
                        None => {
                            let step = state.cancel(CancelCode::UnknownMethod);
                            self.apply_step(st, flow, step, changes).await
                        }
                    }
                } else {
                    let step = state.receive(event_type, content, now);
                    self.apply_step(st, flow, step, changes).await
                }
            }
            (Phase::Qr(state), _) => {
                let step = state.receive(event_type, content, now);
                self.apply_qr_step(st, flow, step, changes).await
            }
            (phase @ Phase::Cancelled(_), _) => {
                flow.phase = phase;
                Ok(())
            }
            (phase, _) => {
                flow.phase = phase;
                let out = flow.cancel_handshake(CancelCode::UnexpectedMessage);
                self.queue_verification(st, flow, vec![out]);
                Ok(())
            }
        }
    }
}
