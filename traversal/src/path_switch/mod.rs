//! One ordered, exactly-once message stream to a peer over paths that come and go.
//!
//! A peer link starts on a relay, moves to a direct path once one is punched, and
//! falls back to a relay or to forwarding through another member when that path
//! dies. The application must not see any of it: no loss, no duplicate, no
//! reordering (seed 000). [`PathSwitch`] is the sans-IO state machine that gives
//! that guarantee, in the manner of quinn-proto: the caller moves bytes and time
//! in and out, nothing here touches a socket or a clock.
//!
//! How: every message gets a sequence number; the receiver acknowledges
//! cumulatively (plus SACK ranges) and drops duplicates by sequence number; the
//! sender keeps every message until it is acknowledged and, whenever the active
//! path changes, sends all of them again on the new path. On unreliable paths
//! (datagrams) a retransmission timer from a smoothed RTT also resends what was
//! lost. Reliable paths resend nothing on a timer; a long silence there only
//! draws a PING, which the peer answers with its ACK (that ACK may have been
//! lost on another path). Both windows are bounded, so memory is too.

pub mod frame;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
pub use peermesh_base::PathKind;

pub use frame::{decode, Ack, Frame, FrameError, MAX_ACK_RANGES, MAX_PAYLOAD};

/// Flow-control window a sender may assume before the peer's first ACK says
/// otherwise; every receiver accepts at least this much, so the first burst
/// (the one that makes time to first byte) never waits for an ACK.
pub const INITIAL_PEER_WINDOW: u64 = 16;
/// A frame this many sequence numbers below one that was acknowledged, and sent
/// no later than it, is taken as lost on an unreliable path without waiting for
/// the timer (datagrams may reorder a little, so not at once).
const REORDER_THRESHOLD: u64 = 3;
/// Cap on the exponential backoff of timers, so a long outage is followed by a
/// prompt retry.
const MAX_BACKOFF: u32 = 8;
/// Pending PING answers and outstanding probes are few; bound them anyway.
const MAX_CONTROL: usize = 16;
const MAX_EVENTS: usize = 64;
/// Probe outcomes kept per path for [`PathStats::probe_loss`].
pub const PROBE_LOG: usize = 20;
/// A probe unanswered this long is counted lost (when liveness is off; with
/// liveness, after the path's dead-after time).
const PROBE_LOST_AFTER: Duration = Duration::from_secs(2);

/// A path to the peer, named by the caller (for example the index of the relay
/// connection or the punched socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PathId(pub u32);

/// Limits and timings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Messages held until acknowledged; [`PathSwitch::send`] fails beyond it.
    pub send_window: usize,
    /// Messages the receiver buffers, reordered or not yet taken by the
    /// application; raised to at least [`INITIAL_PEER_WINDOW`].
    pub recv_window: u64,
    /// Largest message accepted from the application or from the peer; at most
    /// [`MAX_PAYLOAD`]. Both ends should agree.
    pub max_message_size: usize,
    /// Longest an in-order DATA waits for its ACK, so acks ride together.
    pub max_ack_delay: Duration,
    /// Acknowledge at once after this many in-order DATA frames.
    pub ack_every: u32,
    /// RTT assumed on a path before the first sample.
    pub initial_rtt: Duration,
    /// Bounds on the retransmission timeout of unreliable paths.
    pub min_rto: Duration,
    pub max_rto: Duration,
    /// Dead-path detection; off by default (the caller may have its own).
    pub liveness: Option<Liveness>,
}

/// How a path that went silent is found dead: a NAT mapping that expired or
/// a cut route leaves a connection looking open for seconds (QUIC notices
/// only at its idle timeout), while traffic should go back to the relay at
/// once (seed 000).
///
/// A path is dead when it does not answer, not when it is quiet: silence on
/// an idle link proves nothing and costs nothing. While the link is in use
/// (messages sent or received within [`Liveness::in_use_for`]) or a path
/// owes an answer, a path not heard from is probed every `probe_after`; an
/// idle link's paths only every `idle_probe_after` (Tailscale's heartbeat
/// is 3 s and stops for idle peers).
#[derive(Clone, Debug)]
pub struct Liveness {
    /// A path of a link in use not heard from for this long is sent a PING
    /// (the peer answers every PING on the path it came from).
    pub probe_after: Duration,
    /// A path of an idle link not heard from for this long is sent a PING:
    /// a dead path is found before it is needed, and rarely.
    pub idle_probe_after: Duration,
    /// A link is in use this long after its last message either way.
    pub in_use_for: Duration,
    /// A path that has not answered for this long (or eight smoothed RTTs,
    /// if more) since the first DATA or PING sent on it after it was last
    /// heard is taken down and reported as [`Event::PathDead`].
    pub dead_after: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            probe_after: Duration::from_millis(250),
            idle_probe_after: Duration::from_secs(10),
            in_use_for: Duration::from_secs(5),
            dead_after: Duration::from_millis(1000),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            send_window: 256,
            recv_window: 256,
            max_message_size: 64 * 1024,
            max_ack_delay: Duration::from_millis(2),
            ack_every: 2,
            initial_rtt: Duration::from_millis(200),
            min_rto: Duration::from_millis(10),
            max_rto: Duration::from_secs(2),
            liveness: None,
        }
    }
}

