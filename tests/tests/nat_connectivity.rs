//! The data plane with real processes behind real kernel NAT (the netlab): a
//! control server and a relay on a public host, two sites behind NAT
//! routers of the kinds under test, each running one `meshnode up`.
//!
//! - Cone pairs (and an open address with a port-restricted cone): the first
//!   message goes through the relay at once, then DCUtR punches a direct
//!   path on both sides.
//! - Random symmetric on both sides: the link stays on the relay, unbroken,
//!   and carries a stream exactly once and in order.
//! - A direct path cut while a numbered stream flows: the link falls back to
//!   the relay and the stream arrives exactly once and in order.
//!
//! Times from process start to the first delivered message and to `direct`
//! are printed (run with `--nocapture` to see them when the tests pass).
//!
//! Needs root, `ip` and `nft`: skipped with a printed reason otherwise,
//! failed when CI=true.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use peermesh_tests::netlab::{lab_or_skip, Lab, NatKind, Ns, PublicHost, Site, SiteOpts};
use peermesh_tests::{wait_for, Bins};
use serde_json::Value;

/// Each test builds its own lab and runs five processes in it; one lab at a
/// time keeps the timings meaningful on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The control server's TCP port on the public host.
const CONTROL_PORT: u16 = 7000;
/// The relay's UDP port on the public host.
const RELAY_PORT: u16 = 4001;
/// Process start-up, joining, listing peers, a stream to arrive.
const SLOW: Duration = Duration::from_secs(30);
/// Bound for the upgrade to a direct path once the nodes run.
const TO_DIRECT: Duration = Duration::from_secs(20);
/// Bound for the fall-back to the relay once the direct path is cut: the
/// node closes a QUIC connection after 3 s without a packet (libp2p's
/// default of 10 s, which this bound rejects, held the stream still for 10 s).
const TO_RELAY: Duration = Duration::from_secs(8);
/// Bound for one `meshnode` client command.
const CLI: Duration = Duration::from_secs(60);
const GROUP: &str = "g";

/// Runs `cmd` with its output captured; killed and failed after `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child.wait_with_output()?)
}

/// Like [`run_bounded`]; stdout, or an error with stderr on a non-zero exit.
fn run_ok(cmd: Command, timeout: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Polls `f` every `every` until it returns `Some`, or fails after `timeout`
/// (for checks too costly for [`wait_for`]'s 25 ms).
fn wait_every<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// The `data` fields of a `meshnode recv --json` output file.
fn received(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["data"].as_str().map(String::from))
        .collect()
}

/// How many complete lines a `recv --json` output file has (cheap).
fn received_count(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .unwrap_or(0)
}

/// `prefix-0 … prefix-(n-1)`.
fn numbered(prefix: &str, n: usize) -> impl Iterator<Item = String> + '_ {
    (0..n).map(move |i| format!("{prefix}-{i}"))
}

/// `got` is exactly `want`: every message once, in order. Says where it
/// first differs.
fn check_exact(got: &[String], want: &[String]) -> Result<()> {
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        let dup = got[..i].contains(&got[i]);
        bail!(
            "message {i} is {:?}, expected {:?} ({}); {} of {} arrived",
            got[i],
            want[i],
            if dup { "a duplicate" } else { "out of order" },
            got.len(),
            want.len()
        );
    }
    ensure!(
        got.len() == want.len(),
        "{} messages arrived, {} expected (first missing: {:?}, first extra: {:?})",
        got.len(),
        want.len(),
        want.get(got.len()),
        got.get(want.len())
    );
    Ok(())
}

/// A running `meshnode up` inside a lab namespace. The client commands
/// (status, send, recv) talk to it over its Unix socket in the state
/// directory, from the test's own namespace.
#[derive(Clone)]
struct MeshNode {
    name: String,
    state: PathBuf,
    log: PathBuf,
}

impl MeshNode {
    fn client(&self, sub: &str) -> Command {
        let mut cmd = Command::new(&Bins::get().meshnode);
        cmd.arg(sub).arg("--state").arg(&self.state);
        cmd
    }

