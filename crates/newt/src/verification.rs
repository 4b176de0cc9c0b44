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

use std::collections::{BTreeMap, BTreeSet};

use newt_proto::vodozemac::Ed25519PublicKey;
use rand::rngs::OsRng;
use rand::RngCore;
use serde_json::{json, Map, Value};

use newt_proto::changes::Changes;
use newt_proto::identities::{
    signatures_upload_body, KeyUsage, OwnIdentity, OwnIdentityTrust, TrustRoot,
};
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::records::LocalTrust;
use newt_proto::verification::emoji::Emoji;
use newt_proto::verification::qr::METHOD_RECIPROCATE_V1;
use newt_proto::verification::qr_flow::{
    self, QrState, QrStep, Shown, METHOD_QR_SCAN_V1, METHOD_QR_SHOW_V1,
};
use newt_proto::verification::sas::{ExpectedKeys, METHOD_SAS_V1};
use newt_proto::verification::sas_flow::{
    Cancelled, Created, SasIds, SasState, SasStep, VerifiedKeys,
};
use newt_proto::verification::{
    cancel_content, event_types, CancelCode, FlowId, OutgoingContent, VERIFICATION_TIMEOUT_MS,
};

use super::{to_device_request, Machine, State, ToDeviceOutcome};
use crate::requests::{OutgoingRequest, RequestKind};
use crate::Error;

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
        let (own, private) = self.trust_material().await?;
        let own_trusted = own.as_ref().is_some_and(|o| {
            TrustRoot::new(&st.account, Some(o), private.as_ref()).own_identity_trust()
                == OwnIdentityTrust::Verified
        });
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
        st.in_flight.insert(id, super::Pending::Other);
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
        st.in_flight.insert(id, super::Pending::Other);
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

    /// Starts SAS in a ready flow (either side may).
    pub async fn start_sas(&self, flow_id: &str) -> Result<(), Error> {
        self.with_flow(flow_id, async |m, st, flow, _| {
            if !st.flows.methods.sas || !flow.their_methods.iter().any(|t| t == METHOD_SAS_V1) {
                return Err(Error::VerificationState("SAS is not a method both sides offered"));
            }
            match std::mem::replace(&mut flow.phase, Phase::RequestReceived) {
                Phase::Sas(SasState::Created(created)) => {
                    let (started, out) = created.start();
                    m.queue_verification(st, flow, vec![out]);
                    flow.phase = Phase::Sas(SasState::Started(started));
                    Ok(())
                }
                other => {
                    flow.phase = other;
                    Err(Error::VerificationState("not ready"))
                }
            }
        })
        .await
    }

    /// The QR code to show in a ready flow, as the bytes to render (byte
    /// mode; the same bytes on every call). `None` when the other side
    /// cannot scan, or when we cannot vouch for the keys a code would carry
    /// (another user: we need our own trusted master key and theirs).
    pub async fn qr_code(&self, flow_id: &str) -> Result<Option<Vec<u8>>, Error> {
        self.with_flow(flow_id, async |m, st, flow, _| {
            if !matches!(flow.phase, Phase::Sas(SasState::Created(_))) {
                return Err(Error::VerificationState("not ready"));
            }
            let can_scan = flow.their_methods.iter().any(|m| m == METHOD_QR_SCAN_V1)
                && flow.their_methods.iter().any(|m| m == METHOD_RECIPROCATE_V1);
            // Verifying another user records something only if we can sign
            // their master key with our user-signing key.
            let other_user_ok = flow.other_user == m.inner.user_id || flow.can_sign_users;
            if !can_scan || !st.flows.methods.show_qr || !other_user_ok {
                return Ok(None);
            }
            if flow.qr_shown.is_none() {
                let Some(ids) = &flow.ids else { return Ok(None) };
                flow.qr_shown =
                    qr_flow::show(ids, flow.believed_own_master, flow.flow.clone(), m.now());
            }
            match &flow.qr_shown {
                Some(shown) => Ok(Some(shown.bytes().map_err(qr_flow::ScanError::from)?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Scans the other device's QR code in a ready flow. If its keys are
    /// the ones we expect, we send the reciprocating `start` and the flow
    /// finishes when the other side confirms; if not, the flow is cancelled
    /// with `m.key_mismatch`. A code that is not for this flow is an error
    /// and leaves the flow as it was.
    pub async fn scan_qr_code(&self, flow_id: &str, bytes: &[u8]) -> Result<(), Error> {
        self.with_flow(flow_id, async |m, st, flow, changes| {
            if !matches!(flow.phase, Phase::Sas(SasState::Created(_))) {
                return Err(Error::VerificationState("not ready"));
            }
            if !st.flows.methods.scan_qr {
                return Err(Error::VerificationState("scanning is not a method we offered"));
            }
            if flow.other_user != m.inner.user_id && !flow.can_sign_users {
                return Err(Error::VerificationState(
                    "verifying another user needs our user-signing key",
                ));
            }
            let ids = flow.ids.as_ref().ok_or(Error::VerificationState("not ready"))?;
            let step =
                qr_flow::scan(ids, flow.believed_own_master, flow.flow.clone(), bytes, m.now())?;
            m.apply_qr_step(st, flow, step, changes).await
        })
        .await
    }

    /// The user confirms that the other device reported a successful scan
    /// of our QR code: sends `done`; the flow finishes with the other
    /// side's `done`.
    pub async fn confirm_qr_scanned(&self, flow_id: &str) -> Result<(), Error> {
        self.with_flow(flow_id, async |m, st, flow, changes| {
            match std::mem::replace(&mut flow.phase, Phase::RequestReceived) {
                Phase::Qr(state @ QrState::Scanned(_)) => {
                    m.apply_qr_step(st, flow, state.confirm(m.now()), changes).await
                }
                other => {
                    flow.phase = other;
                    Err(Error::VerificationState("our QR code was not scanned"))
                }
            }
        })
        .await
    }

    /// The seven emoji to compare (symbol, English name, and number in the
    /// spec's table), once keys are exchanged.
    pub async fn sas_emoji(&self, flow_id: &str) -> Option<[Emoji; 7]> {
        let st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id).ok()?;
        match &st.flows.get(&key)?.phase {
            Phase::Sas(SasState::KeysExchanged(k)) => k.emoji(),
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
        self.with_flow(flow_id, async |m, st, flow, changes| {
            match std::mem::replace(&mut flow.phase, Phase::RequestReceived) {
                Phase::Sas(state) => match action(state, m.now()) {
                    Ok(step) => m.apply_step(st, flow, step, changes).await,
                    Err(state) => {
                        flow.phase = Phase::Sas(*state);
                        Err(Error::VerificationState("the SAS cannot be confirmed now"))
                    }
                },
                other => {
                    flow.phase = other;
                    Err(Error::VerificationState("SAS not started"))
                }
            }
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

    /// Applies one SAS step (see [`Machine::apply`]).
    async fn apply_step(
        &self,
        st: &mut State,
        flow: &mut Flow,
        step: SasStep,
        changes: &mut Changes,
    ) -> Result<(), Error> {
        self.apply(st, flow, step.outgoing, Phase::Sas(step.state), changes).await
    }

    /// Applies one QR step (see [`Machine::apply`]).
    async fn apply_qr_step(
        &self,
        st: &mut State,
        flow: &mut Flow,
        step: QrStep,
        changes: &mut Changes,
    ) -> Result<(), Error> {
        self.apply(st, flow, step.outgoing, Phase::Qr(step.state), changes).await
    }

    /// Queues what a step sends, moves the flow to `phase`, and records
    /// what a flow that just finished verified. Callers never step a
    /// finished flow, so a `Done` here is new.
    async fn apply(
        &self,
        st: &mut State,
        flow: &mut Flow,
        outgoing: Vec<OutgoingContent>,
        phase: Phase,
        changes: &mut Changes,
    ) -> Result<(), Error> {
        self.queue_verification(st, flow, outgoing);
        let verified = match &phase {
            Phase::Sas(SasState::Done(done)) | Phase::Qr(QrState::Done(done)) => {
                Some(done.verified.clone())
            }
            _ => None,
        };
        flow.phase = phase;
        match verified {
            Some(verified) => self.record_verified(st, changes, &verified).await,
            None => Ok(()),
        }
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

    /// Records a request from `sender`'s device `from`.
    #[allow(clippy::too_many_arguments)]
    async fn request_received(
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

    /// Handles one in-room verification event of `room_id`: an
    /// `m.room.message` with `msgtype` `m.key.verification.request`
    /// addressed to us, or an `m.key.verification.*` event referencing a
    /// request. Pass events as they come in the timeline: encrypted ones
    /// (`m.room.encrypted`) are decrypted here; events that are not about
    /// verification are ignored. What the flow sends is queued as
    /// [`RequestKind::RoomMessage`] requests.
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

    /// The other side's `ready` to our request: fixes the device (and its
    /// keys) that answered; other devices of a fanned-out request get
    /// `m.accepted`.
    async fn on_ready(
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
            // A timeout never finishes with verified keys: nothing to store.
            let result =
                self.cancel_flow(st, &mut flow, CancelCode::Timeout, &mut Changes::default()).await;
            st.flows.insert(key, flow);
            result?;
        }
        Ok(())
    }
}
