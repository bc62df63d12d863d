//! What every client of the control API (nodes, relays, the admin CLI)
//! needs to reach it: a channel that reconnects by itself, over TLS with the
//! pinned server key (or plaintext to loopback, or with `insecure`), bearer
//! credentials, and the clock that signed timestamps come from.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::api::{
    node_control_client::NodeControlClient, GetServerIdentityRequest, ServerIdentity,
};
use crate::tls::{self, KeyPin, KeyVerifier, ServerTrust};

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

/// How a client may reach the control server.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// The server key it trusts (pinned from a join token).
    pub trust: ServerTrust,
    /// Plaintext (`http://`) to an address that is not loopback: only on a
    /// network the user trusts (the map signatures still hold).
    pub insecure: bool,
}

impl Security {
    pub fn pinned(pin: Option<KeyPin>) -> Self {
        Self {
            trust: ServerTrust::new(pin),
            insecure: false,
        }
    }
}

/// Whether `host` (a URL's host, IPv6 in brackets) is a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn endpoint(url: &str) -> Result<Endpoint, BadUrl> {
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
    match endpoint.uri().scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad("expected http:// or https://".into())),
    }
    if endpoint.uri().host().is_none() {
        return Err(bad("no host".into()));
    }
    Ok(endpoint)
}

/// A lazily connected channel to the control server at `url`: it
/// reconnects by itself when the server comes back after a restart.
/// `https://` is TLS with the server key pinned in `security`; `http://`
/// is plaintext, refused to anything but loopback unless `insecure`.
pub fn channel(url: &str, security: &Security) -> Result<Channel, BadUrl> {
    let endpoint = endpoint(url)?;
    let host = endpoint.uri().host().unwrap_or_default().to_string();
    if endpoint.uri().scheme_str() == Some("http") {
        if !security.insecure && !is_loopback_host(&host) {
            return Err(BadUrl {
                url: url.to_string(),
                reason: format!(
                    "plaintext (http://) to {host}, which is not a loopback address: use https:// \
                     (the join token pins the server's key), or --insecure on a network you trust"
                ),
            });
        }
        return Ok(endpoint.connect_with_connector_lazy(tower::service_fn(connect_plain)));
    }
    if security.trust.pin().is_none() {
        return Err(BadUrl {
            url: url.to_string(),
            reason: "https:// needs the server key's fingerprint, which a join token carries \
                     (pmj_…_FINGERPRINT)"
                .into(),
        });
    }
    let config = tls::client_config(Arc::new(KeyVerifier::pinned(security.trust.clone())));
    Ok(endpoint.connect_with_connector_lazy(tls_connector(Arc::new(config))))
}

/// The server's key and rotations, over a connection that accepts any key
/// the server proves to hold (the answer authenticates itself: see
/// [`ServerTrust::accept`]). Also returns the key the TLS handshake
/// presented (`None` over plaintext), which must be the answer's key.
pub async fn fetch_identity(url: &str) -> Result<(ServerIdentity, Option<KeyPin>), tonic::Status> {
    let endpoint = endpoint(url).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let (channel, seen) = if endpoint.uri().scheme_str() == Some("https") {
        let verifier = Arc::new(KeyVerifier::observing());
        let config = tls::client_config(verifier.clone());
        let channel = endpoint
            .connect_with_connector(tls_connector(Arc::new(config)))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
        (channel, Some(verifier))
    } else {
        let channel = endpoint
            .connect_with_connector(tower::service_fn(connect_plain))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
        (channel, None)
    };
    let identity = NodeControlClient::new(channel)
        .get_server_identity(GetServerIdentityRequest {})
        .await?
        .into_inner();
    let seen = seen.and_then(|v| v.seen());
    Ok((identity, seen))
}

