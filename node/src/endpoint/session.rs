//! The control session: the endpoint's one actor that talks to the control
//! server. It keeps the network map in step (reconnecting by itself across
//! server restarts), feeds it to the mesh, reports endpoints, NAT and links,
//! runs NAT discovery, answers and asks for coordinated punches, and
//! publishes the status view and the events.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use peermesh_base::event::EventKind;
use peermesh_base::status::{NodeStatus, PeerStatus, PunchStats};
use peermesh_base::{NatBehavior, NodeId, PathKind};
use peermesh_proto::api::{LinkReport, Peer};
use peermesh_traversal::rendezvous::{Own, PunchCoordinator, Request};
use tokio::sync::{mpsc, watch};
use tonic::Code;

use super::events::EventLog;
use super::punching::{self, PunchCtx, MAX_CANDIDATES};
use crate::control::{ControlClient, MapError};
use crate::error::{NodeError, Result};
use crate::link::{LinkStatus, PathEvent};
use crate::mesh::{MeshCommand, MeshEvent, MeshHandle};
use crate::netmap::{MapChange, NetworkMap};
use crate::punch::coordinated::Report;
use crate::state_dir::{Membership, StateDir};
use crate::swarm::punched::Adopter;
use crate::swarm::RelayEntry;

/// Punch reports queued from the punch tasks.
pub(crate) const PUNCH_REPORT_QUEUE: usize = 64;

/// The node's state of a link to one peer, as its link worker reports it.
#[derive(Clone, Debug)]
struct LinkState {
    path: Option<PathKind>,
    via: Option<String>,
    rtt_ms: Option<f64>,
    loss: f64,
    bytes_in: u64,
    bytes_out: u64,
    punch: PunchStats,
    undeliverable: u64,
    flooded: u64,
}

impl LinkState {
    fn apply(&mut self, s: &LinkStatus) {
        self.path = s.path;
        self.via = s.via.map(|v| v.to_string());
        self.loss = s.loss;
        self.rtt_ms = s.rtt_ms;
        self.bytes_in = s.bytes_in;
        self.bytes_out = s.bytes_out;
        self.undeliverable = s.undeliverable;
        self.flooded = s.flooded;
    }

    fn new() -> Self {
        Self {
            path: None,
            via: None,
            rtt_ms: None,
            loss: 0.0,
            bytes_in: 0,
            bytes_out: 0,
            punch: PunchStats::default(),
            undeliverable: 0,
            flooded: 0,
        }
    }
}

/// Reconnect delays: quick first retries so a restarted server is rejoined
/// within about a second, capped so a long outage costs little.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);
    /// Up to this much is added at random to every delay, so that a fleet
    /// of nodes reconnecting after a server restart does not arrive at once.
    const JITTER_MS: u64 = 50;

    fn new() -> Self {
        Self { next: Self::FIRST }
    }
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d + Duration::from_millis(rand::random::<u64>() % Self::JITTER_MS)
    }
}

pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default()
}

/// A DNS label from a free-form name, as the control server requires.
pub fn sanitize_name(s: &str) -> String {
    let mut out: String = s
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.truncate(59);
    let out = out.trim_matches('-');
    if out.is_empty() {
        "node".into()
    } else {
        out.to_string()
    }
}

/// Why the control session stopped.
enum SessionEnd {
    Retry(String),
    Reauthenticate,
}

/// NAT discovery's progress, from its task.
pub(crate) enum NatProgress {
    /// The mapping verdict (filtering still being measured).
    Mapping(NatBehavior),
    /// The whole behaviour, or `None`: discovery could not run.
    Done(Option<NatBehavior>),
}

