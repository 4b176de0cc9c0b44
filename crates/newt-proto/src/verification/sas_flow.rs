//! One SAS (`m.sas.v1`) flow as a state machine, states as types.
//!
//! ```text
//!            start()                accept                 key (commitment checked)
//! Created ───────────> Started ─────────────> KeySent ─────────────────────────┐
//!    │ accept_start(start)                                                      v
//!    └──────────────> Accepted ──── key (we answer with ours) ──────────> KeysExchanged
//!                                                                             │ confirm()
//!                                  done           mac (checked)               v
//!                    Done <──── WaitingForDone <───────────────────────── Confirmed
//! any state ── cancel / timeout / bad message ──> Cancelled(code)
//! ```
//!
//! Each typed state offers only the user actions legal in it; [`SasState`]
//! wraps them for storage and dispatches incoming messages. Every call takes
//! `now` (ms); the flow cancels itself with `m.timeout` ten minutes after it
//! was created. The driver routes a message here only when it comes from the
//! expected user and device and carries this flow's ID.

use serde_json::{json, Map, Value};
use vodozemac::sas::{EstablishedSas, Sas};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, KeyError};

use crate::ids::{DeviceId, UserId};
use crate::json::strip_padding;

use super::emoji::Emoji;
use super::sas::{
    commitment, decimals, emoji_for, mac_fields, mac_info_prefix, sas_info, verify_mac_content,
    ExpectedKeys, MacMethod, SasParty, HASH_SHA256, KEY_AGREEMENT_V2, MAC_LEGACY, MAC_V2,
    METHOD_SAS_V1, SAS_DECIMAL, SAS_EMOJI,
};
use super::{
    cancel_content, event_types, triage, CancelCode, FlowId, OutgoingContent, Triage,
    VERIFICATION_TIMEOUT_MS,
};

/// Who verifies whom, with the other side's keys fixed at the start.
#[derive(Debug, Clone, PartialEq)]
pub struct SasIds {
    /// Our user.
    pub own_user: UserId,
    /// Our device.
    pub own_device: DeviceId,
    /// Our device's Ed25519 key (always MACed).
    pub own_device_key: Ed25519PublicKey,
    /// Our master key, MACed only if this device trusts it.
    pub own_master_key: Option<Ed25519PublicKey>,
    /// The other user.
    pub other_user: UserId,
    /// The other device and the keys we expect it to MAC.
    pub other: ExpectedKeys,
}

/// What the keys of a finished flow proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKeys {
    /// The other user.
    pub user_id: UserId,
    /// The other device.
    pub device_id: DeviceId,
    /// The other device's Ed25519 key, if it was MACed: mark the device
    /// verified (our own device: sign it with our SSK).
    pub device_key: Option<Ed25519PublicKey>,
    /// The other user's master key, if MACed: another user's is signed with
    /// our USK; our own is now trusted by this device.
    pub master_key: Option<Ed25519PublicKey>,
}

/// The methods both sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The MAC method.
    pub mac: MacMethod,
    /// Emoji SAS allowed (decimal always is when offered).
    pub emoji: bool,
    /// Decimal SAS allowed.
    pub decimal: bool,
}

/// vodozemac's ephemeral SAS key pair; `Debug` shows only the public key.
struct Ephemeral(Sas);

impl std::fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ephemeral({})", self.0.public_key().to_base64())
    }
}

#[derive(Debug)]
struct Ctx {
    ids: SasIds,
    flow: FlowId,
    deadline: u64,
}

impl Ctx {
    fn out(&self, event_type: &'static str, mut fields: Map<String, Value>) -> OutgoingContent {
        self.flow.decorate(&mut fields);
        OutgoingContent { event_type, content: Value::Object(fields) }
    }

    fn cancel(self, code: CancelCode) -> SasStep {
        let out = cancel_content(&self.flow, &code);
        SasStep { state: SasState::Cancelled(Cancelled { code, by_us: true }), outgoing: vec![out] }
    }

    fn own_party<'a>(&'a self, key: &'a str) -> SasParty<'a> {
        SasParty {
            user_id: self.ids.own_user.as_str(),
            device_id: self.ids.own_device.as_str(),
            ephemeral_key: key,
        }
    }

    fn other_party<'a>(&'a self, key: &'a str) -> SasParty<'a> {
        SasParty {
            user_id: self.ids.other_user.as_str(),
            device_id: self.ids.other.device_id.as_str(),
            ephemeral_key: key,
        }
    }
}

