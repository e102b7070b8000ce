//! etcd's request semantics over the MVCC store: Range (filters, sort, limit), Put, DeleteRange,
//! Txn (compares, branches, nested txns) and Compaction, producing etcd's protobuf responses.
//! Headers carry only the revision here; the server fills in cluster, member and term.

use std::cmp::Ordering;

use crate::error::{Error as Failure, KvError};
use crate::key_index::KeyRange;
use crate::mvcc::{Mvcc, RangeOptions, RangeResult, Source, WriteTxn};
use crate::proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    response_op::Response,
};
use crate::proto::mvccpb::KeyValue;

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// Sorting, filtering and limiting of a range result, as etcd's `applierV3backend.Range`.
fn finish_range(req: &RangeRequest, rr: RangeResult) -> Result<RangeResponse, KvError> {
    let mut kvs = rr.kvs;
    let keep = |kv: &KeyValue| {
        (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
            && (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
            && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
            && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
    };
    kvs.retain(keep);
    let target = SortTarget::try_from(req.sort_target).map_err(|_| KvError::InvalidSortOption)?;
    let mut order = SortOrder::try_from(req.sort_order).map_err(|_| KvError::InvalidSortOption)?;
    if target != SortTarget::Key && order == SortOrder::None {
        // The index yields key order; any other target defaults to ascending.
        order = SortOrder::Ascend;
    }
    if order != SortOrder::None {
        let by = |a: &KeyValue, b: &KeyValue| -> Ordering {
            match target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        // Stable, so ties keep key order (etcd's sort.Sort is not stable; key order is the
        // natural tie-break a client can rely on).
        match order {
            SortOrder::Descend => kvs.sort_by(|a, b| by(b, a)),
            _ => kvs.sort_by(by),
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header: header(rr.rev),
        kvs,
        more,
        count: rr.count,
    })
}

/// The engine-level options a `RangeRequest` needs: with sorting or filters every key is
/// loaded, otherwise one more than the limit (to learn `more`).
fn range_options(req: &RangeRequest) -> RangeOptions {
    let whole = req.sort_order != SortOrder::None as i32
        || req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    let limit = if whole || req.limit <= 0 {
        0
    } else {
        req.limit.saturating_add(1)
    };
    RangeOptions {
        rev: req.revision,
        limit,
        count_only: req.count_only,
    }
}

/// Serves a Range outside any transaction, at revision `cur`.
pub(crate) fn range(
    mvcc: &Mvcc,
    src: &Source<'_>,
    req: &RangeRequest,
) -> Result<RangeResponse, Failure> {
    let rr = mvcc.range(
        src,
        KeyRange::new(&req.key, &req.range_end),
        range_options(req),
        mvcc.current,
    )?;
    Ok(finish_range(req, rr)?)
}

fn txn_range(txn: &WriteTxn<'_>, req: &RangeRequest) -> Result<RangeResponse, Failure> {
    let rr = txn.range(KeyRange::new(&req.key, &req.range_end), range_options(req))?;
    Ok(finish_range(req, rr)?)
}

fn put(txn: &mut WriteTxn<'_>, req: &PutRequest) -> Result<PutResponse, Failure> {
    let mut prev = None;
    if req.ignore_value || req.ignore_lease || req.prev_kv {
        let rr = txn.range(KeyRange::Single(&req.key), RangeOptions::default())?;
        prev = rr.kvs.into_iter().next();
    }
    if (req.ignore_value || req.ignore_lease) && prev.is_none() {
        return Err(KvError::KeyNotFound.into());
    }
    let value = match (&prev, req.ignore_value) {
        (Some(p), true) => p.value.clone(),
        _ => req.value.clone().into(),
    };
    let lease = match (&prev, req.ignore_lease) {
        (Some(p), true) => p.lease,
        _ => req.lease,
    };
    let rev = txn.put(&req.key, value, lease);
    Ok(PutResponse {
        header: header(rev),
        prev_kv: if req.prev_kv { prev } else { None },
    })
}

fn delete_range(
    txn: &mut WriteTxn<'_>,
    req: &DeleteRangeRequest,
) -> Result<DeleteRangeResponse, Failure> {
    let range = KeyRange::new(&req.key, &req.range_end);
    let prev_kvs = if req.prev_kv {
        txn.range(range, RangeOptions::default())?.kvs
    } else {
        Vec::new()
    };
    let (deleted, rev) = txn.delete_range(range);
    Ok(DeleteRangeResponse {
        header: header(rev),
        deleted,
        prev_kvs,
    })
}

/// Applies a standalone Put.
pub(crate) fn apply_put(txn: &mut WriteTxn<'_>, req: &PutRequest) -> Result<PutResponse, Failure> {
    if !txn.mvcc.leases.usable(req.lease) {
        return Err(KvError::LeaseNotFound.into());
    }
    put(txn, req)
}

/// Applies a standalone DeleteRange.
pub(crate) fn apply_delete(
    txn: &mut WriteTxn<'_>,
    req: &DeleteRangeRequest,
) -> Result<DeleteRangeResponse, Failure> {
    delete_range(txn, req)
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    // An unknown target compares as equal: etcd's `compareKV` leaves its result at 0.
    let Ok(target) = CompareTarget::try_from(c.target) else {
        return compare_result(c, Ordering::Equal);
    };
    let ord = match target {
        CompareTarget::Value => {
            let v: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value[..].cmp(v)
        }
        _ => {
            let want = match (&c.target_union, target) {
                (Some(TargetUnion::CreateRevision(v)), CompareTarget::Create)
                | (Some(TargetUnion::ModRevision(v)), CompareTarget::Mod)
                | (Some(TargetUnion::Version(v)), CompareTarget::Version)
                | (Some(TargetUnion::Lease(v)), CompareTarget::Lease) => *v,
                _ => 0,
            };
            let have = match target {
                CompareTarget::Create => kv.create_revision,
                CompareTarget::Mod => kv.mod_revision,
                CompareTarget::Version => kv.version,
                CompareTarget::Lease => kv.lease,
                CompareTarget::Value => unreachable!("handled above"),
            };
            have.cmp(&want)
        }
    };
    compare_result(c, ord)
}

/// Whether `ord` (the key's side against the compare's value) satisfies the compare.
fn compare_result(c: &Compare, ord: Ordering) -> bool {
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ord != Ordering::Equal,
        Ok(CompareResult::Greater) => ord == Ordering::Greater,
        Ok(CompareResult::Less) => ord == Ordering::Less,
        Err(_) => true,
    }
}

/// Reads a key range for compares: the txn's own view, or the store's current state.
type Ranger<'a> = dyn Fn(KeyRange<'_>, RangeOptions) -> Result<RangeResult, Failure> + 'a;

/// One compare against the txn's starting state. A compare over a missing key uses a zero
/// key-value, except that a value compare on a missing key always fails (as etcd).
fn compare(range: &Ranger<'_>, c: &Compare) -> Result<bool, Failure> {
    let rr = match range(KeyRange::new(&c.key, &c.range_end), RangeOptions::default()) {
        Ok(rr) => rr,
        Err(Failure::Request(_)) => return Ok(false),
        Err(e) => return Err(e),
    };
    if rr.kvs.is_empty() {
        return Ok(c.target != CompareTarget::Value as i32 && compare_kv(c, &KeyValue::default()));
    }
    Ok(rr.kvs.iter().all(|kv| compare_kv(c, kv)))
}

/// Evaluates every compare of the txn tree before anything is written: the branch taken by
/// each txn, in depth-first order (etcd's `compareToPath`).
fn txn_path(range: &Ranger<'_>, req: &TxnRequest, path: &mut Vec<bool>) -> Result<(), Failure> {
    let mut ok = true;
    for c in &req.compare {
        if !compare(range, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    let ops = if ok { &req.success } else { &req.failure };
    for op in ops {
        if let Some(Request::RequestTxn(inner)) = &op.request {
            txn_path(range, inner, path)?;
        }
    }
    Ok(())
}

/// Visits the ops of the chosen branches (nested txns descended into, not visited) with
/// `check`, against the starting state, so a txn fails whole before any write.
fn check_branches(
    txn: &WriteTxn<'_>,
    req: &TxnRequest,
    path: &[bool],
    pos: &mut usize,
    check: fn(&WriteTxn<'_>, &RequestOp) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let ok = path[*pos];
    *pos += 1;
    for op in if ok { &req.success } else { &req.failure } {
        match &op.request {
            Some(Request::RequestTxn(inner)) => check_branches(txn, inner, path, pos, check)?,
            _ => check(txn, op)?,
        }
    }
    Ok(())
}

/// etcd's `checkPut`: `ignore_*` on a missing key, unknown leases.
fn check_put(txn: &WriteTxn<'_>, op: &RequestOp) -> Result<(), Failure> {
    let Some(Request::RequestPut(p)) = &op.request else {
        return Ok(());
    };
    if p.ignore_value || p.ignore_lease {
        let rr = txn.range(KeyRange::Single(&p.key), RangeOptions::default())?;
        if rr.kvs.is_empty() {
            return Err(KvError::KeyNotFound.into());
        }
    }
    if !txn.mvcc.leases.usable(p.lease) {
        return Err(KvError::LeaseNotFound.into());
    }
    Ok(())
}

/// etcd's `checkRange`: reads of future or compacted revisions.
fn check_range(txn: &WriteTxn<'_>, op: &RequestOp) -> Result<(), Failure> {
    let Some(Request::RequestRange(r)) = &op.request else {
        return Ok(());
    };
    if r.revision == 0 {
        return Ok(());
    }
    if r.revision > txn.begin_rev() {
        return Err(KvError::FutureRevision.into());
    }
    if r.revision < txn.compacted() {
        return Err(KvError::Compacted {
            compact_revision: txn.compacted(),
        }
        .into());
    }
    Ok(())
}

fn run_branch(
    txn: &mut WriteTxn<'_>,
    req: &TxnRequest,
    path: &[bool],
    pos: &mut usize,
) -> Result<TxnResponse, Failure> {
    let ok = path[*pos];
    *pos += 1;
    let ops: &[RequestOp] = if ok { &req.success } else { &req.failure };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => Some(Response::ResponseRange(txn_range(txn, r)?)),
            Some(Request::RequestPut(p)) => Some(Response::ResponsePut(put(txn, p)?)),
            Some(Request::RequestDeleteRange(d)) => {
                Some(Response::ResponseDeleteRange(delete_range(txn, d)?))
            }
            Some(Request::RequestTxn(inner)) => {
                Some(Response::ResponseTxn(run_branch(txn, inner, path, pos)?))
            }
            None => None,
        };
        responses.push(ResponseOp { response });
    }
    Ok(TxnResponse {
        header: Some(ResponseHeader::default()),
        succeeded: ok,
        responses,
    })
}

/// Applies a Txn: compares on the starting state, checks, then runs the chosen branches in one
/// revision. Nested txn headers carry no revision, as in etcd.
pub(crate) fn apply_txn(txn: &mut WriteTxn<'_>, req: &TxnRequest) -> Result<TxnResponse, Failure> {
    let mut path = Vec::new();
    txn_path(&|r, o| txn.range(r, o), req, &mut path)?;
    // As etcd: every put of the whole tree is checked before any range, so when both kinds
    // would fail, the put's error is the one reported.
    check_branches(txn, req, &path, &mut 0, check_put)?;
    check_branches(txn, req, &path, &mut 0, check_range)?;
    run_branch(txn, req, &path, &mut 0)
}

/// Runs the txn as a read if the branches its compares choose now write nothing (a failed
/// compare-and-swap, a lost race for a key): the response, or None if the chosen path writes.
pub(crate) fn txn_as_read(
    txn: &mut WriteTxn<'_>,
    req: &TxnRequest,
) -> Result<Option<TxnResponse>, Failure> {
    let mut path = Vec::new();
    txn_path(&|r, o| txn.range(r, o), req, &mut path)?;
    if path_writes(req, &path, &mut 0) {
        return Ok(None);
    }
    check_branches(txn, req, &path, &mut 0, check_range)?;
    run_branch(txn, req, &path, &mut 0).map(Some)
}

/// True when the branches the txn's compares choose at `mvcc`'s current revision would write.
pub(crate) fn txn_would_write(
    mvcc: &Mvcc,
    src: &Source<'_>,
    req: &TxnRequest,
) -> Result<bool, Failure> {
    let mut path = Vec::new();
    txn_path(&|r, o| mvcc.range(src, r, o, mvcc.current), req, &mut path)?;
    Ok(path_writes(req, &path, &mut 0))
}

/// True when an op of the chosen branches (nested txns descended into) writes.
fn path_writes(req: &TxnRequest, path: &[bool], pos: &mut usize) -> bool {
    let ok = path[*pos];
    *pos += 1;
    let mut writes = false;
    for op in if ok { &req.success } else { &req.failure } {
        writes |= match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => true,
            // Descended into even after a write was found, to keep `pos` in step.
            Some(Request::RequestTxn(inner)) => path_writes(inner, path, pos),
            _ => false,
        };
    }
    writes
}

/// True when no branch of the txn (at any depth) writes.
pub fn txn_is_read_only(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(&req.failure)
        .all(|op| match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => false,
            Some(Request::RequestTxn(inner)) => txn_is_read_only(inner),
            _ => true,
        })
}

