//! This node's side of punches coordinated through the control server
//! (seed 002), as decisions with no I/O: when a link's wish for a punch
//! turns into a request (not before the NAT's mapping is known, not while
//! the last attempt for that peer still runs), what this node offers, which
//! punch the callee answers an offer with, and in which order the
//! candidates go (predicted ports first, seed 003).
//!
//! The node library's shell does the rest: the STUN probe behind an offer,
//! the gRPC calls, the probe sockets and the QUIC dials.

use std::collections::HashSet;
use std::hash::Hash;
use std::time::Duration;

use peermesh_base::status::PunchStats;
use peermesh_base::{NatBehavior, NatMapping};

use crate::hole_punch::plan::{is_random, worth_trying};

/// How long a callee waits for its own NAT's mapping verdict before it
/// answers a punch without it: the verdict takes a few round trips to the
/// STUN server, and the caller's `RequestPunch` waits for our answer only
/// so long (the control server's rendezvous timeout is longer).
pub const MAPPING_VERDICT_PATIENCE: Duration = Duration::from_millis(2500);

/// Why [`Answer::Nothing`], as status shows it.
pub const NO_DIRECT_PATH: &str =
    "no direct path possible (random symmetric NAT against a symmetric one)";

/// This node's NAT as a punch needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Own {
    /// `None`: not measured (no STUN, or not yet).
    pub mapping: Option<NatMapping>,
    /// No NAT: opening packets have nothing to open and would reach the
    /// peer's router.
    pub no_nat: bool,
}

impl Own {
    /// From what discovery found so far.
    pub fn of(nat: Option<&NatBehavior>) -> Self {
        Self {
            mapping: nat.and_then(|n| n.mapping),
            no_nat: nat.is_some_and(|n| n.no_nat),
        }
    }

    /// The stride to predict our next ports by, on a sequential NAT.
    pub fn stride(&self) -> Option<i32> {
        match self.mapping {
            Some(NatMapping::Sequential { stride }) => Some(stride),
            _ => None,
        }
    }
}

/// What the callee does with a caller's offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Punch from probe sockets.
    Probe,
    /// Decline: punch from the mesh's QUIC socket.
    Quic,
    /// No direct path can exist (a random symmetric NAT against another
    /// symmetric one): answer with an offer so that the caller knows too,
    /// and send nothing; forwarding or the relay carries the link.
    Nothing,
}

/// Probe sockets when a side's mapping is random (the mesh's QUIC socket
/// cannot punch it), when both are sequential (libp2p dials the predicted
/// ports in no fixed order, so the two sides' new mappings rarely pair up;
/// probe sockets send in order), or when the caller falls back to them.
pub fn answer(own: Option<NatMapping>, peer: Option<NatMapping>, fallback: bool) -> Answer {
    if !worth_trying(own, peer) {
        return Answer::Nothing;
    }
    let both_sequential = matches!(
        (own, peer),
        (
            Some(NatMapping::Sequential { .. }),
            Some(NatMapping::Sequential { .. })
        )
    );
    if fallback || is_random(own) || is_random(peer) || both_sequential {
        Answer::Probe
    } else {
        Answer::Quic
    }
}

/// Whether the next request to a peer falls back to probe sockets: the
/// attempts alternate, so a punch from the QUIC socket that did not work
/// (a router without WAN firewall, whose conntrack takes the port) is
/// followed by one from probe sockets with low-TTL opening packets.
pub fn falls_back(stats: &PunchStats) -> bool {
    stats.quic_attempts > stats.probe_attempts
}

/// `candidates` after `predicted` (the ports a sequential NAT will give our
/// next mappings), without repeats, at most `max`.
pub fn predicted_first<T: PartialEq>(candidates: Vec<T>, predicted: Vec<T>, max: usize) -> Vec<T> {
    let mut out = predicted;
    out.extend(
        candidates
            .into_iter()
            .filter(|c| !out.contains(c))
            .collect::<Vec<_>>(),
    );
    out.truncate(max);
    out
}

/// What discovery has told us so far.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Knowledge {
    /// Not started (no STUN endpoint in the map yet): punch without it.
    None,
    /// Running; the mapping verdict is not in yet. Punches wait for it: an
    /// opening packet before it would take the mapping that prediction
    /// then cannot name.
    Discovering,
    /// The mapping verdict (filtering still being measured), or the whole
    /// behaviour.
    Known(NatBehavior),
    /// Discovery could not run: punch without prediction from now on.
    Failed,
}

