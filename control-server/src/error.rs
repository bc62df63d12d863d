//! Typed errors of the control server, and how each maps to a gRPC status.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A rate limit or a cap: the message names the limit.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("stored record is corrupt: {0}")]
    Corrupt(#[from] prost::DecodeError),
    /// A stored record that does not decode, named so an operator can find
    /// (and remove) it.
    #[error("stored record {tree}/{key:?} is corrupt: {error}")]
    CorruptRecord {
        tree: String,
        key: String,
        error: prost::DecodeError,
    },
}

impl ControlError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
    pub fn unauthenticated(msg: impl Into<String>) -> Self {
        Self::Unauthenticated(msg.into())
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }
}

impl From<ControlError> for Status {
    fn from(err: ControlError) -> Self {
        let code = match &err {
            ControlError::InvalidArgument(_) => Code::InvalidArgument,
            ControlError::Unauthenticated(_) => Code::Unauthenticated,
            ControlError::PermissionDenied(_) => Code::PermissionDenied,
            ControlError::NotFound(_) => Code::NotFound,
            ControlError::AlreadyExists(_) => Code::AlreadyExists,
            ControlError::FailedPrecondition(_) => Code::FailedPrecondition,
            ControlError::Unavailable(_) => Code::Unavailable,
            ControlError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ControlError::ResourceExhausted(_) => Code::ResourceExhausted,
            ControlError::Storage(_)
            | ControlError::Corrupt(_)
            | ControlError::CorruptRecord { .. } => {
                tracing::error!(error = %err, "internal error");
                Code::Internal
            }
        };
        Status::new(code, err.to_string())
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;
