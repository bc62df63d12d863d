//! The embeddable endpoint: a member of a peermesh group in-process.
//!
//! [`Endpoint::bind`] joins the group (with a token) or authenticates (with
//! the membership a state directory remembers), starts the mesh (one link
//! worker per member, the swarm under them) and the control session that
//! keeps it in step with the control server, and returns at once. From then
//! on:
//!
//! - [`Endpoint::status`] is the node's view of itself and its peers;
//! - [`Endpoint::events`] streams members and paths as they change;
//! - [`Endpoint::sender`] sends on an application protocol, and a
//!   [`crate::Router`] delivers the messages of the protocols registered on
//!   it (nothing is delivered before the router runs; nothing is lost
//!   either: links wait for it);
//! - [`Endpoint::stopped`] resolves when the endpoint stops (shut down, or
//!   this node was revoked).

mod events;
mod punching;
mod session;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libp2p::PeerId;
use peermesh_base::status::{ControlStatus, NodeStatus};
use peermesh_base::NodeId;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Code;

pub use events::{Events, Received, EVENT_HISTORY};
pub use peermesh_base::event::{Event, EventKind};
pub use session::sanitize_name;

use crate::control::ControlClient;
use crate::error::{NodeError, Result};
pub use crate::mesh::PunchMode;
use crate::mesh::{self, MeshCommand};
use crate::protocol::{Dispatch, ProtocolId, MAX_MESSAGE};
use crate::state_dir::{Membership, StateDir, StateLock};

/// How often link status (RTT, loss, byte counters) goes to the control
/// server; a change of path goes at once, and an unchanged table not at
/// all. The admin's RTT and byte columns are at most this stale; an idle
/// group sends the server next to nothing.
pub const LINK_REPORT_INTERVAL: Duration = Duration::from_secs(30);

/// What an endpoint is started with.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Identity key, membership, lock.
    pub state_dir: PathBuf,
    /// Control server URL; remembered from an earlier run when absent.
    pub control_url: Option<String>,
    /// Join token (`pmj_…`, with the server key's fingerprint); needed only
    /// until the node has joined.
    pub token: Option<String>,
    /// Plaintext (`http://`) to a control server that is not on loopback:
    /// only on a network the user trusts (maps stay signed).
    pub insecure: bool,
    /// Requested name; defaults to the host name.
    pub name: Option<String>,
    /// Extra addresses (multiaddrs) to publish for this node.
    pub advertise: Vec<String>,
    /// How often link status goes to the control server when nothing changes.
    pub link_report_interval: Duration,
    /// UDP address for the mesh's QUIC endpoint.
    pub listen: SocketAddr,
    /// How direct paths are punched.
    pub punch: PunchMode,
    /// Whether this node forwards traffic between members that have no
    /// direct path to each other (seed 004).
    pub forward: bool,
}

impl EndpointConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            control_url: None,
            token: None,
            insecure: false,
            name: None,
            advertise: Vec::new(),
            link_report_interval: LINK_REPORT_INTERVAL,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            punch: PunchMode::Control,
            forward: true,
        }
    }
}

/// Why an endpoint stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// [`Endpoint::shutdown`] was called (or every handle dropped).
    Shutdown,
    /// This node is no longer a member (revoked or removed by an admin).
    Revoked(String),
    /// The control server refused this node for good, or the mesh failed.
    Failed(String),
}

struct Inner {
    id: NodeId,
    membership: Membership,
    state: StateDir,
    mesh: mpsc::Sender<MeshCommand>,
    dispatch: Arc<Dispatch>,
    status: watch::Receiver<NodeStatus>,
    events: Arc<events::EventLog>,
    shutdown: watch::Sender<bool>,
    stopped: watch::Receiver<Option<Stopped>>,
    _lock: StateLock,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// A running member of a group. Cheap to clone; the endpoint stops when
/// [`Endpoint::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.inner.id)
            .field("name", &self.inner.membership.name)
            .finish()
    }
}

