//! A harness that runs the real peermesh binaries (control server, nodes) as
//! processes on loopback, for the integration tests and the demo.
//!
//! Every process writes its output to a log file in the harness's temporary
//! directory; when a test fails (the harness is dropped while panicking) the
//! tail of every log is printed, and every process is killed.

pub mod bench;
pub mod hosting;
pub mod meshlab;
pub mod netlab;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Paths of the binaries under test, built once per test process.
pub struct Bins {
    pub control_server: PathBuf,
    pub meshnode: PathBuf,
    pub hosting_server: PathBuf,
    /// `examples/endpoint.rs`: an application that embeds an endpoint.
    pub example_endpoint: PathBuf,
    /// `src/bin/content_adversary.rs`: a member that misbehaves on the content protocol.
    pub content_adversary: PathBuf,
}

/// The target directory of the running executable (target/<profile>).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir
}

impl Bins {
    /// Builds `control-server`, `meshnode`, `hosting-server`, the examples and this crate's
    /// programs (`content-adversary`) in the profile
    /// of the running test (a no-op when they are fresh) and returns their paths.
    pub fn get() -> &'static Bins {
        static BINS: OnceLock<Bins> = OnceLock::new();
        BINS.get_or_init(|| {
            let dir = profile_dir();
            let release = dir.file_name().is_some_and(|n| n == "release");
            let cargo = option_env!("CARGO").unwrap_or("cargo");
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace");
            let mut cmd = Command::new(cargo);
            // Cargo describes the test's package in CARGO_PKG_* and
            // CARGO_MANIFEST_* (and a few more); ring's build script watches
            // some of them, so passing them on would rebuild ring and all
            // above it here, and again in the next `cargo test`.
            for (name, _) in std::env::vars_os() {
                let n = name.to_string_lossy();
                if n.starts_with("CARGO_PKG_")
                    || n.starts_with("CARGO_MANIFEST_")
                    || matches!(
                        n.as_ref(),
                        "CARGO_CRATE_NAME"
                            | "CARGO_BIN_NAME"
                            | "CARGO_PRIMARY_PACKAGE"
                            | "CARGO_TARGET_TMPDIR"
                    )
                {
                    cmd.env_remove(&name);
                }
            }
            cmd.current_dir(workspace).args([
                "build",
                "--quiet",
                "-p",
                "peermesh-meshnode",
                "-p",
                "peermesh-control-server",
                "-p",
                "peermesh-hosting-server",
                "-p",
                "peermesh-examples",
                "-p",
                "peermesh-tests",
                "--bins",
            ]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo build for the binaries");
            assert!(status.success(), "building the binaries failed");
            Bins {
                control_server: dir.join("control-server"),
                meshnode: dir.join("meshnode"),
                hosting_server: dir.join("hosting-server"),
                example_endpoint: dir.join("endpoint"),
                content_adversary: dir.join("content-adversary"),
            }
        })
    }
}

/// A free TCP port on loopback (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Polls `f` every 25 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("log file {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env("NO_COLOR", "1");
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Self { child })
    }

    fn signal(&mut self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The running control server of a [`Lab`].
pub struct ControlServer {
    proc: Option<Proc>,
    pub addr: SocketAddr,
    pub data: PathBuf,
    log: PathBuf,
}

impl ControlServer {
    /// The server's URL: TLS, as a deployment uses it (the tokens pin the
    /// server's key; the admin CLI reads it from the data directory).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The server's URL without TLS (plaintext is taken from loopback).
    pub fn plaintext_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn start(&mut self) -> Result<()> {
        let mut cmd = Command::new(&Bins::get().control_server);
        cmd.arg("serve")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data")
            .arg(&self.data);
        let marker = std::fs::read_to_string(&self.log).unwrap_or_default().len();
        self.proc = Some(Proc::spawn("control-server", cmd, self.log.clone())?);
        let log = self.log.clone();
        wait_for(
            Duration::from_secs(20),
            "the control server to listen",
            || {
                let text = std::fs::read_to_string(&log).ok()?;
                text[marker.min(text.len())..]
                    .contains("listening on")
                    .then_some(())
            },
        )
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Starts the server again on the same address and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.start()
    }

    /// Runs `control-server admin …` and returns its output; fails on a
    /// non-zero exit.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        let out = self.admin_raw(args)?;
        if !out.status.success() {
            bail!(
                "control-server admin {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    pub fn admin_raw(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(&Bins::get().control_server)
            .arg("admin")
            .arg("--server")
            .arg(self.url())
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .env("NO_COLOR", "1")
            .output()?)
    }

    pub fn admin_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        Ok(serde_json::from_str(&self.admin(&a)?)?)
    }

    pub fn create_group(&self, name: &str) -> Result<()> {
        self.admin(&["create-group", name]).map(drop)
    }

    /// A relay token.
    pub fn relay_token(&self) -> Result<String> {
        Ok(self.admin(&["create-token", "--relay"])?.trim().to_string())
    }

    /// A join token for `group`, good for one node.
    pub fn token(&self, group: &str) -> Result<String> {
        Ok(self
            .admin(&["create-token", "--group", group, "--uses", "1"])?
            .trim()
            .to_string())
    }
}

