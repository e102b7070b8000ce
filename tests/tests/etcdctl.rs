//! The real binary driven by the real etcdctl (3.4), the way a user would.

use std::time::Duration;

use kv_tests::{etcdctl, etcdctl_stdin, have_etcdctl, ok, start_kv_server};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn etcdctl_session_on_one_member() {
    if !have_etcdctl("etcdctl_session_on_one_member") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = start_kv_server(&dir.path().join("data"), &[]);
    keys_txn_history_compaction(&server.endpoint);
}

#[test]
fn etcdctl_session_on_three_members() {
    if !have_etcdctl("etcdctl_session_on_three_members") {
        return;
    }
    let cluster = kv_tests::Cluster::start(3);
    // etcdctl balances over every member, as users point it at a cluster.
    keys_txn_history_compaction(&cluster.endpoints().join(","));
    // Status and member list from every member agree on one leader and three voters.
    let status = json(&ok(etcdctl(
        &cluster.endpoints().join(","),
        &["endpoint", "status", "-w", "json"],
    )));
    let leaders: std::collections::BTreeSet<u64> = status
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["Status"]["leader"].as_u64().unwrap())
        .collect();
    assert_eq!(leaders.len(), 1, "{status}");
    let leader = *leaders.iter().next().unwrap();
    for ep in cluster.endpoints() {
        let members = json(&ok(etcdctl(&ep, &["member", "list", "-w", "json"])));
        assert_eq!(members["members"].as_array().unwrap().len(), 3);
    }
    // move-leader hands leadership to another voter.
    let members = json(&ok(etcdctl(
        &cluster.endpoint(0),
        &["member", "list", "-w", "json"],
    )));
    let target = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["ID"].as_u64().unwrap())
        .find(|id| *id != leader)
        .unwrap();
    let out = ok(etcdctl(
        &cluster.endpoints().join(","),
        &["move-leader", &format!("{target:x}")],
    ));
    assert!(out.contains("Leadership transferred"), "{out}");
    let status = json(&ok(etcdctl(
        &cluster.endpoints().join(","),
        &["endpoint", "status", "-w", "json"],
    )));
    assert!(
        status
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["Status"]["leader"].as_u64() == Some(target)),
        "{status}"
    );
}

