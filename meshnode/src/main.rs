//! `meshnode`: run a peermesh node, or ask a running one for its status.

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use peermesh_base::status::NodeStatus;
use peermesh_base::{path_name, PathKind};
use peermesh_meshnode::api::{self, Client};
use peermesh_meshnode::{messages, server};
use peermesh_node::local_api::socket_path;
use peermesh_node::{Endpoint, EndpointConfig, NodeError, ProtocolId, PunchMode, Router, Stopped};
use peermesh_relay::{RelayConfig, RelayError};

#[derive(Parser)]
#[command(name = "meshnode", version, about = "A peermesh mesh node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PunchArg {
    Control,
    Dcutr,
    Both,
}

#[derive(Subcommand)]
enum Command {
    /// Join the mesh and run the node in the foreground.
    Up {
        /// Control server URL (remembered after the first run):
        /// https://HOST:PORT, or http:// to loopback.
        #[arg(long)]
        control: Option<String>,
        /// Join token (it pins the server's key); needed only for the first
        /// run with this --state.
        #[arg(long, env = "PEERMESH_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Allow plaintext (http://) to a control server that is not on
        /// loopback: tokens and credentials cross the network unencrypted
        /// (maps stay signed). Only on a network you trust.
        #[arg(long)]
        insecure: bool,
        /// State directory: identity key, membership, local API socket.
        #[arg(long)]
        state: PathBuf,
        /// Node name (a DNS label); defaults to the host name.
        #[arg(long)]
        name: Option<String>,
        /// An address (multiaddr) to publish for this node; repeatable.
        #[arg(long)]
        advertise: Vec<String>,
        /// UDP address of the mesh endpoint (QUIC).
        #[arg(long, default_value = "0.0.0.0:0")]
        listen: SocketAddr,
        /// How direct paths are punched: `control` (rendezvous through the
        /// control server, with port prediction), `dcutr` (libp2p DCUtR
        /// over the relay) or `both` (DCUtR's early dials can take the
        /// mapping that prediction names on a sequential NAT).
        #[arg(long, value_enum, default_value_t = PunchArg::Control)]
        punch: PunchArg,
        /// Do not forward traffic between other members that have no direct
        /// path to each other.
        #[arg(long)]
        no_forward: bool,
        /// Create the virtual network interface (TUN) with this node's mesh
        /// addresses (needs root or CAP_NET_ADMIN).
        #[arg(long)]
        tun: bool,
        /// Name of the TUN interface.
        #[arg(long, default_value = peermesh_tun::DEFAULT_NAME)]
        tun_name: String,
        /// MTU of the TUN interface (1280..=65535); the mesh carries whole
        /// packets up to it.
        #[arg(long, default_value_t = peermesh_tun::DEFAULT_MTU)]
        tun_mtu: u16,
        /// The origin (hosting server) that `meshnode get` fetches manifests
        /// and missing chunks from, e.g. http://10.0.0.1:8080 (a `get
        /// --origin` overrides it).
        #[arg(long, value_name = "URL")]
        origin: Option<String>,
        /// Size limit of the chunk cache (STATE/content/chunks), in bytes or with a unit:
        /// 64MiB, 1.5GiB, 500MB, 4096. The least recently used chunks are evicted to keep
        /// under it, never those of a fetch in progress. Default: no limit.
        #[arg(long, value_name = "SIZE", value_parser = peermesh_content::parse_size)]
        cache_size: Option<u64>,
        /// Also serve this message protocol to local programs (`recv
        /// --protocol NAME`), e.g. one an application that embeds an
        /// endpoint speaks; repeatable.
        #[arg(long = "protocol", value_name = "NAME")]
        protocols: Vec<String>,
        /// Let this user (a numeric uid) read the node's status and events
        /// through the local API; repeatable. Commands stay with the
        /// state directory's owner and root.
        #[arg(long = "status-uid", value_name = "UID")]
        status_uids: Vec<u32>,
    },
    /// Run a relay server that registers in the control server's directory.
    Relay {
        /// UDP address to listen on (QUIC); also advertised unless --external.
        #[arg(long)]
        listen: SocketAddr,
        /// Public address to advertise (multiaddr); repeatable.
        #[arg(long)]
        external: Vec<String>,
        #[arg(long)]
        control: String,
        /// A relay token (`control-server admin create-token --relay`).
        #[arg(long, env = "PEERMESH_RELAY_TOKEN", hide_env_values = true)]
        token: String,
        /// Allow plaintext (http://) to a control server that is not on
        /// loopback.
        #[arg(long)]
        insecure: bool,
        /// Directory for the relay's identity key.
        #[arg(long, default_value = "./relay-state")]
        state: PathBuf,
        #[arg(long, default_value = "")]
        region: String,
        /// Circuits one node may hold open at once.
        #[arg(long, default_value_t = 64)]
        max_circuits_per_node: usize,
    },
    /// Send messages to a peer (id or name): the arguments, or `--count N`
    /// numbered messages, or lines from stdin with `-`.
    Send {
        #[arg(long)]
        state: PathBuf,
        peer: String,
        messages: Vec<String>,
        /// Send N numbered messages `PREFIX-0` … `PREFIX-(N-1)`.
        #[arg(long)]
        count: Option<u64>,
        #[arg(long, default_value = "msg")]
        prefix: String,
        /// The protocol to use (default: the messages protocol,
        /// /peermesh/message/1).
        #[arg(long, value_name = "NAME")]
        protocol: Option<String>,
    },
    /// Print messages from peers as they arrive.
    Recv {
        #[arg(long)]
        state: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// The protocol to use (default: the messages protocol,
        /// /peermesh/message/1).
        #[arg(long, value_name = "NAME")]
        protocol: Option<String>,
    },
    /// Throughput test: send BYTES to a peer in SIZE-byte messages made by
    /// the node (run `meshnode sink` on the peer first).
    Blast {
        #[arg(long)]
        state: PathBuf,
        peer: String,
        #[arg(long, default_value_t = 256 << 20)]
        bytes: u64,
        #[arg(long, default_value_t = 64 << 10)]
        size: usize,
        /// The protocol to use (default: the messages protocol,
        /// /peermesh/message/1).
        #[arg(long, value_name = "NAME")]
        protocol: Option<String>,
    },
    /// Throughput test, receiving side: discard messages, and exit after
    /// BYTES with the rate from the first byte to the last.
    Sink {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        bytes: u64,
        /// Give up after this many seconds without reaching BYTES.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[arg(long)]
        json: bool,
        /// The protocol to use (default: the messages protocol,
        /// /peermesh/message/1).
        #[arg(long, value_name = "NAME")]
        protocol: Option<String>,
    },
    /// Show a peer's RTT and the path in use, once a second.
    Ping {
        #[arg(long)]
        state: PathBuf,
        peer: String,
        #[arg(long, short = 'c', default_value_t = 5)]
        count: u32,
        #[arg(long)]
        json: bool,
    },
    /// Print the mesh addresses of a member of the group (or of this node),
    /// by name or id, as the control server assigned them.
    Resolve {
        #[arg(long)]
        state: PathBuf,
        name: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Fetch a file published by the origin, from the group's members that
    /// have its chunks and from the origin for the rest; the node keeps the
    /// chunks and serves them to the others.
    Get {
        #[arg(long)]
        state: PathBuf,
        /// Content id (64 hex digits, `GET /content` on the origin lists them).
        content: String,
        /// Where to write the file.
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Origin URL for this fetch (default: the node's `up --origin`).
        #[arg(long, value_name = "URL")]
        origin: Option<String>,
        /// Print the report as one JSON object (and no progress bar).
        #[arg(long)]
        json: bool,
    },
    /// Print the node's events (members, paths, punches, relays): the
    /// recent ones it keeps, then, with --follow, new ones as they happen.
    Events {
        #[arg(long)]
        state: PathBuf,
        #[arg(long, short = 'f')]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show the running node's identity and peers.
    Status {
        #[arg(long)]
        state: PathBuf,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Up { .. } | Command::Relay { .. }) {
        peermesh_node::warm_up_tls();
    }
    let result = match cli.command {
        Command::Up {
            control,
            token,
            insecure,
            state,
            name,
            advertise,
            listen,
            punch,
            no_forward,
            tun,
            tun_name,
            tun_mtu,
            origin,
            cache_size,
            protocols,
            status_uids,
        } => {
            init_tracing();
            let mut config = EndpointConfig::new(state);
            config.forward = !no_forward;
            config.punch = match punch {
                PunchArg::Control => PunchMode::Control,
                PunchArg::Dcutr => PunchMode::Dcutr,
                PunchArg::Both => PunchMode::Both,
            };
            config.control_url = control;
            config.token = token;
            config.insecure = insecure;
            config.name = name;
            config.advertise = advertise;
            config.listen = listen;
            let tun = tun.then_some(peermesh_tun::TunConfig {
                name: tun_name,
                mtu: tun_mtu,
            });
            up(config, tun, origin, cache_size, protocols, status_uids).await
        }
        Command::Relay {
            listen,
            external,
            control,
            token,
            insecure,
            state,
            region,
            max_circuits_per_node,
        } => {
            init_tracing();
            let external = match external.iter().map(|a| a.parse()).collect() {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("meshnode: --external: {e}");
                    return ExitCode::FAILURE;
                }
            };
            relay_cmd(RelayConfig {
                listen,
                external,
                control_url: control,
                token,
                insecure,
                region,
                state_dir: state,
                max_circuits_per_peer: max_circuits_per_node,
                max_reservations_per_peer: 4,
            })
            .await
        }
        Command::Status { state, json } => status_cmd(state, json).await,
        Command::Get {
            state,
            content,
            output,
            origin,
            json,
        } => get_cmd(state, content, output, origin, json).await,
        Command::Resolve { state, name, json } => resolve_cmd(state, name, json).await,
        Command::Send {
            state,
            peer,
            messages,
            count,
            prefix,
            protocol,
        } => send_cmd(state, peer, messages, count, prefix, protocol).await,
        Command::Recv {
            state,
            json,
            count,
            protocol,
        } => recv_cmd(state, json, count, protocol).await,
        Command::Events {
            state,
            follow,
            json,
        } => events_cmd(state, follow, json).await,
        Command::Ping {
            state,
            peer,
            count,
            json,
        } => ping_cmd(state, peer, count, json).await,
        Command::Blast {
            state,
            peer,
            bytes,
            size,
            protocol,
        } => blast_cmd(state, peer, bytes, size, protocol).await,
        Command::Sink {
            state,
            bytes,
            timeout,
            json,
            protocol,
        } => sink_cmd(state, bytes, timeout, json, protocol).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshnode: {e:#}");
            // Scripts can tell "this node was cut off" from other failures.
            let revoked = matches!(e.downcast_ref::<NodeError>(), Some(NodeError::Revoked(_)))
                || matches!(e.downcast_ref::<RelayError>(), Some(RelayError::Revoked(_)));
            if revoked {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,h2=warn,tower=warn,hyper=warn".into()),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn up(
    config: EndpointConfig,
    tun: Option<peermesh_tun::TunConfig>,
    origin: Option<String>,
    cache_size: Option<u64>,
    protocols: Vec<String>,
    status_uids: Vec<u32>,
) -> Result<()> {
    let mut served = vec![messages::protocol()];
    for p in &protocols {
        let p = ProtocolId::new(p).context("--protocol")?;
        anyhow::ensure!(!served.contains(&p), "--protocol {p} is served already");
        served.push(p);
    }
    // Before joining: a node that cannot make its interface does not start.
    let tun = tun
        .map(|t| peermesh_tun::TunService::open(&t))
        .transpose()?;
    let socket = socket_path(&config.state_dir);
    let state_dir = config.state_dir.clone();
    let endpoint = Endpoint::bind(config).await?;
    // The endpoint checked that the state directory is ours.
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&state_dir)?);
    let policy = server::AccessPolicy::new(owner, status_uids);
    // The endpoint holds the state directory's lock: a socket left there is stale.
    let listener = server::bind(&socket, &policy).await?;

    // Every application is a protocol on the router.
    let mut router = Router::builder(endpoint.clone());
    let mut inboxes = HashMap::new();
    for p in served {
        let (inbox, handler) = messages::inbox();
        router = router.accept(p.clone(), handler);
        inboxes.insert(p, inbox);
    }
    let tun_info = tun.as_ref().map(|t| t.info());
    if let Some(tun) = tun {
        router = router.accept(peermesh_tun::protocol(), tun.handler(endpoint.clone()));
    }
    let (content, content_handler) = peermesh_content::spawn(
        peermesh_content::ContentConfig::new(origin).with_cache_size(cache_size),
        endpoint.clone(),
    )
    .await?;
    router = router.accept(peermesh_content::protocol(), content_handler);
    let (session, session_handler) = peermesh_session::spawn(endpoint.clone());
    router = router.accept(peermesh_session::protocol(), session_handler);
    let router = router.spawn();

    let ctx = server::Ctx {
        endpoint: endpoint.clone(),
        inboxes,
        tun: tun_info,
        content: Some(content),
        session: Some(session),
    };
    let api = tokio::spawn(server::serve(listener, ctx, policy));
    let m = endpoint.membership();
    println!(
        "meshnode {} ({}) is up in group {}; `meshnode status --state …` shows its peers",
        m.name, m.node_id, m.group
    );
    let stopped = tokio::select! {
        _ = shutdown_signal() => router.shutdown().await,
        s = endpoint.stopped() => s,
    };
    api.abort();
    let _ = std::fs::remove_file(&socket);
    match stopped {
        Stopped::Shutdown => Ok(()),
        Stopped::Revoked(why) => Err(NodeError::Revoked(why).into()),
        Stopped::Failed(why) => Err(anyhow::anyhow!(why)),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn get_cmd(
    state: PathBuf,
    content: String,
    output: PathBuf,
    origin: Option<String>,
    json: bool,
) -> Result<()> {
    let output = std::path::absolute(&output).context("--output")?;
    let req = peermesh_content::GetRequest {
        content,
        output,
        origin,
    };
    let report = peermesh_content::cli::get(&socket(&state), &req, !json)
        .await
        .context("meshnode get")?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        peermesh_content::cli::print_report(&report);
    }
    Ok(())
}

async fn relay_cmd(config: RelayConfig) -> Result<()> {
    peermesh_relay::run(config, shutdown_signal()).await?;
    Ok(())
}

fn socket(state: &Path) -> PathBuf {
    socket_path(state)
}

/// How often `meshnode ping` shows the path and RTT.
const PING_EVERY: Duration = Duration::from_secs(1);

/// Messages go to the node in batches: one socket round trip per batch.
const SEND_BATCH: usize = 256;

async fn send_cmd(
    state: PathBuf,
    peer: String,
    messages: Vec<String>,
    count: Option<u64>,
    prefix: String,
    protocol: Option<String>,
) -> Result<()> {
    let mut client = Client::connect(&socket(&state))
        .await?
        .on_protocol(protocol);
    let mut total = 0usize;
    let mut all: Box<dyn Iterator<Item = String>> = match count {
        Some(n) => Box::new((0..n).map(move |i| format!("{prefix}-{i}"))),
        None if messages == ["-"] => Box::new(
            std::io::stdin()
                .lock()
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
                .into_iter(),
        ),
        None => Box::new(messages.into_iter()),
    };
    loop {
        let batch: Vec<String> = all.by_ref().take(SEND_BATCH).collect();
        if batch.is_empty() {
            break;
        }
        total += client.send(&peer, batch).await.context("send")?;
    }
    eprintln!("sent {total} message(s)");
    Ok(())
}

async fn recv_cmd(
    state: PathBuf,
    json: bool,
    count: Option<u64>,
    protocol: Option<String>,
) -> Result<()> {
    let mut client = Client::connect(&socket(&state))
        .await?
        .on_protocol(protocol);
    client.subscribe().await.context("recv")?;
    let mut n = 0u64;
    while count.is_none_or(|c| n < c) {
        let m = client.next_message().await?;
        if json {
            println!("{}", serde_json::to_string(&m)?);
        } else {
            let who = if m.name.is_empty() { &m.peer } else { &m.name };
            println!("{who}: {}", m.data);
        }
        n += 1;
    }
    Ok(())
}

async fn blast_cmd(
    state: PathBuf,
    peer: String,
    bytes: u64,
    size: usize,
    protocol: Option<String>,
) -> Result<()> {
    let mut client = Client::connect(&socket(&state))
        .await?
        .on_protocol(protocol);
    let start = std::time::Instant::now();
    let n = client.blast(&peer, bytes, size).await.context("blast")?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "queued {n} message(s), {:.1} MiB in {secs:.2} s ({:.1} MiB/s into the link)",
        bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / secs
    );
    Ok(())
}

async fn sink_cmd(
    state: PathBuf,
    bytes: u64,
    timeout: u64,
    json: bool,
    protocol: Option<String>,
) -> Result<()> {
    let mut client = Client::connect(&socket(&state))
        .await?
        .on_protocol(protocol);
    client.sink().await.context("sink")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let p = tokio::time::timeout_at(deadline, client.next_progress())
            .await
            .map_err(|_| {
                anyhow::anyhow!("sink: {timeout} s passed before {bytes} bytes arrived")
            })??;
        if p.bytes >= bytes {
            let secs = (p.elapsed_ms / 1e3).max(1e-9);
            let mbit = p.bytes as f64 * 8.0 / secs / 1e6;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"bytes": p.bytes, "messages": p.messages,
                                       "seconds": secs, "mbit_per_s": mbit})
                );
            } else {
                println!(
                    "received {:.1} MiB in {} messages over {secs:.3} s: {mbit:.0} Mbit/s",
                    p.bytes as f64 / 1048576.0,
                    p.messages
                );
            }
            return Ok(());
        }
    }
}

