//! The member's side of a session, sans-IO: what it knows (the last
//! authoritative snapshot, inputs of every player for later ticks, by route),
//! the merged state (the snapshot replayed with those inputs up to the
//! present tick), and the measurements (input latency per player and route,
//! snapshot age, prediction hits).
//!
//! Time is microseconds since the Unix epoch throughout, passed in by the
//! caller; the inputs' send times are the senders' clocks, which for
//! processes on one machine are the same clock.

use std::collections::{BTreeMap, VecDeque};

use crate::game::{Buttons, World};
use crate::wire::{Input, InputBatch, Roster, Snapshot};
use serde::{Deserialize, Serialize};

/// How far ahead of the estimated origin tick inputs are stamped, at first,
/// in ticks: the time an input has to reach the origin (and the peers)
/// before the origin plays its tick. 3 ticks (100 ms at 30 Hz) cover an
/// origin on the same continent; where they do not, the origin reports the
/// late inputs and the lead grows.
pub const INITIAL_LEAD: u32 = 3;
/// The lead never grows beyond this many ticks (500 ms at 30 Hz): a game
/// whose inputs take effect later than that is unplayable anyway, and the
/// bound keeps a confused origin from pushing our inputs ever further ahead.
pub const MAX_LEAD: u32 = 15;
/// The merged state is never replayed further than this many ticks past the
/// snapshot (8.5 s at 30 Hz): it bounds the work of one merge while the
/// snapshots stop coming, long after the prediction stopped meaning much.
pub const MAX_REPLAY: u32 = 256;
/// Own inputs the origin has not acknowledged, kept for resending: every
/// input packet repeats them, so an input survives this many lost packets in
/// a row (half a second at 30 Hz); within the wire's
/// [`crate::wire::MAX_INPUTS`] per batch.
pub const MAX_UNACKED: usize = 16;
/// Latency samples kept per player and route.
const SAMPLES: usize = 4096;
/// Prediction comparisons kept for the view.
const RECENT: usize = 64;
/// Microseconds in a second: times here are µs, tick rates per second.
const US_PER_SECOND: u64 = 1_000_000;
/// Microseconds in a millisecond: the view shows times in ms.
const US_PER_MS: f64 = 1000.0;

/// How a peer's input reached this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Straight from the peer over the mesh.
    Mesh,
    /// Forwarded by the origin as soon as it got it.
    Relay,
    /// Echoed by the origin in its next snapshot.
    Echo,
}

impl Route {
    const ALL: [Route; 3] = [Route::Mesh, Route::Relay, Route::Echo];
    fn index(self) -> usize {
        self as usize
    }
}

/// Why a peer input was not used.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// For another session.
    Foreign,
    /// A slot that is not in our roster (yet: a member's first inputs can
    /// arrive before the roster that lists it).
    UnknownSlot,
    /// A mesh sender that is not the slot's member, or our own slot.
    Impostor,
}

/// Latency samples of one route, a ring.
#[derive(Clone, Debug, Default)]
struct Samples {
    ring: VecDeque<u32>,
    count: u64,
    /// Inputs that reached this node first on this route.
    first: u64,
}

impl Samples {
    fn push(&mut self, us: u64) {
        if self.ring.len() == SAMPLES {
            self.ring.pop_front();
        }
        self.ring.push_back(us.min(u64::from(u32::MAX)) as u32);
        self.count += 1;
    }

    fn view(&self, with_samples: bool) -> RouteView {
        let mut v: Vec<u32> = self.ring.iter().copied().collect();
        v.sort_unstable();
        RouteView {
            inputs: self.count,
            first: self.first,
            p50_ms: percentile(&v, 0.50),
            p99_ms: percentile(&v, 0.99),
            samples_us: with_samples.then(|| self.ring.iter().copied().collect()),
        }
    }
}

/// The `q` quantile of sorted µs samples, in ms (nearest rank).
pub fn percentile(sorted: &[u32], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(f64::from(sorted[rank - 1]) / US_PER_MS)
}

