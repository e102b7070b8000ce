//! The KV sub-client against our server and against etcd 3.4 (same test bodies), and failover
//! across a member kill.

use std::time::Duration;

use kv_client::{
    Client, ClientOptions, Compare, CompareOp, DeleteOptions, Error, GetOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use kv_tests::{Cluster, free_port, start_kv_server};

fn keys(kvs: &[kv_client::KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

/// Everything the KV sub-client offers, against one fresh server.
async fn kv_scenario(endpoint: &str) {
    let client = Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect");
    let kv = client.kv();
    for (k, v) in [
        ("a", "1"),
        ("b/1", "2"),
        ("b/2", "3"),
        ("b/3", "4"),
        ("c", "5"),
    ] {
        kv.put(k, v, PutOptions::new()).await.unwrap();
    }
    let got = kv.get("b/", GetOptions::new().prefix()).await.unwrap();
    assert_eq!(keys(&got.kvs), ["b/1", "b/2", "b/3"]);
    assert_eq!((got.count, got.more, got.revision), (3, false, 6));
    let limited = kv
        .get(
            "b/",
            GetOptions::new()
                .prefix()
                .limit(2)
                .sort(SortTarget::Key, SortOrder::Descend),
        )
        .await
        .unwrap();
    assert_eq!(keys(&limited.kvs), ["b/3", "b/2"]);
    assert!(limited.more);
    let from = kv
        .get("b/3", GetOptions::new().from_key().keys_only())
        .await
        .unwrap();
    assert_eq!(keys(&from.kvs), ["b/3", "c"]);
    assert!(from.kvs.iter().all(|kv| kv.value.is_empty()));
    let count = kv
        .get("a", GetOptions::new().range_end("c").count_only())
        .await
        .unwrap();
    assert_eq!((count.count, count.kvs.len()), (4, 0));
    // History and its errors.
    let replaced = kv
        .put("a", "1b", PutOptions::new().prev_kv())
        .await
        .unwrap();
    assert_eq!(replaced.prev_kv.unwrap().value, &b"1"[..]);
    let old = kv.get("a", GetOptions::new().revision(2)).await.unwrap();
    assert_eq!(old.kvs[0].value, &b"1"[..]);
    assert_eq!(
        kv.get("a", GetOptions::new().revision(100)).await,
        Err(Error::FutureRevision)
    );
    kv.compact(3, true).await.unwrap();
    assert_eq!(
        kv.get("a", GetOptions::new().revision(2)).await,
        Err(Error::Compacted)
    );
    assert_eq!(
        kv.put("x", "y", PutOptions::new().lease(0x1234)).await,
        Err(Error::LeaseNotFound)
    );
    assert_eq!(
        kv.put("", "y", PutOptions::new()).await,
        Err(Error::EmptyKey)
    );
    // Deletes.
    let gone = kv
        .delete("b/", DeleteOptions::new().prefix().prev_kv())
        .await
        .unwrap();
    assert_eq!(gone.deleted, 3);
    assert_eq!(keys(&gone.prev_kvs), ["b/1", "b/2", "b/3"]);
    // Transactions: compare-and-swap, both branches, reads inside.
    let cas = |expect: &str, new: &str| {
        Txn::new()
            .when([Compare::value("a", CompareOp::Equal, expect)])
            .and_then([
                TxnOp::put("a", new, PutOptions::new()),
                TxnOp::get("a", GetOptions::new()),
            ])
            .or_else([TxnOp::get("a", GetOptions::new())])
    };
    let won = kv.txn(cas("1b", "2")).await.unwrap();
    assert!(won.succeeded);
    let [TxnOpResponse::Put(p), TxnOpResponse::Get(g)] = won.responses.as_slice() else {
        panic!("unexpected responses {:?}", won.responses);
    };
    assert_eq!(g.kvs[0].value, &b"2"[..]);
    assert_eq!(p.revision, won.revision);
    let lost = kv.txn(cas("1b", "3")).await.unwrap();
    assert!(!lost.succeeded);
    let [TxnOpResponse::Get(g)] = lost.responses.as_slice() else {
        panic!("unexpected responses {:?}", lost.responses);
    };
    assert_eq!(g.kvs[0].value, &b"2"[..]);
    let missing = Txn::new().when([Compare::version("nope", CompareOp::Equal, 0)]);
    assert!(kv.txn(missing).await.unwrap().succeeded);
    let none_left = Txn::new().when([Compare::version("b/", CompareOp::Equal, 0).with_prefix()]);
    assert!(kv.txn(none_left).await.unwrap().succeeded);
    // A namespace: keys go in under it, come back without it, and ranges stay inside it.
    let app = client.with_namespace("app/");
    app.kv().put("k1", "v", PutOptions::new()).await.unwrap();
    app.kv().put("k2", "v", PutOptions::new()).await.unwrap();
    let raw = kv.get("app/", GetOptions::new().prefix()).await.unwrap();
    assert_eq!(keys(&raw.kvs), ["app/k1", "app/k2"]);
    let inside = app
        .kv()
        .get("", GetOptions::new().from_key())
        .await
        .unwrap();
    assert_eq!(keys(&inside.kvs), ["k1", "k2"]);
    let t = app
        .kv()
        .txn(Txn::new().and_then([TxnOp::delete("k", DeleteOptions::new().prefix().prev_kv())]))
        .await
        .unwrap();
    let [TxnOpResponse::Delete(d)] = t.responses.as_slice() else {
        panic!("unexpected responses {:?}", t.responses);
    };
    assert_eq!(keys(&d.prev_kvs), ["k1", "k2"]);
    assert_eq!(kv.get("c", GetOptions::new()).await.unwrap().kvs.len(), 1);
}

kv_tests::on_both_servers!(kv_scenario, kv_on_our_server, kv_on_etcd, 60);

#[tokio::test]
async fn connect_skips_a_dead_endpoint_and_refuses_when_none_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_kv_server(&dir.path().join("data"), &[]);
    let dead = format!("127.0.0.1:{}", free_port());
    let client = Client::connect(
        [dead.as_str(), server.endpoint.as_str()],
        ClientOptions::default(),
    )
    .await
    .expect("one endpoint answers");
    assert!(client.current_endpoint().ends_with(&server.endpoint));
    let options = ClientOptions {
        request_timeout: Duration::from_secs(1),
        ..ClientOptions::default()
    };
    let err = Client::connect([dead.as_str()], options).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

/// Reads and writes keep working when the member the client uses dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_fail_over_when_the_member_in_use_dies() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let mut cluster = Cluster::start(3);
        let client = Client::connect(cluster.endpoints(), ClientOptions::default())
            .await
            .expect("connect");
        let kv = client.kv();
        kv.put("k", "0", PutOptions::new()).await.unwrap();
        let used = cluster
            .endpoints()
            .iter()
            .position(|e| client.current_endpoint().ends_with(e.as_str()))
            .expect("the endpoint in use is a member");
        let killed = cluster.endpoint(used);
        cluster.kill(used);
        let mut unknown = 0;
        for i in 1..=20 {
            match kv.put("k", i.to_string(), PutOptions::new()).await {
                Ok(_) => {}
                // Allowed: a write in flight at the kill; it must be reported, not resent.
                Err(Error::OutcomeUnknown(_)) => unknown += 1,
                Err(e) => panic!("put {i} failed: {e}"),
            }
            let got = kv
                .get("k", GetOptions::new())
                .await
                .expect("read after failover");
            assert_eq!(got.kvs.len(), 1);
        }
        assert!(unknown <= 1, "{unknown} writes with unknown outcome");
        assert!(!client.current_endpoint().ends_with(killed.as_str()));
        let last = kv.get("k", GetOptions::new()).await.unwrap();
        assert_eq!(last.kvs[0].value, &b"20"[..]);
    })
    .await
    .expect("test timed out");
}

