//! Our private cross-signing keys: creation (bootstrap), signing, and
//! export/import as unpadded base64 seeds.

use std::fmt;

use serde_json::{json, Map, Value};
use vodozemac::{Ed25519PublicKey, Ed25519SecretKey};
use zeroize::Zeroize;

use crate::account::OwnAccount;
use crate::ids::UserId;
use crate::json::{sign_json, strip_padding};

use super::identity::OwnIdentity;
use super::keys::{cross_signing_key_id, unsigned_key_json, CrossSigningKey, KeyUsage};
use super::records::PrivateIdentityRecord;
use super::CrossSigningError;

/// Our private master, self-signing and user-signing keys; any of them may be
/// absent (e.g. only some were found in secret storage).
///
/// The secret keys are vodozemac `Ed25519SecretKey`s, boxed and zeroized on
/// drop; `Debug` shows only the public keys.
pub struct PrivateCrossSigningIdentity {
    user_id: UserId,
    master: Option<Ed25519SecretKey>,
    self_signing: Option<Ed25519SecretKey>,
    user_signing: Option<Ed25519SecretKey>,
}

impl fmt::Debug for PrivateCrossSigningIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let public = |k: &Option<Ed25519SecretKey>| k.as_ref().map(|k| k.public_key().to_base64());
        f.debug_struct("PrivateCrossSigningIdentity")
            .field("user_id", &self.user_id)
            .field("master", &public(&self.master))
            .field("self_signing", &public(&self.self_signing))
            .field("user_signing", &public(&self.user_signing))
            .finish_non_exhaustive()
    }
}

/// The two requests that publish a fresh identity, in this order.
#[derive(Debug, Clone, PartialEq)]
pub struct BootstrapRequests {
    /// `POST /keys/device_signing/upload` body (the driver adds `auth`).
    pub device_signing_upload: Value,
    /// `POST /keys/signatures/upload` body: our device signed by the SSK.
    pub signatures_upload: Value,
}

impl PrivateCrossSigningIdentity {
    /// Three fresh keys for `user_id`.
    pub fn new(user_id: UserId) -> Self {
        Self {
            user_id,
            master: Some(Ed25519SecretKey::new()),
            self_signing: Some(Ed25519SecretKey::new()),
            user_signing: Some(Ed25519SecretKey::new()),
        }
    }

    /// Creates a new identity for `account`'s user and the requests that
    /// publish it. The master key carries our device's signature, and our
    /// device is signed by the new SSK. After both uploads succeeded, a
    /// `/keys/query` of our own user yields the [`OwnIdentity`], which this
    /// device trusts because it holds the private master key.
    pub fn bootstrap(account: &OwnAccount) -> Result<(Self, BootstrapRequests), CrossSigningError> {
        let identity = Self::new(account.user_id().clone());
        let device_signing_upload = identity.device_signing_upload_body(Some(account))?;
        let device = identity.sign_device(&account.device_keys())?;
        let signatures_upload = signatures_upload_body([(
            account.user_id().clone(),
            account.device_id().to_string(),
            device,
        )]);
        Ok((identity, BootstrapRequests { device_signing_upload, signatures_upload }))
    }

    /// Our user.
    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    fn secret(&self, usage: KeyUsage) -> Option<&Ed25519SecretKey> {
        match usage {
            KeyUsage::Master => self.master.as_ref(),
            KeyUsage::SelfSigning => self.self_signing.as_ref(),
            KeyUsage::UserSigning => self.user_signing.as_ref(),
        }
    }

    fn require(&self, usage: KeyUsage) -> Result<&Ed25519SecretKey, CrossSigningError> {
        self.secret(usage).ok_or(CrossSigningError::MissingKey(usage))
    }

    /// The public half of one of our keys, if we hold it.
    pub fn public_key(&self, usage: KeyUsage) -> Option<Ed25519PublicKey> {
        self.secret(usage).map(Ed25519SecretKey::public_key)
    }

    /// The public `CrossSigningKey` object for `usage`: the master key
    /// unsigned, the others signed by the master key.
    pub fn public_key_json(&self, usage: KeyUsage) -> Result<Value, CrossSigningError> {
        let key = self.require(usage)?;
        let mut value = unsigned_key_json(&self.user_id, usage, &key.public_key());
        if usage != KeyUsage::Master {
            let master = self.require(KeyUsage::Master)?;
            let master_id = cross_signing_key_id(&master.public_key());
            sign_json(&mut value, &self.user_id, &master_id, |m| master.sign(m))?;
        }
        Ok(value)
    }

    /// The `/keys/device_signing/upload` body with all three keys. With
    /// `account`, the master key also carries our device's signature.
    pub fn device_signing_upload_body(
        &self,
        account: Option<&OwnAccount>,
    ) -> Result<Value, CrossSigningError> {
        let mut master = self.public_key_json(KeyUsage::Master)?;
        if let Some(account) = account {
            account.sign_json(&mut master)?;
        }
        Ok(json!({
            "master_key": master,
            "self_signing_key": self.public_key_json(KeyUsage::SelfSigning)?,
            "user_signing_key": self.public_key_json(KeyUsage::UserSigning)?,
        }))
    }

