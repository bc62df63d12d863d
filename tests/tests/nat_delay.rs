//! Real processes over a lab with latency and with loss (issue 12): a
//! control server and a relay on a public host, two nodes behind the NATs
//! under test, every WAN link shaped by the lab's wire.
//!
//! - 100 ms RTT: 25 ms one-way on the servers' link and on every site's WAN
//!   leg (for a site behind a carrier-grade NAT on the CGNAT's public leg),
//!   so any two sites, and a site and the servers, are 4 × 25 ms apart.
//! - 1% loss: on the same links, in each direction (a site-to-site path
//!   crosses two of them, so ~2% each way).
//!
//! Pairs: two port-restricted cones; a sequential symmetric NAT and a
//! port-restricted cone; a port-restricted cone and a port-restricted home
//! router behind a port-restricted CGNAT; two hosts on one LAN behind one
//! port-restricted router.
//!
//! Each test starts `b` and waits until it is up (control session, NAT
//! verdict, home relay); then starts `a` and sends `b` one message as soon
//! as `a` takes it. Every pair must deliver it exactly once; the easy pairs
//! (all but the symmetric one) must then go `direct` on both sides and
//! carry a numbered stream over it exactly once and in order. The times
//! are printed (`--nocapture`): from `a`'s start to `a` knowing `b`, to the
//! first message at `b`, and to each side's first `direct`, in ms and in
//! RTTs. Timeouts are failure guards only.
//!
//! Needs root, `ip` and `nft`: skipped with a printed reason otherwise,
//! failed when CI=true.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use peermesh_base::event::EventKind;
use peermesh_tests::meshlab::{poll, Inbox, MeshLab, MeshNode};
use peermesh_tests::netlab::{lab_or_skip, Host, NatKind, Shaping, SiteOpts};

/// The lab's round trip between any two sites, and a site and the servers.
const RTT: Duration = Duration::from_millis(100);
/// Failure guard: process start-up, joining, the first message.
const SLOW: Duration = Duration::from_secs(45);
/// Failure guard: both sides `direct` after the first message.
const TO_DIRECT: Duration = Duration::from_secs(30);
/// How long a pair that need not go direct is watched for it.
const WATCH_DIRECT: Duration = Duration::from_secs(15);
/// Numbered messages sent over the direct path.
const STREAM: usize = 200;

#[derive(Clone, Copy, Debug)]
enum Condition {
    /// 100 ms RTT between any two sites.
    Rtt100,
    /// 1% loss on every WAN link.
    Loss1,
}

