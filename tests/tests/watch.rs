//! The Watch service against etcd 3.4's wire behaviour: created, refused and canceled
//! watchers, ids, progress requests and notifications, events of puts, deletes, txns and lease
//! revokes, filters, prev_kv, history and future start revisions, compaction, fragments, and
//! watches on followers of three members checked against a model of the history; plus an
//! etcdctl session whose normalised output must equal etcd's.
//!
//! Every gRPC scenario is a function over an endpoint, run against etcd 3.4 (which proves the
//! scenario's own expectations) and against kv-server, on a fresh store at revision 1 so that
//! revisions are literal. Each records everything every watcher received and compares whole
//! sequences, rendered with every field that is set (the header's cluster id, member id and
//! term are checked separately: the serving member's, and a term).
//!
//! Ordering etcd guarantees and the scenarios rely on: control responses (created, canceled,
//! progress) come in the order of the requests; each watcher's events in revision order, after
//! its created response. Events of different watchers interleave in no particular order (etcd
//! iterates a map), so sequences are compared per watcher.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv_core::proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, StatusRequest, TxnRequest, WatchCancelRequest, WatchCreateRequest,
    WatchProgressRequest, WatchRequest, WatchResponse, kv_client::KvClient,
    lease_client::LeaseClient, maintenance_client::MaintenanceClient, request_op::Request,
    watch_client::WatchClient, watch_create_request::FilterType, watch_request::RequestUnion,
};
use kv_core::proto::mvccpb::{Event, KeyValue, event::EventType};
use kv_core::proto::prefix_end;
use kv_tests::{
    Cluster, EtcdCluster, Members, etcdctl, etcdctl_stdin, have_etcdctl, start_etcd_with,
    start_kv_server, wait_leader_among, which,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// How long a response may take to arrive.
const RESPONSE_WAIT: Duration = Duration::from_secs(5);

/// Flags both servers get for the gRPC scenarios: a small request limit (responses over it
/// plus etcd's gRPC head-room are fragmented) and a progress tick of a second.
const SCENARIO_FLAGS: &[&str] = &[
    "--max-request-bytes",
    "4096",
    "--experimental-watch-progress-notify-interval",
    "1s",
];

// ---- clients -----------------------------------------------------------------------------------

/// The KV, Lease and Watch clients of one endpoint.
#[derive(Clone)]
struct Client {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    /// On a channel without a request timeout: watch streams live long.
    watch: WatchClient<Channel>,
    endpoint: String,
}

fn client(endpoint: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint URL")
        .connect_timeout(Duration::from_secs(2));
    let unary = channel
        .clone()
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    Client {
        kv: KvClient::new(unary.clone()),
        lease: LeaseClient::new(unary),
        watch: WatchClient::new(channel.connect_lazy()),
        endpoint: endpoint.to_string(),
    }
}

fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })),
    }
}

fn delete_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

impl Client {
    /// Puts `key` (with `lease`, 0: none); returns the revision.
    async fn put_with(&mut self, key: &str, value: &[u8], lease: i64) -> i64 {
        self.kv
            .put(PutRequest {
                key: key.into(),
                value: value.to_vec(),
                lease,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e:?}"))
            .into_inner()
            .header
            .expect("put header")
            .revision
    }

    async fn put(&mut self, key: &str, value: &str) -> i64 {
        self.put_with(key, value.as_bytes(), 0).await
    }

    /// Deletes `key`, or every key under it with `prefix`; returns the revision.
    async fn delete(&mut self, key: &str, prefix: bool) -> i64 {
        self.delete_counted(key, prefix).await.0
    }

    /// Like [`Client::delete`], with the number of keys deleted.
    async fn delete_counted(&mut self, key: &str, prefix: bool) -> (i64, i64) {
        let resp = self
            .kv
            .delete_range(DeleteRangeRequest {
                key: key.into(),
                range_end: if prefix {
                    prefix_end(key.as_bytes())
                } else {
                    vec![]
                },
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("delete {key}: {e:?}"))
            .into_inner();
        (resp.header.expect("delete header").revision, resp.deleted)
    }

    /// Runs `ops` as one unconditional txn; returns the revision.
    async fn txn(&mut self, ops: Vec<RequestOp>) -> i64 {
        let resp = self
            .kv
            .txn(TxnRequest {
                compare: vec![],
                success: ops,
                failure: vec![],
            })
            .await
            .unwrap_or_else(|e| panic!("txn: {e:?}"))
            .into_inner();
        assert!(resp.succeeded);
        resp.header.expect("txn header").revision
    }

    /// Compacts history below `revision` and waits until that is physically done.
    async fn compact(&mut self, revision: i64) {
        self.kv
            .compact(CompactionRequest {
                revision,
                physical: true,
            })
            .await
            .unwrap_or_else(|e| panic!("compact {revision}: {e:?}"));
    }

    /// (cluster id, member id) of the member serving this endpoint.
    async fn ids(&mut self) -> (u64, u64) {
        let h = self
            .kv
            .range(RangeRequest {
                key: b"ids".to_vec(),
                serializable: true,
                ..Default::default()
            })
            .await
            .expect("read the member's ids")
            .into_inner()
            .header
            .expect("range header");
        (h.cluster_id, h.member_id)
    }

    /// The current store revision (linearizable).
    async fn revision(&mut self) -> i64 {
        self.kv
            .range(RangeRequest {
                key: b"\0".to_vec(),
                range_end: b"\0".to_vec(),
                count_only: true,
                ..Default::default()
            })
            .await
            .expect("read the revision")
            .into_inner()
            .header
            .expect("range header")
            .revision
    }

    async fn grant(&mut self, id: i64, ttl: i64) {
        let resp = self
            .lease
            .lease_grant(LeaseGrantRequest { ttl, id })
            .await
            .unwrap_or_else(|e| panic!("grant {id:#x}: {e:?}"))
            .into_inner();
        assert_eq!((resp.id, resp.error.as_str()), (id, ""));
    }

    /// Revokes lease `id`; returns the revision.
    async fn revoke(&mut self, id: i64) -> i64 {
        self.lease
            .lease_revoke(LeaseRevokeRequest { id })
            .await
            .unwrap_or_else(|e| panic!("revoke {id:#x}: {e:?}"))
            .into_inner()
            .header
            .expect("revoke header")
            .revision
    }
}

// ---- rendering -----------------------------------------------------------------------------

/// A key-value as text, with every field that is set: `key=value c<create> m<mod> v<version>
/// lease<id>`. Values over 32 bytes show as their length.
fn show_kv(kv: &KeyValue) -> String {
    let mut s = String::from_utf8_lossy(&kv.key).into_owned();
    if kv.value.len() > 32 {
        s += &format!("=<{} bytes>", kv.value.len());
    } else if !kv.value.is_empty() {
        s += &format!("={}", String::from_utf8_lossy(&kv.value));
    }
    for (name, n) in [
        ("c", kv.create_revision),
        ("m", kv.mod_revision),
        ("v", kv.version),
    ] {
        if n != 0 {
            s += &format!(" {name}{n}");
        }
    }
    if kv.lease != 0 {
        s += &format!(" lease{:#x}", kv.lease);
    }
    s
}

fn show_event(ev: &Event) -> String {
    let kind = match EventType::try_from(ev.r#type) {
        Ok(EventType::Put) => "PUT".to_string(),
        Ok(EventType::Delete) => "DELETE".to_string(),
        Err(_) => format!("type{}", ev.r#type),
    };
    let mut s = match &ev.kv {
        Some(kv) => format!("{kind} {}", show_kv(kv)),
        None => format!("{kind} <no kv>"),
    };
    if let Some(prev) = &ev.prev_kv {
        s += &format!(" prev({})", show_kv(prev));
    }
    s
}

/// A response as text, with every field that is set except the header's cluster id, member
/// id and term (which differ by design and are checked to be set): `w<id> r<header revision>`,
/// then flags, then ` | `-separated events.
fn show(r: &WatchResponse) -> String {
    let mut s = match &r.header {
        Some(h) => format!("w{} r{}", r.watch_id, h.revision),
        None => format!("w{} no-header", r.watch_id),
    };
    if r.created {
        s += " created";
    }
    if r.canceled {
        s += " canceled";
    }
    if r.compact_revision != 0 {
        s += &format!(" compact{}", r.compact_revision);
    }
    if !r.cancel_reason.is_empty() {
        s += &format!(" reason={:?}", r.cancel_reason);
    }
    if r.fragment {
        s += " fragment";
    }
    for ev in &r.events {
        s += " | ";
        s += &show_event(ev);
    }
    s
}

// ---- watch streams ---------------------------------------------------------------------------

/// One Watch stream, recording everything it received.
struct WatchStream {
    tx: mpsc::Sender<WatchRequest>,
    rx: Streaming<WatchResponse>,
    /// (cluster id, member id) every response header must carry.
    member: (u64, u64),
    /// The member's endpoint, for messages.
    endpoint: String,
    /// Every response, in order of arrival.
    raw: Vec<WatchResponse>,
    /// Every response, rendered, in order of arrival.
    all: Vec<String>,
    /// Per watch id, what it received, rendered, in order of arrival.
    by_id: BTreeMap<i64, Vec<String>>,
}

fn create(req: WatchCreateRequest) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(req)),
    }
}

