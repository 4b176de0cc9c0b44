//! One public cross-signing key (`CrossSigningKey` in the spec), parsed and
//! checked once, from `/keys/query` or from our own store.

use std::fmt;

use serde_json::{json, Value};
use vodozemac::Ed25519PublicKey;

use crate::ids::UserId;
use crate::json::{strip_padding, verify_json, JsonError};

use super::CrossSigningError;

/// What a cross-signing key is for (`usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyUsage {
    /// The master key (MSK): the user's identity.
    Master,
    /// The self-signing key (SSK): signs the user's own devices.
    SelfSigning,
    /// The user-signing key (USK): signs other users' master keys.
    UserSigning,
}

impl KeyUsage {
    /// The wire name, e.g. `self_signing`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::SelfSigning => "self_signing",
            Self::UserSigning => "user_signing",
        }
    }

    /// The secret-storage name of the private key, e.g. `m.cross_signing.master`.
    pub fn secret_name(self) -> &'static str {
        match self {
            Self::Master => "m.cross_signing.master",
            Self::SelfSigning => "m.cross_signing.self_signing",
            Self::UserSigning => "m.cross_signing.user_signing",
        }
    }
}

impl fmt::Display for KeyUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key ID of a cross-signing key: `ed25519:<unpadded base64 public key>`.
pub fn cross_signing_key_id(key: &Ed25519PublicKey) -> String {
    format!("ed25519:{}", key.to_base64())
}

/// A checked public cross-signing key.
///
/// Parsing guarantees: the object names the expected user, its `usage`
/// contains the expected usage, `keys` holds exactly one Ed25519 key whose
/// ID is `ed25519:<the key itself>`, and a self-signing or user-signing key
/// carries a valid signature by the user's master key.
#[derive(Clone, PartialEq)]
pub struct CrossSigningKey {
    user_id: UserId,
    usage: KeyUsage,
    key: Ed25519PublicKey,
    json: Value,
}

impl fmt::Debug for CrossSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrossSigningKey")
            .field("user_id", &self.user_id)
            .field("usage", &self.usage)
            .field("key", &self.key.to_base64())
            .finish()
    }
}

impl CrossSigningKey {
    /// Parses a master key found at `master_keys[user_id]`.
    pub fn parse_master(value: &Value, user_id: &UserId) -> Result<Self, CrossSigningError> {
        Self::parse_unsigned(value, user_id, KeyUsage::Master)
    }

    /// Parses a self-signing or user-signing key of `master`'s user and checks
    /// the master key's signature on it.
    pub fn parse_signed(
        value: &Value,
        usage: KeyUsage,
        master: &CrossSigningKey,
    ) -> Result<Self, CrossSigningError> {
        if usage == KeyUsage::Master || master.usage != KeyUsage::Master {
            return Err(CrossSigningError::UsageMismatch {
                expected: usage,
                found: vec![master.usage.as_str().to_owned()],
            });
        }
        let key = Self::parse_unsigned(value, &master.user_id, usage)?;
        master.verify_signature_on(value)?;
        Ok(key)
    }

    fn parse_unsigned(
        value: &Value,
        user_id: &UserId,
        usage: KeyUsage,
    ) -> Result<Self, CrossSigningError> {
        let obj = value.as_object().ok_or(CrossSigningError::Malformed("not an object"))?;
        let inner_user = obj
            .get("user_id")
            .and_then(Value::as_str)
            .ok_or(CrossSigningError::Malformed("user_id"))?;
        if inner_user != user_id.as_str() {
            return Err(CrossSigningError::UserMismatch {
                expected: user_id.to_string(),
                found: inner_user.to_owned(),
            });
        }
        let usages: Vec<String> = obj
            .get("usage")
            .and_then(Value::as_array)
            .ok_or(CrossSigningError::Malformed("usage"))?
            .iter()
            .map(|u| u.as_str().map(str::to_owned).ok_or(CrossSigningError::Malformed("usage")))
            .collect::<Result<_, _>>()?;
        if !usages.iter().any(|u| u == usage.as_str()) {
            return Err(CrossSigningError::UsageMismatch { expected: usage, found: usages });
        }
        let keys = obj
            .get("keys")
            .and_then(Value::as_object)
            .ok_or(CrossSigningError::Malformed("keys"))?;
        if keys.len() != 1 {
            return Err(CrossSigningError::WrongKeyCount(keys.len()));
        }
        let (key_id, key_value) = keys.iter().next().ok_or(CrossSigningError::WrongKeyCount(0))?;
        let key_str = key_value.as_str().ok_or(CrossSigningError::Malformed("key value"))?;
        let key = Ed25519PublicKey::from_base64(strip_padding(key_str))
            .map_err(|_| CrossSigningError::InvalidKey(usage))?;
        // The ID must name the key itself; comparing decoded keys (not strings)
        // means padding or trailing-bit variants cannot smuggle in a second key.
        let id_key = key_id
            .strip_prefix("ed25519:")
            .and_then(|b64| Ed25519PublicKey::from_base64(strip_padding(b64)).ok());
        if id_key != Some(key) {
            return Err(CrossSigningError::KeyIdMismatch { key_id: key_id.clone() });
        }
        Ok(Self { user_id: user_id.clone(), usage, key, json: value.clone() })
    }

    /// The owner.
    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    /// What the key is for.
    pub fn usage(&self) -> KeyUsage {
        self.usage
    }

    /// The public key.
    pub fn public_key(&self) -> Ed25519PublicKey {
        self.key
    }

    /// `ed25519:<public key>`.
    pub fn key_id(&self) -> String {
        cross_signing_key_id(&self.key)
    }

