//! `content-adversary`: a member of a group that misbehaves on the content protocol, for the
//! tests of fetches that no peer can stall (`tests/tests/content.rs`). It is an ordinary
//! application on the node library's public API (an [`Endpoint`] and a [`Router`]) that speaks
//! `/peermesh/content/1` with the content crate's own codec; nothing in the node under test
//! knows it is there.
//!
//! ```text
//! content-adversary --control URL --token TOKEN --state DIR --name NAME --mode MODE
//! ```
//!
//! Modes (what it does when a fetching member sends it its bitfield for a content of N
//! chunks, and when it is asked for a chunk):
//!
//! - `busy`: claims every chunk (a full bitfield of N) and answers every request `Busy`.
//! - `silent`: claims every chunk and never answers a request.
//! - `out-of-range`: names chunks past the end: a `Have` of chunk N + 3, a `Claim` of chunk
//!   N + 7 and a bitfield of N + 8 chunks, all set; answers requests `NotHere`.
//!
//! It prints a line for each thing it does (`bitfield from PEER`, `answered PEER busy`, …),
//! so a test can tell that it was asked at all.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use peermesh_content::wire::{decode, Bits, Msg, RejectReason};
use peermesh_node::{Endpoint, EndpointConfig, Incoming, NodeId, Router};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Busy,
    Silent,
    OutOfRange,
}

struct Args {
    control: String,
    token: Option<String>,
    state: PathBuf,
    name: Option<String>,
    mode: Mode,
}

fn args() -> Result<Args> {
    let (mut control, mut token, mut state, mut name, mut mode) = (None, None, None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--control" => control = Some(value()?),
            "--token" => token = Some(value()?),
            "--state" => state = Some(PathBuf::from(value()?)),
            "--name" => name = Some(value()?),
            "--mode" => {
                mode = Some(match value()?.as_str() {
                    "busy" => Mode::Busy,
                    "silent" => Mode::Silent,
                    "out-of-range" => Mode::OutOfRange,
                    other => bail!("unknown mode {other:?}: busy, silent or out-of-range"),
                })
            }
            other => bail!(
                "unknown argument {other:?}; usage: content-adversary --control URL \
                 --token TOKEN --state DIR --name NAME --mode busy|silent|out-of-range"
            ),
        }
    }
    Ok(Args {
        control: control.context("--control is needed")?,
        token,
        state: state.context("--state is needed")?,
        name,
        mode: mode.context("--mode is needed")?,
    })
}

/// What the adversary answers to `msg` from a peer; `seen` holds the (peer, content) pairs
/// whose bitfield it answered already.
fn answer(mode: Mode, from: NodeId, msg: Msg, seen: &mut HashSet<(NodeId, [u8; 32])>) -> Vec<Msg> {
    match msg {
        Msg::Bitfield {
            content, chunks, ..
        } => {
            if !seen.insert((from, content)) {
                return Vec::new();
            }
            println!("bitfield from {from}: {chunks} chunks");
            match mode {
                Mode::Busy | Mode::Silent => {
                    let mut all = Bits::new(chunks);
                    for i in 0..chunks {
                        all.set(i);
                    }
                    vec![all.to_msg(content)]
                }
                Mode::OutOfRange => {
                    let past = chunks.saturating_add(8);
                    let mut too_long = Bits::new(past);
                    for i in 0..past {
                        too_long.set(i);
                    }
                    vec![
                        Msg::Have {
                            content,
                            index: chunks.saturating_add(3),
                        },
                        Msg::Claim {
                            content,
                            index: chunks.saturating_add(7),
                        },
                        too_long.to_msg(content),
                    ]
                }
            }
        }
        Msg::Request { req, .. } => match mode {
            Mode::Busy => {
                println!("answered {from} busy");
                vec![Msg::Reject {
                    req,
                    reason: RejectReason::Busy,
                }]
            }
            Mode::Silent => {
                println!("ignored a request of {from}");
                Vec::new()
            }
            Mode::OutOfRange => {
                println!("answered {from} not here");
                vec![Msg::Reject {
                    req,
                    reason: RejectReason::NotHere,
                }]
            }
        },
        _ => Vec::new(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    let mut config = EndpointConfig::new(&args.state);
    config.control_url = Some(args.control);
    config.token = args.token;
    config.name = args.name;
    let endpoint = Endpoint::bind(config).await.context("joining the group")?;
    let mode = args.mode;
    let sender = endpoint.sender(peermesh_content::protocol());
    let router = Router::builder(endpoint.clone())
        .accept(
            peermesh_content::protocol(),
            move |mut incoming: Incoming| async move {
                let mut seen = HashSet::new();
                while let Some(m) = incoming.recv().await {
                    let Some(msg) = decode(&m.data) else {
                        continue;
                    };
                    let replies = answer(mode, m.from, msg, &mut seen);
                    if replies.is_empty() {
                        continue;
                    }
                    // Sent from a task of their own: a peer whose link is slow holds up
                    // nobody else's answers.
                    let (sender, peer) = (sender.clone(), m.from);
                    tokio::spawn(async move {
                        for r in replies {
                            if let Err(e) = sender.send(peer, &r.encode()).await {
                                println!("sending to {peer}: {e}");
                            }
                        }
                    });
                }
            },
        )
        .spawn();
    println!(
        "content adversary ({mode:?}) up as {} in group {}",
        endpoint.node_id(),
        endpoint.membership().group
    );
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        s = endpoint.stopped() => println!("stopped: {s:?}"),
    }
    router.shutdown().await;
    Ok(())
}
