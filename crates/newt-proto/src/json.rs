//! Canonical JSON and JSON signing (spec appendix "Signing JSON").
//!
//! Canonical JSON is written by hand rather than by `serde_json`'s
//! serializer, so that the output never depends on whether some other crate
//! in the build graph turned on `serde_json/preserve_order`.

use std::fmt::Write as _;

use serde_json::{Map, Value};
use vodozemac::{Ed25519PublicKey, Ed25519Signature};

use crate::ids::UserId;

/// Largest integer canonical JSON allows: 2^53 - 1.
const MAX_SAFE_INT: i64 = (1 << 53) - 1;

/// JSON that cannot be written canonically, or a signature that does not check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// A number that is not an integer in `[-(2^53)+1, 2^53-1]`.
    #[error("number {0} is not allowed in canonical JSON")]
    BadNumber(String),
    /// The value to sign or verify is not a JSON object.
    #[error("only JSON objects can be signed")]
    NotAnObject,
    /// `signatures[user_id][key_id]` is missing.
    #[error("no signature by {user_id} with key {key_id}")]
    MissingSignature {
        /// Whose signature was looked for.
        user_id: String,
        /// The key ID, e.g. `ed25519:DEVICE`.
        key_id: String,
    },
    /// The signature is not valid base64 of 64 bytes.
    #[error("malformed signature by {key_id}")]
    MalformedSignature {
        /// The key ID.
        key_id: String,
    },
    /// The signature does not verify.
    #[error("signature by {key_id} does not verify")]
    BadSignature {
        /// The key ID.
        key_id: String,
    },
}

/// Serialises `value` as canonical JSON.
pub fn canonical_json(value: &Value) -> Result<String, JsonError> {
    let mut out = String::with_capacity(256);
    write_canonical(value, &mut out)?;
    Ok(out)
}

fn write_canonical(value: &Value, out: &mut String) -> Result<(), JsonError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let int = n
                .as_i64()
                .filter(|i| (-MAX_SAFE_INT..=MAX_SAFE_INT).contains(i))
                .or_else(|| {
                    // `1e10` or `-0.0` parse as floats but are integers in value.
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_SAFE_INT as f64)
                        .map(|f| f as i64)
                })
                .ok_or_else(|| JsonError::BadNumber(n.to_string()))?;
            let _ = write!(out, "{int}");
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            // Rust string order is byte order of UTF-8, which is code point order.
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out)?;
                }
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The canonical bytes that a signature covers: the object without
/// `signatures` and `unsigned`.
pub fn signable_bytes(value: &Value) -> Result<String, JsonError> {
    let obj = value.as_object().ok_or(JsonError::NotAnObject)?;
    let mut copy = Map::with_capacity(obj.len());
    for (k, v) in obj {
        if k != "signatures" && k != "unsigned" {
            copy.insert(k.clone(), v.clone());
        }
    }
    canonical_json(&Value::Object(copy))
}

/// Adds `signatures[user_id][key_id]` made by `sign` over the signable bytes
/// of `value`, keeping any signatures already there.
pub fn sign_json(
    value: &mut Value,
    user_id: &UserId,
    key_id: &str,
    sign: impl FnOnce(&[u8]) -> Ed25519Signature,
) -> Result<(), JsonError> {
    let signature = sign(signable_bytes(value)?.as_bytes());
    let obj = value.as_object_mut().ok_or(JsonError::NotAnObject)?;
    let sigs = obj.entry("signatures").or_insert_with(|| Value::Object(Map::new()));
    if !sigs.is_object() {
        *sigs = Value::Object(Map::new());
    }
    if let Value::Object(sigs) = sigs {
        let user =
            sigs.entry(user_id.as_str().to_owned()).or_insert_with(|| Value::Object(Map::new()));
        if !user.is_object() {
            *user = Value::Object(Map::new());
        }
        if let Value::Object(user) = user {
            user.insert(key_id.to_owned(), Value::String(signature.to_base64()));
        }
    }
    Ok(())
}

/// Verifies `signatures[user_id][key_id]` on `value` with `key`.
pub fn verify_json(
    value: &Value,
    user_id: &UserId,
    key_id: &str,
    key: &Ed25519PublicKey,
) -> Result<(), JsonError> {
    let sig = value
        .get("signatures")
        .and_then(|s| s.get(user_id.as_str()))
        .and_then(|s| s.get(key_id))
        .and_then(Value::as_str)
        .ok_or_else(|| JsonError::MissingSignature {
            user_id: user_id.to_string(),
            key_id: key_id.to_owned(),
        })?;
    let sig = Ed25519Signature::from_base64(strip_padding(sig))
        .map_err(|_| JsonError::MalformedSignature { key_id: key_id.to_owned() })?;
    let bytes = signable_bytes(value)?;
    key.verify(bytes.as_bytes(), &sig)
        .map_err(|_| JsonError::BadSignature { key_id: key_id.to_owned() })
}

/// Strips `=` padding, which other clients sometimes emit where the spec says
/// unpadded (vodozemac's decoders reject padding).
pub fn strip_padding(s: &str) -> &str {
    s.trim_end_matches('=')
}

/// Unpadded standard base64.
pub fn b64_encode(bytes: impl AsRef<[u8]>) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

/// Decodes standard base64 with or without padding, ignoring whitespace.
pub fn b64_decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    let cleaned: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(strip_padding(&cleaned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rejects_non_integers() {
        assert!(matches!(canonical_json(&json!({"a": 1.5})), Err(JsonError::BadNumber(_))));
        assert!(canonical_json(&json!({"a": 9007199254740992_i64})).is_err());
        assert_eq!(canonical_json(&json!({"a": -0.0})).as_deref(), Ok(r#"{"a":0}"#));
    }

    #[test]
    fn escapes_controls_lowercase() {
        assert_eq!(canonical_json(&json!("\u{1}\u{1f}\n")).as_deref(), Ok("\"\\u0001\\u001f\\n\""));
    }

    #[test]
    fn sign_verify_and_tamper() {
        let account = vodozemac::olm::Account::new();
        let user = UserId::parse("@a:b").unwrap();
        let mut v = json!({"x": 1, "unsigned": {"y": 2}});
        sign_json(&mut v, &user, "ed25519:D", |m| account.sign(m)).unwrap();
        assert_eq!(verify_json(&v, &user, "ed25519:D", &account.ed25519_key()), Ok(()));
        v["unsigned"]["y"] = json!(3); // unsigned is not covered
        assert_eq!(verify_json(&v, &user, "ed25519:D", &account.ed25519_key()), Ok(()));
        v["x"] = json!(2);
        assert!(matches!(
            verify_json(&v, &user, "ed25519:D", &account.ed25519_key()),
            Err(JsonError::BadSignature { .. })
        ));
        assert!(matches!(
            verify_json(&v, &user, "ed25519:E", &account.ed25519_key()),
            Err(JsonError::MissingSignature { .. })
        ));
    }
}
