//! Work queues with at-least-once delivery: FIFO, priorities, delayed items, items and whole
//! queues gated on conditions, an optional exact capacity, and a dead-letter area.
//!
//! Key layout under the queue name `<q>`:
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `<q>/items/<priority:05>/<enqueue ns:020>_<random:016x>` | item envelope (JSON) | none |
//! | `<q>/claims/<item id>` | empty | the consumer's session |
//! | `<q>/dead/<item id>` | item envelope | none |
//! | `<q>/slots/<n>` (with a capacity) | item id | none |
//!
//! The item id is the part after `items/`. Items are taken in key order: lower priority
//! number first, then enqueue time (exact per producer process; across producers as their
//! clocks agree). Ordering by create revision instead would make every claim sort the whole
//! queue on the server (etcd sorts ranges in memory), O(n) per claim.
//!
//! A claim does not move the item: it writes the claim key on the consumer's lease and bumps
//! the item's attempt count, in one transaction that also proves the item unclaimed and
//! unchanged, and its conditions true. `ack` deletes item and claim together. If the
//! consumer dies, its lease expires, the claim key goes, and the item is available again; an
//! item delivered `max_attempts` times without an ack moves to the dead-letter area instead.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kv_client::{
    Client, Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions, prefix_end,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::condition::{Condition, evaluate};
use crate::error::{Error, Result};
use crate::owned::{Fence, Loss, OwnedKey, read_answer, send_guarded, take_or_give_back};
use crate::semaphore::nonce;
use crate::session::Session;

/// How a [`Queue`] behaves.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Deliveries without an ack after which an item goes to the dead-letter area.
    pub max_attempts: u32,
    /// Most items the queue holds (claimed ones included); `None` for no limit.
    pub capacity: Option<u32>,
    /// How many items a consumer looks at per read.
    pub batch: usize,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            capacity: None,
            batch: 64,
        }
    }
}

/// Options of one enqueued item.
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    priority: u16,
    delay: Option<Duration>,
    conditions: Vec<Condition>,
}

impl EnqueueOptions {
    /// Priority 0, visible at once, no condition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lower numbers are taken first; FIFO within a priority.
    pub fn priority(mut self, priority: u16) -> Self {
        self.priority = priority;
        self
    }

    /// Not delivered before `delay` has passed.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Not delivered while `condition` does not hold (all conditions must hold).
    pub fn when(mut self, condition: Condition) -> Self {
        self.conditions.push(condition);
        self
    }
}

/// What is stored for an item (`inspect` reads it too).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Envelope {
    /// Deliveries so far.
    pub(crate) attempts: u32,
    /// Unix time in ms before which it is not delivered (0: at once).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) visible_at_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) conditions: Vec<Condition>,
    /// The capacity slot it occupies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slot: Option<u32>,
    pub(crate) payload: serde_json::Value,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn codec(e: serde_json::Error) -> Error {
    Error::Codec(e.to_string())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The first wall-clock millisecond at which `delay` after `now` has fully passed. Rounded up,
/// because delivery compares whole milliseconds: rounding down would hand an item out up to a
/// millisecond before its delay is over.
fn visible_after(now: Duration, delay: Duration) -> u64 {
    let at = now.saturating_add(delay).as_nanos();
    at.div_ceil(1_000_000) as u64
}

/// When an item delayed by `delay` from now becomes visible, in ms since the epoch.
fn visible_at(delay: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    visible_after(now, delay)
}

/// Enqueue time in ns, strictly increasing within the process (so one producer's items keep
/// their order even within one clock tick).
fn enqueue_ns() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// The key names of one queue.
#[derive(Debug, Clone)]
struct Layout {
    root: Vec<u8>,
    items: Vec<u8>,
    claims: Vec<u8>,
    dead: Vec<u8>,
    slots: Vec<u8>,
}

impl Layout {
    fn new(name: &[u8]) -> Layout {
        let under = |part: &str| [name, b"/", part.as_bytes()].concat();
        Layout {
            root: [name, b"/"].concat(),
            items: under("items/"),
            claims: under("claims/"),
            dead: under("dead/"),
            slots: under("slots/"),
        }
    }

    fn item(&self, id: &str) -> Vec<u8> {
        [&self.items[..], id.as_bytes()].concat()
    }

    fn claim(&self, id: &str) -> Vec<u8> {
        [&self.claims[..], id.as_bytes()].concat()
    }

    fn dead(&self, id: &str) -> Vec<u8> {
        [&self.dead[..], id.as_bytes()].concat()
    }

    fn slot(&self, n: u32) -> Vec<u8> {
        [&self.slots[..], n.to_string().as_bytes()].concat()
    }

    /// The writes that remove item `id` (and its slot) from the queue.
    fn remove(&self, id: &str, envelope: &Envelope) -> Vec<TxnOp> {
        let mut ops = vec![TxnOp::delete(self.item(id), Default::default())];
        if let Some(slot) = envelope.slot {
            ops.push(TxnOp::delete(self.slot(slot), Default::default()));
        }
        ops
    }
}

/// A work queue of `T` items (JSON-encoded). Cheap to clone.
pub struct Queue<T> {
    client: Client,
    layout: Layout,
    options: QueueOptions,
    gate: Vec<Condition>,
    /// End of the part of the queue this handle has paged through (see `look`).
    window: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    _items: PhantomData<fn() -> T>,
}

/// A [`Queue`] whose producers set priorities with [`EnqueueOptions::priority`]: lower
/// numbers first, FIFO within a priority (same layout).
pub type PriorityQueue<T> = Queue<T>;

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            client: self.client.clone(),
            layout: self.layout.clone(),
            options: self.options.clone(),
            gate: self.gate.clone(),
            window: self.window.clone(),
            _items: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &String::from_utf8_lossy(&self.layout.root))
            .field("options", &self.options)
            .field("gate", &self.gate)
            .finish()
    }
}

