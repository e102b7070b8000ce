//! `etcdserverpb.Watch`: many watchers multiplexed over one bidirectional stream.
//!
//! Each stream has one queue, bounded by the responses it stands for: single responses, and
//! fan-out items (one revision for many of the stream's watchers) expanded only when drained.
//! The engine's watch hub fills it without ever waiting (a full queue makes the stream's
//! watchers victims, then unsynced); the stream's own requests (create, cancel, progress) wait
//! for room instead, so a client that floods creates is slowed, not the store. A background
//! task ([`run`]) catches unsynced watchers up from storage, retries victims and sends
//! periodic progress.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::task::AtomicWaker;
use kv_core::proto::etcdserverpb::{
    ResponseHeader, WatchRequest, WatchResponse, watch_request::RequestUnion,
};
use kv_core::proto::mvccpb::Event;
use kv_core::watch::{Fanout, INVALID_WATCH_ID, Outgoing, StreamId, WatchSink, WatchSpec};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::config::GRPC_OVERHEAD_BYTES;
use crate::node::Node;
use crate::service::watch_wire::{EncodedEvents, EventRuns, EventsResponse, WatchFrame};

/// Responses queued per stream before its watchers become victims, a fan-out item counting one
/// per watcher (etcd queues 128; a deeper queue lets one stream carry a thousand watchers of
/// one hot prefix without falling behind, and a fan-out item costs a few bytes per watcher).
pub const STREAM_QUEUE: usize = 16384;
/// Queued responses looked at together when the client reads slower than they are produced.
const MERGE_SCAN: usize = STREAM_QUEUE;
/// A merged response holds at most this many events...
const MERGE_MAX_EVENTS: usize = 1000;
/// ...and at most this many bytes of encoded events (clients commonly refuse messages over
/// 4 MiB).
const MERGE_MAX_BYTES: usize = 1 << 20;
/// This many responses drained within one [`LINGER`] mark the stream busy: its next drain waits
/// up to [`LINGER`] so that each watcher's next few revisions leave as one message. Under a hot
/// fan-out this turns a thousand one-event messages per write into fewer, fuller ones (the
/// client's cost is per message, and so is much of ours); an idle stream never waits.
const BUSY_DRAIN: usize = 256;
/// ...provided they came from revisions that each reached at least this many of the stream's
/// watchers on average. Only then does waiting merge anything: the same watchers are hit by
/// the next revisions too. A thousand watchers of distinct keys gain nothing from waiting,
/// and lingering there only put 10 ms on their p99.
const BUSY_SPREAD: usize = 4;
/// The longest a busy stream waits before its next drain (etcd's catch-up of slow watchers
/// batches every 100 ms; this stays far below that).
const LINGER: Duration = Duration::from_millis(10);
/// A lingering stream drains at once when its queue is this full, so waiting never pushes
/// its watchers onto the victim path (what made an unbounded linger slower, not faster).
const LINGER_MAX_QUEUED: usize = STREAM_QUEUE / 2;
/// How often the background task works while watchers are behind.
const BACKLOG_TICK: Duration = Duration::from_millis(10);
/// How often it looks for work when nobody woke it.
const IDLE_TICK: Duration = Duration::from_millis(50);

/// What a stream's queue carries.
enum Item {
    /// A response for one watcher.
    One(Outgoing),
    /// One revision for several watchers, expanded when drained.
    Fanout(Fanout),
    /// The end of the stream with an error: the client sent something undecodable or over
    /// the size limit, and etcd then ends the call with grpc's status.
    End(Status),
}

impl Item {
    /// Responses it stands for.
    fn weight(&self) -> usize {
        match self {
            Item::One(_) => 1,
            Item::Fanout(f) => f.weight(),
            Item::End(_) => 0,
        }
    }
}

/// A stream's outgoing queue, bounded by the responses it stands for (a fan-out item for a
/// thousand watchers weighs a thousand) rather than by items.
struct StreamQueue {
    tx: mpsc::UnboundedSender<Item>,
    /// Responses queued and not yet drained.
    queued: AtomicUsize,
    /// Wakes a lingering [`Responses`] once the queue passes [`LINGER_MAX_QUEUED`].
    filling: AtomicWaker,
    /// Wakes the request reader waiting for room.
    room: Notify,
}

