//! Per-protocol flow control on one link (sans-IO), so that no protocol
//! can stall another.
//!
//! A link carries every application protocol on one ordered stream. If the
//! receiver waited for a protocol's consumer before taking the next message
//! off the stream, one undrained protocol would freeze the whole link (and
//! every link that feeds it). Instead each protocol has its own credit, in
//! the manner of QUIC's MAX_STREAM_DATA, counted in messages:
//!
//! - the receiver lets the sender have at most [`Credits::window`]
//!   messages of a protocol that the application has not finished with;
//!   the limit starts at the window and moves on by a `Grant` as the
//!   application releases messages (a grant goes out once half a window is
//!   released, not per message);
//! - the sender sends a protocol's message only while it is under that
//!   protocol's limit; beyond it, that protocol's messages wait (its
//!   senders feel the pushback) and every other protocol goes on;
//! - a message beyond the limit it was granted is a flood: the receiver
//!   drops and counts it, and never blocks on it.
//!
//! So the receiver always takes every message off the stream at once, the
//! stream's own window always drains, and keep-alives are never stuck
//! behind an application.

use std::collections::HashMap;
use std::hash::Hash;

/// Messages of one protocol a receiver takes from one peer beyond what its
/// application has finished with. 256 keeps a busy protocol's pipe full at a
/// link's speed (acknowledged after a round trip) and bounds what one peer
/// can park in one protocol to 256 messages (16 MiB at the 64 KiB maximum).
pub const DEFAULT_WINDOW: u64 = 256;

/// A message arrived beyond the limit its sender was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flood;

#[derive(Debug, Clone, Copy)]
struct Send {
    sent: u64,
    limit: u64,
}

#[derive(Debug, Clone, Copy)]
struct Recv {
    received: u64,
    released: u64,
    /// The limit the sender last heard of.
    advertised: u64,
}

/// Both directions of every protocol of one link. `K` names a protocol.
#[derive(Debug, Clone)]
pub struct Credits<K> {
    window: u64,
    send: HashMap<K, Send>,
    recv: HashMap<K, Recv>,
}

