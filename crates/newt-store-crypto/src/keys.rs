//! The store key, the key-encryption key derived from it, the wrapped data
//! key and the key check (see the [crate docs](crate#key-hierarchy)).

use std::fmt;

use aes_gcm::{Aes256Gcm, KeyInit};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::rand_core::UnwrapErr;
use rand::rngs::SysRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use newt_store::StoreError;

use crate::cipher::{associated_data, hkdf_sha256, open_with, seal_with, Cipher, KeyColumn};

/// What opens a store: a raw 32-byte key or a passphrase.
///
/// Both are wiped from memory when dropped, and `Debug` does not print them.
#[derive(Zeroize, ZeroizeOnDrop)]
pub enum StoreKey {
    /// A random 32-byte key, e.g. kept in the platform keychain.
    Raw([u8; 32]),
    /// A passphrase; it goes through Argon2id once per open.
    Passphrase(String),
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKey::Raw(_) => f.write_str("StoreKey::Raw(<redacted>)"),
            StoreKey::Passphrase(_) => f.write_str("StoreKey::Passphrase(<redacted>)"),
        }
    }
}

/// Argon2id memory cost in KiB for new passphrases (64 MiB).
const ARGON2_M_KIB: u32 = 64 * 1024;
/// Argon2id passes for new passphrases.
const ARGON2_T: u32 = 3;
/// Argon2id lanes for new passphrases.
const ARGON2_P: u32 = 1;
/// Largest memory cost accepted from a store (1 GiB): a corrupt or hostile
/// store must not make us allocate without bound.
const ARGON2_MAX_M_KIB: u32 = 1024 * 1024;
/// Largest pass count accepted from a store.
const ARGON2_MAX_T: u32 = 64;
/// Largest lane count accepted from a store.
const ARGON2_MAX_P: u32 = 16;
/// HKDF info for the KEK derived from a raw key.
const RAW_WRAP_INFO: &[u8] = b"newt-sqlite key wrapping v1";
/// Prefix of the associated data of the wrapped data key.
const WRAP_AD: &[u8] = b"newt-sqlite data key v1\0";
/// The plaintext sealed as the key check: the store keeps an integrity
/// record.
const KEY_CHECK: &[u8] = b"newt-sqlite key check v2";
/// The key check of a SQLite store written before its schema version 3,
/// which had no integrity record yet.
const KEY_CHECK_V1: &[u8] = b"newt-sqlite key check v1";

/// How the KEK is derived; stored as JSON (not secret) next to the wrapped
/// data key, and part of that key's associated data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "alg", rename_all = "snake_case")]
enum KekSource {
    /// HKDF-SHA256 of a raw key.
    HkdfSha256 {
        /// Random salt.
        salt: Vec<u8>,
    },
    /// Argon2id of a passphrase.
    Argon2id {
        /// Memory cost in KiB.
        m_kib: u32,
        /// Passes.
        t: u32,
        /// Lanes.
        p: u32,
        /// Random salt.
        salt: Vec<u8>,
    },
}

impl KekSource {
    /// Fresh parameters for `key`.
    fn fresh(key: &StoreKey) -> Self {
        let mut salt = vec![0u8; 16];
        UnwrapErr(SysRng).fill_bytes(&mut salt);
        match key {
            StoreKey::Raw(_) => KekSource::HkdfSha256 { salt },
            StoreKey::Passphrase(_) => {
                KekSource::Argon2id { m_kib: ARGON2_M_KIB, t: ARGON2_T, p: ARGON2_P, salt }
            }
        }
    }

    /// Derives the KEK. A key of the wrong kind is [`StoreError::WrongKey`].
    fn derive(&self, key: &StoreKey) -> Result<Aes256Gcm, StoreError> {
        let kek = match (self, key) {
            (KekSource::HkdfSha256 { salt }, StoreKey::Raw(raw)) => {
                let mut kek = Zeroizing::new([0u8; 32]);
                hkdf_sha256(Some(salt), raw, RAW_WRAP_INFO, &mut kek[..])?;
                kek
            }
            (KekSource::Argon2id { m_kib, t, p, salt }, StoreKey::Passphrase(passphrase)) => {
                argon2id(passphrase.as_bytes(), salt, *m_kib, *t, *p)?
            }
            _ => return Err(StoreError::WrongKey),
        };
        Aes256Gcm::new_from_slice(&kek[..])
            .map_err(|_| StoreError::Backend("KEK has the wrong length".into()))
    }
}

/// Argon2id (version 0x13, no secret, no associated data) of `passphrase`
/// into 32 bytes, with the cost parameters bounded first.
fn argon2id(
    passphrase: &[u8],
    salt: &[u8],
    m_kib: u32,
    t: u32,
    p: u32,
) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    if m_kib > ARGON2_MAX_M_KIB || t > ARGON2_MAX_T || p > ARGON2_MAX_P {
        return Err(StoreError::Corrupt("KDF parameters out of range".into()));
    }
    let params = Params::new(m_kib, t, p, Some(32))
        .map_err(|e| StoreError::Corrupt(format!("KDF parameters: {e}")))?;
    let mut kek = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, salt, &mut kek[..])
        .map_err(|e| StoreError::Corrupt(format!("KDF: {e}")))?;
    Ok(kek)
}

