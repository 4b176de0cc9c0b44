//! Room key export files (being written).
