//! The driver's clock. The core never reads time; the driver asks its
//! [`Clock`] and passes `now` (milliseconds since the Unix epoch) into it.
//! Tests (and simulations) give [`Machine::open_with_clock`](crate::Machine::open_with_clock)
//! a [`ManualClock`] and move time by hand.

use std::sync::atomic::{AtomicU64, Ordering};

/// A source of the current time, in milliseconds since the Unix epoch.
pub trait Clock: ClockBounds {
    /// Now.
    fn now_ms(&self) -> u64;
}

/// `Send + Sync` on native targets (a machine is shared between threads),
/// nothing on wasm32.
#[cfg(not(target_arch = "wasm32"))]
pub trait ClockBounds: Send + Sync {}
#[cfg(not(target_arch = "wasm32"))]
impl<T: Send + Sync + ?Sized> ClockBounds for T {}
/// `Send + Sync` on native targets, nothing on wasm32.
#[cfg(target_arch = "wasm32")]
pub trait ClockBounds {}
#[cfg(target_arch = "wasm32")]
impl<T: ?Sized> ClockBounds for T {}

/// The system clock (JavaScript's `Date.now()` on wasm32): the default.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[cfg(not(target_arch = "wasm32"))]
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    #[cfg(target_arch = "wasm32")]
    fn now_ms(&self) -> u64 {
        js_sys::Date::now() as u64
    }
}

/// A clock that moves only when told to: for tests and simulations.
///
/// ```
/// use newt::{Clock, ManualClock};
/// let clock = ManualClock::new(1_000);
/// clock.advance(60 * 60 * 1000);
/// assert_eq!(clock.now_ms(), 3_601_000);
/// ```
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self(AtomicU64::new(now_ms))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock to `now_ms`.
    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
