//! The Lock and Election services against etcd 3.4's wire behaviour: key layout, waiting and
//! handover, cancelled waits, the observe sequence, and the exact codes and messages of the
//! errors (all code Unknown, since etcd serves both services over an in-process client).
//!
//! Every scenario is a function over an endpoint, run against etcd 3.4 (which proves the
//! scenario's own expectations) and against kv-server; the handover scenarios also run on a
//! follower of three kv-server members. Clients are raw tonic clients, as a client in any
//! language would use the services.

use std::fmt::Debug;
use std::time::Duration;

use kv_core::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, RangeRequest, ResponseHeader,
    kv_client::KvClient, lease_client::LeaseClient,
};
use kv_core::proto::mvccpb::KeyValue;
use kv_core::proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ResignRequest, election_client::ElectionClient,
};
use kv_core::proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, lock_client::LockClient};
use kv_tests::{Cluster, on_both_servers, start_kv_server, wait_leader_among};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long a call that should be answered at once may take.
const ANSWER: Duration = Duration::from_secs(5);

/// How long a call that must wait is watched for not answering.
const STILL_WAITING: Duration = Duration::from_millis(300);

/// A lease id nobody granted.
const UNKNOWN_LEASE: i64 = 0x1234_abcd;

/// TTL of the leases the scenarios grant: longer than any scenario.
const TTL: i64 = 60;

/// etcd's text for a lease that does not exist.
const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";

// ---- clients -----------------------------------------------------------------------------------

/// The clients of one endpoint. The channel has no request timeout, since Lock, Campaign and
/// Observe wait; each scenario is bounded as a whole instead.
#[derive(Clone)]
struct Clients {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    lock: LockClient<Channel>,
    election: ElectionClient<Channel>,
}

fn clients(endpoint: &str) -> Clients {
    let channel = Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint URL")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    Clients {
        kv: KvClient::new(channel.clone()),
        lease: LeaseClient::new(channel.clone()),
        lock: LockClient::new(channel.clone()),
        election: ElectionClient::new(channel),
    }
}

