//! Content distribution with real processes on loopback: the origin (`hosting-server`), a
//! control server, a relay and `meshnode up --origin` nodes fetching with `meshnode get`.
//!
//! - `eight_nodes_share_64_mib_and_a_corrupting_peer_is_refused`: eight nodes fetch the same
//!   64 MiB file at once; every copy has the origin's BLAKE3 hash and the origin serves well
//!   under half of the bytes. Then a node that corrupts every chunk it serves (the
//!   `PEERMESH_TEST_CORRUPT_CHUNKS=1` test hook) gets the file, and a tenth node fetching
//!   from the group refuses it, reports it, and still ends with a correct copy.

#[path = "support/content.rs"]
mod support;

use std::time::Duration;

use anyhow::{ensure, Result};
use peermesh_tests::Lab;
use serde_json::Value;
use support::{blake3_file, make_file, wait_mesh, Get, Origin};

const MIB: usize = 1 << 20;
const SLOW: Duration = Duration::from_secs(60);
const FETCH: Duration = Duration::from_secs(300);

fn check_copy(report: &Value, want_hash: &str, output: &std::path::Path) -> Result<()> {
    ensure!(
        report["file_hash"] == want_hash,
        "report hash {} != origin's {want_hash}",
        report["file_hash"]
    );
    let got = blake3_file(output)?;
    ensure!(
        got == want_hash,
        "{}: {got} != origin's {want_hash}",
        output.display()
    );
    Ok(())
}

#[test]
fn eight_nodes_share_64_mib_and_a_corrupting_peer_is_refused() -> Result<()> {
    let t0 = std::time::Instant::now();
    let mut lab = Lab::start()?;
    let content = lab.dir.path().join("origin-content");
    std::fs::create_dir_all(&content)?;
    let file = content.join("big.bin");
    make_file(&file, 64 * MIB, 0x5eed)?;
    let want = blake3_file(&file)?;
    let origin = Origin::start(&content, lab.dir.path().join("origin.log"))?;
    let id = origin.content_id("big.bin")?;
    let manifest = origin.json(&format!("/content/{id}/manifest"))?;
    assert_eq!(manifest["file_hash"], want.as_str());
    assert_eq!(manifest["chunks"].as_array().map(|c| c.len()), Some(256));

    lab.server.create_group("g")?;
    let _relay = lab.relay("r1")?;
    let url = origin.url();
    let mut nodes = Vec::new();
    for i in 1..=8 {
        let t = lab.server.token("g")?;
        nodes.push(lab.node(&format!("n{i}"), Some(&t), &["--origin", &url])?);
    }
    let refs: Vec<&peermesh_tests::Node> = nodes.iter().collect();
    wait_mesh(&refs, SLOW)?;
    eprintln!("[{:.1?}] 8 nodes up and linked", t0.elapsed());

    // Phase 1: all eight at once, from a cold start.
    let start = std::time::Instant::now();
    let gets: Vec<Get> = nodes
        .iter()
        .map(|n| Get::spawn(n, &id, lab.dir.path().join(format!("{}.out", n.name))))
        .collect::<Result<_>>()?;
    let mut from_origin = 0u64;
    let mut from_peers = 0u64;
    for g in gets {
        let output = g.output.clone();
        let node = g.node.clone();
        let (r, took) = g.wait(FETCH)?;
        check_copy(&r, &want, &output)?;
        let (o, p) = (
            r["bytes_from_origin"].as_u64().unwrap_or(0),
            r["bytes_from_peers"].as_u64().unwrap_or(0),
        );
        ensure!(
            o + p + r["bytes_cached"].as_u64().unwrap_or(0) >= 64 * MIB as u64,
            "{node}: the report accounts for fewer bytes than the file: {r}"
        );
        ensure!(
            r["refused"].as_array().is_some_and(|a| a.is_empty()),
            "{node}: {r}"
        );
        eprintln!(
            "{node}: {took:.1?}, origin {:.1} MiB, peers {:.1} MiB from {} peers, {} requests retried",
            o as f64 / MIB as f64,
            p as f64 / MIB as f64,
            r["peers"].as_array().map_or(0, |a| a.len()),
            r["retried_requests"]
        );
        from_origin += o;
        from_peers += p;
    }
    let served = origin.chunk_bytes()?;
    let share = served as f64 / (8 * 64 * MIB) as f64;
    eprintln!(
        "8 nodes in {:.1?}: origin served {:.1} MiB = {:.1}% of the 512 MiB delivered",
        start.elapsed(),
        served as f64 / MIB as f64,
        100.0 * share
    );
    // The nodes' own accounting agrees with the origin's counter.
    assert_eq!(from_origin, served);
    assert_eq!(from_origin + from_peers, 8 * 64 * MIB as u64);
    assert!(
        share < 0.3,
        "the origin served {:.1}% of the bytes",
        100.0 * share
    );

    // Phase 2: a node that corrupts what it serves gets the file (it checks what it
    // receives like everyone else), then a new node fetches with it among the holders.
    std::env::set_var("PEERMESH_TEST_CORRUPT_CHUNKS", "1");
    let t = lab.server.token("g")?;
    let mallory = lab.node("mallory", Some(&t), &["--origin", &url]);
    std::env::remove_var("PEERMESH_TEST_CORRUPT_CHUNKS");
    let mallory = mallory?;
    let t = lab.server.token("g")?;
    let late = lab.node("late", Some(&t), &["--origin", &url])?;
    let mut all: Vec<&peermesh_tests::Node> = nodes.iter().collect();
    all.push(&mallory);
    all.push(&late);
    wait_mesh(&all, SLOW)?;
    eprintln!("[{:.1?}] mallory and late up and linked", t0.elapsed());
    let out = lab.dir.path().join("mallory.out");
    let (r, _) = Get::spawn(&mallory, &id, out.clone())?.wait(FETCH)?;
    check_copy(&r, &want, &out)?;
    eprintln!("[{:.1?}] mallory has the file", t0.elapsed());
    let out = lab.dir.path().join("late.out");
    let (r, _) = Get::spawn(&late, &id, out.clone())?.wait(FETCH)?;
    check_copy(&r, &want, &out)?;
    let refused: Vec<&str> = r["refused"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(refused, vec!["mallory"], "report: {r}");
    assert!(r["bad_chunks"].as_u64().unwrap_or(0) >= 1, "report: {r}");
    // Nothing from mallory was counted as delivered.
    let from_mallory = r["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["name"] == "mallory");
    assert!(!from_mallory, "report: {r}");
    assert!(mallory.log().contains("TEST HOOK"));
    eprintln!(
        "[{:.1?}] late refused mallory: {}",
        t0.elapsed(),
        r["refused"]
    );
    Ok(())
}
