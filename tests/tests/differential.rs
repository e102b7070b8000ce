//! Differential test against etcd 3.4: the same sequence of KV and Maintenance requests goes to
//! a fresh etcd and a fresh kv-server, and every response is compared field by field.
//!
//! Both stores start empty at revision 1, so revisions must agree exactly. What differs by
//! design is ignored: the header's cluster and member ids and its Raft term (checked non-zero
//! instead), Status' version, indexes and sizes, and HashKV's hash (the storage formats
//! differ). Errors are compared by gRPC code and exact message.
//!
//! To extend the sequence, add a [`Step`]. Steps in [`steps`] use fixed revisions (noted in
//! `// rev N` comments), so new writes go at its end; [`compaction_steps`] derives its
//! revisions from the revision reached.

use std::time::Duration;

use kv_core::proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, Compare,
    DeleteRangeRequest, DeleteRangeResponse, HashKvRequest, HashKvResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseHeader, StatusRequest,
    StatusResponse, TxnRequest, TxnResponse,
    alarm_request::AlarmAction,
    compare::{CompareResult, CompareTarget, TargetUnion},
    kv_client::KvClient,
    maintenance_client::MaintenanceClient,
    range_request::{SortOrder, SortTarget},
    request_op::Request,
};
use kv_tests::{Proc, start_etcd, start_kv_server};
use tonic::Code;
use tonic::transport::Channel;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The whole test must finish within this.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// etcd's default `--max-request-bytes` (1.5 MiB).
const MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// Steps where kv-server is known to differ from etcd, with why. Such a step's mismatch is
/// printed but does not fail the test; once it agrees, the test fails until the entry is
/// removed, so this list cannot go stale.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[];

/// One request of the sequence.
#[derive(Debug, Clone)]
enum Op {
    Put(PutRequest),
    Range(RangeRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    HashKv(HashKvRequest),
    Alarm(AlarmRequest),
    Status,
}

/// How the two answers are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Field by field (minus what differs by design); errors by code and message.
    Exact,
    /// As `Exact`, and the header revision must equal the previous step's.
    RevisionUnchanged,
    /// Both must fail with this gRPC code; the messages are not compared (transport text).
    Code(Code),
}

struct Step {
    name: String,
    op: Op,
    check: Check,
}

fn step(name: impl Into<String>, op: Op) -> Step {
    Step {
        name: name.into(),
        op,
        check: Check::Exact,
    }
}

fn step_with(name: impl Into<String>, op: Op, check: Check) -> Step {
    Step {
        name: name.into(),
        op,
        check,
    }
}

// ---- request builders ----------------------------------------------------------------------

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

fn range(key: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        range_end: end.into(),
        ..Default::default()
    }
}

fn get(key: &str) -> RangeRequest {
    range(key, "")
}

fn del(key: &str, end: &str) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: key.into(),
        range_end: end.into(),
        ..Default::default()
    }
}

fn op_put(p: PutRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(p)),
    }
}

fn op_range(r: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(r)),
    }
}

fn op_del(d: DeleteRangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(d)),
    }
}

fn op_txn(t: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestTxn(t)),
    }
}

fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare,
        success,
        failure,
    }
}

fn cmp(key: &str, result: CompareResult, target: TargetUnion) -> Compare {
    let t = match target {
        TargetUnion::Version(_) => CompareTarget::Version,
        TargetUnion::CreateRevision(_) => CompareTarget::Create,
        TargetUnion::ModRevision(_) => CompareTarget::Mod,
        TargetUnion::Value(_) => CompareTarget::Value,
        TargetUnion::Lease(_) => CompareTarget::Lease,
    };
    Compare {
        result: result as i32,
        target: t as i32,
        key: key.into(),
        target_union: Some(target),
        range_end: vec![],
    }
}

fn cmp_range(key: &str, end: &str, result: CompareResult, target: TargetUnion) -> Compare {
    Compare {
        range_end: end.into(),
        ..cmp(key, result, target)
    }
}

fn value(v: &str) -> TargetUnion {
    TargetUnion::Value(v.into())
}

fn compact(revision: i64, physical: bool) -> Op {
    Op::Compact(CompactionRequest { revision, physical })
}

// ---- the sequence --------------------------------------------------------------------------