    /// `meshnode status --json`, or None while the node does not answer.
    fn status(&self) -> Option<Value> {
        let mut cmd = self.client("status");
        cmd.arg("--json");
        let out = run_bounded(cmd, Duration::from_secs(10)).ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The path of the link to `peer`, if listed.
    fn path_to(&self, peer: &str) -> Option<String> {
        let s = self.status()?;
        s["peers"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == peer)
            .and_then(|p| p["path"].as_str().map(String::from))
    }

    /// Waits until this node lists `peer` (and no one else).
    fn wait_peer(&self, peer: &str) -> Result<()> {
        wait_for(SLOW, &format!("{} to list peer {peer}", self.name), || {
            let s = self.status()?;
            let names: Vec<&str> = s["peers"]
                .as_array()?
                .iter()
                .filter_map(|p| p["name"].as_str())
                .collect();
            (names == [peer]).then_some(())
        })
    }

    /// `meshnode send --count n --prefix prefix` to `peer`.
    fn send(&self, peer: &str, prefix: &str, n: usize) -> Result<()> {
        let mut cmd = self.client("send");
        cmd.arg(peer)
            .args(["--count", &n.to_string(), "--prefix", prefix]);
        run_ok(cmd, CLI).map(drop)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log lines that contain any of `needles`.
    fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| needles.iter().any(|n| l.contains(n)))
            .map(String::from)
            .collect()
    }
}

/// A netlab with the peermesh processes running in it. Dropping it (also
/// while a test panics) kills every process it started and removes the
/// namespaces; on a panic it first prints the tail of every log and keeps
/// the logs in a `peermesh-failed-*` directory.
struct MeshLab {
    test: String,
    dir: tempfile::TempDir,
    procs: Vec<(String, Child)>,
    logs: Vec<(String, PathBuf)>,
    server: Option<PublicHost>,
    /// Declared last: the namespaces go after the processes are killed.
    lab: Lab,
}

impl MeshLab {
    fn new(test: &str, lab: Lab) -> Result<Self> {
        // Built (or found fresh) before anything is timed.
        Bins::get();
        Ok(Self {
            test: test.to_string(),
            dir: tempfile::Builder::new()
                .prefix(&format!("peermesh-nat-{test}-"))
                .tempdir()?,
            procs: Vec::new(),
            logs: Vec::new(),
            server: None,
            lab,
        })
    }

    fn server(&self) -> &PublicHost {
        self.server.as_ref().expect("start_public first")
    }

    fn url(&self) -> String {
        format!("http://{}:{CONTROL_PORT}", self.server().ip())
    }

