//! Hole punching for one peer link, coordinated by the control server.
//!
//! The control server sees both sides' public endpoints and NAT behaviour, so
//! it decides *when* both sides send (seed 002: a common `start_at`; each side
//! first sends a low-TTL opening packet that opens its own NAT and dies before
//! the peer's, then probes directly) and *where* when a NAT is symmetric
//! (seed 003: predicted ports for sequential NATs, a bounded birthday search
//! for random ones). [`HolePunch`] does the local part — pacing, budget,
//! confirmation by probe/ack — as a pure state machine so that it can be run
//! exhaustively on the simulated network (`peermesh-netsim`).
//!
//! The real-socket driver and the rendezvous glue live in the node library
//! (`peermesh-node`, `punch/`); this crate is the part with no I/O.

mod machine;
pub mod plan;
mod wire;

#[cfg(test)]
mod tests;

pub use machine::{
    Action, Config, Counters, Event, FailReason, HolePunch, Instruction, Phase, Role,
};
pub use wire::{ProbeKind, ProbeMessage};
