//! The subset of STUN (RFC 5389) and its NAT behaviour discovery
//! extensions (RFC 5780) that peermesh speaks: Binding requests with
//! CHANGE-REQUEST, and responses with XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN
//! and OTHER-ADDRESS. The control server answers (seed 003's registration
//! server with two addresses and two ports); nodes ask. Shared so the two
//! can never disagree on the bytes.
//!
//! Decoding never panics: anything malformed is an error (fuzzed, see
//! `fuzz/fuzz_targets/stun.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER: usize = 20;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_CHANGE_REQUEST: u16 = 0x0003;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_RESPONSE_ORIGIN: u16 = 0x802B;
const ATTR_OTHER_ADDRESS: u16 = 0x802C;
const CHANGE_IP: u32 = 0x04;
const CHANGE_PORT: u32 = 0x02;
/// Largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 548;

pub type TransactionId = [u8; 12];

/// A Binding request: "tell me where you see me from", optionally answered
/// from the server's other address and/or port (RFC 5780 §7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub txid: TransactionId,
    pub change_ip: bool,
    pub change_port: bool,
}

/// A Binding success response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub txid: TransactionId,
    /// The request's source as the server saw it: the NAT's mapping.
    pub mapped: SocketAddr,
    /// Where the server sent this response from.
    pub origin: Option<SocketAddr>,
    /// The server's other address and port (alternate IP, alternate port).
    pub other: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("{0} bytes is too short for a STUN header")]
    Short(usize),
    #[error("{0} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLong(usize),
    #[error("not STUN (first bits or magic cookie)")]
    NotStun,
    #[error("length field {field} does not match {actual} bytes of attributes")]
    Length { field: usize, actual: usize },
    #[error("message type {0:#06x} is not a Binding request or success response")]
    Type(u16),
    #[error("attribute {attr:#06x} is truncated or malformed")]
    Attribute { attr: u16 },
    #[error("response without XOR-MAPPED-ADDRESS")]
    NoMappedAddress,
}

/// A decoded message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    Request(Request),
    Response(Response),
}

fn header(ty: u16, body: &[u8], txid: &TransactionId) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(txid);
    out.extend_from_slice(body);
    out
}

