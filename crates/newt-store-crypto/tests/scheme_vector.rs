//! This crate against `vectors/scheme.json`, the scheme as computed by an
//! independent implementation (`vectors/scheme.py`: Python and OpenSSL).
//! Nothing expected here comes from this crate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use newt_store::StoreError;
use newt_store_crypto::{
    associated_data, unlock, Cipher, Digest, IntegrityRecord, KeyColumn, KeyMaterial, Kind,
    StoreKey,
};
use serde_json::Value;

fn vector() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/scheme.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn unhex(v: &Value) -> Vec<u8> {
    let s = v.as_str().unwrap();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn key32(v: &Value) -> [u8; 32] {
    unhex(v).try_into().unwrap()
}

fn cipher(v: &Value) -> Cipher {
    Cipher::new(&key32(&v["data_key"])).unwrap()
}

fn kind(name: &str) -> Kind {
    match name {
        "user" => Kind::User,
        "device" => Kind::Device,
        "room" => Kind::Room,
        "megolm_session" => Kind::MegolmSession,
        "olm_session" => Kind::OlmSession,
        "sender_key" => Kind::SenderKey,
        "request" => Kind::Request,
        "withheld_session_sender" => Kind::WithheldSender,
        other => panic!("unknown kind {other}"),
    }
}

#[test]
fn lookup_hashes() {
    let v = vector();
    let cipher = cipher(&v);
    let hashes = v["hashes"].as_array().unwrap();
    assert_eq!(hashes.len(), 8, "one per kind");
    for h in hashes {
        let (k, id) = (h["kind"].as_str().unwrap(), h["identifier"].as_str().unwrap());
        assert_eq!(cipher.hash(kind(k), id).to_vec(), unhex(&h["hash"]), "{k}");
    }
    let sender = newt_proto::ids::UserId::parse("@bob:example.org").unwrap();
    let joined = newt_store_crypto::withheld_key("megolm-session-id", &sender);
    assert_eq!(joined, hashes[7]["identifier"].as_str().unwrap());
}

#[test]
fn rows_associated_data_sealed_values_and_digests() {
    let v = vector();
    let cipher = cipher(&v);
    let rows = v["rows"].as_array().unwrap();
    let mut ads = Vec::new();
    for row in rows {
        let blobs: Vec<Vec<u8>> = row["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| if k["tag"] == "b" { unhex(&k["value"]) } else { Vec::new() })
            .collect();
        let keys = row["keys"].as_array().unwrap().iter().zip(&blobs).map(|(k, blob)| {
            match k["tag"].as_str().unwrap() {
                "b" => KeyColumn::Blob(blob),
                "i" => KeyColumn::Integer(k["value"].as_i64().unwrap()),
                "t" => KeyColumn::Text(k["value"].as_str().unwrap()),
                other => panic!("unexpected tag {other}"),
            }
        });
        let ad = associated_data(row["table"].as_str().unwrap(), keys);
        assert_eq!(ad, unhex(&row["associated_data"]));
        let sealed = unhex(&row["sealed"]);
        let plaintext = cipher.open(&ad, &sealed).unwrap();
        assert_eq!(&plaintext[..], row["plaintext"].as_str().unwrap().as_bytes());
        let record: Value = cipher.open_record(&ad, &sealed).unwrap();
        assert_eq!(
            record,
            serde_json::from_str::<Value>(row["plaintext"].as_str().unwrap()).unwrap()
        );
        assert_eq!(cipher.digest_row(&ad, &sealed).to_vec(), unhex(&row["digest"]));
        ads.push((ad, sealed));
    }
    // Each value opens in its own row only.
    assert!(cipher.open(&ads[0].0, &ads[1].1).is_err());
    assert!(cipher.open(&ads[1].0, &ads[0].1).is_err());
}

fn material(v: &Value, which: &str) -> KeyMaterial {
    KeyMaterial {
        kek: v[which]["kek_json"].as_str().unwrap().as_bytes().to_vec(),
        data_key: unhex(&v[which]["wrapped_data_key"]),
        key_check: unhex(&v["key_check"]),
    }
}

#[test]
fn raw_key_unwraps_the_data_key() {
    let v = vector();
    let m = material(&v, "raw");
    let (data_key, _) = unlock(&m, &StoreKey::Raw(key32(&v["raw"]["key"]))).unwrap();
    assert_eq!(data_key.to_vec(), unhex(&v["data_key"]));
    let mut wrong = key32(&v["raw"]["key"]);
    wrong[0] ^= 1;
    assert!(matches!(unlock(&m, &StoreKey::Raw(wrong)), Err(StoreError::WrongKey)));
}

#[test]
fn passphrase_unwraps_the_data_key() {
    let v = vector();
    let m = material(&v, "passphrase");
    let passphrase = v["passphrase"]["passphrase"].as_str().unwrap();
    let (data_key, _) = unlock(&m, &StoreKey::Passphrase(passphrase.into())).unwrap();
    assert_eq!(data_key.to_vec(), unhex(&v["data_key"]));
    let wrong = StoreKey::Passphrase(format!("{passphrase}!"));
    assert!(matches!(unlock(&m, &wrong), Err(StoreError::WrongKey)));
}

#[test]
fn integrity_record() {
    let v = vector();
    let cipher = cipher(&v);
    let i = &v["integrity"];
    let tables = i["tables"].as_u64().unwrap() as usize;
    let record = IntegrityRecord::open(&cipher, &unhex(&i["sealed"]), tables).unwrap();
    assert_eq!(record.counter, i["counter"].as_u64().unwrap());
    assert_eq!(record.to_bytes().unwrap(), unhex(&i["bytes"]));
    let digest = |row: usize| Digest::of(key32(&v["rows"][row]["digest"]));
    assert_eq!(record.sum(0).unwrap(), digest(0).wrapping_add(digest(1)));
    assert_eq!(record.sum(1).unwrap(), Digest::default());
    record.check_singleton("sync_token", Some(digest(1))).unwrap();
    assert!(record.check_singleton("sync_token", Some(digest(0))).is_err());
    assert_eq!(record.singleton_names().collect::<Vec<_>>(), ["sync_token"]);
}
