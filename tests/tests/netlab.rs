//! The NAT lab itself: every `NatKind` behaves as RFC 4787 defines it, shown
//! with plain UDP between a host behind the NAT and an observer on a public
//! host with two addresses, which sees the public ip:port of each packet.
//!
//! Needs root, `ip` and `nft`: skipped with a printed reason otherwise,
//! failed when CI=true.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Mutex;
use std::time::Duration;

use peermesh_tests::netlab::{lab_or_skip, Lab, NatKind, PublicHost, SiteOpts};

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
        let host = lab.public_host_with_two_addrs("obs").unwrap();
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
    let obs = Observer::new(&lab);
    let opts = SiteOpts {
        delay: Some(Duration::from_millis(60)),
        ..SiteOpts::default()
    };
    let site = match lab.site("slow", NatKind::PortRestricted, opts) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains("netem"), "{msg}");
            eprintln!("skipping the delay check: {msg}");
            return;
        }
    };
    let sock = site.host.udp_bind("0.0.0.0:40000").unwrap();
    let start = std::time::Instant::now();
    let m = observed(&sock, &obs.a, "ping");
    obs.a.send_to(b"pong", m).unwrap();
    assert!(recv(&sock, LOUD).is_some());
    assert!(
        start.elapsed() >= Duration::from_millis(120),
        "{:?}",
        start.elapsed()
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
