//! Cross-signing identities (being written).
