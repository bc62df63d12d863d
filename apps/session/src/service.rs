//! The node side of a session: the protocol [`PROTOCOL`] on an endpoint's
//! router, through which members exchange their inputs, and the actor that
//! plays the member's part against the origin (`hosting-server`).
//!
//! A game process talks to its node over the local API ([`crate::ops`]): it
//! joins a session on an origin, sets the buttons its player holds, and reads
//! the merged state. The node does the rest, in one task (the
//! [`SessionHandler`] the router serves):
//!
//! - once per tick of the session's rate it stamps its player's input with a
//!   tick a little ahead of the origin's present (the *lead*, raised when the
//!   origin reports inputs that came too late), sends it to the origin over
//!   UDP together with every input the origin has not acknowledged yet, and
//!   to every other member over the mesh (protocol [`PROTOCOL`], one message
//!   per input per peer, on the link's exactly-once stream);
//! - it receives the other members' inputs from the mesh (checked against
//!   the origin's roster: the mesh sender must be the slot's member) and the
//!   origin's snapshots, and merges both ([`crate::state::ClientState`]): the
//!   merged state is the last authoritative snapshot replayed with all inputs
//!   known for later ticks up to the present tick — rollback to the snapshot,
//!   replay of what the snapshot has not seen — so local prediction from peer
//!   inputs is corrected by every snapshot;
//! - it measures, per player and route (mesh, origin relay, origin echo), the
//!   input latency from the sender's send time to the arrival here, the age
//!   of the last snapshot, and how often the predicted state of a tick was
//!   exactly the origin's state of it.
//!
//! A node is in at most one session at a time.
//!
//! ```no_run
//! # fn demo(endpoint: peermesh_node::Endpoint) {
//! use peermesh_node::Router;
//! let (session, handler) = peermesh_session::spawn(endpoint.clone());
//! let router = Router::builder(endpoint)
//!     .accept(peermesh_session::protocol(), handler)
//!     .spawn();
//! // `session` answers the local API's `{"op":"session",…}` lines
//! // (`peermesh_session::ops::answer`).
//! # drop((session, router));
//! # }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use peermesh_node::{
    Endpoint, Incoming, LinkSender, NodeId, ProtocolHandler, ProtocolId, ProtocolSender, SendError,
};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::game::Buttons;
use crate::state::{ClientState, Drops, Rejected, Route, SessionView};
use crate::wire::{now_us, Packet, Refusal};

/// The name of the members' input exchange on the mesh.
pub const PROTOCOL: &str = "/peermesh/session/1";

/// [`PROTOCOL`] as the router takes it.
pub fn protocol() -> ProtocolId {
    ProtocolId::from_static(PROTOCOL)
}

/// How long a join may take before it fails: an origin that has not
/// answered a join repeated every [`JOIN_RETRY`] for this long is down or
/// unreachable, and the game process should hear so rather than hang.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Join packets are repeated this often until the origin answers: a lost
/// join or answer (UDP) costs at most this much, while an origin that is slow
/// to answer sees only a few repeats (it answers a repeated nonce again).
pub const JOIN_RETRY: Duration = Duration::from_millis(200);
/// Pause after a failed receive on the origin's socket before the next: the
/// error (an ICMP port unreachable while the origin is down, for one) would
/// otherwise repeat in a busy loop; one tick's worth of waiting costs nothing
/// when the origin is not there anyway.
const RECV_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Commands from the handles queued for the actor (the local API awaits each
/// answer, so only concurrent clients ever fill it).
const COMMAND_QUEUE: usize = 64;
/// Datagrams from the origin queued for the actor; when full (the actor is
/// behind) they are dropped: a stale game packet is worth less than a fresh one.
const UDP_QUEUE: usize = 1024;
/// Receive buffer for one datagram from the origin (a full snapshot of
/// [`crate::wire::MAX_PLAYERS`] players with its echo fits).
const MAX_DATAGRAM: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("origin address {0:?} is not IP:PORT")]
    BadOrigin(String),
    #[error("session name {0:?}: 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("UDP socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the origin did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the origin refused: {0}")]
    Refused(&'static str),
    #[error("not in a session")]
    NotJoined,
    #[error("the session service stopped")]
    Stopped,
    #[error("another join replaced this one")]
    Superseded,
}

/// Where a join ended up.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Joined {
    pub session_id: u32,
    pub slot: u8,
    pub tick_hz: u16,
}

