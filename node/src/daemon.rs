//! The running node: joins or re-authenticates, keeps the network map in
//! step with the control server (reconnecting by itself across server
//! restarts), reports endpoints and links, and publishes its status.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use peermesh_proto::api::{LinkReport, Peer};
use tokio::sync::{mpsc, watch, Mutex};
use tonic::Code;

use crate::link::LinkStatus;
use crate::mesh::{self, MeshCommand, MeshEvent};
use crate::swarm::RelayEntry;

use crate::control::ControlClient;
use crate::error::{NodeError, Result};
use crate::hole_punch::coordinated;
use crate::hole_punch::plan::Mapping;
use crate::hole_punch::Role;
use crate::netmap::{MapChange, NetworkMap};
use crate::state_dir::{peer_id, Membership, StateDir};
use crate::status::{self, ControlStatus, NodeStatus, PathKind, PeerStatus};

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub state_dir: PathBuf,
    /// Control server URL; remembered from an earlier run when absent.
    pub control_url: Option<String>,
    /// Join token; needed only until the node has joined.
    pub token: Option<String>,
    /// Requested name; defaults to the host name.
    pub name: Option<String>,
    /// Extra addresses (multiaddrs) to publish for this node.
    pub advertise: Vec<String>,
    /// How often link status goes to the control server when nothing changes.
    pub link_report_interval: Duration,
    /// UDP address for the mesh's QUIC endpoint.
    pub listen: SocketAddr,
    /// How direct paths are punched.
    pub punch: mesh::PunchMode,
    /// Whether this node forwards traffic between members that have no
    /// direct path to each other (seed 004).
    pub forward: bool,
}

impl NodeConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            control_url: None,
            token: None,
            name: None,
            advertise: Vec::new(),
            link_report_interval: Duration::from_secs(5),
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            punch: mesh::PunchMode::Control,
            forward: true,
        }
    }
}

/// The node's state of a link to one peer, as its link worker reports it.
#[derive(Clone, Debug)]
struct LinkState {
    path: PathKind,
    via: Option<String>,
    rtt_ms: Option<f64>,
    loss: f64,
    bytes_in: u64,
    bytes_out: u64,
    punch: status::PunchStats,
}

impl LinkState {
    fn apply(&mut self, s: &LinkStatus) {
        self.path = s.path;
        self.via = s.via.map(|v| v.to_string());
        self.loss = s.loss;
        self.rtt_ms = s.rtt_ms;
        self.bytes_in = s.bytes_in;
        self.bytes_out = s.bytes_out;
    }

