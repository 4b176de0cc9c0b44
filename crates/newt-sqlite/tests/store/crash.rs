//! Crash safety: a child process commits numbered changes and prints each
//! acknowledged number; the parent SIGKILLs it at random moments, reopens,
//! and checks the database is intact, every acknowledged change is there,
//! and no change is there in part.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use newt_proto::records::{DeviceRecord, LocalTrust, TrackedUser};
use newt_sqlite::{SqliteStore, StoreKey};
use newt_store::{Changes, Store};
use rand::RngExt;

use crate::common::*;

const CHILD_PATH: &str = "NEWT_SQLITE_CRASH_PATH";
const CHILD_START: &str = "NEWT_SQLITE_CRASH_START";
const KEY: [u8; 32] = [0xC4; 32];
const OWNER: &str = "@crash:example.org";
const ROUNDS: u64 = 25;

/// Change `n`: a device (large, several pages) and a tracked user, which
/// must both be present or both absent.
fn change(n: u64) -> Changes {
    let filler: String =
        (0..6000).map(|i| char::from(b'a' + ((n as usize + i) % 26) as u8)).collect();
    Changes {
        devices: vec![DeviceRecord {
            user_id: user(OWNER),
            device_id: device(&format!("D{n}")),
            curve25519: format!("curve-{n}"),
            ed25519: format!("ed-{n}"),
            algorithms: vec![],
            display_name: None,
            keys: serde_json::json!({ "filler": filler }).into(),
            local_trust: LocalTrust::Unset,
            deleted: false,
        }],
        tracked_users: vec![TrackedUser {
            user_id: user(&format!("@n{n}:example.org")),
            outdated: false,
        }],
        sync_token: Some(format!("token-{n}")),
        ..Default::default()
    }
}

/// The child: applies change after change until it is killed.
#[test]
#[ignore = "child process of crash_safety_under_sigkill"]
fn child_crash_writer() {
    let path = std::env::var(CHILD_PATH).unwrap();
    let start: u64 = std::env::var(CHILD_START).unwrap().parse().unwrap();
    let rt = runtime();
    let store = SqliteStore::open(path, StoreKey::Raw(KEY)).unwrap();
    let mut stdout = std::io::stdout();
    // Start on a line of its own: libtest has printed "test ... " before.
    writeln!(stdout).unwrap();
    for n in start.. {
        rt.block_on(store.apply(change(n))).unwrap();
        writeln!(stdout, "ack {n}").unwrap();
        stdout.flush().unwrap();
    }
}

fn numbers_in(path: &Path) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let rt = runtime();
    let store = SqliteStore::open(path, StoreKey::Raw(KEY)).unwrap();
    let devices: BTreeSet<u64> = rt
        .block_on(store.devices(&user(OWNER)))
        .unwrap()
        .iter()
        .map(|d| d.device_id.as_str()[1..].parse().unwrap())
        .collect();
    let tracked: BTreeSet<u64> = rt
        .block_on(store.tracked_users())
        .unwrap()
        .iter()
        .map(|t| t.user_id.as_str()[2..].split(':').next().unwrap().parse().unwrap())
        .collect();
    (devices, tracked)
}

fn integrity(path: &Path) -> String {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap()
}

#[test]
fn crash_safety_under_sigkill() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.sqlite");
    drop(SqliteStore::open(&path, StoreKey::Raw(KEY)).unwrap());
    let mut rng = rand::rng();
    let mut acknowledged = BTreeSet::new();
    let mut killed_with_acks = 0;

    for round in 0..ROUNDS {
        let start = round * 1_000_000;
        let mut child = spawn_child(
            "crash::child_crash_writer",
            &[(CHILD_PATH, path.display().to_string()), (CHILD_START, start.to_string())],
        );
        let stdout = drain(child.stdout.take().unwrap());
        let stderr = drain(child.stderr.take().unwrap());
        // Random moments: some kills land while the child is still opening.
        std::thread::sleep(Duration::from_millis(rng.random_range(5..300)));
        child.kill().unwrap(); // SIGKILL on unix
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child exited by itself: {status:?}");
        let (out, err) = (stdout.join().unwrap(), stderr.join().unwrap());
        // Whole lines only (the child prints each number after its commit).
        let acks: Vec<u64> = out
            .split_inclusive('\n')
            .filter_map(|l| l.strip_prefix("ack ")?.strip_suffix('\n'))
            .map(|n| n.parse().unwrap())
            .collect();
        assert!(!err.contains("panicked"), "child failed: {err}");
        if !acks.is_empty() {
            killed_with_acks += 1;
        }
        acknowledged.extend(acks);

        assert_eq!(integrity(&path), "ok", "round {round}");
        let (devices, tracked) = numbers_in(&path);
        assert_eq!(devices, tracked, "round {round}: a change is there in part");
        let missing: Vec<_> = acknowledged.difference(&devices).collect();
        assert!(missing.is_empty(), "round {round}: acknowledged but lost: {missing:?}");
    }
    assert!(killed_with_acks >= ROUNDS / 2, "only {killed_with_acks} rounds committed anything");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    eprintln!(
        "{ROUNDS} SIGKILLs, {} acknowledged changes, {killed_with_acks} rounds with acks, {:?}",
        acknowledged.len(),
        started.elapsed()
    );
}
