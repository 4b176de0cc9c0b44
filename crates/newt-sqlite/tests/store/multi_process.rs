//! Two processes on one database for a few seconds: one bumps the account
//! generation by reload-then-write, the other writes sessions and now and
//! then tries an account write from a stale load. No "database is locked"
//! ever reaches a caller, and the stale write is always refused.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use newt_sqlite::{SqliteStore, StoreKey};
use newt_store::{Changes, Store, StoreError};
use serde::{Deserialize, Serialize};
use vodozemac::olm::Account;

use crate::common::*;

const CHILD_PATH: &str = "NEWT_SQLITE_MP_PATH";
const CHILD_MILLIS: &str = "NEWT_SQLITE_MP_MILLIS";
const KEY: [u8; 32] = [0x3D; 32];
const ME: &str = "@me:example.org";
const MY_DEVICE: &str = "MYDEVICE";
const STALE_MARKER: u64 = 999_999;
const SESSIONS_PER_COMMIT: usize = 4;
const RUN: Duration = Duration::from_secs(3);

/// What a child reports on its last line.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Report {
    /// Successful commits.
    ok: u64,
    /// Account writes refused as stale.
    stale: u64,
    /// Inbound sessions written (session writer only).
    sessions: Vec<String>,
    /// Every other error, as displayed.
    errors: Vec<String>,
}

fn child_env() -> (String, Duration) {
    let path = std::env::var(CHILD_PATH).unwrap();
    let millis: u64 = std::env::var(CHILD_MILLIS).unwrap().parse().unwrap();
    (path, Duration::from_millis(millis))
}

fn report(report: &Report) {
    let mut stdout = std::io::stdout();
    // On a line of its own: libtest has printed "test ... " before it.
    writeln!(stdout, "\nREPORT {}", serde_json::to_string(report).unwrap()).unwrap();
    stdout.flush().unwrap();
}

/// Child 1: reload the account, write generation + 1, for the whole run.
#[test]
#[ignore = "child process of two_processes_share_one_store"]
fn child_account_writer() {
    let (path, run) = child_env();
    let rt = runtime();
    let store = SqliteStore::open(path, StoreKey::Raw(KEY)).unwrap();
    let mut out = Report::default();
    let end = Instant::now() + run;
    while Instant::now() < end {
        let mut account = match rt.block_on(store.account()) {
            Ok(Some(account)) => account,
            Ok(None) => panic!("no account"),
            Err(e) => {
                out.errors.push(e.to_string());
                continue;
            }
        };
        account.generation += 1;
        account.uploaded_one_time_key_count = account.generation;
        match rt.block_on(store.apply(Changes { account: Some(account), ..Default::default() })) {
            Ok(()) => out.ok += 1,
            // Only possible if the other process wrote the account: it must not.
            Err(StoreError::StaleGeneration { .. }) => out.stale += 1,
            Err(e) => out.errors.push(e.to_string()),
        }
    }
    report(&out);
}

/// Child 2: write sessions; every 10th commit, try an account write based
/// on a load that the other process has since overtaken.
#[test]
#[ignore = "child process of two_processes_share_one_store"]
fn child_session_writer() {
    let (path, run) = child_env();
    let rt = runtime();
    let store = SqliteStore::open(path, StoreKey::Raw(KEY)).unwrap();
    let mut out = Report::default();
    let room_id = room("!shared:example.org");
    let mut peer = Account::new();
    let end = Instant::now() + run;
    let mut i = 0u64;
    while Instant::now() < end {
        i += 1;
        let sessions: Vec<_> =
            (0..SESSIONS_PER_COMMIT).map(|_| inbound(&room_id, "sender")).collect();
        let ids: Vec<String> = sessions.iter().map(|s| s.session_id.clone()).collect();
        let changes = Changes {
            inbound_group_sessions: sessions,
            olm_sessions: vec![olm_session(&mut peer)],
            ..Default::default()
        };
        match rt.block_on(store.apply(changes)) {
            Ok(()) => {
                out.ok += 1;
                out.sessions.extend(ids);
            }
            Err(e) => out.errors.push(e.to_string()),
        }
        if i.is_multiple_of(10) {
            stale_attempt(&rt, &store, &mut out);
        }
    }
    report(&out);
}

