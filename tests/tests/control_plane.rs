//! The foundation's end-to-end test: a real control server and real
//! `meshnode` processes on loopback.

use std::time::Duration;

use anyhow::Result;
use peermesh_tests::{stable_nodes, wait_for, Bins, Lab};

/// The bound for a membership change to reach every node.
const PROPAGATION: Duration = Duration::from_secs(2);
/// Generous bound for things with no stated limit (process start-up, resume).
const SLOW: Duration = Duration::from_secs(20);

#[test]
fn nodes_join_see_each_other_survive_revocation_and_server_kill() -> Result<()> {
    let mut lab = Lab::start()?;
    let s = &lab.server;
    s.create_group("demo")?;
    let tokens: Vec<String> = (0..4).map(|_| s.token("demo")).collect::<Result<_>>()?;

    let addr = ["--advertise", "/ip4/127.0.0.1/udp/41000/quic-v1"];
    let a = lab.node("alpha", Some(&tokens[0]), &addr)?;
    let b = lab.node("bravo", Some(&tokens[1]), &[])?;
    let c = lab.node("charlie", Some(&tokens[2]), &[])?;

    // Within 2 s each node's status lists the other two.
    a.wait_peers(&["bravo", "charlie"], PROPAGATION)?;
    b.wait_peers(&["alpha", "charlie"], PROPAGATION)?;
    c.wait_peers(&["alpha", "bravo"], PROPAGATION)?;

    // There is no relay in the directory, yet peers on one host connect:
    // each dials the other's published addresses at once.
    let (st, alpha) = wait_for(SLOW, "bravo's link to alpha to go direct", || {
        let st = b.status()?;
        let alpha = st["peers"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "alpha")?
            .clone();
        (alpha["path"] == "direct").then_some((st, alpha))
    })?;
    // Advertised addresses propagate (beside the mesh's own endpoints).
    assert!(
        alpha["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "/ip4/127.0.0.1/udp/41000/quic-v1"),
        "{alpha:#}"
    );
    assert!(st["id"].as_str().unwrap().starts_with("12D3Koo"));

    // A fourth joins; the three see it without restarting.
    let mut d = lab.node("delta", Some(&tokens[3]), &[])?;
    for n in [&a, &b, &c] {
        let mut others: Vec<&str> = ["alpha", "bravo", "charlie", "delta"]
            .into_iter()
            .filter(|x| *x != n.name)
            .collect();
        others.sort();
        n.wait_peers(&others, PROPAGATION)?;
    }

    // Revoking delta's token cuts delta off: it leaves everyone's map, and
    // delta itself stops with the "revoked" exit code.
    lab.server.admin(&["revoke-token", &tokens[3]])?;
    a.wait_peers(&["bravo", "charlie"], PROPAGATION)?;
    b.wait_peers(&["alpha", "charlie"], PROPAGATION)?;
    c.wait_peers(&["alpha", "bravo"], PROPAGATION)?;
    let code = wait_for(SLOW, "delta to exit", || d.exit_code())?;
    assert_eq!(code, 3, "delta log:\n{}", d.log());
    assert!(d.log().contains("revoked"), "delta log:\n{}", d.log());

    // kill -9 the server and start it on the same data directory: the
    // listing is unchanged and the nodes resume by themselves.
    let before = stable_nodes(&lab.server.admin_json(&["nodes"])?);
    assert_eq!(before.len(), 4);
    lab.server.kill9();
    wait_for(SLOW, "nodes to notice the server is gone", || {
        [&a, &b, &c]
            .iter()
            .all(|n| {
                n.status()
                    .is_some_and(|s| s["control"]["connected"] == false)
            })
            .then_some(())
    })?;
    lab.server.restart()?;
    let after = stable_nodes(&lab.server.admin_json(&["nodes"])?);
    assert_eq!(before, after);
    wait_for(SLOW, "nodes to reconnect", || {
        [&a, &b, &c]
            .iter()
            .all(|n| {
                n.status()
                    .is_some_and(|s| s["control"]["connected"] == true)
            })
            .then_some(())
    })?;
    a.wait_peers(&["bravo", "charlie"], PROPAGATION)?;
    b.wait_peers(&["alpha", "charlie"], PROPAGATION)?;
    c.wait_peers(&["alpha", "bravo"], PROPAGATION)?;
    wait_for(SLOW, "all three online in the admin listing", || {
        let v = lab.server.admin_json(&["nodes"]).ok()?;
        let online = v.as_array()?.iter().filter(|n| n["online"] == true).count();
        (online == 3).then_some(())
    })?;

    // The link table has every node's view of the other two. There is no
    // relay in this lab, yet the three nodes on one host reach each other
    // directly: members dial each other's published addresses at once.
    let links = wait_for(SLOW, "every link reported direct", || {
        let links = lab.server.admin_json(&["links"]).ok()?;
        let rows = links.as_array()?;
        (rows.len() == 6 && rows.iter().all(|l| l["path"] == "direct")).then_some(links)
    })
    .map_err(|e| {
        let links = lab.server.admin_json(&["links"]).unwrap_or_default();
        e.context(format!("links: {links:#}"))
    })?;
    assert_eq!(links.as_array().map(Vec::len), Some(6), "{links:#}");
    Ok(())
}

#[test]
fn a_restarted_node_keeps_its_identity_without_a_token() -> Result<()> {
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let t1 = lab.server.token("g")?;
    let t2 = lab.server.token("g")?;
    let mut a = lab.node("a", Some(&t1), &[])?;
    let b = lab.node("b", Some(&t2), &[])?;
    b.wait_peers(&["a"], SLOW)?;
    let id = a.id()?;
    a.stop()?;
    wait_for(SLOW, "a to go offline in b's view", || {
        let s = b.status()?;
        (s["peers"][0]["online"] == false).then_some(())
    })?;
    // Same --state, no token: same identity, same membership.
    let a2 = lab.node("a", None, &[])?;
    assert_eq!(a2.id()?, id);
    a2.wait_peers(&["b"], SLOW)?;
    wait_for(SLOW, "a to be online again in b's view", || {
        let s = b.status()?;
        (s["peers"][0]["online"] == true && s["peers"][0]["id"] == id.as_str()).then_some(())
    })?;
    // Still two nodes: the restart did not register a new one.
    assert_eq!(
        lab.server.admin_json(&["nodes"])?.as_array().unwrap().len(),
        2
    );
    Ok(())
}

#[test]
fn a_removed_node_disappears_and_stops() -> Result<()> {
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let t1 = lab.server.token("g")?;
    let t2 = lab.server.token("g")?;
    let a = lab.node("a", Some(&t1), &[])?;
    let mut b = lab.node("b", Some(&t2), &[])?;
    a.wait_peers(&["b"], SLOW)?;
    lab.server.admin(&["remove-node", "b"])?;
    a.wait_peers(&[], PROPAGATION)?;
    assert_eq!(wait_for(SLOW, "b to exit", || b.exit_code())?, 3);
    // A node cannot start without a token or a remembered membership.
    let fresh = lab.node("c", None, &[])?;
    let mut fresh = fresh;
    assert_ne!(wait_for(SLOW, "c to exit", || fresh.exit_code())?, 0);
    assert!(fresh.log().contains("--token"), "{}", fresh.log());

    // The removed node cannot come back with the token it joined with…
    let mut back = lab.node("b", Some(&t2), &[])?;
    assert_ne!(
        wait_for(SLOW, "b's rejoin to fail", || back.exit_code())?,
        0
    );
    assert!(
        back.log()
            .contains("removed after it joined with this token"),
        "{}",
        back.log()
    );
    // …and a single-use token (the default) does not let in a second node.
    let mut second = lab.node("d", Some(&t1), &[])?;
    assert_ne!(
        wait_for(SLOW, "d's join to fail", || second.exit_code())?,
        0
    );
    assert!(second.log().contains("used up"), "{}", second.log());
    assert_eq!(
        lab.server.admin_json(&["nodes"])?.as_array().unwrap().len(),
        1,
        "only a is left"
    );
    Ok(())
}

/// The token's last part: the fingerprint of the server key it pins.
fn pin_of(token: &str) -> &str {
    token.rsplit('_').next().unwrap()
}

/// `token` pinning another key than the server's (same secret).
fn with_wrong_pin(token: &str) -> String {
    let pin = pin_of(token);
    let other = if pin.starts_with('0') { "1" } else { "0" };
    format!("{}{other}{}", &token[..token.len() - pin.len()], &pin[1..])
}

#[test]
fn a_node_joins_over_tls_and_refuses_a_server_with_another_key() -> Result<()> {
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let url = lab.server.url();
    assert!(url.starts_with("https://"), "{url}");
    let t1 = lab.server.token("g")?;
    let t2 = lab.server.token("g")?;
    assert_eq!(
        pin_of(&t1).len(),
        64,
        "tokens carry the key's SHA-256: {t1}"
    );
    assert_eq!(pin_of(&t1), pin_of(&t2), "one server key");

    // The token pins another key: the node refuses the server and says why,
    // instead of retrying; its token's secret never reached the server.
    let mut wrong = lab.node("wrong", Some(&with_wrong_pin(&t2)), &[])?;
    assert_ne!(
        wait_for(SLOW, "the node to refuse the server", || wrong.exit_code())?,
        0
    );
    let log = wrong.log();
    assert!(log.contains("is not the pinned key"), "{log}");
    assert!(log.contains(pin_of(&t2)), "names the key it met: {log}");
    let tokens = lab.server.admin_json(&["tokens"])?;
    assert!(
        tokens.as_array().unwrap().iter().all(|t| t["uses"] == 0),
        "no token was used: {tokens:#}"
    );

    // The admin CLI pins too: given another fingerprint, it refuses the
    // server and names both keys.
    let out = std::process::Command::new(&Bins::get().control_server)
        .args([
            "admin",
            "--server",
            &url,
            "--server-key",
            pin_of(&with_wrong_pin(&t2)),
        ])
        .arg("--data")
        .arg(&lab.server.data)
        .arg("groups")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("has key {}", pin_of(&t2))), "{err}");

    // A relay pins the key its token names as well: with another key in
    // it, it refuses the server and exits saying why.
    let relay_token = with_wrong_pin(&lab.server.relay_token()?);
    let mut cmd = std::process::Command::new(&Bins::get().meshnode);
    cmd.args([
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--control",
        &url,
        "--token",
    ])
    .arg(&relay_token)
    .arg("--state")
    .arg(lab.dir.path().join("relay-wrong"));
    let relay = lab.spawn("relay-wrong", cmd)?;
    wait_for(SLOW, "the relay to refuse the server", || {
        let out = relay.output();
        (out.contains("meshnode: ") && out.contains("is not the pinned key")).then_some(())
    })?;

    // The URL and the token are all a node needs; it remembers the key.
    let a = lab.node("a", Some(&t1), &[])?;
    let b = lab.node("b", Some(&t2), &[])?;
    a.wait_peers(&["b"], SLOW)?;
    b.wait_peers(&["a"], SLOW)?;
    let membership: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.state.join("node.json"))?)?;
    assert_eq!(membership["server_key"], pin_of(&t1), "{membership:#}");
    assert_eq!(membership["control_url"], url.as_str(), "{membership:#}");
    Ok(())
}

