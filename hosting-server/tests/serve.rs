//! The hosting server's HTTP surface, in process: a real listener on 127.0.0.1, `axum::serve`,
//! and a plain hyper HTTP/1.1 client that sends each request target exactly as written.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deterministic, non-repeating-looking test content.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

const SECRET: &[u8] = b"TOP-SECRET-outside-the-content-dir";

struct Server {
    addr: SocketAddr,
    /// `root/` holds `secret.txt`; `root/content/` is what is served.
    root: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start() -> Server {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("secret.txt"), SECRET).unwrap();
        let content = root.path().join("content");
        std::fs::create_dir_all(content.join("sub")).unwrap();
        std::fs::write(content.join("data.bin"), pattern(4096)).unwrap();
        std::fs::write(content.join("sub/nested.txt"), b"nested file\n").unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = peermesh_hosting_server::router(content);
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
        });
        Server {
            addr,
            root,
            shutdown: Some(tx),
            task,
        }
    }

    fn content(&self) -> std::path::PathBuf {
        self.root.path().join("content")
    }

    async fn stop(mut self) {
        self.shutdown.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops after graceful shutdown")
            .unwrap()
            .unwrap();
    }

    /// Sends one request on a fresh connection; returns the response with its whole body.
    async fn request(
        &self,
        method: Method,
        target: &str,
        headers: &[(header::HeaderName, &str)],
    ) -> Response {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, self.addr.to_string());
        for (name, value) in headers {
            req = req.header(name, *value);
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .expect("response in time")
            .unwrap();
        let (parts, body) = res.into_parts();
        let body = body.collect().await.unwrap().to_bytes().to_vec();
        Response {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    async fn get(&self, target: &str) -> Response {
        self.request(Method::GET, target, &[]).await
    }
}

#[derive(Debug)]
struct Response {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

#[tokio::test]
async fn healthz_is_ok() {
    let server = Server::start().await;
    let res = server.get("/healthz").await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body, b"ok");
    server.stop().await;
}

#[tokio::test]
async fn full_get_returns_the_file_bytes() {
    let server = Server::start().await;
    let res = server.get("/data.bin").await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body, pattern(4096));
    assert_eq!(res.header(header::CONTENT_LENGTH), Some("4096"));
    assert_eq!(res.header(header::ACCEPT_RANGES), Some("bytes"));
    assert!(res.header(header::LAST_MODIFIED).is_some());

    let res = server.get("/sub/nested.txt").await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body, b"nested file\n");
    assert!(res
        .header(header::CONTENT_TYPE)
        .unwrap()
        .starts_with("text/plain"));

    let head = server.request(Method::HEAD, "/data.bin", &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header(header::CONTENT_LENGTH), Some("4096"));
    assert!(head.body.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn range_request_returns_exactly_those_bytes() {
    let server = Server::start().await;
    let res = server
        .request(Method::GET, "/data.bin", &[(header::RANGE, "bytes=10-19")])
        .await;
    assert_eq!(res.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(res.body, &pattern(4096)[10..20]);
    assert_eq!(res.header(header::CONTENT_RANGE), Some("bytes 10-19/4096"));
    assert_eq!(res.header(header::CONTENT_LENGTH), Some("10"));

    // A suffix range, and one past the end.
    let res = server
        .request(Method::GET, "/data.bin", &[(header::RANGE, "bytes=-5")])
        .await;
    assert_eq!(res.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(res.body, &pattern(4096)[4091..]);
    let res = server
        .request(
            Method::GET,
            "/data.bin",
            &[(header::RANGE, "bytes=5000-6000")],
        )
        .await;
    assert_eq!(res.status, StatusCode::RANGE_NOT_SATISFIABLE);
    server.stop().await;
}

#[tokio::test]
async fn strong_etag_and_if_none_match_gives_304() {
    let server = Server::start().await;
    let res = server.get("/data.bin").await;
    let etag = res.header(header::ETAG).expect("ETag header").to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2,
        "a strong entity tag: {etag}"
    );
    // Stable across requests; the same on a range response.
    assert_eq!(
        server.get("/data.bin").await.header(header::ETAG),
        Some(&*etag)
    );
    let range = server
        .request(Method::GET, "/data.bin", &[(header::RANGE, "bytes=0-0")])
        .await;
    assert_eq!(range.header(header::ETAG), Some(&*etag));

    let res = server
        .request(Method::GET, "/data.bin", &[(header::IF_NONE_MATCH, &etag)])
        .await;
    assert_eq!(res.status, StatusCode::NOT_MODIFIED);
    assert!(res.body.is_empty());
    assert_eq!(res.header(header::ETAG), Some(&*etag));

    // In a list, weakly compared, and the wildcard.
    let list = format!("\"nope\", W/{etag}");
    let res = server
        .request(Method::GET, "/data.bin", &[(header::IF_NONE_MATCH, &list)])
        .await;
    assert_eq!(res.status, StatusCode::NOT_MODIFIED);
    let res = server
        .request(Method::GET, "/data.bin", &[(header::IF_NONE_MATCH, "*")])
        .await;
    assert_eq!(res.status, StatusCode::NOT_MODIFIED);

    // A stale tag gets the file, even with an If-Modified-Since that alone would give 304:
    // If-None-Match takes precedence.
    let last_modified = res.header(header::LAST_MODIFIED).map(str::to_string);
    let mut headers = vec![(header::IF_NONE_MATCH, "\"stale\"")];
    if let Some(lm) = &last_modified {
        headers.push((header::IF_MODIFIED_SINCE, lm));
    }
    let res = server.request(Method::GET, "/data.bin", &headers).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body, pattern(4096));
    server.stop().await;
}

#[tokio::test]
async fn if_modified_since_gives_304() {
    let server = Server::start().await;
    let res = server.get("/data.bin").await;
    let lm = res.header(header::LAST_MODIFIED).unwrap().to_string();
    let res = server
        .request(
            Method::GET,
            "/data.bin",
            &[(header::IF_MODIFIED_SINCE, &lm)],
        )
        .await;
    assert_eq!(res.status, StatusCode::NOT_MODIFIED);
    assert!(res.body.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn etag_changes_when_the_file_changes() {
    let server = Server::start().await;
    let path = server.content().join("data.bin");
    let old = server.get("/data.bin").await;
    let old_etag = old.header(header::ETAG).unwrap().to_string();

    // Same size, different bytes and a different mtime.
    let mut new = pattern(4096);
    new.reverse();
    std::fs::write(&path, &new).unwrap();
    set_mtime(&path, SystemTime::now() + Duration::from_secs(5));

    let res = server
        .request(
            Method::GET,
            "/data.bin",
            &[(header::IF_NONE_MATCH, &old_etag)],
        )
        .await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body, new);
    assert_ne!(res.header(header::ETAG), Some(&*old_etag));
    server.stop().await;
}

#[tokio::test]
async fn if_range_serves_the_range_only_for_the_current_version() {
    let server = Server::start().await;
    let path = server.content().join("data.bin");
    let first = server.get("/data.bin").await;
    let etag = first.header(header::ETAG).unwrap().to_string();
    let lm = first.header(header::LAST_MODIFIED).unwrap().to_string();

    // Validators that match: the range.
    for validator in [&etag, &lm] {
        let res = server
            .request(
                Method::GET,
                "/data.bin",
                &[
                    (header::RANGE, "bytes=10-19"),
                    (header::IF_RANGE, validator),
                ],
            )
            .await;
        assert_eq!(
            res.status,
            StatusCode::PARTIAL_CONTENT,
            "If-Range: {validator}"
        );
        assert_eq!(res.body, &pattern(4096)[10..20]);
    }
    // A weak tag never matches: the whole file.
    let weak = format!("W/{etag}");
    let res = server
        .request(
            Method::GET,
            "/data.bin",
            &[(header::RANGE, "bytes=10-19"), (header::IF_RANGE, &weak)],
        )
        .await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body, pattern(4096));

    // The file is replaced: the old validators get the whole new file, not a piece of it.
    let new: Vec<u8> = pattern(5000).into_iter().rev().collect();
    std::fs::write(&path, &new).unwrap();
    set_mtime(&path, SystemTime::now() + Duration::from_secs(5));
    for validator in [&etag, &lm] {
        let res = server
            .request(
                Method::GET,
                "/data.bin",
                &[
                    (header::RANGE, "bytes=10-19"),
                    (header::IF_RANGE, validator),
                ],
            )
            .await;
        assert_eq!(res.status, StatusCode::OK, "If-Range: {validator}");
        assert_eq!(res.body, new);
        assert_eq!(res.header(header::CONTENT_LENGTH), Some("5000"));
        assert!(res.header(header::CONTENT_RANGE).is_none());
        assert_ne!(res.header(header::ETAG), Some(&*etag));
    }
    server.stop().await;
}

fn set_mtime(path: &Path, when: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(when)
        .unwrap();
}

#[tokio::test]
async fn missing_file_is_404() {
    let server = Server::start().await;
    for target in ["/nope.txt", "/sub/nope.txt", "/nope/deeper.bin"] {
        let res = server.get(target).await;
        assert_eq!(res.status, StatusCode::NOT_FOUND, "{target}");
    }
    server.stop().await;
}

#[tokio::test]
async fn path_traversal_is_refused() {
    let server = Server::start().await;
    // The secret is reachable by these paths relative to the content directory.
    assert!(server.content().join("../secret.txt").exists());
    let targets = [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/..%2fsecret.txt",
        "/..%2Fsecret.txt",
        "/sub/..%2f..%2fsecret.txt",
        "/%2e%2e%2fsecret.txt",
        "/..%5csecret.txt",
    ];
    for target in targets {
        let res = server.get(target).await;
        assert!(
            res.status == StatusCode::NOT_FOUND || res.status == StatusCode::BAD_REQUEST,
            "{target}: {}",
            res.status
        );
        assert!(!contains(&res.body, SECRET), "{target} leaked the secret");
    }
    // An absolute path of the secret inside the request path.
    let absolute = format!("/{}", server.root.path().join("secret.txt").display());
    let res = server.get(&absolute).await;
    assert_eq!(res.status, StatusCode::NOT_FOUND, "{absolute}");
    assert!(!contains(&res.body, SECRET));

    // The same requests as raw bytes on the wire, so no client library can normalise them.
    for target in targets {
        let raw = raw_get(server.addr, target).await;
        let status_line = raw.split(|&b| b == b'\r').next().unwrap();
        let status_line = String::from_utf8_lossy(status_line);
        assert!(
            status_line.starts_with("HTTP/1.1 404") || status_line.starts_with("HTTP/1.1 400"),
            "{target}: {status_line}"
        );
        assert!(!contains(&raw, SECRET), "{target} leaked the secret");
    }
    server.stop().await;
}

async fn raw_get(addr: SocketAddr, target: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("server closes the connection")
        .unwrap();
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn only_get_and_head_are_served() {
    let server = Server::start().await;
    let res = server.request(Method::POST, "/data.bin", &[]).await;
    assert_eq!(res.status, StatusCode::METHOD_NOT_ALLOWED);
    let res = server.request(Method::DELETE, "/data.bin", &[]).await;
    assert_eq!(res.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(server.content().join("data.bin").exists());
    server.stop().await;
}
