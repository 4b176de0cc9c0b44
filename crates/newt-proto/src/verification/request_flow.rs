//! One verification request (spec "Key verification framework") as a state
//! machine: who asks whom, `ready`, cancels, the timeout, and the hand-over
//! to SAS ([`super::sas_flow`]) or QR codes ([`super::qr_flow`]).
//!
//! ```text
//! request_device / request_own_devices / room_request_sent ──> Requested
//!   Requested ── their ready (a device we asked; its keys given) ──> Ready
//! received_to_device / received_in_room ──> RequestReceived
//!   RequestReceived ── accept (keys given) ──> Ready
//! Ready ── start_sas() / their SAS start ──────────────────────> Sas(SasState)
//!       ── scan_qr() / their reciprocate of our qr_code() ─────> Qr(QrState)
//! any unfinished state ── cancel / timeout / unexpected message ──> Cancelled
//! ```
//!
//! A [`RequestFlow`] consumes itself on every call and comes back in a
//! [`RequestStep`] with what to send. It reads no clock (every call takes
//! `now`, ms) and no keys: where it needs the other device's keys (their
//! `ready` to a request whose device was not known yet, accepting their
//! request) the step names the device in [`RequestStep::needs_keys`] and
//! the driver calls again with the [`FixedKeys`] it loaded. Messages count
//! only from the flow's user and, where the transport proves the sending
//! device, from the flow's device; anything else is ignored.

use std::mem::Discriminant;

use serde_json::{json, Map, Value};
use vodozemac::Ed25519PublicKey;

use crate::ids::{DeviceId, RoomId, UserId};

use super::qr::METHOD_RECIPROCATE_V1;
use super::qr_flow::{
    self, QrState, QrStep, ScanError, Shown, METHOD_QR_SCAN_V1, METHOD_QR_SHOW_V1,
};
use super::sas::METHOD_SAS_V1;
use super::sas_flow::{Cancelled, Created, SasIds, SasState, SasStep, VerifiedKeys};
use super::{
    cancel_content, event_types, CancelCode, FlowId, OutgoingContent, VERIFICATION_TIMEOUT_MS,
};

/// A request whose timestamp is older than this is ignored (ms).
pub const REQUEST_MAX_AGE_MS: u64 = VERIFICATION_TIMEOUT_MS;
/// A request whose timestamp is this far in the future is ignored (ms).
pub const REQUEST_MAX_FUTURE_MS: u64 = 5 * 60 * 1000;
/// `msgtype` of an in-room request (an `m.room.message`).
pub const MSGTYPE_REQUEST: &str = "m.key.verification.request";

/// Whether a request stamped `ts` may still be answered at `now`: younger
/// than [`REQUEST_MAX_AGE_MS`], at most [`REQUEST_MAX_FUTURE_MS`] ahead.
pub fn is_fresh(ts: u64, now: u64) -> bool {
    ts.saturating_add(REQUEST_MAX_AGE_MS) > now && ts <= now.saturating_add(REQUEST_MAX_FUTURE_MS)
}

/// The verification methods this device offers in its requests and
/// `ready`s (default: all). An app that cannot show QR codes turns
/// `show_qr` off, one without a camera `scan_qr`.
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
    /// The `methods` list we send (`m.reciprocate.v1` with either QR method).
    pub fn to_wire(self) -> Value {
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

    /// Whether we and a peer offering `theirs` can do anything together:
    /// SAS both ways, or one shows and the other scans (with reciprocate).
    pub fn common(self, theirs: &[String]) -> bool {
        let has = |m: &str| theirs.iter().any(|t| t == m);
        (self.sas && has(METHOD_SAS_V1))
            || (has(METHOD_RECIPROCATE_V1)
                && ((self.show_qr && has(METHOD_QR_SCAN_V1))
                    || (self.scan_qr && has(METHOD_QR_SHOW_V1))))
    }
}

