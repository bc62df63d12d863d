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
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, ping, relay, Multiaddr, PeerId, SwarmBuilder};
use peermesh_proto::api::{member_update::Kind, RelayLoad};
use tokio::time::{interval, sleep, MissedTickBehavior};
use tonic::Code;

use crate::config::{per_peer_rates, quic_addr, IDENTIFY_PROTOCOL};
use crate::control::RelayControlClient;
use crate::{identity, RelayError};

type Result<T, E = RelayError> = std::result::Result<T, E>;

/// How long a reservation holds before the node renews it: an hour keeps
/// renewals rare; a node that goes away frees its slot when its connection
/// closes anyway.
const RESERVATION_DURATION: Duration = Duration::from_secs(3600);
/// A circuit carries a whole peer link for as long as no direct path
/// exists, so it may live a week (libp2p's default of 2 minutes is for
/// bootstrapping only).
const MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Reservations and circuits across all nodes; far above what one relay
/// process carries, so the per-node limits are the ones that bite.
const MAX_RESERVATIONS: usize = 16_384;
const MAX_CIRCUITS: usize = 16_384;
/// New reservations and circuits per node and minute: a full mesh of N
/// nodes opens about N circuits per node at once.
const NEW_PER_MINUTE: u32 = 256;
/// Pings on every connection; a node that stopped answering is dropped.
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// A connection with no circuit or reservation is closed after this long.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the relay reports its load to the control server (the
/// directory picks home relays by it).
const LOAD_REPORT_INTERVAL: Duration = Duration::from_secs(2);
/// Reconnecting to the control server: the first retry after this, doubling
/// up to [`RECONNECT_MAX`], so a restarted server is rejoined within about
/// a second and a long outage costs little.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    /// Addresses to advertise; the listen address when empty (it must then
    /// be a concrete, reachable address).
    pub external: Vec<Multiaddr>,
    pub control_url: String,
    /// The relay token (`pmj_…`, with the server key's fingerprint).
    pub token: String,
    /// Plaintext (`http://`) to a control server that is not on loopback.
    pub insecure: bool,
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

/// Relay v2 limits sized for relays that carry real traffic: the defaults
/// (128 KiB and 2 minutes per circuit) are for bootstrapping only.
fn relay_config(c: &RelayConfig) -> relay::Config {
    per_peer_rates(
        relay::Config {
            max_reservations: MAX_RESERVATIONS,
            max_reservations_per_peer: c.max_reservations_per_peer,
            reservation_duration: RESERVATION_DURATION,
            max_circuits: MAX_CIRCUITS,
            max_circuits_per_peer: c.max_circuits_per_peer,
            max_circuit_duration: MAX_CIRCUIT_DURATION,
            // 0: no byte cap.
            max_circuit_bytes: 0,
            ..Default::default()
        },
        NEW_PER_MINUTE,
    )
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
    std::fs::create_dir_all(&config.state_dir).map_err(|source| identity::IdentityError::Io {
        path: config.state_dir.clone(),
        source,
    })?;
    let (keypair, _) = identity::load_or_create(&config.state_dir)?;
    let me = keypair.public().to_peer_id();
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
            ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL)),
        })
        .map_err(|e| RelayError::Swarm(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    swarm
        .listen_on(quic_addr(config.listen))
        .map_err(|e| RelayError::Swarm(format!("listening on {}: {e}", config.listen)))?;
    // The bound address (the port may have been 0).
    let bound = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let external = if config.external.is_empty() {
        if config.listen.ip().is_unspecified() {
            return Err(RelayError::Swarm(
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

    let token: peermesh_proto::token::JoinToken =
        config
            .token
            .parse()
            .map_err(|e: peermesh_proto::token::BadToken| RelayError::Refused {
                code: Code::InvalidArgument,
                message: format!("--token: {e}"),
            })?;
    let mut control =
        RelayControlClient::new(&config.control_url, &token, keypair, config.insecure)?;
    let addrs: Vec<String> = external.iter().map(|a| a.to_string()).collect();
    let mut load = Load::default();
    let mut report = interval(LOAD_REPORT_INTERVAL);
    report.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut members: HashSet<PeerId> = HashSet::new();
    let mut backoff = RECONNECT_FIRST;
    tokio::pin!(shutdown);

    'session: loop {
        // (Re-)register and open the member stream; the swarm keeps serving
        // whoever is already allowed while the control server is away.
        let stream = async {
            control
                .register(&token, addrs.clone(), &config.region)
                .await?;
            control.watch_members().await
        };
        let mut stream = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = stream => match r {
                Ok(s) => { backoff = RECONNECT_FIRST; s }
                Err(s) if matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument | Code::FailedPrecondition) => {
                    return Err(s.into());
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), "control server unreachable; retrying");
                    let wait = sleep(backoff);
                    backoff = (backoff * 2).min(RECONNECT_MAX);
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
