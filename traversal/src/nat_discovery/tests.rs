//! Discovery against every simulated NAT type, with loss and with mappings
//! that time out, on a virtual clock.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::stun::{self, Message, Response};

use super::*;
use peermesh_netsim::{HostId, LinkConfig, MappingBehavior, NatConfig, Sim};

const MS: Duration = Duration::from_millis(1);
const PRIMARY: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
const ALT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2));
const PORTS: [u16; 2] = [3478, 3479];
const LOCAL_PORT: u16 = 40000;

struct World {
    sim: Sim,
    servers: [HostId; 2],
    client: HostId,
}

/// The control server's STUN side, as `control-server/src/stun.rs` answers.
fn serve(w: &mut World) {
    for (i, &h) in w.servers.clone().iter().enumerate() {
        while let Some(dg) = w.sim.recv(h) {
            let Ok(Message::Request(req)) = stun::decode(&dg.payload) else {
                continue;
            };
            let host = if req.change_ip { 1 - i } else { i };
            let port_i = PORTS.iter().position(|p| *p == dg.to.port()).unwrap();
            let port = PORTS[if req.change_port { 1 - port_i } else { port_i }];
            let ip = [PRIMARY, ALT][host];
            let other_port = PORTS[1 - port_i];
            let resp = Response {
                txid: req.txid,
                mapped: dg.from,
                origin: Some(SocketAddr::new(ip, port)),
                other: Some(SocketAddr::new([PRIMARY, ALT][1 - i], other_port)),
            };
            w.sim.send(w.servers[host], port, dg.from, resp.encode());
        }
    }
}

fn world(seed: u64, nat: Option<NatConfig>, loss: f64) -> World {
    let mut sim = Sim::new(seed);
    let link = LinkConfig::new(5 * MS).loss(loss);
    let servers = [
        sim.add_public_host(PRIMARY, link.clone()),
        sim.add_public_host(ALT, link.clone()),
    ];
    let client = match nat {
        Some(cfg) => {
            let n = sim.add_nat(
                IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
                cfg,
                LinkConfig::new(10 * MS).loss(loss),
            );
            sim.add_private_host(
                n,
                IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
                LinkConfig::new(MS),
            )
        }
        None => sim.add_public_host(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 20)), link),
    };
    World {
        sim,
        servers,
        client,
    }
}

fn discover(w: &mut World) -> (NatBehavior, Duration) {
    let local = SocketAddr::new(w.sim.host_ip(w.client), LOCAL_PORT);
    let start = w.sim.now();
    let mut d = Discovery::new(SocketAddr::new(PRIMARY, PORTS[0]), Some(local), start);
    loop {
        let now = w.sim.now();
        d.handle_timeout(now);
        while let Some((to, bytes)) = d.poll_transmit(now) {
            w.sim.send(w.client, LOCAL_PORT, to, bytes);
        }
        if let Some(r) = d.result() {
            return (r.clone(), now - start);
        }
        let next = [d.poll_timeout(), w.sim.next_event_time()]
            .into_iter()
            .flatten()
            .min()
            .expect("something to wait for");
        w.sim.run_until(next);
        serve(w);
        let now = w.sim.now();
        while let Some(dg) = w.sim.recv(w.client) {
            d.handle_datagram(dg.from, &dg.payload, now);
        }
        assert!(
            now - start < Duration::from_secs(30),
            "discovery never ended"
        );
    }
}

fn expect(nat: Option<NatConfig>) -> (Option<NatMapping>, Option<NatFiltering>) {
    use MappingBehavior as M;
    let Some(cfg) = nat else {
        return (
            Some(NatMapping::EndpointIndependent),
            Some(NatFiltering::EndpointIndependent),
        );
    };
    let mapping = match cfg.mapping {
        M::EndpointIndependent => NatMapping::EndpointIndependent,
        M::EndpointDependent { stride } => NatMapping::Sequential {
            stride: i32::from(stride),
        },
        M::EndpointDependentRandom => NatMapping::Random,
    };
    (Some(mapping), Some(cfg.filtering))
}

fn every_nat() -> Vec<(&'static str, Option<NatConfig>)> {
    let mut v = vec![("none", None)];
    for fw in [true, false] {
        v.extend([
            ("full cone", Some(NatConfig::full_cone().wan_firewall(fw))),
            (
                "address-restricted",
                Some(NatConfig::address_restricted().wan_firewall(fw)),
            ),
            (
                "port-restricted",
                Some(NatConfig::port_restricted().wan_firewall(fw)),
            ),
            (
                "sequential stride 1",
                Some(NatConfig::symmetric_sequential(1).wan_firewall(fw)),
            ),
            (
                "sequential stride 2",
                Some(NatConfig::symmetric_sequential(2).wan_firewall(fw)),
            ),
            (
                "sequential stride 7",
                Some(NatConfig::symmetric_sequential(7).wan_firewall(fw)),
            ),
            (
                "sequential stride 1000",
                Some(NatConfig::symmetric_sequential(1000).wan_firewall(fw)),
            ),
            (
                "random",
                Some(NatConfig::symmetric_random().wan_firewall(fw)),
            ),
        ]);
    }
    v
}

#[test]
fn every_nat_type_is_recognised_without_loss() {
    for (name, nat) in every_nat() {
        for seed in 0..5 {
            let mut w = world(seed, nat.clone(), 0.0);
            let (got, took) = discover(&mut w);
            let (mapping, filtering) = expect(nat.clone());
            assert!(got.udp, "{name}: UDP works");
            assert_eq!(
                (got.mapping, got.filtering),
                (mapping, filtering),
                "{name} seed {seed}: {got:?}"
            );
            assert_eq!(got.no_nat, nat.is_none(), "{name}");
            // Nothing lost: only the filtering probes that the NAT drops wait.
            assert!(took < Duration::from_secs(3), "{name}: took {took:?}");
        }
    }
}

