//! Request checks done before a request is proposed, as etcd's `v3rpc/key.go`: cheap, and
//! they keep malformed requests out of the log entirely.

use std::collections::BTreeSet;

use crate::error::KvError;
use crate::proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    range_request::{SortOrder, SortTarget},
    request_op::Request,
};

/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

/// Checks a Range.
pub fn check_range(r: &RangeRequest) -> Result<(), KvError> {
    if r.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if SortOrder::try_from(r.sort_order).is_err() || SortTarget::try_from(r.sort_target).is_err() {
        return Err(KvError::InvalidSortOption);
    }
    Ok(())
}

/// Checks a Put.
pub fn check_put(r: &PutRequest) -> Result<(), KvError> {
    if r.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(KvError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(KvError::LeaseProvided);
    }
    Ok(())
}

/// Checks a DeleteRange.
pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), KvError> {
    if r.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_ops: usize, depth: usize) -> Result<(), KvError> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(r)) => check_txn_ops(r, max_ops, depth + 1),
        // An empty op is refused the way etcd refuses it.
        None => Err(KvError::KeyNotFound),
    }
}

fn check_txn_ops(r: &TxnRequest, max_ops: usize, depth: usize) -> Result<(), KvError> {
    if depth > MAX_TXN_DEPTH {
        return Err(KvError::TxnTooDeep);
    }
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len());
    if ops > max_ops {
        return Err(KvError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(KvError::EmptyKey);
    }
    // Nested txns share the budget, as in etcd.
    for op in r.success.iter().chain(&r.failure) {
        check_op(op, max_ops - ops, depth)?;
    }
    Ok(())
}

/// The deepest txn nesting accepted (a txn in a txn is depth 2). etcd sets none, but a
/// write's txn travels the Raft log inside one more message, and the log's protobuf decoder
/// caps nesting at 100 messages, as the gRPC door's does: a txn accepted at the door at the
/// cap could not be applied, which stopped every member and kept them from restarting. 32
/// leaves room below the cap for both; no client nests txns anywhere near that deep.
pub const MAX_TXN_DEPTH: usize = 32;

/// A deleted key or span, for the overlap check.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Deleted {
    start: Vec<u8>,
    /// `None`: a single key; `Some(end)`: the span `[start, end)`.
    end: Option<Vec<u8>>,
}

impl Deleted {
    /// As etcd's interval tree sees it: the `range_end` is a plain bound, not decoded, so a
    /// from-key delete (`range_end = "\0"`) spans `[start, "\0")` and hits no key; etcd lets
    /// such a delete share a txn with puts of the keys it removes.
    fn hits(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == self.start.as_slice(),
            Some(end) => key >= self.start.as_slice() && key < end.as_slice(),
        }
    }
}

/// Puts and deletes of one branch list, for the overlap check.
struct Writes {
    puts: BTreeSet<Vec<u8>>,
    dels: Vec<Deleted>,
}

