//! The messages protocol: what `meshnode send` sends and `meshnode recv`
//! (or `sink`) prints, one protocol on the router like any other. The same
//! machinery serves the protocols named with `meshnode up --protocol NAME`
//! to local programs (scripts, programs in other languages), so that they
//! can talk to an application that embeds an endpoint.
//!
//! Messages from every peer wait in the protocol's queue until a `recv` or
//! `sink` client of the local API takes them; one client at a time holds
//! the [`Inbox`]. A message taken for a client that turned out to be gone is
//! held and handed to the next one, so none is lost.

use std::sync::Arc;

use peermesh_node::{Incoming, Message, ProtocolHandler, ProtocolId};
use tokio::sync::{oneshot, Mutex};

/// The protocol's name on the wire.
pub const PROTOCOL: &str = "/peermesh/message/1";

pub fn protocol() -> ProtocolId {
    ProtocolId::from_static(PROTOCOL)
}

enum Source {
    /// The router has not started the protocol yet.
    Waiting(oneshot::Receiver<Incoming>),
    Ready(Incoming),
    Gone,
}

/// Messages from peers waiting for a `recv` client.
pub struct Inbox {
    source: Source,
    held: Option<Message>,
}

impl Inbox {
    /// Cancel-safe: a held message is returned without waiting.
    pub async fn next(&mut self) -> Option<Message> {
        if let Some(m) = self.held.take() {
            return Some(m);
        }
        if let Source::Waiting(rx) = &mut self.source {
            self.source = match rx.await {
                Ok(incoming) => Source::Ready(incoming),
                Err(_) => Source::Gone,
            };
        }
        match &mut self.source {
            Source::Ready(incoming) => incoming.recv().await,
            _ => None,
        }
    }

    /// Gives back a message that could not be delivered to its client: the
    /// next client gets it first.
    pub fn hold(&mut self, m: Message) {
        self.held = Some(m);
    }
}

/// The protocol's handler: it hands the router's queue to the [`Inbox`].
pub struct MessagesHandler {
    tx: oneshot::Sender<Incoming>,
}

impl ProtocolHandler for MessagesHandler {
    async fn serve(self, incoming: Incoming) {
        let _ = self.tx.send(incoming);
    }
}

/// The inbox (shared by the local API's clients, one at a time) and the
/// handler to register on the router.
pub fn inbox() -> (Arc<Mutex<Inbox>>, MessagesHandler) {
    let (tx, rx) = oneshot::channel();
    (
        Arc::new(Mutex::new(Inbox {
            source: Source::Waiting(rx),
            held: None,
        })),
        MessagesHandler { tx },
    )
}
