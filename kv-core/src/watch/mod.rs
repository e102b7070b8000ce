//! The watch hub: every watcher of every stream on this member, and the delivery of the
//! store's changes to them.
//!
//! Watchers are in one of three groups, as in etcd:
//! * **synced**: caught up with the store; apply hands each new revision's events to the
//!   watchers whose span they hit ([`SpanIndex`]): one [`Fanout`] per stream and revision,
//!   sharing the events, which the stream expands into responses when it sends.
//! * **victim**: synced, but its stream's queue was full; its responses wait in a bounded
//!   buffer of its own and are retried. A victim whose buffer overflows becomes unsynced.
//! * **unsynced**: behind the store (it started at an old revision, or was a victim too long);
//!   [`WatchHub`]'s caller reads the history it missed from storage in bounded batches
//!   ([`Store::sync_watchers`](crate::store::Store::sync_watchers)) until it is caught up.
//!
//! Apply never waits for a watcher: queues are bounded and only `try_send` is used, so a slow
//! consumer costs its own stream, never the writers or other streams.

mod fanout;
pub(crate) mod feed;
mod span_index;
mod table;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use foldhash::HashMap;

use crate::proto::etcdserverpb::{
    ResponseHeader, WatchCreateRequest, WatchResponse, watch_create_request::FilterType,
};
use crate::proto::mvccpb::{Event, KeyValue, event::EventType};

pub use fanout::{Fanout, FanoutWatcher};
pub use feed::FEED_MAX_BATCHES;
pub use span_index::{Span, SpanIndex};
use table::WatcherTable;

/// Events one victim may hold before it is sent back to catch up from storage.
pub const VICTIM_MAX_EVENTS: usize = 1024;
/// Events all victims of one stream may hold together; past it, the victim that overflows is
/// sent back to storage, so a stalled stream costs bounded memory however many watchers it has.
pub const STREAM_MAX_HELD_EVENTS: usize = 8192;
/// Revisions one catch-up response covers at most (etcd's `watchBatchMaxRevs`).
pub const SYNC_MAX_REVISIONS: i64 = 1000;
/// History records one catch-up round reads at most (it stops at a revision boundary past it).
pub const SYNC_MAX_RECORDS: usize = 10_000;
/// Unsynced watchers one catch-up round serves at most (etcd's `maxWatchersPerSync`).
pub const SYNC_MAX_WATCHERS: usize = 512;
/// Watchers one stream may hold.
pub const MAX_WATCHERS_PER_STREAM: usize = 1 << 20;

/// The id etcd clients use for "no particular watcher" (progress, refused creates).
pub const INVALID_WATCH_ID: i64 = -1;

/// `mvcc: watcher range is empty`.
pub const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";
/// `mvcc: duplicate watch ID provided on the WatchStream`.
pub const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// Ours: the stream holds [`MAX_WATCHERS_PER_STREAM`] watchers.
pub const ERR_TOO_MANY: &str = "kv-server: too many watchers on this stream";

/// A response on its way to a stream, with what the sender needs to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The response; its header carries only the revision.
    pub response: WatchResponse,
    /// The watcher asked for large responses to be split (`fragment`).
    pub fragment: bool,
}

/// One stream's outgoing queue, as the hub sees it.
pub trait WatchSink: Send + Sync {
    /// Queues `out` without waiting; hands it back when the queue is full or gone.
    fn try_send(&self, out: Outgoing) -> Result<(), Outgoing>;
    /// Queues one revision's events for several of the stream's watchers, without waiting;
    /// hands it back when the queue is full or gone. It is taken whenever the queue has any
    /// room, so one hot revision is never refused for its size alone.
    fn try_send_fanout(&self, fanout: Fanout) -> Result<(), Fanout>;
    /// Whether the queue has room now (catch-up skips streams that cannot take anything, so
    /// a stalled client never holds back anyone else's catch-up).
    fn has_room(&self) -> bool;
}

/// A stream's handle in the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Synced,
    Victim,
    Unsynced,
    /// Canceled by a compaction: it gets nothing more, but, as in etcd, its id stays taken
    /// until the client cancels it (the Go client answers the compaction with a cancel).
    Compacted,
}

