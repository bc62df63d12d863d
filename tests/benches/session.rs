//! Multiplayer session benchmark: input latency between players straight
//! over the mesh against the routes through the hosting server.
//!
//! Real processes on loopback: a control server, a relay, N `meshnode up`
//! (links upgraded to direct first) and a `hosting-server` with
//! `--relay-inputs`. Each player changes its buttons at random (every
//! 50–300 ms); its node stamps one input per tick and sends it at once to
//! the other members over the mesh and to the origin, which forwards it to
//! the others at once (relay) and also echoes it in its next snapshot.
//! Every receiving node times each input from the sender's send time to its
//! arrival (the processes share one clock), per route:
//!
//! - `mesh`: peer → peer over the mesh link (QUIC, direct path);
//! - `origin relay`: peer → origin → peer, forwarded on arrival (UDP);
//! - `origin snapshot`: peer → origin → peer inside the next snapshot, the
//!   route a client-server game without peer inputs has.
//!
//! Also the snapshot transit (origin send → member arrival) and age at the
//! end, and how often the merged state predicted a tick exactly.
//!
//! Run: `cargo bench -p peermesh-tests --bench session -- [--players 4]
//! [--seconds 15] [--tick-hz 30]`. Prints a table and writes
//! `bench-results/session.json`.

#[path = "../tests/support/session.rs"]
mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use peermesh_session::state::SessionView;
use serde_json::json;
use support::{group, percentile_ms, play, Game, Phase, SessionOrigin};

struct Args {
    players: usize,
    seconds: f64,
    tick_hz: u16,
}

fn args() -> Result<Args> {
    let mut a = Args {
        players: 4,
        seconds: 15.0,
        tick_hz: 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--players" => a.players = it.next().context("--players N")?.parse()?,
            "--seconds" => a.seconds = it.next().context("--seconds S")?.parse()?,
            "--tick-hz" => a.tick_hz = it.next().context("--tick-hz HZ")?.parse()?,
            // cargo bench passes --bench; ignore what is not ours.
            _ => {}
        }
    }
    anyhow::ensure!((2..=16).contains(&a.players), "--players 2..=16");
    Ok(a)
}

#[derive(Default)]
struct Route {
    samples: Vec<u32>,
}

impl Route {
    fn stats(&mut self) -> serde_json::Value {
        let n = self.samples.len();
        let mean = if n == 0 {
            None
        } else {
            Some(self.samples.iter().map(|&s| f64::from(s)).sum::<f64>() / n as f64 / 1000.0)
        };
        json!({
            "samples": n,
            "p50_ms": percentile_ms(&mut self.samples, 0.50),
            "p99_ms": percentile_ms(&mut self.samples, 0.99),
            "mean_ms": mean,
        })
    }
}

fn ms(v: &serde_json::Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.2}"))
}

