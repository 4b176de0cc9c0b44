//! The binary container inside the armour: version, salt, IV, round count,
//! AES-256-CTR ciphertext and HMAC-SHA256, with the PBKDF2 key derivation;
//! and [`Decoder`], the one pass that every reader makes over a file.

use std::fmt;

use aes::cipher::{KeyIvInit, StreamCipher};
use hmac::{Hmac, KeyInit, Mac};
use rand::rngs::SysRng;
use rand::TryRng;
use sha2::{Sha256, Sha512};
use zeroize::Zeroizing;

use super::armor::{armored_body, Base64Stream};
use super::ExportError;

pub(super) const VERSION: u8 = 1;
pub(super) const SALT_LEN: usize = 16;
pub(super) const IV_LEN: usize = 16;
pub(super) const KEY_LEN: usize = 32;
pub(super) const MAC_LEN: usize = 32;
/// Version, salt, IV and round count: everything before the ciphertext.
pub(super) const HEADER_LEN: usize = 1 + SALT_LEN + IV_LEN + 4;

pub(super) type HmacSha256 = Hmac<Sha256>;

/// AES-256-CTR with a 64-bit big-endian counter in the last 8 bytes of the IV,
/// wrapping without carry into the first 8.
///
/// This is what Element does (WebCrypto `AES-CTR` with `length: 64`).
/// matrix-rust-sdk uses a 128-bit counter (`Ctr128BE`). Writers clear IV bit 63
/// so that the two agree on every file shorter than 2^63 blocks. The only files
/// where they differ have bit 63 set, and those are test vectors such as
/// matrix-react-sdk's all-ones IV, which decrypts correctly only like this.
pub(super) type Aes256Ctr = ctr::Ctr64BE<aes::Aes256>;

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

/// A container header with the salt and IV it holds.
pub(super) type FreshHeader = ([u8; HEADER_LEN], [u8; SALT_LEN], [u8; IV_LEN]);

/// A new container header (version, random salt, random IV with bit 63
/// cleared, rounds), with the salt and IV it holds.
pub(super) fn fresh_header(rounds: u32) -> Result<FreshHeader, ExportError> {
    let mut salt = [0u8; SALT_LEN];
    let mut iv = [0u8; IV_LEN];
    SysRng.try_fill_bytes(&mut salt).map_err(|e| ExportError::Rng(e.to_string()))?;
    SysRng.try_fill_bytes(&mut iv).map_err(|e| ExportError::Rng(e.to_string()))?;
    // Clear bit 63 so that 64- and 128-bit CTR counters agree (see `Aes256Ctr`).
    iv[8] &= 0x7f;
    let mut header = [0u8; HEADER_LEN];
    header[0] = VERSION;
    header[1..1 + SALT_LEN].copy_from_slice(&salt);
    header[1 + SALT_LEN..1 + SALT_LEN + IV_LEN].copy_from_slice(&iv);
    header[1 + SALT_LEN + IV_LEN..].copy_from_slice(&rounds.to_be_bytes());
    Ok((header, salt, iv))
}

/// The AES and HMAC keys derived from the passphrase, zeroised on drop.
#[derive(Clone)]
pub(super) struct DerivedKeys {
    aes: Zeroizing<[u8; KEY_LEN]>,
    mac: Zeroizing<[u8; KEY_LEN]>,
}

impl DerivedKeys {
    pub(super) fn new(passphrase: &str, salt: &[u8; SALT_LEN], rounds: u32) -> Self {
        let mut okm = Zeroizing::new([0u8; 2 * KEY_LEN]);
        pbkdf2::pbkdf2_hmac::<Sha512>(passphrase.as_bytes(), salt, rounds, okm.as_mut_slice());
        let mut keys =
            Self { aes: Zeroizing::new([0u8; KEY_LEN]), mac: Zeroizing::new([0u8; KEY_LEN]) };
        keys.aes.copy_from_slice(&okm[..KEY_LEN]);
        keys.mac.copy_from_slice(&okm[KEY_LEN..]);
        keys
    }

