//! The peermesh demo: a control server and four nodes on loopback, showing
//! what exists today — joining with tokens, live network maps, revocation,
//! and a control server killed with SIGKILL that the nodes ride out.
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

    step(1, "start a control server on loopback");
    let mut lab = Lab::start()?;
    println!(
        "control server at {}, data in {}",
        lab.server.url(),
        lab.server.data.display()
    );

    step(2, "create group `demo` and one join token per node");
    lab.server.create_group("demo")?;
    let tokens: Vec<String> = (0..4)
        .map(|_| lab.server.token("demo"))
        .collect::<Result<_>>()?;
    print!("{}", lab.server.admin(&["tokens"])?);

    step(3, "three nodes join");
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
    println!("\n$ meshnode status --state {}", nodes[0].state.display());
    show_status(&nodes[0])?;

    step(
        4,
        "a fourth node joins; the others see it without restarting",
    );
    let t0 = Instant::now();
    let mut delta = lab.node("delta", Some(&tokens[3]), &[])?;
    nodes[0].wait_peers(&["bravo", "charlie", "delta"], Duration::from_secs(10))?;
    println!("alpha sees delta after {:?}", t0.elapsed());

    step(5, "revoke delta's token: delta is cut off everywhere");
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
        6,
        "kill -9 the control server, start it again on the same data",
    );
    lab.server.kill9();
    std::thread::sleep(Duration::from_millis(300));
    println!("(server down) alpha says:");
    show_status(&nodes[0])?;
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
    println!(
        "\nPeers show `connecting`: the data plane (relays, hole punching) is the next issue."
    );

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
