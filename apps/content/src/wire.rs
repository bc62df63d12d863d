//! The content protocol's messages ([`crate::PROTOCOL`] on the node's router).
//!
//! Every message is one link message (≤ [`MAX_MESSAGE`] bytes of payload after the protocol
//! header), a type byte and big-endian fields:
//!
//! | type | message | fields |
//! |---|---|---|
//! | 1 | `Bitfield` | content id (32), chunk count (u32), one bit per chunk, MSB first |
//! | 2 | `Have` | content id (32), chunk index (u32) |
//! | 3 | `Claim` | content id (32), chunk index (u32): "I am fetching this one from the origin" |
//! | 4 | `Request` | request id (u32), chunk hash (32) |
//! | 5 | `Data` | request id (u32), offset (u32), chunk length (u32), bytes |
//! | 6 | `Reject` | request id (u32), reason (u8: 0 not here, 1 busy) |
//!
//! A node that starts fetching a content id sends its `Bitfield` to every peer; a peer that
//! knows the content answers with its own (once per peer and content), and from then on both
//! send each other `Have` for every chunk they store and `Claim` for every chunk they start
//! fetching from the origin. A chunk is asked for by hash (content-addressed, so any holder
//! can serve it whatever file it came from) and comes back as `Data` pieces in order.
//!
//! [`decode`] never panics: anything short, long, of an unknown type or with inconsistent
//! lengths is `None`, and the caller drops and counts it.
//!
//! A message that decodes can still name chunks that its content does not have (an index
//! past the end, a bitfield of another length): only the content's manifest knows how many
//! chunks there are. [`Msg::check_range`] checks that against the manifest's count; the
//! scheduler refuses a peer whose message fails it for the rest of that fetch.

use bytes::{BufMut, Bytes, BytesMut};

use peermesh_node::protocol::MAX_MESSAGE;

use crate::manifest::{Hash32, MAX_CHUNKS, MAX_CHUNK_LEN, MESSAGE_LIMIT};

// The manifest format sizes bitfields for messages of MESSAGE_LIMIT bytes.
const _: () = assert!(MESSAGE_LIMIT == MAX_MESSAGE);
/// Header of a `Data` message: type, request id, offset, length.
pub const DATA_HEADER: usize = 1 + 4 + 4 + 4;
/// Chunk bytes per `Data` message.
pub const DATA_PIECE: usize = MAX_MESSAGE - DATA_HEADER;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    NotHere = 0,
    Busy = 1,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Bitfield {
        content: Hash32,
        chunks: u32,
        bits: Bytes,
    },
    Have {
        content: Hash32,
        index: u32,
    },
    Claim {
        content: Hash32,
        index: u32,
    },
    Request {
        req: u32,
        hash: Hash32,
    },
    Data {
        req: u32,
        offset: u32,
        total: u32,
        bytes: Bytes,
    },
    Reject {
        req: u32,
        reason: RejectReason,
    },
}

/// A message names chunks that its content does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("a bitfield of {got} chunks for a content of {chunks}")]
    BitfieldSize { got: u32, chunks: u32 },
    #[error("chunk index {index} past the end (the content has {chunks} chunks)")]
    PastEnd { index: u32, chunks: u32 },
}

/// `index` names a chunk of a content of `chunks` chunks.
pub fn check_index(index: u32, chunks: u32) -> Result<(), RangeError> {
    if index < chunks {
        Ok(())
    } else {
        Err(RangeError::PastEnd { index, chunks })
    }
}

fn bitfield_len(chunks: u32) -> usize {
    (chunks as usize).div_ceil(8)
}

