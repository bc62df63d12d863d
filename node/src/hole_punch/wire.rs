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
