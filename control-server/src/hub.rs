//! The change hub: the one place where a change of a group becomes a new
//! network-map version and reaches the group's watchers.
//!
//! Per group it keeps the version counter, the active members as peers see
//! them, which members are online (hold a watch stream), and the relay list;
//! every change bumps the version and is broadcast as a [`GroupEvent`].
//! Across groups it carries the stream of membership changes that relays
//! watch ([`MemberEvent`]), each stamped with its group's version, and the
//! list of online relays that every group's map shows.
//!
//! Who publishes into it:
//! - the registry: members joining, changing, leaving,
//!   being removed or revoked; watch streams opening and closing;
//! - the relay directory: the online relay list
//!   ([`Hub::publish_relays`]) and dropped relays ([`Hub::relay_dropped`]).
//!
//! The hub knows neither: it holds no durable state and never calls out.
//! Durable truth stays in sled, written by the publishers while they hold
//! the group's lock ([`GroupHub::lock`]), which is what makes "snapshot at
//! version V, then every delta above V" exact for a watcher.
//!
//! # Lock order
//!
//! Outermost first; a lock is only ever taken while holding the ones above
//! it, never the other way round:
//!
//! 1. the relay directory's state (held across every change of the relay
//!    list, so the directory's view and what it published stay in step);
//! 2. the hub table ([`Hub`]: groups and the published relay list; held
//!    across a relay-list change, so every group sees the lists in the same
//!    order);
//! 3. one group ([`LockedGroup`]; the registry holds it across the sled
//!    writes of the change it publishes);
//! 4. the registry's leaf locks (node names, mesh addresses), taken under a
//!    group's and holding nothing else.
//!
//! Broadcast sends never block, so publishing under these locks is safe.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use peermesh_proto::api::{self, NetworkMap, NetworkMapUpdate, Peer, Relay, SignedMapUpdate};
use rand::RngCore;
use tokio::sync::broadcast;

use crate::error::{ControlError, Result};

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

/// A change's update as signed once for every watcher of the group (the
/// first watcher to send it signs it).
pub type SignedOnce = Arc<OnceLock<SignedMapUpdate>>;

/// One change of a group's map, at the version it created.
#[derive(Clone, Debug)]
pub enum GroupEvent {
    Upsert {
        version: u64,
        peer: Arc<Peer>,
        signed: SignedOnce,
    },
    Removed {
        version: u64,
        node_id: Arc<str>,
        reason: RemovalReason,
        signed: SignedOnce,
    },
    /// Several members' presence changed (coalesced, see
    /// [`PRESENCE_COALESCE`]): each peer as it is now.
    Presence {
        version: u64,
        peers: Arc<Vec<Peer>>,
        signed: SignedOnce,
    },
    /// The list of online relays was replaced.
    Relays {
        version: u64,
        relays: Arc<Vec<Relay>>,
        signed: SignedOnce,
    },
}

impl GroupEvent {
    pub fn version(&self) -> u64 {
        match self {
            Self::Upsert { version, .. }
            | Self::Removed { version, .. }
            | Self::Presence { version, .. }
            | Self::Relays { version, .. } => *version,
        }
    }

    /// The signed form of this change, shared by every watcher.
    pub fn signed(&self) -> &SignedOnce {
        match self {
            Self::Upsert { signed, .. }
            | Self::Removed { signed, .. }
            | Self::Presence { signed, .. }
            | Self::Relays { signed, .. } => signed,
        }
    }