/// `call`'s answer, which must come within [`ANSWER`].
async fn soon<T>(what: &str, call: impl Future<Output = T>) -> T {
    tokio::time::timeout(ANSWER, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {ANSWER:?}"))
}

impl Clients {
    async fn grant(&mut self) -> i64 {
        soon(
            "grant",
            self.lease
                .lease_grant(LeaseGrantRequest { ttl: TTL, id: 0 }),
        )
        .await
        .expect("grant")
        .into_inner()
        .id
    }

    async fn revoke(&mut self, id: i64) {
        soon("revoke", self.lease.lease_revoke(LeaseRevokeRequest { id }))
            .await
            .expect("revoke");
    }

    /// The granted TTL of lease `id` (-1 if it does not exist).
    async fn granted_ttl(&mut self, id: i64) -> i64 {
        let req = LeaseTimeToLiveRequest { id, keys: false };
        let resp = soon("time-to-live", self.lease.lease_time_to_live(req))
            .await
            .expect("time-to-live")
            .into_inner();
        if resp.ttl == -1 { -1 } else { resp.granted_ttl }
    }

    async fn get(&mut self, key: &[u8]) -> Option<KeyValue> {
        let req = RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        };
        soon("get", self.kv.range(req))
            .await
            .expect("get")
            .into_inner()
            .kvs
            .into_iter()
            .next()
    }

    /// Waits until `key` is gone; panics after [`ANSWER`].
    async fn wait_gone(&mut self, key: &[u8]) {
        let deadline = tokio::time::Instant::now() + ANSWER;
        while self.get(key).await.is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} still present after {ANSWER:?}",
                String::from_utf8_lossy(key)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn lock(&mut self, name: &str, lease: i64) -> Result<LockResponse, Status> {
        let req = LockRequest {
            name: name.into(),
            lease,
        };
        soon("lock", self.lock.lock(req))
            .await
            .map(|r| r.into_inner())
    }

    /// Starts a Lock that may wait; its answer comes through the handle.
    fn lock_later(&self, name: &str, lease: i64) -> JoinHandle<Result<LockResponse, Status>> {
        let mut lock = self.lock.clone();
        let req = LockRequest {
            name: name.into(),
            lease,
        };
        tokio::spawn(async move { lock.lock(req).await.map(|r| r.into_inner()) })
    }

    async fn unlock(&mut self, key: &[u8]) -> Result<Option<ResponseHeader>, Status> {
        let req = UnlockRequest { key: key.to_vec() };
        soon("unlock", self.lock.unlock(req))
            .await
            .map(|r| r.into_inner().header)
    }

    fn campaign_later(
        &self,
        name: &str,
        lease: i64,
        value: &str,
    ) -> JoinHandle<Result<CampaignResponse, Status>> {
        let mut election = self.election.clone();
        let req = CampaignRequest {
            name: name.into(),
            lease,
            value: value.into(),
        };
        tokio::spawn(async move { election.campaign(req).await.map(|r| r.into_inner()) })
    }

    async fn campaign(
        &mut self,
        name: &str,
        lease: i64,
        value: &str,
    ) -> Result<CampaignResponse, Status> {
        soon("campaign", self.campaign_later(name, lease, value))
            .await
            .expect("campaign task")
    }

    async fn proclaim(&mut self, leader: Option<LeaderKey>, value: &str) -> Result<(), Status> {
        let req = ProclaimRequest {
            leader,
            value: value.into(),
        };
        let header = soon("proclaim", self.election.proclaim(req))
            .await?
            .into_inner()
            .header;
        check_header(&header);
        Ok(())
    }

    async fn leader(&mut self, name: &str) -> Result<LeaderResponse, Status> {
        let req = LeaderRequest { name: name.into() };
        soon("leader", self.election.leader(req))
            .await
            .map(|r| r.into_inner())
    }

    async fn resign(&mut self, leader: Option<LeaderKey>) -> Result<(), Status> {
        let header = soon("resign", self.election.resign(ResignRequest { leader }))
            .await?
            .into_inner()
            .header;
        check_header(&header);
        Ok(())
    }

    /// Observes election `name`: every message (or the error that ended the stream) arrives on
    /// the receiver. etcd sends the response headers with the first message, so the call
    /// itself waits too; it runs in a task, stopped by dropping the [`Observing`].
    fn observe(&self, name: &str) -> Observing {
        let mut election = self.election.clone();
        let req = LeaderRequest { name: name.into() };
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = match election.observe(req).await {
                Ok(r) => r.into_inner(),
                Err(e) => return drop(tx.send(Err(e))),
            };
            loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        if tx.send(Ok(m)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => return drop(tx.send(Err(e))),
                }
            }
        });
        Observing { rx, task }
    }
}

/// An Observe call in progress.
struct Observing {
    rx: mpsc::UnboundedReceiver<Result<LeaderResponse, Status>>,
    task: JoinHandle<()>,
}

impl Observing {
    /// The next message as (key, value, create revision), checking its header: at or after
    /// the key-value's revision.
    async fn next(&mut self) -> (String, String, i64) {
        let m = soon("observe", self.rx.recv())
            .await
            .expect("the observe stream is open")
            .expect("an observe message");
        let kv = m.kv.expect("observe message has a kv");
        assert!(check_header(&m.header) >= kv.mod_revision, "{kv:?}");
        (text(&kv.key), text(&kv.value), kv.create_revision)
    }

    /// Asserts that nothing arrives for a while.
    async fn quiet(&mut self) {
        if let Ok(m) = tokio::time::timeout(STILL_WAITING, self.rx.recv()).await {
            panic!("observe sent {m:?} while nothing changed");
        }
    }
}

impl Drop for Observing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks that a header is filled as etcd fills it; returns its revision.
fn check_header(header: &Option<ResponseHeader>) -> i64 {
    let h = header.as_ref().expect("a response header");
    assert!(
        h.cluster_id != 0 && h.member_id != 0 && h.revision > 0 && h.raft_term > 0,
        "{h:?}"
    );
    h.revision
}

/// Asserts that `result` failed with code Unknown and exactly `message`.
fn assert_unknown<T: Debug>(result: Result<T, Status>, message: &str) {
    match result {
        Err(s) => assert_eq!((s.code(), s.message()), (Code::Unknown, message), "{s:?}"),
        Ok(v) => panic!("expected the error {message:?}, got {v:?}"),
    }
}

/// Asserts that a spawned call is still waiting.
async fn assert_waiting<T: Debug>(call: &mut JoinHandle<T>) {
    if let Ok(done) = tokio::time::timeout(STILL_WAITING, &mut *call).await {
        panic!("the call should wait, but answered {done:?}");
    }
}

