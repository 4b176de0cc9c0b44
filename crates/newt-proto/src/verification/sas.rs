//! The SAS (`m.sas.v1`) computations, deterministic given their inputs:
//! commitment, SAS info string, emoji and decimals from the SAS bytes, MAC
//! info strings, and building and checking the `m.key.verification.mac`
//! content.

use std::collections::BTreeSet;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use vodozemac::sas::{EstablishedSas, Mac};
use vodozemac::Ed25519PublicKey;

use crate::ids::{DeviceId, UserId};
use crate::json::{b64_encode, canonical_json, strip_padding, JsonError};

use super::emoji::{Emoji, EMOJI};
use super::CancelCode;

/// The SAS method name.
pub const METHOD_SAS_V1: &str = "m.sas.v1";
/// The key agreement protocol we speak (the deprecated `curve25519` is refused).
pub const KEY_AGREEMENT_V2: &str = "curve25519-hkdf-sha256";
/// The only hash.
pub const HASH_SHA256: &str = "sha256";
/// The MAC method to use whenever both sides support it.
pub const MAC_V2: &str = "hkdf-hmac-sha256.v2";
/// The unstable name of [`MAC_V2`] (MSC3783), accepted on input.
pub const MAC_V2_UNSTABLE: &str = "org.matrix.msc3783.hkdf-hmac-sha256";
/// The deprecated MAC method with libolm's broken base64.
pub const MAC_LEGACY: &str = "hkdf-hmac-sha256";
/// Decimal SAS.
pub const SAS_DECIMAL: &str = "decimal";
/// Emoji SAS.
pub const SAS_EMOJI: &str = "emoji";

/// `UnpaddedB64(SHA256(UnpaddedB64(K_pub) ‖ CanonicalJSON(start_content)))`,
/// over the start content exactly as it was sent (with `transaction_id` or
/// `m.relates_to`).
pub fn commitment(public_key_b64: &str, start_content: &Value) -> Result<String, JsonError> {
    let canonical = canonical_json(start_content)?;
    let digest = Sha256::new()
        .chain_update(public_key_b64.as_bytes())
        .chain_update(canonical.as_bytes())
        .finalize();
    Ok(b64_encode(digest))
}

/// One side of a SAS exchange, for the info string.
#[derive(Debug, Clone, Copy)]
pub struct SasParty<'a> {
    /// The user.
    pub user_id: &'a str,
    /// The device.
    pub device_id: &'a str,
    /// The device's ephemeral Curve25519 key, unpadded base64.
    pub ephemeral_key: &'a str,
}

/// The HKDF info for the SAS bytes with `curve25519-hkdf-sha256`:
/// `MATRIX_KEY_VERIFICATION_SAS|<start user>|<start device>|<start key>|<accept user>|<accept device>|<accept key>|<flow id>`.
/// "Start" is the device whose `start` is in effect, "accept" the device
/// that sent `accept`.
pub fn sas_info(start: SasParty<'_>, accept: SasParty<'_>, flow_id: &str) -> String {
    format!(
        "MATRIX_KEY_VERIFICATION_SAS|{}|{}|{}|{}|{}|{}|{}",
        start.user_id,
        start.device_id,
        start.ephemeral_key,
        accept.user_id,
        accept.device_id,
        accept.ephemeral_key,
        flow_id
    )
}

/// Seven emoji indices: the first 42 bits of the 6 SAS bytes, 6 bits each,
/// most significant first.
pub fn emoji_indices(bytes: &[u8; 6]) -> [u8; 7] {
    let n = bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let mut out = [0u8; 7];
    for (i, slot) in out.iter_mut().enumerate() {
        // Masked to 6 bits, so the cast is lossless.
        *slot = ((n >> (42 - 6 * i)) & 63) as u8;
    }
    out
}

/// The seven emoji for the SAS bytes.
pub fn emoji_for(bytes: &[u8; 6]) -> [Emoji; 7] {
    emoji_indices(bytes).map(|i| EMOJI[usize::from(i & 63)])
}

/// Three numbers in 1000..=9191: 13 bits each from the first 5 SAS bytes.
pub fn decimals(bytes: &[u8; 6]) -> [u16; 3] {
    let b = bytes.map(u16::from);
    [
        ((b[0] << 5) | (b[1] >> 3)) + 1000,
        (((b[1] & 0x7) << 10) | (b[2] << 2) | (b[3] >> 6)) + 1000,
        (((b[3] & 0x3F) << 7) | (b[4] >> 1)) + 1000,
    ]
}

