//! Devices and identities: device lists and trust decisions, `/keys/query`
//! answers, cross-signing (bootstrap, import, export, signing) and the
//! trust states of users and devices.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError};

use serde_json::Value;

use newt_proto::account::OwnAccount;
use newt_proto::changes::Changes;
use newt_proto::devices::handle_keys_query;
use newt_proto::identities::{
    signatures_upload_body, BootstrapRequests, CrossSigningError, CrossSigningKeys, DeviceTrust,
    IdentityRecord, IdentityTrust, OwnIdentity, OwnIdentityTrust, PrivateCrossSigningIdentity,
    PrivateIdentityRecord, TrustRoot, UserIdentity,
};
use newt_proto::ids::{DeviceId, UserId};
use newt_proto::records::{DeviceRecord, LocalTrust, TrackedUser};

use crate::types::Device;
use crate::Error;

use super::{IdentityRejection, KeysQueryReport, Machine, RejectedIdentity, State, MAX_REPORTS};

impl Machine {
    /// The known devices of `user_id` (not the deleted ones).
    pub async fn devices(&self, user_id: &UserId) -> Result<Vec<Device>, Error> {
        let devices = self.store().devices(user_id).await?;
        Ok(devices.into_iter().filter(|d| !d.deleted).map(Device::from).collect())
    }

