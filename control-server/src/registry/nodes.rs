//! A member's life after it got in: its watch streams (online while it holds
//! one), its endpoints and NAT behaviour, leaving; and the admin's view of
//! nodes: listing and removal.

use std::sync::Arc;

use peermesh_proto::api::{self, NetworkMapUpdate, NodeInfo, NodeState, Peer};
use peermesh_proto::store::v1::NodeRecord;
use tokio::sync::broadcast;

use super::{NodeCtx, Registry};
use crate::error::{ControlError, Result};
use crate::hub::{GroupEvent, MapParts, RemovalReason};
use crate::store::Txn;
use crate::validate;

/// What a watcher starts from.
pub struct Subscription {
    /// The full map's head; the members follow in `parts`.
    pub first: NetworkMapUpdate,
    pub parts: Arc<MapParts>,
    pub version: u64,
    pub events: broadcast::Receiver<GroupEvent>,
    pub guard: WatchGuard,
}

/// Marks the node offline when its last watch stream ends.
pub struct WatchGuard {
    registry: Arc<Registry>,
    group: String,
    node_id: String,
}

impl Subscription {
    /// The full map in one piece (its head with the parts' members).
    pub fn full_map(&self) -> NetworkMapUpdate {
        let mut u = self.first.clone();
        if let Some(api::network_map_update::Kind::Full(m)) = u.kind.take() {
            u.kind = Some(api::network_map_update::Kind::Full(
                peermesh_proto::signing::assemble_map(m, self.parts.decode()),
            ));
        }
        u
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.registry.watch_closed(&self.group, &self.node_id);
    }
}

impl Registry {
    /// Opens a watch: the full map at the current version plus a receiver of
    /// every later change; marks the node online.
    pub fn watch(self: &Arc<Self>, ctx: &NodeCtx) -> Result<Subscription> {
        let group = self.group(&ctx.group)?;
        let (first, parts, events) = {
            let mut g = group.lock();
            let now = self.now();
            g.watch(&ctx.node_id, now)?
        };
        let guard = WatchGuard {
            registry: self.clone(),
            group: ctx.group.clone(),
            node_id: ctx.node_id.clone(),
        };
        Ok(Subscription {
            version: first.version,
            first,
            parts,
            events,
            guard,
        })
    }

    /// The fan-out of `group` (for its feed epoch).
    pub fn group_hub(&self, group: &str) -> Result<Arc<crate::hub::GroupHub>> {
        self.group(group)
    }

    /// A fresh full map (in one piece) for a watcher that fell behind.
    pub fn resync(&self, ctx: &NodeCtx) -> Result<NetworkMapUpdate> {
        self.group(&ctx.group)?.lock().snapshot(&ctx.node_id)
    }

    /// [`Self::resync`] in parts, as watch streams send it.
    pub fn resync_in_parts(&self, ctx: &NodeCtx) -> Result<(NetworkMapUpdate, Arc<MapParts>)> {
        self.group(&ctx.group)?
            .lock()
            .snapshot_in_parts(&ctx.node_id)
    }

    /// A member of the caller's group as peers see it (with `online`), or
    /// NOT_FOUND: members of other groups do not exist for the caller.
    pub fn member(&self, ctx: &NodeCtx, node_id: &str) -> Result<Peer> {
        self.group(&ctx.group)?
            .lock()
            .member(node_id)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no node {node_id:?} in this group")))
    }

    fn watch_closed(&self, group: &str, node_id: &str) {
        let Ok(group) = self.group(group) else { return };
        let mut g = group.lock();
        let now = self.now();
        if !g.unwatch(node_id, now) {
            return;
        }
        // Best effort: last-seen is informational.
        if let Ok(Some(mut rec)) = self.store.node(node_id) {
            rec.last_seen_ms = now;
            if let Err(e) = self.store.write(|t| t.put_node(&rec)) {
                tracing::warn!(node = node_id, error = %e, "could not store last-seen time");
            }
        }
    }

    pub async fn update_endpoints(&self, ctx: &NodeCtx, addresses: &[String]) -> Result<()> {
        validate::addresses(addresses)?;
        let mut addrs = addresses.to_vec();
        addrs.sort();
        addrs.dedup();
        let group = self.group(&ctx.group)?;
        {
            let _g = group.lock();
            let mut rec = self.active_node(&ctx.node_id)?;
            if rec.addresses == addrs {
                return Ok(());
            }
            rec.addresses = addrs;
            self.store.write(|t| t.put_node(&rec))?;
        }
        self.store.flush().await?;
        self.publish_member(&group, &ctx.node_id, None)
    }

