//! Every recipe's contract on one server, run against our server and etcd 3.4 with the same
//! bodies: who gets in, in what order, what fences say, and that waits end on drop, on
//! session loss and on release.

use std::time::Duration;

use futures::StreamExt;
use kv_client::{Client, ClientOptions, GetOptions, PutOptions, TxnOp};
use kv_tests::on_both_servers;
use recipes::{
    Barrier, DoubleBarrier, Election, Error, Leadership, Loss, Mutex, Observation, RwLock,
    Semaphore, Session,
};

const TTL: i64 = 5;

async fn connect(endpoint: &str) -> Client {
    Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect")
}

async fn session(client: &Client) -> Session {
    Session::with_ttl(client, TTL).await.expect("session")
}

/// True if `fut` has not finished after a moment (it is waiting).
async fn still_waiting<F: std::future::Future>(fut: &mut std::pin::Pin<Box<F>>) -> bool {
    tokio::time::timeout(Duration::from_millis(300), fut.as_mut())
        .await
        .is_err()
}

/// `fut`'s output, which must come within 10 s.
async fn soon<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("did not finish within 10 s")
}

async fn count(client: &Client, prefix: &str) -> i64 {
    let got = client
        .kv()
        .get(prefix, GetOptions::new().prefix().count_only())
        .await
        .unwrap();
    got.count
}

async fn session_scenario(endpoint: &str) {
    let client = connect(endpoint).await;
    let s = session(&client).await;
    assert!(s.valid_until() > std::time::Instant::now());
    assert_eq!(s.ttl(), TTL);
    assert!(matches!(
        Session::with_ttl(&client, 0).await,
        Err(Error::Invalid(_))
    ));
    // Another process takes the lease over.
    let other = connect(endpoint).await;
    let resumed = Session::resume(&other, s.lease()).await.unwrap();
    assert_eq!(resumed.lease(), s.lease());
    s.close().await.unwrap();
    let why = soon(resumed.lost()).await;
    assert_eq!(why, kv_client::LeaseLost::NotFound);
    assert!(matches!(
        Session::resume(&other, resumed.lease()).await,
        Err(Error::Client(kv_client::Error::LeaseNotFound))
    ));
    // Closing twice is fine.
    resumed.close().await.unwrap();
}
on_both_servers!(session_scenario, session_on_our_server, session_on_etcd, 60);

