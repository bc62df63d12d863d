//! The node's copy of its group's network map, kept in step with the control
//! server's WatchNetworkMap stream. Sans-IO: updates in, changes out.
//!
//! Updates arrive checked against the server key's signature
//! (`control::MapStream`); on top of that the map itself never lets an
//! update change this node's own identity, nor bind a peer id to a key
//! that is not that id's key (node ids are PeerIds: the hash of the key),
//! so not even the server can have the node take a key for another node.

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
    #[error("the map names {got:?} as this node, which is {own:?}")]
    NotMe { own: String, got: String },
    #[error("the map binds peer {node_id:?} to a key that is not its own")]
    WrongKey { node_id: String },
}

/// Whether `p`'s id is the PeerId of its key (an empty key: a map of an
/// older server, nothing to check).
fn key_matches(p: &Peer) -> bool {
    if p.public_key.is_empty() {
        return true;
    }
    libp2p::identity::PublicKey::try_decode_protobuf(&p.public_key)
        .is_ok_and(|k| k.to_peer_id().to_string() == p.node_id)
}

#[derive(Clone, Debug, Default)]
pub struct NetworkMap {
    /// This node's id: no map may name another as "self". Empty: unchecked.
    pub own_id: String,
    pub version: u64,
    pub group: String,
    pub self_node: Option<Peer>,
    pub peers: BTreeMap<String, Peer>,
    pub relays: Vec<Relay>,
    has_base: bool,
}

impl NetworkMap {
    /// An empty map of the node `own_id`: no update may name another node as
    /// this one.
    pub fn of_node(own_id: impl Into<String>) -> Self {
        Self {
            own_id: own_id.into(),
            ..Self::default()
        }
    }

    /// Refuses an update that would change this node's identity or bind a
    /// peer id to another key; nothing is applied then.
    fn check(&self, kind: &Kind) -> Result<(), MapError> {
        let not_me = |got: &str| {
            (!self.own_id.is_empty() && got != self.own_id).then(|| MapError::NotMe {
                own: self.own_id.clone(),
                got: got.to_string(),
            })
        };
        let peers: Vec<&Peer> = match kind {
            Kind::Full(full) => {
                if let Some(me) = &full.self_node {
                    if let Some(e) = not_me(&me.node_id) {
                        return Err(e);
                    }
                }
                full.self_node.iter().chain(&full.peers).collect()
            }
            Kind::PeerUpsert(p) => vec![p],
            Kind::Peers(batch) => batch.peers.iter().collect(),
            _ => Vec::new(),
        };
        match peers.into_iter().find(|p| !key_matches(p)) {
            Some(p) => Err(MapError::WrongKey {
                node_id: p.node_id.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Puts `p` in place of the peer (or this node) of its id; the change,
    /// if anything changed.
    fn upsert(&mut self, p: Peer) -> Option<MapChange> {
        if self.self_node.as_ref().map(|s| s.node_id.as_str()) == Some(p.node_id.as_str()) {
            self.self_node = Some(p.clone());
            return Some(MapChange::SelfUpdated(p));
        }
        match self.peers.insert(p.node_id.clone(), p.clone()) {
            None => Some(MapChange::Added(p)),
            Some(old) if old != p => Some(MapChange::Updated(p)),
            Some(_) => None,
        }
    }

    /// Applies one update. A full map replaces everything; deltas at or below
    /// the current version are stale and ignored.
    pub fn apply(&mut self, update: NetworkMapUpdate) -> Result<Vec<MapChange>, MapError> {
        let kind = update.kind.ok_or(MapError::Empty)?;
        // A rendezvous rides the stream but is no change of the map.
        if let Kind::Punch(p) = kind {
            return Ok(vec![MapChange::Punch(p)]);
        }
        self.check(&kind)?;
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
        Ok(match kind {
            Kind::Full(_) | Kind::Punch(_) => unreachable!("handled above"),
            // Parts are put together into their full map by the stream's
            // checker (control::MapStream); a stray one changes nothing.
            Kind::Part(_) => Vec::new(),
            Kind::PeerUpsert(p) => self.upsert(p).into_iter().collect(),
            Kind::Peers(batch) => batch
                .peers
                .into_iter()
                .filter_map(|p| self.upsert(p))
                .collect(),
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
                ..Default::default()
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

    /// A coalesced presence change applies each peer like an upsert: new
    /// ones added, changed ones updated, this node's own entry as itself.
    #[test]
    fn a_peer_batch_applies_each_peer() {
        let mut m = NetworkMap::of_node("me");
        m.apply(full(1, "me", &[peer("a", "a")])).unwrap();
        let mut a = peer("a", "a");
        a.online = true;
        let mut me = peer("me", "me");
        me.online = true;
        let c = m
            .apply(NetworkMapUpdate {
                version: 2,
                kind: Some(Kind::Peers(peermesh_proto::api::PeerBatch {
                    peers: vec![a.clone(), peer("b", "b"), me.clone()],
                })),
            })
            .unwrap();
        assert_eq!(
            c,
            vec![
                MapChange::Updated(a),
                MapChange::Added(peer("b", "b")),
                MapChange::SelfUpdated(me)
            ]
        );
        assert_eq!(m.peers.len(), 2);
        assert_eq!(m.version, 2);
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
    fn no_map_changes_who_this_node_is_or_binds_a_foreign_key() {
        let mut m = NetworkMap {
            own_id: "me".into(),
            ..Default::default()
        };
        assert_eq!(
            m.apply(full(1, "mallory", &[])),
            Err(MapError::NotMe {
                own: "me".into(),
                got: "mallory".into()
            })
        );
        m.apply(full(1, "me", &[])).unwrap();
        let real = libp2p::identity::Keypair::generate_ed25519();
        let other = libp2p::identity::Keypair::generate_ed25519();
        let mut p = peer(&real.public().to_peer_id().to_string(), "a");
        p.public_key = real.public().encode_protobuf();
        assert!(m.apply(upsert(2, p.clone())).is_ok());
        // The same id with another key: refused, the map keeps the real one.
        let mut forged = p.clone();
        forged.public_key = other.public().encode_protobuf();
        assert_eq!(
            m.apply(upsert(3, forged)),
            Err(MapError::WrongKey {
                node_id: p.node_id.clone()
            })
        );
        assert_eq!(m.peers[&p.node_id].public_key, p.public_key);
        assert_eq!(m.version, 2);
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
