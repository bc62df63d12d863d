//! One isolated worker per peer link (seed 004): it owns the link's
//! [`PathSwitch`] and [`LinkPolicy`], one stream per libp2p connection to
//! the peer (relayed, forwarded or direct), and bounded queues, so a
//! failing or flooding peer stalls only its own worker.
//!
//! Each stream is a path. Frames are length-prefixed on the stream; the path
//! switch numbers, acknowledges and, on a path change, resends messages, so
//! the application sees one exactly-once, in-order stream. When to dial,
//! punch and go through a forwarder is the sans-IO link policy's call; the
//! worker carries its actions out and sleeps until its next timeout.
//!
//! Every application protocol is a flow of its own on the link, with its own
//! sending queue and its own credit (`peermesh_traversal::flow_control`):
//! the worker takes a protocol's messages only while the peer has granted
//! room for them, hands every message it receives to its protocol at once,
//! and never waits for an application. A protocol nobody drains pushes back
//! on its own senders; the other protocols and the link's keep-alives go on.
//!
//! The worker is generic over the stream type so that its tests can run two
//! workers against each other over in-memory pipes (`tests.rs`).

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use peermesh_base::{NodeId, PathKind};
use peermesh_traversal::flow_control::{Credits, Flood, DEFAULT_WINDOW};
use peermesh_traversal::link_policy::{self, Action, LinkPolicy, PolicyConfig};
use peermesh_traversal::path_switch::{self, PathId, PathSwitch};
use tokio::sync::{mpsc, Notify};

use crate::protocol::{self, Control, Credit, Dispatch, Undelivered, MAX_LINK_MESSAGE};
use crate::swarm::Command as SwarmCommand;

