//! The relay directory over gRPC (in-process server on a loopback port):
//! registration, member sets, relays in the network maps, load, revocation,
//! and persistence across a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod common;

use common::{watch_request, MapWatch, Messages};
use libp2p_identity::Keypair;
use peermesh_control_server::Server;
use peermesh_proto::api::{
    admin_client::AdminClient, member_update, network_map_update::Kind,
    node_control_client::NodeControlClient, relay_control_client::RelayControlClient,
    CreateGroupRequest, CreateTokenRequest, JoinRequest, JoinResponse, ListNodesRequest,
    ListRelaysRequest, ListTokensRequest, MemberUpdate, NetworkMapUpdate, RegisterRelayRequest,
    RegisterRelayResponse, Relay, RelayInfo, RelayLoad, RemoveNodeRequest, RevokeTokenRequest,
    UpdateEndpointsRequest, WatchMembersRequest,
};
use peermesh_proto::signing;
use peermesh_proto::token::JoinToken;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

const STEP: Duration = Duration::from_secs(10);
const RELAY_ADDR: &str = "/ip4/127.0.0.1/udp/4001/quic-v1";

struct Srv {
    addr: SocketAddr,
    admin_credential: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Srv {
    async fn start(dir: &Path) -> Result<Self> {
        // A restart on the same directory waits for the old database to close.
        let deadline = tokio::time::Instant::now() + STEP;
        let server = loop {
            match Server::bind("127.0.0.1:0".parse()?, dir).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("bind: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let addr = server.local_addr()?;
        let admin_credential = std::fs::read_to_string(dir.join("admin.token"))?
            .trim()
            .to_string();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
        });
        Ok(Self {
            addr,
            admin_credential,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Stops the server and waits until it is gone (every stream must have
    /// been dropped: a graceful shutdown waits for open streams).
    async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STEP, task).await??;
        }
        Ok(())
    }

    async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await?)
    }

    async fn admin(&self) -> Result<AdminClient<Channel>> {
        Ok(AdminClient::new(self.channel().await?))
    }

    async fn node(&self) -> Result<NodeControlClient<Channel>> {
        Ok(NodeControlClient::new(self.channel().await?))
    }

    async fn relay(&self) -> Result<RelayControlClient<Channel>> {
        Ok(RelayControlClient::new(self.channel().await?))
    }

    fn as_admin<T>(&self, msg: T) -> Request<T> {
        bearer(msg, &self.admin_credential)
    }

    async fn group(&self, name: &str) -> Result<()> {
        self.admin()
            .await?
            .create_group(self.as_admin(CreateGroupRequest { name: name.into() }))
            .await?;
        Ok(())
    }

    async fn node_token(&self, group: &str) -> Result<String> {
        Ok(self
            .admin()
            .await?
            .create_token(self.as_admin(CreateTokenRequest {
                group: group.into(),
                reusable: true,
                ..Default::default()
            }))
            .await?
            .into_inner()
            .token
            .parse::<JoinToken>()
            .expect("a well-formed token")
            .secret)
    }

    async fn relay_token(&self, max_uses: u32) -> Result<String> {
        let r = self
            .admin()
            .await?
            .create_token(self.as_admin(CreateTokenRequest {
                relay: true,
                max_uses,
                // 0 here: any number of uses, as before tokens were
                // single-use by default.
                reusable: max_uses == 0,
                ..Default::default()
            }))
            .await?
            .into_inner();
        let info = r.info.expect("token info");
        assert!(info.relay);
        assert!(info.group.is_empty());
        // The request carries the secret; the pin is the client's.
        Ok(r.token
            .parse::<JoinToken>()
            .expect("a well-formed token")
            .secret)
    }

    async fn join(&self, kp: &Keypair, token: &str, name: &str) -> Result<JoinResponse, Status> {
        self.node()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .join(join_request(kp, token, name))
            .await
            .map(|r| r.into_inner())
    }

    async fn register(&self, req: RegisterRelayRequest) -> Result<RegisterRelayResponse, Status> {
        self.relay()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .register_relay(req)
            .await
            .map(|r| r.into_inner())
    }

