//! Content published as manifests of content-addressed chunks.
//!
//! At start the server scans `--content DIR` (regular files, recursively; symbolic links are
//! skipped so that nothing outside the directory is published) and cuts every file into
//! [`CHUNK_SIZE`] chunks hashed with BLAKE3. A file's [`Manifest`] lists its size, its whole-file
//! hash and its chunks' hashes in order; the **content id** is the BLAKE3 hash of the manifest's
//! exact JSON bytes, so whoever holds an id can check any manifest they are handed, and through
//! it every chunk, without trusting who handed it over (the origin or a peer).
//!
//! Routes (added next to the static file routes of [`crate::router`]):
//!
//! - `GET /content`: the published items, `[{"id","name","size","chunks"}]`.
//! - `GET /content/{id}/manifest`: the manifest's exact bytes (`application/json`).
//! - `GET /chunks/{hash}`: a chunk by its BLAKE3 hash (64 hex digits). Strong `ETag` = the
//!   hash, `Cache-Control: public, max-age=31536000, immutable` (a chunk never changes under
//!   its name), `If-None-Match` (→ `304`), single byte ranges (`Range: bytes=a-b`, `a-`, `-n`
//!   → `206`; unsatisfiable → `416`; several ranges → the whole chunk, which RFC 9110 allows)
//!   and `If-Range` (a range only when the validator is this chunk's ETag).
//! - `GET /stats`: what the origin has served ([`StatsSnapshot`]), so that a test or an
//!   operator can see how much of a distribution the origin carried.
//!
//! The manifest format (and the chunk size, [`CHUNK_SIZE`]) is `peermesh_content::manifest`,
//! shared with the nodes that check what this server publishes. Chunk files are read on
//! demand; a file changed after the scan serves bytes that no longer match their hash, which
//! every client detects (restart the server to republish).

use std::collections::{BTreeMap, HashMap};
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

pub use peermesh_content::manifest::{
    parse_hash, Hash32, Manifest, Published, CHUNK_SIZE, MANIFEST_VERSION,
};

/// Why the content directory could not be published.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Clone, Debug)]
struct ChunkLoc {
    path: PathBuf,
    offset: u64,
    len: u64,
}

/// Counters of what the origin served.
#[derive(Debug, Default)]
pub struct Stats {
    chunk_requests: AtomicU64,
    chunk_bytes: AtomicU64,
    chunks_not_modified: AtomicU64,
    manifest_requests: AtomicU64,
    manifest_bytes: AtomicU64,
}

/// `GET /stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub chunk_requests: u64,
    /// Body bytes of chunk responses (full and partial); HEAD and 304 count nothing.
    pub chunk_bytes: u64,
    pub chunks_not_modified: u64,
    pub manifest_requests: u64,
    pub manifest_bytes: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            chunk_requests: self.chunk_requests.load(Ordering::Relaxed),
            chunk_bytes: self.chunk_bytes.load(Ordering::Relaxed),
            chunks_not_modified: self.chunks_not_modified.load(Ordering::Relaxed),
            manifest_requests: self.manifest_requests.load(Ordering::Relaxed),
            manifest_bytes: self.manifest_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The published content of a directory.
#[derive(Debug, Default)]
pub struct ContentIndex {
    /// By content id (hex).
    items: BTreeMap<String, Published>,
    chunks: HashMap<Hash32, ChunkLoc>,
    pub stats: Stats,
}

impl ContentIndex {
    /// Scans and hashes every regular file under `dir`. Blocking (reads every byte): run it
    /// on a blocking thread.
    pub fn scan(dir: &Path) -> Result<Self, ContentError> {
        let mut files = Vec::new();
        walk(dir, dir, &mut files)?;
        files.sort();
        let mut index = Self::default();
        for (name, path) in files {
            let file = std::fs::File::open(&path).map_err(io(&path))?;
            let manifest = Manifest::from_reader(name, file).map_err(io(&path))?;
            for (i, hash) in manifest.chunks.iter().enumerate() {
                let i = i as u32;
                index.chunks.entry(*hash).or_insert_with(|| ChunkLoc {
                    path: path.clone(),
                    offset: manifest.chunk_offset(i),
                    len: u64::from(manifest.chunk_len(i)),
                });
            }
            let item = Published::new(manifest);
            let id = item.id_hex();
            tracing::info!(%id, name = %item.name, size = item.size,
                           chunks = item.chunks.len(), "published");
            index.items.insert(id, item);
        }
        Ok(index)
    }

    pub fn items(&self) -> impl Iterator<Item = &Published> {
        self.items.values()
    }