/// The result of one step: the next state and what to send.
#[derive(Debug)]
pub struct SasStep {
    /// The state after the step.
    pub state: SasState,
    /// Messages to send, in order.
    pub outgoing: Vec<OutgoingContent>,
}

impl SasStep {
    fn stay(state: SasState) -> Self {
        Self { state, outgoing: Vec::new() }
    }
}

/// A flow not yet started: we either start it or accept the other side's
/// `start`.
#[derive(Debug)]
pub struct Created {
    ctx: Ctx,
}

/// We sent `start`; waiting for `accept`.
#[derive(Debug)]
pub struct Started {
    ctx: Ctx,
    sas: Ephemeral,
    start_content: Value,
}

/// We accepted their `start`; waiting for their `key`.
#[derive(Debug)]
pub struct Accepted {
    ctx: Ctx,
    sas: Ephemeral,
    agreed: Agreed,
}

/// We started, they accepted, we sent our `key`; waiting for theirs.
#[derive(Debug)]
pub struct KeySent {
    ctx: Ctx,
    sas: Ephemeral,
    start_content: Value,
    commitment: String,
    agreed: Agreed,
}

/// Both keys are known: the SAS can be shown.
#[derive(Debug)]
pub struct KeysExchanged {
    ctx: Ctx,
    sas: EstablishedSas,
    agreed: Agreed,
    bytes: [u8; 6],
    their_mac: Option<VerifiedKeys>,
}

/// Our user confirmed and we sent our `mac`; waiting for theirs.
#[derive(Debug)]
pub struct Confirmed {
    ctx: Ctx,
    sas: EstablishedSas,
    agreed: Agreed,
    their_done: bool,
}

/// Both MACs checked and we sent `done`; waiting for theirs.
#[derive(Debug)]
pub struct WaitingForDone {
    ctx: Ctx,
    verified: VerifiedKeys,
}

/// Finished: both sides sent `done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// What was verified.
    pub verified: VerifiedKeys,
}

/// Cancelled, by us or by them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancelled {
    /// Why.
    pub code: CancelCode,
    /// Whether we cancelled (and sent the `cancel`).
    pub by_us: bool,
}

/// Any state of a SAS flow.
#[derive(Debug)]
pub enum SasState {
    /// Not started.
    Created(Created),
    /// We sent `start`.
    Started(Started),
    /// We accepted their `start`.
    Accepted(Accepted),
    /// We sent our `key` after their `accept`.
    KeySent(KeySent),
    /// The SAS can be compared.
    KeysExchanged(KeysExchanged),
    /// We confirmed and sent our `mac`.
    Confirmed(Confirmed),
    /// Both MACs checked, our `done` sent.
    WaitingForDone(WaitingForDone),
    /// Finished.
    Done(Done),
    /// Cancelled.
    Cancelled(Cancelled),
}

fn str_list<'a>(content: &'a Value, field: &str) -> Result<Vec<&'a str>, CancelCode> {
    content
        .get(field)
        .and_then(Value::as_array)
        .ok_or(CancelCode::InvalidMessage)?
        .iter()
        .map(|v| v.as_str().ok_or(CancelCode::InvalidMessage))
        .collect()
}

fn str_field<'a>(content: &'a Value, field: &str) -> Result<&'a str, CancelCode> {
    content.get(field).and_then(Value::as_str).ok_or(CancelCode::InvalidMessage)
}

fn parse_curve_key(content: &Value) -> Result<Curve25519PublicKey, CancelCode> {
    let key = str_field(content, "key")?;
    Curve25519PublicKey::from_base64(strip_padding(key)).map_err(|_| CancelCode::InvalidMessage)
}

fn establish(sas: Sas, their: Curve25519PublicKey) -> Result<EstablishedSas, CancelCode> {
    sas.diffie_hellman(their).map_err(|e| match e {
        KeyError::NonContributoryKey => CancelCode::KeyMismatch,
        _ => CancelCode::InvalidMessage,
    })
}

