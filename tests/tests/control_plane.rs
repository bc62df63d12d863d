//! The foundation's end-to-end test: a real control server and real
//! `meshnode` processes on loopback.

use std::time::Duration;

use anyhow::Result;
use peermesh_tests::{stable_nodes, wait_for, Lab};

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
    Ok(())
}