    pub fn to_update(&self) -> NetworkMapUpdate {
        let (version, kind) = match self {
            Self::Upsert { version, peer, .. } => (
                *version,
                api::network_map_update::Kind::PeerUpsert((**peer).clone()),
            ),
            Self::Removed {
                version, node_id, ..
            } => (
                *version,
                api::network_map_update::Kind::PeerRemoved(node_id.to_string()),
            ),
            Self::Presence { version, peers, .. } => (
                *version,
                api::network_map_update::Kind::Peers(api::PeerBatch {
                    peers: (**peers).clone(),
                }),
            ),
            Self::Relays {
                version, relays, ..
            } => (
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

/// What the membership channel (all groups) carries to the relays.
#[derive(Clone, Debug)]
pub enum MemberEvent {
    /// A node became an active member of `group` (`added`) or stopped being
    /// one, at the group's `version`.
    Member {
        group: Arc<str>,
        version: u64,
        node_id: Arc<str>,
        added: bool,
    },
    /// The relay was dropped from the directory; its streams end.
    RelayDropped { relay_id: Arc<str> },
}

/// Every group's fan-out, and the relay list they all carry.
pub struct Hub {
    /// Events a watcher may fall behind (see [`crate::limits::Limits`]).
    backlog: usize,
    table: Mutex<Table>,
    /// Membership changes of every group, and dropped relays.
    members_tx: broadcast::Sender<MemberEvent>,
}

struct Table {
    groups: HashMap<String, Arc<GroupHub>>,
    /// The online relays as last published; every group holds this list.
    relays: Arc<Vec<Relay>>,
}

impl Hub {
    pub fn new(backlog: usize) -> Arc<Self> {
        Arc::new(Self {
            backlog,
            table: Mutex::new(Table {
                groups: HashMap::new(),
                relays: Arc::new(Vec::new()),
            }),
            members_tx: broadcast::channel(backlog).0,
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves consistent data (every
        // mutation is a single insert or assignment), so poisoning is not
        // fatal.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds group `name`, starting from the relay list published last.
    /// `persist` runs first, under the table lock, so that a group exists
    /// in the hub exactly when it was stored; its error is returned and the
    /// group not added.
    pub fn add_group(&self, name: &str, persist: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut table = self.table();
        if table.groups.contains_key(name) {
            return Err(ControlError::AlreadyExists(format!(
                "group {name:?} already exists"
            )));
        }
        persist()?;
        let mut epoch = [0u8; EPOCH_BYTES];
        rand::thread_rng().fill_bytes(&mut epoch);
        let group = Arc::new_cyclic(|me| GroupHub {
            me: me.clone(),
            name: name.into(),
            epoch,
            state: Mutex::new(GroupState {
                version: 0,
                members: BTreeMap::new(),
                watchers: HashMap::new(),
                relays: table.relays.clone(),
                presence: BTreeSet::new(),
                presence_flush: false,
                parts: None,
            }),
            tx: broadcast::channel(self.backlog).0,
            members_tx: self.members_tx.clone(),
        });
        table.groups.insert(name.to_string(), group);
        Ok(())
    }

    /// The fan-out of group `name`, or NOT_FOUND.
    pub fn group(&self, name: &str) -> Result<Arc<GroupHub>> {
        self.table()
            .groups
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::not_found(format!("no group named {name:?}")))
    }

    /// Active members of group `name` (0 for no such group).
    pub fn member_count(&self, name: &str) -> usize {
        self.table()
            .groups
            .get(name)
            .map_or(0, |g| g.lock().member_count())
    }

    /// Whether `node_id` of group `group` holds a watch stream.
    pub fn is_online(&self, group: &str, node_id: &str) -> bool {
        self.table()
            .groups
            .get(group)
            .is_some_and(|g| g.lock().is_online(node_id))
    }

    /// Every active node of every group, and the version of each group that
    /// the set reflects (see [`MemberEvent::Member`]).
    pub fn member_snapshot(&self) -> (Vec<String>, HashMap<Arc<str>, u64>) {
        let table = self.table();
        let mut ids = Vec::new();
        let mut versions = HashMap::with_capacity(table.groups.len());
        for group in table.groups.values() {
            let g = group.lock();
            ids.extend(g.st.members.keys().cloned());
            versions.insert(group.name.clone(), g.st.version);
        }
        ids.sort();
        (ids, versions)
    }

    /// A receiver of every later membership change and dropped relay.
    pub fn subscribe_members(&self) -> broadcast::Receiver<MemberEvent> {
        self.members_tx.subscribe()
    }

    /// Tells the streams of relay `relay_id` that it was dropped.
    pub fn relay_dropped(&self, relay_id: &str) {
        // No receivers is fine: the relay is not watching.
        let _ = self.members_tx.send(MemberEvent::RelayDropped {
            relay_id: relay_id.into(),
        });
    }

    /// Replaces the relay list of every group if `relays` differs from the
    /// list published last, each change with the group's next version;
    /// returns whether it did.
    pub fn publish_relays(&self, relays: Vec<Relay>) -> bool {
        let mut table = self.table();
        if *table.relays == relays {
            return false;
        }
        let relays = Arc::new(relays);
        table.relays = relays.clone();
        for group in table.groups.values() {
            group.lock().publish(Change::Relays(relays.clone()));
        }
        true
    }
}

struct GroupState {
    version: u64,
    /// Active members, as peers see them.
    members: BTreeMap<String, Peer>,
    /// Open watch streams per node; a node is online while it has one.
    watchers: HashMap<String, usize>,
    /// The online relays, as the directory last published them.
    relays: Arc<Vec<Relay>>,
    /// Members whose presence changed since the last [`GroupEvent::Presence`]
    /// (already applied to `members`; published together later).
    presence: BTreeSet<String>,
    /// Whether a task will publish `presence`.
    presence_flush: bool,
    /// The members encoded in parts at some version, for every watcher
    /// that starts (or resyncs) at that version.
    parts: Option<Arc<MapParts>>,
}

/// Members per part of a full map: about 13 KiB, so a watch stream's
/// buffers stay small whatever the group's size.
pub const PEERS_PER_PART: usize = 64;

/// Every member of a group at one version, as the `part` updates of a full
/// map (see `NetworkMap.parts`), encoded once for all watchers.
#[derive(Debug)]
pub struct MapParts {
    pub version: u64,
    /// Each an encoded `NetworkMapUpdate` whose kind is `part`.
    pub parts: Vec<bytes::Bytes>,
    /// `signing::map_parts_digest` of `parts`.
    pub digest: Vec<u8>,
}

impl MapParts {
    /// The parts decoded (for tests and the few who want a map in one
    /// piece).
    pub fn decode(&self) -> Vec<api::PeerBatch> {
        use prost::Message;
        self.parts
            .iter()
            .filter_map(|b| match NetworkMapUpdate::decode(b.as_ref()).ok()?.kind {
                Some(api::network_map_update::Kind::Part(p)) => Some(p),
                _ => None,
            })
            .collect()
    }
}

/// How long presence changes (a member's watch stream opening or closing)
/// gather before they go out as one change: after a server restart every
/// node reconnects at once, and N single notices to each of N watchers is
/// N² messages; gathered, each watcher gets about one message per interval
/// whatever N is. Short against the reconnect itself (a TLS handshake and
/// an authentication), and presence is informational: links do not wait
/// for it.
pub const PRESENCE_COALESCE: std::time::Duration = std::time::Duration::from_millis(100);

/// Bytes of a group's feed epoch: random, so that two runs of the server
/// never share one (a node takes deltas only of its full map's epoch).
pub const EPOCH_BYTES: usize = 16;

/// One group's fan-out.
pub struct GroupHub {
    /// Itself, for the task that publishes coalesced presence.
    me: Weak<GroupHub>,
    name: Arc<str>,
    /// This run of the group's change feed; deltas are signed over it.
    epoch: [u8; EPOCH_BYTES],
    state: Mutex<GroupState>,
    tx: broadcast::Sender<GroupEvent>,
    /// The hub's channel of membership changes (all groups).
    members_tx: broadcast::Sender<MemberEvent>,
}

impl GroupHub {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn epoch(&self) -> &[u8] {
        &self.epoch
    }

    /// Locks the group: every read and change of it goes through the guard,
    /// and a publisher keeps it across the sled writes of its change.
    pub fn lock(&self) -> LockedGroup<'_> {
        LockedGroup {
            hub: self,
            // As for the table: poisoning leaves consistent data.
            st: self.state.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

enum Change {
    Upsert(Peer),
    /// Members whose presence changed; already in `members`.
    Presence(Vec<Peer>),
    Remove(String, RemovalReason),
    Relays(Arc<Vec<Relay>>),
}

/// A group, locked.
pub struct LockedGroup<'a> {
    hub: &'a GroupHub,
    st: MutexGuard<'a, GroupState>,
}

impl LockedGroup<'_> {
    pub fn version(&self) -> u64 {
        self.st.version
    }

    /// An active member as peers see it.
    pub fn member(&self, node_id: &str) -> Option<&Peer> {
        self.st.members.get(node_id)
    }

    pub fn is_member(&self, node_id: &str) -> bool {
        self.st.members.contains_key(node_id)
    }

    pub fn member_count(&self) -> usize {
        self.st.members.len()
    }

    /// Whether the node holds a watch stream.
    pub fn is_online(&self, node_id: &str) -> bool {
        self.st.watchers.get(node_id).is_some_and(|c| *c > 0)
    }

    /// Puts back a member read from disk when the server starts: no new
    /// version, nobody told.
    pub fn restore(&mut self, peer: Peer) {
        self.st.members.insert(peer.node_id.clone(), peer);
    }

    /// Adds or replaces a member.
    pub fn upsert(&mut self, peer: Peer) {
        self.publish(Change::Upsert(peer));
    }

    /// Removes a member; its own watch streams end with `reason`.
    pub fn remove(&mut self, node_id: &str, reason: RemovalReason) {
        self.publish(Change::Remove(node_id.to_string(), reason));
    }

    /// The full map as member `node_id` sees it, at the current version.
    pub fn snapshot(&self, node_id: &str) -> Result<NetworkMapUpdate> {
        let self_node = self
            .st
            .members
            .get(node_id)
            .cloned()
            .ok_or_else(|| ControlError::PermissionDenied("node is not a member".into()))?;
        Ok(NetworkMapUpdate {
            version: self.st.version,
            kind: Some(api::network_map_update::Kind::Full(NetworkMap {
                group: self.hub.name.to_string(),
                self_node: Some(self_node),
                peers: self
                    .st
                    .members
                    .values()
                    .filter(|p| p.node_id != node_id)
                    .cloned()
                    .collect(),
                stun: None,
                relays: self.st.relays.to_vec(),
                epoch: self.hub.epoch.to_vec(),
                server_identity: None,
                parts: 0,
                parts_digest: Vec::new(),
            })),
        })
    }

    /// The members at the current version in parts, encoded once per
    /// version.
    pub fn parts(&mut self) -> Arc<MapParts> {
        use prost::Message;
        let version = self.st.version;
        if let Some(p) = self.st.parts.as_ref().filter(|p| p.version == version) {
            return p.clone();
        }
        let members: Vec<&Peer> = self.st.members.values().collect();
        let parts: Vec<bytes::Bytes> = members
            .chunks(PEERS_PER_PART)
            .map(|chunk| {
                NetworkMapUpdate {
                    version,
                    kind: Some(api::network_map_update::Kind::Part(api::PeerBatch {
                        peers: chunk.iter().map(|p| (*p).clone()).collect(),
                    })),
                }
                .encode_to_vec()
                .into()
            })
            .collect();
        let digest = peermesh_proto::signing::map_parts_digest(parts.iter().map(|b| b.as_ref()));
        let p = Arc::new(MapParts {
            version,
            parts,
            digest,
        });
        self.st.parts = Some(p.clone());
        p
    }

    /// The full map as member `node_id` sees it at the current version, in
    /// parts: the head (this node, relays, the parts' count and digest)
    /// and the shared parts.
    pub fn snapshot_in_parts(
        &mut self,
        node_id: &str,
    ) -> Result<(NetworkMapUpdate, Arc<MapParts>)> {
        let parts = self.parts();
        let self_node = self
            .st
            .members
            .get(node_id)
            .cloned()
            .ok_or_else(|| ControlError::PermissionDenied("node is not a member".into()))?;
        let head = NetworkMapUpdate {
            version: self.st.version,
            kind: Some(api::network_map_update::Kind::Full(NetworkMap {
                group: self.hub.name.to_string(),
                self_node: Some(self_node),
                peers: Vec::new(),
                stun: None,
                relays: self.st.relays.to_vec(),
                epoch: self.hub.epoch.to_vec(),
                server_identity: None,
                parts: parts.parts.len() as u32,
                parts_digest: parts.digest.clone(),
            })),
        };
        Ok((head, parts))
    }

    /// Opens a watch stream of member `node_id`: the full map at the current
    /// version (in parts) and a receiver of every later change. The node is online from
    /// its first stream (seen at `now`) until [`Self::unwatch`] closes its
    /// last.
    #[allow(clippy::type_complexity)]
    pub fn watch(
        &mut self,
        node_id: &str,
        now: u64,
    ) -> Result<(
        NetworkMapUpdate,
        Arc<MapParts>,
        broadcast::Receiver<GroupEvent>,
    )> {
        // Checked before anything changes: the node may have been removed
        // since its session was authorized.
        if !self.is_member(node_id) {
            return Err(ControlError::PermissionDenied(
                "node is not a member".into(),
            ));
        }
        let events = self.hub.tx.subscribe();
        let count = self.st.watchers.entry(node_id.to_string()).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.presence_changed(node_id, true, now);
        }
        let (head, parts) = self.snapshot_in_parts(node_id)?;
        Ok((head, parts, events))
    }

    /// Closes one watch stream of `node_id`. True when it was the node's
    /// last and the node, still a member, went offline (last seen `now`).
    pub fn unwatch(&mut self, node_id: &str, now: u64) -> bool {
        let Some(count) = self.st.watchers.get_mut(node_id) else {
            return false;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        self.st.watchers.remove(node_id);
        self.presence_changed(node_id, false, now)
    }

    /// A member went online or offline: applied at once (snapshots show
    /// it), published with the other presence changes of the next
    /// [`PRESENCE_COALESCE`]. False when `node_id` is no member.
    fn presence_changed(&mut self, node_id: &str, online: bool, now: u64) -> bool {
        let Some(peer) = self.st.members.get_mut(node_id) else {
            return false;
        };
        peer.online = online;
        peer.last_seen_ms = now;
        // The parts of the current version may now show this member's
        // presence as it was: the change reaches every watcher that starts
        // from them with the next presence change (a higher version), so
        // they stay, and are built once per version, not once per watcher.
        self.st.presence.insert(node_id.to_string());
        if !self.st.presence_flush {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    self.st.presence_flush = true;
                    let group = self.hub.me.clone();
                    rt.spawn(async move {
                        tokio::time::sleep(PRESENCE_COALESCE).await;
                        if let Some(group) = group.upgrade() {
                            group.lock().flush_presence();
                        }
                    });
                }
                // No runtime to wait on (never in the server): publish now.
                Err(_) => self.flush_presence(),
            }
        }
        true
    }

    /// Publishes the gathered presence changes as one change.
    fn flush_presence(&mut self) {
        self.st.presence_flush = false;
        let ids = std::mem::take(&mut self.st.presence);
        let peers: Vec<Peer> = ids
            .iter()
            .filter_map(|id| self.st.members.get(id).cloned())
            .collect();
        if !peers.is_empty() {
            self.publish(Change::Presence(peers));
        }
    }

    /// Applies a change as the group's next version and tells the watchers
    /// (and, for a membership change, the relays).
    fn publish(&mut self, change: Change) {
        let st = &mut *self.st;
        st.version += 1;
        let version = st.version;
        let mut member_change = None;
        let event = match change {
            Change::Upsert(peer) => {
                // This change carries the member's presence too.
                st.presence.remove(&peer.node_id);
                let old = st.members.insert(peer.node_id.clone(), peer.clone());
                if old.is_none() {
                    member_change = Some((peer.node_id.as_str().into(), true));
                }
                GroupEvent::Upsert {
                    version,
                    peer: Arc::new(peer),
                    signed: SignedOnce::default(),
                }
            }
            Change::Remove(node_id, reason) => {
                st.presence.remove(&node_id);
                let node_id: Arc<str> = node_id.into();
                if st.members.remove(&*node_id).is_some() {
                    member_change = Some((node_id.clone(), false));
                }
                GroupEvent::Removed {
                    version,
                    node_id,
                    reason,
                    signed: SignedOnce::default(),
                }
            }
            Change::Presence(peers) => GroupEvent::Presence {
                version,
                peers: Arc::new(peers),
                signed: SignedOnce::default(),
            },
            Change::Relays(relays) => {
                st.relays = relays.clone();
                GroupEvent::Relays {
                    version,
                    relays,
                    signed: SignedOnce::default(),
                }
            }
        };
        // No receivers is fine: nobody is watching.
        let _ = self.hub.tx.send(event);
        if let Some((node_id, added)) = member_change {
            let _ = self.hub.members_tx.send(MemberEvent::Member {
                group: self.hub.name.clone(),
                version,
                node_id,
                added,
            });
        }
    }
}