    async fn watch_map(&self, session: &str) -> Result<MapWatch> {
        Ok(MapWatch(
            self.node()
                .await?
                .watch_network_map(bearer(watch_request(), session))
                .await?
                .into_inner(),
        ))
    }

    async fn watch_members(&self, session: &str) -> Result<Streaming<MemberUpdate>, Status> {
        self.relay()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .watch_members(bearer(WatchMembersRequest {}, session))
            .await
            .map(|r| r.into_inner())
    }

    async fn report_load(&self, session: &str, load: RelayLoad) -> Result<(), Status> {
        self.relay()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .report_relay_load(bearer(load, session))
            .await
            .map(|_| ())
    }

    async fn relays(&self) -> Result<Vec<RelayInfo>> {
        Ok(self
            .admin()
            .await?
            .list_relays(self.as_admin(ListRelaysRequest {}))
            .await?
            .into_inner()
            .relays)
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn bearer<T>(msg: T, credential: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {credential}")).expect("ASCII"),
    );
    req
}

/// Milliseconds since the epoch, strictly increasing within the process.
fn timestamp_ms() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let prev = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now.max(last + 1))
        })
        .expect("always Some");
    now.max(prev + 1)
}

fn join_request(kp: &Keypair, token: &str, name: &str) -> JoinRequest {
    let public_key = kp.public().encode_protobuf();
    let ts = timestamp_ms();
    let signature = kp
        .sign(&signing::join_payload(token, &public_key, name, ts))
        .expect("ed25519 signs");
    JoinRequest {
        token: token.into(),
        public_key,
        name: name.into(),
        timestamp_ms: ts,
        signature,
    }
}

fn register_request_at(
    kp: &Keypair,
    token: &str,
    addresses: &[&str],
    region: &str,
    ts: u64,
) -> RegisterRelayRequest {
    let public_key = kp.public().encode_protobuf();
    let addresses: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    let signature = kp
        .sign(&signing::relay_payload(
            token,
            &public_key,
            &addresses,
            region,
            ts,
        ))
        .expect("ed25519 signs");
    RegisterRelayRequest {
        token: token.into(),
        public_key,
        addresses,
        region: region.into(),
        timestamp_ms: ts,
        signature,
    }
}

fn register_request(kp: &Keypair, token: &str) -> RegisterRelayRequest {
    register_request_at(kp, token, &[RELAY_ADDR], "test", timestamp_ms())
}

fn id(kp: &Keypair) -> String {
    kp.public().to_peer_id().to_string()
}

fn session(r: &RegisterRelayResponse) -> String {
    r.session.as_ref().expect("a session").credential.clone()
}

fn node_session(r: &JoinResponse) -> String {
    r.session.as_ref().expect("a session").credential.clone()
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, needle: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "status {s:?}");
            assert!(
                s.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                s.message()
            );
        }
        Ok(v) => panic!("expected {code:?} ({needle:?}), got {v:?}"),
    }
}

async fn next<S: Messages>(stream: &mut S) -> Result<S::Item, Status> {
    match tokio::time::timeout(STEP, stream.next_message()).await {
        Err(_) => panic!("no stream message within {STEP:?}"),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => panic!("stream ended"),
        Ok(Err(s)) => Err(s),
    }
}

/// The next map update that replaces the relay list (others are skipped);
/// checks that versions increase.
async fn next_relays(stream: &mut MapWatch, version: &mut u64) -> Vec<Relay> {
    loop {
        let u = next(stream).await.expect("map update");
        assert!(
            u.version > *version,
            "version {} after {version}",
            u.version
        );
        *version = u.version;
        if let Some(Kind::Relays(list)) = u.kind {
            return list.relays;
        }
    }
}

fn full_map(u: &NetworkMapUpdate) -> &peermesh_proto::api::NetworkMap {
    match &u.kind {
        Some(Kind::Full(m)) => m,
        other => panic!("expected a full map, got {other:?}"),
    }
}