/// A spawned call's answer, which must come within [`ANSWER`].
async fn answer<T>(call: JoinHandle<T>) -> T {
    soon("waiting call", call).await.expect("call task")
}

// ---- Lock ----------------------------------------------------------------------------------

/// Lock answers with `<name>/<lease hex>` on the caller's lease, again at once for the same
/// lease, and Unlock deletes whatever key it is given.
async fn lock_round_trip(endpoint: &str) {
    let mut c = clients(endpoint);
    let lease = c.grant().await;
    let locked = c.lock("lk", lease).await.expect("lock");
    let key = format!("lk/{lease:x}");
    assert_eq!(text(&locked.key), key);
    let kv = c.get(key.as_bytes()).await.expect("the lock key exists");
    assert_eq!((kv.lease, kv.value.len()), (lease, 0), "{kv:?}");
    assert!(check_header(&locked.header) >= kv.create_revision);

    // The same lease holds it already: the same key, at once, untouched.
    let again = c.lock("lk", lease).await.expect("lock again");
    assert_eq!(text(&again.key), key);
    let kv2 = c.get(key.as_bytes()).await.expect("the lock key exists");
    assert_eq!(kv2.mod_revision, kv.mod_revision);

    let unlocked = c.unlock(key.as_bytes()).await.expect("unlock");
    check_header(&unlocked);
    assert!(c.get(key.as_bytes()).await.is_none());
    // Unlocking a key that is not there succeeds.
    check_header(&c.unlock(key.as_bytes()).await.expect("unlock again"));
    // The lease was left alone.
    assert_eq!(c.granted_ttl(lease).await, TTL);

    // No name: the prefix is "/".
    let unnamed = c.lock("", lease).await.expect("lock without a name");
    assert_eq!(text(&unnamed.key), format!("/{lease:x}"));
    c.unlock(&unnamed.key).await.expect("unlock");

    // Lease 0: a new lease of 60 s is granted for the lock and left to expire.
    let own = c.lock("lk", 0).await.expect("lock on lease 0");
    let kv = c.get(&own.key).await.expect("the lock key exists");
    assert_ne!(kv.lease, 0);
    assert_eq!(text(&own.key), format!("lk/{:x}", kv.lease));
    assert_eq!(c.granted_ttl(kv.lease).await, 60);
    c.revoke(kv.lease).await;
}

on_both_servers!(
    lock_round_trip,
    lock_round_trip_ours,
    lock_round_trip_etcd,
    30
);

/// A second lease waits until the holder unlocks, then holds with a later key; a waiter that
/// gives up (cancels its call) leaves no key behind.
async fn lock_waits_for_unlock(endpoint: &str) {
    let mut c = clients(endpoint);
    let (a, b, d) = (c.grant().await, c.grant().await, c.grant().await);
    let first = c.lock("queue", a).await.expect("lock a");
    let mut second = c.lock_later("queue", b);
    assert_waiting(&mut second).await;

    // A third waiter gives up: its call is dropped, its key deleted.
    let gave_up = tokio::time::timeout(
        STILL_WAITING,
        c.lock.clone().lock(LockRequest {
            name: "queue".into(),
            lease: d,
        }),
    )
    .await;
    assert!(gave_up.is_err(), "the third lock should wait: {gave_up:?}");
    c.wait_gone(format!("queue/{d:x}").as_bytes()).await;

    c.unlock(&first.key).await.expect("unlock a");
    let second = answer(second).await.expect("lock b");
    assert_eq!(text(&second.key), format!("queue/{b:x}"));
    let kv = c.get(&second.key).await.expect("b's key exists");
    assert!(check_header(&second.header) >= kv.create_revision);
    c.unlock(&second.key).await.expect("unlock b");
}

on_both_servers!(
    lock_waits_for_unlock,
    lock_waits_for_unlock_ours,
    lock_waits_for_unlock_etcd,
    30
);

/// Lock on a lease that does not exist, Unlock without a key.
async fn lock_errors(endpoint: &str) {
    let mut c = clients(endpoint);
    assert_unknown(c.lock("lk", UNKNOWN_LEASE).await, LEASE_NOT_FOUND);
    assert!(
        c.get(format!("lk/{UNKNOWN_LEASE:x}").as_bytes())
            .await
            .is_none()
    );
    assert_unknown(c.unlock(b"").await, "etcdserver: key is not provided");
}

on_both_servers!(lock_errors, lock_errors_ours, lock_errors_etcd, 30);

