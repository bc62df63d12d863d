use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::*;

const MS: Duration = Duration::from_millis(1);

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// A server with a public address, and one host behind a NAT with `cfg`.
fn world(seed: u64, cfg: NatConfig) -> (Sim, HostId, HostId, NatId) {
    let mut sim = Sim::new(seed);
    let server = sim.add_public_host(ip(198, 51, 100, 1), LinkConfig::new(5 * MS));
    let nat = sim.add_nat(ip(203, 0, 113, 10), cfg, LinkConfig::new(10 * MS));
    let host = sim.add_private_host(nat, ip(192, 168, 1, 10), LinkConfig::new(MS));
    (sim, server, host, nat)
}

fn drain(sim: &mut Sim, h: HostId) -> Vec<Datagram> {
    std::iter::from_fn(|| sim.recv(h)).collect()
}

/// Public source ports the server saw from the host after it sent to each server port.
fn observed_ports(cfg: NatConfig, server_ports: &[u16]) -> Vec<u16> {
    let (mut sim, server, host, _) = world(1, cfg);
    let server_ip = sim.host_ip(server);
    for &p in server_ports {
        sim.send(host, 40000, sa(server_ip, p), b"x".to_vec());
        sim.advance(50 * MS);
    }
    drain(&mut sim, server)
        .iter()
        .map(|d| d.from.port())
        .collect()
}

#[test]
fn endpoint_independent_mapping_preserves_port() {
    let ports = observed_ports(NatConfig::port_restricted(), &[3478, 3479, 3480]);
    assert_eq!(ports, vec![40000, 40000, 40000]);
}

#[test]
fn without_preservation_the_port_changes_but_stays_the_same_for_all_destinations() {
    let ports = observed_ports(
        NatConfig::port_restricted().port_preservation(false),
        &[3478, 3479],
    );
    assert_ne!(ports[0], 40000);
    assert_eq!(ports[0], ports[1]);
}

#[test]
fn sequential_symmetric_nat_steps_by_its_stride() {
    let ports = observed_ports(
        NatConfig::symmetric_sequential(3),
        &[3478, 3479, 3480, 3478],
    );
    assert_eq!(ports.len(), 4);
    assert_eq!(ports[1].wrapping_sub(ports[0]), 3);
    assert_eq!(ports[2].wrapping_sub(ports[1]), 3);
    assert_eq!(ports[3], ports[0], "same destination reuses its mapping");
}

#[test]
fn random_symmetric_nat_gives_unrelated_ports() {
    let ports = observed_ports(NatConfig::symmetric_random(), &[3478, 3479, 3480]);
    let d1 = i32::from(ports[1]) - i32::from(ports[0]);
    let d2 = i32::from(ports[2]) - i32::from(ports[1]);
    assert!(d1 != d2 || d1.abs() > 64, "{ports:?}");
}

/// Outcome of a packet to the host's mapped port from a third host.
fn inbound_passes(filtering: NatFiltering, from_same_ip_other_port: bool, exact: bool) -> bool {
    let (mut sim, server, host, nat) = world(2, NatConfig::port_restricted().filtering(filtering));
    let other = sim.add_public_host(ip(198, 51, 100, 2), LinkConfig::new(5 * MS));
    let server_ip = sim.host_ip(server);
    sim.send(host, 40000, sa(server_ip, 3478), b"open".to_vec());
    sim.advance(50 * MS);
    let public = sa(sim.nat_public_ip(nat), 40000);
    if exact {
        sim.send(server, 3478, public, b"reply".to_vec());
    } else if from_same_ip_other_port {
        sim.send(server, 9999, public, b"reply".to_vec());
    } else {
        sim.send(other, 3478, public, b"reply".to_vec());
    }
    sim.advance(50 * MS);
    drain(&mut sim, host).iter().any(|d| d.payload == b"reply")
}

#[test]
fn filtering_kinds_behave_as_rfc_4787_says() {
    use NatFiltering::*;
    for f in [
        EndpointIndependent,
        AddressDependent,
        AddressAndPortDependent,
    ] {
        assert!(inbound_passes(f, false, true), "{f:?}: exact reply");
    }
    assert!(inbound_passes(EndpointIndependent, false, false));
    assert!(inbound_passes(AddressDependent, true, false));
    assert!(!inbound_passes(AddressDependent, false, false));
    assert!(!inbound_passes(AddressAndPortDependent, true, false));
    assert!(!inbound_passes(AddressAndPortDependent, false, false));
}

