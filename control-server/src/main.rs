//! `control-server`: run the peermesh control server, or administer one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use peermesh_control_server::limits::{Limits, RateLimits};
use peermesh_control_server::server::{self, Options, Server};
use peermesh_control_server::tls::CertSource;
use peermesh_proto::api::{
    admin_client::AdminClient, CreateGroupRequest, CreateTokenRequest, LinkTableRequest,
    ListGroupsRequest, ListNodesRequest, ListRelaysRequest, ListTokensRequest, NodeState, PathKind,
    RemoveNodeRequest, RevokeTokenRequest, RotateServerKeyRequest,
};
use peermesh_proto::client::Security;
use peermesh_proto::tls::{KeyPin, ServerTrust};
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "control-server",
    version,
    about = "The peermesh control server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server in the foreground.
    Serve {
        /// Address for the gRPC API (node and admin services).
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Data directory: the sled database and admin.token.
        #[arg(long, default_value = "./control-data")]
        data: PathBuf,
        /// Answer STUN for NAT behaviour discovery at this address:port
        /// (with --stun-alt; four UDP sockets: both addresses × both ports).
        #[arg(long, requires = "stun_alt")]
        stun: Option<SocketAddr>,
        /// The alternate address:port (another address and another port).
        #[arg(long, requires = "stun")]
        stun_alt: Option<SocketAddr>,
        /// A CA's certificate chain (PEM), e.g. from an ACME client, instead
        /// of the self-signed one made in DATA/tls. Its key becomes the
        /// server key that tokens pin; a renewal with a new key is followed
        /// by `admin rotate-key` (or the next start).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Take plaintext (http://) from any address, not only loopback:
        /// tokens, credentials and maps then cross the network unencrypted
        /// (maps stay signed). Only on a network you trust.
        #[arg(long)]
        insecure: bool,
        /// Most nodes one group may hold.
        #[arg(long, default_value_t = peermesh_control_server::limits::DEFAULT_MAX_NODES_PER_GROUP)]
        max_group_nodes: u32,
        /// No per-source rate limits (for benchmarks and tests that drive
        /// thousands of simulated nodes from one address).
        #[arg(long)]
        no_rate_limits: bool,
    },
    /// Administer a running server.
    Admin {
        /// The server's URL (https:// needs the server key's fingerprint:
        /// read from --data, or given with --server-key).
        #[arg(long, default_value = "http://127.0.0.1:7443")]
        server: String,
        /// The server key's fingerprint (64 hex digits), for https:// without
        /// access to the server's data directory.
        #[arg(long)]
        server_key: Option<KeyPin>,
        /// Plaintext to a server that is not on loopback (it must run with
        /// --insecure).
        #[arg(long)]
        insecure: bool,
        /// The server's data directory, to read admin.token from.
        #[arg(long, default_value = "./control-data", conflicts_with = "admin_token")]
        data: PathBuf,
        /// The admin credential itself, instead of reading it from --data.
        #[arg(long, env = "PEERMESH_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        #[command(subcommand)]
        action: AdminAction,
    },
}