fn member_kind(u: MemberUpdate) -> member_update::Kind {
    u.kind.expect("a member update kind")
}

#[tokio::test]
async fn relays_join_the_maps_and_follow_the_members() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Srv::start(dir.path()).await?;
    s.group("lab").await?;
    let token = s.node_token("lab").await?;
    let (a, b, c) = (
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
    );
    let ja = s.join(&a, &token, "a").await?;
    let mut map_a = s.watch_map(&node_session(&ja)).await?;
    let first = next(&mut map_a).await?;
    assert!(full_map(&first).relays.is_empty());
    let mut version = first.version;

    // Registered but not yet watching: listed, offline, not in maps.
    let r = Keypair::generate_ed25519();
    let reg = s
        .register(register_request(&r, &s.relay_token(0).await?))
        .await?;
    assert_eq!(reg.relay_id, id(&r));
    assert!(!reg.server_id.is_empty());
    let listed = s.relays().await?;
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].online);

    // Watching: the member set, and the relay appears in A's map.
    let mut members = s.watch_members(&session(&reg)).await?;
    match member_kind(next(&mut members).await?) {
        member_update::Kind::Full(set) => assert_eq!(set.node_ids, vec![ja.node_id.clone()]),
        other => panic!("expected the full set, got {other:?}"),
    }
    let relays = next_relays(&mut map_a, &mut version).await;
    assert_eq!(relays.len(), 1);
    assert_eq!(relays[0].relay_id, id(&r));
    assert_eq!(relays[0].addresses, vec![RELAY_ADDR.to_string()]);
    assert_eq!(relays[0].region, "test");
    assert!(s.relays().await?[0].online);

    // A node that joins is added to the relay's set and sees the relay in
    // its first map.
    let jb = s.join(&b, &token, "b").await?;
    match member_kind(next(&mut members).await?) {
        member_update::Kind::Added(n) => assert_eq!(n, jb.node_id),
        other => panic!("expected an addition, got {other:?}"),
    }
    let mut map_b = s.watch_map(&node_session(&jb)).await?;
    let first_b = next(&mut map_b).await?;
    assert_eq!(full_map(&first_b).relays, relays);

    // Removed by the administrator: removed from the set.
    drop(map_b);
    s.admin()
        .await?
        .remove_node(s.as_admin(RemoveNodeRequest {
            node: jb.node_id.clone(),
            group: String::new(),
        }))
        .await?;
    match member_kind(next(&mut members).await?) {
        member_update::Kind::Removed(n) => assert_eq!(n, jb.node_id),
        other => panic!("expected a removal, got {other:?}"),
    }

    // Load: a real change reaches the maps (within the one-second throttle).
    let rs = session(&reg);
    s.report_load(
        &rs,
        RelayLoad {
            reservations: 5,
            circuits: 3,
            bytes_relayed: 1000,
        },
    )
    .await?;
    let relays = next_relays(&mut map_a, &mut version).await;
    assert_eq!((relays[0].reservations, relays[0].circuits), (5, 3));
    // The same load again (and a change below the threshold) is no news: the
    // next update A sees is C joining.
    for (reservations, circuits) in [(5, 3), (5, 3), (6, 3)] {
        s.report_load(
            &rs,
            RelayLoad {
                reservations,
                circuits,
                bytes_relayed: 2000,
            },
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let jc = s.join(&c, &token, "c").await?;
    loop {
        let u = next(&mut map_a).await?;
        assert!(u.version > version);
        version = u.version;
        match u.kind {
            Some(Kind::PeerUpsert(p)) if p.node_id == jb.node_id => {} // B going offline
            Some(Kind::PeerRemoved(n)) if n == jb.node_id => {}
            Some(Kind::PeerUpsert(p)) if p.node_id == jc.node_id => break,
            other => panic!("unexpected update {other:?}"),
        }
    }
    match member_kind(next(&mut members).await?) {
        member_update::Kind::Added(n) => assert_eq!(n, jc.node_id),
        other => panic!("expected an addition, got {other:?}"),
    }
    let info = &s.relays().await?[0];
    assert_eq!(info.bytes_relayed, 2000);
    assert_eq!(info.relay.as_ref().unwrap().reservations, 6);

    // The relay's stream ends: it leaves the maps.
    drop(members);
    assert!(next_relays(&mut map_a, &mut version).await.is_empty());
    assert!(!s.relays().await?[0].online);
    Ok(())
}

#[tokio::test]
async fn relay_and_node_credentials_do_not_cross() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Srv::start(dir.path()).await?;
    s.group("lab").await?;
    let node_token = s.node_token("lab").await?;
    let relay_token = s.relay_token(0).await?;
    let mut admin = s.admin().await?;

    // Token kinds and groups.
    assert_status(
        admin
            .create_token(s.as_admin(CreateTokenRequest {
                group: "lab".into(),
                relay: true,
                ..Default::default()
            }))
            .await,
        Code::InvalidArgument,
        "no group",
    );
    assert_status(
        admin
            .create_token(s.as_admin(CreateTokenRequest::default()))
            .await,
        Code::InvalidArgument,
        "needs a group",
    );
    let tokens = admin
        .list_tokens(s.as_admin(ListTokensRequest::default()))
        .await?
        .into_inner()
        .tokens;
    assert_eq!(tokens.iter().filter(|t| t.relay).count(), 1);
    assert_eq!(tokens.iter().filter(|t| !t.relay).count(), 1);

    let kp = Keypair::generate_ed25519();
    assert_status(
        s.join(&kp, &relay_token, "x").await,
        Code::Unauthenticated,
        "this is a relay token",
    );
    assert_status(
        s.register(register_request(&kp, &node_token)).await,
        Code::Unauthenticated,
        "node join token",
    );

    // Sessions: a relay's cannot act as a node, a node's not as a relay.
    let node = s
        .join(&Keypair::generate_ed25519(), &node_token, "n")
        .await?;
    let relay = s.register(register_request(&kp, &relay_token)).await?;
    let mut nodes = s.node().await?;
    assert_status(
        nodes
            .watch_network_map(bearer(watch_request(), &session(&relay)))
            .await,
        Code::PermissionDenied,
        "relay's session",
    );
    assert_status(
        nodes
            .update_endpoints(bearer(UpdateEndpointsRequest::default(), &session(&relay)))
            .await,
        Code::PermissionDenied,
        "relay's session",
    );
    assert_status(
        s.watch_members(&node_session(&node)).await,
        Code::PermissionDenied,
        "node's session",
    );
    assert_status(
        s.report_load(&node_session(&node), RelayLoad::default())
            .await,
        Code::PermissionDenied,
        "node's session",
    );
    assert_status(
        s.watch_members("pms_nonsense").await,
        Code::Unauthenticated,
        "malformed session",
    );
    Ok(())
}