/// How many items one claim transaction tries, in order (see `claim_first`).
const CHAIN: usize = 8;

/// An item that may be claimed: unclaimed, visible, its conditions proven.
struct Candidate {
    id: String,
    mod_revision: i64,
    envelope: Envelope,
    proof: Vec<Compare>,
}

/// What one look at the queue found.
enum Look<T> {
    Claimed(Box<Claimed<T>>),
    /// Nothing claimable at `revision`; look again after a change under the queue or to one
    /// of `watched` (key, is prefix), or at `wake_at_ms`.
    Wait {
        revision: i64,
        wake_at_ms: Option<u64>,
        watched: Vec<(String, bool)>,
    },
    /// A claim failed on items that may still be claimable (changed, or its outcome was
    /// lost): look again from the head, on a fresh read.
    Again,
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// The queue `name` with default options.
    pub fn new(client: &Client, name: impl AsRef<[u8]>) -> Queue<T> {
        Self::with_options(client, name, QueueOptions::default())
    }

    /// The queue `name` with `options` (every process using it should agree on them).
    pub fn with_options(
        client: &Client,
        name: impl AsRef<[u8]>,
        options: QueueOptions,
    ) -> Queue<T> {
        Queue {
            client: client.clone(),
            layout: Layout::new(name.as_ref()),
            options,
            gate: Vec::new(),
            window: Arc::default(),
            _items: PhantomData,
        }
    }

    /// This queue, delivering nothing while any of `conditions` does not hold (a gate on the
    /// whole queue, checked by this handle's consumers).
    pub fn gated(mut self, conditions: impl IntoIterator<Item = Condition>) -> Queue<T> {
        self.gate.extend(conditions);
        self
    }

    /// Appends `item`; returns its id.
    pub async fn enqueue(&self, item: &T) -> Result<String> {
        self.enqueue_with(item, EnqueueOptions::new()).await
    }

    /// Appends `item` with a priority, delay or conditions; returns its id. With a capacity,
    /// waits for room (drop the future to give up).
    pub async fn enqueue_with(&self, item: &T, options: EnqueueOptions) -> Result<String> {
        let mut ids = self.put_items(vec![(item, options)], true).await?;
        ids.pop()
            .ok_or_else(|| Error::Protocol("no id for the item".into()))
    }

    /// Like [`Queue::enqueue_with`], but fails with [`Error::QueueFull`] instead of waiting.
    pub async fn try_enqueue_with(&self, item: &T, options: EnqueueOptions) -> Result<String> {
        let mut ids = self.put_items(vec![(item, options)], false).await?;
        ids.pop()
            .ok_or_else(|| Error::Protocol("no id for the item".into()))
    }

