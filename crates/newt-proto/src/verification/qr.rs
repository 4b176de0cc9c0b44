//! The binary payload of a verification QR code (spec "QR code format").
//!
//! ```text
//! "MATRIX" | version 0x02 | mode | len (u16 BE) | flow ID (len bytes, UTF-8)
//!          | first key (32) | second key (32) | shared secret (rest, >= 8)
//! ```
//!
//! Rendering the payload as a QR symbol (one byte-mode segment, no ECI) is
//! left to the caller; this module only encodes and decodes the bytes. Keys
//! stay raw bytes: the scanner compares them with keys it already knows, so
//! a value that is not a valid curve point simply never matches.

use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;
use vodozemac::Ed25519PublicKey;

use crate::json::{b64_decode, b64_encode};

use super::{event_types, FlowId, OutgoingContent};

/// The payload's first six bytes.
pub const HEADER: &[u8; 6] = b"MATRIX";
/// The only version.
pub const VERSION: u8 = 0x02;
/// The shortest shared secret accepted.
pub const MIN_SECRET_LEN: usize = 8;
/// The `m.reciprocate.v1` method name.
pub const METHOD_RECIPROCATE_V1: &str = "m.reciprocate.v1";

/// What the two keys mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QrMode {
    /// `0x00`: verifying another user. Keys: own MSK, the other user's MSK.
    VerifyingAnotherUser,
    /// `0x01`: self-verification by a device that trusts the MSK. Keys: own
    /// MSK, the other device's Ed25519 key.
    SelfVerifyingMasterKeyTrusted,
    /// `0x02`: self-verification by a device that does not trust the MSK
    /// yet. Keys: this device's Ed25519 key, the MSK.
    SelfVerifyingMasterKeyUntrusted,
}

impl QrMode {
    /// The mode byte.
    pub fn byte(self) -> u8 {
        match self {
            Self::VerifyingAnotherUser => 0x00,
            Self::SelfVerifyingMasterKeyTrusted => 0x01,
            Self::SelfVerifyingMasterKeyUntrusted => 0x02,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x00 => Some(Self::VerifyingAnotherUser),
            0x01 => Some(Self::SelfVerifyingMasterKeyTrusted),
            0x02 => Some(Self::SelfVerifyingMasterKeyUntrusted),
            _ => None,
        }
    }
}

/// A payload that cannot be decoded (the displaying side is at fault) or
/// encoded (the caller is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QrError {
    /// The payload does not start with `MATRIX`.
    #[error("not a Matrix verification QR code")]
    BadHeader,
    /// A version other than 2.
    #[error("unsupported QR version {0}")]
    UnsupportedVersion(u8),
    /// A mode above 2.
    #[error("unknown QR mode {0}")]
    UnknownMode(u8),
    /// The payload ends early.
    #[error("QR payload truncated: {needed} bytes needed, {available} present")]
    Truncated {
        /// Bytes needed to read the next field.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// The flow ID is not UTF-8.
    #[error("the flow ID is not UTF-8")]
    FlowIdNotUtf8,
    /// The shared secret is shorter than 8 bytes.
    #[error("shared secret of {0} bytes is too short")]
    SecretTooShort(usize),
    /// Encoding: the flow ID does not fit a 16-bit length.
    #[error("flow ID of {0} bytes is too long")]
    FlowIdTooLong(usize),
    /// Rendering: the payload does not fit the largest QR symbol.
    #[error("a QR payload of {0} bytes does not fit a QR code")]
    TooLongForQrCode(usize),
}

/// A rendered QR symbol: `width` × `width` modules, row by row, `true` for
/// dark. Draw each module as a square and leave a light margin of four
/// modules around the symbol.
#[cfg(feature = "qr-matrix")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QrMatrix {
    /// Modules per side.
    pub width: usize,
    /// `width * width` modules, row-major; `true` is dark.
    pub modules: Vec<bool>,
}

#[cfg(feature = "qr-matrix")]
impl QrMatrix {
    /// Renders `payload` (from [`QrPayload::encode`]) the way Matrix
    /// scanners expect: a single byte-mode segment with no ECI header (so
    /// decoders hand back the raw bytes), error correction level L, at
    /// version 7 (as matrix-sdk-crypto does) or the smallest larger
    /// version that fits.
    pub fn render(payload: &[u8]) -> Result<Self, QrError> {
        use qrcode::bits::Bits;
        use qrcode::{Color, EcLevel, QrCode, Version};
        for version in 7..=40 {
            let mut bits = Bits::new(Version::Normal(version));
            if bits.push_byte_data(payload).is_err() || bits.push_terminator(EcLevel::L).is_err() {
                continue;
            }
            if let Ok(code) = QrCode::with_bits(bits, EcLevel::L) {
                let modules = code.to_colors().into_iter().map(|c| c == Color::Dark).collect();
                return Ok(Self { width: code.width(), modules });
            }
        }
        Err(QrError::TooLongForQrCode(payload.len()))
    }

