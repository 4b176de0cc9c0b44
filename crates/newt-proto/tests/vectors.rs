//! Replays the published test vectors in the repository's `test-vectors/`
//! directory. Each file names its sources in a `provenance` field.

// Helpers outside `#[test]` functions are test code too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::{alphabet, Engine as _};
use newt_proto::export::{
    decrypt_export, decrypt_export_bytes, encrypt_export, ExportError, ExportedRoomKey, FOOTER,
    HEADER,
};
use newt_proto::ids::UserId;
use newt_proto::json::{canonical_json, sign_json, verify_json, JsonError};
use serde_json::Value;
use vodozemac::megolm::{ExportedSessionKey, InboundGroupSession, MegolmMessage, SessionConfig};
use vodozemac::Ed25519SecretKey;

/// Accepts what the vectors contain: padded or not, non-zero trailing bits
/// (the spec's signing seed has them).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

use support::{load, str_field as str_of};

#[test]
fn canonical_json_spec_examples() {
    let vectors = load("canonical-json.json");
    let cases = vectors["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let input = str_of(case, "input");
        let expected = str_of(case, "output");
        let parsed: Value = serde_json::from_str(input).unwrap();
        assert_eq!(canonical_json(&parsed).as_deref(), Ok(expected), "input {input:?}");
        // Canonical JSON is a fixed point.
        let reparsed: Value = serde_json::from_str(expected).unwrap();
        assert_eq!(canonical_json(&reparsed).as_deref(), Ok(expected));
    }
}

#[test]
fn json_signing_spec_examples() {
    let vectors = load("json-signing.json");
    let seed: [u8; 32] =
        LENIENT.decode(str_of(&vectors, "signing_key_seed")).unwrap().try_into().unwrap();
    let secret = Ed25519SecretKey::from_slice(&seed);
    let public = secret.public_key();
    let entity = str_of(&vectors, "entity");
    let key_id = str_of(&vectors, "key_id");
    // The vectors are signed by a server ("domain"), while our API names a
    // user. The signature covers neither, so sign as a stand-in user and file
    // the result under the server name.
    let stand_in = UserId::parse(format!("@vector:{entity}")).unwrap();

    let cases = vectors["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let expected_signed: Value = serde_json::from_str(str_of(case, "signed")).unwrap();
        let expected_sig = str_of(case, "signature");
        assert_eq!(expected_signed["signatures"][entity][key_id], expected_sig);

        let mut value: Value = serde_json::from_str(str_of(case, "input")).unwrap();
        sign_json(&mut value, &stand_in, key_id, |m| secret.sign(m)).unwrap();
        assert_eq!(value["signatures"][stand_in.as_str()][key_id], expected_sig);
        assert_eq!(verify_json(&value, &stand_in, key_id, &public), Ok(()));

        let sigs = value["signatures"].as_object_mut().unwrap();
        let ours = sigs.remove(stand_in.as_str()).unwrap();
        sigs.insert(entity.to_owned(), ours);
        assert_eq!(value, expected_signed);

        // And the published object verifies, and stops verifying when changed.
        let mut published = expected_signed.clone();
        let sigs = published["signatures"].as_object_mut().unwrap();
        let theirs = sigs.remove(entity).unwrap();
        sigs.insert(stand_in.to_string(), theirs);
        assert_eq!(verify_json(&published, &stand_in, key_id, &public), Ok(()));
        published["extra"] = Value::from(1);
        assert!(matches!(
            verify_json(&published, &stand_in, key_id, &public),
            Err(JsonError::BadSignature { .. })
        ));
    }
}

fn payload_of(file: &str) -> Vec<u8> {
    let body = file
        .split_once(HEADER)
        .and_then(|(_, rest)| rest.split_once(FOOTER))
        .map(|(body, _)| body)
        .unwrap();
    let compact: String = body.split_whitespace().collect();
    LENIENT.decode(compact).unwrap()
}

