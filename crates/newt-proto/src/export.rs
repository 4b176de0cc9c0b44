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
//! hostile file can ask for about four billion. Run imports off the UI thread.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::marker::PhantomData;
use std::ops::ControlFlow;

use aes::cipher::{KeyIvInit, StreamCipher};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::{alphabet, Engine as _};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::de::{self, Deserializer as _};
use serde::{Deserialize, Serialize};
use sha2::{Sha256, Sha512};
use zeroize::{Zeroize, Zeroizing};

/// The line before the base64 body.
pub const HEADER: &str = "-----BEGIN MEGOLM SESSION DATA-----";
/// The line after the base64 body.
pub const FOOTER: &str = "-----END MEGOLM SESSION DATA-----";
/// The fewest PBKDF2 rounds the spec recommends for new exports.
pub const MIN_RECOMMENDED_ROUNDS: u32 = 100_000;

const VERSION: u8 = 1;
const SALT_LEN: usize = 16;
const IV_LEN: usize = 16;
const KEY_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// Version, salt, IV and round count: everything before the ciphertext.
const HEADER_LEN: usize = 1 + SALT_LEN + IV_LEN + 4;
const LINE_LEN: usize = 128;

type HmacSha256 = Hmac<Sha256>;

/// AES-256-CTR with a 64-bit big-endian counter in the last 8 bytes of the IV,
/// wrapping without carry into the first 8.
///
/// This is what Element does (WebCrypto `AES-CTR` with `length: 64`).
/// matrix-rust-sdk uses a 128-bit counter (`Ctr128BE`). Writers clear IV bit 63
/// so that the two agree on every file shorter than 2^63 blocks. The only files
/// where they differ have bit 63 set, and those are test vectors such as
/// matrix-react-sdk's all-ones IV, which decrypts correctly only like this.
type Aes256Ctr = ctr::Ctr64BE<aes::Aes256>;

/// Decoding that accepts what exporters actually write: padded or unpadded
/// base64, and non-zero trailing bits.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

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
/// [`MIN_RECOMMENDED_ROUNDS`]. The salt and IV come from the OS RNG.
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
    let bytes = writer.finish()?;
    String::from_utf8(bytes).map_err(|_| ExportError::Io("non-UTF-8 output".into()))
}

/// Raw bytes per armoured line: 96 bytes are 128 base64 characters, with no
/// padding inside the body.
const LINE_BYTES: usize = LINE_LEN / 4 * 3;

/// Writes a key export file one key at a time: the JSON of each key is
/// encrypted (AES-CTR is a stream cipher), MACed and base64-armoured as it
/// comes, so exporting 100,000 sessions holds one session at a time, not all.
///
/// ```
/// use newt_proto::export::{decrypt_export, ExportWriter};
/// let writer = ExportWriter::new(Vec::new(), "passphrase", 1)?;
/// let file = String::from_utf8(writer.finish()?).unwrap_or_default();
/// assert!(decrypt_export(&file, "passphrase")?.is_empty());
/// # Ok::<(), newt_proto::export::ExportError>(())
/// ```
pub struct ExportWriter<W: std::io::Write> {
    out: W,
    cipher: Aes256Ctr,
    mac: HmacSha256,
    /// Raw (encrypted) bytes not yet armoured: fewer than `LINE_BYTES`.
    pending: Vec<u8>,
    /// Reused buffer for one key's JSON (zeroised on drop).
    scratch: Zeroizing<Vec<u8>>,
    keys_written: usize,
}

impl<W: std::io::Write> ExportWriter<W> {
    /// Starts an export into `out`, protected by `passphrase` with `rounds`
    /// PBKDF2 iterations.
    pub fn new(mut out: W, passphrase: &str, rounds: u32) -> Result<Self, ExportError> {
        if rounds == 0 {
            return Err(ExportError::ZeroRounds);
        }
        let (header, salt, iv) = fresh_header(rounds)?;
        let keys = DerivedKeys::new(passphrase, &salt, rounds);
        let cipher = keys.cipher(&iv);
        let mac = keys.mac(&header);
        out.write_all(HEADER.as_bytes()).map_err(io_error)?;
        out.write_all(b"\n").map_err(io_error)?;
        let mut writer = Self {
            out,
            cipher,
            mac,
            pending: Vec::with_capacity(2 * LINE_BYTES),
            scratch: Zeroizing::new(Vec::with_capacity(1024)),
            keys_written: 0,
        };
        writer.emit(&header, false)?;
        Ok(writer)
    }

