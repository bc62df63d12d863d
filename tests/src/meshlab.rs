//! The peermesh processes inside a [`netlab`](crate::netlab) NAT lab: a
//! control server and a relay on a public host, one `meshnode up` per site
//! host, and helpers to drive and observe them (status, send, recv with
//! arrival timestamps, ping, blast/sink throughput, the nodes' events (path
//! changes and the like, read from their local API), raw UDP goodput between
//! two lab namespaces).
//!
//! Every process writes to a log file in the [`MeshLab`]'s temporary
//! directory. Dropping the `MeshLab` kills every process it started (the
//! lab's own drop then kills whatever is still inside its namespaces and
//! removes them); when that happens while a thread panics, the tail of every
//! log is printed and the logs are kept in a `peermesh-failed-*` directory
//! under the system temporary directory ([`MeshLab::keep_logs`] does the
//! same on demand, e.g. for a failed benchmark trial).
//!
//! Client commands (`meshnode status`, `send`, `recv`, …) run in the calling
//! process's own namespace: they reach the node over the Unix socket in its
//! state directory, which does not depend on the network namespace.
//! [`MeshNode::status`] reads that socket in-process (no process spawn), so
//! it can be polled every few milliseconds.
//!
//! Every process this module starts gets `PR_SET_PDEATHSIG(SIGKILL)`: it dies
//! with the thread that spawned it, so an interrupted test or benchmark
//! leaves no node running. Spawn from the thread that owns the `MeshLab`.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use peermesh_base::event::{Event, EventKind};
use peermesh_base::path_name;
use peermesh_base::status::{NodeStatus, PeerStatus};
use peermesh_meshnode::api::Received;

use crate::netlab::{Lab, NatKind, Ns, PublicHost, Shaping, Site, SiteOpts};
use crate::Bins;

/// The control server's TCP port on the public host.
pub const CONTROL_PORT: u16 = 7000;
/// The relay's UDP port on the public host.
pub const RELAY_PORT: u16 = 4001;
/// The control server's STUN ports (primary address, then the second
/// address with the next port).
pub const STUN_PORT: u16 = 3478;
/// The group [`MeshLab::start_public`] creates.
pub const GROUP: &str = "g";
/// Bound for process start-up (listening, registering).
const STARTUP: Duration = Duration::from_secs(30);
/// Bound for one admin command.
const ADMIN: Duration = Duration::from_secs(20);
/// The nodes' log filter: info keeps the logs useful for a failed test's
/// dump without logging competing with the data plane for CPU.
pub const DEFAULT_RUST_LOG: &str = "info,h2=warn,tower=warn,hyper=warn";

/// Makes `cmd`'s process die (SIGKILL) when the thread that spawns it ends.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl(2) is async-signal-safe; the closure runs in the forked
    // child before exec and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs `cmd` with its output captured; killed and failed after `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    die_with_parent(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1");
    let mut child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
    // Drain both pipes on threads so that a chatty command never blocks.
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Like [`run_bounded`]; stdout, or an error with stderr on a non-zero exit.
pub fn run_ok(cmd: Command, timeout: Duration) -> Result<String> {
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

/// Polls `f` every `every` until it returns `Some`, or fails after `timeout`.
pub fn poll<T>(
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

/// A small runtime for the in-process socket clients.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("meshlab-client")
            .enable_all()
            .build()
            .expect("a tokio runtime for the meshlab clients")
    })
}

/// A change of a link's active path, from a node's events.
#[derive(Clone, Debug, PartialEq)]
pub struct PathChange {
    /// When the node made the change.
    pub at: SystemTime,
    /// The peer's id.
    pub peer: String,
    /// `connecting`, `relay`, `direct` or `forwarded`.
    pub path: String,
}

impl PathChange {
    /// The path change an event is, if it is one.
    pub fn of(e: &Event) -> Option<Self> {
        match &e.kind {
            EventKind::PathChanged { peer, path, .. } => Some(Self {
                at: e.at(),
                peer: peer.to_string(),
                path: path_name(*path).to_string(),
            }),
            _ => None,
        }
    }
}

