//! Read-only views of the recipes' state, found in the keyspace by the recipes' key layouts:
//! who holds which lock, who leads which election, how deep each queue is, which instances
//! each service has. `kvctl` and the server's dashboard show these; etcd itself shows only
//! keys.
//!
//! Every view comes from one read at one revision ([`Inspection::read`]), so a lock and its
//! waiters, or a queue's items and claims, are seen together. The classification
//! ([`Inspection::from_kvs`]) is pure, so a server can run it over its own store.
//!
//! What is recognized, by layout:
//!
//! | recipe | keys | told apart by |
//! | --- | --- | --- |
//! | [`Mutex`](crate::Mutex), etcd `concurrency.Mutex`, the v3lock service | `<name>/<lease hex>` = empty | the key's lease is the hex, value empty |
//! | [`RwLock`](crate::RwLock) | `<name>/read/<lease hex>`, `<name>/write/<lease hex>` | as above, under `read/` or `write/` |
//! | [`Election`](crate::Election), etcd `concurrency.Election` | `<name>/<lease hex>` = value | as a mutex, value not empty |
//! | [`Queue`](crate::Queue) | `<q>/items/<priority>/<ns>_<random>`, `<q>/claims/<id>`, `<q>/dead/<id>` | the item id's shape |
//! | [discovery](crate::discovery) | `<service>/<id>` = `{"endpoint": ..}` on a lease | JSON with an `endpoint` |
//!
//! An election whose candidate proclaimed an empty value reads as a lock: the layouts are the
//! same (etcd's too). Semaphores and barriers are not shown: a semaphore's permit count is
//! not stored, so holders cannot be told from waiters.

use std::collections::BTreeMap;

use kv_client::{Client, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, prefix_end};
use serde::Serialize;

use crate::error::Result;
use crate::queue::{Envelope, now_ms};

/// Keys listed per request by [`Inspection::read`]; every page is read at the first page's
/// revision.
const PAGE: i64 = 1000;

/// Values read per transaction by [`Inspection::read`]: under etcd's default
/// `--max-txn-ops` (128).
const VALUES_PER_TXN: usize = 100;

/// One key that holds or waits for something: its name, the lease it lives on and its create
/// revision (the fencing token of a holder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    /// The key.
    pub key: String,
    /// Its lease, in hex as the key spells it.
    pub lease: String,
    /// Its create revision: order among rivals, and the holder's fencing token.
    pub revision: i64,
}

/// A lock and who holds and waits for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockView {
    /// The lock's name (the prefix before `/<lease hex>`).
    pub name: String,
    /// `mutex` or `rwlock`.
    pub kind: &'static str,
    /// Who holds it: one owner for a mutex or a writer, readers together.
    pub holders: Vec<Owner>,
    /// Who waits, oldest first.
    pub waiting: Vec<Owner>,
}

/// An election, its leader and the other candidates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ElectionView {
    /// The election's name.
    pub name: String,
    /// The leader (the oldest candidate).
    pub leader: Owner,
    /// The leader's proclaimed value (lossy UTF-8).
    pub value: String,
    /// The other candidates, oldest (next in line) first.
    pub candidates: Vec<Owner>,
}

/// A queue's depth, by state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct QueueView {
    /// The queue's name.
    pub name: String,
    /// Items that can be delivered now (unclaimed and not delayed; their conditions are not
    /// evaluated here).
    pub ready: u64,
    /// Unclaimed items whose delay has not passed.
    pub delayed: u64,
    /// Items claimed by a consumer and not yet acked.
    pub claimed: u64,
    /// Items in the dead-letter area.
    pub dead: u64,
    /// Enqueue time of the oldest waiting item, in ms since the Unix epoch.
    pub oldest_enqueued_ms: Option<u64>,
    /// Items as listed by [`Inspection::items`], in delivery order.
    #[serde(skip)]
    items: Vec<QueueItem>,
    #[serde(skip)]
    dead_items: Vec<QueueItem>,
}

/// One queue item as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueItem {
    /// The item id (the part of its key after `items/` or `dead/`).
    pub id: String,
    /// Its priority (lower first).
    pub priority: u16,
    /// When it was enqueued, in ms since the Unix epoch.
    pub enqueued_ms: u64,
    /// Deliveries so far.
    pub attempts: u32,
    /// Not delivered before this time (ms since the epoch; 0: at once).
    pub visible_at_ms: u64,
    /// Conditions it waits on.
    pub conditions: usize,
    /// A consumer holds it.
    pub claimed: bool,
    /// The item itself.
    pub payload: serde_json::Value,
}