/// Largest frame accepted on a stream (a full message plus headers).
const MAX_FRAME: usize = path_switch::MAX_PAYLOAD + 64;
/// Frames queued towards one path's writer.
const WRITER_QUEUE: usize = 256;
/// A path whose writer cannot take a frame for this long is declared dead.
const WRITE_STALL: Duration = Duration::from_secs(3);
/// Application messages held beyond the path switch's own window.
const PENDING_LIMIT: usize = 1024;
/// Inputs (swarm events, frames from the path readers) queued towards one
/// worker.
const INPUT_QUEUE: usize = 1024;
/// Application messages queued on one protocol's sending side of a link:
/// with the peer's credit in front of it, a burst of up to twice the flow
/// window waits without blocking its sender.
const FLOW_QUEUE: usize = 256;
/// Protocols one link carries at most: the node's own applications need a
/// handful; the cap keeps a local program that invents protocol names from
/// growing the link without bound.
const MAX_FLOWS: usize = 64;
/// Pings (one every 500 ms) over which loss is reported: the last 10 s.
const PING_WINDOW: usize = 20;
/// Status changes other than a new path are reported at most this often
/// (byte counters move with every frame).
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub enum LinkInput<S> {
    /// Addresses to reach the peer at: circuits through relay servers, and
    /// circuits through members that forward (best forwarder first).
    Addresses {
        relay: Vec<Multiaddr>,
        forwarded: Vec<Multiaddr>,
    },
    Connected {
        connection: ConnectionId,
        kind: PathKind,
        /// The relay server or forwarding member of a relayed connection.
        via: Option<PeerId>,
    },
    Disconnected {
        connection: ConnectionId,
    },
    Stream {
        connection: ConnectionId,
        stream: S,
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
    /// The active path's kind; `None` while connecting.
    pub path: Option<PathKind>,
    pub rtt_ms: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub malformed: u64,
    /// The relay or forwarding member the active path goes through.
    pub via: Option<PeerId>,
    /// Fraction of the active connection's last pings that timed out (1 s).
    pub loss: f64,
    /// Messages for a protocol that nothing on this node runs.
    pub undeliverable: u64,
    /// Messages beyond the credit the peer was granted for their protocol:
    /// dropped (a member that floods is not obeyed).
    pub flooded: u64,
}

impl Default for LinkStatus {
    fn default() -> Self {
        Self {
            path: None,
            rtt_ms: None,
            bytes_in: 0,
            bytes_out: 0,
            malformed: 0,
            via: None,
            loss: 0.0,
            undeliverable: 0,
            flooded: 0,
        }
    }
}

#[derive(Debug)]
pub enum LinkOutput {
    Status(PeerId, LinkStatus),
    /// No direct path: ask the control server to coordinate a punch.
    PunchWanted(PeerId),
    /// A path came up or went down.
    Path(PeerId, PathEvent),
}

#[derive(Clone, Debug, PartialEq)]
pub enum PathEvent {
    Up(PathKind),
    Down(PathKind, String),
}

pub struct LinkHandle<S> {
    pub input: mpsc::Sender<LinkInput<S>>,
    /// The sending side of every protocol's flow, by protocol name.
    flows: HashMap<Bytes, mpsc::Sender<Bytes>>,
    new_flows: mpsc::UnboundedSender<(Bytes, mpsc::Receiver<Bytes>)>,
    task: tokio::task::JoinHandle<()>,
}

impl<S> LinkHandle<S> {
    /// The sending side of `protocol`'s flow on this link (messages with
    /// their protocol header), made on first use; `None` past
    /// [`MAX_FLOWS`] protocols.
    pub fn flow(&mut self, protocol: Bytes) -> Option<mpsc::Sender<Bytes>> {
        self.flows.retain(|_, tx| !tx.is_closed());
        if let Some(tx) = self.flows.get(&protocol) {
            return Some(tx.clone());
        }
        if self.flows.len() >= MAX_FLOWS {
            return None;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        self.new_flows.send((protocol.clone(), rx)).ok()?;
        self.flows.insert(protocol, tx.clone());
        Some(tx)
    }
}

impl<S> Drop for LinkHandle<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct PathEntry {
    connection: ConnectionId,
    kind: PathKind,
    writer: mpsc::Sender<Bytes>,
}

/// What a stream must be to carry a path.
pub trait PathStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> PathStream for T {}

/// Everything a worker is started with.
pub struct LinkConfig {
    pub me: PeerId,
    pub peer: PeerId,
    /// Whether this link asks the control server for punches.
    pub control_punch: bool,
}

struct Worker<S> {
    peer: PeerId,
    /// The peer as applications see it (computed once, not per message).
    peer_id: NodeId,
    switch: PathSwitch,
    policy: LinkPolicy<Multiaddr>,
    swarm: mpsc::Sender<SwarmCommand>,
    out: mpsc::Sender<LinkOutput>,
    dispatch: Arc<Dispatch>,
    inputs_tx: mpsc::Sender<LinkInput<S>>,
    connections: HashMap<ConnectionId, (PathKind, Option<PeerId>)>,
    paths: HashMap<PathId, PathEntry>,
    rtts: HashMap<ConnectionId, Duration>,
    /// Outcomes of the last [`PING_WINDOW`] pings per connection.
    pings: HashMap<ConnectionId, VecDeque<bool>>,
    next_path: u32,
    pending: VecDeque<Bytes>,
    /// The link's own messages (grants) waiting for the path switch's window.
    control: VecDeque<Bytes>,
    /// The sending side of every protocol, with its name; polled in turn
    /// from `next_flow` while it has credit.
    flows: Vec<(Bytes, mpsc::Receiver<Bytes>)>,
    next_flow: usize,
    credits: Credits<Bytes>,
    /// Per protocol served here: delivered messages that the application
    /// has released (counted by their [`Credit`]s), and how many of those
    /// the credits know of.
    released: HashMap<Bytes, (Arc<AtomicU64>, u64)>,
    /// Woken when an application releases a message.
    wake: Arc<Notify>,
    status: LinkStatus,
    last_status_sent: Option<(LinkStatus, Instant)>,
    /// Paths that came up or went down since the last report.
    path_events: Vec<PathEvent>,
}

pub fn spawn<S: PathStream>(
    config: LinkConfig,
    swarm: mpsc::Sender<SwarmCommand>,
    out: mpsc::Sender<LinkOutput>,
    dispatch: Arc<Dispatch>,
) -> LinkHandle<S> {
    let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
    let (flows_tx, flows_rx) = mpsc::unbounded_channel();
    let leads = link_policy::leads(&config.me.to_bytes(), &config.peer.to_bytes());
    let worker = Worker {
        peer: config.peer,
        peer_id: NodeId::from_bytes(&config.peer.to_bytes()).expect("a peer id is a node id"),
        switch: PathSwitch::new(path_switch::Config {
            max_message_size: MAX_LINK_MESSAGE,
            liveness: Some(path_switch::Liveness::default()),
            ..path_switch::Config::default()
        }),
        policy: LinkPolicy::new(PolicyConfig::default(), leads, config.control_punch),
        swarm,
        out,
        dispatch,
        inputs_tx: input_tx.clone(),
        connections: HashMap::new(),
        paths: HashMap::new(),
        rtts: HashMap::new(),
        pings: HashMap::new(),
        next_path: 0,
        pending: VecDeque::new(),
        control: VecDeque::new(),
        flows: Vec::new(),
        next_flow: 0,
        credits: Credits::new(DEFAULT_WINDOW),
        released: HashMap::new(),
        wake: Arc::new(Notify::new()),
        status: LinkStatus::default(),
        last_status_sent: None,
        path_events: Vec::new(),
    };
    let task = tokio::spawn(worker.run(input_rx, flows_rx));
    LinkHandle {
        input: input_tx,
        flows: HashMap::new(),
        new_flows: flows_tx,
        task,
    }
}

/// The time, from tokio's clock: the same as the system's, except in tests
/// that pause tokio's clock to run the worker on virtual time.
fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The next message of a flow that has credit, from flow `start` on in
/// turn (so that no protocol starves another); `(i, None)` when flow `i`'s
/// sender went away.
fn poll_flows(
    flows: &mut [(Bytes, mpsc::Receiver<Bytes>)],
    credits: &Credits<Bytes>,
    start: usize,
    cx: &mut std::task::Context<'_>,
) -> Poll<(usize, Option<Bytes>)> {
    let n = flows.len();
    for k in 0..n {
        let i = (start + k) % n;
        let (name, rx) = &mut flows[i];
        if !credits.can_send(name) {
            continue;
        }
        if let Poll::Ready(m) = rx.poll_recv(cx) {
            return Poll::Ready((i, m));
        }
    }
    Poll::Pending
}

/// Sleeps until `t`, or forever.
async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

impl<S: PathStream> Worker<S> {
    async fn run(
        mut self,
        mut inputs: mpsc::Receiver<LinkInput<S>>,
        mut new_flows: mpsc::UnboundedReceiver<(Bytes, mpsc::Receiver<Bytes>)>,
    ) {
        loop {
            if !self.flush().await || !self.act().await {
                return;
            }
            let switch_timeout = self.switch.poll_timeout();
            let policy_timeout = self.policy.poll_timeout();
            let accept_app = self.pending.len() < PENDING_LIMIT;
            let installed = self.dispatch.is_installed();
            let (flows, credits, start) = (&mut self.flows, &self.credits, self.next_flow);
            let app = std::future::poll_fn(|cx| {
                if !accept_app {
                    return Poll::Pending;
                }
                poll_flows(flows, credits, start, cx)
            });
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(i) => self.on_input(i).await,
                    None => return,
                },
                flow = new_flows.recv() => match flow {
                    Some(f) => self.flows.push(f),
                    None => return,
                },
                (i, msg) = app => match msg {
                    Some(m) => {
                        let name = self.flows[i].0.clone();
                        self.next_flow = i + 1;
                        self.credits.on_sent(&name);
                        self.pending.push_back(m);
                        // Every queued message while unconnected dials at
                        // once: the first byte to a new peer waits for
                        // nobody (seed 000).
                        self.policy.set_waiting(true, clock());
                    }
                    None => {
                        // Its sender went away (the application stopped).
                        self.flows.swap_remove(i);
                    }
                },
                _ = self.wake.notified() => self.collect_releases(),
                _ = self.dispatch.installed(), if !installed => {}
                _ = sleep_until(switch_timeout) => self.switch.handle_timeout(clock()),
                _ = sleep_until(policy_timeout) => self.policy.handle_timeout(clock()),
            }
        }
    }

    /// Counts what the applications released since the last look, and
    /// grants the peer room for that much more.
    fn collect_releases(&mut self) {
        for (name, (count, seen)) in &mut self.released {
            let now = count.load(Ordering::Relaxed);
            if now > *seen {
                self.credits.on_released(name, now - *seen);
                *seen = now;
            }
        }
        while let Some((protocol, limit)) = self.credits.poll_grant() {
            self.control
                .push_back(Control::Grant { protocol, limit }.encode());
        }
    }

    /// One message from the peer, handed to its protocol at once.
    fn deliver(&mut self, m: Bytes) {
        if protocol::is_control(&m) {
            match Control::decode(m) {
                Some(Control::Grant { protocol, limit }) => self.credits.on_grant(&protocol, limit),
                None => self.status.malformed += 1,
            }
            return;
        }
        let Some((name, data)) = protocol::decode(m) else {
            self.status.malformed += 1;
            return;
        };
        if !self.dispatch.serves(&name) {
            // Nothing here runs it: dropped and counted, no credit state
            // kept for names a peer makes up.
            self.status.undeliverable += 1;
            return;
        }
        if self.credits.on_received(&name) == Err(Flood) {
            self.status.flooded += 1;
            return;
        }
        let (count, _) = self
            .released
            .entry(name.clone())
            .or_insert_with(|| (Arc::new(AtomicU64::new(0)), 0));
        let credit = Credit::new(count.clone(), self.wake.clone());
        match self
            .dispatch
            .deliver(self.peer_id, &name, data, Some(credit))
        {
            Ok(()) => {}
            // The application stopped (its credit came back as it dropped).
            Err(Undelivered::NoConsumer) => self.status.undeliverable += 1,
        }
    }

    /// Carries out what the link policy asks for; false when the node is gone.
    async fn act(&mut self) -> bool {
        while let Some(a) = self.policy.poll_action() {
            let peer = self.peer;
            let cmd = match a {
                Action::Dial(addrs) => SwarmCommand::Connect { peer, addrs },
                Action::DialVia(addr) => {
                    tracing::debug!(%peer, %addr, "dialing through a forwarding member");
                    SwarmCommand::DialVia { peer, addr }
                }
                Action::RequestPunch => {
                    tracing::debug!(%peer, attempt = self.policy.punch_attempts(), "asking for a coordinated punch");
                    if self.out.send(LinkOutput::PunchWanted(peer)).await.is_err() {
                        return false;
                    }
                    continue;
                }
            };
            let _ = self.swarm.send(cmd).await;
        }
        true
    }

    async fn on_input(&mut self, input: LinkInput<S>) {
        let now = clock();
        match input {
            LinkInput::Addresses { relay, forwarded } => {
                self.policy.set_addresses(relay, forwarded, now);
            }
            LinkInput::Connected {
                connection,
                kind,
                via,
            } => {
                tracing::debug!(peer = %self.peer, ?connection, ?kind, ?via, "connection up");
                self.connections.insert(connection, (kind, via));
                self.policy.connected(kind, now);
                // The leader opens the streams (one circuit, not two).
                if self.policy.leads() {
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
                self.remove_connection(connection, now);
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
                    .map_or(PathKind::Relay, |(k, _)| *k);
                self.add_path(connection, kind, stream, now);
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
            LinkInput::DialFailed => self.policy.dial_failed(now),
        }
    }

    /// A connection is gone (closed, or its path found dead): the policy
    /// learns it once.
    fn remove_connection(&mut self, connection: ConnectionId, now: Instant) {
        if let Some((kind, _)) = self.connections.remove(&connection) {
            self.policy.disconnected(kind, now);
        }
    }

    fn add_path(&mut self, connection: ConnectionId, kind: PathKind, stream: S, now: Instant) {
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
        self.path_events.push(PathEvent::Up(kind));
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
            self.path_events
                .push(PathEvent::Down(p.kind, reason.to_string()));
            self.switch.path_down(id, now);
        }
    }

    /// Moves messages and frames as far as they go; false when the node is gone.
    async fn flush(&mut self) -> bool {
        let now = clock();
        while let Some(m) = self.control.front() {
            match self.switch.send(m.clone()) {
                Err(path_switch::SendError::WindowFull) => break,
                // Sent, or refused for good (cannot happen: grants are small).
                _ => {
                    self.control.pop_front();
                }
            }
        }
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
                self.close_path(t.path, "writer stalled or closed", clock());
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
                        self.path_events
                            .push(PathEvent::Down(p.kind, "silent despite probes".into()));
                        self.remove_connection(p.connection, now);
                        let _ = self
                            .swarm
                            .send(SwarmCommand::CloseConnection(p.connection))
                            .await;
                    }
                }
                path_switch::Event::ProbeRtt { .. } => {}
            }
        }
        // Until the router runs, received messages stay in the path switch
        // (whose window then pushes back on the peer).
        while self.dispatch.is_installed() {
            let Some(m) = self.switch.poll_deliver() else {
                break;
            };
            self.deliver(m);
        }
        if self.pending.is_empty() && self.switch.unacked() == 0 && self.policy.waiting() {
            self.policy.set_waiting(false, now);
        }
        self.report_status().await
    }

    async fn report_status(&mut self) -> bool {
        for e in std::mem::take(&mut self.path_events) {
            if self.out.send(LinkOutput::Path(self.peer, e)).await.is_err() {
                return false;
            }
        }
        let active = self.switch.active_path().and_then(|id| self.paths.get(&id));
        self.status.path = active.map(|p| p.kind);
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
        let now = clock();
        let due = match &self.last_status_sent {
            None => true,
            Some((s, at)) => {
                s.path != self.status.path
                    || (now.duration_since(*at) > STATUS_INTERVAL && *s != self.status)
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
