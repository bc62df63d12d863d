//! The per-link hole-punch state machine.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::Rng;

use super::wire::{ProbeKind, ProbeMessage};
use crate::port_prediction::PortPrediction;

/// Probe targets kept per attempt (candidates, predicted ports, and peers
/// that probed us); more would only spend the budget on guesses.
const MAX_TARGETS: usize = 64;
/// Queued answers; a flood beyond this is dropped rather than buffered.
const MAX_URGENT: usize = 256;

/// Which side of the coordinated attempt this is. As in seed 002 the
/// responder (callee) opens its NAT and answers; the initiator (caller) sends
/// directly. The responder starts probing on its own only a little later, for
/// the case where the initiator's probes cannot reach it. Several pairs may
/// work (predicted windows, many sockets), so the initiator alone picks one
/// and nominates it; the responder takes the nominated pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Sustained send rate over all packets of this link.
    pub max_packets_per_second: u32,
    /// Packets that may go out at once, e.g. the opening packets of many sockets.
    pub burst: u32,
    /// Every packet of one attempt counts: opening packets, probes and acks.
    pub max_packets_per_attempt: u32,
    pub attempt_timeout: Duration,
    /// Time from `start_at` (opening packets) to the first direct probe: the
    /// opening packets must have passed the own NAT before the peer's probes
    /// arrive there, or a router without WAN firewall lets them take the port.
    pub open_delay: Duration,
    /// Extra wait before a responder probes on its own.
    pub responder_delay: Duration,
    /// Wait after the first probe before a birthday search, so that a cheap
    /// path (the peer's filter lets socket 0 in) wins first. The many-sockets
    /// side opens its extra sockets halfway, the other side probes after it.
    pub birthday_delay: Duration,
    /// Retransmission of the fixed targets: starts here, doubles up to the max.
    pub retransmit_initial: Duration,
    pub retransmit_max: Duration,
    /// TTL of the opening ("null") packets: enough to pass the own NAT, too
    /// little to reach the peer's. `None` sends no opening packets.
    pub null_ttl: Option<u8>,
    /// How long to wait for late answers once the budget is spent.
    pub budget_grace: Duration,
    /// Failed attempts in a row after which no retry is requested.
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_packets_per_second: 1000,
            burst: 300,
            max_packets_per_attempt: 2000,
            attempt_timeout: Duration::from_secs(5),
            open_delay: Duration::from_millis(50),
            responder_delay: Duration::from_millis(100),
            birthday_delay: Duration::from_millis(200),
            retransmit_initial: Duration::from_millis(100),
            retransmit_max: Duration::from_millis(800),
            null_ttl: Some(2),
            budget_grace: Duration::from_millis(500),
            max_attempts: 4,
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(30),
        }
    }
}

/// What the control server tells each side for one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    /// Unguessable, chosen by the control server; carried in every probe.
    pub attempt_id: u64,
    pub role: Role,
    /// When both sides send their opening packets (same instant on both).
    pub start_at: Instant,
    /// The peer's endpoints as the server saw or the peer reported them.
    pub peer_candidates: Vec<SocketAddr>,
    /// Where the peer's symmetric NAT will put it, if it is symmetric.
    pub prediction: Option<PortPrediction>,
    /// Sockets to use; more than one only on the random-symmetric side of a
    /// birthday search. Socket 0 is the one the server observed.
    pub local_sockets: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Instruction(Instruction),
    /// A probe arrived on local socket `socket`; `nominate` when the
    /// initiator picks this pair.
    ProbeReceived {
        socket: u16,
        from: SocketAddr,
        attempt_id: u64,
        nonce: u64,
        nominate: bool,
    },
    ProbeAckReceived {
        socket: u16,
        from: SocketAddr,
        attempt_id: u64,
        nonce: u64,
    },
    /// The time from [`HolePunch::poll_timeout`] has come.
    Timeout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    Timeout,
    BudgetExhausted,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Make sure sockets `0..count` exist (bound to distinct local ports).
    OpenSockets {
        count: u16,
    },
    /// `ttl: Some(_)` marks an opening packet that should die in transit.
    SendProbe {
        socket: u16,
        to: SocketAddr,
        attempt_id: u64,
        nonce: u64,
        ttl: Option<u8>,
        nominate: bool,
    },
    SendProbeAck {
        socket: u16,
        to: SocketAddr,
        attempt_id: u64,
        nonce: u64,
    },
    /// The direct path is `socket` <-> `remote`, the same pair on both
    /// sides. Other sockets of the attempt may be closed. `rtt` is `None`
    /// when this side never timed a round trip on that pair (a responder
    /// nominated before its own probe there was answered).
    Succeeded {
        remote: SocketAddr,
        socket: u16,
        rtt: Option<Duration>,
    },
    Failed {
        reason: FailReason,
    },
    /// Ask the control server for another coordinated attempt after this long.
    RequestRetry {
        after: Duration,
    },
}

