//! Queues on one server, against our server and etcd 3.4 with the same bodies: order,
//! priorities, delays, acks and redelivery, dead letters, capacity, and condition gates.

use std::time::{Duration, Instant};

use kv_client::{Client, ClientOptions, PutOptions};
use kv_tests::on_both_servers;
use recipes::{Condition, EnqueueOptions, Error, Queue, QueueOptions, Session};

async fn connect(endpoint: &str) -> (Client, Session) {
    let client = Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect");
    let session = Session::with_ttl(&client, 5).await.expect("session");
    (client, session)
}

/// `fut`'s output, which must come within 10 s.
async fn soon<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("did not finish within 10 s")
}

/// True if `fut` has not finished after a moment (it is waiting).
async fn still_waiting<F: std::future::Future>(fut: &mut std::pin::Pin<Box<F>>) -> bool {
    tokio::time::timeout(Duration::from_millis(300), fut.as_mut())
        .await
        .is_err()
}

async fn next(queue: &Queue<u32>, session: &Session) -> recipes::Claimed<u32> {
    soon(queue.dequeue(session)).await.expect("dequeue")
}

async fn queue_scenario(endpoint: &str) {
    let (client, session) = connect(endpoint).await;
    let options = QueueOptions {
        max_attempts: 2,
        ..Default::default()
    };
    let queue: Queue<u32> = Queue::with_options(&client, "jobs", options);

    // FIFO, batch enqueue.
    let items: Vec<u32> = (0..100).collect();
    queue.enqueue_all(&items).await.unwrap();
    assert_eq!(queue.len().await.unwrap(), 100);
    let mut fences = Vec::new();
    for expected in 0..100 {
        let claimed = next(&queue, &session).await;
        assert_eq!((claimed.item, claimed.attempts()), (expected, 1));
        fences.push(claimed.fence().revision);
        claimed.ack().await.unwrap();
    }
    assert!(fences.windows(2).all(|w| w[0] < w[1]));
    assert!(queue.is_empty().await.unwrap());
    assert!(queue.try_dequeue(&session).await.unwrap().is_none());

    // A consumer waits for the next item.
    let mut waiting = Box::pin(queue.dequeue(&session));
    assert!(still_waiting(&mut waiting).await);
    queue.enqueue(&7).await.unwrap();
    let claimed = soon(waiting).await.unwrap();
    assert_eq!(claimed.item, 7);
    assert_eq!(queue.in_flight().await.unwrap(), 1);
    // Claimed items are not delivered twice.
    assert!(queue.try_dequeue(&session).await.unwrap().is_none());

    // nack: delivered again; after max_attempts it goes to the dead letters.
    claimed.nack().await.unwrap();
    let again = next(&queue, &session).await;
    assert_eq!((again.item, again.attempts()), (7, 2));
    let stale_owner = again.is_owner();
    again.nack().await.unwrap();
    assert!(queue.try_dequeue(&session).await.unwrap().is_none());
    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].1, dead[0].2), (7, 2));
    // The nacked claim's compare no longer holds.
    let stale = client
        .kv()
        .txn(kv_client::Txn::new().when([stale_owner]))
        .await
        .unwrap();
    assert!(!stale.succeeded);

    // A dropped claim is released; a consumer whose session ends loses its item to another.
    let queue: Queue<u32> = Queue::new(&client, "jobs2");
    queue.enqueue(&8).await.unwrap();
    drop(next(&queue, &session).await);
    let claimed = next(&queue, &session).await;
    assert_eq!((claimed.item, claimed.attempts()), (8, 2));
    let other = Session::with_ttl(&client, 5).await.unwrap();
    client.lease().revoke(session.lease()).await.unwrap();
    let redelivered = next(&queue, &other).await;
    assert_eq!(redelivered.item, 8);
    assert!(matches!(claimed.ack().await, Err(Error::ClaimLost)));
    redelivered.ack().await.unwrap();
    assert!(queue.is_empty().await.unwrap());

    // Priorities: lower first, FIFO within one; delayed items wait.
    for (item, priority) in [(1, 5), (2, 1), (3, 5), (4, 1), (5, 0)] {
        let options = EnqueueOptions::new().priority(priority);
        queue.enqueue_with(&item, options).await.unwrap();
    }
    // Taken before the call: the delay runs from when the producer asked, so an enqueue that
    // takes a while to commit leaves less than the whole delay still to wait once it returns.
    let enqueued = Instant::now();
    let delayed = EnqueueOptions::new().delay(Duration::from_millis(800));
    queue.enqueue_with(&6, delayed).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..6 {
        let claimed = next(&queue, &other).await;
        order.push(claimed.item);
        claimed.ack().await.unwrap();
    }
    assert_eq!(order, [5, 2, 4, 1, 3, 6]);
    assert!(enqueued.elapsed() >= Duration::from_millis(800));
}
on_both_servers!(queue_scenario, queue_on_our_server, queue_on_etcd, 60);

