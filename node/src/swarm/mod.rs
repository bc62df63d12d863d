//! The node's libp2p swarm: QUIC, relay client, DCUtR, identify, ping and
//! the link protocol, run as one task that takes commands and reports events.
//!
//! What it does on its own: keeps a connection to every relay in the
//! directory, picks the home relay by measured RTT (and reported load),
//! holds a reservation there, and tells the node which addresses it can be
//! reached at (the relay circuit first, then direct candidates). DCUtR
//! upgrades every relayed connection to a direct one when it can; the link
//! layer sees both connections and moves traffic between them.

pub mod forward;
pub mod link_protocol;
pub mod punched;
mod relay_ping;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{dcutr, identify, identity::Keypair, noise, ping, relay, yamux, Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::error::{NodeError, Result};
use peermesh_relay::config::per_peer_rates;
use peermesh_relay::{quic_addr, IDENTIFY_PROTOCOL};

/// A QUIC connection that has heard nothing from the other side for this
/// long is closed. A link does not wait for it: its path switch finds a
/// silent path dead within a second of using it and moves the stream; this
/// only reclaims connections nobody probes. The peer's value may lower it
/// (QUIC uses the smaller of the two).
const QUIC_IDLE_TIMEOUT_MS: u32 = 15_000;
/// Keep-alive PINGs, so that a live but quiet connection is never idle for
/// [`QUIC_IDLE_TIMEOUT_MS`] and its NAT mappings stay open (home routers
/// keep an idle UDP mapping for 30 s or more; Linux's conntrack for 30 s).
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Pings on relay connections (only; see [`relay_ping`]): RTT for the
/// home-relay choice, and the death of a relay (a killed relay sends no
/// CONNECTION_CLOSE). A relay that misses one ping's timeout is dropped
/// and the node moves to the next-best relay (seed 001).
const PING_INTERVAL: Duration = Duration::from_millis(500);
const PING_TIMEOUT: Duration = Duration::from_millis(1000);
/// A connection that carries nothing (no stream, no circuit) is closed after
/// this long; links keep theirs busy with path-switch PINGs.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the home relay is chosen again if there is none (a relay came
/// back, or a first RTT arrived), and a missing reservation is noticed.
const HOME_RELAY_RECHECK: Duration = Duration::from_secs(1);
/// A reservation at the home relay that has not come up this long after it
/// was asked for is asked for again (the request or its answer was lost).
const RESERVATION_PATIENCE: Duration = Duration::from_secs(3);
/// Reservations members hold at this node (to be reached through it) last
/// an hour; they end anyway with the member's direct connection.
const FORWARD_RESERVATION_DURATION: Duration = Duration::from_secs(3600);
/// A forwarded circuit carries a whole peer link while no direct path
/// exists, so it may last a day.
const FORWARD_CIRCUIT_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Forwarding for members: reservations and circuits in all, per member,
/// and new ones per member and minute. A member needs one reservation
/// (two while it switches) and a circuit per peer it cannot reach
/// directly, which is few.
const FORWARD_MAX_RESERVATIONS: usize = 256;
const FORWARD_RESERVATIONS_PER_MEMBER: usize = 2;
const FORWARD_MAX_CIRCUITS: usize = 256;
const FORWARD_CIRCUITS_PER_MEMBER: usize = 4;
const FORWARD_NEW_PER_MINUTE: u32 = 30;
/// Commands queued towards the swarm task, and its events towards the mesh.
const COMMAND_QUEUE: usize = 256;
const EVENT_QUEUE: usize = 1024;

#[derive(NetworkBehaviour)]
pub struct MeshBehaviour {
    /// Only members of the current network map and relays of the directory
    /// may connect; everyone else is refused at the connection level.
    allow: allow_block_list::Behaviour<AllowedPeers>,
    relay_client: relay::client::Behaviour,
    /// Off when punching goes only through the control server's rendezvous.
    dcutr: Toggle<dcutr::Behaviour>,
    /// Forwarding for other members (seed 004): a member with no direct
    /// path to another reaches it through a member that has one, as a relay
    /// v2 circuit (end-to-end encrypted; the forwarder sees ciphertext).
    /// Off with `--no-forward`.
    forward: Toggle<forward::Forward>,
    identify: identify::Behaviour,
    ping: relay_ping::RelayPing,
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
    /// Closes one connection (a path the link found dead).
    CloseConnection(ConnectionId),
    /// One more connection to `peer`, through `addr` (a circuit through a
    /// forwarding member), even though one exists (through a relay server).
    DialVia {
        peer: PeerId,
        addr: Multiaddr,
    },
    /// A punch coordinated by the control server: with `open_first`, send
    /// opening packets to `addrs` and wait for the peer's connection (the
    /// callee's part); otherwise dial `addrs` now (the caller's part, once
    /// the callee is open). `started` fires once the dial is under way.
    Punch {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        open_first: bool,
        started: Option<tokio::sync::oneshot::Sender<()>>,
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
    /// A dial to this peer failed.
    DialFailed {
        peer: PeerId,
    },
}

pub struct SwarmHandle {
    pub commands: mpsc::Sender<Command>,
    pub events: mpsc::Receiver<Event>,
    pub local_peer_id: PeerId,
    /// Hands punched sockets to the QUIC transport.
    pub adopter: punched::Adopter,
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
    /// The reservation listener at the home relay.
    home_listener: Option<ListenerId>,
    /// Reservations at members we have a direct connection to, so that
    /// members without one can reach us through them.
    /// (member, the circuit address we publish for it).
    forward_listeners: HashMap<ListenerId, (PeerId, Multiaddr)>,
    forward_addrs: HashMap<PeerId, Multiaddr>,
    /// Members asked for a reservation while their connection lasts.
    forward_asked: HashSet<PeerId>,
}

/// Limits of the forwarding this node does for other members: few
/// reservations and circuits per member, at most 30 new ones a minute per
/// member, and no byte cap (a circuit carries a whole link).
fn forward_config() -> relay::Config {
    per_peer_rates(
        relay::Config {
            max_reservations: FORWARD_MAX_RESERVATIONS,
            max_reservations_per_peer: FORWARD_RESERVATIONS_PER_MEMBER,
            reservation_duration: FORWARD_RESERVATION_DURATION,
            max_circuits: FORWARD_MAX_CIRCUITS,
            max_circuits_per_peer: FORWARD_CIRCUITS_PER_MEMBER,
            max_circuit_duration: FORWARD_CIRCUIT_DURATION,
            // 0: no byte cap (a circuit carries a whole link).
            max_circuit_bytes: 0,
            ..Default::default()
        },
        FORWARD_NEW_PER_MINUTE,
    )
}

/// Pays aws-lc's one-time initialisation (seeding its random generator
/// takes about 70 ms on this class of machine) on a spare thread at process
/// start, beside the control-plane join, instead of inside the first QUIC
/// handshake, where it delays the first relay connection and so the first
/// byte to every peer.
pub fn warm_up_tls() {
    std::thread::spawn(|| {
        let started = std::time::Instant::now();
        let mut seed = [0u8; 32];
        let ok = rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut seed)
            .is_ok();
        tracing::debug!(
            ok,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "TLS crypto warmed up"
        );
    });
}

/// Starts the swarm task listening on `listen` (UDP, QUIC).
pub fn spawn(
    keypair: Keypair,
    listen: SocketAddr,
    dcutr: bool,
    forward: bool,
) -> Result<SwarmHandle> {
    let local_peer_id = keypair.public().to_peer_id();
    let mut adopter = None;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| {
            let mut c = libp2p::quic::Config::new(key);
            c.max_idle_timeout = QUIC_IDLE_TIMEOUT_MS;
            c.keep_alive_interval = QUIC_KEEP_ALIVE;
            let (transport, a) = punched::PunchedQuic::new(c);
            adopter = Some(a);
            transport
        })
        .map_err(|e| NodeError::Swarm(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NodeError::Swarm(e.to_string()))?
        .with_behaviour(|key, relay_client| MeshBehaviour {
            allow: allow_block_list::Behaviour::default(),
            relay_client,
            dcutr: Toggle::from(dcutr.then(|| dcutr::Behaviour::new(key.public().to_peer_id()))),
            forward: Toggle::from(
                forward.then(|| forward::Forward::new(key.public().to_peer_id(), forward_config())),
            ),
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.into(),
                key.public(),
            )),
            ping: relay_ping::RelayPing::new(
                ping::Config::new()
                    .with_interval(PING_INTERVAL)
                    .with_timeout(PING_TIMEOUT),
            ),
            link: link_protocol::Behaviour::default(),
        })
        .map_err(|e| NodeError::Swarm(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
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
        home_listener: None,
        forward_listeners: HashMap::new(),
        forward_addrs: HashMap::new(),
        forward_asked: HashSet::new(),
    };
    task.swarm
        .listen_on(quic_addr(listen))
        .map_err(|e| NodeError::Swarm(format!("listening on {listen}: {e}")))?;
    tokio::spawn(task.run(cmd_rx));
    Ok(SwarmHandle {
        commands: cmd_tx,
        events: ev_rx,
        local_peer_id,
        adopter: adopter.expect("the transport constructor ran"),
    })
}