    /// Appends `items` in order, up to 64 per transaction (all of a transaction or none).
    pub async fn enqueue_all<'a>(
        &self,
        items: impl IntoIterator<Item = &'a T>,
    ) -> Result<Vec<String>>
    where
        T: 'a,
    {
        let items: Vec<&T> = items.into_iter().collect();
        let mut ids = Vec::with_capacity(items.len());
        for chunk in items.chunks(64) {
            let batch = chunk.iter().map(|i| (*i, EnqueueOptions::new())).collect();
            ids.extend(self.put_items(batch, true).await?);
        }
        Ok(ids)
    }

    async fn put_items(&self, batch: Vec<(&T, EnqueueOptions)>, wait: bool) -> Result<Vec<String>> {
        let mut entries = Vec::with_capacity(batch.len());
        for (item, options) in batch {
            let id = format!(
                "{:05}/{:020}_{:016x}",
                options.priority,
                enqueue_ns(),
                nonce()
            );
            let envelope = Envelope {
                attempts: 0,
                visible_at_ms: options.delay.map_or(0, visible_at),
                conditions: options.conditions,
                slot: None,
                payload: serde_json::to_value(item).map_err(codec)?,
            };
            entries.push((id, envelope));
        }
        loop {
            let mut compares = Vec::new();
            let mut puts = Vec::new();
            if let Some(capacity) = self.options.capacity {
                match self.free_slots(capacity, entries.len()).await? {
                    Ok(slots) => {
                        for ((id, envelope), slot) in entries.iter_mut().zip(slots) {
                            envelope.slot = Some(slot);
                            compares.push(Compare::create_revision(
                                self.layout.slot(slot),
                                CompareOp::Equal,
                                0,
                            ));
                            puts.push(TxnOp::put(
                                self.layout.slot(slot),
                                id.as_bytes(),
                                PutOptions::new(),
                            ));
                        }
                    }
                    Err(_) if !wait => return Err(Error::QueueFull),
                    Err(revision) => {
                        self.wait_for_room(revision).await;
                        continue;
                    }
                }
            }
            for (id, envelope) in &entries {
                let key = self.layout.item(id);
                // Makes a resend after an unknown outcome harmless.
                compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                let value = serde_json::to_vec(envelope).map_err(codec)?;
                puts.push(TxnOp::put(key, value, PutOptions::new()));
            }
            let first_item = self.layout.item(&entries[0].0);
            let resp = send_guarded(&self.client, Txn::new().when(compares).and_then(puts)).await?;
            if resp.succeeded {
                return Ok(entries.into_iter().map(|(id, _)| id).collect());
            }
            // Either a slot was taken meanwhile (look again) or an earlier send of this very
            // transaction was applied (the first item exists: done).
            let got = self.client.kv().get(first_item, GetOptions::new()).await?;
            if !got.kvs.is_empty() {
                return Ok(entries.into_iter().map(|(id, _)| id).collect());
            }
        }
    }

    /// `n` free capacity slots in random order, or the revision at which fewer were free.
    async fn free_slots(
        &self,
        capacity: u32,
        n: usize,
    ) -> Result<std::result::Result<Vec<u32>, i64>> {
        let got = self
            .client
            .kv()
            .get(
                self.layout.slots.clone(),
                GetOptions::new().prefix().keys_only(),
            )
            .await?;
        let used: HashSet<u32> = got
            .kvs
            .iter()
            .filter_map(|kv| {
                std::str::from_utf8(&kv.key[self.layout.slots.len()..])
                    .ok()?
                    .parse()
                    .ok()
            })
            .collect();
        let mut free: Vec<u32> = (0..capacity).filter(|s| !used.contains(s)).collect();
        if free.len() < n {
            return Ok(Err(got.revision));
        }
        // Rivals start at different free slots, so they rarely collide.
        let start = (nonce() % free.len() as u64) as usize;
        free.rotate_left(start);
        free.truncate(n);
        Ok(Ok(free))
    }

    /// Returns after a slot was freed past `revision` (or the watch ended).
    async fn wait_for_room(&self, revision: i64) {
        let mut deletes = self.client.watch().watch(
            self.layout.slots.clone(),
            WatchOptions::new()
                .prefix()
                .start_revision(revision + 1)
                .no_put(),
        );
        while let Some(update) = deletes.next().await {
            match update {
                Ok(u) if u.events.is_empty() => {}
                _ => return,
            }
        }
    }

    /// Claims the next deliverable item for `session`, waiting (by watching, not polling)
    /// until there is one. Fails if the session ends; dropping the future gives up.
    pub async fn dequeue(&self, session: &Session) -> Result<Claimed<T>> {
        loop {
            match self.look(session).await? {
                Look::Claimed(claimed) => return Ok(*claimed),
                Look::Again => {}
                Look::Wait {
                    revision,
                    wake_at_ms,
                    watched,
                } => {
                    tokio::select! {
                        () = self.wait_for_change(revision, wake_at_ms, watched) => {}
                        why = session.lost() => return Err(Error::SessionLost(why)),
                    }
                }
            }
        }
    }

    /// Claims the next deliverable item if there is one now.
    pub async fn try_dequeue(&self, session: &Session) -> Result<Option<Claimed<T>>> {
        loop {
            match self.look(session).await? {
                Look::Claimed(claimed) => return Ok(Some(*claimed)),
                Look::Again => {}
                Look::Wait { .. } => return Ok(None),
            }
        }
    }

    /// One pass over the queue in order: claims the first item that is unclaimed, visible and
    /// whose conditions hold.
    async fn look(&self, session: &Session) -> Result<Look<T>> {
        session.check()?;
        let (gate, gate_revision) = evaluate(&self.client, &self.gate).await?;
        let Some(gate) = gate else {
            return Ok(Look::Wait {
                revision: gate_revision,
                wake_at_ms: None,
                watched: self.gate.iter().map(watched).collect(),
            });
        };
        let mut watched_extra = Vec::new();
        let mut wake_at_ms: Option<u64> = None;
        let end = prefix_end(&self.layout.items);
        // First the window (the queue's head this handle already paged through, where
        // released and lower-priority items also land), then new pages past it. Reading the
        // head of a long range costs the server O(range) (etcd counts every key in it), so
        // bounding reads by the window keeps a claim cheap however long the queue is.
        let window = self
            .window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (mut from, mut to, mut limit) = match &window {
            Some(window_end) => (self.layout.items.clone(), window_end.clone(), 0),
            None => (
                self.layout.items.clone(),
                end.clone(),
                self.options.batch as i64,
            ),
        };
        let mut since: Option<i64> = None;
        let mut evaluated: HashMap<Vec<Condition>, Option<Vec<Compare>>> = HashMap::new();
        loop {
            // Every page of one look reads the revision of its first: an item committed
            // between two pages could otherwise be missed behind the first (its id was made
            // before another producer's that the first page held) while a later one from the
            // same transaction is claimed from the second.
            let at = |options: GetOptions| match since {
                Some(revision) => options.revision(revision),
                None => options,
            };
            let page = at(GetOptions::new().range_end(to.clone()).limit(limit));
            let read = Txn::new().and_then([
                TxnOp::get(from.clone(), page),
                TxnOp::get(self.layout.claims.clone(), at(self.claims_read())),
            ]);
            let snapshot = match self.client.kv().txn(read).await {
                Ok(snapshot) => snapshot,
                // Compacted past the look's revision: start over on a fresh one.
                Err(kv_client::Error::Compacted) if since.is_some() => return Ok(Look::Again),
                Err(e) => return Err(e.into()),
            };
            since.get_or_insert(snapshot.revision);
            let items = read_answer(&snapshot, 0)?;
            let claimed = self.claimed_ids(read_answer(&snapshot, 1)?);
            let mut chain: Vec<Candidate> = Vec::new();
            for kv in &items.kvs {
                let id_bytes = &kv.key[self.layout.items.len()..];
                if claimed.contains(id_bytes) {
                    continue;
                }
                let id = String::from_utf8_lossy(id_bytes).into_owned();
                let Ok(envelope) = serde_json::from_slice::<Envelope>(&kv.value) else {
                    self.bury_unreadable(&id, kv).await?;
                    continue;
                };
                if envelope.visible_at_ms > now_ms() {
                    wake_at_ms = Some(
                        wake_at_ms
                            .map_or(envelope.visible_at_ms, |w| w.min(envelope.visible_at_ms)),
                    );
                    continue;
                }
                // Items gated alike (often many) share one evaluation per look.
                let proof = match evaluated.get(&envelope.conditions) {
                    Some(proof) => proof.clone(),
                    None => {
                        let (proof, _) = evaluate(&self.client, &envelope.conditions).await?;
                        evaluated.insert(envelope.conditions.clone(), proof.clone());
                        proof
                    }
                };
                let Some(proof) = proof else {
                    watched_extra.extend(envelope.conditions.iter().map(watched));
                    continue;
                };
                if envelope.attempts >= self.options.max_attempts {
                    self.bury(&id, kv).await?;
                    continue;
                }
                chain.push(Candidate {
                    id,
                    mod_revision: kv.mod_revision,
                    envelope,
                    proof,
                });
                if chain.len() == CHAIN {
                    break;
                }
            }
            if !chain.is_empty() {
                // Going on past a failed chain would break the queue's order: its items
                // fail not only when rivals took them all but also when one changed (a
                // rival's claim released) or the claim's outcome was lost and it was not
                // applied, and those are still due before anything after them.
                return Ok(match self.claim_first(session, chain, &gate).await? {
                    Some(claimed) => Look::Claimed(Box::new(claimed)),
                    None => Look::Again,
                });
            }
            let page_end = items.kvs.last().map(|last| [&last.key[..], b"\0"].concat());
            if limit == 0 {
                // The window had nothing for us: page on past it.
                (from, to, limit) = (to, end.clone(), self.options.batch as i64);
                continue;
            }
            match page_end {
                Some(next) => {
                    *self.window.lock().unwrap_or_else(|e| e.into_inner()) = Some(next.clone());
                    if !items.more {
                        break;
                    }
                    from = next;
                }
                None => break,
            }
        }
        watched_extra.extend(self.gate.iter().map(watched));
        Ok(Look::Wait {
            revision: since.unwrap_or(0),
            wake_at_ms,
            watched: watched_extra,
        })
    }

    fn claims_read(&self) -> GetOptions {
        GetOptions::new().prefix().keys_only()
    }

    /// The ids of the claimed items, from a read of the claims.
    fn claimed_ids(&self, claims: &kv_client::GetResponse) -> HashSet<Vec<u8>> {
        claims
            .kvs
            .iter()
            .map(|kv| kv.key[self.layout.claims.len()..].to_vec())
            .collect()
    }

    /// Claims the first of `chain` still unclaimed and unchanged, in one transaction that
    /// nests a try of each candidate in the failure branch of the one before, so rivals that
    /// read the same page do not fail on the same item one write at a time, and the queue's
    /// order holds (the earliest claimable item always wins). None if all were taken.
    async fn claim_first(
        &self,
        session: &Session,
        chain: Vec<Candidate>,
        gate: &[Compare],
    ) -> Result<Option<Claimed<T>>> {
        let mut nested: Option<Txn> = None;
        let mut claimed_envelopes = Vec::with_capacity(chain.len());
        for candidate in &chain {
            let mut envelope = candidate.envelope.clone();
            envelope.attempts += 1;
            claimed_envelopes.push(envelope);
        }
        for (candidate, envelope) in chain.iter().zip(&claimed_envelopes).rev() {
            let item_key = self.layout.item(&candidate.id);
            let claim_key = self.layout.claim(&candidate.id);
            let mut compares = vec![
                Compare::mod_revision(item_key.clone(), CompareOp::Equal, candidate.mod_revision),
                Compare::create_revision(claim_key.clone(), CompareOp::Equal, 0),
            ];
            compares.extend(gate.iter().cloned());
            compares.extend(candidate.proof.iter().cloned());
            let value = serde_json::to_vec(envelope).map_err(codec)?;
            let mut level = Txn::new().when(compares).and_then([
                TxnOp::put(claim_key, "", PutOptions::new().lease(session.lease())),
                TxnOp::put(item_key, value, PutOptions::new()),
            ]);
            if let Some(inner) = nested.take() {
                level = level.or_else([TxnOp::txn(inner)]);
            }
            nested = Some(level);
        }
        let Some(txn) = nested else {
            return Ok(None);
        };
        // The candidates stay shared with the give-back, which (should the caller be gone
        // when the claim lands) puts the won item back as it was, attempts not counted.
        let chain = Arc::new(chain);
        let client = self.client.clone();
        let undo_client = self.client.clone();
        let claims_prefix = self.layout.claims.clone();
        let claim_keys: Vec<Vec<u8>> = chain.iter().map(|c| self.layout.claim(&c.id)).collect();
        let lease = session.lease();
        let claimant = session.clone();
        let claim = async move {
            match client.kv().txn(txn).await {
                Ok(resp) => {
                    let revision = resp.revision;
                    let mut level = &resp;
                    let mut index = 0;
                    loop {
                        if level.succeeded {
                            break Ok(Some((index, revision)));
                        }
                        match level.responses.first() {
                            Some(TxnOpResponse::Txn(inner)) => {
                                level = inner;
                                index += 1;
                            }
                            _ => break Ok(None),
                        }
                    }
                }
                // Did we claim one? Our claim key says so, but a plain read cannot tell yet:
                // the claim may sit in the log uncommitted (the server timed out waiting for
                // it) and land after the read, held by us and known to nobody until our
                // session ends. So the claims are read by a transaction that goes through the
                // log itself, after the claim: its delete (of the never-written key
                // `<q>/claims/`) makes it a write, and changes nothing.
                Err(kv_client::Error::OutcomeUnknown(_)) => {
                    let through_log = Txn::new().and_then([
                        TxnOp::get(claims_prefix.clone(), GetOptions::new().prefix()),
                        TxnOp::delete(claims_prefix, Default::default()),
                    ]);
                    // Asked until it answers while the session lives (a claim we never
                    // learn of holds its item, unseen, until then); once the session has
                    // ended, its lease took any claim with it.
                    let mut pause = Duration::from_millis(100);
                    let resp = loop {
                        match send_guarded(&client, through_log.clone()).await {
                            Ok(resp) => break resp,
                            Err(Error::Client(e))
                                if claimant.try_lost().is_none()
                                    && (e.is_retryable()
                                        || e.is_outcome_unknown()
                                        || matches!(e, kv_client::Error::DeadlineExceeded(_))) =>
                            {
                                tokio::time::sleep(pause).await;
                                pause = (pause * 2).min(Duration::from_secs(2));
                            }
                            Err(e) => return Err(e),
                        }
                    };
                    let claims = read_answer(&resp, 0)?;
                    Ok(claim_keys.iter().enumerate().find_map(|(i, key)| {
                        claims
                            .kvs
                            .iter()
                            .find(|kv| kv.key == key && kv.lease == lease)
                            .map(|kv| (i, kv.create_revision))
                    }))
                }
                Err(e) => Err(e.into()),
            }
        };
        let (candidates, layout) = (chain.clone(), self.layout.clone());
        let give_back = move |won: Option<(usize, i64)>| async move {
            let Some((index, revision)) = won else {
                return;
            };
            let Some(candidate) = candidates.get(index) else {
                return;
            };
            let Ok(value) = serde_json::to_vec(&candidate.envelope) else {
                return;
            };
            let (item, claim) = (layout.item(&candidate.id), layout.claim(&candidate.id));
            let txn = Txn::new()
                .when([Compare::create_revision(
                    claim.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([
                    TxnOp::delete(claim, Default::default()),
                    TxnOp::put(item, value, PutOptions::new()),
                ]);
            let _ = send_guarded(&undo_client, txn).await;
        };
        let won = take_or_give_back(claim, give_back).await?;
        let Some((index, revision)) = won else {
            return Ok(None);
        };
        let id = chain[index].id.clone();
        let envelope = claimed_envelopes.swap_remove(index);
        let claim = OwnedKey::created(session, self.layout.claim(&id), revision);
        match serde_json::from_value(envelope.payload.clone()) {
            Ok(item) => Ok(Some(Claimed {
                item,
                id,
                envelope,
                claim,
                queue: self.layout.clone(),
                max_attempts: self.options.max_attempts,
            })),
            // Not a T: nobody can process it; keep it for a human.
            Err(e) => {
                let mut ops = self.layout.remove(&id, &envelope);
                let value = serde_json::to_vec(&envelope).map_err(codec)?;
                ops.push(TxnOp::put(self.layout.dead(&id), value, PutOptions::new()));
                let ops = Txn::new().when([claim.is_owner()]).and_then(ops);
                self.client.kv().txn(ops).await?;
                claim.detach();
                Err(codec(e))
            }
        }
    }

    /// Moves an item that used up its attempts to the dead-letter area, unless it changed or
    /// was claimed meanwhile.
    async fn bury(&self, id: &str, kv: &KeyValue) -> Result<()> {
        let envelope: Envelope = serde_json::from_slice(&kv.value).map_err(codec)?;
        let mut ops = self.layout.remove(id, &envelope);
        ops.push(TxnOp::put(
            self.layout.dead(id),
            kv.value.clone(),
            PutOptions::new(),
        ));
        let txn = Txn::new()
            .when([
                Compare::mod_revision(self.layout.item(id), CompareOp::Equal, kv.mod_revision),
                Compare::create_revision(self.layout.claim(id), CompareOp::Equal, 0),
            ])
            .and_then(ops);
        self.client.kv().txn(txn).await?;
        Ok(())
    }

    /// Moves an item whose envelope cannot be read to the dead-letter area, as it is.
    async fn bury_unreadable(&self, id: &str, kv: &KeyValue) -> Result<()> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.layout.item(id),
                CompareOp::Equal,
                kv.mod_revision,
            )])
            .and_then([
                TxnOp::delete(self.layout.item(id), Default::default()),
                TxnOp::put(self.layout.dead(id), kv.value.clone(), PutOptions::new()),
            ]);
        self.client.kv().txn(txn).await?;
        Ok(())
    }

    /// Returns after a change under the queue or to a watched condition key past `revision`,
    /// or at `wake_at_ms`.
    async fn wait_for_change(
        &self,
        revision: i64,
        wake_at_ms: Option<u64>,
        watched: Vec<(String, bool)>,
    ) {
        let from = WatchOptions::new().start_revision(revision + 1);
        let mut streams = vec![
            self.client
                .watch()
                .watch(self.layout.root.clone(), from.clone().prefix()),
        ];
        let mut seen = HashSet::new();
        for (key, prefix) in watched {
            if seen.insert((key.clone(), prefix)) {
                let options = if prefix {
                    from.clone().prefix()
                } else {
                    from.clone()
                };
                streams.push(self.client.watch().watch(key, options));
            }
        }
        let mut changes = futures::stream::select_all(streams);
        let delay = wake_at_ms.map(|at| Duration::from_millis(at.saturating_sub(now_ms())));
        let timer = async {
            match delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Any update, or an error (e.g. compaction): look again either way.
            _ = async {
                while let Some(update) = changes.next().await {
                    match update {
                        Ok(u) if u.events.is_empty() => {}
                        _ => return,
                    }
                }
            } => {}
            () = timer => {}
        }
    }

    /// Items waiting or claimed.
    pub async fn len(&self) -> Result<i64> {
        self.count(&self.layout.items).await
    }

    /// True when no item is waiting or claimed.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// Items claimed and not yet acked.
    pub async fn in_flight(&self) -> Result<i64> {
        self.count(&self.layout.claims).await
    }

    async fn count(&self, prefix: &[u8]) -> Result<i64> {
        let got = self
            .client
            .kv()
            .get(prefix, GetOptions::new().prefix().count_only())
            .await?;
        Ok(got.count)
    }

    /// The dead-letter area: (id, item, deliveries) of each item given up on.
    pub async fn dead_letters(&self) -> Result<Vec<(String, T, u32)>> {
        let got = self
            .client
            .kv()
            .get(self.layout.dead.clone(), GetOptions::new().prefix())
            .await?;
        got.kvs
            .iter()
            .map(|kv| {
                let id = String::from_utf8_lossy(&kv.key[self.layout.dead.len()..]).into_owned();
                let envelope: Envelope = serde_json::from_slice(&kv.value).map_err(codec)?;
                let item = serde_json::from_value(envelope.payload).map_err(codec)?;
                Ok((id, item, envelope.attempts))
            })
            .collect()
    }
}

