//! The link worker as an actor: two workers wired to each other over
//! in-memory pipes (one pipe per "connection"), with the swarm and the node
//! played by the test through the worker's channels. Timers run on tokio's
//! paused clock, so backoffs are exact and nothing waits in real time.

use std::collections::HashMap;

use libp2p::swarm::ConnectionId;
use tokio::io::DuplexStream;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use super::*;
use crate::protocol::{queue, Message, ProtocolId};

type Pipe = Compat<DuplexStream>;

const PROTO: &str = "/test/1";
/// A protocol whose application never reads (on the receiving side).
const SLOW: &str = "/slow/1";
/// Bound on waiting for something the test expects (virtual time).
const EXPECT: Duration = Duration::from_secs(30);

struct Side {
    id: PeerId,
    handle: LinkHandle<Pipe>,
    swarm: mpsc::Receiver<SwarmCommand>,
    out: mpsc::Receiver<LinkOutput>,
    inbox: mpsc::UnboundedReceiver<Message>,
    /// The [`SLOW`] protocol's queue, read only when a test says so.
    slow: mpsc::UnboundedReceiver<Message>,
}

/// Two peer ids, the leader (smaller id) first.
fn ids() -> (PeerId, PeerId) {
    let (a, b) = (PeerId::random(), PeerId::random());
    if a.to_bytes() < b.to_bytes() {
        (a, b)
    } else {
        (b, a)
    }
}

fn side(me: PeerId, peer: PeerId, control_punch: bool) -> Side {
    let (swarm_tx, swarm) = mpsc::channel(4096);
    let (out_tx, out) = mpsc::channel(4096);
    let dispatch = Arc::new(Dispatch::default());
    let (tx, inbox) = queue();
    let (slow_tx, slow) = queue();
    dispatch.install(HashMap::from([
        (Bytes::from_static(PROTO.as_bytes()), tx),
        (Bytes::from_static(SLOW.as_bytes()), slow_tx),
    ]));
    let handle = spawn(
        LinkConfig {
            me,
            peer,
            control_punch,
        },
        swarm_tx,
        out_tx,
        dispatch,
    );
    Side {
        id: me,
        handle,
        swarm,
        out,
        inbox,
        slow,
    }
}

fn pair() -> (Side, Side) {
    let (a, b) = ids();
    (side(a, b, true), side(b, a, true))
}

async fn input(s: &Side, i: LinkInput<Pipe>) {
    s.handle.input.send(i).await.expect("worker alive");
}

/// A connection of `kind` between the two, with its stream.
async fn connect(a: &Side, b: &Side, n: usize, kind: PathKind) -> ConnectionId {
    let connection = ConnectionId::new_unchecked(n);
    for s in [a, b] {
        input(
            s,
            LinkInput::Connected {
                connection,
                kind,
                via: None,
            },
        )
        .await;
    }
    let (x, y) = tokio::io::duplex(1 << 16);
    input(
        a,
        LinkInput::Stream {
            connection,
            stream: x.compat(),
        },
    )
    .await;
    input(
        b,
        LinkInput::Stream {
            connection,
            stream: y.compat(),
        },
    )
    .await;
    connection
}

async fn disconnect(a: &Side, b: &Side, connection: ConnectionId) {
    for s in [a, b] {
        input(s, LinkInput::Disconnected { connection }).await;
    }
}

/// The sending side of `protocol`'s flow on `s`'s link.
fn flow(s: &mut Side, protocol: &'static str) -> mpsc::Sender<Bytes> {
    s.handle
        .flow(Bytes::from_static(protocol.as_bytes()))
        .expect("a flow")
}

/// Sends `prefix-0 … prefix-(n-1)` on [`PROTO`] from `s` in the background.
fn send_numbered(s: &mut Side, prefix: &str, n: usize) -> tokio::task::JoinHandle<()> {
    send_numbered_on(s, PROTO, prefix, n)
}

fn send_numbered_on(
    s: &mut Side,
    protocol: &'static str,
    prefix: &str,
    n: usize,
) -> tokio::task::JoinHandle<()> {
    let tx = flow(s, protocol);
    let p = ProtocolId::from_static(protocol);
    let prefix = prefix.to_string();
    tokio::spawn(async move {
        for i in 0..n {
            tx.send(p.encode(format!("{prefix}-{i}").as_bytes()))
                .await
                .expect("link alive");
        }
    })
}

async fn expect_numbered(s: &mut Side, from: PeerId, prefix: &str, n: usize) {
    expect_numbered_in(&mut s.inbox, from, prefix, n).await
}

