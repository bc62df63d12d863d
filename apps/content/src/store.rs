//! The chunk cache under the node's state directory, and the manifests it has seen.
//!
//! Layout: `STATE/content/chunks/<first two hex digits>/<hash hex>` (one file per chunk) and
//! `STATE/content/manifests/<content id hex>.json` (the manifest's exact bytes).
//!
//! **Crash safety.** A file is written under a temporary name in its final directory
//! (`<name>.tmp<random>`), synced, renamed to its name, and the directory synced: after a
//! crash at any point a chunk's name holds either nothing or the whole chunk, and a leftover
//! temporary file is removed at the next start. A chunk file is only ever written after its
//! bytes matched the hash, and it is checked against its hash again whenever it is read:
//! [`Store::open`] hashes every chunk at start-up and removes the damaged ones (a disk that
//! lost a write, a file someone truncated), and serving or assembling a file checks every
//! chunk it reads ([`StorePaths::read_checked`]), so a damaged chunk is never served as good;
//! it is removed and fetched again.
//!
//! **Size limit.** With a limit (`meshnode up --cache-size`), the cache evicts the least
//! recently used chunks (stored, served or used by a fetch) until it fits ([`Store::evict`]),
//! never a chunk of a fetch in progress: while one runs, its chunks may take the cache over its
//! limit, and the excess goes once it is over.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::manifest::{parse_hash, Hash32, Published};
use crate::ContentError;

/// Why a `--cache-size` was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size: a number of bytes, optionally with a unit (e.g. 64MiB, 1.5GiB, 500MB, 4096)")]
    Syntax(String),
    #[error(
        "{0:?} has an unknown unit: use B, KiB, MiB, GiB, TiB (or K, M, G, T), KB, MB, GB, TB"
    )]
    Unit(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// A size in bytes, as people write it: `4096`, `64MiB`, `64M`, `1.5 GiB`, `500MB`
/// (case-insensitive). `K`/`M`/`G`/`T` and `KiB`… are powers of 1024, `KB`/`MB`… of 1000.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return Err(SizeError::Syntax(s.to_string()));
    }
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(SizeError::Unit(s.to_string())),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let too_large = || SizeError::TooLarge(s.to_string());
    let int: u64 = int.parse().map_err(|_| too_large())?;
    let mut bytes = int.checked_mul(mult).ok_or_else(too_large)?;
    if !frac.is_empty() {
        // At most 9 fractional digits count (a nanobyte is no byte).
        let digits = &frac[..frac.len().min(9)];
        let f: u64 = digits
            .parse()
            .map_err(|_| SizeError::Syntax(s.to_string()))?;
        let scale = 10u64.pow(digits.len() as u32);
        let part = (u128::from(f) * u128::from(mult) / u128::from(scale)) as u64;
        bytes = bytes.checked_add(part).ok_or_else(too_large)?;
    }
    Ok(bytes)
}

/// One chunk in the cache.
#[derive(Clone, Copy, Debug)]
struct Entry {
    len: u64,
    /// When it was last used, on the store's use counter.
    used: u64,
}

/// Where the cache lives, which chunks it holds and how recently each was used (kept in
/// memory by the content actor; the actor is the only writer of the index).
pub struct Store {
    root: PathBuf,
    chunks: HashMap<Hash32, Entry>,
    /// The chunks by last use, oldest first.
    lru: BTreeSet<(u64, Hash32)>,
    bytes: u64,
    clock: u64,
    limit: Option<u64>,
    evicted: u64,
}

/// What [`Store::open`] found besides good chunks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Chunk files that did not match their hash, removed.
    pub damaged: Vec<Hash32>,
    /// Temporary files of writes that never finished, removed.
    pub temporaries: usize,
}

/// Paths of one cache (cheap to clone into tasks).
#[derive(Clone, Debug)]
pub struct StorePaths {
    root: PathBuf,
}

/// A chunk read back from the cache.
#[derive(Debug)]
pub enum Read {
    Good(Bytes),
    /// Not there (never stored, or evicted meanwhile).
    Missing,
    /// There, but its bytes do not match its hash: the file was removed.
    Damaged,
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

