//! Arbitrary bytes from the network must never panic the path switch: not the
//! frame decoder, and not a live endpoint that has state for them to act on.
//!
//! Input: the whole of it is one frame; then it is read again as a stream of
//! `[path: u8][advance_ms: u8][len: u8][len bytes]` records, each fed to
//! `on_frame` on that path, with timers and output drained in between.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use peermesh_traversal::path_switch::{decode, Config, PathId, PathKind, PathSwitch};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode(data) {
        // What decodes has exactly one encoding.
        assert_eq!(&frame.encode()[..], data);
    }

    let cfg = Config {
        send_window: 16,
        recv_window: 16,
        max_message_size: 64,
        ..Config::default()
    };
    let mut now = Instant::now();
    let mut ep = PathSwitch::new(cfg);
    ep.path_up(PathId(0), PathKind::Relay, true, now);
    ep.path_up(PathId(1), PathKind::Direct, false, now);
    for i in 0..8u8 {
        ep.send(Bytes::from(vec![i; i as usize])).unwrap();
    }
    while ep.poll_transmit(now).is_some() {}

    let _ = ep.on_frame(PathId(1), data, now);
    let mut rest = data;
    while let [path, advance, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (frame, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_millis(*advance as u64);
        // Path 3 is never up: frames from unknown paths are used too.
        let _ = ep.on_frame(PathId(*path as u32 % 4), frame, now);
        match path >> 4 {
            1 => ep.path_down(PathId(1), now),
            2 => ep.path_up(PathId(1), PathKind::Direct, false, now),
            3 => {
                let _ = ep.probe(PathId(0), now);
            }
            4 => {
                let _ = ep.send(Bytes::from_static(b"more"));
            }
            _ => {}
        }
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
        let mut sent = 0;
        while ep.poll_transmit(now).is_some() {
            sent += 1;
            assert!(sent < 10_000, "poll_transmit must run dry");
        }
        let mut delivered = 0;
        while ep.poll_deliver().is_some() {
            delivered += 1;
        }
        assert!(
            delivered <= 16,
            "never more than the receive window at once"
        );
        assert!(ep.unacked() <= 16);
        while ep.poll_event().is_some() {}
    }
});
