//! Connectivity benchmark: the real `control-server` and `meshnode`
//! processes behind real kernel NATs (the netlab), pair by pair.
//!
//! ```text
//! cargo bench -p peermesh-tests --bench connectivity -- --trials 5
//! ```
//!
//! Needs root, `ip` and `nft`. Every process and every packet stays inside
//! the lab's namespaces (and the nodes' Unix sockets); every wait is
//! bounded; the namespaces are removed after every trial, also on failure.
//!
//! # Pairs
//!
//! Two sites `sa` and `sb` behind NAT routers of the pair's kinds (with the
//! home-router WAN firewall unless the pair says otherwise), a public host
//! with the control server and one relay. `fc-fc` (full cone × full cone),
//! `pr-pr` (port-restricted × port-restricted), `fc-pr`, `none-pr` (an open
//! address × port-restricted), `sym-sym` (random symmetric × random
//! symmetric, where no direct path can exist: its direct success rate is
//! expected to be 0/N, and it is reported as measured), `seq-pr` and
//! `seq-seq` (sequential symmetric), `pr-pr-dcutr` (stock libp2p DCUtR
//! instead of the control server's rendezvous), and for the punch from
//! probe sockets:
//!
//! - `pr-pr-nofw`: port-restricted × port-restricted, both routers without
//!   the WAN firewall (an early punch packet that reaches the peer's router
//!   takes the port there; probe mode's low-TTL opening packets die before
//!   it);
//! - `rand-pr` and `rand-fc`: random symmetric × port-restricted / full
//!   cone, where only probe mode's birthday search (256 sockets on the
//!   random side, up to 1536 probed ports on the other) finds a direct path.
//!
//! # Trials (`--trials N` per pair, each in a fresh lab)
//!
//! The nodes `a` (on `sa`) and `b` (on `sb`) are started at the same time;
//! `meshnode recv --json` is attached to `b` as soon as `b` answers on its
//! socket. The bench reads `a`'s status (in-process, from its socket) every
//! 5 ms; as soon as `b` is listed, it issues `meshnode send --state a b
//! first-byte`; this moment is the start `t0` of both times:
//!
//! - **time to first byte** (TTFB): from `t0` until `b`'s `recv` prints the
//!   message (the bench reads `recv`'s stdout on a thread and stamps each
//!   line as it arrives). Should the send be refused because the link is not
//!   set up yet, it is repeated at once; the time still counts from `t0`.
//! - **time to direct** (TTD): from `t0` until `a`'s link to `b` switches to
//!   `direct`: the timestamp of the `link path peer=… path="direct"` line
//!   that the node logs when its link's path changes (RFC 3339, µs; the same
//!   wall clock as `t0`). Trials that do not reach `direct` within
//!   `--direct-timeout` seconds of `t0` count as failures in the success
//!   rate and are left out of the TTD percentiles. As a cross-check, a
//!   thread also polls `a`'s status every 5 ms from `t0`; the first time it
//!   shows `direct` is in the JSON (`time_to_direct_status_poll_ms`).
//! - **punch statistics**: after the trial (direct or not) both nodes'
//!   status is read for the other's `punch` object; the trial records the
//!   probe sockets' datagrams (`probe_packets`, a + b), the birthday probes
//!   (`birthday_probes`, a + b), and the quic-mode and probe-mode attempts
//!   (`quic_attempts`, `probe_attempts`, a + b); the JSON keeps both sides'
//!   whole objects. The table shows the median of the probe packets over
//!   the trials (`probe pkts p50`) and the mean attempts per trial
//!   (`attempts quic/probe`).
//!
//! Percentiles interpolate linearly between the closest ranks (p90 of five
//! samples lies between the fourth and the fifth).
//!
//! # Throughput and RTT (once per pair, in one more fresh lab)
//!
//! - **raw UDP**: before the nodes start, a UDP port of `sb`'s router is
//!   forwarded to `sb`'s host, and the bench sends 1200-byte datagrams as
//!   fast as one thread can from a socket in `sa`'s host to it (through
//!   `sa`'s NAT and `sb`'s port forward) for `--udp-seconds`; goodput is the
//!   payload received over the time from the first datagram to the last.
//!   The baseline sends 10 datagrams per system call with UDP GSO
//!   (`UDP_SEGMENT`) and receives with `UDP_GRO`, as the nodes' QUIC stack
//!   (quinn) does; one `sendto` per datagram is measured too (`raw 1/call`):
//!   it is bound by system calls, and the mesh, which batches, can beat it.
//! - **mesh direct** (when the pair reaches `direct`): `meshnode sink` on `b`,
//!   `meshnode blast` of 64 KiB messages on `a`; the sink's rate from its
//!   first byte to its last. An 8 MiB probe sizes the real run to about
//!   `--blast-seconds` (16 MiB to 1 GiB).
//! - **mesh relay**: the same over the relay. For a pair that went direct,
//!   the bench then cuts the direct path (netlab `cut`: `sa`'s UDP to and
//!   from `sb`'s public address is dropped, the relay stays reachable) and
//!   waits until `a` logs `relay`; `sym-sym` is on the relay anyway.
//! - Both are also reported as a fraction of the raw UDP goodput of the
//!   same lab.
//! - **RTT**: the median `rtt_ms` (the node's smoothed RTT of the active
//!   path) of `meshnode ping --json -c N` samples, one a second, taken on
//!   `direct` (3 s after the switch, before the throughput run) and on
//!   `relay` (3 s after the cut, before the throughput run); samples on
//!   another path are dropped.
//!
//! # Output
//!
//! A table on stdout (per pair: the direct success rate, TTFB and TTD
//! percentiles, probe packets p50, attempts quic/probe, throughput, RTT)
//! and JSON at `--json` (default `bench-results/connectivity.json`,
//! relative to the workspace root) with every trial's times, errors, `a`'s
//! path changes and both sides' punch statistics. The logs of a failed
//! trial are kept in a `peermesh-failed-*` directory under the system
//! temporary directory; its path is in the JSON.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use peermesh_base::status::PunchStats;
use peermesh_tests::meshlab::{
    forward_udp, udp_goodput, MeshLab, MeshNode, SinkResult, UdpGoodput,
};
use peermesh_tests::netlab::{Lab, NatKind, SiteOpts};
use peermesh_tests::Bins;
use serde_json::{json, Value};

