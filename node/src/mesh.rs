//! The mesh: one link worker per member of the group, the swarm task under
//! them, and the routing of events between the two. The control session
//! feeds it the network map; it answers with where this node is reachable
//! and how each link is doing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::Stream;
use libp2p::{Multiaddr, PeerId};
use peermesh_base::PathKind;
use tokio::sync::{mpsc, oneshot};

use crate::error::Result;
use crate::link::{self, LinkConfig, LinkHandle, LinkInput, LinkOutput, LinkStatus, PathEvent};
use crate::protocol::Dispatch;
use crate::swarm::{self, link_protocol, Command as SwarmCommand, RelayEntry};

/// Commands queued towards the mesh actor, and its events towards the
/// endpoint's control session.
const COMMAND_QUEUE: usize = 1024;
const EVENT_QUEUE: usize = 1024;
/// Status reports and punch wishes queued from all link workers.
const LINK_OUTPUT_QUEUE: usize = 4096;

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
    /// The sending side of `protocol`'s flow on `peer`'s link. Callers
    /// queue messages (with their protocol header) on it themselves, so a
    /// full flow holds up only them, never the mesh or another protocol.
    LinkSender {
        peer: PeerId,
        protocol: Bytes,
        reply: oneshot::Sender<Option<mpsc::Sender<Bytes>>>,
    },
    /// Carry out this node's part of a punch the control server coordinates
    /// (see [`SwarmCommand::Punch`]).
    Punch {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        open_first: bool,
        started: Option<oneshot::Sender<()>>,
    },
}

/// How direct paths are punched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PunchMode {
    /// Coordinated by the control server (seed 002) only.
    Control,
    /// libp2p DCUtR over the relayed connection only.
    Dcutr,
    /// Both at once; whichever gets there first carries the traffic.
    Both,
}

#[derive(Debug)]
pub enum MeshEvent {
    Reachable(Vec<Multiaddr>),
    /// A link wants a coordinated punch to this peer.
    PunchWanted(PeerId),
    Link(PeerId, LinkStatus),
    Path(PeerId, PathEvent),
    /// The relay this node holds its reservation at, or none.
    HomeRelay(Option<PeerId>),
}

pub struct MeshHandle {
    pub commands: mpsc::Sender<MeshCommand>,
    pub events: mpsc::Receiver<MeshEvent>,
    /// Hands sockets the hole puncher got through to QUIC.
    pub adopter: swarm::punched::Adopter,
}

/// Circuits to dial a peer at, from what it published, completed with the
/// peer's id: through relay servers (they work from anywhere), and through
/// members that forward, only those this node reaches directly, the one
/// with the lowest RTT first (`direct_rtt`: member → RTT of our direct
/// path to it).
fn dial_addresses(
    peer: PeerId,
    published: &[String],
    relays: &HashSet<PeerId>,
    direct_rtt: &HashMap<PeerId, f64>,
) -> (Vec<Multiaddr>, Vec<Multiaddr>) {
    let mut relayed = Vec::new();
    let mut forwarded = Vec::new();
    for a in published {
        let Ok(mut m) = a.parse::<Multiaddr>() else {
            continue;
        };
        let Some(via) = link_protocol::relay_of(&m) else {
            continue;
        };
        if !matches!(m.iter().last(), Some(Protocol::P2p(_))) {
            m.push(Protocol::P2p(peer));
        }
        if relays.contains(&via) {
            relayed.push(m);
        } else if let Some(rtt) = direct_rtt.get(&via) {
            forwarded.push((*rtt, m));
        }
    }
    forwarded.sort_by(|a, b| a.0.total_cmp(&b.0));
    (relayed, forwarded.into_iter().map(|(_, m)| m).collect())
}

struct Mesh {
    me: PeerId,
    swarm: mpsc::Sender<SwarmCommand>,
    links: HashMap<PeerId, LinkHandle<Stream>>,
    link_out: mpsc::Sender<LinkOutput>,
    events: mpsc::Sender<MeshEvent>,
    dispatch: Arc<Dispatch>,
    relays: HashSet<PeerId>,
    punch: PunchMode,
    /// What each member published, to recompute its dial addresses when
    /// the set of members we reach directly changes.
    published: HashMap<PeerId, Vec<String>>,
    /// Members we have a direct path to, with its RTT (ms).
    direct_rtt: HashMap<PeerId, f64>,
}