/// The events the node behind `socket` keeps (the recent past), read
/// in-process from its local API; empty while it does not answer (within
/// 2 s).
pub fn events_at(socket: &Path) -> Vec<Event> {
    runtime().block_on(async {
        tokio::time::timeout(
            Duration::from_secs(2),
            peermesh_meshnode::api::recent_events(socket),
        )
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default()
    })
}

/// One `meshnode ping --json` line.
#[derive(Clone, Debug, PartialEq)]
pub struct PingSample {
    pub path: String,
    pub rtt_ms: Option<f64>,
}

/// `meshnode sink --json`: bytes and messages that arrived, and the rate
/// from the first byte to the last.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkResult {
    pub bytes: u64,
    pub messages: u64,
    pub seconds: f64,
    pub mbit_per_s: f64,
}

/// A running `meshnode up` inside a lab namespace.
#[derive(Clone, Debug)]
pub struct MeshNode {
    pub name: String,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl MeshNode {
    /// The node's local API socket.
    pub fn socket(&self) -> PathBuf {
        self.state.join("meshnode.sock")
    }

    /// A `meshnode SUB --state …` command, to run in the caller's
    /// namespace.
    pub fn client(&self, sub: &str) -> Command {
        let mut cmd = Command::new(&Bins::get().meshnode);
        cmd.arg(sub).arg("--state").arg(&self.state);
        cmd
    }

    /// The node's status, read in-process from its socket (what
    /// `meshnode status --json` prints), or None while it does not answer
    /// (within 2 s).
    pub fn status(&self) -> Option<NodeStatus> {
        let socket = self.socket();
        runtime().block_on(async {
            tokio::time::timeout(
                Duration::from_secs(2),
                peermesh_meshnode::api::query(&socket),
            )
            .await
            .ok()?
            .ok()
        })
    }

    /// The status entry of the peer named (or with the id) `peer`.
    pub fn peer(&self, peer: &str) -> Option<PeerStatus> {
        self.status()?
            .peers
            .into_iter()
            .find(|p| p.name == peer || p.id == peer)
    }

    /// The path of the link to `peer`, if listed.
    pub fn path_to(&self, peer: &str) -> Option<String> {
        self.peer(peer).map(|p| path_name(p.path).to_string())
    }

    /// Waits (polling every `every`) until this node lists `peer`; returns
    /// its status entry.
    pub fn wait_peer(&self, peer: &str, timeout: Duration, every: Duration) -> Result<PeerStatus> {
        poll(
            timeout,
            every,
            &format!("{} to list peer {peer}", self.name),
            || self.peer(peer),
        )
    }

    /// Waits until the node's local API socket answers.
    pub fn wait_up(&self, timeout: Duration) -> Result<NodeStatus> {
        poll(
            timeout,
            Duration::from_millis(5),
            &format!("{} to answer on its socket", self.name),
            || self.status(),
        )
    }

    /// `meshnode send PEER MSG…`.
    pub fn send(&self, peer: &str, messages: &[&str]) -> Result<()> {
        let mut cmd = self.client("send");
        cmd.arg(peer).args(messages);
        run_ok(cmd, Duration::from_secs(60)).map(drop)
    }

    /// `meshnode send PEER --count n --prefix prefix`.
    pub fn send_numbered(&self, peer: &str, prefix: &str, n: usize) -> Result<()> {
        let mut cmd = self.client("send");
        cmd.arg(peer)
            .args(["--count", &n.to_string(), "--prefix", prefix]);
        run_ok(cmd, Duration::from_secs(120)).map(drop)
    }

    /// `meshnode ping PEER -c count --json`: one sample a second.
    pub fn ping(&self, peer: &str, count: u32) -> Result<Vec<PingSample>> {
        let mut cmd = self.client("ping");
        cmd.arg(peer).args(["-c", &count.to_string(), "--json"]);
        let out = run_ok(cmd, Duration::from_secs(u64::from(count) + 15))?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).with_context(|| format!("ping line {l:?}"))?;
                Ok(PingSample {
                    path: v["path"].as_str().unwrap_or_default().to_string(),
                    rtt_ms: v["rtt_ms"].as_f64(),
                })
            })
            .collect()
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node's events so far (its local API keeps the recent ones).
    pub fn events(&self) -> Vec<Event> {
        events_at(&self.socket())
    }

    /// Every change of the active path of the link to the peer with id
    /// `peer_id`, in order.
    pub fn path_changes(&self, peer_id: impl std::fmt::Display) -> Vec<PathChange> {
        let peer_id = peer_id.to_string();
        self.events()
            .iter()
            .filter_map(PathChange::of)
            .filter(|c| c.peer == peer_id)
            .collect()
    }

    /// The first change of the link to `peer_id` to `path`.
    pub fn first_path(&self, peer_id: impl std::fmt::Display, path: &str) -> Option<PathChange> {
        self.path_changes(peer_id)
            .into_iter()
            .find(|c| c.path == path)
    }

    /// Waits (reading the events every 10 ms) until the link to `peer_id`
    /// moved to `path`, a change at or after `since`; returns it.
    pub fn wait_path(
        &self,
        peer_id: impl std::fmt::Display,
        path: &str,
        since: SystemTime,
        timeout: Duration,
    ) -> Result<PathChange> {
        let peer_id = peer_id.to_string();
        poll(
            timeout,
            Duration::from_millis(10),
            &format!("{}: the link to {peer_id} on {path}", self.name),
            || {
                self.path_changes(&peer_id)
                    .into_iter()
                    .find(|c| c.path == path && c.at >= since)
            },
        )
    }
}

