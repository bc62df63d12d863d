//! Multiplayer sessions hosted by the origin.
//!
//! - [`game`] and [`wire`]: the deterministic game model and the binary
//!   packet format, shared with the nodes. Both live in `peermesh-session`,
//!   which the origin depends on without its node side (its `node` feature
//!   off), so the origin never links the mesh; the node does not depend on
//!   the origin. Re-exported here under their old paths.
//! - [`SessionServer`]: the authoritative side. Members join a session by
//!   name over UDP (the first join creates it), send their inputs stamped with
//!   the tick they are meant for, and receive a snapshot of the authoritative
//!   [`game::World`] after every tick of a fixed tick rate, with the inputs
//!   the origin received since the previous snapshot echoed in it.
//!
//! Why UDP and not a WebSocket: snapshots are newest-wins and inputs are sent
//! redundantly (every input packet repeats the inputs the origin has not
//! acknowledged), so a lost packet costs nothing, while over TCP one lost
//! segment would hold every later snapshot back behind it (head-of-line
//! blocking), exactly the latency a game cannot afford. A member behind NAT
//! reaches the origin like any game client: its packets open the mapping that
//! the origin's answers come back through.
//!
//! One task receives and parses every packet and hands it to the session's
//! own task over a bounded queue (full: dropped and counted); each session
//! task owns its world, ticks it and sends its snapshots. Malformed or
//! unauthorised packets are dropped and counted ([`Counters`]), never answered.
//! `GET /sessions` shows every session and the counters as JSON.
//!
//! Members are not authenticated beyond the per-slot secret the origin hands
//! out on join: a member declares its mesh peer id itself.

pub use peermesh_session::{game, wire};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::header;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use game::World;
use wire::{Echo, Input, InputBatch, Packet, PlayerState, Refusal, Roster, Snapshot};

/// The path of the sessions view.
pub const SESSIONS_PATH: &str = "/sessions";

/// Microseconds since the Unix epoch, the protocol's timestamps (from
/// [`wire`], re-exported under its old path).
pub use peermesh_session::wire::now_us;

#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Ticks per second of every session.
    pub tick_hz: u16,
    /// Players per session (at most [`wire::MAX_PLAYERS`]).
    pub max_players: usize,
    /// Sessions at once.
    pub max_sessions: usize,
    /// Forward each member's new inputs to the other members at once (the
    /// "through the origin" route the benchmark compares the mesh with).
    pub relay_inputs: bool,
    /// A member not heard from for this long leaves.
    pub member_timeout: Duration,
    /// A session without members for this long ends.
    pub empty_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            tick_hz: 30,
            max_players: 16,
            max_sessions: 1024,
            relay_inputs: false,
            member_timeout: Duration::from_secs(5),
            empty_timeout: Duration::from_secs(30),
        }
    }
}

/// Inputs further ahead of the origin's tick than this are refused.
const MAX_AHEAD_TICKS: u32 = 256;
/// Inputs of one member echoed in one snapshot.
const MAX_ECHO_PER_MEMBER: usize = 16;
/// Queue of packets from the receiver to one session.
const SESSION_QUEUE: usize = 256;

/// What was dropped and why, across all sessions.
#[derive(Debug, Default)]
pub struct Counters {
    pub packets: AtomicU64,
    pub malformed: AtomicU64,
    pub unexpected: AtomicU64,
    pub unknown_session: AtomicU64,
    pub bad_secret: AtomicU64,
    pub late_inputs: AtomicU64,
    pub early_inputs: AtomicU64,
    pub queue_full: AtomicU64,
    pub refused: AtomicU64,
    pub send_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Clone, Debug, Serialize)]
pub struct CountersView {
    pub packets: u64,
    pub malformed: u64,
    pub unexpected: u64,
    pub unknown_session: u64,
    pub bad_secret: u64,
    pub late_inputs: u64,
    pub early_inputs: u64,
    pub queue_full: u64,
    pub refused: u64,
    pub send_errors: u64,
}

