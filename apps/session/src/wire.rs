//! The session protocol: small binary packets, the same codec for UDP between
//! a member and the origin and for peer inputs over the mesh.
//!
//! Every packet is `"PS"`, a version byte, a kind byte, then the body; all
//! integers are little-endian, strings are a length byte and UTF-8. Decoding
//! is strict (bounded counts, valid buttons, increasing ticks, no trailing
//! bytes): anything else is a [`WireError`] that the receiver drops and counts.

use crate::game::{Buttons, Player};

pub const MAGIC: [u8; 2] = *b"PS";
pub const VERSION: u8 = 1;
/// Longest session name.
pub const MAX_NAME: usize = 64;
/// Longest peer id (a libp2p PeerId in base58 is 52 characters).
pub const MAX_PEER: usize = 64;
/// Inputs in one batch.
pub const MAX_INPUTS: usize = 32;
/// Players in one session.
pub const MAX_PLAYERS: usize = 32;
/// Echoed inputs in one snapshot.
pub const MAX_ECHO: usize = 128;

/// One player input: the buttons held during `tick`, and when the player's
/// node first sent it (µs since the Unix epoch, the sender's clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Input {
    pub tick: u32,
    pub buttons: Buttons,
    pub sent_us: u64,
}

/// A player's inputs, in increasing tick order. `secret` proves to the origin
/// that the sender holds the slot; it is 0 on the mesh and in relays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputBatch {
    pub session: u32,
    pub secret: u32,
    pub slot: u8,
    pub inputs: Vec<Input>,
}

/// A player in a snapshot, with what the origin knows of its inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlayerState {
    pub player: Player,
    /// Highest input tick received from this player (its acknowledgement).
    pub last_input_tick: u32,
    /// Inputs that arrived after their tick was processed.
    pub late: u32,
}

/// An input the origin received since its previous snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo {
    pub slot: u8,
    pub input: Input,
}

/// The authoritative state after `tick`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub session: u32,
    pub tick: u32,
    /// When the origin sent it (µs since the Unix epoch).
    pub server_us: u64,
    pub roster_version: u32,
    pub players: Vec<PlayerState>,
    pub echo: Vec<Echo>,
}

/// Who holds which slot: (slot, peer id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roster {
    pub session: u32,
    pub version: u32,
    pub members: Vec<(u8, String)>,
}

/// Why a join was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    Full = 1,
    TooManySessions = 2,
    BadName = 3,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// Member → origin: join (creating it if needed) the session `name`.
    Join {
        name: String,
        peer: String,
        nonce: u64,
    },
    /// Origin → member.
    Welcome {
        nonce: u64,
        session: u32,
        secret: u32,
        slot: u8,
        tick_hz: u16,
        tick: u32,
    },
    Refused {
        nonce: u64,
        reason: Refusal,
    },
    /// Member → origin, and peer → peer over the mesh.
    Inputs(InputBatch),
    /// Origin → members: another member's new inputs, forwarded at once
    /// (only when the origin runs with input relaying on).
    Relayed(InputBatch),
    Snapshot(Snapshot),
    Roster(Roster),
    Leave {
        session: u32,
        secret: u32,
        slot: u8,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("packet too short")]
    Short,
    #[error("not a session packet")]
    Magic,
    #[error("unsupported version {0}")]
    Version(u8),
    #[error("unknown packet kind {0}")]
    Kind(u8),
    #[error("{0} over its limit")]
    TooMany(&'static str),
    #[error("string is not UTF-8")]
    Utf8,
    #[error("invalid buttons {0:#x}")]
    Buttons(u8),
    #[error("unknown refusal {0}")]
    Refusal(u8),
    #[error("input ticks not increasing")]
    Order,
    #[error("duplicate slot")]
    Slot,
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

mod kind {
    pub const JOIN: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const INPUTS: u8 = 4;
    pub const RELAYED: u8 = 5;
    pub const SNAPSHOT: u8 = 6;
    pub const ROSTER: u8 = 7;
    pub const LEAVE: u8 = 8;
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Short);
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn i32(&mut self) -> Result<i32, WireError> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self, max: usize, what: &'static str) -> Result<String, WireError> {
        let n = usize::from(self.u8()?);
        if n > max {
            return Err(WireError::TooMany(what));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::Utf8)
    }
    fn count(&mut self, max: usize, what: &'static str) -> Result<usize, WireError> {
        let n = usize::from(self.u8()?);
        if n > max {
            return Err(WireError::TooMany(what));
        }
        Ok(n)
    }
    fn buttons(&mut self) -> Result<Buttons, WireError> {
        let b = Buttons(self.u8()?);
        if b.is_valid() {
            Ok(b)
        } else {
            Err(WireError::Buttons(b.0))
        }
    }
    fn input(&mut self) -> Result<Input, WireError> {
        Ok(Input {
            tick: self.u32()?,
            buttons: self.buttons()?,
            sent_us: self.u64()?,
        })
    }
    fn batch(&mut self) -> Result<InputBatch, WireError> {
        let session = self.u32()?;
        let secret = self.u32()?;
        let slot = self.u8()?;
        let n = self.count(MAX_INPUTS, "inputs")?;
        let mut inputs = Vec::with_capacity(n);
        for _ in 0..n {
            let i = self.input()?;
            if inputs.last().is_some_and(|l: &Input| l.tick >= i.tick) {
                return Err(WireError::Order);
            }
            inputs.push(i);
        }
        Ok(InputBatch {
            session,
            secret,
            slot,
            inputs,
        })
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: u8) -> Self {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(&MAGIC);
        v.push(VERSION);
        v.push(kind);
        Self(v)
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Callers keep strings within their limits; longer ones are cut at a
    /// character boundary rather than written with a wrong length.
    fn string(&mut self, s: &str, max: usize) {
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u8(end as u8);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
    }
    fn input(&mut self, i: &Input) {
        self.u32(i.tick);
        self.u8(i.buttons.0);
        self.u64(i.sent_us);
    }
    fn batch(&mut self, b: &InputBatch) {
        self.u32(b.session);
        self.u32(b.secret);
        self.u8(b.slot);
        let n = b.inputs.len().min(MAX_INPUTS);
        self.u8(n as u8);
        // The newest inputs when there are too many.
        for i in &b.inputs[b.inputs.len() - n..] {
            self.input(i);
        }
    }
}