/// What to watch for a condition.
fn watched(condition: &Condition) -> (String, bool) {
    let (key, prefix) = condition.watched();
    (key.to_string(), prefix)
}

/// An item claimed by a consumer: process it, then [`Claimed::ack`] it. If the consumer dies
/// first, the item is delivered again once its session's lease expires. Dropped without ack
/// or nack, the claim is released in the background (the item is delivered again).
pub struct Claimed<T> {
    /// The item.
    pub item: T,
    id: String,
    envelope: Envelope,
    claim: OwnedKey,
    queue: Layout,
    max_attempts: u32,
}

impl<T> std::fmt::Debug for Claimed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("id", &self.id)
            .field("attempts", &self.envelope.attempts)
            .field("claim", &self.claim)
            .finish()
    }
}

impl<T> Claimed<T> {
    /// The item's id in the queue.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Which delivery this is: 1 the first time.
    pub fn attempts(&self) -> u32 {
        self.envelope.attempts
    }

    /// The claim's fencing token: a later delivery of any item of the queue has a higher one.
    pub fn fence(&self) -> Fence {
        self.claim.fence()
    }

    /// A compare that holds while this claim lasts, for the consumer's own transactions (so
    /// a consumer that lost its claim cannot record a result twice).
    pub fn is_owner(&self) -> Compare {
        self.claim.is_owner()
    }

