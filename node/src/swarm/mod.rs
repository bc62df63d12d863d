//! The node's libp2p swarm: QUIC, relay client, DCUtR, identify, ping and
//! the link protocol, run as one task that takes commands and reports events.
//!
//! What it does on its own: keeps a connection to every relay in the
//! directory, picks the home relay by measured RTT (and reported load),
//! holds a reservation there, and tells the node which addresses it can be
//! reached at (the relay circuit first, then direct candidates). DCUtR
//! upgrades every relayed connection to a direct one when it can; the link
//! layer sees both connections and moves traffic between them.

pub mod link_protocol;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{dcutr, identify, identity::Keypair, noise, ping, relay, yamux, Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::error::{NodeError, Result};
use crate::relay::{quic_addr, IDENTIFY_PROTOCOL};

/// A QUIC connection that has heard nothing from the other side for this
/// long is closed, which takes its path down in the link worker so that the
/// stream moves to another path. libp2p's default (10 s) left a cut direct
/// path holding the stream still for 10 s before the relay took over. The
/// peer's value may lower it (QUIC uses the smaller of the two).
const QUIC_IDLE_TIMEOUT_MS: u32 = 3_000;
/// Keep-alive PINGs, so that a live but quiet connection is never idle for
/// [`QUIC_IDLE_TIMEOUT_MS`].
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(1);

#[derive(NetworkBehaviour)]
pub struct MeshBehaviour {
    /// Only members of the current network map and relays of the directory
    /// may connect; everyone else is refused at the connection level.
    allow: allow_block_list::Behaviour<AllowedPeers>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    link: link_protocol::Behaviour,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RelayEntry {
    pub id: PeerId,
    pub addrs: Vec<Multiaddr>,
    pub load: u32,
}

#[derive(Debug)]
pub enum Command {
    /// The relays of the directory (from the network map).
    SetRelays(Vec<RelayEntry>),
    /// Make sure a connection to `peer` exists, trying `addrs` (relay circuit
    /// addresses first).
    Connect {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    OpenStream {
        peer: PeerId,
        connection: ConnectionId,
    },
    Disconnect {
        peer: PeerId,
    },
    Allow(PeerId),
    Disallow(PeerId),
}

#[derive(Debug)]
pub enum Event {
    /// Where this node can be reached now; to publish through the control server.
    Reachable(Vec<Multiaddr>),
    HomeRelay(Option<PeerId>),
    Link(link_protocol::Event),
    Rtt {
        peer: PeerId,
        connection: ConnectionId,
        rtt: Duration,
    },
    DirectUpgrade {
        peer: PeerId,
        ok: bool,
        error: Option<String>,
    },
}

pub struct SwarmHandle {
    pub commands: mpsc::Sender<Command>,
    pub events: mpsc::Receiver<Event>,
    pub local_peer_id: PeerId,
}

pub fn circuit_addr(relay_addr: &Multiaddr, relay: PeerId) -> Multiaddr {
    let mut a = relay_addr.clone();
    if !matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.push(Protocol::P2p(relay));
    }
    a.with(Protocol::P2pCircuit)
}

struct RelayState {
    entry: RelayEntry,
    rtt: Option<Duration>,
    connected: bool,
}

struct Task {
    swarm: libp2p::Swarm<MeshBehaviour>,
    events: mpsc::Sender<Event>,
    relays: HashMap<PeerId, RelayState>,
    home: Option<PeerId>,
    home_since: Option<std::time::Instant>,
    reservation: Option<Multiaddr>,
    listen: HashSet<Multiaddr>,
    observed: Option<Multiaddr>,
    last_reachable: Vec<Multiaddr>,
}

/// Starts the swarm task listening on `listen` (UDP, QUIC).
pub fn spawn(keypair: Keypair, listen: SocketAddr) -> Result<SwarmHandle> {
    let local_peer_id = keypair.public().to_peer_id();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic_config(|mut c| {
            c.max_idle_timeout = QUIC_IDLE_TIMEOUT_MS;
            c.keep_alive_interval = QUIC_KEEP_ALIVE;
            c
        })
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NodeError::Swarm(e.to_string()))?
        .with_behaviour(|key, relay_client| MeshBehaviour {
            allow: allow_block_list::Behaviour::default(),
            relay_client,
            dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(2))),
            link: link_protocol::Behaviour::default(),
        })
        .map_err(|e| NodeError::Swarm(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let mut task = Task {
        swarm,
        events: ev_tx,
        relays: HashMap::new(),
        home: None,
        home_since: None,
        reservation: None,
        listen: HashSet::new(),
        observed: None,
        last_reachable: Vec::new(),
    };
    task.swarm
        .listen_on(quic_addr(listen))
        .map_err(|e| NodeError::Swarm(format!("listening on {listen}: {e}")))?;
    tokio::spawn(task.run(cmd_rx));
    Ok(SwarmHandle {
        commands: cmd_tx,
        events: ev_rx,
        local_peer_id,
    })
}

/// The node is gone when this fails; the task ends with the command channel.
async fn emit(events: &mpsc::Sender<Event>, ev: Event) {
    let _ = events.send(ev).await;
}

impl Task {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut rechoose = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                ev = self.swarm.select_next_some() => self.on_swarm(ev).await,
                _ = rechoose.tick() => {
                    if self.reservation.is_none() && self.home_since.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
                        tracing::warn!(relay = ?self.home, "no reservation yet; asking again");
                        self.home = None;
                    }
                    self.choose_home();
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::SetRelays(list) => {
                let ids: HashSet<PeerId> = list.iter().map(|r| r.id).collect();
                for gone in self.relays.keys().filter(|id| !ids.contains(id)) {
                    self.swarm.behaviour_mut().allow.disallow_peer(*gone);
                }
                self.relays.retain(|id, _| ids.contains(id));
                for id in &ids {
                    self.swarm.behaviour_mut().allow.allow_peer(*id);
                }
                for entry in list {
                    let id = entry.id;
                    let st = self.relays.entry(id).or_insert(RelayState {
                        entry: entry.clone(),
                        rtt: None,
                        connected: false,
                    });
                    st.entry = entry;
                    if !self.swarm.is_connected(&id) {
                        let opts = DialOpts::peer_id(id)
                            .addresses(st.entry.addrs.clone())
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        if let Err(e) = self.swarm.dial(opts) {
                            tracing::debug!(relay = %id, error = %e, "dialing relay");
                        }
                    }
                }
                if self.home.is_some_and(|h| !self.relays.contains_key(&h)) {
                    tracing::warn!(relay = ?self.home, "home relay left the directory");
                    self.home = None;
                    self.reservation = None;
                }
                self.choose_home();
            }
            Command::Connect { peer, addrs } => {
                if self.swarm.is_connected(&peer) {
                    return;
                }
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::debug!(%peer, error = %e, "dial");
                }
            }
            Command::OpenStream { peer, connection } => {
                self.swarm
                    .behaviour_mut()
                    .link
                    .open_stream(peer, connection);
            }
            Command::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Allow(peer) => {
                self.swarm.behaviour_mut().allow.allow_peer(peer);
            }
            Command::Disallow(peer) => {
                self.swarm.behaviour_mut().allow.disallow_peer(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    /// The home relay: lowest measured RTT, load breaking near-ties. Kept
    /// while it is connected, so reservations do not flap.
    fn choose_home(&mut self) {
        if let Some(h) = self.home {
            if self.relays.get(&h).is_some_and(|r| r.connected) {
                return;
            }
        }
        let best = self
            .relays
            .values()
            .filter(|r| r.connected)
            .min_by_key(|r| {
                let rtt = r.rtt.map_or(u128::MAX / 2, |d| d.as_micros());
                // 1 ms of RTT weighs as much as 100 open circuits.
                rtt + u128::from(r.entry.load) * 10
            });
        let Some(best) = best else { return };
        let id = best.entry.id;
        let Some(addr) = best.entry.addrs.first().cloned() else {
            return;
        };
        let circuit = circuit_addr(&addr, id);
        match self.swarm.listen_on(circuit.clone()) {
            Ok(_) => {
                tracing::info!(relay = %id, rtt_ms = ?best.rtt.map(|d| d.as_secs_f64() * 1e3), "home relay chosen");
                self.home = Some(id);
                self.home_since = Some(std::time::Instant::now());
            }
            Err(e) => tracing::warn!(relay = %id, error = %e, "reservation request failed"),
        }
    }

    fn reachable(&self) -> Vec<Multiaddr> {
        let mut out = Vec::new();
        if let Some(r) = &self.reservation {
            out.push(r.clone());
        }
        if let Some(o) = &self.observed {
            out.push(o.clone());
        }
        let mut local: Vec<_> = self.listen.iter().cloned().collect();
        local.sort();
        out.extend(local);
        out.dedup();
        out
    }

    async fn publish_reachable(&mut self) {
        let now = self.reachable();
        if now != self.last_reachable {
            self.last_reachable = now.clone();
            emit(&self.events, Event::Reachable(now)).await;
        }
    }

    async fn on_swarm(&mut self, ev: SwarmEvent<MeshBehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                if link_protocol::is_relayed(&address) {
                    self.reservation = Some(address);
                    emit(&self.events, Event::HomeRelay(self.home)).await;
                } else {
                    self.listen.insert(address);
                }
                self.publish_reachable().await;
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if self.reservation.as_ref() == Some(&address) {
                    self.reservation = None;
                    self.home = None;
                    emit(&self.events, Event::HomeRelay(None)).await;
                }
                self.listen.remove(&address);
                self.publish_reachable().await;
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => {
                if addresses.is_empty() {
                    // A reservation that was refused or failed before it
                    // was ever up: ask again (choose_home below).
                    tracing::warn!(?reason, "relay reservation failed");
                    self.home = None;
                }
                for a in addresses {
                    if self.reservation.as_ref() == Some(&a) {
                        self.reservation = None;
                        self.home = None;
                        emit(&self.events, Event::HomeRelay(None)).await;
                    }
                    self.listen.remove(&a);
                }
                self.publish_reachable().await;
                self.choose_home();
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                if let Some(r) = self.relays.get_mut(&peer_id) {
                    r.connected = true;
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } if self.relays.contains_key(&peer_id) => {
                if let Some(r) = self.relays.get_mut(&peer_id) {
                    r.connected = false;
                    r.rtt = None;
                }
                if self.home == Some(peer_id) {
                    tracing::warn!(relay = %peer_id, "home relay connection lost");
                    self.home = None;
                    self.reservation = None;
                    emit(&self.events, Event::HomeRelay(None)).await;
                    self.publish_reachable().await;
                    self.choose_home();
                }
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Ok(rtt),
            })) => {
                if let Some(r) = self.relays.get_mut(&peer) {
                    r.rtt = Some(rtt);
                    if self.home.is_none() {
                        self.choose_home();
                    }
                } else {
                    emit(
                        &self.events,
                        Event::Rtt {
                            peer,
                            connection,
                            rtt,
                        },
                    )
                    .await;
                }
            }
            // A relay's view of our address is the public one (seed 001).
            SwarmEvent::Behaviour(MeshBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if self.relays.contains_key(&peer_id)
                && !link_protocol::is_relayed(&info.observed_addr)
                && self.observed.as_ref() != Some(&info.observed_addr) =>
            {
                // Not confirmed as external on purpose: identify has queued it
                // as a candidate, which is what DCUtR sends; the swarm drops
                // candidates that are already confirmed.
                tracing::info!(relay = %peer_id, observed = %info.observed_addr, "public address observed");
                self.observed = Some(info.observed_addr);
                self.publish_reachable().await;
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => {
                let (ok, error) = match result {
                    Ok(_) => (true, None),
                    Err(e) => (false, Some(e.to_string())),
                };
                tracing::debug!(peer = %remote_peer_id, ok, ?error, "direct connection upgrade");
                emit(
                    &self.events,
                    Event::DirectUpgrade {
                        peer: remote_peer_id,
                        ok,
                        error,
                    },
                )
                .await;
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::Link(ev)) => {
                emit(&self.events, Event::Link(ev)).await;
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::RelayClient(ev)) => {
                tracing::debug!(event = ?ev, "relay client");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
            }
            _ => {}
        }
    }
}
