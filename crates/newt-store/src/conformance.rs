//! Backend conformance suite (being written).
/// Runs every conformance test against stores made by `make`.
pub async fn run_all<S: crate::Store, F: std::future::Future<Output = S>>(make: impl Fn() -> F) { let _ = make().await; }
