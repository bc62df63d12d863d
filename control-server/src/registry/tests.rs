//! Unit tests of [`Registry`] with an injected clock: nothing here sleeps.

use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use libp2p_identity::Keypair;
use peermesh_proto::api::network_map_update::Kind;
use peermesh_proto::api::{
    self, LinkReport, NetworkMap, NetworkMapUpdate, NodeInfo, NodeState, PathKind, TokenInfo,
};
use peermesh_proto::signing;
use tokio::sync::broadcast::{self, error::TryRecvError};

use super::groups::MAX_TOKEN_TTL_SECS;
use super::*;
use crate::error::{ControlError, Result};
use crate::hub::{GroupEvent, Hub, RemovalReason, PRESENCE_COALESCE};
use crate::limits::Limits;
use crate::sessions::{Clock, Sessions};
use crate::store::Store;
use crate::{secrets, validate};

/// An arbitrary fixed start time (2023-11-14), far from zero so that
/// "now minus skew" cannot underflow.
const T0: u64 = 1_700_000_000_000;

struct Fixture {
    dir: tempfile::TempDir,
    time: Arc<AtomicU64>,
    limits: Limits,
    reg: Arc<Registry>,
}

impl Fixture {
    fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let time = Arc::new(AtomicU64::new(T0));
        let reg = open_registry(&dir, &time, &limits);
        Self {
            dir,
            time,
            limits,
            reg,
        }
    }

    /// Drops the registry (and with it the database) and opens it again on
    /// the same directory.
    fn reopen(self) -> Self {
        let Self {
            dir,
            time,
            limits,
            reg,
        } = self;
        assert_eq!(
            Arc::strong_count(&reg),
            1,
            "a watch guard still holds the registry"
        );
        drop(reg);
        let reg = open_registry(&dir, &time, &limits);
        Self {
            dir,
            time,
            limits,
            reg,
        }
    }

    fn now(&self) -> u64 {
        self.time.load(Ordering::SeqCst)
    }

    fn advance(&self, ms: u64) {
        self.time.fetch_add(ms, Ordering::SeqCst);
    }

    /// A fresh timestamp for a signed request: strictly later than any
    /// handed out before, so replay protection never trips by accident.
    fn ts(&self) -> u64 {
        self.advance(1);
        self.now()
    }

    async fn group(&self, name: &str) {
        self.reg.create_group(name).await.expect("create group");
    }

    async fn token(&self, group: &str, ttl_secs: u64, max_uses: u32) -> (String, TokenInfo) {
        self.reg
            .create_token(group, ttl_secs, max_uses)
            .await
            .expect("create token")
    }

    async fn join(&self, kp: &Keypair, token: &str, name: &str) -> Result<api::JoinResponse> {
        self.reg.join(&join_req(kp, token, name, self.ts())).await
    }

    async fn join_ok(&self, kp: &Keypair, token: &str, name: &str) -> Joined {
        let r = self.join(kp, token, name).await.expect("join");
        let ctx = self
            .reg
            .authorize(&r.session.as_ref().expect("a session").credential)
            .expect("fresh session authorizes");
        Joined {
            credential: r.session.expect("a session").credential,
            node_id: r.node_id,
            name: r.name,
            ctx,
        }
    }

    async fn authenticate(&self, kp: &Keypair, ts: u64) -> Result<api::AuthenticateResponse> {
        self.reg
            .authenticate(&auth_req(kp, self.reg.server_id(), ts))
            .await
    }

    fn node(&self, node_id: &str) -> NodeInfo {
        self.reg
            .list_nodes("")
            .expect("list nodes")
            .into_iter()
            .find(|n| n.node_id == node_id)
            .unwrap_or_else(|| panic!("node {node_id} is not listed"))
    }

    fn token_info(&self, token_id: &str) -> TokenInfo {
        self.reg
            .list_tokens("")
            .expect("list tokens")
            .into_iter()
            .find(|t| t.token_id == token_id)
            .expect("token is listed")
    }
}

struct Joined {
    credential: String,
    node_id: String,
    name: String,
    ctx: NodeCtx,
}

fn open_registry(dir: &tempfile::TempDir, time: &Arc<AtomicU64>, limits: &Limits) -> Arc<Registry> {
    // Sled's background threads may hold the previous handle's file lock
    // for a moment after it is dropped.
    let mut tries = 0;
    let store = loop {
        match Store::open(&dir.path().join("db")) {
            Ok(s) => break s,
            Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open store: {e}"),
        }
    };
    let t = time.clone();
    let clock: Clock = Arc::new(move || t.load(Ordering::SeqCst));
    let sessions = Sessions::open(store, clock, limits).expect("open sessions");
    let hub = Hub::new(limits.watch_backlog);
    Registry::open(sessions, hub, limits).expect("open registry")
}

fn join_req(kp: &Keypair, token: &str, name: &str, ts: u64) -> api::JoinRequest {
    let pk = kp.public().encode_protobuf();
    let signature = kp
        .sign(&signing::join_payload(token, &pk, name, ts))
        .expect("ed25519 signs");
    api::JoinRequest {
        token: token.to_string(),
        public_key: pk,
        name: name.to_string(),
        timestamp_ms: ts,
        signature,
    }
}

fn auth_req(kp: &Keypair, server_id: &str, ts: u64) -> api::AuthenticateRequest {
    let pk = kp.public().encode_protobuf();
    let signature = kp
        .sign(&signing::auth_payload(server_id, &pk, ts))
        .expect("ed25519 signs");
    api::AuthenticateRequest {
        public_key: pk,
        timestamp_ms: ts,
        signature,
    }
}

fn peer_id(kp: &Keypair) -> String {
    kp.public().to_peer_id().to_string()
}