/// A message printed by `meshnode recv --json`, with the moment the line
/// was read from its stdout.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub at: SystemTime,
    pub msg: Received,
}

/// A running `meshnode recv --json`, whose lines a thread reads and stamps
/// as they are printed. Killed when dropped.
pub struct Inbox {
    child: Child,
    /// When the process was spawned.
    pub started: SystemTime,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Inbox {
    /// Everything received so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many messages arrived.
    pub fn count(&self) -> usize {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The first arrival whose data is `data`.
    pub fn find(&self, data: &str) -> Option<Arrival> {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|a| a.msg.data == data)
            .cloned()
    }

    /// Waits (every 1 ms) for a message whose data is `data`.
    pub fn wait_for(&self, data: &str, timeout: Duration) -> Result<Arrival> {
        poll(
            timeout,
            Duration::from_millis(1),
            &format!("message {data:?} to arrive"),
            || self.find(data),
        )
    }

    /// Waits until `recv` has its connection to the node open (a socket
    /// among its descriptors; it subscribes on it right after connecting).
    pub fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let fds = PathBuf::from(format!("/proc/{}/fd", self.child.id()));
        poll(
            timeout,
            Duration::from_millis(1),
            "meshnode recv to connect to the node",
            || {
                std::fs::read_dir(&fds)
                    .ok()?
                    .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .any(|target| target.to_string_lossy().starts_with("socket:"))
                    .then_some(())
            },
        )
    }