/// A frame to put on a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub path: PathId,
    pub frame: Bytes,
}

/// Why [`PathSwitch::send`] refused a message; the message was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// `send_window` messages are unacknowledged: retry after more input (ACKs)
    /// has been handled.
    #[error("send window full")]
    WindowFull,
    #[error("message of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
}

/// Asking for a path that is not up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} is not up")]
    UnknownPath(PathId),
}

/// Things the caller may want to act on or report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Traffic now goes over this path (`None`: no path is up).
    ActivePath(Option<PathId>),
    /// A [`PathSwitch::probe`] was answered.
    ProbeRtt { path: PathId, rtt: Duration },
    /// [`Liveness`] found the path dead and took it down; the caller should
    /// close what carries it.
    PathDead(PathId),
}

/// Counters of one path, kept while it is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathStats {
    pub kind: PathKind,
    pub reliable: bool,
    pub frames_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    /// DATA frames sent again (after a loss or a switch).
    pub retransmits: u64,
    /// Smoothed RTT from acknowledged data and probes.
    pub rtt: Option<Duration>,
    /// RTT of the last answered probe.
    pub probe_rtt: Option<Duration>,
    /// Of the last [`PROBE_LOG`] probes on this path whose outcome is
    /// known, how many went unanswered, and how many there are.
    pub probes_lost: u32,
    pub probes_known: u32,
}

impl PathStats {
    /// Share of recent probes that went unanswered (`None` before the first
    /// outcome).
    pub fn probe_loss(&self) -> Option<f64> {
        (self.probes_known > 0).then(|| self.probes_lost as f64 / self.probes_known as f64)
    }
}

/// Counters of the whole stream: what went wrong and how often.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub messages_sent: u64,
    pub messages_delivered: u64,
    /// DATA frames whose message was already held or delivered.
    pub duplicates: u64,
    /// DATA frames beyond the receive window, dropped.
    pub window_drops: u64,
    /// Frames that failed to decode.
    pub malformed: u64,
    /// Well-formed frames that break the protocol (ack of unsent data, oversize message).
    pub protocol_errors: u64,
    /// Frames that arrived on a path that is not up (still used: data is data).
    pub unknown_path_frames: u64,
    pub retransmits: u64,
    /// Retransmission timer expiries that found lost frames.
    pub rto_fires: u64,
    /// Changes of the active path.
    pub path_switches: u64,
}

/// RFC 6298 estimator, one per path: a relay and a direct path differ tenfold.
#[derive(Clone, Debug)]
struct Rtt {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl Rtt {
    fn new() -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
        }
    }

    fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let err = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + err) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    fn rto(&self, cfg: &Config) -> Duration {
        let (srtt, var) = match self.srtt {
            Some(s) => (s, self.rttvar),
            None => (cfg.initial_rtt, cfg.initial_rtt / 2),
        };
        (srtt + (var * 4).max(Duration::from_millis(1)) + cfg.max_ack_delay)
            .clamp(cfg.min_rto, cfg.max_rto)
    }
}

#[derive(Clone, Debug)]
struct Path {
    kind: PathKind,
    reliable: bool,
    /// Order of coming up: among equals the older path stays, so no flapping.
    up_order: u64,
    rtt: Rtt,
    stats: PathStats,
    /// Last frame from the peer on this path (or when it came up).
    last_heard: Instant,
    last_probe: Option<Instant>,
    /// First DATA or PING sent on this path since it was last heard: the
    /// path owes an answer since then.
    awaiting: Option<Instant>,
    /// Outcomes of the last [`PROBE_LOG`] probes (answered or not).
    probe_log: VecDeque<bool>,
}

#[derive(Clone, Copy, Debug)]
struct Sent {
    at: Instant,
    path: PathId,
    count: u32,
}

#[derive(Clone, Debug)]
struct Entry {
    payload: Bytes,
    /// Selectively acknowledged: the receiver holds it and never drops what it holds.
    acked: bool,
    sent: Option<Sent>,
}

