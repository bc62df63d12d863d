//! Durable state in sled: one tree per record kind, protobuf-encoded values.
//!
//! Sled writes land in its page cache at once; [`Store::flush`] makes them
//! survive a `kill -9`. Every mutating RPC flushes before it answers.

use prost::Message;
use sled::{Db, Tree};

use crate::error::Result;
use peermesh_proto::store::v1::{
    GroupRecord, LinkRecord, NodeRecord, RelayRecord, SessionRecord, TokenRecord,
};

#[derive(Clone)]
pub struct Store {
    db: Db,
    pub(crate) meta: Tree,
    pub(crate) groups: Tree,
    pub(crate) tokens: Tree,
    pub(crate) nodes: Tree,
    pub(crate) sessions: Tree,
    pub(crate) links: Tree,
    /// node id → removal reason, so a removed node is told why it is refused.
    pub(crate) removed: Tree,
    /// relay id → the relay directory's record.
    pub(crate) relays: Tree,
    /// token id, NUL, node id → when: every node a token let in, so that a
    /// removed node cannot come back with the token it used.
    pub(crate) token_uses: Tree,
    /// session subject → digest of its one live session (re-authentication
    /// replaces it).
    pub(crate) session_of: Tree,
}

fn get<M: Message + Default>(tree: &Tree, key: impl AsRef<[u8]>) -> Result<Option<M>> {
    match tree.get(key)? {
        Some(bytes) => Ok(Some(M::decode(bytes.as_ref())?)),
        None => Ok(None),
    }
}

fn put<M: Message>(tree: &Tree, key: impl AsRef<[u8]>, value: &M) -> Result<()> {
    tree.insert(key.as_ref(), value.encode_to_vec())?;
    Ok(())
}

fn scan<M: Message + Default>(tree: &Tree, prefix: impl AsRef<[u8]>) -> Result<Vec<M>> {
    tree.scan_prefix(prefix)
        .map(|kv| {
            let (_, v) = kv?;
            Ok(M::decode(v.as_ref())?)
        })
        .collect()
}

/// Key of a link record: reporting node, NUL, peer.
fn link_key(from: &str, to: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(from.len() + to.len() + 1);
    k.extend_from_slice(from.as_bytes());
    k.push(0);
    k.extend_from_slice(to.as_bytes());
    k
}