impl Created {
    /// A new flow with `ids` in `flow`, timing out 10 minutes after `now`.
    /// Refuses (`m.key_mismatch`) a device whose ID equals one of its
    /// owner's cross-signing key IDs.
    pub fn new(ids: SasIds, flow: FlowId, now: u64) -> Result<Self, CancelCode> {
        let device_key_id = format!("ed25519:{}", ids.other.device_id);
        if ids.other.cross_signing_key_ids.contains(&device_key_id) {
            return Err(CancelCode::KeyMismatch);
        }
        Ok(Self { ctx: Ctx { ids, flow, deadline: now.saturating_add(VERIFICATION_TIMEOUT_MS) } })
    }

    /// Starts: returns the `start` to send.
    pub fn start(self) -> (Started, OutgoingContent) {
        let mut fields = Map::new();
        fields.insert("method".into(), json!(METHOD_SAS_V1));
        fields.insert("from_device".into(), json!(self.ctx.ids.own_device));
        fields.insert("key_agreement_protocols".into(), json!([KEY_AGREEMENT_V2]));
        fields.insert("hashes".into(), json!([HASH_SHA256]));
        fields.insert("message_authentication_codes".into(), json!([MAC_V2, MAC_LEGACY]));
        fields.insert("short_authentication_string".into(), json!([SAS_DECIMAL, SAS_EMOJI]));
        let out = self.ctx.out(event_types::START, fields);
        let start_content = out.content.clone();
        (Started { ctx: self.ctx, sas: Ephemeral(Sas::new()), start_content }, out)
    }

    /// Accepts the other side's `start` content (as received): picks the
    /// methods and sends `accept` with our commitment, or cancels.
    pub fn accept_start(self, start: &Value, now: u64) -> SasStep {
        if now >= self.ctx.deadline {
            return self.ctx.cancel(CancelCode::Timeout);
        }
        match Self::choose(&self.ctx, start) {
            Ok((agreed, fields)) => {
                let sas = Ephemeral(Sas::new());
                let mut fields = fields;
                match commitment(&sas.0.public_key().to_base64(), start) {
                    Ok(c) => fields.insert("commitment".into(), json!(c)),
                    Err(_) => return self.ctx.cancel(CancelCode::InvalidMessage),
                };
                let out = self.ctx.out(event_types::ACCEPT, fields);
                SasStep {
                    state: SasState::Accepted(Accepted { ctx: self.ctx, sas, agreed }),
                    outgoing: vec![out],
                }
            }
            Err(code) => self.ctx.cancel(code),
        }
    }

    fn choose(ctx: &Ctx, start: &Value) -> Result<(Agreed, Map<String, Value>), CancelCode> {
        if str_field(start, "method")? != METHOD_SAS_V1 {
            return Err(CancelCode::UnknownMethod);
        }
        if str_field(start, "from_device")? != ctx.ids.other.device_id.as_str() {
            return Err(CancelCode::UserMismatch);
        }
        if !str_list(start, "key_agreement_protocols")?.contains(&KEY_AGREEMENT_V2)
            || !str_list(start, "hashes")?.contains(&HASH_SHA256)
        {
            return Err(CancelCode::UnknownMethod);
        }
        let macs = str_list(start, "message_authentication_codes")?;
        let (mac, mac_name) = MacMethod::choose(macs).ok_or(CancelCode::UnknownMethod)?;
        let offered = str_list(start, "short_authentication_string")?;
        let decimal = offered.contains(&SAS_DECIMAL);
        let emoji = offered.contains(&SAS_EMOJI);
        if !decimal && !emoji {
            return Err(CancelCode::UnknownMethod);
        }
        let sas: Vec<&str> = [(decimal, SAS_DECIMAL), (emoji, SAS_EMOJI)]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        let mut fields = Map::new();
        fields.insert("method".into(), json!(METHOD_SAS_V1));
        fields.insert("key_agreement_protocol".into(), json!(KEY_AGREEMENT_V2));
        fields.insert("hash".into(), json!(HASH_SHA256));
        fields.insert("message_authentication_code".into(), json!(mac_name));
        fields.insert("short_authentication_string".into(), json!(sas));
        Ok((Agreed { mac, emoji, decimal }, fields))
    }
}

