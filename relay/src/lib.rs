//! The relay of peermesh (seed 001), in a crate of its own as iroh-relay is:
//!
//! - [`server`]: `meshnode relay`, a libp2p circuit relay v2 that registers
//!   in the control server's relay directory, serves only the members the
//!   control server vouches for, observes each node's public address (via
//!   identify) and reports its load.
//! - [`control`]: the relay's client of the control API.
//! - [`config`]: what nodes and relays must agree on (the identify protocol,
//!   the QUIC address form, per-peer rate limits of a relay v2 server, which
//!   every node also runs to forward for members).
//! - [`identity`]: a libp2p identity kept on disk (relays and nodes alike).

pub mod config;
pub mod control;
pub mod identity;
pub mod server;

pub use config::{quic_addr, IDENTIFY_PROTOCOL};
pub use server::{run, RelayConfig};

/// What can stop a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    BadUrl(#[from] peermesh_proto::client::BadUrl),
    #[error("the control server refused: {message} ({code:?})")]
    Refused { code: tonic::Code, message: String },
    /// The relay's token was revoked: it is no longer in the directory.
    #[error("this relay is no longer in the directory: {0}")]
    Revoked(String),
    #[error("libp2p: {0}")]
    Swarm(String),
}

impl From<tonic::Status> for RelayError {
    fn from(s: tonic::Status) -> Self {
        if s.code() == tonic::Code::PermissionDenied {
            return Self::Revoked(s.message().to_string());
        }
        Self::Refused {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}
