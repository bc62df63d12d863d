//! Payloads signed with a node's key, and those the control server signs
//! with its server key (map updates, key rotations).
//!
//! Each payload starts with a distinct domain string so that a signature made
//! for one purpose can never be presented for another, and every variable
//! field is length-prefixed so that no two field lists encode alike.

const JOIN_DOMAIN: &[u8] = b"peermesh/join/v1";
const AUTH_DOMAIN: &[u8] = b"peermesh/auth/v1";
const RELAY_DOMAIN: &[u8] = b"peermesh/relay/v1";
const MAP_PERSONAL_DOMAIN: &[u8] = b"peermesh/map-personal/v1";
const MAP_DELTA_DOMAIN: &[u8] = b"peermesh/map-delta/v1";
const ROTATION_DOMAIN: &[u8] = b"peermesh/key-rotation/v1";
const MAP_PARTS_DOMAIN: &[u8] = b"peermesh/map-parts/v1";

/// What the server signs for one watcher: a full map or a punch
/// instruction for node `node_id` on the stream it opened with `nonce`.
pub fn map_personal_payload(
    server_id: &str,
    node_id: &str,
    nonce: &[u8],
    update: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + node_id.len() + nonce.len() + update.len());
    push_field(&mut out, MAP_PERSONAL_DOMAIN);
    push_field(&mut out, server_id.as_bytes());
    push_field(&mut out, node_id.as_bytes());
    push_field(&mut out, nonce);
    push_field(&mut out, update);
    out
}

/// What the server signs once for every watcher of `group`: a delta of the
/// group's change feed run `epoch`.
pub fn map_delta_payload(server_id: &str, group: &str, epoch: &[u8], update: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + group.len() + epoch.len() + update.len());
    push_field(&mut out, MAP_DELTA_DOMAIN);
    push_field(&mut out, server_id.as_bytes());
    push_field(&mut out, group.as_bytes());
    push_field(&mut out, epoch);
    push_field(&mut out, update);
    out
}

/// The digest that authenticates the parts of a full map: SHA-256 over
/// each part's encoded `NetworkMapUpdate`, length-prefixed, in order.
pub fn map_parts_digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    push_field_hasher(&mut h, MAP_PARTS_DOMAIN);
    for p in parts {
        push_field_hasher(&mut h, p);
    }
    h.finalize().to_vec()
}

fn push_field_hasher(h: &mut impl sha2::Digest, field: &[u8]) {
    h.update((field.len() as u64).to_be_bytes());
    h.update(field);
}

/// Puts the parts of a full map back together: `head`'s map with the peers
/// of every part but the watching node itself (as a map in one piece
/// lists them).
pub fn assemble_map(
    mut head: crate::api::NetworkMap,
    parts: impl IntoIterator<Item = crate::api::PeerBatch>,
) -> crate::api::NetworkMap {
    let own = head.self_node.as_ref().map(|p| p.node_id.clone());
    for part in parts {
        head.peers.extend(
            part.peers
                .into_iter()
                .filter(|p| Some(&p.node_id) != own.as_ref()),
        );
    }
    head.parts = 0;
    head.parts_digest.clear();
    head
}

/// What the replaced server key signs when the server key is rotated to
/// `new_key` (SubjectPublicKeyInfo, DER) at `at_ms`.
pub fn rotation_payload(server_id: &str, new_key: &[u8], at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + server_id.len() + new_key.len());
    push_field(&mut out, ROTATION_DOMAIN);
    push_field(&mut out, server_id.as_bytes());
    push_field(&mut out, new_key);
    out.extend_from_slice(&at_ms.to_be_bytes());
    out
}

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
            map_personal_payload("s", "n", b"x", b"u"),
            map_delta_payload("s", "n", b"x", b"u")
        );
        assert_ne!(
            map_delta_payload("s", "g", b"e1", b"u"),
            map_delta_payload("s", "g", b"e", b"1u")
        );
        assert_ne!(
            relay_payload("t", b"k", &["/a".into(), "/b".into()], "r", 1),
            relay_payload("t", b"k", &["/a/b".into()], "r", 1)
        );
    }
}