/// `forward`: whether this node forwards for other members (seed 004);
/// `dispatch`: where links deliver messages from peers.
pub fn spawn(
    keypair: Keypair,
    listen: SocketAddr,
    punch: PunchMode,
    forward: bool,
    dispatch: Arc<Dispatch>,
) -> Result<MeshHandle> {
    let swarm::SwarmHandle {
        commands: swarm_tx,
        events: swarm_rx,
        local_peer_id,
        adopter,
    } = swarm::spawn(keypair, listen, punch != PunchMode::Control, forward)?;
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let (out_tx, out_rx) = mpsc::channel(LINK_OUTPUT_QUEUE);
    let mesh = Mesh {
        me: local_peer_id,
        swarm: swarm_tx,
        links: HashMap::new(),
        link_out: out_tx,
        events: ev_tx,
        dispatch,
        relays: HashSet::new(),
        punch,
        published: HashMap::new(),
        direct_rtt: HashMap::new(),
    };
    tokio::spawn(mesh.run(cmd_rx, swarm_rx, out_rx));
    Ok(MeshHandle {
        commands: cmd_tx,
        events: ev_rx,
        adopter,
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
                        self.on_link_status(peer, &s).await;
                        if self.events.send(MeshEvent::Link(peer, s)).await.is_err() { return; }
                    }
                    Some(LinkOutput::PunchWanted(peer)) => {
                        if self.events.send(MeshEvent::PunchWanted(peer)).await.is_err() { return; }
                    }
                    Some(LinkOutput::Path(peer, e)) => {
                        if self.events.send(MeshEvent::Path(peer, e)).await.is_err() { return; }
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
                // Allowed before its link can dial: a dial to a peer the
                // allow list refuses fails silently (no `DialFailed`), and
                // the link would wait for its next regular redial.
                let _ = self.swarm.send(SwarmCommand::Allow(peer)).await;
                let link = self.links.entry(peer).or_insert_with(|| {
                    link::spawn(
                        LinkConfig {
                            me: self.me,
                            peer,
                            control_punch: self.punch != PunchMode::Dcutr,
                        },
                        self.swarm.clone(),
                        self.link_out.clone(),
                        self.dispatch.clone(),
                    )
                });
                let (relay, forwarded) =
                    dial_addresses(peer, &addresses, &self.relays, &self.direct_rtt);
                let _ = link
                    .input
                    .send(LinkInput::Addresses { relay, forwarded })
                    .await;
                self.published.insert(peer, addresses);
            }
            MeshCommand::Remove { peer } => {
                // Dropping the handle stops the worker; the swarm refuses
                // and drops the peer's connections.
                self.links.remove(&peer);
                self.published.remove(&peer);
                if self.direct_rtt.remove(&peer).is_some() {
                    self.readdress().await;
                }
                let _ = self.swarm.send(SwarmCommand::Disallow(peer)).await;
            }
            MeshCommand::Relays(list) => {
                self.relays = list.iter().map(|r| r.id).collect();
                let _ = self.swarm.send(SwarmCommand::SetRelays(list)).await;
                self.readdress().await;
            }
            MeshCommand::LinkSender {
                peer,
                protocol,
                reply,
            } => {
                let _ = reply.send(self.links.get_mut(&peer).and_then(|l| l.flow(protocol)));
            }
            MeshCommand::Punch {
                peer,
                addrs,
                open_first,
                started,
            } => {
                // Only members: the control server vouches, but a map that
                // lags behind must not let a stranger in.
                if self.links.contains_key(&peer) {
                    let _ = self
                        .swarm
                        .send(SwarmCommand::Punch {
                            peer,
                            addrs,
                            open_first,
                            started,
                        })
                        .await;
                }
            }
        }
    }

    /// Keeps the set of members reached directly; when it changes, every
    /// link learns its forwarders again.
    async fn on_link_status(&mut self, peer: PeerId, s: &LinkStatus) {
        let before = self.direct_rtt.get(&peer).copied();
        if s.path == Some(PathKind::Direct) {
            self.direct_rtt
                .insert(peer, s.rtt_ms.unwrap_or(f64::MAX / 2.0));
        } else {
            self.direct_rtt.remove(&peer);
        }
        // RTT jitter alone does not reorder forwarders often enough to matter.
        if before.is_some() != self.direct_rtt.contains_key(&peer) {
            self.readdress().await;
        }
    }

    async fn readdress(&mut self) {
        for (peer, published) in &self.published {
            let Some(link) = self.links.get(peer) else {
                continue;
            };
            let (relay, forwarded) =
                dial_addresses(*peer, published, &self.relays, &self.direct_rtt);
            let _ = link
                .input
                .send(LinkInput::Addresses { relay, forwarded })
                .await;
        }
    }

    async fn on_swarm(&mut self, e: swarm::Event) {
        use link_protocol::Event as L;
        let route = |peer: &PeerId| self.links.get(peer).map(|l| l.input.clone());
        match e {
            swarm::Event::Reachable(addrs) => {
                let _ = self.events.send(MeshEvent::Reachable(addrs)).await;
            }
            swarm::Event::HomeRelay(relay) => {
                let _ = self.events.send(MeshEvent::HomeRelay(relay)).await;
            }
            swarm::Event::DialFailed { peer } => {
                if let Some(tx) = route(&peer) {
                    let _ = tx.send(LinkInput::DialFailed).await;
                }
            }
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
                        via,
                        ..
                    } => {
                        let kind = match via {
                            _ if !relayed => PathKind::Direct,
                            Some(v) if !self.relays.contains(&v) => PathKind::Forwarded,
                            _ => PathKind::Relay,
                        };
                        (
                            peer,
                            LinkInput::Connected {
                                connection,
                                kind,
                                via,
                            },
                        )
                    }
                    L::Disconnected { peer, connection } => {
                        (peer, LinkInput::Disconnected { connection })
                    }
                    L::Stream {
                        peer,
                        connection,
                        stream,
                        inbound,
                    } => {
                        tracing::debug!(%peer, ?connection, inbound, "link stream");
                        (peer, LinkInput::Stream { connection, stream })
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_addresses_split_relays_from_forwarders_and_rank_forwarders_by_rtt() {
        let (peer, relay, near, far, unknown) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        let circuit = |via: PeerId| format!("/ip4/192.0.2.1/udp/1/quic-v1/p2p/{via}/p2p-circuit");
        let published = vec![
            "/ip4/198.51.100.1/udp/9/quic-v1".to_string(),
            circuit(far),
            circuit(unknown),
            circuit(relay),
            circuit(near),
            "not a multiaddr".to_string(),
        ];
        let relays = HashSet::from([relay]);
        let rtt = HashMap::from([(near, 1.5), (far, 20.0)]);
        let (r, f) = dial_addresses(peer, &published, &relays, &rtt);
        let with_peer =
            |via| -> Multiaddr { format!("{}/p2p/{peer}", circuit(via)).parse().unwrap() };
        assert_eq!(r, vec![with_peer(relay)]);
        // `unknown` is a member we have no direct path to: useless as a forwarder.
        assert_eq!(f, vec![with_peer(near), with_peer(far)]);
    }
}
