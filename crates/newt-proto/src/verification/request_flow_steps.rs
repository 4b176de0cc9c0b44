//! The steps of a [`RequestFlow`]: the other side's messages, the user's
//! actions, cancels and the timeout, and what the driver may read.

use super::*;

/// The flow after a SAS step from `Ready` (a SAS still `Created` stays
/// `Ready`, with the code we show) or later.
fn after_sas(ctx: Ctx, step: SasStep, shown: Option<Shown>) -> RequestStep {
    let verified = match &step.state {
        SasState::Done(done) => Some(done.verified.clone()),
        _ => None,
    };
    let state = match step.state {
        SasState::Created(created) => RequestState::Ready(Ready { created, shown }),
        other => RequestState::Sas(other),
    };
    RequestStep { verified, ..RequestFlow::new(ctx, state).send(step.outgoing) }
}

fn after_qr(ctx: Ctx, step: QrStep) -> RequestStep {
    let verified = match &step.state {
        QrState::Done(done) => Some(done.verified.clone()),
        _ => None,
    };
    RequestStep {
        verified,
        ..RequestFlow::new(ctx, RequestState::Qr(step.state)).send(step.outgoing)
    }
}

impl RequestFlow {
    /// Handles one message of the other side (`m.key.verification.*`;
    /// `ours` are the methods we offer now). A message from another user
    /// than the flow's, from a device other than the flow's when
    /// `sender_device` proves it, or reaching a finished flow is ignored;
    /// one the flow does not expect cancels it. Their `ready` may need the
    /// answering device's keys: the step asks ([`RequestStep::needs_keys`])
    /// and the same message is passed again with `keys`.
    pub fn receive(
        self,
        msg: &Incoming<'_>,
        ours: VerificationMethods,
        keys: Option<FixedKeys>,
        now: u64,
    ) -> RequestStep {
        if msg.sender != &self.ctx.other_user || self.is_finished() {
            return self.stay();
        }
        // Once the flow is with one device, a message provably sent by
        // another device of the user is not part of it.
        if let (Some(sent_by), Some(with)) = (msg.sender_device, &self.ctx.other_device) {
            if sent_by != with {
                return self.stay();
            }
        }
        let Self { ctx, state } = self;
        let content = msg.content;
        match (state, msg.event_type) {
            (RequestState::Requested, event_types::READY) => {
                Self::on_ready(ctx, msg, ours, keys, now)
            }
            (
                state @ (RequestState::Requested | RequestState::RequestReceived),
                event_types::CANCEL,
            ) => {
                let code = cancel_code(content);
                // A fanned-out request declined by one device is withdrawn
                // from the others (a to-device cancel does not say which
                // device sent it; the decliner ignores a cancel for a flow
                // it cancelled).
                let fanned_out =
                    matches!(state, RequestState::Requested) && ctx.requested_devices.len() > 1;
                let outgoing =
                    if fanned_out { vec![cancel_content(&ctx.flow, &code)] } else { Vec::new() };
                Self::new(ctx, RequestState::Cancelled(Cancelled { code, by_us: false }))
                    .send(outgoing)
            }
            (RequestState::Ready(ready), event_type) => {
                let sas = SasState::Created(ready.created);
                if event_type == event_types::START && !names_flow_device(&ctx, content) {
                    // A start must name the device the flow is with.
                    return after_sas(ctx, sas.cancel(CancelCode::UserMismatch), None);
                }
                let reciprocate = str_field(content, "method") == Some(METHOD_RECIPROCATE_V1);
                if event_type == event_types::START && reciprocate {
                    // They scanned our code (if we showed one).
                    return match ready.shown {
                        Some(shown) => {
                            after_qr(ctx, QrState::Shown(shown).receive(event_type, content, now))
                        }
                        None => after_sas(ctx, sas.cancel(CancelCode::UnknownMethod), None),
                    };
                }
                after_sas(ctx, sas.receive(event_type, content, now), ready.shown)
            }
            (RequestState::Sas(sas), event_type) => {
                if event_type == event_types::START && !names_flow_device(&ctx, content) {
                    return after_sas(ctx, sas.cancel(CancelCode::UserMismatch), None);
                }
                after_sas(ctx, sas.receive(event_type, content, now), None)
            }
            (RequestState::Qr(qr), event_type) => {
                after_qr(ctx, qr.receive(event_type, content, now))
            }
            (state @ RequestState::Cancelled(_), _) => Self::new(ctx, state).stay(),
            (RequestState::Requested | RequestState::RequestReceived, _) => {
                Self::cancel_handshake(ctx, CancelCode::UnexpectedMessage)
            }
        }
    }

