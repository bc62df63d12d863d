//! The control API: the gRPC services over the registry, the relay
//! directory and the rendezvous: request parsing, credentials, streams.
//!
//! - [`node`]: `NodeControl`, what mesh nodes call.
//! - [`relay`]: `RelayControl`, what relay servers call.
//! - [`admin`]: `Admin`, what operators call.
//! - [`stream`]: the one pump behind every server stream.

pub mod admin;
pub mod node;
pub mod relay;
pub mod stream;

use tonic::metadata::MetadataMap;
use tonic::Status;

/// The bearer credential of a request, if it has one.
pub(crate) fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization metadata (Bearer …)"))?;
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization metadata is not ASCII"))?;
    value.strip_prefix("Bearer ").map(str::trim).ok_or_else(|| {
        Status::unauthenticated("authorization metadata must be `Bearer <credential>`")
    })
}