impl Packet {
    /// The packet's bytes. Lists longer than the protocol's limits are cut
    /// (the newest inputs and the first players are kept).
    pub fn encode(&self) -> Vec<u8> {
        let mut w;
        match self {
            Packet::Join { name, peer, nonce } => {
                w = Writer::new(kind::JOIN);
                w.string(name, MAX_NAME);
                w.string(peer, MAX_PEER);
                w.u64(*nonce);
            }
            Packet::Welcome {
                nonce,
                session,
                secret,
                slot,
                tick_hz,
                tick,
            } => {
                w = Writer::new(kind::WELCOME);
                w.u64(*nonce);
                w.u32(*session);
                w.u32(*secret);
                w.u8(*slot);
                w.u16(*tick_hz);
                w.u32(*tick);
            }
            Packet::Refused { nonce, reason } => {
                w = Writer::new(kind::REFUSED);
                w.u64(*nonce);
                w.u8(*reason as u8);
            }
            Packet::Inputs(b) => {
                w = Writer::new(kind::INPUTS);
                w.batch(b);
            }
            Packet::Relayed(b) => {
                w = Writer::new(kind::RELAYED);
                w.batch(b);
            }
            Packet::Snapshot(s) => {
                w = Writer::new(kind::SNAPSHOT);
                w.u32(s.session);
                w.u32(s.tick);
                w.u64(s.server_us);
                w.u32(s.roster_version);
                let players = &s.players[..s.players.len().min(MAX_PLAYERS)];
                w.u8(players.len() as u8);
                for p in players {
                    let q = &p.player;
                    w.u8(q.slot);
                    for v in [q.x, q.y, q.vx, q.vy] {
                        w.i32(v);
                    }
                    w.u8(q.buttons.0);
                    w.u32(q.score);
                    w.u32(p.last_input_tick);
                    w.u32(p.late);
                }
                let echo = &s.echo[..s.echo.len().min(MAX_ECHO)];
                w.u8(echo.len() as u8);
                for e in echo {
                    w.u8(e.slot);
                    w.input(&e.input);
                }
            }
            Packet::Roster(r) => {
                w = Writer::new(kind::ROSTER);
                w.u32(r.session);
                w.u32(r.version);
                let members = &r.members[..r.members.len().min(MAX_PLAYERS)];
                w.u8(members.len() as u8);
                for (slot, peer) in members {
                    w.u8(*slot);
                    w.string(peer, MAX_PEER);
                }
            }
            Packet::Leave {
                session,
                secret,
                slot,
            } => {
                w = Writer::new(kind::LEAVE);
                w.u32(*session);
                w.u32(*secret);
                w.u8(*slot);
            }
        }
        w.0
    }

