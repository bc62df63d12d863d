//! The peermesh demo: a control server, a relay and four nodes on loopback:
//! joining with tokens, live network maps, every member reached through the
//! relay at once and then directly, messages and pings over the mesh,
//! revocation, and a control server killed with SIGKILL that the nodes (and
//! their direct paths) ride out. NAT traversal proper (hole punching, port
//! prediction, birthday search, forwarding) needs kernel NATs: the NAT-lab
//! tests and `cargo bench -p peermesh-tests --bench connectivity` run it.
//!
//! Run: `cargo run -p peermesh-examples --bin demo` (add `-- --keep` to leave
//! everything running until Ctrl-C and poke at it with the CLIs).

use std::time::{Duration, Instant};

use anyhow::Result;
use peermesh_tests::{wait_for, Bins, Lab, Node};

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m== {n}. {text}\x1b[0m");
}

fn show_status(node: &Node) -> Result<()> {
    let out = std::process::Command::new(&Bins::get().meshnode)
        .arg("status")
        .arg("--state")
        .arg(&node.state)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

fn main() -> Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    println!("building the binaries (first run takes a few minutes)…");
    Bins::get();

    step(1, "start a control server and a relay on loopback");
    let mut lab = Lab::start()?;
    println!(
        "control server at {}, data in {}",
        lab.server.url(),
        lab.server.data.display()
    );

    let relay = lab.relay("r1")?;
    println!("relay registered at {}", relay.addr);

    step(2, "create group `demo` and one join token per node");
    lab.server.create_group("demo")?;
    let tokens: Vec<String> = (0..4)
        .map(|_| lab.server.token("demo"))
        .collect::<Result<_>>()?;
    print!("{}", lab.server.admin(&["tokens"])?);

    step(
        3,
        "three nodes join; each reaches the others through the relay, then directly",
    );
    let t0 = Instant::now();
    let nodes: Vec<Node> = ["alpha", "bravo", "charlie"]
        .iter()
        .zip(&tokens)
        .map(|(name, t)| lab.node(name, Some(t), &[]))
        .collect::<Result<_>>()?;
    nodes[0].wait_peers(&["bravo", "charlie"], Duration::from_secs(10))?;
    nodes[1].wait_peers(&["alpha", "charlie"], Duration::from_secs(10))?;
    nodes[2].wait_peers(&["alpha", "bravo"], Duration::from_secs(10))?;
    println!("full mesh map on all three after {:?}", t0.elapsed());
    let pairs = [
        (0, "bravo"),
        (0, "charlie"),
        (1, "alpha"),
        (1, "charlie"),
        (2, "alpha"),
        (2, "bravo"),
    ];
    wait_for(
        Duration::from_secs(20),
        "direct paths between all three",
        || {
            pairs
                .iter()
                .all(|(i, peer)| nodes[*i].path_to(peer).as_deref() == Some("direct"))
                .then_some(())
        },
    )?;
    println!(
        "all links direct after {:?} (a link starts on the relay and moves to a direct path \
         once the punch coordinated by the control server gets through)",
        t0.elapsed()
    );
    println!("\n$ meshnode status --state {}", nodes[0].state.display());
    show_status(&nodes[0])?;

    step(4, "messages and pings over the mesh");
    let inbox = lab.dir.path().join("bravo-inbox.jsonl");
    let mut recv = nodes[1].recv(&inbox)?;
    std::thread::sleep(Duration::from_millis(200));
    println!("$ meshnode send alpha→bravo \"hello bravo\"");
    nodes[0].cli(&["send", "bravo", "hello bravo"])?;
    let got = wait_for(Duration::from_secs(10), "bravo to receive", || {
        std::fs::read_to_string(&inbox)
            .ok()
            .filter(|t| t.contains("hello bravo"))
    })?;
    print!("bravo received: {got}");
    let _ = recv.kill();
    let _ = recv.wait();
    println!("$ meshnode ping charlie -c 3 (from alpha)");
    print!("{}", nodes[0].cli(&["ping", "charlie", "-c", "3"])?);

    step(
        5,
        "a fourth node joins; the others see it without restarting",
    );
    let t0 = Instant::now();
    let mut delta = lab.node("delta", Some(&tokens[3]), &[])?;
    nodes[0].wait_peers(&["bravo", "charlie", "delta"], Duration::from_secs(10))?;
    println!("alpha sees delta after {:?}", t0.elapsed());

    step(6, "revoke delta's token: delta is cut off everywhere");
    let t0 = Instant::now();
    print!("{}", lab.server.admin(&["revoke-token", &tokens[3]])?);
    for n in &nodes {
        let others: Vec<&str> = ["alpha", "bravo", "charlie"]
            .into_iter()
            .filter(|x| *x != n.name)
            .collect();
        n.wait_peers(&others, Duration::from_secs(10))?;
    }
    println!("gone from every map after {:?}", t0.elapsed());
    let code = wait_for(Duration::from_secs(10), "delta to stop", || {
        delta.exit_code()
    })?;
    println!(
        "delta exited with code {code}: {}",
        delta.log().lines().last().unwrap_or("")
    );

    step(
        7,
        "kill -9 the control server, start it again on the same data",
    );
    lab.server.kill9();
    std::thread::sleep(Duration::from_millis(300));
    println!("(server down) alpha says:");
    show_status(&nodes[0])?;
    println!("(server down) the mesh still carries traffic:");
    print!("{}", nodes[0].cli(&["ping", "bravo", "-c", "2"])?);
    lab.server.restart()?;
    let t0 = Instant::now();
    wait_for(Duration::from_secs(20), "nodes to reconnect", || {
        nodes
            .iter()
            .all(|n| {
                n.status()
                    .is_some_and(|s| s["control"]["connected"] == true)
            })
            .then_some(())
    })?;
    println!(
        "all three nodes resumed {:?} after the restart",
        t0.elapsed()
    );
    println!("\n$ control-server admin nodes");
    print!("{}", lab.server.admin(&["nodes"])?);
    println!("\n$ control-server admin links");
    print!("{}", lab.server.admin(&["links"])?);

    if keep {
        println!("\nEverything keeps running. Try:");
        println!(
            "  {} status --state {}",
            Bins::get().meshnode.display(),
            nodes[1].state.display()
        );
        println!(
            "  {} admin --server {} --data {} nodes",
            Bins::get().control_server.display(),
            lab.server.url(),
            lab.server.data.display()
        );
        println!("Ctrl-C stops it all.");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    println!("\ndemo done; stopping everything.");
    Ok(())
}