    /// Adds one key.
    pub fn push(&mut self, key: &ExportedRoomKey) -> Result<(), ExportError> {
        self.scratch.clear();
        self.scratch.push(if self.keys_written == 0 { b'[' } else { b',' });
        serde_json::to_writer(&mut *self.scratch, key).map_err(json_error)?;
        self.keys_written += 1;
        let mut chunk = std::mem::take(&mut self.scratch);
        self.seal_and_emit(&mut chunk)?;
        self.scratch = chunk;
        Ok(())
    }

    /// How many keys were written so far.
    pub fn keys_written(&self) -> usize {
        self.keys_written
    }

    /// Closes the JSON array, appends the MAC and the footer, and returns
    /// the output.
    pub fn finish(mut self) -> Result<W, ExportError> {
        let mut tail =
            Zeroizing::new(if self.keys_written == 0 { b"[]".to_vec() } else { b"]".to_vec() });
        self.seal_and_emit(&mut tail)?;
        let mac = self.mac.clone().finalize().into_bytes();
        self.emit(&mac, true)?;
        self.out.write_all(FOOTER.as_bytes()).map_err(io_error)?;
        self.out.write_all(b"\n").map_err(io_error)?;
        self.out.flush().map_err(io_error)?;
        Ok(self.out)
    }

    fn seal_and_emit(&mut self, plaintext: &mut [u8]) -> Result<(), ExportError> {
        self.cipher.apply_keystream(plaintext);
        self.mac.update(plaintext);
        self.emit(plaintext, false)
    }

    /// Armours whole lines of `bytes` (and, when `last`, the remainder).
    fn emit(&mut self, bytes: &[u8], last: bool) -> Result<(), ExportError> {
        use base64::Engine as _;
        self.pending.extend_from_slice(bytes);
        let whole = self.pending.len() / LINE_BYTES * LINE_BYTES;
        let mut line = String::with_capacity(LINE_LEN + 1);
        for chunk in self.pending[..whole].chunks(LINE_BYTES) {
            line.clear();
            base64::engine::general_purpose::STANDARD.encode_string(chunk, &mut line);
            line.push('\n');
            self.out.write_all(line.as_bytes()).map_err(io_error)?;
        }
        self.pending.drain(..whole);
        if last && !self.pending.is_empty() {
            line.clear();
            base64::engine::general_purpose::STANDARD.encode_string(&self.pending, &mut line);
            line.push('\n');
            self.out.write_all(line.as_bytes()).map_err(io_error)?;
            self.pending.clear();
        }
        Ok(())
    }
}

fn io_error(e: std::io::Error) -> ExportError {
    ExportError::Io(e.to_string())
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
    if rounds == 0 {
        return Err(ExportError::ZeroRounds);
    }
    let mut payload = Zeroizing::new(Vec::with_capacity(HEADER_LEN + plaintext.len() + MAC_LEN));
    payload.resize(HEADER_LEN, 0);
    payload.extend_from_slice(plaintext);
    seal(payload, passphrase, rounds)
}

/// Reads a key export file in batches: the file is decrypted (and its MAC
/// checked) once, every entry is validated and counted, and keys are then
/// parsed a batch at a time, so an importer holds one batch of parsed keys,
/// not all of them.
///
/// ```
/// use newt_proto::export::{ExportReader, ExportWriter};
/// let file = String::from_utf8(ExportWriter::new(Vec::new(), "pw", 1)?.finish()?).unwrap_or_default();
/// let mut reader = ExportReader::open(&file, "pw")?;
/// assert_eq!(reader.total(), 0);
/// assert!(reader.next_batch(100)?.is_empty());
/// # Ok::<(), newt_proto::export::ExportError>(())
/// ```
pub struct ExportReader {
    plaintext: Zeroizing<Vec<u8>>,
    /// Byte offset of the next element (or of the closing bracket).
    pos: usize,
    total: usize,
    done: usize,
}

impl ExportReader {
    /// Decrypts `file` with `passphrase` and validates every entry.
    pub fn open(file: &str, passphrase: &str) -> Result<Self, ExportError> {
        let plaintext = decrypt_export_bytes(file, passphrase)?;
        let total = validate_and_count(&plaintext)?;
        // Validated above as one JSON array: position after the `[`.
        let start = plaintext.iter().position(|b| *b == b'[').map_or(0, |p| p + 1);
        Ok(Self { plaintext, pos: start, total, done: 0 })
    }

