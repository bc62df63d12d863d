//! What `meshnode status` shows, and the local socket it is read through.
//!
//! Protocol: one JSON request line (`{"op":"status"}`), one JSON answer line
//! (`{"ok":true,"status":{…}}` or `{"ok":false,"error":"…"}`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::error::{NodeError, Result};

/// How a peer is reached. The spellings are part of the CLI's JSON contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Connecting,
    Relay,
    Direct,
    Forwarded,
}

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Relay => "relay",
            Self::Direct => "direct",
            Self::Forwarded => "forwarded",
        }
    }

    pub fn to_proto(self) -> peermesh_proto::api::PathKind {
        use peermesh_proto::api::PathKind as P;
        match self {
            Self::Connecting => P::Connecting,
            Self::Relay => P::Relay,
            Self::Direct => P::Direct,
            Self::Forwarded => P::Forwarded,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: String,
    pub name: String,
    pub path: PathKind,
    /// Forwarding member or relay, when the path goes through one.
    pub via: Option<String>,
    pub rtt_ms: Option<f64>,
    pub loss: f64,
    /// Whether the control server sees the peer connected to it.
    pub online: bool,
    pub addresses: Vec<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlStatus {
    pub url: String,
    pub connected: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: String,
    pub name: String,
    pub group: String,
    pub addresses: Vec<String>,
    pub control: ControlStatus,
    pub map_version: u64,
    pub peers: Vec<PeerStatus>,
}

#[derive(Serialize, Deserialize)]
struct StatusRequest {
    op: String,
}

#[derive(Serialize, Deserialize)]
struct StatusAnswer {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<NodeStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Longest request line accepted on the socket.
const MAX_REQUEST: usize = 4096;

/// Binds the status socket, refusing if a live node already holds it.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(NodeError::AlreadyRunning(
                path.parent().unwrap_or(path).to_path_buf(),
            ));
        }
        // A stale socket from a node that died.
        std::fs::remove_file(path).map_err(NodeError::state(path))?;
    }
    UnixListener::bind(path).map_err(NodeError::state(path))
}

/// Answers status requests from the latest published view until dropped.
pub async fn serve(listener: UnixListener, view: watch::Receiver<NodeStatus>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let view = view.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, view).await {
                tracing::debug!(error = %e, "status client");
            }
        });
    }
}

async fn answer(stream: UnixStream, view: watch::Receiver<NodeStatus>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let n = BufReader::new(r.take(MAX_REQUEST as u64))
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<StatusRequest>(&line[..n]) {
        Ok(req) if req.op == "status" => StatusAnswer {
            ok: true,
            status: Some(view.borrow().clone()),
            error: None,
        },
        Ok(req) => StatusAnswer {
            ok: false,
            status: None,
            error: Some(format!("unknown op {:?}", req.op)),
        },
        Err(e) => StatusAnswer {
            ok: false,
            status: None,
            error: Some(format!("malformed request: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&answer).expect("answers serialize");
    out.push(b'\n');
    w.write_all(&out).await
}

/// Asks the node running on `state_dir` for its status.
pub async fn query(socket: &Path) -> Result<NodeStatus> {
    let err = |e: std::io::Error| {
        NodeError::Status(format!(
            "cannot reach the node at {} ({e}); is `meshnode up` running with this --state?",
            socket.display()
        ))
    };
    let stream = UnixStream::connect(socket).await.map_err(err)?;
    let (r, mut w) = stream.into_split();
    w.write_all(b"{\"op\":\"status\"}\n").await.map_err(err)?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await.map_err(err)?;
    let answer: StatusAnswer = serde_json::from_str(&line)
        .map_err(|e| NodeError::Status(format!("malformed answer from the node: {e}")))?;
    match (answer.ok, answer.status) {
        (true, Some(s)) => Ok(s),
        _ => Err(NodeError::Status(
            answer.error.unwrap_or_else(|| "no status in answer".into()),
        )),
    }
}
