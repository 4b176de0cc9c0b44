//! The narrow storage interface of newt.
//!
//! A [`Store`] offers keyed reads for what the protocol core needs on each
//! operation, paged reads for bulk work (export, backup), and one atomic
//! write, [`Store::apply`], that commits a [`Changes`] all or nothing.
//! [`MemoryStore`] is the reference backend; every backend runs the
//! [`conformance`] suite (feature `conformance`).
//!
//! ```
//! # tokio_test_block_on(async {
//! use newt_store::{MemoryStore, Store, Changes};
//! use newt_proto::records::TrackedUser;
//! use newt_proto::ids::UserId;
//!
//! let store = MemoryStore::new();
//! let alice = UserId::parse("@alice:example.org")?;
//! let mut changes = Changes::default();
//! changes.tracked_users.push(TrackedUser { user_id: alice.clone(), outdated: true });
//! store.apply(changes).await?;
//! assert_eq!(store.tracked_users().await?.len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

#[cfg(feature = "conformance")]
pub mod conformance;
mod memory;
pub mod parallel;

pub use memory::MemoryStore;
pub use newt_proto::changes::Changes;

use std::collections::HashSet;

use newt_proto::identities::{IdentityRecord, PrivateIdentityRecord};
use newt_proto::ids::{RoomId, UserId};
use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, MessageIndexRecord,
    OlmSessionRecord, OutboundGroupSessionRecord, TrackedUser, WithheldRecord,
};

/// A storage failure. Protocol errors never wrap this; only the driver's do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed (I/O, database engine, browser storage).
    #[error("storage backend failed: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The key or passphrase does not open this store.
    #[error("wrong store key or passphrase")]
    WrongKey,
    /// The store was written by a newer version of newt.
    #[error("store schema version {found} is newer than this build knows ({supported})")]
    TooNew {
        /// Version found in the store.
        found: u32,
        /// Newest version this build understands.
        supported: u32,
    },
    /// The store holds another account.
    #[error("store belongs to another account")]
    AccountMismatch,
    /// Another process changed the account since it was loaded.
    #[error("the account was changed by another process (generation {expected} expected, {found} found)")]
    StaleGeneration {
        /// Generation the writer started from.
        expected: u64,
        /// Generation in the store.
        found: u64,
    },
}

/// A page position for [`Store::inbound_group_sessions_page`]: the last
/// (room ID, session ID) of the previous page.
pub type SessionCursor = Option<(RoomId, String)>;

/// The storage interface. Reads are keyed and narrow; the only write is
/// [`apply`](Store::apply).
///
/// Implementations must make `apply` atomic (all or nothing), and apply the
/// generation check ([`check_generation_value`]) to the account and to every
/// Olm session in `changes`: if a stored record's `generation` is not
/// exactly one less than the incoming one, `apply` fails with
/// [`StoreError::StaleGeneration`] and writes nothing. Outbound Megolm
/// sessions get the stricter [`check_outbound_generation`] (against the
/// state after the removals of the same `changes`).
#[cfg_attr(not(target_arch = "wasm32"), async_trait::async_trait)]
#[cfg_attr(target_arch = "wasm32", async_trait::async_trait(?Send))]
pub trait Store: StoreBounds {
    /// Our account, if one was created.
    async fn account(&self) -> Result<Option<AccountRecord>, StoreError>;
    /// Olm sessions with the device whose Curve25519 key is `sender_key`.
    async fn olm_sessions(&self, sender_key: &str) -> Result<Vec<OlmSessionRecord>, StoreError>;
    /// The inbound Megolm session (room, session ID).
    async fn inbound_group_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<InboundGroupSessionRecord>, StoreError>;
    /// Up to `limit` inbound sessions after the cursor `after` (the last
    /// session of the previous page), in a backend-defined order that is
    /// stable across pages: paging visits every session exactly once. Bulk
    /// readers (export, backup) page through with this instead of loading all.
    async fn inbound_group_sessions_page(
        &self,
        after: SessionCursor,
        limit: usize,
    ) -> Result<Vec<InboundGroupSessionRecord>, StoreError>;
    /// Our outbound Megolm session for the room.
    async fn outbound_group_session(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<OutboundGroupSessionRecord>, StoreError>;
    /// All known devices of a user (including ones marked deleted).
    async fn devices(&self, user_id: &UserId) -> Result<Vec<DeviceRecord>, StoreError>;
    /// Users whose device lists we track.
    async fn tracked_users(&self) -> Result<Vec<TrackedUser>, StoreError>;
    /// An outgoing key request by `request_id`.
    async fn key_request(&self, request_id: &str) -> Result<Option<KeyRequestRecord>, StoreError>;
    /// The outgoing key request for a session, if any.
    async fn key_request_for_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<KeyRequestRecord>, StoreError>;
    /// Outgoing key requests not yet handed out to be sent.
    async fn unsent_key_requests(&self) -> Result<Vec<KeyRequestRecord>, StoreError>;
    /// The withheld notice that `sender` sent for the session. Notices are
    /// kept per sender (keyed by room, session and sender), so another user
    /// cannot overwrite one (a server can still forge the `sender` of these
    /// unencrypted events: a notice is the sender's claim at best).
    async fn withheld(
        &self,
        room_id: &RoomId,
        session_id: &str,
        sender: &UserId,
    ) -> Result<Option<WithheldRecord>, StoreError>;
    /// The replay-detection record at a Megolm index.
    async fn message_index(
        &self,
        room_id: &RoomId,
        session_id: &str,
        index: u32,
    ) -> Result<Option<MessageIndexRecord>, StoreError>;
    /// The last committed sync token.
    async fn sync_token(&self) -> Result<Option<String>, StoreError>;
    /// The public cross-signing identity of `user_id` (ours or another user's).
    async fn identity(&self, user_id: &UserId) -> Result<Option<IdentityRecord>, StoreError>;
    /// Our private cross-signing keys, if we hold any.
    async fn private_identity(&self) -> Result<Option<PrivateIdentityRecord>, StoreError>;
    /// Commits `changes` atomically.
    async fn apply(&self, changes: Changes) -> Result<(), StoreError>;

    /// Which of `sender_keys` (Curve25519 keys) have at least one Olm
    /// session: one batched read instead of [`olm_sessions`](Self::olm_sessions)
    /// per device. Backends should override the default (one read per key)
    /// with something that does not load the sessions.
    async fn sender_keys_with_olm_sessions(
        &self,
        sender_keys: &[&str],
    ) -> Result<HashSet<String>, StoreError> {
        let mut found = HashSet::new();
        for key in sender_keys {
            if !self.olm_sessions(key).await?.is_empty() {
                found.insert((*key).to_owned());
            }
        }
        Ok(found)
    }

    /// The stored inbound sessions among `keys` ((room, session ID) pairs);
    /// absent ones are left out, the order is the backend's. One batched
    /// read instead of [`inbound_group_session`](Self::inbound_group_session)
    /// per key (imports).
    async fn inbound_group_sessions(
        &self,
        keys: &[(RoomId, String)],
    ) -> Result<Vec<InboundGroupSessionRecord>, StoreError> {
        let mut found = Vec::new();
        for (room_id, session_id) in keys {
            if let Some(r) = self.inbound_group_session(room_id, session_id).await? {
                found.push(r);
            }
        }
        Ok(found)
    }

    /// [`devices`](Self::devices) of each of `users`, in one call (room key
    /// sharing and session claims read every member's devices). Backends
    /// with a per-read cost should override the default (one read per user).
    async fn devices_of(&self, users: &[UserId]) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut found = Vec::new();
        for user_id in users {
            found.extend(self.devices(user_id).await?);
        }
        Ok(found)
    }

