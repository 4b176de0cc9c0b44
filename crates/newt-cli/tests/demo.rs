//! The demo binary runs to the end (as `scripts/test.sh` runs it), on both
//! kinds of store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn run_demo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_newt-cli")).arg("demo").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("unexpected"), "{stdout}");
    assert!(stdout.contains("Demo finished"), "{stdout}");
    stdout
}

#[test]
fn demo_runs_on_memory_and_sqlite_stores() {
    assert!(run_demo(&["--memory"]).contains("store = in-memory"));
    assert!(run_demo(&[]).contains("store = encrypted SQLite"));
}

#[test]
fn demo_refuses_unknown_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_newt-cli")).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
