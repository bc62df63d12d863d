//! Payloads signed with a node's key.
//!
//! Each payload starts with a distinct domain string so that a signature made
//! for one purpose can never be presented for another, and every variable
//! field is length-prefixed so that no two field lists encode alike.

const JOIN_DOMAIN: &[u8] = b"peermesh/join/v1";
const AUTH_DOMAIN: &[u8] = b"peermesh/auth/v1";
const RELAY_DOMAIN: &[u8] = b"peermesh/relay/v1";

fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_be_bytes());
    out.extend_from_slice(field);
}

/// What a node signs to join with `token` under `name` at `timestamp_ms`.
pub fn join_payload(token: &str, public_key: &[u8], name: &str, timestamp_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + token.len() + public_key.len() + name.len());
    push_field(&mut out, JOIN_DOMAIN);
    push_field(&mut out, token.as_bytes());
    push_field(&mut out, public_key);
    push_field(&mut out, name.as_bytes());
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out
}

/// What a registered node signs to open a session with the server `server_id`.
pub fn auth_payload(server_id: &str, public_key: &[u8], timestamp_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + server_id.len() + public_key.len());
    push_field(&mut out, AUTH_DOMAIN);
    push_field(&mut out, server_id.as_bytes());
    push_field(&mut out, public_key);
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out
}

/// What a relay server signs to register under `token`.
pub fn relay_payload(
    token: &str,
    public_key: &[u8],
    addresses: &[String],
    region: &str,
    timestamp_ms: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + token.len() + public_key.len());
    push_field(&mut out, RELAY_DOMAIN);
    push_field(&mut out, token.as_bytes());
    push_field(&mut out, public_key);
    out.extend_from_slice(&(addresses.len() as u64).to_be_bytes());
    for a in addresses {
        push_field(&mut out, a.as_bytes());
    }
    push_field(&mut out, region.as_bytes());
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_cannot_slide_into_each_other() {
        assert_ne!(
            join_payload("ab", b"k", "c", 1),
            join_payload("a", b"k", "bc", 1)
        );
        assert_ne!(
            join_payload("t", b"k", "n", 1),
            join_payload("t", b"k", "n", 2)
        );
        assert_ne!(auth_payload("s", b"k", 1), auth_payload("s", b"k", 2));
        assert_ne!(auth_payload("s", b"kk", 1), auth_payload("sk", b"k", 1));
        assert_ne!(
            relay_payload("t", b"k", &["/a".into(), "/b".into()], "r", 1),
            relay_payload("t", b"k", &["/a/b".into()], "r", 1)
        );
    }
}
