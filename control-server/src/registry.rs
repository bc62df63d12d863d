//! The control plane's core: groups, join tokens, nodes, sessions and links,
//! and one [`GroupHub`] per group that turns every change into a versioned
//! network-map delta for the group's watchers.
//!
//! Durable truth lives in sled ([`Store`]); each hub keeps the group's active
//! members in memory so snapshots and fan-out never touch the disk. Every
//! change to a group happens under its hub's lock, which is what makes
//! "snapshot at version V, then every delta above V" exact for a watcher.
//!
//! The relay directory ([`crate::relays`]) hooks in at two places: each hub
//! also reports membership changes (with the group's version) to the
//! directory's member channel, and carries the list of online relays, which
//! the directory replaces through the same publish path.
//!
//! Lock order: relay directory → hub table → one hub.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p_identity::{PeerId, PublicKey};
use peermesh_proto::api::{
    self, GroupInfo, LinkEntry, LinkReport, NetworkMap, NetworkMapUpdate, NodeInfo, NodeState,
    PathKind, Peer, Relay, TokenInfo,
};
use peermesh_proto::signing;
use peermesh_proto::store::v1::{GroupRecord, LinkRecord, NodeRecord, SessionRecord, TokenRecord};
use tokio::sync::broadcast;

use crate::error::{ControlError, Result};
use crate::relays::{self, MemberEvent, RelayDirectory};
use crate::secrets;
use crate::store::Store;
use crate::validate;

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

#[derive(Clone, Debug)]
pub struct Limits {
    pub session_ttl_ms: u64,
    pub default_token_ttl_ms: u64,
    /// How far a signed timestamp may be from the server's clock.
    pub clock_skew_ms: u64,
    /// Events a watcher may fall behind before it is sent a fresh full map.
    pub watch_backlog: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            session_ttl_ms: 24 * 3600 * 1000,
            default_token_ttl_ms: 24 * 3600 * 1000,
            clock_skew_ms: 5 * 60 * 1000,
            watch_backlog: 4096,
        }
    }
}

/// Longest token lifetime accepted (about ten years); keeps expiry arithmetic
/// far from overflow.
const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemovalReason {
    Revoked,
    Removed,
    Left,
}

impl RemovalReason {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Revoked => "this node was revoked by an administrator",
            Self::Removed => "this node was removed by an administrator",
            Self::Left => "this node left its group",
        }
    }
}

#[derive(Clone, Debug)]
pub enum GroupEvent {
    Upsert {
        version: u64,
        peer: Arc<Peer>,
    },
    Removed {
        version: u64,
        node_id: Arc<str>,
        reason: RemovalReason,
    },
    /// The list of online relays was replaced.
    Relays {
        version: u64,
        relays: Arc<Vec<Relay>>,
    },
}

impl GroupEvent {
    pub fn version(&self) -> u64 {
        match self {
            Self::Upsert { version, .. }
            | Self::Removed { version, .. }
            | Self::Relays { version, .. } => *version,
        }
    }

    pub fn to_update(&self) -> NetworkMapUpdate {
        let (version, kind) = match self {
            Self::Upsert { version, peer } => (
                *version,
                api::network_map_update::Kind::PeerUpsert((**peer).clone()),
            ),
            Self::Removed {
                version, node_id, ..
            } => (
                *version,
                api::network_map_update::Kind::PeerRemoved(node_id.to_string()),
            ),
            Self::Relays { version, relays } => (
                *version,
                api::network_map_update::Kind::Relays(api::RelayList {
                    relays: (**relays).clone(),
                }),
            ),
        };
        NetworkMapUpdate {
            version,
            kind: Some(kind),
        }
    }
}

struct GroupState {
    version: u64,
    /// Active members, as peers see them.
    members: BTreeMap<String, Peer>,
    /// Every name in use in the group (active and revoked nodes) → node id.
    names: HashMap<String, String>,
    /// Open watch streams per node; a node is online while it has one.
    watchers: HashMap<String, usize>,
    /// The online relays, as the directory last published them.
    relays: Arc<Vec<Relay>>,
}