#[test]
fn loss_costs_retries_not_the_answer() {
    // 10% loss on every link: each test has five tries, so a wrong answer
    // needs five losses in a row on the same test; over 40 seeds a few
    // filtering answers may still be read as "stricter", never as laxer.
    let mut exact = 0;
    let mut total = 0;
    for (name, nat) in every_nat() {
        for seed in 0..40 {
            let mut w = world(1000 + seed, nat.clone(), 0.10);
            let (got, _) = discover(&mut w);
            let (mapping, filtering) = expect(nat.clone());
            total += 1;
            if (got.mapping, got.filtering) == (mapping, filtering) {
                exact += 1;
                continue;
            }
            assert!(got.udp || got.mapping.is_none(), "{name}: {got:?}");
            // A lost answer can only make filtering look stricter.
            let rank = |f: Option<NatFiltering>| match f {
                Some(NatFiltering::EndpointIndependent) => 0,
                Some(NatFiltering::AddressDependent) => 1,
                Some(NatFiltering::AddressAndPortDependent) => 2,
                None => 3,
            };
            assert!(
                rank(got.filtering) >= rank(filtering),
                "{name} seed {seed}: {got:?}"
            );
        }
    }
    assert!(
        exact * 100 >= total * 95,
        "only {exact} of {total} exact under 10% loss"
    );
}

#[test]
fn a_sequential_nat_with_port_churn_is_still_sequential() {
    // Other hosts behind the router take ports between ours now and then.
    let mut seen = 0;
    for seed in 0..20 {
        let mut cfg = NatConfig::symmetric_sequential(1);
        cfg.port_churn = 0.3;
        let mut w = world(500 + seed, Some(cfg), 0.0);
        let (got, _) = discover(&mut w);
        match got.mapping {
            Some(NatMapping::Sequential { stride }) => {
                assert!(stride >= 1, "{got:?}");
                seen += usize::from(stride == 1);
            }
            other => panic!("seed {seed}: {other:?} ({got:?})"),
        }
    }
    assert!(
        seen >= 10,
        "the stride itself is found most of the time ({seen}/20)"
    );
}

#[test]
fn the_mapping_alone_is_known_in_a_few_round_trips() {
    for (name, nat) in every_nat() {
        let mut w = world(9, nat.clone(), 0.0);
        let local = SocketAddr::new(w.sim.host_ip(w.client), LOCAL_PORT);
        let start = w.sim.now();
        let mut d = Discovery::mapping_only(SocketAddr::new(PRIMARY, PORTS[0]), Some(local), start);
        let got = loop {
            let now = w.sim.now();
            d.handle_timeout(now);
            while let Some((to, bytes)) = d.poll_transmit(now) {
                w.sim.send(w.client, LOCAL_PORT, to, bytes);
            }
            if let Some(r) = d.result() {
                break r.clone();
            }
            let next = [d.poll_timeout(), w.sim.next_event_time()]
                .into_iter()
                .flatten()
                .min()
                .unwrap();
            w.sim.run_until(next);
            serve(&mut w);
            let now = w.sim.now();
            while let Some(dg) = w.sim.recv(w.client) {
                d.handle_datagram(dg.from, &dg.payload, now);
            }
        };
        let took = w.sim.now() - start;
        assert_eq!(got.mapping, expect(nat).0, "{name}");
        assert_eq!(got.filtering, None, "{name}");
        // Four request/answer exchanges of ~32 ms each, no retry waits.
        assert!(took < Duration::from_millis(200), "{name}: {took:?}");
    }
}

#[test]
fn blocked_udp_is_reported_after_the_retries() {
    let mut w = world(7, Some(NatConfig::port_restricted()), 1.0);
    let (got, took) = discover(&mut w);
    assert!(!got.udp);
    assert_eq!((got.mapping, got.filtering, got.public), (None, None, None));
    assert_eq!(took, RETRY * TRIES);
}

#[test]
fn short_mapping_timeouts_do_not_confuse_the_stride() {
    // Mappings that expire between tests (1 s) must not change the verdict
    // of a sequential NAT: each test opens a mapping to a new destination.
    for stride in [1u16, 3] {
        let cfg = NatConfig::symmetric_sequential(stride).mapping_timeout(Duration::from_secs(1));
        let mut w = world(3, Some(cfg), 0.0);
        let (got, _) = discover(&mut w);
        assert_eq!(
            got.mapping,
            Some(NatMapping::Sequential {
                stride: i32::from(stride)
            })
        );
    }
}

#[test]
fn stray_and_malformed_datagrams_are_ignored() {
    let t0 = Instant::now();
    let mut d = Discovery::new(SocketAddr::new(PRIMARY, PORTS[0]), None, t0);
    let (_, req) = d.poll_transmit(t0).unwrap();
    let Ok(Message::Request(req)) = stun::decode(&req) else {
        panic!()
    };
    let from = SocketAddr::new(PRIMARY, PORTS[0]);
    d.handle_datagram(from, b"garbage", t0);
    let mut other_tx = req.txid;
    other_tx[0] ^= 1;
    let stray = Response {
        txid: other_tx,
        mapped: "203.0.113.10:1".parse().unwrap(),
        origin: None,
        other: None,
    };
    d.handle_datagram(from, &stray.encode(), t0);
    assert_eq!(d.ignored, 2);
    assert!(d.result().is_none());
}
