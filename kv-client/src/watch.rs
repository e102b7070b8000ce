//! Watches: every watch of a client on one shared stream, resumed after failures.
//!
//! One background task per client owns the Watch stream while any watch is open. Each watch
//! remembers the revision it has seen up to; when the stream breaks (member down, connection
//! lost) the task reconnects, on the next endpoint if need be, and re-creates every watch from
//! its last seen revision + 1, so events are neither lost nor repeated. A watch whose resume
//! point was compacted away ends with [`Error::WatchCompacted`] rather than silently skipping.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use kv_core::proto::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
    watch_create_request::FilterType, watch_request::RequestUnion,
};
use kv_core::proto::mvccpb::{Event as ProtoEvent, KeyValue, event::EventType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::client::{Client, api};
use crate::error::{Error, Result};
use crate::kv::{Extent, extent_builders, strip};

/// Options of [`Watch::watch`].
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    extent: Extent,
    start_revision: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
}

impl WatchOptions {
    /// The key alone, from the next revision.
    pub fn new() -> Self {
        Self::default()
    }
    /// Start at revision `rev` (history first, then live).
    pub fn start_revision(mut self, rev: i64) -> Self {
        self.start_revision = rev;
        self
    }
    /// Attach the previous key-value to each event.
    pub fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
    /// Leave out puts.
    pub fn no_put(mut self) -> Self {
        self.no_put = true;
        self
    }
    /// Leave out deletes.
    pub fn no_delete(mut self) -> Self {
        self.no_delete = true;
        self
    }
    /// Ask the server for periodic empty responses carrying the current revision.
    pub fn progress_notify(mut self) -> Self {
        self.progress_notify = true;
        self
    }
}

extent_builders!(WatchOptions);

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Written.
    Put,
    /// Deleted.
    Delete,
}

/// One change.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key-value after the change (for a delete: the key and the delete's revision).
    pub kv: KeyValue,
    /// The key-value before the change, when asked for and it existed.
    pub prev_kv: Option<KeyValue>,
}

/// One message of a watch: the events of one or more whole revisions, or none for a progress
/// notification.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WatchUpdate {
    /// The store revision the server stood at when it sent this.
    pub revision: i64,
    /// The events, in revision order.
    pub events: Vec<Event>,
}

/// One registered watch, as the stream task keeps it.
struct Entry {
    request: WatchCreateRequest,
    /// The first revision not yet delivered; 0 until the server said where "now" was.
    next_rev: i64,
    updates: mpsc::UnboundedSender<Result<WatchUpdate>>,
    namespace: Arc<[u8]>,
    /// Pieces of a fragmented response, waiting for the last one.
    partial: Option<WatchResponse>,
}

#[derive(Default)]
struct Registry {
    next_id: i64,
    entries: HashMap<i64, Entry>,
    /// Commands to the running stream task, if one runs.
    commands: Option<mpsc::UnboundedSender<Command>>,
}

enum Command {
    Create(i64),
    Cancel(i64),
    Progress,
}

/// The client-wide watch state (one per [`Client`], see `Client::shared`).
#[derive(Default)]
pub(crate) struct Shared {
    registry: Mutex<Registry>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The watch API of a [`Client`].
#[derive(Debug, Clone)]
pub struct Watch {
    client: Client,
}

impl Watch {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Watches `key` (or the range the options name). The stream yields the watch's updates
    /// until it is dropped (which cancels it on the server) or ends with an error
    /// ([`Error::WatchCompacted`], [`Error::WatchCanceled`]).
    pub fn watch(&self, key: impl AsRef<[u8]>, options: WatchOptions) -> WatchStream {
        let ns = self.client.namespace();
        let (key, range_end) = options.extent.encode(ns, key.as_ref());
        let mut filters = Vec::new();
        if options.no_put {
            filters.push(FilterType::Noput as i32);
        }
        if options.no_delete {
            filters.push(FilterType::Nodelete as i32);
        }
        let shared = self.client.shared::<Shared>();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut reg = shared.lock();
        reg.next_id += 1;
        let id = reg.next_id;
        reg.entries.insert(
            id,
            Entry {
                request: WatchCreateRequest {
                    key,
                    range_end,
                    start_revision: options.start_revision,
                    progress_notify: options.progress_notify,
                    filters,
                    prev_kv: options.prev_kv,
                    watch_id: id,
                    fragment: true,
                },
                next_rev: options.start_revision,
                updates: tx,
                namespace: Arc::from(ns),
                partial: None,
            },
        );
        let commands = match &reg.commands {
            Some(c) if !c.is_closed() => c.clone(),
            _ => {
                let (ctx, crx) = mpsc::unbounded_channel();
                reg.commands = Some(ctx.clone());
                tokio::spawn(run(self.client.clone(), shared.clone(), crx));
                ctx
            }
        };
        let _ = commands.send(Command::Create(id));
        drop(reg);
        WatchStream {
            id,
            shared,
            updates: rx,
        }
    }