impl Started {
    fn on_accept(self, accept: &Value) -> SasStep {
        let checked = (|| {
            // The spec's `accept` has no `method` (matrix-sdk-crypto sends
            // none); if one is present it must be ours.
            let method = accept.get("method").map(|m| m.as_str());
            if matches!(method, Some(m) if m != Some(METHOD_SAS_V1))
                || str_field(accept, "key_agreement_protocol")? != KEY_AGREEMENT_V2
                || str_field(accept, "hash")? != HASH_SHA256
            {
                return Err(CancelCode::UnknownMethod);
            }
            // Checked against the start we sent: a legacy MAC when we
            // offered v2 is a downgrade, refused like any method we did not
            // offer.
            let offered = str_list(&self.start_content, "message_authentication_codes")?;
            let chosen = str_field(accept, "message_authentication_code")?;
            let mac = MacMethod::check_choice(offered, chosen).ok_or(CancelCode::UnknownMethod)?;
            let sas = str_list(accept, "short_authentication_string")?;
            if sas.is_empty() || sas.iter().any(|s| *s != SAS_DECIMAL && *s != SAS_EMOJI) {
                return Err(CancelCode::UnknownMethod);
            }
            let commitment = str_field(accept, "commitment")?.to_owned();
            let agreed = Agreed {
                mac,
                emoji: sas.contains(&SAS_EMOJI),
                decimal: sas.contains(&SAS_DECIMAL),
            };
            Ok((agreed, commitment))
        })();
        match checked {
            Ok((agreed, commitment)) => {
                let mut fields = Map::new();
                fields.insert("key".into(), json!(self.sas.0.public_key().to_base64()));
                let out = self.ctx.out(event_types::KEY, fields);
                let next = KeySent {
                    ctx: self.ctx,
                    sas: self.sas,
                    start_content: self.start_content,
                    commitment,
                    agreed,
                };
                SasStep { state: SasState::KeySent(next), outgoing: vec![out] }
            }
            Err(code) => self.ctx.cancel(code),
        }
    }

    /// Both sides sent `start`. Same method: the start of the
    /// lexicographically smaller user ID (then device ID) wins; the other is
    /// ignored. Different methods: `m.unexpected_message`.
    fn on_start(self, theirs: &Value, now: u64) -> SasStep {
        if theirs.get("method").and_then(Value::as_str) != Some(METHOD_SAS_V1) {
            return self.ctx.cancel(CancelCode::UnexpectedMessage);
        }
        let ours = (self.ctx.ids.own_user.as_str(), self.ctx.ids.own_device.as_str());
        let other = (self.ctx.ids.other_user.as_str(), self.ctx.ids.other.device_id.as_str());
        if ours < other {
            // Ours wins: theirs is ignored, they will accept ours.
            SasStep::stay(SasState::Started(self))
        } else {
            Created { ctx: self.ctx }.accept_start(theirs, now)
        }
    }
}

impl Accepted {
    fn on_key(self, content: &Value) -> SasStep {
        let their_key = match parse_curve_key(content) {
            Ok(k) => k,
            Err(code) => return self.ctx.cancel(code),
        };
        let our_key = self.sas.0.public_key();
        let established = match establish(self.sas.0, their_key) {
            Ok(e) => e,
            Err(code) => return self.ctx.cancel(code),
        };
        let mut fields = Map::new();
        fields.insert("key".into(), json!(our_key.to_base64()));
        let out = self.ctx.out(event_types::KEY, fields);
        // They started: they are the "start" party.
        let next = KeysExchanged::new(self.ctx, established, self.agreed, false);
        SasStep { state: SasState::KeysExchanged(next), outgoing: vec![out] }
    }
}

impl KeySent {
    fn on_key(self, content: &Value) -> SasStep {
        let their_key = match parse_curve_key(content) {
            Ok(k) => k,
            Err(code) => return self.ctx.cancel(code),
        };
        let expected = commitment(&their_key.to_base64(), &self.start_content);
        if expected.as_deref() != Ok(self.commitment.as_str()) {
            return self.ctx.cancel(CancelCode::MismatchedCommitment);
        }
        match establish(self.sas.0, their_key) {
            Ok(established) => SasStep::stay(SasState::KeysExchanged(KeysExchanged::new(
                self.ctx,
                established,
                self.agreed,
                true,
            ))),
            Err(code) => self.ctx.cancel(code),
        }
    }
}

