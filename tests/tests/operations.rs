//! What an operator sees over plain HTTP on the client port: `/metrics` (etcd's names and
//! types, checked against etcd 3.4 itself), `/health`, `/version`; and `--log-format json`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kv_client::{Client, ClientOptions, PutOptions, WatchOptions};
use kv_tests::scrape::{HttpAnswer, http_get, http_request, metric, metric_type, series};
use kv_tests::{Cluster, start_etcd, start_kv_server, which};

const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

fn get(endpoint: &str, path: &str) -> HttpAnswer {
    http_get(endpoint, path, HTTP_TIMEOUT).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Polls `check` on a fresh scrape of `endpoint` until it holds, for at most `within`.
fn wait_metrics(endpoint: &str, within: Duration, what: &str, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let text = get(endpoint, "/metrics").body;
        if check(&text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{endpoint}: {what} not seen within {within:?}; last scrape:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_version_on_a_three_member_cluster() {
    let mut cluster = Cluster::start(3);
    let endpoints = cluster.endpoints();
    let client = Client::connect(endpoints.clone(), ClientOptions::default())
        .await
        .expect("connect");
    let members = client.cluster().members().await.expect("member list");
    assert_eq!(members.len(), 3);

    // Work of every kind the metrics count: puts, a txn, a delete, reads, a lease kept alive
    // with a key on it, and a watch left open.
    for i in 0..20 {
        client
            .kv()
            .put(format!("ops/{i}"), "v", PutOptions::new())
            .await
            .expect("put");
    }
    client
        .kv()
        .delete("ops/0", Default::default())
        .await
        .expect("delete");
    let lease = client.lease().grant(30, None).await.expect("grant");
    client
        .kv()
        .put("ops/leased", "v", PutOptions::new().lease(lease.id))
        .await
        .expect("put on lease");
    let kept = client
        .lease()
        .keep_alive(lease.id)
        .await
        .expect("keep alive");
    let mut watch = client.watch().watch("ops/", WatchOptions::new().prefix());
    client
        .kv()
        .put("ops/watched", "v", PutOptions::new())
        .await
        .expect("put");
    let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch event in time");
    assert!(event.is_some());

    let ids: Vec<String> = members.iter().map(|m| format!("{:x}", m.id)).collect();
    let scrape_all = || -> Vec<String> {
        endpoints
            .iter()
            .map(|ep| get(ep, "/metrics").body)
            .collect()
    };

    // Every member: its own id, a leader known, 22 puts applied (the 20, the leased one and
    // the watched one), every peer probed, and its Raft log fsynced.
    for (i, ep) in endpoints.iter().enumerate() {
        let id_of = |text: &str| {
            series(text, "etcd_server_id")
                .first()
                .map(|(s, _)| s.to_string())
                .unwrap_or_default()
        };
        let text = get(ep, "/metrics").body;
        let own = id_of(&text);
        assert!(
            ids.iter()
                .any(|id| own == format!("etcd_server_id{{server_id=\"{id}\"}}")),
            "member {i}: {own} is none of {ids:?}"
        );
        let peers: Vec<&String> = ids.iter().filter(|id| !own.contains(id.as_str())).collect();
        assert_eq!(peers.len(), 2);
        wait_metrics(
            ep,
            Duration::from_secs(15),
            "puts applied and peers probed",
            |text| {
                metric(text, "etcd_server_has_leader") == Some(1.0)
                    && metric(text, "etcd_mvcc_put_total").unwrap_or(0.0) >= 22.0
                    && metric(text, "etcd_mvcc_delete_total").unwrap_or(0.0) >= 1.0
                    && metric(text, "etcd_debugging_lease_granted_total").unwrap_or(0.0) >= 1.0
                    && metric(text, "kv_leases") == Some(1.0)
                    && metric(text, "kv_lease_attached_keys") == Some(1.0)
                    && metric(text, "etcd_disk_wal_fsync_duration_seconds_count").unwrap_or(0.0)
                        > 0.0
                    && peers.iter().all(|id| {
                        let series = format!(
                            "etcd_network_peer_round_trip_time_seconds_count{{To=\"{id}\"}}"
                        );
                        metric(text, &series).unwrap_or(0.0) >= 1.0
                    })
            },
        );
        let text = get(ep, "/metrics").body;
        assert!(metric(&text, "etcd_mvcc_db_total_size_in_bytes").unwrap_or(0.0) > 0.0);
        assert!(metric(&text, "etcd_debugging_mvcc_current_revision").unwrap_or(0.0) >= 24.0);
        assert!(metric(&text, "etcd_server_leader_changes_seen_total").unwrap_or(0.0) >= 1.0);
        assert!(metric(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
        // Buckets are cumulative and end with +Inf, equal to the count.
        let buckets = series(&text, "etcd_disk_wal_fsync_duration_seconds_bucket");
        assert_eq!(buckets.len(), 15, "{buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
        assert_eq!(
            buckets.last().map(|b| b.1),
            metric(&text, "etcd_disk_wal_fsync_duration_seconds_count")
        );

        let health = get(ep, "/health");
        assert_eq!(health.status, 200, "{health:?}");
        let body: serde_json::Value = serde_json::from_str(&health.body).expect("health JSON");
        assert_eq!(body["health"], "true", "{health:?}");
        let version = get(ep, "/version");
        assert_eq!(version.status, 200);
        let body: serde_json::Value = serde_json::from_str(&version.body).expect("version JSON");
        assert!(
            body["etcdserver"]
                .as_str()
                .is_some_and(|v| v.starts_with("3."))
        );
        assert!(
            body["etcdcluster"]
                .as_str()
                .is_some_and(|v| v.ends_with(".0"))
        );
    }

    let texts = scrape_all();
    let leaders: Vec<usize> = (0..3)
        .filter(|&i| metric(&texts[i], "etcd_server_is_leader") == Some(1.0))
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one member leads: {leaders:?}");
    // The calls above went to some members; together they answered all of them, by method
    // and code.
    let total = |method: &str, code: &str| -> f64 {
        let series = format!(
            "grpc_server_handled_total{{grpc_code=\"{code}\",grpc_method=\"{method}\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}}"
        );
        texts
            .iter()
            .map(|t| metric(t, &series).unwrap_or(0.0))
            .sum()
    };
    assert!(
        total("Put", "OK") >= 22.0,
        "puts answered: {}",
        total("Put", "OK")
    );
    assert!(total("DeleteRange", "OK") >= 1.0);
    let watchers: f64 = texts
        .iter()
        .map(|t| metric(t, "etcd_debugging_mvcc_watcher_total").unwrap_or(0.0))
        .sum();
    assert!(watchers >= 1.0, "the open watch is counted");
    let latencies: f64 = texts
        .iter()
        .map(|t| {
            metric(
                t,
                "grpc_server_handling_seconds_count{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}",
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert!(latencies >= 22.0, "put latencies recorded: {latencies}");

    // A wrong method or path is refused as etcd refuses it.
    let refused = http_request(&endpoints[0], "POST", "/health", HTTP_TIMEOUT).expect("POST");
    assert_eq!(refused.status, 405);
    assert_eq!(get(&endpoints[0], "/no-such-page").status, 404);

    // Alone, a member is unhealthy: no quorum for the health check's read, and soon no
    // leader either.
    drop((watch, kept));
    drop(client);
    let survivor = (0..3).find(|i| !leaders.contains(i)).expect("a follower");
    for i in 0..3 {
        if i != survivor {
            cluster.kill(i);
        }
    }
    let ep = &endpoints[survivor];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let health = get(ep, "/health");
        if health.status == 503 {
            let body: serde_json::Value = serde_json::from_str(&health.body).expect("JSON");
            assert_eq!(body["health"], "false", "{health:?}");
            let reason = body["reason"].as_str().unwrap_or("");
            assert!(
                reason == "RAFT NO LEADER" || reason.starts_with("QGET ERROR"),
                "{health:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "still healthy alone: {health:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_metrics(ep, Duration::from_secs(20), "no leader", |text| {
        metric(text, "etcd_server_has_leader") == Some(0.0)
            && metric(text, "etcd_server_health_failures").unwrap_or(0.0) >= 1.0
    });
}

/// Every etcd metric we export has the name and type etcd 3.4 gives it, and the gRPC
/// counters carry etcd's labels: a dashboard built for etcd reads ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_names_types_and_labels_match_etcd() {
    if which("etcd").is_none() {
        eprintln!("SKIP metric_names_types_and_labels_match_etcd: etcd is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = start_etcd(&dir.path().join("etcd")).expect("etcd");
    let ours = start_kv_server(&dir.path().join("ours"), &[]);
    let mut texts = Vec::new();
    for ep in [&etcd.endpoint, &ours.endpoint] {
        let client = Client::connect([ep.as_str()], ClientOptions::default())
            .await
            .expect("connect");
        client
            .kv()
            .put("k", "v", PutOptions::new())
            .await
            .expect("put");
        client.kv().get("k", Default::default()).await.expect("get");
        let health = get(ep, "/health");
        assert_eq!(health.status, 200, "{ep}: {health:?}");
        let body: serde_json::Value = serde_json::from_str(&health.body).expect("JSON");
        assert_eq!(body["health"], "true");
        let version: serde_json::Value =
            serde_json::from_str(&get(ep, "/version").body).expect("JSON");
        let mut keys: Vec<&String> = version.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(keys, ["etcdcluster", "etcdserver"], "{ep}");
        texts.push(get(ep, "/metrics").body);
    }
    let (etcd_text, our_text) = (&texts[0], &texts[1]);
    let ours_from_etcd: Vec<&str> = our_text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| {
            (name.starts_with("etcd_") || name.starts_with("grpc_") || name.starts_with("process_"))
                // Not exported by a lone etcd 3.4 member: peer round trips (no peers) and
                // gRPC latencies (only with --metrics extensive).
                && *name != "etcd_network_peer_round_trip_time_seconds"
                && *name != "grpc_server_handling_seconds"
        })
        .collect();
    assert!(ours_from_etcd.len() >= 35, "{ours_from_etcd:?}");
    for name in &ours_from_etcd {
        assert_eq!(
            metric_type(our_text, name),
            metric_type(etcd_text, name),
            "{name}: our type differs from etcd's (None: etcd has no such metric)"
        );
    }
    for series in [
        "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}",
        "grpc_server_started_total{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}",
        "etcd_server_has_leader",
        "etcd_server_is_leader",
        "etcd_mvcc_put_total",
        "etcd_server_leader_changes_seen_total",
    ] {
        assert_eq!(metric(etcd_text, series), Some(1.0), "etcd: {series}");
        assert_eq!(metric(our_text, series), Some(1.0), "ours: {series}");
    }
    for family in [
        "etcd_server_id",
        "etcd_server_version",
        "etcd_cluster_version",
    ] {
        let label = |text: &str| {
            series(text, family)
                .first()
                .and_then(|(s, _)| s.split_once('{'))
                .and_then(|(_, rest)| rest.split_once('='))
                .map(|(label, _)| label.to_string())
        };
        assert_eq!(label(our_text), label(etcd_text), "{family}'s label");
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = start_kv_server(dir.path(), &["--log-format", "json"]);
    assert_eq!(get(&server.endpoint, "/health").status, 200);
    assert!(server.terminate(Duration::from_secs(10)), "clean stop");
    let log = server.log_text();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 3, "{log}");
    let mut ready = false;
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        assert!(v["message"].is_string(), "{line}");
        if v["message"] == "ready to serve client requests" {
            // Event fields are top-level keys.
            assert_eq!(
                v["address"].as_str(),
                Some(server.endpoint.as_str()),
                "{line}"
            );
            assert_eq!(v["scheme"], "http", "{line}");
            ready = true;
        }
    }
    assert!(ready, "{log}");
}

/// A call the client gives up on while it waits (a Lock behind a holder) counts as handled,
/// code Canceled, as go-grpc-prometheus counts it: started minus handled stays the calls in
/// flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_given_up_on_counts_as_canceled() {
    use kv_core::proto::v3lockpb::{LockRequest, lock_client::LockClient};
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_kv_server(dir.path(), &[]);
    let ep = server.endpoint.as_str();
    let client = Client::connect([ep], ClientOptions::default())
        .await
        .expect("connect");
    let holder = client.lease().grant(30, None).await.expect("grant").id;
    let waiter = client.lease().grant(30, None).await.expect("grant").id;
    let mut lock = LockClient::new(kv_tests::connect_channel(ep).await);
    lock.lock(LockRequest {
        name: b"locks/held".to_vec(),
        lease: holder,
    })
    .await
    .expect("first lock");
    let waiting = tokio::time::timeout(
        Duration::from_millis(300),
        lock.lock(LockRequest {
            name: b"locks/held".to_vec(),
            lease: waiter,
        }),
    )
    .await;
    assert!(waiting.is_err(), "the second lock waits for the first");
    let canceled = "grpc_server_handled_total{grpc_code=\"Canceled\",grpc_method=\"Lock\",grpc_service=\"v3lockpb.Lock\",grpc_type=\"unary\"}";
    let started = "grpc_server_started_total{grpc_method=\"Lock\",grpc_service=\"v3lockpb.Lock\",grpc_type=\"unary\"}";
    let ok = "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Lock\",grpc_service=\"v3lockpb.Lock\",grpc_type=\"unary\"}";
    wait_metrics(ep, Duration::from_secs(10), "the canceled lock", |text| {
        metric(text, canceled) == Some(1.0)
            && metric(text, ok) == Some(1.0)
            && metric(text, started) == Some(2.0)
    });
}