impl Store {
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let db = sled::Config::new().path(path).open()?;
        Ok(Self {
            meta: db.open_tree("meta")?,
            groups: db.open_tree("groups")?,
            tokens: db.open_tree("tokens")?,
            nodes: db.open_tree("nodes")?,
            sessions: db.open_tree("sessions")?,
            links: db.open_tree("links")?,
            removed: db.open_tree("removed")?,
            relays: db.open_tree("relays")?,
            token_uses: db.open_tree("token_uses")?,
            session_of: db.open_tree("session_of")?,
            db,
        })
    }

    pub async fn flush(&self) -> Result<()> {
        // Not `flush_async`: that runs the flush on sled's own IO thread pool,
        // where concurrent flushes can occupy every pool thread waiting for a
        // buffer write that is queued on the same pool and so never runs
        // (sled 0.34.7, spacejam/sled#1308; seen with ~50 concurrent joins).
        // A blocking flush on tokio's blocking pool leaves sled's threads free.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| sled::Error::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .meta
            .get(key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn meta_put(&self, key: &str, value: &str) -> Result<()> {
        self.meta.insert(key, value.as_bytes())?;
        Ok(())
    }

    pub fn meta_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    pub fn meta_put_bytes(&self, key: &str, value: &[u8]) -> Result<()> {
        self.meta.insert(key, value)?;
        Ok(())
    }

    pub fn group(&self, name: &str) -> Result<Option<GroupRecord>> {
        get(&self.groups, name)
    }
    pub fn put_group(&self, g: &GroupRecord) -> Result<()> {
        put(&self.groups, &g.name, g)
    }
    pub fn groups(&self) -> Result<Vec<GroupRecord>> {
        scan(&self.groups, b"")
    }

    pub fn token(&self, token_id: &str) -> Result<Option<TokenRecord>> {
        get(&self.tokens, token_id)
    }
    pub fn put_token(&self, t: &TokenRecord) -> Result<()> {
        put(&self.tokens, &t.token_id, t)
    }
    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        scan(&self.tokens, b"")
    }

    pub fn node(&self, node_id: &str) -> Result<Option<NodeRecord>> {
        get(&self.nodes, node_id)
    }
    pub fn put_node(&self, n: &NodeRecord) -> Result<()> {
        put(&self.nodes, &n.node_id, n)
    }
    pub fn delete_node(&self, node_id: &str) -> Result<()> {
        self.nodes.remove(node_id)?;
        Ok(())
    }
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        scan(&self.nodes, b"")
    }

    pub fn tombstone(&self, node_id: &str) -> Result<Option<String>> {
        Ok(self
            .removed
            .get(node_id)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
    pub fn put_tombstone(&self, node_id: &str, reason: &str) -> Result<()> {
        self.removed.insert(node_id, reason.as_bytes())?;
        Ok(())
    }
    pub fn clear_tombstone(&self, node_id: &str) -> Result<()> {
        self.removed.remove(node_id)?;
        Ok(())
    }

    pub fn relay(&self, relay_id: &str) -> Result<Option<RelayRecord>> {
        get(&self.relays, relay_id)
    }
    pub fn put_relay(&self, r: &RelayRecord) -> Result<()> {
        put(&self.relays, &r.relay_id, r)
    }
    pub fn delete_relay(&self, relay_id: &str) -> Result<()> {
        self.relays.remove(relay_id)?;
        Ok(())
    }
    pub fn relays(&self) -> Result<Vec<RelayRecord>> {
        scan(&self.relays, b"")
    }

    pub fn session(&self, hash: &[u8]) -> Result<Option<SessionRecord>> {
        get(&self.sessions, hash)
    }
    /// Stores a session, replacing the subject's previous one: sessions
    /// rotate, they do not pile up.
    pub fn put_session(&self, hash: &[u8], s: &SessionRecord) -> Result<()> {
        if let Some(old) = self.session_of.insert(s.node_id.as_bytes(), hash)? {
            if old.as_ref() != hash {
                self.sessions.remove(old)?;
            }
        }
        put(&self.sessions, hash, s)
    }

    /// Records that `token_id` let `node_id` in.
    pub fn put_token_use(&self, token_id: &str, node_id: &str, at_ms: u64) -> Result<()> {
        self.token_uses
            .insert(link_key(token_id, node_id), &at_ms.to_be_bytes())?;
        Ok(())
    }

    /// Whether `token_id` let `node_id` in before.
    pub fn token_used_by(&self, token_id: &str, node_id: &str) -> Result<bool> {
        Ok(self.token_uses.contains_key(link_key(token_id, node_id))?)
    }

    /// How many nodes `token_id` let in.
    pub fn token_use_count(&self, token_id: &str) -> usize {
        let mut prefix = token_id.as_bytes().to_vec();
        prefix.push(0);
        self.token_uses.scan_prefix(prefix).count()
    }
    /// Drops the sessions of `node_id` (when set) and every expired one.
    pub fn purge_sessions(&self, node_id: Option<&str>, now_ms: u64) -> Result<usize> {
        let mut removed = 0;
        for kv in self.sessions.iter() {
            let (k, v) = kv?;
            let s = SessionRecord::decode(v.as_ref())?;
            if s.expires_ms <= now_ms || Some(s.node_id.as_str()) == node_id {
                self.sessions.remove(&k)?;
                let current = self.session_of.get(s.node_id.as_bytes())?;
                if current.is_some_and(|c| c.as_ref() == k.as_ref()) {
                    self.session_of.remove(s.node_id.as_bytes())?;
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Replaces every link that `from` reported.
    pub fn replace_links(&self, from: &str, links: &[(String, LinkRecord)]) -> Result<()> {
        self.delete_links_from(from)?;
        for (to, rec) in links {
            put(&self.links, link_key(from, to), rec)?;
        }
        Ok(())
    }

    fn delete_links_from(&self, from: &str) -> Result<()> {
        let mut prefix = from.as_bytes().to_vec();
        prefix.push(0);
        for kv in self.links.scan_prefix(&prefix) {
            self.links.remove(kv?.0)?;
        }
        Ok(())
    }

    /// Removes the links that `node` reported and those reported about it.
    pub fn delete_links_of(&self, node: &str) -> Result<()> {
        self.delete_links_from(node)?;
        let mut suffix = vec![0];
        suffix.extend_from_slice(node.as_bytes());
        for kv in self.links.iter() {
            let k = kv?.0;
            if k.ends_with(&suffix) {
                self.links.remove(k)?;
            }
        }
        Ok(())
    }

    /// Every link record, keyed by (reporting node, peer).
    pub fn links(&self) -> Result<Vec<(String, String, LinkRecord)>> {
        self.links
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let split = k.iter().position(|&b| b == 0).unwrap_or(k.len());
                let from = String::from_utf8_lossy(&k[..split]).into_owned();
                let to =
                    String::from_utf8_lossy(k.get(split + 1..).unwrap_or_default()).into_owned();
                Ok((from, to, LinkRecord::decode(v.as_ref())?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many concurrent flushes used to deadlock inside sled (see `flush`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_finish() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        for round in 0..20u32 {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..64u32 {
                let store = store.clone();
                tasks.spawn(async move {
                    store.meta_put(&format!("k{round}-{i}"), "v")?;
                    store.flush().await
                });
            }
            let all = async {
                while let Some(done) = tasks.join_next().await {
                    done.unwrap().unwrap();
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(30), all)
                .await
                .expect("concurrent flushes deadlocked");
        }
    }
}
