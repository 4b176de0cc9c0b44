//! [`Machine`]: the async driver around the sans-IO core.
//!
//! Each public method follows the same shape: take the state lock, load the
//! records the core needs from the store, call the core, commit the returned
//! `Changes` with one `Store::apply`, and only then hand results back
//! (persist before acknowledge). If the commit fails, the in-memory account
//! is reloaded from the store, so memory never runs ahead of disk.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use futures::lock::Mutex;
use serde_json::{json, Map, Value};

use newt_proto::account::{OwnAccount, SIGNED_CURVE25519};
use newt_proto::changes::Changes;
use newt_proto::devices::{handle_keys_query, keys_query_body, parse_device_keys, RejectedDevice};
use newt_proto::export::{
    ExportKdf, ExportKeys, ExportStream, ExportWriter, ExportedRoomKey, DEFAULT_MAX_ROUNDS,
};
use newt_proto::identities::{
    signatures_upload_body, BootstrapRequests, CrossSigningError, CrossSigningKeys, DeviceTrust,
    IdentityRecord, IdentityTrust, OwnIdentity, OwnIdentityTrust, PrivateCrossSigningIdentity,
    PrivateIdentityRecord, TrustRoot, UserIdentity,
};
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::key_requests::{
    accept_forwarded_key, answer_request, parse_request, request_content, KeyShareError,
};
use newt_proto::megolm::{
    decrypt_room_event_with, export_record, finish_room_event, live_inbound, megolm_decrypt,
    parse_room_event, parse_withheld, session_from_export, session_from_room_key, should_replace,
    DecryptedRoomEvent, EncryptedRoomEvent, MegolmError, OutboundSession, RotationSettings,
};
use newt_proto::olm::{
    self, handle_keys_claim, keys_claim_body, OlmError, OlmSession, KEY_CARRYING_TYPES,
};
use newt_proto::records::{
    DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, LocalTrust, MessageIndexRecord,
    SessionSource, ShareInfo, TrackedUser,
};
use newt_proto::sharing::{audience_shrank, plan_share, withheld_content, SharingPolicy};
use newt_proto::trust::{with_cross_signing, SenderTrust};
use newt_proto::vodozemac::megolm::{DecryptedMessage, InboundGroupSession, MegolmMessage};
use newt_proto::OLM_V1;
use newt_store::{Store, StoreError};

use crate::clock::{Clock, SystemClock};
use crate::requests::{OutgoingRequest, RequestKind};
use crate::Error;

#[path = "verification.rs"]
mod verification;
pub use verification::{VerificationFlow, VerificationMethods, VerificationState, STORE_FAILURE};

/// To-device verification event types start with this.
const VERIFICATION_PREFIX: &str = "m.key.verification.";

/// How long a device whose key claim failed is left alone (ms).
const CLAIM_FAILURE_BACKOFF_MS: u64 = 15 * 60 * 1000;
/// At most one new session per device per hour to unwedge a broken channel.
const UNWEDGE_INTERVAL_MS: u64 = 3600 * 1000;
/// To-device messages per request.
const TO_DEVICE_CHUNK: usize = 250;
/// Sessions written per store transaction during an import.
const IMPORT_BATCH: usize = 2000;
/// `/keys/query` reports kept until [`Machine::take_keys_query_reports`].
const MAX_REPORTS: usize = 64;
/// Unpickled inbound Megolm sessions kept in memory (least recently used
/// first out).
const INBOUND_CACHE_SIZE: usize = 256;

/// What a sync delivered that the crypto layer needs.
#[derive(Debug, Clone, Default)]
pub struct SyncChanges {
    /// `to_device.events`.
    pub to_device_events: Vec<Value>,
    /// `device_lists.changed`.
    pub changed_users: Vec<UserId>,
    /// `device_lists.left`.
    pub left_users: Vec<UserId>,
    /// `device_one_time_keys_count.signed_curve25519` (absent means 0 when
    /// the map is present; pass `None` when the map is absent).
    pub one_time_key_count: Option<u64>,
    /// `device_unused_fallback_key_types`, if the server sent it.
    pub unused_fallback_key_types: Option<Vec<String>>,
    /// `next_batch`: committed together with the to-device results.
    pub next_batch: Option<String>,
}

/// Room settings for sharing and encrypting.
#[derive(Debug, Clone, Default)]
pub struct RoomSettings {
    /// Rotation periods from `m.room.encryption`.
    pub rotation: RotationSettings,
    /// Who gets the room key.
    pub policy: SharingPolicy,
    /// `shared_history` for new keys (history visibility `shared`/`world_readable`).
    pub shared_history: bool,
    /// Refuse to share (with [`Error::VerificationViolation`]) while a member
    /// whose identity we verified has a changed, unacknowledged identity
    /// ([`IdentityTrust::VerificationViolation`]). When unset, a violation
    /// is only reported by [`Machine::user_identity_state`].
    pub block_on_verification_violation: bool,
}

/// What happened to one to-device event.
///
/// Room keys that newt stored (`m.room_key`, `m.forwarded_room_key`) come
/// without their `session_key`. The content of every key-carrying type
/// ([`KEY_CARRYING_TYPES`]: e.g. an `m.secret.send` secret, handed to the
/// app) is left out of the `Debug` output, so logging an outcome never logs
/// a key.
#[derive(Clone, PartialEq)]
pub struct ProcessedToDevice {
    /// The `sender` of the event.
    pub sender: String,
    /// The (inner, if it was encrypted) event type.
    pub event_type: String,
    /// The (decrypted) content; `Null` when the event was rejected.
    pub content: Value,
    /// Whether it arrived Olm-encrypted.
    pub encrypted: bool,
    /// The sending device, when known: the stored device (from
    /// `/keys/query`) whose Curve25519 key the Olm channel authenticated,
    /// or, for a device not fetched yet, the ID in its self-signed
    /// `sender_device_keys` (never the ID of a known device with other
    /// keys). Check [`sender_key`](Self::sender_key) against the device's
    /// keys before trusting a handed-through event from it.
    pub sender_device: Option<DeviceId>,
    /// The sending device's Curve25519 key, authenticated by Olm
    /// (unpadded base64); `None` for events that did not arrive over Olm.
    pub sender_key: Option<String>,
    /// For an Olm-encrypted event handed to the app
    /// ([`ToDeviceOutcome::ForApp`], e.g. `m.secret.send`): newt's verdict
    /// on the sending device, when it is a device known from `/keys/query`
    /// whose keys the Olm channel matched (and not deleted). `None` for a
    /// device that only vouched for itself: trust nothing it says. Use this
    /// rather than looking [`sender_device`](Self::sender_device) up later.
    pub sender_device_trust: Option<DeviceTrust>,
    /// What newt did with it.
    pub outcome: ToDeviceOutcome,
}

impl std::fmt::Debug for ProcessedToDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = KEY_CARRYING_TYPES.contains(&self.event_type.as_str());
        let content: &dyn std::fmt::Debug = if secret { &"<redacted>" } else { &self.content };
        f.debug_struct("ProcessedToDevice")
            .field("sender", &self.sender)
            .field("event_type", &self.event_type)
            .field("content", content)
            .field("encrypted", &self.encrypted)
            .field("sender_device", &self.sender_device)
            .field("sender_key", &self.sender_key)
            .field("sender_device_trust", &self.sender_device_trust)
            .field("outcome", &self.outcome)
            .finish()
    }
}

/// What newt did with a to-device event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ToDeviceOutcome {
    /// Not a crypto event: for the application.
    ForApp,
    /// A room key was stored (room, session).
    RoomKeyStored(RoomId, String),
    /// A key request was answered with a forwarded key.
    KeyRequestAnswered,
    /// A withheld notice was stored.
    WithheldStored,
    /// Handled internally (dummy, cancellation, duplicate key, ...).
    Handled,
    /// Rejected: the event broke a rule or could not be decrypted.
    Rejected(ToDeviceError),
}

/// Why a to-device event was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ToDeviceError {
    /// A key-carrying event arrived without Olm encryption.
    #[error("{0} must arrive Olm-encrypted")]
    NotOverOlm(String),
    /// Olm decryption or a plaintext check failed.
    #[error(transparent)]
    Olm(#[from] OlmError),
    /// The room key was invalid.
    #[error(transparent)]
    Megolm(#[from] MegolmError),
    /// A forwarded key or key request was refused.
    #[error(transparent)]
    KeyShare(#[from] KeyShareError),
    /// The event itself is malformed.
    #[error("malformed to-device event: {0}")]
    Malformed(&'static str),
}

/// The result of [`Machine::receive_sync`].
#[derive(Debug, Clone, Default)]
pub struct SyncOutcome {
    /// Every to-device event, in order, with what happened to it.
    pub to_device: Vec<ProcessedToDevice>,
}

/// What a `/keys/query` response contained that newt refused; see
/// [`Machine::take_keys_query_reports`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeysQueryReport {
    /// Devices refused (bad signature, mismatched IDs, changed key).
    pub rejected: Vec<RejectedDevice>,
    /// Cross-signing identities refused (not stored; a previously stored
    /// identity of the user is kept as it was).
    pub rejected_identities: Vec<RejectedIdentity>,
}

impl KeysQueryReport {
    /// Nothing was refused.
    pub fn is_empty(&self) -> bool {
        self.rejected.is_empty() && self.rejected_identities.is_empty()
    }
}

/// A user's cross-signing keys that were refused.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedIdentity {
    /// The user.
    pub user_id: UserId,
    /// Why.
    pub reason: IdentityRejection,
}

/// Why a user's cross-signing keys were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityRejection {
    /// A key is malformed, or a signature by the master key is missing or
    /// wrong (e.g. a self-signing key the master key did not sign).
    #[error(transparent)]
    Invalid(#[from] CrossSigningError),
    /// One of the user's device IDs equals a cross-signing key ID: the user's
    /// identity and that device are refused (the key-ID namespaces clash).
    #[error("device {0} has the ID of one of the user's cross-signing keys")]
    DeviceIdCollision(String),
}

/// Summary of a key import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImportSummary {
    /// Keys in the file.
    pub total: usize,
    /// Keys stored (new, or better than what we had).
    pub imported: usize,
    /// Keys skipped (not Megolm, invalid, or not better).
    pub skipped: usize,
}

/// How to read a key export file ([`Machine::import_room_keys_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportOptions {
    /// The most PBKDF2 rounds the file may ask for; a file asking for more
    /// fails with [`ExportError::TooManyRounds`](crate::ExportError::TooManyRounds)
    /// before any key derivation. The default, [`DEFAULT_MAX_ROUNDS`]
    /// (5,000,000), is ten times what Element writes; raise it only for a
    /// file the user trusts to be worth the wait.
    pub max_rounds: u32,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self { max_rounds: DEFAULT_MAX_ROUNDS }
    }
}

enum Pending {
    KeysUpload,
    KeysQuery(BTreeSet<UserId>),
    KeysClaim(Vec<(UserId, DeviceId)>),
    /// One to-device chunk of a room key share; `batch` names the share.
    RoomKeyShare {
        batch: String,
        devices: Vec<(UserId, DeviceId, String, u32)>,
        withheld: Vec<(UserId, DeviceId, String)>,
    },
    KeyRequest(String),
    Other,
}

struct State {
    account: OwnAccount,
    /// Request IDs are `newt-<id_prefix>-<next_id>`: random per machine (two
    /// processes sharing a store never collide), then a counter.
    id_prefix: u64,
    next_id: u64,
    queued: Vec<OutgoingRequest>,
    in_flight: BTreeMap<String, Pending>,
    queries_in_flight: BTreeSet<UserId>,
    changed_during_query: BTreeSet<UserId>,
    claim_failures: BTreeMap<(UserId, DeviceId), u64>,
    last_unwedge: BTreeMap<String, u64>,
    wedged: BTreeSet<(UserId, DeviceId)>,
    reports: Vec<KeysQueryReport>,
    flows: verification::Flows,
    share_batches: BTreeMap<String, ShareBatch>,
    /// Live outbound sessions by room, as last committed by this process.
    /// Every write of one is generation-checked by the store, so a stale
    /// entry (another process encrypted, shared or rotated) fails to commit
    /// and is reloaded; cleared whenever a commit fails.
    outbound: BTreeMap<RoomId, OutboundSession>,
    /// Unpickled inbound sessions; see [`InboundCache`].
    inbound: InboundCache,
}

