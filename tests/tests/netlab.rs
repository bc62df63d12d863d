//! The NAT lab itself: every `NatKind` behaves as RFC 4787 defines it, shown
//! with plain UDP between a host behind the NAT and an observer on a public
//! host with two addresses, which sees the public ip:port of each packet.
//!
//! Needs root, `ip` and `nft`: skipped with a printed reason otherwise,
//! failed when CI=true.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peermesh_tests::meshlab::udp_goodput;
use peermesh_tests::netlab::{
    lab_or_skip, Lab, NatKind, PublicHost, Shaping, SiteOpts, CGNAT_GATEWAY,
};

/// The lab tests set up and tear down many namespaces; one at a time keeps
/// the timing of the "nothing arrives" checks honest on a busy machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long to wait for a packet that must not arrive.
const QUIET: Duration = Duration::from_millis(400);
/// How long to wait for a packet that must arrive.
const LOUD: Duration = Duration::from_secs(3);

/// UDP observers on a public host: `a` and `b` on its first address
/// (different ports), `c` on its second address, `d` on the first address
/// but never contacted by the tests unless they say so.
struct Observer {
    host: PublicHost,
    a: UdpSocket,
    b: UdpSocket,
    c: UdpSocket,
    d: UdpSocket,
}

impl Observer {
    fn new(lab: &Lab) -> Observer {
        Self::on(lab.public_host_with_two_addrs("obs").unwrap())
    }

    /// An observer whose own link to the bridge is shaped.
    fn shaped(lab: &Lab, shaping: Shaping) -> Observer {
        Self::on(lab.public_host_shaped("obs", 2, shaping).unwrap())
    }

    fn on(host: PublicHost) -> Observer {
        let ip1 = host.ip();
        let ip2 = host.ip2().unwrap();
        let bind = |ip: Ipv4Addr, port: u16| {
            let s = host.udp_bind(SocketAddrV4::new(ip, port)).unwrap();
            s.set_read_timeout(Some(LOUD)).unwrap();
            s
        };
        Observer {
            a: bind(ip1, 3478),
            b: bind(ip1, 3479),
            c: bind(ip2, 3480),
            d: bind(ip1, 3481),
            host,
        }
    }

    fn all(&self) -> [&UdpSocket; 4] {
        [&self.a, &self.b, &self.c, &self.d]
    }
}

fn addr(s: &UdpSocket) -> SocketAddr {
    s.local_addr().unwrap()
}

/// Receives one datagram within `timeout`.
fn recv(s: &UdpSocket, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 1500];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => Some((buf[..n].to_vec(), from)),
        Err(_) => None,
    }
}

/// Sends `msg` from `from` to `to` and returns the source `to` observed.
fn observed(from: &UdpSocket, to: &UdpSocket, msg: &str) -> SocketAddr {
    from.send_to(msg.as_bytes(), addr(to)).unwrap();
    let (data, src) = recv(to, LOUD).unwrap_or_else(|| panic!("{msg}: nothing arrived"));
    assert_eq!(data, msg.as_bytes());
    src
}

