//! Shared helpers of the gRPC tests: an in-process control server on a
//! loopback port with its own data directory, clients, and signed requests.

#![allow(dead_code)] // each test binary uses its own subset

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p_identity::Keypair;
use peermesh_control_server::Server;
use peermesh_proto::api::{
    admin_client::AdminClient, node_control_client::NodeControlClient, AuthenticateRequest,
    CreateGroupRequest, CreateTokenRequest, CreateTokenResponse, GroupInfo, JoinRequest,
    JoinResponse, LinkEntry, LinkTableRequest, ListGroupsRequest, ListNodesRequest,
    ListTokensRequest, NodeInfo, TokenInfo,
};
use peermesh_proto::signing;
use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

pub type Admin = AdminClient<Channel>;
pub type Node = NodeControlClient<Channel>;

/// A control server serving on 127.0.0.1 until dropped.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub admin_credential: String,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(peermesh_control_server::server::Options::default()).await
    }

    /// A server with other limits or certificate than the defaults.
    pub async fn start_with(options: peermesh_control_server::server::Options) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Server::bind_with("127.0.0.1:0".parse().unwrap(), dir.path(), options)
            .await
            .expect("bind");
        let addr = server.local_addr().expect("local addr");
        let admin_credential = std::fs::read_to_string(
            dir.path()
                .join(peermesh_control_server::server::ADMIN_TOKEN_FILE),
        )
        .expect("admin.token")
        .trim()
        .to_string();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(server.serve(async {
            let _ = rx.await;
        }));
        Self {
            dir,
            addr,
            admin_credential,
            shutdown: Some(tx),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn admin(&self) -> Admin {
        AdminClient::new(self.channel().await)
    }

    pub async fn node(&self) -> Node {
        NodeControlClient::new(self.channel().await)
    }

    /// A request carrying the admin credential.
    pub fn as_admin<T>(&self, msg: T) -> Request<T> {
        bearer(msg, &self.admin_credential)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A watch request with a fresh nonce (the stream's full maps are signed
/// over it).
pub fn watch_request() -> peermesh_proto::api::WatchNetworkMapRequest {
    let mut nonce = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
    peermesh_proto::api::WatchNetworkMapRequest { nonce }
}

/// The update a signed stream message carries (the signature is checked by
/// the node's tests; here only the content matters).
pub fn unsigned(
    signed: &peermesh_proto::api::SignedMapUpdate,
) -> peermesh_proto::api::NetworkMapUpdate {
    prost::Message::decode(signed.update.as_ref()).expect("a NetworkMapUpdate")
}

/// A watch stream read as plain map updates, full maps put together from
/// their parts.
pub struct MapWatch(pub tonic::Streaming<peermesh_proto::api::SignedMapUpdate>);

impl MapWatch {
    pub async fn message(
        &mut self,
    ) -> Result<Option<peermesh_proto::api::NetworkMapUpdate>, Status> {
        next_update(&mut self.0).await
    }
}

/// The next update of a raw watch stream; a full map comes whole (its head
/// and the parts that follow it, put together).
pub async fn next_update(
    stream: &mut tonic::Streaming<peermesh_proto::api::SignedMapUpdate>,
) -> Result<Option<peermesh_proto::api::NetworkMapUpdate>, Status> {
    use peermesh_proto::api::network_map_update::Kind;
    let Some(signed) = stream.message().await? else {
        return Ok(None);
    };
    let mut update = unsigned(&signed);
    if !matches!(update.kind, Some(Kind::Full(_))) {
        return Ok(Some(update));
    }
    if let Some(Kind::Full(head)) = update.kind.take() {
        let mut parts = Vec::new();
        for _ in 0..head.parts {
            let part = stream.message().await?.expect("the map's next part");
            match unsigned(&part).kind {
                Some(Kind::Part(p)) => parts.push(p),
                other => panic!("expected a part of the full map, got {other:?}"),
            }
        }
        update.kind = Some(Kind::Full(peermesh_proto::signing::assemble_map(
            head, parts,
        )));
    }
    Ok(Some(update))
}

/// A stream of messages: a gRPC stream, or a [`MapWatch`].
#[allow(async_fn_in_trait)]
pub trait Messages {
    type Item;
    async fn next_message(&mut self) -> Result<Option<Self::Item>, Status>;
}

impl<T> Messages for tonic::Streaming<T> {
    type Item = T;
    async fn next_message(&mut self) -> Result<Option<T>, Status> {
        self.message().await
    }
}

impl Messages for MapWatch {
    type Item = peermesh_proto::api::NetworkMapUpdate;
    async fn next_message(&mut self) -> Result<Option<Self::Item>, Status> {
        self.message().await
    }
}

/// `msg` with `authorization: Bearer <credential>`.
pub fn bearer<T>(msg: T, credential: &str) -> Request<T> {
    with_authorization(msg, &format!("Bearer {credential}"))
}

/// `msg` with the raw `authorization` value `value`.
pub fn with_authorization<T>(msg: T, value: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(value).expect("ASCII metadata"),
    );
    req
}

/// Milliseconds since the epoch, strictly increasing within the process so
/// that no two signed requests of one key share a timestamp by accident.
pub fn timestamp_ms() -> u64 {
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

pub fn join_request(kp: &Keypair, token: &str, name: &str) -> JoinRequest {
    join_request_at(kp, token, name, timestamp_ms())
}

pub fn join_request_at(kp: &Keypair, token: &str, name: &str, ts: u64) -> JoinRequest {
    let token = &secret(token);
    let public_key = kp.public().encode_protobuf();
    let signature = kp
        .sign(&signing::join_payload(token, &public_key, name, ts))
        .expect("ed25519 signs");
    JoinRequest {
        token: token.to_string(),
        public_key,
        name: name.to_string(),
        timestamp_ms: ts,
        signature,
    }
}

pub fn auth_request(kp: &Keypair, server_id: &str) -> AuthenticateRequest {
    let public_key = kp.public().encode_protobuf();
    let ts = timestamp_ms();
    let signature = kp
        .sign(&signing::auth_payload(server_id, &public_key, ts))
        .expect("ed25519 signs");
    AuthenticateRequest {
        public_key,
        timestamp_ms: ts,
        signature,
    }
}

pub async fn create_group(server: &TestServer, admin: &mut Admin, name: &str) -> GroupInfo {
    admin
        .create_group(server.as_admin(CreateGroupRequest {
            name: name.to_string(),
        }))
        .await
        .expect("create group")
        .into_inner()
}

pub async fn create_token(
    server: &TestServer,
    admin: &mut Admin,
    group: &str,
    ttl_seconds: u64,
    max_uses: u32,
) -> CreateTokenResponse {
    admin
        .create_token(server.as_admin(CreateTokenRequest {
            group: group.to_string(),
            ttl_seconds,
            max_uses,
            // 0 here: any number of uses (the admin API's default is one).
            reusable: max_uses == 0,
            ..Default::default()
        }))
        .await
        .expect("create token")
        .into_inner()
}

/// The secret of a token as `create-token` prints it (`pmj_SECRET_PIN`):
/// what a JoinRequest carries. Anything else (the bad-input tests' garbage)
/// passes unchanged.
pub fn secret(token: &str) -> String {
    token
        .parse::<peermesh_proto::token::JoinToken>()
        .map_or_else(|_| token.to_string(), |t| t.secret)
}

/// A node that joined: its key, the join answer and the request that got it.
pub struct Member {
    pub kp: Keypair,
    pub request: JoinRequest,
    pub joined: JoinResponse,
}

impl Member {
    pub fn credential(&self) -> &str {
        &self
            .joined
            .session
            .as_ref()
            .expect("join returns a session")
            .credential
    }

    pub fn node_id(&self) -> &str {
        &self.joined.node_id
    }
}

pub async fn join(node: &mut Node, token: &str, name: &str) -> Member {
    let kp = Keypair::generate_ed25519();
    let request = join_request(&kp, token, name);
    let joined = node.join(request.clone()).await.expect("join").into_inner();
    Member {
        kp,
        request,
        joined,
    }
}

/// Everything the admin API shows, to check that refused calls changed
/// nothing.
#[derive(Debug, PartialEq)]
pub struct State {
    pub groups: Vec<GroupInfo>,
    pub tokens: Vec<TokenInfo>,
    pub nodes: Vec<NodeInfo>,
    pub links: Vec<LinkEntry>,
}

pub async fn state(server: &TestServer, admin: &mut Admin) -> State {
    State {
        groups: admin
            .list_groups(server.as_admin(ListGroupsRequest {}))
            .await
            .expect("list groups")
            .into_inner()
            .groups,
        tokens: admin
            .list_tokens(server.as_admin(ListTokensRequest::default()))
            .await
            .expect("list tokens")
            .into_inner()
            .tokens,
        nodes: admin
            .list_nodes(server.as_admin(ListNodesRequest::default()))
            .await
            .expect("list nodes")
            .into_inner()
            .nodes,
        links: admin
            .link_table(server.as_admin(LinkTableRequest::default()))
            .await
            .expect("link table")
            .into_inner()
            .links,
    }
}

/// Asserts that `result` failed with `code` and a message that mentions
/// `needle` (so that it tells a human what was wrong).
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needle: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} ({needle}), got a success: {v:?}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "wrong code (wanted the one for {needle:?}); message: {:?}",
                status.message()
            );
            assert!(
                status.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                status.message()
            );
        }
    }
}
