//! The errors a KV request can end with, as values: apply is deterministic, so an error is a
//! result like any other and travels back through Raft to the caller. `kv-server` maps each
//! variant to etcd's gRPC code and exact message in one table.

use crate::auth::AuthError;
use crate::backend::BackendError;

/// Why a request was refused. The `Display` texts are etcd's, without the gRPC framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The request names no key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// `ignore_value`/`ignore_lease` on a key that does not exist, or an empty txn op.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// `ignore_value` together with a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// `ignore_lease` together with a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// More operations in one txn branch than `--max-txn-ops`.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// Txns nested deeper than [`crate::validation::MAX_TXN_DEPTH`].
    #[error("etcdserver: txn nested too deeply")]
    TxnTooDeep,
    /// A txn branch writes one key twice, or writes a key it also deletes.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// The encoded request is over `--max-request-bytes`.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// An unknown sort order or target.
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    /// The revision asked for is below the compacted one.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted {
        /// The store's compaction revision when the request was refused.
        compact_revision: i64,
    },
    /// The revision asked for is above the current one.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// The lease named by a put does not exist.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A grant names a lease id that is taken.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// A grant asks for more than [`crate::lease::MAX_LEASE_TTL`] seconds.
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// The store is over `--quota-backend-bytes`, or the NOSPACE alarm is raised.
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// Refused by authentication or permissions, or a failed auth-management request.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// A failure of the engine itself (not of the request). Apply stops at the first one: the
/// batch it was in is not committed, and the server must not acknowledge it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Stored bytes did not decode: the data dir is damaged or not ours.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The data dir belongs to a different cluster or member.
    #[error("{0}")]
    Foreign(String),
}

impl From<EngineError> for std::io::Error {
    fn from(e: EngineError) -> Self {
        std::io::Error::other(e)
    }
}

/// Either outcome of a failed call into the engine: the request was refused, or the engine
/// itself failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is refused; nothing was changed.
    #[error(transparent)]
    Request(#[from] KvError),
    /// The engine failed; the batch it was in must not commit.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        Error::Engine(e.into())
    }
}