/// The MAC info prefix, sender (whose keys are MACed) first:
/// `MATRIX_KEY_VERIFICATION_MAC<sender user><sender device><receiver user><receiver device><flow id>`.
/// Append a key ID, or `KEY_IDS` for the key list.
pub fn mac_info_prefix(
    sender_user: &UserId,
    sender_device: &DeviceId,
    receiver_user: &UserId,
    receiver_device: &DeviceId,
    flow_id: &str,
) -> String {
    format!("MATRIX_KEY_VERIFICATION_MAC{sender_user}{sender_device}{receiver_user}{receiver_device}{flow_id}")
}

/// The input of the `keys` MAC: key IDs sorted and joined with `,`.
pub fn key_ids_input<'a>(key_ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut ids: Vec<&str> = key_ids.into_iter().collect();
    ids.sort_unstable();
    ids.join(",")
}

/// The agreed MAC method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacMethod {
    /// `hkdf-hmac-sha256.v2`: HMAC-SHA256 with a proper base64 encoding.
    HkdfHmacSha256V2,
    /// `hkdf-hmac-sha256`: the same MAC, encoded with libolm's broken base64.
    HkdfHmacSha256Legacy,
}

impl MacMethod {
    /// Parses a method name (including the unstable alias of v2).
    pub fn from_wire(name: &str) -> Option<Self> {
        match name {
            MAC_V2 | MAC_V2_UNSTABLE => Some(Self::HkdfHmacSha256V2),
            MAC_LEGACY => Some(Self::HkdfHmacSha256Legacy),
            _ => None,
        }
    }

    /// Picks from the start's offer: v2 whenever offered, else legacy.
    /// Returns the method and the exact name to echo in `accept`.
    pub fn choose<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<(Self, &'a str)> {
        let offered: Vec<&'a str> = offered.into_iter().collect();
        [MAC_V2, MAC_V2_UNSTABLE, MAC_LEGACY]
            .into_iter()
            .find_map(|want| offered.iter().copied().find(|o| *o == want))
            .and_then(|name| Self::from_wire(name).map(|m| (m, name)))
    }

    /// Checks the method an `accept` chose (`chosen`) against what our
    /// `start` offered: it must be one of the offered names, and it must be
    /// the method [`choose`](Self::choose) picks from that offer, so v2
    /// whenever v2 was offered. MSC3783 forbids the legacy method when both
    /// sides support v2, and every implementation must support v2; an
    /// `accept` choosing legacy anyway is a downgrade (the `accept` is not
    /// covered by the commitment, so anyone on the path can rewrite it).
    pub fn check_choice<'a>(
        offered: impl IntoIterator<Item = &'a str>,
        chosen: &str,
    ) -> Option<Self> {
        let offered: Vec<&str> = offered.into_iter().collect();
        if !offered.contains(&chosen) {
            return None;
        }
        let (best, _) = Self::choose(offered)?;
        Self::from_wire(chosen).filter(|m| *m == best)
    }

    /// The MAC of `input`, encoded as this method sends it.
    pub fn calculate(self, sas: &EstablishedSas, input: &str, info: &str) -> String {
        match self {
            Self::HkdfHmacSha256V2 => sas.calculate_mac(input, info).to_base64(),
            Self::HkdfHmacSha256Legacy => sas.calculate_mac_invalid_base64(input, info),
        }
    }

    /// Whether `received` is the MAC of `input`.
    pub fn verify(self, sas: &EstablishedSas, input: &str, info: &str, received: &str) -> bool {
        match self {
            Self::HkdfHmacSha256V2 => Mac::from_base64(strip_padding(received))
                .is_ok_and(|mac| sas.verify_mac(input, info, &mac).is_ok()),
            Self::HkdfHmacSha256Legacy => {
                let expected = sas.calculate_mac_invalid_base64(input, info);
                bool::from(expected.as_bytes().ct_eq(received.as_bytes()))
            }
        }
    }
}

/// The `mac` and `keys` fields of our `m.key.verification.mac`: a MAC of
/// each `(key ID, unpadded base64 public key)` and of the sorted key IDs.
pub fn mac_fields(
    sas: &EstablishedSas,
    method: MacMethod,
    info_prefix: &str,
    keys: &[(String, String)],
) -> (Map<String, Value>, String) {
    let mut mac = Map::new();
    for (key_id, key) in keys {
        let value = method.calculate(sas, key, &format!("{info_prefix}{key_id}"));
        mac.insert(key_id.clone(), Value::String(value));
    }
    let ids = key_ids_input(keys.iter().map(|(id, _)| id.as_str()));
    let keys_mac = method.calculate(sas, &ids, &format!("{info_prefix}KEY_IDS"));
    (mac, keys_mac)
}