/// A service and its registered instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    /// The service's name (the prefix before `/<id>`).
    pub name: String,
    /// Its instances, by id.
    pub instances: Vec<InstanceView>,
}

/// One registered instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceView {
    /// Its id.
    pub id: String,
    /// Where to reach it.
    pub endpoint: String,
    /// Its labels.
    pub metadata: BTreeMap<String, String>,
    /// Its registration's lease, in hex.
    pub lease: String,
}

/// The recipes' state at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Inspection {
    /// The revision read.
    pub revision: i64,
    /// Locks with at least one holder, by name.
    pub locks: Vec<LockView>,
    /// Elections with a leader, by name.
    pub elections: Vec<ElectionView>,
    /// Queues with items, claims or dead letters, by name.
    pub queues: Vec<QueueView>,
    /// Services with instances, by name.
    pub services: Vec<ServiceView>,
    /// The read stopped at the key limit: the views may miss recipes past it.
    pub truncated: bool,
}

impl Inspection {
    /// Reads every key under `prefix` (all keys if empty) at one revision, at most `limit`
    /// keys, and classifies them.
    pub async fn read(client: &Client, prefix: &[u8], limit: usize) -> Result<Inspection> {
        let end = if prefix.is_empty() {
            vec![0]
        } else {
            prefix_end(prefix)
        };
        let mut from = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.to_vec()
        };
        // Keys first, without values: most of a keyspace is application data, whose values
        // are of no use here and may be large. Then the values wanted, in batched reads.
        let mut revision = 0;
        let mut listed = 0;
        let mut wanted = Vec::new();
        let mut truncated = false;
        loop {
            let page = (limit - listed).clamp(1, PAGE as usize) as i64;
            let mut options = GetOptions::new()
                .range_end(end.clone())
                .limit(page)
                .keys_only();
            if revision > 0 {
                options = options.revision(revision);
            }
            let got = client.kv().get(from.clone(), options).await?;
            if revision == 0 {
                revision = got.revision;
            }
            listed += got.kvs.len();
            let last = got.kvs.last().map(|kv| kv.key.to_vec());
            wanted.extend(
                got.kvs
                    .into_iter()
                    .filter(|kv| Inspection::wants_value(&kv.key, kv.lease))
                    .map(|kv| kv.key.to_vec()),
            );
            if !got.more {
                break;
            }
            if listed >= limit {
                truncated = true;
                break;
            }
            let Some(last) = last else { break };
            from = [&last[..], &[0]].concat();
        }
        let mut kvs = Vec::with_capacity(wanted.len());
        for batch in wanted.chunks(VALUES_PER_TXN) {
            let reads = batch
                .iter()
                .map(|key| TxnOp::get(key.clone(), GetOptions::new().revision(revision)));
            let answer = client.kv().txn(Txn::new().and_then(reads)).await?;
            for response in answer.responses {
                if let TxnOpResponse::Get(got) = response {
                    kvs.extend(got.kvs);
                }
            }
        }
        let mut inspection = Inspection::from_kvs(revision, &kvs, now_ms());
        inspection.truncated = truncated;
        Ok(inspection)
    }

    /// Classifies `kvs` (read at `revision`), with `now_ms` (ms since the Unix epoch) telling
    /// delayed queue items from ready ones.
    pub fn from_kvs(revision: i64, kvs: &[KeyValue], now_ms: u64) -> Inspection {
        let mut owned: BTreeMap<(String, &'static str), Vec<(&KeyValue, Owner)>> = BTreeMap::new();
        let mut queues: BTreeMap<String, QueueView> = BTreeMap::new();
        let mut claims: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut services: BTreeMap<String, Vec<InstanceView>> = BTreeMap::new();
        for kv in kvs {
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            if let Some((queue, part, id)) = queue_key(&key) {
                let view = queues
                    .entry(queue.to_string())
                    .or_insert_with(|| QueueView {
                        name: queue.to_string(),
                        ..Default::default()
                    });
                match part {
                    "items" => {
                        if let Some(item) = queue_item(id, &kv.value) {
                            view.items.push(item);
                        }
                    }
                    "claims" => claims
                        .entry(queue.to_string())
                        .or_default()
                        .push(id.to_string()),
                    _ => {
                        if let Some(item) = queue_item(id, &kv.value) {
                            view.dead_items.push(item);
                        }
                    }
                }
                continue;
            }
            let Some((parent, last)) = key.rsplit_once('/') else {
                continue;
            };
            if kv.lease != 0
                && let Some(info) = instance(&kv.value)
            {
                services
                    .entry(parent.to_string())
                    .or_default()
                    .push(InstanceView {
                        id: last.to_string(),
                        endpoint: info.endpoint,
                        metadata: info.metadata,
                        lease: format!("{:x}", kv.lease),
                    });
                continue;
            }
            if kv.lease == 0 || last != format!("{:x}", kv.lease) {
                continue;
            }
            let owner = Owner {
                key: key.clone(),
                lease: last.to_string(),
                revision: kv.create_revision,
            };
            let slot = match parent.rsplit_once('/') {
                Some((lock, "read")) => (lock.to_string(), "read"),
                Some((lock, "write")) => (lock.to_string(), "write"),
                _ if kv.value.is_empty() => (parent.to_string(), "mutex"),
                _ => (parent.to_string(), "election"),
            };
            owned.entry(slot).or_default().push((kv, owner));
        }

        let mut locks: BTreeMap<String, LockView> = BTreeMap::new();
        let mut rw: BTreeMap<String, Vec<(bool, Owner)>> = BTreeMap::new();
        let mut elections = Vec::new();
        for ((name, kind), mut owners) in owned {
            owners.sort_by_key(|(_, o)| o.revision);
            match kind {
                "mutex" => {
                    let mut owners = owners.into_iter().map(|(_, o)| o);
                    if let Some(holder) = owners.next() {
                        locks.insert(
                            name.clone(),
                            LockView {
                                name,
                                kind: "mutex",
                                holders: vec![holder],
                                waiting: owners.collect(),
                            },
                        );
                    }
                }
                "election" => {
                    let mut owners = owners.into_iter();
                    if let Some((kv, leader)) = owners.next() {
                        elections.push(ElectionView {
                            name,
                            leader,
                            value: String::from_utf8_lossy(&kv.value).into_owned(),
                            candidates: owners.map(|(_, o)| o).collect(),
                        });
                    }
                }
                role => rw
                    .entry(name)
                    .or_default()
                    .extend(owners.into_iter().map(|(_, o)| (role == "write", o))),
            }
        }
        for (name, mut owners) in rw {
            // A writer holds when it is the oldest of all; readers hold while no writer is
            // older than them (the RwLock's rule).
            owners.sort_by_key(|(_, o)| o.revision);
            let first_writer = owners.iter().position(|(w, _)| *w);
            let (mut holders, mut waiting) = (Vec::new(), Vec::new());
            for (i, (writer, owner)) in owners.into_iter().enumerate() {
                let holds = if writer {
                    i == 0
                } else {
                    first_writer.is_none_or(|w| i < w)
                };
                if holds {
                    holders.push(owner);
                } else {
                    waiting.push(owner);
                }
            }
            locks.insert(
                name.clone(),
                LockView {
                    name,
                    kind: "rwlock",
                    holders,
                    waiting,
                },
            );
        }

        for (name, ids) in claims {
            if let Some(view) = queues.get_mut(&name) {
                for item in &mut view.items {
                    item.claimed = ids.contains(&item.id);
                }
            }
        }
        for view in queues.values_mut() {
            view.items.sort_by(|a, b| {
                (a.priority, a.enqueued_ms, &a.id).cmp(&(b.priority, b.enqueued_ms, &b.id))
            });
            for item in &view.items {
                if item.claimed {
                    view.claimed += 1;
                } else if item.visible_at_ms > now_ms {
                    view.delayed += 1;
                } else {
                    view.ready += 1;
                }
            }
            view.dead = view.dead_items.len() as u64;
            view.oldest_enqueued_ms = view.items.iter().map(|i| i.enqueued_ms).min();
        }
        Inspection {
            revision,
            locks: locks.into_values().collect(),
            elections,
            queues: queues.into_values().collect(),
            services: services
                .into_iter()
                .map(|(name, mut instances)| {
                    instances.sort_by(|a, b| a.id.cmp(&b.id));
                    ServiceView { name, instances }
                })
                .collect(),
            truncated: false,
        }
    }

    /// Whether classifying a key needs its value: keys on a lease (locks, elections,
    /// services) and queue items, claims and dead letters. Every other key is ignored, so a
    /// reader may list keys only and fetch just these values.
    pub fn wants_value(key: &[u8], lease: i64) -> bool {
        lease != 0 || queue_key(&String::from_utf8_lossy(key)).is_some()
    }

    /// The queue `name`'s items waiting or claimed, in delivery order (its peek).
    pub fn items(&self, name: &str) -> &[QueueItem] {
        self.queue(name).map_or(&[], |q| &q.items)
    }

    /// The queue `name`'s dead letters.
    pub fn dead_letters(&self, name: &str) -> &[QueueItem] {
        self.queue(name).map_or(&[], |q| &q.dead_items)
    }

    /// The queue `name`, if it has anything.
    pub fn queue(&self, name: &str) -> Option<&QueueView> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// The depths of queue `name`: all zero when it has nothing.
    pub fn queue_or_empty(&self, name: &str) -> QueueView {
        self.queue(name).cloned().unwrap_or_else(|| QueueView {
            name: name.to_string(),
            ..Default::default()
        })
    }
}

