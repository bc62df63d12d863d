//! The origin (`hosting-server serve`) for tests, benchmarks and examples.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{free_port, Bins};

/// A running `hosting-server serve` on a free loopback port, killed on drop.
pub struct HostingServer {
    child: Child,
    /// Its HTTP address.
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl HostingServer {
    /// Starts it serving `content`, with `extra` more `serve` flags, its
    /// output in `log`. Callers wait for what they need from the log.
    pub fn spawn(content: &Path, extra: &[&str], log: PathBuf) -> Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&Bins::get().hosting_server)
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--content")
            .arg(content)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning hosting-server")?;
        Ok(Self { child, addr, log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HostingServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over HTTP/1.1: the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok((code, buf[end + 4..].to_vec()))
}
