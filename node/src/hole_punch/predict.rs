//! What the control server learns about a NAT from two observed ports, and
//! what it tells the other side to aim at (seed 003).

use std::net::{IpAddr, SocketAddr};

/// Predicted ports to probe past the last observed one; covers other hosts
/// behind the same router taking a few ports in between.
pub const DEFAULT_SEQUENTIAL_WINDOW: u16 = 8;
/// Sockets the side behind a random symmetric NAT opens.
pub const DEFAULT_BIRTHDAY_SOCKETS: u16 = 256;
/// Random ports the other side probes. With 256 open mappings out of ~64k
/// ports, 1536 probes miss all of them with probability e^-6 ≈ 0.25%.
pub const DEFAULT_BIRTHDAY_PROBES: u32 = 1536;
/// Larger port differences between two observations count as random.
pub const DEFAULT_MAX_STRIDE: u16 = 64;

/// A NAT's mapping behaviour as seen from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObservedMapping {
    /// The observed endpoint is the local one.
    NoNat,
    EndpointIndependent,
    /// Symmetric with a fixed step between consecutive mappings.
    Sequential {
        stride: i32,
    },
    Random,
}

/// Classifies from the public endpoints that one local socket got towards two
/// (or more) server ports, in the order it sent to them.
pub fn classify_mapping(
    local: SocketAddr,
    observed: &[SocketAddr],
    max_stride: u16,
) -> ObservedMapping {
    let Some(first) = observed.first() else {
        return ObservedMapping::Random;
    };
    if observed.iter().all(|o| *o == local) {
        return ObservedMapping::NoNat;
    }
    if observed.iter().any(|o| o.ip() != first.ip()) {
        return ObservedMapping::Random;
    }
    if observed.iter().all(|o| o.port() == first.port()) {
        return ObservedMapping::EndpointIndependent;
    }
    let diffs: Vec<i32> = observed
        .windows(2)
        .map(|w| i32::from(w[1].port()) - i32::from(w[0].port()))
        .collect();
    let stride = diffs[0];
    if stride != 0
        && stride.unsigned_abs() <= u32::from(max_stride)
        && diffs.iter().all(|&d| d == stride)
    {
        ObservedMapping::Sequential { stride }
    } else {
        ObservedMapping::Random
    }
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
            } => (1..=i32::from(window))
                .filter_map(|j| {
                    let p = i32::from(last_port) + stride * j;
                    u16::try_from(p).ok().filter(|&p| p != 0)
                })
                .map(|p| SocketAddr::new(ip, p))
                .collect(),
            PortPrediction::Random { .. } => Vec::new(),
        }
    }
}
