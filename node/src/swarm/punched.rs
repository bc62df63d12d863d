//! QUIC over sockets that the hole puncher found, beside the mesh socket.
//!
//! libp2p-quic punches only from its listening socket, one address at a
//! time, at normal TTL. The hard cases (seed 002's low-TTL opening packets
//! on routers without WAN firewall, seed 003's birthday search across many
//! sockets) need sockets the node controls; the hole puncher
//! ([`crate::punch::driver`]) runs them, and the one that got through
//! is *adopted* here: its port is bound again by a libp2p-quic transport of
//! its own (the NAT mapping belongs to the 5-tuple in the kernel's
//! conntrack, not to the socket, so it survives the rebind). A dial to that
//! remote then leaves from that socket, and the peer's dial to it is
//! accepted on it. Everything else goes to the mesh's main QUIC transport,
//! so the swarm sees one QUIC transport and the application one link.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::core::Transport;
use libp2p::{quic, Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

/// Punched sockets kept at once; the oldest goes first. A socket serves one
/// peer, so this bounds the punched direct paths of one node.
pub const MAX_ADOPTED: usize = 128;

/// Requests from the hole puncher to the transport.
#[derive(Debug)]
pub enum Request {
    /// Bind `port` (just closed by the hole puncher) for QUIC towards
    /// `remote`, in place of any earlier punched socket for `peer`.
    Adopt {
        peer: PeerId,
        port: u16,
        remote: SocketAddr,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// The peer is gone: close its punched socket.
    Release { peer: PeerId },
}

/// Where the hole puncher hands sockets over. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Adopter {
    tx: mpsc::Sender<Request>,
}

impl Adopter {
    /// Hands `port` over for QUIC with `peer` at `remote`; returns once it
    /// is bound.
    pub async fn adopt(&self, peer: PeerId, port: u16, remote: SocketAddr) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request::Adopt {
                peer,
                port,
                remote,
                done,
            })
            .await
            .map_err(|_| "the swarm is gone".to_string())?;
        rx.await.map_err(|_| "the swarm is gone".to_string())?
    }

    pub fn release(&self, peer: PeerId) {
        let _ = self.tx.try_send(Request::Release { peer });
    }
}

struct Adopted {
    peer: PeerId,
    remote: SocketAddr,
    transport: quic::tokio::Transport,
}

/// The mesh's QUIC transport plus the adopted punched sockets.
pub struct PunchedQuic {
    config: quic::Config,
    main: quic::tokio::Transport,
    adopted: VecDeque<Adopted>,
    requests: mpsc::Receiver<Request>,
}

impl PunchedQuic {
    pub fn new(config: quic::Config) -> (Self, Adopter) {
        let (tx, requests) = mpsc::channel(64);
        let main = quic::tokio::Transport::new(config.clone());
        (
            Self {
                config,
                main,
                adopted: VecDeque::new(),
                requests,
            },
            Adopter { tx },
        )
    }

    /// A peer is punched again only once its direct path is gone, so an
    /// earlier socket of the same peer is idle and goes.
    fn adopt(&mut self, peer: PeerId, port: u16, remote: SocketAddr) -> Result<(), String> {
        self.adopted
            .retain(|a| a.peer != peer && a.remote != remote);
        if self.adopted.len() >= MAX_ADOPTED {
            if let Some(old) = self.adopted.pop_front() {
                tracing::debug!(remote = %old.remote, "punched socket: dropping the oldest");
            }
        }
        let mut transport = quic::tokio::Transport::new(self.config.clone());
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        transport
            .listen_on(ListenerId::next(), peermesh_relay::quic_addr(local))
            .map_err(|e| format!("binding punched port {port} again: {e}"))?;
        tracing::debug!(%peer, %remote, port, "punched socket adopted for QUIC");
        self.adopted.push_back(Adopted {
            peer,
            remote,
            transport,
        });
        Ok(())
    }

    fn release(&mut self, peer: PeerId) {
        self.adopted.retain(|a| a.peer != peer);
    }
}

/// The UDP socket address of a QUIC multiaddr (`/ip4|ip6/…/udp/…/quic-v1…`).
fn socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut it = addr.iter();
    let ip: IpAddr = match it.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    let Protocol::Udp(port) = it.next()? else {
        return None;
    };
    matches!(it.next()?, Protocol::QuicV1).then_some(SocketAddr::new(ip, port))
}

impl Transport for PunchedQuic {
    type Output = (PeerId, quic::Connection);
    type Error = quic::Error;
    type ListenerUpgrade = quic::Connecting;
    type Dial = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.main.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.main.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        if let Some(remote) = socket_addr(&addr) {
            if let Some(a) = self.adopted.iter_mut().find(|a| a.remote == remote) {
                tracing::debug!(%remote, "dialing from the punched socket");
                return a.transport.dial(addr, opts);
            }
        }
        self.main.dial(addr, opts)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let this = &mut *self;
        while let Poll::Ready(Some(req)) = this.requests.poll_recv(cx) {
            match req {
                Request::Adopt {
                    peer,
                    port,
                    remote,
                    done,
                } => {
                    let _ = done.send(this.adopt(peer, port, remote));
                }
                Request::Release { peer } => this.release(peer),
            }
        }
        if let Poll::Ready(ev) = Pin::new(&mut this.main).poll(cx) {
            return Poll::Ready(ev);
        }
        let mut closed = Vec::new();
        let mut incoming = None;
        'sockets: for (i, a) in this.adopted.iter_mut().enumerate() {
            // The swarm does not know these listeners: only their incoming
            // connections go up; addresses stay private to the punch.
            while let Poll::Ready(ev) = Pin::new(&mut a.transport).poll(cx) {
                match ev {
                    TransportEvent::Incoming { .. } => {
                        incoming = Some(ev);
                        break 'sockets;
                    }
                    TransportEvent::ListenerClosed { .. } => {
                        closed.push(i);
                        break;
                    }
                    TransportEvent::ListenerError { error, .. } => {
                        tracing::debug!(remote = %a.remote, %error, "punched socket error");
                    }
                    TransportEvent::NewAddress { .. } | TransportEvent::AddressExpired { .. } => {}
                }
            }
        }
        for i in closed.into_iter().rev() {
            this.adopted.remove(i);
        }
        if let Some(ev) = incoming {
            return Poll::Ready(ev);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addr_of_quic_multiaddrs_only() {
        let a: Multiaddr =
            "/ip4/1.2.3.4/udp/5/quic-v1/p2p/12D3KooWLvVHBQ5mC2tXqDVHR9m8WYPhXeamxVvN7ZgrxJ4f8T1Y"
                .parse()
                .unwrap();
        assert_eq!(socket_addr(&a), Some("1.2.3.4:5".parse().unwrap()));
        let t: Multiaddr = "/ip4/1.2.3.4/tcp/5".parse().unwrap();
        assert_eq!(socket_addr(&t), None);
        let c: Multiaddr = "/ip4/1.2.3.4/udp/5/quic-v1/p2p/12D3KooWLvVHBQ5mC2tXqDVHR9m8WYPhXeamxVvN7ZgrxJ4f8T1Y/p2p-circuit"
            .parse()
            .unwrap();
        // Matched too: the QUIC transports themselves refuse circuit
        // addresses, and the relay transport takes them.
        assert_eq!(socket_addr(&c), Some("1.2.3.4:5".parse().unwrap()));
    }
}