/// Whether a datagram from `from` to `to` (a public address) arrives.
fn arrives(from: &UdpSocket, to: SocketAddr, at: &UdpSocket, msg: &str) -> Option<SocketAddr> {
    from.send_to(msg.as_bytes(), to).unwrap();
    let (data, src) = recv(at, QUIET * 2)?;
    assert_eq!(data, msg.as_bytes(), "unexpected datagram");
    Some(src)
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

#[test]
fn no_nat_shows_the_host_address() {
    let _g = serial();
    let Some(lab) = lab_or_skip("no_nat_shows_the_host_address") else {
        return;
    };
    let obs = Observer::new(&lab);
    let site = lab
        .site("open", NatKind::None, SiteOpts::default())
        .unwrap();
    assert!(site.router.is_none());
    assert_eq!(site.public_ip(), site.host.ip());
    let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
    for to in obs.all() {
        assert_eq!(observed(&sock, to, "hi"), v4(site.host.ip(), 40000));
    }
    // Reachable unsolicited, from anywhere.
    let from = arrives(&obs.d, v4(site.host.ip(), 40000), &sock, "in").unwrap();
    assert_eq!(from, addr(&obs.d));
}

#[test]
fn full_cone_maps_and_filters_independently_of_the_endpoint() {
    let _g = serial();
    let Some(lab) = lab_or_skip("full_cone") else {
        return;
    };
    let obs = Observer::new(&lab);
    let site = lab
        .site("fc", NatKind::FullCone, SiteOpts::default())
        .unwrap();
    let wan = site.public_ip();
    assert_eq!(wan, site.router().wan_ip());
    let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
    // Nothing is mapped yet: an early inbound packet is dropped.
    assert_eq!(arrives(&obs.c, v4(wan, 40000), &sock, "early"), None);

    let m1 = observed(&sock, &obs.a, "to a");
    let m2 = observed(&sock, &obs.b, "to b");
    let m3 = observed(&sock, &obs.c, "to c");
    assert_eq!(m1, v4(wan, 40000), "the internal port is kept");
    assert_eq!(m1, m2, "one public port for all destinations");
    assert_eq!(m1, m3, "one public port for all destinations");

    // Endpoint-independent filtering: a never-contacted port on the first
    // address, and the second address, both get through.
    let from = arrives(&obs.d, m1, &sock, "unsolicited d").expect("d is let in");
    assert_eq!(from, addr(&obs.d));
    let third = obs
        .host
        .udp_bind(v4(obs.host.ip2().unwrap(), 5000))
        .unwrap();
    let from = arrives(&third, m1, &sock, "unsolicited third").expect("third is let in");
    assert_eq!(from, addr(&third));
    // And the host can answer it on the same mapping.
    assert_eq!(observed(&sock, &third, "reply"), m1);
    // A port that was never mapped stays closed.
    assert_eq!(arrives(&obs.d, v4(wan, 40001), &sock, "unmapped"), None);
}

#[test]
fn full_cone_keeps_mappings_apart_for_two_hosts_with_the_same_port() {
    let _g = serial();
    let Some(lab) = lab_or_skip("full_cone_two_hosts") else {
        return;
    };
    let obs = Observer::new(&lab);
    let site = lab
        .site("fc", NatKind::FullCone, SiteOpts::default())
        .unwrap();
    let h2 = lab.add_host(&site, "fc2").unwrap();
    assert_ne!(h2.ip(), site.host.ip());
    let s1 = site.host.udp_bind("0.0.0.0:40000").unwrap();
    let s2 = h2.udp_bind("0.0.0.0:40000").unwrap();

    let m1 = observed(&s1, &obs.a, "h1 to a");
    let m2 = observed(&s2, &obs.a, "h2 to a");
    assert_eq!(m1.port(), 40000);
    assert_ne!(m2.port(), 40000, "the port is taken towards a");
    // h2 keeps its port for a destination where 40000 would be free, and h1
    // keeps its own even where h2 came first.
    assert_eq!(observed(&s2, &obs.b, "h2 to b"), m2);
    assert_eq!(observed(&s1, &obs.b, "h1 to b"), m1);
    assert_eq!(observed(&s1, &obs.c, "h1 to c"), m1);
    // Inbound to each mapping reaches the right host.
    assert_eq!(arrives(&obs.d, m1, &s1, "to h1"), Some(addr(&obs.d)));
    assert_eq!(arrives(&obs.d, m2, &s2, "to h2"), Some(addr(&obs.d)));
    assert_eq!(recv(&s1, QUIET), None);
}

#[test]
fn port_restricted_keeps_the_port_and_filters_by_address_and_port() {
    let _g = serial();
    let Some(lab) = lab_or_skip("port_restricted") else {
        return;
    };
    let obs = Observer::new(&lab);
    let site = lab
        .site("pr", NatKind::PortRestricted, SiteOpts::default())
        .unwrap();
    let wan = site.public_ip();
    let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
    let m1 = observed(&sock, &obs.a, "to a");
    let m2 = observed(&sock, &obs.b, "to b");
    assert_eq!(m1, v4(wan, 40000), "the internal port is kept when free");
    assert_eq!(m1, m2, "one public port for both destinations");

    // Contacted endpoints may answer.
    assert_eq!(arrives(&obs.a, m1, &sock, "from a"), Some(addr(&obs.a)));
    // Same address, other port: dropped. Other address: dropped.
    assert_eq!(arrives(&obs.d, m1, &sock, "from d"), None);
    assert_eq!(arrives(&obs.c, m1, &sock, "from c"), None);
    // Once the host sent to d, d gets through.
    assert_eq!(observed(&sock, &obs.d, "to d"), m1);
    assert_eq!(
        arrives(&obs.d, m1, &sock, "from d again"),
        Some(addr(&obs.d))
    );
}

#[test]
fn symmetric_random_maps_each_destination_to_a_random_port() {
    let _g = serial();
    let Some(lab) = lab_or_skip("symmetric_random") else {
        return;
    };
    let obs = Observer::new(&lab);
    let site = lab
        .site("sr", NatKind::SymmetricRandom, SiteOpts::default())
        .unwrap();
    let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
    let ports: Vec<u16> = obs
        .all()
        .iter()
        .map(|to| {
            let m = observed(&sock, to, "hi");
            assert_eq!(m.ip(), std::net::IpAddr::V4(site.public_ip()));
            m.port()
        })
        .collect();
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        ports.len(),
        "a new port per destination: {ports:?}"
    );
    let steps: Vec<i32> = ports
        .windows(2)
        .map(|w| i32::from(w[1]) - i32::from(w[0]))
        .collect();
    assert!(
        steps.iter().any(|s| *s != steps[0]),
        "ports look sequential: {ports:?}"
    );
    // The mapping for one destination is stable.
    assert_eq!(observed(&sock, &obs.a, "again").port(), ports[0]);
    // Filtering: a port mapped towards a is closed to d.
    assert_eq!(
        arrives(&obs.d, v4(site.public_ip(), ports[0]), &sock, "from d"),
        None
    );
}

#[test]
fn symmetric_sequential_steps_by_the_stride() {
    let _g = serial();
    let Some(lab) = lab_or_skip("symmetric_sequential") else {
        return;
    };
    let obs = Observer::new(&lab);
    let opts = SiteOpts {
        seq_base: 30000,
        seq_stride: 7,
        seq_count: 100,
        ..SiteOpts::default()
    };
    let site = lab.site("ss", NatKind::SymmetricSequential, opts).unwrap();
    let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
    let ports: Vec<u16> = obs
        .all()
        .iter()
        .map(|to| observed(&sock, to, "hi").port())
        .collect();
    assert_eq!(ports, vec![30000, 30007, 30014, 30021]);
    // Same destination, same mapping; a second socket continues the series.
    assert_eq!(observed(&sock, &obs.b, "again").port(), 30007);
    let sock2 = site.host.udp_bind("0.0.0.0:40001").unwrap();
    assert_eq!(observed(&sock2, &obs.a, "second socket").port(), 30028);

    // Default stride 1.
    let site1 = lab
        .site("ss1", NatKind::SymmetricSequential, SiteOpts::default())
        .unwrap();
    let sock = site1.host.udp_bind("0.0.0.0:40000").unwrap();
    let ports: Vec<u16> = obs
        .all()
        .iter()
        .map(|to| observed(&sock, to, "hi").port())
        .collect();
    assert_eq!(ports, vec![20000, 20001, 20002, 20003]);
}

