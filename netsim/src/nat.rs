//! One NAT router's translation table, per RFC 4787.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use peermesh_base::NatFiltering;

use super::rng::SimRng;

/// How the NAT picks the public port of an outbound flow (RFC 4787 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MappingBehavior {
    /// One public port per internal endpoint, whatever the destination ("cone").
    EndpointIndependent,
    /// A new public port per destination, `stride` above the previous one:
    /// symmetric but predictable.
    EndpointDependent { stride: u16 },
    /// A new, random public port per destination (`masquerade fully-random`).
    EndpointDependentRandom,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NatConfig {
    pub mapping: MappingBehavior,
    pub filtering: NatFiltering,
    /// A mapping idle for this long is gone.
    pub mapping_timeout: Duration,
    /// Endpoint-independent mappings keep the internal port when it is free.
    /// Endpoint-dependent NATs allocate by their own rule and ignore it.
    pub port_preservation: bool,
    /// `true`: unsolicited inbound packets are dropped without a trace (home
    /// routers). `false`: such a packet creates a conntrack entry on the router
    /// that holds (public port, sender) for `conntrack_timeout`, so a later
    /// outbound flow from the inside to that sender cannot use that port.
    pub wan_firewall: bool,
    pub conntrack_timeout: Duration,
    /// Inbound traffic keeps a mapping alive too (Linux conntrack does).
    pub inbound_refresh: bool,
    /// Endpoint-dependent sequential NATs only: chance that some other host
    /// behind the router took a port just before each allocation, so that a
    /// prediction has to search a window instead of hitting exactly.
    pub port_churn: f64,
    /// Ports handed out when not preserving.
    pub port_min: u16,
    pub port_max: u16,
}

impl NatConfig {
    fn with(mapping: MappingBehavior, filtering: NatFiltering) -> Self {
        Self {
            mapping,
            filtering,
            mapping_timeout: Duration::from_secs(30),
            port_preservation: true,
            wan_firewall: true,
            conntrack_timeout: Duration::from_secs(30),
            inbound_refresh: true,
            port_churn: 0.0,
            port_min: 1024,
            port_max: 65535,
        }
    }

    pub fn full_cone() -> Self {
        Self::with(
            MappingBehavior::EndpointIndependent,
            NatFiltering::EndpointIndependent,
        )
    }

    pub fn address_restricted() -> Self {
        Self::with(
            MappingBehavior::EndpointIndependent,
            NatFiltering::AddressDependent,
        )
    }

    /// Linux `masquerade`.
    pub fn port_restricted() -> Self {
        Self::with(
            MappingBehavior::EndpointIndependent,
            NatFiltering::AddressAndPortDependent,
        )
    }

    pub fn symmetric_sequential(stride: u16) -> Self {
        Self::with(
            MappingBehavior::EndpointDependent { stride },
            NatFiltering::AddressAndPortDependent,
        )
    }

    /// Linux `masquerade fully-random`.
    pub fn symmetric_random() -> Self {
        Self::with(
            MappingBehavior::EndpointDependentRandom,
            NatFiltering::AddressAndPortDependent,
        )
    }

    pub fn wan_firewall(mut self, on: bool) -> Self {
        self.wan_firewall = on;
        self
    }

    pub fn mapping_timeout(mut self, t: Duration) -> Self {
        self.mapping_timeout = t;
        self
    }

    pub fn port_preservation(mut self, on: bool) -> Self {
        self.port_preservation = on;
        self
    }

    pub fn port_churn(mut self, p: f64) -> Self {
        self.port_churn = p;
        self
    }

    pub fn filtering(mut self, f: NatFiltering) -> Self {
        self.filtering = f;
        self
    }
}

/// One live translation.
#[derive(Clone, Debug)]
struct Entry {
    internal: SocketAddr,
    /// `Some` for a per-destination mapping (symmetric NATs, or a flow that
    /// could not use its endpoint-independent port because it was taken).
    remote: Option<SocketAddr>,
    /// Destinations the inside has sent to through this mapping.
    permits: BTreeSet<SocketAddr>,
    last_active: Duration,
}

