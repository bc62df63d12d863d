//! Arbitrary bytes from a peer (or the kernel) must never panic the TUN
//! service's IP header parser, and whatever it accepts has a header whose
//! length field matches the packet exactly.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use peermesh_tun::packet::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse(data) {
        match h.src {
            IpAddr::V4(_) => {
                assert!(h.dst.is_ipv4());
                assert_eq!(
                    usize::from(u16::from_be_bytes([data[2], data[3]])),
                    data.len()
                );
            }
            IpAddr::V6(_) => {
                assert!(h.dst.is_ipv6());
                assert_eq!(
                    40 + usize::from(u16::from_be_bytes([data[4], data[5]])),
                    data.len()
                );
            }
        }
    }
});