/// An early inbound packet (a peer punching before this side sent anything)
/// to the port the host is about to use: the home router drops it and keeps
/// the port; the router without WAN firewall lets its own stack take it, so
/// the host is mapped to another port (FIELD-NOTES "Lab pitfall").
#[test]
fn wan_firewall_keeps_early_punches_from_taking_the_port() {
    let _g = serial();
    let Some(lab) = lab_or_skip("wan_firewall") else {
        return;
    };
    let obs = Observer::new(&lab);
    let home = lab
        .site("home", NatKind::PortRestricted, SiteOpts::default())
        .unwrap();
    let harsh = lab
        .site(
            "harsh",
            NatKind::PortRestricted,
            SiteOpts::without_wan_firewall(),
        )
        .unwrap();
    for (site, keeps_port) in [(&home, true), (&harsh, false)] {
        let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
        // The early punch, before the host sent anything: never delivered.
        assert_eq!(
            arrives(&obs.d, v4(site.public_ip(), 40000), &sock, "early"),
            None
        );
        let m = observed(&sock, &obs.d, "punch back");
        assert_eq!(
            m.port() == 40000,
            keeps_port,
            "site {}: mapped to {m}",
            site.name
        );
        // Linux NAT reuses a source's existing mapping for new destinations
        // (endpoint-independent mapping), so the harsh router's lost port is
        // lost towards everyone, not just towards d.
        let to_a = observed(&sock, &obs.a, "to a");
        assert_eq!(to_a, m, "site {}:\n{}", site.name, site.router().ruleset());
    }
}

#[test]
fn cut_drops_udp_between_a_site_and_a_peer_until_restored() {
    let _g = serial();
    let Some(lab) = lab_or_skip("cut") else {
        return;
    };
    let obs = Observer::new(&lab);
    let site = lab
        .site("cut", NatKind::PortRestricted, SiteOpts::default())
        .unwrap();
    let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
    let m = observed(&sock, &obs.a, "before");
    lab.cut(&site, obs.host.ip()).unwrap();
    lab.cut(&site, obs.host.ip()).unwrap(); // idempotent
                                            // Both directions are dropped for that address…
    sock.send_to(b"out", addr(&obs.a)).unwrap();
    assert_eq!(recv(&obs.a, QUIET), None);
    assert_eq!(arrives(&obs.a, m, &sock, "in"), None);
    // …but not for the host's other address.
    assert_eq!(observed(&sock, &obs.c, "other address").port(), 40000);
    lab.restore(&site, obs.host.ip()).unwrap();
    lab.restore(&site, obs.host.ip()).unwrap(); // idempotent
    assert_eq!(observed(&sock, &obs.a, "after"), m);
    assert_eq!(arrives(&obs.a, m, &sock, "in after"), Some(addr(&obs.a)));
}

#[test]
fn spawned_processes_run_inside_the_namespace() {
    let _g = serial();
    let Some(lab) = lab_or_skip("spawn") else {
        return;
    };
    let site = lab
        .site("sp", NatKind::PortRestricted, SiteOpts::default())
        .unwrap();
    let addrs = site.host.exec(&["ip", "-4", "-o", "addr"]).unwrap();
    assert!(addrs.contains(&format!("{}/24", site.host.ip())), "{addrs}");
    let routes = site.router().exec(&["ip", "-4", "route"]).unwrap();
    assert!(routes.contains("10."), "{routes}");
    let cat = |ns: &peermesh_tests::netlab::Ns, path: &str| ns.exec(&["cat", path]).unwrap();
    assert_eq!(
        cat(site.router(), "/proc/sys/net/ipv4/ip_forward").trim(),
        "1"
    );
    assert_eq!(cat(&site.host, "/proc/sys/net/ipv4/ip_forward").trim(), "0");
    assert_eq!(
        cat(&site.host, "/proc/sys/net/ipv6/conf/all/disable_ipv6").trim(),
        "1"
    );
    // Nothing outside the lab is reachable: the router (where the host's
    // default route leads) and the public side have no route to it.
    for ns in [site.router().ns(), lab.public()] {
        let out = ns.udp_bind("0.0.0.0:0").unwrap();
        let err = out.send_to(b"x", "192.0.2.1:9").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NetworkUnreachable, "{err}");
    }
    // A long-running child is killed when the lab goes.
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("600");
    let mut child = site.host.spawn(cmd).unwrap();
    assert_eq!(site.host.pids(), vec![child.id() as i32]);
    let names = lab.namespaces();
    drop(lab);
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_gone(&names);
}

