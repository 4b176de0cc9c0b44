//! The store key, the key-encryption key derived from it, and the wrapped
//! data key kept in the `meta` table.
//!
//! Every value is encrypted under keys derived from a random 32-byte *data
//! key*. The data key never changes; it is stored wrapped (AES-256-GCM) by a
//! *key-encryption key* (KEK) derived from what the caller opens the store
//! with:
//!
//! - [`StoreKey::Raw`]: KEK = HKDF-SHA256(salt, raw key, "newt-sqlite key
//!   wrapping v1"). The raw key is expected to be random already (e.g. from
//!   the platform keychain), so a fast KDF is enough.
//! - [`StoreKey::Passphrase`]: KEK = Argon2id(passphrase, salt) with
//!   64 MiB of memory, 3 passes, 1 lane (above OWASP's minimum of 19 MiB/2
//!   passes), run once per open. The parameters are stored with the salt so
//!   a later build can raise them for new passphrases without breaking old
//!   stores.
//!
//! Changing the key or passphrase re-wraps the data key only. A wrong key
//! fails to unwrap (the GCM tag is the check), and a `key_check` value sealed
//! under the data key confirms the unwrapped key is the one the values were
//! written with.
//!
//! The key check also says whether the store keeps an integrity record
//! (see [`integrity`](crate::integrity)): `v2` since schema version 3, `v1`
//! before. No store can be opened without its key check, so an attacker
//! cannot make a store look older than its integrity record by deleting
//! the record and setting the schema version back.

use std::fmt;

use aes_gcm::{Aes256Gcm, KeyInit};
use argon2::{Algorithm, Argon2, Params, Version};
use hkdf::Hkdf;
use rand::rngs::OsRng;
use rand::RngCore;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use newt_store::StoreError;

use crate::cipher::{open_with, seal_with, Cipher};
use crate::retry::TxError;

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
/// Largest memory cost accepted from a file (1 GiB): a corrupt or hostile
/// file must not make us allocate without bound.
const ARGON2_MAX_M_KIB: u32 = 1024 * 1024;
/// Largest pass count accepted from a file.
const ARGON2_MAX_T: u32 = 64;
/// Largest lane count accepted from a file.
const ARGON2_MAX_P: u32 = 16;
/// HKDF info for the KEK derived from a raw key.
const RAW_WRAP_INFO: &[u8] = b"newt-sqlite key wrapping v1";
/// Prefix of the associated data of the wrapped data key.
const WRAP_AD: &[u8] = b"newt-sqlite data key v1\0";
/// The plaintext sealed as `key_check`: the store keeps an integrity record.
const KEY_CHECK: &[u8] = b"newt-sqlite key check v2";
/// The key check of a store written before schema version 3, which had no
/// integrity record yet.
const KEY_CHECK_V1: &[u8] = b"newt-sqlite key check v1";

/// `meta` rows.
const META_KEK: &str = "kek";
const META_DATA_KEY: &str = "data_key";
const META_KEY_CHECK: &str = "key_check";

/// How the KEK is derived; stored as JSON in `meta.kek` (not secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "alg", rename_all = "snake_case")]
pub(crate) enum KekSource {
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
        OsRng.fill_bytes(&mut salt);
        match key {
            StoreKey::Raw(_) => KekSource::HkdfSha256 { salt },
            StoreKey::Passphrase(_) => {
                KekSource::Argon2id { m_kib: ARGON2_M_KIB, t: ARGON2_T, p: ARGON2_P, salt }
            }
        }
    }

    /// Derives the KEK. A key of the wrong kind is [`StoreError::WrongKey`].
    fn derive(&self, key: &StoreKey) -> Result<Aes256Gcm, StoreError> {
        let mut kek = Zeroizing::new([0u8; 32]);
        match (self, key) {
            (KekSource::HkdfSha256 { salt }, StoreKey::Raw(raw)) => {
                Hkdf::<Sha256>::new(Some(salt), raw)
                    .expand(RAW_WRAP_INFO, &mut kek[..])
                    .map_err(|_| StoreError::Backend("HKDF expand failed".into()))?;
            }
            (KekSource::Argon2id { m_kib, t, p, salt }, StoreKey::Passphrase(passphrase)) => {
                if *m_kib > ARGON2_MAX_M_KIB || *t > ARGON2_MAX_T || *p > ARGON2_MAX_P {
                    return Err(StoreError::Corrupt("KDF parameters out of range".into()));
                }
                let params = Params::new(*m_kib, *t, *p, Some(32))
                    .map_err(|e| StoreError::Corrupt(format!("KDF parameters: {e}")))?;
                Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                    .hash_password_into(passphrase.as_bytes(), salt, &mut kek[..])
                    .map_err(|e| StoreError::Corrupt(format!("KDF: {e}")))?;
            }
            _ => return Err(StoreError::WrongKey),
        }
        Aes256Gcm::new_from_slice(&kek[..])
            .map_err(|_| StoreError::Backend("KEK has the wrong length".into()))
    }
}

/// The `meta` rows as read from a store, before the key is checked.
pub(crate) struct KeyMaterial {
    kek: Vec<u8>,
    data_key: Vec<u8>,
    key_check: Vec<u8>,
}

/// Rows to write into `meta` for a new store or a new key.
pub(crate) struct NewKeyMaterial {
    kek: Vec<u8>,
    data_key: Vec<u8>,
}