#[track_caller]
fn assert_unauthenticated<T: std::fmt::Debug>(r: Result<T>, needle: &str) {
    match r {
        Err(ControlError::Unauthenticated(msg)) => assert!(
            msg.contains(needle),
            "message {msg:?} does not mention {needle:?}"
        ),
        other => panic!("expected Unauthenticated({needle:?}…), got {other:?}"),
    }
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(r: Result<T>, needle: &str) {
    match r {
        Err(ControlError::InvalidArgument(msg)) => assert!(
            msg.contains(needle),
            "message {msg:?} does not mention {needle:?}"
        ),
        other => panic!("expected InvalidArgument({needle:?}…), got {other:?}"),
    }
}

#[track_caller]
fn assert_permission_denied<T: std::fmt::Debug>(r: Result<T>, needle: &str) {
    match r {
        Err(ControlError::PermissionDenied(msg)) => assert!(
            msg.contains(needle),
            "message {msg:?} does not mention {needle:?}"
        ),
        other => panic!("expected PermissionDenied({needle:?}…), got {other:?}"),
    }
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(r: Result<T>, needle: &str) {
    match r {
        Err(ControlError::NotFound(msg)) => assert!(
            msg.contains(needle),
            "message {msg:?} does not mention {needle:?}"
        ),
        other => panic!("expected NotFound({needle:?}…), got {other:?}"),
    }
}

/// The next event above `*version` (older ones are what the snapshot already
/// contains, exactly as the api layer skips them); advances `*version`.
fn next_event(events: &mut broadcast::Receiver<GroupEvent>, version: &mut u64) -> GroupEvent {
    loop {
        let ev = events.try_recv().expect("an event is pending");
        if ev.version() > *version {
            *version = ev.version();
            return ev;
        }
    }
}

/// The next coalesced presence change, once [`PRESENCE_COALESCE`] has
/// passed.
async fn next_presence(
    events: &mut broadcast::Receiver<GroupEvent>,
    version: &mut u64,
) -> Vec<peermesh_proto::api::Peer> {
    tokio::time::sleep(PRESENCE_COALESCE * 2).await;
    match next_event(events, version) {
        GroupEvent::Presence { peers, .. } => (*peers).clone(),
        other => panic!("expected a presence change, got {other:?}"),
    }
}

fn assert_no_event(events: &mut broadcast::Receiver<GroupEvent>, version: u64) {
    loop {
        match events.try_recv() {
            Ok(ev) if ev.version() <= version => continue,
            Ok(ev) => panic!("unexpected event {ev:?}"),
            Err(TryRecvError::Empty) => return,
            Err(e) => panic!("unexpected receive error {e:?}"),
        }
    }
}

fn full_map(update: &NetworkMapUpdate) -> &NetworkMap {
    match &update.kind {
        Some(Kind::Full(map)) => map,
        other => panic!("expected a full map, got {other:?}"),
    }
}

fn link(peer: &str, path: PathKind) -> LinkReport {
    LinkReport {
        peer_id: peer.to_string(),
        path: path as i32,
        rtt_ms: Some(12.5),
        loss: 0.0,
        via: String::new(),
        bytes_in: 10,
        bytes_out: 20,
    }
}

// ------------------------------------------------------------------ join

#[tokio::test]
async fn join_happy_path() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, info) = f.token("lab", 0, 0).await;
    assert!(token.starts_with("pmj_"));
    assert_eq!(info.expires_ms, f.now() + f.limits.default_token_ttl_ms);

    let kp = Keypair::generate_ed25519();
    let ts = f.ts();
    let r = f
        .reg
        .join(&join_req(&kp, &token, "laptop", ts))
        .await
        .expect("join");
    assert_eq!(r.node_id, peer_id(&kp));
    assert_eq!(r.group, "lab");
    assert_eq!(r.name, "laptop");
    assert_eq!(r.server_id, f.reg.server_id());
    let session = r.session.expect("a session");
    assert!(session.credential.starts_with("pms_"));
    assert_eq!(session.expires_at_ms, f.now() + f.limits.session_ttl_ms);

    let ctx = f.reg.authorize(&session.credential).expect("authorize");
    assert_eq!(ctx.node_id, r.node_id);
    assert_eq!(ctx.group, "lab");

    let n = f.node(&r.node_id);
    assert_eq!(n.name, "laptop");
    assert_eq!(n.group, "lab");
    assert_eq!(n.state, NodeState::Active as i32);
    assert_eq!(n.token_id, info.token_id);
    assert_eq!(n.joined_ms, ts);
    assert!(!n.online);
    assert_eq!(f.token_info(&info.token_id).uses, 1);
    assert_eq!(f.reg.list_groups().unwrap()[0].node_count, 1);

    // Sessions expire.
    f.advance(f.limits.session_ttl_ms);
    assert_unauthenticated(f.reg.authorize(&session.credential), "expired");
}

#[tokio::test]
async fn join_with_an_empty_name_gets_a_default_one() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let j = f.join_ok(&Keypair::generate_ed25519(), &token, "").await;
    assert_eq!(j.name, "node");
}

#[tokio::test]
async fn join_with_unknown_token() {
    let f = Fixture::new();
    f.group("lab").await;
    let never_issued = secrets::generate(secrets::JOIN_TOKEN_PREFIX);
    let kp = Keypair::generate_ed25519();
    assert_unauthenticated(f.join(&kp, &never_issued, "a").await, "unknown join token");
    assert!(f.reg.list_nodes("").unwrap().is_empty());
}

#[tokio::test]
async fn join_with_malformed_token() {
    let f = Fixture::new();
    f.group("lab").await;
    let kp = Keypair::generate_ed25519();
    for bad in ["", "pmj_", "pmj_xyz", "pms_0123", "hello world"] {
        assert_invalid(f.join(&kp, bad, "a").await, "malformed join token");
    }
    assert_invalid(
        f.join(&kp, &"p".repeat(1000), "a").await,
        "token is 1000 bytes",
    );
}

#[tokio::test]
async fn join_with_revoked_token() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, info) = f.token("lab", 0, 0).await;
    f.reg.revoke_token(&token, false).await.expect("revoke");
    let kp = Keypair::generate_ed25519();
    assert_unauthenticated(f.join(&kp, &token, "a").await, "revoked");
    assert_eq!(f.token_info(&info.token_id).uses, 0);
    assert!(f.reg.list_nodes("").unwrap().is_empty());
}

#[tokio::test]
async fn join_with_expired_token() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, info) = f.token("lab", 60, 0).await;
    assert_eq!(info.expires_ms, f.now() + 60_000);
    // Just before expiry it still works.
    f.advance(60_000 - 2);
    f.join_ok(&Keypair::generate_ed25519(), &token, "early")
        .await;
    f.advance(61_000);
    let kp = Keypair::generate_ed25519();
    assert_unauthenticated(f.join(&kp, &token, "late").await, "join token expired 1m");
    assert_eq!(f.token_info(&info.token_id).uses, 1);
    assert_eq!(f.reg.list_nodes("").unwrap().len(), 1);
}

#[tokio::test]
async fn join_with_used_up_token() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, info) = f.token("lab", 0, 2).await;
    f.join_ok(&Keypair::generate_ed25519(), &token, "a").await;
    f.join_ok(&Keypair::generate_ed25519(), &token, "b").await;
    let kp = Keypair::generate_ed25519();
    assert_unauthenticated(f.join(&kp, &token, "c").await, "used up (2 of 2 uses)");
    assert_eq!(f.token_info(&info.token_id).uses, 2);
    assert_eq!(f.reg.list_nodes("").unwrap().len(), 2);
}

#[tokio::test]
async fn retried_join_does_not_use_up_a_single_use_token() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, info) = f.token("lab", 0, 1).await;
    let kp = Keypair::generate_ed25519();
    let first = f.join_ok(&kp, &token, "box").await;
    // The answer was lost; the node signs again and retries.
    let again = f.join_ok(&kp, &token, "box").await;
    assert_eq!(again.node_id, first.node_id);
    assert_eq!(again.name, "box");
    assert_eq!(f.token_info(&info.token_id).uses, 1);
    // The retry's session replaced the first: sessions rotate, they do not
    // pile up.
    assert_unauthenticated(
        f.reg.authorize(&first.credential),
        "unknown or expired session",
    );
    f.reg.authorize(&again.credential).expect("second session");
    // The single use is still taken, though.
    let other = Keypair::generate_ed25519();
    assert_unauthenticated(f.join(&other, &token, "other").await, "used up");
    assert_eq!(f.reg.list_nodes("").unwrap().len(), 1);
}