#[test]
fn delay_adds_latency_on_the_wan_leg() {
    let _g = serial();
    let Some(lab) = lab_or_skip("delay") else {
        return;
    };
    // The observer's own leg is shaped too: a round trip crosses the site's
    // leg twice (2 × 60 ms) and the observer's twice (2 × 15 ms).
    let obs = Observer::shaped(&lab, Shaping::delay(Duration::from_millis(15)));
    let opts = SiteOpts {
        delay: Some(Duration::from_millis(60)),
        ..SiteOpts::default()
    };
    let site = lab.site("slow", NatKind::PortRestricted, opts).unwrap();
    let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
    let mut rtts = Vec::new();
    for k in 0..5 {
        let start = Instant::now();
        let m = observed(&sock, &obs.a, &format!("ping {k}"));
        obs.a.send_to(b"pong", m).unwrap();
        assert!(recv(&sock, LOUD).is_some(), "pong {k}");
        rtts.push(start.elapsed());
    }
    eprintln!("delay: round trips over 2 × 60 ms + 2 × 15 ms: {rtts:?}");
    let min = *rtts.iter().min().unwrap();
    assert!(min >= Duration::from_millis(150), "{rtts:?}");
    // The wire adds what it is told, not more (generous for a busy machine).
    assert!(min < Duration::from_millis(250), "{rtts:?}");
    // ARP is not delayed: the first round trip (which resolved both
    // neighbours) took about as long as the others.
    assert!(rtts[0] < min + Duration::from_millis(100), "{rtts:?}");
    // A change while it runs: 5 ms on the site's leg.
    lab.set_shaping(site.leg(), Shaping::delay(Duration::from_millis(5)))
        .unwrap();
    let start = Instant::now();
    let m = observed(&sock, &obs.a, "ping after");
    obs.a.send_to(b"pong", m).unwrap();
    assert!(recv(&sock, LOUD).is_some());
    let rtt = start.elapsed();
    assert!(
        rtt >= Duration::from_millis(40) && rtt < Duration::from_millis(140),
        "{rtt:?} after the change to 5 ms"
    );
    let stats = lab.wire_stats(site.leg()).unwrap();
    assert_eq!(stats.out.lost + stats.into.lost, 0, "{stats:?}");
    assert!(
        stats.out.delivered >= 6 && stats.into.delivered >= 6,
        "{stats:?}"
    );
}

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_gone(names: &[String]) {
    let list = netns_list();
    for n in names {
        assert!(
            !list.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "{n} still exists:\n{list}"
        );
    }
}

#[test]
fn dropping_the_lab_removes_its_namespaces() {
    let _g = serial();
    let Some(lab) = lab_or_skip("drop") else {
        return;
    };
    let _obs = Observer::new(&lab);
    let _s = lab
        .site("a", NatKind::FullCone, SiteOpts::default())
        .unwrap();
    let _t = lab.site("b", NatKind::None, SiteOpts::default()).unwrap();
    let names = lab.namespaces();
    assert_eq!(names.len(), 5, "{names:?}");
    let list = netns_list();
    for n in &names {
        assert!(n.starts_with(lab.id()));
        assert!(list.contains(n.as_str()), "{n} missing:\n{list}");
    }
    drop(lab);
    assert_gone(&names);
}

#[test]
fn a_panic_inside_the_lab_still_removes_its_namespaces() {
    let _g = serial();
    if lab_or_skip("panic").is_none() {
        return;
    }
    let names = Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new().unwrap();
        let _s = lab
            .site("p", NatKind::SymmetricRandom, SiteOpts::default())
            .unwrap();
        *names.lock().unwrap() = lab.namespaces();
        panic!("a failing lab test");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    assert_gone(&names);
}

#[test]
fn cleanup_stale_removes_only_dead_runs() {
    let _g = serial();
    if lab_or_skip("cleanup_stale").is_none() {
        return;
    }
    let prefix = "pmstaletest";
    // A pid that is surely gone: a child that ended and was reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let me = std::process::id();
    let stale = format!("{prefix}-{dead}-0-x");
    let live = format!("{prefix}-1-0-x"); // pid 1 is alive
    let own = format!("{prefix}-{me}-99-x");
    for n in [&stale, &live, &own] {
        let st = std::process::Command::new("ip")
            .args(["netns", "add", n])
            .status()
            .unwrap();
        assert!(st.success());
    }
    // Too young for the default cleanup (made after this process started).
    let removed = Lab::cleanup_stale(prefix).unwrap();
    assert!(removed.is_empty(), "{removed:?}");
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    let removed = Lab::cleanup_stale_older_than(prefix, later).unwrap();
    let list = netns_list();
    for n in [&live, &own] {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", n])
            .status();
    }
    assert_eq!(removed, vec![stale.clone()]);
    assert!(!list.contains(&stale));
    assert!(list.contains(&live) && list.contains(&own), "{list}");
}

