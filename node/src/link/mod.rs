//! One isolated worker per peer link (seed 004): it owns the link's
//! [`PathSwitch`], one stream per libp2p connection to the peer (relayed or
//! direct), and bounded queues, so a failing or flooding peer stalls only its
//! own worker.
//!
//! Each stream is a path. Frames are length-prefixed on the stream; the path
//! switch numbers, acknowledges and, on a path change, resends messages, so
//! the application sees one exactly-once, in-order stream.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::swarm::{ConnectionId, Stream};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::mesh::channel::{Sinks, Undelivered};
use crate::path_switch::{self, PathId, PathSwitch};
use crate::status::PathKind;
use crate::swarm::Command as SwarmCommand;

/// Largest frame accepted on a stream (a full message plus headers).
const MAX_FRAME: usize = path_switch::MAX_PAYLOAD + 64;
/// Frames queued towards one path's writer.
const WRITER_QUEUE: usize = 256;
/// A path whose writer cannot take a frame for this long is declared dead.
const WRITE_STALL: Duration = Duration::from_secs(3);
/// Application messages held beyond the path switch's own window.
const PENDING_LIMIT: usize = 1024;
/// How often a link with no path asks the swarm to dial again.
const REDIAL: Duration = Duration::from_millis(500);
/// First wait before redialing after a failed dial; doubles per failure.
const QUICK_REDIAL: Duration = Duration::from_millis(50);
/// Quick redials before only the [`REDIAL`] tick is left.
const QUICK_REDIALS: u32 = 3;
/// Waits between coordinated punch attempts while no direct path exists:
/// the first goes out as soon as the relayed path is up, later ones
/// back off to this cap. The second attempt is the one that falls back to
/// probe sockets when the QUIC socket's punch did not work (a router
/// without WAN firewall), so it comes after half a second, not later.
const PUNCH_BACKOFF_FIRST: Duration = Duration::from_millis(500);
const PUNCH_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Pings (one every 500 ms) over which loss is reported: the last 10 s.
const PING_WINDOW: usize = 20;

#[derive(Debug)]
pub enum LinkInput {
    /// Addresses to reach the peer at: circuits through relay servers, and
    /// circuits through members that forward (best forwarder first).
    Addresses {
        relay: Vec<Multiaddr>,
        forwarded: Vec<Multiaddr>,
    },
    Connected {
        connection: ConnectionId,
        kind: path_switch::PathKind,
        /// The relay server or forwarding member of a relayed connection.
        via: Option<PeerId>,
    },
    Disconnected {
        connection: ConnectionId,
    },
    Stream {
        connection: ConnectionId,
        stream: Stream,
    },
    /// A ping's RTT on a connection, or `None`: it timed out.
    Rtt {
        connection: ConnectionId,
        rtt: Option<Duration>,
    },
    /// From a path's reader task.
    Frame {
        path: PathId,
        frame: Vec<u8>,
    },
    PathClosed {
        path: PathId,
        reason: String,
    },
    /// A dial to the peer failed (e.g. the relay did not know the peer yet).
    DialFailed,
}

/// What a link reports to the node (status, control server).
#[derive(Clone, Debug, PartialEq)]
pub struct LinkStatus {
    pub path: PathKind,
    pub rtt_ms: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub malformed: u64,
    /// The relay or forwarding member the active path goes through.
    pub via: Option<PeerId>,
    /// Fraction of the active connection's last pings that timed out (1 s).
    pub loss: f64,
    /// Messages for a channel that no service on this node consumes.
    pub undeliverable: u64,
}

impl Default for LinkStatus {
    fn default() -> Self {
        Self {
            path: PathKind::Connecting,
            rtt_ms: None,
            bytes_in: 0,
            bytes_out: 0,
            malformed: 0,
            via: None,
            loss: 0.0,
            undeliverable: 0,
        }
    }
}

#[derive(Debug)]
pub enum LinkOutput {
    Status(PeerId, LinkStatus),
    /// No direct path: ask the control server to coordinate a punch.
    PunchWanted(PeerId),
}

