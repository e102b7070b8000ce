//! The short reliability set (one round of every scenario), as CI runs it (the fuzz run is
//! `tests/fuzz.rs`);
//! `bash .ci/reliability` runs the long set and writes `docs/reliability.md`.

use std::time::Duration;

use kv_tests::reliability::{self, Report};
use kv_tests::rng::Rng;

/// Runs the short scenario named `name` with a fresh seed (printed, to repeat a failure).
async fn short(name: &str) {
    let scenario = reliability::scenarios(false)
        .into_iter()
        .find(|s| s.name == name)
        .expect("scenario");
    let seed = Rng::fresh_seed();
    eprintln!("{name}: seed {seed}");
    let report = tokio::time::timeout(
        Duration::from_secs(240),
        reliability::run_scenario(&scenario, seed),
    )
    .await
    .expect("scenario finishes in 4 minutes");
    assert_clean(&report);
    assert!(
        report.faults.values().sum::<u64>() >= scenario.faults_per_round as u64,
        "every fault was injected: {:?}",
        report.faults
    );
    // Enough work happened to check: KV rounds record hundreds of operations; a recipe round
    // on a loaded CI machine about 20 lock sections and 80 queue items.
    let worked = if scenario.recipes {
        report.lock_sections >= 5 && report.queue_items >= 20
    } else {
        report.histories > 0 && report.operations > 100
    };
    assert!(worked, "too little was done to check: {report:?}");
}

fn assert_clean(report: &Report) {
    eprintln!("{report:?}");
    assert!(
        report.anomalies.is_empty(),
        "{} anomalies (seed {}):\n{}",
        report.anomalies.len(),
        report.seed,
        report.anomalies.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_keep_histories_linearizable() {
    short("leader kills").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_keep_histories_linearizable() {
    short("partitions").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_keep_histories_linearizable() {
    short("pauses").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_mid_snapshot_lose_nothing() {
    short("crashes mid-snapshot").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_on_write_purge_and_compaction_paths_lose_nothing() {
    short("crashes on write, purge, apply, compaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_full_disks_lose_nothing() {
    short("slow and full disks").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_at_once_keeps_histories_linearizable() {
    short("everything at once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_stay_exclusive_and_queue_items_are_not_lost_under_faults() {
    short("locks and a queue under kills, pauses, partitions").await;
}

/// The harness can fail: a serializable read from a member cut off from the others is
/// stale (etcd documents it may be), and the checker, fed the real answers, says so, while
/// the same history with a linearizable read is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_read_from_a_partitioned_member_is_caught() {
    use kv_core::proto::etcdserverpb::{PutRequest, RangeRequest, kv_client::KvClient};
    use kv_tests::history::{Recorder, channel};
    use kv_tests::linearizability::{Call, Operation, Outcome, check};

    tokio::time::timeout(Duration::from_secs(120), async {
        let cluster = tokio::task::spawn_blocking(|| kv_tests::Cluster::start(3))
            .await
            .unwrap();
        let leader =
            kv_tests::wait_leader_among(&cluster, &[0, 1, 2], Duration::from_secs(20)).await;
        let follower = (leader + 1) % 3;
        let kv = |i: usize| KvClient::new(channel(&cluster.endpoint(i), Duration::from_secs(3)));
        let recorder = Recorder::default();
        let key = b"stale".to_vec();
        let put = |value: u64| {
            let mut c = kv(leader);
            let (key, recorder) = (key.clone(), &recorder);
            async move {
                let invoked = recorder.now();
                let written = c
                    .put(PutRequest {
                        key: key.clone(),
                        value: value.to_string().into_bytes(),
                        ..Default::default()
                    })
                    .await
                    .expect("put through the leader")
                    .into_inner();
                recorder.record(Operation {
                    key,
                    call: Call::Put { value },
                    outcome: Outcome::Written,
                    invoked,
                    returned: Some(recorder.now()),
                    client: 0,
                    member: leader,
                    revision: written.header.map_or(0, |h| h.revision),
                });
            }
        };
        let read = |serializable: bool| {
            let mut c = kv(follower);
            let (key, recorder) = (key.clone(), &recorder);
            async move {
                let invoked = recorder.now();
                let got = c
                    .range(RangeRequest {
                        key: key.clone(),
                        serializable,
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner();
                let value = got.kvs.first().map(|kv| {
                    String::from_utf8_lossy(&kv.value)
                        .parse::<u64>()
                        .unwrap_or(u64::MAX)
                });
                Some(Operation {
                    key,
                    call: Call::Get,
                    outcome: Outcome::Read(value),
                    invoked,
                    returned: Some(recorder.now()),
                    client: 1,
                    member: follower,
                    revision: got.header.map_or(0, |h| h.revision),
                })
            }
        };
        put(1).await;
        // The follower has applied the first put before it is cut off.
        while read(true).await.map(|o| o.outcome) != Some(Outcome::Read(Some(1))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster.isolate(follower);
        put(2).await;
        let stale = read(true)
            .await
            .expect("a serializable read is served locally");
        assert_eq!(
            stale.outcome,
            Outcome::Read(Some(1)),
            "the cut-off member is behind"
        );
        let mut history = recorder.operations();
        history.push(stale);
        let report = check(&history, 1_000_000);
        assert_eq!(report.anomalies.len(), 1, "{report:?}");
        // A linearizable read from the same member is not stale: it fails while cut off...
        let linearizable = read(false).await;
        assert!(
            linearizable.is_none()
                || linearizable.as_ref().unwrap().outcome == Outcome::Read(Some(2)),
            "{linearizable:?}"
        );
        // ...and is fresh once healed, and the checker accepts that history.
        cluster.heal(follower);
        let fresh = loop {
            if let Some(op) = read(false).await {
                break op;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut history = recorder.operations();
        history.push(fresh);
        let report = check(&history, 1_000_000);
        assert!(report.anomalies.is_empty(), "{report:?}");
        tokio::task::spawn_blocking(move || drop(cluster))
            .await
            .unwrap();
    })
    .await
    .expect("test timed out");
}

/// The queue check's consumers stop at an empty queue only once the producers have returned:
/// they used to stop at the producers' stop signal, and an enqueue in flight then was
/// acknowledged after every consumer had left, so the long run reported the last item of each
/// producer as lost (anomaly B of the first long run; the store had it all along).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_consumers_wait_for_the_producers_before_stopping_at_an_empty_queue() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use kv_tests::recipe_checks::{connect, run_consumer};

    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let server = tokio::task::spawn_blocking(move || kv_tests::start_kv_server(&data, &[]))
            .await
            .expect("start kv-server");
        let endpoints = vec![server.endpoint.clone()];
        let client = connect(&endpoints).await.expect("client");
        let queue = b"late-enqueue/queue".to_vec();
        let produced = Arc::new(AtomicBool::new(false));
        let consumer = tokio::spawn(run_consumer(
            client.clone(),
            queue.clone(),
            produced.clone(),
            Instant::now() + Duration::from_secs(30),
        ));
        // The consumer has found the queue empty by now, more than once.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!consumer.is_finished(), "stopped before the producers did");
        let q: recipes::Queue<String> = recipes::Queue::new(&client, &queue);
        q.enqueue(&"late".to_string()).await.expect("enqueue");
        produced.store(true, Ordering::Release);
        let log = consumer.await.expect("consumer");
        assert_eq!(log.delivered.get("late"), Some(&1), "{log:?}");
    })
    .await
    .expect("test timed out");
}
