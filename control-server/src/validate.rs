//! Limits and shape checks for everything a client sends.

use crate::error::{ControlError, Result};

pub const MAX_NAME: usize = 63;
pub const MAX_ADDRESSES: usize = 32;
pub const MAX_ADDRESS_LEN: usize = 256;
pub const MAX_LINKS: usize = 4096;
pub const MAX_KEY_BYTES: usize = 128;
pub const MAX_SIGNATURE_BYTES: usize = 128;
pub const MAX_TOKEN_LEN: usize = 128;
/// Largest gRPC message the server decodes.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A DNS label: lowercase letters, digits and inner hyphens, 1..=63 bytes.
pub fn dns_label(what: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(ControlError::invalid(format!("{what} is empty")));
    }
    if s.len() > MAX_NAME {
        return Err(ControlError::invalid(format!(
            "{what} is {} bytes; the limit is {MAX_NAME}",
            s.len()
        )));
    }
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if !ok {
        return Err(ControlError::invalid(format!(
            "{what} {s:?} is not a DNS label (a-z, 0-9 and inner '-')"
        )));
    }
    Ok(())
}

/// Turns a free-form name (e.g. a hostname) into a DNS label.
pub fn sanitize_name(s: &str) -> String {
    let mut out: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.truncate(MAX_NAME - 4); // room for a "-NNN" suffix
    out.trim_matches('-').to_string()
}

pub fn bytes_limit(what: &str, len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(ControlError::invalid(format!(
            "{what} is {len} bytes; the limit is {max}"
        )));
    }
    Ok(())
}

pub fn addresses(list: &[String]) -> Result<()> {
    if list.len() > MAX_ADDRESSES {
        return Err(ControlError::invalid(format!(
            "{} addresses; the limit is {MAX_ADDRESSES}",
            list.len()
        )));
    }
    for a in list {
        bytes_limit("address", a.len(), MAX_ADDRESS_LEN)?;
        match a.parse::<multiaddr::Multiaddr>() {
            Err(e) => {
                return Err(ControlError::invalid(format!(
                    "address {a:?} is not a multiaddr (e.g. /ip4/192.0.2.1/udp/4000/quic-v1): {e}"
                )))
            }
            // "" parses as the multiaddr of no protocols: nowhere to dial.
            Ok(m) if m.is_empty() => {
                return Err(ControlError::invalid(
                    "address \"\" is not a multiaddr (e.g. /ip4/192.0.2.1/udp/4000/quic-v1): it is empty",
                ))
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(dns_label("name", "node-1").is_ok());
        assert!(dns_label("name", "").is_err());
        assert!(dns_label("name", "-a").is_err());
        assert!(dns_label("name", "A").is_err());
        assert!(dns_label("name", "a.b").is_err());
        assert!(dns_label("name", &"a".repeat(64)).is_err());
        assert_eq!(sanitize_name("My Laptop.local"), "my-laptop-local");
        assert!(dns_label("name", &sanitize_name(&"x".repeat(200))).is_ok());
    }

    #[test]
    fn address_shapes() {
        assert!(addresses(&["/ip4/127.0.0.1/udp/1/quic-v1".into()]).is_ok());
        assert!(addresses(&["127.0.0.1:1".into()]).is_err());
        assert!(addresses(&["/ip4/1 2".into()]).is_err());
        assert!(addresses(&vec!["/x".into(); MAX_ADDRESSES + 1]).is_err());
    }
}
