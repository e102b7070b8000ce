//! The hub through the store: live delivery, catch-up, victims, compaction, progress.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::backend::MemoryBackend;
use crate::proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest,
    request_op::Request as Op,
};
use crate::proto::kvserverpb::{InternalRequest, internal_request::Request};
use crate::store::{Store, StoreConfig};

/// A stream queue of bounded capacity that records what was queued.
#[derive(Default)]
struct Queue {
    capacity: usize,
    queued: Mutex<Vec<Outgoing>>,
}

impl WatchSink for Queue {
    fn try_send(&self, out: Outgoing) -> Result<(), Outgoing> {
        let mut q = self.queued.lock().unwrap();
        if q.len() >= self.capacity {
            return Err(out);
        }
        q.push(out);
        Ok(())
    }

    fn try_send_fanout(&self, fanout: Fanout) -> Result<(), Fanout> {
        // As the server's queue: taken whole whenever there is any room.
        let mut q = self.queued.lock().unwrap();
        if q.len() >= self.capacity {
            return Err(fanout);
        }
        q.extend(fanout.watchers.iter().map(|w| Outgoing {
            response: fanout.response(w),
            fragment: w.fragment,
        }));
        Ok(())
    }

    fn has_room(&self) -> bool {
        self.queued.lock().unwrap().len() < self.capacity
    }
}

impl Queue {
    fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            queued: Mutex::new(Vec::new()),
        })
    }

    fn take(&self) -> Vec<WatchResponse> {
        std::mem::take(&mut *self.queued.lock().unwrap())
            .into_iter()
            .map(|o| o.response)
            .collect()
    }
}

struct Fixture {
    store: Store,
    index: std::cell::Cell<u64>,
}

impl Fixture {
    fn new() -> Self {
        let store = Store::open(
            Box::new(MemoryBackend::new()),
            StoreConfig {
                member_id: 1,
                quota_bytes: 0,
            },
        )
        .unwrap();
        Self {
            store,
            index: Default::default(),
        }
    }

    fn apply(&self, request: Request) {
        let index = self.index.get() + 1;
        self.index.set(index);
        let cmd = InternalRequest {
            header: None,
            id: index,
            request: Some(request),
        };
        self.store
            .apply_batch(&[(index, Some(cmd))], b"m")
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
    }

    fn put(&self, key: &str, value: &str) {
        self.apply(Request::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }));
    }

    fn delete(&self, key: &str) {
        self.apply(Request::DeleteRange(DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        }));
    }

    fn hub(&self) -> &WatchHub {
        self.store.watch_hub()
    }

    fn watch(&self, stream: StreamId, req: WatchCreateRequest) -> (Option<i64>, WatchResponse) {
        let spec = WatchSpec::from_request(&req).unwrap();
        let mut created = None;
        let id = self.hub().create(stream, spec, |r| created = Some(r));
        (id, created.unwrap())
    }

    fn sync_all(&self) {
        for _ in 0..100 {
            if !self.store.sync_watchers().unwrap() && self.hub().stats().unsynced == 0 {
                return;
            }
            self.hub().retry(false);
        }
        panic!("watchers never caught up: {:?}", self.hub().stats());
    }
}

fn create(key: &str, end: &str, start: i64) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.into(),
        range_end: end.into(),
        start_revision: start,
        ..Default::default()
    }
}

/// (type, key, mod revision) of every event of the responses, in order.
fn events(responses: &[WatchResponse]) -> Vec<(i32, String, i64)> {
    responses
        .iter()
        .flat_map(|r| &r.events)
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                e.r#type,
                String::from_utf8_lossy(&kv.key).into(),
                kv.mod_revision,
            )
        })
        .collect()
}

const PUT: i32 = EventType::Put as i32;
const DELETE: i32 = EventType::Delete as i32;