    /// Parses one packet; never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Packet, WireError> {
        let mut r = Reader(bytes);
        if r.take(2)? != MAGIC {
            return Err(WireError::Magic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let p = match r.u8()? {
            kind::JOIN => Packet::Join {
                name: r.string(MAX_NAME, "session name")?,
                peer: r.string(MAX_PEER, "peer id")?,
                nonce: r.u64()?,
            },
            kind::WELCOME => Packet::Welcome {
                nonce: r.u64()?,
                session: r.u32()?,
                secret: r.u32()?,
                slot: r.u8()?,
                tick_hz: r.u16()?,
                tick: r.u32()?,
            },
            kind::REFUSED => Packet::Refused {
                nonce: r.u64()?,
                reason: match r.u8()? {
                    1 => Refusal::Full,
                    2 => Refusal::TooManySessions,
                    3 => Refusal::BadName,
                    other => return Err(WireError::Refusal(other)),
                },
            },
            kind::INPUTS => Packet::Inputs(r.batch()?),
            kind::RELAYED => Packet::Relayed(r.batch()?),
            kind::SNAPSHOT => {
                let session = r.u32()?;
                let tick = r.u32()?;
                let server_us = r.u64()?;
                let roster_version = r.u32()?;
                let n = r.count(MAX_PLAYERS, "players")?;
                let mut players: Vec<PlayerState> = Vec::with_capacity(n);
                for _ in 0..n {
                    let slot = r.u8()?;
                    if players.iter().any(|p| p.player.slot == slot) {
                        return Err(WireError::Slot);
                    }
                    let player = Player {
                        slot,
                        x: r.i32()?,
                        y: r.i32()?,
                        vx: r.i32()?,
                        vy: r.i32()?,
                        buttons: r.buttons()?,
                        score: r.u32()?,
                    };
                    players.push(PlayerState {
                        player,
                        last_input_tick: r.u32()?,
                        late: r.u32()?,
                    });
                }
                let n = r.count(MAX_ECHO, "echoed inputs")?;
                let mut echo = Vec::with_capacity(n);
                for _ in 0..n {
                    echo.push(Echo {
                        slot: r.u8()?,
                        input: r.input()?,
                    });
                }
                Packet::Snapshot(Snapshot {
                    session,
                    tick,
                    server_us,
                    roster_version,
                    players,
                    echo,
                })
            }
            kind::ROSTER => {
                let session = r.u32()?;
                let version = r.u32()?;
                let n = r.count(MAX_PLAYERS, "members")?;
                let mut members: Vec<(u8, String)> = Vec::with_capacity(n);
                for _ in 0..n {
                    let slot = r.u8()?;
                    if members.iter().any(|(s, _)| *s == slot) {
                        return Err(WireError::Slot);
                    }
                    members.push((slot, r.string(MAX_PEER, "peer id")?));
                }
                Packet::Roster(Roster {
                    session,
                    version,
                    members,
                })
            }
            kind::LEAVE => Packet::Leave {
                session: r.u32()?,
                secret: r.u32()?,
                slot: r.u8()?,
            },
            other => return Err(WireError::Kind(other)),
        };
        if !r.0.is_empty() {
            return Err(WireError::Trailing(r.0.len()));
        }
        Ok(p)
    }
}

/// Microseconds since the Unix epoch: the timestamps of the protocol.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The proptest strategies of the session's types, for every test of the
/// crate (the codec's here, the member state's in `state.rs`): one copy.
#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use proptest::prelude::*;

    /// An input for a tick drawn from `tick`, with valid buttons.
    pub fn input_at(tick: impl Strategy<Value = u32>) -> impl Strategy<Value = Input> {
        (tick, 0u8..16, any::<u64>()).prop_map(|(tick, b, sent_us)| Input {
            tick,
            buttons: Buttons(b),
            sent_us,
        })
    }

    pub fn input() -> impl Strategy<Value = Input> {
        input_at(any::<u32>())
    }

    pub fn batch() -> impl Strategy<Value = InputBatch> {
        (
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
            prop::collection::vec(input(), 0..MAX_INPUTS),
        )
            .prop_map(|(session, secret, slot, mut inputs)| {
                inputs.sort_by_key(|i| i.tick);
                inputs.dedup_by_key(|i| i.tick);
                InputBatch {
                    session,
                    secret,
                    slot,
                    inputs,
                }
            })
    }

