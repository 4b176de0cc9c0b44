//! Loading test vectors, shared by the vector tests.

#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

use serde_json::Value;

/// Loads `test-vectors/<name>`; every vector file must state its provenance.
pub(crate) fn load(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../test-vectors").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: Value = serde_json::from_str(&text).unwrap();
    assert!(value.get("provenance").is_some(), "{name} has no provenance");
    value
}

/// The string field `field` of `v`.
pub(crate) fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_else(|| panic!("missing string field {field}"))
}
