//! A NAT that loses every mapping while a stream runs (issue 12): real
//! processes, a control server and a relay on a public host, `a` behind the
//! NAT under test, `b` behind a port-restricted cone.
//!
//! The pair goes `direct`; `a` streams numbered messages to `b` in batches
//! before, across and after the moment `a`'s router forgets every mapping
//! (`conntrack -F`, as a reboot or a full table would). Every message must
//! arrive exactly once and in order, and the link must be `direct` again on
//! both sides afterwards, with the same processes (no restart).
//!
//! - Port-restricted cone: the next packet out makes a new mapping on the
//!   same port, so the direct path may survive unnoticed.
//! - Sequential symmetric: the new mapping has a new port; `b`'s packets to
//!   the old one are dropped, so the direct path dies: the link must move
//!   to the relay within about a second and then punch a new direct path.
//!
//! The times are printed (`--nocapture`). Needs root, `ip`, `nft` and
//! `conntrack`: skipped with a printed reason otherwise, failed when CI=true.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context, Result};
use peermesh_tests::meshlab::{poll, MeshLab};
use peermesh_tests::netlab::{lab_or_skip, NatKind, SiteOpts};

/// Failure guard: process start-up, joining, going direct.
const SLOW: Duration = Duration::from_secs(45);
/// Messages per batch, and the pause between batches.
const BATCH: usize = 20;
const BATCH_EVERY: Duration = Duration::from_millis(100);
/// Batches sent before the flush, and in all.
const BEFORE: usize = 10;
const BATCHES: usize = 60;

fn recovery_test(name: &str, kind: NatKind) {
    let Some(lab) = lab_or_skip(name) else {
        return;
    };
    let mut m = MeshLab::new(name, lab).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    if let Err(e) = run(&mut m, name, kind) {
        m.dump_logs(60);
        panic!("{name}: {e:#}");
    }
}

fn run(m: &mut MeshLab, name: &str, kind: NatKind) -> Result<()> {
    m.start_public()?;
    let sa = m.site("ra", kind, SiteOpts::default())?;
    let sb = m.site("rb", NatKind::PortRestricted, SiteOpts::default())?;
    let (ta, tb) = (m.token()?, m.token()?);
    let b = m.node("b", &sb.host, &tb)?;
    b.wait_up(SLOW)?;
    let inbox = m.recv(&b)?;
    inbox.wait_connected(SLOW)?;
    let a = m.node("a", &sa.host, &ta)?;
    a.wait_up(SLOW)?;
    let direct_both = || {
        (a.path_to("b").as_deref() == Some("direct") && b.path_to("a").as_deref() == Some("direct"))
            .then_some(())
    };
    poll(
        SLOW,
        Duration::from_millis(25),
        "direct on both sides",
        direct_both,
    )?;
    let b_id = a.peer("b").map(|p| p.id.to_string()).context("a lists b")?;
    let pids = (a.status().map(|s| s.id), b.status().map(|s| s.id));

    // The stream: batches from one thread, each `meshnode send` done before
    // the next starts, so that their order is the stream's order.
    let flushed = Arc::new(AtomicBool::new(false));
    let sent = std::thread::scope(|s| -> Result<usize> {
        let sender = s.spawn(|| -> Result<usize> {
            for i in 0..BATCHES {
                a.send_numbered("b", &format!("s{i:02}"), BATCH)?;
                std::thread::sleep(BATCH_EVERY);
            }
            Ok(BATCHES * BATCH)
        });
        poll(SLOW, Duration::from_millis(10), "the first batches", || {
            (inbox.count() >= BEFORE * BATCH).then_some(())
        })?;
        sa.router().flush_mappings()?;
        flushed.store(true, Ordering::Relaxed);
        sender.join().expect("sender thread")
    })?;
    ensure!(flushed.load(Ordering::Relaxed));
    let flush_at = SystemTime::now();
    let t_flush = Instant::now();

    // Everything arrives, exactly once and in order.
    poll(SLOW, Duration::from_millis(20), "the whole stream", || {
        (inbox.count() >= sent).then_some(())
    })
    .with_context(|| format!("{} of {sent} arrived", inbox.count()))?;
    std::thread::sleep(Duration::from_millis(500));
    let got: Vec<String> = inbox.arrivals().into_iter().map(|a| a.msg.data).collect();
    let want: Vec<String> = (0..BATCHES)
        .flat_map(|i| (0..BATCH).map(move |j| format!("s{i:02}-{j}")))
        .collect();
    if got != want {
        let i = got.iter().zip(&want).position(|(g, w)| g != w);
        anyhow::bail!(
            "{} messages arrived, {} sent; first difference at {i:?}",
            got.len(),
            want.len()
        );
    }

    // Direct again on both sides, with the same processes.
    poll(
        SLOW,
        Duration::from_millis(25),
        "direct again on both sides",
        direct_both,
    )?;
    let recovered = t_flush.elapsed();
    ensure!(
        (a.status().map(|s| s.id), b.status().map(|s| s.id)) == pids,
        "a node restarted"
    );
    // The link's path changes from a little before the flush (the stream
    // took a moment to send) on.
    let since = flush_at - Duration::from_secs(10);
    let changes: Vec<String> = a
        .path_changes(&b_id)
        .into_iter()
        .filter(|c| c.at >= since)
        .map(|c| c.path)
        .collect();
    eprintln!(
        "{name}: {sent} messages exactly once and in order across the flush; \
         a→b path changes around it: {changes:?}; direct on both sides {} ms after the \
         stream ended",
        recovered.as_millis()
    );
    if kind == NatKind::SymmetricSequential {
        // The old direct path cannot survive a new port: the link must have
        // left it and come back.
        ensure!(
            changes.iter().any(|p| p != "direct")
                && changes.last().map(String::as_str) == Some("direct"),
            "the link did not leave the dead direct path and come back: {changes:?}"
        );
    }
    Ok(())
}

#[test]
fn cone_mappings_lost_while_a_stream_runs() {
    recovery_test("recov_pr", NatKind::PortRestricted);
}

#[test]
fn symmetric_mappings_lost_while_a_stream_runs() {
    recovery_test("recov_ss", NatKind::SymmetricSequential);
}