    /// Whether `recv` is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills `recv` (which frees the node's inbox for another reader).
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Raw UDP goodput, see [`udp_goodput`].
#[derive(Clone, Debug, PartialEq)]
pub struct UdpGoodput {
    /// Bytes of each datagram on the wire (UDP payload).
    pub datagram_bytes: usize,
    /// Datagrams per send call (1: one `sendto` each; more: UDP GSO).
    pub segments: usize,
    pub sent: u64,
    pub received: u64,
    /// From the first datagram received to the last one.
    pub seconds: f64,
    /// Payload bytes received per second, in Mbit/s.
    pub mbit_per_s: f64,
}

/// `UDP_SEGMENT` and `UDP_GRO` (linux/udp.h; not in every libc build).
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

fn set_int_opt(s: &UdpSocket, level: libc::c_int, opt: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: setsockopt on an open socket with a c_int value.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            level,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Sends `size`-byte UDP datagrams for `duration` from a socket in `from`
/// to `dst`, received by a socket bound to `bind` in `to`, as fast as one
/// sending thread can; returns the goodput (payload received over the time
/// from the first datagram received to the last).
///
/// `segments` datagrams go out per send call: 1 is one `sendto` per
/// datagram (bound by system calls), more uses UDP GSO (`UDP_SEGMENT`, at
/// most 64 and 65 000 bytes a call) with `UDP_GRO` on the receiver, as
/// QUIC stacks do; the datagrams on the wire are `size` bytes either way.
pub fn udp_goodput(
    from: &Ns,
    to: &Ns,
    bind: SocketAddr,
    dst: SocketAddr,
    size: usize,
    segments: usize,
    duration: Duration,
) -> Result<UdpGoodput> {
    let segments = segments.clamp(1, (65_000 / size.max(1)).clamp(1, 64));
    let rx = to.udp_bind(bind)?;
    let tx = from.udp_bind("0.0.0.0:0")?;
    for s in [&rx, &tx] {
        // Best effort: capped by net.core.{r,w}mem_max.
        set_int_opt(s, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
        set_int_opt(s, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
    }
    if segments > 1 {
        if !set_int_opt(&tx, libc::SOL_UDP, UDP_SEGMENT, size as libc::c_int) {
            bail!(
                "UDP_SEGMENT (GSO): {}; use segments = 1",
                std::io::Error::last_os_error()
            );
        }
        set_int_opt(&rx, libc::SOL_UDP, UDP_GRO, 1);
    }
    rx.set_read_timeout(Some(Duration::from_millis(500)))?;
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let done = done.clone();
        std::thread::spawn(move || -> (u64, Option<Instant>, Option<Instant>) {
            let mut buf = vec![0u8; 65536];
            let (mut bytes, mut first, mut last) = (0u64, None, None);
            loop {
                match rx.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        let now = Instant::now();
                        first.get_or_insert(now);
                        last = Some(now);
                        bytes += n as u64;
                    }
                    Err(_) if done.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            (bytes, first, last)
        })
    };
    let payload = vec![0x5au8; size * segments];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        for _ in 0..16 {
            if tx.send_to(&payload, dst).is_ok() {
                sent += payload.len() as u64;
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    let (received, first, last) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the UDP receiver panicked"))?;
    let seconds = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    if received == 0 || seconds <= 0.0 {
        bail!("no UDP datagram from {from:?} reached {dst} in {to:?}");
    }
    Ok(UdpGoodput {
        datagram_bytes: size,
        segments,
        sent,
        received,
        seconds,
        mbit_per_s: received as f64 * 8.0 / seconds / 1e6,
    })
}

/// Forwards UDP `port` on `site`'s router to the same port of its host (a
/// "port forward" of a home router), and returns the public address that
/// now reaches the host. Without a router the host's own address.
pub fn forward_udp(site: &Site, port: u16) -> Result<SocketAddr> {
    let Some(router) = &site.router else {
        return Ok(SocketAddr::V4(SocketAddrV4::new(site.host.ip(), port)));
    };
    let host = site.host.ip();
    router.nft(&format!(
        "insert rule ip pmnat prerouting iif \"wan\" udp dport {port} dnat to {host}:{port}\n\
         insert rule ip pmfw forward iif \"wan\" udp dport {port} accept\n"
    ))?;
    Ok(SocketAddr::V4(SocketAddrV4::new(router.wan_ip(), port)))
}

/// A netlab with the peermesh processes running in it; see the module
/// documentation.
pub struct MeshLab {
    label: String,
    pub dir: tempfile::TempDir,
    procs: Vec<(String, Child)>,
    logs: Vec<(String, PathBuf)>,
    server: Option<PublicHost>,
    rust_log: String,
    /// Declared last: the namespaces go after the processes are killed.
    pub lab: Lab,
}

impl MeshLab {
    /// Wraps `lab`; `label` names the temporary directory and the logs.
    /// Builds the binaries first (nothing is timed yet).
    pub fn new(label: &str, lab: Lab) -> Result<Self> {
        Bins::get();
        Ok(Self {
            label: label.to_string(),
            dir: tempfile::Builder::new()
                .prefix(&format!("peermesh-meshlab-{label}-"))
                .tempdir()?,
            procs: Vec::new(),
            logs: Vec::new(),
            server: None,
            // `PEERMESH_LAB_LOG=debug,…` to look closer at one run.
            rust_log: std::env::var("PEERMESH_LAB_LOG")
                .unwrap_or_else(|_| DEFAULT_RUST_LOG.to_string()),
            lab,
        })
    }

    /// The `RUST_LOG` of processes started from now on.
    pub fn set_rust_log(&mut self, filter: &str) {
        self.rust_log = filter.to_string();
    }

    /// The public host of [`MeshLab::start_public`].
    pub fn server(&self) -> &PublicHost {
        self.server.as_ref().expect("start_public first")
    }

    /// The control server's URL.
    pub fn url(&self) -> String {
        // TLS: plaintext is taken from loopback only (the tokens pin the
        // server's key).
        format!("https://{}:{CONTROL_PORT}", self.server().ip())
    }

    /// The relay's address.
    pub fn relay_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.server().ip(), RELAY_PORT))
    }

    /// Spawns `cmd` inside `ns` with its output appended to `log`; killed
    /// when the `MeshLab` is dropped.
    pub fn spawn(&mut self, label: &str, ns: &Ns, mut cmd: Command, log: &Path) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("log file {}", log.display()))?;
        die_with_parent(&mut cmd)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", &self.rust_log);
        let child = ns.spawn(cmd)?;
        self.procs.push((label.to_string(), child));
        self.logs.push((label.to_string(), log.to_path_buf()));
        Ok(())
    }