    /// [`olm_sessions`](Self::olm_sessions) with each of `sender_keys`, in
    /// one call (room key sharing reads every recipient's sessions).
    /// Backends with a per-read cost should override the default.
    async fn olm_sessions_of(
        &self,
        sender_keys: &[&str],
    ) -> Result<Vec<OlmSessionRecord>, StoreError> {
        let mut found = Vec::new();
        for key in sender_keys {
            found.extend(self.olm_sessions(key).await?);
        }
        Ok(found)
    }
}

/// `Send + Sync` on native targets, nothing on wasm32 (browser storage
/// handles are single-threaded).
#[cfg(not(target_arch = "wasm32"))]
pub trait StoreBounds: Send + Sync {}
#[cfg(not(target_arch = "wasm32"))]
impl<T: Send + Sync + ?Sized> StoreBounds for T {}
/// `Send + Sync` on native targets, nothing on wasm32.
#[cfg(target_arch = "wasm32")]
pub trait StoreBounds {}
#[cfg(target_arch = "wasm32")]
impl<T: ?Sized> StoreBounds for T {}

/// Checks the account generation rule shared by every backend: a write of the
/// account must be based on the stored generation.
pub fn check_generation(
    stored: Option<&AccountRecord>,
    incoming: &AccountRecord,
) -> Result<(), StoreError> {
    check_generation_value(stored.map(|a| a.generation), incoming.generation)
}

/// The generation rule of outbound Megolm sessions, given the stored and
/// incoming (session ID, generation): an update of the stored session must
/// be exactly one generation past it; anything else (nothing stored — never
/// was, or discarded — or another session stored) must be a new session,
/// generation 0. So a process holding a cached session can neither
/// overwrite another process's newer write, nor bring back a session that
/// was discarded or replaced (a rotation, e.g. after a member left).
pub fn check_outbound_generation(
    stored: Option<(&str, u64)>,
    incoming: (&str, u64),
) -> Result<(), StoreError> {
    let (session_id, generation) = incoming;
    match stored {
        Some((stored_id, stored_generation)) if stored_id == session_id => {
            check_generation_value(Some(stored_generation), generation)
        }
        _ if generation == 0 => Ok(()),
        _ => Err(StoreError::StaleGeneration {
            expected: generation.saturating_sub(1),
            found: stored.map_or(0, |(_, g)| g),
        }),
    }
}

/// The generation rule for any record that carries one (the account, Olm
/// sessions): nothing stored accepts any generation; otherwise the incoming
/// record must be exactly one past the stored one.
pub fn check_generation_value(stored: Option<u64>, incoming: u64) -> Result<(), StoreError> {
    match stored {
        Some(g) if incoming != g + 1 => {
            Err(StoreError::StaleGeneration { expected: incoming.saturating_sub(1), found: g })
        }
        _ => Ok(()),
    }
}
