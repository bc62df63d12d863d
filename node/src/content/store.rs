//! The chunk cache under the node's state directory, and the manifests it has seen.
//!
//! Layout: `STATE/content/chunks/<first two hex digits>/<hash hex>` (one file per chunk,
//! written to a temporary name and renamed, so a crash never leaves a torn chunk under its
//! hash) and `STATE/content/manifests/<content id hex>.json` (the manifest's exact bytes). A
//! chunk file is only ever written after its bytes matched the hash; chunks are kept until the
//! directory is removed (there is no eviction yet).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;

use super::wire::{Hash32, MAX_CHUNKS, MAX_CHUNK_LEN};
use super::ContentError;

/// A manifest as the origin publishes it (see `hosting-server/src/content.rs`); the content
/// id is the BLAKE3 hash of its exact JSON bytes.
#[derive(Deserialize)]
struct ManifestJson {
    version: u32,
    name: String,
    size: u64,
    chunk_size: u64,
    hash: String,
    file_hash: String,
    chunks: Vec<String>,
}

/// A checked manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub id: Hash32,
    pub name: String,
    pub size: u64,
    pub chunk_size: u64,
    pub file_hash: Hash32,
    pub chunks: Vec<Hash32>,
    /// The exact bytes (their hash is `id`).
    pub json: Bytes,
}

pub fn parse_hex32(s: &str) -> Option<Hash32> {
    let mut out = [0u8; 32];
    (s.len() == 64).then_some(())?;
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

impl Manifest {
    /// Checks `json` against the content id `id` and the manifest rules: version 1, BLAKE3,
    /// a chunk size up to [`MAX_CHUNK_LEN`], exactly as many chunks as the size needs.
    pub fn parse(id: Hash32, json: Bytes) -> Result<Self, ContentError> {
        let bad = |why: &str| ContentError::BadManifest(why.to_string());
        if *blake3::hash(&json).as_bytes() != id {
            return Err(bad("its hash is not the content id"));
        }
        let m: ManifestJson =
            serde_json::from_slice(&json).map_err(|e| bad(&format!("not a manifest: {e}")))?;
        if m.version != 1 || m.hash != "blake3" {
            return Err(bad("unsupported version or hash"));
        }
        if m.chunk_size == 0 || m.chunk_size > u64::from(MAX_CHUNK_LEN) {
            return Err(bad("chunk size out of range"));
        }
        let n = m.size.div_ceil(m.chunk_size);
        if n != m.chunks.len() as u64 || n > u64::from(MAX_CHUNKS) {
            return Err(bad("chunk count does not match the size"));
        }
        let chunks = m
            .chunks
            .iter()
            .map(|c| parse_hex32(c))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("a chunk hash is not 64 hex digits"))?;
        Ok(Self {
            id,
            name: m.name,
            size: m.size,
            chunk_size: m.chunk_size,
            file_hash: parse_hex32(&m.file_hash).ok_or_else(|| bad("bad file hash"))?,
            chunks,
            json,
        })
    }

    pub fn count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Length of chunk `i`.
    pub fn chunk_len(&self, i: u32) -> u32 {
        let start = u64::from(i) * self.chunk_size;
        (self.size - start).min(self.chunk_size) as u32
    }
}

/// Where the cache lives, and which chunks it holds (kept in memory by the content actor;
/// the actor is the only writer).
pub struct Store {
    root: PathBuf,
    present: HashSet<Hash32>,
}

/// Paths of one cache (cheap to clone into tasks).
#[derive(Clone, Debug)]
pub struct StorePaths {
    root: PathBuf,
}

impl StorePaths {
    pub fn chunk(&self, h: &Hash32) -> PathBuf {
        let hx = hex::encode(h);
        self.root.join("chunks").join(&hx[..2]).join(hx)
    }

    pub fn manifest(&self, id: &Hash32) -> PathBuf {
        self.root
            .join("manifests")
            .join(format!("{}.json", hex::encode(id)))
    }

    /// Reads a chunk (`None` if it is not there).
    pub async fn read(&self, h: &Hash32) -> std::io::Result<Bytes> {
        tokio::fs::read(self.chunk(h)).await.map(Bytes::from)
    }

