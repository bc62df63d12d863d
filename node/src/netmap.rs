//! The node's copy of its group's network map, kept in step with the control
//! server's WatchNetworkMap stream. Sans-IO: updates in, changes out.

use std::collections::BTreeMap;

use peermesh_proto::api::{
    network_map_update::Kind, NetworkMapUpdate, Peer, PunchInstruction, Relay,
};

/// What an update changed, for the layers that act on peers coming and going.
#[derive(Clone, Debug, PartialEq)]
pub enum MapChange {
    Added(Peer),
    Updated(Peer),
    Removed(String),
    RelaysChanged,
    SelfUpdated(Peer),
    /// The control server asks this node to open its NAT towards a peer.
    Punch(PunchInstruction),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("update carries no content")]
    Empty,
    #[error("delta at version {got} before any full map")]
    NoBase { got: u64 },
}

#[derive(Clone, Debug, Default)]
pub struct NetworkMap {
    pub version: u64,
    pub group: String,
    pub self_node: Option<Peer>,
    pub peers: BTreeMap<String, Peer>,
    pub relays: Vec<Relay>,
    has_base: bool,
}

impl NetworkMap {
    /// Applies one update. A full map replaces everything; deltas at or below
    /// the current version are stale and ignored.
    pub fn apply(&mut self, update: NetworkMapUpdate) -> Result<Vec<MapChange>, MapError> {
        let kind = update.kind.ok_or(MapError::Empty)?;
        // A rendezvous rides the stream but is no change of the map.
        if let Kind::Punch(p) = kind {
            return Ok(vec![MapChange::Punch(p)]);
        }
        if let Kind::Full(full) = kind {
            let mut changes = Vec::new();
            let mut next: BTreeMap<String, Peer> = BTreeMap::new();
            let own_id = full.self_node.as_ref().map(|p| p.node_id.clone());
            for p in full.peers {
                if Some(&p.node_id) == own_id.as_ref() {
                    continue;
                }
                match self.peers.get(&p.node_id) {
                    None => changes.push(MapChange::Added(p.clone())),
                    Some(old) if *old != p => changes.push(MapChange::Updated(p.clone())),
                    Some(_) => {}
                }
                next.insert(p.node_id.clone(), p);
            }
            for id in self.peers.keys() {
                if !next.contains_key(id) {
                    changes.push(MapChange::Removed(id.clone()));
                }
            }
            if self.relays != full.relays {
                changes.push(MapChange::RelaysChanged);
            }
            if let Some(me) = &full.self_node {
                if self.self_node.as_ref() != Some(me) {
                    changes.push(MapChange::SelfUpdated(me.clone()));
                }
            }
            self.peers = next;
            self.relays = full.relays;
            self.self_node = full.self_node;
            self.group = full.group;
            self.version = update.version;
            self.has_base = true;
            return Ok(changes);
        }
        if !self.has_base {
            return Err(MapError::NoBase {
                got: update.version,
            });
        }
        if update.version <= self.version {
            return Ok(Vec::new());
        }
        self.version = update.version;
        let own_id = self.self_node.as_ref().map(|p| p.node_id.as_str());
        Ok(match kind {
            Kind::Full(_) | Kind::Punch(_) => unreachable!("handled above"),
            Kind::PeerUpsert(p) if Some(p.node_id.as_str()) == own_id => {
                self.self_node = Some(p.clone());
                vec![MapChange::SelfUpdated(p)]
            }
            Kind::PeerUpsert(p) => match self.peers.insert(p.node_id.clone(), p.clone()) {
                None => vec![MapChange::Added(p)],
                Some(old) if old != p => vec![MapChange::Updated(p)],
                Some(_) => Vec::new(),
            },
            Kind::PeerRemoved(id) => match self.peers.remove(&id) {
                Some(_) => vec![MapChange::Removed(id)],
                None => Vec::new(),
            },
            Kind::Relays(list) => {
                self.relays = list.relays;
                vec![MapChange::RelaysChanged]
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermesh_proto::api::NetworkMap as Full;

    fn peer(id: &str, name: &str) -> Peer {
        Peer {
            node_id: id.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    fn full(version: u64, me: &str, peers: &[Peer]) -> NetworkMapUpdate {
        NetworkMapUpdate {
            version,
            kind: Some(Kind::Full(Full {
                group: "g".into(),
                self_node: Some(peer(me, me)),
                peers: peers.to_vec(),
                relays: vec![],
                stun: None,
            })),
        }
    }

    fn upsert(version: u64, p: Peer) -> NetworkMapUpdate {
        NetworkMapUpdate {
            version,
            kind: Some(Kind::PeerUpsert(p)),
        }
    }

    fn removed(version: u64, id: &str) -> NetworkMapUpdate {
        NetworkMapUpdate {
            version,
            kind: Some(Kind::PeerRemoved(id.into())),
        }
    }

    #[test]
    fn deltas_need_a_base() {
        let mut m = NetworkMap::default();
        assert_eq!(
            m.apply(upsert(1, peer("a", "a"))),
            Err(MapError::NoBase { got: 1 })
        );
        assert_eq!(
            m.apply(NetworkMapUpdate {
                version: 1,
                kind: None
            }),
            Err(MapError::Empty)
        );
    }

    #[test]
    fn full_then_deltas() {
        let mut m = NetworkMap::default();
        let c = m.apply(full(5, "me", &[peer("a", "a")])).unwrap();
        assert!(c.contains(&MapChange::Added(peer("a", "a"))));
        assert_eq!(
            m.apply(upsert(6, peer("b", "b"))).unwrap(),
            vec![MapChange::Added(peer("b", "b"))]
        );
        // Stale and duplicate deltas change nothing.
        assert!(m.apply(removed(6, "b")).unwrap().is_empty());
        assert!(m.apply(upsert(4, peer("z", "z"))).unwrap().is_empty());
        assert_eq!(
            m.apply(upsert(7, peer("b", "b2"))).unwrap(),
            vec![MapChange::Updated(peer("b", "b2"))]
        );
        assert_eq!(
            m.apply(removed(8, "a")).unwrap(),
            vec![MapChange::Removed("a".into())]
        );
        assert_eq!(m.peers.keys().collect::<Vec<_>>(), vec!["b"]);
        // Our own record is not a peer.
        assert_eq!(
            m.apply(upsert(9, peer("me", "renamed"))).unwrap(),
            vec![MapChange::SelfUpdated(peer("me", "renamed"))]
        );
        assert!(!m.peers.contains_key("me"));
    }

    #[test]
    fn a_new_full_map_reports_the_difference() {
        let mut m = NetworkMap::default();
        m.apply(full(1, "me", &[peer("a", "a"), peer("b", "b")]))
            .unwrap();
        // After a reconnect the server may have restarted: versions restart.
        let c = m
            .apply(full(1, "me", &[peer("b", "b"), peer("c", "c")]))
            .unwrap();
        assert!(c.contains(&MapChange::Removed("a".into())));
        assert!(c.contains(&MapChange::Added(peer("c", "c"))));
        assert!(!c.iter().any(|x| matches!(x, MapChange::Updated(_))));
        assert_eq!(m.peers.len(), 2);
    }
}
