//! The shared backend conformance suite, on SQLite files.

use std::sync::atomic::{AtomicUsize, Ordering};

use newt_sqlite::{SqliteStore, StoreKey};

#[tokio::test]
async fn sqlite_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let next = AtomicUsize::new(0);
    newt_store::conformance::run_all(|| {
        let path = dir.path().join(format!("store-{}.sqlite", next.fetch_add(1, Ordering::SeqCst)));
        async move { SqliteStore::open(path, StoreKey::Raw([7; 32])).unwrap() }
    })
    .await;
    assert!(next.load(Ordering::SeqCst) >= 15);
}