    /// Asks the server for a progress notification: every open watch of this client then
    /// receives an update with no events and the revision it is synced to.
    pub fn request_progress(&self) {
        let shared = self.client.shared::<Shared>();
        let reg = shared.lock();
        if let Some(c) = &reg.commands {
            let _ = c.send(Command::Progress);
        }
    }
}

/// The updates of one watch. Dropping it cancels the watch.
pub struct WatchStream {
    id: i64,
    shared: Arc<Shared>,
    updates: mpsc::UnboundedReceiver<Result<WatchUpdate>>,
}

impl Stream for WatchStream {
    type Item = Result<WatchUpdate>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.updates.poll_recv(cx)
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        let mut reg = self.shared.lock();
        if reg.entries.remove(&self.id).is_some()
            && let Some(c) = &reg.commands
        {
            let _ = c.send(Command::Cancel(self.id));
        }
    }
}

fn event(namespace: &[u8], e: ProtoEvent) -> Event {
    let mut kv = e.kv.unwrap_or_default();
    strip(namespace, &mut kv);
    let prev_kv = e.prev_kv.map(|mut p| {
        strip(namespace, &mut p);
        p
    });
    Event {
        kind: if e.r#type == EventType::Delete as i32 {
            EventKind::Delete
        } else {
            EventKind::Put
        },
        kv,
        prev_kv,
    }
}

/// What became of one stream session.
enum Ended {
    /// No watch is left: the task stops.
    Idle,
    /// The stream broke: reconnect.
    Broken,
}

/// The stream task: runs sessions until no watch is left.
async fn run(client: Client, shared: Arc<Shared>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut delays = client.backoff();
    loop {
        match session(&client, &shared, &mut commands).await {
            Ended::Idle => return,
            Ended::Broken => {
                let pause = delays.next().unwrap_or(client.options().max_backoff);
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// The create request for an entry: from where it stopped when it has seen anything.
fn create_for(entry: &Entry) -> WatchRequest {
    let mut request = entry.request.clone();
    request.start_revision = entry.next_rev;
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(request)),
    }
}

/// One connection of the shared stream: (re)creates every watch, then relays responses and
/// commands until the stream breaks or no watch is left.
async fn session(
    client: &Client,
    shared: &Arc<Shared>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Ended {
    let (index, channel) = client.channel();
    let token = client.token();
    let (out, out_rx) = mpsc::unbounded_channel::<WatchRequest>();
    // Creates sent and not yet answered, oldest first: a refused create comes back without
    // its id (as -1), and the server answers creates in order.
    let mut awaiting = std::collections::VecDeque::new();
    // Watches created on this stream: a Create command queued before the stream opened names
    // a watch the opening already created, and a second create would be refused as a
    // duplicate id.
    let mut created = std::collections::HashSet::new();
    {
        let mut reg = shared.lock();
        if reg.entries.is_empty() {
            // Closing under the lock: a watch created from now on starts a new task.
            reg.commands = None;
            commands.close();
            return Ended::Idle;
        }
        // etcd answers nothing (not even headers) before it receives a request, so the
        // creates are queued before the call is awaited.
        for (id, entry) in &reg.entries {
            let _ = out.send(create_for(entry));
            awaiting.push_back(*id);
            created.insert(*id);
        }
    }
    let mut stream = match api::watch(channel)
        .watch(UnboundedReceiverStream::new(out_rx))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(status) => {
            if client.wants_new_token(&Error::from_status(&status).0) {
                // Renewed, the next session opens with the new token on the same member.
                let _ = client.renew_token(token.as_ref()).await;
            } else {
                client.endpoint_failed(index);
            }
            return Ended::Broken;
        }
    };
    loop {
        tokio::select! {
            command = commands.recv() => {
                let request = match command {
                    Some(Command::Create(id)) => {
                        let reg = shared.lock();
                        let create = reg
                            .entries
                            .get(&id)
                            .filter(|_| created.insert(id))
                            .map(create_for);
                        if create.is_some() {
                            awaiting.push_back(id);
                        }
                        create
                    }
                    Some(Command::Cancel(id)) => Some(WatchRequest {
                        request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                            watch_id: id,
                        })),
                    }),
                    Some(Command::Progress) => Some(WatchRequest {
                        request_union: Some(RequestUnion::ProgressRequest(
                            WatchProgressRequest {},
                        )),
                    }),
                    None => return Ended::Idle,
                };
                if let Some(request) = request
                    && out.send(request).is_err()
                {
                    client.endpoint_failed(index);
                    return Ended::Broken;
                }
                let mut reg = shared.lock();
                if reg.entries.is_empty() {
                    // The last watch went: close the stream (and the task) until the next one.
                    reg.commands = None;
                    commands.close();
                    return Ended::Idle;
                }
            }
            message = stream.message() => match message {
                Ok(Some(response)) if response.created => {
                    if response.watch_id != -1 {
                        awaiting.retain(|id| *id != response.watch_id);
                        deliver(shared, response);
                        continue;
                    }
                    let Some(id) = awaiting.pop_front() else {
                        continue;
                    };
                    let reason = refusal_of(&response.cancel_reason);
                    if client.wants_new_token(&reason) {
                        // The stream's token expired or went stale: every watch is created
                        // again on a new stream, with a renewed token.
                        let _ = client.renew_token(token.as_ref()).await;
                        return Ended::Broken;
                    }
                    refuse(shared, id, reason);
                }
                Ok(Some(response)) => deliver(shared, response),
                Ok(None) | Err(_) => {
                    client.endpoint_failed(index);
                    return Ended::Broken;
                }
            },
        }
    }
}

