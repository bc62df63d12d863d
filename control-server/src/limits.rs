//! Tunable limits of the control plane, and why each default is what it is.
//!
//! Everything here is a default: [`Limits`] is what the server is started
//! with (tests shorten or lengthen them).

/// How long a session credential lives: a day. A node whose session expired
/// authenticates again with its key (one signed request), so the lifetime
/// only bounds how long a copied credential is any use; a day keeps that
/// short and re-authentication rare.
pub const DEFAULT_SESSION_TTL_MS: u64 = 24 * 3600 * 1000;

/// How long a join (or relay) token lives when the administrator gives no
/// lifetime: a day, time enough to set up the machines it was made for,
/// short enough that a forgotten token stops working by itself.
pub const DEFAULT_TOKEN_TTL_MS: u64 = 24 * 3600 * 1000;

/// How far a signed timestamp may be from the server's clock: five minutes.
/// Signed requests only have to be fresh enough that a captured one cannot
/// be replayed much later (replays within the window are caught by the
/// per-key last timestamp); a machine without NTP drifts by seconds to
/// minutes and must still get in.
pub const DEFAULT_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// Events a watcher may fall behind before it gets a fresh full map (or
/// member set) instead. A group's largest burst is every member coming back
/// online after a server restart (one event each), so groups of a few
/// thousand nodes ride it out on deltas; each group's channel keeps this many
/// slots, so the price is memory per group.
pub const DEFAULT_WATCH_BACKLOG: usize = 4096;

#[derive(Clone, Debug)]
pub struct Limits {
    pub session_ttl_ms: u64,
    pub default_token_ttl_ms: u64,
    /// How far a signed timestamp may be from the server's clock.
    pub clock_skew_ms: u64,
    /// Events a watcher may fall behind before it is sent a fresh full map.
    pub watch_backlog: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            session_ttl_ms: DEFAULT_SESSION_TTL_MS,
            default_token_ttl_ms: DEFAULT_TOKEN_TTL_MS,
            clock_skew_ms: DEFAULT_CLOCK_SKEW_MS,
            watch_backlog: DEFAULT_WATCH_BACKLOG,
        }
    }
}
