//! HTTP/1.1 client of the origin (hosting server): manifests and chunks. Plain `http://`
//! only (no TLS in this build).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::manifest::{Hash32, MAX_CHUNK_LEN};
use crate::ContentError;

/// Longest manifest accepted (MAX_CHUNKS hashes in hex and then some).
const MAX_MANIFEST: usize = 64 << 20;
/// One request, connection included: a chunk (at most 4 MiB) or a manifest
/// even over a slow uplink, yet short enough that a hung origin costs a
/// retry rather than the fetch (the scheduler tries a chunk
/// [`crate::scheduler::ORIGIN_ATTEMPTS`] times).
const TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to the origin: a reachable server answers in well under a
/// second; an unreachable one fails fast enough to leave most of
/// [`TIMEOUT`] for a retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept for the next chunk request: a fetch asks every few
/// hundred milliseconds, so a kept connection saves a handshake per chunk;
/// after this long without a request the fetch is over.
const POOL_IDLE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Origin {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Origin {
    /// `url` like `http://127.0.0.1:8080` (a trailing slash is fine).
    pub fn new(url: &str) -> Result<Self, ContentError> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") || base.parse::<hyper::Uri>().is_err() {
            return Err(ContentError::Origin(format!(
                "origin URL {url:?} is not an http:// URL"
            )));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(Self { base, client })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    async fn get(&self, path: &str, limit: usize) -> Result<Bytes, ContentError> {
        let url = format!("{}{path}", self.base);
        let err = |what: String| ContentError::Origin(format!("GET {url}: {what}"));
        let uri: hyper::Uri = url.parse().map_err(|e| err(format!("{e}")))?;
        let fut = async {
            let res = self
                .client
                .get(uri)
                .await
                .map_err(|e| err(format!("{e}")))?;
            if !res.status().is_success() {
                return Err(err(format!("status {}", res.status())));
            }
            let body = Limited::new(res.into_body(), limit)
                .collect()
                .await
                .map_err(|e| err(format!("body: {e}")))?;
            Ok(body.to_bytes())
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .map_err(|_| err("timed out".into()))?
    }

    pub async fn manifest(&self, id: &Hash32) -> Result<Bytes, ContentError> {
        self.get(
            &format!("/content/{}/manifest", hex::encode(id)),
            MAX_MANIFEST,
        )
        .await
    }

    pub async fn chunk(&self, hash: &Hash32) -> Result<Bytes, ContentError> {
        self.get(
            &format!("/chunks/{}", hex::encode(hash)),
            MAX_CHUNK_LEN as usize,
        )
        .await
    }
}