impl<K: Clone + Eq + Hash> Credits<K> {
    /// `window`: see [`DEFAULT_WINDOW`]; at least 2, so that a grant can
    /// go out at half of it.
    pub fn new(window: u64) -> Self {
        Self {
            window: window.max(2),
            send: HashMap::new(),
            recv: HashMap::new(),
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    fn send_state(&mut self, k: &K) -> &mut Send {
        let window = self.window;
        self.send.entry(k.clone()).or_insert(Send {
            sent: 0,
            limit: window,
        })
    }

    // ----- sending --------------------------------------------------------

    /// Whether a message of `k` may go out now.
    pub fn can_send(&self, k: &K) -> bool {
        self.send.get(k).is_none_or(|s| s.sent < s.limit)
    }

    /// A message of `k` went out (call only when [`Self::can_send`]).
    pub fn on_sent(&mut self, k: &K) {
        self.send_state(k).sent += 1;
    }

    /// The peer's grant for `k`: it may have `limit` messages of `k` in all.
    /// Stale or lower grants change nothing.
    pub fn on_grant(&mut self, k: &K, limit: u64) {
        let s = self.send_state(k);
        s.limit = s.limit.max(limit);
    }

    /// Messages of `k` that may still go out before the next grant.
    pub fn send_credit(&self, k: &K) -> u64 {
        self.send
            .get(k)
            .map_or(self.window, |s| s.limit.saturating_sub(s.sent))
    }

    // ----- receiving ------------------------------------------------------

    /// A message of `k` arrived: deliver it, or drop it as a flood.
    pub fn on_received(&mut self, k: &K) -> Result<(), Flood> {
        let window = self.window;
        let r = self.recv.entry(k.clone()).or_insert(Recv {
            received: 0,
            released: 0,
            advertised: window,
        });
        if r.received >= r.advertised {
            return Err(Flood);
        }
        r.received += 1;
        Ok(())
    }

    /// The application finished `n` messages of `k`.
    pub fn on_released(&mut self, k: &K, n: u64) {
        if let Some(r) = self.recv.get_mut(k) {
            r.released = (r.released + n).min(r.received);
        }
    }

    /// Messages of `k` delivered and not yet released by the application.
    pub fn held(&self, k: &K) -> u64 {
        self.recv.get(k).map_or(0, |r| r.received - r.released)
    }

    /// The next grant to send: a protocol whose application released at
    /// least half a window since the limit the sender knows, and its new
    /// limit (released + window).
    pub fn poll_grant(&mut self) -> Option<(K, u64)> {
        let window = self.window;
        let (k, r) = self
            .recv
            .iter_mut()
            .find(|(_, r)| r.released + window >= r.advertised + window / 2)?;
        r.advertised = r.released + window;
        Some((k.clone(), r.advertised))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_sender_stops_at_the_window_and_goes_on_with_grants() {
        let mut c = Credits::new(4);
        for _ in 0..4 {
            assert!(c.can_send(&"a"));
            c.on_sent(&"a");
        }
        assert!(!c.can_send(&"a"));
        assert!(c.can_send(&"b"), "another protocol is not held up");
        c.on_grant(&"a", 6);
        assert_eq!(c.send_credit(&"a"), 2);
        c.on_grant(&"a", 5); // stale
        assert_eq!(c.send_credit(&"a"), 2);
    }

    #[test]
    fn a_receiver_grants_every_half_window_and_drops_floods() {
        let mut c = Credits::new(4);
        for _ in 0..4 {
            assert_eq!(c.on_received(&"a"), Ok(()));
        }
        assert_eq!(c.on_received(&"a"), Err(Flood), "beyond the window");
        assert_eq!(c.held(&"a"), 4);
        assert_eq!(c.poll_grant(), None, "nothing released");
        c.on_released(&"a", 1);
        assert_eq!(c.poll_grant(), None, "less than half a window");
        c.on_released(&"a", 1);
        assert_eq!(c.poll_grant(), Some(("a", 6)));
        assert_eq!(c.poll_grant(), None);
        assert_eq!(c.on_received(&"a"), Ok(()));
        assert_eq!(c.on_received(&"a"), Ok(()));
        assert_eq!(c.on_received(&"a"), Err(Flood));
        // Releasing more than was delivered is ignored.
        c.on_released(&"a", 100);
        assert_eq!(c.held(&"a"), 0);
    }

    proptest! {
        /// A sender and a receiver that follow each other's rules never
        /// see a flood, never send beyond the window unreleased, and always
        /// make progress while the application releases.
        #[test]
        fn honest_peers_never_flood_and_never_stall(
            window in 2u64..40,
            steps in proptest::collection::vec(0u8..3, 1..400),
        ) {
            let (mut tx, mut rx) = (Credits::new(window), Credits::new(window));
            let mut in_flight = 0u64;
            let mut delivered = 0u64;
            for s in steps {
                match s {
                    0 if tx.can_send(&1) => {
                        tx.on_sent(&1);
                        in_flight += 1;
                    }
                    1 if in_flight > 0 => {
                        in_flight -= 1;
                        prop_assert_eq!(rx.on_received(&1), Ok(()));
                        delivered += 1;
                    }
                    _ if rx.held(&1) > 0 => rx.on_released(&1, 1),
                    _ => {}
                }
                while let Some((k, limit)) = rx.poll_grant() {
                    tx.on_grant(&k, limit);
                }
                prop_assert!(rx.held(&1) <= window);
                // Stalled only while the application holds a window's half.
                if !tx.can_send(&1) {
                    prop_assert!(rx.held(&1) + in_flight > window / 2);
                }
            }
            let _ = delivered;
        }
    }
}
