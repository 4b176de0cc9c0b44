//! Interactive verification driven by the [`Machine`]: the
//! request/ready handshake, then SAS ([`newt_proto::verification::sas_flow`])
//! or QR codes ([`newt_proto::verification::qr_flow`]).
//!
//! Transports:
//! - **to-device**, with one device ([`Machine::request_verification`]) or
//!   fanned out to all our other devices ([`Machine::request_own_verification`]:
//!   the first to answer wins, the others get `m.accepted`);
//! - **in a room** with another user ([`Machine::room_verification_request_content`],
//!   then [`Machine::room_verification_request_sent`] with the event ID,
//!   which becomes the flow ID; incoming room events go through
//!   [`Machine::receive_room_verification_event`]).
//!
//! Flows are kept in memory only, keyed by (other user, flow ID): a restart
//! forgets them (the other side times out or the user starts again). The
//! keys being verified are fixed when the other device is known (our
//! request to one device: at once; a fanned-out or in-room request: when
//! the `ready` names the device; their request: when we accept), from the
//! stored device and identity; what a finished flow proved is written to
//! the store.
//!
//! The protocol is [`newt_proto::verification::request_flow`]: each method
//! here loads what the core asks for (the keys of the other device, see
//! `handshake::fixed_keys`), makes one core call, queues what the step sends
//! (to-device or into the room) and commits what a finished flow verified.
//! This file holds the types and the flow bookkeeping (the map, stepping a
//! flow, checkpoints and rollback); `handshake` asking, accepting, cancels
//! and timeouts, `incoming` the other side's messages (to-device and
//! in-room), `methods` SAS, QR codes and recording what a finished flow
//! verified.

use std::collections::{BTreeMap, BTreeSet};

use newt_proto::vodozemac::Ed25519PublicKey;
use rand::rand_core::UnwrapErr;
use rand::rngs::SysRng;
use rand::Rng;
use serde_json::Value;

use newt_proto::changes::Changes;
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::verification::qr_flow::QrState;
pub use newt_proto::verification::request_flow::VerificationMethods;
use newt_proto::verification::request_flow::{
    Action, FixedKeys, Refusal, RequestFlow, RequestState, RequestStep, StepMarker, Withdrawal,
};
use newt_proto::verification::sas_flow::SasState;
use newt_proto::verification::{event_types, CancelCode, FlowId, OutgoingContent};

use super::{to_device_request, Machine, State};
use crate::requests::{OutgoingRequest, RequestKind};
use crate::Error;

mod handshake;
mod incoming;
mod methods;

/// The cancel code of a flow whose step could not be stored (no `m.` code
/// fits; custom codes use Java package naming).
pub const STORE_FAILURE: &str = "org.newt.store_failure";

/// Where a verification flow stands, as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerificationState {
    /// We sent the request; waiting for the other device's `ready`.
    Requested,
    /// The other device asked; [`Machine::accept_verification`] answers.
    RequestReceived,
    /// Both sides are ready: either side may start SAS, show a QR code
    /// ([`Machine::qr_code`]) or scan one ([`Machine::scan_qr_code`]).
    Ready,
    /// SAS started; the keys are being exchanged.
    Started,
    /// The emoji / decimals can be compared: confirm or cancel.
    KeysExchanged,
    /// The other device scanned our QR code (its secret matched): ask the
    /// user whether the other device shows success, then
    /// [`Machine::confirm_qr_scanned`] (or cancel).
    QrScanned,
    /// We confirmed (or scanned their code); waiting for the other side.
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

/// A flow the application may want to show (see [`Machine::verification_flows`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationFlow {
    /// The flow ID (transaction ID, or the request's event ID in a room).
    pub flow_id: String,
    /// The other user.
    pub other_user: UserId,
    /// The other device, once known.
    pub other_device: Option<DeviceId>,
    /// The room of an in-room flow.
    pub room_id: Option<RoomId>,
    /// Where it stands.
    pub state: VerificationState,
}

/// The flows of one machine, keyed by (other user, flow ID), and the
/// methods we offer.
#[derive(Default)]
pub(crate) struct Flows {
    map: BTreeMap<(UserId, String), Flow>,
    methods: VerificationMethods,
}