#[test]
fn live_events_reach_only_the_watchers_they_hit() {
    let f = Fixture::new();
    let q = Queue::new(1000);
    let s = f.hub().open_stream(q.clone());
    let (a, created) = f.watch(s, create("a", "", 0));
    assert_eq!((a, created.created, created.watch_id), (Some(0), true, 0));
    let (p, _) = f.watch(s, create("p/", "p0", 0));
    let (all, _) = f.watch(s, create("\0", "\0", 0));
    assert_eq!((p, all), (Some(1), Some(2)));
    f.put("a", "1");
    f.put("p/x", "2");
    f.put("b", "3");
    f.delete("a");
    let got = q.take();
    let of = |id: i64| {
        events(
            &got.iter()
                .filter(|r| r.watch_id == id)
                .cloned()
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(of(0), vec![(PUT, "a".into(), 2), (DELETE, "a".into(), 5)]);
    assert_eq!(of(1), vec![(PUT, "p/x".into(), 3)]);
    assert_eq!(of(2).len(), 4);
    // Each response is one revision, with that revision in its header.
    assert!(
        got.iter().all(|r| r.header.as_ref().unwrap().revision
            == r.events[0].kv.as_ref().unwrap().mod_revision)
    );
}

#[test]
fn a_txn_is_one_response_and_filters_and_prev_kv_apply() {
    let f = Fixture::new();
    f.put("k1", "old");
    let q = Queue::new(1000);
    let s = f.hub().open_stream(q.clone());
    let mut req = create("k", "l", 0);
    req.prev_kv = true;
    f.watch(s, req);
    let mut no_put = create("k", "l", 0);
    no_put.filters = vec![FilterType::Noput as i32];
    f.watch(s, no_put);
    let op = |key: &str| RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.into(),
            value: b"new".to_vec(),
            ..Default::default()
        })),
    };
    let del = RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key: b"k2".to_vec(),
            ..Default::default()
        })),
    };
    f.apply(Request::Txn(TxnRequest {
        compare: vec![],
        success: vec![op("k1"), op("k2"), op("k3")],
        failure: vec![],
    }));
    f.apply(Request::Txn(TxnRequest {
        compare: vec![],
        success: vec![del],
        failure: vec![],
    }));
    let got = q.take();
    let first: Vec<_> = got.iter().filter(|r| r.watch_id == 0).collect();
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].events.len(), 3);
    let prev = first[0].events[0].prev_kv.as_ref().unwrap();
    assert_eq!(prev.value, &b"old"[..]);
    // A creation has no previous value.
    assert!(first[0].events[1].prev_kv.is_none());
    assert_eq!(
        first[1].events[0].prev_kv.as_ref().unwrap().value,
        &b"new"[..]
    );
    let second: Vec<_> = got.iter().filter(|r| r.watch_id == 1).cloned().collect();
    // NOPUT: only the delete, and no empty response for the all-put revision.
    assert_eq!(events(&second), vec![(DELETE, "k2".into(), 4)]);
}

#[test]
fn past_start_revisions_catch_up_from_storage_then_go_live() {
    let f = Fixture::new();
    for i in 0..30 {
        f.put(&format!("k{}", i % 3), &i.to_string());
    }
    let q = Queue::new(1000);
    let s = f.hub().open_stream(q.clone());
    let (_, created) = f.watch(s, create("k1", "", 5));
    assert_eq!(created.header.unwrap().revision, 31);
    assert_eq!(f.hub().stats().unsynced, 1);
    f.sync_all();
    f.put("k1", "live");
    let got = events(&q.take());
    let revs: Vec<i64> = got.iter().map(|e| e.2).collect();
    let want: Vec<i64> = (5..=31).filter(|r| (r - 2) % 3 == 1).chain([32]).collect();
    assert_eq!(revs, want);
}

