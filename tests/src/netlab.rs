//! A NAT lab on one machine: Linux network namespaces, veth pairs, a bridge
//! and nftables give real kernel NAT, so that lab tests can run the real
//! peermesh processes behind every NAT type of RFC 4787.
//!
//! # Topology
//!
//! Each [`Lab`] owns a set of namespaces named `{prefix}-{pid}-{n}-{role}`
//! (`prefix` defaults to [`DEFAULT_PREFIX`], `pid` is the process that made
//! them, `n` counts labs within that process). Interface names live inside
//! those namespaces only (`br0`, `eth0`, `wan`, `lan`, `pN`, `hN`), so they
//! never collide with another lab and never exceed 15 characters; nothing is
//! ever created in the machine's own namespace.
//!
//! - The *public* namespace holds the bridge `br0` of the "internet",
//!   198.18.0.0/24 (the benchmarking range, never a real address), with
//!   198.18.0.1 on the bridge itself.
//! - [`Lab::public_host`] / [`Lab::public_host_with_two_addrs`]: a namespace
//!   with `eth0` on the bridge and one or two public addresses, for servers.
//! - [`Lab::site`]: a router namespace (`wan` on the bridge with its own
//!   public address; `lan`, a bridge with 10.X.0.1/24) and a host namespace
//!   behind it (`eth0`, 10.X.0.2/24, default route via the router). More
//!   hosts behind the same router: [`Lab::add_host`]. With [`NatKind::None`]
//!   the host sits on the public bridge itself and there is no router.
//! - [`Lab::cgnat`]: a carrier-grade NAT, a router namespace (`{name}-cg`)
//!   with its own public address on the bridge and a shared
//!   100.64.0.0/10 segment (bridge `lan`, 100.64.0.1) behind it;
//!   [`Lab::site_behind`] puts a site there: its router's `wan` gets
//!   100.64.0.N and a default route via the CGNAT, so its traffic crosses
//!   two NATs.
//!
//! # Delay, loss and rate
//!
//! A link made with shaping ([`SiteOpts::delay`], [`SiteOpts::loss`],
//! [`SiteOpts::rate_bps`] for a site's WAN leg, or the host's leg with
//! [`NatKind::None`]; [`Lab::public_host_shaped`] for servers) is two TAP
//! devices joined by a userspace [`wire::Wire`] instead of a veth pair; see
//! [`wire`] for what it does to the frames and how fast it is. Each
//! direction of a link is shaped on its own, so a one-way delay `d` on
//! every leg puts any two sites `4 d` of round trip apart. [`Lab::set_shaping`]
//! changes a link's shaping while it runs; [`Lab::wire_stats`] counts what
//! it did. Links without shaping stay veth pairs.
//!
//! # NAT state
//!
//! [`SiteOpts::udp_timeout`] shortens a router's UDP mapping timeouts (the
//! conntrack timeouts of its namespace, and the full cone's maps);
//! [`Router::flush_mappings`] makes a NAT lose every mapping at once (a
//! reboot, a state-table overflow); [`Lab::change_public_ip`] gives a site
//! a new public address while it runs (a new DHCP or PPP lease).
//!
//! Every lab namespace has IPv6 disabled, so processes only see the IPv4
//! addresses the lab gave them. All public addresses are on one link, so no
//! namespace has a route to anything outside the lab: traffic to any other
//! address fails with "network unreachable" instead of leaving the machine.
//!
//! # NAT kinds
//!
//! See [`NatKind`]. The router's NAT and firewall rules are nftables tables
//! `ip pmnat` and `ip pmfw`, and `ip pmhop` drops what arrives on the WAN
//! leg with TTL 1 (the ISP hop; see `ISP_HOP`); [`Router::nft`] adds more. [`Lab::cut`] and
//! [`Lab::restore`] drop a site's UDP to and from one address on the public
//! bridge, e.g. to kill a hole-punched path while the relay path survives.
//!
//! # Running things inside
//!
//! [`Ns`] (which [`Host`], [`Router`] and [`PublicHost`] dereference to)
//! runs processes inside its namespace ([`Ns::spawn`], [`Ns::command`],
//! [`Ns::exec`]) by `setns` in the child before `exec`, so a `Command` keeps
//! its stdio, environment and working directory. [`Ns::run`] runs a closure
//! on a thread inside the namespace, and [`Ns::udp_bind`] /
//! [`Ns::tcp_listen`] / [`Ns::tcp_connect`] make sockets there that the
//! calling thread then uses as usual (a socket stays in the namespace it was
//! made in).
//!
//! # Cleanup
//!
//! Dropping the [`Lab`] (also while a test panics) kills every process still
//! inside its namespaces and deletes the namespaces, which removes every
//! interface and rule with them. [`Lab::new`] first removes what crashed runs
//! left behind ([`Lab::cleanup_stale`]): namespaces of the same prefix whose
//! process is gone and that are older than this process.
//!
//! # Requirements
//!
//! Root, `ip` (iproute2) and `nft` (nftables); `scripts/setup` installs them,
//! and `conntrack` (conntrack-tools), which [`Router::flush_mappings`] and
//! [`Lab::change_public_ip`] use.
//! Without them [`Lab::new`] returns an error saying what is missing; tests
//! use [`lab_or_skip`], which fails the test when `CI=true` and skips it
//! with a printed reason otherwise.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

pub mod wire;

use wire::Wire;
pub use wire::{DirectionStats, Shaping, WireStats};

/// The namespace name prefix of [`Lab::new`].
pub const DEFAULT_PREFIX: &str = "pmlab";

/// The public network: 198.18.0.0/24 (RFC 2544 benchmarking range).
const PUBLIC_NET: [u8; 3] = [198, 18, 0];
/// The address of the public bridge itself.
pub const PUBLIC_BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

const NETNS_DIR: &str = "/run/netns";

/// NAT behaviour of a site's router, in RFC 4787 terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NatKind {
    /// No NAT: the host has a public address directly on the public bridge.
    None,
    /// "Full cone": endpoint-independent mapping and endpoint-independent
    /// filtering. The first outbound UDP packet from an internal ip:port
    /// fixes its public port (the internal port when free), every later
    /// destination sees the same public port, and anyone may send to it.
    /// Built from two nftables maps (see the module source); non-UDP
    /// traffic is plainly source-NATed.
    FullCone,
    /// "Port-restricted cone": Linux `masquerade`. Endpoint-independent
    /// mapping in practice (the internal port is kept whenever the
    /// resulting tuple is free), address-and-port-dependent filtering.
    PortRestricted,
    /// Symmetric with random ports: `masquerade fully-random`, a new random
    /// public port for every destination ip:port.
    SymmetricRandom,
    /// Symmetric with sequential ports: every new UDP flow (new destination
    /// ip:port) takes the next port, `seq_base + k * seq_stride`
    /// ([`SiteOpts`]), from an nftables `numgen inc` counter shared by all
    /// hosts of the site. Non-UDP traffic is masqueraded.
    SymmetricSequential,
}