const USAGE: &str = "\
connectivity benchmark (needs root, ip, nft)

options:
  --trials N            trials per pair (default 5)
  --pairs P[,P…]        pairs to run, out of fc-fc, pr-pr, fc-pr, none-pr,
                        sym-sym, seq-pr, seq-seq, pr-pr-dcutr (stock
                        DCUtR instead of the rendezvous), pr-pr-nofw (both
                        routers without WAN firewall), rand-pr and rand-fc
                        (random symmetric × port-restricted / full cone:
                        birthday search); default all
  --json PATH           where to write the results; relative to the workspace
                        root (default bench-results/connectivity.json)
  --direct-timeout S    how long a trial waits for `direct` after the first
                        send (default 20)
  --udp-seconds S       raw UDP blast duration (default 3)
  --blast-seconds S     target duration of a mesh throughput run (default 4)
  --pings N             ping samples per path (default 6)
  --no-throughput       only the trials
Unknown flags (such as cargo's --bench) are ignored.";

/// The namespace prefix of this bench's labs.
const LAB_PREFIX: &str = "pmconn";
/// Bound for start-up: nodes answering, listing each other.
const SLOW: Duration = Duration::from_secs(30);
/// The status poll interval of a trial.
const POLL: Duration = Duration::from_millis(5);
/// Bound for the switch to the relay after a cut (QUIC idle timeout 3 s).
const TO_RELAY: Duration = Duration::from_secs(15);
/// The UDP port forwarded on `sb`'s router for the raw UDP run.
const RAW_UDP_PORT: u16 = 45999;
const RAW_UDP_SIZE: usize = 1200;
const BLAST_SIZE: usize = 64 << 10;
const PROBE_BYTES: u64 = 8 << 20;
const MIN_BLAST: u64 = 16 << 20;
const MAX_BLAST: u64 = 1 << 30;
/// Datagrams per send call of the GSO raw UDP run: quinn's batch
/// (`MAX_TRANSMIT_SEGMENTS`), which the nodes' QUIC transport uses.
const RAW_UDP_SEGMENTS: usize = 10;
const FIRST: &str = "first-byte";
/// Quiet time on a path before its RTT samples.
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug)]
struct PairSpec {
    key: &'static str,
    a: NatKind,
    b: NatKind,
    /// Both routers without the home-router WAN firewall
    /// ([`SiteOpts::without_wan_firewall`]).
    no_wan_firewall: bool,
    /// Extra `meshnode up` arguments for both nodes.
    extra: &'static [&'static str],
}

impl PairSpec {
    /// The router options of both sites.
    fn site_opts(&self) -> SiteOpts {
        if self.no_wan_firewall {
            SiteOpts::without_wan_firewall()
        } else {
            SiteOpts::default()
        }
    }

    /// `pr-pr (port-restricted×port-restricted)`, with the routers' option.
    fn describe(&self) -> String {
        format!(
            "{} ({}×{}{})",
            self.key,
            kind_name(self.a),
            kind_name(self.b),
            if self.no_wan_firewall {
                ", no WAN firewall"
            } else {
                ""
            }
        )
    }
}

const PAIRS: [PairSpec; 11] = [
    PairSpec {
        key: "fc-fc",
        a: NatKind::FullCone,
        b: NatKind::FullCone,
        no_wan_firewall: false,
        extra: &[],
    },
    PairSpec {
        key: "pr-pr",
        a: NatKind::PortRestricted,
        b: NatKind::PortRestricted,
        no_wan_firewall: false,
        extra: &[],
    },
    PairSpec {
        key: "fc-pr",
        a: NatKind::FullCone,
        b: NatKind::PortRestricted,
        no_wan_firewall: false,
        extra: &[],
    },
    PairSpec {
        key: "none-pr",
        a: NatKind::None,
        b: NatKind::PortRestricted,
        no_wan_firewall: false,
        extra: &[],
    },
    PairSpec {
        key: "sym-sym",
        a: NatKind::SymmetricRandom,
        b: NatKind::SymmetricRandom,
        no_wan_firewall: false,
        extra: &[],
    },
    // Sequential symmetric NATs (port prediction is not wired to the
    // mesh's sockets yet: these show where that leaves them).
    PairSpec {
        key: "seq-pr",
        a: NatKind::SymmetricSequential,
        b: NatKind::PortRestricted,
        no_wan_firewall: false,
        extra: &[],
    },
    PairSpec {
        key: "seq-seq",
        a: NatKind::SymmetricSequential,
        b: NatKind::SymmetricSequential,
        no_wan_firewall: false,
        extra: &[],
    },
    // Stock libp2p DCUtR instead of the rendezvous, for comparison.
    PairSpec {
        key: "pr-pr-dcutr",
        a: NatKind::PortRestricted,
        b: NatKind::PortRestricted,
        no_wan_firewall: false,
        extra: &["--punch", "dcutr"],
    },
    // Routers without a WAN firewall: an early punch packet reaching the
    // peer's router takes the port there (the NAT then maps its host to
    // another one); low-TTL opening packets from probe sockets die first.
    PairSpec {
        key: "pr-pr-nofw",
        a: NatKind::PortRestricted,
        b: NatKind::PortRestricted,
        no_wan_firewall: true,
        extra: &[],
    },
    // A random symmetric NAT against a cone: only probe mode's birthday
    // search (256 sockets on the random side, up to 1536 probed ports on
    // the other) can find a direct path.
    PairSpec {
        key: "rand-pr",
        a: NatKind::SymmetricRandom,
        b: NatKind::PortRestricted,
        no_wan_firewall: false,
        extra: &[],
    },
    PairSpec {
        key: "rand-fc",
        a: NatKind::SymmetricRandom,
        b: NatKind::FullCone,
        no_wan_firewall: false,
        extra: &[],
    },
];

