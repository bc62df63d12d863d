//! The mesh: one link worker per member of the group, the swarm task under
//! them, and the routing of events between the two. The control session
//! feeds it the network map; it answers with where this node is reachable
//! and how each link is doing.

pub mod channel;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use bytes::Bytes;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::error::Result;
use crate::link::{self, LinkHandle, LinkInput, LinkOutput, LinkStatus};
use crate::swarm::{self, link_protocol, Command as SwarmCommand, RelayEntry};

#[derive(Debug)]
pub enum MeshCommand {
    /// A member, with the addresses it published.
    Upsert {
        peer: PeerId,
        addresses: Vec<String>,
    },
    Remove {
        peer: PeerId,
    },
    Relays(Vec<RelayEntry>),
    /// The sending side of `peer`'s link. Callers queue messages on it
    /// themselves, so a full link holds up only them, never the mesh.
    LinkSender {
        peer: PeerId,
        reply: oneshot::Sender<Option<mpsc::Sender<Bytes>>>,
    },
}

/// A service's handle on the mesh: links to send on and the node's view of
/// its peers. Cheap to clone.
#[derive(Clone)]
pub struct MeshClient {
    pub commands: mpsc::Sender<MeshCommand>,
    pub status: tokio::sync::watch::Receiver<crate::status::NodeStatus>,
}

impl MeshClient {
    /// The sending side of `peer`'s link; messages on it must be
    /// [`channel::tag`]ged. `None` when the peer is not a member.
    pub async fn link_sender(&self, peer: PeerId) -> Option<mpsc::Sender<Bytes>> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(MeshCommand::LinkSender { peer, reply })
            .await
            .ok()?;
        rx.await.ok().flatten()
    }

    /// Sends one message on `ch` to `peer`, waiting while its link is full.
    pub async fn send(&self, peer: PeerId, ch: channel::Channel, payload: &[u8]) -> bool {
        match self.link_sender(peer).await {
            Some(tx) => tx.send(channel::tag(ch, payload)).await.is_ok(),
            None => false,
        }
    }
}

#[derive(Debug)]
pub enum MeshEvent {
    Reachable(Vec<Multiaddr>),
    Link(PeerId, LinkStatus),
}

pub struct MeshHandle {
    pub commands: mpsc::Sender<MeshCommand>,
    pub events: mpsc::Receiver<MeshEvent>,
    /// Messages from peers, per channel, in order per peer.
    pub inboxes: channel::Inboxes,
    pub local_peer_id: PeerId,
}

/// Addresses to dial a peer at, from what it published: relay circuits
/// first (they work from anywhere), completed with the peer's id.
fn dial_addresses(peer: PeerId, published: &[String]) -> Vec<Multiaddr> {
    let mut circuits = Vec::new();
    for a in published {
        let Ok(mut m) = a.parse::<Multiaddr>() else {
            continue;
        };
        if !link_protocol::is_relayed(&m) {
            continue;
        }
        if !matches!(m.iter().last(), Some(Protocol::P2p(_))) {
            m.push(Protocol::P2p(peer));
        }
        circuits.push(m);
    }
    circuits
}

struct Mesh {
    me: PeerId,
    swarm: mpsc::Sender<SwarmCommand>,
    links: HashMap<PeerId, LinkHandle>,
    link_out: mpsc::Sender<LinkOutput>,
    events: mpsc::Sender<MeshEvent>,
    sinks: channel::Sinks,
    relays: HashSet<PeerId>,
}

pub fn spawn(keypair: Keypair, listen: SocketAddr) -> Result<MeshHandle> {
    let swarm::SwarmHandle {
        commands: swarm_tx,
        events: swarm_rx,
        local_peer_id,
    } = swarm::spawn(keypair, listen)?;
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let (sinks, inboxes) = channel::inboxes(4096);
    let (out_tx, out_rx) = mpsc::channel(4096);
    let mesh = Mesh {
        me: local_peer_id,
        swarm: swarm_tx,
        links: HashMap::new(),
        link_out: out_tx,
        events: ev_tx,
        sinks,
        relays: HashSet::new(),
    };
    tokio::spawn(mesh.run(cmd_rx, swarm_rx, out_rx));
    Ok(MeshHandle {
        commands: cmd_tx,
        events: ev_rx,
        inboxes,
        local_peer_id,
    })
}