async fn expect_numbered_in(
    inbox: &mut mpsc::UnboundedReceiver<Message>,
    from: PeerId,
    prefix: &str,
    n: usize,
) {
    let from = NodeId::from_bytes(&from.to_bytes()).unwrap();
    for i in 0..n {
        let m = tokio::time::timeout(EXPECT, inbox.recv())
            .await
            .unwrap_or_else(|_| panic!("{prefix}-{i} never arrived"))
            .expect("inbox open");
        assert_eq!(m.from, from);
        assert_eq!(
            String::from_utf8_lossy(&m.data),
            format!("{prefix}-{i}"),
            "exactly once and in order"
        );
    }
}

/// The next status report whose path is `path`.
async fn wait_path(s: &mut Side, path: Option<PathKind>) -> LinkStatus {
    tokio::time::timeout(EXPECT, async {
        loop {
            match s.out.recv().await.expect("worker alive") {
                LinkOutput::Status(_, st) if st.path == path => return st,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no status on {path:?}"))
}

async fn next_command(s: &mut Side) -> SwarmCommand {
    tokio::time::timeout(EXPECT, s.swarm.recv())
        .await
        .expect("a swarm command")
        .expect("worker alive")
}

fn relay_addr(n: u8) -> Multiaddr {
    format!(
        "/ip4/192.0.2.{n}/udp/4001/quic-v1/p2p/{}/p2p-circuit",
        PeerId::random()
    )
    .parse()
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_stream_moves_from_relay_to_direct_and_back_exactly_once() {
    let (mut a, mut b) = pair();
    let relay = connect(&a, &b, 1, PathKind::Relay).await;
    send_numbered(&mut a, "r", 300).await.unwrap();
    expect_numbered(&mut b, a.id, "r", 300).await;
    wait_path(&mut a, Some(PathKind::Relay)).await;

    let direct = connect(&a, &b, 2, PathKind::Direct).await;
    let during = send_numbered(&mut a, "d", 300);
    wait_path(&mut a, Some(PathKind::Direct)).await;
    during.await.unwrap();
    expect_numbered(&mut b, a.id, "d", 300).await;

    // The relay goes: nothing the direct path carries is affected.
    disconnect(&a, &b, relay).await;
    send_numbered(&mut a, "x", 100).await.unwrap();
    expect_numbered(&mut b, a.id, "x", 100).await;

    // The direct path goes too, and a new relayed one takes over.
    disconnect(&a, &b, direct).await;
    wait_path(&mut a, None).await;
    let _relay2 = connect(&a, &b, 3, PathKind::Relay).await;
    send_numbered(&mut a, "y", 100).await.unwrap();
    expect_numbered(&mut b, a.id, "y", 100).await;
    let st = wait_path(&mut b, Some(PathKind::Relay)).await;
    assert_eq!(st.malformed, 0);
    assert!(b.inbox.try_recv().is_err(), "no duplicate");
}

#[tokio::test(start_paused = true)]
async fn the_leader_dials_opens_streams_and_asks_for_a_punch_on_the_relay() {
    let (mut a, mut b) = pair();
    let addr = relay_addr(1);
    input(
        &a,
        LinkInput::Addresses {
            relay: vec![addr.clone()],
            forwarded: vec![],
        },
    )
    .await;
    match next_command(&mut a).await {
        SwarmCommand::Connect { peer, addrs } => {
            assert_eq!(peer, b.id);
            assert_eq!(addrs, vec![addr]);
        }
        other => panic!("{other:?}"),
    }
    let c = ConnectionId::new_unchecked(7);
    for s in [&a, &b] {
        input(
            s,
            LinkInput::Connected {
                connection: c,
                kind: PathKind::Relay,
                via: None,
            },
        )
        .await;
    }
    assert!(matches!(
        next_command(&mut a).await,
        SwarmCommand::OpenStream { connection, .. } if connection == c
    ));
    let (x, y) = tokio::io::duplex(1 << 16);
    input(
        &a,
        LinkInput::Stream {
            connection: c,
            stream: x.compat(),
        },
    )
    .await;
    input(
        &b,
        LinkInput::Stream {
            connection: c,
            stream: y.compat(),
        },
    )
    .await;
    let wanted = tokio::time::timeout(EXPECT, async {
        loop {
            if let LinkOutput::PunchWanted(p) = a.out.recv().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .expect("the leader asks for a punch");
    assert_eq!(wanted, b.id);
    // The follower neither opens streams nor asks.
    tokio::time::sleep(Duration::from_secs(5)).await;
    while let Ok(cmd) = b.swarm.try_recv() {
        assert!(!matches!(cmd, SwarmCommand::OpenStream { .. }), "{cmd:?}");
    }
    while let Ok(o) = b.out.try_recv() {
        assert!(!matches!(o, LinkOutput::PunchWanted(_)), "{o:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn failed_dials_are_retried_after_50_100_and_200_ms() {
    let (a, b) = ids();
    let mut a = side(a, b, true);
    input(
        &a,
        LinkInput::Addresses {
            relay: vec![relay_addr(2)],
            forwarded: vec![],
        },
    )
    .await;
    assert!(matches!(
        next_command(&mut a).await,
        SwarmCommand::Connect { .. }
    ));
    for wait in [50, 100, 200] {
        let t = tokio::time::Instant::now();
        input(&a, LinkInput::DialFailed).await;
        assert!(matches!(
            next_command(&mut a).await,
            SwarmCommand::Connect { .. }
        ));
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(wait) && took < Duration::from_millis(wait + 10),
            "redial after {took:?}, expected {wait} ms"
        );
    }
    // Then only the 500 ms cadence.
    let t = tokio::time::Instant::now();
    input(&a, LinkInput::DialFailed).await;
    assert!(matches!(
        next_command(&mut a).await,
        SwarmCommand::Connect { .. }
    ));
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn messages_of_unknown_protocols_are_counted_and_block_nothing() {
    let (mut a, mut b) = pair();
    connect(&a, &b, 1, PathKind::Relay).await;
    let other = ProtocolId::from_static("/nobody/1");
    let nobody = flow(&mut a, "/nobody/1");
    for _ in 0..5 {
        nobody.send(other.encode(b"?")).await.unwrap();
    }
    flow(&mut a, PROTO)
        .send(Bytes::from_static(&[200, 1]))
        .await
        .unwrap();
    send_numbered(&mut a, "ok", 10).await.unwrap();
    expect_numbered(&mut b, a.id, "ok", 10).await;
    let st = tokio::time::timeout(EXPECT, async {
        loop {
            if let LinkOutput::Status(_, st) = b.out.recv().await.unwrap() {
                if st.undeliverable == 5 && st.malformed == 1 {
                    return st;
                }
            }
        }
    })
    .await
    .expect("counted");
    assert_eq!(st.path, Some(PathKind::Relay));
}

#[tokio::test(start_paused = true)]
async fn a_silent_direct_path_is_taken_down_and_the_relay_carries_on() {
    let (mut a, mut b) = pair();
    connect(&a, &b, 1, PathKind::Relay).await;
    send_numbered(&mut a, "r", 10).await.unwrap();
    expect_numbered(&mut b, a.id, "r", 10).await;
    // A direct connection that only `a` sees: its far end is held and
    // never read (a cut route).
    let direct = ConnectionId::new_unchecked(2);
    input(
        &a,
        LinkInput::Connected {
            connection: direct,
            kind: PathKind::Direct,
            via: None,
        },
    )
    .await;
    let (x, _cut) = tokio::io::duplex(1 << 16);
    input(
        &a,
        LinkInput::Stream {
            connection: direct,
            stream: x.compat(),
        },
    )
    .await;
    wait_path(&mut a, Some(PathKind::Direct)).await;
    send_numbered(&mut a, "d", 50).await.unwrap();
    // Liveness finds it silent, the worker closes it and goes back to the
    // relay; everything arrives exactly once, in order.
    let closed = tokio::time::timeout(EXPECT, async {
        loop {
            if let SwarmCommand::CloseConnection(c) = a.swarm.recv().await.unwrap() {
                return c;
            }
        }
    })
    .await
    .expect("the silent path's connection is closed");
    assert_eq!(closed, direct);
    expect_numbered(&mut b, a.id, "d", 50).await;
    wait_path(&mut a, Some(PathKind::Relay)).await;
}

#[tokio::test(start_paused = true)]
async fn a_protocol_nobody_drains_holds_up_no_other_protocol() {
    let (mut a, mut b) = pair();
    connect(&a, &b, 1, PathKind::Relay).await;
    // Far more than the slow protocol's credit and queue together.
    let flood = send_numbered_on(&mut a, SLOW, "slow", 2000);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!flood.is_finished(), "its sender feels the pushback");
    // Every other protocol goes on, in both directions.
    send_numbered(&mut a, "a", 500).await.unwrap();
    expect_numbered(&mut b, a.id, "a", 500).await;
    send_numbered(&mut b, "b", 500).await.unwrap();
    expect_numbered(&mut a, b.id, "b", 500).await;
    // The undrained protocol has exactly its credit waiting, no more.
    let mut held = Vec::new();
    while let Ok(m) = b.slow.try_recv() {
        held.push(m);
    }
    assert_eq!(held.len() as u64, DEFAULT_WINDOW);
    // Once its application reads, everything arrives, exactly once and in
    // order.
    let from = NodeId::from_bytes(&a.id.to_bytes()).unwrap();
    for (i, m) in held.into_iter().enumerate() {
        assert_eq!(
            (m.from, String::from_utf8_lossy(&m.data).into_owned()),
            (from, format!("slow-{i}"))
        );
    }
    let rest = tokio::spawn(async move {
        let mut n = DEFAULT_WINDOW as usize;
        while n < 2000 {
            let m = b.slow.recv().await.expect("open");
            assert_eq!(String::from_utf8_lossy(&m.data), format!("slow-{n}"));
            n += 1;
        }
        b
    });
    tokio::time::timeout(EXPECT, flood)
        .await
        .expect("the sender finished")
        .unwrap();
    let b = tokio::time::timeout(EXPECT, rest)
        .await
        .expect("all arrived")
        .unwrap();
    assert!(b.inbox.is_empty());
}

/// A hostile peer that ignores its credit: speaks the path switch by hand
/// on a raw pipe and sends a protocol's messages far past its window.
#[tokio::test(start_paused = true)]
async fn a_member_that_floods_a_protocol_is_dropped_and_counted() {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    let (a, b) = ids();
    let mut victim = side(b, a, true);
    let c = ConnectionId::new_unchecked(1);
    input(
        &victim,
        LinkInput::Connected {
            connection: c,
            kind: PathKind::Relay,
            via: None,
        },
    )
    .await;
    let (mine, theirs) = tokio::io::duplex(1 << 20);
    input(
        &victim,
        LinkInput::Stream {
            connection: c,
            stream: theirs.compat(),
        },
    )
    .await;
    let (mut rd, mut wr) = mine.compat().split();
    // The victim's frames (acks, window updates) come back to the hostile
    // switch, so that it can keep sending.
    let (frames_tx, mut frames) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        loop {
            let mut len = [0u8; 4];
            if rd.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
            if rd.read_exact(&mut f).await.is_err() || frames_tx.send(f).is_err() {
                return;
            }
        }
    });
    let mut hostile = PathSwitch::new(path_switch::Config {
        max_message_size: MAX_LINK_MESSAGE,
        send_window: 4096,
        ..path_switch::Config::default()
    });
    hostile.path_up(PathId(0), PathKind::Relay, true, clock());
    let p = ProtocolId::from_static(SLOW);
    let total = DEFAULT_WINDOW + 300;
    for i in 0..total {
        hostile.send(p.encode(format!("x-{i}").as_bytes())).unwrap();
    }
    // One honest message on another protocol after the flood.
    hostile
        .send(ProtocolId::from_static(PROTO).encode(b"still here"))
        .unwrap();
    let pump = tokio::spawn(async move {
        loop {
            while let Some(t) = hostile.poll_transmit(clock()) {
                wr.write_all(&(t.frame.len() as u32).to_be_bytes()).await?;
                wr.write_all(&t.frame).await?;
            }
            wr.flush().await?;
            let f = tokio::select! {
                f = frames.recv() => f,
                _ = sleep_until(hostile.poll_timeout()) => {
                    hostile.handle_timeout(clock());
                    continue;
                }
            };
            let Some(f) = f else {
                return std::io::Result::Ok(());
            };
            let _ = hostile.on_frame(PathId(0), &f, clock());
        }
    });
    let m = tokio::time::timeout(EXPECT, victim.inbox.recv())
        .await
        .expect("the other protocol goes on")
        .unwrap();
    assert_eq!(&m.data[..], b"still here");
    let st = tokio::time::timeout(EXPECT, async {
        loop {
            if let LinkOutput::Status(_, st) = victim.out.recv().await.unwrap() {
                if st.flooded > 0 {
                    return st;
                }
            }
        }
    })
    .await
    .expect("the flood is counted");
    assert_eq!(st.flooded, total - DEFAULT_WINDOW);
    let mut held = 0;
    while victim.slow.try_recv().is_ok() {
        held += 1;
    }
    assert_eq!(
        held, DEFAULT_WINDOW,
        "the victim obeyed only the credit it gave"
    );
    pump.abort();
}
