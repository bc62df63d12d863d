//! Multiplayer sessions with real processes: a control server, a relay, four
//! `meshnode up`, and a `hosting-server` origin running the authoritative
//! game. Each player drives its node over its local API; inputs travel
//! between the nodes over the mesh and to the origin.
//!
//! Checks: inputs reach every other player peer-to-peer (over the mesh, from
//! the authenticated peer; the origin runs without input relaying and its
//! echoes in snapshots are counted apart), the nodes' predictions of ticks
//! use those inputs and match the origin's states of the same ticks, and at
//! the end every player's merged state is the authoritative state.
//!
//! - On loopback (always).
//! - In the NAT lab: four sites behind full-cone, port-restricted (twice)
//!   and random-symmetric NATs, the origin on the public host. Needs root,
//!   `ip` and `nft`: skipped with a printed reason otherwise, failed when
//!   CI=true.

#[path = "support/session.rs"]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use peermesh_session::state::SessionView;
use peermesh_tests::meshlab::MeshLab;
use peermesh_tests::netlab::{lab_or_skip, NatKind, SiteOpts};
use serde_json::Value;
use support::{group, play, Game, Phase, SessionOrigin, DOWN, LEFT, RIGHT, UP};

const PLAYERS: usize = 4;

/// Every player: random buttons, then a direction held, then at rest; the
/// node's view at the end of each phase, in the order of `sockets`.
fn run_session(
    names: &[String],
    sockets: &[PathBuf],
    origin: std::net::SocketAddr,
) -> Result<Vec<[SessionView; 3]>> {
    let rt = tokio::runtime::Runtime::new()?;
    let holds = [RIGHT, DOWN | LEFT, UP, LEFT | UP];
    let game = Game::new(origin, "arena", names.len());
    rt.block_on(async {
        let futs = names
            .iter()
            .zip(sockets)
            .enumerate()
            .map(|(i, (name, socket))| {
                let phases = vec![
                    // Inputs change all the time: predictions lean on peer inputs.
                    Phase::Random {
                        secs: 6.0,
                        max_ms: 300,
                    },
                    // A direction held: the merged state must track the origin exactly.
                    Phase::Hold {
                        secs: 2.0,
                        buttons: holds[i % holds.len()],
                    },
                    // Let go: the pucks come to rest.
                    Phase::Hold {
                        secs: 1.5,
                        buttons: 0,
                    },
                ];
                play(name, socket, &game, phases, 0x9e37 + i as u64)
            });
        let mut out = Vec::new();
        for r in futures::future::join_all(futs).await {
            let v: [SessionView; 3] = r?.try_into().map_err(|_| anyhow::anyhow!("three views"))?;
            out.push(v);
        }
        Ok(out)
    })
}

/// The checks of the module documentation. `world`: the origin's players
/// (`GET /sessions`), when the test can reach it.
fn check(names: &[String], views: &[[SessionView; 3]], world: Option<&Value>) -> Result<()> {
    for (name, v) in names.iter().zip(views) {
        let [random, hold, rest] = v;
        eprintln!(
            "{name} slot {} lead {} snapshots {} predictions {}/{} (mesh {}) snapshot age {:?} ms",
            rest.slot,
            rest.lead,
            rest.snapshots,
            rest.predictions.hits,
            rest.predictions.hits + rest.predictions.misses,
            rest.predictions.mesh_hits,
            rest.snapshot_age_ms
        );
        for p in &rest.peers {
            eprintln!(
                "   from slot {}: mesh {} (first {}) p50 {:?} p99 {:?} ms | echo {} (first {}) p50 {:?} ms",
                p.slot, p.mesh.inputs, p.mesh.first, p.mesh.p50_ms, p.mesh.p99_ms, p.echo.inputs, p.echo.first, p.echo.p50_ms
            );
        }

        // Inputs came peer-to-peer: from every other player, over the mesh,
        // nearly as many as that player sent. The origin relays nothing here.
        ensure!(
            rest.peers.len() == names.len() - 1,
            "{name}: {:?}",
            rest.peers
        );
        for p in &rest.peers {
            let sender = views
                .iter()
                .map(|v| &v[2])
                .find(|s| s.slot == p.slot)
                .context("the sender's view")?;
            ensure!(
                p.mesh.inputs * 10 >= sender.own_inputs * 9 && p.mesh.inputs > 100,
                "{name} got {} of {} inputs of slot {} over the mesh",
                p.mesh.inputs,
                sender.own_inputs,
                p.slot
            );
            ensure!(p.relay.inputs == 0, "the origin relayed inputs: {p:?}");
            ensure!(p.mesh.p50_ms.is_some() && p.echo.inputs > 0, "{p:?}");
        }
        support::check_merged_views(name, random, hold, rest)?;
        // At rest, every merged state is the same: the origin's.
        ensure!(rest.players.len() == names.len(), "{:?}", rest.players);
        for p in &rest.players {
            ensure!(
                p.vx == 0 && p.vy == 0,
                "{name}: slot {} still moving: {p:?}",
                p.slot
            );
            let same = views[0][2]
                .players
                .iter()
                .find(|q| q.slot == p.slot)
                .is_some_and(|q| (q.x, q.y) == (p.x, p.y));
            ensure!(same, "{name} and {} disagree on slot {}", names[0], p.slot);
            if let Some(world) = world {
                let a = world
                    .as_array()
                    .and_then(|w| w.iter().find(|q| q["slot"] == p.slot))
                    .with_context(|| format!("slot {} on the origin", p.slot))?;
                ensure!(
                    a["x"] == p.x && a["y"] == p.y && a["vx"] == 0 && a["vy"] == 0,
                    "{name}: slot {} merged at ({}, {}), the origin has {a}",
                    p.slot,
                    p.x,
                    p.y
                );
            }
        }
    }
    Ok(())
}

