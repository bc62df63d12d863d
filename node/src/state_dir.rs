//! The node's state directory: its identity key, what it learned at join,
//! and the local status socket.
//!
//! ```text
//! <state>/identity.key   libp2p protobuf-encoded ed25519 keypair (0600)
//! <state>/node.json      control URL, server id, node id, name, group
//! <state>/meshnode.sock  status socket of the running node
//! ```

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};

use crate::error::{NodeError, Result};

/// What the node remembers of its membership between runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Membership {
    pub control_url: String,
    pub server_id: String,
    pub node_id: String,
    pub name: String,
    pub group: String,
}

#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename) with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = NodeError::state(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(NodeError::state(&tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(NodeError::state(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl StateDir {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(NodeError::state(&root))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(NodeError::state(&root))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn socket_path(&self) -> PathBuf {
        self.root.join("meshnode.sock")
    }

    fn key_path(&self) -> PathBuf {
        self.root.join("identity.key")
    }

    fn membership_path(&self) -> PathBuf {
        self.root.join("node.json")
    }

    /// The node's keypair, created on first use. The same key across runs is
    /// what makes the node the same member.
    pub fn identity(&self) -> Result<(Keypair, bool)> {
        let path = self.key_path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let kp = Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
                    NodeError::CorruptState {
                        path: path.clone(),
                        reason: e.to_string(),
                    }
                })?;
                Ok((kp, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let kp = Keypair::generate_ed25519();
                let bytes = kp
                    .to_protobuf_encoding()
                    .expect("ed25519 keys always encode");
                write_atomic(&path, &bytes, 0o600)?;
                Ok((kp, true))
            }
            Err(e) => Err(NodeError::state(path)(e)),
        }
    }

    pub fn membership(&self) -> Result<Option<Membership>> {
        let path = self.membership_path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| NodeError::CorruptState {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(NodeError::state(path)(e)),
        }
    }

    pub fn save_membership(&self, m: &Membership) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(m).expect("membership serializes");
        write_atomic(&self.membership_path(), &bytes, 0o600)
    }
}

pub fn peer_id(kp: &Keypair) -> PeerId {
    kp.public().to_peer_id()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let (a, created) = s.identity().unwrap();
        assert!(created);
        let (b, created) = StateDir::open(dir.path()).unwrap().identity().unwrap();
        assert!(!created);
        assert_eq!(peer_id(&a), peer_id(&b));
    }

    #[test]
    fn corrupt_key_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("identity.key"), b"garbage").unwrap();
        let err = StateDir::open(dir.path()).unwrap().identity().unwrap_err();
        assert!(matches!(err, NodeError::CorruptState { .. }), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("identity.key")).unwrap(),
            b"garbage"
        );
    }

    #[test]
    fn membership_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        assert_eq!(s.membership().unwrap(), None);
        let m = Membership {
            control_url: "http://127.0.0.1:1".into(),
            server_id: "srv".into(),
            node_id: "id".into(),
            name: "n".into(),
            group: "g".into(),
        };
        s.save_membership(&m).unwrap();
        assert_eq!(s.membership().unwrap(), Some(m));
    }
}