impl Action {
    /// The datagram to send, for drivers: (socket, destination, bytes, TTL).
    pub fn datagram(&self) -> Option<(u16, SocketAddr, Vec<u8>, Option<u8>)> {
        let (socket, to, kind, attempt_id, nonce, ttl) = match *self {
            Action::SendProbe {
                socket,
                to,
                attempt_id,
                nonce,
                ttl,
                nominate,
            } => {
                let kind = if nominate {
                    ProbeKind::Nominate
                } else {
                    ProbeKind::Probe
                };
                (socket, to, kind, attempt_id, nonce, ttl)
            }
            Action::SendProbeAck {
                socket,
                to,
                attempt_id,
                nonce,
            } => (socket, to, ProbeKind::Ack, attempt_id, nonce, None),
            _ => return None,
        };
        let msg = ProbeMessage {
            kind,
            attempt_id,
            nonce,
        };
        Some((socket, to, msg.encode(), ttl))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// Instructed; waiting for `start_at`.
    Waiting,
    Punching,
    /// Direct path found; still answers the peer's probes.
    Connected {
        remote: SocketAddr,
        socket: u16,
    },
    Failed(FailReason),
}

/// Everything sent and received, for tests, metrics and status reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub attempts: u32,
    pub packets_this_attempt: u32,
    pub total_packets: u64,
    pub opening_sent: u64,
    /// Full probes, including the birthday ones.
    pub probes_sent: u64,
    pub birthday_probes_sent: u64,
    pub acks_sent: u64,
    pub probes_received: u64,
    pub acks_received: u64,
    /// Messages for another attempt, unknown nonces, duplicates.
    pub ignored: u64,
    /// Times sending stopped to wait for the rate limit.
    pub rate_limited: u64,
}

#[derive(Clone, Copy, Debug)]
enum Out {
    Opening {
        socket: u16,
        to: SocketAddr,
    },
    Probe {
        socket: u16,
        to: SocketAddr,
        nominate: bool,
    },
    Ack {
        socket: u16,
        to: SocketAddr,
        nonce: u64,
    },
}

struct Birthday {
    ip: IpAddr,
    remaining: u32,
    tried: HashSet<u16>,
}

struct Attempt {
    id: u64,
    role: Role,
    start_at: Instant,
    probe_at: Instant,
    birthday_at: Instant,
    deadline: Instant,
    /// (local socket, remote) probed every round.
    targets: Vec<(u16, SocketAddr)>,
    /// Where the extra sockets send their opening packets.
    anchor: Option<SocketAddr>,
    extra_sockets: u16,
    extra_open_at: Instant,
    extra_opened: bool,
    birthday: Option<Birthday>,
    next_round: Option<Instant>,
    interval: Duration,
    /// nonce -> (sent at, socket, destination, nominating) of every full probe.
    sent: HashMap<u64, (Instant, u16, SocketAddr, bool)>,
    /// First pair whose probe was answered, with its RTT.
    valid: Option<(u16, SocketAddr, Duration)>,
    /// The pair the initiator nominates.
    nominated: Option<(u16, SocketAddr)>,
    urgent: VecDeque<Out>,
    opening: VecDeque<Out>,
    round: VecDeque<Out>,
    packets: u32,
    exhausted_at: Option<Instant>,
}

impl Attempt {
    /// Drops all queued or scheduled probing; answers still go out.
    fn stop_search(&mut self) {
        self.opening.clear();
        self.round.clear();
        self.birthday = None;
        self.next_round = None;
        self.extra_opened = true;
    }
}

/// Sans-IO hole punching for one peer link. Feed [`Event`]s with the time
/// they happen, take [`Action`]s with [`poll_action`](Self::poll_action), and
/// call again with [`Event::Timeout`] at [`poll_timeout`](Self::poll_timeout).
/// No I/O, no clock, no randomness but the RNG handed in.
pub struct HolePunch {
    cfg: Config,
    phase: Phase,
    attempt: Option<Attempt>,
    failures: u32,
    /// Token bucket in nanoseconds of send credit; a packet costs `cost_ns`.
    credit_ns: u64,
    cost_ns: u64,
    now: Option<Instant>,
    counters: Counters,
    actions: VecDeque<Action>,
}