/// A bounded LRU of unpickled inbound Megolm sessions with their records.
/// An entry is dropped when this process writes its session and on any
/// failed commit; a session another process improved (a lower first index)
/// is reloaded when the cached copy cannot decrypt an event.
#[derive(Default)]
struct InboundCache {
    entries: HashMap<(RoomId, String), CachedInbound>,
    tick: u64,
}

struct CachedInbound {
    record: InboundGroupSessionRecord,
    live: InboundGroupSession,
    used: u64,
}

/// What one decrypt call (one event, or a batch) reads once: the senders'
/// devices and identities, our trust material, and the replay records of the
/// batch not yet committed, by (session ID, index).
#[derive(Default)]
struct DecryptContext {
    devices: HashMap<UserId, Vec<DeviceRecord>>,
    owners: HashMap<UserId, Option<UserIdentity>>,
    material: Option<(Option<OwnIdentity>, Option<PrivateCrossSigningIdentity>)>,
    pending: HashMap<(String, u32), MessageIndexRecord>,
}

impl InboundCache {
    fn get_mut(&mut self, key: &(RoomId, String)) -> Option<&mut CachedInbound> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(key)?;
        entry.used = tick;
        Some(entry)
    }

    fn insert(&mut self, record: InboundGroupSessionRecord, live: InboundGroupSession) {
        if self.entries.len() >= INBOUND_CACHE_SIZE {
            let oldest = self.entries.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.tick += 1;
        let key = (record.room_id.clone(), record.session_id.clone());
        self.entries.insert(key, CachedInbound { record, live, used: self.tick });
    }

    fn remove(&mut self, room_id: &RoomId, session_id: &str) {
        if !self.entries.is_empty() {
            self.entries.remove(&(room_id.clone(), session_id.to_owned()));
        }
    }
}

/// The chunks of one `share_room_key` call: who got the key is recorded in
/// the outbound session once, when the last chunk is reported sent (one
/// write per share instead of one per chunk). If some chunk is never
/// reported, nothing is recorded and the next share sends the key again,
/// which is harmless.
struct ShareBatch {
    room_id: RoomId,
    session_id: String,
    remaining: usize,
    devices: Vec<(UserId, DeviceId, String, u32)>,
    withheld: Vec<(UserId, DeviceId, String)>,
}

impl State {
    fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("newt-{:016x}-{}", self.id_prefix, self.next_id)
    }
}

/// The end-to-end-encryption machine for one device.
///
/// Cheap to clone (shared state); all methods take `&self`.
#[derive(Clone)]
pub struct Machine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    user_id: UserId,
    device_id: DeviceId,
    state: Mutex<State>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("user_id", &self.inner.user_id)
            .field("device_id", &self.inner.device_id)
            .finish_non_exhaustive()
    }
}

/// Tells the core how many threads batch work may use by default: the core
/// count, at most 4 (asked once per process; the core itself reads nothing
/// from the OS). [`crate::set_max_threads`] overrides it.
fn set_default_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // `available_parallelism` reads cgroup files on Linux.
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        newt_proto::parallel::set_default_threads(cores.min(4));
    });
}

impl Machine {
    /// Opens the machine for `user_id`/`device_id` on `store`, creating the
    /// account on first use. Time comes from the [`SystemClock`].
    pub async fn open(
        store: Arc<dyn Store>,
        user_id: UserId,
        device_id: DeviceId,
    ) -> Result<Self, Error> {
        Self::open_with_clock(store, user_id, device_id, Arc::new(SystemClock)).await
    }

