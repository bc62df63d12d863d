//! The swarm task against real QUIC on 127.0.0.1: two or three swarm tasks
//! (and, for the relay cases, a plain libp2p relay v2 server built here)
//! driven through their `Command` channels, checked through their `Event`s.
//!
//! The timeouts only guard against a hang; every wait is on an event. The
//! tests run on tokio's current-thread runtime, which the allow-list steps
//! rely on: a command queued before a dial is processed by the swarm task
//! before that dial's QUIC handshake can complete (the task does not yield
//! while a command is ready, and the handshake needs other tasks to run).

use std::collections::VecDeque;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, Stream, SwarmEvent};
use libp2p::{identify, identity::Keypair, ping, relay, Multiaddr, PeerId};

use super::link_protocol::{is_relayed, relay_of, Event as L};
use super::{spawn, Command, Event, RelayEntry};
use peermesh_relay::{quic_addr, IDENTIFY_PROTOCOL};

/// How long any one expected event may take before the test fails. Far
/// above what loopback needs (a failed QUIC dial takes 5 s, the handshake
/// timeout), so a loaded machine does not fail the tests.
const PATIENCE: Duration = Duration::from_secs(30);

/// One swarm task and what the test saw of it.
struct Node {
    name: &'static str,
    id: PeerId,
    /// Its direct listen address.
    addr: Multiaddr,
    commands: tokio::sync::mpsc::Sender<Command>,
    events: tokio::sync::mpsc::Receiver<Event>,
    /// Events received while waiting for another one, oldest first (RTTs
    /// left out: they come twice a second per connection).
    backlog: VecDeque<Event>,
}

impl Node {
    async fn start(name: &'static str, forward: bool) -> Node {
        let h = spawn(
            Keypair::generate_ed25519(),
            "127.0.0.1:0".parse().unwrap(),
            false,
            forward,
        )
        .expect("the swarm starts");
        let mut n = Node {
            name,
            id: h.local_peer_id,
            addr: Multiaddr::empty(),
            commands: h.commands,
            events: h.events,
            backlog: VecDeque::new(),
        };
        let Event::Reachable(addrs) = n
            .wait_for(
                "a listen address",
                |e| matches!(e, Event::Reachable(a) if a.iter().any(|a| !is_relayed(a))),
            )
            .await
        else {
            unreachable!()
        };
        n.addr = addrs.into_iter().find(|a| !is_relayed(a)).unwrap();
        n
    }

    async fn send(&self, c: Command) {
        self.commands.send(c).await.expect("the swarm task runs");
    }

    /// The first event (from the backlog, then the channel) that `pred`
    /// accepts; the others are kept in the backlog.
    async fn wait_for(&mut self, what: &str, mut pred: impl FnMut(&Event) -> bool) -> Event {
        if let Some(i) = self.backlog.iter().position(&mut pred) {
            return self.backlog.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) if pred(&e) => return e,
                Ok(Some(e)) => self.backlog.push_back(e),
                Ok(None) => panic!("{}: the swarm task ended waiting for {what}", self.name),
                Err(_) => panic!(
                    "{}: no {what} within {PATIENCE:?}; meanwhile {:#?}",
                    self.name, self.backlog
                ),
            }
        }
    }

    /// The next connection to `peer`: (id, relayed, via).
    async fn connected(&mut self, peer: PeerId) -> (ConnectionId, bool, Option<PeerId>) {
        let e = self
            .wait_for(
                "a connection",
                |e| matches!(e, Event::Link(L::Connected { peer: p, .. }) if *p == peer),
            )
            .await;
        let Event::Link(L::Connected {
            connection,
            relayed,
            via,
            ..
        }) = e
        else {
            unreachable!()
        };
        (connection, relayed, via)
    }

    /// The next connection to `peer` that closed (`Some`: that one).
    async fn disconnected(&mut self, peer: PeerId, which: Option<ConnectionId>) -> ConnectionId {
        let e = self
            .wait_for("a closed connection", |e| {
                matches!(e, Event::Link(L::Disconnected { peer: p, connection })
                    if *p == peer && which.is_none_or(|w| w == *connection))
            })
            .await;
        let Event::Link(L::Disconnected { connection, .. }) = e else {
            unreachable!()
        };
        connection
    }

    /// The next link stream with `peer` in that direction.
    async fn stream(&mut self, peer: PeerId, inbound: bool) -> (ConnectionId, Stream) {
        let e = self
            .wait_for(
                if inbound {
                    "an inbound stream"
                } else {
                    "an outbound stream"
                },
                |e| {
                    matches!(e, Event::Link(L::Stream { peer: p, inbound: i, .. })
                        if *p == peer && *i == inbound)
                },
            )
            .await;
        let Event::Link(L::Stream {
            connection, stream, ..
        }) = e
        else {
            unreachable!()
        };
        (connection, stream)
    }

    /// Link events about `peer` in the backlog.
    fn link_events_about(&self, peer: PeerId) -> Vec<&Event> {
        self.backlog
            .iter()
            .filter(|e| match e {
                Event::Link(
                    L::Connected { peer: p, .. }
                    | L::Disconnected { peer: p, .. }
                    | L::Stream { peer: p, .. }
                    | L::OpenFailed { peer: p, .. },
                ) => *p == peer,
                _ => false,
            })
            .collect()
    }
}

