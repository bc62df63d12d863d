//! Shared by `tests/session.rs`, `benches/session.rs` and the multiplayer
//! example: the origin (`hosting-server`) with its session endpoint as a
//! process on loopback, a group of nodes with links up, and players that
//! drive their node's session over its local API.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use peermesh_session::ops::SessionClient;
use peermesh_session::state::SessionView;
use peermesh_tests::hosting::{http_get, HostingServer};
use peermesh_tests::{wait_for, Lab, Node, Relay};
use serde_json::Value;

/// Button bits of the game (see `peermesh_session::game::Buttons`).
pub const UP: u8 = 1;
pub const DOWN: u8 = 2;
pub const LEFT: u8 = 4;
pub const RIGHT: u8 = 8;

/// A running `hosting-server serve` on loopback, with its session endpoint.
pub struct SessionOrigin {
    server: HostingServer,
    pub http: SocketAddr,
    pub udp: SocketAddr,
}

impl SessionOrigin {
    /// Starts the origin with an empty content directory under `dir`;
    /// `extra` are more `serve` flags (`--tick-hz 60`, `--relay-inputs`).
    pub fn start(dir: &Path, extra: &[&str]) -> Result<Self> {
        let content = dir.join("origin-content");
        std::fs::create_dir_all(&content)?;
        let server = HostingServer::spawn(&content, extra, dir.join("hosting-server.log"))?;
        let udp = wait_for(
            Duration::from_secs(60),
            "the origin's session endpoint",
            || {
                let text = server.log_text();
                let line = text
                    .lines()
                    .find(|l| l.starts_with("hosting-server sessions on udp "))?;
                line.rsplit(' ').next()?.parse::<SocketAddr>().ok()
            },
        )?;
        Ok(Self {
            http: server.addr,
            udp,
            server,
        })
    }

    /// `GET /sessions`.
    pub fn sessions(&self) -> Result<Value> {
        let (code, body) = http_get(self.http, "/sessions")?;
        ensure!(code == 200, "GET /sessions: {code}");
        Ok(serde_json::from_slice(&body)?)
    }

    pub fn log(&self) -> String {
        self.server.log_text()
    }
}

/// A control server, a relay and `n` nodes whose links to each other are up.
pub struct Group {
    pub lab: Lab,
    pub relay: Relay,
    pub nodes: Vec<Node>,
}

pub fn group(n: usize, link_timeout: Duration) -> Result<Group> {
    let mut lab = Lab::start()?;
    lab.server.create_group("game")?;
    let relay = lab.relay("r1")?;
    let names: Vec<String> = (1..=n).map(|i| format!("p{i}")).collect();
    let mut nodes = Vec::new();
    for name in &names {
        let t = lab.server.token("game")?;
        nodes.push(lab.node(name, Some(&t), &[])?);
    }
    for node in &nodes {
        let others: Vec<&str> = names
            .iter()
            .filter(|x| **x != node.name)
            .map(|s| s.as_str())
            .collect();
        node.wait_peers(&others, link_timeout)?;
        for o in &others {
            wait_for(
                link_timeout,
                &format!("a link {} → {o}", node.name),
                || {
                    let p = node.path_to(o)?;
                    (p != "connecting").then_some(())
                },
            )?;
        }
    }
    Ok(Group { lab, relay, nodes })
}