pub struct GroupHub {
    name: Arc<str>,
    state: Mutex<GroupState>,
    tx: broadcast::Sender<GroupEvent>,
    /// The relay directory's channel of membership changes (all groups).
    members_tx: broadcast::Sender<MemberEvent>,
}

impl GroupHub {
    fn new(
        name: &str,
        backlog: usize,
        members_tx: broadcast::Sender<MemberEvent>,
        relays: Arc<Vec<Relay>>,
    ) -> Self {
        Self {
            name: name.into(),
            state: Mutex::new(GroupState {
                version: 0,
                members: BTreeMap::new(),
                names: HashMap::new(),
                watchers: HashMap::new(),
                relays,
            }),
            tx: broadcast::channel(backlog).0,
            members_tx,
        }
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A panic while holding the lock leaves consistent data (every
        // mutation is a single assignment), so poisoning is not fatal.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change and tells the watchers, under the lock held by `st`.
    fn publish(&self, st: &mut GroupState, change: Change) {
        st.version += 1;
        let version = st.version;
        let mut member_change = None;
        let event = match change {
            Change::Upsert(peer) => {
                let old = st.members.insert(peer.node_id.clone(), peer.clone());
                if old.is_none() {
                    member_change = Some((peer.node_id.as_str().into(), true));
                }
                GroupEvent::Upsert {
                    version,
                    peer: Arc::new(peer),
                }
            }
            Change::Remove(node_id, reason) => {
                let node_id: Arc<str> = node_id.into();
                if st.members.remove(&*node_id).is_some() {
                    member_change = Some((node_id.clone(), false));
                }
                GroupEvent::Removed {
                    version,
                    node_id,
                    reason,
                }
            }
            Change::Relays(relays) => {
                st.relays = relays.clone();
                GroupEvent::Relays { version, relays }
            }
        };
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(event);
        if let Some((node_id, added)) = member_change {
            let _ = self.members_tx.send(MemberEvent::Member {
                group: self.name.clone(),
                version,
                node_id,
                added,
            });
        }
    }
}

enum Change {
    Upsert(Peer),
    Remove(String, RemovalReason),
    Relays(Arc<Vec<Relay>>),
}

/// What a watcher starts from.
pub struct Subscription {
    pub first: NetworkMapUpdate,
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

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.registry.watch_closed(&self.group, &self.node_id);
    }
}

/// An authenticated node, as resolved from a session credential.
#[derive(Clone, Debug)]
pub struct NodeCtx {
    pub node_id: String,
    pub group: String,
}

pub struct Registry {
    store: Store,
    server_id: String,
    clock: Clock,
    limits: Limits,
    hubs: Mutex<HashMap<String, Arc<GroupHub>>>,
    pub(crate) relays: RelayDirectory,
    /// Mesh (TUN) addresses in use; a leaf lock, taken under a hub's.
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

pub(crate) fn token_info(t: &TokenRecord) -> TokenInfo {
    TokenInfo {
        token_id: t.token_id.clone(),
        group: t.group.clone(),
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        uses: t.uses,
        max_uses: t.max_uses,
        revoked: t.revoked,
        relay: t.relay,
    }
}

/// Shape checks shared by every signed request that carries a token (node
/// joins, relay registrations): the token's form, the key, the signature size.
pub(crate) fn check_signed_token_request(
    kind: &str,
    token: &str,
    public_key: &[u8],
    signature: &[u8],
) -> Result<(PublicKey, PeerId)> {
    validate::bytes_limit("token", token.len(), validate::MAX_TOKEN_LEN)?;
    if !secrets::well_formed(token, secrets::JOIN_TOKEN_PREFIX) {
        return Err(ControlError::invalid(format!(
            "malformed {kind} token (expected pmj_ and 48 hex digits)"
        )));
    }
    let decoded = decode_key(public_key)?;
    validate::bytes_limit("signature", signature.len(), validate::MAX_SIGNATURE_BYTES)?;
    Ok(decoded)
}

fn decode_key(bytes: &[u8]) -> Result<(PublicKey, PeerId)> {
    validate::bytes_limit("public_key", bytes.len(), validate::MAX_KEY_BYTES)?;
    let key = PublicKey::try_decode_protobuf(bytes).map_err(|e| {
        ControlError::invalid(format!(
            "public_key is not a libp2p protobuf-encoded key: {e}"
        ))
    })?;
    let id = key.to_peer_id();
    Ok((key, id))
}

impl Registry {
    /// Opens the registry on `store` and rebuilds every group hub from it.
    pub fn open(store: Store, clock: Clock, limits: Limits) -> Result<Arc<Self>> {
        let server_id = match store.meta_get("server_id")? {
            Some(id) => id,
            None => {
                let id = secrets::generate("srv_");
                store.meta_put("server_id", &id)?;
                id
            }
        };
        let registry = Self {
            mesh_addrs: Mutex::new(mesh_addr::MeshAddrs::new(&server_id)),
            store,
            server_id,
            clock,
            hubs: Mutex::new(HashMap::new()),
            relays: RelayDirectory::new(limits.watch_backlog),
            limits,
        };
        {
            let mut hubs = registry.hubs_lock();
            for g in registry.store.groups()? {
                let hub = registry.new_hub(&g.name);
                hubs.insert(g.name, hub);
            }
            for mut n in registry.store.nodes()? {
                if registry.assign_mesh_addrs(&mut n) {
                    registry.store.put_node(&n)?;
                }
                let Some(hub) = hubs.get(&n.group) else {
                    tracing::warn!(node = %n.node_id, group = %n.group, "node of an unknown group; ignored");
                    continue;
                };
                let mut st = hub.lock();
                st.names.insert(n.name.clone(), n.node_id.clone());
                if n.state == NodeState::Active as i32 {
                    st.members.insert(n.node_id.clone(), peer_of(&n, false));
                }
            }
        }
        let now = registry.now();
        let purged = registry.store.purge_sessions(None, now)?;
        tracing::debug!(purged, "expired sessions removed");
        Ok(Arc::new(registry))
    }

    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn now(&self) -> u64 {
        (self.clock)()
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

    fn hubs_lock(&self) -> MutexGuard<'_, HashMap<String, Arc<GroupHub>>> {
        self.hubs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A hub for a new group; call with the hub table locked, so that it
    /// starts from the relay list that the directory published last.
    fn new_hub(&self, name: &str) -> Arc<GroupHub> {
        Arc::new(GroupHub::new(
            name,
            self.limits.watch_backlog,
            self.relays.members_sender(),
            self.relays.published(),
        ))
    }

    /// Every active node of every group, and the version of each group that
    /// the set reflects (see [`MemberEvent::Member`]).
    pub(crate) fn member_snapshot(&self) -> (Vec<String>, HashMap<Arc<str>, u64>) {
        let hubs = self.hubs_lock();
        let mut ids = Vec::new();
        let mut versions = HashMap::with_capacity(hubs.len());
        for hub in hubs.values() {
            let st = hub.lock();
            ids.extend(st.members.keys().cloned());
            versions.insert(hub.name.clone(), st.version);
        }
        ids.sort();
        (ids, versions)
    }

    /// Replaces the relay list of every group, each change with the group's
    /// next version. Called with the relay directory locked, so every group
    /// sees the lists in the same order.
    pub(crate) fn publish_relays(&self, relays: Arc<Vec<Relay>>) {
        let hubs = self.hubs_lock();
        self.relays.set_published(relays.clone());
        for hub in hubs.values() {
            let mut st = hub.lock();
            hub.publish(&mut st, Change::Relays(relays.clone()));
        }
    }

    fn hub(&self, group: &str) -> Result<Arc<GroupHub>> {
        self.hubs_lock()
            .get(group)
            .cloned()
            .ok_or_else(|| ControlError::not_found(format!("no group named {group:?}")))
    }

    pub(crate) fn check_skew(&self, timestamp_ms: u64) -> Result<()> {
        let now = self.now();
        let off = now.abs_diff(timestamp_ms);
        if off > self.limits.clock_skew_ms {
            return Err(ControlError::unauthenticated(format!(
                "signed timestamp is {:.1} s off the server's clock (allowed: {} s); check the node's clock",
                off as f64 / 1000.0,
                self.limits.clock_skew_ms / 1000
            )));
        }
        Ok(())
    }

    /// A session for `node_id`, or for a relay when given
    /// [`relays::session_subject`].
    pub(crate) fn new_session(&self, node_id: &str) -> Result<api::Session> {
        let credential = secrets::generate(secrets::SESSION_PREFIX);
        let expires_ms = self.now() + self.limits.session_ttl_ms;
        self.store.put_session(
            &secrets::digest(&credential),
            &SessionRecord {
                node_id: node_id.to_string(),
                expires_ms,
            },
        )?;
        Ok(api::Session {
            credential,
            expires_at_ms: expires_ms,
        })
    }

    // ------------------------------------------------------------ admin ops

    pub async fn create_group(&self, name: &str) -> Result<GroupInfo> {
        validate::dns_label("group name", name)?;
        let created_ms = self.now();
        {
            let mut hubs = self.hubs_lock();
            if hubs.contains_key(name) {
                return Err(ControlError::AlreadyExists(format!(
                    "group {name:?} already exists"
                )));
            }
            self.store.put_group(&GroupRecord {
                name: name.to_string(),
                created_ms,
            })?;
            let hub = self.new_hub(name);
            hubs.insert(name.to_string(), hub);
        }
        self.store.flush().await?;
        tracing::info!(group = name, "group created");
        Ok(GroupInfo {
            name: name.to_string(),
            created_ms,
            node_count: 0,
        })
    }

    pub fn list_groups(&self) -> Result<Vec<GroupInfo>> {
        let hubs = self.hubs_lock();
        Ok(self
            .store
            .groups()?
            .into_iter()
            .map(|g| GroupInfo {
                node_count: hubs
                    .get(&g.name)
                    .map_or(0, |h| h.lock().members.len() as u32),
                name: g.name,
                created_ms: g.created_ms,
            })
            .collect())
    }

    /// A join token for nodes of `group`.
    pub async fn create_token(
        &self,
        group: &str,
        ttl_secs: u64,
        max_uses: u32,
    ) -> Result<(String, TokenInfo)> {
        self.create_token_with(group, ttl_secs, max_uses, false)
            .await
    }

    /// A join token for nodes of `group`, or with `relay` a token for relay
    /// servers (which belong to no group: `group` must be empty).
    pub async fn create_token_with(
        &self,
        group: &str,
        ttl_secs: u64,
        max_uses: u32,
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
            self.hub(group)?;
        }
        if ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(ControlError::invalid(format!(
                "ttl of {ttl_secs} s is longer than the limit of {MAX_TOKEN_TTL_SECS} s"
            )));
        }
        let ttl_ms = if ttl_secs == 0 {
            self.limits.default_token_ttl_ms
        } else {
            ttl_secs * 1000
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
        self.store.put_token(&rec)?;
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

    /// Revokes a token (given as the secret or its id) and, unless
    /// `keep_nodes`, every active node that joined with it.
    pub async fn revoke_token(
        &self,
        token_or_id: &str,
        keep_nodes: bool,
    ) -> Result<(TokenInfo, Vec<String>)> {
        validate::bytes_limit("token", token_or_id.len(), validate::MAX_TOKEN_LEN)?;
        let token_id = if secrets::well_formed(token_or_id, secrets::JOIN_TOKEN_PREFIX) {
            secrets::token_id(token_or_id)
        } else if token_or_id.len() == 16 && token_or_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            token_or_id.to_ascii_lowercase()
        } else {
            return Err(ControlError::invalid(
                "expected a join token (pmj_…) or a 16-digit token id",
            ));
        };
        let mut rec = self
            .store
            .token(&token_id)?
            .ok_or_else(|| ControlError::not_found(format!("no token with id {token_id}")))?;
        if rec.relay {
            return self.revoke_relay_token(rec, keep_nodes).await;
        }
        let hub = self.hub(&rec.group)?;
        let mut revoked_nodes = Vec::new();
        {
            let mut st = hub.lock();
            rec.revoked = true;
            self.store.put_token(&rec)?;
            if !keep_nodes {
                for mut n in self.store.nodes()? {
                    if n.token_id == token_id
                        && n.group == rec.group
                        && n.state == NodeState::Active as i32
                    {
                        n.state = NodeState::Revoked as i32;
                        self.store.put_node(&n)?;
                        self.store.purge_sessions(Some(&n.node_id), self.now())?;
                        self.store.delete_links_of(&n.node_id)?;
                        hub.publish(
                            &mut st,
                            Change::Remove(n.node_id.clone(), RemovalReason::Revoked),
                        );
                        revoked_nodes.push(n.node_id);
                    }
                }
            }
        }
        self.store.flush().await?;
        tracing::info!(%token_id, nodes = revoked_nodes.len(), "join token revoked");
        Ok((token_info(&rec), revoked_nodes))
    }

