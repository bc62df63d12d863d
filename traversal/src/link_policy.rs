//! The link policy: when a per-peer link dials, asks for a coordinated hole
//! punch, dials through a forwarding member, and backs off.
//!
//! Sans-IO, in the style of quinn-proto and str0m: no runtime, no sockets,
//! no clock. The link worker feeds events with the time they happened
//! (`now`), sleeps until [`LinkPolicy::poll_timeout`], calls
//! [`LinkPolicy::handle_timeout`] then, and after every call drains
//! [`LinkPolicy::poll_action`] into swarm commands.
//!
//! Every input method also runs whatever is due at `now`, so after any call
//! `poll_timeout()` is either `None` (no timer can do anything: e.g. a direct
//! connection is up and no forwarder dial or punch is pending) or later than
//! `now`.
//!
//! The worker used to run these rules on a free-running 500 ms tick. Here
//! each rule has its own due instant instead: the same decisions and the
//! same cadences, but nothing wakes the worker when nothing is due. Where
//! the old decision waited for "the next tick" (anywhere in 0..500 ms), the
//! policy picks one end of that range:
//! - the redial cadence runs from the last dial: a link that loses its last
//!   connection redials once [`REDIAL`] has passed since its last dial (at
//!   once if it has);
//! - a forwarder dial is due when its backoff ends (at once after a reset);
//! - after a lost direct connection the punch goes out at once.
//!
//! The first coordinated punch goes out as soon as the link knows the peer
//! (its first addresses), beside the relay dial, not once the relayed path
//! is up: the rendezvous runs through the control server, not the relay, so
//! a direct path needs no relayed one first (it saves the relay circuit's
//! round trips), and a group without relays, or whose relays are down, has
//! no other way to connect.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use peermesh_base::PathKind;

// ---------------------------------------------------------------------------
// Timing. `PolicyConfig::default()` is built from these.
// ---------------------------------------------------------------------------

/// REDIAL is how often a link with no connection asks the swarm to dial
/// again. A relay circuit is set up in a round trip or two to the relay, so
/// half a second retries briskly without flooding the relay with
/// reservations for a peer that is not there.
pub const REDIAL: Duration = Duration::from_millis(500);

/// QUICK_REDIAL is the first wait before redialing after a failed dial; it
/// doubles per failure (50, 100, 200 ms). A dial fails most often because the
/// relay learnt of the peer a moment after we did: the first byte to a new
/// peer should not wait a whole [`REDIAL`] for that.
pub const QUICK_REDIAL: Duration = Duration::from_millis(50);

/// QUICK_REDIALS is how many quick redials follow failed dials before only
/// the [`REDIAL`] cadence is left; a connection coming up re-arms them. Three
/// doublings of [`QUICK_REDIAL`] (350 ms in all) stay within one [`REDIAL`].
pub const QUICK_REDIALS: u32 = 3;

/// FOLLOWER_PATIENCE is how long the side that does not lead waits for the
/// leader's dial before dialing itself, unless it has data waiting (the
/// first byte to a new peer waits for nobody). Two nodes that learn of each
/// other at once so build one circuit, not two; four [`REDIAL`] periods give
/// the leader's dial and its quick redials time to land.
pub const FOLLOWER_PATIENCE: Duration = REDIAL.saturating_mul(4);

/// PUNCH_BACKOFF_FIRST is the wait after the first coordinated punch request
/// before the next, while no direct connection exists. The first request
/// goes out as soon as the link knows the peer. The second attempt is the one
/// that falls back to probe sockets when the QUIC socket's punch did not work
/// (a router without WAN firewall), so it comes after half a second, not
/// later.
pub const PUNCH_BACKOFF_FIRST: Duration = Duration::from_millis(500);

