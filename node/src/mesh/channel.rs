//! Application channels over one peer link.
//!
//! A link carries one exactly-once, in-order message stream. Several
//! services share it (`meshnode send`/`recv`, IP packets of the TUN
//! interface, content chunks, multiplayer inputs), so every message starts
//! with a one-byte channel tag. The link worker hands each message straight
//! to its channel's queue, so a slow consumer holds up only the links that
//! feed it, never the mesh actor.

use bytes::{BufMut, Bytes, BytesMut};
use libp2p::PeerId;
use tokio::sync::mpsc;

/// Largest payload of one channel message (the tag comes on top).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What a message on a link is for. The numbers are on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// `meshnode send`/`recv`/`blast`/`sink`.
    Message = 0,
    /// IP packets of the TUN interface.
    Ip = 1,
    /// Content distribution (manifests, chunk requests and chunks).
    Content = 2,
    /// Multiplayer sessions (player inputs).
    Session = 3,
}

impl Channel {
    pub const ALL: [Channel; 4] = [
        Channel::Message,
        Channel::Ip,
        Channel::Content,
        Channel::Session,
    ];

    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.get(usize::from(b)).copied()
    }
}

/// A message for `channel`, ready for a link's sender.
pub fn tag(channel: Channel, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 1);
    b.put_u8(channel as u8);
    b.put_slice(payload);
    b.freeze()
}

/// The channel and payload of a message from a link; `None` for an empty
/// message or an unknown channel (a newer or hostile peer): the caller drops
/// and counts it.
pub fn untag(mut msg: Bytes) -> Option<(Channel, Bytes)> {
    let ch = Channel::from_u8(*msg.first()?)?;
    let _ = msg.split_to(1);
    Some((ch, msg))
}

/// Messages from peers, one queue per channel, in order per peer. A queue
/// whose receiver is dropped discards what arrives for it (counted per link
/// as `undeliverable`), so a node that does not run a service never stalls
/// on it; the node drops the receivers of services it does not run.
pub struct Inboxes {
    pub message: Option<mpsc::Receiver<(PeerId, Bytes)>>,
    pub ip: Option<mpsc::Receiver<(PeerId, Bytes)>>,
    pub content: Option<mpsc::Receiver<(PeerId, Bytes)>>,
    pub session: Option<mpsc::Receiver<(PeerId, Bytes)>>,
}

impl Inboxes {
    pub fn take(&mut self, ch: Channel) -> Option<mpsc::Receiver<(PeerId, Bytes)>> {
        match ch {
            Channel::Message => self.message.take(),
            Channel::Ip => self.ip.take(),
            Channel::Content => self.content.take(),
            Channel::Session => self.session.take(),
        }
    }
}

/// The sending halves of [`Inboxes`], shared by every link worker.
#[derive(Clone)]
pub struct Sinks([mpsc::Sender<(PeerId, Bytes)>; 4]);

/// Why a message from a peer was not handed on.
#[derive(Debug, PartialEq, Eq)]
pub enum Undelivered {
    /// Empty, or a channel this node does not know.
    Malformed,
    /// Nobody on this node consumes the channel.
    NoConsumer,
}

impl Sinks {
    /// Hands a message to its channel's queue, waiting while the queue is
    /// full (backpressure on this link only).
    pub async fn deliver(&self, peer: PeerId, msg: Bytes) -> Result<(), Undelivered> {
        let (ch, payload) = untag(msg).ok_or(Undelivered::Malformed)?;
        self.0[ch as usize]
            .send((peer, payload))
            .await
            .map_err(|_| Undelivered::NoConsumer)
    }
}

/// One queue per channel, `capacity` messages each.
pub(crate) fn inboxes(capacity: usize) -> (Sinks, Inboxes) {
    let (m_tx, m_rx) = mpsc::channel(capacity);
    let (i_tx, i_rx) = mpsc::channel(capacity);
    let (c_tx, c_rx) = mpsc::channel(capacity);
    let (s_tx, s_rx) = mpsc::channel(capacity);
    (
        Sinks([m_tx, i_tx, c_tx, s_tx]),
        Inboxes {
            message: Some(m_rx),
            ip: Some(i_rx),
            content: Some(c_rx),
            session: Some(s_rx),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_unknown_channels_are_refused() {
        for ch in Channel::ALL {
            let (c, p) = untag(tag(ch, b"hello")).unwrap();
            assert_eq!((c, &p[..]), (ch, &b"hello"[..]));
        }
        assert_eq!(untag(Bytes::new()), None);
        assert_eq!(untag(Bytes::from_static(&[4, 1, 2])), None);
        assert_eq!(untag(Bytes::from_static(&[255])), None);
        let (c, p) = untag(Bytes::from_static(&[1])).unwrap();
        assert_eq!((c, p.len()), (Channel::Ip, 0));
    }

    #[tokio::test]
    async fn messages_reach_their_channel_and_a_missing_consumer_never_blocks() {
        let (sinks, mut inboxes) = inboxes(1);
        let peer = PeerId::random();
        drop(inboxes.take(Channel::Ip));
        sinks
            .deliver(peer, tag(Channel::Content, b"c"))
            .await
            .unwrap();
        for _ in 0..3 {
            assert_eq!(
                sinks.deliver(peer, tag(Channel::Ip, b"p")).await,
                Err(Undelivered::NoConsumer)
            );
        }
        assert_eq!(
            sinks.deliver(peer, Bytes::from_static(&[9])).await,
            Err(Undelivered::Malformed)
        );
        let (from, m) = inboxes.content.as_mut().unwrap().recv().await.unwrap();
        assert_eq!((from, &m[..]), (peer, &b"c"[..]));
    }
}