#[derive(Subcommand)]
enum AdminAction {
    /// Create a group (a subset of nodes that form one mesh).
    CreateGroup { name: String },
    /// List groups.
    Groups {
        #[arg(long)]
        json: bool,
    },
    /// Create a join token for a group's nodes, or with --relay one for relay
    /// servers; prints the token alone on stdout.
    CreateToken {
        #[arg(long, required_unless_present = "relay", conflicts_with = "relay")]
        group: Option<String>,
        /// A token for relay servers (they belong to no group).
        #[arg(long)]
        relay: bool,
        /// Lifetime, e.g. 30m, 12h, 7d (default 24h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// How many nodes (or relays) may use it (default: one).
        #[arg(long, default_value_t = 0, conflicts_with = "reusable")]
        uses: u32,
        /// Any number of uses until it expires (within the server's cap of
        /// nodes per group).
        #[arg(long)]
        reusable: bool,
    },
    /// Replace the server key: a new self-signed key, or the key of the
    /// renewed --tls-cert/--tls-key files. The old key signs the new one,
    /// so nodes follow by themselves; new tokens carry the new fingerprint.
    RotateKey,
    /// List join tokens (ids only; the secrets are shown once, at creation).
    Tokens {
        #[arg(long, default_value = "")]
        group: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a join token (the token or its id) and the nodes that joined with
    /// it; for a relay token, the relays registered with it.
    RevokeToken {
        token: String,
        /// Only stop new joins; nodes (relays) that used the token stay.
        #[arg(long)]
        keep_nodes: bool,
    },
    /// List nodes.
    Nodes {
        #[arg(long, default_value = "")]
        group: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a node (by id or name) from its group.
    RemoveNode {
        node: String,
        #[arg(long, default_value = "")]
        group: String,
    },
    /// The link table: every node's view of its links (path, RTT, loss).
    Links {
        #[arg(long, default_value = "")]
        group: String,
        #[arg(long)]
        json: bool,
    },
    /// The relay directory: every registered relay, online or not, with load.
    Relays {
        #[arg(long)]
        json: bool,
    },
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sled=warn,h2=warn,tower=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            data,
            stun,
            stun_alt,
            tls_cert,
            tls_key,
            insecure,
            max_group_nodes,
            no_rate_limits,
        } => {
            init_tracing();
            let options = Options {
                limits: Limits {
                    max_nodes_per_group: max_group_nodes,
                    rates: if no_rate_limits {
                        RateLimits::none()
                    } else {
                        RateLimits::default()
                    },
                    ..Limits::default()
                },
                cert: match tls_cert.zip(tls_key) {
                    Some((cert, key)) => CertSource::Files { cert, key },
                    None => CertSource::SelfSigned,
                },
                insecure,
            };
            serve(listen, &data, stun.zip(stun_alt), options).await
        }
        Command::Admin {
            server,
            server_key,
            insecure,
            data,
            admin_token,
            action,
        } => {
            let credential = match admin_token {
                Some(t) => t,
                None => {
                    let path = data.join(server::ADMIN_TOKEN_FILE);
                    std::fs::read_to_string(&path)
                        .with_context(|| {
                            format!(
                                "reading the admin credential from {} (use --data or --admin-token)",
                                path.display()
                            )
                        })?
                        .trim()
                        .to_string()
                }
            };
            // The pin: given, or the key in the server's data directory.
            let pin =
                server_key.or_else(|| peermesh_control_server::tls::pin_of_data_dir(&data).ok());
            let security = Security {
                trust: ServerTrust::new(pin),
                insecure,
            };
            let result = tokio::time::timeout(
                ADMIN_TIMEOUT,
                admin(&server, &security, &credential, action),
            )
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "no answer from {server} in {ADMIN_TIMEOUT:?}"
                ))
            });
            match security.trust.take_mismatch() {
                Some(presented) => result.with_context(|| {
                    format!(
                        "the server at {server} has key {presented}, not the expected {}",
                        pin.map(|p| p.to_string()).unwrap_or_default()
                    )
                }),
                None => result,
            }
        }
    }
}

async fn serve(
    listen: SocketAddr,
    data: &Path,
    stun: Option<(SocketAddr, SocketAddr)>,
    options: Options,
) -> Result<()> {
    let mut server = Server::bind_with(listen, data, options)
        .await
        .context("starting the control server")?;
    if let Some((primary, alternate)) = stun {
        server = server
            .with_stun(primary, alternate)
            .await
            .context("starting STUN")?;
    }
    let addr = server.local_addr()?;
    tracing::info!(%addr, data = %data.display(), server_id = server.registry.server_id(), server_key = %server.keys.pin(), "control server listening");
    // A line that scripts and tests can wait for.
    println!("control-server listening on {addr}");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    server.serve(shutdown).await?;
    Ok(())
}

