//! Writing a key export a key at a time: [`ExportWriter`], which every
//! writer goes through (the whole-file writers collect it).

use std::io::Write;

use aes::cipher::StreamCipher;
use base64::Engine as _;
use hmac::Mac;
use zeroize::Zeroizing;

use super::armor::{LINE_BYTES, LINE_LEN};
use super::container::{fresh_header, Aes256Ctr, DerivedKeys, HmacSha256};
use super::json::json_error;
use super::{ExportError, ExportedRoomKey, FOOTER, HEADER};

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
pub struct ExportWriter<W: Write> {
    out: W,
    cipher: Aes256Ctr,
    mac: HmacSha256,
    /// Raw (encrypted) bytes not yet armoured: fewer than `LINE_BYTES`.
    pending: Vec<u8>,
    /// Reused buffer for one key's JSON (zeroised on drop).
    scratch: Zeroizing<Vec<u8>>,
    keys_written: usize,
}

impl<W: Write> ExportWriter<W> {
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
        self.finish_container()
    }

    /// Encrypts `plaintext` (in place) into the container, as it is: for
    /// [`encrypt_export_bytes`](super::encrypt_export_bytes), with no key
    /// pushed and [`finish_container`](Self::finish_container) after.
    pub(super) fn push_raw(&mut self, plaintext: &mut [u8]) -> Result<(), ExportError> {
        self.seal_and_emit(plaintext)
    }

    /// Appends the MAC and the footer, and returns the output.
    pub(super) fn finish_container(mut self) -> Result<W, ExportError> {
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