impl Msg {
    /// Checks the chunks this message names against a content of `chunks` chunks (its
    /// manifest's count): a `Have` or `Claim` index must be below it and a `Bitfield` must
    /// have exactly that many bits. Messages that name no chunk of a content pass.
    pub fn check_range(&self, chunks: u32) -> Result<(), RangeError> {
        match self {
            Msg::Bitfield { chunks: got, .. } if *got != chunks => {
                Err(RangeError::BitfieldSize { got: *got, chunks })
            }
            Msg::Have { index, .. } | Msg::Claim { index, .. } => check_index(*index, chunks),
            _ => Ok(()),
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        match self {
            Msg::Bitfield {
                content,
                chunks,
                bits,
            } => {
                b.put_u8(1);
                b.put_slice(content);
                b.put_u32(*chunks);
                b.put_slice(bits);
            }
            Msg::Have { content, index } => {
                b.put_u8(2);
                b.put_slice(content);
                b.put_u32(*index);
            }
            Msg::Claim { content, index } => {
                b.put_u8(3);
                b.put_slice(content);
                b.put_u32(*index);
            }
            Msg::Request { req, hash } => {
                b.put_u8(4);
                b.put_u32(*req);
                b.put_slice(hash);
            }
            Msg::Data {
                req,
                offset,
                total,
                bytes,
            } => {
                b.reserve(DATA_HEADER + bytes.len());
                b.put_u8(5);
                b.put_u32(*req);
                b.put_u32(*offset);
                b.put_u32(*total);
                b.put_slice(bytes);
            }
            Msg::Reject { req, reason } => {
                b.put_u8(6);
                b.put_u32(*req);
                b.put_u8(*reason as u8);
            }
        }
        b.freeze()
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn hash_at(b: &[u8], at: usize) -> Option<Hash32> {
    b.get(at..at + 32)?.try_into().ok()
}

/// Parses one message; `None` for anything malformed.
pub fn decode(msg: &Bytes) -> Option<Msg> {
    let b = &msg[..];
    if b.len() > MAX_MESSAGE {
        return None;
    }
    let exact = |n: usize| (b.len() == n).then_some(());
    match *b.first()? {
        1 => {
            let content = hash_at(b, 1)?;
            let chunks = u32_at(b, 33)?;
            if chunks > MAX_CHUNKS {
                return None;
            }
            exact(37 + bitfield_len(chunks))?;
            // Bits past the last chunk must be zero.
            if chunks % 8 != 0 {
                let last = *b.last()?;
                if last & (0xffu8 >> (chunks % 8)) != 0 {
                    return None;
                }
            }
            Some(Msg::Bitfield {
                content,
                chunks,
                bits: msg.slice(37..),
            })
        }
        t @ (2 | 3) => {
            exact(37)?;
            let content = hash_at(b, 1)?;
            let index = u32_at(b, 33)?;
            Some(if t == 2 {
                Msg::Have { content, index }
            } else {
                Msg::Claim { content, index }
            })
        }
        4 => {
            exact(37)?;
            Some(Msg::Request {
                req: u32_at(b, 1)?,
                hash: hash_at(b, 5)?,
            })
        }
        5 => {
            let req = u32_at(b, 1)?;
            let offset = u32_at(b, 5)?;
            let total = u32_at(b, 9)?;
            let len = b.len().checked_sub(DATA_HEADER)?;
            if total == 0
                || total > MAX_CHUNK_LEN
                || len == 0
                || u64::from(offset) + len as u64 > u64::from(total)
            {
                return None;
            }
            Some(Msg::Data {
                req,
                offset,
                total,
                bytes: msg.slice(DATA_HEADER..),
            })
        }
        6 => {
            exact(6)?;
            let reason = match b[5] {
                0 => RejectReason::NotHere,
                1 => RejectReason::Busy,
                _ => return None,
            };
            Some(Msg::Reject {
                req: u32_at(b, 1)?,
                reason,
            })
        }
        _ => None,
    }
}

/// A set of chunk indices, one bit each, MSB first (the `Bitfield` layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bits {
    n: u32,
    bytes: Vec<u8>,
    ones: u32,
}

impl Bits {
    pub fn new(n: u32) -> Self {
        Self {
            n,
            bytes: vec![0; bitfield_len(n)],
            ones: 0,
        }
    }

    /// From a decoded `Bitfield` of `n` chunks (already checked by [`decode`]).
    pub fn from_wire(n: u32, bits: &[u8]) -> Option<Self> {
        if bits.len() != bitfield_len(n) {
            return None;
        }
        let ones = bits.iter().map(|b| b.count_ones()).sum();
        Some(Self {
            n,
            bytes: bits.to_vec(),
            ones,
        })
    }

    pub fn len(&self) -> u32 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn count(&self) -> u32 {
        self.ones
    }

    pub fn is_full(&self) -> bool {
        self.ones == self.n
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.n && self.bytes[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }

    /// Sets bit `i`; false if it is out of range.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.n {
            return false;
        }
        let (byte, mask) = ((i / 8) as usize, 0x80u8 >> (i % 8));
        if self.bytes[byte] & mask == 0 {
            self.bytes[byte] |= mask;
            self.ones += 1;
        }
        true
    }

    /// Clears bit `i` (nothing if it is out of range).
    pub fn clear(&mut self, i: u32) {
        if i >= self.n {
            return;
        }
        let (byte, mask) = ((i / 8) as usize, 0x80u8 >> (i % 8));
        if self.bytes[byte] & mask != 0 {
            self.bytes[byte] &= !mask;
            self.ones -= 1;
        }
    }

    /// The set is of a content of `chunks` chunks.
    pub fn check_len(&self, chunks: u32) -> Result<(), RangeError> {
        if self.n == chunks {
            Ok(())
        } else {
            Err(RangeError::BitfieldSize {
                got: self.n,
                chunks,
            })
        }
    }

    pub fn to_msg(&self, content: Hash32) -> Msg {
        Msg::Bitfield {
            content,
            chunks: self.n,
            bits: Bytes::copy_from_slice(&self.bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_msg() -> impl Strategy<Value = Msg> {
        let h = any::<[u8; 32]>();
        prop_oneof![
            (h, 0u32..5000).prop_flat_map(|(content, n)| {
                proptest::collection::vec(any::<bool>(), n as usize).prop_map(move |v| {
                    let mut bits = Bits::new(n);
                    for (i, b) in v.iter().enumerate() {
                        if *b {
                            bits.set(i as u32);
                        }
                    }
                    bits.to_msg(content)
                })
            }),
            (h, any::<u32>()).prop_map(|(content, index)| Msg::Have { content, index }),
            (h, any::<u32>()).prop_map(|(content, index)| Msg::Claim { content, index }),
            (any::<u32>(), h).prop_map(|(req, hash)| Msg::Request { req, hash }),
            (
                any::<u32>(),
                0u32..1000,
                proptest::collection::vec(any::<u8>(), 1..2000)
            )
                .prop_map(|(req, offset, v)| Msg::Data {
                    req,
                    offset,
                    total: offset + v.len() as u32 + 7,
                    bytes: Bytes::from(v),
                }),
            (any::<u32>(), any::<bool>()).prop_map(|(req, busy)| Msg::Reject {
                req,
                reason: if busy {
                    RejectReason::Busy
                } else {
                    RejectReason::NotHere
                },
            }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(m in arb_msg()) {
            let wire = m.encode();
            prop_assert!(wire.len() <= MAX_MESSAGE);
            prop_assert_eq!(decode(&wire), Some(m));
        }

        #[test]
        fn arbitrary_bytes_never_panic(v in proptest::collection::vec(any::<u8>(), 0..300)) {
            let b = Bytes::from(v);
            if let Some(m) = decode(&b) {
                // Whatever parses re-encodes to the same bytes.
                prop_assert_eq!(m.encode(), b);
            }
        }

        /// What decodes passes the range check against a content of `chunks`
        /// chunks exactly when every chunk it names is below `chunks`.
        #[test]
        fn range_checks_agree_with_the_indexes(m in arb_msg(), chunks in 0u32..6000) {
            let ok = m.check_range(chunks).is_ok();
            match &m {
                Msg::Bitfield { chunks: n, bits, .. } => {
                    let set = Bits::from_wire(*n, bits).unwrap();
                    prop_assert_eq!(ok, *n == chunks);
                    prop_assert_eq!(ok, set.check_len(chunks).is_ok());
                }
                Msg::Have { index, .. } | Msg::Claim { index, .. } => {
                    prop_assert_eq!(ok, *index < chunks);
                    prop_assert_eq!(ok, check_index(*index, chunks).is_ok());
                }
                _ => prop_assert!(ok),
            }
        }

        #[test]
        fn truncated_messages_are_refused(m in arb_msg(), cut in 1usize..40) {
            let wire = m.encode();
            let short = wire.slice(..wire.len().saturating_sub(cut));
            // A shorter Data is still a (shorter) valid Data; anything else must fail.
            if let Some(d) = decode(&short) {
                let is_data = matches!(d, Msg::Data { .. });
                prop_assert!(is_data);
            }
        }
    }

    #[test]
    fn full_data_message_fits() {
        let m = Msg::Data {
            req: 1,
            offset: 0,
            total: DATA_PIECE as u32,
            bytes: Bytes::from(vec![1u8; DATA_PIECE]),
        };
        assert_eq!(m.encode().len(), MAX_MESSAGE);
        assert!(decode(&m.encode()).is_some());
        let big = Bits::new(MAX_CHUNKS).to_msg([0; 32]).encode();
        assert_eq!(big.len(), MAX_MESSAGE);
        assert!(decode(&big).is_some());
    }

    #[test]
    fn data_past_its_chunk_is_refused() {
        let mut b = Msg::Data {
            req: 1,
            offset: 10,
            total: 12,
            bytes: Bytes::from_static(&[1, 2]),
        }
        .encode()
        .to_vec();
        assert!(decode(&Bytes::from(b.clone())).is_some());
        b.push(3);
        assert!(decode(&Bytes::from(b)).is_none());
    }

    #[test]
    fn chunk_indexes_are_checked_against_the_manifest() {
        let c = [7; 32];
        let have = |index| Msg::Have { content: c, index };
        let claim = |index| Msg::Claim { content: c, index };
        assert_eq!(have(9).check_range(10), Ok(()));
        assert_eq!(
            have(10).check_range(10),
            Err(RangeError::PastEnd {
                index: 10,
                chunks: 10
            })
        );
        assert!(claim(u32::MAX).check_range(10).is_err());
        assert!(
            claim(0).check_range(0).is_err(),
            "an empty content has no chunk 0"
        );
        let bits = Bits::new(16);
        assert_eq!(bits.to_msg(c).check_range(16), Ok(()));
        assert_eq!(
            bits.to_msg(c).check_range(10),
            Err(RangeError::BitfieldSize {
                got: 16,
                chunks: 10
            })
        );
        assert_eq!(bits.check_len(16), Ok(()));
        assert!(bits.check_len(17).is_err());
        // Requests, data and rejects name no chunk index.
        let r = Msg::Request { req: 1, hash: c };
        assert_eq!(r.check_range(0), Ok(()));
    }

    #[test]
    fn bits() {
        let mut b = Bits::new(10);
        assert!(b.set(0) && b.set(9) && !b.set(10));
        assert!(b.set(9));
        assert_eq!(b.count(), 2);
        assert!(b.get(9) && !b.get(8) && !b.get(100));
        let Msg::Bitfield { bits, chunks, .. } = b.to_msg([1; 32]) else {
            unreachable!()
        };
        assert_eq!(Bits::from_wire(chunks, &bits), Some(b.clone()));
        b.clear(9);
        b.clear(9);
        b.clear(100);
        assert_eq!((b.count(), b.get(9), b.get(0)), (1, false, true));
    }
}
