//! Hole-punch probes arrive on the probe sockets from anyone who guesses a
//! port (a birthday search opens hundreds): decoding never panics, only
//! well-formed probes decode, and what decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peermesh_traversal::hole_punch::ProbeMessage;

fuzz_target!(|data: &[u8]| {
    if let Some(m) = ProbeMessage::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
