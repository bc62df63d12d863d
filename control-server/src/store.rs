//! Durable state in sled: one tree per record kind, protobuf-encoded values.
//!
//! Reads go straight to the trees. Writes are collected in a [`Txn`] and
//! committed as one sled transaction across every tree it touches
//! ([`Store::commit`]): a crash or a full disk in the middle of an RPC
//! leaves all of its writes or none. Sled applies a commit to its page cache
//! at once; [`Store::flush`] makes it survive a `kill -9`. Every mutating RPC
//! commits, flushes, and only then publishes the change to watchers and
//! answers.

use prost::Message;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{Db, Transactional, Tree};

use crate::error::{ControlError, Result};
use peermesh_proto::store::v1::{
    GroupRecord, LinkRecord, NodeRecord, RelayRecord, SessionRecord, TokenRecord,
};

/// The trees of the store, in the order of [`Store::trees`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum T {
    Meta,
    Groups,
    Tokens,
    Nodes,
    Sessions,
    Links,
    Removed,
    Relays,
    TokenUses,
    SessionOf,
}

/// How many trees the store has.
const TREES: usize = 10;

#[derive(Clone)]
pub struct Store {
    db: Db,
    meta: Tree,
    groups: Tree,
    tokens: Tree,
    nodes: Tree,
    sessions: Tree,
    links: Tree,
    /// node id → removal reason, so a removed node is told why it is refused.
    removed: Tree,
    /// relay id → the relay directory's record.
    relays: Tree,
    /// token id, NUL, node id → when: every node a token let in, so that a
    /// removed node cannot come back with the token it used.
    token_uses: Tree,
    /// session subject → digest of its one live session (re-authentication
    /// replaces it).
    session_of: Tree,
}

/// Decodes one stored record; a corrupt one is an error that names its tree
/// and key.
fn decode<M: Message + Default>(tree: &Tree, key: &[u8], bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| ControlError::CorruptRecord {
        tree: String::from_utf8_lossy(&tree.name()).into_owned(),
        key: String::from_utf8_lossy(key).into_owned(),
        error: e,
    })
}

fn get<M: Message + Default>(tree: &Tree, key: impl AsRef<[u8]>) -> Result<Option<M>> {
    match tree.get(key.as_ref())? {
        Some(bytes) => Ok(Some(decode(tree, key.as_ref(), &bytes)?)),
        None => Ok(None),
    }
}

/// Every record under `prefix`. A corrupt record is reported with its key
/// and skipped, so that one bad record does not take down everything else
/// (the server still starts, and the record stays for an operator to see).
fn scan<M: Message + Default>(tree: &Tree, prefix: impl AsRef<[u8]>) -> Result<Vec<M>> {
    let mut out = Vec::new();
    for kv in tree.scan_prefix(prefix) {
        let (k, v) = kv?;
        match decode(tree, &k, &v) {
            Ok(m) => out.push(m),
            Err(e) => tracing::error!(error = %e, "skipping a corrupt record"),
        }
    }
    Ok(out)
}

/// Key of a link record: reporting node, NUL, peer.
fn link_key(from: &str, to: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(from.len() + to.len() + 1);
    k.extend_from_slice(from.as_bytes());
    k.push(0);
    k.extend_from_slice(to.as_bytes());
    k
}

/// `s` followed by NUL: the prefix of the two-part keys that start with it.
fn prefix_of(s: &str) -> Vec<u8> {
    let mut p = s.as_bytes().to_vec();
    p.push(0);
    p
}

/// The writes of one RPC, committed together by [`Store::commit`]. Reads
/// made while building it see the committed state, not its own writes; the
/// caller holds the lock that keeps that state from changing underneath
/// (its group's).
#[derive(Default)]
#[must_use = "writes are lost unless committed with Store::commit"]
pub struct Txn {
    /// In order; a later write of a key wins.
    writes: Vec<(T, Vec<u8>, Option<Vec<u8>>)>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    fn put<M: Message>(&mut self, tree: T, key: impl AsRef<[u8]>, value: &M) {
        self.writes
            .push((tree, key.as_ref().to_vec(), Some(value.encode_to_vec())));
    }

    fn put_raw(&mut self, tree: T, key: impl AsRef<[u8]>, value: &[u8]) {
        self.writes
            .push((tree, key.as_ref().to_vec(), Some(value.to_vec())));
    }

    fn remove(&mut self, tree: T, key: impl AsRef<[u8]>) {
        self.writes.push((tree, key.as_ref().to_vec(), None));
    }