impl KeysExchanged {
    fn new(ctx: Ctx, sas: EstablishedSas, agreed: Agreed, we_started: bool) -> Self {
        let ours = sas.our_public_key().to_base64();
        let theirs = sas.their_public_key().to_base64();
        let (start, accept) = if we_started {
            (ctx.own_party(&ours), ctx.other_party(&theirs))
        } else {
            (ctx.other_party(&theirs), ctx.own_party(&ours))
        };
        let info = sas_info(start, accept, ctx.flow.as_str());
        let bytes = *sas.bytes(&info).as_bytes();
        Self { ctx, sas, agreed, bytes, their_mac: None }
    }

    /// The seven emoji, if emoji SAS was agreed.
    pub fn emoji(&self) -> Option<[Emoji; 7]> {
        self.agreed.emoji.then(|| emoji_for(&self.bytes))
    }

    /// The three numbers, if decimal SAS was agreed.
    pub fn decimals(&self) -> Option<[u16; 3]> {
        self.agreed.decimal.then(|| decimals(&self.bytes))
    }

    /// The agreed methods.
    pub fn agreed(&self) -> &Agreed {
        &self.agreed
    }

    /// The user says the SAS match: send our `mac` (and `done` if theirs
    /// already checked).
    pub fn confirm(self, now: u64) -> SasStep {
        if now >= self.ctx.deadline {
            return self.ctx.cancel(CancelCode::Timeout);
        }
        let ids = &self.ctx.ids;
        let prefix = mac_info_prefix(
            &ids.own_user,
            &ids.own_device,
            &ids.other_user,
            &ids.other.device_id,
            self.ctx.flow.as_str(),
        );
        let mut keys =
            vec![(format!("ed25519:{}", ids.own_device), ids.own_device_key.to_base64())];
        if let Some(master) = ids.own_master_key {
            keys.push((format!("ed25519:{}", master.to_base64()), master.to_base64()));
        }
        let (mac, keys_mac) = mac_fields(&self.sas, self.agreed.mac, &prefix, &keys);
        let mut fields = Map::new();
        fields.insert("mac".into(), Value::Object(mac));
        fields.insert("keys".into(), json!(keys_mac));
        let mac_out = self.ctx.out(event_types::MAC, fields);
        match self.their_mac {
            Some(verified) => {
                let done = self.ctx.out(event_types::DONE, Map::new());
                SasStep {
                    state: SasState::WaitingForDone(WaitingForDone { ctx: self.ctx, verified }),
                    outgoing: vec![mac_out, done],
                }
            }
            None => SasStep {
                state: SasState::Confirmed(Confirmed {
                    ctx: self.ctx,
                    sas: self.sas,
                    agreed: self.agreed,
                    their_done: false,
                }),
                outgoing: vec![mac_out],
            },
        }
    }

    /// The user says the SAS differ: cancel with `m.mismatched_sas`.
    pub fn mismatch(self) -> SasStep {
        self.ctx.cancel(CancelCode::MismatchedSas)
    }

    fn on_mac(mut self, content: &Value) -> SasStep {
        match check_mac(&self.ctx, &self.sas, self.agreed.mac, content) {
            Ok(verified) => {
                // Kept until our user confirms; never acted on before that.
                self.their_mac = Some(verified);
                SasStep::stay(SasState::KeysExchanged(self))
            }
            Err(code) => self.ctx.cancel(code),
        }
    }
}

fn check_mac(
    ctx: &Ctx,
    sas: &EstablishedSas,
    method: MacMethod,
    content: &Value,
) -> Result<VerifiedKeys, CancelCode> {
    let mac = content.get("mac").and_then(Value::as_object).ok_or(CancelCode::InvalidMessage)?;
    let keys = str_field(content, "keys")?;
    let ids = &ctx.ids;
    // The sender's keys are MACed with the sender first.
    let prefix = mac_info_prefix(
        &ids.other_user,
        &ids.other.device_id,
        &ids.own_user,
        &ids.own_device,
        ctx.flow.as_str(),
    );
    let v = verify_mac_content(sas, method, &prefix, &ids.other, mac, keys)?;
    Ok(VerifiedKeys {
        user_id: ids.other_user.clone(),
        device_id: ids.other.device_id.clone(),
        device_key: v.device_key,
        master_key: v.master_key,
    })
}

impl Confirmed {
    fn on_mac(self, content: &Value) -> SasStep {
        match check_mac(&self.ctx, &self.sas, self.agreed.mac, content) {
            Ok(verified) => {
                let done = self.ctx.out(event_types::DONE, Map::new());
                let state = if self.their_done {
                    SasState::Done(Done { verified })
                } else {
                    SasState::WaitingForDone(WaitingForDone { ctx: self.ctx, verified })
                };
                SasStep { state, outgoing: vec![done] }
            }
            Err(code) => self.ctx.cancel(code),
        }
    }
}

