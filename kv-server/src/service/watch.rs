//! `etcdserverpb.Watch`: many watchers multiplexed over one bidirectional stream.
//!
//! Each stream has one bounded queue of responses. The engine's watch hub fills it without
//! ever waiting (a full queue makes the stream's watchers victims, then unsynced); the stream's
//! own requests (create, cancel, progress) wait for room instead, so a client that floods
//! creates is slowed, not the store. A background task ([`run`]) catches unsynced watchers up
//! from storage, retries victims and sends periodic progress.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use kv_core::proto::etcdserverpb::{WatchRequest, WatchResponse, watch_request::RequestUnion};
use kv_core::watch::{INVALID_WATCH_ID, Outgoing, StreamId, WatchSink, WatchSpec};
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::config::GRPC_OVERHEAD_BYTES;
use crate::node::Node;
use crate::service::pending::BoxStream;

/// Responses queued per stream before its watchers become victims (etcd queues 128; a deeper
/// queue lets one stream carry a thousand watchers of one hot prefix without falling behind).
pub const STREAM_QUEUE: usize = 4096;
/// How often the background task works while watchers are behind.
const BACKLOG_TICK: Duration = Duration::from_millis(10);
/// How often it looks for work when nobody woke it.
const IDLE_TICK: Duration = Duration::from_millis(50);

struct QueueSink(mpsc::Sender<Outgoing>);

impl WatchSink for QueueSink {
    fn try_send(&self, out: Outgoing) -> bool {
        self.0.try_send(out).is_ok()
    }

    fn has_room(&self) -> bool {
        self.0.capacity() > 0
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
struct Responses {
    queue: mpsc::Receiver<Outgoing>,
    node: Arc<Node>,
    ready: std::collections::VecDeque<WatchResponse>,
    _guard: StreamGuard,
}

impl Stream for Responses {
    type Item = Result<WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(r) = self.ready.pop_front() {
            return Poll::Ready(Some(Ok(r)));
        }
        match self.queue.poll_recv(cx) {
            Poll::Ready(Some(out)) => {
                let mut response = out.response;
                self.node.fill(&mut response.header);
                if out.fragment {
                    // etcd cuts at the request limit plus gRPC's head-room.
                    let limit = self.node.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
                    self.ready.extend(fragments(response, limit));
                    Poll::Ready(self.ready.pop_front().map(Ok))
                } else {
                    Poll::Ready(Some(Ok(response)))
                }
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// etcd's `sendFragments`: a response over `limit` bytes with more than one event is cut into
/// pieces of at most `limit` bytes (at least one event each), all but the last marked
/// `fragment`.
fn fragments(response: WatchResponse, limit: usize) -> Vec<WatchResponse> {
    if response.encoded_len() < limit || response.events.len() < 2 {
        return vec![response];
    }
    let mut out = Vec::new();
    let mut rest = response.events.clone().into_iter().peekable();
    let shell = WatchResponse {
        events: Vec::new(),
        fragment: true,
        ..response
    };
    while rest.peek().is_some() {
        let mut cur = shell.clone();
        while let Some(ev) = rest.peek() {
            cur.events.push(ev.clone());
            if cur.events.len() > 1 && cur.encoded_len() >= limit {
                cur.events.pop();
                break;
            }
            rest.next();
        }
        cur.fragment = rest.peek().is_some();
        out.push(cur);
    }
    out
}

#[tonic::async_trait]
impl kv_core::proto::etcdserverpb::watch_server::Watch for WatchService {
    type WatchStream = BoxStream<WatchResponse>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let hub_sink = Arc::new(QueueSink(tx.clone()));
        let stream = self.node.store.watch_hub().open_stream(hub_sink);
        let responses = Responses {
            queue: rx,
            node: self.node.clone(),
            ready: Default::default(),
            _guard: StreamGuard {
                node: self.node.clone(),
                stream,
            },
        };
        tokio::spawn(serve_requests(
            self.node.clone(),
            self.wake.clone(),
            stream,
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(Box::pin(responses)))
    }
}

/// Reads the client's requests until it stops sending. A half-closed stream keeps its
/// watchers, as in etcd; they go when the client drops the stream.
async fn serve_requests(
    node: Arc<Node>,
    wake: Arc<Notify>,
    stream: StreamId,
    mut inbound: Streaming<WatchRequest>,
    tx: mpsc::Sender<Outgoing>,
) {
    let hub = node.store.watch_hub();
    while let Ok(Some(req)) = inbound.message().await {
        let Some(request) = req.request_union else {
            continue;
        };
        // Wait for room first, so the announcement never blocks the hub.
        let Ok(permit) = tx.reserve().await else {
            return;
        };
        let queue = |response| Outgoing {
            response,
            fragment: false,
        };
        match request {
            RequestUnion::CreateRequest(create) => match WatchSpec::from_request(&create) {
                Ok(spec) => {
                    let past = spec.start_revision != 0 && spec.start_revision <= hub.revision();
                    hub.create(stream, spec, |created| permit.send(queue(created)));
                    if past {
                        wake.notify_one();
                    }
                }
                Err(reason) => permit.send(queue(WatchResponse {
                    header: node.header(hub.revision()),
                    watch_id: INVALID_WATCH_ID,
                    created: true,
                    canceled: true,
                    cancel_reason: reason.to_string(),
                    ..Default::default()
                })),
            },
            RequestUnion::CancelRequest(cancel) => {
                // An unknown id gets no answer, as in etcd.
                if hub.cancel(stream, cancel.watch_id) {
                    permit.send(queue(WatchResponse {
                        header: node.header(hub.revision()),
                        watch_id: cancel.watch_id,
                        canceled: true,
                        ..Default::default()
                    }));
                }
            }
            RequestUnion::ProgressRequest(_) => {
                hub.request_progress(stream, |progress| {
                    permit.send(queue(progress));
                    true
                });
                wake.notify_one();
            }
        }
    }
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
                key: b"k".to_vec(),
                value: vec![7; size],
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    #[test]
    fn fragments_split_at_the_limit_and_flag_all_but_the_last() {
        let resp = WatchResponse {
            watch_id: 3,
            events: (0..10).map(|_| event(100)).collect(),
            ..Default::default()
        };
        assert_eq!(fragments(resp.clone(), 1 << 20).len(), 1);
        let parts = fragments(resp.clone(), 350);
        assert!(parts.len() > 2);
        assert_eq!(parts.iter().map(|p| p.events.len()).sum::<usize>(), 10);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts.last().unwrap().fragment);
        assert!(
            parts
                .iter()
                .all(|p| p.watch_id == 3 && p.encoded_len() < 350)
        );
        // A single event is never split, however large.
        let one = WatchResponse {
            events: vec![event(1000)],
            ..Default::default()
        };
        assert_eq!(fragments(one, 10).len(), 1);
    }
}
