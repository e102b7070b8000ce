//! A service's instances held in memory: one list, then a watch from the list's revision + 1
//! whose events are applied as they come. The client's watch rides out reconnects by itself;
//! when it cannot (its resume point was compacted away) or fails otherwise, the cache lists
//! again and hands the difference to its readers as ordinary changes.
//!
//! Readers of changes never slow the cache down: each has a bounded queue, and one that falls
//! more than [`CHANGES_QUEUE_LIMIT`] changes behind is brought up to date from the current
//! state instead (what it missed arrives as the difference, coalesced).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kv_client::{Client, EventKind, GetOptions, GetResponse, WatchOptions, WatchUpdate};
use tokio::sync::watch;

use super::backoff::Backoff;
use super::{Entry, Instance};
use crate::error::{Error, Result};

/// How many changes a reader of [`ServiceCache::changes`] may have pending before it is
/// switched to catching up from the current state.
pub const CHANGES_QUEUE_LIMIT: usize = 1024;
/// First pause before listing again after a failure; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts to list.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often [`ServiceCache::wait_revision`] asks the server for progress while waiting.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A change of a service's instances, as a cache applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceChange {
    /// A new instance (or one whose value became readable again).
    Added(Instance),
    /// A listed instance was written again: new endpoint, metadata or lease.
    Updated(Instance),
    /// An instance went (deregistered, lease expired, or its value became unreadable); the
    /// last known state.
    Removed(Instance),
}

impl InstanceChange {
    /// The instance concerned (for `Removed`, as it was last seen).
    pub fn instance(&self) -> &Instance {
        match self {
            InstanceChange::Added(i) | InstanceChange::Updated(i) | InstanceChange::Removed(i) => i,
        }
    }
}

/// The instances of one service, kept up to date in the background until the last clone is
/// dropped. Cheap to clone.
#[derive(Clone)]
pub struct ServiceCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ServiceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.shared.lock();
        f.debug_struct("ServiceCache")
            .field("prefix", &String::from_utf8_lossy(&self.inner.prefix))
            .field("revision", &state.revision)
            .field("instances", &state.instances.len())
            .finish()
    }
}

/// What the clones of a cache share: the state, and the task that keeps it.
struct Inner {
    prefix: Vec<u8>,
    shared: Arc<Shared>,
    /// The client, to ask for progress; `None` for a fixed cache in unit tests.
    client: Option<Client>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The state shared by the cache handles and its task. A std mutex, not a tokio one: it is
/// never held across an await, and pickers read it from synchronous code.
struct Shared {
    state: Mutex<State>,
    /// The revision the state reflects, for waiters.
    revision: watch::Sender<i64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct State {
    instances: BTreeMap<String, Instance>,
    /// Instance keys whose value is unreadable: id → why.
    invalid: BTreeMap<String, String>,
    revision: i64,
    /// The instances as a sorted slice, built on demand after a change.
    snapshot: Option<Arc<[Instance]>>,
    /// The latest failure of listing or watching, cleared by the next success.
    last_error: Option<Error>,
    /// Readers of changes by id. Each gets the same changes, so the map's order is irrelevant.
    subscribers: HashMap<u64, Subscriber>,
    next_subscriber: u64,
}

/// One reader's pending changes.
#[derive(Default)]
struct Subscriber {
    queue: VecDeque<InstanceChange>,
    /// The queue overflowed (or the reader is new): catch up from the current state instead.
    lagged: bool,
    waker: Option<Waker>,
}

impl State {
    /// Applies one watch update; returns the changes it made.
    fn apply(&mut self, prefix: &[u8], update: &WatchUpdate) -> Vec<InstanceChange> {
        let mut changes = Vec::new();
        for event in &update.events {
            let change = match event.kind {
                EventKind::Put => match Entry::parse(prefix, &event.kv) {
                    Entry::Instance(instance) => {
                        self.invalid.remove(&instance.id);
                        let id = instance.id.clone();
                        match self.instances.insert(id, instance.clone()) {
                            Some(_) => Some(InstanceChange::Updated(instance)),
                            None => Some(InstanceChange::Added(instance)),
                        }
                    }
                    Entry::Invalid { id, reason } => {
                        let gone = self.instances.remove(&id);
                        self.invalid.insert(id, reason);
                        gone.map(InstanceChange::Removed)
                    }
                    Entry::Foreign => None,
                },
                EventKind::Delete => Entry::id_of(prefix, &event.kv.key).and_then(|id| {
                    self.invalid.remove(&id);
                    self.instances.remove(&id).map(InstanceChange::Removed)
                }),
            };
            changes.extend(change);
        }
        // A progress notification (no events) says every event up to its revision was sent;
        // with events, the last one's revision is what is known to be applied.
        let revision = update
            .events
            .last()
            .map_or(update.revision, |e| e.kv.mod_revision);
        self.revision = self.revision.max(revision);
        changes
    }

