//! NAT behaviour discovery (seed 003, in the manner of RFC 5780), sans-IO.
//!
//! The control server answers STUN Binding requests on two addresses and two
//! ports. From one local socket the node asks:
//!
//! 1. the primary endpoint: its mapping seen from there (no answer at all:
//!    UDP is blocked);
//! 2. the alternate address, then the alternate address and port, then the
//!    primary address and alternate port: the same mapping everywhere is
//!    endpoint-independent mapping; one per address is address-dependent;
//!    one per endpoint is symmetric, and the steps between the mapped ports
//!    tell sequential (with its stride, the input of port prediction) from
//!    random;
//! 3. before 2 (an endpoint-independent mapping would let the other
//!    endpoints in once we sent to them): the primary endpoint again,
//!    asking for the answer from the other address and port, then from the
//!    other port only; which of those come through tells the filtering.
//!
//! Every request is sent up to [`TRIES`] times, [`RETRY`] apart; the machine
//! takes datagrams and time and gives datagrams, so it is tested on the
//! simulated NATs of the simulated network (`peermesh-netsim`) with a virtual clock.

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peermesh_base::{NatBehavior, NatFiltering, NatMapping};

use crate::port_prediction::sequential_stride;
use crate::stun::{self, Message, Request, TransactionId};

/// Tries per request, and the wait between them.
pub const TRIES: u32 = 5;
pub const RETRY: Duration = Duration::from_millis(150);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Test {
    Primary,
    AltIp,
    AltBoth,
    AltPort,
    FilterBoth,
    FilterPort,
}

/// The machine. `primary` is the server's main endpoint; the alternate
/// address and port come from its first answer (OTHER-ADDRESS).
pub struct Discovery {
    primary: SocketAddr,
    local: Option<SocketAddr>,
    other: Option<SocketAddr>,
    test: Option<Test>,
    txid: TransactionId,
    tries: u32,
    next_send: Instant,
    seq: u64,
    mapped: Vec<(Test, SocketAddr)>,
    result: Option<NatBehavior>,
    /// Datagrams that were not an answer we wait for.
    pub ignored: u64,
    /// Only the mapping tests: a few round trips, no waiting for answers
    /// that a filtering NAT drops (what port prediction needs first).
    mapping_only: bool,
}

impl Discovery {
    /// The mapping tests alone (their `filtering` stays `None`). Run from
    /// its own socket beside a full [`Discovery`], it answers in a few
    /// round trips where the filtering tests wait out their retries.
    pub fn mapping_only(primary: SocketAddr, local: Option<SocketAddr>, now: Instant) -> Self {
        let mut d = Self::new(primary, local, now);
        d.mapping_only = true;
        d
    }

    /// `local`: the socket's own address, if known, to tell "no NAT".
    pub fn new(primary: SocketAddr, local: Option<SocketAddr>, now: Instant) -> Self {
        let mut d = Self {
            primary,
            local,
            other: None,
            test: None,
            txid: [0; 12],
            tries: 0,
            next_send: now,
            seq: 0,
            mapped: Vec::new(),
            result: None,
            ignored: 0,
            mapping_only: false,
        };
        d.start(Test::Primary, now);
        d
    }

    pub fn result(&self) -> Option<&NatBehavior> {
        self.result.as_ref()
    }

    fn start(&mut self, t: Test, now: Instant) {
        self.seq += 1;
        self.test = Some(t);
        // Unpredictable enough to tell our answers from stray ones; not a secret.
        let r: u64 = rand::random();
        self.txid[..8].copy_from_slice(&r.to_be_bytes());
        self.txid[8..].copy_from_slice(&(self.seq as u32).to_be_bytes());
        self.tries = 0;
        self.next_send = now;
    }

    fn target(&self, t: Test) -> Option<(SocketAddr, bool, bool)> {
        let other = self.other;
        Some(match t {
            Test::Primary => (self.primary, false, false),
            Test::AltIp => (
                SocketAddr::new(other?.ip(), self.primary.port()),
                false,
                false,
            ),
            Test::AltBoth => (other?, false, false),
            Test::AltPort => (
                SocketAddr::new(self.primary.ip(), other?.port()),
                false,
                false,
            ),
            Test::FilterBoth => (self.primary, true, true),
            Test::FilterPort => (self.primary, false, true),
        })
    }