enum Command {
    Join {
        origin: SocketAddr,
        name: String,
        reply: oneshot::Sender<Result<Joined, SessionError>>,
    },
    Buttons(Buttons),
    Leave(oneshot::Sender<bool>),
    View {
        samples: bool,
        reply: oneshot::Sender<Option<SessionView>>,
    },
}

/// The handle the local API uses. Cheap to clone.
#[derive(Clone)]
pub struct SessionHandle {
    tx: mpsc::Sender<Command>,
}

impl SessionHandle {
    pub async fn join(&self, origin: &str, name: &str) -> Result<Joined, SessionError> {
        let origin: SocketAddr = origin
            .parse()
            .map_err(|_| SessionError::BadOrigin(origin.to_string()))?;
        let ok_name = !name.is_empty()
            && name.len() <= crate::wire::MAX_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok_name {
            return Err(SessionError::BadName(name.to_string()));
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Join {
                origin,
                name: name.to_string(),
                reply,
            })
            .await
            .map_err(|_| SessionError::Stopped)?;
        rx.await.map_err(|_| SessionError::Stopped)?
    }

    /// The buttons the player holds from now on (bits of
    /// [`crate::game::Buttons`]).
    pub async fn set_buttons(&self, buttons: u8) -> Result<(), SessionError> {
        self.tx
            .send(Command::Buttons(Buttons(buttons & Buttons::VALID)))
            .await
            .map_err(|_| SessionError::Stopped)
    }

    pub async fn leave(&self) -> Result<bool, SessionError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Leave(reply))
            .await
            .map_err(|_| SessionError::Stopped)?;
        rx.await.map_err(|_| SessionError::Stopped)
    }

    pub async fn view(&self, samples: bool) -> Result<SessionView, SessionError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::View { samples, reply })
            .await
            .map_err(|_| SessionError::Stopped)?;
        rx.await
            .map_err(|_| SessionError::Stopped)?
            .ok_or(SessionError::NotJoined)
    }
}

/// The session service of `endpoint`: the handle the local API uses, and the
/// protocol handler to register on the endpoint's router under
/// [`protocol()`]. The service runs once the router serves the handler, until
/// the endpoint stops or every handle is gone; commands sent before then wait
/// in the queue, and fail with [`SessionError::Stopped`] if the handler is
/// dropped without being served.
pub fn spawn(endpoint: Endpoint) -> (SessionHandle, SessionHandler) {
    let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let handler = SessionHandler {
        commands,
        me: endpoint.node_id(),
        sender: endpoint.sender(protocol()),
    };
    (SessionHandle { tx }, handler)
}

/// Runs the session service on the router's [`Incoming`] of [`PROTOCOL`]
/// (made by [`spawn`]).
pub struct SessionHandler {
    commands: mpsc::Receiver<Command>,
    me: NodeId,
    sender: ProtocolSender,
}

impl ProtocolHandler for SessionHandler {
    async fn serve(self, incoming: Incoming) {
        let SessionHandler {
            commands,
            me,
            sender,
        } = self;
        let (udp_tx, udp_rx) = mpsc::channel(UDP_QUEUE);
        let svc = Service {
            me: me.to_string(),
            sender,
            udp_tx,
            socket: None,
            joining: None,
            state: None,
            links: HashMap::new(),
            epoch: 0,
            pending_buttons: Buttons::default(),
            orphans: Drops::default(),
        };
        svc.run(commands, incoming, udp_rx).await;
    }
}

struct Joining {
    origin: SocketAddr,
    name: String,
    nonce: u64,
    reply: oneshot::Sender<Result<Joined, SessionError>>,
    deadline: tokio::time::Instant,
}

/// One UDP socket per join, read by its own task.
struct Socket {
    sock: Arc<UdpSocket>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Service {
    /// Our node id as the origin's roster spells it (base58).
    me: String,
    sender: ProtocolSender,
    udp_tx: mpsc::Sender<(u64, Vec<u8>, u64)>,
    socket: Option<Socket>,
    joining: Option<Joining>,
    state: Option<ClientState>,
    /// Cached link senders of the members' peers.
    links: HashMap<NodeId, LinkSender>,
    /// Which socket a UDP packet came from (packets of an old one are ignored).
    epoch: u64,
    /// Buttons set before the join completed.
    pending_buttons: Buttons,
    /// Drops counted while not in a session.
    orphans: Drops,
}

/// The router stops its handlers by dropping them: the origin still hears
/// that we left (best effort, like every packet to it), instead of timing
/// our slot out.
impl Drop for Service {
    fn drop(&mut self) {
        self.send_leave();
    }
}

async fn read_udp(sock: Arc<UdpSocket>, epoch: u64, tx: mpsc::Sender<(u64, Vec<u8>, u64)>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match sock.recv(&mut buf).await {
            Ok(n) => {
                // Full: the service is behind; a game packet is better dropped than queued.
                let _ = tx.try_send((epoch, buf[..n].to_vec(), now_us()));
            }
            Err(e) => {
                // ICMP port unreachable while the origin is down, for one.
                tracing::debug!(error = %e, "session socket");
                tokio::time::sleep(RECV_ERROR_PAUSE).await;
            }
        }
    }
}

