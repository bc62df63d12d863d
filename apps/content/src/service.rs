//! The content actor: one task that owns the cache index, the manifests and the
//! [`Scheduler`] (which makes every fetch decision, see [`crate::scheduler`]);
//! one sender task per peer that puts messages and served chunks on that
//! peer's link (so a slow peer holds up only its own task); short tasks for
//! disk and origin I/O that report back on a bounded event queue.
//!
//! The actor does the I/O around the scheduler: it decodes peers' messages
//! and hands them over, carries out the scheduler's actions (requests, claims,
//! haves, origin GETs, cache writes, assembling the file), keeps the bitfield
//! exchange going (a fetch sends this node's bitfield to every member; a peer
//! that knows the content answers with its own, once per peer and content),
//! serves chunks to peers (at most [`MAX_SERVING_PER_PEER`] at once per peer,
//! more are answered `Busy`), and reports progress and the outcome to `get`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use peermesh_base::status::NodeStatus;
use peermesh_base::NodeId;
use peermesh_node::{Endpoint, Incoming, LinkSender, ProtocolHandler, ProtocolSender};
use tokio::sync::{mpsc, oneshot, watch};

use crate::manifest::{parse_hash, Hash32, Published};
use crate::origin::Origin;
use crate::scheduler::{Action, FetchStats, Handled, Scheduler};
use crate::store::{Read, Store, StorePaths};
use crate::wire::{self, Bits, Msg, RejectReason};
use crate::{
    protocol, Command, ContentError, ContentHandle, FetchProgress, FetchReport, GetRequest,
    PeerBytes, RefusedPeer, CORRUPT_ENV,
};

/// Chunks one peer may have this node serving at once; more are answered `Busy`.
pub const MAX_SERVING_PER_PEER: usize = 16;
/// How often the actor looks at the clock: request timeouts, stalled fetches, members that
/// came or went, bitfields still owed, progress. A tenth of a second is fine-grained next to
/// every timeout it checks (the shortest, [`crate::scheduler::ORIGIN_GRACE`], is 300 ms) and
/// costs nothing when idle.
pub const TICK: Duration = Duration::from_millis(100);
/// Messages and events handled at most between two scheduling passes.
const BATCH: usize = 256;
/// Queue to one peer's sender task.
const PEER_QUEUE: usize = 1024;
/// `get`s waiting for the actor.
const COMMAND_QUEUE: usize = 16;
/// Results of the helper tasks waiting for the actor.
const EVENT_QUEUE: usize = 1024;
/// How long a peer's sender waits between two looks for the peer's link: the map may list a
/// peer a moment before its link exists.
const LINK_WAIT: Duration = Duration::from_millis(200);
/// Looks for the link before a message is dropped: [`LINK_WAIT`] × 10 = two seconds, the time
/// a new member's link takes to appear (a message dropped after that is sent again: bitfields
/// on the next tick, requests after their timeout).
const LINK_WAIT_TRIES: u32 = 10;
/// Data messages of served chunks allowed in the link's queue at once: control messages
/// (haves, claims, requests) queued behind more would arrive late and make peers fetch from
/// the origin what this node is about to have.
const LINK_DEPTH: usize = 8;
/// How soon a peer's sender looks again at a link whose queue is deeper than [`LINK_DEPTH`]:
/// a 64 KiB piece leaves a fast link in well under a millisecond, so a longer wait would
/// leave it idle.
const LINK_DRAIN_POLL: Duration = Duration::from_millis(1);

#[derive(Clone, Debug, Default)]
pub struct ContentConfig {
    /// The origin's URL for fetches that name none (`up --origin`).
    pub origin: Option<String>,
    /// The chunk cache's size limit in bytes (`up --cache-size`); `None`: no limit. See
    /// [`crate::store`] for the eviction.
    pub cache_size: Option<u64>,
    /// The [`CORRUPT_ENV`] test hook: every chunk served to peers has a byte flipped.
    pub corrupt_chunks: bool,
}

impl ContentConfig {
    /// `origin`, no cache limit, and the test hook from the environment
    /// ([`CORRUPT_ENV`]`=1`), read here, once, when the node starts.
    pub fn new(origin: Option<String>) -> Self {
        Self {
            origin,
            cache_size: None,
            corrupt_chunks: std::env::var(CORRUPT_ENV).is_ok_and(|v| v == "1"),
        }
    }

