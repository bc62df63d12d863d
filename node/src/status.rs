//! What `meshnode status` shows, and the local socket it is read through.
//!
//! Protocol: one JSON request line (`{"op":"status"}`), one JSON answer line
//! (`{"ok":true,"status":{…}}` or `{"ok":false,"error":"…"}`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use bytes::Bytes;
use libp2p::PeerId;
use tokio::sync::{mpsc, watch, Mutex};

use crate::error::{NodeError, Result};
use crate::mesh::channel::{self, Channel};
use crate::mesh::MeshCommand;

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
    /// Mesh (TUN) addresses the control server assigned to the peer.
    #[serde(default)]
    pub mesh_ipv4: Option<String>,
    #[serde(default)]
    pub mesh_ipv6: Option<String>,
    /// Hole punching towards this peer over the link's life.
    #[serde(default)]
    pub punch: PunchStats,
}

/// What the hole puncher did for one link, for status and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PunchStats {
    /// Rendezvous through the control server that punched from the mesh's
    /// own QUIC socket (the fast path for cone NATs).
    pub quic_attempts: u32,
    /// Attempts from separate probe sockets (low-TTL opening packets, port
    /// prediction, birthday search), whose winning socket is handed to QUIC.
    pub probe_attempts: u32,
    /// UDP datagrams the probe sockets sent, over all attempts: opening
    /// packets, probes (birthday ones included) and acks.
    pub probe_packets: u64,
    pub birthday_probes: u64,
    /// Sockets opened for the last probe attempt (more than 1 on the random
    /// symmetric side of a birthday search).
    pub sockets: u32,
    /// How the last attempt ended: "direct", "failed: …", or empty.
    pub last: String,
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
    /// This node's mesh (TUN) addresses, from the control server.
    #[serde(default)]
    pub mesh_ipv4: Option<String>,
    #[serde(default)]
    pub mesh_ipv6: Option<String>,
    /// The virtual interface, when the node runs one (`up --tun`).
    #[serde(default)]
    pub tun: Option<crate::tun::TunStatus>,
    /// This node's NAT, once discovery against the control server's STUN
    /// endpoints has run (seed 003).
    #[serde(default)]
    pub nat: Option<crate::nat_discovery::NatBehavior>,
}

/// A request on the local socket.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status,
    /// Queue messages for a peer (by id or name), in order.
    Send {
        peer: String,
        messages: Vec<String>,
    },
    /// Stream every message from peers, one JSON line each, until the
    /// client goes away.
    Recv,
    /// Throughput test, sending side: `bytes` in messages of `size` bytes,
    /// generated inside the node.
    Blast {
        peer: String,
        bytes: u64,
        size: usize,
    },
    /// Throughput test, receiving side: take the inbox, discard messages and
    /// report the running totals every 100 ms.
    Sink,
    /// Fetch a content id into a file (`meshnode get`); answered with
    /// progress lines and a report, see [`crate::content::answer_get`].
    Get(crate::content::GetRequest),
    /// Multiplayer sessions: join, buttons, view, watch, leave; see
    /// [`crate::session::ops`].
    Session(crate::session::ops::SessionRequest),
}

/// Running totals of a `sink`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SinkProgress {
    pub messages: u64,
    pub bytes: u64,
    /// Milliseconds from the first byte to the last one counted.
    pub elapsed_ms: f64,
}

/// Largest message a blast may use (the path switch's own limit).
pub const MAX_BLAST_MESSAGE: usize = channel::MAX_MESSAGE;

#[derive(Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<NodeStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sent: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Answer {
    fn err(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            status: None,
            sent: None,
            error: Some(e.into()),
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

/// Longest request line accepted on the socket (a batch of messages).
const MAX_REQUEST: usize = 4 << 20;

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

/// What the socket's handlers reach into.
#[derive(Clone)]
pub struct Ctx {
    pub view: watch::Receiver<NodeStatus>,
    pub mesh: mpsc::Sender<MeshCommand>,
    pub inbox: Arc<Mutex<Inbox>>,
    /// The TUN interface's counters, read at each status request.
    pub tun: Option<Arc<crate::tun::TunInfo>>,
    /// The content service (`meshnode get`).
    pub content: Option<crate::content::ContentHandle>,
    /// The multiplayer session service.
    pub session: Option<crate::session::SessionHandle>,
}

/// Messages from peers waiting for a `recv` client. A message taken for a
/// client that turned out to be gone is held and handed to the next one.
pub struct Inbox {
    rx: mpsc::Receiver<(PeerId, Bytes)>,
    held: Option<(PeerId, Bytes)>,
}

impl Inbox {
    pub fn new(rx: mpsc::Receiver<(PeerId, Bytes)>) -> Self {
        Self { rx, held: None }
    }

    /// Cancel-safe: a held message is returned without waiting.
    async fn next(&mut self) -> Option<(PeerId, Bytes)> {
        match self.held.take() {
            Some(m) => Some(m),
            None => self.rx.recv().await,
        }
    }
}

/// Resolves when the client closes its side of the socket (it sends
/// nothing after `recv`/`sink`), so a dead client releases the inbox at once.
async fn closed(reader: &mut (impl AsyncBufReadExt + Unpin)) {
    let mut buf = String::new();
    loop {
        match reader.read_line(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => buf.clear(),
        }
    }
}

/// Answers requests until dropped.
pub async fn serve(listener: UnixListener, ctx: Ctx) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, ctx).await {
                tracing::debug!(error = %e, "status client");
            }
        });
    }
}