/// Every request of the test, in order. Revisions are noted where a step depends on them; the
/// store starts at revision 1.
fn steps() -> Vec<Step> {
    use CompareResult::{Equal, Greater, Less, NotEqual};
    let mut s = vec![
        step(
            "alarm get on a fresh server",
            Op::Alarm(AlarmRequest {
                action: AlarmAction::Get as i32,
                ..Default::default()
            }),
        ),
        step("range on the empty store", Op::Range(range("\0", "\0"))),
        // ---- puts ----
        step("put a=1", Op::Put(put("a", "1"))), // rev 2
        step(
            "put a=2 with prev_kv",
            Op::Put(PutRequest {
                prev_kv: true,
                ..put("a", "2")
            }),
        ), // rev 3
        step(
            "put b=1 with prev_kv (no previous)",
            Op::Put(PutRequest {
                prev_kv: true,
                ..put("b", "1")
            }),
        ), // rev 4
        step(
            "put a ignore_value with prev_kv",
            Op::Put(PutRequest {
                ignore_value: true,
                prev_kv: true,
                ..put("a", "")
            }),
        ), // rev 5
        step(
            "put a=3 ignore_lease",
            Op::Put(PutRequest {
                ignore_lease: true,
                ..put("a", "3")
            }),
        ), // rev 6
        step(
            "put missing key with ignore_value",
            Op::Put(PutRequest {
                ignore_value: true,
                ..put("missing", "")
            }),
        ),
        step(
            "put missing key with ignore_lease",
            Op::Put(PutRequest {
                ignore_lease: true,
                ..put("missing", "x")
            }),
        ),
        step(
            "put ignore_value with a value",
            Op::Put(PutRequest {
                ignore_value: true,
                ..put("a", "x")
            }),
        ),
        step(
            "put ignore_lease with a lease",
            Op::Put(PutRequest {
                ignore_lease: true,
                lease: 5,
                ..put("a", "x")
            }),
        ),
        step(
            "put with an unknown lease",
            Op::Put(PutRequest {
                lease: 12345,
                ..put("c", "x")
            }),
        ),
        step_with(
            "range after refused puts (revision unchanged)",
            Op::Range(get("a")),
            Check::RevisionUnchanged,
        ),
        step("put empty key", Op::Put(put("", "x"))),
        step("range empty key", Op::Range(get(""))),
        step("delete empty key", Op::Delete(del("", ""))),
        step("range empty key with range_end", Op::Range(range("", "z"))),
        step("put empty value", Op::Put(put("empty", ""))), // rev 7
        step("get empty value", Op::Range(get("empty"))),
        // ---- data for ranges: no ties in any sort target ----
        // Final state: key   value create mod version
        //              s/a   q     9      17  4
        //              s/b   b     11     13  3
        //              s/c   m     8      8   1
        //              s/d   z     10     14  2
        step("put s/c", Op::Put(put("s/c", "m"))),  // rev 8
        step("put s/a", Op::Put(put("s/a", "a1"))), // rev 9
        step("put s/d", Op::Put(put("s/d", "d1"))), // rev 10
        step("put s/b", Op::Put(put("s/b", "b1"))), // rev 11
        step("put s/b again", Op::Put(put("s/b", "b2"))), // rev 12
        step("put s/b final", Op::Put(put("s/b", "b"))), // rev 13
        step("put s/d final", Op::Put(put("s/d", "z"))), // rev 14
        step("put s/a again", Op::Put(put("s/a", "a2"))), // rev 15
        step("put s/a again 2", Op::Put(put("s/a", "a3"))), // rev 16
        step("put s/a final", Op::Put(put("s/a", "q"))), // rev 17
        // ---- ranges ----
        step("range single key", Op::Range(get("s/a"))),
        step("range missing key", Op::Range(get("s/zz"))),
        step("range with range_end", Op::Range(range("s/a", "s/c"))),
        step("range prefix", Op::Range(range("s/", "s0"))),
        step("range from key", Op::Range(range("s/b", "\0"))),
        step("range all keys", Op::Range(range("\0", "\0"))),
        step("range_end below key", Op::Range(range("s/c", "s/a"))),
        step("range_end equal to key", Op::Range(range("s/c", "s/c"))),
        step(
            "range limit 2 (more)",
            Op::Range(RangeRequest {
                limit: 2,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range limit = count (no more)",
            Op::Range(RangeRequest {
                limit: 4,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range limit over count",
            Op::Range(RangeRequest {
                limit: 10,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range keys_only",
            Op::Range(RangeRequest {
                keys_only: true,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range count_only",
            Op::Range(RangeRequest {
                count_only: true,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range count_only with limit",
            Op::Range(RangeRequest {
                count_only: true,
                limit: 1,
                ..range("\0", "\0")
            }),
        ),
        step(
            "range keys_only and count_only",
            Op::Range(RangeRequest {
                count_only: true,
                keys_only: true,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range historical revision 11",
            Op::Range(RangeRequest {
                revision: 11,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range historical revision 2 single key",
            Op::Range(RangeRequest {
                revision: 2,
                ..get("a")
            }),
        ),
        step(
            "range revision 1 (empty store)",
            Op::Range(RangeRequest {
                revision: 1,
                ..range("\0", "\0")
            }),
        ),
        step(
            "range at the current revision",
            Op::Range(RangeRequest {
                revision: 17,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range at a future revision",
            Op::Range(RangeRequest {
                revision: 18,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range min_mod_revision",
            Op::Range(RangeRequest {
                min_mod_revision: 14,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range max_mod_revision",
            Op::Range(RangeRequest {
                max_mod_revision: 13,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range min_create_revision",
            Op::Range(RangeRequest {
                min_create_revision: 10,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range max_create_revision",
            Op::Range(RangeRequest {
                max_create_revision: 9,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range mod and create window",
            Op::Range(RangeRequest {
                min_mod_revision: 8,
                max_mod_revision: 14,
                min_create_revision: 9,
                max_create_revision: 11,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range filter with limit (more)",
            Op::Range(RangeRequest {
                min_create_revision: 9,
                limit: 1,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range filter that keeps nothing",
            Op::Range(RangeRequest {
                min_mod_revision: 100,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range serializable",
            Op::Range(RangeRequest {
                serializable: true,
                ..range("s/", "s0")
            }),
        ),
        step(
            "range serializable historical",
            Op::Range(RangeRequest {
                serializable: true,
                revision: 12,
                ..get("s/b")
            }),
        ),
    ];
    for target in [
        SortTarget::Key,
        SortTarget::Version,
        SortTarget::Create,
        SortTarget::Mod,
        SortTarget::Value,
    ] {
        for order in [SortOrder::None, SortOrder::Ascend, SortOrder::Descend] {
            s.push(step(
                format!(
                    "range sort {} {} limit 3",
                    target.as_str_name(),
                    order.as_str_name()
                ),
                Op::Range(RangeRequest {
                    sort_target: target as i32,
                    sort_order: order as i32,
                    limit: 3,
                    ..range("s/", "s0")
                }),
            ));
        }
    }
    s.push(step(
        "range sort VALUE DESCEND keys_only",
        Op::Range(RangeRequest {
            sort_target: SortTarget::Value as i32,
            sort_order: SortOrder::Descend as i32,
            keys_only: true,
            ..range("s/", "s0")
        }),
    ));

    // ---- deletes ----
    s.extend([
        step(
            "delete single key with prev_kv",
            Op::Delete(DeleteRangeRequest {
                prev_kv: true,
                ..del("b", "")
            }),
        ), // rev 18
        step("get deleted key", Op::Range(get("b"))),
        step(
            "get deleted key at an earlier revision",
            Op::Range(RangeRequest {
                revision: 17,
                ..get("b")
            }),
        ),
        step_with(
            "delete missing key",
            Op::Delete(del("nope", "")),
            Check::RevisionUnchanged,
        ),
        step_with(
            "delete missing key with prev_kv",
            Op::Delete(DeleteRangeRequest {
                prev_kv: true,
                ..del("b", "")
            }),
            Check::RevisionUnchanged,
        ),
        step("put d/1", Op::Put(put("d/1", "1"))), // rev 19
        step("put d/2", Op::Put(put("d/2", "2"))), // rev 20
        step("put d/3", Op::Put(put("d/3", "3"))), // rev 21
        step("put d/4", Op::Put(put("d/4", "4"))), // rev 22
        step(
            "delete range with prev_kv",
            Op::Delete(DeleteRangeRequest {
                prev_kv: true,
                ..del("d/1", "d/3")
            }),
        ), // rev 23
        step(
            "delete prefix with prev_kv",
            Op::Delete(DeleteRangeRequest {
                prev_kv: true,
                ..del("d/", "d0")
            }),
        ), // rev 24
        step_with(
            "delete empty prefix",
            Op::Delete(DeleteRangeRequest {
                prev_kv: true,
                ..del("d/", "d0")
            }),
            Check::RevisionUnchanged,
        ),
        step("recreate d/1", Op::Put(put("d/1", "again"))), // rev 25: new generation
        step("get recreated key", Op::Range(get("d/1"))),
        step("put ~a", Op::Put(put("~a", "1"))), // rev 26
        step("put ~b", Op::Put(put("~b", "2"))), // rev 27
        step(
            "delete from key",
            Op::Delete(DeleteRangeRequest {
                prev_kv: true,
                ..del("~", "\0")
            }),
        ), // rev 28
        step("range deleted prefix", Op::Range(range("~", "\0"))),
        step(
            "range history of a deleted prefix",
            Op::Range(RangeRequest {
                revision: 27,
                ..range("~", "\0")
            }),
        ),
        step_with(
            "delete range_end below key",
            Op::Delete(del("s/c", "s/a")),
            Check::RevisionUnchanged,
        ),
    ]);

    // ---- txns ----
    s.extend([
        step("put t/a", Op::Put(put("t/a", "10"))), // rev 29
        step("put t/b", Op::Put(put("t/b", "20"))), // rev 30
        step(
            "txn value equal: success put and read",
            Op::Txn(txn(
                vec![cmp("t/a", Equal, value("10"))],
                vec![op_put(put("t/a", "11")), op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ), // rev 31
        step(
            "txn value equal fails: failure branch",
            Op::Txn(txn(
                vec![cmp("t/a", Equal, value("10"))],
                vec![op_put(put("t/a", "x"))],
                vec![op_range(get("t/a")), op_put(put("t/b", "21"))],
            )),
        ), // rev 32
        step(
            "txn value not equal",
            Op::Txn(txn(
                vec![cmp("t/a", NotEqual, value("10"))],
                vec![op_range(get("t/a"))],
                vec![],
            )),
        ),
        step(
            "txn value less",
            Op::Txn(txn(
                vec![cmp("t/a", Less, value("2"))],
                vec![op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn value greater",
            Op::Txn(txn(
                vec![cmp("t/b", Greater, value("200"))],
                vec![op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn version equal",
            Op::Txn(txn(
                vec![cmp("t/a", Equal, TargetUnion::Version(2))],
                vec![op_range(get("t/a"))],
                vec![],
            )),
        ),
        step(
            "txn version not equal",
            Op::Txn(txn(
                vec![cmp("t/a", NotEqual, TargetUnion::Version(2))],
                vec![],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn create less",
            Op::Txn(txn(
                vec![cmp("t/b", Less, TargetUnion::CreateRevision(30))],
                vec![],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn create equal",
            Op::Txn(txn(
                vec![cmp("t/b", Equal, TargetUnion::CreateRevision(30))],
                vec![op_range(get("t/b"))],
                vec![],
            )),
        ),
        step(
            "txn mod greater",
            Op::Txn(txn(
                vec![cmp("t/a", Greater, TargetUnion::ModRevision(30))],
                vec![op_range(get("t/a"))],
                vec![],
            )),
        ),
        step(
            "txn mod less fails",
            Op::Txn(txn(
                vec![cmp("t/a", Less, TargetUnion::ModRevision(31))],
                vec![op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn lease equal 0",
            Op::Txn(txn(
                vec![cmp("t/a", Equal, TargetUnion::Lease(0))],
                vec![op_range(get("t/a"))],
                vec![],
            )),
        ),
        step(
            "txn lease not equal 0",
            Op::Txn(txn(
                vec![cmp("t/a", NotEqual, TargetUnion::Lease(0))],
                vec![],
                vec![op_range(get("t/a"))],
            )),
        ),
        step(
            "txn lease greater",
            Op::Txn(txn(
                vec![cmp("t/a", Greater, TargetUnion::Lease(-1))],
                vec![op_range(get("t/a"))],
                vec![],
            )),
        ),
        step(
            "txn several compares all hold",
            Op::Txn(txn(
                vec![
                    cmp("t/a", Equal, value("11")),
                    cmp("t/b", Equal, value("21")),
                    cmp("t/a", Greater, TargetUnion::Version(1)),
                ],
                vec![op_range(range("t/", "t0"))],
                vec![],
            )),
        ),
        step(
            "txn several compares, last fails",
            Op::Txn(txn(
                vec![
                    cmp("t/a", Equal, value("11")),
                    cmp("t/b", Equal, value("nope")),
                ],
                vec![],
                vec![op_range(range("t/", "t0"))],
            )),
        ),
        step(
            "txn compare over a range holds for all",
            Op::Txn(txn(
                vec![cmp_range(
                    "t/",
                    "t0",
                    Greater,
                    TargetUnion::CreateRevision(28),
                )],
                vec![op_range(range("t/", "t0"))],
                vec![],
            )),
        ),
        step(
            "txn compare over a range fails for one",
            Op::Txn(txn(
                vec![cmp_range("t/", "t0", Equal, TargetUnion::Version(2))],
                vec![],
                vec![op_range(range("t/", "t0"))],
            )),
        ),
        step(
            "txn compare over a from-key range",
            Op::Txn(txn(
                vec![cmp_range("t/", "\0", Greater, TargetUnion::ModRevision(0))],
                vec![op_range(range("t/", "\0"))],
                vec![],
            )),
        ),
        step(
            "txn compare over an empty range, value",
            Op::Txn(txn(
                vec![cmp_range("x/", "x0", Equal, value(""))],
                vec![op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn compare missing key value fails",
            Op::Txn(txn(
                vec![cmp("t/none", Equal, value(""))],
                vec![op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn compare missing key value not equal fails",
            Op::Txn(txn(
                vec![cmp("t/none", NotEqual, value("x"))],
                vec![op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn compare missing key version 0 holds",
            Op::Txn(txn(
                vec![cmp("t/none", Equal, TargetUnion::Version(0))],
                vec![op_put(put("t/none", "created"))],
                vec![],
            )),
        ), // rev 33
        step(
            "txn compare missing key create 0 holds",
            Op::Txn(txn(
                vec![cmp("t/none2", Equal, TargetUnion::CreateRevision(0))],
                vec![op_range(get("t/none"))],
                vec![],
            )),
        ),
        step(
            "txn compare missing key mod less 1",
            Op::Txn(txn(
                vec![cmp("t/none2", Less, TargetUnion::ModRevision(1))],
                vec![op_range(get("t/none2"))],
                vec![],
            )),
        ),
        step(
            "txn compare missing key lease 0",
            Op::Txn(txn(
                vec![cmp("t/none2", Equal, TargetUnion::Lease(0))],
                vec![op_range(get("t/none2"))],
                vec![],
            )),
        ),
        step(
            "txn compare with no target value",
            Op::Txn(txn(
                vec![Compare {
                    result: Equal as i32,
                    target: CompareTarget::Version as i32,
                    key: "t/a".into(),
                    target_union: None,
                    range_end: vec![],
                }],
                vec![op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn compare target and value kind disagree",
            Op::Txn(txn(
                vec![Compare {
                    target: CompareTarget::Version as i32,
                    ..cmp("t/a", Equal, value("11"))
                }],
                vec![op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn compare with an unknown target",
            Op::Txn(txn(
                vec![Compare {
                    target: 9,
                    ..cmp("t/a", Equal, TargetUnion::Version(7))
                }],
                vec![op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn compare with an unknown result",
            Op::Txn(txn(
                vec![Compare {
                    result: 9,
                    ..cmp("t/a", Equal, TargetUnion::Version(7))
                }],
                vec![op_range(get("t/a"))],
                vec![op_range(get("t/b"))],
            )),
        ),
        step(
            "txn reads see the txn's earlier writes",
            Op::Txn(txn(
                vec![],
                vec![
                    op_range(range("t/", "t0")),
                    op_put(PutRequest {
                        prev_kv: true,
                        ..put("t/e", "1")
                    }),
                    op_range(get("t/e")),
                    op_del(DeleteRangeRequest {
                        prev_kv: true,
                        ..del("t/b", "")
                    }),
                    op_range(RangeRequest {
                        count_only: true,
                        ..range("t/", "t0")
                    }),
                    op_range(range("t/", "t0")),
                    op_put(PutRequest {
                        prev_kv: true,
                        ..put("t/a", "12")
                    }),
                    op_range(RangeRequest {
                        revision: 33,
                        ..range("t/", "t0")
                    }),
                ],
                vec![],
            )),
        ), // rev 34
        step(
            "txn delete of a missing key only",
            Op::Txn(txn(
                vec![],
                vec![op_del(DeleteRangeRequest {
                    prev_kv: true,
                    ..del("t/missing", "")
                })],
                vec![],
            )),
        ),
        step(
            "txn put then delete a missing key",
            Op::Txn(txn(
                vec![],
                vec![op_put(put("t/f", "1")), op_del(del("t/missing", ""))],
                vec![],
            )),
        ), // rev 35
        step(
            "txn nested",
            Op::Txn(txn(
                vec![cmp("t/a", Equal, value("12"))],
                vec![
                    op_put(put("t/c", "1")),
                    op_txn(txn(
                        vec![cmp("t/c", Equal, TargetUnion::Version(0))],
                        vec![op_put(put("t/d", "then")), op_range(range("t/", "t0"))],
                        vec![op_put(put("t/d", "else")), op_range(range("t/", "t0"))],
                    )),
                    op_txn(txn(
                        vec![cmp("t/a", Equal, value("12"))],
                        vec![op_txn(txn(vec![], vec![op_range(get("t/d"))], vec![]))],
                        vec![],
                    )),
                    op_range(get("t/c")),
                ],
                vec![op_range(get("t/a"))],
            )),
        ), // rev 36
        step(
            "txn nested in the failure branch",
            Op::Txn(txn(
                vec![cmp("t/a", Equal, value("nope"))],
                vec![],
                vec![op_txn(txn(
                    vec![cmp("t/d", Equal, value("then"))],
                    vec![op_put(put("t/d", "x"))],
                    vec![op_del(DeleteRangeRequest {
                        prev_kv: true,
                        ..del("t/d", "")
                    })],
                ))],
            )),
        ), // rev 37
        step(
            "txn nested read-only",
            Op::Txn(txn(
                vec![],
                vec![op_txn(txn(
                    vec![cmp("t/a", Greater, TargetUnion::Version(0))],
                    vec![op_range(range("t/", "t0"))],
                    vec![],
                ))],
                vec![],
            )),
        ),
        step(
            "txn read-only",
            Op::Txn(txn(
                vec![cmp("t/a", Equal, value("12"))],
                vec![
                    op_range(get("t/a")),
                    op_range(RangeRequest {
                        revision: 30,
                        ..range("t/", "t0")
                    }),
                    op_range(RangeRequest {
                        sort_target: SortTarget::Mod as i32,
                        sort_order: SortOrder::Descend as i32,
                        limit: 2,
                        ..range("t/", "t0")
                    }),
                ],
                vec![],
            )),
        ),
        step("txn empty", Op::Txn(txn(vec![], vec![], vec![]))),
        step(
            "txn only compares",
            Op::Txn(txn(vec![cmp("t/a", Equal, value("12"))], vec![], vec![])),
        ),
        step(
            "txn duplicate put",
            Op::Txn(txn(
                vec![],
                vec![op_put(put("t/x", "1")), op_put(put("t/x", "2"))],
                vec![],
            )),
        ),
        step(
            "txn duplicate put in failure branch",
            Op::Txn(txn(
                vec![],
                vec![],
                vec![op_put(put("t/x", "1")), op_put(put("t/x", "2"))],
            )),
        ),
        step(
            "txn same key in both branches is fine",
            Op::Txn(txn(
                vec![cmp("t/a", Equal, value("12"))],
                vec![op_put(put("t/x", "1"))],
                vec![op_put(put("t/x", "2"))],
            )),
        ), // rev 38
        step(
            "txn put inside a deleted range",
            Op::Txn(txn(
                vec![],
                vec![op_del(del("t/a", "t/z")), op_put(put("t/b", "1"))],
                vec![],
            )),
        ),
        step(
            "txn delete and put of the same key",
            Op::Txn(txn(
                vec![],
                vec![op_put(put("t/a", "1")), op_del(del("t/a", ""))],
                vec![],
            )),
        ),
        step(
            "txn put in nested txn over parent delete",
            Op::Txn(txn(
                vec![],
                vec![
                    op_del(del("t/a", "t/c")),
                    op_txn(txn(vec![], vec![op_put(put("t/b", "1"))], vec![])),
                ],
                vec![],
            )),
        ),
        step(
            "txn nested branches may put the same key",
            Op::Txn(txn(
                vec![],
                vec![op_txn(txn(
                    vec![cmp("t/a", Equal, value("12"))],
                    vec![op_put(put("t/y", "then"))],
                    vec![op_put(put("t/y", "else"))],
                ))],
                vec![],
            )),
        ), // rev 39
        step(
            "txn put next to a deleted range",
            Op::Txn(txn(
                vec![],
                vec![op_del(del("t/x", "t/y")), op_put(put("t/y", "2"))],
                vec![],
            )),
        ), // rev 40
        step(
            "txn 128 ops is fine",
            Op::Txn(txn(
                vec![],
                (0..128)
                    .map(|i| op_put(put(&format!("m/{i:03}"), "v")))
                    .collect(),
                vec![],
            )),
        ), // rev 41
        step(
            "txn 129 ops",
            Op::Txn(txn(
                vec![],
                (0..129)
                    .map(|i| op_put(put(&format!("n/{i:03}"), "v")))
                    .collect(),
                vec![],
            )),
        ),
        step(
            "txn 129 compares",
            Op::Txn(txn(
                (0..129).map(|_| cmp("t/a", Equal, value("12"))).collect(),
                vec![],
                vec![],
            )),
        ),
        step(
            "txn nested ops share the limit",
            Op::Txn(txn(
                vec![],
                vec![
                    op_range(get("t/a")),
                    op_range(get("t/a")),
                    op_txn(txn(
                        vec![],
                        (0..127).map(|_| op_range(get("t/a"))).collect(),
                        vec![],
                    )),
                ],
                vec![],
            )),
        ),
        step(
            "txn empty request op",
            Op::Txn(txn(vec![], vec![RequestOp { request: None }], vec![])),
        ),
        step(
            "txn empty request op in failure branch",
            Op::Txn(txn(
                vec![],
                vec![op_range(get("t/a"))],
                vec![RequestOp { request: None }],
            )),
        ),
        step(
            "txn compare with empty key",
            Op::Txn(txn(vec![cmp("", Equal, value(""))], vec![], vec![])),
        ),
        step(
            "txn put with empty key",
            Op::Txn(txn(vec![], vec![op_put(put("", "x"))], vec![])),
        ),
        step(
            "txn range with empty key",
            Op::Txn(txn(vec![], vec![op_range(get(""))], vec![])),
        ),
        step(
            "txn put ignore_value with value",
            Op::Txn(txn(
                vec![],
                vec![op_put(PutRequest {
                    ignore_value: true,
                    ..put("t/a", "x")
                })],
                vec![],
            )),
        ),
        step(
            "txn put ignore_value on a missing key",
            Op::Txn(txn(
                vec![],
                vec![
                    op_put(put("t/g", "1")),
                    op_put(PutRequest {
                        ignore_value: true,
                        ..put("t/missing", "")
                    }),
                ],
                vec![],
            )),
        ),
        step(
            "txn put ignore_value on an existing key",
            Op::Txn(txn(
                vec![],
                vec![op_put(PutRequest {
                    ignore_value: true,
                    prev_kv: true,
                    ..put("t/a", "")
                })],
                vec![],
            )),
        ), // rev 42
        step(
            "txn put with an unknown lease",
            Op::Txn(txn(
                vec![],
                vec![
                    op_put(put("t/h", "1")),
                    op_put(PutRequest {
                        lease: 12345,
                        ..put("t/i", "1")
                    }),
                ],
                vec![],
            )),
        ),
        step(
            "txn unknown lease in the branch not taken",
            Op::Txn(txn(
                vec![cmp("t/a", Equal, value("12"))],
                vec![op_put(put("t/h", "1"))],
                vec![op_put(PutRequest {
                    lease: 12345,
                    ..put("t/i", "1")
                })],
            )),
        ), // rev 43
        step(
            "txn range at a future revision",
            Op::Txn(txn(
                vec![],
                vec![op_range(RangeRequest {
                    revision: 1000,
                    ..get("t/a")
                })],
                vec![],
            )),
        ),
        step(
            "txn write then range at the txn's own revision",
            Op::Txn(txn(
                vec![],
                vec![
                    op_put(put("t/j", "1")),
                    op_range(RangeRequest {
                        revision: 44,
                        ..get("t/j")
                    }),
                ],
                vec![],
            )),
        ),
        step(
            "txn future range before an unknown lease",
            Op::Txn(txn(
                vec![],
                vec![
                    op_range(RangeRequest {
                        revision: 1000,
                        ..get("t/a")
                    }),
                    op_put(PutRequest {
                        lease: 12345,
                        ..put("t/i", "1")
                    }),
                ],
                vec![],
            )),
        ),
        step(
            "txn future range in nested txn before an unknown lease",
            Op::Txn(txn(
                vec![],
                vec![
                    op_txn(txn(
                        vec![],
                        vec![op_range(RangeRequest {
                            revision: 1000,
                            ..get("t/a")
                        })],
                        vec![],
                    )),
                    op_put(PutRequest {
                        ignore_lease: true,
                        ..put("t/missing", "x")
                    }),
                ],
                vec![],
            )),
        ),
        step_with(
            "range after refused txns (revision unchanged)",
            Op::Range(range("t/", "t0")),
            Check::RevisionUnchanged,
        ),
        step(
            "txn put and from-key delete of the same key",
            Op::Txn(txn(
                vec![],
                vec![op_put(put("~q", "1")), op_del(del("~q", "\0"))],
                vec![],
            )),
        ),
        step(
            "txn from-key delete then a put after it",
            Op::Txn(txn(
                vec![],
                vec![op_del(del("~a", "\0")), op_put(put("~b", "1"))],
                vec![],
            )),
        ),
        step("range after from-key txns", Op::Range(range("~", "\0"))),
    ]);
    // Some history for the compaction steps to cut through.
    s.extend([
        step("put k/1", Op::Put(put("k/1", "1"))),
        step("put k/1 again", Op::Put(put("k/1", "2"))),
        step("put k/2", Op::Put(put("k/2", "1"))),
        step("delete k/2", Op::Delete(del("k/2", ""))),
        step("put k/3", Op::Put(put("k/3", "1"))),
    ]);

    s
}

/// Compaction and the steps after it, for a store at revision `cur` when they start.
fn compaction_steps(cur: i64) -> Vec<Step> {
    let at = cur - 2;
    vec![
        step("compact at current-2", compact(at, true)),
        step(
            "range below the compacted revision",
            Op::Range(RangeRequest {
                revision: at - 1,
                ..range("\0", "\0")
            }),
        ),
        step(
            "range far below the compacted revision",
            Op::Range(RangeRequest {
                revision: 2,
                ..get("a")
            }),
        ),
        step(
            "range at exactly the compacted revision",
            Op::Range(RangeRequest {
                revision: at,
                ..range("\0", "\0")
            }),
        ),
        step(
            "range k/ at the compacted revision",
            Op::Range(RangeRequest {
                revision: at,
                ..range("k/", "k0")
            }),
        ),
        step(
            "range count_only below the compacted revision",
            Op::Range(RangeRequest {
                revision: at - 1,
                count_only: true,
                ..range("\0", "\0")
            }),
        ),
        step(
            "range at the current revision after compaction",
            Op::Range(RangeRequest {
                revision: cur,
                ..range("k/", "k0")
            }),
        ),
        step("compact again at the same revision", compact(at, false)),
        step(
            "compact below the compacted revision",
            compact(at - 1, false),
        ),
        step("compact at a future revision", compact(cur + 1, false)),
        step("compact at revision 0", compact(0, false)),
        step(
            "range at a future revision after compaction",
            Op::Range(RangeRequest {
                revision: cur + 1,
                ..get("a")
            }),
        ),
        step(
            "txn range below the compacted revision",
            Op::Txn(txn(
                vec![],
                vec![op_range(RangeRequest {
                    revision: at - 1,
                    ..get("a")
                })],
                vec![],
            )),
        ),
        step(
            "txn range at the compacted revision",
            Op::Txn(txn(
                vec![],
                vec![op_range(RangeRequest {
                    revision: at,
                    ..range("k/", "k0")
                })],
                vec![],
            )),
        ),
        step(
            "hashkv at the current revision",
            Op::HashKv(HashKvRequest { revision: 0 }),
        ),
        step(
            "hashkv at the compacted revision",
            Op::HashKv(HashKvRequest { revision: at }),
        ),
        step(
            "hashkv above the compacted revision",
            Op::HashKv(HashKvRequest { revision: at + 1 }),
        ),
        step(
            "hashkv below the compacted revision",
            Op::HashKv(HashKvRequest { revision: at - 1 }),
        ),
        step(
            "hashkv at a future revision",
            Op::HashKv(HashKvRequest { revision: cur + 1 }),
        ),
        step("compact at the current revision", compact(cur, false)),
        step(
            "range at the current revision after compacting it",
            Op::Range(RangeRequest {
                revision: cur,
                ..range("\0", "\0")
            }),
        ),
        step(
            "range below after compacting at current",
            Op::Range(RangeRequest {
                revision: cur - 1,
                ..get("k/1")
            }),
        ),
        step("put after compaction", Op::Put(put("k/1", "3"))),
        step(
            "put with prev_kv after compaction",
            Op::Put(PutRequest {
                prev_kv: true,
                ..put("k/1", "4")
            }),
        ),
        // ---- request size limits ----
        step(
            "put 1.6 MiB value (over --max-request-bytes)",
            Op::Put(put("big", &"x".repeat(MAX_REQUEST_BYTES + 100 * 1024))),
        ),
        step_with(
            "put 2.5 MiB value (over the gRPC receive limit)",
            Op::Put(put("big", &"x".repeat(2560 * 1024))),
            Check::Code(Code::ResourceExhausted),
        ),
        step(
            "txn 1.6 MiB value",
            Op::Txn(txn(
                vec![],
                vec![op_put(put(
                    "big",
                    &"x".repeat(MAX_REQUEST_BYTES + 100 * 1024),
                ))],
                vec![],
            )),
        ),
        step(
            "put 1 MiB value (under the limit)",
            Op::Put(put("big", &"y".repeat(1024 * 1024))),
        ),
        step(
            "range after size limits",
            Op::Range(RangeRequest {
                keys_only: true,
                ..range("\0", "\0")
            }),
        ),
        step("status", Op::Status),
        step(
            "alarm get at the end",
            Op::Alarm(AlarmRequest {
                action: AlarmAction::Get as i32,
                ..Default::default()
            }),
        ),
    ]
}

// ---- running and comparing -----------------------------------------------------------------

/// A successful response, normalised for comparison.
#[derive(Debug, Clone, PartialEq)]
enum Resp {
    Put(PutResponse),
    Range(RangeResponse),
    Delete(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactionResponse),
    HashKv(HashKvResponse),
    Alarm(AlarmResponse),
    Status(StatusResponse),
}

/// A response, or the error as (code, message).
type Outcome = Result<Resp, (Code, String)>;

struct Clients {
    kv: KvClient<Channel>,
    maintenance: MaintenanceClient<Channel>,
}

impl Clients {
    async fn connect(endpoint: &str) -> Result<Self, BoxError> {
        let channel = Channel::from_shared(format!("http://{endpoint}"))?
            .connect()
            .await?;
        Ok(Self {
            kv: KvClient::new(channel.clone()),
            maintenance: MaintenanceClient::new(channel),
        })
    }

    async fn run(&mut self, op: &Op) -> Outcome {
        let err = |s: tonic::Status| (s.code(), s.message().to_string());
        Ok(match op.clone() {
            Op::Put(r) => Resp::Put(self.kv.put(r).await.map_err(err)?.into_inner()),
            Op::Range(r) => Resp::Range(self.kv.range(r).await.map_err(err)?.into_inner()),
            Op::Delete(r) => Resp::Delete(self.kv.delete_range(r).await.map_err(err)?.into_inner()),
            Op::Txn(r) => Resp::Txn(self.kv.txn(r).await.map_err(err)?.into_inner()),
            Op::Compact(r) => Resp::Compact(self.kv.compact(r).await.map_err(err)?.into_inner()),
            Op::HashKv(r) => {
                Resp::HashKv(self.maintenance.hash_kv(r).await.map_err(err)?.into_inner())
            }
            Op::Alarm(r) => Resp::Alarm(self.maintenance.alarm(r).await.map_err(err)?.into_inner()),
            Op::Status => Resp::Status(
                self.maintenance
                    .status(StatusRequest {})
                    .await
                    .map_err(err)?
                    .into_inner(),
            ),
        })
    }
}

/// Checks the top-level header's by-design fields and clears them. Nested headers (inside txn
/// responses) are left alone: etcd fills only the outer one.
fn normalise_header(h: &mut Option<ResponseHeader>, problems: &mut Vec<String>) {
    let Some(h) = h else {
        problems.push("response has no header".into());
        return;
    };
    if h.raft_term == 0 {
        problems.push("header.raft_term is 0".into());
    }
    if h.cluster_id == 0 || h.member_id == 0 {
        problems.push("header.cluster_id or member_id is 0".into());
    }
    h.cluster_id = 0;
    h.member_id = 0;
    h.raft_term = 0;
}

/// Clears what differs by design, and lists what is wrong on its own (not relative to the
/// other server).
fn normalise(out: &mut Outcome) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(resp) = out else {
        return problems;
    };
    match resp {
        Resp::Put(r) => normalise_header(&mut r.header, &mut problems),
        Resp::Range(r) => normalise_header(&mut r.header, &mut problems),
        Resp::Delete(r) => normalise_header(&mut r.header, &mut problems),
        Resp::Txn(r) => normalise_header(&mut r.header, &mut problems),
        Resp::Compact(r) => normalise_header(&mut r.header, &mut problems),
        Resp::HashKv(r) => {
            normalise_header(&mut r.header, &mut problems);
            // The hash covers each server's own storage encoding.
            r.hash = 0;
        }
        Resp::Alarm(r) => {
            // etcd 3.4 sends no header on Alarm (3.5 fills one in); compare the alarms only.
            r.header = None;
        }
        Resp::Status(r) => {
            normalise_header(&mut r.header, &mut problems);
            if r.version.is_empty() {
                problems.push("status.version is empty".into());
            }
            if r.leader == 0 {
                problems.push("status.leader is 0".into());
            }
            if r.raft_index == 0 {
                problems.push("status.raft_index is 0".into());
            }
            if r.raft_term == 0 {
                problems.push("status.raft_term is 0".into());
            }
            // Keep the header revision; the rest is each server's own.
            *r = StatusResponse {
                header: r.header,
                errors: std::mem::take(&mut r.errors),
                ..Default::default()
            };
        }
    }
    problems
}

fn header_revision(out: &Outcome) -> Option<i64> {
    let h = match out.as_ref().ok()? {
        Resp::Put(r) => r.header,
        Resp::Range(r) => r.header,
        Resp::Delete(r) => r.header,
        Resp::Txn(r) => r.header,
        Resp::Compact(r) => r.header,
        Resp::HashKv(r) => r.header,
        Resp::Alarm(r) => r.header,
        Resp::Status(r) => r.header,
    };
    h.map(|h| h.revision)
}

/// Runs steps on both servers and collects what differs.
struct Runner {
    etcd: Clients,
    ours: Clients,
    /// etcd's header revision after the last step that had one.
    last_rev: Option<i64>,
    count: usize,
    failures: Vec<String>,
}

impl Runner {
    async fn run(&mut self, step: Step) {
        self.count += 1;
        let mut theirs = self.etcd.run(&step.op).await;
        let mut mine = self.ours.run(&step.op).await;
        let mut problems: Vec<String> = normalise(&mut theirs)
            .into_iter()
            .map(|p| format!("etcd: {p}"))
            .chain(
                normalise(&mut mine)
                    .into_iter()
                    .map(|p| format!("ours: {p}")),
            )
            .collect();
        match step.check {
            Check::Code(code) => {
                let codes = (
                    theirs.as_ref().err().map(|e| e.0),
                    mine.as_ref().err().map(|e| e.0),
                );
                if codes != (Some(code), Some(code)) {
                    problems.push(format!("expected both to fail with {code:?}"));
                }
            }
            Check::Exact | Check::RevisionUnchanged => {
                if theirs != mine {
                    problems.push("responses differ".into());
                }
            }
        }
        if step.check == Check::RevisionUnchanged {
            let now = header_revision(&theirs);
            if now.is_none() || now != self.last_rev {
                problems.push(format!(
                    "revision moved: {:?} before, {now:?} after",
                    self.last_rev
                ));
            }
        }
        if std::env::var_os("DIFFERENTIAL_VERBOSE").is_some() {
            eprintln!("step {} {:?}\n  etcd: {theirs:?}", self.count, step.name);
        }
        let known = KNOWN_DIFFERENCES
            .iter()
            .find(|(name, _)| *name == step.name);
        if let Some((_, why)) = known {
            if problems.is_empty() {
                eprintln!(
                    "FIXED step {} {:?}: remove it from KNOWN_DIFFERENCES",
                    self.count, step.name
                );
                self.failures.push(format!(
                    "{} (fixed: remove from KNOWN_DIFFERENCES)",
                    step.name
                ));
            } else {
                eprintln!(
                    "KNOWN DIFFERENCE step {} {:?} ({why}): {}\n  etcd: {theirs:?}\n  ours: {mine:?}",
                    self.count,
                    step.name,
                    problems.join("; "),
                );
            }
        } else if !problems.is_empty() {
            eprintln!(
                "MISMATCH step {} {:?}: {}\n  etcd: {theirs:?}\n  ours: {mine:?}",
                self.count,
                step.name,
                problems.join("; "),
            );
            self.failures.push(step.name);
        }
        if let Some(rev) = header_revision(&theirs) {
            self.last_rev = Some(rev);
        }
    }
}

async fn run_steps(etcd: Clients, ours: Clients) -> Result<usize, BoxError> {
    let mut runner = Runner {
        etcd,
        ours,
        last_rev: None,
        count: 0,
        failures: Vec::new(),
    };
    for step in steps() {
        runner.run(step).await;
    }
    let cur = runner.last_rev.ok_or("no response carried a revision")?;
    for step in compaction_steps(cur) {
        runner.run(step).await;
    }
    if !runner.failures.is_empty() {
        return Err(format!(
            "{} of {} steps differ from etcd: {:#?}",
            runner.failures.len(),
            runner.count,
            runner.failures
        )
        .into());
    }
    Ok(runner.count)
}

async fn start(
    f: impl FnOnce(&std::path::Path) -> Result<Proc, String> + Send + 'static,
) -> Result<(Proc, tempfile::TempDir), String> {
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
        let proc = f(dir.path())?;
        Ok((proc, dir))
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn differential_body() -> Result<(), BoxError> {
    let (etcd_proc, _etcd_dir) = match start(start_etcd).await {
        Ok(started) => started,
        Err(reason) => {
            eprintln!("SKIP differential: {reason}");
            return Ok(());
        }
    };
    let (ours_proc, _ours_dir) = start(|dir| Ok(start_kv_server(dir, &[]))).await?;
    let etcd = Clients::connect(&etcd_proc.endpoint).await?;
    let ours = Clients::connect(&ours_proc.endpoint).await?;
    let count = run_steps(etcd, ours).await?;
    eprintln!(
        "differential: {count} steps run; all agree with etcd but the {} known difference(s)",
        KNOWN_DIFFERENCES.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential() {
    match tokio::time::timeout(TEST_TIMEOUT, differential_body()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!("differential test did not finish in {TEST_TIMEOUT:?}"),
    }
}