fn attr(out: &mut Vec<u8>, ty: u16, value: &[u8]) {
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Address value (RFC 5389 §15.1/15.2); XORed with the cookie and txid when `xor`.
fn addr_value(a: SocketAddr, xor: Option<&TransactionId>) -> Vec<u8> {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    if let Some(t) = xor {
        key[4..].copy_from_slice(t);
    }
    let mask = |i: usize| if xor.is_some() { key[i] } else { 0 };
    let port = a.port() ^ (u16::from(mask(0)) << 8 | u16::from(mask(1)));
    let mut v = vec![0u8];
    match a.ip() {
        IpAddr::V4(ip) => {
            v.push(0x01);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend(ip.octets().iter().enumerate().map(|(i, b)| b ^ mask(i)));
        }
        IpAddr::V6(ip) => {
            v.push(0x02);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend(ip.octets().iter().enumerate().map(|(i, b)| b ^ mask(i)));
        }
    }
    v
}

fn parse_addr(v: &[u8], xor: Option<&TransactionId>, attr: u16) -> Result<SocketAddr, StunError> {
    let bad = StunError::Attribute { attr };
    if v.len() < 4 {
        return Err(bad);
    }
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    if let Some(t) = xor {
        key[4..].copy_from_slice(t);
    }
    let mask = |i: usize| if xor.is_some() { key[i] } else { 0 };
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (u16::from(mask(0)) << 8 | u16::from(mask(1)));
    let ip = match (v[1], v.len()) {
        (0x01, 8) => {
            let mut o = [0u8; 4];
            for (i, b) in o.iter_mut().enumerate() {
                *b = v[4 + i] ^ mask(i);
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (0x02, 20) => {
            let mut o = [0u8; 16];
            for (i, b) in o.iter_mut().enumerate() {
                *b = v[4 + i] ^ mask(i);
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return Err(bad),
    };
    Ok(SocketAddr::new(ip, port))
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        if self.change_ip || self.change_port {
            let flags = if self.change_ip { CHANGE_IP } else { 0 }
                | if self.change_port { CHANGE_PORT } else { 0 };
            attr(&mut body, ATTR_CHANGE_REQUEST, &flags.to_be_bytes());
        }
        header(BINDING_REQUEST, &body, &self.txid)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        attr(
            &mut body,
            ATTR_XOR_MAPPED_ADDRESS,
            &addr_value(self.mapped, Some(&self.txid)),
        );
        if let Some(o) = self.origin {
            attr(&mut body, ATTR_RESPONSE_ORIGIN, &addr_value(o, None));
        }
        if let Some(o) = self.other {
            attr(&mut body, ATTR_OTHER_ADDRESS, &addr_value(o, None));
        }
        header(BINDING_SUCCESS, &body, &self.txid)
    }
}

/// Decodes a request or a success response; unknown optional attributes
/// (type below 0x8000 is comprehension-required, but a Binding carries none
/// we would need) are skipped.
pub fn decode(bytes: &[u8]) -> Result<Message, StunError> {
    if bytes.len() < HEADER {
        return Err(StunError::Short(bytes.len()));
    }
    if bytes.len() > MAX_MESSAGE {
        return Err(StunError::TooLong(bytes.len()));
    }
    let ty = u16::from_be_bytes([bytes[0], bytes[1]]);
    let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    let cookie = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if ty & 0xC000 != 0 || cookie != MAGIC_COOKIE {
        return Err(StunError::NotStun);
    }
    if len != bytes.len() - HEADER || !len.is_multiple_of(4) {
        return Err(StunError::Length {
            field: len,
            actual: bytes.len() - HEADER,
        });
    }
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&bytes[8..20]);
    let mut change = 0u32;
    let (mut mapped, mut origin, mut other) = (None, None, None);
    let mut rest = &bytes[HEADER..];
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(StunError::Attribute { attr: 0 });
        }
        let at = u16::from_be_bytes([rest[0], rest[1]]);
        let alen = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let padded = alen.div_ceil(4) * 4;
        if rest.len() < 4 + padded {
            return Err(StunError::Attribute { attr: at });
        }
        let v = &rest[4..4 + alen];
        match at {
            ATTR_CHANGE_REQUEST => {
                if alen != 4 {
                    return Err(StunError::Attribute { attr: at });
                }
                change = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            }
            ATTR_XOR_MAPPED_ADDRESS => mapped = Some(parse_addr(v, Some(&txid), at)?),
            ATTR_RESPONSE_ORIGIN => origin = Some(parse_addr(v, None, at)?),
            ATTR_OTHER_ADDRESS => other = Some(parse_addr(v, None, at)?),
            _ => {}
        }
        rest = &rest[4 + padded..];
    }
    match ty {
        BINDING_REQUEST => Ok(Message::Request(Request {
            txid,
            change_ip: change & CHANGE_IP != 0,
            change_port: change & CHANGE_PORT != 0,
        })),
        BINDING_SUCCESS => Ok(Message::Response(Response {
            txid,
            mapped: mapped.ok_or(StunError::NoMappedAddress)?,
            origin,
            other,
        })),
        t => Err(StunError::Type(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(ip.into()), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(ip.into()), p)),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(txid in any::<[u8; 12]>(), change_ip: bool, change_port: bool) {
            let r = Request { txid, change_ip, change_port };
            prop_assert_eq!(decode(&r.encode()), Ok(Message::Request(r)));
        }

        #[test]
        fn responses_round_trip(
            txid in any::<[u8; 12]>(),
            mapped in arb_addr(),
            origin in proptest::option::of(arb_addr()),
            other in proptest::option::of(arb_addr()),
        ) {
            let r = Response { txid, mapped, origin, other };
            prop_assert_eq!(decode(&r.encode()), Ok(Message::Response(r)));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn truncations_are_refused(mapped in arb_addr(), cut in 1usize..40) {
            let r = Response { txid: [7; 12], mapped, origin: Some(mapped), other: None };
            let b = r.encode();
            let cut = cut.min(b.len());
            prop_assert!(decode(&b[..b.len() - cut]).is_err());
        }
    }

    #[test]
    fn xor_mapped_address_matches_rfc_5769_sample() {
        // RFC 5769 §2.2: 192.0.2.1:32853 with this transaction id.
        let txid = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let v = addr_value("192.0.2.1:32853".parse().unwrap(), Some(&txid));
        assert_eq!(v, [0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]);
    }

    #[test]
    fn malformed_messages_are_refused() {
        let r = Request {
            txid: [1; 12],
            change_ip: true,
            change_port: false,
        }
        .encode();
        let mut bad = r.clone();
        bad[4] ^= 1;
        assert_eq!(decode(&bad), Err(StunError::NotStun));
        let mut bad = r.clone();
        bad[3] = 7;
        assert!(matches!(decode(&bad), Err(StunError::Length { .. })));
        assert_eq!(decode(&r[..10]), Err(StunError::Short(10)));
        let mut resp_without_mapped = r.clone();
        resp_without_mapped[1] = 0x01;
        resp_without_mapped[0] = 0x01;
        assert_eq!(
            decode(&resp_without_mapped),
            Err(StunError::NoMappedAddress)
        );
    }
}
