//! The node side of content distribution (the `node` feature): the
//! protocol name, the errors, the local API's `get` operation (both sides)
//! and the handle on the running service.

use std::path::{Path, PathBuf};
use std::time::Duration;

use peermesh_node::local_api::{write_line, Connection};
use peermesh_node::{NodeError, ProtocolId};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, oneshot, watch};

use crate::manifest::ManifestError;

pub use crate::service::{spawn, ContentConfig, ContentHandler};

/// The protocol content messages travel on ([`crate::wire`]).
pub const PROTOCOL: &str = "/peermesh/content/1";

/// [`PROTOCOL`] as the router takes it.
pub fn protocol() -> ProtocolId {
    ProtocolId::from_static(PROTOCOL)
}

/// The environment variable of the corrupting test hook (see the crate docs); read by
/// [`ContentConfig::new`].
pub const CORRUPT_ENV: &str = "PEERMESH_TEST_CORRUPT_CHUNKS";

/// How often the node's side of `get` writes a progress line: smooth enough for a progress
/// bar, a few lines a second at most on the socket.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("bad manifest: {0}")]
    BadManifest(#[from] ManifestError),
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
    /// Peers refused for the rest of the fetch so far.
    #[serde(default)]
    pub peers_refused: usize,
}

/// Bytes one peer delivered in a fetch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerBytes {
    pub id: String,
    pub name: String,
    pub bytes: u64,
    pub chunks: u32,
}

/// Why a peer was refused for the rest of a fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// It sent a chunk that fails its hash.
    BadChunk,
    /// It named a chunk past the end of the content (a `Have`, a `Claim`,
    /// or a bitfield of the wrong length).
    OutOfRange,
    /// Snubbed: its requests kept being answered `Busy`.
    Busy,
    /// Snubbed: its requests kept timing out (it claims chunks it does not
    /// deliver).
    Unresponsive,
    /// Snubbed: its requests kept failing otherwise (`NotHere` for chunks it
    /// claimed, data that does not fit).
    Failing,
}

impl RefusalKind {
    /// The name used in the JSON report.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::BadChunk => "bad_chunk",
            RefusalKind::OutOfRange => "out_of_range",
            RefusalKind::Busy => "busy",
            RefusalKind::Unresponsive => "unresponsive",
            RefusalKind::Failing => "failing",
        }
    }

    /// Whether the peer was snubbed (for failing requests) rather than
    /// refused for something it sent.
    pub fn is_snub(self) -> bool {
        matches!(
            self,
            RefusalKind::Busy | RefusalKind::Unresponsive | RefusalKind::Failing
        )
    }
}

/// A peer refused (for a bad chunk or an index past the end) or snubbed (for
/// failing requests) for the rest of a fetch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefusedPeer {
    pub id: String,
    pub name: String,
    pub kind: RefusalKind,
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
    /// Every peer refused or snubbed for the rest of the fetch, with why.
    pub refused: Vec<RefusedPeer>,
    /// Chunks that failed their hash check (from peers or the origin).
    pub bad_chunks: u64,
    /// Peer requests that timed out or were turned down and went elsewhere.
    pub retried_requests: u64,
    /// Of those, the ones answered `Busy`.
    #[serde(default)]
    pub busy_answers: u64,
    /// Of those, the ones the peer sent nothing for in time.
    #[serde(default)]
    pub timed_out_requests: u64,
    /// Malformed or unexpected content messages from peers dropped so far (whole node).
    pub dropped_messages: u64,
    /// Bytes in the chunk cache when the fetch ended (whole node).
    #[serde(default)]
    pub cache_bytes: u64,
    /// The cache's size limit (`up --cache-size`), if any.
    #[serde(default)]
    pub cache_limit: Option<u64>,
    /// Chunks evicted from the cache to keep it under its limit, since the node started.
    #[serde(default)]
    pub evicted_chunks: u64,
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

/// The node's side of `{"op":"get"}` (the local API server calls it): progress lines every
/// [`PROGRESS_INTERVAL`], then the report (or the error). The fetch goes on if the client goes
/// away (its chunks are cached either way).
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
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
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

/// The CLI's side: sends the request to the node behind `socket` (the `GetRequest` JSON with
/// `"op":"get"` added) and calls `on_progress` for every progress line until the report
/// arrives.
pub async fn get_via_socket(
    socket: &Path,
    req: &GetRequest,
    mut on_progress: impl FnMut(&FetchProgress),
) -> Result<FetchReport, NodeError> {
    let mut conn = Connection::connect(socket).await?;
    let mut line = serde_json::to_value(req).expect("serializes");
    line["op"] = "get".into();
    conn.send(&line).await?;
    loop {
        let l: GetLine = conn.recv().await?;
        if !l.ok {
            return Err(NodeError::LocalApi(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> FetchReport {
        FetchReport {
            content: "ab".repeat(32),
            name: "f".into(),
            output: "/tmp/f".into(),
            size: 3,
            file_hash: "cd".repeat(32),
            seconds: 0.5,
            bytes_from_origin: 1,
            bytes_from_peers: 2,
            bytes_cached: 0,
            origin_share: 1.0 / 3.0,
            peers: vec![],
            refused: vec![],
            bad_chunks: 0,
            retried_requests: 0,
            busy_answers: 0,
            timed_out_requests: 0,
            dropped_messages: 0,
            cache_bytes: 0,
            cache_limit: None,
            evicted_chunks: 0,
        }
    }

    /// Both sides of `get` over a socket: the request line, progress, the report; and a
    /// node without the service answers with an error.
    #[tokio::test]
    async fn get_over_the_local_socket() {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = peermesh_node::local_api::socket_path(dir.path());
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let handle = ContentHandle { tx };
        let service = tokio::spawn(async move {
            let Some(Command::Get {
                req,
                progress,
                reply,
            }) = rx.recv().await
            else {
                panic!("no get")
            };
            assert_eq!(req.content, "ab".repeat(32));
            progress.send_replace(FetchProgress {
                size: 3,
                chunks_done: 1,
                ..Default::default()
            });
            tokio::time::sleep(PROGRESS_INTERVAL * 2).await;
            reply.send(Ok(report())).unwrap();
        });
        let server = tokio::spawn(async move {
            for with_service in [true, false] {
                let (s, _) = listener.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                tokio::io::BufReader::new(r)
                    .read_line(&mut line)
                    .await
                    .unwrap();
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["op"], "get");
                let req: GetRequest = serde_json::from_value(v).unwrap();
                let h = with_service.then_some(&handle);
                answer_get(h, req, &mut w).await.unwrap();
            }
        });
        let req = GetRequest {
            content: "ab".repeat(32),
            output: "/tmp/f".into(),
            origin: None,
        };
        let mut seen = Vec::new();
        let r = get_via_socket(&path, &req, |p| seen.push(p.clone()))
            .await
            .unwrap();
        assert_eq!(r, report());
        assert!(seen.iter().any(|p| p.chunks_done == 1), "{seen:?}");
        let e = get_via_socket(&path, &req, |_| {}).await.unwrap_err();
        assert!(
            e.to_string().contains("does not run the content service"),
            "{e}"
        );
        service.await.unwrap();
        server.await.unwrap();
    }
}
