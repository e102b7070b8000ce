//! `kvctl` against a three-member cluster with every recipe in use: its tables and JSON say
//! who holds the lock, who leads, how deep the queue is and which instances are registered;
//! its streams follow an election and a service; `snapshot save` then `kv-server
//! --restore-from` seeds a new three-member cluster with the identical history (HashKV).

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kv_client::{Client, ClientOptions};
use kv_tests::{
    Cluster, etcdctl, kvctl_bin, run_bounded, start_kv_server, wait_leader_among, which,
};
use recipes::discovery::{InstanceInfo, Service};
use recipes::{Election, EnqueueOptions, Mutex, Queue, QueueOptions, Session};
use serde_json::Value;

const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Runs kvctl against `endpoints` with `args`, bounded by [`RUN_LIMIT`].
fn kvctl(endpoints: &[String], args: &[&str]) -> Output {
    let mut cmd = Command::new(kvctl_bin());
    cmd.arg("--endpoints").arg(endpoints.join(",")).args(args);
    run_bounded(&mut cmd, RUN_LIMIT, &format!("kvctl {args:?}"))
}

/// kvctl's stdout, which must come with exit code 0.
fn ok(endpoints: &[String], args: &[&str]) -> String {
    let out = kvctl(endpoints, args);
    assert!(
        out.status.success(),
        "kvctl {args:?}: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn json(endpoints: &[String], args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let text = ok(endpoints, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("kvctl {args:?}: {e}: {text}"))
}

/// A kvctl stream (`observe`, `watch`) read line by line while the test acts.
struct Stream {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Stream {
    fn start(endpoints: &[String], args: &[&str]) -> Stream {
        let mut child = Command::new(kvctl_bin())
            .arg("--endpoints")
            .arg(endpoints.join(","))
            .args(["-o", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kvctl");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Stream { child, lines }
    }

    fn next(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(RUN_LIMIT)
            .expect("a line from the kvctl stream in time");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Waits for the process to end by itself (its --count reached).
    fn finish(mut self) {
        let deadline = Instant::now() + RUN_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("status") {
                assert!(status.success(), "{status}");
                return;
            }
            assert!(Instant::now() < deadline, "kvctl stream did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn hash_kv(endpoint: &str, revision: i64) -> u32 {
    let client = Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect");
    client
        .maintenance()
        .hash_kv(revision)
        .await
        .expect("HashKV")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvctl_shows_and_follows_the_recipes_on_a_three_member_cluster() {
    let mut cluster = Cluster::start(3);
    let endpoints = cluster.endpoints();
    let client = Client::connect(endpoints.clone(), ClientOptions::default())
        .await
        .expect("connect");
    let alice = Session::with_ttl(&client, 30).await.expect("session");
    let bob = Session::with_ttl(&client, 30).await.expect("session");

    // A lock held by alice, bob waiting for it.
    let held = Mutex::new(&alice, "locks/reindex")
        .lock()
        .await
        .expect("lock");
    let bob_waits = tokio::spawn({
        let bob = bob.clone();
        async move { Mutex::new(&bob, "locks/reindex").lock().await }
    });
    // An election led by alice, bob next in line.
    let leadership = Election::new(&client, "elections/indexer")
        .campaign(&alice, "worker-1")
        .await
        .expect("campaign");
    let bob_runs = tokio::spawn({
        let (client, bob) = (client.clone(), bob.clone());
        async move {
            Election::new(&client, "elections/indexer")
                .campaign(&bob, "worker-2")
                .await
        }
    });
    // A queue: one item dead-lettered, then one claimed, one delayed, one ready.
    let strict = QueueOptions {
        max_attempts: 1,
        ..Default::default()
    };
    let jobs: Queue<Value> = Queue::with_options(&client, "queues/jobs", strict);
    jobs.enqueue(&serde_json::json!({"job": "d"}))
        .await
        .expect("enqueue");
    jobs.dequeue(&alice)
        .await
        .expect("dequeue")
        .nack()
        .await
        .expect("nack");
    let jobs: Queue<Value> = Queue::new(&client, "queues/jobs");
    jobs.enqueue(&serde_json::json!({"job": "a"}))
        .await
        .expect("enqueue");
    jobs.enqueue_with(
        &serde_json::json!({"job": "b"}),
        EnqueueOptions::new().priority(1),
    )
    .await
    .expect("enqueue");
    jobs.enqueue_with(
        &serde_json::json!({"job": "c"}),
        EnqueueOptions::new().delay(Duration::from_secs(3600)),
    )
    .await
    .expect("enqueue");
    let claimed = jobs.dequeue(&alice).await.expect("dequeue");
    assert_eq!(claimed.item, serde_json::json!({"job": "a"}));
    // A registered service instance.
    let search = Service::new(&client, "services/search");
    let node1 = search
        .register(
            "node-1",
            InstanceInfo::new("http://10.0.0.7:8080").with_metadata("zone", "eu-1"),
        )
        .await
        .expect("register");
    // Bob's waits are in place once his keys exist.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let locks = json(&endpoints, &["lock", "list"]);
        let elections = json(&endpoints, &["election", "list"]);
        if locks[0]["waiting"].as_array().is_some_and(|w| w.len() == 1)
            && elections[0]["candidates"]
                .as_array()
                .is_some_and(|c| c.len() == 1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob's waits not seen: {locks} {elections}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alice_lease = format!("{:x}", alice.lease());
    let bob_lease = format!("{:x}", bob.lease());

    // lock list
    let locks = json(&endpoints, &["lock", "list"]);
    assert_eq!(locks.as_array().map(Vec::len), Some(1), "{locks}");
    assert_eq!(locks[0]["name"], "locks/reindex");
    assert_eq!(locks[0]["kind"], "mutex");
    assert_eq!(
        locks[0]["holders"][0]["key"],
        format!("locks/reindex/{alice_lease}")
    );
    assert_eq!(locks[0]["holders"][0]["revision"], held.fence().revision);
    assert_eq!(locks[0]["waiting"][0]["lease"], bob_lease);
    let table = ok(&endpoints, &["lock", "list"]);
    let mut rows = table.lines();
    assert_eq!(
        rows.next()
            .map(|h| h.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["LOCK", "KIND", "HOLDER", "LEASE", "FENCE", "WAITING"])
    );
    let row: Vec<&str> = rows.next().expect("a row").split_whitespace().collect();
    let fence = held.fence().revision.to_string();
    let holder = format!("locks/reindex/{alice_lease}");
    assert_eq!(
        row,
        [
            "locks/reindex",
            "mutex",
            holder.as_str(),
            alice_lease.as_str(),
            fence.as_str(),
            "1"
        ]
    );

    // election list
    let elections = json(&endpoints, &["election", "list"]);
    assert_eq!(elections[0]["name"], "elections/indexer");
    assert_eq!(elections[0]["value"], "worker-1");
    assert_eq!(
        elections[0]["leader"]["revision"],
        leadership.fence().revision
    );
    assert!(ok(&endpoints, &["election", "list"]).contains("worker-1"));

    // queue stats, peek, dead-letter
    let stats = json(&endpoints, &["queue", "stats", "queues/jobs"]);
    let q = &stats[0];
    assert_eq!(
        (&q["ready"], &q["delayed"], &q["claimed"], &q["dead"]),
        (
            &Value::from(1),
            &Value::from(1),
            &Value::from(1),
            &Value::from(1)
        ),
        "{stats}"
    );
    let all = json(&endpoints, &["queue", "stats"]);
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    let table = ok(&endpoints, &["queue", "stats", "queues/jobs"]);
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .collect();
    assert_eq!(&row[..5], ["queues/jobs", "1", "1", "1", "1"], "{table}");
    let peek = json(&endpoints, &["queue", "peek", "queues/jobs", "-n", "2"]);
    let payloads: Vec<&Value> = peek
        .as_array()
        .expect("array")
        .iter()
        .map(|i| &i["payload"]["job"])
        .collect();
    assert_eq!(payloads, ["a", "c"], "priority first, then age: {peek}");
    assert_eq!(peek[0]["claimed"], true);
    assert_eq!(peek[0]["attempts"], 1);
    let table = ok(&endpoints, &["queue", "peek", "queues/jobs"]);
    assert_eq!(table.lines().count(), 4, "header and three items: {table}");
    assert!(table.contains("claimed") && table.contains("delayed") && table.contains("ready"));
    let dead = json(&endpoints, &["queue", "dead-letter", "queues/jobs"]);
    assert_eq!(dead.as_array().map(Vec::len), Some(1), "{dead}");
    assert_eq!(dead[0]["payload"]["job"], "d");
    assert_eq!(dead[0]["attempts"], 1);

    // services list and watch
    let services_revision = client
        .kv()
        .get("services/search/node-1", Default::default())
        .await
        .expect("get")
        .revision;
    let services = json(&endpoints, &["services", "list"]);
    assert_eq!(services[0]["name"], "services/search");
    assert_eq!(services[0]["instances"][0]["id"], "node-1");
    assert_eq!(
        services[0]["instances"][0]["endpoint"],
        "http://10.0.0.7:8080"
    );
    assert_eq!(services[0]["instances"][0]["metadata"]["zone"], "eu-1");
    let table = ok(&endpoints, &["services", "list", "services/search"]);
    assert!(
        table.contains("node-1") && table.contains("zone=eu-1"),
        "{table}"
    );
    // The same state as gauges on every member's /metrics (once each has applied it: a
    // member may trail the quorum).
    for ep in &endpoints {
        let deadline = Instant::now() + Duration::from_secs(15);
        let text = loop {
            let text = kv_tests::scrape::http_get(ep, "/metrics", Duration::from_secs(5))
                .expect("scrape")
                .body;
            let revision = kv_tests::scrape::metric(&text, "etcd_debugging_mvcc_current_revision");
            if revision.unwrap_or(0.0) >= services_revision as f64 || Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for (series, want) in [
            ("kv_recipe_locks_held", 1.0),
            ("kv_recipe_lock_waiters", 1.0),
            ("kv_recipe_elections_led", 1.0),
            ("kv_recipe_election_candidates", 1.0),
            (
                "kv_recipe_queue_items{queue=\"queues/jobs\",state=\"ready\"}",
                1.0,
            ),
            (
                "kv_recipe_queue_items{queue=\"queues/jobs\",state=\"dead\"}",
                1.0,
            ),
            (
                "kv_recipe_service_instances{service=\"services/search\"}",
                1.0,
            ),
            ("kv_recipe_scan_truncated", 0.0),
        ] {
            assert_eq!(
                kv_tests::scrape::metric(&text, series),
                Some(want),
                "{ep}: {series}"
            );
        }
    }
    let watch = Stream::start(
        &endpoints,
        &["services", "watch", "services/search", "--count", "3"],
    );
    let first = watch.next();
    assert_eq!(
        (&first["event"], &first["id"]),
        (&Value::from("added"), &Value::from("node-1"))
    );
    let node2 = search
        .register("node-2", InstanceInfo::new("http://10.0.0.8:8080"))
        .await
        .expect("register");
    let added = watch.next();
    assert_eq!(
        (&added["event"], &added["id"]),
        (&Value::from("added"), &Value::from("node-2"))
    );
    node2.deregister().await.expect("deregister");
    let removed = watch.next();
    assert_eq!(
        (&removed["event"], &removed["id"]),
        (&Value::from("removed"), &Value::from("node-2"))
    );
    watch.finish();

    // election observe: alice leads; she resigns and bob takes over (a "vacant" may come
    // in between, as etcd's observers may see).
    let observe = Stream::start(
        &endpoints,
        &["election", "observe", "elections/indexer", "--count", "3"],
    );
    let now = observe.next();
    assert_eq!(
        (&now["event"], &now["value"]),
        (&Value::from("elected"), &Value::from("worker-1"))
    );
    leadership.resign().await.expect("resign");
    let mut next = observe.next();
    if next["event"] == "vacant" {
        next = observe.next();
    }
    assert_eq!(
        (&next["event"], &next["value"]),
        (&Value::from("elected"), &Value::from("worker-2")),
        "bob's value after alice resigned"
    );
    drop(observe);
    bob_runs.await.expect("join").expect("bob leads");

    // cluster status, once every member has caught up (a member may trail the quorum for a
    // while, and the table says so in LAG).
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let status = json(&endpoints, &["cluster", "status"]);
        let caught_up = status.as_array().is_some_and(|rows| {
            rows.iter()
                .all(|r| r["lag"] == 0 && r["raft_index"].as_u64().unwrap_or(0) > 0)
        });
        if caught_up {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "members did not catch up: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rows = status.as_array().expect("array");
    assert_eq!(rows.len(), 3, "{status}");
    assert_eq!(
        rows.iter().filter(|r| r["leader"] == true).count(),
        1,
        "{status}"
    );
    for r in rows {
        assert!(
            r["errors"].as_array().is_some_and(|e| e.is_empty()),
            "{status}"
        );
        assert!(r["raft_index"].as_u64().unwrap_or(0) > 0, "{status}");
        assert!(r["lag"].as_u64().is_some(), "{status}");
        assert!(r["db_size"].as_i64().unwrap_or(0) > 0, "{status}");
    }
    let table = ok(&endpoints, &["cluster", "status"]);
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.starts_with("NAME") && h.contains("LAG"))
    );
    assert_eq!(
        table.matches(" * ").count(),
        1,
        "one leader marked: {table}"
    );

    // A member that cannot be reached is listed with the reason, not dropped.
    drop(held);
    let _ = bob_waits.await;
    drop(node1);
    cluster.kill(2);
    let status = json(&endpoints, &["cluster", "status"]);
    let rows = status.as_array().expect("array");
    assert_eq!(rows.len(), 3, "{status}");
    let down: Vec<&Value> = rows
        .iter()
        .filter(|r| r["errors"].as_array().is_some_and(|e| !e.is_empty()))
        .collect();
    assert_eq!(down.len(), 1, "{status}");
    assert!(down[0]["lag"].is_null(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_then_restore_seeds_a_new_cluster_with_identical_history() {
    let old = Cluster::start(3);
    let endpoints = old.endpoints();
    let client = Client::connect(endpoints.clone(), ClientOptions::default())
        .await
        .expect("connect");
    let session = Session::with_ttl(&client, 60).await.expect("session");
    let _held = Mutex::new(&session, "locks/backup")
        .lock()
        .await
        .expect("lock");
    let kv = client.kv();
    for i in 0..200 {
        kv.put(
            format!("data/{i:03}"),
            format!("value {i}"),
            Default::default(),
        )
        .await
        .expect("put");
    }
    kv.delete("data/000", Default::default())
        .await
        .expect("delete");

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("backup.db");
    let file_arg = file.to_str().expect("UTF-8 path");
    let out = kvctl(&endpoints, &["snapshot", "save", file_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), format!("Snapshot saved at {file_arg}"));
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("Downloading snapshot: 100%"),
        "{progress}"
    );
    assert!(
        !dir.path().join("backup.db.part").exists(),
        "the partial file is gone"
    );
    let saved = json(
        &endpoints,
        &[
            "snapshot",
            "save",
            dir.path().join("again.db").to_str().expect("UTF-8"),
        ],
    );
    assert!(
        saved["bytes"].as_u64().unwrap_or(0) > 0
            && saved["sha256"].as_str().is_some_and(|s| s.len() == 64)
    );

    // A new three-member cluster, every member seeded from the same file.
    let new = Cluster::start_with(3, &["--restore-from", file_arg]);
    let all: Vec<usize> = (0..3).collect();
    wait_leader_among(&new, &all, Duration::from_secs(20)).await;
    let restored = Client::connect(new.endpoints(), ClientOptions::default())
        .await
        .expect("connect");
    let revision = restored
        .kv()
        .get("data/001", Default::default())
        .await
        .expect("get")
        .revision;
    assert!(revision >= 202, "the old revisions carry over: {revision}");
    let expected = hash_kv(&endpoints[0], revision).await;
    for ep in new.endpoints() {
        assert_eq!(
            hash_kv(&ep, revision).await,
            expected,
            "{ep}: HashKV at {revision}"
        );
    }
    let got = restored
        .kv()
        .get("data/", kv_client::GetOptions::new().prefix().count_only())
        .await
        .expect("count");
    assert_eq!(got.count, 199);
    // The new cluster is a cluster of its own: three new members, none of the old ones.
    let old_ids: Vec<u64> = client
        .cluster()
        .members()
        .await
        .expect("members")
        .iter()
        .map(|m| m.id)
        .collect();
    let new_members = restored.cluster().members().await.expect("members");
    assert_eq!(new_members.len(), 3);
    assert!(new_members.iter().all(|m| !old_ids.contains(&m.id)));
    // It takes writes after the restored revision.
    let put = restored
        .kv()
        .put("after", "restore", Default::default())
        .await
        .expect("put");
    assert_eq!(put.revision, revision + 1);
    // The lock the old cluster held is still visible to kvctl (its lease expires later,
    // nobody renewing it).
    let locks = json(&new.endpoints(), &["lock", "list"]);
    assert_eq!(locks[0]["name"], "locks/backup", "{locks}");

    // Restoring over existing data, or from a damaged file, is refused.
    let refused = run_bounded(
        Command::new(kv_tests::kv_server_bin())
            .args([
                "--data-dir",
                new.members[0].data_dir.to_str().expect("UTF-8"),
            ])
            .args(["--restore-from", file_arg]),
        RUN_LIMIT,
        "kv-server --restore-from",
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already exists"));
    let corrupt = dir.path().join("corrupt.db");
    let mut bytes = std::fs::read(&file).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&corrupt, bytes).expect("write");
    let out = run_bounded(
        Command::new(kv_tests::kv_server_bin())
            .args([
                "--data-dir",
                dir.path().join("fresh").to_str().expect("UTF-8"),
            ])
            .args(["--restore-from", corrupt.to_str().expect("UTF-8")]),
        RUN_LIMIT,
        "kv-server --restore-from",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SHA-256"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A snapshot etcdctl saved from our server restores as well as kvctl's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_saved_by_etcdctl_restores() {
    if which("etcdctl").is_none() {
        eprintln!("SKIP a_snapshot_saved_by_etcdctl_restores: etcdctl is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let source = start_kv_server(&dir.path().join("source"), &[]);
    let client = Client::connect([source.endpoint.as_str()], ClientOptions::default())
        .await
        .expect("connect");
    for i in 0..50 {
        client
            .kv()
            .put(format!("k{i}"), "v", Default::default())
            .await
            .expect("put");
    }
    let file = dir.path().join("etcdctl.db");
    let saved = etcdctl(
        &source.endpoint,
        &["snapshot", "save", file.to_str().expect("UTF-8")],
    );
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    let restored = start_kv_server(
        &dir.path().join("restored"),
        &["--restore-from", file.to_str().expect("UTF-8")],
    );
    let revision = client
        .kv()
        .get("k0", Default::default())
        .await
        .expect("get")
        .revision;
    assert_eq!(
        hash_kv(&restored.endpoint, revision).await,
        hash_kv(&source.endpoint, revision).await
    );
}