    /// Spawns `cmd` inside `ns` with its output appended to `log`.
    fn spawn(&mut self, label: &str, ns: &Ns, mut cmd: Command, log: &Path) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("log file {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                "info,peermesh_node=debug,h2=warn,tower=warn,hyper=warn",
            );
        let child = ns.spawn(cmd)?;
        self.procs.push((label.to_string(), child));
        self.logs.push((label.to_string(), log.to_path_buf()));
        Ok(())
    }

    fn wait_log(&self, log: &Path, needle: &str, what: &str) -> Result<()> {
        wait_for(SLOW, what, || {
            std::fs::read_to_string(log)
                .ok()?
                .contains(needle)
                .then_some(())
        })
    }

    /// `control-server admin …`, run on the public host.
    fn admin(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.server().command(&Bins::get().control_server);
        cmd.arg("admin")
            .arg("--server")
            .arg(self.url())
            .arg("--data")
            .arg(self.dir.path().join("control-data"))
            .args(args);
        run_ok(cmd, Duration::from_secs(20))
    }

    /// The public host with the control server and one relay, both
    /// listening on its public address; the group `g`.
    fn start_public(&mut self) -> Result<()> {
        let host = self.lab.public_host("srv")?;
        self.server = Some(host.clone());
        let ip = host.ip();
        let log = self.dir.path().join("control-server.log");
        let mut cmd = Command::new(&Bins::get().control_server);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("{ip}:{CONTROL_PORT}"))
            .arg("--data")
            .arg(self.dir.path().join("control-data"));
        self.spawn("control-server", &host, cmd, &log)?;
        self.wait_log(&log, "listening on", "the control server to listen")?;
        self.admin(&["create-group", GROUP])?;

        let token = self.admin(&["create-token", "--relay"])?.trim().to_string();
        let log = self.dir.path().join("relay.log");
        let mut cmd = Command::new(&Bins::get().meshnode);
        cmd.arg("relay")
            .arg("--listen")
            .arg(format!("{ip}:{RELAY_PORT}"))
            .arg("--control")
            .arg(self.url())
            .arg("--token")
            .arg(&token)
            .arg("--state")
            .arg(self.dir.path().join("relay-state"));
        self.spawn("relay", &host, cmd, &log)?;
        self.wait_log(
            &log,
            "registered with the control server",
            "the relay to register",
        )
    }

    /// A join token for one node of the group.
    fn token(&self) -> Result<String> {
        Ok(self
            .admin(&["create-token", "--group", GROUP, "--uses", "1"])?
            .trim()
            .to_string())
    }

    /// `meshnode up` named `name` on `site`'s host.
    fn node(&mut self, name: &str, site: &Site, token: &str) -> Result<MeshNode> {
        let state = self.dir.path().join(format!("node-{name}"));
        let log = self.dir.path().join(format!("node-{name}.log"));
        let mut cmd = Command::new(&Bins::get().meshnode);
        cmd.arg("up")
            .arg("--control")
            .arg(self.url())
            .arg("--token")
            .arg(token)
            .arg("--state")
            .arg(&state)
            .arg("--name")
            .arg(name);
        self.spawn(&format!("node {name}"), &site.host, cmd, &log)?;
        Ok(MeshNode {
            name: name.to_string(),
            state,
            log,
        })
    }

    /// `meshnode recv --json` on `node`, its output in `out`; killed with
    /// the lab.
    fn recv(&mut self, node: &MeshNode, out: &Path) -> Result<()> {
        let f = std::fs::File::create(out)?;
        let err = self.dir.path().join(format!("recv-{}.log", node.name));
        let child = node
            .client("recv")
            .arg("--json")
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(std::fs::File::create(&err)?)
            .spawn()?;
        let label = format!("recv {}", node.name);
        self.procs.push((label.clone(), child));
        self.logs.push((label, err));
        Ok(())
    }

    fn dump_logs(&self) {
        for (name, path) in &self.logs {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(path) {
                let _ = f.read_to_string(&mut text);
            }
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(50)..];
            eprintln!(
                "----- {name} ({}) -----\n{}",
                path.display(),
                tail.join("\n")
            );
        }
    }
}

impl Drop for MeshLab {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("===== {}: logs =====", self.test);
            self.dump_logs();
            let keep = std::env::temp_dir().join(format!(
                "peermesh-failed-{}",
                self.dir
                    .path()
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            ));
            if std::fs::create_dir_all(&keep).is_ok() {
                for (_, path) in &self.logs {
                    if let Some(name) = path.file_name() {
                        let _ = std::fs::copy(path, keep.join(name));
                    }
                }
                let _ = std::fs::write(keep.join("netlab.txt"), self.lab.describe());
                eprintln!("logs and the lab's rules kept in {}", keep.display());
            }
        }
    }
}

/// Runs a test body against a fresh lab; an error fails the test while the
/// lab still exists, so its logs are printed.
fn lab_test(test: &str, body: impl FnOnce(&mut MeshLab) -> Result<()>) {
    let _g = serial();
    let Some(lab) = lab_or_skip(test) else {
        return;
    };
    let mut mesh = MeshLab::new(test, lab).unwrap_or_else(|e| panic!("{test}: {e:#}"));
    if let Err(e) = body(&mut mesh) {
        panic!("{test}: {e:#}");
    }
}

/// Two nodes `a` (site `sa`) and `b` (site `sb`) that list each other,
/// `meshnode recv` on `b`, and the first message `first-0` from `a` to `b`
/// delivered.
struct Pair {
    sa: Site,
    sb: Site,
    a: MeshNode,
    b: MeshNode,
    /// Just before the nodes were started.
    t0: Instant,
    /// When `a` first took a message for `b` (it knew `b`), from `t0`.
    known: Duration,
    /// When `first-0` arrived at `b`, from `t0`.
    first: Duration,
    /// `b`'s received messages.
    inbox: PathBuf,
}

