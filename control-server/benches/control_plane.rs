//! Control-plane benchmark: a real `control-server` process, many simulated
//! nodes joining one group and watching its network map.
//!
//! ```text
//! cargo bench -p peermesh-control-server --bench control_plane -- \
//!     --nodes 100,1000 --changes 20 --json bench-results/control_plane.json
//! ```
//!
//! For every node count N, against a fresh server and data directory:
//!
//! 1. joins: N nodes, each with its own ed25519 key and its own HTTP/2
//!    connection, connect and Join concurrently (64 in flight); the rate is
//!    N over the whole phase;
//! 2. watch: every node opens WatchNetworkMap and must first get a full map
//!    listing N-1 peers; then the bench waits until every watcher has caught up
//!    with the "online" deltas that the later watchers caused;
//! 3. propagation: K times, one node calls UpdateEndpoints with a new address
//!    (`/ip4/10.0.0.1/udp/PORT/quic-v1`, only data: nothing dials it); for every
//!    other watcher, the time from just before the RPC is sent until that
//!    watcher receives the matching PeerUpsert is one sample;
//! 4. the server's VmRSS and VmHWM with all watchers connected;
//! 5. a reconnect storm: the server is killed and started again on the same
//!    address and data; every node reconnects and watches at once; the time
//!    until all hold the group's final version, the updates each watcher got
//!    and the new server's peak RSS.
//!
//! Results: a table on stdout, JSON at `--json` (relative paths are taken from
//! the workspace root). All traffic goes to 127.0.0.1; every wait has a
//! timeout (`--timeout SECS` per phase).

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use libp2p_identity::Keypair;
use peermesh_proto::api::{
    admin_client::AdminClient, network_map_update::Kind, node_control_client::NodeControlClient,
    CreateGroupRequest, CreateTokenRequest, JoinRequest, NetworkMapUpdate, UpdateEndpointsRequest,
    WatchNetworkMapRequest,
};
use peermesh_proto::signing;
use prost::Message;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

/// Joins (and watch opens) in flight at once.
const CONCURRENCY: usize = 64;
/// Change k announces `/ip4/10.0.0.1/udp/{FIRST_PORT + k}/quic-v1`.
const ADDR_PREFIX: &str = "/ip4/10.0.0.1/udp/";
const ADDR_SUFFIX: &str = "/quic-v1";
const FIRST_PORT: u16 = 20000;
const MAX_CHANGES: usize = (u16::MAX - FIRST_PORT) as usize;

const USAGE: &str = "\
control-plane benchmark

options:
  --nodes N[,N…]   node counts to run, repeatable (default 100,1000)
  --changes K      endpoint changes to propagate per run (default 20)
  --json PATH      where to write the results; relative to the workspace root
                   (default bench-results/control_plane.json)
  --timeout SECS   limit for each phase (default 60)