    /// [`open`](Self::open) with the time taken from `clock` (e.g. a
    /// [`ManualClock`](crate::ManualClock) in tests): every rule that
    /// depends on time (rotation by age, unwedging at most once an hour,
    /// verification timeouts, the upload lease) reads it there.
    pub async fn open_with_clock(
        store: Arc<dyn Store>,
        user_id: UserId,
        device_id: DeviceId,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        set_default_threads();
        let account = match store.account().await? {
            Some(record) => {
                if record.user_id != user_id || record.device_id != device_id {
                    return Err(Error::AccountMismatch {
                        user_id: record.user_id.to_string(),
                        device_id: record.device_id.to_string(),
                    });
                }
                OwnAccount::from_record(record)
            }
            None => {
                let mut account = OwnAccount::new(user_id.clone(), device_id.clone());
                account.prepare_initial_upload(clock.now_ms());
                let mut changes =
                    Changes { account: Some(account.initial_record()), ..Default::default() };
                // Track ourselves so our other devices are known.
                changes
                    .tracked_users
                    .push(TrackedUser { user_id: user_id.clone(), outdated: true });
                store.apply(changes).await?;
                account
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                clock,
                user_id,
                device_id,
                state: Mutex::new(State {
                    account,
                    id_prefix: rand::random(),
                    next_id: 0,
                    queued: Vec::new(),
                    in_flight: BTreeMap::new(),
                    queries_in_flight: BTreeSet::new(),
                    changed_during_query: BTreeSet::new(),
                    claim_failures: BTreeMap::new(),
                    last_unwedge: BTreeMap::new(),
                    wedged: BTreeSet::new(),
                    reports: Vec::new(),
                    flows: verification::Flows::default(),
                    share_batches: BTreeMap::new(),
                    outbound: BTreeMap::new(),
                    inbound: InboundCache::default(),
                }),
            }),
        })
    }

    /// Our user ID.
    pub fn user_id(&self) -> &UserId {
        &self.inner.user_id
    }

    /// Our device ID.
    pub fn device_id(&self) -> &DeviceId {
        &self.inner.device_id
    }

    /// Our identity keys: (Curve25519, Ed25519), unpadded base64.
    pub async fn identity_keys(&self) -> (String, String) {
        let st = self.inner.state.lock().await;
        let k = st.account.identity_keys();
        (k.curve25519.to_base64(), k.ed25519.to_base64())
    }

    /// Our signed device keys, as uploaded.
    pub async fn device_keys(&self) -> Value {
        self.inner.state.lock().await.account.device_keys()
    }

    fn store(&self) -> &dyn Store {
        self.inner.store.as_ref()
    }

    /// Now, from the machine's clock (ms since the Unix epoch).
    fn now(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// Commits `changes`, reloading the account from the store if the commit
    /// fails so that memory never runs ahead of disk.
    async fn commit(
        &self,
        st: &mut State,
        mut changes: Changes,
        account_changed: bool,
    ) -> Result<(), Error> {
        if account_changed {
            changes.account = Some(st.account.to_record());
        }
        if changes.is_empty() {
            return Ok(());
        }
        // Sessions written here are read again from the store next time.
        for s in &changes.inbound_group_sessions {
            st.inbound.remove(&s.room_id, &s.session_id);
        }
        match self.store().apply(changes).await {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Ok(Some(record)) = self.store().account().await {
                    st.account = OwnAccount::from_record(record);
                }
                // Caches may be ahead of the store (an advanced outbound
                // ratchet that was not committed): drop them.
                st.outbound.clear();
                st.inbound.entries.clear();
                Err(e.into())
            }
        }
    }

    /// Reloads the account if another process (sharing the store) wrote a
    /// newer generation, so this process never acts on a stale account
    /// (e.g. uploading one-time keys the other process already uploaded).
    async fn refresh_account(&self, st: &mut State) -> Result<(), Error> {
        if let Some(record) = self.store().account().await? {
            if record.generation > st.account.generation() {
                st.account = OwnAccount::from_record(record);
            }
        }
        Ok(())
    }

    /// Starts tracking the device lists of `users` (e.g. the members of an
    /// encrypted room). New users are queried on the next
    /// [`outgoing_requests`](Self::outgoing_requests).
    pub async fn update_tracked_users(
        &self,
        users: impl IntoIterator<Item = UserId>,
    ) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let tracked: BTreeSet<UserId> =
            self.store().tracked_users().await?.into_iter().map(|t| t.user_id).collect();
        let mut changes = Changes::default();
        for u in users {
            if !tracked.contains(&u) {
                changes.tracked_users.push(TrackedUser { user_id: u, outdated: true });
            }
        }
        self.commit(&mut st, changes, false).await
    }

    /// Processes the crypto parts of a sync response. Returns only after the
    /// to-device results, the ratchets they advanced, the one-time keys they
    /// consumed and `next_batch` are committed together.
    pub async fn receive_sync(&self, sync: SyncChanges) -> Result<SyncOutcome, Error> {
        let mut st = self.inner.state.lock().await;
        self.refresh_account(&mut st).await?;
        let now = self.now();
        let mut changes = Changes::default();
        let mut account_changed = false;

        // Device lists.
        let tracked: BTreeSet<UserId> =
            self.store().tracked_users().await?.into_iter().map(|t| t.user_id).collect();
        for u in sync.changed_users {
            if tracked.contains(&u) {
                if st.queries_in_flight.contains(&u) {
                    st.changed_during_query.insert(u.clone());
                }
                changes.tracked_users.push(TrackedUser { user_id: u, outdated: true });
            }
        }
        for u in sync.left_users {
            if u != self.inner.user_id && tracked.contains(&u) {
                changes.untracked_users.push(u);
            }
        }

        // One-time and fallback keys.
        account_changed |= st.account.update_key_counts(
            sync.one_time_key_count,
            sync.unused_fallback_key_types.as_deref(),
            now,
        );

        // To-device events.
        let checkpoint = Self::flow_checkpoint(&st);
        let mut batch = Batch::default();
        let mut outcome = SyncOutcome::default();
        for event in &sync.to_device_events {
            let processed =
                match self.process_to_device(&mut st, &mut batch, &mut changes, event, now).await {
                    Ok(processed) => processed,
                    Err(e) => {
                        // Nothing is committed: this sync will come again.
                        self.rollback_flows(&mut st, &checkpoint);
                        return Err(e);
                    }
                };
            account_changed |= batch.account_changed;
            batch.account_changed = false;
            outcome.to_device.push(processed);
        }
        for (_, sessions) in batch.olm_sessions {
            for i in sessions.dirty {
                if let Some(s) = sessions.live.get(i) {
                    changes.olm_sessions.push(s.to_record());
                }
            }
        }
        // Only now that this sync's pre-key messages were decrypted: a device
        // back online after the grace period still reads those waiting for it.
        account_changed |= st.account.forget_previous_fallback_key_if_due(now);
        changes.sync_token = sync.next_batch;
        self.settle_flows(&mut st, &checkpoint, Ok(()), changes, account_changed).await?;
        self.poll_verification_timeouts(&mut st, now).await?;
        st.queued.extend(batch.requests);
        Ok(outcome)
    }

    /// Every tracked user's stored devices by Curve25519 key, read once per
    /// sync batch and only when an Olm message came from a key none of its
    /// sender's devices has (so at most one scan per batch, and only after
    /// Olm authenticated the message).
    async fn key_holders<'b>(
        &self,
        batch: &'b mut Batch,
    ) -> Result<&'b HashMap<String, Vec<DeviceRecord>>, Error> {
        if batch.key_holders.is_none() {
            let users: Vec<UserId> =
                self.store().tracked_users().await?.into_iter().map(|t| t.user_id).collect();
            let mut holders: HashMap<String, Vec<DeviceRecord>> = HashMap::new();
            for d in self.store().devices_of(&users).await? {
                holders.entry(d.curve25519.clone()).or_default().push(d);
            }
            batch.key_holders = Some(holders);
        }
        batch.key_holders.as_ref().ok_or(Error::BadResponse("internal: key holders"))
    }

    async fn sessions_for<'b>(
        &self,
        batch: &'b mut Batch,
        sender_key: &str,
    ) -> Result<&'b mut BatchSessions, Error> {
        if !batch.olm_sessions.contains_key(sender_key) {
            let live = self
                .store()
                .olm_sessions(sender_key)
                .await?
                .into_iter()
                .map(OlmSession::from_record)
                .collect();
            batch
                .olm_sessions
                .insert(sender_key.to_owned(), BatchSessions { live, dirty: BTreeSet::new() });
        }
        batch.olm_sessions.get_mut(sender_key).ok_or(Error::BadResponse("internal: session cache"))
    }

    async fn process_to_device(
        &self,
        st: &mut State,
        batch: &mut Batch,
        changes: &mut Changes,
        event: &Value,
        now: u64,
    ) -> Result<ProcessedToDevice, Error> {
        let sender_str = event.get("sender").and_then(Value::as_str).unwrap_or_default().to_owned();
        let event_type = event.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
        let content = event.get("content").cloned().unwrap_or(Value::Null);
        let reject = |t: String, e: ToDeviceError| ProcessedToDevice {
            sender: sender_str.clone(),
            event_type: t,
            content: Value::Null,
            encrypted: false,
            sender_device: None,
            sender_key: None,
            sender_device_trust: None,
            outcome: ToDeviceOutcome::Rejected(e),
        };
        let Ok(sender) = UserId::parse(sender_str.as_str()) else {
            return Ok(reject(event_type, ToDeviceError::Malformed("sender")));
        };
        if !content.is_object() {
            return Ok(reject(event_type, ToDeviceError::Malformed("content")));
        }

        if event_type != "m.room.encrypted" {
            if KEY_CARRYING_TYPES.contains(&event_type.as_str()) {
                return Ok(reject(event_type.clone(), ToDeviceError::NotOverOlm(event_type)));
            }
            let outcome = match event_type.as_str() {
                "m.room_key.withheld" => match parse_withheld(&sender, &content) {
                    Some(w) => {
                        changes.withheld.push(w);
                        ToDeviceOutcome::WithheldStored
                    }
                    None => ToDeviceOutcome::Handled,
                },
                "m.room_key_request" => {
                    self.handle_key_request(st, batch, &sender, &content, now).await?
                }
                t if t.starts_with(VERIFICATION_PREFIX) => {
                    self.handle_verification_event(st, changes, &sender, t, &content, now).await?
                }
                _ => ToDeviceOutcome::ForApp,
            };
            return Ok(ProcessedToDevice {
                sender: sender_str,
                event_type,
                content,
                encrypted: false,
                sender_device: None,
                sender_key: None,
                sender_device_trust: None,
                outcome,
            });
        }

        if content.get("algorithm").and_then(Value::as_str) != Some(OLM_V1) {
            return Ok(reject(event_type, ToDeviceError::Malformed("algorithm")));
        }
        let sender_key = match content.get("sender_key").and_then(Value::as_str) {
            Some(k) => k.trim_end_matches('=').to_owned(),
            None => return Ok(reject(event_type, ToDeviceError::Malformed("sender_key"))),
        };
        let sender_devices = self.store().devices(&sender).await?;
        let sessions = self.sessions_for(batch, &sender_key).await?;
        let result = olm::decrypt(
            &mut st.account,
            &sender,
            &content,
            &mut sessions.live,
            &sender_devices,
            now,
        );
        let decrypted = match result {
            Ok(d) => {
                sessions.dirty.insert(d.session_index);
                batch.account_changed |= d.account_changed;
                d.event
            }
            Err(e) => {
                if let OlmError::Wedged { sender_key } = &e {
                    self.note_wedged(st, &sender_devices, sender_key, now);
                }
                return Ok(reject(event_type, e.into()));
            }
        };
        if !sender_devices.iter().any(|d| d.curve25519 == sender_key) {
            // A key none of the sender's known devices has, authenticated by
            // Olm: refused if another user's known device has these keys.
            let holders = self.key_holders(batch).await?.get(&sender_key);
            let holders = holders.map(Vec::as_slice).unwrap_or(&[]);
            if let Err(e) = olm::check_key_owner(&decrypted, holders) {
                return Ok(reject(event_type, OlmError::Check(e).into()));
            }
        }
        let sender_device = decrypted.sender_device.as_ref().map(|d| d.device_id.clone());
        let inner_type = decrypted.event_type.clone();
        let outcome = match inner_type.as_str() {
            "m.room_key" => match session_from_room_key(&decrypted) {
                Ok(record) => self.store_inbound(batch, changes, record).await?,
                Err(e) => ToDeviceOutcome::Rejected(e.into()),
            },
            "m.forwarded_room_key" => {
                let room = decrypted
                    .content
                    .get("room_id")
                    .and_then(Value::as_str)
                    .and_then(|r| RoomId::parse(r).ok());
                let session_id =
                    decrypted.content.get("session_id").and_then(Value::as_str).unwrap_or_default();
                let pending = match &room {
                    Some(room) => self.store().key_request_for_session(room, session_id).await?,
                    None => None,
                };
                let own_curve = st.account.curve25519_key().to_base64();
                let (own_identity, private) = self.trust_material().await?;
                let accepted = {
                    let root = TrustRoot::new(&st.account, own_identity.as_ref(), private.as_ref());
                    accept_forwarded_key(
                        &root,
                        &self.inner.user_id,
                        &own_curve,
                        &decrypted,
                        pending.as_ref(),
                    )
                };
                match accepted {
                    Ok(record) => {
                        if let Some(p) = pending {
                            changes.removed_key_requests.push(p.request_id.clone());
                            // Tell our other devices to stop looking.
                            let cancel = request_content(&self.inner.device_id, &p, None, true);
                            let id = st.next_id();
                            batch.requests.push(to_device_request(
                                id,
                                "m.room_key_request",
                                [(self.inner.user_id.clone(), "*".to_owned(), cancel)],
                            ));
                        }
                        self.store_inbound(batch, changes, record).await?
                    }
                    Err(e) => ToDeviceOutcome::Rejected(e.into()),
                }
            }
            "m.room_key_request" => {
                self.handle_key_request(st, batch, &sender, &decrypted.content, now).await?
            }
            "m.dummy" => ToDeviceOutcome::Handled,
            t if t.starts_with(VERIFICATION_PREFIX) => {
                self.handle_verification_event(st, changes, &sender, t, &decrypted.content, now)
                    .await?
            }
            _ => ToDeviceOutcome::ForApp,
        };
        let mut content = decrypted.content;
        if matches!(inner_type.as_str(), "m.room_key" | "m.forwarded_room_key") {
            // Stored (or refused) here: the app gets what the key was for,
            // not the key.
            if let Some(Value::String(mut key)) =
                content.as_object_mut().and_then(|c| c.remove("session_key"))
            {
                zeroize::Zeroize::zeroize(&mut key);
            }
        }
        let stored_sender = decrypted.sender_device.as_ref().filter(|d| {
            !d.deleted
                && sender_devices
                    .iter()
                    .any(|s| s.device_id == d.device_id && s.curve25519 == d.curve25519)
        });
        let sender_device_trust = match (&outcome, stored_sender) {
            (ToDeviceOutcome::ForApp, Some(d)) => Some(self.trust_in_device(st, d).await?),
            _ => None,
        };
        Ok(ProcessedToDevice {
            sender: sender_str,
            event_type: inner_type,
            content,
            encrypted: true,
            sender_device,
            sender_key: Some(decrypted.sender_key),
            sender_device_trust,
            outcome,
        })
    }

    /// This device's verdict on a stored `device` (its owner's identity and
    /// ours read from the store).
    async fn trust_in_device(
        &self,
        st: &State,
        device: &DeviceRecord,
    ) -> Result<DeviceTrust, Error> {
        let own_user = device.user_id == self.inner.user_id;
        let owner = if own_user { None } else { self.user_identity(&device.user_id).await? };
        let (own, private) = self.trust_material().await?;
        let root = TrustRoot::new(&st.account, own.as_ref(), private.as_ref());
        Ok(root.device_trust(owner.as_ref(), device))
    }

    fn note_wedged(
        &self,
        st: &mut State,
        sender_devices: &[DeviceRecord],
        sender_key: &str,
        now: u64,
    ) {
        let recent = st
            .last_unwedge
            .get(sender_key)
            .is_some_and(|t| now.saturating_sub(*t) < UNWEDGE_INTERVAL_MS);
        if recent {
            return;
        }
        if let Some(d) = sender_devices.iter().find(|d| d.curve25519 == sender_key && !d.deleted) {
            st.wedged.insert((d.user_id.clone(), d.device_id.clone()));
        }
    }

    async fn store_inbound(
        &self,
        batch: &mut Batch,
        changes: &mut Changes,
        record: InboundGroupSessionRecord,
    ) -> Result<ToDeviceOutcome, Error> {
        let key = (record.room_id.clone(), record.session_id.clone());
        let existing = match batch.inbound.get(&key) {
            Some(i) => changes.inbound_group_sessions.get(*i).map(clone_record).transpose()?,
            None => self.store().inbound_group_session(&key.0, &key.1).await?,
        };
        if let Some(existing) = existing {
            match should_replace(&existing, &record) {
                Ok(true) => {}
                Ok(false) => return Ok(ToDeviceOutcome::Handled),
                Err(e) => return Ok(ToDeviceOutcome::Rejected(e.into())),
            }
        }
        batch.inbound.insert(key.clone(), changes.inbound_group_sessions.len());
        changes.inbound_group_sessions.push(record);
        Ok(ToDeviceOutcome::RoomKeyStored(key.0, key.1))
    }

    async fn handle_key_request(
        &self,
        st: &mut State,
        batch: &mut Batch,
        sender: &UserId,
        content: &Value,
        now: u64,
    ) -> Result<ToDeviceOutcome, Error> {
        let request = match parse_request(sender, content) {
            Ok(r) => r,
            Err(e) => return Ok(ToDeviceOutcome::Rejected(e.into())),
        };
        let from_self = sender == &self.inner.user_id && request.device_id == self.inner.device_id;
        if request.cancellation || from_self {
            // Our own request echoed back by a `*` fan-out, or a cancellation.
            return Ok(ToDeviceOutcome::Handled);
        }
        let own_devices = if sender == &self.inner.user_id {
            self.store().devices(sender).await?
        } else {
            Vec::new()
        };
        let requester = own_devices.iter().find(|d| d.device_id == request.device_id);
        let session = match (&request.room_id, &request.session_id) {
            (Some(r), Some(s)) => self.store().inbound_group_session(r, s).await?,
            _ => None,
        };
        let own_curve = st.account.curve25519_key().to_base64();
        let (own_identity, private) = self.trust_material().await?;
        let answer = {
            let root = TrustRoot::new(&st.account, own_identity.as_ref(), private.as_ref());
            answer_request(
                &root,
                &self.inner.user_id,
                &own_curve,
                &request,
                requester,
                session.as_ref(),
            )
        };
        let forwarded = match answer {
            Ok(c) => c,
            Err(e) => return Ok(ToDeviceOutcome::Rejected(e.into())),
        };
        let Some(device) = requester else { return Ok(ToDeviceOutcome::Handled) };
        let sessions = self.sessions_for(batch, &device.curve25519).await?;
        let Some(i) = olm::preferred_session(&sessions.live) else {
            // No channel to the device yet; it will ask again.
            return Ok(ToDeviceOutcome::Handled);
        };
        let encrypted = match olm::encrypt(
            &st.account,
            &mut sessions.live[i],
            device,
            "m.forwarded_room_key",
            forwarded,
        ) {
            Ok(c) => c,
            Err(e) => return Ok(ToDeviceOutcome::Rejected(e.into())),
        };
        sessions.dirty.insert(i);
        let _ = now;
        let id = st.next_id();
        batch.requests.push(to_device_request(
            id,
            "m.room.encrypted",
            [(device.user_id.clone(), device.device_id.to_string(), encrypted)],
        ));
        Ok(ToDeviceOutcome::KeyRequestAnswered)
    }

    /// The requests to send now: key upload, device queries, queued
    /// to-device messages and key requests. Each must be reported with
    /// [`mark_request_sent`](Self::mark_request_sent).
    pub async fn outgoing_requests(&self) -> Result<Vec<OutgoingRequest>, Error> {
        let mut st = self.inner.state.lock().await;
        self.refresh_account(&mut st).await?;
        let mut out = Vec::new();
        self.poll_verification_timeouts(&mut st, self.now()).await?;
        let upload_in_flight = st.in_flight.values().any(|p| matches!(p, Pending::KeysUpload));
        let now = self.now();
        if !upload_in_flight && !st.account.upload_leased(now) {
            if let Some(body) = st.account.keys_upload_body() {
                // Take the upload lease in the store first: if another process
                // sharing the store took it (or changed the account), the
                // commit fails with StaleGeneration and we do not upload.
                st.account.take_upload_lease(now);
                match self.commit(&mut st, Changes::default(), true).await {
                    Ok(()) => {
                        let id = st.next_id();
                        st.in_flight.insert(id.clone(), Pending::KeysUpload);
                        out.push(OutgoingRequest { id, kind: RequestKind::KeysUpload { body } });
                    }
                    Err(Error::Store(StoreError::StaleGeneration { .. })) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let outdated: BTreeSet<UserId> = self
            .store()
            .tracked_users()
            .await?
            .into_iter()
            .filter(|t| t.outdated && !st.queries_in_flight.contains(&t.user_id))
            .map(|t| t.user_id)
            .collect();
        if !outdated.is_empty() {
            let id = st.next_id();
            st.queries_in_flight.extend(outdated.iter().cloned());
            out.push(OutgoingRequest {
                id: id.clone(),
                kind: RequestKind::KeysQuery { body: keys_query_body(&outdated) },
            });
            st.in_flight.insert(id, Pending::KeysQuery(outdated));
        }
        // Key requests not yet sent (and not in flight), to all our own
        // devices. They are marked sent only when the caller reports success.
        for request in self.store().unsent_key_requests().await? {
            let in_flight = st
                .in_flight
                .values()
                .any(|p| matches!(p, Pending::KeyRequest(id) if *id == request.request_id));
            if in_flight {
                continue;
            }
            let content = request_content(&self.inner.device_id, &request, None, false);
            let id = st.next_id();
            st.in_flight.insert(id.clone(), Pending::KeyRequest(request.request_id.clone()));
            out.push(to_device_request(
                id,
                "m.room_key_request",
                [(self.inner.user_id.clone(), "*".to_owned(), content)],
            ));
        }
        for r in std::mem::take(&mut st.queued) {
            if !st.in_flight.contains_key(&r.id) {
                st.in_flight.insert(r.id.clone(), Pending::Other);
            }
            out.push(r);
        }
        Ok(out)
    }

    /// Reports that request `id` was sent and the server answered `response`.
    pub async fn mark_request_sent(&self, id: &str, response: &Value) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let pending =
            st.in_flight.remove(id).ok_or_else(|| Error::UnknownRequest(id.to_owned()))?;
        match pending {
            Pending::KeysUpload => {
                let count = response
                    .get("one_time_key_counts")
                    .and_then(|c| c.get(SIGNED_CURVE25519))
                    .and_then(Value::as_u64);
                if response.get("one_time_key_counts").is_none() {
                    return Err(Error::BadResponse("keys/upload: one_time_key_counts"));
                }
                st.account.mark_keys_uploaded(Some(count.unwrap_or(0)), self.now());
                self.commit(&mut st, Changes::default(), true).await
            }
            Pending::KeysQuery(users) => {
                for u in &users {
                    st.queries_in_flight.remove(u);
                }
                let mut known = BTreeMap::new();
                for u in &users {
                    known.insert(u.clone(), self.store().devices(u).await?);
                }
                let outcome = handle_keys_query(&st.account, &users, &known, response)?;
                let mut changes = outcome.changes;
                let mut report =
                    KeysQueryReport { rejected: outcome.rejected, ..Default::default() };
                self.handle_identities(&st.account, &users, response, &mut changes, &mut report)
                    .await?;
                // A change notice that arrived while the query was in flight
                // makes this answer stale: keep the user outdated.
                for t in &mut changes.tracked_users {
                    if st.changed_during_query.remove(&t.user_id) {
                        t.outdated = true;
                    }
                }
                for (u, d) in &outcome.new_devices {
                    st.claim_failures.remove(&(u.clone(), d.clone()));
                }
                self.commit(&mut st, changes, false).await?;
                if !report.is_empty() {
                    if st.reports.len() >= MAX_REPORTS {
                        st.reports.remove(0);
                    }
                    st.reports.push(report);
                }
                Ok(())
            }
            Pending::KeysClaim(requested) => {
                self.handle_claim_response(&mut st, &requested, response).await
            }
            Pending::RoomKeyShare { batch, devices, withheld } => {
                let Some(b) = st.share_batches.get_mut(&batch) else { return Ok(()) };
                b.devices.extend(devices);
                b.withheld.extend(withheld);
                b.remaining -= 1;
                if b.remaining > 0 {
                    return Ok(());
                }
                let Some(b) = st.share_batches.remove(&batch) else { return Ok(()) };
                // The cached session if it is still this one; if another
                // process wrote it since, the commit is refused: re-read.
                let mut cached = st.outbound.remove(&b.room_id);
                for attempt in 0..2 {
                    let mut session = match cached.take() {
                        Some(s) if s.session_id() == b.session_id => s,
                        _ => match self.store().outbound_group_session(&b.room_id).await? {
                            Some(r) if r.session_id == b.session_id => {
                                OutboundSession::from_record(r)
                            }
                            _ => return Ok(()), // rotated or discarded meanwhile
                        },
                    };
                    let shared_with = Arc::make_mut(&mut session.meta.shared_with);
                    for (u, d, sender_key, message_index) in &b.devices {
                        let info = ShareInfo {
                            sender_key: sender_key.clone(),
                            message_index: *message_index,
                        };
                        shared_with.entry(u.clone()).or_default().insert(d.clone(), info);
                    }
                    let withheld_to = Arc::make_mut(&mut session.meta.withheld_to);
                    for (u, d, code) in &b.withheld {
                        withheld_to.entry(u.clone()).or_default().insert(d.clone(), code.clone());
                    }
                    match self.commit_outbound(&mut st, &b.room_id, session).await {
                        Err(Error::Store(StoreError::StaleGeneration { .. })) if attempt == 0 => {}
                        result => return result,
                    }
                }
                Ok(())
            }
            Pending::KeyRequest(request_id) => {
                let Some(mut request) = self.store().key_request(&request_id).await? else {
                    return Ok(()); // answered meanwhile
                };
                request.sent = true;
                let changes = Changes { key_requests: vec![request], ..Default::default() };
                self.commit(&mut st, changes, false).await
            }
            Pending::Other => Ok(()),
        }
    }

    /// The `/keys/claim` request for devices of `users` that have no Olm
    /// session yet (and for wedged channels), or `None` if there are none.
    /// Devices whose last claim failed are skipped for 15 minutes.
    pub async fn get_missing_sessions(
        &self,
        users: impl IntoIterator<Item = UserId>,
    ) -> Result<Option<OutgoingRequest>, Error> {
        let mut st = self.inner.state.lock().await;
        let now = self.now();
        let own_curve = st.account.curve25519_key().to_base64();
        if st.in_flight.values().any(|p| matches!(p, Pending::KeysClaim(_))) {
            return Ok(None);
        }
        let users: BTreeSet<UserId> = users.into_iter().collect();
        let users: Vec<UserId> = users.into_iter().collect();
        let mut candidates = Vec::new();
        for d in self.store().devices_of(&users).await? {
            if d.deleted || d.curve25519 == own_curve {
                continue;
            }
            let key = (d.user_id, d.device_id);
            if st.wedged.contains(&key)
                || st.claim_failures.get(&key).is_some_and(|until| *until > now)
            {
                continue;
            }
            candidates.push((key, d.curve25519));
        }
        // One batched read: which of these devices already have a session.
        let keys: Vec<&str> = candidates.iter().map(|(_, k)| k.as_str()).collect();
        let with_session: HashSet<String> =
            self.store().sender_keys_with_olm_sessions(&keys).await?;
        let mut missing: Vec<(UserId, DeviceId)> = st.wedged.iter().cloned().collect();
        missing.extend(
            candidates
                .into_iter()
                .filter(|(_, curve)| !with_session.contains(curve))
                .map(|(k, _)| k),
        );
        if missing.is_empty() {
            return Ok(None);
        }
        // Sorted and unique, as the request body and the retry bookkeeping expect.
        missing.sort_unstable();
        missing.dedup();
        let id = st.next_id();
        let body = keys_claim_body(&missing);
        st.in_flight.insert(id.clone(), Pending::KeysClaim(missing));
        Ok(Some(OutgoingRequest { id, kind: RequestKind::KeysClaim { body } }))
    }

    async fn handle_claim_response(
        &self,
        st: &mut State,
        requested: &[(UserId, DeviceId)],
        response: &Value,
    ) -> Result<(), Error> {
        if !response.is_object() {
            return Err(Error::BadResponse("keys/claim: not an object"));
        }
        let now = self.now();
        let mut devices = BTreeMap::new();
        let users: BTreeSet<&UserId> = requested.iter().map(|(u, _)| u).collect();
        let users: Vec<UserId> = users.into_iter().cloned().collect();
        for d in self.store().devices_of(&users).await? {
            devices.insert((d.user_id.clone(), d.device_id.clone()), d);
        }
        let outcome = handle_keys_claim(&st.account, requested, &devices, response, now);
        let mut changes = Changes::default();
        for (u, d, _) in &outcome.failures {
            st.claim_failures.insert((u.clone(), d.clone()), now + CLAIM_FAILURE_BACKOFF_MS);
        }
        let mut dummies = Vec::new();
        for (u, d, record) in outcome.sessions {
            let key = (u, d);
            st.claim_failures.remove(&key);
            if st.wedged.remove(&key) {
                // A fresh session to unwedge the channel: announce it with m.dummy.
                if let Some(device) = devices.get(&key) {
                    let mut live = OlmSession::from_record(record);
                    st.last_unwedge.insert(device.curve25519.clone(), now);
                    if let Ok(c) =
                        olm::encrypt(&st.account, &mut live, device, "m.dummy", json!({}))
                    {
                        dummies.push((key.0.clone(), key.1.to_string(), c));
                    }
                    changes.olm_sessions.push(live.to_record());
                    continue;
                }
            }
            changes.olm_sessions.push(record);
        }
        self.commit(st, changes, false).await?;
        if !dummies.is_empty() {
            let id = st.next_id();
            st.queued.push(to_device_request(id, "m.room.encrypted", dummies));
        }
        Ok(())
    }

    /// Shares the room key of `room_id` with every device of `members`,
    /// rotating the outbound session first if it expired or a member or
    /// device left. Returns the to-device requests to send (they are also
    /// handed out by [`outgoing_requests`](Self::outgoing_requests) if not
    /// marked sent). Call after the members' device lists were queried and
    /// [`get_missing_sessions`](Self::get_missing_sessions) answered.
    pub async fn share_room_key(
        &self,
        room_id: &RoomId,
        members: impl IntoIterator<Item = UserId>,
        settings: &RoomSettings,
    ) -> Result<Vec<OutgoingRequest>, Error> {
        let mut st = self.inner.state.lock().await;
        let members: BTreeSet<UserId> = members.into_iter().collect();
        // Another process (e.g. a notification extension encrypting in this
        // room) may write the outbound session or an Olm session between
        // our reads and our commit: the commit is refused, nothing is
        // written, and the share runs again on what is stored now. What the
        // refused attempt encrypted was never handed out.
        match self.share_room_key_once(&mut st, room_id, &members, settings).await {
            Err(Error::Store(StoreError::StaleGeneration { .. })) => {
                self.share_room_key_once(&mut st, room_id, &members, settings).await
            }
            result => result,
        }
    }

    async fn share_room_key_once(
        &self,
        st: &mut State,
        room_id: &RoomId,
        members: &BTreeSet<UserId>,
        settings: &RoomSettings,
    ) -> Result<Vec<OutgoingRequest>, Error> {
        let now = self.now();
        let mut devices_by_user: BTreeMap<UserId, Vec<DeviceRecord>> =
            members.iter().map(|u| (u.clone(), Vec::new())).collect();
        let member_list: Vec<UserId> = members.iter().cloned().collect();
        for d in self.store().devices_of(&member_list).await? {
            if let Some(devices) = devices_by_user.get_mut(&d.user_id) {
                devices.push(d);
            }
        }
        let device_trust =
            if settings.policy.needs_device_trust() || settings.block_on_verification_violation {
                let (own_identity, private) = self.trust_material().await?;
                let mut identities = BTreeMap::new();
                for u in members.iter().filter(|u| **u != self.inner.user_id) {
                    if let Some(i) = self.user_identity(u).await? {
                        identities.insert(u.clone(), i);
                    }
                }
                let root = TrustRoot::new(&st.account, own_identity.as_ref(), private.as_ref());
                if settings.block_on_verification_violation {
                    let violating: Vec<UserId> = identities
                        .values()
                        .filter(|i| root.identity_trust(i) == IdentityTrust::VerificationViolation)
                        .map(|i| i.user_id().clone())
                        .collect();
                    if !violating.is_empty() {
                        return Err(Error::VerificationViolation(violating));
                    }
                }
                let mut trust = BTreeMap::new();
                for d in devices_by_user.values().flatten() {
                    let t = root.device_trust(identities.get(&d.user_id), d);
                    trust.insert((d.user_id.clone(), d.device_id.clone()), t);
                }
                trust
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
        // The store's record, not the cache: it has other processes' writes.
        // An update is one generation past the stored record; a new session
        // starts at generation 0 (the store's rule for outbound sessions).
        let mut outbound = match self.store().outbound_group_session(room_id).await? {
            Some(r) => {
                let mut s = OutboundSession::from_record(r);
                if s.expired(&settings.rotation, now)
                    || audience_shrank(&s, members, &devices_by_user, trust_of, settings.policy)
                {
                    None
                } else {
                    s.meta.generation += 1;
                    Some(s)
                }
            }
            None => None,
        };
        if outbound.is_none() {
            let s = OutboundSession::new(room_id.clone(), settings.rotation.clone(), now);
            changes.inbound_group_sessions.push(s.own_inbound(&st.account));
            outbound = Some(s);
        }
        let Some(outbound) = outbound else {
            return Err(Error::NoOutboundSession(room_id.clone()));
        };

        let all: Vec<DeviceRecord> = devices_by_user.into_values().flatten().collect();
        // Every recipient's Olm sessions in one read, unpickled on every core.
        let keys: BTreeSet<&str> = all.iter().map(|d| d.curve25519.as_str()).collect();
        let keys: Vec<&str> = keys.into_iter().collect();
        let mut sessions: BTreeMap<String, Vec<OlmSession>> =
            keys.iter().map(|k| ((*k).to_owned(), Vec::new())).collect();
        let records = self.store().olm_sessions_of(&keys).await?;
        for live in newt_proto::parallel::map_owned(records, 64, OlmSession::from_record) {
            if let Some(list) = sessions.get_mut(&live.sender_key) {
                list.push(live);
            }
        }
        let plan = plan_share(
            &st.account,
            &outbound,
            &all,
            |d| sessions.get(&d.curve25519).is_some_and(|s| !s.is_empty()),
            trust_of,
            settings.policy,
        );
        let room_key = outbound.room_key_content(settings.shared_history);
        let index = outbound.session.message_index();
        let mut messages = Vec::new();
        let mut shared = Vec::new();
        // Encrypt to each recipient key on every core (its sessions move into
        // the job); a second device with the same key, if any, waits for a
        // second, sequential round.
        let mut jobs = Vec::with_capacity(plan.share.len());
        let mut second_round = Vec::new();
        changes.olm_sessions.reserve(plan.share.len());
        for d in &plan.share {
            match sessions.remove(&d.curve25519) {
                Some(live) => jobs.push((d, live)),
                None => second_round.push(d),
            }
        }
        let plaintext = olm::OlmPlaintext::new(&st.account, "m.room_key", &room_key)
            .map_err(|_| Error::BadResponse("olm encryption failed"))?;
        let encrypt_to = |d: &DeviceRecord, live: &mut [OlmSession]| {
            olm::preferred_session(live).map(|i| {
                plaintext.encrypt(&mut live[i], d).map(|content| (content, live[i].to_record()))
            })
        };
        let mut outcomes = Vec::with_capacity(plan.share.len());
        let encrypted = newt_proto::parallel::map_owned(jobs, 16, |(d, mut live)| {
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
        // A recipient without an Olm session gets nothing here.
        for (d, result) in outcomes {
            let Some(result) = result else { continue };
            let (content, record) =
                result.map_err(|_| Error::BadResponse("olm encryption failed"))?;
            changes.olm_sessions.push(record);
            messages.push((d.user_id.clone(), d.device_id.to_string(), content));
            shared.push((d.user_id.clone(), d.device_id.clone(), d.curve25519.clone(), index));
        }
        let mut withheld_messages = Vec::new();
        let mut withheld = Vec::new();
        for (d, code) in &plan.withhold {
            withheld_messages.push((
                d.user_id.clone(),
                d.device_id.to_string(),
                withheld_content(&st.account, &outbound, *code),
            ));
            withheld.push((d.user_id.clone(), d.device_id.clone(), code.as_str().to_owned()));
        }
        let session_id = outbound.session_id();
        changes.outbound_group_sessions.push(outbound.to_record());
        st.outbound.remove(room_id);
        self.commit(st, changes, false).await?;
        st.outbound.insert(room_id.clone(), outbound);

        let mut out = Vec::new();
        let batch = st.next_id();
        let chunk_count = messages.chunks(TO_DEVICE_CHUNK).count()
            + withheld_messages.chunks(TO_DEVICE_CHUNK).count();
        if chunk_count > 0 {
            st.share_batches.insert(
                batch.clone(),
                ShareBatch {
                    room_id: room_id.clone(),
                    session_id: session_id.clone(),
                    remaining: chunk_count,
                    devices: Vec::new(),
                    withheld: Vec::new(),
                },
            );
        }
        let mut shared_iter = shared.into_iter();
        for chunk in newt_proto::parallel::owned_chunks(messages, TO_DEVICE_CHUNK) {
            let id = st.next_id();
            let devices: Vec<_> = shared_iter.by_ref().take(chunk.len()).collect();
            let pending =
                Pending::RoomKeyShare { batch: batch.clone(), devices, withheld: Vec::new() };
            st.in_flight.insert(id.clone(), pending);
            out.push(to_device_request(id, "m.room.encrypted", chunk));
        }
        let mut withheld_iter = withheld.into_iter();
        for chunk in newt_proto::parallel::owned_chunks(withheld_messages, TO_DEVICE_CHUNK) {
            let id = st.next_id();
            let w: Vec<_> = withheld_iter.by_ref().take(chunk.len()).collect();
            let pending =
                Pending::RoomKeyShare { batch: batch.clone(), devices: Vec::new(), withheld: w };
            st.in_flight.insert(id.clone(), pending);
            out.push(to_device_request(id, "m.room_key.withheld", chunk));
        }
        Ok(out)
    }

    /// Stores `session` one generation on and, once stored, caches it as
    /// the room's live session. If another process wrote the room's session
    /// since this copy was loaded, the store refuses with
    /// [`StoreError::StaleGeneration`], nothing is written or cached, and
    /// the caller reloads from the store.
    async fn commit_outbound(
        &self,
        st: &mut State,
        room_id: &RoomId,
        mut session: OutboundSession,
    ) -> Result<(), Error> {
        session.meta.generation += 1;
        let changes =
            Changes { outbound_group_sessions: vec![session.to_record()], ..Default::default() };
        self.commit(st, changes, false).await?;
        st.outbound.insert(room_id.clone(), session);
        Ok(())
    }

    /// Encrypts a room event with the room's outbound session. The advanced
    /// ratchet is committed before the ciphertext is returned.
    pub async fn encrypt_room_event(
        &self,
        room_id: &RoomId,
        event_type: &str,
        content: Value,
    ) -> Result<Value, Error> {
        let mut st = self.inner.state.lock().await;
        let now = self.now();
        // The live session is cached; every advance is committed (generation
        // checked) before the ciphertext is returned. If another process
        // wrote the room's session since, the commit is refused: reload,
        // encrypt again, and never return the refused ciphertext.
        for attempt in 0..2 {
            let cached = if attempt == 0 { st.outbound.remove(room_id) } else { None };
            let mut session = match cached {
                Some(s) => s,
                None => OutboundSession::from_record(
                    self.store()
                        .outbound_group_session(room_id)
                        .await?
                        .ok_or_else(|| Error::NoOutboundSession(room_id.clone()))?,
                ),
            };
            let settings = session.meta.settings.clone();
            if session.expired(&settings, now) {
                return Err(Error::NoOutboundSession(room_id.clone()));
            }
            let encrypted = session.encrypt_ref(&st.account, event_type, &content);
            match self.commit_outbound(&mut st, room_id, session).await {
                Err(Error::Store(StoreError::StaleGeneration { .. })) if attempt == 0 => {}
                result => return result.map(|()| encrypted),
            }
        }
        Err(Error::NoOutboundSession(room_id.clone()))
    }

    /// Decrypts an `m.room.encrypted` room event (the whole event JSON).
    ///
    /// When the key is missing the error is [`MegolmError::MissingSession`],
    /// carrying the withheld notice if the sender told us why.
    pub async fn decrypt_room_event(
        &self,
        room_id: &RoomId,
        event: &Value,
    ) -> Result<DecryptedRoomEvent, Error> {
        let parsed = parse_room_event(event)?;
        // The replay check reads then writes: hold the lock so two decrypts
        // of different events at one index cannot both pass.
        let mut st = self.inner.state.lock().await;
        let mut ctx = DecryptContext::default();
        let (decrypted, record) =
            self.decrypt_parsed(&mut st, &mut ctx, room_id, parsed, None).await?;
        if let Some(record) = record {
            let changes = Changes { message_indices: vec![record], ..Default::default() };
            self.commit(&mut st, changes, false).await?;
        }
        Ok(decrypted)
    }

    /// Decrypts several `m.room.encrypted` events of one room (a timeline
    /// page, a backfill) with the same checks as
    /// [`decrypt_room_event`](Self::decrypt_room_event), one result per
    /// event in order. The replay records of the whole batch are committed
    /// together, once, before any plaintext is returned; a replay is
    /// detected within the batch as well as against earlier batches. The
    /// sender's devices and identity are read once per sender per batch.
    /// A storage failure fails the whole call (and returns no plaintext).
    pub async fn decrypt_room_events(
        &self,
        room_id: &RoomId,
        events: &[Value],
    ) -> Result<Vec<Result<DecryptedRoomEvent, Error>>, Error> {
        let mut st = self.inner.state.lock().await;
        let mut ctx = DecryptContext::default();
        let mut out = Vec::with_capacity(events.len());
        let parsed: Vec<_> = events.iter().map(parse_room_event).collect();
        let mut ahead = self.decrypt_ahead(&mut st, room_id, &parsed).await?.into_iter();
        for parsed in parsed {
            let ahead = ahead.next().flatten();
            let parsed = match parsed {
                Ok(p) => p,
                Err(e) => {
                    out.push(Err(e.into()));
                    continue;
                }
            };
            match self.decrypt_parsed(&mut st, &mut ctx, room_id, parsed, ahead).await {
                Ok((decrypted, record)) => {
                    if let Some(record) = record {
                        ctx.pending.insert((record.session_id.clone(), record.index), record);
                    }
                    out.push(Ok(decrypted));
                }
                Err(Error::Store(e)) => return Err(e.into()),
                Err(e) => out.push(Err(e)),
            }
        }
        let records = ctx.pending.into_values().collect();
        let changes = Changes { message_indices: records, ..Default::default() };
        self.commit(&mut st, changes, false).await?;
        Ok(out)
    }

    /// The Megolm step of a batch's events (signature, MAC, cipher), run
    /// ahead on every core: for each session with enough events in the
    /// batch, each thread decrypts a contiguous share of them with its own
    /// copy of the cached session. An event left `None` (a small group, an
    /// unknown session, a failure) takes the ordinary path, which decrypts
    /// it again and reports the error; nothing here is a verdict.
    async fn decrypt_ahead(
        &self,
        st: &mut State,
        room_id: &RoomId,
        parsed: &[Result<EncryptedRoomEvent, MegolmError>],
    ) -> Result<Vec<Option<DecryptedMessage>>, Error> {
        const MIN_PER_THREAD: usize = 32;
        let mut ahead = vec![None; parsed.len()];
        let mut by_session: BTreeMap<&str, Vec<(usize, &MegolmMessage)>> = BTreeMap::new();
        for (i, p) in parsed.iter().enumerate() {
            if let Ok(p) = p {
                by_session.entry(p.session_id.as_str()).or_default().push((i, &p.message));
            }
        }
        for (session_id, messages) in by_session {
            let threads = newt_proto::parallel::threads_for(messages.len(), MIN_PER_THREAD);
            if threads < 2 {
                continue;
            }
            let key = (room_id.clone(), session_id.to_owned());
            if st.inbound.get_mut(&key).is_none() {
                let Some(record) = self.store().inbound_group_session(room_id, session_id).await?
                else {
                    continue;
                };
                let Ok(live) = live_inbound(&record) else { continue };
                st.inbound.insert(record, live);
            }
            let Some(entry) = st.inbound.get_mut(&key) else { continue };
            let per_thread = messages.len().div_ceil(threads);
            let jobs: Vec<_> = newt_proto::parallel::owned_chunks(messages, per_thread)
                .into_iter()
                .map(|chunk| (InboundGroupSession::from_pickle(entry.live.pickle()), chunk))
                .collect();
            let done = newt_proto::parallel::map_owned(jobs, 1, |(mut copy, chunk)| {
                chunk
                    .into_iter()
                    .map(|(i, message)| (i, megolm_decrypt(&mut copy, message).ok()))
                    .collect::<Vec<_>>()
            });
            for (i, decrypted) in done.into_iter().flatten() {
                ahead[i] = decrypted;
            }
        }
        Ok(ahead)
    }

    /// One decryption under the state lock: the session from the cache (or
    /// the store), every check of [`decrypt_room_event_with`], the replay
    /// record (`ctx.pending` first, then the store) and the sender's trust.
    /// `ahead` is the event's Megolm decryption if [`Self::decrypt_ahead`]
    /// did it. Returns the new replay record to commit, if the index is new.
    async fn decrypt_parsed(
        &self,
        st: &mut State,
        ctx: &mut DecryptContext,
        room_id: &RoomId,
        parsed: EncryptedRoomEvent,
        mut ahead: Option<DecryptedMessage>,
    ) -> Result<(DecryptedRoomEvent, Option<MessageIndexRecord>), Error> {
        let key = (room_id.clone(), parsed.session_id.clone());
        if !ctx.devices.contains_key(&parsed.sender) {
            let mut devices = self.store().devices(&parsed.sender).await?;
            if parsed.sender == self.inner.user_id {
                // Our own device is not stored among the devices; it is trusted by definition.
                if let Ok(mut own) = parse_device_keys(
                    &self.inner.user_id,
                    self.inner.device_id.as_str(),
                    &st.account.device_keys(),
                ) {
                    own.local_trust = LocalTrust::Verified;
                    devices.push(own);
                }
            }
            ctx.devices.insert(parsed.sender.clone(), devices);
        }
        let sender_devices = ctx.devices.get(&parsed.sender).map(Vec::as_slice).unwrap_or(&[]);
        let index = parsed.message.message_index();
        let seen = match ctx.pending.get(&(parsed.session_id.clone(), index)) {
            Some(record) => Some(record.clone()),
            None => self.store().message_index(room_id, &parsed.session_id, index).await?,
        };
        let mut result = None;
        for attempt in 0..2 {
            let cached = attempt == 0 && st.inbound.get_mut(&key).is_some();
            if !cached {
                st.inbound.remove(&key.0, &key.1);
                let Some(record) =
                    self.store().inbound_group_session(room_id, &parsed.session_id).await?
                else {
                    let withheld = self
                        .store()
                        .withheld(room_id, &parsed.session_id, &parsed.sender)
                        .await?
                        .map(Box::new);
                    return Err(MegolmError::MissingSession {
                        room_id: room_id.clone(),
                        session_id: parsed.session_id,
                        withheld,
                    }
                    .into());
                };
                let live = live_inbound(&record)?;
                st.inbound.insert(record, live);
            }
            let entry =
                st.inbound.get_mut(&key).ok_or(Error::BadResponse("internal: session cache"))?;
            let r = match ahead.take() {
                Some(decrypted) => finish_room_event(
                    room_id,
                    &parsed,
                    &entry.record,
                    decrypted,
                    sender_devices,
                    seen.as_ref(),
                ),
                None => decrypt_room_event_with(
                    room_id,
                    &parsed,
                    &entry.record,
                    &mut entry.live,
                    sender_devices,
                    seen.as_ref(),
                ),
            };
            // Another process may have stored a copy of the session that
            // starts earlier: a cached copy that cannot reach the index is
            // reloaded once.
            let retry = cached && matches!(r, Err(MegolmError::UnknownIndex { .. }));
            result = Some(r);
            if !retry {
                break;
            }
        }
        let (mut decrypted, record) =
            result.ok_or(Error::BadResponse("internal: session cache"))??;
        if decrypted.trust == SenderTrust::Unverified {
            // Known device, not verified here: it may be cross-signed by a
            // verified identity. Only read identities when there is one.
            let device = sender_devices
                .iter()
                .find(|d| Some(&d.device_id) == decrypted.sender_device.as_ref());
            if let Some(device) = device {
                let own_user = parsed.sender == self.inner.user_id;
                if !own_user && !ctx.owners.contains_key(&parsed.sender) {
                    let owner = self.user_identity(&parsed.sender).await?;
                    ctx.owners.insert(parsed.sender.clone(), owner);
                }
                let owner = if own_user { None } else { ctx.owners.get(&parsed.sender) };
                let owner = owner.and_then(Option::as_ref);
                if own_user || owner.is_some() {
                    if ctx.material.is_none() {
                        ctx.material = Some(self.trust_material().await?);
                    }
                    if let Some((own_identity, private)) = &ctx.material {
                        let root =
                            TrustRoot::new(&st.account, own_identity.as_ref(), private.as_ref());
                        decrypted.trust = with_cross_signing(
                            decrypted.trust,
                            Some(root.device_trust(owner, device)),
                        );
                    }
                }
            }
        }
        Ok((decrypted, record))
    }

    /// Asks our other devices for the key of an undecryptable event. The
    /// request goes out with the next [`outgoing_requests`](Self::outgoing_requests).
    pub async fn request_room_key(&self, room_id: &RoomId, event: &Value) -> Result<(), Error> {
        let parsed = parse_room_event(event)?;
        let mut st = self.inner.state.lock().await;
        if self.store().key_request_for_session(room_id, &parsed.session_id).await?.is_some() {
            return Ok(());
        }
        let request_id = st.next_id();
        let record = KeyRequestRecord {
            request_id,
            room_id: room_id.clone(),
            session_id: parsed.session_id,
            sent: false,
        };
        let changes = Changes { key_requests: vec![record], ..Default::default() };
        self.commit(&mut st, changes, false).await
    }

    /// The stored devices of `user_id`.
    pub async fn devices(&self, user_id: &UserId) -> Result<Vec<DeviceRecord>, Error> {
        Ok(self.store().devices(user_id).await?.into_iter().filter(|d| !d.deleted).collect())
    }

    /// Sets the user's decision about a device (verify or blacklist).
    pub async fn set_local_trust(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        trust: LocalTrust,
    ) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let Some(mut device) =
            self.store().devices(user_id).await?.into_iter().find(|d| &d.device_id == device_id)
        else {
            return Err(Error::BadResponse("unknown device"));
        };
        device.local_trust = trust;
        let changes = Changes { devices: vec![device], ..Default::default() };
        self.commit(&mut st, changes, false).await
    }

    /// Discards the outbound session of a room, so the next share rotates.
    pub async fn discard_room_key(&self, room_id: &RoomId) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        st.outbound.remove(room_id);
        let changes = Changes {
            removed_outbound_group_sessions: vec![room_id.clone()],
            ..Default::default()
        };
        self.commit(&mut st, changes, false).await
    }

    // ------------------------------------------------------------ cross-signing

    /// Our public identity and our private keys, as stored (unreadable or
    /// mismatched records count as absent: they grant no trust).
    async fn trust_material(
        &self,
    ) -> Result<(Option<OwnIdentity>, Option<PrivateCrossSigningIdentity>), Error> {
        let own = self
            .store()
            .identity(&self.inner.user_id)
            .await?
            .and_then(|r| OwnIdentity::from_record(&r).ok());
        let private = self
            .store()
            .private_identity()
            .await?
            .filter(|r| r.user_id == self.inner.user_id)
            .and_then(|r| PrivateCrossSigningIdentity::from_seeds(&r).ok());
        Ok((own, private))
    }

    /// Another user's stored identity (re-checked), if any.
    async fn user_identity(&self, user_id: &UserId) -> Result<Option<UserIdentity>, Error> {
        Ok(self.store().identity(user_id).await?.and_then(|r| UserIdentity::from_record(&r).ok()))
    }

    /// The cross-signing part of a `/keys/query` answer: checks and stores
    /// the identities of `users` (ours first, since it decides whether the
    /// others are verified), and refuses invalid keys and users with a device
    /// whose ID is one of their cross-signing key IDs.
    async fn handle_identities(
        &self,
        account: &OwnAccount,
        users: &BTreeSet<UserId>,
        response: &Value,
        changes: &mut Changes,
        report: &mut KeysQueryReport,
    ) -> Result<(), Error> {
        let own_user = &self.inner.user_id;
        let (mut own_identity, private) = self.trust_material().await?;
        let ordered =
            users.iter().filter(|u| *u == own_user).chain(users.iter().filter(|u| *u != own_user));
        for user in ordered {
            // Users the server did not answer for stay as they were.
            let Some(devices) = response.get("device_keys").and_then(|d| d.get(user.as_str()))
            else {
                continue;
            };
            let keys = match CrossSigningKeys::from_keys_query(response, user) {
                Ok(Some(keys)) => keys,
                Ok(None) => continue,
                Err(e) => {
                    report.rejected_identities.push(RejectedIdentity {
                        user_id: user.clone(),
                        reason: IdentityRejection::Invalid(e),
                    });
                    continue;
                }
            };
            let clash = devices
                .as_object()
                .and_then(|m| m.keys().find(|d| keys.collides_with_device(d)).cloned());
            if let Some(device_id) = clash {
                changes
                    .devices
                    .retain(|d| !(&d.user_id == user && d.device_id.as_str() == device_id));
                report.rejected_identities.push(RejectedIdentity {
                    user_id: user.clone(),
                    reason: IdentityRejection::DeviceIdCollision(device_id),
                });
                continue;
            }
            let old = self.store().identity(user).await?;
            let record = if user == own_user {
                match OwnIdentity::updated_record(old.as_ref(), &keys) {
                    Ok(record) => {
                        own_identity = OwnIdentity::from_record(&record).ok();
                        record
                    }
                    Err(e) => {
                        report.rejected_identities.push(RejectedIdentity {
                            user_id: user.clone(),
                            reason: IdentityRejection::Invalid(e),
                        });
                        continue;
                    }
                }
            } else {
                // The keys are verified already: ask only whether our USK
                // signed the master key (no re-parse of the identity).
                let root = TrustRoot::new(account, own_identity.as_ref(), private.as_ref());
                let verified_now = root.signed_by_our_user_signing_key(user, &keys.master);
                UserIdentity::updated_record(old.as_ref(), &keys, verified_now)
            };
            if old.as_ref() != Some(&record) {
                changes.identities.push(record);
            }
        }
        Ok(())
    }

    /// What `/keys/query` responses contained that newt refused (invalid
    /// devices, invalid cross-signing keys, device-ID clashes), oldest first,
    /// since the last call. Only non-empty reports are kept (at most 64).
    pub async fn take_keys_query_reports(&self) -> Vec<KeysQueryReport> {
        std::mem::take(&mut self.inner.state.lock().await.reports)
    }

    /// Creates a new cross-signing identity (master, self-signing and
    /// user-signing keys) and returns the two request bodies that publish
    /// it: `POST /keys/device_signing/upload` (the caller adds the UIA
    /// `auth`), then `POST /keys/signatures/upload` (this device signed by
    /// the new self-signing key). The private keys are stored before this
    /// returns; calling it again replaces the identity (a reset: other users
    /// see their pin change). After both uploads, the next `/keys/query` of
    /// our own user (queued here) stores the public identity.
    pub async fn bootstrap_cross_signing(&self) -> Result<BootstrapRequests, Error> {
        let mut st = self.inner.state.lock().await;
        let (private, requests) = PrivateCrossSigningIdentity::bootstrap(&st.account)?;
        let mut changes =
            Changes { private_identity: Some(private.export_seeds()), ..Default::default() };
        self.mark_outdated(&mut st, &mut changes, self.inner.user_id.clone());
        self.commit(&mut st, changes, false).await?;
        Ok(requests)
    }

    fn mark_outdated(&self, st: &mut State, changes: &mut Changes, user_id: UserId) {
        if st.queries_in_flight.contains(&user_id) {
            st.changed_during_query.insert(user_id.clone());
        }
        changes.tracked_users.push(TrackedUser { user_id, outdated: true });
    }

    /// Our private cross-signing keys as unpadded base64 seeds (the
    /// secret-storage encoding), if we hold any. The value is secret.
    pub async fn export_cross_signing_keys(&self) -> Result<Option<PrivateIdentityRecord>, Error> {
        Ok(self.store().private_identity().await?)
    }

    /// Imports private cross-signing keys (e.g. from another of our devices
    /// or from secret storage). Each key present must match our published
    /// identity, so our own identity must have been fetched first. Holding
    /// the private master key makes this device trust our identity.
    pub async fn import_cross_signing_keys(
        &self,
        keys: &PrivateIdentityRecord,
    ) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        if keys.user_id != self.inner.user_id {
            return Err(CrossSigningError::UserMismatch {
                expected: self.inner.user_id.to_string(),
                found: keys.user_id.to_string(),
            }
            .into());
        }
        let (own, _) = self.trust_material().await?;
        let own = own.ok_or_else(|| Error::NoIdentity(self.inner.user_id.clone()))?;
        let private = PrivateCrossSigningIdentity::import_checked(keys, &own)?;
        let changes =
            Changes { private_identity: Some(private.export_seeds()), ..Default::default() };
        self.commit(&mut st, changes, false).await
    }

    /// Signs one of our own devices (this one or another) with our
    /// self-signing key. Returns the `POST /keys/signatures/upload` body;
    /// after it is uploaded, the device is cross-signed for everyone. Our
    /// own user is queued for a re-query.
    pub async fn cross_sign_own_device(&self, device_id: &DeviceId) -> Result<Value, Error> {
        let mut st = self.inner.state.lock().await;
        let (own, private) = self.trust_material().await?;
        let private = private
            .ok_or(CrossSigningError::MissingKey(newt_proto::identities::KeyUsage::SelfSigning))?;
        if let Some(own) = &own {
            private.matches(own)?;
        }
        let device_keys = if device_id == &self.inner.device_id {
            st.account.device_keys()
        } else {
            self.store()
                .devices(&self.inner.user_id)
                .await?
                .into_iter()
                .find(|d| &d.device_id == device_id && !d.deleted)
                .ok_or(Error::UnknownDevice)?
                .keys
                .as_ref()
                .clone()
        };
        let signed = private.sign_device(&device_keys)?;
        let mut changes = Changes::default();
        self.mark_outdated(&mut st, &mut changes, self.inner.user_id.clone());
        self.commit(&mut st, changes, false).await?;
        Ok(signatures_upload_body([(self.inner.user_id.clone(), device_id.to_string(), signed)]))
    }

    /// `user_id`'s stored master key (unpadded base64): what the user
    /// compares out of band before [`verify_user_identity`](Self::verify_user_identity).
    /// `None` when no identity is known for the user.
    pub async fn master_key(&self, user_id: &UserId) -> Result<Option<String>, Error> {
        let found = if user_id == &self.inner.user_id {
            self.trust_material().await?.0.map(|o| o.master_key().public_key().to_base64())
        } else {
            self.user_identity(user_id).await?.map(|i| i.master_key().public_key().to_base64())
        };
        Ok(found)
    }

    /// Signs `user_id`'s master key with our user-signing key: the last step
    /// of verifying a user after comparing `expected_master_key` (unpadded
    /// base64, e.g. from [`master_key`](Self::master_key)) out of band (a SAS
    /// flow, [`Machine::request_verification`], does this on its own).
    /// Returns the `POST /keys/signatures/upload` body; once uploaded and
    /// re-queried (queued here), the user's identity is
    /// [`IdentityTrust::Verified`].
    ///
    /// Refused, with nothing signed, when the stored master key is not
    /// `expected_master_key` ([`CrossSigningError::MasterKeyMismatch`]: the
    /// server swapped the identity after the user compared it) or the
    /// identity changed since it was pinned or verified
    /// ([`CrossSigningError::IdentityChanged`]: acknowledge it first).
    pub async fn verify_user_identity(
        &self,
        user_id: &UserId,
        expected_master_key: &str,
    ) -> Result<Value, Error> {
        let mut st = self.inner.state.lock().await;
        if user_id == &self.inner.user_id {
            return Err(Error::NoIdentity(user_id.clone()));
        }
        let identity =
            self.user_identity(user_id).await?.ok_or_else(|| Error::NoIdentity(user_id.clone()))?;
        let (own, private) = self.trust_material().await?;
        TrustRoot::new(&st.account, own.as_ref(), private.as_ref())
            .check_user_to_verify(&identity, expected_master_key)?;
        let private = private
            .ok_or(CrossSigningError::MissingKey(newt_proto::identities::KeyUsage::UserSigning))?;
        if let Some(own) = &own {
            private.matches(own)?;
        }
        let signed = private.sign_user(identity.master_key())?;
        let mut changes = Changes::default();
        self.mark_outdated(&mut st, &mut changes, user_id.clone());
        self.commit(&mut st, changes, false).await?;
        Ok(signatures_upload_body([(
            user_id.clone(),
            identity.master_key().public_key().to_base64(),
            signed,
        )]))
    }

    /// Whether this device trusts our own cross-signing identity; `None`
    /// when we have none (or it was not fetched yet).
    pub async fn own_identity_state(&self) -> Result<Option<OwnIdentityTrust>, Error> {
        let st = self.inner.state.lock().await;
        let (own, private) = self.trust_material().await?;
        if own.is_none() {
            return Ok(None);
        }
        let root = TrustRoot::new(&st.account, own.as_ref(), private.as_ref());
        Ok(Some(root.own_identity_trust()))
    }

    /// Our view of `user_id`'s identity; `None` when the user has no known
    /// cross-signing identity. For our own user: `Verified` when this
    /// device trusts our identity, `Pinned` otherwise.
    pub async fn user_identity_state(
        &self,
        user_id: &UserId,
    ) -> Result<Option<IdentityTrust>, Error> {
        if user_id == &self.inner.user_id {
            return Ok(self.own_identity_state().await?.map(|t| match t {
                OwnIdentityTrust::Verified => IdentityTrust::Verified,
                OwnIdentityTrust::Unverified => IdentityTrust::Pinned,
            }));
        }
        let st = self.inner.state.lock().await;
        let Some(identity) = self.user_identity(user_id).await? else { return Ok(None) };
        let (own, private) = self.trust_material().await?;
        let root = TrustRoot::new(&st.account, own.as_ref(), private.as_ref());
        Ok(Some(root.identity_trust(&identity)))
    }

    /// The user accepts `user_id`'s current identity: a `PinnedChanged`
    /// identity is pinned again; a `VerificationViolation` loses its
    /// verification and is pinned (verify again to restore it). Other
    /// states are left alone.
    pub async fn acknowledge_identity_change(&self, user_id: &UserId) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let Some(mut identity) = self.user_identity(user_id).await? else {
            return Err(Error::NoIdentity(user_id.clone()));
        };
        let (own, private) = self.trust_material().await?;
        let state =
            TrustRoot::new(&st.account, own.as_ref(), private.as_ref()).identity_trust(&identity);
        let record: IdentityRecord = match state {
            IdentityTrust::VerificationViolation => identity.withdraw_verification(),
            IdentityTrust::PinnedChanged => identity.pin_current_master_key(),
            IdentityTrust::Verified | IdentityTrust::Pinned => return Ok(()),
        };
        let changes = Changes { identities: vec![record], ..Default::default() };
        self.commit(&mut st, changes, false).await
    }

    /// How much a device is trusted (local decision and cross-signing);
    /// `None` for an unknown or deleted device. This device trusts itself.
    pub async fn device_trust(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<Option<DeviceTrust>, Error> {
        if user_id == &self.inner.user_id && device_id == &self.inner.device_id {
            return Ok(Some(DeviceTrust::LocallyVerified));
        }
        let st = self.inner.state.lock().await;
        let Some(device) = self
            .store()
            .devices(user_id)
            .await?
            .into_iter()
            .find(|d| &d.device_id == device_id && !d.deleted)
        else {
            return Ok(None);
        };
        let owner =
            if user_id == &self.inner.user_id { None } else { self.user_identity(user_id).await? };
        let (own, private) = self.trust_material().await?;
        let root = TrustRoot::new(&st.account, own.as_ref(), private.as_ref());
        Ok(Some(root.device_trust(owner.as_ref(), &device)))
    }

    /// Exports every inbound session to a key export file protected by
    /// `passphrase` (PBKDF2 with `rounds` iterations; use ≥ 100,000).
    pub async fn export_room_keys(&self, passphrase: &str, rounds: u32) -> Result<String, Error> {
        let bytes = self.export_room_keys_to(Vec::new(), passphrase, rounds, |_| {}).await?;
        String::from_utf8(bytes).map_err(|_| Error::BadResponse("export is not UTF-8"))
    }

    /// Streams every inbound session into `out` as a key export file.
    /// Sessions are read from the store a page at a time and written one at
    /// a time, so memory stays flat however many there are; `progress` gets
    /// the running count.
    pub async fn export_room_keys_to<W: std::io::Write>(
        &self,
        out: W,
        passphrase: &str,
        rounds: u32,
        mut progress: impl FnMut(usize),
    ) -> Result<W, Error> {
        let mut writer = ExportWriter::new(out, passphrase, rounds)?;
        let mut cursor = None;
        loop {
            let page = self.store().inbound_group_sessions_page(cursor.clone(), 1000).await?;
            let Some(last) = page.last() else { break };
            cursor = Some((last.room_id.clone(), last.session_id.clone()));
            for r in page {
                writer.push(&export_record(r))?;
            }
            progress(writer.keys_written());
        }
        Ok(writer.finish()?)
    }

    /// Imports a key export file. Keys are checked and committed in batches
    /// of 2,000; `progress(done, total)` is called after each batch is
    /// committed (so `done` keys are durable). Existing sessions are only
    /// replaced by ones that start at a lower index. A file asking for more
    /// than [`DEFAULT_MAX_ROUNDS`] PBKDF2 rounds is refused
    /// ([`import_room_keys_with`](Self::import_room_keys_with) takes another
    /// limit).
    pub async fn import_room_keys(
        &self,
        file: &str,
        passphrase: &str,
        progress: impl FnMut(usize, usize),
    ) -> Result<ImportSummary, Error> {
        self.import_room_keys_with(file, passphrase, &ImportOptions::default(), progress).await
    }

    /// [`import_room_keys`](Self::import_room_keys) with `options`. The
    /// passphrase's key derivation (PBKDF2, up to `options.max_rounds`
    /// iterations: seconds of CPU) runs on a thread of its own on native
    /// targets, not on the caller's executor; on wasm32 it runs inline.
    pub async fn import_room_keys_with(
        &self,
        file: &str,
        passphrase: &str,
        options: &ImportOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<ImportSummary, Error> {
        // The round count is checked here, before any derivation.
        let kdf = ExportKdf::read(file, options.max_rounds)?;
        let keys = derive_export_keys(kdf, passphrase).await?;
        // Authenticate, decrypt and validate in one streaming pass; then
        // decrypt again, parse, check and commit one batch at a time, so
        // memory holds a few batches, never the decrypted file. Parsing the
        // next batches (on another thread where there are threads) overlaps
        // committing this one.
        let stream = ExportStream::open_with_keys(file, &keys)?;
        drop(keys); // The stream holds its own copy; this one is zeroised now.
        let total = stream.total();
        let mut summary = ImportSummary { total, ..Default::default() };
        let mut st = self.inner.state.lock().await;
        let mut batches = ImportBatches::start(stream);
        let mut changes = Changes::default();
        while let Some((records, done)) = batches.next().await? {
            // What the store already holds of this batch, in one read.
            let keys: Vec<(RoomId, String)> = records
                .iter()
                .flatten()
                .map(|r| (r.room_id.clone(), r.session_id.clone()))
                .collect();
            let mut stored: HashMap<(RoomId, String), InboundGroupSessionRecord> = self
                .store()
                .inbound_group_sessions(&keys)
                .await?
                .into_iter()
                .map(|r| ((r.room_id.clone(), r.session_id.clone()), r))
                .collect();
            drop(keys);
            // Within a batch, a later copy of the same session competes with
            // the earlier one, not with the store.
            let mut seen: HashMap<(RoomId, String), usize> = HashMap::new();
            for record in records {
                let Some(record) = record else {
                    summary.skipped += 1;
                    continue;
                };
                let k = (record.room_id.clone(), record.session_id.clone());
                let existing = match seen.get(&k) {
                    Some(j) => {
                        changes.inbound_group_sessions.get(*j).map(clone_record).transpose()?
                    }
                    None => stored.remove(&k),
                };
                let better = match &existing {
                    None => true,
                    Some(e) => should_replace(e, &record).unwrap_or(false),
                };
                if better {
                    seen.insert(k, changes.inbound_group_sessions.len());
                    changes.inbound_group_sessions.push(record);
                    summary.imported += 1;
                } else {
                    summary.skipped += 1;
                }
            }
            self.commit(&mut st, std::mem::take(&mut changes), false).await?;
            progress(done, total);
        }
        self.commit(&mut st, changes, false).await?;
        Ok(summary)
    }
}

/// Derives a key export's keys from `passphrase` off the caller's executor:
/// on a thread of its own on native targets (one core's work either way, so
/// `set_max_threads` does not apply), inline on wasm32, which has no threads.
async fn derive_export_keys(kdf: ExportKdf, passphrase: &str) -> Result<ExportKeys, Error> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let passphrase = zeroize::Zeroizing::new(passphrase.to_owned());
        off_thread(move || kdf.derive(&passphrase)).await
    }
    #[cfg(target_arch = "wasm32")]
    {
        Ok(kdf.derive(passphrase))
    }
}