async fn allow_each_other(a: &Node, b: &Node) {
    a.send(Command::Allow(b.id)).await;
    b.send(Command::Allow(a.id)).await;
}

/// `a` dials `b` directly; their connection ids on each side.
async fn connect_direct(a: &mut Node, b: &mut Node) -> (ConnectionId, ConnectionId) {
    a.send(Command::Connect {
        peer: b.id,
        addrs: vec![b.addr.clone()],
    })
    .await;
    let (ca, relayed_a, via_a) = a.connected(b.id).await;
    let (cb, relayed_b, via_b) = b.connected(a.id).await;
    assert!(!relayed_a && !relayed_b, "a direct dial is not relayed");
    assert_eq!((via_a, via_b), (None, None));
    (ca, cb)
}

/// `a` opens a link stream on its connection `on`; bytes go both ways.
/// Returns `b`'s id of the connection the stream arrived on.
async fn exchange(a: &mut Node, b: &mut Node, on: ConnectionId) -> ConnectionId {
    a.send(Command::OpenStream {
        peer: b.id,
        connection: on,
    })
    .await;
    let (ca, mut sa) = a.stream(b.id, false).await;
    assert_eq!(ca, on, "the stream opens on the connection asked for");
    // Written first: the listener may see the stream only once the
    // protocol negotiation carries data.
    sa.write_all(b"ping from a").await.unwrap();
    sa.flush().await.unwrap();
    let (cb, mut sb) = b.stream(a.id, true).await;
    let mut buf = [0u8; 11];
    tokio::time::timeout(PATIENCE, sb.read_exact(&mut buf))
        .await
        .expect("bytes arrive")
        .unwrap();
    assert_eq!(&buf, b"ping from a");
    sb.write_all(b"pong from b").await.unwrap();
    sb.flush().await.unwrap();
    tokio::time::timeout(PATIENCE, sa.read_exact(&mut buf))
        .await
        .expect("bytes come back")
        .unwrap();
    assert_eq!(&buf, b"pong from b");
    cb
}

/// `a` (which allows `b`) dials `b`, which does not allow `a`: the
/// connection never comes up at `b`. Then `b` allows `a`, and `a`'s next
/// dial is the first connection `b` reports.
async fn refused_then_admitted(a: &mut Node, b: &mut Node) {
    a.send(Command::Connect {
        peer: b.id,
        addrs: vec![b.addr.clone()],
    })
    .await;
    // QUIC completes the handshake at the dialer first, so `a` may see the
    // connection come up before `b` drops it.
    a.wait_for("the refusal", |e| match e {
        Event::DialFailed { peer } => *peer == b.id,
        Event::Link(L::Disconnected { peer, .. }) => *peer == b.id,
        _ => false,
    })
    .await;
    a.backlog.clear();
    b.send(Command::Allow(a.id)).await;
    a.send(Command::Connect {
        peer: b.id,
        addrs: vec![b.addr.clone()],
    })
    .await;
    a.connected(b.id).await;
    b.connected(a.id).await;
    // `b` reports in order, and would have reported the refused connection
    // before `a` saw it end.
    assert!(
        b.link_events_about(a.id).is_empty(),
        "{}: the refused connection surfaced: {:#?}",
        b.name,
        b.link_events_about(a.id)
    );
}

