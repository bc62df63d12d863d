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

use crate::manifest::{parse_hash, Hash32, Published};
use crate::ContentError;

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

    pub async fn write_manifest(&self, m: &Published) -> std::io::Result<()> {
        write_atomic(&self.manifest(m.id()), m.json()).await
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
    pub fn open(state_dir: &Path) -> Result<(Self, Vec<Published>), ContentError> {
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
                if let Some(h) = name.to_str().and_then(parse_hash) {
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
                .and_then(parse_hash)
            else {
                continue;
            };
            let Ok(json) = std::fs::read(&path) else {
                continue;
            };
            match Published::parse(id, Bytes::from(json)) {
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

    #[tokio::test]
    async fn manifests_survive_a_reopen_and_damaged_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert!(loaded.is_empty());
        let m = Published::new(crate::manifest::Manifest::from_reader("f", &b"hello"[..]).unwrap());
        store.paths().write_manifest(&m).await.unwrap();
        let other = Published::new(crate::manifest::Manifest::from_reader("g", &b"x"[..]).unwrap());
        std::fs::write(store.paths().manifest(other.id()), b"{}").unwrap();
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded, vec![m]);
    }
}
