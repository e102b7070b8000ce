//! The Lease service against etcd 3.4's semantics: grant, attach and detach, revoke in one
//! revision, keep-alive, time-to-live and list; expiry on time on one and on three members;
//! kept-alive leases through a leader kill; leases and attachments across a restart; and an
//! etcdctl session whose output must equal etcd's.
//!
//! Every scenario etcd can run is a function over endpoints, run against etcd 3.4 (which proves
//! the scenario's own logic and bounds) and against kv-server. Both start with default timing
//! flags (100 ms heartbeat, 1 s election timeout), so the minimum TTL is 2 s on both.
//!
//! Expiry bounds are checked from what a client can know: a lease's deadline is set when the
//! grant (or renewal) is applied, which is after the request was sent and before the answer
//! arrived. So keys must still be there for every read answered before `request sent + TTL`,
//! and no read sent after `answer received + TTL + EXPIRY_SLACK` may still see them.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kv_core::proto::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse, PutRequest, RangeRequest, RequestOp, TxnRequest, kv_client::KvClient,
    lease_client::LeaseClient, request_op::Request,
};
use kv_core::proto::mvccpb::KeyValue;
use kv_tests::{
    Cluster, EtcdCluster, Members, Proc, etcdctl, have_etcdctl, start_etcd, start_kv_server,
    wait_leader_among,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

/// The smallest TTL a lease gets with the default 1 s election timeout: etcd raises shorter
/// TTLs to ceil(1.5 * election timeout).
const MIN_TTL: i64 = 2;

/// etcd's `MaxLeaseTTL`, in seconds.
const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// How late after its deadline a lease's keys may still be readable. etcd checks deadlines
/// every 500 ms and then commits the revoke through Raft.
const EXPIRY_SLACK: Duration = Duration::from_secs(1);

/// Pause between two reads of a polling loop.
const POLL: Duration = Duration::from_millis(50);

/// The default election timeout of both servers.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(1);

/// A lease id nobody granted.
const UNKNOWN_LEASE: i64 = 0x1234_abcd;

/// Cluster tests of this file run one at a time: several three-member clusters at once on a
/// 2-core CI machine would starve heartbeats and lease timing alike.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).expect("a positive TTL"))
}

// ---- clients -------------------------------------------------------------------------------

/// The KV and Lease clients of one endpoint.
#[derive(Clone)]
struct Client {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
}

fn client(endpoint: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint URL")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    Client {
        kv: KvClient::new(channel.clone()),
        lease: LeaseClient::new(channel),
    }
}

impl Client {
    async fn grant(&mut self, ttl: i64, id: i64) -> Result<LeaseGrantResponse, Status> {
        self.lease
            .lease_grant(LeaseGrantRequest { ttl, id })
            .await
            .map(|r| r.into_inner())
    }

    /// Grants and returns the id, panicking on an error.
    async fn grant_ok(&mut self, ttl: i64, id: i64) -> i64 {
        let resp = self
            .grant(ttl, id)
            .await
            .unwrap_or_else(|e| panic!("grant ttl={ttl} id={id:#x}: {e:?}"));
        assert_eq!(resp.error, "", "{resp:?}");
        resp.id
    }

    async fn revoke(&mut self, id: i64) -> Result<i64, Status> {
        self.lease
            .lease_revoke(LeaseRevokeRequest { id })
            .await
            .map(|r| r.into_inner().header.map_or(0, |h| h.revision))
    }

    async fn time_to_live(&mut self, id: i64, keys: bool) -> LeaseTimeToLiveResponse {
        self.lease
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys })
            .await
            .unwrap_or_else(|e| panic!("time-to-live of {id:#x}: {e:?}"))
            .into_inner()
    }

    /// Every lease id, sorted.
    async fn leases(&mut self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .lease
            .lease_leases(LeaseLeasesRequest {})
            .await
            .expect("lease list")
            .into_inner()
            .leases
            .iter()
            .map(|l| l.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    async fn put_req(&mut self, req: PutRequest) -> Result<i64, Status> {
        self.kv
            .put(req)
            .await
            .map(|r| r.into_inner().header.map_or(0, |h| h.revision))
    }

    /// Puts `key` with `lease` (0: none); returns the revision.
    async fn put(&mut self, key: &str, value: &str, lease: i64) -> Result<i64, Status> {
        self.put_req(PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..Default::default()
        })
        .await
    }

    async fn put_ok(&mut self, key: &str, value: &str, lease: i64) -> i64 {
        self.put(key, value, lease)
            .await
            .unwrap_or_else(|e| panic!("put {key} with lease {lease:#x}: {e:?}"))
    }

    /// The key (linearizable read), if present.
    async fn get(&mut self, key: &str) -> Option<KeyValue> {
        self.get_at(key, 0).await
    }

    async fn get_at(&mut self, key: &str, revision: i64) -> Option<KeyValue> {
        let resp = self
            .kv
            .range(RangeRequest {
                key: key.into(),
                revision,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e:?}"))
            .into_inner();
        resp.kvs.into_iter().next()
    }

    /// (number of keys under `prefix`, header revision).
    async fn count(&mut self, prefix: &str, serializable: bool) -> Result<(i64, i64), Status> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        self.kv
            .range(RangeRequest {
                key: prefix.into(),
                range_end: end,
                count_only: true,
                serializable,
                ..Default::default()
            })
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.count, r.header.map_or(0, |h| h.revision))
            })
    }

    /// The current store revision (linearizable).
    async fn revision(&mut self) -> i64 {
        self.count("\0", false).await.expect("read the revision").1
    }
}

fn assert_status<T: Debug>(got: Result<T, Status>, code: Code, message: &str, what: &str) {
    match got {
        Err(s) => assert_eq!(
            (s.code(), s.message()),
            (code, message),
            "{what}: wrong error"
        ),
        Ok(v) => panic!("{what}: expected {code:?} {message:?}, got {v:?}"),
    }
}