/// The control session actor (one per endpoint).
pub(crate) struct Session {
    client: ControlClient,
    membership: Membership,
    /// Where the membership is kept (a rotated server key is saved there).
    state: StateDir,
    advertise: Vec<String>,
    map: NetworkMap,
    links: BTreeMap<String, LinkState>,
    view: watch::Sender<NodeStatus>,
    events: Arc<EventLog>,
    link_report_interval: Duration,
    /// The link table as last reported, so that an unchanged one is not
    /// sent again (a new session clears it).
    last_link_report: Option<Vec<LinkReport>>,
    mesh: mpsc::Sender<MeshCommand>,
    mesh_events: mpsc::Receiver<MeshEvent>,
    /// Where the mesh says this node is reachable (relay circuit, observed
    /// and local addresses); published with `advertise`.
    reachable: Vec<String>,
    endpoints_dirty: bool,
    /// NAT behaviour, once measured; reported again on every new session.
    nat: Option<NatBehavior>,
    nat_started: bool,
    stun_primary: Option<SocketAddr>,
    nat_tx: mpsc::Sender<NatProgress>,
    nat_rx: mpsc::Receiver<NatProgress>,
    /// This node's NAT for punch answers waiting on the mapping verdict;
    /// `None` until it is in (or discovery failed).
    verdict: watch::Sender<Option<Own>>,
    /// When to punch and with what offer (sans-IO).
    punches: PunchCoordinator<PeerId>,
    /// Hands sockets that punches from probe sockets got through to QUIC.
    adopter: Adopter,
    punch_reports_tx: mpsc::Sender<Report>,
    punch_reports_rx: mpsc::Receiver<Report>,
}

/// How a session ended, for [`super::Endpoint::stopped`].
pub(crate) type Outcome = Result<()>;

/// What the endpoint starts a session with.
pub(crate) struct Wiring {
    pub client: ControlClient,
    pub membership: Membership,
    pub state: StateDir,
    /// Extra addresses to publish (`EndpointConfig::advertise`).
    pub advertise: Vec<String>,
    pub link_report_interval: Duration,
    pub view: watch::Sender<NodeStatus>,
    pub events: Arc<EventLog>,
    pub mesh: MeshHandle,
}

impl Session {
    pub(crate) fn new(w: Wiring) -> Self {
        let (nat_tx, nat_rx) = mpsc::channel(2);
        let (punch_reports_tx, punch_reports_rx) = mpsc::channel(PUNCH_REPORT_QUEUE);
        Self {
            map: NetworkMap::of_node(w.membership.node_id.clone()),
            client: w.client,
            membership: w.membership,
            state: w.state,
            advertise: w.advertise,
            links: BTreeMap::new(),
            view: w.view,
            events: w.events,
            link_report_interval: w.link_report_interval,
            last_link_report: None,
            mesh: w.mesh.commands,
            mesh_events: w.mesh.events,
            reachable: Vec::new(),
            endpoints_dirty: true,
            nat: None,
            nat_started: false,
            stun_primary: None,
            nat_tx,
            nat_rx,
            verdict: watch::Sender::new(None),
            punches: PunchCoordinator::default(),
            adopter: w.mesh.adopter,
            punch_reports_tx,
            punch_reports_rx,
        }
    }

