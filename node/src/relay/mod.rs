//! The relay server (`meshnode relay`, seed 001): a libp2p circuit relay v2
//! that registers in the control server's directory, serves only the nodes
//! the control server vouches for, observes each node's public address (via
//! identify) and reports its load.
//!
//! The relay sees only ciphertext: circuits carry Noise-encrypted streams
//! between the two nodes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, ping, relay, Multiaddr, PeerId, SwarmBuilder};
use peermesh_proto::api::{member_update::Kind, RelayLoad};
use tokio::time::{interval, sleep, MissedTickBehavior};
use tonic::Code;

use crate::control::relay::RelayControlClient;
use crate::error::{NodeError, Result};
use crate::state_dir::{peer_id, StateDir};

pub const IDENTIFY_PROTOCOL: &str = "/peermesh/id/1";

#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    /// Addresses to advertise; the listen address when empty (it must then
    /// be a concrete, reachable address).
    pub external: Vec<Multiaddr>,
    pub control_url: String,
    pub token: String,
    pub region: String,
    pub state_dir: PathBuf,
    /// Per-node limits.
    pub max_circuits_per_peer: usize,
    pub max_reservations_per_peer: usize,
}

#[derive(NetworkBehaviour)]
struct RelayBehaviour {
    allow: allow_block_list::Behaviour<AllowedPeers>,
    relay: relay::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

pub fn quic_addr(addr: SocketAddr) -> Multiaddr {
    Multiaddr::from(addr.ip())
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1)
}

/// Relay v2 limits sized for relays that carry real traffic: the defaults
/// (128 KiB and 2 minutes per circuit) are for bootstrapping only.
fn relay_config(c: &RelayConfig) -> relay::Config {
    per_peer_rates(
        relay::Config {
            max_reservations: 16_384,
            max_reservations_per_peer: c.max_reservations_per_peer,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: 16_384,
            max_circuits_per_peer: c.max_circuits_per_peer,
            max_circuit_duration: Duration::from_secs(7 * 24 * 3600),
            // 0: no byte cap.
            max_circuit_bytes: 0,
            ..Default::default()
        },
        // A full mesh of N nodes opens about N circuits per node at once.
        256,
    )
}

/// Rate limits per peer only. libp2p's defaults also limit per source IP
/// (60 new circuits a minute): every member behind one NAT, or a whole lab
/// on loopback, shares that budget, and a 16-node mesh then waits minutes
/// for its links. Relays here serve only members the control server
/// vouches for, so the per-peer budget is the one that matters.
pub(crate) fn per_peer_rates(mut c: relay::Config, per_minute: u32) -> relay::Config {
    let per_minute = std::num::NonZeroU32::new(per_minute.max(1)).expect("at least 1");
    c.reservation_rate_limiters.clear();
    c.circuit_src_rate_limiters.clear();
    c.reservation_rate_per_peer(per_minute, Duration::from_secs(60))
        .circuit_src_per_peer(per_minute, Duration::from_secs(60))
}

#[derive(Default)]
struct Load {
    reservations: HashSet<PeerId>,
    circuits: u32,
}