fn start_pair(m: &mut MeshLab, ka: NatKind, kb: NatKind) -> Result<Pair> {
    m.start_public()?;
    let sa = m.lab.site("sa", ka, SiteOpts::default())?;
    let sb = m.lab.site("sb", kb, SiteOpts::default())?;
    let (ta, tb) = (m.token()?, m.token()?);
    let t0 = Instant::now();
    let a = m.node("a", &sa, &ta)?;
    let b = m.node("b", &sb, &tb)?;
    wait_for(SLOW, "b to answer", || b.status())?;
    let inbox = m.dir.path().join("b-inbox.jsonl");
    m.recv(&b, &inbox)?;
    // The first message goes out as soon as `a` knows `b`: before any path
    // to `b` exists, so it takes the first one (the relay) with no wait for
    // a punched path.
    wait_for(SLOW, "a to take a message for b", || {
        a.send("b", "first", 1).ok()
    })?;
    let known = t0.elapsed();
    let path = a.path_to("b");
    ensure!(
        matches!(path.as_deref(), Some("connecting" | "relay")),
        "a→b is already {path:?} when the first message is sent"
    );
    wait_for(SLOW, "the first message to arrive", || {
        received(&inbox)
            .iter()
            .any(|m| m == "first-0")
            .then_some(())
    })?;
    let first = t0.elapsed();
    a.wait_peer("b")?;
    b.wait_peer("a")?;
    Ok(Pair {
        sa,
        sb,
        a,
        b,
        t0,
        known,
        first,
        inbox,
    })
}

/// Both nodes' first path to the other was the relay (so the first message
/// did not wait for a punched path).
fn check_relay_first(p: &Pair) -> Result<()> {
    for n in [&p.a, &p.b] {
        let log = n.log();
        let first = log
            .lines()
            .find(|l| l.contains("path up"))
            .with_context(|| format!("{}: no path came up", n.name))?;
        ensure!(
            first.contains("Relay"),
            "{}: the first path was not the relay: {first}",
            n.name
        );
    }
    Ok(())
}

/// Waits until both sides report `path`; the time from `t0` at which each
/// side was first seen on it.
fn wait_both(p: &Pair, path: &str, timeout: Duration) -> Result<(Duration, Duration)> {
    let (mut ta, mut tb) = (None, None);
    wait_for(timeout, &format!("`{path}` on both sides"), || {
        if ta.is_none() && p.a.path_to("b").as_deref() == Some(path) {
            ta = Some(p.t0.elapsed());
        }
        if tb.is_none() && p.b.path_to("a").as_deref() == Some(path) {
            tb = Some(p.t0.elapsed());
        }
        ta.zip(tb)
    })
    .with_context(|| {
        format!(
            "a→b is {:?}, b→a is {:?}",
            p.a.path_to("b"),
            p.b.path_to("a")
        )
    })
}

/// Cone pairs: relay first, then direct on both sides, then a stream over
/// the direct path.
fn goes_direct(test: &str, ka: NatKind, kb: NatKind) {
    lab_test(test, |m| {
        let p = start_pair(m, ka, kb)?;
        check_relay_first(&p)?;
        let (da, db) = wait_both(&p, "direct", TO_DIRECT)?;
        eprintln!(
            "{test}: {ka:?} × {kb:?}: a knows b {}, first message delivered {}, \
             direct a→b {}, b→a {} (from process start)",
            ms(p.known),
            ms(p.first),
            ms(da),
            ms(db)
        );
        p.a.send("b", "after", 2000)?;
        wait_every(SLOW, Duration::from_millis(100), "the stream", || {
            (received_count(&p.inbox) >= 2001).then_some(())
        })?;
        let want: Vec<String> = numbered("first", 1)
            .chain(numbered("after", 2000))
            .collect();
        check_exact(&received(&p.inbox), &want)?;
        ensure!(
            p.a.path_to("b").as_deref() == Some("direct"),
            "a→b left the direct path: {:?}",
            p.a.path_to("b")
        );
        Ok(())
    });
}

#[test]
fn full_cone_and_full_cone_go_direct() {
    goes_direct("fc_fc", NatKind::FullCone, NatKind::FullCone);
}

#[test]
fn port_restricted_and_port_restricted_go_direct() {
    goes_direct("pr_pr", NatKind::PortRestricted, NatKind::PortRestricted);
}

