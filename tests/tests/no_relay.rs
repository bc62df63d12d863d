//! A group with no relay server at all: members on one host reach each
//! other directly through the control server's rendezvous alone, and a
//! content fetch among them takes most of its bytes from peers.

#[path = "support/content.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use peermesh_tests::{Lab, Node};
use support::{blake3_file, make_file, Get, Origin};

const MIB: usize = 1 << 20;
/// Generous bounds for things with no stated limit (process start-up).
const SLOW: Duration = Duration::from_secs(60);
const FETCH: Duration = Duration::from_secs(300);

/// Waits until every node has a `direct` link to every other; the error
/// lists the links that are not.
fn wait_all_direct(nodes: &[&Node], timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let mut not_direct = Vec::new();
        for n in nodes {
            for o in nodes.iter().filter(|o| o.name != n.name) {
                let path = n.path_to(&o.name).unwrap_or_else(|| "unlisted".into());
                if path != "direct" {
                    not_direct.push(format!("{}→{}: {path}", n.name, o.name));
                }
            }
        }
        if not_direct.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("after {timeout:?}, not direct: {not_direct:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_members_without_a_relay_go_direct_and_share_content() -> Result<()> {
    let mut lab = Lab::start()?;
    let content = lab.dir.path().join("origin-content");
    std::fs::create_dir_all(&content)?;
    let file = content.join("file.bin");
    make_file(&file, 16 * MIB, 0x0e1a)?;
    let want = blake3_file(&file)?;
    let origin = Origin::start(&content, lab.dir.path().join("origin.log"))?;
    let id = origin.content_id("file.bin")?;
    let url = origin.url();

    lab.server.create_group("g")?;
    // No relay: the directory stays empty.
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let t = lab.server.token("g")?;
        nodes.push(lab.node(&format!("n{i}"), Some(&t), &["--origin", &url])?);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    let took = wait_all_direct(&refs, SLOW)?;
    eprintln!("all six links direct {took:?} after the nodes listed each other");

    // A message crosses a direct path that no relay ever carried.
    nodes[0].cli(&["send", "n2", "hello without a relay"])?;
    let recv_out = lab.dir.path().join("n2-recv.jsonl");
    let mut recv = nodes[1].recv(&recv_out)?;
    let got = peermesh_tests::wait_for(SLOW, "the message", || {
        std::fs::read_to_string(&recv_out)
            .ok()?
            .lines()
            .any(|l| l.contains("hello without a relay"))
            .then_some(())
    });
    let _ = recv.kill();
    let _ = recv.wait();
    got?;

    // One member fetches first (all from the origin); the other two fetch
    // together and find its chunks on the mesh.
    let first = Get::spawn(&nodes[0], &id, lab.dir.path().join("n1.out"))?;
    let (r, _) = first.wait(FETCH)?;
    ensure!(r["file_hash"] == want.as_str(), "{r}");
    let gets: Vec<Get> = nodes[1..]
        .iter()
        .map(|n| Get::spawn(n, &id, lab.dir.path().join(format!("{}.out", n.name))))
        .collect::<Result<_>>()?;
    let (mut origin_bytes, mut peer_bytes) = (0u64, 0u64);
    for g in gets {
        let (output, node) = (g.output.clone(), g.node.clone());
        let (r, took) = g.wait(FETCH)?;
        ensure!(r["file_hash"] == want.as_str(), "{r}");
        ensure!(blake3_file(&output)? == want, "{}", output.display());
        let (o, p) = (
            r["bytes_from_origin"].as_u64().unwrap_or(0),
            r["bytes_from_peers"].as_u64().unwrap_or(0),
        );
        eprintln!("{node}: {o} bytes from the origin, {p} from peers in {took:?}");
        origin_bytes += o;
        peer_bytes += p;
    }
    let total = origin_bytes + peer_bytes;
    ensure!(total > 0, "nothing moved");
    ensure!(
        origin_bytes * 2 <= total,
        "the origin served {origin_bytes} of {total} bytes: more than half"
    );
    Ok(())
}