struct Args {
    trials: usize,
    pairs: Vec<PairSpec>,
    json: PathBuf,
    direct_timeout: Duration,
    udp_seconds: f64,
    blast_seconds: f64,
    pings: u32,
    throughput: bool,
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives inside the workspace")
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        trials: 5,
        pairs: PAIRS.to_vec(),
        json: PathBuf::from("bench-results/connectivity.json"),
        direct_timeout: Duration::from_secs(20),
        udp_seconds: 3.0,
        blast_seconds: 4.0,
        pings: 6,
        throughput: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| anyhow!("{flag} needs a value"))
        };
        let secs = |v: String| -> Result<f64> {
            let s: f64 = v
                .parse()
                .with_context(|| format!("{v:?} is not a number of seconds"))?;
            ensure!(s > 0.0 && s < 3600.0, "{s} s is out of range");
            Ok(s)
        };
        match flag.as_str() {
            "--trials" => {
                let v = value()?;
                a.trials = v
                    .parse()
                    .with_context(|| format!("--trials: {v:?} is not a number"))?;
                ensure!(a.trials >= 1, "--trials must be at least 1");
            }
            "--pairs" => {
                a.pairs.clear();
                for part in value()?.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let spec = PAIRS
                        .iter()
                        .find(|p| p.key.eq_ignore_ascii_case(part))
                        .with_context(|| {
                            let keys: Vec<&str> = PAIRS.iter().map(|p| p.key).collect();
                            format!("--pairs: unknown pair {part:?} (one of {keys:?})")
                        })?;
                    a.pairs.push(*spec);
                }
                ensure!(!a.pairs.is_empty(), "--pairs: no pair given");
            }
            "--json" => a.json = PathBuf::from(value()?),
            "--direct-timeout" => a.direct_timeout = Duration::from_secs_f64(secs(value()?)?),
            "--udp-seconds" => a.udp_seconds = secs(value()?)?,
            "--blast-seconds" => a.blast_seconds = secs(value()?)?,
            "--pings" => {
                let v = value()?;
                a.pings = v
                    .parse()
                    .with_context(|| format!("--pings: {v:?} is not a number"))?;
                ensure!((1..=120).contains(&a.pings), "--pings must be 1..=120");
            }
            "--no-throughput" => a.throughput = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => {} // e.g. `--bench`, which `cargo bench` passes
        }
    }
    if a.json.is_relative() {
        a.json = workspace_root().join(&a.json);
    }
    Ok(a)
}

fn kind_name(k: NatKind) -> &'static str {
    match k {
        NatKind::None => "none",
        NatKind::FullCone => "full-cone",
        NatKind::PortRestricted => "port-restricted",
        NatKind::SymmetricRandom => "symmetric-random",
        NatKind::SymmetricSequential => "symmetric-sequential",
    }
}

/// Signed milliseconds from `from` to `to`.
fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Linear interpolation between the closest ranks; None without samples.
fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

/// What one trial measured.
#[derive(Default)]
struct Trial {
    error: Option<String>,
    kept_logs: Option<PathBuf>,
    /// From the nodes' start until `a` listed `b` (and `b`'s recv ran).
    listed_ms: Option<f64>,
    /// From a listing b until the send was issued (waiting for `recv` to
    /// connect, if it had not yet).
    listed_to_send_ms: Option<f64>,
    /// From the recv process's start until the send (margin for attaching).
    recv_lead_ms: Option<f64>,
    send_attempts: u32,
    ttfb_ms: Option<f64>,
    /// `a`'s first `relay` and first `direct`, from `t0`.
    relay_ms: Option<f64>,
    direct_ms: Option<f64>,
    /// When a's status (polled every 5 ms) first showed `direct`, from `t0`.
    direct_status_ms: Option<f64>,
    /// `b`'s first `direct` to `a`, from `t0`.
    direct_b_ms: Option<f64>,
    /// `a`'s path changes of the link to `b`, from `t0`.
    path_changes: Vec<(f64, String)>,
    /// `a`'s punch statistics for `b` and `b`'s for `a`, read from their
    /// status after the trial (direct or not; None: no answer, or the peer
    /// was not listed).
    punch_a: Option<PunchStats>,
    punch_b: Option<PunchStats>,
}