    /// Signs one of our own devices' DeviceKeys with the SSK. Returns the
    /// object for `/keys/signatures/upload` (under key ID = the device ID),
    /// carrying only the new signature.
    pub fn sign_device(&self, device_keys: &Value) -> Result<Value, CrossSigningError> {
        let owner = device_keys.get("user_id").and_then(Value::as_str).unwrap_or_default();
        if owner != self.user_id.as_str() {
            return Err(CrossSigningError::UserMismatch {
                expected: self.user_id.to_string(),
                found: owner.to_owned(),
            });
        }
        self.sign_with(KeyUsage::SelfSigning, device_keys)
    }

    /// Signs another user's master key with our USK. Returns the object for
    /// `/keys/signatures/upload` (under key ID = the key's unpadded base64).
    pub fn sign_user(&self, their_master: &CrossSigningKey) -> Result<Value, CrossSigningError> {
        if their_master.usage() != KeyUsage::Master {
            return Err(CrossSigningError::UsageMismatch {
                expected: KeyUsage::Master,
                found: vec![their_master.usage().as_str().to_owned()],
            });
        }
        self.sign_with(KeyUsage::UserSigning, their_master.json())
    }

    fn sign_with(&self, usage: KeyUsage, value: &Value) -> Result<Value, CrossSigningError> {
        let key = self.require(usage)?;
        let mut copy = value.clone();
        if let Some(obj) = copy.as_object_mut() {
            obj.remove("signatures");
            obj.remove("unsigned");
        }
        let key_id = cross_signing_key_id(&key.public_key());
        sign_json(&mut copy, &self.user_id, &key_id, |m| key.sign(m))?;
        Ok(copy)
    }

    /// Checks that every private key we hold belongs to `identity`.
    pub fn matches(&self, identity: &OwnIdentity) -> Result<(), CrossSigningError> {
        let public = [
            (KeyUsage::Master, identity.master_key().public_key()),
            (KeyUsage::SelfSigning, identity.self_signing_key().public_key()),
            (KeyUsage::UserSigning, identity.user_signing_key().public_key()),
        ];
        for (usage, expected) in public {
            if self.public_key(usage).is_some_and(|k| k != expected) {
                return Err(CrossSigningError::PublicKeyMismatch(usage));
            }
        }
        Ok(())
    }

    /// Whether we hold the private master key of `identity`.
    pub fn owns_master_key_of(&self, identity: &OwnIdentity) -> bool {
        self.public_key(KeyUsage::Master) == Some(identity.master_key().public_key())
    }

    /// The private keys as unpadded base64 seeds (the secret-storage
    /// encoding). The result is secret; it zeroizes itself on drop.
    pub fn export_seeds(&self) -> PrivateIdentityRecord {
        let seed = |k: &Option<Ed25519SecretKey>| k.as_ref().map(Ed25519SecretKey::to_base64);
        PrivateIdentityRecord {
            user_id: self.user_id.clone(),
            master: seed(&self.master),
            self_signing: seed(&self.self_signing),
            user_signing: seed(&self.user_signing),
        }
    }

    /// Restores keys from seeds (padded or not).
    pub fn from_seeds(record: &PrivateIdentityRecord) -> Result<Self, CrossSigningError> {
        let load = |s: &Option<String>, usage| {
            s.as_deref()
                .map(|s| {
                    let mut trimmed = strip_padding(s.trim()).to_owned();
                    let key = Ed25519SecretKey::from_base64(&trimmed)
                        .map_err(|_| CrossSigningError::InvalidKey(usage));
                    trimmed.zeroize();
                    key
                })
                .transpose()
        };
        Ok(Self {
            user_id: record.user_id.clone(),
            master: load(&record.master, KeyUsage::Master)?,
            self_signing: load(&record.self_signing, KeyUsage::SelfSigning)?,
            user_signing: load(&record.user_signing, KeyUsage::UserSigning)?,
        })
    }

    /// Restores keys from seeds and checks them against our public identity
    /// (for an import from secret storage).
    pub fn import_checked(
        record: &PrivateIdentityRecord,
        identity: &OwnIdentity,
    ) -> Result<Self, CrossSigningError> {
        let keys = Self::from_seeds(record)?;
        keys.matches(identity)?;
        Ok(keys)
    }
}

