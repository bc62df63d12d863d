//! The fetch scheduler: every decision the content actor makes about where
//! chunks come from, as a state machine without I/O. The actor feeds it what
//! happened (peers' bitfields, `Have`s, claims, data and rejects; origin and
//! disk results; the clock) and carries out the [`Action`]s it polls out.
//! Time is passed in as an [`Instant`], so tests run it on a virtual clock.
//!
//! # Policy
//!
//! - **Who has what**: peers' bitfields for a content, updated by their
//!   `Have`s; their `Claim`s ("I am fetching this chunk from the origin")
//!   for [`CLAIM_TTL`].
//! - **From peers, rarest first**: the missing chunks that some usable peer
//!   has are asked for in order of how few peers have them (random among
//!   equals), each from the least loaded holder, at most [`PIPELINE`]
//!   requests in flight per peer and fetch. Rarest first spreads distinct
//!   chunks across the group fastest, so every node soon has something to
//!   give back.
//! - **From the origin, only what nobody has or is getting**: at most
//!   [`ORIGIN_PARALLEL`] origin requests at a time, for chunks that no usable
//!   peer has and no usable peer has claimed in the last [`CLAIM_TTL`], and
//!   of those only the ones this node wins by rendezvous hashing ([`rank`])
//!   among the nodes fetching the same content: with every node of a group
//!   fetching at once, each chunk then leaves the origin about once and
//!   reaches everyone else through the peers. A fetch that waited
//!   [`ORIGIN_IDLE`] with nothing in flight from peers takes the others'
//!   share too. No origin request in the first [`ORIGIN_GRACE`] of a fetch
//!   while the group has other members (their bitfields are on the way).
//! - **Slow, silent or failing peers**: a peer request is given up when the
//!   peer has sent nothing for it (nor data for any other request of ours)
//!   for [`request_timeout`] (a few of the link's measured round trips plus
//!   a slack, at most [`REQUEST_TIMEOUT`]), or when it is older than
//!   [`REQUEST_TIMEOUT`]; its chunk may then come from the origin too. A
//!   `Busy` or `NotHere` answer frees the chunk at once (`NotHere` also
//!   clears the peer's bit). Every given-up request counts as retried.
//! - **No peer can stall a fetch**: a timeout, `Busy`, `NotHere` or data out
//!   of place is a strike against the peer in that fetch. After each strike
//!   the peer gets no request for a backoff that doubles with every strike
//!   in a row ([`backoff`]); [`MAX_STRIKES`] in a row without a chunk
//!   delivered, or [`MAX_FAILURES`] in all, and the peer is snubbed: refused
//!   for the rest of the fetch. A refused peer, or one backing off after a
//!   whole [`PIPELINE`] of strikes in a row, does not keep the origin from a
//!   chunk (its bitfield and claims count for nothing); a chunk turned down
//!   `Busy` or timed out may come from the origin at once. A
//!   claim holds the origin off for at most [`CLAIM_TTL`] from the first
//!   time that peer claimed that chunk: claiming it again does not extend
//!   it.
//! - **Bad claims and bad chunks**: every chunk is checked against its
//!   BLAKE3 hash before it is stored or counted, and every chunk index a
//!   peer names (bitfield length, `Have`, `Claim`) against the manifest
//!   ([`crate::wire::Msg::check_range`]). A peer that sends one bad chunk or
//!   names one chunk past the end is refused for the rest of the fetch (its
//!   bitfield, claims and requests are ignored, its other requests given
//!   up). [`ORIGIN_ATTEMPTS`] failed origin requests for one chunk, or no
//!   chunk stored for [`STALL_TIMEOUT`], fail the fetch.
//! - Every refused peer is listed in the fetch's [`FetchStats::refused`]
//!   with a [`RefusalKind`] and a reason, and so in the report.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use peermesh_base::NodeId;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::manifest::{Hash32, Published};
use crate::wire::{check_index, Bits, Msg, RangeError};
use crate::{FetchProgress, RefusalKind};

/// Requests in flight to one peer (per fetch): enough to keep a link busy
/// across a round trip (4 × 256 KiB chunks), few enough that a slow peer
/// holds up only a few chunks.
pub const PIPELINE: usize = 4;
/// Origin requests in flight per fetch.
pub const ORIGIN_PARALLEL: usize = 2;
/// How long a peer's claim keeps others from fetching that chunk from the
/// origin: ample for one origin GET of a chunk and the `Have` that follows
/// it; a claimer that died or stalls keeps the chunk from the others for at
/// most this long.
pub const CLAIM_TTL: Duration = Duration::from_secs(10);
/// A peer request older than this is given up, however much data the peer
/// is sending: a chunk takes well under a second on a live link, and a peer
/// that trickles data keeps a chunk from the origin for at most this long.
/// Also the most [`request_timeout`] gives a silent peer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Round trips of the link that a peer may stay silent on a request (no
/// piece of it, nor of any other request of ours) before it is given up:
/// the peer serves our requests one after the other, so a piece of some
/// request should come every round trip or so; eight leave room for a link
/// that is briefly congested.
pub const SILENCE_RTTS: u32 = 8;
/// Added to [`SILENCE_RTTS`] round trips: a path switch can hold a link for
/// a second or two, and a live peer may be reading a chunk from a slow disk.
/// Small enough that a silent peer holds a chunk for seconds, not minutes.
pub const SILENCE_SLACK: Duration = Duration::from_secs(2);
/// The round trip assumed for a peer whose link has measured none yet: a
/// relayed path across a continent (the slack dominates on loopback anyway).
pub const DEFAULT_RTT: Duration = Duration::from_millis(250);
/// Strikes in a row (timeouts, `Busy`, `NotHere`, data out of place) without
/// a chunk delivered after which a peer is snubbed for the rest of the fetch:
/// two full pipelines ([`PIPELINE`]) of failures, so a peer whose one burst of
/// requests failed (a path switch, a moment of overload) gets another go.
pub const MAX_STRIKES: u32 = 8;
/// Failures in all (chunks delivered in between or not) after which a peer
/// is snubbed for the rest of the fetch: a peer that delivers one chunk in
/// every few only to fail the rest still costs a bounded number of retries.
pub const MAX_FAILURES: u32 = 32;
/// Shortest backoff after a strike: a peer that answers `Busy` at once is
/// not asked again within the same scheduling pass (nor a few after).
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest backoff: a peer near [`MAX_STRIKES`] is asked again within
/// seconds, so that snubbing it takes a bounded time.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long a peer with round trip `rtt` (its link's measurement, or
/// [`DEFAULT_RTT`]) may send nothing for a request of ours before it is
/// given up: [`SILENCE_RTTS`] round trips plus [`SILENCE_SLACK`], at most
/// [`REQUEST_TIMEOUT`].
pub fn request_timeout(rtt: Option<Duration>) -> Duration {
    let rtt = rtt.unwrap_or(DEFAULT_RTT);
    (rtt.saturating_mul(SILENCE_RTTS) + SILENCE_SLACK).min(REQUEST_TIMEOUT)
}

/// How long a peer with round trip `rtt` gets no request after its
/// `strikes`-th strike in a row: two round trips (at least [`BACKOFF_MIN`]),
/// doubled for every strike before, at most [`BACKOFF_MAX`].
pub fn backoff(rtt: Option<Duration>, strikes: u32) -> Duration {
    let base = rtt
        .unwrap_or(DEFAULT_RTT)
        .saturating_mul(2)
        .max(BACKOFF_MIN);
    let doublings = strikes.saturating_sub(1).min(16);
    base.saturating_mul(1 << doublings).min(BACKOFF_MAX)
}
/// A fetch with no chunk stored for this long fails: neither the peers
/// (requests time out after [`REQUEST_TIMEOUT`]) nor the origin (its requests
/// time out and are tried [`ORIGIN_ATTEMPTS`] times) are delivering, and the
/// caller is told instead of waiting forever.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fetch waits for the members' bitfields before its first
/// origin request: one round trip is enough to learn what the group holds;
/// without the wait every node of a group that starts together fetches its
/// first chunks from the origin blind.
pub const ORIGIN_GRACE: Duration = Duration::from_millis(300);
/// A fetch that has had nothing to do for this long (no chunk stored, no
/// peer request in flight) may take from the origin chunks that another
/// fetcher is due to get there but has not claimed: that fetcher may be slow
/// or gone, and a second of idling is a small cost next to waiting on it.
pub const ORIGIN_IDLE: Duration = Duration::from_millis(1000);
/// Origin attempts per chunk before the fetch fails.
pub const ORIGIN_ATTEMPTS: u32 = 4;

/// Where one chunk of a fetch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkState {
    Missing,
    /// Asked of this peer.
    Peer(NodeId),
    /// Asked of the origin.
    Origin,
    /// Checked, being written to the cache.
    Storing,
    Done,
}

/// What the actor is to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `msg` (a `Have` or a `Claim`) to `peer`; dropping it when the
    /// peer's queue is full is fine.
    Send { peer: NodeId, msg: Msg },
    /// Send `Request { req, hash }` to `peer`; if it cannot be queued, say
    /// so with [`Scheduler::unsent`].
    Request {
        peer: NodeId,
        req: u32,
        hash: Hash32,
    },
    /// Get chunk `index` of `content` from the origin; the result goes to
    /// [`Scheduler::origin_chunk`].
    FetchOrigin {
        content: Hash32,
        index: u32,
        hash: Hash32,
    },
    /// Write a checked chunk to the cache; the outcome goes to
    /// [`Scheduler::stored`].
    Store { hash: Hash32, data: Bytes },
    /// Every chunk of `content` is stored: write the file, then call
    /// [`Scheduler::finish`].
    Assemble { content: Hash32 },
    /// `peer` is refused for the rest of the fetch of `content` (a bad
    /// chunk, a chunk index past the end, or snubbed for failing requests).
    Refused {
        peer: NodeId,
        content: Hash32,
        kind: RefusalKind,
        reason: String,
    },
    /// The fetch failed (it is gone from the scheduler).
    Failed { content: Hash32, reason: String },
}

/// What a peer's message did.
#[must_use]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handled {
    /// Something changed that scheduling should look at.
    pub reschedule: bool,
    /// The message was malformed or unexpected (the actor counts it).
    pub dropped: Option<&'static str>,
    /// The message was the first bitfield from this peer for its content
    /// (the actor answers it with this node's own).
    pub first_bitfield: bool,
}

impl Handled {
    const NOTHING: Self = Self {
        reschedule: false,
        dropped: None,
        first_bitfield: false,
    };
    const CHANGED: Self = Self {
        reschedule: true,
        dropped: None,
        first_bitfield: false,
    };

    fn dropped(why: &'static str) -> Self {
        Self {
            dropped: Some(why),
            ..Self::NOTHING
        }
    }
}

/// Why a peer was refused for the rest of a fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub reason: String,
}

/// What one peer delivered in a fetch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    pub bytes: u64,
    pub chunks: u32,
}