impl Trial {
    /// Both sides' punch statistics, when both were read.
    fn punch(&self) -> Option<(&PunchStats, &PunchStats)> {
        self.punch_a.as_ref().zip(self.punch_b.as_ref())
    }

    /// Datagrams both sides' probe sockets sent.
    fn probe_packets(&self) -> Option<u64> {
        self.punch().map(|(a, b)| a.probe_packets + b.probe_packets)
    }

    /// Birthday probes of both sides.
    fn birthday_probes(&self) -> Option<u64> {
        self.punch()
            .map(|(a, b)| a.birthday_probes + b.birthday_probes)
    }

    /// Quic-mode and probe-mode attempts of both sides.
    fn attempts(&self) -> Option<(u32, u32)> {
        self.punch().map(|(a, b)| {
            (
                a.quic_attempts + b.quic_attempts,
                a.probe_attempts + b.probe_attempts,
            )
        })
    }
}

impl Trial {
    fn json(&self) -> Value {
        json!({
            "ok": self.error.is_none(),
            "error": self.error,
            "kept_logs": self.kept_logs,
            "peer_listed_ms_from_start": self.listed_ms.map(round2),
            "listed_to_send_ms": self.listed_to_send_ms.map(round2),
            "recv_lead_ms": self.recv_lead_ms.map(round2),
            "send_attempts": self.send_attempts,
            "time_to_first_byte_ms": self.ttfb_ms.map(round2),
            "time_to_relay_ms": self.relay_ms.map(round2),
            "time_to_direct_ms": self.direct_ms.map(round2),
            "time_to_direct_status_poll_ms": self.direct_status_ms.map(round2),
            "time_to_direct_other_side_ms": self.direct_b_ms.map(round2),
            "path_changes_ms": self.path_changes.iter()
                .map(|(t, p)| json!([round2(*t), p])).collect::<Vec<_>>(),
            "punch": {"a": self.punch_a, "b": self.punch_b},
            "probe_packets": self.probe_packets(),
            "birthday_probes": self.birthday_probes(),
            "quic_attempts": self.attempts().map(|a| a.0),
            "probe_attempts": self.attempts().map(|a| a.1),
        })
    }
}

/// A lab with the public host and the two sites, nothing started yet.
struct Setup {
    m: MeshLab,
    sa: peermesh_tests::netlab::Site,
    sb: peermesh_tests::netlab::Site,
}

fn setup(spec: &PairSpec, label: &str) -> Result<Setup> {
    let lab = Lab::with_prefix(LAB_PREFIX)?;
    let mut m = MeshLab::new(label, lab)?;
    m.start_public()?;
    let sa = m.site("sa", spec.a, spec.site_opts())?;
    let sb = m.site("sb", spec.b, spec.site_opts())?;
    Ok(Setup { m, sa, sb })
}

fn run_trial(spec: &PairSpec, k: usize, args: &Args, t: &mut Trial) -> Result<()> {
    let Setup { mut m, sa, sb } = setup(spec, &format!("{}-t{k}", spec.key))?;
    let res = start_trial(&mut m, &sa.host, &sb.host, spec.extra, args, t);
    if res.is_err() {
        t.kept_logs = m.keep_logs();
    }
    res
}

/// Starts both nodes, runs the trial and then, whether it went direct,
/// failed or not, reads both sides' punch statistics.
fn start_trial(
    m: &mut MeshLab,
    ha: &peermesh_tests::netlab::Host,
    hb: &peermesh_tests::netlab::Host,
    extra: &[&str],
    args: &Args,
    t: &mut Trial,
) -> Result<()> {
    let (ta, tb) = (m.token()?, m.token()?);
    let started = SystemTime::now();
    let a = m.node_with("a", ha, &ta, extra)?;
    let b = m.node_with("b", hb, &tb, extra)?;
    let res = trial_body(m, &a, &b, started, args, t);
    t.punch_a = a.peer("b").map(|p| p.punch);
    t.punch_b = b.peer("a").map(|p| p.punch);
    res
}

