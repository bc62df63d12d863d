//! The content actor: one task that owns the cache index, the peers' bitfields and every
//! running fetch; one sender task per peer that puts messages and served chunks on that
//! peer's link (so a slow peer holds up only its own task); short tasks for disk and origin
//! I/O that report back on a bounded event queue.
//!
//! # Fetch policy
//!
//! - **Who has what**: a fetch starts by sending this node's bitfield for the content to every
//!   peer; peers that know the content answer with theirs, and from then on `Have` for every
//!   chunk they store and `Claim` for every chunk they start fetching from the origin.
//! - **From peers, rarest first**: the missing chunks that some usable peer has are asked for
//!   in order of how few peers have them (random among equals), each from the least loaded
//!   holder, at most [`PIPELINE`] requests in flight per peer. Rarest first spreads distinct
//!   chunks across the group fastest, so every node soon has something to give back.
//! - **From the origin, only what nobody has or is getting**: at most [`ORIGIN_PARALLEL`]
//!   origin requests at a time, for random chunks that no usable peer has and no usable peer
//!   has claimed in the last [`CLAIM_TTL`]. With every node of a group fetching at once, each
//!   chunk then leaves the origin about once and reaches everyone else through the peers.
//! - **Slow or failing**: a peer request that takes longer than [`REQUEST_TIMEOUT`] is given
//!   up and its chunk may then go to the origin too; a `Busy`/`NotHere` answer makes the chunk
//!   available for rescheduling at once.
//! - **Bad chunks**: every chunk is checked against its BLAKE3 hash before it is stored or
//!   counted. A peer that sends one bad chunk is refused for the rest of the fetch (its
//!   bitfield, claims and requests are ignored) and listed in the report.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libp2p::PeerId;
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, oneshot, watch};

use super::origin::Origin;
use super::store::{Manifest, Store, StorePaths};
use super::wire::{self, Bits, Hash32, Msg, RejectReason};
use super::{
    Command, ContentError, ContentHandle, FetchProgress, FetchReport, GetRequest, PeerBytes,
    RefusedPeer,
};
use crate::mesh::channel::{self, Channel};
use crate::mesh::MeshClient;

/// Requests in flight to one peer.
pub const PIPELINE: usize = 4;
/// Origin requests in flight per fetch.
pub const ORIGIN_PARALLEL: usize = 2;
/// How long a peer's claim keeps others from fetching that chunk from the origin.
pub const CLAIM_TTL: Duration = Duration::from_secs(10);
/// A peer request older than this is given up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Chunks one peer may have this node serving at once; more are answered `Busy`.
pub const MAX_SERVING_PER_PEER: usize = 16;
/// A fetch with no chunk completed for this long fails.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fetch waits for the members' bitfields before its first origin request (one
/// round trip is enough to learn what the group holds; without the wait every node of a
/// group that starts together fetches its first chunks from the origin blind).
pub const ORIGIN_GRACE: Duration = Duration::from_millis(300);
/// A fetch that has had nothing to do for this long may take from the origin chunks that
/// another fetcher is due to get there but has not claimed.
pub const ORIGIN_IDLE: Duration = Duration::from_millis(1000);
/// Origin attempts per chunk before the fetch fails.
const ORIGIN_ATTEMPTS: u32 = 4;
/// Messages and events handled at most between two scheduling passes.
const BATCH: usize = 256;
/// Queue to one peer's sender task.
const PEER_QUEUE: usize = 1024;

#[derive(Clone, Debug)]
pub struct ContentConfig {
    pub state_dir: PathBuf,
    /// `up --origin`.
    pub origin: Option<String>,
    /// The `PEERMESH_TEST_CORRUPT_CHUNKS` test hook.
    pub corrupt_chunks: bool,
}

/// Opens the cache and starts the service on `inbox` (the `Content` channel's queue).
pub async fn spawn(
    config: ContentConfig,
    mesh: MeshClient,
    inbox: mpsc::Receiver<(PeerId, Bytes)>,
) -> Result<ContentHandle, ContentError> {
    let default_origin = config.origin.as_deref().map(Origin::new).transpose()?;
    let dir = config.state_dir.clone();
    let (store, manifests) = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .map_err(|e| ContentError::Fetch(format!("opening the cache: {e}")))??;
    if config.corrupt_chunks {
        tracing::warn!(
            "TEST HOOK {}: this node corrupts every chunk it serves",
            super::CORRUPT_ENV
        );
    }
    let (tx, rx) = mpsc::channel(16);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let svc = Service {
        mesh,
        paths: store.paths(),
        store,
        manifests: manifests.into_iter().map(|m| (m.id, Arc::new(m))).collect(),
        peers: HashMap::new(),
        fetches: HashMap::new(),
        outstanding: HashMap::new(),
        next_req: 1,
        events: ev_tx,
        default_origin,
        corrupt: config.corrupt_chunks,
        my_key: None,
        dropped: 0,
    };
    tokio::spawn(svc.run(rx, inbox, ev_rx));
    Ok(ContentHandle { tx })
}

