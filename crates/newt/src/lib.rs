//! newt (being written).
