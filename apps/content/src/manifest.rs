//! The manifest format: what a content id stands for. The origin
//! (hosting server) builds a [`Manifest`] from a file and publishes its JSON;
//! a node checks the JSON it is handed (by the origin or a peer) against the
//! content id it asked for. Both hold it as a [`Published`]: the manifest with
//! its exact bytes and the id they hash to.
//!
//! The **content id** is the BLAKE3 hash of the manifest's exact JSON bytes,
//! so whoever holds an id can check any manifest, and through it every chunk,
//! without trusting who handed it over. The serialized form is therefore
//! frozen: fields in the order `version, name, size, chunk_size, hash,
//! file_hash, chunks`, no whitespace, hashes as lowercase hex (a test pins one
//! manifest's bytes and id).
//!
//! Compiled without the `node` feature: no async runtime, no node library.

use std::fmt;
use std::io::Read;
use std::ops::Deref;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A content id or chunk hash (BLAKE3).
pub type Hash32 = [u8; 32];

/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
/// The one hash function of version 1 (the manifest's `hash` field).
pub const HASH_NAME: &str = "blake3";

/// Bytes per chunk of the manifests the origin builds (the last chunk of a
/// file may be shorter). 256 KiB: a 64 MiB file is 256 chunks, enough for 16
/// peers to each have distinct pieces to trade early on (rarest-first needs
/// many more pieces than peers); a chunk is four 64 KiB mesh messages, a bad
/// chunk costs only 256 KiB to fetch again, and the manifest of a 64 MiB file
/// stays below 20 KB.
pub const CHUNK_SIZE: u64 = 256 * 1024;

/// Largest chunk size a manifest may have (what a node fetches or serves).
pub const MAX_CHUNK_LEN: u32 = 4 << 20;

/// Largest payload of one content message: `peermesh_node::protocol::MAX_MESSAGE`,
/// which this module cannot name (it compiles without the node library);
/// `wire.rs` asserts at compile time that the two agree.
pub const MESSAGE_LIMIT: usize = 64 * 1024;

/// Most chunks a manifest may have: one bit per chunk, and a peer's whole
/// `Bitfield` (type byte, content id, chunk count, bits) fits one message.
pub const MAX_CHUNKS: u32 = ((MESSAGE_LIMIT - 1 - 32 - 4) * 8) as u32;

/// A hash from its 64 hex digits (either case).
pub fn parse_hash(s: &str) -> Option<Hash32> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// What a content id stands for. Field order is the serialized order (part
/// of the format: see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The file's path under the origin's content directory, `/`-separated.
    pub name: String,
    pub size: u64,
    pub chunk_size: u64,
    /// Always [`HASH_NAME`].
    pub hash: String,
    /// Hash of the whole file.
    #[serde(with = "hex32")]
    pub file_hash: Hash32,
    /// Hash of every chunk, in order.
    #[serde(with = "hex32_seq")]
    pub chunks: Vec<Hash32>,
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("its hash is not the content id")]
    WrongId,
    #[error("not a manifest: {0}")]
    NotJson(String),
    #[error("unsupported version or hash")]
    Unsupported,
    #[error("chunk size out of range")]
    ChunkSize,
    #[error("chunk count does not match the size")]
    ChunkCount,
}

