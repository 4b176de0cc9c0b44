//! Our own device: identity keys, signed device keys, one-time and fallback
//! keys, and the `/keys/upload` body.
//!
//! One-time keys are topped up from the server's count in each sync
//! (`device_one_time_keys_count`); the fallback key is rotated when the sync
//! says it was used (`device_unused_fallback_key_types` lacks
//! `signed_curve25519`). Keys are marked published only after the upload
//! succeeded, so a failed upload is retried with the same keys.
//!
//! vodozemac keeps the private half of the previous fallback key next to the
//! current one. Kept, it would let whoever later steals the account pickle
//! decrypt every session started with it, so we forget it
//! [`FALLBACK_KEY_GRACE_MS`] (an hour) after its successor was uploaded, and
//! not sooner: until that upload the server keeps handing out the old key,
//! and senders that claimed it may deliver their pre-key messages late. The
//! spec asks to keep at most the current and the previous fallback key and
//! to drop the previous one once all its messages have likely arrived ("such
//! as after an hour since the first message"); counting from the upload is
//! later than that, as in matrix-js-sdk's libolm-era crypto.

use serde_json::{json, Map, Value};
use vodozemac::olm::{Account, AccountPickle, IdentityKeys};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature, KeyId};

use crate::ids::{DeviceId, UserId};
use crate::json::{sign_json, JsonError};
use crate::records::AccountRecord;
use crate::{MEGOLM_V1, OLM_V1};

/// The one-time key algorithm Matrix uses.
pub const SIGNED_CURVE25519: &str = "signed_curve25519";

/// The live form of our account.
pub struct OwnAccount {
    user_id: UserId,
    device_id: DeviceId,
    inner: LazyAccount,
    shared: bool,
    uploaded_one_time_key_count: u64,
    fallback_key_created_at: Option<u64>,
    fallback_key_published_at: Option<u64>,
    generation: u64,
    upload_lease_since: Option<u64>,
    /// Our signed DeviceKeys: identity keys never change, so it is signed
    /// once (it goes into every Olm plaintext as `sender_device_keys`).
    signed_device_keys: std::sync::OnceLock<Value>,
}

/// vodozemac's account, unpickled on first use. Unpickling derives the
/// public half of every one-time key (a base-point multiplication each, about
/// 1 ms for a full set), which reopening a store to decrypt room events never
/// needs.
struct LazyAccount {
    pickle: std::sync::Mutex<Option<AccountPickle>>,
    account: std::sync::OnceLock<Account>,
}

impl LazyAccount {
    fn ready(account: Account) -> Self {
        Self { pickle: std::sync::Mutex::new(None), account: std::sync::OnceLock::from(account) }
    }

    fn unloaded(pickle: AccountPickle) -> Self {
        Self { pickle: std::sync::Mutex::new(Some(pickle)), account: std::sync::OnceLock::new() }
    }

    // Invariant: `pickle` is `Some` exactly until `account` is set, and the
    // one initialisation takes it; `expect` cannot fire.
    #[allow(clippy::expect_used)]
    fn get(&self) -> &Account {
        self.account.get_or_init(|| {
            // The pickle is taken exactly once, by the one initialisation.
            let pickle =
                self.pickle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            Account::from_pickle(pickle.expect("an unloaded account holds its pickle"))
        })
    }

    #[allow(clippy::expect_used)]
    fn get_mut(&mut self) -> &mut Account {
        self.get();
        self.account.get_mut().expect("loaded just above")
    }
}

/// How long an upload lease keeps other processes from uploading the same
/// keys (ms). A process that dies mid-upload delays the next upload by this.
pub const UPLOAD_LEASE_MS: u64 = 60_000;

/// How long the previous fallback key is kept after its successor was
/// uploaded (ms), for pre-key messages made with it that are still in flight.
pub const FALLBACK_KEY_GRACE_MS: u64 = 60 * 60 * 1000;

impl std::fmt::Debug for OwnAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnAccount")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("curve25519", &self.inner().curve25519_key().to_base64())
            .finish_non_exhaustive()
    }
}

impl OwnAccount {
    /// A new account with fresh identity keys. Nothing is uploaded yet.
    pub fn new(user_id: UserId, device_id: DeviceId) -> Self {
        Self {
            user_id,
            device_id,
            inner: LazyAccount::ready(Account::new()),
            shared: false,
            uploaded_one_time_key_count: 0,
            fallback_key_created_at: None,
            fallback_key_published_at: None,
            generation: 0,
            upload_lease_since: None,
            signed_device_keys: std::sync::OnceLock::new(),
        }
    }

