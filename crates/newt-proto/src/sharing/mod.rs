//! Sharing a room key: who gets it (the [`SharingPolicy`], evaluated in
//! one place, withheld codes, and when an outbound session must rotate
//! because its audience shrank), and one share round composed from the
//! driver's records: [`share`], then [`record_delivery`] once the messages
//! went out.
//!
//! ```text
//!  account, room, members, their devices, stored outbound session,
//!  their Olm sessions, trust (when the settings need it), settings, now
//!                              |
//!                              v
//!                     share ──> Share { outbound, Changes,
//!                              |        room keys (Olm), withheld notices }
//!        (commit, send the messages; once every one was sent)
//!                              v
//!             record_delivery ──> Changes (who got the key, who was told why not)
//! ```

mod policy;
mod round;

pub use policy::{
    audience_shrank, excluded_by_policy, plan_share, withheld_content, SharePlan, SharingPolicy,
    WithheldCode,
};
pub use round::{
    recipient_keys, record_delivery, share, KeyDelivery, MemberTrust, RoomSettings, Share,
    ShareError, ShareInput, WithheldDelivery,
};
