//! [`Changes`]: the delta of protocol state that one operation produces.
//!
//! Every function of the core that changes state returns its effect as a
//! `Changes` value; the driver commits it with one atomic `Store::apply`.
//! New features add fields here, not new store write methods.

use crate::identities::{IdentityRecord, PrivateIdentityRecord};
use crate::ids::{DeviceId, RoomId, UserId};
use crate::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, MessageIndexRecord,
    OlmSessionRecord, OutboundGroupSessionRecord, TrackedUser, WithheldRecord,
};

/// State to persist atomically. Records are upserts keyed by their natural key;
/// a backend applies all removals first, then all upserts, and within one
/// list a later entry for the same key wins.
#[derive(Debug, Default)]
pub struct Changes {
    /// Our account, if it changed.
    pub account: Option<AccountRecord>,
    /// Olm sessions, keyed by (sender key, session ID).
    pub olm_sessions: Vec<OlmSessionRecord>,
    /// Inbound Megolm sessions, keyed by (room ID, session ID).
    pub inbound_group_sessions: Vec<InboundGroupSessionRecord>,
    /// Outbound Megolm sessions, keyed by room ID.
    pub outbound_group_sessions: Vec<OutboundGroupSessionRecord>,
    /// Rooms whose outbound session is discarded (forces rotation).
    pub removed_outbound_group_sessions: Vec<RoomId>,
    /// Devices, keyed by (user ID, device ID).
    pub devices: Vec<DeviceRecord>,
    /// Devices to forget entirely.
    pub removed_devices: Vec<(UserId, DeviceId)>,
    /// Tracked users, keyed by user ID.
    pub tracked_users: Vec<TrackedUser>,
    /// Users to stop tracking.
    pub untracked_users: Vec<UserId>,
    /// Outgoing key requests, keyed by request ID.
    pub key_requests: Vec<KeyRequestRecord>,
    /// Key requests to delete, by request ID.
    pub removed_key_requests: Vec<String>,
    /// Withheld notices, keyed by (room ID, session ID).
    pub withheld: Vec<WithheldRecord>,
    /// Replay-detection records, keyed by (room ID, session ID, index).
    pub message_indices: Vec<MessageIndexRecord>,
    /// The sync token (`next_batch`) whose to-device events this commit covers.
    pub sync_token: Option<String>,
    /// Public cross-signing identities (ours and other users'), keyed by user ID.
    pub identities: Vec<IdentityRecord>,
    /// Our private cross-signing keys, if they changed (bootstrap, import).
    pub private_identity: Option<PrivateIdentityRecord>,
}

impl Changes {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.message_indices.is_empty() && self.holds_only_message_indices()
    }

    /// Nothing but replay records ([`Self::message_indices`]), if any: a
    /// backend may commit those with weaker durability (newt-sqlite does).
    pub fn holds_only_message_indices(&self) -> bool {
        self.account.is_none()
            && self.olm_sessions.is_empty()
            && self.inbound_group_sessions.is_empty()
            && self.outbound_group_sessions.is_empty()
            && self.removed_outbound_group_sessions.is_empty()
            && self.devices.is_empty()
            && self.removed_devices.is_empty()
            && self.tracked_users.is_empty()
            && self.untracked_users.is_empty()
            && self.key_requests.is_empty()
            && self.removed_key_requests.is_empty()
            && self.withheld.is_empty()
            && self.sync_token.is_none()
            && self.identities.is_empty()
            && self.private_identity.is_none()
    }

    /// Appends `other` to `self`; later entries win on apply.
    pub fn extend(&mut self, other: Changes) {
        if other.account.is_some() {
            self.account = other.account;
        }
        self.olm_sessions.extend(other.olm_sessions);
        self.inbound_group_sessions.extend(other.inbound_group_sessions);
        self.outbound_group_sessions.extend(other.outbound_group_sessions);
        self.removed_outbound_group_sessions.extend(other.removed_outbound_group_sessions);
        self.devices.extend(other.devices);
        self.removed_devices.extend(other.removed_devices);
        self.tracked_users.extend(other.tracked_users);
        self.untracked_users.extend(other.untracked_users);
        self.key_requests.extend(other.key_requests);
        self.removed_key_requests.extend(other.removed_key_requests);
        self.withheld.extend(other.withheld);
        self.message_indices.extend(other.message_indices);
        if other.sync_token.is_some() {
            self.sync_token = other.sync_token;
        }
        self.identities.extend(other.identities);
        if other.private_identity.is_some() {
            self.private_identity = other.private_identity;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RoomId;

    #[test]
    fn only_message_indices_is_told_apart_from_other_writes() {
        let index = MessageIndexRecord {
            room_id: RoomId::parse("!r:hs").unwrap(),
            session_id: "s".into(),
            index: 1,
            event_id: "$e".into(),
            origin_server_ts: 1,
        };
        let empty = Changes::default();
        assert!(empty.is_empty() && empty.holds_only_message_indices());
        let replay = Changes { message_indices: vec![index], ..Default::default() };
        assert!(!replay.is_empty() && replay.holds_only_message_indices());
        let mixed = Changes { sync_token: Some("t".into()), ..replay };
        assert!(!mixed.is_empty() && !mixed.holds_only_message_indices());
    }
}