/// A write made only inside a nested transaction (in the failure branch) answers with that
/// write's revision, as a top-level write does: recipes use it as the new key's create
/// revision (a fence).
async fn nested_write_revision_scenario(endpoint: &str) {
    let client = Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect");
    let kv = client.kv();
    kv.put("n/a", "1", PutOptions::new()).await.unwrap();
    let inner = Txn::new().and_then([TxnOp::put("n/b", "2", PutOptions::new())]);
    let outer = Txn::new()
        .when([Compare::value("n/a", CompareOp::Equal, "other")])
        .or_else([TxnOp::txn(inner)]);
    let resp = kv.txn(outer).await.unwrap();
    assert!(!resp.succeeded);
    let b = kv.get("n/b", GetOptions::new()).await.unwrap();
    assert_eq!(resp.revision, b.kvs[0].create_revision);
    assert_eq!(resp.revision, b.revision);
}
kv_tests::on_both_servers!(
    nested_write_revision_scenario,
    nested_write_revision_on_our_server,
    nested_write_revision_on_etcd,
    30
);

/// An answer larger than tonic's default 4 MiB decoding limit is read, as etcd's own client
/// reads it (it lifts the limit): a range of six 1 MiB values.
async fn large_answer_scenario(endpoint: &str) {
    let client = Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect");
    let kv = client.kv();
    let value = vec![b'x'; 1 << 20];
    for i in 0..6 {
        kv.put(format!("big/{i}"), value.clone(), PutOptions::new())
            .await
            .expect("put 1 MiB");
    }
    let got = kv
        .get("big/", GetOptions::new().prefix())
        .await
        .expect("a 6 MiB answer");
    assert_eq!(got.kvs.len(), 6);
    assert!(got.kvs.iter().all(|kv| kv.value == value));
}
kv_tests::on_both_servers!(
    large_answer_scenario,
    large_answer_on_our_server,
    large_answer_on_etcd,
    60
);
