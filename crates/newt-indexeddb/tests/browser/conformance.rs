//! The newt-store conformance suite, each check on a fresh database.

use newt_indexeddb::{IndexedDbStore, StoreKey};
use wasm_bindgen_test::wasm_bindgen_test;

use crate::common::fresh_name;

#[wasm_bindgen_test]
async fn conformance_suite() {
    newt_store::conformance::run_all(|| async {
        IndexedDbStore::open(&fresh_name("conformance"), StoreKey::Raw([7; 32])).await.unwrap()
    })
    .await;
}