#[tokio::test]
async fn bad_registrations_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Srv::start(dir.path()).await?;
    let token = s.relay_token(1).await?;
    let kp = Keypair::generate_ed25519();

    // Signature over something else.
    let mut req = register_request(&kp, &token);
    req.region = "elsewhere".into();
    assert_status(
        s.register(req).await,
        Code::Unauthenticated,
        "does not verify",
    );
    // Signed by another key.
    let mut req = register_request(&kp, &token);
    req.public_key = Keypair::generate_ed25519().public().encode_protobuf();
    assert_status(
        s.register(req).await,
        Code::Unauthenticated,
        "does not verify",
    );
    // Shapes.
    let ts = timestamp_ms();
    assert_status(
        s.register(register_request_at(
            &kp,
            &token,
            &["127.0.0.1:4001"],
            "",
            ts,
        ))
        .await,
        Code::InvalidArgument,
        "not a multiaddr",
    );
    assert_status(
        s.register(register_request_at(&kp, &token, &[], "", ts))
            .await,
        Code::InvalidArgument,
        "at least one address",
    );
    let with_p2p = format!("{RELAY_ADDR}/p2p/{}", id(&kp));
    assert_status(
        s.register(register_request_at(&kp, &token, &[&with_p2p], "", ts))
            .await,
        Code::InvalidArgument,
        "/p2p/",
    );
    assert_status(
        s.register(register_request_at(
            &kp,
            &token,
            &[RELAY_ADDR],
            &"r".repeat(64),
            ts,
        ))
        .await,
        Code::InvalidArgument,
        "region",
    );
    let mut req = register_request(&kp, &token);
    req.public_key = vec![1, 2, 3];
    assert_status(s.register(req).await, Code::InvalidArgument, "public_key");
    assert_status(
        s.register(register_request(&kp, "pmj_short")).await,
        Code::InvalidArgument,
        "malformed relay token",
    );
    assert_status(
        s.register(register_request(
            &kp,
            "pmj_000000000000000000000000000000000000000000000000",
        ))
        .await,
        Code::Unauthenticated,
        "unknown relay token",
    );
    assert_status(
        s.register(register_request_at(
            &kp,
            &token,
            &[RELAY_ADDR],
            "",
            timestamp_ms() - 3_600_000,
        ))
        .await,
        Code::Unauthenticated,
        "clock",
    );

    // A good one; replaying it is refused, as is any older timestamp.
    let req = register_request(&kp, &token);
    let first = s.register(req.clone()).await?;
    assert_status(
        s.register(req.clone()).await,
        Code::Unauthenticated,
        "stale",
    );
    // Registering again (new timestamp, new address) does not use up the
    // single-use token; another relay does.
    let again = s
        .register(register_request_at(
            &kp,
            &token,
            &["/ip4/127.0.0.2/udp/4001/quic-v1"],
            "test",
            timestamp_ms(),
        ))
        .await?;
    assert_eq!(again.relay_id, first.relay_id);
    assert_ne!(session(&again), session(&first));
    assert_status(
        s.register(register_request(&Keypair::generate_ed25519(), &token))
            .await,
        Code::Unauthenticated,
        "used up",
    );
    let listed = s.relays().await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].relay.as_ref().unwrap().addresses,
        vec!["/ip4/127.0.0.2/udp/4001/quic-v1".to_string()]
    );
    Ok(())
}

