//! Integration tests of the SQLite store, in one binary (one link on a
//! two-core machine). The crash and multi-process tests re-run this binary
//! as their child processes (`child_*` tests, ignored in normal runs).

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod attack;
mod common;
mod conformance;
mod crash;
mod fixture;
mod fixture_v3;
mod multi_process;
mod open_errors;
mod persistence;
mod plaintext;
