//! Unit tests of the frame codec and the state machine, and a simulated pair of
//! endpoints (virtual clock, lossy and dying paths, lagging path events) that
//! checks the stream property: every message delivered exactly once, in order,
//! and both ends quiet at the end.

// ACK ranges are `Range`s; a one-range list is meant.
#![allow(clippy::single_range_in_vec_init)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use super::frame::{decode, Ack, Frame, FrameError, DATA_OVERHEAD, MAX_ACK_RANGES, MAX_PAYLOAD};
use super::*;

const RELAY: PathId = PathId(0);
const DIRECT: PathId = PathId(1);
const FORWARD: PathId = PathId(2);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn data_seq(t: &Transmit) -> Option<u64> {
    match decode(&t.frame).unwrap() {
        Frame::Data { seq, .. } => Some(seq),
        _ => None,
    }
}

fn drain(ep: &mut PathSwitch, now: Instant) -> Vec<Transmit> {
    std::iter::from_fn(|| ep.poll_transmit(now)).collect()
}

// ---------------------------------------------------------------- frame codec

fn arb_ack() -> impl Strategy<Value = Ack> {
    (
        any::<u32>(),
        proptest::collection::vec((1u64..50, 1u64..50), 0..=MAX_ACK_RANGES),
        0u64..100,
    )
        .prop_map(|(cum, gaps, slack)| {
            let cumulative = cum as u64;
            let mut ranges = Vec::new();
            let mut at = cumulative;
            for (gap, len) in gaps {
                let start = at + gap;
                ranges.push(start..start + len);
                at = start + len;
            }
            Ack {
                cumulative,
                window_end: at + slack,
                ranges,
            }
        })
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(seq, p)| {
            Frame::Data {
                seq,
                payload: Bytes::from(p),
            }
        }),
        arb_ack().prop_map(Frame::Ack),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn frame_round_trip(frame in arb_frame()) {
        let bytes = frame.encode();
        prop_assert_eq!(bytes.len(), frame.encoded_len());
        prop_assert_eq!(decode(&bytes).unwrap(), frame);
    }

    /// Any byte string decodes or errors; it never panics, and what decodes
    /// re-encodes to the same bytes (one encoding per frame).
    #[test]
    fn decode_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(f) = decode(&bytes) {
            prop_assert_eq!(&f.encode()[..], &bytes[..]);
        }
    }

    /// Every strict prefix of a valid frame is refused.
    #[test]
    fn truncated_frames_refused(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
        let bytes = frame.encode();
        let n = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..n]).is_err());
    }
}

#[test]
fn frame_layout_is_as_documented() {
    let f = Frame::Data {
        seq: 0x0102,
        payload: Bytes::from_static(b"hi"),
    };
    assert_eq!(
        &f.encode()[..],
        &[1, 1, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 2, b'h', b'i']
    );
    assert_eq!(f.encoded_len(), DATA_OVERHEAD + 2);
    let a = Frame::Ack(Ack {
        cumulative: 1,
        window_end: 9,
        ranges: vec![3..5],
    });
    let mut want = vec![1u8, 2];
    for v in [1u64, 9] {
        want.extend_from_slice(&v.to_be_bytes());
    }
    want.extend_from_slice(&1u16.to_be_bytes());
    want.extend_from_slice(&3u64.to_be_bytes());
    want.extend_from_slice(&5u64.to_be_bytes());
    assert_eq!(&a.encode()[..], &want[..]);
    assert_eq!(&Frame::Ping { nonce: 7 }.encode()[..2], &[1, 3]);
    assert_eq!(&Frame::Pong { nonce: 7 }.encode()[..2], &[1, 4]);
}

fn ack_bytes(cum: u64, window_end: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut b = vec![1u8, 2];
    b.extend_from_slice(&cum.to_be_bytes());
    b.extend_from_slice(&window_end.to_be_bytes());
    b.extend_from_slice(&(ranges.len() as u16).to_be_bytes());
    for (s, e) in ranges {
        b.extend_from_slice(&s.to_be_bytes());
        b.extend_from_slice(&e.to_be_bytes());
    }
    b
}

#[test]
fn malformed_frames_are_refused() {
    let data = Frame::Data {
        seq: 5,
        payload: Bytes::from_static(b"abc"),
    }
    .encode();
    let ping = Frame::Ping { nonce: 1 }.encode();
    let with_tail = |b: &[u8]| {
        let mut v = b.to_vec();
        v.push(0);
        v
    };
    let mut oversize = vec![1u8, 1];
    oversize.extend_from_slice(&0u64.to_be_bytes());
    oversize.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
    let mut too_many = vec![1u8, 2];
    too_many.extend_from_slice(&0u64.to_be_bytes());
    too_many.extend_from_slice(&u64::MAX.to_be_bytes());
    too_many.extend_from_slice(&(MAX_ACK_RANGES as u16 + 1).to_be_bytes());

    let cases: Vec<(&str, Vec<u8>, FrameError)> = vec![
        ("empty", vec![], FrameError::Truncated),
        ("version only", vec![1], FrameError::Truncated),
        ("bad version", vec![2, 1], FrameError::UnsupportedVersion(2)),
        (
            "version zero",
            vec![0, 3],
            FrameError::UnsupportedVersion(0),
        ),
        ("unknown type", vec![1, 9], FrameError::UnknownType(9)),
        ("type zero", vec![1, 0], FrameError::UnknownType(0)),
        (
            "data header short",
            data[..10].to_vec(),
            FrameError::Truncated,
        ),
        (
            "data payload short",
            data[..data.len() - 1].to_vec(),
            FrameError::Truncated,
        ),
        (
            "data oversize",
            oversize,
            FrameError::Oversize {
                len: MAX_PAYLOAD as u64 + 1,
                max: MAX_PAYLOAD,
            },
        ),
        (
            "data trailing",
            with_tail(&data),
            FrameError::TrailingBytes(1),
        ),
        ("ping short", ping[..5].to_vec(), FrameError::Truncated),
        (
            "ping trailing",
            with_tail(&ping),
            FrameError::TrailingBytes(1),
        ),
        (
            "pong trailing",
            with_tail(&Frame::Pong { nonce: 1 }.encode()),
            FrameError::TrailingBytes(1),
        ),
        (
            "ack trailing",
            with_tail(&ack_bytes(0, 4, &[])),
            FrameError::TrailingBytes(1),
        ),
        (
            "ack ranges short",
            ack_bytes(0, 9, &[(2, 3)])[..30].to_vec(),
            FrameError::Truncated,
        ),
        (
            "ack too many ranges",
            too_many,
            FrameError::TooManyRanges(33),
        ),
        (
            "ack window below cumulative",
            ack_bytes(5, 4, &[]),
            FrameError::InvalidAck("window ends below cumulative"),
        ),
        (
            "ack empty range",
            ack_bytes(0, 9, &[(3, 3)]),
            FrameError::InvalidAck("empty range"),
        ),
        (
            "ack range at cumulative",
            ack_bytes(2, 9, &[(2, 4)]),
            FrameError::InvalidAck("ranges not ascending with gaps"),
        ),
        (
            "ack ranges adjacent",
            ack_bytes(0, 9, &[(2, 4), (4, 5)]),
            FrameError::InvalidAck("ranges not ascending with gaps"),
        ),
        (
            "ack ranges descending",
            ack_bytes(0, 20, &[(6, 8), (2, 4)]),
            FrameError::InvalidAck("ranges not ascending with gaps"),
        ),
        (
            "ack range beyond window",
            ack_bytes(0, 9, &[(2, 10)]),
            FrameError::InvalidAck("range beyond window"),
        ),
    ];
    let now = Instant::now();
    for (i, (name, bytes, want)) in cases.into_iter().enumerate() {
        assert_eq!(decode(&bytes), Err(want.clone()), "{name}");
        let mut ep = PathSwitch::new(Config::default());
        ep.path_up(RELAY, PathKind::Relay, true, now);
        assert_eq!(ep.on_frame(RELAY, &bytes, now), Err(want), "{name}");
        assert_eq!(ep.stats().malformed, 1, "{name} #{i}");
        assert!(ep.poll_deliver().is_none());
    }
}