/// Sends `n` numbered datagrams from `from` to `to`, paced so that no
/// socket buffer overflows, while a thread counts those that reach `at`;
/// returns how many arrived.
fn count_through(from: &UdpSocket, to: SocketAddr, at: &UdpSocket, n: u32) -> u32 {
    let at = at.try_clone().unwrap();
    at.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let counter = std::thread::spawn(move || {
        let mut seen = std::collections::HashSet::new();
        let mut quiet_since: Option<Instant> = None;
        let mut buf = [0u8; 64];
        loop {
            match at.recv_from(&mut buf) {
                Ok((4, _)) => {
                    seen.insert(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                    quiet_since = None;
                }
                Ok(_) => {}
                Err(_) if flag.load(Ordering::Relaxed) => {
                    let q = *quiet_since.get_or_insert_with(Instant::now);
                    if q.elapsed() > QUIET {
                        break;
                    }
                }
                Err(_) => {}
            }
        }
        seen.len() as u32
    });
    for i in 0..n {
        from.send_to(&i.to_be_bytes(), to).unwrap();
        if i % 50 == 49 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    done.store(true, Ordering::Relaxed);
    counter.join().unwrap()
}

/// 10,000 datagrams each way over a WAN leg with 5% loss: about 500 are
/// lost each way (the standard deviation is 22), exactly those the wire
/// says it dropped; with the loss set to 0 while it runs, none.
#[test]
fn loss_drops_about_the_configured_fraction() {
    let _g = serial();
    let Some(lab) = lab_or_skip("loss") else {
        return;
    };
    let obs = Observer::new(&lab);
    let opts = SiteOpts {
        loss: 0.05,
        ..SiteOpts::default()
    };
    let site = lab.site("lossy", NatKind::PortRestricted, opts).unwrap();
    let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
    // The mapping (these two may be lost too: try until both got through).
    let m = poll_observed(&sock, &obs.a);
    let before = lab.wire_stats(site.leg()).unwrap();
    let n = 10_000;
    let out = count_through(&sock, addr(&obs.a), &obs.a, n);
    let into = count_through(&obs.a, m, &sock, n);
    let stats = lab.wire_stats(site.leg()).unwrap();
    let (lost_out, lost_in) = (n - out, n - into);
    eprintln!("loss: 5% of {n}: {lost_out} lost out, {lost_in} lost in; wire {stats:?}");
    for lost in [lost_out, lost_in] {
        assert!((390..=610).contains(&lost), "{lost} of {n} lost");
    }
    assert_eq!(u64::from(lost_out), stats.out.lost - before.out.lost);
    assert_eq!(u64::from(lost_in), stats.into.lost - before.into.lost);
    assert_eq!(stats.out.overflow + stats.into.overflow, 0);

    lab.set_shaping(site.leg(), Shaping::default()).unwrap();
    assert_eq!(count_through(&sock, addr(&obs.a), &obs.a, 1000), 1000);
}

/// Sends from `sock` to `to` until a datagram arrives; its observed source.
fn poll_observed(sock: &UdpSocket, to: &UdpSocket) -> SocketAddr {
    for _ in 0..50 {
        sock.send_to(b"map", addr(to)).unwrap();
        if let Some((_, src)) = recv(to, Duration::from_millis(200)) {
            // Drain duplicates of earlier tries.
            while recv(to, Duration::from_millis(50)).is_some() {}
            return src;
        }
    }
    panic!("nothing arrived in 50 tries");
}

/// A 20 Mbit/s limit on a public host's leg, both ways: UDP sent as fast as
/// one thread can arrives at about 20 Mbit/s of frames (19.3 Mbit/s of
/// 1200-byte payloads), the rest dropped by the link's buffer.
#[test]
fn rate_limits_throughput_on_the_leg() {
    let _g = serial();
    let Some(lab) = lab_or_skip("rate") else {
        return;
    };
    let obs = Observer::new(&lab);
    let opts = SiteOpts {
        rate_bps: Some(20_000_000),
        ..SiteOpts::default()
    };
    let site = lab.site("narrow", NatKind::None, opts).unwrap();
    let size = 1200;
    // Ethernet + IPv4 + UDP headers count against the rate.
    let expected = 20.0 * size as f64 / (size + 42) as f64;
    let up = udp_goodput(
        &site.host,
        obs.host.ns(),
        v4(obs.host.ip2().unwrap(), 6000),
        v4(obs.host.ip2().unwrap(), 6000),
        size,
        1,
        Duration::from_millis(1500),
    )
    .unwrap();
    let down = udp_goodput(
        obs.host.ns(),
        &site.host,
        v4(site.host.ip(), 6001),
        v4(site.host.ip(), 6001),
        size,
        1,
        Duration::from_millis(1500),
    )
    .unwrap();
    let stats = lab.wire_stats(site.leg()).unwrap();
    eprintln!(
        "rate: 20 Mbit/s leg: up {:.1} Mbit/s, down {:.1} Mbit/s (expected {expected:.1}); wire {stats:?}",
        up.mbit_per_s, down.mbit_per_s
    );
    for g in [&up, &down] {
        assert!(
            g.mbit_per_s > 0.85 * expected && g.mbit_per_s < 1.05 * expected,
            "{g:?}"
        );
    }
    assert!(
        stats.out.overflow > 0 && stats.into.overflow > 0,
        "{stats:?}"
    );
}

/// A shaped link at zero delay (two TAP devices and the wire) carries UDP
/// with and without GSO and TCP with TSO, through a NAT, intact; prints its
/// speed beside a plain veth link's.
#[test]
fn a_wire_at_zero_delay_carries_udp_and_tcp_at_speed() {
    let _g = serial();
    let Some(lab) = lab_or_skip("wire_speed") else {
        return;
    };
    let obs = Observer::new(&lab);
    let plain = lab
        .site("plain", NatKind::PortRestricted, SiteOpts::default())
        .unwrap();
    let wired = lab
        .site(
            "wired",
            NatKind::PortRestricted,
            SiteOpts {
                delay: Some(Duration::ZERO),
                ..SiteOpts::default()
            },
        )
        .unwrap();
    assert!(lab.wire_stats(plain.leg()).is_none());
    let target = v4(obs.host.ip2().unwrap(), 7000);
    let mut report = Vec::new();
    for (label, site) in [("veth", &plain), ("wire", &wired)] {
        for segments in [1, 32] {
            let g = udp_goodput(
                &site.host,
                obs.host.ns(),
                target,
                target,
                1200,
                segments,
                Duration::from_secs(1),
            )
            .unwrap();
            report.push(format!(
                "{label} UDP {segments} segment(s)/send: {:.0} Mbit/s ({:.1}% of what was sent)",
                g.mbit_per_s,
                100.0 * g.received as f64 / g.sent.max(1) as f64
            ));
        }
        // TCP: 64 MiB through the NAT, checked byte for byte.
        let listener = obs.host.tcp_listen(v4(obs.host.ip(), 7001)).unwrap();
        let total = 64usize << 20;
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let (mut got, mut bad) = (0usize, 0usize);
            loop {
                let n = conn.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                for (i, b) in buf[..n].iter().enumerate() {
                    if *b != ((got + i) % 251) as u8 {
                        bad += 1;
                    }
                }
                got += n;
            }
            (got, bad)
        });
        let mut conn = site
            .host
            .tcp_connect(v4(obs.host.ip(), 7001), LOUD)
            .unwrap();
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let start = Instant::now();
        std::io::Write::write_all(&mut conn, &data).unwrap();
        drop(conn);
        let (got, bad) = reader.join().unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!((got, bad), (total, 0), "{label}: TCP");
        report.push(format!(
            "{label} TCP: {:.0} Mbit/s",
            total as f64 * 8.0 / secs / 1e6
        ));
    }
    let stats = lab.wire_stats(wired.leg()).unwrap();
    eprintln!("wire_speed:\n  {}\n  wire {stats:?}", report.join("\n  "));
    assert_eq!(stats.out.write_errors + stats.into.write_errors, 0);
}

