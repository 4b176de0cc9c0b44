//! One QR-code verification (`m.qr_code.show.v1`, `m.qr_code.scan.v1`,
//! `m.reciprocate.v1`) as a state machine.
//!
//! ```text
//! shower:  show() ─> Shown ── start(reciprocate, secret ok) ─> Scanned ── confirm() ─> Confirmed ── done ─> Done
//! scanner: scan(bytes, keys ok) ─> Reciprocated (start sent) ── done (we answer done) ─> Done
//! any state ── cancel / timeout / wrong secret / wrong keys ──> Cancelled(code)
//! ```
//!
//! What each side learns (spec "QR codes"; the same split as
//! matrix-sdk-crypto):
//!
//! | mode | shower shows | shower verifies | scanner checks | scanner verifies |
//! |---|---|---|---|---|
//! | `0x00` other user | own MSK, their MSK | their MSK | first = their MSK, second = own MSK | their MSK |
//! | `0x01` self, MSK trusted | own MSK, their device key | their device | first = own MSK, second = own device key | own MSK |
//! | `0x02` self, MSK untrusted | own device key, own MSK | own MSK | first = their device key, second = own MSK | their device |
//!
//! The keys are fixed when the code is shown or scanned, from the keys the
//! driver passes in ([`SasIds`] plus the master key we believe is ours).

use rand::rand_core::UnwrapErr;
use rand::rngs::SysRng;
use rand::Rng;
use serde_json::{Map, Value};
use vodozemac::Ed25519PublicKey;

use super::qr::{QrError, QrMode, QrPayload, METHOD_RECIPROCATE_V1};
use super::sas_flow::{Cancelled, Done, SasIds, VerifiedKeys};
use super::VERIFICATION_TIMEOUT_MS;
use super::{cancel_content, event_types, triage, CancelCode, FlowId, OutgoingContent, Triage};

/// `m.qr_code.show.v1`: this side can show a code.
pub const METHOD_QR_SHOW_V1: &str = "m.qr_code.show.v1";
/// `m.qr_code.scan.v1`: this side can scan a code.
pub const METHOD_QR_SCAN_V1: &str = "m.qr_code.scan.v1";

/// Bytes of shared secret in the codes we show (the spec asks for >= 8).
const SECRET_LEN: usize = 16;

#[derive(Debug, Clone)]
struct Ctx {
    flow: FlowId,
    deadline: u64,
    /// What the flow proves when it is done.
    outcome: VerifiedKeys,
}

impl Ctx {
    fn cancel(&self, code: CancelCode) -> QrStep {
        QrStep {
            state: QrState::Cancelled(Cancelled { code: code.clone(), by_us: true }),
            outgoing: vec![cancel_content(&self.flow, &code)],
        }
    }

    fn done(&self) -> OutgoingContent {
        let mut content = Map::new();
        self.flow.decorate(&mut content);
        OutgoingContent { event_type: event_types::DONE, content: Value::Object(content) }
    }
}

/// We show a code; waiting for the other side's reciprocating `start`.
#[derive(Debug, Clone)]
pub struct Shown {
    ctx: Ctx,
    payload: QrPayload,
    /// Their `done` arrived before our user confirmed.
    their_done: bool,
}

impl Shown {
    /// The payload to render as a QR code (byte mode).
    pub fn bytes(&self) -> Result<Vec<u8>, QrError> {
        self.payload.encode()
    }
}

/// Any state of a QR flow.
#[derive(Debug, Clone)]
pub enum QrState {
    /// We show a code.
    Shown(Shown),
    /// The other side scanned our code (the secret matched): our user must
    /// confirm that the other device shows a successful scan.
    Scanned(Shown),
    /// We confirmed and sent `done`; waiting for theirs.
    Confirmed(Shown),
    /// We scanned their code and sent the reciprocating `start`; waiting for
    /// their `done`.
    Reciprocated(Reciprocated),
    /// Finished.
    Done(Done),
    /// Cancelled.
    Cancelled(Cancelled),
}

/// We scanned their code and sent the reciprocating `start`.
#[derive(Debug, Clone)]
pub struct Reciprocated {
    ctx: Ctx,
}

/// The result of one step: the next state and what to send.
#[derive(Debug, Clone)]
pub struct QrStep {
    /// The state after the step.
    pub state: QrState,
    /// Messages to send, in order.
    pub outgoing: Vec<OutgoingContent>,
}

impl QrStep {
    fn stay(state: QrState) -> Self {
        Self { state, outgoing: Vec::new() }
    }
}