#[tokio::test]
async fn join_with_bad_signature() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, info) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();

    let mut req = join_req(&kp, &token, "a", f.ts());
    req.signature[0] ^= 1;
    assert_unauthenticated(f.reg.join(&req).await, "does not verify");

    let mut req = join_req(&kp, &token, "a", f.ts());
    req.signature.clear();
    assert_unauthenticated(f.reg.join(&req).await, "does not verify");

    let mut req = join_req(&kp, &token, "a", f.ts());
    req.signature = vec![7; 1000];
    assert_invalid(f.reg.join(&req).await, "signature is 1000 bytes");

    // A valid signature over different fields.
    let mut req = join_req(&kp, &token, "a", f.ts());
    req.name = "b".into();
    assert_unauthenticated(f.reg.join(&req).await, "does not verify");
    let mut req = join_req(&kp, &token, "a", f.ts());
    req.timestamp_ms += 1;
    assert_unauthenticated(f.reg.join(&req).await, "does not verify");

    assert_eq!(f.token_info(&info.token_id).uses, 0);
    assert!(f.reg.list_nodes("").unwrap().is_empty());
}

#[tokio::test]
async fn join_signed_by_another_key() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let victim = Keypair::generate_ed25519();
    let attacker = Keypair::generate_ed25519();
    let ts = f.ts();
    let pk = victim.public().encode_protobuf();
    let req = api::JoinRequest {
        token: token.clone(),
        public_key: pk.clone(),
        name: "a".into(),
        timestamp_ms: ts,
        signature: attacker
            .sign(&signing::join_payload(&token, &pk, "a", ts))
            .unwrap(),
    };
    assert_unauthenticated(f.reg.join(&req).await, "does not verify");
    assert!(f.reg.list_nodes("").unwrap().is_empty());
}

#[tokio::test]
async fn join_with_bad_public_key() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    let mut req = join_req(&kp, &token, "a", f.ts());
    req.public_key = (0u8..32).map(|i| i.wrapping_mul(97) ^ 0x5a).collect();
    assert_invalid(f.reg.join(&req).await, "public_key is not a libp2p");
    req.public_key = vec![1; 500];
    assert_invalid(f.reg.join(&req).await, "public_key is 500 bytes");
    req.public_key.clear();
    assert_invalid(f.reg.join(&req).await, "public_key");
}

#[tokio::test]
async fn join_with_bad_names() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    assert_invalid(
        f.join(&kp, &token, &"a".repeat(300)).await,
        "name is 300 bytes",
    );
    for bad in ["Laptop", "my laptop", "a.b", "-a", "a-", "ü", "a/b"] {
        assert_invalid(f.join(&kp, &token, bad).await, "not a DNS label");
    }
    assert!(f.reg.list_nodes("").unwrap().is_empty());
}

#[tokio::test]
async fn join_timestamp_outside_skew() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    let skew = f.limits.clock_skew_ms;
    for ts in [f.now() - skew - 1, f.now() + skew + 1, 0] {
        assert_unauthenticated(
            f.reg.join(&join_req(&kp, &token, "a", ts)).await,
            "off the server's clock",
        );
    }
    // The edges of the window are fine.
    f.reg
        .join(&join_req(&kp, &token, "a", f.now() - skew))
        .await
        .expect("oldest allowed timestamp");
    f.reg
        .join(&join_req(&kp, &token, "a", f.now() + skew))
        .await
        .expect("newest allowed timestamp");
}

#[tokio::test]
async fn join_replayed_timestamp() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    let req = join_req(&kp, &token, "a", f.ts());
    f.reg.join(&req).await.expect("first");
    assert_unauthenticated(f.reg.join(&req).await, "stale signed timestamp");
}

#[tokio::test]
async fn join_key_of_another_group() {
    let f = Fixture::new();
    f.group("lab").await;
    f.group("prod").await;
    let (lab, _) = f.token("lab", 0, 0).await;
    let (prod, prod_info) = f.token("prod", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    f.join_ok(&kp, &lab, "a").await;
    match f.join(&kp, &prod, "a").await {
        Err(ControlError::FailedPrecondition(msg)) => assert!(msg.contains("\"lab\""), "{msg}"),
        other => panic!("expected FailedPrecondition, got {other:?}"),
    }
    assert_eq!(f.token_info(&prod_info.token_id).uses, 0);
    assert_eq!(f.node(&peer_id(&kp)).group, "lab");
}

// ---------------------------------------------------------- authenticate

#[tokio::test]
async fn authenticate_happy_path_and_replays() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    let join_ts = f.ts();
    let joined = f
        .reg
        .join(&join_req(&kp, &token, "a", join_ts))
        .await
        .expect("join");

    // The join's timestamp is used up too.
    assert_unauthenticated(f.authenticate(&kp, join_ts).await, "stale signed timestamp");

    let ts = f.ts();
    let r = f.authenticate(&kp, ts).await.expect("authenticate");
    assert_eq!(r.node_id, joined.node_id);
    assert_eq!(r.group, "lab");
    assert_eq!(r.name, "a");
    assert_eq!(r.server_id, f.reg.server_id());
    let ctx = f
        .reg
        .authorize(&r.session.expect("session").credential)
        .expect("authorize");
    assert_eq!(ctx.node_id, joined.node_id);

    // Same timestamp again, or an older one: replays.
    assert_unauthenticated(f.authenticate(&kp, ts).await, "stale signed timestamp");
    assert_unauthenticated(f.authenticate(&kp, ts - 1).await, "stale signed timestamp");
    f.authenticate(&kp, ts + 1).await.expect("newer timestamp");
}

#[tokio::test]
async fn authenticate_bad_requests() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    f.join_ok(&kp, &token, "a").await;

    // Unknown key.
    let stranger = Keypair::generate_ed25519();
    assert_unauthenticated(f.authenticate(&stranger, f.ts()).await, "not registered");

    // Signed for another server.
    let req = auth_req(&kp, "srv_somewhere_else", f.ts());
    assert_unauthenticated(f.reg.authenticate(&req).await, "does not verify");

    // Signed by another key.
    let mut req = auth_req(&stranger, f.reg.server_id(), f.ts());
    req.public_key = kp.public().encode_protobuf();
    assert_unauthenticated(f.reg.authenticate(&req).await, "does not verify");

    // A join signature is not an authentication signature.
    let jr = join_req(&kp, &token, "a", f.ts());
    let req = api::AuthenticateRequest {
        public_key: jr.public_key,
        timestamp_ms: jr.timestamp_ms,
        signature: jr.signature,
    };
    assert_unauthenticated(f.reg.authenticate(&req).await, "does not verify");

    // Outside the skew allowance.
    let skew = f.limits.clock_skew_ms;
    assert_unauthenticated(
        f.authenticate(&kp, f.now() + skew + 1).await,
        "off the server's clock",
    );
    assert_unauthenticated(
        f.authenticate(&kp, f.now() - skew - 1).await,
        "off the server's clock",
    );

    // Garbage key.
    let mut req = auth_req(&kp, f.reg.server_id(), f.ts());
    req.public_key = vec![0xff; 40];
    assert_invalid(f.reg.authenticate(&req).await, "public_key");

    // None of that disturbed the node.
    f.authenticate(&kp, f.ts()).await.expect("still fine");
}

#[tokio::test]
async fn authenticate_revoked_node_is_permission_denied() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    f.join_ok(&kp, &token, "a").await;
    f.reg.revoke_token(&token, false).await.expect("revoke");
    assert_permission_denied(f.authenticate(&kp, f.ts()).await, "revoked");
}

