//! The traversal core of peermesh: every decision about how two nodes reach
//! each other, as state machines with no I/O and no clock (in the manner of
//! quinn-proto and str0m's ICE crate). Datagrams, events and the current
//! time go in; datagrams to send, actions and the next timeout come out.
//! The node library (`peermesh-node`) is the thin async shell that moves
//! them over real sockets and libp2p; the simulated network
//! (`peermesh-netsim`, a dev-dependency) drives them exhaustively under
//! every NAT type with loss and latency on a virtual clock.
//!
//! No tokio, no libp2p: neither is a dependency, so the compiler keeps it so.
//!
//! - [`path_switch`]: one exactly-once, in-order message stream over paths
//!   that come and go (relay → direct → forwarded), with path liveness.
//! - [`flow_control`]: per-protocol credit on a link, so that no protocol can
//!   stall another.
//! - [`link_policy`]: when a peer link dials, asks for a punch, goes through
//!   a forwarding member, and backs off.
//! - [`rendezvous`]: this node's side of punches coordinated through the
//!   control server (seed 002): when to ask, what to offer, how to answer.
//! - [`nat_discovery`]: NAT mapping and filtering behaviour against the
//!   control server's STUN endpoints (seed 003, RFC 5780).
//! - [`port_prediction`]: the port predictor for sequential symmetric NATs.
//! - [`hole_punch`]: punching from probe sockets: low-TTL opening packets,
//!   predicted ports, the birthday search; and the plan that turns both
//!   sides' offers into one side's instruction.
//! - [`stun`]: the STUN subset both the server and the nodes speak.

pub mod flow_control;
pub mod hole_punch;
pub mod link_policy;
pub mod nat_discovery;
pub mod path_switch;
pub mod port_prediction;
pub mod rendezvous;
pub mod stun;
