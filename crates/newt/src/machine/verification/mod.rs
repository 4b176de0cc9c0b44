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
//! This file holds the types and the flow bookkeeping; `handshake` the
//! request/ready handshake, cancels and timeouts, `incoming` the other
//! side's messages (to-device and in-room), `methods` SAS, QR codes and
//! recording what a finished flow verified.

use std::collections::{BTreeMap, BTreeSet};

use newt_proto::vodozemac::Ed25519PublicKey;
use rand::rngs::OsRng;
use rand::RngCore;
use serde_json::{json, Value};

use newt_proto::changes::Changes;
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::verification::qr::METHOD_RECIPROCATE_V1;
use newt_proto::verification::qr_flow::{QrState, Shown, METHOD_QR_SCAN_V1, METHOD_QR_SHOW_V1};
use newt_proto::verification::sas::METHOD_SAS_V1;
use newt_proto::verification::sas_flow::{Cancelled, SasIds, SasState};
use newt_proto::verification::{
    cancel_content, CancelCode, FlowId, OutgoingContent, VERIFICATION_TIMEOUT_MS,
};

use super::{to_device_request, Machine, State};
use crate::requests::{OutgoingRequest, RequestKind};
use crate::Error;

mod handshake;
mod incoming;
mod methods;

/// A request whose timestamp is older than this is ignored (ms).
const REQUEST_MAX_AGE_MS: u64 = VERIFICATION_TIMEOUT_MS;
/// A request whose timestamp is this far in the future is ignored (ms).
const REQUEST_MAX_FUTURE_MS: u64 = 5 * 60 * 1000;
/// `msgtype` of an in-room request.
const MSGTYPE_REQUEST: &str = "m.key.verification.request";
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

/// The verification methods this device offers in its requests and
/// `ready`s (default: all). An app that cannot show QR codes turns
/// `show_qr` off, one without a camera `scan_qr`
/// ([`Machine::set_verification_methods`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerificationMethods {
    /// `m.sas.v1`: emoji / decimal comparison.
    pub sas: bool,
    /// `m.qr_code.show.v1`: we can display a QR code.
    pub show_qr: bool,
    /// `m.qr_code.scan.v1`: we can scan a QR code.
    pub scan_qr: bool,
}

impl Default for VerificationMethods {
    fn default() -> Self {
        Self { sas: true, show_qr: true, scan_qr: true }
    }
}

impl VerificationMethods {
    fn to_wire(self) -> Value {
        let mut out = Vec::new();
        if self.sas {
            out.push(METHOD_SAS_V1);
        }
        if self.show_qr {
            out.push(METHOD_QR_SHOW_V1);
        }
        if self.scan_qr {
            out.push(METHOD_QR_SCAN_V1);
        }
        if self.show_qr || self.scan_qr {
            out.push(METHOD_RECIPROCATE_V1);
        }
        json!(out)
    }

    /// Whether we and a peer offering `theirs` can do anything together.
    fn common(self, theirs: &[String]) -> bool {
        let has = |m: &str| theirs.iter().any(|t| t == m);
        (self.sas && has(METHOD_SAS_V1))
            || (has(METHOD_RECIPROCATE_V1)
                && ((self.show_qr && has(METHOD_QR_SCAN_V1))
                    || (self.scan_qr && has(METHOD_QR_SHOW_V1))))
    }
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
    OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("newt-{hex}")
}

// Few flows live at once; boxing the states would only add indirection.
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// We sent the request.
    Requested,
    /// They sent the request.
    RequestReceived,
    /// Ready exchanged (SAS in `Created`) or SAS under way.
    Sas(SasState),
    /// A QR code was scanned (by them or by us).
    Qr(QrState),
    /// Cancelled before SAS or QR started.
    Cancelled(Cancelled),
}

