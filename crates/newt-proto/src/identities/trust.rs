//! Cross-signing trust, decided in one place.
//!
//! A [`TrustRoot`] is built once from our device, our public identity and
//! our private keys; every question about identities and devices is answered
//! by it. The chain is: our device trusts our MSK → our MSK signed our USK →
//! our USK signed their MSK → their MSK signed their SSK → their SSK signed
//! the device. The signatures inside each stored object are re-checked here;
//! nothing is trusted because a flag said so, except the user's own local
//! decisions.

use serde::{Deserialize, Serialize};

use crate::account::OwnAccount;
use crate::ids::UserId;
use crate::json::verify_json;
use crate::records::{DeviceRecord, LocalTrust};

use super::identity::{OwnIdentity, UserIdentity};
use super::keys::CrossSigningKey;
use super::private::PrivateCrossSigningIdentity;
use super::CrossSigningError;

/// Whether this device trusts our own master key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnIdentityTrust {
    /// Verified: we hold the private master key, this device verified the
    /// master key interactively, or this device signed it earlier.
    Verified,
    /// Not (yet) verified by this device; nothing it signs is trusted.
    Unverified,
}

/// Our view of another user's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityTrust {
    /// Our (verified) USK signed their master key.
    Verified,
    /// Not verified; the master key is the one pinned on first sight or
    /// acknowledged since (TOFU).
    Pinned,
    /// Not verified, and the master key changed since it was pinned: warn and
    /// ask the user to acknowledge.
    PinnedChanged,
    /// Verified before, not any more (their master key changed, or our
    /// signature on it is gone): must be acknowledged before sending.
    VerificationViolation,
}

/// How much a device is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceTrust {
    /// The user blacklisted it.
    Blacklisted,
    /// The user verified it (locally, e.g. by SAS without cross-signing).
    LocallyVerified,
    /// Signed by its owner's SSK, and the owner's identity is verified.
    CrossSignedByVerifiedOwner,
    /// Signed by its owner's SSK; the owner's identity is only pinned (TOFU).
    CrossSignedByPinnedOwner,
    /// Signed by its owner's SSK, but the owner's identity is unverified
    /// (our own, not yet verified), changed, or in violation.
    CrossSignedByUntrustedOwner,
    /// The owner has an identity, but its SSK did not sign this device (or
    /// the device ID clashes with a cross-signing key ID).
    NotCrossSigned,
    /// The owner has no known cross-signing identity.
    Unknown,
}

impl DeviceTrust {
    /// Verified, directly or through a verified identity.
    pub fn is_verified(self) -> bool {
        matches!(self, Self::LocallyVerified | Self::CrossSignedByVerifiedOwner)
    }
}

/// Our trust anchors: our account, our public identity and which private
/// keys we hold.
#[derive(Debug, Clone)]
pub struct TrustRoot<'a> {
    own_user: &'a UserId,
    own: Option<&'a OwnIdentity>,
    own_verified: bool,
}

impl<'a> TrustRoot<'a> {
    /// Computes our own trust once. `own` must be our own user's identity
    /// (another user's is ignored).
    pub fn new(
        account: &'a OwnAccount,
        own: Option<&'a OwnIdentity>,
        private: Option<&PrivateCrossSigningIdentity>,
    ) -> Self {
        let own = own.filter(|o| o.user_id() == account.user_id());
        let own_verified = own.is_some_and(|o| {
            o.is_locally_verified()
                || private.is_some_and(|p| p.owns_master_key_of(o))
                || verify_json(
                    o.master_key().json(),
                    account.user_id(),
                    &format!("ed25519:{}", account.device_id()),
                    &account.ed25519_key(),
                )
                .is_ok()
        });
        Self { own_user: account.user_id(), own, own_verified }
    }

    /// Whether this device trusts our own identity.
    pub fn own_identity_trust(&self) -> OwnIdentityTrust {
        if self.own_verified {
            OwnIdentityTrust::Verified
        } else {
            OwnIdentityTrust::Unverified
        }
    }

    /// Whether we may sign `other`'s master key with our user-signing key
    /// now that the user compared `expected_master` (unpadded base64) out of
    /// band: only if it is the stored key and the identity did not change
    /// since it was pinned or verified (a server swapping the identity
    /// between the comparison and the confirmation gets nothing signed).
    pub fn check_user_to_verify(
        &self,
        other: &UserIdentity,
        expected_master: &str,
    ) -> Result<(), CrossSigningError> {
        let found = other.master_key().public_key().to_base64();
        if found != crate::json::strip_padding(expected_master) {
            return Err(CrossSigningError::MasterKeyMismatch {
                expected: expected_master.to_owned(),
                found,
            });
        }
        match self.identity_trust(other) {
            t @ (IdentityTrust::PinnedChanged | IdentityTrust::VerificationViolation) => {
                Err(CrossSigningError::IdentityChanged(t))
            }
            IdentityTrust::Pinned | IdentityTrust::Verified => Ok(()),
        }
    }