/// Options of [`Lab::site`].
#[derive(Clone, Debug)]
pub struct SiteOpts {
    /// Drop new unsolicited traffic arriving on the WAN leg, both addressed
    /// to the router itself (input hook) and passing through it (forward
    /// hook), as home routers do. Default true. False gives the harsher
    /// router whose own stack accepts an early inbound punch packet: the
    /// conntrack entry it leaves takes the port, and the NAT then maps the
    /// host to a different one.
    pub wan_firewall: bool,
    /// Added one-way delay on the router's WAN leg (for [`NatKind::None`]
    /// on the host's leg), in each direction. Any of `delay`, `loss` and
    /// `rate_bps` makes the leg a shaped link (see the module
    /// documentation); `Some(Duration::ZERO)` gives one that only passes
    /// frames on.
    pub delay: Option<Duration>,
    /// Random loss on the same leg, in each direction: the fraction of IPv4
    /// frames dropped (0.0 to 1.0).
    pub loss: f64,
    /// Rate limit of the same leg, in each direction, in bits per second
    /// of Ethernet frames (see [`Shaping::rate_bps`]).
    pub rate_bps: Option<u64>,
    /// The router's UDP mapping timeout: its namespace's conntrack UDP
    /// timeouts (`nf_conntrack_udp_timeout` and `…_stream`, in whole
    /// seconds, at least 1) and, for [`NatKind::FullCone`], the timeout of
    /// its mapping maps. None: the kernel's 30 s / 120 s and 300 s maps.
    pub udp_timeout: Option<Duration>,
    /// [`NatKind::SymmetricSequential`]: the first public port.
    pub seq_base: u16,
    /// [`NatKind::SymmetricSequential`]: the distance between consecutive
    /// public ports.
    pub seq_stride: u16,
    /// [`NatKind::SymmetricSequential`]: how many ports before the counter
    /// wraps around to `seq_base`.
    pub seq_count: u16,
}

impl Default for SiteOpts {
    fn default() -> Self {
        Self {
            wan_firewall: true,
            delay: None,
            loss: 0.0,
            rate_bps: None,
            udp_timeout: None,
            seq_base: 20000,
            seq_stride: 1,
            seq_count: 1000,
        }
    }
}

impl SiteOpts {
    /// The harsher router without a WAN firewall.
    pub fn without_wan_firewall() -> Self {
        Self {
            wan_firewall: false,
            ..Self::default()
        }
    }

    /// Default options with the WAN leg shaped by `shaping` (its queue and
    /// seed are not kept: use [`Lab::set_shaping`] for those).
    pub fn shaped(shaping: Shaping) -> Self {
        Self {
            delay: Some(shaping.delay),
            loss: shaping.loss,
            rate_bps: shaping.rate_bps,
            ..Self::default()
        }
    }

    /// The shaping of the WAN leg, if it is a shaped link.
    pub fn shaping(&self) -> Option<Shaping> {
        (self.delay.is_some() || self.loss > 0.0 || self.rate_bps.is_some()).then(|| Shaping {
            delay: self.delay.unwrap_or_default(),
            loss: self.loss,
            rate_bps: self.rate_bps,
            ..Shaping::default()
        })
    }
}

/// A lab link that may be shaped: a site's WAN leg, a public host's leg, a
/// CGNAT's leg ([`Site::leg`], [`PublicHost::leg`], [`Cgnat::leg`]), for
/// [`Lab::set_shaping`] and [`Lab::wire_stats`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Leg(String);

impl Leg {
    /// `{role}/{interface}` of the link's outer end, e.g. `pub/p3`: stable
    /// across runs of the same lab shape (it seeds the loss).
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// A network namespace made by a [`Lab`]. Cheap to clone; the namespace
/// itself lives as long as the lab.
#[derive(Clone)]
pub struct Ns {
    name: Arc<str>,
    fd: Arc<File>,
}

impl std::fmt::Debug for Ns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ns({})", self.name)
    }
}

impl Ns {
    fn open(name: &str) -> Result<Self> {
        let path = Path::new(NETNS_DIR).join(name);
        let fd = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            name: name.into(),
            fd: Arc::new(fd),
        })
    }

    /// The namespace's name (for `ip netns exec NAME …`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes `cmd` run inside this namespace (a `setns` in the child before
    /// `exec`); everything else about the command stays as configured.
    pub fn enter<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let fd = self.fd.clone();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the async-signal-safe setns(2) system call; `fd` is an open
        // descriptor kept alive by the Arc that the closure owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// A `Command` for `program` that will run inside this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.enter(&mut cmd);
        cmd
    }

    /// Spawns `cmd` inside this namespace. The lab kills it when dropped, if
    /// it still runs.
    pub fn spawn(&self, mut cmd: Command) -> Result<Child> {
        self.enter(&mut cmd);
        cmd.spawn()
            .with_context(|| format!("spawning {cmd:?} in {}", self.name))
    }

    /// Runs `args` (program first) inside this namespace and returns its
    /// output, whatever the exit status.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args.split_first().context("exec: empty command")?;
        let mut cmd = self.command(program);
        cmd.args(rest).stdin(Stdio::null());
        cmd.output()
            .with_context(|| format!("running {args:?} in {}", self.name))
    }

    /// Runs `args` (program first) inside this namespace; its stdout, or an
    /// error with its stderr when it exits non-zero.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!(
                "{args:?} in {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies an nftables script (`nft -f -`) inside this namespace, e.g.
    /// `"add rule ip pmfw forward udp dport 9 drop"`.
    pub fn nft(&self, script: &str) -> Result<()> {
        let mut cmd = self.command("nft");
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running nft in {}", self.name))?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {} failed: {}\nscript:\n{script}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `f` on a new thread that has entered this namespace, and
    /// returns its result (a panic in `f` is passed on). Sockets made in `f`
    /// stay in this namespace wherever they are used later.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd = self.fd.as_raw_fd();
        let name = &self.name;
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> Result<T> {
                // SAFETY: setns(2) with a valid namespace descriptor; it only
                // changes the network namespace of this (new) thread.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("entering namespace {name}"));
                }
                Ok(f())
            });
            handle
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A UDP socket bound to `addr` inside this namespace.
    pub fn udp_bind(&self, addr: impl ToSocketAddrs + Send) -> Result<UdpSocket> {
        Ok(self.run(|| UdpSocket::bind(addr))??)
    }

    /// A TCP listener bound to `addr` inside this namespace.
    pub fn tcp_listen(&self, addr: impl ToSocketAddrs + Send) -> Result<TcpListener> {
        Ok(self.run(|| TcpListener::bind(addr))??)
    }

    /// A TCP connection to `addr` made from inside this namespace.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        Ok(self.run(|| TcpStream::connect_timeout(&addr, timeout))??)
    }

    /// Sets the network sysctl `key` (e.g. `net.ipv4.ip_forward`) of this
    /// namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        if !key.starts_with("net.") || key.contains('/') || key.contains("..") {
            bail!("sysctl {key:?}: only net.* keys are per namespace");
        }
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        // /proc/sys/net resolves against the network namespace of the
        // thread that opens it.
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("writing {path} in {}", self.name))
    }

    /// Pids of the processes inside this namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stderr(Stdio::null())
            .output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// A server namespace on the public bridge.
