//! The store in a real browser (headless Chromium, `wasm-bindgen-test`):
//! `scripts/test-browser.sh` runs these.

#![cfg(target_arch = "wasm32")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

mod common;
mod conformance;
mod open;
mod plaintext;
mod tabs;