/// The path switch of one peer link. See the module docs.
#[derive(Debug)]
pub struct PathSwitch {
    cfg: Config,
    paths: BTreeMap<PathId, Path>,
    up_counter: u64,
    active: Option<PathId>,
    preferred: Option<PathId>,

    // Send side: `entries[i]` is sequence number `base + i`; `cursor` is the next
    // one to send in order (reset to `base` on a switch), `lost` the ones to send
    // again before it.
    base: u64,
    next_seq: u64,
    cursor: u64,
    entries: VecDeque<Entry>,
    lost: BTreeSet<u64>,
    peer_limit: u64,
    rto_backoff: u32,
    largest_acked: Option<(u64, Instant)>,
    /// Last sign of life from the peer's receive side (ACK progress) or last
    /// solicitation; see [`Self::solicit_deadline`].
    solicit_anchor: Option<Instant>,
    solicit_backoff: u32,

    // Receive side: everything below `rx_next` has arrived; `ready` holds the
    // in-order messages the application has not taken yet.
    rx_next: u64,
    reorder: BTreeMap<u64, Bytes>,
    ready: VecDeque<Bytes>,
    rx_any: bool,
    /// Where the last DATA or PING came from: ACKs go back the way the sender
    /// chose, whose reliability its retransmission policy is built on.
    ack_path: Option<PathId>,
    ack_now: bool,
    ack_deadline: Option<Instant>,
    rx_since_ack: u32,
    last_adv_limit: u64,

    control: VecDeque<(PathId, Frame)>,
    pings: VecDeque<(u64, PathId, Instant)>,
    next_nonce: u64,
    events: VecDeque<Event>,
    stats: Stats,
    /// Last DATA sent or received: the link is in use for a while after.
    last_activity: Option<Instant>,
}

impl PathSwitch {
    /// Out-of-range settings are clamped rather than refused: a link must come up.
    pub fn new(mut cfg: Config) -> Self {
        cfg.send_window = cfg.send_window.max(1);
        cfg.recv_window = cfg.recv_window.max(INITIAL_PEER_WINDOW);
        cfg.max_message_size = cfg.max_message_size.min(MAX_PAYLOAD);
        cfg.ack_every = cfg.ack_every.max(1);
        cfg.max_rto = cfg.max_rto.max(cfg.min_rto);
        let last_adv_limit = cfg.recv_window;
        Self {
            cfg,
            paths: BTreeMap::new(),
            up_counter: 0,
            active: None,
            preferred: None,
            base: 0,
            next_seq: 0,
            cursor: 0,
            entries: VecDeque::new(),
            lost: BTreeSet::new(),
            peer_limit: INITIAL_PEER_WINDOW,
            rto_backoff: 0,
            largest_acked: None,
            solicit_anchor: None,
            solicit_backoff: 0,
            rx_next: 0,
            reorder: BTreeMap::new(),
            ready: VecDeque::new(),
            rx_any: false,
            ack_path: None,
            ack_now: false,
            ack_deadline: None,
            rx_since_ack: 0,
            last_adv_limit,
            control: VecDeque::new(),
            pings: VecDeque::new(),
            next_nonce: 0,
            events: VecDeque::new(),
            stats: Stats::default(),
            last_activity: None,
        }
    }

    /// The settings in force, after clamping.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    // ---- application side ----

    /// Queues a message; it is sent by [`Self::poll_transmit`] as soon as a path
    /// and the peer's window allow, at once on the only path if there is one.
    pub fn send(&mut self, msg: Bytes) -> Result<(), SendError> {
        if msg.len() > self.cfg.max_message_size {
            return Err(SendError::TooLarge {
                size: msg.len(),
                max: self.cfg.max_message_size,
            });
        }
        if self.entries.len() >= self.cfg.send_window {
            return Err(SendError::WindowFull);
        }
        self.entries.push_back(Entry {
            payload: msg,
            acked: false,
            sent: None,
        });
        self.next_seq += 1;
        self.stats.messages_sent += 1;
        Ok(())
    }

    /// The next message in order, each exactly once.
    pub fn poll_deliver(&mut self) -> Option<Bytes> {
        let msg = self.ready.pop_front()?;
        self.stats.messages_delivered += 1;
        // Tell a window-blocked sender about the room, but not for every message.
        let step = (self.cfg.recv_window / 4).max(1);
        if self.rx_limit() >= self.last_adv_limit + step {
            self.ack_now = true;
        }
        Some(msg)
    }