/// Takes the inbox for a `recv` or `sink` client and tells it so; None (and
/// the client told why) while another reader holds it.
async fn attach<'a>(
    ctx: &'a Ctx,
    w: &mut (impl AsyncWriteExt + Unpin),
) -> std::io::Result<Option<tokio::sync::MutexGuard<'a, Inbox>>> {
    let Ok(inbox) = ctx.inbox.try_lock() else {
        write_line(w, &Answer::err("another `recv` is attached")).await?;
        return Ok(None);
    };
    let ok = Answer {
        ok: true,
        status: None,
        sent: None,
        error: None,
    };
    write_line(w, &ok).await?;
    Ok(Some(inbox))
}

/// The sending side of the link to `peer`, from the mesh.
async fn link_sender(ctx: &Ctx, peer: PeerId) -> Option<mpsc::Sender<Bytes>> {
    crate::mesh::MeshClient {
        commands: ctx.mesh.clone(),
        status: ctx.view.clone(),
    }
    .link_sender(peer)
    .await
}

fn resolve(view: &NodeStatus, peer: &str) -> Option<PeerId> {
    view.peers
        .iter()
        .find(|p| p.id == peer || p.name == peer)
        .and_then(|p| p.id.parse().ok())
}

/// One JSON line on the node's socket (requests and answers of every service).
pub(crate) async fn write_line<T: Serialize>(
    w: &mut (impl AsyncWriteExt + Unpin),
    v: &T,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(v).expect("lines serialize");
    out.push(b'\n');
    w.write_all(&out).await
}

