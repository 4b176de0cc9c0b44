//! Sealed values, keyed lookup hashes and keyed row digests under one
//! store's data key (the scheme is described in the [crate docs](crate)).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::rand_core::UnwrapErr;
use rand::rngs::SysRng;
use rand::Rng;
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
pub(crate) const NONCE_LEN: usize = 12;
/// Prefix of every associated-data string (versions the layout).
const AD_PREFIX: &[u8] = b"newt-sqlite row v1\0";

/// A keyed lookup hash, as stored in place of an identifier.
pub type Hash = [u8; 32];

/// What an identifier is: each kind hashes in its own domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
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
    /// ([`withheld_key`]): notices are kept per sender.
    WithheldSender,
}

impl Kind {
    /// The domain label hashed before the identifier.
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

/// What [`Kind::WithheldSender`] hashes: a session ID (base64) and a user
/// ID, joined by a newline (neither holds one).
pub fn withheld_key(session_id: &str, sender: &newt_proto::ids::UserId) -> String {
    format!("{session_id}\n{sender}")
}

/// One key column of a row, as it enters the row's associated data. The
/// variants are SQLite's storage classes; another backend maps its key
/// parts onto them (a hash is a `Blob`, a flag or an index an `Integer`, a
/// fixed name such as a singleton's a `Text`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyColumn<'a> {
    /// No value.
    Null,
    /// A signed 64-bit integer (flags are 0 or 1).
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(&'a str),
    /// Bytes (lookup hashes).
    Blob(&'a [u8]),
}

/// The associated data binding a value to its row: the layout version,
/// the table name and every key column, each tagged and length-prefixed so
/// that no two rows share an encoding (see the [crate docs](crate#associated-data)).
pub fn associated_data<'a>(table: &str, keys: impl IntoIterator<Item = KeyColumn<'a>>) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_PREFIX.len() + table.len() + 1 + 80);
    ad.extend_from_slice(AD_PREFIX);
    ad.extend_from_slice(table.as_bytes());
    ad.push(0);
    for key in keys {
        let integer;
        let real;
        let (tag, bytes): (u8, &[u8]) = match key {
            KeyColumn::Null => (b'n', &[]),
            KeyColumn::Integer(i) => {
                integer = i.to_be_bytes();
                (b'i', &integer)
            }
            KeyColumn::Real(r) => {
                real = r.to_be_bytes();
                (b'r', &real)
            }
            KeyColumn::Text(t) => (b't', t.as_bytes()),
            KeyColumn::Blob(b) => (b'b', b),
        };
        ad.push(tag);
        ad.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        ad.extend_from_slice(bytes);
    }
    ad
}

/// Seals and opens values, and hashes lookup keys and rows, for one store.
pub struct Cipher {
    value: Aes256Gcm,
    lookup: Hmac<Sha256>,
    digest: Hmac<Sha256>,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(<redacted>)")
    }
}

impl Cipher {
    /// Derives the per-purpose keys from the store's data key.
    pub fn new(data_key: &[u8; 32]) -> Result<Self, StoreError> {
        let value_key = purpose_key(data_key, VALUE_INFO)?;
        let lookup_key = purpose_key(data_key, LOOKUP_INFO)?;
        let digest_key = purpose_key(data_key, DIGEST_INFO)?;
        let value = Aes256Gcm::new_from_slice(&value_key[..]).map_err(backend)?;
        Ok(Self {
            value,
            lookup: hmac_sha256(&lookup_key[..])?,
            digest: hmac_sha256(&digest_key[..])?,
        })
    }

    /// The keyed hash of an identifier: HMAC-SHA256 over
    /// `label || 0x00 || value`.
    pub fn hash(&self, kind: Kind, value: &str) -> Hash {
        let mut mac = self.lookup.clone();
        mac.update(kind.label());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The keyed digest of a row as stored: HMAC-SHA256 over the length of
    /// its associated data (8 bytes, big-endian), that associated data and
    /// the sealed value. Two different sealed values of one row (an old
    /// copy and the current one) have different digests.
    pub fn digest_row(&self, ad: &[u8], sealed: &[u8]) -> [u8; 32] {
        let mut mac = self.digest.clone();
        mac.update(&(ad.len() as u64).to_be_bytes());
        mac.update(ad);
        mac.update(sealed);
        mac.finalize().into_bytes().into()
    }

    /// Serialises `record` as JSON and seals it with the row's associated
    /// data `ad` (from [`associated_data`]).
    pub fn seal_record<T: Serialize>(&self, ad: &[u8], record: &T) -> Result<Vec<u8>, StoreError> {
        // Grown in a buffer that wipes every copy it outgrows.
        let mut plaintext = newt_proto::secret::SecretBuf::with_capacity(1024);
        serde_json::to_writer(&mut plaintext, record)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.seal(ad, &plaintext.into_inner())
    }

    /// Opens a value sealed by [`seal_record`](Self::seal_record) with the
    /// same `ad` and deserialises it.
    pub fn open_record<T: DeserializeOwned>(
        &self,
        ad: &[u8],
        sealed: &[u8],
    ) -> Result<T, StoreError> {
        let plaintext = self.open(ad, sealed)?;
        serde_json::from_slice(&plaintext)
            .map_err(|e| StoreError::Corrupt(format!("undecodable value: {e}")))
    }

    /// Seals `plaintext` under the value key: `nonce || ciphertext || tag`.
    pub fn seal(&self, ad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        seal_with(&self.value, ad, plaintext)
    }

    /// Opens a value sealed by [`Cipher::seal`]; tampering, another row's
    /// associated data or another store's key is [`StoreError::Corrupt`].
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        open_with(&self.value, ad, sealed)
            .ok_or_else(|| StoreError::Corrupt("a stored value failed authentication".into()))
    }
}