#[test]
fn a_compacted_start_revision_is_canceled_with_the_compaction_revision() {
    let f = Fixture::new();
    for i in 0..10 {
        f.put("k", &i.to_string());
    }
    f.apply(Request::Compaction(CompactionRequest {
        revision: 6,
        physical: true,
    }));
    let q = Queue::new(1000);
    let s = f.hub().open_stream(q.clone());
    f.watch(s, create("k", "", 3));
    // Starting at the compaction revision itself is allowed.
    f.watch(s, create("k", "", 6));
    f.sync_all();
    let got = q.take();
    let canceled: Vec<_> = got.iter().filter(|r| r.canceled).collect();
    assert_eq!(canceled.len(), 1);
    assert_eq!((canceled[0].watch_id, canceled[0].compact_revision), (0, 6));
    assert_eq!(canceled[0].header.as_ref().unwrap().revision, 0);
    let revs: Vec<i64> = events(&got).iter().map(|e| e.2).collect();
    assert_eq!(revs, (6..=11).collect::<Vec<_>>());
    // The compacted watcher's id stays taken until the client cancels it, as in etcd.
    let (again, refused) = f.watch(
        s,
        WatchCreateRequest {
            watch_id: 0,
            ..create("k", "", 0)
        },
    );
    assert_eq!(again, Some(2), "an auto id skips it");
    let (dup, _) = f.watch(
        s,
        WatchCreateRequest {
            watch_id: 5,
            ..create("k", "", 0)
        },
    );
    assert_eq!(dup, Some(5));
    assert!(!refused.canceled);
    assert!(f.hub().cancel(s, 0));
    assert_eq!(f.hub().stats().watchers, 3);
    f.put("k", "after");
    assert!(q.take().iter().all(|r| r.watch_id != 0));
}

#[test]
fn a_slow_stream_becomes_victim_then_unsynced_and_loses_nothing() {
    let f = Fixture::new();
    let slow = Queue::new(2);
    let fast = Queue::new(100_000);
    let s_slow = f.hub().open_stream(slow.clone());
    let s_fast = f.hub().open_stream(fast.clone());
    f.watch(s_slow, create("k", "", 0));
    f.watch(s_fast, create("k", "", 0));
    let writes = VICTIM_MAX_EVENTS as i64 + 50;
    let mut seen = Vec::new();
    for i in 0..writes {
        f.put("k", &i.to_string());
        if i == 10 {
            assert_eq!(f.hub().stats().victims, 1);
        }
    }
    // Past the victim buffer it went back to storage; the fast one never noticed.
    assert_eq!(f.hub().stats().unsynced, 1);
    assert_eq!(events(&fast.take()).len() as i64, writes);
    for _ in 0..10_000 {
        seen.extend(events(&slow.take()));
        let more = f.store.sync_watchers().unwrap();
        f.hub().retry(false);
        if !more && f.hub().stats().unsynced == 0 && f.hub().stats().victims == 0 {
            break;
        }
    }
    seen.extend(events(&slow.take()));
    let revs: Vec<i64> = seen.iter().map(|e| e.2).collect();
    assert_eq!(
        revs,
        (2..writes + 2).collect::<Vec<_>>(),
        "every revision once, in order"
    );
}

