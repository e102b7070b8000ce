//! The recipes under faults: lock holders doing fenced read-modify-writes, and a queue's
//! producers and consumers, through `kv-client` and `recipes` as applications use them;
//! then the checks. Mutual exclusion holds by fence when no two fenced writes started from
//! the same counter value. No queue item is lost when every item whose enqueue was
//! acknowledged was delivered at least once (or moved to the dead letters), and the queue is
//! empty once the consumers have drained it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kv_client::{Client, ClientOptions, GetOptions, PutOptions, TxnOp};
use recipes::{Mutex, Queue, Session};

/// The lease TTL of the recipe sessions: short, so a lost holder or consumer is replaced
/// within a round.
const SESSION_TTL: i64 = 3;

/// Connects a client to every member; retried, since a member may be down.
pub async fn connect(endpoints: &[String]) -> Option<Client> {
    let options = ClientOptions {
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    for _ in 0..30 {
        if let Ok(c) = Client::connect(endpoints, options.clone()).await {
            return Some(c);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// What one lock worker did.
#[derive(Debug, Default, Clone)]
pub struct LockLog {
    /// The counter value each acknowledged fenced increment started from.
    pub from: Vec<u64>,
    /// Fenced writes whose outcome is unknown.
    pub unknown: u64,
    /// Fenced writes refused because the hold was already lost.
    pub fenced_off: u64,
}

async fn read_counter(client: &Client, key: &[u8]) -> Option<u64> {
    let r = client.kv().get(key, GetOptions::default()).await.ok()?;
    Some(match r.kvs.first() {
        Some(kv) => std::str::from_utf8(&kv.value).ok()?.parse().ok()?,
        None => 0,
    })
}

/// Until `stop`: take the lock `name`, read `counter`, write it plus one in a transaction
/// fenced on the hold, release; a lost session is replaced.
pub async fn run_lock_worker(
    client: Client,
    name: Vec<u8>,
    counter: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> LockLog {
    let mut log = LockLog::default();
    while !stop.load(Ordering::Relaxed) {
        let Ok(session) = Session::with_ttl(&client, SESSION_TTL).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mutex = Mutex::new(&session, &name);
        while !stop.load(Ordering::Relaxed) && session.try_lost().is_none() {
            let guard = match tokio::time::timeout(Duration::from_secs(5), mutex.lock()).await {
                Ok(Ok(g)) => g,
                _ => break,
            };
            let Some(c) = read_counter(&client, &counter).await else {
                let _ = guard.unlock().await;
                continue;
            };
            let write = guard.txn().and_then([TxnOp::put(
                counter.clone(),
                (c + 1).to_string(),
                PutOptions::default(),
            )]);
            match client.kv().txn(write).await {
                Ok(r) if r.succeeded => log.from.push(c),
                Ok(_) => log.fenced_off += 1,
                Err(_) => log.unknown += 1,
            }
            let _ = guard.unlock().await;
        }
    }
    log
}

/// Checks mutual exclusion over the workers' logs and the counter's final value; returns
/// the anomalies and the number of acknowledged fenced sections.
pub fn check_locks(logs: &[LockLog], final_value: u64) -> (Vec<String>, u64) {
    let mut anomalies = Vec::new();
    let mut seen = BTreeSet::new();
    for from in logs.iter().flat_map(|l| &l.from) {
        if !seen.insert(*from) {
            anomalies.push(format!(
                "two fenced writes both incremented the counter from {from}: two holders at once"
            ));
        }
    }
    let acked = seen.len() as u64;
    let unknown: u64 = logs.iter().map(|l| l.unknown).sum();
    if final_value < acked || final_value > acked + unknown {
        anomalies.push(format!(
            "the counter ends at {final_value}, not within {acked} acknowledged increments \
             plus {unknown} of unknown outcome"
        ));
    }
    (anomalies, acked)
}

/// What the queue's producers and consumers did.
#[derive(Debug, Default, Clone)]
pub struct QueueLog {
    /// Items whose enqueue was acknowledged.
    pub enqueued: BTreeSet<String>,
    /// Items whose enqueue has an unknown outcome.
    pub maybe_enqueued: BTreeSet<String>,
    /// Items delivered (claimed by a consumer), with how many times. An ack whose outcome
    /// is unknown may still have removed the item, so delivery is counted at the claim.
    pub delivered: BTreeMap<String, u64>,
}

/// Until `stop`: enqueue `producer`'s numbered items.
pub async fn run_producer(
    client: Client,
    queue: Vec<u8>,
    producer: usize,
    stop: Arc<AtomicBool>,
) -> QueueLog {
    let q: Queue<String> = Queue::new(&client, &queue);
    let mut log = QueueLog::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let item = format!("p{producer}-{n:06}");
        n += 1;
        match q.enqueue(&item).await {
            Ok(_) => log.enqueued.insert(item),
            Err(_) => log.maybe_enqueued.insert(item),
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    log
}

/// Until `produced` (set once every producer has returned) and the queue is drained, or
/// until `drain_by`: claim items and acknowledge them; a lost session is replaced.
pub async fn run_consumer(
    client: Client,
    queue: Vec<u8>,
    produced: Arc<AtomicBool>,
    drain_by: Instant,
) -> QueueLog {
    let q: Queue<String> = Queue::new(&client, &queue);
    let mut log = QueueLog::default();
    loop {
        if Instant::now() >= drain_by {
            return log;
        }
        let Ok(session) = Session::with_ttl(&client, SESSION_TTL).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while session.try_lost().is_none() && Instant::now() < drain_by {
            let claimed =
                match tokio::time::timeout(Duration::from_secs(1), q.try_dequeue(&session)).await {
                    Ok(Ok(Some(c))) => c,
                    Ok(Ok(None)) => {
                        // Empty now: done once the producers stopped and nothing is in flight
                        // (a claim of a consumer that died comes back when its lease ends).
                        // `produced` is read first: every enqueue was acknowledged before
                        // this (linearizable) count began, so the count includes them.
                        let done = produced.load(Ordering::Acquire);
                        let empty = q.len().await.is_ok_and(|n| n == 0);
                        if done && empty {
                            let _ = session.close().await;
                            return log;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    _ => break,
                };
            *log.delivered.entry(claimed.item.clone()).or_default() += 1;
            // A failed ack leaves the claim to lapse with the session, and the item comes
            // back to be delivered again.
            let _ = claimed.ack().await;
        }
    }
}

/// Checks that no acknowledged item was lost and nothing was invented; returns the
/// anomalies and the number of items accounted for.
pub fn check_queue(logs: &[QueueLog], dead: &BTreeSet<String>) -> (Vec<String>, u64) {
    let mut all = QueueLog::default();
    for l in logs {
        all.enqueued.extend(l.enqueued.iter().cloned());
        all.maybe_enqueued.extend(l.maybe_enqueued.iter().cloned());
        for (item, n) in &l.delivered {
            *all.delivered.entry(item.clone()).or_default() += n;
        }
    }
    let mut anomalies = Vec::new();
    let lost: Vec<&String> = all
        .enqueued
        .iter()
        .filter(|i| !all.delivered.contains_key(*i) && !dead.contains(*i))
        .collect();
    if !lost.is_empty() {
        anomalies.push(format!(
            "{} acknowledged queue items never delivered, first {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    let invented: Vec<&String> = all
        .delivered
        .keys()
        .filter(|i| !all.enqueued.contains(*i) && !all.maybe_enqueued.contains(*i))
        .collect();
    if !invented.is_empty() {
        anomalies.push(format!("items delivered but never enqueued: {invented:?}"));
    }
    (anomalies, all.enqueued.len() as u64)
}

/// The items in the queue's dead-letter area.
pub async fn dead_letters(client: &Client, queue: &[u8]) -> BTreeSet<String> {
    let q: Queue<String> = Queue::new(client, queue);
    q.dead_letters()
        .await
        .map(|d| d.into_iter().map(|(_, item, _)| item).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_holders_at_once_and_a_lost_item_are_found() {
        let one = LockLog {
            from: vec![0, 1, 2],
            ..Default::default()
        };
        let other = LockLog {
            from: vec![3, 4],
            unknown: 1,
            ..Default::default()
        };
        assert!(check_locks(&[one.clone(), other.clone()], 5).0.is_empty());
        assert!(check_locks(&[one.clone(), other.clone()], 6).0.is_empty());
        assert_eq!(check_locks(&[one.clone(), other.clone()], 4).0.len(), 1);
        let overlapping = LockLog {
            from: vec![2],
            ..Default::default()
        };
        assert!(!check_locks(&[one, overlapping], 3).0.is_empty());

        let produced = QueueLog {
            enqueued: ["a", "b", "c"].iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let consumed = QueueLog {
            delivered: [("a".to_string(), 1), ("b".to_string(), 2)].into(),
            ..Default::default()
        };
        let dead: BTreeSet<String> = ["c".to_string()].into();
        assert!(
            check_queue(&[produced.clone(), consumed.clone()], &dead)
                .0
                .is_empty()
        );
        assert_eq!(
            check_queue(&[produced, consumed], &BTreeSet::new()).0.len(),
            1
        );
    }
}