/// The other side's keys, fixed when the flow started: only these can come
/// out of a MAC check as verified.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedKeys {
    /// The other device's ID.
    pub device_id: DeviceId,
    /// The other device's Ed25519 key.
    pub device_key: Ed25519PublicKey,
    /// The other user's master key, if known.
    pub master_key: Option<Ed25519PublicKey>,
    /// All cross-signing key IDs of the other user (`ed25519:<key>`), to
    /// detect a device ID that clashes with one.
    pub cross_signing_key_ids: Vec<String>,
}

/// Keys whose MAC checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacVerified {
    /// The device's Ed25519 key was MACed and matches.
    pub device_key: Option<Ed25519PublicKey>,
    /// The master key was MACed and matches.
    pub master_key: Option<Ed25519PublicKey>,
}

/// Checks an incoming `mac` content against the keys fixed at the start.
///
/// `info_prefix` is built with the *sender's* user and device first. The
/// `keys` MAC is checked over the IDs actually present in `mac`, so an entry
/// added or removed in transit fails; every entry for a key we expect must
/// verify; entries for keys we do not know verify nothing and are skipped
/// (as matrix-sdk-crypto does). A device ID equal to a cross-signing key ID
/// is refused outright. Every failure is `m.key_mismatch`.
pub fn verify_mac_content(
    sas: &EstablishedSas,
    method: MacMethod,
    info_prefix: &str,
    expected: &ExpectedKeys,
    mac: &Map<String, Value>,
    keys_mac: &str,
) -> Result<MacVerified, CancelCode> {
    let device_key_id = format!("ed25519:{}", expected.device_id);
    if expected.cross_signing_key_ids.iter().any(|id| id == &device_key_id) {
        return Err(CancelCode::KeyMismatch);
    }
    let ids = key_ids_input(mac.keys().map(String::as_str));
    if !method.verify(sas, &ids, &format!("{info_prefix}KEY_IDS"), keys_mac) {
        return Err(CancelCode::KeyMismatch);
    }
    let master_key_id = expected.master_key.map(|k| format!("ed25519:{}", k.to_base64()));
    let mut verified = MacVerified { device_key: None, master_key: None };
    let mut seen = BTreeSet::new();
    for (key_id, value) in mac {
        let value = value.as_str().ok_or(CancelCode::KeyMismatch)?;
        let info = format!("{info_prefix}{key_id}");
        let candidate = if key_id == &device_key_id {
            Some((expected.device_key, true))
        } else if Some(key_id) == master_key_id.as_ref() {
            expected.master_key.map(|k| (k, false))
        } else {
            None
        };
        let Some((key, is_device)) = candidate else { continue };
        if !method.verify(sas, &key.to_base64(), &info, value) {
            return Err(CancelCode::KeyMismatch);
        }
        seen.insert(key_id.clone());
        if is_device {
            verified.device_key = Some(key);
        } else {
            verified.master_key = Some(key);
        }
    }
    if seen.is_empty() {
        // Nothing we know was MACed: nothing can be verified.
        return Err(CancelCode::KeyMismatch);
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vodozemac::sas::Sas;
    use vodozemac::Ed25519SecretKey;

    fn pair() -> (EstablishedSas, EstablishedSas) {
        let a = Sas::new();
        let b = Sas::new();
        let (ak, bk) = (a.public_key(), b.public_key());
        (a.diffie_hellman(bk).unwrap(), b.diffie_hellman(ak).unwrap())
    }

    #[test]
    fn emoji_and_decimal_edges() {
        // vodozemac src/sas.rs tests `emoji_generation`, `decimal_generation`.
        assert_eq!(emoji_indices(&[0; 6]), [0; 7]);
        assert_eq!(emoji_indices(&[0xFF; 6]), [63; 7]);
        assert_eq!(decimals(&[0; 6]), [1000; 3]);
        assert_eq!(decimals(&[0xFF; 6]), [9191; 3]);
        assert_eq!(emoji_for(&[0xFF; 6])[0].description, "Pin");
    }

    #[test]
    fn matches_vodozemac_sas_bytes() {
        let (a, b) = pair();
        let bytes = a.bytes("info");
        assert_eq!(bytes, b.bytes("info"));
        assert_eq!(emoji_indices(bytes.as_bytes()), bytes.emoji_indices());
        let (d1, d2, d3) = bytes.decimals();
        assert_eq!(decimals(bytes.as_bytes()), [d1, d2, d3]);
    }

    #[test]
    fn mac_method_choice_prefers_v2() {
        assert_eq!(
            MacMethod::choose([MAC_LEGACY, MAC_V2]),
            Some((MacMethod::HkdfHmacSha256V2, MAC_V2))
        );
        assert_eq!(
            MacMethod::choose([MAC_V2_UNSTABLE, MAC_LEGACY]),
            Some((MacMethod::HkdfHmacSha256V2, MAC_V2_UNSTABLE))
        );
        assert_eq!(
            MacMethod::choose([MAC_V2_UNSTABLE, MAC_V2]),
            Some((MacMethod::HkdfHmacSha256V2, MAC_V2))
        );
        assert_eq!(
            MacMethod::choose([MAC_LEGACY, "hmac-sha256"]),
            Some((MacMethod::HkdfHmacSha256Legacy, MAC_LEGACY))
        );
        assert_eq!(MacMethod::choose(["hmac-sha256"]), None);
    }

    #[test]
    fn mac_method_check_of_the_accepted_choice() {
        let v2 = Some(MacMethod::HkdfHmacSha256V2);
        let legacy = Some(MacMethod::HkdfHmacSha256Legacy);
        assert_eq!(MacMethod::check_choice([MAC_V2, MAC_LEGACY], MAC_V2), v2);
        // Legacy although v2 was offered: a downgrade.
        assert_eq!(MacMethod::check_choice([MAC_V2, MAC_LEGACY], MAC_LEGACY), None);
        assert_eq!(MacMethod::check_choice([MAC_V2_UNSTABLE, MAC_LEGACY], MAC_LEGACY), None);
        // Legacy is fine when it was all that was offered.
        assert_eq!(MacMethod::check_choice([MAC_LEGACY], MAC_LEGACY), legacy);
        // Either name of v2, but only one that was offered.
        assert_eq!(MacMethod::check_choice([MAC_V2, MAC_V2_UNSTABLE], MAC_V2_UNSTABLE), v2);
        assert_eq!(MacMethod::check_choice([MAC_V2, MAC_LEGACY], MAC_V2_UNSTABLE), None);
        assert_eq!(MacMethod::check_choice([MAC_LEGACY], MAC_V2), None);
        assert_eq!(MacMethod::check_choice(["hmac-sha256"], "hmac-sha256"), None);
    }

    struct Fixture {
        alice: EstablishedSas,
        bob: EstablishedSas,
        expected: ExpectedKeys,
        device_key: Ed25519PublicKey,
        master_key: Ed25519PublicKey,
        prefix: String,
    }

    fn fixture() -> Fixture {
        let (alice, bob) = pair();
        let device_key = Ed25519SecretKey::new().public_key();
        let master_key = Ed25519SecretKey::new().public_key();
        let alice_user = UserId::parse("@alice:hs").unwrap();
        let bob_user = UserId::parse("@bob:hs").unwrap();
        let prefix = mac_info_prefix(
            &alice_user,
            &DeviceId::parse("ALICE").unwrap(),
            &bob_user,
            &DeviceId::parse("BOB").unwrap(),
            "txn",
        );
        let expected = ExpectedKeys {
            device_id: DeviceId::parse("ALICE").unwrap(),
            device_key,
            master_key: Some(master_key),
            cross_signing_key_ids: vec![format!("ed25519:{}", master_key.to_base64())],
        };
        Fixture { alice, bob, expected, device_key, master_key, prefix }
    }

    fn alice_keys(f: &Fixture) -> Vec<(String, String)> {
        vec![
            ("ed25519:ALICE".into(), f.device_key.to_base64()),
            (format!("ed25519:{}", f.master_key.to_base64()), f.master_key.to_base64()),
        ]
    }

    #[test]
    fn mac_round_trip_both_methods() {
        let f = fixture();
        for method in [MacMethod::HkdfHmacSha256V2, MacMethod::HkdfHmacSha256Legacy] {
            let (mac, keys) = mac_fields(&f.alice, method, &f.prefix, &alice_keys(&f));
            let v =
                verify_mac_content(&f.bob, method, &f.prefix, &f.expected, &mac, &keys).unwrap();
            assert_eq!(v.device_key, Some(f.device_key));
            assert_eq!(v.master_key, Some(f.master_key));
            // The other method does not verify.
            let other = match method {
                MacMethod::HkdfHmacSha256V2 => MacMethod::HkdfHmacSha256Legacy,
                MacMethod::HkdfHmacSha256Legacy => MacMethod::HkdfHmacSha256V2,
            };
            assert_eq!(
                verify_mac_content(&f.bob, other, &f.prefix, &f.expected, &mac, &keys),
                Err(CancelCode::KeyMismatch)
            );
        }
    }

    #[test]
    fn mac_mismatch_is_key_mismatch() {
        let f = fixture();
        let m = MacMethod::HkdfHmacSha256V2;
        // A MAC over a different device key (a MITM's).
        let evil = Ed25519SecretKey::new().public_key();
        let (mac, keys) =
            mac_fields(&f.alice, m, &f.prefix, &[("ed25519:ALICE".into(), evil.to_base64())]);
        assert_eq!(
            verify_mac_content(&f.bob, m, &f.prefix, &f.expected, &mac, &keys),
            Err(CancelCode::KeyMismatch)
        );
        // A different shared secret (the MITM's own SAS).
        let (mitm, _) = pair();
        let (mac, keys) = mac_fields(&mitm, m, &f.prefix, &alice_keys(&f));
        assert_eq!(
            verify_mac_content(&f.bob, m, &f.prefix, &f.expected, &mac, &keys),
            Err(CancelCode::KeyMismatch)
        );
        // The receiver's info order (receiver first) does not verify.
        let swapped = mac_info_prefix(
            &UserId::parse("@bob:hs").unwrap(),
            &DeviceId::parse("BOB").unwrap(),
            &UserId::parse("@alice:hs").unwrap(),
            &DeviceId::parse("ALICE").unwrap(),
            "txn",
        );
        let (mac, keys) = mac_fields(&f.alice, m, &swapped, &alice_keys(&f));
        assert_eq!(
            verify_mac_content(&f.bob, m, &f.prefix, &f.expected, &mac, &keys),
            Err(CancelCode::KeyMismatch)
        );
    }

    #[test]
    fn key_outside_the_maced_set_is_rejected() {
        let f = fixture();
        let m = MacMethod::HkdfHmacSha256V2;
        // Alice MACs only her device key; an attacker adds a master-key entry
        // afterwards (with a correct per-key MAC it cannot make anyway): the
        // `keys` MAC no longer covers the key list.
        let (mut mac, keys) = mac_fields(&f.alice, m, &f.prefix, &alice_keys(&f)[..1]);
        let (full, _) = mac_fields(&f.alice, m, &f.prefix, &alice_keys(&f));
        let master_id = format!("ed25519:{}", f.master_key.to_base64());
        mac.insert(master_id.clone(), full[&master_id].clone());
        assert_eq!(
            verify_mac_content(&f.bob, m, &f.prefix, &f.expected, &mac, &keys),
            Err(CancelCode::KeyMismatch)
        );
        // Dropping an entry fails the same way.
        let (mut mac, keys) = mac_fields(&f.alice, m, &f.prefix, &alice_keys(&f));
        mac.remove(&master_id);
        assert_eq!(
            verify_mac_content(&f.bob, m, &f.prefix, &f.expected, &mac, &keys),
            Err(CancelCode::KeyMismatch)
        );
        // A key not fixed at the start (a device key that appeared later) is
        // never reported verified, and alone it verifies nothing.
        let late = Ed25519SecretKey::new().public_key();
        let (mac, keys) =
            mac_fields(&f.alice, m, &f.prefix, &[("ed25519:LATE".into(), late.to_base64())]);
        assert_eq!(
            verify_mac_content(&f.bob, m, &f.prefix, &f.expected, &mac, &keys),
            Err(CancelCode::KeyMismatch)
        );
    }

    #[test]
    fn device_id_equal_to_cross_signing_key_id_is_refused() {
        let f = fixture();
        let m = MacMethod::HkdfHmacSha256V2;
        // The device calls itself after the master key.
        let master_b64 = f.master_key.to_base64();
        let expected = ExpectedKeys {
            device_id: DeviceId::parse(master_b64.clone()).unwrap(),
            device_key: f.master_key,
            master_key: Some(f.master_key),
            cross_signing_key_ids: vec![format!("ed25519:{master_b64}")],
        };
        let (mac, keys) = mac_fields(
            &f.alice,
            m,
            &f.prefix,
            &[(format!("ed25519:{master_b64}"), master_b64.clone())],
        );
        assert_eq!(
            verify_mac_content(&f.bob, m, &f.prefix, &expected, &mac, &keys),
            Err(CancelCode::KeyMismatch)
        );
    }

    #[test]
    fn commitment_depends_on_key_and_content() {
        let content = json!({"a": 1});
        let c = commitment("key", &content).unwrap();
        assert_ne!(c, commitment("kez", &content).unwrap());
        assert_ne!(c, commitment("key", &json!({"a": 2})).unwrap());
        assert!(commitment("key", &json!({"a": 1.5})).is_err());
    }
}
