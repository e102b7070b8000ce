//! Property test: the engine against a simple model (a full key map per revision), over random
//! put / delete / txn / compact / historical-range / lease grant and revoke sequences, on both
//! backends, with restarts.

use std::collections::{BTreeMap, BTreeSet};

use kv_core::backend::{Backend, MemoryBackend, RedbBackend};
use kv_core::proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest, compare::CompareResult,
    compare::CompareTarget, compare::TargetUnion, request_op::Request as Op,
    response_op::Response as OpResp,
};
use kv_core::proto::kvserverpb::{
    InternalRequest, internal_request::Request, internal_response::Response,
};
use kv_core::proto::mvccpb::KeyValue;
use kv_core::{KvError, Store, StoreConfig};
use proptest::prelude::*;

const KEYS: &[&[u8]] = &[b"a", b"b", b"ba", b"c", b"d"];
/// Lease ids used are 1..=LEASES.
const LEASES: i64 = 3;

#[derive(Debug, Clone)]
enum Action {
    /// Put key k = v, with lease l (0: none).
    Put(usize, u8, i64),
    Grant(i64),
    Revoke(i64),
    Delete(usize, Option<usize>),
    /// If key's version equals v then put(k2) else delete(k3).
    Txn(usize, i64, usize, u8, usize),
    Compact(i64),
    Range(usize, Option<usize>, i64, i64),
    Restart,
}

fn action() -> impl Strategy<Value = Action> {
    let k = 0..KEYS.len();
    prop_oneof![
        4 => (k.clone(), any::<u8>(), 0..=LEASES).prop_map(|(k, v, l)| Action::Put(k, v, l)),
        1 => (1..=LEASES).prop_map(Action::Grant),
        1 => (1..=LEASES).prop_map(Action::Revoke),
        2 => (k.clone(), proptest::option::of(0..KEYS.len() + 1)).prop_map(|(k, e)| Action::Delete(k, e)),
        2 => (k.clone(), 0i64..3, k.clone(), any::<u8>(), k.clone()).prop_map(|(a, v, b, x, c)| Action::Txn(a, v, b, x, c)),
        1 => (-2i64..40).prop_map(Action::Compact),
        4 => (k.clone(), proptest::option::of(0..KEYS.len() + 1), -1i64..40, 0i64..4).prop_map(|(k, e, r, l)| Action::Range(k, e, r, l)),
        1 => Just(Action::Restart),
    ]
}

/// A key and its new value and lease, or `None` for a deletion.
type LeasedWrite = (Vec<u8>, Option<(Vec<u8>, i64)>);

/// The model: the full key map as of every revision, the compaction revision and the leases.
struct Model {
    states: Vec<BTreeMap<Vec<u8>, KeyValue>>,
    compacted: i64,
    leases: BTreeSet<i64>,
}