fn text_keys(resp: &LeaseTimeToLiveResponse) -> Vec<String> {
    // etcd lists a lease's keys from a Go map: in no particular order.
    let mut keys: Vec<String> = resp
        .keys
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    keys.sort();
    keys
}

/// One LeaseKeepAlive stream. Requests are queued without bound, so requests can be queued
/// before the call: etcd sends the response headers only with its first response.
struct KeepAlive {
    tx: mpsc::UnboundedSender<LeaseKeepAliveRequest>,
    rx: Streaming<LeaseKeepAliveResponse>,
}

impl KeepAlive {
    /// Opens a stream whose first requests renew `first`.
    async fn open(c: &mut Client, first: &[i64]) -> Result<KeepAlive, Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        for &id in first {
            let _ = tx.send(LeaseKeepAliveRequest { id });
        }
        let rx = c
            .lease
            .lease_keep_alive(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(KeepAlive { tx, rx })
    }

    fn send(&self, id: i64) {
        self.tx
            .send(LeaseKeepAliveRequest { id })
            .expect("the request stream is open while `self` lives");
    }

    /// The next response, failing when the stream errs, ends, or is silent for `within`.
    async fn next(&mut self, within: Duration) -> Result<LeaseKeepAliveResponse, String> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Ok(Ok(Some(resp))) => Ok(resp),
            Ok(Ok(None)) => Err("the keep-alive stream ended".into()),
            Ok(Err(e)) => Err(format!("the keep-alive stream failed: {e:?}")),
            Err(_) => Err(format!("no keep-alive response within {within:?}")),
        }
    }
}

// ---- Lease API semantics (one member) ---------------------------------------------------------