#[tokio::test]
async fn a_direct_connection_carries_a_link_stream_both_ways() {
    let (mut a, mut b) = tokio::join!(Node::start("a", false), Node::start("b", false));
    allow_each_other(&a, &b).await;
    let (ca, cb) = connect_direct(&mut a, &mut b).await;
    assert_eq!(exchange(&mut a, &mut b, ca).await, cb);
    // And from the other side, on the same connection.
    assert_eq!(exchange(&mut b, &mut a, cb).await, ca);
    // A second Connect while connected is a no-op: no new connection.
    a.send(Command::Connect {
        peer: b.id,
        addrs: vec![b.addr.clone()],
    })
    .await;
    assert_eq!(exchange(&mut a, &mut b, ca).await, cb);
    assert!(a.link_events_about(b.id).is_empty(), "{:#?}", a.backlog);
    assert!(b.link_events_about(a.id).is_empty(), "{:#?}", b.backlog);
}

#[tokio::test]
async fn a_peer_that_is_not_allowed_cannot_connect() {
    let (mut a, mut b) = tokio::join!(Node::start("a", false), Node::start("b", false));
    a.send(Command::Allow(b.id)).await;
    refused_then_admitted(&mut a, &mut b).await;
}

#[tokio::test]
async fn a_node_does_not_dial_a_peer_it_has_not_allowed() {
    let (mut a, mut b) = tokio::join!(Node::start("a", false), Node::start("b", false));
    b.send(Command::Allow(a.id)).await;
    // Refused inside `a` before any packet leaves: the swarm's dial returns
    // the denial, which the task only logs (no DialFailed today).
    a.send(Command::Connect {
        peer: b.id,
        addrs: vec![b.addr.clone()],
    })
    .await;
    a.send(Command::Allow(b.id)).await;
    a.send(Command::Connect {
        peer: b.id,
        addrs: vec![b.addr.clone()],
    })
    .await;
    let (ca, _, _) = a.connected(b.id).await;
    b.connected(a.id).await;
    assert!(b.link_events_about(a.id).is_empty(), "{:#?}", b.backlog);
    assert!(a.link_events_about(b.id).is_empty(), "{:#?}", a.backlog);
    exchange(&mut a, &mut b, ca).await;
}

#[tokio::test]
async fn disallow_drops_the_connection_and_keeps_the_peer_out() {
    let (mut a, mut b) = tokio::join!(Node::start("a", false), Node::start("b", false));
    allow_each_other(&a, &b).await;
    let (ca, cb) = connect_direct(&mut a, &mut b).await;
    b.send(Command::Disallow(a.id)).await;
    b.disconnected(a.id, Some(cb)).await;
    a.disconnected(b.id, Some(ca)).await;
    a.backlog.clear();
    b.backlog.clear();
    refused_then_admitted(&mut a, &mut b).await;
}

#[tokio::test]
async fn close_connection_closes_exactly_that_connection() {
    let (mut a, mut b) = tokio::join!(Node::start("a", false), Node::start("b", false));
    allow_each_other(&a, &b).await;
    let (first, _) = connect_direct(&mut a, &mut b).await;
    // A second connection to the same peer (as a forwarded path would be).
    a.send(Command::DialVia {
        peer: b.id,
        addr: b.addr.clone(),
    })
    .await;
    let (second, relayed, _) = a.connected(b.id).await;
    assert!(!relayed);
    assert_ne!(second, first);
    b.connected(a.id).await;

    a.send(Command::CloseConnection(first)).await;
    a.disconnected(b.id, Some(first)).await;
    let closed_at_b = b.disconnected(a.id, None).await;
    // The other one still carries a stream, and nothing else closed.
    let kept_at_b = exchange(&mut a, &mut b, second).await;
    assert_ne!(kept_at_b, closed_at_b);
    for n in [&a, &b] {
        assert!(
            !n.backlog
                .iter()
                .any(|e| matches!(e, Event::Link(L::Disconnected { .. }))),
            "{}: {:#?}",
            n.name,
            n.backlog
        );
    }
}

#[tokio::test]
async fn a_dial_where_nobody_listens_fails() {
    let mut a = Node::start("a", false).await;
    // Bound and silent for the whole test, so that the port is not reused
    // and the QUIC handshake times out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let ghost = PeerId::random();
    a.send(Command::Allow(ghost)).await;
    a.send(Command::Connect {
        peer: ghost,
        addrs: vec![quic_addr(silent.local_addr().unwrap())],
    })
    .await;
    a.wait_for(
        "a failed dial",
        |e| matches!(e, Event::DialFailed { peer } if *peer == ghost),
    )
    .await;
    assert!(a.link_events_about(ghost).is_empty(), "{:#?}", a.backlog);
}

