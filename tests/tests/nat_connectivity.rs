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
//! - Hole punching from probe sockets, 10 trials each in a fresh lab, at
//!   least 9 of which must go direct on both sides within 15 s of the first
//!   message and then carry a numbered stream exactly once and in order:
//!   port-restricted × port-restricted with routers without a WAN firewall,
//!   and random symmetric × port-restricted (a birthday search; at least one
//!   side must report a probe-mode attempt). Each trial prints its time to
//!   `direct` and both sides' `punch` statistics.
//!
//! Times from process start to the first delivered message and to `direct`
//! are printed (run with `--nocapture` to see them when the tests pass).
//!
//! Needs root, `ip` and `nft`: skipped with a printed reason otherwise,
//! failed when CI=true.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use peermesh_base::event::EventKind;
use peermesh_base::status::PunchStats;
use peermesh_base::PathKind;
use peermesh_tests::meshlab::{poll, Inbox, MeshLab, MeshNode, RELAY_PORT};
use peermesh_tests::netlab::{lab_or_skip, Lab, NatKind, Site, SiteOpts};
use peermesh_tests::wait_for;

/// Each test builds its own lab and runs five processes in it; one lab at a
/// time keeps the timings meaningful on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Process start-up, joining, listing peers, a stream to arrive.
const SLOW: Duration = Duration::from_secs(30);
/// Bound for the upgrade to a direct path once the nodes run.
const TO_DIRECT: Duration = Duration::from_secs(20);
/// Bound for the fall-back to the relay once the direct path is cut: the
/// node closes a QUIC connection after 3 s without a packet (libp2p's
/// default of 10 s, which this bound rejects, held the stream still for 10 s).
const TO_RELAY: Duration = Duration::from_secs(8);
/// How often a node's peer list is polled while waiting for a peer.
const PEER_POLL: Duration = Duration::from_millis(25);

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// The data of every message `inbox` received, in arrival order.
fn received(inbox: &Inbox) -> Vec<String> {
    inbox.arrivals().into_iter().map(|a| a.msg.data).collect()
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
    inbox: Inbox,
}

fn start_pair(m: &mut MeshLab, ka: NatKind, kb: NatKind) -> Result<Pair> {
    start_pair_with(m, ka, kb, &[])
}

/// [`start_pair`] with extra `meshnode up` arguments for both nodes.
fn start_pair_with(m: &mut MeshLab, ka: NatKind, kb: NatKind, extra: &[&str]) -> Result<Pair> {
    start_pair_opts(
        m,
        (ka, SiteOpts::default()),
        (kb, SiteOpts::default()),
        extra,
    )
}