/// Runs `work` on a thread of its own and waits for it without blocking the
/// caller's executor. A thread the OS will not start is an error, not a
/// panic.
#[cfg(not(target_arch = "wasm32"))]
async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name("newt-kdf".into())
        .spawn(move || {
            // Nobody waiting (the import was dropped): nothing to do.
            let _ = tx.send(work());
        })
        .map_err(|_| Error::BadResponse("internal: cannot start a thread"))?;
    rx.await.map_err(|_| Error::BadResponse("internal: key derivation thread stopped"))
}

#[derive(Default)]
struct Batch {
    olm_sessions: BTreeMap<String, BatchSessions>,
    /// Every tracked user's devices by Curve25519 key (see
    /// [`Machine::key_holders`]), loaded at most once per batch.
    key_holders: Option<HashMap<String, Vec<DeviceRecord>>>,
    inbound: BTreeMap<(RoomId, String), usize>,
    requests: Vec<OutgoingRequest>,
    account_changed: bool,
}

struct BatchSessions {
    live: Vec<OlmSession>,
    dirty: BTreeSet<usize>,
}

/// Batches of an import, parsed into session records (`None` for an invalid
/// key) with the count of keys read so far. The file is decrypted and its
/// JSON parsed here, a batch at a time; on native targets the session keys
/// (the expensive part) are parsed on a worker thread, two batches ahead,
/// while the caller commits. On wasm32 everything happens when asked for.
struct ImportBatches<'a> {
    stream: ExportStream<'a>,
    /// No worker: a file of one batch is parsed when asked for (a thread
    /// would only add its start-up cost), as is every file when
    /// `parallel::set_max_threads(1)` keeps work on the caller's thread.
    #[cfg(not(target_arch = "wasm32"))]
    inline: bool,
    #[cfg(not(target_arch = "wasm32"))]
    worker: Option<ImportWorker>,
    /// `stream.done()` after each batch handed to the worker, oldest first.
    #[cfg(not(target_arch = "wasm32"))]
    in_flight: std::collections::VecDeque<usize>,
}

