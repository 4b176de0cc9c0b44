//! # newt: end-to-end encryption for Matrix clients
//!
//! `newt` is the async driver around [`newt_proto`], the sans-IO protocol
//! core. A client feeds it sync responses, sends the HTTP requests it asks
//! for, and encrypts and decrypts room events with it. All state lives
//! behind one [`Store`](newt_store::Store).
//!
//! ```
//! # futures::executor::block_on(async {
//! use std::sync::Arc;
//! use newt::{Machine, UserId, DeviceId};
//! use newt_store::MemoryStore;
//!
//! let machine = Machine::open(
//!     Arc::new(MemoryStore::new()),
//!     UserId::parse("@alice:example.org")?,
//!     DeviceId::parse("ALICEDEVICE")?,
//! ).await?;
//!
//! // The first requests: upload our device keys and query our own devices.
//! let requests = machine.outgoing_requests().await?;
//! assert!(requests.iter().any(|r| matches!(r.kind, newt::RequestKind::KeysUpload { .. })));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! The flow for an encrypted room:
//! 1. [`Machine::update_tracked_users`] with the members, send
//!    [`Machine::outgoing_requests`] (a `/keys/query`), report responses with
//!    [`Machine::mark_request_sent`].
//! 2. [`Machine::get_missing_sessions`] gives a `/keys/claim` for devices
//!    without an Olm session.
//! 3. [`Machine::share_room_key`] gives to-device requests carrying the room key.
//! 4. [`Machine::encrypt_room_event`] / [`Machine::decrypt_room_event`].
//! 5. Every sync goes through [`Machine::receive_sync`] first.
//!
//! Devices are verified interactively with SAS over to-device messages:
//! [`Machine::request_verification`], then `accept_verification`,
//! `start_sas`, `sas_emoji`, `confirm_sas` (flows are kept in memory only).

mod clock;
mod error;
mod machine;
mod requests;

pub use error::Error;
pub use machine::{
    IdentityRejection, ImportSummary, KeysQueryReport, Machine, ProcessedToDevice,
    RejectedIdentity, RoomSettings, SyncChanges, SyncOutcome, ToDeviceError, ToDeviceOutcome,
    VerificationState,
};
pub use newt_proto::identities::{
    BootstrapRequests, CrossSigningError, DeviceTrust, IdentityTrust, OwnIdentityTrust,
    PrivateIdentityRecord,
};
pub use newt_proto::ids::{DeviceId, IdError, RoomId, UserId};
pub use newt_proto::megolm::{DecryptedRoomEvent, MegolmError, RotationSettings};
pub use newt_proto::records::LocalTrust;
pub use newt_proto::sharing::SharingPolicy;
pub use newt_proto::trust::SenderTrust;
pub use newt_proto::verification::CancelCode;
pub use requests::{OutgoingRequest, RequestKind};