/// PUNCH_BACKOFF_DOUBLINGS is how many times the punch wait doubles. With
/// [`PUNCH_BACKOFF_FIRST`] that is 0.5, 1, 2, 4, 8, then 16 s for good: a
/// NAT that did not open in five tries rarely opens in the sixth, but a
/// changed network (new mapping, other side back online) should not wait
/// more than a quarter minute to be tried.
pub const PUNCH_BACKOFF_DOUBLINGS: u32 = 5;

/// PUNCH_BACKOFF_MAX caps the punch wait whatever the first wait and the
/// doublings give: every punch costs the control server and both peers a
/// coordination round and a burst of probes. (With the defaults the
/// doublings stop at 16 s, below this cap.)
pub const PUNCH_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// FORWARD_BACKOFF_FIRST is the wait after a dial through a forwarding
/// member before the next, while neither a direct nor a forwarded
/// connection exists. A forwarding member is a peer like any other: a dial
/// through it that failed is not worth repeating faster than this.
pub const FORWARD_BACKOFF_FIRST: Duration = Duration::from_secs(2);

/// FORWARD_BACKOFF_DOUBLINGS is how many times the forwarder wait doubles:
/// 2, 4, 8, then 16 s for good.
pub const FORWARD_BACKOFF_DOUBLINGS: u32 = 3;

/// FORWARD_BACKOFF_MAX caps the forwarder wait: the best forwarder may come
/// back any time, and the link rides a relay until it does.
pub const FORWARD_BACKOFF_MAX: Duration = Duration::from_secs(16);

/// Every timing value of the policy. `Default` gives today's values.
///
/// Durations should be non-zero: a zero wait makes a rule due again at the
/// instant it acted, and a driver that sleeps until `poll_timeout()` spins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// See [`REDIAL`].
    pub redial: Duration,
    /// See [`QUICK_REDIAL`].
    pub quick_redial: Duration,
    /// See [`QUICK_REDIALS`].
    pub quick_redials: u32,
    /// See [`FOLLOWER_PATIENCE`].
    pub follower_patience: Duration,
    /// See [`PUNCH_BACKOFF_FIRST`].
    pub punch_backoff_first: Duration,
    /// See [`PUNCH_BACKOFF_DOUBLINGS`].
    pub punch_backoff_doublings: u32,
    /// See [`PUNCH_BACKOFF_MAX`].
    pub punch_backoff_max: Duration,
    /// See [`FORWARD_BACKOFF_FIRST`].
    pub forward_backoff_first: Duration,
    /// See [`FORWARD_BACKOFF_DOUBLINGS`].
    pub forward_backoff_doublings: u32,
    /// See [`FORWARD_BACKOFF_MAX`].
    pub forward_backoff_max: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            redial: REDIAL,
            quick_redial: QUICK_REDIAL,
            quick_redials: QUICK_REDIALS,
            follower_patience: FOLLOWER_PATIENCE,
            punch_backoff_first: PUNCH_BACKOFF_FIRST,
            punch_backoff_doublings: PUNCH_BACKOFF_DOUBLINGS,
            punch_backoff_max: PUNCH_BACKOFF_MAX,
            forward_backoff_first: FORWARD_BACKOFF_FIRST,
            forward_backoff_doublings: FORWARD_BACKOFF_DOUBLINGS,
            forward_backoff_max: FORWARD_BACKOFF_MAX,
        }
    }
}

impl PolicyConfig {
    /// The wait after the punch request numbered `attempt` (0 = the first).
    pub fn punch_backoff(&self, attempt: u32) -> Duration {
        backoff(
            self.punch_backoff_first,
            self.punch_backoff_doublings,
            self.punch_backoff_max,
            attempt,
        )
    }

    /// The wait after the forwarder dial numbered `attempt` (0 = the first).
    pub fn forward_backoff(&self, attempt: u32) -> Duration {
        backoff(
            self.forward_backoff_first,
            self.forward_backoff_doublings,
            self.forward_backoff_max,
            attempt,
        )
    }