impl Model {
    fn new() -> Self {
        // Revision 0 does not exist; revision 1 is the empty store.
        Self {
            states: vec![BTreeMap::new(), BTreeMap::new()],
            compacted: -1,
            leases: BTreeSet::new(),
        }
    }
    fn current(&self) -> i64 {
        self.states.len() as i64 - 1
    }
    fn latest(&self) -> &BTreeMap<Vec<u8>, KeyValue> {
        self.states.last().unwrap()
    }
    fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
        match end {
            [] => key == start,
            [0] => key >= start,
            e => key >= start && key < e,
        }
    }
    /// The live keys attached to `lease`, in key order.
    fn keys_of(&self, lease: i64) -> Vec<Vec<u8>> {
        self.latest()
            .values()
            .filter(|kv| kv.lease == lease)
            .map(|kv| kv.key.to_vec())
            .collect()
    }
    /// Applies a list of writes without leases as one revision (if any changes).
    fn write(&mut self, writes: &[(Vec<u8>, Option<Vec<u8>>)]) {
        let leased: Vec<_> = writes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().map(|v| (v, 0))))
            .collect();
        self.write_leased(&leased);
    }
    /// Applies a list of writes (value and lease, or deletion) as one revision (if any changes).
    fn write_leased(&mut self, writes: &[LeasedWrite]) {
        let rev = self.current() + 1;
        let mut next = self.latest().clone();
        let mut changed = false;
        for (k, v) in writes {
            match v {
                Some((v, lease)) => {
                    let (create, version) = match next.get(k) {
                        Some(old) => (old.create_revision, old.version + 1),
                        None => (rev, 1),
                    };
                    next.insert(
                        k.clone(),
                        KeyValue {
                            key: k.clone().into(),
                            create_revision: create,
                            mod_revision: rev,
                            version,
                            value: v.clone().into(),
                            lease: *lease,
                        },
                    );
                    changed = true;
                }
                None => {
                    if next.remove(k).is_some() {
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.states.push(next);
        }
    }
}

fn end_bytes(e: Option<usize>) -> Vec<u8> {
    match e {
        None => Vec::new(),
        Some(i) if i == KEYS.len() => vec![0],
        Some(i) => KEYS[i].to_vec(),
    }
}

fn apply(store: &Store, index: &mut u64, req: Request) -> Result<Response, KvError> {
    *index += 1;
    let out = store
        .apply_batch(
            &[(
                *index,
                Some(InternalRequest {
                    header: None,
                    id: *index,
                    request: Some(req),
                }),
            )],
            b"meta",
        )
        .expect("engine failure");
    out.into_iter().next().unwrap().map(|r| r.response.unwrap())
}

fn run(actions: Vec<Action>, mut reopen: impl FnMut(Option<Store>) -> Store) {
    let mut store = reopen(None);
    let mut model = Model::new();
    let mut index = 0u64;
    for a in actions {
        match a {
            Action::Put(k, v, lease) => {
                let r = apply(
                    &store,
                    &mut index,
                    Request::Put(PutRequest {
                        key: KEYS[k].to_vec(),
                        value: vec![v],
                        lease,
                        ..Default::default()
                    }),
                );
                if lease != 0 && !model.leases.contains(&lease) {
                    assert_eq!(r.unwrap_err(), KvError::LeaseNotFound);
                    continue;
                }
                model.write_leased(&[(KEYS[k].to_vec(), Some((vec![v], lease)))]);
                let Response::Put(p) = r.unwrap() else {
                    panic!()
                };
                assert_eq!(p.header.unwrap().revision, model.current());
            }
            Action::Grant(lease) => {
                let r = apply(
                    &store,
                    &mut index,
                    Request::LeaseGrant(LeaseGrantRequest { ttl: 10, id: lease }),
                );
                if model.leases.insert(lease) {
                    let Response::LeaseGrant(g) = r.unwrap() else {
                        panic!()
                    };
                    assert_eq!((g.id, g.ttl), (lease, 10));
                } else {
                    assert_eq!(r.unwrap_err(), KvError::LeaseExists);
                }
            }
            Action::Revoke(lease) => {
                let r = apply(
                    &store,
                    &mut index,
                    Request::LeaseRevoke(LeaseRevokeRequest { id: lease }),
                );
                if model.leases.remove(&lease) {
                    // Every attached key goes, in one revision.
                    let doomed = model.keys_of(lease);
                    model.write_leased(&doomed.into_iter().map(|k| (k, None)).collect::<Vec<_>>());
                    let Response::LeaseRevoke(rv) = r.unwrap() else {
                        panic!()
                    };
                    assert_eq!(rv.header.unwrap().revision, model.current());
                } else {
                    assert_eq!(r.unwrap_err(), KvError::LeaseNotFound);
                }
            }
            Action::Delete(k, e) => {
                let end = end_bytes(e);
                let doomed: Vec<_> = model
                    .latest()
                    .keys()
                    .filter(|key| Model::in_range(key, KEYS[k], &end))
                    .cloned()
                    .collect();
                let r = apply(
                    &store,
                    &mut index,
                    Request::DeleteRange(DeleteRangeRequest {
                        key: KEYS[k].to_vec(),
                        range_end: end,
                        prev_kv: true,
                    }),
                )
                .unwrap();
                let Response::DeleteRange(d) = r else {
                    panic!()
                };
                assert_eq!(d.deleted as usize, doomed.len());
                let want_prev: Vec<_> = doomed.iter().map(|k| model.latest()[k].clone()).collect();
                assert_eq!(d.prev_kvs, want_prev);
                model.write(&doomed.into_iter().map(|k| (k, None)).collect::<Vec<_>>());
                assert_eq!(d.header.unwrap().revision, model.current());
            }
            Action::Txn(a, v, b, x, c) => {
                let ok = model.latest().get(KEYS[a]).map_or(0, |kv| kv.version) == v;
                let req = TxnRequest {
                    compare: vec![Compare {
                        result: CompareResult::Equal as i32,
                        target: CompareTarget::Version as i32,
                        key: KEYS[a].to_vec(),
                        range_end: vec![],
                        target_union: Some(TargetUnion::Version(v)),
                    }],
                    success: vec![
                        RequestOp {
                            request: Some(Op::RequestPut(PutRequest {
                                key: KEYS[b].to_vec(),
                                value: vec![x],
                                ..Default::default()
                            })),
                        },
                        RequestOp {
                            request: Some(Op::RequestRange(RangeRequest {
                                key: KEYS[b].to_vec(),
                                ..Default::default()
                            })),
                        },
                    ],
                    failure: vec![RequestOp {
                        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                            key: KEYS[c].to_vec(),
                            ..Default::default()
                        })),
                    }],
                };
                let r = apply(&store, &mut index, Request::Txn(req)).unwrap();
                let Response::Txn(t) = r else { panic!() };
                assert_eq!(t.succeeded, ok);
                if ok {
                    model.write(&[(KEYS[b].to_vec(), Some(vec![x]))]);
                    // The range inside the txn reads the txn's own put.
                    let Some(OpResp::ResponseRange(rr)) = &t.responses[1].response else {
                        panic!()
                    };
                    assert_eq!(rr.kvs, vec![model.latest()[KEYS[b]].clone()]);
                } else {
                    model.write(&[(KEYS[c].to_vec(), None)]);
                }
                assert_eq!(t.header.unwrap().revision, model.current());
            }
            Action::Compact(r) => {
                let got = apply(
                    &store,
                    &mut index,
                    Request::Compaction(CompactionRequest {
                        revision: r,
                        physical: true,
                    }),
                );
                if r <= model.compacted {
                    assert!(matches!(got, Err(KvError::Compacted { .. })), "{got:?}");
                } else if r > model.current() {
                    assert_eq!(got.unwrap_err(), KvError::FutureRevision);
                } else {
                    got.unwrap();
                    model.compacted = r;
                }
            }
            Action::Range(k, e, rev, limit) => {
                let end = end_bytes(e);
                let req = RangeRequest {
                    key: KEYS[k].to_vec(),
                    range_end: end.clone(),
                    revision: rev,
                    limit,
                    ..Default::default()
                };
                let got = store.range(&req);
                if rev > model.current() {
                    assert!(
                        matches!(got, Err(kv_core::Error::Request(KvError::FutureRevision))),
                        "{got:?}"
                    );
                    continue;
                }
                let at = if rev <= 0 { model.current() } else { rev };
                if at < model.compacted {
                    assert!(
                        matches!(got, Err(kv_core::Error::Request(KvError::Compacted { .. }))),
                        "{got:?}"
                    );
                    continue;
                }
                let got = got.unwrap();
                let all: Vec<_> = model.states[at as usize]
                    .values()
                    .filter(|kv| Model::in_range(&kv.key, KEYS[k], &end))
                    .cloned()
                    .collect();
                assert_eq!(got.count as usize, all.len());
                let take = if limit > 0 { limit as usize } else { all.len() };
                assert_eq!(
                    got.kvs,
                    all[..take.min(all.len())].to_vec(),
                    "range {k} {end:?} at {at}"
                );
                assert_eq!(got.more, all.len() > take);
                assert_eq!(got.header.unwrap().revision, model.current());
            }
            Action::Restart => {
                store = reopen(Some(store));
                assert_eq!(store.revision(), model.current());
                assert_eq!(store.applied_index(), index);
            }
        }
        // The lease table and its attachments follow the keys' own lease field.
        let leases: Vec<i64> = store.leases().into_iter().map(|(id, _)| id).collect();
        assert_eq!(leases, model.leases.iter().copied().collect::<Vec<_>>());
        for lease in 1..=LEASES {
            let got = store.lease(lease).map(|(_, keys)| keys);
            let want = model.leases.contains(&lease).then(|| model.keys_of(lease));
            assert_eq!(got, want, "keys of lease {lease}");
        }
    }
}

fn config() -> StoreConfig {
    StoreConfig {
        member_id: 1,
        quota_bytes: 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn memory_backend_matches_model(actions in proptest::collection::vec(action(), 1..60)) {
        run(actions, |old| {
            let backend: Box<dyn Backend> = match old {
                Some(s) => s.into_backend(),
                None => Box::new(MemoryBackend::new()),
            };
            Store::open(backend, config()).unwrap()
        });
    }

    #[test]
    fn redb_backend_matches_model(actions in proptest::collection::vec(action(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        run(actions, |old| {
            if let Some(s) = old {
                s.sync().unwrap();
                drop(s);
            }
            Store::open(Box::new(RedbBackend::open(&path).unwrap()), config()).unwrap()
        });
    }
}