/// One route's figures for one peer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteView {
    /// Inputs received on this route.
    pub inputs: u64,
    /// Of those, inputs this route delivered before any other.
    pub first: u64,
    /// Send → arrival, over the last samples.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The raw samples (µs), when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_us: Option<Vec<u32>>,
}

/// What this node knows about another player.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerView {
    pub slot: u8,
    pub peer: String,
    pub mesh: RouteView,
    pub relay: RouteView,
    pub echo: RouteView,
}

/// One player in the merged state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlayerView {
    pub slot: u8,
    pub peer: Option<String>,
    pub x: i32,
    pub y: i32,
    pub vx: i32,
    pub vy: i32,
    pub buttons: u8,
    pub score: u32,
}

/// The merged state's prediction of a tick against the origin's state of it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub tick: u32,
    pub predicted: u64,
    pub authoritative: u64,
    /// The prediction used a peer input that came over the mesh and changed
    /// what that peer held.
    pub used_mesh: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Predictions {
    /// Snapshots whose tick the merged state had predicted exactly.
    pub hits: u64,
    pub misses: u64,
    /// Hits that depended on a peer input from the mesh.
    pub mesh_hits: u64,
    pub recent: Vec<Comparison>,
}

/// Packets dropped and why.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Drops {
    pub malformed_mesh: u64,
    pub foreign_mesh: u64,
    pub impostor_mesh: u64,
    /// Mesh inputs for a slot not in the roster yet.
    pub unknown_slot_mesh: u64,
    pub malformed_udp: u64,
    pub unexpected_udp: u64,
    pub foreign_udp: u64,
    pub stale_snapshots: u64,
    pub mesh_queue_full: u64,
    pub mesh_no_link: u64,
}

/// The whole picture, for the local API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionView {
    pub name: String,
    pub origin: String,
    pub session_id: u32,
    pub slot: u8,
    pub tick_hz: u16,
    /// The present tick, as estimated from the last snapshot.
    pub tick: u32,
    /// Inputs are stamped this many ticks ahead of the present.
    pub lead: u32,
    /// The last authoritative snapshot.
    pub base_tick: u32,
    pub base_checksum: u64,
    /// The merged state at `tick`.
    pub checksum: u64,
    pub players: Vec<PlayerView>,
    /// Now minus the origin's send time of the last snapshot.
    pub snapshot_age_ms: Option<f64>,
    /// Origin → this node, over recent snapshots.
    pub snapshot_transit: RouteView,
    pub snapshots: u64,
    pub own_inputs: u64,
    pub buttons: u8,
    pub predictions: Predictions,
    pub peers: Vec<PeerView>,
    pub drops: Drops,
}

/// The entries of `m` for ticks after `tick`.
fn after<V>(mut m: BTreeMap<u32, V>, tick: u32) -> BTreeMap<u32, V> {
    match tick.checked_add(1) {
        Some(next) => m.split_off(&next),
        None => BTreeMap::new(),
    }
}

/// The member's state of one session.
pub struct ClientState {
    pub name: String,
    pub origin: String,
    pub session: u32,
    pub secret: u32,
    pub slot: u8,
    pub tick_hz: u16,
    roster: BTreeMap<u8, String>,
    roster_version: u32,
    /// The last snapshot, when its arrived (our clock) and was sent (origin's).
    base: Option<(World, u64, u64)>,
    lead: u32,
    last_late: u32,
    /// Inputs for ticks after the base: slot → tick → (buttons, first route).
    known: BTreeMap<u8, BTreeMap<u32, (Buttons, Route)>>,
    unacked: VecDeque<Input>,
    last_sent_tick: u32,
    buttons: Buttons,
    own_inputs: u64,
    /// The latest prediction of each tick: checksum, used a mesh input.
    predicted: BTreeMap<u32, (u64, bool)>,
    predictions: Predictions,
    latency: BTreeMap<u8, [Samples; 3]>,
    transit: Samples,
    snapshots: u64,
    pub drops: Drops,
}