/// A view of a live mapping, for tests and traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingInfo {
    pub internal: SocketAddr,
    pub public_port: u16,
    pub remote: Option<SocketAddr>,
}

pub(crate) enum Inbound {
    Forward(SocketAddr),
    Dropped { stole: bool },
}

pub(crate) struct Nat {
    pub(crate) cfg: NatConfig,
    by_port: BTreeMap<u16, Entry>,
    by_key: BTreeMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// (public port, remote) held by a conntrack entry that an unsolicited
    /// inbound packet created, with its expiry.
    reserved: BTreeMap<(u16, SocketAddr), Duration>,
    next_seq: u16,
    pub(crate) mappings_created: u64,
}

impl Nat {
    pub(crate) fn new(cfg: NatConfig, rng: &mut SimRng) -> Self {
        assert!(cfg.port_min <= cfg.port_max, "empty NAT port range");
        let span = u64::from(cfg.port_max - cfg.port_min) + 1;
        let next_seq = cfg.port_min + rng.below(span) as u16;
        Self {
            cfg,
            by_port: BTreeMap::new(),
            by_key: BTreeMap::new(),
            reserved: BTreeMap::new(),
            next_seq,
            mappings_created: 0,
        }
    }

    pub(crate) fn mappings(&self, now: Duration) -> Vec<MappingInfo> {
        self.by_port
            .iter()
            .filter(|(_, e)| now.saturating_sub(e.last_active) < self.cfg.mapping_timeout)
            .map(|(&p, e)| MappingInfo {
                internal: e.internal,
                public_port: p,
                remote: e.remote,
            })
            .collect()
    }

    /// The live entry on `port`; an expired one is removed on the way.
    fn live(&mut self, port: u16, now: Duration) -> Option<&mut Entry> {
        let expired = match self.by_port.get(&port) {
            None => return None,
            Some(e) => now.saturating_sub(e.last_active) >= self.cfg.mapping_timeout,
        };
        if expired {
            if let Some(e) = self.by_port.remove(&port) {
                self.by_key.remove(&(e.internal, e.remote));
            }
            return None;
        }
        self.by_port.get_mut(&port)
    }

    fn live_key(&mut self, key: (SocketAddr, Option<SocketAddr>), now: Duration) -> Option<u16> {
        let port = *self.by_key.get(&key)?;
        match self.live(port, now) {
            Some(_) => Some(port),
            None => {
                self.by_key.remove(&key);
                None
            }
        }
    }

    fn is_reserved(&mut self, port: u16, remote: SocketAddr, now: Duration) -> bool {
        match self.reserved.get(&(port, remote)) {
            Some(&until) if until > now => true,
            Some(_) => {
                self.reserved.remove(&(port, remote));
                false
            }
            None => false,
        }
    }

    fn usable(&mut self, port: u16, remote: SocketAddr, now: Duration) -> bool {
        port != 0 && self.live(port, now).is_none() && !self.is_reserved(port, remote, now)
    }

    fn alloc_random(&mut self, remote: SocketAddr, now: Duration, rng: &mut SimRng) -> Option<u16> {
        let (lo, hi) = (self.cfg.port_min, self.cfg.port_max);
        let span = u64::from(hi - lo) + 1;
        for _ in 0..64 {
            let p = lo + rng.below(span) as u16;
            if self.usable(p, remote, now) {
                return Some(p);
            }
        }
        let start = rng.below(span);
        (0..span)
            .map(|i| lo + ((start + i) % span) as u16)
            .find(|&p| self.usable(p, remote, now))
    }

