//! The data plane on loopback with real processes: a relay, two nodes,
//! relay-first delivery, the DCUtR upgrade to a direct path, and an
//! exactly-once, in-order message stream across the switch and across the
//! loss of the relay.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use peermesh_base::event::{Event, EventKind, PunchMethod, PunchRole};
use peermesh_base::PathKind;
use peermesh_tests::{wait_for, Lab};

const SLOW: Duration = Duration::from_secs(30);

/// The `data` fields of a `meshnode recv --json` output file.
fn received(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["data"].as_str().map(String::from))
        .collect()
}

/// Every message of `prefix-0 … prefix-(n-1)` exactly once and in order.
fn check_stream(got: &[String], prefix: &str, n: usize) -> Result<()> {
    let mine: Vec<&String> = got.iter().filter(|m| m.starts_with(prefix)).collect();
    ensure!(
        mine.len() == n,
        "{} of {n} `{prefix}` messages arrived",
        mine.len()
    );
    for (i, m) in mine.iter().enumerate() {
        ensure!(
            **m == format!("{prefix}-{i}"),
            "message {i} is {m:?}: out of order or duplicated"
        );
    }
    Ok(())
}

#[test]
fn relay_and_direct_exactly_once_and_relay_loss() -> Result<()> {
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let mut relay = lab.relay("r1")?;
    let ta = lab.server.token("g")?;
    let tb = lab.server.token("g")?;
    let a = lab.node("a", Some(&ta), &[])?;
    let b = lab.node("b", Some(&tb), &[])?;
    a.wait_peers(&["b"], SLOW)?;
    b.wait_peers(&["a"], SLOW)?;

    let inbox = lab.dir.path().join("b-inbox.jsonl");
    let mut recv = b.recv(&inbox)?;
    // A numbered stream while the link comes up and switches to direct.
    a.cli(&["send", "b", "--count", "3000", "--prefix", "one"])?;
    wait_for(SLOW, "the first stream to arrive", || {
        (received(&inbox).len() >= 3000).then_some(())
    })?;
    wait_for(SLOW, "a direct path a→b", || {
        (a.path_to("b")? == "direct").then_some(())
    })?;
    wait_for(SLOW, "a direct path b→a", || {
        (b.path_to("a")? == "direct").then_some(())
    })?;
    // The link came up on the relay and directly (the punch goes out at
    // once beside the relay dial, so either may be first).
    let events = a.events();
    let ups: Vec<PathKind> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::PathUp { kind, .. } => Some(kind),
            _ => None,
        })
        .collect();
    assert!(
        matches!(ups.first(), Some(PathKind::Relay | PathKind::Direct)),
        "{events:?}"
    );
    assert!(ups.contains(&PathKind::Direct), "{events:?}");

    // The relay dies; the direct path carries on without loss.
    relay.kill9();
    a.cli(&["send", "b", "--count", "2000", "--prefix", "two"])?;
    wait_for(SLOW, "the second stream to arrive", || {
        (received(&inbox).len() >= 5000).then_some(())
    })?;
    let got = received(&inbox);
    check_stream(&got, "one", 3000)?;
    check_stream(&got, "two", 2000)?;
    assert_eq!(got.len(), 5000);
    let _ = recv.kill();
    let _ = recv.wait();

    // RTT is measured on the path in use (pings run every 2 s), and the
    // traffic counters show the stream.
    wait_for(SLOW, "an RTT sample on the direct path", || {
        let st = a.status()?;
        let p = &st["peers"][0];
        (p["rtt_ms"].as_f64().is_some() && p["path"] == "direct").then_some(())
    })?;
    let ping = a.cli(&["ping", "b", "-c", "1"])?;
    assert!(ping.contains("via direct"), "{ping}");
    Ok(())
}

#[test]
fn a_revoked_node_loses_its_links() -> Result<()> {
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let _relay = lab.relay("r1")?;
    let ta = lab.server.token("g")?;
    let tb = lab.server.token("g")?;
    let a = lab.node("a", Some(&ta), &[])?;
    let mut b = lab.node("b", Some(&tb), &[])?;
    wait_for(SLOW, "a link a↔b", || {
        let p = a.path_to("b")?;
        (p == "direct" || p == "relay").then_some(())
    })?;
    lab.server.admin(&["revoke-token", &tb])?;
    a.wait_peers(&[], Duration::from_secs(2))?;
    assert_eq!(wait_for(SLOW, "b to exit", || b.exit_code())?, 3);
    // a refuses b from now on: sending to it is an error.
    assert!(a.cli(&["send", "b", "hello"]).is_err());
    Ok(())
}

#[test]
fn punching_coordinated_by_the_control_server_alone_reaches_direct() -> Result<()> {
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let _relay = lab.relay("r1")?;
    let ta = lab.server.token("g")?;
    let tb = lab.server.token("g")?;
    // DCUtR off: a direct path can only come from the rendezvous.
    let a = lab.node("a", Some(&ta), &["--punch", "control"])?;
    let b = lab.node("b", Some(&tb), &["--punch", "control"])?;
    a.wait_peers(&["b"], SLOW)?;
    let inbox = lab.dir.path().join("b-inbox.jsonl");
    let mut recv = b.recv(&inbox)?;
    a.cli(&["send", "b", "--count", "1000", "--prefix", "p"])?;
    wait_for(SLOW, "a direct path a↔b", || {
        (a.path_to("b")? == "direct" && b.path_to("a")? == "direct").then_some(())
    })?;
    wait_for(SLOW, "the stream to arrive", || {
        (received(&inbox).len() >= 1000).then_some(())
    })?;
    check_stream(&received(&inbox), "p", 1000)?;
    let _ = recv.kill();
    let _ = recv.wait();
    // One side asked, the other opened first, as the server told it.
    let (ea, eb) = (a.events(), b.events());
    let roles = |events: &[Event]| {
        [PunchRole::Caller, PunchRole::Callee].map(|want| {
            events.iter().any(|e| {
                matches!(e.kind, EventKind::Punch { role, method: PunchMethod::Quic, .. } if role == want)
            })
        })
    };
    assert!(
        roles(&ea) == [true, false] && roles(&eb) == [false, true]
            || roles(&ea) == [false, true] && roles(&eb) == [true, false],
        "expected one caller and one callee:\n--- a\n{ea:?}\n--- b\n{eb:?}"
    );
    Ok(())
}