fn watch_key(key: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.into(),
        ..Default::default()
    }
}

fn watch_prefix(prefix: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: prefix.into(),
        range_end: prefix_end(prefix.as_bytes()),
        ..Default::default()
    }
}

impl WatchStream {
    /// Opens a stream whose first request creates `first`: etcd sends the response headers
    /// only with its first response, so the call returns only once a request is queued.
    async fn open(c: &mut Client, first: WatchCreateRequest) -> WatchStream {
        let member = c.ids().await;
        let endpoint = c.endpoint.clone();
        let (tx, rx) = mpsc::channel(64);
        tx.send(create(first))
            .await
            .expect("queue the first create");
        let rx = tokio::time::timeout(RESPONSE_WAIT, c.watch.watch(ReceiverStream::new(rx)))
            .await
            .expect("the watch call timed out")
            .expect("open a watch stream")
            .into_inner();
        WatchStream {
            tx,
            rx,
            member,
            endpoint,
            raw: Vec::new(),
            all: Vec::new(),
            by_id: BTreeMap::new(),
        }
    }

    async fn send(&self, req: WatchRequest) {
        self.tx.send(req).await.expect("the request stream is open");
    }

    async fn create(&self, req: WatchCreateRequest) {
        self.send(create(req)).await;
    }

    async fn cancel(&self, watch_id: i64) {
        self.send(WatchRequest {
            request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest { watch_id })),
        })
        .await;
    }

    async fn progress(&self) {
        self.send(WatchRequest {
            request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
        })
        .await;
    }

    /// The next response, recorded; panics when the stream errs, ends or is silent for
    /// `within`.
    async fn recv_within(&mut self, within: Duration) -> WatchResponse {
        let r = match tokio::time::timeout(within, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("the watch stream ended; it received {:#?}", self.all),
            Ok(Err(e)) => panic!(
                "the watch stream failed: {e:?}; it received {:#?}",
                self.all
            ),
            Err(_) => panic!(
                "no watch response within {within:?}; the stream received {:#?}",
                self.all
            ),
        };
        self.record(r.clone());
        r
    }

    fn record(&mut self, r: WatchResponse) {
        let h = r.header.unwrap_or_default();
        assert!(
            (h.cluster_id, h.member_id) == self.member && h.raft_term != 0,
            "header not of the member serving {} {:?} (or without term): {r:?}",
            self.endpoint,
            self.member
        );
        let text = show(&r);
        self.all.push(text.clone());
        self.by_id.entry(r.watch_id).or_default().push(text);
        self.raw.push(r);
    }

    async fn recv(&mut self) -> WatchResponse {
        self.recv_within(RESPONSE_WAIT).await
    }

    /// Receives until every `(id, n)` of `want` has received at least `n` responses, or
    /// nothing came for RESPONSE_WAIT: then it says so and returns, and the scenario's final
    /// comparison of whole sequences shows what is missing.
    async fn settle(&mut self, want: &[(i64, usize)]) {
        while want.iter().any(|(id, n)| self.of(*id).len() < *n) {
            match tokio::time::timeout(RESPONSE_WAIT, self.rx.message()).await {
                Ok(Ok(Some(r))) => self.record(r),
                other => {
                    let why = match other {
                        Ok(Ok(_)) => "the stream ended".to_string(),
                        Ok(Err(e)) => format!("the stream failed: {e:?}"),
                        Err(_) => format!("nothing for {RESPONSE_WAIT:?}"),
                    };
                    eprintln!("gave up waiting for {want:?} ({why}) after {:#?}", self.all);
                    return;
                }
            }
        }
    }

    /// Records whatever else arrives until the stream was silent for `quiet` (the scenarios'
    /// final comparison of whole sequences then shows anything unexpected).
    async fn drain(&mut self, quiet: Duration) {
        while let Ok(Ok(Some(r))) = tokio::time::timeout(quiet, self.rx.message()).await {
            self.record(r);
        }
    }

    /// Sends a progress request and receives until its answer: control responses (created,
    /// canceled, progress) come in the order of the requests, so every answer to an earlier
    /// request has then arrived.
    async fn sync_control(&mut self) {
        self.progress().await;
        let deadline = Instant::now() + RESPONSE_WAIT;
        loop {
            let r = self
                .recv_within(deadline.saturating_duration_since(Instant::now()))
                .await;
            if r.watch_id == -1 && !r.created && !r.canceled && r.events.is_empty() {
                return;
            }
        }
    }

    /// What watch `id` received.
    fn of(&self, id: i64) -> &[String] {
        self.by_id.get(&id).map_or(&[], Vec::as_slice)
    }
}

