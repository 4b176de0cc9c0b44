//! Trust decisions, in one place.
//!
//! A device is trusted when the user verified it locally ([`LocalTrust`]) or
//! when it is cross-signed by an identity we verified; the cross-signing
//! chain is evaluated by [`TrustRoot`] (`identities::trust`). Every other
//! module asks here (or the `TrustRoot`); none decides on its own.

use serde::{Deserialize, Serialize};

use crate::identities::{DeviceTrust, TrustRoot};
use crate::ids::UserId;
use crate::records::{DeviceRecord, InboundGroupSessionRecord, LocalTrust, SessionSource};

/// What we know about who sent a decrypted room event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SenderTrust {
    /// The sending device is one the user verified, or it is cross-signed by
    /// its owner's identity and we verified that identity (or it is our own
    /// identity, which this device trusts).
    Verified,
    /// The sending device is known and owns the session, but is not verified.
    Unverified,
    /// The session's creator is not among the sender's known devices (yet).
    UnknownDevice,
    /// The session's creator is a device its owner has since deleted (signed
    /// out): never verified, whatever it was before.
    DeletedDevice,
    /// The key came from a forward, an export or a backup, so the session's
    /// creator cannot be proven; the device may or may not be the sender.
    Unauthenticated,
}

/// Whether `device` is one of our own devices that we trust enough to answer
/// its key requests and accept keys it forwards: our own user, not this
/// device, not deleted, and either verified by the user on this device or
/// cross-signed by our own identity while this device trusts that identity
/// ([`TrustRoot::device_trust`] is verified). A blacklisted device never is.
pub fn is_trusted_own_device(
    root: &TrustRoot<'_>,
    own_user: &UserId,
    own_device_curve25519: &str,
    device: &DeviceRecord,
) -> bool {
    &device.user_id == own_user
        && device.curve25519 != own_device_curve25519
        && !device.deleted
        && root.device_trust(None, device).is_verified()
}

/// Whether a device passes the sharing filter of a cross-signing policy:
/// it was cross-signed by its owner (whatever we think of the owner's
/// identity), or the user verified it here.
pub fn is_cross_signed_or_verified(trust: DeviceTrust) -> bool {
    matches!(
        trust,
        DeviceTrust::LocallyVerified
            | DeviceTrust::CrossSignedByVerifiedOwner
            | DeviceTrust::CrossSignedByPinnedOwner
            | DeviceTrust::CrossSignedByUntrustedOwner
    )
}

/// Widens the label [`sender_trust`] gave with cross-signing: an event from a
/// known device that is not locally verified is [`SenderTrust::Verified`]
/// when `device` (the sending device's [`DeviceTrust`]) is verified through
/// a verified identity. Every other label stays.
pub fn with_cross_signing(base: SenderTrust, device: Option<DeviceTrust>) -> SenderTrust {
    match (base, device) {
        (SenderTrust::Unverified, Some(t)) if t.is_verified() => SenderTrust::Verified,
        (other, _) => other,
    }
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
        Some(d) if d.deleted => SenderTrust::DeletedDevice,
        Some(d) if d.local_trust == LocalTrust::Verified => SenderTrust::Verified,
        Some(_) => SenderTrust::Unverified,
    }
}
