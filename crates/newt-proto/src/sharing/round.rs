//! One round of room key sharing, composed from what the driver loaded:
//! the verification-violation gate, rotation, the plan, Olm encryption on
//! every core, withheld notices, and afterwards the record of who got the
//! key.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;

use crate::account::OwnAccount;
use crate::changes::Changes;
use crate::identities::{DeviceTrust, IdentityTrust, TrustRoot, UserIdentity};
use crate::ids::{DeviceId, RoomId, UserId};
use crate::megolm::{OutboundSession, RotationSettings};
use crate::olm::{self, OlmError, OlmPlaintext, OlmSession};
use crate::parallel;
use crate::records::{DeviceRecord, OlmSessionRecord, OutboundGroupSessionRecord, ShareInfo};

use super::policy::{audience_shrank, plan_share, withheld_content, SharingPolicy, WithheldCode};

/// Room settings for sharing and encrypting.
#[derive(Debug, Clone, Default)]
pub struct RoomSettings {
    /// Rotation periods from `m.room.encryption`.
    pub rotation: RotationSettings,
    /// Who gets the room key.
    pub policy: SharingPolicy,
    /// `shared_history` for new keys (history visibility `shared`/`world_readable`).
    pub shared_history: bool,
    /// Refuse to share (with [`ShareError::VerificationViolation`]; `newt`'s
    /// `Error::VerificationViolation`) while a member whose identity we
    /// verified has a changed, unacknowledged identity
    /// ([`IdentityTrust::VerificationViolation`]). When unset, a violation
    /// is only reported (`newt`'s `Machine::user_identity_state`).
    pub block_on_verification_violation: bool,
}

impl RoomSettings {
    /// Whether [`share`] needs the members' [`MemberTrust`]: the policy
    /// looks at cross-signing, or a verification violation blocks sharing.
    /// Otherwise the driver skips reading identities and private keys.
    pub fn needs_trust(&self) -> bool {
        self.policy.needs_device_trust() || self.block_on_verification_violation
    }
}

/// What trust decisions in a share are made from: our [`TrustRoot`] and the
/// stored identities of the members (those we have; ours is not needed).
#[derive(Debug, Clone, Copy)]
pub struct MemberTrust<'a> {
    /// Our side of the cross-signing chain.
    pub root: &'a TrustRoot<'a>,
    /// The members' identities, by user.
    pub identities: &'a BTreeMap<UserId, UserIdentity>,
}

/// What [`share`] works from: the driver's reads for one room.
#[derive(Debug)]
pub struct ShareInput<'a> {
    /// The room.
    pub room_id: &'a RoomId,
    /// Its members (everyone who may read the room now).
    pub members: &'a BTreeSet<UserId>,
    /// The members' stored devices (others are ignored).
    pub devices: Vec<DeviceRecord>,
    /// The stored outbound session of the room, if any: the store's record,
    /// not a cached copy, so that other processes' writes count.
    pub stored: Option<OutboundGroupSessionRecord>,
    /// The stored Olm sessions of the devices' Curve25519 keys
    /// ([`recipient_keys`]).
    pub olm_sessions: Vec<OlmSessionRecord>,
    /// Required when [`RoomSettings::needs_trust`]; ignored otherwise.
    pub trust: Option<MemberTrust<'a>>,
    /// The room's settings.
    pub settings: &'a RoomSettings,
}

/// The distinct Curve25519 keys of `devices`: whose Olm sessions [`share`]
/// needs ([`ShareInput::olm_sessions`]).
pub fn recipient_keys(devices: &[DeviceRecord]) -> Vec<&str> {
    let keys: BTreeSet<&str> = devices.iter().map(|d| d.curve25519.as_str()).collect();
    keys.into_iter().collect()
}

/// A device sent the room key, to record once the message went out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDelivery {
    /// Its owner.
    pub user_id: UserId,
    /// The device.
    pub device_id: DeviceId,
    /// The Curve25519 key the room key was encrypted to.
    pub sender_key: String,
    /// The first message index the device can decrypt.
    pub message_index: u32,
}

