//! The deterministic game model shared by the origin (which advances it
//! authoritatively) and the nodes (which replay it from the last
//! authoritative snapshot with the inputs they know, to predict the present).
//!
//! Everything is integer arithmetic in a fixed order (players sorted by
//! slot), so two processes that start from the same [`World`] and apply the
//! same inputs reach bit-identical states; [`World::checksum`] compares them.
//!
//! The game: each player is a puck in a square arena that wraps around. The
//! held buttons accelerate it, friction slows it when no button of an axis is
//! held, and two pucks that touch swap velocities and score a point each, so
//! one player's inputs change the others' states too.

use serde::Serialize;

/// Side of the arena in fixed-point units (positions wrap in `0..ARENA`).
pub const ARENA: i32 = 1 << 16;
/// Largest speed per axis, units per tick.
pub const MAX_SPEED: i32 = 768;
/// Speed gained per tick while a direction is held.
pub const ACCEL: i32 = 96;
/// Speed lost per tick on an axis with no button held.
pub const FRICTION: i32 = 48;
/// Two pucks closer than this on both axes touch.
pub const RADIUS: i32 = 2048;

/// The buttons a player holds during one tick: a bit set of
/// [`Buttons::UP`], [`Buttons::DOWN`], [`Buttons::LEFT`], [`Buttons::RIGHT`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Buttons(pub u8);

impl Buttons {
    pub const UP: u8 = 1;
    pub const DOWN: u8 = 2;
    pub const LEFT: u8 = 4;
    pub const RIGHT: u8 = 8;
    /// Every bit that means something; others are refused on the wire.
    pub const VALID: u8 = 0x0f;

    pub fn is_valid(self) -> bool {
        self.0 & !Self::VALID == 0
    }

    /// The direction held on each axis: -1, 0 or 1 (opposite buttons cancel).
    fn axes(self) -> (i32, i32) {
        let h = |neg: u8, pos: u8| i32::from(self.0 & pos != 0) - i32::from(self.0 & neg != 0);
        (h(Self::LEFT, Self::RIGHT), h(Self::UP, Self::DOWN))
    }
}

/// `pos + v`, wrapped into the arena (any inputs, no overflow).
fn wrap(pos: i32, v: i32) -> i32 {
    (i64::from(pos) + i64::from(v)).rem_euclid(i64::from(ARENA)) as i32
}

/// One player's puck.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Player {
    pub slot: u8,
    pub x: i32,
    pub y: i32,
    pub vx: i32,
    pub vy: i32,
    /// The buttons applied in the last tick; held on while no newer input is known.
    pub buttons: Buttons,
    pub score: u32,
}

impl Player {
    /// A new player at a spawn point that depends only on its slot.
    pub fn spawn(slot: u8) -> Self {
        let s = i32::from(slot);
        Self {
            slot,
            x: (s * 7919 * 97).rem_euclid(ARENA),
            y: (s * 104_729 * 13).rem_euclid(ARENA),
            vx: 0,
            vy: 0,
            buttons: Buttons::default(),
            score: 0,
        }
    }

    fn accelerate(v: i32, dir: i32) -> i32 {
        if dir != 0 {
            v.saturating_add(dir * ACCEL).clamp(-MAX_SPEED, MAX_SPEED)
        } else if v > 0 {
            v.saturating_sub(FRICTION).max(0)
        } else {
            v.saturating_add(FRICTION).min(0)
        }
    }
}

/// The whole game state after tick `tick` was processed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct World {
    pub tick: u32,
    /// Sorted by slot, slots unique.
    pub players: Vec<Player>,
}

impl World {
    pub fn new(tick: u32) -> Self {
        Self {
            tick,
            players: Vec::new(),
        }
    }

    /// A world from players in any order (a decoded snapshot); `None` when
    /// two share a slot or a player is off the arena or too fast.
    pub fn from_players(tick: u32, mut players: Vec<Player>) -> Option<Self> {
        let ok = |p: &Player| {
            (0..ARENA).contains(&p.x)
                && (0..ARENA).contains(&p.y)
                && p.vx.abs() <= MAX_SPEED
                && p.vy.abs() <= MAX_SPEED
                && p.buttons.is_valid()
        };
        if !players.iter().all(ok) {
            return None;
        }
        players.sort_by_key(|p| p.slot);
        if players.windows(2).any(|w| w[0].slot == w[1].slot) {
            return None;
        }
        Some(Self { tick, players })
    }

    pub fn player(&self, slot: u8) -> Option<&Player> {
        self.players
            .binary_search_by_key(&slot, |p| p.slot)
            .ok()
            .map(|i| &self.players[i])
    }

    /// Adds a player at its spawn point (no-op when the slot is taken).
    pub fn join(&mut self, slot: u8) {
        if let Err(i) = self.players.binary_search_by_key(&slot, |p| p.slot) {
            self.players.insert(i, Player::spawn(slot));
        }
    }