impl Manifest {
    /// The manifest of the bytes of `r`, cut into [`CHUNK_SIZE`] chunks
    /// (reads every byte; blocking).
    pub fn from_reader(name: impl Into<String>, mut r: impl Read) -> std::io::Result<Self> {
        let mut whole = blake3::Hasher::new();
        let mut chunks = Vec::new();
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        let mut size = 0u64;
        loop {
            let mut n = 0;
            while n < buf.len() {
                let got = match r.read(&mut buf[n..]) {
                    Ok(got) => got,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if got == 0 {
                    break;
                }
                n += got;
            }
            if n == 0 {
                break;
            }
            whole.update(&buf[..n]);
            chunks.push(*blake3::hash(&buf[..n]).as_bytes());
            size += n as u64;
            if n < buf.len() {
                break;
            }
        }
        Ok(Self {
            version: MANIFEST_VERSION,
            name: name.into(),
            size,
            chunk_size: CHUNK_SIZE,
            hash: HASH_NAME.into(),
            file_hash: *whole.finalize().as_bytes(),
            chunks,
        })
    }

    /// Checks the rules of version 1: BLAKE3, a chunk size up to
    /// [`MAX_CHUNK_LEN`], exactly as many chunks as the size needs (at most
    /// [`MAX_CHUNKS`]).
    pub fn check(&self) -> Result<(), ManifestError> {
        if self.version != MANIFEST_VERSION || self.hash != HASH_NAME {
            return Err(ManifestError::Unsupported);
        }
        if self.chunk_size == 0 || self.chunk_size > u64::from(MAX_CHUNK_LEN) {
            return Err(ManifestError::ChunkSize);
        }
        let n = self.size.div_ceil(self.chunk_size);
        if n != self.chunks.len() as u64 || n > u64::from(MAX_CHUNKS) {
            return Err(ManifestError::ChunkCount);
        }
        Ok(())
    }

    /// Number of chunks.
    pub fn count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Offset of chunk `i` in the file.
    pub fn chunk_offset(&self, i: u32) -> u64 {
        u64::from(i) * self.chunk_size
    }

    /// Length of chunk `i` (`i` below [`Self::count`], in a checked manifest).
    pub fn chunk_len(&self, i: u32) -> u32 {
        (self.size - self.chunk_offset(i)).min(self.chunk_size) as u32
    }
}

/// A manifest with its exact JSON bytes and the content id they hash to:
/// what the origin serves and what a node caches and fetches by. The three
/// always agree (the fields are private); reads go to the [`Manifest`]
/// through `Deref`.
#[derive(Clone, PartialEq, Eq)]
pub struct Published {
    id: Hash32,
    manifest: Manifest,
    json: Bytes,
}

impl Published {
    /// Serializes `manifest` (the origin's side); its id follows from the
    /// bytes.
    pub fn new(manifest: Manifest) -> Self {
        let json = Bytes::from(serde_json::to_vec(&manifest).expect("manifests serialize"));
        Self {
            id: *blake3::hash(&json).as_bytes(),
            manifest,
            json,
        }
    }

    /// Checks `json` against the content id `id` and the manifest rules
    /// ([`Manifest::check`]) (a node's side: whoever handed the bytes over).
    pub fn parse(id: Hash32, json: Bytes) -> Result<Self, ManifestError> {
        if *blake3::hash(&json).as_bytes() != id {
            return Err(ManifestError::WrongId);
        }
        let manifest: Manifest =
            serde_json::from_slice(&json).map_err(|e| ManifestError::NotJson(e.to_string()))?;
        manifest.check()?;
        Ok(Self { id, manifest, json })
    }

    /// The content id.
    pub fn id(&self) -> &Hash32 {
        &self.id
    }

    /// The content id as 64 lowercase hex digits.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The exact bytes (their hash is [`Self::id`]).
    pub fn json(&self) -> &Bytes {
        &self.json
    }
}

impl Deref for Published {
    type Target = Manifest;

    fn deref(&self) -> &Manifest {
        &self.manifest
    }
}

impl fmt::Debug for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Published")
            .field("id", &self.id_hex())
            .field("name", &self.manifest.name)
            .field("size", &self.manifest.size)
            .field("chunks", &self.manifest.chunks.len())
            .finish()
    }
}

/// One hash as 64 lowercase hex digits (either case read).
mod hex32 {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{parse_hash, Hash32};

    pub fn serialize<S: Serializer>(h: &Hash32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash32, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse_hash(&s).ok_or_else(|| D::Error::custom("a hash is not 64 hex digits"))
    }
}

/// A list of hashes, each as [`hex32`].
mod hex32_seq {
    use serde::de::{SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};

    use super::Hash32;