impl SasState {
    /// When the flow times out (ms), unless finished.
    pub fn timeout_at(&self) -> Option<u64> {
        self.ctx().map(|c| c.deadline)
    }

    /// Whether the flow is over (done or cancelled).
    pub fn is_finished(&self) -> bool {
        matches!(self, Self::Done(_) | Self::Cancelled(_))
    }

    fn ctx(&self) -> Option<&Ctx> {
        match self {
            Self::Created(s) => Some(&s.ctx),
            Self::Started(s) => Some(&s.ctx),
            Self::Accepted(s) => Some(&s.ctx),
            Self::KeySent(s) => Some(&s.ctx),
            Self::KeysExchanged(s) => Some(&s.ctx),
            Self::Confirmed(s) => Some(&s.ctx),
            Self::WaitingForDone(s) => Some(&s.ctx),
            Self::Done(_) | Self::Cancelled(_) => None,
        }
    }

    fn into_ctx(self) -> Option<Ctx> {
        match self {
            Self::Created(s) => Some(s.ctx),
            Self::Started(s) => Some(s.ctx),
            Self::Accepted(s) => Some(s.ctx),
            Self::KeySent(s) => Some(s.ctx),
            Self::KeysExchanged(s) => Some(s.ctx),
            Self::Confirmed(s) => Some(s.ctx),
            Self::WaitingForDone(s) => Some(s.ctx),
            Self::Done(_) | Self::Cancelled(_) => None,
        }
    }

    /// Cancels with `code` (e.g. `m.user`); a finished flow stays as it is.
    pub fn cancel(self, code: CancelCode) -> SasStep {
        if self.is_finished() {
            return SasStep::stay(self);
        }
        match self.into_ctx() {
            Some(ctx) => ctx.cancel(code),
            None => SasStep::stay(SasState::Cancelled(Cancelled { code, by_us: true })),
        }
    }

    /// Cancels with `m.timeout` if the deadline passed.
    pub fn poll_timeout(self, now: u64) -> SasStep {
        match self.timeout_at() {
            Some(deadline) if now >= deadline => self.cancel(CancelCode::Timeout),
            _ => SasStep::stay(self),
        }
    }

    /// Handles one incoming `m.key.verification.*` message from the other
    /// device. Messages of another flow, and anything after the flow
    /// finished, are ignored; an unexpected or invalid message cancels.
    pub fn receive(self, event_type: &str, content: &Value, now: u64) -> SasStep {
        let Some(ctx) = self.ctx() else { return SasStep::stay(self) };
        match triage(&ctx.flow, ctx.deadline, event_type, content, now) {
            Triage::NotThisFlow => return SasStep::stay(self),
            Triage::TimedOut => return self.cancel(CancelCode::Timeout),
            // Never answer a cancel with a cancel.
            Triage::CancelledByThem(c) => return SasStep::stay(SasState::Cancelled(c)),
            Triage::Handle => {}
        }
        use event_types::{ACCEPT, DONE, KEY, MAC, START};
        match (self, event_type) {
            (Self::Created(s), START) => s.accept_start(content, now),
            (Self::Started(s), START) => s.on_start(content, now),
            (Self::Started(s), ACCEPT) => s.on_accept(content),
            (Self::Accepted(s), KEY) => s.on_key(content),
            (Self::KeySent(s), KEY) => s.on_key(content),
            (Self::KeysExchanged(s), MAC) => s.on_mac(content),
            (Self::Confirmed(s), MAC) => s.on_mac(content),
            (Self::Confirmed(mut s), DONE) => {
                s.their_done = true;
                SasStep::stay(SasState::Confirmed(s))
            }
            (Self::WaitingForDone(s), DONE) => {
                SasStep::stay(SasState::Done(Done { verified: s.verified }))
            }
            (state, START | ACCEPT | KEY | MAC | DONE) => {
                state.cancel(CancelCode::UnexpectedMessage)
            }
            // request/ready and unknown types are not for this machine.
            (state, _) => SasStep::stay(state),
        }
    }
}

#[cfg(test)]
#[path = "sas_flow_tests.rs"]
mod tests;