#[test]
fn plaintext_only_to_loopback_and_the_pin_holds_there_too() -> Result<()> {
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let t1 = lab.server.token("g")?;
    let t2 = lab.server.token("g")?;
    let t3 = lab.server.token("g")?;

    // http:// to an address that is not loopback is refused before any
    // connection is made (192.0.2.1 is TEST-NET-1; nothing is sent there).
    let mut remote = lab.node_at("http://192.0.2.1:7443", "remote", Some(&t1), &[])?;
    assert_ne!(
        wait_for(SLOW, "the node to refuse plaintext", || remote.exit_code())?,
        0
    );
    let log = remote.log();
    assert!(log.contains("not a loopback address"), "{log}");
    assert!(log.contains("--insecure"), "says how to allow it: {log}");
    let out = std::process::Command::new(&Bins::get().control_server)
        .args(["admin", "--server", "http://192.0.2.1:7443", "--data"])
        .arg(&lab.server.data)
        .arg("groups")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");

    // Plaintext to loopback works, and the server's key is still checked
    // against the token, before the token is sent.
    let plain = lab.server.plaintext_url();
    let mut wrong = lab.node_at(&plain, "wrong", Some(&with_wrong_pin(&t3)), &[])?;
    assert_ne!(
        wait_for(SLOW, "the node to refuse the server", || wrong.exit_code())?,
        0
    );
    assert!(
        wrong.log().contains("is not the pinned key"),
        "{}",
        wrong.log()
    );
    let tokens = lab.server.admin_json(&["tokens"])?;
    assert!(
        tokens.as_array().unwrap().iter().all(|t| t["uses"] == 0),
        "no token was used: {tokens:#}"
    );
    let a = lab.node_at(&plain, "a", Some(&t1), &[])?;
    let b = lab.node("b", Some(&t2), &[])?;
    a.wait_peers(&["b"], SLOW)?;
    b.wait_peers(&["a"], SLOW)?;
    Ok(())
}