pub async fn run(
    config: RelayConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let state = StateDir::open(&config.state_dir)?;
    let (keypair, _) = state.identity()?;
    let me = peer_id(&keypair);
    let rcfg = relay_config(&config);
    let mut swarm = SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| RelayBehaviour {
            allow: allow_block_list::Behaviour::default(),
            relay: relay::Behaviour::new(key.public().to_peer_id(), rcfg),
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
        })
        .map_err(|e| NodeError::Swarm(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    swarm
        .listen_on(quic_addr(config.listen))
        .map_err(|e| NodeError::Swarm(format!("listening on {}: {e}", config.listen)))?;
    // The bound address (the port may have been 0).
    let bound = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let external = if config.external.is_empty() {
        if config.listen.ip().is_unspecified() {
            return Err(NodeError::Swarm(
                "listening on an unspecified address: pass --external with the relay's public address".into(),
            ));
        }
        vec![bound.clone()]
    } else {
        config.external.clone()
    };
    // Relay v2 refuses reservations until it has a confirmed external address.
    for a in &external {
        swarm.add_external_address(a.clone());
    }
    tracing::info!(relay = %me, listen = %bound, ?external, "relay listening");
    println!("meshnode relay {me} listening on {bound}");

    let mut control = RelayControlClient::new(&config.control_url, keypair)?;
    let addrs: Vec<String> = external.iter().map(|a| a.to_string()).collect();
    let mut load = Load::default();
    let mut report = interval(Duration::from_secs(2));
    report.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut members: HashSet<PeerId> = HashSet::new();
    let mut backoff = Duration::from_millis(100);
    tokio::pin!(shutdown);

    'session: loop {
        // (Re-)register and open the member stream; the swarm keeps serving
        // whoever is already allowed while the control server is away.
        let stream = async {
            control
                .register(&config.token, addrs.clone(), &config.region)
                .await?;
            control.watch_members().await
        };
        let mut stream = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = stream => match r {
                Ok(s) => { backoff = Duration::from_millis(100); s }
                Err(s) if matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument) => {
                    return Err(s.into());
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), "control server unreachable; retrying");
                    let wait = sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    tokio::pin!(wait);
                    loop {
                        tokio::select! {
                            _ = &mut shutdown => return Ok(()),
                            _ = &mut wait => continue 'session,
                            ev = swarm.select_next_some() => on_swarm_event(ev, &mut load),
                        }
                    }
                }
            }
        };
        tracing::info!("registered with the control server");
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                ev = swarm.select_next_some() => on_swarm_event(ev, &mut load),
                msg = stream.message() => match msg {
                    Ok(Some(update)) => apply_members(&mut swarm, &mut members, update.kind),
                    Ok(None) => continue 'session,
                    Err(s) if s.code() == Code::PermissionDenied => return Err(s.into()),
                    Err(s) => {
                        tracing::warn!(error = %s.message(), "member stream ended; reconnecting");
                        continue 'session;
                    }
                },
                _ = report.tick() => {
                    let l = RelayLoad {
                        reservations: load.reservations.len() as u32,
                        circuits: load.circuits,
                        bytes_relayed: 0,
                    };
                    if let Err(s) = control.report_load(l).await {
                        tracing::debug!(error = %s.message(), "load report failed");
                    }
                }
            }
        }
    }
}

fn apply_members(
    swarm: &mut libp2p::Swarm<RelayBehaviour>,
    members: &mut HashSet<PeerId>,
    kind: Option<Kind>,
) {
    let parse = |s: &str| s.parse::<PeerId>().ok();
    match kind {
        Some(Kind::Full(set)) => {
            let next: HashSet<PeerId> = set.node_ids.iter().filter_map(|s| parse(s)).collect();
            for gone in members.difference(&next) {
                swarm.behaviour_mut().allow.disallow_peer(*gone);
                let _ = swarm.disconnect_peer_id(*gone);
            }
            for p in &next {
                swarm.behaviour_mut().allow.allow_peer(*p);
            }
            tracing::info!(members = next.len(), "serving members");
            *members = next;
        }
        Some(Kind::Added(id)) => {
            if let Some(p) = parse(&id) {
                swarm.behaviour_mut().allow.allow_peer(p);
                members.insert(p);
            }
        }
        Some(Kind::Removed(id)) => {
            if let Some(p) = parse(&id) {
                swarm.behaviour_mut().allow.disallow_peer(p);
                let _ = swarm.disconnect_peer_id(p);
                members.remove(&p);
                tracing::info!(node = %p, "node cut off");
            }
        }
        None => {}
    }
}

fn on_swarm_event(ev: SwarmEvent<RelayBehaviourEvent>, load: &mut Load) {
    match ev {
        SwarmEvent::Behaviour(RelayBehaviourEvent::Relay(e)) => match e {
            relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                tracing::debug!(node = %src_peer_id, "reservation accepted");
                load.reservations.insert(src_peer_id);
            }
            relay::Event::ReservationClosed { src_peer_id }
            | relay::Event::ReservationTimedOut { src_peer_id } => {
                load.reservations.remove(&src_peer_id);
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "circuit opened");
                load.circuits += 1;
            }
            relay::Event::CircuitClosed { .. } => {
                load.circuits = load.circuits.saturating_sub(1);
            }
            other => tracing::debug!(event = ?other, "relay"),
        },
        SwarmEvent::ConnectionEstablished {
            peer_id, endpoint, ..
        } => {
            tracing::debug!(peer = %peer_id, remote = %endpoint.get_remote_address(), "connection");
        }
        SwarmEvent::IncomingConnectionError { error, .. } => {
            tracing::debug!(%error, "incoming connection refused");
        }
        _ => {}
    }
}