pub struct LinkHandle {
    pub input: mpsc::Sender<LinkInput>,
    pub send: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct PathEntry {
    connection: ConnectionId,
    kind: path_switch::PathKind,
    writer: mpsc::Sender<Bytes>,
}

struct Worker {
    me: PeerId,
    peer: PeerId,
    switch: PathSwitch,
    swarm: mpsc::Sender<SwarmCommand>,
    out: mpsc::Sender<LinkOutput>,
    sinks: Sinks,
    inputs_tx: mpsc::Sender<LinkInput>,
    addresses: Vec<Multiaddr>,
    forwarded: Vec<Multiaddr>,
    connections: HashMap<ConnectionId, (path_switch::PathKind, Option<PeerId>)>,
    paths: HashMap<PathId, PathEntry>,
    rtts: HashMap<ConnectionId, Duration>,
    /// Outcomes of the last [`PING_WINDOW`] pings per connection.
    pings: HashMap<ConnectionId, VecDeque<bool>>,
    next_path: u32,
    pending: VecDeque<Bytes>,
    status: LinkStatus,
    last_status_sent: Option<(LinkStatus, Instant)>,
    last_dial: Option<Instant>,
    /// Whether this link asks the control server for punches.
    control_punch: bool,
    punch_attempts: u32,
    next_punch: Option<Instant>,
    forward_attempts: u32,
    next_forward: Option<Instant>,
    /// A redial sooner than the [`REDIAL`] tick after a failed dial, while
    /// the link has no connection: the first byte should not wait 500 ms
    /// because the relay learnt of the peer a moment after we did.
    quick_redial: Option<Instant>,
    quick_redials: u32,
}

pub fn spawn(
    me: PeerId,
    peer: PeerId,
    swarm: mpsc::Sender<SwarmCommand>,
    out: mpsc::Sender<LinkOutput>,
    sinks: Sinks,
    control_punch: bool,
) -> LinkHandle {
    let (input_tx, input_rx) = mpsc::channel(1024);
    let (send_tx, send_rx) = mpsc::channel(256);
    let worker = Worker {
        me,
        peer,
        switch: PathSwitch::new(path_switch::Config {
            max_message_size: crate::mesh::channel::MAX_MESSAGE + 1,
            liveness: Some(path_switch::Liveness::default()),
            ..path_switch::Config::default()
        }),
        swarm,
        out,
        sinks,
        inputs_tx: input_tx.clone(),
        addresses: Vec::new(),
        forwarded: Vec::new(),
        connections: HashMap::new(),
        paths: HashMap::new(),
        rtts: HashMap::new(),
        pings: HashMap::new(),
        next_path: 0,
        pending: VecDeque::new(),
        status: LinkStatus::default(),
        last_status_sent: None,
        last_dial: None,
        control_punch,
        punch_attempts: 0,
        next_punch: None,
        forward_attempts: 0,
        next_forward: None,
        quick_redial: None,
        quick_redials: 0,
    };
    let task = tokio::spawn(worker.run(input_rx, send_rx));
    LinkHandle {
        input: input_tx,
        send: send_tx,
        task,
    }
}

fn has(
    connections: &HashMap<ConnectionId, (path_switch::PathKind, Option<PeerId>)>,
    kind: path_switch::PathKind,
) -> bool {
    connections.values().any(|(k, _)| *k == kind)
}

impl Worker {
    /// The side with the smaller id dials and opens streams, so two nodes
    /// that learn of each other at once build one circuit, not two.
    fn leads(&self) -> bool {
        self.me.to_bytes() < self.peer.to_bytes()
    }