struct ManifestReady {
    req: GetRequest,
    origin: Option<Origin>,
    manifest: Result<Arc<Manifest>, String>,
    progress: watch::Sender<FetchProgress>,
    reply: oneshot::Sender<Result<FetchReport, String>>,
}

/// What the helper tasks report.
enum Event {
    /// A manifest was resolved for a `get`.
    Manifest(Box<ManifestReady>),
    /// A checked chunk reached the disk (or failed to).
    Stored { hash: Hash32, ok: bool },
    OriginChunk {
        content: Hash32,
        index: u32,
        data: Result<Bytes, String>,
    },
    /// A peer's sender task finished serving one chunk.
    Served { peer: PeerId },
    Assembled {
        content: Hash32,
        result: Result<String, String>,
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
    bitfields: HashMap<Hash32, Bits>,
    claims: HashMap<Hash32, HashMap<u32, Instant>>,
    sent_bitfield: HashSet<Hash32>,
    /// Listed in the node's status at some point (a peer that never was is not dropped
    /// for being absent: its first messages can come before the map lists it).
    member_seen: bool,
    /// [`node_key`] of the peer.
    key: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Missing,
    Peer(PeerId),
    Origin,
    Storing,
    Done,
}

struct Outstanding {
    peer: PeerId,
    content: Hash32,
    index: u32,
    sent: Instant,
    buf: BytesMut,
}

struct Fetch {
    manifest: Arc<Manifest>,
    origin: Option<Origin>,
    output: PathBuf,
    state: Vec<ChunkState>,
    have: Bits,
    /// Chunks the origin may serve although a peer has or claims them (a peer was slow).
    origin_ok: Vec<bool>,
    origin_attempts: Vec<u32>,
    origin_inflight: usize,
    peer_inflight: HashMap<PeerId, usize>,
    refused: HashMap<PeerId, String>,
    from_origin: u64,
    from_peers: HashMap<PeerId, (u64, u32)>,
    cached: u64,
    bad_chunks: u64,
    retried: u64,
    started: Instant,
    last_progress: Instant,
    assembling: bool,
    progress: watch::Sender<FetchProgress>,
    reply: Option<oneshot::Sender<Result<FetchReport, String>>>,
}

struct Service {
    mesh: MeshClient,
    store: Store,
    paths: StorePaths,
    manifests: HashMap<Hash32, Arc<Manifest>>,
    peers: HashMap<PeerId, PeerState>,
    fetches: HashMap<Hash32, Fetch>,
    outstanding: HashMap<u32, Outstanding>,
    next_req: u32,
    events: mpsc::Sender<Event>,
    default_origin: Option<Origin>,
    corrupt: bool,
    my_key: Option<u64>,
    /// Malformed or unexpected messages from peers, dropped.
    dropped: u64,
}

impl Service {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inbox: mpsc::Receiver<(PeerId, Bytes)>,
        mut events: mpsc::Receiver<Event>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut dirty = tokio::select! {
                c = commands.recv() => match c {
                    Some(Command::Get { req, progress, reply }) => { self.on_get(req, progress, reply); false }
                    None => return,
                },
                m = inbox.recv() => match m {
                    Some((peer, msg)) => self.on_message(peer, msg),
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
                let more = match inbox.try_recv() {
                    Ok((peer, msg)) => self.on_message(peer, msg),
                    Err(_) => match events.try_recv() {
                        Ok(e) => self.on_event(e),
                        Err(_) => break,
                    },
                };
                dirty |= more;
            }
            if dirty {
                self.schedule();
            }
        }
    }

    // ----- peers -----

    /// This node's [`node_key`] (from its id in the status).
    fn my_key(&mut self) -> u64 {
        if let Some(k) = self.my_key {
            return k;
        }
        let id = self.mesh.status.borrow().id.clone();
        let k = node_key(&id);
        if !id.is_empty() {
            self.my_key = Some(k);
        }
        k
    }

    fn peer(&mut self, id: PeerId) -> &mut PeerState {
        let (mesh, paths, events, corrupt) = (
            self.mesh.clone(),
            self.paths.clone(),
            self.events.clone(),
            self.corrupt,
        );
        self.peers.entry(id).or_insert_with(|| {
            let (ctl, ctl_rx) = mpsc::channel(PEER_QUEUE);
            let (serve, serve_rx) = mpsc::channel(MAX_SERVING_PER_PEER);
            tokio::spawn(peer_sender(
                id, mesh, ctl_rx, serve_rx, paths, events, corrupt,
            ));
            PeerState {
                ctl,
                serve,
                serving: 0,
                bitfields: HashMap::new(),
                claims: HashMap::new(),
                sent_bitfield: HashSet::new(),
                member_seen: false,
                key: node_key(&id.to_string()),
            }
        })
    }

