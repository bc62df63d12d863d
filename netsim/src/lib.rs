//! A deterministic, in-process simulation of a UDP network with NAT routers.
//!
//! Exists so that NAT traversal can be tested exhaustively and reproducibly:
//! the RFC 4787 behaviours that decide whether hole punching works (mapping,
//! filtering, mapping timeouts, port preservation, the router without a WAN
//! firewall whose conntrack steals ports), plus latency, jitter, loss and TTL,
//! all on a virtual clock. One seed gives one history; nothing reads real time
//! except the single base [`Instant`] that virtual times are expressed against.
//!
//! Topology: public hosts and NAT routers sit on one flat internet; private
//! hosts sit behind exactly one NAT. Hosts need no sockets: every datagram to
//! a host lands in its inbox with its destination port.

mod nat;
mod rng;
#[cfg(test)]
mod tests;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

pub use nat::{MappingBehavior, MappingInfo, NatConfig};
pub use peermesh_base::NatFiltering;
pub use rng::SimRng;

/// TTL of an ordinary datagram.
pub const DEFAULT_TTL: u8 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(pub usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NatId(pub usize);

/// One access link: a host's link to its NAT or to the internet, or a NAT's
/// WAN link. A packet's delay is the sum over the links it crosses.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkConfig {
    pub latency: Duration,
    /// Extra delay, uniform in `0..jitter`; lets packets reorder.
    pub jitter: Duration,
    /// Probability that a packet crossing the link is lost.
    pub loss: f64,
}

impl LinkConfig {
    pub fn new(latency: Duration) -> Self {
        Self {
            latency,
            jitter: Duration::ZERO,
            loss: 0.0,
        }
    }

    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    pub fn loss(mut self, loss: f64) -> Self {
        self.loss = loss;
        self
    }
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self::new(Duration::from_millis(1))
    }
}

/// A datagram as its receiver sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub from: SocketAddr,
    /// The receiving host's own address and port.
    pub to: SocketAddr,
    pub payload: Vec<u8>,
    pub at: Instant,
}

/// What happened to the packets so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub ttl_expired: u64,
    /// Dropped by a NAT: no mapping, or the filter said no.
    pub filtered: u64,
    pub no_route: u64,
    /// Unsolicited inbound packets that left a conntrack entry holding a port.
    pub port_steals: u64,
}

#[derive(Clone, Debug)]
struct Packet {
    src: SocketAddr,
    dst: SocketAddr,
    ttl: u8,
    payload: Vec<u8>,
}

#[derive(Clone, Copy, Debug)]
enum Place {
    /// Arriving at a NAT from its LAN.
    NatOutbound(NatId),
    /// Arriving at the owner of the destination's public address.
    Wan,
    Inbox(HostId),
}

struct Scheduled {
    at: Duration,
    seq: u64,
    place: Place,
    pkt: Packet,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Reversed: `BinaryHeap` pops the earliest, ties in send order.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Host {
    ip: IpAddr,
    nat: Option<NatId>,
    link: LinkConfig,
    inbox: VecDeque<Datagram>,
}

struct Router {
    nat: nat::Nat,
    public_ip: IpAddr,
    wan: LinkConfig,
    lan: BTreeMap<IpAddr, HostId>,
}

#[derive(Clone, Copy)]
enum PublicNode {
    Host(HostId),
    Nat(NatId),
}

/// The simulated network. See the module docs.
pub struct Sim {
    base: Instant,
    now: Duration,
    rng: SimRng,
    hosts: Vec<Host>,
    routers: Vec<Router>,
    public: BTreeMap<IpAddr, PublicNode>,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    stats: SimStats,
    internet_hops: u8,
}

impl Sim {
    pub fn new(seed: u64) -> Self {
        Self::with_base(seed, Instant::now())
    }

    /// Virtual time `0` is `base`.
    pub fn with_base(seed: u64, base: Instant) -> Self {
        Self {
            base,
            now: Duration::ZERO,
            rng: SimRng::seed_from_u64(seed),
            hosts: Vec::new(),
            routers: Vec::new(),
            public: BTreeMap::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            stats: SimStats::default(),
            internet_hops: 8,
        }
    }

    /// Router hops between any two public nodes; a packet needs a TTL above
    /// this to cross the internet (so a TTL-2 packet opens the sender's NAT
    /// and dies before it reaches the peer's).
    pub fn set_internet_hops(&mut self, hops: u8) {
        self.internet_hops = hops;
    }

