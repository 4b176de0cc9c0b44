//! Persistent forms of cross-signing state, written through
//! [`Changes`](crate::changes::Changes) (`identities`, `private_identity`).
//!
//! New fields get `#[serde(default)]`. The private-key record has a
//! redacting `Debug` and is zeroized on drop.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::ids::UserId;

/// A user's public cross-signing identity, ours or someone else's, with the
/// trust bookkeeping that must survive restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// The owner.
    pub user_id: UserId,
    /// The signed master key object, as received.
    pub master_key: Value,
    /// The signed self-signing key object, as received.
    pub self_signing_key: Value,
    /// The signed user-signing key object: only ever visible for our own user.
    #[serde(default)]
    pub user_signing_key: Option<Value>,
    /// The master key (unpadded base64) the user accepted, first on sight
    /// (TOFU) and again on each acknowledged change. Other users only.
    #[serde(default)]
    pub pinned_master_key: Option<String>,
    /// This identity was verified (our USK signed its master key) at some
    /// point. Losing that without an acknowledgement is a violation.
    #[serde(default)]
    pub previously_verified: bool,
    /// Our own identity only: this device verified the master key itself
    /// (SAS or QR with another of our devices, or holding the private key).
    #[serde(default)]
    pub locally_verified: bool,
}

/// Our private cross-signing keys as unpadded base64 Ed25519 seeds: the same
/// encoding as secret storage (`m.cross_signing.*`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct PrivateIdentityRecord {
    /// Our user.
    #[zeroize(skip)]
    pub user_id: UserId,
    /// Master key seed.
    #[serde(default)]
    pub master: Option<String>,
    /// Self-signing key seed.
    #[serde(default)]
    pub self_signing: Option<String>,
    /// User-signing key seed.
    #[serde(default)]
    pub user_signing: Option<String>,
}

impl fmt::Debug for PrivateIdentityRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |s: &Option<String>| if s.is_some() { "<redacted>" } else { "None" };
        f.debug_struct("PrivateIdentityRecord")
            .field("user_id", &self.user_id)
            .field("master", &shown(&self.master))
            .field("self_signing", &shown(&self.self_signing))
            .field("user_signing", &shown(&self.user_signing))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_record_debug_redacts_and_old_records_load() {
        let rec = PrivateIdentityRecord {
            user_id: UserId::parse("@a:b").unwrap(),
            master: Some("c2VjcmV0c2VjcmV0".into()),
            self_signing: None,
            user_signing: Some("b3RoZXJzZWNyZXQ".into()),
        };
        let dbg = format!("{rec:?}");
        assert!(!dbg.contains("c2VjcmV0c2VjcmV0") && !dbg.contains("b3RoZXJzZWNyZXQ"));
        assert!(dbg.contains("<redacted>"));
        let old: IdentityRecord =
            serde_json::from_str(r#"{"user_id":"@a:b","master_key":{},"self_signing_key":{}}"#)
                .unwrap();
        assert!(!old.previously_verified && old.pinned_master_key.is_none());
    }
}