impl Condition {
    fn shaping(self) -> Shaping {
        match self {
            Condition::Rtt100 => Shaping::delay(RTT / 4),
            Condition::Loss1 => Shaping::loss(0.01),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pair {
    /// Port-restricted cone × port-restricted cone.
    ConeCone,
    /// Sequential symmetric (`a`) × port-restricted cone (`b`).
    SymmetricCone,
    /// Port-restricted cone (`a`) × a port-restricted home router behind a
    /// port-restricted CGNAT (`b`).
    ConeCgnat,
    /// Two hosts behind one port-restricted router.
    SameLan,
}

impl Pair {
    /// Whether the pair must go `direct`.
    fn easy(self) -> bool {
        self != Pair::SymmetricCone
    }
}

fn ms(d: Duration) -> String {
    format!(
        "{:.0} ms ({:.1} RTT)",
        d.as_secs_f64() * 1e3,
        d.as_secs_f64() / RTT.as_secs_f64()
    )
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".into(), ms)
}

/// The data of every message `inbox` received, in arrival order.
fn received(inbox: &Inbox) -> Vec<String> {
    inbox.arrivals().into_iter().map(|a| a.msg.data).collect()
}

/// `b` has a control session, a NAT verdict and a home relay.
fn settled(n: &MeshNode) -> bool {
    let Some(s) = n.status() else {
        return false;
    };
    s.control.connected
        && s.nat.is_some()
        && n.events()
            .iter()
            .any(|e| matches!(e.kind, EventKind::HomeRelay { relay: Some(_) }))
}

/// When (from `since`) `n`'s link to `peer_id` first changed to `path`,
/// from its events.
fn first_path_at(n: &MeshNode, peer_id: &str, path: &str, since: SystemTime) -> Option<Duration> {
    n.first_path(peer_id, path)
        .map(|c| c.at.duration_since(since).unwrap_or_default())
}

/// Builds the sites of `pair` under `cond`; returns the hosts of `a` and `b`.
fn sites(m: &MeshLab, cond: Condition, pair: Pair) -> Result<(Host, Host)> {
    let wan = SiteOpts::shaped(cond.shaping());
    let lab = &m.lab;
    Ok(match pair {
        Pair::ConeCone => (
            lab.site("sa", NatKind::PortRestricted, wan.clone())?.host,
            lab.site("sb", NatKind::PortRestricted, wan)?.host,
        ),
        Pair::SymmetricCone => (
            lab.site("sa", NatKind::SymmetricSequential, wan.clone())?
                .host,
            lab.site("sb", NatKind::PortRestricted, wan)?.host,
        ),
        Pair::ConeCgnat => {
            let a = lab.site("sa", NatKind::PortRestricted, wan.clone())?.host;
            // The shaping is on the CGNAT's public leg; the home router's
            // leg into the CGNAT's segment is plain.
            let cg = lab.cgnat("isp", NatKind::PortRestricted, wan)?;
            let b = lab
                .site_behind(&cg, "sb", NatKind::PortRestricted, SiteOpts::default())?
                .host;
            (a, b)
        }
        Pair::SameLan => {
            let site = lab.site("lan", NatKind::PortRestricted, wan)?;
            let b = lab.add_host(&site, "lanb")?;
            (site.host, b)
        }
    })
}

fn pair_test(cond: Condition, pair: Pair) {
    let test = format!("{cond:?}_{pair:?}").to_lowercase();
    let Some(lab) = lab_or_skip(&test) else {
        return;
    };
    let mut m = MeshLab::new(&test, lab).unwrap_or_else(|e| panic!("{test}: {e:#}"));
    if let Err(e) = run_pair(&mut m, &test, cond, pair) {
        panic!("{test}: {e:#}");
    }
}

fn run_pair(m: &mut MeshLab, test: &str, cond: Condition, pair: Pair) -> Result<()> {
    m.start_public_shaped(cond.shaping())?;
    let (ha, hb) = sites(m, cond, pair)?;
    let (ta, tb) = (m.token()?, m.token()?);

    // `b` is up and settled before `a` starts.
    let b_start = Instant::now();
    let b = m.node("b", &hb, &tb)?;
    b.wait_up(SLOW)?;
    let inbox = m.recv(&b)?;
    inbox.wait_connected(SLOW)?;
    poll(SLOW, Duration::from_millis(20), "b to settle", || {
        settled(&b).then_some(())
    })
    .with_context(|| format!("b: {:?}", b.status()))?;
    let b_settled = b_start.elapsed();

    let t0 = Instant::now();
    let t0_sys = SystemTime::now();
    let a = m.node("a", &ha, &ta)?;
    a.wait_up(SLOW)?;
    poll(
        SLOW,
        Duration::from_millis(5),
        "a to take a message for b",
        || a.send_numbered("b", "first", 1).ok(),
    )?;
    let known = t0.elapsed();
    inbox
        .wait_for("first-0", SLOW)
        .context("the first message")?;
    let first = t0.elapsed();
    let a_id = b
        .peer("a")
        .map(|p| p.id.to_string())
        .context("b does not list a")?;
    let b_id = a
        .peer("b")
        .map(|p| p.id.to_string())
        .context("a does not list b")?;

    // Direct on both sides (required for the easy pairs).
    let guard = if pair.easy() { TO_DIRECT } else { WATCH_DIRECT };
    let both = poll(
        guard,
        Duration::from_millis(25),
        "direct on both sides",
        || {
            (a.path_to("b").as_deref() == Some("direct")
                && b.path_to("a").as_deref() == Some("direct"))
            .then_some(())
        },
    );
    let direct_a = first_path_at(&a, &b_id, "direct", t0_sys);
    let direct_b = first_path_at(&b, &a_id, "direct", t0_sys);
    let relay_a = first_path_at(&a, &b_id, "relay", t0_sys);
    eprintln!(
        "{test}: b settled {} after its start; from a's start: a knows b {}, first message \
         at b {}, a→b relay {}, a→b direct {}, b→a direct {}; paths now a→b {:?}, b→a {:?}",
        ms(b_settled),
        ms(known),
        ms(first),
        opt_ms(relay_a),
        opt_ms(direct_a),
        opt_ms(direct_b),
        a.path_to("b"),
        b.path_to("a"),
    );
    let path_events = |n: &MeshNode| -> Vec<String> {
        n.events()
            .iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    EventKind::PathUp { .. }
                        | EventKind::PathDown { .. }
                        | EventKind::PathChanged { .. }
                        | EventKind::Punch { .. }
                )
            })
            .map(|e| {
                format!(
                    "+{:.0} ms {:?}",
                    e.at()
                        .duration_since(t0_sys)
                        .unwrap_or_default()
                        .as_secs_f64()
                        * 1e3,
                    e.kind
                )
            })
            .collect()
    };
    if both.is_err() {
        eprintln!(
            "{test}: not direct on both sides after {guard:?}\n  a: {}\n  b: {}\n  punch a→b: \
             {:?}\n  punch b→a: {:?}",
            path_events(&a).join("\n     "),
            path_events(&b).join("\n     "),
            a.peer("b").map(|p| p.punch),
            b.peer("a").map(|p| p.punch),
        );
        if pair.easy() {
            both?;
        }
    }