    pub(super) fn cipher(&self, iv: &[u8; IV_LEN]) -> Aes256Ctr {
        Aes256Ctr::new((&*self.aes).into(), iv.into())
    }

    /// An HMAC-SHA256 over `data`, ready to finalise or verify.
    pub(super) fn mac(&self, data: &[u8]) -> HmacSha256 {
        // HMAC zero-pads keys shorter than its 64-byte block (RFC 2104), so
        // padding by hand gives the same MAC without a fallible constructor.
        let mut block = Zeroizing::new([0u8; 64]);
        block[..KEY_LEN].copy_from_slice(&*self.mac);
        let mut mac = <HmacSha256 as KeyInit>::new((&*block).into());
        mac.update(data);
        mac
    }
}

/// The key derivation a file asks for: its salt and PBKDF2 round count,
/// read from its header and checked against a limit.
///
/// Reading the header is cheap; [`derive`](Self::derive) is the slow part
/// of reading a file. It borrows nothing from the file, so a caller can run
/// it on another thread and pass the keys to
/// [`ExportStream::open_with_keys`](super::ExportStream::open_with_keys).
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
pub struct ExportKeys(pub(super) DerivedKeys);

impl fmt::Debug for ExportKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExportKeys(<redacted>)")
    }
}

/// Where a [`Decoder`]'s keys come from.
pub(super) enum Keying<'k> {
    /// Derived from the passphrase once the header is read, if its round
    /// count is within `max_rounds`.
    Passphrase { passphrase: &'k str, max_rounds: u32 },
    /// Derived beforehand ([`ExportKdf::derive`], which checked the limit),
    /// or by an earlier pass over the same file.
    Derived(DerivedKeys),
}

/// What a [`Decoder`] has once the header is read and keyed.
struct Keyed {
    keys: DerivedKeys,
    cipher: Aes256Ctr,
    /// `None` on a pass that does not check the MAC (a second pass over a
    /// file the first one authenticated).
    mac: Option<HmacSha256>,
}

/// The one decoder of key export files: a pass over the armoured body that
/// decodes the base64 a chunk at a time, reads and checks the header,
/// derives (or takes) the keys, MACs everything but the last `MAC_LEN`
/// bytes, and decrypts the ciphertext, handing the plaintext on a chunk at
/// a time. Nothing the size of the file is held.
///
/// [`step`](Self::step) until it returns `false`, then
/// [`finish`](Self::finish) for the verdict. Errors come in the order of
/// decoding the whole payload first: a base64 error anywhere (at once, from
/// `step`), then version, length, round count and MAC (from `finish`). The
/// plaintext handed on before `finish` is not authenticated yet: callers
/// may validate it but must release nothing from it before `finish` is
/// `Ok`.
pub(super) struct Decoder<'a, 'k> {
    base64: Base64Stream<'a>,
    /// Taken when the header is complete.
    keying: Option<Keying<'k>>,
    check_mac: bool,
    head: Vec<u8>,
    /// Decoded bytes not yet MACed or decrypted: the last `MAC_LEN` are
    /// always held back, since they may be the MAC.
    tail: Vec<u8>,
    /// Bytes decoded so far.
    total_len: usize,
    /// Bytes MACed so far (the header, then ciphertext).
    covered_len: usize,
    keyed: Option<Keyed>,
    header_error: Option<ExportError>,
    /// The last chunk of plaintext, zeroised on drop.
    plain: Zeroizing<Vec<u8>>,
}

impl<'a, 'k> Decoder<'a, 'k> {
    /// A pass over `body` (the text inside the armour); `check_mac: false`
    /// only for a file whose MAC an earlier pass verified.
    pub(super) fn new(body: &'a str, keying: Keying<'k>, check_mac: bool) -> Self {
        Self {
            base64: Base64Stream::new(body),
            keying: Some(keying),
            check_mac,
            head: Vec::with_capacity(HEADER_LEN),
            tail: Vec::with_capacity(2 * Base64Stream::CHUNK),
            total_len: 0,
            covered_len: 0,
            keyed: None,
            header_error: None,
            plain: Zeroizing::new(Vec::new()),
        }
    }

