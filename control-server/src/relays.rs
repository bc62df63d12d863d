//! The relay directory (seed 001): relay servers register with a relay token,
//! hold `WatchMembers` open to learn which nodes they serve, and report their
//! load; every group's network map lists the relays that are online.
//!
//! - Durable: one [`RelayRecord`] per registered relay (sled `relays` tree).
//! - In memory: which relays are online (hold at least one `WatchMembers`
//!   stream) and their last reported load.
//! - Relay sessions share the sessions tree with nodes; their subject is
//!   `relay:<relay id>` ([`crate::sessions::relay_subject`]).
//! - The online relay list reaches the maps through the change hub
//!   ([`Hub::publish_relays`]), so versions stay monotonic per group. Load
//!   changes are published only when significant ([`significant_change`])
//!   and at most once per [`LOAD_UPDATE_INTERVAL`] per relay.
//! - Membership changes come from the hub's member channel, each stamped
//!   with its group's version: a watcher skips what its snapshot already
//!   holds, so "snapshot, then every later change" is exact.
//!
//! Lock order: directory state → the hub's (see [`crate::hub`]). The
//! directory lock is held across every change of the relay list, so what the
//! directory holds online and what the maps show change together.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use peermesh_proto::api::{
    self, member_update, MemberSet, MemberUpdate, Relay, RelayInfo, TokenInfo,
};
use peermesh_proto::signing;
use peermesh_proto::store::v1::{RelayRecord, TokenRecord};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::error::{ControlError, Result};
use crate::hub::{Hub, MemberEvent};
use crate::sessions::{relay_of_subject, relay_subject, Sessions};
use crate::store::{Store, Txn};
use crate::tokens::{self, check_signed_token_request, token_info};
use crate::{secrets, validate};

/// Longest region label accepted.
pub const MAX_REGION: usize = 63;
/// At most one relay-list update per relay per this interval because of load
/// reports (coming online and going offline are never delayed). Every update
/// goes to every watcher of every group, and load only guides the nodes'
/// choice among relays: a second's staleness costs nothing, while a busy
/// relay's reports could otherwise flood every map.
pub const LOAD_UPDATE_INTERVAL: Duration = Duration::from_secs(1);

const DROPPED: &str =
    "this relay was dropped from the directory: its relay token was revoked by an administrator";

/// Whether a load report differs enough from the one the maps show to be worth
/// an update: a change of at least a fifth in reservations or circuits.
pub fn significant_change(shown: (u32, u32), reported: (u32, u32)) -> bool {
    let differs = |a: u32, b: u32| {
        let d = u64::from(a.abs_diff(b));
        d > 0 && d * 5 >= u64::from(a.max(b))
    };
    differs(shown.0, reported.0) || differs(shown.1, reported.1)
}

/// An authenticated relay, as resolved from a session credential.
#[derive(Clone, Debug)]
pub struct RelayCtx {
    pub relay_id: String,
}

struct Online {
    /// Tells this stay online apart from a later one of the same relay.
    epoch: u64,
    watchers: usize,
    addresses: Vec<String>,
    region: String,
    /// (reservations, circuits) as the maps show them.
    shown_load: (u32, u32),
    last_publish: Instant,
    /// A delayed load update is scheduled.
    deferred: bool,
}

#[derive(Default)]
struct DirState {
    online: BTreeMap<String, Online>,
    /// Last reported (reservations, circuits) of every relay.
    load: HashMap<String, (u32, u32)>,
    next_epoch: u64,
}

pub struct RelayDirectory {
    store: Store,
    sessions: Sessions,
    /// Where the online relay list and dropped relays are published, and
    /// membership changes come from.
    hub: Arc<Hub>,
    state: Mutex<DirState>,
}