    /// A player of a slot drawn from `slot`, anywhere (on the arena or not).
    pub fn player_state_in(slot: impl Strategy<Value = u8>) -> impl Strategy<Value = PlayerState> {
        (slot, any::<[i32; 4]>(), 0u8..16, any::<[u32; 3]>()).prop_map(
            |(slot, [x, y, vx, vy], b, [score, last, late])| PlayerState {
                player: Player {
                    slot,
                    x,
                    y,
                    vx,
                    vy,
                    buttons: Buttons(b),
                    score,
                },
                last_input_tick: last,
                late,
            },
        )
    }

    pub fn player_state() -> impl Strategy<Value = PlayerState> {
        player_state_in(any::<u8>())
    }

    pub fn packet() -> impl Strategy<Value = Packet> {
        prop_oneof![
            ("[a-z0-9-]{0,64}", "[A-Za-z0-9]{0,64}", any::<u64>())
                .prop_map(|(name, peer, nonce)| Packet::Join { name, peer, nonce }),
            any::<(u64, u32, u32, u8, u16, u32)>().prop_map(
                |(nonce, session, secret, slot, tick_hz, tick)| Packet::Welcome {
                    nonce,
                    session,
                    secret,
                    slot,
                    tick_hz,
                    tick
                }
            ),
            any::<u64>().prop_map(|nonce| Packet::Refused {
                nonce,
                reason: Refusal::Full
            }),
            batch().prop_map(Packet::Inputs),
            batch().prop_map(Packet::Relayed),
            (
                any::<(u32, u32, u64, u32)>(),
                prop::collection::vec(player_state(), 0..MAX_PLAYERS),
                prop::collection::vec((any::<u8>(), input()), 0..MAX_ECHO),
            )
                .prop_map(
                    |((session, tick, server_us, roster_version), mut players, echo)| {
                        players.sort_by_key(|p| p.player.slot);
                        players.dedup_by_key(|p| p.player.slot);
                        Packet::Snapshot(Snapshot {
                            session,
                            tick,
                            server_us,
                            roster_version,
                            players,
                            echo: echo
                                .into_iter()
                                .map(|(slot, input)| Echo { slot, input })
                                .collect(),
                        })
                    }
                ),
            (
                any::<(u32, u32)>(),
                prop::collection::btree_map(any::<u8>(), "[A-Za-z0-9]{1,64}", 0..MAX_PLAYERS)
            )
                .prop_map(|((session, version), m)| Packet::Roster(Roster {
                    session,
                    version,
                    members: m.into_iter().collect(),
                })),
            any::<(u32, u32, u8)>().prop_map(|(session, secret, slot)| Packet::Leave {
                session,
                secret,
                slot
            }),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::packet;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn packets_round_trip(p in packet()) {
            let bytes = p.encode();
            prop_assert_eq!(Packet::decode(&bytes), Ok(p));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Packet::decode(&bytes);
        }

        #[test]
        fn mangled_packets_never_panic_and_never_grow(p in packet(), cut in any::<prop::sample::Index>(),
                                                      flip in any::<prop::sample::Index>(), x in any::<u8>()) {
            let mut bytes = p.encode();
            let i = flip.index(bytes.len());
            bytes[i] ^= x;
            let _ = Packet::decode(&bytes);
            let n = cut.index(bytes.len());
            prop_assert!(Packet::decode(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn strictness() {
        let good = Packet::Leave {
            session: 1,
            secret: 2,
            slot: 3,
        }
        .encode();
        let mut extra = good.clone();
        extra.push(0);
        assert_eq!(Packet::decode(&extra), Err(WireError::Trailing(1)));
        let mut v = good.clone();
        v[2] = 9;
        assert_eq!(Packet::decode(&v), Err(WireError::Version(9)));
        let mut k = good.clone();
        k[3] = 99;
        assert_eq!(Packet::decode(&k), Err(WireError::Kind(99)));
        assert_eq!(Packet::decode(b"XX"), Err(WireError::Magic));
        // Buttons with undefined bits, and ticks going backwards.
        let b = |ticks: [u32; 2], buttons: u8| {
            let mut bytes = Packet::Inputs(InputBatch {
                session: 1,
                secret: 0,
                slot: 0,
                inputs: ticks
                    .iter()
                    .map(|&tick| Input {
                        tick,
                        buttons: Buttons(0),
                        sent_us: 0,
                    })
                    .collect(),
            })
            .encode();
            let at = 4 + 9 + 1 + 4; // header, batch header, count, first tick
            bytes[at] = buttons;
            Packet::decode(&bytes)
        };
        assert!(b([1, 2], 0).is_ok());
        assert_eq!(b([1, 2], 0x10), Err(WireError::Buttons(0x10)));
        assert_eq!(b([2, 2], 0), Err(WireError::Order));
    }
}
