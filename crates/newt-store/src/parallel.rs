//! A helper for backends: record encoding and decoding is CPU work that
//! splits cleanly over cores when a call carries thousands of records
//! (imports, exports, pages).

use crate::StoreError;

/// `items.iter().map(f).collect()`, in order, over up to four threads when
/// there are at least 256 items per thread ([`newt_proto::parallel::map`]);
/// the first error in item order is returned.
pub fn map_parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, StoreError> + Sync,
) -> Result<Vec<R>, StoreError> {
    newt_proto::parallel::map(items, 256, f).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_reports_the_first_error() {
        let items: Vec<u32> = (0..2000).collect();
        let doubled = map_parallel(&items, |i| Ok(i * 2)).unwrap();
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let failed = map_parallel(&items, |&i| match i {
            1500 => Err(StoreError::Corrupt("first".into())),
            1900 => Err(StoreError::Corrupt("second".into())),
            _ => Ok(i),
        });
        assert!(matches!(failed, Err(StoreError::Corrupt(m)) if m == "first"));
    }
}