    fn claim_public(&mut self, ip: IpAddr, node: PublicNode) {
        let old = self.public.insert(ip, node);
        assert!(old.is_none(), "public address {ip} used twice");
    }

    pub fn add_public_host(&mut self, ip: IpAddr, link: LinkConfig) -> HostId {
        let id = HostId(self.hosts.len());
        self.claim_public(ip, PublicNode::Host(id));
        self.hosts.push(Host {
            ip,
            nat: None,
            link,
            inbox: VecDeque::new(),
        });
        id
    }

    pub fn add_nat(&mut self, public_ip: IpAddr, cfg: NatConfig, wan: LinkConfig) -> NatId {
        let id = NatId(self.routers.len());
        self.claim_public(public_ip, PublicNode::Nat(id));
        let mut nat_rng = self.rng.fork(id.0 as u64);
        self.routers.push(Router {
            nat: nat::Nat::new(cfg, &mut nat_rng),
            public_ip,
            wan,
            lan: BTreeMap::new(),
        });
        id
    }

    /// A host behind `nat`; `lan` is its link to the router.
    pub fn add_private_host(&mut self, nat: NatId, ip: IpAddr, lan: LinkConfig) -> HostId {
        let id = HostId(self.hosts.len());
        let old = self.routers[nat.0].lan.insert(ip, id);
        assert!(
            old.is_none(),
            "private address {ip} used twice behind one NAT"
        );
        self.hosts.push(Host {
            ip,
            nat: Some(nat),
            link: lan,
            inbox: VecDeque::new(),
        });
        id
    }

    pub fn host_ip(&self, host: HostId) -> IpAddr {
        self.hosts[host.0].ip
    }

    pub fn host_nat(&self, host: HostId) -> Option<NatId> {
        self.hosts[host.0].nat
    }

    pub fn nat_public_ip(&self, nat: NatId) -> IpAddr {
        self.routers[nat.0].public_ip
    }

    pub fn nat_config(&self, nat: NatId) -> &NatConfig {
        &self.routers[nat.0].nat.cfg
    }

    /// Live mappings of a NAT, by public port.
    pub fn nat_mappings(&self, nat: NatId) -> Vec<MappingInfo> {
        self.routers[nat.0].nat.mappings(self.now)
    }

    pub fn now(&self) -> Instant {
        self.base + self.now
    }

    pub fn elapsed(&self) -> Duration {
        self.now
    }

    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    /// Sends a datagram from `host`'s `from_port` now, with the default TTL.
    pub fn send(&mut self, host: HostId, from_port: u16, to: SocketAddr, payload: Vec<u8>) {
        self.send_with_ttl(host, from_port, to, payload, DEFAULT_TTL);
    }

    pub fn send_with_ttl(
        &mut self,
        host: HostId,
        from_port: u16,
        to: SocketAddr,
        payload: Vec<u8>,
        ttl: u8,
    ) {
        self.stats.sent += 1;
        let h = &self.hosts[host.0];
        let pkt = Packet {
            src: SocketAddr::new(h.ip, from_port),
            dst: to,
            ttl,
            payload,
        };
        let link = h.link.clone();
        match h.nat {
            Some(n) => {
                if let Some(&peer) = self.routers[n.0].lan.get(&to.ip()) {
                    // Same LAN: straight across, no translation.
                    let peer_link = self.hosts[peer.0].link.clone();
                    if self.lost(&link) || self.lost(&peer_link) {
                        return;
                    }
                    let d = self.delay(&link) + self.delay(&peer_link);
                    self.schedule(d, Place::Inbox(peer), pkt);
                    return;
                }
                if self.lost(&link) {
                    return;
                }
                let d = self.delay(&link);
                self.schedule(d, Place::NatOutbound(n), pkt);
            }
            None => self.cross_internet(pkt, &link),
        }
    }

    /// Virtual time of the next event, if any.
    pub fn next_event_time(&self) -> Option<Instant> {
        self.queue.peek().map(|s| self.base + s.at)
    }

    /// Processes the earliest event, moving the clock to it. `false` when idle.
    pub fn step(&mut self) -> bool {
        let Some(ev) = self.queue.pop() else {
            return false;
        };
        self.now = self.now.max(ev.at);
        match ev.place {
            Place::NatOutbound(n) => self.nat_outbound(n, ev.pkt),
            Place::Wan => self.wan_arrival(ev.pkt),
            Place::Inbox(h) => self.deliver(h, ev.pkt),
        }
        true
    }