/// Why a code could not be scanned. The flow is unchanged: the user may
/// scan again or use another method.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// The bytes are not a verification QR code.
    #[error("not a verification QR code: {0}")]
    Payload(#[from] QrError),
    /// The code belongs to another verification flow.
    #[error("the QR code is for flow {found:?}, not this one")]
    OtherFlow {
        /// The flow ID in the code.
        found: String,
    },
    /// The code's mode does not fit this flow (e.g. a self-verification
    /// code in a flow with another user), or we lack the keys to check it.
    #[error("the QR code's mode does not fit this flow")]
    WrongMode,
    /// The code asks us to vouch for our master key (mode `0x02`), which
    /// this device does not trust: verify this device first.
    #[error("this device does not trust our master key, so it cannot vouch for it")]
    MasterKeyNotTrusted,
}

fn ed(bytes: &[u8; 32]) -> Option<Ed25519PublicKey> {
    Ed25519PublicKey::from_slice(bytes).ok()
}

fn verified(
    ids: &SasIds,
    device_key: Option<Ed25519PublicKey>,
    master: Option<Ed25519PublicKey>,
) -> VerifiedKeys {
    VerifiedKeys {
        user_id: ids.other_user.clone(),
        device_id: ids.other.device_id.clone(),
        device_key,
        master_key: master,
    }
}

/// The code to show in `flow`, or `None` if we cannot vouch for any key
/// pair: another user needs our trusted master key and their master key;
/// our own other device needs a master key we trust (mode `0x01`) or at
/// least believe in (mode `0x02`).
///
/// `believed_own_master` is our user's master key as stored, trusted or
/// not (`ids.own_master_key` is set only when this device trusts it).
pub fn show(
    ids: &SasIds,
    believed_own_master: Option<Ed25519PublicKey>,
    flow: FlowId,
    now: u64,
) -> Option<Shown> {
    let self_verification = ids.other_user == ids.own_user;
    let (mode, first, second, outcome) = if !self_verification {
        let own = ids.own_master_key?;
        let theirs = ids.other.master_key?;
        (QrMode::VerifyingAnotherUser, own, theirs, verified(ids, None, Some(theirs)))
    } else if let Some(own) = ids.own_master_key {
        let device = ids.other.device_key;
        (QrMode::SelfVerifyingMasterKeyTrusted, own, device, verified(ids, Some(device), None))
    } else {
        let own = believed_own_master?;
        (
            QrMode::SelfVerifyingMasterKeyUntrusted,
            ids.own_device_key,
            own,
            verified(ids, None, Some(own)),
        )
    };
    let mut secret = vec![0u8; SECRET_LEN];
    UnwrapErr(SysRng).fill_bytes(&mut secret);
    let payload = QrPayload {
        mode,
        flow_id: flow.as_str().to_owned(),
        first_key: *first.as_bytes(),
        second_key: *second.as_bytes(),
        secret,
    };
    let deadline = now.saturating_add(VERIFICATION_TIMEOUT_MS);
    Some(Shown { ctx: Ctx { flow, deadline, outcome }, payload, their_done: false })
}

/// Scans the other device's code in `flow`. A code that decodes and
/// belongs to this flow either carries the keys we expect (we send the
/// reciprocating `start` and wait for `done`) or does not (the flow is
/// cancelled with `m.key_mismatch`).
pub fn scan(
    ids: &SasIds,
    believed_own_master: Option<Ed25519PublicKey>,
    flow: FlowId,
    bytes: &[u8],
    now: u64,
) -> Result<QrStep, ScanError> {
    let payload = QrPayload::decode(bytes)?;
    if payload.flow_id != flow.as_str() {
        return Err(ScanError::OtherFlow { found: payload.flow_id });
    }
    let self_verification = ids.other_user == ids.own_user;
    let first = ed(&payload.first_key);
    let second = ed(&payload.second_key);
    // (keys match?, what a successful flow proves)
    let (matches, outcome) = match (payload.mode, self_verification) {
        (QrMode::VerifyingAnotherUser, false) => {
            let theirs = ids.other.master_key.ok_or(ScanError::WrongMode)?;
            let own = believed_own_master.ok_or(ScanError::WrongMode)?;
            (first == Some(theirs) && second == Some(own), verified(ids, None, Some(theirs)))
        }
        (QrMode::SelfVerifyingMasterKeyTrusted, true) => {
            let own = believed_own_master.ok_or(ScanError::WrongMode)?;
            (
                first == Some(own) && second == Some(ids.own_device_key),
                verified(ids, None, Some(own)),
            )
        }
        (QrMode::SelfVerifyingMasterKeyUntrusted, true) => {
            // The shower will trust the master key because we vouch for
            // it: we must trust it ourselves, not merely have it stored.
            let own = ids.own_master_key.ok_or(ScanError::MasterKeyNotTrusted)?;
            let device = ids.other.device_key;
            (first == Some(device) && second == Some(own), verified(ids, Some(device), None))
        }
        _ => return Err(ScanError::WrongMode),
    };
    let ctx = Ctx { flow, deadline: now.saturating_add(VERIFICATION_TIMEOUT_MS), outcome };
    if !matches {
        return Ok(ctx.cancel(CancelCode::KeyMismatch));
    }
    let start = payload.reciprocate_start(&ctx.flow, ids.own_device.as_str());
    Ok(QrStep { state: QrState::Reciprocated(Reciprocated { ctx }), outgoing: vec![start] })
}