    /// Replaces the state with a fresh list; returns the difference as changes.
    fn replace(&mut self, prefix: &[u8], got: &GetResponse) -> Vec<InstanceChange> {
        let mut instances = BTreeMap::new();
        let mut invalid = BTreeMap::new();
        for kv in &got.kvs {
            match Entry::parse(prefix, kv) {
                Entry::Instance(i) => {
                    instances.insert(i.id.clone(), i);
                }
                Entry::Invalid { id, reason } => {
                    invalid.insert(id, reason);
                }
                Entry::Foreign => {}
            }
        }
        let changes = diff(&self.instances, &instances);
        self.instances = instances;
        self.invalid = invalid;
        self.revision = got.revision;
        changes
    }

    /// Hands `changes` to every reader.
    fn publish(&mut self, changes: Vec<InstanceChange>) {
        if changes.is_empty() {
            return;
        }
        self.snapshot = None;
        for sub in self.subscribers.values_mut() {
            if !sub.lagged {
                if sub.queue.len() + changes.len() > CHANGES_QUEUE_LIMIT {
                    sub.lagged = true;
                    sub.queue.clear();
                } else {
                    sub.queue.extend(changes.iter().cloned());
                }
            }
            if let Some(waker) = sub.waker.take() {
                waker.wake();
            }
        }
    }

    fn snapshot(&mut self) -> Arc<[Instance]> {
        self.snapshot
            .get_or_insert_with(|| self.instances.values().cloned().collect())
            .clone()
    }
}

/// The changes that turn `old` into `new`, by id.
fn diff(old: &BTreeMap<String, Instance>, new: &BTreeMap<String, Instance>) -> Vec<InstanceChange> {
    let mut changes = Vec::new();
    for (id, before) in old {
        match new.get(id) {
            None => changes.push(InstanceChange::Removed(before.clone())),
            Some(after) if after != before => changes.push(InstanceChange::Updated(after.clone())),
            Some(_) => {}
        }
    }
    for (id, after) in new {
        if !old.contains_key(id) {
            changes.push(InstanceChange::Added(after.clone()));
        }
    }
    changes
}

impl ServiceCache {
    /// Lists `prefix` and starts following it.
    pub(super) async fn start(client: &Client, prefix: Vec<u8>) -> Result<ServiceCache> {
        let got = list(client, &prefix).await?;
        let mut state = State::default();
        state.replace(&prefix, &got);
        let (revision, _) = watch::channel(state.revision);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            revision,
        });
        let task = tokio::spawn(follow(
            client.clone(),
            prefix.clone(),
            shared.clone(),
            got.revision,
        ));
        Ok(ServiceCache {
            inner: Arc::new(Inner {
                prefix,
                shared,
                client: Some(client.clone()),
                task: Some(task),
            }),
        })
    }