/// Grant, attach, detach, revoke, keep-alive, time-to-live and list on a fresh one-member
/// store at revision 1, checked against etcd 3.4's answers.
async fn lease_api_semantics(endpoint: &str) {
    let mut c = client(endpoint);

    // Grant: a server-chosen id for id 0, the client's id otherwise; grants write no revision.
    let resp = c.grant(30, 0).await.expect("grant with id 0");
    assert!(resp.id > 0, "server-chosen id {resp:?}");
    assert_eq!((resp.ttl, resp.error.as_str()), (30, ""));
    assert_eq!(resp.header.expect("grant header").revision, 1);
    let chosen = resp.id;
    let mine = 0x7e57_0001;
    let resp = c.grant(60, mine).await.expect("grant with an id");
    assert_eq!((resp.id, resp.ttl), (mine, 60));
    assert_status(
        c.grant(10, mine).await,
        Code::FailedPrecondition,
        "etcdserver: lease already exists",
        "grant of a taken id",
    );
    assert_status(
        c.grant(MAX_LEASE_TTL + 1, 0).await,
        Code::OutOfRange,
        "etcdserver: too large lease TTL",
        "grant above the maximum TTL",
    );
    let max = c.grant_ok(MAX_LEASE_TTL, 0).await;
    assert_eq!(c.time_to_live(max, false).await.granted_ttl, MAX_LEASE_TTL);
    // A TTL below the minimum is raised to it, in the answer and in the lease.
    let short = c.grant(1, 0).await.expect("grant ttl 1");
    assert_eq!(short.ttl, MIN_TTL, "{short:?}");
    let ttl = c.time_to_live(short.id, false).await;
    assert_eq!(ttl.granted_ttl, MIN_TTL, "{ttl:?}");
    assert!(ttl.ttl > 0 && ttl.ttl <= MIN_TTL, "{ttl:?}");
    let zero = c.grant(0, 0).await.expect("grant ttl 0");
    assert_eq!(zero.ttl, MIN_TTL, "{zero:?}");
    for id in [max, short.id, zero.id] {
        c.revoke(id).await.expect("revoke");
    }

    // Attach: a put with a lease; TimeToLive lists the key.
    assert_eq!(c.put_ok("a", "1", mine).await, 2);
    assert_eq!(c.put_ok("b", "1", mine).await, 3);
    assert_eq!(c.get("a").await.expect("a").lease, mine);
    let ttl = c.time_to_live(mine, true).await;
    assert_eq!((ttl.id, ttl.granted_ttl), (mine, 60), "{ttl:?}");
    assert!(ttl.ttl > 55 && ttl.ttl <= 60, "{ttl:?}");
    assert_eq!(text_keys(&ttl), ["a", "b"]);
    // Without `keys` no keys are listed.
    assert!(c.time_to_live(mine, false).await.keys.is_empty());
    // ignore_lease keeps the key's lease.
    c.put_req(PutRequest {
        key: "a".into(),
        value: "2".into(),
        ignore_lease: true,
        ..Default::default()
    })
    .await
    .expect("put with ignore_lease");
    let a = c.get("a").await.expect("a");
    assert_eq!((a.lease, &a.value[..]), (mine, &b"2"[..]));
    // A put without a lease detaches.
    assert_eq!(c.put_ok("b", "2", 0).await, 5);
    assert_eq!(c.get("b").await.expect("b").lease, 0);
    assert_eq!(text_keys(&c.time_to_live(mine, true).await), ["a"]);
    // A put with another lease moves the key.
    c.put_ok("moved", "1", mine).await;
    c.put_ok("moved", "2", chosen).await;
    assert_eq!(text_keys(&c.time_to_live(mine, true).await), ["a"]);
    assert_eq!(text_keys(&c.time_to_live(chosen, true).await), ["moved"]);
    // Deleting a key detaches it.
    c.put_ok("gone", "1", mine).await;
    assert_eq!(text_keys(&c.time_to_live(mine, true).await), ["a", "gone"]);
    c.kv.delete_range(DeleteRangeRequest {
        key: "gone".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    assert_eq!(text_keys(&c.time_to_live(mine, true).await), ["a"]);
    // A txn put attaches too.
    let put_op = |key: &str, lease: i64| RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.into(),
            value: b"t".to_vec(),
            lease,
            ..Default::default()
        })),
    };
    let txn = |ops: Vec<RequestOp>| TxnRequest {
        compare: Vec::<Compare>::new(),
        success: ops,
        failure: vec![],
    };
    c.kv.txn(txn(vec![put_op("t1", mine), put_op("t2", mine)]))
        .await
        .expect("txn with lease puts");
    assert_eq!(
        text_keys(&c.time_to_live(mine, true).await),
        ["a", "t1", "t2"]
    );

    // An unknown lease: puts and txn puts fail and write nothing.
    let before = c.revision().await;
    assert_status(
        c.put("x", "1", UNKNOWN_LEASE).await,
        Code::NotFound,
        "etcdserver: requested lease not found",
        "put with an unknown lease",
    );
    assert_status(
        c.kv.txn(txn(vec![put_op("x", 0), put_op("y", UNKNOWN_LEASE)]))
            .await,
        Code::NotFound,
        "etcdserver: requested lease not found",
        "txn put with an unknown lease",
    );
    assert_eq!(c.revision().await, before);
    assert!(c.get("x").await.is_none());

    // KeepAlive: one stream renews several leases and answers an unknown one with TTL 0.
    let mut stream = KeepAlive::open(&mut c, &[mine]).await.expect("keep-alive");
    stream.send(UNKNOWN_LEASE);
    stream.send(chosen);
    let mut got = Vec::new();
    for _ in 0..3 {
        let r = stream
            .next(Duration::from_secs(5))
            .await
            .expect("keep-alive response");
        assert!(r.header.is_some(), "{r:?}");
        got.push((r.id, r.ttl));
    }
    assert_eq!(got, [(mine, 60), (UNKNOWN_LEASE, 0), (chosen, 30)]);
    drop(stream);

    // TimeToLive of an unknown lease: TTL -1, not an error.
    let ttl = c.time_to_live(UNKNOWN_LEASE, true).await;
    assert_eq!(
        (ttl.id, ttl.ttl, ttl.granted_ttl, ttl.keys.len()),
        (UNKNOWN_LEASE, -1, 0, 0),
        "{ttl:?}"
    );

    // LeaseLeases lists exactly the live leases.
    let mut want = vec![chosen, mine];
    want.sort_unstable();
    assert_eq!(c.leases().await, want);

    // Revoke deletes every attached key in one revision; detached keys stay.
    let before = c.revision().await;
    let rev = c.revoke(mine).await.expect("revoke");
    assert_eq!(rev, before + 1, "a revoke is one revision");
    assert_eq!(c.revision().await, before + 1);
    for key in ["a", "t1", "t2"] {
        assert!(c.get(key).await.is_none(), "{key} survived the revoke");
        let old = c.get_at(key, before).await;
        assert_eq!(old.map(|kv| kv.lease), Some(mine), "{key} at {before}");
    }
    assert!(c.get("b").await.is_some(), "the detached key was deleted");
    assert!(c.get("moved").await.is_some(), "the moved key was deleted");
    assert_eq!(c.time_to_live(mine, false).await.ttl, -1);
    assert_status(
        c.revoke(mine).await,
        Code::NotFound,
        "etcdserver: requested lease not found",
        "second revoke",
    );
    assert_status(
        c.revoke(UNKNOWN_LEASE).await,
        Code::NotFound,
        "etcdserver: requested lease not found",
        "revoke of an unknown lease",
    );
    assert_eq!(c.revision().await, before + 1);
    assert_eq!(c.leases().await, [chosen]);
    // A lease without keys revokes without a revision.
    let empty = c.grant_ok(30, 0).await;
    assert_eq!(c.revoke(empty).await.expect("revoke"), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_api_matches_etcd_semantics_on_etcd() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let etcd = match start_etcd(&dir.path().join("etcd")) {
            Ok(p) => p,
            Err(why) => return eprintln!("SKIP lease_api_matches_etcd_semantics_on_etcd: {why}"),
        };
        lease_api_semantics(&etcd.endpoint).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_api_matches_etcd_semantics() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let server = start_kv_server(&dir.path().join("data"), &[]);
        lease_api_semantics(&server.endpoint).await;
    })
    .await
    .expect("test timed out");
}

// ---- expiry timing -----------------------------------------------------------------------------

/// What a polling loop saw of keys going away.
struct Gone {
    /// When the first read that found some keys missing answered.
    first_loss_answered: Instant,
    /// When the last read that still found some keys was sent (None: no read found any).
    last_seen_sent: Option<Instant>,
}

/// Polls `prefix` with linearizable reads, round-robin over `endpoints`, until none of its
/// `all` keys is left. With `one_lease` every read must find all or none (a revoke is
/// atomic). Failed reads (no leader for a moment) are retried. Panics at `deadline`.
async fn wait_gone(
    endpoints: &[String],
    prefix: &str,
    all: i64,
    one_lease: bool,
    deadline: Instant,
) -> Gone {
    let mut clients: Vec<Client> = endpoints.iter().map(|e| client(e)).collect();
    let mut last_seen_sent = None;
    let mut first_loss_answered = None;
    for i in 0.. {
        let sent = Instant::now();
        let c = &mut clients[i % endpoints.len()];
        if let Ok((n, _)) = c.count(prefix, false).await {
            let answered = Instant::now();
            assert!(
                !one_lease || n == 0 || n == all,
                "{n} of {all} keys under {prefix}: a revoke is not atomic"
            );
            if n < all {
                first_loss_answered.get_or_insert(answered);
            }
            if n > 0 {
                last_seen_sent = Some(sent);
            } else {
                return Gone {
                    first_loss_answered: first_loss_answered.unwrap_or(answered),
                    last_seen_sent,
                };
            }
        }
        assert!(
            Instant::now() < deadline,
            "the keys under {prefix} never expired"
        );
        tokio::time::sleep(POLL).await;
    }
    unreachable!()
}