impl QrState {
    /// The deadline (ms) of an unfinished flow.
    pub fn timeout_at(&self) -> Option<u64> {
        self.ctx().map(|c| c.deadline)
    }

    /// Whether the flow is over (done or cancelled).
    pub fn is_finished(&self) -> bool {
        matches!(self, Self::Done(_) | Self::Cancelled(_))
    }

    fn ctx(&self) -> Option<&Ctx> {
        match self {
            Self::Shown(s) | Self::Scanned(s) | Self::Confirmed(s) => Some(&s.ctx),
            Self::Reciprocated(r) => Some(&r.ctx),
            Self::Done(_) | Self::Cancelled(_) => None,
        }
    }

    /// Our user confirmed that the other device scanned our code: send
    /// `done`. Only legal in [`QrState::Scanned`]; elsewhere nothing changes.
    /// Past the deadline the flow is cancelled with `m.timeout` instead.
    pub fn confirm(self, now: u64) -> QrStep {
        match self {
            Self::Scanned(s) if now >= s.ctx.deadline => s.ctx.cancel(CancelCode::Timeout),
            Self::Scanned(s) => {
                let done = s.ctx.done();
                let state = if s.their_done {
                    Self::Done(Done { verified: s.ctx.outcome.clone() })
                } else {
                    Self::Confirmed(s)
                };
                QrStep { state, outgoing: vec![done] }
            }
            other => QrStep::stay(other),
        }
    }

    /// Cancels with `code`; a finished flow stays as it is.
    pub fn cancel(self, code: CancelCode) -> QrStep {
        match self.ctx() {
            Some(ctx) => ctx.cancel(code),
            None => QrStep::stay(self),
        }
    }

    /// Cancels with `m.timeout` if the deadline passed.
    pub fn poll_timeout(self, now: u64) -> QrStep {
        match self.timeout_at() {
            Some(deadline) if now >= deadline => self.cancel(CancelCode::Timeout),
            _ => QrStep::stay(self),
        }
    }

    /// Handles one incoming `m.key.verification.*` message of this flow
    /// from the other device.
    pub fn receive(self, event_type: &str, content: &Value, now: u64) -> QrStep {
        let Some(ctx) = self.ctx() else { return QrStep::stay(self) };
        match triage(&ctx.flow, ctx.deadline, event_type, content, now) {
            Triage::NotThisFlow => return QrStep::stay(self),
            Triage::TimedOut => return self.cancel(CancelCode::Timeout),
            Triage::CancelledByThem(c) => return QrStep::stay(Self::Cancelled(c)),
            Triage::Handle => {}
        }
        match (self, event_type) {
            (Self::Shown(s), event_types::START) => {
                let method = content.get("method").and_then(Value::as_str);
                let secret = content.get("secret").and_then(Value::as_str);
                match (method, secret) {
                    (Some(METHOD_RECIPROCATE_V1), Some(secret))
                        if s.payload.secret_matches(secret) =>
                    {
                        QrStep::stay(Self::Scanned(s))
                    }
                    (Some(METHOD_RECIPROCATE_V1), _) => s.ctx.cancel(CancelCode::KeyMismatch),
                    _ => s.ctx.cancel(CancelCode::UnknownMethod),
                }
            }
            (Self::Confirmed(s), event_types::DONE) => {
                QrStep::stay(Self::Done(Done { verified: s.ctx.outcome.clone() }))
            }
            (Self::Reciprocated(r), event_types::DONE) => {
                let done = r.ctx.done();
                QrStep { state: Self::Done(Done { verified: r.ctx.outcome }), outgoing: vec![done] }
            }
            // Their `done` may overtake our user's confirmation: remember it.
            (Self::Scanned(mut s), event_types::DONE) => {
                s.their_done = true;
                QrStep::stay(Self::Scanned(s))
            }
            (
                state,
                event_types::START
                | event_types::ACCEPT
                | event_types::KEY
                | event_types::MAC
                | event_types::DONE,
            ) => state.cancel(CancelCode::UnexpectedMessage),
            (state, _) => QrStep::stay(state),
        }
    }
}

#[cfg(test)]
#[path = "qr_flow_tests.rs"]
mod tests;