/// A device told that the room key is withheld from it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithheldDelivery {
    /// Its owner.
    pub user_id: UserId,
    /// The device.
    pub device_id: DeviceId,
    /// Why.
    pub code: WithheldCode,
}

/// One share round: commit [`changes`](Share::changes), then send the
/// messages; when all were sent, [`record_delivery`].
pub struct Share {
    /// The room's outbound session as `changes` writes it: an update is one
    /// generation past the stored record, a new session is generation 0.
    pub outbound: OutboundSession,
    /// The advanced Olm sessions, the outbound session and, for a new
    /// session, our own inbound copy of it.
    pub changes: Changes,
    /// `m.room.encrypted` contents carrying the key, one per device.
    pub room_keys: Vec<(KeyDelivery, Value)>,
    /// `m.room_key.withheld` contents, one per device.
    pub withheld: Vec<(WithheldDelivery, Value)>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("session_id", &self.outbound.session_id())
            .field("generation", &self.outbound.meta.generation)
            .field("room_keys", &self.room_keys.len())
            .field("withheld", &self.withheld.len())
            .finish_non_exhaustive()
    }
}

/// Why a share did not happen (nothing to commit, nothing to send).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// The settings block on a verification violation and these members'
    /// identities changed after we verified them (the user's to resolve:
    /// acknowledge or verify again).
    #[error("identity verification violated for {0:?}")]
    VerificationViolation(Vec<UserId>),
    /// The settings need trust and the caller gave none (the caller's bug).
    #[error("the room settings need trust and none was given")]
    TrustMissing,
    /// Olm encryption failed (a bug: nothing from outside can cause it).
    #[error("Olm encryption failed: {0}")]
    Encryption(OlmError),
}

