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

/// Incremental, lenient base64 decoding of an armored body: whitespace
/// anywhere, `=` padding at the end of any group (as [`decode_base64_body`]).
struct Base64Stream<'a> {
    input: &'a [u8],
    pos: usize,
    segment: Vec<u8>,
    in_padding: bool,
}

impl<'a> Base64Stream<'a> {
    /// Whole 4-character groups decode the same alone as within their
    /// segment, so a long segment is decoded in chunks of them.
    const CHUNK: usize = 64 * 1024;

    fn new(body: &'a str) -> Self {
        Self {
            input: body.as_bytes(),
            pos: 0,
            segment: Vec::with_capacity(Self::CHUNK + 4),
            in_padding: false,
        }
    }

    fn finished(&self) -> bool {
        self.pos >= self.input.len() && self.segment.is_empty()
    }

    /// Decodes about one chunk more onto `out` (nothing once finished).
    fn step(&mut self, out: &mut Vec<u8>) -> Result<(), ExportError> {
        let decode = |segment: &[u8], out: &mut Vec<u8>| {
            LENIENT_BASE64.decode_vec(segment, out).map_err(|_| ExportError::Base64)
        };
        while let Some(rest) = self.input.get(self.pos..).filter(|r| !r.is_empty()) {
            let b = rest[0];
            if b.is_ascii_whitespace() {
                self.pos += 1;
            } else if b == b'=' {
                self.in_padding = true;
                self.segment.push(b);
                self.pos += 1;
            } else if self.in_padding {
                // A segment runs up to and including a run of `=`.
                self.in_padding = false;
                decode(&self.segment, out)?;
                self.segment.clear();
                return Ok(());
            } else {
                let run = plain_run(rest);
                self.segment.extend_from_slice(&rest[..run]);
                self.pos += run;
                if self.segment.len() >= Self::CHUNK {
                    let whole = self.segment.len() / 4 * 4;
                    decode(&self.segment[..whole], out)?;
                    self.segment.drain(..whole);
                    return Ok(());
                }
            }
        }
        if !self.segment.is_empty() {
            decode(&self.segment, out)?;
            self.segment.clear();
        }
        Ok(())
    }
}

/// The length of the prefix of `rest` with no `=` and no whitespace. Whole
/// 16-byte blocks are tested without branching per byte (the compiler
/// vectorises it); the block holding the stop, if any, byte by byte.
fn plain_run(rest: &[u8]) -> usize {
    let stop = |c: &u8| *c == b'=' || c.is_ascii_whitespace();
    let mut start = 0;
    for block in rest.chunks_exact(16) {
        // Over-approximates (any control byte), so the exact scan decides.
        if block.iter().fold(false, |any, &c| any | (c == b'=') | (c <= b' ')) {
            break;
        }
        start += 16;
    }
    start + rest[start..].iter().position(stop).unwrap_or(rest.len() - start)
}

/// Splits a stream of JSON text that must be one array into the raw text of
/// its elements, without parsing them (serde does, one element at a time).
#[derive(Default)]
struct ArraySplitter {
    state: SplitState,
    depth: usize,
    in_string: bool,
    escaped: bool,
    element: Zeroizing<Vec<u8>>,
}

#[derive(Default, PartialEq)]
enum SplitState {
    /// Before the `[`.
    #[default]
    Start,
    /// Inside the array, before an element (or the `]` of an empty array).
    BeforeElement { first: bool },
    /// Inside an element.
    InElement,
    /// After an element: `,` or `]`.
    AfterElement,
    /// After the `]`: only whitespace may follow.
    End,
}