    /// Runs until `shutdown` flips or the node is revoked.
    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Outcome {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        tokio::pin!(stop);
        let mut backoff = Backoff::new();
        loop {
            let end = tokio::select! {
                _ = &mut stop => return Ok(()),
                end = self.session() => end?,
            };
            let reason = match end {
                SessionEnd::Reauthenticate => {
                    tracing::info!("session expired; authenticating again");
                    match self.client.authenticate(&self.membership.server_id).await {
                        Ok(_) => {
                            backoff.reset();
                            continue;
                        }
                        Err(s) => classify(s)?,
                    }
                }
                SessionEnd::Retry(reason) => reason,
            };
            self.set_control(false, Some(reason.clone()));
            let delay = backoff.step();
            tracing::warn!(error = %reason, retry_in_ms = delay.as_millis() as u64, "control server connection lost");
            let wait = tokio::time::sleep(delay);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = &mut wait => break,
                    ev = self.mesh_events.recv() => {
                        if let Some(ev) = ev { self.on_mesh_event(ev); }
                    }
                }
            }
        }
    }

    fn node_id(peer: &PeerId) -> Option<NodeId> {
        NodeId::from_bytes(&peer.to_bytes()).ok()
    }

    fn on_mesh_event(&mut self, ev: MeshEvent) {
        match ev {
            MeshEvent::Reachable(addrs) => {
                tracing::info!(addresses = ?addrs, "reachable at");
                self.reachable = addrs.iter().map(|a| a.to_string()).collect();
                // Never this node's mesh (TUN) addresses: a path to one
                // would run through the mesh itself.
                if let Some(me) = &self.map.self_node {
                    self.reachable
                        .retain(|a| !super::is_mesh_endpoint(a, &me.mesh_ipv4, &me.mesh_ipv6));
                }
                self.endpoints_dirty = true;
            }
            MeshEvent::PunchWanted(peer) => {
                let stats = self.punch_stats(&peer);
                if let Some(r) = self.punches.punch_wanted(peer, &stats) {
                    self.request_punch(r);
                }
            }
            MeshEvent::Link(peer, s) => {
                let id = peer.to_string();
                if let Some(l) = self.links.get_mut(&id) {
                    if l.path != s.path {
                        tracing::info!(peer = %id, path = peermesh_base::path_name(s.path), rtt_ms = ?s.rtt_ms, "link path");
                        if let Some(node) = Self::node_id(&peer) {
                            self.events.publish(EventKind::PathChanged {
                                peer: node,
                                path: s.path,
                                via: s.via.map(|v| v.to_string()),
                                rtt_ms: s.rtt_ms,
                            });
                        }
                    }
                    l.apply(&s);
                }
                self.publish();
            }
            MeshEvent::Path(peer, e) => {
                if let Some(peer) = Self::node_id(&peer) {
                    self.events.publish(match e {
                        PathEvent::Up(kind) => EventKind::PathUp { peer, kind },
                        PathEvent::Down(kind, reason) => EventKind::PathDown { peer, kind, reason },
                    });
                }
            }
            MeshEvent::HomeRelay(relay) => {
                self.events.publish(EventKind::HomeRelay {
                    relay: relay.map(|r| r.to_string()),
                });
            }
        }
    }

    /// Runs NAT behaviour discovery once, when a full map names the
    /// server's STUN endpoints.
    fn maybe_discover_nat(&mut self, update: &peermesh_proto::api::NetworkMapUpdate) {
        use peermesh_proto::api::network_map_update::Kind;
        let Some(Kind::Full(m)) = &update.kind else {
            return;
        };
        let Some(stun) = &m.stun else { return };
        if self.nat_started {
            return;
        }
        let Ok(primary) = stun.primary.parse::<SocketAddr>() else {
            tracing::warn!(primary = %stun.primary, "the server's STUN endpoint is not host:port");
            return;
        };
        self.stun_primary = Some(primary);
        self.nat_started = true;
        self.punches.discovery_started();
        let tx = self.nat_tx.clone();
        let (early_tx, early_rx) = tokio::sync::oneshot::channel::<NatBehavior>();
        // The mapping verdict (what prediction needs) comes in a few round
        // trips; punches held for it go out then, not after the filtering
        // tests have waited out their retries.
        let early = tx.clone();
        tokio::spawn(async move {
            if let Ok(m) = early_rx.await {
                let _ = early.send(NatProgress::Mapping(m)).await;
            }
        });
        tokio::spawn(async move {
            match crate::nat::run_with_early(primary, early_tx).await {
                Ok(nat) => {
                    let _ = tx.send(NatProgress::Done(Some(nat))).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NAT discovery could not run");
                    let _ = tx.send(NatProgress::Done(None)).await;
                }
            }
        });
    }

    /// This node's direct candidates for a punch, freshest (observed) first.
    fn punch_candidates(&self) -> Vec<String> {
        self.reachable
            .iter()
            .chain(&self.advertise)
            .filter(|a| !a.contains("/p2p-circuit"))
            .cloned()
            .collect()
    }

    fn punch_stats(&self, peer: &PeerId) -> PunchStats {
        self.links
            .get(&peer.to_string())
            .map(|l| l.punch.clone())
            .unwrap_or_default()
    }

    fn punch_ctx(&self) -> PunchCtx {
        PunchCtx {
            client: self.client.clone(),
            mesh: self.mesh.clone(),
            adopter: self.adopter.clone(),
            reports: self.punch_reports_tx.clone(),
            events: self.events.clone(),
            stun: self.stun_primary,
            candidates: self.punch_candidates(),
        }
    }

    fn request_punch(&self, r: Request<PeerId>) {
        punching::request(self.punch_ctx(), r);
    }

    /// The mapping verdict or the whole behaviour is in (or discovery could
    /// not run): punches that waited for it go.
    fn on_nat_known(&mut self, nat: Option<NatBehavior>) {
        let links = &self.links;
        let stats = |p: &PeerId| {
            links
                .get(&p.to_string())
                .map(|l| l.punch.clone())
                .unwrap_or_default()
        };
        let released = match &nat {
            Some(n) => self.punches.nat_known(n.clone(), stats),
            None => self.punches.discovery_failed(stats),
        };
        self.verdict.send_replace(Some(Own::of(nat.as_ref())));
        for r in released {
            self.request_punch(r);
        }
    }

    fn on_punch_report(&mut self, r: Report) {
        let peer = match &r {
            Report::Quic { peer } | Report::Refused { peer } | Report::Probe { peer, .. } => *peer,
        };
        self.punches.punch_ended(&peer);
        let Some(l) = self.links.get_mut(&peer.to_string()) else {
            return;
        };
        match r {
            Report::Refused { .. } => {}
            Report::Quic { .. } => l.punch.quic_attempts += 1,
            Report::Probe {
                packets,
                birthday_probes,
                sockets,
                result,
                ..
            } => {
                l.punch.probe_attempts += 1;
                l.punch.probe_packets += packets;
                l.punch.birthday_probes += birthday_probes;
                l.punch.sockets = u32::from(sockets);
                l.punch.last = result;
            }
        }
    }

    /// The callee's part of a punch the control server coordinates.
    fn answer_punch(&self, p: peermesh_proto::api::PunchInstruction) {
        punching::answer(
            self.punch_ctx(),
            p,
            self.punches.own(),
            self.punches.awaiting_mapping(),
            self.verdict.subscribe(),
        );
    }

    fn endpoints(&self) -> Vec<String> {
        let mut all = self.advertise.clone();
        all.extend(self.reachable.iter().cloned());
        all.dedup();
        all.truncate(MAX_CANDIDATES);
        all
    }

    /// One watch stream, from open to its end.
    async fn session(&mut self) -> Result<SessionEnd> {
        let mut stream = match self.client.watch().await {
            Ok(s) => s,
            Err(s) => return session_end(s),
        };
        if let Err(s) = self.client.update_endpoints(self.endpoints()).await {
            return session_end(s);
        }
        self.endpoints_dirty = false;
        if let Some(nat) = &self.nat {
            if let Err(s) = self.client.report_nat(nat.into()).await {
                return session_end(s);
            }
        }
        self.last_link_report = None;
        let mut report = tokio::time::interval(self.link_report_interval);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut links_dirty = true;
        loop {
            tokio::select! {
                Some(r) = self.punch_reports_rx.recv() => {
                    self.on_punch_report(r);
                    self.publish();
                }
                Some(progress) = self.nat_rx.recv() => {
                    let nat = match progress {
                        NatProgress::Mapping(early) => {
                            self.on_nat_known(Some(early));
                            continue;
                        }
                        NatProgress::Done(None) => {
                            // Punch without prediction from now on; a later
                            // full map may start discovery again.
                            self.nat_started = false;
                            self.on_nat_known(None);
                            continue;
                        }
                        NatProgress::Done(Some(nat)) => nat,
                    };
                    tracing::info!(nat = %nat.describe(), mapping = ?nat.mapping, filtering = ?nat.filtering, public = ?nat.public, "NAT behaviour");
                    self.view.send_modify(|v| v.nat = Some(nat.clone()));
                    self.events.publish(EventKind::Nat { nat: nat.clone() });
                    let report = (&nat).into();
                    self.nat = Some(nat.clone());
                    self.on_nat_known(Some(nat));
                    if let Err(s) = self.client.report_nat(report).await {
                        return session_end(s);
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(update)) => {
                        self.save_server_key();
                        self.maybe_discover_nat(&update);
                        match self.map.apply(update) {
                            Ok(changes) => {
                                if !self.view.borrow().control.connected {
                                    tracing::info!(peers = self.map.peers.len(), version = self.map.version, "network map received");
                                    self.set_control(true, None);
                                }
                                links_dirty |= self.on_changes(changes).await;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "map update refused");
                                return Ok(SessionEnd::Retry(format!("map update refused: {e}")));
                            }
                        }
                        self.publish();
                        if links_dirty {
                            links_dirty = false;
                            if let Err(s) = self.report_links().await {
                                return session_end(s);
                            }
                        }
                    }
                    Ok(None) => return Ok(SessionEnd::Retry("watch stream ended".into())),
                    Err(MapError::Status(s)) => return session_end(s),
                    Err(MapError::Refused(e)) => {
                        tracing::warn!(error = %e, "map update refused");
                        return Ok(SessionEnd::Retry(format!("map update refused: {e}")));
                    }
                },
                _ = report.tick() => {
                    if let Err(s) = self.report_links().await {
                        return session_end(s);
                    }
                }
                ev = self.mesh_events.recv() => {
                    let Some(ev) = ev else {
                        return Err(NodeError::Swarm("the mesh task stopped".into()));
                    };
                    let path_changed = matches!(&ev, MeshEvent::Link(p, s)
                        if self.links.get(&p.to_string()).is_some_and(|l| l.path != s.path));
                    self.on_mesh_event(ev);
                    if self.endpoints_dirty {
                        if let Err(s) = self.client.update_endpoints(self.endpoints()).await {
                            return session_end(s);
                        }
                        self.endpoints_dirty = false;
                    }
                    if path_changed {
                        if let Err(s) = self.report_links().await {
                            return session_end(s);
                        }
                    }
                }
            }
        }
    }

    /// Keeps the server key's fingerprint in the state directory when it
    /// moved (a signed rotation): the next start pins the new key.
    fn save_server_key(&mut self) {
        let Some(pin) = self.client.server_pin().map(|p| p.to_string()) else {
            return;
        };
        if pin == self.membership.server_key {
            return;
        }
        self.membership.server_key = pin;
        if let Err(e) = self.state.save_membership(&self.membership) {
            tracing::warn!(error = %e, "could not save the control server's new key");
        }
    }

    /// Applies map changes to the link table and the mesh; true when the
    /// link table changed.
    async fn on_changes(&mut self, changes: Vec<MapChange>) -> bool {
        let mut dirty = false;
        for c in changes {
            match c {
                MapChange::Added(p) => {
                    tracing::info!(peer = %p.node_id, name = %p.name, "peer joined");
                    self.links.insert(p.node_id.clone(), LinkState::new());
                    self.mesh_upsert(&p).await;
                    // After the mesh has the link: whoever reacts to the
                    // event can send to the new member at once.
                    if let Ok(peer) = p.node_id.parse() {
                        self.events.publish(EventKind::MemberJoined {
                            peer,
                            name: p.name.clone(),
                        });
                    }
                    dirty = true;
                }
                MapChange::Removed(id) => {
                    tracing::info!(peer = %id, "peer left");
                    self.links.remove(&id);
                    if let Ok(node) = id.parse() {
                        self.events.publish(EventKind::MemberLeft { peer: node });
                    }
                    if let Ok(peer) = id.parse() {
                        self.punches.forget(&peer);
                        self.adopter.release(peer);
                        let _ = self.mesh.send(MeshCommand::Remove { peer }).await;
                    }
                    dirty = true;
                }
                MapChange::Updated(p) => {
                    tracing::debug!(peer = %p.node_id, online = p.online, "peer updated");
                    self.mesh_upsert(&p).await;
                }
                MapChange::SelfUpdated(me) => {
                    self.membership.name = me.name.clone();
                }
                MapChange::Punch(p) => self.answer_punch(p),
                MapChange::RelaysChanged => {
                    tracing::info!(relays = self.map.relays.len(), "relay directory");
                    self.events.publish(EventKind::RelayDirectory {
                        relays: self.map.relays.len(),
                    });
                    let list = self
                        .map
                        .relays
                        .iter()
                        .filter_map(|r| {
                            Some(RelayEntry {
                                id: r.relay_id.parse().ok()?,
                                addrs: r.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                                load: r.circuits,
                            })
                        })
                        .collect();
                    let _ = self.mesh.send(MeshCommand::Relays(list)).await;
                }
            }
        }
        // Peers that a full map dropped silently leave the mesh too.
        let gone: Vec<String> = self
            .links
            .keys()
            .filter(|id| !self.map.peers.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Ok(peer) = id.parse() {
                let _ = self.mesh.send(MeshCommand::Remove { peer }).await;
            }
        }
        // Links of peers that a full map dropped silently are dropped too.
        let before = self.links.len();
        self.links.retain(|id, _| self.map.peers.contains_key(id));
        dirty || before != self.links.len()
    }

    async fn mesh_upsert(&self, p: &Peer) {
        if let Ok(peer) = p.node_id.parse() {
            let _ = self
                .mesh
                .send(MeshCommand::Upsert {
                    peer,
                    addresses: p.addresses.clone(),
                })
                .await;
        }
    }

    async fn report_links(&mut self) -> Result<(), tonic::Status> {
        let links: Vec<LinkReport> = self
            .links
            .iter()
            .map(|(id, l)| LinkReport {
                peer_id: id.clone(),
                path: peermesh_proto::convert::path_kind(l.path) as i32,
                rtt_ms: l.rtt_ms,
                loss: l.loss,
                via: l.via.clone().unwrap_or_default(),
                bytes_in: l.bytes_in,
                bytes_out: l.bytes_out,
            })
            .collect();
        if self.last_link_report.as_ref() == Some(&links) {
            return Ok(());
        }
        self.client.report_links(links.clone()).await?;
        self.last_link_report = Some(links);
        Ok(())
    }

    fn set_control(&self, connected: bool, error: Option<String>) {
        let changed = self.view.borrow().control.connected != connected;
        self.view.send_modify(|v| {
            v.control.connected = connected;
            v.control.error = error.clone();
        });
        if changed {
            self.events.publish(EventKind::Control { connected, error });
        }
    }

    fn publish(&self) {
        let peers = self
            .map
            .peers
            .values()
            .filter_map(|p: &Peer| {
                let l = self
                    .links
                    .get(&p.node_id)
                    .cloned()
                    .unwrap_or_else(LinkState::new);
                Some(PeerStatus {
                    id: p.node_id.parse().ok()?,
                    name: p.name.clone(),
                    path: l.path,
                    // A forwarding member by name; a relay server by id.
                    via: l
                        .via
                        .map(|v| self.map.peers.get(&v).map_or(v, |m| m.name.clone())),
                    rtt_ms: l.rtt_ms,
                    loss: l.loss,
                    online: p.online,
                    addresses: p.addresses.clone(),
                    bytes_in: l.bytes_in,
                    bytes_out: l.bytes_out,
                    mesh_ipv4: Some(p.mesh_ipv4.clone()).filter(|a| !a.is_empty()),
                    mesh_ipv6: Some(p.mesh_ipv6.clone()).filter(|a| !a.is_empty()),
                    punch: l.punch,
                    undeliverable: l.undeliverable,
                    flooded: l.flooded,
                })
            })
            .collect();
        let me = self.map.self_node.as_ref();
        self.view.send_modify(|v| {
            v.peers = peers;
            v.map_version = self.map.version;
            v.name = self.membership.name.clone();
            if let Some(me) = me {
                v.addresses = me.addresses.clone();
                v.mesh_ipv4 = Some(me.mesh_ipv4.clone()).filter(|a| !a.is_empty());
                v.mesh_ipv6 = Some(me.mesh_ipv6.clone()).filter(|a| !a.is_empty());
            }
        });
    }
}