    /// Our view of `other`'s identity.
    pub fn identity_trust(&self, other: &UserIdentity) -> IdentityTrust {
        if self.signed_by_our_user_signing_key(other.user_id(), other.master_key()) {
            return IdentityTrust::Verified;
        }
        if other.was_previously_verified() {
            return IdentityTrust::VerificationViolation;
        }
        let current = other.master_key().public_key().to_base64();
        match other.pinned_master_key() {
            Some(pinned) if pinned != current => IdentityTrust::PinnedChanged,
            _ => IdentityTrust::Pinned,
        }
    }

    /// Whether `master_key` (another user's) carries a valid signature of
    /// our user-signing key while this device trusts our identity: what
    /// makes that user `Verified`. No work (no signature check) when we
    /// have no trusted identity.
    pub fn signed_by_our_user_signing_key(
        &self,
        user: &UserId,
        master_key: &CrossSigningKey,
    ) -> bool {
        self.own_verified
            && user != self.own_user
            && self.own.is_some_and(|own| {
                own.user_signing_key().verify_signature_on(master_key.json()).is_ok()
            })
    }

    /// How much `device` is trusted. `owner` is the device owner's identity
    /// (ignored for our own devices, which use ours).
    pub fn device_trust(&self, owner: Option<&UserIdentity>, device: &DeviceRecord) -> DeviceTrust {
        match device.local_trust {
            LocalTrust::Blacklisted => return DeviceTrust::Blacklisted,
            LocalTrust::Verified => return DeviceTrust::LocallyVerified,
            LocalTrust::Unset => {}
        }
        if &device.user_id == self.own_user {
            let Some(own) = self.own else { return DeviceTrust::Unknown };
            if own.keys().collides_with_device(device.device_id.as_str())
                || own.self_signing_key().verify_signature_on(&device.keys).is_err()
            {
                return DeviceTrust::NotCrossSigned;
            }
            return if self.own_verified {
                DeviceTrust::CrossSignedByVerifiedOwner
            } else {
                DeviceTrust::CrossSignedByUntrustedOwner
            };
        }
        let Some(owner) = owner.filter(|o| o.user_id() == &device.user_id) else {
            return DeviceTrust::Unknown;
        };
        if owner.keys().collides_with_device(device.device_id.as_str())
            || owner.self_signing_key().verify_signature_on(&device.keys).is_err()
        {
            return DeviceTrust::NotCrossSigned;
        }
        match self.identity_trust(owner) {
            IdentityTrust::Verified => DeviceTrust::CrossSignedByVerifiedOwner,
            IdentityTrust::Pinned => DeviceTrust::CrossSignedByPinnedOwner,
            IdentityTrust::PinnedChanged | IdentityTrust::VerificationViolation => {
                DeviceTrust::CrossSignedByUntrustedOwner
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::parse_device_keys;
    use crate::identities::{signatures_upload_body, CrossSigningKeys, IdentityRecord, KeyUsage};
    use crate::ids::DeviceId;
    use serde_json::Value;

    /// A user with a device and a published identity, as `/keys/query` would
    /// show it (signatures merged in, as the server does).
    struct Party {
        account: OwnAccount,
        private: PrivateCrossSigningIdentity,
        keys_query: Value,
    }

    fn merge_signatures(target: &mut Value, signed: &Value) {
        if let Some(Value::Object(sigs)) = signed.get("signatures") {
            for (user, per_key) in sigs {
                if let Value::Object(per_key) = per_key {
                    for (k, v) in per_key {
                        target["signatures"][user][k] = v.clone();
                    }
                }
            }
        }
    }

    fn party(user: &str, device: &str) -> Party {
        let account =
            OwnAccount::new(UserId::parse(user).unwrap(), DeviceId::parse(device).unwrap());
        let (private, req) = PrivateCrossSigningIdentity::bootstrap(&account).unwrap();
        let up = req.device_signing_upload;
        let mut device_keys = account.device_keys();
        merge_signatures(&mut device_keys, &req.signatures_upload[user][device]);
        let keys_query = serde_json::json!({
            "device_keys": { user: { device: device_keys } },
            "master_keys": { user: up["master_key"] },
            "self_signing_keys": { user: up["self_signing_key"] },
            "user_signing_keys": { user: up["user_signing_key"] },
        });
        Party { account, private, keys_query }
    }

    fn keys_of(p: &Party) -> CrossSigningKeys {
        CrossSigningKeys::from_keys_query(&p.keys_query, p.account.user_id()).unwrap().unwrap()
    }

    fn device_of(p: &Party) -> DeviceRecord {
        let user = p.account.user_id();
        let dev = p.account.device_id().as_str();
        parse_device_keys(user, dev, &p.keys_query["device_keys"][user.as_str()][dev]).unwrap()
    }

    fn public_view(p: &Party) -> CrossSigningKeys {
        // Other users do not see the USK.
        let mut k = keys_of(p);
        k.user_signing = None;
        k
    }

    #[test]
    fn own_identity_trust_sources() {
        let alice = party("@alice:hs", "A1");
        let own = OwnIdentity::new(keys_of(&alice)).unwrap();
        // Holding the private master key.
        let root = TrustRoot::new(&alice.account, Some(&own), Some(&alice.private));
        assert_eq!(root.own_identity_trust(), OwnIdentityTrust::Verified);
        // The device signed the master key during bootstrap.
        let root = TrustRoot::new(&alice.account, Some(&own), None);
        assert_eq!(root.own_identity_trust(), OwnIdentityTrust::Verified);
        // A second device of Alice's knows neither.
        let second =
            OwnAccount::new(alice.account.user_id().clone(), DeviceId::parse("A2").unwrap());
        let root = TrustRoot::new(&second, Some(&own), None);
        assert_eq!(root.own_identity_trust(), OwnIdentityTrust::Unverified);
        // ... and the first device shows as cross-signed by an untrusted owner.
        assert_eq!(
            root.device_trust(None, &device_of(&alice)),
            DeviceTrust::CrossSignedByUntrustedOwner
        );
        let mut verified = own.clone();
        verified.mark_locally_verified();
        let root = TrustRoot::new(&second, Some(&verified), None);
        assert_eq!(root.own_identity_trust(), OwnIdentityTrust::Verified);
        assert_eq!(
            root.device_trust(None, &device_of(&alice)),
            DeviceTrust::CrossSignedByVerifiedOwner
        );
        assert!(root.device_trust(None, &device_of(&alice)).is_verified());
    }

    #[test]
    fn other_identity_verified_pinned_changed_violation() {
        let alice = party("@alice:hs", "A1");
        let bob = party("@bob:hs", "B1");
        let own = OwnIdentity::new(keys_of(&alice)).unwrap();
        let root = TrustRoot::new(&alice.account, Some(&own), Some(&alice.private));

        // First sight: pinned.
        let rec = UserIdentity::updated_record(None, &public_view(&bob), false);
        let bob_id = UserIdentity::from_record(&rec).unwrap();
        assert_eq!(root.identity_trust(&bob_id), IdentityTrust::Pinned);
        assert_eq!(
            root.device_trust(Some(&bob_id), &device_of(&bob)),
            DeviceTrust::CrossSignedByPinnedOwner
        );

        // Alice verifies Bob: her USK signs his master key; the server merges it.
        let signed = alice.private.sign_user(bob_id.master_key()).unwrap();
        let body = signatures_upload_body([(
            bob_id.user_id().clone(),
            bob_id.master_key().public_key().to_base64(),
            signed.clone(),
        )]);
        assert!(body.get("@bob:hs").is_some());
        let mut query = bob.keys_query.clone();
        merge_signatures(&mut query["master_keys"]["@bob:hs"], &signed);
        let mut keys =
            CrossSigningKeys::from_keys_query(&query, bob_id.user_id()).unwrap().unwrap();
        keys.user_signing = None;
        let probe =
            UserIdentity::from_record(&UserIdentity::updated_record(Some(&rec), &keys, false))
                .unwrap();
        let verified_now = root.identity_trust(&probe) == IdentityTrust::Verified;
        assert!(verified_now);
        let rec = UserIdentity::updated_record(Some(&rec), &keys, verified_now);
        let bob_id = UserIdentity::from_record(&rec).unwrap();
        assert_eq!(root.identity_trust(&bob_id), IdentityTrust::Verified);
        assert_eq!(
            root.device_trust(Some(&bob_id), &device_of(&bob)),
            DeviceTrust::CrossSignedByVerifiedOwner
        );

        // Bob's master key changes (a new identity): violation, not silently pinned.
        let bob2 = party("@bob:hs", "B1");
        let rec2 = UserIdentity::updated_record(Some(&rec), &public_view(&bob2), false);
        let mut bob_changed = UserIdentity::from_record(&rec2).unwrap();
        assert_eq!(root.identity_trust(&bob_changed), IdentityTrust::VerificationViolation);
        assert_eq!(
            root.device_trust(Some(&bob_changed), &device_of(&bob2)),
            DeviceTrust::CrossSignedByUntrustedOwner
        );
        // Acknowledging withdraws the verification and pins the new key.
        let acked = bob_changed.withdraw_verification();
        assert_eq!(
            root.identity_trust(&UserIdentity::from_record(&acked).unwrap()),
            IdentityTrust::Pinned
        );

        // An unverified pinned identity that changes: PinnedChanged until acknowledged.
        let carol = party("@carol:hs", "C1");
        let rec = UserIdentity::updated_record(None, &public_view(&carol), false);
        let carol2 = party("@carol:hs", "C1");
        let rec = UserIdentity::updated_record(Some(&rec), &public_view(&carol2), false);
        let mut carol_changed = UserIdentity::from_record(&rec).unwrap();
        assert_eq!(root.identity_trust(&carol_changed), IdentityTrust::PinnedChanged);
        let rec = carol_changed.pin_current_master_key();
        assert_eq!(
            root.identity_trust(&UserIdentity::from_record(&rec).unwrap()),
            IdentityTrust::Pinned
        );
    }

    #[test]
    fn unverified_own_identity_verifies_nobody() {
        let alice = party("@alice:hs", "A1");
        let bob = party("@bob:hs", "B1");
        let own = OwnIdentity::new(keys_of(&alice)).unwrap();
        let bob_id = UserIdentity::from_record(&UserIdentity::updated_record(
            None,
            &public_view(&bob),
            false,
        ))
        .unwrap();
        let mut query = bob.keys_query.clone();
        merge_signatures(
            &mut query["master_keys"]["@bob:hs"],
            &alice.private.sign_user(bob_id.master_key()).unwrap(),
        );
        let mut keys =
            CrossSigningKeys::from_keys_query(&query, bob_id.user_id()).unwrap().unwrap();
        keys.user_signing = None;
        let bob_signed =
            UserIdentity::from_record(&UserIdentity::updated_record(None, &keys, false)).unwrap();
        let second =
            OwnAccount::new(alice.account.user_id().clone(), DeviceId::parse("A2").unwrap());
        let root = TrustRoot::new(&second, Some(&own), None);
        assert_eq!(root.identity_trust(&bob_signed), IdentityTrust::Pinned);
    }

    #[test]
    fn devices_not_cross_signed_unknown_and_local() {
        let alice = party("@alice:hs", "A1");
        let bob = party("@bob:hs", "B1");
        let own = OwnIdentity::new(keys_of(&alice)).unwrap();
        let root = TrustRoot::new(&alice.account, Some(&own), Some(&alice.private));
        let bob_id = UserIdentity::from_record(&UserIdentity::updated_record(
            None,
            &public_view(&bob),
            false,
        ))
        .unwrap();
        // A device Bob's SSK never signed.
        let lone = OwnAccount::new(bob.account.user_id().clone(), DeviceId::parse("B2").unwrap());
        let lone_rec = parse_device_keys(lone.user_id(), "B2", &lone.device_keys()).unwrap();
        assert_eq!(root.device_trust(Some(&bob_id), &lone_rec), DeviceTrust::NotCrossSigned);
        assert_eq!(root.device_trust(None, &device_of(&bob)), DeviceTrust::Unknown);
        let mut local = lone_rec.clone();
        local.local_trust = LocalTrust::Verified;
        assert_eq!(root.device_trust(Some(&bob_id), &local), DeviceTrust::LocallyVerified);
        local.local_trust = LocalTrust::Blacklisted;
        assert_eq!(root.device_trust(Some(&bob_id), &local), DeviceTrust::Blacklisted);
        // Someone else's identity never vouches for Bob's device.
        let carol = party("@carol:hs", "C1");
        let carol_id = UserIdentity::from_record(&UserIdentity::updated_record(
            None,
            &public_view(&carol),
            false,
        ))
        .unwrap();
        assert_eq!(root.device_trust(Some(&carol_id), &device_of(&bob)), DeviceTrust::Unknown);
    }

    #[test]
    fn own_record_drops_local_verification_on_master_change() {
        let alice = party("@alice:hs", "A1");
        let mut own = OwnIdentity::new(keys_of(&alice)).unwrap();
        own.mark_locally_verified();
        let rec: IdentityRecord = own.to_record();
        let same = OwnIdentity::updated_record(Some(&rec), &keys_of(&alice)).unwrap();
        assert!(same.locally_verified);
        let reset = party("@alice:hs", "A1");
        let changed = OwnIdentity::updated_record(Some(&rec), &keys_of(&reset)).unwrap();
        assert!(!changed.locally_verified);
        assert!(OwnIdentity::from_record(&changed).is_ok());
        // Our own identity without a USK is incomplete.
        let mut partial = keys_of(&alice);
        partial.user_signing = None;
        assert!(matches!(
            OwnIdentity::new(partial),
            Err(crate::identities::CrossSigningError::MissingKey(KeyUsage::UserSigning))
        ));
    }
}