    /// Keys in the file.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Keys handed out so far.
    pub fn done(&self) -> usize {
        self.done
    }

    /// Up to `max` next keys; empty when all were read.
    pub fn next_batch(&mut self, max: usize) -> Result<Vec<ExportedRoomKey>, ExportError> {
        let mut batch = Vec::with_capacity(max.min(self.total - self.done));
        while batch.len() < max && self.done < self.total {
            self.skip_separators();
            let mut stream = serde_json::Deserializer::from_slice(&self.plaintext[self.pos..])
                .into_iter::<ExportedRoomKey>();
            let key = match stream.next() {
                Some(Ok(key)) => key,
                Some(Err(e)) => return Err(json_error(e)),
                None => return Err(ExportError::Json("fewer keys than counted".into())),
            };
            self.pos += stream.byte_offset();
            self.done += 1;
            batch.push(key);
        }
        Ok(batch)
    }

    fn skip_separators(&mut self) {
        while let Some(b) = self.plaintext.get(self.pos) {
            if b.is_ascii_whitespace() || *b == b',' {
                self.pos += 1;
            } else {
                break;
            }
        }
    }
}

/// Decrypts a key export file into its keys.
///
/// Accepts CRLF, surrounding whitespace, lines wrapped anywhere, padded or
/// unpadded base64, and per-line padding as matrix-js-sdk writes it.
/// Fails with [`ExportError::BadMac`] on a wrong passphrase, before
/// decrypting anything.
pub fn decrypt_export(file: &str, passphrase: &str) -> Result<Vec<ExportedRoomKey>, ExportError> {
    let mut keys = Vec::new();
    let flow = decrypt_export_with(file, passphrase, |key, _, total| {
        if keys.is_empty() {
            keys.reserve_exact(total);
        }
        keys.push(key);
        ControlFlow::<Infallible>::Continue(())
    })?;
    match flow {
        ControlFlow::Continue(_) => Ok(keys),
        ControlFlow::Break(never) => match never {},
    }
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
    let plaintext = decrypt_export_bytes(file, passphrase)?;
    let total = validate_and_count(&plaintext)?;
    let mut done = 0;
    for_each_key(&plaintext, |key| {
        done += 1;
        on_key(key, done, total)
    })
}

/// Decrypts the key export container and returns the raw plaintext (normally
/// JSON), zeroised on drop.
///
/// Checks the header, version and MAC (in constant time) before decrypting.
pub fn decrypt_export_bytes(
    file: &str,
    passphrase: &str,
) -> Result<Zeroizing<Vec<u8>>, ExportError> {
    let payload = decode_base64_body(armored_body(file)?)?;
    let parts = Payload::parse(&payload)?;
    if parts.rounds == 0 {
        return Err(ExportError::ZeroRounds);
    }
    let keys = DerivedKeys::new(passphrase, parts.salt, parts.rounds);
    keys.mac(parts.authenticated).verify_slice(parts.mac).map_err(|_| ExportError::BadMac)?;
    let mut plaintext = Zeroizing::new(parts.ciphertext.to_vec());
    keys.cipher(parts.iv).apply_keystream(&mut plaintext);
    Ok(plaintext)
}

/// Fills in the header of `payload` (which holds `HEADER_LEN` placeholder
/// bytes followed by the plaintext), encrypts, appends the MAC and armours.
fn seal(
    mut payload: Zeroizing<Vec<u8>>,
    passphrase: &str,
    rounds: u32,
) -> Result<String, ExportError> {
    let (header, salt, iv) = fresh_header(rounds)?;
    let keys = DerivedKeys::new(passphrase, &salt, rounds);
    let (head, body) = payload.split_at_mut(HEADER_LEN);
    head.copy_from_slice(&header);
    keys.cipher(&iv).apply_keystream(body);
    let mac = keys.mac(&payload).finalize().into_bytes();
    payload.extend_from_slice(&mac);

    Ok(armor(&base64::engine::general_purpose::STANDARD.encode(&*payload)))
}

/// A container header with the salt and IV it holds.
type FreshHeader = ([u8; HEADER_LEN], [u8; SALT_LEN], [u8; IV_LEN]);