/// A home router (port-restricted cone) behind a carrier-grade NAT (also
/// port-restricted): the observer sees the CGNAT's address, the port
/// survives both NATs when free, mapping stays endpoint-independent and
/// filtering address-and-port-dependent; a second home behind the same
/// CGNAT that uses the same port gets another public port.
#[test]
fn a_home_router_behind_a_carrier_grade_nat() {
    let _g = serial();
    let Some(lab) = lab_or_skip("cgnat") else {
        return;
    };
    let obs = Observer::new(&lab);
    let cg = lab
        .cgnat("isp", NatKind::PortRestricted, SiteOpts::default())
        .unwrap();
    let home = lab
        .site_behind(&cg, "home", NatKind::PortRestricted, SiteOpts::default())
        .unwrap();
    let wan = home.router().wan_ip();
    assert_eq!(wan.octets()[..2], [100, 64], "{wan}");
    assert_ne!(wan, CGNAT_GATEWAY);
    assert_eq!(home.public_ip(), cg.public_ip());
    assert_ne!(home.public_ip(), wan);

    let sock = home.host.udp_bind("0.0.0.0:40000").unwrap();
    // An early inbound packet: nothing is mapped at the CGNAT.
    assert_eq!(
        arrives(&obs.d, v4(cg.public_ip(), 40000), &sock, "early"),
        None
    );
    let m1 = observed(&sock, &obs.a, "to a");
    let m2 = observed(&sock, &obs.c, "to c");
    assert_eq!(m1, v4(cg.public_ip(), 40000), "the port is kept twice");
    assert_eq!(m1, m2, "one public port for all destinations");
    assert_eq!(arrives(&obs.a, m1, &sock, "from a"), Some(addr(&obs.a)));
    assert_eq!(arrives(&obs.d, m1, &sock, "from d"), None);
    assert_eq!(observed(&sock, &obs.d, "to d"), m1);
    assert_eq!(arrives(&obs.d, m1, &sock, "from d"), Some(addr(&obs.d)));
    // The home router's own table shows the inner translation.
    let table = home.router().conntrack();
    assert!(table.contains(&format!("dst={wan} sport=3478")), "{table}");

    let other = lab
        .site_behind(&cg, "other", NatKind::PortRestricted, SiteOpts::default())
        .unwrap();
    assert_ne!(other.router().wan_ip(), wan);
    let sock2 = other.host.udp_bind("0.0.0.0:40000").unwrap();
    let o = observed(&sock2, &obs.a, "other to a");
    assert_eq!(o.ip(), m1.ip());
    assert_ne!(o.port(), 40000, "the CGNAT's port 40000 is taken towards a");
    assert_eq!(arrives(&obs.a, o, &sock2, "to other"), Some(addr(&obs.a)));
    assert_eq!(recv(&sock, QUIET), None);
    // The two homes reach each other only through the CGNAT's public
    // address (no hairpinning there either).
    assert_eq!(arrives(&sock2, m1, &sock, "hairpin at the CGNAT"), None);
}