impl StreamQueue {
    /// Queues `item`. A receiver that went away in the meantime drops it: nobody would read
    /// it (the stream is closing).
    fn push(&self, item: Item) {
        let weight = item.weight();
        let before = self.queued.fetch_add(weight, Ordering::AcqRel);
        if self.tx.send(item).is_err() {
            self.queued.fetch_sub(weight, Ordering::AcqRel);
            return;
        }
        if before + weight >= LINGER_MAX_QUEUED {
            self.filling.wake();
        }
    }

    /// Responses queued and not yet drained.
    fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether a response can be queued now.
    fn open_with_room(&self) -> bool {
        self.has_room() && !self.tx.is_closed()
    }

    /// Counts `weight` responses drained, waking a request reader if room appeared.
    fn drained(&self, weight: usize) {
        let before = self.queued.fetch_sub(weight, Ordering::AcqRel);
        if before >= STREAM_QUEUE && before - weight < STREAM_QUEUE {
            self.room.notify_waiters();
        }
    }

    /// Waits until the queue has room or its reader is gone (the stream's own requests wait;
    /// the hub never does).
    async fn room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_room() || self.tx.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// The reader went away: closes its end (`rx`) and wakes a request reader waiting for
    /// room, which would otherwise wait for good (nothing drains the queue any more).
    fn reader_gone(&self, rx: &mut mpsc::UnboundedReceiver<Item>) {
        rx.close();
        self.room.notify_waiters();
    }
}

impl WatchSink for StreamQueue {
    fn try_send(&self, out: Outgoing) -> Result<(), Outgoing> {
        if !self.open_with_room() {
            return Err(out);
        }
        self.push(Item::One(out));
        Ok(())
    }

    fn try_send_fanout(&self, fanout: Fanout) -> Result<(), Fanout> {
        if !self.open_with_room() {
            return Err(fanout);
        }
        self.push(Item::Fanout(fanout));
        Ok(())
    }

    fn has_room(&self) -> bool {
        self.queued() < STREAM_QUEUE
    }
}

/// The Watch service.
pub struct WatchService {
    node: Arc<Node>,
    wake: Arc<Notify>,
}

impl WatchService {
    /// A Watch service over `node`; `wake` rouses [`run`] when a watcher needs catching up.
    pub fn new(node: Arc<Node>, wake: Arc<Notify>) -> Self {
        Self { node, wake }
    }
}

/// Closes the hub's side of a stream when the response stream goes away (the client left).
struct StreamGuard {
    node: Arc<Node>,
    stream: StreamId,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.node.store.watch_hub().close_stream(self.stream);
    }
}

/// The response stream: queued responses, headers filled, split when a watcher asked for
/// fragments.
pub struct Responses {
    rx: mpsc::UnboundedReceiver<Item>,
    queue: Arc<StreamQueue>,
    node: Arc<Node>,
    ready: VecDeque<WatchFrame>,
    /// The error that ends the call once `ready` is sent.
    end: Option<Status>,
    /// Set after a busy drain: the next drain waits for it or for the queue to fill.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    /// What it drained lately, to tell a busy fan-out stream from others.
    window: DrainWindow,
    _guard: StreamGuard,
}

impl Responses {
    /// Whether a busy stream should wait longer before its next drain.
    fn lingering(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.linger.as_mut() else {
            return false;
        };
        if self.queue.queued() < LINGER_MAX_QUEUED {
            self.queue.filling.register(cx.waker());
            // Looked at again after registering, so a send in between is not missed.
            if self.queue.queued() < LINGER_MAX_QUEUED && deadline.as_mut().poll(cx).is_pending() {
                return true;
            }
        }
        self.linger = None;
        false
    }
}

/// Whether `responses` drained within one window, from `items` queue items, make a stream
/// worth lingering on (see [`BUSY_DRAIN`] and [`BUSY_SPREAD`]).
fn busy_fanout(responses: usize, items: usize) -> bool {
    responses >= BUSY_DRAIN && responses >= BUSY_SPREAD * items
}

/// The responses a stream drained within the last [`LINGER`] or so, and the queue items
/// (revisions, or single responses) they came in.
struct DrainWindow {
    start: tokio::time::Instant,
    responses: usize,
    items: usize,
}

