//! The peermesh origin (hosting) server: serves a content directory over HTTP/1.1.
//!
//! [`router`] builds the whole HTTP surface:
//!
//! - `GET /healthz` answers `200 ok`.
//! - Every other path is a file under the content directory, served by tower-http's
//!   [`ServeDir`]: `GET`/`HEAD`, single byte ranges (`Range` → `206`), `Last-Modified` with
//!   `If-Modified-Since`/`If-Unmodified-Since`, and a strong `ETag` derived from the file's size
//!   and nanosecond mtime with `If-None-Match` (→ `304`) and `If-Match` (→ `412`). Paths that
//!   would leave the directory (`..`, absolute or drive-prefixed components, also
//!   percent-encoded) are refused with `404` without touching the file system.
//! - [`IfRangeLayer`] adds what `ServeDir` leaves out: `If-Range`, so a client resuming a
//!   download with a stale validator gets the whole new file instead of a range spliced from a
//!   different version of it.
//!
//! Note that `ServeDir` follows symbolic links, so a link inside the content directory that
//! points outside it is served: do not put such links there.

pub mod content;
pub mod session;

use std::future::{poll_fn, Future};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use axum::routing::get;
use axum::Router;
use tower::{Layer, Service};
use tower_http::services::ServeDir;
use tower_http::trace::TraceLayer;

/// The path of the liveness probe.
pub const HEALTHZ_PATH: &str = "/healthz";

/// The server's routes: [`HEALTHZ_PATH`], and the files under `content_dir` for everything else.
pub fn router(content_dir: PathBuf) -> Router {
    let files = IfRangeLayer.layer(ServeDir::new(content_dir));
    Router::new()
        .route(HEALTHZ_PATH, get(healthz))
        .fallback_service(files)
        .layer(TraceLayer::new_for_http())
}

async fn healthz() -> &'static str {
    "ok"
}

/// Adds `If-Range` (RFC 9110 §13.1.5) to a file service that already answers range requests
/// and sets `ETag`/`Last-Modified`, such as [`ServeDir`].
///
/// A request with both `Range` and `If-Range` is passed on unchanged. If the inner service
/// answers `206 Partial Content` but the `If-Range` validator does not match that response's
/// representation, the partial response is dropped and the request is repeated without
/// `Range`, so the client gets the full current representation (`200`). Because the check uses
/// the validators of the very response that carries the bytes, a file replaced between the
/// client's requests can never yield a range of the new file under the old validator.
///
/// Matching follows the RFC: an entity tag matches only by strong comparison (a weak tag never
/// matches), and a date matches only when it is byte-for-byte the response's `Last-Modified`.
/// Anything else, including a response without the validator asked about, does not match.
#[derive(Clone, Copy, Debug, Default)]
pub struct IfRangeLayer;

impl<S> Layer<S> for IfRangeLayer {
    type Service = IfRange<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IfRange { inner }
    }
}

/// The service made by [`IfRangeLayer`].
#[derive(Clone, Debug)]
pub struct IfRange<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ResBody> Service<Request<Body>> for IfRange<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let validator = match req.headers().get(header::IF_RANGE) {
            Some(v) if req.headers().contains_key(header::RANGE) => v.clone(),
            _ => return Box::pin(self.inner.call(req)),
        };
        // The request without its range, in case the validator turns out stale. Files are
        // served from the method, URI and headers alone; the body of a GET is not read.
        let mut whole = Request::builder()
            .method(req.method().clone())
            .uri(req.uri().clone())
            .version(req.version())
            .body(Body::empty())
            .expect("parts copied from a valid request");
        *whole.headers_mut() = without_range(req.headers());

        // `self.inner` is the clone that was driven ready; keep it for this call and leave a
        // fresh clone behind (tower's usual pattern for services used from a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let res = inner.call(req).await?;
            if res.status() != StatusCode::PARTIAL_CONTENT
                || if_range_matches(&validator, res.headers())
            {
                return Ok(res);
            }
            drop(res);
            poll_fn(|cx| inner.poll_ready(cx)).await?;
            inner.call(whole).await
        })
    }
}

fn without_range(headers: &HeaderMap) -> HeaderMap {
    let mut headers = headers.clone();
    headers.remove(header::RANGE);
    headers.remove(header::IF_RANGE);
    headers
}

/// Whether an `If-Range` validator matches a response's representation.
fn if_range_matches(validator: &HeaderValue, response: &HeaderMap) -> bool {
    let v = validator.as_bytes();
    if v.starts_with(b"W/") {
        // A weak tag can never pass a strong comparison.
        false
    } else if v.starts_with(b"\"") {
        response
            .get(header::ETAG)
            .is_some_and(|etag| !etag.as_bytes().starts_with(b"W/") && etag.as_bytes() == v)
    } else {
        response
            .get(header::LAST_MODIFIED)
            .is_some_and(|lm| lm.as_bytes() == v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn if_range_etag_needs_strong_equality() {
        let res = headers(&[(header::ETAG, "\"a-b\"")]);
        assert!(if_range_matches(&HeaderValue::from_static("\"a-b\""), &res));
        assert!(!if_range_matches(
            &HeaderValue::from_static("\"a-c\""),
            &res
        ));
        assert!(!if_range_matches(
            &HeaderValue::from_static("W/\"a-b\""),
            &res
        ));
        let weak = headers(&[(header::ETAG, "W/\"a-b\"")]);
        assert!(!if_range_matches(
            &HeaderValue::from_static("\"a-b\""),
            &weak
        ));
        assert!(!if_range_matches(
            &HeaderValue::from_static("\"a-b\""),
            &HeaderMap::new()
        ));
    }

    #[test]
    fn if_range_date_needs_exact_last_modified() {
        let res = headers(&[(header::LAST_MODIFIED, "Tue, 01 Jul 2025 10:00:00 GMT")]);
        assert!(if_range_matches(
            &HeaderValue::from_static("Tue, 01 Jul 2025 10:00:00 GMT"),
            &res
        ));
        assert!(!if_range_matches(
            &HeaderValue::from_static("Tue, 01 Jul 2025 10:00:01 GMT"),
            &res
        ));
        assert!(!if_range_matches(
            &HeaderValue::from_static("Tue, 01 Jul 2025 10:00:00 GMT"),
            &HeaderMap::new()
        ));
    }
}
