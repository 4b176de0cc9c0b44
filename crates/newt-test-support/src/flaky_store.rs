//! A store that fails on demand.

use std::sync::atomic::{AtomicBool, Ordering};

use newt_proto::records::{
    AccountRecord, DeviceRecord, InboundGroupSessionRecord, KeyRequestRecord, MessageIndexRecord,
    OlmSessionRecord, OutboundGroupSessionRecord, TrackedUser, WithheldRecord,
};
use newt_store::{Changes, MemoryStore, SessionCursor, Store, StoreError};

/// A store that fails `apply` while `fail` is set (after letting `pass`
/// more through), and reads of devices while `fail_reads` is set; the
/// first of `race`, if any, is applied just before each `apply` (another
/// process writing in between).
pub struct FlakyStore {
    /// Where the data is.
    pub inner: MemoryStore,
    /// While set, `apply` fails (once `pass` is used up).
    pub fail: AtomicBool,
    /// How many more `apply` calls succeed while `fail` is set.
    pub pass: std::sync::atomic::AtomicUsize,
    /// While set, reads of devices fail.
    pub fail_reads: AtomicBool,
    /// Writes of "another process", one applied before each `apply`.
    pub race: std::sync::Mutex<std::collections::VecDeque<Changes>>,
}

impl FlakyStore {
    /// An empty store that does not fail yet.
    pub fn new() -> Self {
        Self {
            inner: MemoryStore::new(),
            fail: AtomicBool::new(false),
            pass: std::sync::atomic::AtomicUsize::new(0),
            fail_reads: AtomicBool::new(false),
            race: std::sync::Mutex::new(std::collections::VecDeque::new()),
        }
    }
}

impl Default for FlakyStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait::async_trait]
impl Store for FlakyStore {
    async fn account(&self) -> Result<Option<AccountRecord>, StoreError> {
        self.inner.account().await
    }
    async fn olm_sessions(&self, k: &str) -> Result<Vec<OlmSessionRecord>, StoreError> {
        self.inner.olm_sessions(k).await
    }
    async fn inbound_group_session(
        &self,
        r: &newt_proto::ids::RoomId,
        s: &str,
    ) -> Result<Option<InboundGroupSessionRecord>, StoreError> {
        self.inner.inbound_group_session(r, s).await
    }
    async fn inbound_group_sessions_page(
        &self,
        a: SessionCursor,
        l: usize,
    ) -> Result<Vec<InboundGroupSessionRecord>, StoreError> {
        self.inner.inbound_group_sessions_page(a, l).await
    }
    async fn outbound_group_session(
        &self,
        r: &newt_proto::ids::RoomId,
    ) -> Result<Option<OutboundGroupSessionRecord>, StoreError> {
        self.inner.outbound_group_session(r).await
    }
    async fn devices(&self, u: &newt_proto::ids::UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("I/O error".into()));
        }
        self.inner.devices(u).await
    }
    async fn tracked_users(&self) -> Result<Vec<TrackedUser>, StoreError> {
        self.inner.tracked_users().await
    }
    async fn key_request(&self, id: &str) -> Result<Option<KeyRequestRecord>, StoreError> {
        self.inner.key_request(id).await
    }
    async fn key_request_for_session(
        &self,
        r: &newt_proto::ids::RoomId,
        s: &str,
    ) -> Result<Option<KeyRequestRecord>, StoreError> {
        self.inner.key_request_for_session(r, s).await
    }
    async fn unsent_key_requests(&self) -> Result<Vec<KeyRequestRecord>, StoreError> {
        self.inner.unsent_key_requests().await
    }
    async fn withheld(
        &self,
        r: &newt_proto::ids::RoomId,
        s: &str,
        u: &newt_proto::ids::UserId,
    ) -> Result<Option<WithheldRecord>, StoreError> {
        self.inner.withheld(r, s, u).await
    }
    async fn message_index(
        &self,
        r: &newt_proto::ids::RoomId,
        s: &str,
        i: u32,
    ) -> Result<Option<MessageIndexRecord>, StoreError> {
        self.inner.message_index(r, s, i).await
    }
    async fn sync_token(&self) -> Result<Option<String>, StoreError> {
        self.inner.sync_token().await
    }
    async fn identity(
        &self,
        u: &newt_proto::ids::UserId,
    ) -> Result<Option<newt_proto::identities::IdentityRecord>, StoreError> {
        self.inner.identity(u).await
    }
    async fn private_identity(
        &self,
    ) -> Result<Option<newt_proto::identities::PrivateIdentityRecord>, StoreError> {
        self.inner.private_identity().await
    }
    async fn apply(&self, c: Changes) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst)
            && self
                .pass
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            return Err(StoreError::Backend("disk full".into()));
        }
        let race = self.race.lock().unwrap().pop_front();
        if let Some(other) = race {
            self.inner.apply(other).await?;
        }
        self.inner.apply(c).await
    }
}