    /// Whether the module at (`x`, `y`) is dark (`false` outside).
    pub fn is_dark(&self, x: usize, y: usize) -> bool {
        x < self.width
            && y < self.width
            && self.modules.get(y * self.width + x).copied().unwrap_or(false)
    }
}

/// A decoded (or to-be-encoded) QR payload.
#[derive(Clone, PartialEq, Eq)]
pub struct QrPayload {
    /// The mode.
    pub mode: QrMode,
    /// The flow ID: to-device `transaction_id` or the request event ID.
    pub flow_id: String,
    /// The first key, raw.
    pub first_key: [u8; 32],
    /// The second key, raw.
    pub second_key: [u8; 32],
    /// The shared secret (at least 8 bytes).
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for QrPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QrPayload")
            .field("mode", &self.mode)
            .field("flow_id", &self.flow_id)
            .field("first_key", &b64_encode(self.first_key))
            .field("second_key", &b64_encode(self.second_key))
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl QrPayload {
    /// The payload bytes.
    pub fn encode(&self) -> Result<Vec<u8>, QrError> {
        let len = u16::try_from(self.flow_id.len())
            .map_err(|_| QrError::FlowIdTooLong(self.flow_id.len()))?;
        if self.secret.len() < MIN_SECRET_LEN {
            return Err(QrError::SecretTooShort(self.secret.len()));
        }
        let mut out = Vec::with_capacity(10 + self.flow_id.len() + 64 + self.secret.len());
        out.extend_from_slice(HEADER);
        out.push(VERSION);
        out.push(self.mode.byte());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(self.flow_id.as_bytes());
        out.extend_from_slice(&self.first_key);
        out.extend_from_slice(&self.second_key);
        out.extend_from_slice(&self.secret);
        Ok(out)
    }

    /// Parses payload bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, QrError> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(HEADER.len())? != HEADER {
            return Err(QrError::BadHeader);
        }
        let version = r.byte()?;
        if version != VERSION {
            return Err(QrError::UnsupportedVersion(version));
        }
        let mode_byte = r.byte()?;
        let mode = QrMode::from_byte(mode_byte).ok_or(QrError::UnknownMode(mode_byte))?;
        let len_bytes = r.array::<2>()?;
        let len = usize::from(u16::from_be_bytes(len_bytes));
        let flow_id =
            String::from_utf8(r.take(len)?.to_vec()).map_err(|_| QrError::FlowIdNotUtf8)?;
        let first_key = r.array::<32>()?;
        let second_key = r.array::<32>()?;
        let secret = r.rest().to_vec();
        if secret.len() < MIN_SECRET_LEN {
            return Err(QrError::SecretTooShort(secret.len()));
        }
        Ok(Self { mode, flow_id, first_key, second_key, secret })
    }

    /// The secret as it travels in `m.reciprocate.v1` (unpadded base64).
    pub fn secret_base64(&self) -> String {
        b64_encode(&self.secret)
    }

    /// The first key as an Ed25519 key, if it is a valid one.
    pub fn first_key_ed25519(&self) -> Option<Ed25519PublicKey> {
        Ed25519PublicKey::from_slice(&self.first_key).ok()
    }

    /// The second key as an Ed25519 key, if it is a valid one.
    pub fn second_key_ed25519(&self) -> Option<Ed25519PublicKey> {
        Ed25519PublicKey::from_slice(&self.second_key).ok()
    }

    /// The scanner's `m.key.verification.start` with `m.reciprocate.v1`,
    /// sent after both keys in the code matched.
    pub fn reciprocate_start(&self, flow: &FlowId, from_device: &str) -> OutgoingContent {
        let mut content = Map::new();
        content.insert("method".into(), json!(METHOD_RECIPROCATE_V1));
        content.insert("from_device".into(), json!(from_device));
        content.insert("secret".into(), json!(self.secret_base64()));
        flow.decorate(&mut content);
        OutgoingContent { event_type: event_types::START, content: Value::Object(content) }
    }

    /// The displaying side's check of the scanner's `secret`, in constant
    /// time. A mismatch means an attack: warn, do not trust.
    pub fn secret_matches(&self, received_b64: &str) -> bool {
        b64_decode(received_b64).is_ok_and(|got| bool::from(got.ct_eq(&self.secret)))
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], QrError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len()).ok_or(
            QrError::Truncated { needed: self.pos.saturating_add(n), available: self.bytes.len() },
        )?;
        let out = self.bytes.get(self.pos..end).unwrap_or_default();
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, QrError> {
        Ok(self.array::<1>()?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], QrError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn rest(&mut self) -> &'a [u8] {
        let out = self.bytes.get(self.pos..).unwrap_or_default();
        self.pos = self.bytes.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> QrPayload {
        QrPayload {
            mode: QrMode::SelfVerifyingMasterKeyTrusted,
            flow_id: "txn".into(),
            first_key: [1; 32],
            second_key: [2; 32],
            secret: b"12345678".to_vec(),
        }
    }

    #[test]
    fn round_trip_all_modes() {
        for mode in [
            QrMode::VerifyingAnotherUser,
            QrMode::SelfVerifyingMasterKeyTrusted,
            QrMode::SelfVerifyingMasterKeyUntrusted,
        ] {
            let p = QrPayload { mode, ..sample() };
            let bytes = p.encode().unwrap();
            assert_eq!(bytes[7], mode.byte());
            assert_eq!(QrPayload::decode(&bytes).unwrap(), p);
        }
    }

    #[test]
    fn rejects_malformed_payloads() {
        let good = sample().encode().unwrap();
        let mut bad_header = good.clone();
        bad_header[0] = b'N';
        assert_eq!(QrPayload::decode(&bad_header), Err(QrError::BadHeader));
        let mut v1 = good.clone();
        v1[6] = 1;
        assert_eq!(QrPayload::decode(&v1), Err(QrError::UnsupportedVersion(1)));
        let mut m3 = good.clone();
        m3[7] = 3;
        assert_eq!(QrPayload::decode(&m3), Err(QrError::UnknownMode(3)));
        // Every truncation point before the secret is a typed error.
        for cut in 0..(10 + 3 + 64) {
            assert!(
                matches!(QrPayload::decode(&good[..cut]), Err(QrError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        // Cuts inside the secret leave it too short.
        for cut in (10 + 3 + 64)..good.len() {
            assert!(matches!(QrPayload::decode(&good[..cut]), Err(QrError::SecretTooShort(_))));
        }
        // A length that runs past the end.
        let mut long = good.clone();
        long[8] = 0xFF;
        assert!(matches!(QrPayload::decode(&long), Err(QrError::Truncated { .. })));
        let mut not_utf8 = good.clone();
        not_utf8[10] = 0xFF;
        assert_eq!(QrPayload::decode(&not_utf8), Err(QrError::FlowIdNotUtf8));
        assert_eq!(
            QrPayload { secret: vec![0; 7], ..sample() }.encode(),
            Err(QrError::SecretTooShort(7))
        );
        assert_eq!(
            QrPayload { flow_id: "x".repeat(70_000), ..sample() }.encode(),
            Err(QrError::FlowIdTooLong(70_000))
        );
    }

    #[cfg(feature = "qr-matrix")]
    #[test]
    fn renders_version_7_and_grows_for_long_flow_ids() {
        let m = QrMatrix::render(&sample().encode().unwrap()).unwrap();
        assert_eq!(m.width, 45, "version 7 is 45 modules wide");
        assert_eq!(m.modules.len(), 45 * 45);
        // The finder pattern's corner modules are dark, its inner ring light.
        assert!(m.is_dark(0, 0) && m.is_dark(6, 6) && !m.is_dark(1, 1));
        assert!(!m.is_dark(usize::MAX, usize::MAX) && !m.is_dark(0, 45));
        let long = QrPayload { flow_id: "$".repeat(400), ..sample() }.encode().unwrap();
        let m = QrMatrix::render(&long).unwrap();
        assert!(m.width > 45);
        assert_eq!(QrMatrix::render(&vec![0; 5000]), Err(QrError::TooLongForQrCode(5000)));
    }

    #[test]
    fn reciprocate_secret_check() {
        let p = sample();
        let flow = FlowId::ToDevice("txn".into());
        let start = p.reciprocate_start(&flow, "DEV");
        assert_eq!(start.content["method"], METHOD_RECIPROCATE_V1);
        let secret = start.content["secret"].as_str().unwrap();
        assert!(p.secret_matches(secret));
        assert!(!p.secret_matches("AAAAAAAAAAA"));
        assert!(!p.secret_matches("not base64!"));
        assert!(!format!("{p:?}").contains(&p.secret_base64()));
    }
}