#[test]
fn four_players_converge_on_the_authoritative_state_with_inputs_over_the_mesh() -> Result<()> {
    let t0 = Instant::now();
    let g = group(PLAYERS, Duration::from_secs(60))?;
    let origin = SessionOrigin::start(g.lab.dir.path(), &["--tick-hz", "30"])?;
    eprintln!(
        "group and origin up after {:?}; links: {:?}",
        t0.elapsed(),
        g.paths()
    );

    let names: Vec<String> = g.nodes.iter().map(|n| n.name.clone()).collect();
    let sockets: Vec<_> = g
        .nodes
        .iter()
        .map(|n| n.state.join("meshnode.sock"))
        .collect();
    let t1 = Instant::now();
    let views = run_session(&names, &sockets, origin.udp)?;
    let authority = origin.sessions()?;
    eprintln!("played for {:?}", t1.elapsed());

    ensure!(
        authority["sessions"].as_array().map(|a| a.len()) == Some(1),
        "one session on the origin: {authority}"
    );
    let session = &authority["sessions"][0];
    ensure!(
        session["members"].as_array().map(|m| m.len()) == Some(PLAYERS),
        "{session}"
    );
    let counters = &authority["counters"];
    ensure!(
        counters["malformed"] == 0 && counters["bad_secret"] == 0,
        "{counters}"
    );
    // The origin got every player's inputs too.
    for m in session["members"].as_array().context("members")? {
        ensure!(m["inputs"].as_u64().unwrap_or(0) > 100, "{m}");
    }
    check(&names, &views, Some(&session["world"]["players"]))
}

#[test]
fn nat_lab_session_across_nat_kinds() {
    let test = "nat_lab_session_across_nat_kinds";
    let Some(lab) = lab_or_skip(test) else {
        return;
    };
    let mut m = MeshLab::new("session", lab).unwrap_or_else(|e| panic!("{test}: {e:#}"));
    if let Err(e) = nat_session(&mut m) {
        panic!("{test}: {e:#}");
    }
}

fn nat_session(m: &mut MeshLab) -> Result<()> {
    const SLOW: Duration = Duration::from_secs(60);
    peermesh_tests::Bins::get();
    m.start_public()?;
    let kinds = [
        NatKind::FullCone,
        NatKind::PortRestricted,
        NatKind::PortRestricted,
        NatKind::SymmetricRandom,
    ];
    let mut sites = Vec::new();
    for (i, k) in kinds.iter().enumerate() {
        sites.push(m.site(&format!("s{}", i + 1), *k, SiteOpts::default())?);
    }
    let mut nodes = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let token = m.token()?;
        nodes.push(m.node(&format!("p{}", i + 1), &site.host, &token)?);
    }
    for n in &nodes {
        n.wait_up(SLOW)?;
    }
    for a in &nodes {
        for b in &nodes {
            if a.name != b.name {
                support::wait_path(a, &b.name, SLOW)?;
            }
        }
    }
    // Give DCUtR a moment so that the cone pairs play over direct paths.
    std::thread::sleep(Duration::from_secs(5));
    let mut paths = Vec::new();
    for a in &nodes {
        for b in &nodes {
            if a.name != b.name {
                let p = a.path_to(&b.name).unwrap_or_default();
                paths.push(format!("{}→{}: {p}", a.name, b.name));
            }
        }
    }
    eprintln!("links: {paths:?}");

    // The origin on the public host; the nodes reach it through their NATs.
    let host = m.server().clone();
    let udp: std::net::SocketAddr = format!("{}:8090", host.ip()).parse()?;
    let content = m.dir.path().join("origin-content");
    std::fs::create_dir_all(&content)?;
    let log = m.dir.path().join("hosting-server.log");
    let mut cmd = std::process::Command::new(&peermesh_tests::Bins::get().hosting_server);
    cmd.arg("serve")
        .arg("--listen")
        .arg(udp.to_string())
        .arg("--content")
        .arg(&content)
        .args(["--tick-hz", "30"]);
    m.spawn("hosting-server", &host, cmd, &log)?;
    m.wait_log(
        &log,
        "hosting-server sessions on udp",
        "the origin to listen",
    )?;

    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let sockets: Vec<PathBuf> = nodes.iter().map(|n| n.socket()).collect();
    let views = run_session(&names, &sockets, udp)?;
    check(&names, &views, None)
}