impl HolePunch {
    pub fn new(cfg: Config) -> Self {
        let cost_ns = 1_000_000_000 / u64::from(cfg.max_packets_per_second.max(1));
        let credit_ns = cost_ns * u64::from(cfg.burst.max(1));
        Self {
            cfg,
            phase: Phase::Idle,
            attempt: None,
            failures: 0,
            credit_ns,
            cost_ns,
            now: None,
            counters: Counters::default(),
            actions: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn handle<R: Rng + ?Sized>(&mut self, now: Instant, event: Event, rng: &mut R) {
        let now = self.refill(now);
        match event {
            Event::Instruction(ins) => self.start(ins),
            Event::ProbeReceived {
                socket,
                from,
                attempt_id,
                nonce,
                nominate,
            } => self.on_probe(socket, from, attempt_id, nonce, nominate),
            Event::ProbeAckReceived {
                socket,
                from,
                attempt_id,
                nonce,
            } => self.on_ack(now, socket, from, attempt_id, nonce),
            Event::Timeout => {}
        }
        self.drive(now, rng);
    }

    /// When to call back with [`Event::Timeout`]; `None` when nothing is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let a = self.attempt.as_ref()?;
        let now = self.now?;
        let mut at: Option<Instant> = None;
        let mut consider = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        match self.phase {
            Phase::Idle | Phase::Failed(_) => return None,
            Phase::Waiting => consider(a.start_at),
            Phase::Punching => {
                consider(a.deadline);
                if let Some(t) = a.exhausted_at {
                    consider(t + self.cfg.budget_grace);
                }
                if let Some(t) = a.next_round {
                    consider(t);
                }
                if a.birthday.as_ref().is_some_and(|b| b.remaining > 0) && now < a.birthday_at {
                    consider(a.birthday_at);
                }
                if !a.extra_opened {
                    consider(a.extra_open_at);
                }
            }
            Phase::Connected { .. } => {}
        }
        if a.packets < self.cfg.max_packets_per_attempt && self.has_work(now) {
            let wait = self.cost_ns.saturating_sub(self.credit_ns);
            consider(now + Duration::from_nanos(wait));
        }
        at
    }

    /// Adds the credit earned since the last event; returns the effective
    /// time (never earlier than a time already seen).
    fn refill(&mut self, now: Instant) -> Instant {
        let now = match self.now {
            Some(last) if last >= now => return last,
            Some(last) => {
                let earned = (now - last).as_nanos().min(u128::from(u64::MAX)) as u64;
                let cap = self.cost_ns * u64::from(self.cfg.burst.max(1));
                self.credit_ns = self.credit_ns.saturating_add(earned).min(cap);
                now
            }
            None => now,
        };
        self.now = Some(now);
        now
    }

    fn start(&mut self, ins: Instruction) {
        if self
            .attempt
            .as_ref()
            .is_some_and(|a| a.id == ins.attempt_id)
        {
            self.counters.ignored += 1;
            return;
        }
        self.counters.attempts += 1;
        self.counters.packets_this_attempt = 0;
        let mut targets: Vec<(u16, SocketAddr)> = Vec::new();
        let predicted = ins
            .prediction
            .as_ref()
            .map(|p| p.targets())
            .unwrap_or_default();
        for t in ins.peer_candidates.iter().chain(predicted.iter()) {
            if targets.len() < MAX_TARGETS && !targets.contains(&(0, *t)) {
                targets.push((0, *t));
            }
        }
        let birthday = match ins.prediction {
            Some(PortPrediction::Random { ip, probes }) => Some(Birthday {
                ip,
                remaining: probes.min(self.cfg.max_packets_per_attempt),
                tried: HashSet::new(),
            }),
            _ => None,
        };
        // Either side of a birthday search probes at once; it is no answer-only job.
        let birthday_side = birthday.is_some() || ins.local_sockets > 1;
        let mut probe_at = ins.start_at + self.cfg.open_delay;
        if ins.role == Role::Responder && !birthday_side {
            probe_at += self.cfg.responder_delay;
        }
        self.attempt = Some(Attempt {
            id: ins.attempt_id,
            role: ins.role,
            start_at: ins.start_at,
            probe_at,
            birthday_at: probe_at + self.cfg.birthday_delay,
            deadline: ins.start_at + self.cfg.attempt_timeout,
            anchor: targets.first().map(|t| t.1),
            targets,
            extra_sockets: ins.local_sockets.saturating_sub(1),
            extra_open_at: probe_at + self.cfg.birthday_delay / 2,
            extra_opened: ins.local_sockets <= 1,
            birthday,
            next_round: None,
            interval: self.cfg.retransmit_initial,
            sent: HashMap::new(),
            valid: None,
            nominated: None,
            urgent: VecDeque::new(),
            opening: VecDeque::new(),
            round: VecDeque::new(),
            packets: 0,
            exhausted_at: None,
        });
        self.phase = Phase::Waiting;
    }

    fn current(&mut self, attempt_id: u64) -> Option<&mut Attempt> {
        self.attempt.as_mut().filter(|a| a.id == attempt_id)
    }

    fn on_probe(
        &mut self,
        socket: u16,
        from: SocketAddr,
        attempt_id: u64,
        nonce: u64,
        nominate: bool,
    ) {
        self.counters.probes_received += 1;
        let phase = self.phase;
        let live = matches!(
            phase,
            Phase::Waiting | Phase::Punching | Phase::Connected { .. }
        );
        let Some(a) = self.current(attempt_id).filter(|_| live) else {
            self.counters.ignored += 1;
            return;
        };
        if a.urgent.len() >= MAX_URGENT {
            self.counters.ignored += 1;
            return;
        }
        a.urgent.push_back(Out::Ack {
            socket,
            to: from,
            nonce,
        });
        let connected = matches!(phase, Phase::Connected { .. });
        if nominate && a.role == Role::Responder {
            if !connected {
                let rtt = a
                    .valid
                    .filter(|v| (v.0, v.1) == (socket, from))
                    .map(|v| v.2);
                a.stop_search();
                self.phase = Phase::Connected {
                    remote: from,
                    socket,
                };
                self.failures = 0;
                self.actions.push_back(Action::Succeeded {
                    remote: from,
                    socket,
                    rtt,
                });
            }
            return;
        }
        // The peer reached us from here: probe back along the same pair (a
        // triggered check, as in ICE), which also covers addresses nobody predicted.
        if !connected
            && a.valid.is_none()
            && a.targets.len() < MAX_TARGETS
            && !a.targets.contains(&(socket, from))
        {
            a.targets.push((socket, from));
            a.urgent.push_back(Out::Probe {
                socket,
                to: from,
                nominate: false,
            });
        }
    }

    fn on_ack(&mut self, now: Instant, socket: u16, from: SocketAddr, attempt_id: u64, nonce: u64) {
        self.counters.acks_received += 1;
        let punching = matches!(self.phase, Phase::Waiting | Phase::Punching);
        let retransmit = self.cfg.retransmit_initial;
        let Some(a) = self.current(attempt_id).filter(|_| punching) else {
            self.counters.ignored += 1;
            return;
        };
        let Some(&(sent_at, s, to, nominating)) =
            a.sent.get(&nonce).filter(|e| e.1 == socket && e.2 == from)
        else {
            self.counters.ignored += 1;
            return;
        };
        let rtt = now.saturating_duration_since(sent_at);
        if nominating {
            a.stop_search();
            self.phase = Phase::Connected {
                remote: to,
                socket: s,
            };
            self.failures = 0;
            self.actions.push_back(Action::Succeeded {
                remote: to,
                socket: s,
                rtt: Some(rtt),
            });
            return;
        }
        if a.valid.is_some() {
            return;
        }
        // A working pair: stop searching. The initiator nominates it; the
        // responder waits for the initiator's nomination.
        a.valid = Some((s, to, rtt));
        a.stop_search();
        if a.role == Role::Initiator {
            a.nominated = Some((s, to));
            a.urgent.push_back(Out::Probe {
                socket: s,
                to,
                nominate: true,
            });
            a.interval = retransmit;
            a.next_round = Some(now + retransmit);
        }
    }

    fn drive<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) {
        let null_ttl = self.cfg.null_ttl;
        let Some(a) = self.attempt.as_mut() else {
            return;
        };
        if self.phase == Phase::Waiting && now >= a.start_at {
            self.phase = Phase::Punching;
            if null_ttl.is_some() {
                for &(socket, to) in &a.targets {
                    a.opening.push_back(Out::Opening { socket, to });
                }
            }
            a.next_round = Some(a.probe_at);
        }
        if self.phase == Phase::Punching && !a.extra_opened && now >= a.extra_open_at {
            a.extra_opened = true;
            if let Some(to) = a.anchor.filter(|_| a.extra_sockets > 0) {
                self.actions.push_back(Action::OpenSockets {
                    count: a.extra_sockets + 1,
                });
                for socket in 1..=a.extra_sockets {
                    a.opening.push_back(if null_ttl.is_some() {
                        Out::Opening { socket, to }
                    } else {
                        Out::Probe {
                            socket,
                            to,
                            nominate: false,
                        }
                    });
                }
            }
        }
        if self.phase == Phase::Punching {
            if now >= a.deadline {
                return self.fail(FailReason::Timeout, rng);
            }
            if a.exhausted_at
                .is_some_and(|t| now >= t + self.cfg.budget_grace)
            {
                return self.fail(FailReason::BudgetExhausted, rng);
            }
            if a.next_round.is_some_and(|t| now >= t) {
                if a.round.is_empty() {
                    if let Some((socket, to)) = a.nominated {
                        a.round.push_back(Out::Probe {
                            socket,
                            to,
                            nominate: true,
                        });
                    } else if a.valid.is_none() {
                        let round = a.targets.iter().map(|&(socket, to)| Out::Probe {
                            socket,
                            to,
                            nominate: false,
                        });
                        a.round.extend(round);
                    }
                }
                a.next_round = Some(now + a.interval);
                a.interval = (a.interval * 2).min(self.cfg.retransmit_max);
            }
        }
        self.flush(now, rng);
    }

