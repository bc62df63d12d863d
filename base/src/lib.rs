//! The types every peermesh crate shares, in a leaf crate so that the
//! traversal core, the node library, the applications and the binaries can
//! all depend on it (as `iroh-base` and Tailscale's `ipnstate` do).
//!
//! No I/O, no async runtime, no libp2p: the compiler keeps it that way,
//! since none of them is a dependency.
//!
//! - [`NodeId`]: a member's identity (its libp2p peer id, as bytes).
//! - [`PathKind`]: how a path reaches a peer (relay, direct, forwarded).
//! - [`nat`]: a NAT's mapping and filtering behaviour (RFC 4787 terms).
//! - [`status`]: what a running node shows of itself and its peers.

pub mod event;
pub mod nat;
mod node_id;
pub mod path;
pub mod status;

pub use nat::{NatBehavior, NatFiltering, NatMapping};
pub use node_id::{NodeId, NodeIdError};
pub use path::{path_name, PathKind};