async fn mutex_scenario(endpoint: &str) {
    let client = connect(endpoint).await;
    let (s1, s2, s3) = (
        session(&client).await,
        session(&client).await,
        session(&client).await,
    );
    let (m1, m2, m3) = (
        Mutex::new(&s1, "lk"),
        Mutex::new(&s2, "lk"),
        Mutex::new(&s3, "lk"),
    );
    assert_eq!(m1.key(), format!("lk/{:x}", s1.lease()).as_bytes());

    let g1 = m1.lock().await.unwrap();
    assert_eq!(g1.key(), m1.key());
    assert!(matches!(m2.try_lock().await, Err(Error::Locked)));
    assert_eq!(count(&client, "lk/").await, 1, "try_lock left its key");

    // The holder's guarded write goes through.
    let wrote = client
        .kv()
        .txn(
            g1.txn()
                .and_then([TxnOp::put("data", "1", PutOptions::new())]),
        )
        .await
        .unwrap();
    assert!(wrote.succeeded);

    let mut waiting2 = Box::pin(m2.lock());
    assert!(still_waiting(&mut waiting2).await);
    // A third waiter queues behind the second; giving up removes its key.
    let mut waiting3 = Box::pin(m3.lock());
    assert!(still_waiting(&mut waiting3).await);
    assert_eq!(count(&client, "lk/").await, 3);
    drop(waiting3);
    soon(async {
        while count(&client, "lk/").await != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let fence1 = g1.fence();
    let stale_owner = g1.is_owner();
    assert!(g1.unlock().await.unwrap());
    let g2 = soon(waiting2).await.unwrap();
    assert!(g2.fence() > fence1, "fences must increase");
    assert_eq!(m2.holder().await.unwrap().unwrap().key, g2.key());

    // The old holder's guarded write is refused now.
    let stale = client
        .kv()
        .txn(
            kv_client::Txn::new()
                .when([stale_owner])
                .and_then([TxnOp::put("data", "stale", PutOptions::new())]),
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    assert_eq!(
        client
            .kv()
            .get("data", GetOptions::new())
            .await
            .unwrap()
            .kvs[0]
            .value,
        &b"1"[..]
    );
    // A bare fence does the same for a process that only got the token: current for g2,
    // stale for g1.
    let guarded = |fence: recipes::Fence| {
        kv_client::Txn::new()
            .when([fence.is_current()])
            .and_then([TxnOp::put("fenced", "", PutOptions::new())])
    };
    let kv = client.kv();
    assert!(kv.txn(guarded(g2.fence())).await.unwrap().succeeded);
    assert!(!kv.txn(guarded(fence1)).await.unwrap().succeeded);

    // The holder's session ends: lost() fires; a waiter whose own session ends gives up.
    let mut waiting3 = Box::pin(m3.lock());
    assert!(still_waiting(&mut waiting3).await);
    client.lease().revoke(s3.lease()).await.unwrap();
    assert!(matches!(soon(waiting3).await, Err(Error::SessionLost(_))));
    let lost = g2.lost();
    client.lease().revoke(s2.lease()).await.unwrap();
    let why = soon(lost).await;
    assert!(
        matches!(why, Loss::KeyDeleted | Loss::SessionEnded(_)),
        "{why:?}"
    );
    assert!(g2.check().await.is_err());
    assert_eq!(count(&client, "lk/").await, 0);
}
on_both_servers!(mutex_scenario, mutex_on_our_server, mutex_on_etcd, 60);

async fn rwlock_scenario(endpoint: &str) {
    let client = connect(endpoint).await;
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(session(&client).await);
    }
    let locks: Vec<RwLock> = sessions.iter().map(|s| RwLock::new(s, "rw")).collect();
    let r0 = locks[0].read().await.unwrap();
    let r1 = soon(locks[1].read()).await.unwrap();
    assert!(r0.key().starts_with(b"rw/read/"));
    // A writer waits for the readers; a reader arriving after it waits for the writer.
    let mut w2 = Box::pin(locks[2].write());
    assert!(still_waiting(&mut w2).await);
    let mut r3 = Box::pin(locks[3].read());
    assert!(still_waiting(&mut r3).await);
    r0.unlock().await.unwrap();
    assert!(still_waiting(&mut w2).await);
    r1.unlock().await.unwrap();
    let w2 = soon(w2).await.unwrap();
    assert!(w2.key().starts_with(b"rw/write/"));
    assert!(still_waiting(&mut r3).await);
    w2.unlock().await.unwrap();
    let r3 = soon(r3).await.unwrap();
    r3.unlock().await.unwrap();
}
on_both_servers!(rwlock_scenario, rwlock_on_our_server, rwlock_on_etcd, 60);

async fn semaphore_scenario(endpoint: &str) {
    let client = connect(endpoint).await;
    let s = session(&client).await;
    assert!(matches!(
        Semaphore::new(&s, "sem", 0),
        Err(Error::Invalid(_))
    ));
    let sem = Semaphore::new(&s, "sem", 2).unwrap();
    // One session may hold several permits.
    let p1 = sem.acquire().await.unwrap();
    let p2 = soon(sem.acquire()).await.unwrap();
    assert_ne!(p1.key(), p2.key());
    assert!(matches!(sem.try_acquire().await, Err(Error::NoPermit)));
    let mut p3 = Box::pin(sem.acquire());
    assert!(still_waiting(&mut p3).await);
    let mut p4 = Box::pin(sem.acquire());
    assert!(still_waiting(&mut p4).await);
    assert_eq!(sem.holders().await.unwrap(), 4);
    p2.unlock().await.unwrap();
    let p3 = soon(p3).await.unwrap();
    assert!(p3.fence() > p1.fence());
    assert!(still_waiting(&mut p4).await);
    drop(p1); // released in the background
    let p4 = soon(p4).await.unwrap();
    p3.unlock().await.unwrap();
    p4.unlock().await.unwrap();
    soon(async {
        while sem.holders().await.unwrap() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
on_both_servers!(
    semaphore_scenario,
    semaphore_on_our_server,
    semaphore_on_etcd,
    60
);

async fn next(observer: &mut recipes::Observer) -> Observation {
    soon(observer.next())
        .await
        .expect("observer ended")
        .expect("observer failed")
}

async fn election_scenario(endpoint: &str) {
    let client = connect(endpoint).await;
    let (s1, s2, s3) = (
        session(&client).await,
        session(&client).await,
        session(&client).await,
    );
    let election = Election::new(&client, "el");
    let mut observer = election.observe();
    assert_eq!(next(&mut observer).await, Observation::Vacant);
    assert_eq!(election.leader().await.unwrap(), None);

    let l1 = election.campaign(&s1, "one").await.unwrap();
    assert_eq!(l1.key(), format!("el/{:x}", s1.lease()).as_bytes());
    match next(&mut observer).await {
        Observation::Elected(kv) => {
            assert_eq!((&kv.key[..], &kv.value[..]), (l1.key(), &b"one"[..]));
            assert_eq!(kv.create_revision, l1.revision());
        }
        other => panic!("expected Elected, got {other:?}"),
    }
    let mut c2 = Box::pin(election.campaign(&s2, "two"));
    assert!(still_waiting(&mut c2).await);
    l1.proclaim("one-bis").await.unwrap();
    match next(&mut observer).await {
        Observation::Proclaimed(kv) => assert_eq!(kv.value, &b"one-bis"[..]),
        other => panic!("expected Proclaimed, got {other:?}"),
    }
    assert_eq!(
        election.leader().await.unwrap().unwrap().value,
        &b"one-bis"[..]
    );

    // A stale handle on the first leadership is refused once it is over.
    let stale = Leadership::resume(&s1, l1.key().to_vec(), l1.revision());
    let fence1 = l1.fence();
    l1.resign().await.unwrap();
    assert_eq!(next(&mut observer).await, Observation::Vacant);
    let l2 = soon(c2).await.unwrap();
    match next(&mut observer).await {
        Observation::Elected(kv) => assert_eq!(kv.value, &b"two"[..]),
        other => panic!("expected Elected, got {other:?}"),
    }
    assert!(l2.fence() > fence1);
    assert!(matches!(stale.proclaim("x").await, Err(Error::NotLeader)));

    // A candidate whose session ends stops campaigning.
    let mut c3 = Box::pin(election.campaign(&s3, "three"));
    assert!(still_waiting(&mut c3).await);
    client.lease().revoke(s3.lease()).await.unwrap();
    assert!(matches!(soon(c3).await, Err(Error::SessionLost(_))));

    // The leader's session ends: the observer says so.
    client.lease().revoke(s2.lease()).await.unwrap();
    assert_eq!(next(&mut observer).await, Observation::Vacant);
    assert!(matches!(l2.proclaim("y").await, Err(Error::NotLeader)));
}
on_both_servers!(
    election_scenario,
    election_on_our_server,
    election_on_etcd,
    60
);

async fn barrier_scenario(endpoint: &str) {
    let client = connect(endpoint).await;
    let barrier = Barrier::new(&client, "gate");
    soon(barrier.wait()).await.unwrap();
    barrier.hold().await.unwrap();
    assert!(matches!(barrier.hold().await, Err(Error::BarrierHeld)));
    let mut waiting = Box::pin(barrier.wait());
    assert!(still_waiting(&mut waiting).await);
    barrier.release().await.unwrap();
    soon(waiting).await.unwrap();

    // A held gate whose holder's session ends opens by itself.
    let s = session(&client).await;
    barrier.hold_in(&s).await.unwrap();
    let mut waiting = Box::pin(barrier.wait());
    assert!(still_waiting(&mut waiting).await);
    s.close().await.unwrap();
    soon(waiting).await.unwrap();
}
on_both_servers!(barrier_scenario, barrier_on_our_server, barrier_on_etcd, 60);

async fn double_barrier_scenario(endpoint: &str) {
    const N: usize = 3;
    let client = connect(endpoint).await;
    let s = session(&client).await;
    let barrier = DoubleBarrier::new(&s, "db", N).unwrap();
    assert!(matches!(
        DoubleBarrier::new(&s, "db", 0),
        Err(Error::Invalid(_))
    ));

    // A waiter that gives up is not counted.
    let mut quitter = Box::pin(barrier.enter());
    assert!(still_waiting(&mut quitter).await);
    drop(quitter);
    soon(async {
        while count(&client, "db/waiters/").await != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // N + 1 arrive at once: exactly N get in, the other is told the round is full.
    let arrivals: Vec<_> = (0..=N)
        .map(|_| {
            let barrier = barrier.clone();
            tokio::spawn(async move { barrier.enter().await })
        })
        .collect();
    let mut inside = Vec::new();
    let mut full = 0;
    for arrival in arrivals {
        match soon(arrival).await.unwrap() {
            Ok(entered) => inside.push(entered),
            Err(Error::BarrierFull) => full += 1,
            Err(e) => panic!("enter failed: {e}"),
        }
    }
    assert_eq!((inside.len(), full), (N, 1));
    assert!(matches!(barrier.enter().await, Err(Error::BarrierFull)));

    // Leaving waits for everyone.
    let last = inside.pop().unwrap();
    let mut leaving: Vec<_> = inside
        .into_iter()
        .map(|e| tokio::spawn(e.leave()))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(leaving.iter().all(|l| !l.is_finished()));
    soon(last.leave()).await.unwrap();
    for l in leaving.drain(..) {
        soon(l).await.unwrap().unwrap();
    }
    // The round is over: the next one can start.
    assert_eq!(count(&client, "db/").await, 0);
    let mut next_round = Box::pin(barrier.enter());
    assert!(still_waiting(&mut next_round).await);
}
on_both_servers!(
    double_barrier_scenario,
    double_barrier_on_our_server,
    double_barrier_on_etcd,
    60
);

/// A lock attempt given up (its future dropped by a timeout) while its claim is still on the
/// way to the server: the claim lands anyway, and is given back at once rather than holding
/// the lock until the session ends.
async fn abandoned_claim_scenario(endpoint: &str) {
    let client = connect(endpoint).await;
    let proxy = kv_tests::proxy::DelayProxy::start(endpoint).await;
    let slow = connect(&proxy.endpoint).await;
    let slow_session = session(&slow).await;
    let rival = session(&client).await;

    // The slow client's claim reaches the server at about 1 s; it gives up at 0.3 s.
    proxy.set_delay(Duration::from_secs(1));
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        Mutex::new(&slow_session, "abandoned").lock(),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the lock came before the claim could land"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.set_delay(Duration::ZERO);

    // The rival gets the lock well before the slow session (TTL 5 s) could end.
    let guard = tokio::time::timeout(
        Duration::from_secs(3),
        Mutex::new(&rival, "abandoned").lock(),
    )
    .await
    .expect("the abandoned claim still holds the lock")
    .unwrap();
    assert!(slow_session.try_lost().is_none());
    guard.unlock().await.unwrap();
}
on_both_servers!(
    abandoned_claim_scenario,
    abandoned_claim_on_our_server,
    abandoned_claim_on_etcd,
    30
);