impl std::ops::Deref for Flows {
    type Target = BTreeMap<(UserId, String), Flow>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Flows {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

impl Flows {
    /// Whether any flow, with anyone, already uses `flow_id` (flow IDs are
    /// looked up alone, so a second flow must not shadow the first).
    fn id_in_use(&self, flow_id: &str) -> bool {
        self.map.keys().any(|(_, id)| id == flow_id)
    }
}

/// A fresh, unguessable transaction ID for a to-device flow.
fn new_transaction_id() -> String {
    let mut bytes = [0u8; 12];
    UnwrapErr(SysRng).fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("newt-{hex}")
}

/// One flow: the core's state machine and what the driver keeps about
/// its transport.
pub(crate) struct Flow {
    core: RequestFlow,
    transport: Transport,
}

/// What the driver keeps about a flow's transport.
#[derive(Default)]
struct Transport {
    /// In-room flows: whether the other side's messages come encrypted
    /// (fixed by the first one; a flow never mixes).
    room_encrypted: Option<bool>,
    /// In-room flows: the event IDs already handled (a timeline may
    /// deliver an event twice).
    seen_events: BTreeSet<String>,
    /// Messages queued for this flow so far (see [`FlowMark`]).
    sent: u64,
}

/// What [`Machine::rollback_flows`] needs to undo a batch or an action:
/// how many requests were queued, and every flow's [`FlowMark`], before it.
pub(super) struct FlowCheckpoint {
    queued: usize,
    marks: BTreeMap<(UserId, String), FlowMark>,
}

/// Where a flow stands, finely enough to tell whether a batch of incoming
/// messages moved it: the core's step (down to the SAS or QR step), and
/// how many messages it has queued. Taken before a batch so that a batch
/// whose commit fails can be undone ([`Machine::rollback_flows`]).
#[derive(PartialEq, Eq)]
pub(super) struct FlowMark {
    step: StepMarker,
    sent: u64,
}

/// What a core call gets besides the flow: the methods we offer now, the
/// other device's keys when the core asked for them, and the time.
struct Input {
    ours: VerificationMethods,
    keys: Option<FixedKeys>,
    now: u64,
}

/// What the driver does when the keys the core asked for are of a device
/// not in the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IfUnknownDevice {
    /// The caller's error ([`Error::UnknownDevice`]).
    Fail,
    /// Query the user's devices and leave the flow waiting.
    Query,
}

impl Flow {
    fn new(core: RequestFlow) -> Self {
        Self { core, transport: Transport::default() }
    }

    fn mark(&self) -> FlowMark {
        FlowMark { step: self.core.marker(), sent: self.transport.sent }
    }

    fn state(&self) -> VerificationState {
        match self.core.state() {
            RequestState::Requested => VerificationState::Requested,
            RequestState::RequestReceived => VerificationState::RequestReceived,
            RequestState::Cancelled(c)
            | RequestState::Sas(SasState::Cancelled(c))
            | RequestState::Qr(QrState::Cancelled(c)) => {
                VerificationState::Cancelled { code: c.code.clone(), by_us: c.by_us }
            }
            RequestState::Ready(_)
            | RequestState::Sas(SasState::Created(_))
            | RequestState::Qr(QrState::Shown(_)) => VerificationState::Ready,
            RequestState::Sas(
                SasState::Started(_) | SasState::Accepted(_) | SasState::KeySent(_),
            ) => VerificationState::Started,
            RequestState::Sas(SasState::KeysExchanged(_)) => VerificationState::KeysExchanged,
            RequestState::Qr(QrState::Scanned(_)) => VerificationState::QrScanned,
            RequestState::Sas(SasState::Confirmed(_) | SasState::WaitingForDone(_))
            | RequestState::Qr(QrState::Confirmed(_) | QrState::Reciprocated(_)) => {
                VerificationState::Confirmed
            }
            RequestState::Sas(SasState::Done(_)) | RequestState::Qr(QrState::Done(_)) => {
                VerificationState::Done
            }
        }
    }

    fn is_finished(&self) -> bool {
        self.core.is_finished()
    }

    fn info(&self) -> VerificationFlow {
        let flow = self.core.flow_id();
        VerificationFlow {
            flow_id: flow.as_str().to_owned(),
            other_user: self.core.other_user().clone(),
            other_device: self.core.other_device().cloned(),
            room_id: match flow {
                FlowId::InRoom { room_id, .. } => Some(room_id.clone()),
                FlowId::ToDevice(_) => None,
            },
            state: self.state(),
        }
    }
}

fn str_field<'a>(content: &'a Value, field: &str) -> Option<&'a str> {
    content.get(field).and_then(Value::as_str)
}

