//! Helpers shared by the integration tests: real records, file digests and
//! child processes.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use sha2::{Digest, Sha256};

pub(crate) use newt_store::conformance::fixtures::*;

/// SHA-256 of a file's bytes, `None` if it does not exist.
pub(crate) fn digest(path: &Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|bytes| Sha256::digest(bytes).into())
}

/// The store file and its WAL and shared-memory companions.
pub(crate) fn store_files(path: &Path) -> [std::path::PathBuf; 3] {
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    [path.to_owned(), with("-wal"), with("-shm")]
}

/// Runs one of this binary's ignored `child_*` tests in a new process, with
/// `env` set and stdout piped.
pub(crate) fn spawn_child(test: &str, env: &[(&str, String)]) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([test, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().unwrap()
}

/// Reads a child's pipe to the end on another thread, so that the child
/// never blocks on a full pipe buffer.
pub(crate) fn drain(
    mut pipe: impl std::io::Read + Send + 'static,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text).unwrap();
        text
    })
}

/// A single-threaded runtime for the synchronous child tests.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().unwrap()
}