impl RelayDirectory {
    pub fn new(sessions: Sessions, hub: Arc<Hub>) -> Arc<Self> {
        Arc::new(Self {
            store: sessions.store().clone(),
            sessions,
            hub,
            state: Mutex::new(DirState::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, DirState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> u64 {
        self.sessions.now()
    }
}

/// What a relay's `WatchMembers` starts from.
pub struct MemberSubscription {
    pub first: MemberUpdate,
    pub cursor: MemberCursor,
    pub events: broadcast::Receiver<MemberEvent>,
    pub guard: RelayGuard,
}

/// Turns directory events into one relay's member updates.
pub struct MemberCursor {
    relay_id: String,
    /// Per group, the version that the last full set reflected.
    seen: HashMap<Arc<str>, u64>,
}

/// What to do with one directory event.
#[derive(Debug)]
pub enum MemberStep {
    /// Already in the set the relay has, or about another relay.
    Skip,
    Send(MemberUpdate),
    /// The relay itself was dropped: end the stream with this error.
    End(ControlError),
}

impl MemberCursor {
    pub fn step(&mut self, event: &MemberEvent) -> MemberStep {
        match event {
            MemberEvent::Member {
                group,
                version,
                node_id,
                added,
            } => {
                let seen = self.seen.entry(group.clone()).or_insert(0);
                if *version <= *seen {
                    return MemberStep::Skip;
                }
                *seen = *version;
                let kind = if *added {
                    member_update::Kind::Added(node_id.to_string())
                } else {
                    member_update::Kind::Removed(node_id.to_string())
                };
                MemberStep::Send(MemberUpdate { kind: Some(kind) })
            }
            MemberEvent::RelayDropped { relay_id } if **relay_id == *self.relay_id => {
                MemberStep::End(ControlError::PermissionDenied(DROPPED.into()))
            }
            MemberEvent::RelayDropped { .. } => MemberStep::Skip,
        }
    }

    /// After a fresh full set (a lagged stream).
    pub fn reset(&mut self, seen: HashMap<Arc<str>, u64>) {
        self.seen = seen;
    }
}

/// Takes the relay offline when its last `WatchMembers` stream ends.
pub struct RelayGuard {
    directory: Arc<RelayDirectory>,
    relay_id: String,
    epoch: u64,
}

impl Drop for RelayGuard {
    fn drop(&mut self) {
        self.directory
            .relay_watch_closed(&self.relay_id, self.epoch);
    }
}

fn full_set(node_ids: Vec<String>) -> MemberUpdate {
    MemberUpdate {
        kind: Some(member_update::Kind::Full(MemberSet { node_ids })),
    }
}

fn check_region(region: &str) -> Result<()> {
    validate::bytes_limit("region", region.len(), MAX_REGION)?;
    if region.chars().any(char::is_control) {
        return Err(ControlError::invalid(format!(
            "region {region:?} contains control characters"
        )));
    }
    Ok(())
}

fn check_relay_addresses(addresses: &[String]) -> Result<Vec<String>> {
    validate::addresses(addresses)?;
    if addresses.is_empty() {
        return Err(ControlError::invalid(
            "a relay needs at least one address (e.g. /ip4/192.0.2.1/udp/4001/quic-v1)",
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(addresses.len());
    for a in addresses {
        let ma: multiaddr::Multiaddr = a.parse().expect("validated above");
        if ma.iter().any(|p| matches!(p, multiaddr::Protocol::P2p(_))) {
            return Err(ControlError::invalid(format!(
                "relay address {a:?} carries a /p2p/ part; give it without (nodes add the relay id)"
            )));
        }
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    Ok(out)
}

fn check_relay_token(token: &TokenRecord, now: u64) -> Result<()> {
    if !token.relay {
        return Err(ControlError::unauthenticated(format!(
            "this is a node join token (group {:?}); relays register with a relay token (create-token --relay)",
            token.group
        )));
    }
    tokens::check_live(token, "relay", now)
}

impl RelayDirectory {
    /// Registers (or re-registers) a relay and opens a relay session.
    pub async fn register_relay(
        &self,
        req: &api::RegisterRelayRequest,
    ) -> Result<api::RegisterRelayResponse> {
        let (key, peer_id) =
            check_signed_token_request("relay", &req.token, &req.public_key, &req.signature)?;
        let addresses = check_relay_addresses(&req.addresses)?;
        check_region(&req.region)?;
        self.sessions.check_skew(req.timestamp_ms)?;
        let payload = signing::relay_payload(
            &req.token,
            &req.public_key,
            &req.addresses,
            &req.region,
            req.timestamp_ms,
        );
        if !key.verify(&payload, &req.signature) {
            return Err(ControlError::unauthenticated(
                "relay registration signature does not verify with the given public key",
            ));
        }

        let token_id = secrets::token_id(&req.token);
        let relay_id = peer_id.to_string();
        let now = self.now();
        let session;
        {
            let mut dir = self.lock();
            let mut token = tokens::load(&self.store, &token_id, "relay")?;
            check_relay_token(&token, now)?;
            let existing = self.store.relay(&relay_id)?;
            if existing
                .as_ref()
                .is_some_and(|r| req.timestamp_ms <= r.last_auth_ms)
            {
                return Err(ControlError::unauthenticated(
                    "stale signed timestamp (a replayed request?)",
                ));
            }
            // Registering again with the same token (a restart, a retry whose
            // answer was lost) does not use the token up.
            let repeat = existing.as_ref().is_some_and(|r| r.token_id == token_id);
            let mut txn = Txn::new();
            if !repeat {
                tokens::take_use(&mut txn, &mut token, "relay")?;
            }
            let mut rec = existing.unwrap_or_else(|| RelayRecord {
                relay_id: relay_id.clone(),
                public_key: req.public_key.clone(),
                registered_ms: now,
                ..Default::default()
            });
            rec.addresses = addresses;
            rec.region = req.region.clone();
            rec.token_id = token_id;
            rec.last_auth_ms = req.timestamp_ms;
            txn.put_relay(&rec);
            session = self.sessions.create(&mut txn, &relay_subject(&relay_id))?;
            self.store.commit(txn)?;
            // An online relay's new addresses reach the maps at once.
            if let Some(o) = dir.online.get_mut(&relay_id) {
                o.addresses = rec.addresses.clone();
                o.region = rec.region.clone();
                self.publish_relay_list(&dir);
            }
        }
        self.store.flush().await?;
        tracing::info!(relay = %relay_id, addresses = ?req.addresses, region = %req.region, "relay registered");
        Ok(api::RegisterRelayResponse {
            relay_id,
            session: Some(session),
            server_id: self.sessions.server_id().to_string(),
            // The API adds the server key.
            server_identity: None,
        })
    }

    /// Resolves a session credential to the relay it belongs to.
    pub fn authorize_relay(&self, credential: &str) -> Result<RelayCtx> {
        let subject = self.sessions.subject(credential)?;
        let relay_id = relay_of_subject(&subject).ok_or_else(|| {
            ControlError::PermissionDenied(
                "this is a node's session; relay calls need a session from RegisterRelay".into(),
            )
        })?;
        if self.store.relay(relay_id)?.is_none() {
            return Err(ControlError::PermissionDenied(DROPPED.into()));
        }
        Ok(RelayCtx {
            relay_id: relay_id.to_string(),
        })
    }

    /// Opens a member watch: every active node now, then the changes; the
    /// relay is online (listed in every map) while it holds one.
    pub fn watch_members(self: &Arc<Self>, ctx: &RelayCtx) -> Result<MemberSubscription> {
        let mut dir = self.lock();
        let rec = self
            .store
            .relay(&ctx.relay_id)?
            .ok_or_else(|| ControlError::PermissionDenied(DROPPED.into()))?;
        // Subscribed before the snapshot: every change after it is received.
        let events = self.hub.subscribe_members();
        let (node_ids, seen) = self.hub.member_snapshot();
        let st = &mut *dir;
        let epoch = match st.online.get_mut(&ctx.relay_id) {
            Some(o) => {
                o.watchers += 1;
                o.epoch
            }
            None => {
                let epoch = st.next_epoch;
                st.next_epoch += 1;
                st.online.insert(
                    ctx.relay_id.clone(),
                    Online {
                        epoch,
                        watchers: 1,
                        addresses: rec.addresses,
                        region: rec.region,
                        shown_load: st.load.get(&ctx.relay_id).copied().unwrap_or_default(),
                        last_publish: Instant::now(),
                        deferred: false,
                    },
                );
                self.publish_relay_list(st);
                tracing::info!(relay = %ctx.relay_id, "relay online");
                epoch
            }
        };
        Ok(MemberSubscription {
            first: full_set(node_ids),
            cursor: MemberCursor {
                relay_id: ctx.relay_id.clone(),
                seen,
            },
            events,
            guard: RelayGuard {
                directory: self.clone(),
                relay_id: ctx.relay_id.clone(),
                epoch,
            },
        })
    }

    /// A fresh full member set for a watcher that fell behind, and the
    /// versions it reflects.
    pub fn member_resync(&self, ctx: &RelayCtx) -> Result<(MemberUpdate, HashMap<Arc<str>, u64>)> {
        if self.store.relay(&ctx.relay_id)?.is_none() {
            return Err(ControlError::PermissionDenied(DROPPED.into()));
        }
        let (node_ids, seen) = self.hub.member_snapshot();
        Ok((full_set(node_ids), seen))
    }

    fn relay_watch_closed(&self, relay_id: &str, epoch: u64) {
        let mut dir = self.lock();
        let Some(o) = dir.online.get_mut(relay_id) else {
            return;
        };
        if o.epoch != epoch {
            return;
        }
        o.watchers -= 1;
        if o.watchers > 0 {
            return;
        }
        dir.online.remove(relay_id);
        self.publish_relay_list(&dir);
        tracing::info!(relay = relay_id, "relay offline");
    }

    /// Publishes the online relays to every group if the list changed; call
    /// with the directory locked (`dir`).
    fn publish_relay_list(&self, dir: &DirState) {
        let list: Vec<Relay> = dir
            .online
            .iter()
            .map(|(id, o)| Relay {
                relay_id: id.clone(),
                addresses: o.addresses.clone(),
                region: o.region.clone(),
                reservations: o.shown_load.0,
                circuits: o.shown_load.1,
            })
            .collect();
        self.hub.publish_relays(list);
    }

    /// Records a relay's load; the maps follow significant changes, at most
    /// once per [`LOAD_UPDATE_INTERVAL`] per relay (a change held back is
    /// published when the interval is over). Needs a tokio runtime.
    pub fn report_relay_load(
        self: &Arc<Self>,
        ctx: &RelayCtx,
        load: &api::RelayLoad,
    ) -> Result<()> {
        let delay = {
            let mut dir = self.lock();
            let mut rec = self
                .store
                .relay(&ctx.relay_id)?
                .ok_or_else(|| ControlError::PermissionDenied(DROPPED.into()))?;
            if rec.bytes_relayed != load.bytes_relayed {
                // Informational: not flushed.
                rec.bytes_relayed = load.bytes_relayed;
                self.store.write(|t| t.put_relay(&rec))?;
            }
            dir.load
                .insert(ctx.relay_id.clone(), (load.reservations, load.circuits));
            self.refresh_load(&mut dir, &ctx.relay_id)
        };
        if let Some(delay) = delay {
            self.load_timer(ctx.relay_id.clone(), delay);
        }
        Ok(())
    }

    /// Shows the relay's reported load in the maps if it differs enough;
    /// returns how long to wait when the last update was too recent.
    fn refresh_load(&self, dir: &mut DirState, relay_id: &str) -> Option<Duration> {
        let reported = dir.load.get(relay_id).copied().unwrap_or_default();
        let o = dir.online.get_mut(relay_id)?;
        if !significant_change(o.shown_load, reported) {
            return None;
        }
        let since = o.last_publish.elapsed();
        if since < LOAD_UPDATE_INTERVAL {
            if o.deferred {
                return None;
            }
            o.deferred = true;
            return Some(LOAD_UPDATE_INTERVAL - since);
        }
        o.shown_load = reported;
        o.last_publish = Instant::now();
        self.publish_relay_list(dir);
        None
    }

    fn load_timer(self: &Arc<Self>, relay_id: String, delay: Duration) {
        // Weak: a pending timer does not keep a closed directory alive.
        let directory: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(directory) = directory.upgrade() else {
                return;
            };
            let again = {
                let mut dir = directory.lock();
                if let Some(o) = dir.online.get_mut(&relay_id) {
                    o.deferred = false;
                }
                directory.refresh_load(&mut dir, &relay_id)
            };
            if let Some(delay) = again {
                directory.load_timer(relay_id, delay);
            }
        });
    }

    /// Every registered relay, online or not.
    pub fn list_relays(&self) -> Result<Vec<RelayInfo>> {
        let dir = self.lock();
        Ok(self
            .store
            .relays()?
            .into_iter()
            .map(|r| {
                let (reservations, circuits) =
                    dir.load.get(&r.relay_id).copied().unwrap_or_default();
                RelayInfo {
                    online: dir.online.contains_key(&r.relay_id),
                    registered_ms: r.registered_ms,
                    bytes_relayed: r.bytes_relayed,
                    relay: Some(Relay {
                        relay_id: r.relay_id,
                        addresses: r.addresses,
                        region: r.region,
                        reservations,
                        circuits,
                    }),
                }
            })
            .collect())
    }

    /// Revokes a relay token and, unless `keep_relays`, drops the relays
    /// registered with it: out of the directory and the maps, sessions gone,
    /// member streams ended with PERMISSION_DENIED.
    pub async fn revoke_relay_token(
        &self,
        rec: TokenRecord,
        keep_relays: bool,
    ) -> Result<(TokenInfo, Vec<String>)> {
        let mut dropped = Vec::new();
        let rec = {
            let mut dir = self.lock();
            // Re-read under the lock: registrations count uses under it.
            let mut rec = self.store.token(&rec.token_id)?.unwrap_or(rec);
            rec.revoked = true;
            let mut txn = Txn::new();
            txn.put_token(&rec);
            let mut gone = Vec::new();
            if !keep_relays {
                for r in self.store.relays()? {
                    if r.token_id == rec.token_id {
                        txn.delete_relay(&r.relay_id);
                        self.store
                            .end_session(&mut txn, &relay_subject(&r.relay_id))?;
                        gone.push(r.relay_id);
                    }
                }
            }
            self.store.commit(txn)?;
            if !keep_relays {
                for relay_id in gone {
                    dir.online.remove(&relay_id);
                    dir.load.remove(&relay_id);
                    self.hub.relay_dropped(&relay_id);
                    dropped.push(relay_id);
                }
                self.publish_relay_list(&dir);
            }
            rec
        };
        self.store.flush().await?;
        tracing::info!(token_id = %rec.token_id, relays = dropped.len(), "relay token revoked");
        Ok((token_info(&rec), dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_significance() {
        assert!(!significant_change((0, 0), (0, 0)));
        assert!(significant_change((0, 0), (1, 0)));
        assert!(significant_change((0, 4), (0, 5)));
        assert!(!significant_change((10, 0), (11, 0)));
        assert!(significant_change((10, 0), (8, 0)));
        assert!(!significant_change((100, 100), (110, 95)));
        assert!(significant_change((100, 100), (100, 125)));
        assert!(significant_change((u32::MAX, 0), (0, 0)));
    }

    #[test]
    fn relay_addresses_and_regions() {
        assert!(check_relay_addresses(&["/ip4/192.0.2.1/udp/4001/quic-v1".into()]).is_ok());
        assert!(check_relay_addresses(&[]).is_err());
        assert!(check_relay_addresses(&["192.0.2.1:4001".into()]).is_err());
        let id = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let with_p2p = format!("/ip4/192.0.2.1/udp/4001/quic-v1/p2p/{id}");
        assert!(check_relay_addresses(&[with_p2p]).is_err());
        assert_eq!(
            check_relay_addresses(&["/ip4/192.0.2.1/tcp/1".into(), "/ip4/192.0.2.1/tcp/1".into()])
                .unwrap()
                .len(),
            1
        );
        assert!(check_region("").is_ok());
        assert!(check_region("eu-west").is_ok());
        assert!(check_region(&"r".repeat(64)).is_err());
        assert!(check_region("a\nb").is_err());
    }

    #[test]
    fn cursor_skips_what_the_snapshot_holds() {
        let lab: Arc<str> = "lab".into();
        let mut cursor = MemberCursor {
            relay_id: "r1".into(),
            seen: HashMap::from([(lab.clone(), 5)]),
        };
        let member = |group: &Arc<str>, version, added| MemberEvent::Member {
            group: group.clone(),
            version,
            node_id: "n".into(),
            added,
        };
        assert!(matches!(
            cursor.step(&member(&lab, 4, true)),
            MemberStep::Skip
        ));
        assert!(matches!(
            cursor.step(&member(&lab, 5, false)),
            MemberStep::Skip
        ));
        match cursor.step(&member(&lab, 6, false)) {
            MemberStep::Send(MemberUpdate {
                kind: Some(member_update::Kind::Removed(n)),
            }) => assert_eq!(n, "n"),
            other => panic!("expected a removal, got {other:?}"),
        }
        // A group created after the snapshot starts from zero.
        match cursor.step(&member(&"new".into(), 1, true)) {
            MemberStep::Send(MemberUpdate {
                kind: Some(member_update::Kind::Added(n)),
            }) => assert_eq!(n, "n"),
            other => panic!("expected an addition, got {other:?}"),
        }
        let dropped = |id: &str| MemberEvent::RelayDropped {
            relay_id: id.into(),
        };
        assert!(matches!(cursor.step(&dropped("r2")), MemberStep::Skip));
        assert!(matches!(
            cursor.step(&dropped("r1")),
            MemberStep::End(ControlError::PermissionDenied(_))
        ));
    }
}