fn trial_body(
    m: &mut MeshLab,
    a: &MeshNode,
    b: &MeshNode,
    started: SystemTime,
    args: &Args,
    t: &mut Trial,
) -> Result<()> {
    let deadline = Instant::now() + SLOW;
    let mut inbox = None;
    let peer = loop {
        if inbox.is_none() && b.status().is_some() {
            inbox = Some(m.recv(b)?);
        }
        if inbox.is_some() {
            if let Some(p) = a.peer("b") {
                break p;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "within {SLOW:?}: b answering: {}, a listing b: {}",
                inbox.is_some(),
                a.peer("b").is_some()
            );
        }
        std::thread::sleep(POLL);
    };
    let listed = SystemTime::now();
    let inbox = inbox.expect("started above");
    // Normally long done; waits only when a listed b within a few ms of
    // b's socket answering.
    inbox.wait_connected(Duration::from_secs(5))?;
    // A cross-check of the log timestamps: a's status, every 5 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (a, stop) = ((*a).clone(), stop.clone());
        let limit = args.direct_timeout + Duration::from_secs(1);
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if a.path_to("b").as_deref() == Some("direct") {
                    return Some(SystemTime::now());
                }
                std::thread::sleep(POLL);
            }
            None
        })
    };
    let t0 = SystemTime::now();
    t.listed_ms = Some(ms_between(started, listed));
    t.listed_to_send_ms = Some(ms_between(listed, t0));
    t.recv_lead_ms = Some(ms_between(inbox.started, t0));
    let send_deadline = Instant::now() + SLOW;
    loop {
        t.send_attempts += 1;
        match a.send("b", &[FIRST]) {
            Ok(()) => break,
            Err(e) if Instant::now() > send_deadline => {
                return Err(e.context(format!("{} send attempts", t.send_attempts)))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let arrival = inbox.wait_for(FIRST, SLOW)?;
    t.ttfb_ms = Some(ms_between(t0, arrival.at));
    let direct = a.wait_path(peer.id, "direct", UNIX_EPOCH, args.direct_timeout);
    stop.store(true, Ordering::Relaxed);
    let seen = poller.join().ok().flatten();
    t.direct_status_ms = seen.map(|at| ms_between(t0, at));
    let changes = a.path_changes(peer.id);
    t.path_changes = changes
        .iter()
        .map(|c| (ms_between(t0, c.at), c.path.clone()))
        .collect();
    t.relay_ms = changes
        .iter()
        .find(|c| c.path == "relay")
        .map(|c| ms_between(t0, c.at));
    if let Ok(d) = direct {
        t.direct_ms = Some(ms_between(t0, d.at));
        // The other side's switch, for the record (it is usually close).
        if let Some(id_a) = a.status().map(|s| s.id) {
            if let Ok(db) = b.wait_path(id_a, "direct", UNIX_EPOCH, Duration::from_secs(5)) {
                t.direct_b_ms = Some(ms_between(t0, db.at));
            }
        }
    }
    inbox.stop();
    Ok(())
}

/// Throughput and RTT of one pair.
#[derive(Default)]
struct Measure {
    error: Option<String>,
    kept_logs: Option<PathBuf>,
    raw_udp: Option<Value>,
    raw_udp_mbit: Option<f64>,
    raw_udp_plain: Option<Value>,
    raw_udp_plain_mbit: Option<f64>,
    went_direct: bool,
    direct_mbit: Option<f64>,
    direct_run: Option<Value>,
    relay_mbit: Option<f64>,
    relay_run: Option<Value>,
    rtt_direct: Vec<f64>,
    rtt_relay: Vec<f64>,
    /// From the cut until `a` logged `relay`.
    cut_to_relay_ms: Option<f64>,
}

impl Measure {
    fn json(&self) -> Value {
        let fraction = |x: Option<f64>, raw: Option<f64>| match (x, raw) {
            (Some(x), Some(r)) if r > 0.0 => Some(round4(x / r)),
            _ => None,
        };
        let frac = |x| fraction(x, self.raw_udp_mbit);
        let frac_plain = |x| fraction(x, self.raw_udp_plain_mbit);
        json!({
            "ok": self.error.is_none(),
            "error": self.error,
            "kept_logs": self.kept_logs,
            "raw_udp": self.raw_udp,
            "raw_udp_mbit_per_s": self.raw_udp_mbit.map(round2),
            "raw_udp_one_datagram_per_call": self.raw_udp_plain,
            "raw_udp_one_datagram_per_call_mbit_per_s": self.raw_udp_plain_mbit.map(round2),
            "went_direct": self.went_direct,
            "direct": self.direct_run,
            "direct_mbit_per_s": self.direct_mbit.map(round2),
            "direct_fraction_of_raw_udp": frac(self.direct_mbit),
            "direct_fraction_of_raw_udp_one_per_call": frac_plain(self.direct_mbit),
            "relay": self.relay_run,
            "relay_mbit_per_s": self.relay_mbit.map(round2),
            "relay_fraction_of_raw_udp": frac(self.relay_mbit),
            "relay_fraction_of_raw_udp_one_per_call": frac_plain(self.relay_mbit),
            "cut_to_relay_ms": self.cut_to_relay_ms.map(round2),
            "rtt_direct_ms_samples": self.rtt_direct,
            "rtt_direct_ms_p50": percentile(&self.rtt_direct, 50.0).map(round4),
            "rtt_relay_ms_samples": self.rtt_relay,
            "rtt_relay_ms_p50": percentile(&self.rtt_relay, 50.0).map(round4),
        })
    }
}

fn sink_json(r: &SinkResult, probe: &SinkResult) -> Value {
    json!({
        "bytes": r.bytes, "messages": r.messages, "seconds": round4(r.seconds),
        "mbit_per_s": round2(r.mbit_per_s), "message_bytes": BLAST_SIZE,
        "probe": {"bytes": probe.bytes, "mbit_per_s": round2(probe.mbit_per_s)},
    })
}

/// An 8 MiB probe, then a run sized to about `--blast-seconds`.
fn mesh_throughput(
    m: &MeshLab,
    a: &MeshNode,
    b: &MeshNode,
    args: &Args,
) -> Result<(SinkResult, SinkResult)> {
    let limit = Duration::from_secs(120);
    let probe = m
        .throughput(a, b, PROBE_BYTES, BLAST_SIZE, limit)
        .context("the probe")?;
    let want = probe.mbit_per_s * 1e6 / 8.0 * args.blast_seconds;
    let bytes = ((want as u64) >> 20 << 20).clamp(MIN_BLAST, MAX_BLAST);
    let run = m.throughput(a, b, bytes, BLAST_SIZE, limit)?;
    Ok((run, probe))
}

fn rtts(a: &MeshNode, path: &str, count: u32) -> Result<Vec<f64>> {
    Ok(a.ping("b", count)?
        .into_iter()
        .filter(|s| s.path == path)
        .filter_map(|s| s.rtt_ms)
        .map(|r| (r * 1000.0).round() / 1000.0)
        .collect())
}

fn run_measure(spec: &PairSpec, args: &Args, r: &mut Measure) -> Result<()> {
    let Setup { mut m, sa, sb } = setup(spec, &format!("{}-measure", spec.key))?;
    let res = measure_body(&mut m, &sa, &sb, spec.extra, args, r);
    if res.is_err() {
        r.kept_logs = m.keep_logs();
    }
    res
}

fn measure_body(
    m: &mut MeshLab,
    sa: &peermesh_tests::netlab::Site,
    sb: &peermesh_tests::netlab::Site,
    extra: &[&str],
    args: &Args,
    r: &mut Measure,
) -> Result<()> {
    // Raw UDP across both NATs, before any node runs: with GSO (the
    // baseline) and one datagram per system call.
    let dst = forward_udp(sb, RAW_UDP_PORT)?;
    let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, RAW_UDP_PORT));
    let duration = Duration::from_secs_f64(args.udp_seconds);
    let raw_json = |raw: &UdpGoodput| {
        json!({
            "datagram_bytes": raw.datagram_bytes,
            "datagrams_per_send_call": raw.segments,
            "sent_bytes": raw.sent,
            "received_bytes": raw.received,
            "delivered_fraction": round4(raw.received as f64 / raw.sent.max(1) as f64),
            "seconds": round4(raw.seconds),
            "mbit_per_s": round2(raw.mbit_per_s),
            "to": dst.to_string(),
        })
    };
    let gso = udp_goodput(
        &sa.host,
        &sb.host,
        bind,
        dst,
        RAW_UDP_SIZE,
        RAW_UDP_SEGMENTS,
        duration,
    )
    .context("raw UDP (GSO)")?;
    r.raw_udp_mbit = Some(gso.mbit_per_s);
    r.raw_udp = Some(raw_json(&gso));
    let plain = udp_goodput(&sa.host, &sb.host, bind, dst, RAW_UDP_SIZE, 1, duration)
        .context("raw UDP (one datagram per call)")?;
    r.raw_udp_plain_mbit = Some(plain.mbit_per_s);
    r.raw_udp_plain = Some(raw_json(&plain));

    let (ta, tb) = (m.token()?, m.token()?);
    let a = m.node_with("a", &sa.host, &ta, extra)?;
    let b = m.node_with("b", &sb.host, &tb, extra)?;
    let peer = a.wait_peer("b", SLOW, Duration::from_millis(20))?;
    b.wait_peer("a", SLOW, Duration::from_millis(20))?;
    if a.wait_path(peer.id, "direct", UNIX_EPOCH, args.direct_timeout)
        .is_ok()
    {
        r.went_direct = true;
        // The node's smoothed RTT starts from the handshake's samples,
        // taken while both processes were busy starting: let it settle.
        std::thread::sleep(SETTLE);
        r.rtt_direct = rtts(&a, "direct", args.pings)?;
        let (run, probe) = mesh_throughput(m, &a, &b, args).context("direct throughput")?;
        ensure!(
            a.path_to("b").as_deref() == Some("direct"),
            "a→b left the direct path during the direct run: {:?}",
            a.path_changes(peer.id)
        );
        r.direct_mbit = Some(run.mbit_per_s);
        r.direct_run = Some(sink_json(&run, &probe));
        let cut_at = SystemTime::now();
        m.cut(sa, sb.public_ip())?;
        let relay = a
            .wait_path(peer.id, "relay", cut_at, TO_RELAY)
            .context("the fall-back to the relay after the cut")?;
        r.cut_to_relay_ms = Some(ms_between(cut_at, relay.at));
    } else {
        let path = a.path_to("b");
        ensure!(
            path.as_deref() == Some("relay"),
            "a→b is {path:?}, neither direct nor relay"
        );
    }
    std::thread::sleep(SETTLE);
    r.rtt_relay = rtts(&a, "relay", args.pings)?;
    let (run, probe) = mesh_throughput(m, &a, &b, args).context("relay throughput")?;
    ensure!(
        a.path_to("b").as_deref() == Some("relay"),
        "a→b left the relay during the relay run: {:?}",
        a.path_changes(peer.id)
    );
    r.relay_mbit = Some(run.mbit_per_s);
    r.relay_run = Some(sink_json(&run, &probe));
    Ok(())
}