/// How long an admin command waits for the server: it is expected to be up
/// and near, so half a minute covers a slow path and a busy server, and an
/// operator with a wrong address or a stopped server hears so soon.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

type Interceptor =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Admin = AdminClient<InterceptedService<Channel, Interceptor>>;

async fn connect(url: &str, security: &Security, credential: &str) -> Result<Admin> {
    let channel = peermesh_proto::client::channel(url, security)?;
    let header: MetadataValue<_> = format!("Bearer {credential}")
        .parse()
        .context("the admin credential is not valid header text")?;
    let intercept: Interceptor = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    });
    Ok(AdminClient::with_interceptor(channel, intercept))
}

fn status_err(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow::anyhow!("{what}: {} ({:?})", s.message(), s.code())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// "3m ago", "in 2h", or "-" for zero.
fn relative(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = now_ms();
    let fmt = |d: u64| humantime::format_duration(Duration::from_secs(d / 1000)).to_string();
    if ms <= now {
        format!("{} ago", fmt(now - ms))
    } else {
        format!("in {}", fmt(ms - now))
    }
}

fn path_name(p: i32) -> &'static str {
    match PathKind::try_from(p) {
        Ok(PathKind::Connecting) => "connecting",
        Ok(PathKind::Relay) => "relay",
        Ok(PathKind::Direct) => "direct",
        Ok(PathKind::Forwarded) => "forwarded",
        _ => "unknown",
    }
}

/// A NAT report in a few words: mapping/filtering, stride if sequential.
fn nat_words(r: Option<&peermesh_proto::api::NatReport>) -> String {
    match r {
        None => "-".into(),
        Some(r) if !r.udp => "UDP blocked".into(),
        Some(r) if r.no_nat => "no NAT".into(),
        Some(r) if r.mapping == "sequential" => {
            format!("sequential({:+})/{}", r.port_stride, r.filtering)
        }
        Some(r) => format!("{}/{}", r.mapping, r.filtering),
    }
}

fn state_name(s: i32) -> &'static str {
    match NodeState::try_from(s) {
        Ok(NodeState::Active) => "active",
        Ok(NodeState::Revoked) => "revoked",
        _ => "unknown",
    }
}

