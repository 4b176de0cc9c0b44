//! [`Machine`]: the async driver around the sans-IO core.
//!
//! Each public method follows the same shape: take the state lock, load the
//! records the core needs from the store, call the core, commit the returned
//! `Changes` with one `Store::apply`, and only then hand results back
//! (persist before acknowledge). If the commit fails, the in-memory account
//! is reloaded from the store, so memory never runs ahead of disk.
//!
//! This file holds the machine, its state, the commit and the helpers the
//! capabilities share; each capability is a submodule of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::lock::Mutex;
use serde_json::{Map, Value};

use newt_proto::account::OwnAccount;
use newt_proto::changes::Changes;
use newt_proto::ids::{DeviceId, RoomId, UserId};
use newt_proto::key_requests::WaitingKeyRequests;
use newt_proto::megolm::OutboundSession;
use newt_proto::records::{InboundGroupSessionRecord, TrackedUser};
use newt_store::{Store, StoreError};

use crate::clock::{Clock, SystemClock};
use crate::requests::{OutgoingRequest, RequestKind};
use crate::types::IdentityKeys;
use crate::Error;

mod decrypt;
mod identity;
mod outcomes;
mod requests;
mod room_keys_export;
mod sessions;
mod share;
mod sync;
mod verification;

use decrypt::InboundCache;
use identity::TrustMaterial;
use requests::Pending;
use share::ShareBatch;

pub use outcomes::{
    IdentityRejection, ImportOptions, ImportSummary, KeysQueryReport, ProcessedToDevice,
    RejectedIdentity, RoomSettings, SyncChanges, SyncOutcome, ToDeviceError, ToDeviceOutcome,
};
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
    /// Key requests of our trusted devices that wait for an Olm session
    /// (in memory only: a restart forgets them); `outgoing_requests` claims
    /// one, `handle_claim_response` answers them.
    waiting_key_requests: WaitingKeyRequests,
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
    /// The last [`TrustMaterial`] parsed, reused while the stored records
    /// it came from are unchanged (a parse cache, not state: every use
    /// re-reads the records and compares).
    trust_cache: std::sync::Mutex<Option<Arc<TrustMaterial>>>,
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
    // On wasm32 the store (IndexedDB) is neither `Send` nor `Sync`, and
    // nothing is shared between threads: the `Arc` is only for cheap clones.
    #[cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]
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
                trust_cache: std::sync::Mutex::new(None),
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
                    waiting_key_requests: WaitingKeyRequests::default(),
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

    /// Our identity keys.
    pub async fn identity_keys(&self) -> IdentityKeys {
        let st = self.inner.state.lock().await;
        let k = st.account.identity_keys();
        IdentityKeys { curve25519: k.curve25519.to_base64(), ed25519: k.ed25519.to_base64() }
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
                st.inbound.clear();
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

fn clone_record(r: &InboundGroupSessionRecord) -> Result<InboundGroupSessionRecord, Error> {
    r.try_clone().map_err(|_| Error::Store(StoreError::Corrupt("session record".into())))
}