async fn ping_cmd(state: PathBuf, peer: String, count: u32, json: bool) -> Result<()> {
    let mut client = Client::connect(&socket(&state)).await?;
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(PING_EVERY).await;
        }
        let s = client.status().await?;
        let p = s
            .peers
            .iter()
            .find(|p| p.id == peer || p.name == peer)
            .with_context(|| format!("no peer {peer:?} in this group"))?;
        if json {
            println!(
                "{}",
                serde_json::json!({"peer": p.id, "name": p.name, "path": path_name(p.path), "rtt_ms": p.rtt_ms})
            );
        } else {
            let rtt = p.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms"));
            println!("{} via {}: rtt {rtt}", p.name, path_name(p.path));
        }
    }
    Ok(())
}

async fn events_cmd(state: PathBuf, follow: bool, json: bool) -> Result<()> {
    let print = |e: &peermesh_base::event::Event| -> Result<()> {
        if json {
            println!("{}", serde_json::to_string(e)?);
        } else {
            let at = humantime::format_rfc3339_micros(e.at());
            println!("{at}  {}", describe_event(&e.kind));
        }
        Ok(())
    };
    if !follow {
        for e in api::recent_events(&socket(&state)).await? {
            print(&e)?;
        }
        return Ok(());
    }
    let mut client = Client::connect(&socket(&state)).await?;
    client.events().await.context("events")?;
    loop {
        print(&client.next_event().await?)?;
    }
}