struct PairResult {
    spec: PairSpec,
    trials: Vec<Trial>,
    measure: Option<Measure>,
}

impl PairResult {
    fn ttfb(&self) -> Vec<f64> {
        self.trials.iter().filter_map(|t| t.ttfb_ms).collect()
    }

    fn ttd(&self) -> Vec<f64> {
        self.trials.iter().filter_map(|t| t.direct_ms).collect()
    }

    /// Probe packets of both sides, per trial whose statistics were read.
    fn probe_packets(&self) -> Vec<f64> {
        self.trials
            .iter()
            .filter_map(|t| t.probe_packets().map(|n| n as f64))
            .collect()
    }

    /// Birthday probes of both sides, per trial whose statistics were read.
    fn birthday_probes(&self) -> Vec<f64> {
        self.trials
            .iter()
            .filter_map(|t| t.birthday_probes().map(|n| n as f64))
            .collect()
    }

    /// Quic-mode and probe-mode attempts of both sides, per trial whose
    /// statistics were read.
    fn attempts(&self) -> Vec<(u32, u32)> {
        self.trials.iter().filter_map(Trial::attempts).collect()
    }

    /// The mean number of quic-mode and probe-mode attempts (both sides)
    /// per trial.
    fn attempts_mean(&self) -> Option<(f64, f64)> {
        let v = self.attempts();
        if v.is_empty() {
            return None;
        }
        let n = v.len() as f64;
        let (q, p) = v.iter().fold((0u64, 0u64), |(q, p), (a, b)| {
            (q + u64::from(*a), p + u64::from(*b))
        });
        Some((q as f64 / n, p as f64 / n))
    }

