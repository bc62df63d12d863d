//! Shared by `tests/content.rs` and `benches/content.rs`: the origin (`hosting-server`) as a
//! process on loopback, a plain HTTP/1.1 GET, test files, and `meshnode get` runs.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use peermesh_tests::hosting::HostingServer;
use peermesh_tests::{wait_for, Bins};
use serde_json::Value;

/// A running `hosting-server serve` on loopback.
pub struct Origin {
    server: HostingServer,
}

impl std::ops::Deref for Origin {
    type Target = HostingServer;
    fn deref(&self) -> &HostingServer {
        &self.server
    }
}

impl Origin {
    pub fn start(content: &Path, log: PathBuf) -> Result<Self> {
        let origin = Self {
            server: HostingServer::spawn(content, &[], log)?,
        };
        wait_for(Duration::from_secs(60), "the origin to listen", || {
            origin.log_text().contains("listening on").then_some(())
        })?;
        Ok(origin)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `GET path`, the status code and body.
    pub fn get(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        http_get(self.addr, path)
    }

    pub fn json(&self, path: &str) -> Result<Value> {
        let (code, body) = self.get(path)?;
        ensure!(code == 200, "GET {path}: {code}");
        Ok(serde_json::from_slice(&body)?)
    }

    /// The content id of the published file `name`.
    pub fn content_id(&self, name: &str) -> Result<String> {
        let list = self.json("/content")?;
        list.as_array()
            .context("list")?
            .iter()
            .find(|i| i["name"] == name)
            .and_then(|i| i["id"].as_str().map(String::from))
            .with_context(|| format!("{name} is not published: {list}"))
    }

    /// Chunk body bytes the origin has served so far.
    pub fn chunk_bytes(&self) -> Result<u64> {
        self.json("/stats")?["chunk_bytes"]
            .as_u64()
            .context("stats.chunk_bytes")
    }
}

pub use peermesh_tests::hosting::http_get;

/// `size` pseudo-random bytes (xorshift; every chunk distinct).
pub fn make_file(path: &Path, size: usize, seed: u64) -> Result<()> {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(path, data)?;
    Ok(())
}

pub fn blake3_file(path: &Path) -> Result<String> {
    let data = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    Ok(blake3::hash(&data).to_hex().to_string())
}

/// A `meshnode get --json` running against a node.
pub struct Get {
    child: Child,
    pub node: String,
    pub output: PathBuf,
    started: Instant,
}

impl Drop for Get {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Get {
    pub fn spawn(node: &peermesh_tests::Node, id: &str, output: PathBuf) -> Result<Self> {
        Self::spawn_with(node, id, output, true)
    }

    /// `meshnode get`, with `--json` or printing the human-readable report.
    pub fn spawn_with(
        node: &peermesh_tests::Node,
        id: &str,
        output: PathBuf,
        json: bool,
    ) -> Result<Self> {
        let mut cmd = Command::new(&Bins::get().meshnode);
        cmd.arg("get")
            .arg("--state")
            .arg(&node.state)
            .arg(id)
            .arg("-o")
            .arg(&output);
        if json {
            cmd.arg("--json");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(Self {
            child,
            node: node.name.clone(),
            output,
            started: Instant::now(),
        })
    }

    /// Waits (bounded) for the report; also returns the wall time since the spawn.
    pub fn wait(self, timeout: Duration) -> Result<(Value, Duration)> {
        let node = self.node.clone();
        let (out, elapsed) = self.wait_output(timeout)?;
        let v: Value = serde_json::from_str(out.trim())
            .with_context(|| format!("report of {node}: {out:?}"))?;
        Ok((v, elapsed))
    }

    /// Waits (bounded) for the command to succeed; its stdout and the wall time since the
    /// spawn.
    pub fn wait_output(mut self, timeout: Duration) -> Result<(String, Duration)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let elapsed = self.started.elapsed();
                let mut out = String::new();
                let mut err = String::new();
                if let Some(mut o) = self.child.stdout.take() {
                    o.read_to_string(&mut out)?;
                }
                if let Some(mut e) = self.child.stderr.take() {
                    e.read_to_string(&mut err)?;
                }
                if !status.success() {
                    bail!("meshnode get on {} failed ({status}): {err}", self.node);
                }
                return Ok((out, elapsed));
            }
            if Instant::now() > deadline {
                bail!("meshnode get on {} took longer than {timeout:?}", self.node);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `(node, peer, path)` for every pair of `nodes` whose link is not up (relay or direct)
/// yet, as the nodes' status says.
pub fn links_down(nodes: &[&peermesh_tests::Node]) -> Vec<(String, String, String)> {
    let mut down = Vec::new();
    for n in nodes {
        let s = n.status();
        for o in nodes.iter().filter(|o| o.name != n.name) {
            let path = s
                .as_ref()
                .and_then(|s| {
                    s["peers"]
                        .as_array()?
                        .iter()
                        .find(|p| p["name"] == o.name.as_str())
                        .and_then(|p| p["path"].as_str().map(String::from))
                })
                .unwrap_or_else(|| "unlisted".into());
            if path != "relay" && path != "direct" {
                down.push((n.name.clone(), o.name.clone(), path));
            }
        }
    }
    down
}

/// Waits until every node lists all the others with a link up (relay or direct); on
/// timeout the error lists the links that are not up.
pub fn wait_mesh(nodes: &[&peermesh_tests::Node], timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let down = links_down(nodes);
        if down.is_empty() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "after {timeout:?}, {} links are not up: {:?}",
                down.len(),
                &down[..down.len().min(20)]
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
