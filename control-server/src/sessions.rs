//! Who is calling: the server's id and clock, the freshness of signed
//! requests, and session credentials, for nodes and relays alike.
//!
//! Nodes and relays share the sessions tree. A node's session has its node
//! id as subject; a relay's has `relay:<relay id>` ([`relay_subject`]), which
//! no node id (a PeerId, no colon) can be, so a relay session never passes
//! as a node's and a node's never as a relay's. The registry and the relay
//! directory each check the subject kind they expect.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p_identity::{PeerId, PublicKey};
use peermesh_proto::api;
use peermesh_proto::store::v1::SessionRecord;

use crate::error::{ControlError, Result};
use crate::limits::Limits;
use crate::store::{Store, Txn};
use crate::{secrets, validate};

/// Milliseconds since the Unix epoch; injectable so expiry can be tested
/// without sleeping.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// Session subjects of relays start with this; node ids (PeerIds) never
/// contain a colon.
const RELAY_SUBJECT_PREFIX: &str = "relay:";

/// The session subject of relay `relay_id`.
pub fn relay_subject(relay_id: &str) -> String {
    format!("{RELAY_SUBJECT_PREFIX}{relay_id}")
}

pub fn is_relay_subject(subject: &str) -> bool {
    subject.starts_with(RELAY_SUBJECT_PREFIX)
}

/// The relay id of a relay's session subject; `None` for a node's.
pub fn relay_of_subject(subject: &str) -> Option<&str> {
    subject.strip_prefix(RELAY_SUBJECT_PREFIX)
}

/// The public key of a signed request, and the PeerId it stands for.
pub fn decode_key(bytes: &[u8]) -> Result<(PublicKey, PeerId)> {
    validate::bytes_limit("public_key", bytes.len(), validate::MAX_KEY_BYTES)?;
    let key = PublicKey::try_decode_protobuf(bytes).map_err(|e| {
        ControlError::invalid(format!(
            "public_key is not a libp2p protobuf-encoded key: {e}"
        ))
    })?;
    let id = key.to_peer_id();
    Ok((key, id))
}

/// The server's identity, clock and session credentials. Cheap to clone:
/// the registry and the relay directory each hold one.
#[derive(Clone)]
pub struct Sessions {
    store: Store,
    clock: Clock,
    server_id: Arc<str>,
    session_ttl_ms: u64,
    clock_skew_ms: u64,
}

impl Sessions {
    /// Opens the sessions of `store`, creating the server's id on the first
    /// start.
    pub fn open(store: Store, clock: Clock, limits: &Limits) -> Result<Self> {
        let server_id = match store.meta_get("server_id")? {
            Some(id) => id,
            None => {
                let id = secrets::generate("srv_");
                store.write(|t| t.meta_put("server_id", &id))?;
                id
            }
        };
        Ok(Self {
            store,
            clock,
            server_id: server_id.into(),
            session_ttl_ms: limits.session_ttl_ms,
            clock_skew_ms: limits.clock_skew_ms,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Whether a signed timestamp is close enough to the server's clock.
    pub fn check_skew(&self, timestamp_ms: u64) -> Result<()> {
        let now = self.now();
        let off = now.abs_diff(timestamp_ms);
        if off > self.clock_skew_ms {
            return Err(ControlError::unauthenticated(format!(
                "signed timestamp is {:.1} s off the server's clock (allowed: {} s); check the node's clock",
                off as f64 / 1000.0,
                self.clock_skew_ms / 1000
            )));
        }
        Ok(())
    }

    /// A new session for `subject` (a node id, or [`relay_subject`]),
    /// written in `txn` and replacing the subject's previous one.
    pub fn create(&self, txn: &mut Txn, subject: &str) -> Result<api::Session> {
        let credential = secrets::generate(secrets::SESSION_PREFIX);
        let expires_ms = self.now() + self.session_ttl_ms;
        self.store.put_session(
            txn,
            &secrets::digest(&credential),
            &SessionRecord {
                node_id: subject.to_string(),
                expires_ms,
            },
        )?;
        Ok(api::Session {
            credential,
            expires_at_ms: expires_ms,
        })
    }

    /// The subject of a live session credential. The caller checks that it
    /// is the kind of subject it serves.
    pub fn subject(&self, credential: &str) -> Result<String> {
        if !secrets::well_formed(credential, secrets::SESSION_PREFIX) {
            return Err(ControlError::unauthenticated(
                "missing or malformed session credential (authorization: Bearer pms_…)",
            ));
        }
        let session = self
            .store
            .session(&secrets::digest(credential))?
            .filter(|s| s.expires_ms > self.now())
            .ok_or_else(|| ControlError::unauthenticated("unknown or expired session"))?;
        Ok(session.node_id)
    }

    /// Drops every expired session; returns how many.
    pub fn purge_expired(&self) -> Result<usize> {
        self.store.purge_expired_sessions(self.now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert!(is_relay_subject(&relay_subject("12D3KooW")));
        assert!(!is_relay_subject("12D3KooW"));
        assert_eq!(relay_of_subject(&relay_subject("r1")), Some("r1"));
        assert_eq!(relay_of_subject("12D3KooW"), None);
    }
}
