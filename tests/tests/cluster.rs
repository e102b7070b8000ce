//! Three real kv-server processes as one cluster: writes through every member, leader killed
//! mid-burst, restart and catch-up, and every acknowledged write on every member with the same
//! revision and the same HashKV.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv_core::proto::etcdserverpb::{
    AlarmRequest, AlarmType, HashKvRequest, PutRequest, RangeRequest, StatusRequest,
    alarm_request::AlarmAction, kv_client::KvClient, maintenance_client::MaintenanceClient,
};
use kv_tests::{Cluster, wait_leader_among};
use tonic::transport::Channel;

/// Cluster tests run one at a time: several three-member clusters at once on a 2-core CI
/// machine would starve heartbeats and turn timing into flakiness.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One acknowledged put: key, value, revision.
type Ack = (Vec<u8>, Vec<u8>, i64);

async fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint URL")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// Index of the member that reports itself leader, waiting up to `within`.
async fn wait_leader(cluster: &Cluster, within: Duration) -> usize {
    let all: Vec<usize> = (0..cluster.members.len()).collect();
    wait_leader_among(cluster, &all, within).await
}

/// Waits until every running member has applied the same revision and reports the same
/// HashKV at it; returns that revision.
async fn wait_converged(cluster: &Cluster, within: Duration) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let mut seen = Vec::new();
        for ep in cluster.endpoints() {
            let ch = channel(&ep).await;
            let rev = KvClient::new(ch.clone())
                .range(RangeRequest {
                    key: b"\0".to_vec(),
                    serializable: true,
                    count_only: true,
                    ..Default::default()
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().header.map(|h| h.revision));
            let hash = match rev {
                Some(rev) => MaintenanceClient::new(ch)
                    .hash_kv(HashKvRequest { revision: rev })
                    .await
                    .ok()
                    .map(|r| r.into_inner().hash),
                None => None,
            };
            seen.push((rev, hash));
        }
        if seen.iter().all(|s| s.0.is_some() && *s == seen[0]) {
            return seen[0].0.unwrap_or(0);
        }
        assert!(
            Instant::now() < deadline,
            "members did not converge: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_survive_leader_kill_and_restart() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(240), async {
        let mut cluster = Cluster::start(3);
        wait_leader(&cluster, Duration::from_secs(20)).await;

        // A write through every member lands once, at consecutive revisions.
        let mut revs = Vec::new();
        for i in 0..3 {
            let mut kv = KvClient::new(channel(&cluster.endpoint(i)).await);
            let resp = kv
                .put(PutRequest {
                    key: format!("via/{i}").into_bytes(),
                    value: b"x".to_vec(),
                    ..Default::default()
                })
                .await
                .expect("put through a member")
                .into_inner();
            revs.push(resp.header.unwrap().revision);
        }
        assert_eq!(revs, vec![2, 3, 4]);

        // A burst from 12 writers spread over all members; kill the leader in the middle.
        let acked: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let endpoints = cluster.endpoints();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..12usize {
            let endpoints = endpoints.clone();
            let acked = acked.clone();
            let stop = stop.clone();
            writers.push(tokio::spawn(async move {
                let mut target = w % endpoints.len();
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut kv = KvClient::new(channel(&endpoints[target]).await);
                    let key = format!("burst/w{w:02}/{i:06}").into_bytes();
                    let value = format!("{w}-{i}").into_bytes();
                    match kv
                        .put(PutRequest {
                            key: key.clone(),
                            value: value.clone(),
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(resp) => {
                            let rev = resp.into_inner().header.map_or(0, |h| h.revision);
                            acked.lock().unwrap().push((key, value, rev));
                            i += 1;
                        }
                        // Unknown outcome or dead member: try the next member with a new key.
                        Err(_) => {
                            target = (target + 1) % endpoints.len();
                            i += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        let old_leader = wait_leader(&cluster, Duration::from_secs(5)).await;
        let before_kill = acked.lock().unwrap().len();
        cluster.kill(old_leader);
        let killed_at = Instant::now();
        let new_leader = wait_leader(&cluster, Duration::from_secs(20)).await;
        assert_ne!(new_leader, old_leader);
        eprintln!(
            "new leader elected {:?} after the kill",
            killed_at.elapsed()
        );
        // Writes resume.
        let resume_deadline = Instant::now() + Duration::from_secs(20);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if acked.lock().unwrap().len() > before_kill + 50 {
                break;
            }
            assert!(
                Instant::now() < resume_deadline,
                "writes did not resume after the leader died"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }

        // The killed member restarts and catches up.
        cluster.start_member(old_leader);
        let converged = wait_converged(&cluster, Duration::from_secs(30)).await;

        // Every acknowledged write is on every member, at the revision it was given.
        let all = acked.lock().unwrap().clone();
        let mut revs: Vec<i64> = all.iter().map(|a| a.2).collect();
        revs.sort_unstable();
        revs.dedup();
        assert_eq!(
            revs.len(),
            all.len(),
            "two acknowledged puts share a revision"
        );
        assert!(converged >= *revs.last().unwrap());
        for ep in cluster.endpoints() {
            let mut kv = KvClient::new(channel(&ep).await);
            let resp = kv
                .range(RangeRequest {
                    key: b"burst/".to_vec(),
                    range_end: b"burst0".to_vec(),
                    serializable: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let have: std::collections::HashMap<Vec<u8>, (Vec<u8>, i64)> = resp
                .kvs
                .into_iter()
                .map(|kv| (kv.key.to_vec(), (kv.value.to_vec(), kv.mod_revision)))
                .collect();
            for (key, value, rev) in &all {
                assert_eq!(
                    have.get(key),
                    Some(&(value.clone(), *rev)),
                    "member {ep} lacks acknowledged {:?}",
                    String::from_utf8_lossy(key)
                );
            }
        }
        eprintln!(
            "{} acknowledged writes on all 3 members, revision {converged}",
            all.len()
        );
    })
    .await
    .expect("test timed out");
}

async fn put(endpoint: &str, key: &str, value: &str) -> Result<i64, tonic::Status> {
    let mut kv = KvClient::new(channel(endpoint).await);
    kv.put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().header.map_or(0, |h| h.revision))
}

async fn count(endpoint: &str, prefix: &str, serializable: bool) -> Result<i64, tonic::Status> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let mut kv = KvClient::new(channel(endpoint).await);
    kv.range(RangeRequest {
        key: prefix.as_bytes().to_vec(),
        range_end: end,
        count_only: true,
        serializable,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_down_past_the_purged_log_rejoins_by_snapshot() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(180), async {
        let mut cluster = Cluster::start_with(3, &["--snapshot-count", "100"]);
        let leader = wait_leader(&cluster, Duration::from_secs(20)).await;
        let down = (leader + 1) % 3;
        cluster.kill(down);
        let ep = cluster.endpoint(leader);
        // 4 KiB values: the snapshot (about 2.5 MB) travels in several stream messages.
        let value = "v".repeat(4096);
        // The leader purges only while no replication to the down member is in flight, so
        // how soon it does depends on timing: write until it has.
        let mut written = 0;
        while written < 600
            || !cluster.members[leader]
                .proc
                .as_ref()
                .unwrap()
                .log_text()
                .contains("raft: log purged")
        {
            assert!(written < 5000, "the leader never purged its log");
            for _ in 0..100 {
                put(&ep, &format!("snap/{written:04}"), &value)
                    .await
                    .expect("put with one member down");
                written += 1;
            }
        }
        cluster.start_member(down);
        wait_converged(&cluster, Duration::from_secs(60)).await;
        assert_eq!(
            count(&cluster.endpoint(down), "snap/", true).await.unwrap(),
            written
        );
        let log = cluster.members[down].proc.as_ref().unwrap().log_text();
        assert!(
            log.contains("installing snapshot"),
            "the member should have caught up by snapshot:\n{log}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_is_replaced_and_rejoins_without_divergence() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(180), async {
        let cluster = Cluster::start(3);
        let old = wait_leader(&cluster, Duration::from_secs(20)).await;
        put(&cluster.endpoint(old), "before", "1").await.unwrap();
        cluster.isolate(old);
        let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
        let new = wait_leader_among(&cluster, &others, Duration::from_secs(20)).await;
        // The majority serves writes and linearizable reads.
        for i in 0..20 {
            put(
                &cluster.endpoint(others[i % 2]),
                &format!("during/{i:02}"),
                "x",
            )
            .await
            .unwrap();
        }
        assert_eq!(
            count(&cluster.endpoint(new), "during/", false)
                .await
                .unwrap(),
            20
        );
        // The old leader can no longer serve linearizable reads or commit writes.
        let stale_read = count(&cluster.endpoint(old), "during/", false).await;
        assert!(
            stale_read.is_err(),
            "isolated member answered a linearizable read: {stale_read:?}"
        );
        let stale_write = put(&cluster.endpoint(old), "lost-or-not", "?").await;
        assert!(stale_write.is_err(), "isolated member acknowledged a write");
        cluster.heal(old);
        wait_converged(&cluster, Duration::from_secs(30)).await;
        for ep in cluster.endpoints() {
            assert_eq!(count(&ep, "during/", true).await.unwrap(), 20, "{ep}");
            assert_eq!(count(&ep, "before", true).await.unwrap(), 1, "{ep}");
        }
        // The unacknowledged write is on every member or on none.
        let mut seen = Vec::new();
        for ep in cluster.endpoints() {
            seen.push(count(&ep, "lost-or-not", true).await.unwrap());
        }
        assert!(seen.iter().all(|c| *c == seen[0]), "divergence: {seen:?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_while_writing() {
    use kv_core::proto::etcdserverpb::{
        MemberAddRequest, MemberListRequest, MemberPromoteRequest, MemberRemoveRequest,
        cluster_client::ClusterClient,
    };
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(180), async {
        let mut cluster = Cluster::start(3);
        let leader = wait_leader(&cluster, Duration::from_secs(20)).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<String>>> = Arc::default();
        let writer = {
            let endpoints = cluster.endpoints();
            let stop = stop.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("member-writes/{i:05}");
                    if put(&endpoints[i % endpoints.len()], &key, "v")
                        .await
                        .is_ok()
                    {
                        acked.lock().unwrap().push(key);
                    }
                    i += 1;
                }
            })
        };
        let ep = cluster.endpoint(leader);
        let mut cl = ClusterClient::new(channel(&ep).await);
        // Add a learner and start it.
        let (joiner, url) = cluster.prepare_joiner("m3");
        let added = cl
            .member_add(MemberAddRequest {
                peer_ur_ls: vec![url.clone()],
                is_learner: true,
            })
            .await
            .expect("member add")
            .into_inner();
        let new_id = added.member.unwrap().id;
        let dup = cl
            .member_add(MemberAddRequest {
                peer_ur_ls: vec![url],
                is_learner: false,
            })
            .await
            .unwrap_err();
        assert_eq!(dup.message(), "etcdserver: Peer URLs already exists");
        cluster.start_member(joiner);
        // Promote once it has caught up.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match cl.member_promote(MemberPromoteRequest { id: new_id }).await {
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(
                        e.message(),
                        "etcdserver: can only promote a learner member which is in sync with leader"
                    );
                    assert!(Instant::now() < deadline, "learner never caught up");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let again = cl
            .member_promote(MemberPromoteRequest { id: new_id })
            .await
            .unwrap_err();
        assert_eq!(
            again.message(),
            "etcdserver: can only promote a learner member"
        );
        // Remove a voter that is not the leader.
        let victim = (leader + 1) % 3;
        let list = cl
            .member_list(MemberListRequest { linearizable: true })
            .await
            .unwrap()
            .into_inner();
        let victim_id = list
            .members
            .iter()
            .find(|m| m.name == cluster.members[victim].name)
            .expect("victim listed")
            .id;
        cl.member_remove(MemberRemoveRequest { id: victim_id })
            .await
            .expect("member remove");
        let missing = cl
            .member_remove(MemberRemoveRequest { id: victim_id })
            .await
            .unwrap_err();
        assert_eq!(missing.message(), "etcdserver: member not found");
        cluster.kill(victim);
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.await.unwrap();

        // Every member left agrees on the membership, with the new member a voter.
        wait_converged(&cluster, Duration::from_secs(30)).await;
        for ep in cluster.endpoints() {
            let mut cl = ClusterClient::new(channel(&ep).await);
            let list = cl
                .member_list(MemberListRequest {
                    linearizable: false,
                })
                .await
                .unwrap()
                .into_inner();
            let mut names: Vec<(String, bool)> = list
                .members
                .iter()
                .map(|m| (m.name.clone(), m.is_learner))
                .collect();
            names.sort();
            let mut want: Vec<(String, bool)> = (0..3)
                .filter(|&i| i != victim)
                .map(|i| (cluster.members[i].name.clone(), false))
                .chain([("m3".to_string(), false)])
                .collect();
            want.sort();
            assert_eq!(names, want, "member list on {ep}");
            let status = MaintenanceClient::new(channel(&ep).await)
                .status(StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            assert!(!status.is_learner);
        }
        let n = acked.lock().unwrap().len() as i64;
        assert!(n > 0);
        for ep in cluster.endpoints() {
            assert!(
                count(&ep, "member-writes/", true).await.unwrap() >= n,
                "{ep}"
            );
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_partitioned_follower_does_not_depose_the_leader() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let cluster = Cluster::start(3);
        let leader = wait_leader(&cluster, Duration::from_secs(20)).await;
        let term = |s: &kv_core::proto::etcdserverpb::StatusResponse| s.raft_term;
        let status = |i: usize| {
            let ep = cluster.endpoint(i);
            async move {
                MaintenanceClient::new(channel(&ep).await)
                    .status(StatusRequest {})
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
        let follower = (leader + 1) % 3;
        // Let the follower hear from the leader first, so it holds the current term.
        put(&cluster.endpoint(leader), "warm-up", "x")
            .await
            .unwrap();
        wait_converged(&cluster, Duration::from_secs(20)).await;
        let before = term(&status(follower).await);
        assert_eq!(before, term(&status(leader).await));
        cluster.isolate(follower);
        // Several election timeouts pass while it is cut off.
        tokio::time::sleep(Duration::from_secs(4)).await;
        // Pre-vote: a cut-off member cannot win a pre-vote, so it never raises its term, and
        // when it returns it has nothing with which to depose the healthy leader. (Without
        // pre-vote its term grows with every election timeout.)
        let isolated_term = term(&status(follower).await);
        assert_eq!(
            isolated_term, before,
            "the cut-off member campaigned with real votes"
        );
        put(&cluster.endpoint(leader), "while-cut-off", "x")
            .await
            .unwrap();
        cluster.heal(follower);
        wait_converged(&cluster, Duration::from_secs(20)).await;
        assert_eq!(
            count(&cluster.endpoint(follower), "while-cut-off", true)
                .await
                .unwrap(),
            1
        );
    })
    .await
    .expect("test timed out");
}

/// A txn whose compare fails and whose failure branch only reads (a lost compare-and-swap, a
/// lock key somebody else holds) is served as a linearizable read: it adds no log entry, and
/// a follower's answer still shows every write acknowledged before it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_compare_is_a_read_without_a_log_entry() {
    use kv_core::proto::etcdserverpb::{
        Compare, MemberListRequest, RequestOp, TxnRequest,
        cluster_client::ClusterClient,
        compare::{CompareResult, CompareTarget, TargetUnion},
        request_op::Request,
        response_op::Response,
    };
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let cluster = Cluster::start(3);
        let leader = wait_leader(&cluster, Duration::from_secs(20)).await;
        let follower = (leader + 1) % 3;
        let leader_ep = cluster.endpoint(leader);
        let mut via_follower = KvClient::new(channel(&cluster.endpoint(follower)).await);
        let mut status = MaintenanceClient::new(channel(&leader_ep).await);
        let cas = |expected: &str, new: &str| TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Value as i32,
                key: b"cas".to_vec(),
                target_union: Some(TargetUnion::Value(expected.as_bytes().to_vec())),
                range_end: vec![],
            }],
            success: vec![RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: b"cas".to_vec(),
                    value: new.as_bytes().to_vec(),
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key: b"cas".to_vec(),
                    ..Default::default()
                })),
            }],
        };
        // A new cluster still writes entries of its own for a while: each member publishes
        // its attributes, and one whose first try failed tries again later. Wait until all
        // three are published, then until the log stands still.
        let mut members = ClusterClient::new(channel(&leader_ep).await);
        let published_by = Instant::now() + Duration::from_secs(30);
        loop {
            let list = members
                .member_list(MemberListRequest { linearizable: true })
                .await
                .unwrap()
                .into_inner()
                .members;
            if list.len() == 3 && list.iter().all(|m| !m.name.is_empty()) {
                break;
            }
            assert!(
                Instant::now() < published_by,
                "members never published their attributes: {list:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut last = status
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .raft_index;
        let quiet_by = Instant::now() + Duration::from_secs(15);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = status
                .status(StatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .raft_index;
            if now == last {
                break;
            }
            assert!(
                Instant::now() < quiet_by,
                "the new cluster's log kept growing"
            );
            last = now;
        }
        for i in 0..30 {
            let revision = put(&leader_ep, "cas", &i.to_string()).await.unwrap();
            let before = status.status(StatusRequest {}).await.unwrap().into_inner();
            let lost = via_follower
                .txn(cas("stale", "mine"))
                .await
                .unwrap()
                .into_inner();
            let after = status.status(StatusRequest {}).await.unwrap().into_inner();
            assert!(!lost.succeeded);
            assert!(lost.header.unwrap().revision >= revision);
            let Some(Response::ResponseRange(read)) = &lost.responses[0].response else {
                panic!("the failure branch's read is missing: {lost:?}");
            };
            assert_eq!(read.kvs[0].value, i.to_string().as_bytes(), "round {i}");
            assert_eq!(
                after.raft_index, before.raft_index,
                "round {i}: terms {} -> {}, leader {} -> {}",
                before.raft_term, after.raft_term, before.leader, after.leader
            );
        }
        // A compare that holds still writes, through the log.
        let before = status.status(StatusRequest {}).await.unwrap().into_inner();
        let won = via_follower
            .txn(cas("29", "mine"))
            .await
            .unwrap()
            .into_inner();
        let after = status.status(StatusRequest {}).await.unwrap().into_inner();
        assert!(won.succeeded);
        assert!(after.raft_index > before.raft_index);
    })
    .await
    .expect("test timed out");
}

/// Writes sent to the followers while the leader is killed all succeed, each applied once. A
/// write a follower had forwarded when the leader died has no answer coming: the follower
/// learns its fate from the log (applied under the old term, or provably never, once an entry
/// of a later term is applied) and proposes it again only in the second case, instead of
/// answering "request timed out" with the outcome unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_forwarded_when_the_leader_dies_are_resolved_not_left_unknown() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(200), async {
        let mut cluster = Cluster::start(3);
        for round in 0..2 {
            let leader = wait_leader(&cluster, Duration::from_secs(20)).await;
            let followers: Vec<String> = (0..3)
                .filter(|i| *i != leader)
                .map(|i| cluster.endpoint(i))
                .collect();
            let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
            let failed: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut writers = Vec::new();
            for w in 0..16usize {
                let endpoint = followers[w % followers.len()].clone();
                let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
                writers.push(tokio::spawn(async move {
                    let mut i = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let key = format!("fwd/{round}/w{w:02}/{i:06}");
                        match put(&endpoint, &key, "v").await {
                            Ok(rev) => acked.lock().unwrap().push((key, rev)),
                            Err(s) => failed
                                .lock()
                                .unwrap()
                                .push((key, format!("{:?}: {}", s.code(), s.message()))),
                        }
                        i += 1;
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before_kill = acked.lock().unwrap().len();
            cluster.kill(leader);
            let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
            wait_leader_among(&cluster, &others, Duration::from_secs(20)).await;
            // Writes go on under the new leader for a while.
            let resumed = Instant::now() + Duration::from_secs(20);
            while acked.lock().unwrap().len() < before_kill + 200 {
                assert!(Instant::now() < resumed, "writes did not resume");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for w in writers {
                w.await.unwrap();
            }
            let failed = failed.lock().unwrap().clone();
            assert!(
                failed.is_empty(),
                "round {round}: {} of the writes through live followers failed, first {:?}",
                failed.len(),
                &failed[..failed.len().min(5)]
            );
            cluster.start_member(leader);
            wait_converged(&cluster, Duration::from_secs(30)).await;
            // Each acknowledged write is there once: version 1, at the revision it was given.
            let mut kv = KvClient::new(channel(&cluster.endpoint(leader)).await);
            let got = kv
                .range(RangeRequest {
                    key: format!("fwd/{round}/").into_bytes(),
                    range_end: format!("fwd/{round}0").into_bytes(),
                    serializable: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let have: std::collections::HashMap<String, (i64, i64)> = got
                .kvs
                .iter()
                .map(|kv| {
                    let key = String::from_utf8_lossy(&kv.key).into_owned();
                    (key, (kv.mod_revision, kv.version))
                })
                .collect();
            let acked = acked.lock().unwrap().clone();
            assert_eq!(
                have.len(),
                acked.len(),
                "round {round}: keys beyond the acked"
            );
            for (key, rev) in &acked {
                assert_eq!(have.get(key), Some(&(*rev, 1)), "round {round}: {key}");
            }
            eprintln!(
                "round {round}: {} writes through followers across the leader's death, all \
                 acknowledged once",
                acked.len()
            );
        }
    })
    .await
    .expect("test timed out");
}

/// Each member's database file has a size of its own, so the quota is checked where a write
/// is proposed and the NOSPACE alarm raised through Raft, as etcd does. Checked when applying,
/// a member past its quota refused writes the others applied, and their data parted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_past_its_quota_refuses_writes_without_parting_from_the_others() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(150), async {
        let mut cluster = Cluster::start(3);
        wait_leader(&cluster, Duration::from_secs(20)).await;
        // Member 2 alone gets a quota far below an empty store's size.
        cluster.kill(2);
        cluster.members[2].extra = vec!["--quota-backend-bytes".into(), "4096".into()];
        cluster.start_member(2);
        let (under, over) = (cluster.endpoint(0), cluster.endpoint(2));

        // Proposed by a member within its quota: applied by every member alike.
        put(&under, "within", "v")
            .await
            .expect("member 0 is within its quota");
        let converged = wait_converged(&cluster, Duration::from_secs(30)).await;
        assert_eq!(count(&over, "within", true).await.unwrap(), 1);

        // Through the member past its quota: refused, and the alarm raised for all.
        let refused = put(&over, "past", "v").await.unwrap_err();
        assert_eq!(
            refused.message(),
            "etcdserver: mvcc: database space exceeded"
        );
        let status = MaintenanceClient::new(channel(&over).await)
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let past_id = status.header.unwrap().member_id;
        let alarms = MaintenanceClient::new(channel(&under).await)
            .alarm(AlarmRequest {
                action: AlarmAction::Get as i32,
                member_id: 0,
                alarm: AlarmType::None as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .alarms;
        assert_eq!(alarms.len(), 1, "{alarms:?}");
        assert_eq!(
            (alarms[0].member_id, alarms[0].alarm),
            (past_id, AlarmType::Nospace as i32)
        );
        // Then every member refuses writes, and all still agree.
        let refused = put(&under, "after", "v").await.unwrap_err();
        assert_eq!(
            refused.message(),
            "etcdserver: mvcc: database space exceeded"
        );
        let now = wait_converged(&cluster, Duration::from_secs(30)).await;
        assert_eq!(now, converged, "no write took effect after the alarm");
    })
    .await
    .expect("test timed out");
}
