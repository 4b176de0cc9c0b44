//! The verification methods once a flow is ready: SAS (start, compare,
//! confirm) and QR codes (show, scan, confirm), and what a finished flow
//! records.

use newt_proto::changes::Changes;
use newt_proto::identities::{signatures_upload_body, OwnIdentity};
use newt_proto::records::LocalTrust;
use newt_proto::verification::emoji::Emoji;
use newt_proto::verification::qr::METHOD_RECIPROCATE_V1;
use newt_proto::verification::qr_flow::{self, QrState, QrStep, METHOD_QR_SCAN_V1};
use newt_proto::verification::sas::METHOD_SAS_V1;
use newt_proto::verification::sas_flow::{SasState, SasStep, VerifiedKeys};
use newt_proto::verification::OutgoingContent;

use crate::machine::{Machine, State};
use crate::requests::{OutgoingRequest, RequestKind};
use crate::Error;

use super::{parse_key, Flow, Phase};

impl Machine {
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

    /// Applies one SAS step (see [`Machine::apply`]).
    pub(super) async fn apply_step(
        &self,
        st: &mut State,
        flow: &mut Flow,
        step: SasStep,
        changes: &mut Changes,
    ) -> Result<(), Error> {
        self.apply(st, flow, step.outgoing, Phase::Sas(step.state), changes).await
    }

    /// Applies one QR step (see [`Machine::apply`]).
    pub(super) async fn apply_qr_step(
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
        let material = self.trust_material().await?;
        let (own, private) = (&material.own, &material.private);
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
}
