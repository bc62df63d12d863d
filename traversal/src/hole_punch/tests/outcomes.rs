//! Both sides on `netsim` across every pair of NAT types.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::harness::*;
use crate::hole_punch::{Config, FailReason};

/// Pairs that must reach a direct path; the rest must not.
fn expect_direct(a: Kind, b: Kind) -> bool {
    use Kind::*;
    !matches!(
        (a, b),
        (SymRandom, SymRandom) | (SymRandom, SymSeq) | (SymSeq, SymRandom)
    )
}

const TABLE_SEEDS: u64 = 12;

#[test]
fn hole_punch_outcome_table() {
    let sites = Site::all();
    let mut pairs = Vec::new();
    for i in 0..sites.len() {
        for j in i..sites.len() {
            pairs.push((sites[i], sites[j]));
        }
    }
    let sc = Scenario::default();
    let results: Mutex<Vec<Option<Summary>>> = Mutex::new((0..pairs.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(a, b)) = pairs.get(k) else { break };
                let sum = Summary::of(&sweep(a, b, 0..TABLE_SEEDS, &sc));
                results.lock().unwrap()[k] = Some(sum);
            });
        }
    });
    let results: Vec<Summary> = results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect();

    println!(
        "\nhole punch outcomes, {TABLE_SEEDS} seeds per pair, loss {}% per WAN link, mapping timeout {:?} \
         (* = router without WAN firewall)",
        sc.loss * 100.0,
        sc.mapping_timeout
    );
    println!(
        "{:<8} {:<8} {:>7} {:>12} {:>10} {:>14} {:>7}",
        "A", "B", "direct", "median pkts", "median ttd", "max pkts/side", "steals"
    );
    let mut wrong = Vec::new();
    for (&(a, b), s) in pairs.iter().zip(&results) {
        let ttd = s
            .median_ttd
            .map_or("-".to_string(), |d| format!("{}ms", d.as_millis()));
        println!(
            "{:<8} {:<8} {:>3}/{:<3} {:>12} {:>10} {:>14} {:>7}",
            a.label(),
            b.label(),
            s.direct,
            s.runs,
            s.median_packets,
            ttd,
            s.max_side_attempt_packets,
            s.port_steals
        );
        let ok = if expect_direct(a.kind, b.kind) {
            s.rate() >= 0.9
        } else {
            s.rate() <= 0.1
        };
        if !ok {
            wrong.push(format!(
                "{} x {}: {}/{}",
                a.label(),
                b.label(),
                s.direct,
                s.runs
            ));
        }
        assert!(s.max_side_attempt_packets <= sc.config.max_packets_per_attempt);
    }
    assert!(wrong.is_empty(), "unexpected outcomes: {wrong:?}");
}

#[test]
fn hole_punch_birthday_random_vs_port_restricted_over_50_seeds() {
    let sc = Scenario::default();
    for fw in [true, false] {
        let rand = Site::new(Kind::SymRandom, fw);
        let port = Site::new(Kind::PortRestricted, fw);
        let runs = sweep(rand, port, 100..150, &sc);
        let s = Summary::of(&runs);
        println!(
            "birthday {} x {}: {}/{} direct, median {} packets, median {:?}",
            rand.label(),
            port.label(),
            s.direct,
            s.runs,
            s.median_packets,
            s.median_ttd
        );
        assert!(s.rate() >= 0.9, "{}/{}", s.direct, s.runs);
        let budget = u64::from(sc.config.max_packets_per_attempt);
        assert!(runs.iter().all(|r| r.packets <= 2 * budget));
        // Stops as soon as one pair answers: far below the budget on average.
        assert!(s.median_packets < budget, "{}", s.median_packets);
    }
}

#[test]
fn hole_punch_random_vs_random_gives_up_within_bounds() {
    let sc = Scenario::default();
    let cfg = &sc.config;
    for fw in [true, false] {
        let site = Site::new(Kind::SymRandom, fw);
        for r in sweep(site, site, 200..206, &sc) {
            assert!(!r.direct);
            assert!(r.max_side_attempt_packets <= cfg.max_packets_per_attempt);
            for (i, end) in r.ended_after_start.iter().enumerate() {
                let end = end.expect("each side gives up");
                assert!(
                    end <= cfg.attempt_timeout,
                    "side {i} ended {end:?} after start"
                );
            }
            assert!(r.failures[0].iter().all(Option::is_some));
            assert_eq!(r.retry_requested, [true, true]);
        }
    }
}

#[test]
fn hole_punch_router_without_wan_firewall_needs_opening_packets() {
    let naive = Scenario {
        config: Config {
            null_ttl: None,
            ..Config::default()
        },
        ..Scenario::default()
    };
    let rate = |site: Site, sc: &Scenario| Summary::of(&sweep(site, site, 300..310, sc)).rate();
    let harsh = Site::new(Kind::PortRestricted, false);
    let home = Site::new(Kind::PortRestricted, true);
    let (harsh_naive, harsh_opened, home_naive) = (
        rate(harsh, &naive),
        rate(harsh, &Scenario::default()),
        rate(home, &naive),
    );
    println!(
        "port* x port*: {harsh_naive} without opening packets, {harsh_opened} with; \
         port x port without: {home_naive}"
    );
    // Without opening packets the first probe to arrive takes the port.
    assert!(harsh_naive <= 0.1);
    assert_eq!(harsh_opened, 1.0);
    // A WAN firewall forgives the early probe.
    assert_eq!(home_naive, 1.0);
}

#[test]
fn hole_punch_sequential_prediction_covers_port_churn() {
    // Other hosts behind the router take a port before 20% of allocations.
    let sc = Scenario {
        port_churn: 0.2,
        ..Scenario::default()
    };
    let seq = Site::new(Kind::SymSeq, false);
    let port = Site::new(Kind::PortRestricted, false);
    let wide = Summary::of(&sweep(seq, port, 400..440, &sc));
    let narrow_sc = Scenario {
        window: 1,
        ..sc.clone()
    };
    let narrow = Summary::of(&sweep(seq, port, 400..440, &narrow_sc));
    println!(
        "seq* (churn 20%) x port*: window {} {}/{}, window 1 {}/{}",
        sc.window, wide.direct, wide.runs, narrow.direct, narrow.runs
    );
    assert!(wide.rate() >= 0.8);
    assert!(narrow.rate() + 0.1 <= wide.rate());
}

#[test]
fn hole_punch_mapping_expiry_is_recovered_by_retry() {
    let sc = Scenario {
        mapping_timeout: Duration::from_secs(1),
        keepalive: None,
        idle_before_punch: Duration::from_secs(2),
        port_preservation: false,
        max_attempts: 3,
        ..Scenario::default()
    };
    let port = Site::new(Kind::PortRestricted, true);
    for seed in 500..504 {
        let r = run_pair([port, port], seed, &sc);
        assert!(r.direct, "{r:?}");
        assert_eq!(r.attempts, 2, "stale endpoints fail the first attempt");
        assert_eq!(r.failures[0], [Some(FailReason::Timeout); 2]);
    }
    // Port preservation hides the expiry: the new mapping gets the same port.
    let preserving = Scenario {
        port_preservation: true,
        ..sc
    };
    assert_eq!(run_pair([port, port], 500, &preserving).attempts, 1);
}

#[test]
fn hole_punch_runs_are_deterministic() {
    let sc = Scenario::default();
    let pair = [
        Site::new(Kind::SymRandom, false),
        Site::new(Kind::PortRestricted, true),
    ];
    assert_eq!(run_pair(pair, 42, &sc), run_pair(pair, 42, &sc));
}