    /// A cache of the service `svc`, holding `instances` and changed only by
    /// [`ServiceCache::inject`] (for tests of what reads caches).
    #[cfg(test)]
    pub(crate) fn fixed(instances: Vec<Instance>) -> ServiceCache {
        let state = State {
            instances: instances.into_iter().map(|i| (i.id.clone(), i)).collect(),
            ..State::default()
        };
        let (revision, _) = watch::channel(0);
        ServiceCache {
            inner: Arc::new(Inner {
                prefix: b"svc/".to_vec(),
                shared: Arc::new(Shared {
                    state: Mutex::new(state),
                    revision,
                }),
                client: None,
                task: None,
            }),
        }
    }

    /// Applies `update` as if it came from the server (for tests of what reads caches).
    #[cfg(test)]
    pub(crate) fn inject(&self, update: &WatchUpdate) {
        let mut state = self.inner.shared.lock();
        let changes = state.apply(&self.inner.prefix, update);
        state.publish(changes);
    }

    /// The instances now, sorted by id. Cheap: the slice is shared until the next change.
    pub fn instances(&self) -> Arc<[Instance]> {
        self.inner.shared.lock().snapshot()
    }

    /// Instance `id`, if listed.
    pub fn get(&self, id: &str) -> Option<Instance> {
        self.inner.shared.lock().instances.get(id).cloned()
    }

    /// The store revision the cache reflects: every change up to it has been applied.
    pub fn revision(&self) -> i64 {
        self.inner.shared.lock().revision
    }

    /// Instance keys whose value could not be read (id, why), sorted by id. They are left out
    /// of [`ServiceCache::instances`] until rewritten with a valid value.
    pub fn invalid(&self) -> Vec<(String, String)> {
        let state = self.inner.shared.lock();
        state
            .invalid
            .iter()
            .map(|(id, why)| (id.clone(), why.clone()))
            .collect()
    }

    /// The latest failure to list or watch, if the cache has not recovered from it yet. The
    /// cache retries every failure by itself; this says why it may be stale.
    pub fn last_error(&self) -> Option<Error> {
        self.inner.shared.lock().last_error.clone()
    }

    /// Waits until the cache reflects revision `revision` (e.g. the one
    /// [`super::Registered::revision`] gives), asking the server for progress meanwhile.
    pub async fn wait_revision(&self, revision: i64) {
        let mut seen = self.inner.shared.revision.subscribe();
        loop {
            if *seen.borrow_and_update() >= revision {
                return;
            }
            // Without a change under the prefix the watch says nothing; a progress request
            // makes the server tell how far it is.
            if let Some(client) = &self.inner.client {
                client.watch().request_progress();
            }
            let _ = tokio::time::timeout(PROGRESS_EVERY, seen.changed()).await;
        }
    }

    /// A stream of changes: first the instances listed now, as `Added`, then every change.
    /// It never ends while the stream lives (it keeps the cache alive).
    pub fn changes(&self) -> Changes {
        let mut state = self.inner.shared.lock();
        let id = state.next_subscriber;
        state.next_subscriber += 1;
        // A new reader starts "lagged" with an empty view: its first poll catches up, which
        // delivers the current instances as additions.
        state.subscribers.insert(
            id,
            Subscriber {
                lagged: true,
                ..Subscriber::default()
            },
        );
        Changes {
            cache: self.clone(),
            id,
            view: BTreeMap::new(),
            pending: VecDeque::new(),
        }
    }
}

/// The stream of [`ServiceCache::changes`].
pub struct Changes {
    cache: ServiceCache,
    id: u64,
    /// The instances as this reader has been told them, to catch up by difference.
    view: BTreeMap<String, Instance>,
    /// Changes of a catch-up, not yet delivered.
    pending: VecDeque<InstanceChange>,
}

impl Changes {
    /// The cache this stream reads.
    pub fn cache(&self) -> &ServiceCache {
        &self.cache
    }

    fn deliver(&mut self, change: InstanceChange) -> Poll<Option<InstanceChange>> {
        match &change {
            InstanceChange::Added(i) | InstanceChange::Updated(i) => {
                self.view.insert(i.id.clone(), i.clone());
            }
            InstanceChange::Removed(i) => {
                self.view.remove(&i.id);
            }
        }
        Poll::Ready(Some(change))
    }
}

