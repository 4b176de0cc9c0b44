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
//! ## Trust
//!
//! Every trust question is answered in one place (the cross-signing chain
//! of [`newt_proto::identities::TrustRoot`] plus the user's local
//! decisions), and surfaces as four small enums:
//!
//! | question | API | states |
//! |---|---|---|
//! | do I trust my own master key? | [`Machine::own_identity_state`] | [`OwnIdentityTrust`]: `Verified` (we hold the private key, or verified it), `Unverified` |
//! | what about another user? | [`Machine::user_identity_state`] | [`IdentityTrust`]: `Verified` (our user-signing key signed it), `Pinned` (first seen, TOFU), `PinnedChanged` (changed since pinned: warn), `VerificationViolation` (was verified, changed: must be acknowledged) |
//! | and one device? | [`Machine::device_trust`] | [`DeviceTrust`]: `LocallyVerified`, `CrossSignedByVerifiedOwner`, `CrossSignedByPinnedOwner`, `CrossSignedByUntrustedOwner`, `NotCrossSigned`, `Unknown`, `Blacklisted` |
//! | who sent this message? | [`DecryptedRoomEvent::trust`] | [`SenderTrust`]: `Verified`, `Unverified`, `UnknownDevice`, `DeletedDevice` (signed out since), `Unauthenticated` (forwarded/imported key) |
//!
//! [`Machine::acknowledge_identity_change`] pins a changed identity (ending
//! `PinnedChanged` / `VerificationViolation`). Who receives room keys is the
//! room's [`SharingPolicy`] (`AllDevices`, `ExcludeBlacklisted` (default),
//! `CrossSignedOnly`, `VerifiedOnly`: devices left out get an
//! `m.room_key.withheld` with `m.unverified` or `m.blacklisted`), and
//! [`RoomSettings::block_on_verification_violation`] refuses to share while
//! a verified member's identity changed:
//!
//! ```
//! # futures::executor::block_on(async {
//! use std::sync::Arc;
//! use newt::{
//!     DeviceId, DeviceTrust, Machine, OwnIdentityTrust, RoomSettings, SenderTrust,
//!     SharingPolicy, UserId,
//! };
//! use newt_store::MemoryStore;
//!
//! let alice = UserId::parse("@alice:example.org")?;
//! let machine =
//!     Machine::open(Arc::new(MemoryStore::new()), alice.clone(), DeviceId::parse("A1")?).await?;
//! assert_eq!(machine.own_identity_state().await?, None, "no cross-signing yet");
//!
//! // Create the cross-signing keys; the app uploads the two bodies (the
//! // first behind user-interactive auth).
//! let upload = machine.bootstrap_cross_signing().await?;
//! assert!(upload.device_signing_upload.get("master_key").is_some());
//! // Once uploaded and seen in our next `/keys/query`, the identity shows
//! // as `Some(OwnIdentityTrust::Verified)` (we hold its private keys).
//! let _: Option<OwnIdentityTrust> = machine.own_identity_state().await?;
//! // Our own device is always trusted.
//! let me = DeviceId::parse("A1")?;
//! assert_eq!(machine.device_trust(&alice, &me).await?, Some(DeviceTrust::LocallyVerified));
//!
//! // Only verified devices get this room's keys, and sending stops while a
//! // verified member's identity changed until the user acknowledges it.
//! let settings = RoomSettings {
//!     policy: SharingPolicy::VerifiedOnly,
//!     block_on_verification_violation: true,
//!     ..RoomSettings::default()
//! };
//! assert!(settings.policy.needs_device_trust());
//!
//! // How an app might label a decrypted message.
//! fn badge(trust: SenderTrust) -> &'static str {
//!     match trust {
//!         SenderTrust::Verified => "",
//!         SenderTrust::Unverified => "unverified device",
//!         SenderTrust::UnknownDevice => "unknown device",
//!         SenderTrust::DeletedDevice => "device signed out",
//!         SenderTrust::Unauthenticated => "authenticity not guaranteed",
//!     }
//! }
//! assert_eq!(badge(SenderTrust::Unauthenticated), "authenticity not guaranteed");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Verification
//!
//! Interactive verification ([`VerificationState`]) proves keys and feeds
//! the trust above: a finished flow marks the other device verified (our
//! own: signed with our self-signing key) and the other user's master key
//! signed with our user-signing key (a `/keys/signatures/upload` request).
//!
//! - To-device with one device: [`Machine::request_verification`]; with all
//!   our other devices: [`Machine::request_own_verification`] (the first to
//!   answer takes it, the others get `m.accepted`).
//! - In a room with another user: [`Machine::room_verification_request_content`],
//!   then [`Machine::room_verification_request_sent`]; room events go through
//!   [`Machine::receive_room_verification_event`], messages to send come out
//!   as [`RequestKind::RoomMessage`].
//! - Then [`Machine::accept_verification`] (theirs), and either SAS
//!   ([`Machine::start_sas`], [`Machine::sas_emoji`] / [`Machine::sas_decimals`],
//!   [`Machine::confirm_sas`] or [`Machine::sas_mismatch`]) or QR
//!   ([`Machine::qr_code`] to show (the payload bytes; with the `qr-matrix`
//!   feature, `QrMatrix::render` turns them into modules), [`Machine::scan_qr_code`] to scan,
//!   [`Machine::confirm_qr_scanned`] when the other side scanned ours).
//!
//! Flows are kept in memory only: a restart forgets them (the other side
//! times out after 10 minutes, or the user starts again). A step whose
//! store commit fails (e.g. recording what a finished flow verified) sends
//! nothing it queued and cancels the flow with [`STORE_FAILURE`].

mod clock;
mod error;
mod machine;
mod progress;
mod requests;
mod types;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, ErrorKind};
pub use machine::{
    IdentityRejection, ImportOptions, ImportSummary, KeysQueryReport, Machine, ProcessedToDevice,
    RejectedIdentity, RoomSettings, SyncChanges, SyncOutcome, ToDeviceError, ToDeviceOutcome,
    VerificationFlow, VerificationMethods, VerificationState, STORE_FAILURE,
};
pub use newt_proto::export::{ExportError, DEFAULT_MAX_ROUNDS};
pub use newt_proto::identities::{
    BootstrapRequests, CrossSigningError, DeviceTrust, IdentityTrust, OwnIdentityTrust,
    PrivateIdentityRecord,
};
pub use newt_proto::ids::{DeviceId, IdError, RoomId, UserId};
pub use newt_proto::megolm::{
    DecryptedRoomEvent, DecryptionFailure, MegolmError, RotationSettings,
};
pub use newt_proto::parallel::{max_threads, set_max_threads};
pub use newt_proto::records::LocalTrust;
pub use newt_proto::sharing::SharingPolicy;
pub use newt_proto::trust::SenderTrust;
#[cfg(feature = "qr-matrix")]
pub use newt_proto::verification::qr::QrMatrix;
pub use newt_proto::verification::qr_flow::ScanError;
pub use newt_proto::verification::CancelCode;
pub use newt_store::{MemoryStore, Store, StoreError};
pub use progress::Progress;
pub use requests::{OutgoingRequest, RequestKind};
pub use types::{Device, Emoji, IdentityKeys};