    pub fn leave(&mut self, slot: u8) {
        self.players.retain(|p| p.slot != slot);
    }

    /// Advances to `tick + 1`. `input(slot)` is the player's input for the
    /// new tick, `None` when unknown: the player keeps the buttons it held.
    pub fn step(&mut self, mut input: impl FnMut(u8) -> Option<Buttons>) {
        self.tick = self.tick.wrapping_add(1);
        for p in &mut self.players {
            if let Some(b) = input(p.slot) {
                p.buttons = b;
            }
            let (dx, dy) = p.buttons.axes();
            p.vx = Player::accelerate(p.vx, dx);
            p.vy = Player::accelerate(p.vy, dy);
            p.x = wrap(p.x, p.vx);
            p.y = wrap(p.y, p.vy);
        }
        // Touching pucks swap velocities, in slot order.
        let n = self.players.len();
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (&self.players[i], &self.players[j]);
                let near = |p: i32, q: i32| (i64::from(p) - i64::from(q)).abs() < i64::from(RADIUS);
                if near(a.x, b.x) && near(a.y, b.y) {
                    let (l, r) = self.players.split_at_mut(j);
                    let (a, b) = (&mut l[i], &mut r[0]);
                    std::mem::swap(&mut a.vx, &mut b.vx);
                    std::mem::swap(&mut a.vy, &mut b.vy);
                    a.score = a.score.wrapping_add(1);
                    b.score = b.score.wrapping_add(1);
                }
            }
        }
    }

    /// FNV-1a over every field, in order: equal worlds, equal checksums.
    pub fn checksum(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&self.tick.to_le_bytes());
        for p in &self.players {
            eat(&[p.slot, p.buttons.0]);
            for v in [p.x, p.y, p.vx, p.vy] {
                eat(&v.to_le_bytes());
            }
            eat(&p.score.to_le_bytes());
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(n: u8) -> World {
        let mut w = World::new(0);
        for s in 0..n {
            w.join(s);
        }
        w
    }

    #[test]
    fn held_buttons_accelerate_and_friction_stops() {
        let mut w = world(1);
        let (x0, y0) = (w.players[0].x, w.players[0].y);
        w.step(|_| Some(Buttons(Buttons::RIGHT | Buttons::UP)));
        assert_eq!((w.players[0].vx, w.players[0].vy), (ACCEL, -ACCEL));
        for _ in 0..20 {
            w.step(|_| None); // keeps holding
        }
        assert_eq!(w.players[0].vx, MAX_SPEED);
        assert_ne!(w.players[0].x, x0);
        assert_ne!(w.players[0].y, y0);
        for _ in 0..20 {
            w.step(|_| Some(Buttons(0)));
        }
        assert_eq!((w.players[0].vx, w.players[0].vy), (0, 0));
        assert!(w.players.iter().all(|p| (0..ARENA).contains(&p.x)));
    }

    #[test]
    fn touching_pucks_swap_velocities_and_score() {
        let mut w = world(2);
        w.players[0].x = 1000;
        w.players[0].y = 1000;
        w.players[1].x = 2500;
        w.players[1].y = 1000;
        w.step(|s| Some(Buttons(if s == 0 { Buttons::RIGHT } else { 0 })));
        assert_eq!(w.players[0].score, 1);
        assert_eq!(w.players[1].vx, ACCEL);
        assert_eq!(w.players[0].vx, 0);
    }

    #[test]
    fn same_inputs_same_state_different_inputs_different_checksum() {
        let inputs = |t: u32, s: u8| Buttons(((t / 7 + u32::from(s) * 3) % 16) as u8);
        let run = |flip: Option<u32>| {
            let mut w = world(4);
            for _ in 0..500 {
                let t = w.tick + 1;
                w.step(|s| {
                    let mut b = inputs(t, s);
                    if flip == Some(t) && s == 2 {
                        b.0 ^= Buttons::LEFT;
                    }
                    Some(b)
                });
            }
            w
        };
        let (a, b) = (run(None), run(None));
        assert_eq!(a, b);
        assert_eq!(a.checksum(), b.checksum());
        assert_ne!(a.checksum(), run(Some(100)).checksum());
    }

    #[test]
    fn worlds_from_players_are_sorted_and_unique() {
        let w = World::from_players(5, vec![Player::spawn(3), Player::spawn(1)]).unwrap();
        assert_eq!(w.players[0].slot, 1);
        assert!(w.player(3).is_some() && w.player(2).is_none());
        assert!(World::from_players(5, vec![Player::spawn(1), Player::spawn(1)]).is_none());
        let mut fast = Player::spawn(1);
        fast.vx = MAX_SPEED + 1;
        assert!(World::from_players(5, vec![fast]).is_none());
        let mut off = Player::spawn(1);
        off.x = ARENA;
        assert!(World::from_players(5, vec![off]).is_none());
    }
}
