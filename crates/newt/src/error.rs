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
    /// A server response is malformed (the server's fault).
    #[error("malformed server response: {0}")]
    BadResponse(&'static str),
    /// newt broke one of its own invariants (a bug in newt, never the
    /// caller's, the peer's or the server's fault): please report it.
    #[error("internal error: {0}")]
    Internal(&'static str),
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

/// What kind of failure an [`Error`] is: one flat, stable list for apps and
/// bindings to branch on (`match` on it, or on its [`as_str`](Self::as_str)
/// code), without looking into the nested protocol errors. New kinds may be
/// added; existing ones keep their name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The store key or passphrase is wrong; nothing was written.
    WrongKey,
    /// The store was written by a newer newt.
    StoreTooNew,
    /// Another process changed what this operation read; retry it.
    StaleGeneration,
    /// Stored data is unreadable, or was tampered with.
    StoreCorrupt,
    /// The storage backend failed (I/O, database engine, browser storage).
    StoreBackend,
    /// The store belongs to another account.
    AccountMismatch,
    /// An identifier given by the caller is malformed.
    InvalidId,
    /// No room key for this event (see [`MegolmError::MissingSession`] for
    /// the sender's withheld notice, if any).
    MissingSession,
    /// The room key we hold starts after this event's message index.
    UnknownIndex,
    /// A second event at an already-seen message index (a replay).
    Replay,
    /// A room event or room key failed a check or could not be decrypted.
    DecryptionFailed,
    /// A key export file is wrong: bad passphrase or MAC, malformed, or
    /// asking for too many rounds.
    KeyExport,
    /// A server response is malformed.
    BadResponse,
    /// `mark_request_sent` got an ID newt never handed out.
    UnknownRequest,
    /// No outbound session: share the room key first.
    NoOutboundSession,
    /// Cross-signing failed (missing or mismatched key, changed identity).
    CrossSigning,
    /// No cross-signing identity is known for the user.
    NoIdentity,
    /// The device is unknown (or deleted).
    UnknownDevice,
    /// No verification flow with this ID.
    UnknownFlow,
    /// The verification flow does not allow this action now, or a scanned
    /// QR code does not fit it.
    VerificationState,
    /// A verified member's identity changed and the room blocks on that.
    VerificationViolation,
    /// A bug in newt.
    Internal,
}

impl ErrorKind {
    /// The kind's stable name, as bindings report it (e.g. `"WrongKey"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WrongKey => "WrongKey",
            Self::StoreTooNew => "StoreTooNew",
            Self::StaleGeneration => "StaleGeneration",
            Self::StoreCorrupt => "StoreCorrupt",
            Self::StoreBackend => "StoreBackend",
            Self::AccountMismatch => "AccountMismatch",
            Self::InvalidId => "InvalidId",
            Self::MissingSession => "MissingSession",
            Self::UnknownIndex => "UnknownIndex",
            Self::Replay => "Replay",
            Self::DecryptionFailed => "DecryptionFailed",
            Self::KeyExport => "KeyExport",
            Self::BadResponse => "BadResponse",
            Self::UnknownRequest => "UnknownRequest",
            Self::NoOutboundSession => "NoOutboundSession",
            Self::CrossSigning => "CrossSigning",
            Self::NoIdentity => "NoIdentity",
            Self::UnknownDevice => "UnknownDevice",
            Self::UnknownFlow => "UnknownFlow",
            Self::VerificationState => "VerificationState",
            Self::VerificationViolation => "VerificationViolation",
            Self::Internal => "Internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// The flat kind of this error.
    ///
    /// ```
    /// use newt::{Error, ErrorKind};
    /// assert_eq!(Error::UnknownDevice.kind(), ErrorKind::UnknownDevice);
    /// assert_eq!(Error::UnknownDevice.kind().as_str(), "UnknownDevice");
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Store(e) => match e {
                StoreError::WrongKey => ErrorKind::WrongKey,
                StoreError::TooNew { .. } => ErrorKind::StoreTooNew,
                StoreError::StaleGeneration { .. } => ErrorKind::StaleGeneration,
                StoreError::Corrupt(_) => ErrorKind::StoreCorrupt,
                StoreError::AccountMismatch => ErrorKind::AccountMismatch,
                _ => ErrorKind::StoreBackend,
            },
            Self::Id(_) => ErrorKind::InvalidId,
            Self::Megolm(e) => match e {
                MegolmError::MissingSession { .. } => ErrorKind::MissingSession,
                MegolmError::UnknownIndex { .. } => ErrorKind::UnknownIndex,
                MegolmError::Replay { .. } => ErrorKind::Replay,
                _ => ErrorKind::DecryptionFailed,
            },
            Self::InvalidRoomKey(_) => ErrorKind::DecryptionFailed,
            Self::Export(_) => ErrorKind::KeyExport,
            Self::KeysQuery(_) | Self::BadResponse(_) => ErrorKind::BadResponse,
            Self::Internal(_) => ErrorKind::Internal,
            Self::UnknownRequest(_) => ErrorKind::UnknownRequest,
            Self::NoOutboundSession(_) => ErrorKind::NoOutboundSession,
            Self::AccountMismatch { .. } => ErrorKind::AccountMismatch,
            Self::CrossSigning(_) => ErrorKind::CrossSigning,
            Self::NoIdentity(_) => ErrorKind::NoIdentity,
            Self::UnknownDevice => ErrorKind::UnknownDevice,
            Self::UnknownFlow(_) => ErrorKind::UnknownFlow,
            Self::QrScan(_) | Self::VerificationState(_) => ErrorKind::VerificationState,
            Self::VerificationViolation(_) => ErrorKind::VerificationViolation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes bindings report are the variant names, and a store error,
    /// a decryption error and a caller's error each map to their own kind.
    #[test]
    fn kinds_are_their_names_and_errors_map_to_them() {
        let cases = [
            (Error::Store(StoreError::WrongKey), ErrorKind::WrongKey),
            (
                Error::Store(StoreError::StaleGeneration { expected: 1, found: 2 }),
                ErrorKind::StaleGeneration,
            ),
            (Error::Store(StoreError::Backend("disk".into())), ErrorKind::StoreBackend),
            (Error::Megolm(MegolmError::Replay { index: 3 }), ErrorKind::Replay),
            (Error::Megolm(MegolmError::Malformed("x")), ErrorKind::DecryptionFailed),
            (Error::BadResponse("keys/claim"), ErrorKind::BadResponse),
            (Error::Internal("invariant"), ErrorKind::Internal),
            (Error::UnknownRequest("r".into()), ErrorKind::UnknownRequest),
        ];
        for (error, kind) in cases {
            assert_eq!(error.kind(), kind, "{error}");
            assert_eq!(kind.as_str(), format!("{kind:?}"));
        }
    }
}