#[derive(Clone, Debug)]
pub struct PublicHost {
    ns: Ns,
    ips: Vec<Ipv4Addr>,
    port: String,
    leg: Leg,
}

impl PublicHost {
    /// The (first) public address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ips[0]
    }

    /// The second address of [`Lab::public_host_with_two_addrs`].
    pub fn ip2(&self) -> Option<Ipv4Addr> {
        self.ips.get(1).copied()
    }

    /// All addresses, the first one primary (the source of traffic from
    /// sockets bound to 0.0.0.0: bind to an address to use the other).
    pub fn ips(&self) -> &[Ipv4Addr] {
        &self.ips
    }

    pub fn ns(&self) -> &Ns {
        &self.ns
    }

    /// The host's link to the public bridge.
    pub fn leg(&self) -> &Leg {
        &self.leg
    }
}

impl std::ops::Deref for PublicHost {
    type Target = Ns;
    fn deref(&self) -> &Ns {
        &self.ns
    }
}

/// A host namespace: behind a site's router, or public for
/// [`NatKind::None`].
#[derive(Clone, Debug)]
pub struct Host {
    ns: Ns,
    ip: Ipv4Addr,
}

impl Host {
    /// The host's own address (10.X.0.N behind a router).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn ns(&self) -> &Ns {
        &self.ns
    }
}

impl std::ops::Deref for Host {
    type Target = Ns;
    fn deref(&self) -> &Ns {
        &self.ns
    }
}

/// A site's NAT router namespace: interfaces `wan` (public) and `lan` (a
/// bridge with the hosts' legs `h2`, `h3`, …), nftables tables `ip pmnat`
/// (chains `prerouting`, `postrouting`, for full cone also `record`) and
/// `ip pmfw` (filter chains `input` and `forward`, which end in
/// `iif "wan" drop` with the WAN firewall: use `insert rule` to put a rule
/// before that), e.g.
/// `router.nft("insert rule ip pmfw forward udp dport 9999 drop")`.
#[derive(Clone, Debug)]
pub struct Router {
    ns: Ns,
    wan_ip: Ipv4Addr,
    lan_ip: Ipv4Addr,
    kind: NatKind,
    opts: SiteOpts,
}

impl Router {
    /// The router's address on its `wan` interface: public on the bridge,
    /// or 100.64.0.N behind a CGNAT ([`Lab::site_behind`]).
    pub fn wan_ip(&self) -> Ipv4Addr {
        self.wan_ip
    }

    /// The router's NAT.
    pub fn kind(&self) -> NatKind {
        self.kind
    }

    /// Makes the NAT lose every mapping at once, as a reboot or a full
    /// state table would: deletes its namespace's conntrack entries
    /// (`conntrack -F`) and, for [`NatKind::FullCone`], empties its mapping
    /// maps. What arrives from the WAN for an old mapping is then
    /// unsolicited (the WAN firewall drops it); the next packet out makes a
    /// new mapping.
    pub fn flush_mappings(&self) -> Result<()> {
        if self.kind == NatKind::FullCone {
            self.nft(
                "flush map ip pmnat eim_out
flush map ip pmnat eim_in
",
            )?;
        }
        conntrack_flush(&self.ns)
    }

    /// The router's conntrack table (`conntrack -L`), for debugging.
    pub fn conntrack(&self) -> String {
        self.exec(&["conntrack", "-L"])
            .unwrap_or_else(|e| format!("{e:#}"))
    }

    /// The router's LAN address 10.X.0.1 (interface `lan`).
    pub fn lan_ip(&self) -> Ipv4Addr {
        self.lan_ip
    }

    /// The router's nftables ruleset, for debugging.
    pub fn ruleset(&self) -> String {
        self.exec(&["nft", "list", "ruleset"])
            .unwrap_or_else(|e| format!("{e:#}"))
    }

    pub fn ns(&self) -> &Ns {
        &self.ns
    }
}

impl std::ops::Deref for Router {
    type Target = Ns;
    fn deref(&self) -> &Ns {
        &self.ns
    }
}

/// A site: a host behind a router of some [`NatKind`].
#[derive(Clone, Debug)]
pub struct Site {
    pub name: String,
    pub kind: NatKind,
    /// The first host of the site.
    pub host: Host,
    /// None for [`NatKind::None`].
    pub router: Option<Router>,
    /// The carrier-grade NAT in front of the site ([`Lab::site_behind`]).
    pub cgnat: Option<Router>,
    index: u8,
    /// The port on the public bridge that the site's traffic crosses (the
    /// CGNAT's for a site behind one).
    port: String,
    /// The site's own WAN leg (router or host to the bridge or the CGNAT).
    leg: Leg,
}

impl Site {
    /// The address the public side sees: the CGNAT's public address, the
    /// router's WAN address, or the host's own address without NAT.
    pub fn public_ip(&self) -> Ipv4Addr {
        match (&self.cgnat, &self.router) {
            (Some(c), _) => c.wan_ip,
            (None, Some(r)) => r.wan_ip,
            (None, None) => self.host.ip,
        }
    }