impl ClientState {
    pub fn new(
        name: String,
        origin: String,
        session: u32,
        secret: u32,
        slot: u8,
        tick_hz: u16,
    ) -> Self {
        Self {
            name,
            origin,
            session,
            secret,
            slot,
            tick_hz: tick_hz.max(1),
            roster: BTreeMap::new(),
            roster_version: 0,
            base: None,
            lead: INITIAL_LEAD,
            last_late: 0,
            known: BTreeMap::new(),
            unacked: VecDeque::new(),
            last_sent_tick: 0,
            buttons: Buttons::default(),
            own_inputs: 0,
            predicted: BTreeMap::new(),
            predictions: Predictions::default(),
            latency: BTreeMap::new(),
            transit: Samples::default(),
            snapshots: 0,
            drops: Drops::default(),
        }
    }

    /// Members other than us, by slot.
    pub fn peers(&self) -> impl Iterator<Item = (u8, &str)> {
        self.roster
            .iter()
            .filter(|(s, _)| **s != self.slot)
            .map(|(s, p)| (*s, p.as_str()))
    }

    pub fn set_buttons(&mut self, b: Buttons) {
        self.buttons = b;
    }

    /// The present tick: the one the origin is playing now, whose snapshot
    /// has not arrived yet. That is the tick after the last snapshot's, plus
    /// the whole ticks since it arrived.
    pub fn present_tick(&self, now_us: u64) -> Option<u32> {
        let (w, arrived, _) = self.base.as_ref()?;
        let ticks = now_us
            .saturating_sub(*arrived)
            .saturating_mul(u64::from(self.tick_hz))
            / US_PER_SECOND;
        Some(
            w.tick
                .saturating_add(1 + ticks.min(u64::from(MAX_REPLAY - 1)) as u32),
        )
    }

    /// This tick's own input, stamped `lead` ticks ahead; `None` before the
    /// first snapshot or when that tick already has one.
    pub fn next_input(&mut self, now_us: u64) -> Option<Input> {
        let tick = self.present_tick(now_us)?.saturating_add(self.lead);
        if tick <= self.last_sent_tick {
            return None;
        }
        let input = Input {
            tick,
            buttons: self.buttons,
            sent_us: now_us,
        };
        self.last_sent_tick = tick;
        self.own_inputs += 1;
        self.known
            .entry(self.slot)
            .or_default()
            .insert(tick, (self.buttons, Route::Mesh));
        if self.unacked.len() == MAX_UNACKED {
            self.unacked.pop_front();
        }
        self.unacked.push_back(input);
        Some(input)
    }

    /// What goes to the origin: every own input it has not acknowledged.
    pub fn origin_batch(&self) -> InputBatch {
        InputBatch {
            session: self.session,
            secret: self.secret,
            slot: self.slot,
            inputs: self.unacked.iter().copied().collect(),
        }
    }

    /// What goes to each peer over the mesh: one input, no secret.
    pub fn mesh_batch(&self, input: Input) -> InputBatch {
        InputBatch {
            session: self.session,
            secret: 0,
            slot: self.slot,
            inputs: vec![input],
        }
    }

    pub fn on_roster(&mut self, r: Roster) -> Result<bool, Rejected> {
        if r.session != self.session {
            self.drops.foreign_udp += 1;
            return Err(Rejected::Foreign);
        }
        if r.version < self.roster_version {
            return Ok(false);
        }
        let changed = r.members.iter().cloned().collect::<BTreeMap<_, _>>() != self.roster;
        self.roster = r.members.into_iter().collect();
        self.roster_version = r.version;
        self.latency.retain(|s, _| self.roster.contains_key(s));
        Ok(changed)
    }

    /// A peer's inputs from `route`; `mesh_peer` is the authenticated sender
    /// of a mesh message.
    pub fn on_peer_inputs(
        &mut self,
        b: &InputBatch,
        route: Route,
        mesh_peer: Option<&str>,
        now_us: u64,
    ) -> Result<(), Rejected> {
        if b.session != self.session {
            return Err(Rejected::Foreign);
        }
        let Some(member) = self.roster.get(&b.slot) else {
            return Err(Rejected::UnknownSlot);
        };
        if b.slot == self.slot || mesh_peer.is_some_and(|p| p != member) {
            return Err(Rejected::Impostor);
        }
        for i in &b.inputs {
            self.learn(b.slot, *i, route, now_us);
        }
        Ok(())
    }