    /// Their `ready` to our request: fixes the device that answered (and
    /// its keys); the other devices of a fanned-out request are withdrawn
    /// from with `m.accepted`.
    fn on_ready(
        mut ctx: Ctx,
        msg: &Incoming<'_>,
        ours: VerificationMethods,
        keys: Option<FixedKeys>,
        now: u64,
    ) -> RequestStep {
        let from = from_device(msg.content);
        if let (Some(from), Some(sent_by)) = (&from, msg.sender_device) {
            if from != sent_by {
                // A device answering in another device's name.
                return Self::new(ctx, RequestState::Requested).stay();
            }
        }
        let Some(from) = from else {
            return Self::cancel_handshake(ctx, CancelCode::InvalidMessage);
        };
        let allowed = match (&ctx.flow, &ctx.other_device) {
            (_, Some(d)) => d == &from,
            (FlowId::ToDevice(_), None) => ctx.requested_devices.contains(&from),
            (FlowId::InRoom { .. }, None) => true,
        };
        if !allowed {
            // Not a device we asked: ignore it (never cancel for others).
            return Self::new(ctx, RequestState::Requested).stay();
        }
        let methods = methods_of(msg.content);
        if !ours.common(&methods) {
            return Self::cancel_handshake(ctx, CancelCode::UnknownMethod);
        }
        let fixed = ctx.keys.clone().or(keys).filter(|k| k.ids.other.device_id == from);
        let Some(fixed) = fixed else {
            let step = Self::new(ctx, RequestState::Requested).stay();
            return RequestStep { needs_keys: Some(from), ..step };
        };
        let others: Vec<DeviceId> =
            ctx.requested_devices.iter().filter(|d| **d != from).cloned().collect();
        let withdrawn = (!others.is_empty()).then(|| Withdrawal {
            devices: others,
            cancel: cancel_content(&ctx.flow, &CancelCode::Accepted),
        });
        ctx.other_device = Some(from.clone());
        ctx.requested_devices = vec![from];
        ctx.their_methods = methods;
        let step = match Created::new(fixed.ids.clone(), ctx.flow.clone(), now) {
            Ok(created) => {
                ctx.keys = Some(fixed);
                Self::new(ctx, RequestState::Ready(Ready { created, shown: None })).stay()
            }
            Err(code) => Self::cancel_handshake(ctx, code),
        };
        RequestStep { withdrawn, ..step }
    }

    /// In a room, one of our own events about this flow: another of our
    /// devices answering (`ready`, `start`) or declining (`cancel`) a
    /// request we also received ends ours; our own echoes change nothing.
    pub fn own_event(
        self,
        event_type: &str,
        content: &Value,
        own_device: &DeviceId,
    ) -> RequestStep {
        let code = match event_type {
            event_types::READY | event_types::START => str_field(content, "from_device")
                .filter(|d| *d != own_device.as_str())
                .map(|_| CancelCode::Accepted),
            // A cancel carries no `from_device`; our own cancels end our
            // flow already, so this one is another device's.
            event_types::CANCEL => Some(cancel_code(content)),
            _ => None,
        };
        match (code, self.state) {
            (Some(code), RequestState::RequestReceived) => {
                Self::new(self.ctx, RequestState::Cancelled(Cancelled { code, by_us: false }))
                    .stay()
            }
            (_, state) => Self::new(self.ctx, state).stay(),
        }
    }

    /// Accepts their request: sends `ready` with `ours`. The other device's
    /// keys are fixed now: without `keys` the step asks for them.
    pub fn accept(self, ours: VerificationMethods, keys: Option<FixedKeys>, now: u64) -> Action {
        let device = match (&self.state, &self.ctx.other_device) {
            (RequestState::RequestReceived, Some(d)) => d.clone(),
            _ => return self.refuse("no request to accept"),
        };
        if !ours.common(&self.ctx.their_methods) {
            return self.refuse("no verification method in common");
        }
        let Some(keys) = keys.filter(|k| k.ids.other.device_id == device) else {
            return Ok(RequestStep { needs_keys: Some(device), ..self.stay() });
        };
        let mut ctx = self.ctx;
        Ok(match Created::new(keys.ids.clone(), ctx.flow.clone(), now) {
            Ok(created) => {
                let mut content = Map::new();
                content.insert("from_device".into(), json!(keys.ids.own_device));
                content.insert("methods".into(), ours.to_wire());
                let ready = ctx.out(event_types::READY, content);
                ctx.keys = Some(keys);
                Self::new(ctx, RequestState::Ready(Ready { created, shown: None }))
                    .send(vec![ready])
            }
            Err(code) => Self::cancel_handshake(ctx, code),
        })
    }