impl Endpoint {
    /// Opens the state directory (refusing one that another endpoint uses),
    /// joins with `config.token` or authenticates with the membership it
    /// remembers, and starts the mesh and the control session.
    pub async fn bind(config: EndpointConfig) -> Result<Self> {
        let state = StateDir::open(&config.state_dir)?;
        let lock = state.lock()?;
        let (keypair, created) = state.identity()?;
        let peer_id = keypair.public().to_peer_id();
        tracing::info!(node = %peer_id, new = created, "identity");
        let remembered = state.membership()?;
        let url = config
            .control_url
            .clone()
            .or_else(|| remembered.as_ref().map(|m| m.control_url.clone()))
            .ok_or(NodeError::NoControlUrl)?;
        for a in &config.advertise {
            if a.parse::<libp2p::Multiaddr>().is_err() {
                return Err(NodeError::Refused {
                    code: Code::InvalidArgument,
                    message: format!("--advertise {a:?} is not a multiaddr"),
                });
            }
        }
        let token = config
            .token
            .as_deref()
            .map(str::parse::<peermesh_proto::token::JoinToken>)
            .transpose()
            .map_err(|e| NodeError::Refused {
                code: Code::InvalidArgument,
                message: format!("--token: {e}"),
            })?;
        if token.is_none() && remembered.is_none() {
            return Err(NodeError::NotJoined);
        }
        // The server key: pinned by the token, or remembered since the join.
        let pin = match (&token, &remembered) {
            (Some(t), _) if t.pin.is_some() => t.pin,
            (_, Some(m)) if !m.server_key.is_empty() => {
                Some(m.server_key.parse().map_err(|e| NodeError::CorruptState {
                    path: state.root().join("node.json"),
                    reason: format!("server_key: {e}"),
                })?)
            }
            _ => None,
        };
        let security = peermesh_proto::client::Security {
            trust: peermesh_proto::tls::ServerTrust::new(pin),
            insecure: config.insecure,
        };
        let client = ControlClient::new(&url, keypair.clone(), security)?;
        // Join with a token, or open a session as the member the state
        // directory remembers; either way the server says who we are.
        let (server_id, node_id, name, group) = match (&token, &remembered) {
            (Some(token), _) => {
                let name = sanitize_name(
                    config
                        .name
                        .as_deref()
                        .or(remembered.as_ref().map(|m| m.name.as_str()))
                        .unwrap_or(&session::host_name()),
                );
                let r = session::retry_unavailable(|| {
                    let mut c = client.clone();
                    let (t, n) = (token.clone(), name.clone());
                    async move { c.join(&t, &n).await }
                })
                .await?;
                // Clones share the session, so `client` now holds it too.
                tracing::info!(group = %r.group, name = %r.name, "joined");
                (r.server_id, r.node_id, r.name, r.group)
            }
            (None, Some(m)) => {
                let server_id = m.server_id.clone();
                let r = session::retry_unavailable(|| {
                    let mut c = client.clone();
                    let s = server_id.clone();
                    async move { c.authenticate(&s).await }
                })
                .await?;
                tracing::info!(group = %r.group, name = %r.name, "authenticated");
                (r.server_id, r.node_id, r.name, r.group)
            }
            (None, None) => return Err(NodeError::NotJoined),
        };
        let membership = Membership {
            control_url: url.clone(),
            server_id,
            server_key: client
                .server_pin()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            node_id,
            name,
            group,
        };
        state.save_membership(&membership)?;
        let id = NodeId::from_bytes(&peer_id.to_bytes()).expect("a peer id is a node id");

        let view = watch::Sender::new(NodeStatus {
            id,
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
        let dispatch = Arc::new(Dispatch::default());
        let mesh = mesh::spawn(
            keypair,
            config.listen,
            config.punch,
            config.forward,
            dispatch.clone(),
        )?;
        let events = Arc::new(events::EventLog::new());
        let commands = mesh.commands.clone();
        let session = session::Session::new(session::Wiring {
            client,
            membership: membership.clone(),
            state: state.clone(),
            advertise: config.advertise,
            link_report_interval: config.link_report_interval,
            view: view.clone(),
            events: events.clone(),
            mesh,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (stopped_tx, stopped) = watch::channel(None);
        let status = view.subscribe();
        tokio::spawn(async move {
            let outcome = match session.run(shutdown_rx).await {
                Ok(()) => Stopped::Shutdown,
                Err(NodeError::Revoked(why)) => Stopped::Revoked(why),
                Err(e) => Stopped::Failed(e.to_string()),
            };
            tracing::info!(?outcome, "endpoint stopped");
            stopped_tx.send_replace(Some(outcome));
            // The view's sender lives until here, so status readers see the
            // last state.
            drop(view);
        });
        Ok(Self {
            inner: Arc::new(Inner {
                id,
                membership,
                state,
                mesh: commands,
                dispatch,
                status,
                events,
                shutdown,
                stopped,
                _lock: lock,
            }),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.id
    }

    /// What this node joined as (name, group, control server).
    pub fn membership(&self) -> &Membership {
        &self.inner.membership
    }

    /// The state directory (applications may keep their own data in it).
    pub fn state_dir(&self) -> &Path {
        self.inner.state.root()
    }

    /// The node's view of itself and its peers, updated as it changes.
    pub fn status(&self) -> watch::Receiver<NodeStatus> {
        self.inner.status.clone()
    }

    /// Members and paths as they change (the recent past first).
    pub fn events(&self) -> Events {
        self.inner.events.subscribe()
    }

    /// The events kept for late watchers (the last
    /// [`events::EVENT_HISTORY`]), oldest first.
    pub fn recent_events(&self) -> Vec<Event> {
        self.inner.events.recent()
    }

    /// A member by id or name, from the current map.
    pub fn resolve(&self, id_or_name: &str) -> Option<NodeId> {
        self.inner.status.borrow().peer(id_or_name).map(|p| p.id)
    }

    /// Sends on `protocol` (to any member).
    pub fn sender(&self, protocol: ProtocolId) -> ProtocolSender {
        ProtocolSender {
            protocol,
            mesh: self.inner.mesh.clone(),
        }
    }

    pub(crate) fn dispatch(&self) -> &Arc<Dispatch> {
        &self.inner.dispatch
    }

    /// Resolves when the endpoint has stopped, with why.
    pub async fn stopped(&self) -> Stopped {
        let mut rx = self.inner.stopped.clone();
        let stopped = match rx.wait_for(|s| s.is_some()).await {
            Ok(s) => s.clone().expect("waited for Some"),
            Err(_) => Stopped::Shutdown,
        };
        stopped
    }

    /// Stops the endpoint (its links, its control session) and waits for it.
    pub async fn shutdown(&self) -> Stopped {
        self.inner.shutdown.send_replace(true);
        self.stopped().await
    }
}

/// Why a message was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("{0} is not a member of this group")]
    NotMember(NodeId),
    #[error("a message of {0} bytes is over the limit of {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("the link to this peer stopped")]
    LinkClosed,
    #[error("the link to this peer is full")]
    Full,
    #[error("a message encoded for another protocol")]
    WrongProtocol,
}

fn peer_id(id: NodeId) -> Option<PeerId> {
    PeerId::from_bytes(id.as_bytes()).ok()
}

/// Sends messages of one protocol to members. Cheap to clone.
#[derive(Clone)]
pub struct ProtocolSender {
    protocol: ProtocolId,
    mesh: mpsc::Sender<MeshCommand>,
}

impl ProtocolSender {
    pub fn protocol(&self) -> &ProtocolId {
        &self.protocol
    }

    /// The sending side of the link to `peer`, for many messages (one
    /// lookup); `None` when `peer` is not a member.
    pub async fn link(&self, peer: NodeId) -> Option<LinkSender> {
        let (reply, rx) = oneshot::channel();
        self.mesh
            .send(MeshCommand::LinkSender {
                peer: peer_id(peer)?,
                protocol: self.protocol.wire_name(),
                reply,
            })
            .await
            .ok()?;
        Some(LinkSender {
            protocol: self.protocol.clone(),
            tx: rx.await.ok().flatten()?,
        })
    }

    /// Sends one message to `peer`, waiting while its link is full
    /// (backpressure on this sender only).
    pub async fn send(&self, peer: NodeId, payload: &[u8]) -> Result<(), SendError> {
        self.link(peer)
            .await
            .ok_or(SendError::NotMember(peer))?
            .send(payload)
            .await
    }
}

/// The sending side of one link, for one protocol. Cheap to clone.
#[derive(Clone)]
pub struct LinkSender {
    protocol: ProtocolId,
    tx: mpsc::Sender<Bytes>,
}

impl LinkSender {
    fn check(payload: &[u8]) -> Result<(), SendError> {
        if payload.len() > MAX_MESSAGE {
            return Err(SendError::TooLarge(payload.len()));
        }
        Ok(())
    }

    /// Queues a message, waiting while the link's queue is full.
    pub async fn send(&self, payload: &[u8]) -> Result<(), SendError> {
        Self::check(payload)?;
        self.tx
            .send(self.protocol.encode(payload))
            .await
            .map_err(|_| SendError::LinkClosed)
    }

    /// Queues a message made by [`ProtocolId::encode`] for this protocol
    /// (a sender of many equal messages encodes once and slices).
    pub async fn send_encoded(&self, msg: Bytes) -> Result<(), SendError> {
        let name = self.protocol.as_str().as_bytes();
        let header = 1 + name.len();
        if msg.len() < header || usize::from(msg[0]) != name.len() || msg[1..header] != *name {
            return Err(SendError::WrongProtocol);
        }
        Self::check(&msg[header..])?;
        self.tx.send(msg).await.map_err(|_| SendError::LinkClosed)
    }

    /// Queues a message if there is room now (a router drops when full: the
    /// peer's application is slow, or the protocol's credit is spent).
    pub fn try_send(&self, payload: &[u8]) -> Result<(), SendError> {
        Self::check(payload)?;
        self.tx
            .try_send(self.protocol.encode(payload))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendError::Full,
                mpsc::error::TrySendError::Closed(_) => SendError::LinkClosed,
            })
    }

    /// Messages waiting in this protocol's queue on the link: a sender of
    /// bulk data keeps it short so that its own small messages do not wait
    /// behind it.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Whether the link has stopped (the peer left the group).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Whether the multiaddr `endpoint` is on one of the mesh addresses `v4`,
/// `v6` (a node's own virtual interface): such an endpoint must never be
/// published or dialled, since the path to it would be the mesh itself.
pub fn is_mesh_endpoint(endpoint: &str, v4: &str, v6: &str) -> bool {
    use libp2p::multiaddr::Protocol;
    let Ok(m) = endpoint.parse::<libp2p::Multiaddr>() else {
        return false;
    };
    let (v4, v6) = (v4.parse().ok(), v6.parse().ok());
    m.iter().any(|p| match p {
        Protocol::Ip4(a) => Some(a) == v4,
        Protocol::Ip6(a) => Some(a) == v6,
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_endpoints_are_recognised() {
        let (v4, v6) = ("100.69.79.49", "fd00::5");
        assert!(is_mesh_endpoint("/ip4/100.69.79.49/udp/5/quic-v1", v4, v6));
        assert!(is_mesh_endpoint("/ip6/fd00::5/udp/5/quic-v1", v4, v6));
        assert!(!is_mesh_endpoint("/ip4/198.18.0.3/udp/5/quic-v1", v4, v6));
        assert!(!is_mesh_endpoint("/ip4/100.69.79.50/udp/5/quic-v1", v4, v6));
        assert!(!is_mesh_endpoint("garbage", v4, v6));
        assert!(!is_mesh_endpoint("/ip4/100.69.79.49/udp/5/quic-v1", "", ""));
    }
}
