//! Both sides of a link on `netsim`, with a control server that observes each
//! side's public endpoint from two ports and coordinates the attempt.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::hole_punch::{
    Action, Config, Event, FailReason, HolePunch, Instruction, ProbeMessage, Role,
};
use crate::port_prediction::{
    classify_mapping, PortPrediction, BIRTHDAY_PROBES, BIRTHDAY_SOCKETS, PREDICTION_WINDOW,
};
use peermesh_base::NatMapping;
use peermesh_netsim::{HostId, LinkConfig, NatConfig, Sim, SimRng, DEFAULT_TTL};

pub const MS: Duration = Duration::from_millis(1);
/// Socket `i` of a side is its local port `BASE_PORT + i`.
pub const BASE_PORT: u16 = 40000;
pub const SERVER_PORTS: [u16; 2] = [3478, 3479];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Open,
    FullCone,
    AddrRestricted,
    PortRestricted,
    SymSeq,
    SymRandom,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    pub kind: Kind,
    pub wan_firewall: bool,
}

impl Site {
    pub const fn new(kind: Kind, wan_firewall: bool) -> Self {
        Self { kind, wan_firewall }
    }

    /// Every kind, each NAT with and without WAN firewall.
    pub fn all() -> Vec<Site> {
        use Kind::*;
        let mut v = vec![Site::new(Open, true)];
        for k in [FullCone, AddrRestricted, PortRestricted, SymSeq, SymRandom] {
            v.push(Site::new(k, true));
            v.push(Site::new(k, false));
        }
        v
    }

    /// `*` marks a router without WAN firewall.
    pub fn label(&self) -> String {
        let k = match self.kind {
            Kind::Open => return "open".into(),
            Kind::FullCone => "full",
            Kind::AddrRestricted => "addr",
            Kind::PortRestricted => "port",
            Kind::SymSeq => "seq",
            Kind::SymRandom => "rand",
        };
        if self.wan_firewall {
            k.into()
        } else {
            format!("{k}*")
        }
    }

    fn nat_config(&self, sc: &Scenario) -> Option<NatConfig> {
        let cfg = match self.kind {
            Kind::Open => return None,
            Kind::FullCone => NatConfig::full_cone(),
            Kind::AddrRestricted => NatConfig::address_restricted(),
            Kind::PortRestricted => NatConfig::port_restricted(),
            Kind::SymSeq => {
                NatConfig::symmetric_sequential(sc.seq_stride).port_churn(sc.port_churn)
            }
            Kind::SymRandom => NatConfig::symmetric_random(),
        };
        Some(
            cfg.wan_firewall(self.wan_firewall)
                .mapping_timeout(sc.mapping_timeout)
                .port_preservation(sc.port_preservation),
        )
    }
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub config: Config,
    /// On every WAN link (each packet crosses two).
    pub loss: f64,
    pub jitter: Duration,
    pub mapping_timeout: Duration,
    pub port_preservation: bool,
    /// Each side refreshes its mapping towards the server this often.
    pub keepalive: Option<Duration>,
    pub seq_stride: u16,
    pub port_churn: f64,
    pub window: u16,
    pub birthday_sockets: u16,
    pub birthday_probes: u32,
    /// Idle time between registration and the first instruction.
    pub idle_before_punch: Duration,
    /// Coordinated attempts the control server makes at most.
    pub max_attempts: u32,
    /// Control channel delay to each side (reliable, like gRPC over TCP).
    pub control_latency: [Duration; 2],
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            config: Config::default(),
            loss: 0.01,
            jitter: 2 * MS,
            mapping_timeout: Duration::from_secs(4),
            port_preservation: true,
            keepalive: Some(Duration::from_secs(1)),
            seq_stride: 1,
            port_churn: 0.0,
            window: PREDICTION_WINDOW,
            birthday_sockets: BIRTHDAY_SOCKETS,
            birthday_probes: BIRTHDAY_PROBES,
            idle_before_punch: Duration::from_millis(1500),
            max_attempts: 1,
            control_latency: [20 * MS, 35 * MS],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// Both sides succeeded and data crossed the chosen path both ways.
    pub direct: bool,
    pub attempts: u32,
    /// Packets both state machines sent over all attempts.
    pub packets: u64,
    /// Most packets one side sent in one attempt.
    pub max_side_attempt_packets: u32,
    /// From the first instruction to both sides succeeding.
    pub time_to_direct: Option<Duration>,
    /// Per attempt, per side: how it failed, if it did.
    pub failures: Vec<[Option<FailReason>; 2]>,
    /// Per side, how long after `start_at` its last attempt ended.
    pub ended_after_start: [Option<Duration>; 2],
    pub retry_requested: [bool; 2],
    /// Unsolicited packets that took a port on a router without WAN firewall.
    pub port_steals: u64,
}