#[cfg(not(target_arch = "wasm32"))]
struct ImportWorker {
    keys: std::sync::mpsc::Sender<Vec<ExportedRoomKey>>,
    records: futures::channel::mpsc::UnboundedReceiver<Vec<Option<InboundGroupSessionRecord>>>,
    thread: std::thread::JoinHandle<()>,
}

type ParsedBatch = (Vec<Option<InboundGroupSessionRecord>>, usize);

impl<'a> ImportBatches<'a> {
    fn start(stream: ExportStream<'a>) -> Self {
        #[cfg(not(target_arch = "wasm32"))]
        {
            if stream.total() <= IMPORT_BATCH || newt_proto::parallel::max_threads() < 2 {
                return Self { stream, inline: true, worker: None, in_flight: Default::default() };
            }
            let (keys, keys_rx) = std::sync::mpsc::channel::<Vec<ExportedRoomKey>>();
            let (records_tx, records) = futures::channel::mpsc::unbounded();
            // Ends when `keys` is dropped (or nobody takes the records).
            let thread = std::thread::spawn(move || {
                while let Ok(batch) = keys_rx.recv() {
                    if records_tx.unbounded_send(sessions_from_export(&batch)).is_err() {
                        break;
                    }
                }
            });
            let worker = Some(ImportWorker { keys, records, thread });
            Self { stream, inline: false, worker, in_flight: Default::default() }
        }
        #[cfg(target_arch = "wasm32")]
        {
            Self { stream }
        }
    }