impl Stream for Changes {
    type Item = InstanceChange;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(change) = this.pending.pop_front() {
            return this.deliver(change);
        }
        let shared = this.cache.inner.shared.clone();
        let mut state = shared.lock();
        let state = &mut *state;
        let Some(sub) = state.subscribers.get_mut(&this.id) else {
            // Unreachable: only dropping the stream removes its entry.
            return Poll::Ready(None);
        };
        if sub.lagged {
            sub.lagged = false;
            sub.queue.clear();
            this.pending.extend(diff(&this.view, &state.instances));
            if let Some(change) = this.pending.pop_front() {
                return this.deliver(change);
            }
        }
        let Some(sub) = state.subscribers.get_mut(&this.id) else {
            return Poll::Ready(None);
        };
        match sub.queue.pop_front() {
            Some(change) => this.deliver(change),
            None => {
                sub.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        self.cache.inner.shared.lock().subscribers.remove(&self.id);
    }
}

async fn list(client: &Client, prefix: &[u8]) -> Result<GetResponse> {
    Ok(client
        .kv()
        .get(prefix.to_vec(), GetOptions::new().prefix())
        .await?)
}

/// Keeps `shared` up to date from revision `listed` on, until aborted.
async fn follow(client: Client, prefix: Vec<u8>, shared: Arc<Shared>, listed: i64) {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    let mut from = listed;
    loop {
        let mut updates = client.watch().watch(
            prefix.clone(),
            WatchOptions::new().prefix().start_revision(from + 1),
        );
        // Follow the watch until it fails.
        let failure = loop {
            match updates.next().await {
                Some(Ok(update)) => {
                    let revision = {
                        let mut state = shared.lock();
                        let changes = state.apply(&prefix, &update);
                        state.last_error = None;
                        state.publish(changes);
                        state.revision
                    };
                    shared.revision.send_replace(revision);
                    backoff.reset();
                }
                // The resume point is gone: only a fresh list can tell what changed.
                Some(Err(kv_client::Error::WatchCompacted { .. })) => break None,
                Some(Err(e)) => break Some(Error::from(e)),
                None => break Some(Error::Protocol("the watch ended".into())),
            }
        };
        drop(updates);
        if let Some(e) = failure {
            shared.lock().last_error = Some(e);
            backoff.wait().await;
        }
        // List again (retrying until it works), and watch on from there.
        loop {
            match list(&client, &prefix).await {
                Ok(got) => {
                    let revision = {
                        let mut state = shared.lock();
                        let changes = state.replace(&prefix, &got);
                        state.last_error = None;
                        state.publish(changes);
                        state.revision
                    };
                    shared.revision.send_replace(revision);
                    from = got.revision;
                    break;
                }
                Err(e) => {
                    shared.lock().last_error = Some(e);
                    backoff.wait().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kv_client::{Event, KeyValue};

    use super::*;

    fn kv(id: &str, endpoint: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: format!("svc/{id}").into_bytes().into(),
            value: format!(r#"{{"endpoint":"{endpoint}"}}"#)
                .into_bytes()
                .into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
    }

    fn put(kv: KeyValue) -> Event {
        Event {
            kind: EventKind::Put,
            kv,
            prev_kv: None,
        }
    }

    fn delete(id: &str, rev: i64) -> Event {
        Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: format!("svc/{id}").into_bytes().into(),
                mod_revision: rev,
                ..KeyValue::default()
            },
            prev_kv: None,
        }
    }

    fn ids(changes: &[InstanceChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                let kind = match c {
                    InstanceChange::Added(_) => "+",
                    InstanceChange::Updated(_) => "~",
                    InstanceChange::Removed(_) => "-",
                };
                format!("{kind}{}", c.instance().id)
            })
            .collect()
    }

    #[test]
    fn events_apply_as_added_updated_removed_and_bad_values_drop_out() {
        let mut state = State::default();
        let update = WatchUpdate {
            revision: 9,
            events: vec![
                put(kv("a", "h:1", 2)),
                put(kv("b", "h:2", 3)),
                put(kv("a", "h:3", 4)),
                put(KeyValue {
                    value: b"garbage".to_vec().into(),
                    ..kv("b", "", 5)
                }),
                put(kv("x/nested", "h:9", 6)),
                delete("a", 7),
            ],
        };
        let changes = state.apply(b"svc/", &update);
        assert_eq!(ids(&changes), ["+a", "+b", "~a", "-b", "-a"]);
        assert!(state.instances.is_empty());
        assert_eq!(state.invalid.keys().collect::<Vec<_>>(), ["b"]);
        // The revision is the last event's, not the header's.
        assert_eq!(state.revision, 7);
        // A progress notification moves it to the header's.
        state.apply(
            b"svc/",
            &WatchUpdate {
                revision: 9,
                events: vec![],
            },
        );
        assert_eq!(state.revision, 9);
        // Deleting the invalid key forgets it.
        state.apply(
            b"svc/",
            &WatchUpdate {
                revision: 10,
                events: vec![delete("b", 10)],
            },
        );
        assert!(state.invalid.is_empty());
    }

    #[test]
    fn a_fresh_list_yields_the_difference() {
        let mut state = State::default();
        let first = GetResponse {
            revision: 5,
            kvs: vec![kv("a", "h:1", 2), kv("b", "h:2", 3), kv("c", "h:3", 4)],
            ..GetResponse::default()
        };
        assert_eq!(ids(&state.replace(b"svc/", &first)), ["+a", "+b", "+c"]);
        let second = GetResponse {
            revision: 20,
            kvs: vec![kv("b", "h:2", 3), kv("c", "h:4", 15), kv("d", "h:5", 16)],
            ..GetResponse::default()
        };
        assert_eq!(ids(&state.replace(b"svc/", &second)), ["-a", "~c", "+d"]);
        assert_eq!(state.revision, 20);
    }

    #[tokio::test]
    async fn readers_get_the_snapshot_then_changes_and_laggards_catch_up() {
        let a = |rev| Instance {
            id: "a".into(),
            endpoint: "h:1".into(),
            metadata: BTreeMap::new(),
            lease: 0,
            create_revision: 1,
            mod_revision: rev,
        };
        let cache = ServiceCache::fixed(vec![a(1)]);
        let mut changes = cache.changes();
        assert_eq!(changes.next().await, Some(InstanceChange::Added(a(1))));
        let mut slow = cache.changes();
        cache.inject(&WatchUpdate {
            revision: 2,
            events: vec![put(kv("b", "h:2", 2))],
        });
        assert!(matches!(changes.next().await, Some(InstanceChange::Added(i)) if i.id == "b"));
        // Overflow the slow reader's queue (the fast one keeps up): the slow one then sees
        // the coalesced difference.
        let mut fast = 0;
        for rev in 3..(CHANGES_QUEUE_LIMIT as i64 + 10) {
            cache.inject(&WatchUpdate {
                revision: rev,
                events: vec![put(kv("c", &format!("h:{rev}"), rev))],
            });
            while let Some(Some(_)) = futures::FutureExt::now_or_never(changes.next()) {
                fast += 1;
            }
        }
        let mut seen = Vec::new();
        while let Some(Some(change)) = futures::FutureExt::now_or_never(slow.next()) {
            seen.push(change);
        }
        assert_eq!(ids(&seen), ["+a", "+b", "+c"]);
        assert!(
            matches!(&seen[2], InstanceChange::Added(i) if i.endpoint == format!("h:{}", CHANGES_QUEUE_LIMIT + 9))
        );
        assert_eq!(cache.instances().len(), 3);
        // The fast reader got every change.
        assert_eq!(fast, CHANGES_QUEUE_LIMIT + 7);
        drop(changes);
        drop(slow);
        assert!(cache.inner.shared.lock().subscribers.is_empty());
    }
}
