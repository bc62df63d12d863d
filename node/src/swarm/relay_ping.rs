//! libp2p's ping, on connections to relay servers only.
//!
//! A relay that dies sends no CONNECTION_CLOSE, and its RTT picks the home
//! relay (seed 001): both need pings on relay connections. Member links
//! need none: their path switch probes each path itself, and only as often
//! as the link's use asks (an idle link costs next to nothing), so stock
//! ping on every connection (every 500 ms, per connection) was pure cost.
//! This wraps [`ping::Behaviour`] and gives every other connection a
//! handler that does nothing.

use std::collections::HashSet;
use std::task::{Context, Poll};

use either::Either;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{ping, Multiaddr, PeerId};

pub struct RelayPing {
    inner: ping::Behaviour,
    relays: HashSet<PeerId>,
}

impl RelayPing {
    pub fn new(config: ping::Config) -> Self {
        Self {
            inner: ping::Behaviour::new(config),
            relays: HashSet::new(),
        }
    }

    /// The relay servers of the directory; connections established from
    /// now on to one of them are pinged.
    pub fn set_relays(&mut self, relays: impl IntoIterator<Item = PeerId>) {
        self.relays = relays.into_iter().collect();
    }
}

impl NetworkBehaviour for RelayPing {
    type ConnectionHandler =
        Either<<ping::Behaviour as NetworkBehaviour>::ConnectionHandler, dummy::ConnectionHandler>;
    type ToSwarm = ping::Event;

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let relay = self.relays.contains(&peer);
        let inner = &mut self.inner;
        if relay {
            Ok(Either::Left(inner.handle_established_inbound_connection(
                connection, peer, local, remote,
            )?))
        } else {
            Ok(Either::Right(dummy::ConnectionHandler))
        }
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let relay = self.relays.contains(&peer);
        let inner = &mut self.inner;
        if relay {
            Ok(Either::Left(inner.handle_established_outbound_connection(
                connection,
                peer,
                addr,
                role_override,
                port_use,
            )?))
        } else {
            Ok(Either::Right(dummy::ConnectionHandler))
        }
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            Either::Left(e) => self.inner.on_connection_handler_event(peer, connection, e),
            Either::Right(never) => match never {},
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx).map(|a| a.map_in(Either::Left))
    }
}