async fn capacity_scenario(endpoint: &str) {
    let (client, session) = connect(endpoint).await;
    let options = QueueOptions {
        capacity: Some(2),
        ..Default::default()
    };
    let queue: Queue<u32> = Queue::with_options(&client, "bounded", options);
    queue.enqueue(&1).await.unwrap();
    queue.enqueue(&2).await.unwrap();
    assert!(matches!(
        queue.try_enqueue_with(&3, EnqueueOptions::new()).await,
        Err(Error::QueueFull)
    ));
    let mut blocked = Box::pin(queue.enqueue(&3));
    assert!(still_waiting(&mut blocked).await);
    // A claimed item still takes room; its ack frees it.
    let first = next(&queue, &session).await;
    assert!(still_waiting(&mut blocked).await);
    first.ack().await.unwrap();
    soon(blocked).await.unwrap();
    assert_eq!(queue.len().await.unwrap(), 2);
    for expected in [2, 3] {
        let claimed = next(&queue, &session).await;
        assert_eq!(claimed.item, expected);
        claimed.ack().await.unwrap();
    }
    // Concurrent producers never overfill it.
    let producers: Vec<_> = (0..6)
        .map(|i| {
            let queue = queue.clone();
            tokio::spawn(async move { queue.try_enqueue_with(&i, EnqueueOptions::new()).await })
        })
        .collect();
    let mut accepted = 0;
    for p in producers {
        match p.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(Error::QueueFull) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(accepted, 2);
    assert_eq!(queue.len().await.unwrap(), 2);
}
on_both_servers!(
    capacity_scenario,
    capacity_on_our_server,
    capacity_on_etcd,
    60
);

async fn condition_scenario(endpoint: &str) {
    let (client, session) = connect(endpoint).await;
    let kv = client.kv();
    let queue: Queue<u32> = Queue::new(&client, "gated");
    let ready = EnqueueOptions::new().when(Condition::value_is("dataset", "ready"));
    queue.enqueue_with(&1, ready.clone()).await.unwrap();
    queue.enqueue(&2).await.unwrap();
    // The gated item does not block the ones behind it.
    let free = next(&queue, &session).await;
    assert_eq!(free.item, 2);
    free.ack().await.unwrap();
    assert!(queue.try_dequeue(&session).await.unwrap().is_none());
    let mut waiting = Box::pin(queue.dequeue(&session));
    assert!(still_waiting(&mut waiting).await);
    kv.put("dataset", "loading", PutOptions::new())
        .await
        .unwrap();
    assert!(still_waiting(&mut waiting).await);
    kv.put("dataset", "ready", PutOptions::new()).await.unwrap();
    let claimed = soon(waiting).await.unwrap();
    assert_eq!(claimed.item, 1);
    claimed.ack().await.unwrap();

    // The condition turns false again before the claim: no claim.
    queue.enqueue_with(&3, ready).await.unwrap();
    kv.put("dataset", "stale", PutOptions::new()).await.unwrap();
    assert!(queue.try_dequeue(&session).await.unwrap().is_none());

    // N of M parts, a prerequisite, and a blocker, all of them.
    let parts = EnqueueOptions::new()
        .when(Condition::count_at_least("parts/", 3))
        .when(Condition::exists("schema"))
        .when(Condition::absent("maintenance"));
    queue.enqueue_with(&4, parts).await.unwrap();
    kv.put("maintenance", "on", PutOptions::new())
        .await
        .unwrap();
    for part in ["parts/a", "parts/b", "parts/c"] {
        kv.put(part, "", PutOptions::new()).await.unwrap();
    }
    kv.put("schema", "v1", PutOptions::new()).await.unwrap();
    assert!(queue.try_dequeue(&session).await.unwrap().is_none());
    let mut waiting = Box::pin(queue.dequeue(&session));
    assert!(still_waiting(&mut waiting).await);
    kv.delete("maintenance", Default::default()).await.unwrap();
    let claimed = soon(waiting).await.unwrap();
    assert_eq!(claimed.item, 4);
    claimed.ack().await.unwrap();

    // A gate on the whole queue.
    let gated = Queue::<u32>::new(&client, "gated2").gated([Condition::exists("open")]);
    gated.enqueue(&5).await.unwrap();
    assert!(gated.try_dequeue(&session).await.unwrap().is_none());
    let mut waiting = Box::pin(gated.dequeue(&session));
    assert!(still_waiting(&mut waiting).await);
    kv.put("open", "", PutOptions::new()).await.unwrap();
    assert_eq!(soon(waiting).await.unwrap().item, 5);
}
on_both_servers!(
    condition_scenario,
    conditions_on_our_server,
    conditions_on_etcd,
    60
);

/// Producers whose enqueue transactions commit in another order than their ids were made
/// (as concurrent producers' always can), drained by consumers that page two items at a
/// time: first claims still keep each producer's order, and no item is claimed twice.
async fn concurrent_order_scenario(endpoint: &str) {
    const PRODUCERS: u32 = 2;
    const PER_PRODUCER: u32 = 400;
    const CHUNK: usize = 20;
    let (client, _) = connect(endpoint).await;
    let options = QueueOptions {
        batch: 2,
        ..Default::default()
    };
    let start = tokio::time::Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|producer| {
            let queue: Queue<(u32, u32)> = Queue::with_options(&client, "order", options.clone());
            tokio::spawn(async move {
                let items: Vec<(u32, u32)> = (0..PER_PRODUCER).map(|seq| (producer, seq)).collect();
                // Producers enqueue on the same ticks, so their ids interleave and the
                // consumers have drained the queue in between.
                for (tick, chunk) in items.chunks(CHUNK).enumerate() {
                    tokio::time::sleep_until(start + Duration::from_millis(100) * tick as u32)
                        .await;
                    queue.enqueue_all(chunk).await.expect("enqueue");
                }
            })
        })
        .collect();
    let total = (PRODUCERS * PER_PRODUCER) as usize;
    let claims = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            // A handle each, as separate processes would have.
            let queue: Queue<(u32, u32)> = Queue::with_options(&client, "order", options.clone());
            let client = client.clone();
            let claims = claims.clone();
            tokio::spawn(async move {
                let session = Session::with_ttl(&client, 10).await.expect("session");
                loop {
                    if claims.lock().unwrap().len() >= total {
                        return;
                    }
                    let claimed = match tokio::time::timeout(
                        Duration::from_millis(500),
                        queue.dequeue(&session),
                    )
                    .await
                    {
                        Ok(claimed) => claimed.expect("dequeue"),
                        Err(_) => continue,
                    };
                    claims
                        .lock()
                        .unwrap()
                        .push((claimed.fence().revision, claimed.item));
                    claimed.ack().await.expect("ack");
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    for c in consumers {
        soon(c).await.unwrap();
    }
    let mut claims = claims.lock().unwrap().clone();
    assert_eq!(claims.len(), total);
    claims.sort();
    let mut next = vec![0; PRODUCERS as usize];
    for (fence, (producer, seq)) in claims {
        assert_eq!(
            seq, next[producer as usize],
            "producer {producer}: item {seq} claimed (fence {fence}) before item {}",
            next[producer as usize]
        );
        next[producer as usize] += 1;
    }
}
on_both_servers!(
    concurrent_order_scenario,
    concurrent_order_on_our_server,
    concurrent_order_on_etcd,
    60
);

/// A consumer's claim that reaches the server late, after a rival took the items it tried
/// and gave one of them back: that returned item is next in line, and the late consumer gets
/// it, not an item behind it.
async fn late_claim_scenario(endpoint: &str) {
    let (client, rival) = connect(endpoint).await;
    let proxy = kv_tests::proxy::DelayProxy::start(endpoint).await;
    let (late_client, late_session) = connect(&proxy.endpoint).await;
    let queue: Queue<u32> = Queue::new(&client, "late");
    let late: Queue<u32> = Queue::new(&late_client, "late");
    queue
        .enqueue_all(&(0..12).collect::<Vec<u32>>())
        .await
        .unwrap();

    // The late consumer's read reaches the server at about 1 s, its claim at about 2 s.
    proxy.set_delay(Duration::from_secs(1));
    let claiming = tokio::spawn(async move { late.dequeue(&late_session).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Between the two, a rival claims the first eight items and returns item 3.
    let mut held = Vec::new();
    for expected in 0..8 {
        let claimed = next(&queue, &rival).await;
        assert_eq!(claimed.item, expected);
        held.push(claimed);
    }
    held.remove(3).nack().await.unwrap();
    assert!(
        !claiming.is_finished(),
        "the late claim came too early to test anything"
    );
    proxy.set_delay(Duration::ZERO);

    let claimed = soon(claiming).await.unwrap().expect("late dequeue");
    assert_eq!((claimed.item, claimed.attempts()), (3, 2));
}
on_both_servers!(
    late_claim_scenario,
    late_claim_on_our_server,
    late_claim_on_etcd,
    30
);

/// A dequeue given up (its future dropped by a timeout) while its claim is on the way to the
/// server: the item is given back as it was, not held until the session ends, and its
/// attempt is not counted.
async fn abandoned_dequeue_scenario(endpoint: &str) {
    let (client, session) = connect(endpoint).await;
    let proxy = kv_tests::proxy::DelayProxy::start(endpoint).await;
    let (slow_client, slow_session) = connect(&proxy.endpoint).await;
    let queue: Queue<u32> = Queue::new(&client, "abandoned");
    let slow: Queue<u32> = Queue::new(&slow_client, "abandoned");
    queue.enqueue(&7).await.unwrap();

    // Its read reaches the server at about 1 s and its claim at about 2 s; it gives up at 1.5 s.
    proxy.set_delay(Duration::from_secs(1));
    let gave_up =
        tokio::time::timeout(Duration::from_millis(1500), slow.dequeue(&slow_session)).await;
    assert!(
        gave_up.is_err(),
        "the dequeue finished before it could be abandoned"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.set_delay(Duration::ZERO);

    let deadline = Instant::now() + Duration::from_secs(3);
    while queue.in_flight().await.unwrap() > 0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned claim still holds the item"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let claimed = next(&queue, &session).await;
    assert_eq!((claimed.item, claimed.attempts()), (7, 1));
    claimed.ack().await.unwrap();
    assert!(slow_session.try_lost().is_none());
}
on_both_servers!(
    abandoned_dequeue_scenario,
    abandoned_dequeue_on_our_server,
    abandoned_dequeue_on_etcd,
    30
);

/// An ack cut off on its way (the connection breaks and it never reaches the server): it is
/// sent again, instead of failing and leaving the item claimed, known to nobody, until the
/// consumer's session ends. Found by the fault test: two items sat claimed by live workers.
async fn cut_ack_scenario(endpoint: &str) {
    let (client, _session) = connect(endpoint).await;
    let proxy = kv_tests::proxy::DelayProxy::start(endpoint).await;
    let (cut_client, cut_session) = connect(&proxy.endpoint).await;
    let queue: Queue<u32> = Queue::new(&client, "cut-ack");
    let cut: Queue<u32> = Queue::new(&cut_client, "cut-ack");
    queue.enqueue(&7).await.unwrap();
    let claimed = next(&cut, &cut_session).await;

    proxy.set_delay(Duration::from_secs(1));
    let ack = tokio::spawn(claimed.ack());
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_delay(Duration::ZERO);
    proxy.sever();
    let acked = soon(ack).await.expect("the ack's task");
    assert!(acked.is_ok(), "the ack: {acked:?}");
    assert_eq!(queue.len().await.unwrap(), 0);
    assert_eq!(queue.in_flight().await.unwrap(), 0);
    assert!(cut_session.try_lost().is_none());
}
on_both_servers!(cut_ack_scenario, cut_ack_on_our_server, cut_ack_on_etcd, 30);

/// An ack that lands after its caller stopped waiting for the answer (the client's request
/// timeout): its resend finds the claim gone while the session lives, which only the first
/// send can have done, so the ack reports success (not `ClaimLost`) and its result is
/// written once.
async fn late_ack_scenario(endpoint: &str) {
    let (client, _session) = connect(endpoint).await;
    let proxy = kv_tests::proxy::DelayProxy::start(endpoint).await;
    let options = ClientOptions {
        request_timeout: Duration::from_millis(500),
        ..ClientOptions::default()
    };
    let late_client = Client::connect([&proxy.endpoint], options)
        .await
        .expect("connect");
    let late_session = Session::with_ttl(&late_client, 5).await.expect("session");
    let queue: Queue<u32> = Queue::new(&client, "late-ack");
    let late: Queue<u32> = Queue::new(&late_client, "late-ack");
    queue.enqueue(&7).await.unwrap();
    let claimed = next(&late, &late_session).await;

    // The first send reaches the server at about 1 s, after the client gave up at 0.5 s; the
    // resend queues behind it on the same connection.
    proxy.set_delay(Duration::from_secs(1));
    let result = kv_client::TxnOp::put("late-ack-result", "7", PutOptions::new());
    let ack = tokio::spawn(claimed.ack_with([result]));
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.set_delay(Duration::ZERO);
    let acked = soon(ack).await.expect("the ack's task");
    assert!(acked.is_ok(), "the ack: {acked:?}");
    assert_eq!(queue.len().await.unwrap(), 0);
    assert_eq!(queue.in_flight().await.unwrap(), 0);
    let written = client
        .kv()
        .get("late-ack-result", Default::default())
        .await
        .unwrap();
    assert_eq!(written.kvs.len(), 1);
    assert_eq!(written.kvs[0].version, 1);
}
on_both_servers!(
    late_ack_scenario,
    late_ack_on_our_server,
    late_ack_on_etcd,
    30
);