impl DrainWindow {
    fn new(now: tokio::time::Instant) -> Self {
        Self {
            start: now,
            responses: 0,
            items: 0,
        }
    }

    /// Counts a drain of `responses` from `items` at `now`; true when that makes the stream
    /// a busy fan-out, which then starts counting afresh.
    fn busy_after(&mut self, now: tokio::time::Instant, responses: usize, items: usize) -> bool {
        if now.duration_since(self.start) > LINGER {
            *self = Self::new(now);
        }
        self.responses += responses;
        self.items += items;
        let busy = busy_fanout(self.responses, self.items);
        if busy {
            *self = Self::new(now);
        }
        busy
    }
}

impl Drop for Responses {
    fn drop(&mut self) {
        self.queue.reader_gone(&mut self.rx);
    }
}

impl Stream for Responses {
    type Item = Result<WatchFrame, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(r) = self.ready.pop_front() {
            return Poll::Ready(Some(Ok(r)));
        }
        if let Some(end) = self.end.take() {
            // What was queued before the error went out first; now the call ends.
            self.rx.close();
            return Poll::Ready(Some(Err(end)));
        }
        if self.lingering(cx) {
            return Poll::Pending;
        }
        let first = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => item,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        // Whatever else is already queued goes out with it, merged per watcher: under load
        // fewer, larger messages; when idle, no wait at all.
        let mut weight = 0;
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            if let Item::End(status) = item {
                self.end = Some(status);
                break;
            }
            weight += item.weight();
            batch.push(item);
            if weight < MERGE_SCAN {
                next = self.rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            let end = self.end.take().map(Err);
            self.rx.close();
            return Poll::Ready(end);
        }
        self.queue.drained(weight);
        if self
            .window
            .busy_after(tokio::time::Instant::now(), weight, batch.len())
        {
            self.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let limit = self.node.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
        // One look at Raft's term for the whole batch.
        let base = self.node.header(0).unwrap_or_default();
        for pending in merge(batch) {
            pending.push_frames(base, limit, &mut self.ready);
        }
        Poll::Ready(self.ready.pop_front().map(Ok))
    }
}

/// A drained response before its header is filled in.
#[derive(Clone)]
enum Pending {
    /// A watcher's events, which its later events may join.
    Events {
        watch_id: i64,
        /// The revision of its last events: the header's.
        revision: i64,
        /// The watcher asked for large responses to be split.
        split: bool,
        events: EventRuns,
    },
    /// Anything else (created, canceled, compacted, progress), passed through.
    Other(WatchResponse),
}

impl Pending {
    /// Queues it on `out` with `base` as its header (the revision stays its own), cut into
    /// fragments under `limit` bytes if its watcher asked for them (etcd cuts at the request
    /// limit plus gRPC's head-room).
    fn push_frames(self, base: ResponseHeader, limit: usize, out: &mut VecDeque<WatchFrame>) {
        match self {
            Pending::Events {
                watch_id,
                revision,
                split,
                events,
            } => {
                let response = EventsResponse {
                    header: ResponseHeader { revision, ..base },
                    watch_id,
                    fragment: false,
                    events,
                };
                if split {
                    out.extend(
                        response
                            .fragments(limit)
                            .into_iter()
                            .map(WatchFrame::Events),
                    );
                } else {
                    out.push_back(WatchFrame::Events(response));
                }
            }
            Pending::Other(mut response) => {
                let revision = response.header.as_ref().map_or(0, |h| h.revision);
                response.header = Some(ResponseHeader { revision, ..base });
                out.push_back(WatchFrame::Message(response));
            }
        }
    }
}

