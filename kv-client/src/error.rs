//! One error type for every call, sorted by what the caller can do about it: retry, find out
//! whether a write happened, or give up.

use tonic::{Code, Status};

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The revision asked for was compacted away.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// A watch's start revision (or the point it resumed from) was compacted away: the
    /// events before `compact_revision` are gone, so the watch ended instead of skipping them.
    #[error(
        "watch canceled: required revision has been compacted (compacted at {compact_revision})"
    )]
    WatchCompacted {
        /// The server's compaction revision.
        compact_revision: i64,
    },
    /// The server refused or canceled a watch, for the reason it gave.
    #[error("watch canceled: {0}")]
    WatchCanceled(String),
    /// The revision asked for is not written yet.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// The lease does not exist (never granted, expired or revoked).
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A grant named a lease id that is taken.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// A grant asked for too long a TTL.
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// `ignore_value`/`ignore_lease` on a key that does not exist.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// The request names no key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// A txn has more operations than the server allows.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A txn writes one key twice.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// The request is over the server's size limit.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// The store is full (NOSPACE alarm).
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// The cluster has no leader right now; nothing was done. Retryable.
    #[error("etcdserver: no leader")]
    NoLeader,
    /// Every endpoint failed or refused before the request was sent; nothing was done.
    /// Retryable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A write may or may not have been applied (the connection broke, the leader changed or
    /// the server timed out after accepting it). Never retried blindly: read back to find out.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The call's deadline passed before it succeeded.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// An endpoint string is not a usable URL.
    #[error("invalid endpoint {0}")]
    InvalidEndpoint(String),
    /// The caller may not do this.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// Authentication is on and the call carried no credentials.
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    /// Wrong user name or password.
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    /// The token expired, was revoked (password change, user deleted, auth off) or is unknown.
    /// The client renews it by itself when it has credentials.
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// Users, roles or permissions changed while the call was under way.
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// Authenticate against a cluster whose authentication is off.
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    /// The TLS settings are not usable (a certificate or key that does not parse).
    #[error("invalid TLS settings: {0}")]
    InvalidTls(String),
    /// A token given in the options is not usable.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// Any other refusal from the server, with its gRPC code and message.
    #[error("{code:?}: {message}")]
    Server {
        /// The gRPC code.
        code: Code,
        /// The server's message.
        message: String,
    },
}

/// Whether the failed call may have had an effect on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Certainly not applied: safe to send again anywhere.
    None,
    /// Maybe applied.
    Unknown,
    /// Refused by the server for a reason resending will not change.
    Refused,
}

impl Error {
    /// True when sending the same request again (perhaps elsewhere) can succeed and cannot
    /// apply it twice.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::NoLeader | Error::Unavailable(_))
    }

    /// True when a write may have been applied although the call failed.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown(_))
    }

    /// Maps a gRPC status to the error and to what it says about the request's effect.
    /// etcd's errors are recognised by their exact messages, as etcd's own client does.
    pub(crate) fn from_status(status: &Status) -> (Error, Effect) {
        let message = status.message();
        let known = match message {
            "etcdserver: mvcc: required revision has been compacted" => Some(Error::Compacted),
            "etcdserver: mvcc: required revision is a future revision" => {
                Some(Error::FutureRevision)
            }
            "etcdserver: requested lease not found" => Some(Error::LeaseNotFound),
            "etcdserver: lease already exists" => Some(Error::LeaseExists),
            "etcdserver: too large lease TTL" => Some(Error::LeaseTtlTooLarge),
            "etcdserver: key not found" => Some(Error::KeyNotFound),
            "etcdserver: key is not provided" => Some(Error::EmptyKey),
            "etcdserver: too many operations in txn request" => Some(Error::TooManyOps),
            "etcdserver: duplicate key given in txn request" => Some(Error::DuplicateKey),
            "etcdserver: request is too large" => Some(Error::RequestTooLarge),
            "etcdserver: mvcc: database space exceeded" => Some(Error::NoSpace),
            "etcdserver: permission denied" => Some(Error::PermissionDenied),
            "etcdserver: user name is empty" => Some(Error::UserEmpty),
            "etcdserver: authentication failed, invalid user ID or password" => {
                Some(Error::AuthFailed)
            }
            "etcdserver: invalid auth token" => Some(Error::InvalidAuthToken),
            "etcdserver: revision of auth store is old" => Some(Error::AuthOldRevision),
            "etcdserver: authentication is not enabled" => Some(Error::AuthNotEnabled),
            _ => None,
        };
        if let Some(e) = known {
            return (e, Effect::Refused);
        }
        match (status.code(), message) {
            // The server never proposed it.
            (Code::Unavailable, "etcdserver: no leader" | "etcdserver: not leader") => {
                (Error::NoLeader, Effect::None)
            }
            // It was proposed (or may have been) and then lost track of.
            (
                Code::Unavailable | Code::DeadlineExceeded,
                "etcdserver: leader changed"
                | "etcdserver: request timed out"
                | "etcdserver: request timed out, possibly due to previous leader failure"
                | "etcdserver: request timed out, possibly due to connection lost",
            ) => (Error::OutcomeUnknown(message.to_string()), Effect::Unknown),
            // A connection that could not be made carried nothing; any other transport
            // failure (a reset, say) may have delivered the request.
            (Code::Unavailable, m) if never_connected(m) => {
                (Error::Unavailable(m.to_string()), Effect::None)
            }
            (Code::Unavailable | Code::Unknown | Code::Cancelled, m) => {
                (Error::OutcomeUnknown(m.to_string()), Effect::Unknown)
            }
            (Code::DeadlineExceeded, m) => {
                (Error::DeadlineExceeded(m.to_string()), Effect::Unknown)
            }
            (code, m) => (
                Error::Server {
                    code,
                    message: m.to_string(),
                },
                Effect::Refused,
            ),
        }
    }
}

/// Whether a transport error message (tonic's, hyper's) says the connection was never made.
fn never_connected(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "connect error",
        "trying to connect",
        "connection refused",
        "dns error",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// The result of a client call.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_sort_into_kinds_and_effects() {
        let cases = [
            (
                Status::out_of_range("etcdserver: mvcc: required revision has been compacted"),
                Error::Compacted,
                Effect::Refused,
            ),
            (
                Status::not_found("etcdserver: requested lease not found"),
                Error::LeaseNotFound,
                Effect::Refused,
            ),
            (
                Status::unavailable("etcdserver: no leader"),
                Error::NoLeader,
                Effect::None,
            ),
            (
                Status::unavailable("etcdserver: leader changed"),
                Error::OutcomeUnknown("etcdserver: leader changed".into()),
                Effect::Unknown,
            ),
            (
                Status::unavailable("tcp connect error: Connection refused (os error 111)"),
                Error::Unavailable("tcp connect error: Connection refused (os error 111)".into()),
                Effect::None,
            ),
            (
                Status::unavailable("connection reset"),
                Error::OutcomeUnknown("connection reset".into()),
                Effect::Unknown,
            ),
        ];
        for (status, error, effect) in cases {
            assert_eq!(Error::from_status(&status), (error, effect), "{status:?}");
        }
        assert!(Error::NoLeader.is_retryable());
        assert!(!Error::Compacted.is_retryable());
        assert!(Error::OutcomeUnknown(String::new()).is_outcome_unknown());
    }
}