    /// Writes a chunk whose bytes were checked against `h`.
    pub async fn write(&self, h: &Hash32, data: &[u8]) -> std::io::Result<()> {
        let path = self.chunk(h);
        write_atomic(&path, data).await
    }

    pub async fn write_manifest(&self, m: &Manifest) -> std::io::Result<()> {
        write_atomic(&self.manifest(&m.id), &m.json).await
    }
}

async fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
    tokio::fs::write(&tmp, data).await?;
    tokio::fs::rename(&tmp, path).await
}

impl Store {
    /// Opens (creating) the cache under `state_dir` and lists what it holds, loading every
    /// manifest that still matches its id. Blocking: run at start-up on a blocking thread.
    pub fn open(state_dir: &Path) -> Result<(Self, Vec<Manifest>), ContentError> {
        let root = state_dir.join("content");
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e| ContentError::Io(p, e)
        };
        let chunks = root.join("chunks");
        let manifests = root.join("manifests");
        std::fs::create_dir_all(&chunks).map_err(io(&chunks))?;
        std::fs::create_dir_all(&manifests).map_err(io(&manifests))?;
        let mut present = HashSet::new();
        for sub in std::fs::read_dir(&chunks).map_err(io(&chunks))? {
            let sub = sub.map_err(io(&chunks))?.path();
            let Ok(files) = std::fs::read_dir(&sub) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name();
                if let Some(h) = name.to_str().and_then(parse_hex32) {
                    present.insert(h);
                }
            }
        }
        let mut loaded = Vec::new();
        for f in std::fs::read_dir(&manifests)
            .map_err(io(&manifests))?
            .flatten()
        {
            let path = f.path();
            let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(parse_hex32)
            else {
                continue;
            };
            let Ok(json) = std::fs::read(&path) else {
                continue;
            };
            match Manifest::parse(id, Bytes::from(json)) {
                Ok(m) => loaded.push(m),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring a cached manifest")
                }
            }
        }
        tracing::info!(chunks = present.len(), manifests = loaded.len(), dir = %root.display(), "content cache");
        Ok((Self { root, present }, loaded))
    }

    pub fn paths(&self) -> StorePaths {
        StorePaths {
            root: self.root.clone(),
        }
    }

    pub fn has(&self, h: &Hash32) -> bool {
        self.present.contains(h)
    }

    pub fn insert(&mut self, h: Hash32) {
        self.present.insert(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest_json(size: u64, chunk: u64, n: usize) -> Vec<u8> {
        let chunks: Vec<String> = (0..n).map(|i| hex::encode([i as u8; 32])).collect();
        serde_json::to_vec(&serde_json::json!({
            "version": 1, "name": "f", "size": size, "chunk_size": chunk,
            "hash": "blake3", "file_hash": hex::encode([9u8; 32]), "chunks": chunks,
        }))
        .unwrap()
    }

    #[test]
    fn manifests_are_checked() {
        let j = manifest_json(600, 256, 3);
        let id = *blake3::hash(&j).as_bytes();
        let m = Manifest::parse(id, Bytes::from(j.clone())).unwrap();
        assert_eq!((m.count(), m.chunk_len(0), m.chunk_len(2)), (3, 256, 88));
        assert!(Manifest::parse([0; 32], Bytes::from(j)).is_err());
        let wrong = manifest_json(600, 256, 2);
        let id = *blake3::hash(&wrong).as_bytes();
        assert!(Manifest::parse(id, Bytes::from(wrong)).is_err());
    }

    proptest! {
        #[test]
        fn any_manifest_bytes_are_safe(v in proptest::collection::vec(any::<u8>(), 0..400)) {
            let id = *blake3::hash(&v).as_bytes();
            let _ = Manifest::parse(id, Bytes::from(v));
        }
    }

    #[tokio::test]
    async fn chunks_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let h = *blake3::hash(b"abc").as_bytes();
        store.paths().write(&h, b"abc").await.unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        assert!(store.has(&h));
        assert_eq!(&store.paths().read(&h).await.unwrap()[..], b"abc");
    }
}