/// The node is gone when this fails; the task ends with the command channel.
async fn emit(events: &mpsc::Sender<Event>, ev: Event) {
    let _ = events.send(ev).await;
}

impl Task {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut rechoose = tokio::time::interval(HOME_RELAY_RECHECK);
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                ev = self.swarm.select_next_some() => self.on_swarm(ev).await,
                _ = rechoose.tick() => {
                    if self.reservation.is_none() && self.home_since.is_some_and(|t| t.elapsed() > RESERVATION_PATIENCE) {
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
                self.swarm
                    .behaviour_mut()
                    .ping
                    .set_relays(ids.iter().copied());
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
            Command::CloseConnection(id) => {
                self.swarm.close_connection(id);
            }
            Command::DialVia { peer, addr } => {
                let opts = DialOpts::peer_id(peer)
                    .addresses(vec![addr])
                    .condition(PeerCondition::Always)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::debug!(%peer, error = %e, "dial through a member");
                }
            }
            Command::Punch {
                peer,
                addrs,
                open_first,
                started,
            } => {
                if addrs.is_empty() {
                    return;
                }
                // Every candidate at once: the punch is timed.
                let factor =
                    std::num::NonZeroU8::new(addrs.len().min(255) as u8).expect("not empty");
                let mut opts = DialOpts::peer_id(peer)
                    .addresses(addrs.clone())
                    .condition(PeerCondition::Always)
                    .override_dial_concurrency_factor(factor);
                if open_first {
                    opts = opts.override_role();
                }
                tracing::debug!(%peer, ?addrs, open_first, "punch");
                if let Err(e) = self.swarm.dial(opts.build()) {
                    tracing::debug!(%peer, error = %e, "punch dial");
                }
                if let Some(s) = started {
                    let _ = s.send(());
                }
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
            Ok(listener) => {
                self.home_listener = Some(listener);
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
        let mut forwarded: Vec<_> = self.forward_addrs.values().cloned().collect();
        forwarded.sort();
        out.extend(forwarded);
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
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if let Some((member, circuit)) = self.forward_listeners.get(&listener_id) {
                    // Published as we dialed the member, not as the
                    // reservation says: a member's own addresses may be
                    // relay circuits, and circuits do not nest. Whoever uses
                    // it goes through its own direct connection to the member.
                    tracing::info!(%member, %circuit, reserved = %address, "reachable through a member");
                    self.forward_addrs.insert(*member, circuit.clone());
                } else if link_protocol::is_relayed(&address) {
                    self.reservation = Some(address);
                    emit(&self.events, Event::HomeRelay(self.home)).await;
                } else {
                    self.listen.insert(address);
                }
                self.publish_reachable().await;
            }
            SwarmEvent::ExpiredListenAddr {
                listener_id,
                address,
            } => {
                if let Some((member, _)) = self.forward_listeners.get(&listener_id) {
                    self.forward_addrs.remove(member);
                } else if self.reservation.as_ref() == Some(&address) {
                    self.reservation = None;
                    self.home = None;
                    emit(&self.events, Event::HomeRelay(None)).await;
                }
                self.listen.remove(&address);
                self.publish_reachable().await;
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } if self.forward_listeners.contains_key(&listener_id) => {
                let (member, _) = self
                    .forward_listeners
                    .remove(&listener_id)
                    .expect("checked");
                tracing::debug!(%member, ?reason, "reservation at a member ended");
                self.forward_addrs.remove(&member);
                drop(addresses);
                self.publish_reachable().await;
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                if addresses.is_empty() && self.home_listener == Some(listener_id) {
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
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if let Some(r) = self.relays.get_mut(&peer_id) {
                    r.connected = true;
                } else if !endpoint.is_relayed()
                    && !link_protocol::is_relayed(endpoint.get_remote_address())
                    && self.forward_asked.insert(peer_id)
                {
                    // A direct connection to a member: reserve there, so
                    // members that cannot reach us directly may go through it.
                    let circuit = circuit_addr(endpoint.get_remote_address(), peer_id);
                    match self.swarm.listen_on(circuit.clone()) {
                        Ok(id) => {
                            let published =
                                circuit.with(Protocol::P2p(*self.swarm.local_peer_id()));
                            self.forward_listeners.insert(id, (peer_id, published));
                        }
                        Err(e) => {
                            tracing::debug!(member = %peer_id, error = %e, "reservation at a member")
                        }
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } if !self.relays.contains_key(&peer_id) => {
                // Its reservation (if any) ends with the connection; ask
                // again on the next direct one.
                self.forward_asked.remove(&peer_id);
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
            // Pings run on relay connections only (see `relay_ping`).
            SwarmEvent::Behaviour(MeshBehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                if let Some(r) = self.relays.get_mut(&peer) {
                    r.rtt = Some(rtt);
                    if self.home.is_none() {
                        self.choose_home();
                    }
                }
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(error),
            })) => {
                tracing::warn!(relay = %peer, %error, home = self.home == Some(peer), "relay silent; dropping its connection");
                self.swarm.close_connection(connection);
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
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::Link(ev)) => {
                emit(&self.events, Event::Link(ev)).await;
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::RelayClient(ev)) => {
                tracing::debug!(event = ?ev, "relay client");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
                if let Some(peer) = peer_id {
                    emit(&self.events, Event::DialFailed { peer }).await;
                }
            }
            _ => {}
        }
    }
}
