//! Mesh addresses of the nodes' virtual interfaces (TUN).
//!
//! Every node gets one IPv4 address from the shared address space
//! 100.64.0.0/10 (RFC 6598) and one IPv6 address from a unique local /48
//! (RFC 4193) that is derived from the server's id, so it is stable for the
//! life of the server's data. Addresses are unique across the whole server
//! (not only per group) and stored in the node's record: a node keeps them
//! across its own restarts and the server's, until its record is deleted.
//!
//! The IPv4 address is picked from a hash of the node id (so a rebuilt
//! server tends to hand out the same address to the same key), moving on to
//! the next candidate while it is taken. The IPv6 address carries the IPv4
//! host bits in its low 32 bits, so it is unique whenever the IPv4 one is.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use sha2::{Digest, Sha256};

/// 100.64.0.0/10.
pub const V4_NET: u32 = 0x6440_0000;
pub const V4_PREFIX: u8 = 10;
pub const V6_PREFIX: u8 = 48;
const HOST_BITS: u32 = 32 - V4_PREFIX as u32;
const HOST_MASK: u32 = (1 << HOST_BITS) - 1;

/// The ULA /48 of a server: `fd` and 40 bits of a hash of its id.
pub fn ula_prefix(server_id: &str) -> [u8; 6] {
    let h = Sha256::new()
        .chain_update(b"peermesh ula v1\0")
        .chain_update(server_id.as_bytes())
        .finalize();
    [0xfd, h[0], h[1], h[2], h[3], h[4]]
}

/// Whether `host` (the bits below the /10) may be given to a node: not the
/// network's first or last address.
fn usable(host: u32) -> bool {
    host != 0 && host != HOST_MASK
}

/// The `attempt`-th candidate IPv4 host part for `node_id`.
fn candidate(node_id: &str, attempt: u32) -> u32 {
    let h = Sha256::new()
        .chain_update(b"peermesh v4 v1\0")
        .chain_update(node_id.as_bytes())
        .chain_update(attempt.to_be_bytes())
        .finalize();
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & HOST_MASK
}

/// The IPv6 address of a node whose IPv4 address is `v4`.
pub fn v6_for(prefix: &[u8; 6], node_id: &str, v4: Ipv4Addr) -> Ipv6Addr {
    let h = Sha256::new()
        .chain_update(b"peermesh v6 v1\0")
        .chain_update(node_id.as_bytes())
        .finalize();
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(prefix);
    // b[6..8]: subnet 0.
    b[8..12].copy_from_slice(&h[..4]);
    b[12..].copy_from_slice(&v4.octets());
    Ipv6Addr::from(b)
}

/// Which node holds which IPv4 address (all nodes with a record, active or
/// revoked: a revoked node that comes back with a new token keeps its
/// address).
pub struct MeshAddrs {
    prefix: [u8; 6],
    by_v4: HashMap<u32, String>,
}

impl MeshAddrs {
    pub fn new(server_id: &str) -> Self {
        Self {
            prefix: ula_prefix(server_id),
            by_v4: HashMap::new(),
        }
    }

    /// Records that `node_id` holds `v4`; false (and nothing recorded) when
    /// the text is not an address in the mesh range or another node holds it.
    pub fn claim(&mut self, node_id: &str, v4: &str) -> bool {
        let Ok(a) = v4.parse::<Ipv4Addr>() else {
            return false;
        };
        let a = u32::from(a);
        if a & !HOST_MASK != V4_NET || !usable(a & HOST_MASK) {
            return false;
        }
        match self.by_v4.get(&a) {
            Some(holder) => holder == node_id,
            None => {
                self.by_v4.insert(a, node_id.to_string());
                true
            }
        }
    }

    /// A free pair of addresses for `node_id`, recorded as its own.
    pub fn allocate(&mut self, node_id: &str) -> (Ipv4Addr, Ipv6Addr) {
        let free = |m: &HashMap<u32, String>, host: u32| {
            usable(host) && m.get(&(V4_NET | host)).is_none_or(|h| h == node_id)
        };
        let host = (0..64)
            .map(|i| candidate(node_id, i))
            .find(|h| free(&self.by_v4, *h))
            .or_else(|| {
                // The space is nearly full: walk it from the first candidate.
                let start = candidate(node_id, 0);
                (1..=HOST_MASK)
                    .map(|i| (start + i) & HOST_MASK)
                    .find(|h| free(&self.by_v4, *h))
            })
            .expect("more than four million mesh addresses in use");
        let v4 = V4_NET | host;
        self.by_v4.insert(v4, node_id.to_string());
        let v4 = Ipv4Addr::from(v4);
        (v4, v6_for(&self.prefix, node_id, v4))
    }

    /// The IPv6 address that goes with `node_id`'s IPv4 address.
    pub fn v6(&self, node_id: &str, v4: Ipv4Addr) -> Ipv6Addr {
        v6_for(&self.prefix, node_id, v4)
    }

    pub fn release(&mut self, node_id: &str, v4: &str) {
        if let Ok(a) = v4.parse::<Ipv4Addr>() {
            let a = u32::from(a);
            if self.by_v4.get(&a).is_some_and(|h| h == node_id) {
                self.by_v4.remove(&a);
            }
        }
    }

    /// How many addresses are held.
    pub fn len(&self) -> usize {
        self.by_v4.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_v4.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_in_range_unique_and_deterministic() {
        let mut m = MeshAddrs::new("srv_x");
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            let id = format!("node-{i}");
            let (v4, v6) = m.allocate(&id);
            assert_eq!(u32::from(v4) >> 22, V4_NET >> 22, "{v4} not in 100.64/10");
            assert_eq!(v6.octets()[0], 0xfd);
            assert_eq!(&v6.octets()[..6], &ula_prefix("srv_x"));
            assert_eq!(&v6.octets()[12..], &v4.octets());
            assert!(seen.insert(v4), "{v4} handed out twice");
        }
        assert_eq!(m.len(), 2000);
        let mut other = MeshAddrs::new("srv_x");
        assert_eq!(other.allocate("node-7").0, {
            let mut again = MeshAddrs::new("srv_y");
            again.allocate("node-7").0
        });
    }

    #[test]
    fn a_taken_address_moves_the_next_node_on() {
        let mut m = MeshAddrs::new("s");
        let (a, _) = m.allocate("a");
        let mut m2 = MeshAddrs::new("s");
        assert!(m2.claim("b", &a.to_string()));
        let (a2, _) = m2.allocate("a");
        assert_ne!(a, a2);
        assert!(!m2.claim("c", &a.to_string()));
        assert!(m2.claim("b", &a.to_string()), "claiming one's own is fine");
        assert!(!m2.claim("d", "10.0.0.1"));
        assert!(!m2.claim("d", "100.64.0.0"));
        assert!(!m2.claim("d", "100.127.255.255"));
        assert!(!m2.claim("d", "not an address"));
        m2.release("b", &a.to_string());
        assert!(m2.claim("c", &a.to_string()));
    }
}