impl Counters {
    pub fn view(&self) -> CountersView {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersView {
            packets: g(&self.packets),
            malformed: g(&self.malformed),
            unexpected: g(&self.unexpected),
            unknown_session: g(&self.unknown_session),
            bad_secret: g(&self.bad_secret),
            late_inputs: g(&self.late_inputs),
            early_inputs: g(&self.early_inputs),
            queue_full: g(&self.queue_full),
            refused: g(&self.refused),
            send_errors: g(&self.send_errors),
        }
    }
}

/// One member as `GET /sessions` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct MemberInfo {
    pub slot: u8,
    pub peer: String,
    pub addr: String,
    pub last_input_tick: u32,
    pub inputs: u64,
    pub late: u32,
}

/// One session as `GET /sessions` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    pub id: u32,
    pub name: String,
    pub tick_hz: u16,
    pub tick: u32,
    pub checksum: u64,
    pub members: Vec<MemberInfo>,
    pub world: World,
}

#[derive(Serialize)]
struct SessionsView {
    counters: CountersView,
    sessions: Vec<SessionInfo>,
}

struct Directory {
    counters: Counters,
    views: Mutex<BTreeMap<u32, watch::Receiver<SessionInfo>>>,
}

/// The running session endpoint of an origin.
#[derive(Clone)]
pub struct SessionServer {
    local: SocketAddr,
    dir: Arc<Directory>,
}

impl SessionServer {
    /// Binds the UDP endpoint and starts receiving.
    pub async fn bind(addr: SocketAddr, config: SessionConfig) -> std::io::Result<Self> {
        let sock = Arc::new(UdpSocket::bind(addr).await?);
        let local = sock.local_addr()?;
        let dir = Arc::new(Directory {
            counters: Counters::default(),
            views: Mutex::new(BTreeMap::new()),
        });
        let config = SessionConfig {
            max_players: config.max_players.clamp(1, wire::MAX_PLAYERS),
            tick_hz: config.tick_hz.clamp(1, 1000),
            ..config
        };
        tracing::info!(%local, tick_hz = config.tick_hz, relay_inputs = config.relay_inputs, "session endpoint");
        tokio::spawn(receive(sock, config, dir.clone()));
        Ok(Self { local, dir })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn counters(&self) -> CountersView {
        self.dir.counters.view()
    }

    /// Every running session, by id.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let views = self.dir.views.lock().expect("views lock");
        views.values().map(|v| v.borrow().clone()).collect()
    }

    /// `GET /sessions`.
    pub fn routes(&self) -> Router {
        let me = self.clone();
        Router::new().route(
            SESSIONS_PATH,
            get(move || {
                let me = me.clone();
                async move {
                    let view = SessionsView {
                        counters: me.counters(),
                        sessions: me.sessions(),
                    };
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        serde_json::to_string(&view).expect("views serialize"),
                    )
                }
            }),
        )
    }
}