/// The random key every value key derives from.
pub type DataKey = Zeroizing<[u8; 32]>;

/// The key material as a backend stored it (none of it secret), before
/// the key is checked.
#[derive(Debug, Clone)]
pub struct KeyMaterial {
    /// How the KEK is derived: the JSON written by [`wrap`].
    pub kek: Vec<u8>,
    /// The data key, sealed under the KEK.
    pub data_key: Vec<u8>,
    /// The key check, sealed under the data key ([`seal_key_check`]).
    pub key_check: Vec<u8>,
}

/// A data key wrapped for a store key, for a backend to store: a new
/// store's, or a re-wrap of an existing one for a new key.
#[derive(Debug, Clone)]
pub struct WrappedDataKey {
    /// How the KEK is derived (JSON; [`KeyMaterial::kek`]).
    pub kek: Vec<u8>,
    /// The data key, sealed under the KEK ([`KeyMaterial::data_key`]).
    pub data_key: Vec<u8>,
}

/// Unwraps the data key with `key` (slow for passphrases) and checks it
/// against the key check. A key that does not open the store, or a key of
/// the other kind (raw for a passphrase store, or the reverse), is
/// [`StoreError::WrongKey`].
pub fn unlock(material: &KeyMaterial, key: &StoreKey) -> Result<(DataKey, Cipher), StoreError> {
    let source: KekSource = serde_json::from_slice(&material.kek)
        .map_err(|e| StoreError::Corrupt(format!("KEK parameters: {e}")))?;
    let kek = source.derive(key)?;
    let data_key =
        open_with(&kek, &wrap_ad(&material.kek), &material.data_key).ok_or(StoreError::WrongKey)?;
    let data_key: DataKey = Zeroizing::new(
        data_key[..].try_into().map_err(|_| StoreError::Corrupt("data key length".into()))?,
    );
    let cipher = Cipher::new(&data_key)?;
    match cipher.open(&key_check_ad(), &material.key_check) {
        Ok(check) if check[..] == *KEY_CHECK || check[..] == *KEY_CHECK_V1 => {
            Ok((data_key, cipher))
        }
        _ => Err(StoreError::WrongKey),
    }
}

/// A new random data key, wrapped for `key` (slow for passphrases).
pub fn generate(key: &StoreKey) -> Result<(DataKey, Cipher, WrappedDataKey), StoreError> {
    let mut data_key: DataKey = Zeroizing::new([0u8; 32]);
    UnwrapErr(SysRng).fill_bytes(&mut data_key[..]);
    let wrapped = wrap(&data_key, key)?;
    let cipher = Cipher::new(&data_key)?;
    Ok((data_key, cipher, wrapped))
}

/// Wraps `data_key` for `key` with fresh KDF parameters and salt (slow for
/// passphrases). Changing a store's key or passphrase is this and nothing
/// else: no value is re-encrypted.
pub fn wrap(data_key: &DataKey, key: &StoreKey) -> Result<WrappedDataKey, StoreError> {
    let source = KekSource::fresh(key);
    let kek_json = serde_json::to_vec(&source).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let kek = source.derive(key)?;
    let wrapped = seal_with(&kek, &wrap_ad(&kek_json), &data_key[..])?;
    Ok(WrappedDataKey { kek: kek_json, data_key: wrapped })
}

/// The key check to store with a data key: a known plaintext sealed under
/// it, which also says that the store keeps an integrity record.
pub fn seal_key_check(cipher: &Cipher) -> Result<Vec<u8>, StoreError> {
    cipher.seal(&key_check_ad(), KEY_CHECK)
}

/// Whether the sealed key check says the store keeps an integrity record
/// (false for an SQLite store from before its schema version 3). A key
/// check that does not open is [`StoreError::Corrupt`].
pub fn keeps_integrity_record(cipher: &Cipher, key_check: &[u8]) -> Result<bool, StoreError> {
    Ok(cipher.open(&key_check_ad(), key_check)?[..] == *KEY_CHECK)
}

fn wrap_ad(kek_json: &[u8]) -> Vec<u8> {
    [WRAP_AD, kek_json].concat()
}

