//! The values newt hands to apps: plain views of what it stores, so the
//! public API (and every binding that wraps it) does not depend on storage
//! records.

use newt_proto::ids::{DeviceId, UserId};
use newt_proto::records::{DeviceRecord, LocalTrust};

pub use newt_proto::verification::emoji::Emoji;

/// Another device, as the homeserver announced it (self-signature checked)
/// with the user's decision about it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Device {
    /// The owner.
    pub user_id: UserId,
    /// The device ID.
    pub device_id: DeviceId,
    /// Curve25519 identity key, unpadded base64.
    pub curve25519: String,
    /// Ed25519 fingerprint key, unpadded base64.
    pub ed25519: String,
    /// `unsigned.device_display_name`, if any.
    pub display_name: Option<String>,
    /// The algorithms the device advertises.
    pub algorithms: Vec<String>,
    /// Whether the user verified or blacklisted it here (see
    /// [`Machine::device_trust`](crate::Machine::device_trust) for the
    /// whole verdict, cross-signing included).
    pub local_trust: LocalTrust,
}

impl From<DeviceRecord> for Device {
    fn from(r: DeviceRecord) -> Self {
        Self {
            user_id: r.user_id,
            device_id: r.device_id,
            curve25519: r.curve25519,
            ed25519: r.ed25519,
            display_name: r.display_name,
            algorithms: r.algorithms,
            local_trust: r.local_trust,
        }
    }
}

/// This device's identity keys, unpadded base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityKeys {
    /// The Curve25519 key (Olm).
    pub curve25519: String,
    /// The Ed25519 key (signatures; the device's fingerprint).
    pub ed25519: String,
}