/// Asserts the keys under a lease went when its deadline says: after the lease was started
/// (granted or renewed: request sent at `sent`, answered at `answered`) with `ttl`.
fn assert_expired_on_time(what: &str, gone: &Gone, sent: Instant, answered: Instant, ttl: i64) {
    let ttl = secs(ttl);
    assert!(
        gone.first_loss_answered >= sent + ttl,
        "{what}: keys gone {:?} after the request, before the TTL of {ttl:?}",
        gone.first_loss_answered - sent
    );
    if let Some(seen) = gone.last_seen_sent {
        assert!(
            seen <= answered + ttl + EXPIRY_SLACK,
            "{what}: keys still there {:?} after the answer, past TTL {ttl:?} + {EXPIRY_SLACK:?}",
            seen - answered
        );
    }
    eprintln!(
        "{what}: keys gone {:?} after the answer (TTL {ttl:?})",
        gone.first_loss_answered - answered
    );
}

/// A lease of MIN_TTL that nobody renews takes its keys with it on time.
async fn unrenewed_lease_expires_on_time(endpoints: &[String]) {
    let mut c = client(&endpoints[0]);
    let sent = Instant::now();
    let id = c.grant_ok(MIN_TTL, 0).await;
    let answered = Instant::now();
    for key in ["expire/a", "expire/b"] {
        c.put_ok(key, "v", id).await;
    }
    let deadline = answered + secs(MIN_TTL) + Duration::from_secs(5);
    let gone = wait_gone(endpoints, "expire/", 2, true, deadline).await;
    assert_expired_on_time("unrenewed lease", &gone, sent, answered, MIN_TTL);
    assert_eq!(c.time_to_live(id, false).await.ttl, -1);
    assert!(!c.leases().await.contains(&id));
}

/// A lease of MIN_TTL renewed every 500 ms over one stream keeps its keys for 10 s; once
/// renewals stop it expires a TTL after the last one.
async fn renewed_lease_keeps_its_keys(endpoints: &[String]) {
    const RENEW_EVERY: Duration = Duration::from_millis(500);
    const KEEP_FOR: Duration = Duration::from_secs(10);
    let mut c = client(&endpoints[0]);
    let id = c.grant_ok(MIN_TTL, 0).await;
    for key in ["renewed/a", "renewed/b"] {
        c.put_ok(key, "v", id).await;
    }
    let mut readers: Vec<Client> = endpoints.iter().map(|e| client(e)).collect();
    // The stream goes to the last member: on three members the caller lists the leader
    // first, so renewals are forwarded by a follower.
    let mut renewer = client(endpoints.last().expect("an endpoint"));
    let started = Instant::now();
    // The stream opens with the first renewal queued.
    let mut stream = KeepAlive::open(&mut renewer, &[id])
        .await
        .expect("keep-alive stream");
    let mut next_renewal = started;
    let (mut last_sent, mut last_answered) = (started, started);
    let mut reads = 0;
    while started.elapsed() < KEEP_FOR {
        if Instant::now() >= next_renewal {
            if next_renewal > started {
                last_sent = Instant::now();
                stream.send(id);
            }
            let r = stream
                .next(Duration::from_secs(5))
                .await
                .expect("keep-alive response");
            last_answered = Instant::now();
            assert_eq!((r.id, r.ttl), (id, MIN_TTL), "renewal answer");
            next_renewal += RENEW_EVERY;
        }
        let reader = &mut readers[reads % endpoints.len()];
        reads += 1;
        let (n, _) = reader
            .count("renewed/", false)
            .await
            .expect("read while renewing");
        assert_eq!(
            n,
            2,
            "a renewed lease lost its keys {:?} after renewals began",
            started.elapsed()
        );
        tokio::time::sleep(POLL).await;
    }
    drop(stream);
    let deadline = last_answered + secs(MIN_TTL) + Duration::from_secs(5);
    let gone = wait_gone(endpoints, "renewed/", 2, true, deadline).await;
    assert_expired_on_time(
        "lease after its last renewal",
        &gone,
        last_sent,
        last_answered,
        MIN_TTL,
    );
}

/// Both expiry scenarios at once, on the members at `endpoints`.
async fn expiry_on_time(endpoints: &[String]) {
    tokio::join!(
        unrenewed_lease_expires_on_time(endpoints),
        renewed_lease_keeps_its_keys(endpoints),
    );
}

/// Waits until every member at `endpoints` holds the same revision and none holds keys under
/// any of `prefixes`.
async fn assert_members_agree_without(endpoints: &[String], prefixes: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = Vec::new();
        for ep in endpoints {
            let mut c = client(ep);
            let mut counts = Vec::new();
            for p in prefixes {
                counts.push(c.count(p, true).await.ok());
            }
            seen.push(counts);
        }
        let revs: BTreeSet<Option<i64>> = seen.iter().flatten().map(|r| r.map(|r| r.1)).collect();
        let all_empty = seen.iter().flatten().all(|r| r.is_some_and(|r| r.0 == 0));
        if revs.len() == 1 && all_empty {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "members disagree after expiry: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expires_on_time_on_etcd() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let etcd = match start_etcd(&dir.path().join("etcd")) {
            Ok(p) => p,
            Err(why) => return eprintln!("SKIP lease_expires_on_time_on_etcd: {why}"),
        };
        expiry_on_time(std::slice::from_ref(&etcd.endpoint)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expires_on_time_on_one_member() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let server = start_kv_server(&dir.path().join("data"), &[]);
        expiry_on_time(std::slice::from_ref(&server.endpoint)).await;
    })
    .await
    .expect("test timed out");
}

