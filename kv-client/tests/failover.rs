//! One client on a three-member cluster, busy with reads, writes, an open watch and a kept-alive
//! lease all at once, while the member it uses (the leader) is SIGKILLed. Run against our
//! cluster and, with the same body, against etcd 3.4.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kv_client::{Client, ClientOptions, Error, GetOptions, PutOptions, WatchOptions, WatchStream};
use kv_tests::{Cluster, EtcdCluster, Members, wait_leader_among};

const TTL: i64 = 5;
const WRITES: i64 = 200;
/// The kill comes after this many writes were acknowledged.
const KILL_AFTER: i64 = 50;
const KEY: &str = "failover/w";

/// What the writer did with each value it sent.
#[derive(Default)]
struct Writes {
    acked: Vec<i64>,
    unknown: Vec<i64>,
    /// Of `unknown`, those a surviving member itself answered with its proposal timeout.
    timed_out_by_member: Vec<i64>,
}

/// Puts `0..WRITES` to `KEY`, one at a time, 10 ms apart; an unknown outcome is recorded, not
/// resent. `last_acked` is what readers must see at least.
async fn write_all(client: Client, last_acked: Arc<AtomicI64>) -> Writes {
    let mut writes = Writes::default();
    for i in 0..WRITES {
        match client.kv().put(KEY, i.to_string(), PutOptions::new()).await {
            Ok(_) => {
                writes.acked.push(i);
                last_acked.store(i, Ordering::SeqCst);
            }
            Err(Error::OutcomeUnknown(why)) => {
                eprintln!("put {i}: outcome unknown ({why})");
                if why.to_string().contains("etcdserver: request timed out") {
                    writes.timed_out_by_member.push(i);
                }
                writes.unknown.push(i);
            }
            Err(e) => panic!("put {i} failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writes
}

/// Reads `KEY` until told to stop; every read must succeed, never go back in revision, and see
/// at least the last write acknowledged before it was sent (reads are linearizable). Returns
/// how many reads completed after `killed` was set.
async fn read_until(
    client: Client,
    last_acked: Arc<AtomicI64>,
    killed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> usize {
    let mut after_kill = 0;
    let mut revision = 0;
    while !stop.load(Ordering::SeqCst) {
        let floor = last_acked.load(Ordering::SeqCst);
        let was_killed = killed.load(Ordering::SeqCst);
        let got = client
            .kv()
            .get(KEY, GetOptions::new())
            .await
            .unwrap_or_else(|e| panic!("read failed: {e}"));
        assert!(got.revision >= revision, "read went back in revision");
        revision = got.revision;
        if floor >= 0 {
            let seen: i64 = String::from_utf8_lossy(&got.kvs[0].value).parse().unwrap();
            assert!(
                seen >= floor,
                "stale read: {seen} after {floor} was acknowledged"
            );
        }
        if was_killed {
            after_kill += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    after_kill
}

/// The values of `KEY`'s events from `stream` until one carries `last`.
async fn collect_until(stream: &mut WatchStream, last: i64) -> Vec<i64> {
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        let update = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("no watch update within 20 s")
            .expect("the watch stream ended")
            .expect("the watch failed");
        for e in update.events {
            seen.push(String::from_utf8_lossy(&e.kv.value).parse().unwrap());
        }
    }
    seen
}

async fn failover_scenario(members: &mut impl Members, member_timeouts_allowed: usize) {
    let leader = wait_leader_among(members, &[0, 1, 2], Duration::from_secs(15)).await;
    // The leader first, so the member in use is the one whose death also forces an election.
    let mut endpoints = vec![members.endpoint_of(leader).unwrap()];
    endpoints.extend(
        (0..3)
            .filter(|i| *i != leader)
            .map(|i| members.endpoint_of(i).unwrap()),
    );
    let client = Client::connect(&endpoints, ClientOptions::default())
        .await
        .expect("connect");

    let lease = client.lease().grant(TTL, None).await.unwrap();
    client
        .kv()
        .put("failover/held", "v", PutOptions::new().lease(lease.id))
        .await
        .unwrap();
    let kept = client.lease().keep_alive(lease.id).await.unwrap();

    let mut stream = client.watch().watch(KEY, WatchOptions::new());
    client.watch().request_progress();
    let established = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("no progress answer")
        .unwrap()
        .unwrap();
    assert!(established.events.is_empty());
    let watched_from = established.revision + 1;

    let last_acked = Arc::new(AtomicI64::new(-1));
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = tokio::spawn(read_until(
        client.clone(),
        last_acked.clone(),
        killed.clone(),
        stop.clone(),
    ));
    let writes = tokio::spawn(write_all(client.clone(), last_acked.clone()));
    let watched = tokio::spawn(async move {
        let seen = collect_until(&mut stream, WRITES - 1).await;
        (seen, stream)
    });

    while last_acked.load(Ordering::SeqCst) < KILL_AFTER {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(client.current_endpoint().ends_with(&endpoints[0]));
    members.kill_member(leader);
    let kill_time = Instant::now();
    killed.store(true, Ordering::SeqCst);

    let writes = writes.await.expect("writer panicked");
    eprintln!(
        "writes done {:?} after the kill; unknown outcome: {:?}",
        kill_time.elapsed(),
        writes.unknown
    );
    // etcd 3.4 has a re-election race of its own: a surviving follower can forward the next
    // put to the leader just killed and answer "request timed out" when it never commits.
    // That member's verdict is allowed on etcd, once; our server must not need it.
    let member_verdicts = writes
        .timed_out_by_member
        .len()
        .min(member_timeouts_allowed);
    assert!(
        writes.unknown.len() - member_verdicts <= 1,
        "only the write in flight at the kill may be unknown"
    );
    assert_eq!(
        writes.acked.last(),
        Some(&(WRITES - 1)),
        "the last write failed"
    );
    stop.store(true, Ordering::SeqCst);
    let reads_after_kill = reads.await.expect("reader panicked");
    assert!(reads_after_kill > 0, "no read completed after the kill");
    let (seen, _stream) = watched.await.expect("watcher panicked");

    // The history as the surviving members hold it, read by a fresh client.
    let survivors: Vec<String> = endpoints[1..].to_vec();
    let auditor = Client::connect(&survivors, ClientOptions::default())
        .await
        .unwrap();
    let mut audit = auditor
        .watch()
        .watch(KEY, WatchOptions::new().start_revision(watched_from));
    let history = collect_until(&mut audit, WRITES - 1).await;
    assert_eq!(seen, history, "the resumed watch lost or repeated an event");
    let mut expected = writes.acked.clone();
    expected.extend(writes.unknown.iter().filter(|v| history.contains(v)));
    expected.sort_unstable();
    assert_eq!(
        history, expected,
        "history differs from the acknowledged writes"
    );

    // The lease was renewed through the failover and outlives several TTLs after it.
    let until = kill_time + Duration::from_secs(2 * TTL as u64);
    while Instant::now() < until {
        assert_eq!(kept.try_lost(), None, "the kept lease was lost");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(kept.valid_until() > Instant::now());
    let held = client.kv().get("failover/held", GetOptions::new()).await;
    assert_eq!(held.unwrap().kvs.len(), 1, "the kept lease expired");
    assert!(!client.current_endpoint().ends_with(&endpoints[0]));
    eprintln!(
        "{} reads after the kill, {} events watched",
        reads_after_kill,
        seen.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_watch_and_lease_survive_the_kill_of_the_member_in_use() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut cluster = Cluster::start(3);
        failover_scenario(&mut cluster, 0).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_watch_and_lease_survive_the_kill_of_the_member_in_use_on_etcd() {
    let mut cluster = match EtcdCluster::start(3) {
        Ok(c) => c,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    tokio::time::timeout(Duration::from_secs(120), failover_scenario(&mut cluster, 1))
        .await
        .expect("test timed out");
}
