//! What a running node shows of itself and its peers: the views behind
//! `meshnode status --json`, the endpoint's status stream and the tests.
//! A leaf, so that every layer can fill in its part and none imports the
//! others (Tailscale's `ipnstate` is the model). Fields are only ever added.

use serde::{Deserialize, Serialize};

use crate::nat::NatBehavior;
use crate::{NodeId, PathKind};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: NodeId,
    pub name: String,
    /// The active path's kind; `None` (JSON "connecting") while the link
    /// has no path.
    #[serde(with = "crate::path::or_connecting")]
    pub path: Option<PathKind>,
    /// Forwarding member (by name) or relay server (by id), when the path
    /// goes through one.
    pub via: Option<String>,
    pub rtt_ms: Option<f64>,
    pub loss: f64,
    /// Whether the control server sees the peer connected to it.
    pub online: bool,
    pub addresses: Vec<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Mesh (TUN) addresses the control server assigned to the peer.
    #[serde(default)]
    pub mesh_ipv4: Option<String>,
    #[serde(default)]
    pub mesh_ipv6: Option<String>,
    /// Hole punching towards this peer over the link's life.
    #[serde(default)]
    pub punch: PunchStats,
    /// Messages from this peer for a protocol that nothing on this node
    /// runs: dropped and counted.
    #[serde(default)]
    pub undeliverable: u64,
    /// Messages from this peer beyond the credit its protocol was granted:
    /// dropped and counted (a member that floods is not obeyed).
    #[serde(default)]
    pub flooded: u64,
}

/// What the hole puncher did for one link, for status and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PunchStats {
    /// Rendezvous through the control server that punched from the mesh's
    /// own QUIC socket (the fast path for cone NATs).
    pub quic_attempts: u32,
    /// Attempts from separate probe sockets (low-TTL opening packets, port
    /// prediction, birthday search), whose winning socket is handed to QUIC.
    pub probe_attempts: u32,
    /// UDP datagrams the probe sockets sent, over all attempts: opening
    /// packets, probes (birthday ones included) and acks.
    pub probe_packets: u64,
    pub birthday_probes: u64,
    /// Sockets opened for the last probe attempt (more than 1 on the random
    /// symmetric side of a birthday search).
    pub sockets: u32,
    /// How the last attempt ended: "direct", "failed: …", or empty.
    pub last: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlStatus {
    pub url: String,
    pub connected: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub name: String,
    pub group: String,
    pub addresses: Vec<String>,
    pub control: ControlStatus,
    pub map_version: u64,
    pub peers: Vec<PeerStatus>,
    /// This node's mesh (TUN) addresses, from the control server.
    #[serde(default)]
    pub mesh_ipv4: Option<String>,
    #[serde(default)]
    pub mesh_ipv6: Option<String>,
    /// The virtual interface, when the node runs one (`up --tun`).
    #[serde(default)]
    pub tun: Option<TunStatus>,
    /// This node's NAT, once discovery against the control server's STUN
    /// endpoints has run (seed 003).
    #[serde(default)]
    pub nat: Option<NatBehavior>,
}

impl NodeStatus {
    /// A member by id or name.
    pub fn peer(&self, id_or_name: &str) -> Option<&PeerStatus> {
        self.peers
            .iter()
            .find(|p| p.name == id_or_name || p.id == id_or_name)
    }
}

/// The virtual interface as `meshnode status --json` shows it (`tun`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TunStatus {
    pub name: String,
    pub mtu: u16,
    /// Whether the interface has its mesh addresses and is up.
    pub up: bool,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub drop_no_route: u64,
    pub drop_no_link: u64,
    pub drop_congested: u64,
    pub drop_malformed: u64,
    pub drop_spoofed: u64,
    pub drop_not_for_us: u64,
    pub write_errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_without_a_path_is_connecting_in_json() {
        let p = PeerStatus {
            id: "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
                .parse()
                .unwrap(),
            name: "b".into(),
            path: None,
            via: None,
            rtt_ms: None,
            loss: 0.0,
            online: true,
            addresses: vec![],
            bytes_in: 0,
            bytes_out: 0,
            mesh_ipv4: None,
            mesh_ipv6: None,
            punch: PunchStats::default(),
            undeliverable: 0,
            flooded: 0,
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["path"], "connecting");
        assert_eq!(
            (v["flooded"].as_u64(), v["undeliverable"].as_u64()),
            (Some(0), Some(0))
        );
        let back: PeerStatus = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, p);
        // A status from before the drop counters reads as none dropped.
        let mut old = v;
        let fields = old.as_object_mut().unwrap();
        fields.remove("flooded");
        fields.remove("undeliverable");
        assert_eq!(serde_json::from_value::<PeerStatus>(old).unwrap(), p);
        let mut direct = serde_json::to_value(&p).unwrap();
        direct["path"] = "direct".into();
        let d: PeerStatus = serde_json::from_value(direct).unwrap();
        assert_eq!(d.path, Some(PathKind::Direct));
    }
}
