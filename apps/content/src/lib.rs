//! Content distribution (seed 004): fetch a file published by the origin (hosting server)
//! from the group's members that have its chunks, fall back to the origin for the rest, and
//! serve what this node holds to the others.
//!
//! - [`manifest`]: the manifest format the origin publishes and nodes check (always built;
//!   the origin uses the crate with `default-features = false` for it alone).
//!
//! With the `node` feature (default):
//!
//! - [`wire`]: the peer protocol's messages, on [`PROTOCOL`].
//! - [`scheduler`]: every fetch decision (which chunk from which peer, when the origin takes
//!   over, who is refused), as a state machine without I/O.
//! - [`store`]: the chunk cache under `STATE/content/` and the manifests it has seen:
//!   crash-safe writes, every chunk checked against its hash when read, a size limit with
//!   least-recently-used eviction (`meshnode up --cache-size`).
//! - [`origin`]: the HTTP client of the origin.
//! - [`service`]: the actor that runs it all on the endpoint's router (one task; one sender
//!   task per peer).
//! - [`cli`]: `meshnode get`'s progress bar and report.
//!
//! ```text
//! let (content, handler) = peermesh_content::spawn(ContentConfig::new(origin), endpoint.clone()).await?;
//! let router = Router::builder(endpoint).accept(peermesh_content::protocol(), handler).spawn();
//! // the local API server answers {"op":"get"} with peermesh_content::answer_get(Some(&content), req, w)
//! ```
//!
//! `meshnode get --state DIR CONTENT_ID -o FILE [--origin URL]` asks the running node over
//! its socket (`{"op":"get",…}`, answered with progress lines and a [`FetchReport`]); the
//! origin is `get --origin`, else `up --origin` (one of them is needed to fetch a manifest that
//! is not cached yet).
//!
//! Test hook: a node started with `PEERMESH_TEST_CORRUPT_CHUNKS=1` in its environment (read
//! once, by [`ContentConfig::new`]) flips a byte in every chunk it serves to peers, so that the
//! tests can check that a peer sending bad chunks is refused and the fetch still completes.
//! Never set it otherwise.

pub mod manifest;

#[cfg(feature = "node")]
pub mod cli;
#[cfg(feature = "node")]
mod node;
#[cfg(feature = "node")]
pub mod origin;
#[cfg(feature = "node")]
pub mod scheduler;
#[cfg(feature = "node")]
pub mod service;
#[cfg(feature = "node")]
pub mod store;
#[cfg(feature = "node")]
pub mod wire;

#[cfg(feature = "node")]
pub use node::*;
#[cfg(feature = "node")]
pub use store::{parse_size, SizeError};