Unknown flags (such as cargo's --bench) are ignored.";

struct Args {
    nodes: Vec<usize>,
    changes: usize,
    json: PathBuf,
    timeout: Duration,
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives inside the workspace")
}

fn flag_value(
    name: &str,
    inline: Option<String>,
    rest: &mut impl Iterator<Item = String>,
) -> Result<String> {
    inline
        .or_else(|| rest.next())
        .ok_or_else(|| anyhow!("{name} needs a value"))
}

fn parse_args() -> Result<Args> {
    let mut nodes = Vec::new();
    let mut changes = 20;
    let mut json = PathBuf::from("bench-results/control_plane.json");
    let mut timeout = 60;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        match flag.as_str() {
            "--nodes" => {
                for part in flag_value(&flag, inline, &mut args)?.split(',') {
                    let part = part.trim();
                    if part.is_empty() {
                        continue;
                    }
                    let n: usize = part
                        .parse()
                        .with_context(|| format!("--nodes: {part:?} is not a number"))?;
                    ensure!(n >= 2, "--nodes: {n} is too few (at least 2)");
                    nodes.push(n);
                }
            }
            "--changes" => {
                let v = flag_value(&flag, inline, &mut args)?;
                changes = v
                    .parse()
                    .with_context(|| format!("--changes: {v:?} is not a number"))?;
                ensure!(
                    (1..=MAX_CHANGES).contains(&changes),
                    "--changes must be within 1..={MAX_CHANGES}"
                );
            }
            "--json" => json = PathBuf::from(flag_value(&flag, inline, &mut args)?),
            "--timeout" => {
                let v = flag_value(&flag, inline, &mut args)?;
                timeout = v
                    .parse()
                    .with_context(|| format!("--timeout: {v:?} is not a number of seconds"))?;
                ensure!(timeout > 0, "--timeout must be positive");
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => {} // e.g. `--bench`, which `cargo bench` passes
        }
    }
    if nodes.is_empty() {
        nodes = vec![100, 1000];
    }
    Ok(Args {
        nodes,
        changes,
        json: workspace_root().join(json),
        timeout: Duration::from_secs(timeout),
    })
}

// ------------------------------------------------------------------ helpers

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2024-05-01T12:34:56Z` for seconds since the Unix epoch.
fn utc_timestamp(secs: u64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let s = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Nearest-rank percentile of sorted samples, in milliseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    ms(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Makes sure this process (and the server it starts, which inherits the
/// limit) may open `needed` file descriptors.
fn raise_nofile_limit(needed: libc::rlim_t) -> Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    let (cur, max) = (lim.rlim_cur, lim.rlim_max);
    if cur >= needed {
        return Ok(cur);
    }
    ensure!(
        max >= needed,
        "this run needs about {needed} open files but the hard limit is {max}; \
         raise it (ulimit -Hn) or run fewer nodes"
    );
    lim.rlim_cur = needed;
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(needed)
}

/// VmRSS and VmHWM of a process, in KiB.
fn server_memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn authed<T>(msg: T, credential: &str) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {credential}").parse()?);
    Ok(req)
}

async fn connect(url: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await?)
}

async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow!("{what} did not finish within {} s", limit.as_secs()))?
}

// ------------------------------------------------------------------ server

/// A running `control-server serve`; killed (and its data removed) on drop.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    fn start(bin: &Path, limit: Duration) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("peermesh-bench-")
            .tempdir()?;
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        let child = Self::spawn(bin, "127.0.0.1:0", &data, &log)?;
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data,
            log,
            _dir: dir,
        };
        server.wait_listening(limit)?;
        Ok(server)
    }

    fn spawn(bin: &Path, listen: &str, data: &Path, log: &Path) -> Result<Child> {
        Command::new(bin)
            .args(["serve", "--listen", listen, "--data"])
            .arg(data)
            // Thousands of simulated nodes from one address, in one group.
            .args(["--no-rate-limits", "--max-group-nodes", "1000000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?,
            )
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))
    }

    /// SIGKILL, then the server again on the same address and data: what
    /// its nodes see when it crashes and comes back.
    fn restart(&mut self, bin: &Path, limit: Duration) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(bin, &self.addr.to_string(), &self.data, &self.log)?;
        self.wait_listening(limit)
    }

    fn wait_listening(&mut self, limit: Duration) -> Result<()> {
        let stdout = self.child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Hand over the first line, then keep draining until the server exits.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).map_err(|_| {
                anyhow!(
                    "control-server did not report listening within {} s; its log:\n{}",
                    limit.as_secs(),
                    self.log_tail()
                )
            })?;
            if let Some(addr) = line.strip_prefix("control-server listening on ") {
                self.addr = addr.trim().parse().context("parsing the listen address")?;
                ensure!(
                    self.addr.ip().is_loopback(),
                    "server listens on {}",
                    self.addr
                );
                return Ok(());
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn admin_credential(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.data.join("admin.token"))
            .context("reading admin.token")?
            .trim()
            .to_string())
    }

    /// The end of the server's log, for error messages.
    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "control-server exited ({status}); its log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ nodes

#[derive(Clone)]
struct Node {
    id: String,
    credential: String,
    client: NodeControlClient<Channel>,
}

/// Connects its own channel and joins; returns the node and the Join RPC time.
async fn join(url: String, token: Arc<str>, key: Keypair, idx: usize) -> Result<(Node, Duration)> {
    let mut client = NodeControlClient::new(connect(&url).await?);
    let public_key = key.public().encode_protobuf();
    let name = format!("n{idx}");
    let timestamp_ms = now_ms();
    let signature = key.sign(&signing::join_payload(
        &token,
        &public_key,
        &name,
        timestamp_ms,
    ))?;
    let started = Instant::now();
    let resp = client
        .join(JoinRequest {
            token: token.to_string(),
            public_key,
            name,
            timestamp_ms,
            signature,
        })
        .await?
        .into_inner();
    let rtt = started.elapsed();
    let id = key.public().to_peer_id().to_string();
    ensure!(
        resp.node_id == id,
        "joined as {} instead of {id}",
        resp.node_id
    );
    let credential = resp.session.context("Join returned no session")?.credential;
    Ok((
        Node {
            id,
            credential,
            client,
        },
        rtt,
    ))
}

/// What the watcher tasks report to the bench.
enum Event {
    /// The first (full) map arrived and checked out, at this version.
    Ready { version: u64 },
    /// A peer carrying a bench address (`port`) arrived in an update.
    Seen {
        watcher: usize,
        node_id: String,
        port: u16,
        at: Instant,
    },
    /// The watch failed or ended.
    Failed { watcher: usize, error: String },
}

struct WatchStats {
    /// Latest version each watcher has received.
    version: Vec<AtomicU64>,
    /// Full maps received after the first one (the server's lag resyncs).
    resyncs: AtomicUsize,
    /// Updates received in all.
    updates: AtomicU64,
}

fn bench_port(addr: &str) -> Option<u16> {
    addr.strip_prefix(ADDR_PREFIX)?
        .strip_suffix(ADDR_SUFFIX)?
        .parse()
        .ok()
}

/// One node's watch stream: opens it, checks the first map, then reports
/// every bench address it sees until it is aborted.
async fn watch(
    watcher: usize,
    node: Node,
    peers: usize,
    gate: Arc<Semaphore>,
    stats: Arc<WatchStats>,
    events: mpsc::UnboundedSender<Event>,
) {
    let Node {
        id,
        credential,
        mut client,
    } = node;
    let permit = gate.acquire_owned().await;
    let opened = async {
        let mut stream = client
            .watch_network_map(authed(
                WatchNetworkMapRequest {
                    nonce: vec![0x5a; 32],
                },
                &credential,
            )?)
            .await?
            .into_inner();
        let first = stream
            .message()
            .await?
            .context("the stream ended before the first map")?;
        let first = NetworkMapUpdate::decode(first.update.as_ref())?;
        let Some(Kind::Full(map)) = &first.kind else {
            bail!("the first update is not a full map: {:?}", first.kind);
        };
        ensure!(
            map.self_node.as_ref().is_some_and(|s| s.node_id == id),
            "the map's self node is not the watcher"
        );
        // The members follow the head in parts (the watcher among them).
        let mut listed = map.peers.len();
        for _ in 0..map.parts {
            let part = stream
                .message()
                .await?
                .context("the stream ended inside the first map")?;
            match NetworkMapUpdate::decode(part.update.as_ref())?.kind {
                Some(Kind::Part(batch)) => {
                    listed += batch.peers.iter().filter(|p| p.node_id != id).count()
                }
                other => bail!("expected a part of the first map, got {other:?}"),
            }
        }
        ensure!(
            listed == peers,
            "the first map lists {listed} peers, expected {peers}"
        );
        Ok((stream, first.version))
    }
    .await;
    drop(permit);
    let mut stream = match opened {
        Ok((stream, version)) => {
            stats.version[watcher].store(version, Ordering::Release);
            let _ = events.send(Event::Ready { version });
            stream
        }
        Err(e) => {
            let _ = events.send(Event::Failed {
                watcher,
                error: format!("{e:#}"),
            });
            return;
        }
    };
    loop {
        let update: NetworkMapUpdate = match stream.message().await {
            Ok(Some(u)) => match NetworkMapUpdate::decode(u.update.as_ref()) {
                Ok(u) => u,
                Err(e) => {
                    let _ = events.send(Event::Failed {
                        watcher,
                        error: format!("undecodable update: {e}"),
                    });
                    return;
                }
            },
            Ok(None) => {
                let _ = events.send(Event::Failed {
                    watcher,
                    error: "the server ended the stream".into(),
                });
                return;
            }
            Err(status) => {
                let _ = events.send(Event::Failed {
                    watcher,
                    error: status.to_string(),
                });
                return;
            }
        };
        let at = Instant::now();
        stats.updates.fetch_add(1, Ordering::Relaxed);
        let mut report = |peer: &peermesh_proto::api::Peer| {
            for port in peer.addresses.iter().filter_map(|a| bench_port(a)) {
                let _ = events.send(Event::Seen {
                    watcher,
                    node_id: peer.node_id.clone(),
                    port,
                    at,
                });
            }
        };
        match &update.kind {
            Some(Kind::PeerUpsert(peer)) => report(peer),
            Some(Kind::Peers(batch)) | Some(Kind::Part(batch)) => {
                batch.peers.iter().for_each(&mut report)
            }
            Some(Kind::Full(map)) => {
                // A fresh map replaces what the watcher knew, so it delivers
                // the change too; it is also a sign of lag, so count it.
                stats.resyncs.fetch_add(1, Ordering::Relaxed);
                map.peers.iter().for_each(&mut report);
            }
            _ => {}
        }
        stats.version[watcher].fetch_max(update.version, Ordering::AcqRel);
    }
}

// ------------------------------------------------------------------ one run

struct RunResult {
    json: Value,
    joins_per_s: f64,
    p50: f64,
    p99: f64,
    max: f64,
    rss_mib: f64,
    peak_mib: f64,
    storm_s: f64,
    storm_peak_mib: f64,
}

/// What a reconnect storm cost.
struct Storm {
    /// From the restart until every watcher holds the group's final version.
    settled: Duration,
    /// Updates received by all watchers after their first map.
    updates: u64,
    resyncs: usize,
    /// Connections or watches tried again after failing.
    retries: usize,
}

/// Tries a node makes to reconnect and watch during the storm.
const STORM_ATTEMPTS: u32 = 20;

/// Every node opens a new connection and watch at once; waits until all
/// hold the same version and it stays put (the last presence changes are
/// out).
async fn reconnect_storm(server: &ServerProcess, nodes: &[Node], limit: Duration) -> Result<Storm> {
    let n = nodes.len();
    let url = server.url();
    let started = Instant::now();
    let stats = Arc::new(WatchStats {
        version: (0..n).map(|_| AtomicU64::new(0)).collect(),
        resyncs: AtomicUsize::new(0),
        updates: AtomicU64::new(0),
    });
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(n.max(1)));
    let retries = Arc::new(AtomicUsize::new(0));
    let mut watchers = JoinSet::new();
    for (idx, node) in nodes.iter().enumerate() {
        let (url, stats, events_tx, gate) =
            (url.clone(), stats.clone(), events_tx.clone(), gate.clone());
        let (id, credential) = (node.id.clone(), node.credential.clone());
        let retries = retries.clone();
        watchers.spawn(async move {
            // As a node does: a connection or watch that fails is tried
            // again after a short, jittered pause.
            let mut last = String::new();
            for attempt in 0..STORM_ATTEMPTS {
                if attempt > 0 {
                    retries.fetch_add(1, Ordering::Relaxed);
                    let pause = 100 + rand::random::<u64>() % (200 * u64::from(attempt));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                let client = match connect(&url).await {
                    Ok(ch) => NodeControlClient::new(ch),
                    Err(e) => {
                        last = format!("reconnecting: {e:#}");
                        continue;
                    }
                };
                let node = Node {
                    id: id.clone(),
                    credential: credential.clone(),
                    client,
                };
                let (tx, mut rx) = mpsc::unbounded_channel();
                tokio::spawn(watch(idx, node, n - 1, gate.clone(), stats.clone(), tx));
                let mut failed = false;
                while let Some(ev) = rx.recv().await {
                    match ev {
                        Event::Failed { error, .. } => {
                            if attempt == 0 && idx % 100 == 0 {
                                eprintln!("[storm] watcher {idx} (a sample): {error}");
                            }
                            last = error;
                            failed = true;
                            break;
                        }
                        ev => {
                            let _ = events_tx.send(ev);
                        }
                    }
                }
                if !failed {
                    return;
                }
            }
            let _ = events_tx.send(Event::Failed {
                watcher: idx,
                error: format!("{STORM_ATTEMPTS} attempts; the last: {last}"),
            });
        });
    }
    drop(events_tx);
    let ready = Arc::new(AtomicUsize::new(0));
    let progress = ready.clone();
    let settled = within(limit, "the reconnect storm", async {
        let ready = &*progress;
        let mut stable_since: Option<(u64, Instant)> = None;
        loop {
            while let Ok(ev) = events.try_recv() {
                match ev {
                    Event::Ready { .. } => {
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Failed { watcher, error } => bail!("watcher {watcher}: {error}"),
                    Event::Seen { .. } => {}
                }
            }
            let versions: Vec<u64> = stats
                .version
                .iter()
                .map(|v| v.load(Ordering::Acquire))
                .collect();
            let top = versions.iter().copied().max().unwrap_or(0);
            // A watcher that failed after its first map and came back is
            // counted once: by the version it holds.
            if top > 0 && versions.iter().all(|v| *v == top) {
                match stable_since {
                    Some((v, at)) if v == top => {
                        // Twice the presence interval without a change: done.
                        if at.elapsed() > Duration::from_millis(300) {
                            return Ok(at.duration_since(started));
                        }
                    }
                    _ => stable_since = Some((top, Instant::now())),
                }
            } else {
                stable_since = None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .with_context(|| {
        let versions: Vec<u64> = stats
            .version
            .iter()
            .map(|v| v.load(Ordering::Acquire))
            .collect();
        format!(
            "{} first maps received by {n} watchers, {} retries, versions {}..={}",
            ready.load(Ordering::Relaxed),
            retries.load(Ordering::Relaxed),
            versions.iter().min().unwrap_or(&0),
            versions.iter().max().unwrap_or(&0)
        )
    })?;
    let storm = Storm {
        settled,
        updates: stats.updates.load(Ordering::Relaxed),
        resyncs: stats.resyncs.load(Ordering::Relaxed),
        retries: retries.load(Ordering::Relaxed),
    };
    watchers.shutdown().await;
    Ok(storm)
}

async fn run(bin: &Path, n: usize, changes: usize, limit: Duration) -> Result<RunResult> {
    let mut server = ServerProcess::start(bin, limit)?;
    let url = server.url();
    let admin_credential = server.admin_credential()?;
    let mut admin = AdminClient::new(connect(&url).await?);
    let group = format!("bench-{n}-{}", std::process::id());
    admin
        .create_group(authed(
            CreateGroupRequest {
                name: group.clone(),
            },
            &admin_credential,
        )?)
        .await?;
    let token: Arc<str> = admin
        .create_token(authed(
            CreateTokenRequest {
                group: group.clone(),
                ttl_seconds: 3600,
                reusable: true,
                ..Default::default()
            },
            &admin_credential,
        )?)
        .await?
        .into_inner()
        .token
        // Join carries the secret; the fingerprint after it is the client's.
        .parse::<peermesh_proto::token::JoinToken>()?
        .secret
        .into();
    let keys: Vec<Keypair> = (0..n).map(|_| Keypair::generate_ed25519()).collect();
    let (rss_idle, _) = server_memory(server.pid())?;

    // Phase 1: joins, each node on its own connection.
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let started = Instant::now();
    let (nodes, mut join_rtts) = within(limit, "the join phase", async {
        let mut tasks = JoinSet::new();
        for (idx, key) in keys.into_iter().enumerate() {
            let (gate, url, token) = (gate.clone(), url.clone(), token.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await?;
                let joined = join(url, token, key, idx).await;
                joined
                    .map(|(node, rtt)| (idx, node, rtt))
                    .with_context(|| format!("node {idx} joining"))
            });
        }
        let mut nodes: Vec<Option<Node>> = (0..n).map(|_| None).collect();
        let mut rtts = Vec::with_capacity(n);
        while let Some(done) = tasks.join_next().await {
            let (idx, node, rtt) = done??;
            nodes[idx] = Some(node);
            rtts.push(rtt);
        }
        let nodes: Vec<Node> = nodes.into_iter().map(|n| n.expect("joined")).collect();
        Ok((nodes, rtts))
    })
    .await?;
    let join_phase = started.elapsed();
    let joins_per_s = n as f64 / join_phase.as_secs_f64();
    join_rtts.sort();
    let (rss_joined, _) = server_memory(server.pid())?;
    eprintln!(
        "[{n} nodes] joins: {:.2} s, {joins_per_s:.0}/s (Join RPC p50 {:.1} ms, p99 {:.1} ms)",
        join_phase.as_secs_f64(),
        percentile(&join_rtts, 50.0),
        percentile(&join_rtts, 99.0)
    );

    // Phase 2a: every node watches; each first map must list the N-1 others.
    let stats = Arc::new(WatchStats {
        version: (0..n).map(|_| AtomicU64::new(0)).collect(),
        resyncs: AtomicUsize::new(0),
        updates: AtomicU64::new(0),
    });
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watchers = JoinSet::new();
    let started = Instant::now();
    for (idx, node) in nodes.iter().enumerate() {
        watchers.spawn(watch(
            idx,
            node.clone(),
            n - 1,
            gate.clone(),
            stats.clone(),
            events_tx.clone(),
        ));
    }
    drop(events_tx);
    let target_version = within(limit, "opening the watches", async {
        let (mut ready, mut top) = (0, 0);
        while ready < n {
            match events.recv().await.context("the watchers are gone")? {
                Event::Ready { version } => {
                    ready += 1;
                    top = top.max(version);
                }
                Event::Failed { watcher, error } => bail!("watcher {watcher}: {error}"),
                Event::Seen { .. } => {}
            }
        }
        Ok(top)
    })
    .await?;
    let watch_open = started.elapsed();
    // Every watch published its node going online; when the last first map
    // was built the group was at `target_version`. Wait until every watcher
    // has received all of it, so the changes below meet a quiet system.
    within(limit, "watchers catching up", async {
        loop {
            while let Ok(ev) = events.try_recv() {
                if let Event::Failed { watcher, error } = ev {
                    bail!("watcher {watcher}: {error}");
                }
            }
            let behind = stats
                .version
                .iter()
                .filter(|v| v.load(Ordering::Acquire) < target_version)
                .count();
            if behind == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await?;
    let watch_settled = started.elapsed();
    let (rss_watching, _) = server_memory(server.pid())?;
    let updates_settle = stats.updates.load(Ordering::Relaxed);
    let resyncs_settle = stats.resyncs.load(Ordering::Relaxed);
    eprintln!(
        "[{n} nodes] watch: all first maps after {:.2} s, all caught up (version {target_version}, \
         {updates_settle} deltas delivered, {resyncs_settle} resyncs) after {:.2} s",
        watch_open.as_secs_f64(),
        watch_settled.as_secs_f64()
    );

    // Phase 2b: propagation of endpoint changes.
    let mut latencies = Vec::with_capacity(changes * (n - 1));
    let mut rpc_rtts = Vec::with_capacity(changes);
    let mut completions = Vec::with_capacity(changes);
    within(limit, "the propagation phase", async {
        for k in 0..changes {
            let changer = k % n;
            let port = FIRST_PORT + k as u16;
            let node = &nodes[changer];
            let req = authed(
                UpdateEndpointsRequest {
                    addresses: vec![format!("{ADDR_PREFIX}{port}{ADDR_SUFFIX}")],
                },
                &node.credential,
            )?;
            let mut client = node.client.clone();
            let sent = Instant::now();
            client
                .update_endpoints(req)
                .await
                .with_context(|| format!("change {k}: UpdateEndpoints"))?;
            rpc_rtts.push(sent.elapsed());
            let mut got = vec![false; n];
            got[changer] = true; // its own echo is not propagation
            let mut missing = n - 1;
            let mut last = Duration::ZERO;
            while missing > 0 {
                match events.recv().await.context("the watchers are gone")? {
                    Event::Seen {
                        watcher,
                        node_id,
                        port: p,
                        at,
                    } if p == port && node_id == node.id && !got[watcher] => {
                        got[watcher] = true;
                        missing -= 1;
                        let latency = at.saturating_duration_since(sent);
                        last = last.max(latency);
                        latencies.push(latency);
                    }
                    Event::Failed { watcher, error } => {
                        bail!("change {k}: watcher {watcher}: {error} ({missing} watchers still waiting)")
                    }
                    _ => {}
                }
            }
            completions.push(last);
        }
        Ok(())
    })
    .await?;
    latencies.sort();
    rpc_rtts.sort();
    completions.sort();
    let resyncs = stats.resyncs.load(Ordering::Relaxed);

    // Phase 3: server memory with every watcher connected.
    server.check_alive()?;
    let (rss, peak) = server_memory(server.pid())?;
    let (p50, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 100.0),
    );
    eprintln!(
        "[{n} nodes] propagation: {} samples, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; \
         server RSS {:.1} MiB (peak {:.1} MiB)",
        latencies.len(),
        mib(rss),
        mib(peak)
    );

    watchers.shutdown().await;
    drop(events);

    // Phase 4: the server crashes and comes back; every node reconnects and
    // watches again at once (sessions are durable, so no re-authentication).
    server.restart(bin, limit)?;
    let storm = reconnect_storm(&server, &nodes, limit).await?;
    server.check_alive()?;
    let (_, storm_peak) = server_memory(server.pid())?;
    eprintln!(
        "[{n} nodes] reconnect storm: all {n} watching and caught up after {:.2} s; \
         {:.1} updates per watcher, {} resyncs, {} retries; server peak RSS {:.1} MiB",
        storm.settled.as_secs_f64(),
        storm.updates as f64 / n as f64,
        storm.resyncs,
        storm.retries,
        mib(storm_peak)
    );
    drop(nodes);
    drop(server);

    let mean = if latencies.is_empty() {
        f64::NAN
    } else {
        ms(latencies.iter().sum::<Duration>()) / latencies.len() as f64
    };
    let json = json!({
        "nodes": n,
        "changes": changes,
        "joins_per_s": round2(joins_per_s),
        "join_phase_s": round2(join_phase.as_secs_f64()),
        "join_concurrency": CONCURRENCY,
        "join_rpc_ms": {
            "p50": round2(percentile(&join_rtts, 50.0)),
            "p99": round2(percentile(&join_rtts, 99.0)),
            "max": round2(percentile(&join_rtts, 100.0)),
        },
        "watch_all_first_maps_s": round2(watch_open.as_secs_f64()),
        "watch_all_caught_up_s": round2(watch_settled.as_secs_f64()),
        "watch_final_version": target_version,
        "watch_deltas_delivered": updates_settle,
        "propagation_ms": {
            "samples": latencies.len(),
            "p50": round2(p50),
            "p99": round2(p99),
            "max": round2(max),
            "mean": round2(mean),
        },
        "change_to_last_watcher_ms_p50": round2(percentile(&completions, 50.0)),
        "update_endpoints_rpc_ms_p50": round2(percentile(&rpc_rtts, 50.0)),
        "resyncs": resyncs,
        "server_rss_mib": round2(mib(rss)),
        "server_peak_rss_mib": round2(mib(peak)),
        "server_rss_idle_mib": round2(mib(rss_idle)),
        "server_rss_after_joins_mib": round2(mib(rss_joined)),
        "server_rss_all_watching_mib": round2(mib(rss_watching)),
        "reconnect_storm": {
            "all_caught_up_s": round2(storm.settled.as_secs_f64()),
            "updates_per_watcher": round2(storm.updates as f64 / n as f64),
            "resyncs": storm.resyncs,
            "retries": storm.retries,
            "server_peak_rss_mib": round2(mib(storm_peak)),
        },
    });
    Ok(RunResult {
        json,
        joins_per_s,
        p50,
        p99,
        max,
        rss_mib: mib(rss),
        peak_mib: mib(peak),
        storm_s: storm.settled.as_secs_f64(),
        storm_peak_mib: mib(storm_peak),
    })
}

fn machine_info() -> Value {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    // Other work on the machine skews the numbers; record how busy it was.
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    json!({
        "nproc": nproc,
        "loadavg_at_end": loadavg,
        "cpu": cpu,
        "kernel": kernel,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

fn print_table(results: &[RunResult]) {
    let header = [
        "nodes",
        "joins/s",
        "change→all watchers p50 ms",
        "p99 ms",
        "max ms",
        "server RSS MiB",
        "peak RSS MiB",
        "reconnect storm s",
        "storm peak RSS MiB",
    ];
    let rows: Vec<[String; 9]> = results
        .iter()
        .map(|r| {
            [
                r.json["nodes"].to_string(),
                format!("{:.0}", r.joins_per_s),
                format!("{:.2}", r.p50),
                format!("{:.2}", r.p99),
                format!("{:.2}", r.max),
                format!("{:.1}", r.rss_mib),
                format!("{:.1}", r.peak_mib),
                format!("{:.2}", r.storm_s),
                format!("{:.1}", r.storm_peak_mib),
            ]
        })
        .collect();
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([header[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cells: &[String]| {
        let cells: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}", w = *w))
            .collect();
        println!("| {} |", cells.join(" | "));
    };
    line(&header.map(String::from));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", rule.join("-|-"));
    for r in &rows {
        line(r);
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_control-server"));
    ensure!(
        bin.exists(),
        "{} is missing; build it with `cargo build --release -p peermesh-control-server --bin control-server`",
        bin.display()
    );
    let largest = args.nodes.iter().copied().max().unwrap_or(0);
    // One connection per node here, one per node in the server, plus slack.
    raise_nofile_limit((2 * largest + 512) as libc::rlim_t)?;
    eprintln!(
        "control-plane bench: server {}, nodes {:?}, {} changes per run",
        bin.display(),
        args.nodes,
        args.changes
    );

    let mut results = Vec::new();
    for &n in &args.nodes {
        let result = run(&bin, n, args.changes, args.timeout)
            .await
            .with_context(|| format!("the run with {n} nodes"))?;
        results.push(result);
    }

    print_table(&results);
    let report = json!({
        "benchmark": "control_plane",
        "date": utc_timestamp(now_ms() / 1000),
        "machine": machine_info(),
        "results": results.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!("results written to {}", args.json.display());
    Ok(())
}
