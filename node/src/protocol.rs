//! Application protocols over a peer link.
//!
//! A link carries one exactly-once, in-order message stream; every
//! application (messages, IP packets of the TUN interface, content, game
//! inputs, or one of an embedder's own) shares it. Each message names its
//! protocol (an ALPN-like string such as `/peermesh/ip/1`) in a short
//! header. Every protocol is a flow of its own with its own credit
//! (`peermesh_traversal::flow_control`): the link worker hands each message
//! to its protocol's queue at once and never waits for an application, and
//! a protocol whose application is slow or gone pushes back on that
//! protocol's senders only (they run out of credit); every other protocol,
//! every other peer and the link's own keep-alives go on.
//!
//! Wire form of one link message: `[name length: u8][name][payload]`; a
//! length of 0 marks the link's own control messages ([`Control`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use peermesh_base::NodeId;
use tokio::sync::{mpsc, Notify};

/// Largest payload of one message (the header comes on top): large enough
/// for a whole IP packet at the TUN interface's 65535-byte maximum MTU.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Longest protocol name. Names travel with every message, so they stay short.
pub const MAX_NAME: usize = 64;
/// Largest link message: a payload with the longest header.
pub const MAX_LINK_MESSAGE: usize = MAX_MESSAGE + 1 + MAX_NAME;

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

    /// The name as the wire carries it.
    pub(crate) fn wire_name(&self) -> Bytes {
        Bytes::copy_from_slice(self.0.as_bytes())
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

/// The protocol name and payload of an application message; `None` when
/// the header is cut short, or for a control message (length 0). Never
/// panics (fuzzed: `fuzz/fuzz_targets/protocol_header.rs`).
pub fn decode(mut msg: Bytes) -> Option<(Bytes, Bytes)> {
    let len = usize::from(*msg.first()?);
    if len == 0 || msg.len() < 1 + len {
        return None;
    }
    let _ = msg.split_to(1);
    let name = msg.split_to(len);
    Some((name, msg))
}

/// The link's own messages, beside the applications'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// The receiver of `protocol` lets the sender have `limit` of its
    /// messages in all (see `peermesh_traversal::flow_control`).
    Grant { protocol: Bytes, limit: u64 },
}

/// Control message kinds on the wire, after the 0 length byte.
const CONTROL_GRANT: u8 = 1;

impl Control {
    pub fn encode(&self) -> Bytes {
        match self {
            Control::Grant { protocol, limit } => {
                let mut b = BytesMut::with_capacity(3 + protocol.len() + 8);
                b.put_u8(0);
                b.put_u8(CONTROL_GRANT);
                b.put_u8(protocol.len() as u8);
                b.put_slice(protocol);
                b.put_u64(*limit);
                b.freeze()
            }
        }
    }

    /// A control message; `None` for an application message or a malformed
    /// one. Never panics (fuzzed with [`decode`]).
    pub fn decode(mut msg: Bytes) -> Option<Self> {
        if msg.len() < 3 || msg[0] != 0 {
            return None;
        }
        msg.advance(1);
        match msg.get_u8() {
            CONTROL_GRANT => {
                let len = usize::from(msg.get_u8());
                if len == 0 || len > MAX_NAME || msg.len() != len + 8 {
                    return None;
                }
                let protocol = msg.split_to(len);
                Some(Control::Grant {
                    protocol,
                    limit: msg.get_u64(),
                })
            }
            _ => None,
        }
    }
}

/// Whether a link message is one of the link's own.
pub fn is_control(msg: &[u8]) -> bool {
    msg.first() == Some(&0)
}

/// The application's hold on a message's credit: when the message is
/// dropped (the application is done with it), its sender may send one more
/// of that protocol.
#[derive(Debug)]
pub(crate) struct Credit {
    released: Arc<AtomicU64>,
    wake: Arc<Notify>,
}

