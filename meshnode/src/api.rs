//! The local API of a running `meshnode up`: its operations, their JSON
//! shapes and a typed client. One JSON request line, answered by one or more
//! JSON lines, on the Unix socket in the node's state directory (framing in
//! `peermesh_node::local_api`). The server is [`crate::server`].
//!
//! - `{"op":"status"}` → `{"ok":true,"status":{…}}` ([`NodeStatus`]).
//! - `{"op":"send","peer":P,"messages":[…]}` → `{"ok":true,"sent":N}`.
//!
//! `send`, `recv`, `blast` and `sink` speak the messages protocol
//! (`/peermesh/message/1`), or the protocol named by `"protocol"`: any
//! protocol an application on the peer serves (to send), and the ones this
//! node serves to local programs with `meshnode up --protocol NAME` (to
//! receive).
//! - `{"op":"recv"}` → `{"ok":true}`, then one [`Received`] per message.
//! - `{"op":"blast","peer":P,"bytes":B,"size":S}` → `{"ok":true,"sent":N}`.
//! - `{"op":"sink"}` → `{"ok":true}`, then a [`SinkProgress`] every 100 ms.
//! - `{"op":"events"}` → `{"ok":true}`, then every [`Event`] the node keeps
//!   (the recent past) and each new one as it happens; with
//!   `"history_only":true`, the ones it keeps, then the end of the stream.
//! - `{"op":"get",…}`: content (`peermesh_content`); `{"op":"session",…}`:
//!   multiplayer sessions (`peermesh_session::ops`).
//!
//! Errors answer `{"ok":false,"error":"…"}`.

use std::path::Path;

use peermesh_base::event::Event;
use peermesh_base::status::NodeStatus;
use peermesh_node::local_api::Connection;
use peermesh_node::NodeError;
use serde::{Deserialize, Serialize};

type Result<T, E = NodeError> = std::result::Result<T, E>;

/// A request on the local socket.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status,
    /// Queue messages for a peer (by id or name), in order.
    Send {
        peer: String,
        messages: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<String>,
    },
    /// Stream every message from peers, one JSON line each, until the
    /// client goes away.
    Recv {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<String>,
    },
    /// Throughput test, sending side: `bytes` in messages of `size` bytes,
    /// generated inside the node.
    Blast {
        peer: String,
        bytes: u64,
        size: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<String>,
    },
    /// Throughput test, receiving side: take the inbox, discard messages and
    /// report the running totals every 100 ms.
    Sink {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<String>,
    },
    /// Stream the node's events (the recent ones first) until the client
    /// goes away, or only the recent ones.
    Events {
        #[serde(default)]
        history_only: bool,
    },
    /// Fetch a content id into a file (`meshnode get`); answered with
    /// progress lines and a report, see `peermesh_content::answer_get`.
    Get(peermesh_content::GetRequest),
    /// Multiplayer sessions: join, buttons, view, watch, leave; see
    /// `peermesh_session::ops`.
    Session(peermesh_session::ops::SessionRequest),
}

impl Request {
    /// What users with read-only access may ask: nothing that sends,
    /// receives, fetches or changes anything.
    pub fn is_read_only(&self) -> bool {
        matches!(self, Self::Status | Self::Events { .. })
    }

    /// The operation's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Send { .. } => "send",
            Self::Recv { .. } => "recv",
            Self::Blast { .. } => "blast",
            Self::Sink { .. } => "sink",
            Self::Events { .. } => "events",
            Self::Get(_) => "get",
            Self::Session(_) => "session",
        }
    }
}

/// Running totals of a `sink`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SinkProgress {
    pub messages: u64,
    pub bytes: u64,
    /// Milliseconds from the first byte to the last one counted.
    pub elapsed_ms: f64,
}

/// The answer line of most operations.
#[derive(Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Answer {
    pub fn ok() -> Self {
        Self {
            ok: true,
            status: None,
            sent: None,
            error: None,
        }
    }

    pub fn err(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(e.into()),
            ..Self::ok()
        }
    }
}

/// A message received from a peer, as `meshnode recv` prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Received {
    pub peer: String,
    pub name: String,
    pub data: String,
}

/// A typed client of the local API. It speaks the messages protocol, or
/// the one set with [`Client::on_protocol`].
pub struct Client {
    conn: Connection,
    protocol: Option<String>,
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Self> {
        Ok(Self {
            conn: Connection::connect(socket).await?,
            protocol: None,
        })
    }

    /// `send`, `recv`, `blast` and `sink` on `protocol` from now on.
    pub fn on_protocol(mut self, protocol: Option<String>) -> Self {
        self.protocol = protocol;
        self
    }

    async fn call(&mut self, req: &Request) -> Result<Answer> {
        self.conn.send(req).await?;
        let a: Answer = self.conn.recv().await?;
        match &a.error {
            Some(e) if !a.ok => Err(NodeError::LocalApi(e.clone())),
            _ => Ok(a),
        }
    }

    pub async fn status(&mut self) -> Result<NodeStatus> {
        self.call(&Request::Status)
            .await?
            .status
            .ok_or_else(|| NodeError::LocalApi("no status in answer".into()))
    }

    /// Queues `messages` for `peer` (id or name); returns how many were taken.
    pub async fn send(&mut self, peer: &str, messages: Vec<String>) -> Result<usize> {
        let a = self
            .call(&Request::Send {
                peer: peer.to_string(),
                messages,
                protocol: self.protocol.clone(),
            })
            .await?;
        Ok(a.sent.unwrap_or(0))
    }

    /// Sends `bytes` to `peer` in `size`-byte messages generated by the node.
    pub async fn blast(&mut self, peer: &str, bytes: u64, size: usize) -> Result<usize> {
        let a = self
            .call(&Request::Blast {
                peer: peer.to_string(),
                bytes,
                size,
                protocol: self.protocol.clone(),
            })
            .await?;
        Ok(a.sent.unwrap_or(0))
    }

    /// Turns this connection into a stream of [`SinkProgress`] lines.
    pub async fn sink(&mut self) -> Result<()> {
        let protocol = self.protocol.clone();
        self.call(&Request::Sink { protocol }).await.map(drop)
    }

    pub async fn next_progress(&mut self) -> Result<SinkProgress> {
        self.conn.recv().await
    }

    /// Turns this connection into a stream of received messages.
    pub async fn subscribe(&mut self) -> Result<()> {
        let protocol = self.protocol.clone();
        self.call(&Request::Recv { protocol }).await.map(drop)
    }

    pub async fn next_message(&mut self) -> Result<Received> {
        self.conn.recv().await
    }

    /// Turns this connection into a stream of the node's events.
    pub async fn events(&mut self) -> Result<()> {
        self.call(&Request::Events {
            history_only: false,
        })
        .await
        .map(drop)
    }

    pub async fn next_event(&mut self) -> Result<Event> {
        self.conn.recv().await
    }

    /// The events the node keeps (the recent past), oldest first.
    pub async fn recent_events(mut self) -> Result<Vec<Event>> {
        self.call(&Request::Events { history_only: true }).await?;
        let mut out = Vec::new();
        // The server closes the stream after the last one.
        while let Some(e) = self.conn.recv_or_end::<Event>().await? {
            out.push(e);
        }
        Ok(out)
    }
}

/// The events the node behind `socket` keeps, oldest first.
pub async fn recent_events(socket: &Path) -> Result<Vec<Event>> {
    Client::connect(socket).await?.recent_events().await
}

/// Asks the node behind `socket` for its status.
pub async fn query(socket: &Path) -> Result<NodeStatus> {
    Client::connect(socket).await?.status().await
}