/// A punch this node should ask the control server for now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<P> {
    pub peer: P,
    /// Offer probe sockets with the `fallback` flag (see [`falls_back`]).
    pub fallback: bool,
    pub own: Own,
}

/// The caller's side of coordinated punches for all links of a node.
#[derive(Debug)]
pub struct PunchCoordinator<P> {
    nat: Knowledge,
    /// Peers whose punch waits for the mapping verdict.
    deferred: Vec<P>,
    /// Peers with an attempt under way: a new one waits for its end (two
    /// attempts' probe sockets would take turns in a sequential NAT's
    /// counter, and neither prediction would hold).
    punching: HashSet<P>,
}

impl<P: Clone + Eq + Hash> Default for PunchCoordinator<P> {
    fn default() -> Self {
        Self {
            nat: Knowledge::None,
            deferred: Vec::new(),
            punching: HashSet::new(),
        }
    }
}

impl<P: Clone + Eq + Hash> PunchCoordinator<P> {
    /// Discovery has started against the server's STUN endpoints.
    pub fn discovery_started(&mut self) {
        if self.nat == Knowledge::None {
            self.nat = Knowledge::Discovering;
        }
    }

    /// Whether discovery runs and the mapping verdict is not in yet.
    pub fn awaiting_mapping(&self) -> bool {
        self.nat == Knowledge::Discovering
    }

    /// The mapping verdict (or the whole behaviour) is in: the punches that
    /// waited for it go now.
    pub fn nat_known(
        &mut self,
        nat: NatBehavior,
        stats: impl Fn(&P) -> PunchStats,
    ) -> Vec<Request<P>> {
        self.nat = Knowledge::Known(nat);
        self.release(stats)
    }

    /// Discovery could not run: punches go without prediction.
    pub fn discovery_failed(&mut self, stats: impl Fn(&P) -> PunchStats) -> Vec<Request<P>> {
        self.nat = Knowledge::Failed;
        self.release(stats)
    }

    fn release(&mut self, stats: impl Fn(&P) -> PunchStats) -> Vec<Request<P>> {
        std::mem::take(&mut self.deferred)
            .into_iter()
            .filter_map(|p| {
                let s = stats(&p);
                self.punch_wanted(p, &s)
            })
            .collect()
    }

    /// This node's NAT as far as it is known.
    pub fn own(&self) -> Own {
        match &self.nat {
            Knowledge::Known(n) => Own::of(Some(n)),
            _ => Own::of(None),
        }
    }

    /// A link wants a punch to `peer` (`stats`: its punches so far). The
    /// request to send now, or `None`: it waits for the mapping verdict, or
    /// for the attempt under way.
    pub fn punch_wanted(&mut self, peer: P, stats: &PunchStats) -> Option<Request<P>> {
        if self.awaiting_mapping() {
            if !self.deferred.contains(&peer) {
                self.deferred.push(peer);
            }
            return None;
        }
        if !self.punching.insert(peer.clone()) {
            return None;
        }
        Some(Request {
            peer,
            fallback: falls_back(stats),
            own: self.own(),
        })
    }

    /// The attempt for `peer` ended (whatever its outcome).
    pub fn punch_ended(&mut self, peer: &P) {
        self.punching.remove(peer);
    }

    /// `peer` left the group.
    pub fn forget(&mut self, peer: &P) {
        self.punching.remove(peer);
        self.deferred.retain(|p| p != peer);
    }