    /// The next batch parsed here, or `None` at the end.
    fn parse_here(&mut self) -> Result<Option<ParsedBatch>, Error> {
        let batch = self.stream.next_batch(IMPORT_BATCH)?;
        if batch.is_empty() {
            return Ok(None);
        }
        Ok(Some((sessions_from_export(&batch), self.stream.done())))
    }

    async fn next(&mut self) -> Result<Option<ParsedBatch>, Error> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            use futures::StreamExt;
            if self.inline {
                return self.parse_here();
            }
            let Some(worker) = &mut self.worker else { return Ok(None) };
            while self.in_flight.len() < 2 {
                let batch = self.stream.next_batch(IMPORT_BATCH)?;
                if batch.is_empty() {
                    break;
                }
                self.in_flight.push_back(self.stream.done());
                worker
                    .keys
                    .send(batch)
                    .map_err(|_| Error::BadResponse("internal: import worker stopped"))?;
            }
            let Some(done) = self.in_flight.pop_front() else { return Ok(None) };
            match worker.records.next().await {
                Some(records) => Ok(Some((records, done))),
                None => {
                    // The worker died: if it panicked, so do we (rather than
                    // report a short import as complete).
                    if let Some(w) = self.worker.take() {
                        drop(w.keys);
                        if let Err(panic) = w.thread.join() {
                            std::panic::resume_unwind(panic);
                        }
                    }
                    Err(Error::BadResponse("internal: import worker stopped"))
                }
            }
        }
        #[cfg(target_arch = "wasm32")]
        {
            self.parse_here()
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Drop for ImportBatches<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            // Closing both channels stops the worker after its current batch.
            drop(w.keys);
            drop(w.records);
            // A panic there ends only the parsing; this import already ended.
            let _ = w.thread.join();
        }
    }
}

