//! The one table that turns engine, Raft and recipe errors into etcd's gRPC codes and exact
//! messages.

use kv_core::auth::AuthError;
use kv_core::{EngineError, Error, KvError};
use tonic::{Code, Status};

use crate::raft::RaftError;

/// etcd's status for a refused request.
pub fn kv_status(e: &KvError) -> Status {
    let code = match e {
        KvError::EmptyKey
        | KvError::KeyNotFound
        | KvError::ValueProvided
        | KvError::LeaseProvided
        | KvError::TooManyOps
        | KvError::TxnTooDeep
        | KvError::DuplicateKey
        | KvError::RequestTooLarge
        | KvError::InvalidSortOption => Code::InvalidArgument,
        KvError::Compacted { .. } | KvError::FutureRevision => Code::OutOfRange,
        KvError::LeaseNotFound => Code::NotFound,
        KvError::LeaseExists => Code::FailedPrecondition,
        KvError::LeaseTtlTooLarge => Code::OutOfRange,
        KvError::NoSpace => Code::ResourceExhausted,
        KvError::Auth(e) => return auth_status(e),
    };
    Status::new(code, e.to_string())
}

/// etcd's status for an auth refusal (`rpctypes`' table; the message is the client's key).
pub fn auth_status(e: &AuthError) -> Status {
    use AuthError as A;
    let code = match e {
        A::RootUserNotExist
        | A::RootRoleNotExist
        | A::UserAlreadyExist
        | A::UserNotFound
        | A::RoleAlreadyExist
        | A::RoleNotFound
        | A::RoleNotGranted
        | A::PermissionNotGranted
        | A::AuthNotEnabled => Code::FailedPrecondition,
        A::UserEmpty
        | A::RoleEmpty
        | A::AuthFailed
        | A::PermissionNotGiven
        | A::InvalidAuthMgmt
        | A::AuthOldRevision => Code::InvalidArgument,
        A::PermissionDenied => Code::PermissionDenied,
        A::InvalidAuthToken => Code::Unauthenticated,
        // Not in etcd's table, so it leaves as Unknown.
        A::NoPasswordUser => Code::Unknown,
    };
    Status::new(code, e.to_string())
}

/// The status etcd's Maintenance service gives an auth refusal of Defragment, Snapshot, Hash
/// and HashKV: the auth package's own error, unmapped, so code Unknown and `auth: ...` text.
pub fn auth_status_unmapped(e: &AuthError) -> Status {
    let text = e.to_string();
    let text = match text.strip_prefix("etcdserver: ") {
        Some(rest) => format!("auth: {rest}"),
        None => text,
    };
    Status::unknown(text)
}

/// Status for an engine failure: the member cannot serve; clients should try another.
pub fn engine_status(e: &EngineError) -> Status {
    tracing::error!(error = %e, "engine failure");
    Status::new(Code::Unavailable, "etcdserver: server stopped")
}

/// Status for either kind of engine error.
pub fn error_status(e: &Error) -> Status {
    match e {
        Error::Request(e) => kv_status(e),
        Error::Engine(e) => engine_status(e),
    }
}

/// Status for a failed proposal or read barrier, as etcd words each case.
pub fn raft_status(e: &RaftError) -> Status {
    match e {
        RaftError::NotLeader { leader: None, .. } => {
            Status::new(Code::Unavailable, "etcdserver: no leader")
        }
        RaftError::NotLeader { .. } => Status::new(Code::Unavailable, "etcdserver: not leader"),
        RaftError::LeaderChanged { .. } => {
            Status::new(Code::Unavailable, "etcdserver: leader changed")
        }
        RaftError::Timeout(_) => Status::new(Code::Unavailable, "etcdserver: request timed out"),
        RaftError::Storage(err) => {
            tracing::error!(error = %err, "raft storage failure");
            Status::new(Code::Unavailable, "etcdserver: server stopped")
        }
        RaftError::Fatal(err) => {
            tracing::error!(error = %err, "raft stopped");
            Status::new(Code::Unavailable, "etcdserver: server stopped")
        }
    }
}

/// Status for a request cut short because the member is stopping.
pub fn stopped_status() -> Status {
    Status::new(Code::Unavailable, "etcdserver: server stopped")
}

/// Election: `Proclaim` or `Resign` without a leader key (etcd's
/// `ErrMissingLeaderKey`, quotes included).
pub const MISSING_LEADER_KEY: &str = r#""leader" field must be provided"#;

/// Election: `Leader` of an election nobody leads (etcd's `ErrElectionNoLeader`).
pub const NO_LEADER: &str = "election: no leader";

/// Status for a failed Lock or Election call. etcd serves both services over an in-process
/// client and returns that client's error as it is, which gRPC sends as code Unknown with the
/// error's text (the server's own message). So every failure of these services is Unknown.
pub fn recipe_status(e: &recipes::Error) -> Status {
    match e {
        recipes::Error::Client(e) => client_status(e),
        // NotLeader's text is etcd's `ErrElectionNotLeader`; the others have no etcd twin.
        other => Status::unknown(other.to_string()),
    }
}

/// Status for a failed call of the Lock or Election services' own client (see
/// [`recipe_status`]).
pub fn client_status(e: &kv_client::Error) -> Status {
    use kv_client::Error as E;
    let message = match e {
        // The server's words, without the client's classification in front, as etcd's client
        // would pass them on.
        E::Server { message, .. }
        | E::OutcomeUnknown(message)
        | E::Unavailable(message)
        | E::DeadlineExceeded(message) => message.clone(),
        // The rest display as etcd's message.
        other => other.to_string(),
    };
    Status::unknown(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_etcds() {
        let s = kv_status(&KvError::Compacted {
            compact_revision: 3,
        });
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let s = kv_status(&KvError::LeaseNotFound);
        assert_eq!(
            (s.code(), s.message()),
            (Code::NotFound, "etcdserver: requested lease not found")
        );
        let s = kv_status(&KvError::NoSpace);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            kv_status(&KvError::EmptyKey).message(),
            "etcdserver: key is not provided"
        );
    }

    #[test]
    fn auth_refusals_are_etcds() {
        let s = kv_status(&KvError::Auth(AuthError::UserEmpty));
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "etcdserver: user name is empty")
        );
        let s = auth_status(&AuthError::InvalidAuthToken);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unauthenticated, "etcdserver: invalid auth token")
        );
        let s = auth_status(&AuthError::NoPasswordUser);
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::Unknown,
                "auth: authentication failed, password was given for no password user"
            )
        );
        let s = auth_status_unmapped(&AuthError::PermissionDenied);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unknown, "auth: permission denied")
        );
    }

    #[test]
    fn lock_and_election_errors_are_unknown_with_etcds_text() {
        let cases = [
            (
                recipes::Error::Client(kv_client::Error::LeaseNotFound),
                "etcdserver: requested lease not found",
            ),
            (
                recipes::Error::Client(kv_client::Error::EmptyKey),
                "etcdserver: key is not provided",
            ),
            (
                recipes::Error::Client(kv_client::Error::OutcomeUnknown(
                    "etcdserver: request timed out".into(),
                )),
                "etcdserver: request timed out",
            ),
            (recipes::Error::NotLeader, "election: not leader"),
        ];
        for (e, message) in cases {
            let s = recipe_status(&e);
            assert_eq!((s.code(), s.message()), (Code::Unknown, message), "{e:?}");
        }
        assert_eq!(MISSING_LEADER_KEY, "\"leader\" field must be provided");
    }
}
