//! Fetches that no peer can stall, a cache that survives a crash, and a cache with a size
//! limit: real processes on loopback (the origin, a control server, a relay, `meshnode up`
//! nodes fetching with `meshnode get`, and `content-adversary` members that misbehave on the
//! content protocol through the node library's public API).
//!
//! - `eight_nodes_fetch_past_a_busy_peer_and_one_that_claims_past_the_end`: eight nodes fetch
//!   a 32 MiB file at once while one member claims every chunk and answers every request
//!   `Busy`, and another names chunks past the end of the file. Every copy is correct, and
//!   every fetch's report (`meshnode get --json`, and the text report of one) lists both
//!   misbehaving members as refused, for the right reason, and the origin's share.
//! - `a_node_killed_while_writing_chunks_serves_no_damaged_chunk_after_restart`: a node is
//!   killed (SIGKILL) in the middle of a fetch; its cache is then damaged the way a crash or a
//!   disk can leave it (a truncated chunk, a flipped byte, a half-written temporary file).
//!   After a restart it holds only good chunks, a peer fetching from it gets a correct copy
//!   with no bad chunk (a chunk damaged while it runs is caught when served), and its own fetch
//!   again gets back what was lost.
//! - `the_cache_size_limit_is_honoured`: with `--cache-size 4MiB` the cache never holds more
//!   than the limit after a fetch, evicts least recently used first, never a chunk of the
//!   fetch in progress (a 6 MiB file still comes whole, each chunk once from the origin), and
//!   a restart with a smaller limit evicts at once.

#[path = "support/content.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use peermesh_tests::{wait_for, Bins, Lab, Node};
use serde_json::Value;
use support::{blake3_file, make_file, wait_mesh, Get, Origin};

const MIB: usize = 1 << 20;
/// Generous bound for start-up and links.
const SLOW: Duration = Duration::from_secs(90);
/// Generous bound for one fetch (a liveness bound, not a speed test).
const FETCH: Duration = Duration::from_secs(300);

