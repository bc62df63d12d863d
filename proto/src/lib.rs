//! The peermesh control API: generated protobuf/gRPC types and the exact byte
//! strings that nodes sign, shared by the node and the control server so the
//! two can never disagree on them.

pub mod control {
    pub mod v1 {
        tonic::include_proto!("peermesh.control.v1");
    }
}

pub mod store {
    pub mod v1 {
        tonic::include_proto!("peermesh.store.v1");
    }
}

pub mod client;
pub mod convert;
pub mod signing;
pub mod tls;
pub mod token;

pub use control::v1 as api;