/// A new container header (version, random salt, random IV with bit 63
/// cleared, rounds), with the salt and IV it holds.
fn fresh_header(rounds: u32) -> Result<FreshHeader, ExportError> {
    let mut salt = [0u8; SALT_LEN];
    let mut iv = [0u8; IV_LEN];
    OsRng.try_fill_bytes(&mut salt).map_err(|e| ExportError::Rng(e.to_string()))?;
    OsRng.try_fill_bytes(&mut iv).map_err(|e| ExportError::Rng(e.to_string()))?;
    // Clear bit 63 so that 64- and 128-bit CTR counters agree (see `Aes256Ctr`).
    iv[8] &= 0x7f;
    let mut header = [0u8; HEADER_LEN];
    header[0] = VERSION;
    header[1..1 + SALT_LEN].copy_from_slice(&salt);
    header[1 + SALT_LEN..1 + SALT_LEN + IV_LEN].copy_from_slice(&iv);
    header[1 + SALT_LEN + IV_LEN..].copy_from_slice(&rounds.to_be_bytes());
    Ok((header, salt, iv))
}

fn armor(encoded: &str) -> String {
    let mut out = String::with_capacity(
        HEADER.len() + FOOTER.len() + encoded.len() + encoded.len() / LINE_LEN + 4,
    );
    out.push_str(HEADER);
    for (i, c) in encoded.chars().enumerate() {
        if i % LINE_LEN == 0 {
            out.push('\n');
        }
        out.push(c);
    }
    out.push('\n');
    out.push_str(FOOTER);
    out.push('\n');
    out
}

/// The text between the header and the footer. Anything before the header
/// or after the footer is ignored.
fn armored_body(file: &str) -> Result<&str, ExportError> {
    let (_, rest) = file.split_once(HEADER).ok_or(ExportError::MissingHeader)?;
    let (body, _) = rest.split_once(FOOTER).ok_or(ExportError::MissingFooter)?;
    Ok(body)
}

/// Decodes base64 with whitespace anywhere and `=` padding at the end of any
/// group, as when each line was encoded on its own (matrix-js-sdk).
fn decode_base64_body(body: &str) -> Result<Vec<u8>, ExportError> {
    let cleaned: Vec<u8> = body.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(cleaned.len() / 4 * 3 + 3);
    let mut rest = cleaned.as_slice();
    while !rest.is_empty() {
        // A segment runs up to and including a run of `=`, or to the end.
        let end = match rest.iter().position(|&b| b == b'=') {
            Some(pad) => pad + rest.iter().skip(pad).take_while(|&&b| b == b'=').count(),
            None => rest.len(),
        };
        let (segment, tail) = rest.split_at(end);
        LENIENT_BASE64.decode_vec(segment, &mut out).map_err(|_| ExportError::Base64)?;
        rest = tail;
    }
    Ok(out)
}

/// The fields of a decoded payload, borrowed from it.
struct Payload<'a> {
    salt: &'a [u8; SALT_LEN],
    iv: &'a [u8; IV_LEN],
    rounds: u32,
    ciphertext: &'a [u8],
    /// Everything the MAC covers: the payload without the MAC.
    authenticated: &'a [u8],
    mac: &'a [u8; MAC_LEN],
}

impl<'a> Payload<'a> {
    fn parse(payload: &'a [u8]) -> Result<Self, ExportError> {
        match payload.first() {
            None => return Err(ExportError::TooShort),
            Some(&VERSION) => {}
            Some(&other) => return Err(ExportError::UnsupportedVersion(other)),
        }
        let (authenticated, mac) =
            payload.split_last_chunk::<MAC_LEN>().ok_or(ExportError::TooShort)?;
        let rest = authenticated.get(1..).ok_or(ExportError::TooShort)?;
        let (salt, rest) = rest.split_first_chunk::<SALT_LEN>().ok_or(ExportError::TooShort)?;
        let (iv, rest) = rest.split_first_chunk::<IV_LEN>().ok_or(ExportError::TooShort)?;
        let (rounds, ciphertext) = rest.split_first_chunk::<4>().ok_or(ExportError::TooShort)?;
        Ok(Self { salt, iv, rounds: u32::from_be_bytes(*rounds), ciphertext, authenticated, mac })
    }
}

/// The AES and HMAC keys derived from the passphrase, zeroised on drop.
struct DerivedKeys {
    aes: Zeroizing<[u8; KEY_LEN]>,
    mac: Zeroizing<[u8; KEY_LEN]>,
}