/// Shares the room key of `input.room_id` with the members' devices, as
/// `input.settings` say, at `now`.
///
/// - With [`block_on_verification_violation`](RoomSettings::block_on_verification_violation),
///   any member in [`IdentityTrust::VerificationViolation`] stops the
///   share ([`ShareError::VerificationViolation`], listing them).
/// - The stored session is kept (one generation on) unless it expired or
///   its audience shrank ([`audience_shrank`]); otherwise a new one starts
///   at generation 0 and our own inbound copy goes into the changes.
/// - Devices that have the key or were told it is withheld are skipped
///   ([`plan_share`]); the others get the key over their preferred Olm
///   session (encrypted on every core) or a withheld notice.
pub fn share(own: &OwnAccount, input: ShareInput<'_>, now: u64) -> Result<Share, ShareError> {
    let ShareInput { room_id, members, devices, stored, olm_sessions, trust, settings } = input;
    let mut devices_by_user: BTreeMap<UserId, Vec<DeviceRecord>> =
        members.iter().map(|u| (u.clone(), Vec::new())).collect();
    for d in devices {
        if let Some(list) = devices_by_user.get_mut(&d.user_id) {
            list.push(d);
        }
    }
    let device_trust = if settings.needs_trust() {
        let trust = trust.ok_or(ShareError::TrustMissing)?;
        if settings.block_on_verification_violation {
            let violating: Vec<UserId> = trust
                .identities
                .iter()
                .filter(|(user, i)| {
                    members.contains(*user)
                        && trust.root.identity_trust(i) == IdentityTrust::VerificationViolation
                })
                .map(|(user, _)| user.clone())
                .collect();
            if !violating.is_empty() {
                return Err(ShareError::VerificationViolation(violating));
            }
        }
        let mut by_device = BTreeMap::new();
        if settings.policy.needs_device_trust() {
            for d in devices_by_user.values().flatten() {
                let t = trust.root.device_trust(trust.identities.get(&d.user_id), d);
                by_device.insert((d.user_id.clone(), d.device_id.clone()), t);
            }
        }
        by_device
    } else {
        BTreeMap::new()
    };
    let trust_of = |d: &DeviceRecord| {
        device_trust
            .get(&(d.user_id.clone(), d.device_id.clone()))
            .copied()
            .unwrap_or(DeviceTrust::Unknown)
    };

    let mut changes = Changes::default();
    // An update is one generation past the stored record; a new session
    // starts at generation 0 (the store's rule for outbound sessions).
    let kept = stored.map(OutboundSession::from_record).filter(|s| {
        !s.expired(&settings.rotation, now)
            && !audience_shrank(s, members, &devices_by_user, trust_of, settings.policy)
    });
    let outbound = match kept {
        Some(mut s) => {
            s.meta.generation += 1;
            s
        }
        None => {
            let s = OutboundSession::new(room_id.clone(), settings.rotation.clone(), now);
            changes.inbound_group_sessions.push(s.own_inbound(own));
            s
        }
    };

    let all: Vec<DeviceRecord> = devices_by_user.into_values().flatten().collect();
    // Every recipient's Olm sessions, unpickled on every core.
    let mut sessions: BTreeMap<String, Vec<OlmSession>> =
        recipient_keys(&all).into_iter().map(|k| (k.to_owned(), Vec::new())).collect();
    for live in parallel::map_owned(olm_sessions, 64, OlmSession::from_record) {
        if let Some(list) = sessions.get_mut(&live.sender_key) {
            list.push(live);
        }
    }
    let plan = plan_share(
        own,
        &outbound,
        &all,
        |d| sessions.get(&d.curve25519).is_some_and(|s| !s.is_empty()),
        trust_of,
        settings.policy,
    );
    let room_key = outbound.room_key_content(settings.shared_history);
    let index = outbound.session.message_index();
    // Encrypt to each recipient key on every core (its sessions move into
    // the job); a second device with the same key, if any, waits for a
    // second, sequential round.
    let mut jobs = Vec::with_capacity(plan.share.len());
    let mut second_round = Vec::new();
    for d in &plan.share {
        match sessions.remove(&d.curve25519) {
            Some(live) => jobs.push((d, live)),
            None => second_round.push(d),
        }
    }
    let plaintext =
        OlmPlaintext::new(own, "m.room_key", &room_key).map_err(ShareError::Encryption)?;
    let encrypt_to = |d: &DeviceRecord, live: &mut [OlmSession]| {
        olm::preferred_session(live).map(|i| {
            plaintext.encrypt(&mut live[i], d).map(|content| (content, live[i].to_record()))
        })
    };
    let mut outcomes = Vec::with_capacity(plan.share.len());
    let encrypted = parallel::map_owned(jobs, 16, |(d, mut live)| {
        let result = encrypt_to(d, &mut live);
        (d, live, result)
    });
    for (d, live, result) in encrypted {
        sessions.insert(d.curve25519.clone(), live);
        outcomes.push((d, result));
    }
    for d in second_round {
        let result = sessions.get_mut(&d.curve25519).and_then(|live| encrypt_to(d, live));
        outcomes.push((d, result));
    }
    changes.olm_sessions.reserve(outcomes.len());
    let mut room_keys = Vec::with_capacity(outcomes.len());
    // A recipient without an Olm session gets nothing here (plan_share
    // already withheld the key from it with `m.no_olm`).
    for (d, result) in outcomes {
        let Some(result) = result else { continue };
        let (content, record) = result.map_err(ShareError::Encryption)?;
        changes.olm_sessions.push(record);
        let delivery = KeyDelivery {
            user_id: d.user_id.clone(),
            device_id: d.device_id.clone(),
            sender_key: d.curve25519.clone(),
            message_index: index,
        };
        room_keys.push((delivery, content));
    }
    let withheld = plan
        .withhold
        .iter()
        .map(|(d, code)| {
            let delivery = WithheldDelivery {
                user_id: d.user_id.clone(),
                device_id: d.device_id.clone(),
                code: *code,
            };
            (delivery, withheld_content(own, &outbound, *code))
        })
        .collect();
    changes.outbound_group_sessions.push(outbound.to_record());
    Ok(Share { outbound, changes, room_keys, withheld })
}

