//! Cross-signing identities (spec "Cross-signing").
//!
//! Each user has a master key (MSK) that signs a self-signing key (SSK, which
//! signs the user's devices) and a user-signing key (USK, which signs other
//! users' master keys). This module parses and checks those keys
//! ([`CrossSigningKey`], [`CrossSigningKeys`]), holds our private keys
//! ([`PrivateCrossSigningIdentity`]: bootstrap, signing, seed export), models
//! the public identities ([`OwnIdentity`], [`UserIdentity`]) and decides
//! trust in one place ([`TrustRoot`]).
//!
//! ```text
//!  /keys/query --> CrossSigningKeys::from_keys_query --> *Identity::updated_record --> store
//!  store ------> OwnIdentity / UserIdentity --> TrustRoot --> IdentityTrust / DeviceTrust
//!  bootstrap --> PrivateCrossSigningIdentity + BootstrapRequests --> driver uploads
//! ```

mod identity;
mod keys;
mod private;
pub mod records;
mod trust;

pub use identity::{CrossSigningKeys, OwnIdentity, UserIdentity};
pub use keys::{cross_signing_key_id, CrossSigningKey, KeyUsage};
pub use private::{signatures_upload_body, BootstrapRequests, PrivateCrossSigningIdentity};
pub use records::{IdentityRecord, PrivateIdentityRecord};
pub use trust::{DeviceTrust, IdentityTrust, OwnIdentityTrust, TrustRoot};

use crate::json::JsonError;

/// A cross-signing key or identity that failed a check, or a missing key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CrossSigningError {
    /// The peer (server or other user) sent an object of the wrong shape.
    #[error("malformed cross-signing key: {0}")]
    Malformed(&'static str),
    /// `keys` must hold exactly one key.
    #[error("a cross-signing key must list exactly one key, found {0}")]
    WrongKeyCount(usize),
    /// `usage` lacks the expected usage.
    #[error("expected a {expected} key, usage is {found:?}")]
    UsageMismatch {
        /// The usage looked for.
        expected: KeyUsage,
        /// The usages listed.
        found: Vec<String>,
    },
    /// The object names a different user.
    #[error("key of {found} listed for {expected}")]
    UserMismatch {
        /// The user it was listed under.
        expected: String,
        /// The user inside the object.
        found: String,
    },
    /// The key ID is not `ed25519:<the key>`.
    #[error("key ID {key_id} does not name its key")]
    KeyIdMismatch {
        /// The offending key ID.
        key_id: String,
    },
    /// A key (public or private) is not valid.
    #[error("invalid {0} key")]
    InvalidKey(KeyUsage),
    /// A required signature is missing or does not verify (e.g. an SSK not
    /// signed by the MSK).
    #[error("cross-signing signature: {0}")]
    Signature(#[from] JsonError),
    /// A key needed for this operation is absent.
    #[error("no {0} key")]
    MissingKey(KeyUsage),
    /// A private key does not match the published public key.
    #[error("the private {0} key does not match the public identity")]
    PublicKeyMismatch(KeyUsage),
    /// The master key the user compared is not the stored one (the server
    /// may have swapped the identity meanwhile): nothing is signed.
    #[error("the master key to verify is {found}, not the one compared ({expected})")]
    MasterKeyMismatch {
        /// The key the user compared (unpadded base64).
        expected: String,
        /// The stored key (unpadded base64).
        found: String,
    },
    /// The identity changed since it was pinned or verified
    /// ([`IdentityTrust::PinnedChanged`] or
    /// [`IdentityTrust::VerificationViolation`]): the change must be
    /// acknowledged before the new identity can be verified.
    #[error("the identity changed ({0:?}): acknowledge the change first")]
    IdentityChanged(IdentityTrust),
}