/// Whether every read in `req` (at any depth) is of one key: a read that costs microseconds
/// whatever the store holds, so a server may answer it without leaving its async worker.
pub fn txn_reads_single_keys(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(&req.failure)
        .all(|op| match &op.request {
            Some(Request::RequestRange(r)) => r.range_end.is_empty(),
            Some(Request::RequestTxn(inner)) => txn_reads_single_keys(inner),
            _ => true,
        })
}

#[cfg(test)]
mod tests {
    use crate::backend::MemoryBackend;
    use crate::error::KvError;
    use crate::proto::etcdserverpb::request_op::Request;
    use crate::proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest};
    use crate::proto::kvserverpb::{InternalRequest, internal_request};
    use crate::store::{Store, StoreConfig};

    /// A store of one member over a memory backend, without a quota.
    fn memory_store() -> Store {
        let config = StoreConfig {
            member_id: 1,
            quota_bytes: 0,
        };
        Store::open(Box::new(MemoryBackend::new()), config).unwrap()
    }

    fn apply_txn(store: &Store, index: u64, txn: TxnRequest) -> Result<(), KvError> {
        let cmd = InternalRequest {
            header: None,
            id: index,
            request: Some(internal_request::Request::Txn(txn)),
        };
        let mut out = store.apply_batch(&[(index, Some(cmd))], b"meta").unwrap();
        out.pop().unwrap().map(|_| ())
    }

    #[test]
    fn only_txns_reading_single_keys_at_every_depth_count_as_single_key_reads() {
        use super::txn_reads_single_keys;
        let get = |key: &[u8], end: &[u8]| RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: key.to_vec(),
                range_end: end.to_vec(),
                ..Default::default()
            })),
        };
        let put = RequestOp {
            request: Some(Request::RequestPut(PutRequest::default())),
        };
        let nested = |ops: Vec<RequestOp>| RequestOp {
            request: Some(Request::RequestTxn(TxnRequest {
                success: ops,
                ..Default::default()
            })),
        };
        let txn = |success: Vec<RequestOp>, failure: Vec<RequestOp>| TxnRequest {
            success,
            failure,
            ..Default::default()
        };
        assert!(txn_reads_single_keys(&txn(vec![], vec![])));
        assert!(txn_reads_single_keys(&txn(
            vec![put.clone(), get(b"a", b"")],
            vec![nested(vec![get(b"b", b"")])]
        )));
        assert!(!txn_reads_single_keys(&txn(vec![get(b"a", b"b")], vec![])));
        assert!(!txn_reads_single_keys(&txn(
            vec![],
            vec![nested(vec![get(b"a", b"\0")])]
        )));
    }

    /// etcd's `compareKV` leaves the result at 0 for a target it does not know, so such a
    /// compare holds for EQUAL (and fails for NOT_EQUAL) whatever the key holds.
    #[test]
    fn compare_with_unknown_target_is_equal() {
        use super::compare_kv;
        use crate::proto::etcdserverpb::{
            Compare,
            compare::{CompareResult, TargetUnion},
        };
        use crate::proto::mvccpb::KeyValue;
        let kv = KeyValue {
            key: b"k".to_vec().into(),
            version: 3,
            create_revision: 2,
            mod_revision: 4,
            ..Default::default()
        };
        let mut c = Compare {
            result: CompareResult::Equal as i32,
            target: 9,
            key: b"k".to_vec(),
            target_union: Some(TargetUnion::Version(7)),
            range_end: vec![],
        };
        assert!(compare_kv(&c, &kv));
        c.result = CompareResult::NotEqual as i32;
        assert!(!compare_kv(&c, &kv));
    }

    /// A txn is a read exactly when the branches its compares choose write nothing; served
    /// as one, it answers as applying it would and changes nothing.
    #[test]
    fn txn_as_read_serves_only_paths_that_write_nothing() {
        use crate::proto::etcdserverpb::{
            Compare,
            compare::{CompareResult, CompareTarget, TargetUnion},
            response_op::Response,
        };
        let store = memory_store();
        let put = |key: &[u8]| RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
        };
        let get = |key: &[u8]| RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })),
        };
        let absent = |key: &[u8]| Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Create as i32,
            key: key.to_vec(),
            target_union: Some(TargetUnion::CreateRevision(0)),
            range_end: vec![],
        };
        apply_txn(
            &store,
            1,
            TxnRequest {
                success: vec![put(b"a")],
                ..Default::default()
            },
        )
        .unwrap();
        let revision = store.revision();

        // "Create a unless it exists, else read it": a exists, so this is a read.
        let create_a = TxnRequest {
            compare: vec![absent(b"a")],
            success: vec![put(b"a")],
            failure: vec![get(b"a")],
        };
        let resp = store.txn_as_read(&create_a).unwrap().expect("a read");
        assert!(!resp.succeeded);
        assert_eq!(resp.header.unwrap().revision, revision);
        match &resp.responses[0].response {
            Some(Response::ResponseRange(r)) => assert_eq!(r.kvs[0].key, &b"a"[..]),
            other => panic!("not the read of a: {other:?}"),
        }
        assert!(!store.txn_would_write(&create_a).unwrap());

        // The same for b, which is absent: it writes.
        let create_b = TxnRequest {
            compare: vec![absent(b"b")],
            success: vec![put(b"b")],
            failure: vec![get(b"b")],
        };
        assert!(store.txn_as_read(&create_b).unwrap().is_none());
        assert!(store.txn_would_write(&create_b).unwrap());

        // Nested: the outer compare fails and its failure branch holds a txn whose compare
        // holds and writes; and one whose nested failure branch only reads.
        let nested = |inner: TxnRequest| TxnRequest {
            compare: vec![absent(b"a")],
            success: vec![put(b"a")],
            failure: vec![RequestOp {
                request: Some(Request::RequestTxn(inner)),
            }],
        };
        assert!(
            store
                .txn_as_read(&nested(create_b.clone()))
                .unwrap()
                .is_none()
        );
        let read = store
            .txn_as_read(&nested(create_a))
            .unwrap()
            .expect("a read");
        assert!(!read.succeeded);
        assert_eq!(store.revision(), revision);
        assert!(
            store
                .range(&RangeRequest {
                    key: b"b".to_vec(),
                    ..Default::default()
                })
                .unwrap()
                .kvs
                .is_empty()
        );
    }

    /// etcd checks every put of a txn (whole tree) before any range: a txn with both an
    /// unknown lease and a future-revision read fails on the lease, wherever the read sits.
    #[test]
    fn txn_checks_puts_before_ranges() {
        let store = memory_store();
        let future_read = RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: b"a".to_vec(),
                revision: 100,
                ..Default::default()
            })),
        };
        let bad_lease = RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: b"b".to_vec(),
                lease: 12345,
                ..Default::default()
            })),
        };
        let missing_ignore = RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: b"c".to_vec(),
                ignore_lease: true,
                ..Default::default()
            })),
        };
        let flat = TxnRequest {
            compare: vec![],
            success: vec![future_read.clone(), bad_lease],
            failure: vec![],
        };
        assert_eq!(apply_txn(&store, 1, flat), Err(KvError::LeaseNotFound));
        let nested_read = RequestOp {
            request: Some(Request::RequestTxn(TxnRequest {
                compare: vec![],
                success: vec![future_read.clone()],
                failure: vec![],
            })),
        };
        let nested = TxnRequest {
            compare: vec![],
            success: vec![nested_read, missing_ignore],
            failure: vec![],
        };
        assert_eq!(apply_txn(&store, 2, nested), Err(KvError::KeyNotFound));
        let only_read = TxnRequest {
            compare: vec![],
            success: vec![future_read],
            failure: vec![],
        };
        assert_eq!(
            apply_txn(&store, 3, only_read),
            Err(KvError::FutureRevision)
        );
        assert_eq!(store.revision(), 1);
    }
}
