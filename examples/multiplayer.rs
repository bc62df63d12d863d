//! A multiplayer game loop over peermesh: a control server, a relay, N nodes
//! on loopback and a `hosting-server` origin that runs the authoritative
//! game. Each player is a task that drives its node over the node's local API
//! socket like a game process would: it joins the session, changes the
//! buttons it holds at random, and reads the merged state.
//!
//! Once a second it prints, per player: where its puck is in the merged
//! state, the input latency of every other player's inputs to it (over the
//! mesh, and echoed through the origin's snapshots), the age of its last
//! snapshot and how many of its predictions matched the origin.
//!
//! Run: `cargo run -p peermesh-examples --bin multiplayer -- [--players 4] [--seconds 10]`

#[path = "../tests/tests/support/session.rs"]
mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use peermesh_session::ops::SessionClient;
use peermesh_session::state::SessionView;
use support::{group, play, Game, Phase, SessionOrigin};

fn arg(name: &str, default: f64) -> Result<f64> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()?),
        None => Ok(default),
    }
}

fn show(name: &str, v: &SessionView) {
    let me = v.players.iter().find(|p| p.slot == v.slot);
    let pos = me.map_or("-".into(), |p| format!("({:>5},{:>5})", p.x, p.y));
    let lat: Vec<String> = v
        .peers
        .iter()
        .map(|p| {
            let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
            format!(
                "s{}: mesh {}/{} origin {}/{}",
                p.slot,
                f(p.mesh.p50_ms),
                f(p.mesh.p99_ms),
                f(p.echo.p50_ms),
                f(p.echo.p99_ms)
            )
        })
        .collect();
    println!(
        "{name:<4} slot {} tick {:>5} puck {pos} age {:>5} ms  predicted {}/{}  | input p50/p99 ms  {}",
        v.slot,
        v.tick,
        v.snapshot_age_ms
            .map_or("-".into(), |a| format!("{a:.1}")),
        v.predictions.hits,
        v.predictions.hits + v.predictions.misses,
        lat.join("  ")
    );
}

fn main() -> Result<()> {
    let players = arg("--players", 4.0)? as usize;
    let seconds = arg("--seconds", 10.0)?;
    anyhow::ensure!((2..=16).contains(&players), "--players 2..=16");
    println!("building the binaries and starting {players} nodes (first run takes a few minutes)…");
    let g = group(players, Duration::from_secs(60))?;
    let origin = SessionOrigin::start(g.lab.dir.path(), &["--tick-hz", "30"])?;
    println!(
        "origin: http://{} (GET /sessions), sessions on udp {}",
        origin.http, origin.udp
    );
    println!("links: {}", g.paths().join(", "));

    let rt = tokio::runtime::Runtime::new()?;
    let sockets: Vec<_> = g
        .nodes
        .iter()
        .map(|n| n.state.join("meshnode.sock"))
        .collect();
    rt.block_on(async {
        let game = Game::new(origin.udp, "demo", players);
        let games = futures::future::join_all(g.nodes.iter().enumerate().map(|(i, n)| {
            play(
                &n.name,
                &sockets[i],
                &game,
                vec![Phase::Random {
                    secs: seconds,
                    max_ms: 400,
                }],
                0xfeed + i as u64,
            )
        }));
        let printer = async {
            // Wait until everyone joined, then show every player once a second.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut clients = Vec::new();
            for n in &g.nodes {
                clients.push(SessionClient::connect(&n.state.join("meshnode.sock")).await?);
            }
            loop {
                println!();
                for (n, c) in g.nodes.iter().zip(clients.iter_mut()) {
                    match c.view(false).await {
                        Ok(v) => show(&n.name, &v),
                        Err(e) => println!("{:<4} {e}", n.name),
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        };
        tokio::select! {
            r = games => {
                for r in r {
                    let views = r?;
                    if let Some(v) = views.last() {
                        println!("final: slot {} own inputs {} predictions {:?}/{:?} drops {:?}",
                            v.slot, v.own_inputs, v.predictions.hits, v.predictions.misses, v.drops);
                    }
                }
            }
            r = printer => r?,
        }
        anyhow::Ok(())
    })?;
    println!("\norigin's view: {}", origin.sessions()?);
    Ok(())
}
