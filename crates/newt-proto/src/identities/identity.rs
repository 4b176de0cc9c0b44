//! Public cross-signing identities: ours ([`OwnIdentity`]) and other users'
//! ([`UserIdentity`]), parsed from `/keys/query` and kept as
//! [`IdentityRecord`]s.

use serde_json::Value;

use crate::ids::UserId;

use super::keys::{CrossSigningKey, KeyUsage};
use super::records::IdentityRecord;
use super::CrossSigningError;

/// A user's checked public cross-signing keys.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossSigningKeys {
    /// The master key.
    pub master: CrossSigningKey,
    /// The self-signing key, signed by the master key.
    pub self_signing: CrossSigningKey,
    /// The user-signing key, signed by the master key (our own user only).
    pub user_signing: Option<CrossSigningKey>,
}

impl CrossSigningKeys {
    /// Parses and checks the three key objects of `user_id`.
    pub fn parse(
        user_id: &UserId,
        master: &Value,
        self_signing: &Value,
        user_signing: Option<&Value>,
    ) -> Result<Self, CrossSigningError> {
        let master = CrossSigningKey::parse_master(master, user_id)?;
        let self_signing =
            CrossSigningKey::parse_signed(self_signing, KeyUsage::SelfSigning, &master)?;
        let user_signing = user_signing
            .map(|v| CrossSigningKey::parse_signed(v, KeyUsage::UserSigning, &master))
            .transpose()?;
        Ok(Self { master, self_signing, user_signing })
    }

    /// Takes `user_id`'s keys from a `/keys/query` response (`master_keys`,
    /// `self_signing_keys`, `user_signing_keys`). `Ok(None)`: the user has no
    /// cross-signing identity (no master key listed).
    pub fn from_keys_query(
        response: &Value,
        user_id: &UserId,
    ) -> Result<Option<Self>, CrossSigningError> {
        let field = |name: &str| response.get(name).and_then(|m| m.get(user_id.as_str()));
        let Some(master) = field("master_keys") else { return Ok(None) };
        let self_signing = field("self_signing_keys")
            .ok_or(CrossSigningError::MissingKey(KeyUsage::SelfSigning))?;
        Self::parse(user_id, master, self_signing, field("user_signing_keys")).map(Some)
    }

    /// Whether any cross-signing key has the ID `ed25519:<device_id>`: such a
    /// device must never be verified (the key-ID namespaces clash).
    pub fn collides_with_device(&self, device_id: &str) -> bool {
        let id = format!("ed25519:{device_id}");
        [Some(&self.master), Some(&self.self_signing), self.user_signing.as_ref()]
            .into_iter()
            .flatten()
            .any(|k| k.key_id() == id)
    }
}

/// Our own public identity.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnIdentity {
    keys: CrossSigningKeys,
    user_signing: CrossSigningKey,
    locally_verified: bool,
}

impl OwnIdentity {
    /// Our identity from checked keys; the user-signing key is required.
    pub fn new(keys: CrossSigningKeys) -> Result<Self, CrossSigningError> {
        let user_signing = keys
            .user_signing
            .clone()
            .ok_or(CrossSigningError::MissingKey(KeyUsage::UserSigning))?;
        Ok(Self { keys, user_signing, locally_verified: false })
    }

    /// Restores (and re-checks) our identity from its record.
    pub fn from_record(record: &IdentityRecord) -> Result<Self, CrossSigningError> {
        let keys = CrossSigningKeys::parse(
            &record.user_id,
            &record.master_key,
            &record.self_signing_key,
            record.user_signing_key.as_ref(),
        )?;
        let mut own = Self::new(keys)?;
        own.locally_verified = record.locally_verified;
        Ok(own)
    }

    /// The record to store after a `/keys/query` returned `keys` for us.
    /// A changed master key drops the local verification.
    pub fn updated_record(
        old: Option<&IdentityRecord>,
        keys: &CrossSigningKeys,
    ) -> Result<IdentityRecord, CrossSigningError> {
        let user_signing = keys
            .user_signing
            .as_ref()
            .ok_or(CrossSigningError::MissingKey(KeyUsage::UserSigning))?;
        let old_master =
            old.and_then(|o| CrossSigningKey::parse_master(&o.master_key, &o.user_id).ok());
        let same_master = old_master.is_some_and(|m| m.public_key() == keys.master.public_key());
        Ok(IdentityRecord {
            user_id: keys.master.user_id().clone(),
            master_key: keys.master.json().clone(),
            self_signing_key: keys.self_signing.json().clone(),
            user_signing_key: Some(user_signing.json().clone()),
            pinned_master_key: None,
            previously_verified: false,
            locally_verified: same_master && old.is_some_and(|o| o.locally_verified),
        })
    }

