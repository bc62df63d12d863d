//! `meshnode`: run a peermesh node, or ask a running one for its status.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use peermesh_node::mesh::PunchMode;
use peermesh_node::relay::RelayConfig;
use peermesh_node::status::{self, NodeStatus};
use peermesh_node::{Node, NodeConfig, NodeError};

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
        /// Control server URL (remembered after the first run).
        #[arg(long)]
        control: Option<String>,
        /// Join token; needed only for the first run with this --state.
        #[arg(long, env = "PEERMESH_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// State directory: identity key, membership, status socket.
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
        #[arg(long, default_value = peermesh_node::tun::DEFAULT_NAME)]
        tun_name: String,
        /// MTU of the TUN interface (1280..=65535); the mesh carries whole
        /// packets up to it.
        #[arg(long, default_value_t = peermesh_node::tun::DEFAULT_MTU)]
        tun_mtu: u16,
        /// The origin (hosting server) that `meshnode get` fetches manifests
        /// and missing chunks from, e.g. http://10.0.0.1:8080 (a `get
        /// --origin` overrides it).
        #[arg(long, value_name = "URL")]
        origin: Option<String>,
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
        peermesh_node::swarm::warm_up_tls();
    }
    let result = match cli.command {
        Command::Up {
            control,
            token,
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
        } => {
            init_tracing();
            let mut config = NodeConfig::new(state);
            config.forward = !no_forward;
            config.punch = match punch {
                PunchArg::Control => PunchMode::Control,
                PunchArg::Dcutr => PunchMode::Dcutr,
                PunchArg::Both => PunchMode::Both,
            };
            config.control_url = control;
            config.token = token;
            config.name = name;
            config.advertise = advertise;
            config.listen = listen;
            let tun = tun.then_some(peermesh_node::tun::TunConfig {
                name: tun_name,
                mtu: tun_mtu,
            });
            up(config, tun, origin).await
        }
        Command::Relay {
            listen,
            external,
            control,
            token,
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
        } => send_cmd(state, peer, messages, count, prefix).await,
        Command::Recv { state, json, count } => recv_cmd(state, json, count).await,
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
        } => blast_cmd(state, peer, bytes, size).await,
        Command::Sink {
            state,
            bytes,
            timeout,
            json,
        } => sink_cmd(state, bytes, timeout, json).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshnode: {e:#}");
            // Scripts can tell "this node was cut off" from other failures.
            match e.downcast_ref::<NodeError>() {
                Some(NodeError::Revoked(_)) => ExitCode::from(3),
                _ => ExitCode::FAILURE,
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
    config: NodeConfig,
    tun: Option<peermesh_node::tun::TunConfig>,
    origin: Option<String>,
) -> Result<()> {
    // Before joining: a node that cannot make its interface does not start.
    let tun = tun
        .map(|t| peermesh_node::tun::TunService::open(&t))
        .transpose()?;
    let state_dir = config.state_dir.clone();
    let (mut node, listener) = Node::start(config).await?;
    if let Some(tun) = tun {
        node.attach_tun(tun);
    }
    peermesh_node::content::attach(&mut node, &state_dir, origin).await?;
    peermesh_node::session::attach(&mut node)?;
    let m = node.membership();
    println!(
        "meshnode {} ({}) is up in group {}; `meshnode status --state …` shows its peers",
        m.name, m.node_id, m.group
    );
    node.run(listener, shutdown_signal()).await?;
    Ok(())
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
    let req = peermesh_node::content::GetRequest {
        content,
        output,
        origin,
    };
    let report = peermesh_node::content::cli::get(&socket(&state), &req, !json)
        .await
        .context("meshnode get")?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        peermesh_node::content::cli::print_report(&report);
    }
    Ok(())
}

async fn relay_cmd(config: RelayConfig) -> Result<()> {
    peermesh_node::relay::run(config, shutdown_signal()).await?;
    Ok(())
}

fn socket(state: &Path) -> PathBuf {
    state.join("meshnode.sock")
}

/// Messages go to the node in batches: one socket round trip per batch.
const SEND_BATCH: usize = 256;

async fn send_cmd(
    state: PathBuf,
    peer: String,
    messages: Vec<String>,
    count: Option<u64>,
    prefix: String,
) -> Result<()> {
    let mut client = status::Client::connect(&socket(&state)).await?;
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

async fn recv_cmd(state: PathBuf, json: bool, count: Option<u64>) -> Result<()> {
    let mut client = status::Client::connect(&socket(&state)).await?;
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

async fn blast_cmd(state: PathBuf, peer: String, bytes: u64, size: usize) -> Result<()> {
    let mut client = status::Client::connect(&socket(&state)).await?;
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

async fn sink_cmd(state: PathBuf, bytes: u64, timeout: u64, json: bool) -> Result<()> {
    let mut client = status::Client::connect(&socket(&state)).await?;
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
    let mut client = status::Client::connect(&socket(&state)).await?;
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
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
                serde_json::json!({"peer": p.id, "name": p.name, "path": p.path, "rtt_ms": p.rtt_ms})
            );
        } else {
            let rtt = p.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms"));
            println!("{} via {}: rtt {rtt}", p.name, p.path.as_str());
        }
    }
    Ok(())
}

async fn status_cmd(state: PathBuf, json: bool) -> Result<()> {
    let s = status::query(&socket(&state))
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
    let s = status::query(&socket(&state))
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
        let path = match (&p.path, &p.via) {
            (status::PathKind::Forwarded, Some(via)) => format!("forwarded via {via}"),
            (k, _) => k.as_str().to_string(),
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
