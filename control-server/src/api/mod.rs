//! The gRPC face of the registry: request parsing, credentials, streams.

pub mod admin;
pub mod node;
pub mod relay;

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
