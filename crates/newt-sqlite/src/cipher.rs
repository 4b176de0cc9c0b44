//! The at-rest cipher: sealed values, keyed lookup hashes and keyed row
//! digests.
//!
//! The keys come from the store's random 32-byte data key through
//! HKDF-SHA256, one `info` string per purpose, so that a weakness in one use
//! never leaks into another:
//!
//! - values: AES-256-GCM, a fresh random 96-bit nonce per write, stored as
//!   `nonce || ciphertext || tag`. The associated data names the table and
//!   every key column of the row, so a ciphertext moved to another row or
//!   table fails to open instead of being read as that row's value.
//! - lookups: HMAC-SHA256 over `kind || 0x00 || value`; identifiers (user,
//!   room, device, session IDs, Curve25519 keys, request IDs) are only ever
//!   stored in this form.
//! - row digests: HMAC-SHA256 over a row's associated data and sealed value,
//!   summed per table in the integrity record (see
//!   [`integrity`](crate::integrity)).
//!
//! Random nonces are safe here: a store writes far fewer than 2^32 values
//! under one data key.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use rusqlite::types::Value;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::Sha256;
use zeroize::Zeroizing;

use newt_store::StoreError;

/// HKDF info for the value-encryption key.
const VALUE_INFO: &[u8] = b"newt-sqlite value encryption v1";
/// HKDF info for the lookup-hash key.
const LOOKUP_INFO: &[u8] = b"newt-sqlite lookup hash v1";
/// HKDF info for the row-digest key.
const DIGEST_INFO: &[u8] = b"newt-sqlite row digest v1";
/// Length of an AES-GCM nonce.
const NONCE_LEN: usize = 12;
/// Prefix of every associated-data string (versions the layout).
const AD_PREFIX: &[u8] = b"newt-sqlite row v1\0";

/// A keyed lookup hash, as stored in the key columns.
pub(crate) type Hash = [u8; 32];

/// What an identifier is: each kind hashes in its own domain.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// A Matrix user ID.
    User,
    /// A device ID.
    Device,
    /// A room ID.
    Room,
    /// A Megolm session ID.
    MegolmSession,
    /// An Olm session ID.
    OlmSession,
    /// A Curve25519 identity key.
    SenderKey,
    /// A key request ID.
    Request,
    /// A withheld notice's Megolm session ID and sender, together
    /// (`session_id` `\n` `sender`): notices are kept per sender.
    WithheldSender,
}

/// What [`Kind::WithheldSender`] hashes: a session ID (base64) and a user
/// ID, neither of which holds a newline.
pub(crate) fn withheld_key(session_id: &str, sender: &newt_proto::ids::UserId) -> String {
    format!("{session_id}\n{sender}")
}

impl Kind {
    fn label(self) -> &'static [u8] {
        match self {
            Kind::User => b"user",
            Kind::Device => b"device",
            Kind::Room => b"room",
            Kind::MegolmSession => b"megolm_session",
            Kind::OlmSession => b"olm_session",
            Kind::SenderKey => b"sender_key",
            Kind::Request => b"request",
            Kind::WithheldSender => b"withheld_session_sender",
        }
    }
}

/// Seals and opens values, and hashes lookup keys and rows, for one store.
pub(crate) struct Cipher {
    value: Aes256Gcm,
    lookup: Hmac<Sha256>,
    digest: Hmac<Sha256>,
}

impl Cipher {
    /// Derives the per-purpose keys from the store's data key.
    pub(crate) fn new(data_key: &[u8; 32]) -> Result<Self, StoreError> {
        let hkdf = Hkdf::<Sha256>::new(None, data_key);
        let value_key = expand(&hkdf, VALUE_INFO)?;
        let lookup_key = expand(&hkdf, LOOKUP_INFO)?;
        let digest_key = expand(&hkdf, DIGEST_INFO)?;
        let value = Aes256Gcm::new_from_slice(&value_key[..]).map_err(backend)?;
        let lookup = <Hmac<Sha256> as Mac>::new_from_slice(&lookup_key[..]).map_err(backend)?;
        let digest = <Hmac<Sha256> as Mac>::new_from_slice(&digest_key[..]).map_err(backend)?;
        Ok(Self { value, lookup, digest })
    }

    /// The keyed hash of an identifier.
    pub(crate) fn hash(&self, kind: Kind, value: &str) -> Hash {
        let mut mac = self.lookup.clone();
        mac.update(kind.label());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The keyed hash of an identifier, as an SQL parameter.
    pub(crate) fn key(&self, kind: Kind, value: &str) -> Value {
        Value::Blob(self.hash(kind, value).to_vec())
    }

    /// The keyed digest of a row as stored: its table, key columns and
    /// sealed value. Two different sealed values of one row (an old copy and
    /// the current one) have different digests.
    pub(crate) fn row_digest(&self, table: &str, keys: &[Value], sealed: &[u8]) -> [u8; 32] {
        let ad = associated_data(table, keys);
        let mut mac = self.digest.clone();
        mac.update(&(ad.len() as u64).to_be_bytes());
        mac.update(&ad);
        mac.update(sealed);
        mac.finalize().into_bytes().into()
    }

    /// Serialises `record` and seals it for the row (`table`, `keys`).
    pub(crate) fn seal_json<T: Serialize>(
        &self,
        table: &str,
        keys: &[Value],
        record: &T,
    ) -> Result<Vec<u8>, StoreError> {
        // Grown in a buffer that wipes every copy it outgrows.
        let mut plaintext = newt_proto::secret::SecretBuf::with_capacity(1024);
        serde_json::to_writer(&mut plaintext, record)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.seal(&associated_data(table, keys), &plaintext.into_inner())
    }

    /// Opens a value sealed for the row (`table`, `keys`) and deserialises it.
    pub(crate) fn open_json<T: DeserializeOwned>(
        &self,
        table: &str,
        keys: &[Value],
        sealed: &[u8],
    ) -> Result<T, StoreError> {
        let plaintext = self.open(&associated_data(table, keys), sealed)?;
        serde_json::from_slice(&plaintext)
            .map_err(|e| StoreError::Corrupt(format!("{table}: undecodable value: {e}")))
    }

    /// Seals `plaintext` under the value key.
    pub(crate) fn seal(&self, ad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        seal_with(&self.value, ad, plaintext)
    }

    /// Opens a value sealed by [`Cipher::seal`]; tampering or a wrong key is
    /// [`StoreError::Corrupt`].
    pub(crate) fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        open_with(&self.value, ad, sealed)
            .ok_or_else(|| StoreError::Corrupt("a stored value failed authentication".into()))
    }
}