#[derive(Debug)]
struct Watcher {
    stream: StreamId,
    /// The id the client knows (unique within the stream).
    id: i64,
    span: Span,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    fragment: bool,
    /// `progress_notify`: a periodic empty response when nothing else was sent.
    progress_notify: bool,
    /// Nothing was sent since the last progress tick.
    quiet: bool,
    group: Group,
    /// The first revision not yet handed to the stream.
    next_rev: i64,
    /// A victim's responses, oldest first.
    held: VecDeque<WatchResponse>,
    held_events: usize,
}

impl Watcher {
    fn keeps(&self, ev: &Event) -> bool {
        let put = ev.r#type == EventType::Put as i32;
        !(put && self.no_put || !put && self.no_delete)
    }
}

struct StreamState {
    sink: Arc<dyn WatchSink>,
    /// Client id -> hub key of the stream's watchers.
    watchers: BTreeMap<i64, u64>,
    next_client_id: i64,
    /// A progress request waits for the stream's watchers to be synced.
    progress_pending: bool,
    /// Events held by the stream's victims.
    held_events: usize,
}

#[derive(Default)]
struct HubState {
    next_stream: u64,
    watchers: WatcherTable<Watcher>,
    synced: SpanIndex,
    victims: BTreeSet<u64>,
    unsynced: BTreeSet<u64>,
    streams: HashMap<StreamId, StreamState>,
    /// The newest revision handed to the hub: every event up to it has been offered to the
    /// synced watchers, and storage holds everything up to it.
    revision: i64,
}

/// A watch request, decoded from `WatchCreateRequest` with etcd's conventions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    /// What to watch.
    pub span: Span,
    /// First revision to deliver; 0: the next one.
    pub start_revision: i64,
    /// Client-chosen id; 0: the hub picks the lowest free one.
    pub watch_id: i64,
    /// Skip PUT events.
    pub no_put: bool,
    /// Skip DELETE events.
    pub no_delete: bool,
    /// Attach the previous key-value to events.
    pub prev_kv: bool,
    /// Split large responses.
    pub fragment: bool,
    /// Periodic progress responses.
    pub progress_notify: bool,
}

impl WatchSpec {
    /// Decodes a create request as etcd does: an empty key is `\0`, a range end of `\0` means
    /// "every key from `key` on", and a range end at or before the key is refused.
    pub fn from_request(req: &WatchCreateRequest) -> Result<Self, &'static str> {
        let key = if req.key.is_empty() {
            vec![0]
        } else {
            req.key.clone()
        };
        let span = match req.range_end.as_slice() {
            [] => Span::Key(key),
            [0] => Span::Range {
                start: key,
                end: None,
            },
            end if key.as_slice() >= end => return Err(ERR_EMPTY_RANGE),
            end => Span::Range {
                start: key,
                end: Some(end.to_vec()),
            },
        };
        let has = |f: FilterType| req.filters.contains(&(f as i32));
        Ok(Self {
            span,
            start_revision: req.start_revision,
            watch_id: req.watch_id,
            no_put: has(FilterType::Noput),
            no_delete: has(FilterType::Nodelete),
            prev_kv: req.prev_kv,
            fragment: req.fragment,
            progress_notify: req.progress_notify,
        })
    }
}

/// What [`Store::sync_watchers`](crate::store::Store::sync_watchers) needs of the unsynced
/// watchers for one catch-up round.
#[derive(Debug, Clone)]
pub(crate) struct SyncPlan {
    /// (hub key, next revision, span, wants prev kv).
    pub watchers: Vec<(u64, i64, Span, bool)>,
    /// The smallest next revision among them.
    pub from: i64,
    /// The hub's revision when planned: read history up to it at most.
    pub to: i64,
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// Counts of watchers per group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Streams open.
    pub streams: usize,
    /// Watchers in all.
    pub watchers: usize,
    /// Victims.
    pub victims: usize,
    /// Unsynced.
    pub unsynced: usize,
    /// Events held by victims, all streams together.
    pub held_events: usize,
}

/// All watchers of this member.
#[derive(Default)]
pub struct WatchHub {
    state: Mutex<HubState>,
}

