//! Matrix identifiers, parsed once at the edge ("parse, don't validate").
//!
//! Only the checks that matter for the crypto layer are done: a user ID is
//! `@localpart:server`, a room ID is `!opaque:server` (or, for room versions
//! 12+, `!opaque`), a device ID is a non-empty string without control
//! characters. Anything else is an [`IdError`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// A malformed identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {value:?}")]
pub struct IdError {
    /// Which kind of identifier was expected.
    pub kind: &'static str,
    /// The offending input (identifiers are not secret).
    pub value: String,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses an identifier.
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                let check: fn(&str) -> bool = $check;
                if check(&value) {
                    Ok(Self(value))
                } else {
                    Err(IdError { kind: $kind, value })
                }
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::parse(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(value: &str) -> Result<Self, IdError> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}

fn no_controls(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && !s.chars().any(char::is_control)
}

fn sigil_and_server(s: &str, sigil: char, server_required: bool) -> bool {
    let Some(rest) = s.strip_prefix(sigil) else { return false };
    if !no_controls(s) {
        return false;
    }
    match rest.split_once(':') {
        Some((local, server)) => !local.is_empty() && !server.is_empty(),
        None => !server_required && !rest.is_empty(),
    }
}

id_type!(
    /// A Matrix user ID, `@alice:example.org`.
    UserId,
    "user ID",
    |s| sigil_and_server(s, '@', true)
);
id_type!(
    /// A Matrix room ID, `!abc:example.org`.
    RoomId,
    "room ID",
    |s| sigil_and_server(s, '!', false)
);
id_type!(
    /// A device ID, e.g. `JLAFKJWSCS`.
    DeviceId,
    "device ID",
    no_controls
);

impl UserId {
    /// The server name part of the user ID.
    pub fn server_name(&self) -> &str {
        self.0.split_once(':').map(|(_, s)| s).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert!(UserId::parse("@alice:example.org").is_ok());
        assert_eq!(
            UserId::parse("@alice:example.org").map(|u| u.server_name().to_owned()),
            Ok("example.org".into())
        );
        for bad in ["alice:example.org", "@alice", "@:x", "@a:", "", "@a\n:b"] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RoomId::parse("!r:example.org").is_ok());
        assert!(RoomId::parse("!opaqueV12").is_ok());
        assert!(RoomId::parse("#alias:example.org").is_err());
        assert!(DeviceId::parse("").is_err());
        let err = serde_json::from_str::<UserId>("\"nope\"");
        assert!(err.is_err());
    }
}
