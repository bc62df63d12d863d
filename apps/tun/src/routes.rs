//! Who owns which mesh address, as the network map says: the TUN service's
//! routing table (destination → peer) and anti-spoofing table (peer →
//! the sources it may use). Rebuilt from the node's status when the map
//! changes, never per packet.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use peermesh_base::status::NodeStatus;
use peermesh_base::NodeId;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub me_v4: Option<Ipv4Addr>,
    pub me_v6: Option<Ipv6Addr>,
    by_addr: HashMap<IpAddr, NodeId>,
    by_peer: HashMap<NodeId, [Option<IpAddr>; 2]>,
}

fn addr<T: std::str::FromStr>(s: &Option<String>) -> Option<T> {
    s.as_deref().and_then(|s| s.parse().ok())
}

impl Table {
    pub fn from_status(s: &NodeStatus) -> Self {
        let mut t = Table {
            me_v4: addr(&s.mesh_ipv4),
            me_v6: addr(&s.mesh_ipv6),
            ..Default::default()
        };
        let mine = [t.me_v4.map(IpAddr::V4), t.me_v6.map(IpAddr::V6)];
        for p in &s.peers {
            let id = p.id;
            let v4 = addr::<Ipv4Addr>(&p.mesh_ipv4).map(IpAddr::V4);
            let v6 = addr::<Ipv6Addr>(&p.mesh_ipv6).map(IpAddr::V6);
            let mut owned = [None, None];
            for (slot, a) in owned.iter_mut().zip([v4, v6]) {
                let Some(a) = a else { continue };
                // An address claimed twice (or our own) goes to nobody else:
                // the first holder keeps it, the map is what it is.
                if mine.contains(&Some(a)) || t.by_addr.contains_key(&a) {
                    tracing::warn!(peer = %id, address = %a, "mesh address already taken; not routed to this peer");
                    continue;
                }
                t.by_addr.insert(a, id);
                *slot = Some(a);
            }
            t.by_peer.insert(id, owned);
        }
        t
    }

    /// The peer that owns `dst`.
    pub fn route(&self, dst: &IpAddr) -> Option<NodeId> {
        self.by_addr.get(dst).copied()
    }

    /// Whether `peer` may send packets from `src`.
    pub fn source_ok(&self, peer: &NodeId, src: &IpAddr) -> bool {
        self.by_peer
            .get(peer)
            .is_some_and(|owned| owned.contains(&Some(*src)))
    }

    /// Whether `dst` is one of this node's mesh addresses.
    pub fn is_mine(&self, dst: &IpAddr) -> bool {
        match dst {
            IpAddr::V4(a) => self.me_v4 == Some(*a),
            IpAddr::V6(a) => self.me_v6 == Some(*a),
        }
    }

    pub fn has_peer(&self, peer: &NodeId) -> bool {
        self.by_peer.contains_key(peer)
    }

    pub fn peers(&self) -> impl Iterator<Item = &NodeId> {
        self.by_peer.keys()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use peermesh_base::status::PeerStatus;

    /// A node id no one else has.
    pub(crate) fn random_id() -> NodeId {
        let mut b = [0u8; 38];
        b[..4].copy_from_slice(&[0, 36, 8, 1]);
        for x in &mut b[4..] {
            *x = rand::random();
        }
        NodeId::from_bytes(&b).unwrap()
    }

    // Built from JSON, as `meshnode status --json` reads them, so fields that
    // other services add to the status (all `serde(default)`) need no edit
    // here.
    pub(crate) fn peer(id: NodeId, v4: &str, v6: &str) -> PeerStatus {
        serde_json::from_value(serde_json::json!({
            "id": id.to_string(), "name": "p", "path": "relay", "via": null,
            "rtt_ms": null, "loss": 0.0, "online": true, "addresses": [],
            "bytes_in": 0, "bytes_out": 0,
            "mesh_ipv4": (!v4.is_empty()).then_some(v4),
            "mesh_ipv6": (!v6.is_empty()).then_some(v6),
        }))
        .expect("a peer status")
    }

    pub(crate) fn status(me: (&str, &str), peers: Vec<PeerStatus>) -> NodeStatus {
        serde_json::from_value(serde_json::json!({
            "id": random_id(), "name": "me", "group": "g", "addresses": [],
            "control": {"url": "", "connected": true, "error": null},
            "map_version": 1, "peers": peers,
            "mesh_ipv4": me.0, "mesh_ipv6": me.1,
        }))
        .expect("a node status")
    }

    #[test]
    fn routes_and_sources_follow_the_map() {
        let (a, b, c) = (random_id(), random_id(), random_id());
        let s = status(
            ("100.64.0.1", "fd00::1"),
            vec![
                peer(a, "100.64.0.2", "fd00::2"),
                peer(b, "100.64.0.3", ""),
                // Claims a's address and ours: gets neither.
                peer(c, "100.64.0.2", "fd00::1"),
            ],
        );
        let t = Table::from_status(&s);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(t.route(&ip("100.64.0.2")), Some(a));
        assert_eq!(t.route(&ip("fd00::2")), Some(a));
        assert_eq!(t.route(&ip("100.64.0.3")), Some(b));
        assert_eq!(t.route(&ip("100.64.0.9")), None);
        assert_eq!(t.route(&ip("fd00::1")), None);
        assert!(t.source_ok(&a, &ip("100.64.0.2")));
        assert!(t.source_ok(&a, &ip("fd00::2")));
        assert!(!t.source_ok(&a, &ip("100.64.0.3")));
        assert!(!t.source_ok(&c, &ip("100.64.0.2")));
        assert!(!t.source_ok(&c, &ip("fd00::1")));
        assert!(!t.source_ok(&random_id(), &ip("100.64.0.2")));
        assert!(t.is_mine(&ip("100.64.0.1")) && t.is_mine(&ip("fd00::1")));
        assert!(!t.is_mine(&ip("100.64.0.2")));
        assert!(t.has_peer(&c));
    }
}
