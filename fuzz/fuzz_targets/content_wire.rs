//! Arbitrary bytes from peers must never panic the content protocol's decoder, and what
//! decodes has exactly one encoding. What decodes is then checked against a manifest's chunk
//! count (the scheduler's range check, which refuses a peer naming a chunk past the end): a
//! message that passes names only chunks below the count, and one that fails names one at or
//! past it. The same bytes as an HTTP `Range` header must never yield a range outside the
//! chunk on the origin.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use peermesh_content::wire::{check_index, decode, Bits, Msg};
use peermesh_hosting_server::content::{parse_range, RangeAnswer};

fuzz_target!(|data: &[u8]| {
    let b = Bytes::copy_from_slice(data);
    if let Some(m) = decode(&b) {
        assert_eq!(m.encode(), b);
        // The manifest's count: from the input's last bytes, so that both sides of the
        // check are reached.
        let count = data
            .iter()
            .rev()
            .take(2)
            .fold(0u32, |acc, x| acc << 8 | u32::from(*x));
        let ok = m.check_range(count).is_ok();
        match &m {
            Msg::Bitfield { chunks, bits, .. } => {
                let set = Bits::from_wire(*chunks, bits).expect("a decoded bitfield is valid");
                assert!(set.count() <= *chunks);
                assert_eq!(ok, set.check_len(count).is_ok());
                assert_eq!(ok, *chunks == count);
            }
            Msg::Have { index, .. } | Msg::Claim { index, .. } => {
                assert_eq!(ok, *index < count);
                assert_eq!(ok, check_index(*index, count).is_ok());
            }
            _ => assert!(ok),
        }
    }
    let len = data.len() as u64 * 97;
    if let RangeAnswer::Partial { start, end } = parse_range(data, len) {
        assert!(start < end && end <= len);
    }
});
