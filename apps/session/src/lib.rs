//! Multiplayer sessions over the mesh (seed 004): an origin (the hosting
//! server) runs the authoritative game; members send their inputs to it and
//! to each other over the mesh, and merge the origin's snapshots with the
//! peers' inputs.
//!
//! - [`game`]: the deterministic game model (integer arithmetic only, so the
//!   same inputs give bit-identical worlds everywhere).
//! - [`wire`]: the session packets between nodes and the origin, and the
//!   inputs members exchange over the mesh.
//! - [`state`]: a member's merged view: the last snapshot replayed with every
//!   known input (prediction, rollback and replay).
//!
//! With the `node` feature (the default), the node side: the protocol
//! `/peermesh/session/1` on an endpoint's router (`spawn`, `SessionHandle`,
//! `SessionHandler`, `protocol`) and the local API operation and its client
//! (`ops`). The origin (`hosting-server`) uses the crate without it, so it
//! never links the node library; the node does not depend on the origin.

pub mod game;
pub mod state;
pub mod wire;

#[cfg(feature = "node")]
pub mod ops;
#[cfg(feature = "node")]
mod service;
#[cfg(feature = "node")]
pub use service::*;
