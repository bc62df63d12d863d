//! An application that embeds a peermesh endpoint: no `meshnode` process,
//! no CLI, just the library.
//!
//! It joins a group (or rejoins with the membership its state directory
//! remembers), registers a protocol of its own, `/example/echo/1`, that
//! answers every message with `echo: <message>`, greets one member (when
//! `--greet NAME` is given) as soon as it appears, and prints the members
//! and paths as they change. Any member can talk to it; a `meshnode`
//! started with `up --protocol /example/echo/1` can from the command line:
//!
//! ```sh
//! cargo run -p peermesh-examples --bin endpoint -- \
//!     --control http://127.0.0.1:7443 --token pmj_… --state ./app --name app --greet laptop
//! meshnode recv --state ./laptop --protocol /example/echo/1 &   # prints the greeting
//! meshnode send --state ./laptop --protocol /example/echo/1 app "hi"   # app answers "echo: hi"
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use peermesh_base::event::EventKind;
use peermesh_base::path_name;
use peermesh_node::{Endpoint, EndpointConfig, Incoming, ProtocolId, Router};

/// The example's protocol.
const ECHO: &str = "/example/echo/1";

struct Args {
    control: Option<String>,
    token: Option<String>,
    state: PathBuf,
    name: Option<String>,
    greet: Option<String>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        control: None,
        token: None,
        state: PathBuf::from("./endpoint-state"),
        name: None,
        greet: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--control" => a.control = Some(value()?),
            "--token" => a.token = Some(value()?),
            "--state" => a.state = value()?.into(),
            "--name" => a.name = Some(value()?),
            "--greet" => a.greet = Some(value()?),
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: endpoint --control URL --token TOKEN \
                 --state DIR [--name NAME] [--greet MEMBER]"
            ),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    let mut config = EndpointConfig::new(&args.state);
    config.control_url = args.control;
    config.token = args.token;
    config.name = args.name;
    let endpoint = Endpoint::bind(config).await.context("joining the group")?;
    let me = endpoint.membership();
    println!("joined group {} as {} ({})", me.group, me.name, me.node_id);

    // The protocol: answer every message to whoever sent it.
    let echo = endpoint.sender(ProtocolId::from_static(ECHO));
    let replies = echo.clone();
    let router = Router::builder(endpoint.clone())
        .accept(
            ProtocolId::from_static(ECHO),
            move |mut incoming: Incoming| async move {
                while let Some(m) = incoming.recv().await {
                    let text = String::from_utf8_lossy(&m.data);
                    println!("from {}: {text}", m.from);
                    if let Err(e) = replies
                        .send(m.from, format!("echo: {text}").as_bytes())
                        .await
                    {
                        println!("answering {}: {e}", m.from);
                    }
                }
            },
        )
        .spawn();

    // Members and paths as they change; greet one member when it appears.
    let mut events = endpoint.events();
    let mut greeted = false;
    loop {
        let e = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            stopped = endpoint.stopped() => {
                println!("stopped: {stopped:?}");
                return Ok(());
            }
            e = events.recv() => e,
        };
        let peermesh_node::endpoint::Received::Event(e) = e else {
            continue;
        };
        match &e.kind {
            EventKind::MemberJoined { peer, name } => {
                println!("member {name} ({peer})");
                if !greeted && args.greet.as_deref() == Some(name) {
                    greeted = true;
                    let greeting = format!("hello from {}", me.name);
                    match echo.send(*peer, greeting.as_bytes()).await {
                        Ok(()) => println!("greeted {name}"),
                        Err(e) => println!("greeting {name}: {e}"),
                    }
                }
            }
            EventKind::MemberLeft { peer } => println!("member {peer} left"),
            EventKind::PathChanged { peer, path, .. } => {
                println!("path to {peer}: {}", path_name(*path))
            }
            _ => {}
        }
    }
    router.shutdown().await;
    Ok(())
}