#[test]
fn well_formed_protocol_violations_are_refused_and_counted() {
    let now = Instant::now();
    let mut ep = PathSwitch::new(Config {
        max_message_size: 4,
        ..Config::default()
    });
    ep.path_up(RELAY, PathKind::Relay, true, now);
    // Ack of a message never sent.
    let ack = Frame::Ack(Ack {
        cumulative: 1,
        window_end: 100,
        ranges: vec![],
    });
    assert_eq!(
        ep.on_frame(RELAY, &ack.encode(), now),
        Err(FrameError::AckBeyondSent)
    );
    let sack = Frame::Ack(Ack {
        cumulative: 0,
        window_end: 100,
        ranges: vec![3..4],
    });
    assert_eq!(
        ep.on_frame(RELAY, &sack.encode(), now),
        Err(FrameError::AckBeyondSent)
    );
    // A message larger than the local limit.
    let big = Frame::Data {
        seq: 0,
        payload: Bytes::from_static(b"12345"),
    };
    assert_eq!(
        ep.on_frame(RELAY, &big.encode(), now),
        Err(FrameError::MessageTooLarge { len: 5, max: 4 })
    );
    assert_eq!(ep.stats().protocol_errors, 3);
    assert!(ep.poll_deliver().is_none());
}

// ---------------------------------------------------------------- state machine

#[test]
fn first_message_goes_out_at_once_on_the_only_path() {
    let now = Instant::now();
    let mut a = PathSwitch::new(Config::default());
    a.path_up(RELAY, PathKind::Relay, true, now);
    assert_eq!(a.poll_event(), Some(Event::ActivePath(Some(RELAY))));
    a.send(Bytes::from_static(b"hello")).unwrap();
    let t = a.poll_transmit(now).expect("sent with no wait");
    assert_eq!(t.path, RELAY);
    assert_eq!(
        decode(&t.frame).unwrap(),
        Frame::Data {
            seq: 0,
            payload: Bytes::from_static(b"hello")
        }
    );
    // Also when the message is queued before the relay is up.
    let mut b = PathSwitch::new(Config::default());
    b.send(Bytes::from_static(b"early")).unwrap();
    assert!(b.poll_transmit(now).is_none());
    b.path_up(RELAY, PathKind::Relay, true, now);
    let t = b
        .poll_transmit(now)
        .expect("sent as soon as the path is up");
    assert_eq!((t.path, data_seq(&t)), (RELAY, Some(0)));
    // And the receiver hands it over at once.
    let mut r = PathSwitch::new(Config::default());
    r.path_up(RELAY, PathKind::Relay, true, now);
    r.on_frame(RELAY, &t.frame, now).unwrap();
    assert_eq!(r.poll_deliver(), Some(Bytes::from_static(b"early")));
}

#[test]
fn switch_resends_unacked_on_new_path_and_nothing_is_delivered_twice() {
    let now = Instant::now();
    let mut a = PathSwitch::new(Config::default());
    let mut b = PathSwitch::new(Config::default());
    for ep in [&mut a, &mut b] {
        ep.path_up(RELAY, PathKind::Relay, true, now);
    }
    for i in 0..6u8 {
        a.send(Bytes::from(vec![i])).unwrap();
    }
    let on_relay = drain(&mut a, now);
    assert_eq!(on_relay.len(), 6);
    // The relay carries the first four; the last two die with it... no: the
    // relay stays up, only the direct path appears before any ACK gets back.
    for t in &on_relay[..4] {
        b.on_frame(RELAY, &t.frame, now).unwrap();
    }
    a.path_up(DIRECT, PathKind::Direct, false, now);
    assert_eq!(a.active_path(), Some(DIRECT));
    let on_direct = drain(&mut a, now);
    assert!(on_direct.iter().all(|t| t.path == DIRECT));
    let seqs: Vec<_> = on_direct.iter().filter_map(data_seq).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5], "every unacked message again");
    for t in &on_direct {
        b.on_frame(DIRECT, &t.frame, now).unwrap();
    }
    // Late frames of the old path still count, and are duplicates too.
    for t in &on_relay[4..] {
        b.on_frame(RELAY, &t.frame, now).unwrap();
    }
    let got: Vec<_> = std::iter::from_fn(|| b.poll_deliver()).collect();
    assert_eq!(
        got,
        (0..6u8).map(|i| Bytes::from(vec![i])).collect::<Vec<_>>()
    );
    assert_eq!(b.stats().duplicates, 6);
    assert_eq!(b.stats().messages_delivered, 6);
    assert_eq!(a.stats().retransmits, 6);
    assert_eq!(a.path_stats(DIRECT).unwrap().retransmits, 6);
    // B's ACKs clear A.
    for t in drain(&mut b, now) {
        a.on_frame(t.path, &t.frame, now).unwrap();
    }
    assert_eq!(a.unacked(), 0);
}

#[test]
fn path_preference_and_pinning() {
    let now = Instant::now();
    let mut a = PathSwitch::new(Config::default());
    a.path_up(RELAY, PathKind::Relay, true, now);
    a.path_up(FORWARD, PathKind::Forwarded, true, now);
    assert_eq!(a.active_path(), Some(FORWARD));
    a.path_up(DIRECT, PathKind::Direct, false, now);
    assert_eq!(a.active_path(), Some(DIRECT));
    // A second relay does not displace the first (no flapping among equals).
    a.path_up(PathId(9), PathKind::Relay, true, now);
    a.path_down(DIRECT, now);
    a.path_down(FORWARD, now);
    assert_eq!(a.active_path(), Some(RELAY));
    a.path_up(DIRECT, PathKind::Direct, false, now);
    assert_eq!(a.set_preferred(PathId(9), now), Ok(()));
    assert_eq!(a.active_path(), Some(PathId(9)));
    assert_eq!(
        a.set_preferred(PathId(77), now),
        Err(PathError::UnknownPath(PathId(77)))
    );
    a.path_down(PathId(9), now);
    assert_eq!(a.active_path(), Some(DIRECT), "pin dropped with its path");
    a.set_preferred(RELAY, now).unwrap();
    a.clear_preferred(now);
    assert_eq!(a.active_path(), Some(DIRECT));
    a.path_down(DIRECT, now);
    a.path_down(RELAY, now);
    assert_eq!(a.active_path(), None);
    let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
    assert_eq!(
        events,
        vec![
            Event::ActivePath(Some(RELAY)),
            Event::ActivePath(Some(FORWARD)),
            Event::ActivePath(Some(DIRECT)),
            Event::ActivePath(Some(FORWARD)),
            Event::ActivePath(Some(RELAY)),
            Event::ActivePath(Some(DIRECT)),
            Event::ActivePath(Some(PathId(9))),
            Event::ActivePath(Some(DIRECT)),
            Event::ActivePath(Some(RELAY)),
            Event::ActivePath(Some(DIRECT)),
            Event::ActivePath(Some(RELAY)),
            Event::ActivePath(None),
        ]
    );
    assert_eq!(a.stats().path_switches, 12);
}

