//! Protocols register on a router, in the manner of iroh's
//! `Router::builder(endpoint).accept(ALPN, handler)`: the endpoint knows no
//! application; each application names its protocol and says how to serve
//! the messages of it. Adding a protocol is one `accept`.
//!
//! ```no_run
//! # async fn demo(endpoint: peermesh_node::Endpoint) {
//! use peermesh_node::{Incoming, ProtocolId, Router};
//! const ECHO: &str = "/example/echo/1";
//! let echo = endpoint.sender(ProtocolId::from_static(ECHO));
//! let router = Router::builder(endpoint)
//!     .accept(ProtocolId::from_static(ECHO), move |mut incoming: Incoming| async move {
//!         while let Some(m) = incoming.recv().await {
//!             let _ = echo.send(m.from, &m.data).await;
//!         }
//!     })
//!     .spawn();
//! # drop(router);
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::endpoint::Endpoint;
use crate::protocol::{queue, Message, ProtocolId};

/// The messages of one protocol from every member, in order per member.
/// Each member can have at most its flow's credit of them waiting here (the
/// messages the handler has not dropped yet); beyond that, its sender waits
/// for the handler, and nobody else does.
pub struct Incoming {
    rx: mpsc::UnboundedReceiver<Message>,
}

impl Incoming {
    /// The next message; `None` once the endpoint is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next message if one is queued already (a handler that works in
    /// batches takes what is there without waiting).
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }
}

/// An application protocol: it serves the messages of its protocol until
/// the endpoint stops. Implemented by every `FnOnce(Incoming) -> Future`.
pub trait ProtocolHandler: Send + 'static {
    fn serve(self, incoming: Incoming) -> impl Future<Output = ()> + Send + 'static;
}

impl<F, Fut> ProtocolHandler for F
where
    F: FnOnce(Incoming) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn serve(self, incoming: Incoming) -> impl Future<Output = ()> + Send + 'static {
        self(incoming)
    }
}

type BoxedServe = Box<dyn FnOnce(Incoming) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Collects protocols, then starts them all at once.
pub struct RouterBuilder {
    endpoint: Endpoint,
    protocols: Vec<(ProtocolId, BoxedServe)>,
}

impl RouterBuilder {
    /// Serves `protocol` with `handler`. A protocol registered twice is a
    /// bug in the program, and panics.
    pub fn accept(mut self, protocol: ProtocolId, handler: impl ProtocolHandler) -> Self {
        assert!(
            !self.protocols.iter().any(|(p, _)| *p == protocol),
            "protocol {protocol} registered twice"
        );
        self.protocols.push((
            protocol,
            Box::new(move |incoming| Box::pin(handler.serve(incoming))),
        ));
        self
    }

    /// Installs the protocols on the endpoint and starts their handlers.
    /// Messages of any other protocol are dropped and counted per link
    /// (`undeliverable`).
    pub fn spawn(self) -> Router {
        let mut table = HashMap::new();
        let mut tasks = Vec::new();
        for (protocol, serve) in self.protocols {
            let (tx, rx) = queue();
            table.insert(Bytes::copy_from_slice(protocol.as_str().as_bytes()), tx);
            tasks.push(tokio::spawn(serve(Incoming { rx })));
        }
        let fresh = self.endpoint.dispatch().install(table);
        assert!(fresh, "one router per endpoint");
        Router {
            endpoint: self.endpoint,
            tasks,
        }
    }
}

/// The running protocols of an endpoint; dropping it stops their handlers.
pub struct Router {
    endpoint: Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

impl Router {
    pub fn builder(endpoint: Endpoint) -> RouterBuilder {
        RouterBuilder {
            endpoint,
            protocols: Vec::new(),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Stops the protocol handlers, then the endpoint.
    pub async fn shutdown(self) -> crate::endpoint::Stopped {
        for t in &self.tasks {
            t.abort();
        }
        self.endpoint.shutdown().await
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