/// A plain libp2p relay v2 server on QUIC (what `peermesh_relay::run`
/// runs, without the control server, the allow list and the load reports).
#[derive(NetworkBehaviour)]
struct RelayServer {
    relay: relay::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Starts a relay server; its directory entry. It runs until the test ends.
async fn relay_server() -> RelayEntry {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| RelayServer {
            relay: relay::Behaviour::new(key.public().to_peer_id(), relay::Config::default()),
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
        })
        .expect("the relay behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm
        .listen_on(quic_addr("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    // Relay v2 takes reservations only with a confirmed external address.
    swarm.add_external_address(addr.clone());
    let id = *swarm.local_peer_id();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    RelayEntry {
        id,
        addrs: vec![addr],
        load: 0,
    }
}

/// `SetRelays`, then the home relay and the circuit address `n` publishes
/// (first in `Reachable`).
async fn home_at(n: &mut Node, relay: &RelayEntry) -> Multiaddr {
    n.send(Command::SetRelays(vec![relay.clone()])).await;
    n.wait_for(
        "the home relay",
        |e| matches!(e, Event::HomeRelay(Some(r)) if *r == relay.id),
    )
    .await;
    let Event::Reachable(addrs) = n
        .wait_for(
            "a circuit address",
            |e| matches!(e, Event::Reachable(a) if a.first().is_some_and(is_relayed)),
        )
        .await
    else {
        unreachable!()
    };
    let circuit = addrs[0].clone();
    assert_eq!(relay_of(&circuit), Some(relay.id), "{circuit}");
    assert!(
        addrs.contains(&n.addr),
        "the direct address stays: {addrs:?}"
    );
    circuit
}

#[tokio::test]
async fn a_home_relay_is_chosen_and_carries_a_relayed_connection() {
    let relay = relay_server().await;
    let (mut a, mut b) = tokio::join!(Node::start("a", false), Node::start("b", false));
    allow_each_other(&a, &b).await;
    let circuit_a = home_at(&mut a, &relay).await;
    // Published complete, with `a`'s own id after the circuit.
    assert_eq!(
        circuit_a.iter().last(),
        Some(libp2p::multiaddr::Protocol::P2p(a.id)),
        "{circuit_a}"
    );
    home_at(&mut b, &relay).await;

    b.send(Command::Connect {
        peer: a.id,
        addrs: vec![circuit_a],
    })
    .await;
    let (cb, relayed_b, via_b) = b.connected(a.id).await;
    let (ca, relayed_a, via_a) = a.connected(b.id).await;
    assert!(relayed_a && relayed_b, "a circuit is relayed");
    assert_eq!((via_a, via_b), (Some(relay.id), Some(relay.id)));
    assert_eq!(exchange(&mut b, &mut a, cb).await, ca);
}

#[tokio::test]
async fn a_member_with_a_home_relay_forwards_for_other_members() {
    let relay = relay_server().await;
    let (mut a, mut fwd, mut c) = tokio::join!(
        Node::start("a", true),
        Node::start("fwd", true),
        Node::start("c", true)
    );
    for (x, y) in [(&a, &fwd), (&c, &fwd), (&a, &c)] {
        allow_each_other(x, y).await;
    }
    // The reservation at the relay confirms an external address, which
    // turns the forwarder's relay server on.
    home_at(&mut fwd, &relay).await;
    // On a direct connection, `c` reserves at the forwarder and publishes
    // the circuit through it.
    connect_direct(&mut c, &mut fwd).await;
    let Event::Reachable(addrs) = c
        .wait_for(
            "an address through the forwarder",
            |e| matches!(e, Event::Reachable(a) if a.iter().any(|a| relay_of(a) == Some(fwd.id))),
        )
        .await
    else {
        unreachable!()
    };
    let via_fwd = addrs
        .into_iter()
        .find(|a| relay_of(a) == Some(fwd.id))
        .unwrap();

    connect_direct(&mut a, &mut fwd).await;
    a.send(Command::DialVia {
        peer: c.id,
        addr: via_fwd,
    })
    .await;
    let (ca, relayed_a, via_a) = a.connected(c.id).await;
    let (cc, relayed_c, via_c) = c.connected(a.id).await;
    assert!(relayed_a && relayed_c);
    assert_eq!((via_a, via_c), (Some(fwd.id), Some(fwd.id)));
    assert_eq!(exchange(&mut a, &mut c, ca).await, cc);
}