    #[derive(serde::Deserialize)]
    struct Hex(#[serde(with = "super::hex32")] Hash32);

    pub fn serialize<S: Serializer>(v: &[Hash32], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for h in v {
            seq.serialize_element(&hex::encode(h))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Hash32>, D::Error> {
        struct Seq;
        impl<'de> Visitor<'de> for Seq {
            type Value = Vec<Hash32>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of 64-hex-digit hashes")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // Never trust a size hint for an allocation.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(Hex(h)) = seq.next_element()? {
                    out.push(h);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One manifest's bytes and id as the origin published them before the
    /// format moved here: changing either changes every content id.
    #[test]
    fn serialized_bytes_and_id_are_pinned() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let m = Manifest::from_reader("pin.bin", &data[..]).unwrap();
        let p = Published::new(m);
        assert_eq!(
            std::str::from_utf8(p.json()).unwrap(),
            r#"{"version":1,"name":"pin.bin","size":300000,"chunk_size":262144,"hash":"blake3","file_hash":"806c1579ae65bf9415d7fe4100c50d8d0759568ab1b685e63da50545e0e366f6","chunks":["0fbf72c45c99d9e7663102e3318392fc3333e2689b54bef28edc86d6fa9337f2","77c4f13cfb8db5cc86ee7934229b80fac59292e8291880dfe324b54de07fb231"]}"#
        );
        assert_eq!(
            p.id_hex(),
            "92e901ba46f9a893cafc7c8bc352f20a949315e92959d2911ffc3ac40f2c62f8"
        );
        // What the node parses is what the origin built.
        let back = Published::parse(*p.id(), p.json().clone()).unwrap();
        assert_eq!(back, p);
        assert_eq!(
            (back.count(), back.chunk_len(0), back.chunk_len(1)),
            (2, 262144, 37856)
        );
    }

    #[test]
    fn empty_files_have_no_chunks() {
        let m = Manifest::from_reader("e", &b""[..]).unwrap();
        assert_eq!((m.size, m.chunks.len()), (0, 0));
        assert_eq!(m.file_hash, *blake3::hash(b"").as_bytes());
        let p = Published::new(m);
        assert!(Published::parse(*p.id(), p.json().clone()).is_ok());
    }

    fn manifest_json(size: u64, chunk: u64, n: usize) -> Vec<u8> {
        let chunks: Vec<String> = (0..n).map(|i| hex::encode([i as u8; 32])).collect();
        serde_json::to_vec(&serde_json::json!({
            "version": 1, "name": "f", "size": size, "chunk_size": chunk,
            "hash": "blake3", "file_hash": hex::encode([9u8; 32]), "chunks": chunks,
        }))
        .unwrap()
    }

    fn parse(j: &[u8]) -> Result<Published, ManifestError> {
        Published::parse(*blake3::hash(j).as_bytes(), Bytes::copy_from_slice(j))
    }

    #[test]
    fn manifests_are_checked() {
        let j = manifest_json(600, 256, 3);
        let m = parse(&j).unwrap();
        assert_eq!((m.count(), m.chunk_len(0), m.chunk_len(2)), (3, 256, 88));
        assert_eq!(
            Published::parse([0; 32], Bytes::from(j)),
            Err(ManifestError::WrongId)
        );
        assert_eq!(
            parse(&manifest_json(600, 256, 2)),
            Err(ManifestError::ChunkCount)
        );
        assert_eq!(
            parse(&manifest_json(0, 0, 0)),
            Err(ManifestError::ChunkSize)
        );
        assert_eq!(
            parse(&manifest_json(10, u64::from(MAX_CHUNK_LEN) + 1, 1)),
            Err(ManifestError::ChunkSize)
        );
        let sha = String::from_utf8(manifest_json(600, 256, 3))
            .unwrap()
            .replace("blake3", "sha256");
        assert_eq!(parse(sha.as_bytes()), Err(ManifestError::Unsupported));
        let short = String::from_utf8(manifest_json(600, 256, 3))
            .unwrap()
            .replace(&hex::encode([1u8; 32]), "0101");
        assert!(matches!(
            parse(short.as_bytes()),
            Err(ManifestError::NotJson(_))
        ));
    }

    #[test]
    fn hex_is_read_in_either_case_and_written_lowercase() {
        let j = String::from_utf8(manifest_json(600, 256, 3))
            .unwrap()
            .replace(&hex::encode([9u8; 32]), &hex::encode_upper([0xabu8; 32]));
        let m = parse(j.as_bytes()).unwrap();
        assert_eq!(m.file_hash, [0xab; 32]);
        let again = serde_json::to_string(m.manifest()).unwrap();
        assert!(again.contains(&hex::encode([0xabu8; 32])), "{again}");
    }

    proptest! {
        #[test]
        fn any_manifest_bytes_are_safe(v in proptest::collection::vec(any::<u8>(), 0..400)) {
            let id = *blake3::hash(&v).as_bytes();
            let _ = Published::parse(id, Bytes::from(v));
        }

        #[test]
        fn any_hash_text_is_safe(s in "\\PC{0,80}") {
            if let Some(h) = parse_hash(&s) {
                prop_assert_eq!(hex::encode(h), s.to_ascii_lowercase());
            }
        }
    }

    proptest! {
        // Each case hashes up to 768 KiB.
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn built_manifests_pass_their_own_checks(len in 0usize..(3 * CHUNK_SIZE as usize), seed in any::<u8>()) {
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let m = Manifest::from_reader("x", &data[..]).unwrap();
            prop_assert!(m.check().is_ok());
            prop_assert_eq!(m.size, len as u64);
            let mut off = 0usize;
            for i in 0..m.count() {
                let l = m.chunk_len(i) as usize;
                prop_assert_eq!(m.chunks[i as usize], *blake3::hash(&data[off..off + l]).as_bytes());
                off += l;
            }
            prop_assert_eq!(off, len);
        }
    }
}
