//! The state machine alone, driven by hand.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::hole_punch::*;
use crate::port_prediction::{classify_mapping, PortPrediction};
use peermesh_base::NatMapping;
use peermesh_netsim::SimRng;

const MS: Duration = Duration::from_millis(1);

fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, last)), port)
}

fn instruction(start_at: Instant) -> Instruction {
    Instruction {
        attempt_id: 7,
        role: Role::Initiator,
        start_at,
        peer_candidates: vec![addr(20, 40000)],
        prediction: None,
        local_sockets: 1,
    }
}

fn drain(m: &mut HolePunch) -> Vec<Action> {
    std::iter::from_fn(|| m.poll_action()).collect()
}

/// Runs with no answers at all, returning every action with its time.
fn run_unanswered(cfg: Config, ins: Instruction, t0: Instant) -> Vec<(Instant, Action)> {
    let mut rng = SimRng::seed_from_u64(1);
    let mut m = HolePunch::new(cfg);
    let mut out = Vec::new();
    m.handle(t0, Event::Instruction(ins), &mut rng);
    let mut now = t0;
    for _ in 0..100_000 {
        out.extend(drain(&mut m).into_iter().map(|a| (now, a)));
        let Some(t) = m.poll_timeout() else { break };
        assert!(t >= now, "timeouts move forward");
        now = t;
        m.handle(now, Event::Timeout, &mut rng);
    }
    assert_eq!(m.poll_timeout(), None);
    out
}

#[test]
fn hole_punch_wire_roundtrip() {
    for kind in [ProbeKind::Probe, ProbeKind::Ack] {
        let m = ProbeMessage {
            kind,
            attempt_id: 0x0102_0304_0506_0708,
            nonce: u64::MAX - 3,
        };
        assert_eq!(ProbeMessage::decode(&m.encode()), Some(m));
    }
    assert_eq!(ProbeMessage::decode(b"PMHP"), None);
    assert_eq!(ProbeMessage::decode(&[0; ProbeMessage::LEN]), None);
}

#[test]
fn hole_punch_classifies_two_observations() {
    let c = |ports: &[u16]| {
        let obs: Vec<_> = ports.iter().map(|&p| addr(10, p)).collect();
        classify_mapping(&obs)
    };
    assert_eq!(c(&[40000, 40000]), NatMapping::EndpointIndependent);
    assert_eq!(c(&[5000, 5002]), NatMapping::Sequential { stride: 2 });
    assert_eq!(c(&[5000, 4999]), NatMapping::Sequential { stride: -1 });
    assert_eq!(c(&[5000, 31_337]), NatMapping::Random);
    let p = PortPrediction::Sequential {
        ip: addr(10, 0).ip(),
        last_port: 5002,
        stride: 2,
        window: 3,
    };
    assert_eq!(
        p.targets(),
        vec![addr(10, 5004), addr(10, 5006), addr(10, 5008)]
    );
}

#[test]
fn hole_punch_opens_own_nat_before_probing_and_succeeds_on_ack() {
    let t0 = Instant::now();
    let start = t0 + 50 * MS;
    let mut rng = SimRng::seed_from_u64(3);
    let mut m = HolePunch::new(Config::default());
    m.handle(t0, Event::Instruction(instruction(start)), &mut rng);
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.poll_timeout(), Some(start));
    m.handle(start, Event::Timeout, &mut rng);
    let opening = drain(&mut m);
    assert!(
        matches!(opening[..], [Action::SendProbe { ttl: Some(2), .. }]),
        "{opening:?}"
    );
    let probe_at = start + Config::default().open_delay;
    assert_eq!(m.poll_timeout(), Some(probe_at));
    m.handle(probe_at, Event::Timeout, &mut rng);
    let Some(Action::SendProbe {
        to,
        nonce,
        ttl: None,
        socket: 0,
        ..
    }) = m.poll_action()
    else {
        panic!("expected a full probe")
    };
    // An ack for another attempt or nonce does nothing.
    let ack = |attempt_id, nonce| Event::ProbeAckReceived {
        socket: 0,
        from: to,
        attempt_id,
        nonce,
    };
    m.handle(probe_at + 10 * MS, ack(8, nonce), &mut rng);
    m.handle(probe_at + 10 * MS, ack(7, nonce ^ 1), &mut rng);
    assert!(drain(&mut m).is_empty());
    // The answered pair is nominated; the answer to the nomination finishes.
    m.handle(probe_at + 30 * MS, ack(7, nonce), &mut rng);
    let Some(Action::SendProbe {
        to: nominated,
        nonce,
        nominate: true,
        ..
    }) = m.poll_action()
    else {
        panic!("expected a nomination")
    };
    assert_eq!(nominated, to);
    m.handle(probe_at + 60 * MS, ack(7, nonce), &mut rng);
    assert_eq!(
        drain(&mut m),
        vec![Action::Succeeded {
            remote: to,
            socket: 0,
            rtt: Some(30 * MS)
        }]
    );
    // Connected: answers the peer's probes, sends nothing of its own.
    assert_eq!(m.poll_timeout(), None);
    m.handle(
        probe_at + 40 * MS,
        Event::ProbeReceived {
            socket: 0,
            from: to,
            attempt_id: 7,
            nonce: 99,
            nominate: false,
        },
        &mut rng,
    );
    assert_eq!(
        drain(&mut m),
        vec![Action::SendProbeAck {
            socket: 0,
            to,
            attempt_id: 7,
            nonce: 99
        }]
    );
    assert_eq!(m.counters().probes_sent, 2);
}

