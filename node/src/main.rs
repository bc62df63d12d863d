//! `meshnode`: run a peermesh node, or ask a running one for its status.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use peermesh_node::status::{self, NodeStatus};
use peermesh_node::{Node, NodeConfig, NodeError};

#[derive(Parser)]
#[command(name = "meshnode", version, about = "A peermesh mesh node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    let result = match cli.command {
        Command::Up {
            control,
            token,
            state,
            name,
            advertise,
        } => {
            init_tracing();
            let mut config = NodeConfig::new(state);
            config.control_url = control;
            config.token = token;
            config.name = name;
            config.advertise = advertise;
            up(config).await
        }
        Command::Status { state, json } => status_cmd(state, json).await,
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

async fn up(config: NodeConfig) -> Result<()> {
    let (node, listener) = Node::start(config).await?;
    let m = node.membership();
    println!(
        "meshnode {} ({}) is up in group {}; `meshnode status --state …` shows its peers",
        m.name, m.node_id, m.group
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    node.run(listener, shutdown).await?;
    Ok(())
}

async fn status_cmd(state: PathBuf, json: bool) -> Result<()> {
    let s = status::query(&state.join("meshnode.sock"))
        .await
        .context("meshnode status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_status(&s);
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
    if !s.addresses.is_empty() {
        println!("address  {}", s.addresses.join(", "));
    }
    println!();
    if s.peers.is_empty() {
        println!("no peers yet");
        return;
    }
    println!(
        "{:<20} {:<54} {:<11} {:>9} {:>10} {:>10}  ONLINE",
        "PEER", "ID", "PATH", "RTT", "IN", "OUT"
    );
    let mut peers: Vec<_> = s.peers.iter().collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    for p in peers {
        let rtt = p.rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms"));
        println!(
            "{:<20} {:<54} {:<11} {:>9} {:>10} {:>10}  {}",
            p.name,
            p.id,
            p.path.as_str(),
            rtt,
            human_bytes(p.bytes_in),
            human_bytes(p.bytes_out),
            if p.online { "yes" } else { "no" }
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