/// Compares what every watcher of `streams` received with `want` (stream label, watch id,
/// responses), listing every difference at once; ids that received something but are not in
/// `want` are differences too.
fn assert_sequences(streams: &[(&str, &WatchStream)], want: &[(&str, i64, &[&str])]) {
    let mut differ = Vec::new();
    for (label, stream) in streams {
        for (id, got) in &stream.by_id {
            if !want.iter().any(|(l, i, _)| l == label && i == id) {
                differ.push(format!(
                    "{label} w{id} was not expected to hear anything:\n  got {got:#?}"
                ));
            }
        }
    }
    for (label, id, expected) in want {
        let stream = streams
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, s)| s)
            .expect("a stream of that label");
        let got = stream.of(*id);
        if got != *expected {
            differ.push(format!(
                "{label} w{id}:\n  want {expected:#?}\n  got {got:#?}"
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "{} watchers received other responses than etcd sends:\n{}",
        differ.len(),
        differ.join("\n")
    );
}

/// Runs `scenario` against etcd started with `flags` (or skips with why), as test `name`.
async fn on_etcd<F, Fut>(name: &str, flags: &[&str], scenario: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let etcd = match start_etcd_with(&dir.path().join("etcd"), flags) {
        Ok(p) => p,
        Err(why) => return eprintln!("SKIP {name}: {why}"),
    };
    scenario(etcd.endpoint.clone()).await;
}

/// Runs `scenario` against kv-server started with `flags`.
async fn on_ours<F, Fut>(flags: &[&str], scenario: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let server = start_kv_server(&dir.path().join("data"), flags);
    scenario(server.endpoint.clone()).await;
}

// ---- Watch API semantics (one member) ----------------------------------------------------------

/// Created responses, watch ids, refused creates, cancel, progress requests, and the events of
/// puts, deletes, txns, lease revokes, filters, prev_kv, history and future start revisions,
/// on a fresh store at revision 1; every watcher's whole sequence as etcd 3.4 sends it.
async fn watch_api_semantics(endpoint: String) {
    let mut c = client(&endpoint);
    assert_eq!(c.put("a", "0").await, 2, "a fresh store is at revision 1");

    // Ids: automatic ones from 0 up, skipping ids the client took; a taken id, and a key at
    // or past its range end, are refused with etcd's reasons and watch id -1. The header
    // carries the store revision. The first watcher, an empty key with range end "\0",
    // watches every key.
    let mut s = WatchStream::open(
        &mut c,
        WatchCreateRequest {
            key: vec![],
            range_end: vec![0],
            ..Default::default()
        },
    )
    .await;
    s.create(watch_key("a")).await;
    s.create(WatchCreateRequest {
        watch_id: 7,
        ..watch_key("c")
    })
    .await;
    s.create(watch_key("d")).await;
    s.create(WatchCreateRequest {
        watch_id: 7,
        ..watch_key("e")
    })
    .await;
    s.create(WatchCreateRequest {
        watch_id: 3,
        ..watch_key("e")
    })
    .await;
    s.create(watch_key("e")).await;
    s.create(WatchCreateRequest {
        range_end: b"a".to_vec(),
        ..watch_key("b")
    })
    .await;
    s.create(WatchCreateRequest {
        range_end: b"b".to_vec(),
        ..watch_key("b")
    })
    .await;
    s.create(WatchCreateRequest {
        range_end: vec![0],
        ..watch_key("x")
    })
    .await;
    s.create(watch_key("b")).await;
    // Cancel: answered once; a second cancel and an unknown id get nothing. A progress
    // request is answered with id -1 and the store revision, after them.
    s.cancel(6).await;
    s.cancel(6).await;
    s.cancel(999).await;
    s.progress().await;
    while s.all.len() < 13 {
        s.recv().await;
    }
    // Control responses come in the order of the requests.
    let dup =
        r#"w-1 r2 created canceled reason="mvcc: duplicate watch ID provided on the WatchStream""#;
    let empty = r#"w-1 r2 created canceled reason="mvcc: watcher range is empty""#;
    assert_eq!(
        s.all,
        [
            "w0 r2 created",
            "w1 r2 created",
            "w7 r2 created",
            "w2 r2 created",
            dup,
            "w3 r2 created",
            "w4 r2 created",
            empty,
            empty,
            "w5 r2 created",
            "w6 r2 created",
            "w6 r2 canceled",
            "w-1 r2",
        ]
    );

    // Single keys, a from-key range; the canceled watcher of b hears nothing.
    for k in ["a", "b", "c", "d", "e", "y", "x"] {
        c.put(k, "1").await;
    }
    s.settle(&[(0, 8), (1, 2), (7, 2), (2, 2), (3, 2), (4, 2), (5, 3)])
        .await;

    // A txn's puts and deletes arrive in one response, in the txn's order.
    assert_eq!(c.put("t/c", "0").await, 10);
    s.create(watch_prefix("t/")).await;
    s.settle(&[(0, 9), (8, 1)]).await;
    let txn = c
        .txn(vec![
            put_op("t/a", "1"),
            put_op("t/b", "1"),
            delete_op("t/c"),
            put_op("t/d", "1"),
        ])
        .await;
    assert_eq!(txn, 11);
    s.settle(&[(0, 10), (8, 2)]).await;

    // A lease revoke deletes its keys in one revision: one response, keys in order.
    c.grant(0x77, 60).await;
    for k in ["ls/b", "ls/a", "ls/c"] {
        c.put_with(k, b"v", 0x77).await;
    }
    s.create(watch_prefix("ls/")).await;
    s.settle(&[(0, 13), (9, 1)]).await;
    assert_eq!(c.revoke(0x77).await, 15);
    s.settle(&[(0, 14), (9, 2)]).await;

    // Filters: NOPUT and NODELETE; a revision whose events are all filtered sends nothing.
    s.create(WatchCreateRequest {
        filters: vec![FilterType::Noput as i32],
        ..watch_prefix("fl/")
    })
    .await;
    s.create(WatchCreateRequest {
        filters: vec![FilterType::Nodelete as i32],
        ..watch_prefix("fl/")
    })
    .await;
    s.settle(&[(10, 1), (11, 1)]).await;
    c.txn(vec![put_op("fl/a", "1"), put_op("fl/b", "1")]).await;
    c.delete("fl/", true).await;
    c.put("fl/z", "1").await;
    s.settle(&[(0, 17), (10, 2), (11, 3)]).await;

    // prev_kv: on updates and deletes; none for a creation (also a re-creation).
    s.create(WatchCreateRequest {
        prev_kv: true,
        ..watch_key("pk")
    })
    .await;
    s.settle(&[(12, 1)]).await;
    c.put("pk", "1").await;
    c.put("pk", "2").await;
    c.delete("pk", false).await;
    c.put("pk", "3").await;
    s.settle(&[(0, 21), (12, 5)]).await;

    // A start revision in the past replays history, in one response for revisions written
    // before the watch, then continues live.
    let h1 = c.put("h", "1").await;
    assert_eq!(h1, 23);
    c.put("h", "2").await;
    c.delete("h", false).await;
    c.put("h", "3").await;
    s.create(WatchCreateRequest {
        start_revision: h1,
        ..watch_key("h")
    })
    .await;
    s.settle(&[(0, 25), (13, 2)]).await;
    c.put("h", "4").await;
    s.settle(&[(0, 26), (13, 3)]).await;

    // A start revision in the future is no error: the watcher waits for it.
    s.create(WatchCreateRequest {
        start_revision: 30,
        ..watch_key("f")
    })
    .await;
    s.settle(&[(14, 1)]).await;
    for v in ["1", "2", "3", "4"] {
        c.put("f", v).await;
    }
    s.settle(&[(0, 30), (14, 3)]).await;
    // A start at the current revision replays that revision.
    s.create(WatchCreateRequest {
        start_revision: 31,
        ..watch_key("f")
    })
    .await;
    s.settle(&[(15, 2)]).await;
    s.progress().await;
    s.settle(&[(-1, 5)]).await;
    s.drain(Duration::from_millis(300)).await;

    assert_sequences(
        &[("main", &s)],
        &[
            ("main", -1, &[dup, empty, empty, "w-1 r2", "w-1 r31"]),
            (
                "main",
                0,
                &[
                    "w0 r2 created",
                    "w0 r3 | PUT a=1 c2 m3 v2",
                    "w0 r4 | PUT b=1 c4 m4 v1",
                    "w0 r5 | PUT c=1 c5 m5 v1",
                    "w0 r6 | PUT d=1 c6 m6 v1",
                    "w0 r7 | PUT e=1 c7 m7 v1",
                    "w0 r8 | PUT y=1 c8 m8 v1",
                    "w0 r9 | PUT x=1 c9 m9 v1",
                    "w0 r10 | PUT t/c=0 c10 m10 v1",
                    "w0 r11 | PUT t/a=1 c11 m11 v1 | PUT t/b=1 c11 m11 v1 | DELETE t/c m11 | PUT t/d=1 c11 m11 v1",
                    "w0 r12 | PUT ls/b=v c12 m12 v1 lease0x77",
                    "w0 r13 | PUT ls/a=v c13 m13 v1 lease0x77",
                    "w0 r14 | PUT ls/c=v c14 m14 v1 lease0x77",
                    "w0 r15 | DELETE ls/a m15 | DELETE ls/b m15 | DELETE ls/c m15",
                    "w0 r16 | PUT fl/a=1 c16 m16 v1 | PUT fl/b=1 c16 m16 v1",
                    "w0 r17 | DELETE fl/a m17 | DELETE fl/b m17",
                    "w0 r18 | PUT fl/z=1 c18 m18 v1",
                    "w0 r19 | PUT pk=1 c19 m19 v1",
                    "w0 r20 | PUT pk=2 c19 m20 v2",
                    "w0 r21 | DELETE pk m21",
                    "w0 r22 | PUT pk=3 c22 m22 v1",
                    "w0 r23 | PUT h=1 c23 m23 v1",
                    "w0 r24 | PUT h=2 c23 m24 v2",
                    "w0 r25 | DELETE h m25",
                    "w0 r26 | PUT h=3 c26 m26 v1",
                    "w0 r27 | PUT h=4 c26 m27 v2",
                    "w0 r28 | PUT f=1 c28 m28 v1",
                    "w0 r29 | PUT f=2 c28 m29 v2",
                    "w0 r30 | PUT f=3 c28 m30 v3",
                    "w0 r31 | PUT f=4 c28 m31 v4",
                ],
            ),
            ("main", 1, &["w1 r2 created", "w1 r3 | PUT a=1 c2 m3 v2"]),
            ("main", 2, &["w2 r2 created", "w2 r6 | PUT d=1 c6 m6 v1"]),
            ("main", 3, &["w3 r2 created", "w3 r7 | PUT e=1 c7 m7 v1"]),
            ("main", 4, &["w4 r2 created", "w4 r7 | PUT e=1 c7 m7 v1"]),
            (
                "main",
                5,
                &[
                    "w5 r2 created",
                    "w5 r8 | PUT y=1 c8 m8 v1",
                    "w5 r9 | PUT x=1 c9 m9 v1",
                ],
            ),
            ("main", 6, &["w6 r2 created", "w6 r2 canceled"]),
            ("main", 7, &["w7 r2 created", "w7 r5 | PUT c=1 c5 m5 v1"]),
            (
                "main",
                8,
                &[
                    "w8 r10 created",
                    "w8 r11 | PUT t/a=1 c11 m11 v1 | PUT t/b=1 c11 m11 v1 | DELETE t/c m11 | PUT t/d=1 c11 m11 v1",
                ],
            ),
            (
                "main",
                9,
                &[
                    "w9 r14 created",
                    "w9 r15 | DELETE ls/a m15 | DELETE ls/b m15 | DELETE ls/c m15",
                ],
            ),
            (
                "main",
                10,
                &[
                    "w10 r15 created",
                    "w10 r17 | DELETE fl/a m17 | DELETE fl/b m17",
                ],
            ),
            (
                "main",
                11,
                &[
                    "w11 r15 created",
                    "w11 r16 | PUT fl/a=1 c16 m16 v1 | PUT fl/b=1 c16 m16 v1",
                    "w11 r18 | PUT fl/z=1 c18 m18 v1",
                ],
            ),
            (
                "main",
                12,
                &[
                    "w12 r18 created",
                    "w12 r19 | PUT pk=1 c19 m19 v1",
                    "w12 r20 | PUT pk=2 c19 m20 v2 prev(pk=1 c19 m19 v1)",
                    "w12 r21 | DELETE pk m21 prev(pk=2 c19 m20 v2)",
                    "w12 r22 | PUT pk=3 c22 m22 v1",
                ],
            ),
            (
                "main",
                13,
                &[
                    "w13 r26 created",
                    "w13 r26 | PUT h=1 c23 m23 v1 | PUT h=2 c23 m24 v2 | DELETE h m25 | PUT h=3 c26 m26 v1",
                    "w13 r27 | PUT h=4 c26 m27 v2",
                ],
            ),
            (
                "main",
                14,
                &[
                    "w14 r27 created",
                    "w14 r30 | PUT f=3 c28 m30 v3",
                    "w14 r31 | PUT f=4 c28 m31 v4",
                ],
            ),
            (
                "main",
                15,
                &["w15 r31 created", "w15 r31 | PUT f=4 c28 m31 v4"],
            ),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_api_matches_etcd_semantics_on_etcd() {
    tokio::time::timeout(
        Duration::from_secs(40),
        on_etcd(
            "watch_api_matches_etcd_semantics_on_etcd",
            SCENARIO_FLAGS,
            watch_api_semantics,
        ),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_api_matches_etcd_semantics() {
    tokio::time::timeout(
        Duration::from_secs(40),
        on_ours(SCENARIO_FLAGS, watch_api_semantics),
    )
    .await
    .expect("test timed out");
}

// ---- compaction ------------------------------------------------------------------------------

/// A start revision below the compaction revision: the watcher is created, then canceled with
/// the compaction revision (a header at revision 0, as etcd's compaction notice carries no
/// revision); its id stays taken until the client cancels it. A start exactly at the
/// compaction revision replays from there.
async fn compacted_start_revisions(endpoint: String) {
    let mut c = client(&endpoint);
    assert_eq!(c.put("h", "1").await, 2, "a fresh store is at revision 1");
    c.put("h", "2").await;
    c.delete("h", false).await;
    c.put("h", "3").await;
    c.compact(3).await;

    let mut s = WatchStream::open(
        &mut c,
        WatchCreateRequest {
            start_revision: 2,
            ..watch_key("h")
        },
    )
    .await;
    s.settle(&[(0, 2)]).await;
    s.create(WatchCreateRequest {
        start_revision: 3,
        ..watch_key("h")
    })
    .await;
    s.settle(&[(1, 2)]).await;
    // A client-chosen id, compacted out, then reused before and after its cancel.
    s.create(WatchCreateRequest {
        start_revision: 1,
        watch_id: 41,
        ..watch_key("h")
    })
    .await;
    s.settle(&[(41, 2)]).await;
    s.create(WatchCreateRequest {
        watch_id: 41,
        ..watch_key("h")
    })
    .await;
    s.cancel(41).await;
    s.create(WatchCreateRequest {
        watch_id: 41,
        ..watch_key("h")
    })
    .await;
    s.sync_control().await;
    c.put("h", "4").await;
    s.settle(&[(1, 3), (41, 5)]).await;
    s.drain(Duration::from_millis(300)).await;
    assert_sequences(
        &[("compacted", &s)],
        &[
            (
                "compacted",
                0,
                &["w0 r5 created", "w0 r0 canceled compact3"],
            ),
            (
                "compacted",
                1,
                &[
                    "w1 r5 created",
                    "w1 r5 | PUT h=2 c2 m3 v2 | DELETE h m4 | PUT h=3 c5 m5 v1",
                    "w1 r6 | PUT h=4 c5 m6 v2",
                ],
            ),
            (
                "compacted",
                41,
                &[
                    "w41 r5 created",
                    "w41 r0 canceled compact3",
                    "w41 r5 canceled",
                    "w41 r5 created",
                    "w41 r6 | PUT h=4 c5 m6 v2",
                ],
            ),
            (
                "compacted",
                -1,
                &[
                    r#"w-1 r5 created canceled reason="mvcc: duplicate watch ID provided on the WatchStream""#,
                    "w-1 r5",
                ],
            ),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_start_revision_matches_etcd_on_etcd() {
    tokio::time::timeout(
        Duration::from_secs(40),
        on_etcd(
            "compacted_start_revision_matches_etcd_on_etcd",
            SCENARIO_FLAGS,
            compacted_start_revisions,
        ),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_start_revision_matches_etcd() {
    tokio::time::timeout(
        Duration::from_secs(40),
        on_ours(SCENARIO_FLAGS, compacted_start_revisions),
    )
    .await
    .expect("test timed out");
}

// ---- fragments -------------------------------------------------------------------------------

/// `--max-request-bytes` of SCENARIO_FLAGS.
const MAX_REQUEST_BYTES: usize = 4096;
/// etcd's watch server splits `fragment` responses at `--max-request-bytes` plus its gRPC
/// head-room of 512 KiB (`grpcOverheadBytes`), not at the request limit itself.
const FRAGMENT_LIMIT: usize = MAX_REQUEST_BYTES + 512 * 1024;
/// Keys deleted in the one revision whose response is fragmented.
const FRAGMENT_KEYS: usize = 160;
/// Their values: small enough for a put under MAX_REQUEST_BYTES, large enough that their
/// prev_kv deletes outgrow FRAGMENT_LIMIT in one response.
const FRAGMENT_VALUE: usize = 3500;

/// The rendered events of `rs`, in order.
fn events_of(rs: &[&WatchResponse]) -> Vec<String> {
    rs.iter()
        .flat_map(|r| r.events.iter().map(show_event))
        .collect()
}

/// Asserts `got == want`, naming the first difference rather than printing both lists.
fn assert_same_events(what: &str, got: &[String], want: &[String]) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "{what}: {} events where {} were expected; event {i} is {:?}, expected {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

/// With `fragment`, a response over FRAGMENT_LIMIT (one revision: a prefix delete with
/// prev_kv of FRAGMENT_KEYS large values) arrives in pieces: each under the limit and as full
/// as etcd's greedy split makes it, all but the last flagged `fragment`, together every event
/// in order. Without `fragment` it arrives whole; under the limit it is not split.
async fn fragmented_responses(endpoint: String) {
    let mut c = client(&endpoint);
    let value = vec![b'v'; FRAGMENT_VALUE];
    let key = |i: usize| format!("fr/{i:03}");
    for i in 0..FRAGMENT_KEYS {
        c.put_with(&key(i), &value, 0).await;
    }
    let rev = c.revision().await;
    assert_eq!(
        rev,
        1 + FRAGMENT_KEYS as i64,
        "a fresh store is at revision 1"
    );
    let mut s = WatchStream::open(
        &mut c,
        WatchCreateRequest {
            prev_kv: true,
            fragment: true,
            ..watch_prefix("fr/")
        },
    )
    .await;
    s.create(WatchCreateRequest {
        prev_kv: true,
        ..watch_prefix("fr/")
    })
    .await;
    s.create(WatchCreateRequest {
        fragment: true,
        ..watch_prefix("fr/")
    })
    .await;
    s.settle(&[(0, 1), (1, 1), (2, 1)]).await;
    assert_eq!(c.delete("fr/", true).await, rev + 1);
    // Pieces of w0 until one is not flagged `fragment`; w1 and w2 get one response each.
    let deadline = Instant::now() + RESPONSE_WAIT;
    while !(s
        .raw
        .iter()
        .any(|r| r.watch_id == 0 && !r.created && !r.fragment)
        && s.of(1).len() == 2
        && s.of(2).len() == 2)
    {
        s.recv_within(deadline.saturating_duration_since(Instant::now()))
            .await;
    }
    s.drain(Duration::from_millis(300)).await;

    let deleted = rev + 1;
    let want: Vec<String> = (0..FRAGMENT_KEYS)
        .map(|i| {
            let (k, r) = (key(i), i + 2);
            format!("DELETE {k} m{deleted} prev({k}=<{FRAGMENT_VALUE} bytes> c{r} m{r} v1)")
        })
        .collect();
    let of = |id: i64| -> Vec<&WatchResponse> {
        s.raw
            .iter()
            .filter(|r| r.watch_id == id && !r.created)
            .collect()
    };
    let (pieces, whole, small) = (of(0), of(1), of(2));
    // The whole response, for the watcher without `fragment`.
    assert_eq!(whole.len(), 1, "{:?}", s.of(1));
    assert!(prost::Message::encoded_len(whole[0]) >= FRAGMENT_LIMIT);
    assert!(!whole[0].fragment);
    assert_same_events("the whole response", &events_of(&whole), &want);
    // Without prev_kv the deletes are small: one response, not flagged.
    assert_eq!(small.len(), 1, "{:?}", s.of(2));
    assert!(!small[0].fragment && small[0].events.len() == FRAGMENT_KEYS);
    // The pieces.
    assert_same_events("the pieces", &events_of(&pieces), &want);
    let shape = format!(
        "{} pieces of (events, bytes) {:?}",
        pieces.len(),
        pieces
            .iter()
            .map(|r| (r.events.len(), prost::Message::encoded_len(*r)))
            .collect::<Vec<_>>()
    );
    eprintln!("fragments: {shape}");
    assert!(
        pieces.len() >= 2,
        "a response of {} bytes was not split at {FRAGMENT_LIMIT}: {shape}",
        prost::Message::encoded_len(whole[0])
    );
    for (i, piece) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        assert_eq!(piece.fragment, !last, "fragment flags of {shape}");
        assert_eq!(piece.header, pieces[0].header, "one header for every piece");
        let size = prost::Message::encoded_len(*piece);
        assert!(
            size < FRAGMENT_LIMIT,
            "a piece of {size} bytes, over the limit of {FRAGMENT_LIMIT}: {shape}"
        );
        // etcd fills each piece while it stays under the limit.
        if !last {
            let mut fuller = (*piece).clone();
            fuller.events.push(pieces[i + 1].events[0].clone());
            assert!(
                prost::Message::encoded_len(&fuller) >= FRAGMENT_LIMIT,
                "piece {i} could hold another event under {FRAGMENT_LIMIT} bytes: {shape}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_match_etcd_on_etcd() {
    tokio::time::timeout(
        Duration::from_secs(40),
        on_etcd(
            "fragments_match_etcd_on_etcd",
            SCENARIO_FLAGS,
            fragmented_responses,
        ),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_match_etcd() {
    tokio::time::timeout(
        Duration::from_secs(40),
        on_ours(SCENARIO_FLAGS, fragmented_responses),
    )
    .await
    .expect("test timed out");
}

// ---- progress notifications --------------------------------------------------------------------

/// The progress interval of SCENARIO_FLAGS.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Receives until watch `id` of `s` gets an empty response at `revision`; returns when.
async fn await_progress(s: &mut WatchStream, id: i64, revision: i64) -> Instant {
    // etcd skips the first tick after a watcher was sent something.
    let within = 3 * PROGRESS_INTERVAL + Duration::from_millis(500);
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = s.recv_within(left).await;
        if r.watch_id == id
            && r.events.is_empty()
            && !r.created
            && r.header.as_ref().is_some_and(|h| h.revision == revision)
        {
            return Instant::now();
        }
    }
}

/// `progress_notify` with `--experimental-watch-progress-notify-interval 1s`: an idle
/// watcher hears an empty response with its id and the current revision every interval; one
/// that was sent events skips a tick; watchers without it hear nothing.
async fn progress_notifications(endpoint: String) {
    let mut c = client(&endpoint);
    assert_eq!(c.put("x", "0").await, 2, "a fresh store is at revision 1");
    let mut s = WatchStream::open(
        &mut c,
        WatchCreateRequest {
            progress_notify: true,
            ..watch_key("pn")
        },
    )
    .await;
    s.create(watch_key("pn2")).await;
    s.settle(&[(0, 1), (1, 1)]).await;
    let created = Instant::now();
    let first = await_progress(&mut s, 0, 2).await;
    let second = await_progress(&mut s, 0, 2).await;
    assert!(
        second - first >= PROGRESS_INTERVAL / 2,
        "progress responses {:?} apart, at an interval of {PROGRESS_INTERVAL:?}",
        second - first
    );
    assert!(first - created <= 2 * PROGRESS_INTERVAL + Duration::from_millis(500));
    // A write elsewhere moves the revision the next notice reports.
    c.put("x", "1").await;
    await_progress(&mut s, 0, 3).await;
    c.put("pn", "1").await;
    await_progress(&mut s, 0, 4).await;
    s.progress().await;
    s.settle(&[(-1, 1)]).await;
    assert_sequences(
        &[("progress", &s)],
        &[
            (
                "progress",
                0,
                &[
                    "w0 r2 created",
                    "w0 r2",
                    "w0 r2",
                    "w0 r3",
                    "w0 r4 | PUT pn=1 c4 m4 v1",
                    "w0 r4",
                ],
            ),
            ("progress", 1, &["w1 r2 created"]),
            ("progress", -1, &["w-1 r4"]),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notify_matches_etcd_on_etcd() {
    tokio::time::timeout(
        Duration::from_secs(40),
        on_etcd(
            "progress_notify_matches_etcd_on_etcd",
            SCENARIO_FLAGS,
            progress_notifications,
        ),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notify_matches_etcd() {
    tokio::time::timeout(
        Duration::from_secs(40),
        on_ours(SCENARIO_FLAGS, progress_notifications),
    )
    .await
    .expect("test timed out");
}

// ---- three members: watches on followers, checked against a model of the history ------------

/// Cluster tests of this file run one at a time: several three-member clusters at once on a
/// 2-core CI machine would starve heartbeats.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One operation of a write.
#[derive(Clone, Debug)]
enum Op {
    /// Put key, value, lease (0: none).
    Put(String, String, i64),
    /// Delete one key (nothing if absent).
    Delete(String),
    /// Delete every key under a prefix.
    DeletePrefix(String),
    /// Revoke a lease: delete its keys.
    Revoke(i64),
}

/// An acknowledged write that made a revision: its operations, applied atomically.
#[derive(Clone, Debug)]
struct Write {
    revision: i64,
    ops: Vec<Op>,
}

/// Steps each writer takes.
const WRITER_STEPS: usize = 30;

/// Writes under `c/{w}/` through `endpoint`: puts, txns of two puts and a delete, deletes,
/// prefix deletes, and a lease revoke of three keys. Returns the writes that made a revision.
async fn writer(
    endpoint: String,
    w: usize,
    done: Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<Write> {
    let mut c = client(&endpoint);
    let mut writes = Vec::new();
    let p = format!("c/{w}/");
    for i in 0..WRITER_STEPS {
        let key = |n: usize| format!("{p}k{}", n % 3);
        let value = format!("{w}.{i}");
        let (revision, ops) = match i % 5 {
            0 | 3 => {
                let k = key(i + i / 5);
                (Some(c.put(&k, &value).await), vec![Op::Put(k, value, 0)])
            }
            1 => {
                let (a, b, d) = (format!("{p}t{i}a"), format!("{p}t{i}b"), key(i + 1));
                let rev = c
                    .txn(vec![put_op(&a, &value), put_op(&b, &value), delete_op(&d)])
                    .await;
                let ops = vec![
                    Op::Put(a, value.clone(), 0),
                    Op::Put(b, value, 0),
                    Op::Delete(d),
                ];
                (Some(rev), ops)
            }
            2 => {
                let k = key(i);
                let (rev, n) = c.delete_counted(&k, false).await;
                ((n > 0).then_some(rev), vec![Op::Delete(k)])
            }
            _ => {
                let t = format!("{p}t");
                let (rev, n) = c.delete_counted(&t, true).await;
                ((n > 0).then_some(rev), vec![Op::DeletePrefix(t)])
            }
        };
        if let Some(revision) = revision {
            writes.push(Write { revision, ops });
        }
        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let lease = 0x100 + w as i64;
    c.grant(lease, 60).await;
    for n in [2, 0, 1] {
        let k = format!("{p}l{n}");
        let revision = c.put_with(&k, b"leased", lease).await;
        writes.push(Write {
            revision,
            ops: vec![Op::Put(k, "leased".into(), lease)],
        });
    }
    writes.push(Write {
        revision: c.revoke(lease).await,
        ops: vec![Op::Revoke(lease)],
    });
    writes
}

/// The events of every write, by revision, as a watcher of everything under `c/` sees them
/// (with previous key-values when `prev_kv`): replayed from the writes alone.
fn model_events(writes: &[Write], prev_kv: bool) -> Vec<(i64, Vec<String>)> {
    let mut writes = writes.to_vec();
    writes.sort_by_key(|w| w.revision);
    for pair in writes.windows(2) {
        assert_eq!(
            pair[1].revision,
            pair[0].revision + 1,
            "acknowledged writes leave no revision unaccounted for: {pair:?}"
        );
    }
    let mut state: BTreeMap<String, KeyValue> = BTreeMap::new();
    let mut out = Vec::new();
    for w in &writes {
        let rev = w.revision;
        let mut events = Vec::new();
        let delete =
            |state: &mut BTreeMap<String, KeyValue>, key: &str, events: &mut Vec<Event>| {
                if let Some(prev) = state.remove(key) {
                    events.push(Event {
                        r#type: EventType::Delete as i32,
                        kv: Some(KeyValue {
                            key: key.as_bytes().to_vec().into(),
                            mod_revision: rev,
                            ..Default::default()
                        }),
                        prev_kv: prev_kv.then_some(prev),
                    });
                }
            };
        for op in &w.ops {
            match op {
                Op::Put(key, value, lease) => {
                    let prev = state.get(key).cloned();
                    let kv = KeyValue {
                        key: key.clone().into_bytes().into(),
                        value: value.clone().into_bytes().into(),
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        lease: *lease,
                    };
                    state.insert(key.clone(), kv.clone());
                    events.push(Event {
                        r#type: EventType::Put as i32,
                        kv: Some(kv),
                        prev_kv: if prev_kv { prev } else { None },
                    });
                }
                Op::Delete(key) => delete(&mut state, key, &mut events),
                Op::DeletePrefix(prefix) => {
                    let end = String::from_utf8(prefix_end(prefix.as_bytes())).expect("ASCII keys");
                    let keys: Vec<String> = state
                        .range(prefix.clone()..end)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in keys {
                        delete(&mut state, &k, &mut events);
                    }
                }
                Op::Revoke(lease) => {
                    let keys: Vec<String> = state
                        .iter()
                        .filter(|(_, kv)| kv.lease == *lease)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in keys {
                        delete(&mut state, &k, &mut events);
                    }
                }
            }
        }
        assert!(
            !events.is_empty(),
            "a write that made a revision has events: {w:?}"
        );
        out.push((rev, events.iter().map(show_event).collect()));
    }
    out
}

/// Checks what watch `id` of `s` received from `from` on against the model: revisions in
/// order, each whole in one response (never split), none missing or repeated, every event
/// as the model has it, each response's header at or past its events.
fn check_history(what: &str, s: &WatchStream, id: i64, model: &[(i64, Vec<String>)], from: i64) {
    let mut got: Vec<(i64, Vec<String>)> = Vec::new();
    for r in s.raw.iter().filter(|r| r.watch_id == id && !r.created) {
        assert!(!r.canceled && !r.fragment, "{what}: {}", show(r));
        let header = r.header.as_ref().map_or(0, |h| h.revision);
        let mut last = got.last().map_or(0, |g| g.0);
        let first_in_response = got.len();
        for ev in &r.events {
            let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            assert!(
                rev <= header,
                "{what}: an event past its header: {}",
                show(r)
            );
            if rev == last && got.len() > first_in_response {
                got.last_mut().expect("a revision").1.push(show_event(ev));
            } else {
                assert!(
                    rev > last,
                    "{what}: revision {rev} after {last}, or split over two responses: {}",
                    show(r)
                );
                got.push((rev, vec![show_event(ev)]));
                last = rev;
            }
        }
    }
    let want: Vec<(i64, Vec<String>)> = model.iter().filter(|(r, _)| *r >= from).cloned().collect();
    if got != want {
        let first = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i));
        panic!(
            "{what}: {} revisions where the model has {}; first difference at {first:?}:\n \
             got  {:?}\n want {:?}",
            got.len(),
            want.len(),
            first.and_then(|i| got.get(i)),
            first.and_then(|i| want.get(i))
        );
    }
}

/// Receives until watch `id` of `s` has an event at `revision`.
async fn await_revision(s: &mut WatchStream, id: i64, revision: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !s.raw.iter().any(|r| {
        r.watch_id == id
            && r.events
                .iter()
                .any(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision == revision))
    }) {
        s.recv_within(deadline.saturating_duration_since(Instant::now()))
            .await;
    }
}

/// Waits until the member at `endpoint` reports a leader and a term.
async fn wait_settled(endpoint: &str) {
    let channel = Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint URL")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let mut m = MaintenanceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = m.status(StatusRequest {}).await {
            let s = s.into_inner();
            if s.leader != 0 && s.raft_term != 0 && s.header.is_some_and(|h| h.raft_term != 0) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{endpoint} never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two writers, one through the leader and one through a follower, write concurrently under
/// `c/`. Watchers on the leader and on a follower (one with prev_kv), and one on the other
/// follower that starts from history while the writers are busy, each receive every revision
/// whole, in order, exactly as a model replaying the acknowledged writes has it; a watch
/// resumed from the middle continues exactly. Responses carry the serving member's id.
async fn follower_watches(members: &impl Members) {
    let leader = wait_leader_among(members, &[0, 1, 2], Duration::from_secs(20)).await;
    let (f1, f2) = ((leader + 1) % 3, (leader + 2) % 3);
    let ep = |i: usize| members.endpoint_of(i).expect("member runs");
    // Every member knows the leader and its term before the watches open: a kv-server member
    // that has not heard from the first leader yet answers with raft_term 0 (etcd starts at
    // term 1), which the header checks would flag.
    for i in [leader, f1, f2] {
        wait_settled(&ep(i)).await;
    }
    let (mut lc, mut f1c, mut f2c) = (client(&ep(leader)), client(&ep(f1)), client(&ep(f2)));
    let start = lc.revision().await + 1;

    let mut on_leader = WatchStream::open(&mut lc, watch_prefix("c/")).await;
    let mut on_f1 = WatchStream::open(&mut f1c, watch_prefix("c/")).await;
    on_f1
        .create(WatchCreateRequest {
            prev_kv: true,
            ..watch_prefix("c/")
        })
        .await;
    on_leader.settle(&[(0, 1)]).await;
    on_f1.settle(&[(0, 1), (1, 1)]).await;

    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers = [
        tokio::spawn(writer(ep(leader), 0, done.clone())),
        tokio::spawn(writer(ep(f1), 1, done.clone())),
    ];
    // A catch-up from history on the other follower, while the writers are busy.
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.load(std::sync::atomic::Ordering::Relaxed) < WRITER_STEPS / 2 {
        assert!(Instant::now() < deadline, "the writers stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut on_f2 = WatchStream::open(
        &mut f2c,
        WatchCreateRequest {
            start_revision: start,
            ..watch_prefix("c/")
        },
    )
    .await;
    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await.expect("writer"));
    }
    let last = writes.iter().map(|w| w.revision).max().expect("writes");
    assert_eq!(writes.iter().map(|w| w.revision).min(), Some(start));
    let model = model_events(&writes, false);
    let model_prev = model_events(&writes, true);

    await_revision(&mut on_leader, 0, last).await;
    await_revision(&mut on_f1, 0, last).await;
    await_revision(&mut on_f1, 1, last).await;
    await_revision(&mut on_f2, 0, last).await;
    check_history("leader", &on_leader, 0, &model, start);
    check_history("follower", &on_f1, 0, &model, start);
    check_history("follower with prev_kv", &on_f1, 1, &model_prev, start);
    check_history("follower from history", &on_f2, 0, &model, start);

    // Resumable: a watch from the middle of the history on a follower continues exactly.
    let middle = (start + last) / 2;
    let mut resumed = WatchStream::open(
        &mut f2c,
        WatchCreateRequest {
            start_revision: middle,
            prev_kv: true,
            ..watch_prefix("c/")
        },
    )
    .await;
    await_revision(&mut resumed, 0, last).await;
    check_history("resumed on a follower", &resumed, 0, &model_prev, middle);
    eprintln!(
        "{} writes, revisions {start}..={last}, the same on every watcher",
        writes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_on_followers_see_the_history_on_three_etcd_members() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let cluster = match EtcdCluster::start(3) {
            Ok(c) => c,
            Err(why) => {
                return eprintln!(
                    "SKIP watches_on_followers_see_the_history_on_three_etcd_members: {why}"
                );
            }
        };
        follower_watches(&cluster).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_on_followers_see_the_history_on_three_members() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let cluster = Cluster::start(3);
        follower_watches(&cluster).await;
    })
    .await
    .expect("test timed out");
}

// ---- etcdctl ---------------------------------------------------------------------------------

/// How long an etcdctl watch may take to print what it was sent.
const ETCDCTL_WAIT: Duration = Duration::from_secs(10);
/// The value of the writes that tell when a watch without a start revision is live.
const PING: &str = "ping";

/// A running `etcdctl watch`, its output collected by threads. Dropping it kills it, by PID.
struct EtcdctlWatch {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    command: String,
}

impl Drop for EtcdctlWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(
    mut from: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&buf[..n]);
        }
    })
}

impl EtcdctlWatch {
    /// Starts `etcdctl watch <args>` against `endpoint`.
    fn spawn(endpoint: &str, args: &[&str]) -> EtcdctlWatch {
        let etcdctl = which("etcdctl").expect("etcdctl is installed");
        let mut child = Command::new(etcdctl)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(["--dial-timeout=5s", "--command-timeout=20s", "watch"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl watch");
        let (out, err) = (Arc::default(), Arc::default());
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), Arc::clone(&out)),
            collect(child.stderr.take().expect("piped stderr"), Arc::clone(&err)),
        ];
        EtcdctlWatch {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            readers,
            command: format!("watch {}", args.join(" ")),
        }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits until stdout satisfies `done`; false after `within`.
    fn wait_for(&self, within: Duration, done: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if done(&self.stdout()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        done(&self.stdout())
    }

    /// Waits until stdout has a line equal to `line`, `n` times; false after ETCDCTL_WAIT.
    fn wait_line(&self, line: &str, n: usize) -> bool {
        self.wait_for(ETCDCTL_WAIT, |out| {
            out.lines().filter(|l| *l == line).count() >= n
        })
    }

    /// Writes a line to stdin (interactive mode).
    fn send_line(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").expect("write etcdctl's stdin");
        stdin.flush().expect("flush etcdctl's stdin");
    }

    /// Waits for the process to exit by itself; its exit code, or None after `within`.
    fn exit_within(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Kills the watch if it still runs; returns "[exit N]" or "[killed]", stdout, stderr.
    fn finish(mut self) -> (String, String, String) {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("[exit {}]", status.code().unwrap_or(-1)),
            _ => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                "[killed]".to_string()
            }
        };
        for r in std::mem::take(&mut self.readers) {
            let _ = r.join();
        }
        let err = String::from_utf8_lossy(&self.err.lock().unwrap_or_else(|e| e.into_inner()))
            .into_owned();
        (status, self.stdout(), err)
    }
}

/// Runs etcdctl (not `watch`) and checks it succeeded.
fn etcdctl_ok(endpoint: &str, args: &[&str]) {
    let out = etcdctl(endpoint, args);
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The revisions the pings of a session took, so that revisions can be compared across
/// servers that needed different numbers of pings.
#[derive(Default)]
struct Pings(Vec<(i64, i64)>);

impl Pings {
    /// `revision` as if no ping had been written.
    fn norm(&self, revision: i64) -> i64 {
        let taken: i64 = self
            .0
            .iter()
            .map(|(base, n)| (revision - 1 - base).clamp(0, *n))
            .sum();
        revision - taken
    }

    /// `text` with the number after each of `marks` normalised.
    fn norm_text(&self, text: &str, marks: &[&str]) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some((at, mark)) = marks
            .iter()
            .filter_map(|m| rest.find(m).map(|at| (at, *m)))
            .min()
        {
            let from = at + mark.len();
            let digits = rest[from..]
                .chars()
                .take_while(char::is_ascii_digit)
                .count();
            out.push_str(&rest[..from]);
            match rest[from..from + digits].parse::<i64>() {
                Ok(n) => out.push_str(&self.norm(n).to_string()),
                Err(_) => out.push_str(&rest[from..from + digits]),
            }
            rest = &rest[from + digits..];
        }
        out.push_str(rest);
        out
    }
}

/// Puts `key`=PING until `w` prints it (`needle`: how its output shows a ping): then the
/// watch is live. The revisions the pings took go to `pings`.
fn ping_until_live(endpoint: &str, w: &EtcdctlWatch, key: &str, needle: &str, pings: &mut Pings) {
    let base = etcdctl_revision(endpoint);
    for n in 1..=50 {
        etcdctl_ok(endpoint, &["put", key, PING]);
        if w.wait_for(Duration::from_millis(200), |out| out.contains(needle)) {
            pings.0.push((base, n));
            return;
        }
    }
    panic!(
        "etcdctl {} never printed its pings: {}",
        w.command,
        w.stdout()
    );
}

/// Simple output without its leading ping events (blocks from a `PUT`/`DELETE` line whose
/// last line is the ping value).
fn without_pings(out: &str) -> String {
    let lines: Vec<&str> = out.lines().collect();
    let mut blocks: Vec<&[&str]> = Vec::new();
    let mut start = 0;
    for i in 1..=lines.len() {
        if i == lines.len() || lines[i] == "PUT" || lines[i] == "DELETE" {
            blocks.push(&lines[start..i]);
            start = i;
        }
    }
    let keep = blocks
        .iter()
        .position(|b| b.last() != Some(&PING))
        .unwrap_or(blocks.len());
    blocks[keep..]
        .iter()
        .flat_map(|b| b.iter())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `-w json` output, one response a line, normalised: lines whose events are all pings of
/// `ping_key` dropped; cluster id, member id and term zeroed (checked set); revisions as if
/// there had been no pings.
fn json_lines(out: &str, ping_key: Option<&str>, pings: &Pings) -> String {
    use serde_json::Value;
    fn walk(v: &mut Value, pings: &Pings) {
        match v {
            Value::Object(map) => {
                for (k, field) in map.iter_mut() {
                    match k.as_str() {
                        "cluster_id" | "member_id" | "raft_term" => {
                            assert!(field.as_u64().is_some_and(|n| n > 0), "{k} = {field}");
                            *field = Value::from(0);
                        }
                        "revision" | "create_revision" | "mod_revision" | "CompactRevision" => {
                            let n = field.as_i64().expect("a revision");
                            *field = Value::from(pings.norm(n));
                        }
                        _ => walk(field, pings),
                    }
                }
            }
            Value::Array(list) => list.iter_mut().for_each(|x| walk(x, pings)),
            _ => {}
        }
    }
    let ping_b64 = ping_key.map(|k| base64(k.as_bytes()));
    let mut text = String::new();
    for line in out.lines() {
        let mut v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let events = v["Events"].as_array().cloned().unwrap_or_default();
        if ping_b64.is_some()
            && !events.is_empty()
            && events
                .iter()
                .all(|e| e["kv"]["key"].as_str() == ping_b64.as_deref())
        {
            continue;
        }
        walk(&mut v, pings);
        text.push_str(&format!("{v}\n"));
    }
    text
}

/// Standard base64 (for matching etcdctl's JSON keys).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The current revision, through etcdctl.
fn etcdctl_revision(endpoint: &str) -> i64 {
    let out = etcdctl(endpoint, &["get", "rev", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("get -w json");
    v["header"]["revision"].as_i64().expect("a revision")
}

/// An etcdctl watch session against `endpoint`: each watch as a transcript entry of its
/// command, how it ended, its normalised stdout and its stderr. Revisions are as if the pings
/// (as many as each server needed) had not been written.
fn etcdctl_watch_session(endpoint: &str) -> Vec<String> {
    let mut transcript = Vec::new();
    let mut pings = Pings::default();
    let mut record = |w: EtcdctlWatch, pings: &Pings, normalise: &dyn Fn(&str) -> String| {
        let command = pings.norm_text(&w.command, &["--rev="]);
        let (status, out, err) = w.finish();
        let out = pings.norm_text(&normalise(&out), &["exec "]);
        transcript.push(format!("$ etcdctl {command}\n{status}\n{out}{err}"));
    };
    let put = |k: &str, v: &str| etcdctl_ok(endpoint, &["put", k, v]);
    let del = |args: &[&str]| {
        let mut all = vec!["del"];
        all.extend_from_slice(args);
        etcdctl_ok(endpoint, &all);
    };
    let same = |out: &str| out.to_string();

    // One key: puts and a delete.
    let w = EtcdctlWatch::spawn(endpoint, &["w1"]);
    ping_until_live(endpoint, &w, "w1", "\nping\n", &mut pings);
    put("w1", "v1");
    put("w1", "v2");
    del(&["w1"]);
    put("w1", "end");
    w.wait_line("end", 1);
    record(w, &pings, &without_pings);

    // A prefix; a key outside it is not seen; a prefix delete is one response.
    let w = EtcdctlWatch::spawn(endpoint, &["--prefix", "p/"]);
    ping_until_live(endpoint, &w, "p/ping", "\nping\n", &mut pings);
    put("p/1", "one");
    put("q", "outside");
    put("p/2", "two");
    del(&["p/", "--prefix"]);
    put("p/end", "end");
    w.wait_line("end", 1);
    record(w, &pings, &without_pings);

    // prev-kv.
    let w = EtcdctlWatch::spawn(endpoint, &["--prev-kv", "pk"]);
    ping_until_live(endpoint, &w, "pk", "\nping\n", &mut pings);
    put("pk", "a");
    put("pk", "b");
    del(&["pk"]);
    put("pk", "end");
    w.wait_line("end", 1);
    record(w, &pings, &without_pings);

    // History: --rev in the past, in simple and JSON output, then live.
    let from = etcdctl_revision(endpoint) + 1;
    put("h", "h1");
    put("h", "h2");
    del(&["h"]);
    put("h", "h3");
    let rev = format!("--rev={from}");
    let simple = EtcdctlWatch::spawn(endpoint, &[&rev, "h"]);
    let json = EtcdctlWatch::spawn(endpoint, &[&rev, "h", "-w", "json"]);
    simple.wait_line("h3", 1);
    json.wait_for(ETCDCTL_WAIT, |out| out.lines().count() >= 1);
    put("h", "end");
    simple.wait_line("end", 1);
    json.wait_for(ETCDCTL_WAIT, |out| out.lines().count() >= 2);
    record(simple, &pings, &same);
    record(json, &pings, &|out| json_lines(out, None, &pings));

    // Exec mode: a command per event, with the event in its environment.
    let from = etcdctl_revision(endpoint) + 1;
    put("x", "x1");
    put("x", "x2");
    let rev = format!("--rev={from}");
    let exec =
        "echo exec $ETCD_WATCH_REVISION $ETCD_WATCH_EVENT_TYPE $ETCD_WATCH_KEY $ETCD_WATCH_VALUE";
    let w = EtcdctlWatch::spawn(endpoint, &[&rev, "x", "--", "sh", "-c", exec]);
    w.wait_for(ETCDCTL_WAIT, |out| out.matches("exec ").count() >= 2);
    put("x", "end");
    w.wait_for(ETCDCTL_WAIT, |out| out.contains("\"end\"\n"));
    record(w, &pings, &same);

    // Interactive: two watches on one stream; each write waited for before the next, as the
    // two watches print from goroutines of their own.
    let mut w = EtcdctlWatch::spawn(endpoint, &["-i"]);
    w.send_line("watch ia");
    ping_until_live(endpoint, &w, "ia", "\nping\n", &mut pings);
    w.send_line("watch ib --prev-kv");
    ping_until_live(endpoint, &w, "ib", "\nib\nping\n", &mut pings);
    for (k, v) in [("ia", "i1"), ("ib", "i2"), ("ia", "i3"), ("ib", "i4")] {
        put(k, v);
        w.wait_line(v, 1);
    }
    del(&["ib"]);
    w.wait_for(ETCDCTL_WAIT, |out| out.contains("DELETE\nib\n"));
    put("ia", "end");
    w.wait_line("end", 1);
    record(w, &pings, &without_pings);

    // A txn's puts and deletes: one response (one JSON line).
    put("t/c", "old");
    let w = EtcdctlWatch::spawn(endpoint, &["--prefix", "t/", "-w", "json"]);
    ping_until_live(endpoint, &w, "t/ping", &base64(PING.as_bytes()), &mut pings);
    let txn = etcdctl_stdin(
        endpoint,
        &["txn"],
        "\nput t/a 1\nput t/b 2\ndel t/c\nput t/d 4\n\n\n",
    );
    assert!(txn.status.success(), "{txn:?}");
    put("t/end", "end");
    w.wait_for(ETCDCTL_WAIT, |out| out.contains(&base64(b"end")));
    record(w, &pings, &|out| json_lines(out, Some("t/ping"), &pings));

    // Compaction: a watch from below it is canceled with the reason; from it, it replays.
    let from = etcdctl_revision(endpoint) + 1;
    put("cp", "c1");
    put("cp", "c2");
    put("cp", "c3");
    etcdctl_ok(endpoint, &["compaction", &(from + 1).to_string()]);
    let below = format!("--rev={from}");
    for args in [vec![below.as_str(), "cp"], vec![&below, "cp", "-w", "json"]] {
        let mut w = EtcdctlWatch::spawn(endpoint, &args);
        w.exit_within(ETCDCTL_WAIT);
        if args.contains(&"json") {
            record(w, &pings, &|out| json_lines(out, None, &pings));
        } else {
            record(w, &pings, &same);
        }
    }
    let w = EtcdctlWatch::spawn(endpoint, &[&format!("--rev={}", from + 1), "cp"]);
    w.wait_line("c3", 1);
    record(w, &pings, &same);
    transcript
}

#[test]
fn etcdctl_watch_session_matches_etcd() {
    if !have_etcdctl("etcdctl_watch_session_matches_etcd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = match start_etcd_with(&dir.path().join("etcd"), &[]) {
        Ok(p) => p,
        Err(why) => return eprintln!("SKIP etcdctl_watch_session_matches_etcd: {why}"),
    };
    let ours = start_kv_server(&dir.path().join("ours"), &[]);
    // The sessions run on threads of their own, both at once, so the test is bounded however
    // etcdctl behaves; the servers stay here and die with the test.
    let session = |endpoint: String| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(|| {
                etcdctl_watch_session(&endpoint)
            }));
        });
        rx
    };
    let (want, got) = (
        session(etcd.endpoint.clone()),
        session(ours.endpoint.clone()),
    );
    let finish =
        |rx: std::sync::mpsc::Receiver<std::thread::Result<Vec<String>>>, who: &str| match rx
            .recv_timeout(Duration::from_secs(50))
        {
            Ok(Ok(t)) => t,
            Ok(Err(panic)) => {
                eprintln!("the etcdctl session against {who} failed");
                std::panic::resume_unwind(panic)
            }
            Err(_) => panic!("the etcdctl session against {who} did not finish in 50 s"),
        };
    let want = finish(want, "etcd");
    let got = finish(got, "kv-server");
    // The reference session went as documented.
    for expected in [
        "PUT\nw1\nv1\nPUT\nw1\nv2\nDELETE\nw1\n\nPUT\nw1\nend\n",
        "watch was canceled (etcdserver: mvcc: required revision has been compacted)\n\
         Error: watch is canceled by the server\n",
        "[exit 5]",
    ] {
        assert!(
            want.iter().any(|t| t.contains(expected)),
            "etcd's session lacks {expected:?}:\n{}",
            want.join("\n")
        );
    }
    // The txn is one response: one JSON line with its four events, then the last put's.
    let txn = want
        .iter()
        .find(|t| t.starts_with("$ etcdctl watch --prefix t/ -w json"))
        .expect("the txn watch");
    let lines: Vec<serde_json::Value> = txn
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let events: Vec<usize> = lines
        .iter()
        .map(|l| l["Events"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(events, [4, 1], "{txn}");
    let differ: Vec<String> = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| w != g)
        .map(|(w, g)| format!("etcd:\n{w}ours:\n{g}"))
        .collect();
    assert!(
        differ.is_empty() && want.len() == got.len(),
        "{} of {} etcdctl watches differ from etcd:\n{}",
        differ.len(),
        want.len(),
        differ.join("\n")
    );
}

/// SIGTERM while a client keeps a watch stream open: the member stops by itself within its
/// grace period (open streams are closed after it) instead of waiting on the client forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stops_while_a_client_keeps_a_watch_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_kv_server(&dir.path().join("data"), &[]);
    let channel = Channel::from_shared(format!("http://{}", server.endpoint))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(4);
    let mut responses = WatchClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch stream")
        .into_inner();
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let created = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("created in time")
        .expect("created");
    assert!(created.is_some_and(|r| r.created));
    kv_tests::assert_stops_on_sigterm(server, Duration::from_secs(10)).await;
    drop(tx);
}
