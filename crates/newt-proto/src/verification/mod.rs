//! Device verification (being written).
