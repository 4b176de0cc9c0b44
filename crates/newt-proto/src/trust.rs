//! Trust decisions, in one place.
//!
//! Until cross-signing lands, trust is the user's local decision about a
//! device ([`LocalTrust`]). Every other module asks here; none decides on
//! its own.

use serde::{Deserialize, Serialize};

use crate::ids::UserId;
use crate::records::{DeviceRecord, InboundGroupSessionRecord, LocalTrust, SessionSource};

/// What we know about who sent a decrypted room event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SenderTrust {
    /// The sending device is one the user verified.
    Verified,
    /// The sending device is known and owns the session, but is not verified.
    Unverified,
    /// The session's creator is not among the sender's known devices (yet).
    UnknownDevice,
    /// The key came from a forward, an export or a backup, so the session's
    /// creator cannot be proven; the device may or may not be the sender.
    Unauthenticated,
}

/// Whether `device` is one of our own devices that we trust enough to answer
/// its key requests and accept keys it forwards: our own user, not our own
/// device, verified by the user. (Cross-signing will widen this.)
pub fn is_trusted_own_device(
    own_user: &UserId,
    own_device_curve25519: &str,
    device: &DeviceRecord,
) -> bool {
    &device.user_id == own_user
        && device.curve25519 != own_device_curve25519
        && !device.deleted
        && device.local_trust == LocalTrust::Verified
}

/// The trust label for an event decrypted with `session`, given the
/// devices of the event's sender.
pub fn sender_trust(
    session: &InboundGroupSessionRecord,
    sender_devices: &[DeviceRecord],
) -> SenderTrust {
    if session.source != SessionSource::RoomKey {
        return SenderTrust::Unauthenticated;
    }
    let owner = sender_devices.iter().find(|d| {
        d.curve25519 == session.sender_key && d.ed25519 == session.sender_claimed_ed25519
    });
    match owner {
        None => SenderTrust::UnknownDevice,
        Some(d) if d.local_trust == LocalTrust::Verified => SenderTrust::Verified,
        Some(_) => SenderTrust::Unverified,
    }
}