    /// Processes every event up to and including `t`, then sets the clock to `t`.
    pub fn run_until(&mut self, t: Instant) {
        let target = t.saturating_duration_since(self.base);
        while self.queue.peek().is_some_and(|s| s.at <= target) {
            self.step();
        }
        self.now = self.now.max(target);
    }

    pub fn advance(&mut self, d: Duration) {
        let t = self.now() + d;
        self.run_until(t);
    }

    /// Takes the oldest datagram from `host`'s inbox.
    pub fn recv(&mut self, host: HostId) -> Option<Datagram> {
        self.hosts[host.0].inbox.pop_front()
    }

    fn schedule(&mut self, after: Duration, place: Place, pkt: Packet) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at: self.now + after,
            seq: self.seq,
            place,
            pkt,
        });
    }

    fn lost(&mut self, link: &LinkConfig) -> bool {
        let lost = self.rng.chance(link.loss);
        if lost {
            self.stats.lost += 1;
        }
        lost
    }

    fn delay(&mut self, link: &LinkConfig) -> Duration {
        let jitter_ns = link.jitter.as_nanos() as u64;
        let extra = if jitter_ns == 0 {
            0
        } else {
            self.rng.below(jitter_ns)
        };
        link.latency + Duration::from_nanos(extra)
    }

    /// A router forwards only while TTL stays above zero.
    fn hop(&mut self, pkt: &mut Packet, hops: u8) -> bool {
        if pkt.ttl <= hops {
            self.stats.ttl_expired += 1;
            return false;
        }
        pkt.ttl -= hops;
        true
    }

    fn cross_internet(&mut self, mut pkt: Packet, src_link: &LinkConfig) {
        if !self.hop(&mut pkt, self.internet_hops) {
            return;
        }
        let dst_link = match self.public.get(&pkt.dst.ip()) {
            Some(PublicNode::Host(h)) => self.hosts[h.0].link.clone(),
            Some(PublicNode::Nat(n)) => self.routers[n.0].wan.clone(),
            None => {
                self.stats.no_route += 1;
                return;
            }
        };
        if self.lost(src_link) || self.lost(&dst_link) {
            return;
        }
        let d = self.delay(src_link) + self.delay(&dst_link);
        self.schedule(d, Place::Wan, pkt);
    }

    fn nat_outbound(&mut self, n: NatId, mut pkt: Packet) {
        // TTL is checked before translation: a packet that dies here leaves no
        // mapping, as in Linux where its conntrack entry is never confirmed.
        if !self.hop(&mut pkt, 1) {
            return;
        }
        let router = &mut self.routers[n.0];
        if pkt.dst.ip() == router.public_ip {
            // No hairpinning.
            self.stats.no_route += 1;
            return;
        }
        let now = self.now;
        let Some(port) = router.nat.outbound(pkt.src, pkt.dst, now, &mut self.rng) else {
            self.stats.filtered += 1;
            return;
        };
        pkt.src = SocketAddr::new(router.public_ip, port);
        let wan = router.wan.clone();
        self.cross_internet(pkt, &wan);
    }

    fn wan_arrival(&mut self, mut pkt: Packet) {
        match self.public.get(&pkt.dst.ip()).copied() {
            Some(PublicNode::Host(h)) => self.deliver(h, pkt),
            Some(PublicNode::Nat(n)) => {
                let now = self.now;
                let router = &mut self.routers[n.0];
                match router.nat.inbound(pkt.src, pkt.dst.port(), now) {
                    nat::Inbound::Forward(internal) => {
                        let Some(&host) = router.lan.get(&internal.ip()) else {
                            self.stats.no_route += 1;
                            return;
                        };
                        if !self.hop(&mut pkt, 1) {
                            return;
                        }
                        pkt.dst = internal;
                        let link = self.hosts[host.0].link.clone();
                        if self.lost(&link) {
                            return;
                        }
                        let d = self.delay(&link);
                        self.schedule(d, Place::Inbox(host), pkt);
                    }
                    nat::Inbound::Dropped { stole } => {
                        self.stats.filtered += 1;
                        if stole {
                            self.stats.port_steals += 1;
                        }
                    }
                }
            }
            None => self.stats.no_route += 1,
        }
    }

    fn deliver(&mut self, host: HostId, pkt: Packet) {
        self.stats.delivered += 1;
        let at = self.now();
        self.hosts[host.0].inbox.push_back(Datagram {
            from: pkt.src,
            to: pkt.dst,
            payload: pkt.payload,
            at,
        });
    }
}