/// [`start_pair_with`] with the router options of each site.
fn start_pair_opts(
    m: &mut MeshLab,
    (ka, oa): (NatKind, SiteOpts),
    (kb, ob): (NatKind, SiteOpts),
    extra: &[&str],
) -> Result<Pair> {
    m.start_public()?;
    let sa = m.lab.site("sa", ka, oa)?;
    let sb = m.lab.site("sb", kb, ob)?;
    let (ta, tb) = (m.token()?, m.token()?);
    let t0 = Instant::now();
    let a = m.node_with("a", &sa.host, &ta, extra)?;
    let b = m.node_with("b", &sb.host, &tb, extra)?;
    b.wait_up(SLOW)?;
    let inbox = m.recv(&b)?;
    // The first message goes out as soon as `a` knows `b`: it takes the
    // first path that comes up (the relay, or the punched one when it is
    // quicker), with no wait for the other.
    wait_for(SLOW, "a to take a message for b", || {
        a.send_numbered("b", "first", 1).ok()
    })?;
    let known = t0.elapsed();
    wait_for(SLOW, "the first message to arrive", || {
        inbox.find("first-0").map(drop)
    })?;
    let first = t0.elapsed();
    a.wait_peer("b", SLOW, PEER_POLL)?;
    b.wait_peer("a", SLOW, PEER_POLL)?;
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

/// Both nodes' first path to the other was the relay, or the punched direct
/// path when it beat the relay (the punch goes out at once beside the relay
/// dial): either way the first message did not wait for a path that was not
/// up yet.
fn check_first_path(p: &Pair) -> Result<()> {
    for n in [&p.a, &p.b] {
        let events = n.events();
        let first = events
            .iter()
            .find_map(|e| match &e.kind {
                EventKind::PathUp { kind, .. } => Some(*kind),
                _ => None,
            })
            .with_context(|| format!("{}: no path came up", n.name))?;
        ensure!(
            matches!(first, PathKind::Relay | PathKind::Direct),
            "{}: the first path was {first:?}",
            n.name
        );
        eprintln!("{}: first path up: {first:?}", n.name);
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
    goes_direct_with(test, ka, kb, &[])
}

fn goes_direct_with(test: &str, ka: NatKind, kb: NatKind, extra: &[&str]) {
    lab_test(test, |m| {
        let p = start_pair_with(m, ka, kb, extra)?;
        check_first_path(&p)?;
        let (da, db) = wait_both(&p, "direct", TO_DIRECT)?;
        eprintln!(
            "{test}: {ka:?} × {kb:?}: a knows b {}, first message delivered {}, \
             direct a→b {}, b→a {} (from process start)",
            ms(p.known),
            ms(p.first),
            ms(da),
            ms(db)
        );
        p.a.send_numbered("b", "after", 2000)?;
        poll(SLOW, Duration::from_millis(100), "the stream", || {
            (p.inbox.count() >= 2001).then_some(())
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

/// Seed 002: with DCUtR off, the only way to a direct path is the control
/// server's rendezvous (callee opens, then the caller dials).
#[test]
fn port_restricted_pair_goes_direct_through_the_control_server_rendezvous() {
    goes_direct_with(
        "rendezvous_pr_pr",
        NatKind::PortRestricted,
        NatKind::PortRestricted,
        &["--punch", "control"],
    );
}

/// Seed 003: a sequential symmetric NAT gives the punch a new public port;
/// discovery measured its stride, a probe just before the punch finds the
/// counter, and the rendezvous hands the peer the predicted ports.
#[test]
fn sequential_symmetric_and_port_restricted_go_direct_through_port_prediction() {
    goes_direct_with(
        "predict_seq_pr",
        NatKind::SymmetricSequential,
        NatKind::PortRestricted,
        &["--punch", "control"],
    );
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

/// Bound for a punched direct path in the repeated-trial tests, from the
/// first message's arrival: room for a quic-mode attempt, the fall-back to
/// probe mode and a birthday search (up to 1536 probes at 1000 pkt/s).
const TO_PUNCH: Duration = Duration::from_secs(15);
/// Trials of a repeated-trial test, one after another, each in a fresh lab.
const TRIALS: usize = 10;
/// How many of them must succeed.
const MIN_SUCCESSES: usize = 9;
/// Numbered messages sent over the punched path in each trial.
const PUNCH_STREAM: usize = 200;

/// One side of a pair: its NAT and its router's options.
type SiteSpec = (NatKind, SiteOpts);

/// What one trial of [`punch_trials`] saw.
#[derive(Default)]
struct PunchTrial {
    /// Why the trial failed; None when it succeeded.
    error: Option<String>,
    /// The first message's delivery, from the nodes' start.
    first: Option<Duration>,
    /// When `a` and `b` were first seen `direct`, from the nodes' start.
    direct: Option<(Duration, Duration)>,
    /// Each side's punch statistics for the other, read after the trial
    /// (None: the node did not answer or did not list the peer).
    punch_a: Option<PunchStats>,
    punch_b: Option<PunchStats>,
    /// `a→b` and `b→a` at the end of the trial.
    paths: (Option<String>, Option<String>),
}

impl PunchTrial {
    fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Whether either side made a probe-mode attempt.
    fn probed(&self) -> bool {
        [&self.punch_a, &self.punch_b]
            .into_iter()
            .flatten()
            .any(|p| p.probe_attempts >= 1)
    }
}

fn fmt_punch(p: &Option<PunchStats>) -> String {
    match p {
        None => "unknown".into(),
        Some(p) => format!(
            "quic {} probe {} attempts, {} probe packets ({} birthday), {} sockets, last {:?}",
            p.quic_attempts,
            p.probe_attempts,
            p.probe_packets,
            p.birthday_probes,
            p.sockets,
            p.last
        ),
    }
}

fn fmt_opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), ms)
}

/// One trial: a pair on sites `a` and `b`; the first message over the
/// relay, then `direct` on both sides within [`TO_PUNCH`], then
/// [`PUNCH_STREAM`] numbered messages; all of them (the first one too)
/// exactly once and in order. Records the punch statistics also when the
/// trial fails after the nodes ran.
fn punch_trial(m: &mut MeshLab, a: SiteSpec, b: SiteSpec, t: &mut PunchTrial) -> Result<()> {
    let p = start_pair_opts(m, a, b, &[])?;
    t.first = Some(p.first);
    let res = punch_trial_body(&p, t);
    t.punch_a = p.a.peer("b").map(|s| s.punch);
    t.punch_b = p.b.peer("a").map(|s| s.punch);
    t.paths = (p.a.path_to("b"), p.b.path_to("a"));
    res
}

fn punch_trial_body(p: &Pair, t: &mut PunchTrial) -> Result<()> {
    check_first_path(p)?;
    t.direct = Some(wait_both(p, "direct", TO_PUNCH)?);
    p.a.send_numbered("b", "after", PUNCH_STREAM)?;
    let arrived = poll(SLOW, Duration::from_millis(100), "the stream", || {
        (p.inbox.count() > PUNCH_STREAM).then_some(())
    });
    // Nothing more trickles in (a duplicate would).
    std::thread::sleep(Duration::from_millis(300));
    let want: Vec<String> = numbered("first", 1)
        .chain(numbered("after", PUNCH_STREAM))
        .collect();
    // Where the stream differs says more than a timeout.
    check_exact(&received(&p.inbox), &want)?;
    arrived?;
    ensure!(
        p.a.path_to("b").as_deref() == Some("direct")
            && p.b.path_to("a").as_deref() == Some("direct"),
        "the punched path did not last the stream: a→b {:?}, b→a {:?}",
        p.a.path_to("b"),
        p.b.path_to("a")
    );
    Ok(())
}

/// Runs [`TRIALS`] trials of [`punch_trial`] one after another, each in a
/// fresh lab that is dropped (its processes killed, its namespaces removed)
/// before the next one starts, also when the trial fails; a failed trial's
/// log tails are printed and its logs kept. Prints every trial; None when
/// the lab is unavailable (the test is skipped).
fn punch_trials(test: &str, a: SiteSpec, b: SiteSpec) -> Option<Vec<PunchTrial>> {
    let _g = serial();
    let mut trials = Vec::new();
    for k in 0..TRIALS {
        let label = format!("{test}-t{k}");
        let mut t = PunchTrial::default();
        // The first lab decides whether the test runs at all; after that a
        // lab that cannot be made is a failed trial.
        let lab = if k == 0 {
            lab_or_skip(test)?
        } else {
            match Lab::new() {
                Ok(lab) => lab,
                Err(e) => {
                    t.error = Some(format!("the lab: {e:#}"));
                    eprintln!("{test} trial {k}: FAILED: the lab: {e:#}");
                    trials.push(t);
                    continue;
                }
            }
        };
        match MeshLab::new(&label, lab) {
            Err(e) => t.error = Some(format!("{e:#}")),
            Ok(mut m) => {
                if let Err(e) = punch_trial(&mut m, a.clone(), b.clone(), &mut t) {
                    t.error = Some(format!("{e:#}"));
                    eprintln!("===== {label}: failed: {e:#}; logs =====");
                    m.dump_logs(40);
                    if let Some(keep) = m.keep_logs() {
                        eprintln!("logs and the lab's rules kept in {}", keep.display());
                    }
                }
                // `m` is dropped here: nothing of this trial outlives it.
            }
        }
        eprintln!(
            "{test} trial {k}: {}; first message {}, direct a→b {}, b→a {} (from process \
             start); paths at the end a→b {:?}, b→a {:?}\n  punch a→b: {}\n  punch b→a: {}",
            t.error
                .as_ref()
                .map_or_else(|| "ok".to_string(), |e| format!("FAILED: {e}")),
            fmt_opt_ms(t.first),
            fmt_opt_ms(t.direct.map(|d| d.0)),
            fmt_opt_ms(t.direct.map(|d| d.1)),
            t.paths.0,
            t.paths.1,
            fmt_punch(&t.punch_a),
            fmt_punch(&t.punch_b),
        );
        trials.push(t);
    }
    Some(trials)
}

/// Prints the trials' summary and fails unless at least
/// [`MIN_SUCCESSES`] of them succeeded.
fn check_successes(test: &str, trials: &[PunchTrial]) {
    let ok = trials.iter().filter(|t| t.ok()).count();
    // Direct on both sides: the later of the two.
    let mut ttd: Vec<Duration> = trials
        .iter()
        .filter(|t| t.ok())
        .filter_map(|t| t.direct.map(|(a, b)| a.max(b)))
        .collect();
    ttd.sort();
    let packets: Vec<u64> = trials
        .iter()
        .filter_map(|t| Some(t.punch_a.as_ref()?.probe_packets + t.punch_b.as_ref()?.probe_packets))
        .collect();
    eprintln!(
        "{test}: {ok}/{} trials went direct and carried the stream; direct on both sides \
         (from process start) min {}, median {}, max {}; probe packets per trial (a + b) {packets:?}",
        trials.len(),
        fmt_opt_ms(ttd.first().copied()),
        fmt_opt_ms(ttd.get(ttd.len() / 2).copied()),
        fmt_opt_ms(ttd.last().copied()),
    );
    let failures: Vec<String> = trials
        .iter()
        .enumerate()
        .filter_map(|(k, t)| Some(format!("trial {k}: {}", t.error.as_ref()?)))
        .collect();
    assert!(
        ok >= MIN_SUCCESSES,
        "{test}: only {ok} of {} trials succeeded (at least {MIN_SUCCESSES} must):\n{}",
        trials.len(),
        failures.join("\n")
    );
}

/// Two port-restricted cones whose routers have no WAN firewall: a punch
/// packet that arrives before the peer's own opening packet reaches the
/// router's stack, its conntrack entry takes the port and the NAT maps the
/// host to another one. Low-TTL opening packets (probe mode) die before
/// the peer's router, so they cannot do that.
#[test]
fn port_restricted_routers_without_wan_firewall_go_direct_in_9_of_10() {
    let test = "pr_pr_nofw";
    let Some(trials) = punch_trials(
        test,
        (NatKind::PortRestricted, SiteOpts::without_wan_firewall()),
        (NatKind::PortRestricted, SiteOpts::without_wan_firewall()),
    ) else {
        return;
    };
    check_successes(test, &trials);
}

/// Two sequential symmetric NATs (seed 003): each side probes the other's
/// next predicted ports in order from one probe socket, so the k-th new
/// mapping on one side meets the k-th on the other.
#[test]
fn sequential_symmetric_pair_goes_direct_by_port_prediction_in_9_of_10() {
    let test = "seq_seq";
    let Some(trials) = punch_trials(
        test,
        (NatKind::SymmetricSequential, SiteOpts::default()),
        (NatKind::SymmetricSequential, SiteOpts::default()),
    ) else {
        return;
    };
    check_successes(test, &trials);
}

/// A random symmetric NAT facing a port-restricted cone: the punch from
/// the mesh's own QUIC socket cannot cross it, the birthday search of probe
/// mode (256 sockets on the random side, up to 1536 probed ports on the
/// other) can.
#[test]
fn random_symmetric_and_port_restricted_go_direct_by_birthday_in_9_of_10() {
    let test = "rand_pr";
    let Some(trials) = punch_trials(
        test,
        (NatKind::SymmetricRandom, SiteOpts::default()),
        (NatKind::PortRestricted, SiteOpts::default()),
    ) else {
        return;
    };
    check_successes(test, &trials);
    let unprobed: Vec<String> = trials
        .iter()
        .enumerate()
        .filter(|(_, t)| t.ok() && !t.probed())
        .map(|(k, t)| {
            format!(
                "trial {k}: a→b {}; b→a {}",
                fmt_punch(&t.punch_a),
                fmt_punch(&t.punch_b)
            )
        })
        .collect();
    assert!(
        unprobed.is_empty(),
        "{test}: direct without a probe-mode attempt on either side (quic mode cannot cross \
         a random symmetric NAT):\n{}",
        unprobed.join("\n")
    );
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
        check_first_path(&p)?;
        let monitor = PathMonitor::start(&p);
        let since = Instant::now();
        let mut want: Vec<String> = numbered("first", 1).collect();
        for k in 0..5 {
            let prefix = format!("s{k}");
            p.a.send_numbered("b", &prefix, 2000)?;
            want.extend(numbered(&prefix, 2000));
        }
        poll(SLOW, Duration::from_millis(100), "the stream", || {
            (p.inbox.count() >= want.len()).then_some(())
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
                a.send_numbered("b", &format!("s{k}"), BATCH)
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
    let mut count = p.inbox.count();
    let mut changed = Instant::now();
    let mut stall = Duration::ZERO;
    let res = wait_for(timeout, "`relay` on both sides after the cut", || {
        let now = p.inbox.count();
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
        poll(
            SLOW,
            Duration::from_millis(20),
            "the stream to flow",
            || (p.inbox.count() > 2 * BATCH).then_some(()),
        )?;
        ensure!(
            p.a.path_to("b").as_deref() == Some("direct"),
            "a→b left the direct path before the cut: {:?}",
            p.a.path_to("b")
        );
        // …when the sites stop reaching each other; the relay stays.
        let before = p.inbox.count();
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
        let more = poll(
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
        let delivered = poll(SLOW, Duration::from_millis(100), "the whole stream", || {
            (p.inbox.count() >= want.len()).then_some(())
        });
        for n in [&p.a, &p.b] {
            for e in n.events() {
                if matches!(
                    e.kind,
                    EventKind::PathUp { .. }
                        | EventKind::PathDown { .. }
                        | EventKind::PathChanged { .. }
                ) {
                    eprintln!("{test}: {}: {e:?}", n.name);
                }
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

/// Seed 001: the home relay of two nodes that only have relay paths dies;
/// both move to the next relay of the directory and the stream between them
/// goes on through it, exactly once and in order.
#[test]
fn the_home_relay_dies_and_the_stream_moves_to_another_relay() {
    let test = "relay_failover";
    lab_test(test, |m| {
        let p = start_pair(m, NatKind::SymmetricRandom, NatKind::SymmetricRandom)?;
        wait_both(&p, "relay", SLOW)?;
        // A second relay joins the directory after both chose the first as
        // home (the home is kept while it lives).
        m.start_relay("relay2", RELAY_PORT + 1)?;
        for n in [&p.a, &p.b] {
            poll(SLOW, Duration::from_millis(20), "both relays known", || {
                n.events()
                    .iter()
                    .any(|e| matches!(e.kind, EventKind::RelayDirectory { relays: 2 }))
                    .then_some(())
            })?;
        }
        // Time to connect to it and measure its RTT.
        std::thread::sleep(Duration::from_secs(2));
        let sender = Sender::start(&p.a);
        poll(
            SLOW,
            Duration::from_millis(20),
            "the stream to flow",
            || (p.inbox.count() > 2 * BATCH).then_some(()),
        )?;
        let killed_at = SystemTime::now();
        ensure!(m.kill("relay"), "no relay process to kill");
        // Both move their home to relay2 and the stream flows again.
        let mut moved = Vec::new();
        for n in [&p.a, &p.b] {
            // The second home relay with a reservation: the first one after
            // the kill.
            let at = poll(SLOW, Duration::from_millis(20), "a new home relay", || {
                n.events()
                    .iter()
                    .filter(|e| matches!(e.kind, EventKind::HomeRelay { relay: Some(_) }))
                    .nth(1)
                    .map(|e| e.at())
            })?;
            moved.push(at.duration_since(killed_at).unwrap_or_default());
        }
        let at_kill = p.inbox.count();
        poll(
            SLOW,
            Duration::from_millis(20),
            "the stream after the failover",
            || (p.inbox.count() > at_kill + 2 * BATCH).then_some(()),
        )
        .with_context(|| format!("stuck at {} messages", p.inbox.count()))?;
        let sent = sender.finish()?;
        let mut want: Vec<String> = numbered("first", 1).collect();
        for k in 0..sent {
            want.extend(numbered(&format!("s{k}"), BATCH));
        }
        poll(SLOW, Duration::from_millis(100), "the whole stream", || {
            (p.inbox.count() >= want.len()).then_some(())
        })?;
        std::thread::sleep(Duration::from_millis(500));
        check_exact(&received(&p.inbox), &want)?;
        eprintln!(
            "{test}: relay killed; new home relay after {} (a) and {} (b); {} messages \
             in {sent} batches arrived exactly once and in order",
            ms(moved[0]),
            ms(moved[1]),
            want.len()
        );
        for (side, path) in [("a→b", p.a.path_to("b")), ("b→a", p.b.path_to("a"))] {
            ensure!(path.as_deref() == Some("relay"), "{side} is {path:?}");
        }
        Ok(())
    });
}

/// Seed 004: two members behind random symmetric NATs have no direct path;
/// a third member on an open address reaches both directly, so their link
/// goes through it (`forwarded via c`), end-to-end encrypted, exactly once
/// and in order, instead of through the relay server.
#[test]
fn random_symmetric_pair_goes_forwarded_through_an_open_member() {
    let test = "forwarded";
    lab_test(test, |m| {
        m.start_public()?;
        let sa = m
            .lab
            .site("sa", NatKind::SymmetricRandom, SiteOpts::default())?;
        let sb = m
            .lab
            .site("sb", NatKind::SymmetricRandom, SiteOpts::default())?;
        let sc = m.lab.site("sc", NatKind::None, SiteOpts::default())?;
        let (ta, tb, tc) = (m.token()?, m.token()?, m.token()?);
        let c = m.node("c", &sc.host, &tc)?;
        c.wait_up(SLOW)?;
        let a = m.node("a", &sa.host, &ta)?;
        let b = m.node("b", &sb.host, &tb)?;
        b.wait_up(SLOW)?;
        let inbox = m.recv(&b)?;
        for (n, peer) in [(&a, "c"), (&b, "c")] {
            poll(
                TO_DIRECT,
                PEER_POLL,
                "a direct path to the open member",
                || (n.path_to(peer).as_deref() == Some("direct")).then_some(()),
            )
            .with_context(|| format!("{} → c is {:?}", n.name, n.path_to(peer)))?;
        }
        poll(SLOW, PEER_POLL, "a↔b forwarded", || {
            (a.path_to("b").as_deref() == Some("forwarded")
                && b.path_to("a").as_deref() == Some("forwarded"))
            .then_some(())
        })
        .with_context(|| format!("a→b {:?}, b→a {:?}", a.path_to("b"), b.path_to("a")))?;
        for (n, peer) in [(&a, "b"), (&b, "a")] {
            let via = n.peer(peer).and_then(|p| p.via);
            ensure!(
                via.as_deref() == Some("c"),
                "{} → {peer} goes via {via:?}",
                n.name
            );
        }
        a.send_numbered("b", "fw", 3000)?;
        poll(SLOW, Duration::from_millis(100), "the stream", || {
            (inbox.count() >= 3000).then_some(())
        })?;
        std::thread::sleep(Duration::from_millis(300));
        let want: Vec<String> = numbered("fw", 3000).collect();
        check_exact(&received(&inbox), &want)?;
        ensure!(
            a.path_to("b").as_deref() == Some("forwarded"),
            "a→b left the forwarded path: {:?}",
            a.path_to("b")
        );
        eprintln!("{test}: a↔b forwarded via c; 3000 messages exactly once and in order");
        Ok(())
    });
}

/// Seed 003: every node measures its NAT against the control server's two
/// addresses and ports; status and the control server show what it found,
/// for each kind of router in the lab.
#[test]
fn each_node_discovers_its_nat_behaviour() {
    let test = "nat_discovery";
    lab_test(test, |m| {
        m.start_public()?;
        let kinds = [
            ("none", NatKind::None, "no NAT", None, None),
            (
                "fc",
                NatKind::FullCone,
                "full cone",
                Some("endpoint_independent"),
                Some("endpoint_independent"),
            ),
            (
                "pr",
                NatKind::PortRestricted,
                "port-restricted cone",
                Some("endpoint_independent"),
                Some("address_and_port_dependent"),
            ),
            (
                "sr",
                NatKind::SymmetricRandom,
                "symmetric (random)",
                Some("random"),
                Some("address_and_port_dependent"),
            ),
            (
                "ss",
                NatKind::SymmetricSequential,
                "symmetric (sequential",
                Some("sequential"),
                Some("address_and_port_dependent"),
            ),
        ];
        let mut nodes = Vec::new();
        for (name, kind, ..) in &kinds {
            let site = m
                .lab
                .site(&format!("s{name}"), *kind, SiteOpts::default())?;
            let token = m.token()?;
            nodes.push((m.node(name, &site.host, &token)?, site));
        }
        for ((node, _), (name, kind, words, mapping, filtering)) in nodes.iter().zip(&kinds) {
            let nat = poll(SLOW, Duration::from_millis(50), "a NAT verdict", || {
                node.status().and_then(|s| s.nat)
            })?;
            eprintln!("{test}: {name} ({kind:?}): {} {nat:?}", nat.describe());
            ensure!(nat.udp, "{name}: UDP works in the lab");
            ensure!(
                nat.describe().starts_with(words),
                "{name}: expected {words:?}, got {:?} ({nat:?})",
                nat.describe()
            );
            if let (Some(mapping), Some(filtering)) = (mapping, filtering) {
                let report = peermesh_proto::api::NatReport::from(&nat);
                ensure!(
                    report.mapping == *mapping,
                    "{name}: mapping {:?}",
                    report.mapping
                );
                ensure!(
                    report.filtering == *filtering,
                    "{name}: filtering {:?}",
                    report.filtering
                );
            }
        }
        // The control server keeps each node's verdict.
        let listed = poll(
            SLOW,
            Duration::from_millis(200),
            "verdicts at the control server",
            || {
                let out = m.admin(&["nodes", "--json"]).ok()?;
                let v: serde_json::Value = serde_json::from_str(&out).ok()?;
                let all = v.as_array()?.iter().all(|n| n["nat"]["udp"] == true);
                (all && v.as_array()?.len() == kinds.len()).then_some(v)
            },
        )?;
        for n in listed.as_array().into_iter().flatten() {
            if n["name"] == "ss" {
                ensure!(n["nat"]["mapping"] == "sequential", "{n}");
                ensure!(n["nat"]["port_stride"].as_i64().unwrap_or(0) >= 1, "{n}");
            }
        }
        Ok(())
    });
}