    /// The wait before the quick redial numbered `n` (0 = the first).
    pub fn quick_redial_wait(&self, n: u32) -> Duration {
        backoff(self.quick_redial, n, Duration::MAX, n)
    }
}

/// `first`, doubled `min(attempt, doublings)` times, at most `max`.
fn backoff(first: Duration, doublings: u32, max: Duration, attempt: u32) -> Duration {
    1u32.checked_shl(attempt.min(doublings))
        .and_then(|factor| first.checked_mul(factor))
        .map_or(max, |d| d.min(max))
}

/// The side with the smaller id dials (and opens streams), so two nodes that
/// learn of each other at once build one circuit, not two. Pass the peer ids'
/// byte forms (`PeerId::to_bytes()`).
pub fn leads(me: &[u8], peer: &[u8]) -> bool {
    me < peer
}

/// What the policy asks the worker to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<A> {
    /// Make sure a connection exists, trying these addresses (relay circuits).
    Dial(Vec<A>),
    /// Ask the control server to coordinate a hole punch with the peer.
    RequestPunch,
    /// One more connection through this forwarding member's circuit.
    DialVia(A),
}

/// The link policy of one peer link. `A` is the address type (a multiaddr in
/// the node).
#[derive(Clone, Debug)]
pub struct LinkPolicy<A> {
    config: PolicyConfig,
    leads: bool,
    control_punch: bool,
    /// Circuits through relay servers.
    relay: Vec<A>,
    /// Circuits through forwarding members, best first.
    forwarded: Vec<A>,
    /// Connections up, per kind.
    relay_conns: u32,
    direct_conns: u32,
    forwarded_conns: u32,
    /// The app has messages queued or unacknowledged.
    waiting: bool,
    /// When the link first had addresses and no connection: the follower's
    /// patience counts from here. Never reset (as in the worker).
    dial_since: Option<Instant>,
    /// When the [`REDIAL`] cadence dials next: one period after the last
    /// dial.
    next_redial: Option<Instant>,
    /// A redial sooner than the cadence after a failed dial.
    quick_redial: Option<Instant>,
    quick_redials: u32,
    punch_attempts: u32,
    /// When the next punch request is due while no direct connection
    /// exists: the first addresses or a lost direct connection make it due
    /// at once, each request moves it on by the backoff. `None` until the
    /// link first knows the peer.
    next_punch: Option<Instant>,
    forward_attempts: u32,
    /// Earliest next forwarder dial (the backoff; the reset instant after a
    /// reset, so due at once).
    next_forward: Option<Instant>,
    actions: VecDeque<Action<A>>,
}

impl<A: Clone + PartialEq + std::fmt::Debug> LinkPolicy<A> {
    /// `leads`: this side dials first and asks for punches (see [`leads`]).
    /// `control_punch`: this link asks the control server for punches.
    pub fn new(config: PolicyConfig, leads: bool, control_punch: bool) -> Self {
        Self {
            config,
            leads,
            control_punch,
            relay: Vec::new(),
            forwarded: Vec::new(),
            relay_conns: 0,
            direct_conns: 0,
            forwarded_conns: 0,
            waiting: false,
            dial_since: None,
            next_redial: None,
            quick_redial: None,
            quick_redials: 0,
            punch_attempts: 0,
            next_punch: None,
            forward_attempts: 0,
            next_forward: None,
            actions: VecDeque::new(),
        }
    }

    // ----- inputs ---------------------------------------------------------

    /// Addresses to reach the peer at: circuits through relay servers, and
    /// circuits through forwarding members (best first). Changed relay
    /// addresses dial at once; a new best forwarder resets the forwarder
    /// backoff and is dialed at once.
    pub fn set_addresses(&mut self, relay: Vec<A>, forwarded: Vec<A>, now: Instant) {
        // The link knows the peer now: the first punch is due at once.
        self.next_punch.get_or_insert(now);
        let changed = self.relay != relay;
        self.relay = relay;
        if self.forwarded.first() != forwarded.first() {
            self.reset_forward(now);
        }
        self.forwarded = forwarded;
        if changed {
            self.try_dial(now);
        }
        self.run(now);
    }

