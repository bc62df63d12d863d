//! How a path reaches a peer.

use serde::{Deserialize, Serialize};

/// The kind of one path of a peer link. A link with no path yet is
/// "connecting": `Option<PathKind>` is `None` (see [`path_name`]). The
/// spellings are part of the CLI's JSON contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Through a relay server of the directory (seed 001).
    Relay,
    /// Hole-punched or plain UDP between the two nodes.
    Direct,
    /// Through another member of the group (seed 004).
    Forwarded,
}

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Direct => "direct",
            Self::Forwarded => "forwarded",
        }
    }

    /// Higher is better: direct beats a member's forwarding, which beats a
    /// relay server (fewer hops, no shared server in the way).
    pub fn preference(self) -> u8 {
        match self {
            Self::Relay => 0,
            Self::Forwarded => 1,
            Self::Direct => 2,
        }
    }
}

/// The name of a link's state: its active path's kind, or "connecting".
pub fn path_name(path: Option<PathKind>) -> &'static str {
    path.map_or("connecting", PathKind::as_str)
}

/// Serde for a link's `Option<PathKind>` as one string: "connecting" for
/// `None` (`#[serde(with = "peermesh_base::path::or_connecting")]`).
pub mod or_connecting {
    use super::{path_name, PathKind};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Option<PathKind>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(path_name(*p))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathKind>, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        match &*s {
            "connecting" => Ok(None),
            "relay" => Ok(Some(PathKind::Relay)),
            "direct" => Ok(Some(PathKind::Direct)),
            "forwarded" => Ok(Some(PathKind::Forwarded)),
            other => Err(serde::de::Error::unknown_variant(
                other,
                &["connecting", "relay", "direct", "forwarded"],
            )),
        }
    }
}
