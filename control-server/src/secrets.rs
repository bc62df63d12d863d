//! Secrets the server hands out (join tokens, session and admin credentials).
//! Only their SHA-256 digests are stored, so a copy of the data directory
//! does not let anyone join or act as a node.

use std::path::Path;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const JOIN_TOKEN_PREFIX: &str = "pmj_";
pub const SESSION_PREFIX: &str = "pms_";
pub const ADMIN_PREFIX: &str = "pma_";
const SECRET_BYTES: usize = 24;

pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `s` has the exact shape of a secret with `prefix`.
pub fn well_formed(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == SECRET_BYTES * 2 && rest.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// The public identifier of a join token: a prefix of its digest, so knowing
/// the id does not reveal the token.
pub fn token_id(token: &str) -> String {
    hex::encode(&digest(token)[..8])
}

pub fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// Writes a secret to `path`, readable by the owner only (mode 0600), whole
/// or not at all: a temporary file beside it, synced, then renamed.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_well_formed_and_distinct() {
        let a = generate(JOIN_TOKEN_PREFIX);
        let b = generate(JOIN_TOKEN_PREFIX);
        assert!(well_formed(&a, JOIN_TOKEN_PREFIX));
        assert!(!well_formed(&a, SESSION_PREFIX));
        assert_ne!(a, b);
        assert_ne!(token_id(&a), token_id(&b));
        assert!(!well_formed("pmj_zz", JOIN_TOKEN_PREFIX));
        assert!(!well_formed(&format!("{a}0"), JOIN_TOKEN_PREFIX));
    }
}
