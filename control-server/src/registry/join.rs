//! How a node gets in and proves who it is: joining with a token,
//! authenticating with its key, and resolving its session credential.

use std::collections::HashMap;

use peermesh_proto::api::{self, NodeState};
use peermesh_proto::signing;
use peermesh_proto::store::v1::NodeRecord;

use super::{NodeCtx, Registry};
use crate::error::{ControlError, Result};
use crate::hub::RemovalReason;
use crate::sessions::{decode_key, is_relay_subject};
use crate::store::Txn;
use crate::tokens::{self, check_signed_token_request};
use crate::{secrets, validate};

impl Registry {
    pub async fn join(&self, req: &api::JoinRequest) -> Result<api::JoinResponse> {
        let (key, peer_id) =
            check_signed_token_request("join", &req.token, &req.public_key, &req.signature)?;
        let requested = if req.name.is_empty() {
            "node"
        } else {
            req.name.as_str()
        };
        validate::dns_label("name", requested)?;
        self.sessions.check_skew(req.timestamp_ms)?;
        let payload =
            signing::join_payload(&req.token, &req.public_key, &req.name, req.timestamp_ms);
        if !key.verify(&payload, &req.signature) {
            return Err(ControlError::unauthenticated(
                "join signature does not verify with the given public key",
            ));
        }

        let token_id = secrets::token_id(&req.token);
        let token = tokens::load(&self.store, &token_id, "join")?;
        if token.relay {
            return Err(ControlError::unauthenticated(
                "this is a relay token: relay servers register with it; nodes join with a group's token",
            ));
        }
        let group = self.group(&token.group)?;
        let node_id = peer_id.to_string();
        let now = self.now();

        let (rec, session) = {
            let _g = group.lock();
            // Re-read under the group lock: concurrent joins share the count.
            let mut token = tokens::load(&self.store, &token_id, "join")?;
            tokens::check_live(&token, "join", now)?;
            let existing = self.store.node(&node_id)?;
            if let Some(n) = &existing {
                if n.group != token.group {
                    return Err(ControlError::FailedPrecondition(format!(
                        "this node key already belongs to group {:?}; remove the node there first",
                        n.group
                    )));
                }
                if req.timestamp_ms <= n.last_auth_ms {
                    return Err(ControlError::unauthenticated(
                        "stale signed timestamp (a replayed request?)",
                    ));
                }
            }
            // Retrying a join that already succeeded (its answer was lost)
            // must not use up a single-use token.
            let repeat = existing
                .as_ref()
                .is_some_and(|n| n.state == NodeState::Active as i32 && n.token_id == token_id);
            if !repeat && self.store.token_used_by(&token_id, &node_id)? {
                // Removed (or revoked) since: the token it used was for
                // that admission, not for coming back.
                return Err(ControlError::PermissionDenied(
                    "this node was removed after it joined with this token; an administrator \
                     must give it a new token to come back"
                        .into(),
                ));
            }
            if existing.is_none() {
                let in_group = self.names().get(&token.group).map_or(0, |n| n.len());
                if in_group >= self.max_nodes_per_group as usize {
                    // Not RESOURCE_EXHAUSTED: clients retry that (rate
                    // limits pass); a full group waits for an administrator.
                    return Err(ControlError::FailedPrecondition(format!(
                        "group {:?} holds {in_group} nodes, the limit of this server \
                         (control-server serve --max-group-nodes); remove nodes first",
                        token.group
                    )));
                }
            }
            let mut txn = Txn::new();
            if !repeat {
                tokens::take_use(&mut txn, &mut token, "join")?;
                txn.put_token_use(&token_id, &node_id, now);
            }
            let keep_name = existing
                .as_ref()
                .is_some_and(|n| req.name.is_empty() || req.name == n.name);
            let mut rec = existing.unwrap_or_else(|| NodeRecord {
                node_id: node_id.clone(),
                public_key: req.public_key.clone(),
                group: token.group.clone(),
                joined_ms: now,
                ..Default::default()
            });
            let old_name = rec.name.clone();
            if !keep_name {
                let names = self.names();
                let empty = HashMap::new();
                let names = names.get(&token.group).unwrap_or(&empty);
                rec.name = unique_name(names, requested, &node_id);
            }
            rec.state = NodeState::Active as i32;
            rec.token_id = token_id.clone();
            // A new token is an administrator's new decision.
            txn.clear_tombstone(&node_id);
            rec.last_auth_ms = req.timestamp_ms;
            rec.last_seen_ms = now;
            let old_addr = rec.mesh_ipv4.clone();
            let new_addr = self.assign_mesh_addrs(&mut rec);
            txn.put_node(&rec);
            let session = self.sessions.create(&mut txn, &node_id)?;
            if let Err(e) = self.store.commit(txn) {
                if new_addr && rec.mesh_ipv4 != old_addr {
                    self.release_mesh_addr(&node_id, &rec.mesh_ipv4);
                }
                return Err(e);
            }
            if rec.name != old_name {
                let mut names = self.names();
                let names = names.entry(token.group.clone()).or_default();
                if names.get(&old_name) == Some(&node_id) {
                    names.remove(&old_name);
                }
                names.insert(rec.name.clone(), node_id.clone());
            }
            (rec, session)
        };
        // Durable before anyone hears of it: a watcher never sees a node
        // that a crash could take back.
        self.store.flush().await?;
        self.publish_member(&group, &node_id, None)?;
        tracing::info!(node = %node_id, name = %rec.name, group = %rec.group, "node joined");
        Ok(api::JoinResponse {
            node_id,
            group: rec.group,
            name: rec.name,
            session: Some(session),
            server_id: self.server_id().to_string(),
            // The API adds the server key.
            server_identity: None,
        })
    }