impl WatchHub {
    /// A hub whose store stands at `revision`.
    pub fn new(revision: i64) -> Self {
        let hub = Self::default();
        hub.lock().revision = revision;
        hub
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest revision the hub was told of.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// How many watchers there are.
    pub fn watcher_count(&self) -> usize {
        self.lock().watchers.len()
    }

    /// Watchers per group.
    pub fn stats(&self) -> HubStats {
        let s = self.lock();
        HubStats {
            streams: s.streams.len(),
            watchers: s.watchers.len(),
            victims: s.victims.len(),
            unsynced: s.unsynced.len(),
            held_events: s.streams.values().map(|st| st.held_events).sum(),
        }
    }

    /// True when catch-up, victim retries or a pending progress request have work.
    pub fn has_backlog(&self) -> bool {
        let s = self.lock();
        !s.unsynced.is_empty()
            || !s.victims.is_empty()
            || s.streams.values().any(|st| st.progress_pending)
    }

    /// Registers a stream whose responses go to `sink`.
    pub fn open_stream(&self, sink: Arc<dyn WatchSink>) -> StreamId {
        let mut s = self.lock();
        s.next_stream += 1;
        let id = StreamId(s.next_stream);
        s.streams.insert(
            id,
            StreamState {
                sink,
                watchers: BTreeMap::new(),
                next_client_id: 0,
                progress_pending: false,
                held_events: 0,
            },
        );
        id
    }

    /// Drops a stream and every watcher on it.
    pub fn close_stream(&self, stream: StreamId) {
        let mut s = self.lock();
        let Some(st) = s.streams.remove(&stream) else {
            return;
        };
        for key in st.watchers.into_values() {
            s.drop_watcher(key);
        }
        s.shrink();
    }

    /// Creates a watcher on `stream`. `announce` is called (under the hub's lock, before any
    /// event of the watcher can be queued) with the `created` response, which is refused
    /// (canceled, with etcd's reason) when the id is taken. Returns the watcher's id.
    pub fn create(
        &self,
        stream: StreamId,
        spec: WatchSpec,
        announce: impl FnOnce(WatchResponse),
    ) -> Option<i64> {
        let mut s = self.lock();
        let revision = s.revision;
        let refuse = |reason: &str| WatchResponse {
            header: header(revision),
            watch_id: INVALID_WATCH_ID,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        let st = s.streams.get_mut(&stream)?;
        if st.watchers.len() >= MAX_WATCHERS_PER_STREAM {
            announce(refuse(ERR_TOO_MANY));
            return None;
        }
        let id = if spec.watch_id == 0 {
            while st.watchers.contains_key(&st.next_client_id) {
                st.next_client_id += 1;
            }
            st.next_client_id += 1;
            st.next_client_id - 1
        } else if st.watchers.contains_key(&spec.watch_id) {
            announce(refuse(ERR_DUPLICATE_ID));
            return None;
        } else {
            spec.watch_id
        };
        let key = s.watchers.next_key();
        if let Some(st) = s.streams.get_mut(&stream) {
            st.watchers.insert(id, key);
        }
        // As etcd: start 0 is "from the next revision"; a start past the store revision is
        // synced and simply waits for that revision.
        let start = if spec.start_revision == 0 {
            revision + 1
        } else {
            spec.start_revision
        };
        let group = if start > revision {
            Group::Synced
        } else {
            Group::Unsynced
        };
        let watcher = Watcher {
            stream,
            id,
            span: spec.span,
            no_put: spec.no_put,
            no_delete: spec.no_delete,
            prev_kv: spec.prev_kv,
            fragment: spec.fragment,
            progress_notify: spec.progress_notify,
            quiet: true,
            group,
            next_rev: start,
            held: VecDeque::new(),
            held_events: 0,
        };
        announce(WatchResponse {
            header: header(revision),
            watch_id: id,
            created: true,
            ..Default::default()
        });
        match group {
            Group::Synced => s.synced.insert(key, &watcher.span),
            _ => {
                s.unsynced.insert(key);
            }
        }
        let inserted = s.watchers.insert(watcher);
        debug_assert_eq!(inserted, key, "filed under the key it was stored with");
        Some(id)
    }

    /// Cancels watcher `id` of `stream`; false if there is no such watcher. Nothing of it is
    /// queued after this returns.
    pub fn cancel(&self, stream: StreamId, id: i64) -> bool {
        let mut s = self.lock();
        let Some(key) = s
            .streams
            .get_mut(&stream)
            .and_then(|st| st.watchers.remove(&id))
        else {
            return false;
        };
        s.drop_watcher(key);
        s.shrink();
        true
    }

    /// Answers a progress request: once every watcher of the stream is synced, a response with
    /// no watch id and the hub's revision is queued after every event up to that revision.
    /// `reply` queues it now if possible; otherwise the request waits for the next
    /// [`WatchHub::retry`].
    pub fn request_progress(&self, stream: StreamId, reply: impl FnOnce(WatchResponse) -> bool) {
        let mut s = self.lock();
        let revision = s.revision;
        let synced = s.stream_synced(stream);
        let Some(st) = s.streams.get_mut(&stream) else {
            return;
        };
        st.progress_pending = !(synced && reply(progress(INVALID_WATCH_ID, revision)));
    }

    /// Hands the events of one applied revision to the synced watchers they hit. `prev`
    /// looks up a key's value before a revision (only called for `prev_kv` watchers).
    pub fn notify(
        &self,
        revision: i64,
        events: &[Event],
        mut prev: impl FnMut(&[u8], i64) -> Option<KeyValue>,
    ) {
        let mut s = self.lock();
        s.revision = s.revision.max(revision);
        if s.watchers.is_empty() || events.is_empty() {
            return;
        }
        // (watcher, event) pairs, grouped by watcher with its events in order: one vector
        // for the whole revision rather than one per watcher hit.
        let mut hit: Vec<(u64, usize)> = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            let key = ev.kv.as_ref().map_or(&[][..], |kv| &kv.key[..]);
            s.synced.hits(key, |w| hit.push((w, i)));
        }
        if hit.is_empty() {
            return;
        }
        hit.sort_unstable();
        // The events are shared by every watcher of every stream; those with a previous value
        // attached are made once per event, however many `prev_kv` watchers want it.
        let shared: Arc<[Event]> = events.into();
        let mut with_prev: Vec<Event> = Vec::new();
        let mut prev_at: Vec<Option<u32>> = vec![None; events.len()];
        // One fan-out per stream hit, with the hub keys of its watchers.
        let mut fanouts: Vec<(StreamId, Fanout, Vec<u64>)> = Vec::new();
        let mut slot_of: HashMap<StreamId, usize> = HashMap::default();
        // Victims' shares, made into responses for their held buffers at the end.
        let mut behind = Fanout::new(revision, shared.clone(), Arc::from(Vec::new()));
        let mut behind_keys: Vec<u64> = Vec::new();
        let mut picks: Vec<u32> = Vec::new();
        for group in hit.chunk_by(|a, b| a.0 == b.0) {
            let key = group[0].0;
            let Some(w) = s.watchers.get_mut(&key) else {
                continue;
            };
            if w.next_rev > revision {
                continue;
            }
            // One vector reused for every watcher rather than one allocated for each.
            picks.clear();
            for &(_, i) in group {
                if !w.keeps(&events[i]) {
                    continue;
                }
                if !w.prev_kv {
                    picks.push(i as u32);
                    continue;
                }
                let at = *prev_at[i].get_or_insert_with(|| {
                    let mut ev = events[i].clone();
                    if !is_create(&ev)
                        && let Some(kv) = &ev.kv
                    {
                        ev.prev_kv = prev(&kv.key, kv.mod_revision - 1);
                    }
                    with_prev.push(ev);
                    (with_prev.len() - 1) as u32
                });
                picks.push(at);
            }
            if picks.is_empty() {
                continue;
            }
            if w.group != Group::Synced {
                // A victim's events join its held responses, behind what it already holds.
                behind.push(w.id, w.fragment, w.prev_kv, picks.iter().copied());
                behind_keys.push(key);
                continue;
            }
            // Watchers of one stream are mostly created together, so mostly adjacent here;
            // many one-watcher streams (a client each) go through the map.
            let slot = match fanouts.last() {
                Some((st, _, _)) if *st == w.stream => fanouts.len() - 1,
                _ => *slot_of.entry(w.stream).or_insert_with(|| {
                    fanouts.push((
                        w.stream,
                        Fanout::new(revision, shared.clone(), Arc::from(Vec::new())),
                        Vec::new(),
                    ));
                    fanouts.len() - 1
                }),
            };
            let (_, fanout, members) = &mut fanouts[slot];
            fanout.push(w.id, w.fragment, w.prev_kv, picks.iter().copied());
            members.push(key);
            // Marked sent now, while the watcher is at hand, rather than looked up again
            // after the send (a cache miss per watcher under a fan-out). If the stream's
            // queue turns out full, `deliver_each` marks it sent again or makes it a victim
            // whose held response, not `next_rev`, says where it resumes.
            w.next_rev = revision + 1;
            w.quiet = false;
        }
        let with_prev: Arc<[Event]> = with_prev.into();
        for (stream, mut fanout, members) in fanouts {
            fanout.with_prev = with_prev.clone();
            if let Err(fanout) = s.send_fanout(stream, fanout) {
                // The queue is full: each watcher tries alone, then holds its events.
                s.deliver_each(&fanout, members);
            }
        }
        behind.with_prev = with_prev;
        s.deliver_each(&behind, behind_keys);
    }

    /// Retries victims and pending progress requests, and sends periodic progress responses
    /// when `progress_tick` is set. Returns true if work remains.
    pub fn retry(&self, progress_tick: bool) -> bool {
        let mut s = self.lock();
        let victims: Vec<u64> = s.victims.iter().copied().collect();
        for key in victims {
            s.flush_victim(key);
        }
        if progress_tick {
            s.progress_tick();
        }
        let pending: Vec<StreamId> = s
            .streams
            .iter()
            .filter(|(_, st)| st.progress_pending)
            .map(|(id, _)| *id)
            .collect();
        let revision = s.revision;
        for id in pending {
            if s.stream_synced(id)
                && let Some(st) = s.streams.get_mut(&id)
                && st
                    .sink
                    .try_send(Outgoing {
                        response: progress(INVALID_WATCH_ID, revision),
                        fragment: false,
                    })
                    .is_ok()
            {
                st.progress_pending = false;
            }
        }
        !s.victims.is_empty() || !s.unsynced.is_empty()
    }

    /// Moves every watcher back to catching up from storage (the store was replaced by a
    /// snapshot, so what synced watchers were told may not continue the new state).
    pub fn resync_all(&self, revision: i64) {
        let mut s = self.lock();
        let delivered = s.revision;
        let keys: Vec<u64> = s.watchers.keys().collect();
        for key in keys {
            // A synced watcher has been offered everything up to the old revision.
            if let Some(w) = s.watchers.get_mut(&key)
                && w.group == Group::Synced
            {
                w.next_rev = w.next_rev.max(delivered + 1);
            }
            s.make_unsynced(key);
        }
        s.revision = revision;
    }

    /// Which unsynced watchers to catch up next, or `None` if none.
    pub(crate) fn plan_sync(&self) -> Option<SyncPlan> {
        let s = self.lock();
        let mut watchers = Vec::new();
        for key in &s.unsynced {
            let Some(w) = s.watchers.get(key) else {
                continue;
            };
            if !s
                .streams
                .get(&w.stream)
                .is_some_and(|st| st.sink.has_room())
            {
                continue;
            }
            watchers.push((*key, w.next_rev, w.span.clone(), w.prev_kv));
            if watchers.len() >= SYNC_MAX_WATCHERS {
                break;
            }
        }
        let from = watchers.iter().map(|w| w.1).min()?;
        Some(SyncPlan {
            watchers,
            from,
            to: s.revision,
        })
    }

    /// Delivers a catch-up round: `events` are every event of revisions `from..=upto` (in
    /// revision order, prev kvs filled where asked), `compacted` the compaction revision of
    /// the storage they were read from. Watchers that reach the hub's revision become synced.
    pub(crate) fn finish_sync(&self, plan: &SyncPlan, events: &[Event], upto: i64, compacted: i64) {
        let mut s = self.lock();
        let revision = s.revision;
        for (key, next_rev, _, _) in &plan.watchers {
            let Some(w) = s.watchers.get(key) else {
                continue;
            };
            // Canceled and re-created, or moved on, since the plan.
            if w.group != Group::Unsynced || w.next_rev != *next_rev {
                continue;
            }
            if *next_rev < compacted {
                // etcd's compaction response carries no header revision.
                let response = WatchResponse {
                    header: header(0),
                    watch_id: w.id,
                    canceled: true,
                    compact_revision: compacted,
                    ..Default::default()
                };
                let stream = w.stream;
                if s.send(stream, response, false).is_ok() {
                    s.unsynced.remove(key);
                    if let Some(w) = s.watchers.get_mut(key) {
                        w.group = Group::Compacted;
                    }
                }
                continue;
            }
            let evs: Vec<Event> = events
                .iter()
                .filter(|ev| {
                    ev.kv
                        .as_ref()
                        .is_some_and(|kv| kv.mod_revision >= *next_rev && w.span.contains(&kv.key))
                        && w.keeps(ev)
                })
                .map(|ev| {
                    let mut ev = ev.clone();
                    if !w.prev_kv {
                        ev.prev_kv = None;
                    }
                    ev
                })
                .collect();
            if !evs.is_empty() {
                let response = WatchResponse {
                    header: header(revision),
                    watch_id: w.id,
                    events: evs,
                    ..Default::default()
                };
                let (stream, fragment) = (w.stream, w.fragment);
                if s.send(stream, response, fragment).is_err() {
                    continue;
                }
            }
            if let Some(w) = s.watchers.get_mut(key) {
                w.next_rev = w.next_rev.max(upto + 1);
                if w.next_rev > revision {
                    s.unsynced.remove(key);
                    let span = s.watchers.get_mut(key).map(|w| {
                        w.group = Group::Synced;
                        w.span.clone()
                    });
                    if let Some(span) = span {
                        s.synced.insert(*key, &span);
                    }
                }
            }
        }
    }
}

fn progress(watch_id: i64, revision: i64) -> WatchResponse {
    WatchResponse {
        header: header(revision),
        watch_id,
        ..Default::default()
    }
}

/// A put that created its key (etcd's `IsCreateEvent`): it has no previous value.
pub(crate) fn is_create(ev: &Event) -> bool {
    ev.r#type == EventType::Put as i32
        && ev
            .kv
            .as_ref()
            .is_some_and(|kv| kv.create_revision == kv.mod_revision)
}

impl HubState {
    /// Queues `response` on `stream`; hands it back if the queue is full (or the stream gone).
    fn send(
        &mut self,
        stream: StreamId,
        response: WatchResponse,
        fragment: bool,
    ) -> Result<(), WatchResponse> {
        let Some(st) = self.streams.get(&stream) else {
            return Err(response);
        };
        st.sink
            .try_send(Outgoing { response, fragment })
            .map_err(|out| out.response)
    }