    /// The item whose content id is `id` (64 lowercase hex digits).
    pub fn get(&self, id: &str) -> Option<&Published> {
        self.items.get(id)
    }

    /// The item published from the file `name` (path under the content directory).
    pub fn by_name(&self, name: &str) -> Option<&Published> {
        self.items.values().find(|i| i.name == name)
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), ContentError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(io(&path))?;
        if ty.is_dir() {
            walk(root, &path, out)?;
        } else if ty.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push((name, path));
        }
        // Symbolic links and special files are not published.
    }
    Ok(())
}

/// The content routes over a scanned index.
pub fn routes(index: Arc<ContentIndex>) -> Router {
    Router::new()
        .route("/content", get(list))
        .route("/content/{id}/manifest", get(manifest))
        .route("/chunks/{hash}", get(chunk))
        .route("/stats", get(stats))
        .with_state(index)
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .expect("valid response")
}

fn status_only(status: StatusCode) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::empty())
        .expect("valid response")
}

#[derive(Serialize)]
struct Listed<'a> {
    id: String,
    name: &'a str,
    size: u64,
    chunks: usize,
}

async fn list(State(index): State<Arc<ContentIndex>>) -> Response<Body> {
    let listed: Vec<Listed> = index
        .items()
        .map(|i| Listed {
            id: i.id_hex(),
            name: &i.name,
            size: i.size,
            chunks: i.chunks.len(),
        })
        .collect();
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&listed).expect("serializes"),
    )
}

async fn stats(State(index): State<Arc<ContentIndex>>) -> Response<Body> {
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&index.stats.snapshot()).expect("serializes"),
    )
}

async fn manifest(
    State(index): State<Arc<ContentIndex>>,
    method: Method,
    UrlPath(id): UrlPath<String>,
) -> Response<Body> {
    let Some(item) = index.get(&id) else {
        return status_only(StatusCode::NOT_FOUND);
    };
    index
        .stats
        .manifest_requests
        .fetch_add(1, Ordering::Relaxed);
    if method != Method::HEAD {
        index
            .stats
            .manifest_bytes
            .fetch_add(item.json().len() as u64, Ordering::Relaxed);
    }
    let mut res = json_response(StatusCode::OK, item.json().clone());
    set_immutable(res.headers_mut(), &id);
    res
}

fn set_immutable(h: &mut HeaderMap, tag: &str) {
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{tag}\"")).expect("hex is a valid header"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
}

/// One satisfiable byte range of a representation of `len` bytes, as `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No range header, or one this server answers with the whole body (several ranges,
    /// another unit, a malformed header: RFC 9110 lets a server ignore `Range`).
    Whole,
    Partial {
        start: u64,
        end: u64,
    },
    /// Well formed but outside the representation: `416`.
    Unsatisfiable,
}

/// Interprets a `Range` header value for a body of `len` bytes.
pub fn parse_range(value: &[u8], len: u64) -> RangeAnswer {
    let Ok(s) = std::str::from_utf8(value) else {
        return RangeAnswer::Whole;
    };
    let Some(spec) = s.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Whole;
    };
    if spec.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit());
    match (a.is_empty(), b.is_empty()) {
        (true, true) => RangeAnswer::Whole,
        // Suffix: the last n bytes.
        (true, false) => {
            let Some(n) = digits(b).then(|| b.parse::<u64>().ok()).flatten() else {
                return RangeAnswer::Whole;
            };
            if n == 0 || len == 0 {
                return RangeAnswer::Unsatisfiable;
            }
            RangeAnswer::Partial {
                start: len - n.min(len),
                end: len,
            }
        }
        (false, _) => {
            let Some(start) = digits(a).then(|| a.parse::<u64>().ok()).flatten() else {
                return RangeAnswer::Whole;
            };
            let last = if b.is_empty() {
                u64::MAX
            } else {
                match digits(b).then(|| b.parse::<u64>().ok()).flatten() {
                    Some(l) if l >= start => l,
                    _ => return RangeAnswer::Whole,
                }
            };
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            RangeAnswer::Partial {
                start,
                end: last.saturating_add(1).min(len),
            }
        }
    }
}

