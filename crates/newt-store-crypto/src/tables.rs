//! The tables of a store: each one's name and key columns, in the order
//! they enter the [associated data](crate::associated_data) of its sealed
//! values, and the integrity record's numbering of them ([`TABLES`]).
//!
//! newt-sqlite's tables are these; another backend lays its records out as
//! it likes (IndexedDB: an object store per table) but builds the
//! associated data of a record from the same table name and key columns,
//! so that both follow one scheme.

/// A table: its name and key columns, in the order they enter the associated
/// data of its sealed `value`.
pub struct Table {
    /// The table name.
    pub name: &'static str,
    /// Key columns (hashes, flags, indices); the `value` column follows.
    pub keys: &'static [&'static str],
    /// How many of the first `keys` make the primary key.
    pub primary_key: usize,
}

/// The account, the sync token and our private cross-signing keys, by name.
pub const SINGLETONS: Table = Table { name: "singletons", keys: &["name"], primary_key: 1 };
/// Olm sessions by (sender key, session ID).
pub const OLM_SESSIONS: Table =
    Table { name: "olm_sessions", keys: &["sender_key_hash", "session_hash"], primary_key: 2 };
/// Inbound Megolm sessions by (room, session ID), with the backup flag.
pub const INBOUND: Table = Table {
    name: "inbound_group_sessions",
    keys: &["room_hash", "session_hash", "backed_up"],
    primary_key: 2,
};
/// Outbound Megolm sessions by room.
pub const OUTBOUND: Table =
    Table { name: "outbound_group_sessions", keys: &["room_hash"], primary_key: 1 };
/// Devices by (user, device ID).
pub const DEVICES: Table =
    Table { name: "devices", keys: &["user_hash", "device_hash"], primary_key: 2 };
/// Tracked users by user.
pub const TRACKED_USERS: Table =
    Table { name: "tracked_users", keys: &["user_hash"], primary_key: 1 };
/// Key requests by request ID, with their session and sent flag.
pub const KEY_REQUESTS: Table = Table {
    name: "key_requests",
    keys: &["request_hash", "room_hash", "session_hash", "sent"],
    primary_key: 1,
};
/// Withheld notices by (room, session ID and sender). `session_hash` is the
/// keyed hash of the session ID and the sender together
/// ([`Kind::WithheldSender`](crate::Kind::WithheldSender)); rows
/// written before notices were kept per sender hash the session ID alone
/// and are read only for the sender their value names.
pub const WITHHELD: Table =
    Table { name: "withheld", keys: &["room_hash", "session_hash"], primary_key: 2 };
/// Replay-detection records by (room, session ID, index).
pub const MESSAGE_INDICES: Table = Table {
    name: "message_indices",
    keys: &["room_hash", "session_hash", "message_index"],
    primary_key: 3,
};
/// Public cross-signing identities by user (schema v2).
pub const IDENTITIES: Table = Table { name: "identities", keys: &["user_hash"], primary_key: 1 };

/// Every table of records (all but `meta`). The integrity record keeps one
/// sum per table in this order: a schema version that adds a table appends
/// it here and rewrites the record in its migration.
pub const TABLES: &[&Table] = &[
    &SINGLETONS,
    &OLM_SESSIONS,
    &INBOUND,
    &OUTBOUND,
    &DEVICES,
    &TRACKED_USERS,
    &KEY_REQUESTS,
    &WITHHELD,
    &MESSAGE_INDICES,
    &IDENTITIES,
];

/// The `singletons` name of the account.
pub const ACCOUNT: &str = "account";
/// The `singletons` name of the sync token.
pub const SYNC_TOKEN: &str = "sync_token";
/// The `singletons` name of our private cross-signing keys.
pub const PRIVATE_IDENTITY: &str = "private_identity";

impl Table {
    /// The position of this table in [`TABLES`]: the integrity record's
    /// number for it.
    pub fn index(&self) -> Option<usize> {
        TABLES.iter().position(|t| t.name == self.name)
    }
}
