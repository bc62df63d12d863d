//! The registry: groups, join tokens, nodes, sessions, links and mesh
//! addresses, durable in sled ([`Store`]).
//!
//! It publishes every change of a group's membership into the change hub
//! ([`crate::hub`]), under that group's lock, after writing it to sled; it
//! knows nothing of relays beyond refusing their sessions.
//!
//! - [`groups`]: groups and join tokens (the admin side).
//! - [`join`]: how a node gets in and proves who it is: join, authenticate,
//!   session authorization, unique names.
//! - [`nodes`]: a member's life: watch streams, endpoints, NAT reports,
//!   leaving, listing and removal.
//! - [`links`]: link reports and the link table.
//! - [`mesh_addr`]: the nodes' mesh (TUN) addresses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use peermesh_proto::api::{NodeState, Peer};
use peermesh_proto::store::v1::NodeRecord;

use crate::error::Result;
use crate::hub::{GroupHub, Hub};
use crate::limits::Limits;
use crate::sessions::Sessions;
use crate::store::Store;

pub mod groups;
pub mod join;
pub mod links;
pub mod mesh_addr;
pub mod nodes;

pub use nodes::{Subscription, WatchGuard};

/// An authenticated node, as resolved from a session credential.
#[derive(Clone, Debug)]
pub struct NodeCtx {
    pub node_id: String,
    pub group: String,
}

/// Per group: every name in use (active and revoked nodes) → node id.
type Names = HashMap<String, HashMap<String, String>>;

pub struct Registry {
    store: Store,
    sessions: Sessions,
    hub: Arc<Hub>,
    default_token_ttl_ms: u64,
    max_nodes_per_group: u32,
    /// Node names in use; a leaf lock, taken under a group's.
    names: Mutex<Names>,
    /// Mesh (TUN) addresses in use; a leaf lock, taken under a group's.
    mesh_addrs: Mutex<mesh_addr::MeshAddrs>,
}

fn peer_of(n: &NodeRecord, online: bool) -> Peer {
    Peer {
        node_id: n.node_id.clone(),
        name: n.name.clone(),
        public_key: n.public_key.clone(),
        addresses: n.addresses.clone(),
        online,
        last_seen_ms: n.last_seen_ms,
        joined_ms: n.joined_ms,
        mesh_ipv4: n.mesh_ipv4.clone(),
        mesh_ipv6: n.mesh_ipv6.clone(),
    }
}

impl Registry {
    /// Opens the registry on the store of `sessions` and rebuilds every
    /// group of it in `hub`.
    pub fn open(sessions: Sessions, hub: Arc<Hub>, limits: &Limits) -> Result<Arc<Self>> {
        let registry = Self {
            mesh_addrs: Mutex::new(mesh_addr::MeshAddrs::new(sessions.server_id())),
            store: sessions.store().clone(),
            sessions,
            hub,
            default_token_ttl_ms: limits.default_token_ttl_ms,
            max_nodes_per_group: limits.max_nodes_per_group,
            names: Mutex::new(HashMap::new()),
        };
        for g in registry.store.groups()? {
            registry.hub.add_group(&g.name, || Ok(()))?;
        }
        for mut n in registry.store.nodes()? {
            if registry.assign_mesh_addrs(&mut n) {
                registry.store.write(|t| t.put_node(&n))?;
            }
            let Ok(group) = registry.hub.group(&n.group) else {
                tracing::warn!(node = %n.node_id, group = %n.group, "node of an unknown group; ignored");
                continue;
            };
            let mut g = group.lock();
            registry
                .names()
                .entry(n.group.clone())
                .or_default()
                .insert(n.name.clone(), n.node_id.clone());
            if n.state == NodeState::Active as i32 {
                g.restore(peer_of(&n, false));
            }
        }
        let purged = registry.sessions.purge_expired()?;
        tracing::debug!(purged, "expired sessions removed");
        Ok(Arc::new(registry))
    }

    pub fn server_id(&self) -> &str {
        self.sessions.server_id()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn now(&self) -> u64 {
        self.sessions.now()
    }

    fn group(&self, name: &str) -> Result<Arc<GroupHub>> {
        self.hub.group(name)
    }

    /// The name index; a leaf lock, taken under a group's.
    fn names(&self) -> MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees a mesh address claimed for a change that did not commit.
    fn release_mesh_addr(&self, node_id: &str, v4: &str) {
        self.mesh_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(node_id, v4);
    }

    /// Makes the group's map agree with the store about `node_id`, once its
    /// change is durable: an active node is published as the store has it
    /// (if the map differs); a node that is no longer active leaves the map
    /// with `gone`, or, without a reason, is left to the change that took
    /// it out (which publishes its own removal). Reading the store under
    /// the group's lock, rather than publishing what the caller wrote, keeps
    /// the map right when two changes of one node race between their
    /// commit and their publication.
    fn publish_member(
        &self,
        group: &GroupHub,
        node_id: &str,
        gone: Option<crate::hub::RemovalReason>,
    ) -> Result<()> {
        let mut g = group.lock();
        match self.store.node(node_id)? {
            Some(rec) if rec.state == NodeState::Active as i32 => {
                let peer = peer_of(&rec, g.is_online(node_id));
                if g.member(node_id) != Some(&peer) {
                    g.upsert(peer);
                }
            }
            _ => {
                if let Some(reason) = gone.filter(|_| g.is_member(node_id)) {
                    g.remove(node_id, reason);
                }
            }
        }
        Ok(())
    }

    /// Gives `n` its mesh addresses (keeping the ones it holds); true when
    /// the record changed and must be stored.
    fn assign_mesh_addrs(&self, n: &mut NodeRecord) -> bool {
        let mut m = self.mesh_addrs.lock().unwrap_or_else(|p| p.into_inner());
        if m.claim(&n.node_id, &n.mesh_ipv4) && !n.mesh_ipv6.is_empty() {
            return false;
        }
        let (v4, v6) = match n.mesh_ipv4.parse() {
            // Claimed above, only the IPv6 half was missing.
            Ok(v4) if m.claim(&n.node_id, &n.mesh_ipv4) => (v4, m.v6(&n.node_id, v4)),
            _ => m.allocate(&n.node_id),
        };
        tracing::info!(node = %n.node_id, %v4, %v6, "mesh addresses assigned");
        n.mesh_ipv4 = v4.to_string();
        n.mesh_ipv6 = v6.to_string();
        true
    }
}

#[cfg(test)]
mod tests;