    pub fn meta_put(&mut self, key: &str, value: &str) {
        self.put_raw(T::Meta, key, value.as_bytes());
    }
    pub fn meta_put_bytes(&mut self, key: &str, value: &[u8]) {
        self.put_raw(T::Meta, key, value);
    }
    pub fn put_group(&mut self, g: &GroupRecord) {
        self.put(T::Groups, &g.name, g);
    }
    pub fn put_token(&mut self, t: &TokenRecord) {
        self.put(T::Tokens, &t.token_id, t);
    }
    pub fn put_node(&mut self, n: &NodeRecord) {
        self.put(T::Nodes, &n.node_id, n);
    }
    pub fn delete_node(&mut self, node_id: &str) {
        self.remove(T::Nodes, node_id);
    }
    pub fn put_tombstone(&mut self, node_id: &str, reason: &str) {
        self.put_raw(T::Removed, node_id, reason.as_bytes());
    }
    pub fn clear_tombstone(&mut self, node_id: &str) {
        self.remove(T::Removed, node_id);
    }
    pub fn put_relay(&mut self, r: &RelayRecord) {
        self.put(T::Relays, &r.relay_id, r);
    }
    pub fn delete_relay(&mut self, relay_id: &str) {
        self.remove(T::Relays, relay_id);
    }
    /// Records that `token_id` let `node_id` in.
    pub fn put_token_use(&mut self, token_id: &str, node_id: &str, at_ms: u64) {
        self.put_raw(
            T::TokenUses,
            link_key(token_id, node_id),
            &at_ms.to_be_bytes(),
        );
    }
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

    /// Every tree, indexed by [`T`].
    fn trees(&self) -> [&Tree; TREES] {
        [
            &self.meta,
            &self.groups,
            &self.tokens,
            &self.nodes,
            &self.sessions,
            &self.links,
            &self.removed,
            &self.relays,
            &self.token_uses,
            &self.session_of,
        ]
    }