#[test]
fn full_cone_and_port_restricted_go_direct() {
    goes_direct("fc_pr", NatKind::FullCone, NatKind::PortRestricted);
}

#[test]
fn open_address_and_port_restricted_go_direct() {
    goes_direct("none_pr", NatKind::None, NatKind::PortRestricted);
}

/// When (from `t0`), `a`'s path to `b`, `b`'s path to `a`.
type PathSample = (Duration, Option<String>, Option<String>);

/// Samples both sides' path every 100 ms on a thread until stopped.
struct PathMonitor {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<PathSample>>,
}

impl PathMonitor {
    fn start(p: &Pair) -> PathMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let (a, b) = (p.a.clone(), p.b.clone());
        let t0 = p.t0;
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                samples.push((t0.elapsed(), a.path_to("b"), b.path_to("a")));
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        PathMonitor { stop, thread }
    }

    fn finish(self) -> Vec<PathSample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("path monitor")
    }
}

#[test]
fn symmetric_random_pair_stays_on_the_relay_unbroken() {
    let test = "sym_sym";
    lab_test(test, |m| {
        let p = start_pair(m, NatKind::SymmetricRandom, NatKind::SymmetricRandom)?;
        check_relay_first(&p)?;
        let monitor = PathMonitor::start(&p);
        let since = Instant::now();
        let mut want: Vec<String> = numbered("first", 1).collect();
        for k in 0..5 {
            let prefix = format!("s{k}");
            p.a.send("b", &prefix, 2000)?;
            want.extend(numbered(&prefix, 2000));
        }
        wait_every(SLOW, Duration::from_millis(100), "the stream", || {
            (received_count(&p.inbox) >= want.len()).then_some(())
        })?;
        // Long enough for DCUtR's attempts to be over.
        std::thread::sleep(Duration::from_secs(6).saturating_sub(since.elapsed()));
        let samples = monitor.finish();
        check_exact(&received(&p.inbox), &want)?;
        let direct = samples
            .iter()
            .filter(|(_, a, b)| a.as_deref() == Some("direct") || b.as_deref() == Some("direct"))
            .count();
        eprintln!(
            "{test}: a knows b {}, first message delivered {} (from process start); \
             {} path samples over {}, {direct} with a direct path",
            ms(p.known),
            ms(p.first),
            samples.len(),
            ms(since.elapsed())
        );
        for (at, a, b) in &samples {
            for (side, path) in [("a→b", a), ("b→a", b)] {
                ensure!(
                    matches!(path.as_deref(), Some("relay" | "direct")),
                    "{side} was {path:?} at {} after start: the link broke",
                    ms(*at)
                );
            }
        }
        ensure!(samples.len() >= 20, "too few path samples: {samples:?}");
        Ok(())
    });
}

/// Sends batches `s0`, `s1`, … of `BATCH` messages from `a` to `b` on a
/// thread until stopped (or `MAX_BATCHES`); returns how many were sent.
const BATCH: usize = 1000;
const MAX_BATCHES: usize = 60;

struct Sender {
    stop: Arc<AtomicBool>,
    done: Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<Result<usize>>,
}

impl Sender {
    fn start(a: &MeshNode) -> Sender {
        let a = a.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (flag, count) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let mut k = 0;
            while k < MAX_BATCHES && !flag.load(Ordering::Relaxed) {
                a.send("b", &format!("s{k}"), BATCH)
                    .with_context(|| format!("batch s{k}"))?;
                k += 1;
                count.store(k, Ordering::Relaxed);
            }
            Ok(k)
        });
        Sender { stop, done, thread }
    }

    fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    fn finish(self) -> Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sender thread")
    }
}

/// What [`watch_switch`] saw.
struct Switch {
    /// When each side was first seen on `relay`, from `t0`.
    relay_a: Duration,
    relay_b: Duration,
    /// The longest time without a new message at `b` until then.
    longest_stall: Duration,
    /// Messages received at `b` by then.
    received: usize,
}

