//! The watch sub-client against our server and etcd 3.4 (same bodies), and resumption after a
//! member kill and after a server restart: no event lost, none repeated.

use std::time::Duration;

use futures::StreamExt;
use kv_client::{
    Client, ClientOptions, DeleteOptions, Error, EventKind, PutOptions, Txn, TxnOp, WatchOptions,
    WatchStream, WatchUpdate,
};
use kv_tests::{Cluster, start_kv_server_with};

const WAIT: Duration = Duration::from_secs(10);

async fn next(stream: &mut WatchStream) -> WatchUpdate {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(update))) => update,
        other => panic!("expected an update, got {other:?}"),
    }
}

/// (kind, key, value, mod revision) of an update's events.
fn shape(update: &WatchUpdate) -> Vec<(EventKind, String, String, i64)> {
    update
        .events
        .iter()
        .map(|e| {
            (
                e.kind,
                String::from_utf8_lossy(&e.kv.key).into_owned(),
                String::from_utf8_lossy(&e.kv.value).into_owned(),
                e.kv.mod_revision,
            )
        })
        .collect()
}

async fn watch_scenario(endpoint: &str) {
    let client = Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect");
    let kv = client.kv();
    let watch = client.watch();
    let mut all = watch.watch("w/", WatchOptions::new().prefix().prev_kv());
    let mut one = watch.watch("w/a", WatchOptions::new().no_delete());
    // Let both creates reach the server before writing.
    watch.request_progress();
    let p1 = next(&mut all).await;
    let p2 = next(&mut one).await;
    assert!(p1.events.is_empty() && p2.events.is_empty());
    kv.put("w/a", "1", PutOptions::new()).await.unwrap(); // rev 2
    kv.put("w/c", "0", PutOptions::new()).await.unwrap(); // rev 3
    kv.txn(Txn::new().and_then([
        TxnOp::put("w/a", "2", PutOptions::new()),
        TxnOp::put("w/b", "3", PutOptions::new()),
        TxnOp::delete("w/c", DeleteOptions::new()),
    ]))
    .await
    .unwrap(); // rev 4, one update
    kv.put("other", "x", PutOptions::new()).await.unwrap(); // rev 5, not watched
    let u = next(&mut all).await;
    assert_eq!(shape(&u), [(EventKind::Put, "w/a".into(), "1".into(), 2)]);
    assert!(u.events[0].prev_kv.is_none());
    assert_eq!(shape(&next(&mut all).await)[0].1, "w/c");
    let u = next(&mut all).await;
    assert_eq!(
        shape(&u),
        [
            (EventKind::Put, "w/a".into(), "2".into(), 4),
            (EventKind::Put, "w/b".into(), "3".into(), 4),
            (EventKind::Delete, "w/c".into(), String::new(), 4),
        ]
    );
    assert_eq!(u.events[0].prev_kv.as_ref().unwrap().value, &b"1"[..]);
    assert_eq!(u.events[2].prev_kv.as_ref().unwrap().value, &b"0"[..]);
    // A single key with NODELETE.
    assert_eq!(shape(&next(&mut one).await).len(), 1);
    assert_eq!(
        shape(&next(&mut one).await),
        [(EventKind::Put, "w/a".into(), "2".into(), 4)]
    );
    // History from a past revision, under a namespace.
    let ns = client.with_namespace("w/");
    let mut history = ns
        .watch()
        .watch("", WatchOptions::new().from_key().start_revision(2));
    let u = next(&mut history).await;
    let got: Vec<_> = shape(&u)
        .into_iter()
        .map(|(k, key, _, r)| (k, key, r))
        .collect();
    assert!(got.len() >= 5, "{got:?}");
    assert_eq!(got[0], (EventKind::Put, "a".into(), 2));
    assert_eq!(got[1], (EventKind::Put, "c".into(), 3));
    // A compacted start is a typed error, never a silent skip.
    kv.compact(3, true).await.unwrap();
    let mut old = watch.watch("w/a", WatchOptions::new().start_revision(2));
    match tokio::time::timeout(WAIT, old.next()).await {
        Ok(Some(Err(Error::WatchCompacted { compact_revision }))) => {
            assert_eq!(compact_revision, 3)
        }
        other => panic!("expected a compaction error, got {other:?}"),
    }
    // Dropping a stream cancels its watch; the others go on.
    drop(one);
    kv.put("w/c", "4", PutOptions::new()).await.unwrap();
    assert_eq!(shape(&next(&mut all).await)[0].1, "w/c");
}

kv_tests::on_both_servers!(watch_scenario, watch_on_our_server, watch_on_etcd, 60);

/// Collects the values of `key`'s put events until `last` is seen; they must be exactly
/// `0..=last` in order: nothing lost, nothing repeated.
async fn expect_every_value(stream: &mut WatchStream, last: u32) {
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        let update = next(stream).await;
        for e in update.events {
            seen.push(String::from_utf8_lossy(&e.kv.value).parse::<u32>().unwrap());
        }
    }
    assert_eq!(seen, (0..=last).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_on_another_member_without_loss_or_repeat() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let mut cluster = Cluster::start(3);
        let client = Client::connect(cluster.endpoints(), ClientOptions::default())
            .await
            .expect("connect");
        let mut stream = client.watch().watch("k", WatchOptions::new());
        client.watch().request_progress();
        assert!(next(&mut stream).await.events.is_empty());
        let used = cluster
            .endpoints()
            .iter()
            .position(|e| client.current_endpoint().ends_with(e.as_str()))
            .expect("the endpoint in use is a member");
        // The writer uses its own client on the other members, so the kill hits the watch only.
        let others: Vec<String> = (0..3)
            .filter(|i| *i != used)
            .map(|i| cluster.endpoint(i))
            .collect();
        let writer = Client::connect(others, ClientOptions::default())
            .await
            .unwrap();
        for i in 0..50u32 {
            writer
                .kv()
                .put("k", i.to_string(), PutOptions::new())
                .await
                .unwrap();
            if i == 20 {
                cluster.kill(used);
            }
        }
        expect_every_value(&mut stream, 49).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_recovers_after_the_server_restarts() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let peer = format!("http://127.0.0.1:{}", kv_tests::free_port());
        let client_port = kv_tests::free_port();
        let listen = format!("http://127.0.0.1:{client_port}");
        let flags = [
            "--listen-client-urls",
            listen.as_str(),
            "--advertise-client-urls",
            listen.as_str(),
        ];
        let mut server = start_kv_server_with(&data, &peer, &flags);
        let client = Client::connect([server.endpoint.as_str()], ClientOptions::default())
            .await
            .expect("connect");
        let mut stream = client.watch().watch("k", WatchOptions::new());
        client.watch().request_progress();
        assert!(next(&mut stream).await.events.is_empty());
        for i in 0..10u32 {
            client
                .kv()
                .put("k", i.to_string(), PutOptions::new())
                .await
                .unwrap();
        }
        server.kill();
        let server = start_kv_server_with(&data, &peer, &flags);
        for i in 10..20u32 {
            client
                .kv()
                .put("k", i.to_string(), PutOptions::new())
                .await
                .unwrap();
        }
        expect_every_value(&mut stream, 19).await;
        drop(server);
    })
    .await
    .expect("test timed out");
}