    fn json(&self) -> Value {
        let (ttfb, ttd) = (self.ttfb(), self.ttd());
        let (packets, birthday, attempts) = (
            self.probe_packets(),
            self.birthday_probes(),
            self.attempts(),
        );
        let p = |v: &[f64], q| percentile(v, q).map(round2);
        let mean = self.attempts_mean();
        json!({
            "pair": self.spec.key,
            "a": kind_name(self.spec.a),
            "b": kind_name(self.spec.b),
            "no_wan_firewall": self.spec.no_wan_firewall,
            "trials": self.trials.len(),
            "trials_ok": self.trials.iter().filter(|t| t.error.is_none()).count(),
            "direct": ttd.len(),
            "direct_rate": ttd.len() as f64 / self.trials.len().max(1) as f64,
            "time_to_first_byte_ms": {"p50": p(&ttfb, 50.0), "p90": p(&ttfb, 90.0),
                                      "samples": ttfb.iter().map(|x| round2(*x)).collect::<Vec<_>>()},
            "time_to_direct_ms": {"p50": p(&ttd, 50.0), "p90": p(&ttd, 90.0),
                                  "samples": ttd.iter().map(|x| round2(*x)).collect::<Vec<_>>()},
            "probe_packets": {"p50": p(&packets, 50.0), "p90": p(&packets, 90.0),
                              "samples": packets},
            "birthday_probes": {"p50": p(&birthday, 50.0), "samples": birthday},
            "attempts": {"quic_mean": mean.map(|m| round2(m.0)),
                         "probe_mean": mean.map(|m| round2(m.1)),
                         "samples_quic_probe": attempts.iter()
                             .map(|(q, p)| json!([q, p])).collect::<Vec<_>>()},
            "trial_runs": self.trials.iter().map(Trial::json).collect::<Vec<_>>(),
            "throughput_and_rtt": self.measure.as_ref().map(Measure::json),
        })
    }
}

const DEFINITIONS: &str = "\
definitions (all times from t0 = the moment `meshnode send --state a b …` is issued, as soon as
a's status lists b; both nodes started together, b's `recv` attached as soon as b answered):
  TTFB   time to first byte: until b's `meshnode recv` prints the message
  TTD    time to direct: until a logs `link path … path=\"direct\"` for b (log timestamp);
         p50/p90 over the trials that reached direct (linear interpolation)
  direct k/N trials whose link reached `direct` within the direct timeout (the success rate)
  probe pkts p50  UDP datagrams a's and b's probe sockets sent (status `punch.probe_packets`,
         a + b, read after the trial whether it went direct or not), median over the trials
  attempts quic/probe  punch attempts from the QUIC socket / from probe sockets (status
         `punch.quic_attempts` / `punch.probe_attempts`, a + b), mean per trial
  raw UDP 1200-byte datagrams, sa's host → port forward on sb's router, one thread, goodput;
         10 per call with UDP GSO/GRO as quinn does (the baseline); `raw 1/call`: one sendto each
  direct/relay mesh `blast`/`sink` a→b (64 KiB messages), first byte → last byte; (×raw, ×1/call)
         are fractions of the two raw UDP rates; relay on cone pairs after cutting the direct path
  RTT    median of `meshnode ping --json` rtt_ms samples (1/s) on that path, idle, 3 s after
         it became active";