/// The keys a flow verifies, read by the driver from its store once the
/// other device is known.
#[derive(Debug, Clone, PartialEq)]
pub struct FixedKeys {
    /// Both sides' IDs and the keys the other device must prove.
    pub ids: SasIds,
    /// Our master key as stored, trusted or not (QR mode `0x02`).
    pub believed_own_master: Option<Ed25519PublicKey>,
    /// Whether we hold a trusted user-signing key: verifying another user
    /// records something only then.
    pub can_sign_users: bool,
}

/// One incoming message of the other side.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// The event's sender.
    pub sender: &'a UserId,
    /// The device that provably sent it (an encrypted in-room event), if
    /// the transport tells; `from_device` fields are only claims.
    pub sender_device: Option<&'a DeviceId>,
    /// E.g. `m.key.verification.ready`.
    pub event_type: &'a str,
    /// The content as received.
    pub content: &'a Value,
}

#[derive(Debug)]
struct Ctx {
    flow: FlowId,
    other_user: UserId,
    /// Unknown until a fanned-out or in-room request is answered.
    other_device: Option<DeviceId>,
    /// The devices a to-device request went to: when one answers, the
    /// others are withdrawn from; a cancel before anyone answered goes to all.
    requested_devices: Vec<DeviceId>,
    /// The methods the other side offered in its request or ready.
    their_methods: Vec<String>,
    /// Fixed once the other device is known.
    keys: Option<FixedKeys>,
    deadline: u64,
}

impl Ctx {
    fn new(flow: FlowId, other_user: UserId, now: u64) -> Self {
        Self {
            flow,
            other_user,
            other_device: None,
            requested_devices: Vec::new(),
            their_methods: Vec::new(),
            keys: None,
            deadline: now.saturating_add(VERIFICATION_TIMEOUT_MS),
        }
    }

    fn out(&self, event_type: &'static str, mut fields: Map<String, Value>) -> OutgoingContent {
        self.flow.decorate(&mut fields);
        OutgoingContent { event_type, content: Value::Object(fields) }
    }
}

/// Both sides are ready: SAS not started, maybe a QR code shown.
#[derive(Debug)]
pub struct Ready {
    created: Created,
    shown: Option<Shown>,
}

/// Where a request stands.
// Few flows live at once; boxing the SAS states would only add indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum RequestState {
    /// We sent the request; waiting for `ready`.
    Requested,
    /// They sent the request; we may accept.
    RequestReceived,
    /// Ready exchanged: SAS or QR may start.
    Ready(Ready),
    /// SAS under way (or finished).
    Sas(SasState),
    /// A QR code was scanned, by them or by us (or finished).
    Qr(QrState),
    /// Cancelled before SAS or QR started.
    Cancelled(Cancelled),
}

/// One verification flow, from the request on.
#[derive(Debug)]
pub struct RequestFlow {
    ctx: Ctx,
    state: RequestState,
}

/// A fanned-out request taken by one device: the cancel (`m.accepted`)
/// for the devices that did not answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Withdrawal {
    /// The devices of the flow's user that get the cancel.
    pub devices: Vec<DeviceId>,
    /// The cancel.
    pub cancel: OutgoingContent,
}

/// The result of one call: the flow after it and what to do.
#[derive(Debug)]
pub struct RequestStep {
    /// The flow after the step.
    pub flow: RequestFlow,
    /// Messages for the flow's transport, in order: the other device (all
    /// requested devices while none answered), or the flow's room.
    pub outgoing: Vec<OutgoingContent>,
    /// Sent before `outgoing`, to other devices than the flow's.
    pub withdrawn: Option<Withdrawal>,
    /// Call again with the keys of this device of the flow's user (the
    /// flow did not move).
    pub needs_keys: Option<DeviceId>,
    /// The flow just finished: what it verified, for the driver to record.
    pub verified: Option<VerifiedKeys>,
}