/// Two hosts on one LAN behind one router: they reach each other on their
/// private addresses (the source is the other's private ip:port); the lab's
/// NATs do not hairpin, so a host's public mapping is out of reach of its
/// neighbour, for the port-restricted cone and the full cone alike.
#[test]
fn two_hosts_on_one_lan_reach_each_other_privately_but_not_by_hairpin() {
    let _g = serial();
    let Some(lab) = lab_or_skip("same_lan") else {
        return;
    };
    let obs = Observer::new(&lab);
    for (name, kind) in [
        ("lanpr", NatKind::PortRestricted),
        ("lanfc", NatKind::FullCone),
    ] {
        let site = lab.site(name, kind, SiteOpts::default()).unwrap();
        let h2 = lab.add_host(&site, &format!("{name}2")).unwrap();
        let s1 = site.host.udp_bind("0.0.0.0:40000").unwrap();
        let s2 = h2.udp_bind("0.0.0.0:40001").unwrap();
        // Privately, both ways, unsolicited.
        let from = arrives(&s1, v4(h2.ip(), 40001), &s2, "lan 1→2");
        assert_eq!(from, Some(v4(site.host.ip(), 40000)), "{kind:?}");
        let from = arrives(&s2, v4(site.host.ip(), 40000), &s1, "lan 2→1");
        assert_eq!(from, Some(v4(h2.ip(), 40001)), "{kind:?}");
        // Both mapped on the router's public address.
        let m1 = observed(&s1, &obs.a, "1 to a");
        let m2 = observed(&s2, &obs.a, "2 to a");
        assert_eq!(m1.ip(), m2.ip());
        assert_ne!(m1, m2);
        // h1 → h2's public mapping (after h2 sent to h1's, so even a
        // filtering NAT would let it in): no hairpinning.
        let _ = s2.send_to(b"open", m1);
        assert_eq!(arrives(&s1, m2, &s2, "hairpin 1→2"), None, "{kind:?}");
        assert_eq!(recv(&s1, QUIET), None, "{kind:?}");
    }
}

