//! From the two sides' probe offers to one side's [`Instruction`]: who
//! opens many sockets, who probes predicted or random ports (seed 003).

use std::net::SocketAddr;
use std::time::Instant;

use peermesh_base::NatMapping;

use super::machine::{Instruction, Role};
use crate::port_prediction::{
    PortPrediction, BIRTHDAY_PROBES, BIRTHDAY_SOCKETS, PREDICTION_WINDOW,
};

/// Whether a mapping gives the other side no port to aim at: a new random
/// port per destination, or one per destination address (which a punch
/// sees the same way: the port towards us is not the one the server saw).
pub fn is_random(m: Option<NatMapping>) -> bool {
    matches!(m, Some(NatMapping::Random | NatMapping::AddressDependent))
}

/// One side's offer: its first probe socket's public endpoint and its NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    pub endpoint: SocketAddr,
    /// `None`: not measured (yet).
    pub mapping: Option<NatMapping>,
}

/// Whether a punch from probe sockets can work at all. A random symmetric
/// NAT is found only by a birthday search from a side whose mapping stays
/// put: against another random NAT there is nothing to aim at, and a
/// sequential NAT would give each of the ~1500 random probes a mapping of
/// its own (using up its counter for every flow behind it). Forwarding
/// through a member serves those pairs instead.
pub fn worth_trying(own: Option<NatMapping>, peer: Option<NatMapping>) -> bool {
    let hard =
        |m: Option<NatMapping>| m.is_some_and(NatMapping::is_endpoint_dependent) || is_random(m);
    !((is_random(own) && hard(peer)) || (is_random(peer) && hard(own)))
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
        Some(NatMapping::Sequential { stride }) => Some(PortPrediction::Sequential {
            ip: peer.endpoint.ip(),
            last_port: peer.endpoint.port(),
            stride,
            window: PREDICTION_WINDOW,
        }),
        m if is_random(m) => Some(PortPrediction::Random {
            ip: peer.endpoint.ip(),
            probes: BIRTHDAY_PROBES,
        }),
        _ => None,
    };
    // The random side opens many mappings; the other side's random probes
    // look for one of them (the birthday search).
    let local_sockets = if is_random(own.mapping) {
        BIRTHDAY_SOCKETS
    } else {
        1
    };
    // A sequential peer's STUN endpoint is a mapping towards the server,
    // never towards us; sending there would also take one of our own next
    // mappings out of the order the peer predicts them in.
    let peer_candidates = match peer.mapping {
        Some(NatMapping::Sequential { .. }) => Vec::new(),
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

    const RANDOM: Option<NatMapping> = Some(NatMapping::Random);
    const STABLE: Option<NatMapping> = Some(NatMapping::EndpointIndependent);
    const SEQ1: Option<NatMapping> = Some(NatMapping::Sequential { stride: 1 });

    fn offer(endpoint: &str, mapping: Option<NatMapping>) -> Offer {
        Offer {
            endpoint: endpoint.parse().unwrap(),
            mapping,
        }
    }

    #[test]
    fn address_dependent_mappings_are_planned_as_random() {
        let t = Instant::now();
        let ad = offer("198.18.0.5:40000", Some(NatMapping::AddressDependent));
        let easy = offer("198.18.0.6:41000", STABLE);
        let i = instruction(Role::Initiator, 7, t, &ad, &easy).unwrap();
        assert_eq!(i.local_sockets, BIRTHDAY_SOCKETS);
        assert!(instruction(Role::Initiator, 1, t, &ad, &offer("198.18.0.7:1", SEQ1)).is_none());
    }

    #[test]
    fn random_against_cone_is_a_birthday_search() {
        let t = Instant::now();
        let hard = offer("198.18.0.5:40000", RANDOM);
        let easy = offer("198.18.0.6:41000", STABLE);
        let h = instruction(Role::Initiator, 7, t, &hard, &easy).unwrap();
        assert_eq!(h.local_sockets, BIRTHDAY_SOCKETS);
        assert_eq!(h.prediction, None);
        assert_eq!(h.peer_candidates, vec![easy.endpoint]);
        let e = instruction(Role::Responder, 7, t, &easy, &hard).unwrap();
        assert_eq!(e.local_sockets, 1);
        assert_eq!(
            e.prediction,
            Some(PortPrediction::Random {
                ip: hard.endpoint.ip(),
                probes: BIRTHDAY_PROBES
            })
        );
    }

    #[test]
    fn sequential_peers_get_a_window_after_their_last_port() {
        let t = Instant::now();
        let seq = offer("198.18.0.5:20010", SEQ1);
        let cone = offer("198.18.0.6:41000", STABLE);
        let i = instruction(Role::Initiator, 1, t, &cone, &seq).unwrap();
        assert!(i.peer_candidates.is_empty(), "only predicted ports");
        let targets = i.prediction.unwrap().targets();
        assert_eq!(targets.first().map(|a| a.port()), Some(20011));
        assert_eq!(targets.len(), usize::from(PREDICTION_WINDOW));
    }

    #[test]
    fn random_nats_are_tried_only_against_stable_mappings() {
        let t = Instant::now();
        let r = offer("198.18.0.5:40000", RANDOM);
        let s = offer("198.18.0.7:20000", SEQ1);
        let c = offer("198.18.0.6:41000", STABLE);
        assert!(instruction(Role::Initiator, 1, t, &r, &r).is_none());
        assert!(instruction(Role::Initiator, 1, t, &r, &s).is_none());
        assert!(instruction(Role::Responder, 1, t, &s, &r).is_none());
        assert!(instruction(Role::Initiator, 1, t, &c, &c).is_some());
        assert!(instruction(Role::Initiator, 1, t, &s, &s).is_some());
        assert!(instruction(Role::Initiator, 1, t, &r, &c).is_some());
    }
}