async fn expiry_on_three_members(members: &impl Members) {
    let leader = wait_leader_among(members, &[0, 1, 2], Duration::from_secs(20)).await;
    // The leader first: grants go to it, renewals through a follower.
    let endpoints: Vec<String> = [leader, (leader + 1) % 3, (leader + 2) % 3]
        .into_iter()
        .filter_map(|i| members.endpoint_of(i))
        .collect();
    expiry_on_time(&endpoints).await;
    assert_members_agree_without(&endpoints, &["expire/", "renewed/"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expires_on_time_on_three_etcd_members() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let cluster = match EtcdCluster::start(3) {
            Ok(c) => c,
            Err(why) => {
                return eprintln!("SKIP lease_expires_on_time_on_three_etcd_members: {why}");
            }
        };
        expiry_on_three_members(&cluster).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expires_on_time_on_three_members() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let cluster = Cluster::start(3);
        expiry_on_three_members(&cluster).await;
    })
    .await
    .expect("test timed out");
}

// ---- leader kill -------------------------------------------------------------------------------

/// Leases kept alive through the leader kill.
const KEPT_LEASES: usize = 1000;
/// Leases nobody renews.
const UNKEPT_LEASES: usize = 20;
/// Their TTL.
const KILL_TTL: i64 = 5;
/// How often the keep-alive stream renews every kept lease.
const RENEW_ROUND: Duration = Duration::from_secs(1);

/// What the renewing task saw.
#[derive(Default)]
struct Renewals {
    /// Rounds in which every kept lease was renewed.
    rounds: usize,
    /// Kept leases answered with TTL <= 0: expired.
    lost: Vec<i64>,
    /// Times the stream failed and was reopened, with why.
    reopened: Vec<String>,
}