    /// The site's WAN leg: the router's `wan` (the host's `eth0` with
    /// [`NatKind::None`]) to the public bridge, or to the CGNAT's segment.
    pub fn leg(&self) -> &Leg {
        &self.leg
    }

    /// The router; panics for [`NatKind::None`].
    pub fn router(&self) -> &Router {
        self.router
            .as_ref()
            .unwrap_or_else(|| panic!("site {} has no router (NatKind::None)", self.name))
    }
}

/// A carrier-grade NAT ([`Lab::cgnat`]): sites behind it
/// ([`Lab::site_behind`]) share its public address.
#[derive(Clone, Debug)]
pub struct Cgnat {
    pub name: String,
    /// The CGNAT's router: `wan` on the public bridge, `lan` the shared
    /// 100.64.0.0/10 segment.
    pub router: Router,
    /// Its port on the public bridge.
    port: String,
    leg: Leg,
    /// The next 100.64.0.N for a site behind it.
    next_home: Arc<AtomicU32>,
}

impl Cgnat {
    /// The public address every site behind it shows.
    pub fn public_ip(&self) -> Ipv4Addr {
        self.router.wan_ip
    }

    /// Its link to the public bridge.
    pub fn leg(&self) -> &Leg {
        &self.leg
    }
}

/// The CGNAT's own address in its shared segment 100.64.0.0/10 (RFC 6598).
pub const CGNAT_GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);

/// A timeout in whole seconds for conntrack and nftables: at least 1.
fn timeout_secs(t: Duration) -> u64 {
    t.as_secs_f64().ceil().max(1.0) as u64
}

