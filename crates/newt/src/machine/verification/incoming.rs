//! The other side's verification messages: to-device events and in-room
//! events, each fed into its flow's core.

use serde_json::Value;

use newt_proto::changes::Changes;
use newt_proto::ids::{RoomId, UserId};
use newt_proto::verification::request_flow::{unknown_flow_cancel, Incoming, RequestFlow};
use newt_proto::verification::{event_types, FlowId};

use crate::machine::{to_device_request, Machine, State, ToDeviceOutcome};
use crate::Error;

use super::{str_field, Flow, IfUnknownDevice, Input};

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
        // To-device messages do not prove the sending device.
        let msg = Incoming { sender, sender_device: None, event_type, content };
        if event_type == event_types::REQUEST {
            if !st.flows.id_in_use(txn) {
                if let Some(core) =
                    RequestFlow::received_to_device(txn, &msg, st.flows.methods, now)
                {
                    self.request_received(st, changes, core).await?;
                }
            }
            return Ok(ToDeviceOutcome::Handled);
        }
        match st.flows.get(&key).map(|f| matches!(f.core.flow_id(), FlowId::ToDevice(_))) {
            // Only to-device flows are driven by to-device messages.
            Some(false) => {}
            Some(true) => {
                let receive =
                    |core: RequestFlow, i: Input| Ok(core.receive(&msg, i.ours, i.keys, i.now));
                self.step_flow(st, changes, &key, now, IfUnknownDevice::Query, receive).await?;
            }
            None => {
                // Tell a device that starts or answers a flow we do not know.
                if let Some((from, cancel)) = unknown_flow_cancel(txn, event_type, content) {
                    let id = st.next_id();
                    st.queued.push(to_device_request(
                        id,
                        event_types::CANCEL,
                        [(sender.clone(), from.to_string(), cancel.content)],
                    ));
                }
            }
        }
        Ok(ToDeviceOutcome::Handled)
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
        let msg = Incoming {
            sender: &sender,
            sender_device: sender_device.as_ref(),
            event_type: &event_type,
            content: &content,
        };
        if event_type == "m.room.message" {
            let ts = event.get("origin_server_ts").and_then(Value::as_u64).unwrap_or(0);
            let mut received = Ok(());
            let ours = st.flows.methods;
            let core = event_id.as_deref().and_then(|id| {
                RequestFlow::received_in_room(room_id, id, &msg, ts, &own_user, ours, now)
            });
            if let Some(core) = core.filter(|c| !st.flows.id_in_use(c.flow_id().as_str())) {
                received = match self.request_received(&mut st, &mut changes, core).await {
                    Ok(key) => {
                        if let Some(f) = st.flows.get_mut(&key) {
                            f.transport.room_encrypted = Some(encrypted);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
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
            let keys: Vec<(UserId, String)> =
                st.flows.keys().filter(|(_, id)| *id == related).cloned().collect();
            for key in keys {
                if let Some(flow) = st.flows.remove(&key) {
                    let step = flow.core.own_event(&event_type, &content, &self.inner.device_id);
                    let flow = Flow { core: step.flow, transport: flow.transport };
                    st.flows.insert(key, flow);
                }
            }
            return Ok(());
        }
        let key = (sender.clone(), related);
        let Some(flow) = st.flows.get_mut(&key) else { return Ok(()) };
        let in_this_room =
            matches!(flow.core.flow_id(), FlowId::InRoom { room_id: r, .. } if r == room_id);
        // A flow's messages are all encrypted or all not: a plaintext one
        // in an encrypted flow could come from any device (or the server).
        // (A message provably from another device than the flow's is
        // refused by the core.)
        let consistent = flow.transport.room_encrypted.is_none_or(|e| e == encrypted);
        // A timeline may deliver an event twice: handle it once.
        let fresh_event =
            event_id.as_ref().is_none_or(|id| !flow.transport.seen_events.contains(id));
        let result = if in_this_room && consistent && fresh_event {
            flow.transport.room_encrypted = Some(encrypted);
            flow.transport.seen_events.extend(event_id);
            let receive =
                |core: RequestFlow, i: Input| Ok(core.receive(&msg, i.ours, i.keys, i.now));
            let query = IfUnknownDevice::Query;
            self.step_flow(&mut st, &mut changes, &key, now, query, receive).await
        } else {
            Ok(())
        };
        self.settle_flows(&mut st, &checkpoint, result, changes, false).await
    }
}