impl ArraySplitter {
    /// Feeds `text`; calls `on_element` with each complete element.
    fn feed(
        &mut self,
        text: &[u8],
        mut on_element: impl FnMut(&[u8]) -> Result<(), ExportError>,
    ) -> Result<(), ExportError> {
        let bad = |what: &str| ExportError::Json(format!("not an array of keys: {what}"));
        let mut i = 0;
        while let Some(&b) = text.get(i) {
            // Inside an element, copy runs of bytes that change nothing.
            if self.state == SplitState::InElement && !self.escaped {
                let rest = &text[i..];
                let run = if self.in_string {
                    rest.iter().position(|&c| c == b'"' || c == b'\\')
                } else {
                    rest.iter().position(|&c| matches!(c, b'"' | b'{' | b'}' | b'[' | b']' | b','))
                }
                .unwrap_or(rest.len());
                if run > 0 {
                    self.element.extend_from_slice(&rest[..run]);
                    i += run;
                    continue;
                }
            }
            i += 1;
            // JSON's whitespace (not form feed, unlike `is_ascii_whitespace`).
            let space = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
            match self.state {
                SplitState::Start | SplitState::End if space => {}
                SplitState::Start if b == b'[' => {
                    self.state = SplitState::BeforeElement { first: true };
                }
                SplitState::Start => return Err(bad("expected `[`")),
                SplitState::End => return Err(bad("trailing characters")),
                SplitState::BeforeElement { .. } | SplitState::AfterElement if space => {}
                SplitState::BeforeElement { first: true } | SplitState::AfterElement
                    if b == b']' =>
                {
                    self.state = SplitState::End;
                }
                SplitState::AfterElement if b == b',' => {
                    self.state = SplitState::BeforeElement { first: false };
                }
                SplitState::AfterElement => return Err(bad("expected `,` or `]`")),
                SplitState::BeforeElement { .. } => {
                    self.state = SplitState::InElement;
                    self.depth = 0;
                    self.element.zeroize();
                    self.push(b, &mut on_element)?;
                }
                SplitState::InElement => self.push(b, &mut on_element)?,
            }
        }
        Ok(())
    }

    fn push(
        &mut self,
        b: u8,
        on_element: &mut impl FnMut(&[u8]) -> Result<(), ExportError>,
    ) -> Result<(), ExportError> {
        if self.in_string {
            self.element.push(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            return Ok(());
        }
        // A scalar element ends at a `,` or `]` outside any string.
        if self.depth == 0 && (b == b',' || b == b']') {
            on_element(&self.element)?;
            self.state = if b == b',' {
                SplitState::BeforeElement { first: false }
            } else {
                SplitState::End
            };
            return Ok(());
        }
        self.element.push(b);
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth = self.depth.checked_sub(1).ok_or_else(|| {
                    ExportError::Json("not an array of keys: unbalanced brackets".into())
                })?;
                if self.depth == 0 {
                    on_element(&self.element)?;
                    self.state = SplitState::AfterElement;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The text ended: it must have been a whole array.
    fn finish(&self) -> Result<(), ExportError> {
        if self.state == SplitState::End {
            Ok(())
        } else {
            Err(ExportError::Json("not an array of keys: EOF while parsing".into()))
        }
    }
}

/// A key export read as a stream from the file text: nothing the size of
/// the file is held besides the text itself (the decoded and decrypted
/// bytes pass through in chunks). [`open`](Self::open) authenticates the
/// file (MAC) and validates and counts every key in one pass; then
/// [`next_batch`](Self::next_batch) decrypts and parses again, a batch at a
/// time. Errors are those of [`decrypt_export`], in the same cases.
///
/// [`open`](Self::open) derives the keys from the passphrase on the
/// caller's thread (the slow part); [`open_with_keys`](Self::open_with_keys)
/// takes keys derived beforehand with [`ExportKdf`].
///
/// ```
/// use newt_proto::export::{encrypt_export, ExportStream};
/// # let keys = vec![];
/// let file = encrypt_export(&keys, "pw", 1)?;
/// let mut stream = ExportStream::open(&file, "pw")?;
/// assert_eq!(stream.total(), 0);
/// assert!(stream.next_batch(100)?.is_empty());
/// # Ok::<(), newt_proto::export::ExportError>(())
/// ```
pub struct ExportStream<'a> {
    total: usize,
    done: usize,
    pass: Option<Pass<'a>>,
    pending: std::collections::VecDeque<Zeroizing<Vec<u8>>>,
}

/// Up to this many bytes of key text are kept from [`ExportStream::open`]'s
/// pass instead of decrypting the file a second time (small in tests, so
/// that they take both ways).
const KEEP_FROM_FIRST_PASS: usize = if cfg!(test) { 2048 } else { 4 << 20 };

/// One decrypting pass over the ciphertext.
struct Pass<'a> {
    base64: Base64Stream<'a>,
    cipher: Aes256Ctr,
    /// Decoded bytes not yet used (the header is skipped first).
    decoded: Vec<u8>,
    /// Header bytes still to skip.
    skip: usize,
    /// Ciphertext bytes still to decrypt.
    left: usize,
    splitter: ArraySplitter,
}

impl<'a> Pass<'a> {
    fn new(body: &'a str, keys: &DerivedKeys, iv: &[u8; IV_LEN], ciphertext_len: usize) -> Self {
        Self {
            base64: Base64Stream::new(body),
            cipher: keys.cipher(iv),
            decoded: Vec::new(),
            skip: HEADER_LEN,
            left: ciphertext_len,
            splitter: ArraySplitter::default(),
        }
    }

