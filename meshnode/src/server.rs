//! The local API server of `meshnode up` (operations in [`crate::api`]).
//! One task per client; a client that streams (`recv`, `sink`, `events`,
//! a session `watch`) holds only its own connection.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use peermesh_base::NodeId;
use peermesh_node::endpoint::Received as EventReceived;
use peermesh_node::local_api::{write_line, MAX_REQUEST};
use peermesh_node::protocol::MAX_MESSAGE;
use peermesh_node::{Endpoint, LinkSender, NodeError, ProtocolId};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

use crate::api::{Answer, Received, Request, SinkProgress};
use crate::messages::{self, Inbox};

/// Largest message a blast may use (the mesh's own limit).
pub const MAX_BLAST_MESSAGE: usize = MAX_MESSAGE;
/// How long a refused client may take to send its request before it is
/// told no anyway.
const REFUSAL_READ: Duration = Duration::from_secs(2);
/// How often a `sink` reports its running totals.
const SINK_REPORT: Duration = Duration::from_millis(100);

/// What a local client may do, from the user it runs as (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Every operation: the node's owner, or root.
    Full,
    /// Status and events only: a user named with `up --status-uid`.
    ReadOnly,
}

/// Who may use the local API: the owner of the state directory and root
/// everything, the `--status-uid` users read-only, nobody else anything.
#[derive(Clone, Debug)]
pub struct AccessPolicy {
    owner: u32,
    status_uids: Vec<u32>,
}

impl AccessPolicy {
    pub fn new(owner: u32, status_uids: Vec<u32>) -> Self {
        Self { owner, status_uids }
    }

    pub fn of(&self, uid: u32) -> Option<Access> {
        if uid == self.owner || uid == 0 {
            Some(Access::Full)
        } else if self.status_uids.contains(&uid) {
            Some(Access::ReadOnly)
        } else {
            None
        }
    }

    /// Whether users other than the owner are let in (read-only): then the
    /// socket and its directory must be reachable by them.
    fn shared(&self) -> bool {
        !self.status_uids.is_empty()
    }
}

/// Binds the socket, refusing if a live node already holds it. The socket
/// is owner-only, unless `policy` lets other users read status: then it is
/// world-connectable and its directory traversable (not listable), and
/// SO_PEERCRED decides who gets what.
pub async fn bind(path: &Path, policy: &AccessPolicy) -> Result<UnixListener, NodeError> {
    let state = |source| NodeError::State {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(NodeError::AlreadyRunning(
                path.parent().unwrap_or(path).to_path_buf(),
            ));
        }
        // A stale socket from a node that died.
        std::fs::remove_file(path).map_err(state)?;
    }
    let listener = UnixListener::bind(path).map_err(state)?;
    use std::os::unix::fs::PermissionsExt;
    let (socket_mode, dir_mode) = if policy.shared() {
        (0o666, 0o711)
    } else {
        (0o600, 0o700)
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode)).map_err(state)?;
    if let Some(dir) = path.parent() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode)).map_err(state)?;
    }
    Ok(listener)
}

/// What the operations reach into.
#[derive(Clone)]
pub struct Ctx {
    pub endpoint: Endpoint,
    /// Messages of the messages protocol and of the protocols served with
    /// `up --protocol`, for `recv` and `sink`.
    pub inboxes: HashMap<ProtocolId, Arc<Mutex<Inbox>>>,
    /// The TUN interface's counters, read at each status request.
    pub tun: Option<Arc<peermesh_tun::TunInfo>>,
    /// The content service (`meshnode get`).
    pub content: Option<peermesh_content::ContentHandle>,
    /// The multiplayer session service.
    pub session: Option<peermesh_session::SessionHandle>,
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
pub async fn serve(listener: UnixListener, ctx: Ctx, policy: AccessPolicy) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        let policy = policy.clone();
        tokio::spawn(async move {
            let uid = match stream.peer_cred() {
                Ok(cred) => cred.uid(),
                Err(e) => {
                    tracing::warn!(error = %e, "local API client without credentials; refused");
                    return;
                }
            };
            let Some(access) = policy.of(uid) else {
                tracing::warn!(uid, "local API client of another user; refused");
                // Take its request first (bounded), so that it reads the
                // refusal instead of a broken pipe.
                let mut first = String::new();
                let mut reader = BufReader::new((&mut stream).take(MAX_REQUEST as u64));
                let _ = tokio::time::timeout(REFUSAL_READ, reader.read_line(&mut first)).await;
                let _ = write_line(
                    &mut stream,
                    &Answer::err(format!(
                        "permission denied: uid {uid} may not use this node's local API \
                         (its owner is uid {}; `meshnode up --status-uid {uid}` lets it read \
                         status)",
                        policy.owner
                    )),
                )
                .await;
                return;
            };
            if let Err(e) = answer(stream, ctx, access, uid).await {
                tracing::debug!(error = %e, "status client");
            }
        });
    }
}