/// One flow.
pub(crate) struct Flow {
    flow: FlowId,
    other_user: UserId,
    /// Unknown until a fanned-out or in-room request is answered.
    other_device: Option<DeviceId>,
    /// The devices a to-device request went to: when one answers, the
    /// others get `m.accepted`; a cancel before anyone answered goes to all.
    requested_devices: Vec<DeviceId>,
    /// The methods the other side offered in its request or ready.
    their_methods: Vec<String>,
    /// The keys being verified, fixed once the other device is known.
    ids: Option<SasIds>,
    /// Our master key as stored, trusted or not (QR mode `0x02`).
    believed_own_master: Option<Ed25519PublicKey>,
    /// The QR code we show, once asked for.
    qr_shown: Option<Shown>,
    /// Whether we hold our user-signing key: verifying another user's
    /// identity records something only then.
    can_sign_users: bool,
    /// In-room flows: whether the other side's messages come encrypted
    /// (fixed by the first one; a flow never mixes).
    room_encrypted: Option<bool>,
    /// In-room flows: the event IDs already handled (a timeline may
    /// deliver an event twice).
    seen_events: BTreeSet<String>,
    deadline: u64,
    phase: Phase,
    /// Messages queued for this flow so far (see [`FlowMark`]).
    sent: u64,
}

/// Where a flow stands, finely enough to tell whether a batch of incoming
/// messages moved it: the phase, down to the SAS or QR step, and how many
/// messages it has queued. Taken before a batch so that a batch whose
/// commit fails can be undone ([`Machine::rollback_flows`]).
/// What [`Machine::rollback_flows`] needs to undo a batch or an action:
/// how many requests were queued, and every flow's [`FlowMark`], before it.
pub(super) struct FlowCheckpoint {
    queued: usize,
    marks: BTreeMap<(UserId, String), FlowMark>,
}

#[derive(PartialEq, Eq)]
pub(super) struct FlowMark {
    phase: std::mem::Discriminant<Phase>,
    step: Option<std::mem::Discriminant<SasState>>,
    qr_step: Option<std::mem::Discriminant<QrState>>,
    sent: u64,
}

impl Flow {
    fn mark(&self) -> FlowMark {
        FlowMark {
            phase: std::mem::discriminant(&self.phase),
            step: match &self.phase {
                Phase::Sas(s) => Some(std::mem::discriminant(s)),
                _ => None,
            },
            qr_step: match &self.phase {
                Phase::Qr(s) => Some(std::mem::discriminant(s)),
                _ => None,
            },
            sent: self.sent,
        }
    }

    fn state(&self) -> VerificationState {
        match &self.phase {
            Phase::Requested => VerificationState::Requested,
            Phase::RequestReceived => VerificationState::RequestReceived,
            Phase::Cancelled(c)
            | Phase::Sas(SasState::Cancelled(c))
            | Phase::Qr(QrState::Cancelled(c)) => {
                VerificationState::Cancelled { code: c.code.clone(), by_us: c.by_us }
            }
            Phase::Sas(SasState::Created(_)) | Phase::Qr(QrState::Shown(_)) => {
                VerificationState::Ready
            }
            Phase::Sas(SasState::Started(_) | SasState::Accepted(_) | SasState::KeySent(_)) => {
                VerificationState::Started
            }
            Phase::Sas(SasState::KeysExchanged(_)) => VerificationState::KeysExchanged,
            Phase::Qr(QrState::Scanned(_)) => VerificationState::QrScanned,
            Phase::Sas(SasState::Confirmed(_) | SasState::WaitingForDone(_))
            | Phase::Qr(QrState::Confirmed(_) | QrState::Reciprocated(_)) => {
                VerificationState::Confirmed
            }
            Phase::Sas(SasState::Done(_)) | Phase::Qr(QrState::Done(_)) => VerificationState::Done,
        }
    }

    fn is_finished(&self) -> bool {
        match &self.phase {
            Phase::Cancelled(_) => true,
            Phase::Sas(s) => s.is_finished(),
            Phase::Qr(s) => s.is_finished(),
            Phase::Requested | Phase::RequestReceived => false,
        }
    }

    /// Cancels a flow that has not reached SAS; returns the cancel to send.
    fn cancel_handshake(&mut self, code: CancelCode) -> OutgoingContent {
        let out = cancel_content(&self.flow, &code);
        self.phase = Phase::Cancelled(Cancelled { code, by_us: true });
        out
    }