    /// Decodes about one chunk more and hands the plaintext in it (possibly
    /// none) to `sink`, whose error ends the pass. `false` once the whole
    /// body was decoded.
    pub(super) fn step(
        &mut self,
        sink: impl FnOnce(&[u8]) -> Result<(), ExportError>,
    ) -> Result<bool, ExportError> {
        if self.base64.finished() {
            return Ok(false);
        }
        let before = self.tail.len();
        self.base64.step(&mut self.tail)?;
        self.total_len += self.tail.len() - before;
        if self.head.len() < HEADER_LEN {
            let new = &self.tail[before..];
            let need = (HEADER_LEN - self.head.len()).min(new.len());
            self.head.extend_from_slice(&new[..need]);
            if self.head.len() == HEADER_LEN {
                self.key();
            }
        }
        if let Some(keyed) = &mut self.keyed {
            if self.tail.len() > MAC_LEN {
                let covered = self.tail.len() - MAC_LEN;
                if let Some(mac) = &mut keyed.mac {
                    mac.update(&self.tail[..covered]);
                }
                // The part of it after the header is ciphertext.
                let skip = HEADER_LEN.saturating_sub(self.covered_len).min(covered);
                self.covered_len += covered;
                let ciphertext = &self.tail[skip..covered];
                if self.plain.capacity() < ciphertext.len() {
                    // A new buffer rather than a reallocation, which would
                    // leave plaintext behind unzeroised.
                    self.plain = Zeroizing::new(Vec::with_capacity(ciphertext.len()));
                }
                self.plain.clear();
                self.plain.extend_from_slice(ciphertext);
                keyed.cipher.apply_keystream(&mut self.plain);
                self.tail.drain(..covered);
                sink(&self.plain)?;
            }
        } else if self.header_error.is_some() {
            self.tail.clear();
        }
        Ok(!self.base64.finished())
    }

    /// The header is complete: check it and key the pass (the slow part,
    /// with a passphrase), or keep its error for [`finish`](Self::finish).
    fn key(&mut self) {
        let Some(keying) = self.keying.take() else { return };
        let max_rounds = match keying {
            Keying::Passphrase { max_rounds, .. } => max_rounds,
            // Checked when they were derived.
            Keying::Derived(_) => u32::MAX,
        };
        match Header::parse(&self.head, max_rounds) {
            Ok(h) => {
                let keys = match keying {
                    Keying::Passphrase { passphrase, .. } => {
                        DerivedKeys::new(passphrase, &h.salt, h.rounds)
                    }
                    Keying::Derived(keys) => keys,
                };
                let mac = self.check_mac.then(|| keys.mac(&[]));
                self.keyed = Some(Keyed { cipher: keys.cipher(&h.iv), keys, mac });
            }
            Err(e) => self.header_error = Some(e),
        }
    }

    /// After the last [`step`](Self::step): the container's verdict, in the
    /// order of decoding the whole payload first (version, length, header,
    /// MAC in constant time), and the keys for another pass.
    pub(super) fn finish(self) -> Result<DerivedKeys, ExportError> {
        match self.head.first() {
            None => return Err(ExportError::TooShort),
            Some(&VERSION) => {}
            Some(&other) => return Err(ExportError::UnsupportedVersion(other)),
        }
        if self.total_len < HEADER_LEN + MAC_LEN {
            return Err(ExportError::TooShort);
        }
        if let Some(e) = self.header_error {
            return Err(e);
        }
        let keyed = self.keyed.ok_or(ExportError::TooShort)?;
        if let Some(mac) = keyed.mac {
            mac.verify_slice(&self.tail).map_err(|_| ExportError::BadMac)?;
        }
        Ok(keyed.keys)
    }
}