#[tokio::test]
async fn authenticate_removed_node_is_told_why() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    let a = f.join_ok(&kp, &token, "a").await;
    f.reg.remove_node("a", "").await.expect("remove");
    assert_unauthenticated(f.reg.authorize(&a.credential), "unknown or expired session");
    assert_permission_denied(
        f.authenticate(&kp, f.ts()).await,
        "removed by an administrator",
    );
    // Not with the token it first joined with: that admission is over.
    assert_permission_denied(
        f.join(&kp, &token, "a").await,
        "removed after it joined with this token",
    );
    // A new token (an administrator's new decision) lets it back in.
    let (fresh, _) = f.token("lab", 0, 0).await;
    let again = f.join_ok(&kp, &fresh, "a").await;
    f.authenticate(&kp, f.ts()).await.expect("back again");

    f.reg.leave(&again.ctx).await.expect("leave");
    assert_permission_denied(f.authenticate(&kp, f.ts()).await, "left its group");
}

#[tokio::test]
async fn authorize_rejects_garbage() {
    let f = Fixture::new();
    for bad in ["", "pms_", "garbage", "Bearer x", "pmj_00"] {
        assert_unauthenticated(f.reg.authorize(bad), "malformed session credential");
    }
    let unknown = secrets::generate(secrets::SESSION_PREFIX);
    assert_unauthenticated(f.reg.authorize(&unknown), "unknown or expired session");
}

// ---------------------------------------------------------------- names

#[tokio::test]
async fn names_are_unique_within_a_group() {
    let f = Fixture::new();
    f.group("lab").await;
    f.group("prod").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let (prod, _) = f.token("prod", 0, 0).await;
    let (a, b, c) = (
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
    );
    assert_eq!(f.join_ok(&a, &token, "node").await.name, "node");
    assert_eq!(f.join_ok(&b, &token, "node").await.name, "node-2");
    // Empty means "node".
    assert_eq!(f.join_ok(&c, &token, "").await.name, "node-3");
    // A rejoin keeps the name the node has.
    assert_eq!(f.join_ok(&a, &token, "node").await.name, "node");
    assert_eq!(f.join_ok(&b, &token, "").await.name, "node-2");
    // Renaming frees the old name.
    assert_eq!(f.join_ok(&a, &token, "alpha").await.name, "alpha");
    let d = Keypair::generate_ed25519();
    assert_eq!(f.join_ok(&d, &token, "node").await.name, "node");
    // Another group has its own names.
    let e = Keypair::generate_ed25519();
    assert_eq!(f.join_ok(&e, &prod, "node").await.name, "node");
    // A removed node's name is free again.
    f.reg.remove_node(&peer_id(&b), "").await.expect("remove");
    let g = Keypair::generate_ed25519();
    assert_eq!(f.join_ok(&g, &token, "node").await.name, "node-2");
    // The longest label still gets a suffix that fits.
    let long = "x".repeat(validate::MAX_NAME);
    let h1 = f.join_ok(&Keypair::generate_ed25519(), &token, &long).await;
    let h2 = f.join_ok(&Keypair::generate_ed25519(), &token, &long).await;
    assert_eq!(h1.name, long);
    assert_ne!(h2.name, long);
    validate::dns_label("name", &h2.name).expect("suffixed name is a label");

    let mut names: Vec<String> = f
        .reg
        .list_nodes("lab")
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count, "duplicate names: {names:?}");
}

// ------------------------------------------------------------ revocation

#[tokio::test]
async fn revoke_token_revokes_its_nodes() {
    let f = Fixture::new();
    f.group("lab").await;
    let (t1, i1) = f.token("lab", 0, 0).await;
    let (t2, _) = f.token("lab", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &t1, "a").await;
    let b = f.join_ok(&Keypair::generate_ed25519(), &t1, "b").await;
    let c = f.join_ok(&Keypair::generate_ed25519(), &t2, "c").await;

    let watch = f.reg.watch(&c.ctx).expect("watch");
    let mut version = watch.version;
    let mut events = watch.events;

    let (info, mut revoked) = f.reg.revoke_token(&t1, false).await.expect("revoke");
    assert!(info.revoked);
    assert_eq!(info.token_id, i1.token_id);
    revoked.sort();
    let mut expected = vec![a.node_id.clone(), b.node_id.clone()];
    expected.sort();
    assert_eq!(revoked, expected);

    for j in [&a, &b] {
        assert_eq!(f.node(&j.node_id).state, NodeState::Revoked as i32);
        assert!(f.reg.authorize(&j.credential).is_err());
    }
    assert_eq!(f.node(&c.node_id).state, NodeState::Active as i32);
    f.reg.authorize(&c.credential).expect("other token's node");
    assert!(f.token_info(&i1.token_id).revoked);
    assert_eq!(f.reg.list_groups().unwrap()[0].node_count, 1);

    // The watcher saw both go.
    let mut gone = Vec::new();
    for _ in 0..2 {
        match next_event(&mut events, &mut version) {
            GroupEvent::Removed {
                node_id, reason, ..
            } => {
                assert_eq!(reason, RemovalReason::Revoked);
                gone.push(node_id.to_string());
            }
            other => panic!("expected a removal, got {other:?}"),
        }
    }
    gone.sort();
    assert_eq!(gone, expected);
    // The map no longer has them.
    let map = f.reg.resync(&c.ctx).expect("resync");
    assert!(full_map(&map).peers.is_empty());
    drop(watch.guard);

    // Revoked names stay taken.
    let d = f.join_ok(&Keypair::generate_ed25519(), &t2, "a").await;
    assert_eq!(d.name, "a-2");
}

#[tokio::test]
async fn revoke_token_keep_nodes_and_by_id() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, info) = f.token("lab", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &token, "a").await;

    // By id, upper case works too.
    let (revoked_info, revoked) = f
        .reg
        .revoke_token(&info.token_id.to_ascii_uppercase(), true)
        .await
        .expect("revoke");
    assert!(revoked_info.revoked);
    assert!(revoked.is_empty());
    f.reg.authorize(&a.credential).expect("kept node");
    assert_eq!(f.node(&a.node_id).state, NodeState::Active as i32);
    let kp = Keypair::generate_ed25519();
    assert_unauthenticated(f.join(&kp, &token, "b").await, "revoked");
    // Revoking again is harmless.
    f.reg.revoke_token(&token, true).await.expect("again");
}

#[tokio::test]
async fn revoke_token_bad_input() {
    let f = Fixture::new();
    f.group("lab").await;
    f.token("lab", 0, 0).await;
    for bad in [
        "",
        "garbage",
        "pmj_zz",
        "0123456789abcdeg",
        "0123456789abcde",
    ] {
        assert_invalid(
            f.reg.revoke_token(bad, false).await,
            "expected a join token",
        );
    }
    assert_invalid(
        f.reg.revoke_token(&"a".repeat(200), false).await,
        "token is 200 bytes",
    );
    assert_not_found(
        f.reg.revoke_token("0123456789abcdef", false).await,
        "no token with id 0123456789abcdef",
    );
    let never_issued = secrets::generate(secrets::JOIN_TOKEN_PREFIX);
    assert_not_found(f.reg.revoke_token(&never_issued, false).await, "no token");
    assert!(f.reg.list_tokens("").unwrap().iter().all(|t| !t.revoked));
}

// --------------------------------------------------------------- removal

