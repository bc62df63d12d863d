//! `hosting-server`: the peermesh origin server. Serves a content directory over HTTP/1.1.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hosting-server",
    version,
    about = "The peermesh origin (hosting) server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the files under a directory over HTTP/1.1, in the foreground.
    ///
    /// GET and HEAD with byte ranges, Last-Modified/If-Modified-Since, a strong ETag with
    /// If-None-Match/If-Match, and If-Range. GET /healthz answers "ok". Stops on SIGTERM or
    /// ctrl-c, letting requests in flight finish.
    ///
    /// Every file is also published as a manifest of 256 KiB BLAKE3 chunks for the mesh:
    /// GET /content (list), /content/{id}/manifest, /chunks/{hash}, /stats.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080 or [::]:8080 (port 0 picks a free port).
    #[arg(long)]
    listen: SocketAddr,
    /// Directory whose files are served; a request path names a file under it.
    #[arg(long)]
    content: PathBuf,
    /// The control server's URL. Accepted but NOT USED YET: registering with the control
    /// server comes in a later version; for now it is only logged.
    #[arg(long, value_name = "URL")]
    control: Option<String>,
    /// UDP address of the multiplayer session endpoint; defaults to the IP and port that
    /// --listen ends up with (UDP beside the TCP port).
    #[arg(long, value_name = "ADDR")]
    sessions: Option<SocketAddr>,
    /// Ticks per second of every multiplayer session.
    #[arg(long, default_value_t = 30)]
    tick_hz: u16,
    /// Players per session (at most 32).
    #[arg(long, default_value_t = 16)]
    max_players: usize,
    /// Also forward each member's inputs to the other members at once (the "through the
    /// origin" route, for comparison with the mesh).
    #[arg(long)]
    relay_inputs: bool,
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_tracing();
            serve(args).await
        }
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let content = std::fs::canonicalize(&args.content)
        .with_context(|| format!("content directory {}", args.content.display()))?;
    if !content.is_dir() {
        bail!("content directory {} is not a directory", content.display());
    }
    if let Some(control) = &args.control {
        tracing::warn!(%control, "--control is not used yet: this server does not register with the control server");
    }

    // Content manifests and chunks (src/content.rs): every file is hashed once at start.
    let scan_dir = content.clone();
    let index = tokio::task::spawn_blocking(move || {
        peermesh_hosting_server::content::ContentIndex::scan(&scan_dir)
    })
    .await
    .context("scanning the content directory")??;
    let index = std::sync::Arc::new(index);

    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, content = %content.display(), "hosting server listening");
    // A line that scripts and tests can wait for.
    println!("hosting-server listening on {addr}");
    // Multiplayer sessions (src/session.rs): UDP, beside the HTTP port unless told otherwise
    // (when that UDP port is taken, any free one: the line below says which).
    let session_config = peermesh_hosting_server::session::SessionConfig {
        tick_hz: args.tick_hz,
        max_players: args.max_players,
        relay_inputs: args.relay_inputs,
        ..Default::default()
    };
    use peermesh_hosting_server::session::SessionServer;
    let sessions = match args.sessions {
        Some(at) => SessionServer::bind(at, session_config).await,
        None => match SessionServer::bind(addr, session_config.clone()).await {
            Ok(s) => Ok(s),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "UDP port of --listen is taken; sessions on another port");
                SessionServer::bind(std::net::SocketAddr::new(addr.ip(), 0), session_config).await
            }
        },
    }
    .context("binding the session endpoint")?;
    println!("hosting-server sessions on udp {}", sessions.local_addr());

    let app = peermesh_hosting_server::router(content)
        .merge(peermesh_hosting_server::content::routes(index))
        .merge(sessions.routes());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")?;
    tracing::info!("stopped");
    Ok(())
}

/// Installs the handlers for SIGTERM and SIGINT (ctrl-c) now, so that a signal arriving any
/// time after this returns stops the server gracefully; the future resolves on the first one.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutting down; letting requests in flight finish"
        );
    })
}

/// Resolves on ctrl-c.
#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("shutting down; letting requests in flight finish"),
            Err(err) => {
                tracing::error!(%err, "cannot listen for ctrl-c");
                std::future::pending::<()>().await
            }
        }
    })
}
