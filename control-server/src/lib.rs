//! The peermesh control server (seed 004's control server, seed 002's
//! rendezvous): groups of nodes, join tokens, network maps streamed as
//! deltas, link status, all behind a tonic gRPC API with state in sled.
//!
//! Modules, from the bottom up (each uses only those above it in this list,
//! the leaf helpers aside):
//!
//! - [`error`], [`validate`], [`secrets`]: typed errors, input limits,
//!   the secrets the server hands out (leaf helpers).
//! - [`limits`]: the tunable limits and why each default is what it is.
//! - [`store`]: the sled schema.
//! - [`sessions`]: server id, clock, signed-request freshness and session
//!   credentials, for nodes and relays.
//! - [`tokens`]: what a join or relay token allows, checked alike for both.
//! - [`hub`]: **the change hub**, per-group fan-out: versions, members,
//!   online tracking, map deltas to watchers, membership changes to relays,
//!   the relay list in every map. Lock order is documented there.
//! - [`registry`]: groups, tokens, nodes, links and mesh addresses; publishes
//!   membership changes into the hub.
//! - [`relays`]: **the relay directory** (seed 001): relay registration,
//!   member watches, load; publishes the online relay list into the hub.
//! - [`rendezvous`]: **the rendezvous** (seed 002): hole-punch coordination
//!   between two members over their watch streams.
//! - [`stun`]: STUN answers for NAT behaviour discovery (seed 003).
//! - [`api`]: **the control API**, the gRPC services (node, relay, admin)
//!   and the one stream pump they share.
//! - [`tls`]: the server key (TLS certificate, map signatures, rotation)
//!   and the listener (TLS, plaintext only from loopback, timeouts).
//! - [`ratelimit`]: per-source rate limits.
//! - [`server`]: wiring: data directory, admin credential, listener.

pub mod api;
pub mod error;
pub mod hub;
pub mod limits;
pub mod ratelimit;
pub mod registry;
pub mod relays;
pub mod rendezvous;
pub mod secrets;
pub mod server;
pub mod sessions;
pub mod store;
pub mod stun;
pub mod tls;
pub mod tokens;
pub mod validate;

pub use error::ControlError;
pub use server::Server;