#[tokio::test]
async fn remove_node_by_name_and_by_id() {
    let f = Fixture::new();
    f.group("lab").await;
    f.group("prod").await;
    let (lab, _) = f.token("lab", 0, 0).await;
    let (prod, _) = f.token("prod", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &lab, "a").await;
    let b = f.join_ok(&Keypair::generate_ed25519(), &lab, "b").await;
    let pa = f.join_ok(&Keypair::generate_ed25519(), &prod, "a").await;

    // "a" is ambiguous without a group.
    match f.reg.remove_node("a", "").await {
        Err(ControlError::FailedPrecondition(msg)) => {
            assert!(msg.contains("lab") && msg.contains("prod"), "{msg}")
        }
        other => panic!("expected FailedPrecondition, got {other:?}"),
    }
    assert_eq!(f.reg.remove_node("a", "lab").await.unwrap(), a.node_id);
    assert_eq!(f.reg.remove_node(&b.node_id, "").await.unwrap(), b.node_id);
    // Now "a" names one node.
    assert_eq!(f.reg.remove_node("a", "").await.unwrap(), pa.node_id);

    assert!(f.reg.list_nodes("").unwrap().is_empty());
    for j in [&a, &b, &pa] {
        assert!(f.reg.authorize(&j.credential).is_err());
    }
    assert_not_found(f.reg.remove_node("a", "").await, "no node with id or name");
    assert_not_found(f.reg.remove_node(&a.node_id, "").await, "no node");
    assert_invalid(f.reg.remove_node(&"n".repeat(500), "").await, "node is 500");
    assert!(f
        .reg
        .list_groups()
        .unwrap()
        .iter()
        .all(|g| g.node_count == 0));
}

#[tokio::test]
async fn leave_removes_the_node() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &token, "a").await;
    let b = f.join_ok(&Keypair::generate_ed25519(), &token, "b").await;
    let sub = f.reg.watch(&b.ctx).expect("watch");
    let (mut events, mut version) = (sub.events, sub.version);
    f.reg.leave(&a.ctx).await.expect("leave");
    match next_event(&mut events, &mut version) {
        GroupEvent::Removed {
            node_id, reason, ..
        } => {
            assert_eq!(&*node_id, a.node_id);
            assert_eq!(reason, RemovalReason::Left);
        }
        other => panic!("expected a removal, got {other:?}"),
    }
    assert!(f.reg.authorize(&a.credential).is_err());
    assert_eq!(f.reg.list_nodes("").unwrap().len(), 1);
    drop(sub.guard);
}

// ----------------------------------------------------------------- watch

#[tokio::test]
async fn watch_full_map_then_deltas() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &token, "a").await;
    let b = f.join_ok(&Keypair::generate_ed25519(), &token, "b").await;
    f.reg
        .update_endpoints(&b.ctx, &["/ip4/192.0.2.2/udp/4000/quic-v1".into()])
        .await
        .expect("endpoints");

    let sub = f.reg.watch(&a.ctx).expect("watch");
    assert_eq!(sub.first.version, sub.version);
    let whole = sub.full_map();
    let map = full_map(&whole);
    assert_eq!(map.group, "lab");
    let me = map.self_node.as_ref().expect("self");
    assert_eq!(me.node_id, a.node_id);
    assert_eq!(me.name, "a");
    assert!(me.online);
    assert_eq!(map.peers.len(), 1);
    assert_eq!(map.peers[0].node_id, b.node_id);
    assert_eq!(map.peers[0].name, "b");
    assert_eq!(map.peers[0].addresses, ["/ip4/192.0.2.2/udp/4000/quic-v1"]);
    assert!(!map.peers[0].online);

    let (mut events, mut version) = (sub.events, sub.version);
    // Nothing new beyond the snapshot yet.
    assert_no_event(&mut events, version);

    // A join.
    let before = version;
    let c_kp = Keypair::generate_ed25519();
    let c = f.join_ok(&c_kp, &token, "c").await;
    let ev = next_event(&mut events, &mut version);
    assert!(ev.version() > before);
    let update = ev.to_update();
    assert_eq!(update.version, ev.version());
    match update.kind {
        Some(Kind::PeerUpsert(p)) => {
            assert_eq!(p.node_id, c.node_id);
            assert_eq!(p.name, "c");
            assert_eq!(p.public_key, c_kp.public().encode_protobuf());
        }
        other => panic!("expected an upsert, got {other:?}"),
    }

    // New endpoints.
    f.reg
        .update_endpoints(
            &c.ctx,
            &[
                "/ip4/192.0.2.3/udp/1/quic-v1".into(),
                "/ip4/192.0.2.3/tcp/1".into(),
                "/ip4/192.0.2.3/udp/1/quic-v1".into(),
            ],
        )
        .await
        .expect("endpoints");
    match next_event(&mut events, &mut version).to_update().kind {
        Some(Kind::PeerUpsert(p)) => {
            assert_eq!(p.node_id, c.node_id);
            // Sorted and deduplicated.
            assert_eq!(
                p.addresses,
                ["/ip4/192.0.2.3/tcp/1", "/ip4/192.0.2.3/udp/1/quic-v1"]
            );
        }
        other => panic!("expected an upsert, got {other:?}"),
    }
    // The same set again (in another order) changes nothing.
    f.reg
        .update_endpoints(
            &c.ctx,
            &[
                "/ip4/192.0.2.3/udp/1/quic-v1".into(),
                "/ip4/192.0.2.3/tcp/1".into(),
            ],
        )
        .await
        .expect("endpoints");
    assert_no_event(&mut events, version);

    // A removal.
    let before = version;
    f.reg.remove_node("b", "lab").await.expect("remove b");
    let ev = next_event(&mut events, &mut version);
    assert!(ev.version() > before);
    match ev.to_update().kind {
        Some(Kind::PeerRemoved(id)) => assert_eq!(id, b.node_id),
        other => panic!("expected a removal, got {other:?}"),
    }

    // A fresh snapshot agrees with the deltas.
    let full = f.reg.resync(&a.ctx).expect("resync");
    assert_eq!(full.version, version);
    let ids: Vec<&str> = full_map(&full)
        .peers
        .iter()
        .map(|p| p.node_id.as_str())
        .collect();
    assert_eq!(ids, [c.node_id.as_str()]);

    // The watcher's own removal.
    f.reg.remove_node(&a.node_id, "").await.expect("remove a");
    match next_event(&mut events, &mut version) {
        GroupEvent::Removed {
            node_id, reason, ..
        } => {
            assert_eq!(&*node_id, a.node_id);
            assert_eq!(reason, RemovalReason::Removed);
            assert!(reason.describe().contains("removed"));
        }
        other => panic!("expected the watcher's own removal, got {other:?}"),
    }
    assert_permission_denied(f.reg.resync(&a.ctx), "not a member");
    drop(sub.guard);
}

#[tokio::test]
async fn watch_by_a_node_that_is_gone_is_refused() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    let a = f.join_ok(&kp, &token, "a").await;
    // The node is removed between authorization and the watch.
    f.reg.remove_node("a", "").await.expect("remove");
    assert_permission_denied(f.reg.watch(&a.ctx).map(|s| s.version), "not a member");
    // Nothing was left behind: the node, back again (with a new token),
    // is not online.
    let (fresh, _) = f.token("lab", 0, 0).await;
    let again = f.join_ok(&kp, &fresh, "a").await;
    assert!(!f.node(&again.node_id).online);

    // A group that does not exist.
    let ctx = NodeCtx {
        node_id: again.node_id.clone(),
        group: "nope".into(),
    };
    assert_not_found(f.reg.watch(&ctx).map(|s| s.version), "no group");
}

