//! `/peermesh/link/1`: one byte stream per libp2p connection, on the
//! connection we choose.
//!
//! libp2p's stream helpers open a stream on *some* connection to a peer; the
//! path switch needs a stream on *each* connection (the relayed one, then the
//! direct one), so it can tell the paths apart and move between them. This
//! behaviour opens a stream on a given connection and reports every stream,
//! inbound or outbound, with the connection it belongs to and whether that
//! connection is relayed.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::Endpoint;
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, Stream, StreamProtocol, SubstreamProtocol, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peermesh/link/1");

/// The peer that relays a circuit address: the `/p2p/X` just before
/// `/p2p-circuit` (a relay server, or a member that forwards).
pub fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut last = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => last = Some(id),
            Protocol::P2pCircuit => return last,
            _ => {}
        }
    }
    None
}

/// Whether an address goes through a relay circuit.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

#[derive(Debug)]
pub struct OpenStream;

#[derive(Debug)]
pub enum HandlerEvent {
    Inbound(Stream),
    Outbound(Stream),
    OpenFailed(String),
}

pub struct Handler {
    pending_opens: usize,
    events: VecDeque<HandlerEvent>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = OpenStream;
    type ToBehaviour = HandlerEvent;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), ())
    }

    fn on_behaviour_event(&mut self, _: OpenStream) {
        self.pending_opens += 1;
    }

    fn connection_keep_alive(&self) -> bool {
        // Links are long-lived; the mesh closes connections it no longer
        // wants explicitly.
        true
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        if let Some(ev) = self.events.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(ev));
        }
        if self.pending_opens > 0 {
            self.pending_opens -= 1;
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), ()),
            });
        }
        Poll::Pending
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => self.events.push_back(HandlerEvent::Inbound(stream)),
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                ..
            }) => self.events.push_back(HandlerEvent::Outbound(stream)),
            ConnectionEvent::DialUpgradeError(DialUpgradeError { error, .. }) => self
                .events
                .push_back(HandlerEvent::OpenFailed(error.to_string())),
            _ => {}
        }
    }
}

#[derive(Debug)]
pub enum Event {
    /// A connection to a peer is up (relayed or direct).
    Connected {
        peer: PeerId,
        connection: ConnectionId,
        relayed: bool,
        /// Who carries a relayed connection (relay server or member).
        via: Option<PeerId>,
    },
    Disconnected {
        peer: PeerId,
        connection: ConnectionId,
    },
    Stream {
        peer: PeerId,
        connection: ConnectionId,
        stream: Stream,
        inbound: bool,
    },
    OpenFailed {
        peer: PeerId,
        connection: ConnectionId,
        error: String,
    },
}

#[derive(Default)]
pub struct Behaviour {
    events: VecDeque<ToSwarm<Event, OpenStream>>,
}

impl Behaviour {
    pub fn open_stream(&mut self, peer: PeerId, connection: ConnectionId) {
        self.events.push_back(ToSwarm::NotifyHandler {
            peer_id: peer,
            handler: NotifyHandler::One(connection),
            event: OpenStream,
        });
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler {
            pending_opens: 0,
            events: VecDeque::new(),
        })
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler {
            pending_opens: 0,
            events: VecDeque::new(),
        })
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                let remote = e.endpoint.get_remote_address().clone();
                let via = match e.endpoint {
                    libp2p::core::ConnectedPoint::Dialer { address, .. } => relay_of(address),
                    libp2p::core::ConnectedPoint::Listener {
                        local_addr,
                        send_back_addr,
                    } => relay_of(local_addr).or_else(|| relay_of(send_back_addr)),
                };
                self.events
                    .push_back(ToSwarm::GenerateEvent(Event::Connected {
                        peer: e.peer_id,
                        connection: e.connection_id,
                        relayed: e.endpoint.is_relayed() || is_relayed(&remote) || via.is_some(),
                        via,
                    }));
            }
            FromSwarm::ConnectionClosed(e) => {
                self.events
                    .push_back(ToSwarm::GenerateEvent(Event::Disconnected {
                        peer: e.peer_id,
                        connection: e.connection_id,
                    }));
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        let ev = match event {
            HandlerEvent::Inbound(stream) => Event::Stream {
                peer,
                connection,
                stream,
                inbound: true,
            },
            HandlerEvent::Outbound(stream) => Event::Stream {
                peer,
                connection,
                stream,
                inbound: false,
            },
            HandlerEvent::OpenFailed(error) => Event::OpenFailed {
                peer,
                connection,
                error,
            },
        };
        self.events.push_back(ToSwarm::GenerateEvent(ev));
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        match self.events.pop_front() {
            Some(e) => Poll::Ready(e),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_of_a_circuit_is_the_peer_before_p2p_circuit() {
        let relay = PeerId::random();
        let dst = PeerId::random();
        let a: Multiaddr =
            format!("/ip4/192.0.2.1/udp/4001/quic-v1/p2p/{relay}/p2p-circuit/p2p/{dst}")
                .parse()
                .unwrap();
        assert_eq!(relay_of(&a), Some(relay));
        assert!(is_relayed(&a));
        let direct: Multiaddr = format!("/ip4/192.0.2.1/udp/4001/quic-v1/p2p/{dst}")
            .parse()
            .unwrap();
        assert_eq!(relay_of(&direct), None);
        assert!(!is_relayed(&direct));
        // A circuit with no relay id names no relay.
        let bare: Multiaddr = "/ip4/192.0.2.1/udp/4001/quic-v1/p2p-circuit"
            .parse()
            .unwrap();
        assert_eq!(relay_of(&bare), None);
    }
}