/// `(queue, "items" | "claims" | "dead", item id)` if `key` is a queue's item, claim or dead
/// letter: an item id is `<priority:05>/<enqueue ns:020>_<random:016x>`.
fn queue_key(key: &str) -> Option<(&str, &str, &str)> {
    for part in ["items", "claims", "dead"] {
        let marker = format!("/{part}/");
        if let Some(at) = key.rfind(&marker) {
            let (queue, id) = (&key[..at], &key[at + marker.len()..]);
            if !queue.is_empty() && item_id(id).is_some() {
                return Some((queue, part, id));
            }
        }
    }
    None
}

/// `(priority, enqueue ns)` of a well-formed item id.
fn item_id(id: &str) -> Option<(u16, u64)> {
    let (priority, rest) = id.split_once('/')?;
    let (ns, random) = rest.split_once('_')?;
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let hex = random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit());
    if !(digits(priority, 5) && digits(ns, 20) && hex) {
        return None;
    }
    Some((priority.parse().ok()?, ns.parse().ok()?))
}

fn queue_item(id: &str, value: &[u8]) -> Option<QueueItem> {
    let (priority, ns) = item_id(id)?;
    // An envelope that does not parse is still an item (the queue dead-letters it on claim).
    let envelope: Option<Envelope> = serde_json::from_slice(value).ok();
    Some(QueueItem {
        id: id.to_string(),
        priority,
        enqueued_ms: ns / 1_000_000,
        attempts: envelope.as_ref().map_or(0, |e| e.attempts),
        visible_at_ms: envelope.as_ref().map_or(0, |e| e.visible_at_ms),
        conditions: envelope.as_ref().map_or(0, |e| e.conditions.len()),
        claimed: false,
        payload: envelope.map_or_else(
            || serde_json::Value::String(String::from_utf8_lossy(value).into_owned()),
            |e| e.payload,
        ),
    })
}