/// Reads the key material; `None` if any row is missing.
pub(crate) fn read(conn: &Connection) -> Result<Option<KeyMaterial>, TxError> {
    let get = |name: &str| -> Result<Option<Vec<u8>>, rusqlite::Error> {
        conn.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
            .query_row([name], |row| row.get(0))
            .optional()
    };
    Ok(match (get(META_KEK)?, get(META_DATA_KEY)?, get(META_KEY_CHECK)?) {
        (Some(kek), Some(data_key), Some(key_check)) => {
            Some(KeyMaterial { kek, data_key, key_check })
        }
        _ => None,
    })
}

/// The random key every value key derives from.
pub(crate) type DataKey = Zeroizing<[u8; 32]>;

/// Unwraps the data key with `key` (slow for passphrases) and checks it.
pub(crate) fn unlock(
    material: &KeyMaterial,
    key: &StoreKey,
) -> Result<(DataKey, Cipher), StoreError> {
    let source: KekSource = serde_json::from_slice(&material.kek)
        .map_err(|e| StoreError::Corrupt(format!("meta.kek: {e}")))?;
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

/// Whether the key check says the store keeps an integrity record (false
/// for a store from before schema version 3, and for a store being created).
pub(crate) fn keeps_integrity_record(conn: &Connection, cipher: &Cipher) -> Result<bool, TxError> {
    let sealed: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM meta WHERE name = ?1")?
        .query_row([META_KEY_CHECK], |row| row.get(0))
        .optional()?;
    match sealed {
        None => Ok(false),
        Some(sealed) => Ok(cipher.open(&key_check_ad(), &sealed)?[..] == *KEY_CHECK),
    }
}

/// Seals the key check that says the store keeps an integrity record
/// (inside the caller's transaction, which writes that record).
pub(crate) fn write_key_check(conn: &Connection, cipher: &Cipher) -> Result<(), TxError> {
    let key_check = cipher.seal(&key_check_ad(), KEY_CHECK)?;
    conn.prepare_cached("INSERT OR REPLACE INTO meta(name, value) VALUES (?1, ?2)")?
        .execute((META_KEY_CHECK, key_check))?;
    Ok(())
}

/// A new random data key, wrapped for `key` (slow for passphrases).
pub(crate) fn generate(key: &StoreKey) -> Result<(DataKey, Cipher, NewKeyMaterial), StoreError> {
    let mut data_key: DataKey = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut data_key[..]);
    let material = wrap(&data_key, key)?;
    let cipher = Cipher::new(&data_key)?;
    Ok((data_key, cipher, material))
}

/// Wraps `data_key` for `key` with fresh KDF parameters and salt (slow for
/// passphrases).
pub(crate) fn wrap(data_key: &DataKey, key: &StoreKey) -> Result<NewKeyMaterial, StoreError> {
    let source = KekSource::fresh(key);
    let kek_json = serde_json::to_vec(&source).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let kek = source.derive(key)?;
    let wrapped = seal_with(&kek, &wrap_ad(&kek_json), &data_key[..])?;
    Ok(NewKeyMaterial { kek: kek_json, data_key: wrapped })
}

/// Writes the key material (inside the caller's transaction). The key check
/// is sealed under `cipher`, the data key that `material` wraps.
pub(crate) fn write(
    conn: &Connection,
    cipher: &Cipher,
    material: &NewKeyMaterial,
) -> Result<(), TxError> {
    let mut put =
        conn.prepare_cached("INSERT OR REPLACE INTO meta(name, value) VALUES (?1, ?2)")?;
    put.execute((META_KEK, &material.kek))?;
    put.execute((META_DATA_KEY, &material.data_key))?;
    write_key_check(conn, cipher)
}

fn wrap_ad(kek_json: &[u8]) -> Vec<u8> {
    [WRAP_AD, kek_json].concat()
}

fn key_check_ad() -> Vec<u8> {
    crate::cipher::associated_data("meta", &[Value::Text(META_KEY_CHECK.into())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts() {
        let raw = format!("{:?}", StoreKey::Raw([7; 32]));
        let pass = format!("{:?}", StoreKey::Passphrase("hunter2".into()));
        assert!(!raw.contains('7'), "{raw}");
        assert!(!pass.contains("hunter2"), "{pass}");
    }

    fn material(m: NewKeyMaterial, cipher: &Cipher) -> KeyMaterial {
        KeyMaterial {
            kek: m.kek,
            data_key: m.data_key,
            key_check: cipher.seal(&key_check_ad(), KEY_CHECK).unwrap(),
        }
    }

    #[test]
    fn raw_key_unlocks_and_wrong_keys_do_not() {
        let key = StoreKey::Raw([1; 32]);
        let (_, cipher, new) = generate(&key).unwrap();
        let m = material(new, &cipher);
        let (_, unlocked) = unlock(&m, &key).unwrap();
        let user = crate::cipher::Kind::User;
        assert_eq!(unlocked.hash(user, "@a:x"), cipher.hash(user, "@a:x"));
        assert!(matches!(unlock(&m, &StoreKey::Raw([2; 32])), Err(StoreError::WrongKey)));
        assert!(matches!(unlock(&m, &StoreKey::Passphrase("x".into())), Err(StoreError::WrongKey)));
    }

    #[test]
    fn rewrapping_keeps_the_data_key() {
        let old = StoreKey::Raw([1; 32]);
        let (data_key, cipher, new) = generate(&old).unwrap();
        let m = material(new, &cipher);
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
    fn hostile_kdf_parameters_are_refused() {
        let source = KekSource::Argon2id { m_kib: u32::MAX, t: 1, p: 1, salt: vec![0; 16] };
        assert!(matches!(
            source.derive(&StoreKey::Passphrase("x".into())),
            Err(StoreError::Corrupt(_))
        ));
    }
}