/// Waits until both sides report `relay`, watching the stream at `b`.
fn watch_switch(p: &Pair, timeout: Duration) -> Result<Switch> {
    let (mut ta, mut tb) = (None, None);
    let mut count = received_count(&p.inbox);
    let mut changed = Instant::now();
    let mut stall = Duration::ZERO;
    let res = wait_for(timeout, "`relay` on both sides after the cut", || {
        let now = received_count(&p.inbox);
        if now != count {
            count = now;
            changed = Instant::now();
        }
        stall = stall.max(changed.elapsed());
        if ta.is_none() && p.a.path_to("b").as_deref() == Some("relay") {
            ta = Some(p.t0.elapsed());
        }
        if tb.is_none() && p.b.path_to("a").as_deref() == Some("relay") {
            tb = Some(p.t0.elapsed());
        }
        ta.zip(tb)
    });
    let (relay_a, relay_b) = res.with_context(|| {
        format!(
            "a→b is {:?}, b→a is {:?}; the stream stood still for {} at most, {count} received",
            p.a.path_to("b"),
            p.b.path_to("a"),
            ms(stall)
        )
    })?;
    Ok(Switch {
        relay_a,
        relay_b,
        longest_stall: stall,
        received: count,
    })
}

#[test]
fn a_cut_direct_path_falls_back_to_the_relay_exactly_once() {
    let test = "cut_direct";
    lab_test(test, |m| {
        let p = start_pair(m, NatKind::PortRestricted, NatKind::PortRestricted)?;
        let (da, db) = wait_both(&p, "direct", TO_DIRECT)?;
        eprintln!(
            "{test}: first message delivered {}, direct a→b {}, b→a {} (from process start)",
            ms(p.first),
            ms(da),
            ms(db)
        );

        // A stream in flight on the direct path…
        let sender = Sender::start(&p.a);
        wait_every(
            SLOW,
            Duration::from_millis(20),
            "the stream to flow",
            || (received_count(&p.inbox) > 2 * BATCH).then_some(()),
        )?;
        ensure!(
            p.a.path_to("b").as_deref() == Some("direct"),
            "a→b left the direct path before the cut: {:?}",
            p.a.path_to("b")
        );
        // …when the sites stop reaching each other; the relay stays.
        let before = received_count(&p.inbox);
        let batches_before = sender.done();
        let cut_at = p.t0.elapsed();
        m.lab.cut(&p.sa, p.sb.public_ip())?;
        let waited = watch_switch(&p, TO_RELAY);
        let sw = match waited {
            Ok(sw) => sw,
            Err(e) => {
                let _ = sender.finish();
                return Err(e);
            }
        };
        eprintln!(
            "{test}: cut {} after start with {before} messages received ({batches_before} \
             batches sent); relay on a→b after {}, b→a after {} (from the cut); the stream \
             stood still for {} at most until then; {} received by then",
            ms(cut_at),
            ms(sw.relay_a - cut_at),
            ms(sw.relay_b - cut_at),
            ms(sw.longest_stall),
            sw.received
        );
        // The stream goes on over the relay for a while.
        let switched = sender.done();
        let more = wait_every(
            SLOW,
            Duration::from_millis(50),
            "batches on the relay",
            || (sender.done() >= switched + 3 || sender.thread.is_finished()).then_some(()),
        );
        let sent = sender.finish()?;
        more?;
        let mut want: Vec<String> = numbered("first", 1).collect();
        for k in 0..sent {
            want.extend(numbered(&format!("s{k}"), BATCH));
        }
        let delivered = wait_every(SLOW, Duration::from_millis(100), "the whole stream", || {
            (received_count(&p.inbox) >= want.len()).then_some(())
        });
        for n in [&p.a, &p.b] {
            for l in n.log_lines(&["path up", "path down", "active path"]) {
                eprintln!("{test}: {}: {l}", n.name);
            }
        }
        delivered?;
        // Nothing more trickles in (a duplicate would).
        std::thread::sleep(Duration::from_millis(500));
        check_exact(&received(&p.inbox), &want)?;
        eprintln!(
            "{test}: {} messages in {sent} batches arrived exactly once and in order",
            want.len()
        );
        for (side, path) in [("a→b", p.a.path_to("b")), ("b→a", p.b.path_to("a"))] {
            ensure!(
                path.as_deref() == Some("relay"),
                "{side} is {path:?} after the cut"
            );
        }
        Ok(())
    });
}