#[test]
fn hole_punch_probe_from_unknown_address_gets_ack_and_triggered_probe() {
    let t0 = Instant::now();
    let mut rng = SimRng::seed_from_u64(4);
    let mut m = HolePunch::new(Config::default());
    m.handle(t0, Event::Instruction(instruction(t0)), &mut rng);
    drain(&mut m);
    let stranger = addr(20, 61_000);
    m.handle(
        t0 + MS,
        Event::ProbeReceived {
            socket: 0,
            from: stranger,
            attempt_id: 7,
            nonce: 5,
            nominate: false,
        },
        &mut rng,
    );
    let acts = drain(&mut m);
    assert!(matches!(acts[0], Action::SendProbeAck { to, nonce: 5, .. } if to == stranger));
    assert!(matches!(acts[1], Action::SendProbe { to, ttl: None, .. } if to == stranger));
    // A probe for another attempt is ignored entirely.
    m.handle(
        t0 + 2 * MS,
        Event::ProbeReceived {
            socket: 0,
            from: stranger,
            attempt_id: 8,
            nonce: 6,
            nominate: false,
        },
        &mut rng,
    );
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.counters().ignored, 1);
}

#[test]
fn hole_punch_responder_takes_the_nominated_pair() {
    let t0 = Instant::now();
    let mut rng = SimRng::seed_from_u64(6);
    let mut m = HolePunch::new(Config::default());
    let mut ins = instruction(t0);
    ins.role = Role::Responder;
    m.handle(t0, Event::Instruction(ins), &mut rng);
    drain(&mut m);
    let probe = |from, nominate| Event::ProbeReceived {
        socket: 0,
        from,
        attempt_id: 7,
        nonce: 1,
        nominate,
    };
    m.handle(t0 + MS, probe(addr(20, 40001), false), &mut rng);
    m.handle(t0 + 2 * MS, probe(addr(20, 40002), true), &mut rng);
    let acts = drain(&mut m);
    assert!(acts.contains(&Action::Succeeded {
        remote: addr(20, 40002),
        socket: 0,
        rtt: None
    }));
    assert_eq!(
        m.phase(),
        Phase::Connected {
            remote: addr(20, 40002),
            socket: 0
        }
    );
}

#[test]
fn hole_punch_rate_and_budget_are_bounded_and_it_gives_up() {
    let cfg = Config {
        max_packets_per_second: 400,
        burst: 40,
        max_packets_per_attempt: 900,
        attempt_timeout: Duration::from_secs(10),
        ..Config::default()
    };
    let t0 = Instant::now();
    let mut ins = instruction(t0 + 10 * MS);
    ins.local_sockets = 16;
    ins.prediction = Some(PortPrediction::Random {
        ip: addr(20, 0).ip(),
        probes: 5000,
    });
    let acts = run_unanswered(cfg.clone(), ins, t0);
    let sends: Vec<Instant> = acts
        .iter()
        .filter(|(_, a)| a.datagram().is_some())
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(sends.len(), 900, "the whole budget, not more");
    for (i, &t) in sends.iter().enumerate() {
        let in_window = sends[i..]
            .iter()
            .take_while(|&&u| u < t + Duration::from_secs(1))
            .count();
        assert!(in_window <= 400 + 40, "{in_window} packets in one second");
    }
    assert!(acts
        .iter()
        .any(|(_, a)| matches!(a, Action::OpenSockets { count: 16 })));
    let opening = acts
        .iter()
        .filter(|(_, a)| matches!(a, Action::SendProbe { ttl: Some(_), .. }))
        .count();
    assert_eq!(opening, 16, "socket 0 to the candidate, 15 extra sockets");
    let tail: Vec<&Action> = acts.iter().rev().take(2).map(|(_, a)| a).collect();
    assert!(matches!(
        tail[1],
        Action::Failed {
            reason: FailReason::BudgetExhausted
        }
    ));
    assert!(matches!(tail[0], Action::RequestRetry { after } if *after >= cfg.retry_backoff));
    let (failed_at, _) = acts.iter().rev().nth(1).expect("failed");
    assert!(*failed_at <= *sends.last().unwrap() + cfg.budget_grace);
}

#[test]
fn hole_punch_times_out_and_backs_off_until_max_attempts() {
    let cfg = Config::default();
    let mut rng = SimRng::seed_from_u64(5);
    let mut m = HolePunch::new(cfg.clone());
    let mut now = Instant::now();
    let mut retries = Vec::new();
    for attempt in 0..cfg.max_attempts {
        let mut ins = instruction(now);
        ins.attempt_id = u64::from(attempt) + 100;
        m.handle(now, Event::Instruction(ins), &mut rng);
        while let Some(t) = m.poll_timeout() {
            now = t;
            m.handle(now, Event::Timeout, &mut rng);
        }
        let acts = drain(&mut m);
        assert!(acts.contains(&Action::Failed {
            reason: FailReason::Timeout
        }));
        retries.extend(acts.iter().filter_map(|a| match a {
            Action::RequestRetry { after } => Some(*after),
            _ => None,
        }));
        let c = m.counters();
        assert!(
            c.packets_this_attempt < 20,
            "one target: a handful of probes"
        );
    }
    assert_eq!(
        retries.len() as u32,
        cfg.max_attempts - 1,
        "no retry after the last"
    );
    assert!(
        retries.windows(2).all(|w| w[1] > w[0]),
        "backoff grows: {retries:?}"
    );
}
