//! The one table that turns engine and Raft errors into etcd's gRPC codes and exact messages.

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
        | KvError::DuplicateKey
        | KvError::RequestTooLarge
        | KvError::InvalidSortOption => Code::InvalidArgument,
        KvError::Compacted { .. } | KvError::FutureRevision => Code::OutOfRange,
        KvError::LeaseNotFound => Code::NotFound,
        KvError::LeaseExists => Code::FailedPrecondition,
        KvError::LeaseTtlTooLarge => Code::OutOfRange,
        KvError::NoSpace => Code::ResourceExhausted,
    };
    Status::new(code, e.to_string())
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
}