// ---- Election ------------------------------------------------------------------------------

/// A whole term of office, watched by an observer: campaign, leader, proclaim, a rival that
/// waits (and one that gives up), resign and the rival's election, re-campaigning with a new
/// value, stale leader keys, and an election left without a leader.
async fn election_sequence(endpoint: &str) {
    let mut c = clients(endpoint);
    let (a, b, d) = (c.grant().await, c.grant().await, c.grant().await);
    // Observing before anyone runs: the first message is the first leader.
    let mut observing = c.observe("el");
    observing.quiet().await;

    let won = c.campaign("el", a, "a1").await.expect("campaign a");
    let leader_a = won.leader.clone().expect("a leader key");
    let key_a = format!("el/{a:x}");
    assert_eq!(
        (text(&leader_a.name), text(&leader_a.key), leader_a.lease),
        ("el".to_string(), key_a.clone(), a)
    );
    let kv = c.get(key_a.as_bytes()).await.expect("a's key exists");
    assert_eq!((leader_a.rev, kv.lease), (kv.create_revision, a));
    assert!(check_header(&won.header) >= leader_a.rev);
    assert_eq!(
        observing.next().await,
        (key_a.clone(), "a1".into(), leader_a.rev)
    );

    let seen = c.leader("el").await.expect("leader");
    let kv = seen.kv.expect("the leader's kv");
    assert_eq!(
        (text(&kv.key), text(&kv.value)),
        (key_a.clone(), "a1".into())
    );
    assert!(check_header(&seen.header) >= kv.mod_revision);

    c.proclaim(Some(leader_a.clone()), "a2")
        .await
        .expect("proclaim");
    assert_eq!(
        observing.next().await,
        (key_a.clone(), "a2".into(), leader_a.rev)
    );

    // A rival waits; another gives up, which withdraws its candidacy.
    let mut rival = c.campaign_later("el", b, "b1");
    assert_waiting(&mut rival).await;
    let gave_up = tokio::time::timeout(
        STILL_WAITING,
        c.election.clone().campaign(CampaignRequest {
            name: "el".into(),
            lease: d,
            value: "d1".into(),
        }),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the third candidate should wait: {gave_up:?}"
    );
    c.wait_gone(format!("el/{d:x}").as_bytes()).await;
    let kv = c.leader("el").await.expect("leader").kv.expect("kv");
    assert_eq!(
        (text(&kv.key), text(&kv.value)),
        (key_a.clone(), "a2".into())
    );
    observing.quiet().await;

    c.resign(Some(leader_a.clone())).await.expect("resign a");
    let won = answer(rival).await.expect("campaign b");
    let leader_b = won.leader.clone().expect("b's leader key");
    let key_b = format!("el/{b:x}");
    assert_eq!((text(&leader_b.key), leader_b.lease), (key_b.clone(), b));
    assert!(leader_b.rev > leader_a.rev);
    assert_eq!(
        observing.next().await,
        (key_b.clone(), "b1".into(), leader_b.rev)
    );

    // Campaigning again on the same lease with a new value proclaims it.
    let again = c.campaign("el", b, "b2").await.expect("campaign b again");
    assert_eq!(again.leader.as_ref(), Some(&leader_b));
    assert_eq!(
        observing.next().await,
        (key_b.clone(), "b2".into(), leader_b.rev)
    );

    // a's leader key is stale now.
    assert_unknown(
        c.proclaim(Some(leader_a.clone()), "a3").await,
        "election: not leader",
    );
    c.resign(Some(leader_a.clone()))
        .await
        .expect("resigning a stale leadership succeeds");
    // So is a leader key whose revision is wrong.
    let wrong_rev = LeaderKey {
        rev: leader_b.rev + 1,
        ..leader_b.clone()
    };
    assert_unknown(
        c.proclaim(Some(wrong_rev.clone()), "b3").await,
        "election: not leader",
    );
    c.resign(Some(wrong_rev)).await.expect("resign, wrong rev");
    let kv = c.leader("el").await.expect("leader").kv.expect("kv");
    assert_eq!(
        (text(&kv.key), text(&kv.value)),
        (key_b.clone(), "b2".into())
    );
    observing.quiet().await;

    // Nobody leads once b resigns; the observer says nothing about it.
    c.resign(Some(leader_b)).await.expect("resign b");
    assert!(c.get(key_b.as_bytes()).await.is_none());
    assert_unknown(c.leader("el").await, "election: no leader");
    observing.quiet().await;

    // The next leader is observed.
    let won = c.campaign("el", a, "a4").await.expect("campaign a again");
    let leader = won.leader.expect("leader key");
    assert_eq!(observing.next().await, (key_a, "a4".into(), leader.rev));
}

