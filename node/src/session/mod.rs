//! The node's session app layer: multiplayer sessions hosted by an origin
//! (`hosting-server`), with the members' inputs exchanged directly over the
//! mesh.
//!
//! A game process talks to its node over the status socket ([`ops`]): it
//! joins a session on an origin, sets the buttons its player holds, and reads
//! the merged state. The node does the rest, in one task ([`spawn`]):
//!
//! - once per tick of the session's rate it stamps its player's input with a
//!   tick a little ahead of the origin's present (the *lead*, raised when the
//!   origin reports inputs that came too late), sends it to the origin over
//!   UDP together with every input the origin has not acknowledged yet, and
//!   to every other member over the mesh (`Channel::Session`, one message per
//!   input per peer, on the link's exactly-once stream);
//! - it receives the other members' inputs from the mesh (checked against
//!   the origin's roster: the mesh sender must be the slot's member) and the
//!   origin's snapshots, and merges both ([`state::ClientState`]): the merged
//!   state is the last authoritative snapshot replayed with all inputs known
//!   for later ticks up to the present tick — rollback to the snapshot,
//!   replay of what the snapshot has not seen — so local prediction from peer
//!   inputs is corrected by every snapshot;
//! - it measures, per player and route (mesh, origin relay, origin echo), the
//!   input latency from the sender's send time to the arrival here, the age
//!   of the last snapshot, and how often the predicted state of a tick was
//!   exactly the origin's state of it.
//!
//! A node is in at most one session at a time.

pub mod ops;
pub mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libp2p::PeerId;
use peermesh_hosting_server::session::game::Buttons;
use peermesh_hosting_server::session::now_us;
use peermesh_hosting_server::session::wire::{Packet, Refusal};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::mesh::channel::{self, Channel};
use crate::mesh::MeshClient;
use state::{ClientState, Rejected, Route, SessionView};

/// How long a join may take before it fails.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Join packets are repeated this often until the origin answers.
const JOIN_RETRY: Duration = Duration::from_millis(200);

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

/// The handle the status socket uses. Cheap to clone.
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
            && name.len() <= peermesh_hosting_server::session::wire::MAX_NAME
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
    /// [`peermesh_hosting_server::session::game::Buttons`]).
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

/// Starts the session service of a node whose mesh peer id is `me`; `inbox`
/// is the node's `Channel::Session` queue.
pub fn spawn(
    me: String,
    mesh: MeshClient,
    inbox: mpsc::Receiver<(PeerId, Bytes)>,
) -> SessionHandle {
    let (tx, rx) = mpsc::channel(64);
    let (udp_tx, udp_rx) = mpsc::channel(1024);
    let svc = Service {
        me,
        mesh,
        udp_tx,
        socket: None,
        joining: None,
        state: None,
        links: HashMap::new(),
        epoch: 0,
        pending_buttons: Buttons::default(),
        orphans: state::Drops::default(),
    };
    tokio::spawn(svc.run(rx, inbox, udp_rx));
    SessionHandle { tx }
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
    me: String,
    mesh: MeshClient,
    udp_tx: mpsc::Sender<(u64, Vec<u8>, u64)>,
    socket: Option<Socket>,
    joining: Option<Joining>,
    state: Option<ClientState>,
    /// Cached link senders of the members' peers.
    links: HashMap<PeerId, mpsc::Sender<Bytes>>,
    /// Which socket a UDP packet came from (packets of an old one are ignored).
    epoch: u64,
    /// Buttons set before the join completed.
    pending_buttons: Buttons,
    /// Drops counted while not in a session.
    orphans: state::Drops,
}

