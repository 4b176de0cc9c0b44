//! A helper for backends: record encoding and decoding is CPU work that
//! splits cleanly over cores when a call carries thousands of records
//! (imports, exports, pages).

use crate::StoreError;

/// `items.iter().map(f).collect()`, in order, split over up to four scoped
/// threads when there are at least 256 items per thread (below that a thread
/// costs more than it saves). Sequential on `wasm32`. A panic in `f` is
/// propagated to the caller.
pub fn map_parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, StoreError> + Sync,
) -> Result<Vec<R>, StoreError> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        const MIN_PER_THREAD: usize = 256;
        // `available_parallelism` reads cgroup files on Linux: ask once, and
        // only when there is enough work to split.
        static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let threads = if items.len() < 2 * MIN_PER_THREAD {
            1
        } else {
            let cores =
                *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            cores.min(4).min(items.len() / MIN_PER_THREAD)
        };
        if threads >= 2 {
            let f = &f;
            return std::thread::scope(|s| {
                let handles: Vec<_> = items
                    .chunks(items.len().div_ceil(threads))
                    .map(|chunk| {
                        s.spawn(move || chunk.iter().map(f).collect::<Result<Vec<R>, _>>())
                    })
                    .collect();
                let mut out = Vec::with_capacity(items.len());
                for h in handles {
                    match h.join() {
                        Ok(part) => out.extend(part?),
                        Err(panic) => std::panic::resume_unwind(panic),
                    }
                }
                Ok(out)
            });
        }
    }
    items.iter().map(f).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_reports_the_first_error() {
        let items: Vec<u32> = (0..2000).collect();
        let doubled = map_parallel(&items, |i| Ok(i * 2)).unwrap();
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let failed = map_parallel(&items, |&i| {
            if i == 1500 {
                Err(StoreError::Corrupt("bad record".into()))
            } else {
                Ok(i)
            }
        });
        assert!(matches!(failed, Err(StoreError::Corrupt(m)) if m == "bad record"));
    }
}