enum ToSession {
    Join {
        from: SocketAddr,
        peer: String,
        nonce: u64,
    },
    Inputs {
        from: SocketAddr,
        batch: InputBatch,
    },
    Leave {
        secret: u32,
        slot: u8,
    },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

async fn send(sock: &UdpSocket, counters: &Counters, bytes: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(bytes, to).await {
        bump(&counters.send_errors);
        tracing::debug!(%to, error = %e, "session send failed");
    }
}

/// The receiving task: parses every packet and routes it to its session.
async fn receive(sock: Arc<UdpSocket>, config: SessionConfig, dir: Arc<Directory>) {
    let c = &dir.counters;
    let mut by_name: HashMap<String, u32> = HashMap::new();
    let mut by_id: HashMap<u32, mpsc::Sender<ToSession>> = HashMap::new();
    let mut next_id: u32 = 1;
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from a member that went away surface here.
                tracing::debug!(error = %e, "session receive");
                continue;
            }
        };
        bump(&c.packets);
        let packet = match Packet::decode(&buf[..n]) {
            Ok(p) => p,
            Err(e) => {
                bump(&c.malformed);
                tracing::debug!(%from, error = %e, "malformed session packet");
                continue;
            }
        };
        let (session, msg) = match packet {
            Packet::Join { name, peer, nonce } => {
                if !valid_name(&name) || peer.is_empty() {
                    bump(&c.refused);
                    let p = Packet::Refused {
                        nonce,
                        reason: Refusal::BadName,
                    };
                    send(&sock, c, &p.encode(), from).await;
                    continue;
                }
                let live = by_name
                    .get(&name)
                    .and_then(|id| by_id.get(id).map(|tx| (*id, tx)))
                    .filter(|(_, tx)| !tx.is_closed())
                    .map(|(id, _)| id);
                let id = match live {
                    Some(id) => id,
                    None => {
                        by_id.retain(|_, tx| !tx.is_closed());
                        by_name.retain(|_, id| by_id.contains_key(id));
                        if by_id.len() >= config.max_sessions {
                            bump(&c.refused);
                            let p = Packet::Refused {
                                nonce,
                                reason: Refusal::TooManySessions,
                            };
                            send(&sock, c, &p.encode(), from).await;
                            continue;
                        }
                        let id = next_id;
                        next_id = next_id.wrapping_add(1).max(1);
                        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                        let s = Session::new(
                            id,
                            name.clone(),
                            sock.clone(),
                            config.clone(),
                            dir.clone(),
                        );
                        tracing::info!(session = id, %name, "session created");
                        tokio::spawn(s.run(rx));
                        by_name.insert(name, id);
                        by_id.insert(id, tx);
                        id
                    }
                };
                (id, ToSession::Join { from, peer, nonce })
            }
            Packet::Inputs(batch) => (batch.session, ToSession::Inputs { from, batch }),
            Packet::Leave {
                session,
                secret,
                slot,
            } => (session, ToSession::Leave { secret, slot }),
            _ => {
                // Origin-to-member packets have no business arriving here.
                bump(&c.unexpected);
                continue;
            }
        };
        match by_id.get(&session) {
            Some(tx) => match tx.try_send(msg) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => bump(&c.queue_full),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    by_id.remove(&session);
                    bump(&c.unknown_session);
                }
            },
            None => bump(&c.unknown_session),
        }
    }
}

struct Member {
    peer: String,
    secret: u32,
    nonce: u64,
    addr: SocketAddr,
    last_heard: Instant,
    /// Inputs for ticks not processed yet.
    pending: BTreeMap<u32, Input>,
    last_input_tick: u32,
    inputs: u64,
    late: u32,
    /// Inputs received since the previous snapshot, to echo in the next.
    fresh: Vec<Input>,
}

struct Session {
    id: u32,
    name: String,
    sock: Arc<UdpSocket>,
    config: SessionConfig,
    dir: Arc<Directory>,
    world: World,
    members: BTreeMap<u8, Member>,
    roster_version: u32,
    roster_sent: Option<(u32, Instant)>,
    empty_since: Option<Instant>,
    view: watch::Sender<SessionInfo>,
}