/// Builds the drained items' responses, merging each watcher's event responses (later events
/// appended to its earlier response, which moves them ahead of other watchers' responses
/// only). A fan-out item becomes one response per watcher here, or joins the watcher's open
/// one. Responses of watchers that asked for fragments merge too (kv-client and etcd's Go
/// client always ask): the merged response is cut into fragments afterwards if it outgrows
/// the limit. Anything else (created, canceled, compacted, progress) is passed through as a
/// barrier: nothing of that watcher, or of any watcher for a stream-wide progress, is merged
/// across it.
fn merge(batch: Vec<Item>) -> Vec<Pending> {
    // Sized for the widest item: under a fan-out each drained revision goes to the same
    // watchers, so that is how many responses come out, and nothing regrows while filling.
    let widest = batch.iter().map(Item::weight).max().unwrap_or(0);
    let mut merged = Merged::with_capacity(widest);
    for item in batch {
        match item {
            Item::One(o) => {
                let r = o.response;
                let plain =
                    !r.events.is_empty() && !r.created && !r.canceled && r.compact_revision == 0;
                if !plain {
                    merged.barrier(r);
                    continue;
                }
                let revision = r.header.as_ref().map_or(0, |h| h.revision);
                let events = EventRuns::encode(&r.events);
                merged.add(r.watch_id, revision, o.fragment, events);
            }
            Item::Fanout(f) => {
                // Each list is encoded once for all of this stream's watchers, and only the
                // events some watcher takes.
                let encode = |list: &Arc<[Event]>, prev_kv: bool| {
                    let mut wanted = vec![false; list.len()];
                    for w in f.watchers.iter().filter(|w| w.prev_kv == prev_kv) {
                        for &p in f.picks_of(w) {
                            if let Some(slot) = wanted.get_mut(p as usize) {
                                *slot = true;
                            }
                        }
                    }
                    EncodedEvents::new(list, |i| wanted[i])
                };
                let plain = encode(&f.events, false);
                let with_prev = f
                    .watchers
                    .iter()
                    .any(|w| w.prev_kv)
                    .then(|| encode(&f.with_prev, true));
                for w in &f.watchers {
                    let list = match (&with_prev, w.prev_kv) {
                        (Some(with_prev), true) => with_prev,
                        _ => &plain,
                    };
                    let mut events = EventRuns::default();
                    list.take(f.picks_of(w), &mut events);
                    merged.add(w.watch_id, f.revision, w.fragment, events);
                }
            }
            // Taken out of the batch by the drain, which ends the call after the rest.
            Item::End(_) => {}
        }
    }
    merged.out
}

/// [`merge`]'s output so far, and which response each watcher's later events may still join.
struct Merged {
    out: Vec<Pending>,
    open: foldhash::HashMap<i64, usize>,
}

impl Merged {
    /// Room for `responses` responses of as many watchers.
    fn with_capacity(responses: usize) -> Self {
        Self {
            out: Vec::with_capacity(responses),
            open: foldhash::HashMap::with_capacity_and_hasher(responses, Default::default()),
        }
    }

    /// Appends `events` (of `revision`) to the open response of `watch_id` if it has one
    /// with room, or opens one.
    fn add(&mut self, watch_id: i64, revision: i64, split: bool, events: EventRuns) {
        if let Some(&i) = self.open.get(&watch_id)
            && let Some(Pending::Events {
                revision: last,
                events: to,
                ..
            }) = self.out.get_mut(i)
            && to.count() + events.count() <= MERGE_MAX_EVENTS
            && to.len() + events.len() <= MERGE_MAX_BYTES
        {
            *last = revision;
            to.append(events);
            return;
        }
        self.open.insert(watch_id, self.out.len());
        self.out.push(Pending::Events {
            watch_id,
            revision,
            split,
            events,
        });
    }

    /// Passes `response` through: nothing of its watcher (of any, for a stream-wide
    /// progress) is merged across it.
    fn barrier(&mut self, response: WatchResponse) {
        if response.watch_id == INVALID_WATCH_ID {
            self.open.clear();
        } else {
            self.open.remove(&response.watch_id);
        }
        self.out.push(Pending::Other(response));
    }
}

impl WatchService {
    /// Opens a watch stream: `request` carries the client's requests, the response its
    /// watchers' responses.
    pub fn open(&self, request: Request<Streaming<WatchRequest>>) -> Response<Responses> {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(StreamQueue {
            tx,
            queued: AtomicUsize::new(0),
            filling: AtomicWaker::new(),
            room: Notify::new(),
        });
        let stream = self.node.store.watch_hub().open_stream(queue.clone());
        let responses = Responses {
            rx,
            queue: queue.clone(),
            node: self.node.clone(),
            ready: Default::default(),
            end: None,
            linger: None,
            window: DrainWindow::new(tokio::time::Instant::now()),
            _guard: StreamGuard {
                node: self.node.clone(),
                stream,
            },
        };
        // The stream's credentials are checked at each create, as etcd does.
        let credentials = crate::auth::Credentials::of(&request);
        tokio::spawn(serve_requests(
            self.node.clone(),
            self.wake.clone(),
            stream,
            credentials,
            request.into_inner(),
            queue,
        ));
        Response::new(responses)
    }
}