/// The error a refused create's `cancel_reason` names: etcd writes the whole gRPC status
/// (`rpc error: code = PermissionDenied desc = etcdserver: permission denied`).
fn refusal_of(reason: &str) -> Error {
    let message = reason
        .split_once(" desc = ")
        .map_or(reason, |(_, desc)| desc);
    match Error::from_status(&tonic::Status::unknown(message)).0 {
        Error::OutcomeUnknown(_) => Error::WatchCanceled(reason.to_string()),
        known => known,
    }
}

/// Ends watch `id`, whose create the server refused.
fn refuse(shared: &Shared, id: i64, reason: Error) {
    let mut reg = shared.lock();
    if let Some(entry) = reg.entries.remove(&id) {
        let _ = entry.updates.send(Err(reason));
    }
}

/// Hands one response to the watch it belongs to (or, for a stream-wide progress
/// notification, to every watch).
fn deliver(shared: &Shared, response: WatchResponse) {
    let mut reg = shared.lock();
    let revision = response.header.as_ref().map_or(0, |h| h.revision);
    if response.watch_id == -1 && !response.created {
        for entry in reg.entries.values_mut() {
            entry.next_rev = entry.next_rev.max(revision + 1);
            let _ = entry.updates.send(Ok(WatchUpdate {
                revision,
                events: Vec::new(),
            }));
        }
        return;
    }
    let id = response.watch_id;
    let Some(entry) = reg.entries.get_mut(&id) else {
        return;
    };
    if response.created && !response.canceled {
        // "From now": the server's revision at creation fixes where a resume starts.
        if entry.next_rev == 0 {
            entry.next_rev = revision + 1;
        }
        return;
    }
    if response.compact_revision != 0 {
        let _ = entry.updates.send(Err(Error::WatchCompacted {
            compact_revision: response.compact_revision,
        }));
        reg.entries.remove(&id);
        return;
    }
    if response.canceled {
        let reason = if response.cancel_reason.is_empty() {
            "canceled by the server".to_string()
        } else {
            response.cancel_reason.clone()
        };
        let _ = entry.updates.send(Err(Error::WatchCanceled(reason)));
        reg.entries.remove(&id);
        return;
    }
    let response = match (entry.partial.take(), response.fragment) {
        (Some(mut head), fragment) => {
            head.events.extend(response.events);
            head.header = response.header;
            if fragment {
                entry.partial = Some(head);
                return;
            }
            head
        }
        (None, true) => {
            entry.partial = Some(response);
            return;
        }
        (None, false) => response,
    };
    let last = response
        .events
        .last()
        .and_then(|e| e.kv.as_ref())
        .map_or(revision, |kv| kv.mod_revision);
    if response.events.is_empty() {
        // A progress notification for this watch: everything up to `revision` is delivered.
        entry.next_rev = entry.next_rev.max(revision + 1);
    } else {
        entry.next_rev = entry.next_rev.max(last + 1);
    }
    let namespace = entry.namespace.clone();
    let events = response
        .events
        .into_iter()
        .map(|e| event(&namespace, e))
        .collect();
    let _ = entry.updates.send(Ok(WatchUpdate { revision, events }));
}
