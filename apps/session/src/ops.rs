//! The session operation of the node's local API, and a client for it.
//!
//! One JSON line per request, `{"op":"session","action":…}` (the `meshnode`
//! binary's local API server hands those lines to [`answer`]):
//!
//! - `join` with `origin` (the origin's session endpoint, `IP:PORT` UDP) and
//!   `name`: answers `{"ok":true,"joined":{"session_id","slot","tick_hz"}}`.
//! - `buttons` with `buttons` (bits: 1 up, 2 down, 4 left, 8 right): the
//!   buttons the player holds from now on; answers `{"ok":true}`.
//! - `view` (optional `samples: true` adds the raw latency samples): answers
//!   `{"ok":true,"session":{…}}` ([`SessionView`]).
//! - `watch` with `every_ms`: one `{"ok":true,"session":{…}}` line every
//!   `every_ms` until the client closes the connection.
//! - `leave`: answers `{"ok":true,"left":bool}`.
//!
//! Errors answer `{"ok":false,"error":"…"}`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt};

use peermesh_node::error::Result;
use peermesh_node::local_api::{write_line, Connection};
use peermesh_node::NodeError;

use crate::state::SessionView;
use crate::{Joined, SessionHandle};

/// The `op` of the session lines.
pub const OP: &str = "session";

/// Shortest period of a `watch`: a view costs the node a replay of the
/// merged state, so a client cannot make it do that much more often than a
/// game renders (10 ms is 100 views a second).
pub const MIN_WATCH: Duration = Duration::from_millis(10);
/// Longest period of a `watch`: beyond a minute, a client wants a `view`.
pub const MAX_WATCH: Duration = Duration::from_secs(60);
/// The period of a `watch` that names none: about what a person reads.
pub const DEFAULT_WATCH: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Join,
    Buttons,
    View,
    Watch,
    Leave,
}

/// The body of `{"op":"session",…}` (the line is this object with
/// `"op":"session"` added).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRequest {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buttons: Option<u8>,
    #[serde(default)]
    pub samples: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
}