    // The first message arrived exactly once; a stream on whatever path the
    // link is on now arrives exactly once and in order.
    a.send_numbered("b", "after", STREAM)?;
    poll(SLOW, Duration::from_millis(50), "the stream", || {
        (inbox.count() > STREAM).then_some(())
    })
    .with_context(|| format!("{} of {} arrived", inbox.count(), STREAM + 1))?;
    // Nothing more trickles in (a duplicate would).
    std::thread::sleep(RTT * 5);
    let got = received(&inbox);
    let want: Vec<String> = std::iter::once("first-0".to_string())
        .chain((0..STREAM).map(|i| format!("after-{i}")))
        .collect();
    if got != want {
        let firsts = got.iter().filter(|d| *d == "first-0").count();
        let i = got.iter().zip(&want).position(|(g, w)| g != w);
        bail!(
            "{} messages arrived, {} expected; first-0 {firsts} times; first difference at {i:?}",
            got.len(),
            want.len()
        );
    }
    if pair.easy() {
        for (side, path) in [("a→b", a.path_to("b")), ("b→a", b.path_to("a"))] {
            ensure!(
                path.as_deref() == Some("direct"),
                "{side} left the direct path: {path:?}"
            );
        }
    }
    eprintln!(
        "{test}: first message once, then {STREAM} messages exactly once and in order; \
         the link is {:?}",
        a.path_to("b")
    );
    Ok(())
}

#[test]
fn rtt100_cone_and_cone() {
    pair_test(Condition::Rtt100, Pair::ConeCone);
}

#[test]
fn rtt100_symmetric_and_cone() {
    pair_test(Condition::Rtt100, Pair::SymmetricCone);
}

#[test]
fn rtt100_cone_and_cone_behind_a_cgnat() {
    pair_test(Condition::Rtt100, Pair::ConeCgnat);
}

#[test]
fn rtt100_same_lan() {
    pair_test(Condition::Rtt100, Pair::SameLan);
}

#[test]
fn loss1_cone_and_cone() {
    pair_test(Condition::Loss1, Pair::ConeCone);
}

#[test]
fn loss1_symmetric_and_cone() {
    pair_test(Condition::Loss1, Pair::SymmetricCone);
}

#[test]
fn loss1_cone_and_cone_behind_a_cgnat() {
    pair_test(Condition::Loss1, Pair::ConeCgnat);
}

#[test]
fn loss1_same_lan() {
    pair_test(Condition::Loss1, Pair::SameLan);
}
