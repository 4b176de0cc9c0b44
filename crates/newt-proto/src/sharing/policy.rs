//! Who gets a room key: the sharing policy, evaluated in one place, and
//! when an outbound session must rotate because its audience shrank.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::account::OwnAccount;
use crate::identities::DeviceTrust;
use crate::ids::UserId;
use crate::megolm::OutboundSession;
use crate::records::{DeviceRecord, LocalTrust};
use crate::trust::is_cross_signed_or_verified;
use crate::MEGOLM_V1;

/// Which devices of the room's members receive room keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SharingPolicy {
    /// Every device of every member, even ones the user blacklisted.
    AllDevices,
    /// Every device except the ones the user blacklisted (which get
    /// `m.blacklisted`). The default.
    #[default]
    ExcludeBlacklisted,
    /// Only devices cross-signed by their owner (whether or not we verified
    /// the owner) or verified by the user here; other devices get
    /// `m.unverified`, blacklisted ones `m.blacklisted`.
    CrossSignedOnly,
    /// Only verified devices (locally, or cross-signed by an identity we
    /// verified); other devices get `m.unverified`, blacklisted ones
    /// `m.blacklisted`.
    VerifiedOnly,
}

impl SharingPolicy {
    /// Whether the policy looks at cross-signing (the driver then computes
    /// each device's [`DeviceTrust`]; otherwise it may skip that work).
    pub fn needs_device_trust(self) -> bool {
        matches!(self, Self::CrossSignedOnly | Self::VerifiedOnly)
    }
}

/// Codes of `m.room_key.withheld`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WithheldCode {
    /// The user blacklisted the device.
    Blacklisted,
    /// The device is not verified (or not cross-signed).
    Unverified,
    /// No Olm session could be established.
    NoOlm,
    /// Answer to a key request we will not serve.
    Unavailable,
    /// The requester is not allowed to have the key.
    Unauthorised,
}

impl WithheldCode {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blacklisted => "m.blacklisted",
            Self::Unverified => "m.unverified",
            Self::NoOlm => "m.no_olm",
            Self::Unavailable => "m.unavailable",
            Self::Unauthorised => "m.unauthorised",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::Blacklisted => "The sender has blocked you.",
            Self::Unverified => "The sender has disabled encrypting to unverified devices.",
            Self::NoOlm => "Unable to establish a secure channel.",
            Self::Unavailable => "The requested key was not found.",
            Self::Unauthorised => "You are not authorised to read the message.",
        }
    }
}

/// What to do with each device for one share round.
#[derive(Debug, Default)]
pub struct SharePlan {
    /// Devices to send the room key to (over Olm).
    pub share: Vec<DeviceRecord>,
    /// Devices to tell that the key is withheld, and why.
    pub withhold: Vec<(DeviceRecord, WithheldCode)>,
}

/// Decides, for the devices of the room's members, who gets the key of
/// `outbound` now. Devices that already have it (same Curve25519 key) or
/// were already told it is withheld are skipped; so is this device.
/// `device_trust` is only asked under policies that
/// [need it](SharingPolicy::needs_device_trust).
pub fn plan_share(
    own: &OwnAccount,
    outbound: &OutboundSession,
    devices: &[DeviceRecord],
    has_olm_session: impl Fn(&DeviceRecord) -> bool,
    device_trust: impl Fn(&DeviceRecord) -> DeviceTrust,
    policy: SharingPolicy,
) -> SharePlan {
    let mut plan = SharePlan::default();
    let own_curve = own.curve25519_key().to_base64();
    for d in devices {
        if d.deleted || d.curve25519 == own_curve {
            continue;
        }
        let already_shared = outbound
            .meta
            .shared_with
            .get(&d.user_id)
            .and_then(|m| m.get(&d.device_id))
            .is_some_and(|s| s.sender_key == d.curve25519);
        let already_withheld =
            outbound.meta.withheld_to.get(&d.user_id).is_some_and(|m| m.contains_key(&d.device_id));
        if already_shared || already_withheld {
            continue;
        }
        let code = match excluded_by_policy(d, &device_trust, policy) {
            None if !has_olm_session(d) => Some(WithheldCode::NoOlm),
            other => other,
        };
        match code {
            Some(code) => plan.withhold.push((d.clone(), code)),
            None => plan.share.push(d.clone()),
        }
    }
    plan
}

/// Why `policy` keeps the key from `d`, if it does: the withheld code.
/// `device_trust` is only asked under policies that
/// [need it](SharingPolicy::needs_device_trust).
pub fn excluded_by_policy(
    d: &DeviceRecord,
    device_trust: impl Fn(&DeviceRecord) -> DeviceTrust,
    policy: SharingPolicy,
) -> Option<WithheldCode> {
    match policy {
        SharingPolicy::AllDevices => None,
        _ if d.local_trust == LocalTrust::Blacklisted => Some(WithheldCode::Blacklisted),
        SharingPolicy::ExcludeBlacklisted => None,
        SharingPolicy::CrossSignedOnly => {
            (!is_cross_signed_or_verified(device_trust(d))).then_some(WithheldCode::Unverified)
        }
        SharingPolicy::VerifiedOnly => {
            (!device_trust(d).is_verified()).then_some(WithheldCode::Unverified)
        }
    }
}

/// Whether `outbound` must be replaced because someone who holds its key may
/// no longer read the room: a user who is not a member any more, a device
/// that was deleted or whose identity key changed, or a device that `policy`
/// now excludes (blacklisted, or no longer verified / cross-signed, e.g.
/// after an identity change) although it got the key before. Without this,
/// such a device would read every message until the session expires.
pub fn audience_shrank(
    outbound: &OutboundSession,
    members: &BTreeSet<UserId>,
    devices: &BTreeMap<UserId, Vec<DeviceRecord>>,
    device_trust: impl Fn(&DeviceRecord) -> DeviceTrust,
    policy: SharingPolicy,
) -> bool {
    outbound.meta.shared_with.iter().any(|(user, shared)| {
        if !members.contains(user) {
            return true;
        }
        let current = devices.get(user).map(Vec::as_slice).unwrap_or(&[]);
        shared.iter().any(|(device_id, info)| {
            let still_there = current.iter().find(|d| {
                &d.device_id == device_id && !d.deleted && d.curve25519 == info.sender_key
            });
            match still_there {
                None => true,
                Some(d) => excluded_by_policy(d, &device_trust, policy).is_some(),
            }
        })
    })
}

/// The `m.room_key.withheld` content for a session (or, for `m.no_olm`, for
/// the device as a whole).
pub fn withheld_content(own: &OwnAccount, outbound: &OutboundSession, code: WithheldCode) -> Value {
    let mut c = json!({
        "algorithm": MEGOLM_V1,
        "sender_key": own.curve25519_key().to_base64(),
        "code": code.as_str(),
        "reason": code.reason(),
        "from_device": own.device_id(),
    });
    if code != WithheldCode::NoOlm {
        c["room_id"] = json!(outbound.meta.room_id);
        c["session_id"] = json!(outbound.session_id());
    }
    c
}
