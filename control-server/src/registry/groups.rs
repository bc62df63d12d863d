//! Groups and join tokens: what administrators create, list and revoke.

use peermesh_proto::api::{GroupInfo, NodeState, TokenInfo};
use peermesh_proto::store::v1::{GroupRecord, TokenRecord};

use super::Registry;
use crate::error::{ControlError, Result};
use crate::hub::RemovalReason;
use crate::store::Txn;
use crate::tokens::{self, token_info};
use crate::{secrets, validate};

/// Longest token lifetime accepted (about ten years); keeps expiry arithmetic
/// far from overflow.
pub(crate) const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

impl Registry {
    pub async fn create_group(&self, name: &str) -> Result<GroupInfo> {
        validate::dns_label("group name", name)?;
        let created_ms = self.now();
        self.hub.add_group(name, || {
            self.store.write(|t| {
                t.put_group(&GroupRecord {
                    name: name.to_string(),
                    created_ms,
                })
            })
        })?;
        self.store.flush().await?;
        tracing::info!(group = name, "group created");
        Ok(GroupInfo {
            name: name.to_string(),
            created_ms,
            node_count: 0,
        })
    }

    pub fn list_groups(&self) -> Result<Vec<GroupInfo>> {
        Ok(self
            .store
            .groups()?
            .into_iter()
            .map(|g| GroupInfo {
                node_count: self.hub.member_count(&g.name) as u32,
                name: g.name,
                created_ms: g.created_ms,
            })
            .collect())
    }

    /// A join token for nodes of `group`, good for `max_uses` nodes (0: any
    /// number).
    pub async fn create_token(
        &self,
        group: &str,
        ttl_secs: u64,
        max_uses: u32,
    ) -> Result<(String, TokenInfo)> {
        self.create_token_with(group, ttl_secs, max_uses, max_uses == 0, false)
            .await
    }

    /// A join token for nodes of `group`, or with `relay` a token for relay
    /// servers (which belong to no group: `group` must be empty). Good for
    /// `max_uses` joins; 0 means one, unless `reusable` (then any number
    /// until it expires, within the cap of nodes per group). Returns the
    /// secret (`pmj_…`); the API adds the server key's fingerprint.
    pub async fn create_token_with(
        &self,
        group: &str,
        ttl_secs: u64,
        max_uses: u32,
        reusable: bool,
        relay: bool,
    ) -> Result<(String, TokenInfo)> {
        if relay {
            if !group.is_empty() {
                return Err(ControlError::invalid(
                    "a relay token belongs to no group; leave the group empty",
                ));
            }
        } else {
            if group.is_empty() {
                return Err(ControlError::invalid(
                    "a node token needs a group (or ask for a relay token)",
                ));
            }
            self.group(group)?;
        }
        if ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(ControlError::invalid(format!(
                "ttl of {ttl_secs} s is longer than the limit of {MAX_TOKEN_TTL_SECS} s"
            )));
        }
        let ttl_ms = if ttl_secs == 0 {
            self.default_token_ttl_ms
        } else {
            ttl_secs * 1000
        };
        if reusable && max_uses != 0 {
            return Err(ControlError::invalid(
                "a token is either reusable or good for max_uses joins, not both",
            ));
        }
        let max_uses = if max_uses == 0 && !reusable {
            1
        } else {
            max_uses
        };
        let token = secrets::generate(secrets::JOIN_TOKEN_PREFIX);
        let now = self.now();
        let rec = TokenRecord {
            token_id: secrets::token_id(&token),
            group: group.to_string(),
            created_ms: now,
            expires_ms: now + ttl_ms,
            uses: 0,
            max_uses,
            revoked: false,
            relay,
        };
        self.store.write(|t| t.put_token(&rec))?;
        self.store.flush().await?;
        tracing::info!(group, token_id = %rec.token_id, ttl_ms, max_uses, relay, "join token created");
        Ok((token, token_info(&rec)))
    }

    pub fn list_tokens(&self, group: &str) -> Result<Vec<TokenInfo>> {
        Ok(self
            .store
            .tokens()?
            .iter()
            .filter(|t| group.is_empty() || t.group == group)
            .map(token_info)
            .collect())
    }

    /// Revokes a node token (given as the secret or its id) and, unless
    /// `keep_nodes`, every active node that joined with it. Relay tokens are
    /// the relay directory's to revoke.
    pub async fn revoke_token(
        &self,
        token_or_id: &str,
        keep_nodes: bool,
    ) -> Result<(TokenInfo, Vec<String>)> {
        let rec = tokens::find(&self.store, token_or_id)?;
        self.revoke_node_token(rec, keep_nodes).await
    }

    /// [`Self::revoke_token`] of a token already looked up.
    pub async fn revoke_node_token(
        &self,
        mut rec: TokenRecord,
        keep_nodes: bool,
    ) -> Result<(TokenInfo, Vec<String>)> {
        if rec.relay {
            return Err(ControlError::FailedPrecondition(
                "this is a relay token; the relay directory revokes it".into(),
            ));
        }
        let token_id = rec.token_id.clone();
        let group = self.group(&rec.group)?;
        let mut revoked_nodes = Vec::new();
        {
            let _g = group.lock();
            rec.revoked = true;
            let mut txn = Txn::new();
            txn.put_token(&rec);
            if !keep_nodes {
                for mut n in self.store.nodes()? {
                    if n.token_id == token_id
                        && n.group == rec.group
                        && n.state == NodeState::Active as i32
                    {
                        n.state = NodeState::Revoked as i32;
                        txn.put_node(&n);
                        self.store.end_session(&mut txn, &n.node_id)?;
                        self.store.delete_links_of(&mut txn, &n.node_id)?;
                        revoked_nodes.push(n.node_id);
                    }
                }
            }
            self.store.commit(txn)?;
        }
        self.store.flush().await?;
        for node_id in &revoked_nodes {
            self.publish_member(&group, node_id, Some(RemovalReason::Revoked))?;
        }
        tracing::info!(%token_id, nodes = revoked_nodes.len(), "join token revoked");
        Ok((token_info(&rec), revoked_nodes))
    }
}
