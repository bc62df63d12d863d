//! Typed errors of the node library.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state directory {path} belongs to uid {owner}, not to this user (uid {me}); \
         give another --state, or run as its owner"
    )]
    StateOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} is corrupt: {reason}")]
    CorruptState { path: PathBuf, reason: String },
    #[error("this node has not joined a group yet: pass --token (and --control)")]
    NotJoined,
    #[error("no control server URL: pass --control")]
    NoControlUrl,
    #[error("invalid control server URL {url:?}: {reason}")]
    BadControlUrl { url: String, reason: String },
    #[error("the control server refused: {message} ({code:?})")]
    Refused { code: tonic::Code, message: String },
    #[error("this node is no longer a member: {0}")]
    Revoked(String),
    #[error("another meshnode is already running with state {0}")]
    AlreadyRunning(PathBuf),
    #[error("libp2p: {0}")]
    Swarm(String),
    #[error("local API: {0}")]
    LocalApi(String),
}

impl NodeError {
    pub(crate) fn state(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::State { path, source }
    }
}

impl From<tonic::Status> for NodeError {
    fn from(s: tonic::Status) -> Self {
        if s.code() == tonic::Code::PermissionDenied {
            Self::Revoked(s.message().to_string())
        } else {
            Self::Refused {
                code: s.code(),
                message: s.message().to_string(),
            }
        }
    }
}

pub type Result<T, E = NodeError> = std::result::Result<T, E>;