    /// Waits until `log` contains `needle`.
    pub fn wait_log(&self, log: &Path, needle: &str, what: &str) -> Result<()> {
        poll(STARTUP, Duration::from_millis(10), what, || {
            std::fs::read_to_string(log)
                .ok()?
                .contains(needle)
                .then_some(())
        })
    }

    /// `control-server admin …`, run on the public host.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.server().command(&Bins::get().control_server);
        cmd.arg("admin")
            .arg("--server")
            .arg(self.url())
            .arg("--data")
            .arg(self.dir.path().join("control-data"))
            .args(args);
        run_ok(cmd, ADMIN)
    }

    /// A public host `srv` (two addresses) with the control server (and its
    /// STUN endpoints on both addresses) and one relay, and the group
    /// [`GROUP`].
    pub fn start_public(&mut self) -> Result<()> {
        let host = self.lab.public_host_with_two_addrs("srv")?;
        self.start_public_on(host)
    }

    /// [`Self::start_public`] with the public host's link to the bridge
    /// shaped (delay, loss, rate; see [`Shaping`]): e.g. 25 ms there and on
    /// every site's WAN leg put every site 100 ms of round trip from the
    /// servers and from each other.
    pub fn start_public_shaped(&mut self, shaping: Shaping) -> Result<()> {
        let host = self.lab.public_host_shaped("srv", 2, shaping)?;
        self.start_public_on(host)
    }

    fn start_public_on(&mut self, host: PublicHost) -> Result<()> {
        self.server = Some(host.clone());
        let ip = host.ip();
        let ip2 = host.ip2().context("a second public address")?;
        let log = self.dir.path().join("control-server.log");
        let mut cmd = Command::new(&Bins::get().control_server);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("{ip}:{CONTROL_PORT}"))
            .arg("--data")
            .arg(self.dir.path().join("control-data"))
            .arg("--stun")
            .arg(format!("{ip}:{STUN_PORT}"))
            .arg("--stun-alt")
            .arg(format!("{ip2}:{}", STUN_PORT + 1));
        self.spawn("control-server", &host, cmd, &log)?;
        self.wait_log(&log, "listening on", "the control server to listen")?;
        self.admin(&["create-group", GROUP])?;

        self.start_relay("relay", RELAY_PORT)
    }

    /// Another relay on the public host (after [`Self::start_public`]),
    /// registered in the directory; `label` names its process and log.
    pub fn start_relay(&mut self, label: &str, port: u16) -> Result<()> {
        let host = self.server().clone();
        let token = self.admin(&["create-token", "--relay"])?.trim().to_string();
        let log = self.dir.path().join(format!("{label}.log"));
        let mut cmd = Command::new(&Bins::get().meshnode);
        cmd.arg("relay")
            .arg("--listen")
            .arg(format!("{}:{port}", host.ip()))
            .arg("--control")
            .arg(self.url())
            .arg("--token")
            .arg(&token)
            .arg("--state")
            .arg(self.dir.path().join(format!("{label}-state")));
        self.spawn(label, &host, cmd, &log)?;
        self.wait_log(
            &log,
            "registered with the control server",
            "the relay to register",
        )
    }

    /// SIGKILLs the process started as `label`; false if there is none.
    pub fn kill(&mut self, label: &str) -> bool {
        let Some(i) = self.procs.iter().position(|(l, _)| l == label) else {
            return false;
        };
        let (_, mut child) = self.procs.remove(i);
        let _ = child.kill();
        let _ = child.wait();
        true
    }

    /// A join token for one node of [`GROUP`].
    pub fn token(&self) -> Result<String> {
        Ok(self
            .admin(&["create-token", "--group", GROUP, "--uses", "1"])?
            .trim()
            .to_string())
    }

    /// A site of the lab (see [`Lab::site`]).
    pub fn site(&self, name: &str, kind: NatKind, opts: SiteOpts) -> Result<Site> {
        self.lab.site(name, kind, opts)
    }

    /// `meshnode up` named `name` in namespace `ns` (a site's host),
    /// joining with `token`. Returns at once (see [`MeshNode::wait_up`]).
    pub fn node(&mut self, name: &str, ns: &Ns, token: &str) -> Result<MeshNode> {
        self.node_with(name, ns, token, &[])
    }

    /// [`Self::node`] with extra `meshnode up` arguments.
    pub fn node_with(
        &mut self,
        name: &str,
        ns: &Ns,
        token: &str,
        extra: &[&str],
    ) -> Result<MeshNode> {
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
            .arg(name)
            .args(extra);
        self.spawn(&format!("node {name}"), ns, cmd, &log)?;
        Ok(MeshNode {
            name: name.to_string(),
            state,
            log,
        })
    }

    /// `meshnode recv --json` on `node` (in this process's namespace), its
    /// lines stamped as they are printed. Only one reader (`recv` or
    /// `sink`) may be attached to a node at a time.
    pub fn recv(&mut self, node: &MeshNode) -> Result<Inbox> {
        let err = self.dir.path().join(format!("recv-{}.log", node.name));
        let mut cmd = node.client("recv");
        cmd.arg("--json");
        die_with_parent(&mut cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err)?);
        let started = SystemTime::now();
        let mut child = cmd.spawn().context("spawning meshnode recv")?;
        self.logs.push((format!("recv {}", node.name), err));
        let stdout = child.stdout.take().context("recv stdout")?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let sink = arrivals.clone();
        let thread = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let at = SystemTime::now();
                        if let Ok(msg) = serde_json::from_str::<Received>(&line) {
                            sink.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Arrival { at, msg });
                        }
                    }
                }
            }
        });
        Ok(Inbox {
            child,
            started,
            arrivals,
            thread: Some(thread),
        })
    }

    /// Throughput from `from` to `to` (which must have no `recv` attached):
    /// `meshnode sink --bytes bytes --json` on `to`, then `meshnode blast`
    /// of `bytes` in `size`-byte messages on `from`; the sink's result
    /// (rate from the first byte to the last). Bounded by `timeout`.
    pub fn throughput(
        &self,
        from: &MeshNode,
        to: &MeshNode,
        bytes: u64,
        size: usize,
        timeout: Duration,
    ) -> Result<SinkResult> {
        let secs = timeout.as_secs().max(1);
        // The node lets go of its inbox only when it notices that the last
        // reader (e.g. the previous sink) has gone, up to 100 ms later: a
        // sink refused with "another `recv` is attached" is tried again.
        let attach_deadline = Instant::now() + Duration::from_secs(5);
        let mut sink = loop {
            let mut cmd = to.client("sink");
            cmd.args([
                "--bytes",
                &bytes.to_string(),
                "--timeout",
                &secs.to_string(),
                "--json",
            ]);
            die_with_parent(&mut cmd)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut sink = cmd.spawn().context("spawning meshnode sink")?;
            // Attached before the first byte leaves (the sink's clock
            // starts at the first byte, so waiting here costs no accuracy).
            std::thread::sleep(Duration::from_millis(300));
            let Some(status) = sink.try_wait()? else {
                break sink;
            };
            let mut err = String::new();
            if let Some(mut e) = sink.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            if !err.contains("another `recv` is attached") || Instant::now() > attach_deadline {
                bail!("meshnode sink exited early ({status}): {}", err.trim());
            }
        };
        let mut blast = from.client("blast");
        blast.args([
            &to.name,
            "--bytes",
            &bytes.to_string(),
            "--size",
            &size.to_string(),
        ]);
        let blasted = run_ok(blast, timeout);
        let deadline = Instant::now() + timeout + Duration::from_secs(5);
        let status = loop {
            if let Some(s) = sink.try_wait()? {
                break Some(s);
            }
            if Instant::now() > deadline || blasted.is_err() {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let Some(status) = status else {
            let _ = sink.kill();
            let _ = sink.wait();
            blasted?;
            bail!("meshnode sink did not get {bytes} bytes within {timeout:?}");
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = sink.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = sink.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        blasted?;
        if !status.success() {
            bail!("meshnode sink failed ({status}): {}", err.trim());
        }
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("meshnode sink printed {out:?}"))?;
        Ok(SinkResult {
            bytes: v["bytes"].as_u64().unwrap_or(0),
            messages: v["messages"].as_u64().unwrap_or(0),
            seconds: v["seconds"].as_f64().unwrap_or(0.0),
            mbit_per_s: v["mbit_per_s"].as_f64().unwrap_or(0.0),
        })
    }

    /// Cuts `site`'s UDP to and from `peer` (e.g. another site's public
    /// address: the direct path dies, the relay path survives).
    pub fn cut(&self, site: &Site, peer: Ipv4Addr) -> Result<()> {
        self.lab.cut(site, peer)
    }

    /// Prints the last `lines` lines of every log.
    pub fn dump_logs(&self, lines: usize) {
        for (name, path) in &self.logs {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(path) {
                let _ = f.read_to_string(&mut text);
            }
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            eprintln!(
                "----- {name} ({}) -----\n{}",
                path.display(),
                tail.join("\n")
            );
        }
    }

    /// Copies every log and the lab's rules to a new
    /// `peermesh-failed-{label}-…` directory under the system temporary
    /// directory, and returns it.
    pub fn keep_logs(&self) -> Option<PathBuf> {
        let keep = std::env::temp_dir().join(format!(
            "peermesh-failed-{}",
            self.dir
                .path()
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        ));
        std::fs::create_dir_all(&keep).ok()?;
        for (_, path) in &self.logs {
            if let Some(name) = path.file_name() {
                let _ = std::fs::copy(path, keep.join(name));
            }
        }
        let _ = std::fs::write(keep.join("netlab.txt"), self.lab.describe());
        Some(keep)
    }

    /// Kills every process this `MeshLab` started (also done on drop).
    pub fn kill_all(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.procs.clear();
    }
}

impl Drop for MeshLab {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            eprintln!("===== {}: logs =====", self.label);
            self.dump_logs(50);
            if let Some(keep) = self.keep_logs() {
                eprintln!("logs and the lab's rules kept in {}", keep.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_changes_come_from_path_changed_events() {
        let peer: peermesh_base::NodeId = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
            .parse()
            .unwrap();
        let e = Event {
            at_us: 1_795_332_480_123_456,
            kind: EventKind::PathChanged {
                peer,
                path: Some(peermesh_base::PathKind::Direct),
                via: None,
                rtt_ms: Some(0.41),
            },
        };
        let c = PathChange::of(&e).expect("a path change");
        assert_eq!(c.peer, peer.to_string());
        assert_eq!(c.path, "direct");
        let secs =
            c.at.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
        assert!((secs - 1_795_332_480.123456).abs() < 1e-5, "{secs}");
        let up = Event {
            at_us: 1,
            kind: EventKind::PathUp {
                peer,
                kind: peermesh_base::PathKind::Relay,
            },
        };
        assert!(PathChange::of(&up).is_none());
    }
}