/// The protocol a request names (the messages protocol by default).
fn protocol_of(name: &Option<String>) -> Result<ProtocolId, String> {
    match name {
        None => Ok(messages::protocol()),
        Some(n) => ProtocolId::new(n).map_err(|e| e.to_string()),
    }
}

/// Takes the inbox of `protocol` for a `recv` or `sink` client and tells it
/// so; None (and the client told why) while another reader holds it, or
/// when this node does not serve the protocol to local programs.
async fn attach<'a>(
    ctx: &'a Ctx,
    protocol: &Option<String>,
    w: &mut (impl AsyncWriteExt + Unpin),
) -> std::io::Result<Option<tokio::sync::MutexGuard<'a, Inbox>>> {
    let inbox = protocol_of(protocol).and_then(|p| {
        ctx.inboxes.get(&p).ok_or_else(|| {
            format!("this node does not serve {p} to local programs (meshnode up --protocol {p})")
        })
    });
    let inbox = match inbox {
        Ok(i) => i,
        Err(e) => {
            write_line(w, &Answer::err(e)).await?;
            return Ok(None);
        }
    };
    let Ok(inbox) = inbox.try_lock() else {
        write_line(w, &Answer::err("another `recv` is attached")).await?;
        return Ok(None);
    };
    write_line(w, &Answer::ok()).await?;
    Ok(Some(inbox))
}

/// The link to `peer` (by id or name) for `protocol`.
async fn link_to(ctx: &Ctx, peer: &str, protocol: &ProtocolId) -> Option<LinkSender> {
    let id = ctx.endpoint.resolve(peer)?;
    ctx.endpoint.sender(protocol.clone()).link(id).await
}

/// The name of member `id`, if listed.
fn name_of(ctx: &Ctx, id: NodeId) -> String {
    ctx.endpoint
        .status()
        .borrow()
        .peers
        .iter()
        .find(|p| p.id == id)
        .map(|p| p.name.clone())
        .unwrap_or_default()
}