    /// Keeps the caller's NAT behaviour (seed 003) in its record, where
    /// `admin nodes` shows it. Not a change of the map: nothing is published.
    pub async fn report_nat(&self, ctx: &NodeCtx, mut report: api::NatReport) -> Result<()> {
        let known = [
            "",
            "endpoint_independent",
            "address_dependent",
            "address_and_port_dependent",
            "sequential",
            "random",
        ];
        if !known.contains(&report.mapping.as_str()) || !known.contains(&report.filtering.as_str())
        {
            return Err(ControlError::invalid(format!(
                "unknown NAT behaviour {:?}/{:?}",
                report.mapping, report.filtering
            )));
        }
        validate::bytes_limit(
            "public_endpoint",
            report.public_endpoint.len(),
            validate::MAX_ADDRESS_LEN,
        )?;
        if !report.public_endpoint.is_empty()
            && report
                .public_endpoint
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(ControlError::invalid("public_endpoint is not host:port"));
        }
        report.measured_ms = self.now();
        let group = self.group(&ctx.group)?;
        {
            let _g = group.lock();
            let mut rec = self.active_node(&ctx.node_id)?;
            tracing::info!(node = %ctx.node_id, mapping = %report.mapping, stride = report.port_stride, filtering = %report.filtering, udp = report.udp, "NAT behaviour reported");
            rec.nat = Some(report);
            self.store.write(|t| t.put_node(&rec))?;
        }
        self.store.flush().await?;
        Ok(())
    }

    /// The record of an active node; call under its group's lock.
    fn active_node(&self, node_id: &str) -> Result<NodeRecord> {
        self.store
            .node(node_id)?
            .filter(|n| n.state == NodeState::Active as i32)
            .ok_or_else(|| ControlError::PermissionDenied("node is not active".into()))
    }

    pub async fn leave(&self, ctx: &NodeCtx) -> Result<()> {
        self.delete_node(&ctx.node_id, RemovalReason::Left).await
    }

    pub fn list_nodes(&self, group: &str) -> Result<Vec<NodeInfo>> {
        Ok(self
            .store
            .nodes()?
            .into_iter()
            .filter(|n| group.is_empty() || n.group == group)
            .map(|n| NodeInfo {
                online: self.hub.is_online(&n.group, &n.node_id),
                node_id: n.node_id,
                name: n.name,
                group: n.group,
                state: n.state,
                addresses: n.addresses,
                joined_ms: n.joined_ms,
                last_seen_ms: n.last_seen_ms,
                token_id: n.token_id,
                mesh_ipv4: n.mesh_ipv4,
                mesh_ipv6: n.mesh_ipv6,
                nat: n.nat,
            })
            .collect())
    }

    /// Resolves a node id, or a name (narrowed by `group` when non-empty).
    fn resolve_node(&self, node: &str, group: &str) -> Result<NodeRecord> {
        validate::bytes_limit("node", node.len(), validate::MAX_TOKEN_LEN)?;
        if let Some(n) = self.store.node(node)? {
            return Ok(n);
        }
        let matches: Vec<NodeRecord> = self
            .store
            .nodes()?
            .into_iter()
            .filter(|n| n.name == node && (group.is_empty() || n.group == group))
            .collect();
        match matches.len() {
            0 => Err(ControlError::not_found(format!(
                "no node with id or name {node:?}"
            ))),
            1 => Ok(matches.into_iter().next().expect("one match")),
            _ => Err(ControlError::FailedPrecondition(format!(
                "name {node:?} exists in several groups ({}); give the group",
                matches
                    .iter()
                    .map(|n| n.group.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    pub async fn remove_node(&self, node: &str, group: &str) -> Result<String> {
        let rec = self.resolve_node(node, group)?;
        self.delete_node(&rec.node_id, RemovalReason::Removed)
            .await?;
        Ok(rec.node_id)
    }

    async fn delete_node(&self, node_id: &str, reason: RemovalReason) -> Result<()> {
        let rec = self
            .store
            .node(node_id)?
            .ok_or_else(|| ControlError::not_found(format!("no node {node_id}")))?;
        let group = self.group(&rec.group)?;
        {
            let _g = group.lock();
            let mut txn = Txn::new();
            txn.delete_node(node_id);
            txn.put_tombstone(node_id, reason.describe());
            self.store.end_session(&mut txn, node_id)?;
            self.store.delete_links_of(&mut txn, node_id)?;
            self.store.commit(txn)?;
            if let Some(names) = self.names().get_mut(&rec.group) {
                names.remove(&rec.name);
            }
            self.release_mesh_addr(node_id, &rec.mesh_ipv4);
        }
        self.store.flush().await?;
        self.publish_member(&group, node_id, Some(reason))?;
        tracing::info!(node = node_id, name = %rec.name, group = %rec.group, ?reason, "node deleted");
        Ok(())
    }
}
