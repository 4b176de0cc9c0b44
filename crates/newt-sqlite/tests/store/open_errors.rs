//! Opening what cannot be opened: a typed error, and the file's bytes are
//! exactly as before.

use std::path::Path;

use newt_proto::records::TrackedUser;
use newt_sqlite::{SqliteStore, StoreKey};
use newt_store::{Changes, Store, StoreError};

use crate::common::*;

/// A closed store holding a few pages of data.
fn make_store(path: &Path, key: StoreKey) {
    let rt = runtime();
    let store = SqliteStore::open(path, key).unwrap();
    let room_id = room("!r:example.org");
    let changes = Changes {
        inbound_group_sessions: (0..40).map(|_| inbound(&room_id, "sender")).collect(),
        tracked_users: vec![TrackedUser { user_id: user("@kept:example.org"), outdated: false }],
        ..Default::default()
    };
    rt.block_on(store.apply(changes)).unwrap();
}

/// Opens `path` with `key`, expecting an error; checks every companion file
/// is byte-for-byte unchanged and no WAL was left behind.
fn open_fails(path: &Path, key: StoreKey) -> StoreError {
    let files = store_files(path);
    let before: Vec<_> = files.iter().map(|f| digest(f)).collect();
    let err = SqliteStore::open(path, key).unwrap_err();
    let after: Vec<_> = files.iter().map(|f| digest(f)).collect();
    assert_eq!(before[0], after[0], "{} changed", path.display());
    assert!(after[1].is_none() || after[1] == before[1], "a WAL was left: {err:?}");
    err
}

fn still_opens(path: &Path, key: StoreKey) {
    let store = SqliteStore::open(path, key).unwrap();
    let tracked = runtime().block_on(store.tracked_users()).unwrap();
    assert_eq!(tracked[0].user_id.as_str(), "@kept:example.org");
}

#[test]
fn wrong_raw_key_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    make_store(&path, StoreKey::Raw([1; 32]));
    assert!(matches!(open_fails(&path, StoreKey::Raw([2; 32])), StoreError::WrongKey));
    assert!(matches!(open_fails(&path, StoreKey::Passphrase("x".into())), StoreError::WrongKey));
    still_opens(&path, StoreKey::Raw([1; 32]));
}

#[test]
fn wrong_passphrase_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    make_store(&path, StoreKey::Passphrase("right".into()));
    assert!(matches!(
        open_fails(&path, StoreKey::Passphrase("wrong".into())),
        StoreError::WrongKey
    ));
    assert!(matches!(open_fails(&path, StoreKey::Raw([0; 32])), StoreError::WrongKey));
    still_opens(&path, StoreKey::Passphrase("right".into()));
}

#[test]
fn truncated_file_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    make_store(&path, StoreKey::Raw([1; 32]));
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8 * 4096, "store too small to truncate: {}", bytes.len());
    for cut in [bytes.len() - 4096, bytes.len() / 2, 4096, 50] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = open_fails(&path, StoreKey::Raw([1; 32]));
        assert!(matches!(err, StoreError::Corrupt(_)), "cut at {cut}: {err:?}");
    }
}

#[test]
fn not_a_database_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    let noise: Vec<u8> =
        (0..16384u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for contents in [noise, b"hello, I am a text file\n".to_vec(), vec![0; 4096]] {
        std::fs::write(&path, &contents).unwrap();
        let err = open_fails(&path, StoreKey::Raw([1; 32]));
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    }
}

#[test]
fn another_programs_database_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('mine');")
        .unwrap();
    drop(conn);
    let err = open_fails(&path, StoreKey::Raw([1; 32]));
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
}

#[test]
fn newer_schema_version_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    make_store(&path, StoreKey::Raw([1; 32]));
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 4).unwrap();
    drop(conn);
    let err = open_fails(&path, StoreKey::Raw([1; 32]));
    assert!(matches!(err, StoreError::TooNew { found: 4, supported: 3 }), "{err:?}");
    // Even with a wrong key, the version verdict comes first.
    let err = open_fails(&path, StoreKey::Raw([2; 32]));
    assert!(matches!(err, StoreError::TooNew { .. }), "{err:?}");
}

#[test]
fn missing_directory_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/store.sqlite");
    assert!(SqliteStore::open(&path, StoreKey::Raw([1; 32])).is_err());
}