    /// The signed object as received (for storage and re-checks).
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// Checks this key's signature on `value`: `signatures[owner][key_id]`.
    pub fn verify_signature_on(&self, value: &Value) -> Result<(), JsonError> {
        verify_json(value, &self.user_id, &self.key_id(), &self.key)
    }
}

/// The unsigned `CrossSigningKey` object for `key`.
pub(crate) fn unsigned_key_json(
    user_id: &UserId,
    usage: KeyUsage,
    key: &Ed25519PublicKey,
) -> Value {
    json!({
        "user_id": user_id,
        "usage": [usage.as_str()],
        "keys": { cross_signing_key_id(key): key.to_base64() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::sign_json;
    use vodozemac::Ed25519SecretKey;

    fn user() -> UserId {
        UserId::parse("@alice:example.org").unwrap()
    }

    fn signed_ssk(master: &Ed25519SecretKey, ssk: &Ed25519SecretKey) -> Value {
        let mut v = unsigned_key_json(&user(), KeyUsage::SelfSigning, &ssk.public_key());
        sign_json(&mut v, &user(), &cross_signing_key_id(&master.public_key()), |m| master.sign(m))
            .unwrap();
        v
    }

    #[test]
    fn parses_master_and_signed_subkey() {
        let msk = Ed25519SecretKey::new();
        let ssk = Ed25519SecretKey::new();
        let m = unsigned_key_json(&user(), KeyUsage::Master, &msk.public_key());
        let master = CrossSigningKey::parse_master(&m, &user()).unwrap();
        assert_eq!(master.public_key(), msk.public_key());
        assert_eq!(master.key_id(), format!("ed25519:{}", msk.public_key().to_base64()));
        let s =
            CrossSigningKey::parse_signed(&signed_ssk(&msk, &ssk), KeyUsage::SelfSigning, &master)
                .unwrap();
        assert_eq!(s.public_key(), ssk.public_key());
        assert_eq!(s.usage(), KeyUsage::SelfSigning);
    }

    #[test]
    fn ssk_not_signed_by_master_is_rejected() {
        let msk = Ed25519SecretKey::new();
        let other = Ed25519SecretKey::new();
        let ssk = Ed25519SecretKey::new();
        let master = CrossSigningKey::parse_master(
            &unsigned_key_json(&user(), KeyUsage::Master, &msk.public_key()),
            &user(),
        )
        .unwrap();
        // Unsigned.
        let unsigned = unsigned_key_json(&user(), KeyUsage::SelfSigning, &ssk.public_key());
        assert!(matches!(
            CrossSigningKey::parse_signed(&unsigned, KeyUsage::SelfSigning, &master),
            Err(CrossSigningError::Signature(JsonError::MissingSignature { .. }))
        ));
        // Signed by some other key, filed under the master key's ID.
        let mut forged = unsigned.clone();
        sign_json(&mut forged, &user(), &master.key_id(), |m| other.sign(m)).unwrap();
        assert!(matches!(
            CrossSigningKey::parse_signed(&forged, KeyUsage::SelfSigning, &master),
            Err(CrossSigningError::Signature(JsonError::BadSignature { .. }))
        ));
        // A valid signature, but the content was changed afterwards.
        let mut tampered = signed_ssk(&msk, &ssk);
        tampered["keys"] =
            json!({ cross_signing_key_id(&other.public_key()): other.public_key().to_base64() });
        assert!(matches!(
            CrossSigningKey::parse_signed(&tampered, KeyUsage::SelfSigning, &master),
            Err(CrossSigningError::Signature(JsonError::BadSignature { .. }))
        ));
    }

    #[test]
    fn rejects_bad_shapes() {
        let k = Ed25519SecretKey::new().public_key();
        let k2 = Ed25519SecretKey::new().public_key();
        let good = unsigned_key_json(&user(), KeyUsage::Master, &k);
        let bob = UserId::parse("@bob:example.org").unwrap();
        assert!(matches!(
            CrossSigningKey::parse_master(&good, &bob),
            Err(CrossSigningError::UserMismatch { .. })
        ));
        let mut wrong_usage = good.clone();
        wrong_usage["usage"] = json!(["self_signing"]);
        assert!(matches!(
            CrossSigningKey::parse_master(&wrong_usage, &user()),
            Err(CrossSigningError::UsageMismatch { expected: KeyUsage::Master, .. })
        ));
        let mut two = good.clone();
        two["keys"][cross_signing_key_id(&k2)] = json!(k2.to_base64());
        assert!(matches!(
            CrossSigningKey::parse_master(&two, &user()),
            Err(CrossSigningError::WrongKeyCount(2))
        ));
        let mut none = good.clone();
        none["keys"] = json!({});
        assert!(matches!(
            CrossSigningKey::parse_master(&none, &user()),
            Err(CrossSigningError::WrongKeyCount(0))
        ));
        let mut mismatched = good.clone();
        mismatched["keys"] = json!({ cross_signing_key_id(&k2): k.to_base64() });
        assert!(matches!(
            CrossSigningKey::parse_master(&mismatched, &user()),
            Err(CrossSigningError::KeyIdMismatch { .. })
        ));
        let mut garbage = good.clone();
        garbage["keys"] = json!({ "ed25519:abc": "abc" });
        assert!(matches!(
            CrossSigningKey::parse_master(&garbage, &user()),
            Err(CrossSigningError::InvalidKey(KeyUsage::Master))
        ));
        assert!(matches!(
            CrossSigningKey::parse_master(&json!([]), &user()),
            Err(CrossSigningError::Malformed(_))
        ));
    }
}