#[test]
fn reliable_paths_have_no_retransmission_timer() {
    let now = Instant::now();
    let mut a = PathSwitch::new(Config::default());
    a.path_up(RELAY, PathKind::Relay, true, now);
    a.send(Bytes::from_static(b"x")).unwrap();
    assert_eq!(drain(&mut a, now).len(), 1);
    // The only timer asks for an ACK (the peer may have sent it on a path that
    // lost it); it never resends data.
    let mut t = now;
    for _ in 0..10 {
        let next = a.poll_timeout().expect("ack solicitation");
        assert!(next > t);
        t = next;
        a.handle_timeout(t);
        let out = drain(&mut a, t);
        assert_eq!(out.len(), 1);
        assert!(matches!(decode(&out[0].frame).unwrap(), Frame::Ping { .. }));
    }
    assert!(t - now > Duration::from_secs(5), "backs off");
    assert_eq!(a.stats().retransmits, 0);
    // Re-up of the same path (a reconnect) resends, since its in-flight is gone.
    a.path_up(RELAY, PathKind::Relay, true, now);
    assert_eq!(
        drain(&mut a, now)
            .iter()
            .filter_map(data_seq)
            .collect::<Vec<_>>(),
        vec![0]
    );
}

#[test]
fn unreliable_path_retransmits_on_timer_and_learns_rtt() {
    let t0 = Instant::now();
    let mut a = PathSwitch::new(Config::default());
    let mut b = PathSwitch::new(Config::default());
    a.path_up(DIRECT, PathKind::Direct, false, t0);
    b.path_up(DIRECT, PathKind::Direct, false, t0);
    a.send(Bytes::from_static(b"lost")).unwrap();
    assert_eq!(drain(&mut a, t0).len(), 1); // dropped by the network
    let deadline = a.poll_timeout().expect("timer armed");
    // Initial RTO: 3 × initial RTT plus the ack delay.
    assert_eq!(deadline, t0 + ms(602));
    a.handle_timeout(deadline - ms(1));
    assert!(
        drain(&mut a, deadline).is_empty(),
        "not before the deadline"
    );
    a.handle_timeout(deadline);
    let again = drain(&mut a, deadline);
    assert_eq!(
        again.iter().filter_map(data_seq).collect::<Vec<_>>(),
        vec![0]
    );
    assert_eq!(a.stats().retransmits, 1);
    assert_eq!(a.stats().rto_fires, 1);
    // Backed off: the next deadline is twice as far.
    assert_eq!(a.poll_timeout(), Some(deadline + ms(1204)));
    // Delivered; B's single in-order DATA waits for the delayed ack.
    let t1 = deadline + ms(20);
    b.on_frame(DIRECT, &again[0].frame, t1).unwrap();
    assert!(drain(&mut b, t1).is_empty());
    assert_eq!(b.poll_timeout(), Some(t1 + ms(2)));
    b.handle_timeout(t1 + ms(2));
    let acks = drain(&mut b, t1 + ms(2));
    assert_eq!(acks.len(), 1);
    // Karn: no RTT from a retransmitted message.
    a.on_frame(DIRECT, &acks[0].frame, t1 + ms(22)).unwrap();
    assert_eq!(a.rtt(), None);
    assert_eq!(a.unacked(), 0);
    assert_eq!(a.poll_timeout(), None);
    // A clean message gives a sample: 42 ms there and back with the ack delay.
    let t2 = t1 + ms(100);
    a.send(Bytes::from_static(b"ok")).unwrap();
    let d = drain(&mut a, t2);
    b.on_frame(DIRECT, &d[0].frame, t2 + ms(20)).unwrap();
    b.handle_timeout(t2 + ms(22));
    for t in drain(&mut b, t2 + ms(22)) {
        a.on_frame(DIRECT, &t.frame, t2 + ms(42)).unwrap();
    }
    assert_eq!(a.rtt(), Some(ms(42)));
    assert_eq!(a.path_stats(DIRECT).unwrap().rtt, Some(ms(42)));
    assert_eq!(b.poll_deliver(), Some(Bytes::from_static(b"lost")));
    assert_eq!(b.poll_deliver(), Some(Bytes::from_static(b"ok")));
}

#[test]
fn fast_retransmit_on_gap_without_timer() {
    let now = Instant::now();
    let mut a = PathSwitch::new(Config::default());
    let mut b = PathSwitch::new(Config::default());
    a.path_up(DIRECT, PathKind::Direct, false, now);
    b.path_up(DIRECT, PathKind::Direct, false, now);
    for i in 0..6u8 {
        a.send(Bytes::from(vec![i])).unwrap();
    }
    let sent = drain(&mut a, now);
    // Frame 1 is lost; the others arrive and B SACKs them.
    for t in sent.iter().filter(|t| data_seq(t) != Some(1)) {
        b.on_frame(DIRECT, &t.frame, now + ms(5)).unwrap();
    }
    for t in drain(&mut b, now + ms(5)) {
        a.on_frame(DIRECT, &t.frame, now + ms(10)).unwrap();
    }
    assert_eq!(a.unacked(), 5, "seq 1..=5 held until 1 is acked");
    let resent = drain(&mut a, now + ms(10));
    assert_eq!(
        resent.iter().filter_map(data_seq).collect::<Vec<_>>(),
        vec![1]
    );
}

#[test]
fn probe_reports_path_rtt() {
    let t0 = Instant::now();
    let mut a = PathSwitch::new(Config::default());
    let mut b = PathSwitch::new(Config::default());
    for ep in [&mut a, &mut b] {
        ep.path_up(RELAY, PathKind::Relay, true, t0);
        ep.path_up(DIRECT, PathKind::Direct, false, t0);
        while ep.poll_event().is_some() {}
    }
    assert_eq!(
        a.probe(PathId(5), t0),
        Err(PathError::UnknownPath(PathId(5)))
    );
    a.probe(RELAY, t0).unwrap();
    let ping = a.poll_transmit(t0).unwrap();
    assert_eq!(
        ping.path, RELAY,
        "probe goes on the probed path, not the active one"
    );
    b.on_frame(RELAY, &ping.frame, t0 + ms(30)).unwrap();
    let pong = b.poll_transmit(t0 + ms(30)).unwrap();
    assert_eq!(pong.path, RELAY);
    assert!(matches!(decode(&pong.frame).unwrap(), Frame::Pong { .. }));
    a.on_frame(RELAY, &pong.frame, t0 + ms(61)).unwrap();
    assert_eq!(
        a.poll_event(),
        Some(Event::ProbeRtt {
            path: RELAY,
            rtt: ms(61)
        })
    );
    assert_eq!(a.path_stats(RELAY).unwrap().probe_rtt, Some(ms(61)));
    assert_eq!(a.path_stats(RELAY).unwrap().rtt, Some(ms(61)));
    // A stray or repeated PONG is ignored.
    a.on_frame(RELAY, &pong.frame, t0 + ms(70)).unwrap();
    assert_eq!(a.poll_event(), None);
    let s = a.path_stats(RELAY).unwrap();
    assert_eq!((s.frames_out, s.frames_in), (1, 2));
    assert_eq!(s.bytes_out, 10);
}