    /// Messages sent and not yet acknowledged by the peer.
    pub fn unacked(&self) -> usize {
        self.entries.len()
    }

    /// Nothing left to send, acknowledge or answer: the link may sleep.
    pub fn is_idle(&self) -> bool {
        self.entries.is_empty()
            && !self.ack_now
            && self.ack_deadline.is_none()
            && self.control.is_empty()
    }

    // ---- paths ----

    /// A path is usable. An id that is already up is taken as reconnected: what
    /// was in flight on it may be gone, so it is sent again.
    pub fn path_up(&mut self, id: PathId, kind: PathKind, reliable: bool, now: Instant) {
        self.up_counter += 1;
        match self.paths.get_mut(&id) {
            Some(p) => {
                p.kind = kind;
                p.reliable = reliable;
                p.last_heard = now;
                p.awaiting = None;
                p.stats.kind = kind;
                p.stats.reliable = reliable;
                if self.active == Some(id) {
                    self.on_switch(now);
                }
            }
            None => {
                self.paths.insert(
                    id,
                    Path {
                        kind,
                        reliable,
                        up_order: self.up_counter,
                        rtt: Rtt::new(),
                        last_heard: now,
                        last_probe: None,
                        awaiting: None,
                        probe_log: VecDeque::new(),
                        stats: PathStats {
                            kind,
                            reliable,
                            frames_in: 0,
                            bytes_in: 0,
                            frames_out: 0,
                            bytes_out: 0,
                            retransmits: 0,
                            rtt: None,
                            probe_rtt: None,
                            probes_lost: 0,
                            probes_known: 0,
                        },
                    },
                );
                // A new path is measured at once (its RTT for status and
                // path choice), not at the first idle probe seconds later.
                if self.cfg.liveness.is_some() {
                    self.send_ping(id, now);
                    if let Some(p) = self.paths.get_mut(&id) {
                        p.last_probe = Some(now);
                    }
                }
            }
        }
        self.reselect(now);
    }

    /// A path is gone, with whatever was in flight on it. Its stats go with it.
    pub fn path_down(&mut self, id: PathId, now: Instant) {
        if self.paths.remove(&id).is_none() {
            return;
        }
        if self.preferred == Some(id) {
            self.preferred = None;
        }
        self.control.retain(|(p, _)| *p != id);
        self.pings.retain(|(_, p, _)| *p != id);
        self.reselect(now);
    }

    /// Pins traffic to a live path (for example a relay the directory picked)
    /// until it goes down or [`Self::clear_preferred`].
    pub fn set_preferred(&mut self, id: PathId, now: Instant) -> Result<(), PathError> {
        if !self.paths.contains_key(&id) {
            return Err(PathError::UnknownPath(id));
        }
        self.preferred = Some(id);
        self.reselect(now);
        Ok(())
    }

    /// Back to the automatic choice: direct, then forwarded, then relay.
    pub fn clear_preferred(&mut self, now: Instant) {
        self.preferred = None;
        self.reselect(now);
    }

    /// The path data goes out on; what link status reports.
    pub fn active_path(&self) -> Option<PathId> {
        self.active
    }

    /// Sends a PING on `id`; the RTT comes back as [`Event::ProbeRtt`]. Returns
    /// the probe's nonce.
    pub fn probe(&mut self, id: PathId, now: Instant) -> Result<u64, PathError> {
        if !self.paths.contains_key(&id) {
            return Err(PathError::UnknownPath(id));
        }
        Ok(self.send_ping(id, now))
    }