/// Seals with a given AES-256-GCM key under a fresh random nonce (also
/// used to wrap the data key).
pub(crate) fn seal_with(
    key: &Aes256Gcm,
    ad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let mut nonce = [0u8; NONCE_LEN];
    UnwrapErr(SysRng).fill_bytes(&mut nonce);
    seal_with_nonce(key, &nonce, ad, plaintext)
}

/// [`seal_with`] under a given nonce: the layout, `nonce || ciphertext || tag`.
fn seal_with_nonce(
    key: &Aes256Gcm,
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let ciphertext = key
        .encrypt(nonce.into(), Payload { msg: plaintext, aad: ad })
        .map_err(|_| StoreError::Backend("AES-GCM encryption failed".into()))?;
    let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
    sealed.extend_from_slice(nonce);
    sealed.extend_from_slice(&ciphertext);
    Ok(sealed)
}

/// Opens `nonce || ciphertext || tag`; `None` if it does not authenticate.
pub(crate) fn open_with(key: &Aes256Gcm, ad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let (nonce, ciphertext) = sealed.split_first_chunk::<NONCE_LEN>()?;
    key.decrypt(nonce.into(), Payload { msg: ciphertext, aad: ad }).ok().map(Zeroizing::new)
}

/// A purpose key: HKDF-SHA256 of the data key, no salt, `info`.
fn purpose_key(data_key: &[u8; 32], info: &[u8]) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let mut okm = Zeroizing::new([0u8; 32]);
    hkdf_sha256(None, data_key, info, &mut okm[..])?;
    Ok(okm)
}

/// HKDF-SHA256 (RFC 5869) of `ikm` into `okm`; no salt is HashLen zeros.
pub(crate) fn hkdf_sha256(
    salt: Option<&[u8]>,
    ikm: &[u8],
    info: &[u8],
    okm: &mut [u8],
) -> Result<(), StoreError> {
    Hkdf::<Sha256>::new(salt, ikm)
        .expand(info, okm)
        .map_err(|_| StoreError::Backend("HKDF expand failed".into()))
}