/// The counters of one fetch, for its report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchStats {
    pub started: Instant,
    pub from_origin: u64,
    pub from_peers: BTreeMap<NodeId, Delivered>,
    /// Bytes in the cache when the fetch started.
    pub cached: u64,
    /// Chunks that failed their hash check (from peers or the origin).
    pub bad_chunks: u64,
    /// Peer requests given up (timed out, turned down, abandoned).
    pub retried: u64,
    /// Peer requests answered `Busy`.
    pub busy: u64,
    /// Peer requests given up because the peer sent nothing in time.
    pub timed_out: u64,
    /// Peers refused for the rest of the fetch, with why.
    pub refused: BTreeMap<NodeId, Refusal>,
}

/// Why a peer request did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Busy,
    NotHere,
    /// Nothing from the peer for [`request_timeout`], or the request is
    /// older than [`REQUEST_TIMEOUT`].
    Timeout,
    /// A piece that does not fit the chunk asked for.
    OutOfPlace,
    /// No fault of the peer's: it left, or it was refused for something
    /// else.
    Dropped,
}

/// How one peer has done in one fetch.
#[derive(Clone, Debug, Default)]
struct Health {
    /// Failures since the last chunk it delivered.
    strikes: u32,
    /// Failures in the whole fetch.
    failures: u32,
    busy: u32,
    not_here: u32,
    timeouts: u32,
    out_of_place: u32,
    /// No request before this (backing off after a strike).
    not_until: Option<Instant>,
}

impl Health {
    fn backing_off(&self, now: Instant) -> bool {
        self.not_until.is_some_and(|t| now < t)
    }

    /// Backing off after a whole pipeline of failures in a row: what it has
    /// or claims no longer holds the origin off (one failure does not: a
    /// good peer that turned one request down would hand the origin a share
    /// of the fetch).
    fn unreliable(&self, now: Instant) -> bool {
        self.backing_off(now) && self.strikes >= PIPELINE as u32
    }

    fn describe(&self) -> String {
        format!(
            "{} requests failed ({} in a row with no chunk delivered): {} busy, {} timed out, {} not there, {} out of place",
            self.failures, self.strikes, self.busy, self.timeouts, self.not_here, self.out_of_place
        )
    }
}

/// What this node knows of one peer.
struct PeerView {
    bitfields: HashMap<Hash32, Bits>,
    /// When the peer first claimed each chunk (claims again do not extend
    /// it).
    claims: HashMap<Hash32, HashMap<u32, Instant>>,
    /// [`node_key`] of the peer.
    key: u64,
    /// The link's round trip, as the node measures it.
    rtt: Option<Duration>,
    /// When a piece of data last came from the peer (for any request).
    last_data: Option<Instant>,
}

struct Outstanding {
    peer: NodeId,
    content: Hash32,
    index: u32,
    sent: Instant,
    /// The chunk's length.
    expected: u32,
    buf: BytesMut,
}

struct Fetch {
    manifest: Arc<Published>,
    has_origin: bool,
    state: Vec<ChunkState>,
    have: Bits,
    /// Chunks that were in the cache when the fetch started.
    from_cache: Bits,
    /// Chunks the origin may serve although a peer has or claims them (a
    /// peer was slow).
    origin_ok: Vec<bool>,
    origin_attempts: Vec<u32>,
    origin_inflight: usize,
    peer_inflight: HashMap<NodeId, usize>,
    health: HashMap<NodeId, Health>,
    stats: FetchStats,
    last_progress: Instant,
    assembling: bool,
}

/// The state machine (see the module docs).
pub struct Scheduler {
    /// This node's [`node_key`].
    me: u64,
    rng: StdRng,
    peers: BTreeMap<NodeId, PeerView>,
    fetches: BTreeMap<Hash32, Fetch>,
    outstanding: BTreeMap<u32, Outstanding>,
    next_req: u32,
    actions: VecDeque<Action>,
}