    /// Starts SAS in a ready flow (either side may).
    pub fn start_sas(self, ours: VerificationMethods) -> Action {
        if !ours.sas || !self.ctx.their_methods.iter().any(|t| t == METHOD_SAS_V1) {
            return self.refuse("SAS is not a method both sides offered");
        }
        match self.state {
            RequestState::Ready(ready) => {
                let (started, out) = ready.created.start();
                Ok(Self::new(self.ctx, RequestState::Sas(SasState::Started(started)))
                    .send(vec![out]))
            }
            state => Self::new(self.ctx, state).refuse("not ready"),
        }
    }

    /// The QR code to show in a ready flow, as the bytes to render (the
    /// same on every call). `None` when the other side cannot scan, we do
    /// not show codes, or we cannot vouch for the keys a code would carry
    /// (another user: we need our trusted master key, theirs, and our
    /// user-signing key).
    pub fn qr_code(self, ours: VerificationMethods, now: u64) -> Action<(Self, Option<Vec<u8>>)> {
        let Self { ctx, state } = self;
        let RequestState::Ready(mut ready) = state else {
            return Self::new(ctx, state).refuse("not ready");
        };
        let theirs = |m: &str| ctx.their_methods.iter().any(|t| t == m);
        let can_scan = theirs(METHOD_QR_SCAN_V1) && theirs(METHOD_RECIPROCATE_V1);
        let Some(keys) = &ctx.keys else {
            return Ok((Self::new(ctx, RequestState::Ready(ready)), None));
        };
        // Verifying another user records something only if we can sign
        // their master key with our user-signing key.
        let other_user_ok = ctx.other_user == keys.ids.own_user || keys.can_sign_users;
        if !can_scan || !ours.show_qr || !other_user_ok {
            return Ok((Self::new(ctx, RequestState::Ready(ready)), None));
        }
        if ready.shown.is_none() {
            ready.shown = qr_flow::show(&keys.ids, keys.believed_own_master, ctx.flow.clone(), now);
        }
        let bytes = ready.shown.as_ref().map(Shown::bytes).transpose();
        let flow = Self::new(ctx, RequestState::Ready(ready));
        match bytes {
            Ok(bytes) => Ok((flow, bytes)),
            Err(e) => Err(Box::new(Refused { flow, reason: Refusal::Scan(e.into()) })),
        }
    }

    /// Scans the other device's QR code in a ready flow: keys as expected
    /// → the reciprocating `start`; other keys → cancelled with
    /// `m.key_mismatch`; a code that is not for this flow is refused and
    /// the flow stays as it was.
    pub fn scan_qr(self, ours: VerificationMethods, bytes: &[u8], now: u64) -> Action {
        let Self { ctx, state } = self;
        let RequestState::Ready(ready) = state else {
            return Self::new(ctx, state).refuse("not ready");
        };
        let flow = |ctx| Self::new(ctx, RequestState::Ready(ready));
        if !ours.scan_qr {
            return flow(ctx).refuse("scanning is not a method we offered");
        }
        let Some(keys) = &ctx.keys else { return flow(ctx).refuse("not ready") };
        if ctx.other_user != keys.ids.own_user && !keys.can_sign_users {
            return flow(ctx).refuse("verifying another user needs our user-signing key");
        }
        match qr_flow::scan(&keys.ids, keys.believed_own_master, ctx.flow.clone(), bytes, now) {
            Ok(step) => Ok(after_qr(ctx, step)),
            Err(e) => Err(Box::new(Refused { flow: flow(ctx), reason: Refusal::Scan(e) })),
        }
    }

    /// The user confirms that the other device reported a successful scan
    /// of our code: sends `done`.
    pub fn confirm_qr_scanned(self, now: u64) -> Action {
        match self.state {
            RequestState::Qr(qr @ QrState::Scanned(_)) => Ok(after_qr(self.ctx, qr.confirm(now))),
            state => Self::new(self.ctx, state).refuse("our QR code was not scanned"),
        }
    }

    /// The user says the SAS match: sends our `mac` (see
    /// [`crate::verification::sas_flow::KeysExchanged::confirm`]).
    pub fn confirm_sas(self, now: u64) -> Action {
        self.sas_action(|sas| match sas {
            SasState::KeysExchanged(k) => Ok(k.confirm(now)),
            other => Err(Box::new(other)),
        })
    }

    /// The user says the SAS differ: cancels with `m.mismatched_sas`.
    pub fn sas_mismatch(self) -> Action {
        self.sas_action(|sas| match sas {
            SasState::KeysExchanged(k) => Ok(k.mismatch()),
            other => Err(Box::new(other)),
        })
    }