impl DerivedKeys {
    fn new(passphrase: &str, salt: &[u8; SALT_LEN], rounds: u32) -> Self {
        let mut okm = Zeroizing::new([0u8; 2 * KEY_LEN]);
        pbkdf2::pbkdf2_hmac::<Sha512>(passphrase.as_bytes(), salt, rounds, okm.as_mut_slice());
        let mut keys =
            Self { aes: Zeroizing::new([0u8; KEY_LEN]), mac: Zeroizing::new([0u8; KEY_LEN]) };
        keys.aes.copy_from_slice(&okm[..KEY_LEN]);
        keys.mac.copy_from_slice(&okm[KEY_LEN..]);
        keys
    }

    fn cipher(&self, iv: &[u8; IV_LEN]) -> Aes256Ctr {
        Aes256Ctr::new((&*self.aes).into(), iv.into())
    }

    /// An HMAC-SHA256 over `data`, ready to finalise or verify.
    fn mac(&self, data: &[u8]) -> HmacSha256 {
        // HMAC zero-pads keys shorter than its 64-byte block (RFC 2104), so
        // padding by hand gives the same MAC without a fallible constructor.
        let mut block = Zeroizing::new([0u8; 64]);
        block[..KEY_LEN].copy_from_slice(&*self.mac);
        let mut mac = <HmacSha256 as Mac>::new((&*block).into());
        mac.update(data);
        mac
    }
}

/// Streams the entries of a JSON array of keys into `f`, one at a time.
/// First pass over decrypted JSON: validates every entry and counts them,
/// dropping (and zeroising) each at once, so no key is handed out from a
/// file with a bad entry.
fn validate_and_count(json: &[u8]) -> Result<usize, ExportError> {
    match for_each_key(json, |mut key| {
        key.session_key.zeroize();
        ControlFlow::<Infallible>::Continue(())
    })? {
        ControlFlow::Continue(total) => Ok(total),
        ControlFlow::Break(never) => match never {},
    }
}

fn for_each_key<B>(
    json: &[u8],
    f: impl FnMut(ExportedRoomKey) -> ControlFlow<B>,
) -> Result<ControlFlow<B, usize>, ExportError> {
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let flow =
        deserializer.deserialize_seq(EachKey { f, _break: PhantomData }).map_err(json_error)?;
    deserializer.end().map_err(json_error)?;
    Ok(flow)
}

struct EachKey<F, B> {
    f: F,
    _break: PhantomData<fn() -> B>,
}

impl<'de, F, B> de::Visitor<'de> for EachKey<F, B>
where
    F: FnMut(ExportedRoomKey) -> ControlFlow<B>,
{
    type Value = ControlFlow<B, usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of exported room keys")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut count = 0;
        while let Some(key) = seq.next_element::<ExportedRoomKey>()? {
            count += 1;
            if let ControlFlow::Break(b) = (self.f)(key) {
                // The deserializer insists on reaching the closing bracket.
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                return Ok(ControlFlow::Break(b));
            }
        }
        Ok(ControlFlow::Continue(count))
    }
}

