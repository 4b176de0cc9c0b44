//! The request/ready handshake as the driver runs it: asking (one device,
//! all our own, in a room), accepting, cancelling, timeouts. The rules are
//! [`RequestFlow`]'s; here the keys it needs are loaded and its requests
//! queued.

use serde_json::Value;

use newt_proto::changes::Changes;
use newt_proto::identities::{KeyUsage, OwnIdentityTrust};
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::verification::request_flow::{room_request_content, FixedKeys, RequestFlow};
use newt_proto::verification::sas::ExpectedKeys;
use newt_proto::verification::sas_flow::SasIds;
use newt_proto::verification::{event_types, CancelCode, VERIFICATION_TIMEOUT_MS};

use crate::machine::{to_device_request, Machine, Pending, State};
use crate::requests::OutgoingRequest;
use crate::Error;

use super::{new_transaction_id, parse_key, Flow, IfUnknownDevice, VerificationMethods};

impl Machine {
    /// The keys a flow with `user`/`device` verifies, fixed now: the stored
    /// device key and the user's stored master key. Also our own master key
    /// as stored (trusted or not), and whether we can sign other users.
    pub(super) async fn fixed_keys(
        &self,
        st: &State,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<FixedKeys, Error> {
        let record = self
            .store()
            .devices(user)
            .await?
            .into_iter()
            .find(|d| &d.device_id == device && !d.deleted)
            .ok_or(Error::UnknownDevice)?;
        let device_key = parse_key(&record.ed25519).ok_or(Error::UnknownDevice)?;
        let material = self.trust_material().await?;
        let (own, private) = (&material.own, &material.private);
        let own_trusted = own.is_some()
            && material.root(&st.account).own_identity_trust() == OwnIdentityTrust::Verified;
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
        Ok(FixedKeys { ids, believed_own_master, can_sign_users })
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
        let keys = self.fixed_keys(&st, user, device).await?;
        let txn = new_transaction_id();
        let (core, content) = RequestFlow::request_device(txn.clone(), keys, st.flows.methods, now);
        let id = st.next_id();
        let request = to_device_request(
            id.clone(),
            event_types::REQUEST,
            [(user.clone(), device.to_string(), content)],
        );
        st.in_flight.insert(id, Pending::Other);
        st.flows.insert((user.clone(), txn.clone()), Flow::new(core));
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
        let (core, content) = RequestFlow::request_own_devices(
            txn.clone(),
            own.clone(),
            &self.inner.device_id,
            devices.clone(),
            st.flows.methods,
            now,
        );
        let id = st.next_id();
        let request = to_device_request(
            id.clone(),
            event_types::REQUEST,
            devices.iter().map(|d| (own.clone(), d.to_string(), content.clone())),
        );
        st.in_flight.insert(id, Pending::Other);
        st.flows.insert((own, txn.clone()), Flow::new(core));
        Ok((txn, request))
    }

    /// The content of an in-room request to verify `user` (an
    /// `m.room.message` with `msgtype` `m.key.verification.request`). Send
    /// it to a room shared with `user` (encrypted if the room is), then
    /// call [`Machine::room_verification_request_sent`] with its event ID.
    pub async fn room_verification_request_content(&self, user: &UserId) -> Value {
        let methods = self.inner.state.lock().await.flows.methods;
        room_request_content(&self.inner.user_id, &self.inner.device_id, user, methods)
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
        let core = RequestFlow::room_request_sent(
            room_id.clone(),
            event_id.to_owned(),
            user.clone(),
            self.now(),
        );
        st.flows.insert((user.clone(), event_id.to_owned()), Flow::new(core));
        Ok(())
    }

    /// Sets the methods this device offers in later requests and
    /// `ready`s (see [`VerificationMethods`]).
    pub async fn set_verification_methods(&self, methods: VerificationMethods) {
        self.inner.state.lock().await.flows.methods = methods;
    }

    /// Accepts a request we received: sends `ready` (the keys of the other
    /// device are fixed now, so it must be known).
    pub async fn accept_verification(&self, flow_id: &str) -> Result<(), Error> {
        self.with_flow(flow_id, |core, i| core.accept(i.ours, i.keys, i.now)).await
    }

    /// Cancels a flow (`m.user`); a finished flow stays as it is.
    pub async fn cancel_verification(&self, flow_id: &str) -> Result<(), Error> {
        self.with_flow(flow_id, |core, _| Ok(core.cancel(CancelCode::User))).await
    }

    /// Records a request the core accepted as a flow (`core`); if its
    /// device is not known yet, the user's devices are queried (accepting
    /// needs the device's keys). Returns the flow's key.
    pub(super) async fn request_received(
        &self,
        st: &mut State,
        changes: &mut Changes,
        core: RequestFlow,
    ) -> Result<(UserId, String), Error> {
        let sender = core.other_user().clone();
        let known = match core.other_device() {
            Some(from) => self.store().devices(&sender).await?.iter().any(|d| &d.device_id == from),
            None => false,
        };
        if !known {
            self.mark_outdated(st, changes, sender.clone());
        }
        let key = (sender, core.flow_id().as_str().to_owned());
        st.flows.insert(key.clone(), Flow::new(core));
        Ok(key)
    }

    /// Cancels flows past their deadline (`m.timeout`) and forgets finished
    /// flows ten minutes after their deadline.
    pub(in crate::machine) async fn poll_verification_timeouts(
        &self,
        st: &mut State,
        now: u64,
    ) -> Result<(), Error> {
        let expired: Vec<(UserId, String)> = st
            .flows
            .iter()
            .filter(|(_, f)| !f.is_finished() && now >= f.core.deadline())
            .map(|(k, _)| k.clone())
            .collect();
        st.flows.retain(|_, f| {
            !(f.is_finished() && now >= f.core.deadline().saturating_add(VERIFICATION_TIMEOUT_MS))
        });
        for key in expired {
            // A timeout never finishes with verified keys: nothing to store.
            let mut changes = Changes::default();
            let cancel = |core: RequestFlow, _| Ok(core.cancel(CancelCode::Timeout));
            self.step_flow(st, &mut changes, &key, now, IfUnknownDevice::Fail, cancel).await?;
        }
        Ok(())
    }
}
