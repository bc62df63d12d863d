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

    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, content = %content.display(), "hosting server listening");
    // A line that scripts and tests can wait for.
    println!("hosting-server listening on {addr}");

    axum::serve(listener, peermesh_hosting_server::router(content))
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