/// A node's seat in the origin share-out: from its id.
pub fn node_key(id: &NodeId) -> u64 {
    let h = blake3::hash(id.to_string().as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Rendezvous hashing: of the nodes fetching a content, the one with the
/// lowest rank for a chunk gets it from the origin; the others wait for it to
/// come through the mesh. Every node computes the same answer from the same
/// set, so each chunk leaves the origin about once without any message
/// exchanged for it; a fetcher that does not deliver is covered by the claim
/// TTL, request timeouts and [`ORIGIN_IDLE`].
pub fn rank(node: u64, content: &Hash32, index: u32) -> u64 {
    let c = u64::from_le_bytes(content[..8].try_into().expect("8 bytes"));
    let mut x = node ^ c ^ (u64::from(index)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Scheduler {
    /// The scheduler of node `me`; `seed` drives the random choices among
    /// equally good chunks.
    pub fn new(me: NodeId, seed: u64) -> Self {
        Self {
            me: node_key(&me),
            rng: StdRng::seed_from_u64(seed),
            peers: BTreeMap::new(),
            fetches: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            next_req: 1,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    // ----- fetches -----

    /// Starts fetching `manifest` (`cached` tells which chunks the cache
    /// holds already; `has_origin`, whether an origin is known); false if it
    /// is being fetched already. A fetch whose chunks are all cached goes
    /// straight to [`Action::Assemble`].
    pub fn start(
        &mut self,
        now: Instant,
        manifest: Arc<Published>,
        has_origin: bool,
        cached: impl Fn(&Hash32) -> bool,
    ) -> bool {
        let id = *manifest.id();
        if self.fetches.contains_key(&id) {
            return false;
        }
        let n = manifest.count() as usize;
        let mut f = Fetch {
            manifest: manifest.clone(),
            has_origin,
            state: vec![ChunkState::Missing; n],
            have: Bits::new(n as u32),
            from_cache: Bits::new(n as u32),
            origin_ok: vec![false; n],
            origin_attempts: vec![0; n],
            origin_inflight: 0,
            peer_inflight: HashMap::new(),
            health: HashMap::new(),
            stats: FetchStats {
                started: now,
                from_origin: 0,
                from_peers: BTreeMap::new(),
                cached: 0,
                bad_chunks: 0,
                retried: 0,
                busy: 0,
                timed_out: 0,
                refused: BTreeMap::new(),
            },
            last_progress: now,
            assembling: false,
        };
        for (i, h) in manifest.chunks.iter().enumerate() {
            if cached(h) {
                f.state[i] = ChunkState::Done;
                f.have.set(i as u32);
                f.from_cache.set(i as u32);
                f.stats.cached += u64::from(manifest.chunk_len(i as u32));
            }
        }
        if f.have.is_full() {
            f.assembling = true;
            self.actions.push_back(Action::Assemble { content: id });
        }
        self.fetches.insert(id, f);
        true
    }

    pub fn is_fetching(&self, content: &Hash32) -> bool {
        self.fetches.contains_key(content)
    }

    /// The contents being fetched.
    pub fn fetching(&self) -> Vec<Hash32> {
        self.fetches.keys().copied().collect()
    }

    /// The chunks of a fetch that this node holds.
    pub fn have(&self, content: &Hash32) -> Option<&Bits> {
        self.fetches.get(content).map(|f| &f.have)
    }

    /// The chunks of a fetch asked of the origin right now (this node's
    /// claims).
    pub fn origin_claims(&self, content: &Hash32) -> Vec<u32> {
        self.fetches
            .get(content)
            .map(|f| {
                (0..f.state.len() as u32)
                    .filter(|i| f.state[*i as usize] == ChunkState::Origin)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn chunk_state(&self, content: &Hash32, index: u32) -> Option<ChunkState> {
        self.fetches
            .get(content)?
            .state
            .get(index as usize)
            .copied()
    }

    pub fn stats(&self, content: &Hash32) -> Option<&FetchStats> {
        self.fetches.get(content).map(|f| &f.stats)
    }

    /// Where a fetch stands.
    pub fn progress(&self, content: &Hash32) -> Option<FetchProgress> {
        let f = self.fetches.get(content)?;
        let done: u64 = (0..f.have.len())
            .filter(|i| f.have.get(*i))
            .map(|i| u64::from(f.manifest.chunk_len(i)))
            .sum();
        Some(FetchProgress {
            size: f.manifest.size,
            chunks: f.have.len(),
            chunks_done: f.have.count(),
            bytes_done: done,
            bytes_from_origin: f.stats.from_origin,
            bytes_from_peers: f.stats.from_peers.values().map(|d| d.bytes).sum(),
            peers_active: f.peer_inflight.values().filter(|n| **n > 0).count(),
            peers_refused: f.stats.refused.len(),
        })
    }

    /// The fetch is over (its file written, or not): forgets it and its
    /// requests, and hands back its counters.
    pub fn finish(&mut self, content: &Hash32) -> Option<FetchStats> {
        self.outstanding.retain(|_, o| o.content != *content);
        self.fetches.remove(content).map(|f| f.stats)
    }

    fn fail(&mut self, content: Hash32, reason: String) {
        if self.fetches.remove(&content).is_some() {
            self.outstanding.retain(|_, o| o.content != content);
            tracing::warn!(content = %hex::encode(content), error = %reason, "fetch failed");
            self.actions.push_back(Action::Failed { content, reason });
        }
    }

    // ----- peers -----

    fn peer(&mut self, id: NodeId) -> &mut PeerView {
        self.peers.entry(id).or_insert_with(|| PeerView {
            bitfields: HashMap::new(),
            claims: HashMap::new(),
            key: node_key(&id),
            rtt: None,
            last_data: None,
        })
    }

    /// The round trip of the link to `peer` as the node measures it (`None`:
    /// not measured yet); it scales the peer's [`request_timeout`] and
    /// [`backoff`].
    pub fn peer_rtt(&mut self, peer: NodeId, rtt: Option<Duration>) {
        self.peer(peer).rtt = rtt;
    }

    /// How long `peer` may stay silent on a request before it is given up.
    pub fn request_timeout(&self, peer: &NodeId) -> Duration {
        request_timeout(self.peers.get(peer).and_then(|p| p.rtt))
    }

    /// `peer` named a chunk that `content` does not have: refused for the
    /// rest of its fetch (if it is being fetched), and the message dropped.
    fn out_of_range(
        &mut self,
        now: Instant,
        peer: NodeId,
        content: Hash32,
        e: RangeError,
    ) -> Handled {
        if self.fetches.contains_key(&content) {
            self.refuse(now, content, peer, RefusalKind::OutOfRange, e.to_string());
            Handled {
                reschedule: true,
                ..Handled::dropped("chunk index out of range")
            }
        } else {
            Handled::dropped("chunk index out of range")
        }
    }

    /// `peer`'s bitfield for `content`, a content of `chunks` chunks (its
    /// manifest's count: a bitfield of another length is out of range).
    pub fn peer_bitfield(
        &mut self,
        now: Instant,
        peer: NodeId,
        content: Hash32,
        chunks: u32,
        bits: Bits,
    ) -> Handled {
        if let Err(e) = bits.check_len(chunks) {
            return self.out_of_range(now, peer, content, e);
        }
        let first = self.peer(peer).bitfields.insert(content, bits).is_none();
        Handled {
            first_bitfield: first,
            ..Handled::CHANGED
        }
    }

    /// `peer` stored chunk `index` of `content` (of `chunks` chunks).
    pub fn peer_have(
        &mut self,
        now: Instant,
        peer: NodeId,
        content: Hash32,
        chunks: u32,
        index: u32,
    ) -> Handled {
        if let Err(e) = check_index(index, chunks) {
            return self.out_of_range(now, peer, content, e);
        }
        let p = self.peer(peer);
        match p.bitfields.get_mut(&content).map(|b| b.set(index)) {
            Some(true) => {
                if let Some(c) = p.claims.get_mut(&content) {
                    c.remove(&index);
                }
                Handled::CHANGED
            }
            // Its bitfield was of another length (refused then).
            Some(false) => Handled::dropped("have out of range"),
            // No bitfield yet: the bitfield that comes will have it.
            None => Handled::NOTHING,
        }
    }

    /// `peer` is fetching chunk `index` of `content` (of `chunks` chunks)
    /// from the origin. Only its first claim of a chunk counts: claiming it
    /// again does not hold the origin off for longer.
    pub fn peer_claim(
        &mut self,
        now: Instant,
        peer: NodeId,
        content: Hash32,
        chunks: u32,
        index: u32,
    ) -> Handled {
        if let Err(e) = check_index(index, chunks) {
            return self.out_of_range(now, peer, content, e);
        }
        self.peer(peer)
            .claims
            .entry(content)
            .or_default()
            .entry(index)
            .or_insert(now);
        Handled::NOTHING
    }

    /// `peer` turned request `req` down (`not_here`: it does not have the
    /// chunk; else it is busy).
    pub fn peer_reject(&mut self, now: Instant, peer: NodeId, req: u32, not_here: bool) -> Handled {
        if self.outstanding.get(&req).is_none_or(|o| o.peer != peer) {
            return Handled::dropped("reject for no request of ours");
        }
        let o = self.outstanding.remove(&req).expect("checked");
        tracing::debug!(%peer, index = o.index, not_here, "request turned down");
        let why = if not_here {
            Failure::NotHere
        } else {
            Failure::Busy
        };
        self.give_up(now, &o, why);
        Handled::CHANGED
    }

    /// A piece of the chunk of request `req` from `peer`.
    pub fn peer_data(
        &mut self,
        now: Instant,
        peer: NodeId,
        req: u32,
        offset: u32,
        total: u32,
        bytes: Bytes,
    ) -> Handled {
        let Some(o) = self.outstanding.get_mut(&req).filter(|o| o.peer == peer) else {
            return Handled::dropped("data for no request of ours");
        };
        if total != o.expected || offset as usize != o.buf.len() {
            let o = self.outstanding.remove(&req).expect("checked");
            self.give_up(now, &o, Failure::OutOfPlace);
            return Handled {
                reschedule: true,
                ..Handled::dropped("data out of place")
            };
        }
        o.buf.extend_from_slice(&bytes);
        let done = o.buf.len() >= total as usize;
        self.peer(peer).last_data = Some(now);
        if !done {
            return Handled::NOTHING;
        }
        let mut o = self.outstanding.remove(&req).expect("checked");
        let data = std::mem::take(&mut o.buf).freeze();
        let content = o.content;
        let Some(f) = self.fetches.get_mut(&content) else {
            return Handled::NOTHING;
        };
        if let Some(n) = f.peer_inflight.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
        let i = o.index as usize;
        let hash = f.manifest.chunks[i];
        if *blake3::hash(&data).as_bytes() != hash {
            f.stats.bad_chunks += 1;
            if f.state[i] == ChunkState::Peer(peer) {
                f.state[i] = ChunkState::Missing;
            }
            let reason = format!("chunk {} failed its BLAKE3 check", o.index);
            self.refuse(now, content, peer, RefusalKind::BadChunk, reason);
            return Handled::CHANGED;
        }
        f.health.entry(peer).or_default().strikes = 0;
        let d = f.stats.from_peers.entry(peer).or_default();
        d.bytes += data.len() as u64;
        d.chunks += 1;
        f.state[i] = ChunkState::Storing;
        self.actions.push_back(Action::Store { hash, data });
        Handled::CHANGED
    }

    /// `peer` left the group: its requests are given up and what it had is
    /// forgotten.
    pub fn peer_gone(&mut self, now: Instant, peer: NodeId) {
        self.peers.remove(&peer);
        let reqs: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.peer == peer)
            .map(|(r, _)| *r)
            .collect();
        for r in reqs {
            let o = self.outstanding.remove(&r).expect("listed");
            self.give_up(now, &o, Failure::Dropped);
        }
    }

    /// The [`Action::Request`] `req` could not be queued to its peer: as if
    /// it had never been made.
    pub fn unsent(&mut self, req: u32) {
        let Some(o) = self.outstanding.remove(&req) else {
            return;
        };
        if let Some(f) = self.fetches.get_mut(&o.content) {
            if let Some(n) = f.peer_inflight.get_mut(&o.peer) {
                *n = n.saturating_sub(1);
            }
            if f.state[o.index as usize] == ChunkState::Peer(o.peer) {
                f.state[o.index as usize] = ChunkState::Missing;
            }
        }
    }

    /// Refuses `peer` for the rest of the fetch of `content` (once): its
    /// bitfield and claims count for nothing there any more, and its other
    /// requests of that fetch are given up.
    fn refuse(
        &mut self,
        now: Instant,
        content: Hash32,
        peer: NodeId,
        kind: RefusalKind,
        reason: String,
    ) {
        let Some(f) = self.fetches.get_mut(&content) else {
            return;
        };
        if f.stats.refused.contains_key(&peer) {
            return;
        }
        f.stats.refused.insert(
            peer,
            Refusal {
                kind,
                reason: reason.clone(),
            },
        );
        self.actions.push_back(Action::Refused {
            peer,
            content,
            kind,
            reason,
        });
        let abandoned: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, x)| x.peer == peer && x.content == content)
            .map(|(r, _)| *r)
            .collect();
        for r in abandoned {
            let x = self.outstanding.remove(&r).expect("listed");
            self.give_up(now, &x, Failure::Dropped);
        }
    }

    /// A request to a peer that will not complete: the chunk is up for
    /// scheduling again, and the peer takes a strike unless it was not its
    /// fault (snubbed after too many).
    fn give_up(&mut self, now: Instant, o: &Outstanding, why: Failure) {
        let Some(f) = self.fetches.get_mut(&o.content) else {
            return;
        };
        if let Some(n) = f.peer_inflight.get_mut(&o.peer) {
            *n = n.saturating_sub(1);
        }
        let i = o.index as usize;
        if f.state[i] == ChunkState::Peer(o.peer) {
            f.state[i] = ChunkState::Missing;
        }
        f.stats.retried += 1;
        let view = self.peers.get_mut(&o.peer);
        let rtt = view.as_ref().and_then(|p| p.rtt);
        match why {
            Failure::Busy => {
                f.stats.busy += 1;
                // Its holders may all be busy: the origin may take it.
                f.origin_ok[i] = true;
            }
            Failure::Timeout => {
                f.stats.timed_out += 1;
                f.origin_ok[i] = true;
            }
            Failure::NotHere => {
                // The peer's bitfield was wrong (or it lost the chunk): forget it has it.
                if let Some(b) = view.and_then(|p| p.bitfields.get_mut(&o.content)) {
                    b.clear(o.index);
                }
            }
            Failure::OutOfPlace | Failure::Dropped => {}
        }
        if why == Failure::Dropped {
            return;
        }
        let h = f.health.entry(o.peer).or_default();
        h.strikes += 1;
        h.failures += 1;
        match why {
            Failure::Busy => h.busy += 1,
            Failure::NotHere => h.not_here += 1,
            Failure::Timeout => h.timeouts += 1,
            Failure::OutOfPlace => h.out_of_place += 1,
            Failure::Dropped => {}
        }
        h.not_until = Some(now + backoff(rtt, h.strikes));
        if h.strikes < MAX_STRIKES && h.failures < MAX_FAILURES {
            return;
        }
        let kind = match why {
            Failure::Busy => RefusalKind::Busy,
            Failure::Timeout => RefusalKind::Unresponsive,
            _ => RefusalKind::Failing,
        };
        let reason = format!("snubbed: {}", h.describe());
        tracing::info!(peer = %o.peer, %reason, "snubbing a peer for the rest of the fetch");
        self.refuse(now, o.content, o.peer, kind, reason);
    }

    /// Peers that want `content` (their bitfield is not full): they get our
    /// `Have`s and `Claim`s.
    fn interested(&self, content: &Hash32) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.bitfields.get(content).is_some_and(|b| !b.is_full()))
            .map(|(id, _)| *id)
            .collect()
    }

    // ----- origin and disk -----

    /// The origin's answer for chunk `index` of `content`; false if the
    /// fetch is gone.
    pub fn origin_chunk(
        &mut self,
        content: Hash32,
        index: u32,
        data: Result<Bytes, String>,
    ) -> bool {
        let Some(f) = self.fetches.get_mut(&content) else {
            return false;
        };
        f.origin_inflight = f.origin_inflight.saturating_sub(1);
        let i = index as usize;
        let hash = f.manifest.chunks[i];
        match data {
            Ok(d) if *blake3::hash(&d).as_bytes() == hash => {
                f.stats.from_origin += d.len() as u64;
                f.state[i] = ChunkState::Storing;
                self.actions.push_back(Action::Store { hash, data: d });
            }
            other => {
                let why = match other {
                    Ok(_) => {
                        f.stats.bad_chunks += 1;
                        "the origin's chunk fails its hash".to_string()
                    }
                    Err(e) => e,
                };
                tracing::warn!(index, error = %why, "origin chunk");
                f.state[i] = ChunkState::Missing;
                f.origin_attempts[i] += 1;
                if f.origin_attempts[i] >= ORIGIN_ATTEMPTS {
                    self.fail(
                        content,
                        format!(
                            "chunk {index}: {ORIGIN_ATTEMPTS} origin attempts failed; last: {why}"
                        ),
                    );
                }
            }
        }
        true
    }

    /// A chunk reached the cache (`ok`) or failed to: every fetch that
    /// needs it moves on.
    pub fn stored(&mut self, now: Instant, hash: Hash32, ok: bool) {
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
                f.last_progress = now;
                haves.push((*id, i as u32));
            }
            if f.have.is_full() && !f.assembling {
                f.assembling = true;
                complete.push(*id);
            }
        }
        for (content, index) in haves {
            for peer in self.interested(&content) {
                self.actions.push_back(Action::Send {
                    peer,
                    msg: Msg::Have { content, index },
                });
            }
        }
        for content in complete {
            self.actions.push_back(Action::Assemble { content });
        }
    }

    /// A chunk the cache held is gone (found damaged and removed): every
    /// fetch that counted it as done needs it again, and one that was
    /// assembling goes back to fetching. False if no fetch needed it.
    pub fn lost(&mut self, now: Instant, hash: Hash32) -> bool {
        let mut any = false;
        for f in self.fetches.values_mut() {
            for (i, h) in f.manifest.chunks.iter().enumerate() {
                if *h == hash && f.state[i] == ChunkState::Done {
                    f.state[i] = ChunkState::Missing;
                    f.have.clear(i as u32);
                    if f.from_cache.get(i as u32) {
                        f.from_cache.clear(i as u32);
                        f.stats.cached -= u64::from(f.manifest.chunk_len(i as u32));
                    }
                    f.assembling = false;
                    f.last_progress = now;
                    any = true;
                }
            }
        }
        any
    }

    // ----- time -----

    /// Gives up peer requests on which their peer has been silent for its
    /// [`request_timeout`] or that are older than [`REQUEST_TIMEOUT`], and
    /// fails fetches stalled for [`STALL_TIMEOUT`].
    pub fn tick(&mut self, now: Instant) {
        let late: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, o)| {
                let p = self.peers.get(&o.peer);
                let heard = p
                    .and_then(|p| p.last_data)
                    .map_or(o.sent, |t| t.max(o.sent));
                let silent = request_timeout(p.and_then(|p| p.rtt));
                now.saturating_duration_since(heard) > silent
                    || now.saturating_duration_since(o.sent) > REQUEST_TIMEOUT
            })
            .map(|(r, _)| *r)
            .collect();
        for r in late {
            let o = self.outstanding.remove(&r).expect("listed");
            tracing::info!(peer = %o.peer, index = o.index, "peer request timed out; the chunk may now come from the origin");
            self.give_up(now, &o, Failure::Timeout);
        }
        let stalled: Vec<(Hash32, String)> = self
            .fetches
            .iter()
            .filter(|(_, f)| {
                !f.assembling && now.saturating_duration_since(f.last_progress) > STALL_TIMEOUT
            })
            .map(|(id, f)| {
                let why = format!(
                    "no chunk arrived for {STALL_TIMEOUT:?} ({} of {} done; origin {})",
                    f.have.count(),
                    f.have.len(),
                    if f.has_origin { "known" } else { "unknown" }
                );
                (*id, why)
            })
            .collect();
        for (content, why) in stalled {
            self.fail(content, why);
        }
    }

    /// Hands out requests to peers and the origin. `alone`: the group has no
    /// other member (no bitfields to wait for).
    pub fn schedule(&mut self, now: Instant, alone: bool) {
        for content in self.fetching() {
            self.schedule_peers(now, content);
            self.schedule_origin(now, content, alone);
        }
    }

    fn schedule_peers(&mut self, now: Instant, content: Hash32) {
        let Some(f) = self.fetches.get(&content) else {
            return;
        };
        if f.assembling {
            return;
        }
        // Usable holders: peers with a bitfield for it, not refused, not
        // backing off.
        let holders: Vec<(NodeId, &Bits)> = self
            .peers
            .iter()
            .filter(|(id, _)| !f.stats.refused.contains_key(id))
            .filter(|(id, _)| !f.health.get(id).is_some_and(|h| h.backing_off(now)))
            .filter_map(|(id, p)| p.bitfields.get(&content).map(|b| (*id, b)))
            .collect();
        if holders.is_empty() {
            return;
        }
        let mut load: HashMap<NodeId, usize> = holders
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
        wanted.shuffle(&mut self.rng);
        wanted.sort_by_key(|(avail, _)| *avail);
        let mut plan: Vec<(NodeId, u32)> = Vec::new();
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
            let f = self.fetches.get_mut(&content).expect("present");
            let hash = f.manifest.chunks[index as usize];
            f.state[index as usize] = ChunkState::Peer(peer);
            *f.peer_inflight.entry(peer).or_insert(0) += 1;
            let expected = f.manifest.chunk_len(index);
            self.outstanding.insert(
                req,
                Outstanding {
                    peer,
                    content,
                    index,
                    sent: now,
                    expected,
                    buf: BytesMut::with_capacity(expected as usize),
                },
            );
            self.actions.push_back(Action::Request { peer, req, hash });
        }
    }

    fn schedule_origin(&mut self, now: Instant, content: Hash32, alone: bool) {
        let me = self.me;
        let Some(f) = self.fetches.get(&content) else {
            return;
        };
        if !f.has_origin || f.assembling || f.origin_inflight >= ORIGIN_PARALLEL {
            return;
        }
        if now.saturating_duration_since(f.stats.started) < ORIGIN_GRACE && !alone {
            return;
        }
        let usable: Vec<(&NodeId, &PeerView)> = self
            .peers
            .iter()
            .filter(|(id, _)| !f.stats.refused.contains_key(id))
            .collect();
        // The other fetchers of this content, for the origin share-out.
        let fetchers: Vec<u64> = usable
            .iter()
            .filter(|(_, p)| p.bitfields.get(&content).is_some_and(|b| !b.is_full()))
            .map(|(_, p)| p.key)
            .collect();
        // Who may deliver a chunk soon: a peer backing off after a whole
        // pipeline of failures does not hold the origin off.
        let ready: Vec<&PeerView> = usable
            .iter()
            .filter(|(id, _)| !f.health.get(id).is_some_and(|h| h.unreliable(now)))
            .map(|(_, p)| *p)
            .collect();
        let idle = now.saturating_duration_since(f.last_progress) > ORIGIN_IDLE
            && f.peer_inflight.values().all(|n| *n == 0);
        let mut candidates: Vec<u32> = (0..f.state.len() as u32)
            .filter(|i| f.state[*i as usize] == ChunkState::Missing)
            .filter(|i| {
                if f.origin_ok[*i as usize] {
                    return true;
                }
                let someone = ready.iter().any(|p| {
                    p.bitfields.get(&content).is_some_and(|b| b.get(*i))
                        || p.claims
                            .get(&content)
                            .and_then(|c| c.get(i))
                            .is_some_and(|t| now.saturating_duration_since(*t) < CLAIM_TTL)
                });
                let mine = fetchers
                    .iter()
                    .all(|k| rank(me, &content, *i) <= rank(*k, &content, *i));
                !someone && (mine || idle)
            })
            .collect();
        candidates.shuffle(&mut self.rng);
        candidates.truncate(ORIGIN_PARALLEL - f.origin_inflight);
        for index in candidates {
            let f = self.fetches.get_mut(&content).expect("present");
            f.state[index as usize] = ChunkState::Origin;
            f.origin_inflight += 1;
            let hash = f.manifest.chunks[index as usize];
            for peer in self.interested(&content) {
                self.actions.push_back(Action::Send {
                    peer,
                    msg: Msg::Claim { content, index },
                });
            }
            self.actions.push_back(Action::FetchOrigin {
                content,
                index,
                hash,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use std::collections::BTreeSet;

    /// Bytes per chunk of the test manifests.
    const LEN: u64 = 8;

    fn node(k: u8) -> NodeId {
        NodeId::from_bytes(&[0, 36, 8, 1, 18, 32, k]).unwrap()
    }

    /// Chunk `i` of the test content `content` (distinct for every `i`).
    fn chunk(content: u8, i: u32) -> Bytes {
        let mut v = vec![content ^ (i as u8).wrapping_mul(7); LEN as usize];
        v[4..8].copy_from_slice(&i.to_le_bytes());
        Bytes::from(v)
    }

    /// A manifest of `n` chunks of [`LEN`] bytes, chunk `i` being [`chunk`]`(tag, i)`.
    fn manifest(tag: u8, n: u32) -> Arc<Published> {
        let chunks: Vec<Hash32> = (0..n)
            .map(|i| *blake3::hash(&chunk(tag, i)).as_bytes())
            .collect();
        Arc::new(Published::new(Manifest {
            version: 1,
            name: format!("t{tag}"),
            size: u64::from(n) * LEN,
            chunk_size: LEN,
            hash: "blake3".into(),
            file_hash: [tag; 32],
            chunks,
        }))
    }

    fn bits(n: u32, set: impl IntoIterator<Item = u32>) -> Bits {
        let mut b = Bits::new(n);
        for i in set {
            assert!(b.set(i));
        }
        b
    }

    /// A scheduler on a virtual clock.
    struct World {
        s: Scheduler,
        t0: Instant,
        now: Instant,
    }

    impl World {
        fn new(me: NodeId) -> Self {
            let t0 = Instant::now();
            Self {
                s: Scheduler::new(me, 7),
                t0,
                now: t0,
            }
        }

        fn at(&mut self, ms: u64) -> Instant {
            self.now = self.t0 + Duration::from_millis(ms);
            self.now
        }

        fn drain(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.s.poll_action()).collect()
        }

        fn schedule(&mut self, alone: bool) -> Vec<Action> {
            self.s.schedule(self.now, alone);
            self.drain()
        }

        fn tick(&mut self) -> Vec<Action> {
            self.s.tick(self.now);
            self.drain()
        }

        /// `peer`'s bitfield, of the right length unless the test says otherwise.
        fn bitfield(&mut self, peer: NodeId, content: Hash32, b: Bits) -> Handled {
            let n = self.s.have(&content).map_or(b.len(), |h| h.len());
            self.s.peer_bitfield(self.now, peer, content, n, b)
        }

        fn have(&mut self, peer: NodeId, content: Hash32, index: u32) -> Handled {
            let n = self.s.have(&content).unwrap().len();
            self.s.peer_have(self.now, peer, content, n, index)
        }

        fn claim(&mut self, peer: NodeId, content: Hash32, index: u32) -> Handled {
            let n = self.s.have(&content).unwrap().len();
            self.s.peer_claim(self.now, peer, content, n, index)
        }

        /// Stores every `Store` in `actions` successfully; the actions that follow.
        fn store_all(&mut self, actions: &[Action]) -> Vec<Action> {
            for a in actions {
                if let Action::Store { hash, .. } = a {
                    self.s.stored(self.now, *hash, true);
                }
            }
            self.drain()
        }
    }

    fn requests(actions: &[Action]) -> Vec<(NodeId, u32, Hash32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Request { peer, req, hash } => Some((*peer, *req, *hash)),
                _ => None,
            })
            .collect()
    }

    fn origin_fetches(actions: &[Action]) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::FetchOrigin { index, .. } => Some(*index),
                _ => None,
            })
            .collect()
    }

    fn index_of(m: &Published, hash: &Hash32) -> u32 {
        m.chunks.iter().position(|h| h == hash).unwrap() as u32
    }

    /// Delivers request `req` of chunk `index` from `peer` in two pieces.
    fn deliver(w: &mut World, peer: NodeId, req: u32, tag: u8, index: u32) -> Vec<Action> {
        let data = chunk(tag, index);
        let total = data.len() as u32;
        let h = w.s.peer_data(w.now, peer, req, 0, total, data.slice(..3));
        assert_eq!(h, Handled::NOTHING);
        let h = w.s.peer_data(w.now, peer, req, 3, total, data.slice(3..));
        assert_eq!(h, Handled::CHANGED);
        w.drain()
    }

    #[test]
    fn rarest_chunks_first_and_at_most_a_pipeline_per_peer() {
        let (a, b) = (node(1), node(2));
        let m = manifest(1, 10);
        let id = *m.id();
        let mut w = World::new(node(0));
        assert!(w.s.start(w.now, m.clone(), false, |_| false));
        // a has everything, b the first six: 6..9 are the rare ones.
        let _ = w.bitfield(a, id, bits(10, 0..10));
        let _ = w.bitfield(b, id, bits(10, 0..6));
        let actions = w.schedule(false);
        let reqs = requests(&actions);
        assert_eq!(reqs.len(), 2 * PIPELINE, "{actions:?}");
        let indices: Vec<u32> = reqs.iter().map(|(_, _, h)| index_of(&m, h)).collect();
        // Asked in order of rarity: the four only `a` has, then common ones.
        let first: BTreeSet<u32> = indices[..4].iter().copied().collect();
        assert_eq!(first, BTreeSet::from([6, 7, 8, 9]));
        for (p, _, h) in &reqs {
            if index_of(&m, h) >= 6 {
                assert_eq!(*p, a);
            } else {
                assert_eq!(*p, b, "a's pipeline is full");
            }
        }
        // Two common chunks wait for room.
        let waiting = (0..10)
            .filter(|i| w.s.chunk_state(&id, *i) == Some(ChunkState::Missing))
            .count();
        assert_eq!(waiting, 2);
        assert!(w.schedule(false).is_empty(), "no room: nothing more");
        // One chunk from b frees one slot of b's.
        let (_, req, h) = reqs.iter().find(|(p, _, _)| *p == b).copied().unwrap();
        let done = deliver(&mut w, b, req, 1, index_of(&m, &h));
        assert!(matches!(&done[..], [Action::Store { .. }]), "{done:?}");
        let more = requests(&w.schedule(false));
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].0, b);
        assert_eq!(w.s.progress(&id).unwrap().peers_active, 2);
    }

    #[test]
    fn rarest_first_holds_for_any_seed() {
        for seed in 0..32 {
            let m = manifest(2, 12);
            let id = *m.id();
            let mut s = Scheduler::new(node(0), seed);
            let now = Instant::now();
            s.start(now, m.clone(), false, |_| false);
            // Chunk i is held by (i % 4) + 1 of the four peers.
            for p in 0..4u8 {
                let have = (0..12).filter(|i| (i % 4) as u8 >= p);
                let _ = s.peer_bitfield(now, node(10 + p), id, 12, bits(12, have));
            }
            s.schedule(now, false);
            let order: Vec<usize> = std::iter::from_fn(|| s.poll_action())
                .filter_map(|a| match a {
                    Action::Request { hash, .. } => Some(index_of(&m, &hash) as usize % 4),
                    _ => None,
                })
                .collect();
            assert_eq!(order.len(), 12, "seed {seed}");
            assert!(
                order.windows(2).all(|w| w[0] <= w[1]),
                "seed {seed}: {order:?}"
            );
        }
    }

    #[test]
    fn a_timed_out_request_moves_to_a_less_busy_peer() {
        let (a, b) = (node(1), node(2));
        let m = manifest(3, 5);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), false, |_| false);
        let _ = w.bitfield(a, id, bits(5, [0]));
        let first = requests(&w.schedule(false));
        assert_eq!(first.len(), 1);
        assert_eq!(w.s.chunk_state(&id, 0), Some(ChunkState::Peer(a)));
        // A second later a has three more (its pipeline fills) and b has chunk 0.
        w.at(1000);
        for i in 1..4 {
            assert_eq!(w.have(a, id, i), Handled::CHANGED);
        }
        let _ = w.bitfield(b, id, bits(5, [0]));
        assert_eq!(requests(&w.schedule(false)).len(), 3);
        // a's link has measured no round trip: the default one scales its timeout.
        let t = w.s.request_timeout(&a);
        assert_eq!(t, DEFAULT_RTT * SILENCE_RTTS + SILENCE_SLACK);
        let t = t.as_millis() as u64;
        // Just before the timeout nothing moves.
        w.at(t);
        assert!(w.tick().is_empty());
        assert!(w.schedule(false).is_empty());
        w.at(t + 1);
        assert!(w.tick().is_empty());
        assert_eq!(w.s.chunk_state(&id, 0), Some(ChunkState::Missing));
        assert_eq!(w.s.stats(&id).unwrap().retried, 1);
        let again = requests(&w.schedule(false));
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].0, index_of(&m, &again[0].2)), (b, 0));
        // The late answer of a is not taken.
        let late =
            w.s.peer_data(w.now, a, first[0].1, 0, LEN as u32, chunk(3, 0));
        assert_eq!(late.dropped, Some("data for no request of ours"));
    }

    #[test]
    fn a_timed_out_chunk_goes_to_the_origin_when_its_holders_are_busy() {
        let (a, b) = (node(1), node(2));
        let m = manifest(4, 9);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), true, |_| false);
        let _ = w.bitfield(a, id, bits(9, [0]));
        assert_eq!(requests(&w.schedule(false)).len(), 1);
        // Later: a has 1..3, b has 0 and 4..7 (both pipelines fill) and
        // claims 8, which nobody has yet.
        w.at(1000);
        for i in [1, 2, 3] {
            let _ = w.have(a, id, i);
        }
        let _ = w.bitfield(b, id, bits(9, [0, 4, 5, 6, 7]));
        let _ = w.claim(b, id, 8);
        let actions = w.schedule(false);
        assert_eq!(requests(&actions).len(), 7);
        assert!(
            origin_fetches(&actions).is_empty(),
            "everything is at a peer or claimed"
        );
        // Then a has 8 too, but no room for it.
        w.at(1500);
        assert_eq!(w.have(a, id, 8), Handled::CHANGED);
        assert!(w.schedule(false).is_empty());
        assert_eq!(w.s.chunk_state(&id, 8), Some(ChunkState::Missing));
        // Chunk 0 times out at a (the others sent later have not yet): a
        // backs off, b is full, so chunk 0 goes to the origin although both
        // have it; chunk 8 waits for a (b's claim holds the origin off).
        let t = w.s.request_timeout(&a).as_millis() as u64;
        w.at(t + 500);
        w.tick();
        let actions = w.schedule(false);
        assert!(requests(&actions).is_empty(), "{actions:?}");
        assert_eq!(origin_fetches(&actions), vec![0]);
        assert_eq!(w.s.chunk_state(&id, 0), Some(ChunkState::Origin));
        assert_eq!(w.s.origin_claims(&id), vec![0]);
        // Both peers still want chunks: they hear this node's claim.
        let claims: BTreeSet<NodeId> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Send {
                    peer,
                    msg: Msg::Claim { index: 0, .. },
                } => Some(*peer),
                _ => None,
            })
            .collect();
        assert_eq!(claims, BTreeSet::from([a, b]));
        // Once a's backoff is over, its free slot goes to chunk 8.
        w.at(t + 500 + backoff(None, 1).as_millis() as u64);
        let reqs = requests(&w.schedule(false));
        assert_eq!(reqs.len(), 1);
        assert_eq!((reqs[0].0, index_of(&m, &reqs[0].2)), (a, 8));
    }

    /// Chunks each of `nodes` fetches from the origin when they all fetch
    /// `m` at once, none has anything yet and nobody goes idle.
    fn origin_share(nodes: &[NodeId], me: NodeId, m: &Arc<Published>, tag: u8) -> BTreeSet<u32> {
        let id = *m.id();
        let n = m.count();
        let mut w = World::new(me);
        w.s.start(w.now, m.clone(), true, |_| false);
        for p in nodes.iter().filter(|p| **p != me) {
            let _ = w.bitfield(*p, id, Bits::new(n));
        }
        w.at(ORIGIN_GRACE.as_millis() as u64);
        let mut got = BTreeSet::new();
        let mut actions = w.schedule(false);
        // Chunks keep arriving (every 100 ms), so the fetch never idles.
        let mut t = ORIGIN_GRACE.as_millis() as u64;
        loop {
            let fetched = origin_fetches(&actions);
            if fetched.is_empty() {
                break;
            }
            assert!(fetched.len() <= ORIGIN_PARALLEL);
            t += 100;
            w.at(t);
            for i in fetched {
                assert!(got.insert(i), "chunk {i} twice");
                assert!(w.s.origin_chunk(id, i, Ok(chunk(tag, i))));
            }
            let stored = w.drain();
            w.store_all(&stored);
            actions = w.schedule(false);
        }
        got
    }

    #[test]
    fn the_origin_is_shared_out_among_the_fetchers() {
        let m = manifest(5, 60);
        let nodes = [node(1), node(2), node(3)];
        let shares: Vec<BTreeSet<u32>> = nodes
            .iter()
            .map(|me| origin_share(&nodes, *me, &m, 5))
            .collect();
        // Every chunk leaves the origin exactly once, and each node has a share.
        let mut all = BTreeSet::new();
        for s in &shares {
            assert!(!s.is_empty(), "{shares:?}");
            for i in s {
                assert!(all.insert(*i), "chunk {i} in two shares: {shares:?}");
            }
        }
        assert_eq!(all.len(), 60);
        // Alone, a node takes everything.
        assert_eq!(origin_share(&[node(1)], node(1), &m, 5).len(), 60);
    }

    #[test]
    fn the_origin_waits_for_the_grace_period_unless_alone() {
        let m = manifest(6, 4);
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), true, |_| false);
        assert!(w.schedule(false).is_empty());
        w.at(ORIGIN_GRACE.as_millis() as u64 - 1);
        assert!(w.schedule(false).is_empty());
        assert_eq!(origin_fetches(&w.schedule(true)).len(), ORIGIN_PARALLEL);
        let mut w = World::new(node(0));
        w.s.start(w.now, m, true, |_| false);
        w.at(ORIGIN_GRACE.as_millis() as u64);
        assert_eq!(origin_fetches(&w.schedule(false)).len(), ORIGIN_PARALLEL);
    }

    #[test]
    fn an_idle_fetch_takes_the_other_fetchers_share_and_claims_hold_it_off() {
        let (me, other) = (node(1), node(2));
        let m = manifest(7, 40);
        let id = *m.id();
        let mut w = World::new(me);
        w.s.start(w.now, m.clone(), true, |_| false);
        let _ = w.bitfield(other, id, Bits::new(40));
        let theirs: Vec<u32> = (0..40)
            .filter(|i| rank(node_key(&other), &id, *i) < rank(node_key(&me), &id, *i))
            .collect();
        assert!(!theirs.is_empty());
        // The other fetcher claims one of its chunks; the rest it never gets to.
        let claimed = theirs[0];
        let _ = w.claim(other, id, claimed);
        // Fetch my own share (no chunk comes in meanwhile from anyone).
        let mut t = ORIGIN_GRACE.as_millis() as u64;
        w.at(t);
        let mut actions = w.schedule(false);
        let mut mine = BTreeSet::new();
        while !origin_fetches(&actions).is_empty() {
            for i in origin_fetches(&actions) {
                assert!(!theirs.contains(&i), "chunk {i} is the other's");
                mine.insert(i);
                w.s.origin_chunk(id, i, Ok(chunk(7, i)));
            }
            let stored = w.drain();
            w.store_all(&stored);
            actions = w.schedule(false);
        }
        assert_eq!(mine.len(), 40 - theirs.len());
        // Not idle yet: nothing more.
        t += ORIGIN_IDLE.as_millis() as u64;
        w.at(t);
        assert!(w.schedule(false).is_empty());
        // Idle: the other's unclaimed chunks come from the origin too.
        w.at(t + 1);
        let mut taken = BTreeSet::new();
        let mut actions = w.schedule(false);
        while !origin_fetches(&actions).is_empty() {
            for i in origin_fetches(&actions) {
                taken.insert(i);
                w.s.origin_chunk(id, i, Ok(chunk(7, i)));
            }
            // Stored chunks are progress: the fetch is no longer idle, so
            // nothing is stored here until the end.
            actions = w.schedule(false);
        }
        let unclaimed: BTreeSet<u32> = theirs.iter().copied().filter(|i| *i != claimed).collect();
        assert_eq!(taken, unclaimed);
        // Once the claim is older than its TTL, that chunk goes too.
        w.at(CLAIM_TTL.as_millis() as u64 + 1);
        assert_eq!(origin_fetches(&w.schedule(false)), vec![claimed]);
    }

    /// Runs a fetch to its end from `actions`: every request and origin
    /// fetch is answered with the right bytes 50 ms later. Requests made of
    /// each peer; panics if the fetch has not assembled within a virtual minute.
    fn drive(
        w: &mut World,
        m: &Published,
        tag: u8,
        mut actions: Vec<Action>,
    ) -> BTreeMap<NodeId, usize> {
        let mut asked = BTreeMap::new();
        for _ in 0..1200 {
            let mut next = Vec::new();
            w.now += Duration::from_millis(50);
            for a in actions {
                match a {
                    Action::Request { peer, req, hash } => {
                        *asked.entry(peer).or_default() += 1;
                        next.extend(deliver(w, peer, req, tag, index_of(m, &hash)));
                    }
                    Action::FetchOrigin { content, index, .. } => {
                        assert!(w.s.origin_chunk(content, index, Ok(chunk(tag, index))));
                        next.extend(w.drain());
                    }
                    Action::Store { hash, .. } => {
                        w.s.stored(w.now, hash, true);
                        next.extend(w.drain());
                    }
                    Action::Assemble { .. } => return asked,
                    Action::Failed { reason, .. } => panic!("{reason}"),
                    Action::Send { .. } | Action::Refused { .. } => {}
                }
            }
            next.extend(w.tick());
            next.extend(w.schedule(false));
            actions = next;
        }
        panic!("the fetch did not complete");
    }

    #[test]
    fn a_peer_that_sends_a_bad_chunk_is_refused_for_the_rest_of_the_fetch() {
        let (bad, good) = (node(1), node(2));
        let m = manifest(8, 12);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), true, |_| false);
        // Only `bad` has chunk 11.
        let _ = w.bitfield(bad, id, bits(12, 0..12));
        let _ = w.bitfield(good, id, bits(12, 0..11));
        let reqs = requests(&w.schedule(false));
        let from_bad: Vec<(u32, u32)> = reqs
            .iter()
            .filter(|(p, _, _)| *p == bad)
            .map(|(_, r, h)| (*r, index_of(&m, h)))
            .collect();
        assert_eq!(from_bad.len(), PIPELINE);
        assert!(from_bad.iter().any(|(_, i)| *i == 11), "rarest first");
        let (req, index) = from_bad[0];
        let mut wrong = chunk(8, index).to_vec();
        wrong[0] ^= 0xff;
        let h =
            w.s.peer_data(w.now, bad, req, 0, LEN as u32, Bytes::from(wrong));
        assert_eq!(h, Handled::CHANGED);
        let actions = w.drain();
        assert!(
            matches!(&actions[..], [Action::Refused { peer, .. }] if *peer == bad),
            "{actions:?}"
        );
        let st = w.s.stats(&id).unwrap();
        assert_eq!((st.bad_chunks, st.retried), (1, PIPELINE as u64 - 1));
        assert!(st.refused[&bad].reason.contains("BLAKE3"));
        for (_, i) in &from_bad {
            assert_eq!(w.s.chunk_state(&id, *i), Some(ChunkState::Missing));
        }
        // Its claim on chunk 11 holds nothing off, and nothing more is asked of it.
        let _ = w.claim(bad, id, 11);
        let mut actions: Vec<Action> = reqs
            .iter()
            .filter(|r| r.0 == good)
            .map(|(peer, req, hash)| Action::Request {
                peer: *peer,
                req: *req,
                hash: *hash,
            })
            .collect();
        actions.extend(w.schedule(false));
        let asked = drive(&mut w, &m, 8, actions);
        assert_eq!(asked.keys().copied().collect::<Vec<_>>(), vec![good]);
        assert!(
            w.now - w.t0 < CLAIM_TTL,
            "the refused peer's claim was honoured"
        );
        let st = w.s.finish(&id).unwrap();
        assert!(!st.from_peers.contains_key(&bad));
        assert_eq!(st.from_origin, LEN, "chunk 11 came from the origin");
        assert_eq!(st.refused.len(), 1);
    }

    #[test]
    fn a_fetch_completes_once_with_haves_for_the_interested() {
        let (seed, leecher) = (node(1), node(2));
        let m = manifest(9, 3);
        let id = *m.id();
        let mut w = World::new(node(0));
        // Chunk 1 is cached already.
        let cached = m.chunks[1];
        w.s.start(w.now, m.clone(), false, |h| *h == cached);
        assert_eq!(w.s.have(&id).unwrap().count(), 1);
        let _ = w.bitfield(seed, id, bits(3, 0..3));
        let _ = w.bitfield(leecher, id, Bits::new(3));
        let reqs = requests(&w.schedule(false));
        assert_eq!(reqs.len(), 2);
        let mut assembled = 0;
        for (p, r, h) in reqs {
            let i = index_of(&m, &h);
            let stores = deliver(&mut w, p, r, 9, i);
            let after = w.store_all(&stores);
            // Only the peer that lacks chunks hears about it.
            assert!(after.contains(&Action::Send {
                peer: leecher,
                msg: Msg::Have {
                    content: id,
                    index: i
                }
            }));
            assert!(!after
                .iter()
                .any(|a| matches!(a, Action::Send { peer, .. } if *peer == seed)));
            assembled += after
                .iter()
                .filter(|a| **a == Action::Assemble { content: id })
                .count();
        }
        assert_eq!(assembled, 1);
        let p = w.s.progress(&id).unwrap();
        assert_eq!(
            (p.chunks_done, p.bytes_done, p.bytes_from_peers),
            (3, 24, 16)
        );
        // A stored chunk again (another fetch's copy) does not assemble twice.
        w.s.stored(w.now, m.chunks[0], true);
        assert!(w.drain().is_empty());
        let st = w.s.finish(&id).unwrap();
        assert_eq!((st.cached, st.from_origin), (LEN, 0));
        assert_eq!(
            st.from_peers[&seed],
            Delivered {
                bytes: 16,
                chunks: 2
            }
        );
        assert!(!w.s.is_fetching(&id));
    }

    #[test]
    fn a_fully_cached_fetch_assembles_at_once_and_twice_is_refused() {
        let m = manifest(10, 2);
        let mut w = World::new(node(0));
        assert!(w.s.start(w.now, m.clone(), true, |_| true));
        assert_eq!(w.drain(), vec![Action::Assemble { content: *m.id() }]);
        assert!(!w.s.start(w.now, m.clone(), true, |_| true));
        assert!(w.schedule(true).is_empty(), "nothing to fetch");
    }

    #[test]
    fn rejects_free_the_chunk_and_not_here_clears_the_bit() {
        let (a, b) = (node(1), node(2));
        let m = manifest(11, 2);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), false, |_| false);
        let _ = w.bitfield(a, id, bits(2, [0]));
        let reqs = requests(&w.schedule(false));
        assert_eq!(
            w.s.peer_reject(w.now, b, reqs[0].1, true).dropped,
            Some("reject for no request of ours")
        );
        // Busy: a keeps its bit and is asked again once its backoff is over.
        assert_eq!(
            w.s.peer_reject(w.now, a, reqs[0].1, false),
            Handled::CHANGED
        );
        assert!(w.schedule(false).is_empty(), "a backs off");
        w.at(backoff(None, 1).as_millis() as u64);
        let again = requests(&w.schedule(false));
        assert_eq!(again.len(), 1);
        // Not here: a no longer counts as a holder; b does.
        assert_eq!(
            w.s.peer_reject(w.now, a, again[0].1, true),
            Handled::CHANGED
        );
        assert!(w.schedule(false).is_empty());
        let _ = w.bitfield(b, id, bits(2, [0]));
        assert_eq!(requests(&w.schedule(false))[0].0, b);
        let st = w.s.stats(&id).unwrap();
        assert_eq!((st.retried, st.busy), (2, 1));
    }

    #[test]
    fn data_out_of_place_gives_the_request_up() {
        let a = node(1);
        let m = manifest(12, 1);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), false, |_| false);
        let _ = w.bitfield(a, id, bits(1, [0]));
        let r = requests(&w.schedule(false))[0].1;
        let h =
            w.s.peer_data(w.now, a, r, 4, LEN as u32, chunk(12, 0).slice(..2));
        assert_eq!(
            h,
            Handled {
                reschedule: true,
                dropped: Some("data out of place"),
                first_bitfield: false,
            }
        );
        assert_eq!(w.s.chunk_state(&id, 0), Some(ChunkState::Missing));
        w.at(backoff(None, 1).as_millis() as u64);
        let r = requests(&w.schedule(false))[0].1;
        let h = w.s.peer_data(w.now, a, r, 0, LEN as u32 + 1, chunk(12, 0));
        assert_eq!(h.dropped, Some("data out of place"));
        assert_eq!(w.s.stats(&id).unwrap().retried, 2);
    }

    #[test]
    fn an_unsent_request_is_as_if_never_made() {
        let a = node(1);
        let m = manifest(13, 1);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), false, |_| false);
        let _ = w.bitfield(a, id, bits(1, [0]));
        let r = requests(&w.schedule(false))[0].1;
        w.s.unsent(r);
        assert_eq!(w.s.chunk_state(&id, 0), Some(ChunkState::Missing));
        assert_eq!(w.s.stats(&id).unwrap().retried, 0);
        assert_eq!(w.s.progress(&id).unwrap().peers_active, 0);
        assert_eq!(requests(&w.schedule(false)).len(), 1);
    }

    #[test]
    fn a_peer_that_leaves_gives_its_requests_up() {
        let (a, b) = (node(1), node(2));
        let m = manifest(14, 2);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), false, |_| false);
        let _ = w.bitfield(a, id, bits(2, 0..2));
        assert_eq!(requests(&w.schedule(false)).len(), 2);
        w.s.peer_gone(w.now, a);
        assert_eq!(w.s.stats(&id).unwrap().retried, 2);
        assert!(w.schedule(false).is_empty(), "a's bitfield is forgotten");
        let _ = w.bitfield(b, id, bits(2, 0..2));
        assert!(requests(&w.schedule(false)).iter().all(|r| r.0 == b));
    }

    #[test]
    fn failing_origin_chunks_fail_the_fetch_after_its_attempts() {
        let m = manifest(15, 1);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), true, |_| false);
        for attempt in 1..=ORIGIN_ATTEMPTS {
            assert_eq!(origin_fetches(&w.schedule(true)), vec![0]);
            let data = if attempt == 1 {
                Ok(Bytes::from_static(b"not it"))
            } else {
                Err("status 500".to_string())
            };
            assert!(w.s.origin_chunk(id, 0, data));
            if attempt < ORIGIN_ATTEMPTS {
                assert!(w.drain().is_empty());
                assert_eq!(w.s.stats(&id).unwrap().bad_chunks, 1);
            }
        }
        let actions = w.drain();
        assert!(
            matches!(&actions[..], [Action::Failed { content, reason }] if *content == id && reason.contains("status 500")),
            "{actions:?}"
        );
        assert!(!w.s.is_fetching(&id));
        assert!(!w.s.origin_chunk(id, 0, Err("late".into())));
    }

    #[test]
    fn a_stalled_fetch_fails_and_a_failed_store_is_fetched_again() {
        let m = manifest(16, 2);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), true, |_| false);
        let fetched = origin_fetches(&w.schedule(true));
        assert_eq!(fetched.len(), 2);
        w.s.origin_chunk(id, fetched[0], Ok(chunk(16, fetched[0])));
        let stores = w.drain();
        let [Action::Store { hash, .. }] = &stores[..] else {
            panic!("{stores:?}")
        };
        w.s.stored(w.now, *hash, false);
        assert_eq!(w.s.chunk_state(&id, fetched[0]), Some(ChunkState::Missing));
        w.at(STALL_TIMEOUT.as_millis() as u64);
        assert!(w.tick().is_empty());
        w.at(STALL_TIMEOUT.as_millis() as u64 + 1);
        let actions = w.tick();
        assert!(
            matches!(&actions[..], [Action::Failed { reason, .. }] if reason.contains("0 of 2 done; origin known")),
            "{actions:?}"
        );
    }

    /// How a peer of [`run`] answers a request.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Answer {
        Deliver,
        Busy,
        NotHere,
        Silent,
    }

    /// What [`run`] saw.
    struct Run {
        /// When each peer was asked for a chunk.
        asked: BTreeMap<NodeId, Vec<Instant>>,
        /// When the fetch assembled.
        done: Instant,
    }

    /// Runs the fetch of `m` (tag `tag`) to its end on a virtual clock in
    /// 50 ms steps, ticking the scheduler each step: requests are answered
    /// as `answer` says for their peer (the `n`-th request of that peer), the
    /// origin delivers. Panics if the fetch fails or has not assembled within
    /// two virtual minutes.
    fn run(w: &mut World, m: &Published, tag: u8, answer: impl Fn(NodeId, usize) -> Answer) -> Run {
        let mut asked: BTreeMap<NodeId, Vec<Instant>> = BTreeMap::new();
        let mut actions = w.schedule(false);
        for _ in 0..2400 {
            let mut next = Vec::new();
            for a in actions {
                match a {
                    // Given up already (its peer was refused in this batch).
                    Action::Request { req, .. } if !w.s.outstanding.contains_key(&req) => {}
                    Action::Request { peer, req, hash } => {
                        let times = asked.entry(peer).or_default();
                        times.push(w.now);
                        let i = index_of(m, &hash);
                        match answer(peer, times.len()) {
                            Answer::Deliver => next.extend(deliver(w, peer, req, tag, i)),
                            Answer::Busy => {
                                assert_eq!(
                                    w.s.peer_reject(w.now, peer, req, false),
                                    Handled::CHANGED
                                )
                            }
                            Answer::NotHere => {
                                assert_eq!(
                                    w.s.peer_reject(w.now, peer, req, true),
                                    Handled::CHANGED
                                )
                            }
                            Answer::Silent => {}
                        }
                    }
                    Action::FetchOrigin { content, index, .. } => {
                        assert!(w.s.origin_chunk(content, index, Ok(chunk(tag, index))));
                        next.extend(w.drain());
                    }
                    Action::Store { hash, .. } => {
                        w.s.stored(w.now, hash, true);
                        next.extend(w.drain());
                    }
                    Action::Assemble { .. } => return Run { asked, done: w.now },
                    Action::Failed { reason, .. } => panic!("{reason}"),
                    Action::Send { .. } | Action::Refused { .. } => {}
                }
            }
            w.now += Duration::from_millis(50);
            next.extend(w.tick());
            next.extend(w.schedule(false));
            actions = next;
        }
        panic!("the fetch did not complete");
    }

    /// Each peer's requests after the first come only once its backoff
    /// after the strikes before is over.
    fn assert_backed_off(times: &[Instant], rtt: Option<Duration>) {
        // Requests go out in bursts (one scheduling pass fills the pipeline);
        // every request before one was a strike.
        for (strikes, w) in times.windows(2).enumerate() {
            let strikes = strikes as u32 + 1;
            if w[1] != w[0] {
                assert!(
                    w[1] - w[0] >= backoff(rtt, strikes),
                    "asked again {:?} after {strikes} strikes",
                    w[1] - w[0]
                );
            }
        }
    }

    #[test]
    fn a_peer_that_claims_everything_and_answers_busy_is_snubbed() {
        let (busy, good) = (node(1), node(2));
        // Long enough (a second of requests to good) for busy to be asked
        // again after its backoffs.
        let m = manifest(20, 400);
        let id = *m.id();
        let mut w = World::new(node(0));
        let rtt = Some(Duration::from_millis(1));
        w.s.peer_rtt(busy, rtt);
        w.s.start(w.now, m.clone(), false, |_| false);
        // Both have everything.
        let _ = w.bitfield(busy, id, bits(400, 0..400));
        let _ = w.bitfield(good, id, bits(400, 0..400));
        let r = run(&mut w, &m, 20, |p, _| {
            if p == busy {
                Answer::Busy
            } else {
                Answer::Deliver
            }
        });
        // Asked exactly MAX_STRIKES times, never during a backoff.
        let times = &r.asked[&busy];
        assert_eq!(times.len(), MAX_STRIKES as usize);
        assert_backed_off(times, rtt);
        let st = w.s.finish(&id).unwrap();
        assert_eq!(st.busy, u64::from(MAX_STRIKES));
        assert_eq!(st.refused[&busy].kind, RefusalKind::Busy);
        assert!(
            st.refused[&busy].reason.contains("8 busy"),
            "{:?}",
            st.refused
        );
        assert!(!st.from_peers.contains_key(&busy));
        // Everything came from good.
        assert_eq!(st.from_peers[&good].bytes, 400 * LEN);
        // Bounded: the snub took at most the backoffs before it (and a step each).
        let bound: Duration = (1..MAX_STRIKES).map(|k| backoff(rtt, k)).sum::<Duration>()
            + Duration::from_millis(50) * MAX_STRIKES;
        assert!(times[times.len() - 1] - w.t0 <= bound);
        assert!(r.done > times[times.len() - 1]);
    }

    #[test]
    fn a_peer_that_claims_chunks_it_never_delivers_is_snubbed_after_timeouts_scaled_by_rtt() {
        let (silent, good) = (node(1), node(2));
        // Long enough (five seconds of requests to good) for two rounds of timeouts.
        let m = manifest(21, 400);
        let id = *m.id();
        let mut w = World::new(node(0));
        let rtt = Duration::from_millis(10);
        w.s.peer_rtt(silent, Some(rtt));
        w.s.start(w.now, m.clone(), false, |_| false);
        let _ = w.bitfield(silent, id, bits(400, 0..400));
        let _ = w.bitfield(good, id, bits(400, 0..400));
        let timeout = w.s.request_timeout(&silent);
        assert_eq!(timeout, rtt * SILENCE_RTTS + SILENCE_SLACK);
        let r = run(&mut w, &m, 21, |p, _| {
            if p == silent {
                Answer::Silent
            } else {
                Answer::Deliver
            }
        });
        let times = r.asked[&silent].clone();
        assert_eq!(times.len(), MAX_STRIKES as usize);
        // Every request waited out the timeout before the next went out.
        let rounds: BTreeSet<Instant> = times.iter().copied().collect();
        assert_eq!(rounds.len(), MAX_STRIKES as usize / PIPELINE);
        let rounds: Vec<Instant> = rounds.into_iter().collect();
        assert!(rounds[1] - rounds[0] > timeout);
        let st = w.s.finish(&id).unwrap();
        assert_eq!(st.timed_out, u64::from(MAX_STRIKES));
        assert_eq!(st.refused[&silent].kind, RefusalKind::Unresponsive);
        assert!(!st.from_peers.contains_key(&silent));
        assert_eq!(st.from_peers[&good].bytes, 400 * LEN);
        // The longer the round trip, the longer the wait; never past the cap.
        assert_eq!(
            request_timeout(Some(Duration::from_secs(1))),
            Duration::from_secs(10)
        );
        assert_eq!(
            request_timeout(Some(Duration::from_secs(5))),
            REQUEST_TIMEOUT
        );
        assert!(request_timeout(None) > request_timeout(Some(rtt)));
    }

    #[test]
    fn a_request_is_given_up_after_the_silence_timeout_not_before() {
        let a = node(1);
        let m = manifest(22, 2);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.peer_rtt(a, Some(Duration::from_millis(100)));
        w.s.start(w.now, m.clone(), false, |_| false);
        let _ = w.bitfield(a, id, bits(2, 0..2));
        let reqs = requests(&w.schedule(false));
        assert_eq!(reqs.len(), 2);
        let t = w.s.request_timeout(&a);
        assert_eq!(t, Duration::from_millis(2800));
        // A piece of the first chunk a second in keeps both alive (a is
        // sending, the second waits behind the first) past the timeout from
        // the start...
        w.at(1000);
        let first = reqs.iter().find(|r| index_of(&m, &r.2) == 0).unwrap().1;
        assert_eq!(
            w.s.peer_data(w.now, a, first, 0, LEN as u32, chunk(22, 0).slice(..1)),
            Handled::NOTHING
        );
        w.at(t.as_millis() as u64 + 500);
        assert!(w.tick().is_empty());
        assert_eq!(w.s.stats(&id).unwrap().timed_out, 0);
        // ...but not past the timeout from that piece.
        w.at(1000 + t.as_millis() as u64 + 1);
        w.tick();
        let st = w.s.stats(&id).unwrap();
        assert_eq!((st.timed_out, st.retried), (2, 2));
    }

    #[test]
    fn a_peer_that_trickles_is_given_up_at_the_request_cap() {
        let a = node(1);
        let m = manifest(23, 1);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.peer_rtt(a, Some(Duration::from_millis(100)));
        w.s.start(w.now, m.clone(), false, |_| false);
        let _ = w.bitfield(a, id, bits(1, [0]));
        let r = requests(&w.schedule(false))[0].1;
        // One byte every 2.5 s: never silent for its timeout (2.8 s).
        assert_eq!(w.s.request_timeout(&a), Duration::from_millis(2800));
        let data = chunk(23, 0);
        let mut t = 0;
        for k in 0..(LEN as usize - 1) {
            t += 2500;
            w.at(t);
            assert!(w.tick().is_empty());
            assert_eq!(w.s.stats(&id).unwrap().timed_out, 0, "at {t} ms");
            let h =
                w.s.peer_data(w.now, a, r, k as u32, LEN as u32, data.slice(k..k + 1));
            assert_eq!(h, Handled::NOTHING);
        }
        // 7 bytes in 17.5 s, the last one not yet: given up at the cap.
        w.at(REQUEST_TIMEOUT.as_millis() as u64);
        w.tick();
        assert_eq!(w.s.stats(&id).unwrap().timed_out, 0);
        w.at(REQUEST_TIMEOUT.as_millis() as u64 + 1);
        w.tick();
        assert_eq!(w.s.stats(&id).unwrap().timed_out, 1);
        assert_eq!(w.s.chunk_state(&id, 0), Some(ChunkState::Missing));
    }

    #[test]
    fn a_peer_that_claims_chunks_it_does_not_have_is_snubbed() {
        let (liar, good) = (node(1), node(2));
        let m = manifest(24, 16);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), true, |_| false);
        let _ = w.bitfield(liar, id, bits(16, 0..16));
        let _ = w.bitfield(good, id, bits(16, 0..16));
        run(&mut w, &m, 24, |p, _| {
            if p == liar {
                Answer::NotHere
            } else {
                Answer::Deliver
            }
        });
        let st = w.s.finish(&id).unwrap();
        assert!(!st.from_peers.contains_key(&liar));
        assert_eq!(st.from_peers[&good].bytes, 16 * LEN);
        // Every NotHere cleared a bit, so the liar ran out of chunks to be
        // asked for or was snubbed; either way it failed at most MAX_STRIKES.
        if let Some(r) = st.refused.get(&liar) {
            assert_eq!(r.kind, RefusalKind::Failing);
        }
        assert!(st.retried <= u64::from(MAX_STRIKES));
        assert!(st.retried >= 1);
    }

    #[test]
    fn a_peer_that_is_busy_now_and_then_is_not_snubbed_but_failures_are_bounded() {
        let (flaky, good) = (node(1), node(2));
        let m = manifest(25, 40);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), false, |_| false);
        let _ = w.bitfield(flaky, id, bits(40, 0..40));
        let _ = w.bitfield(good, id, bits(40, 0..40));
        // Every other request of flaky's is answered Busy: never MAX_STRIKES in a row.
        let r = run(&mut w, &m, 25, |p, n| {
            if p == flaky && n % 2 == 0 {
                Answer::Busy
            } else {
                Answer::Deliver
            }
        });
        let st = w.s.finish(&id).unwrap();
        assert!(st.refused.is_empty(), "{:?}", st.refused);
        assert!(st.from_peers[&flaky].chunks > 0);
        assert!(r.asked[&flaky].len() > 2);
        // Three out of four Busy: MAX_FAILURES in all snub it even so.
        let m = manifest(26, 2000);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.peer_rtt(flaky, Some(Duration::from_millis(1)));
        w.s.start(w.now, m.clone(), false, |_| false);
        let _ = w.bitfield(flaky, id, bits(2000, 0..2000));
        let _ = w.bitfield(good, id, bits(2000, 0..2000));
        run(&mut w, &m, 26, |p, n| {
            if p == flaky && n % 4 != 0 {
                Answer::Busy
            } else {
                Answer::Deliver
            }
        });
        let st = w.s.finish(&id).unwrap();
        assert_eq!(st.refused[&flaky].kind, RefusalKind::Busy);
        assert_eq!(st.busy, u64::from(MAX_FAILURES));
    }

    #[test]
    fn chunk_indexes_past_the_end_refuse_the_peer_for_the_fetch() {
        let (have, claim, long, short, good) = (node(1), node(2), node(3), node(4), node(5));
        let m = manifest(27, 10);
        let id = *m.id();
        let mut w = World::new(node(0));
        // Not fetching yet: dropped, nobody refused (there is no fetch).
        let h = w.s.peer_have(w.now, have, id, 10, 10);
        assert_eq!(h.dropped, Some("chunk index out of range"));
        assert!(w.drain().is_empty());
        w.s.start(w.now, m.clone(), true, |_| false);
        let _ = w.bitfield(good, id, bits(10, 0..10));
        // `have` had a good bitfield (and requests in flight) first.
        let _ = w.bitfield(have, id, bits(10, 0..10));
        let reqs = requests(&w.schedule(false));
        assert!(reqs.iter().any(|r| r.0 == have));
        let out = [
            (have, w.s.peer_have(w.now, have, id, 10, 10)),
            (claim, w.s.peer_claim(w.now, claim, id, 10, u32::MAX)),
            (
                long,
                w.s.peer_bitfield(w.now, long, id, 10, bits(18, 0..18)),
            ),
            (
                short,
                w.s.peer_bitfield(w.now, short, id, 10, bits(9, 0..9)),
            ),
        ];
        for (p, h) in out {
            assert_eq!(h.dropped, Some("chunk index out of range"), "{p}");
            assert!(h.reschedule && !h.first_bitfield);
        }
        let refused: Vec<(NodeId, RefusalKind)> = w
            .drain()
            .into_iter()
            .filter_map(|a| match a {
                Action::Refused { peer, kind, .. } => Some((peer, kind)),
                _ => None,
            })
            .collect();
        assert_eq!(
            refused,
            [have, claim, long, short]
                .map(|p| (p, RefusalKind::OutOfRange))
                .to_vec()
        );
        let st = w.s.stats(&id).unwrap();
        assert!(st.refused[&have].reason.contains("index 10 past the end"));
        assert!(st.refused[&long].reason.contains("bitfield of 18 chunks"));
        // `have`'s requests were given up (no strike, no fault counted twice).
        assert_eq!(
            st.retried as usize,
            reqs.iter().filter(|r| r.0 == have).count()
        );
        // Refused peers are asked for nothing more, and the fetch completes.
        for (p, req, h) in reqs.iter().filter(|r| r.0 == good) {
            let stores = deliver(&mut w, *p, *req, 27, index_of(&m, h));
            w.store_all(&stores);
        }
        let r = run(&mut w, &m, 27, |p, _| {
            assert_eq!(p, good, "a refused peer was asked");
            Answer::Deliver
        });
        assert_eq!(r.asked.keys().copied().collect::<Vec<_>>(), vec![good]);
        // The wrong claim was not stored (nothing to hold the origin off).
        assert!(w
            .s
            .peers
            .get(&claim)
            .is_none_or(|p| p.claims.get(&id).is_none_or(|c| c.is_empty())));
    }

    #[test]
    fn claiming_a_chunk_again_does_not_hold_the_origin_off_for_longer() {
        let (me, other) = (node(1), node(2));
        let m = manifest(28, 1);
        let id = *m.id();
        let mut w = World::new(me);
        w.s.start(w.now, m.clone(), true, |_| false);
        let _ = w.bitfield(other, id, Bits::new(1));
        let _ = w.claim(other, id, 0);
        // Idle and past the grace period: only the claim holds the origin off.
        w.at(ORIGIN_IDLE.as_millis() as u64 + 1);
        assert!(origin_fetches(&w.schedule(false)).is_empty());
        // The same claim again, and again: no longer.
        w.at(CLAIM_TTL.as_millis() as u64 / 2);
        let _ = w.claim(other, id, 0);
        w.at(CLAIM_TTL.as_millis() as u64 - 1);
        let _ = w.claim(other, id, 0);
        assert!(origin_fetches(&w.schedule(false)).is_empty());
        w.at(CLAIM_TTL.as_millis() as u64 + 1);
        assert_eq!(origin_fetches(&w.schedule(false)), vec![0]);
    }

    #[test]
    fn a_lost_chunk_is_fetched_again() {
        let m = manifest(29, 3);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), true, |_| true);
        assert_eq!(w.drain(), vec![Action::Assemble { content: id }]);
        // The cache's copy of chunk 1 turns out damaged while assembling.
        assert!(w.s.lost(w.now, m.chunks[1]));
        assert!(!w.s.lost(w.now, [9; 32]));
        assert_eq!(w.s.chunk_state(&id, 1), Some(ChunkState::Missing));
        assert_eq!(w.s.stats(&id).unwrap().cached, 2 * LEN);
        assert_eq!(origin_fetches(&w.schedule(true)), vec![1]);
        assert!(w.s.origin_chunk(id, 1, Ok(chunk(29, 1))));
        let stores = w.drain();
        assert_eq!(w.store_all(&stores), vec![Action::Assemble { content: id }]);
        let st = w.s.finish(&id).unwrap();
        assert_eq!((st.cached, st.from_origin), (2 * LEN, LEN));
    }

    #[test]
    fn one_failure_keeps_the_origin_off_a_whole_pipeline_of_them_does_not() {
        let a = node(1);
        let m = manifest(30, 12);
        let id = *m.id();
        let mut w = World::new(node(0));
        w.s.start(w.now, m.clone(), true, |_| false);
        let _ = w.bitfield(a, id, bits(12, 0..12));
        w.at(ORIGIN_GRACE.as_millis() as u64);
        let reqs = requests(&w.schedule(false));
        assert_eq!(reqs.len(), PIPELINE);
        // One Busy: that chunk may come from the origin, a's others may not.
        assert_eq!(
            w.s.peer_reject(w.now, a, reqs[0].1, false),
            Handled::CHANGED
        );
        let busy_chunk = index_of(&m, &reqs[0].2);
        assert_eq!(origin_fetches(&w.schedule(false)), vec![busy_chunk]);
        // The whole pipeline turned down: a no longer holds the origin off
        // while it backs off.
        for r in &reqs[1..] {
            assert_eq!(w.s.peer_reject(w.now, a, r.1, false), Handled::CHANGED);
        }
        assert_eq!(
            origin_fetches(&w.schedule(false)).len(),
            ORIGIN_PARALLEL - 1
        );
    }

    #[test]
    fn shares_are_stable_and_spread() {
        // Rendezvous ranks depend on the node, content and index only.
        let c = [3u8; 32];
        let (x, y) = (node_key(&node(1)), node_key(&node(2)));
        assert_eq!(rank(x, &c, 5), rank(x, &c, 5));
        let wins = (0..1000)
            .filter(|i| rank(x, &c, *i) < rank(y, &c, *i))
            .count();
        assert!((400..600).contains(&wins), "{wins}");
    }
}