async fn admin(
    url: &str,
    security: &Security,
    credential: &str,
    action: AdminAction,
) -> Result<()> {
    let mut c = connect(url, security, credential).await?;
    match action {
        AdminAction::CreateGroup { name } => {
            let g = c
                .create_group(CreateGroupRequest { name })
                .await
                .map_err(status_err("create-group"))?
                .into_inner();
            println!("created group {}", g.name);
        }
        AdminAction::Groups { json } => {
            let groups = c
                .list_groups(ListGroupsRequest {})
                .await
                .map_err(status_err("groups"))?
                .into_inner()
                .groups;
            if json {
                let v: Vec<_> = groups
                    .iter()
                    .map(|g| json!({"name": g.name, "nodes": g.node_count, "created_ms": g.created_ms}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:>6}  CREATED", "GROUP", "NODES");
                for g in groups {
                    println!(
                        "{:<24} {:>6}  {}",
                        g.name,
                        g.node_count,
                        relative(g.created_ms)
                    );
                }
            }
        }
        AdminAction::CreateToken {
            group,
            relay,
            ttl,
            uses,
            reusable,
        } => {
            let r = c
                .create_token(CreateTokenRequest {
                    group: group.unwrap_or_default(),
                    ttl_seconds: ttl.map_or(0, |d| d.as_secs().max(1)),
                    max_uses: uses,
                    relay,
                    reusable,
                })
                .await
                .map_err(status_err("create-token"))?
                .into_inner();
            if let Some(info) = &r.info {
                let owner = if info.relay {
                    "relay servers".to_string()
                } else {
                    format!("group {}", info.group)
                };
                eprintln!(
                    "token {} for {owner} expires {}",
                    info.token_id,
                    relative(info.expires_ms)
                );
            }
            println!("{}", r.token);
        }
        AdminAction::Tokens { group, json } => {
            let tokens = c
                .list_tokens(ListTokensRequest { group })
                .await
                .map_err(status_err("tokens"))?
                .into_inner()
                .tokens;
            let now = now_ms();
            let state = |t: &peermesh_proto::api::TokenInfo| {
                if t.revoked {
                    "revoked"
                } else if t.expires_ms <= now {
                    "expired"
                } else if t.max_uses != 0 && t.uses >= t.max_uses {
                    "used up"
                } else {
                    "valid"
                }
            };
            if json {
                let v: Vec<_> = tokens
                    .iter()
                    .map(|t| {
                        json!({"token_id": t.token_id, "group": t.group, "relay": t.relay,
                               "state": state(t), "uses": t.uses, "max_uses": t.max_uses,
                               "created_ms": t.created_ms, "expires_ms": t.expires_ms})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<18} {:<16} {:<8} {:>9}  EXPIRES",
                    "TOKEN ID", "GROUP", "STATE", "USES"
                );
                for t in &tokens {
                    let uses = if t.max_uses == 0 {
                        format!("{}", t.uses)
                    } else {
                        format!("{}/{}", t.uses, t.max_uses)
                    };
                    let group = if t.relay { "(relay)" } else { t.group.as_str() };
                    println!(
                        "{:<18} {:<16} {:<8} {:>9}  {}",
                        t.token_id,
                        group,
                        state(t),
                        uses,
                        relative(t.expires_ms)
                    );
                }
            }
        }
        AdminAction::RevokeToken { token, keep_nodes } => {
            let r = c
                .revoke_token(RevokeTokenRequest { token, keep_nodes })
                .await
                .map_err(status_err("revoke-token"))?
                .into_inner();
            let relay = r.info.as_ref().is_some_and(|i| i.relay);
            let id = r.info.map(|i| i.token_id).unwrap_or_default();
            if relay {
                println!(
                    "revoked relay token {id}; {} relay(s) dropped from the directory with it",
                    r.revoked_nodes.len()
                );
            } else {
                println!(
                    "revoked token {id}; {} node(s) revoked with it",
                    r.revoked_nodes.len()
                );
            }
            for n in r.revoked_nodes {
                println!("  {n}");
            }
        }
        AdminAction::Nodes { group, json } => {
            let mut nodes = c
                .list_nodes(ListNodesRequest { group })
                .await
                .map_err(status_err("nodes"))?
                .into_inner()
                .nodes;
            nodes.sort_by(|a, b| (&a.group, &a.name).cmp(&(&b.group, &b.name)));
            if json {
                let v: Vec<_> = nodes
                    .iter()
                    .map(|n| {
                        json!({"id": n.node_id, "name": n.name, "group": n.group,
                               "state": state_name(n.state), "online": n.online,
                               "addresses": n.addresses, "joined_ms": n.joined_ms,
                               "last_seen_ms": n.last_seen_ms, "token_id": n.token_id,
                               "mesh_ipv4": n.mesh_ipv4, "mesh_ipv6": n.mesh_ipv6,
                               "nat": n.nat.as_ref().map(|r| json!({
                                   "udp": r.udp, "public": r.public_endpoint, "no_nat": r.no_nat,
                                   "mapping": r.mapping, "port_stride": r.port_stride,
                                   "filtering": r.filtering, "measured_ms": r.measured_ms}))})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<16} {:<20} {:<54} {:<8} {:<8} {:<15} {:<39} {:<28} LAST SEEN",
                    "GROUP", "NAME", "ID", "STATE", "ONLINE", "MESH IPV4", "MESH IPV6", "NAT"
                );
                for n in &nodes {
                    println!(
                        "{:<16} {:<20} {:<54} {:<8} {:<8} {:<15} {:<39} {:<28} {}",
                        n.group,
                        n.name,
                        n.node_id,
                        state_name(n.state),
                        if n.online { "yes" } else { "no" },
                        n.mesh_ipv4,
                        n.mesh_ipv6,
                        nat_words(n.nat.as_ref()),
                        relative(n.last_seen_ms)
                    );
                }
            }
        }
        AdminAction::RotateKey => {
            let r = c
                .rotate_server_key(RotateServerKeyRequest {})
                .await
                .map_err(status_err("rotate-key"))?
                .into_inner();
            println!("server key rotated: {} -> {}", r.old_pin, r.new_pin);
            println!("nodes follow the signed rotation; new tokens carry the new fingerprint");
        }
        AdminAction::RemoveNode { node, group } => {
            let r = c
                .remove_node(RemoveNodeRequest { node, group })
                .await
                .map_err(status_err("remove-node"))?
                .into_inner();
            println!("removed node {}", r.node_id);
        }
        AdminAction::Links { group, json } => {
            let links = c
                .link_table(LinkTableRequest { group })
                .await
                .map_err(status_err("links"))?
                .into_inner()
                .links;
            if json {
                let v: Vec<_> = links
                    .iter()
                    .filter_map(|e| {
                        let l = e.link.as_ref()?;
                        Some(
                            json!({"group": e.group, "from": e.from_node, "from_name": e.from_name,
                               "to": l.peer_id, "to_name": e.to_name, "path": path_name(l.path),
                               "via": l.via, "rtt_ms": l.rtt_ms, "loss": l.loss,
                               "bytes_in": l.bytes_in, "bytes_out": l.bytes_out,
                               "reported_ms": e.reported_ms}),
                        )
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<14} {:<18} {:<18} {:<11} {:>9} {:>6}  REPORTED",
                    "GROUP", "FROM", "TO", "PATH", "RTT", "LOSS"
                );
                for e in &links {
                    let Some(l) = &e.link else { continue };
                    let rtt = l.rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms"));
                    println!(
                        "{:<14} {:<18} {:<18} {:<11} {:>9} {:>5.1}%  {}",
                        e.group,
                        e.from_name,
                        e.to_name,
                        path_name(l.path),
                        rtt,
                        l.loss * 100.0,
                        relative(e.reported_ms)
                    );
                }
            }
        }
        AdminAction::Relays { json } => {
            let mut relays = c
                .list_relays(ListRelaysRequest {})
                .await
                .map_err(status_err("relays"))?
                .into_inner()
                .relays;
            relays.sort_by(|a, b| {
                let key = |i: &peermesh_proto::api::RelayInfo| {
                    i.relay
                        .as_ref()
                        .map(|r| (r.region.clone(), r.relay_id.clone()))
                };
                key(a).cmp(&key(b))
            });
            if json {
                let v: Vec<_> = relays
                    .iter()
                    .filter_map(|i| {
                        let r = i.relay.as_ref()?;
                        Some(
                            json!({"id": r.relay_id, "region": r.region, "online": i.online,
                               "addresses": r.addresses, "reservations": r.reservations,
                               "circuits": r.circuits, "bytes_relayed": i.bytes_relayed,
                               "registered_ms": i.registered_ms}),
                        )
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<54} {:<12} {:<7} {:>6} {:>6} {:>14}  {:<14} ADDRESSES",
                    "ID", "REGION", "ONLINE", "RESV", "CIRC", "BYTES RELAYED", "REGISTERED"
                );
                for i in &relays {
                    let Some(r) = &i.relay else { continue };
                    println!(
                        "{:<54} {:<12} {:<7} {:>6} {:>6} {:>14}  {:<14} {}",
                        r.relay_id,
                        if r.region.is_empty() { "-" } else { &r.region },
                        if i.online { "yes" } else { "no" },
                        r.reservations,
                        r.circuits,
                        i.bytes_relayed,
                        relative(i.registered_ms),
                        r.addresses.join(" ")
                    );
                }
            }
        }
    }
    Ok(())
}