async fn answer(stream: UnixStream, ctx: Ctx, access: Access, uid: u32) -> std::io::Result<()> {
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
        if access == Access::ReadOnly && !req.is_read_only() {
            write_line(
                &mut w,
                &Answer::err(format!(
                    "permission denied: `{}` is a command; uid {uid} may only read status and \
                     events (the node's owner or root may do everything)",
                    req.name()
                )),
            )
            .await?;
            continue;
        }
        match req {
            Request::Status => {
                let mut status = ctx.endpoint.status().borrow().clone();
                status.tun = ctx.tun.as_ref().map(|t| t.snapshot());
                let answer = Answer {
                    status: Some(status),
                    ..Answer::ok()
                };
                write_line(&mut w, &answer).await?;
            }
            Request::Send {
                peer,
                messages,
                protocol,
            } => {
                let protocol = match protocol_of(&protocol) {
                    Ok(p) => p,
                    Err(e) => {
                        write_line(&mut w, &Answer::err(e)).await?;
                        continue;
                    }
                };
                if ctx.endpoint.resolve(&peer).is_none() {
                    write_line(
                        &mut w,
                        &Answer::err(format!("no peer {peer:?} in this group")),
                    )
                    .await?;
                    continue;
                }
                let Some(link) = link_to(&ctx, &peer, &protocol).await else {
                    write_line(&mut w, &Answer::err(format!("no link to {peer:?}"))).await?;
                    continue;
                };
                let mut sent = 0;
                let mut error = None;
                for m in messages {
                    // Waits while the link's queue is full: backpressure
                    // reaches this client and no one else.
                    if let Err(e) = link.send(m.as_bytes()).await {
                        error = Some(e.to_string());
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
            Request::Blast {
                peer,
                bytes,
                size,
                protocol,
            } => {
                if size == 0 || size > MAX_BLAST_MESSAGE {
                    write_line(
                        &mut w,
                        &Answer::err(format!("size must be 1..={MAX_BLAST_MESSAGE}")),
                    )
                    .await?;
                    continue;
                }
                let protocol = match protocol_of(&protocol) {
                    Ok(p) => p,
                    Err(e) => {
                        write_line(&mut w, &Answer::err(e)).await?;
                        continue;
                    }
                };
                let Some(link) = link_to(&ctx, &peer, &protocol).await else {
                    write_line(&mut w, &Answer::err(format!("no link to {peer:?}"))).await?;
                    continue;
                };
                // Encoded once; each message is a slice of it.
                let payload = protocol.encode(&vec![0xa5u8; size]);
                let header = payload.len() - size;
                let mut left = bytes;
                let mut sent = 0;
                while left > 0 {
                    let n = left.min(size as u64) as usize;
                    if link
                        .send_encoded(payload.slice(..header + n))
                        .await
                        .is_err()
                    {
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
                peermesh_content::answer_get(ctx.content.as_ref(), req, &mut w).await?;
            }
            Request::Session(req) => {
                peermesh_session::ops::answer(ctx.session.as_ref(), req, &mut reader, &mut w)
                    .await?;
            }
            Request::Events { history_only: true } => {
                write_line(&mut w, &Answer::ok()).await?;
                for e in ctx.endpoint.recent_events() {
                    write_line(&mut w, &e).await?;
                }
                return Ok(());
            }
            Request::Events {
                history_only: false,
            } => {
                let mut events = ctx.endpoint.events();
                write_line(&mut w, &Answer::ok()).await?;
                loop {
                    let e = tokio::select! {
                        _ = closed(&mut reader) => return Ok(()),
                        e = events.recv() => e,
                    };
                    match e {
                        EventReceived::Event(e) => write_line(&mut w, &e).await?,
                        EventReceived::Missed(n) => {
                            tracing::debug!(missed = n, "an events client fell behind");
                        }
                        EventReceived::Closed => return Ok(()),
                    }
                }
            }
            Request::Sink { protocol } => {
                let Some(mut inbox) = attach(&ctx, &protocol, &mut w).await? else {
                    continue;
                };
                let mut totals = SinkProgress {
                    messages: 0,
                    bytes: 0,
                    elapsed_ms: 0.0,
                };
                let mut first: Option<std::time::Instant> = None;
                let mut tick = tokio::time::interval(SINK_REPORT);
                loop {
                    tokio::select! {
                        _ = closed(&mut reader) => return Ok(()),
                        m = inbox.next() => {
                            let Some(m) = m else { return Ok(()) };
                            let data = m.data;
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
            Request::Recv { protocol } => {
                let Some(mut inbox) = attach(&ctx, &protocol, &mut w).await? else {
                    continue;
                };
                loop {
                    let m = tokio::select! {
                        _ = closed(&mut reader) => return Ok(()),
                        m = inbox.next() => match m {
                            Some(m) => m,
                            None => return Ok(()),
                        },
                    };
                    let msg = Received {
                        peer: m.from.to_string(),
                        name: name_of(&ctx, m.from),
                        data: String::from_utf8_lossy(&m.data).into_owned(),
                    };
                    if let Err(e) = write_line(&mut w, &msg).await {
                        // Not delivered: the next `recv` gets it first.
                        inbox.hold(m);
                        return Err(e);
                    }
                }
            }
        }
    }
}