    /// Queues one revision for several synced watchers of `stream`; hands it back if the
    /// queue is full (or the stream gone).
    fn send_fanout(&mut self, stream: StreamId, fanout: Fanout) -> Result<(), Fanout> {
        match self.streams.get(&stream) {
            Some(st) => st.sink.try_send_fanout(fanout),
            None => Err(fanout),
        }
    }

    /// Delivers a fan-out watcher by watcher (`keys`: their hub keys, in its order), each by
    /// [`HubState::deliver_live`].
    fn deliver_each(&mut self, fanout: &Fanout, keys: Vec<u64>) {
        for (fw, key) in fanout.watchers.iter().zip(keys) {
            self.deliver_live(key, fanout.revision, fanout.response(fw));
        }
    }

    fn deliver_live(&mut self, key: u64, revision: i64, response: WatchResponse) {
        let Some(w) = self.watchers.get(&key) else {
            return;
        };
        let (stream, fragment, group) = (w.stream, w.fragment, w.group);
        let response = if group == Group::Synced {
            match self.send(stream, response, fragment) {
                Ok(()) => {
                    if let Some(w) = self.watchers.get_mut(&key) {
                        w.next_rev = revision + 1;
                        w.quiet = false;
                    }
                    return;
                }
                Err(response) => {
                    self.victims.insert(key);
                    if let Some(w) = self.watchers.get_mut(&key) {
                        w.group = Group::Victim;
                    }
                    response
                }
            }
        } else {
            response
        };
        let Some(w) = self.watchers.get_mut(&key) else {
            return;
        };
        let n = response.events.len();
        w.held_events += n;
        w.held.push_back(response);
        let own = w.held_events;
        let stream_held = self.streams.get_mut(&stream).map_or(0, |st| {
            st.held_events += n;
            st.held_events
        });
        if own > VICTIM_MAX_EVENTS || stream_held > STREAM_MAX_HELD_EVENTS {
            // Too far behind to buffer: read it back from storage instead.
            self.make_unsynced(key);
        }
    }