impl SessionRequest {
    fn new(action: Action) -> Self {
        Self {
            action,
            origin: None,
            name: None,
            buttons: None,
            samples: false,
            every_ms: None,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SessionAnswer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined: Option<Joined>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<bool>,
}

impl SessionAnswer {
    fn ok() -> Self {
        Self {
            ok: true,
            ..Default::default()
        }
    }
    fn err(e: impl ToString) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

/// A request line: `"op":"session"` first, then the request's fields (the
/// shape of the local API's `op`-tagged requests).
#[derive(Serialize)]
struct Line<'a> {
    op: &'static str,
    #[serde(flatten)]
    req: &'a SessionRequest,
}

/// The period of a `watch` asking for `every_ms`, within the bounds.
fn watch_period(every_ms: Option<u64>) -> Duration {
    every_ms
        .map_or(DEFAULT_WATCH, Duration::from_millis)
        .clamp(MIN_WATCH, MAX_WATCH)
}

/// Answers one session request on the local API (`handle` is `None` when the
/// node runs no session service); `reader` is the rest of the connection, read
/// only by a `watch` to notice the client leaving.
pub async fn answer(
    handle: Option<&SessionHandle>,
    req: SessionRequest,
    reader: &mut (impl AsyncBufRead + Unpin),
    w: &mut (impl AsyncWriteExt + Unpin),
) -> std::io::Result<()> {
    let Some(h) = handle else {
        return write_line(w, &SessionAnswer::err("this node runs no session service")).await;
    };
    let a = match req.action {
        Action::Join => match (&req.origin, &req.name) {
            (Some(origin), Some(name)) => match h.join(origin, name).await {
                Ok(j) => SessionAnswer {
                    joined: Some(j),
                    ..SessionAnswer::ok()
                },
                Err(e) => SessionAnswer::err(e),
            },
            _ => SessionAnswer::err("join needs `origin` and `name`"),
        },
        Action::Buttons => match req.buttons {
            Some(b) => match h.set_buttons(b).await {
                Ok(()) => SessionAnswer::ok(),
                Err(e) => SessionAnswer::err(e),
            },
            None => SessionAnswer::err("buttons needs `buttons`"),
        },
        Action::View => match h.view(req.samples).await {
            Ok(v) => SessionAnswer {
                session: Some(v),
                ..SessionAnswer::ok()
            },
            Err(e) => SessionAnswer::err(e),
        },
        Action::Leave => match h.leave().await {
            Ok(left) => SessionAnswer {
                left: Some(left),
                ..SessionAnswer::ok()
            },
            Err(e) => SessionAnswer::err(e),
        },
        Action::Watch => {
            let mut tick = tokio::time::interval(watch_period(req.every_ms));
            let mut buf = String::new();
            loop {
                tokio::select! {
                    r = reader.read_line(&mut buf) => match r {
                        // The client went away (or sent something: a watch takes no more requests).
                        Ok(0) | Err(_) => return Ok(()),
                        Ok(_) => buf.clear(),
                    },
                    _ = tick.tick() => {
                        let a = match h.view(req.samples).await {
                            Ok(v) => SessionAnswer { session: Some(v), ..SessionAnswer::ok() },
                            Err(e) => SessionAnswer::err(e),
                        };
                        write_line(w, &a).await?;
                    }
                }
            }
        }
    };
    write_line(w, &a).await
}

/// A game process's connection to its node.
pub struct SessionClient {
    conn: Connection,
}

impl SessionClient {
    /// Connects to the local API of a running node (`STATE/meshnode.sock`,
    /// [`peermesh_node::local_api::socket_path`]).
    pub async fn connect(socket: &Path) -> Result<Self> {
        Ok(Self {
            conn: Connection::connect(socket).await?,
        })
    }

    async fn next(&mut self) -> Result<SessionAnswer> {
        let a: SessionAnswer = self.conn.recv().await?;
        if !a.ok {
            return Err(NodeError::LocalApi(
                a.error.unwrap_or_else(|| "refused".into()),
            ));
        }
        Ok(a)
    }

    async fn send(&mut self, req: &SessionRequest) -> Result<()> {
        self.conn.send(&Line { op: OP, req }).await
    }

    async fn call(&mut self, req: SessionRequest) -> Result<SessionAnswer> {
        self.send(&req).await?;
        self.next().await
    }

    /// Joins the session `name` on the origin's session endpoint `origin` (IP:PORT).
    pub async fn join(&mut self, origin: &str, name: &str) -> Result<Joined> {
        let a = self
            .call(SessionRequest {
                origin: Some(origin.into()),
                name: Some(name.into()),
                ..SessionRequest::new(Action::Join)
            })
            .await?;
        a.joined
            .ok_or_else(|| NodeError::LocalApi("no join in the answer".into()))
    }

    pub async fn set_buttons(&mut self, buttons: u8) -> Result<()> {
        self.call(SessionRequest {
            buttons: Some(buttons),
            ..SessionRequest::new(Action::Buttons)
        })
        .await
        .map(drop)
    }

    pub async fn view(&mut self, samples: bool) -> Result<SessionView> {
        let a = self
            .call(SessionRequest {
                samples,
                ..SessionRequest::new(Action::View)
            })
            .await?;
        a.session
            .ok_or_else(|| NodeError::LocalApi("no session in the answer".into()))
    }

    pub async fn leave(&mut self) -> Result<bool> {
        Ok(self
            .call(SessionRequest::new(Action::Leave))
            .await?
            .left
            .unwrap_or(false))
    }

    /// Turns this connection into a stream of views, one every `every_ms`
    /// ([`ViewStream::next_view`]).
    pub async fn watch(mut self, every_ms: u64) -> Result<ViewStream> {
        self.send(&SessionRequest {
            every_ms: Some(every_ms),
            ..SessionRequest::new(Action::Watch)
        })
        .await?;
        Ok(ViewStream { client: self })
    }
}

/// The views of a `watch`.
pub struct ViewStream {
    client: SessionClient,
}

impl ViewStream {
    pub async fn next_view(&mut self) -> Result<SessionView> {
        self.client
            .next()
            .await?
            .session
            .ok_or_else(|| NodeError::LocalApi("no session in the answer".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[test]
    fn request_lines_keep_their_shape() {
        let join = SessionRequest {
            origin: Some("127.0.0.1:7000".into()),
            name: Some("g".into()),
            ..SessionRequest::new(Action::Join)
        };
        assert_eq!(
            serde_json::to_string(&Line { op: OP, req: &join }).unwrap(),
            r#"{"op":"session","action":"join","origin":"127.0.0.1:7000","name":"g","samples":false}"#
        );
        let watch = SessionRequest {
            every_ms: Some(50),
            ..SessionRequest::new(Action::Watch)
        };
        assert_eq!(
            serde_json::to_string(&Line {
                op: OP,
                req: &watch
            })
            .unwrap(),
            r#"{"op":"session","action":"watch","samples":false,"every_ms":50}"#
        );
        // The server side reads the body back (its `op` is the dispatcher's).
        let back: SessionRequest =
            serde_json::from_str(r#"{"op":"session","action":"buttons","buttons":5}"#).unwrap();
        assert_eq!((back.action, back.buttons), (Action::Buttons, Some(5)));
    }

    #[test]
    fn watch_periods_are_bounded() {
        assert_eq!(watch_period(None), DEFAULT_WATCH);
        assert_eq!(watch_period(Some(0)), MIN_WATCH);
        assert_eq!(watch_period(Some(250)), Duration::from_millis(250));
        assert_eq!(watch_period(Some(u64::MAX)), MAX_WATCH);
    }

    /// A client against a node without a session service: the refusal comes
    /// back as the client's error.
    #[tokio::test]
    async fn a_node_without_sessions_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = peermesh_node::local_api::socket_path(dir.path());
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["op"], OP);
            let req: SessionRequest = serde_json::from_value(v).unwrap();
            answer(None, req, &mut r, &mut w).await.unwrap();
        });
        let mut c = SessionClient::connect(&path).await.unwrap();
        let err = c.view(false).await.err().unwrap();
        assert!(
            matches!(&err, NodeError::LocalApi(e) if e == "this node runs no session service"),
            "{err}"
        );
        server.await.unwrap();
    }
}