/// Records a finished share in `outbound`: who got the key at which index
/// (`delivered`) and who was told why not (`withheld`), one generation on
/// (it overwrites the stored record). Returns the changes that write it;
/// once they are committed, `outbound` is the stored state.
pub fn record_delivery(
    outbound: &mut OutboundSession,
    delivered: &[KeyDelivery],
    withheld: &[WithheldDelivery],
) -> Changes {
    let shared_with = Arc::make_mut(&mut outbound.meta.shared_with);
    for d in delivered {
        let info = ShareInfo { sender_key: d.sender_key.clone(), message_index: d.message_index };
        shared_with.entry(d.user_id.clone()).or_default().insert(d.device_id.clone(), info);
    }
    let withheld_to = Arc::make_mut(&mut outbound.meta.withheld_to);
    for w in withheld {
        withheld_to
            .entry(w.user_id.clone())
            .or_default()
            .insert(w.device_id.clone(), w.code.as_str().to_owned());
    }
    outbound.meta.generation += 1;
    Changes { outbound_group_sessions: vec![outbound.to_record()], ..Default::default() }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::identities::{CrossSigningKeys, PrivateCrossSigningIdentity};
    use crate::megolm::DEFAULT_ROTATION_PERIOD_MS;
    use crate::olm::tests::{claim, dev, Dev};
    use crate::records::LocalTrust;

    /// Alice shares; Bob's B1 has an Olm session with her, B2 has none.
    struct Room {
        alice: Dev,
        bob: Dev,
        bob2: Dev,
        b1_session: OlmSession,
        members: BTreeSet<UserId>,
    }

    fn room() -> Room {
        let alice = dev("@alice:hs", "A");
        let mut bob = dev("@bob:hs", "B1");
        let bob2 = dev("@bob:hs", "B2");
        let b1_session = claim(&alice, &mut bob);
        let members = BTreeSet::from([alice.rec.user_id.clone(), bob.rec.user_id.clone()]);
        Room { alice, bob, bob2, b1_session, members }
    }

    fn room_id() -> RoomId {
        RoomId::parse("!room:hs").unwrap()
    }

    impl Room {
        /// Every device, ours included (the share must skip it).
        fn devices(&self) -> Vec<DeviceRecord> {
            vec![self.alice.rec.clone(), self.bob.rec.clone(), self.bob2.rec.clone()]
        }

        fn share(
            &self,
            devices: Vec<DeviceRecord>,
            stored: Option<OutboundGroupSessionRecord>,
            settings: &RoomSettings,
            now: u64,
        ) -> Share {
            self.share_with(&self.members, devices, stored, None, settings, now).unwrap()
        }

        fn share_with(
            &self,
            members: &BTreeSet<UserId>,
            devices: Vec<DeviceRecord>,
            stored: Option<OutboundGroupSessionRecord>,
            trust: Option<MemberTrust<'_>>,
            settings: &RoomSettings,
            now: u64,
        ) -> Result<Share, ShareError> {
            let input = ShareInput {
                room_id: &room_id(),
                members,
                devices,
                stored,
                olm_sessions: vec![self.b1_session.to_record()],
                trust,
                settings,
            };
            share(&self.alice.acc, input, now)
        }
    }

    fn delivered_to(share: &Share) -> Vec<(&str, &str, u32)> {
        share
            .room_keys
            .iter()
            .map(|(d, _)| (d.user_id.as_str(), d.device_id.as_str(), d.message_index))
            .collect()
    }

    fn withheld_to(share: &Share) -> Vec<(&str, WithheldCode)> {
        share.withheld.iter().map(|(w, _)| (w.device_id.as_str(), w.code)).collect()
    }

    /// Shares and records the delivery: the session as stored afterwards.
    fn shared_and_recorded(r: &Room, settings: &RoomSettings) -> OutboundSession {
        let mut s = r.share(r.devices(), None, settings, 1000);
        let delivered: Vec<_> = s.room_keys.iter().map(|(d, _)| d.clone()).collect();
        let withheld: Vec<_> = s.withheld.iter().map(|(w, _)| w.clone()).collect();
        record_delivery(&mut s.outbound, &delivered, &withheld);
        s.outbound
    }

    #[test]
    fn a_new_session_starts_at_generation_0_with_our_inbound_copy() {
        let mut r = room();
        let s = r.share(r.devices(), None, &RoomSettings::default(), 1000);
        assert_eq!(s.outbound.meta.generation, 0);
        let session_id = s.outbound.session_id();
        let written: Vec<_> = s.changes.outbound_group_sessions.iter().collect();
        assert_eq!(written.len(), 1);
        assert_eq!((written[0].session_id.as_str(), written[0].generation), (&*session_id, 0));
        let own: Vec<_> = s.changes.inbound_group_sessions.iter().collect();
        assert_eq!(own.len(), 1, "our own inbound copy, to read our own messages");
        assert_eq!(own[0].session_id, session_id);
        assert_eq!(own[0].sender_key, r.alice.rec.curve25519);
        // Our own device is skipped; B1 gets the key at index 0, B2 (no
        // Olm session) is told m.no_olm.
        assert_eq!(delivered_to(&s), [("@bob:hs", "B1", 0)]);
        assert_eq!(s.room_keys[0].0.sender_key, r.bob.rec.curve25519);
        assert_eq!(withheld_to(&s), [("B2", WithheldCode::NoOlm)]);
        assert_eq!(s.withheld[0].1["code"], "m.no_olm");
        assert_eq!(s.changes.olm_sessions.len(), 1, "the advanced Olm session");

        // Bob reads the room key of that session over Olm.
        let mut sessions = Vec::new();
        let alice_id = r.alice.acc.user_id().clone();
        let content = &s.room_keys[0].1;
        let d = olm::decrypt(&mut r.bob.acc, &alice_id, content, &mut sessions, &[], 2000).unwrap();
        assert_eq!(d.event.event_type, "m.room_key");
        assert_eq!(d.event.content["session_id"], json!(session_id));
        assert_eq!(d.event.content["room_id"], "!room:hs");
    }

    #[test]
    fn a_kept_session_moves_one_generation_on_and_shares_only_with_new_devices() {
        let r = room();
        let settings = RoomSettings::default();
        let stored = shared_and_recorded(&r, &settings);
        let s = r.share(r.devices(), Some(stored.to_record()), &settings, 2000);
        assert_eq!(s.outbound.session_id(), stored.session_id(), "not rotated");
        assert_eq!(s.outbound.meta.generation, stored.meta.generation + 1);
        assert_eq!(s.changes.outbound_group_sessions[0].generation, stored.meta.generation + 1);
        assert!(s.changes.inbound_group_sessions.is_empty(), "no new session, no own copy");
        assert!(s.room_keys.is_empty() && s.withheld.is_empty(), "everyone had an answer");
        // A new device of Bob's joins: only it is served.
        let b3 = dev("@bob:hs", "B3");
        let mut devices = r.devices();
        devices.push(b3.rec.clone());
        let s = r.share(devices, Some(stored.to_record()), &settings, 2000);
        assert_eq!(withheld_to(&s), [("B3", WithheldCode::NoOlm)]);
        assert!(s.room_keys.is_empty());
    }

    #[test]
    fn an_expired_session_rotates() {
        let r = room();
        let settings = RoomSettings::default();
        let stored = shared_and_recorded(&r, &settings);
        let later = 1000 + DEFAULT_ROTATION_PERIOD_MS;
        let s = r.share(r.devices(), Some(stored.to_record()), &settings, later);
        assert_ne!(s.outbound.session_id(), stored.session_id());
        assert_eq!(s.outbound.meta.generation, 0);
        assert_eq!(s.changes.inbound_group_sessions.len(), 1);
        assert_eq!(delivered_to(&s), [("@bob:hs", "B1", 0)], "the new key goes out again");
        // Worn out by count: as stored, or by stricter settings.
        let mut worn = stored.to_record();
        worn.message_count = worn.rotation_period_msgs;
        let s = r.share(r.devices(), Some(worn), &settings, 2000);
        assert_ne!(s.outbound.session_id(), stored.session_id());
        let stricter = RoomSettings {
            rotation: RotationSettings { rotation_period_msgs: 1, ..Default::default() },
            ..Default::default()
        };
        let mut used = stored.to_record();
        used.message_count = 1;
        let s = r.share(r.devices(), Some(used), &stricter, 2000);
        assert_ne!(s.outbound.session_id(), stored.session_id());
    }

    #[test]
    fn a_session_whose_audience_shrank_rotates() {
        let r = room();
        let settings = RoomSettings::default();
        let stored = shared_and_recorded(&r, &settings);
        let rotated = |s: &Share| s.outbound.session_id() != stored.session_id();
        // Bob left the room.
        let alone = BTreeSet::from([r.alice.rec.user_id.clone()]);
        let s = r
            .share_with(&alone, r.devices(), Some(stored.to_record()), None, &settings, 2000)
            .unwrap();
        assert!(rotated(&s));
        assert!(s.room_keys.is_empty(), "nobody else to share with");
        // B1 was deleted.
        let mut devices = r.devices();
        devices[1].deleted = true;
        assert!(rotated(&r.share(devices, Some(stored.to_record()), &settings, 2000)));
        // B1 was blacklisted after it got the key: it must not read on.
        let mut devices = r.devices();
        devices[1].local_trust = LocalTrust::Blacklisted;
        let s = r.share(devices, Some(stored.to_record()), &settings, 2000);
        assert!(rotated(&s));
        assert_eq!(
            withheld_to(&s),
            [("B1", WithheldCode::Blacklisted), ("B2", WithheldCode::NoOlm)]
        );
        // Unchanged: kept.
        assert!(!rotated(&r.share(r.devices(), Some(stored.to_record()), &settings, 2000)));
    }

    #[test]
    fn a_blacklisted_device_is_told_m_blacklisted_except_under_all_devices() {
        let r = room();
        let mut devices = r.devices();
        devices[1].local_trust = LocalTrust::Blacklisted;
        let s = r.share(devices.clone(), None, &RoomSettings::default(), 1000);
        assert!(s.room_keys.is_empty());
        assert_eq!(
            withheld_to(&s),
            [("B1", WithheldCode::Blacklisted), ("B2", WithheldCode::NoOlm)]
        );
        assert_eq!(s.withheld[0].1["code"], "m.blacklisted");
        assert_eq!(s.withheld[0].1["session_id"], json!(s.outbound.session_id()));
        let all = RoomSettings { policy: SharingPolicy::AllDevices, ..Default::default() };
        let s = r.share(devices, None, &all, 1000);
        assert_eq!(delivered_to(&s), [("@bob:hs", "B1", 0)]);
    }

    /// Bob's identity, verified once and changed since: in violation.
    fn violating_identity(bob: &Dev) -> UserIdentity {
        let (_, up) = PrivateCrossSigningIdentity::bootstrap(&bob.acc).unwrap();
        let keys = up.device_signing_upload;
        let user = bob.acc.user_id().as_str();
        let query = json!({
            "master_keys": { user: keys["master_key"] },
            "self_signing_keys": { user: keys["self_signing_key"] },
        });
        let keys = CrossSigningKeys::from_keys_query(&query, bob.acc.user_id()).unwrap().unwrap();
        UserIdentity::from_record(&UserIdentity::updated_record(None, &keys, true)).unwrap()
    }

    #[test]
    fn a_verification_violation_blocks_the_share_when_the_room_says_so() {
        let r = room();
        let root = TrustRoot::new(&r.alice.acc, None, None);
        let identities = BTreeMap::from([(r.bob.rec.user_id.clone(), violating_identity(&r.bob))]);
        assert_eq!(
            root.identity_trust(&identities[&r.bob.rec.user_id]),
            IdentityTrust::VerificationViolation
        );
        let trust = || Some(MemberTrust { root: &root, identities: &identities });
        let blocking = RoomSettings { block_on_verification_violation: true, ..Default::default() };
        let refused = r.share_with(&r.members, r.devices(), None, trust(), &blocking, 1000);
        assert_eq!(
            refused.unwrap_err(),
            ShareError::VerificationViolation(vec![r.bob.rec.user_id.clone()])
        );
        // Settings that need trust refuse to run without it.
        let refused = r.share_with(&r.members, r.devices(), None, None, &blocking, 1000);
        assert_eq!(refused.unwrap_err(), ShareError::TrustMissing);
        // Without the setting the violation is only reported elsewhere.
        let s = r
            .share_with(&r.members, r.devices(), None, trust(), &RoomSettings::default(), 1000)
            .unwrap();
        assert_eq!(delivered_to(&s), [("@bob:hs", "B1", 0)]);
        // A member who left does not block.
        let alone = BTreeSet::from([r.alice.rec.user_id.clone()]);
        assert!(r.share_with(&alone, r.devices(), None, trust(), &blocking, 1000).is_ok());
    }

    #[test]
    fn verified_only_withholds_from_unverified_devices() {
        let r = room();
        let root = TrustRoot::new(&r.alice.acc, None, None);
        let identities = BTreeMap::new();
        let trust = || Some(MemberTrust { root: &root, identities: &identities });
        let verified_only =
            RoomSettings { policy: SharingPolicy::VerifiedOnly, ..Default::default() };
        let s = r.share_with(&r.members, r.devices(), None, trust(), &verified_only, 1000).unwrap();
        assert!(s.room_keys.is_empty());
        assert_eq!(
            withheld_to(&s),
            [("B1", WithheldCode::Unverified), ("B2", WithheldCode::Unverified)]
        );
        let mut devices = r.devices();
        devices[1].local_trust = LocalTrust::Verified;
        let s = r.share_with(&r.members, devices, None, trust(), &verified_only, 1000).unwrap();
        assert_eq!(delivered_to(&s), [("@bob:hs", "B1", 0)]);
    }

    #[test]
    fn many_recipients_on_every_core_and_a_shared_identity_key() {
        let _cap = crate::parallel::CAP_FOR_TESTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::parallel::set_max_threads(4);
        let alice = dev("@alice:hs", "A");
        let mut devices = Vec::new();
        let mut olm_sessions = Vec::new();
        for i in 0..40 {
            let mut d = dev(&format!("@u{i}:hs"), "D");
            olm_sessions.push(claim(&alice, &mut d).to_record());
            devices.push(d.rec);
        }
        // A second device listing the same Curve25519 key as the first.
        let mut copy = devices[0].clone();
        copy.device_id = DeviceId::parse("COPY").unwrap();
        devices.push(copy);
        let members: BTreeSet<UserId> = devices.iter().map(|d| d.user_id.clone()).collect();
        let input = ShareInput {
            room_id: &room_id(),
            members: &members,
            devices,
            stored: None,
            olm_sessions,
            trust: None,
            settings: &RoomSettings::default(),
        };
        let s = share(&alice.acc, input, 1000).unwrap();
        crate::parallel::set_max_threads(0);
        assert_eq!(s.room_keys.len(), 41);
        assert!(s.withheld.is_empty());
        assert_eq!(s.changes.olm_sessions.len(), 41);
        let users: BTreeSet<&UserId> = s.room_keys.iter().map(|(d, _)| &d.user_id).collect();
        assert_eq!(users.len(), 40);
        assert!(s.room_keys.iter().any(|(d, _)| d.device_id.as_str() == "COPY"));
    }

    #[test]
    fn record_delivery_records_who_got_what_and_moves_one_generation_on() {
        let r = room();
        let mut s = r.share(r.devices(), None, &RoomSettings::default(), 1000);
        let delivered: Vec<_> = s.room_keys.iter().map(|(d, _)| d.clone()).collect();
        let withheld: Vec<_> = s.withheld.iter().map(|(w, _)| w.clone()).collect();
        let changes = record_delivery(&mut s.outbound, &delivered, &withheld);
        assert_eq!(s.outbound.meta.generation, 1);
        let [record] = &changes.outbound_group_sessions[..] else { panic!("one record") };
        assert_eq!(record.generation, 1);
        assert_eq!(record.session_id, s.outbound.session_id());
        let b1 = &record.shared_with[&r.bob.rec.user_id][&r.bob.rec.device_id];
        assert_eq!((b1.sender_key.as_str(), b1.message_index), (&*r.bob.rec.curve25519, 0));
        assert_eq!(record.withheld_to[&r.bob.rec.user_id][&r.bob2.rec.device_id], "m.no_olm");
        assert!(changes.inbound_group_sessions.is_empty() && changes.olm_sessions.is_empty());
        // Nothing delivered still moves the generation on (it is a write).
        let changes = record_delivery(&mut s.outbound, &[], &[]);
        assert_eq!(changes.outbound_group_sessions[0].generation, 2);
    }
}