    /// Restores an account from its record.
    pub fn from_record(record: AccountRecord) -> Self {
        Self {
            user_id: record.user_id,
            device_id: record.device_id,
            inner: LazyAccount::unloaded(record.pickle),
            shared: record.shared,
            uploaded_one_time_key_count: record.uploaded_one_time_key_count,
            fallback_key_created_at: record.fallback_key_created_at,
            fallback_key_published_at: record.fallback_key_published_at,
            generation: record.generation,
            upload_lease_since: record.upload_lease_since,
            signed_device_keys: std::sync::OnceLock::new(),
        }
    }

    /// The record to persist after a change. Each call bumps the generation,
    /// so call it once per commit.
    pub fn to_record(&mut self) -> AccountRecord {
        self.generation += 1;
        self.initial_record()
    }

    /// The record as it is, without bumping the generation: for a brand-new
    /// account's first write.
    pub fn initial_record(&self) -> AccountRecord {
        AccountRecord {
            user_id: self.user_id.clone(),
            device_id: self.device_id.clone(),
            pickle: self.inner().pickle(),
            shared: self.shared,
            uploaded_one_time_key_count: self.uploaded_one_time_key_count,
            fallback_key_created_at: self.fallback_key_created_at,
            fallback_key_published_at: self.fallback_key_published_at,
            generation: self.generation,
            upload_lease_since: self.upload_lease_since,
        }
    }

    /// The generation of the stored record this account corresponds to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Our user ID.
    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    /// Our device ID.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// Our Curve25519 and Ed25519 identity keys.
    pub fn identity_keys(&self) -> IdentityKeys {
        self.inner().identity_keys()
    }

    /// Our Ed25519 key.
    pub fn ed25519_key(&self) -> Ed25519PublicKey {
        self.inner().ed25519_key()
    }

    /// Our Curve25519 key.
    pub fn curve25519_key(&self) -> Curve25519PublicKey {
        self.inner().curve25519_key()
    }

    /// Whether our device keys were uploaded.
    pub fn shared(&self) -> bool {
        self.shared
    }

    /// Signs `message` with our Ed25519 key.
    pub fn sign(&self, message: &[u8]) -> Ed25519Signature {
        self.inner().sign(message)
    }

    /// Signs a JSON object as our device (`ed25519:<device_id>`).
    pub fn sign_json(&self, value: &mut Value) -> Result<(), JsonError> {
        let key_id = format!("ed25519:{}", self.device_id);
        sign_json(value, &self.user_id, &key_id, |m| self.inner().sign(m))
    }

    /// Our signed DeviceKeys object.
    pub fn device_keys(&self) -> Value {
        self.signed_device_keys.get_or_init(|| self.build_device_keys()).clone()
    }

    fn build_device_keys(&self) -> Value {
        let keys = self.identity_keys();
        let mut value = json!({
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": [OLM_V1, MEGOLM_V1],
            "keys": {
                format!("curve25519:{}", self.device_id): keys.curve25519.to_base64(),
                format!("ed25519:{}", self.device_id): keys.ed25519.to_base64(),
            },
        });
        // Signing a freshly built object cannot fail: it is an object of strings.
        let _ = self.sign_json(&mut value);
        value
    }

    /// Takes the counts from a sync. Returns true when the account changed
    /// (new keys were generated) and must be persisted.
    ///
    /// `one_time_key_count` is `device_one_time_keys_count.signed_curve25519`
    /// (absent means 0); `unused_fallback_key_types` is
    /// `device_unused_fallback_key_types`, `None` when the server did not send it.
    pub fn update_key_counts(
        &mut self,
        one_time_key_count: Option<u64>,
        unused_fallback_key_types: Option<&[String]>,
        now: u64,
    ) -> bool {
        let mut changed = false;
        if let Some(count) = one_time_key_count {
            if count != self.uploaded_one_time_key_count {
                self.uploaded_one_time_key_count = count;
                changed = true;
            }
        }
        changed |= self.generate_one_time_keys_if_needed();
        if let Some(types) = unused_fallback_key_types {
            let has_unused = types.iter().any(|t| t == SIGNED_CURVE25519);
            if !has_unused && self.inner().fallback_key().is_empty() {
                // The server has no unused fallback key and we have none
                // waiting for upload: rotate.
                self.inner_mut().generate_fallback_key();
                self.fallback_key_created_at = Some(now);
                // The server hands out the old key until this one is
                // uploaded: the grace period has not started yet.
                self.fallback_key_published_at = None;
                changed = true;
            }
        }
        changed
    }

