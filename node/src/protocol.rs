//! Application protocols over a peer link.
//!
//! A link carries one exactly-once, in-order message stream; every
//! application (messages, IP packets of the TUN interface, content, game
//! inputs, or one of an embedder's own) shares it. Each message names its
//! protocol (an ALPN-like string such as `/peermesh/ip/1`) in a short
//! header, and the link worker hands it straight to that protocol's queue
//! (the [`Dispatch`] table the [`crate::Router`] installs), so a slow
//! application holds up only the links that feed it, never the mesh actor.
//!
//! Wire form of one link message: `[name length: u8][name][payload]`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use peermesh_base::NodeId;
use tokio::sync::{mpsc, Notify};

/// Largest payload of one message (the header comes on top): large enough
/// for a whole IP packet at the TUN interface's 65535-byte maximum MTU.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Longest protocol name. Names travel with every message, so they stay short.
pub const MAX_NAME: usize = 64;
/// Largest link message: a payload with the longest header.
pub const MAX_LINK_MESSAGE: usize = MAX_MESSAGE + 1 + MAX_NAME;
/// Messages queued for one protocol (from every peer) before the links that
/// deliver to it wait: room for a burst at full link speed, bounded memory.
pub const PROTOCOL_QUEUE: usize = 4096;

/// The name of an application protocol, e.g. `/peermesh/content/1`: 1 to
/// [`MAX_NAME`] bytes of visible ASCII. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ProtocolId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol name {0:?}: 1-{MAX_NAME} visible ASCII characters")]
pub struct BadProtocolId(pub String);

impl ProtocolId {
    pub fn new(name: &str) -> Result<Self, BadProtocolId> {
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME
            && name.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Self(name.into()))
        } else {
            Err(BadProtocolId(name.to_string()))
        }
    }

    /// For names fixed in the source; panics on a bad one (a bug).
    pub fn from_static(name: &'static str) -> Self {
        Self::new(name).expect("a valid protocol name")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `payload` as a link message of this protocol.
    pub fn encode(&self, payload: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(1 + self.0.len() + payload.len());
        b.put_u8(self.0.len() as u8);
        b.put_slice(self.0.as_bytes());
        b.put_slice(payload);
        b.freeze()
    }
}

impl fmt::Display for ProtocolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ProtocolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProtocolId({})", self.0)
    }
}

/// The protocol name and payload of a link message; `None` when the header
/// is cut short or empty (a hostile or broken peer): the caller drops and
/// counts it. Never panics (fuzzed: `fuzz/fuzz_targets/protocol_header.rs`).
pub fn decode(mut msg: Bytes) -> Option<(Bytes, Bytes)> {
    let len = usize::from(*msg.first()?);
    if len == 0 || msg.len() < 1 + len {
        return None;
    }
    let _ = msg.split_to(1);
    let name = msg.split_to(len);
    Some((name, msg))
}

/// One message from a member, for the protocol that runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: NodeId,
    pub data: Bytes,
}

/// Why a message from a peer was not handed on.
#[derive(Debug, PartialEq, Eq)]
pub enum Undelivered {
    /// No header, or a cut one.
    Malformed,
    /// No protocol of that name runs on this node.
    NoConsumer,
}

/// The table from protocol names to their queues, shared by every link
/// worker. Installed once by the router; until then deliveries wait for it
/// (backpressure on those links only), so nothing that arrives between the
/// endpoint's start and the router's is lost. Read without a lock.
#[derive(Default)]
pub struct Dispatch {
    table: OnceLock<HashMap<Bytes, mpsc::Sender<Message>>>,
    installed: Notify,
}

impl Dispatch {
    /// Installs the table; false if one was installed already.
    pub(crate) fn install(&self, table: HashMap<Bytes, mpsc::Sender<Message>>) -> bool {
        let fresh = self.table.set(table).is_ok();
        self.installed.notify_waiters();
        fresh
    }

