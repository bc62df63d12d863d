//! What every client of the control API (nodes, relays) needs to reach it:
//! a channel that reconnects by itself, bearer credentials, and the clock
//! that signed timestamps come from.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::transport::{Channel, Endpoint};
use tonic::Request;

/// Longest wait for a TCP connection to the control server: long enough for
/// a path across the world with a retransmitted SYN, short enough that a
/// dead server is retried (the callers back off) rather than waited on.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 PINGs on an idle connection, so that a server that vanished
/// (host crash, cut path) is noticed and the watch stream reopened, and so
/// that NAT mappings towards the server stay alive.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A PING unanswered for this long closes the connection.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid control server URL {url:?}: {reason}")]
pub struct BadUrl {
    pub url: String,
    pub reason: String,
}

/// A lazily connected channel to the control server at `url`: it
/// reconnects by itself when the server comes back after a restart.
pub fn channel(url: &str) -> Result<Channel, BadUrl> {
    let bad = |reason: String| BadUrl {
        url: url.to_string(),
        reason,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if endpoint.uri().scheme_str() != Some("http") && endpoint.uri().scheme_str() != Some("https") {
        return Err(bad("expected http:// or https://".into()));
    }
    Ok(endpoint.connect_lazy())
}

/// `msg` with `authorization: Bearer <credential>` when there is one.
pub fn with_bearer<T>(msg: T, credential: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(value) = credential.and_then(|c| format!("Bearer {c}").parse().ok()) {
        req.metadata_mut().insert("authorization", value);
    }
    req
}

/// Milliseconds since the Unix epoch: the clock of signed timestamps.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The next signed timestamp after `last`: the server refuses a timestamp
/// that is not higher than the last one it accepted (replays).
pub fn next_timestamp(last: u64) -> u64 {
    now_ms().max(last + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_http() {
        assert!(channel("ftp://example.invalid").is_err());
        assert!(channel("not a url").is_err());
    }

    #[tokio::test]
    async fn lazy_channels_need_no_server() {
        assert!(channel("http://127.0.0.1:1").is_ok());
    }

    #[test]
    fn timestamps_only_go_up() {
        let far = now_ms() + 60_000;
        assert_eq!(next_timestamp(far), far + 1);
        assert!(next_timestamp(0) >= now_ms() - 1000);
    }
}
