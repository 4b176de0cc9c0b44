//! Room key export files: the passphrase-encrypted `MEGOLM SESSION DATA`
//! format that Element and other clients write and read (spec: Client-Server
//! API, End-to-End Encryption, "Key exports").
//!
//! ```text
//! -----BEGIN MEGOLM SESSION DATA-----
//! base64( 0x01 | salt[16] | iv[16] | rounds u32 BE | AES-256-CTR(json) | HMAC-SHA256[32] )
//! -----END MEGOLM SESSION DATA-----
//!
//! PBKDF2-HMAC-SHA512(passphrase, salt, rounds) -> 64 bytes = AES key[32] | HMAC key[32]
//! json = [ExportedRoomKey, ...]
//! ```
//!
//! This module only does the container and the JSON. It does not check
//! `algorithm` or the session keys; the importer decides what to keep.
//!
//! ```
//! use newt_proto::export::{decrypt_export, encrypt_export, ExportedRoomKey};
//!
//! let key = ExportedRoomKey {
//!     algorithm: newt_proto::MEGOLM_V1.to_owned(),
//!     room_id: "!room:example.org".to_owned(),
//!     sender_key: "cKQkLU8izjY3tpLVPiR4PDeeCEKtaDiAGiQH+UbZm2w".to_owned(),
//!     session_id: "8sdNGgmLft8osylLK9ij3IotBLyQQufe/KngiW4Dpq0".to_owned(),
//!     session_key: "AQAAAAB...".to_owned(),
//!     sender_claimed_keys: Default::default(),
//!     forwarding_curve25519_key_chain: Vec::new(),
//!     shared_history: false,
//! };
//!
//! // Use at least MIN_RECOMMENDED_ROUNDS for real files; 1 keeps the example fast.
//! let file = encrypt_export(&[key.clone()], "correct horse", 1)?;
//! assert!(file.starts_with("-----BEGIN MEGOLM SESSION DATA-----\n"));
//! assert_eq!(decrypt_export(&file, "correct horse")?, vec![key]);
//! # Ok::<(), newt_proto::export::ExportError>(())
//! ```
//!
//! Reading costs `rounds` PBKDF2 iterations, a number the file chooses: a
//! hostile file can ask for about four billion (hours of CPU). Every reader
//! refuses more than [`DEFAULT_MAX_ROUNDS`] with
//! [`ExportError::TooManyRounds`] before deriving anything;
//! [`ExportStream::open_with_max_rounds`] takes a higher limit. Even within
//! the limit the derivation takes seconds: [`ExportKdf`] splits it from the
//! rest of reading so that a driver can run it on another thread, then
//! [`ExportStream::open_with_keys`] reads the file.
//!
//! One decoder and one encoder, which every function here goes through:
//!
//! ```text
//! file text ─> armor: header/footer lines, streamed lenient base64
//!           ─> container::Decoder: header, round limit, PBKDF2, HMAC, AES-CTR
//!              ├─> decrypt_export_bytes: collects the plaintext
//!              └─> json::ArraySplitter ─> serde, one key at a time
//!                  ─> reader::ExportStream ─> decrypt_export, decrypt_export_with
//!                                             (collect the stream)
//! keys ─> writer::ExportWriter ─> file text   (encrypt_export, encrypt_export_bytes)
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

mod armor;
mod container;
mod json;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

use armor::armored_body;
use container::{Decoder, Keying};
pub use container::{ExportKdf, ExportKeys};
pub use reader::ExportStream;
pub use writer::ExportWriter;

/// The line before the base64 body.
pub const HEADER: &str = "-----BEGIN MEGOLM SESSION DATA-----";
/// The line after the base64 body.
pub const FOOTER: &str = "-----END MEGOLM SESSION DATA-----";
/// The fewest PBKDF2 rounds the spec recommends for new exports.
pub const MIN_RECOMMENDED_ROUNDS: u32 = 100_000;
/// The most PBKDF2 rounds a file may ask for before reading refuses it
/// ([`ExportError::TooManyRounds`]), unless the caller allows more
/// ([`ExportStream::open_with_max_rounds`]).
///
/// Ten times the 500,000 that Element (Web, Desktop, Android) writes, and
/// fifty times the spec's recommended minimum, so real files pass with room
/// to spare. PBKDF2-HMAC-SHA512 costs about 1.2 µs a round on one core of a
/// desktop, so the limit bounds what a file can make us do at about 6 s
/// (longer on a phone or in wasm), where `u32::MAX` rounds are about 85
/// minutes.
pub const DEFAULT_MAX_ROUNDS: u32 = 5_000_000;