    fn learn(&mut self, slot: u8, i: Input, route: Route, now_us: u64) {
        let s = &mut self.latency.entry(slot).or_default()[route.index()];
        s.push(now_us.saturating_sub(i.sent_us));
        let base_tick = self.base.as_ref().map_or(0, |b| b.0.tick);
        if i.tick <= base_tick {
            return; // the snapshot already has it
        }
        let ticks = self.known.entry(slot).or_default();
        if let std::collections::btree_map::Entry::Vacant(e) = ticks.entry(i.tick) {
            e.insert((i.buttons, route));
            s.first += 1;
        }
        // Bound what a flood of far-future inputs can hold.
        while ticks.len() > 2 * MAX_REPLAY as usize {
            ticks.pop_last();
        }
    }

    /// The authoritative state after a tick: becomes the new base.
    pub fn on_snapshot(&mut self, s: Snapshot, now_us: u64) -> Result<(), Rejected> {
        if s.session != self.session {
            self.drops.foreign_udp += 1;
            return Err(Rejected::Foreign);
        }
        if self.base.as_ref().is_some_and(|b| b.0.tick >= s.tick) {
            self.drops.stale_snapshots += 1;
            return Ok(());
        }
        let Some(world) =
            World::from_players(s.tick, s.players.iter().map(|p| p.player.clone()).collect())
        else {
            self.drops.malformed_udp += 1;
            return Ok(());
        };
        self.snapshots += 1;
        self.transit.push(now_us.saturating_sub(s.server_us));
        let authoritative = world.checksum();
        if let Some((predicted, used_mesh)) = self.predicted.remove(&s.tick) {
            if predicted == authoritative {
                self.predictions.hits += 1;
                self.predictions.mesh_hits += u64::from(used_mesh);
            } else {
                self.predictions.misses += 1;
            }
            if self.predictions.recent.len() == RECENT {
                self.predictions.recent.remove(0);
            }
            self.predictions.recent.push(Comparison {
                tick: s.tick,
                predicted,
                authoritative,
                used_mesh,
            });
        }
        self.predicted = after(std::mem::take(&mut self.predicted), s.tick);
        if let Some(me) = s.players.iter().find(|p| p.player.slot == self.slot) {
            while self
                .unacked
                .front()
                .is_some_and(|i| i.tick <= me.last_input_tick)
            {
                self.unacked.pop_front();
            }
            // Our inputs reach the origin too late: stamp them further ahead.
            if me.late > self.last_late {
                self.lead = (self.lead + 1).min(MAX_LEAD);
            }
            self.last_late = me.late;
        }
        for k in self.known.values_mut() {
            *k = after(std::mem::take(k), s.tick);
        }
        self.base = Some((world, now_us, s.server_us));
        for e in &s.echo {
            if e.slot != self.slot && self.roster.contains_key(&e.slot) {
                self.learn(e.slot, e.input, Route::Echo, now_us);
            }
        }
        Ok(())
    }

    /// The merged state at the present tick: the last snapshot replayed with
    /// every input known for the ticks after it (a player whose input for a
    /// tick is unknown holds its buttons, as on the origin). Remembers the
    /// prediction to check against the snapshot of that tick.
    pub fn merged(&mut self, now_us: u64) -> Option<World> {
        let present = self.present_tick(now_us)?;
        let (base, _, _) = self.base.as_ref()?;
        let mut w = base.clone();
        let mut used_mesh = false;
        while w.tick < present {
            let t = w.tick + 1;
            let held: BTreeMap<u8, Buttons> =
                w.players.iter().map(|p| (p.slot, p.buttons)).collect();
            let known = &self.known;
            let me = self.slot;
            w.step(|slot| {
                let (b, route) = *known.get(&slot)?.get(&t)?;
                if slot != me && route == Route::Mesh && held.get(&slot) != Some(&b) {
                    used_mesh = true;
                }
                Some(b)
            });
        }
        self.predicted.insert(w.tick, (w.checksum(), used_mesh));
        while self.predicted.len() > MAX_REPLAY as usize {
            self.predicted.pop_first();
        }
        Some(w)
    }