/// Renews every id in `ids` each RENEW_ROUND over one stream to `endpoint`, until `stop`.
/// A failed stream is reopened (as etcd's client does) and reported.
async fn renew_all(
    endpoint: String,
    ids: Arc<Mutex<Vec<i64>>>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Renewals>>,
) {
    let mut c = client(&endpoint);
    'reopen: while !stop.load(Ordering::Relaxed) {
        let round: Vec<i64> = ids.lock().unwrap().clone();
        if round.is_empty() {
            // A stream opens with requests queued (see KeepAlive).
            tokio::time::sleep(POLL).await;
            continue;
        }
        let mut stream = match KeepAlive::open(&mut c, &round).await {
            Ok(s) => s,
            Err(e) => {
                seen.lock().unwrap().reopened.push(format!("open: {e:?}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut round = Some(round);
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let ids_now = match round.take() {
                Some(r) => r,
                None => {
                    let r = ids.lock().unwrap().clone();
                    for &id in &r {
                        stream.send(id);
                    }
                    r
                }
            };
            for &id in &ids_now {
                // A follower forwarding renewals waits for a new leader (etcd: up to its
                // request timeout, 7 s with default flags).
                match stream.next(Duration::from_secs(10)).await {
                    Ok(r) => {
                        assert_eq!(r.id, id, "keep-alive answers out of order");
                        if r.ttl <= 0 {
                            seen.lock().unwrap().lost.push(id);
                        }
                    }
                    Err(e) => {
                        seen.lock().unwrap().reopened.push(e);
                        continue 'reopen;
                    }
                }
            }
            seen.lock().unwrap().rounds += 1;
            tokio::time::sleep(RENEW_ROUND.saturating_sub(started.elapsed())).await;
        }
    }
}

/// Grants `n` leases of `ttl` through `endpoint`, each with one key `{prefix}{i}`, 32 at a
/// time; each id is pushed to `ids` once its key is attached.
async fn grant_with_keys(endpoint: &str, prefix: &str, n: usize, ttl: i64, ids: &Mutex<Vec<i64>>) {
    let c = client(endpoint);
    futures::stream::iter(0..n)
        .map(|i| {
            let mut c = c.clone();
            async move {
                let id = c.grant_ok(ttl, 0).await;
                c.put_ok(&format!("{prefix}{i:04}"), "v", id).await;
                id
            }
        })
        .buffer_unordered(32)
        .for_each(|id| {
            ids.lock().unwrap().push(id);
            futures::future::ready(())
        })
        .await;
}

/// 1,000 leases kept alive over one stream to a follower survive the leader's death; 20
/// leases nobody renews survive it too, for a full TTL from the kill, then expire.
async fn keep_alives_through_leader_kill(members: &mut impl Members) {
    let leader = wait_leader_among(members, &[0, 1, 2], Duration::from_secs(20)).await;
    let keeper = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let keeper_ep = members.endpoint_of(keeper).expect("keeper runs");
    let other_ep = members.endpoint_of(other).expect("third member runs");

    let kept: Arc<Mutex<Vec<i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let renewals: Arc<Mutex<Renewals>> = Arc::default();
    let renewer = tokio::spawn(renew_all(
        keeper_ep.clone(),
        kept.clone(),
        stop.clone(),
        renewals.clone(),
    ));
    let t = Instant::now();
    grant_with_keys(&keeper_ep, "kept/", KEPT_LEASES, KILL_TTL, &kept).await;
    eprintln!(
        "{KEPT_LEASES} leases with keys granted in {:?}",
        t.elapsed()
    );
    // Every kept lease has been renewed at least once before the unkept ones are granted.
    let rounds = renewals.lock().unwrap().rounds;
    let deadline = Instant::now() + Duration::from_secs(10);
    while renewals.lock().unwrap().rounds < rounds + 2 {
        assert!(Instant::now() < deadline, "keep-alive rounds stalled");
        tokio::time::sleep(POLL).await;
    }
    let unkept: Mutex<Vec<i64>> = Mutex::default();
    grant_with_keys(&keeper_ep, "unkept/", UNKEPT_LEASES, KILL_TTL, &unkept).await;
    // With part of their TTL used up under the old leader: a new leader must give them a
    // full TTL again, not expire them at the old deadlines.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut keeper_c = client(&keeper_ep);
    assert_eq!(
        keeper_c.count("unkept/", false).await.unwrap().0,
        UNKEPT_LEASES as i64
    );

    let rounds_at_kill = renewals.lock().unwrap().rounds;
    members.kill_member(leader);
    let killed = Instant::now();
    let new_leader = wait_leader_among(members, &[keeper, other], Duration::from_secs(20)).await;
    let leader_seen = Instant::now();
    eprintln!("new leader seen {:?} after the kill", leader_seen - killed);

    // The unkept leases: still there a TTL after the kill, gone soon after the new leader's
    // own TTL (plus the election timeout etcd adds on promotion, and slack).
    let survivors = [keeper_ep.clone(), other_ep.clone()];
    let deadline = leader_seen + secs(KILL_TTL) + Duration::from_secs(10);
    let gone = wait_gone(&survivors, "unkept/", UNKEPT_LEASES as i64, false, deadline).await;
    assert!(
        gone.first_loss_answered >= killed + secs(KILL_TTL),
        "an unkept lease expired {:?} after the kill, before a full TTL from the new leader",
        gone.first_loss_answered - killed
    );
    let latest =
        leader_seen + secs(KILL_TTL) + ELECTION_TIMEOUT + EXPIRY_SLACK + Duration::from_secs(2);
    if let Some(seen) = gone.last_seen_sent {
        assert!(
            seen <= latest,
            "unkept leases still there {:?} after the new leader was seen",
            seen - leader_seen
        );
    }
    eprintln!(
        "unkept leases expiring {:?} after the kill",
        gone.first_loss_answered - killed
    );

    // Two TTLs after the kill, the kept leases and their keys are all there.
    tokio::time::sleep(
        (killed + 2 * secs(KILL_TTL) + Duration::from_secs(1))
            .saturating_duration_since(Instant::now()),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    renewer.await.expect("renewing task");
    {
        let seen = renewals.lock().unwrap();
        assert!(seen.lost.is_empty(), "kept leases expired: {:?}", seen.lost);
        assert!(
            seen.rounds >= rounds_at_kill + 3,
            "renewals stalled after the kill: {} rounds before, {} in all",
            rounds_at_kill,
            seen.rounds
        );
        if !seen.reopened.is_empty() {
            eprintln!("keep-alive stream reopened: {:?}", seen.reopened);
        }
    }
    let kept = kept.lock().unwrap().clone();
    for ep in &survivors {
        let mut c = client(ep);
        assert_eq!(
            c.count("kept/", false).await.unwrap().0,
            KEPT_LEASES as i64,
            "kept keys on {ep}"
        );
        let listed: BTreeSet<i64> = c.leases().await.into_iter().collect();
        let missing: Vec<&i64> = kept.iter().filter(|id| !listed.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "kept leases not listed on {ep}: {missing:?}"
        );
        for id in unkept.lock().unwrap().iter() {
            assert!(
                !listed.contains(id),
                "expired lease {id:#x} still listed on {ep}"
            );
        }
    }
    let new_leader_ep = members.endpoint_of(new_leader).expect("new leader runs");
    let ttl = client(&new_leader_ep).time_to_live(kept[0], true).await;
    assert!(ttl.ttl > 0 && ttl.ttl <= KILL_TTL, "{ttl:?}");
    assert_eq!(ttl.keys.len(), 1, "{ttl:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_leases_survive_leader_kill_on_etcd() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut cluster = match EtcdCluster::start(3) {
            Ok(c) => c,
            Err(why) => {
                return eprintln!("SKIP kept_alive_leases_survive_leader_kill_on_etcd: {why}");
            }
        };
        keep_alives_through_leader_kill(&mut cluster).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_leases_survive_leader_kill() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut cluster = Cluster::start(3);
        keep_alives_through_leader_kill(&mut cluster).await;
    })
    .await
    .expect("test timed out");
}

// ---- restart -----------------------------------------------------------------------------------

/// Leases, their TTLs and attachments survive a SIGKILL and restart on the same data dir, and
/// a revoke afterwards deletes exactly the attached keys. `start` (re)starts the one member on
/// a data dir.
async fn restart_keeps_leases(start: impl Fn(&std::path::Path) -> Proc) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = start(&data);
    let mut c = client(&server.endpoint);
    let a = c.grant_ok(60, 0xa1).await;
    let b = c.grant_ok(120, 0xb2).await;
    let chosen = c.grant_ok(90, 0).await;
    let revoked = c.grant_ok(30, 0).await;
    c.put_ok("r/a1", "v", a).await;
    c.put_ok("r/a2", "v", a).await;
    c.put_ok("r/b1", "v", b).await;
    c.put_ok("r/c1", "v", chosen).await;
    c.put_ok("r/x", "v", revoked).await;
    c.revoke(revoked).await.expect("revoke");
    c.put_ok("r/moved", "v", a).await;
    c.put_ok("r/moved", "v", b).await;
    c.put_ok("r/detached", "v", a).await;
    c.put_ok("r/detached", "v", 0).await;
    c.put_ok("r/kept", "v", a).await;
    c.put_req(PutRequest {
        key: "r/kept".into(),
        value: "v2".into(),
        ignore_lease: true,
        ..Default::default()
    })
    .await
    .expect("put with ignore_lease");
    c.put_ok("r/deleted", "v", a).await;
    c.kv.delete_range(DeleteRangeRequest {
        key: "r/deleted".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let revision = c.revision().await;

    server.kill();
    let server = start(&data);
    let mut c = client(&server.endpoint);
    let mut want = vec![a, b, chosen];
    want.sort_unstable();
    assert_eq!(c.leases().await, want, "leases after the restart");
    assert_eq!(c.revision().await, revision, "a restart writes nothing");
    for (id, granted, keys) in [
        (a, 60, &["r/a1", "r/a2", "r/kept"][..]),
        (b, 120, &["r/b1", "r/moved"][..]),
        (chosen, 90, &["r/c1"][..]),
    ] {
        let ttl = c.time_to_live(id, true).await;
        assert_eq!(ttl.granted_ttl, granted, "{ttl:?}");
        assert!(ttl.ttl > 0 && ttl.ttl <= granted, "{ttl:?}");
        assert_eq!(text_keys(&ttl), keys, "keys of {id:#x} after the restart");
    }
    assert_eq!(c.time_to_live(revoked, false).await.ttl, -1);
    for (key, lease) in [
        ("r/a1", a),
        ("r/kept", a),
        ("r/moved", b),
        ("r/detached", 0),
        ("r/c1", chosen),
    ] {
        assert_eq!(c.get(key).await.map(|kv| kv.lease), Some(lease), "{key}");
    }
    assert!(c.get("r/deleted").await.is_none());
    assert!(c.get("r/x").await.is_none());

    // A revoke deletes exactly a's keys, in one revision.
    assert_eq!(
        c.revoke(a).await.expect("revoke after restart"),
        revision + 1
    );
    let mut left = Vec::new();
    for key in [
        "r/a1",
        "r/a2",
        "r/kept",
        "r/b1",
        "r/moved",
        "r/detached",
        "r/c1",
    ] {
        if c.get(key).await.is_some() {
            left.push(key);
        }
    }
    assert_eq!(left, ["r/b1", "r/moved", "r/detached", "r/c1"]);
    assert_eq!(c.revision().await, revision + 1);
    want.retain(|id| *id != a);
    assert_eq!(c.leases().await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_restart_on_etcd() {
    tokio::time::timeout(Duration::from_secs(90), async {
        if let Err(why) = kv_tests::which("etcd").ok_or("etcd is not installed") {
            return eprintln!("SKIP leases_survive_restart_on_etcd: {why}");
        }
        restart_keeps_leases(|data| start_etcd(data).expect("start etcd")).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_restart() {
    tokio::time::timeout(Duration::from_secs(90), async {
        restart_keeps_leases(|data| start_kv_server(data, &[])).await;
    })
    .await
    .expect("test timed out");
}

// ---- etcdctl ---------------------------------------------------------------------------------

/// Replaces what differs by design in etcdctl's output: lease ids become `<lease N>` in order
/// of appearance, remaining TTLs `~` (after checking they are plausible), and header ids and
/// terms 0 (after checking they are set).
#[derive(Default)]
struct Normaliser {
    ids: Vec<u64>,
}

impl Normaliser {
    fn label(&mut self, id: u64) -> String {
        let n = match self.ids.iter().position(|i| *i == id) {
            Some(n) => n,
            None => {
                self.ids.push(id);
                self.ids.len() - 1
            }
        };
        format!("<lease {n}>")
    }

    /// Text: 16-hex-digit words are lease ids; `remaining(Ns)` is checked against the
    /// `TTL(Ms)` before it.
    fn text(&mut self, s: &str) -> String {
        let mut out = String::new();
        let mut word = String::new();
        for ch in s.chars().chain(std::iter::once('\n')) {
            if ch.is_ascii_alphanumeric() {
                word.push(ch);
                continue;
            }
            if word.len() == 16 && word.chars().all(|c| c.is_ascii_hexdigit()) {
                let id = u64::from_str_radix(&word, 16).expect("hex digits");
                out.push_str(&self.label(id));
            } else {
                out.push_str(&word);
            }
            word.clear();
            out.push(ch);
        }
        out.pop();
        let mut text = out;
        if let Some(at) = text.find("remaining(") {
            let from = at + "remaining(".len();
            let to = from + text[from..].find("s)").expect("remaining(Ns)");
            let left: i64 = text[from..to].parse().expect("remaining seconds");
            let granted = text[..at]
                .rfind("TTL(")
                .and_then(|t| text[t + 4..at].split('s').next()?.parse::<i64>().ok())
                .expect("granted TTL before remaining");
            assert!(
                left > 0 && left <= granted && left >= granted - 3,
                "remaining {left}s of {granted}s: {s}"
            );
            text.replace_range(from..to, "~");
        }
        text
    }

    fn json(&mut self, s: &str) -> String {
        let mut v: serde_json::Value =
            serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"));
        self.json_value(&mut v, None);
        format!("{v}\n")
    }

    fn json_value(&mut self, v: &mut serde_json::Value, granted: Option<i64>) {
        use serde_json::Value;
        match v {
            Value::Object(map) => {
                let granted = map.get("granted-ttl").and_then(Value::as_i64).or(granted);
                for (k, field) in map.iter_mut() {
                    match k.as_str() {
                        "cluster_id" | "member_id" | "raft_term" => {
                            assert!(field.as_u64().is_some_and(|n| n > 0), "{k} = {field}");
                            *field = Value::from(0);
                        }
                        "id" | "ID" | "lease" => {
                            if let Some(id) = field.as_u64().filter(|id| *id != 0) {
                                *field = Value::from(self.label(id));
                            }
                        }
                        // TimeToLive's remaining TTL (-1 for an expired lease stays).
                        "ttl" if granted.is_some_and(|g| g > 0) => {
                            let g = granted.unwrap_or(0);
                            let left = field.as_i64().expect("ttl is a number");
                            assert!(left > 0 && left <= g && left >= g - 3, "ttl {left} of {g}");
                            *field = Value::from("~");
                        }
                        "leases" => {
                            self.json_value(field, granted);
                            if let Value::Array(list) = field {
                                list.sort_by_key(|l| l.to_string());
                            }
                        }
                        _ => self.json_value(field, granted),
                    }
                }
            }
            Value::Array(list) => {
                for item in list {
                    self.json_value(item, granted);
                }
            }
            _ => {}
        }
    }
}

/// An etcdctl lease session against `endpoint`, as a transcript of normalised commands,
/// exit codes, stdout and `Error:` lines.
fn etcdctl_lease_session(endpoint: &str) -> Vec<String> {
    let mut norm = Normaliser::default();
    let mut transcript = Vec::new();
    let unknown = format!("{UNKNOWN_LEASE:x}");
    let mut run = |norm: &mut Normaliser, args: &[&str]| {
        let out = etcdctl(endpoint, args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = args.contains(&"json") && !stdout.is_empty();
        let mut stdout = if json {
            norm.json(&stdout)
        } else {
            norm.text(&stdout)
        };
        if args.starts_with(&["lease", "list"]) {
            // etcd lists leases from a Go map: in no particular order.
            let mut lines: Vec<&str> = stdout.lines().collect();
            if lines.len() > 1 {
                lines[1..].sort_unstable();
            }
            stdout = lines.iter().map(|l| format!("{l}\n")).collect();
        }
        let errors: String = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("Error:"))
            .map(|l| format!("{}\n", norm.text(l)))
            .collect();
        let command = norm.text(&args.join(" "));
        transcript.push(format!(
            "$ etcdctl {command}\n[exit {}]\n{stdout}{errors}",
            out.status.code().unwrap_or(-1)
        ));
    };

    run(&mut norm, &["lease", "grant", "30"]);
    // The first id the normaliser saw is the one granted (0 if the grant failed).
    let id_hex = format!("{:016x}", norm.ids.first().copied().unwrap_or(0));
    run(&mut norm, &["lease", "grant", "60"]);
    run(&mut norm, &["put", &format!("--lease={id_hex}"), "k", "v"]);
    run(&mut norm, &["get", "k", "-w", "json"]);
    run(&mut norm, &["lease", "timetolive", &id_hex, "--keys"]);
    run(
        &mut norm,
        &["lease", "timetolive", &id_hex, "--keys", "-w", "json"],
    );
    run(&mut norm, &["lease", "timetolive", &id_hex]);
    let other_hex = format!("{:016x}", norm.ids.get(1).copied().unwrap_or(0));
    run(&mut norm, &["lease", "timetolive", &other_hex, "--keys"]);
    run(&mut norm, &["lease", "list"]);
    run(&mut norm, &["lease", "keep-alive", "--once", &id_hex]);
    run(
        &mut norm,
        &["lease", "keep-alive", "--once", &id_hex, "-w", "json"],
    );
    run(&mut norm, &["lease", "revoke", &id_hex]);
    run(&mut norm, &["get", "k"]);
    run(&mut norm, &["lease", "timetolive", &id_hex]);
    run(&mut norm, &["lease", "list"]);
    // Errors.
    run(&mut norm, &["put", &format!("--lease={unknown}"), "k", "v"]);
    run(&mut norm, &["lease", "revoke", &unknown]);
    run(&mut norm, &["lease", "timetolive", &unknown]);
    run(&mut norm, &["lease", "timetolive", &unknown, "-w", "json"]);
    run(&mut norm, &["lease", "keep-alive", "--once", &unknown]);
    run(
        &mut norm,
        &["lease", "grant", &(MAX_LEASE_TTL + 1).to_string()],
    );
    run(&mut norm, &["lease", "grant", &MAX_LEASE_TTL.to_string()]);
    run(&mut norm, &["lease", "list"]);
    run(&mut norm, &["get", "", "--prefix", "-w", "json"]);
    // Raised to the minimum TTL (last: it lives only 2 s).
    run(&mut norm, &["lease", "grant", "1"]);
    transcript
}

#[test]
fn etcdctl_lease_session_matches_etcd() {
    if !have_etcdctl("etcdctl_lease_session_matches_etcd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = match start_etcd(&dir.path().join("etcd")) {
        Ok(p) => p,
        Err(why) => return eprintln!("SKIP etcdctl_lease_session_matches_etcd: {why}"),
    };
    let ours = start_kv_server(&dir.path().join("ours"), &[]);
    // The sessions run on a thread of their own, so the test is bounded however etcdctl
    // behaves; the servers stay here and die with the test.
    let (tx, rx) = std::sync::mpsc::channel();
    let endpoints = (etcd.endpoint.clone(), ours.endpoint.clone());
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(|| {
            (
                etcdctl_lease_session(&endpoints.0),
                etcdctl_lease_session(&endpoints.1),
            )
        });
        let _ = tx.send(result);
    });
    let (want, got) = match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(Ok(sessions)) => sessions,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("the etcdctl sessions did not finish in 90 s"),
    };
    // The reference session went as documented.
    for expected in [
        "attached keys([k])",
        "keepalived with TTL(30)",
        "lease <lease 1> granted with TTL(60s), remaining(~s), attached keys([])",
        "lease <lease 0> already expired",
        "Error: failed to revoke lease (etcdserver: requested lease not found)",
        "Error: failed to grant lease (etcdserver: too large lease TTL)",
        "granted with TTL(2s)",
    ] {
        assert!(
            want.iter().any(|t| t.contains(expected)),
            "etcd's session lacks {expected:?}:\n{}",
            want.join("\n")
        );
    }
    let differ: Vec<String> = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| w != g)
        .map(|(w, g)| format!("etcd:\n{w}ours:\n{g}"))
        .collect();
    assert!(
        differ.is_empty() && want.len() == got.len(),
        "{} of {} etcdctl commands differ from etcd:\n{}",
        differ.len(),
        want.len(),
        differ.join("\n")
    );
}
