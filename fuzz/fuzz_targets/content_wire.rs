//! Arbitrary bytes from peers must never panic the content protocol's decoder, and what
//! decodes has exactly one encoding. The same bytes as an HTTP `Range` header must never
//! yield a range outside the chunk on the origin.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use peermesh_hosting_server::content::{parse_range, RangeAnswer};
use peermesh_content::wire::{decode, Bits, Msg};

fuzz_target!(|data: &[u8]| {
    let b = Bytes::copy_from_slice(data);
    if let Some(m) = decode(&b) {
        assert_eq!(m.encode(), b);
        if let Msg::Bitfield { chunks, bits, .. } = &m {
            let set = Bits::from_wire(*chunks, bits).expect("a decoded bitfield is valid");
            assert!(set.count() <= *chunks);
        }
    }
    let len = data.len() as u64 * 97;
    if let RangeAnswer::Partial { start, end } = parse_range(data, len) {
        assert!(start < end && end <= len);
    }
});
