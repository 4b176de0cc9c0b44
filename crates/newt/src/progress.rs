//! Progress reports from long operations (key export and import), as an
//! object a binding can carry.

/// Told how far a long operation got: [`Machine::export_room_keys`] and
/// [`Machine::import_room_keys`] take an `Option<&dyn Progress>`.
///
/// One method with two integers, so that it maps directly onto a binding: a
/// uniffi callback interface of the same shape, or a JavaScript function
/// `(done, total) => void`. Rust callers pass a closure (every
/// `Fn(u64, u64)` is a `Progress`; name the argument types, as in
/// `&|done: u64, total: u64| ...`) or a type of their own.
///
/// Calls come one at a time, on the caller's task, while the operation's
/// future is being polled; `done` never decreases. A `Progress` cannot stop
/// the operation: drop its future for that.
///
/// ```
/// # futures::executor::block_on(async {
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use newt::{DeviceId, ImportOptions, Machine, Progress, RoomId, RoomSettings, UserId};
/// use newt_store::MemoryStore;
///
/// let alice = UserId::parse("@alice:example.org")?;
/// let open = |device: &str| {
///     let device = DeviceId::parse(device);
///     let alice = alice.clone();
///     async move { Machine::open(Arc::new(MemoryStore::new()), alice, device?).await }
/// };
/// let machine = open("A1").await?;
/// // Sharing a room key keeps a copy of it for ourselves: one key to export.
/// let room = RoomId::parse("!room:example.org")?;
/// machine.share_room_key(&room, [alice.clone()], &RoomSettings::default()).await?;
///
/// // A closure. An export does not know how many keys there are: it
/// // reports how many it wrote so far, with 0 as the total.
/// let file = machine
///     .export_room_keys("passphrase", 1, Some(&|done: u64, total: u64| {
///         println!("{done} keys written (total {total})");
///     }))
///     .await?;
///
/// // A type of our own, as a binding would pass.
/// struct Bar(AtomicU64);
/// impl Progress for Bar {
///     fn progress(&self, done: u64, total: u64) {
///         assert!(done <= total);
///         self.0.store(done, Ordering::Relaxed);
///     }
/// }
/// let bar = Bar(AtomicU64::new(0));
/// let other = open("A2").await?;
/// let summary =
///     other.import_room_keys(&file, "passphrase", &ImportOptions::default(), Some(&bar)).await?;
/// assert_eq!((summary.total, summary.imported), (1, 1));
/// assert_eq!(bar.0.load(Ordering::Relaxed), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
///
/// [`Machine::export_room_keys`]: crate::Machine::export_room_keys
/// [`Machine::import_room_keys`]: crate::Machine::import_room_keys
pub trait Progress: ProgressBounds {
    /// `done` of `total` items are finished; `total` is 0 when it is not
    /// known (an export reports only how many keys it wrote so far).
    fn progress(&self, done: u64, total: u64);
}

impl<F: Fn(u64, u64) + ProgressBounds> Progress for F {
    fn progress(&self, done: u64, total: u64) {
        self(done, total)
    }
}

/// `Send + Sync` on native targets (an import's future stays `Send` while
/// it holds one; a uniffi callback interface is both), nothing on wasm32
/// (a JavaScript function is neither).
#[cfg(not(target_arch = "wasm32"))]
pub trait ProgressBounds: Send + Sync {}
#[cfg(not(target_arch = "wasm32"))]
impl<T: Send + Sync + ?Sized> ProgressBounds for T {}
/// `Send + Sync` on native targets, nothing on wasm32.
#[cfg(target_arch = "wasm32")]
pub trait ProgressBounds {}
#[cfg(target_arch = "wasm32")]
impl<T: ?Sized> ProgressBounds for T {}

/// Reports to `progress`, if any, with counts as `u64`.
pub(crate) fn report(progress: Option<&dyn Progress>, done: usize, total: usize) {
    if let Some(progress) = progress {
        let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        progress.progress(wide(done), wide(total));
    }
}