    /// Applies every write of `txn` as one transaction: all or none, also
    /// across a crash.
    pub fn commit(&self, txn: Txn) -> Result<()> {
        if txn.writes.is_empty() {
            return Ok(());
        }
        let trees = self.trees();
        let result: std::result::Result<(), TransactionError<()>> =
            trees[..].transaction(|views| {
                for (tree, key, value) in &txn.writes {
                    let view = &views[*tree as usize];
                    match value {
                        Some(v) => view.insert(key.as_slice(), v.as_slice())?,
                        None => view.remove(key.as_slice())?,
                    };
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => unreachable!("the closure never aborts"),
        }
    }

    /// Commits the writes that `f` makes.
    pub fn write(&self, f: impl FnOnce(&mut Txn)) -> Result<()> {
        let mut txn = Txn::new();
        f(&mut txn);
        self.commit(txn)
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

    /// Commits `txn` and makes it durable: what an RPC does before it
    /// publishes or answers.
    pub async fn commit_durable(&self, txn: Txn) -> Result<()> {
        self.commit(txn)?;
        self.flush().await
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .meta
            .get(key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn meta_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    pub fn group(&self, name: &str) -> Result<Option<GroupRecord>> {
        get(&self.groups, name)
    }
    pub fn groups(&self) -> Result<Vec<GroupRecord>> {
        scan(&self.groups, b"")
    }

    pub fn token(&self, token_id: &str) -> Result<Option<TokenRecord>> {
        get(&self.tokens, token_id)
    }
    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        scan(&self.tokens, b"")
    }

    pub fn node(&self, node_id: &str) -> Result<Option<NodeRecord>> {
        get(&self.nodes, node_id)
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

    pub fn relay(&self, relay_id: &str) -> Result<Option<RelayRecord>> {
        get(&self.relays, relay_id)
    }
    pub fn relays(&self) -> Result<Vec<RelayRecord>> {
        scan(&self.relays, b"")
    }

    pub fn session(&self, hash: &[u8]) -> Result<Option<SessionRecord>> {
        get(&self.sessions, hash)
    }

    /// Adds to `txn` a session, replacing the subject's previous one:
    /// sessions rotate, they do not pile up.
    pub fn put_session(&self, txn: &mut Txn, hash: &[u8], s: &SessionRecord) -> Result<()> {
        if let Some(old) = self.session_of.get(s.node_id.as_bytes())? {
            if old.as_ref() != hash {
                txn.remove(T::Sessions, old);
            }
        }
        txn.put_raw(T::SessionOf, s.node_id.as_bytes(), hash);
        txn.put(T::Sessions, hash, s);
        Ok(())
    }

    /// Adds to `txn` the removal of the session of `subject`.
    pub fn end_session(&self, txn: &mut Txn, subject: &str) -> Result<()> {
        if let Some(hash) = self.session_of.get(subject.as_bytes())? {
            txn.remove(T::Sessions, hash);
            txn.remove(T::SessionOf, subject.as_bytes());
        }
        Ok(())
    }

    /// Whether `token_id` let `node_id` in before.
    pub fn token_used_by(&self, token_id: &str, node_id: &str) -> Result<bool> {
        Ok(self.token_uses.contains_key(link_key(token_id, node_id))?)
    }

    /// How many nodes `token_id` let in.
    pub fn token_use_count(&self, token_id: &str) -> usize {
        self.token_uses.scan_prefix(prefix_of(token_id)).count()
    }

    /// Drops every expired session (and every corrupt one); returns how
    /// many.
    pub fn purge_expired_sessions(&self, now_ms: u64) -> Result<usize> {
        let mut txn = Txn::new();
        let mut removed = 0;
        for kv in self.sessions.iter() {
            let (k, v) = kv?;
            let subject = match decode::<SessionRecord>(&self.sessions, &k, &v) {
                Ok(s) if s.expires_ms > now_ms => continue,
                Ok(s) => Some(s.node_id),
                Err(e) => {
                    tracing::error!(error = %e, "removing a corrupt session");
                    None
                }
            };
            txn.remove(T::Sessions, &k);
            if let Some(subject) = subject {
                let current = self.session_of.get(subject.as_bytes())?;
                if current.is_some_and(|c| c.as_ref() == k.as_ref()) {
                    txn.remove(T::SessionOf, subject.as_bytes());
                }
            }
            removed += 1;
        }
        self.commit(txn)?;
        Ok(removed)
    }

    /// Adds to `txn` the replacement of every link that `from` reported.
    pub fn replace_links(
        &self,
        txn: &mut Txn,
        from: &str,
        links: &[(String, LinkRecord)],
    ) -> Result<()> {
        for kv in self.links.scan_prefix(prefix_of(from)) {
            txn.remove(T::Links, kv?.0);
        }
        for (to, rec) in links {
            txn.put(T::Links, link_key(from, to), rec);
        }
        Ok(())
    }

    /// Adds to `txn` the removal of the links that `node` reported and of
    /// those reported about it.
    pub fn delete_links_of(&self, txn: &mut Txn, node: &str) -> Result<()> {
        for kv in self.links.scan_prefix(prefix_of(node)) {
            txn.remove(T::Links, kv?.0);
        }
        let mut suffix = vec![0];
        suffix.extend_from_slice(node.as_bytes());
        for kv in self.links.iter() {
            let k = kv?.0;
            if k.ends_with(&suffix) {
                txn.remove(T::Links, k);
            }
        }
        Ok(())
    }

    /// Every link record, keyed by (reporting node, peer).
    pub fn links(&self) -> Result<Vec<(String, String, LinkRecord)>> {
        let mut out = Vec::new();
        for kv in self.links.iter() {
            let (k, v) = kv?;
            let split = k.iter().position(|&b| b == 0).unwrap_or(k.len());
            let from = String::from_utf8_lossy(&k[..split]).into_owned();
            let to = String::from_utf8_lossy(k.get(split + 1..).unwrap_or_default()).into_owned();
            match decode(&self.links, &k, &v) {
                Ok(rec) => out.push((from, to, rec)),
                Err(e) => tracing::error!(error = %e, "skipping a corrupt record"),
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Writes raw bytes under a key of the nodes tree, bypassing the
    /// record encoding: how tests make a corrupt record.
    #[cfg(test)]
    pub(crate) fn put_raw_node(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.nodes.insert(key, bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transaction's writes land in every tree together, and a later
    /// write of a key in it wins.
    #[test]
    fn a_txn_spans_trees() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let node = NodeRecord {
            node_id: "n1".into(),
            ..Default::default()
        };
        let mut txn = Txn::new();
        txn.put_node(&node);
        txn.put_token_use("t1", "n1", 7);
        txn.put_tombstone("n1", "gone");
        txn.clear_tombstone("n1");
        assert!(store.node("n1").unwrap().is_none(), "nothing before commit");
        store.commit(txn).unwrap();
        assert_eq!(store.node("n1").unwrap(), Some(node));
        assert!(store.token_used_by("t1", "n1").unwrap());
        assert_eq!(store.tombstone("n1").unwrap(), None);
    }

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
                    store.write(|t| t.meta_put(&format!("k{round}-{i}"), "v"))?;
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
