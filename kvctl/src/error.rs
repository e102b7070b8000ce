//! Why a command failed.

/// A command's failure, printed as `Error: ...` with exit code 1 (as etcdctl does).
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The cluster refused or could not be reached.
    #[error(transparent)]
    Client(#[from] kv_client::Error),
    /// A recipe read failed.
    #[error(transparent)]
    Recipe(#[from] recipes::Error),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Bad flags or arguments.
    #[error("{0}")]
    Usage(String),
    /// The cluster sent something unusable.
    #[error("{0}")]
    Invalid(String),
}