    async fn table(&self) -> &HashMap<Bytes, mpsc::Sender<Message>> {
        loop {
            let wait = self.installed.notified();
            if let Some(t) = self.table.get() {
                return t;
            }
            wait.await;
        }
    }

    /// Hands a link message from `from` to its protocol's queue, waiting
    /// while the queue is full (backpressure on this link only).
    pub async fn deliver(&self, from: NodeId, msg: Bytes) -> Result<(), Undelivered> {
        let (name, data) = decode(msg).ok_or(Undelivered::Malformed)?;
        let tx = self
            .table()
            .await
            .get(&name)
            .ok_or(Undelivered::NoConsumer)?;
        tx.send(Message { from, data })
            .await
            .map_err(|_| Undelivered::NoConsumer)
    }
}

/// One bounded queue per protocol: the sending halves for the dispatch
/// table, the receiving halves for the protocols.
pub(crate) fn queue() -> (mpsc::Sender<Message>, mpsc::Receiver<Message>) {
    mpsc::channel(PROTOCOL_QUEUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node() -> NodeId {
        NodeId::from_bytes(&[0, 36, 8, 1, 18, 32, 7]).unwrap()
    }

    #[test]
    fn names_round_trip_and_bad_headers_are_refused() {
        let p = ProtocolId::from_static("/peermesh/ip/1");
        let (name, payload) = decode(p.encode(b"hello")).unwrap();
        assert_eq!(
            (&name[..], &payload[..]),
            (&b"/peermesh/ip/1"[..], &b"hello"[..])
        );
        let (_, empty) = decode(p.encode(b"")).unwrap();
        assert!(empty.is_empty());
        assert_eq!(decode(Bytes::new()), None);
        assert_eq!(decode(Bytes::from_static(&[0, 1, 2])), None);
        assert_eq!(decode(Bytes::from_static(&[5, b'a'])), None);
        assert!(ProtocolId::new("").is_err());
        assert!(ProtocolId::new("has space").is_err());
        assert!(ProtocolId::new(&"x".repeat(MAX_NAME + 1)).is_err());
        assert!(ProtocolId::new(&"x".repeat(MAX_NAME)).is_ok());
    }

    #[tokio::test]
    async fn messages_reach_their_protocol_and_unknown_ones_never_block() {
        let d = Dispatch::default();
        let (tx, mut rx) = queue();
        let content = ProtocolId::from_static("/peermesh/content/1");
        d.install(HashMap::from([(
            Bytes::from_static(b"/peermesh/content/1"),
            tx,
        )]));
        d.deliver(node(), content.encode(b"c")).await.unwrap();
        for _ in 0..3 {
            assert_eq!(
                d.deliver(node(), ProtocolId::from_static("/x/1").encode(b"p"))
                    .await,
                Err(Undelivered::NoConsumer)
            );
        }
        assert_eq!(
            d.deliver(node(), Bytes::from_static(&[9])).await,
            Err(Undelivered::Malformed)
        );
        let m = rx.recv().await.unwrap();
        assert_eq!((m.from, &m.data[..]), (node(), &b"c"[..]));
        assert!(!d.install(HashMap::new()), "installed once");
    }

    #[tokio::test]
    async fn deliveries_wait_for_the_router() {
        let d = Arc::new(Dispatch::default());
        let waiting = tokio::spawn({
            let d = d.clone();
            async move {
                d.deliver(node(), ProtocolId::from_static("/a/1").encode(b"early"))
                    .await
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let (tx, mut rx) = queue();
        d.install(HashMap::from([(Bytes::from_static(b"/a/1"), tx)]));
        waiting.await.unwrap().unwrap();
        assert_eq!(&rx.recv().await.unwrap().data[..], b"early");
    }

    proptest! {
        #[test]
        fn arbitrary_messages_decode_or_are_refused(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Some((name, payload)) = decode(Bytes::from(b.clone())) {
                prop_assert_eq!(usize::from(b[0]), name.len());
                prop_assert_eq!(name.len() + payload.len() + 1, b.len());
            }
        }
    }
}