    /// Whether an attempt for `peer` is under way.
    pub fn is_punching(&self, peer: &P) -> bool {
        self.punching.contains(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EI: Option<NatMapping> = Some(NatMapping::EndpointIndependent);
    const RANDOM: Option<NatMapping> = Some(NatMapping::Random);
    const SEQ1: Option<NatMapping> = Some(NatMapping::Sequential { stride: 1 });
    const SEQ2: Option<NatMapping> = Some(NatMapping::Sequential { stride: 2 });

    fn nat(mapping: Option<NatMapping>) -> NatBehavior {
        NatBehavior {
            udp: true,
            public: None,
            no_nat: false,
            mapping,
            filtering: None,
            mapped_ports: vec![],
        }
    }

    #[test]
    fn callee_takes_up_hard_pairs_and_fallbacks_only() {
        assert_eq!(answer(EI, EI, false), Answer::Quic);
        assert_eq!(answer(EI, EI, true), Answer::Probe);
        assert_eq!(answer(RANDOM, EI, false), Answer::Probe);
        assert_eq!(answer(EI, RANDOM, false), Answer::Probe);
        assert_eq!(answer(RANDOM, RANDOM, true), Answer::Nothing);
        assert_eq!(answer(SEQ2, SEQ1, false), Answer::Probe);
        assert_eq!(answer(EI, SEQ1, false), Answer::Quic);
        assert_eq!(answer(RANDOM, SEQ1, false), Answer::Nothing);
        // Unknown NATs are tried the usual way.
        assert_eq!(answer(None, RANDOM, false), Answer::Probe);
        assert_eq!(answer(None, None, false), Answer::Quic);
        // An address-dependent mapping has no port to aim at either.
        assert_eq!(
            answer(Some(NatMapping::AddressDependent), EI, false),
            Answer::Probe
        );
    }

    #[test]
    fn predictions_go_first_once() {
        assert_eq!(
            predicted_first(vec!["a", "p2", "b"], vec!["p1", "p2"], 32),
            vec!["p1", "p2", "a", "b"]
        );
        assert_eq!(
            predicted_first(vec!["a", "b"], vec!["p"], 2),
            vec!["p", "a"]
        );
        assert_eq!(predicted_first(vec!["a"], vec![], 32), vec!["a"]);
    }

    #[test]
    fn punches_wait_for_the_mapping_verdict_then_all_go() {
        let mut c = PunchCoordinator::<u32>::default();
        let none = PunchStats::default();
        // Before discovery starts (no STUN yet): at once.
        assert!(c.punch_wanted(1, &none).is_some());
        c.punch_ended(&1);
        c.discovery_started();
        assert!(c.awaiting_mapping());
        assert_eq!(c.punch_wanted(1, &none), None);
        assert_eq!(c.punch_wanted(2, &none), None);
        assert_eq!(c.punch_wanted(1, &none), None, "deferred once");
        let released = c.nat_known(nat(SEQ1), |_| PunchStats::default());
        assert_eq!(
            released.iter().map(|r| r.peer).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(released[0].own.stride(), Some(1));
        assert!(!c.awaiting_mapping());
        // The full verdict later changes nothing for those under way.
        assert!(c.nat_known(nat(SEQ1), |_| none.clone()).is_empty());
    }

    #[test]
    fn failed_discovery_releases_punches_without_prediction() {
        let mut c = PunchCoordinator::<u32>::default();
        c.discovery_started();
        assert_eq!(c.punch_wanted(7, &PunchStats::default()), None);
        let r = c.discovery_failed(|_| PunchStats::default());
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].own,
            Own {
                mapping: None,
                no_nat: false
            }
        );
    }

    #[test]
    fn one_attempt_per_peer_at_a_time() {
        let mut c = PunchCoordinator::<u32>::default();
        let s = PunchStats::default();
        assert!(c.punch_wanted(1, &s).is_some());
        assert!(c.is_punching(&1));
        assert_eq!(c.punch_wanted(1, &s), None);
        assert!(c.punch_wanted(2, &s).is_some(), "other peers go on");
        c.punch_ended(&1);
        assert!(c.punch_wanted(1, &s).is_some());
        c.forget(&1);
        assert!(!c.is_punching(&1));
    }

    #[test]
    fn attempts_alternate_to_probe_sockets_after_a_quic_punch() {
        let mut c = PunchCoordinator::<u32>::default();
        let mut s = PunchStats::default();
        assert!(!c.punch_wanted(1, &s).unwrap().fallback);
        c.punch_ended(&1);
        s.quic_attempts = 1;
        assert!(c.punch_wanted(1, &s).unwrap().fallback);
        c.punch_ended(&1);
        s.probe_attempts = 1;
        assert!(!c.punch_wanted(1, &s).unwrap().fallback);
    }

    #[test]
    fn own_nat_from_discovery() {
        let mut n = nat(EI);
        n.no_nat = true;
        assert_eq!(
            Own::of(Some(&n)),
            Own {
                mapping: EI,
                no_nat: true
            }
        );
        assert_eq!(Own::of(None).stride(), None);
    }
}