impl Group {
    /// Waits until every link is direct.
    pub fn wait_direct(&self, timeout: Duration) -> Result<()> {
        for a in &self.nodes {
            for b in &self.nodes {
                if a.name != b.name {
                    wait_for(
                        timeout,
                        &format!("a direct path {} → {}", a.name, b.name),
                        || (a.path_to(&b.name)? == "direct").then_some(()),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Every link's path, "a→b: path".
    pub fn paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        for a in &self.nodes {
            for b in &self.nodes {
                if a.name != b.name {
                    let p = a.path_to(&b.name).unwrap_or_else(|| "?".into());
                    out.push(format!("{}→{}: {p}", a.name, b.name));
                }
            }
        }
        out
    }
}

/// What a player does for a while.
#[derive(Clone, Copy, Debug)]
pub enum Phase {
    /// New random buttons every 50..`max_ms` ms.
    Random { secs: f64, max_ms: u64 },
    /// Hold these buttons.
    Hold { secs: f64, buttons: u8 },
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The session that players join, and the barrier that keeps their phases in step.
pub struct Game {
    /// The origin's session endpoint.
    pub origin: SocketAddr,
    pub session: String,
    pub players: usize,
    pub barrier: tokio::sync::Barrier,
}

impl Game {
    pub fn new(origin: SocketAddr, session: &str, players: usize) -> Arc<Self> {
        Arc::new(Self {
            origin,
            session: session.to_string(),
            players,
            barrier: tokio::sync::Barrier::new(players),
        })
    }
}

/// A player: joins the game's session on the origin through the node whose
/// local API socket is `socket`, waits until all players are in the roster,
/// plays the phases (in step with the other players: every phase starts
/// after all finished the previous one) and returns its node's view at the
/// end of each phase.
pub async fn play(
    name: &str,
    socket: &Path,
    game: &Game,
    phases: Vec<Phase>,
    seed: u64,
) -> Result<Vec<SessionView>> {
    let (origin, session, players, barrier) =
        (game.origin, &game.session, game.players, &game.barrier);
    let mut c = SessionClient::connect(socket).await?;
    let joined = c.join(&origin.to_string(), session).await?;
    let start = Instant::now();
    loop {
        let v = c.view(false).await?;
        if v.peers.len() + 1 == players && v.snapshots > 0 {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "{} (slot {}) sees {} of {players} players",
                name,
                joined.slot,
                v.peers.len() + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut rng = seed | 1;
    let mut views = Vec::new();
    for phase in phases {
        barrier.wait().await;
        match phase {
            Phase::Random { secs, max_ms } => {
                let end = Instant::now() + Duration::from_secs_f64(secs);
                while Instant::now() < end {
                    c.set_buttons((xorshift(&mut rng) % 16) as u8).await?;
                    let ms = 50 + xorshift(&mut rng) % max_ms.saturating_sub(50).max(1);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            Phase::Hold { secs, buttons } => {
                c.set_buttons(buttons).await?;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
        }
        views.push(c.view(true).await?);
    }
    barrier.wait().await;
    Ok(views)
}

/// Nearest-rank percentile of µs samples, in ms.
pub fn percentile_ms(samples: &mut [u32], q: f64) -> Option<f64> {
    samples.sort_unstable();
    peermesh_session::state::percentile(samples, q)
}

/// Waits until `node` (in the NAT lab) has a link to `peer` that carries
/// traffic (relay, direct or forwarded through a member); returns the path.
pub fn wait_path(
    node: &peermesh_tests::meshlab::MeshNode,
    peer: &str,
    timeout: Duration,
) -> Result<String> {
    wait_for(timeout, &format!("a link {} → {peer}", node.name), || {
        let p = node.path_to(peer)?;
        (p != "connecting").then_some(p)
    })
}

/// What every player's merged session view must show, by phase (inputs
/// changing, then held, then at rest): nothing dropped as forged or
/// malformed; while inputs changed, predictions that used a peer's input
/// from the mesh matched the origin's states; held steady and at rest, the
/// merged state tracks the origin tick for tick.
pub fn check_merged_views(
    name: &str,
    random: &SessionView,
    hold: &SessionView,
    rest: &SessionView,
) -> Result<()> {
    let d = &rest.drops;
    ensure!(
        d.impostor_mesh == 0 && d.malformed_mesh == 0 && d.malformed_udp == 0,
        "{name}: {d:?}"
    );
    ensure!(
        random.predictions.mesh_hits >= 5,
        "{name}: only {} predictions used a mesh input and matched ({:?})",
        random.predictions.mesh_hits,
        random.predictions
    );
    for (phase, view) in [("hold", hold), ("rest", rest)] {
        let last: Vec<_> = view.predictions.recent.iter().rev().take(20).collect();
        ensure!(last.len() == 20, "{name}: {} comparisons", last.len());
        for c in last {
            ensure!(
                c.predicted == c.authoritative,
                "{name} ({phase}): tick {} predicted {:x}, the origin had {:x}",
                c.tick,
                c.predicted,
                c.authoritative
            );
        }
    }
    Ok(())
}
