//! Throughput and RTT through the mesh interface (`meshnode up --tun`) in
//! the NAT lab, against the same measurement between the same namespaces
//! without the mesh.
//!
//! Lab: a public host with the control server and a relay, and two sites
//! whose hosts sit on the public bridge with their own addresses (no NAT),
//! so the "without the mesh" baseline runs between the very same network
//! namespaces over their underlay addresses. One `meshnode up --tun` per
//! site host.
//!
//! Per interface MTU (`--mtu`, a list; each gets a fresh lab and nodes):
//!   underlay   host a → host b on the underlay addresses (no mesh)
//!   direct     host a → b's mesh IPv4 through the interfaces, link direct
//!   relay      the same after cutting the UDP between the sites: the link
//!              runs through the relay
//! and for each:
//!   TCP        one connection, one thread writing 1 MiB buffers for
//!              `--seconds`; received bytes over the receiver's first byte
//!              to end of stream
//!   UDP        1400-byte datagrams, one `sendto` each, as fast as one
//!              thread sends for `--seconds`; goodput and delivered fraction
//!   RTT        UDP echo of 64 bytes, `--rtt-samples` sequential round trips;
//!              p50 and p99
//! Fractions are of the underlay figure. Userspace WireGuard (boringtun) is
//! not set up in this lab: not measured.
//!
//! Prints a table and writes JSON (`--json`, default
//! `bench-results/tun.json` under the workspace root).
//!
//! ```sh
//! cargo bench -p peermesh-tests --bench tun -- [--mtu 65000,1500] [--seconds 3]
//! ```

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use peermesh_tests::bench::parse_list;
use peermesh_tests::meshlab::{poll, udp_goodput, MeshLab, MeshNode};
use peermesh_tests::netlab::{lab_or_skip, NatKind, Ns, SiteOpts};
use serde_json::{json, Value};

const SLOW: Duration = Duration::from_secs(30);
const UDP_SIZE: usize = 1400;
const IFACE: &str = "pmbench0";

