//! Scale benchmark: N nodes of one group on loopback with one relay; how
//! long until every node lists every other and every link is `direct`, and
//! what the idle group costs once it is (CPU of all node processes together
//! as a share of one core, and their resident memory).
//!
//! Run: `cargo bench -p peermesh-tests --bench scale -- [--nodes 4,8,16,32]
//! [--idle-seconds 10]`. Prints a table and writes `bench-results/scale.json`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use peermesh_tests::bench::{cpu_share, machine_info, parse_list, rss_bytes};
use peermesh_tests::{Lab, Node};
use serde_json::json;

/// Bound on each phase (a failure guard, not a target).
const PHASE: Duration = Duration::from_secs(300);
/// How often the nodes' status is read while waiting.
const POLL: Duration = Duration::from_millis(100);

struct Args {
    nodes: Vec<usize>,
    idle: Duration,
}

fn args() -> Result<Args> {
    let mut a = Args {
        nodes: vec![4, 8, 16, 32],
        idle: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--nodes" => a.nodes = parse_list(&it.next().context("--nodes N,N,…")?, "--nodes")?,
            "--idle-seconds" => {
                a.idle = Duration::from_secs_f64(it.next().context("--idle-seconds S")?.parse()?)
            }
            // cargo bench passes --bench; ignore what is not ours.
            _ => {}
        }
    }
    Ok(a)
}

/// (every node lists all others, every link direct), or how far it got.
fn progress(nodes: &[Node]) -> (usize, usize, usize) {
    let n = nodes.len();
    let (mut listed, mut direct) = (0, 0);
    for node in nodes {
        let Some(s) = node.status_typed() else {
            continue;
        };
        listed += s.peers.len().min(n - 1);
        direct += s
            .peers
            .iter()
            .filter(|p| p.path == Some(peermesh_base::PathKind::Direct))
            .count();
    }
    (listed, direct, n * (n - 1))
}

struct Run {
    nodes: usize,
    listed: Duration,
    direct: Duration,
    idle_cpu: f64,
    rss_mib: f64,
}

fn run(n: usize, idle: Duration) -> Result<Run> {
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let _relay = lab.relay("r1")?;
    let tokens: Vec<String> = (0..n)
        .map(|_| lab.server.token("g"))
        .collect::<Result<_>>()?;
    let t0 = Instant::now();
    let nodes: Vec<Node> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| lab.node(&format!("n{i}"), Some(t), &[]))
        .collect::<Result<_>>()?;
    let mut listed = None;
    let direct = loop {
        let (l, d, all) = progress(&nodes);
        if l == all && listed.is_none() {
            listed = Some(t0.elapsed());
        }
        if d == all {
            break t0.elapsed();
        }
        if t0.elapsed() > PHASE {
            lab.dump_logs();
            bail!("{n} nodes: after {PHASE:?}, {l}/{all} listed, {d}/{all} direct");
        }
        std::thread::sleep(POLL);
    };
    // Let the start-up settle (reports, reservations), then measure idle.
    std::thread::sleep(Duration::from_secs(2));
    let pids: Vec<u32> = nodes.iter().filter_map(Node::pid).collect();
    let idle_cpu = cpu_share(&pids, idle);
    let rss: u64 = pids.iter().filter_map(|p| rss_bytes(*p)).sum();
    Ok(Run {
        nodes: n,
        listed: listed.unwrap_or(direct),
        direct,
        idle_cpu,
        rss_mib: rss as f64 / (1 << 20) as f64,
    })
}

fn main() -> Result<()> {
    let a = args()?;
    peermesh_tests::Bins::get();
    let started = Instant::now();
    let mut runs = Vec::new();
    for &n in &a.nodes {
        eprintln!("scale bench: {n} nodes …");
        let r = run(n, a.idle)?;
        eprintln!(
            "  listed {:.2} s, all direct {:.2} s, idle CPU {:.1}% of a core, RSS {:.0} MiB",
            r.listed.as_secs_f64(),
            r.direct.as_secs_f64(),
            r.idle_cpu * 100.0,
            r.rss_mib
        );
        runs.push(r);
    }
    println!("\n| nodes | links | all listed s | all direct s | idle CPU (% of one core, all nodes) | per link % | RSS MiB (all nodes) |");
    println!("|---|---|---|---|---|---|---|");
    for r in &runs {
        let links = r.nodes * (r.nodes - 1);
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.1} | {:.3} | {:.0} |",
            r.nodes,
            links,
            r.listed.as_secs_f64(),
            r.direct.as_secs_f64(),
            r.idle_cpu * 100.0,
            r.idle_cpu * 100.0 / links as f64,
            r.rss_mib
        );
    }
    let out = json!({
        "benchmark": "scale",
        "command": "cargo bench -p peermesh-tests --bench scale",
        "idle_seconds": a.idle.as_secs_f64(),
        "machine": machine_info(),
        "wall_seconds": started.elapsed().as_secs_f64(),
        "results": runs.iter().map(|r| json!({
            "nodes": r.nodes,
            "links": r.nodes * (r.nodes - 1),
            "all_listed_s": r.listed.as_secs_f64(),
            "all_direct_s": r.direct.as_secs_f64(),
            "idle_cpu_fraction_of_one_core": r.idle_cpu,
            "rss_mib": r.rss_mib,
        })).collect::<Vec<_>>(),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?
        .join("bench-results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("scale.json"), serde_json::to_vec_pretty(&out)?)?;
    println!("results written to {}", dir.join("scale.json").display());
    Ok(())
}
