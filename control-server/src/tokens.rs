//! Join tokens as their two consumers use them: the registry (nodes join a
//! group with a node token) and the relay directory (relays register with a
//! relay token). Creating and listing tokens is the registry's;
//! what a token allows is checked here, the same way
//! for both kinds.

use std::time::Duration;

use libp2p_identity::{PeerId, PublicKey};
use peermesh_proto::api::TokenInfo;
use peermesh_proto::store::v1::TokenRecord;

use crate::error::{ControlError, Result};
use crate::sessions::decode_key;
use crate::store::{Store, Txn};
use crate::{secrets, validate};

/// A token as the admin API shows it.
pub fn token_info(t: &TokenRecord) -> TokenInfo {
    TokenInfo {
        token_id: t.token_id.clone(),
        group: t.group.clone(),
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        uses: t.uses,
        max_uses: t.max_uses,
        revoked: t.revoked,
        relay: t.relay,
    }
}

/// Shape checks shared by every signed request that carries a token (node
/// joins, relay registrations): the token's form, the key, the signature size.
pub fn check_signed_token_request(
    kind: &str,
    token: &str,
    public_key: &[u8],
    signature: &[u8],
) -> Result<(PublicKey, PeerId)> {
    validate::bytes_limit("token", token.len(), validate::MAX_TOKEN_LEN)?;
    if !secrets::well_formed(token, secrets::JOIN_TOKEN_PREFIX) {
        return Err(ControlError::invalid(format!(
            "malformed {kind} token (expected pmj_ and 48 hex digits)"
        )));
    }
    let decoded = decode_key(public_key)?;
    validate::bytes_limit("signature", signature.len(), validate::MAX_SIGNATURE_BYTES)?;
    Ok(decoded)
}

/// The record of token `token_id`, presented by a `kind` ("join", "relay").
pub fn load(store: &Store, token_id: &str, kind: &str) -> Result<TokenRecord> {
    store
        .token(token_id)?
        .ok_or_else(|| ControlError::unauthenticated(format!("unknown {kind} token")))
}

/// The record of a token an administrator names by the secret (with or
/// without the server key's fingerprint) or its id.
pub fn find(store: &Store, token_or_id: &str) -> Result<TokenRecord> {
    validate::bytes_limit("token", token_or_id.len(), validate::MAX_TOKEN_LEN)?;
    let token_id = if let Ok(t) = token_or_id.parse::<peermesh_proto::token::JoinToken>() {
        secrets::token_id(&t.secret)
    } else if token_or_id.len() == 16 && token_or_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        token_or_id.to_ascii_lowercase()
    } else {
        return Err(ControlError::invalid(
            "expected a join token (pmj_…) or a 16-digit token id",
        ));
    };
    store
        .token(&token_id)?
        .ok_or_else(|| ControlError::not_found(format!("no token with id {token_id}")))
}

/// Refuses a revoked or expired token.
pub fn check_live(token: &TokenRecord, kind: &str, now: u64) -> Result<()> {
    if token.revoked {
        return Err(ControlError::unauthenticated(format!(
            "{kind} token was revoked"
        )));
    }
    if token.expires_ms <= now {
        return Err(ControlError::unauthenticated(format!(
            "{kind} token expired {} ago",
            humantime::format_duration(Duration::from_secs((now - token.expires_ms) / 1000))
        )));
    }
    Ok(())
}

/// Takes one use of `token` (written in `txn`), or refuses a used-up token.
/// The caller holds the lock under which its kind of token is counted.
pub fn take_use(txn: &mut Txn, token: &mut TokenRecord, kind: &str) -> Result<()> {
    check_uses(token, kind)?;
    token.uses += 1;
    txn.put_token(token);
    Ok(())
}

/// Refuses a used-up token.
pub fn check_uses(token: &TokenRecord, kind: &str) -> Result<()> {
    if token.max_uses != 0 && token.uses >= token.max_uses {
        return Err(ControlError::unauthenticated(format!(
            "{kind} token used up ({} of {} uses)",
            token.uses, token.max_uses
        )));
    }
    Ok(())
}