fn parse_key(b64: &str) -> Option<Ed25519PublicKey> {
    Ed25519PublicKey::from_base64(b64.trim_end_matches('=')).ok()
}

fn refusal_error(reason: Refusal) -> Error {
    match reason {
        Refusal::State(why) => Error::VerificationState(why),
        Refusal::Scan(e) => Error::QrScan(e),
    }
}

impl Machine {
    /// Queues `outgoing` for the flow's transport: to the other device (or,
    /// before one answered, to every device the request went to), or into
    /// the flow's room.
    fn queue_verification(&self, st: &mut State, flow: &mut Flow, outgoing: Vec<OutgoingContent>) {
        flow.transport.sent += outgoing.len() as u64;
        let core = &flow.core;
        for out in outgoing {
            let id = st.next_id();
            let request = match core.flow_id() {
                FlowId::ToDevice(_) => {
                    let targets = match core.other_device() {
                        Some(d) => vec![d.clone()],
                        None => core.requested_devices().to_vec(),
                    };
                    to_device_request(
                        id,
                        out.event_type,
                        targets.into_iter().map(|d| {
                            (core.other_user().clone(), d.to_string(), out.content.clone())
                        }),
                    )
                }
                FlowId::InRoom { room_id, .. } => OutgoingRequest {
                    id: id.clone(),
                    kind: RequestKind::RoomMessage {
                        room_id: room_id.to_string(),
                        event_type: out.event_type.to_owned(),
                        txn_id: id,
                        body: out.content,
                    },
                },
            };
            st.queued.push(request);
        }
    }

    /// Puts a step into effect: the flow takes the step's core; the
    /// withdrawal goes to the devices that did not answer, then the step's
    /// messages to the flow's transport; what a flow that just finished
    /// verified is recorded (into `changes`).
    async fn apply(
        &self,
        st: &mut State,
        changes: &mut Changes,
        transport: Transport,
        step: RequestStep,
    ) -> (Flow, Result<(), Error>) {
        let RequestStep { flow: core, outgoing, withdrawn, needs_keys: _, verified } = step;
        let mut flow = Flow { core, transport };
        if let Some(Withdrawal { devices, cancel }) = withdrawn {
            let id = st.next_id();
            let user = flow.core.other_user();
            st.queued.push(to_device_request(
                id,
                event_types::CANCEL,
                devices.iter().map(|d| (user.clone(), d.to_string(), cancel.content.clone())),
            ));
        }
        self.queue_verification(st, &mut flow, outgoing);
        let result = match verified {
            Some(verified) => self.record_verified(st, changes, &verified).await,
            None => Ok(()),
        };
        (flow, result)
    }

    /// One core call on flow `key` (taken out of the map and always put
    /// back): `call` gets the flow and [`Input`]; if the step asks for the
    /// keys of the other device they are loaded and `call` runs once more
    /// with them (a device not in the store: see [`IfUnknownDevice`]);
    /// then the step is put into effect ([`Self::apply`]).
    async fn step_flow(
        &self,
        st: &mut State,
        changes: &mut Changes,
        key: &(UserId, String),
        now: u64,
        if_unknown: IfUnknownDevice,
        mut call: impl FnMut(RequestFlow, Input) -> Action,
    ) -> Result<(), Error> {
        let Some(Flow { core, transport }) = st.flows.remove(key) else {
            return Err(Error::UnknownFlow(key.1.clone()));
        };
        let ours = st.flows.methods;
        let input = |keys| Input { ours, keys, now };
        let outcome = match call(core, input(None)) {
            Err(refused) => Err((refused.flow, refusal_error(refused.reason))),
            Ok(step) => match step.needs_keys.clone() {
                None => Ok(step),
                Some(device) => {
                    let user = step.flow.other_user().clone();
                    match self.fixed_keys(st, &user, &device).await {
                        Ok(keys) => call(step.flow, input(Some(keys)))
                            .map_err(|r| (r.flow, refusal_error(r.reason))),
                        Err(Error::UnknownDevice) if if_unknown == IfUnknownDevice::Query => {
                            // Fetch its keys and keep waiting (another
                            // device may answer, or this one again).
                            self.mark_outdated(st, changes, user);
                            Ok(step)
                        }
                        Err(e) => Err((step.flow, e)),
                    }
                }
            },
        };
        let (flow, result) = match outcome {
            Ok(step) => self.apply(st, changes, transport, step).await,
            Err((core, e)) => (Flow { core, transport }, Err(e)),
        };
        st.flows.insert(key.clone(), flow);
        result
    }

