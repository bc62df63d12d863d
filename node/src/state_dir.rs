//! The node's state directory: its identity key, what it learned at join,
//! and the lock that keeps a second process off them.
//!
//! ```text
//! <state>/identity.key   libp2p protobuf-encoded ed25519 keypair (0600)
//! <state>/node.json      control URL, server id and key, node id, name, group
//! <state>/lock           held (flock) by the endpoint that uses the directory
//! <state>/meshnode.sock  the local API socket of `meshnode up`
//! ```

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libp2p::identity::{Keypair, PeerId};
use peermesh_relay::identity::{self, write_atomic, IdentityError};
use serde::{Deserialize, Serialize};

use crate::error::{NodeError, Result};

/// What the node remembers of its membership between runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Membership {
    pub control_url: String,
    pub server_id: String,
    /// Fingerprint of the control server's key (hex SHA-256 of its
    /// SubjectPublicKeyInfo), pinned from the join token; empty in files of
    /// nodes that joined before servers had keys.
    #[serde(default)]
    pub server_key: String,
    pub node_id: String,
    pub name: String,
    pub group: String,
}

#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating) the state directory. One that another user owns is
    /// refused, not taken over: its mode is not ours to change, and its key
    /// and socket may be someone else's. Our own is made owner-only.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(NodeError::state(&root))?;
        let owner = std::fs::metadata(&root)
            .map_err(NodeError::state(&root))?
            .uid();
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if owner != me {
            return Err(NodeError::StateOwner {
                path: root,
                owner,
                me,
            });
        }
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

    fn membership_path(&self) -> PathBuf {
        self.root.join("node.json")
    }

    /// The node's keypair, created on first use. The same key across runs is
    /// what makes the node the same member.
    pub fn identity(&self) -> Result<(Keypair, bool)> {
        identity::load_or_create(&self.root).map_err(|e| match e {
            IdentityError::Io { path, source } => NodeError::State { path, source },
            IdentityError::Corrupt { path, reason } => NodeError::CorruptState { path, reason },
        })
    }

    /// Takes the directory for this process: one endpoint per state
    /// directory (two would be the same member twice, with one status
    /// socket and one membership file between them). Released when the
    /// returned lock is dropped or the process dies.
    pub fn lock(&self) -> Result<StateLock> {
        let path = self.root.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(NodeError::state(&path))?;
        // SAFETY: flock(2) on a file descriptor this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => NodeError::AlreadyRunning(self.root.clone()),
                _ => NodeError::state(&path)(e),
            });
        }
        Ok(StateLock { _file: file })
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
        let path = self.membership_path();
        write_atomic(&path, &bytes, 0o600).map_err(NodeError::state(path))
    }
}

/// The state directory's lock; see [`StateDir::lock`].
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

pub fn peer_id(kp: &Keypair) -> PeerId {
    kp.public().to_peer_id()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of another user is refused, and its mode left alone.
    #[test]
    fn another_users_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Only root can give a directory away; CI runs as root.
            assert!(
                std::env::var("CI").is_err(),
                "CI=true: this test needs root"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = StateDir::open(&theirs).unwrap_err();
        assert!(
            matches!(err, NodeError::StateOwner { owner: 65534, .. }),
            "{err}"
        );
        let mode = std::fs::metadata(&theirs).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "the mode of another user's directory changed");
    }

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
    fn one_endpoint_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let held = s.lock().unwrap();
        assert!(matches!(s.lock(), Err(NodeError::AlreadyRunning(_))));
        drop(held);
        s.lock().unwrap();
    }

    #[test]
    fn membership_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        assert_eq!(s.membership().unwrap(), None);
        let m = Membership {
            control_url: "http://127.0.0.1:1".into(),
            server_id: "srv".into(),
            server_key: "ab".repeat(32),
            node_id: "id".into(),
            name: "n".into(),
            group: "g".into(),
        };
        s.save_membership(&m).unwrap();
        assert_eq!(s.membership().unwrap(), Some(m));
    }
}
