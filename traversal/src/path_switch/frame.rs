//! Wire format of the path switch.
//!
//! Every frame is `version: u8, type: u8, body`, all integers big endian, every
//! variable part preceded by its length, so a frame can be checked in full
//! before any of it is believed: peers and the network are not trusted.
//!
//! | type | body |
//! |---|---|
//! | `0x01` DATA | `seq: u64, len: u32, payload[len]` |
//! | `0x02` ACK  | `cumulative: u64, window_end: u64, n: u16, n × (start: u64, end: u64)` |
//! | `0x03` PING | `nonce: u64` |
//! | `0x04` PONG | `nonce: u64` |

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// The only version spoken; a bump lets a future format be told apart.
pub const VERSION: u8 = 1;
/// Largest payload a DATA frame may declare, whatever the local limit: stops a
/// forged length from making the decoder trust a huge allocation.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Most SACK ranges in one ACK; keeps ACK frames small and their handling bounded.
pub const MAX_ACK_RANGES: usize = 32;
/// Bytes a DATA frame adds around its payload.
pub const DATA_OVERHEAD: usize = 2 + 8 + 4;

const T_DATA: u8 = 0x01;
const T_ACK: u8 = 0x02;
const T_PING: u8 = 0x03;
const T_PONG: u8 = 0x04;

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// One application message with its sequence number.
    Data { seq: u64, payload: Bytes },
    /// What the receiver holds, and how far the sender may go.
    Ack(Ack),
    /// RTT probe of one path; answered on the same path.
    Ping { nonce: u64 },
    /// Answer to a [`Frame::Ping`].
    Pong { nonce: u64 },
}

/// Cumulative acknowledgement with selective ranges and the flow-control limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    /// Every sequence number below this has been received.
    pub cumulative: u64,
    /// The receiver accepts sequence numbers below this (flow control).
    pub window_end: u64,
    /// Ranges above `cumulative` also received: ascending, disjoint, non-adjacent.
    pub ranges: Vec<Range<u64>>,
}

/// Why a frame was refused. The first group is malformed bytes; the rest are
/// well-formed frames that break the protocol, raised by `PathSwitch::on_frame`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame truncated")]
    Truncated,
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("declared payload length {len} exceeds {max}")]
    Oversize { len: u64, max: usize },
    #[error("{0} trailing bytes after the frame")]
    TrailingBytes(usize),
    #[error("{0} ack ranges exceed the limit")]
    TooManyRanges(usize),
    #[error("malformed ack: {0}")]
    InvalidAck(&'static str),
    #[error("ack covers sequence numbers that were never sent")]
    AckBeyondSent,
    #[error("message of {len} bytes exceeds the local limit of {max}")]
    MessageTooLarge { len: usize, max: usize },
}

impl Frame {
    /// Serialises the frame. Callers build only valid frames, so this cannot fail.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        buf.put_u8(VERSION);
        match self {
            Frame::Data { seq, payload } => {
                debug_assert!(payload.len() <= MAX_PAYLOAD);
                buf.put_u8(T_DATA);
                buf.put_u64(*seq);
                buf.put_u32(payload.len() as u32);
                buf.put_slice(payload);
            }
            Frame::Ack(ack) => {
                debug_assert!(ack.ranges.len() <= MAX_ACK_RANGES);
                buf.put_u8(T_ACK);
                buf.put_u64(ack.cumulative);
                buf.put_u64(ack.window_end);
                buf.put_u16(ack.ranges.len() as u16);
                for r in &ack.ranges {
                    buf.put_u64(r.start);
                    buf.put_u64(r.end);
                }
            }
            Frame::Ping { nonce } => {
                buf.put_u8(T_PING);
                buf.put_u64(*nonce);
            }
            Frame::Pong { nonce } => {
                buf.put_u8(T_PONG);
                buf.put_u64(*nonce);
            }
        }
        buf.freeze()
    }

    /// Length of [`Frame::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        2 + match self {
            Frame::Data { payload, .. } => 8 + 4 + payload.len(),
            Frame::Ack(ack) => 8 + 8 + 2 + 16 * ack.ranges.len(),
            Frame::Ping { .. } | Frame::Pong { .. } => 8,
        }
    }
}

/// Parses exactly one frame; anything left over, short, oversize or unknown is an error.
pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let frame = match r.u8()? {
        T_DATA => {
            let seq = r.u64()?;
            let len = r.u32()? as u64;
            if len > MAX_PAYLOAD as u64 {
                return Err(FrameError::Oversize {
                    len,
                    max: MAX_PAYLOAD,
                });
            }
            let payload = Bytes::copy_from_slice(r.take(len as usize)?);
            Frame::Data { seq, payload }
        }
        T_ACK => {
            let cumulative = r.u64()?;
            let window_end = r.u64()?;
            let n = r.u16()? as usize;
            if n > MAX_ACK_RANGES {
                return Err(FrameError::TooManyRanges(n));
            }
            if window_end < cumulative {
                return Err(FrameError::InvalidAck("window ends below cumulative"));
            }
            let mut ranges = Vec::with_capacity(n);
            // A range must start past the previous one's end (or past `cumulative`),
            // with a gap: adjacent or overlapping ranges would be a different encoding
            // of the same state, which a correct peer never sends.
            let mut floor = cumulative;
            for _ in 0..n {
                let start = r.u64()?;
                let end = r.u64()?;
                if start >= end {
                    return Err(FrameError::InvalidAck("empty range"));
                }
                if start <= floor {
                    return Err(FrameError::InvalidAck("ranges not ascending with gaps"));
                }
                if end > window_end {
                    return Err(FrameError::InvalidAck("range beyond window"));
                }
                floor = end;
                ranges.push(start..end);
            }
            Frame::Ack(Ack {
                cumulative,
                window_end,
                ranges,
            })
        }
        T_PING => Frame::Ping { nonce: r.u64()? },
        T_PONG => Frame::Pong { nonce: r.u64()? },
        other => return Err(FrameError::UnknownType(other)),
    };
    if !r.0.is_empty() {
        return Err(FrameError::TrailingBytes(r.0.len()));
    }
    Ok(frame)
}

/// Bounds-checked reads: never indexes past the end, so no input can panic.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}
