//! Spreading independent CPU work (signature checks, Olm session creation
//! and encryption for many devices, record decoding) over the machine's
//! cores.
//!
//! The functions here stay pure: the result is `items.iter().map(f)` in
//! order, whatever the number of threads, so a caller cannot observe the
//! split. Scoped threads only, up to [`max_threads`], and only when each
//! gets at least `min_per_thread` items (below that a thread costs more than
//! it saves). On `wasm32` everything runs on the caller's thread.

use std::sync::atomic::{AtomicUsize, Ordering};

/// [`set_max_threads`]'s value; 0 until it is called.
static MAX_THREADS: AtomicUsize = AtomicUsize::new(0);
/// [`set_default_threads`]'s value: one thread until the driver says more.
static DEFAULT_THREADS: AtomicUsize = AtomicUsize::new(1);

/// Held by this crate's tests while they set the cap (they run concurrently).
#[cfg(test)]
pub(crate) static CAP_FOR_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Caps the threads batch work may use, for the whole process: `1` keeps
/// everything on the caller's thread (an app that must not compete for cores
/// with its UI, say); `0` goes back to the default ([`set_default_threads`]).
/// Results do not depend on it, only the time taken; a cap above the core
/// count is kept (tests use it to run the threaded paths on one core). It
/// bounds batch work only: `newt` still derives a key import's keys from the
/// passphrase on a thread of its own (one core's work either way), to keep
/// seconds of PBKDF2 off the caller's executor.
///
/// ```
/// use newt_proto::parallel::{max_threads, set_max_threads, threads_for};
/// set_max_threads(1);
/// assert_eq!((max_threads(), threads_for(10_000, 10)), (1, 1));
/// set_max_threads(0);
/// assert_eq!(max_threads(), 1, "the default until a driver sets one");
/// ```
pub fn set_max_threads(threads: usize) {
    MAX_THREADS.store(threads, Ordering::Relaxed);
}

/// The thread count used when no cap is set. The core reads nothing from
/// its environment, so this is 1 until the driver, which may ask the OS,
/// sets it (`newt`'s `Machine::open` sets the core count, at most 4).
pub fn set_default_threads(threads: usize) {
    DEFAULT_THREADS.store(threads.max(1), Ordering::Relaxed);
}

/// The most threads batch work uses now: [`set_max_threads`]'s cap, or the
/// default ([`set_default_threads`]); always 1 on `wasm32`.
pub fn max_threads() -> usize {
    if cfg!(target_arch = "wasm32") {
        return 1;
    }
    match MAX_THREADS.load(Ordering::Relaxed) {
        0 => DEFAULT_THREADS.load(Ordering::Relaxed),
        set => set,
    }
}

/// `items.iter().map(f).collect()`, in order, over up to [`max_threads`]
/// scoped threads, each with at least `min_per_thread` items. A panic in `f`
/// is propagated to the caller.
pub fn map<T: Sync, R: Send>(
    items: &[T],
    min_per_thread: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    map_owned(items.iter().collect(), min_per_thread, f)
}

/// [`map`] for work that needs its items by value (e.g. a session to
/// advance): `items.into_iter().map(f).collect()`, in order.
pub fn map_owned<T: Send, R: Send>(
    items: Vec<T>,
    min_per_thread: usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let threads = threads_for(items.len(), min_per_thread);
    #[cfg(not(target_arch = "wasm32"))]
    if threads >= 2 {
        let total = items.len();
        let chunks = owned_chunks(items, total.div_ceil(threads));
        let f = &f;
        return std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| s.spawn(move || chunk.into_iter().map(f).collect::<Vec<R>>()))
                .collect();
            let mut out = Vec::with_capacity(total);
            for h in handles {
                match h.join() {
                    Ok(part) => out.extend(part),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            out
        });
    }
    let _ = threads;
    items.into_iter().map(f).collect()
}

/// `items` split into owned chunks of at most `size` items, in order (the
/// last may be shorter; none is empty).
pub fn owned_chunks<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let size = size.max(1);
    let mut chunks = Vec::with_capacity(items.len().div_ceil(size));
    let mut items = items.into_iter();
    loop {
        let chunk: Vec<T> = items.by_ref().take(size).collect();
        if chunk.is_empty() {
            return chunks;
        }
        chunks.push(chunk);
    }
}

/// How many threads [`map`] gives `len` items: 1 below two threads' worth,
/// else up to [`max_threads`].
pub fn threads_for(len: usize, min_per_thread: usize) -> usize {
    let min_per_thread = min_per_thread.max(1);
    max_threads().min(len / min_per_thread).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_decides_the_threads_and_never_the_result() {
        let _cap = CAP_FOR_TESTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        set_max_threads(1);
        assert_eq!(threads_for(10_000, 10), 1);
        let items: Vec<u32> = (0..1000).collect();
        let one = map(&items, 1, |i| (i * 3, std::thread::current().id()));
        assert!(one.iter().all(|(_, t)| *t == std::thread::current().id()), "ran on a thread");
        // Above the core count too: four threads even on a one-core machine.
        set_max_threads(4);
        assert_eq!(threads_for(10_000, 10), 4);
        assert_eq!(threads_for(30, 10), 3, "each thread still gets min_per_thread");
        let four = map(&items, 1, |i| (i * 3, std::thread::current().id()));
        let threads: std::collections::HashSet<_> = four.iter().map(|(_, t)| *t).collect();
        assert_eq!(threads.len(), 4, "one chunk per thread");
        assert!(!threads.contains(&std::thread::current().id()));
        let values =
            |v: &[(u32, std::thread::ThreadId)]| v.iter().map(|(x, _)| *x).collect::<Vec<_>>();
        assert_eq!(values(&four), values(&one));
        assert_eq!(values(&one), items.iter().map(|i| i * 3).collect::<Vec<_>>());
        // Without a cap, the default the driver set.
        set_max_threads(0);
        set_default_threads(3);
        assert_eq!((max_threads(), threads_for(10_000, 10)), (3, 3));
        set_default_threads(1);
        assert_eq!(threads_for(10_000, 10), 1);
    }

    #[test]
    fn keeps_order_whatever_the_split() {
        let _cap = CAP_FOR_TESTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        set_max_threads(4);
        let items: Vec<u32> = (0..2000).collect();
        let expected: Vec<u32> = items.iter().map(|i| i * 2).collect();
        for min in [1, 7, 256, 1000, 5000] {
            assert_eq!(map(&items, min, |i| i * 2), expected, "min_per_thread {min}");
        }
        assert_eq!(map(&[] as &[u32], 1, |i| *i), Vec::<u32>::new());
        let chunks = owned_chunks((0..7).collect::<Vec<u8>>(), 3);
        assert_eq!(chunks, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert!(owned_chunks(Vec::<u8>::new(), 3).is_empty());
        for min in [1, 3, 600] {
            let owned: Vec<String> = (0..1999).map(|i| i.to_string()).collect();
            let lens = map_owned(owned.clone(), min, |s| s.len());
            assert_eq!(lens, owned.iter().map(String::len).collect::<Vec<_>>(), "min {min}");
        }
    }
}