/// An HMAC-SHA256 keyed with `key`.
fn hmac_sha256(key: &[u8]) -> Result<Hmac<Sha256>, StoreError> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).map_err(backend)
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string().into())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn cipher(byte: u8) -> Cipher {
        Cipher::new(&[byte; 32]).unwrap()
    }

    fn row<'a>(hash: &'a [u8], index: i64) -> [KeyColumn<'a>; 2] {
        [KeyColumn::Blob(hash), KeyColumn::Integer(index)]
    }

    /// RFC 5869, test cases 1 (salt and info) and 3 (no salt, no info: the
    /// form the purpose keys use, with `None` for the salt).
    #[test]
    fn hkdf_rfc5869_vectors() {
        let mut okm = [0u8; 42];
        hkdf_sha256(
            Some(&unhex("000102030405060708090a0b0c")),
            &[0x0b; 22],
            &unhex("f0f1f2f3f4f5f6f7f8f9"),
            &mut okm,
        )
        .unwrap();
        let expected =
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865";
        assert_eq!(okm.to_vec(), unhex(expected));
        hkdf_sha256(None, &[0x0b; 22], b"", &mut okm).unwrap();
        let expected =
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8";
        assert_eq!(okm.to_vec(), unhex(expected));
    }

    /// RFC 4231, test cases 1 and 2 (HMAC-SHA-256), through the constructor
    /// the lookup and digest keys use.
    #[test]
    fn hmac_rfc4231_vectors() {
        let cases: [(&[u8], &[u8], &str); 2] = [
            (
                &[0x0b; 20],
                b"Hi There",
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe",
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
        ];
        for (key, data, expected) in cases {
            let mut mac = hmac_sha256(key).unwrap();
            mac.update(data);
            assert_eq!(mac.finalize().into_bytes().to_vec(), unhex(expected));
        }
    }

    /// The GCM specification's test case 16 (McGrew and Viega; also in NIST
    /// SP 800-38D's examples): AES-256, 96-bit IV, 20 bytes of associated
    /// data, 60 bytes of plaintext. A sealed value is the IV, then C, then T.
    #[test]
    fn aes_gcm_test_case_16() {
        let key = unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
        let key = Aes256Gcm::new_from_slice(&key).unwrap();
        let iv: [u8; 12] = unhex("cafebabefacedbaddecaf888").try_into().unwrap();
        let ad = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let plaintext = unhex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let expected = unhex(
            "cafebabefacedbaddecaf888
             522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662
             76fc6ece0f4e1768cddf8853bb2d551b",
        );
        let sealed = seal_with_nonce(&key, &iv, &ad, &plaintext).unwrap();
        assert_eq!(sealed, expected);
        assert_eq!(open_with(&key, &ad, &sealed).unwrap()[..], plaintext[..]);
        // Every bit of the nonce, ciphertext and tag counts, and so does
        // the associated data.
        for bit in [0, 12 * 8, sealed.len() * 8 - 1] {
            let mut flipped = sealed.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(open_with(&key, &ad, &flipped).is_none(), "bit {bit}");
        }
        assert!(open_with(&key, &ad[1..], &sealed).is_none());
        assert!(open_with(&key, &ad, &sealed[..NONCE_LEN - 1]).is_none());
    }

    #[test]
    fn values_round_trip_only_in_their_row() {
        let c = cipher(1);
        let hash = c.hash(Kind::Room, "!a:x");
        let ad = associated_data("t", row(&hash, 3));
        let sealed = c.seal_record(&ad, &"hello").unwrap();
        let back: String = c.open_record(&ad, &sealed).unwrap();
        assert_eq!(back, "hello");
        // Another table, another row, another flag, another key: all refuse.
        let refused = |c: &Cipher, ad: &[u8]| {
            matches!(c.open_record::<String>(ad, &sealed), Err(StoreError::Corrupt(_)))
        };
        assert!(refused(&c, &associated_data("u", row(&hash, 3))));
        let other = c.hash(Kind::Room, "!b:x");
        assert!(refused(&c, &associated_data("t", row(&other, 3))));
        assert!(refused(&c, &associated_data("t", row(&hash, 4))));
        assert!(refused(&cipher(2), &ad));
    }

    #[test]
    fn a_flipped_bit_is_refused() {
        let c = cipher(1);
        let ad = associated_data("t", [KeyColumn::Text("name")]);
        let sealed = c.seal(&ad, b"value").unwrap();
        for bit in 0..sealed.len() * 8 {
            let mut flipped = sealed.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(c.open(&ad, &flipped).is_err(), "bit {bit}");
        }
        assert!(c.open(&ad, &sealed[..sealed.len() - 1]).is_err());
        assert!(c.open(&ad, b"").is_err());
    }

    #[test]
    fn nonces_are_fresh() {
        let c = cipher(1);
        let a = c.seal(b"ad", b"same").unwrap();
        let b = c.seal(b"ad", b"same").unwrap();
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
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
        let hash = c.hash(Kind::Room, "!a:x");
        let ad = associated_data("t", [KeyColumn::Blob(&hash)]);
        let old = c.seal_record(&ad, &"v").unwrap();
        let new = c.seal_record(&ad, &"v").unwrap();
        let digest = c.digest_row(&ad, &new);
        assert_eq!(digest, c.digest_row(&ad, &new));
        assert_ne!(digest, c.digest_row(&ad, &old));
        assert_ne!(digest, c.digest_row(&associated_data("u", [KeyColumn::Blob(&hash)]), &new));
        assert_ne!(digest, cipher(2).digest_row(&ad, &new));
    }

    #[test]
    fn associated_data_is_unambiguous() {
        let blobs =
            |a: &[u8], b: &[u8]| associated_data("t", [KeyColumn::Blob(a), KeyColumn::Blob(b)]);
        assert_ne!(blobs(b"ab", b"c"), blobs(b"a", b"bc"));
        assert_ne!(
            associated_data("t", [KeyColumn::Text("1")]),
            associated_data("t", [KeyColumn::Blob(b"1")])
        );
        assert_ne!(associated_data("ta", []), associated_data("t", [KeyColumn::Null]));
    }

    #[test]
    fn debug_shows_no_key() {
        assert_eq!(format!("{:?}", cipher(0xAB)), "Cipher(<redacted>)");
    }
}
