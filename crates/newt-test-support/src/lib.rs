//! What newt's tests (and the demo) share: [`SimDevice`], a newt
//! [`Machine`](newt::Machine) wired to the in-process
//! [`Router`](newt_router::Router) as a client would wire it to a
//! homeserver; the set-ups the tests repeat (devices on fresh, timed or
//! failing stores, tracking each other, cross-signed); [`RawDevice`], an
//! attacker built from newt-proto primitives that can Olm-encrypt anything;
//! and [`FlakyStore`], a store that fails on demand.
//!
//! A dev-dependency of `newt` (its integration tests in `crates/newt/tests`)
//! and `newt-interop`; `newt-cli`'s demo drives [`SimDevice`]. Use it from
//! integration tests only: a unit test inside `newt` would see two copies
//! of `newt` (the one under test and the one this crate links), whose
//! types do not match.

// Test code: a set-up that fails should stop the test at once, so the
// helpers unwrap and panic instead of returning errors (SimDevice, which
// the demo uses, returns them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod flaky_store;
mod raw_device;
mod setup;
mod sim_device;

pub use flaky_store::FlakyStore;
pub use raw_device::RawDevice;
pub use setup::{
    alice_pair, bootstrap, cross_signed, dev, did, flaky_dev, manual_clock, own_record, post,
    rejected, settle, timed_dev, uid,
};
pub use sim_device::{SimDevice, SimError};
