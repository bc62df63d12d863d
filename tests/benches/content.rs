//! Content distribution benchmark: N nodes fetch the same file at once through the mesh,
//! against N clients downloading it from the origin alone.
//!
//! ```text
//! cargo bench -p peermesh-tests --bench content -- [--nodes 4,8,16] [--size-mib 64]
//!     [--origin-mbit 100] [--json bench-results/content.json]
//! ```
//!
//! Everything runs on loopback: a control server, one relay, the origin (`hosting-server`)
//! and N `meshnode up --origin …` processes in one group (a fresh lab per N).
//!
//! **The origin's uplink.** On loopback an origin has no bandwidth limit, which no real
//! origin enjoys and which would make "from the origin alone" a measure of memcpy. The bench
//! therefore puts the origin behind a proxy (in this process) that shares one token bucket of
//! `--origin-mbit` among all its connections, origin → client; peers talk to each other
//! without a limit (each has its own uplink). Both runs go through the same proxy.
//!
//! - **mesh**: every node runs `meshnode get --json` at the same moment; time until the last
//!   one has a verified copy; origin bytes from the origin's `GET /stats` (chunk bytes);
//!   offload = 1 − origin bytes / (N × size). With every node starting cold, the best
//!   possible offload is 1 − 1/N (each chunk has to leave the origin once): 75 % for 4,
//!   87.5 % for 8, 93.75 % for 16.
//! - **origin alone**: N threads of this process each `GET /FILE` (the origin's static file
//!   route, one HTTP/1.1 download each, as a plain client would) through the proxy at the
//!   same moment; time until the last one has the whole body (BLAKE3-checked).
//!
//! Output: a table on stdout and JSON (default `bench-results/content.json`).

#[path = "../tests/support/content.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use peermesh_tests::bench::parse_list;
use peermesh_tests::Lab;
use serde_json::{json, Value};
use support::{blake3_file, make_file, wait_mesh, Get, Origin};

const MIB: u64 = 1 << 20;