    /// With a cache size limit in bytes.
    pub fn with_cache_size(mut self, limit: Option<u64>) -> Self {
        self.cache_size = limit;
        self
    }
}

/// Opens the cache under the endpoint's state directory (`STATE/content/`) and prepares the
/// service. The handle answers `get`s once the handler runs: register it with
/// `Router::builder(endpoint).accept(peermesh_content::protocol(), handler)`.
pub async fn spawn(
    config: ContentConfig,
    endpoint: Endpoint,
) -> Result<(ContentHandle, ContentHandler), ContentError> {
    let default_origin = config.origin.as_deref().map(Origin::new).transpose()?;
    let dir = endpoint.state_dir().to_path_buf();
    let limit = config.cache_size;
    let (store, manifests, opened) = tokio::task::spawn_blocking(move || Store::open(&dir, limit))
        .await
        .map_err(|e| ContentError::Fetch(format!("opening the cache: {e}")))??;
    if !opened.damaged.is_empty() || opened.temporaries > 0 {
        tracing::warn!(
            damaged = opened.damaged.len(),
            unfinished = opened.temporaries,
            "the chunk cache had damaged chunks or unfinished writes (a crash?); removed, they will be fetched again"
        );
    }
    if config.corrupt_chunks {
        tracing::warn!("TEST HOOK {CORRUPT_ENV}: this node corrupts every chunk it serves");
    }
    let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, events) = mpsc::channel(EVENT_QUEUE);
    let service = Service {
        status: endpoint.status(),
        sender: endpoint.sender(protocol()),
        paths: store.paths(),
        store,
        manifests: manifests
            .into_iter()
            .map(|m| (*m.id(), Arc::new(m)))
            .collect(),
        peers: HashMap::new(),
        sched: Scheduler::new(endpoint.node_id(), rand::random()),
        fetches: HashMap::new(),
        events: ev_tx,
        default_origin,
        corrupt: config.corrupt_chunks,
        dropped: 0,
    };
    Ok((
        ContentHandle { tx },
        ContentHandler {
            service,
            commands,
            events,
        },
    ))
}

/// Runs the content service on the router's [`Incoming`] for [`crate::PROTOCOL`], until the
/// endpoint stops.
pub struct ContentHandler {
    service: Service,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Receiver<Event>,
}

impl ProtocolHandler for ContentHandler {
    async fn serve(self, incoming: Incoming) {
        self.service.run(self.commands, incoming, self.events).await
    }
}

struct ManifestReady {
    req: GetRequest,
    origin: Option<Origin>,
    manifest: Result<Arc<Published>, String>,
    progress: watch::Sender<FetchProgress>,
    reply: oneshot::Sender<Result<FetchReport, String>>,
}

/// What the helper tasks report.
enum Event {
    /// A manifest was resolved for a `get`.
    Manifest(Box<ManifestReady>),
    /// A checked chunk reached the disk (or failed to).
    Stored { hash: Hash32, len: u64, ok: bool },
    /// A chunk read from the cache did not match its hash; its file is removed.
    Damaged { hash: Hash32 },
    OriginChunk {
        content: Hash32,
        index: u32,
        data: Result<Bytes, String>,
    },
    /// A peer's sender task finished serving one chunk.
    Served { peer: NodeId },
    Assembled {
        content: Hash32,
        result: Result<String, AssembleError>,
    },
}

/// A chunk to serve: request id and hash.
type Serve = (u32, Hash32);

struct PeerState {
    /// Control messages (bitfields, haves, claims, requests, rejects) for the peer's
    /// sender task; they overtake served chunks.
    ctl: mpsc::Sender<Bytes>,
    serve: mpsc::Sender<Serve>,
    serving: usize,
    sent_bitfield: HashSet<Hash32>,
    /// Listed in the node's status at some point (a peer that never was is not dropped
    /// for being absent: its first messages can come before the map lists it).
    member_seen: bool,
}

