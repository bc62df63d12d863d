//! A member's identity.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest identity accepted: a multihash of up to 64 bytes of digest plus
/// its code and length (libp2p's `PeerId` is a `Multihash<64>`).
const MAX_LEN: usize = 66;

/// A member of a group: the bytes of its libp2p peer id (the multihash of
/// its public key), written in base58 like the peer id itself, so the two
/// spellings are the same everywhere (maps, status, logs). `Copy`, like the
/// peer id: it travels with every message that reaches an application.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    len: u8,
    bytes: [u8; MAX_LEN],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error("a node id is 1 to {MAX_LEN} bytes, not {0}")]
    Length(usize),
    #[error("a node id is base58: {0}")]
    Base58(String),
}

impl NodeId {
    /// From the bytes of a peer id (`PeerId::to_bytes`).
    pub fn from_bytes(b: &[u8]) -> Result<Self, NodeIdError> {
        if b.is_empty() || b.len() > MAX_LEN {
            return Err(NodeIdError::Length(b.len()));
        }
        let mut bytes = [0u8; MAX_LEN];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Self {
            len: b.len() as u8,
            bytes,
        })
    }

    /// The bytes of the peer id (`PeerId::from_bytes` takes them).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.as_bytes()).into_string())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = bs58::decode(s)
            .into_vec()
            .map_err(|e| NodeIdError::Base58(e.to_string()))?;
        Self::from_bytes(&b)
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        other.parse::<NodeId>().is_ok_and(|o| o == *self)
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl PartialEq<String> for NodeId {
    fn eq(&self, other: &String) -> bool {
        *self == **other
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A real ed25519 peer id (identity multihash of the protobuf key).
    const PEER: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

    #[test]
    fn spelled_like_a_peer_id() {
        let id: NodeId = PEER.parse().unwrap();
        assert_eq!(id.to_string(), PEER);
        assert_eq!(id.as_bytes().len(), 38);
        assert_eq!(id, PEER);
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{PEER}\""));
        let back: NodeId = serde_json::from_str(&format!("\"{PEER}\"")).unwrap();
        assert_eq!(back, id);
    }

    #[test]
    fn bad_ids_are_refused() {
        assert!(matches!("".parse::<NodeId>(), Err(NodeIdError::Length(0))));
        assert!(matches!(
            "0OIl".parse::<NodeId>(),
            Err(NodeIdError::Base58(_))
        ));
        assert!(NodeId::from_bytes(&[1; 67]).is_err());
        assert!(serde_json::from_str::<NodeId>("\"not base58!\"").is_err());
    }

    proptest! {
        #[test]
        fn bytes_round_trip(b in proptest::collection::vec(any::<u8>(), 1..=66)) {
            let id = NodeId::from_bytes(&b).unwrap();
            prop_assert_eq!(id.as_bytes(), &b[..]);
            prop_assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        }

        #[test]
        fn any_string_parses_or_errs(s in ".{0,80}") {
            let _ = s.parse::<NodeId>();
        }
    }
}