#[tokio::test]
async fn online_follows_watch_streams() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &token, "a").await;
    let b = f.join_ok(&Keypair::generate_ed25519(), &token, "b").await;
    assert!(!f.node(&a.node_id).online);

    let observer = f.reg.watch(&b.ctx).expect("watch b");
    let (mut events, mut version) = (observer.events, observer.version);

    let w1 = f.reg.watch(&a.ctx).expect("watch a");
    assert!(f.node(&a.node_id).online);
    // B (the observer) and A came online together.
    let peers = next_presence(&mut events, &mut version).await;
    assert_eq!(peers.len(), 2);
    assert!(peers.iter().all(|p| p.online));
    assert!(peers.iter().any(|p| p.node_id == a.node_id));
    // A second stream of the same node changes nothing.
    let w2 = f.reg.watch(&a.ctx).expect("second watch a");
    tokio::time::sleep(PRESENCE_COALESCE * 2).await;
    assert_no_event(&mut events, version);
    drop(w1);
    assert!(f.node(&a.node_id).online);
    tokio::time::sleep(PRESENCE_COALESCE * 2).await;
    assert_no_event(&mut events, version);

    f.advance(5_000);
    drop(w2);
    let n = f.node(&a.node_id);
    assert!(!n.online);
    assert_eq!(n.last_seen_ms, f.now());
    let peers = next_presence(&mut events, &mut version).await;
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].node_id, a.node_id);
    assert!(!peers[0].online);
    assert_eq!(peers[0].last_seen_ms, f.now());
    // B's own stream keeps B online.
    assert!(f.node(&b.node_id).online);
    drop(observer.guard);
    assert!(!f.node(&b.node_id).online);
}

/// Many members coming online at once (a server restart) reach a watcher
/// as a few coalesced changes, not one each.
#[tokio::test]
async fn presence_of_many_nodes_is_coalesced() {
    const N: usize = 50;
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let observer = f.join_ok(&Keypair::generate_ed25519(), &token, "o").await;
    let mut nodes = Vec::new();
    for i in 0..N {
        nodes.push(
            f.join_ok(&Keypair::generate_ed25519(), &token, &format!("n{i}"))
                .await,
        );
    }
    let sub = f.reg.watch(&observer.ctx).expect("watch");
    let (mut events, mut version) = (sub.events, sub.version);
    tokio::time::sleep(PRESENCE_COALESCE * 2).await;
    while events.try_recv().is_ok() {}
    let guards: Vec<_> = nodes
        .iter()
        .map(|n| f.reg.watch(&n.ctx).expect("watch"))
        .collect();
    let peers = next_presence(&mut events, &mut version).await;
    assert_eq!(peers.len(), N, "every node in one change");
    assert!(peers.iter().all(|p| p.online));
    assert_no_event(&mut events, version);
    drop(guards);
    let peers = next_presence(&mut events, &mut version).await;
    assert_eq!(peers.len(), N);
    assert!(peers.iter().all(|p| !p.online));
    drop(sub.guard);
}

#[tokio::test]
async fn lagging_watcher_is_told_and_can_resync() {
    let f = Fixture::with_limits(Limits {
        watch_backlog: 4,
        ..Limits::default()
    });
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &token, "a").await;
    let b = f.join_ok(&Keypair::generate_ed25519(), &token, "b").await;
    let mut sub = f.reg.watch(&a.ctx).expect("watch");
    let start = sub.version;

    const CHANGES: u64 = 6;
    for i in 0..CHANGES {
        f.reg
            .update_endpoints(
                &b.ctx,
                &[format!("/ip4/192.0.2.9/udp/{}/quic-v1", 1000 + i)],
            )
            .await
            .expect("endpoints");
    }
    match sub.events.try_recv() {
        Err(TryRecvError::Lagged(missed)) => assert!(missed > 0),
        other => panic!("expected Lagged, got {other:?}"),
    }

    let full = f.reg.resync(&a.ctx).expect("resync");
    assert_eq!(full.version, start + CHANGES);
    let map = full_map(&full);
    assert_eq!(map.self_node.as_ref().unwrap().node_id, a.node_id);
    assert_eq!(map.peers.len(), 1);
    assert_eq!(
        map.peers[0].addresses,
        [format!("/ip4/192.0.2.9/udp/{}/quic-v1", 1000 + CHANGES - 1)]
    );
    // After the lag the receiver goes on with what it still holds; the most
    // recent change is among it.
    let mut last = 0;
    while let Ok(ev) = sub.events.try_recv() {
        last = ev.version();
    }
    assert_eq!(last, start + CHANGES);
}

// -------------------------------------------------------------- endpoints

#[tokio::test]
async fn update_endpoints_bad_input() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &token, "a").await;
    let good = "/ip4/192.0.2.1/udp/4000/quic-v1".to_string();
    f.reg
        .update_endpoints(&a.ctx, std::slice::from_ref(&good))
        .await
        .expect("endpoints");

    let too_many: Vec<String> = (0..=validate::MAX_ADDRESSES)
        .map(|i| format!("/ip4/192.0.2.1/udp/{}/quic-v1", 1000 + i))
        .collect();
    assert_invalid(
        f.reg.update_endpoints(&a.ctx, &too_many).await,
        "the limit is 32",
    );
    assert_invalid(
        f.reg
            .update_endpoints(&a.ctx, &["192.0.2.1:4000".into()])
            .await,
        "not a multiaddr",
    );
    assert_invalid(
        f.reg
            .update_endpoints(&a.ctx, &[format!("/dns/{}", "a".repeat(400))])
            .await,
        "address is",
    );
    // "" parses as the empty multiaddr, which is no address at all.
    assert_invalid(
        f.reg
            .update_endpoints(&a.ctx, &[good.clone(), String::new()])
            .await,
        "it is empty",
    );
    assert_eq!(f.node(&a.node_id).addresses, [good]);

    // Removed nodes cannot update.
    f.reg.remove_node("a", "").await.expect("remove");
    assert_permission_denied(f.reg.update_endpoints(&a.ctx, &[]).await, "not active");
}

// ----------------------------------------------------------------- links

