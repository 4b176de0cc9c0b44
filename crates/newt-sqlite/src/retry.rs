//! Busy handling: no caller ever sees "database is locked".
//!
//! Two layers. A busy handler ([`install_busy_handler`]) makes a statement
//! wait up to [`BUSY_TIMEOUT`] for another connection's lock, polling about
//! every millisecond. (SQLite's own `busy_timeout` backs off to 100 ms
//! sleeps; against a process that commits back to back, the waiting writer
//! then almost never finds the lock free and starves.) Some contention is reported
//! at once instead (a WAL read snapshot that cannot be upgraded, WAL recovery
//! by another process, a checkpoint racing a writer): [`with_retry`] catches
//! `SQLITE_BUSY`/`SQLITE_LOCKED` from any statement, rolls the transaction
//! back (by dropping it), sleeps with jittered exponential backoff, and runs
//! the whole unit of work again. Units of work are written to be re-runnable:
//! they read what they check inside their own transaction.
//!
//! Only after [`MAX_WAIT`] of continuous contention (another process holding
//! the write lock that long is hung, not busy) does the caller get an error,
//! [`StoreError::Backend`] wrapping [`Busy`].

use std::fmt;
use std::time::{Duration, Instant};

use rand::RngExt;
use rusqlite::ErrorCode;

use newt_store::StoreError;

/// How long one SQLite statement waits for a lock before reporting busy.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`with_retry`] keeps retrying a busy unit of work.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// First backoff delay.
const FIRST_DELAY: Duration = Duration::from_millis(1);
/// Longest backoff delay.
const MAX_DELAY: Duration = Duration::from_millis(100);

/// The failure of a unit of work: an engine error (possibly retryable) or a
/// store-level verdict (never retried).
#[derive(Debug)]
pub(crate) enum TxError {
    /// The engine failed.
    Sqlite(rusqlite::Error),
    /// A check failed, or a value did not decode.
    Store(StoreError),
}

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> Self {
        TxError::Sqlite(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

impl From<TxError> for StoreError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::Store(e) => e,
            TxError::Sqlite(e) => sqlite_error(e),
        }
    }
}

/// The error a caller gets only if the database stayed busy for [`MAX_WAIT`].
#[derive(Debug)]
pub(crate) struct Busy {
    waited: Duration,
}

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gave up after {:.1} s: another connection kept the store's write lock",
            self.waited.as_secs_f64()
        )
    }
}

impl std::error::Error for Busy {}

/// Installs the polling busy handler on `conn`.
pub(crate) fn install_busy_handler(conn: &mut rusqlite::Connection) -> rusqlite::Result<()> {
    let mut waiting_since = Instant::now();
    conn.busy_handler(Some(move |count: i32| {
        if count == 0 {
            waiting_since = Instant::now();
        }
        if waiting_since.elapsed() >= BUSY_TIMEOUT {
            return false;
        }
        // Jittered, so two waiting processes do not wake in step.
        let micros = rand::rng().random_range(200..=1500);
        std::thread::sleep(Duration::from_micros(micros));
        true
    }))
}

/// Maps an engine error: corruption is [`StoreError::Corrupt`], the rest
/// [`StoreError::Backend`].
pub(crate) fn sqlite_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::Corrupt(format!("not a database: {e}")),
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt(format!("database corrupt: {e}")),
        _ => StoreError::Backend(Box::new(e)),
    }
}

fn is_busy(e: &TxError) -> bool {
    matches!(
        e,
        TxError::Sqlite(e) if matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        )
    )
}

/// Runs `work` until it succeeds, fails with anything but busy, or the
/// database has been busy for [`MAX_WAIT`].
pub(crate) fn with_retry<T>(mut work: impl FnMut() -> Result<T, TxError>) -> Result<T, StoreError> {
    let start = Instant::now();
    let mut delay = FIRST_DELAY;
    loop {
        match work() {
            Ok(value) => return Ok(value),
            Err(e) if is_busy(&e) => {
                let waited = start.elapsed();
                if waited >= MAX_WAIT {
                    return Err(StoreError::Backend(Box::new(Busy { waited })));
                }
                // Jitter keeps two processes from retrying in lockstep.
                let jitter = rand::rng().random_range(0..=delay.as_micros() as u64);
                std::thread::sleep(delay + Duration::from_micros(jitter));
                delay = (delay * 2).min(MAX_DELAY);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy() -> TxError {
        TxError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        ))
    }

    #[test]
    fn busy_is_retried_until_success() {
        let mut attempts = 0;
        let result = with_retry(|| {
            attempts += 1;
            if attempts < 4 {
                Err(busy())
            } else {
                Ok(attempts)
            }
        });
        assert_eq!(result.unwrap(), 4);
    }

    #[test]
    fn store_verdicts_are_not_retried() {
        let mut attempts = 0;
        let result: Result<(), _> = with_retry(|| {
            attempts += 1;
            Err(TxError::Store(StoreError::WrongKey))
        });
        assert!(matches!(result, Err(StoreError::WrongKey)));
        assert_eq!(attempts, 1);
    }
}