    /// Resolves when the claim ends without an ack or nack (session lost).
    pub async fn lost(&self) -> Loss {
        self.claim.lost().await
    }

    /// Done: removes the item. [`Error::ClaimLost`] if the claim ended first (the item may be
    /// with another consumer then).
    pub async fn ack(self) -> Result<()> {
        let ops = self.with_release(self.queue.remove(&self.id, &self.envelope));
        self.finish(ops).await
    }

    /// Done, recording the result with `ops` in the same transaction: the writes land if and
    /// only if the ack does, so a result is stored exactly once even when items are delivered
    /// more than once.
    pub async fn ack_with(self, ops: impl IntoIterator<Item = TxnOp>) -> Result<()> {
        let mut all: Vec<TxnOp> = ops.into_iter().collect();
        all.extend(self.queue.remove(&self.id, &self.envelope));
        let all = self.with_release(all);
        self.finish(all).await
    }

    /// Not done: the item is delivered again (or goes to the dead-letter area if this was its
    /// last attempt).
    pub async fn nack(self) -> Result<()> {
        self.nack_with(None).await
    }

    /// Not done: delivered again once `delay` has passed (or dead-lettered, as `nack`).
    pub async fn nack_after(self, delay: Duration) -> Result<()> {
        self.nack_with(Some(delay)).await
    }