#[tokio::test]
async fn report_links_keeps_members_and_rejects_nonsense() {
    let f = Fixture::new();
    f.group("lab").await;
    f.group("prod").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let (prod, _) = f.token("prod", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &token, "a").await;
    let b = f.join_ok(&Keypair::generate_ed25519(), &token, "b").await;
    let other_group = f.join_ok(&Keypair::generate_ed25519(), &prod, "x").await;
    let stranger = peer_id(&Keypair::generate_ed25519());

    let kept = f
        .reg
        .report_links(
            &a.ctx,
            vec![
                link(&b.node_id, PathKind::Direct),
                link(&stranger, PathKind::Relay),
                link(&other_group.node_id, PathKind::Direct),
                link(&a.node_id, PathKind::Direct),
            ],
        )
        .expect("report");
    assert_eq!(kept, 1);
    let table = f.reg.link_table("lab").expect("table");
    assert_eq!(table.len(), 1);
    let e = &table[0];
    assert_eq!(e.group, "lab");
    assert_eq!(e.from_node, a.node_id);
    assert_eq!(e.from_name, "a");
    assert_eq!(e.to_name, "b");
    assert_eq!(e.reported_ms, f.now());
    assert_eq!(
        e.link.as_ref().unwrap(),
        &link(&b.node_id, PathKind::Direct)
    );
    assert!(f.reg.link_table("prod").unwrap().is_empty());

    let with = |edit: &dyn Fn(&mut LinkReport)| {
        let mut l = link(&b.node_id, PathKind::Direct);
        edit(&mut l);
        vec![l]
    };
    let cases: Vec<(Vec<LinkReport>, &str)> = vec![
        (with(&|l| l.rtt_ms = Some(f64::NAN)), "rtt_ms NaN"),
        (with(&|l| l.rtt_ms = Some(f64::INFINITY)), "rtt_ms"),
        (with(&|l| l.rtt_ms = Some(-1.0)), "rtt_ms -1"),
        (with(&|l| l.loss = 1.5), "loss 1.5 is not within 0..1"),
        (with(&|l| l.loss = -0.1), "loss"),
        (with(&|l| l.loss = f64::NAN), "loss"),
        (
            with(&|l| l.path = PathKind::Unspecified as i32),
            "path kind 0",
        ),
        (with(&|l| l.path = 99), "path kind 99"),
        (
            with(&|l| l.peer_id = "p".repeat(300)),
            "peer_id is 300 bytes",
        ),
        (with(&|l| l.via = "v".repeat(300)), "via is 300 bytes"),
        (
            vec![link(&b.node_id, PathKind::Direct); validate::MAX_LINKS + 1],
            "4097 link reports; the limit is 4096",
        ),
    ];
    for (links, needle) in cases {
        assert_invalid(f.reg.report_links(&a.ctx, links), needle);
    }
    // The stored report is untouched by the refused ones.
    assert_eq!(f.reg.link_table("").unwrap(), table);

    // Loss at the edges and an unknown rtt are fine.
    let mut l = link(&b.node_id, PathKind::Forwarded);
    l.loss = 1.0;
    l.rtt_ms = None;
    l.via = other_group.node_id.clone();
    assert_eq!(f.reg.report_links(&a.ctx, vec![l.clone()]).unwrap(), 1);
    assert_eq!(f.reg.link_table("lab").unwrap()[0].link.as_ref(), Some(&l));

    // Links go with the node they are about.
    f.reg
        .report_links(&b.ctx, vec![link(&a.node_id, PathKind::Direct)])
        .unwrap();
    assert_eq!(f.reg.link_table("lab").unwrap().len(), 2);
    f.reg.remove_node(&b.node_id, "").await.expect("remove");
    assert!(f.reg.link_table("").unwrap().is_empty());
}

// ----------------------------------------------------------- admin input

#[tokio::test]
async fn groups_and_tokens_bad_input() {
    let f = Fixture::new();
    f.group("lab").await;
    match f.reg.create_group("lab").await {
        Err(ControlError::AlreadyExists(msg)) => assert!(msg.contains("already exists")),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_invalid(f.reg.create_group("").await, "group name is empty");
    assert_invalid(f.reg.create_group("Lab").await, "not a DNS label");
    assert_invalid(f.reg.create_group(&"g".repeat(64)).await, "64 bytes");
    assert_not_found(f.reg.create_token("nope", 0, 0).await, "no group named");
    assert_invalid(
        f.reg.create_token("lab", MAX_TOKEN_TTL_SECS + 1, 0).await,
        "longer than the limit",
    );
    f.reg
        .create_token("lab", MAX_TOKEN_TTL_SECS, 0)
        .await
        .expect("longest ttl");
    assert_eq!(f.reg.list_groups().unwrap().len(), 1);
    assert_eq!(f.reg.list_tokens("").unwrap().len(), 1);
    assert!(f.reg.list_tokens("nope").unwrap().is_empty());
}

// ----------------------------------------------------------- persistence

#[tokio::test]
async fn state_survives_a_restart() {
    let f = Fixture::new();
    f.group("lab").await;
    f.group("prod").await;
    let (t1, _) = f.token("lab", 0, 0).await;
    let (t2, _) = f.token("lab", 3600, 5).await;
    let (t3, _) = f.token("prod", 0, 1).await;
    let a_kp = Keypair::generate_ed25519();
    let a = f.join_ok(&a_kp, &t1, "node").await;
    let b = f.join_ok(&Keypair::generate_ed25519(), &t2, "node").await;
    let c = f.join_ok(&Keypair::generate_ed25519(), &t3, "c").await;
    f.reg
        .update_endpoints(&a.ctx, &["/ip4/192.0.2.1/udp/4000/quic-v1".into()])
        .await
        .unwrap();
    f.reg
        .report_links(&a.ctx, vec![link(&b.node_id, PathKind::Direct)])
        .unwrap();
    f.reg.revoke_token(&t2, false).await.unwrap();
    let auth_ts = f.ts();
    let a_session = f
        .authenticate(&a_kp, auth_ts)
        .await
        .unwrap()
        .session
        .expect("a session")
        .credential;
    // Re-authentication replaced the join's session.
    assert!(f.reg.authorize(&a.credential).is_err());

    let server_id = f.reg.server_id().to_string();
    let groups = f.reg.list_groups().unwrap();
    let tokens = f.reg.list_tokens("").unwrap();
    let offline = |mut nodes: Vec<NodeInfo>| {
        nodes.iter_mut().for_each(|n| n.online = false);
        nodes
    };
    let nodes = offline(f.reg.list_nodes("").unwrap());
    let links = f.reg.link_table("").unwrap();
    // One of them is online when the registry goes down.
    let w = f.reg.watch(&c.ctx).unwrap();
    drop(w);

    let f = f.reopen();
    assert_eq!(f.reg.server_id(), server_id);
    assert_eq!(f.reg.list_groups().unwrap(), groups);
    assert_eq!(f.reg.list_tokens("").unwrap(), tokens);
    let after = f.reg.list_nodes("").unwrap();
    assert!(after.iter().all(|n| !n.online));
    let mut expected_nodes = nodes;
    // Going offline stamped the last-seen time.
    for n in &mut expected_nodes {
        if n.node_id == c.node_id {
            n.last_seen_ms = f.now();
        }
    }
    assert_eq!(after, expected_nodes);
    assert_eq!(f.reg.link_table("").unwrap(), links);

    // Old sessions still work; the revoked node's do not.
    assert_eq!(f.reg.authorize(&a_session).unwrap().node_id, a.node_id);
    assert_eq!(f.reg.authorize(&c.credential).unwrap().group, "prod");
    assert!(f.reg.authorize(&b.credential).is_err());
    assert_eq!(f.node(&b.node_id).state, NodeState::Revoked as i32);

    // Replay protection, names, token uses and revocation survived as well.
    assert_unauthenticated(f.authenticate(&a_kp, auth_ts).await, "stale");
    f.authenticate(&a_kp, f.ts())
        .await
        .expect("newer timestamp");
    let d = f.join_ok(&Keypair::generate_ed25519(), &t1, "node").await;
    assert_eq!(d.name, "node-3");
    assert_unauthenticated(
        f.join(&Keypair::generate_ed25519(), &t3, "e").await,
        "used up",
    );
    assert_unauthenticated(
        f.join(&Keypair::generate_ed25519(), &t2, "e").await,
        "revoked",
    );
    // The rebuilt hub serves maps.
    let sub = f.reg.watch(&d.ctx).unwrap();
    let whole = sub.full_map();
    let map = full_map(&whole);
    assert_eq!(map.peers.len(), 1);
    assert_eq!(map.peers[0].node_id, a.node_id);
    assert_eq!(map.peers[0].addresses, ["/ip4/192.0.2.1/udp/4000/quic-v1"]);
    drop(sub);
}

#[tokio::test]
async fn expired_sessions_are_purged_on_open() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &token, "a").await;
    f.advance(f.limits.session_ttl_ms + 1);
    let f = f.reopen();
    assert_unauthenticated(f.reg.authorize(&a.credential), "unknown or expired session");
    assert_eq!(f.reg.store().session_count(), 0);
}