async fn read_udp(sock: Arc<UdpSocket>, epoch: u64, tx: mpsc::Sender<(u64, Vec<u8>, u64)>) {
    let mut buf = vec![0u8; 4096];
    loop {
        match sock.recv(&mut buf).await {
            Ok(n) => {
                // Full: the service is behind; a game packet is better dropped than queued.
                let _ = tx.try_send((epoch, buf[..n].to_vec(), now_us()));
            }
            Err(e) => {
                // ICMP port unreachable while the origin is down, for one.
                tracing::debug!(error = %e, "session socket");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Service {
    fn drops(&mut self) -> &mut state::Drops {
        match &mut self.state {
            Some(s) => &mut s.drops,
            None => &mut self.orphans,
        }
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inbox: mpsc::Receiver<(PeerId, Bytes)>,
        mut udp: mpsc::Receiver<(u64, Vec<u8>, u64)>,
    ) {
        let mut period = JOIN_RETRY;
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                c = commands.recv() => match c {
                    Some(c) => self.on_command(c).await,
                    None => break,
                },
                m = inbox.recv() => match m {
                    Some((peer, bytes)) => self.on_mesh(peer, &bytes),
                    // The node stopped.
                    None => break,
                },
                Some((epoch, bytes, at)) = udp.recv() => {
                    if epoch == self.epoch {
                        self.on_udp(&bytes, at).await;
                    }
                }
                _ = ticker.tick() => self.on_tick().await,
            }
            let want = match &self.state {
                Some(s) => Duration::from_secs_f64(1.0 / f64::from(s.tick_hz)),
                None => JOIN_RETRY,
            };
            if want != period {
                period = want;
                ticker = tokio::time::interval(period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            }
        }
        self.leave().await;
    }

    async fn on_command(&mut self, c: Command) {
        match c {
            Command::Join {
                origin,
                name,
                reply,
            } => {
                self.leave().await;
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
                self.leave().await;
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

    async fn leave(&mut self) {
        if let Some(j) = self.joining.take() {
            let _ = j.reply.send(Err(SessionError::Superseded));
        }
        if let (Some(s), Some(sock)) = (self.state.take(), &self.socket) {
            tracing::info!(session = s.session, slot = s.slot, "leaving the session");
            let p = Packet::Leave {
                session: s.session,
                secret: s.secret,
                slot: s.slot,
            };
            let _ = sock.sock.send(&p.encode()).await;
        }
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
            let msg = channel::tag(
                Channel::Session,
                &Packet::Inputs(state.mesh_batch(input)).encode(),
            );
            let peers: Vec<PeerId> = state.peers().filter_map(|(_, p)| p.parse().ok()).collect();
            for peer in peers {
                self.send_mesh(peer, msg.clone()).await;
            }
        }
        if let Some(state) = &mut self.state {
            // Predict the present: the snapshot of this tick will be checked against it.
            state.merged(now);
        }
    }

    /// Queues a message on `peer`'s link without waiting: an input that
    /// cannot go now is stale by the next tick anyway.
    async fn send_mesh(&mut self, peer: PeerId, msg: Bytes) {
        for attempt in 0..2 {
            let tx = match self.links.get(&peer) {
                Some(tx) => tx.clone(),
                None => match self.mesh.link_sender(peer).await {
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
            match tx.try_send(msg.clone()) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.drops().mesh_queue_full += 1;
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The link was replaced: ask the mesh again, once.
                    self.links.remove(&peer);
                    if attempt == 1 {
                        self.drops().mesh_no_link += 1;
                    }
                }
            }
        }
    }

    fn on_mesh(&mut self, peer: PeerId, bytes: &[u8]) {
        let now = now_us();
        let batch = match Packet::decode(bytes) {
            Ok(Packet::Inputs(b)) => b,
            Ok(_) | Err(_) => {
                self.drops().malformed_mesh += 1;
                tracing::debug!(%peer, "malformed session message from a peer");
                return;
            }
        };
        let Some(state) = &mut self.state else {
            self.orphans.foreign_mesh += 1;
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

/// Starts the session service of `node` on its `Channel::Session` inbox and
/// attaches it to the status socket (call before [`crate::Node::run`]).
pub fn attach(node: &mut crate::Node) -> Result<(), crate::NodeError> {
    let inbox = node
        .take_inbox(Channel::Session)
        .ok_or_else(|| crate::NodeError::Status("the session channel is already taken".into()))?;
    let handle = spawn(node.membership().node_id.clone(), node.mesh_client(), inbox);
    node.attach_session(handle);
    Ok(())
}