    /// Forgets the previous fallback key once [`FALLBACK_KEY_GRACE_MS`]
    /// have passed since the current one was uploaded. Call it after a
    /// sync's to-device events were decrypted, so that a device coming back
    /// online after the grace period still decrypts the pre-key messages
    /// waiting for it in that sync. Returns true when the account changed.
    pub fn forget_previous_fallback_key_if_due(&mut self, now: u64) -> bool {
        match self.fallback_key_published_at {
            Some(published_at) => {
                now.saturating_sub(published_at) >= FALLBACK_KEY_GRACE_MS
                    && self.inner_mut().forget_fallback_key()
            }
            None => {
                // An account stored before this field existed may hold a
                // previous key from a rotation whose upload time is unknown:
                // start the grace period now.
                let published = self.inner().fallback_key().is_empty();
                if published {
                    self.fallback_key_published_at = Some(now);
                }
                published
            }
        }
    }

    /// Generates one-time keys so that, once uploaded, the server holds half of
    /// vodozemac's maximum. Does nothing while unpublished keys are pending.
    fn generate_one_time_keys_if_needed(&mut self) -> bool {
        if !self.inner().one_time_keys().is_empty() {
            return false;
        }
        let target = self.inner().max_number_of_one_time_keys() as u64;
        let missing = target.saturating_sub(self.uploaded_one_time_key_count);
        if missing == 0 {
            return false;
        }
        self.inner_mut().generate_one_time_keys(missing as usize);
        true
    }

    /// Makes sure there is something to upload for a new device: one-time keys
    /// and a fallback key. Returns true when the account changed.
    pub fn prepare_initial_upload(&mut self, now: u64) -> bool {
        let mut changed = self.generate_one_time_keys_if_needed();
        if self.fallback_key_created_at.is_none() {
            self.inner_mut().generate_fallback_key();
            self.fallback_key_created_at = Some(now);
            changed = true;
        }
        changed
    }

    /// The `/keys/upload` body, or `None` when there is nothing to upload.
    pub fn keys_upload_body(&self) -> Option<Value> {
        let one_time_keys = self.signed_keys(self.inner().one_time_keys(), false);
        let fallback_keys = self.signed_keys(self.inner().fallback_key(), true);
        if self.shared && one_time_keys.is_empty() && fallback_keys.is_empty() {
            return None;
        }
        let mut body = Map::new();
        if !self.shared {
            body.insert("device_keys".into(), self.device_keys());
        }
        if !one_time_keys.is_empty() {
            body.insert("one_time_keys".into(), Value::Object(one_time_keys));
        }
        if !fallback_keys.is_empty() {
            body.insert("fallback_keys".into(), Value::Object(fallback_keys));
        }
        Some(Value::Object(body))
    }

    fn signed_keys(
        &self,
        keys: std::collections::HashMap<KeyId, Curve25519PublicKey>,
        fallback: bool,
    ) -> Map<String, Value> {
        let mut out = Map::new();
        for (id, key) in keys {
            let mut obj = json!({ "key": key.to_base64() });
            if fallback {
                obj["fallback"] = Value::Bool(true);
            }
            let _ = self.sign_json(&mut obj);
            out.insert(format!("{SIGNED_CURVE25519}:{}", id.to_base64()), obj);
        }
        out
    }

    /// Whether another holder's upload lease is still running at `now`.
    pub fn upload_leased(&self, now: u64) -> bool {
        self.upload_lease_since.is_some_and(|t| now.saturating_sub(t) < UPLOAD_LEASE_MS)
    }

    /// Takes the upload lease; persist the account before handing out the
    /// upload, so a second process sharing the store sees it.
    pub fn take_upload_lease(&mut self, now: u64) {
        self.upload_lease_since = Some(now);
    }