    /// Queues `msg` for `peer`; false if its queue is full (the message is dropped).
    fn send(&mut self, peer: PeerId, msg: &Msg) -> bool {
        let ok = self.peer(peer).ctl.try_send(msg.encode()).is_ok();
        if !ok {
            tracing::debug!(%peer, "content queue to peer full; message dropped");
        }
        ok
    }

    /// Members listed in the node's status.
    fn members(&self) -> Vec<PeerId> {
        self.mesh
            .status
            .borrow()
            .peers
            .iter()
            .filter_map(|p| p.id.parse().ok())
            .collect()
    }

    fn peer_name(&self, id: &PeerId) -> String {
        let s = id.to_string();
        self.mesh
            .status
            .borrow()
            .peers
            .iter()
            .find(|p| p.id == s)
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    /// This node's bitfield for `content`: the fetch's, or what the cache holds.
    fn my_bits(&self, content: &Hash32) -> Option<Bits> {
        if let Some(f) = self.fetches.get(content) {
            return Some(f.have.clone());
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

    fn send_bitfield(&mut self, peer: PeerId, content: Hash32) {
        let Some(bits) = self.my_bits(&content) else {
            return;
        };
        if self.send(peer, &bits.to_msg(content)) {
            self.peer(peer).sent_bitfield.insert(content);
        }
        // Chunks this node is getting from the origin right now.
        let claims: Vec<u32> = self
            .fetches
            .get(&content)
            .map(|f| {
                (0..f.state.len() as u32)
                    .filter(|i| f.state[*i as usize] == ChunkState::Origin)
                    .collect()
            })
            .unwrap_or_default();
        for index in claims {
            self.send(peer, &Msg::Claim { content, index });
        }
    }

    // ----- inbound -----

    fn drop_msg(&mut self, peer: PeerId, why: &str) {
        self.dropped += 1;
        tracing::debug!(%peer, why, dropped = self.dropped, "content message dropped");
    }

    fn on_message(&mut self, peer: PeerId, raw: Bytes) -> bool {
        let Some(msg) = wire::decode(&raw) else {
            self.drop_msg(peer, "malformed");
            return false;
        };
        match msg {
            Msg::Bitfield {
                content,
                chunks,
                bits,
            } => {
                let Some(m) = self.manifests.get(&content) else {
                    // A content this node never fetched; it learns the peer's bits
                    // when it starts that fetch and asks.
                    return false;
                };
                let Some(b) = (m.count() == chunks)
                    .then(|| Bits::from_wire(chunks, &bits))
                    .flatten()
                else {
                    self.drop_msg(peer, "bitfield of the wrong size");
                    return false;
                };
                let p = self.peer(peer);
                // Answer the first bitfield of a peer for this content even if ours went
                // out before: it may have come while the peer did not know the content yet.
                let first = p.bitfields.insert(content, b).is_none();
                if first || !p.sent_bitfield.contains(&content) {
                    self.send_bitfield(peer, content);
                }
                true
            }
            Msg::Have { content, index } => {
                let p = self.peer(peer);
                let set = p.bitfields.get_mut(&content).map(|b| b.set(index));
                match set {
                    Some(true) => {
                        if let Some(c) = p.claims.get_mut(&content) {
                            c.remove(&index);
                        }
                        true
                    }
                    Some(false) => {
                        self.drop_msg(peer, "have out of range");
                        false
                    }
                    None => false,
                }
            }
            Msg::Claim { content, index } => {
                if self.manifests.contains_key(&content) {
                    self.peer(peer)
                        .claims
                        .entry(content)
                        .or_default()
                        .insert(index, Instant::now());
                }
                false
            }
            Msg::Request { req, hash } => {
                let has = self.store.has(&hash);
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
                match self.outstanding.get(&req) {
                    Some(o) if o.peer == peer => {}
                    _ => {
                        self.drop_msg(peer, "reject for no request of ours");
                        return false;
                    }
                }
                let o = self.outstanding.remove(&req).expect("checked");
                tracing::debug!(%peer, index = o.index, ?reason, "request turned down");
                self.request_failed(&o, reason == RejectReason::NotHere);
                true
            }
            Msg::Data {
                req,
                offset,
                total,
                bytes,
            } => self.on_data(peer, req, offset, total, bytes),
        }
    }

    /// A request to a peer that will not complete: the chunk is up for scheduling again.
    fn request_failed(&mut self, o: &Outstanding, not_there: bool) {
        let Some(f) = self.fetches.get_mut(&o.content) else {
            return;
        };
        if let Some(n) = f.peer_inflight.get_mut(&o.peer) {
            *n = n.saturating_sub(1);
        }
        if f.state[o.index as usize] == ChunkState::Peer(o.peer) {
            f.state[o.index as usize] = ChunkState::Missing;
        }
        f.retried += 1;
        if not_there {
            // The peer's bitfield was wrong (or it lost the chunk): forget it has it.
            if let Some(p) = self.peers.get_mut(&o.peer) {
                if let Some(b) = p.bitfields.get_mut(&o.content) {
                    let mut fresh = Bits::new(b.len());
                    for i in 0..b.len() {
                        if i != o.index && b.get(i) {
                            fresh.set(i);
                        }
                    }
                    *b = fresh;
                }
            }
        }
    }

    fn on_data(&mut self, peer: PeerId, req: u32, offset: u32, total: u32, bytes: Bytes) -> bool {
        let expected = match self.outstanding.get(&req) {
            Some(o) if o.peer == peer => {
                self.manifests.get(&o.content).map(|m| m.chunk_len(o.index))
            }
            _ => None,
        };
        let Some(expected) = expected else {
            self.drop_msg(peer, "data for no request of ours");
            return false;
        };
        let o = self.outstanding.get_mut(&req).expect("checked");
        if total != expected || offset as usize != o.buf.len() {
            let o = self.outstanding.remove(&req).expect("checked");
            self.drop_msg(peer, "data out of place");
            self.request_failed(&o, false);
            return true;
        }
        o.buf.extend_from_slice(&bytes);
        if o.buf.len() < total as usize {
            return false;
        }
        let mut o = self.outstanding.remove(&req).expect("checked");
        let data = std::mem::take(&mut o.buf).freeze();
        let Some(f) = self.fetches.get_mut(&o.content) else {
            return false;
        };
        if let Some(n) = f.peer_inflight.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
        let hash = f.manifest.chunks[o.index as usize];
        if *blake3::hash(&data).as_bytes() != hash {
            f.bad_chunks += 1;
            if f.state[o.index as usize] == ChunkState::Peer(peer) {
                f.state[o.index as usize] = ChunkState::Missing;
            }
            let name = self.peer_name(&peer);
            tracing::warn!(%peer, %name, index = o.index, "peer sent a chunk that fails its hash; refusing it for the rest of this fetch");
            let f = self.fetches.get_mut(&o.content).expect("present");
            f.refused
                .insert(peer, format!("chunk {} failed its BLAKE3 check", o.index));
            // Its other requests for this fetch are abandoned.
            let content = o.content;
            let abandoned: Vec<u32> = self
                .outstanding
                .iter()
                .filter(|(_, x)| x.peer == peer && x.content == content)
                .map(|(r, _)| *r)
                .collect();
            for r in abandoned {
                let x = self.outstanding.remove(&r).expect("listed");
                self.request_failed(&x, false);
            }
            return true;
        }
        let e = f.from_peers.entry(peer).or_insert((0, 0));
        e.0 += data.len() as u64;
        e.1 += 1;
        f.state[o.index as usize] = ChunkState::Storing;
        self.store_chunk(hash, data);
        true
    }

    fn store_chunk(&mut self, hash: Hash32, data: Bytes) {
        let (paths, events) = (self.paths.clone(), self.events.clone());
        tokio::spawn(async move {
            let ok = match paths.write(&hash, &data).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "writing a chunk to the cache");
                    false
                }
            };
            let _ = events.send(Event::Stored { hash, ok }).await;
        });
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
            Event::Stored { hash, ok } => {
                if ok {
                    self.store.insert(hash);
                }
                self.on_stored(hash, ok);
                true
            }
            Event::OriginChunk {
                content,
                index,
                data,
            } => {
                let Some(f) = self.fetches.get_mut(&content) else {
                    return false;
                };
                f.origin_inflight = f.origin_inflight.saturating_sub(1);
                let hash = f.manifest.chunks[index as usize];
                match data {
                    Ok(d) if *blake3::hash(&d).as_bytes() == hash => {
                        f.from_origin += d.len() as u64;
                        f.state[index as usize] = ChunkState::Storing;
                        self.store_chunk(hash, d);
                    }
                    other => {
                        if other.is_ok() {
                            f.bad_chunks += 1;
                        }
                        let why = match other {
                            Ok(_) => "the origin's chunk fails its hash".to_string(),
                            Err(e) => e,
                        };
                        tracing::warn!(index, error = %why, "origin chunk");
                        f.state[index as usize] = ChunkState::Missing;
                        f.origin_attempts[index as usize] += 1;
                        if f.origin_attempts[index as usize] >= ORIGIN_ATTEMPTS {
                            self.fail(
                                content,
                                format!("chunk {index}: {ORIGIN_ATTEMPTS} origin attempts failed; last: {why}"),
                            );
                        }
                    }
                }
                true
            }
            Event::Served { peer } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.serving = p.serving.saturating_sub(1);
                }
                false
            }
            Event::Assembled { content, result } => {
                self.outstanding.retain(|_, o| o.content != content);
                if let Some(f) = self.fetches.remove(&content) {
                    let report = result.map(|file_hash| self.report(&f, file_hash));
                    if let Ok(r) = &report {
                        tracing::info!(content = %r.content, seconds = r.seconds,
                            from_origin = r.bytes_from_origin, from_peers = r.bytes_from_peers,
                            refused = r.refused.len(), "fetch done");
                    }
                    if let Some(reply) = f.reply {
                        let _ = reply.send(report);
                    }
                }
                false
            }
        }
    }

    fn on_stored(&mut self, hash: Hash32, ok: bool) {
        let mut haves: Vec<(Hash32, u32)> = Vec::new();
        let mut complete = Vec::new();
        for (id, f) in self.fetches.iter_mut() {
            for (i, h) in f.manifest.chunks.iter().enumerate() {
                if *h != hash || f.state[i] == ChunkState::Done {
                    continue;
                }
                if !ok {
                    if f.state[i] == ChunkState::Storing {
                        f.state[i] = ChunkState::Missing;
                    }
                    continue;
                }
                f.state[i] = ChunkState::Done;
                f.have.set(i as u32);
                f.last_progress = Instant::now();
                haves.push((*id, i as u32));
            }
            if f.have.is_full() && !f.assembling {
                f.assembling = true;
                complete.push(*id);
            }
            publish_progress(f);
        }
        for (content, index) in haves {
            let interested: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(_, p)| p.bitfields.get(&content).is_some_and(|b| !b.is_full()))
                .map(|(id, _)| *id)
                .collect();
            for p in interested {
                self.send(p, &Msg::Have { content, index });
            }
        }
        for id in complete {
            self.assemble(id);
        }
    }

    fn assemble(&mut self, content: Hash32) {
        let f = &self.fetches[&content];
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

    fn fail(&mut self, content: Hash32, why: String) {
        if let Some(f) = self.fetches.remove(&content) {
            tracing::warn!(content = %hex::encode(content), error = %why, "fetch failed");
            if let Some(r) = f.reply {
                let _ = r.send(Err(why));
            }
            self.outstanding.retain(|_, o| o.content != content);
        }
    }

    fn report(&self, f: &Fetch, file_hash: String) -> FetchReport {
        let from_peers: u64 = f.from_peers.values().map(|v| v.0).sum();
        let moved = from_peers + f.from_origin;
        let mut peers: Vec<PeerBytes> = f
            .from_peers
            .iter()
            .map(|(id, (bytes, chunks))| PeerBytes {
                id: id.to_string(),
                name: self.peer_name(id),
                bytes: *bytes,
                chunks: *chunks,
            })
            .collect();
        peers.sort_by_key(|p| std::cmp::Reverse(p.bytes));
        FetchReport {
            content: hex::encode(f.manifest.id),
            name: f.manifest.name.clone(),
            output: f.output.clone(),
            size: f.manifest.size,
            file_hash,
            seconds: f.started.elapsed().as_secs_f64(),
            bytes_from_origin: f.from_origin,
            bytes_from_peers: from_peers,
            bytes_cached: f.cached,
            origin_share: if moved == 0 {
                0.0
            } else {
                f.from_origin as f64 / moved as f64
            },
            peers,
            refused: f
                .refused
                .iter()
                .map(|(id, reason)| RefusedPeer {
                    id: id.to_string(),
                    name: self.peer_name(id),
                    reason: reason.clone(),
                })
                .collect(),
            bad_chunks: f.bad_chunks,
            retried_requests: f.retried,
            dropped_messages: self.dropped,
        }
    }

    // ----- commands -----

    fn on_get(
        &mut self,
        req: GetRequest,
        progress: watch::Sender<FetchProgress>,
        reply: oneshot::Sender<Result<FetchReport, String>>,
    ) {
        let Some(id) = super::store::parse_hex32(&req.content.to_ascii_lowercase()) else {
            let _ = reply.send(Err(format!(
                "{:?} is not a content id (64 hex digits)",
                req.content
            )));
            return;
        };
        if self.fetches.contains_key(&id) {
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
                    Ok(json) => Manifest::parse(id, json)
                        .map(Arc::new)
                        .map_err(|e| e.to_string()),
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
        m: Arc<Manifest>,
        origin: Option<Origin>,
        output: PathBuf,
        progress: watch::Sender<FetchProgress>,
        reply: oneshot::Sender<Result<FetchReport, String>>,
    ) {
        let id = m.id;
        if self.fetches.contains_key(&id) {
            let _ = reply.send(Err("this content is being fetched already".into()));
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.manifests.entry(id) {
            e.insert(m.clone());
            let (paths, m2) = (self.paths.clone(), m.clone());
            tokio::spawn(async move {
                if let Err(e) = paths.write_manifest(&m2).await {
                    tracing::warn!(error = %e, "caching a manifest");
                }
            });
        }
        let n = m.count() as usize;
        let mut f = Fetch {
            manifest: m.clone(),
            origin,
            output,
            state: vec![ChunkState::Missing; n],
            have: Bits::new(n as u32),
            origin_ok: vec![false; n],
            origin_attempts: vec![0; n],
            origin_inflight: 0,
            peer_inflight: HashMap::new(),
            refused: HashMap::new(),
            from_origin: 0,
            from_peers: HashMap::new(),
            cached: 0,
            bad_chunks: 0,
            retried: 0,
            started: Instant::now(),
            last_progress: Instant::now(),
            assembling: false,
            progress,
            reply: Some(reply),
        };
        for (i, h) in m.chunks.iter().enumerate() {
            if self.store.has(h) {
                f.state[i] = ChunkState::Done;
                f.have.set(i as u32);
                f.cached += u64::from(m.chunk_len(i as u32));
            }
        }
        tracing::info!(content = %hex::encode(id), name = %m.name, size = m.size,
            chunks = n, cached = f.have.count(), "fetch started");
        publish_progress(&f);
        let full = f.have.is_full();
        self.fetches.insert(id, f);
        // Tell every member what this node has and wants; holders answer with theirs.
        for p in self.members() {
            self.send_bitfield(p, id);
        }
        if full {
            self.fetches.get_mut(&id).expect("inserted").assembling = true;
            self.assemble(id);
        }
    }

    // ----- time -----

    fn on_tick(&mut self) {
        let now = Instant::now();
        // Members that came or went.
        let members: HashSet<PeerId> = self.members().into_iter().collect();
        for (id, p) in self.peers.iter_mut() {
            p.member_seen |= members.contains(id);
        }
        let gone: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(id, p)| p.member_seen && !members.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for p in gone {
            self.peers.remove(&p);
            let reqs: Vec<u32> = self
                .outstanding
                .iter()
                .filter(|(_, o)| o.peer == p)
                .map(|(r, _)| *r)
                .collect();
            for r in reqs {
                let o = self.outstanding.remove(&r).expect("listed");
                self.request_failed(&o, false);
            }
        }
        let active: Vec<Hash32> = self.fetches.keys().copied().collect();
        for content in &active {
            for p in &members {
                let sent = self
                    .peers
                    .get(p)
                    .is_some_and(|s| s.sent_bitfield.contains(content));
                if !sent {
                    self.send_bitfield(*p, *content);
                }
            }
        }
        // Slow peer requests.
        let late: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, o)| now.duration_since(o.sent) > REQUEST_TIMEOUT)
            .map(|(r, _)| *r)
            .collect();
        for r in late {
            let o = self.outstanding.remove(&r).expect("listed");
            tracing::info!(peer = %o.peer, index = o.index, "peer request timed out; the chunk may now come from the origin");
            if let Some(f) = self.fetches.get_mut(&o.content) {
                f.origin_ok[o.index as usize] = true;
            }
            self.request_failed(&o, false);
        }
        for content in active {
            let Some(f) = self.fetches.get(&content) else {
                continue;
            };
            if !f.assembling && now.duration_since(f.last_progress) > STALL_TIMEOUT {
                self.fail(
                    content,
                    format!(
                        "no chunk arrived for {STALL_TIMEOUT:?} ({} of {} done; origin {})",
                        f.have.count(),
                        f.have.len(),
                        if f.origin.is_some() {
                            "known"
                        } else {
                            "unknown"
                        }
                    ),
                );
            } else if let Some(f) = self.fetches.get(&content) {
                publish_progress(f);
            }
        }
    }

    // ----- scheduling -----

    fn schedule(&mut self) {
        let ids: Vec<Hash32> = self.fetches.keys().copied().collect();
        for id in ids {
            self.schedule_peers(id);
            self.schedule_origin(id);
        }
    }

    fn schedule_peers(&mut self, content: Hash32) {
        let Some(f) = self.fetches.get(&content) else {
            return;
        };
        if f.assembling {
            return;
        }
        // Usable holders: peers with a bitfield for it, not refused, with room in their pipeline.
        let holders: Vec<(PeerId, &Bits)> = self
            .peers
            .iter()
            .filter(|(id, _)| !f.refused.contains_key(id))
            .filter_map(|(id, p)| p.bitfields.get(&content).map(|b| (*id, b)))
            .collect();
        if holders.is_empty() {
            return;
        }
        let mut load: HashMap<PeerId, usize> = holders
            .iter()
            .map(|(id, _)| (*id, f.peer_inflight.get(id).copied().unwrap_or(0)))
            .collect();
        if load.values().all(|l| *l >= PIPELINE) {
            return;
        }
        let mut wanted: Vec<(usize, u32)> = (0..f.state.len() as u32)
            .filter(|i| f.state[*i as usize] == ChunkState::Missing)
            .map(|i| (holders.iter().filter(|(_, b)| b.get(i)).count(), i))
            .filter(|(avail, _)| *avail > 0)
            .collect();
        wanted.shuffle(&mut rand::thread_rng());
        wanted.sort_by_key(|(avail, _)| *avail);
        let mut plan: Vec<(PeerId, u32)> = Vec::new();
        for (_, i) in wanted {
            let best = holders
                .iter()
                .filter(|(id, b)| b.get(i) && load[id] < PIPELINE)
                .min_by_key(|(id, _)| load[id])
                .map(|(id, _)| *id);
            if let Some(p) = best {
                *load.get_mut(&p).expect("holder") += 1;
                plan.push((p, i));
            }
            if load.values().all(|l| *l >= PIPELINE) {
                break;
            }
        }
        for (peer, index) in plan {
            let req = self.next_req;
            self.next_req = self.next_req.wrapping_add(1).max(1);
            let hash = self.fetches[&content].manifest.chunks[index as usize];
            if !self.send(peer, &Msg::Request { req, hash }) {
                continue;
            }
            let f = self.fetches.get_mut(&content).expect("present");
            f.state[index as usize] = ChunkState::Peer(peer);
            *f.peer_inflight.entry(peer).or_insert(0) += 1;
            let len = f.manifest.chunk_len(index) as usize;
            self.outstanding.insert(
                req,
                Outstanding {
                    peer,
                    content,
                    index,
                    sent: Instant::now(),
                    buf: BytesMut::with_capacity(len),
                },
            );
        }
    }

    fn schedule_origin(&mut self, content: Hash32) {
        let now = Instant::now();
        let me = self.my_key();
        let Some(f) = self.fetches.get(&content) else {
            return;
        };
        let Some(origin) = f.origin.clone() else {
            return;
        };
        if f.assembling || f.origin_inflight >= ORIGIN_PARALLEL {
            return;
        }
        if f.started.elapsed() < ORIGIN_GRACE && !self.mesh.status.borrow().peers.is_empty() {
            return;
        }
        let usable: Vec<&PeerState> = self
            .peers
            .iter()
            .filter(|(id, _)| !f.refused.contains_key(id))
            .map(|(_, p)| p)
            .collect();
        // The other fetchers of this content, for the origin share-out.
        let fetchers: Vec<u64> = usable
            .iter()
            .filter(|p| p.bitfields.get(&content).is_some_and(|b| !b.is_full()))
            .map(|p| p.key)
            .collect();
        let idle = now.duration_since(f.last_progress) > ORIGIN_IDLE
            && f.peer_inflight.values().all(|n| *n == 0);
        let mut candidates: Vec<u32> = (0..f.state.len() as u32)
            .filter(|i| f.state[*i as usize] == ChunkState::Missing)
            .filter(|i| {
                if f.origin_ok[*i as usize] {
                    return true;
                }
                let someone = usable.iter().any(|p| {
                    p.bitfields.get(&content).is_some_and(|b| b.get(*i))
                        || p.claims
                            .get(&content)
                            .and_then(|c| c.get(i))
                            .is_some_and(|t| now.duration_since(*t) < CLAIM_TTL)
                });
                let mine = fetchers
                    .iter()
                    .all(|k| rank(me, &content, *i) <= rank(*k, &content, *i));
                !someone && (mine || idle)
            })
            .collect();
        candidates.shuffle(&mut rand::thread_rng());
        let room = ORIGIN_PARALLEL - f.origin_inflight;
        candidates.truncate(room);
        for index in candidates {
            let f = self.fetches.get_mut(&content).expect("present");
            f.state[index as usize] = ChunkState::Origin;
            f.origin_inflight += 1;
            let hash = f.manifest.chunks[index as usize];
            let interested: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(_, p)| p.bitfields.get(&content).is_some_and(|b| !b.is_full()))
                .map(|(id, _)| *id)
                .collect();
            for p in interested {
                self.send(p, &Msg::Claim { content, index });
            }
            let (origin, events) = (origin.clone(), self.events.clone());
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
    }
}