/// Transient failures are retried; a refusal of this node is final.
fn classify(s: tonic::Status) -> Result<String> {
    match s.code() {
        Code::PermissionDenied => Err(NodeError::Revoked(s.message().to_string())),
        Code::Unauthenticated | Code::InvalidArgument | Code::FailedPrecondition => Err(s.into()),
        _ => Ok(format!("{} ({:?})", s.message(), s.code())),
    }
}

fn session_end(s: tonic::Status) -> Result<SessionEnd> {
    if s.code() == Code::Unauthenticated {
        return Ok(SessionEnd::Reauthenticate);
    }
    classify(s).map(SessionEnd::Retry)
}

/// Retries `op` while the server is unreachable (it may be starting or
/// restarting) or over a rate limit (a whole site starting at once); any
/// other answer from it is returned.
pub(super) async fn retry_unavailable<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut backoff = Backoff::new();
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(s) if s.code() == Code::ResourceExhausted => {
                let d = backoff.step();
                tracing::warn!(error = %s.message(), retry_in_ms = d.as_millis() as u64, "control server busy");
                tokio::time::sleep(d).await;
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::DeadlineExceeded
                ) =>
            {
                let d = backoff.step();
                tracing::warn!(error = %s.message(), retry_in_ms = d.as_millis() as u64, "control server unreachable");
                tokio::time::sleep(d).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_labels() {
        assert_eq!(sanitize_name("My-Laptop.local\n"), "my-laptop-local");
        assert_eq!(sanitize_name("---"), "node");
        assert_eq!(sanitize_name(&"x".repeat(100)).len(), 59);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new();
        let first = b.step();
        assert!(
            first >= Backoff::FIRST
                && first < Backoff::FIRST + Duration::from_millis(Backoff::JITTER_MS)
        );
        for _ in 0..10 {
            b.step();
        }
        assert!(b.step() < Backoff::MAX + Duration::from_millis(Backoff::JITTER_MS));
        b.reset();
        assert!(b.step() < Backoff::FIRST + Duration::from_millis(Backoff::JITTER_MS));
    }

    #[test]
    fn a_links_drop_counters_reach_the_status() {
        let mut l = LinkState::new();
        l.apply(&LinkStatus {
            path: Some(PathKind::Direct),
            bytes_in: 7,
            undeliverable: 3,
            flooded: 5,
            ..LinkStatus::default()
        });
        assert_eq!((l.path, l.bytes_in), (Some(PathKind::Direct), 7));
        assert_eq!((l.undeliverable, l.flooded), (3, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_and_outages_are_waited_out_refusals_are_not() {
        let calls = std::cell::Cell::new(0);
        let r = retry_unavailable(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                match n {
                    1 => Err(tonic::Status::resource_exhausted(
                        "Join is limited to 10/s per client address",
                    )),
                    2 => Err(tonic::Status::unavailable("connection refused")),
                    _ => Ok(n),
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);

        calls.set(0);
        let r: Result<()> = retry_unavailable(|| {
            calls.set(calls.get() + 1);
            async {
                Err(tonic::Status::failed_precondition(
                    "group \"g\" holds 3 nodes",
                ))
            }
        })
        .await;
        assert!(r.unwrap_err().to_string().contains("holds 3 nodes"));
        assert_eq!(calls.get(), 1, "a refusal is not retried");
    }
}