    fn flow_key(st: &State, flow_id: &str) -> Result<(UserId, String), Error> {
        st.flows
            .keys()
            .find(|(_, t)| t == flow_id)
            .cloned()
            .ok_or_else(|| Error::UnknownFlow(flow_id.to_owned()))
    }

    /// A user action on flow `flow_id`: one core call ([`Self::step_flow`],
    /// at the current time), then commit or roll back.
    async fn with_flow(
        &self,
        flow_id: &str,
        call: impl FnMut(RequestFlow, Input) -> Action,
    ) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id)?;
        let checkpoint = Self::flow_checkpoint(&st);
        let mut changes = Changes::default();
        let now = self.now();
        let result =
            self.step_flow(&mut st, &mut changes, &key, now, IfUnknownDevice::Fail, call).await;
        self.settle_flows(&mut st, &checkpoint, result, changes, false).await
    }

    /// Where the flows stand before a batch of incoming messages or a user
    /// action (see [`Self::settle_flows`]).
    pub(super) fn flow_checkpoint(st: &State) -> FlowCheckpoint {
        FlowCheckpoint {
            queued: st.queued.len(),
            marks: st.flows.iter().map(|(k, f)| (k.clone(), f.mark())).collect(),
        }
    }

    /// Ends a batch of incoming messages or an action: commits `changes`
    /// if `result` is a success; if `result` or the commit failed,
    /// [`Self::rollback_flows`] (e.g. a store read failed after a step
    /// queued its `done`).
    pub(super) async fn settle_flows<T>(
        &self,
        st: &mut State,
        checkpoint: &FlowCheckpoint,
        result: Result<T, Error>,
        changes: Changes,
        account_changed: bool,
    ) -> Result<T, Error> {
        let settled = match result {
            Ok(value) => self.commit(st, changes, account_changed).await.map(|()| value),
            Err(e) => Err(e),
        };
        if settled.is_err() {
            self.rollback_flows(st, checkpoint);
        }
        settled
    }

    /// Undoes what a failed batch (or action) did to flows, as far as it
    /// can be undone. Whatever it queued is dropped (`st.queued` back to
    /// the checkpoint): nothing it meant to record was stored, so none of
    /// it (a MAC, a `done`, a signature upload) may go out. Flows it moved
    /// cannot step back (their state is not copyable), so they end
    /// cancelled with [`STORE_FAILURE`], on both sides; a redelivered
    /// message then finds the flow over. A flow the other side cancelled
    /// stays as it is; one we cancelled sends its cancel again. Flows it
    /// created and that sent nothing are kept (a redelivered request finds
    /// its ID in use).
    pub(super) fn rollback_flows(&self, st: &mut State, checkpoint: &FlowCheckpoint) {
        st.queued.truncate(checkpoint.queued);
        let keys: Vec<(UserId, String)> = st.flows.keys().cloned().collect();
        for key in keys {
            let Some(flow) = st.flows.remove(&key) else { continue };
            let moved = match checkpoint.marks.get(&key) {
                Some(mark) => *mark != flow.mark(),
                None => flow.transport.sent > 0,
            };
            let flow = if moved {
                let Flow { core, transport } = flow;
                let step = core.abort(CancelCode::Other(STORE_FAILURE.to_owned()));
                let mut flow = Flow { core: step.flow, transport };
                self.queue_verification(st, &mut flow, step.outgoing);
                flow
            } else {
                flow
            };
            st.flows.insert(key, flow);
        }
    }

    /// Where flow `flow_id` stands; `None` for an unknown flow (finished
    /// flows are forgotten 10 minutes after their deadline).
    pub async fn verification_state(&self, flow_id: &str) -> Option<VerificationState> {
        let st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id).ok()?;
        st.flows.get(&key).map(Flow::state)
    }

    /// The flows that are not finished, e.g. to find an incoming request.
    pub async fn verification_flows(&self) -> Vec<VerificationFlow> {
        let st = self.inner.state.lock().await;
        st.flows.values().filter(|f| !f.is_finished()).map(Flow::info).collect()
    }
}
