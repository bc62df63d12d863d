//! peermesh node library: what `meshnode` is made of.
//!
//! - [`state_dir`]: identity key and membership on disk.
//! - [`control`]: the client of the control server's node API.
//! - [`netmap`]: the group's network map, kept in step with the server (sans-IO).
//! - [`daemon`]: the running node that ties them together.
//! - [`status`]: the status view and the local socket `meshnode status` reads.

pub mod content;
pub mod control;
pub mod daemon;
pub mod error;
pub mod hole_punch;
pub mod link;
pub mod mesh;
pub mod nat_discovery;
pub mod netmap;
pub mod netsim;
pub mod path_switch;
pub mod relay;
pub mod session;
pub mod state_dir;
pub mod status;
pub mod swarm;
pub mod tun;

pub use daemon::{Node, NodeConfig};
pub use error::NodeError;