/// A message of [`PROTOCOL`] from `peer`: a batch of the inputs of the slot
/// `peer` holds in our session. Accepted only when the origin's roster gives
/// that slot to `peer` (the roster carries the member's node id in base58,
/// the spelling of [`NodeId`]'s `Display`); everything else is counted.
fn on_mesh(
    state: Option<&mut ClientState>,
    orphans: &mut Drops,
    peer: NodeId,
    bytes: &[u8],
    now: u64,
) {
    let batch = match Packet::decode(bytes) {
        Ok(Packet::Inputs(b)) => b,
        Ok(_) | Err(_) => {
            match state {
                Some(s) => s.drops.malformed_mesh += 1,
                None => orphans.malformed_mesh += 1,
            }
            tracing::debug!(%peer, "malformed session message from a peer");
            return;
        }
    };
    let Some(state) = state else {
        orphans.foreign_mesh += 1;
        return;
    };
    match state.on_peer_inputs(&batch, Route::Mesh, Some(&peer.to_string()), now) {
        Ok(()) => {}
        Err(Rejected::Foreign) => state.drops.foreign_mesh += 1,
        Err(Rejected::UnknownSlot) => state.drops.unknown_slot_mesh += 1,
        Err(Rejected::Impostor) => {
            state.drops.impostor_mesh += 1;
            tracing::debug!(%peer, slot = batch.slot, "peer input for a slot that is not the peer's");
        }
    }
}

/// The tick period of a session at `tick_hz`, or the join retry while not in one.
fn period(state: Option<&ClientState>) -> Duration {
    match state {
        Some(s) => Duration::from_secs_f64(1.0 / f64::from(s.tick_hz)),
        None => JOIN_RETRY,
    }
}