/// A user action the flow cannot take now; the flow is unchanged (a QR
/// code that failed to encode stays shown).
#[derive(Debug)]
pub struct Refused {
    /// The flow, as it was.
    pub flow: RequestFlow,
    /// Why.
    pub reason: Refusal,
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not legal in this state (or with these methods).
    State(&'static str),
    /// A QR code could not be scanned or encoded.
    Scan(ScanError),
}

/// The result of a user action.
pub type Action<T = RequestStep> = Result<T, Box<Refused>>;

/// How far a flow got, finely enough to tell whether a call moved it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepMarker {
    state: Discriminant<RequestState>,
    sas: Option<Discriminant<SasState>>,
    qr: Option<Discriminant<QrState>>,
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

fn from_device(content: &Value) -> Option<DeviceId> {
    str_field(content, "from_device").and_then(|d| DeviceId::parse(d).ok())
}

fn cancel_code(content: &Value) -> CancelCode {
    CancelCode::from_wire(str_field(content, "code").unwrap_or("m.unknown"))
}

/// The answer to a `ready` or `start` naming a flow we do not know:
/// `m.unknown_transaction` to its `from_device` (never to a cancel or
/// done: no ping-pong).
pub fn unknown_flow_cancel(
    txn: &str,
    event_type: &str,
    content: &Value,
) -> Option<(DeviceId, OutgoingContent)> {
    if !matches!(event_type, event_types::READY | event_types::START) {
        return None;
    }
    let from = from_device(content)?;
    let flow = FlowId::ToDevice(txn.to_owned());
    Some((from, cancel_content(&flow, &CancelCode::UnknownTransaction)))
}

/// The content of an in-room request to verify `to` (an `m.room.message`
/// with `msgtype` [`MSGTYPE_REQUEST`]); its event ID becomes the flow ID.
pub fn room_request_content(
    own_user: &UserId,
    own_device: &DeviceId,
    to: &UserId,
    ours: VerificationMethods,
) -> Value {
    json!({
        "msgtype": MSGTYPE_REQUEST,
        "body": format!(
            "{own_user} is asking to verify your key, but your client does not support in-chat key verification."
        ),
        "from_device": own_device,
        "methods": ours.to_wire(),
        "to": to,
    })
}

impl RequestFlow {
    fn new(ctx: Ctx, state: RequestState) -> Self {
        Self { ctx, state }
    }

    fn stay(self) -> RequestStep {
        self.send(Vec::new())
    }

    fn send(self, outgoing: Vec<OutgoingContent>) -> RequestStep {
        RequestStep { flow: self, outgoing, withdrawn: None, needs_keys: None, verified: None }
    }

    fn refuse<T>(self, reason: &'static str) -> Action<T> {
        Err(Box::new(Refused { flow: self, reason: Refusal::State(reason) }))
    }

    /// Cancels before SAS or QR started.
    fn cancel_handshake(ctx: Ctx, code: CancelCode) -> RequestStep {
        let out = cancel_content(&ctx.flow, &code);
        Self::new(ctx, RequestState::Cancelled(Cancelled { code, by_us: true })).send(vec![out])
    }

    /// The content of a to-device request from `own_device`.
    fn request_content(&self, own_device: &DeviceId, ours: VerificationMethods, now: u64) -> Value {
        let mut content = Map::new();
        content.insert("from_device".into(), json!(own_device));
        content.insert("methods".into(), ours.to_wire());
        content.insert("timestamp".into(), json!(now));
        self.ctx.out(event_types::REQUEST, content).content
    }

    /// We ask one device (ours or another user's) over to-device messages
    /// (transaction `txn`); its keys are fixed now. Returns the flow and
    /// the `m.key.verification.request` content to send it.
    pub fn request_device(
        txn: String,
        keys: FixedKeys,
        ours: VerificationMethods,
        now: u64,
    ) -> (Self, Value) {
        let mut ctx = Ctx::new(FlowId::ToDevice(txn), keys.ids.other_user.clone(), now);
        let device = keys.ids.other.device_id.clone();
        ctx.other_device = Some(device.clone());
        ctx.requested_devices = vec![device];
        let own_device = keys.ids.own_device.clone();
        ctx.keys = Some(keys);
        let flow = Self::new(ctx, RequestState::Requested);
        let content = flow.request_content(&own_device, ours, now);
        (flow, content)
    }