    pub fn view(&mut self, now_us: u64, samples: bool) -> SessionView {
        let merged = self.merged(now_us);
        let (base_tick, base_checksum, age) = match &self.base {
            Some((w, _, sent)) => (
                w.tick,
                w.checksum(),
                Some(now_us.saturating_sub(*sent) as f64 / US_PER_MS),
            ),
            None => (0, 0, None),
        };
        let players = merged
            .as_ref()
            .map(|w| {
                w.players
                    .iter()
                    .map(|p| PlayerView {
                        slot: p.slot,
                        peer: self.roster.get(&p.slot).cloned(),
                        x: p.x,
                        y: p.y,
                        vx: p.vx,
                        vy: p.vy,
                        buttons: p.buttons.0,
                        score: p.score,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let empty = <[Samples; 3]>::default();
        let peers = self
            .peers()
            .map(|(slot, peer)| {
                let l = self.latency.get(&slot).unwrap_or(&empty);
                let [mesh, relay, echo] = Route::ALL.map(|r| l[r.index()].view(samples));
                PeerView {
                    slot,
                    peer: peer.to_string(),
                    mesh,
                    relay,
                    echo,
                }
            })
            .collect();
        SessionView {
            name: self.name.clone(),
            origin: self.origin.clone(),
            session_id: self.session,
            slot: self.slot,
            tick_hz: self.tick_hz,
            tick: merged.as_ref().map_or(0, |w| w.tick),
            lead: self.lead,
            base_tick,
            base_checksum,
            checksum: merged.as_ref().map_or(0, |w| w.checksum()),
            players,
            snapshot_age_ms: age,
            snapshot_transit: self.transit.view(samples),
            snapshots: self.snapshots,
            own_inputs: self.own_inputs,
            buttons: self.buttons.0,
            predictions: self.predictions.clone(),
            peers,
            drops: self.drops.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Echo, PlayerState};

    const HZ: u16 = 50; // 20 ms ticks
    const TICK_US: u64 = 20_000;

    /// An origin in miniature: applies inputs exactly as the real one does.
    struct Origin {
        world: World,
        pending: BTreeMap<(u8, u32), Buttons>,
    }

    impl Origin {
        fn step(&mut self) -> Snapshot {
            let t = self.world.tick + 1;
            let pending = &mut self.pending;
            self.world.step(|s| pending.remove(&(s, t)));
            Snapshot {
                session: 1,
                tick: self.world.tick,
                server_us: 0,
                roster_version: 1,
                players: self
                    .world
                    .players
                    .iter()
                    .map(|p| PlayerState {
                        player: p.clone(),
                        last_input_tick: 0,
                        late: 0,
                    })
                    .collect(),
                echo: Vec::new(),
            }
        }
    }

    fn member(slot: u8) -> ClientState {
        let mut c = ClientState::new("g".into(), "o".into(), 1, 9, slot, HZ);
        c.on_roster(Roster {
            session: 1,
            version: 1,
            members: vec![(0, "peer-0".into()), (1, "peer-1".into())],
        })
        .unwrap();
        c
    }

    #[test]
    fn peer_inputs_from_the_mesh_make_the_prediction_exact() {
        let mut world = World::new(0);
        world.join(0);
        world.join(1);
        let mut origin = Origin {
            world,
            pending: BTreeMap::new(),
        };
        let (mut a, mut b) = (member(0), member(1));
        let mut now = 1_000_000u64;
        let first = origin.step();
        a.on_snapshot(first.clone(), now).unwrap();
        b.on_snapshot(first, now).unwrap();
        for round in 0..200u32 {
            now += TICK_US;
            // Each player changes its buttons every few ticks.
            a.set_buttons(Buttons(
                [Buttons::LEFT, Buttons::DOWN, 0][(round / 3 % 3) as usize],
            ));
            b.set_buttons(Buttons(
                [Buttons::UP | Buttons::RIGHT, 0][(round / 5 % 2) as usize],
            ));
            let mut exchange = |me: &mut ClientState, other: &mut ClientState| {
                if let Some(i) = me.next_input(now) {
                    origin.pending.insert((me.slot, i.tick), i.buttons);
                    let peer = format!("peer-{}", me.slot);
                    other
                        .on_peer_inputs(&me.mesh_batch(i), Route::Mesh, Some(&peer), now + 500)
                        .unwrap();
                }
            };
            exchange(&mut a, &mut b);
            exchange(&mut b, &mut a);
            // Both predict the present, then the origin's tick arrives.
            a.merged(now + 1000);
            b.merged(now + 1000);
            let s = origin.step();
            a.on_snapshot(s.clone(), now + 2000).unwrap();
            b.on_snapshot(s, now + 2000).unwrap();
        }
        for c in [&a, &b] {
            let p = &c.predictions;
            assert_eq!(p.misses, 0, "{p:?}");
            assert!(p.hits > 150 && p.mesh_hits > 20, "{p:?}");
        }
        let v = a.view(now + 3000, false);
        assert_eq!(v.peers.len(), 1);
        assert_eq!(v.peers[0].mesh.inputs, b.own_inputs);
        assert_eq!(v.peers[0].mesh.p50_ms, Some(0.5));
    }

    #[test]
    fn without_peer_inputs_predictions_miss_and_the_snapshot_corrects_them() {
        let mut world = World::new(0);
        world.join(0);
        world.join(1);
        let mut origin = Origin {
            world,
            pending: BTreeMap::new(),
        };
        let mut a = member(0);
        let mut now = 1_000_000u64;
        a.on_snapshot(origin.step(), now).unwrap();
        for round in 0..100u32 {
            now += TICK_US;
            // Player 1 plays through the origin only; a never hears of it.
            origin.pending.insert(
                (1, origin.world.tick + 2),
                Buttons([Buttons::LEFT, Buttons::RIGHT][(round / 2 % 2) as usize]),
            );
            a.merged(now + 500);
            a.on_snapshot(origin.step(), now + 1000).unwrap();
        }
        assert!(a.predictions.misses > 10, "{:?}", a.predictions);
        // Reconciled: the base is the origin's state, whatever was predicted.
        let v = a.view(now + 1000, false);
        assert_eq!(v.base_checksum, origin.world.checksum());
        assert_eq!(v.base_tick, origin.world.tick);
    }

    #[test]
    fn impostors_and_foreign_inputs_are_refused_and_unacked_inputs_shrink() {
        let mut a = member(0);
        let i = Input {
            tick: 5,
            buttons: Buttons(1),
            sent_us: 0,
        };
        let batch = |session, slot| InputBatch {
            session,
            secret: 0,
            slot,
            inputs: vec![i],
        };
        assert_eq!(
            a.on_peer_inputs(&batch(2, 1), Route::Mesh, Some("peer-1"), 0),
            Err(Rejected::Foreign)
        );
        assert_eq!(
            a.on_peer_inputs(&batch(1, 1), Route::Mesh, Some("peer-7"), 0),
            Err(Rejected::Impostor)
        );
        assert_eq!(
            a.on_peer_inputs(&batch(1, 0), Route::Mesh, Some("peer-0"), 0),
            Err(Rejected::Impostor)
        );
        assert_eq!(
            a.on_peer_inputs(&batch(1, 3), Route::Relay, None, 0),
            Err(Rejected::UnknownSlot)
        );
        assert!(a
            .on_peer_inputs(&batch(1, 1), Route::Relay, None, 0)
            .is_ok());

        let mut w = World::new(10);
        w.join(0);
        let snap = |tick, last| Snapshot {
            session: 1,
            tick,
            server_us: 0,
            roster_version: 1,
            players: vec![PlayerState {
                player: w.players[0].clone(),
                last_input_tick: last,
                late: 0,
            }],
            echo: vec![Echo {
                slot: 1,
                input: Input {
                    tick: tick + 1,
                    ..i
                },
            }],
        };
        a.on_snapshot(snap(10, 0), 1_000_000).unwrap();
        let mut ticks = Vec::new();
        for k in 1..=5 {
            ticks.push(a.next_input(1_000_000 + k * 40_000).unwrap().tick);
        }
        assert_eq!(a.origin_batch().inputs.len(), 5);
        a.on_snapshot(snap(11, ticks[2]), 1_300_000).unwrap();
        assert_eq!(a.origin_batch().inputs.len(), 2);
        // An older snapshot arriving late is ignored.
        a.on_snapshot(snap(10, 0), 1_300_000).unwrap();
        assert_eq!(a.drops.stale_snapshots, 1);
        let v = a.view(1_300_000, false);
        assert_eq!(v.peers[0].echo.inputs, 2);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::wire::strategies::{input_at, player_state_in};
    use crate::wire::Echo;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Event {
        Snapshot(Snapshot),
        Roster(Roster),
        Inputs(InputBatch, Route, bool),
        Tick(u64),
    }

    /// Ticks near the start of a session, anywhere, and the last one.
    fn tick() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..64, any::<u32>(), Just(u32::MAX)]
    }

    fn input() -> impl Strategy<Value = Input> {
        input_at(tick())
    }

    fn event() -> impl Strategy<Value = Event> {
        let player = player_state_in(0u8..6);
        prop_oneof![
            (
                0u32..3,
                tick(),
                any::<u64>(),
                prop::collection::vec(player, 0..6),
                prop::collection::vec((0u8..6, input()), 0..8),
            )
                .prop_map(|(session, tick, server_us, players, echo)| {
                    Event::Snapshot(Snapshot {
                        session,
                        tick,
                        server_us,
                        roster_version: 1,
                        players,
                        echo: echo
                            .into_iter()
                            .map(|(slot, input)| Echo { slot, input })
                            .collect(),
                    })
                }),
            (
                0u32..3,
                any::<u32>(),
                prop::collection::btree_map(0u8..6, "p[0-3]", 0..6)
            )
                .prop_map(|(session, version, m)| Event::Roster(Roster {
                    session,
                    version,
                    members: m.into_iter().collect(),
                })),
            (
                0u32..3,
                0u8..6,
                prop::collection::vec(input(), 0..8),
                prop_oneof![Just(Route::Mesh), Just(Route::Relay), Just(Route::Echo)],
                any::<bool>(),
            )
                .prop_map(|(session, slot, inputs, route, signed)| {
                    Event::Inputs(
                        InputBatch {
                            session,
                            secret: 0,
                            slot,
                            inputs,
                        },
                        route,
                        signed,
                    )
                }),
            any::<u64>().prop_map(Event::Tick),
        ]
    }

    proptest! {
        /// Whatever the origin and the peers send, in any order, the member
        /// never panics and its merged state stays within the replay bound.
        #[test]
        fn hostile_sequences_never_panic(events in prop::collection::vec(event(), 0..40)) {
            let mut c = ClientState::new("g".into(), "o".into(), 1, 7, 0, 30);
            for e in events {
                match e {
                    Event::Snapshot(s) => { let _ = c.on_snapshot(s, 1_000_000); }
                    Event::Roster(r) => { let _ = c.on_roster(r); }
                    Event::Inputs(b, route, signed) => {
                        let peer = format!("p{}", b.slot);
                        let _ = c.on_peer_inputs(&b, route, signed.then_some(peer.as_str()), 1_000_000);
                    }
                    Event::Tick(now) => {
                        let _ = c.next_input(now);
                        if let Some(w) = c.merged(now) {
                            let base = c.view(now, false).base_tick;
                            prop_assert!(w.tick.wrapping_sub(base) <= MAX_REPLAY);
                        }
                    }
                }
            }
            let _ = c.view(u64::MAX, true);
        }
    }
}