/// A router with 2 s UDP mapping timeouts (its namespace only): a mapping
/// idle for 3.5 s is gone (the reply is dropped, a sequential NAT hands
/// out a new port), one kept alive every second stays, and a default router
/// keeps the idle one.
#[test]
fn short_udp_timeouts_expire_idle_mappings() {
    let _g = serial();
    let Some(lab) = lab_or_skip("udp_timeout") else {
        return;
    };
    let obs = Observer::new(&lab);
    let short = SiteOpts {
        udp_timeout: Some(Duration::from_secs(2)),
        ..SiteOpts::default()
    };
    let quick = lab
        .site("quick", NatKind::PortRestricted, short.clone())
        .unwrap();
    let seq = lab
        .site("quickseq", NatKind::SymmetricSequential, short.clone())
        .unwrap();
    let fc = lab.site("quickfc", NatKind::FullCone, short).unwrap();
    let slow = lab
        .site("slow", NatKind::PortRestricted, SiteOpts::default())
        .unwrap();
    let cat = |ns: &peermesh_tests::netlab::Ns, key: &str| {
        ns.exec(&["cat", &format!("/proc/sys/net/netfilter/{key}")])
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(cat(quick.router(), "nf_conntrack_udp_timeout"), "2");
    assert_eq!(cat(quick.router(), "nf_conntrack_udp_timeout_stream"), "2");
    assert_eq!(cat(slow.router(), "nf_conntrack_udp_timeout"), "30");

    let idle = quick.host.udp_bind("0.0.0.0:40000").unwrap();
    let kept = quick.host.udp_bind("0.0.0.0:40001").unwrap();
    let sq = seq.host.udp_bind("0.0.0.0:40000").unwrap();
    let f = fc.host.udp_bind("0.0.0.0:40000").unwrap();
    let sl = slow.host.udp_bind("0.0.0.0:40000").unwrap();
    let m_idle = observed(&idle, &obs.a, "idle");
    let m_kept = observed(&kept, &obs.a, "kept");
    let m_seq = observed(&sq, &obs.a, "seq");
    let m_fc = observed(&f, &obs.a, "fc");
    let m_slow = observed(&sl, &obs.a, "slow");
    assert_eq!(
        arrives(&obs.d, m_fc, &f, "fc open to d"),
        Some(addr(&obs.d))
    );
    // Linux NAT keeps one conntrack entry per destination: the keep-alive
    // goes to the same observer.
    for _ in 0..7 {
        std::thread::sleep(Duration::from_millis(500));
        kept.send_to(b"keepalive", addr(&obs.a)).unwrap();
    }
    while recv(&obs.a, Duration::from_millis(10)).is_some() {}
    // 3.5 s later.
    assert_eq!(arrives(&obs.a, m_idle, &idle, "after idle"), None);
    assert_eq!(arrives(&obs.d, m_fc, &f, "fc after idle"), None);
    assert_eq!(
        arrives(&obs.a, m_kept, &kept, "kept alive"),
        Some(addr(&obs.a))
    );
    assert_eq!(
        arrives(&obs.a, m_slow, &sl, "default timeout"),
        Some(addr(&obs.a))
    );
    // Going out again maps anew: the same port from masquerade, the next
    // one from the sequential NAT.
    assert_eq!(observed(&idle, &obs.a, "idle again"), m_idle);
    assert_eq!(arrives(&obs.a, m_idle, &idle, "again"), Some(addr(&obs.a)));
    let m_seq2 = observed(&sq, &obs.a, "seq again");
    assert_eq!(m_seq2.port(), m_seq.port() + 1, "{m_seq} then {m_seq2}");
}

/// A NAT that loses every mapping while a stream of datagrams flows out:
/// the stream goes on (new mappings; masquerade and the full cone keep the
/// port, the sequential NAT moves on), but what arrives for the old mapping
/// before the host sends again is dropped.
#[test]
fn a_nat_that_loses_its_mappings() {
    let _g = serial();
    let Some(lab) = lab_or_skip("flush") else {
        return;
    };
    let obs = Observer::new(&lab);
    for (name, kind) in [
        ("flpr", NatKind::PortRestricted),
        ("flfc", NatKind::FullCone),
        ("flss", NatKind::SymmetricSequential),
    ] {
        let site = lab.site(name, kind, SiteOpts::default()).unwrap();
        let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
        let m = observed(&sock, &obs.a, "before");
        assert_eq!(arrives(&obs.a, m, &sock, "reply"), Some(addr(&obs.a)));
        if kind == NatKind::FullCone {
            assert_eq!(arrives(&obs.d, m, &sock, "open"), Some(addr(&obs.d)));
        }
        // A stream out every 5 ms while the NAT forgets.
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, flag, to) = (sock.try_clone().unwrap(), stop.clone(), addr(&obs.a));
        let sender = std::thread::spawn(move || {
            let mut n = 0u32;
            while !flag.load(Ordering::Relaxed) {
                tx.send_to(&n.to_be_bytes(), to).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        });
        std::thread::sleep(Duration::from_millis(200));
        site.router().flush_mappings().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let sent = sender.join().unwrap();
        let mut got = Vec::new();
        let mut sources = std::collections::BTreeSet::new();
        while let Some((data, src)) = recv(&obs.a, Duration::from_millis(200)) {
            if data.len() == 4 {
                got.push(u32::from_be_bytes(data[..4].try_into().unwrap()));
                sources.insert(src);
            }
        }
        assert_eq!(got.len() as u32, sent, "{kind:?}: the stream out went on");
        // The newest mapping (the highest port of a sequential NAT).
        let after = *sources.iter().max_by_key(|s| s.port()).unwrap_or(&m);
        if kind == NatKind::SymmetricSequential {
            // A new mapping on the next port; a packet in flight while the
            // table is flushed may cost one more (its entry is made, then
            // flushed too), never a jump.
            let ports: Vec<u16> = sources.iter().map(|s| s.port()).collect();
            assert!(
                (2..=3).contains(&sources.len())
                    && ports
                        .iter()
                        .enumerate()
                        .all(|(i, p)| *p == m.port() + i as u16),
                "{kind:?}: {sources:?}"
            );
        } else {
            assert_eq!(sources.len(), 1, "{kind:?}: the port is kept: {sources:?}");
        }
        // Now forget again with the host silent: the old mapping is gone.
        site.router().flush_mappings().unwrap();
        assert_eq!(
            arrives(&obs.a, after, &sock, "after the flush"),
            None,
            "{kind:?}"
        );
        if kind == NatKind::FullCone {
            assert_eq!(arrives(&obs.d, after, &sock, "open after"), None);
        }
        let again = observed(&sock, &obs.a, "again");
        assert_eq!(arrives(&obs.a, again, &sock, "reply"), Some(addr(&obs.a)));
    }
}

/// A site's public address changes while a host's socket is in use: the
/// old address is dead, the host's next packet shows the new one (same port
/// for masquerade and the full cone), and replies to it get through.
#[test]
fn a_public_address_changes_under_a_running_socket() {
    let _g = serial();
    let Some(lab) = lab_or_skip("new_address") else {
        return;
    };
    let obs = Observer::new(&lab);
    for (name, kind) in [
        ("napr", NatKind::PortRestricted),
        ("nafc", NatKind::FullCone),
        ("nano", NatKind::None),
    ] {
        let mut site = lab.site(name, kind, SiteOpts::default()).unwrap();
        let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
        let old = site.public_ip();
        let m = observed(&sock, &obs.a, "before");
        assert_eq!(m, v4(old, 40000));
        let new = lab.change_public_ip(&mut site).unwrap();
        assert_ne!(new, old);
        assert_eq!(site.public_ip(), new);
        // Nobody answers to the old address any more.
        assert_eq!(
            arrives(&obs.a, m, &sock, "to the old address"),
            None,
            "{kind:?}"
        );
        let m2 = observed(&sock, &obs.a, "after");
        assert_eq!(m2, v4(new, 40000), "{kind:?}");
        assert_eq!(arrives(&obs.a, m2, &sock, "reply"), Some(addr(&obs.a)));
        if kind != NatKind::PortRestricted {
            assert_eq!(arrives(&obs.d, m2, &sock, "open"), Some(addr(&obs.d)));
        }
    }
}

/// The threads of this process named `wire-…`.
fn wire_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("wire-"))
        .count()
}

#[test]
fn dropping_a_shaped_lab_stops_its_wires_also_on_panic() {
    let _g = serial();
    if lab_or_skip("drop_shaped").is_none() {
        return;
    }
    let before = wire_threads();
    let names = Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new().unwrap();
        let _obs = Observer::shaped(&lab, Shaping::delay(Duration::from_millis(5)));
        let cg = lab
            .cgnat(
                "cg",
                NatKind::PortRestricted,
                SiteOpts::shaped(Shaping::loss(0.01)),
            )
            .unwrap();
        let _s = lab
            .site_behind(
                &cg,
                "home",
                NatKind::FullCone,
                SiteOpts {
                    delay: Some(Duration::from_millis(1)),
                    ..SiteOpts::default()
                },
            )
            .unwrap();
        assert_eq!(wire_threads(), before + 6);
        *names.lock().unwrap() = lab.namespaces();
        panic!("a failing lab test");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 5, "{names:?}");
    assert_gone(&names);
    assert_eq!(wire_threads(), before);
}