    async fn nack_with(self, delay: Option<Duration>) -> Result<()> {
        let ops = if self.envelope.attempts >= self.max_attempts {
            let mut ops = self.queue.remove(&self.id, &self.envelope);
            let value = serde_json::to_vec(&self.envelope).map_err(codec)?;
            ops.push(TxnOp::put(
                self.queue.dead(&self.id),
                value,
                PutOptions::new(),
            ));
            ops
        } else if let Some(delay) = delay {
            let mut envelope = self.envelope.clone();
            envelope.visible_at_ms = visible_at(delay);
            let value = serde_json::to_vec(&envelope).map_err(codec)?;
            vec![TxnOp::put(
                self.queue.item(&self.id),
                value,
                PutOptions::new(),
            )]
        } else {
            Vec::new()
        };
        let ops = self.with_release(ops);
        self.finish(ops).await
    }

    /// `ops` plus the release of the claim.
    fn with_release(&self, mut ops: Vec<TxnOp>) -> Vec<TxnOp> {
        ops.push(TxnOp::delete(self.claim.key(), Default::default()));
        ops
    }

    /// Applies `ops` if the claim still holds (see [`OwnedKey::end_with`]).
    async fn finish(self, ops: Vec<TxnOp>) -> Result<()> {
        if self.claim.end_with(ops).await? {
            Ok(())
        } else {
            Err(Error::ClaimLost)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_ends_on_the_first_whole_millisecond_after_it_has_passed() {
        let now = Duration::from_micros(1_000_400);
        // 1000.4 ms + 800 ms = 1800.4 ms: the item must wait until 1801, not show at 1800.
        assert_eq!(visible_after(now, Duration::from_millis(800)), 1801);
        assert_eq!(
            visible_after(Duration::from_millis(5), Duration::from_millis(10)),
            15
        );
        assert_eq!(visible_after(now, Duration::from_nanos(1)), 1001);
    }
}
