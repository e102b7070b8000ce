//! Property test: the engine against a simple model (a full key map per revision), over random
//! put / delete / txn / compact / historical-range sequences, on both backends, with restarts.

use std::collections::BTreeMap;

use kv_core::backend::{Backend, MemoryBackend, RedbBackend};
use kv_core::proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, compare::CompareResult, compare::CompareTarget, compare::TargetUnion,
    request_op::Request as Op, response_op::Response as OpResp,
};
use kv_core::proto::kvserverpb::{
    InternalRequest, internal_request::Request, internal_response::Response,
};
use kv_core::proto::mvccpb::KeyValue;
use kv_core::{KvError, Store, StoreConfig};
use proptest::prelude::*;

const KEYS: &[&[u8]] = &[b"a", b"b", b"ba", b"c", b"d"];

#[derive(Debug, Clone)]
enum Action {
    Put(usize, u8),
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
        4 => (k.clone(), any::<u8>()).prop_map(|(k, v)| Action::Put(k, v)),
        2 => (k.clone(), proptest::option::of(0..KEYS.len() + 1)).prop_map(|(k, e)| Action::Delete(k, e)),
        2 => (k.clone(), 0i64..3, k.clone(), any::<u8>(), k.clone()).prop_map(|(a, v, b, x, c)| Action::Txn(a, v, b, x, c)),
        1 => (-2i64..40).prop_map(Action::Compact),
        4 => (k.clone(), proptest::option::of(0..KEYS.len() + 1), -1i64..40, 0i64..4).prop_map(|(k, e, r, l)| Action::Range(k, e, r, l)),
        1 => Just(Action::Restart),
    ]
}

/// The model: the full key map as of every revision, and the compaction revision.
struct Model {
    states: Vec<BTreeMap<Vec<u8>, KeyValue>>,
    compacted: i64,
}

impl Model {
    fn new() -> Self {
        // Revision 0 does not exist; revision 1 is the empty store.
        Self {
            states: vec![BTreeMap::new(), BTreeMap::new()],
            compacted: -1,
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
    /// Applies a list of writes as one revision (if any changes).
    fn write(&mut self, writes: &[(Vec<u8>, Option<Vec<u8>>)]) {
        let rev = self.current() + 1;
        let mut next = self.latest().clone();
        let mut changed = false;
        for (k, v) in writes {
            match v {
                Some(v) => {
                    let (create, version) = match next.get(k) {
                        Some(old) => (old.create_revision, old.version + 1),
                        None => (rev, 1),
                    };
                    next.insert(
                        k.clone(),
                        KeyValue {
                            key: k.clone(),
                            create_revision: create,
                            mod_revision: rev,
                            version,
                            value: v.clone(),
                            lease: 0,
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
            Action::Put(k, v) => {
                let r = apply(
                    &store,
                    &mut index,
                    Request::Put(PutRequest {
                        key: KEYS[k].to_vec(),
                        value: vec![v],
                        ..Default::default()
                    }),
                )
                .unwrap();
                model.write(&[(KEYS[k].to_vec(), Some(vec![v]))]);
                let Response::Put(p) = r else { panic!() };
                assert_eq!(p.header.unwrap().revision, model.current());
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