    /// A connection to the peer came up. Re-arms the quick redials.
    pub fn connected(&mut self, kind: PathKind, now: Instant) {
        *self.count_mut(kind) += 1;
        self.quick_redial = None;
        self.quick_redials = 0;
        self.run(now);
    }

    /// A connection went away (closed, or its path found dead). Call it once
    /// per connection that [`connected`](Self::connected) reported; a kind
    /// with no connection left is ignored. Losing a direct connection resets
    /// the punch backoff (the next punch goes out at once); losing a
    /// forwarded one resets the forwarder backoff.
    pub fn disconnected(&mut self, kind: PathKind, now: Instant) {
        let count = self.count_mut(kind);
        if *count > 0 {
            *count -= 1;
            match kind {
                PathKind::Direct => self.direct_lost(now),
                PathKind::Forwarded => self.reset_forward(now),
                PathKind::Relay => {}
            }
        }
        self.run(now);
    }

    /// A dial to the peer failed (e.g. the relay did not know the peer yet):
    /// redial after 50, 100, 200 ms, then only on the cadence.
    pub fn dial_failed(&mut self, now: Instant) {
        if !self.is_connected()
            && self.quick_redial.is_none()
            && self.quick_redials < self.config.quick_redials
        {
            self.quick_redial = Some(now + self.config.quick_redial_wait(self.quick_redials));
            self.quick_redials += 1;
        }
        self.run(now);
    }

    /// Whether the app has messages queued or unacknowledged. Call it with
    /// `true` for every message the app queues (each such call dials at once
    /// while there is no connection, as the worker's app arm did) and with
    /// `false` once nothing is queued or unacknowledged. Waiting data lifts
    /// the follower's patience.
    pub fn set_waiting(&mut self, waiting: bool, now: Instant) {
        self.waiting = waiting;
        if waiting {
            self.try_dial(now);
        }
        self.run(now);
    }