fn key_check_ad() -> Vec<u8> {
    associated_data("meta", [KeyColumn::Text("key_check")])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher::tests::unhex;
    use crate::cipher::Kind;

    #[test]
    fn debug_redacts() {
        let raw = format!("{:?}", StoreKey::Raw([7; 32]));
        let pass = format!("{:?}", StoreKey::Passphrase("hunter2".into()));
        assert!(!raw.contains('7'), "{raw}");
        assert!(!pass.contains("hunter2"), "{pass}");
    }

    /// The reference implementation's Argon2id vector (phc-winner-argon2
    /// `src/test.c`, version 0x13: t = 2, m = 2^16 KiB, p = 1, "password",
    /// "somesalt"), through the function the passphrase KEK comes from: the
    /// algorithm, version and the order of the cost parameters.
    #[test]
    fn argon2id_reference_vector() {
        let kek = argon2id(b"password", b"somesalt", 1 << 16, 2, 1).unwrap();
        let expected = unhex("09316115d5cf24ed5a15a31a3ba326e5cf32edc24702987c02b6566f61913cf7");
        assert_eq!(kek.to_vec(), expected);
    }

    fn material(wrapped: WrappedDataKey, cipher: &Cipher) -> KeyMaterial {
        KeyMaterial {
            kek: wrapped.kek,
            data_key: wrapped.data_key,
            key_check: seal_key_check(cipher).unwrap(),
        }
    }

    #[test]
    fn raw_key_unlocks_and_wrong_keys_do_not() {
        let key = StoreKey::Raw([1; 32]);
        let (_, cipher, wrapped) = generate(&key).unwrap();
        let m = material(wrapped, &cipher);
        let (_, unlocked) = unlock(&m, &key).unwrap();
        assert_eq!(unlocked.hash(Kind::User, "@a:x"), cipher.hash(Kind::User, "@a:x"));
        let mut wrong = [1; 32];
        wrong[31] ^= 0x80;
        assert!(matches!(unlock(&m, &StoreKey::Raw(wrong)), Err(StoreError::WrongKey)));
        assert!(matches!(unlock(&m, &StoreKey::Passphrase("x".into())), Err(StoreError::WrongKey)));
    }

    #[test]
    fn tampered_key_material_does_not_unlock() {
        let key = StoreKey::Raw([1; 32]);
        let (_, cipher, wrapped) = generate(&key).unwrap();
        let m = material(wrapped, &cipher);
        // A flipped bit in the wrapped key or the key check: refused.
        for field in 0..2 {
            let mut bad = m.clone();
            let bytes = if field == 0 { &mut bad.data_key } else { &mut bad.key_check };
            bytes[20] ^= 1;
            assert!(matches!(unlock(&bad, &key), Err(StoreError::WrongKey)), "field {field}");
        }
        // Other KDF parameters are part of the wrapped key's associated
        // data: a changed salt does not unlock, even with the right key.
        let mut bad = m.clone();
        let mut source: serde_json::Value = serde_json::from_slice(&bad.kek).unwrap();
        source["salt"][0] = serde_json::json!(source["salt"][0].as_u64().unwrap() ^ 1);
        bad.kek = serde_json::to_vec(&source).unwrap();
        assert!(matches!(unlock(&bad, &key), Err(StoreError::WrongKey)));
        // A key check of another store: refused.
        let (_, other, _) = generate(&key).unwrap();
        let bad = KeyMaterial { key_check: seal_key_check(&other).unwrap(), ..m };
        assert!(matches!(unlock(&bad, &key), Err(StoreError::WrongKey)));
    }

    #[test]
    fn rewrapping_keeps_the_data_key() {
        let old = StoreKey::Raw([1; 32]);
        let (data_key, cipher, wrapped) = generate(&old).unwrap();
        let m = material(wrapped, &cipher);
        let next = StoreKey::Raw([3; 32]);
        let rewrapped = wrap(&data_key, &next).unwrap();
        let m2 = KeyMaterial {
            kek: rewrapped.kek,
            data_key: rewrapped.data_key,
            key_check: m.key_check.clone(),
        };
        let (unwrapped, _) = unlock(&m2, &next).unwrap();
        assert_eq!(*unwrapped, *data_key);
        assert!(matches!(unlock(&m2, &old), Err(StoreError::WrongKey)));
    }

    #[test]
    fn the_key_check_says_whether_there_is_an_integrity_record() {
        let cipher = Cipher::new(&[5; 32]).unwrap();
        assert!(keeps_integrity_record(&cipher, &seal_key_check(&cipher).unwrap()).unwrap());
        let v1 = cipher.seal(&key_check_ad(), KEY_CHECK_V1).unwrap();
        assert!(!keeps_integrity_record(&cipher, &v1).unwrap());
        let other = Cipher::new(&[6; 32]).unwrap();
        assert!(keeps_integrity_record(&other, &v1).is_err());
    }

    #[test]
    fn hostile_kdf_parameters_are_refused() {
        let source = KekSource::Argon2id { m_kib: u32::MAX, t: 1, p: 1, salt: vec![0; 16] };
        assert!(matches!(
            source.derive(&StoreKey::Passphrase("x".into())),
            Err(StoreError::Corrupt(_))
        ));
    }
}