/// [`session_from_export`] for a batch of keys (`None` for an invalid one),
/// in order, on every core where there are threads.
fn sessions_from_export(keys: &[ExportedRoomKey]) -> Vec<Option<InboundGroupSessionRecord>> {
    newt_proto::parallel::map(keys, 32, |k| session_from_export(k, SessionSource::Imported).ok())
}

fn clone_record(r: &InboundGroupSessionRecord) -> Result<InboundGroupSessionRecord, Error> {
    r.try_clone().map_err(|_| Error::Store(StoreError::Corrupt("session record".into())))
}

fn to_device_request(
    id: String,
    event_type: &str,
    messages: impl IntoIterator<Item = (UserId, String, Value)>,
) -> OutgoingRequest {
    let mut map: Map<String, Value> = Map::new();
    for (u, d, c) in messages {
        let user = map.entry(u.to_string()).or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(user) = user {
            user.insert(d, c);
        }
    }
    let mut body = Map::new();
    body.insert("messages".to_owned(), Value::Object(map));
    OutgoingRequest {
        id: id.clone(),
        kind: RequestKind::ToDevice {
            event_type: event_type.to_owned(),
            txn_id: id,
            body: Value::Object(body),
        },
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use newt_proto::export::encrypt_export;

    #[test]
    fn export_key_derivation_runs_off_the_callers_thread() {
        let here = std::thread::current().id();
        let there = futures::executor::block_on(off_thread(|| std::thread::current().id()));
        assert_ne!(there.unwrap(), here);
        let file = encrypt_export(&[], "pw", 1_000).unwrap();
        let kdf = ExportKdf::read(&file, DEFAULT_MAX_ROUNDS).unwrap();
        let keys = futures::executor::block_on(derive_export_keys(kdf, "pw")).unwrap();
        assert_eq!(ExportStream::open_with_keys(&file, &keys).unwrap().total(), 0);
    }
}