/// The I/O side of one fetch (its decisions are the scheduler's).
struct FetchIo {
    manifest: Arc<Published>,
    origin: Option<Origin>,
    output: PathBuf,
    progress: watch::Sender<FetchProgress>,
    reply: oneshot::Sender<Result<FetchReport, String>>,
}

struct Service {
    status: watch::Receiver<NodeStatus>,
    sender: ProtocolSender,
    store: Store,
    paths: StorePaths,
    manifests: HashMap<Hash32, Arc<Published>>,
    peers: HashMap<NodeId, PeerState>,
    sched: Scheduler,
    fetches: HashMap<Hash32, FetchIo>,
    events: mpsc::Sender<Event>,
    default_origin: Option<Origin>,
    corrupt: bool,
    /// Malformed or unexpected messages from peers, dropped.
    dropped: u64,
}

impl Service {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut incoming: Incoming,
        mut events: mpsc::Receiver<Event>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut dirty = tokio::select! {
                c = commands.recv() => match c {
                    Some(Command::Get { req, progress, reply }) => { self.on_get(req, progress, reply); false }
                    None => return,
                },
                m = incoming.recv() => match m {
                    Some(m) => self.on_message(m.from, m.data),
                    None => return,
                },
                e = events.recv() => match e {
                    Some(e) => self.on_event(e),
                    None => return,
                },
                _ = tick.tick() => { self.on_tick(); true }
            };
            // Take what else is queued already before scheduling once for all of it:
            // with N peers each sending `Have`s, scheduling per message costs O(N) per
            // message on every node.
            for _ in 0..BATCH {
                let more = match incoming.try_recv() {
                    Some(m) => self.on_message(m.from, m.data),
                    None => match events.try_recv() {
                        Ok(e) => self.on_event(e),
                        Err(_) => break,
                    },
                };
                dirty |= more;
            }
            if dirty {
                let alone = self.status.borrow().peers.is_empty();
                self.sched.schedule(Instant::now(), alone);
                self.perform();
            }
        }
    }

    /// Carries out what the scheduler decided.
    fn perform(&mut self) {
        while let Some(action) = self.sched.poll_action() {
            match action {
                Action::Send { peer, msg } => {
                    self.send(peer, &msg);
                }
                Action::Request { peer, req, hash } => {
                    if !self.send(peer, &Msg::Request { req, hash }) {
                        self.sched.unsent(req);
                    }
                }
                Action::FetchOrigin {
                    content,
                    index,
                    hash,
                } => {
                    let Some(origin) = self.fetches.get(&content).and_then(|f| f.origin.clone())
                    else {
                        continue;
                    };
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        let data = origin.chunk(&hash).await.map_err(|e| e.to_string());
                        let _ = events
                            .send(Event::OriginChunk {
                                content,
                                index,
                                data,
                            })
                            .await;
                    });
                }
                Action::Store { hash, data } => self.store_chunk(hash, data),
                Action::Assemble { content } => self.assemble(content),
                Action::Refused {
                    peer,
                    content,
                    kind,
                    reason,
                } => {
                    let name = self.peer_name(&peer);
                    tracing::warn!(%peer, %name, content = %hex::encode(content), kind = kind.as_str(),
                        %reason, "refusing a peer for the rest of this fetch");
                }
                Action::Failed { content, reason } => {
                    if let Some(f) = self.fetches.remove(&content) {
                        let _ = f.reply.send(Err(reason));
                    }
                }
            }
        }
    }

    // ----- peers -----

    fn peer(&mut self, id: NodeId) -> &mut PeerState {
        let (sender, paths, events, corrupt) = (
            self.sender.clone(),
            self.paths.clone(),
            self.events.clone(),
            self.corrupt,
        );
        self.peers.entry(id).or_insert_with(|| {
            let (ctl, ctl_rx) = mpsc::channel(PEER_QUEUE);
            let (serve, serve_rx) = mpsc::channel(MAX_SERVING_PER_PEER);
            tokio::spawn(peer_sender(
                id, sender, ctl_rx, serve_rx, paths, events, corrupt,
            ));
            PeerState {
                ctl,
                serve,
                serving: 0,
                sent_bitfield: HashSet::new(),
                member_seen: false,
            }
        })
    }

    /// Queues `msg` for `peer`; false if its queue is full (the message is dropped).
    fn send(&mut self, peer: NodeId, msg: &Msg) -> bool {
        let ok = self.peer(peer).ctl.try_send(msg.encode()).is_ok();
        if !ok {
            tracing::debug!(%peer, "content queue to peer full; message dropped");
        }
        ok
    }

    /// Members listed in the node's status.
    fn members(&self) -> Vec<NodeId> {
        self.status.borrow().peers.iter().map(|p| p.id).collect()
    }

    fn peer_name(&self, id: &NodeId) -> String {
        self.status
            .borrow()
            .peers
            .iter()
            .find(|p| p.id == *id)
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    /// This node's bitfield for `content`: the fetch's, or what the cache holds.
    fn my_bits(&self, content: &Hash32) -> Option<Bits> {
        if let Some(b) = self.sched.have(content) {
            return Some(b.clone());
        }
        let m = self.manifests.get(content)?;
        let mut b = Bits::new(m.count());
        for (i, h) in m.chunks.iter().enumerate() {
            if self.store.has(h) {
                b.set(i as u32);
            }
        }
        Some(b)
    }

    fn send_bitfield(&mut self, peer: NodeId, content: Hash32) {
        let Some(bits) = self.my_bits(&content) else {
            return;
        };
        if self.send(peer, &bits.to_msg(content)) {
            self.peer(peer).sent_bitfield.insert(content);
        }
        // Chunks this node is getting from the origin right now.
        for index in self.sched.origin_claims(&content) {
            self.send(peer, &Msg::Claim { content, index });
        }
    }

    // ----- inbound -----

    fn drop_msg(&mut self, peer: NodeId, why: &str) {
        self.dropped += 1;
        tracing::debug!(%peer, why, dropped = self.dropped, "content message dropped");
    }

    fn handled(&mut self, peer: NodeId, h: Handled) -> bool {
        if let Some(why) = h.dropped {
            self.drop_msg(peer, why);
        }
        self.perform();
        h.reschedule
    }

    fn on_message(&mut self, peer: NodeId, raw: Bytes) -> bool {
        let Some(msg) = wire::decode(&raw) else {
            self.drop_msg(peer, "malformed");
            return false;
        };
        let now = Instant::now();
        match msg {
            Msg::Bitfield {
                content,
                chunks,
                bits,
            } => {
                let Some(count) = self.manifests.get(&content).map(|m| m.count()) else {
                    // A content this node never fetched; it learns the peer's bits
                    // when it starts that fetch and asks.
                    return false;
                };
                let Some(b) = Bits::from_wire(chunks, &bits) else {
                    self.drop_msg(peer, "malformed bitfield");
                    return false;
                };
                self.peer(peer);
                let h = self.sched.peer_bitfield(now, peer, content, count, b);
                // Answer the first bitfield of a peer for this content even if ours went
                // out before: it may have come while the peer did not know the content yet.
                if h.dropped.is_none()
                    && (h.first_bitfield || !self.peer(peer).sent_bitfield.contains(&content))
                {
                    self.send_bitfield(peer, content);
                }
                self.handled(peer, h)
            }
            Msg::Have { content, index } | Msg::Claim { content, index } => {
                let Some(count) = self.manifests.get(&content).map(|m| m.count()) else {
                    return false;
                };
                self.peer(peer);
                let h = if matches!(msg, Msg::Have { .. }) {
                    self.sched.peer_have(now, peer, content, count, index)
                } else {
                    self.sched.peer_claim(now, peer, content, count, index)
                };
                self.handled(peer, h)
            }
            Msg::Request { req, hash } => {
                let has = self.store.has(&hash);
                if has {
                    self.store.touch(&hash);
                }
                let p = self.peer(peer);
                let reason = if !has {
                    Some(RejectReason::NotHere)
                } else if p.serving >= MAX_SERVING_PER_PEER
                    || p.serve.try_send((req, hash)).is_err()
                {
                    Some(RejectReason::Busy)
                } else {
                    p.serving += 1;
                    None
                };
                if let Some(reason) = reason {
                    self.send(peer, &Msg::Reject { req, reason });
                }
                false
            }
            Msg::Reject { req, reason } => {
                let h = self
                    .sched
                    .peer_reject(now, peer, req, reason == RejectReason::NotHere);
                self.handled(peer, h)
            }
            Msg::Data {
                req,
                offset,
                total,
                bytes,
            } => {
                let h = self.sched.peer_data(now, peer, req, offset, total, bytes);
                self.handled(peer, h)
            }
        }
    }

    fn store_chunk(&mut self, hash: Hash32, data: Bytes) {
        let (paths, events) = (self.paths.clone(), self.events.clone());
        tokio::spawn(async move {
            let len = data.len() as u64;
            let ok = match paths.write(&hash, data).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "writing a chunk to the cache");
                    false
                }
            };
            let _ = events.send(Event::Stored { hash, len, ok }).await;
        });
    }

    /// Keeps the cache under its limit: removes the least recently used chunks that no fetch
    /// in progress needs (see [`crate::store`]). The files go at once, here, so that no later
    /// write of the same chunk can race their removal.
    fn evict(&mut self) {
        if self.store.limit().is_none_or(|l| self.store.bytes() <= l) {
            return;
        }
        let pinned: HashSet<Hash32> = self
            .fetches
            .values()
            .flat_map(|f| f.manifest.chunks.iter().copied())
            .collect();
        let victims = self.store.evict(|h| pinned.contains(h));
        if victims.is_empty() {
            return;
        }
        for h in &victims {
            if let Err(e) = self.paths.remove(h) {
                tracing::warn!(error = %e, "removing an evicted chunk");
            }
        }
        tracing::debug!(evicted = victims.len(), bytes = self.store.bytes(), limit = ?self.store.limit(), "cache eviction");
    }

    /// A chunk in the cache turned out damaged (its file is gone): forget it; a fetch that
    /// counted on it fetches it again.
    fn damaged(&mut self, hash: Hash32) -> bool {
        self.store.forget(&hash);
        let _ = self.paths.remove(&hash);
        self.sched.lost(Instant::now(), hash)
    }

    // ----- events -----

    fn on_event(&mut self, e: Event) -> bool {
        match e {
            Event::Manifest(ready) => {
                let ManifestReady {
                    req,
                    origin,
                    manifest,
                    progress,
                    reply,
                } = *ready;
                match manifest {
                    Ok(m) => self.start_fetch(m, origin, req.output, progress, reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
                true
            }
            Event::Stored { hash, len, ok } => {
                if ok {
                    self.store.insert(hash, len);
                }
                self.sched.stored(Instant::now(), hash, ok);
                self.perform();
                self.evict();
                self.publish_all();
                true
            }
            Event::Damaged { hash } => self.damaged(hash),
            Event::OriginChunk {
                content,
                index,
                data,
            } => {
                let known = self.sched.origin_chunk(content, index, data);
                self.perform();
                known
            }
            Event::Served { peer } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.serving = p.serving.saturating_sub(1);
                }
                false
            }
            Event::Assembled {
                content,
                result: Err(AssembleError::Damaged(lost)),
            } => {
                // Chunks that went bad in the cache: fetched again, then assembled again.
                tracing::warn!(content = %hex::encode(content), chunks = lost.len(),
                    "chunks in the cache were damaged; fetching them again");
                let mut again = false;
                for h in lost {
                    again |= self.damaged(h);
                }
                if !again {
                    self.finish(content, Err("the cache lost chunks of the file".into()));
                }
                true
            }
            Event::Assembled {
                content,
                result: Err(AssembleError::Failed(e)),
            } => {
                self.finish(content, Err(e));
                false
            }
            Event::Assembled {
                content,
                result: Ok(file_hash),
            } => {
                self.finish(content, Ok(file_hash));
                false
            }
        }
    }

    /// The fetch of `content` is over: its report (or error) goes to its `get`, and the cache
    /// may let go of its chunks.
    fn finish(&mut self, content: Hash32, result: Result<String, String>) {
        let stats = self.sched.finish(&content);
        if let (Some(f), Some(stats)) = (self.fetches.remove(&content), stats) {
            self.evict();
            let report = result.map(|file_hash| self.report(&f, &stats, file_hash));
            if let Ok(r) = &report {
                tracing::info!(content = %r.content, seconds = r.seconds,
                    from_origin = r.bytes_from_origin, from_peers = r.bytes_from_peers,
                    refused = r.refused.len(), cache_bytes = r.cache_bytes, "fetch done");
            }
            let _ = f.reply.send(report);
        }
    }

    fn assemble(&mut self, content: Hash32) {
        let Some(f) = self.fetches.get(&content) else {
            return;
        };
        let (m, out, paths, events) = (
            f.manifest.clone(),
            f.output.clone(),
            self.paths.clone(),
            self.events.clone(),
        );
        tokio::spawn(async move {
            let result = write_output(&m, &out, &paths).await;
            let _ = events.send(Event::Assembled { content, result }).await;
        });
    }

    fn report(&self, f: &FetchIo, st: &FetchStats, file_hash: String) -> FetchReport {
        let from_peers: u64 = st.from_peers.values().map(|d| d.bytes).sum();
        let moved = from_peers + st.from_origin;
        let mut peers: Vec<PeerBytes> = st
            .from_peers
            .iter()
            .map(|(id, d)| PeerBytes {
                id: id.to_string(),
                name: self.peer_name(id),
                bytes: d.bytes,
                chunks: d.chunks,
            })
            .collect();
        peers.sort_by_key(|p| std::cmp::Reverse(p.bytes));
        FetchReport {
            content: f.manifest.id_hex(),
            name: f.manifest.name.clone(),
            output: f.output.clone(),
            size: f.manifest.size,
            file_hash,
            seconds: st.started.elapsed().as_secs_f64(),
            bytes_from_origin: st.from_origin,
            bytes_from_peers: from_peers,
            bytes_cached: st.cached,
            origin_share: if moved == 0 {
                0.0
            } else {
                st.from_origin as f64 / moved as f64
            },
            peers,
            refused: st
                .refused
                .iter()
                .map(|(id, r)| RefusedPeer {
                    id: id.to_string(),
                    name: self.peer_name(id),
                    kind: r.kind,
                    reason: r.reason.clone(),
                })
                .collect(),
            bad_chunks: st.bad_chunks,
            retried_requests: st.retried,
            busy_answers: st.busy,
            timed_out_requests: st.timed_out,
            dropped_messages: self.dropped,
            cache_bytes: self.store.bytes(),
            cache_limit: self.store.limit(),
            evicted_chunks: self.store.evicted(),
        }
    }

    fn publish(&self, content: &Hash32) {
        let (Some(p), Some(f)) = (self.sched.progress(content), self.fetches.get(content)) else {
            return;
        };
        f.progress.send_if_modified(|old| {
            let changed = *old != p;
            *old = p;
            changed
        });
    }

    fn publish_all(&self) {
        for content in self.fetches.keys() {
            self.publish(content);
        }
    }

    // ----- commands -----

    fn on_get(
        &mut self,
        req: GetRequest,
        progress: watch::Sender<FetchProgress>,
        reply: oneshot::Sender<Result<FetchReport, String>>,
    ) {
        let Some(id) = parse_hash(&req.content) else {
            let _ = reply.send(Err(format!(
                "{:?} is not a content id (64 hex digits)",
                req.content
            )));
            return;
        };
        if self.sched.is_fetching(&id) {
            let _ = reply.send(Err("this content is being fetched already".into()));
            return;
        }
        let origin = match req.origin.as_deref().map(Origin::new).transpose() {
            Ok(Some(o)) => Some(o),
            Ok(None) => self.default_origin.clone(),
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
                return;
            }
        };
        let cached = self.manifests.get(&id).cloned();
        let events = self.events.clone();
        tokio::spawn(async move {
            let manifest = match (cached, &origin) {
                (Some(m), _) => Ok(m),
                (None, None) => Err(
                    "the manifest is not cached and no origin is known: pass --origin (to `get` or to `up`)"
                        .to_string(),
                ),
                (None, Some(o)) => match o.manifest(&id).await {
                    Ok(json) => Published::parse(id, json)
                        .map(Arc::new)
                        .map_err(|e| ContentError::from(e).to_string()),
                    Err(e) => Err(e.to_string()),
                },
            };
            let _ = events
                .send(Event::Manifest(Box::new(ManifestReady {
                    req,
                    origin,
                    manifest,
                    progress,
                    reply,
                })))
                .await;
        });
    }

    fn start_fetch(
        &mut self,
        m: Arc<Published>,
        origin: Option<Origin>,
        output: PathBuf,
        progress: watch::Sender<FetchProgress>,
        reply: oneshot::Sender<Result<FetchReport, String>>,
    ) {
        let id = *m.id();
        if let std::collections::hash_map::Entry::Vacant(e) = self.manifests.entry(id) {
            e.insert(m.clone());
            let (paths, m2) = (self.paths.clone(), m.clone());
            tokio::spawn(async move {
                if let Err(e) = paths.write_manifest(&m2).await {
                    tracing::warn!(error = %e, "caching a manifest");
                }
            });
        }
        let store = &self.store;
        if !self
            .sched
            .start(Instant::now(), m.clone(), origin.is_some(), |h| {
                store.has(h)
            })
        {
            let _ = reply.send(Err("this content is being fetched already".into()));
            return;
        }
        self.fetches.insert(
            id,
            FetchIo {
                manifest: m.clone(),
                origin,
                output,
                progress,
                reply,
            },
        );
        // The chunks it has cached are in use again (the last to be evicted).
        for h in &m.chunks {
            self.store.touch(h);
        }
        let cached = self.sched.have(&id).map_or(0, |b| b.count());
        tracing::info!(content = %m.id_hex(), name = %m.name, size = m.size,
            chunks = m.count(), cached, "fetch started");
        self.publish(&id);
        // Tell every member what this node has and wants; holders answer with theirs.
        for p in self.members() {
            self.send_bitfield(p, id);
        }
        // A fetch that is all cached assembles at once.
        self.perform();
    }

    // ----- time -----

    fn on_tick(&mut self) {
        let now = Instant::now();
        // The links' round trips scale the scheduler's timeouts.
        let rtts: Vec<(NodeId, Option<Duration>)> = self
            .status
            .borrow()
            .peers
            .iter()
            .map(|p| {
                let rtt = p
                    .rtt_ms
                    .filter(|ms| ms.is_finite() && *ms >= 0.0)
                    .map(|ms| Duration::from_secs_f64(ms / 1000.0));
                (p.id, rtt)
            })
            .collect();
        for (id, rtt) in rtts {
            self.sched.peer_rtt(id, rtt);
        }
        // Members that came or went.
        let members: HashSet<NodeId> = self.members().into_iter().collect();
        for (id, p) in self.peers.iter_mut() {
            p.member_seen |= members.contains(id);
        }
        let gone: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, p)| p.member_seen && !members.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for p in gone {
            self.peers.remove(&p);
            self.sched.peer_gone(now, p);
        }
        // Bitfields not sent yet (a member that joined, a queue that was full).
        for content in self.sched.fetching() {
            for p in &members {
                let sent = self
                    .peers
                    .get(p)
                    .is_some_and(|s| s.sent_bitfield.contains(&content));
                if !sent {
                    self.send_bitfield(*p, content);
                }
            }
        }
        self.sched.tick(now);
        self.perform();
        self.publish_all();
    }
}