    /// Decrypts the next chunk and feeds it to the splitter; `false` once
    /// the ciphertext is used up (the splitter was told it ended).
    fn step(
        &mut self,
        on_element: impl FnMut(&[u8]) -> Result<(), ExportError>,
    ) -> Result<bool, ExportError> {
        if self.left == 0 {
            self.splitter.finish()?;
            return Ok(false);
        }
        self.decoded.clear();
        self.base64.step(&mut self.decoded)?;
        let skip = self.skip.min(self.decoded.len());
        self.skip -= skip;
        let take = self.left.min(self.decoded.len() - skip);
        self.left -= take;
        let mut chunk = Zeroizing::new(self.decoded[skip..skip + take].to_vec());
        self.cipher.apply_keystream(&mut chunk);
        self.splitter.feed(&chunk, on_element)?;
        if self.base64.finished() && self.left > 0 {
            // Shorter than the first pass measured: cannot happen for the
            // same text; fail rather than loop.
            return Err(ExportError::TooShort);
        }
        Ok(true)
    }
}

/// Where [`ExportStream`]'s keys come from.
enum Keying<'k> {
    /// Derived from the passphrase once the header is read, if its round
    /// count is within `max_rounds`.
    Passphrase { passphrase: &'k str, max_rounds: u32 },
    /// Derived beforehand ([`ExportKdf::derive`]), with the limit checked.
    Derived(&'k ExportKeys),
}

impl<'a> ExportStream<'a> {
    /// Authenticates `file` and, in the same pass, decrypts it to validate
    /// and count every key (each parsed key is dropped and zeroised at once;
    /// nothing found counts before the MAC is verified). A file asking for
    /// more than [`DEFAULT_MAX_ROUNDS`] PBKDF2 rounds is refused.
    pub fn open(file: &'a str, passphrase: &str) -> Result<Self, ExportError> {
        Self::open_with_max_rounds(file, passphrase, DEFAULT_MAX_ROUNDS)
    }

    /// [`open`](Self::open), refusing files that ask for more than
    /// `max_rounds` PBKDF2 rounds ([`ExportError::TooManyRounds`], before
    /// any key derivation).
    pub fn open_with_max_rounds(
        file: &'a str,
        passphrase: &str,
        max_rounds: u32,
    ) -> Result<Self, ExportError> {
        Self::open_keyed(file, Keying::Passphrase { passphrase, max_rounds })
    }

    /// [`open`](Self::open) with keys already derived from this file's
    /// header ([`ExportKdf::read`] then [`ExportKdf::derive`]). Keys derived
    /// for another file fail like a wrong passphrase
    /// ([`ExportError::BadMac`]).
    pub fn open_with_keys(file: &'a str, keys: &ExportKeys) -> Result<Self, ExportError> {
        Self::open_keyed(file, Keying::Derived(keys))
    }

    fn open_keyed(file: &'a str, keying: Keying<'_>) -> Result<Self, ExportError> {
        let body = armored_body(file)?;
        // One pass: decode everything (a base64 error anywhere wins, as when
        // decoding whole); from the header on, MAC all but the last MAC_LEN
        // bytes, and decrypt and validate the ciphertext as it goes. What
        // validation found counts only once the MAC is verified.
        let mut base64 = Base64Stream::new(body);
        let mut head: Vec<u8> = Vec::with_capacity(HEADER_LEN);
        let mut tail: Vec<u8> = Vec::with_capacity(2 * Base64Stream::CHUNK);
        let mut total_len = 0usize;
        let mut covered_len = 0usize;
        let mut keyed: Option<(DerivedKeys, [u8; IV_LEN], HmacSha256, Aes256Ctr)> = None;
        let mut header_error = None;
        let mut splitter = ArraySplitter::default();
        let mut total = 0usize;
        let mut invalid: Option<ExportError> = None;
        // A small file's keys are kept (as text) from this pass, which saves
        // the second one; a large file's are dropped past the limit.
        let mut kept: Option<std::collections::VecDeque<Zeroizing<Vec<u8>>>> =
            Some(Default::default());
        let mut kept_bytes = 0usize;
        loop {
            let before = tail.len();
            base64.step(&mut tail)?;
            total_len += tail.len() - before;
            if head.len() < HEADER_LEN {
                let new = &tail[before..];
                let need = (HEADER_LEN - head.len()).min(new.len());
                head.extend_from_slice(&new[..need]);
                if head.len() == HEADER_LEN && keyed.is_none() && header_error.is_none() {
                    let max_rounds = match keying {
                        Keying::Passphrase { max_rounds, .. } => max_rounds,
                        // Checked when they were derived.
                        Keying::Derived(_) => u32::MAX,
                    };
                    match Header::parse(&head, max_rounds) {
                        Ok(h) => {
                            let keys = match keying {
                                Keying::Passphrase { passphrase, .. } => {
                                    DerivedKeys::new(passphrase, &h.salt, h.rounds)
                                }
                                Keying::Derived(keys) => keys.0.clone(),
                            };
                            let (hmac, cipher) = (keys.mac(&[]), keys.cipher(&h.iv));
                            keyed = Some((keys, h.iv, hmac, cipher));
                        }
                        Err(e) => header_error = Some(e),
                    }
                }
            }
            if let Some((_, _, hmac, cipher)) = &mut keyed {
                if tail.len() > MAC_LEN {
                    let covered = tail.len() - MAC_LEN;
                    hmac.update(&tail[..covered]);
                    // The part of it after the header is ciphertext.
                    let skip = HEADER_LEN.saturating_sub(covered_len).min(covered);
                    covered_len += covered;
                    if invalid.is_none() {
                        let mut chunk = Zeroizing::new(tail[skip..covered].to_vec());
                        cipher.apply_keystream(&mut chunk);
                        let fed = splitter.feed(&chunk, |element| {
                            let mut key: ExportedRoomKey =
                                serde_json::from_slice(element).map_err(json_error)?;
                            key.session_key.zeroize();
                            total += 1;
                            kept_bytes += element.len();
                            if kept_bytes > KEEP_FROM_FIRST_PASS {
                                kept = None;
                            } else if let Some(kept) = &mut kept {
                                kept.push_back(Zeroizing::new(element.to_vec()));
                            }
                            Ok(())
                        });
                        invalid = fed.err();
                    }
                    tail.drain(..covered);
                }
            } else if header_error.is_some() {
                tail.clear();
            }
            if base64.finished() {
                break;
            }
        }
        // The errors of decrypt_export, in its order.
        match head.first() {
            None => return Err(ExportError::TooShort),
            Some(&VERSION) => {}
            Some(&other) => return Err(ExportError::UnsupportedVersion(other)),
        }
        if total_len < HEADER_LEN + MAC_LEN {
            return Err(ExportError::TooShort);
        }
        if let Some(e) = header_error {
            return Err(e);
        }
        let (keys, iv, hmac, _) = keyed.ok_or(ExportError::TooShort)?;
        hmac.verify_slice(&tail).map_err(|_| ExportError::BadMac)?;
        if let Some(e) = invalid {
            return Err(e);
        }
        splitter.finish()?;
        if let Some(pending) = kept {
            return Ok(Self { total, done: 0, pass: None, pending });
        }
        let ciphertext_len = total_len - HEADER_LEN - MAC_LEN;
        // Keys are handed out from a second decrypting pass.
        let pass = Some(Pass::new(body, &keys, &iv, ciphertext_len));
        Ok(Self { total, done: 0, pass, pending: Default::default() })
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
        while batch.len() < max {
            if let Some(element) = self.pending.pop_front() {
                batch.push(serde_json::from_slice(&element).map_err(json_error)?);
                continue;
            }
            let Some(pass) = &mut self.pass else { break };
            let pending = &mut self.pending;
            let more = pass.step(|element| {
                pending.push_back(Zeroizing::new(element.to_vec()));
                Ok(())
            })?;
            if !more {
                self.pass = None;
            }
        }
        self.done += batch.len();
        if max > 0 && batch.is_empty() && self.done < self.total {
            return Err(ExportError::Json("fewer keys than counted".into()));
        }
        Ok(batch)
    }
}

/// The fixed fields at the start of a payload.
struct Header {
    salt: [u8; SALT_LEN],
    iv: [u8; IV_LEN],
    rounds: u32,
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes (version already checked by
    /// the caller's order of errors; checked here too), with a round count
    /// of at most `max_rounds`.
    fn parse(head: &[u8], max_rounds: u32) -> Result<Self, ExportError> {
        let (&version, rest) = head.split_first().ok_or(ExportError::TooShort)?;
        if version != VERSION {
            return Err(ExportError::UnsupportedVersion(version));
        }
        let (salt, rest) = rest.split_first_chunk::<SALT_LEN>().ok_or(ExportError::TooShort)?;
        let (iv, rest) = rest.split_first_chunk::<IV_LEN>().ok_or(ExportError::TooShort)?;
        let (rounds, _) = rest.split_first_chunk::<4>().ok_or(ExportError::TooShort)?;
        let rounds = u32::from_be_bytes(*rounds);
        check_rounds(rounds, max_rounds)?;
        Ok(Self { salt: *salt, iv: *iv, rounds })
    }
}

/// A file's round count must be at least one and at most `max_rounds`:
/// checked before any PBKDF2 work.
fn check_rounds(rounds: u32, max_rounds: u32) -> Result<(), ExportError> {
    if rounds == 0 {
        return Err(ExportError::ZeroRounds);
    }
    if rounds > max_rounds {
        return Err(ExportError::TooManyRounds { rounds, max: max_rounds });
    }
    Ok(())
}

/// The key derivation a file asks for: its salt and PBKDF2 round count,
/// read from its header and checked against a limit.
///
/// Reading the header is cheap; [`derive`](Self::derive) is the slow part
/// of reading a file. It borrows nothing from the file, so a caller can run
/// it on another thread and pass the keys to
/// [`ExportStream::open_with_keys`].
///
/// ```
/// use newt_proto::export::{encrypt_export, ExportKdf, ExportStream, DEFAULT_MAX_ROUNDS};
/// let file = encrypt_export(&[], "pw", 3)?;
/// let kdf = ExportKdf::read(&file, DEFAULT_MAX_ROUNDS)?;
/// assert_eq!(kdf.rounds(), 3);
/// let keys = std::thread::spawn(move || kdf.derive("pw")).join().unwrap_or_else(|_| panic!());
/// assert_eq!(ExportStream::open_with_keys(&file, &keys)?.total(), 0);
/// # Ok::<(), newt_proto::export::ExportError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportKdf {
    salt: [u8; SALT_LEN],
    rounds: u32,
}

impl ExportKdf {
    /// Reads the header of `file`; a round count above `max_rounds` is
    /// [`ExportError::TooManyRounds`]. Only the header is looked at: other
    /// damage is found when the file is opened.
    pub fn read(file: &str, max_rounds: u32) -> Result<Self, ExportError> {
        let mut base64 = Base64Stream::new(armored_body(file)?);
        let mut head = Vec::with_capacity(HEADER_LEN);
        while head.len() < HEADER_LEN && !base64.finished() {
            base64.step(&mut head)?;
        }
        let header = Header::parse(&head, max_rounds)?;
        Ok(Self { salt: header.salt, rounds: header.rounds })
    }

    /// The PBKDF2 round count the file asks for.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// Derives the file's keys from `passphrase`: [`rounds`](Self::rounds)
    /// PBKDF2-HMAC-SHA512 iterations. A wrong passphrase shows only when the
    /// file is opened ([`ExportError::BadMac`]).
    pub fn derive(&self, passphrase: &str) -> ExportKeys {
        ExportKeys(DerivedKeys::new(passphrase, &self.salt, self.rounds))
    }
}

/// The AES and HMAC keys of one export file, derived from its passphrase
/// ([`ExportKdf::derive`]). Zeroised on drop; `Debug` shows nothing.
pub struct ExportKeys(DerivedKeys);

impl fmt::Debug for ExportKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExportKeys(<redacted>)")
    }
}