    fn info(&self) -> VerificationFlow {
        VerificationFlow {
            flow_id: self.flow.as_str().to_owned(),
            other_user: self.other_user.clone(),
            other_device: self.other_device.clone(),
            room_id: match &self.flow {
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

fn methods_of(content: &Value) -> Vec<String> {
    content
        .get("methods")
        .and_then(Value::as_array)
        .map(|m| m.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn parse_key(b64: &str) -> Option<Ed25519PublicKey> {
    Ed25519PublicKey::from_base64(b64.trim_end_matches('=')).ok()
}

fn fresh(ts: u64, now: u64) -> bool {
    ts.saturating_add(REQUEST_MAX_AGE_MS) > now && ts <= now.saturating_add(REQUEST_MAX_FUTURE_MS)
}

/// What a flow fixes once the other device is known.
struct Fixed {
    ids: SasIds,
    believed_own_master: Option<Ed25519PublicKey>,
    can_sign_users: bool,
}

impl Flow {
    fn fix(&mut self, fixed: Fixed) {
        self.ids = Some(fixed.ids);
        self.believed_own_master = fixed.believed_own_master;
        self.can_sign_users = fixed.can_sign_users;
    }

    fn fixed(&self) -> Option<Fixed> {
        self.ids.clone().map(|ids| Fixed {
            ids,
            believed_own_master: self.believed_own_master,
            can_sign_users: self.can_sign_users,
        })
    }
}

impl Machine {
    /// Queues `outgoing` for the flow's transport: to the other device (or,
    /// before one answered, to every device the request went to), or into
    /// the flow's room.
    fn queue_verification(&self, st: &mut State, flow: &mut Flow, outgoing: Vec<OutgoingContent>) {
        flow.sent += outgoing.len() as u64;
        for out in outgoing {
            let id = st.next_id();
            let request = match &flow.flow {
                FlowId::ToDevice(_) => {
                    let targets = match &flow.other_device {
                        Some(d) => vec![d.clone()],
                        None => flow.requested_devices.clone(),
                    };
                    to_device_request(
                        id,
                        out.event_type,
                        targets
                            .into_iter()
                            .map(|d| (flow.other_user.clone(), d.to_string(), out.content.clone())),
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

    fn new_flow(flow: FlowId, other_user: &UserId, now: u64, phase: Phase) -> Flow {
        Flow {
            flow,
            other_user: other_user.clone(),
            other_device: None,
            requested_devices: Vec::new(),
            their_methods: Vec::new(),
            ids: None,
            believed_own_master: None,
            qr_shown: None,
            can_sign_users: false,
            room_encrypted: None,
            seen_events: BTreeSet::new(),
            deadline: now.saturating_add(VERIFICATION_TIMEOUT_MS),
            phase,
            sent: 0,
        }
    }

    fn flow_key(st: &State, flow_id: &str) -> Result<(UserId, String), Error> {
        st.flows
            .keys()
            .find(|(_, t)| t == flow_id)
            .cloned()
            .ok_or_else(|| Error::UnknownFlow(flow_id.to_owned()))
    }

    /// Runs `f` on flow `flow_id`, taken out of the map and put back after.
    async fn with_flow<T>(
        &self,
        flow_id: &str,
        f: impl AsyncFnOnce(&Self, &mut State, &mut Flow, &mut Changes) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id)?;
        let checkpoint = Self::flow_checkpoint(&st);
        let Some(mut flow) = st.flows.remove(&key) else {
            return Err(Error::UnknownFlow(flow_id.to_owned()));
        };
        let mut changes = Changes::default();
        let result = f(self, &mut *st, &mut flow, &mut changes).await;
        st.flows.insert(key, flow);
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
            let Some(mut flow) = st.flows.remove(&key) else { continue };
            let moved = match checkpoint.marks.get(&key) {
                Some(mark) => *mark != flow.mark(),
                None => flow.sent > 0,
            };
            if moved {
                let out = match flow.state() {
                    VerificationState::Cancelled { by_us: false, .. } => None,
                    VerificationState::Cancelled { code, by_us: true } => {
                        Some(cancel_content(&flow.flow, &code))
                    }
                    _ => Some(flow.cancel_handshake(CancelCode::Other(STORE_FAILURE.to_owned()))),
                };
                if let Some(out) = out {
                    self.queue_verification(st, &mut flow, vec![out]);
                }
            }
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
