//! # newt-proto: the sans-IO Matrix end-to-end-encryption core
//!
//! Every protocol rule of newt lives here, as synchronous functions over
//! explicit state. Nothing in this crate performs I/O, reads the clock,
//! awaits, or locks: time (`now`, milliseconds since the Unix epoch) and every
//! server response are arguments, and every state change comes back as a
//! [`Changes`](changes::Changes) value for the driver to persist.
//!
//! ```text
//!             sync response / HTTP responses / now
//!                              |
//!                              v
//!   records from the store --> newt-proto --> results (plaintext, requests, errors)
//!                                   |
//!                                   v
//!                         Changes (commit atomically, then hand out results)
//! ```
//!
//! Modules follow the protocol: [`account`] (our device and its keys),
//! [`devices`] (other devices, `/keys/query` and `/keys/claim`), [`olm`]
//! (to-device encryption), [`megolm`] (room encryption), [`sharing`] (who
//! gets a room key; one share round, composed), [`key_requests`] (asking
//! for and forwarding keys), [`export`] (the key export file format), with
//! [`json`] (canonical JSON and signatures), [`ids`], [`records`] and
//! [`changes`] underneath.

#![cfg_attr(test, allow(clippy::type_complexity, clippy::cloned_ref_to_slice_refs))]

pub mod account;
pub mod changes;
pub mod devices;
pub mod export;
pub mod identities;
pub mod ids;
pub mod json;
pub mod key_requests;
pub mod megolm;
pub mod olm;
pub mod parallel;
pub mod records;
pub mod secret;
pub mod sharing;
pub mod trust;
pub mod verification;

pub use vodozemac;

/// The Olm algorithm name.
pub const OLM_V1: &str = "m.olm.v1.curve25519-aes-sha2";
/// The Megolm algorithm name.
pub const MEGOLM_V1: &str = "m.megolm.v1.aes-sha2";