/// One exported Megolm session (`ExportedSessionData` in the spec).
///
/// Serialises with the spec's field names. Unknown fields are ignored when
/// reading. `Debug` redacts `session_key`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedRoomKey {
    /// The encryption algorithm, normally [`MEGOLM_V1`](crate::MEGOLM_V1).
    pub algorithm: String,
    /// The room the session belongs to.
    pub room_id: String,
    /// The Curve25519 identity key of the device that created the session.
    pub sender_key: String,
    /// The Megolm session ID.
    pub session_id: String,
    /// The session key in Megolm export format (unpadded base64). Secret.
    pub session_key: String,
    /// Keys the sending device claimed, normally `{"ed25519": ...}`.
    #[serde(default)]
    pub sender_claimed_keys: BTreeMap<String, String>,
    /// Curve25519 keys of the devices this key was forwarded through.
    #[serde(default)]
    pub forwarding_curve25519_key_chain: Vec<String>,
    /// Whether the key may be shared with users invited later (MSC3061).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_history: bool,
}

impl fmt::Debug for ExportedRoomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportedRoomKey")
            .field("algorithm", &self.algorithm)
            .field("room_id", &self.room_id)
            .field("sender_key", &self.sender_key)
            .field("session_id", &self.session_id)
            .field("session_key", &"<redacted>")
            .field("sender_claimed_keys", &self.sender_claimed_keys)
            .field("forwarding_curve25519_key_chain", &self.forwarding_curve25519_key_chain)
            .field("shared_history", &self.shared_history)
            .finish()
    }
}

/// Why a key export could not be read or written.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The file has no header line: it is not a key export.
    #[error("not a key export: no `{HEADER}` line")]
    MissingHeader,
    /// The file has a header but no footer after it: it was cut short.
    #[error("the key export is incomplete: no `{FOOTER}` line")]
    MissingFooter,
    /// The text between header and footer is not base64: a damaged file.
    #[error("the key export is not valid base64")]
    Base64,
    /// The payload is too short to hold version, salt, IV, rounds and MAC.
    #[error("the key export is too short")]
    TooShort,
    /// The payload's version byte is not 1: written by a newer or foreign format.
    #[error("unsupported key export version {0}")]
    UnsupportedVersion(u8),
    /// The PBKDF2 round count is zero: a malformed file, or a caller's mistake when writing.
    #[error("a key export needs at least one PBKDF2 round")]
    ZeroRounds,
    /// The file asks for more PBKDF2 rounds than the reader allows
    /// ([`DEFAULT_MAX_ROUNDS`] unless raised): a hostile file, or one from
    /// an exporter set far above the usual. Found before any key derivation.
    #[error("the key export asks for {rounds} PBKDF2 rounds, more than the {max} allowed")]
    TooManyRounds {
        /// The round count in the file.
        rounds: u32,
        /// The reader's limit.
        max: u32,
    },
    /// The MAC does not match: the passphrase is wrong or the file was modified.
    #[error("wrong passphrase, or the key export was modified")]
    BadMac,
    /// The decrypted content is not a JSON array of exported keys (the
    /// exporter wrote bad JSON), or the keys could not be serialised. The
    /// message never quotes values from the file.
    #[error("invalid key export content: {0}")]
    Json(String),
    /// The operating system's random number generator failed while writing.
    #[error("no randomness available: {0}")]
    Rng(String),
    /// Writing the export failed.
    #[error("could not write the key export: {0}")]
    Io(String),
}

/// Encrypts `keys` into a key export file protected by `passphrase`.
///
/// `rounds` is the PBKDF2 iteration count; use at least
/// [`MIN_RECOMMENDED_ROUNDS`] (a file with more than
/// [`DEFAULT_MAX_ROUNDS`] can only be read with a raised limit). The salt
/// and IV come from the OS RNG.
/// The output is padded base64 wrapped at 128 characters, between the header
/// and footer lines, with a trailing newline. For many keys, prefer
/// [`ExportWriter`], which never holds more than one key's JSON.
pub fn encrypt_export(
    keys: &[ExportedRoomKey],
    passphrase: &str,
    rounds: u32,
) -> Result<String, ExportError> {
    let mut writer = ExportWriter::new(Vec::new(), passphrase, rounds)?;
    for key in keys {
        writer.push(key)?;
    }
    utf8(writer.finish()?)
}

