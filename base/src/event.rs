//! What a running node tells whoever watches it, as it happens: members
//! coming and going, paths coming up, going down and being chosen, the
//! control connection, the NAT, relays and punches. The endpoint keeps the
//! recent ones, so a watcher that comes late still sees how a link came up
//! (the local API's `events` replays them, then streams the new ones).

use serde::{Deserialize, Serialize};

use crate::nat::NatBehavior;
use crate::{NodeId, PathKind};

/// One event and when it happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time in microseconds since the Unix epoch (comparable
    /// across the processes of one machine, as log timestamps were).
    pub at_us: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Which side of a coordinated punch this node took, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PunchRole {
    /// Asked the control server, then dialed once the peer was open.
    Caller,
    /// Opened towards the caller when the control server said so.
    Callee,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PunchMethod {
    /// From the mesh's own QUIC socket.
    Quic,
    /// From probe sockets (low-TTL opening packets, prediction, birthday).
    Probe,
    /// None: no direct path can exist for this pair of NATs.
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    MemberJoined {
        peer: NodeId,
        name: String,
    },
    MemberLeft {
        peer: NodeId,
    },
    /// A path of the link to `peer` came up (a stream on a connection).
    PathUp {
        peer: NodeId,
        kind: PathKind,
    },
    PathDown {
        peer: NodeId,
        kind: PathKind,
        reason: String,
    },
    /// The link to `peer` now carries its traffic on `path` ("connecting":
    /// on none).
    PathChanged {
        peer: NodeId,
        #[serde(with = "crate::path::or_connecting")]
        path: Option<PathKind>,
        via: Option<String>,
        rtt_ms: Option<f64>,
    },
    /// The control server connection came up or went down.
    Control {
        connected: bool,
        error: Option<String>,
    },
    /// NAT behaviour discovery finished.
    Nat {
        nat: NatBehavior,
    },
    /// The relay directory changed; `relays` are in it now.
    RelayDirectory {
        relays: usize,
    },
    /// This node's home relay (where it holds its reservation), or none.
    HomeRelay {
        relay: Option<String>,
    },
    /// A coordinated punch with `peer` started on this side.
    Punch {
        peer: NodeId,
        role: PunchRole,
        method: PunchMethod,
    },
}

impl Event {
    /// An event that happened now.
    pub fn now(kind: EventKind) -> Self {
        let at_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Self { at_us, kind }
    }

    /// When it happened.
    pub fn at(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(self.at_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_flat_json_objects() {
        let peer: NodeId = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
            .parse()
            .unwrap();
        let e = Event {
            at_us: 5,
            kind: EventKind::PathChanged {
                peer,
                path: None,
                via: None,
                rtt_ms: None,
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "path_changed");
        assert_eq!(v["path"], "connecting");
        assert_eq!(v["at_us"], 5);
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
        let p = Event::now(EventKind::PathUp {
            peer,
            kind: PathKind::Relay,
        });
        assert!(p.at() > std::time::UNIX_EPOCH);
    }
}