/// Deletes every conntrack entry of `ns`.
fn conntrack_flush(ns: &Ns) -> Result<()> {
    let out = ns.output(&["conntrack", "-F"]).with_context(|| {
        "running conntrack (conntrack-tools; scripts/setup installs it)".to_string()
    })?;
    if !out.status.success() {
        bail!(
            "conntrack -F in {} failed: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

struct State {
    namespaces: Vec<Ns>,
    /// The shaped links' wires, stopped before the namespaces go.
    wires: Vec<Wire>,
    next_public: u8,
    next_site: u8,
    next_port: u32,
    /// Next host number per site index (10.X.0.N).
    next_lan_host: Vec<u8>,
    cuts: HashSet<(String, Ipv4Addr)>,
}

/// A NAT lab: see the module documentation.
pub struct Lab {
    id: String,
    public: Ns,
    state: Mutex<State>,
}

/// Runs `ip args…` in the machine's namespace (only ever with `netns` or
/// `-n NAME`, i.e. on lab namespaces).
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn tool_works(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn check_name(name: &str) -> Result<()> {
    if !valid_label(name) {
        bail!("name {name:?}: use 1-24 lowercase letters and digits");
    }
    Ok(())
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 24
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// This process's start time, from /proc.
fn process_start_time() -> Result<SystemTime> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after = stat.rsplit_once(')').context("/proc/self/stat")?.1;
    // Field 22 (starttime) is the 20th after the ")" that ends field 2.
    let ticks: u64 = after
        .split_whitespace()
        .nth(19)
        .context("/proc/self/stat starttime")?
        .parse()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
        .context("/proc/stat btime")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(UNIX_EPOCH + Duration::from_secs(btime) + Duration::from_millis(ticks * 1000 / hz))
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The NAT table of a router.
fn nat_rules(kind: NatKind, opts: &SiteOpts, wan_ip: Ipv4Addr) -> Result<String> {
    let post = match kind {
        NatKind::None => unreachable!("no router without NAT"),
        // Endpoint-independent mapping for UDP, also across several hosts
        // of the site (plain snat would keep the internal port whenever the
        // 5-tuple is free, so two hosts with the same port would share one
        // public port, and a host whose port was taken for one destination
        // could keep it for another):
        // - `eim_out` remembers internal ip.port -> public port, `eim_in`
        //   public port -> internal ip.port; both are filled after the NAT
        //   decision (chain `record`, priority srcnat + 10, sees the
        //   translated packet) from the original direction of the flow.
        // - A known internal endpoint always gets its public port again.
        // - A new one keeps its own port, unless that port is already some
        //   endpoint's public port: then a random one.
        // - Inbound UDP to a public port in `eim_in` is sent on to the
        //   internal endpoint, whoever sends it (endpoint-independent
        //   filtering); the firewall lets DNATed flows pass.
        NatKind::FullCone => format!(
            "        oif \"wan\" meta l4proto udp ip saddr . udp sport @eim_out snat to {wan_ip} : ip saddr . udp sport map @eim_out\n\
             \x20       oif \"wan\" meta l4proto udp udp sport @eim_in snat to {wan_ip} : 1024-65535 fully-random\n\
             \x20       oif \"wan\" snat to {wan_ip}\n"
        ),
        NatKind::PortRestricted => "        oif \"wan\" masquerade\n".to_string(),
        NatKind::SymmetricRandom => "        oif \"wan\" masquerade fully-random\n".to_string(),
        NatKind::SymmetricSequential => {
            let (base, stride, count) = (
                u32::from(opts.seq_base),
                u32::from(opts.seq_stride.max(1)),
                u32::from(opts.seq_count.max(1)),
            );
            if base == 0 || base + stride * (count - 1) > 65535 {
                bail!("sequential ports {base} + {stride} * ({count} - 1) do not fit 1..=65535");
            }
            // Not `numgen inc mod N offset BASE`: nft 1.0.6 hands the
            // counter to snat in host byte order, so on x86 the ports come
            // out byte-swapped (20000, 20001 → 8270, 8526). A map of
            // typed port values is converted correctly.
            let elems: Vec<String> = (0..count)
                .map(|k| format!("{k} : {}", base + k * stride))
                .collect();
            let ports = format!("numgen inc mod {count} map {{ {} }}", elems.join(", "));
            format!(
                "        oif \"wan\" meta l4proto udp snat to {wan_ip} : {ports}\n\
                 \x20       oif \"wan\" masquerade\n"
            )
        }
    };
    // The full cone's mappings live as long as a UDP mapping does.
    let t = opts.udp_timeout.map_or(300, timeout_secs);
    let (maps, pre, record) = if kind == NatKind::FullCone {
        (
            format!(
                "    map eim_out {{ type ipv4_addr . inet_service : inet_service; flags dynamic,timeout; timeout {t}s; }}\n\
                 \x20   map eim_in {{ type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout {t}s; }}\n"
            ),
            "        iif \"wan\" meta l4proto udp dnat to udp dport map @eim_in\n",
            format!(
                "    chain record {{\n\
                 \x20       type filter hook postrouting priority srcnat + 10; policy accept;\n\
                 \x20       oif \"wan\" meta l4proto udp ct direction original update @eim_out {{ ct original ip saddr . ct original proto-src timeout {t}s : udp sport }}\n\
                 \x20       oif \"wan\" meta l4proto udp ct direction original update @eim_in {{ udp sport timeout {t}s : ct original ip saddr . ct original proto-src }}\n\
                 \x20   }}\n"
            ),
        )
    } else {
        (String::new(), "", String::new())
    };
    Ok(format!(
        "table ip pmnat {{\n{maps}\
         \x20   chain prerouting {{\n\
         \x20       type nat hook prerouting priority dstnat; policy accept;\n{pre}\
         \x20   }}\n\
         \x20   chain postrouting {{\n\
         \x20       type nat hook postrouting priority srcnat; policy accept;\n{post}\
         \x20   }}\n{record}}}\n"
    ))
}

/// The home router's WAN firewall.
const WAN_FIREWALL: &str = "table ip pmfw {
    chain input {
        type filter hook input priority filter; policy accept;
        iif \"wan\" ct state established,related accept
        iif \"wan\" drop
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        iif \"wan\" ct state established,related accept
        iif \"wan\" ct status dnat accept
        iif \"wan\" drop
    }
}
";

/// The lab's internet is one bridge, so two routers are neighbours; on the
/// real internet at least one ISP router lies between two sites, where a
/// packet that arrives with TTL 1 dies. This drops such packets on the WAN
/// leg before conntrack sees them (raw priority), so that a low-TTL opening
/// packet (seed 002) passes its own NAT and dies before the peer's router, as
/// it would out there, instead of leaving a conntrack entry on a router
/// without WAN firewall.
const ISP_HOP: &str = "table ip pmhop {
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        iif \"wan\" ip ttl < 2 drop
    }
}
";

/// An empty firewall table for [`Router::nft`] rules on harsh routers.
const NO_FIREWALL: &str = "table ip pmfw {
    chain input { type filter hook input priority filter; policy accept; }
    chain forward { type filter hook forward priority filter; policy accept; }
}
";

impl Lab {
    /// Checks for root, `ip` and `nft`.
    pub fn check_environment() -> Result<()> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            bail!("the NAT lab needs root (network namespaces, nftables); euid is {euid}");
        }
        if !tool_works("ip", "-V") {
            bail!("`ip` (iproute2) is not installed; scripts/setup installs it");
        }
        if !tool_works("nft", "-v") {
            bail!("`nft` (nftables) is not installed; scripts/setup installs it");
        }
        Ok(())
    }

    /// A new lab with [`DEFAULT_PREFIX`].
    pub fn new() -> Result<Self> {
        Self::with_prefix(DEFAULT_PREFIX)
    }

    /// A new lab whose namespaces are named `{prefix}-{pid}-{n}-…`;
    /// `prefix` is lowercase letters and digits. Removes stale namespaces of
    /// the same prefix first.
    pub fn with_prefix(prefix: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        if !valid_label(prefix) {
            bail!("lab prefix {prefix:?}: use 1-24 lowercase letters and digits");
        }
        Self::check_environment()?;
        if let Err(e) = Self::cleanup_stale(prefix) {
            eprintln!("netlab: removing stale namespaces failed: {e:#}");
        }
        let id = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let name = format!("{id}-pub");
        ip(&["netns", "add", &name]).context("creating a network namespace (`ip netns add`)")?;
        let public = match Ns::open(&name) {
            Ok(ns) => ns,
            Err(e) => {
                let _ = ip(&["netns", "del", &name]);
                return Err(e);
            }
        };
        let lab = Self {
            id,
            public: public.clone(),
            state: Mutex::new(State {
                namespaces: vec![public.clone()],
                wires: Vec::new(),
                next_public: 2,
                next_site: 1,
                next_port: 0,
                next_lan_host: vec![0; 256],
                cuts: HashSet::new(),
            }),
        };
        lab.init_ns(&public)?;
        ip(&["-n", &name, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{PUBLIC_BRIDGE_IP}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &name, "link", "set", "br0", "up"])?;
        public.nft(
            "table bridge pmlab {
                chain forward { type filter hook forward priority 0; policy accept; }
            }",
        )?;
        Ok(lab)
    }

    /// The lab's name prefix `{prefix}-{pid}-{n}` of all its namespaces.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public namespace (the bridge, 198.18.0.1).
    pub fn public(&self) -> &Ns {
        &self.public
    }

    /// Names of every namespace of this lab.
    pub fn namespaces(&self) -> Vec<String> {
        self.state()
            .namespaces
            .iter()
            .map(|n| n.name().to_string())
            .collect()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn init_ns(&self, ns: &Ns) -> Result<()> {
        ip(&["-n", ns.name(), "link", "set", "lo", "up"])?;
        // Best effort: a kernel without IPv6 has no such keys.
        let _ = ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        let _ = ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        Ok(())
    }

    /// A new namespace `{id}-{role}`; `role` is a checked user name,
    /// possibly with a `-x` suffix.
    fn add_ns(&self, role: &str) -> Result<Ns> {
        let name = format!("{}-{role}", self.id);
        ip(&["netns", "add", &name])?;
        let ns = match Ns::open(&name) {
            Ok(ns) => ns,
            Err(e) => {
                let _ = ip(&["netns", "del", &name]);
                return Err(e);
            }
        };
        self.state().namespaces.push(ns.clone());
        self.init_ns(&ns)?;
        Ok(ns)
    }

    fn alloc_public_ip(&self) -> Result<Ipv4Addr> {
        let mut st = self.state();
        if st.next_public == 255 {
            bail!("the lab's public /24 is full");
        }
        let [a, b, c] = PUBLIC_NET;
        let addr = Ipv4Addr::new(a, b, c, st.next_public);
        st.next_public += 1;
        Ok(addr)
    }

    /// A link between `inner` (interface `inner_if`) and `outer`
    /// (interface `outer_if`, made a port of `outer`'s bridge `bridge` and
    /// brought up): a veth pair, or with `shaping` two TAP devices joined
    /// by a [`Wire`]. `inner_if` is left down and without address.
    fn plug(
        &self,
        inner: &Ns,
        inner_if: &str,
        outer: &Ns,
        outer_if: &str,
        bridge: &str,
        shaping: Option<Shaping>,
    ) -> Result<Leg> {
        let role = outer
            .name()
            .strip_prefix(&format!("{}-", self.id))
            .unwrap_or(outer.name());
        let leg = Leg(format!("{role}/{outer_if}"));
        match shaping {
            None => ip(&[
                "-n",
                outer.name(),
                "link",
                "add",
                outer_if,
                "type",
                "veth",
                "peer",
                "name",
                inner_if,
                "netns",
                inner.name(),
            ])?,
            Some(shaping) => {
                let tap_in = inner
                    .run(|| wire::open_tap(inner_if))?
                    .with_context(|| format!("a TAP device {inner_if} in {}", inner.name()))?;
                let tap_out = outer
                    .run(|| wire::open_tap(outer_if))?
                    .with_context(|| format!("a TAP device {outer_if} in {}", outer.name()))?;
                // Room for bursts while the wire's thread is busy.
                for (ns, ifname) in [(inner, inner_if), (outer, outer_if)] {
                    ip(&["-n", ns.name(), "link", "set", ifname, "txqueuelen", "4096"])?;
                }
                let w = Wire::start(leg.name(), tap_in, tap_out, shaping)
                    .with_context(|| format!("starting the wire {}", leg.name()))?;
                self.state().wires.push(w);
            }
        }
        ip(&[
            "-n",
            outer.name(),
            "link",
            "set",
            outer_if,
            "master",
            bridge,
            "up",
        ])?;
        Ok(leg)
    }

    /// Plugs `ifname` of `ns` into the public bridge (shaped with
    /// `shaping`); returns the bridge port's name and the link. The port
    /// gets a cut set ([`Lab::cut`]).
    fn attach(
        &self,
        ns: &Ns,
        ifname: &str,
        addrs: &[Ipv4Addr],
        shaping: Option<Shaping>,
    ) -> Result<(String, Leg)> {
        let port = {
            let mut st = self.state();
            st.next_port += 1;
            format!("p{}", st.next_port)
        };
        let leg = self.plug(ns, ifname, &self.public, &port, "br0", shaping)?;
        for a in addrs {
            ip(&[
                "-n",
                ns.name(),
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                ifname,
            ])?;
        }
        ip(&["-n", ns.name(), "link", "set", ifname, "up"])?;
        self.public.nft(&format!(
            "add set bridge pmlab cut_{port} {{ type ipv4_addr; }}\n\
             add rule bridge pmlab forward iifname \"{port}\" ip daddr @cut_{port} meta l4proto udp drop\n\
             add rule bridge pmlab forward oifname \"{port}\" ip saddr @cut_{port} meta l4proto udp drop\n"
        ))?;
        Ok((port, leg))
    }

    fn public_host_n(&self, name: &str, n: usize, shaping: Option<Shaping>) -> Result<PublicHost> {
        check_name(name)?;
        let ns = self.add_ns(name)?;
        let ips = (0..n)
            .map(|_| self.alloc_public_ip())
            .collect::<Result<Vec<_>>>()?;
        let (port, leg) = self.attach(&ns, "eth0", &ips, shaping)?;
        Ok(PublicHost { ns, ips, port, leg })
    }

    /// A server namespace on the public bridge with one address.
    pub fn public_host(&self, name: &str) -> Result<PublicHost> {
        self.public_host_n(name, 1, None)
    }

    /// A server namespace on the public bridge with two addresses (NAT
    /// behaviour discovery needs two).
    pub fn public_host_with_two_addrs(&self, name: &str) -> Result<PublicHost> {
        self.public_host_n(name, 2, None)
    }

    /// A server namespace with `addrs` addresses (1 or 2) whose link to the
    /// public bridge is shaped with `shaping`.
    pub fn public_host_shaped(
        &self,
        name: &str,
        addrs: usize,
        shaping: Shaping,
    ) -> Result<PublicHost> {
        if !(1..=2).contains(&addrs) {
            bail!("a public host has 1 or 2 addresses, not {addrs}");
        }
        self.public_host_n(name, addrs, Some(shaping))
    }

    fn alloc_site_index(&self) -> Result<u8> {
        let mut st = self.state();
        if st.next_site == 251 {
            bail!("too many sites");
        }
        st.next_site += 1;
        Ok(st.next_site - 1)
    }

    /// A site named `name` (lowercase letters and digits): a host behind a
    /// router of `kind`; see the module documentation.
    pub fn site(&self, name: &str, kind: NatKind, opts: SiteOpts) -> Result<Site> {
        check_name(name)?;
        let index = self.alloc_site_index()?;
        if kind == NatKind::None {
            let ns = self.add_ns(name)?;
            let addr = self.alloc_public_ip()?;
            let (port, leg) = self.attach(&ns, "eth0", &[addr], opts.shaping())?;
            return Ok(Site {
                name: name.to_string(),
                kind,
                host: Host { ns, ip: addr },
                router: None,
                cgnat: None,
                index,
                port,
                leg,
            });
        }
        let rns = self.add_ns(&format!("{name}-r"))?;
        let wan_ip = self.alloc_public_ip()?;
        let (port, leg) = self.attach(&rns, "wan", &[wan_ip], opts.shaping())?;
        let router = self.router(rns, kind, &opts, wan_ip, Ipv4Addr::new(10, index, 0, 1), 24)?;
        self.state().next_lan_host[usize::from(index)] = 2;
        let host = self.lan_host(&router, index, name)?;
        Ok(Site {
            name: name.to_string(),
            kind,
            host,
            router: Some(router),
            cgnat: None,
            index,
            port,
            leg,
        })
    }

    /// Makes `rns` (with its `wan` up and addressed) a NAT router of
    /// `kind`: a `lan` bridge with `lan_ip/prefix`, forwarding, the NAT,
    /// the ISP hop and the firewall of `opts`, its UDP timeouts.
    fn router(
        &self,
        rns: Ns,
        kind: NatKind,
        opts: &SiteOpts,
        wan_ip: Ipv4Addr,
        lan_ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<Router> {
        let r = rns.name();
        ip(&["-n", r, "link", "add", "lan", "type", "bridge"])?;
        ip(&[
            "-n",
            r,
            "addr",
            "add",
            &format!("{lan_ip}/{prefix}"),
            "dev",
            "lan",
        ])?;
        ip(&["-n", r, "link", "set", "lan", "up"])?;
        rns.sysctl("net.ipv4.ip_forward", "1")?;
        if let Some(t) = opts.udp_timeout {
            let secs = timeout_secs(t).to_string();
            rns.sysctl("net.netfilter.nf_conntrack_udp_timeout", &secs)?;
            rns.sysctl("net.netfilter.nf_conntrack_udp_timeout_stream", &secs)?;
        }
        rns.nft(&nat_rules(kind, opts, wan_ip)?)?;
        rns.nft(ISP_HOP)?;
        rns.nft(if opts.wan_firewall {
            WAN_FIREWALL
        } else {
            NO_FIREWALL
        })?;
        Ok(Router {
            ns: rns,
            wan_ip,
            lan_ip,
            kind,
            opts: opts.clone(),
        })
    }

    /// A carrier-grade NAT named `name` (namespace `{name}-cg`): a router
    /// of `kind` (RFC 6888 asks for endpoint-independent mapping, i.e.
    /// [`NatKind::PortRestricted`] or [`NatKind::FullCone`]) with its own
    /// public address, in front of the shared segment 100.64.0.0/10 where
    /// [`Lab::site_behind`] puts sites. `opts` as for a site's router (its
    /// shaping applies to the CGNAT's public leg).
    pub fn cgnat(&self, name: &str, kind: NatKind, opts: SiteOpts) -> Result<Cgnat> {
        check_name(name)?;
        if kind == NatKind::None {
            bail!("a CGNAT translates: NatKind::None is no CGNAT");
        }
        let rns = self.add_ns(&format!("{name}-cg"))?;
        let wan_ip = self.alloc_public_ip()?;
        let (port, leg) = self.attach(&rns, "wan", &[wan_ip], opts.shaping())?;
        let router = self.router(rns, kind, &opts, wan_ip, CGNAT_GATEWAY, 10)?;
        Ok(Cgnat {
            name: name.to_string(),
            router,
            port,
            leg,
            next_home: Arc::new(AtomicU32::new(2)),
        })
    }

    /// A site named `name` behind `cgnat`: its router of `kind` has its
    /// `wan` in the CGNAT's 100.64.0.0/10 segment (100.64.0.N, default
    /// route via 100.64.0.1), so its host is behind two NATs. With
    /// [`NatKind::None`] the host itself sits in that segment. `opts`'s
    /// shaping applies to the site's own leg into the segment; [`Lab::cut`]
    /// acts on the CGNAT's public port (so on every site behind it).
    pub fn site_behind(
        &self,
        cgnat: &Cgnat,
        name: &str,
        kind: NatKind,
        opts: SiteOpts,
    ) -> Result<Site> {
        check_name(name)?;
        let index = self.alloc_site_index()?;
        let n = cgnat.next_home.fetch_add(1, Ordering::Relaxed);
        if n > 254 {
            bail!("the CGNAT segment of {} is full", cgnat.name);
        }
        let [a, b, c, _] = CGNAT_GATEWAY.octets();
        let addr = Ipv4Addr::new(a, b, c, n as u8);
        let (ns, ifname) = if kind == NatKind::None {
            (self.add_ns(name)?, "eth0")
        } else {
            (self.add_ns(&format!("{name}-r"))?, "wan")
        };
        let leg = self.plug(
            &ns,
            ifname,
            cgnat.router.ns(),
            &format!("h{n}"),
            "lan",
            opts.shaping(),
        )?;
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{addr}/10"),
            "dev",
            ifname,
        ])?;
        ip(&["-n", ns.name(), "link", "set", ifname, "up"])?;
        ip(&[
            "-n",
            ns.name(),
            "route",
            "add",
            "default",
            "via",
            &CGNAT_GATEWAY.to_string(),
        ])?;
        let mut site = Site {
            name: name.to_string(),
            kind,
            host: Host {
                ns: ns.clone(),
                ip: addr,
            },
            router: None,
            cgnat: Some(cgnat.router.clone()),
            index,
            port: cgnat.port.clone(),
            leg,
        };
        if kind != NatKind::None {
            let router = self.router(ns, kind, &opts, addr, Ipv4Addr::new(10, index, 0, 1), 24)?;
            self.state().next_lan_host[usize::from(index)] = 2;
            site.host = self.lan_host(&router, index, name)?;
            site.router = Some(router);
        }
        Ok(site)
    }

    fn lan_host(&self, router: &Router, index: u8, name: &str) -> Result<Host> {
        let n = {
            let mut st = self.state();
            let n = st.next_lan_host[usize::from(index)];
            if n == 255 {
                bail!("site LAN is full");
            }
            st.next_lan_host[usize::from(index)] = n + 1;
            n
        };
        let ns = self.add_ns(name)?;
        let addr = Ipv4Addr::new(10, index, 0, n);
        let r = router.name();
        let leg = format!("h{n}");
        ip(&[
            "-n",
            r,
            "link",
            "add",
            &leg,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        ip(&["-n", r, "link", "set", &leg, "master", "lan", "up"])?;
        let h = ns.name();
        ip(&["-n", h, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&["-n", h, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            h,
            "route",
            "add",
            "default",
            "via",
            &router.lan_ip.to_string(),
        ])?;
        Ok(Host { ns, ip: addr })
    }

    /// Another host behind `site`'s router (10.X.0.3, …).
    pub fn add_host(&self, site: &Site, name: &str) -> Result<Host> {
        check_name(name)?;
        let router = site
            .router
            .as_ref()
            .with_context(|| format!("site {} has no router (NatKind::None)", site.name))?;
        self.lan_host(router, site.index, name)
    }

    /// Changes the shaping of a shaped link while it runs (frames already
    /// on the wire keep their delivery time). Fails for a link made without
    /// shaping (a veth pair).
    pub fn set_shaping(&self, leg: &Leg, shaping: Shaping) -> Result<()> {
        let st = self.state();
        let w = st
            .wires
            .iter()
            .find(|w| w.name() == leg.name())
            .with_context(|| format!("link {} was made without shaping", leg.name()))?;
        w.set_shaping(shaping)
            .with_context(|| format!("shaping link {}", leg.name()))
    }

    /// What the wire of a shaped link did so far; None for a link made
    /// without shaping.
    pub fn wire_stats(&self, leg: &Leg) -> Option<WireStats> {
        let st = self.state();
        let w = st.wires.iter().find(|w| w.name() == leg.name())?;
        Some(w.stats())
    }

    /// Gives `site` a new public address while it runs, as a new lease from
    /// the ISP would: the router's `wan` address (for [`NatKind::None`] the
    /// host's own) is replaced by a fresh one of the public network and the
    /// router starts over with a new NAT table (for the full cone: no
    /// mappings) and no conntrack entries, so every flow gets a new
    /// mapping on the new address. Updates `site` and returns the new
    /// address. Not for sites behind a CGNAT.
    pub fn change_public_ip(&self, site: &mut Site) -> Result<Ipv4Addr> {
        if site.cgnat.is_some() {
            bail!(
                "site {} is behind a CGNAT: its public address is the CGNAT's",
                site.name
            );
        }
        let new = self.alloc_public_ip()?;
        match &mut site.router {
            None => {
                let h = site.host.ns.name().to_string();
                let old = site.host.ip;
                ip(&["-n", &h, "addr", "del", &format!("{old}/24"), "dev", "eth0"])?;
                ip(&["-n", &h, "addr", "add", &format!("{new}/24"), "dev", "eth0"])?;
                site.host.ip = new;
            }
            Some(router) => {
                let r = router.ns.name().to_string();
                let old = router.wan_ip;
                ip(&["-n", &r, "addr", "del", &format!("{old}/24"), "dev", "wan"])?;
                ip(&["-n", &r, "addr", "add", &format!("{new}/24"), "dev", "wan"])?;
                router.ns.nft(&format!(
                    "delete table ip pmnat\n{}",
                    nat_rules(router.kind, &router.opts, new)?
                ))?;
                conntrack_flush(&router.ns)?;
                router.wan_ip = new;
            }
        }
        Ok(new)
    }

    /// Drops `site`'s UDP to and from `peer` (in both directions, on the
    /// public bridge, silently) until [`Lab::restore`].
    pub fn cut(&self, site: &Site, peer: Ipv4Addr) -> Result<()> {
        self.cut_port(&site.port, peer)
    }

    /// Undoes [`Lab::cut`]; a no-op when not cut.
    pub fn restore(&self, site: &Site, peer: Ipv4Addr) -> Result<()> {
        if !self.state().cuts.contains(&(site.port.clone(), peer)) {
            return Ok(());
        }
        self.public.nft(&format!(
            "delete element bridge pmlab cut_{} {{ {peer} }}\n",
            site.port
        ))?;
        self.state().cuts.remove(&(site.port.clone(), peer));
        Ok(())
    }

    /// Like [`Lab::cut`], for a public host.
    pub fn cut_public_host(&self, host: &PublicHost, peer: Ipv4Addr) -> Result<()> {
        self.cut_port(&host.port, peer)
    }

    fn cut_port(&self, port: &str, peer: Ipv4Addr) -> Result<()> {
        if self.state().cuts.contains(&(port.to_string(), peer)) {
            return Ok(());
        }
        self.public.nft(&format!(
            "add element bridge pmlab cut_{port} {{ {peer} }}\n"
        ))?;
        self.state().cuts.insert((port.to_string(), peer));
        Ok(())
    }

    /// The shaped links (shaping and counters), then the addresses, routes
    /// and nftables rules of every namespace, for a failing test's output.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for w in &self.state().wires {
            out.push_str(&format!(
                "===== wire {}: {:?}, {:?} =====\n",
                w.name(),
                w.shaping(),
                w.stats()
            ));
        }
        for ns in self.state().namespaces.clone() {
            out.push_str(&format!("===== {} =====\n", ns.name()));
            for args in [
                &["ip", "-br", "addr"][..],
                &["ip", "route"],
                &["nft", "list", "ruleset"],
            ] {
                match ns.exec(args) {
                    Ok(s) => out.push_str(&s),
                    Err(e) => out.push_str(&format!("{e:#}\n")),
                }
            }
        }
        out
    }

    /// Removes namespaces named `{prefix}-{pid}-…` whose process `pid` is
    /// gone and that were made before this process started, i.e. leftovers
    /// of crashed runs. Returns the names removed.
    pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
        Self::cleanup_stale_older_than(prefix, process_start_time()?)
    }

    /// [`Lab::cleanup_stale`] with an explicit age limit: removes
    /// namespaces of `prefix` made before `cutoff` whose process is gone.
    /// Namespaces of this process and of live processes are never touched.
    pub fn cleanup_stale_older_than(prefix: &str, cutoff: SystemTime) -> Result<Vec<String>> {
        if !valid_label(prefix) {
            bail!("lab prefix {prefix:?}: use 1-24 lowercase letters and digits");
        }
        let dir = match std::fs::read_dir(NETNS_DIR) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context(NETNS_DIR),
        };
        let me = std::process::id() as i32;
        let mut removed = Vec::new();
        for entry in dir {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
                continue;
            };
            let mut parts = rest.split('-');
            let (Some(pid), Some(n), Some(_role)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(pid), true) = (pid.parse::<i32>(), n.parse::<u32>().is_ok()) else {
                continue;
            };
            if pid == me || pid <= 0 || pid_alive(pid) {
                continue;
            }
            // The namespace file's times are those of its creation.
            let made = std::fs::metadata(entry.path())
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            if made >= cutoff {
                continue;
            }
            // Processes a crashed run left inside keep running in the
            // nameless namespace; they are not this process's to end.
            let left = Ns::open(&name).map(|ns| ns.pids()).unwrap_or_default();
            if !left.is_empty() {
                eprintln!("netlab: stale namespace {name} still has processes {left:?}");
            }
            ip(&["netns", "del", &name])?;
            removed.push(name);
        }
        Ok(removed)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let namespaces = std::mem::take(&mut self.state().namespaces);
        let me = std::process::id() as i32;
        // Processes keep a namespace (and its links) alive after its name
        // is gone: end everything the tests started inside first.
        for ns in &namespaces {
            for pid in ns.pids() {
                if pid > 0 && pid != me {
                    // SAFETY: kill(2) on a pid inside this lab's namespace.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        // The wires hold their TAP devices (and so the namespaces) open:
        // stop them before the namespaces go.
        let wires = std::mem::take(&mut self.state().wires);
        drop(wires);
        for ns in namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns.name()]) {
                eprintln!("netlab: {e:#}");
            }
        }
    }
}

/// A new [`Lab`] for a test; when the lab cannot be made (not root, no
/// `ip netns`, no nft): panics when `CI=true`, otherwise prints why and
/// returns None so the test can return early.
pub fn lab_or_skip(test: &str) -> Option<Lab> {
    match Lab::new() {
        Ok(lab) => Some(lab),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: the NAT lab is unavailable (CI=true, so this fails): {e:#}")
        }
        Err(e) => {
            eprintln!("skipping {test}: the NAT lab is unavailable: {e:#}");
            None
        }
    }
}
