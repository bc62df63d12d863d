//! Content distribution: fetch a file published by the origin (hosting server) from the
//! group's members that have its chunks, fall back to the origin for the rest, and serve
//! what this node holds to the others.
//!
//! - [`wire`]: the peer protocol on the `Content` channel.
//! - [`store`]: the chunk cache under `STATE/content/` and the manifests.
//! - [`origin`]: the HTTP client of the origin.
//! - [`service`]: the actor that runs it all (one task; one sender task per peer).
//!
//! `meshnode get --state DIR CONTENT_ID -o FILE [--origin URL]` asks the running node over
//! its socket (`{"op":"get",…}`, answered with progress lines and a [`FetchReport`]); the
//! origin is `get --origin`, else `up --origin` (one of them is needed to fetch a manifest that
//! is not cached yet).
//!
//! Test hook: a node started with `PEERMESH_TEST_CORRUPT_CHUNKS=1` in its environment (read
//! once at start) flips a byte in every chunk it serves to peers, so that the tests can check
//! that a peer sending bad chunks is refused and the fetch still completes. Never set it
//! otherwise.

pub mod cli;
pub mod origin;
pub mod service;
pub mod store;
pub mod wire;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWrite;

use crate::status::write_line;
use tokio::sync::{mpsc, oneshot, watch};

pub use service::{spawn, ContentConfig};

/// The environment variable of the corrupting test hook (see the module docs).
pub const CORRUPT_ENV: &str = "PEERMESH_TEST_CORRUPT_CHUNKS";

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("bad manifest: {0}")]
    BadManifest(String),
    #[error("origin: {0}")]
    Origin(String),
    #[error("{0}")]
    Fetch(String),
}

/// `{"op":"get",…}` on the node's socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GetRequest {
    /// Content id, 64 hex digits.
    pub content: String,
    /// Where to write the file (absolute: the node's working directory is not the CLI's).
    pub output: PathBuf,
    /// Origin URL for this fetch; the node's `up --origin` when absent.
    #[serde(default)]
    pub origin: Option<String>,
}

/// Where a fetch stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FetchProgress {
    pub size: u64,
    pub chunks: u32,
    pub chunks_done: u32,
    pub bytes_done: u64,
    pub bytes_from_origin: u64,
    pub bytes_from_peers: u64,
    /// Peers this node is fetching from right now.
    pub peers_active: usize,
}

/// Bytes one peer delivered in a fetch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerBytes {
    pub id: String,
    pub name: String,
    pub bytes: u64,
    pub chunks: u32,
}

/// A peer refused for the rest of a fetch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefusedPeer {
    pub id: String,
    pub name: String,
    pub reason: String,
}

/// The outcome of a fetch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FetchReport {
    pub content: String,
    pub name: String,
    pub output: PathBuf,
    pub size: u64,
    /// BLAKE3 of the written file; equal to the manifest's.
    pub file_hash: String,
    pub seconds: f64,
    pub bytes_from_origin: u64,
    pub bytes_from_peers: u64,
    /// Bytes that were in the cache already.
    pub bytes_cached: u64,
    /// `bytes_from_origin / (bytes_from_origin + bytes_from_peers)` (0 when nothing moved).
    pub origin_share: f64,
    pub peers: Vec<PeerBytes>,
    pub refused: Vec<RefusedPeer>,
    /// Chunks that failed their hash check (from peers or the origin).
    pub bad_chunks: u64,
    /// Peer requests that timed out or were turned down and went elsewhere.
    pub retried_requests: u64,
    /// Malformed or unexpected content messages from peers dropped so far (whole node).
    pub dropped_messages: u64,
}