fn stale_attempt(rt: &tokio::runtime::Runtime, store: &SqliteStore, out: &mut Report) {
    let Ok(Some(mut loaded)) = rt.block_on(store.account()) else {
        out.errors.push("could not load the account".into());
        return;
    };
    // Wait until the other process has moved past what we loaded.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match rt.block_on(store.account()) {
            Ok(Some(now)) if now.generation > loaded.generation => break,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            // The account writer has finished its run.
            Ok(_) => return,
            Err(e) => return out.errors.push(e.to_string()),
        }
    }
    loaded.generation += 1;
    loaded.uploaded_one_time_key_count = STALE_MARKER;
    match rt.block_on(store.apply(Changes { account: Some(loaded), ..Default::default() })) {
        Err(StoreError::StaleGeneration { .. }) => out.stale += 1,
        Ok(()) => out.errors.push("a stale account write was accepted".into()),
        Err(e) => out.errors.push(e.to_string()),
    }
}

fn finish(mut child: std::process::Child, name: &str) -> Report {
    // Drain the pipes while waiting: a report larger than the pipe buffer
    // would otherwise block the child in its last write, forever.
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + RUN + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{name} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let line = stdout
        .lines()
        .find_map(|l| l.find("REPORT ").map(|at| &l[at + "REPORT ".len()..]))
        .unwrap_or_else(|| panic!("{name} reported nothing.\nstdout: {stdout}\nstderr: {stderr}"));
    serde_json::from_str(line).unwrap()
}

fn setup(path: &Path) {
    let store = SqliteStore::open(path, StoreKey::Raw(KEY)).unwrap();
    let changes = Changes { account: Some(account(ME, MY_DEVICE, 0)), ..Default::default() };
    runtime().block_on(store.apply(changes)).unwrap();
}

#[test]
fn two_processes_share_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.sqlite");
    setup(&path);
    let env =
        [(CHILD_PATH, path.display().to_string()), (CHILD_MILLIS, RUN.as_millis().to_string())];
    let accounts = spawn_child("multi_process::child_account_writer", &env);
    let sessions = spawn_child("multi_process::child_session_writer", &env);
    let accounts = finish(accounts, "account writer");
    let sessions = finish(sessions, "session writer");
    eprintln!(
        "account writer: {} commits; session writer: {} commits, {} stale writes refused",
        accounts.ok, sessions.ok, sessions.stale
    );

    for errors in [&accounts.errors, &sessions.errors] {
        assert!(errors.is_empty(), "errors surfaced: {errors:?}");
    }
    assert_eq!(accounts.stale, 0, "the stale writer overwrote the account");
    assert!(accounts.ok > 20 && sessions.ok > 10, "{accounts:?} / {} commits", sessions.ok);
    assert!(sessions.stale >= 1, "no stale write was attempted");

    let rt = runtime();
    let store = SqliteStore::open(&path, StoreKey::Raw(KEY)).unwrap();
    let account = rt.block_on(store.account()).unwrap().unwrap();
    assert_eq!(account.generation, accounts.ok);
    assert_eq!(account.uploaded_one_time_key_count, accounts.ok);
    assert_ne!(account.uploaded_one_time_key_count, STALE_MARKER);
    let room_id = room("!shared:example.org");
    for id in &sessions.sessions {
        assert!(rt.block_on(store.inbound_group_session(&room_id, id)).unwrap().is_some());
    }
    let mut count = 0;
    let mut cursor = None;
    loop {
        let page = rt.block_on(store.inbound_group_sessions_page(cursor, 100)).unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some((last.room_id.clone(), last.session_id.clone()));
        count += page.len();
    }
    assert_eq!(count, sessions.sessions.len());
    assert_eq!(count as u64, sessions.ok * SESSIONS_PER_COMMIT as u64);
}