#[tokio::test]
async fn revoking_the_relay_token_cuts_the_relay_off() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Srv::start(dir.path()).await?;
    s.group("lab").await?;
    let node = s
        .join(
            &Keypair::generate_ed25519(),
            &s.node_token("lab").await?,
            "a",
        )
        .await?;
    let mut map = s.watch_map(&node_session(&node)).await?;
    let mut version = next(&mut map).await?.version;

    let token = s.relay_token(0).await?;
    let kp = Keypair::generate_ed25519();
    let reg = s.register(register_request(&kp, &token)).await?;
    let mut members = s.watch_members(&session(&reg)).await?;
    next(&mut members).await?;
    assert_eq!(next_relays(&mut map, &mut version).await.len(), 1);

    let r = s
        .admin()
        .await?
        .revoke_token(s.as_admin(RevokeTokenRequest {
            token: token.clone(),
            keep_nodes: false,
        }))
        .await?
        .into_inner();
    assert!(r.info.as_ref().unwrap().relay && r.info.as_ref().unwrap().revoked);
    assert_eq!(r.revoked_nodes, vec![id(&kp)]);

    assert_status(next(&mut members).await, Code::PermissionDenied, "revoked");
    assert!(next_relays(&mut map, &mut version).await.is_empty());
    assert!(s.relays().await?.is_empty());
    // The session is gone; the token registers nothing any more.
    assert_status(
        s.report_load(&session(&reg), RelayLoad::default()).await,
        Code::Unauthenticated,
        "unknown or expired session",
    );
    assert_status(
        s.register(register_request(&kp, &token)).await,
        Code::Unauthenticated,
        "revoked",
    );
    // The node is untouched.
    assert!(s
        .admin()
        .await?
        .list_nodes(s.as_admin(ListNodesRequest::default()))
        .await?
        .into_inner()
        .nodes
        .iter()
        .all(|n| n.state == peermesh_proto::api::NodeState::Active as i32));
    Ok(())
}