/// Starts the content service for `node` (call between [`crate::Node::start`] and
/// [`crate::Node::run`]): takes the `Content` channel's inbox, opens the cache under
/// `state_dir`, and hands the node the handle its socket answers `get` with.
pub async fn attach(
    node: &mut crate::Node,
    state_dir: &Path,
    origin: Option<String>,
) -> Result<(), ContentError> {
    let inbox = node
        .take_inbox(crate::mesh::channel::Channel::Content)
        .ok_or_else(|| ContentError::Fetch("the content channel is taken already".into()))?;
    let corrupt_chunks = std::env::var(CORRUPT_ENV).is_ok_and(|v| v == "1");
    let handle = spawn(
        ContentConfig {
            state_dir: state_dir.to_path_buf(),
            origin,
            corrupt_chunks,
        },
        node.mesh_client(),
        inbox,
    )
    .await?;
    node.attach_content(handle);
    Ok(())
}

/// What the service is asked.
pub(crate) enum Command {
    Get {
        req: GetRequest,
        progress: watch::Sender<FetchProgress>,
        reply: oneshot::Sender<Result<FetchReport, String>>,
    },
}

/// A handle on the running content service (cheap to clone).
#[derive(Clone)]
pub struct ContentHandle {
    pub(crate) tx: mpsc::Sender<Command>,
}

impl ContentHandle {
    /// Starts a fetch; progress on the watch, the outcome on the oneshot.
    pub async fn get(
        &self,
        req: GetRequest,
    ) -> Result<
        (
            watch::Receiver<FetchProgress>,
            oneshot::Receiver<Result<FetchReport, String>>,
        ),
        String,
    > {
        let (progress, progress_rx) = watch::channel(FetchProgress::default());
        let (reply, reply_rx) = oneshot::channel();
        self.tx
            .send(Command::Get {
                req,
                progress,
                reply,
            })
            .await
            .map_err(|_| "the content service stopped".to_string())?;
        Ok((progress_rx, reply_rx))
    }
}

/// One line of the `get` answer stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GetLine {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<FetchProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<FetchReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl GetLine {
    fn error(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            progress: None,
            report: None,
            error: Some(e.into()),
        }
    }
}

/// The node's side of `{"op":"get"}`: progress lines every 200 ms, then the report (or the
/// error). The fetch goes on if the client goes away (its chunks are cached either way).
pub async fn answer_get(
    handle: Option<&ContentHandle>,
    req: GetRequest,
    w: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<()> {
    let Some(handle) = handle else {
        return write_line(
            w,
            &GetLine::error("this node does not run the content service"),
        )
        .await;
    };
    let (mut progress, mut done) = match handle.get(req).await {
        Ok(x) => x,
        Err(e) => return write_line(w, &GetLine::error(e)).await,
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tokio::select! {
            r = &mut done => {
                let line = match r {
                    Ok(Ok(report)) => GetLine { ok: true, progress: None, report: Some(report), error: None },
                    Ok(Err(e)) => GetLine::error(e),
                    Err(_) => GetLine::error("the content service stopped"),
                };
                return write_line(w, &line).await;
            }
            _ = tick.tick() => {
                let p = progress.borrow_and_update().clone();
                write_line(w, &GetLine { ok: true, progress: Some(p), report: None, error: None }).await?;
            }
        }
    }
}

/// The CLI's side: sends the request to the node behind `socket` and calls `on_progress` for
/// every progress line until the report arrives.
pub async fn get_via_socket(
    socket: &Path,
    req: &GetRequest,
    mut on_progress: impl FnMut(&FetchProgress),
) -> Result<FetchReport, crate::NodeError> {
    use crate::NodeError;
    let mut client = crate::status::Client::connect(socket).await?;
    let mut line = serde_json::to_value(req).expect("serializes");
    line["op"] = "get".into();
    client.write_request(&line).await?;
    loop {
        let l: GetLine = client.read_line().await?;
        if !l.ok {
            return Err(NodeError::Status(
                l.error.unwrap_or_else(|| "the fetch failed".into()),
            ));
        }
        if let Some(r) = l.report {
            return Ok(r);
        }
        if let Some(p) = l.progress {
            on_progress(&p);
        }
    }
}