/// Why a fetch's file could not be written.
#[derive(Debug)]
enum AssembleError {
    /// These chunks were damaged in the cache (their files are removed): fetch them again.
    Damaged(Vec<Hash32>),
    Failed(String),
}

/// Writes the file from the cache, checking every chunk again and the whole-file hash.
async fn write_output(
    m: &Published,
    out: &std::path::Path,
    paths: &StorePaths,
) -> Result<String, AssembleError> {
    use tokio::io::AsyncWriteExt;
    let tmp = out.with_extension(format!("part{}", rand::random::<u32>()));
    let failed = AssembleError::Failed;
    let res = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| failed(format!("{}: {e}", tmp.display())))?;
        let mut whole = blake3::Hasher::new();
        let mut lost = Vec::new();
        for (i, h) in m.chunks.iter().enumerate() {
            let data = match paths.read_checked(h).await {
                Ok(Read::Good(d)) => d,
                Ok(Read::Damaged | Read::Missing) => {
                    lost.push(*h);
                    continue;
                }
                Err(e) => return Err(failed(format!("reading chunk {i} from the cache: {e}"))),
            };
            if !lost.is_empty() {
                continue;
            }
            whole.update(&data);
            file.write_all(&data)
                .await
                .map_err(|e| failed(format!("{}: {e}", tmp.display())))?;
        }
        if !lost.is_empty() {
            return Err(AssembleError::Damaged(lost));
        }
        file.flush().await.map_err(|e| failed(e.to_string()))?;
        file.sync_all().await.map_err(|e| failed(e.to_string()))?;
        let got = whole.finalize();
        if got.as_bytes() != &m.file_hash {
            return Err(failed(
                "the assembled file does not match the manifest's file hash".into(),
            ));
        }
        tokio::fs::rename(&tmp, out)
            .await
            .map_err(|e| failed(format!("{}: {e}", out.display())))?;
        Ok(got.to_hex().to_string())
    }
    .await;
    if res.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    res
}