    fn alloc_sequential(
        &mut self,
        stride: u16,
        remote: SocketAddr,
        now: Duration,
        rng: &mut SimRng,
    ) -> Option<u16> {
        let (lo, hi) = (u64::from(self.cfg.port_min), u64::from(self.cfg.port_max));
        let span = hi - lo + 1;
        let step = u64::from(stride.max(1));
        let advance = |p: u16, by: u64| (lo + (u64::from(p) - lo + by) % span) as u16;
        let mut extra = 0;
        while extra < 1000 && rng.chance(self.cfg.port_churn) {
            extra += 1;
        }
        let mut p = advance(self.next_seq, step * (1 + extra));
        for _ in 0..span {
            if self.usable(p, remote, now) {
                self.next_seq = p;
                return Some(p);
            }
            p = advance(p, step);
        }
        None
    }

    fn insert(
        &mut self,
        port: u16,
        internal: SocketAddr,
        remote: Option<SocketAddr>,
        dst: SocketAddr,
        now: Duration,
    ) {
        self.by_port.insert(
            port,
            Entry {
                internal,
                remote,
                permits: BTreeSet::from([dst]),
                last_active: now,
            },
        );
        self.by_key.insert((internal, remote), port);
        self.mappings_created += 1;
    }

    fn touch(&mut self, port: u16, dst: SocketAddr, now: Duration) {
        if let Some(e) = self.by_port.get_mut(&port) {
            e.last_active = now;
            e.permits.insert(dst);
        }
    }

    /// Translates an outbound packet; `None` when the port space is exhausted.
    pub(crate) fn outbound(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        now: Duration,
        rng: &mut SimRng,
    ) -> Option<u16> {
        if let Some(p) = self.live_key((src, Some(dst)), now) {
            self.touch(p, dst, now);
            return Some(p);
        }
        let port = match self.cfg.mapping {
            MappingBehavior::EndpointIndependent => {
                if let Some(p) = self.live_key((src, None), now) {
                    if !self.is_reserved(p, dst, now) {
                        self.touch(p, dst, now);
                        return Some(p);
                    }
                    // Conntrack already holds (p, dst): this one flow needs another port.
                    let q = self.alloc_random(dst, now, rng)?;
                    self.insert(q, src, Some(dst), dst, now);
                    return Some(q);
                }
                let want = src.port();
                let p = if self.cfg.port_preservation && self.usable(want, dst, now) {
                    want
                } else {
                    self.alloc_random(dst, now, rng)?
                };
                self.insert(p, src, None, dst, now);
                return Some(p);
            }
            MappingBehavior::EndpointDependent { stride } => {
                self.alloc_sequential(stride, dst, now, rng)?
            }
            MappingBehavior::EndpointDependentRandom => self.alloc_random(dst, now, rng)?,
        };
        self.insert(port, src, Some(dst), dst, now);
        Some(port)
    }

    /// Decides the fate of a packet from `from` to the public `port`.
    pub(crate) fn inbound(&mut self, from: SocketAddr, port: u16, now: Duration) -> Inbound {
        let conntrack_until = now + self.cfg.conntrack_timeout;
        if self.is_reserved(port, from, now) {
            // Matches the router's own conntrack entry, which lives on.
            self.reserved.insert((port, from), conntrack_until);
            return Inbound::Dropped { stole: false };
        }
        let eim = self.cfg.mapping == MappingBehavior::EndpointIndependent;
        let filtering = self.cfg.filtering;
        let refresh = self.cfg.inbound_refresh;
        if let Some(e) = self.live(port, now) {
            let pass = if eim && e.remote.is_some() {
                e.permits.contains(&from)
            } else {
                match filtering {
                    NatFiltering::EndpointIndependent => true,
                    NatFiltering::AddressDependent => e.permits.iter().any(|p| p.ip() == from.ip()),
                    NatFiltering::AddressAndPortDependent => e.permits.contains(&from),
                }
            };
            if pass {
                if refresh {
                    e.last_active = now;
                }
                return Inbound::Forward(e.internal);
            }
        }
        if self.cfg.wan_firewall {
            Inbound::Dropped { stole: false }
        } else {
            self.reserved.insert((port, from), conntrack_until);
            Inbound::Dropped { stole: true }
        }
    }
}