/// Seals with a given AES-256-GCM key (also used to wrap the data key).
pub(crate) fn seal_with(
    key: &Aes256Gcm,
    ad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let ciphertext = key
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: ad })
        .map_err(|_| StoreError::Backend("AES-GCM encryption failed".into()))?;
    let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&ciphertext);
    Ok(sealed)
}

/// Opens `nonce || ciphertext || tag`; `None` if it does not authenticate.
pub(crate) fn open_with(key: &Aes256Gcm, ad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    key.decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: ad })
        .ok()
        .map(Zeroizing::new)
}

/// The associated data binding a value to its row: the table name and every
/// key column, each length-prefixed so that no two rows share an encoding.
pub(crate) fn associated_data(table: &str, keys: &[Value]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_PREFIX.len() + table.len() + 1 + keys.len() * 40);
    ad.extend_from_slice(AD_PREFIX);
    ad.extend_from_slice(table.as_bytes());
    ad.push(0);
    for key in keys {
        let (tag, bytes): (u8, Vec<u8>) = match key {
            Value::Null => (b'n', Vec::new()),
            Value::Integer(i) => (b'i', i.to_be_bytes().to_vec()),
            Value::Real(r) => (b'r', r.to_be_bytes().to_vec()),
            Value::Text(t) => (b't', t.as_bytes().to_vec()),
            Value::Blob(b) => (b'b', b.clone()),
        };
        ad.push(tag);
        ad.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        ad.extend_from_slice(&bytes);
    }
    ad
}

fn expand(hkdf: &Hkdf<Sha256>, info: &[u8]) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let mut okm = Zeroizing::new([0u8; 32]);
    hkdf.expand(info, &mut okm[..])
        .map_err(|_| StoreError::Backend("HKDF expand failed".into()))?;
    Ok(okm)
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(byte: u8) -> Cipher {
        Cipher::new(&[byte; 32]).unwrap()
    }

    #[test]
    fn values_round_trip_only_in_their_row() {
        let c = cipher(1);
        let keys = [c.key(Kind::Room, "!a:x"), Value::Integer(3)];
        let sealed = c.seal_json("t", &keys, &"hello").unwrap();
        let back: String = c.open_json("t", &keys, &sealed).unwrap();
        assert_eq!(back, "hello");
        // Another table, another row, another key: all refuse.
        assert!(c.open_json::<String>("u", &keys, &sealed).is_err());
        let other = [c.key(Kind::Room, "!b:x"), Value::Integer(3)];
        assert!(c.open_json::<String>("t", &other, &sealed).is_err());
        assert!(cipher(2).open_json::<String>("t", &keys, &sealed).is_err());
    }

    #[test]
    fn nonces_are_fresh() {
        let c = cipher(1);
        let a = c.seal(b"ad", b"same").unwrap();
        let b = c.seal(b"ad", b"same").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn hashes_are_keyed_and_domain_separated() {
        let c = cipher(1);
        assert_eq!(c.hash(Kind::User, "@a:x"), c.hash(Kind::User, "@a:x"));
        assert_ne!(c.hash(Kind::User, "@a:x"), c.hash(Kind::Device, "@a:x"));
        assert_ne!(c.hash(Kind::User, "@a:x"), cipher(2).hash(Kind::User, "@a:x"));
    }

    #[test]
    fn row_digests_tell_copies_rows_and_keys_apart() {
        let c = cipher(1);
        let keys = [c.key(Kind::Room, "!a:x")];
        let old = c.seal_json("t", &keys, &"v").unwrap();
        let new = c.seal_json("t", &keys, &"v").unwrap();
        let digest = c.row_digest("t", &keys, &new);
        assert_eq!(digest, c.row_digest("t", &keys, &new));
        assert_ne!(digest, c.row_digest("t", &keys, &old));
        assert_ne!(digest, c.row_digest("u", &keys, &new));
        assert_ne!(digest, cipher(2).row_digest("t", &keys, &new));
    }

    #[test]
    fn associated_data_is_unambiguous() {
        let a = associated_data("t", &[Value::Blob(b"ab".to_vec()), Value::Blob(b"c".to_vec())]);
        let b = associated_data("t", &[Value::Blob(b"a".to_vec()), Value::Blob(b"bc".to_vec())]);
        assert_ne!(a, b);
    }
}