/// The etcdctl session of the README, checked step by step, against `ep` (one endpoint or a
/// comma-separated list).
fn keys_txn_history_compaction(ep: &str) {
    assert_eq!(ok(etcdctl(ep, &["put", "foo", "bar"])), "OK\n");
    assert_eq!(ok(etcdctl(ep, &["get", "foo"])), "foo\nbar\n");
    assert_eq!(ok(etcdctl(ep, &["put", "foo", "baz"])), "OK\n");
    assert_eq!(ok(etcdctl(ep, &["put", "fop", "1"])), "OK\n");

    // -w json: revisions and versions as etcd reports them (the store starts at revision 1).
    let v = json(&ok(etcdctl(ep, &["get", "foo", "-w", "json"])));
    assert_eq!(v["header"]["revision"], 4);
    assert_eq!(v["count"], 1);
    let kv = &v["kvs"][0];
    assert_eq!(kv["create_revision"], 2);
    assert_eq!(kv["mod_revision"], 3);
    assert_eq!(kv["version"], 2);
    assert!(v["header"]["cluster_id"].as_u64().unwrap() != 0);
    assert!(v["header"]["member_id"].as_u64().unwrap() != 0);
    assert!(v["header"]["raft_term"].as_u64().unwrap() >= 1);

    // History.
    assert_eq!(ok(etcdctl(ep, &["get", "foo", "--rev=2"])), "foo\nbar\n");
    assert_eq!(
        ok(etcdctl(ep, &["get", "fo", "--prefix", "--keys-only"])),
        "foo\n\nfop\n\n"
    );
    let v = json(&ok(etcdctl(
        ep,
        &["get", "fo", "--prefix", "--limit=1", "-w", "json"],
    )));
    assert_eq!(
        (v["count"].as_i64(), v["more"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(
        ok(etcdctl(
            ep,
            &[
                "get",
                "fo",
                "--prefix",
                "--sort-by=MODIFY",
                "--order=DESCEND",
                "--limit=1"
            ]
        )),
        "fop\n1\n"
    );

    // A txn in etcdctl's interactive syntax: compares, then success ops, then failure ops.
    let out = ok(etcdctl_stdin(
        ep,
        &["txn"],
        "value(\"foo\") = \"baz\"\n\nput foo qux\nget fop\n\nput foo never\n\n",
    ));
    assert_eq!(out, "SUCCESS\n\nOK\n\nfop\n1\n");
    let out = ok(etcdctl_stdin(
        ep,
        &["txn"],
        "mod(\"foo\") < \"3\"\n\nput foo never\n\nget foo\n\n",
    ));
    assert_eq!(out, "FAILURE\n\nfoo\nqux\n");

    // Delete: count, and a prefix delete.
    assert_eq!(ok(etcdctl(ep, &["del", "fop"])), "1\n");
    assert_eq!(ok(etcdctl(ep, &["del", "nothing-here"])), "0\n");
    assert_eq!(ok(etcdctl(ep, &["put", "dir/a", "1"])), "OK\n");
    assert_eq!(ok(etcdctl(ep, &["put", "dir/b", "2"])), "OK\n");
    assert_eq!(ok(etcdctl(ep, &["del", "dir/", "--prefix"])), "2\n");

    // Compaction: reads below fail with etcd's message; at and above succeed.
    let rev = json(&ok(etcdctl(ep, &["get", "foo", "-w", "json"])))["header"]["revision"]
        .as_i64()
        .unwrap();
    assert_eq!(
        ok(etcdctl(ep, &["compaction", "5"])),
        "compacted revision 5\n"
    );
    let below = etcdctl(ep, &["get", "foo", "--rev=3"]);
    assert!(!below.status.success());
    assert!(
        String::from_utf8_lossy(&below.stderr)
            .contains("etcdserver: mvcc: required revision has been compacted")
    );
    assert_eq!(ok(etcdctl(ep, &["get", "foo", "--rev=5"])), "foo\nqux\n");
    let future = etcdctl(ep, &["get", "foo", &format!("--rev={}", rev + 100)]);
    assert!(
        String::from_utf8_lossy(&future.stderr)
            .contains("etcdserver: mvcc: required revision is a future revision")
    );
    let again = etcdctl(ep, &["compaction", "4"]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("required revision has been compacted")
    );

    // Bad input gets etcd's errors.
    let lease = etcdctl(ep, &["put", "k", "v", "--lease=1234abcd"]);
    assert!(
        String::from_utf8_lossy(&lease.stderr).contains("etcdserver: requested lease not found")
    );
    let empty = etcdctl(ep, &["put", "", "v"]);
    assert!(!empty.status.success());
}

#[test]
fn etcdctl_endpoint_status_member_list_and_maintenance() {
    if !have_etcdctl("etcdctl_endpoint_status_member_list_and_maintenance") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = start_kv_server(&dir.path().join("data"), &["--name", "alpha"]);
    let ep = server.endpoint.as_str();
    ok(etcdctl(ep, &["put", "a", "1"]));

    let status = json(&ok(etcdctl(ep, &["endpoint", "status", "-w", "json"])));
    let s = &status[0]["Status"];
    assert_eq!(
        s["leader"], s["header"]["member_id"],
        "a single member leads itself"
    );
    assert!(s["raftIndex"].as_u64().unwrap() >= 2);
    assert!(s["raftTerm"].as_u64().unwrap() >= 1);
    assert!(s["dbSize"].as_i64().unwrap() > 0);
    assert!(!s["version"].as_str().unwrap().is_empty());

    let members = json(&ok(etcdctl(ep, &["member", "list", "-w", "json"])));
    let m = &members["members"][0];
    assert_eq!(m["name"], "alpha");
    assert_eq!(members["members"].as_array().unwrap().len(), 1);
    assert_eq!(m["ID"], s["header"]["member_id"]);

    let health = json(&ok(etcdctl(ep, &["endpoint", "health", "-w", "json"])));
    assert_eq!(health[0]["health"], true, "{health}");
    assert!(ok(etcdctl(ep, &["endpoint", "hashkv"])).contains(ep));
    assert!(ok(etcdctl(ep, &["defrag"])).contains("Finished defragmenting"));
    assert_eq!(ok(etcdctl(ep, &["alarm", "list"])), "");
    assert_eq!(
        ok(etcdctl(ep, &["get", "a"])),
        "a\n1\n",
        "data survives defragment"
    );

    let snap = dir.path().join("backup.db");
    let out = ok(etcdctl(ep, &["snapshot", "save", snap.to_str().unwrap()]));
    assert!(out.contains("Snapshot saved"), "{out}");
    assert!(std::fs::metadata(&snap).unwrap().len() > 0);
}

#[test]
fn nospace_alarm_refuses_writes_but_serves_reads() {
    if !have_etcdctl("nospace_alarm_refuses_writes_but_serves_reads") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A quota far below the size of an empty store: the first write raises the alarm.
    let server = start_kv_server(&dir.path().join("data"), &["--quota-backend-bytes", "4096"]);
    let ep = server.endpoint.as_str();
    let put = etcdctl(ep, &["put", "k", "v"]);
    assert!(
        String::from_utf8_lossy(&put.stderr).contains("etcdserver: mvcc: database space exceeded"),
        "{put:?}"
    );
    assert!(ok(etcdctl(ep, &["alarm", "list"])).contains("alarm:NOSPACE"));
    assert_eq!(ok(etcdctl(ep, &["get", "k"])), "");
    let status = ok(etcdctl(ep, &["endpoint", "status"]));
    assert!(status.contains("NOSPACE"), "{status}");
}

#[test]
fn graceful_stop_and_restart_keep_data_and_revisions() {
    if !have_etcdctl("graceful_stop_and_restart_keep_data_and_revisions") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = start_kv_server(&data, &[]);
    for i in 0..20 {
        ok(etcdctl(
            &server.endpoint,
            &["put", &format!("key{i:02}"), &format!("v{i}")],
        ));
    }
    assert!(
        server.terminate(Duration::from_secs(20)),
        "SIGTERM should stop it cleanly:\n{}",
        server.log_text()
    );
    let server = start_kv_server(&data, &[]);
    let v = json(&ok(etcdctl(
        &server.endpoint,
        &["get", "key", "--prefix", "-w", "json"],
    )));
    assert_eq!(v["count"], 20);
    assert_eq!(v["header"]["revision"], 21);
    ok(etcdctl(&server.endpoint, &["put", "after", "x"]));
    let v = json(&ok(etcdctl(
        &server.endpoint,
        &["get", "after", "-w", "json"],
    )));
    assert_eq!(v["kvs"][0]["mod_revision"], 22);
}

#[test]
fn foreign_or_damaged_data_dirs_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("etcd-data");
    std::fs::create_dir_all(foreign.join("member/wal")).unwrap();
    std::fs::write(foreign.join("member/wal/0.wal"), b"not ours").unwrap();
    let out = std::process::Command::new(kv_tests::kv_server_bin())
        .arg("--data-dir")
        .arg(&foreign)
        .args(["--listen-client-urls", "http://127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a kv-server data dir"));
    assert_eq!(
        std::fs::read(foreign.join("member/wal/0.wal")).unwrap(),
        b"not ours"
    );
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);

    // A data dir whose state file is garbage.
    let data = dir.path().join("data");
    drop(start_kv_server(&data, &[]));
    let state = data.join("state.redb");
    std::fs::write(&state, vec![0x5au8; 64 * 1024]).unwrap();
    let out = std::process::Command::new(kv_tests::kv_server_bin())
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen-client-urls", "http://127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot open the state"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&state).unwrap(), vec![0x5au8; 64 * 1024]);
}

#[test]
fn periodic_auto_compaction_compacts_old_history() {
    if !have_etcdctl("periodic_auto_compaction_compacts_old_history") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = start_kv_server(
        &dir.path().join("data"),
        &[
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "2s",
        ],
    );
    let ep = server.endpoint.as_str();
    ok(etcdctl(ep, &["put", "k", "v1"]));
    ok(etcdctl(ep, &["put", "k", "v2"]));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = etcdctl(ep, &["get", "k", "--rev=2"]);
        if String::from_utf8_lossy(&out.stderr).contains("required revision has been compacted") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "history at revision 2 was never compacted"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(ok(etcdctl(ep, &["get", "k"])), "k\nv2\n");
    assert!(server.log_text().contains("auto-compacted"));
}