/// Encrypts arbitrary bytes in the key export container.
///
/// Most callers want [`encrypt_export`]; this is for tools and tests that
/// handle the JSON themselves.
pub fn encrypt_export_bytes(
    plaintext: &[u8],
    passphrase: &str,
    rounds: u32,
) -> Result<String, ExportError> {
    let mut writer = ExportWriter::new(Vec::new(), passphrase, rounds)?;
    writer.push_raw(&mut Zeroizing::new(plaintext.to_vec()))?;
    utf8(writer.finish_container()?)
}

fn utf8(bytes: Vec<u8>) -> Result<String, ExportError> {
    String::from_utf8(bytes).map_err(|_| ExportError::Io("non-UTF-8 output".into()))
}

/// Decrypts a key export file into its keys.
///
/// Accepts CRLF, surrounding whitespace, lines wrapped anywhere, padded or
/// unpadded base64, and per-line padding as matrix-js-sdk writes it.
/// Fails with [`ExportError::BadMac`] on a wrong passphrase (no key is
/// handed out before the MAC is verified), and with
/// [`ExportError::TooManyRounds`] on a file asking for more than
/// [`DEFAULT_MAX_ROUNDS`] (for those, see
/// [`ExportStream::open_with_max_rounds`]).
pub fn decrypt_export(file: &str, passphrase: &str) -> Result<Vec<ExportedRoomKey>, ExportError> {
    let mut stream = ExportStream::open_whole(file, passphrase)?;
    let mut keys = Vec::with_capacity(stream.total());
    while let Some(key) = stream.next_key()? {
        keys.push(key);
    }
    Ok(keys)
}

/// Decrypts a key export and hands the keys to `on_key` one at a time, so a
/// large import never holds the parsed keys twice.
///
/// `on_key` gets each key with `(done, total)`: `done` counts this key (1 for
/// the first), `total` is the number of keys in the file. Returning
/// `ControlFlow::Break(b)` stops early and the result is `Ok(Break(b))`, so
/// an importer can stop on a store error and get it back. Otherwise the
/// result is `Ok(Continue(total))`.
///
/// The whole JSON is checked before the first call, so an error means no key
/// was handed out. The decrypted text is zeroised when done.
pub fn decrypt_export_with<B>(
    file: &str,
    passphrase: &str,
    mut on_key: impl FnMut(ExportedRoomKey, usize, usize) -> ControlFlow<B>,
) -> Result<ControlFlow<B, usize>, ExportError> {
    let mut stream = ExportStream::open_whole(file, passphrase)?;
    let total = stream.total();
    while let Some(key) = stream.next_key()? {
        if let ControlFlow::Break(b) = on_key(key, stream.done(), total) {
            return Ok(ControlFlow::Break(b));
        }
    }
    Ok(ControlFlow::Continue(total))
}

/// Decrypts the key export container and returns the raw plaintext (normally
/// JSON), zeroised on drop.
///
/// Checks the header, version, round count (at most
/// [`DEFAULT_MAX_ROUNDS`]) and MAC (in constant time) before returning
/// anything: the plaintext of a file whose MAC does not match is zeroised
/// and dropped.
pub fn decrypt_export_bytes(
    file: &str,
    passphrase: &str,
) -> Result<Zeroizing<Vec<u8>>, ExportError> {
    let body = armored_body(file)?;
    let keying = Keying::Passphrase { passphrase, max_rounds: DEFAULT_MAX_ROUNDS };
    let mut decoder = Decoder::new(body, keying, true);
    // At least the decoded length, so the buffer never moves (a move would
    // leave plaintext behind unzeroised).
    let mut plaintext = Zeroizing::new(Vec::with_capacity(body.len() / 4 * 3 + 3));
    while decoder.step(|chunk| {
        plaintext.extend_from_slice(chunk);
        Ok(())
    })? {}
    decoder.finish()?;
    Ok(plaintext)
}