#[tokio::test]
async fn relays_survive_a_restart_offline() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kp = Keypair::generate_ed25519();
    let (token, registered_ms) = {
        let s = Srv::start(dir.path()).await?;
        let token = s.relay_token(1).await?;
        let reg = s.register(register_request(&kp, &token)).await?;
        let mut members = s.watch_members(&session(&reg)).await?;
        next(&mut members).await?;
        s.report_load(
            &session(&reg),
            RelayLoad {
                reservations: 2,
                circuits: 1,
                bytes_relayed: 1234,
            },
        )
        .await?;
        let listed = s.relays().await?;
        assert!(listed[0].online);
        drop(members);
        s.stop().await?;
        (token, listed[0].registered_ms)
    };

    let s = Srv::start(dir.path()).await?;
    let listed = s.relays().await?;
    assert_eq!(listed.len(), 1);
    let info = &listed[0];
    assert!(!info.online);
    assert_eq!(info.registered_ms, registered_ms);
    assert_eq!(info.bytes_relayed, 1234);
    let relay = info.relay.as_ref().unwrap();
    assert_eq!(relay.relay_id, id(&kp));
    assert_eq!(relay.addresses, vec![RELAY_ADDR.to_string()]);
    let tokens = s
        .admin()
        .await?
        .list_tokens(s.as_admin(ListTokensRequest::default()))
        .await?
        .into_inner()
        .tokens;
    assert!(tokens[0].relay && tokens[0].uses == 1);

    // Back: registering again with the single-use token works, and watching
    // puts the relay in the maps once more.
    s.group("lab").await?;
    let node = s
        .join(
            &Keypair::generate_ed25519(),
            &s.node_token("lab").await?,
            "a",
        )
        .await?;
    let mut map = s.watch_map(&node_session(&node)).await?;
    let mut version = next(&mut map).await?.version;
    let reg = s.register(register_request(&kp, &token)).await?;
    let mut members = s.watch_members(&session(&reg)).await?;
    match member_kind(next(&mut members).await?) {
        member_update::Kind::Full(set) => assert_eq!(set.node_ids, vec![node.node_id]),
        other => panic!("expected the full set, got {other:?}"),
    }
    assert_eq!(
        next_relays(&mut map, &mut version).await[0].relay_id,
        id(&kp)
    );
    assert!(s.relays().await?[0].online);
    drop(members);
    drop(map);
    s.stop().await
}

#[tokio::test]
async fn load_updates_are_throttled_and_the_last_one_wins() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Srv::start(dir.path()).await?;
    s.group("lab").await?;
    let node = s
        .join(
            &Keypair::generate_ed25519(),
            &s.node_token("lab").await?,
            "a",
        )
        .await?;
    let mut map = s.watch_map(&node_session(&node)).await?;
    let mut version = next(&mut map).await?.version;
    let reg = s
        .register(register_request(
            &Keypair::generate_ed25519(),
            &s.relay_token(0).await?,
        ))
        .await?;
    let mut members = s.watch_members(&session(&reg)).await?;
    next(&mut members).await?;
    assert_eq!(next_relays(&mut map, &mut version).await.len(), 1);

    // A burst of significant changes right after coming online.
    for i in 1..=10u32 {
        s.report_load(
            &session(&reg),
            RelayLoad {
                reservations: i * 10,
                circuits: i,
                bytes_relayed: u64::from(i),
            },
        )
        .await?;
    }
    // At most one update per second, and the last report is what stays.
    let mut seen = Vec::new();
    let window = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(u) = tokio::time::timeout_at(window, map.message()).await {
        let u = u?.expect("stream open");
        assert!(u.version > version);
        version = u.version;
        if let Some(Kind::Relays(list)) = u.kind {
            seen.push((list.relays[0].reservations, list.relays[0].circuits));
        }
    }
    assert!(
        (1..=3).contains(&seen.len()),
        "relay-list updates in 2.5 s: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&(100, 10)));
    drop(members);
    Ok(())
}