    fn new() -> Self {
        Self {
            path: PathKind::Connecting,
            via: None,
            rtt_ms: None,
            loss: 0.0,
            bytes_in: 0,
            bytes_out: 0,
            punch: status::PunchStats::default(),
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

    fn new() -> Self {
        Self { next: Self::FIRST }
    }
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Jitter spreads a fleet's reconnects after a server restart.
        d + Duration::from_millis(rand::random::<u64>() % 50)
    }
}

fn host_name() -> String {
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

pub struct Node {
    client: ControlClient,
    state: StateDir,
    membership: Membership,
    advertise: Vec<String>,
    map: NetworkMap,
    links: BTreeMap<String, LinkState>,
    view: watch::Sender<NodeStatus>,
    link_report_interval: Duration,
    mesh: mpsc::Sender<MeshCommand>,
    mesh_events: mpsc::Receiver<MeshEvent>,
    inbox: Arc<Mutex<status::Inbox>>,
    /// Channel queues not yet taken by a service; dropped when the node
    /// runs, so that nobody waits on a channel that no service reads.
    inboxes: mesh::channel::Inboxes,
    /// Where the mesh says this node is reachable (relay circuit, observed
    /// and local addresses); published with `advertise`.
    reachable: Vec<String>,
    endpoints_dirty: bool,
    /// NAT behaviour, once measured; reported again on every new session.
    nat: Option<crate::nat_discovery::NatBehavior>,
    nat_started: bool,
    stun_primary: Option<SocketAddr>,
    /// Punches asked for while discovery still runs.
    deferred_punches: Vec<libp2p::PeerId>,
    /// The mapping verdict is in: deferred punches may go.
    nat_early_tx: mpsc::Sender<()>,
    nat_early_rx: mpsc::Receiver<()>,
    /// The port predictor once discovery is done (`None` inside: no
    /// prediction); `None` while it runs.
    predictor_tx: watch::Sender<Option<Option<(SocketAddr, i32)>>>,
    /// This node's NAT mapping from the early verdict, for punches from
    /// probe sockets; `None` until it is in.
    own_tx: watch::Sender<Option<coordinated::Own>>,
    /// Discovery's result; `None`: it could not run.
    nat_tx: mpsc::Sender<Option<crate::nat_discovery::NatBehavior>>,
    nat_rx: mpsc::Receiver<Option<crate::nat_discovery::NatBehavior>>,
    /// The virtual interface, started by [`Self::run`] (`up --tun`).
    tun: Option<crate::tun::TunService>,
    /// Content distribution (`up` starts it; `meshnode get` reaches it via the socket).
    content: Option<crate::content::ContentHandle>,
    /// Multiplayer sessions (`up` starts it; game processes use it via the socket).
    session: Option<crate::session::SessionHandle>,
    /// Hands sockets that punches from probe sockets got through to QUIC.
    adopter: crate::swarm::punched::Adopter,
    punch_reports_tx: mpsc::Sender<coordinated::Report>,
    punch_reports_rx: mpsc::Receiver<coordinated::Report>,
    /// Peers this node is punching to right now: a new attempt waits for
    /// the last one's report (two attempts' probe sockets would take turns
    /// in a sequential NAT's counter, and neither prediction would hold).
    punching: std::collections::HashSet<libp2p::PeerId>,
}

impl Node {
    /// Opens the state directory, joins (with a token) or authenticates
    /// (without), and binds the status socket.
    pub async fn start(config: NodeConfig) -> Result<(Self, tokio::net::UnixListener)> {
        let state = StateDir::open(&config.state_dir)?;
        let (keypair, created) = state.identity()?;
        let id = peer_id(&keypair);
        tracing::info!(node = %id, new = created, "identity");
        let listener = status::bind(&state.socket_path()).await?;
        let remembered = state.membership()?;
        let url = config
            .control_url
            .clone()
            .or_else(|| remembered.as_ref().map(|m| m.control_url.clone()))
            .ok_or(NodeError::NoControlUrl)?;
        for a in &config.advertise {
            if a.parse::<multiaddr::Multiaddr>().is_err() {
                return Err(NodeError::Refused {
                    code: Code::InvalidArgument,
                    message: format!("--advertise {a:?} is not a multiaddr"),
                });
            }
        }
        let client = ControlClient::new(&url, keypair.clone())?;

        let membership = match (&config.token, &remembered) {
            (Some(token), _) => {
                let name = sanitize_name(
                    config
                        .name
                        .as_deref()
                        .or(remembered.as_ref().map(|m| m.name.as_str()))
                        .unwrap_or(&host_name()),
                );
                let r = retry_unavailable(|| {
                    let mut c = client.clone();
                    let (t, n) = (token.clone(), name.clone());
                    async move { c.join(&t, &n).await }
                })
                .await?;
                // Clones share the session, so `client` now holds it too.
                tracing::info!(group = %r.group, name = %r.name, "joined");
                Membership {
                    control_url: url.clone(),
                    server_id: r.server_id,
                    node_id: r.node_id,
                    name: r.name,
                    group: r.group,
                }
            }
            (None, Some(m)) => {
                let server_id = m.server_id.clone();
                let r = retry_unavailable(|| {
                    let mut c = client.clone();
                    let s = server_id.clone();
                    async move { c.authenticate(&s).await }
                })
                .await?;
                tracing::info!(group = %r.group, name = %r.name, "authenticated");
                Membership {
                    control_url: url.clone(),
                    server_id: r.server_id,
                    node_id: r.node_id,
                    name: r.name,
                    group: r.group,
                }
            }
            (None, None) => return Err(NodeError::NotJoined),
        };
        state.save_membership(&membership)?;

        let view = watch::Sender::new(NodeStatus {
            id: membership.node_id.clone(),
            name: membership.name.clone(),
            group: membership.group.clone(),
            addresses: config.advertise.clone(),
            control: ControlStatus {
                url: url.clone(),
                connected: false,
                error: None,
            },
            map_version: 0,
            peers: Vec::new(),
            mesh_ipv4: None,
            mesh_ipv6: None,
            tun: None,
            nat: None,
        });
        let (nat_tx, nat_rx) = mpsc::channel(1);
        let (nat_early_tx, nat_early_rx) = mpsc::channel(1);
        let mut mesh = mesh::spawn(keypair, config.listen, config.punch, config.forward)?;
        let (punch_reports_tx, punch_reports_rx) = mpsc::channel(64);
        let mut mesh_inboxes = std::mem::replace(
            &mut mesh.inboxes,
            mesh::channel::Inboxes {
                message: None,
                ip: None,
                content: None,
                session: None,
            },
        );
        Ok((
            Self {
                client,
                state,
                membership,
                advertise: config.advertise,
                map: NetworkMap::default(),
                links: BTreeMap::new(),
                view,
                link_report_interval: config.link_report_interval,
                mesh: mesh.commands,
                mesh_events: mesh.events,
                inbox: Arc::new(Mutex::new(status::Inbox::new(
                    mesh_inboxes.message.take().expect("fresh inboxes"),
                ))),
                inboxes: mesh_inboxes,
                reachable: Vec::new(),
                endpoints_dirty: true,
                tun: None,
                content: None,
                session: None,
                nat: None,
                nat_started: false,
                stun_primary: None,
                deferred_punches: Vec::new(),
                nat_early_tx,
                nat_early_rx,
                predictor_tx: watch::Sender::new(None),
                own_tx: watch::Sender::new(None),
                nat_tx,
                nat_rx,
                adopter: mesh.adopter,
                punch_reports_tx,
                punch_reports_rx,
                punching: Default::default(),
            },
            listener,
        ))
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    pub fn status(&self) -> watch::Receiver<NodeStatus> {
        self.view.subscribe()
    }

    /// What a service on this node (TUN, content, sessions) uses the mesh
    /// through.
    pub fn mesh_client(&self) -> mesh::MeshClient {
        mesh::MeshClient {
            commands: self.mesh.clone(),
            status: self.view.subscribe(),
        }
    }

    pub fn attach_content(&mut self, content: crate::content::ContentHandle) {
        self.content = Some(content);
    }

    pub fn attach_session(&mut self, session: crate::session::SessionHandle) {
        self.session = Some(session);
    }

    /// Runs `tun` with this node (from [`Self::run`] on): it takes the IP
    /// channel's inbox.
    pub fn attach_tun(&mut self, tun: crate::tun::TunService) {
        self.tun = Some(tun);
    }

    /// The queue of messages from peers on `ch`, for the service that runs
    /// it; taken once. Call before [`Self::run`].
    pub fn take_inbox(
        &mut self,
        ch: mesh::channel::Channel,
    ) -> Option<mpsc::Receiver<(libp2p::PeerId, bytes::Bytes)>> {
        self.inboxes.take(ch)
    }

    /// Runs until `shutdown` resolves or the node is revoked.
    pub async fn run(
        mut self,
        listener: tokio::net::UnixListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let socket = self.state.socket_path();
        let tun_info = match (
            self.tun.take(),
            self.inboxes.take(mesh::channel::Channel::Ip),
        ) {
            (Some(tun), Some(inbox)) => {
                let info = tun.info();
                tokio::spawn(tun.run(self.mesh_client(), inbox));
                Some(info)
            }
            (None, inbox) => {
                drop(inbox);
                None
            }
            (Some(_), None) => {
                tracing::error!("the IP channel is taken by another service; no TUN interface");
                None
            }
        };
        let ctx = status::Ctx {
            tun: tun_info,
            content: self.content.clone(),
            session: self.session.clone(),
            view: self.view.subscribe(),
            mesh: self.mesh.clone(),
            inbox: self.inbox.clone(),
        };
        let status_task = tokio::spawn(status::serve(listener, ctx));
        for ch in mesh::channel::Channel::ALL {
            drop(self.inboxes.take(ch));
        }
        let result = self.control_loop(shutdown).await;
        status_task.abort();
        let _ = std::fs::remove_file(&socket);
        result
    }

    async fn control_loop(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new();
        loop {
            let end = tokio::select! {
                _ = &mut shutdown => return Ok(()),
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
                    _ = &mut shutdown => return Ok(()),
                    _ = &mut wait => break,
                    ev = self.mesh_events.recv() => {
                        if let Some(ev) = ev { self.on_mesh_event(ev); }
                    }
                }
            }
        }
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
                        .retain(|a| !crate::tun::is_mesh_endpoint(a, &me.mesh_ipv4, &me.mesh_ipv6));
                }
                self.endpoints_dirty = true;
            }
            MeshEvent::PunchWanted(peer) => {
                // A punch before discovery knows the NAT would open a
                // mapping that prediction then cannot name: wait for it.
                if self.nat_started && self.predictor_tx.borrow().is_none() {
                    if !self.deferred_punches.contains(&peer) {
                        self.deferred_punches.push(peer);
                    }
                } else {
                    self.request_punch(peer);
                }
            }
            MeshEvent::Link(peer, s) => {
                let id = peer.to_string();
                if let Some(l) = self.links.get_mut(&id) {
                    if l.path != s.path {
                        tracing::info!(peer = %id, path = s.path.as_str(), rtt_ms = ?s.rtt_ms, "link path");
                    }
                    l.apply(&s);
                }
                self.publish();
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
        let tx = self.nat_tx.clone();
        let (early_tx, early_rx) =
            tokio::sync::oneshot::channel::<crate::nat_discovery::NatBehavior>();
        let predictor_tx = self.predictor_tx.clone();
        let own_tx = self.own_tx.clone();
        let punch_tx = self.nat_early_tx.clone();
        // The mapping verdict (what prediction needs) comes in a few round
        // trips; punches held for it go out then, not after the filtering
        // tests have waited out their retries.
        tokio::spawn(async move {
            if let Ok(early) = early_rx.await {
                let p = match early.mapping {
                    Some(crate::nat_discovery::Mapping::Sequential { stride }) => {
                        Some((primary, stride))
                    }
                    _ => None,
                };
                own_tx.send_replace(Some(own_of(Some(&early))));
                predictor_tx.send_replace(Some(p));
                let _ = punch_tx.send(()).await;
            }
        });
        tokio::spawn(async move {
            match crate::nat_discovery::run_with_early(primary, early_tx).await {
                Ok(nat) => {
                    let _ = tx.send(Some(nat)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NAT discovery could not run");
                    let _ = tx.send(None).await;
                }
            }
        });
    }

    /// Where and by how much to predict this node's next public port: set
    /// once discovery found a sequential symmetric NAT (seed 003).
    fn predictor(&self) -> Option<(SocketAddr, i32)> {
        self.predictor_tx.borrow().flatten()
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

    /// This node's NAT as a punch from probe sockets needs it.
    fn own_nat(&self) -> coordinated::Own {
        match (self.nat.as_ref(), *self.own_tx.borrow()) {
            (None, Some(early)) => early,
            (nat, _) => own_of(nat),
        }
    }

    fn on_punch_report(&mut self, r: coordinated::Report) {
        let peer = match &r {
            coordinated::Report::Quic { peer }
            | coordinated::Report::Refused { peer }
            | coordinated::Report::Probe { peer, .. } => *peer,
        };
        self.punching.remove(&peer);
        let Some(l) = self.links.get_mut(&peer.to_string()) else {
            return;
        };
        match r {
            coordinated::Report::Refused { .. } => {}
            coordinated::Report::Quic { .. } => l.punch.quic_attempts += 1,
            coordinated::Report::Probe {
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

    /// The caller's part of a coordinated punch (seed 002): ask the server,
    /// which returns once the peer has opened its NAT, then dial. Runs
    /// beside the session so the map keeps flowing meanwhile.
    ///
    /// The request carries an offer to punch from probe sockets instead;
    /// the peer takes it up when a NAT is random symmetric, or when this
    /// side says that punching from the QUIC socket did not work last time
    /// (`fallback`: the attempts alternate).
    fn request_punch(&mut self, peer: libp2p::PeerId) {
        if !self.punching.insert(peer) {
            tracing::debug!(%peer, "punch: the last attempt is still running");
            return;
        }
        let mut client = self.client.clone();
        let mesh = self.mesh.clone();
        let candidates = self.punch_candidates();
        let predictor = self.predictor();
        let own = self.own_nat();
        let stun = self.stun_primary;
        let fallback = self
            .links
            .get(&peer.to_string())
            .is_some_and(|l| l.punch.quic_attempts > l.punch.probe_attempts);
        let adopter = self.adopter.clone();
        let reports = self.punch_reports_tx.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            // Probe socket 0's STUN mapping is the NAT's latest: on a
            // sequential NAT both the peer's prediction of our probe sockets
            // and that of our QUIC socket start there (no second probe).
            let offered = coordinated::offer(stun, own, fallback).await;
            let last = offered.as_ref().and_then(|(o, _)| o.public);
            let candidates = match (predictor, last) {
                (Some((_, stride)), Some(last)) => {
                    predicted_first(candidates, last, stride, PREDICTION_WINDOW)
                }
                (Some(_), None) => with_predictions(candidates, predictor, PREDICTION_WINDOW).await,
                (None, _) => candidates,
            };
            let offer = offered.as_ref().map(|(_, o)| o.clone());
            match client
                .request_punch(&peer.to_string(), candidates, offer)
                .await
            {
                Ok(r) => match (r.peer_probe, offered) {
                    (Some(peer_offer), Some((opened, own_offer))) => {
                        tracing::info!(%peer, punch = r.punch_id, rendezvous_ms = started.elapsed().as_secs_f64() * 1e3, "punch: peer took up probe sockets");
                        let attempt = coordinated::Attempt {
                            peer,
                            role: Role::Initiator,
                            secret: r.probe_secret,
                            own,
                            opened,
                            own_offer,
                            peer_offer,
                        };
                        coordinated::run(attempt, adopter, mesh, reports).await;
                    }
                    _ => {
                        let addrs = parse_addrs(&r.peer_candidates);
                        tracing::info!(%peer, punch = r.punch_id, candidates = addrs.len(), rendezvous_ms = started.elapsed().as_secs_f64() * 1e3, "punch: peer is open; dialing");
                        let _ = reports.send(coordinated::Report::Quic { peer }).await;
                        let _ = mesh
                            .send(MeshCommand::Punch {
                                peer,
                                addrs,
                                open_first: false,
                                started: None,
                            })
                            .await;
                    }
                },
                Err(s) => {
                    tracing::debug!(%peer, code = ?s.code(), error = %s.message(), "punch request refused");
                    let _ = reports.send(coordinated::Report::Refused { peer }).await;
                }
            }
        });
    }

    /// The callee's part: open towards the caller, then tell the server.
    /// A probe offer is taken up (once this node's NAT is known) when a side
    /// is random symmetric or the caller falls back to it.
    async fn answer_punch(&self, p: peermesh_proto::api::PunchInstruction) {
        let Ok(peer) = p.peer_id.parse::<libp2p::PeerId>() else {
            tracing::debug!(peer = %p.peer_id, "punch instruction for a malformed peer id");
            return;
        };
        let addrs = parse_addrs(&p.peer_candidates);
        let mesh = self.mesh.clone();
        let mut client = self.client.clone();
        let candidates = self.punch_candidates();
        let mut known = self.predictor_tx.subscribe();
        let discovering = self.nat_started && self.predictor_tx.borrow().is_none();
        let predictor = self.predictor();
        let reports = self.punch_reports_tx.clone();
        let mut own_rx = self.own_tx.subscribe();
        let own = self.own_nat();
        let stun = self.stun_primary;
        let adopter = self.adopter.clone();
        tokio::spawn(async move {
            // As for the caller: no opening packet before the NAT is known
            // (within the caller's patience).
            let (predictor, own) = if discovering {
                let wait = known.wait_for(|p| p.is_some());
                let predictor = match tokio::time::timeout(Duration::from_millis(2500), wait).await
                {
                    Ok(Ok(p)) => p.flatten(),
                    _ => None,
                };
                let own = own_rx.borrow_and_update().unwrap_or(own);
                (predictor, own)
            } else {
                (predictor, own)
            };
            let answer = p
                .peer_probe
                .as_ref()
                .map_or(coordinated::Answer::Quic, |o| {
                    coordinated::answer(own.mapping, o)
                });
            let offered = match answer {
                coordinated::Answer::Quic => None,
                _ => coordinated::offer(stun, own, false).await,
            };
            // Without a probe socket (no STUN answer): from the QUIC socket.
            if let (Some((opened, own_offer)), Some(peer_offer)) = (offered, p.peer_probe.clone()) {
                let probing = if answer == coordinated::Answer::Probe {
                    tracing::info!(%peer, punch = p.punch_id, "punch: taking up probe sockets");
                    let attempt = coordinated::Attempt {
                        peer,
                        role: Role::Responder,
                        secret: p.probe_secret,
                        own,
                        opened,
                        own_offer: own_offer.clone(),
                        peer_offer,
                    };
                    Some(tokio::spawn(coordinated::run(
                        attempt, adopter, mesh, reports,
                    )))
                } else {
                    // Our offer tells the caller too; nobody sends anything.
                    drop(opened);
                    tracing::info!(%peer, punch = p.punch_id, "punch: no direct path can exist; not punching");
                    let _ = reports
                        .send(coordinated::Report::no_direct_path(peer))
                        .await;
                    None
                };
                if let Err(s) = client
                    .punch_ready(p.punch_id, candidates, Some(own_offer))
                    .await
                {
                    tracing::debug!(%peer, code = ?s.code(), error = %s.message(), "punch ready refused");
                    if let Some(probing) = probing {
                        probing.abort();
                    }
                }
                return;
            }
            tracing::info!(%peer, punch = p.punch_id, candidates = addrs.len(), "punch: opening towards the caller");
            let _ = reports.send(coordinated::Report::Quic { peer }).await;
            // Probe before opening: each opening packet to a new candidate
            // takes the next mapping of a sequential NAT, so the window
            // covers as many of them as we open (and a few others' flows).
            let window = addrs.len() + PREDICTION_WINDOW / 2;
            let candidates = with_predictions(candidates, predictor, window).await;
            let (started, opened) = tokio::sync::oneshot::channel();
            let _ = mesh
                .send(MeshCommand::Punch {
                    peer,
                    addrs,
                    open_first: true,
                    started: Some(started),
                })
                .await;
            // The dial is under way once `opened` fires; its first opening
            // packet leaves when the swarm next polls it, a moment later.
            let _ = opened.await;
            tokio::time::sleep(Duration::from_millis(2)).await;
            if let Err(s) = client.punch_ready(p.punch_id, candidates, None).await {
                tracing::debug!(%peer, code = ?s.code(), error = %s.message(), "punch ready refused");
            }
        });
    }

    fn endpoints(&self) -> Vec<String> {
        let mut all = self.advertise.clone();
        all.extend(self.reachable.iter().cloned());
        all.dedup();
        all.truncate(32);
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
            if let Err(s) = self.client.report_nat(nat.to_proto()).await {
                return session_end(s);
            }
        }
        let mut report = tokio::time::interval(self.link_report_interval);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut links_dirty = true;
        loop {
            tokio::select! {
                Some(r) = self.punch_reports_rx.recv() => {
                    self.on_punch_report(r);
                    self.publish();
                }
                Some(()) = self.nat_early_rx.recv() => {
                    for peer in std::mem::take(&mut self.deferred_punches) {
                        self.request_punch(peer);
                    }
                }
                Some(result) = self.nat_rx.recv() => {
                    let Some(nat) = result else {
                        // Punch without prediction from now on.
                        self.nat_started = false;
                        self.predictor_tx.send_replace(Some(None));
                        for peer in std::mem::take(&mut self.deferred_punches) {
                            self.request_punch(peer);
                        }
                        continue;
                    };
                    tracing::info!(nat = %nat.describe(), mapping = ?nat.mapping, filtering = ?nat.filtering, public = ?nat.public, "NAT behaviour");
                    self.view.send_modify(|v| v.nat = Some(nat.clone()));
                    let report = nat.to_proto();
                    self.nat = Some(nat);
                    let predictor = match self.nat.as_ref().and_then(|n| n.mapping) {
                        Some(crate::nat_discovery::Mapping::Sequential { stride }) => {
                            self.stun_primary.map(|p| (p, stride))
                        }
                        _ => None,
                    };
                    self.predictor_tx.send_replace(Some(predictor));
                    for peer in std::mem::take(&mut self.deferred_punches) {
                        self.request_punch(peer);
                    }
                    if let Err(s) = self.client.report_nat(report).await {
                        return session_end(s);
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(update)) => {
                        self.maybe_discover_nat(&update);
                        match self.map.apply(update) {
                            Ok(changes) => {
                                if !self.view.borrow().control.connected {
                                    tracing::info!(peers = self.map.peers.len(), version = self.map.version, "network map received");
                                    self.set_control(true, None);
                                }
                                links_dirty |= self.on_changes(changes).await;
                            }
                            Err(e) => return Ok(SessionEnd::Retry(format!("bad map update: {e}"))),
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
                    Err(s) => return session_end(s),
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
                    dirty = true;
                }
                MapChange::Removed(id) => {
                    tracing::info!(peer = %id, "peer left");
                    self.links.remove(&id);
                    if let Ok(peer) = id.parse() {
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
                MapChange::Punch(p) => self.answer_punch(p).await,
                MapChange::RelaysChanged => {
                    tracing::info!(relays = self.map.relays.len(), "relay directory");
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
        let links = self
            .links
            .iter()
            .map(|(id, l)| LinkReport {
                peer_id: id.clone(),
                path: l.path.to_proto() as i32,
                rtt_ms: l.rtt_ms,
                loss: l.loss,
                via: l.via.clone().unwrap_or_default(),
                bytes_in: l.bytes_in,
                bytes_out: l.bytes_out,
            })
            .collect();
        self.client.report_links(links).await
    }

    fn set_control(&self, connected: bool, error: Option<String>) {
        self.view.send_modify(|v| {
            v.control.connected = connected;
            v.control.error = error;
        });
    }

    fn publish(&self) {
        let peers = self
            .map
            .peers
            .values()
            .map(|p: &Peer| {
                let l = self
                    .links
                    .get(&p.node_id)
                    .cloned()
                    .unwrap_or_else(LinkState::new);
                PeerStatus {
                    id: p.node_id.clone(),
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
                }
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

/// A NAT verdict as a punch from probe sockets needs it.
fn own_of(nat: Option<&crate::nat_discovery::NatBehavior>) -> coordinated::Own {
    use crate::nat_discovery::Mapping as M;
    let mapping = match nat.and_then(|n| n.mapping) {
        Some(M::EndpointIndependent) => Mapping::Stable,
        Some(M::Sequential { stride }) => Mapping::Sequential(stride),
        Some(M::AddressDependent | M::Random) => Mapping::Random,
        None => Mapping::Unknown,
    };
    coordinated::Own {
        mapping,
        no_nat: nat.is_some_and(|n| n.no_nat),
    }
}

/// Predicted ports offered to a peer for one punch (seed 003).
const PREDICTION_WINDOW: usize = 8;

/// `candidates` with, first, the public endpoints a sequential NAT will give
/// our next new mappings (probed just now), when `predictor` says it is one.
async fn with_predictions(
    candidates: Vec<String>,
    predictor: Option<(SocketAddr, i32)>,
    window: usize,
) -> Vec<String> {
    let Some((stun, stride)) = predictor else {
        return candidates;
    };
    match crate::nat_discovery::probe(stun).await {
        Ok(Some(last)) => predicted_first(candidates, last, stride, window),
        Ok(None) | Err(_) => candidates,
    }
}

/// `candidates` after the next `window` mappings of a sequential NAT whose
/// last one (observed just now) is `last`.
fn predicted_first(
    mut candidates: Vec<String>,
    last: SocketAddr,
    stride: i32,
    window: usize,
) -> Vec<String> {
    let predicted: Vec<String> = crate::nat_discovery::predict(last, stride, window.min(24))
        .into_iter()
        .map(|a| crate::relay::quic_addr(a).to_string())
        .collect();
    tracing::debug!(%last, stride, predicted = predicted.len(), "port prediction");
    candidates.retain(|c| !predicted.contains(c));
    let mut out = predicted;
    out.extend(candidates);
    out.truncate(32);
    out
}

fn parse_addrs(list: &[String]) -> Vec<libp2p::Multiaddr> {
    list.iter().filter_map(|a| a.parse().ok()).collect()
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
/// restarting); any answer from it is returned.
async fn retry_unavailable<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut backoff = Backoff::new();
    loop {
        match op().await {
            Ok(v) => return Ok(v),
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
        assert!(first >= Backoff::FIRST && first < Backoff::FIRST + Duration::from_millis(50));
        for _ in 0..10 {
            b.step();
        }
        assert!(b.step() < Backoff::MAX + Duration::from_millis(50));
        b.reset();
        assert!(b.step() < Backoff::FIRST + Duration::from_millis(50));
    }
}
