//! The session ops of the node's status socket, and a client for them.
//!
//! One JSON line per request, `{"op":"session","action":…}`:
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

use super::state::SessionView;
use super::{Joined, SessionHandle};
use crate::error::{NodeError, Result};
use crate::status::write_line;
use crate::status::Request;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Join,
    Buttons,
    View,
    Watch,
    Leave,
}

/// The body of `{"op":"session",…}`.
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

/// Shortest and longest period of a `watch`.
const WATCH_MS: (u64, u64) = (10, 60_000);

/// Answers one session request on the status socket.
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
            let every = req.every_ms.unwrap_or(1000).clamp(WATCH_MS.0, WATCH_MS.1);
            let mut tick = tokio::time::interval(Duration::from_millis(every));
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
    client: crate::status::Client,
}

impl SessionClient {
    /// Connects to the status socket of a running node (`STATE/meshnode.sock`).
    pub async fn connect(socket: &Path) -> Result<Self> {
        Ok(Self {
            client: crate::status::Client::connect(socket).await?,
        })
    }

    async fn next(&mut self) -> Result<SessionAnswer> {
        let a: SessionAnswer = self.client.read_line().await?;
        if !a.ok {
            return Err(NodeError::Status(
                a.error.unwrap_or_else(|| "refused".into()),
            ));
        }
        Ok(a)
    }

    async fn call(&mut self, req: SessionRequest) -> Result<SessionAnswer> {
        self.client.write_request(&Request::Session(req)).await?;
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
            .ok_or_else(|| NodeError::Status("no join in the answer".into()))
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
            .ok_or_else(|| NodeError::Status("no session in the answer".into()))
    }

    pub async fn leave(&mut self) -> Result<bool> {
        Ok(self
            .call(SessionRequest::new(Action::Leave))
            .await?
            .left
            .unwrap_or(false))
    }

    /// Turns this connection into a stream of views, one every `every_ms`
    /// ([`Self::next_view`]).
    pub async fn watch(mut self, every_ms: u64) -> Result<ViewStream> {
        self.client
            .write_request(&Request::Session(SessionRequest {
                every_ms: Some(every_ms),
                ..SessionRequest::new(Action::Watch)
            }))
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
            .ok_or_else(|| NodeError::Status("no session in the answer".into()))
    }
}