    /// Reads a chunk and checks it against its hash; a damaged chunk is removed.
    pub async fn read_checked(&self, h: &Hash32) -> std::io::Result<Read> {
        let path = self.chunk(h);
        let data = match tokio::fs::read(&path).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Read::Missing),
            Err(e) => return Err(e),
        };
        if blake3::hash(&data).as_bytes() == h {
            return Ok(Read::Good(Bytes::from(data)));
        }
        tracing::warn!(path = %path.display(), len = data.len(), "a cached chunk does not match its hash; removing it");
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(Read::Damaged),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Read::Damaged),
            Err(e) => Err(e),
        }
    }

    /// Writes a chunk whose bytes were checked against `h`, crash-safely (see the module
    /// docs).
    pub async fn write(&self, h: &Hash32, data: Bytes) -> std::io::Result<()> {
        let path = self.chunk(h);
        tokio::task::spawn_blocking(move || write_atomic(&path, &data))
            .await
            .map_err(std::io::Error::other)?
    }

    pub async fn write_manifest(&self, m: &Published) -> std::io::Result<()> {
        let (path, json) = (self.manifest(m.id()), m.json().to_vec());
        tokio::task::spawn_blocking(move || write_atomic(&path, &json))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Removes a chunk's file (nothing if it is not there). Blocking, but one `unlink`.
    pub fn remove(&self, h: &Hash32) -> std::io::Result<()> {
        match std::fs::remove_file(self.chunk(h)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Whether `name` is one of [`write_atomic`]'s temporary names.
fn is_temporary(name: &str) -> bool {
    name.rsplit_once(".tmp")
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Writes `data` to `path` so that a crash leaves either the old file or the whole new one:
/// a temporary file in the same directory, synced, renamed over `path`, and the directory
/// synced so that the rename itself survives a crash.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!("{name}.tmp{}", rand::random::<u32>()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

impl Store {
    /// Opens (creating) the cache under `state_dir`: removes temporary files of writes that
    /// never finished, checks every chunk against its hash (removing the damaged ones), loads
    /// every manifest that still matches its id, and evicts down to `limit`. Blocking: run at
    /// start-up on a blocking thread.
    pub fn open(
        state_dir: &Path,
        limit: Option<u64>,
    ) -> Result<(Self, Vec<Published>, OpenReport), ContentError> {
        let root = state_dir.join("content");
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e| ContentError::Io(p, e)
        };
        let chunks_dir = root.join("chunks");
        let manifests = root.join("manifests");
        std::fs::create_dir_all(&chunks_dir).map_err(io(&chunks_dir))?;
        std::fs::create_dir_all(&manifests).map_err(io(&manifests))?;
        let mut report = OpenReport::default();
        // (last modified, hash, length): the order of use survives a restart roughly.
        let mut found: Vec<(std::time::SystemTime, Hash32, u64)> = Vec::new();
        for sub in std::fs::read_dir(&chunks_dir).map_err(io(&chunks_dir))? {
            let sub = sub.map_err(io(&chunks_dir))?.path();
            let Ok(files) = std::fs::read_dir(&sub) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                let name = f.file_name().to_string_lossy().into_owned();
                if is_temporary(&name) {
                    tracing::info!(path = %path.display(), "removing a chunk write that never finished");
                    let _ = std::fs::remove_file(&path);
                    report.temporaries += 1;
                    continue;
                }
                let Some(h) = parse_hash(&name) else {
                    continue;
                };
                let Ok(data) = std::fs::read(&path) else {
                    continue;
                };
                if blake3::hash(&data).as_bytes() != &h {
                    tracing::warn!(path = %path.display(), len = data.len(), "a cached chunk does not match its hash; removing it");
                    std::fs::remove_file(&path).map_err(io(&path))?;
                    report.damaged.push(h);
                    continue;
                }
                let modified = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                found.push((modified, h, data.len() as u64));
            }
        }
        for f in std::fs::read_dir(&manifests)
            .map_err(io(&manifests))?
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            if is_temporary(&name) {
                let _ = std::fs::remove_file(f.path());
                report.temporaries += 1;
            }
        }
        let mut loaded = Vec::new();
        for f in std::fs::read_dir(&manifests)
            .map_err(io(&manifests))?
            .flatten()
        {
            let path = f.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
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
        found.sort();
        let mut store = Self {
            root,
            chunks: HashMap::new(),
            lru: BTreeSet::new(),
            bytes: 0,
            clock: 0,
            limit,
            evicted: 0,
        };
        for (_, h, len) in found {
            store.insert(h, len);
        }
        let paths = store.paths();
        for h in store.evict(|_| false) {
            paths.remove(&h).map_err(io(&paths.chunk(&h)))?;
        }
        tracing::info!(chunks = store.chunks.len(), bytes = store.bytes, limit = ?store.limit,
            damaged = report.damaged.len(), temporaries = report.temporaries,
            evicted = store.evicted, manifests = loaded.len(), dir = %store.root.display(), "content cache");
        Ok((store, loaded, report))
    }

    pub fn paths(&self) -> StorePaths {
        StorePaths {
            root: self.root.clone(),
        }
    }

    pub fn has(&self, h: &Hash32) -> bool {
        self.chunks.contains_key(h)
    }

    /// Bytes of the chunks held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Chunks evicted to keep under the limit since the store was opened.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// `h` was used (served, or read for a fetch): the last to be evicted.
    pub fn touch(&mut self, h: &Hash32) {
        self.clock += 1;
        if let Some(e) = self.chunks.get_mut(h) {
            self.lru.remove(&(e.used, *h));
            e.used = self.clock;
            self.lru.insert((e.used, *h));
        }
    }

    /// A chunk of `len` bytes reached the disk (it counts as just used).
    pub fn insert(&mut self, h: Hash32, len: u64) {
        self.forget(&h);
        self.clock += 1;
        self.chunks.insert(
            h,
            Entry {
                len,
                used: self.clock,
            },
        );
        self.lru.insert((self.clock, h));
        self.bytes += len;
    }

    /// Takes `h` out of the index (its file was found damaged, or is being removed); false if
    /// it was not held.
    pub fn forget(&mut self, h: &Hash32) -> bool {
        let Some(e) = self.chunks.remove(h) else {
            return false;
        };
        self.lru.remove(&(e.used, *h));
        self.bytes -= e.len;
        true
    }

    /// Takes the least recently used chunks that are not `pinned` out of the index until the
    /// cache fits its limit (or only pinned chunks are left), and returns them: the caller
    /// removes their files. Nothing without a limit.
    pub fn evict(&mut self, pinned: impl Fn(&Hash32) -> bool) -> Vec<Hash32> {
        let Some(limit) = self.limit else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if self.bytes <= limit {
            return out;
        }
        let mut excess = self.bytes - limit;
        for (_, h) in &self.lru {
            if excess == 0 {
                break;
            }
            if pinned(h) {
                continue;
            }
            let len = self.chunks[h].len;
            excess = excess.saturating_sub(len);
            out.push(*h);
        }
        for h in &out {
            self.forget(h);
        }
        self.evicted += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(data: &[u8]) -> Hash32 {
        *blake3::hash(data).as_bytes()
    }

    #[tokio::test]
    async fn chunks_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = Store::open(dir.path(), None).unwrap();
        let hash = h(b"abc");
        store
            .paths()
            .write(&hash, Bytes::from_static(b"abc"))
            .await
            .unwrap();
        let (store, _, report) = Store::open(dir.path(), None).unwrap();
        assert!(store.has(&hash));
        assert_eq!(store.bytes(), 3);
        assert_eq!(report, OpenReport::default());
        let Read::Good(d) = store.paths().read_checked(&hash).await.unwrap() else {
            panic!("not good")
        };
        assert_eq!(&d[..], b"abc");
        // No temporary file is left behind.
        let sub = store.paths().chunk(&hash).parent().unwrap().to_path_buf();
        assert_eq!(std::fs::read_dir(sub).unwrap().count(), 1);
    }

    /// What a crash in the middle of writing leaves (a temporary file, a truncated chunk
    /// under its name, a chunk with a flipped byte) is removed at the next start, and a
    /// chunk damaged after the start is caught when it is read.
    #[tokio::test]
    async fn damaged_chunks_and_unfinished_writes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = Store::open(dir.path(), None).unwrap();
        let p = store.paths();
        let chunks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1000]).collect();
        for c in &chunks {
            p.write(&h(c), Bytes::from(c.clone())).await.unwrap();
        }
        // Chunk 0 truncated, chunk 1 with a byte flipped, a temporary file of chunk 2 left.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.chunk(&h(&chunks[0])))
            .unwrap();
        f.set_len(500).unwrap();
        let mut bad = chunks[1].clone();
        bad[7] ^= 1;
        std::fs::write(p.chunk(&h(&chunks[1])), &bad).unwrap();
        let tmp = p.chunk(&h(&chunks[2])).with_extension("tmp12345");
        std::fs::write(&tmp, &chunks[2][..10]).unwrap();
        let (store, _, report) = Store::open(dir.path(), None).unwrap();
        let mut damaged = report.damaged.clone();
        damaged.sort();
        let mut want = vec![h(&chunks[0]), h(&chunks[1])];
        want.sort();
        assert_eq!(damaged, want);
        assert_eq!(report.temporaries, 1);
        assert!(!tmp.exists());
        assert!(!p.chunk(&h(&chunks[0])).exists() && !p.chunk(&h(&chunks[1])).exists());
        assert!(!store.has(&h(&chunks[0])) && !store.has(&h(&chunks[1])));
        assert!(store.has(&h(&chunks[2])) && store.has(&h(&chunks[3])));
        assert_eq!(store.bytes(), 2000);
        // Damaged after the start: caught and removed on read.
        std::fs::write(p.chunk(&h(&chunks[3])), b"short").unwrap();
        assert!(matches!(
            p.read_checked(&h(&chunks[3])).await.unwrap(),
            Read::Damaged
        ));
        assert!(!p.chunk(&h(&chunks[3])).exists());
        assert!(matches!(
            p.read_checked(&h(&chunks[3])).await.unwrap(),
            Read::Missing
        ));
        assert!(matches!(
            p.read_checked(&h(&chunks[2])).await.unwrap(),
            Read::Good(_)
        ));
    }

    #[test]
    fn least_recently_used_chunks_go_first_and_pinned_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _, _) = Store::open(dir.path(), Some(300)).unwrap();
        let k = |i: u8| [i; 32];
        for i in 0..3 {
            store.insert(k(i), 100);
        }
        assert!(store.evict(|_| false).is_empty(), "300 bytes fit 300");
        store.touch(&k(0));
        store.insert(k(3), 100);
        // 1 is the least recently used (0 was touched).
        assert_eq!(store.evict(|_| false), vec![k(1)]);
        assert_eq!((store.bytes(), store.len(), store.evicted()), (300, 3, 1));
        // 150 more: two have to go; 2 is pinned, so 0 and 3 go (oldest first).
        store.insert(k(4), 150);
        assert_eq!(store.evict(|h| *h == k(2)), vec![k(0), k(3)]);
        assert_eq!(store.bytes(), 250);
        // Everything pinned: over the limit until it is not.
        store.insert(k(5), 200);
        assert!(store.evict(|_| true).is_empty());
        assert_eq!(store.bytes(), 450);
        assert_eq!(store.evict(|h| *h == k(5)), vec![k(2), k(4)]);
        assert_eq!(store.bytes(), 200);
        // Inserting a chunk again does not count it twice.
        store.insert(k(5), 200);
        assert_eq!((store.bytes(), store.len()), (200, 1));
        // No limit: nothing is evicted.
        let (mut unlimited, _, _) = Store::open(dir.path(), None).unwrap();
        unlimited.insert(k(9), u64::MAX / 2);
        assert!(unlimited.evict(|_| false).is_empty());
    }

    #[tokio::test]
    async fn a_smaller_limit_evicts_at_start_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = Store::open(dir.path(), None).unwrap();
        let chunks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 100]).collect();
        for c in &chunks {
            store
                .paths()
                .write(&h(c), Bytes::from(c.clone()))
                .await
                .unwrap();
            // Distinct modification times.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (store, _, _) = Store::open(dir.path(), Some(250)).unwrap();
        assert_eq!((store.len(), store.bytes(), store.evicted()), (2, 200, 2));
        assert!(store.has(&h(&chunks[2])) && store.has(&h(&chunks[3])));
        assert!(!store.paths().chunk(&h(&chunks[0])).exists());
        assert!(!store.paths().chunk(&h(&chunks[1])).exists());
    }

    #[test]
    fn sizes_in_human_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64 mib"), Ok(64 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("10B"), Ok(10));
        assert!(matches!(parse_size("64XB"), Err(SizeError::Unit(_))));
        assert!(matches!(parse_size("MiB"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("1.2.3M"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Syntax(_))));
        assert!(matches!(
            parse_size("99999999999TiB"),
            Err(SizeError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn manifests_survive_a_reopen_and_damaged_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded, _) = Store::open(dir.path(), None).unwrap();
        assert!(loaded.is_empty());
        let m = Published::new(crate::manifest::Manifest::from_reader("f", &b"hello"[..]).unwrap());
        store.paths().write_manifest(&m).await.unwrap();
        let other = Published::new(crate::manifest::Manifest::from_reader("g", &b"x"[..]).unwrap());
        std::fs::write(store.paths().manifest(other.id()), b"{}").unwrap();
        let (_, loaded, _) = Store::open(dir.path(), None).unwrap();
        assert_eq!(loaded, vec![m]);
    }
}