impl Service {
    fn drops(&mut self) -> &mut Drops {
        match &mut self.state {
            Some(s) => &mut s.drops,
            None => &mut self.orphans,
        }
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut incoming: Incoming,
        mut udp: mpsc::Receiver<(u64, Vec<u8>, u64)>,
    ) {
        let mut current = period(None);
        let mut ticker = tokio::time::interval(current);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                c = commands.recv() => match c {
                    Some(c) => self.on_command(c).await,
                    None => break,
                },
                m = incoming.recv() => match m {
                    Some(m) => on_mesh(self.state.as_mut(), &mut self.orphans, m.from, &m.data, now_us()),
                    // The endpoint stopped.
                    None => break,
                },
                Some((epoch, bytes, at)) = udp.recv() => {
                    if epoch == self.epoch {
                        self.on_udp(&bytes, at).await;
                    }
                }
                _ = ticker.tick() => self.on_tick().await,
            }
            let want = period(self.state.as_ref());
            if want != current {
                current = want;
                ticker = tokio::time::interval(current);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            }
        }
        self.leave();
    }

    async fn on_command(&mut self, c: Command) {
        match c {
            Command::Join {
                origin,
                name,
                reply,
            } => {
                self.leave();
                let sock = match self.open(origin).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                let nonce = rand::random();
                tracing::info!(%origin, %name, "joining a session");
                let j = Packet::Join {
                    name: name.clone(),
                    peer: self.me.clone(),
                    nonce,
                };
                let _ = sock.send(&j.encode()).await;
                self.joining = Some(Joining {
                    origin,
                    name,
                    nonce,
                    reply,
                    deadline: tokio::time::Instant::now() + JOIN_TIMEOUT,
                });
            }
            Command::Buttons(b) => {
                self.pending_buttons = b;
                if let Some(s) = &mut self.state {
                    s.set_buttons(b);
                }
            }
            Command::Leave(reply) => {
                let was = self.state.is_some() || self.joining.is_some();
                self.leave();
                let _ = reply.send(was);
            }
            Command::View { samples, reply } => {
                let v = self.state.as_mut().map(|s| s.view(now_us(), samples));
                let _ = reply.send(v);
            }
        }
    }

    async fn open(&mut self, origin: SocketAddr) -> Result<Arc<UdpSocket>, SessionError> {
        let any: SocketAddr = if origin.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        let sock = UdpSocket::bind(any).await?;
        // Only the origin's packets reach this socket.
        sock.connect(origin).await?;
        let sock = Arc::new(sock);
        self.epoch += 1;
        let reader = tokio::spawn(read_udp(sock.clone(), self.epoch, self.udp_tx.clone()));
        self.socket = Some(Socket {
            sock: sock.clone(),
            reader,
        });
        Ok(sock)
    }

    /// Tells the origin we leave the session we are in, if any, without
    /// waiting (a UDP send only waits for room in the socket's buffer; with
    /// none, the packet is lost like any other).
    fn send_leave(&mut self) {
        if let (Some(s), Some(sock)) = (self.state.take(), &self.socket) {
            tracing::info!(session = s.session, slot = s.slot, "leaving the session");
            let p = Packet::Leave {
                session: s.session,
                secret: s.secret,
                slot: s.slot,
            };
            let _ = sock.sock.try_send(&p.encode());
        }
    }

    fn leave(&mut self) {
        if let Some(j) = self.joining.take() {
            let _ = j.reply.send(Err(SessionError::Superseded));
        }
        self.send_leave();
        self.socket = None;
        self.links.clear();
    }

    async fn on_tick(&mut self) {
        if let Some(j) = &self.joining {
            if tokio::time::Instant::now() > j.deadline {
                let j = self.joining.take().expect("joining");
                tracing::warn!(origin = %j.origin, "the origin did not answer the join");
                let _ = j.reply.send(Err(SessionError::Timeout(JOIN_TIMEOUT)));
                self.socket = None;
                return;
            }
            if let Some(s) = &self.socket {
                let p = Packet::Join {
                    name: j.name.clone(),
                    peer: self.me.clone(),
                    nonce: j.nonce,
                };
                let _ = s.sock.send(&p.encode()).await;
            }
            return;
        }
        let now = now_us();
        let (Some(state), Some(sock)) = (&mut self.state, &self.socket) else {
            return;
        };
        if let Some(input) = state.next_input(now) {
            let to_origin = Packet::Inputs(state.origin_batch()).encode();
            if let Err(e) = sock.sock.send(&to_origin).await {
                tracing::debug!(error = %e, "sending inputs to the origin");
            }
            let msg = Packet::Inputs(state.mesh_batch(input)).encode();
            let peers: Vec<NodeId> = state.peers().filter_map(|(_, p)| p.parse().ok()).collect();
            for peer in peers {
                self.send_mesh(peer, &msg).await;
            }
        }
        if let Some(state) = &mut self.state {
            // Predict the present: the snapshot of this tick will be checked against it.
            state.merged(now);
        }
    }

    /// Queues a message on `peer`'s link without waiting: an input that
    /// cannot go now is stale by the next tick anyway.
    async fn send_mesh(&mut self, peer: NodeId, msg: &[u8]) {
        for attempt in 0..2 {
            let tx = match self.links.get(&peer) {
                Some(tx) => tx.clone(),
                None => match self.sender.link(peer).await {
                    Some(tx) => {
                        self.links.insert(peer, tx.clone());
                        tx
                    }
                    None => {
                        self.drops().mesh_no_link += 1;
                        return;
                    }
                },
            };
            match tx.try_send(msg) {
                Ok(()) => return,
                Err(SendError::Full) => {
                    self.drops().mesh_queue_full += 1;
                    return;
                }
                Err(SendError::LinkClosed) => {
                    // The link was replaced: ask the mesh again, once.
                    self.links.remove(&peer);
                    if attempt == 1 {
                        self.drops().mesh_no_link += 1;
                    }
                }
                Err(e) => {
                    // A one-input batch is far below the message limit.
                    tracing::warn!(%peer, error = %e, "session input not sent");
                    return;
                }
            }
        }
    }

    async fn on_udp(&mut self, bytes: &[u8], at: u64) {
        let p = match Packet::decode(bytes) {
            Ok(p) => p,
            Err(e) => {
                self.drops().malformed_udp += 1;
                tracing::debug!(error = %e, "malformed packet from the origin");
                return;
            }
        };
        match p {
            Packet::Welcome {
                nonce,
                session,
                secret,
                slot,
                tick_hz,
                ..
            } if self.joining.as_ref().is_some_and(|j| j.nonce == nonce) => {
                let j = self.joining.take().expect("joining");
                tracing::info!(session, slot, tick_hz, name = %j.name, "joined the session");
                let mut s =
                    ClientState::new(j.name, j.origin.to_string(), session, secret, slot, tick_hz);
                s.set_buttons(self.pending_buttons);
                self.state = Some(s);
                let _ = j.reply.send(Ok(Joined {
                    session_id: session,
                    slot,
                    tick_hz,
                }));
            }
            Packet::Refused { nonce, reason }
                if self.joining.as_ref().is_some_and(|j| j.nonce == nonce) =>
            {
                let j = self.joining.take().expect("joining");
                self.socket = None;
                let why = match reason {
                    Refusal::Full => "the session is full",
                    Refusal::TooManySessions => "too many sessions",
                    Refusal::BadName => "bad session name",
                };
                let _ = j.reply.send(Err(SessionError::Refused(why)));
            }
            Packet::Snapshot(s) => match &mut self.state {
                Some(state) => {
                    let _ = state.on_snapshot(s, at);
                }
                None => self.orphans.unexpected_udp += 1,
            },
            Packet::Roster(r) => match &mut self.state {
                Some(state) => {
                    if let Ok(true) = state.on_roster(r) {
                        tracing::info!(members = state.peers().count() + 1, "session roster");
                        self.links.clear();
                    }
                }
                None => self.orphans.unexpected_udp += 1,
            },
            Packet::Relayed(b) => match &mut self.state {
                Some(state) => {
                    if state.on_peer_inputs(&b, Route::Relay, None, at).is_err() {
                        state.drops.foreign_udp += 1;
                    }
                }
                None => self.orphans.unexpected_udp += 1,
            },
            _ => self.drops().unexpected_udp += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Input, InputBatch, Roster};

    /// A real ed25519 peer id, as a member declares it to the origin.
    const PEER: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

    /// Another member's node id (an identity multihash like a peer id's).
    fn other() -> NodeId {
        let mut b = vec![0, 36, 8, 1, 18, 32];
        b.extend([7u8; 32]);
        NodeId::from_bytes(&b).unwrap()
    }

    fn inputs(slot: u8) -> Vec<u8> {
        Packet::Inputs(InputBatch {
            session: 1,
            secret: 0,
            slot,
            inputs: vec![Input {
                tick: 5,
                buttons: Buttons(Buttons::UP),
                sent_us: 1_000,
            }],
        })
        .encode()
    }

    #[test]
    fn mesh_inputs_are_taken_only_from_the_slots_member() {
        let peer: NodeId = PEER.parse().unwrap();
        let mut orphans = Drops::default();
        // Not in a session: counted apart.
        on_mesh(None, &mut orphans, peer, &inputs(1), 2_000);
        on_mesh(None, &mut orphans, peer, b"junk", 2_000);
        assert_eq!((orphans.foreign_mesh, orphans.malformed_mesh), (1, 1));

        let mut s = ClientState::new("g".into(), "o".into(), 1, 7, 0, 30);
        s.on_roster(Roster {
            session: 1,
            version: 1,
            members: vec![(0, other().to_string()), (1, PEER.to_string())],
        })
        .unwrap();
        on_mesh(Some(&mut s), &mut orphans, peer, &inputs(1), 2_000);
        // Another member claiming slot 1, and a member claiming ours.
        on_mesh(Some(&mut s), &mut orphans, other(), &inputs(1), 2_000);
        on_mesh(Some(&mut s), &mut orphans, peer, &inputs(0), 2_000);
        // A slot the roster does not list, and junk.
        on_mesh(Some(&mut s), &mut orphans, peer, &inputs(2), 2_000);
        on_mesh(Some(&mut s), &mut orphans, peer, &[], 2_000);
        let v = s.view(2_000, false);
        assert_eq!(v.peers.len(), 1);
        assert_eq!(
            (v.peers[0].peer.as_str(), v.peers[0].mesh.inputs),
            (PEER, 1)
        );
        assert_eq!(v.drops.impostor_mesh, 2);
        assert_eq!(v.drops.unknown_slot_mesh, 1);
        assert_eq!(v.drops.malformed_mesh, 1);
        assert_eq!((orphans.foreign_mesh, orphans.malformed_mesh), (1, 1));
    }

    #[test]
    fn the_protocol_name_is_valid() {
        assert_eq!(protocol().as_str(), PROTOCOL);
    }
}