/// The link to `peer`, waiting a little for the mesh to have it (the map may list a peer a
/// moment before its link exists).
async fn ensure_link(
    peer: NodeId,
    sender: &ProtocolSender,
    link: &mut Option<LinkSender>,
) -> Option<LinkSender> {
    for attempt in 0..LINK_WAIT_TRIES {
        if let Some(l) = link.as_ref().filter(|l| !l.is_closed()) {
            return Some(l.clone());
        }
        if attempt > 0 {
            tokio::time::sleep(LINK_WAIT).await;
        }
        *link = sender.link(peer).await;
    }
    if let Some(l) = link.as_ref().filter(|l| !l.is_closed()) {
        return Some(l.clone());
    }
    tracing::debug!(%peer, "no link to the peer; content message dropped");
    None
}

/// One peer's sender: control messages first, then served chunks, piece by piece, keeping
/// the link's queue short so that control messages never wait behind megabytes of data.
async fn peer_sender(
    peer: NodeId,
    sender: ProtocolSender,
    mut ctl: mpsc::Receiver<Bytes>,
    mut serve: mpsc::Receiver<Serve>,
    paths: StorePaths,
    events: mpsc::Sender<Event>,
    corrupt: bool,
) {
    let mut link: Option<LinkSender> = None;
    loop {
        let (req, hash) = tokio::select! {
            biased;
            m = ctl.recv() => {
                let Some(m) = m else { return };
                if let Some(l) = ensure_link(peer, &sender, &mut link).await {
                    let _ = l.send(&m).await;
                }
                continue;
            }
            s = serve.recv() => match s {
                Some(s) => s,
                None => return,
            },
        };
        if let Some(l) = ensure_link(peer, &sender, &mut link).await {
            // Checked against its hash on every read: a chunk damaged on disk is never served.
            let read = paths.read_checked(&hash).await;
            if let Ok(Read::Damaged) = read {
                let _ = events.send(Event::Damaged { hash }).await;
            }
            match read {
                Ok(Read::Good(data)) => {
                    let data = if corrupt {
                        let mut d = data.to_vec();
                        if let Some(b) = d.first_mut() {
                            *b ^= 0xff;
                        }
                        Bytes::from(d)
                    } else {
                        data
                    };
                    let total = data.len() as u32;
                    'pieces: for (k, piece) in data.chunks(wire::DATA_PIECE).enumerate() {
                        loop {
                            // Control messages overtake the rest of the chunk.
                            while let Ok(m) = ctl.try_recv() {
                                if l.send(&m).await.is_err() {
                                    break 'pieces;
                                }
                            }
                            if l.queued() <= LINK_DEPTH {
                                break;
                            }
                            tokio::time::sleep(LINK_DRAIN_POLL).await;
                        }
                        let m = Msg::Data {
                            req,
                            offset: (k * wire::DATA_PIECE) as u32,
                            total,
                            bytes: data.slice_ref(piece),
                        };
                        if l.send(&m.encode()).await.is_err() {
                            break;
                        }
                    }
                }
                other => {
                    tracing::debug!(%peer, read = ?other, "chunk to serve is gone or damaged");
                    let m = Msg::Reject {
                        req,
                        reason: RejectReason::NotHere,
                    };
                    let _ = l.send(&m.encode()).await;
                }
            }
        }
        if events.send(Event::Served { peer }).await.is_err() {
            return;
        }
    }
}