/// A failed call explained: when the TLS handshake met a key other than
/// the pinned one, either the server rotated its key (then the pin in
/// `trust` follows the signed rotation and the call may be retried:
/// UNAVAILABLE) or this is not the server the token was for:
/// FAILED_PRECONDITION, naming both keys. Other failures pass unchanged.
pub async fn explain(
    url: &str,
    trust: &ServerTrust,
    server_id: &str,
    s: tonic::Status,
) -> tonic::Status {
    if s.code() != tonic::Code::Unavailable && s.code() != tonic::Code::Unknown {
        return s;
    }
    let (Some(presented), Some(pinned)) = (trust.take_mismatch(), trust.pin()) else {
        return s;
    };
    let mismatch = tonic::Status::failed_precondition(
        crate::tls::TrustError::Mismatch { pinned, presented }.to_string(),
    );
    match fetch_identity(url).await {
        Ok((identity, seen))
            if seen == Some(presented) && KeyPin::of_spki(&identity.key) == presented =>
        {
            let server_id = if server_id.is_empty() {
                identity.server_id.as_str()
            } else {
                server_id
            };
            match trust.accept(server_id, Some(&identity)) {
                Ok(_) => {
                    tonic::Status::unavailable("the control server's key was rotated; retrying")
                }
                Err(e) => tonic::Status::failed_precondition(e.to_string()),
            }
        }
        _ => mismatch,
    }
}

fn host_port(uri: &Uri, default_port: u16) -> std::io::Result<(String, u16)> {
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::other("URL without a host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, uri.port_u16().unwrap_or(default_port)))
}

async fn tcp(uri: &Uri, default_port: u16) -> std::io::Result<(TcpStream, String)> {
    let (host, port) = host_port(uri, default_port)?;
    let stream = TcpStream::connect((host.as_str(), port)).await?;
    // Small requests and stream updates must not wait for delayed ACKs.
    stream.set_nodelay(true)?;
    Ok((stream, host))
}

async fn connect_plain(uri: Uri) -> std::io::Result<TokioIo<TcpStream>> {
    Ok(TokioIo::new(tcp(&uri, 80).await?.0))
}

type TlsIo = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

fn tls_connector(
    config: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    Uri,
    Response = TlsIo,
    Error = std::io::Error,
    Future = impl std::future::Future<Output = std::io::Result<TlsIo>> + Send,
> + Clone
       + Send
       + 'static {
    let connector = tokio_rustls::TlsConnector::from(config);
    tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        async move {
            let (stream, host) = tcp(&uri, 443).await?;
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            Ok(TokioIo::new(connector.connect(name, stream).await?))
        }
    })
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

    #[tokio::test]
    async fn urls_must_be_http() {
        let s = Security::default();
        assert!(channel("ftp://example.invalid", &s).is_err());
        assert!(channel("not a url", &s).is_err());
    }

    #[tokio::test]
    async fn lazy_channels_need_no_server() {
        assert!(channel("http://127.0.0.1:1", &Security::default()).is_ok());
        assert!(channel("http://[::1]:1", &Security::default()).is_ok());
        assert!(channel("http://localhost:1", &Security::default()).is_ok());
    }

    #[tokio::test]
    async fn plaintext_is_for_loopback_or_insecure() {
        let err = channel("http://192.0.2.1:7443", &Security::default()).unwrap_err();
        assert!(err.reason.contains("not a loopback address"), "{err}");
        let insecure = Security {
            insecure: true,
            ..Security::default()
        };
        assert!(channel("http://192.0.2.1:7443", &insecure).is_ok());
        let err = channel("https://192.0.2.1:7443", &Security::default()).unwrap_err();
        assert!(err.reason.contains("fingerprint"), "{err}");
        let pinned = Security::pinned(Some(KeyPin::of_spki(b"k")));
        assert!(channel("https://192.0.2.1:7443", &pinned).is_ok());
    }

    #[test]
    fn timestamps_only_go_up() {
        let far = now_ms() + 60_000;
        assert_eq!(next_timestamp(far), far + 1);
        assert!(next_timestamp(0) >= now_ms() - 1000);
    }
}