struct Args {
    nodes: Vec<usize>,
    size_mib: u64,
    origin_mbit: f64,
    json: std::path::PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args {
        nodes: vec![4, 8, 16],
        size_mib: 64,
        origin_mbit: 100.0,
        json: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace")
            .join("bench-results/content.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--nodes" => a.nodes = parse_list(&it.next().context("--nodes")?, "--nodes")?,
            "--size-mib" => a.size_mib = it.next().context("--size-mib")?.parse()?,
            "--origin-mbit" => a.origin_mbit = it.next().context("--origin-mbit")?.parse()?,
            "--json" => a.json = it.next().context("--json")?.into(),
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// A token bucket shared by every connection of the proxy (bytes per second).
struct Bucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn take(&self, n: usize) {
        let n = n as f64;
        loop {
            let wait = {
                let mut s = self.state.lock().expect("bucket");
                let now = Instant::now();
                // At most 64 KiB of burst.
                s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(65536.0);
                s.1 = now;
                if s.0 >= n {
                    s.0 -= n;
                    return;
                }
                (n - s.0) / self.rate
            };
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

/// A TCP proxy to `upstream` whose upstream → client direction shares `bucket`.
fn proxy(upstream: SocketAddr, bucket: Arc<Bucket>) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            let Ok(server) = TcpStream::connect(upstream) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut c_r, mut s_w) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_r, &mut s_w);
                let _ = s_w.shutdown(std::net::Shutdown::Write);
            });
            let bucket = bucket.clone();
            let (mut s_r, mut c_w) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match s_r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    bucket.take(n);
                    if c_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// N plain HTTP downloads of `/name` at once; the time until the last one is complete.
fn origin_alone(proxy: SocketAddr, name: &str, n: usize, want: &str) -> Result<f64> {
    let start = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let path = format!("/{name}");
            let want = want.to_string();
            std::thread::spawn(move || -> Result<()> {
                let (code, body) = support::http_get(proxy, &path)?;
                ensure!(code == 200, "GET {path}: {code}");
                ensure!(blake3::hash(&body).to_hex().as_str() == want, "bad body");
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().expect("download thread")?;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn run(n: usize, a: &Args) -> Result<Value> {
    let mut lab = Lab::start()?;
    let content = lab.dir.path().join("origin-content");
    std::fs::create_dir_all(&content)?;
    let file = content.join("big.bin");
    make_file(&file, (a.size_mib * MIB) as usize, 0xbe9c + n as u64)?;
    let want = blake3_file(&file)?;
    let origin = Origin::start(&content, lab.dir.path().join("origin.log"))?;
    let id = origin.content_id("big.bin")?;
    let bucket = Arc::new(Bucket {
        rate: a.origin_mbit * 1e6 / 8.0,
        state: Mutex::new((0.0, Instant::now())),
    });
    let via = proxy(origin.addr, bucket)?;
    let url = format!("http://{via}");

    lab.server.create_group("g")?;
    let _relay = lab.relay("r1")?;
    let mut nodes = Vec::new();
    for i in 0..n {
        let t = lab.server.token("g")?;
        nodes.push(lab.node(&format!("n{i}"), Some(&t), &["--origin", &url])?);
    }
    let refs: Vec<&peermesh_tests::Node> = nodes.iter().collect();
    // Every link up, or as many as come up in two minutes: the fetch works over whatever
    // links exist, and the links still down are reported in the JSON.
    if let Err(e) = wait_mesh(&refs, Duration::from_secs(120)) {
        eprintln!("{n} nodes: not every link is up, going on: {e:#}");
    }
    // Let the links settle on their paths (direct upgrades) before timing.
    std::thread::sleep(Duration::from_secs(3));

    let links_not_up = support::links_down(&refs).len();
    let before = origin.chunk_bytes()?;
    let start = Instant::now();
    let gets: Vec<Get> = nodes
        .iter()
        .map(|nd| Get::spawn(nd, &id, lab.dir.path().join(format!("{}.out", nd.name))))
        .collect::<Result<_>>()?;
    let mut per_node = Vec::new();
    for g in gets {
        let (name, out) = (g.node.clone(), g.output.clone());
        let (r, took) = g.wait(Duration::from_secs(900))?;
        ensure!(r["file_hash"] == want.as_str(), "{name}: wrong hash: {r}");
        ensure!(blake3_file(&out)? == want, "{name}: wrong file");
        std::fs::remove_file(&out)?;
        per_node.push(json!({
            "node": name, "seconds": took.as_secs_f64(),
            "bytes_from_origin": r["bytes_from_origin"], "bytes_from_peers": r["bytes_from_peers"],
            "peers": r["peers"].as_array().map_or(0, |p| p.len()),
        }));
    }
    let mesh_secs = start.elapsed().as_secs_f64();
    let origin_bytes = origin.chunk_bytes()? - before;
    let total = n as u64 * a.size_mib * MIB;
    let offload = 1.0 - origin_bytes as f64 / total as f64;
    drop(nodes);

    let alone_secs = origin_alone(via, "big.bin", n, &want)?;
    Ok(json!({
        "nodes": n,
        "links_not_up_at_start": links_not_up,
        "size_bytes": a.size_mib * MIB,
        "origin_mbit_per_s": a.origin_mbit,
        "mesh": {
            "seconds_until_all_have_it": mesh_secs,
            "origin_bytes": origin_bytes,
            "offload_fraction_from_peers": offload,
            "best_possible_offload_cold_start": 1.0 - 1.0 / n as f64,
            "per_node": per_node,
        },
        "origin_alone": { "seconds_until_all_have_it": alone_secs, "origin_bytes": total },
        "speedup": alone_secs / mesh_secs,
    }))
}

fn main() -> Result<()> {
    let a = args()?;
    let mut results = Vec::new();
    for &n in &a.nodes {
        eprintln!("content bench: {n} nodes, {} MiB ...", a.size_mib);
        let r = run(n, &a).with_context(|| format!("{n} nodes"))?;
        eprintln!("{r}");
        results.push(r);
    }
    println!(
        "\ncontent distribution, {} MiB file, origin uplink {} Mbit/s (loopback, {} cores)\n",
        a.size_mib,
        a.origin_mbit,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>5}  {:>10}  {:>10}  {:>12}  {:>12}  {:>8}",
        "nodes", "offload", "(best)", "mesh s", "origin-only s", "speedup"
    );
    for r in &results {
        println!(
            "{:>5}  {:>9.1}%  {:>9.1}%  {:>12.2}  {:>12.2}  {:>7.2}x",
            r["nodes"],
            100.0
                * r["mesh"]["offload_fraction_from_peers"]
                    .as_f64()
                    .unwrap_or(0.0),
            100.0
                * r["mesh"]["best_possible_offload_cold_start"]
                    .as_f64()
                    .unwrap_or(0.0),
            r["mesh"]["seconds_until_all_have_it"]
                .as_f64()
                .unwrap_or(0.0),
            r["origin_alone"]["seconds_until_all_have_it"]
                .as_f64()
                .unwrap_or(0.0),
            r["speedup"].as_f64().unwrap_or(0.0),
        );
    }
    let out = json!({
        "benchmark": "content",
        "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "definitions": "offload: fraction of the N x size bytes delivered that did not come from the origin \
    (origin bytes from its GET /stats). mesh s: from starting N `meshnode get` at once until the last \
    verified copy. origin-only s: N plain HTTP downloads of the file from the origin at once. The origin \
    sits behind a proxy sharing one token bucket of origin_mbit_per_s among its connections (origin -> client); \
    peers are unlimited on loopback. best: 1 - 1/N, every chunk leaving the origin once from a cold start.",
        "machine": {"nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
                    "os": std::env::consts::OS, "arch": std::env::consts::ARCH},
        "results": results,
    });
    if let Some(dir) = a.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.json, serde_json::to_string_pretty(&out)?)?;
    println!("\nJSON: {}", a.json.display());
    Ok(())
}
