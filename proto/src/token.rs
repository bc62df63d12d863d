//! Join tokens as users hold them: the secret the server checks, and the
//! fingerprint of the server key that a node pins (in the manner of
//! kubeadm's discovery hash), so that the URL and the token are all a node
//! needs: `pmj_<48 hex digits>_<64 hex digits>`.

use std::fmt;
use std::str::FromStr;

use crate::tls::KeyPin;

/// Prefix of join (and relay) tokens.
pub const PREFIX: &str = "pmj_";
/// Hex digits of a token's secret part.
pub const SECRET_HEX: usize = 48;

/// A join token: the secret, and the server key's fingerprint when the
/// token carries one (tokens of servers before TLS do not).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// `pmj_` and the secret: what the server checks (and the node signs).
    pub secret: String,
    pub pin: Option<KeyPin>,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("JoinToken").field("pin", &self.pin).finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pin {
            Some(pin) => write!(f, "{}_{pin}", self.secret),
            None => f.write_str(&self.secret),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed join token: expected pmj_, 48 hex digits, then _ and the server key's 64-digit fingerprint")]
pub struct BadToken;

impl FromStr for JoinToken {
    type Err = BadToken;
    fn from_str(s: &str) -> Result<Self, BadToken> {
        let s = s.trim();
        let rest = s.strip_prefix(PREFIX).ok_or(BadToken)?;
        let (secret, pin) = match rest.split_once('_') {
            Some((secret, pin)) => (secret, Some(pin.parse::<KeyPin>().map_err(|_| BadToken)?)),
            None => (rest, None),
        };
        if secret.len() != SECRET_HEX || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadToken);
        }
        Ok(Self {
            secret: format!("{PREFIX}{secret}"),
            pin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_with_and_without_a_pin() {
        let secret = format!("pmj_{}", "ab".repeat(24));
        let pin = KeyPin::of_spki(b"server key");
        let t: JoinToken = format!("{secret}_{pin}").parse().unwrap();
        assert_eq!(t.secret, secret);
        assert_eq!(t.pin, Some(pin));
        assert_eq!(t.to_string().parse::<JoinToken>().unwrap(), t);
        let bare: JoinToken = secret.parse().unwrap();
        assert_eq!(bare.pin, None);
        assert!("pmj_zz".parse::<JoinToken>().is_err());
        assert!(format!("{secret}_abc").parse::<JoinToken>().is_err());
        assert!(
            !format!("{t:?}").contains(&secret[4..]),
            "Debug hides the secret"
        );
    }
}
