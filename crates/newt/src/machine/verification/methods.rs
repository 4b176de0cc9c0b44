//! The verification methods once a flow is ready: SAS (start, compare,
//! confirm) and QR codes (show, scan, confirm), and what a finished flow
//! records.

use newt_proto::changes::Changes;
use newt_proto::identities::{signatures_upload_body, OwnIdentity};
use newt_proto::records::LocalTrust;
use newt_proto::verification::emoji::Emoji;
use newt_proto::verification::request_flow::RequestState;
use newt_proto::verification::sas_flow::{KeysExchanged, SasState, VerifiedKeys};

use crate::machine::{Machine, State};
use crate::requests::{OutgoingRequest, RequestKind};
use crate::Error;

use super::{parse_key, refusal_error, Flow};

impl Machine {
    /// Starts SAS in a ready flow (either side may).
    pub async fn start_sas(&self, flow_id: &str) -> Result<(), Error> {
        self.with_flow(flow_id, |core, i| core.start_sas(i.ours)).await
    }

    /// The QR code to show in a ready flow, as the bytes to render (byte
    /// mode; the same bytes on every call). `None` when the other side
    /// cannot scan, or when we cannot vouch for the keys a code would carry
    /// (another user: we need our own trusted master key and theirs).
    pub async fn qr_code(&self, flow_id: &str) -> Result<Option<Vec<u8>>, Error> {
        let mut st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id)?;
        let checkpoint = Self::flow_checkpoint(&st);
        let Some(Flow { core, transport }) = st.flows.remove(&key) else {
            return Err(Error::UnknownFlow(flow_id.to_owned()));
        };
        let (core, result) = match core.qr_code(st.flows.methods, self.now()) {
            Ok((core, bytes)) => (core, Ok(bytes)),
            Err(refused) => (refused.flow, Err(refusal_error(refused.reason))),
        };
        st.flows.insert(key, Flow { core, transport });
        self.settle_flows(&mut st, &checkpoint, result, Changes::default(), false).await
    }

    /// Scans the other device's QR code in a ready flow. If its keys are
    /// the ones we expect, we send the reciprocating `start` and the flow
    /// finishes when the other side confirms; if not, the flow is cancelled
    /// with `m.key_mismatch`. A code that is not for this flow is an error
    /// and leaves the flow as it was.
    pub async fn scan_qr_code(&self, flow_id: &str, bytes: &[u8]) -> Result<(), Error> {
        self.with_flow(flow_id, |core, i| core.scan_qr(i.ours, bytes, i.now)).await
    }

    /// The user confirms that the other device reported a successful scan
    /// of our QR code: sends `done`; the flow finishes with the other
    /// side's `done`.
    pub async fn confirm_qr_scanned(&self, flow_id: &str) -> Result<(), Error> {
        self.with_flow(flow_id, |core, i| core.confirm_qr_scanned(i.now)).await
    }

    /// The SAS of a flow whose keys are exchanged.
    async fn keys_exchanged<T>(
        &self,
        flow_id: &str,
        read: impl FnOnce(&KeysExchanged) -> Option<T>,
    ) -> Option<T> {
        let st = self.inner.state.lock().await;
        let key = Self::flow_key(&st, flow_id).ok()?;
        match st.flows.get(&key)?.core.state() {
            RequestState::Sas(SasState::KeysExchanged(k)) => read(k),
            _ => None,
        }
    }

    /// The seven emoji to compare (symbol, English name, and number in the
    /// spec's table), once keys are exchanged.
    pub async fn sas_emoji(&self, flow_id: &str) -> Option<[Emoji; 7]> {
        self.keys_exchanged(flow_id, KeysExchanged::emoji).await
    }

    /// The seven emoji as indices into the spec table (0..64), for
    /// comparison with other implementations.
    pub async fn sas_emoji_indices(&self, flow_id: &str) -> Option<[u8; 7]> {
        self.keys_exchanged(flow_id, |k| k.emoji().map(|e| e.map(|e| e.number))).await
    }

    /// The three numbers to compare, once keys are exchanged.
    pub async fn sas_decimals(&self, flow_id: &str) -> Option<[u16; 3]> {
        self.keys_exchanged(flow_id, KeysExchanged::decimals).await
    }

    /// The user says the SAS match: sends our MAC. When both MACs check,
    /// the verified keys are recorded (see [`Machine::receive_sync`]).
    pub async fn confirm_sas(&self, flow_id: &str) -> Result<(), Error> {
        self.with_flow(flow_id, |core, i| core.confirm_sas(i.now)).await
    }

    /// The user says the SAS differ: cancels with `m.mismatched_sas`.
    pub async fn sas_mismatch(&self, flow_id: &str) -> Result<(), Error> {
        self.with_flow(flow_id, |core, _| core.sas_mismatch()).await
    }

    /// Records what a finished flow proved: the device is verified (our
    /// own: also signed with our SSK if we hold it); another user's master
    /// key is signed with our USK; our own master key is trusted.
    /// The store changes go into `changes`, committed by the caller.
    pub(super) async fn record_verified(
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
