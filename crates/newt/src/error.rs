//! The driver's error type: the only one that wraps a store error.

use newt_proto::devices::KeysQueryError;
use newt_proto::export::ExportError;
use newt_proto::identities::CrossSigningError;
use newt_proto::ids::{IdError, RoomId, UserId};
use newt_proto::megolm::MegolmError;
use newt_store::StoreError;

/// Everything a [`Machine`](crate::Machine) call can fail with, by blame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store failed; nothing of the operation was committed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An identifier given by the caller is malformed.
    #[error(transparent)]
    Id(#[from] IdError),
    /// A room event could not be decrypted (see the inner error for why,
    /// including a withheld notice when the sender refused us the key).
    #[error(transparent)]
    Megolm(#[from] MegolmError),
    /// A key export file could not be read or written.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A `/keys/query` response is malformed.
    #[error(transparent)]
    KeysQuery(#[from] KeysQueryError),
    /// A server response is malformed.
    #[error("malformed server response: {0}")]
    BadResponse(&'static str),
    /// `mark_request_sent` got an ID we never handed out (or already marked).
    #[error("unknown request ID {0}")]
    UnknownRequest(String),
    /// There is no usable outbound session: call `share_room_key` first.
    #[error("no outbound session for {0}: share the room key first")]
    NoOutboundSession(RoomId),
    /// The store holds an account for another user or device.
    #[error("the store belongs to {user_id}/{device_id}")]
    AccountMismatch {
        /// User in the store.
        user_id: String,
        /// Device in the store.
        device_id: String,
    },
    /// A key export entry could not be imported.
    #[error("invalid room key: {0}")]
    InvalidRoomKey(String),
    /// A cross-signing operation failed (missing or mismatched private key,
    /// invalid key material).
    #[error(transparent)]
    CrossSigning(#[from] CrossSigningError),
    /// No cross-signing identity is known for the user (for our own: query
    /// our user after bootstrapping, before importing keys).
    #[error("no cross-signing identity known for {0}")]
    NoIdentity(UserId),
    /// The device is unknown (or deleted).
    #[error("unknown device")]
    UnknownDevice,
    /// No verification flow with this ID.
    #[error("unknown verification flow {0}")]
    UnknownFlow(String),
    /// A scanned QR code cannot be used in this flow (the flow is unchanged).
    #[error("QR code: {0}")]
    QrScan(#[from] newt_proto::verification::qr_flow::ScanError),
    /// The verification flow is not in a state that allows this action.
    #[error("verification: {0}")]
    VerificationState(&'static str),
    /// `share_room_key` refused: these members' identities changed after we
    /// verified them, and the room blocks on that
    /// ([`RoomSettings::block_on_verification_violation`](crate::RoomSettings)).
    /// Acknowledge (or re-verify) each to continue.
    #[error("identity verification violated for {0:?}")]
    VerificationViolation(Vec<UserId>),
}
