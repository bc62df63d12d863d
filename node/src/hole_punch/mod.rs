//! Hole punching for one peer link, coordinated by the control server.
//!
//! The control server sees both sides' public endpoints and NAT behaviour, so
//! it decides *when* both sides send (seed 002: a common `start_at`; each side
//! first sends a low-TTL opening packet that opens its own NAT and dies before
//! the peer's, then probes directly) and *where* when a NAT is symmetric
//! (seed 003: predicted ports for sequential NATs, a bounded birthday search
//! for random ones). [`HolePunch`] does the local part — pacing, budget,
//! confirmation by probe/ack — as a pure state machine so that it can be run
//! exhaustively on [`crate::netsim`].

pub mod coordinated;
pub mod driver;
mod machine;
pub mod plan;
mod predict;
mod wire;

#[cfg(test)]
mod tests;

pub use machine::{
    Action, Config, Counters, Event, FailReason, HolePunch, Instruction, Phase, Role,
};
pub use predict::{
    classify_mapping, ObservedMapping, PortPrediction, DEFAULT_BIRTHDAY_PROBES,
    DEFAULT_BIRTHDAY_SOCKETS, DEFAULT_MAX_STRIDE, DEFAULT_SEQUENTIAL_WINDOW,
};
pub use wire::{ProbeKind, ProbeMessage};
