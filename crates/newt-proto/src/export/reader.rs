//! Reading a key export as a stream of keys: [`ExportStream`], which every
//! reader of keys goes through (the whole-file readers collect it).

use std::collections::VecDeque;

use zeroize::{Zeroize, Zeroizing};

use super::armor::armored_body;
use super::container::{Decoder, ExportKeys, Keying};
use super::json::{json_error, ArraySplitter};
use super::{ExportError, ExportedRoomKey, DEFAULT_MAX_ROUNDS};

/// Up to this many bytes of key text are kept from [`ExportStream::open`]'s
/// pass instead of decrypting the file a second time (small in tests, so
/// that they take both ways).
const KEEP_FROM_FIRST_PASS: usize = if cfg!(test) { 2048 } else { 4 << 20 };

/// A key export read as a stream from the file text: nothing the size of
/// the file is held besides the text itself (the decoded and decrypted
/// bytes pass through in chunks). [`open`](Self::open) authenticates the
/// file (MAC) and validates and counts every key in one pass; then
/// [`next_batch`](Self::next_batch) decrypts and parses again, a batch at a
/// time. [`decrypt_export`](super::decrypt_export) and
/// [`decrypt_export_with`](super::decrypt_export_with) read through it, so
/// the errors are the same in the same cases.
///
/// [`open`](Self::open) derives the keys from the passphrase on the
/// caller's thread (the slow part); [`open_with_keys`](Self::open_with_keys)
/// takes keys derived beforehand with [`ExportKdf`](super::ExportKdf).
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
    /// The second pass, when the first one did not keep every key.
    pass: Option<SecondPass<'a>>,
    /// Keys kept parsed from the first pass ([`Keep::Keys`]), not yet
    /// handed out.
    parsed: ParsedKeys,
    /// Text of keys not yet handed out.
    pending: VecDeque<Zeroizing<Vec<u8>>>,
}

/// What the first pass keeps of each key for [`ExportStream::next_batch`].
#[derive(Clone, Copy)]
enum Keep {
    /// Their text, up to this many bytes in all; past that, nothing, and
    /// the keys come from a second pass.
    Text(usize),
    /// The parsed keys: for readers that hand out every key at once anyway,
    /// so that each key is parsed once and the file decrypted once.
    Keys,
}

/// Keys parsed ahead; their session keys are zeroised if they are dropped
/// here (a file whose MAC or JSON fails, a stream dropped half read).
#[derive(Default)]
struct ParsedKeys(VecDeque<ExportedRoomKey>);

impl Drop for ParsedKeys {
    fn drop(&mut self) {
        for key in &mut self.0 {
            key.session_key.zeroize();
        }
    }
}

/// The second decrypting pass over an authenticated file.
struct SecondPass<'a> {
    decoder: Decoder<'a, 'static>,
    splitter: ArraySplitter,
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
        let keying = Keying::Passphrase { passphrase, max_rounds };
        Self::open_keyed(file, keying, Keep::Text(KEEP_FROM_FIRST_PASS))
    }

    /// [`open`](Self::open) with keys already derived from this file's
    /// header ([`ExportKdf::read`](super::ExportKdf::read) then
    /// [`ExportKdf::derive`](super::ExportKdf::derive)). Keys derived for
    /// another file fail like a wrong passphrase ([`ExportError::BadMac`]).
    pub fn open_with_keys(file: &'a str, keys: &ExportKeys) -> Result<Self, ExportError> {
        let keying = Keying::Derived(keys.0.clone());
        Self::open_keyed(file, keying, Keep::Text(KEEP_FROM_FIRST_PASS))
    }

    /// [`open`](Self::open) keeping every parsed key from the first pass
    /// ([`Keep::Keys`]): for the whole-file readers.
    pub(super) fn open_whole(file: &'a str, passphrase: &str) -> Result<Self, ExportError> {
        let keying = Keying::Passphrase { passphrase, max_rounds: DEFAULT_MAX_ROUNDS };
        Self::open_keyed(file, keying, Keep::Keys)
    }

    /// The first pass: the [`Decoder`]'s verdict on the container, then the
    /// JSON's. What it keeps of the keys is `keep`'s choice.
    fn open_keyed(file: &'a str, keying: Keying<'_>, keep: Keep) -> Result<Self, ExportError> {
        let body = armored_body(file)?;
        let mut decoder = Decoder::new(body, keying, true);
        let mut splitter = ArraySplitter::default();
        let mut total = 0usize;
        // The first JSON error counts only once the MAC is verified, and
        // ends validation (not decoding: a base64 error later still wins).
        let mut invalid: Option<ExportError> = None;
        let mut kept: Option<VecDeque<Zeroizing<Vec<u8>>>> = Some(VecDeque::new());
        let mut kept_bytes = 0usize;
        let mut parsed = ParsedKeys::default();
        let mut validate = |plaintext: &[u8]| {
            if invalid.is_some() {
                return Ok(());
            }
            let fed = splitter.feed(plaintext, |element| {
                let mut key: ExportedRoomKey =
                    serde_json::from_slice(element).map_err(json_error)?;
                total += 1;
                let Keep::Text(limit) = keep else {
                    parsed.0.push_back(key);
                    return Ok(());
                };
                key.session_key.zeroize();
                kept_bytes += element.len();
                if kept_bytes > limit {
                    kept = None;
                } else if let Some(kept) = &mut kept {
                    kept.push_back(Zeroizing::new(element.to_vec()));
                }
                Ok(())
            });
            invalid = fed.err();
            Ok(())
        };
        while decoder.step(&mut validate)? {}
        let keys = decoder.finish()?;
        if let Some(e) = invalid {
            return Err(e);
        }
        splitter.finish()?;
        if let Some(pending) = kept {
            return Ok(Self { total, done: 0, pass: None, parsed, pending });
        }
        let decoder = Decoder::new(body, Keying::Derived(keys), false);
        let pass = Some(SecondPass { decoder, splitter: ArraySplitter::default() });
        Ok(Self { total, done: 0, pass, parsed, pending: VecDeque::new() })
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
            let Some(key) = self.next_key()? else { break };
            batch.push(key);
        }
        if max > 0 && batch.is_empty() && self.done < self.total {
            return Err(ExportError::Json("fewer keys than counted".into()));
        }
        Ok(batch)
    }

    /// The next key, or `None` when all were read.
    pub(super) fn next_key(&mut self) -> Result<Option<ExportedRoomKey>, ExportError> {
        if let Some(key) = self.parsed.0.pop_front() {
            self.done += 1;
            return Ok(Some(key));
        }
        loop {
            if let Some(element) = self.pending.pop_front() {
                let key = serde_json::from_slice(&element).map_err(json_error)?;
                self.done += 1;
                return Ok(Some(key));
            }
            let Some(pass) = &mut self.pass else { return Ok(None) };
            let pending = &mut self.pending;
            let splitter = &mut pass.splitter;
            let more = pass.decoder.step(|plaintext| {
                splitter.feed(plaintext, |element| {
                    pending.push_back(Zeroizing::new(element.to_vec()));
                    Ok(())
                })
            })?;
            if !more {
                pass.splitter.finish()?;
                self.pass = None;
            }
        }
    }
}
