//! A control server killed with SIGKILL in the middle of 200 concurrent
//! joins and revocations, and one whose data directory fills up: after a
//! restart every token's use count matches the nodes that exist, every join
//! that was answered is there, and no watcher ever saw a node that the
//! store does not have.
//!
//! The server runs as its own process (the real binary), so that the kill
//! is a real crash: no destructor, no flush.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bearer, join_request, watch_request, Admin, Node};
use libp2p_identity::Keypair;
use peermesh_proto::api::network_map_update::Kind;
use peermesh_proto::api::{
    admin_client::AdminClient, node_control_client::NodeControlClient, CreateGroupRequest,
    CreateTokenRequest, ListNodesRequest, ListTokensRequest, NodeInfo, RevokeTokenRequest,
    TokenInfo,
};
use rand::Rng;
use tonic::transport::Channel;

/// Joins started at once in each round.
const JOINS: usize = 200;
/// Tokens the joins draw from (each good for more uses than it will see,
/// so that a refusal is a revocation, never a used-up token).
const TOKENS: usize = 20;
/// Of the tokens, how many are revoked during a round.
const REVOCATIONS: usize = 5;

/// The control server as a child process on a fixed loopback port.
struct Proc {
    child: Child,
    addr: SocketAddr,
    data: PathBuf,
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

impl Proc {
    async fn start(addr: SocketAddr, data: &Path) -> Self {
        let log = std::fs::File::create(data.with_extension("log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_control-server"))
            .args(["serve", "--no-rate-limits", "--listen"])
            .arg(addr.to_string())
            .arg("--data")
            .arg(data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn control-server");
        let p = Self {
            child,
            addr,
            data: data.to_path_buf(),
        };
        for _ in 0..200 {
            if p.try_channel().await.is_some() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the control server did not start; its log:\n{}",
            std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
        );
    }

    async fn try_channel(&self) -> Option<Channel> {
        Channel::from_shared(format!("http://{}", self.addr))
            .ok()?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .ok()
    }

    async fn channel(&self) -> Channel {
        self.try_channel().await.expect("connect")
    }

    fn admin_credential(&self) -> String {
        std::fs::read_to_string(
            self.data
                .join(peermesh_control_server::server::ADMIN_TOKEN_FILE),
        )
        .expect("admin.token")
        .trim()
        .to_string()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the clients learned while the server ran: the nodes whose join was
/// answered, and every node a watcher was shown.
#[derive(Default)]
struct Seen {
    answered: HashSet<String>,
    watched: HashSet<String>,
}

struct Admin2 {
    client: Admin,
    credential: String,
}

impl Admin2 {
    async fn new(p: &Proc) -> Self {
        Self {
            client: AdminClient::new(p.channel().await),
            credential: p.admin_credential(),
        }
    }

    async fn tokens(&mut self) -> Vec<TokenInfo> {
        self.client
            .list_tokens(bearer(ListTokensRequest::default(), &self.credential))
            .await
            .expect("list tokens")
            .into_inner()
            .tokens
    }

    async fn nodes(&mut self) -> Vec<NodeInfo> {
        self.client
            .list_nodes(bearer(ListNodesRequest::default(), &self.credential))
            .await
            .expect("list nodes")
            .into_inner()
            .nodes
    }

    async fn token(&mut self, max_uses: u32) -> String {
        self.client
            .create_token(bearer(
                CreateTokenRequest {
                    group: "g".into(),
                    max_uses,
                    ..Default::default()
                },
                &self.credential,
            ))
            .await
            .expect("create token")
            .into_inner()
            .token
    }
}

/// The invariants after a restart: token use counts equal the nodes each
/// token let in, every answered join exists, every watched node exists.
async fn check(p: &Proc, seen: &Seen, round: &str) {
    let mut admin = Admin2::new(p).await;
    let nodes = admin.nodes().await;
    let ids: HashSet<&str> = nodes.iter().map(|n| n.node_id.as_str()).collect();
    let mut per_token: BTreeMap<&str, u32> = BTreeMap::new();
    for n in &nodes {
        *per_token.entry(n.token_id.as_str()).or_default() += 1;
    }
    for t in admin.tokens().await {
        assert_eq!(
            t.uses,
            per_token.get(t.token_id.as_str()).copied().unwrap_or(0),
            "{round}: token {} counts {} uses, but that many nodes do not exist",
            t.token_id,
            t.uses
        );
    }
    for id in &seen.answered {
        assert!(
            ids.contains(id.as_str()),
            "{round}: node {id} was told it joined, but the store lost it"
        );
    }
    for id in &seen.watched {
        assert!(
            ids.contains(id.as_str()),
            "{round}: a watcher saw node {id}, which the store does not have"
        );
    }
}

/// Starts a watcher (a member of the group) that records every node it is
/// shown until the server dies.
async fn watch(p: &Proc, token: &str, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    let mut node: Node = NodeControlClient::new(p.channel().await);
    let kp = Keypair::generate_ed25519();
    let joined = node
        .join(join_request(&kp, token, "watcher"))
        .await
        .expect("watcher joins")
        .into_inner();
    seen.lock().unwrap().answered.insert(joined.node_id.clone());
    let credential = joined.session.expect("a session").credential;
    let mut stream = node
        .watch_network_map(bearer(watch_request(), &credential))
        .await
        .expect("watch")
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(update)) = common::next_update(&mut stream).await {
            let mut s = seen.lock().unwrap();
            match update.kind {
                Some(Kind::Full(m)) => {
                    s.watched.extend(m.peers.into_iter().map(|p| p.node_id));
                }
                Some(Kind::PeerUpsert(p)) => {
                    s.watched.insert(p.node_id);
                }
                Some(Kind::Peers(b)) => {
                    s.watched.extend(b.peers.into_iter().map(|p| p.node_id));
                }
                _ => {}
            }
        }
    })
}

/// 200 joins with fresh keys over `tokens`, and revocations of some of
/// the tokens, all at once; the answered joins go to `seen`.
fn storm(
    p: &Proc,
    channel: Channel,
    credential: String,
    tokens: Vec<String>,
    seen: Arc<Mutex<Seen>>,
) -> tokio::task::JoinSet<()> {
    let _ = p;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..JOINS {
        let token = tokens[i % tokens.len()].clone();
        let channel = channel.clone();
        let seen = seen.clone();
        tasks.spawn(async move {
            let mut node: Node = NodeControlClient::new(channel);
            let kp = Keypair::generate_ed25519();
            if let Ok(r) = node.join(join_request(&kp, &token, &format!("n{i}"))).await {
                seen.lock().unwrap().answered.insert(r.into_inner().node_id);
            }
        });
    }
    for token in tokens.into_iter().take(REVOCATIONS) {
        let channel = channel.clone();
        let credential = credential.clone();
        tasks.spawn(async move {
            let mut admin: Admin = AdminClient::new(channel);
            let _ = admin
                .revoke_token(bearer(
                    RevokeTokenRequest {
                        token,
                        keep_nodes: false,
                    },
                    &credential,
                ))
                .await;
        });
    }
    tasks
}

/// One round: tokens, a watcher, the storm, a SIGKILL after `kill_after`,
/// a restart and the checks.
async fn round(p: &mut Proc, kill_after: Duration, name: &str) {
    let mut admin = Admin2::new(p).await;
    let mut tokens = Vec::new();
    for _ in 0..TOKENS {
        tokens.push(admin.token(JOINS as u32).await);
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watcher = watch(p, &tokens[TOKENS - 1], seen.clone()).await;
    let tasks = storm(
        p,
        p.channel().await,
        admin.credential.clone(),
        tokens,
        seen.clone(),
    );
    tokio::time::sleep(kill_after).await;
    p.kill9();
    drop(tasks);
    watcher.abort();
    let _ = watcher.await;
    let answered = seen.lock().unwrap().answered.len();
    *p = Proc::start(p.addr, &p.data.clone()).await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    check(p, &seen, name).await;
    eprintln!(
        "{name}: killed after {kill_after:?}; {answered} joins answered, {} nodes watched, \
         all present after the restart",
        seen.watched.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_joins_and_revocations_loses_nothing_half_done() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut p = Proc::start(free_port(), &data).await;
    let mut admin = Admin2::new(&p).await;
    admin
        .client
        .create_group(bearer(
            CreateGroupRequest { name: "g".into() },
            &admin.credential,
        ))
        .await
        .expect("create group");
    let mut rng = rand::thread_rng();
    for i in 0..4 {
        let kill_after = Duration::from_millis(rng.gen_range(20..600));
        round(&mut p, kill_after, &format!("round {i}")).await;
    }
}

/// A tmpfs of a few MiB holds the data directory; a filler file takes the
/// rest of it, so that the storm's writes fail. The server answers errors
/// (not lies), and after space is freed and the server restarts the
/// invariants hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_joins_loses_nothing_half_done() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "peermesh-crash-test"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true: mounting a tmpfs (needs root) must work for the full-disk test"
        );
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let data = mnt.join("data");
    let mut p = Proc::start(free_port(), &data).await;
    let mut admin = Admin2::new(&p).await;
    admin
        .client
        .create_group(bearer(
            CreateGroupRequest { name: "g".into() },
            &admin.credential,
        ))
        .await
        .expect("create group");
    let mut tokens = Vec::new();
    for _ in 0..TOKENS {
        tokens.push(admin.token(JOINS as u32).await);
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watcher = watch(&p, &tokens[TOKENS - 1], seen.clone()).await;
    // Fill the filesystem.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut tasks = storm(
        &p,
        p.channel().await,
        admin.credential.clone(),
        tokens,
        seen.clone(),
    );
    let all = async { while tasks.join_next().await.is_some() {} };
    // The server may fail every write, or die; either way the storm ends.
    let _ = tokio::time::timeout(Duration::from_secs(60), all).await;
    let answered = seen.lock().unwrap().answered.len();
    p.kill9();
    watcher.abort();
    let _ = watcher.await;
    std::fs::remove_file(&filler).unwrap();
    let p = Proc::start(p.addr, &data).await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    check(&p, &seen, "full disk").await;
    eprintln!(
        "full disk: {answered} of {JOINS} joins answered, {} nodes watched, all present after \
         the restart",
        seen.watched.len()
    );
}
