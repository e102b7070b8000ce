//! What travels through the Raft log and back: a command is a protobuf `InternalRequest`
//! (as etcd's `InternalRaftRequest`), an outcome is the response or the request's error.

use prost::Message;

use crate::auth::AuthError;
use crate::error::{EngineError, KvError};
use crate::proto::kvserverpb::internal_request::Request;
use crate::proto::kvserverpb::{InternalRequest, InternalResponse};

/// Encodes a command for the log.
pub fn encode_command(req: &InternalRequest) -> Vec<u8> {
    req.encode_to_vec()
}

/// Whether `request` is a write the quota governs (etcd's capped set: puts, lease grants and
/// txns that write): refused before proposing by a member past its quota, and at apply while
/// the NOSPACE alarm is up.
pub fn uses_space(request: &Request) -> bool {
    match request {
        Request::Put(_) | Request::LeaseGrant(_) => true,
        Request::Txn(t) => !crate::apply::txn_is_read_only(t),
        _ => false,
    }
}

/// Decodes a command read from the log.
pub fn decode_command(bytes: &[u8]) -> Result<InternalRequest, EngineError> {
    InternalRequest::decode(bytes)
        .map_err(|e| EngineError::Corrupt(format!("undecodable log command: {e}")))
}

/// The deterministic result of applying one command.
pub type Outcome = Result<InternalResponse, KvError>;

const OK: u8 = 0;
const ERR: u8 = 1;

fn error_code(e: &KvError) -> (u8, i64) {
    match e {
        KvError::EmptyKey => (1, 0),
        KvError::KeyNotFound => (2, 0),
        KvError::ValueProvided => (3, 0),
        KvError::LeaseProvided => (4, 0),
        KvError::TooManyOps => (5, 0),
        KvError::DuplicateKey => (6, 0),
        KvError::RequestTooLarge => (7, 0),
        KvError::InvalidSortOption => (8, 0),
        KvError::Compacted { compact_revision } => (9, *compact_revision),
        KvError::FutureRevision => (10, 0),
        KvError::LeaseNotFound => (11, 0),
        KvError::NoSpace => (12, 0),
        KvError::LeaseExists => (13, 0),
        KvError::LeaseTtlTooLarge => (14, 0),
        KvError::TxnTooDeep => (15, 0),
        KvError::Auth(a) => (AUTH_CODE, auth_code(a)),
    }
}

/// The outcome code of every auth error; the argument says which.
const AUTH_CODE: u8 = 16;

/// Every auth error, in the order that numbers them in an encoded outcome. Append only: the
/// numbers travel between members of different versions.
const AUTH_ERRORS: [AuthError; 18] = [
    AuthError::RootUserNotExist,
    AuthError::RootRoleNotExist,
    AuthError::UserAlreadyExist,
    AuthError::UserEmpty,
    AuthError::UserNotFound,
    AuthError::RoleAlreadyExist,
    AuthError::RoleNotFound,
    AuthError::RoleEmpty,
    AuthError::AuthFailed,
    AuthError::PermissionNotGiven,
    AuthError::PermissionDenied,
    AuthError::RoleNotGranted,
    AuthError::PermissionNotGranted,
    AuthError::AuthNotEnabled,
    AuthError::InvalidAuthToken,
    AuthError::InvalidAuthMgmt,
    AuthError::AuthOldRevision,
    AuthError::NoPasswordUser,
];

fn auth_code(e: &AuthError) -> i64 {
    AUTH_ERRORS
        .iter()
        .position(|a| a == e)
        .map_or(-1, |i| i as i64)
}

fn error_from_code(code: u8, arg: i64) -> Option<KvError> {
    Some(match code {
        1 => KvError::EmptyKey,
        2 => KvError::KeyNotFound,
        3 => KvError::ValueProvided,
        4 => KvError::LeaseProvided,
        5 => KvError::TooManyOps,
        6 => KvError::DuplicateKey,
        7 => KvError::RequestTooLarge,
        8 => KvError::InvalidSortOption,
        9 => KvError::Compacted {
            compact_revision: arg,
        },
        10 => KvError::FutureRevision,
        11 => KvError::LeaseNotFound,
        12 => KvError::NoSpace,
        13 => KvError::LeaseExists,
        14 => KvError::LeaseTtlTooLarge,
        15 => KvError::TxnTooDeep,
        AUTH_CODE => KvError::Auth(AUTH_ERRORS.get(usize::try_from(arg).ok()?).cloned()?),
        _ => return None,
    })
}

/// Encodes an outcome for the trip back from the state machine to the proposer.
pub fn encode_outcome(outcome: &Outcome) -> Vec<u8> {
    match outcome {
        Ok(resp) => {
            let mut out = Vec::with_capacity(1 + resp.encoded_len());
            out.push(OK);
            out.extend_from_slice(&resp.encode_to_vec());
            out
        }
        Err(e) => {
            let (code, arg) = error_code(e);
            let mut out = vec![ERR, code];
            out.extend_from_slice(&arg.to_be_bytes());
            out
        }
    }
}

/// Decodes bytes from [`encode_outcome`].
pub fn decode_outcome(bytes: &[u8]) -> Result<Outcome, EngineError> {
    let bad = || EngineError::Corrupt("undecodable apply outcome".into());
    match bytes.split_first() {
        Some((&OK, body)) => Ok(Ok(InternalResponse::decode(body).map_err(|_| bad())?)),
        Some((&ERR, rest)) if rest.len() == 9 => {
            let arg = i64::from_be_bytes(rest[1..].try_into().map_err(|_| bad())?);
            error_from_code(rest[0], arg).map(Err).ok_or_else(bad)
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::PutResponse;
    use crate::proto::kvserverpb::internal_response::Response;

    #[test]
    fn outcomes_round_trip() {
        let ok: Outcome = Ok(InternalResponse {
            response: Some(Response::Put(PutResponse::default())),
        });
        assert_eq!(decode_outcome(&encode_outcome(&ok)).unwrap(), ok);
        for code in 1..=14u8 {
            let e = error_from_code(code, 77).unwrap();
            let out: Outcome = Err(e);
            assert_eq!(decode_outcome(&encode_outcome(&out)).unwrap(), out);
        }
        for e in AUTH_ERRORS {
            let out: Outcome = Err(KvError::Auth(e));
            assert_eq!(decode_outcome(&encode_outcome(&out)).unwrap(), out);
        }
        assert!(decode_outcome(&[ERR, AUTH_CODE, 0, 0, 0, 0, 0, 0, 0, 18]).is_err());
        assert!(decode_outcome(&[]).is_err());
        assert!(decode_outcome(&[1, 99, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
