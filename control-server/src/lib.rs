//! The peermesh control server (seed 004's control server, seed 002's
//! rendezvous): groups of nodes, join tokens, network maps streamed as
//! deltas, link status, all behind a tonic gRPC API with state in sled.
//!
//! - [`registry`]: the control-plane logic and per-group change hubs.
//! - [`relays`]: the relay directory (seed 001): relay registration, the
//!   member sets relays serve, online relays and their load in every map.
//! - [`store`]: the sled schema.
//! - [`api`]: the gRPC services (node, relay and admin).
//! - [`server`]: data directory, admin credential and listener.

pub mod api;
pub mod error;
pub mod registry;
pub mod relays;
pub mod rendezvous;
pub mod secrets;
pub mod server;
pub mod store;
pub mod stun;
pub mod validate;

pub use error::ControlError;
pub use server::Server;