/// etcd's `checkIntervals`: within one branch (nested txns included) a key may be put once,
/// and not both put and deleted; the two branches of a nested txn may put the same key since
/// only one of them runs.
fn intervals(ops: &[RequestOp]) -> Result<Writes, KvError> {
    let mut dels: Vec<Deleted> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(Deleted {
                start: d.key.clone(),
                end: (!d.range_end.is_empty()).then(|| d.range_end.clone()),
            }),
            _ => None,
        })
        .collect();
    let mut puts = BTreeSet::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let then = intervals(&t.success)?;
        let other = intervals(&t.failure)?;
        for k in &then.puts {
            if puts.contains(k) || dels.iter().any(|d| d.hits(k)) {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &other.puts {
            if (puts.contains(k) && !then.puts.contains(k)) || dels.iter().any(|d| d.hits(k)) {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(then.dels);
        dels.extend(other.dels);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || dels.iter().any(|d| d.hits(&p.key)) {
            return Err(KvError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok(Writes { puts, dels })
}

/// Checks a Txn: op counts, empty keys, and overlapping writes in either branch.
pub fn check_txn(r: &TxnRequest, max_ops: usize) -> Result<(), KvError> {
    check_txn_ops(r, max_ops, 1)?;
    intervals(&r.success)?;
    intervals(&r.failure)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }

    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }

    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }

    /// A put inside `depth` txns, each with a compare (the deepest messages a txn holds).
    fn nested(depth: usize) -> TxnRequest {
        let compare = || crate::proto::etcdserverpb::Compare {
            key: b"c".to_vec(),
            ..Default::default()
        };
        let mut t = TxnRequest {
            compare: vec![compare()],
            success: vec![put("deep")],
            failure: vec![],
        };
        for _ in 1..depth {
            t = TxnRequest {
                compare: vec![compare()],
                success: vec![RequestOp {
                    request: Some(Request::RequestTxn(t)),
                }],
                failure: vec![],
            };
        }
        t
    }

    #[test]
    fn every_txn_accepted_can_be_decoded_from_the_raft_log() {
        use crate::proto::kvserverpb::{InternalRequest, internal_request};
        use prost::Message;
        let deepest = nested(MAX_TXN_DEPTH);
        assert_eq!(check_txn(&deepest, 128), Ok(()));
        let command = crate::command::encode_command(&InternalRequest {
            header: None,
            id: 1,
            request: Some(internal_request::Request::Txn(deepest)),
        });
        assert!(crate::command::decode_command(&command).is_ok());
        assert_eq!(
            check_txn(&nested(MAX_TXN_DEPTH + 1), 128),
            Err(KvError::TxnTooDeep)
        );
        // What the bug was: the gRPC door decodes a txn at its cap, the log cannot.
        let at_cap = (1..)
            .find(|&d| TxnRequest::decode(nested(d).encode_to_vec().as_slice()).is_err())
            .map(|d| d - 1)
            .expect("the decoder caps nesting");
        assert!(at_cap > MAX_TXN_DEPTH, "cap {at_cap}");
        let logged = crate::command::encode_command(&InternalRequest {
            header: None,
            id: 1,
            request: Some(internal_request::Request::Txn(nested(at_cap))),
        });
        assert!(crate::command::decode_command(&logged).is_err());
    }

    #[test]
    fn duplicate_puts_and_put_over_delete_are_refused() {
        let t = txn(vec![put("a"), put("a")], vec![]);
        assert_eq!(check_txn(&t, 128), Err(KvError::DuplicateKey));
        let t = txn(vec![del("a", "c"), put("b")], vec![]);
        assert_eq!(check_txn(&t, 128), Err(KvError::DuplicateKey));
        let t = txn(vec![del("a", "c"), put("c")], vec![]);
        assert_eq!(check_txn(&t, 128), Ok(()));
        let t = txn(vec![put("a")], vec![put("a")]);
        assert_eq!(check_txn(&t, 128), Ok(()));
        let t = txn(vec![del("a", ""), del("a", "")], vec![]);
        assert_eq!(check_txn(&t, 128), Ok(()));
    }

    /// etcd compares `range_end` bytes as they are in its overlap check, so a from-key delete
    /// overlaps nothing there: `put k` with `delete k..` in one txn is accepted.
    #[test]
    fn from_key_delete_does_not_overlap_puts() {
        let t = txn(vec![put("k"), del("k", "\0")], vec![]);
        assert_eq!(check_txn(&t, 128), Ok(()));
        let t = txn(vec![del("a", "\0"), put("b")], vec![]);
        assert_eq!(check_txn(&t, 128), Ok(()));
        let t = txn(vec![del("c", "a"), put("b")], vec![]);
        assert_eq!(check_txn(&t, 128), Ok(()));
        let t = txn(vec![del("a", "c"), put("b")], vec![]);
        assert_eq!(check_txn(&t, 128), Err(KvError::DuplicateKey));
    }

    #[test]
    fn nested_branches_may_share_keys_but_not_with_the_parent() {
        let inner = txn(vec![put("x")], vec![put("x")]);
        let nested = RequestOp {
            request: Some(Request::RequestTxn(inner.clone())),
        };
        assert_eq!(check_txn(&txn(vec![nested.clone()], vec![]), 128), Ok(()));
        assert_eq!(
            check_txn(&txn(vec![nested, put("x")], vec![]), 128),
            Err(KvError::DuplicateKey)
        );
    }

    #[test]
    fn op_limits_and_empty_keys() {
        let many: Vec<_> = (0..129).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(check_txn(&txn(many, vec![]), 128), Err(KvError::TooManyOps));
        assert_eq!(
            check_txn(&txn(vec![put("")], vec![]), 128),
            Err(KvError::EmptyKey)
        );
        assert_eq!(
            check_txn(&txn(vec![RequestOp { request: None }], vec![]), 128),
            Err(KvError::KeyNotFound)
        );
        let bad = PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ignore_value: true,
            ..Default::default()
        };
        assert_eq!(check_put(&bad), Err(KvError::ValueProvided));
    }
}