    /// The next datagram to send, when one is due.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        let t = self.test?;
        if now < self.next_send || self.tries >= TRIES {
            return None;
        }
        let (to, change_ip, change_port) = self.target(t)?;
        self.tries += 1;
        self.next_send = now + RETRY;
        let req = Request {
            txid: self.txid,
            change_ip,
            change_port,
        };
        Some((to, req.encode()))
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.test?;
        Some(self.next_send)
    }

    /// Gives up on the current test once its last try has had its time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(t) = self.test else { return };
        if self.tries < TRIES || now < self.next_send {
            return;
        }
        self.on_answer(t, None, now);
    }

    /// A datagram from `from`; anything that is not the awaited answer is
    /// counted and dropped.
    pub fn handle_datagram(&mut self, from: SocketAddr, bytes: &[u8], now: Instant) {
        let Some(t) = self.test else {
            self.ignored += 1;
            return;
        };
        let resp = match stun::decode(bytes) {
            Ok(Message::Response(r)) if r.txid == self.txid => r,
            _ => {
                self.ignored += 1;
                return;
            }
        };
        if t == Test::Primary {
            self.other = resp.other;
        }
        let _ = from;
        self.on_answer(t, Some(resp.mapped), now);
    }

    fn on_answer(&mut self, t: Test, mapped: Option<SocketAddr>, now: Instant) {
        if let Some(m) = mapped {
            self.mapped.push((t, m));
        }
        // Filtering first: once we have sent to the other endpoints, an
        // endpoint-independent mapping would let their answers in anyway.
        let next = match (t, mapped) {
            (Test::Primary, None) => {
                self.finish(false);
                return;
            }
            // A server without an alternate endpoint: mapping and filtering
            // stay unknown beyond "UDP works".
            (Test::Primary, Some(_)) if self.other.is_none() => {
                self.finish(true);
                return;
            }
            (Test::Primary, Some(_)) if self.mapping_only => Test::AltIp,
            (Test::Primary, Some(_)) => Test::FilterBoth,
            (Test::FilterBoth, Some(_)) => Test::AltIp,
            (Test::FilterBoth, None) => Test::FilterPort,
            (Test::FilterPort, _) => Test::AltIp,
            (Test::AltIp, m) if m.is_some() && m == self.port_of(Test::Primary) => {
                self.finish(true);
                return;
            }
            (Test::AltIp, _) => Test::AltBoth,
            (Test::AltBoth, _) => Test::AltPort,
            (Test::AltPort, _) => {
                self.finish(true);
                return;
            }
        };
        self.start(next, now);
    }

    fn port_of(&self, t: Test) -> Option<SocketAddr> {
        self.mapped.iter().find(|(x, _)| *x == t).map(|(_, a)| *a)
    }

    fn finish(&mut self, udp: bool) {
        self.test = None;
        let public = self.port_of(Test::Primary);
        let (m1, m2, m3, m4) = (
            public,
            self.port_of(Test::AltIp),
            self.port_of(Test::AltBoth),
            self.port_of(Test::AltPort),
        );
        let mapping = match (m1, m2, m3) {
            (Some(a), Some(b), _) if a == b => Some(NatMapping::EndpointIndependent),
            (Some(_), Some(b), Some(c)) if b == c => Some(NatMapping::AddressDependent),
            (Some(a), Some(b), Some(c)) => {
                let mut steps = vec![
                    i32::from(b.port()) - i32::from(a.port()),
                    i32::from(c.port()) - i32::from(b.port()),
                ];
                if let Some(d) = m4 {
                    steps.push(i32::from(d.port()) - i32::from(c.port()));
                }
                Some(
                    sequential_stride(&steps).map_or(NatMapping::Random, |stride| {
                        NatMapping::Sequential { stride }
                    }),
                )
            }
            _ => None,
        };
        let heard = |t| self.port_of(t).is_some();
        let filtering = if !udp || self.other.is_none() || self.mapping_only {
            None
        } else if heard(Test::FilterBoth) {
            Some(NatFiltering::EndpointIndependent)
        } else if heard(Test::FilterPort) {
            Some(NatFiltering::AddressDependent)
        } else {
            Some(NatFiltering::AddressAndPortDependent)
        };
        self.result = Some(NatBehavior {
            udp,
            public,
            no_nat: public.is_some() && public == self.local,
            mapping,
            filtering,
            mapped_ports: self.mapped.iter().map(|(_, a)| a.port()).collect(),
        });
    }
}
