//! Arbitrary bytes from the network must never panic the session code: not
//! the packet decoder, and not a member's state that decoded packets act on.
//!
//! Input: the whole of it is one packet (what decodes must encode to the
//! same bytes); then it is read again as `[len: u8][len bytes]` records, each
//! decoded and fed to one member's state, with a tick after each.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peermesh_session::wire::Packet;
use peermesh_session::state::{ClientState, Route};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::decode(data) {
        assert_eq!(p.encode(), data);
    }

    let mut c = ClientState::new("f".into(), "o".into(), 1, 1, 0, 30);
    let mut now = 1_000_000u64;
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (rec, tail) = tail.split_at(n);
        rest = tail;
        now += 33_000;
        match Packet::decode(rec) {
            Ok(Packet::Snapshot(s)) => {
                let _ = c.on_snapshot(s, now);
            }
            Ok(Packet::Roster(r)) => {
                let _ = c.on_roster(r);
            }
            Ok(Packet::Inputs(b)) => {
                let peer = format!("p{}", b.slot);
                let _ = c.on_peer_inputs(&b, Route::Mesh, Some(&peer), now);
            }
            Ok(Packet::Relayed(b)) => {
                let _ = c.on_peer_inputs(&b, Route::Relay, None, now);
            }
            _ => {}
        }
        let _ = c.next_input(now);
        let _ = c.merged(now);
    }
    let _ = c.view(now, true);
});
