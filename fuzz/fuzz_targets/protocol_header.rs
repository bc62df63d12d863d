//! Arbitrary bytes from a peer must never panic the protocol header parser
//! that every link message goes through, and what it accepts splits the
//! message exactly: `[name length][name][payload]`, nothing lost or added.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use peermesh_node::protocol::{decode, ProtocolId};

fuzz_target!(|data: &[u8]| {
    if let Some((name, payload)) = decode(Bytes::copy_from_slice(data)) {
        assert_eq!(usize::from(data[0]), name.len());
        assert_eq!(1 + name.len() + payload.len(), data.len());
        if let Ok(id) = ProtocolId::new(&String::from_utf8_lossy(&name)) {
            if id.as_str().as_bytes() == &name[..] {
                assert_eq!(&id.encode(&payload)[..], data);
            }
        }
    }
});