on_both_servers!(
    election_sequence,
    election_sequence_ours,
    election_sequence_etcd,
    60
);

/// The errors of the Election service: no leader key, no leader, leases that do not exist.
async fn election_errors(endpoint: &str) {
    let mut c = clients(endpoint);
    const MISSING: &str = r#""leader" field must be provided"#;
    assert_unknown(c.proclaim(None, "v").await, MISSING);
    assert_unknown(c.resign(None).await, MISSING);
    assert_unknown(c.leader("nobody").await, "election: no leader");
    assert_unknown(c.campaign("el", UNKNOWN_LEASE, "v").await, LEASE_NOT_FOUND);
    assert!(
        c.get(format!("el/{UNKNOWN_LEASE:x}").as_bytes())
            .await
            .is_none()
    );

    // A leadership whose lease was revoked: its key went with it.
    let lease = c.grant().await;
    let won = c.campaign("gone", lease, "v").await.expect("campaign");
    let leader = won.leader.expect("leader key");
    c.revoke(lease).await;
    assert_unknown(c.leader("gone").await, "election: no leader");
    assert_unknown(
        c.proclaim(Some(leader.clone()), "w").await,
        "election: not leader",
    );
    c.resign(Some(leader))
        .await
        .expect("resign after the lease ended");

    // A live leader key named with a lease that does not exist: the write fails on the lease.
    // (Resigning it differs: etcd deletes the key without looking at the lease, kv-server
    // finds no session to resign with and leaves it; only a forged LeaderKey gets there.)
    let lease = c.grant().await;
    let won = c.campaign("forged", lease, "v").await.expect("campaign");
    let forged = LeaderKey {
        lease: UNKNOWN_LEASE,
        ..won.leader.expect("leader key")
    };
    assert_unknown(c.proclaim(Some(forged.clone()), "w").await, LEASE_NOT_FOUND);
    let kv = c.leader("forged").await.expect("leader").kv.expect("kv");
    assert_eq!(text(&kv.value), "v");
    c.resign(Some(forged))
        .await
        .expect("resign with a forged lease");
}

on_both_servers!(
    election_errors,
    election_errors_ours,
    election_errors_etcd,
    30
);

// ---- on a follower -------------------------------------------------------------------------

/// Lock handover and an election term through a follower of three kv-server members: the
/// services there run the recipes over the follower's own client port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_election_on_a_follower() {
    let cluster = Cluster::start(3);
    tokio::time::timeout(Duration::from_secs(90), async {
        let leader = wait_leader_among(&cluster, &[0, 1, 2], Duration::from_secs(20)).await;
        let follower = cluster.endpoint((leader + 1) % 3);
        lock_waits_for_unlock(&follower).await;
        election_sequence(&follower).await;
    })
    .await
    .expect("test timed out");
}

// ---- stopping ------------------------------------------------------------------------------

/// A member stops (SIGTERM) while a Lock waits and an Observe is open: a graceful stop waits
/// for open calls, and these keep the member's own watch and keep-alive streams open as well,
/// so they must end by themselves when the member stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_stops_while_lock_and_observe_wait() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_kv_server(&dir.path().join("data"), &[]);
    let waiting = tokio::time::timeout(Duration::from_secs(20), async {
        let mut c = clients(&server.endpoint);
        let (a, b) = (c.grant().await, c.grant().await);
        c.lock("held", a).await.expect("lock a");
        let mut lock = c.lock_later("held", b);
        assert_waiting(&mut lock).await;
        c.campaign("el", a, "v").await.expect("campaign");
        let mut observing = c.observe("el");
        observing.next().await;
        (lock, observing)
    })
    .await
    .expect("test timed out");
    let (lock, mut observing) = waiting;
    kv_tests::assert_stops_on_sigterm(server, Duration::from_secs(10)).await;
    let ended = tokio::time::timeout(ANSWER, lock)
        .await
        .expect("the waiting lock ended")
        .expect("lock task");
    assert!(ended.is_err(), "{ended:?}");
    let end = tokio::time::timeout(ANSWER, observing.rx.recv())
        .await
        .expect("the observe stream ended");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
}