/// Decrypts a key export file into its keys.
///
/// Accepts CRLF, surrounding whitespace, lines wrapped anywhere, padded or
/// unpadded base64, and per-line padding as matrix-js-sdk writes it.
/// Fails with [`ExportError::BadMac`] on a wrong passphrase, before
/// decrypting anything, and with [`ExportError::TooManyRounds`] on a file
/// asking for more than [`DEFAULT_MAX_ROUNDS`] (for those, see
/// [`ExportStream::open_with_max_rounds`]).
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
/// Checks the header, version, round count (at most
/// [`DEFAULT_MAX_ROUNDS`]) and MAC (in constant time) before decrypting.
pub fn decrypt_export_bytes(
    file: &str,
    passphrase: &str,
) -> Result<Zeroizing<Vec<u8>>, ExportError> {
    // Decrypted in place: the decoded payload becomes the plaintext, so a
    // large import holds one copy of it, not two.
    let mut payload = Zeroizing::new(decode_base64_body(armored_body(file)?)?);
    let (keys, iv, start, end) = {
        let parts = Payload::parse(&payload)?;
        check_rounds(parts.rounds, DEFAULT_MAX_ROUNDS)?;
        let keys = DerivedKeys::new(passphrase, parts.salt, parts.rounds);
        keys.mac(parts.authenticated).verify_slice(parts.mac).map_err(|_| ExportError::BadMac)?;
        let end = parts.authenticated.len();
        (keys, *parts.iv, end - parts.ciphertext.len(), end)
    };
    payload.truncate(end);
    payload.drain(..start);
    keys.cipher(&iv).apply_keystream(&mut payload);
    Ok(payload)
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
///
/// Streams ([`Base64Stream`]): whitespace is skipped on the fly and the text
/// decoded a chunk at a time, so only the output is held (not a cleaned copy
/// of the input).
fn decode_base64_body(body: &str) -> Result<Vec<u8>, ExportError> {
    let mut out = Vec::with_capacity(body.len() / 4 * 3 + 3);
    let mut stream = Base64Stream::new(body);
    while !stream.finished() {
        stream.step(&mut out)?;
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
#[derive(Clone)]
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

    #[test]
    fn plain_run_stops_where_a_byte_scan_stops() {
        let naive = |r: &[u8]| {
            r.iter().position(|&c| c == b'=' || c.is_ascii_whitespace()).unwrap_or(r.len())
        };
        let base = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9w".to_vec();
        for stop in [b'=', b'\n', b'\r', b'\t', b' ', 0x0c, 0x01, 0x1f] {
            for at in 0..base.len() {
                let mut input = base.clone();
                input[at] = stop;
                // 0x01 and 0x1f are not whitespace: the run goes past them.
                assert_eq!(plain_run(&input), naive(&input), "byte {stop:#x} at {at}");
            }
        }
        assert_eq!(plain_run(&base), base.len());
        assert_eq!(plain_run(b""), 0);
    }

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

    /// Bodies longer than the decoder's chunk, wrapped at odd widths or
    /// base64'd line by line with padding, decode the same as whole.
    #[test]
    fn tolerant_reading_of_a_large_file() {
        let keys: Vec<_> = (0..400u32).map(|i| key((i % 256) as u8)).collect();
        let file = encrypt_export(&keys, "p", 1).unwrap();
        let body = body_of(&file);
        assert!(body.len() > 2 * 64 * 1024, "{}", body.len());
        let payload = decode_base64_body(&body).unwrap();
        let wrapped = |width: usize| {
            let chars: Vec<char> = body.chars().collect();
            chars.chunks(width).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>()
        };
        let mut variants = vec![
            rearmor(body.trim_end_matches('=')),
            rearmor(&wrapped(7).join("\n ")),
            rearmor(&wrapped(65_537).join("\r\n")),
        ];
        for raw_per_line in [49_151, 96] {
            let lines: Vec<String> = payload
                .chunks(raw_per_line)
                .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
                .collect();
            variants.push(rearmor(&lines.join("\n")));
        }
        for v in variants {
            assert_eq!(decode_base64_body(armored_body(&v).unwrap()).unwrap(), payload);
            assert_eq!(decrypt_export(&v, "p").unwrap(), keys);
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
        // before them shifts it: a random count could mean millions of PBKDF2
        // rounds (up to the limit), so only same-length substitutions go there.
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
                // last group can decode to the same bytes. Either way, the
                // streaming reader says the same.
                assert_stream_agrees(&rearmor(&tampered), "p");
            }
        }
    }

    /// Every key of `file` through [`ExportStream`], `batch` at a time.
    fn stream_all(
        file: &str,
        passphrase: &str,
        batch: usize,
    ) -> Result<Vec<ExportedRoomKey>, ExportError> {
        drain(ExportStream::open(file, passphrase), batch)
    }

    /// Every key of an opened stream, `batch` at a time.
    fn drain(
        stream: Result<ExportStream<'_>, ExportError>,
        batch: usize,
    ) -> Result<Vec<ExportedRoomKey>, ExportError> {
        let mut stream = stream?;
        let mut keys = Vec::new();
        loop {
            let next = stream.next_batch(batch)?;
            if next.is_empty() {
                break;
            }
            assert!(next.len() <= batch);
            keys.extend(next);
            assert_eq!(stream.done(), keys.len());
        }
        assert_eq!(keys.len(), stream.total());
        Ok(keys)
    }

    /// The streaming reader agrees with reading whole: the same keys, or the
    /// same error (for JSON errors, the same kind; messages may differ).
    fn assert_stream_agrees(file: &str, passphrase: &str) {
        let whole = decrypt_export(file, passphrase);
        for batch in [1, 3, 1000] {
            let streamed = stream_all(file, passphrase, batch);
            match (&whole, &streamed) {
                (Err(ExportError::Json(_)), Err(ExportError::Json(_))) => {}
                _ => assert_eq!(streamed, whole, "batch {batch}: {file:?}"),
            }
        }
        // Keys derived beforehand (as the driver does), once the header
        // reads: the same again.
        if let Ok(kdf) = ExportKdf::read(file, DEFAULT_MAX_ROUNDS) {
            let keyed = drain(ExportStream::open_with_keys(file, &kdf.derive(passphrase)), 3);
            match (&whole, &keyed) {
                (Err(ExportError::Json(_)), Err(ExportError::Json(_))) => {}
                _ => assert_eq!(keyed, whole, "with keys: {file:?}"),
            }
        }
    }

    #[test]
    fn streaming_reader_agrees_with_whole_reading() {
        for n in [0u32, 1, 5, 400] {
            let keys: Vec<_> = (0..n).map(|i| key((i % 256) as u8)).collect();
            let file = encrypt_export(&keys, "pässwörd", 1).unwrap();
            assert_eq!(stream_all(&file, "pässwörd", 7).unwrap(), keys);
            assert_stream_agrees(&file, "pässwörd");
            assert_eq!(stream_all(&file, "password", 7), Err(ExportError::BadMac));
            // Line by line with padding, CRLF, odd wrapping.
            let body = body_of(&file);
            let payload = decode_base64_body(&body).unwrap();
            let lines: Vec<String> = payload
                .chunks(5)
                .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
                .collect();
            assert_stream_agrees(&rearmor(&lines.join("\r\n")), "pässwörd");
            assert_stream_agrees(&rearmor(body.trim_end_matches('=')), "pässwörd");
            // Truncated and cut anywhere.
            for cut in [0, 1, 4, 10, 40, 48, 50, 90, 92, body.len() / 2, body.len() - 4] {
                assert_stream_agrees(&rearmor(&body[..cut.min(body.len())]), "pässwörd");
            }
        }
        for bad_body in ["", "AQ", "Ag", "AQ!@#$", "A", "====", "AQ=A", "Zm9v\u{e9}"] {
            assert_stream_agrees(&rearmor(bad_body), "p");
        }
        assert_stream_agrees("no header", "p");
        // Zero rounds in an otherwise valid file.
        let file = encrypt_export(&[key(1)], "p", 1).unwrap();
        let mut payload = decode_base64_body(&body_of(&file)).unwrap();
        payload[1 + SALT_LEN + IV_LEN..HEADER_LEN].copy_from_slice(&0u32.to_be_bytes());
        let forged = rearmor(&base64::engine::general_purpose::STANDARD.encode(&payload));
        assert_eq!(stream_all(&forged, "p", 1), Err(ExportError::ZeroRounds));
        // Plaintexts that are not an array of keys, or are, oddly spaced.
        let good = r#"{"algorithm":"m.megolm.v1.aes-sha2","room_id":"!r:x","sender_key":"s","session_id":"i]}","session_key":"k\"[{","unknown":{"a":[1,{"b":"]"}]}}"#;
        let raws = [
            "{}".to_owned(),
            "[1]".to_owned(),
            String::new(),
            "[] x".to_owned(),
            "[".to_owned(),
            "[ ]".to_owned(),
            " \n[\r\n]\t".to_owned(),
            "\x0c[]".to_owned(),
            "[]\x0c".to_owned(),
            format!("[{good}]"),
            format!("[ {good} , {good}\n]"),
            format!("[{good},]"),
            format!("[,{good}]"),
            format!("[{good}{good}]"),
            format!("[{good}"),
            format!("[{good}]]"),
            format!("[{good}] {good}"),
            r#"[{"room_id":"!r:x"}]"#.to_owned(),
            "[null]".to_owned(),
            "[\"x\"]".to_owned(),
            "[1 2]".to_owned(),
            "[}]".to_owned(),
        ];
        for raw in &raws {
            let file = encrypt_export_bytes(raw.as_bytes(), "p", 1).unwrap();
            assert_stream_agrees(&file, "p");
        }
        assert_eq!(
            stream_all(
                &encrypt_export_bytes(format!("[ {good} , {good}\n]").as_bytes(), "p", 1).unwrap(),
                "p",
                1
            )
            .unwrap()
            .len(),
            2
        );
        let file = encrypt_export_bytes(b"\xff", "p", 1).unwrap();
        assert!(matches!(stream_all(&file, "p", 1), Err(ExportError::Json(_))));
    }

    /// `file` with its round count replaced by `rounds` (the MAC no longer
    /// matches; the count is checked before the MAC can be).
    fn with_rounds(file: &str, rounds: u32) -> String {
        let mut payload = decode_base64_body(&body_of(file)).unwrap();
        payload[1 + SALT_LEN + IV_LEN..HEADER_LEN].copy_from_slice(&rounds.to_be_bytes());
        rearmor(&base64::engine::general_purpose::STANDARD.encode(&payload))
    }

    #[test]
    fn attack_export_file_asking_for_too_many_rounds_is_refused() {
        // u32::MAX PBKDF2 rounds would take over an hour of CPU. Every reader
        // refuses the file before deriving anything, which is why this test
        // is fast (without the check it would not finish; `ExportKdf::read`
        // derives nothing, so it goes first and fails fast instead).
        let file = with_rounds(&encrypt_export(&[key(1)], "p", 1).unwrap(), u32::MAX);
        let refused = ExportError::TooManyRounds { rounds: u32::MAX, max: DEFAULT_MAX_ROUNDS };
        assert_eq!(ExportKdf::read(&file, DEFAULT_MAX_ROUNDS), Err(refused.clone()));
        assert_eq!(ExportStream::open(&file, "p").err(), Some(refused.clone()));
        assert_eq!(decrypt_export(&file, "p"), Err(refused.clone()));
        assert_eq!(decrypt_export_bytes(&file, "p").err(), Some(refused.clone()));
        let flow = decrypt_export_with(&file, "p", |_, _, _| ControlFlow::<()>::Continue(()));
        assert_eq!(flow, Err(refused));
        // The limit itself is allowed, one more is not.
        let file = with_rounds(&file, DEFAULT_MAX_ROUNDS);
        assert_eq!(
            ExportKdf::read(&file, DEFAULT_MAX_ROUNDS).map(|k| k.rounds()),
            Ok(DEFAULT_MAX_ROUNDS)
        );
        let file = with_rounds(&file, DEFAULT_MAX_ROUNDS + 1);
        assert_eq!(
            ExportStream::open(&file, "p").err(),
            Some(ExportError::TooManyRounds {
                rounds: DEFAULT_MAX_ROUNDS + 1,
                max: DEFAULT_MAX_ROUNDS
            })
        );
    }

    #[test]
    fn a_raised_or_lowered_limit_and_keys_derived_beforehand() {
        let file = encrypt_export(&[key(1)], "p", 10).unwrap();
        let refused = ExportError::TooManyRounds { rounds: 10, max: 9 };
        assert_eq!(ExportStream::open_with_max_rounds(&file, "p", 9).err(), Some(refused.clone()));
        let read = ExportStream::open_with_max_rounds(&file, "p", 10);
        assert_eq!(drain(read, 5).unwrap(), vec![key(1)]);
        // Derived beforehand, as on another thread.
        assert_eq!(ExportKdf::read(&file, 9), Err(refused));
        let kdf = ExportKdf::read(&file, 10).unwrap();
        assert_eq!(kdf.rounds(), 10);
        let keys = kdf.derive("p");
        assert_eq!(format!("{keys:?}"), "ExportKeys(<redacted>)");
        assert_eq!(drain(ExportStream::open_with_keys(&file, &keys), 5).unwrap(), vec![key(1)]);
        // A wrong passphrase, or the keys of another file: a bad MAC.
        let wrong = kdf.derive("q");
        assert_eq!(ExportStream::open_with_keys(&file, &wrong).err(), Some(ExportError::BadMac));
        let other = encrypt_export(&[key(1)], "p", 10).unwrap();
        assert_eq!(ExportStream::open_with_keys(&other, &keys).err(), Some(ExportError::BadMac));
        // Reading the header reports the header's errors.
        for (bad, error) in [
            ("no header".to_owned(), ExportError::MissingHeader),
            (rearmor(""), ExportError::TooShort),
            (rearmor("AQ"), ExportError::TooShort),
            (rearmor("Ag"), ExportError::UnsupportedVersion(2)),
            (rearmor("AQ!@#$"), ExportError::Base64),
            (with_rounds(&file, 0), ExportError::ZeroRounds),
        ] {
            assert_eq!(ExportKdf::read(&bad, DEFAULT_MAX_ROUNDS), Err(error), "{bad:?}");
        }
    }

    #[test]
    fn debug_redacts_session_key() {
        let k = key(7);
        let debug = format!("{k:?}");
        assert!(!debug.contains("SECRET-SESSION-KEY"), "{debug}");
        assert!(debug.contains("session7"));
    }
}