    async fn run(mut self, mut inputs: mpsc::Receiver<LinkInput>, mut app: mpsc::Receiver<Bytes>) {
        let mut redial = tokio::time::interval(REDIAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.flush().await {
                return;
            }
            let timeout = self.switch.poll_timeout();
            let sleep = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let accept_app = self.pending.len() < PENDING_LIMIT;
            let quick = self.quick_redial;
            let quick_redial = async {
                match quick {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            // The next punch goes out when due, not at the next redial tick.
            let punch_due = self.next_punch.filter(|_| self.wants_punch());
            let punch_timer = async {
                match punch_due {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(i) => self.on_input(i).await,
                    None => return,
                },
                msg = app.recv(), if accept_app => match msg {
                    Some(m) => {
                        self.pending.push_back(m);
                        if self.connections.is_empty() {
                            self.maybe_dial().await;
                        }
                    }
                    None => return,
                },
                _ = sleep => self.switch.handle_timeout(Instant::now()),
                _ = quick_redial => {
                    self.quick_redial = None;
                    self.maybe_dial().await;
                }
                _ = punch_timer => self.maybe_punch().await,
                _ = redial.tick() => {
                    self.maybe_dial().await;
                    self.maybe_punch().await;
                    self.maybe_forward().await;
                }
            }
        }
    }

    async fn maybe_dial(&mut self) {
        if !self.connections.is_empty() || self.addresses.is_empty() {
            return;
        }
        // The follower dials too when the leader has not for a while, and
        // at once when it has something to send: the first byte to a new
        // peer waits for nobody (seed 000).
        let waiting = !self.pending.is_empty() || self.switch.unacked() > 0;
        let patience = if self.leads() || waiting {
            Duration::ZERO
        } else {
            REDIAL * 4
        };
        let now = Instant::now();
        let first = *self.last_dial.get_or_insert(now);
        if now.duration_since(first) < patience {
            return;
        }
        let _ = self
            .swarm
            .send(SwarmCommand::Connect {
                peer: self.peer,
                addrs: self.addresses.clone(),
            })
            .await;
    }

    /// The leader asks for a coordinated punch while the peer is reachable
    /// through a relay but not directly; the follower is the callee.
    /// Whether this side should be punching: it leads, and the peer is
    /// reachable through a relay but not directly.
    fn wants_punch(&self) -> bool {
        let direct = has(&self.connections, path_switch::PathKind::Direct);
        let relayed = !self.connections.is_empty() && !direct;
        self.control_punch && self.leads() && relayed
    }

    async fn maybe_punch(&mut self) {
        if !self.wants_punch() {
            return;
        }
        let now = Instant::now();
        if self.next_punch.is_some_and(|t| now < t) {
            return;
        }
        let wait = PUNCH_BACKOFF_FIRST
            .checked_mul(1 << self.punch_attempts.min(5))
            .map_or(PUNCH_BACKOFF_MAX, |d| d.min(PUNCH_BACKOFF_MAX));
        self.punch_attempts += 1;
        self.next_punch = Some(now + wait);
        tracing::debug!(peer = %self.peer, attempt = self.punch_attempts, "asking for a coordinated punch");
        let _ = self.out.send(LinkOutput::PunchWanted(self.peer)).await;
    }

    /// With no direct path, go through the best member that forwards
    /// (seed 004) rather than a relay server; either side may dial.
    async fn maybe_forward(&mut self) {
        use path_switch::PathKind::{Direct, Forwarded};
        if self.forwarded.is_empty()
            || has(&self.connections, Direct)
            || has(&self.connections, Forwarded)
        {
            return;
        }
        let now = Instant::now();
        if self.next_forward.is_some_and(|t| now < t) {
            return;
        }
        let wait = Duration::from_secs(2)
            .checked_mul(1 << self.forward_attempts.min(3))
            .unwrap_or(Duration::from_secs(16));
        self.forward_attempts += 1;
        self.next_forward = Some(now + wait);
        let addr = self.forwarded[0].clone();
        tracing::debug!(peer = %self.peer, %addr, "dialing through a forwarding member");
        let _ = self
            .swarm
            .send(SwarmCommand::DialVia {
                peer: self.peer,
                addr,
            })
            .await;
    }

    /// A direct path went away: the next punch goes out at once.
    fn direct_lost(&mut self) {
        self.punch_attempts = 0;
        self.next_punch = None;
    }

    async fn on_input(&mut self, input: LinkInput) {
        let now = Instant::now();
        match input {
            LinkInput::Addresses { relay, forwarded } => {
                let changed = self.addresses != relay;
                self.addresses = relay;
                if self.forwarded.first() != forwarded.first() {
                    self.forward_attempts = 0;
                    self.next_forward = None;
                }
                self.forwarded = forwarded;
                if changed {
                    self.maybe_dial().await;
                }
                self.maybe_forward().await;
            }
            LinkInput::Connected {
                connection,
                kind,
                via,
            } => {
                tracing::debug!(peer = %self.peer, ?connection, ?kind, ?via, "connection up");
                self.connections.insert(connection, (kind, via));
                self.quick_redial = None;
                self.quick_redials = 0;
                if self.leads() {
                    let _ = self
                        .swarm
                        .send(SwarmCommand::OpenStream {
                            peer: self.peer,
                            connection,
                        })
                        .await;
                }
            }
            LinkInput::Disconnected { connection } => {
                match self.connections.remove(&connection) {
                    Some((path_switch::PathKind::Direct, _)) => self.direct_lost(),
                    Some((path_switch::PathKind::Forwarded, _)) => {
                        self.forward_attempts = 0;
                        self.next_forward = None;
                    }
                    _ => {}
                }
                self.rtts.remove(&connection);
                self.pings.remove(&connection);
                let dead: Vec<PathId> = self
                    .paths
                    .iter()
                    .filter(|(_, p)| p.connection == connection)
                    .map(|(id, _)| *id)
                    .collect();
                for id in dead {
                    self.close_path(id, "connection closed", now);
                }
            }
            LinkInput::Stream { connection, stream } => {
                // A stream may beat its connection's event; relay is the
                // safe guess, corrected never (it is only a preference).
                let kind = self
                    .connections
                    .get(&connection)
                    .map_or(path_switch::PathKind::Relay, |(k, _)| *k);
                self.add_path(connection, kind, stream, now);
                // The punch is asked for once the relayed path carries the
                // link, so that the relay is always the first path up.
                if kind != path_switch::PathKind::Direct {
                    self.maybe_punch().await;
                }
            }
            LinkInput::Rtt { connection, rtt } => {
                if let Some(rtt) = rtt {
                    self.rtts.insert(connection, rtt);
                }
                let log = self.pings.entry(connection).or_default();
                if log.len() == PING_WINDOW {
                    log.pop_front();
                }
                log.push_back(rtt.is_some());
            }
            LinkInput::Frame { path, frame } => {
                self.status.bytes_in += frame.len() as u64;
                if let Err(e) = self.switch.on_frame(path, &frame, now) {
                    self.status.malformed += 1;
                    tracing::debug!(peer = %self.peer, error = %e, "malformed frame dropped");
                }
            }
            LinkInput::PathClosed { path, reason } => self.close_path(path, &reason, now),
            LinkInput::DialFailed => {
                // 50, 100, 200 ms; then the regular tick.
                if self.connections.is_empty()
                    && self.quick_redial.is_none()
                    && self.quick_redials < QUICK_REDIALS
                {
                    self.quick_redial = Some(now + QUICK_REDIAL * (1 << self.quick_redials));
                    self.quick_redials += 1;
                }
            }
        }
    }

    fn add_path(
        &mut self,
        connection: ConnectionId,
        kind: path_switch::PathKind,
        stream: Stream,
        now: Instant,
    ) {
        let id = PathId(self.next_path);
        self.next_path += 1;
        let (mut rd, mut wr) = stream.split();
        let (wtx, mut wrx) = mpsc::channel::<Bytes>(WRITER_QUEUE);
        let inputs = self.inputs_tx.clone();
        // Reader: frames in, until the stream ends.
        tokio::spawn(async move {
            let reason = loop {
                let mut len = [0u8; 4];
                if let Err(e) = rd.read_exact(&mut len).await {
                    break e.to_string();
                }
                let len = u32::from_be_bytes(len) as usize;
                if len > MAX_FRAME {
                    break format!("frame of {len} bytes exceeds {MAX_FRAME}");
                }
                let mut frame = vec![0u8; len];
                if let Err(e) = rd.read_exact(&mut frame).await {
                    break e.to_string();
                }
                if inputs
                    .send(LinkInput::Frame { path: id, frame })
                    .await
                    .is_err()
                {
                    return;
                }
            };
            let _ = inputs
                .send(LinkInput::PathClosed { path: id, reason })
                .await;
        });
        // Writer: frames out, in order.
        tokio::spawn(async move {
            while let Some(frame) = wrx.recv().await {
                let len = (frame.len() as u32).to_be_bytes();
                if wr.write_all(&len).await.is_err() || wr.write_all(&frame).await.is_err() {
                    break;
                }
                if wrx.is_empty() && wr.flush().await.is_err() {
                    break;
                }
            }
            let _ = wr.close().await;
        });
        tracing::info!(peer = %self.peer, path = ?kind, "path up");
        self.paths.insert(
            id,
            PathEntry {
                connection,
                kind,
                writer: wtx,
            },
        );
        self.switch.path_up(id, kind, true, now);
    }

    fn close_path(&mut self, id: PathId, reason: &str, now: Instant) {
        if let Some(p) = self.paths.remove(&id) {
            tracing::info!(peer = %self.peer, path = ?p.kind, reason, "path down");
            self.switch.path_down(id, now);
        }
    }

    /// Moves messages and frames as far as they go; false when the node is gone.
    async fn flush(&mut self) -> bool {
        let now = Instant::now();
        while let Some(m) = self.pending.front() {
            match self.switch.send(m.clone()) {
                Ok(()) => {
                    self.pending.pop_front();
                }
                Err(path_switch::SendError::WindowFull) => break,
                Err(e) => {
                    tracing::warn!(peer = %self.peer, error = %e, "message dropped");
                    self.pending.pop_front();
                }
            }
        }
        while let Some(t) = self.switch.poll_transmit(now) {
            let Some(p) = self.paths.get(&t.path) else {
                continue;
            };
            let len = t.frame.len() as u64;
            let ok = matches!(
                tokio::time::timeout(WRITE_STALL, p.writer.send(t.frame)).await,
                Ok(Ok(()))
            );
            if ok {
                self.status.bytes_out += len;
            } else {
                self.close_path(t.path, "writer stalled or closed", Instant::now());
            }
        }
        while let Some(ev) = self.switch.poll_event() {
            match ev {
                path_switch::Event::ActivePath(p) => {
                    let kind = p.and_then(|id| self.paths.get(&id)).map(|e| e.kind);
                    tracing::info!(peer = %self.peer, path = ?kind, "active path");
                }
                path_switch::Event::PathDead(id) => {
                    // Silent despite probes: a cut route or an expired NAT
                    // mapping. Close its connection so it is not reused and
                    // a fresh punch can replace it.
                    if let Some(p) = self.paths.remove(&id) {
                        tracing::warn!(peer = %self.peer, path = ?p.kind, "path silent; taken down");
                        if matches!(
                            self.connections.remove(&p.connection),
                            Some((path_switch::PathKind::Direct, _))
                        ) {
                            self.direct_lost();
                        }
                        let _ = self
                            .swarm
                            .send(SwarmCommand::CloseConnection(p.connection))
                            .await;
                    }
                }
                path_switch::Event::ProbeRtt { .. } => {}
            }
        }
        while let Some(m) = self.switch.poll_deliver() {
            match self.sinks.deliver(self.peer, m).await {
                Ok(()) => {}
                Err(Undelivered::Malformed) => self.status.malformed += 1,
                Err(Undelivered::NoConsumer) => self.status.undeliverable += 1,
            }
        }
        self.report_status().await
    }

    async fn report_status(&mut self) -> bool {
        let active = self.switch.active_path().and_then(|id| self.paths.get(&id));
        self.status.path = match active.map(|p| p.kind) {
            Some(path_switch::PathKind::Direct) => PathKind::Direct,
            Some(path_switch::PathKind::Relay) => PathKind::Relay,
            Some(path_switch::PathKind::Forwarded) => PathKind::Forwarded,
            None => PathKind::Connecting,
        };
        self.status.rtt_ms = active
            .and_then(|p| self.rtts.get(&p.connection))
            .map(|d| d.as_secs_f64() * 1e3);
        self.status.via = active
            .and_then(|p| self.connections.get(&p.connection))
            .and_then(|(_, via)| *via);
        self.status.loss = active
            .and_then(|p| self.pings.get(&p.connection))
            .filter(|log| !log.is_empty())
            .map_or(0.0, |log| {
                log.iter().filter(|ok| !**ok).count() as f64 / log.len() as f64
            });
        let now = Instant::now();
        let due = match &self.last_status_sent {
            None => true,
            Some((s, at)) => {
                s.path != self.status.path
                    || (now.duration_since(*at) > Duration::from_millis(500) && *s != self.status)
            }
        };
        if due {
            self.last_status_sent = Some((self.status.clone(), now));
            if self
                .out
                .send(LinkOutput::Status(self.peer, self.status.clone()))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}