    fn has_work(&self, now: Instant) -> bool {
        let Some(a) = self.attempt.as_ref() else {
            return false;
        };
        let punching = self.phase == Phase::Punching;
        !a.urgent.is_empty()
            || (punching
                && (!a.opening.is_empty()
                    || !a.round.is_empty()
                    || (now >= a.birthday_at
                        && a.birthday.as_ref().is_some_and(|b| b.remaining > 0))))
    }

    fn flush<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) {
        let max = self.cfg.max_packets_per_attempt;
        loop {
            if self.attempt.as_ref().is_none_or(|a| a.packets >= max) {
                if let Some(a) = self.attempt.as_mut() {
                    a.exhausted_at.get_or_insert(now);
                }
                return;
            }
            if !self.has_work(now) {
                return;
            }
            if self.credit_ns < self.cost_ns {
                self.counters.rate_limited += 1;
                return;
            }
            let Some(a) = self.attempt.as_mut() else {
                return;
            };
            let out = match a
                .urgent
                .pop_front()
                .or_else(|| a.opening.pop_front())
                .or_else(|| a.round.pop_front())
            {
                Some(out) => out,
                None => {
                    let Some(b) = a.birthday.as_mut() else {
                        return;
                    };
                    b.remaining -= 1;
                    let mut port = rng.gen_range(1024..=u16::MAX);
                    for _ in 0..32 {
                        if b.tried.insert(port) {
                            break;
                        }
                        port = rng.gen_range(1024..=u16::MAX);
                    }
                    self.counters.birthday_probes_sent += 1;
                    Out::Probe {
                        socket: 0,
                        to: SocketAddr::new(b.ip, port),
                        nominate: false,
                    }
                }
            };
            self.credit_ns -= self.cost_ns;
            a.packets += 1;
            self.counters.packets_this_attempt = a.packets;
            self.counters.total_packets += 1;
            let attempt_id = a.id;
            let action = match out {
                Out::Opening { socket, to } => {
                    self.counters.opening_sent += 1;
                    Action::SendProbe {
                        socket,
                        to,
                        attempt_id,
                        nonce: rng.next_u64(),
                        ttl: self.cfg.null_ttl,
                        nominate: false,
                    }
                }
                Out::Probe {
                    socket,
                    to,
                    nominate,
                } => {
                    self.counters.probes_sent += 1;
                    let nonce = rng.next_u64();
                    a.sent.insert(nonce, (now, socket, to, nominate));
                    Action::SendProbe {
                        socket,
                        to,
                        attempt_id,
                        nonce,
                        ttl: None,
                        nominate,
                    }
                }
                Out::Ack { socket, to, nonce } => {
                    self.counters.acks_sent += 1;
                    Action::SendProbeAck {
                        socket,
                        to,
                        attempt_id,
                        nonce,
                    }
                }
            };
            self.actions.push_back(action);
        }
    }

    fn fail<R: Rng + ?Sized>(&mut self, reason: FailReason, rng: &mut R) {
        self.phase = Phase::Failed(reason);
        if let Some(a) = self.attempt.as_mut() {
            a.stop_search();
            a.urgent.clear();
        }
        self.failures += 1;
        self.actions.push_back(Action::Failed { reason });
        if self.failures < self.cfg.max_attempts {
            let doubling = 1u32 << (self.failures - 1).min(16);
            let base = self
                .cfg
                .retry_backoff
                .saturating_mul(doubling)
                .min(self.cfg.retry_backoff_max);
            // Jitter keeps many links that failed together from retrying together.
            let jitter_ms =
                rng.gen_range(0..=base.as_millis().min(u128::from(u64::MAX)) as u64 / 4);
            self.actions.push_back(Action::RequestRetry {
                after: base + Duration::from_millis(jitter_ms),
            });
        }
    }
}