#[test]
fn a_silent_path_is_probed_then_declared_dead_and_traffic_moves_to_the_relay() {
    let t0 = Instant::now();
    let (mut a, mut b) = two_paths_up(
        t0,
        Liveness {
            probe_after: ms(250),
            // Probed as often as a link in use.
            idle_probe_after: ms(250),
            in_use_for: ms(5000),
            dead_after: ms(1200),
        },
    );
    assert_eq!(a.active_path(), Some(DIRECT));
    // Each new path is measured at once: a PING on each. Only the relay
    // answers (the direct path was cut), and the direct path owes an
    // answer from now on.
    let mut direct_pings = 0;
    for t in drain(&mut a, t0) {
        assert!(matches!(decode(&t.frame).unwrap(), Frame::Ping { .. }));
        if t.path == DIRECT {
            direct_pings += 1;
            continue;
        }
        b.on_frame(RELAY, &t.frame, t0 + ms(1)).unwrap();
        for r in drain(&mut b, t0 + ms(1)) {
            if r.path == RELAY {
                a.on_frame(r.path, &r.frame, t0 + ms(2)).unwrap();
            }
        }
    }
    assert_eq!(direct_pings, 1);
    // Both paths are probed again after 250 ms of silence.
    assert_eq!(a.poll_timeout(), Some(t0 + ms(250)));
    let mut now = t0 + ms(250);
    while now < t0 + ms(1200) {
        a.handle_timeout(now);
        b.handle_timeout(now);
        for t in drain(&mut a, now) {
            if t.path == DIRECT {
                assert!(matches!(decode(&t.frame).unwrap(), Frame::Ping { .. }));
                direct_pings += 1;
                continue;
            }
            b.on_frame(RELAY, &t.frame, now + ms(1)).unwrap();
        }
        // B's answers and its own probes: only those on the relay arrive.
        for r in drain(&mut b, now + ms(1)) {
            if r.path == RELAY {
                a.on_frame(r.path, &r.frame, now + ms(2)).unwrap();
            }
        }
        assert!(a.active_path() == Some(DIRECT), "not dead before 1.2 s");
        now = a.poll_timeout().unwrap().max(now + ms(1));
    }
    assert!(direct_pings >= 4, "probed {direct_pings} times");
    // Every relay probe was answered; no direct one yet (none has been
    // unanswered for the whole dead-after time).
    assert_eq!(a.path_stats(RELAY).unwrap().probe_loss(), Some(0.0));
    assert_eq!(a.path_stats(DIRECT).unwrap().probes_known, 0);
    a.handle_timeout(t0 + ms(1200));
    let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
    assert!(events.contains(&Event::PathDead(DIRECT)), "{events:?}");
    assert!(
        events.contains(&Event::ActivePath(Some(RELAY))),
        "{events:?}"
    );
    assert_eq!(a.active_path(), Some(RELAY));
    assert!(a.path_stats(DIRECT).is_none());
    // The relay, heard all along, stays.
    a.handle_timeout(t0 + ms(1500));
    assert_eq!(a.active_path(), Some(RELAY));
}

