//! Content distribution behind real kernel NATs (the netlab; needs root, `ip`, `nft`; fails
//! instead of skipping when `CI=true`).
//!
//! `nat_sites_fetch_from_each_other`: the origin (`hosting-server`) runs on the public host
//! next to the control server and the relay. Node `a` sits behind a port-restricted cone NAT,
//! `b` behind a full cone NAT and `c` behind a random symmetric NAT (reached directly only by
//! a birthday search, and through the relay until then). `a` fetches a 16 MiB file first
//! (from the origin: nobody else has it); then `b` and `c` fetch it at the same time and get
//! most of it from the peers, across whatever paths their links are on. Every copy matches
//! the origin's hash.

#[path = "support/content.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use peermesh_tests::meshlab::{run_bounded, MeshLab};
use peermesh_tests::netlab::{lab_or_skip, NatKind, SiteOpts};
use serde_json::Value;
use support::{blake3_file, make_file};

const SLOW: Duration = Duration::from_secs(60);
const ORIGIN_PORT: u16 = 8088;

fn lab_test(test: &str, body: impl FnOnce(&mut MeshLab) -> Result<()>) {
    let Some(lab) = lab_or_skip(test) else {
        return;
    };
    let mut mesh = MeshLab::new(test, lab).unwrap_or_else(|e| panic!("{test}: {e:#}"));
    if let Err(e) = body(&mut mesh) {
        mesh.dump_logs(40);
        panic!("{test}: {e:#}");
    }
}

/// `meshnode get --json` against `node`; the report.
fn get(node: &peermesh_tests::meshlab::MeshNode, id: &str, out: &std::path::Path) -> Result<Value> {
    let mut cmd: Command = node.client("get");
    cmd.arg(id).arg("-o").arg(out).arg("--json");
    let o = run_bounded(cmd, Duration::from_secs(240))?;
    ensure!(
        o.status.success(),
        "meshnode get on {}: {}",
        node.name,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).context("report")
}

#[test]
fn nat_sites_fetch_from_each_other() {
    lab_test("content_nat", |m| {
        m.start_public()?;
        let host = m.server().clone();
        let files = m.dir.path().join("origin-content");
        std::fs::create_dir_all(&files)?;
        let file = files.join("f.bin");
        make_file(&file, 16 << 20, 0xa11ce)?;
        let want = blake3_file(&file)?;
        let log = m.dir.path().join("origin.log");
        let mut cmd = Command::new(&peermesh_tests::Bins::get().hosting_server);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("{}:{ORIGIN_PORT}", host.ip()))
            .arg("--content")
            .arg(&files);
        m.spawn("origin", &host, cmd, &log)?;
        m.wait_log(&log, "listening on", "the origin to listen")?;
        // The published id, from the origin's log (`published id=… name=f.bin`).
        let text = std::fs::read_to_string(&log)?;
        let id = text
            .lines()
            .find(|l| l.contains("published") && l.contains("name=f.bin"))
            .and_then(|l| l.split("id=").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .context("the origin did not log the published id")?
            .to_string();
        let origin = format!("http://{}:{ORIGIN_PORT}", host.ip());

        let sa = m.site("sa", NatKind::PortRestricted, SiteOpts::default())?;
        let sb = m.site("sb", NatKind::FullCone, SiteOpts::default())?;
        let sc = m.site("sc", NatKind::SymmetricRandom, SiteOpts::default())?;
        let (ta, tb, tc) = (m.token()?, m.token()?, m.token()?);
        let extra = ["--origin", origin.as_str()];
        let a = m.node_with("a", &sa.host, &ta, &extra)?;
        let b = m.node_with("b", &sb.host, &tb, &extra)?;
        let c = m.node_with("c", &sc.host, &tc, &extra)?;
        for (n, others) in [(&a, ["b", "c"]), (&b, ["a", "c"]), (&c, ["a", "b"])] {
            n.wait_up(SLOW)?;
            for o in others {
                n.wait_peer(o, SLOW, Duration::from_millis(50))?;
            }
        }

        let out_a = m.dir.path().join("a.out");
        let ra = get(&a, &id, &out_a)?;
        ensure!(blake3_file(&out_a)? == want, "a's copy differs");
        ensure!(ra["bytes_from_origin"] == 16u64 << 20, "a: {ra}");

        let (out_b, out_c) = (m.dir.path().join("b.out"), m.dir.path().join("c.out"));
        let (rb, rc) = std::thread::scope(|s| {
            let hb = s.spawn(|| get(&b, &id, &out_b));
            let hc = s.spawn(|| get(&c, &id, &out_c));
            (hb.join().expect("b"), hc.join().expect("c"))
        });
        let (rb, rc) = (rb?, rc?);
        for (name, r, out) in [("b", &rb, &out_b), ("c", &rc, &out_c)] {
            ensure!(blake3_file(out)? == want, "{name}'s copy differs");
            ensure!(r["file_hash"] == want.as_str(), "{name}: {r}");
            let share = r["origin_share"].as_f64().unwrap_or(1.0);
            eprintln!(
                "{name}: origin share {:.1}%, peers {}",
                100.0 * share,
                r["peers"]
            );
            ensure!(
                share < 0.5,
                "{name} took {:.0}% from the origin: {r}",
                100.0 * share
            );
        }
        // c (random symmetric NAT) traded (its origin share is checked above),
        // whichever paths it had.
        eprintln!(
            "c's paths: to a {:?}, to b {:?}",
            c.path_to("a"),
            c.path_to("b")
        );
        Ok(())
    });
}
