//! What nodes and relays must agree on.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{relay, Multiaddr};

/// The identify protocol of peermesh processes: relays tell nodes the
/// address they observe them at through it (seed 001: relays double as
/// observers of each peer's public address).
pub const IDENTIFY_PROTOCOL: &str = "/peermesh/id/1";

/// The window of the per-peer rate limits of a relay v2 server.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// The QUIC multiaddr of a UDP socket address.
pub fn quic_addr(addr: SocketAddr) -> Multiaddr {
    Multiaddr::from(addr.ip())
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1)
}

/// Rate limits per peer only, `per_minute` new reservations and circuits
/// per [`RATE_WINDOW`]. libp2p's defaults also limit per source IP (60 new
/// circuits a minute): every member behind one NAT, or a whole lab on
/// loopback, shares that budget, and a 16-node mesh then waits minutes for
/// its links. Relays and forwarders here serve only members the control
/// server vouches for, so the per-peer budget is the one that matters.
pub fn per_peer_rates(mut c: relay::Config, per_minute: u32) -> relay::Config {
    let per_minute = NonZeroU32::new(per_minute.max(1)).expect("at least 1");
    c.reservation_rate_limiters.clear();
    c.circuit_src_rate_limiters.clear();
    c.reservation_rate_per_peer(per_minute, RATE_WINDOW)
        .circuit_src_per_peer(per_minute, RATE_WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_addresses() {
        assert_eq!(
            quic_addr("192.0.2.1:4001".parse().unwrap()).to_string(),
            "/ip4/192.0.2.1/udp/4001/quic-v1"
        );
        assert_eq!(
            quic_addr("[2001:db8::1]:9".parse().unwrap()).to_string(),
            "/ip6/2001:db8::1/udp/9/quic-v1"
        );
    }
}