/// One line for an event (`meshnode events`).
fn describe_event(e: &peermesh_base::event::EventKind) -> String {
    use peermesh_base::event::EventKind as K;
    match e {
        K::MemberJoined { peer, name } => format!("member {name} joined ({peer})"),
        K::MemberLeft { peer } => format!("member {peer} left"),
        K::PathUp { peer, kind } => format!("{peer}: {} path up", kind.as_str()),
        K::PathDown { peer, kind, reason } => {
            format!("{peer}: {} path down ({reason})", kind.as_str())
        }
        K::PathChanged {
            peer,
            path,
            via,
            rtt_ms,
        } => {
            let via = via
                .as_ref()
                .map(|v| format!(" via {v}"))
                .unwrap_or_default();
            let rtt = rtt_ms
                .map(|r| format!(", rtt {r:.1} ms"))
                .unwrap_or_default();
            format!("{peer}: now {}{via}{rtt}", path_name(*path))
        }
        K::Control {
            connected: true, ..
        } => "control server connected".into(),
        K::Control { error, .. } => format!(
            "control server disconnected{}",
            error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
        ),
        K::Nat { nat } => format!("NAT: {}", nat.describe()),
        K::RelayDirectory { relays } => format!("relay directory: {relays} relay(s)"),
        K::HomeRelay { relay: Some(r) } => format!("home relay {r}"),
        K::HomeRelay { relay: None } => "no home relay".into(),
        K::Punch { peer, role, method } => format!("{peer}: punch as {role:?}, {method:?}"),
    }
}