#[tokio::test]
async fn mesh_addresses_are_assigned_unique_and_sent_in_every_peer() {
    let f = Fixture::new();
    f.group("lab").await;
    f.group("prod").await;
    let (t1, _) = f.token("lab", 0, 0).await;
    let (t2, _) = f.token("prod", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &t1, "a").await;
    let b = f.join_ok(&Keypair::generate_ed25519(), &t1, "b").await;
    let c = f.join_ok(&Keypair::generate_ed25519(), &t2, "c").await;
    let (na, nb, nc) = (f.node(&a.node_id), f.node(&b.node_id), f.node(&c.node_id));
    let mut v4s = std::collections::HashSet::new();
    for n in [&na, &nb, &nc] {
        let v4: std::net::Ipv4Addr = n.mesh_ipv4.parse().expect("an IPv4 address");
        let v6: std::net::Ipv6Addr = n.mesh_ipv6.parse().expect("an IPv6 address");
        assert_eq!(v4.octets()[0], 100);
        assert_eq!(v4.octets()[1] & 0xc0, 64, "{v4} is not in 100.64.0.0/10");
        assert_eq!(v6.octets()[0], 0xfd, "{v6} is not a ULA");
        assert!(v4s.insert(v4), "{v4} given twice");
    }
    // One /48 for the whole server.
    let p = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().segments()[..3].to_vec();
    assert_eq!(p(&na.mesh_ipv6), p(&nb.mesh_ipv6));
    assert_eq!(p(&na.mesh_ipv6), p(&nc.mesh_ipv6));

    // The full map carries them, for the node itself and for its peers.
    let sub = f.reg.watch(&a.ctx).expect("watch");
    let whole = sub.full_map();
    let map = full_map(&whole);
    let me = map.self_node.as_ref().unwrap();
    assert_eq!(
        (&me.mesh_ipv4, &me.mesh_ipv6),
        (&na.mesh_ipv4, &na.mesh_ipv6)
    );
    assert_eq!(map.peers[0].mesh_ipv4, nb.mesh_ipv4);
    assert_eq!(map.peers[0].mesh_ipv6, nb.mesh_ipv6);
    // And so does every delta.
    let (mut events, mut version) = (sub.events, sub.version);
    f.reg
        .update_endpoints(&b.ctx, &["/ip4/192.0.2.2/udp/1/quic-v1".into()])
        .await
        .unwrap();
    match next_event(&mut events, &mut version).to_update().kind {
        Some(Kind::PeerUpsert(p)) => {
            assert_eq!(p.node_id, b.node_id);
            assert_eq!(
                (p.mesh_ipv4, p.mesh_ipv6),
                (nb.mesh_ipv4.clone(), nb.mesh_ipv6.clone())
            );
        }
        other => panic!("expected an upsert, got {other:?}"),
    }
    let d_kp = Keypair::generate_ed25519();
    let d = f.join_ok(&d_kp, &t1, "d").await;
    match next_event(&mut events, &mut version).to_update().kind {
        Some(Kind::PeerUpsert(p)) => {
            assert_eq!(p.node_id, d.node_id);
            assert!(!p.mesh_ipv4.is_empty() && !p.mesh_ipv6.is_empty());
            assert!(!v4s.contains(&p.mesh_ipv4.parse().unwrap()));
        }
        other => panic!("expected an upsert, got {other:?}"),
    }
    drop(events);
    drop(sub.guard);
}

#[tokio::test]
async fn mesh_addresses_are_stable_across_rejoins_and_restarts() {
    let f = Fixture::new();
    f.group("lab").await;
    let (t1, _) = f.token("lab", 0, 0).await;
    let kp = Keypair::generate_ed25519();
    let a = f.join_ok(&kp, &t1, "a").await;
    let before = f.node(&a.node_id);
    // The node restarts: authenticates again, or joins again with a token.
    f.authenticate(&kp, f.ts()).await.unwrap();
    f.join_ok(&kp, &t1, "a").await;
    let again = f.node(&a.node_id);
    assert_eq!(
        (&again.mesh_ipv4, &again.mesh_ipv6),
        (&before.mesh_ipv4, &before.mesh_ipv6)
    );
    // The server restarts.
    let f = f.reopen();
    let after = f.node(&a.node_id);
    assert_eq!(
        (&after.mesh_ipv4, &after.mesh_ipv6),
        (&before.mesh_ipv4, &before.mesh_ipv6)
    );
    // A new node after the restart does not get a taken address.
    let b = f.join_ok(&Keypair::generate_ed25519(), &t1, "b").await;
    assert_ne!(f.node(&b.node_id).mesh_ipv4, before.mesh_ipv4);
    // A removed node's address is free again, and its record is gone.
    f.reg.remove_node(&a.node_id, "").await.unwrap();
    let m = f.reg.mesh_addrs.lock().unwrap();
    assert_eq!(m.len(), 1);
}

#[tokio::test]
async fn records_from_an_older_server_get_mesh_addresses_on_open() {
    let f = Fixture::new();
    f.group("lab").await;
    let (t1, _) = f.token("lab", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &t1, "a").await;
    let b = f.join_ok(&Keypair::generate_ed25519(), &t1, "b").await;
    let b_addr = f.node(&b.node_id).mesh_ipv4;
    // As an older server wrote it: no mesh addresses.
    let mut rec = f.reg.store().node(&a.node_id).unwrap().unwrap();
    rec.mesh_ipv4.clear();
    rec.mesh_ipv6.clear();
    f.reg.store().write(|t| t.put_node(&rec)).unwrap();
    let f = f.reopen();
    let a2 = f.node(&a.node_id);
    assert!(a2.mesh_ipv4.parse::<std::net::Ipv4Addr>().is_ok());
    assert!(a2.mesh_ipv6.parse::<std::net::Ipv6Addr>().is_ok());
    assert_ne!(a2.mesh_ipv4, b_addr);
    // Stored, so the next open keeps it.
    let f = f.reopen();
    assert_eq!(f.node(&a.node_id).mesh_ipv4, a2.mesh_ipv4);
    assert_eq!(f.node(&b.node_id).mesh_ipv4, b_addr);
}

/// A record that does not decode is named in the error of a direct read,
/// skipped by scans, and does not keep the server from starting with
/// everything else.
#[tokio::test]
async fn a_corrupt_record_is_reported_and_the_rest_starts() {
    let f = Fixture::new();
    f.group("lab").await;
    let (token, _) = f.token("lab", 0, 0).await;
    let a = f.join_ok(&Keypair::generate_ed25519(), &token, "a").await;
    f.reg
        .store()
        .put_raw_node("12D3KooWcorrupt", &[0xff, 0xff, 0xff])
        .unwrap();
    let f = f.reopen();
    match f.reg.store().node("12D3KooWcorrupt") {
        Err(e) => assert!(e.to_string().contains("12D3KooWcorrupt"), "{e}"),
        Ok(n) => panic!("a corrupt record decoded: {n:?}"),
    }
    let nodes = f.reg.list_nodes("lab").unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node_id, a.node_id);
    f.reg.authorize(&a.credential).unwrap();
}