/// A running `meshnode relay`.
pub struct Relay {
    proc: Option<Proc>,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Relay {
    /// SIGKILL the relay.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A process started with [`Lab::spawn`]; killed when dropped.
pub struct Process {
    _proc: Proc,
    pub log: PathBuf,
}

impl Process {
    /// Its output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A running `meshnode up`.
pub struct Node {
    proc: Option<Proc>,
    pub name: String,
    pub state: PathBuf,
    log: PathBuf,
}

impl Node {
    /// The process id, while the node runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    /// The node's status read in-process from its local API (cheaper than
    /// [`Self::status`], which runs the CLI), or None while it does not
    /// answer.
    pub fn status_typed(&self) -> Option<peermesh_base::status::NodeStatus> {
        let socket = peermesh_node::local_api::socket_path(&self.state);
        meshlab::runtime().block_on(async {
            tokio::time::timeout(
                Duration::from_secs(2),
                peermesh_meshnode::api::query(&socket),
            )
            .await
            .ok()?
            .ok()
        })
    }

    /// `meshnode status --json`, or None while the node does not answer.
    pub fn status(&self) -> Option<Value> {
        let out = Command::new(&Bins::get().meshnode)
            .arg("status")
            .arg("--state")
            .arg(&self.state)
            .arg("--json")
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn id(&self) -> Result<String> {
        let s = wait_for(Duration::from_secs(10), "node status", || self.status())?;
        Ok(s["id"].as_str().context("status has no id")?.to_string())
    }

    /// Names of the peers in this node's status.
    pub fn peer_names(&self) -> Option<Vec<String>> {
        let s = self.status()?;
        let mut names: Vec<String> = s["peers"]
            .as_array()?
            .iter()
            .filter_map(|p| p["name"].as_str().map(String::from))
            .collect();
        names.sort();
        Some(names)
    }

    /// The node's events so far (its local API keeps the recent ones).
    pub fn events(&self) -> Vec<peermesh_base::event::Event> {
        meshlab::events_at(&peermesh_node::local_api::socket_path(&self.state))
    }

    /// The path of the link to the peer named `name`, if listed.
    pub fn path_to(&self, name: &str) -> Option<String> {
        let s = self.status()?;
        s["peers"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["path"].as_str().map(String::from))
    }

    /// Runs a `meshnode` subcommand against this node's state and returns
    /// its stdout; fails on a non-zero exit.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&Bins::get().meshnode);
        cmd.arg(args[0])
            .arg("--state")
            .arg(&self.state)
            .args(&args[1..]);
        // A command that hangs fails the test instead of stalling it.
        meshlab::run_ok(cmd, Duration::from_secs(60))
    }

    /// Starts `meshnode recv --json` on this node, its output in a file.
    pub fn recv(&self, out: &Path) -> Result<std::process::Child> {
        let f = std::fs::File::create(out)?;
        Ok(Command::new(&Bins::get().meshnode)
            .arg("recv")
            .arg("--state")
            .arg(&self.state)
            .arg("--json")
            .stdout(f)
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// Waits until the node's peers are exactly `names`.
    pub fn wait_peers(&self, names: &[&str], timeout: Duration) -> Result<()> {
        let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        want.sort();
        wait_for(
            timeout,
            &format!("{} to list peers {want:?}", self.name),
            || (self.peer_names()? == want).then_some(()),
        )
    }

    /// The exit code once the process ended by itself.
    pub fn exit_code(&mut self) -> Option<i32> {
        let p = self.proc.as_mut()?;
        p.child.try_wait().ok()?.map(|s| s.code().unwrap_or(-1))
    }

    /// SIGKILL: the node gets no chance to finish a write or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM, then wait for the node to exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.signal("-TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while p.child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    p.kill9();
                    bail!("{} did not stop on SIGTERM", self.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A temporary directory holding one control server and its nodes.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub server: ControlServer,
    logs: Vec<(String, PathBuf)>,
}

impl Lab {
    /// Starts a control server on a free loopback port.
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("peermesh-lab-").tempdir()?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let log = dir.path().join("control-server.log");
        let mut server = ControlServer {
            proc: None,
            addr,
            data: dir.path().join("control-data"),
            log: log.clone(),
        };
        server.start()?;
        Ok(Self {
            dir,
            server,
            logs: vec![("control-server".into(), log)],
        })
    }

    fn node_state(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("node-{name}"))
    }

    /// `meshnode up` with `token` (None: a restart that reuses the state).
    pub fn node(&mut self, name: &str, token: Option<&str>, extra: &[&str]) -> Result<Node> {
        let url = self.server.url();
        self.node_at(&url, name, token, extra)
    }

    /// [`Self::node`] with the control server at `url`.
    pub fn node_at(
        &mut self,
        url: &str,
        name: &str,
        token: Option<&str>,
        extra: &[&str],
    ) -> Result<Node> {
        let state = self.node_state(name);
        let log = self.dir.path().join(format!("node-{name}.log"));
        let mut cmd = Command::new(&Bins::get().meshnode);
        cmd.arg("up")
            .arg("--control")
            .arg(url)
            .arg("--state")
            .arg(&state)
            .arg("--name")
            .arg(name)
            .args(extra);
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        let proc = Proc::spawn(name, cmd, log.clone())?;
        self.logs.push((format!("node {name}"), log.clone()));
        Ok(Node {
            proc: Some(proc),
            name: name.to_string(),
            state,
            log,
        })
    }

    /// Runs any program (an application under test) as a process of the lab:
    /// its output in `<name>.log`, killed when the returned handle drops.
    pub fn spawn(&mut self, name: &str, cmd: Command) -> Result<Process> {
        let log = self.dir.path().join(format!("{name}.log"));
        let proc = Proc::spawn(name, cmd, log.clone())?;
        self.logs.push((name.to_string(), log.clone()));
        Ok(Process { _proc: proc, log })
    }

    /// Where a node named `name` keeps its state (an embedding application
    /// may use it too).
    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.node_state(name)
    }

    /// Starts `meshnode relay` on a free loopback UDP port and waits until it
    /// is registered with the control server.
    pub fn relay(&mut self, name: &str) -> Result<Relay> {
        let token = self.server.relay_token()?;
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = self.dir.path().join(format!("relay-{name}.log"));
        let mut cmd = Command::new(&Bins::get().meshnode);
        cmd.arg("relay")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--control")
            .arg(self.server.url())
            .arg("--token")
            .arg(&token)
            .arg("--state")
            .arg(self.dir.path().join(format!("relay-{name}")));
        let proc = Proc::spawn(name, cmd, log.clone())?;
        self.logs.push((format!("relay {name}"), log.clone()));
        let l = log.clone();
        wait_for(Duration::from_secs(20), "the relay to register", || {
            std::fs::read_to_string(&l)
                .ok()?
                .contains("registered with the control server")
                .then_some(())
        })?;
        Ok(Relay {
            proc: Some(proc),
            addr,
            log,
        })
    }

    /// Prints the last lines of every log (for failing tests).
    pub fn dump_logs(&self) {
        for (name, path) in &self.logs {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(path) {
                let _ = f.read_to_string(&mut text);
            }
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "----- {name} ({}) -----\n{}",
                path.display(),
                tail.join("\n")
            );
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
            // Whole logs survive the temporary directory, for a post-mortem.
            let keep = std::env::temp_dir().join(format!(
                "peermesh-failed-{}",
                self.dir
                    .path()
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            ));
            if std::fs::create_dir_all(&keep).is_ok() {
                for (_, path) in &self.logs {
                    if let Some(name) = path.file_name() {
                        let _ = std::fs::copy(path, keep.join(name));
                    }
                }
                eprintln!("logs kept in {}", keep.display());
            }
        }
    }
}

/// Keeps the identity-bearing fields of `admin nodes --json`, dropping what
/// changes with time (online, last seen).
pub fn stable_nodes(v: &Value) -> Vec<Value> {
    let mut out: Vec<Value> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    serde_json::json!({
                        "id": n["id"], "name": n["name"], "group": n["group"],
                        "state": n["state"], "addresses": n["addresses"],
                        "joined_ms": n["joined_ms"], "token_id": n["token_id"],
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|n| n["id"].as_str().unwrap_or_default().to_string());
    out
}