fn instance(value: &[u8]) -> Option<crate::discovery::InstanceInfo> {
    if !value.starts_with(b"{") {
        return None;
    }
    serde_json::from_slice(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, lease: i64, revision: i64) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            lease,
            create_revision: revision,
            mod_revision: revision,
            version: 1,
        }
    }

    fn item(priority: u16, ns: u64, random: &str) -> String {
        format!("{priority:05}/{ns:020}_{random}")
    }

    #[test]
    fn locks_elections_queues_and_services_are_told_apart() {
        let a = item(0, 2_000_000_000, "00000000000000aa");
        let b = item(0, 1_000_000_000, "00000000000000bb");
        let c = item(3, 500_000_000, "00000000000000cc");
        let d = item(0, 3_000_000_000, "00000000000000dd");
        let envelope = |attempts: u32, visible: u64| {
            format!(r#"{{"attempts":{attempts},"visible_at_ms":{visible},"payload":{{"job":1}}}}"#)
        };
        let kvs = vec![
            kv("locks/reindex/2a", "", 0x2a, 10),
            kv("locks/reindex/1b", "", 0x1b, 12),
            kv("locks/reindex/3c", "", 0x3c, 11),
            kv("elections/indexer/4d", "worker-2", 0x4d, 20),
            kv("elections/indexer/5e", "worker-1", 0x5e, 15),
            kv("rw/read/61", "", 0x61, 30),
            kv("rw/write/62", "", 0x62, 31),
            kv("rw/read/63", "", 0x63, 32),
            kv(&format!("jobs/items/{a}"), &envelope(0, 0), 0, 40),
            kv(&format!("jobs/items/{b}"), &envelope(1, 0), 0, 41),
            kv(&format!("jobs/items/{c}"), &envelope(0, 0), 0, 42),
            kv(&format!("jobs/items/{d}"), &envelope(0, 9_999), 0, 43),
            kv(&format!("jobs/claims/{b}"), "", 0x70, 44),
            kv(
                &format!("jobs/dead/{}", item(0, 1, "00000000000000ee")),
                &envelope(5, 0),
                0,
                45,
            ),
            kv(
                "services/search/node-1",
                r#"{"endpoint":"http://10.0.0.7:8080","metadata":{"zone":"eu"}}"#,
                0x80,
                50,
            ),
            // Not recipes: a plain key, a key on a lease named otherwise, a JSON value
            // without a lease, and an item id of the wrong shape.
            kv("config/db", "postgres://", 0, 60),
            kv("sessions/abc", "", 0x99, 61),
            kv("static/node", r#"{"endpoint":"x"}"#, 0, 62),
            kv("jobs/items/7/123_ab", "{}", 0, 63),
        ];
        let found = Inspection::from_kvs(70, &kvs, 5_000);
        // Listing keys only and fetching just the values it wants gives the same views.
        let wanted: Vec<KeyValue> = kvs
            .iter()
            .filter(|kv| Inspection::wants_value(&kv.key, kv.lease))
            .cloned()
            .collect();
        assert!(wanted.len() < kvs.len());
        assert_eq!(Inspection::from_kvs(70, &wanted, 5_000), found);
        assert_eq!(found.revision, 70);

        assert_eq!(found.locks.len(), 2, "{:?}", found.locks);
        let mutex = &found.locks[0];
        assert_eq!(
            (mutex.name.as_str(), mutex.kind),
            ("locks/reindex", "mutex")
        );
        assert_eq!(mutex.holders.len(), 1);
        assert_eq!(mutex.holders[0].key, "locks/reindex/2a");
        assert_eq!(mutex.holders[0].revision, 10);
        let waiting: Vec<_> = mutex.waiting.iter().map(|o| o.lease.as_str()).collect();
        assert_eq!(waiting, ["3c", "1b"]);
        let rw = &found.locks[1];
        assert_eq!((rw.name.as_str(), rw.kind), ("rw", "rwlock"));
        let holders: Vec<_> = rw.holders.iter().map(|o| o.lease.as_str()).collect();
        assert_eq!(holders, ["61"], "the reader older than the writer holds");
        let waiting: Vec<_> = rw.waiting.iter().map(|o| o.lease.as_str()).collect();
        assert_eq!(waiting, ["62", "63"]);

        assert_eq!(found.elections.len(), 1);
        let election = &found.elections[0];
        assert_eq!(election.name, "elections/indexer");
        assert_eq!(election.value, "worker-1");
        assert_eq!(election.leader.revision, 15);
        assert_eq!(election.candidates.len(), 1);

        assert_eq!(found.queues.len(), 1, "{:?}", found.queues);
        let jobs = &found.queues[0];
        assert_eq!(jobs.name, "jobs");
        assert_eq!(
            (jobs.ready, jobs.delayed, jobs.claimed, jobs.dead),
            (2, 1, 1, 1)
        );
        assert_eq!(jobs.oldest_enqueued_ms, Some(500), "c, though last in line");
        let order: Vec<_> = found.items("jobs").iter().map(|i| i.id.clone()).collect();
        assert_eq!(order, [b.clone(), a, d, c], "priority, then enqueue time");
        assert!(found.items("jobs")[0].claimed);
        assert_eq!(found.items("jobs")[0].attempts, 1);
        assert_eq!(
            found.items("jobs")[0].payload,
            serde_json::json!({"job": 1})
        );
        assert_eq!(found.dead_letters("jobs").len(), 1);
        assert_eq!(found.dead_letters("jobs")[0].attempts, 5);

        assert_eq!(found.services.len(), 1);
        let search = &found.services[0];
        assert_eq!(search.name, "services/search");
        assert_eq!(search.instances[0].id, "node-1");
        assert_eq!(search.instances[0].endpoint, "http://10.0.0.7:8080");
        assert_eq!(search.instances[0].metadata["zone"], "eu");
        assert_eq!(search.instances[0].lease, "80");
    }
}
