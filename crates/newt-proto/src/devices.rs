//! Other devices: `/keys/query` requests and responses, device-list tracking.
//!
//! Every device in a `/keys/query` response is checked before it is stored:
//! the `user_id`/`device_id` inside the object must match the map keys, both
//! identity keys must be present and well formed, and the object must carry
//! a valid self-signature. A known device whose Ed25519 key changes is
//! rejected (the old record stays). Devices the server no longer lists are
//! marked deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{json, Value};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey};

use crate::account::OwnAccount;
use crate::changes::Changes;
use crate::ids::{DeviceId, UserId};
use crate::json::{strip_padding, verify_json, JsonError};
use crate::records::{DeviceRecord, LocalTrust, TrackedUser};

/// Why a device from the server was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceKeysError {
    /// Not a JSON object, or a required field is missing or of the wrong type.
    #[error("malformed device keys: {0}")]
    Malformed(&'static str),
    /// `user_id`/`device_id` inside the object differ from where it was found.
    #[error("device keys for {inner_user}/{inner_device} listed under {user}/{device}")]
    MismatchedIds {
        /// Map key user.
        user: String,
        /// Map key device.
        device: String,
        /// User inside the object.
        inner_user: String,
        /// Device inside the object.
        inner_device: String,
    },
    /// An identity key is not a valid key.
    #[error("invalid {0} key")]
    InvalidKey(&'static str),
    /// The self-signature is missing or wrong.
    #[error("device keys signature: {0}")]
    Signature(#[from] JsonError),
    /// A known device's Ed25519 key changed: never accepted.
    #[error("the Ed25519 key of known device {user}/{device} changed")]
    SigningKeyChanged {
        /// Owner.
        user: String,
        /// Device.
        device: String,
    },
}

/// Parses and verifies one signed DeviceKeys object found at
/// `device_keys[user_id][device_id]`.
pub fn parse_device_keys(
    user_id: &UserId,
    device_id: &str,
    value: &Value,
) -> Result<DeviceRecord, DeviceKeysError> {
    let obj = value.as_object().ok_or(DeviceKeysError::Malformed("not an object"))?;
    let inner_user =
        obj.get("user_id").and_then(Value::as_str).ok_or(DeviceKeysError::Malformed("user_id"))?;
    let inner_device = obj
        .get("device_id")
        .and_then(Value::as_str)
        .ok_or(DeviceKeysError::Malformed("device_id"))?;
    if inner_user != user_id.as_str() || inner_device != device_id {
        return Err(DeviceKeysError::MismatchedIds {
            user: user_id.to_string(),
            device: device_id.to_owned(),
            inner_user: inner_user.to_owned(),
            inner_device: inner_device.to_owned(),
        });
    }
    let device_id =
        DeviceId::parse(device_id).map_err(|_| DeviceKeysError::Malformed("device_id"))?;
    let algorithms = obj
        .get("algorithms")
        .and_then(Value::as_array)
        .ok_or(DeviceKeysError::Malformed("algorithms"))?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let keys =
        obj.get("keys").and_then(Value::as_object).ok_or(DeviceKeysError::Malformed("keys"))?;
    let curve = keys
        .get(&format!("curve25519:{device_id}"))
        .and_then(Value::as_str)
        .ok_or(DeviceKeysError::Malformed("curve25519 key"))?;
    let ed = keys
        .get(&format!("ed25519:{device_id}"))
        .and_then(Value::as_str)
        .ok_or(DeviceKeysError::Malformed("ed25519 key"))?;
    let curve = Curve25519PublicKey::from_base64(strip_padding(curve))
        .map_err(|_| DeviceKeysError::InvalidKey("curve25519"))?;
    let ed_key = Ed25519PublicKey::from_base64(strip_padding(ed))
        .map_err(|_| DeviceKeysError::InvalidKey("ed25519"))?;
    verify_json(value, user_id, &format!("ed25519:{device_id}"), &ed_key)?;
    let display_name = value
        .get("unsigned")
        .and_then(|u| u.get("device_display_name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(DeviceRecord {
        user_id: user_id.clone(),
        device_id,
        curve25519: curve.to_base64(),
        ed25519: ed_key.to_base64(),
        algorithms,
        display_name,
        keys: Arc::new(value.clone()),
        local_trust: LocalTrust::Unset,
        deleted: false,
    })
}

/// The `/keys/query` body for `users`.
pub fn keys_query_body(users: &BTreeSet<UserId>) -> Value {
    let map: serde_json::Map<String, Value> =
        users.iter().map(|u| (u.to_string(), json!([]))).collect();
    json!({ "device_keys": map })
}

/// A device the server sent that we refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedDevice {
    /// Owner as listed by the server.
    pub user_id: String,
    /// Device as listed by the server.
    pub device_id: String,
    /// Why.
    pub error: DeviceKeysError,
}

/// What a `/keys/query` response changed.
#[derive(Debug, Default)]
pub struct KeysQueryOutcome {
    /// State to persist.
    pub changes: Changes,
    /// Devices that failed a check (not stored).
    pub rejected: Vec<RejectedDevice>,
    /// Devices seen for the first time.
    pub new_devices: Vec<(UserId, DeviceId)>,
    /// Devices the server no longer lists.
    pub deleted_devices: Vec<(UserId, DeviceId)>,
}

/// A `/keys/query` response that is not even the right shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed /keys/query response: {0}")]
pub struct KeysQueryError(pub &'static str);

/// Applies a `/keys/query` response for `queried` users.
///
/// `known` holds the stored devices of every queried user. Users the
/// response does not mention (e.g. `failures`) stay outdated; users it
/// lists that we did not ask for are ignored.
pub fn handle_keys_query(
    own: &OwnAccount,
    queried: &BTreeSet<UserId>,
    known: &BTreeMap<UserId, Vec<DeviceRecord>>,
    response: &Value,
) -> Result<KeysQueryOutcome, KeysQueryError> {
    let mut out = KeysQueryOutcome::default();
    let device_keys = match response.get("device_keys") {
        None | Some(Value::Null) => &serde_json::Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(KeysQueryError("device_keys is not an object")),
    };
    let mut users = Vec::new();
    for (user_str, devices) in device_keys {
        let Ok(user_id) = UserId::parse(user_str.as_str()) else { continue };
        if queried.contains(&user_id) {
            users.push((user_str, user_id, devices.as_object()));
        }
    }
    // The signature checks (one Ed25519 verification per device) first, on
    // every core; then everything else in response order.
    let jobs: Vec<(&UserId, &String, &Value)> = users
        .iter()
        .filter_map(|(_, user_id, devices)| devices.map(|d| (user_id, d)))
        .flat_map(|(user_id, devices)| devices.iter().map(move |(d, v)| (user_id, d, v)))
        .collect();
    let mut parsed = crate::parallel::map(&jobs, 16, |(user_id, device_str, value)| {
        parse_device_keys(user_id, device_str, value)
    })
    .into_iter();
    for (user_str, user_id, devices) in users {
        let Some(devices) = devices else {
            out.rejected.push(RejectedDevice {
                user_id: user_str.clone(),
                device_id: String::new(),
                error: DeviceKeysError::Malformed("device map"),
            });
            continue;
        };
        let empty = Vec::new();
        let stored = known.get(&user_id).unwrap_or(&empty);
        let mut seen = BTreeSet::new();
        // `zip` asks `devices` first, so `parsed` stays aligned with it.
        for ((device_str, _), parsed) in devices.iter().zip(parsed.by_ref()) {
            seen.insert(device_str.clone());
            let reject = |error| RejectedDevice {
                user_id: user_str.clone(),
                device_id: device_str.clone(),
                error,
            };
            let mut device = match parsed {
                Ok(d) => d,
                Err(e) => {
                    out.rejected.push(reject(e));
                    continue;
                }
            };
            if &user_id == own.user_id() && device.device_id == *own.device_id() {
                // Our own device must carry our own keys; it is not stored.
                if device.ed25519 != own.ed25519_key().to_base64()
                    || device.curve25519 != own.curve25519_key().to_base64()
                {
                    out.rejected.push(reject(DeviceKeysError::SigningKeyChanged {
                        user: user_str.clone(),
                        device: device_str.clone(),
                    }));
                }
                continue;
            }
            match stored.iter().find(|d| d.device_id == device.device_id) {
                Some(old) if old.ed25519 != device.ed25519 => {
                    out.rejected.push(reject(DeviceKeysError::SigningKeyChanged {
                        user: user_str.clone(),
                        device: device_str.clone(),
                    }));
                    continue;
                }
                Some(old) => {
                    device.local_trust = old.local_trust;
                    if old == &device {
                        continue;
                    }
                }
                None => out.new_devices.push((user_id.clone(), device.device_id.clone())),
            }
            out.changes.devices.push(device);
        }
        for old in stored {
            if !old.deleted && !seen.contains(old.device_id.as_str()) {
                let mut gone = old.clone();
                gone.deleted = true;
                out.deleted_devices.push((gone.user_id.clone(), gone.device_id.clone()));
                out.changes.devices.push(gone);
            }
        }
        out.changes.tracked_users.push(TrackedUser { user_id, outdated: false });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> OwnAccount {
        OwnAccount::new(UserId::parse("@me:hs").unwrap(), DeviceId::parse("ME").unwrap())
    }

    fn other(user: &str, device: &str) -> (OwnAccount, Value) {
        let a = OwnAccount::new(UserId::parse(user).unwrap(), DeviceId::parse(device).unwrap());
        let k = a.device_keys();
        (a, k)
    }

    fn response(entries: &[(&str, &str, Value)]) -> Value {
        let mut dk = serde_json::Map::new();
        for (u, d, v) in entries {
            dk.entry(u.to_string()).or_insert_with(|| json!({}))[d] = v.clone();
        }
        json!({ "device_keys": dk })
    }

    #[test]
    fn accepts_valid_rejects_forged_and_mismatched() {
        let me = own();
        let bob = UserId::parse("@bob:hs").unwrap();
        let (_, good) = other("@bob:hs", "B1");
        let (_, mut forged) = other("@bob:hs", "B2");
        forged["keys"]["curve25519:B2"] = json!(me.curve25519_key().to_base64());
        let (_, wrong_place) = other("@bob:hs", "B3");
        let resp = response(&[
            ("@bob:hs", "B1", good),
            ("@bob:hs", "B2", forged),
            ("@bob:hs", "B4", wrong_place),
        ]);
        let out = handle_keys_query(&me, &[bob.clone()].into(), &BTreeMap::new(), &resp).unwrap();
        assert_eq!(out.changes.devices.len(), 1);
        assert_eq!(out.changes.devices[0].device_id.as_str(), "B1");
        assert_eq!(out.rejected.len(), 2);
        assert!(out.rejected.iter().any(|r| r.device_id == "B2"
            && matches!(r.error, DeviceKeysError::Signature(JsonError::BadSignature { .. }))));
        assert!(out.rejected.iter().any(
            |r| r.device_id == "B4" && matches!(r.error, DeviceKeysError::MismatchedIds { .. })
        ));
        assert_eq!(out.changes.tracked_users, vec![TrackedUser { user_id: bob, outdated: false }]);
    }

    /// Enough devices for the signature checks to run on several threads
    /// (four, whatever the machine's cores): each verdict still lands on its
    /// own device.
    #[test]
    fn many_devices_each_keep_their_own_verdict() {
        let _cap = crate::parallel::CAP_FOR_TESTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::parallel::set_max_threads(4);
        let me = own();
        let users: Vec<String> = (0..3).map(|u| format!("@user{u}:hs")).collect();
        let mut entries = Vec::new();
        for (u, user) in users.iter().enumerate() {
            for d in 0..20 {
                let device = format!("D{u}x{d}");
                let (_, mut keys) = other(user, &device);
                if (u, d) == (1, 13) || (u, d) == (2, 19) {
                    keys["keys"][format!("curve25519:{device}")] =
                        json!(me.curve25519_key().to_base64());
                }
                entries.push((user.as_str(), device, keys));
            }
        }
        let entries: Vec<(&str, &str, Value)> =
            entries.iter().map(|(u, d, v)| (*u, d.as_str(), v.clone())).collect();
        let queried: BTreeSet<UserId> = users.iter().map(|u| UserId::parse(u).unwrap()).collect();
        let out = handle_keys_query(&me, &queried, &BTreeMap::new(), &response(&entries)).unwrap();
        let mut rejected: Vec<&str> = out.rejected.iter().map(|r| r.device_id.as_str()).collect();
        rejected.sort_unstable();
        assert_eq!(rejected, ["D1x13", "D2x19"]);
        assert_eq!(out.changes.devices.len(), 58);
        for d in &out.changes.devices {
            let (_, _, sent) =
                entries.iter().find(|(_, id, _)| *id == d.device_id.as_str()).unwrap();
            assert_eq!(d.user_id.as_str(), sent["user_id"]);
            assert_eq!(*d.keys, *sent, "{} kept its own keys", d.device_id);
        }
    }

    #[test]
    fn signing_key_change_rejected_and_missing_marked_deleted() {
        let me = own();
        let bob = UserId::parse("@bob:hs").unwrap();
        let (_, first) = other("@bob:hs", "B1");
        let (_, second) = other("@bob:hs", "B2");
        let queried: BTreeSet<_> = [bob.clone()].into();
        let out = handle_keys_query(
            &me,
            &queried,
            &BTreeMap::new(),
            &response(&[("@bob:hs", "B1", first.clone()), ("@bob:hs", "B2", second)]),
        )
        .unwrap();
        let known = BTreeMap::from([(bob.clone(), out.changes.devices.clone())]);
        // B1 comes back with new keys (a new account reusing the device ID); B2 is gone.
        let (_, replaced) = other("@bob:hs", "B1");
        let out =
            handle_keys_query(&me, &queried, &known, &response(&[("@bob:hs", "B1", replaced)]))
                .unwrap();
        assert!(matches!(out.rejected[0].error, DeviceKeysError::SigningKeyChanged { .. }));
        assert_eq!(out.deleted_devices, vec![(bob.clone(), DeviceId::parse("B2").unwrap())]);
        assert!(out.changes.devices.iter().all(|d| d.device_id.as_str() == "B2" && d.deleted));
    }

    #[test]
    fn unrequested_users_and_bad_shapes_ignored() {
        let me = own();
        let (_, eve) = other("@eve:hs", "E1");
        let out = handle_keys_query(
            &me,
            &BTreeSet::new(),
            &BTreeMap::new(),
            &response(&[("@eve:hs", "E1", eve)]),
        )
        .unwrap();
        assert!(out.changes.devices.is_empty());
        assert!(handle_keys_query(
            &me,
            &BTreeSet::new(),
            &BTreeMap::new(),
            &json!({"device_keys": 3})
        )
        .is_err());
    }
}