/// A node's seat in the origin share-out: from its id.
fn node_key(id: &str) -> u64 {
    let h = blake3::hash(id.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Rendezvous hashing: of the nodes fetching a content, the one with the lowest rank for a
/// chunk gets it from the origin; the others wait for it to come through the mesh. Every
/// node computes the same answer from the same set, so each chunk leaves the origin about
/// once without any message exchanged for it; a fetcher that does not deliver is covered by
/// the claim TTL, request timeouts and [`ORIGIN_IDLE`].
fn rank(node: u64, content: &Hash32, index: u32) -> u64 {
    let c = u64::from_le_bytes(content[..8].try_into().expect("8 bytes"));
    let mut x = node ^ c ^ (u64::from(index)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn publish_progress(f: &Fetch) {
    let from_peers: u64 = f.from_peers.values().map(|v| v.0).sum();
    let done: u64 = (0..f.have.len())
        .filter(|i| f.have.get(*i))
        .map(|i| u64::from(f.manifest.chunk_len(i)))
        .sum();
    let p = FetchProgress {
        size: f.manifest.size,
        chunks: f.have.len(),
        chunks_done: f.have.count(),
        bytes_done: done,
        bytes_from_origin: f.from_origin,
        bytes_from_peers: from_peers,
        peers_active: f.peer_inflight.values().filter(|n| **n > 0).count(),
    };
    f.progress.send_if_modified(|old| {
        let changed = *old != p;
        *old = p;
        changed
    });
}

/// Writes the file from the cache, checking every chunk again and the whole-file hash.
async fn write_output(
    m: &Manifest,
    out: &std::path::Path,
    paths: &StorePaths,
) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let tmp = out.with_extension(format!("part{}", rand::random::<u32>()));
    let res = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut whole = blake3::Hasher::new();
        for (i, h) in m.chunks.iter().enumerate() {
            let data = paths
                .read(h)
                .await
                .map_err(|e| format!("reading chunk {i} from the cache: {e}"))?;
            if blake3::hash(&data).as_bytes() != h {
                return Err(format!("chunk {i} in the cache is damaged"));
            }
            whole.update(&data);
            file.write_all(&data)
                .await
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
        }
        file.flush().await.map_err(|e| e.to_string())?;
        file.sync_all().await.map_err(|e| e.to_string())?;
        let got = whole.finalize();
        if got.as_bytes() != &m.file_hash {
            return Err("the assembled file does not match the manifest's file hash".into());
        }
        tokio::fs::rename(&tmp, out)
            .await
            .map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(got.to_hex().to_string())
    }
    .await;
    if res.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    res
}

/// Data messages of served chunks allowed in the link's queue at once: control messages
/// (haves, claims, requests) queued behind more would arrive late and make peers fetch from
/// the origin what this node is about to have.
const LINK_DEPTH: usize = 8;

/// The link to `peer`, waiting a little for the mesh to have it (the map may list a peer a
/// moment before its link exists).
async fn ensure_link(
    peer: PeerId,
    mesh: &MeshClient,
    link: &mut Option<mpsc::Sender<Bytes>>,
) -> Option<mpsc::Sender<Bytes>> {
    for _ in 0..10 {
        if let Some(l) = link.as_ref().filter(|l| !l.is_closed()) {
            return Some(l.clone());
        }
        *link = mesh.link_sender(peer).await;
        if link.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tracing::debug!(%peer, "no link to the peer; content message dropped");
    None
}

/// One peer's sender: control messages first, then served chunks, piece by piece, keeping
/// the link's queue short so that control messages never wait behind megabytes of data.
async fn peer_sender(
    peer: PeerId,
    mesh: MeshClient,
    mut ctl: mpsc::Receiver<Bytes>,
    mut serve: mpsc::Receiver<Serve>,
    paths: StorePaths,
    events: mpsc::Sender<Event>,
    corrupt: bool,
) {
    let mut link: Option<mpsc::Sender<Bytes>> = None;
    let tagged = |m: &[u8]| channel::tag(Channel::Content, m);
    loop {
        let (req, hash) = tokio::select! {
            biased;
            m = ctl.recv() => {
                let Some(m) = m else { return };
                if let Some(l) = ensure_link(peer, &mesh, &mut link).await {
                    let _ = l.send(tagged(&m)).await;
                }
                continue;
            }
            s = serve.recv() => match s {
                Some(s) => s,
                None => return,
            },
        };
        if let Some(l) = ensure_link(peer, &mesh, &mut link).await {
            match paths.read(&hash).await {
                Ok(data) => {
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
                                if l.send(tagged(&m)).await.is_err() {
                                    break 'pieces;
                                }
                            }
                            if l.max_capacity() - l.capacity() <= LINK_DEPTH {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        let m = Msg::Data {
                            req,
                            offset: (k * wire::DATA_PIECE) as u32,
                            total,
                            bytes: data.slice_ref(piece),
                        };
                        if l.send(tagged(&m.encode())).await.is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "chunk to serve is gone");
                    let m = Msg::Reject {
                        req,
                        reason: RejectReason::NotHere,
                    };
                    let _ = l.send(tagged(&m.encode())).await;
                }
            }
        }
        if events.send(Event::Served { peer }).await.is_err() {
            return;
        }
    }
}