    fn flush_victim(&mut self, key: u64) {
        loop {
            let Some(w) = self.watchers.get_mut(&key) else {
                self.victims.remove(&key);
                return;
            };
            if w.held.is_empty() {
                w.group = Group::Synced;
                w.next_rev = self.revision + 1;
                self.victims.remove(&key);
                return;
            }
            let Some(response) = w.held.pop_front() else {
                return;
            };
            let (stream, fragment) = (w.stream, w.fragment);
            let revision = response.header.as_ref().map_or(0, |h| h.revision);
            let events = response.events.len();
            if let Err(response) = self.send(stream, response, fragment) {
                if let Some(w) = self.watchers.get_mut(&key) {
                    w.held.push_front(response);
                }
                return;
            }
            if let Some(w) = self.watchers.get_mut(&key) {
                w.held_events -= events;
                w.next_rev = revision + 1;
                w.quiet = false;
            }
            if let Some(st) = self.streams.get_mut(&stream) {
                st.held_events = st.held_events.saturating_sub(events);
            }
        }
    }

    /// Takes watcher `key` out of the live path; it will catch up from its `next_rev`.
    fn make_unsynced(&mut self, key: u64) {
        let Some(w) = self.watchers.get_mut(&key) else {
            return;
        };
        if let Some(first) = w.held.front() {
            w.next_rev = first.header.as_ref().map_or(w.next_rev, |h| h.revision);
        }
        w.held = VecDeque::new();
        let released = std::mem::take(&mut w.held_events);
        let stream = w.stream;
        let was = w.group;
        if was == Group::Compacted {
            return;
        }
        w.group = Group::Unsynced;
        let span = w.span.clone();
        if was != Group::Unsynced {
            self.synced.remove(key, &span);
        }
        self.victims.remove(&key);
        self.unsynced.insert(key);
        if let Some(st) = self.streams.get_mut(&stream) {
            st.held_events = st.held_events.saturating_sub(released);
        }
    }