    fn sas_action(self, action: impl FnOnce(SasState) -> Result<SasStep, Box<SasState>>) -> Action {
        match self.state {
            RequestState::Sas(sas) => match action(sas) {
                Ok(step) => Ok(after_sas(self.ctx, step, None)),
                Err(sas) => Self::new(self.ctx, RequestState::Sas(*sas))
                    .refuse("the SAS cannot be confirmed now"),
            },
            state @ RequestState::Ready(_) => {
                Self::new(self.ctx, state).refuse("the SAS cannot be confirmed now")
            }
            state => Self::new(self.ctx, state).refuse("SAS not started"),
        }
    }

    /// Cancels with `code` (e.g. `m.user`, `m.timeout`); a finished flow
    /// stays as it is. A cancel never finishes with verified keys.
    pub fn cancel(self, code: CancelCode) -> RequestStep {
        if self.is_finished() {
            return self.stay();
        }
        match self.state {
            RequestState::Ready(ready) => {
                after_sas(self.ctx, SasState::Created(ready.created).cancel(code), None)
            }
            RequestState::Sas(sas) => after_sas(self.ctx, sas.cancel(code), None),
            RequestState::Qr(qr) => after_qr(self.ctx, qr.cancel(code)),
            RequestState::Requested | RequestState::RequestReceived => {
                Self::cancel_handshake(self.ctx, code)
            }
            state @ RequestState::Cancelled(_) => Self::new(self.ctx, state).stay(),
        }
    }

    /// Cancels with `m.timeout` once `now` reaches the flow's deadline
    /// (ten minutes after it was created), unless it finished.
    pub fn poll_timeout(self, now: u64) -> RequestStep {
        if !self.is_finished() && now >= self.ctx.deadline {
            self.cancel(CancelCode::Timeout)
        } else {
            self.stay()
        }
    }

    /// Ends a flow whose last steps the driver could not store (their
    /// messages were dropped): cancelled with `code` on both sides, even a
    /// flow that just finished. One the other side cancelled stays as it
    /// is; one we cancelled sends its cancel again.
    pub fn abort(self, code: CancelCode) -> RequestStep {
        match self.cancelled().cloned() {
            Some(Cancelled { by_us: false, .. }) => self.stay(),
            Some(Cancelled { code, by_us: true }) => {
                let out = cancel_content(&self.ctx.flow, &code);
                self.send(vec![out])
            }
            None => Self::cancel_handshake(self.ctx, code),
        }
    }

    /// The flow ID and transport.
    pub fn flow_id(&self) -> &FlowId {
        &self.ctx.flow
    }

    /// The other user.
    pub fn other_user(&self) -> &UserId {
        &self.ctx.other_user
    }

    /// The other device, once known.
    pub fn other_device(&self) -> Option<&DeviceId> {
        self.ctx.other_device.as_ref()
    }

    /// The devices a to-device request went to (one, once answered).
    pub fn requested_devices(&self) -> &[DeviceId] {
        &self.ctx.requested_devices
    }

    /// The flow's deadline (ms): ten minutes after it was created.
    pub fn deadline(&self) -> u64 {
        self.ctx.deadline
    }

    /// Where it stands.
    pub fn state(&self) -> &RequestState {
        &self.state
    }

    /// Whether it is over (done or cancelled).
    pub fn is_finished(&self) -> bool {
        match &self.state {
            RequestState::Cancelled(_) => true,
            RequestState::Sas(s) => s.is_finished(),
            RequestState::Qr(s) => s.is_finished(),
            RequestState::Requested | RequestState::RequestReceived | RequestState::Ready(_) => {
                false
            }
        }
    }

    /// How it was cancelled, if it was.
    pub fn cancelled(&self) -> Option<&Cancelled> {
        match &self.state {
            RequestState::Cancelled(c)
            | RequestState::Sas(SasState::Cancelled(c))
            | RequestState::Qr(QrState::Cancelled(c)) => Some(c),
            _ => None,
        }
    }

    /// A marker that changes whenever a step moves the flow.
    pub fn marker(&self) -> StepMarker {
        StepMarker {
            state: std::mem::discriminant(&self.state),
            sas: match &self.state {
                RequestState::Sas(s) => Some(std::mem::discriminant(s)),
                _ => None,
            },
            qr: match &self.state {
                RequestState::Qr(s) => Some(std::mem::discriminant(s)),
                _ => None,
            },
        }
    }
}

/// Whether `content`'s `from_device` is the flow's device.
fn names_flow_device(ctx: &Ctx, content: &Value) -> bool {
    str_field(content, "from_device") == ctx.other_device.as_ref().map(DeviceId::as_str)
}