    /// Records a successful upload of `body` (built by
    /// [`keys_upload_body`](Self::keys_upload_body)) with the server's
    /// response `one_time_key_counts`, at `now`.
    pub fn mark_keys_uploaded(&mut self, response_count: Option<u64>, now: u64) {
        self.shared = true;
        self.upload_lease_since = None;
        if !self.inner().fallback_key().is_empty() {
            // A new fallback key went out: the grace period of the previous
            // one starts.
            self.fallback_key_published_at = Some(now);
        }
        self.inner_mut().mark_keys_as_published();
        if let Some(count) = response_count {
            self.uploaded_one_time_key_count = count;
        }
    }

    /// The vodozemac account, for session creation.
    pub(crate) fn inner(&self) -> &Account {
        self.inner.get()
    }

    /// The vodozemac account, mutably (inbound sessions consume one-time keys).
    pub(crate) fn inner_mut(&mut self) -> &mut Account {
        self.inner.get_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::verify_json;
    use vodozemac::olm::{OlmMessage, PreKeyMessage, SessionConfig};

    fn account() -> OwnAccount {
        OwnAccount::new(
            UserId::parse("@alice:example.org").unwrap(),
            DeviceId::parse("ALICE").unwrap(),
        )
    }

    #[test]
    fn device_keys_are_self_signed() {
        let a = account();
        let keys = a.device_keys();
        verify_json(&keys, a.user_id(), "ed25519:ALICE", &a.ed25519_key()).unwrap();
        assert_eq!(keys["keys"]["curve25519:ALICE"], a.curve25519_key().to_base64());
    }

    #[test]
    fn upload_cycle_tops_up_and_marks_published() {
        let mut a = account();
        assert!(a.prepare_initial_upload(0));
        let body = a.keys_upload_body().unwrap();
        assert!(body.get("device_keys").is_some());
        assert_eq!(body["one_time_keys"].as_object().unwrap().len(), 50);
        assert_eq!(body["fallback_keys"].as_object().unwrap().len(), 1);
        for (_, k) in body["one_time_keys"].as_object().unwrap() {
            verify_json(k, a.user_id(), "ed25519:ALICE", &a.ed25519_key()).unwrap();
        }
        // Not published until the upload succeeds: the same body comes again.
        assert_eq!(a.keys_upload_body().unwrap()["one_time_keys"], body["one_time_keys"]);
        a.mark_keys_uploaded(Some(50), 0);
        assert!(a.keys_upload_body().is_none());
        // 40 claimed: 40 new ones.
        assert!(a.update_key_counts(Some(10), Some(&["signed_curve25519".into()]), 1));
        let body = a.keys_upload_body().unwrap();
        assert!(body.get("device_keys").is_none());
        assert_eq!(body["one_time_keys"].as_object().unwrap().len(), 40);
        assert!(body.get("fallback_keys").is_none());
        a.mark_keys_uploaded(Some(50), 0);
        // Fallback used: rotate.
        assert!(a.update_key_counts(Some(50), Some(&[]), 2));
        assert_eq!(a.keys_upload_body().unwrap()["fallback_keys"].as_object().unwrap().len(), 1);
    }

    /// The one fallback key in an upload body.
    fn uploaded_fallback_key(body: &Value) -> Curve25519PublicKey {
        let keys = body["fallback_keys"].as_object().unwrap();
        assert_eq!(keys.len(), 1);
        let key = keys.values().next().unwrap()["key"].as_str().unwrap();
        Curve25519PublicKey::from_base64(key).unwrap()
    }

    /// A pre-key message from a fresh device that claimed `fallback_key` of `to`.
    fn pre_key_message(
        to: &OwnAccount,
        fallback_key: Curve25519PublicKey,
    ) -> (Account, PreKeyMessage) {
        let sender = Account::new();
        let mut session = sender
            .create_outbound_session(SessionConfig::version_1(), to.curve25519_key(), fallback_key)
            .unwrap();
        let OlmMessage::PreKey(message) = session.encrypt("hello").unwrap() else {
            panic!("the first message of a session is a pre-key message")
        };
        (sender, message)
    }

    fn creates_session(to: &mut OwnAccount, (sender, message): &(Account, PreKeyMessage)) -> bool {
        to.inner_mut()
            .create_inbound_session(SessionConfig::version_1(), sender.curve25519_key(), message)
            .is_ok()
    }

    /// Whoever steals the account pickle later must not be able to decrypt
    /// sessions started with an old fallback key; senders that claimed it
    /// before its successor was uploaded must still get through for an hour.
    #[test]
    fn attack_old_fallback_key_is_forgotten_after_the_grace_period() {
        let mut bob = account();
        bob.prepare_initial_upload(0);
        let old_key = uploaded_fallback_key(&bob.keys_upload_body().unwrap());
        bob.mark_keys_uploaded(Some(50), 0);
        // Two senders claim the old key (the server hands it out again and
        // again once one-time keys run out).
        let late = pre_key_message(&bob, old_key);
        let after_grace = pre_key_message(&bob, old_key);

        // The sync reports the fallback key used: rotate.
        assert!(bob.update_key_counts(Some(0), Some(&[]), 1_000));
        // Until the new key is uploaded the server still hands out the old
        // one: however long that takes, the old key stays.
        assert!(!bob.forget_previous_fallback_key_if_due(1_000 + 10 * FALLBACK_KEY_GRACE_MS));
        let uploaded_at = 20 * FALLBACK_KEY_GRACE_MS;
        let new_key = uploaded_fallback_key(&bob.keys_upload_body().unwrap());
        assert_ne!(new_key, old_key);
        bob.mark_keys_uploaded(Some(50), uploaded_at);
        // The grace period survives a restart.
        let mut bob = OwnAccount::from_record(bob.to_record());

        // In flight: the grace period has not ended, the old key decrypts.
        assert!(!bob.forget_previous_fallback_key_if_due(uploaded_at + FALLBACK_KEY_GRACE_MS - 1));
        assert!(creates_session(&mut bob, &late));

        // After it the old key is gone, also from the stored record.
        let changed = bob.forget_previous_fallback_key_if_due(uploaded_at + FALLBACK_KEY_GRACE_MS);
        let mut bob = OwnAccount::from_record(bob.to_record());
        assert!(!creates_session(&mut bob, &after_grace));
        assert!(changed, "the account changed: the driver must commit it");
        assert!(
            !bob.forget_previous_fallback_key_if_due(uploaded_at + 2 * FALLBACK_KEY_GRACE_MS),
            "forgotten once: later syncs do not rewrite the account"
        );
        // The current key still works.
        let current = pre_key_message(&bob, new_key);
        assert!(creates_session(&mut bob, &current));
    }

    /// An account stored before the publication time was recorded may hold
    /// a previous fallback key: its grace period starts at the first sync
    /// after the upgrade.
    #[test]
    fn a_stored_account_without_publication_time_forgets_an_hour_after_loading() {
        let mut bob = account();
        bob.prepare_initial_upload(0);
        let old_key = uploaded_fallback_key(&bob.keys_upload_body().unwrap());
        bob.mark_keys_uploaded(Some(50), 0);
        bob.update_key_counts(Some(0), Some(&[]), 1);
        bob.mark_keys_uploaded(Some(50), 2);
        let mut record = bob.to_record();
        record.fallback_key_published_at = None;
        let mut bob = OwnAccount::from_record(record);
        let message = pre_key_message(&bob, old_key);

        let loaded_at = 1_000_000;
        assert!(bob.forget_previous_fallback_key_if_due(loaded_at), "publication time recorded");
        assert!(!bob.forget_previous_fallback_key_if_due(loaded_at + FALLBACK_KEY_GRACE_MS - 1));
        bob.forget_previous_fallback_key_if_due(loaded_at + FALLBACK_KEY_GRACE_MS);
        assert!(!creates_session(&mut bob, &message));
    }

    #[test]
    fn record_round_trip_keeps_keys() {
        let mut a = account();
        let keys = a.identity_keys();
        let rec = a.to_record();
        assert_eq!(rec.generation, 1);
        let b = OwnAccount::from_record(rec);
        assert_eq!(b.identity_keys(), keys);
    }

    #[test]
    fn an_account_never_unpickled_is_written_back_whole() {
        let mut a = account();
        a.prepare_initial_upload(0);
        let keys = a.identity_keys();
        let otks: Vec<_> = a.inner().one_time_keys().into_values().collect();
        assert!(!otks.is_empty());
        // Loaded lazily: to_record (first use) must still carry every key.
        let mut b = OwnAccount::from_record(a.to_record());
        let mut c = OwnAccount::from_record(b.to_record());
        assert_eq!(c.identity_keys(), keys);
        let mut again: Vec<_> = c.inner_mut().one_time_keys().into_values().collect();
        let mut expected = otks;
        again.sort_by_key(|k| k.to_base64());
        expected.sort_by_key(|k| k.to_base64());
        assert_eq!(again, expected);
    }
}
