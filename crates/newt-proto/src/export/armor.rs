//! The text layer of a key export file: the header and footer lines around
//! a base64 body, decoded as a stream.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::{alphabet, Engine as _};

use super::{ExportError, FOOTER, HEADER};

/// Characters per armoured line when writing.
pub(super) const LINE_LEN: usize = 128;
/// Raw bytes per armoured line: 96 bytes are 128 base64 characters, with no
/// padding inside the body.
pub(super) const LINE_BYTES: usize = LINE_LEN / 4 * 3;

/// Decoding that accepts what exporters actually write: padded or unpadded
/// base64, and non-zero trailing bits.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// The text between the header and the footer. Anything before the header
/// or after the footer is ignored.
pub(super) fn armored_body(file: &str) -> Result<&str, ExportError> {
    let (_, rest) = file.split_once(HEADER).ok_or(ExportError::MissingHeader)?;
    let (body, _) = rest.split_once(FOOTER).ok_or(ExportError::MissingFooter)?;
    Ok(body)
}

/// Incremental, lenient base64 decoding of an armored body: whitespace
/// anywhere, and `=` padding at the end of any group, as when each line was
/// encoded on its own (matrix-js-sdk). Whitespace is skipped on the fly and
/// the text decoded a chunk at a time, so only the output is held (not a
/// cleaned copy of the input).
pub(super) struct Base64Stream<'a> {
    input: &'a [u8],
    pos: usize,
    segment: Vec<u8>,
    in_padding: bool,
}

impl<'a> Base64Stream<'a> {
    /// Whole 4-character groups decode the same alone as within their
    /// segment, so a long segment is decoded in chunks of them.
    pub(super) const CHUNK: usize = 64 * 1024;

    pub(super) fn new(body: &'a str) -> Self {
        Self {
            input: body.as_bytes(),
            pos: 0,
            segment: Vec::with_capacity(Self::CHUNK + 4),
            in_padding: false,
        }
    }

    pub(super) fn finished(&self) -> bool {
        self.pos >= self.input.len() && self.segment.is_empty()
    }

    /// Decodes about one chunk more onto `out` (nothing once finished).
    pub(super) fn step(&mut self, out: &mut Vec<u8>) -> Result<(), ExportError> {
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
pub(super) fn plain_run(rest: &[u8]) -> usize {
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
