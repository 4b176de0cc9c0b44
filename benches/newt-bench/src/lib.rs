//! Shared pieces of newt's benchmarks: the fixture layout that the generator
//! writes and both harnesses (newt's and the matrix-sdk-crypto reference)
//! read, and small timing helpers. See `benches/README.md`.

use std::path::{Path, PathBuf};
use std::time::Instant;

/// Our own (the benchmarked machine's) user.
pub const OWN_USER: &str = "@me:bench.test";
/// Our own device.
pub const OWN_DEVICE: &str = "BENCHME";
/// The room of the Megolm fixture.
pub const ROOM: &str = "!megolm:bench.test";
/// The passphrase of every key export fixture.
pub const PASSPHRASE: &str = "bench passphrase";
/// PBKDF2 rounds of the key export fixtures: 1, so that the (deliberately
/// slow) key derivation does not hide the cost of the import itself.
pub const EXPORT_ROUNDS: u32 = 1;
/// Megolm events in the fixture.
pub const EVENTS: usize = 10_000;

/// The user that owns device number `index` of the pool, and the device ID.
///
/// Users have 1, 2, 3, 1, 2, 3, ... devices (two on average), as in a
/// large room; a prefix of `n` devices of the pool is a fixture of size `n`.
pub fn device_ids(count: usize) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(count);
    let mut user = 0usize;
    while out.len() < count {
        let per_user = 1 + user % 3;
        for k in 0..per_user {
            if out.len() == count {
                break;
            }
            out.push((format!("@u{user:05}:bench.test"), format!("DEV{user:05}X{k}")));
        }
        user += 1;
    }
    out
}

/// Fixture file names.
pub fn query_file(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("keys-query-{n}.json"))
}

/// The `/keys/claim` response for the first `n` devices of the pool.
pub fn claim_file(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("keys-claim-{n}.json"))
}

/// A key export with `n` sessions.
pub fn export_file(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("export-{n}.txt"))
}

/// The key export holding the one Megolm session of [`ROOM`].
pub fn megolm_session_file(dir: &Path) -> PathBuf {
    dir.join("megolm-session.txt")
}

/// The [`EVENTS`] encrypted room events of [`ROOM`], a JSON array.
pub fn megolm_events_file(dir: &Path) -> PathBuf {
    dir.join("megolm-events.json")
}

/// The distinct users of a `/keys/query` response, sorted.
pub fn users_of(query_response: &serde_json::Value) -> Vec<String> {
    query_response
        .get("device_keys")
        .and_then(serde_json::Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Peak resident memory of this process in KiB (`VmHWM`), if Linux says.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the peak-RSS counter to the current RSS, so that `VmHWM` then
/// measures a workload and not its setup. Ignored where unsupported.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Median of nanosecond samples (the mean of the two middle ones).
pub fn median(samples: &[u64]) -> u64 {
    let mut s = samples.to_vec();
    s.sort_unstable();
    match s.len() {
        0 => 0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2,
    }
}

/// Nanoseconds since `start`.
pub fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One result line, as both harnesses print it (JSON, one per line).
pub fn result_line(
    implementation: &str,
    workload: &str,
    store: &str,
    samples: &[u64],
    peak_rss_kib: Option<u64>,
) -> String {
    serde_json::json!({
        "impl": implementation,
        "workload": workload,
        "store": store,
        "median_ns": median(samples),
        "samples_ns": samples,
        "peak_rss_kib": peak_rss_kib,
    })
    .to_string()
}