    /// The record of this identity.
    pub fn to_record(&self) -> IdentityRecord {
        IdentityRecord {
            user_id: self.user_id().clone(),
            master_key: self.keys.master.json().clone(),
            self_signing_key: self.keys.self_signing.json().clone(),
            user_signing_key: Some(self.user_signing.json().clone()),
            pinned_master_key: None,
            previously_verified: false,
            locally_verified: self.locally_verified,
        }
    }

    /// Marks the master key as verified by this device (after SAS/QR with one
    /// of our verified devices, or after importing the private master key).
    pub fn mark_locally_verified(&mut self) {
        self.locally_verified = true;
    }

    /// Our user.
    pub fn user_id(&self) -> &UserId {
        self.keys.master.user_id()
    }

    /// The master key.
    pub fn master_key(&self) -> &CrossSigningKey {
        &self.keys.master
    }

    /// The self-signing key.
    pub fn self_signing_key(&self) -> &CrossSigningKey {
        &self.keys.self_signing
    }

    /// The user-signing key.
    pub fn user_signing_key(&self) -> &CrossSigningKey {
        &self.user_signing
    }

    /// All three keys.
    pub fn keys(&self) -> &CrossSigningKeys {
        &self.keys
    }

    /// Whether this device verified the master key itself.
    pub fn is_locally_verified(&self) -> bool {
        self.locally_verified
    }
}

/// Another user's public identity, with what we pinned of it.
#[derive(Debug, Clone, PartialEq)]
pub struct UserIdentity {
    keys: CrossSigningKeys,
    pinned_master_key: Option<String>,
    previously_verified: bool,
}

impl UserIdentity {
    /// Restores (and re-checks) an identity from its record.
    pub fn from_record(record: &IdentityRecord) -> Result<Self, CrossSigningError> {
        let keys = CrossSigningKeys::parse(
            &record.user_id,
            &record.master_key,
            &record.self_signing_key,
            None,
        )?;
        Ok(Self {
            keys,
            pinned_master_key: record.pinned_master_key.clone(),
            previously_verified: record.previously_verified,
        })
    }

    /// The record to store after a `/keys/query` returned `keys` for this
    /// user. A first sighting pins the master key (TOFU); later ones keep the
    /// old pin, so a change shows as `PinnedChanged` or
    /// `VerificationViolation` until acknowledged. `verified_now` (from
    /// [`TrustRoot::identity_trust`](super::TrustRoot::identity_trust) on the
    /// new keys) sets the sticky `previously_verified` flag.
    pub fn updated_record(
        old: Option<&IdentityRecord>,
        keys: &CrossSigningKeys,
        verified_now: bool,
    ) -> IdentityRecord {
        let current = keys.master.public_key().to_base64();
        let pinned = old.and_then(|o| o.pinned_master_key.clone()).unwrap_or(current.clone());
        let previously_verified = old.is_some_and(|o| o.previously_verified) || verified_now;
        IdentityRecord {
            user_id: keys.master.user_id().clone(),
            master_key: keys.master.json().clone(),
            self_signing_key: keys.self_signing.json().clone(),
            user_signing_key: None,
            // Verifying the current key is an acknowledgement of it.
            pinned_master_key: Some(if verified_now { current } else { pinned }),
            previously_verified,
            locally_verified: false,
        }
    }

    /// The record of this identity.
    pub fn to_record(&self) -> IdentityRecord {
        IdentityRecord {
            user_id: self.user_id().clone(),
            master_key: self.keys.master.json().clone(),
            self_signing_key: self.keys.self_signing.json().clone(),
            user_signing_key: None,
            pinned_master_key: self.pinned_master_key.clone(),
            previously_verified: self.previously_verified,
            locally_verified: false,
        }
    }

    /// The user accepts the current master key (`PinnedChanged` → `Pinned`).
    /// Returns the record to store.
    pub fn pin_current_master_key(&mut self) -> IdentityRecord {
        self.pinned_master_key = Some(self.keys.master.public_key().to_base64());
        self.to_record()
    }

    /// The user acknowledges a `VerificationViolation`: the verification is
    /// withdrawn and the current key pinned. Returns the record to store.
    pub fn withdraw_verification(&mut self) -> IdentityRecord {
        self.previously_verified = false;
        self.pin_current_master_key()
    }

    /// The owner.
    pub fn user_id(&self) -> &UserId {
        self.keys.master.user_id()
    }

    /// The master key.
    pub fn master_key(&self) -> &CrossSigningKey {
        &self.keys.master
    }

    /// The self-signing key.
    pub fn self_signing_key(&self) -> &CrossSigningKey {
        &self.keys.self_signing
    }

    /// Master and self-signing keys.
    pub fn keys(&self) -> &CrossSigningKeys {
        &self.keys
    }

    /// The pinned master key (unpadded base64), if any.
    pub fn pinned_master_key(&self) -> Option<&str> {
        self.pinned_master_key.as_deref()
    }

    /// Whether the identity was verified at some point.
    pub fn was_previously_verified(&self) -> bool {
        self.previously_verified
    }
}