/// serde_json quotes offending strings in some messages (`invalid type:
/// string "..."`), which could be key material; keep only what precedes.
fn json_error(error: serde_json::Error) -> ExportError {
    let message = error.to_string();
    match message.split_once('"') {
        None => ExportError::Json(message),
        Some((before, _)) => ExportError::Json(format!(
            "{} at line {} column {}",
            before.trim_end(),
            error.line(),
            error.column()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ExportedRoomKey {
        ExportedRoomKey {
            algorithm: crate::MEGOLM_V1.to_owned(),
            room_id: format!("!room{n}:example.org"),
            sender_key: "cKQkLU8izjY3tpLVPiR4PDeeCEKtaDiAGiQH+UbZm2w".to_owned(),
            session_id: format!("session{n}"),
            session_key: format!("SECRET-SESSION-KEY-{n}"),
            sender_claimed_keys: BTreeMap::from([("ed25519".to_owned(), "edkey".to_owned())]),
            forwarding_curve25519_key_chain: vec!["chain\"with\\escapes".to_owned()],
            shared_history: n.is_multiple_of(2),
        }
    }

    fn body_of(file: &str) -> String {
        armored_body(file).unwrap().split_whitespace().collect()
    }

    fn rearmor(body: &str) -> String {
        format!("{HEADER}\n{body}\n{FOOTER}\n")
    }

    #[test]
    fn round_trip() {
        let keys: Vec<_> = (0..5).map(key).collect();
        let file = encrypt_export(&keys, "pässwörd", 1).unwrap();
        assert_eq!(decrypt_export(&file, "pässwörd").unwrap(), keys);
        assert_eq!(decrypt_export(&file, "password"), Err(ExportError::BadMac));
        assert_eq!(decrypt_export(&encrypt_export(&[], "p", 1).unwrap(), "p").unwrap(), vec![]);
    }

    #[test]
    fn output_format() {
        let keys: Vec<_> = (0..3).map(key).collect();
        let file = encrypt_export(&keys, "p", 3).unwrap();
        let lines: Vec<&str> = file.split('\n').collect();
        assert_eq!(lines.first(), Some(&HEADER));
        assert_eq!(lines[lines.len() - 2], FOOTER);
        assert_eq!(lines.last(), Some(&""), "trailing newline");
        let body = &lines[1..lines.len() - 2];
        assert!(body[..body.len() - 1].iter().all(|l| l.len() == LINE_LEN));
        assert!(!body[body.len() - 1].is_empty() && body[body.len() - 1].len() <= LINE_LEN);
        assert!(!file.contains('\r'));

        let payload = decode_base64_body(armored_body(&file).unwrap()).unwrap();
        let parts = Payload::parse(&payload).unwrap();
        assert_eq!(payload[0], 1);
        assert_eq!(parts.rounds, 3);
    }

    #[test]
    fn iv_bit_63_is_cleared_and_salt_is_fresh() {
        let mut salts = std::collections::HashSet::new();
        for _ in 0..64 {
            let file = encrypt_export_bytes(b"x", "p", 1).unwrap();
            let payload = decode_base64_body(armored_body(&file).unwrap()).unwrap();
            let parts = Payload::parse(&payload).unwrap();
            assert_eq!(parts.iv[8] & 0x80, 0);
            assert!(salts.insert(*parts.salt));
        }
    }

    #[test]
    fn counter_flavours_agree_when_bit_63_is_clear() {
        // Our 64-bit counter and matrix-rust-sdk's 128-bit one give the same
        // keystream for every IV we write, even across the low half's top bit.
        let key = [7u8; KEY_LEN];
        let mut iv = [0xffu8; IV_LEN];
        iv[8] = 0x7f; // low half = 2^63 - 1: the next block sets bit 63
        let mut a = [0u8; 16 * 4];
        let mut b = [0u8; 16 * 4];
        Aes256Ctr::new((&key).into(), (&iv).into()).apply_keystream(&mut a);
        ctr::Ctr128BE::<aes::Aes256>::new((&key).into(), (&iv).into()).apply_keystream(&mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn zero_rounds_rejected() {
        assert_eq!(encrypt_export(&[key(1)], "p", 0), Err(ExportError::ZeroRounds));
        assert_eq!(encrypt_export_bytes(b"[]", "p", 0), Err(ExportError::ZeroRounds));
        // A file that claims zero rounds.
        let file = encrypt_export(&[key(1)], "p", 1).unwrap();
        let mut payload = decode_base64_body(armored_body(&file).unwrap()).unwrap();
        payload[33..37].copy_from_slice(&0u32.to_be_bytes());
        let forged = rearmor(&base64::engine::general_purpose::STANDARD.encode(&payload));
        assert_eq!(decrypt_export(&forged, "p"), Err(ExportError::ZeroRounds));
    }

    #[test]
    fn missing_header_and_footer() {
        let file = encrypt_export(&[key(1)], "p", 1).unwrap();
        assert_eq!(decrypt_export("", "p"), Err(ExportError::MissingHeader));
        assert_eq!(decrypt_export("-----", "p"), Err(ExportError::MissingHeader));
        assert_eq!(
            decrypt_export(&file.replace("BEGIN", "BEGUN"), "p"),
            Err(ExportError::MissingHeader)
        );
        assert_eq!(decrypt_export(&file.replace(FOOTER, ""), "p"), Err(ExportError::MissingFooter));
        assert_eq!(
            decrypt_export(&format!("{HEADER}\n-----"), "p"),
            Err(ExportError::MissingFooter)
        );
    }

    #[test]
    fn truncated_input() {
        // matrix-react-sdk's "should handle a too-short body".
        let short = format!(
            "{HEADER}\nAXNhbHRzYWx0c2FsdHNhbHSIiIiIiIiIiIiIiIiIiIiIAAAACmIRUW2OjZ3L2l6j9h0lHlV3M2dx\ncissyYBxjsfsAn\n{FOOTER}\n"
        );
        assert_eq!(decrypt_export(&short, "p"), Err(ExportError::TooShort));
        assert_eq!(decrypt_export(&rearmor(""), "p"), Err(ExportError::TooShort));
        assert_eq!(decrypt_export(&rearmor("AQ"), "p"), Err(ExportError::TooShort));

        let file = encrypt_export(&[key(1)], "p", 1).unwrap();
        let body = body_of(&file);
        // Dropping whole 4-character groups from the end cuts into the MAC.
        let cut = rearmor(&body[..body.len() - 8]);
        assert_eq!(decrypt_export(&cut, "p"), Err(ExportError::BadMac));
        // Every truncation fails cleanly (dropping only `=` padding is no
        // truncation, so stop before it).
        for n in 0..body.trim_end_matches('=').len() {
            assert!(decrypt_export(&rearmor(&body[..n]), "p").is_err(), "{n}");
            assert!(decrypt_export(&file[..n], "p").is_err(), "{n}");
        }
    }

    #[test]
    fn garbage_base64() {
        assert_eq!(decrypt_export(&rearmor("AQ!@#$"), "p"), Err(ExportError::Base64));
        assert_eq!(decrypt_export(&rearmor("A"), "p"), Err(ExportError::Base64));
        assert_eq!(decrypt_export(&rearmor("===="), "p"), Err(ExportError::Base64));
        assert_eq!(decrypt_export(&rearmor("AQ=A"), "p"), Err(ExportError::Base64));
        assert_eq!(decrypt_export(&rearmor("Zm9v\u{e9}"), "p"), Err(ExportError::Base64));
    }

    #[test]
    fn unsupported_version() {
        let file = encrypt_export(&[key(1)], "p", 1).unwrap();
        let mut payload = decode_base64_body(armored_body(&file).unwrap()).unwrap();
        payload[0] = 2;
        let v2 = rearmor(&base64::engine::general_purpose::STANDARD.encode(&payload));
        assert_eq!(decrypt_export(&v2, "p"), Err(ExportError::UnsupportedVersion(2)));
        assert_eq!(decrypt_export(&rearmor("Ag"), "p"), Err(ExportError::UnsupportedVersion(2)));
    }

    #[test]
    fn tolerant_reading() {
        let keys = vec![key(1), key(2)];
        let file = encrypt_export(&keys, "p", 1).unwrap();
        let body = body_of(&file);
        let unpadded = body.trim_end_matches('=');
        let payload = decode_base64_body(&body).unwrap();

        let mut variants = vec![
            file.replace('\n', "\r\n"),
            format!("\n\n  \t{file}\n\n  "),
            rearmor(unpadded),
            format!("{HEADER}{unpadded}{FOOTER}"),
            rearmor(
                &body
                    .chars()
                    .collect::<Vec<_>>()
                    .chunks(7)
                    .map(|c| c.iter().collect::<String>())
                    .collect::<Vec<_>>()
                    .join("\n "),
            ),
        ];
        // Each line base64'd on its own, with padding, at several line sizes.
        for raw_per_line in [1, 2, 50, 96, 1000] {
            let lines: Vec<String> = payload
                .chunks(raw_per_line)
                .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
                .collect();
            variants.push(rearmor(&lines.join("\r\n")));
        }
        for v in variants {
            assert_eq!(decrypt_export(&v, "p").unwrap(), keys, "{v:?}");
        }
    }

    #[test]
    fn json_handling() {
        let raw = br#"[{"algorithm":"m.megolm.v1.aes-sha2","room_id":"!r:x","sender_key":"s","session_id":"i","session_key":"k","unknown":{"a":[1]}}]"#;
        let keys = decrypt_export(&encrypt_export_bytes(raw, "p", 1).unwrap(), "p").unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].sender_claimed_keys.is_empty());
        assert!(keys[0].forwarding_curve25519_key_chain.is_empty());
        assert!(!keys[0].shared_history);
        // `shared_history: false` is left out when writing.
        let json = serde_json::to_string(&keys[0]).unwrap();
        assert!(!json.contains("shared_history"));
        assert!(serde_json::to_string(&key(2)).unwrap().contains(r#""shared_history":true"#));

        for bad in [&b"{}"[..], b"[1]", b"", b"[] x", br#"[{"room_id":"!r:x"}]"#, b"\xff"] {
            let file = encrypt_export_bytes(bad, "p", 1).unwrap();
            assert!(matches!(decrypt_export(&file, "p"), Err(ExportError::Json(_))), "{bad:?}");
        }
        // Error messages do not quote values from the file.
        let leaky = br#"[{"algorithm":"a","room_id":"r","sender_key":"s","session_id":"i","session_key":"k","sender_claimed_keys":"TOPSECRET"}]"#;
        let err = decrypt_export(&encrypt_export_bytes(leaky, "p", 1).unwrap(), "p").unwrap_err();
        assert!(!err.to_string().contains("TOPSECRET"), "{err}");
    }

    #[test]
    fn callback_progress_and_early_stop() {
        let keys: Vec<_> = (0..4).map(key).collect();
        let file = encrypt_export(&keys, "p", 1).unwrap();

        let mut seen = Vec::new();
        let flow = decrypt_export_with(&file, "p", |k, done, total| {
            seen.push((k.session_id, done, total));
            ControlFlow::<()>::Continue(())
        })
        .unwrap();
        assert_eq!(flow, ControlFlow::Continue(4));
        let expected: Vec<_> = (0..4).map(|n| (format!("session{n}"), n as usize + 1, 4)).collect();
        assert_eq!(seen, expected);

        let mut calls = 0;
        let flow = decrypt_export_with(&file, "p", |_, done, _| {
            calls += 1;
            if done == 2 {
                ControlFlow::Break("store full")
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(flow, ControlFlow::Break("store full"));
        assert_eq!(calls, 2);

        // A bad entry anywhere means no key is handed out.
        let raw = br#"[{"algorithm":"a","room_id":"r","sender_key":"s","session_id":"i","session_key":"k"},{"algorithm":1}]"#;
        let mut calls = 0;
        let result =
            decrypt_export_with(&encrypt_export_bytes(raw, "p", 1).unwrap(), "p", |_, _, _| {
                calls += 1;
                ControlFlow::<()>::Continue(())
            });
        assert!(matches!(result, Err(ExportError::Json(_))));
        assert_eq!(calls, 0);
    }

    #[test]
    fn tampering_never_panics() {
        let file = encrypt_export(&[key(1)], "p", 1).unwrap();
        let body = body_of(&file);
        // Characters 44..52 hold the round count, and any change in length
        // before them shifts it: a random count could mean billions of PBKDF2
        // rounds, so only same-length substitutions go there.
        let rounds_chars = 44..52;
        for i in 0..body.len() {
            if rounds_chars.contains(&i) {
                continue;
            }
            let replacements: &[&str] = if i < rounds_chars.start {
                &["A", "/", "\u{e9}"]
            } else {
                &["A", "/", "=", " ", "\u{e9}", ""]
            };
            for replacement in replacements {
                let mut tampered = body.clone();
                tampered.replace_range(i..i + 1, replacement);
                if tampered == body {
                    continue;
                }
                // Almost always an error; a change in the trailing bits of the
                // last group can decode to the same bytes.
                let _ = decrypt_export(&rearmor(&tampered), "p");
            }
        }
    }

    #[test]
    fn debug_redacts_session_key() {
        let k = key(7);
        let debug = format!("{k:?}");
        assert!(!debug.contains("SECRET-SESSION-KEY"), "{debug}");
        assert!(debug.contains("session7"));
    }

    #[test]
    fn reader_hands_out_batches_in_order() {
        let keys: Vec<ExportedRoomKey> = (0..25)
            .map(|i| ExportedRoomKey {
                algorithm: "m.megolm.v1.aes-sha2".into(),
                room_id: format!("!r{i}:hs"),
                sender_key: "s".into(),
                session_id: format!("id{i}"),
                session_key: "k".into(),
                sender_claimed_keys: BTreeMap::new(),
                forwarding_curve25519_key_chain: vec![],
                shared_history: i % 2 == 0,
            })
            .collect();
        let file = encrypt_export(&keys, "pw", 1).unwrap();
        let mut reader = ExportReader::open(&file, "pw").unwrap();
        assert_eq!(reader.total(), 25);
        let mut got = Vec::new();
        loop {
            let batch = reader.next_batch(10).unwrap();
            if batch.is_empty() {
                break;
            }
            assert!(batch.len() <= 10);
            got.extend(batch);
        }
        assert_eq!(got, keys);
        assert_eq!(reader.done(), 25);
        assert!(matches!(ExportReader::open(&file, "wrong"), Err(ExportError::BadMac)));
    }
}
