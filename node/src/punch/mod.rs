//! Hole punching on real sockets: the async shell around the sans-IO
//! hole-punch machine of `peermesh-traversal`.
//!
//! - [`driver`]: runs [`peermesh_traversal::hole_punch::HolePunch`] on UDP
//!   probe sockets (the clock, TTL, many sockets for a birthday search).
//! - [`coordinated`]: one punch from probe sockets as the control server's
//!   rendezvous sets it up; the winning socket goes to QUIC
//!   ([`crate::swarm::punched`]).

pub mod coordinated;
pub mod driver;
