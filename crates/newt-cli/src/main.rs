//! newt demo.
fn main() {}
