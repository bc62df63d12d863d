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

/// Nodes one group may hold (active and revoked records): ten thousand,
/// the largest group the control-plane benchmark measures (full maps of
/// that size are megabytes; past it a mesh wants splitting into groups).
pub const DEFAULT_MAX_NODES_PER_GROUP: u32 = 10_000;

/// Watch streams one node (or relay) may hold open at once. A node holds
/// one; after a network change its old stream may linger on the server
/// until keepalive notices it is dead (up to 20 s), so a few are allowed,
/// and no more: each stream is a task and a share of every change's fan-out.
pub const DEFAULT_MAX_WATCHES_PER_NODE: usize = 4;

/// Concurrent HTTP/2 streams per connection: a node has its watch stream,
/// up to 16 punches waiting and a few reports in flight; a hundred leaves
/// room and bounds what one connection can make the server hold.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// How long one unary call may take before the server gives up on it: the
/// slowest is a punch request (it waits up to 3 s for the peer) or a write
/// waiting for the disk; thirty seconds is far beyond both. Server streams
/// (watches) are not cut by it.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A rate: `per_second` on average, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// Per-source rate limits: per client address for the calls that come
/// before a session (Join, Authenticate, STUN), per node for the rest.
/// `None`: no limit (benchmarks and tests that drive thousands of simulated
/// nodes from one address).
#[derive(Clone, Debug)]
pub struct RateLimits {
    /// Join per client address: provisioning a fleet behind one NAT gets a
    /// hundred in at once, then ten a second; joins are rare otherwise.
    pub join: Option<Rate>,
    /// Authenticate per client address: each node authenticates when it
    /// starts and when its session expires (daily); a site of a few hundred
    /// machines restarting at once gets in without waiting.
    pub authenticate: Option<Rate>,
    /// UpdateEndpoints per node: a node reports when its reachable
    /// addresses change, a few times at start and then rarely; two a
    /// second with a burst of twenty is far above that.
    pub update_endpoints: Option<Rate>,
    /// RequestPunch per node: links back off from 1 s to 30 s per peer, but
    /// a new member of a 200-node group asks for every peer at once.
    pub request_punch: Option<Rate>,
    /// STUN requests per client address: a NAT discovery sends a few dozen,
    /// a punch from probe sockets one; several nodes may share the address.
    pub stun: Option<Rate>,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            join: Some(Rate {
                per_second: 10,
                burst: 100,
            }),
            authenticate: Some(Rate {
                per_second: 20,
                burst: 300,
            }),
            update_endpoints: Some(Rate {
                per_second: 2,
                burst: 20,
            }),
            request_punch: Some(Rate {
                per_second: 20,
                burst: 200,
            }),
            stun: Some(Rate {
                per_second: 100,
                burst: 500,
            }),
        }
    }
}

impl RateLimits {
    /// No limits at all.
    pub fn none() -> Self {
        Self {
            join: None,
            authenticate: None,
            update_endpoints: None,
            request_punch: None,
            stun: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub session_ttl_ms: u64,
    pub default_token_ttl_ms: u64,
    /// How far a signed timestamp may be from the server's clock.
    pub clock_skew_ms: u64,
    /// Events a watcher may fall behind before it is sent a fresh full map.
    pub watch_backlog: usize,
    pub max_nodes_per_group: u32,
    pub max_watches_per_node: usize,
    pub max_streams_per_connection: u32,
    pub request_timeout: std::time::Duration,
    pub rates: RateLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            session_ttl_ms: DEFAULT_SESSION_TTL_MS,
            default_token_ttl_ms: DEFAULT_TOKEN_TTL_MS,
            clock_skew_ms: DEFAULT_CLOCK_SKEW_MS,
            watch_backlog: DEFAULT_WATCH_BACKLOG,
            max_nodes_per_group: DEFAULT_MAX_NODES_PER_GROUP,
            max_watches_per_node: DEFAULT_MAX_WATCHES_PER_NODE,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            rates: RateLimits::default(),
        }
    }
}