    fn drop_watcher(&mut self, key: u64) {
        if let Some(w) = self.watchers.remove(&key) {
            if let Some(st) = self.streams.get_mut(&w.stream) {
                st.held_events = st.held_events.saturating_sub(w.held_events);
            }
            if matches!(w.group, Group::Synced | Group::Victim) {
                self.synced.remove(key, &w.span);
            }
            self.victims.remove(&key);
            self.unsynced.remove(&key);
        }
    }

    fn stream_synced(&self, stream: StreamId) -> bool {
        self.streams.get(&stream).is_some_and(|st| {
            st.watchers.values().all(|key| {
                self.watchers
                    .get(key)
                    .is_none_or(|w| matches!(w.group, Group::Synced | Group::Compacted))
            })
        })
    }

    /// etcd's progress ticker: a synced `progress_notify` watcher that was sent nothing since
    /// the last tick gets an empty response at the current revision.
    fn progress_tick(&mut self) {
        let revision = self.revision;
        let due: Vec<(u64, StreamId, i64)> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.progress_notify)
            .map(|(k, w)| (k, w.stream, w.id))
            .collect();
        for (key, stream, id) in due {
            let Some(w) = self.watchers.get_mut(&key) else {
                continue;
            };
            let send = w.quiet && w.group == Group::Synced;
            w.quiet = true;
            if send {
                // A full queue is busy with events: the progress is not needed then.
                let _ = self.send(stream, progress(id, revision), false);
            }
        }
    }

    /// Gives memory back after many watchers went away.
    fn shrink(&mut self) {
        self.watchers.shrink();
    }
}

#[cfg(test)]
mod tests;
