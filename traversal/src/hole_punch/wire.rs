//! The probe datagram on the wire.

use std::net::SocketAddr;

use super::Event;

const MAGIC: [u8; 4] = *b"PMHP";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Probe,
    /// A probe by which the initiator picks this pair as the path.
    Nominate,
    Ack,
}

/// A probe or its acknowledgement. `attempt_id` comes from the control server
/// and is unguessable, so stray or forged datagrams cannot finish an attempt;
/// `nonce` ties an ack to the probe it answers, which gives the RTT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeMessage {
    pub kind: ProbeKind,
    pub attempt_id: u64,
    pub nonce: u64,
}

impl ProbeMessage {
    pub const LEN: usize = 21;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(&MAGIC);
        out.push(match self.kind {
            ProbeKind::Probe => 1,
            ProbeKind::Ack => 2,
            ProbeKind::Nominate => 3,
        });
        out.extend_from_slice(&self.attempt_id.to_be_bytes());
        out.extend_from_slice(&self.nonce.to_be_bytes());
        out
    }

    /// `None` for anything that is not a probe message.
    pub fn decode(buf: &[u8]) -> Option<Self> {
        if buf.len() != Self::LEN || buf[..4] != MAGIC {
            return None;
        }
        let kind = match buf[4] {
            1 => ProbeKind::Probe,
            2 => ProbeKind::Ack,
            3 => ProbeKind::Nominate,
            _ => return None,
        };
        let attempt_id = u64::from_be_bytes(buf[5..13].try_into().ok()?);
        let nonce = u64::from_be_bytes(buf[13..21].try_into().ok()?);
        Some(Self {
            kind,
            attempt_id,
            nonce,
        })
    }

    /// The event for the state machine, given where the datagram arrived.
    pub fn into_event(self, socket: u16, from: SocketAddr) -> Event {
        let Self {
            kind,
            attempt_id,
            nonce,
        } = self;
        match kind {
            ProbeKind::Probe | ProbeKind::Nominate => Event::ProbeReceived {
                socket,
                from,
                attempt_id,
                nonce,
                nominate: kind == ProbeKind::Nominate,
            },
            ProbeKind::Ack => Event::ProbeAckReceived {
                socket,
                from,
                attempt_id,
                nonce,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Anything off a probe socket: no panic, and only exact encodings decode.
        #[test]
        fn arbitrary_datagrams_decode_only_if_well_formed(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(m) = ProbeMessage::decode(&data) {
                prop_assert_eq!(m.encode(), data);
            }
        }

        #[test]
        fn every_message_roundtrips(kind in 0u8..3, attempt_id: u64, nonce: u64) {
            let kind = [ProbeKind::Probe, ProbeKind::Nominate, ProbeKind::Ack][usize::from(kind)];
            let m = ProbeMessage { kind, attempt_id, nonce };
            prop_assert_eq!(ProbeMessage::decode(&m.encode()), Some(m));
        }

        /// A valid probe with any one byte changed in its header is refused.
        #[test]
        fn a_damaged_header_is_refused(at in 0usize..5, flip in 1u8..=255) {
            let mut b = ProbeMessage { kind: ProbeKind::Probe, attempt_id: 7, nonce: 9 }.encode();
            b[at] ^= flip;
            let d = ProbeMessage::decode(&b);
            // Byte 4 may turn into another valid kind; the magic may not change.
            prop_assert!(d.is_none() || (at == 4 && d.map(|m| m.kind) != Some(ProbeKind::Probe)));
        }
    }
}
