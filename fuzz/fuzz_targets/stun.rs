//! STUN messages from anyone on the internet (the control server's STUN
//! sockets, a node's discovery socket): decoding never panics, and what
//! decodes re-encodes to an equivalent message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peermesh_traversal::stun::{decode, Message};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode(data) {
        let again = match m {
            Message::Request(r) => decode(&r.encode()),
            Message::Response(r) => decode(&r.encode()),
        };
        assert_eq!(again, Ok(m));
    }
});