struct Args {
    mtus: Vec<u16>,
    seconds: f64,
    rtt_samples: usize,
    json: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        mtus: vec![peermesh_tun::DEFAULT_MTU, 1500],
        seconds: 3.0,
        rtt_samples: 500,
        json: Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace")
            .join("bench-results/tun.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--mtu" => a.mtus = parse_list(&value()?, "--mtu")?,
            "--seconds" => a.seconds = value()?.parse()?,
            "--rtt-samples" => a.rtt_samples = value()?.parse()?,
            "--json" => a.json = PathBuf::from(value()?),
            // What `cargo bench` passes to every bench.
            "--bench" => {}
            "-h" | "--help" => {
                println!("cargo bench -p peermesh-tests --bench tun -- [--mtu 65000,1500] [--seconds 3] [--rtt-samples 500] [--json PATH]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

/// One TCP connection from `from` to `to` at `dst`, written to for `secs`.
fn tcp_throughput(from: &Ns, to: &Ns, dst: SocketAddr, secs: f64) -> Result<Value> {
    let listener = to.tcp_listen(dst)?;
    let receiver = std::thread::spawn(move || -> Result<(u64, f64)> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut total, mut first) = (0u64, None);
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            total += n as u64;
        }
        let secs = first.map_or(0.0, |f: Instant| f.elapsed().as_secs_f64());
        Ok((total, secs))
    });
    let mut c = from.tcp_connect(dst, Duration::from_secs(10))?;
    c.set_nodelay(false)?;
    let buf = vec![0xa5u8; 1 << 20];
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        c.write_all(&buf)?;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let (bytes, seconds) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(json!({
        "bytes": bytes,
        "seconds": seconds,
        "mbit_per_s": bytes as f64 * 8.0 / seconds.max(1e-9) / 1e6,
    }))
}

/// Sequential 64-byte UDP round trips from `from` to an echo in `to`.
fn udp_rtt(from: &Ns, to: &Ns, dst: SocketAddr, samples: usize) -> Result<Value> {
    let echo = to.udp_bind(dst)?;
    echo.set_read_timeout(Some(Duration::from_millis(200)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], peer);
            }
        }
    });
    let unspecified: SocketAddr = match dst.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse()?,
        IpAddr::V6(_) => "[::]:0".parse()?,
    };
    let c: UdpSocket = from.udp_bind(unspecified)?;
    c.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut rtts = Vec::with_capacity(samples);
    let mut lost = 0usize;
    let mut buf = [0u8; 2048];
    for i in 0..samples + 20 {
        let msg = (i as u64).to_be_bytes().repeat(8);
        let t = Instant::now();
        c.send_to(&msg, dst)?;
        loop {
            match c.recv_from(&mut buf) {
                Ok((n, _)) if buf[..n] == msg[..] => {
                    // The first 20 warm up (ARP, route caches, link queues).
                    if i >= 20 {
                        rtts.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    break;
                }
                Ok(_) => continue, // a late answer to an earlier probe
                Err(_) => {
                    lost += 1;
                    break;
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    if rtts.is_empty() {
        bail!("no UDP echo answered at {dst}");
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| rtts[((rtts.len() - 1) as f64 * p).round() as usize];
    Ok(json!({"samples": rtts.len(), "lost": lost, "p50_ms": q(0.5), "p99_ms": q(0.99)}))
}

fn udp_json(from: &Ns, to: &Ns, dst: SocketAddr, secs: f64) -> Result<Value> {
    let g = udp_goodput(
        from,
        to,
        dst,
        dst,
        UDP_SIZE,
        1,
        Duration::from_secs_f64(secs),
    )?;
    Ok(json!({
        "datagram_bytes": g.datagram_bytes,
        "sent_bytes": g.sent,
        "received_bytes": g.received,
        "delivered_fraction": g.received as f64 / g.sent.max(1) as f64,
        "seconds": g.seconds,
        "mbit_per_s": g.mbit_per_s,
    }))
}

/// TCP, UDP and RTT from `from` to `to` at `ip`.
fn measure(from: &Ns, to: &Ns, ip: IpAddr, base_port: u16, a: &Args) -> Result<Value> {
    let tcp = tcp_throughput(from, to, SocketAddr::new(ip, base_port), a.seconds)?;
    let udp = udp_json(from, to, SocketAddr::new(ip, base_port + 1), a.seconds)?;
    let rtt = udp_rtt(from, to, SocketAddr::new(ip, base_port + 2), a.rtt_samples)?;
    Ok(json!({"tcp": tcp, "udp": udp, "rtt": rtt}))
}

fn mesh_v4(node: &MeshNode, peer: &str) -> Option<(IpAddr, bool)> {
    let s = node.status()?;
    let up = s.tun.as_ref()?.up;
    let p = s.peers.iter().find(|p| p.name == peer)?;
    Some((p.mesh_ipv4.as_ref()?.parse().ok()?, up))
}

fn run_mtu(mtu: u16, a: &Args) -> Result<Value> {
    let Some(lab) = lab_or_skip("tun bench") else {
        bail!("the NAT lab is unavailable (needs root, ip, nft)");
    };
    let mut m = MeshLab::new(&format!("tunbench-{mtu}"), lab)?;
    let r = (|| -> Result<Value> {
        m.start_public()?;
        let sa = m.site("sa", NatKind::None, SiteOpts::default())?;
        let sb = m.site("sb", NatKind::None, SiteOpts::default())?;
        let (ta, tb) = (m.token()?, m.token()?);
        let mtu_s = mtu.to_string();
        let args = ["--tun", "--tun-name", IFACE, "--tun-mtu", &mtu_s];
        let na = m.node_with("a", &sa.host, &ta, &args)?;
        let nb = m.node_with("b", &sb.host, &tb, &args)?;
        let b_mesh = poll(SLOW, Duration::from_millis(50), "a's interface up", || {
            mesh_v4(&na, "b").and_then(|(ip, up)| up.then_some(ip))
        })?;
        poll(SLOW, Duration::from_millis(50), "b's interface up", || {
            mesh_v4(&nb, "a").and_then(|(_, up)| up.then_some(()))
        })?;
        poll(SLOW, Duration::from_millis(50), "the link direct", || {
            (na.path_to("b").as_deref() == Some("direct")).then_some(())
        })?;
        // Let the link settle (RTT probes, the relay path idle).
        std::thread::sleep(Duration::from_secs(1));
        let b_under = IpAddr::V4(sb.host.ip());
        eprintln!("[mtu {mtu}] underlay {b_under}, mesh {b_mesh}");
        let underlay = measure(&sa.host, &sb.host, b_under, 5201, a)?;
        eprintln!("[mtu {mtu}] underlay {underlay}");
        let direct = measure(&sa.host, &sb.host, b_mesh, 5301, a)?;
        eprintln!("[mtu {mtu}] direct {direct}");
        m.lab.cut(&sa, sb.public_ip())?;
        poll(
            SLOW,
            Duration::from_millis(50),
            "the link on the relay",
            || (na.path_to("b").as_deref() == Some("relay")).then_some(()),
        )?;
        std::thread::sleep(Duration::from_secs(1));
        let relay = measure(&sa.host, &sb.host, b_mesh, 5401, a)?;
        eprintln!("[mtu {mtu}] relay {relay}");
        let tun_a = na.status().and_then(|s| s.tun);
        let tun_b = nb.status().and_then(|s| s.tun);
        Ok(json!({
            "mtu": mtu,
            "underlay": underlay,
            "mesh_direct": direct,
            "mesh_relay": relay,
            "tun_counters": {"a": tun_a, "b": tun_b},
        }))
    })();
    if r.is_err() {
        m.dump_logs(40);
    }
    r
}

fn frac(v: &Value, base: &Value, path: &[&str]) -> f64 {
    let get = |v: &Value| path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(0.0);
    let b = get(base);
    if b > 0.0 {
        get(v) / b
    } else {
        0.0
    }
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let mut runs = Vec::new();
    for &mtu in &a.mtus {
        runs.push(run_mtu(mtu, &a)?);
    }
    println!();
    println!(
        "{:>6} {:<9} {:>12} {:>7} {:>12} {:>7} {:>9} {:>9} {:>9}",
        "MTU",
        "PATH",
        "TCP Mbit/s",
        "×under",
        "UDP Mbit/s",
        "deliv",
        "×under",
        "RTT p50",
        "RTT p99"
    );
    for r in &runs {
        let base = &r["underlay"];
        for (label, key) in [
            ("underlay", "underlay"),
            ("direct", "mesh_direct"),
            ("relay", "mesh_relay"),
        ] {
            let v = &r[key];
            println!(
                "{:>6} {:<9} {:>12.0} {:>7.2} {:>12.0} {:>7.2} {:>9.2} {:>7.3}ms {:>7.3}ms",
                r["mtu"],
                label,
                v["tcp"]["mbit_per_s"].as_f64().unwrap_or(0.0),
                frac(v, base, &["tcp", "mbit_per_s"]),
                v["udp"]["mbit_per_s"].as_f64().unwrap_or(0.0),
                v["udp"]["delivered_fraction"].as_f64().unwrap_or(0.0),
                frac(v, base, &["udp", "mbit_per_s"]),
                v["rtt"]["p50_ms"].as_f64().unwrap_or(0.0),
                v["rtt"]["p99_ms"].as_f64().unwrap_or(0.0),
            );
        }
    }
    println!("boringtun (userspace WireGuard): not measured (not set up in this lab)");
    let machine = json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    let out = json!({
        "benchmark": "tun",
        "definitions": "underlay: host a -> host b on their own addresses (no mesh), same namespaces; \
            direct/relay: a -> b's mesh IPv4 through the TUN interfaces with the link direct, \
            then with the sites' UDP cut (link on the relay). TCP: one connection, 1 MiB writes, \
            receiver's first byte to end of stream. UDP: 1400-byte datagrams, one sendto each, \
            one sender thread; goodput at the receiver. RTT: sequential 64-byte UDP echoes.",
        "seconds_per_measurement": a.seconds,
        "machine": machine,
        "boringtun": "not measured",
        "runs": runs,
    });
    if let Some(dir) = a.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.json, serde_json::to_string_pretty(&out)? + "\n")?;
    println!("wrote {}", a.json.display());
    Ok(())
}