async fn chunk(
    State(index): State<Arc<ContentIndex>>,
    method: Method,
    headers: HeaderMap,
    UrlPath(hash): UrlPath<String>,
) -> Response<Body> {
    let Some(key) = parse_hash(&hash) else {
        return status_only(StatusCode::BAD_REQUEST);
    };
    let Some(loc) = index.chunks.get(&key).cloned() else {
        return status_only(StatusCode::NOT_FOUND);
    };
    index.stats.chunk_requests.fetch_add(1, Ordering::Relaxed);
    let hex = hex::encode(key);
    let etag = format!("\"{hex}\"");
    let tag_matches = |v: &HeaderValue| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(&etag))
        })
    };
    if headers.get(header::IF_NONE_MATCH).is_some_and(tag_matches) {
        index
            .stats
            .chunks_not_modified
            .fetch_add(1, Ordering::Relaxed);
        let mut res = status_only(StatusCode::NOT_MODIFIED);
        set_immutable(res.headers_mut(), &hex);
        return res;
    }
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == etag.as_bytes());
    let range = match headers.get(header::RANGE) {
        Some(r) if if_range_ok => parse_range(r.as_bytes(), loc.len),
        _ => RangeAnswer::Whole,
    };
    let (status, start, end) = match range {
        RangeAnswer::Whole => (StatusCode::OK, 0, loc.len),
        RangeAnswer::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
        RangeAnswer::Unsatisfiable => {
            let mut res = status_only(StatusCode::RANGE_NOT_SATISFIABLE);
            res.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{}", loc.len)).expect("valid"),
            );
            return res;
        }
    };
    let body = if method == Method::HEAD {
        Vec::new()
    } else {
        match read_at(&loc.path, loc.offset + start, end - start).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(path = %loc.path.display(), error = %e, "reading a chunk");
                return status_only(StatusCode::INTERNAL_SERVER_ERROR);
            }
        }
    };
    index
        .stats
        .chunk_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let mut res = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, end - start)
        .body(Body::from(body))
        .expect("valid response");
    set_immutable(res.headers_mut(), &hex);
    if status == StatusCode::PARTIAL_CONTENT {
        res.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{}", end - 1, loc.len))
                .expect("valid"),
        );
    }
    res
}

async fn read_at(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(SeekFrom::Start(offset)).await?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges() {
        use RangeAnswer::*;
        assert_eq!(
            parse_range(b"bytes=0-9", 100),
            Partial { start: 0, end: 10 }
        );
        assert_eq!(
            parse_range(b"bytes=90-", 100),
            Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            parse_range(b"bytes=90-500", 100),
            Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            parse_range(b"bytes=-10", 100),
            Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            parse_range(b"bytes=-500", 100),
            Partial { start: 0, end: 100 }
        );
        assert_eq!(parse_range(b"bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=5-4", 100), Whole);
        assert_eq!(parse_range(b"bytes=0-1,5-6", 100), Whole);
        assert_eq!(parse_range(b"items=0-1", 100), Whole);
        assert_eq!(parse_range(b"bytes=+1-2", 100), Whole);
        assert_eq!(parse_range(b"bytes=", 100), Whole);
    }

    proptest! {
        #[test]
        fn any_range_header_is_safe(v in proptest::collection::vec(any::<u8>(), 0..40),
                                    len in 0u64..1_000_000) {
            if let RangeAnswer::Partial { start, end } = parse_range(&v, len) {
                prop_assert!(start < end && end <= len);
            }
        }

        #[test]
        fn well_formed_ranges_are_honoured(a in 0u64..2000, n in 0u64..2000, len in 1u64..2000) {
            let v = format!("bytes={a}-{}", a + n);
            match parse_range(v.as_bytes(), len) {
                RangeAnswer::Partial { start, end } => {
                    prop_assert_eq!(start, a);
                    prop_assert_eq!(end, (a + n + 1).min(len));
                }
                RangeAnswer::Unsatisfiable => prop_assert!(a >= len),
                RangeAnswer::Whole => prop_assert!(false, "a well-formed range was ignored"),
            }
        }

        #[test]
        fn any_hash_text_is_safe(s in "\\PC{0,80}") {
            if let Some(h) = parse_hash(&s) {
                prop_assert_eq!(hex::encode(h), s.to_ascii_lowercase());
            }
        }
    }

    #[test]
    fn scan_chunks_and_ids() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 5))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.bin"), &data).unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        let idx = ContentIndex::scan(dir.path()).unwrap();
        let item = idx.by_name("sub/a.bin").unwrap();
        assert_eq!(item.size, data.len() as u64);
        assert_eq!(item.chunks.len(), 3);
        assert_eq!(item.file_hash, *blake3::hash(&data).as_bytes());
        assert_eq!(
            item.chunks[2],
            *blake3::hash(&data[2 * CHUNK_SIZE as usize..]).as_bytes()
        );
        assert_eq!(
            item.id_hex(),
            blake3::hash(item.json()).to_hex().to_string()
        );
        let parsed: Manifest = serde_json::from_slice(item.json()).unwrap();
        assert_eq!(&parsed, item.manifest());
        let empty = idx.by_name("empty").unwrap();
        assert!(empty.chunks.is_empty());
    }
}