    pub async fn authenticate(
        &self,
        req: &api::AuthenticateRequest,
    ) -> Result<api::AuthenticateResponse> {
        let (key, peer_id) = decode_key(&req.public_key)?;
        validate::bytes_limit(
            "signature",
            req.signature.len(),
            validate::MAX_SIGNATURE_BYTES,
        )?;
        self.sessions.check_skew(req.timestamp_ms)?;
        let payload = signing::auth_payload(self.server_id(), &req.public_key, req.timestamp_ms);
        if !key.verify(&payload, &req.signature) {
            return Err(ControlError::unauthenticated(
                "authentication signature does not verify (wrong key, or signed for another server)",
            ));
        }
        let node_id = peer_id.to_string();
        if let Some(reason) = self.store.tombstone(&node_id)? {
            return Err(ControlError::PermissionDenied(reason));
        }
        let unknown =
            || ControlError::unauthenticated("this node key is not registered; join with a token");
        let group = self.store.node(&node_id)?.ok_or_else(unknown)?.group;
        let group = self.group(&group)?;
        let (rec, session) = {
            let _g = group.lock();
            let mut rec = self.store.node(&node_id)?.ok_or_else(unknown)?;
            if rec.state == NodeState::Revoked as i32 {
                return Err(ControlError::PermissionDenied(
                    RemovalReason::Revoked.describe().into(),
                ));
            }
            if req.timestamp_ms <= rec.last_auth_ms {
                return Err(ControlError::unauthenticated(
                    "stale signed timestamp (a replayed request?)",
                ));
            }
            rec.last_auth_ms = req.timestamp_ms;
            rec.last_seen_ms = self.now();
            let mut txn = Txn::new();
            txn.put_node(&rec);
            let session = self.sessions.create(&mut txn, &node_id)?;
            self.store.commit(txn)?;
            (rec, session)
        };
        self.store.flush().await?;
        Ok(api::AuthenticateResponse {
            node_id,
            group: rec.group,
            name: rec.name,
            session: Some(session),
            server_id: self.server_id().to_string(),
            // The API adds the server key.
            server_identity: None,
        })
    }

    /// Resolves a session credential to the node it belongs to.
    pub fn authorize(&self, credential: &str) -> Result<NodeCtx> {
        let subject = self.sessions.subject(credential)?;
        if is_relay_subject(&subject) {
            return Err(ControlError::PermissionDenied(
                "this is a relay's session; node calls need a session from Join or Authenticate"
                    .into(),
            ));
        }
        let node = self.store.node(&subject)?.ok_or_else(|| {
            ControlError::PermissionDenied(RemovalReason::Removed.describe().into())
        })?;
        if node.state != NodeState::Active as i32 {
            return Err(ControlError::PermissionDenied(
                RemovalReason::Revoked.describe().into(),
            ));
        }
        Ok(NodeCtx {
            node_id: node.node_id,
            group: node.group,
        })
    }
}

/// `base`, or `base-2`, `base-3`… whichever no other node of the group holds.
fn unique_name(names: &HashMap<String, String>, base: &str, node_id: &str) -> String {
    let free = |n: &str| names.get(n).is_none_or(|holder| holder == node_id);
    if free(base) {
        return base.to_string();
    }
    let stem = &base[..base.len().min(validate::MAX_NAME - 6)];
    (2u32..)
        .map(|i| format!("{stem}-{i}"))
        .find(|n| free(n))
        .expect("an unbounded counter finds a free name")
}
