//! The few fields of an IP packet that the TUN service routes and filters
//! on. Packets come from the kernel (our own interface) and from peers (the
//! network): anything that is not a well-formed IPv4 or IPv6 header whose
//! length fits the buffer is refused, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// Why a packet was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadPacket {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} (only 4 and 6)")]
    Version(u8),
    #[error("truncated header")]
    Truncated,
    #[error("length field disagrees with the packet size")]
    Length,
}

/// The addresses of `p`, after checking that its header is complete and its
/// length field matches the data (trailing bytes are refused as well, so
/// nothing is smuggled after a packet).
pub fn parse(p: &[u8]) -> Result<Header, BadPacket> {
    let first = *p.first().ok_or(BadPacket::Empty)?;
    match first >> 4 {
        4 => {
            if p.len() < 20 {
                return Err(BadPacket::Truncated);
            }
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl {
                return Err(BadPacket::Truncated);
            }
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            if total != p.len() {
                return Err(BadPacket::Length);
            }
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            Ok(Header {
                src: src.into(),
                dst: dst.into(),
            })
        }
        6 => {
            if p.len() < 40 {
                return Err(BadPacket::Truncated);
            }
            let payload = usize::from(u16::from_be_bytes([p[4], p[5]]));
            // A zero payload length with data behind it is a jumbogram,
            // which no interface of ours carries.
            if 40 + payload != p.len() {
                return Err(BadPacket::Length);
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&p[8..24]);
            d.copy_from_slice(&p[24..40]);
            Ok(Header {
                src: Ipv6Addr::from(s).into(),
                dst: Ipv6Addr::from(d).into(),
            })
        }
        v => Err(BadPacket::Version(v)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal IPv4 packet (UDP protocol number, no checksum) of `len`
    /// bytes in all.
    pub(crate) fn v4(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
        assert!((20..=65535).contains(&len));
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p
    }

    pub(crate) fn v6(src: Ipv6Addr, dst: Ipv6Addr, payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        p[6] = 17;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p
    }

    #[test]
    fn well_formed_packets_parse() {
        let (a, b) = (Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2));
        let h = parse(&v4(a, b, 84)).unwrap();
        assert_eq!((h.src, h.dst), (a.into(), b.into()));
        let (a6, b6): (Ipv6Addr, Ipv6Addr) =
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        let h = parse(&v6(a6, b6, 8)).unwrap();
        assert_eq!((h.src, h.dst), (a6.into(), b6.into()));
    }

    #[test]
    fn malformed_packets_are_refused() {
        let (a, b) = (Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(parse(&[]), Err(BadPacket::Empty));
        assert_eq!(parse(&[0x45; 10]), Err(BadPacket::Truncated));
        assert_eq!(parse(&[0x20; 40]), Err(BadPacket::Version(2)));
        let mut p = v4(a, b, 60);
        p.push(0);
        assert_eq!(parse(&p), Err(BadPacket::Length));
        let mut p = v4(a, b, 60);
        p[0] = 0x4f; // header of 60 bytes: fits
        assert!(parse(&p).is_ok());
        p[0] = 0x44; // header shorter than 20 bytes
        assert_eq!(parse(&p), Err(BadPacket::Truncated));
        let mut p = v6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 10);
        p.truncate(45);
        assert_eq!(parse(&p), Err(BadPacket::Length));
    }

    proptest! {
        #[test]
        fn parse_never_panics(p in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&p);
        }

        #[test]
        fn whatever_parses_has_a_consistent_length(
            mut p in proptest::collection::vec(any::<u8>(), 20..120),
            v6 in any::<bool>(),
        ) {
            // Steer half of the inputs to a plausible header.
            if v6 { p[0] = 0x60 | (p[0] & 0x0f) } else { p[0] = 0x40 | (p[0] & 0x0f) }
            if let Ok(h) = parse(&p) {
                match h.src {
                    IpAddr::V4(_) => {
                        prop_assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
                        prop_assert!(h.dst.is_ipv4());
                    }
                    IpAddr::V6(_) => {
                        prop_assert_eq!(40 + usize::from(u16::from_be_bytes([p[4], p[5]])), p.len());
                        prop_assert!(h.dst.is_ipv6());
                    }
                }
            }
        }

        #[test]
        fn built_packets_round_trip(a in any::<u32>(), b in any::<u32>(), len in 20usize..2000) {
            let (a, b) = (Ipv4Addr::from(a), Ipv4Addr::from(b));
            let h = parse(&v4(a, b, len)).unwrap();
            prop_assert_eq!((h.src, h.dst), (IpAddr::from(a), IpAddr::from(b)));
        }
    }
}