struct Peer {
    host: HostId,
    local: SocketAddr,
    sm: HolePunch,
    rng: SimRng,
    sockets: u16,
    instruction: Option<(Instant, Instruction)>,
    next_keepalive: Option<Instant>,
    success: Option<(SocketAddr, u16, Instant)>,
    failed: Option<(FailReason, Instant)>,
    retry_after: Option<Duration>,
    data_from: Vec<(SocketAddr, u16)>,
}

pub struct World {
    sim: Sim,
    server: SocketAddr,
    peers: [Peer; 2],
    sc: Scenario,
    seed: u64,
    observed: [[Option<SocketAddr>; 2]; 2],
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl World {
    /// Side 0 is the initiator.
    pub fn new(sites: [Site; 2], seed: u64, sc: &Scenario) -> World {
        let mut sim = Sim::new(seed);
        let wan = |ms: u64| {
            LinkConfig::new(Duration::from_millis(ms))
                .jitter(sc.jitter)
                .loss(sc.loss)
        };
        let server_ip = ip(198, 51, 100, 1);
        sim.add_public_host(server_ip, wan(5));
        let peers = [0usize, 1].map(|i| {
            let public_ip = ip(203, 0, 113, 10 + 10 * i as u8);
            let link = wan(12 + 6 * i as u64);
            let host = match sites[i].nat_config(sc) {
                None => sim.add_public_host(public_ip, link),
                Some(cfg) => {
                    let nat = sim.add_nat(public_ip, cfg, link);
                    sim.add_private_host(nat, ip(192, 168, 1, 10), LinkConfig::new(MS))
                }
            };
            Peer {
                host,
                local: SocketAddr::new(sim.host_ip(host), BASE_PORT),
                sm: HolePunch::new(sc.config.clone()),
                rng: SimRng::seed_from_u64(
                    seed.wrapping_mul(0x9E37_79B9).wrapping_add(i as u64 + 1),
                ),
                sockets: 1,
                instruction: None,
                next_keepalive: None,
                success: None,
                failed: None,
                retry_after: None,
                data_from: Vec::new(),
            }
        });
        World {
            sim,
            server: SocketAddr::new(server_ip, SERVER_PORTS[0]),
            peers,
            sc: sc.clone(),
            seed,
            observed: [[None; 2]; 2],
        }
    }

    /// Registration, coordinated attempts (with retries as the machines ask),
    /// and a check that data crosses the chosen path.
    pub fn run(mut self) -> RunResult {
        let mut first_issue = None;
        let mut failures = Vec::new();
        let mut ended_after_start = [None; 2];
        let mut retry_requested = [false; 2];
        let mut max_side = 0;
        let mut attempts = 0;
        let mut direct = false;
        let mut time_to_direct = None;
        while attempts < self.sc.max_attempts {
            attempts += 1;
            self.register();
            if attempts == 1 {
                self.idle(self.sc.idle_before_punch);
            }
            let issued = self.sim.now();
            first_issue.get_or_insert(issued);
            let start_at = self.issue(attempts);
            let limit = start_at + self.sc.config.attempt_timeout + Duration::from_secs(1);
            self.pump(limit, |w| {
                w.peers
                    .iter()
                    .all(|p| p.success.is_some() || p.failed.is_some())
            });
            for (i, p) in self.peers.iter().enumerate() {
                max_side = max_side.max(p.sm.counters().packets_this_attempt);
                let end = p.success.map(|s| s.2).or(p.failed.map(|f| f.1));
                ended_after_start[i] = end.map(|e| e.saturating_duration_since(start_at));
                retry_requested[i] |= p.retry_after.is_some();
            }
            failures.push([0, 1].map(|i| self.peers[i].failed.map(|f| f.0)));
            if let (Some(a), Some(b)) = (self.peers[0].success, self.peers[1].success) {
                time_to_direct = Some(a.2.max(b.2) - first_issue.unwrap_or(issued));
                direct = self.verify_direct();
                break;
            }
            let wait = self
                .peers
                .iter()
                .filter_map(|p| p.retry_after)
                .max()
                .unwrap_or(Duration::from_secs(1));
            self.idle(wait);
        }
        RunResult {
            direct,
            attempts,
            packets: self
                .peers
                .iter()
                .map(|p| p.sm.counters().total_packets)
                .sum(),
            max_side_attempt_packets: max_side,
            time_to_direct,
            failures,
            ended_after_start,
            retry_requested,
            port_steals: self.sim.stats().port_steals,
        }
    }

    fn idle(&mut self, d: Duration) {
        let until = self.sim.now() + d;
        self.pump(until, |_| false);
    }

    /// Each side sends from socket 0 to the server's two ports, one after the
    /// other (the order matters for a sequential NAT), until both are seen.
    fn register(&mut self) {
        self.observed = [[None; 2]; 2];
        let give_up = self.sim.now() + Duration::from_secs(5);
        while self.observed.iter().flatten().any(Option::is_none) {
            assert!(self.sim.now() < give_up, "registration failed");
            for i in 0..2 {
                if let Some(k) = (0..2).find(|&k| self.observed[i][k].is_none()) {
                    let to = SocketAddr::new(self.server.ip(), SERVER_PORTS[k]);
                    self.sim
                        .send(self.peers[i].host, BASE_PORT, to, vec![b'R', i as u8]);
                }
            }
            let until = self.sim.now() + 100 * MS;
            self.pump(until, |w| w.observed.iter().flatten().all(Option::is_some));
        }
        if let Some(every) = self.sc.keepalive {
            let now = self.sim.now();
            for p in &mut self.peers {
                p.next_keepalive.get_or_insert(now + every);
            }
        }
    }

    /// The control server's decision: which side aims where, with which
    /// prediction, and a common start time after both have the instruction.
    fn issue(&mut self, attempt: u32) -> Instant {
        let obs = [0, 1].map(|i| self.observed[i].map(|o| o.expect("registered")));
        // `None`: no NAT (the server sees the local endpoint itself).
        let class = [0, 1].map(|i| {
            (!obs[i].iter().all(|o| *o == self.peers[i].local)).then(|| classify_mapping(&obs[i]))
        });
        let mut cands: [Vec<SocketAddr>; 2] = [Vec::new(), Vec::new()];
        let mut pred: [Option<PortPrediction>; 2] = [None, None];
        for x in 0..2 {
            let y = 1 - x;
            let peer_ip = obs[y][1].ip();
            match class[y] {
                None | Some(NatMapping::EndpointIndependent) => cands[x].push(obs[y][0]),
                // An open side needs no aim: the symmetric side reaches it directly.
                _ if class[x].is_none() => {}
                Some(NatMapping::Sequential { stride }) => {
                    pred[x] = Some(PortPrediction::Sequential {
                        ip: peer_ip,
                        last_port: obs[y][1].port(),
                        stride,
                        window: self.sc.window,
                    })
                }
                Some(NatMapping::Random | NatMapping::AddressDependent) => {
                    // Aiming at the observed endpoint opens an address-dependent
                    // filter for every port of the peer, which may spare the search.
                    cands[x].push(obs[y][0]);
                    pred[x] = Some(PortPrediction::Random {
                        ip: peer_ip,
                        probes: self.sc.birthday_probes,
                    })
                }
            }
        }
        let is_random =
            |p: &Option<PortPrediction>| matches!(p, Some(PortPrediction::Random { .. }));
        if is_random(&pred[0]) && is_random(&pred[1]) {
            // Both random: the initiator takes the many-sockets side.
            pred[0] = None;
            cands[0] = vec![obs[1][0]];
        }
        let sockets = [0, 1].map(|x| {
            if is_random(&pred[1 - x]) {
                self.sc.birthday_sockets
            } else {
                1
            }
        });
        // The server picks as initiator a side that has something to aim at.
        let idle = |x: usize| cands[x].is_empty() && pred[x].is_none() && sockets[x] == 1;
        let initiator = if idle(0) && !idle(1) { 1 } else { 0 };
        let now = self.sim.now();
        let lat = self.sc.control_latency;
        let start_at = now + lat[0].max(lat[1]) + 20 * MS;
        let attempt_id = self.seed.wrapping_mul(1_000_003) ^ (u64::from(attempt) << 48) ^ 0x5eed;
        for x in 0..2 {
            let p = &mut self.peers[x];
            p.success = None;
            p.failed = None;
            p.retry_after = None;
            let ins = Instruction {
                attempt_id,
                role: if x == initiator {
                    Role::Initiator
                } else {
                    Role::Responder
                },
                start_at,
                peer_candidates: cands[x].clone(),
                prediction: pred[x].clone(),
                local_sockets: sockets[x],
            };
            p.instruction = Some((now + lat[x], ins));
        }
        start_at
    }

    fn verify_direct(&mut self) -> bool {
        for _ in 0..3 {
            for i in 0..2 {
                let p = &self.peers[i];
                if let Some((remote, socket, _)) = p.success {
                    self.sim
                        .send(p.host, BASE_PORT + socket, remote, vec![b'D', i as u8]);
                }
            }
            self.idle(100 * MS);
        }
        self.peers.iter().all(|p| {
            p.success
                .is_some_and(|(remote, socket, _)| p.data_from.contains(&(remote, socket)))
        })
    }

    fn pump(&mut self, until: Instant, stop: impl Fn(&World) -> bool) {
        for _ in 0..2_000_000 {
            if stop(self) {
                return;
            }
            let mut next = self.sim.next_event_time();
            for p in &self.peers {
                next = min_opt(next, p.sm.poll_timeout());
                next = min_opt(next, p.instruction.as_ref().map(|i| i.0));
                next = min_opt(next, p.next_keepalive);
            }
            match next.filter(|&t| t <= until) {
                Some(t) => {
                    let t = t.max(self.sim.now());
                    self.sim.run_until(t);
                    self.service(t);
                }
                None => {
                    self.sim.run_until(until);
                    self.service(until);
                    return;
                }
            }
        }
        panic!("simulation does not make progress");
    }

    fn service(&mut self, now: Instant) {
        let server_host = HostId(0);
        while let Some(d) = self.sim.recv(server_host) {
            if let [b'R', i] = d.payload[..] {
                let k = usize::from(d.to.port() == SERVER_PORTS[1]);
                self.observed[usize::from(i)][k].get_or_insert(d.from);
            }
        }
        let World {
            sim,
            peers,
            sc,
            server,
            ..
        } = self;
        for p in peers.iter_mut() {
            if p.instruction.as_ref().is_some_and(|i| i.0 <= now) {
                let (_, ins) = p.instruction.take().expect("checked");
                p.sm.handle(now, Event::Instruction(ins), &mut p.rng);
            }
            while let Some(d) = sim.recv(p.host) {
                let port = d.to.port();
                if port < BASE_PORT || port - BASE_PORT >= p.sockets {
                    continue; // no socket there
                }
                let socket = port - BASE_PORT;
                if let Some(msg) = ProbeMessage::decode(&d.payload) {
                    p.sm.handle(now, msg.into_event(socket, d.from), &mut p.rng);
                } else if d.payload.first() == Some(&b'D') {
                    p.data_from.push((d.from, socket));
                }
            }
            if p.sm.poll_timeout().is_some_and(|t| t <= now) {
                p.sm.handle(now, Event::Timeout, &mut p.rng);
            }
            while let Some(action) = p.sm.poll_action() {
                match action {
                    Action::OpenSockets { count } => p.sockets = p.sockets.max(count),
                    Action::Succeeded { remote, socket, .. } => {
                        p.success = Some((remote, socket, now))
                    }
                    Action::Failed { reason } => p.failed = Some((reason, now)),
                    Action::RequestRetry { after } => p.retry_after = Some(after),
                    other => {
                        let (socket, to, bytes, ttl) = other.datagram().expect("a send");
                        sim.send_with_ttl(
                            p.host,
                            BASE_PORT + socket,
                            to,
                            bytes,
                            ttl.unwrap_or(DEFAULT_TTL),
                        );
                    }
                }
            }
            if let (Some(t), Some(every)) = (p.next_keepalive, sc.keepalive) {
                if t <= now {
                    sim.send(p.host, BASE_PORT, *server, b"K".to_vec());
                    p.next_keepalive = Some(now + every);
                }
            }
        }
    }
}

/// One run of a pair; `sites[0]` initiates.
pub fn run_pair(sites: [Site; 2], seed: u64, sc: &Scenario) -> RunResult {
    World::new(sites, seed, sc).run()
}

/// Runs `seeds` per pair, alternating which side initiates.
pub fn sweep(a: Site, b: Site, seeds: std::ops::Range<u64>, sc: &Scenario) -> Vec<RunResult> {
    seeds
        .map(|seed| {
            let sites = if seed % 2 == 0 { [a, b] } else { [b, a] };
            run_pair(sites, seed, sc)
        })
        .collect()
}

pub struct Summary {
    pub runs: usize,
    pub direct: usize,
    pub median_packets: u64,
    pub median_ttd: Option<Duration>,
    pub max_side_attempt_packets: u32,
    pub port_steals: u64,
}

impl Summary {
    pub fn of(results: &[RunResult]) -> Summary {
        let mut packets: Vec<u64> = results.iter().map(|r| r.packets).collect();
        packets.sort_unstable();
        let mut ttd: Vec<Duration> = results
            .iter()
            .filter(|r| r.direct)
            .filter_map(|r| r.time_to_direct)
            .collect();
        ttd.sort_unstable();
        Summary {
            runs: results.len(),
            direct: results.iter().filter(|r| r.direct).count(),
            median_packets: packets.get(packets.len() / 2).copied().unwrap_or(0),
            median_ttd: ttd.get(ttd.len() / 2).copied(),
            max_side_attempt_packets: results
                .iter()
                .map(|r| r.max_side_attempt_packets)
                .max()
                .unwrap_or(0),
            port_steals: results.iter().map(|r| r.port_steals).sum(),
        }
    }

    pub fn rate(&self) -> f64 {
        self.direct as f64 / self.runs.max(1) as f64
    }
}