/// matrix-js-sdk style: `raw_per_line` raw bytes per line, each line base64'd
/// separately with padding, CRLF line ends.
fn rewrap(payload: &[u8], raw_per_line: usize) -> String {
    let lines: Vec<String> = payload.chunks(raw_per_line).map(|c| STANDARD.encode(c)).collect();
    format!("{HEADER}\r\n{}\r\n{FOOTER}\r\n", lines.join("\r\n"))
}

#[test]
fn key_export_vectors() {
    let vectors = load("key-export.json");
    let exports = vectors["exports"].as_array().unwrap();
    assert!(exports.len() >= 2);
    for export in exports {
        let name = str_of(export, "name");
        let file = str_of(export, "file");
        let passphrase = str_of(export, "passphrase");
        let expected = &export["expected"];

        let keys = decrypt_export(file, passphrase).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(keys.len() as u64, expected["session_count"].as_u64().unwrap(), "{name}");
        // Field for field, and nothing lost or added on the way back out.
        assert_eq!(serde_json::to_value(&keys).unwrap(), expected["sessions"], "{name}");
        let typed: Vec<ExportedRoomKey> =
            serde_json::from_value(expected["sessions"].clone()).unwrap();
        assert_eq!(keys, typed);

        assert_eq!(decrypt_export(file, "not the passphrase"), Err(ExportError::BadMac), "{name}");

        let payload = payload_of(file);
        assert_eq!(payload[0], 1);
        assert_eq!(
            u32::from_be_bytes(payload[33..37].try_into().unwrap()) as u64,
            expected["rounds"].as_u64().unwrap()
        );
        // Flip one bit in the ciphertext, the salt, the IV, the rounds and the MAC.
        for index in [40, payload.len() - 33, 1, 20, 36, payload.len() - 1] {
            let mut tampered = payload.clone();
            tampered[index] ^= 0x02;
            let file = rewrap(&tampered, 96);
            assert_eq!(
                decrypt_export(&file, passphrase),
                Err(ExportError::BadMac),
                "{name} @{index}"
            );
        }

        // Re-wrapped as matrix-js-sdk writes it (96 raw bytes a line), and with
        // padding in the middle of the body (50 raw bytes a line).
        for raw_per_line in [96, 50, 1] {
            assert_eq!(decrypt_export(&rewrap(&payload, raw_per_line), passphrase).unwrap(), keys);
        }

        // Our own output of the same keys reads back.
        let ours = encrypt_export(&keys, "another passphrase", 2).unwrap();
        assert_eq!(decrypt_export(&ours, "another passphrase").unwrap(), keys);

        if let Some(event) = export.get("megolm_event") {
            let key = keys.iter().find(|k| k.session_id == str_of(event, "session_id")).unwrap();
            assert_eq!(key.room_id, str_of(event, "room_id"));
            let session_key = ExportedSessionKey::from_base64(&key.session_key).unwrap();
            let mut session = InboundGroupSession::import(&session_key, SessionConfig::version_1());
            assert_eq!(session.session_id(), key.session_id);
            let message = MegolmMessage::from_base64(str_of(event, "ciphertext")).unwrap();
            let decrypted = session.decrypt(&message).unwrap();
            let plaintext: Value = serde_json::from_slice(&decrypted.plaintext).unwrap();
            assert_eq!(plaintext["room_id"], str_of(event, "room_id"));
            assert_eq!(plaintext["content"]["body"], str_of(event, "expected_body"));
        }
    }
}

#[test]
fn key_export_payload_vectors() {
    let vectors = load("key-export.json");
    let cases = vectors["payload_vectors"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = str_of(case, "name");
        let file = str_of(case, "file");
        let passphrase = str_of(case, "passphrase");
        let plaintext =
            decrypt_export_bytes(file, passphrase).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&plaintext[..], str_of(case, "plaintext").as_bytes(), "{name}");
        assert_eq!(
            decrypt_export_bytes(file, "wrong").map(|_| ()),
            Err(ExportError::BadMac),
            "{name}"
        );
    }
}