impl Mesh {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<MeshCommand>,
        mut swarm_events: mpsc::Receiver<swarm::Event>,
        mut link_out: mpsc::Receiver<LinkOutput>,
    ) {
        loop {
            tokio::select! {
                c = commands.recv() => match c {
                    Some(c) => self.on_command(c).await,
                    None => return,
                },
                e = swarm_events.recv() => match e {
                    Some(e) => self.on_swarm(e).await,
                    None => return,
                },
                o = link_out.recv() => match o {
                    Some(LinkOutput::Status(peer, s)) => {
                        if self.events.send(MeshEvent::Link(peer, s)).await.is_err() { return; }
                    }
                    None => return,
                },
            }
        }
    }

    async fn on_command(&mut self, c: MeshCommand) {
        match c {
            MeshCommand::Upsert { peer, addresses } => {
                if peer == self.me {
                    return;
                }
                let link = self.links.entry(peer).or_insert_with(|| {
                    link::spawn(
                        self.me,
                        peer,
                        self.swarm.clone(),
                        self.link_out.clone(),
                        self.sinks.clone(),
                    )
                });
                let _ = link
                    .input
                    .send(LinkInput::Addresses(dial_addresses(peer, &addresses)))
                    .await;
                let _ = self.swarm.send(SwarmCommand::Allow(peer)).await;
            }
            MeshCommand::Remove { peer } => {
                // Dropping the handle stops the worker; the swarm refuses
                // and drops the peer's connections.
                self.links.remove(&peer);
                let _ = self.swarm.send(SwarmCommand::Disallow(peer)).await;
            }
            MeshCommand::Relays(list) => {
                self.relays = list.iter().map(|r| r.id).collect();
                let _ = self.swarm.send(SwarmCommand::SetRelays(list)).await;
            }
            MeshCommand::LinkSender { peer, reply } => {
                let _ = reply.send(self.links.get(&peer).map(|l| l.send.clone()));
            }
        }
    }

    async fn on_swarm(&mut self, e: swarm::Event) {
        use link_protocol::Event as L;
        let route = |peer: &PeerId| self.links.get(peer).map(|l| l.input.clone());
        match e {
            swarm::Event::Reachable(addrs) => {
                let _ = self.events.send(MeshEvent::Reachable(addrs)).await;
            }
            swarm::Event::HomeRelay(_) | swarm::Event::DirectUpgrade { .. } => {}
            swarm::Event::Rtt {
                peer,
                connection,
                rtt,
            } => {
                if let Some(tx) = route(&peer) {
                    let _ = tx.send(LinkInput::Rtt { connection, rtt }).await;
                }
            }
            swarm::Event::Link(ev) => {
                let (peer, input) = match ev {
                    L::Connected {
                        peer,
                        connection,
                        relayed,
                        ..
                    } => (
                        peer,
                        LinkInput::Connected {
                            connection,
                            relayed,
                        },
                    ),
                    L::Disconnected { peer, connection } => {
                        (peer, LinkInput::Disconnected { connection })
                    }
                    L::Stream {
                        peer,
                        connection,
                        stream,
                        ..
                    } => (peer, LinkInput::Stream { connection, stream }),
                    L::OpenFailed {
                        peer,
                        connection,
                        error,
                    } => {
                        tracing::debug!(%peer, ?connection, %error, "link stream failed to open");
                        return;
                    }
                };
                match route(&peer) {
                    Some(tx) => {
                        let _ = tx.send(input).await;
                    }
                    None if self.relays.contains(&peer) => {}
                    None => {
                        tracing::debug!(%peer, "connection from a non-member; dropping it");
                        let _ = self.swarm.send(SwarmCommand::Disconnect { peer }).await;
                    }
                }
            }
        }
    }
}