/// Builds a `/keys/signatures/upload` body from `(user, key ID, signed
/// object)` entries. The key ID is a device ID, or a cross-signing key's
/// unpadded base64 public key.
pub fn signatures_upload_body(entries: impl IntoIterator<Item = (UserId, String, Value)>) -> Value {
    let mut body = Map::new();
    for (user, key_id, object) in entries {
        if let Value::Object(per_user) =
            body.entry(user.to_string()).or_insert_with(|| Value::Object(Map::new()))
        {
            per_user.insert(key_id, object);
        }
    }
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identities::identity::CrossSigningKeys;
    use crate::ids::DeviceId;
    use crate::json::verify_json;

    fn account() -> OwnAccount {
        OwnAccount::new(
            UserId::parse("@alice:example.org").unwrap(),
            DeviceId::parse("ALICE").unwrap(),
        )
    }

    #[test]
    fn bootstrap_bodies_parse_and_verify() {
        let acc = account();
        let (private, req) = PrivateCrossSigningIdentity::bootstrap(&acc).unwrap();
        let up = &req.device_signing_upload;
        let keys = CrossSigningKeys::parse(
            acc.user_id(),
            &up["master_key"],
            &up["self_signing_key"],
            Some(&up["user_signing_key"]),
        )
        .unwrap();
        // The device signed the master key.
        verify_json(&up["master_key"], acc.user_id(), "ed25519:ALICE", &acc.ed25519_key()).unwrap();
        // The SSK signed our device.
        let device = &req.signatures_upload["@alice:example.org"]["ALICE"];
        keys.self_signing.verify_signature_on(device).unwrap();
        assert_eq!(device["keys"], acc.device_keys()["keys"]);
        let own = OwnIdentity::new(keys).unwrap();
        private.matches(&own).unwrap();
        assert!(private.owns_master_key_of(&own));
    }

    #[test]
    fn seeds_round_trip_and_mismatch_detected() {
        let acc = account();
        let (private, req) = PrivateCrossSigningIdentity::bootstrap(&acc).unwrap();
        let up = &req.device_signing_upload;
        let own = OwnIdentity::new(
            CrossSigningKeys::parse(
                acc.user_id(),
                &up["master_key"],
                &up["self_signing_key"],
                Some(&up["user_signing_key"]),
            )
            .unwrap(),
        )
        .unwrap();
        let mut seeds = private.export_seeds();
        assert_eq!(seeds.master.as_deref().map(str::len), Some(43));
        // Padded seeds (seen in the wild) load too.
        if let Some(m) = seeds.master.as_mut() {
            m.push('=');
        }
        let back = PrivateCrossSigningIdentity::import_checked(&seeds, &own).unwrap();
        assert_eq!(back.public_key(KeyUsage::Master), private.public_key(KeyUsage::Master));
        let other = PrivateCrossSigningIdentity::new(acc.user_id().clone()).export_seeds();
        assert!(matches!(
            PrivateCrossSigningIdentity::import_checked(&other, &own),
            Err(CrossSigningError::PublicKeyMismatch(KeyUsage::Master))
        ));
        let bad = PrivateIdentityRecord {
            user_id: acc.user_id().clone(),
            master: Some("not a key".into()),
            self_signing: None,
            user_signing: None,
        };
        assert!(matches!(
            PrivateCrossSigningIdentity::from_seeds(&bad),
            Err(CrossSigningError::InvalidKey(KeyUsage::Master))
        ));
    }

    #[test]
    fn debug_redacts_private_keys() {
        let private = PrivateCrossSigningIdentity::new(UserId::parse("@a:b").unwrap());
        let seeds = private.export_seeds();
        let dbg = format!("{private:?}");
        for seed in [&seeds.master, &seeds.self_signing, &seeds.user_signing] {
            let seed = seed.as_deref().unwrap();
            assert!(!dbg.contains(seed));
        }
        let dbg = format!("{seeds:?}");
        assert!(!dbg.contains(seeds.master.as_deref().unwrap()));
    }

    #[test]
    fn sign_user_and_missing_keys() {
        let alice = PrivateCrossSigningIdentity::new(UserId::parse("@alice:hs").unwrap());
        let bob = PrivateCrossSigningIdentity::new(UserId::parse("@bob:hs").unwrap());
        let bob_master = CrossSigningKey::parse_master(
            &bob.public_key_json(KeyUsage::Master).unwrap(),
            bob.user_id(),
        )
        .unwrap();
        let signed = alice.sign_user(&bob_master).unwrap();
        let usk = alice.public_key(KeyUsage::UserSigning).unwrap();
        verify_json(&signed, alice.user_id(), &cross_signing_key_id(&usk), &usk).unwrap();
        let body = signatures_upload_body([(
            bob.user_id().clone(),
            bob_master.public_key().to_base64(),
            signed,
        )]);
        assert!(body["@bob:hs"][bob_master.public_key().to_base64()].is_object());
        let partial = PrivateCrossSigningIdentity::from_seeds(&PrivateIdentityRecord {
            user_id: alice.user_id().clone(),
            master: None,
            self_signing: None,
            user_signing: None,
        })
        .unwrap();
        assert!(matches!(
            partial.sign_user(&bob_master),
            Err(CrossSigningError::MissingKey(KeyUsage::UserSigning))
        ));
        // Signing someone else's device with our SSK is refused.
        let bob_device = account_for("@bob:hs").device_keys();
        assert!(matches!(
            alice.sign_device(&bob_device),
            Err(CrossSigningError::UserMismatch { .. })
        ));
    }

    fn account_for(user: &str) -> OwnAccount {
        OwnAccount::new(UserId::parse(user).unwrap(), DeviceId::parse("D").unwrap())
    }
}