    /// Runs whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.run(now);
    }

    // ----- outputs --------------------------------------------------------

    /// The earliest instant at which something is due, or `None` when no
    /// timer can do anything until the next input.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.dial_due(), self.punch_due(), self.forward_due()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next action to carry out, oldest first.
    pub fn poll_action(&mut self) -> Option<Action<A>> {
        self.actions.pop_front()
    }

    // ----- read-only state ------------------------------------------------

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }
    pub fn leads(&self) -> bool {
        self.leads
    }
    pub fn control_punch(&self) -> bool {
        self.control_punch
    }
    pub fn waiting(&self) -> bool {
        self.waiting
    }
    /// Punch requests since the last direct connection was lost.
    pub fn punch_attempts(&self) -> u32 {
        self.punch_attempts
    }
    /// Forwarder dials since the last reset.
    pub fn forward_attempts(&self) -> u32 {
        self.forward_attempts
    }
    /// Connections up of this kind.
    pub fn connections(&self, kind: PathKind) -> u32 {
        match kind {
            PathKind::Relay => self.relay_conns,
            PathKind::Direct => self.direct_conns,
            PathKind::Forwarded => self.forwarded_conns,
        }
    }
    pub fn is_connected(&self) -> bool {
        self.relay_conns + self.direct_conns + self.forwarded_conns > 0
    }
    pub fn relay_addresses(&self) -> &[A] {
        &self.relay
    }
    pub fn forwarded_addresses(&self) -> &[A] {
        &self.forwarded
    }
    /// Whether this side should be punching: it leads, asks the control
    /// server for punches, and has no direct connection (relayed or not:
    /// see the module docs).
    pub fn wants_punch(&self) -> bool {
        self.control_punch && self.leads && self.direct_conns == 0
    }

    // ----- rules ----------------------------------------------------------

    fn count_mut(&mut self, kind: PathKind) -> &mut u32 {
        match kind {
            PathKind::Relay => &mut self.relay_conns,
            PathKind::Direct => &mut self.direct_conns,
            PathKind::Forwarded => &mut self.forwarded_conns,
        }
    }

    /// Runs every rule that is due at `now`, in the old tick's order.
    fn run(&mut self, now: Instant) {
        if self.may_dial() {
            self.dial_since.get_or_insert(now);
        }
        if self.dial_due().is_some_and(|t| t <= now) {
            self.dial(now);
        }
        // A quick redial that came due while it could not dial is spent, as
        // the worker's timer was.
        if self.quick_redial.is_some_and(|t| t <= now) {
            self.quick_redial = None;
        }
        if self.punch_due().is_some_and(|t| t <= now) {
            self.punch(now);
        }
        if self.forward_due().is_some_and(|t| t <= now) {
            self.forward(now);
        }
    }

    /// No connection and somewhere to dial.
    fn may_dial(&self) -> bool {
        !self.is_connected() && !self.relay.is_empty()
    }

    /// When the follower's patience ends (at once for the leader, or with
    /// data waiting).
    fn patience_end(&self) -> Option<Instant> {
        let since = self.dial_since?;
        Some(if self.leads || self.waiting {
            since
        } else {
            since + self.config.follower_patience
        })
    }

    fn dial_due(&self) -> Option<Instant> {
        if !self.may_dial() {
            return None;
        }
        let patience_end = self.patience_end()?;
        let retry = match (self.next_redial, self.quick_redial) {
            (Some(r), Some(q)) => Some(r.min(q)),
            (r, q) => r.or(q),
        };
        Some(retry.map_or(patience_end, |r| r.max(patience_end)))
    }

    /// An event-driven dial (new addresses, data queued): subject only to
    /// the follower's patience, not to the cadence.
    fn try_dial(&mut self, now: Instant) {
        if !self.may_dial() {
            return;
        }
        self.dial_since.get_or_insert(now);
        if self.patience_end().is_some_and(|t| t <= now) {
            self.dial(now);
        }
    }

    fn dial(&mut self, now: Instant) {
        self.actions.push_back(Action::Dial(self.relay.clone()));
        self.next_redial = Some(now + self.config.redial);
        if self.quick_redial.is_some_and(|t| t <= now) {
            self.quick_redial = None;
        }
    }

    fn punch_due(&self) -> Option<Instant> {
        if !self.wants_punch() {
            return None;
        }
        self.next_punch
    }

    fn punch(&mut self, now: Instant) {
        let wait = self.config.punch_backoff(self.punch_attempts);
        self.punch_attempts += 1;
        self.next_punch = Some(now + wait);
        self.actions.push_back(Action::RequestPunch);
    }

    /// A direct connection went away: the next punch goes out at once (once
    /// the link knows the peer).
    fn direct_lost(&mut self, now: Instant) {
        self.punch_attempts = 0;
        if self.next_punch.is_some() {
            self.next_punch = Some(now);
        }
    }

    /// With no direct and no forwarded connection, go through the best
    /// forwarding member rather than a relay server; either side may dial.
    fn forward_due(&self) -> Option<Instant> {
        if self.forwarded.is_empty() || self.direct_conns > 0 || self.forwarded_conns > 0 {
            return None;
        }
        self.next_forward
    }

    fn forward(&mut self, now: Instant) {
        let wait = self.config.forward_backoff(self.forward_attempts);
        self.forward_attempts += 1;
        self.next_forward = Some(now + wait);
        self.actions
            .push_back(Action::DialVia(self.forwarded[0].clone()));
    }

    fn reset_forward(&mut self, now: Instant) {
        self.forward_attempts = 0;
        self.next_forward = Some(now);
    }
}

#[cfg(test)]
mod tests;