impl Credit {
    pub(crate) fn new(released: Arc<AtomicU64>, wake: Arc<Notify>) -> Self {
        Self { released, wake }
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        self.released.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// One message from a member, for the protocol that runs it. Dropping it
/// gives its credit back to the sender's flow.
#[derive(Debug)]
pub struct Message {
    pub from: NodeId,
    pub data: Bytes,
    pub(crate) _credit: Option<Credit>,
}

impl Message {
    /// A message that holds no credit (tests, and applications that pass
    /// messages on).
    pub fn new(from: NodeId, data: Bytes) -> Self {
        Self {
            from,
            data,
            _credit: None,
        }
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.from == other.from && self.data == other.data
    }
}

impl Eq for Message {}

/// Why a message from a peer was not handed on.
#[derive(Debug, PartialEq, Eq)]
pub enum Undelivered {
    /// No protocol of that name runs on this node.
    NoConsumer,
}

/// The table from protocol names to their queues, shared by every link
/// worker. Installed once by the router; until then links leave what they
/// received in their streams (which then push back), so nothing that
/// arrives between the endpoint's start and the router's is lost. Read
/// without a lock.
#[derive(Default)]
pub struct Dispatch {
    table: OnceLock<HashMap<Bytes, mpsc::UnboundedSender<Message>>>,
    installed: Notify,
}

impl Dispatch {
    /// Installs the table; false if one was installed already.
    pub(crate) fn install(&self, table: HashMap<Bytes, mpsc::UnboundedSender<Message>>) -> bool {
        let fresh = self.table.set(table).is_ok();
        self.installed.notify_waiters();
        fresh
    }

    /// Whether the router has installed its table.
    pub fn is_installed(&self) -> bool {
        self.table.get().is_some()
    }

    /// Whether a protocol of this name runs here.
    pub fn serves(&self, protocol: &Bytes) -> bool {
        self.table.get().is_some_and(|t| t.contains_key(protocol))
    }

    /// Resolves once the table is installed.
    pub async fn installed(&self) {
        loop {
            let wait = self.installed.notified();
            if self.is_installed() {
                return;
            }
            wait.await;
        }
    }

    /// Hands a message to its protocol's queue, at once: the queue is
    /// unbounded, and what a peer can put in it is bounded by the credit
    /// its flow has. Call only once [`Self::is_installed`].
    pub(crate) fn deliver(
        &self,
        from: NodeId,
        protocol: &Bytes,
        data: Bytes,
        credit: Option<Credit>,
    ) -> Result<(), Undelivered> {
        let tx = self
            .table
            .get()
            .and_then(|t| t.get(protocol))
            .ok_or(Undelivered::NoConsumer)?;
        tx.send(Message {
            from,
            data,
            _credit: credit,
        })
        .map_err(|_| Undelivered::NoConsumer)
    }
}

/// One queue per protocol (from every peer): unbounded, since each peer's
/// share of it is bounded by its flow's credit.
pub(crate) fn queue() -> (
    mpsc::UnboundedSender<Message>,
    mpsc::UnboundedReceiver<Message>,
) {
    mpsc::unbounded_channel()
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

    #[test]
    fn grants_round_trip_and_are_told_from_application_messages() {
        let g = Control::Grant {
            protocol: Bytes::from_static(b"/peermesh/ip/1"),
            limit: 1 << 40,
        };
        let wire = g.encode();
        assert!(is_control(&wire));
        assert_eq!(Control::decode(wire.clone()), Some(g));
        assert_eq!(decode(wire), None, "not an application message");
        let app = ProtocolId::from_static("/a/1").encode(b"x");
        assert!(!is_control(&app));
        assert_eq!(Control::decode(app), None);
        assert_eq!(Control::decode(Bytes::from_static(&[0, 9, 1, b'a'])), None);
        assert_eq!(Control::decode(Bytes::from_static(&[0, 1, 0])), None);
    }

    #[tokio::test]
    async fn messages_reach_their_protocol_and_credit_comes_back_on_drop() {
        let d = Dispatch::default();
        assert!(!d.is_installed());
        let (tx, mut rx) = queue();
        d.install(HashMap::from([(
            Bytes::from_static(b"/peermesh/content/1"),
            tx,
        )]));
        d.installed().await;
        let released = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(Notify::new());
        let credit = Credit::new(released.clone(), wake.clone());
        d.deliver(
            node(),
            &Bytes::from_static(b"/peermesh/content/1"),
            Bytes::from_static(b"c"),
            Some(credit),
        )
        .unwrap();
        assert_eq!(
            d.deliver(node(), &Bytes::from_static(b"/x/1"), Bytes::new(), None),
            Err(Undelivered::NoConsumer)
        );
        let m = rx.recv().await.unwrap();
        assert_eq!((m.from, &m.data[..]), (node(), &b"c"[..]));
        assert_eq!(
            released.load(Ordering::Relaxed),
            0,
            "held by the application"
        );
        drop(m);
        assert_eq!(released.load(Ordering::Relaxed), 1);
        wake.notified().await; // the drop woke the link
        assert!(!d.install(HashMap::new()), "installed once");
    }

    proptest! {
        #[test]
        fn arbitrary_messages_decode_or_are_refused(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Some((name, payload)) = decode(Bytes::from(b.clone())) {
                prop_assert_eq!(usize::from(b[0]), name.len());
                prop_assert_eq!(name.len() + payload.len() + 1, b.len());
            }
            if let Some(Control::Grant { protocol, limit }) = Control::decode(Bytes::from(b.clone())) {
                let again = Control::Grant { protocol, limit }.encode();
                prop_assert_eq!(&again[..], &b[..]);
            }
        }
    }
}