    pub fn list_nodes(&self, group: &str) -> Result<Vec<NodeInfo>> {
        let hubs = self.hubs_lock();
        Ok(self
            .store
            .nodes()?
            .into_iter()
            .filter(|n| group.is_empty() || n.group == group)
            .map(|n| {
                let online = hubs
                    .get(&n.group)
                    .is_some_and(|h| h.lock().watchers.get(&n.node_id).is_some_and(|c| *c > 0));
                NodeInfo {
                    online,
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
                }
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
        let hub = self.hub(&rec.group)?;
        {
            let mut st = hub.lock();
            self.store.delete_node(node_id)?;
            self.store.put_tombstone(node_id, reason.describe())?;
            self.store.purge_sessions(Some(node_id), self.now())?;
            self.store.delete_links_of(node_id)?;
            st.names.remove(&rec.name);
            self.mesh_addrs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(node_id, &rec.mesh_ipv4);
            hub.publish(&mut st, Change::Remove(node_id.to_string(), reason));
        }
        self.store.flush().await?;
        tracing::info!(node = node_id, name = %rec.name, group = %rec.group, ?reason, "node deleted");
        Ok(())
    }

    pub fn link_table(&self, group: &str) -> Result<Vec<LinkEntry>> {
        let nodes: HashMap<String, NodeRecord> = self
            .store
            .nodes()?
            .into_iter()
            .map(|n| (n.node_id.clone(), n))
            .collect();
        let mut out = Vec::new();
        for (from, to, rec) in self.store.links()? {
            let Some(f) = nodes.get(&from) else { continue };
            if !group.is_empty() && f.group != group {
                continue;
            }
            let Some(link) = rec.link else { continue };
            out.push(LinkEntry {
                group: f.group.clone(),
                from_node: from,
                from_name: f.name.clone(),
                to_name: nodes.get(&to).map(|n| n.name.clone()).unwrap_or_default(),
                link: Some(link),
                reported_ms: rec.reported_ms,
            });
        }
        Ok(out)
    }

    // ------------------------------------------------------------- node ops

    pub async fn join(&self, req: &api::JoinRequest) -> Result<api::JoinResponse> {
        let (key, peer_id) =
            check_signed_token_request("join", &req.token, &req.public_key, &req.signature)?;
        let requested = if req.name.is_empty() {
            "node"
        } else {
            req.name.as_str()
        };
        validate::dns_label("name", requested)?;
        self.check_skew(req.timestamp_ms)?;
        let payload =
            signing::join_payload(&req.token, &req.public_key, &req.name, req.timestamp_ms);
        if !key.verify(&payload, &req.signature) {
            return Err(ControlError::unauthenticated(
                "join signature does not verify with the given public key",
            ));
        }

        let token_id = secrets::token_id(&req.token);
        let token = self
            .store
            .token(&token_id)?
            .ok_or_else(|| ControlError::unauthenticated("unknown join token"))?;
        if token.relay {
            return Err(ControlError::unauthenticated(
                "this is a relay token: relay servers register with it; nodes join with a group's token",
            ));
        }
        let hub = self.hub(&token.group)?;
        let node_id = peer_id.to_string();
        let now = self.now();

        let rec = {
            let mut st = hub.lock();
            // Re-read under the group lock: concurrent joins share the count.
            let mut token = self
                .store
                .token(&token_id)?
                .ok_or_else(|| ControlError::unauthenticated("unknown join token"))?;
            if token.revoked {
                return Err(ControlError::unauthenticated("join token was revoked"));
            }
            if token.expires_ms <= now {
                return Err(ControlError::unauthenticated(format!(
                    "join token expired {} ago",
                    humantime::format_duration(std::time::Duration::from_secs(
                        (now - token.expires_ms) / 1000
                    ))
                )));
            }
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
            if !repeat {
                if token.max_uses != 0 && token.uses >= token.max_uses {
                    return Err(ControlError::unauthenticated(format!(
                        "join token used up ({} of {} uses)",
                        token.uses, token.max_uses
                    )));
                }
                token.uses += 1;
                self.store.put_token(&token)?;
            }
            let name = match &existing {
                Some(n) if req.name.is_empty() || req.name == n.name => n.name.clone(),
                _ => unique_name(&st.names, requested, &node_id),
            };
            let mut rec = existing.unwrap_or_else(|| NodeRecord {
                node_id: node_id.clone(),
                public_key: req.public_key.clone(),
                group: token.group.clone(),
                joined_ms: now,
                ..Default::default()
            });
            if rec.name != name {
                st.names.remove(&rec.name);
                st.names.insert(name.clone(), node_id.clone());
                rec.name = name;
            }
            rec.state = NodeState::Active as i32;
            rec.token_id = token_id.clone();
            // A new token is an administrator's new decision.
            self.store.clear_tombstone(&node_id)?;
            rec.last_auth_ms = req.timestamp_ms;
            rec.last_seen_ms = now;
            self.assign_mesh_addrs(&mut rec);
            self.store.put_node(&rec)?;
            let online = st.watchers.get(&node_id).is_some_and(|c| *c > 0);
            hub.publish(&mut st, Change::Upsert(peer_of(&rec, online)));
            rec
        };
        let session = self.new_session(&node_id)?;
        self.store.flush().await?;
        tracing::info!(node = %node_id, name = %rec.name, group = %rec.group, "node joined");
        Ok(api::JoinResponse {
            node_id,
            group: rec.group,
            name: rec.name,
            session: Some(session),
            server_id: self.server_id.clone(),
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
        self.check_skew(req.timestamp_ms)?;
        let payload = signing::auth_payload(&self.server_id, &req.public_key, req.timestamp_ms);
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
        let hub = self.hub(&group)?;
        let rec = {
            let _st = hub.lock();
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
            self.store.put_node(&rec)?;
            rec
        };
        let session = self.new_session(&node_id)?;
        self.store.flush().await?;
        Ok(api::AuthenticateResponse {
            node_id,
            group: rec.group,
            name: rec.name,
            session: Some(session),
            server_id: self.server_id.clone(),
        })
    }

    /// Resolves a session credential to the node it belongs to.
    pub fn authorize(&self, credential: &str) -> Result<NodeCtx> {
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
        if relays::is_relay_subject(&session.node_id) {
            return Err(ControlError::PermissionDenied(
                "this is a relay's session; node calls need a session from Join or Authenticate"
                    .into(),
            ));
        }
        let node = self.store.node(&session.node_id)?.ok_or_else(|| {
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

    fn snapshot(&self, st: &GroupState, ctx: &NodeCtx) -> Result<NetworkMapUpdate> {
        let self_node = st
            .members
            .get(&ctx.node_id)
            .cloned()
            .ok_or_else(|| ControlError::PermissionDenied("node is not a member".into()))?;
        Ok(NetworkMapUpdate {
            version: st.version,
            kind: Some(api::network_map_update::Kind::Full(NetworkMap {
                group: ctx.group.clone(),
                self_node: Some(self_node),
                peers: st
                    .members
                    .values()
                    .filter(|p| p.node_id != ctx.node_id)
                    .cloned()
                    .collect(),
                stun: None,
                relays: st.relays.to_vec(),
            })),
        })
    }

    /// Opens a watch: the full map at the current version plus a receiver of
    /// every later change; marks the node online.
    pub fn watch(self: &Arc<Self>, ctx: &NodeCtx) -> Result<Subscription> {
        let hub = self.hub(&ctx.group)?;
        let mut st = hub.lock();
        // Checked before anything changes: the node may have been removed
        // since its session was authorized. (Failing later would drop the
        // guard below while `st` is held, and its drop takes this lock.)
        if !st.members.contains_key(&ctx.node_id) {
            return Err(ControlError::PermissionDenied(
                "node is not a member".into(),
            ));
        }
        let events = hub.tx.subscribe();
        let count = st.watchers.entry(ctx.node_id.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            if let Some(mut peer) = st.members.get(&ctx.node_id).cloned() {
                peer.online = true;
                peer.last_seen_ms = self.now();
                hub.publish(&mut st, Change::Upsert(peer));
            }
        }
        let guard = WatchGuard {
            registry: self.clone(),
            group: ctx.group.clone(),
            node_id: ctx.node_id.clone(),
        };
        let first = self.snapshot(&st, ctx)?;
        Ok(Subscription {
            version: first.version,
            first,
            events,
            guard,
        })
    }

    /// A fresh full map for a watcher that fell behind.
    pub fn resync(&self, ctx: &NodeCtx) -> Result<NetworkMapUpdate> {
        let hub = self.hub(&ctx.group)?;
        let st = hub.lock();
        self.snapshot(&st, ctx)
    }

    /// A member of the caller's group as peers see it (with `online`), or
    /// NOT_FOUND: members of other groups do not exist for the caller.
    pub fn member(&self, ctx: &NodeCtx, node_id: &str) -> Result<Peer> {
        let hub = self.hub(&ctx.group)?;
        let st = hub.lock();
        st.members
            .get(node_id)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no node {node_id:?} in this group")))
    }

    fn watch_closed(&self, group: &str, node_id: &str) {
        let Ok(hub) = self.hub(group) else { return };
        let mut st = hub.lock();
        let Some(count) = st.watchers.get_mut(node_id) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        st.watchers.remove(node_id);
        let now = self.now();
        if let Some(mut peer) = st.members.get(node_id).cloned() {
            peer.online = false;
            peer.last_seen_ms = now;
            hub.publish(&mut st, Change::Upsert(peer));
            // Best effort: last-seen is informational.
            if let Ok(Some(mut rec)) = self.store.node(node_id) {
                rec.last_seen_ms = now;
                if let Err(e) = self.store.put_node(&rec) {
                    tracing::warn!(node = node_id, error = %e, "could not store last-seen time");
                }
            }
        }
    }

    pub async fn update_endpoints(&self, ctx: &NodeCtx, addresses: &[String]) -> Result<()> {
        validate::addresses(addresses)?;
        let mut addrs = addresses.to_vec();
        addrs.sort();
        addrs.dedup();
        let hub = self.hub(&ctx.group)?;
        {
            let mut st = hub.lock();
            let mut rec = self
                .store
                .node(&ctx.node_id)?
                .filter(|n| n.state == NodeState::Active as i32)
                .ok_or_else(|| ControlError::PermissionDenied("node is not active".into()))?;
            if rec.addresses == addrs {
                return Ok(());
            }
            rec.addresses = addrs;
            self.store.put_node(&rec)?;
            let online = st.watchers.get(&ctx.node_id).is_some_and(|c| *c > 0);
            hub.publish(&mut st, Change::Upsert(peer_of(&rec, online)));
        }
        self.store.flush().await?;
        Ok(())
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
        let hub = self.hub(&ctx.group)?;
        {
            let _st = hub.lock();
            let mut rec = self
                .store
                .node(&ctx.node_id)?
                .filter(|n| n.state == NodeState::Active as i32)
                .ok_or_else(|| ControlError::PermissionDenied("node is not active".into()))?;
            tracing::info!(node = %ctx.node_id, mapping = %report.mapping, stride = report.port_stride, filtering = %report.filtering, udp = report.udp, "NAT behaviour reported");
            rec.nat = Some(report);
            self.store.put_node(&rec)?;
        }
        self.store.flush().await?;
        Ok(())
    }

    /// Replaces the caller's link reports. Reports about nodes that are not
    /// (or no longer) members are dropped: maps change under the reporter.
    pub fn report_links(&self, ctx: &NodeCtx, links: Vec<LinkReport>) -> Result<usize> {
        if links.len() > validate::MAX_LINKS {
            return Err(ControlError::invalid(format!(
                "{} link reports; the limit is {}",
                links.len(),
                validate::MAX_LINKS
            )));
        }
        for l in &links {
            validate::bytes_limit("peer_id", l.peer_id.len(), validate::MAX_TOKEN_LEN)?;
            validate::bytes_limit("via", l.via.len(), validate::MAX_TOKEN_LEN)?;
            match PathKind::try_from(l.path) {
                Ok(PathKind::Unspecified) | Err(_) => {
                    return Err(ControlError::invalid(format!(
                    "link to {}: path kind {} is not one of connecting, relay, direct, forwarded",
                    l.peer_id, l.path
                )))
                }
                Ok(_) => {}
            }
            if let Some(rtt) = l.rtt_ms {
                if !rtt.is_finite() || !(0.0..=3_600_000.0).contains(&rtt) {
                    return Err(ControlError::invalid(format!(
                        "link to {}: rtt_ms {rtt} is not a duration",
                        l.peer_id
                    )));
                }
            }
            if !l.loss.is_finite() || !(0.0..=1.0).contains(&l.loss) {
                return Err(ControlError::invalid(format!(
                    "link to {}: loss {} is not within 0..1",
                    l.peer_id, l.loss
                )));
            }
        }
        let hub = self.hub(&ctx.group)?;
        let st = hub.lock();
        let now = self.now();
        let kept: Vec<(String, LinkRecord)> = links
            .into_iter()
            .filter(|l| l.peer_id != ctx.node_id && st.members.contains_key(&l.peer_id))
            .map(|l| {
                (
                    l.peer_id.clone(),
                    LinkRecord {
                        link: Some(l),
                        reported_ms: now,
                    },
                )
            })
            .collect();
        self.store.replace_links(&ctx.node_id, &kept)?;
        Ok(kept.len())
    }

    pub async fn leave(&self, ctx: &NodeCtx) -> Result<()> {
        self.delete_node(&ctx.node_id, RemovalReason::Left).await
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

pub mod mesh_addr;

#[cfg(test)]
mod tests;
