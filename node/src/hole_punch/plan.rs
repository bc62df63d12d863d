//! From the two sides' probe offers to one side's [`Instruction`]: who
//! opens many sockets, who probes predicted or random ports (seed 003).

use std::net::SocketAddr;
use std::time::Instant;

use super::machine::{Instruction, Role};
use super::predict::{
    PortPrediction, DEFAULT_BIRTHDAY_PROBES, DEFAULT_BIRTHDAY_SOCKETS, DEFAULT_SEQUENTIAL_WINDOW,
};

/// A NAT's mapping as the offers spell it (`NatReport.mapping`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    Unknown,
    /// No NAT, or endpoint-independent (cone) mapping.
    Stable,
    /// Endpoint-dependent with a measured port step.
    Sequential(i32),
    Random,
}

impl Mapping {
    pub fn parse(mapping: &str, stride: i32) -> Self {
        match mapping {
            "endpoint_independent" => Self::Stable,
            "sequential" if stride != 0 => Self::Sequential(stride),
            // Endpoint-dependent without a step we could measure.
            "sequential" | "address_dependent" | "random" => Self::Random,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "",
            Self::Stable => "endpoint_independent",
            Self::Sequential(_) => "sequential",
            Self::Random => "random",
        }
    }

    pub fn stride(self) -> i32 {
        match self {
            Self::Sequential(s) => s,
            _ => 0,
        }
    }
}

/// One side's offer: its first probe socket's public endpoint and its NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    pub endpoint: SocketAddr,
    pub mapping: Mapping,
}

/// Whether a punch from probe sockets can work at all. A random symmetric
/// NAT is found only by a birthday search from a side whose mapping stays
/// put: against another random NAT there is nothing to aim at, and a
/// sequential NAT would give each of the ~1500 random probes a mapping of
/// its own (using up its counter for every flow behind it). Forwarding
/// through a member serves those pairs instead.
pub fn worth_trying(own: Mapping, peer: Mapping) -> bool {
    let hard = |m| matches!(m, Mapping::Random | Mapping::Sequential(_));
    !((own == Mapping::Random && hard(peer)) || (peer == Mapping::Random && hard(own)))
}

/// This side's instruction for one attempt. `None` when it cannot work.
pub fn instruction(
    role: Role,
    attempt_id: u64,
    start_at: Instant,
    own: &Offer,
    peer: &Offer,
) -> Option<Instruction> {
    if !worth_trying(own.mapping, peer.mapping) {
        return None;
    }
    let prediction = match peer.mapping {
        Mapping::Sequential(stride) => Some(PortPrediction::Sequential {
            ip: peer.endpoint.ip(),
            last_port: peer.endpoint.port(),
            stride,
            window: DEFAULT_SEQUENTIAL_WINDOW,
        }),
        Mapping::Random => Some(PortPrediction::Random {
            ip: peer.endpoint.ip(),
            probes: DEFAULT_BIRTHDAY_PROBES,
        }),
        Mapping::Stable | Mapping::Unknown => None,
    };
    // The random side opens many mappings; the other side's random probes
    // look for one of them (the birthday search).
    let local_sockets = if own.mapping == Mapping::Random {
        DEFAULT_BIRTHDAY_SOCKETS
    } else {
        1
    };
    // A sequential peer's STUN endpoint is a mapping towards the server,
    // never towards us; sending there would also take one of our own next
    // mappings out of the order the peer predicts them in.
    let peer_candidates = match peer.mapping {
        Mapping::Sequential(_) => Vec::new(),
        _ => vec![peer.endpoint],
    };
    Some(Instruction {
        attempt_id,
        role,
        start_at,
        peer_candidates,
        prediction,
        local_sockets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(endpoint: &str, mapping: Mapping) -> Offer {
        Offer {
            endpoint: endpoint.parse().unwrap(),
            mapping,
        }
    }

    #[test]
    fn mapping_spellings() {
        assert_eq!(Mapping::parse("endpoint_independent", 0), Mapping::Stable);
        assert_eq!(Mapping::parse("sequential", 2), Mapping::Sequential(2));
        assert_eq!(Mapping::parse("sequential", 0), Mapping::Random);
        assert_eq!(Mapping::parse("random", 0), Mapping::Random);
        assert_eq!(Mapping::parse("", 0), Mapping::Unknown);
        assert_eq!(Mapping::parse("junk", 5), Mapping::Unknown);
        for m in [Mapping::Stable, Mapping::Sequential(3), Mapping::Random] {
            assert_eq!(Mapping::parse(m.as_str(), m.stride()), m);
        }
    }

    #[test]
    fn random_against_cone_is_a_birthday_search() {
        let t = Instant::now();
        let hard = offer("198.18.0.5:40000", Mapping::Random);
        let easy = offer("198.18.0.6:41000", Mapping::Stable);
        let h = instruction(Role::Initiator, 7, t, &hard, &easy).unwrap();
        assert_eq!(h.local_sockets, DEFAULT_BIRTHDAY_SOCKETS);
        assert_eq!(h.prediction, None);
        assert_eq!(h.peer_candidates, vec![easy.endpoint]);
        let e = instruction(Role::Responder, 7, t, &easy, &hard).unwrap();
        assert_eq!(e.local_sockets, 1);
        assert_eq!(
            e.prediction,
            Some(PortPrediction::Random {
                ip: hard.endpoint.ip(),
                probes: DEFAULT_BIRTHDAY_PROBES
            })
        );
    }

    #[test]
    fn sequential_peers_get_a_window_after_their_last_port() {
        let t = Instant::now();
        let seq = offer("198.18.0.5:20010", Mapping::Sequential(1));
        let cone = offer("198.18.0.6:41000", Mapping::Stable);
        let i = instruction(Role::Initiator, 1, t, &cone, &seq).unwrap();
        assert!(i.peer_candidates.is_empty(), "only predicted ports");
        let targets = i.prediction.unwrap().targets();
        assert_eq!(targets.first().map(|a| a.port()), Some(20011));
        assert_eq!(targets.len(), usize::from(DEFAULT_SEQUENTIAL_WINDOW));
    }

    #[test]
    fn random_nats_are_tried_only_against_stable_mappings() {
        let t = Instant::now();
        let r = offer("198.18.0.5:40000", Mapping::Random);
        let s = offer("198.18.0.7:20000", Mapping::Sequential(1));
        let c = offer("198.18.0.6:41000", Mapping::Stable);
        assert!(instruction(Role::Initiator, 1, t, &r, &r).is_none());
        assert!(instruction(Role::Initiator, 1, t, &r, &s).is_none());
        assert!(instruction(Role::Responder, 1, t, &s, &r).is_none());
        assert!(instruction(Role::Initiator, 1, t, &c, &c).is_some());
        assert!(instruction(Role::Initiator, 1, t, &s, &s).is_some());
        assert!(instruction(Role::Initiator, 1, t, &r, &c).is_some());
    }
}