    /// Smoothed RTT of the active path, once measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.paths.get(&self.active?)?.rtt.srtt
    }

    /// Counters of a path that is up; `None` once it went down.
    pub fn path_stats(&self, id: PathId) -> Option<PathStats> {
        let p = self.paths.get(&id)?;
        let mut s = p.stats.clone();
        s.rtt = p.rtt.srtt;
        s.probes_lost = p.probe_log.iter().filter(|ok| !**ok).count() as u32;
        s.probes_known = p.probe_log.len() as u32;
        Some(s)
    }

    /// Counters of the whole stream, for link status and for spotting a bad peer.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The next event; the newest 64 are kept if nobody polls.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- network side ----

    /// Takes one frame that arrived on `id`. Frames are used even from a path
    /// that is not (or no longer) up: the other end may learn of a path first.
    pub fn on_frame(&mut self, id: PathId, bytes: &[u8], now: Instant) -> Result<(), FrameError> {
        let frame = match decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                self.stats.malformed += 1;
                return Err(e);
            }
        };
        let known = match self.paths.get_mut(&id) {
            Some(p) => {
                p.last_heard = now;
                p.awaiting = None;
                p.stats.frames_in += 1;
                p.stats.bytes_in += bytes.len() as u64;
                true
            }
            None => {
                self.stats.unknown_path_frames += 1;
                false
            }
        };
        match frame {
            Frame::Data { seq, payload } => self.on_data(id, seq, payload, now),
            Frame::Ack(ack) => self.on_ack(&ack, now),
            Frame::Ping { nonce } => {
                if known {
                    push_bounded(&mut self.control, (id, Frame::Pong { nonce }), MAX_CONTROL);
                }
                // A PING also asks for our ACK: the peer may be waiting for one
                // that was lost (see `solicit_deadline`).
                self.ack_now = true;
                self.ack_path = Some(id);
                Ok(())
            }
            Frame::Pong { nonce } => {
                if let Some(i) = self.pings.iter().position(|(n, _, _)| *n == nonce) {
                    let (_, path, sent) = self.pings.remove(i).expect("index in range");
                    let rtt = now.saturating_duration_since(sent);
                    if let Some(p) = self.paths.get_mut(&path) {
                        p.rtt.sample(rtt);
                        p.stats.probe_rtt = Some(rtt);
                        log_probe(p, true);
                    }
                    self.event(Event::ProbeRtt { path, rtt });
                }
                Ok(())
            }
        }
    }

    /// The next frame to send, if any. Call until `None` after every input.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        while let Some((path, frame)) = self.control.pop_front() {
            if self.paths.contains_key(&path) {
                return Some(self.emit(path, &frame));
            }
        }
        let active = self.active?;
        if self.ack_now {
            let path = self
                .ack_path
                .filter(|p| self.paths.contains_key(p))
                .unwrap_or(active);
            let ack = self.build_ack();
            return Some(self.emit(path, &Frame::Ack(ack)));
        }
        while let Some(seq) = self.lost.pop_first() {
            if seq >= self.base && seq < self.cursor && !self.entry(seq).acked {
                return Some(self.emit_data(active, seq, now));
            }
        }
        while self.cursor < self.next_seq && self.cursor < self.peer_limit {
            let seq = self.cursor;
            self.cursor += 1;
            if !self.entry(seq).acked {
                return Some(self.emit_data(active, seq, now));
            }
        }
        None
    }

    /// When [`Self::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.ack_deadline;
        if let Some(rto) = self.rto_deadline() {
            t = Some(t.map_or(rto, |t| t.min(rto)));
        }
        if let Some(s) = self.solicit_deadline() {
            t = Some(t.map_or(s, |t| t.min(s)));
        }
        if let Some(l) = self.liveness_deadline() {
            t = Some(t.map_or(l, |t| t.min(l)));
        }
        t
    }

    /// Runs the timers that are due at `now`; harmless when none is.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ack_deadline.is_some_and(|d| d <= now) {
            self.ack_deadline = None;
            self.ack_now = true;
        }
        if let Some(active) = self.active {
            if self.paths.get(&active).is_some_and(|p| !p.reliable) {
                let rto = self.backed_off_rto(active);
                let mut fired = false;
                for (i, e) in self.entries.iter().enumerate() {
                    let seq = self.base + i as u64;
                    if seq >= self.cursor {
                        break;
                    }
                    if let Some(s) = e.sent {
                        if !e.acked && s.path == active && s.at + rto <= now {
                            fired |= self.lost.insert(seq);
                        }
                    }
                }
                if fired {
                    self.stats.rto_fires += 1;
                    self.rto_backoff = (self.rto_backoff + 1).min(MAX_BACKOFF);
                }
            }
        }
        if let (Some(d), Some(active)) = (self.solicit_deadline(), self.active) {
            if d <= now {
                self.send_ping(active, now);
                self.solicit_anchor = Some(now);
                self.solicit_backoff = (self.solicit_backoff + 1).min(MAX_BACKOFF);
            }
        }
        self.check_liveness(now);
    }

    // ---- internals ----

    fn entry(&self, seq: u64) -> &Entry {
        &self.entries[(seq - self.base) as usize]
    }

    fn rx_limit(&self) -> u64 {
        self.rx_next - self.ready.len() as u64 + self.cfg.recv_window
    }

    fn blocked(&self) -> bool {
        self.active.is_some() && self.cursor < self.next_seq && self.cursor >= self.peer_limit
    }

    fn backed_off_rto(&self, path: PathId) -> Duration {
        let base = self
            .paths
            .get(&path)
            .map_or(self.cfg.initial_rtt * 3, |p| p.rtt.rto(&self.cfg));
        base.checked_mul(1u32 << self.rto_backoff)
            .map_or(self.cfg.max_rto, |d| d.min(self.cfg.max_rto))
    }

    /// When to ask the peer for an ACK with a PING (which it answers with PONG
    /// and ACK). Needed where no retransmission would draw one out: data in
    /// flight on a reliable path whose ACK the peer sent on a path that lost it,
    /// or a window update lost while we are blocked by the peer's window.
    fn solicit_deadline(&self) -> Option<Instant> {
        let active = self.active?;
        let reliable = self.paths.get(&active)?.reliable;
        let in_flight = self.earliest_in_flight(None);
        if !(reliable && in_flight.is_some() || self.blocked()) {
            return None;
        }
        let anchor = match (self.solicit_anchor, in_flight) {
            (Some(a), Some(f)) => a.max(f),
            (a, f) => a.or(f)?,
        };
        let interval = self
            .paths
            .get(&active)
            .map_or(self.cfg.initial_rtt * 3, |p| p.rtt.rto(&self.cfg) * 2);
        let interval = interval
            .checked_mul(1u32 << self.solicit_backoff)
            .map_or(self.cfg.max_rto, |d| d.min(self.cfg.max_rto));
        Some(anchor + interval)
    }

    /// Earliest send time of a message in flight (sent, unacknowledged, not
    /// already queued to be resent), optionally only those sent on `path`.
    fn earliest_in_flight(&self, path: Option<PathId>) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        for (i, e) in self.entries.iter().enumerate() {
            let seq = self.base + i as u64;
            if seq >= self.cursor {
                break;
            }
            match e.sent {
                Some(s)
                    if !e.acked
                        && path.is_none_or(|p| p == s.path)
                        && !self.lost.contains(&seq) =>
                {
                    earliest = Some(earliest.map_or(s.at, |t| t.min(s.at)));
                }
                _ => {}
            }
        }
        earliest
    }

    fn send_ping(&mut self, id: PathId, now: Instant) -> u64 {
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        if self.pings.len() >= MAX_CONTROL {
            if let Some((_, path, _)) = self.pings.pop_front() {
                if let Some(p) = self.paths.get_mut(&path) {
                    log_probe(p, false);
                }
            }
        }
        self.pings.push_back((nonce, id, now));
        if let Some(p) = self.paths.get_mut(&id) {
            p.awaiting.get_or_insert(now);
        }
        push_bounded(&mut self.control, (id, Frame::Ping { nonce }), MAX_CONTROL);
        nonce
    }

    /// Earliest moment an unacknowledged frame on the active, unreliable path is
    /// taken as lost. Reliable paths lose nothing while up, so they get no timer.
    fn rto_deadline(&self) -> Option<Instant> {
        let active = self.active?;
        if self.paths.get(&active)?.reliable {
            return None;
        }
        let rto = self.backed_off_rto(active);
        self.earliest_in_flight(Some(active)).map(|t| t + rto)
    }

    /// When a path is due for a liveness PING, or due to be declared dead.
    fn liveness_deadline(&self) -> Option<Instant> {
        let l = self.cfg.liveness.as_ref()?;
        self.paths
            .values()
            .map(|p| {
                let probe = self.probe_due(l, p);
                p.awaiting
                    .map_or(probe, |a| probe.min(a + Self::dead_after(l, p)))
            })
            .min()
    }

    /// When `p` is next sent a liveness PING: soon while the link is in use
    /// or the path owes an answer, rarely while all is idle. A function of
    /// state only, so the timer and the check always agree.
    fn probe_due(&self, l: &Liveness, p: &Path) -> Instant {
        let base = p.last_probe.map_or(p.last_heard, |t| t.max(p.last_heard));
        let soon = base + l.probe_after;
        let in_use_until = self.last_activity.map(|t| t + l.in_use_for);
        if p.awaiting.is_some() || in_use_until.is_some_and(|u| soon <= u) {
            soon
        } else {
            base + l.idle_probe_after.max(l.probe_after)
        }
    }

    fn dead_after(l: &Liveness, p: &Path) -> Duration {
        p.rtt.srtt.map_or(l.dead_after, |s| l.dead_after.max(s * 8))
    }

    /// Probes unanswered for long are logged as lost.
    fn expire_probes(&mut self, now: Instant) {
        let lost_after = |paths: &BTreeMap<PathId, Path>, path: &PathId| match (
            &self.cfg.liveness,
            paths.get(path),
        ) {
            (Some(l), Some(p)) => Self::dead_after(l, p),
            _ => PROBE_LOST_AFTER,
        };
        while let Some(&(_, path, at)) = self.pings.front() {
            if now < at + lost_after(&self.paths, &path) {
                break;
            }
            self.pings.pop_front();
            if let Some(p) = self.paths.get_mut(&path) {
                log_probe(p, false);
            }
        }
    }

    fn check_liveness(&mut self, now: Instant) {
        self.expire_probes(now);
        let Some(l) = self.cfg.liveness.clone() else {
            return;
        };
        let mut dead = Vec::new();
        let mut probe = Vec::new();
        for (id, p) in &self.paths {
            if p.awaiting
                .is_some_and(|a| now >= a + Self::dead_after(&l, p))
            {
                dead.push(*id);
            } else if now >= self.probe_due(&l, p) {
                probe.push(*id);
            }
        }
        for id in probe {
            self.send_ping(id, now);
            if let Some(p) = self.paths.get_mut(&id) {
                p.last_probe = Some(now);
            }
        }
        for id in dead {
            self.path_down(id, now);
            self.event(Event::PathDead(id));
        }
    }

    fn reselect(&mut self, now: Instant) {
        // Paths changed: ACKs sent lately may have gone down with one. Cheap to
        // repeat, and the peer may have nothing left to retransmit that would
        // draw out another.
        if self.rx_any {
            self.ack_now = true;
        }
        let pinned = self.preferred.filter(|p| self.paths.contains_key(p));
        let chosen = pinned.or_else(|| {
            self.paths
                .iter()
                .max_by_key(|(id, p)| {
                    (
                        p.kind.preference(),
                        Some(**id) == self.active,
                        Reverse(p.up_order),
                    )
                })
                .map(|(id, _)| *id)
        });
        if chosen != self.active {
            self.active = chosen;
            self.stats.path_switches += 1;
            self.event(Event::ActivePath(chosen));
            if chosen.is_some() {
                self.on_switch(now);
            }
        }
    }

    /// The new path knows nothing of what the old one carried: send every
    /// unacknowledged message again (the peer drops duplicates by sequence
    /// number) and tell the peer what we hold.
    fn on_switch(&mut self, now: Instant) {
        self.cursor = self.base;
        self.lost.clear();
        self.rto_backoff = 0;
        self.solicit_anchor = Some(now);
        self.solicit_backoff = 0;
    }

    fn on_data(
        &mut self,
        id: PathId,
        seq: u64,
        payload: Bytes,
        now: Instant,
    ) -> Result<(), FrameError> {
        if payload.len() > self.cfg.max_message_size {
            self.stats.protocol_errors += 1;
            return Err(FrameError::MessageTooLarge {
                len: payload.len(),
                max: self.cfg.max_message_size,
            });
        }
        self.rx_any = true;
        self.last_activity = Some(now);
        self.ack_path = Some(id);
        if seq < self.rx_next || self.reorder.contains_key(&seq) {
            // The sender retransmits only when it lacks an ACK: answer at once.
            self.stats.duplicates += 1;
            self.ack_now = true;
            return Ok(());
        }
        if seq >= self.rx_limit() {
            self.stats.window_drops += 1;
            self.ack_now = true;
            return Ok(());
        }
        if seq == self.rx_next {
            let had_gap = !self.reorder.is_empty();
            self.ready.push_back(payload);
            self.rx_next += 1;
            while let Some(entry) = self.reorder.first_entry() {
                if *entry.key() != self.rx_next {
                    break;
                }
                self.ready.push_back(entry.remove());
                self.rx_next += 1;
            }
            self.rx_since_ack += 1;
            if had_gap || self.rx_since_ack >= self.cfg.ack_every {
                self.ack_now = true;
            } else if self.ack_deadline.is_none() {
                self.ack_deadline = Some(now + self.cfg.max_ack_delay);
            }
        } else {
            // A gap: the sender should hear of it soon to resend.
            self.reorder.insert(seq, payload);
            self.ack_now = true;
        }
        Ok(())
    }

    fn on_ack(&mut self, ack: &Ack, now: Instant) -> Result<(), FrameError> {
        let top = ack.ranges.last().map_or(ack.cumulative, |r| r.end);
        if ack.cumulative > self.next_seq || top > self.next_seq {
            self.stats.protocol_errors += 1;
            return Err(FrameError::AckBeyondSent);
        }
        if ack.window_end > self.peer_limit {
            self.peer_limit = ack.window_end;
            self.solicit_anchor = Some(now);
            self.solicit_backoff = 0;
        }
        // Largest newly acknowledged message, for the RTT sample and loss detection.
        let mut newest: Option<(u64, Option<Sent>)> = None;
        while self.base < ack.cumulative {
            let e = self.entries.pop_front().expect("base < next_seq");
            if !e.acked {
                newest = Some((self.base, e.sent));
            }
            self.base += 1;
        }
        self.cursor = self.cursor.max(self.base);
        self.lost = self.lost.split_off(&self.base);
        for r in &ack.ranges {
            for seq in r.start.max(self.base)..r.end {
                let i = (seq - self.base) as usize;
                let e = &mut self.entries[i];
                if !e.acked {
                    e.acked = true;
                    e.payload = Bytes::new();
                    newest = Some((seq, e.sent));
                    self.lost.remove(&seq);
                }
            }
        }
        let Some((seq, sent)) = newest else {
            return Ok(());
        };
        self.rto_backoff = 0;
        self.solicit_anchor = Some(now);
        self.solicit_backoff = 0;
        let Some(sent) = sent else {
            // Acknowledged before we sent it: a probe from an earlier life, or a
            // retransmission that overtook; nothing to learn.
            return Ok(());
        };
        // Karn: a message sent more than once gives an ambiguous sample.
        if sent.count == 1 {
            if let Some(p) = self.paths.get_mut(&sent.path) {
                p.rtt.sample(now.saturating_duration_since(sent.at));
            }
        }
        if self.largest_acked.is_none_or(|(l, _)| seq > l) {
            self.largest_acked = Some((seq, sent.at));
        }
        self.detect_reordering_loss();
        Ok(())
    }

    /// Fast retransmit on unreliable paths: something sent no later than an
    /// acknowledged message well above it is lost, not merely late.
    fn detect_reordering_loss(&mut self) {
        let Some((largest, largest_at)) = self.largest_acked else {
            return;
        };
        let Some(limit) = largest.checked_sub(REORDER_THRESHOLD - 1) else {
            return;
        };
        let end = limit.min(self.cursor);
        for seq in self.base..end {
            let e = &self.entries[(seq - self.base) as usize];
            let Some(s) = e.sent else { continue };
            let unreliable = self.paths.get(&s.path).is_some_and(|p| !p.reliable);
            if !e.acked && unreliable && s.at <= largest_at {
                self.lost.insert(seq);
            }
        }
    }

    fn build_ack(&self) -> Ack {
        let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
        for &seq in self.reorder.keys() {
            if let Some(r) = ranges.last_mut().filter(|r| r.end == seq) {
                r.end += 1;
            } else if ranges.len() == MAX_ACK_RANGES {
                break;
            } else {
                ranges.push(seq..seq + 1);
            }
        }
        Ack {
            cumulative: self.rx_next,
            window_end: self.rx_limit(),
            ranges,
        }
    }

    fn emit_data(&mut self, path: PathId, seq: u64, now: Instant) -> Transmit {
        self.last_activity = Some(now);
        if let Some(p) = self.paths.get_mut(&path) {
            p.awaiting.get_or_insert(now);
        }
        let i = (seq - self.base) as usize;
        let e = &mut self.entries[i];
        let count = e.sent.map_or(0, |s| s.count) + 1;
        e.sent = Some(Sent {
            at: now,
            path,
            count,
        });
        let frame = Frame::Data {
            seq,
            payload: e.payload.clone(),
        };
        if count > 1 {
            self.stats.retransmits += 1;
            if let Some(p) = self.paths.get_mut(&path) {
                p.stats.retransmits += 1;
            }
        }
        self.emit(path, &frame)
    }

    fn emit(&mut self, path: PathId, frame: &Frame) -> Transmit {
        if let Frame::Ack(ack) = frame {
            self.ack_now = false;
            self.ack_deadline = None;
            self.rx_since_ack = 0;
            self.last_adv_limit = ack.window_end;
        }
        let bytes = frame.encode();
        if let Some(p) = self.paths.get_mut(&path) {
            p.stats.frames_out += 1;
            p.stats.bytes_out += bytes.len() as u64;
        }
        Transmit { path, frame: bytes }
    }

    fn event(&mut self, e: Event) {
        push_bounded(&mut self.events, e, MAX_EVENTS);
    }
}

/// Keeps the newest `cap` items: old probes and events matter least.
fn push_bounded<T>(q: &mut VecDeque<T>, item: T, cap: usize) {
    if q.len() >= cap {
        q.pop_front();
    }
    q.push_back(item);
}

/// Records one probe outcome on `p`, keeping the last [`PROBE_LOG`].
fn log_probe(p: &mut Path, answered: bool) {
    if p.probe_log.len() == PROBE_LOG {
        p.probe_log.pop_front();
    }
    p.probe_log.push_back(answered);
}