fn main() -> Result<()> {
    let a = args()?;
    println!(
        "session benchmark: {} players, {} s of play at {} Hz (building binaries first)",
        a.players, a.seconds, a.tick_hz
    );
    let g = group(a.players, Duration::from_secs(60))?;
    let direct = g.wait_direct(Duration::from_secs(60)).is_ok();
    let paths = g.paths();
    let hz = a.tick_hz.to_string();
    let origin = SessionOrigin::start(g.lab.dir.path(), &["--tick-hz", &hz, "--relay-inputs"])?;

    let rt = tokio::runtime::Runtime::new()?;
    let game = Game::new(origin.udp, "bench", a.players);
    let sockets: Vec<_> = g
        .nodes
        .iter()
        .map(|n| n.state.join("meshnode.sock"))
        .collect();
    let views: Vec<SessionView> = rt.block_on(async {
        let futs = g.nodes.iter().enumerate().map(|(i, node)| {
            play(
                &node.name,
                &sockets[i],
                &game,
                vec![Phase::Random {
                    secs: a.seconds,
                    max_ms: 300,
                }],
                0x5eed + i as u64,
            )
        });
        let mut out = Vec::new();
        for r in futures::future::join_all(futs).await {
            out.push(r?.pop().context("a view")?);
        }
        anyhow::Ok(out)
    })?;

    let (mut mesh, mut relay, mut echo, mut transit) = (
        Route::default(),
        Route::default(),
        Route::default(),
        Route::default(),
    );
    let mut per_player = Vec::new();
    println!();
    println!(
        "{:<7} {:>21} {:>21} {:>21} {:>9} {:>12}",
        "player",
        "mesh p50/p99 ms",
        "origin relay p50/p99",
        "snapshot p50/p99",
        "snap age",
        "predicted"
    );
    for (node, v) in g.nodes.iter().zip(&views) {
        let (mut m, mut r, mut e) = (Route::default(), Route::default(), Route::default());
        for p in &v.peers {
            m.samples.extend(p.mesh.samples_us.iter().flatten());
            r.samples.extend(p.relay.samples_us.iter().flatten());
            e.samples.extend(p.echo.samples_us.iter().flatten());
        }
        mesh.samples.extend(&m.samples);
        relay.samples.extend(&r.samples);
        echo.samples.extend(&e.samples);
        transit
            .samples
            .extend(v.snapshot_transit.samples_us.iter().flatten());
        let (ms_, rs, es) = (m.stats(), r.stats(), e.stats());
        let total = v.predictions.hits + v.predictions.misses;
        println!(
            "{:<7} {:>10}/{:<10} {:>10}/{:<10} {:>10}/{:<10} {:>9} {:>5}/{:<6}",
            node.name,
            ms(&ms_["p50_ms"]),
            ms(&ms_["p99_ms"]),
            ms(&rs["p50_ms"]),
            ms(&rs["p99_ms"]),
            ms(&es["p50_ms"]),
            ms(&es["p99_ms"]),
            v.snapshot_age_ms.map_or("-".into(), |x| format!("{x:.1}")),
            v.predictions.hits,
            total
        );
        per_player.push(json!({
            "player": node.name,
            "slot": v.slot,
            "inputs_sent": v.own_inputs,
            "mesh": ms_,
            "origin_relay": rs,
            "origin_snapshot": es,
            "snapshot_age_ms": v.snapshot_age_ms,
            "snapshot_transit": v.snapshot_transit.p50_ms,
            "lead_ticks": v.lead,
            "predictions": {"hits": v.predictions.hits, "misses": v.predictions.misses,
                            "mesh_hits": v.predictions.mesh_hits},
            "first_arrivals": v.peers.iter().map(|p| json!({
                "from_slot": p.slot, "mesh": p.mesh.first, "relay": p.relay.first, "snapshot": p.echo.first,
            })).collect::<Vec<_>>(),
        }));
    }
    let (ms_, rs, es, ts) = (mesh.stats(), relay.stats(), echo.stats(), transit.stats());
    println!();
    println!(
        "{:<34} {:>8} {:>9} {:>9} {:>9}",
        "input latency, all players", "samples", "p50 ms", "p99 ms", "mean ms"
    );
    for (name, s) in [
        ("peer → peer over the mesh", &ms_),
        ("peer → origin → peer (relay)", &rs),
        ("peer → origin → peer (snapshot)", &es),
        ("snapshot transit origin → peer", &ts),
    ] {
        println!(
            "{:<34} {:>8} {:>9} {:>9} {:>9}",
            name,
            s["samples"],
            ms(&s["p50_ms"]),
            ms(&s["p99_ms"]),
            ms(&s["mean_ms"])
        );
    }
    println!(
        "\nlinks {}: {}",
        if direct {
            "all direct"
        } else {
            "NOT all direct"
        },
        paths.join(", ")
    );

    let out = json!({
        "benchmark": "session",
        "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "setup": {
            "players": a.players, "seconds": a.seconds, "tick_hz": a.tick_hz,
            "transport": "loopback; mesh = QUIC via libp2p (relay first, then direct); origin = UDP",
            "all_links_direct": direct, "paths": paths,
            "input_changes": "random buttons every 50-300 ms per player; one input per tick per player",
        },
        "definitions": "latency = arrival at the receiving node's session task minus the sender node's send time (one clock: same machine). mesh: straight from the peer over the mesh link; origin_relay: forwarded by the origin on arrival (hosting-server --relay-inputs); origin_snapshot: echoed in the origin's next snapshot after arrival; snapshot_transit: origin send time to member arrival; predictions: snapshots whose tick the merged state had predicted exactly",
        "input_latency": {"mesh": ms_, "origin_relay": rs, "origin_snapshot": es},
        "snapshot_transit": ts,
        "players": per_player,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("bench-results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("session.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}