/// Reads the client's requests until it stops sending. A half-closed stream keeps its
/// watchers, as in etcd; they go when the client drops the stream.
async fn serve_requests(
    node: Arc<Node>,
    wake: Arc<Notify>,
    stream: StreamId,
    credentials: crate::auth::Credentials,
    mut inbound: Streaming<WatchRequest>,
    queue: Arc<StreamQueue>,
) {
    let hub = node.store.watch_hub();
    loop {
        let req = match inbound.message().await {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(status) => {
                // An undecodable or oversized message ends the call with grpc's status, as
                // in etcd; the stream's watchers go with it.
                queue.push(Item::End(crate::oversize::as_etcd(status)));
                return;
            }
        };
        let Some(request) = req.request_union else {
            continue;
        };
        // Wait for room first, so a client flooding requests is slowed, not the hub.
        queue.room().await;
        if queue.tx.is_closed() {
            return;
        }
        let send = |response| {
            queue.push(Item::One(Outgoing {
                response,
                fragment: false,
            }))
        };
        let refuse = |reason: String| {
            send(WatchResponse {
                header: node.header(hub.revision()),
                watch_id: INVALID_WATCH_ID,
                created: true,
                canceled: true,
                cancel_reason: reason,
                ..Default::default()
            })
        };
        if let RequestUnion::CreateRequest(create) = &request
            && let Err(status) = watch_permitted(&node, &credentials, create).await
        {
            // Refused in the stream, not by ending it, with the whole status as text.
            refuse(format!(
                "rpc error: code = {:?} desc = {}",
                status.code(),
                status.message()
            ));
            continue;
        }
        match request {
            RequestUnion::CreateRequest(create) => match WatchSpec::from_request(&create) {
                Ok(spec) => {
                    let past = spec.start_revision != 0 && spec.start_revision <= hub.revision();
                    hub.create(stream, spec, send);
                    if past {
                        wake.notify_one();
                    }
                }
                Err(reason) => refuse(reason.to_string()),
            },
            RequestUnion::CancelRequest(cancel) => {
                // An unknown id gets no answer, as in etcd.
                if hub.cancel(stream, cancel.watch_id) {
                    send(WatchResponse {
                        header: node.header(hub.revision()),
                        watch_id: cancel.watch_id,
                        canceled: true,
                        ..Default::default()
                    });
                }
            }
            RequestUnion::ProgressRequest(_) => {
                hub.request_progress(stream, |progress| {
                    send(progress);
                    true
                });
                wake.notify_one();
            }
        }
    }
}

/// Whether the stream's caller may read what `create` watches (checked once, at create: a
/// watcher keeps running if its permissions later change, as in etcd).
async fn watch_permitted(
    node: &Node,
    credentials: &crate::auth::Credentials,
    create: &kv_core::proto::etcdserverpb::WatchCreateRequest,
) -> Result<(), Status> {
    let caller = node.caller(credentials).await?;
    node.check(|a| {
        a.check(
            &caller,
            kv_core::auth::Access::Read,
            &create.key,
            &create.range_end,
        )
    })
}