#[test]
fn a_stalled_stream_holds_bounded_events_however_many_watchers_it_has() {
    let f = Fixture::new();
    let stalled = Queue::new(1);
    let s = f.hub().open_stream(stalled.clone());
    for _ in 0..100 {
        f.watch(s, create("k", "", 0));
    }
    let writes = 200;
    for i in 0..writes {
        f.put("k", &i.to_string());
        assert!(f.hub().stats().held_events <= STREAM_MAX_HELD_EVENTS);
    }
    assert!(f.hub().stats().unsynced > 0);
    // Once the client reads again, every watcher gets every revision exactly once.
    let mut seen: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for _ in 0..100_000 {
        for r in stalled.take() {
            if r.created {
                continue;
            }
            let revs = seen.entry(r.watch_id).or_default();
            revs.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
        }
        let more = f.store.sync_watchers().unwrap();
        f.hub().retry(false);
        if !more && f.hub().stats().unsynced == 0 && f.hub().stats().victims == 0 {
            break;
        }
    }
    for r in stalled.take() {
        let revs = seen.entry(r.watch_id).or_default();
        revs.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    assert_eq!(seen.len(), 100);
    for revs in seen.values() {
        assert_eq!(revs, &(2..writes + 2).collect::<Vec<_>>());
    }
    assert_eq!(f.hub().stats().held_events, 0);
}

/// A stalled stream's watcher far behind must not hold back another stream's catch-up.
#[test]
fn a_stalled_stream_does_not_starve_other_streams_catch_up() {
    let f = Fixture::new();
    let stalled = Queue::new(1);
    let s_stalled = f.hub().open_stream(stalled.clone());
    f.watch(s_stalled, create("k", "", 1));
    let total = 3 * SYNC_MAX_REVISIONS;
    for i in 0..total {
        f.put("k", &i.to_string());
    }
    let live = Queue::new(10_000);
    let s_live = f.hub().open_stream(live.clone());
    let start = total - 10;
    f.watch(s_live, create("k", "", start));
    for _ in 0..5 {
        f.store.sync_watchers().unwrap();
        f.hub().retry(false);
    }
    let revs: Vec<i64> = events(&live.take()).iter().map(|e| e.2).collect();
    assert_eq!(revs, (start..=total + 1).collect::<Vec<_>>());
    assert_eq!(
        f.hub().stats().unsynced,
        1,
        "only the stalled one is behind"
    );
}

#[test]
fn a_feeder_thread_delivers_every_revision_in_order() {
    let f = Fixture::new();
    let q = Queue::new(100_000);
    let s = f.hub().open_stream(q.clone());
    let mut req = create("k", "l", 0);
    req.prev_kv = true;
    f.watch(s, req);
    std::thread::scope(|scope| {
        let store = &f.store;
        scope.spawn(move || store.run_watch_feed());
        // Wait until the feeder took over, then write through it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !f.store.feed_is_threaded() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        for i in 0..500 {
            f.put(&format!("k{}", i % 7), &i.to_string());
        }
        f.store.stop_watch_feed();
    });
    let got = q.take();
    let revs: Vec<i64> = events(&got).iter().map(|e| e.2).collect();
    assert_eq!(revs, (2..502).collect::<Vec<_>>());
    // The feeder looked previous values up itself.
    let with_prev = got
        .iter()
        .flat_map(|r| &r.events)
        .filter(|e| e.prev_kv.is_some());
    assert_eq!(with_prev.count(), 500 - 7);
    // Stopped: apply delivers inline again.
    f.put("k0", "inline");
    assert_eq!(events(&q.take()).len(), 1);
}

#[test]
fn cancel_and_stream_end_free_everything_and_ids_follow_etcd() {
    let f = Fixture::new();
    let q = Queue::new(100);
    let s = f.hub().open_stream(q.clone());
    f.watch(s, create("a", "", 0));
    f.watch(s, create("b", "c", 0));
    let (dup, refused) = f.watch(
        s,
        WatchCreateRequest {
            watch_id: 1,
            ..create("x", "", 0)
        },
    );
    assert_eq!(dup, None);
    assert_eq!(
        (
            refused.watch_id,
            refused.canceled,
            refused.cancel_reason.as_str()
        ),
        (-1, true, ERR_DUPLICATE_ID)
    );
    assert!(f.hub().cancel(s, 0));
    assert!(!f.hub().cancel(s, 0));
    f.put("a", "1");
    assert!(events(&q.take()).is_empty());
    // Ids go on from the last one handed out (etcd does not reuse a canceled id at once).
    assert_eq!(f.watch(s, create("a", "", 0)).0, Some(2));
    f.hub().close_stream(s);
    assert_eq!(f.hub().stats(), HubStats::default());
    assert_eq!(
        WatchSpec::from_request(&create("b", "a", 0)),
        Err(ERR_EMPTY_RANGE)
    );
}

#[test]
fn progress_waits_for_the_stream_to_be_synced() {
    let f = Fixture::new();
    for i in 0..5 {
        f.put("k", &i.to_string());
    }
    let q = Queue::new(100);
    let s = f.hub().open_stream(q.clone());
    f.watch(s, create("k", "", 2));
    let mut replied = Vec::new();
    f.hub().request_progress(s, |r| {
        replied.push(r);
        true
    });
    assert!(replied.is_empty(), "not before the watcher caught up");
    f.sync_all();
    f.hub().retry(false);
    let got = q.take();
    let last = got.last().unwrap();
    assert_eq!((last.watch_id, last.events.len()), (-1, 0));
    assert_eq!(last.header.as_ref().unwrap().revision, 6);
    assert_eq!(events(&got).len(), 5);
    // Periodic progress: only for progress_notify watchers with nothing sent since.
    let mut req = create("z", "", 0);
    req.progress_notify = true;
    let (id, _) = f.watch(s, req);
    f.hub().retry(true);
    let got = q.take();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].watch_id, got[0].events.len()), (id.unwrap(), 0));
}