async fn status_cmd(state: PathBuf, json: bool) -> Result<()> {
    let s = api::query(&socket(&state))
        .await
        .context("meshnode status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_status(&s);
    }
    Ok(())
}

async fn resolve_cmd(state: PathBuf, name: String, json: bool) -> Result<()> {
    let s = api::query(&socket(&state))
        .await
        .context("meshnode resolve")?;
    let (v4, v6) = if s.name == name || s.id == name {
        (s.mesh_ipv4.clone(), s.mesh_ipv6.clone())
    } else {
        let p = s
            .peers
            .iter()
            .find(|p| p.name == name || p.id == name)
            .with_context(|| format!("no member {name:?} in group {}", s.group))?;
        (p.mesh_ipv4.clone(), p.mesh_ipv6.clone())
    };
    if v4.is_none() && v6.is_none() {
        anyhow::bail!("{name} has no mesh address (the control server assigns none)");
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "ipv4": v4, "ipv6": v6})
        );
    } else {
        for a in v4.iter().chain(v6.iter()) {
            println!("{a}");
        }
    }
    Ok(())
}

fn print_status(s: &NodeStatus) {
    println!("node     {} ({})", s.name, s.id);
    println!("group    {}", s.group);
    let control = if s.control.connected {
        "connected".to_string()
    } else {
        format!(
            "disconnected{}",
            s.control
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )
    };
    println!("control  {} ({control})", s.control.url);
    if let Some(nat) = &s.nat {
        let public = nat
            .public
            .map(|p| format!(", public {p}"))
            .unwrap_or_default();
        println!("nat      {}{public}", nat.describe());
    }
    if !s.addresses.is_empty() {
        println!("address  {}", s.addresses.join(", "));
    }
    if s.mesh_ipv4.is_some() || s.mesh_ipv6.is_some() {
        let mesh: Vec<&str> = s
            .mesh_ipv4
            .iter()
            .chain(&s.mesh_ipv6)
            .map(|a| a.as_str())
            .collect();
        println!("mesh     {}", mesh.join(", "));
    }
    if let Some(t) = &s.tun {
        println!(
            "tun      {} mtu {} {}: tx {} pkts, rx {} pkts; dropped: no route {}, no link {}, congested {}, malformed {}, spoofed {}, not for us {}",
            t.name,
            t.mtu,
            if t.up { "up" } else { "waiting for addresses" },
            t.tx_packets,
            t.rx_packets,
            t.drop_no_route,
            t.drop_no_link,
            t.drop_congested,
            t.drop_malformed,
            t.drop_spoofed,
            t.drop_not_for_us
        );
    }
    println!();
    if s.peers.is_empty() {
        println!("no peers yet");
        return;
    }
    println!(
        "{:<20} {:<54} {:<20} {:>9} {:>10} {:>10}  {:<6} MESH",
        "PEER", "ID", "PATH", "RTT", "IN", "OUT", "ONLINE"
    );
    let mut peers: Vec<_> = s.peers.iter().collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    for p in peers {
        let rtt = p.rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms"));
        let path = match (p.path, &p.via) {
            (Some(PathKind::Forwarded), Some(via)) => format!("forwarded via {via}"),
            (k, _) => path_name(k).to_string(),
        };
        println!(
            "{:<20} {:<54} {:<20} {:>9} {:>10} {:>10}  {:<6} {}",
            p.name,
            p.id,
            path,
            rtt,
            human_bytes(p.bytes_in),
            human_bytes(p.bytes_out),
            if p.online { "yes" } else { "no" },
            p.mesh_ipv4
                .iter()
                .chain(&p.mesh_ipv6)
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