#[test]
fn nodes_follow_a_rotation_of_the_server_key() -> Result<()> {
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let t1 = lab.server.token("g")?;
    let t2 = lab.server.token("g")?;
    let mut a = lab.node("a", Some(&t1), &[])?;
    let b = lab.node("b", Some(&t2), &[])?;
    a.wait_peers(&["b"], SLOW)?;
    b.wait_peers(&["a"], SLOW)?;
    let old = pin_of(&t1).to_string();

    let out = lab.server.admin(&["rotate-key"])?;
    assert!(out.contains(&old), "{out}");
    // New tokens pin the new key.
    let t3 = lab.server.token("g")?;
    let new = pin_of(&t3).to_string();
    assert_ne!(new, old);
    assert!(out.contains(&new), "{out}");

    // The running nodes follow the old key's signature over the new one and
    // keep the new pin; a restart without a token uses it.
    let key_of = |state: &std::path::Path| -> Option<String> {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(state.join("node.json")).ok()?).ok()?;
        m["server_key"].as_str().map(str::to_string)
    };
    a.stop()?;
    let a = lab.node("a", None, &[])?;
    wait_for(SLOW, "a to pin the new key", || {
        (key_of(&a.state)? == new).then_some(())
    })?;
    a.wait_peers(&["b"], SLOW)?;
    // A node joining with a token of the old key follows the rotation too.
    let c = lab.node("c", Some(&lab.server.token("g")?.replace(&new, &old)), &[])?;
    c.wait_peers(&["a", "b"], SLOW)?;
    assert_eq!(key_of(&c.state).as_deref(), Some(new.as_str()));
    let d = lab.node("d", Some(&t3), &[])?;
    d.wait_peers(&["a", "b", "c"], SLOW)?;
    Ok(())
}