    /// Sets the user's decision about a device (verify or blacklist).
    pub async fn set_local_trust(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        trust: LocalTrust,
    ) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let Some(mut device) =
            self.store().devices(user_id).await?.into_iter().find(|d| &d.device_id == device_id)
        else {
            return Err(Error::UnknownDevice);
        };
        device.local_trust = trust;
        let changes = Changes { devices: vec![device], ..Default::default() };
        self.commit(&mut st, changes, false).await
    }

    /// Our public identity and our private keys as stored (unreadable or
    /// mismatched records count as absent: they grant no trust). The two
    /// records are read every time; they are parsed (signatures checked,
    /// keys derived) only when they differ from the last ones parsed, also
    /// when another process wrote them.
    pub(super) async fn trust_material(&self) -> Result<Arc<TrustMaterial>, Error> {
        let own_record = self.store().identity(&self.inner.user_id).await?;
        let private_record = self.store().private_identity().await?;
        let mut cache = self.inner.trust_cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = cache.as_ref() {
            if cached.own_record == own_record && cached.private_record == private_record {
                return Ok(Arc::clone(cached));
            }
        }
        let own = own_record.as_ref().and_then(|r| OwnIdentity::from_record(r).ok());
        let private = private_record
            .as_ref()
            .filter(|r| r.user_id == self.inner.user_id)
            .and_then(|r| PrivateCrossSigningIdentity::from_seeds(r).ok());
        let material = Arc::new(TrustMaterial { own_record, private_record, own, private });
        *cache = Some(Arc::clone(&material));
        Ok(material)
    }

    /// Our stored public identity (re-checked), if any; no private key read.
    async fn own_identity(&self) -> Result<Option<OwnIdentity>, Error> {
        let record = self.store().identity(&self.inner.user_id).await?;
        Ok(record.and_then(|r| OwnIdentity::from_record(&r).ok()))
    }

    /// This device's verdict on a stored `device` (its owner's identity and
    /// ours read from the store).
    pub(super) async fn trust_in_device(
        &self,
        st: &State,
        device: &DeviceRecord,
    ) -> Result<DeviceTrust, Error> {
        let own_user = device.user_id == self.inner.user_id;
        let owner = if own_user { None } else { self.user_identity(&device.user_id).await? };
        let material = self.trust_material().await?;
        Ok(material.root(&st.account).device_trust(owner.as_ref(), device))
    }

    /// Another user's stored identity (re-checked), if any.
    pub(super) async fn user_identity(
        &self,
        user_id: &UserId,
    ) -> Result<Option<UserIdentity>, Error> {
        Ok(self.store().identity(user_id).await?.and_then(|r| UserIdentity::from_record(&r).ok()))
    }

    /// The `/keys/query` answer for `users`: their devices and identities
    /// are stored; what was refused is kept for [`Self::take_keys_query_reports`].
    pub(super) async fn handle_query_response(
        &self,
        st: &mut State,
        users: BTreeSet<UserId>,
        response: &Value,
    ) -> Result<(), Error> {
        for u in &users {
            st.queries_in_flight.remove(u);
        }
        let mut known = BTreeMap::new();
        for u in &users {
            known.insert(u.clone(), self.store().devices(u).await?);
        }
        let outcome = handle_keys_query(&st.account, &users, &known, response)?;
        let mut changes = outcome.changes;
        let mut report = KeysQueryReport { rejected: outcome.rejected, ..Default::default() };
        self.handle_identities(&st.account, &users, response, &mut changes, &mut report).await?;
        // A change notice that arrived while the query was in flight
        // makes this answer stale: keep the user outdated.
        for t in &mut changes.tracked_users {
            if st.changed_during_query.remove(&t.user_id) {
                t.outdated = true;
            }
        }
        for (u, d) in &outcome.new_devices {
            st.claim_failures.remove(&(u.clone(), d.clone()));
        }
        self.commit(st, changes, false).await?;
        if !report.is_empty() {
            if st.reports.len() >= MAX_REPORTS {
                st.reports.remove(0);
            }
            st.reports.push(report);
        }
        Ok(())
    }

    /// The cross-signing part of a `/keys/query` answer: checks and stores
    /// the identities of `users` (ours first, since it decides whether the
    /// others are verified), and refuses invalid keys and users with a device
    /// whose ID is one of their cross-signing key IDs.
    async fn handle_identities(
        &self,
        account: &OwnAccount,
        users: &BTreeSet<UserId>,
        response: &Value,
        changes: &mut Changes,
        report: &mut KeysQueryReport,
    ) -> Result<(), Error> {
        let own_user = &self.inner.user_id;
        let material = self.trust_material().await?;
        // Our identity as this answer updates it (ours is handled first).
        let mut updated_own: Option<OwnIdentity> = None;
        let ordered =
            users.iter().filter(|u| *u == own_user).chain(users.iter().filter(|u| *u != own_user));
        for user in ordered {
            // Users the server did not answer for stay as they were.
            let Some(devices) = response.get("device_keys").and_then(|d| d.get(user.as_str()))
            else {
                continue;
            };
            let keys = match CrossSigningKeys::from_keys_query(response, user) {
                Ok(Some(keys)) => keys,
                Ok(None) => continue,
                Err(e) => {
                    report.rejected_identities.push(RejectedIdentity {
                        user_id: user.clone(),
                        reason: IdentityRejection::Invalid(e),
                    });
                    continue;
                }
            };
            let clash = devices
                .as_object()
                .and_then(|m| m.keys().find(|d| keys.collides_with_device(d)).cloned());
            if let Some(device_id) = clash {
                changes
                    .devices
                    .retain(|d| !(&d.user_id == user && d.device_id.as_str() == device_id));
                report.rejected_identities.push(RejectedIdentity {
                    user_id: user.clone(),
                    reason: IdentityRejection::DeviceIdCollision(device_id),
                });
                continue;
            }
            let old = self.store().identity(user).await?;
            let record = if user == own_user {
                match OwnIdentity::updated_record(old.as_ref(), &keys) {
                    Ok(record) => {
                        updated_own = OwnIdentity::from_record(&record).ok();
                        record
                    }
                    Err(e) => {
                        report.rejected_identities.push(RejectedIdentity {
                            user_id: user.clone(),
                            reason: IdentityRejection::Invalid(e),
                        });
                        continue;
                    }
                }
            } else {
                // The keys are verified already: ask only whether our USK
                // signed the master key (no re-parse of the identity).
                let own_identity = updated_own.as_ref().or(material.own.as_ref());
                let root = TrustRoot::new(account, own_identity, material.private.as_ref());
                let verified_now = root.signed_by_our_user_signing_key(user, &keys.master);
                UserIdentity::updated_record(old.as_ref(), &keys, verified_now)
            };
            if old.as_ref() != Some(&record) {
                changes.identities.push(record);
            }
        }
        Ok(())
    }

    /// What `/keys/query` responses contained that newt refused (invalid
    /// devices, invalid cross-signing keys, device-ID clashes), oldest first,
    /// since the last call. Only non-empty reports are kept (at most 64).
    pub async fn take_keys_query_reports(&self) -> Vec<KeysQueryReport> {
        std::mem::take(&mut self.inner.state.lock().await.reports)
    }

    /// Creates a new cross-signing identity (master, self-signing and
    /// user-signing keys) and returns the two request bodies that publish
    /// it: `POST /keys/device_signing/upload` (the caller adds the UIA
    /// `auth`), then `POST /keys/signatures/upload` (this device signed by
    /// the new self-signing key). The private keys are stored before this
    /// returns; calling it again replaces the identity (a reset: other users
    /// see their pin change). After both uploads, the next `/keys/query` of
    /// our own user (queued here) stores the public identity.
    pub async fn bootstrap_cross_signing(&self) -> Result<BootstrapRequests, Error> {
        let mut st = self.inner.state.lock().await;
        let (private, requests) = PrivateCrossSigningIdentity::bootstrap(&st.account)?;
        let mut changes =
            Changes { private_identity: Some(private.export_seeds()), ..Default::default() };
        self.mark_outdated(&mut st, &mut changes, self.inner.user_id.clone());
        self.commit(&mut st, changes, false).await?;
        Ok(requests)
    }

    pub(super) fn mark_outdated(&self, st: &mut State, changes: &mut Changes, user_id: UserId) {
        if st.queries_in_flight.contains(&user_id) {
            st.changed_during_query.insert(user_id.clone());
        }
        changes.tracked_users.push(TrackedUser { user_id, outdated: true });
    }

    /// Our private cross-signing keys as unpadded base64 seeds (the
    /// secret-storage encoding), if we hold any. The value is secret.
    pub async fn export_cross_signing_keys(&self) -> Result<Option<PrivateIdentityRecord>, Error> {
        Ok(self.store().private_identity().await?)
    }

    /// Imports private cross-signing keys (e.g. from another of our devices
    /// or from secret storage). Each key present must match our published
    /// identity, so our own identity must have been fetched first. Holding
    /// the private master key makes this device trust our identity.
    pub async fn import_cross_signing_keys(
        &self,
        keys: &PrivateIdentityRecord,
    ) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        if keys.user_id != self.inner.user_id {
            return Err(CrossSigningError::UserMismatch {
                expected: self.inner.user_id.to_string(),
                found: keys.user_id.to_string(),
            }
            .into());
        }
        let material = self.trust_material().await?;
        let own =
            material.own.as_ref().ok_or_else(|| Error::NoIdentity(self.inner.user_id.clone()))?;
        let private = PrivateCrossSigningIdentity::import_checked(keys, own)?;
        let changes =
            Changes { private_identity: Some(private.export_seeds()), ..Default::default() };
        self.commit(&mut st, changes, false).await
    }

    /// Signs one of our own devices (this one or another) with our
    /// self-signing key. Returns the `POST /keys/signatures/upload` body;
    /// after it is uploaded, the device is cross-signed for everyone. Our
    /// own user is queued for a re-query.
    pub async fn cross_sign_own_device(&self, device_id: &DeviceId) -> Result<Value, Error> {
        let mut st = self.inner.state.lock().await;
        let material = self.trust_material().await?;
        let private = material
            .private
            .as_ref()
            .ok_or(CrossSigningError::MissingKey(newt_proto::identities::KeyUsage::SelfSigning))?;
        if let Some(own) = &material.own {
            private.matches(own)?;
        }
        let device_keys = if device_id == &self.inner.device_id {
            st.account.device_keys()
        } else {
            self.store()
                .devices(&self.inner.user_id)
                .await?
                .into_iter()
                .find(|d| &d.device_id == device_id && !d.deleted)
                .ok_or(Error::UnknownDevice)?
                .keys
                .as_ref()
                .clone()
        };
        let signed = private.sign_device(&device_keys)?;
        let mut changes = Changes::default();
        self.mark_outdated(&mut st, &mut changes, self.inner.user_id.clone());
        self.commit(&mut st, changes, false).await?;
        Ok(signatures_upload_body([(self.inner.user_id.clone(), device_id.to_string(), signed)]))
    }

    /// `user_id`'s stored master key (unpadded base64): what the user
    /// compares out of band before [`verify_user_identity`](Self::verify_user_identity).
    /// `None` when no identity is known for the user.
    pub async fn master_key(&self, user_id: &UserId) -> Result<Option<String>, Error> {
        let found = if user_id == &self.inner.user_id {
            self.own_identity().await?.map(|o| o.master_key().public_key().to_base64())
        } else {
            self.user_identity(user_id).await?.map(|i| i.master_key().public_key().to_base64())
        };
        Ok(found)
    }

    /// Signs `user_id`'s master key with our user-signing key: the last step
    /// of verifying a user after comparing `expected_master_key` (unpadded
    /// base64, e.g. from [`master_key`](Self::master_key)) out of band (a SAS
    /// flow, [`Machine::request_verification`], does this on its own).
    /// Returns the `POST /keys/signatures/upload` body; once uploaded and
    /// re-queried (queued here), the user's identity is
    /// [`IdentityTrust::Verified`].
    ///
    /// Refused, with nothing signed, when the stored master key is not
    /// `expected_master_key` ([`CrossSigningError::MasterKeyMismatch`]: the
    /// server swapped the identity after the user compared it) or the
    /// identity changed since it was pinned or verified
    /// ([`CrossSigningError::IdentityChanged`]: acknowledge it first).
    pub async fn verify_user_identity(
        &self,
        user_id: &UserId,
        expected_master_key: &str,
    ) -> Result<Value, Error> {
        let mut st = self.inner.state.lock().await;
        if user_id == &self.inner.user_id {
            return Err(Error::NoIdentity(user_id.clone()));
        }
        let identity =
            self.user_identity(user_id).await?.ok_or_else(|| Error::NoIdentity(user_id.clone()))?;
        let material = self.trust_material().await?;
        material.root(&st.account).check_user_to_verify(&identity, expected_master_key)?;
        let private = material
            .private
            .as_ref()
            .ok_or(CrossSigningError::MissingKey(newt_proto::identities::KeyUsage::UserSigning))?;
        if let Some(own) = &material.own {
            private.matches(own)?;
        }
        let signed = private.sign_user(identity.master_key())?;
        let mut changes = Changes::default();
        self.mark_outdated(&mut st, &mut changes, user_id.clone());
        self.commit(&mut st, changes, false).await?;
        Ok(signatures_upload_body([(
            user_id.clone(),
            identity.master_key().public_key().to_base64(),
            signed,
        )]))
    }

    /// Whether this device trusts our own cross-signing identity; `None`
    /// when we have none (or it was not fetched yet).
    pub async fn own_identity_state(&self) -> Result<Option<OwnIdentityTrust>, Error> {
        let st = self.inner.state.lock().await;
        let material = self.trust_material().await?;
        if material.own.is_none() {
            return Ok(None);
        }
        Ok(Some(material.root(&st.account).own_identity_trust()))
    }

    /// Our view of `user_id`'s identity; `None` when the user has no known
    /// cross-signing identity. For our own user: `Verified` when this
    /// device trusts our identity, `Pinned` otherwise.
    pub async fn user_identity_state(
        &self,
        user_id: &UserId,
    ) -> Result<Option<IdentityTrust>, Error> {
        if user_id == &self.inner.user_id {
            return Ok(self.own_identity_state().await?.map(|t| match t {
                OwnIdentityTrust::Verified => IdentityTrust::Verified,
                OwnIdentityTrust::Unverified => IdentityTrust::Pinned,
            }));
        }
        let st = self.inner.state.lock().await;
        let Some(identity) = self.user_identity(user_id).await? else { return Ok(None) };
        let material = self.trust_material().await?;
        Ok(Some(material.root(&st.account).identity_trust(&identity)))
    }

    /// The user accepts `user_id`'s current identity: a `PinnedChanged`
    /// identity is pinned again; a `VerificationViolation` loses its
    /// verification and is pinned (verify again to restore it). Other
    /// states are left alone.
    pub async fn acknowledge_identity_change(&self, user_id: &UserId) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let Some(mut identity) = self.user_identity(user_id).await? else {
            return Err(Error::NoIdentity(user_id.clone()));
        };
        let state = self.trust_material().await?.root(&st.account).identity_trust(&identity);
        let record: IdentityRecord = match state {
            IdentityTrust::VerificationViolation => identity.withdraw_verification(),
            IdentityTrust::PinnedChanged => identity.pin_current_master_key(),
            IdentityTrust::Verified | IdentityTrust::Pinned => return Ok(()),
        };
        let changes = Changes { identities: vec![record], ..Default::default() };
        self.commit(&mut st, changes, false).await
    }

    /// How much a device is trusted (local decision and cross-signing);
    /// `None` for an unknown or deleted device. This device trusts itself.
    pub async fn device_trust(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<Option<DeviceTrust>, Error> {
        if user_id == &self.inner.user_id && device_id == &self.inner.device_id {
            return Ok(Some(DeviceTrust::LocallyVerified));
        }
        let st = self.inner.state.lock().await;
        let Some(device) = self
            .store()
            .devices(user_id)
            .await?
            .into_iter()
            .find(|d| &d.device_id == device_id && !d.deleted)
        else {
            return Ok(None);
        };
        Ok(Some(self.trust_in_device(&st, &device).await?))
    }
}

/// Our own identity and private cross-signing keys, parsed from the stored
/// records they came from (kept to tell whether the store still holds them).
/// [`TrustMaterial::root`] is the one way the driver gets a [`TrustRoot`].
pub(super) struct TrustMaterial {
    own_record: Option<IdentityRecord>,
    private_record: Option<PrivateIdentityRecord>,
    /// Our public identity, if stored and valid.
    pub(super) own: Option<OwnIdentity>,
    /// Our private cross-signing keys, if stored, ours and valid.
    pub(super) private: Option<PrivateCrossSigningIdentity>,
}

impl TrustMaterial {
    /// The trust root of this device (`account`) with this material.
    pub(super) fn root<'a>(&'a self, account: &'a OwnAccount) -> TrustRoot<'a> {
        TrustRoot::new(account, self.own.as_ref(), self.private.as_ref())
    }
}