async fn answer(stream: UnixStream, ctx: Ctx) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r.take(MAX_REQUEST as u64));
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let req = match serde_json::from_str::<Request>(&line) {
            Ok(r) => r,
            Err(e) => {
                write_line(&mut w, &Answer::err(format!("malformed request: {e}"))).await?;
                continue;
            }
        };
        match req {
            Request::Status => {
                let mut status = ctx.view.borrow().clone();
                status.tun = ctx.tun.as_ref().map(|t| t.snapshot());
                write_line(
                    &mut w,
                    &Answer {
                        ok: true,
                        status: Some(status),
                        sent: None,
                        error: None,
                    },
                )
                .await?;
            }
            Request::Send { peer, messages } => {
                let Some(id) = resolve(&ctx.view.borrow(), &peer) else {
                    write_line(
                        &mut w,
                        &Answer::err(format!("no peer {peer:?} in this group")),
                    )
                    .await?;
                    continue;
                };
                let Some(link) = link_sender(&ctx, id).await else {
                    write_line(&mut w, &Answer::err(format!("no link to {peer:?}"))).await?;
                    continue;
                };
                let mut sent = 0;
                let mut error = None;
                for m in messages {
                    // Waits while the link's queue is full: backpressure
                    // reaches this client and no one else.
                    if link
                        .send(channel::tag(Channel::Message, m.as_bytes()))
                        .await
                        .is_err()
                    {
                        error = Some("the link to this peer stopped".to_string());
                        break;
                    }
                    sent += 1;
                }
                write_line(
                    &mut w,
                    &Answer {
                        ok: error.is_none(),
                        status: None,
                        sent: Some(sent),
                        error,
                    },
                )
                .await?;
            }
            Request::Blast { peer, bytes, size } => {
                if size == 0 || size > MAX_BLAST_MESSAGE {
                    write_line(
                        &mut w,
                        &Answer::err(format!("size must be 1..={MAX_BLAST_MESSAGE}")),
                    )
                    .await?;
                    continue;
                }
                let id = resolve(&ctx.view.borrow(), &peer);
                let link = match id {
                    Some(id) => link_sender(&ctx, id).await,
                    None => None,
                };
                let Some(link) = link else {
                    write_line(&mut w, &Answer::err(format!("no link to {peer:?}"))).await?;
                    continue;
                };
                let payload = channel::tag(Channel::Message, &vec![0xa5u8; size]);
                let mut left = bytes;
                let mut sent = 0;
                while left > 0 {
                    let n = left.min(size as u64) as usize;
                    if link.send(payload.slice(..n + 1)).await.is_err() {
                        break;
                    }
                    left -= n as u64;
                    sent += 1;
                }
                write_line(
                    &mut w,
                    &Answer {
                        ok: left == 0,
                        status: None,
                        sent: Some(sent),
                        error: (left > 0).then(|| "the link to this peer stopped".into()),
                    },
                )
                .await?;
            }
            Request::Get(req) => {
                crate::content::answer_get(ctx.content.as_ref(), req, &mut w).await?;
            }
            Request::Session(req) => {
                crate::session::ops::answer(ctx.session.as_ref(), req, &mut reader, &mut w).await?;
            }
            Request::Sink => {
                let Some(mut inbox) = attach(&ctx, &mut w).await? else {
                    continue;
                };
                let mut totals = SinkProgress {
                    messages: 0,
                    bytes: 0,
                    elapsed_ms: 0.0,
                };
                let mut first: Option<std::time::Instant> = None;
                let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
                loop {
                    tokio::select! {
                        _ = closed(&mut reader) => return Ok(()),
                        m = inbox.next() => {
                            let Some((_, data)) = m else { return Ok(()) };
                            let now = std::time::Instant::now();
                            let start = *first.get_or_insert(now);
                            totals.messages += 1;
                            totals.bytes += data.len() as u64;
                            totals.elapsed_ms = now.duration_since(start).as_secs_f64() * 1e3;
                        }
                        _ = tick.tick() => write_line(&mut w, &totals).await?,
                    }
                }
            }
            Request::Recv => {
                let Some(mut inbox) = attach(&ctx, &mut w).await? else {
                    continue;
                };
                loop {
                    let (peer, data) = tokio::select! {
                        _ = closed(&mut reader) => return Ok(()),
                        m = inbox.next() => match m {
                            Some(m) => m,
                            None => return Ok(()),
                        },
                    };
                    let id = peer.to_string();
                    let name = ctx
                        .view
                        .borrow()
                        .peers
                        .iter()
                        .find(|p| p.id == id)
                        .map(|p| p.name.clone())
                        .unwrap_or_default();
                    let msg = Received {
                        peer: id,
                        name,
                        data: String::from_utf8_lossy(&data).into_owned(),
                    };
                    if let Err(e) = write_line(&mut w, &msg).await {
                        // Not delivered: the next `recv` gets it first.
                        inbox.held = Some((peer, data));
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// A connection to a running node's socket.
pub struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    socket: std::path::PathBuf,
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            NodeError::Status(format!(
                "cannot reach the node at {} ({e}); is `meshnode up` running with this --state?",
                socket.display()
            ))
        })?;
        let (r, w) = stream.into_split();
        Ok(Self {
            reader: BufReader::new(r),
            writer: w,
            socket: socket.to_path_buf(),
        })
    }

    fn io(&self, e: std::io::Error) -> NodeError {
        NodeError::Status(format!("node socket {}: {e}", self.socket.display()))
    }

    /// Sends one request line of any shape: services (content, sessions)
    /// answer in their own shape, read with [`Self::read_line`].
    pub(crate) async fn write_request<T: Serialize>(&mut self, req: &T) -> Result<()> {
        write_line(&mut self.writer, req)
            .await
            .map_err(|e| self.io(e))
    }

    /// The next answer line.
    pub(crate) async fn read_line<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(NodeError::Status("the node closed the connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| NodeError::Status(format!("malformed answer from the node: {e}")))
    }

    async fn call(&mut self, req: &Request) -> Result<Answer> {
        self.write_request(req).await?;
        let a: Answer = self.read_line().await?;
        match &a.error {
            Some(e) if !a.ok => Err(NodeError::Status(e.clone())),
            _ => Ok(a),
        }
    }

    pub async fn status(&mut self) -> Result<NodeStatus> {
        self.call(&Request::Status)
            .await?
            .status
            .ok_or_else(|| NodeError::Status("no status in answer".into()))
    }

    /// Queues `messages` for `peer` (id or name); returns how many were taken.
    pub async fn send(&mut self, peer: &str, messages: Vec<String>) -> Result<usize> {
        let a = self
            .call(&Request::Send {
                peer: peer.to_string(),
                messages,
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
            })
            .await?;
        Ok(a.sent.unwrap_or(0))
    }

    /// Turns this connection into a stream of [`SinkProgress`] lines.
    pub async fn sink(&mut self) -> Result<()> {
        self.call(&Request::Sink).await.map(drop)
    }

    pub async fn next_progress(&mut self) -> Result<SinkProgress> {
        self.read_line().await
    }

    /// Turns this connection into a stream of received messages.
    pub async fn subscribe(&mut self) -> Result<()> {
        self.call(&Request::Recv).await.map(drop)
    }

    pub async fn next_message(&mut self) -> Result<Received> {
        self.read_line().await
    }
}

/// Asks the node behind `socket` for its status.
pub async fn query(socket: &Path) -> Result<NodeStatus> {
    Client::connect(socket).await?.status().await
}
