//! The framing of the local API: the Unix socket in a node's state
//! directory through which the `meshnode` CLI and other local programs
//! (a game process, a script) use a running node. One JSON object per line
//! each way. The server and the operations are the `meshnode` binary's
//! (it is the only crate that knows every application); this module is
//! what every client and the server share.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{NodeError, Result};

/// The socket's name in the state directory.
pub const SOCKET: &str = "meshnode.sock";
/// Longest request line a server accepts (a batch of messages).
pub const MAX_REQUEST: usize = 4 << 20;

/// The local API socket of the node whose state directory is `state`.
pub fn socket_path(state: &Path) -> PathBuf {
    state.join(SOCKET)
}

/// One JSON line (requests and answers of every operation).
pub async fn write_line<T: Serialize>(
    w: &mut (impl AsyncWriteExt + Unpin),
    v: &T,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(v).expect("lines serialize");
    out.push(b'\n');
    w.write_all(&out).await
}

/// A connection to a running node's local API.
pub struct Connection {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    socket: PathBuf,
}

impl Connection {
    pub async fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            NodeError::LocalApi(format!(
                "cannot reach the node at {} ({e}); is `meshnode up` running with this --state?",
                socket.display()
            ))
        })?;
        let (r, w) = stream.into_split();
        Ok(Self {
            reader: BufReader::new(r),
            writer: w,
            socket: socket.to_path_buf(),
        })
    }

    fn io(&self, e: std::io::Error) -> NodeError {
        NodeError::LocalApi(format!("node socket {}: {e}", self.socket.display()))
    }

    /// Sends one request line.
    pub async fn send<T: Serialize>(&mut self, req: &T) -> Result<()> {
        write_line(&mut self.writer, req)
            .await
            .map_err(|e| self.io(e))
    }

    /// The next answer line.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T> {
        self.recv_or_end()
            .await?
            .ok_or_else(|| NodeError::LocalApi("the node closed the connection".into()))
    }

    /// The next answer line, or `None` where the node ended the answer
    /// (closed its side).
    pub async fn recv_or_end<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| self.io(e))?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| NodeError::LocalApi(format!("malformed answer from the node: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_round_trip_and_errors_name_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let err = Connection::connect(&path).await.err().unwrap();
        assert!(err.to_string().contains("meshnode up"), "{err}");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            write_line(&mut w, &serde_json::json!({"echo": v}))
                .await
                .unwrap();
            w.write_all(b"not json\n").await.unwrap();
        });
        let mut c = Connection::connect(&path).await.unwrap();
        c.send(&serde_json::json!({"op": "x"})).await.unwrap();
        let a: serde_json::Value = c.recv().await.unwrap();
        assert_eq!(a["echo"]["op"], "x");
        assert!(c.recv::<serde_json::Value>().await.is_err());
        server.await.unwrap();
        assert!(c.recv::<serde_json::Value>().await.is_err(), "closed");
    }
}
