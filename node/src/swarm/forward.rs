//! The relay v2 server that every node runs to forward for other members
//! (seed 004), wrapped so that it can never address the dummy handler it
//! gives relayed connections.
//!
//! libp2p's relay `Behaviour` hands relayed connections a
//! `dummy::ConnectionHandler` (no relaying over a relay) and sends its
//! handler commands as `Either::Left`; a command that reaches one of those
//! connections panics the connection task in `Either::on_behaviour_event`
//! (seen in the NAT lab when a relay server died under two nodes, cf.
//! rust-libp2p#5412). This wrapper remembers which connections got the dummy
//! and drops (and logs) any command for them.

use std::collections::HashSet;
use std::task::{Context, Poll};

use either::Either;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{relay, Multiaddr, PeerId};

pub struct Forward {
    inner: relay::Behaviour,
    /// Connections whose relay handler is the dummy.
    dummies: HashSet<ConnectionId>,
    /// Commands dropped because they named a dummy (for logs and tests).
    pub dropped: u64,
}

impl Forward {
    pub fn new(local: PeerId, config: relay::Config) -> Self {
        Self {
            inner: relay::Behaviour::new(local, config),
            dummies: HashSet::new(),
            dropped: 0,
        }
    }

    fn note(&mut self, id: ConnectionId, h: &THandler<relay::Behaviour>) {
        if matches!(h, Either::Right(_)) {
            self.dummies.insert(id);
        }
    }
}

impl NetworkBehaviour for Forward {
    type ConnectionHandler = THandler<relay::Behaviour>;
    type ToSwarm = relay::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let h = self
            .inner
            .handle_established_inbound_connection(id, peer, local, remote)?;
        self.note(id, &h);
        Ok(h)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let h = self
            .inner
            .handle_established_outbound_connection(id, peer, addr, role, port_use)?;
        self.note(id, &h);
        Ok(h)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = &event {
            self.dummies.remove(&c.connection_id);
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::NotifyHandler {
                    peer_id,
                    handler: NotifyHandler::One(id),
                    ..
                }) if self.dummies.contains(&id) => {
                    self.dropped += 1;
                    tracing::warn!(peer = %peer_id, connection = ?id, "relay command for a relayed connection dropped");
                }
                other => return other,
            }
        }
    }
}