fn check_copy(report: &Value, want_hash: &str, output: &Path) -> Result<()> {
    ensure!(
        report["file_hash"] == want_hash,
        "report hash {} != origin's {want_hash}",
        report["file_hash"]
    );
    let got = blake3_file(output)?;
    ensure!(
        got == want_hash,
        "{}: {got} != {want_hash}",
        output.display()
    );
    Ok(())
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Starts a `content-adversary` member named `name` in `mode`.
fn adversary(lab: &mut Lab, name: &str, mode: &str) -> Result<peermesh_tests::Process> {
    let token = lab.server.token("g")?;
    let mut cmd = Command::new(&Bins::get().content_adversary);
    cmd.arg("--control")
        .arg(lab.server.url())
        .arg("--token")
        .arg(&token)
        .arg("--state")
        .arg(lab.state_dir(name))
        .args(["--name", name, "--mode", mode]);
    lab.spawn(name, cmd)
}

/// Waits until every node lists each of `names` with a link up.
fn wait_linked(nodes: &[&Node], names: &[&str]) -> Result<()> {
    for n in nodes {
        for name in names {
            wait_for(
                SLOW,
                &format!("{} to have a link to {name}", n.name),
                || {
                    n.path_to(name)
                        .filter(|p| p == "relay" || p == "direct")
                        .map(drop)
                },
            )?;
        }
    }
    Ok(())
}

/// The chunk files in a node's cache: (hash named, path, length).
fn cache_files(state: &Path) -> Vec<(String, PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(subs) = std::fs::read_dir(state.join("content").join("chunks")) else {
        return out;
    };
    for sub in subs.flatten() {
        for f in std::fs::read_dir(sub.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((f.file_name().to_string_lossy().into_owned(), f.path(), len));
        }
    }
    out.sort();
    out
}

/// Every file in the cache is a whole chunk under its own hash (no temporary file, nothing
/// damaged); returns their hashes.
fn check_cache_is_clean(state: &Path) -> Result<BTreeSet<String>> {
    let mut good = BTreeSet::new();
    for (name, path, _) in cache_files(state) {
        let data = std::fs::read(&path)?;
        let h = blake3::hash(&data).to_hex().to_string();
        ensure!(h == name, "{} holds bytes that hash to {h}", path.display());
        good.insert(name);
    }
    Ok(good)
}

fn cache_bytes(state: &Path) -> u64 {
    cache_files(state).iter().map(|f| f.2).sum()
}

#[test]
fn eight_nodes_fetch_past_a_busy_peer_and_one_that_claims_past_the_end() -> Result<()> {
    let t0 = std::time::Instant::now();
    let mut lab = Lab::start()?;
    let content = lab.dir.path().join("origin-content");
    std::fs::create_dir_all(&content)?;
    make_file(&content.join("big.bin"), 32 * MIB, 0xb05e)?;
    let want = blake3_file(&content.join("big.bin"))?;
    let origin = Origin::start(&content, lab.dir.path().join("origin.log"))?;
    let id = origin.content_id("big.bin")?;

    lab.server.create_group("g")?;
    let _relay = lab.relay("r1")?;
    let url = origin.url();
    let busy = adversary(&mut lab, "busy", "busy")?;
    let oor = adversary(&mut lab, "oor", "out-of-range")?;
    let mut nodes = Vec::new();
    for i in 1..=8 {
        let t = lab.server.token("g")?;
        nodes.push(lab.node(&format!("n{i}"), Some(&t), &["--origin", &url])?);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_mesh(&refs, SLOW)?;
    wait_linked(&refs, &["busy", "oor"])?;
    eprintln!(
        "[{:.1?}] 8 nodes and 2 adversaries up and linked",
        t0.elapsed()
    );

    // All eight at once; n8 prints the human-readable report.
    let gets: Vec<Get> = nodes
        .iter()
        .map(|n| {
            let out = lab.dir.path().join(format!("{}.out", n.name));
            Get::spawn_with(n, &id, out, n.name != "n8")
        })
        .collect::<Result<_>>()?;
    let mut from_origin = 0u64;
    let mut moved = 0u64;
    for g in gets {
        let (node, output) = (g.node.clone(), g.output.clone());
        if node == "n8" {
            let (text, took) = g.wait_output(FETCH)?;
            eprintln!("{node} ({took:.1?}):\n{text}");
            ensure!(
                text.contains(&format!("blake3   {want}")),
                "{node}: no correct hash in the report:\n{text}"
            );
            ensure!(blake3_file(&output)? == want, "{node}: wrong copy");
            let snubbed = text
                .lines()
                .any(|l| l.starts_with("SNUBBED") && l.contains(" busy ("));
            let refused = text.lines().any(|l| {
                l.starts_with("REFUSED") && l.contains(" oor (") && l.contains("out_of_range")
            });
            ensure!(
                snubbed && refused,
                "{node}: both adversaries in the report:\n{text}"
            );
            ensure!(
                text.contains("% of the bytes moved"),
                "{node}: the origin's share:\n{text}"
            );
            continue;
        }
        let (r, took) = g.wait(FETCH)?;
        check_copy(&r, &want, &output)?;
        let refused: Vec<(String, String)> = r["refused"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_string(),
                    p["kind"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let want_refused = vec![
            ("busy".to_string(), "busy".to_string()),
            ("oor".to_string(), "out_of_range".to_string()),
        ];
        let mut got = refused.clone();
        got.sort();
        ensure!(
            got == want_refused,
            "{node}: refused {refused:?}; report {r}"
        );
        // The busy member was asked, answered Busy, and delivered nothing.
        ensure!(u(&r["busy_answers"]) >= 1, "{node}: {r}");
        let delivered_by = |name: &str| {
            r["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == name)
        };
        ensure!(!delivered_by("busy") && !delivered_by("oor"), "{node}: {r}");
        ensure!(u(&r["bad_chunks"]) == 0, "{node}: {r}");
        // The origin's share, as reported, is what the byte counts say.
        let (o, p) = (u(&r["bytes_from_origin"]), u(&r["bytes_from_peers"]));
        ensure!(
            o + p + u(&r["bytes_cached"]) >= 32 * MIB as u64,
            "{node}: {r}"
        );
        let share = r["origin_share"].as_f64().context("origin_share")?;
        ensure!(
            (share - o as f64 / (o + p) as f64).abs() < 1e-9,
            "{node}: origin_share {share} for {o} of {} bytes",
            o + p
        );
        let reasons: Vec<&str> = r["refused"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["reason"].as_str())
            .collect();
        eprintln!(
            "{node}: {took:.1?}, origin {:.1} MiB ({:.0}%), peers {:.1} MiB, {} busy answers; refused: {reasons:?}",
            o as f64 / MIB as f64,
            100.0 * share,
            p as f64 / MIB as f64,
            r["busy_answers"]
        );
        from_origin += o;
        moved += o + p;
    }
    // The nodes' accounting agrees with the origin's own counter (n8's share included).
    let served = origin.chunk_bytes()?;
    ensure!(
        served >= from_origin,
        "origin served {served} < reported {from_origin}"
    );
    eprintln!(
        "[{:.1?}] origin served {:.1} MiB of the {:.0} MiB delivered to 8 nodes ({:.1}%)",
        t0.elapsed(),
        served as f64 / MIB as f64,
        (8 * 32) as f64,
        100.0 * served as f64 / (8 * 32 * MIB) as f64
    );
    ensure!(moved > 0);
    // The adversaries really took part: the busy one answered requests.
    ensure!(
        busy.output().contains("answered") && busy.output().contains("busy"),
        "the busy member was never asked:\n{}",
        busy.output()
    );
    ensure!(oor.output().contains("bitfield from"), "{}", oor.output());
    Ok(())
}

#[test]
fn a_node_killed_while_writing_chunks_serves_no_damaged_chunk_after_restart() -> Result<()> {
    let t0 = std::time::Instant::now();
    let mut lab = Lab::start()?;
    let content = lab.dir.path().join("origin-content");
    std::fs::create_dir_all(&content)?;
    make_file(&content.join("small.bin"), 8 * MIB, 0x5a11)?;
    make_file(&content.join("large.bin"), 64 * MIB, 0x1a49e)?;
    let want = blake3_file(&content.join("small.bin"))?;
    let origin = Origin::start(&content, lab.dir.path().join("origin.log"))?;
    let small = origin.content_id("small.bin")?;
    let large = origin.content_id("large.bin")?;
    let manifest = origin.json(&format!("/content/{small}/manifest"))?;
    let chunks: Vec<String> = manifest["chunks"]
        .as_array()
        .context("chunks")?
        .iter()
        .filter_map(|c| c.as_str().map(String::from))
        .collect();
    ensure!(chunks.len() == 32);

    lab.server.create_group("g")?;
    let _relay = lab.relay("r1")?;
    let url = origin.url();
    let t = lab.server.token("g")?;
    let mut keeper = lab.node("keeper", Some(&t), &["--origin", &url])?;
    wait_for(SLOW, "the keeper to answer", || keeper.status())?;

    // The keeper gets the small file, then is killed in the middle of the large one.
    let out = lab.dir.path().join("keeper-small.out");
    let (r, _) = Get::spawn(&keeper, &small, out.clone())?.wait(FETCH)?;
    check_copy(&r, &want, &out)?;
    let before = cache_files(&keeper.state).len();
    let get = Get::spawn(&keeper, &large, lab.dir.path().join("keeper-large.out"))?;
    wait_for(
        FETCH,
        "the keeper to store chunks of the large file",
        || (cache_files(&keeper.state).len() >= before + 8).then_some(()),
    )?;
    keeper.kill9();
    drop(get);
    eprintln!(
        "[{:.1?}] keeper killed with {} chunks cached",
        t0.elapsed(),
        cache_files(&keeper.state).len()
    );

    // What a crash (or a disk) can leave: chunk 3 cut short, a byte of chunk 5 flipped, and
    // a half-written temporary file of chunk 9 next to it.
    let chunk_path = |h: &str| {
        keeper
            .state
            .join("content")
            .join("chunks")
            .join(&h[..2])
            .join(h)
    };
    let (cut, flipped, planted) = (&chunks[3], &chunks[5], &chunks[9]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(chunk_path(cut))?;
    f.set_len(100_000)?;
    drop(f);
    let mut data = std::fs::read(chunk_path(flipped))?;
    data[4242] ^= 0x40;
    std::fs::write(chunk_path(flipped), &data)?;
    let tmp = chunk_path(planted).with_extension("tmp777");
    std::fs::write(&tmp, &std::fs::read(chunk_path(planted))?[..1000])?;

    let mut keeper = lab.node("keeper", None, &["--origin", &url])?;
    wait_for(SLOW, "the keeper to answer after its restart", || {
        keeper.status()
    })?;
    // Only whole chunks under their own hash are left.
    let good = check_cache_is_clean(&keeper.state)?;
    ensure!(
        !good.contains(cut) && !good.contains(flipped),
        "damaged chunks kept"
    );
    ensure!(
        good.contains(planted) && !tmp.exists(),
        "the temporary file is left"
    );
    ensure!(
        keeper.log().contains("damaged chunks or unfinished writes"),
        "the keeper did not say what it removed"
    );
    // The fetcher joins now (a link that it kept to the keeper's previous process could
    // lose the first messages to the new one).
    let t = lab.server.token("g")?;
    let fetcher = lab.node("fetcher", Some(&t), &["--origin", &url])?;
    wait_mesh(&[&keeper, &fetcher], SLOW)?;

    // A chunk damaged while the keeper runs (same length, one byte) is caught when served.
    let late = &chunks[12];
    let mut data = std::fs::read(chunk_path(late))?;
    data[7] ^= 0x01;
    std::fs::write(chunk_path(late), &data)?;

    // The fetcher gets a correct copy and no bad chunk from the keeper.
    let out = lab.dir.path().join("fetcher-small.out");
    let (r, _) = Get::spawn(&fetcher, &small, out.clone())?.wait(FETCH)?;
    check_copy(&r, &want, &out)?;
    ensure!(u(&r["bad_chunks"]) == 0, "a damaged chunk was served: {r}");
    ensure!(r["refused"].as_array().is_some_and(|a| a.is_empty()), "{r}");
    let from_keeper = r["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "keeper")
        .map(|p| u(&p["chunks"]))
        .unwrap_or(0);
    ensure!(
        from_keeper >= 20,
        "the fetcher got {from_keeper} chunks from the keeper: {r}"
    );
    ensure!(
        !chunk_path(late).exists(),
        "the chunk damaged at run time is still in the keeper's cache"
    );
    check_cache_is_clean(&keeper.state)?;
    eprintln!(
        "[{:.1?}] fetcher: {from_keeper} chunks from the keeper, {} bytes from the origin",
        t0.elapsed(),
        r["bytes_from_origin"]
    );

    // The keeper's own fetch of the file gets back the three chunks it lost.
    let out = lab.dir.path().join("keeper-small-again.out");
    let (r, _) = Get::spawn(&keeper, &small, out.clone())?.wait(FETCH)?;
    check_copy(&r, &want, &out)?;
    let chunk = 256 * 1024u64;
    ensure!(
        u(&r["bytes_cached"]) == 29 * chunk,
        "cached {} (want 29 chunks): {r}",
        r["bytes_cached"]
    );
    ensure!(
        u(&r["bytes_from_origin"]) + u(&r["bytes_from_peers"]) == 3 * chunk,
        "{r}"
    );
    let good = check_cache_is_clean(&keeper.state)?;
    ensure!(chunks.iter().all(|c| good.contains(c)), "chunks missing");
    keeper.stop()?;
    Ok(())
}

#[test]
fn the_cache_size_limit_is_honoured() -> Result<()> {
    let mut lab = Lab::start()?;
    let content = lab.dir.path().join("origin-content");
    std::fs::create_dir_all(&content)?;
    let files = [("a.bin", 3 * MIB), ("b.bin", 3 * MIB), ("c.bin", 6 * MIB)];
    for (i, (name, size)) in files.iter().enumerate() {
        // Distinct seeds (make_file ignores the lowest bit).
        make_file(&content.join(name), *size, 0xca00 + 16 * i as u64)?;
    }
    let origin = Origin::start(&content, lab.dir.path().join("origin.log"))?;
    let ids: Vec<String> = files
        .iter()
        .map(|(n, _)| origin.content_id(n))
        .collect::<Result<_>>()?;
    let chunk_hashes = |id: &str| -> Result<BTreeSet<String>> {
        let m = origin.json(&format!("/content/{id}/manifest"))?;
        Ok(m["chunks"]
            .as_array()
            .context("chunks")?
            .iter()
            .filter_map(|c| c.as_str().map(String::from))
            .collect())
    };
    lab.server.create_group("g")?;
    let _relay = lab.relay("r1")?;
    let url = origin.url();
    let limit = 4 * MIB as u64;
    let t = lab.server.token("g")?;
    let mut node = lab.node(
        "small",
        Some(&t),
        &["--origin", &url, "--cache-size", "4MiB"],
    )?;
    wait_for(SLOW, "the node to answer", || node.status())?;

    let mut served = 0u64;
    for (k, ((name, size), id)) in files.iter().zip(&ids).enumerate() {
        let out = lab.dir.path().join(name);
        let (r, _) = Get::spawn(&node, id, out.clone())?.wait(FETCH)?;
        check_copy(&r, &blake3_file(&content.join(name))?, &out)?;
        // Every chunk once from the origin: none of this fetch's was evicted under it.
        ensure!(u(&r["bytes_from_origin"]) == *size as u64, "{name}: {r}");
        served += *size as u64;
        ensure!(
            origin.chunk_bytes()? == served,
            "the origin served more than once"
        );
        let on_disk = cache_bytes(&node.state);
        ensure!(
            u(&r["cache_bytes"]) == on_disk && on_disk <= limit,
            "{name}: {on_disk} bytes on disk, limit {limit}: {r}"
        );
        ensure!(u(&r["cache_limit"]) == limit, "{r}");
        check_cache_is_clean(&node.state)?;
        let held: BTreeSet<String> = cache_files(&node.state).into_iter().map(|f| f.0).collect();
        eprintln!(
            "{name}: cache {on_disk} bytes in {} chunks, {} evicted so far",
            held.len(),
            r["evicted_chunks"]
        );
        match k {
            // 3 MiB fits.
            0 => ensure!(u(&r["evicted_chunks"]) == 0, "{r}"),
            // 6 MiB held: the 8 least recently used chunks (all of a's) go.
            1 => {
                ensure!(u(&r["evicted_chunks"]) == 8, "{r}");
                ensure!(
                    chunk_hashes(&ids[1])?.is_subset(&held),
                    "b's chunks evicted"
                );
                ensure!(chunk_hashes(&ids[0])?.intersection(&held).count() == 4);
            }
            // A file larger than the cache still comes whole; afterwards the cache holds
            // the most recent 4 MiB of it.
            _ => {
                ensure!(held.is_subset(&chunk_hashes(&ids[2])?), "older chunks kept");
                ensure!(on_disk == limit, "{on_disk}");
            }
        }
    }

    // A restart with a smaller limit evicts at once.
    node.stop()?;
    let node = lab.node("small", None, &["--origin", &url, "--cache-size", "1 MiB"])?;
    wait_for(SLOW, "the node to answer after its restart", || {
        node.status()
    })?;
    let on_disk = cache_bytes(&node.state);
    ensure!(
        on_disk <= MIB as u64,
        "{on_disk} bytes after a restart with 1 MiB"
    );
    ensure!(on_disk > 0, "the most recent chunks are kept");
    check_cache_is_clean(&node.state)?;
    Ok(())
}