impl Session {
    fn new(
        id: u32,
        name: String,
        sock: Arc<UdpSocket>,
        config: SessionConfig,
        dir: Arc<Directory>,
    ) -> Self {
        let world = World::new(0);
        let view = watch::Sender::new(SessionInfo {
            id,
            name: name.clone(),
            tick_hz: config.tick_hz,
            tick: 0,
            checksum: world.checksum(),
            members: Vec::new(),
            world: world.clone(),
        });
        dir.views
            .lock()
            .expect("views lock")
            .insert(id, view.subscribe());
        Self {
            id,
            name,
            sock,
            config,
            dir,
            world,
            members: BTreeMap::new(),
            roster_version: 0,
            roster_sent: None,
            empty_since: Some(Instant::now()),
            view,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<ToSession>) {
        let period = Duration::from_secs_f64(1.0 / f64::from(self.config.tick_hz));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if !self.tick().await {
                        break;
                    }
                }
                m = rx.recv() => match m {
                    Some(m) => self.on_message(m).await,
                    None => break,
                },
            }
        }
        self.dir.views.lock().expect("views lock").remove(&self.id);
        tracing::info!(session = self.id, name = %self.name, tick = self.world.tick, "session ended");
    }

    fn counters(&self) -> &Counters {
        &self.dir.counters
    }

    async fn on_message(&mut self, m: ToSession) {
        match m {
            ToSession::Join { from, peer, nonce } => self.on_join(from, peer, nonce).await,
            ToSession::Inputs { from, batch } => self.on_inputs(from, batch).await,
            ToSession::Leave { secret, slot } => {
                if self.members.get(&slot).is_some_and(|m| m.secret == secret) {
                    self.remove(slot, "left");
                } else {
                    bump(&self.counters().bad_secret);
                }
            }
        }
    }

    fn remove(&mut self, slot: u8, why: &str) {
        if let Some(m) = self.members.remove(&slot) {
            tracing::info!(session = self.id, slot, peer = %m.peer, why, "member left");
            self.world.leave(slot);
            self.roster_version += 1;
            if self.members.is_empty() {
                self.empty_since = Some(Instant::now());
            }
        }
    }

    async fn on_join(&mut self, from: SocketAddr, peer: String, nonce: u64) {
        let existing = self
            .members
            .iter()
            .find(|(_, m)| m.peer == peer)
            .map(|(s, m)| (*s, m.nonce));
        let slot = match existing {
            // A repeated join (our welcome was lost): the same answer.
            Some((slot, n)) if n == nonce => slot,
            // The same peer again (it restarted): a fresh start in its slot.
            Some((slot, _)) => {
                self.remove(slot, "rejoined");
                self.add(slot, from, peer, nonce);
                slot
            }
            None => {
                let free =
                    (0..self.config.max_players as u8).find(|s| !self.members.contains_key(s));
                let Some(slot) = free else {
                    bump(&self.counters().refused);
                    let p = Packet::Refused {
                        nonce,
                        reason: Refusal::Full,
                    };
                    send(&self.sock, self.counters(), &p.encode(), from).await;
                    return;
                };
                self.add(slot, from, peer, nonce);
                slot
            }
        };
        let m = &self.members[&slot];
        let welcome = Packet::Welcome {
            nonce,
            session: self.id,
            secret: m.secret,
            slot,
            tick_hz: self.config.tick_hz,
            tick: self.world.tick,
        };
        send(&self.sock, self.counters(), &welcome.encode(), from).await;
        self.send_roster().await;
    }

    fn add(&mut self, slot: u8, addr: SocketAddr, peer: String, nonce: u64) {
        tracing::info!(session = self.id, slot, %peer, %addr, "member joined");
        self.world.join(slot);
        self.members.insert(
            slot,
            Member {
                peer,
                secret: rand::random::<u32>().max(1),
                nonce,
                addr,
                last_heard: Instant::now(),
                pending: BTreeMap::new(),
                last_input_tick: self.world.tick,
                inputs: 0,
                late: 0,
                fresh: Vec::new(),
            },
        );
        self.roster_version += 1;
        self.empty_since = None;
    }

    async fn on_inputs(&mut self, from: SocketAddr, batch: InputBatch) {
        let tick = self.world.tick;
        let Some(m) = self
            .members
            .get_mut(&batch.slot)
            .filter(|m| m.secret == batch.secret)
        else {
            bump(&self.dir.counters.bad_secret);
            return;
        };
        m.addr = from; // follows a NAT rebinding
        m.last_heard = Instant::now();
        let mut new = Vec::new();
        for i in batch.inputs {
            if i.tick <= m.last_input_tick {
                continue; // a repeat of what we have
            }
            if i.tick > tick.saturating_add(MAX_AHEAD_TICKS) {
                bump(&self.dir.counters.early_inputs);
                continue;
            }
            m.last_input_tick = i.tick;
            m.inputs += 1;
            if i.tick <= tick {
                m.late += 1;
                bump(&self.dir.counters.late_inputs);
                continue;
            }
            m.pending.insert(i.tick, i);
            if m.fresh.len() < MAX_ECHO_PER_MEMBER {
                m.fresh.push(i);
            }
            new.push(i);
        }
        if self.config.relay_inputs && !new.is_empty() {
            let p = Packet::Relayed(InputBatch {
                session: self.id,
                secret: 0,
                slot: batch.slot,
                inputs: new,
            })
            .encode();
            for (s, o) in &self.members {
                if *s != batch.slot {
                    send(&self.sock, &self.dir.counters, &p, o.addr).await;
                }
            }
        }
    }

    async fn send_roster(&mut self) {
        let p = Packet::Roster(Roster {
            session: self.id,
            version: self.roster_version,
            members: self
                .members
                .iter()
                .map(|(s, m)| (*s, m.peer.clone()))
                .collect(),
        })
        .encode();
        for m in self.members.values() {
            send(&self.sock, &self.dir.counters, &p, m.addr).await;
        }
        self.roster_sent = Some((self.roster_version, Instant::now()));
    }

    /// One tick: advance the world, send the snapshot. False when the
    /// session has been empty long enough to end.
    async fn tick(&mut self) -> bool {
        let now = Instant::now();
        let gone: Vec<u8> = self
            .members
            .iter()
            .filter(|(_, m)| now.duration_since(m.last_heard) > self.config.member_timeout)
            .map(|(s, _)| *s)
            .collect();
        for s in gone {
            self.remove(s, "timed out");
        }
        if let Some(t) = self.empty_since {
            if now.duration_since(t) > self.config.empty_timeout {
                return false;
            }
        }

        let next = self.world.tick.wrapping_add(1);
        let members = &mut self.members;
        self.world.step(|slot| {
            let m = members.get_mut(&slot)?;
            // Anything older than this tick is late and can never apply.
            while m.pending.first_key_value().is_some_and(|(t, _)| *t < next) {
                m.pending.pop_first();
            }
            m.pending.remove(&next).map(|i| i.buttons)
        });

        let mut echo = Vec::new();
        for (s, m) in &mut self.members {
            for input in m.fresh.drain(..) {
                echo.push(Echo { slot: *s, input });
            }
        }
        echo.truncate(wire::MAX_ECHO);
        let snapshot = Packet::Snapshot(Snapshot {
            session: self.id,
            tick: self.world.tick,
            server_us: now_us(),
            roster_version: self.roster_version,
            players: self
                .world
                .players
                .iter()
                .map(|p| {
                    let m = self.members.get(&p.slot);
                    PlayerState {
                        player: p.clone(),
                        last_input_tick: m.map_or(0, |m| m.last_input_tick),
                        late: m.map_or(0, |m| m.late),
                    }
                })
                .collect(),
            echo,
        })
        .encode();
        for m in self.members.values() {
            send(&self.sock, &self.dir.counters, &snapshot, m.addr).await;
        }
        let roster_due = match self.roster_sent {
            None => true,
            Some((v, at)) => {
                v != self.roster_version || now.duration_since(at) > Duration::from_secs(1)
            }
        };
        if roster_due && !self.members.is_empty() {
            self.send_roster().await;
        }
        self.publish();
        true
    }

    fn publish(&self) {
        let world = &self.world;
        let members = &self.members;
        self.view.send_modify(|v| {
            v.tick = world.tick;
            v.checksum = world.checksum();
            v.world = world.clone();
            v.members = members
                .iter()
                .map(|(s, m)| MemberInfo {
                    slot: *s,
                    peer: m.peer.clone(),
                    addr: m.addr.to_string(),
                    last_input_tick: m.last_input_tick,
                    inputs: m.inputs,
                    late: m.late,
                })
                .collect();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use game::Buttons;

    async fn recv(sock: &UdpSocket) -> Packet {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("a packet within 5 s")
            .unwrap();
        Packet::decode(&buf[..n]).unwrap()
    }

    async fn recv_until<T>(sock: &UdpSocket, mut f: impl FnMut(Packet) -> Option<T>) -> T {
        loop {
            if let Some(v) = f(recv(sock).await) {
                return v;
            }
        }
    }

    async fn join(server: SocketAddr, name: &str, peer: &str) -> (UdpSocket, u32, u32, u8) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(server).await.unwrap();
        let j = Packet::Join {
            name: name.into(),
            peer: peer.into(),
            nonce: 7,
        };
        sock.send(&j.encode()).await.unwrap();
        let (session, secret, slot) = recv_until(&sock, |p| match p {
            Packet::Welcome {
                nonce: 7,
                session,
                secret,
                slot,
                ..
            } => Some((session, secret, slot)),
            _ => None,
        })
        .await;
        (sock, session, secret, slot)
    }

    #[tokio::test]
    async fn members_join_send_inputs_and_get_snapshots_and_junk_is_counted() {
        let server = SessionServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            SessionConfig {
                tick_hz: 50,
                relay_inputs: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let addr = server.local_addr();
        let (a, session, secret_a, slot_a) = join(addr, "game", "peer-a").await;
        let (b, session_b, _, slot_b) = join(addr, "game", "peer-b").await;
        assert_eq!(session, session_b);
        assert_ne!(slot_a, slot_b);

        // Both see a roster with both members.
        recv_until(&b, |p| match p {
            Packet::Roster(r) if r.members.len() == 2 => Some(()),
            _ => None,
        })
        .await;

        // a presses RIGHT from a few ticks ahead; the snapshot shows it.
        let tick = recv_until(&a, |p| match p {
            Packet::Snapshot(s) => Some(s.tick),
            _ => None,
        })
        .await;
        let input = Input {
            tick: tick + 5,
            buttons: Buttons(Buttons::RIGHT),
            sent_us: now_us(),
        };
        let batch = |secret| {
            Packet::Inputs(InputBatch {
                session,
                secret,
                slot: slot_a,
                inputs: vec![input],
            })
        };
        a.send(&batch(secret_a).encode()).await.unwrap();
        // The relay reaches b at once, the echo and the applied input follow.
        let relayed = recv_until(&b, |p| match p {
            Packet::Relayed(r) => Some(r),
            _ => None,
        })
        .await;
        assert_eq!(
            (relayed.slot, relayed.secret, &relayed.inputs[..]),
            (slot_a, 0, &[input][..])
        );
        let echoed = recv_until(&b, |p| match p {
            Packet::Snapshot(s) => s.echo.iter().find(|e| e.slot == slot_a).copied(),
            _ => None,
        })
        .await;
        assert_eq!(echoed.input, input);
        let p = recv_until(&b, |p| match p {
            Packet::Snapshot(s) if s.tick >= input.tick => Some(s),
            _ => None,
        })
        .await;
        let pa = p.players.iter().find(|p| p.player.slot == slot_a).unwrap();
        assert_eq!(pa.player.buttons, Buttons(Buttons::RIGHT));
        assert!(pa.player.vx > 0);
        assert_eq!(pa.last_input_tick, input.tick);

        // Garbage, a wrong secret and an unknown session are counted.
        a.send(b"garbage").await.unwrap();
        a.send(&batch(secret_a ^ 1).encode()).await.unwrap();
        let mut other = batch(secret_a);
        if let Packet::Inputs(b) = &mut other {
            b.session += 100;
        }
        a.send(&other.encode()).await.unwrap();
        // An input far beyond the present tick.
        a.send(
            &Packet::Inputs(InputBatch {
                session,
                secret: secret_a,
                slot: slot_a,
                inputs: vec![Input {
                    tick: input.tick + 10_000,
                    ..input
                }],
            })
            .encode(),
        )
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let c = server.counters();
                if c.malformed >= 1
                    && c.bad_secret >= 1
                    && c.unknown_session >= 1
                    && c.early_inputs >= 1
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("counters");

        let info = server.sessions();
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].members.len(), 2);
        assert_eq!(info[0].checksum, info[0].world.checksum());

        // Leaving shrinks the roster.
        b.send(
            &Packet::Leave {
                session,
                secret: 0,
                slot: slot_b,
            }
            .encode(),
        )
        .await
        .unwrap();
        a.send(
            &Packet::Leave {
                session,
                secret: secret_a,
                slot: slot_a,
            }
            .encode(),
        )
        .await
        .unwrap();
        recv_until(&b, |p| match p {
            Packet::Roster(r) if r.members.len() == 1 => Some(()),
            _ => None,
        })
        .await;
    }

    #[tokio::test]
    async fn a_full_session_refuses_and_bad_names_are_refused() {
        let server = SessionServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            SessionConfig {
                max_players: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let addr = server.local_addr();
        let _a = join(addr, "g", "a").await;
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(addr).await.unwrap();
        for (name, want) in [("g", Refusal::Full), ("bad name!", Refusal::BadName)] {
            let j = Packet::Join {
                name: name.into(),
                peer: "b".into(),
                nonce: 1,
            };
            sock.send(&j.encode()).await.unwrap();
            let got = recv_until(&sock, |p| match p {
                Packet::Refused { reason, .. } => Some(reason),
                _ => None,
            })
            .await;
            assert_eq!(got, want);
        }
    }
}