#[test]
fn mappings_expire_when_idle() {
    let cfg = NatConfig::full_cone().mapping_timeout(Duration::from_secs(2));
    let (mut sim, server, host, nat) = world(3, cfg);
    let server_ip = sim.host_ip(server);
    sim.send(host, 40000, sa(server_ip, 3478), b"open".to_vec());
    sim.advance(100 * MS);
    assert_eq!(sim.nat_mappings(nat).len(), 1);
    sim.advance(Duration::from_secs(3));
    assert!(sim.nat_mappings(nat).is_empty());
    let public = sa(sim.nat_public_ip(nat), 40000);
    sim.send(server, 3478, public, b"late".to_vec());
    sim.advance(100 * MS);
    assert!(drain(&mut sim, host).iter().all(|d| d.payload != b"late"));
}

#[test]
fn router_without_wan_firewall_lets_an_early_packet_steal_the_port() {
    for wan_firewall in [true, false] {
        let cfg = NatConfig::port_restricted().wan_firewall(wan_firewall);
        let (mut sim, server, host, nat) = world(4, cfg);
        let peer = sim.add_public_host(ip(198, 51, 100, 7), LinkConfig::new(5 * MS));
        let server_ip = sim.host_ip(server);
        sim.send(host, 40000, sa(server_ip, 3478), b"register".to_vec());
        sim.advance(50 * MS);
        let public = sa(sim.nat_public_ip(nat), 40000);
        // The peer's punch arrives before the host has sent anything to it.
        sim.send(peer, 5000, public, b"early".to_vec());
        sim.advance(50 * MS);
        sim.send(host, 40000, sa(sim.host_ip(peer), 5000), b"punch".to_vec());
        sim.advance(50 * MS);
        let seen = drain(&mut sim, peer);
        assert_eq!(seen.len(), 1);
        let stolen = seen[0].from.port() != 40000;
        assert_eq!(stolen, !wan_firewall, "wan_firewall={wan_firewall}");
        assert_eq!(sim.stats().port_steals, u64::from(!wan_firewall));
    }
}

#[test]
fn low_ttl_packet_opens_own_nat_but_never_arrives() {
    let (mut sim, server, host, nat) = world(5, NatConfig::port_restricted());
    let server_ip = sim.host_ip(server);
    sim.send_with_ttl(host, 40000, sa(server_ip, 3478), b"null".to_vec(), 2);
    sim.advance(100 * MS);
    assert!(drain(&mut sim, server).is_empty());
    assert_eq!(sim.stats().ttl_expired, 1);
    assert_eq!(sim.nat_mappings(nat).len(), 1);
    // The opened mapping already admits the destination's packets.
    sim.send(
        server,
        3478,
        sa(sim.nat_public_ip(nat), 40000),
        b"in".to_vec(),
    );
    sim.advance(100 * MS);
    assert_eq!(drain(&mut sim, host).len(), 1);
    // TTL 1 dies in the router itself and opens nothing.
    sim.send_with_ttl(host, 40001, sa(server_ip, 3478), b"null".to_vec(), 1);
    sim.advance(100 * MS);
    assert_eq!(sim.nat_mappings(nat).len(), 1);
}

#[test]
fn latency_adds_up_over_the_links_crossed() {
    let (mut sim, server, host, _) = world(6, NatConfig::full_cone());
    let t0 = sim.now();
    let server_ip = sim.host_ip(server);
    sim.send(host, 40000, sa(server_ip, 3478), b"x".to_vec());
    sim.advance(Duration::from_secs(1));
    let d = sim.recv(server).unwrap();
    assert_eq!(d.at - t0, 16 * MS); // LAN 1 + WAN 10 + server 5
}

#[test]
fn same_seed_same_history() {
    let run = |seed| {
        let mut sim = Sim::new(seed);
        let a = sim.add_public_host(
            ip(198, 51, 100, 1),
            LinkConfig::new(5 * MS).loss(0.3).jitter(5 * MS),
        );
        let nat = sim.add_nat(
            ip(203, 0, 113, 10),
            NatConfig::symmetric_random(),
            LinkConfig::new(10 * MS),
        );
        let b = sim.add_private_host(nat, ip(10, 0, 0, 2), LinkConfig::new(MS));
        for i in 0..200u16 {
            sim.send(
                b,
                40000,
                sa(sim.host_ip(a), 1000 + i),
                i.to_be_bytes().to_vec(),
            );
        }
        sim.advance(Duration::from_secs(1));
        let got: Vec<_> = drain(&mut sim, a)
            .into_iter()
            .map(|d| (d.from, d.to, d.at - sim.now()))
            .collect();
        (got, sim.stats().clone())
    };
    assert_eq!(run(9), run(9));
    assert_ne!(run(9), run(10));
    let (got, stats) = run(9);
    assert!(stats.lost > 20 && got.len() > 100, "{stats:?}");
}