/// The watch hub's background work: catching unsynced watchers up from storage in bounded
/// rounds, retrying victims and pending progress requests, and the periodic progress
/// notification every `progress_interval`. Runs until `cancel`.
pub async fn run(
    node: Arc<Node>,
    wake: Arc<Notify>,
    progress_interval: Duration,
    cancel: CancellationToken,
) {
    let mut next_progress = tokio::time::Instant::now() + progress_interval;
    let mut busy = false;
    loop {
        let pause = if busy { BACKLOG_TICK } else { IDLE_TICK };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
        let store = node.store.clone();
        let synced = tokio::task::spawn_blocking(move || store.sync_watchers()).await;
        busy = match synced {
            Ok(Ok(more)) => more,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "watch: catching up from storage failed");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "watch: catch-up task failed");
                true
            }
        };
        let tick = tokio::time::Instant::now() >= next_progress;
        if tick {
            next_progress += progress_interval;
        }
        busy |= node.store.watch_hub().retry(tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::proto::mvccpb::{Event, KeyValue};

    fn event(size: usize) -> Event {
        Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: b"k".to_vec().into(),
                value: vec![7; size].into(),
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn one(batch: Vec<Outgoing>) -> Vec<Item> {
        batch.into_iter().map(Item::One).collect()
    }

    /// What a client decodes from `p`, and whether its watcher asked for fragments.
    fn decoded(p: &Pending) -> (WatchResponse, bool) {
        let split = matches!(p, Pending::Events { split: true, .. });
        let mut frames = VecDeque::new();
        p.clone()
            .push_frames(ResponseHeader::default(), usize::MAX, &mut frames);
        let response = match frames.pop_front() {
            Some(WatchFrame::Events(r)) => {
                let mut buf = bytes::BytesMut::new();
                r.encode(&mut buf);
                prost::Message::decode(buf.freeze()).expect("a WatchResponse")
            }
            Some(WatchFrame::Message(r)) => r,
            None => panic!("a pending response makes at least one frame"),
        };
        (response, split)
    }

    /// (watch id, header revision, events) of each response.
    fn shape(merged: &[Pending]) -> Vec<(i64, i64, usize)> {
        merged
            .iter()
            .map(|p| {
                let (r, _) = decoded(p);
                (
                    r.watch_id,
                    r.header.as_ref().map_or(0, |h| h.revision),
                    r.events.len(),
                )
            })
            .collect()
    }

    fn out(watch_id: i64, revision: i64, events: usize) -> Outgoing {
        Outgoing {
            response: WatchResponse {
                header: Some(kv_core::proto::etcdserverpb::ResponseHeader {
                    revision,
                    ..Default::default()
                }),
                watch_id,
                events: (0..events).map(|_| event(10)).collect(),
                ..Default::default()
            },
            fragment: false,
        }
    }

    #[test]
    fn only_a_busy_fan_out_lingers() {
        // A thousand watchers of one prefix on this stream: each revision reaches all of them.
        assert!(busy_fanout(3 * 1000, 3));
        // A quiet stream, even one whose revisions reach many watchers.
        assert!(!busy_fanout(BUSY_DRAIN - 1, 1));
        // Watchers of distinct keys: as many items as responses, nothing would merge.
        assert!(!busy_fanout(5_000, 5_000));
        assert!(!busy_fanout(5_000, 5_000 / BUSY_SPREAD + 1));
        assert!(busy_fanout(5_000, 5_000 / BUSY_SPREAD));
    }

    #[test]
    fn the_drain_window_counts_within_a_linger_and_starts_afresh() {
        let t0 = tokio::time::Instant::now();
        let mut w = DrainWindow::new(t0);
        // Fan-out drains adding up within one window.
        assert!(!w.busy_after(t0, 200, 1));
        assert!(w.busy_after(t0 + LINGER / 2, 200, 1));
        // A busy verdict starts a new window; drains further apart than a linger never add up.
        assert!(!w.busy_after(t0 + LINGER / 2, 200, 1));
        assert!(!w.busy_after(t0 + LINGER * 2, 200, 1));
        // Distinct keys: many responses, one item each.
        let mut w = DrainWindow::new(t0);
        assert!(!w.busy_after(t0, 1_000, 1_000));
    }

    #[test]
    fn merge_joins_a_watchers_responses_but_not_across_barriers() {
        let created = Outgoing {
            response: WatchResponse {
                watch_id: 2,
                created: true,
                ..Default::default()
            },
            fragment: false,
        };
        let progress = out(INVALID_WATCH_ID, 9, 0);
        let batch = vec![
            out(1, 3, 1),
            out(2, 3, 2),
            out(1, 4, 1),
            created,
            out(2, 5, 1),
            out(1, 5, 3),
            progress,
            out(1, 6, 1),
        ];
        assert_eq!(
            shape(&merge(one(batch))),
            vec![
                (1, 5, 5),
                (2, 3, 2),
                (2, 0, 0),
                (2, 5, 1),
                (-1, 9, 0),
                (1, 6, 1)
            ]
        );
        // The event cap starts a new response.
        let big: Vec<Outgoing> = (0..3)
            .map(|r| out(7, r, MERGE_MAX_EVENTS / 2 - 1))
            .collect();
        assert_eq!(merge(one(big)).len(), 2);
    }

    #[test]
    fn merge_joins_responses_of_watchers_that_asked_for_fragments() {
        // kv-client asks every watch for fragments; their responses used to pass unmerged, so
        // a hot fan-out sent one message per event however far the stream fell behind.
        let fragmenting = |watch_id, revision| Outgoing {
            fragment: true,
            ..out(watch_id, revision, 1)
        };
        let batch = vec![
            fragmenting(1, 3),
            fragmenting(2, 3),
            fragmenting(1, 4),
            fragmenting(2, 4),
        ];
        let merged: Vec<(WatchResponse, bool)> = merge(one(batch)).iter().map(decoded).collect();
        assert_eq!(merged.len(), 2);
        assert!(
            merged
                .iter()
                .all(|(r, split)| *split && r.events.len() == 2)
        );
        assert_eq!(merged[0].0.header.as_ref().map(|h| h.revision), Some(4));
    }

    #[test]
    fn fanouts_expand_per_watcher_and_merge_with_its_other_responses() {
        let events: Arc<[Event]> = vec![event(10), event(20)].into();
        let fanout = |revision, watchers: &[(i64, &[u32])]| {
            let mut f = Fanout::new(revision, events.clone(), Arc::from(Vec::new()));
            for (id, picks) in watchers {
                f.push(*id, true, false, picks.iter().copied());
            }
            Item::Fanout(f)
        };
        let batch = vec![
            fanout(3, &[(1, &[0]), (2, &[0, 1])]),
            Item::One(out(1, 4, 1)),
            fanout(5, &[(1, &[1]), (2, &[1])]),
            Item::One(Outgoing {
                response: WatchResponse {
                    watch_id: 2,
                    canceled: true,
                    ..Default::default()
                },
                fragment: false,
            }),
            fanout(6, &[(1, &[0])]),
        ];
        assert_eq!(batch.iter().map(Item::weight).sum::<usize>(), 7);
        let merged = merge(batch);
        assert_eq!(shape(&merged), vec![(1, 6, 4), (2, 5, 3), (2, 0, 0)]);
        let (first, split) = decoded(&merged[0]);
        assert!(split);
        // Watcher 1's events in order: revision 3's first, 4's, 5's second, 6's first.
        let sizes: Vec<usize> = first
            .events
            .iter()
            .map(|e| e.kv.as_ref().map_or(0, |kv| kv.value.len()))
            .collect();
        assert_eq!(sizes, vec![10, 10, 20, 10]);
    }

    #[test]
    fn prev_kv_watchers_get_their_events_in_revision_order() {
        // `with_prev` is filled in the order watchers first ask, so a watcher's picks there
        // need not ascend: watcher 2's events are with_prev[1] then with_prev[0].
        let keyed = |key: &str| Event {
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            }),
            prev_kv: Some(KeyValue::default()),
            ..Default::default()
        };
        let with_prev: Arc<[Event]> = vec![keyed("b"), keyed("a")].into();
        let mut f = Fanout::new(4, Arc::from(Vec::new()), with_prev);
        f.push(1, false, true, [0]);
        f.push(2, false, true, [1, 0]);
        let merged = merge(vec![Item::Fanout(f)]);
        let keys = |p: &Pending| -> Vec<Vec<u8>> {
            decoded(p)
                .0
                .events
                .iter()
                .map(|e| e.kv.as_ref().map(|kv| kv.key.to_vec()).unwrap_or_default())
                .collect()
        };
        assert_eq!(keys(&merged[0]), vec![b"b".to_vec()]);
        assert_eq!(keys(&merged[1]), vec![b"a".to_vec(), b"b".to_vec()]);
        assert!(
            decoded(&merged[1])
                .0
                .events
                .iter()
                .all(|e| e.prev_kv.is_some())
        );
    }

    #[tokio::test]
    async fn a_request_waiting_for_room_ends_when_the_reader_goes() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let queue = Arc::new(StreamQueue {
            tx,
            queued: AtomicUsize::new(STREAM_QUEUE),
            filling: AtomicWaker::new(),
            room: Notify::new(),
        });
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // What dropping `Responses` does.
        queue.reader_gone(&mut rx);
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiting request reader was released")
            .unwrap();
    }
}