    /// We ask all our other `devices` (transaction `txn`): the first to
    /// answer `ready` takes the flow, the others are withdrawn from with
    /// `m.accepted`. Returns the flow and the request content for each.
    pub fn request_own_devices(
        txn: String,
        own_user: UserId,
        own_device: &DeviceId,
        devices: Vec<DeviceId>,
        ours: VerificationMethods,
        now: u64,
    ) -> (Self, Value) {
        let mut ctx = Ctx::new(FlowId::ToDevice(txn), own_user, now);
        ctx.requested_devices = devices;
        let flow = Self::new(ctx, RequestState::Requested);
        let content = flow.request_content(own_device, ours, now);
        (flow, content)
    }

    /// We sent an in-room request ([`room_request_content`]) to `user`; it
    /// became event `event_id` in `room_id`. The answering device's keys
    /// are asked for when its `ready` comes.
    pub fn room_request_sent(room_id: RoomId, event_id: String, user: UserId, now: u64) -> Self {
        let flow = FlowId::InRoom { room_id, event_id };
        Self::new(Ctx::new(flow, user, now), RequestState::Requested)
    }

    fn received(
        flow: FlowId,
        sender: &UserId,
        from: DeviceId,
        methods: Vec<String>,
        now: u64,
    ) -> Self {
        let mut ctx = Ctx::new(flow, sender.clone(), now);
        ctx.other_device = Some(from.clone());
        ctx.requested_devices = vec![from];
        ctx.their_methods = methods;
        Self::new(ctx, RequestState::RequestReceived)
    }

    /// A to-device `m.key.verification.request` (transaction `txn`), or
    /// `None` if it is to be ignored: no `from_device`, a `timestamp`
    /// outside [`is_fresh`], or no method in common with `ours`.
    pub fn received_to_device(
        txn: &str,
        msg: &Incoming<'_>,
        ours: VerificationMethods,
        now: u64,
    ) -> Option<Self> {
        let ts = msg.content.get("timestamp").and_then(Value::as_u64).unwrap_or(0);
        let methods = methods_of(msg.content);
        let from = from_device(msg.content)?;
        if !(is_fresh(ts, now) && ours.common(&methods)) {
            return None;
        }
        Some(Self::received(FlowId::ToDevice(txn.to_owned()), msg.sender, from, methods, now))
    }

    /// An in-room request (`m.room.message` event `event_id` sent at
    /// `origin_server_ts`), or `None` if it is to be ignored: not a
    /// request, not addressed to `own_user`, sent by `own_user`, no
    /// `from_device`, too old or too new, or no method in common.
    pub fn received_in_room(
        room_id: &RoomId,
        event_id: &str,
        msg: &Incoming<'_>,
        origin_server_ts: u64,
        own_user: &UserId,
        ours: VerificationMethods,
        now: u64,
    ) -> Option<Self> {
        let content = msg.content;
        let methods = methods_of(content);
        let to_us = str_field(content, "to") == Some(own_user.as_str());
        let from = from_device(content)?;
        if str_field(content, "msgtype") != Some(MSGTYPE_REQUEST)
            || !to_us
            || msg.sender == own_user
            || !is_fresh(origin_server_ts, now)
            || !ours.common(&methods)
        {
            return None;
        }
        let flow = FlowId::InRoom { room_id: room_id.clone(), event_id: event_id.to_owned() };
        Some(Self::received(flow, msg.sender, from, methods, now))
    }
}

#[path = "request_flow_steps.rs"]
mod steps;

#[cfg(test)]
#[path = "request_flow_tests.rs"]
mod tests;