fn fmt_opt(x: Option<f64>, decimals: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

fn print_table(results: &[PairResult], trials: usize) {
    let header = [
        "pair",
        "direct",
        "TTFB p50 ms",
        "TTFB p90 ms",
        "TTD p50 ms",
        "TTD p90 ms",
        "probe pkts p50",
        "attempts quic/probe",
        "raw UDP Mbit/s",
        "raw 1/call",
        "direct Mbit/s (×raw, ×1/call)",
        "relay Mbit/s (×raw, ×1/call)",
        "RTT relay ms",
        "RTT direct ms",
    ];
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let (ttfb, ttd) = (r.ttfb(), r.ttd());
            let m = r.measure.as_ref();
            let raw = m.and_then(|m| m.raw_udp_mbit);
            let plain = m.and_then(|m| m.raw_udp_plain_mbit);
            let with_frac = |x: Option<f64>| match (x, raw, plain) {
                (Some(x), Some(raw), Some(plain)) if raw > 0.0 && plain > 0.0 => {
                    format!("{x:.0} ({:.2}, {:.2})", x / raw, x / plain)
                }
                (Some(x), _, _) => format!("{x:.0}"),
                _ => "-".into(),
            };
            let failed = r.trials.iter().filter(|t| t.error.is_some()).count();
            vec![
                r.spec.describe(),
                if failed > 0 {
                    format!("{}/{trials} ({failed} failed)", ttd.len())
                } else {
                    format!("{}/{trials}", ttd.len())
                },
                fmt_opt(percentile(&ttfb, 50.0), 1),
                fmt_opt(percentile(&ttfb, 90.0), 1),
                fmt_opt(percentile(&ttd, 50.0), 1),
                fmt_opt(percentile(&ttd, 90.0), 1),
                fmt_opt(percentile(&r.probe_packets(), 50.0), 0),
                r.attempts_mean()
                    .map_or("-".into(), |(q, p)| format!("{q:.1}/{p:.1}")),
                fmt_opt(raw, 0),
                fmt_opt(plain, 0),
                with_frac(m.and_then(|m| m.direct_mbit)),
                with_frac(m.and_then(|m| m.relay_mbit)),
                fmt_opt(m.and_then(|m| percentile(&m.rtt_relay, 50.0)), 3),
                fmt_opt(m.and_then(|m| percentile(&m.rtt_direct, 50.0)), 3),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let cells: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                let pad = w - c.chars().count();
                if i == 0 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect();
        println!("| {} |", cells.join(" | "));
    };
    println!("{DEFINITIONS}\n");
    line(&header.map(String::from));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", rule.join("-|-"));
    for r in &rows {
        line(r);
    }
    for r in results {
        for (k, t) in r.trials.iter().enumerate() {
            if let Some(e) = &t.error {
                println!("{} trial {k}: failed: {e}", r.spec.key);
            }
        }
        if let Some(e) = r.measure.as_ref().and_then(|m| m.error.as_ref()) {
            println!("{} throughput/RTT: failed: {e}", r.spec.key);
        }
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    Lab::check_environment().context("the connectivity bench needs the NAT lab")?;
    let bins = Bins::get();
    eprintln!(
        "connectivity bench: {} trial(s) per pair, pairs {:?}, binaries {}",
        args.trials,
        args.pairs.iter().map(|p| p.key).collect::<Vec<_>>(),
        bins.meshnode.parent().unwrap_or(Path::new("")).display()
    );
    let started = Instant::now();
    let mut results = Vec::new();
    for spec in &args.pairs {
        let mut trials = Vec::new();
        for k in 0..args.trials {
            let mut t = Trial::default();
            if let Err(e) = run_trial(spec, k, &args, &mut t) {
                t.error = Some(format!("{e:#}"));
            }
            eprintln!(
                "[{:>6.1} s] {} trial {k}: listed {} ms, TTFB {} ms, relay {} ms, direct {} ms; \
                 punch: {} probe packets ({} birthday), attempts quic/probe {}{}{}",
                started.elapsed().as_secs_f64(),
                spec.key,
                fmt_opt(t.listed_ms, 1),
                fmt_opt(t.ttfb_ms, 1),
                fmt_opt(t.relay_ms, 1),
                fmt_opt(t.direct_ms, 1),
                t.probe_packets().map_or("-".into(), |n| n.to_string()),
                t.birthday_probes().map_or("-".into(), |n| n.to_string()),
                t.attempts().map_or("-".into(), |(q, p)| format!("{q}/{p}")),
                t.error
                    .as_ref()
                    .map(|e| format!(" FAILED: {e}"))
                    .unwrap_or_default(),
                t.kept_logs
                    .as_ref()
                    .map(|p| format!(" (logs in {})", p.display()))
                    .unwrap_or_default(),
            );
            trials.push(t);
        }
        let measure = args.throughput.then(|| {
            let mut r = Measure::default();
            if let Err(e) = run_measure(spec, &args, &mut r) {
                r.error = Some(format!("{e:#}"));
            }
            eprintln!(
                "[{:>6.1} s] {} throughput: raw UDP {} Mbit/s ({} 1/call), direct {} Mbit/s, relay {} Mbit/s; \
                 RTT direct {} ms, relay {} ms{}",
                started.elapsed().as_secs_f64(),
                spec.key,
                fmt_opt(r.raw_udp_mbit, 0),
                fmt_opt(r.raw_udp_plain_mbit, 0),
                fmt_opt(r.direct_mbit, 0),
                fmt_opt(r.relay_mbit, 0),
                fmt_opt(percentile(&r.rtt_direct, 50.0), 3),
                fmt_opt(percentile(&r.rtt_relay, 50.0), 3),
                r.error
                    .as_ref()
                    .map(|e| format!(" FAILED: {e}"))
                    .unwrap_or_default()
            );
            r
        });
        results.push(PairResult {
            spec: *spec,
            trials,
            measure,
        });
    }
    print_table(&results, args.trials);
    let report = json!({
        "benchmark": "connectivity",
        "date": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "machine": peermesh_tests::bench::machine_info(),
        "definitions": DEFINITIONS,
        "settings": {
            "trials": args.trials,
            "direct_timeout_s": args.direct_timeout.as_secs_f64(),
            "udp_seconds": args.udp_seconds,
            "blast_seconds": args.blast_seconds,
            "pings": args.pings,
            "raw_udp_datagram_bytes": RAW_UDP_SIZE,
            "blast_message_bytes": BLAST_SIZE,
        },
        "wall_seconds": round2(started.elapsed().as_secs_f64()),
        "results": results.iter().map(PairResult::json).collect::<Vec<_>>(),
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!("results written to {}", args.json.display());
    Ok(())
}
