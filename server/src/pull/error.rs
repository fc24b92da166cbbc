//! Pull failures, split into permanent (fix the spec) and transient (retry later), which
//! the exit code tells apart for the operator.
use kandle_contract::pull::{EXIT_MISSING_SECRET, EXIT_PERMANENT, EXIT_TRANSIENT};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Uri(#[from] super::uri::UriError),
    #[error("{uri}: {source}")]
    Select {
        uri: String,
        source: super::select::SelectError,
    },
    #[error("{uri}: access denied ({status}){hint}")]
    Unauthorized {
        uri: String,
        status: u16,
        hint: &'static str,
    },
    #[error("{uri}: not found (404)")]
    NotFound { uri: String },
    #[error("{uri}: HTTP {status}")]
    Status { uri: String, status: u16 },
    #[error("{uri}: {message}")]
    Network { uri: String, message: String },
    #[error("{uri}: gave up after retrying for {seconds} s: {last}")]
    RetriesExhausted {
        uri: String,
        seconds: u64,
        last: String,
    },
    #[error("{file}: checksum mismatch twice: expected {expected}, got {actual}")]
    Integrity {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{file}: size mismatch twice: expected {expected} bytes, got {actual}")]
    Size {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// What a remote listed or sent is unsafe or unverifiable (a name outside the folder,
    /// a file without a size or hash, more bytes than announced).
    #[error("{uri}: refused: {reason}")]
    Refused { uri: String, reason: String },
    #[error("--sha256 must be 64 hexadecimal digits, got `{0}`")]
    BadSha256(String),
    #[error("{uri}: unexpected answer: {message}")]
    Protocol { uri: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "secret \"{name}\" not found or empty (nothing mounted after {waited} s): create it in the ModelDeployment's namespace; the pull is retried"
    )]
    MissingSecret { name: String, waited: u64 },
}

impl PullError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    /// Worth retrying: the network, the server's load, or its temporary faults.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Network { .. } | Self::RetriesExhausted { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    pub fn exit_code(&self) -> u8 {
        if matches!(self, Self::MissingSecret { .. }) {
            EXIT_MISSING_SECRET
        } else if self.is_transient() {
            EXIT_TRANSIENT
        } else {
            EXIT_PERMANENT
        }
    }

    /// Maps an HTTP status that is not success to the error users should read; `hint`
    /// says what to do about a 401 or 403 (it depends on the source and its credentials).
    pub fn from_status(uri: &str, status: u16, hint: &'static str) -> Self {
        let uri = uri.to_string();
        match status {
            401 | 403 => Self::Unauthorized { uri, status, hint },
            404 => Self::NotFound { uri },
            _ => Self::Status { uri, status },
        }
    }
}
