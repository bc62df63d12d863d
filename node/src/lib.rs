//! The peermesh node library: an embeddable [`Endpoint`] that joins a group
//! through the control server and reaches every other member (relay first,
//! then a hole-punched direct path, or through a member that forwards),
//! and a [`Router`] on which applications register their protocols.
//!
//! ```no_run
//! # async fn demo() -> Result<(), peermesh_node::NodeError> {
//! use peermesh_node::{Endpoint, EndpointConfig, Incoming, ProtocolId, Router};
//! let mut config = EndpointConfig::new("./state");
//! config.control_url = Some("http://127.0.0.1:7443".into());
//! config.token = Some("pmj_…".into());
//! let endpoint = Endpoint::bind(config).await?;
//! let chat = ProtocolId::from_static("/example/chat/1");
//! let router = Router::builder(endpoint.clone())
//!     .accept(chat.clone(), |mut incoming: Incoming| async move {
//!         while let Some(m) = incoming.recv().await {
//!             println!("{}: {}", m.from, String::from_utf8_lossy(&m.data));
//!         }
//!     })
//!     .spawn();
//! if let Some(peer) = endpoint.resolve("laptop") {
//!     let _ = endpoint.sender(chat).send(peer, b"hello").await;
//! }
//! endpoint.stopped().await;
//! # drop(router); Ok(()) }
//! ```
//!
//! Layers, each using only those above it (no module cycle):
//!
//! - [`error`], [`state_dir`]: typed errors; identity and membership on disk.
//! - `control`: the client of the control server's node API.
//! - `netmap`: the group's network map, kept in step (sans-IO).
//! - [`protocol`]: protocol names on the wire, and the dispatch table.
//! - `nat`: NAT discovery and STUN probes on real sockets.
//! - `swarm`: the libp2p swarm task (QUIC, relay client, forwarding for
//!   members, DCUtR, punched sockets handed to QUIC).
//! - `punch`: the hole-punch machine on real probe sockets.
//! - `link`: one isolated worker per peer link (path switch + link policy).
//! - `mesh`: the link table and the routing between links and the swarm.
//! - [`endpoint`]: the [`Endpoint`]: join, the control session, punches,
//!   status and events.
//! - [`router`]: protocols registered by applications.
//! - [`local_api`]: the framing of the `meshnode` local socket.
//!
//! The decisions (path switch, link policy, NAT discovery, port prediction,
//! hole punching, rendezvous) live in `peermesh-traversal`, which has no
//! I/O; the shared types in `peermesh-base`.

// The public surface: the endpoint, the router, protocols, the local API
// framing and the state directory. The machinery under them is private.
mod control;
pub mod endpoint;
pub mod error;
mod link;
pub mod local_api;
mod mesh;
mod nat;
mod netmap;
pub mod protocol;
mod punch;
pub mod router;
pub mod state_dir;
mod swarm;

pub use endpoint::{
    Endpoint, EndpointConfig, Event, EventKind, Events, LinkSender, ProtocolSender, PunchMode,
    SendError, Stopped,
};
pub use error::NodeError;
pub use peermesh_base::{status, NodeId, PathKind};
pub use protocol::{Message, ProtocolId};
pub use router::{Incoming, ProtocolHandler, Router, RouterBuilder};
pub use state_dir::Membership;
pub use swarm::warm_up_tls;