/// Runs `a` and `b` (both paths connected both ways, or only the relay if
/// `direct_cut`) until `until`; returns the PINGs `a` sent per path.
fn run_pair(
    a: &mut PathSwitch,
    b: &mut PathSwitch,
    from: Instant,
    until: Instant,
    direct_cut: bool,
) -> (usize, usize) {
    let (mut relay_pings, mut direct_pings) = (0, 0);
    let mut now = from;
    while now < until {
        a.handle_timeout(now);
        b.handle_timeout(now);
        let mut moved = true;
        while moved {
            moved = false;
            for t in drain(a, now) {
                moved = true;
                if matches!(decode(&t.frame).unwrap(), Frame::Ping { .. }) {
                    *if t.path == DIRECT {
                        &mut direct_pings
                    } else {
                        &mut relay_pings
                    } += 1;
                }
                if !(direct_cut && t.path == DIRECT) {
                    b.on_frame(t.path, &t.frame, now).unwrap();
                }
            }
            for t in drain(b, now) {
                moved = true;
                if !(direct_cut && t.path == DIRECT) {
                    a.on_frame(t.path, &t.frame, now).unwrap();
                }
            }
        }
        let next = [a.poll_timeout(), b.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(until);
        now = next.max(now + ms(1)).min(until);
        if now == until {
            break;
        }
    }
    (relay_pings, direct_pings)
}

/// Two ends with `liveness`, each with a relay and a direct path up at `t0`
/// (their first events taken).
fn two_paths_up(t0: Instant, liveness: Liveness) -> (PathSwitch, PathSwitch) {
    let cfg = Config {
        liveness: Some(liveness),
        ..Config::default()
    };
    let mut a = PathSwitch::new(cfg.clone());
    let mut b = PathSwitch::new(cfg);
    for ep in [&mut a, &mut b] {
        ep.path_up(RELAY, PathKind::Relay, true, t0);
        ep.path_up(DIRECT, PathKind::Direct, true, t0);
        while ep.poll_event().is_some() {}
    }
    (a, b)
}

#[test]
fn an_idle_link_is_probed_rarely_and_a_quiet_path_is_not_dead() {
    let t0 = Instant::now();
    let (mut a, mut b) = two_paths_up(t0, Liveness::default());
    let idle = Liveness::default().idle_probe_after;
    // A minute with nothing to say: each path is probed about once per
    // idle interval (by one side or the other), and stays up.
    let (relay, direct) = run_pair(&mut a, &mut b, t0, t0 + Duration::from_secs(60), false);
    let most = (60 / idle.as_secs()) as usize + 1;
    assert!(relay <= most && direct <= most, "{relay} {direct} PINGs");
    assert!(direct >= 1, "an idle path is still probed now and then");
    assert_eq!(a.active_path(), Some(DIRECT));
    assert_eq!(b.active_path(), Some(DIRECT));
    assert!(std::iter::from_fn(|| a.poll_event()).all(|e| !matches!(e, Event::PathDead(_))));
}

#[test]
fn an_idle_path_that_died_is_found_as_soon_as_the_link_is_used() {
    let t0 = Instant::now();
    let (mut a, mut b) = two_paths_up(t0, Liveness::default());
    let l = Liveness::default();
    // Idle for 30 s, then the direct path is cut, quietly, between probes.
    let cut = t0 + Duration::from_secs(30) + ms(100);
    run_pair(&mut a, &mut b, t0, cut, false);
    assert_eq!(a.active_path(), Some(DIRECT));
    // A message goes out on the (dead) direct path: it owes an answer from
    // then on, is probed fast, and is taken down `dead_after` later; the
    // message arrives once, over the relay.
    a.send(Bytes::from_static(b"hello")).unwrap();
    let sent = cut;
    run_pair(&mut a, &mut b, sent, sent + l.dead_after + ms(100), true);
    let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
    assert!(events.contains(&Event::PathDead(DIRECT)), "{events:?}");
    assert_eq!(a.active_path(), Some(RELAY));
    assert_eq!(b.poll_deliver().as_deref(), Some(&b"hello"[..]));
    assert_eq!(b.poll_deliver(), None);
    assert_eq!(a.unacked(), 0);
}

#[test]
fn a_link_in_use_probes_fast_then_slows_down_when_idle() {
    let t0 = Instant::now();
    let (mut a, mut b) = two_paths_up(t0, Liveness::default());
    let l = Liveness::default();
    // A message now: for `in_use_for` the relay (not carrying it) is probed
    // every `probe_after`...
    a.send(Bytes::from_static(b"m")).unwrap();
    let (relay, _) = run_pair(&mut a, &mut b, t0, t0 + l.in_use_for, false);
    let fast = (l.in_use_for.as_millis() / l.probe_after.as_millis()) as usize;
    assert!(
        relay + 2 >= fast,
        "{relay} relay PINGs in use, expected ~{fast}"
    );
    // ...then only every `idle_probe_after`.
    let later = t0 + l.in_use_for + l.idle_probe_after * 3;
    let (relay, _) = run_pair(&mut a, &mut b, t0 + l.in_use_for, later, false);
    assert!(relay <= 4, "{relay} relay PINGs while idle");
}

#[test]
fn a_busy_path_is_never_probed_and_liveness_is_off_by_default() {
    let t0 = Instant::now();
    let mut a = PathSwitch::new(Config {
        liveness: Some(Liveness::default()),
        ..Config::default()
    });
    a.path_up(DIRECT, PathKind::Direct, true, t0);
    let mut b = PathSwitch::new(Config::default());
    b.path_up(DIRECT, PathKind::Direct, true, t0);
    // The new path's first PING (its RTT), answered.
    for t in drain(&mut a, t0) {
        b.on_frame(DIRECT, &t.frame, t0).unwrap();
    }
    for t in drain(&mut b, t0) {
        a.on_frame(DIRECT, &t.frame, t0).unwrap();
    }
    assert!(a.path_stats(DIRECT).unwrap().probe_rtt.is_some());
    // B talks every 100 ms: A never probes and never gives up on the path.
    for i in 1..50u64 {
        let now = t0 + ms(100 * i);
        b.send(Bytes::from(vec![i as u8])).unwrap();
        for t in drain(&mut b, now) {
            a.on_frame(DIRECT, &t.frame, now).unwrap();
        }
        a.handle_timeout(now);
        for t in drain(&mut a, now) {
            assert!(!matches!(decode(&t.frame).unwrap(), Frame::Ping { .. }));
            b.on_frame(DIRECT, &t.frame, now).unwrap();
        }
        assert_eq!(a.active_path(), Some(DIRECT));
    }
    // B has no liveness: silence costs it nothing.
    b.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!(b.active_path(), Some(DIRECT));
}

#[test]
fn send_window_and_size_limits() {
    let mut a = PathSwitch::new(Config {
        send_window: 4,
        max_message_size: 10,
        ..Config::default()
    });
    for _ in 0..4 {
        a.send(Bytes::from_static(b"m")).unwrap();
    }
    assert_eq!(a.send(Bytes::from_static(b"m")), Err(SendError::WindowFull));
    assert_eq!(
        a.send(Bytes::from(vec![0; 11])),
        Err(SendError::TooLarge { size: 11, max: 10 })
    );
    assert_eq!(a.unacked(), 4);
    assert_eq!(a.stats().messages_sent, 4);
}

#[test]
fn receive_buffer_is_bounded() {
    let now = Instant::now();
    let mut b = PathSwitch::new(Config {
        recv_window: 20,
        ..Config::default()
    });
    b.path_up(RELAY, PathKind::Relay, true, now);
    let data = |seq| {
        Frame::Data {
            seq,
            payload: Bytes::from_static(b"z"),
        }
        .encode()
    };
    b.on_frame(RELAY, &data(u64::MAX), now).unwrap();
    b.on_frame(RELAY, &data(20), now).unwrap();
    assert_eq!(b.stats().window_drops, 2);
    for seq in (1..20).rev() {
        b.on_frame(RELAY, &data(seq), now).unwrap();
    }
    assert!(b.poll_deliver().is_none(), "gap at 0");
    b.on_frame(RELAY, &data(0), now).unwrap();
    // 20 held, none taken: the window is full until the application reads.
    b.on_frame(RELAY, &data(20), now).unwrap();
    assert_eq!(b.stats().window_drops, 3);
    assert!(b.poll_deliver().is_some());
    b.on_frame(RELAY, &data(20), now).unwrap();
    assert_eq!(b.stats().window_drops, 3);
    assert_eq!(std::iter::from_fn(|| b.poll_deliver()).count(), 20);
}

#[test]
fn delayed_ack_and_ack_every() {
    let now = Instant::now();
    let mut b = PathSwitch::new(Config::default());
    b.path_up(RELAY, PathKind::Relay, true, now);
    let data = |seq| {
        Frame::Data {
            seq,
            payload: Bytes::new(),
        }
        .encode()
    };
    b.on_frame(RELAY, &data(0), now).unwrap();
    assert!(b.poll_transmit(now).is_none());
    assert_eq!(b.poll_timeout(), Some(now + ms(2)));
    b.on_frame(RELAY, &data(1), now + ms(1)).unwrap();
    let ack = b
        .poll_transmit(now + ms(1))
        .expect("second frame acks at once");
    assert_eq!(
        decode(&ack.frame).unwrap(),
        Frame::Ack(Ack {
            cumulative: 2,
            window_end: 256,
            ranges: vec![]
        })
    );
    assert_eq!(b.poll_timeout(), None);
    // Out of order: at once, with the SACK range.
    b.on_frame(RELAY, &data(4), now + ms(2)).unwrap();
    let ack = b.poll_transmit(now + ms(2)).unwrap();
    assert_eq!(
        decode(&ack.frame).unwrap(),
        Frame::Ack(Ack {
            cumulative: 2,
            window_end: 256,
            ranges: vec![4..5]
        })
    );
    assert!(b.is_idle());
}

#[test]
fn flow_control_blocks_then_resumes_and_survives_lost_window_update() {
    let t0 = Instant::now();
    let cfg = Config {
        send_window: 64,
        recv_window: 16,
        ..Config::default()
    };
    let mut a = PathSwitch::new(cfg.clone());
    let mut b = PathSwitch::new(cfg);
    a.path_up(DIRECT, PathKind::Direct, false, t0);
    b.path_up(DIRECT, PathKind::Direct, false, t0);
    for i in 0..40u8 {
        a.send(Bytes::from(vec![i])).unwrap();
    }
    let first = drain(&mut a, t0);
    assert_eq!(first.len(), 16, "no more than the peer's window");
    for t in &first {
        b.on_frame(DIRECT, &t.frame, t0).unwrap();
    }
    for t in drain(&mut b, t0) {
        a.on_frame(DIRECT, &t.frame, t0).unwrap();
    }
    assert_eq!(a.unacked(), 24);
    assert!(
        drain(&mut a, t0).is_empty(),
        "blocked: B's application reads nothing"
    );
    // B's application reads; the window update is lost on the way.
    let mut got: Vec<Bytes> = std::iter::from_fn(|| b.poll_deliver()).collect();
    assert_eq!(got.len(), 16);
    assert_eq!(drain(&mut b, t0).len(), 1);
    // A asks again with a PING, and B's ACK in answer reopens the window.
    let p = a.poll_timeout().expect("solicit timer");
    a.handle_timeout(p);
    let probe = drain(&mut a, p);
    assert_eq!(probe.len(), 1);
    assert!(matches!(
        decode(&probe[0].frame).unwrap(),
        Frame::Ping { .. }
    ));
    let mut now = p;
    let mut inflight = probe;
    for _ in 0..20 {
        let mut back = Vec::new();
        for t in inflight.drain(..) {
            b.on_frame(DIRECT, &t.frame, now).unwrap();
        }
        got.extend(std::iter::from_fn(|| b.poll_deliver()));
        now += ms(3);
        b.handle_timeout(now);
        back.extend(drain(&mut b, now));
        for t in back {
            a.on_frame(DIRECT, &t.frame, now).unwrap();
        }
        inflight = drain(&mut a, now);
    }
    assert_eq!(
        got,
        (0..40u8).map(|i| Bytes::from(vec![i])).collect::<Vec<_>>()
    );
    assert_eq!(a.unacked(), 0);
}

#[test]
fn frames_from_unknown_paths_are_used() {
    let now = Instant::now();
    let mut b = PathSwitch::new(Config::default());
    let d = Frame::Data {
        seq: 0,
        payload: Bytes::from_static(b"early"),
    };
    b.on_frame(DIRECT, &d.encode(), now).unwrap();
    assert_eq!(b.poll_deliver(), Some(Bytes::from_static(b"early")));
    assert_eq!(b.stats().unknown_path_frames, 1);
    // No path: the ACK waits for one, and goes out when the relay comes up.
    b.handle_timeout(now + ms(5));
    assert!(b.poll_transmit(now + ms(5)).is_none());
    b.path_up(RELAY, PathKind::Relay, true, now + ms(6));
    let t = b.poll_transmit(now + ms(6)).unwrap();
    assert!(matches!(decode(&t.frame).unwrap(), Frame::Ack(_)));
}

// ---------------------------------------------------------------- simulation

/// splitmix64: deterministic, seedable, enough for a network simulation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

#[derive(Clone, Debug)]
struct LinkSpec {
    id: PathId,
    kind: PathKind,
    reliable: bool,
    latency: Duration,
    /// Extra random delay per frame on unreliable links (reordering).
    jitter: Duration,
    loss: f64,
    dup: f64,
}

#[derive(Clone, Copy, Debug)]
enum Act {
    /// The link comes up (again: a reconnect, when it is up).
    Up,
    Down,
    /// The caller of one endpoint pins the link, or unpins.
    Prefer(usize),
    Clear(usize),
}

#[derive(Clone, Debug)]
struct Scenario {
    seed: u64,
    links: Vec<LinkSpec>,
    /// Events: (time since start, link index, what happens).
    script: Vec<(Duration, usize, Act)>,
    /// Per endpoint, a bit per link it never hears about (it still receives
    /// what the other end sends there).
    deaf: [u8; 2],
    /// Each endpoint hears of a physical event up to this much later.
    max_lag: Duration,
    msgs: [usize; 2],
    max_len: usize,
    /// Messages are offered by each application spread over this span.
    send_span: Duration,
    /// How often each application reads (zero: at every step).
    read_every: [Duration; 2],
    cfg: Config,
}

struct Link {
    spec: LinkSpec,
    up: bool,
    incarnation: u64,
    /// Ordered links: a frame never arrives before the previous one.
    last_arrival: [Option<Instant>; 2],
}

enum Notice {
    Up(PathKind, bool),
    Down,
}

struct Sim {
    sc: Scenario,
    rng: Rng,
    t0: Instant,
    now: Instant,
    eps: [PathSwitch; 2],
    links: Vec<Link>,
    seq: u64,
    flight: BTreeMap<(Instant, u64), (usize, usize, u64, Bytes)>,
    physical: BTreeMap<(Instant, u64), (usize, Act)>,
    notices: BTreeMap<(Instant, u64), (usize, usize, Notice)>,
    last_notice: [BTreeMap<usize, Instant>; 2],
    outbox: [VecDeque<(Instant, Bytes)>; 2],
    expect: [Vec<Bytes>; 2],
    got: [Vec<Bytes>; 2],
    next_read: [Instant; 2],
    next_probe: Instant,
    end_of_script: Instant,
    first_delivery: [Option<Duration>; 2],
}

#[derive(Debug)]
struct Outcome {
    end: Duration,
    first_delivery: [Option<Duration>; 2],
    switches: [u64; 2],
    retransmits: [u64; 2],
    duplicates: [u64; 2],
}

impl Sim {
    fn new(sc: Scenario) -> Self {
        let t0 = Instant::now();
        let mut rng = Rng(sc.seed);
        let links: Vec<Link> = sc
            .links
            .iter()
            .map(|spec| Link {
                spec: spec.clone(),
                up: false,
                incarnation: 0,
                last_arrival: [None, None],
            })
            .collect();
        let mut physical = BTreeMap::new();
        let mut n = 0;
        let mut end = t0;
        for &(at, link, act) in &sc.script {
            n += 1;
            physical.insert((t0 + at, n), (link % links.len(), act));
            end = end.max(t0 + at);
        }
        let mut outbox: [VecDeque<(Instant, Bytes)>; 2] = Default::default();
        let mut expect: [Vec<Bytes>; 2] = Default::default();
        for side in 0..2 {
            for i in 0..sc.msgs[side] {
                let at = t0 + Duration::from_micros(rng.below(sc.send_span.as_micros() as u64 + 1));
                let mut m = format!("{side}:{i}:").into_bytes();
                let extra = rng.below(sc.max_len as u64 + 1) as usize;
                m.extend((0..extra).map(|k| (i + k) as u8));
                outbox[side].push_back((at, Bytes::from(m.clone())));
                // What the other side must deliver, in this order.
                expect[1 - side].push(Bytes::from(m));
            }
            let mut times: Vec<_> = outbox[side].iter().map(|(t, _)| *t).collect();
            times.sort();
            for (slot, t) in outbox[side].iter_mut().zip(times) {
                slot.0 = t;
            }
        }
        let eps = [
            PathSwitch::new(sc.cfg.clone()),
            PathSwitch::new(sc.cfg.clone()),
        ];
        Sim {
            rng,
            t0,
            now: t0,
            eps,
            links,
            seq: n,
            flight: BTreeMap::new(),
            physical,
            notices: BTreeMap::new(),
            last_notice: Default::default(),
            outbox,
            expect,
            got: Default::default(),
            next_read: [t0, t0],
            next_probe: t0 + ms(50),
            end_of_script: end,
            first_delivery: [None, None],
            sc,
        }
    }

    fn next_id(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn physical_event(&mut self, link: usize, act: Act) {
        let up = match act {
            Act::Up => true,
            Act::Down => false,
            Act::Prefer(side) => {
                let id = self.links[link].spec.id;
                let _ = self.eps[side].set_preferred(id, self.now); // maybe not up there
                return;
            }
            Act::Clear(side) => return self.eps[side].clear_preferred(self.now),
        };
        let l = &mut self.links[link];
        if !up && !l.up {
            return;
        }
        // A new incarnation, also on up-while-up (a reconnect): in flight is lost.
        l.up = up;
        l.incarnation += 1;
        l.last_arrival = [None, None];
        let (kind, reliable) = (l.spec.kind, l.spec.reliable);
        for ep in 0..2 {
            if self.sc.deaf[ep] & (1 << link) != 0 {
                continue;
            }
            let lag = Duration::from_micros(self.rng.below(self.sc.max_lag.as_micros() as u64 + 1));
            let mut at = self.now + lag;
            if let Some(prev) = self.last_notice[ep].get(&link) {
                at = at.max(*prev + Duration::from_micros(1));
            }
            self.last_notice[ep].insert(link, at);
            let notice = if up {
                Notice::Up(kind, reliable)
            } else {
                Notice::Down
            };
            let id = self.next_id();
            self.notices.insert((at, id), (ep, link, notice));
        }
    }

    fn put(&mut self, from: usize, t: Transmit) {
        let link = self
            .links
            .iter()
            .position(|l| l.spec.id == t.path)
            .expect("transmit on a known path id");
        if !self.links[link].up {
            return; // the endpoint has not heard yet that the path is dead
        }
        let spec = self.links[link].spec.clone();
        let copies = if !spec.reliable && self.rng.chance(spec.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            if !spec.reliable && self.rng.chance(spec.loss) {
                continue;
            }
            let jitter = Duration::from_micros(self.rng.below(spec.jitter.as_micros() as u64 + 1));
            let mut at = self.now
                + spec.latency
                + if spec.reliable {
                    Duration::ZERO
                } else {
                    jitter
                };
            if spec.reliable {
                let last = &mut self.links[link].last_arrival[from];
                if let Some(l) = *last {
                    at = at.max(l);
                }
                *last = Some(at);
            }
            let id = self.next_id();
            let inc = self.links[link].incarnation;
            self.flight
                .insert((at, id), (1 - from, link, inc, t.frame.clone()));
        }
    }

    fn app_step(&mut self) {
        for side in 0..2 {
            while let Some((at, m)) = self.outbox[side].front() {
                if *at > self.now {
                    break;
                }
                match self.eps[side].send(m.clone()) {
                    Ok(()) => {
                        self.outbox[side].pop_front();
                    }
                    Err(SendError::WindowFull) => break,
                    Err(e) => panic!("send: {e}"),
                }
            }
            if self.now >= self.next_read[side] {
                while let Some(m) = self.eps[side].poll_deliver() {
                    let i = self.got[side].len();
                    assert!(
                        i < self.expect[side].len(),
                        "side {side} delivered an extra message {m:?}"
                    );
                    assert_eq!(
                        m, self.expect[side][i],
                        "side {side} message #{i}: lost, duplicated or reordered"
                    );
                    self.got[side].push(m);
                    self.first_delivery[side].get_or_insert(self.now - self.t0);
                }
                self.next_read[side] = self.now + self.sc.read_every[side];
            }
            while self.eps[side].poll_event().is_some() {}
        }
        if self.now >= self.next_probe && self.now <= self.end_of_script {
            for side in 0..2 {
                if let Some(p) = self.eps[side].active_path() {
                    self.eps[side].probe(p, self.now).unwrap();
                }
            }
            self.next_probe = self.now + ms(300);
        }
    }

    fn quiet(&self) -> bool {
        self.now >= self.end_of_script
            && self.physical.is_empty()
            && self.notices.is_empty()
            && self.flight.is_empty()
            && (0..2).all(|s| {
                self.outbox[s].is_empty()
                    && self.got[s].len() == self.expect[s].len()
                    && self.eps[s].is_idle()
            })
    }

    fn run(mut self) -> Outcome {
        // Work remaining with no message delivered or acknowledged for this
        // long is a stall: at most 30 % loss and a 2 s timer cap make even a
        // 20-try streak of losses far shorter.
        let stall = Duration::from_secs(120);
        let mut progress = (0usize, self.t0);
        for _ in 0..2_000_000u32 {
            self.app_step();
            for side in 0..2 {
                while let Some(t) = self.eps[side].poll_transmit(self.now) {
                    self.put(side, t);
                }
            }
            if self.quiet() {
                for ep in &self.eps {
                    assert_eq!(ep.unacked(), 0);
                    assert_eq!(ep.poll_timeout(), None, "timers left when quiescent");
                }
                return Outcome {
                    end: self.now - self.t0,
                    first_delivery: self.first_delivery,
                    switches: [0, 1].map(|s| self.eps[s].stats().path_switches),
                    retransmits: [0, 1].map(|s| self.eps[s].stats().retransmits),
                    duplicates: [0, 1].map(|s| self.eps[s].stats().duplicates),
                };
            }
            let mut next: Vec<Instant> = Vec::new();
            next.extend(self.flight.keys().next().map(|k| k.0));
            next.extend(self.physical.keys().next().map(|k| k.0));
            next.extend(self.notices.keys().next().map(|k| k.0));
            for side in 0..2 {
                next.extend(self.eps[side].poll_timeout());
                if let Some((at, _)) = self.outbox[side].front() {
                    if *at > self.now {
                        next.push(*at);
                    }
                }
                if self.next_read[side] > self.now && !self.sc.read_every[side].is_zero() {
                    next.push(self.next_read[side]);
                }
            }
            if self.now < self.end_of_script {
                next.push(self.next_probe.min(self.end_of_script));
            }
            let Some(t) = next.into_iter().min() else {
                panic!(
                    "stuck at {:?}: nothing scheduled; got {:?}/{:?} unacked {:?}",
                    self.now - self.t0,
                    [self.got[0].len(), self.got[1].len()],
                    [self.expect[0].len(), self.expect[1].len()],
                    [self.eps[0].unacked(), self.eps[1].unacked()],
                );
            };
            self.now = self.now.max(t);
            let done = self.got[0].len()
                + self.got[1].len()
                + (0..2)
                    .map(|s| self.eps[s].stats().messages_sent as usize - self.eps[s].unacked())
                    .sum::<usize>();
            if done != progress.0 {
                progress = (done, self.now);
            }
            assert!(
                self.now - progress.1
                    <= stall.max(self.end_of_script.saturating_duration_since(progress.1)),
                "stalled at {:?}: got {:?}/{:?} unacked {:?} outbox {:?} active {:?}",
                self.now - self.t0,
                [self.got[0].len(), self.got[1].len()],
                [self.expect[0].len(), self.expect[1].len()],
                [self.eps[0].unacked(), self.eps[1].unacked()],
                [self.outbox[0].len(), self.outbox[1].len()],
                [self.eps[0].active_path(), self.eps[1].active_path()],
            );
            while let Some(e) = self.physical.first_entry() {
                if e.key().0 > self.now {
                    break;
                }
                let (link, act) = e.remove();
                self.physical_event(link, act);
            }
            while let Some(e) = self.notices.first_entry() {
                if e.key().0 > self.now {
                    break;
                }
                let (ep, link, notice) = e.remove();
                let id = self.links[link].spec.id;
                match notice {
                    Notice::Up(kind, reliable) => {
                        self.eps[ep].path_up(id, kind, reliable, self.now)
                    }
                    Notice::Down => self.eps[ep].path_down(id, self.now),
                }
            }
            while let Some(e) = self.flight.first_entry() {
                if e.key().0 > self.now {
                    break;
                }
                let (to, link, inc, bytes) = e.remove();
                let l = &self.links[link];
                if l.up && l.incarnation == inc {
                    self.eps[to]
                        .on_frame(l.spec.id, &bytes, self.now)
                        .expect("frames between honest endpoints are valid");
                }
            }
            for ep in &mut self.eps {
                ep.handle_timeout(self.now);
            }
        }
        panic!("simulation did not settle within the step budget");
    }
}

fn link(id: PathId, kind: PathKind, reliable: bool, latency: u64) -> LinkSpec {
    LinkSpec {
        id,
        kind,
        reliable,
        latency: ms(latency),
        jitter: Duration::ZERO,
        loss: 0.0,
        dup: 0.0,
    }
}

fn lossy(mut l: LinkSpec, jitter: u64, loss: f64, dup: f64) -> LinkSpec {
    l.jitter = ms(jitter);
    l.loss = loss;
    l.dup = dup;
    l
}

/// The seed-000 story: relay first, direct as soon as punched, direct dies,
/// relay reconnects, forwarding takes over, direct comes back.
fn story(seed: u64, read_every: u64) -> Scenario {
    Scenario {
        seed,
        links: vec![
            link(RELAY, PathKind::Relay, true, 60),
            lossy(link(DIRECT, PathKind::Direct, false, 8), 6, 0.1, 0.05),
            link(FORWARD, PathKind::Forwarded, true, 25),
        ],
        script: vec![
            (ms(0), 0, Act::Up),
            (ms(150), 1, Act::Up),
            (ms(900), 1, Act::Down),
            (ms(1100), 0, Act::Down),
            (ms(1180), 0, Act::Up),
            (ms(1400), 2, Act::Up),
            (ms(1700), 0, Act::Down),
            (ms(1750), 1, Act::Up),
            (ms(2200), 2, Act::Down),
        ],
        deaf: [0, 0],
        max_lag: ms(20),
        msgs: [400, 150],
        max_len: 100,
        send_span: ms(2500),
        read_every: [ms(read_every), ms(read_every)],
        cfg: Config {
            send_window: 64,
            recv_window: 32,
            ..Config::default()
        },
    }
}

#[test]
fn scripted_story_delivers_everything_once_in_order() {
    for seed in 0..20 {
        let out = Sim::new(story(seed, if seed % 2 == 0 { 0 } else { 40 })).run();
        assert!(out.switches[0] >= 5, "{out:?}");
        assert!(
            out.end < Duration::from_secs(10),
            "settles soon after the script: {out:?}"
        );
        assert!(out.retransmits[0] > 0 && out.duplicates[1] > 0, "{out:?}");
    }
}

#[test]
fn first_byte_goes_through_the_relay_with_no_wait() {
    for seed in 0..10 {
        let mut sc = story(seed, 0);
        sc.msgs = [1, 0];
        sc.send_span = Duration::ZERO;
        let out = Sim::new(sc).run();
        // The notice lag (at most 20 ms) plus one relay trip (60 ms), long
        // before the direct path is up at 150 ms.
        let first = out.first_delivery[1].expect("delivered");
        assert!(first <= ms(80), "{out:?}");
    }
}

fn arb_link(id: u32) -> impl Strategy<Value = LinkSpec> {
    let kind = match id {
        0 | 3 => PathKind::Relay,
        1 => PathKind::Direct,
        _ => PathKind::Forwarded,
    };
    // Direct paths are mostly datagrams; relays and forwarding mostly streams.
    let p_reliable = if kind == PathKind::Direct { 0.2 } else { 0.75 };
    (
        proptest::bool::weighted(p_reliable),
        1u64..100,
        0u64..40,
        0.0f64..0.3,
        0.0f64..0.15,
    )
        .prop_map(move |(reliable, latency, jitter, loss, dup)| {
            let l = link(PathId(id), kind, reliable, latency);
            if reliable {
                l
            } else {
                lossy(l, jitter, loss, dup)
            }
        })
}

fn arb_act() -> impl Strategy<Value = Act> {
    prop_oneof![
        4 => Just(Act::Up),
        4 => Just(Act::Down),
        1 => (0usize..2).prop_map(Act::Prefer),
        1 => (0usize..2).prop_map(Act::Clear),
    ]
}

fn arb_scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<u64>(),
        (arb_link(0), arb_link(1), arb_link(2), arb_link(3)),
        1usize..=4,
        proptest::collection::vec((0u64..300, 0usize..4, arb_act()), 0..24),
        (any::<bool>(), 0u64..100, [0u8..16, 0u8..16]),
        (0usize..200, 0usize..80),
        (0u64..3000, 0usize..300),
        (0u64..60, 0u64..60),
        (1usize..80, 16u64..80),
    )
        .prop_map(
            |(
                seed,
                (l0, l1, l2, l3),
                n_links,
                steps,
                (relay_first, lag, deaf),
                msgs,
                span_len,
                reads,
                windows,
            )| {
                let links: Vec<_> = [l0, l1, l2, l3].into_iter().take(n_links).collect();
                let mut script = Vec::new();
                let mut t = 0;
                if relay_first {
                    script.push((Duration::ZERO, 0, Act::Up));
                }
                for (dt, link, act) in steps {
                    t += dt;
                    script.push((ms(t), link % n_links, act));
                }
                // At least one path is up in the end, and both ends hear of it.
                t += 10;
                let last = (seed % n_links as u64) as usize;
                script.push((ms(t), last, Act::Up));
                let deaf = deaf.map(|d| d & !(1 << last));
                Scenario {
                    seed,
                    links,
                    script,
                    deaf,
                    max_lag: ms(lag),
                    msgs: [msgs.0, msgs.1],
                    max_len: span_len.1,
                    send_span: ms(span_len.0),
                    read_every: [ms(reads.0), ms(reads.1)],
                    cfg: Config {
                        send_window: windows.0,
                        recv_window: windows.1,
                        ..Config::default()
                    },
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    /// The stream property over random traffic and random path schedules.
    #[test]
    fn random_schedules_deliver_exactly_the_sent_sequence(sc in arb_scenario()) {
        // `Sim::run` asserts order, exactly-once and quiescence as it goes.
        Sim::new(sc).run();
    }
}

/// Hostile but well-formed input (and garbage) on a live endpoint: no panic,
/// bounds kept, and what it delivers is still a gap-free prefix of what was sent
/// under those sequence numbers.
#[derive(Clone, Debug)]
enum Hostile {
    Frame(u32, Frame),
    Raw(u32, Vec<u8>),
    Advance(u64),
    Down(u32),
    Up(u32, bool),
}

fn arb_hostile() -> impl Strategy<Value = Hostile> {
    let seq = prop_oneof![0u64..40, any::<u64>()];
    let frame = prop_oneof![
        (seq.clone(), proptest::collection::vec(any::<u8>(), 0..80)).prop_map(|(seq, p)| {
            Frame::Data {
                seq,
                payload: Bytes::from(p),
            }
        }),
        (
            seq.clone(),
            0u64..64,
            proptest::collection::vec((1u64..5, 1u64..5), 0..6)
        )
            .prop_map(|(cumulative, slack, gaps)| {
                let mut ranges = Vec::new();
                let mut at = cumulative;
                for (gap, len) in gaps {
                    let start = at.saturating_add(gap);
                    let end = start.saturating_add(len);
                    if start >= end {
                        break;
                    }
                    ranges.push(start..end);
                    at = end;
                }
                Frame::Ack(Ack {
                    cumulative,
                    window_end: at.saturating_add(slack),
                    ranges,
                })
            }),
        prop_oneof![0u64..4, any::<u64>()].prop_map(|nonce| Frame::Ping { nonce }),
        prop_oneof![0u64..4, any::<u64>()].prop_map(|nonce| Frame::Pong { nonce }),
    ];
    prop_oneof![
        8 => (0u32..4, frame).prop_map(|(p, f)| Hostile::Frame(p, f)),
        2 => (0u32..4, proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(p, b)| Hostile::Raw(p, b)),
        2 => (0u64..3000).prop_map(Hostile::Advance),
        1 => (0u32..3).prop_map(Hostile::Down),
        1 => (0u32..3, any::<bool>()).prop_map(|(p, r)| Hostile::Up(p, r)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn live_endpoint_survives_hostile_input(ops in proptest::collection::vec(arb_hostile(), 0..80)) {
        let cfg = Config { send_window: 16, recv_window: 16, max_message_size: 64, ..Config::default() };
        let mut now = Instant::now();
        let mut ep = PathSwitch::new(cfg);
        ep.path_up(RELAY, PathKind::Relay, true, now);
        ep.path_up(DIRECT, PathKind::Direct, false, now);
        for i in 0..10u8 {
            ep.send(Bytes::from(vec![i])).unwrap();
        }
        drain(&mut ep, now);
        let mut delivered = 0u64;
        for op in ops {
            match op {
                Hostile::Frame(p, f) => {
                    let _ = ep.on_frame(PathId(p), &f.encode(), now);
                }
                Hostile::Raw(p, b) => {
                    let _ = ep.on_frame(PathId(p), &b, now);
                }
                Hostile::Advance(d) => {
                    now += ms(d);
                    ep.handle_timeout(now);
                }
                Hostile::Down(p) => ep.path_down(PathId(p), now),
                Hostile::Up(p, r) => ep.path_up(PathId(p), PathKind::Direct, r, now),
            }
            let out = drain(&mut ep, now);
            prop_assert!(out.len() <= 64);
            for t in &out {
                prop_assert!(decode(&t.frame).is_ok(), "we only send valid frames");
            }
            if let Some(t) = ep.poll_timeout() {
                prop_assert!(t + Duration::from_secs(3) > now, "timers are not left far behind");
            }
            while ep.poll_deliver().is_some() {
                delivered += 1;
            }
            prop_assert!(ep.unacked() <= 10);
            prop_assert_eq!(ep.stats().messages_delivered, delivered);
            while ep.poll_event().is_some() {}
        }
    }
}
