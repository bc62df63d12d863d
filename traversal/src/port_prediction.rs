//! The port predictor (seed 003): what a NAT's observed ports say about the
//! next one it will hand out, and where the other side should aim.
//!
//! One rule for "sequential" ([`sequential_stride`]), used both by NAT
//! discovery and by [`classify_mapping`]; one prediction of the next ports
//! ([`predict`]), used for our own offers and the peer's targets.

use std::net::{IpAddr, SocketAddr};

use peermesh_base::NatMapping;

/// Predicted ports offered to a peer for one punch, and probed past the last
/// observed one: covers other hosts behind the same router taking a few
/// ports in between.
pub const PREDICTION_WINDOW: u16 = 8;
/// Most predicted ports ever offered for one punch, however many candidates
/// the punch opens to (each opening takes the next mapping of a sequential
/// NAT, so the window grows with them).
pub const MAX_PREDICTION_WINDOW: u16 = 24;
/// Sockets the side behind a random symmetric NAT opens.
pub const BIRTHDAY_SOCKETS: u16 = 256;
/// Random ports the other side probes. With 256 open mappings out of ~64k
/// ports, 1536 probes miss all of them with probability e^-6 ≈ 0.25%.
pub const BIRTHDAY_PROBES: u32 = 1536;
/// Port steps larger than this count as random unless they repeat exactly
/// (see [`sequential_stride`]): churn from other hosts makes the steps of a
/// sequential NAT multiples of its stride, and only small multiples tell a
/// counter from chance.
pub const MAX_STRIDE: u16 = 64;

/// The stride of a sequential NAT from the steps between consecutive mapped
/// ports, or `None` (random). Two rules:
///
/// - the same step every time, at least twice, whatever its size: a NAT
///   that hands out ports at any constant delta (some allocate in blocks,
///   or step by a prime) is as predictable as one that counts by one;
/// - small steps of one sign (at most [`MAX_STRIDE`]), the smallest being
///   the stride: other flows from behind the same NAT may take ports between
///   ours (churn), so the steps are multiples of the stride, not equal.
///
/// One step alone is trusted only if it is small: a random NAT gives any
/// one step, but two equal large ones only about once in 65,000 tries.
pub fn sequential_stride(steps: &[i32]) -> Option<i32> {
    let first = *steps.first()?;
    if first != 0 && steps.len() >= 2 && steps.iter().all(|s| *s == first) {
        return Some(first);
    }
    let small = |x: &i32| *x != 0 && x.unsigned_abs() <= u32::from(MAX_STRIDE);
    let one_sign = steps.iter().all(|x| *x > 0) || steps.iter().all(|x| *x < 0);
    if !one_sign || !steps.iter().all(small) {
        return None;
    }
    steps.iter().min_by_key(|x| x.abs()).copied()
}

/// The mapping behind public endpoints that one local socket got towards
/// two or more server ports, in the order it sent to them (the view of a
/// server that sees only those). Whether there is a NAT at all is the
/// caller's question (`observed` all equal to the local endpoint).
pub fn classify_mapping(observed: &[SocketAddr]) -> NatMapping {
    let Some(first) = observed.first() else {
        return NatMapping::Random;
    };
    if observed.iter().any(|o| o.ip() != first.ip()) {
        return NatMapping::Random;
    }
    if observed.iter().all(|o| o.port() == first.port()) {
        return NatMapping::EndpointIndependent;
    }
    let steps: Vec<i32> = observed
        .windows(2)
        .map(|w| i32::from(w[1].port()) - i32::from(w[0].port()))
        .collect();
    sequential_stride(&steps).map_or(NatMapping::Random, |stride| NatMapping::Sequential {
        stride,
    })
}

/// The public endpoints the next `window` new mappings of a sequential NAT
/// will get, after the one at `last`, nearest first (ports that would leave
/// 1..=65535 are left out).
pub fn predict(last: SocketAddr, stride: i32, window: u16) -> Vec<SocketAddr> {
    (1..=i32::from(window))
        .filter_map(|k| {
            let port = i32::from(last.port()) + stride * k;
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .map(|p| SocketAddr::new(last.ip(), p))
        })
        .collect()
}

/// Where the peer's NAT will put the peer's packets to us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortPrediction {
    /// The peer's next mapping is `last_port + stride * j` for a small `j`:
    /// probe `j = 1..=window`.
    Sequential {
        ip: IpAddr,
        last_port: u16,
        stride: i32,
        window: u16,
    },
    /// The peer is behind a random symmetric NAT and opens many sockets
    /// towards us; probe this many random ports of its address (birthday).
    Random { ip: IpAddr, probes: u32 },
}

impl PortPrediction {
    /// The fixed targets of a prediction, nearest first (none for `Random`).
    pub fn targets(&self) -> Vec<SocketAddr> {
        match *self {
            PortPrediction::Sequential {
                ip,
                last_port,
                stride,
                window,
            } => predict(SocketAddr::new(ip, last_port), stride, window),
            PortPrediction::Random { .. } => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_follow_the_stride_and_stay_in_range() {
        let last: SocketAddr = "203.0.113.9:20007".parse().unwrap();
        let p = predict(last, 1, 3);
        assert_eq!(
            p.iter().map(|a| a.port()).collect::<Vec<_>>(),
            vec![20008, 20009, 20010]
        );
        assert!(p.iter().all(|a| a.ip() == last.ip()));
        let p = predict("203.0.113.9:65530".parse().unwrap(), 4, 4);
        assert_eq!(p.iter().map(|a| a.port()).collect::<Vec<_>>(), vec![65534]);
        let p = predict("203.0.113.9:10".parse().unwrap(), -5, 4);
        assert_eq!(p.iter().map(|a| a.port()).collect::<Vec<_>>(), vec![5]);
    }

    #[test]
    fn the_sequential_rule_tolerates_churn_but_not_noise() {
        assert_eq!(sequential_stride(&[1, 1, 1]), Some(1));
        assert_eq!(sequential_stride(&[2, 5, 2]), Some(2));
        assert_eq!(sequential_stride(&[-1, -3]), Some(-1));
        assert_eq!(sequential_stride(&[1, -1]), None);
        assert_eq!(sequential_stride(&[1, 0]), None);
        assert_eq!(sequential_stride(&[1, 65]), None);
        assert_eq!(sequential_stride(&[64]), Some(64));
        assert_eq!(sequential_stride(&[]), None);
    }

    #[test]
    fn any_constant_delta_is_sequential() {
        assert_eq!(sequential_stride(&[1000, 1000]), Some(1000));
        assert_eq!(sequential_stride(&[-4099, -4099, -4099]), Some(-4099));
        assert_eq!(sequential_stride(&[1000]), None, "one large step is chance");
        assert_eq!(sequential_stride(&[1000, 999]), None);
        assert_eq!(sequential_stride(&[0, 0]), None);
        // Predictions follow it.
        let last: SocketAddr = "203.0.113.9:20000".parse().unwrap();
        assert_eq!(
            predict(last, 1000, 3)
                .iter()
                .map(|a| a.port())
                .collect::<Vec<_>>(),
            vec![21000, 22000, 23000]
        );
    }

    #[test]
    fn endpoints_on_two_addresses_or_none_are_random() {
        // (More in `hole_punch::tests::machine`.)
        let at = |ip: [u8; 4], port| SocketAddr::from((ip, port));
        assert_eq!(
            classify_mapping(&[at([203, 0, 113, 10], 1), at([203, 0, 113, 11], 1)]),
            NatMapping::Random
        );
        assert_eq!(classify_mapping(&[]), NatMapping::Random);
    }
}
