//! Watch guarantees checked over recorded histories, not spot values.
//!
//! Sixteen writers (puts, deletes, multi-key txns, leases granted with keys attached and then
//! revoked) run over 50 keys while watchers of every flavour record every response they get:
//! the whole prefix, a sub-range, one key, prev_kv, NOPUT, NODELETE, one started mid-run at an
//! old revision, and one that keeps dropping its stream and resuming from the revision after
//! the last one it saw (on another member when there are several). After the writers stop, a
//! fence of two revisions (a txn putting every key, then a delete of the prefix) gives every
//! watcher, whatever its filter, a last revision it must reach.
//!
//! The ground truth is then read back on a fresh stream (the prefix from revision 1, never
//! compacted), replayed through a model of the key space (versions, create revisions, the value
//! before each event), and matched against the writes' own answers: every revision is explained
//! by exactly one write, every acknowledged write is at the revision it was told, and a write
//! whose outcome was unknown (a failover) is found by its unique values or not at all. Every
//! watcher must then be
//! * ordered: revisions never go back, and a revision's events come in write order;
//! * unique: no event twice;
//! * atomic: a revision's events arrive in one response (nobody asks for fragments);
//! * reliable: exactly the ground truth's events of its range from its start revision to the
//!   last revision it can be held to (the fence; for a watcher on a killed member, the last
//!   revision it saw);
//! * filtered: NOPUT and NODELETE drop exactly their type; prev_kv is the key's previous value;
//! * resumable: a watch restarted at a revision it saw + 1 sees exactly the rest.
//!
//! The scenario runs on one member and on three members with the leader killed mid-run, each
//! also against etcd 3.4, which proves the scenario and the checker; a pure test breaks each
//! guarantee by hand and expects the checker to name it. A slow-consumer scenario then checks
//! that a stream whose client stops reading costs nobody else: 1,000 watchers on other
//! streams keep their latency, watchers created meanwhile catch up, the server's memory stays
//! bounded, and the slow stream gets every event exactly once when it reads again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv_core::proto::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp,
    ResponseHeader, TxnRequest, WatchCreateRequest, WatchRequest, WatchResponse,
    kv_client::KvClient, lease_client::LeaseClient, request_op::Request, watch_client::WatchClient,
    watch_create_request::FilterType, watch_request::RequestUnion,
};
use kv_core::proto::mvccpb::{Event, KeyValue, event::EventType};
use kv_core::proto::prefix_end;
use kv_tests::{
    Cluster, EtcdCluster, Members, Proc, start_etcd, start_kv_server, wait_leader_among,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

/// The tests of this file run one at a time: each is a load test on a 2-core machine, and
/// latency bounds mean nothing while another one runs.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Prefix of the guarantee workload's keys.
const PREFIX: &str = "w/";
/// Keys the guarantee workload writes.
const KEYS: usize = 50;
/// Concurrent writers of the guarantee workload.
const WRITERS: usize = 16;
/// How long the writers run on one member.
const RUN_FOR: Duration = Duration::from_secs(4);
/// On three members: writing before the leader kill, and after a new leader is seen.
const BEFORE_KILL: Duration = Duration::from_millis(1800);
const AFTER_KILL: Duration = Duration::from_millis(2500);
/// When the watcher at an old revision is created, after the writers start.
const OLD_WATCHER_AFTER: Duration = Duration::from_millis(1200);
/// TTL of the workload's leases: none expires during a test; all are revoked or fenced.
const LEASE_TTL: i64 = 60;
/// Leases a writer holds at most before it revokes one.
const LEASES_PER_WRITER: usize = 3;
/// A write unanswered for this long has an unknown outcome.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a watcher may take to reach the fence once it is written.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest watch response the client decodes (a catch-up response covers up to 1,000
/// revisions).
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Violations printed per watcher and kind.
const EXAMPLES: usize = 4;

// ---- small tools ---------------------------------------------------------------------------

/// splitmix64: the workload is random but reproducible per writer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint URL")
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

fn wkey(i: usize) -> Vec<u8> {
    format!("{PREFIX}k{i:02}").into_bytes()
}

fn rev_of(header: &Option<ResponseHeader>) -> i64 {
    header.as_ref().map_or(0, |h| h.revision)
}

fn event_rev(ev: &Event) -> i64 {
    ev.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

fn event_key(ev: &Event) -> &[u8] {
    ev.kv.as_ref().map_or(&[][..], |kv| &kv.key[..])
}

fn is_put(ev: &Event) -> bool {
    ev.r#type == EventType::Put as i32
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(ev: &Event) -> String {
    let kv = ev.kv.clone().unwrap_or_default();
    let prev = ev
        .prev_kv
        .as_ref()
        .map(|p| format!(" prev={}@{}", text(&p.value), p.mod_revision))
        .unwrap_or_default();
    format!(
        "{} {}@{} v{} c{} lease={:#x} value={}{prev}",
        if is_put(ev) { "PUT" } else { "DEL" },
        text(&kv.key),
        kv.mod_revision,
        kv.version,
        kv.create_revision,
        kv.lease,
        text(&kv.value),
    )
}

/// Waits (bounded) until `done`; false when `within` passed first.
async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resident memory of process `pid`, in bytes (0 if unreadable).
fn rss_bytes(pid: u32) -> u64 {
    kv_tests::procfs::rss_kib(pid).map_or(0, |kib| kib * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The current revision, through `endpoint` (linearizable).
async fn current_revision(endpoint: &str) -> Result<i64, String> {
    let mut kv = KvClient::new(channel(endpoint));
    let read = kv.range(RangeRequest {
        key: b"\0".to_vec(),
        count_only: true,
        ..Default::default()
    });
    match tokio::time::timeout(WRITE_TIMEOUT, read).await {
        Ok(Ok(r)) => Ok(rev_of(&r.into_inner().header)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

// ---- watchers --------------------------------------------------------------------------------

/// What a watcher asks for.
#[derive(Clone, Debug)]
struct Spec {
    name: String,
    key: Vec<u8>,
    /// Empty: just `key`.
    range_end: Vec<u8>,
    /// 0: from the revision after the one its `created` answer reports.
    start: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
}

impl Spec {
    fn prefix(name: &str, prefix: &str) -> Spec {
        Spec {
            name: name.to_string(),
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            start: 0,
            prev_kv: false,
            no_put: false,
            no_delete: false,
        }
    }

    fn range(name: &str, key: Vec<u8>, range_end: Vec<u8>) -> Spec {
        Spec {
            key,
            range_end,
            ..Spec::prefix(name, PREFIX)
        }
    }

    fn key(name: &str, key: Vec<u8>) -> Spec {
        Spec::range(name, key, Vec::new())
    }

    fn contains(&self, key: &[u8]) -> bool {
        if self.range_end.is_empty() {
            key == self.key.as_slice()
        } else {
            key >= self.key.as_slice() && key < self.range_end.as_slice()
        }
    }

    fn keeps(&self, ev: &Event) -> bool {
        if is_put(ev) {
            !self.no_put
        } else {
            !self.no_delete
        }
    }

    fn create(&self, watch_id: i64) -> WatchRequest {
        let mut filters = Vec::new();
        if self.no_put {
            filters.push(FilterType::Noput as i32);
        }
        if self.no_delete {
            filters.push(FilterType::Nodelete as i32);
        }
        WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: self.key.clone(),
                range_end: self.range_end.clone(),
                start_revision: self.start,
                prev_kv: self.prev_kv,
                filters,
                watch_id,
                ..Default::default()
            })),
        }
    }

    fn starting_at(&self, start: i64) -> Spec {
        Spec {
            start,
            ..self.clone()
        }
    }

    /// The last revision this watcher must reach: the fence's delete of every key, unless it
    /// drops deletes.
    fn target(&self, fence: Fence) -> i64 {
        if self.no_delete {
            fence.put_all
        } else {
            fence.delete_all
        }
    }
}

/// A Watch stream. Requests go through a queue, so the first ones are queued before the call:
/// etcd sends the response headers only with its first response.
struct WatchStream {
    tx: mpsc::Sender<WatchRequest>,
    rx: Streaming<WatchResponse>,
}

async fn open_watch(channel: Channel, first: Vec<WatchRequest>) -> Result<WatchStream, String> {
    let (tx, rx) = mpsc::channel(first.len() + 64);
    for req in first {
        tx.try_send(req).expect("room for the first requests");
    }
    let mut client = WatchClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
    let call = client.watch(ReceiverStream::new(rx));
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(resp)) => Ok(WatchStream {
            tx,
            rx: resp.into_inner(),
        }),
        Ok(Err(e)) => Err(format!("open: {e}")),
        Err(_) => Err("open: no answer in 5 s".into()),
    }
}

/// Everything one stream received, in arrival order.
#[derive(Default)]
struct Recording {
    responses: Vec<(Instant, WatchResponse)>,
    /// Watch ids answered `created`.
    created: HashSet<i64>,
    /// Highest event revision per watch id.
    reached: HashMap<i64, i64>,
    /// Why the stream ended, if it did.
    ended: Option<String>,
}

impl Recording {
    fn reached(&self, id: i64) -> i64 {
        self.reached.get(&id).copied().unwrap_or(0)
    }

    /// The responses of watcher `id`, in arrival order.
    fn of(&self, id: i64) -> Vec<&WatchResponse> {
        self.responses
            .iter()
            .map(|(_, r)| r)
            .filter(|r| r.watch_id == id)
            .collect()
    }
}

/// Records every response of `rx` until the stream ends or the task is aborted.
fn spawn_recorder(mut rx: Streaming<WatchResponse>, rec: Arc<Mutex<Recording>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let msg = rx.message().await;
            let at = Instant::now();
            let mut r = rec.lock().unwrap();
            match msg {
                Ok(Some(resp)) => {
                    if resp.created && !resp.canceled {
                        r.created.insert(resp.watch_id);
                    }
                    if let Some(top) = resp.events.iter().map(event_rev).max() {
                        let reached = r.reached.entry(resp.watch_id).or_default();
                        *reached = (*reached).max(top);
                    }
                    r.responses.push((at, resp));
                }
                Ok(None) => {
                    r.ended = Some("the server ended the stream".into());
                    return;
                }
                Err(e) => {
                    r.ended = Some(format!("stream failed: {e}"));
                    return;
                }
            }
        }
    })
}

/// A recorded stream of watchers `specs`, whose watch ids are their index + 1.
struct Recorded {
    member: usize,
    specs: Vec<Spec>,
    rec: Arc<Mutex<Recording>>,
    task: JoinHandle<()>,
    /// The request side, open while the stream lives.
    tx: mpsc::Sender<WatchRequest>,
}

async fn open_recorded(member: usize, endpoint: &str, specs: Vec<Spec>) -> Recorded {
    let creates = specs
        .iter()
        .enumerate()
        .map(|(i, s)| s.create(i as i64 + 1))
        .collect();
    let stream = open_watch(channel(endpoint), creates)
        .await
        .unwrap_or_else(|e| panic!("watch stream on member {member}: {e}"));
    let rec: Arc<Mutex<Recording>> = Arc::default();
    let task = spawn_recorder(stream.rx, rec.clone());
    Recorded {
        member,
        specs,
        rec,
        task,
        tx: stream.tx,
    }
}

impl Recorded {
    fn all_created(&self) -> bool {
        self.rec.lock().unwrap().created.len() == self.specs.len()
    }
}

// ---- writes --------------------------------------------------------------------------------

/// One operation of a write. Every put's value is unique in the whole run.
#[derive(Clone, Debug)]
enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    /// `end` empty: just `key`.
    Delete {
        key: Vec<u8>,
        end: Vec<u8>,
    },
    Revoke(i64),
}

/// A write as its client saw it: the revision it was answered with, or why its outcome is
/// unknown.
#[derive(Clone, Debug)]
struct Write {
    ops: Vec<Op>,
    outcome: Result<i64, String>,
    sent: Instant,
}

fn request_op(op: &Op) -> RequestOp {
    let request = match op {
        Op::Put { key, value, lease } => Request::RequestPut(PutRequest {
            key: key.clone(),
            value: value.clone(),
            lease: *lease,
            ..Default::default()
        }),
        Op::Delete { key, end } => Request::RequestDeleteRange(DeleteRangeRequest {
            key: key.clone(),
            range_end: end.clone(),
            ..Default::default()
        }),
        Op::Revoke(_) => unreachable!("a revoke is not a txn op"),
    };
    RequestOp {
        request: Some(request),
    }
}

/// Sends one write; the revision of its answer, or why the outcome is unknown.
async fn execute(channel: &Channel, ops: &[Op], txn: bool) -> Result<i64, String> {
    let mut kv = KvClient::new(channel.clone());
    let call = async {
        match (ops, txn) {
            ([Op::Put { key, value, lease }], false) => kv
                .put(PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    lease: *lease,
                    ..Default::default()
                })
                .await
                .map(|r| rev_of(&r.into_inner().header)),
            ([Op::Delete { key, end }], false) => kv
                .delete_range(DeleteRangeRequest {
                    key: key.clone(),
                    range_end: end.clone(),
                    ..Default::default()
                })
                .await
                .map(|r| rev_of(&r.into_inner().header)),
            ([Op::Revoke(id)], _) => LeaseClient::new(channel.clone())
                .lease_revoke(LeaseRevokeRequest { id: *id })
                .await
                .map(|r| rev_of(&r.into_inner().header)),
            _ => kv
                .txn(TxnRequest {
                    compare: Vec::new(),
                    success: ops.iter().map(request_op).collect(),
                    failure: Vec::new(),
                })
                .await
                .map(|r| rev_of(&r.into_inner().header)),
        }
    };
    match tokio::time::timeout(WRITE_TIMEOUT, call).await {
        Ok(Ok(rev)) => Ok(rev),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer in {WRITE_TIMEOUT:?}")),
    }
}

/// One writer of the guarantee workload: random puts, deletes, range deletes, multi-key txns,
/// and leases granted with keys attached, revoked later. A failed write has an unknown
/// outcome: it is logged as such (the checker finds out) and the writer moves to the next
/// member with new values.
async fn writer(
    w: usize,
    endpoints: Vec<String>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Write>>>,
) {
    let mut rng = Rng(0x5eed_0000 + w as u64);
    let channels: Vec<Channel> = endpoints.iter().map(|e| channel(e)).collect();
    let mut target = w % channels.len();
    let mut leases: Vec<i64> = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let value = |j: usize| format!("{w}.{seq}.{j}").into_bytes();
        let roll = rng.below(100);
        let (ops, txn) = if roll < 35 {
            let lease = if !leases.is_empty() && rng.below(4) == 0 {
                leases[rng.below(leases.len())]
            } else {
                0
            };
            let key = wkey(rng.below(KEYS));
            (
                vec![Op::Put {
                    key,
                    value: value(0),
                    lease,
                }],
                false,
            )
        } else if roll < 50 {
            let key = wkey(rng.below(KEYS));
            (
                vec![Op::Delete {
                    key,
                    end: Vec::new(),
                }],
                false,
            )
        } else if roll < 54 {
            let from = rng.below(KEYS - 4);
            let op = Op::Delete {
                key: wkey(from),
                end: wkey(from + 4),
            };
            (vec![op], false)
        } else if roll < 80 {
            let mut keys = Vec::new();
            let n = 2 + rng.below(3);
            while keys.len() < n {
                let k = rng.below(KEYS);
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            let ops = keys
                .iter()
                .enumerate()
                .map(|(j, &k)| {
                    if rng.below(10) < 7 {
                        Op::Put {
                            key: wkey(k),
                            value: value(j),
                            lease: 0,
                        }
                    } else {
                        Op::Delete {
                            key: wkey(k),
                            end: Vec::new(),
                        }
                    }
                })
                .collect();
            (ops, true)
        } else if roll < 90 && leases.len() < LEASES_PER_WRITER {
            // A lease with keys attached (the grant itself writes no revision).
            let mut lease = LeaseClient::new(channels[target].clone());
            let grant = lease.lease_grant(LeaseGrantRequest {
                ttl: LEASE_TTL,
                id: 0,
            });
            let id = match tokio::time::timeout(WRITE_TIMEOUT, grant).await {
                Ok(Ok(r)) => r.into_inner().id,
                _ => {
                    // Granted or not, such a lease has no keys: nobody needs it.
                    target = (target + 1) % channels.len();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            leases.push(id);
            let first = rng.below(KEYS);
            let ops = (0..1 + rng.below(3))
                .map(|j| Op::Put {
                    key: wkey((first + j * 7) % KEYS),
                    value: value(j),
                    lease: id,
                })
                .collect();
            (ops, true)
        } else if !leases.is_empty() {
            (vec![Op::Revoke(leases.remove(0))], false)
        } else {
            let key = wkey(rng.below(KEYS));
            (
                vec![Op::Put {
                    key,
                    value: value(0),
                    lease: 0,
                }],
                false,
            )
        };
        let sent = Instant::now();
        let outcome = execute(&channels[target], &ops, txn).await;
        let failed = outcome.is_err();
        log.lock().unwrap().push(Write { ops, outcome, sent });
        if failed {
            target = (target + 1) % channels.len();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The two revisions written after the workload: every key put, then the prefix deleted.
#[derive(Clone, Copy, Debug)]
struct Fence {
    put_all: i64,
    delete_all: i64,
}

/// Writes the fence through the first of `endpoints` that takes it, logging both writes.
async fn write_fence(endpoints: &[String], log: &Mutex<Vec<Write>>) -> Fence {
    let put_all: Vec<Op> = (0..KEYS)
        .map(|i| Op::Put {
            key: wkey(i),
            value: format!("fence.{i}").into_bytes(),
            lease: 0,
        })
        .collect();
    let delete_all = vec![Op::Delete {
        key: PREFIX.as_bytes().to_vec(),
        end: prefix_end(PREFIX.as_bytes()),
    }];
    let mut revs = Vec::new();
    for (ops, txn) in [(put_all, true), (delete_all, false)] {
        let mut tried = Vec::new();
        let rev = 'sent: {
            for ep in endpoints {
                let sent = Instant::now();
                let outcome = execute(&channel(ep), &ops, txn).await;
                log.lock().unwrap().push(Write {
                    ops: ops.clone(),
                    outcome: outcome.clone(),
                    sent,
                });
                match outcome {
                    Ok(rev) => break 'sent rev,
                    Err(e) => tried.push(format!("{ep}: {e}")),
                }
            }
            panic!("no member took the fence: {tried:?}");
        };
        revs.push(rev);
    }
    Fence {
        put_all: revs[0],
        delete_all: revs[1],
    }
}

// ---- ground truth and checks -------------------------------------------------------------------

/// Violations of one watcher (or of the history), by kind, with the first few examples.
#[derive(Default)]
struct Violations {
    kinds: BTreeMap<&'static str, (usize, Vec<String>)>,
}

impl Violations {
    fn add(&mut self, kind: &'static str, what: String) {
        let entry = self.kinds.entry(kind).or_default();
        entry.0 += 1;
        if entry.1.len() < EXAMPLES {
            entry.1.push(what);
        }
    }

    fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (kind, (n, examples)) in &self.kinds {
            writeln!(f, "    {kind}: {n} violation(s)")?;
            for e in examples {
                writeln!(f, "      {e}")?;
            }
        }
        Ok(())
    }
}

/// The findings of a whole run, one entry per watcher (or check) that broke something.
#[derive(Default)]
struct Report {
    failed: Vec<(String, Violations)>,
    checked: usize,
}

impl Report {
    fn add(&mut self, what: String, v: Violations) {
        self.checked += 1;
        if !v.is_empty() {
            self.failed.push((what, v));
        }
    }

    fn assert_clean(&self, run: &str) {
        let mut text = String::new();
        for (what, v) in &self.failed {
            text.push_str(&format!("  {what}:\n{v}"));
        }
        assert!(
            self.failed.is_empty(),
            "{run}: {} of {} checks failed:\n{text}",
            self.failed.len(),
            self.checked
        );
    }
}

/// The ground truth: every event under the watched prefix in revision and write order, each
/// with the key's value before its revision in `prev_kv` (None where the key did not exist).
struct History {
    events: Vec<Event>,
    /// Index of the first event of each revision.
    at: BTreeMap<i64, usize>,
}

impl History {
    /// Replays `events` (a watch of the prefix from revision 1, with prev_kv) through a model
    /// of the key space, checking each event against the state before it: versions, create
    /// revisions, deletes of live keys only, and the prev_kv the server attached.
    fn replay(events: Vec<Event>, v: &mut Violations) -> History {
        let mut live: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
        let mut out = Vec::with_capacity(events.len());
        let mut at = BTreeMap::new();
        let mut current = 0;
        let mut in_rev: HashSet<Vec<u8>> = HashSet::new();
        for mut ev in events {
            let kv = ev.kv.clone().unwrap_or_default();
            let r = kv.mod_revision;
            if r < current {
                v.add(
                    "history order",
                    format!("{} after revision {current}", show(&ev)),
                );
            }
            if r != current {
                current = r;
                in_rev.clear();
                at.insert(r, out.len());
            }
            if !in_rev.insert(kv.key.to_vec()) {
                v.add(
                    "history",
                    format!("{} twice in one revision", text(&kv.key)),
                );
            }
            let prev = live.get(&kv.key[..]).cloned();
            if ev.prev_kv != prev {
                v.add(
                    "history prev_kv",
                    format!(
                        "{}: server says prev {:?}, the replay {:?}",
                        show(&ev),
                        ev.prev_kv
                            .as_ref()
                            .map(|p| (text(&p.value), p.mod_revision)),
                        prev.as_ref().map(|p| (text(&p.value), p.mod_revision))
                    ),
                );
            }
            if is_put(&ev) {
                let (create, version) = match &prev {
                    Some(p) => (p.create_revision, p.version + 1),
                    None => (r, 1),
                };
                if (kv.create_revision, kv.version) != (create, version) {
                    v.add(
                        "history versions",
                        format!("{}: want create {create} version {version}", show(&ev)),
                    );
                }
                live.insert(kv.key.to_vec(), kv);
            } else {
                if prev.is_none() {
                    v.add("history", format!("{}: deletes a missing key", show(&ev)));
                }
                let want = KeyValue {
                    key: kv.key.clone(),
                    mod_revision: r,
                    ..Default::default()
                };
                if kv != want {
                    v.add(
                        "history",
                        format!("{}: a delete carries more than key and revision", show(&ev)),
                    );
                }
                live.remove(&kv.key[..]);
            }
            ev.prev_kv = prev;
            out.push(ev);
        }
        History { events: out, at }
    }

    fn last(&self) -> i64 {
        self.at.keys().next_back().copied().unwrap_or(0)
    }

    /// Events of revisions `from..=to` that `spec` keeps, as it should get them.
    fn expected(&self, spec: &Spec, from: i64, to: i64) -> Vec<Event> {
        let Some((_, &first)) = self.at.range(from..).next() else {
            return Vec::new();
        };
        self.events[first..]
            .iter()
            .take_while(|ev| event_rev(ev) <= to)
            .filter(|ev| spec.contains(event_key(ev)) && spec.keeps(ev))
            .map(|ev| {
                let mut ev = ev.clone();
                if !spec.prev_kv {
                    ev.prev_kv = None;
                }
                ev
            })
            .collect()
    }

    fn revision(&self, r: i64) -> &[Event] {
        let Some(&first) = self.at.get(&r) else {
            return &[];
        };
        let end = self
            .at
            .range(r + 1..)
            .next()
            .map_or(self.events.len(), |(_, &i)| i);
        &self.events[first..end]
    }
}

/// Reads the ground truth: the prefix watched from revision 1 with prev_kv, up to `upto`.
async fn read_history(endpoint: &str, prefix: &str, upto: i64) -> Result<Vec<Event>, String> {
    let spec = Spec {
        prev_kv: true,
        ..Spec::prefix("history", prefix).starting_at(1)
    };
    let mut stream = open_watch(channel(endpoint), vec![spec.create(1)]).await?;
    let mut events = Vec::new();
    let mut reached = 0;
    while reached < upto {
        match tokio::time::timeout(Duration::from_secs(10), stream.rx.message()).await {
            Ok(Ok(Some(resp))) => {
                if resp.canceled {
                    return Err(format!("history watch canceled: {resp:?}"));
                }
                reached = reached.max(resp.events.iter().map(event_rev).max().unwrap_or(0));
                events.extend(resp.events);
            }
            Ok(Ok(None)) => return Err("history watch ended".into()),
            Ok(Err(e)) => return Err(format!("history watch failed: {e}")),
            Err(_) => return Err(format!("history watch stalled at {reached} of {upto}")),
        }
    }
    Ok(events)
}

/// What a write does to `live` (before it): (put?, key, value, lease) in order.
type Change = (bool, Vec<u8>, Vec<u8>, i64);

fn predict(ops: &[Op], live: &BTreeMap<Vec<u8>, KeyValue>) -> Vec<Change> {
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, value, lease } => out.push((true, key.clone(), value.clone(), *lease)),
            Op::Delete { key, end } if end.is_empty() => {
                if live.contains_key(key) {
                    out.push((false, key.clone(), Vec::new(), 0));
                }
            }
            Op::Delete { key, end } => out.extend(
                live.range(key.clone()..end.clone())
                    .map(|(k, _)| (false, k.clone(), Vec::new(), 0)),
            ),
            // The keys a revoke deletes, in key order.
            Op::Revoke(id) => out.extend(
                live.iter()
                    .filter(|(_, kv)| kv.lease == *id)
                    .map(|(k, _)| (false, k.clone(), Vec::new(), 0)),
            ),
        }
    }
    out
}

fn changes(events: &[Event]) -> Vec<Change> {
    events
        .iter()
        .map(|ev| {
            let kv = ev.kv.clone().unwrap_or_default();
            (is_put(ev), kv.key.to_vec(), kv.value.to_vec(), kv.lease)
        })
        .collect()
}

/// Matches the writes' answers against the history of revisions `first..=last`: every
/// revision has events and is explained by exactly one write, each acknowledged write is the
/// one at the revision it was answered with (or changed nothing, which the state at that
/// revision must confirm), and each write of unknown outcome appears once or not at all.
fn check_writes(h: &History, writes: &[Write], first: i64, last: i64) -> Violations {
    let mut v = Violations::default();
    let mut acked: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    let mut by_value: HashMap<&[u8], usize> = HashMap::new();
    for (i, w) in writes.iter().enumerate() {
        if let Ok(rev) = w.outcome {
            acked.entry(rev).or_default().push(i);
        }
        for op in &w.ops {
            if let Op::Put { value, .. } = op
                && by_value.insert(value, i).is_some()
            {
                v.add("workload", format!("value {} written twice", text(value)));
            }
        }
    }
    let mut used = vec![false; writes.len()];
    let mut live: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
    let mut revisions: Vec<i64> = (first..=last).collect();
    revisions.extend(acked.keys().filter(|r| **r < first || **r > last));
    revisions.sort_unstable();
    for r in revisions {
        let events = h.revision(r);
        let got = changes(events);
        if got.is_empty() && (first..=last).contains(&r) {
            v.add("history gap", format!("revision {r} has no event"));
        }
        // Two deletes of one key can both be answered with `r`: the one that deleted it, and
        // one that found nothing to delete (checked below against the state as of `r`).
        let writer = acked
            .get(&r)
            .into_iter()
            .flatten()
            .copied()
            .find(|&i| !got.is_empty() && predict(&writes[i].ops, &live) == got);
        if let Some(i) = writer {
            used[i] = true;
        }
        if writer.is_none() && !got.is_empty() {
            // Not an acknowledged write: one whose outcome is unknown, found by a unique put
            // value or, for deletes only, by what it would delete.
            let candidates: Vec<usize> = match got.iter().find(|c| c.0) {
                Some(put) => by_value
                    .get(put.2.as_slice())
                    .copied()
                    .into_iter()
                    .collect(),
                None => (0..writes.len())
                    .filter(|&i| writes[i].outcome.is_err() && !used[i])
                    .collect(),
            };
            match candidates
                .into_iter()
                .find(|&i| !used[i] && predict(&writes[i].ops, &live) == got)
            {
                Some(i) if writes[i].outcome.is_err() => used[i] = true,
                Some(i) => v.add(
                    "writes",
                    format!(
                        "revision {r} holds write {:?} answered with revision {:?}",
                        writes[i].ops, writes[i].outcome
                    ),
                ),
                None => v.add(
                    "writes",
                    format!(
                        "revision {r} ({}) was written by no write of the workload",
                        events.iter().map(show).collect::<Vec<_>>().join("; ")
                    ),
                ),
            }
        }
        for ev in events {
            let kv = ev.kv.clone().unwrap_or_default();
            if is_put(ev) {
                live.insert(kv.key.to_vec(), kv);
            } else {
                live.remove(&kv.key[..]);
            }
        }
        // The other writes answered with `r` changed nothing: as of `r` there was nothing for
        // them to change.
        for &i in acked.get(&r).into_iter().flatten() {
            if !used[i] {
                let would = predict(&writes[i].ops, &live);
                if !would.is_empty() {
                    v.add(
                        "writes",
                        format!(
                            "write {:?} answered with revision {r} is not in it (it would change {} keys)",
                            writes[i].ops,
                            would.len()
                        ),
                    );
                }
                used[i] = true;
            }
        }
    }
    v
}

/// Checks what one watcher received (`responses`: those of its id in arrival order, the first
/// its `created` answer) against the ground truth, from its start revision to `upto` (None:
/// the last revision it received).
fn check_watcher(
    spec: &Spec,
    responses: &[&WatchResponse],
    upto: Option<i64>,
    h: &History,
) -> (Violations, String) {
    let mut v = Violations::default();
    let Some(first) = responses.first() else {
        v.add("created", "no response at all".into());
        return (v, String::new());
    };
    if !first.created || first.canceled {
        v.add(
            "created",
            format!("first response is not `created`: {first:?}"),
        );
        return (v, String::new());
    }
    let start = if spec.start != 0 {
        spec.start
    } else {
        rev_of(&first.header) + 1
    };
    let mut got: Vec<Event> = Vec::new();
    let mut previous: Option<(i64, bool)> = None;
    let mut canceled: Option<String> = None;
    for resp in &responses[1..] {
        if let Some(reason) = &canceled {
            v.add(
                "canceled",
                format!("a response after the cancel ({reason}): {resp:?}"),
            );
            break;
        }
        if resp.created {
            v.add("created", "a second `created` answer".into());
        }
        if resp.canceled {
            canceled = Some(format!(
                "reason {:?}, compact revision {}",
                resp.cancel_reason, resp.compact_revision
            ));
            v.add("canceled", format!("canceled: {resp:?}"));
        }
        let (Some(lo), Some(hi)) = (resp.events.first(), resp.events.last()) else {
            continue;
        };
        let (lo, hi) = (event_rev(lo), event_rev(hi));
        if rev_of(&resp.header) < hi {
            v.add(
                "header",
                format!(
                    "header revision {} below its events' {hi}",
                    rev_of(&resp.header)
                ),
            );
        }
        if let Some((prev_hi, fragment)) = previous
            && prev_hi == lo
            && !fragment
        {
            v.add(
                "atomic",
                format!("revision {lo} split across two responses"),
            );
        }
        previous = Some((hi, resp.fragment));
        got.extend(resp.events.iter().cloned());
    }
    let seen_to = got.iter().map(event_rev).max().unwrap_or(start - 1);
    let to = upto.unwrap_or(seen_to);
    let want = h.expected(spec, start, to);

    for pair in got.windows(2) {
        if event_rev(&pair[1]) < event_rev(&pair[0]) {
            v.add(
                "ordered",
                format!("{} after {}", show(&pair[1]), show(&pair[0])),
            );
        }
    }
    let id = |ev: &Event| (event_rev(ev), event_key(ev).to_vec());
    let want_at: HashMap<(i64, Vec<u8>), &Event> = want.iter().map(|ev| (id(ev), ev)).collect();
    let mut seen: HashMap<(i64, Vec<u8>), usize> = HashMap::new();
    for ev in &got {
        let n = seen.entry(id(ev)).or_default();
        *n += 1;
        if *n == 2 {
            v.add("unique", format!("{} delivered more than once", show(ev)));
        }
        match want_at.get(&id(ev)) {
            Some(w) => {
                if ev.kv != w.kv {
                    v.add("content", format!("got {}, want {}", show(ev), show(w)));
                } else if ev.prev_kv != w.prev_kv {
                    v.add("prev_kv", format!("got {}, want {}", show(ev), show(w)));
                }
            }
            None if event_rev(ev) < start => v.add(
                "reliable",
                format!("{} before the start revision {start}", show(ev)),
            ),
            None if event_rev(ev) > to => v.add(
                "reliable",
                format!("{} after the last revision {to}", show(ev)),
            ),
            None if !spec.contains(event_key(ev)) => v.add(
                "filter",
                format!("{} is outside the watched range", show(ev)),
            ),
            None if !spec.keeps(ev) => v.add("filter", format!("{} despite the filter", show(ev))),
            None => v.add("phantom", format!("{} is not in the history", show(ev))),
        }
    }
    let missing: Vec<&Event> = want
        .iter()
        .filter(|ev| !seen.contains_key(&id(ev)))
        .collect();
    if let Some(first_missing) = missing.first() {
        v.add(
            "reliable",
            format!(
                "{} of {} events of revisions {start}..={to} missing, the first {}",
                missing.len(),
                want.len(),
                show(first_missing)
            ),
        );
    }
    if v.is_empty()
        && let Some(i) = (0..got.len()).find(|&i| got[i] != want[i])
    {
        // Same events, different order: within one revision.
        v.add(
            "ordered",
            format!(
                "at event {i}: got {}, want {}",
                show(&got[i]),
                show(&want[i])
            ),
        );
    }
    let summary = format!(
        "{} events of revisions {start}..={to} in {} responses{}",
        got.len(),
        responses.len(),
        canceled
            .map(|c| format!(", canceled: {c}"))
            .unwrap_or_default()
    );
    (v, summary)
}

/// Watches `spec` (with its start revision) on `endpoint` until it reaches `upto`, and checks
/// it got exactly the ground truth's events from its start on.
async fn resume_and_check(
    endpoint: String,
    spec: Spec,
    upto: i64,
    h: &History,
) -> (Violations, String) {
    let mut responses = Vec::new();
    let result: Result<(), String> = async {
        let mut stream = open_watch(channel(&endpoint), vec![spec.create(1)]).await?;
        let mut reached = 0;
        while reached < upto {
            match tokio::time::timeout(Duration::from_secs(10), stream.rx.message()).await {
                Ok(Ok(Some(resp))) => {
                    reached = reached.max(resp.events.iter().map(event_rev).max().unwrap_or(0));
                    let canceled = resp.canceled;
                    responses.push(resp);
                    if canceled {
                        break;
                    }
                }
                Ok(Ok(None)) => return Err("the stream ended".to_string()),
                Ok(Err(e)) => return Err(format!("the stream failed: {e}")),
                // Whatever is missing shows as a gap.
                Err(_) => break,
            }
        }
        Ok(())
    }
    .await;
    let refs: Vec<&WatchResponse> = responses.iter().collect();
    let (mut v, summary) = check_watcher(&spec, &refs, Some(upto), h);
    if let Err(e) = result {
        v.add("resumable", e);
    }
    (v, summary)
}

// ---- the checker, on histories broken by hand ------------------------------------------------

fn put_ev(key: &str, value: &str, rev: i64, create: i64, version: i64) -> Event {
    Event {
        r#type: EventType::Put as i32,
        kv: Some(KeyValue {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            create_revision: create,
            mod_revision: rev,
            version,
            lease: 0,
        }),
        prev_kv: None,
    }
}

fn del_ev(key: &str, rev: i64) -> Event {
    Event {
        r#type: EventType::Delete as i32,
        kv: Some(KeyValue {
            key: key.as_bytes().to_vec().into(),
            mod_revision: rev,
            ..Default::default()
        }),
        prev_kv: None,
    }
}

fn response(events: Vec<Event>) -> WatchResponse {
    let revision = events.iter().map(event_rev).max().unwrap_or(0);
    WatchResponse {
        header: Some(ResponseHeader {
            revision,
            ..Default::default()
        }),
        watch_id: 1,
        events,
        ..Default::default()
    }
}

/// The kinds of violation `check_watcher` finds in `responses` (after a `created` at 1).
fn kinds(spec: &Spec, responses: Vec<WatchResponse>, h: &History) -> Vec<&'static str> {
    let created = WatchResponse {
        header: Some(ResponseHeader {
            revision: 1,
            ..Default::default()
        }),
        watch_id: 1,
        created: true,
        ..Default::default()
    };
    let mut all = vec![&created];
    all.extend(responses.iter());
    let (v, _) = check_watcher(spec, &all, Some(h.last()), h);
    v.kinds.keys().copied().collect()
}

/// The checker itself: a correct history passes, and each broken guarantee is named.
#[test]
fn checker_flags_each_broken_guarantee() {
    // r2: put a; r3: txn put b, put c; r4: delete a; r5: put b again.
    let a2 = put_ev("w/a", "a2", 2, 2, 1);
    let b3 = put_ev("w/b", "b3", 3, 3, 1);
    let c3 = put_ev("w/c", "c3", 3, 3, 1);
    let a4 = del_ev("w/a", 4);
    let b5 = put_ev("w/b", "b5", 5, 3, 2);
    let with_prev = |ev: &Event, prev: &Event| Event {
        prev_kv: prev.kv.clone(),
        ..ev.clone()
    };
    let mut v = Violations::default();
    let h = History::replay(
        vec![
            a2.clone(),
            b3.clone(),
            c3.clone(),
            with_prev(&a4, &a2),
            with_prev(&b5, &b3),
        ],
        &mut v,
    );
    assert!(v.is_empty(), "a consistent history:\n{v}");
    let all = Spec::prefix("all", PREFIX);
    let good = || {
        vec![
            response(vec![a2.clone()]),
            response(vec![b3.clone(), c3.clone()]),
            response(vec![a4.clone()]),
            response(vec![b5.clone()]),
        ]
    };
    assert_eq!(kinds(&all, good(), &h), Vec::<&str>::new());
    // A catch-up response may carry several revisions.
    let batched = vec![
        response(vec![a2.clone(), b3.clone(), c3.clone()]),
        response(vec![a4.clone(), b5.clone()]),
    ];
    assert_eq!(kinds(&all, batched, &h), Vec::<&str>::new());

    let mut gap = good();
    gap.remove(2);
    assert_eq!(kinds(&all, gap, &h), ["reliable"]);
    let mut twice = good();
    twice.push(response(vec![b5.clone()]));
    assert!(kinds(&all, twice, &h).contains(&"unique"));
    let mut split = good();
    split[1] = response(vec![b3.clone()]);
    split.insert(2, response(vec![c3.clone()]));
    assert_eq!(kinds(&all, split, &h), ["atomic"]);
    let mut swapped = good();
    swapped[1] = response(vec![c3.clone(), b3.clone()]);
    assert_eq!(kinds(&all, swapped, &h), ["ordered"]);
    let mut back = good();
    back.swap(2, 3);
    assert_eq!(kinds(&all, back, &h), ["ordered"]);
    let mut wrong = good();
    wrong[3] = response(vec![put_ev("w/b", "b5", 5, 5, 1)]);
    assert_eq!(kinds(&all, wrong, &h), ["content"]);

    // prev_kv: the previous value on updates and deletes, none on creations.
    let prev = Spec {
        prev_kv: true,
        ..all.clone()
    };
    let right = || {
        vec![
            response(vec![a2.clone()]),
            response(vec![b3.clone(), c3.clone()]),
            response(vec![with_prev(&a4, &a2)]),
            response(vec![with_prev(&b5, &b3)]),
        ]
    };
    assert_eq!(kinds(&prev, right(), &h), Vec::<&str>::new());
    let mut stale = right();
    stale[3] = response(vec![with_prev(&b5, &a2)]);
    assert_eq!(kinds(&prev, stale, &h), ["prev_kv"]);
    assert_eq!(kinds(&prev, good(), &h), ["prev_kv"]);

    // Filters and ranges.
    let no_put = Spec {
        no_put: true,
        ..all.clone()
    };
    assert_eq!(
        kinds(&no_put, vec![response(vec![a4.clone()])], &h),
        Vec::<&str>::new()
    );
    assert_eq!(kinds(&no_put, good(), &h), ["filter"]);
    let one = Spec::key("one", b"w/b".to_vec());
    let only_b = vec![response(vec![b3.clone()]), response(vec![b5.clone()])];
    assert_eq!(kinds(&one, only_b, &h), Vec::<&str>::new());
    assert_eq!(kinds(&one, good(), &h), ["filter"]);
    // A start revision: nothing before it.
    let from3 = all.starting_at(3);
    assert_eq!(kinds(&from3, good(), &h), ["reliable"]);
    assert_eq!(kinds(&from3, good().split_off(1), &h), Vec::<&str>::new());

    // Writes: an acknowledged write must be at its revision.
    let write = |key: &str, value: &str, rev: i64| Write {
        ops: vec![Op::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            lease: 0,
        }],
        outcome: Ok(rev),
        sent: Instant::now(),
    };
    let txn = Write {
        ops: vec![
            Op::Put {
                key: b"w/b".to_vec(),
                value: b"b3".to_vec(),
                lease: 0,
            },
            Op::Put {
                key: b"w/c".to_vec(),
                value: b"c3".to_vec(),
                lease: 0,
            },
        ],
        ..write("", "", 3)
    };
    let delete = |rev: i64| Write {
        ops: vec![Op::Delete {
            key: b"w/a".to_vec(),
            end: Vec::new(),
        }],
        ..write("", "", rev)
    };
    let writes = vec![
        write("w/a", "a2", 2),
        txn.clone(),
        delete(4),
        // A second delete of the same key, answered after it was gone.
        delete(4),
        write("w/b", "b5", 5),
    ];
    assert!(check_writes(&h, &writes, 2, 5).is_empty());
    let mut misplaced = writes.clone();
    misplaced[4] = write("w/b", "b5", 4);
    assert!(!check_writes(&h, &misplaced, 2, 5).is_empty());
    let mut lost = writes.clone();
    lost.push(write("w/z", "z", 5));
    assert!(!check_writes(&h, &lost, 2, 5).is_empty());
    let mut unknown = writes;
    unknown[1].outcome = Err("no answer".into());
    assert!(check_writes(&h, &unknown, 2, 5).is_empty());
}

// ---- the guarantee scenario --------------------------------------------------------------------

/// One member (kv-server or etcd) as [`Members`].
struct Single(Proc);

impl Members for Single {
    fn endpoint_of(&self, i: usize) -> Option<String> {
        (i == 0).then(|| self.0.endpoint.clone())
    }
    fn kill_member(&mut self, _: usize) {
        panic!("the one member is not killed");
    }
}

/// A watcher that keeps dropping its stream after a few responses and resuming at its last
/// revision + 1, on the next member, until it reaches `fence` (the prefix deleted).
async fn resumer(
    endpoints: Vec<String>,
    fence: tokio::sync::watch::Receiver<Option<Fence>>,
    give_up: Arc<AtomicBool>,
    segments: Arc<Mutex<Vec<Vec<WatchResponse>>>>,
) {
    let spec = Spec {
        prev_kv: true,
        ..Spec::prefix("resumer", PREFIX)
    };
    let mut rng = Rng(0x4e5u64);
    let mut member = 0;
    let mut next = 0;
    let mut reached = 0;
    let done = |reached: i64| fence.borrow().is_some_and(|f| reached >= f.delete_all);
    while !done(reached) && !give_up.load(Ordering::Relaxed) {
        member = (member + 1) % endpoints.len();
        let Ok(mut stream) = open_watch(
            channel(&endpoints[member]),
            vec![spec.starting_at(next).create(0)],
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let quota = 1 + rng.below(6);
        let mut segment = Vec::new();
        let mut with_events = 0;
        while with_events < quota && !done(reached) && !give_up.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(200), stream.rx.message()).await {
                Ok(Ok(Some(resp))) => {
                    if resp.created && next == 0 {
                        next = rev_of(&resp.header) + 1;
                    }
                    if let Some(top) = resp.events.iter().map(event_rev).max() {
                        reached = top;
                        next = top + 1;
                        with_events += 1;
                    }
                    segment.push(resp);
                }
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) => {}
            }
        }
        if !segment.is_empty() {
            segments.lock().unwrap().push(segment);
        }
    }
}

/// The resumer's segments as one watcher: the first `created`, then every other response.
fn stitch(segments: &[Vec<WatchResponse>]) -> Vec<&WatchResponse> {
    let mut out: Vec<&WatchResponse> = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        let id = seg.first().map_or(0, |r| r.watch_id);
        out.extend(
            seg.iter()
                .filter(|r| r.watch_id == id && (i == 0 || !r.created)),
        );
    }
    out
}

/// The watchers every member gets on two streams at the start.
fn first_streams() -> [Vec<Spec>; 2] {
    [
        vec![
            Spec::prefix("prefix", PREFIX),
            Spec::range("sub-range k10..k25", wkey(10), wkey(25)),
            Spec::key("one key k07", wkey(7)),
        ],
        vec![
            Spec {
                prev_kv: true,
                ..Spec::prefix("prev_kv", PREFIX)
            },
            Spec {
                no_put: true,
                prev_kv: true,
                ..Spec::prefix("noput+prev_kv", PREFIX)
            },
            Spec {
                no_delete: true,
                ..Spec::prefix("nodelete", PREFIX)
            },
        ],
    ]
}

/// Checks every recorded watcher against the ground truth, and resumes each from the middle
/// of what it saw (a watcher of the killed member: from the last revision it saw, on a
/// survivor), which must then see exactly the rest up to the fence.
async fn check_streams(
    run: &str,
    streams: &[Recorded],
    survivors: &[usize],
    endpoints: &[String],
    fence: Fence,
    h: &History,
    report: &mut Report,
) {
    let mut resumes = Vec::new();
    for s in streams {
        let on_survivor = survivors.contains(&s.member);
        let rec = s.rec.lock().unwrap();
        for (i, spec) in s.specs.iter().enumerate() {
            let target = spec.target(fence);
            let responses = rec.of(i as i64 + 1);
            let upto = on_survivor.then_some(target);
            let (mut v, summary) = check_watcher(spec, &responses, upto, h);
            let what = format!("{} on m{}", spec.name, s.member);
            let ended = if on_survivor {
                String::new()
            } else {
                // Its watchers end with it.
                let why = rec.ended.clone().unwrap_or_default();
                if why.is_empty() {
                    v.add("ended", "the stream outlived its killed member".into());
                }
                format!(
                    " (member killed; {})",
                    why.chars().take(60).collect::<String>()
                )
            };
            eprintln!("{run}: {what}: {summary}{ended}");
            report.add(what.clone(), v);
            let with_events: Vec<&&WatchResponse> =
                responses.iter().filter(|r| !r.events.is_empty()).collect();
            let from = if on_survivor {
                with_events.get(with_events.len() / 2)
            } else {
                with_events.last()
            }
            .and_then(|r| r.events.last().map(event_rev))
            .map_or(spec.start.max(2), |r| r + 1);
            let resume_on = if on_survivor {
                // Another survivor when there is one.
                survivors[(survivors.iter().position(|&m| m == s.member).unwrap_or(0) + 1)
                    % survivors.len()]
            } else {
                survivors[0]
            };
            resumes.push((
                format!("{what} resumed at {from} on m{resume_on}"),
                endpoints[resume_on].clone(),
                spec.starting_at(from),
                target,
            ));
        }
    }
    let checked = futures::future::join_all(
        resumes
            .iter()
            .map(|(_, ep, spec, target)| resume_and_check(ep.clone(), spec.clone(), *target, h)),
    )
    .await;
    for ((what, ..), (v, summary)) in resumes.iter().zip(checked) {
        eprintln!("{run}: {what}: {summary}");
        report.add(what.clone(), v);
    }
}

/// The guarantee workload on `n` members, killing the leader mid-run when `kill_leader`.
async fn watch_guarantees(members: &mut impl Members, n: usize, kill_leader: bool, run: &str) {
    let all: Vec<usize> = (0..n).collect();
    let leader = wait_leader_among(members, &all, Duration::from_secs(20)).await;
    let endpoints: Vec<String> = all
        .iter()
        .map(|&i| members.endpoint_of(i).expect("every member runs"))
        .collect();

    // Two streams of watchers on every member, all created before the first write.
    let mut streams = Vec::new();
    for (m, ep) in endpoints.iter().enumerate() {
        for specs in first_streams() {
            streams.push(open_recorded(m, ep, specs).await);
        }
    }
    assert!(
        wait_until(Duration::from_secs(10), || streams
            .iter()
            .all(Recorded::all_created))
        .await,
        "watchers not created"
    );

    let (fence_tx, fence_rx) = tokio::sync::watch::channel(None);
    let give_up = Arc::new(AtomicBool::new(false));
    let segments: Arc<Mutex<Vec<Vec<WatchResponse>>>> = Arc::default();
    let resumer_task = tokio::spawn(resumer(
        endpoints.clone(),
        fence_rx,
        give_up.clone(),
        segments.clone(),
    ));

    let writes: Arc<Mutex<Vec<Write>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(w, endpoints.clone(), stop.clone(), writes.clone())))
        .collect();

    // Mid-run, on every member: a watcher from an old revision, catching up under load.
    tokio::time::sleep(OLD_WATCHER_AFTER).await;
    let now = current_revision(&endpoints[leader])
        .await
        .expect("read the revision");
    let old = Spec {
        prev_kv: true,
        ..Spec::prefix("old revision", PREFIX).starting_at((now / 2).max(2))
    };
    for (m, ep) in endpoints.iter().enumerate() {
        streams.push(open_recorded(m, ep, vec![old.clone()]).await);
    }

    let mut killed = None;
    if kill_leader {
        tokio::time::sleep(BEFORE_KILL.saturating_sub(started.elapsed())).await;
        let leader = wait_leader_among(members, &all, Duration::from_secs(5)).await;
        members.kill_member(leader);
        let at = Instant::now();
        let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
        let new = wait_leader_among(members, &survivors, Duration::from_secs(20)).await;
        eprintln!(
            "{run}: killed leader m{leader}; m{new} leads {:?} later",
            at.elapsed()
        );
        killed = Some((leader, Instant::now()));
        tokio::time::sleep(AFTER_KILL).await;
    } else {
        tokio::time::sleep(RUN_FOR.saturating_sub(started.elapsed())).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer task");
    }
    let wrote_for = started.elapsed();

    let survivors: Vec<usize> = all
        .iter()
        .copied()
        .filter(|&i| killed.is_none_or(|(k, _)| k != i))
        .collect();
    let leader = wait_leader_among(members, &survivors, Duration::from_secs(20)).await;
    let mut fence_eps = vec![endpoints[leader].clone()];
    fence_eps.extend(
        survivors
            .iter()
            .filter(|&&i| i != leader)
            .map(|&i| endpoints[i].clone()),
    );
    let fence = write_fence(&fence_eps, &writes).await;
    let _ = fence_tx.send(Some(fence));

    // Every watcher on a survivor reaches its last revision of the fence.
    let live_streams: Vec<&Recorded> = streams
        .iter()
        .filter(|s| survivors.contains(&s.member))
        .collect();
    let drained = wait_until(DRAIN_TIMEOUT, || {
        live_streams.iter().all(|s| {
            let rec = s.rec.lock().unwrap();
            s.specs
                .iter()
                .enumerate()
                .all(|(i, spec)| rec.reached(i as i64 + 1) >= spec.target(fence))
        })
    })
    .await;
    if !drained {
        eprintln!("{run}: some watchers did not reach the fence in {DRAIN_TIMEOUT:?}");
        give_up.store(true, Ordering::Relaxed);
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, resumer_task).await;
    give_up.store(true, Ordering::Relaxed);
    for s in &streams {
        s.task.abort();
    }

    // The ground truth, from every survivor: the same history on each.
    let mut report = Report::default();
    let mut history_events = None;
    for &m in &survivors {
        let events = read_history(&endpoints[m], PREFIX, fence.delete_all)
            .await
            .unwrap_or_else(|e| panic!("{run}: history from m{m}: {e}"));
        match &history_events {
            None => history_events = Some(events),
            Some(first) => {
                let mut v = Violations::default();
                if *first != events {
                    v.add(
                        "history",
                        format!("m{m}'s history differs from m{}'s", survivors[0]),
                    );
                }
                report.add(format!("history of m{m}"), v);
            }
        }
    }
    let mut v = Violations::default();
    let h = History::replay(history_events.unwrap_or_default(), &mut v);
    let writes = writes.lock().unwrap().clone();
    let acked = writes.iter().filter(|w| w.outcome.is_ok()).count();
    let unknown: Vec<&Write> = writes.iter().filter(|w| w.outcome.is_err()).collect();
    eprintln!(
        "{run}: {} writes in {wrote_for:?} ({acked} acknowledged, {} unknown), revisions 2..={}, {} events",
        writes.len(),
        unknown.len(),
        h.last(),
        h.events.len()
    );
    if let Some(u) = unknown.first() {
        // Writes with puts are found by their unique values.
        let written: HashSet<&[u8]> = h
            .events
            .iter()
            .filter_map(|ev| ev.kv.as_ref().map(|kv| &kv.value[..]))
            .collect();
        let with_puts: Vec<&&Write> = unknown
            .iter()
            .filter(|w| w.ops.iter().any(|op| matches!(op, Op::Put { .. })))
            .collect();
        let applied = with_puts
            .iter()
            .filter(|w| {
                w.ops.iter().any(
                    |op| matches!(op, Op::Put { value, .. } if written.contains(value.as_slice())),
                )
            })
            .count();
        eprintln!(
            "{run}: unknown outcomes such as {:?}; {applied} of the {} with puts took effect",
            u.outcome,
            with_puts.len()
        );
    }
    let txns = writes.iter().filter(|w| w.ops.len() > 1).count();
    let revokes: Vec<i64> = writes
        .iter()
        .filter(|w| matches!(w.ops[..], [Op::Revoke(_)]))
        .filter_map(|w| w.outcome.as_ref().ok().copied())
        .collect();
    eprintln!(
        "{run}: {txns} multi-op txns, {} acknowledged revokes, {} puts with a lease",
        revokes.len(),
        h.events
            .iter()
            .filter(|ev| ev.kv.as_ref().is_some_and(|kv| kv.lease != 0))
            .count()
    );
    report.add("history replay".into(), v);
    report.add(
        "writes against the history".into(),
        check_writes(&h, &writes, 2, fence.delete_all),
    );
    if let Some((_, leader_seen)) = killed {
        let after = writes
            .iter()
            .filter(|w| w.outcome.is_ok() && w.sent > leader_seen)
            .count();
        let mut v = Violations::default();
        if after == 0 {
            v.add(
                "failover",
                "no write was acknowledged after the new leader".into(),
            );
        }
        eprintln!("{run}: {after} writes acknowledged after the new leader");
        report.add("writes after the kill".into(), v);
    }

    check_streams(
        run,
        &streams,
        &survivors,
        &endpoints,
        fence,
        &h,
        &mut report,
    )
    .await;

    let segments = segments.lock().unwrap();
    let spec = Spec {
        prev_kv: true,
        ..Spec::prefix("resumer", PREFIX)
    };
    let (v, summary) = check_watcher(&spec, &stitch(&segments), Some(fence.delete_all), &h);
    eprintln!("{run}: resumer over {} streams: {summary}", segments.len());
    report.add("resumer".into(), v);

    report.assert_clean(run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_guarantees_on_one_member() {
    let _serial = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut one = Single(start_kv_server(&dir.path().join("data"), &[]));
        watch_guarantees(&mut one, 1, false, "one member").await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_guarantees_on_etcd() {
    let _serial = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let etcd = match start_etcd(&dir.path().join("etcd")) {
            Ok(p) => p,
            Err(why) => return eprintln!("SKIP watch_guarantees_on_etcd: {why}"),
        };
        watch_guarantees(&mut Single(etcd), 1, false, "etcd").await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_guarantees_through_leader_kill_on_etcd() {
    let _serial = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let mut cluster = match EtcdCluster::start(3) {
            Ok(c) => c,
            Err(why) => {
                return eprintln!("SKIP watch_guarantees_through_leader_kill_on_etcd: {why}");
            }
        };
        watch_guarantees(&mut cluster, 3, true, "three etcd members").await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_guarantees_through_leader_kill() {
    let _serial = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let mut cluster = Cluster::start(3);
        watch_guarantees(&mut cluster, 3, true, "three members").await;
    })
    .await
    .expect("test timed out");
}

// ---- a slow consumer -------------------------------------------------------------------------

/// Prefix of the slow-consumer scenario's keys.
const SLOW_PREFIX: &str = "s/";
/// Watchers of one key each, on other streams than the slow one.
const FAST_WATCHERS: usize = 1000;
/// Streams they are spread over.
const FAST_STREAMS: usize = 4;
/// Watchers on the stream whose client stops reading (four flavours, each this many times
/// over): enough that its queue fills, and its watchers fall back to catching up from
/// storage, within a few hundred revisions (on kv-server: a 4,096-response stream queue, then
/// a bounded number of events buffered per victim and per stream).
const SLOW_WATCHERS_PER_FLAVOUR: usize = 4;
/// Writers of the slow-consumer scenario; each write is a txn of `PUTS_PER_TXN` puts.
const SLOW_WRITERS: usize = 16;
const PUTS_PER_TXN: usize = 8;
/// Bytes per value.
const VALUE_BYTES: usize = 256;
/// Store revisions at which a watcher from a recent revision is created on a fast stream,
/// while the slow stream is stuck, and at which the writers stop.
const LATE_AT_REVISION: [i64; 2] = [1400, 1600];
const STOP_AT_REVISION: i64 = 1800;
/// The writers stop after this long in any case.
const SLOW_FOR_AT_MOST: Duration = Duration::from_secs(20);
/// How many revisions back the late watchers start.
const LATE_BACK: i64 = 50;
/// Put-to-event p99 the fast watchers must keep (a generous bound for a debug build).
const LATENCY_P99: Duration = Duration::from_secs(1);
/// How long a late watcher may take to catch up to the revision it was created at; after
/// that its events must come with the fast watchers' latency.
const LATE_CATCH_UP: Duration = Duration::from_secs(2);
/// How much the server's resident memory may grow while the slow stream is not read.
const RSS_GROWTH: u64 = 200 << 20;

fn skey(i: usize) -> Vec<u8> {
    format!("{SLOW_PREFIX}{i:04}").into_bytes()
}

/// A value that carries when its write was sent (nanoseconds since `base`), unique per
/// writer, sequence number and position in the txn.
fn timed_value(base: Instant, w: usize, seq: u64, j: usize) -> Vec<u8> {
    let mut v = format!("{}.{w}.{seq}.{j}.", base.elapsed().as_nanos()).into_bytes();
    v.resize(VALUE_BYTES, b'x');
    v
}

fn sent_at(base: Instant, ev: &Event) -> Option<Instant> {
    let value = &ev.kv.as_ref()?.value;
    let nanos: u64 = std::str::from_utf8(value.split(|b| *b == b'.').next()?)
        .ok()?
        .parse()
        .ok()?;
    Some(base + Duration::from_nanos(nanos))
}

/// CPU time process `pid` has used (user + system), from /proc (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which ends with the last ')': state is field 3, utime 14.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

/// A writer of the slow-consumer scenario: txns of puts of distinct random keys.
async fn timed_writer(
    w: usize,
    endpoint: String,
    base: Instant,
    stop: Arc<AtomicBool>,
    top: Arc<AtomicI64>,
    log: Arc<Mutex<Vec<Write>>>,
) {
    let mut rng = Rng(0x51_0000 + w as u64);
    let ch = channel(&endpoint);
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let mut keys = Vec::new();
        while keys.len() < PUTS_PER_TXN {
            let k = rng.below(FAST_WATCHERS);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let ops: Vec<Op> = keys
            .iter()
            .enumerate()
            .map(|(j, &k)| Op::Put {
                key: skey(k),
                value: timed_value(base, w, seq, j),
                lease: 0,
            })
            .collect();
        let sent = Instant::now();
        let outcome = execute(&ch, &ops, true).await;
        if let Ok(rev) = outcome {
            top.fetch_max(rev, Ordering::Relaxed);
        }
        log.lock().unwrap().push(Write { ops, outcome, sent });
    }
}

/// p50, p99 and the maximum of `d`.
fn percentiles(d: &mut [Duration]) -> (Duration, Duration, Duration) {
    if d.is_empty() {
        return Default::default();
    }
    d.sort_unstable();
    let at = |q: f64| d[((d.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), d[d.len() - 1])
}

/// A watcher created on a fast stream while the slow one is stuck, from a recent revision.
struct Late {
    id: i64,
    spec: Spec,
    created: Instant,
    /// The store revision when it was created.
    revision: i64,
}

/// The watchers of the slow stream.
fn slow_specs() -> Vec<Spec> {
    let mut specs = Vec::new();
    for n in 0..SLOW_WATCHERS_PER_FLAVOUR {
        specs.push(Spec::prefix(&format!("slow {n} prefix"), SLOW_PREFIX));
        specs.push(Spec {
            prev_kv: true,
            ..Spec::prefix(&format!("slow {n} prefix+prev_kv"), SLOW_PREFIX)
        });
        specs.push(Spec::range(
            &format!("slow {n} first half"),
            skey(0),
            skey(FAST_WATCHERS / 2),
        ));
        specs.push(Spec {
            no_delete: true,
            ..Spec::prefix(&format!("slow {n} nodelete"), SLOW_PREFIX)
        });
    }
    specs
}

/// Waits until `top` reaches `revision`, or `deadline`.
async fn wait_revision(top: &AtomicI64, revision: i64, deadline: Instant) {
    while top.load(Ordering::Relaxed) < revision && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stream whose client stops reading, next to 1,000 one-key watchers on other streams and
/// 16 writers, on the server at `endpoint` (process `pid`).
async fn slow_consumer(endpoint: &str, pid: u32, run: &str) {
    let base = Instant::now();
    let mut report = Report::default();

    // 1,000 one-key watchers over FAST_STREAMS streams, read all the time.
    let per_stream = FAST_WATCHERS / FAST_STREAMS;
    let mut fast = Vec::new();
    for s in 0..FAST_STREAMS {
        let specs = (0..per_stream)
            .map(|i| {
                let k = s * per_stream + i;
                Spec::key(&format!("key {k}"), skey(k))
            })
            .collect();
        fast.push(open_recorded(0, endpoint, specs).await);
    }
    assert!(
        wait_until(Duration::from_secs(20), || fast
            .iter()
            .all(Recorded::all_created))
        .await,
        "{run}: fast watchers not created"
    );

    // The slow stream: a connection of its own with small flow-control windows, so the server
    // feels the client not reading after some 64 KiB (and the fast streams do not share its
    // connection window).
    let slow_specs = slow_specs();
    let slow_channel = Endpoint::from_shared(format!("http://{endpoint}"))
        .expect("endpoint URL")
        .initial_stream_window_size(Some(64 << 10))
        .initial_connection_window_size(Some(64 << 10))
        .connect_lazy();
    let creates = slow_specs
        .iter()
        .enumerate()
        .map(|(i, s)| s.create(i as i64 + 1))
        .collect();
    let mut slow = open_watch(slow_channel, creates)
        .await
        .unwrap_or_else(|e| panic!("{run}: slow stream: {e}"));
    let mut slow_responses: Vec<WatchResponse> = Vec::new();
    while slow_responses.len() < slow_specs.len() {
        let resp = tokio::time::timeout(Duration::from_secs(5), slow.rx.message())
            .await
            .expect("slow watchers created in time")
            .expect("slow stream open")
            .expect("slow stream open");
        slow_responses.push(resp);
    }
    // From here on nobody polls `slow.rx` until the writers have stopped.

    let rss_before = rss_bytes(pid);
    let rss_max = Arc::new(Mutex::new(rss_before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (rss_max, stop) = (rss_max.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let now = rss_bytes(pid);
                {
                    let mut max = rss_max.lock().unwrap();
                    *max = (*max).max(now);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let writes: Arc<Mutex<Vec<Write>>> = Arc::default();
    let top = Arc::new(AtomicI64::new(0));
    let started = Instant::now();
    let cpu_at_start = cpu_time(pid);
    let deadline = started + SLOW_FOR_AT_MOST;
    let writers: Vec<_> = (0..SLOW_WRITERS)
        .map(|w| {
            tokio::spawn(timed_writer(
                w,
                endpoint.to_string(),
                base,
                stop.clone(),
                top.clone(),
                writes.clone(),
            ))
        })
        .collect();

    // Watchers from a recent revision, created on a fast stream while the slow one is stuck.
    let mut late = Vec::new();
    for (n, &at) in LATE_AT_REVISION.iter().enumerate() {
        wait_revision(&top, at, deadline).await;
        let revision = current_revision(endpoint).await.expect("read the revision");
        let spec =
            Spec::prefix(&format!("late {n}"), SLOW_PREFIX).starting_at(revision - LATE_BACK);
        let id = 10_001 + n as i64;
        fast[0]
            .tx
            .send(spec.create(id))
            .await
            .expect("fast stream open");
        late.push(Late {
            id,
            spec,
            created: Instant::now(),
            revision,
        });
    }
    wait_revision(&top, STOP_AT_REVISION, deadline).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer task");
    }
    let _ = sampler.await;
    let wrote_for = started.elapsed();
    let cpu_writing = cpu_time(pid).saturating_sub(cpu_at_start);
    let rss_after = rss_bytes(pid);
    let rss_max = *rss_max.lock().unwrap();
    let writes = writes.lock().unwrap().clone();
    let failed: Vec<&Write> = writes.iter().filter(|w| w.outcome.is_err()).collect();
    let last = top.load(Ordering::Relaxed);
    eprintln!(
        "{run}: {} txns of {PUTS_PER_TXN} puts in {wrote_for:?} ({} failed), last revision {last}; server CPU {cpu_writing:?}",
        writes.len(),
        failed.len()
    );
    let mut v = Violations::default();
    if let Some(w) = failed.first() {
        v.add(
            "writes",
            format!("{} writes failed, the first: {:?}", failed.len(), w.outcome),
        );
    }
    report.add("writes".into(), v);

    // The last revision each key was written at: where its watcher must get to.
    let mut last_of_key: HashMap<Vec<u8>, i64> = HashMap::new();
    for w in &writes {
        if let Ok(rev) = w.outcome {
            for op in &w.ops {
                if let Op::Put { key, .. } = op {
                    let e = last_of_key.entry(key.clone()).or_default();
                    *e = (*e).max(rev);
                }
            }
        }
    }
    let fast_done = |fast: &[Recorded]| {
        fast.iter().all(|s| {
            let rec = s.rec.lock().unwrap();
            s.specs.iter().enumerate().all(|(i, spec)| {
                rec.reached(i as i64 + 1) >= last_of_key.get(&spec.key).copied().unwrap_or(0)
            })
        })
    };
    let late_done = |fast: &[Recorded]| {
        let rec = fast[0].rec.lock().unwrap();
        late.iter().all(|l| rec.reached(l.id) >= last)
    };
    let drain_started = Instant::now();
    let drained = wait_until(Duration::from_secs(5), || {
        fast_done(&fast) && late_done(&fast)
    })
    .await;
    eprintln!(
        "{run}: fast and late watchers {} {:?} after the writers stopped",
        if drained { "caught up" } else { "still behind" },
        drain_started.elapsed()
    );
    // What a stuck stream costs an idle server.
    let idle_from = (Instant::now(), cpu_time(pid));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_cpu = cpu_time(pid).saturating_sub(idle_from.1);
    let idle_for = idle_from.0.elapsed();
    eprintln!(
        "{run}: server CPU with no writes and the slow stream still unread: {idle_cpu:?} in {idle_for:?}"
    );

    // The slow stream reads again: every event, each once, in order (or a cancel with a
    // reason).
    let resumed = Instant::now();
    let mut canceled = HashSet::new();
    let mut reached: HashMap<i64, i64> = HashMap::new();
    let slow_target = |spec: &Spec| {
        last_of_key
            .iter()
            .filter(|(k, _)| spec.contains(k))
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(0)
    };
    let slow_caught_up = loop {
        let done = slow_specs.iter().enumerate().all(|(i, spec)| {
            let id = i as i64 + 1;
            canceled.contains(&id) || reached.get(&id).copied().unwrap_or(0) >= slow_target(spec)
        });
        if done {
            break Ok(resumed.elapsed());
        }
        match tokio::time::timeout(Duration::from_secs(10), slow.rx.message()).await {
            Ok(Ok(Some(resp))) => {
                if resp.canceled {
                    canceled.insert(resp.watch_id);
                }
                if let Some(top) = resp.events.iter().map(event_rev).max() {
                    let r = reached.entry(resp.watch_id).or_default();
                    *r = (*r).max(top);
                }
                slow_responses.push(resp);
            }
            Ok(Ok(None)) => break Err("the slow stream ended".to_string()),
            Ok(Err(e)) => break Err(format!("the slow stream failed: {e}")),
            Err(_) => break Err("the slow stream was silent for 10 s".to_string()),
        }
    };
    eprintln!(
        "{run}: the slow stream, read again: {slow_caught_up:?} to catch up, {} responses",
        slow_responses.len()
    );
    // Whether the late watchers got there once the slow stream was read again.
    let late_after_slow = drained || wait_until(Duration::from_secs(5), || late_done(&fast)).await;
    drop(slow);
    for s in &fast {
        s.task.abort();
    }

    // Against the ground truth.
    let mut v = Violations::default();
    let h = History::replay(
        read_history(endpoint, SLOW_PREFIX, last)
            .await
            .unwrap_or_else(|e| panic!("{run}: history: {e}")),
        &mut v,
    );
    report.add("history replay".into(), v);
    report.add(
        "writes against the history".into(),
        check_writes(&h, &writes, 2, last),
    );

    // Fast watchers: every event of their key, and the latency of each.
    let mut latencies = Vec::new();
    for s in &fast {
        let rec = s.rec.lock().unwrap();
        for (i, spec) in s.specs.iter().enumerate() {
            let (v, _) = check_watcher(spec, &rec.of(i as i64 + 1), Some(last), &h);
            report.add(format!("fast watcher of {}", text(&spec.key)), v);
        }
        for (at, resp) in &rec.responses {
            if resp.watch_id >= 1 && resp.watch_id <= per_stream as i64 {
                latencies.extend(
                    resp.events
                        .iter()
                        .filter_map(|ev| sent_at(base, ev))
                        .map(|sent| at.saturating_duration_since(sent)),
                );
            }
        }
    }
    let fast_events = latencies.len();
    let (p50, p99, max) = percentiles(&mut latencies);
    eprintln!(
        "{run}: {FAST_WATCHERS} fast watchers got {fast_events} events; put-to-event p50 {p50:?}, p99 {p99:?}, max {max:?}"
    );
    let mut v = Violations::default();
    if p99 > LATENCY_P99 {
        v.add(
            "latency",
            format!("p99 {p99:?} over {LATENCY_P99:?} (p50 {p50:?}, max {max:?})"),
        );
    }
    report.add("fast watchers' latency".into(), v);

    // Late watchers: exact, caught up soon, then as prompt as the fast ones.
    let rec = fast[0].rec.lock().unwrap();
    for l in &late {
        let (mut v, summary) = check_watcher(&l.spec, &rec.of(l.id), Some(last), &h);
        let caught_up = rec
            .responses
            .iter()
            .find(|(_, r)| {
                r.watch_id == l.id && r.events.iter().any(|e| event_rev(e) >= l.revision)
            })
            .map(|(at, _)| at.saturating_duration_since(l.created));
        let mut live: Vec<Duration> = rec
            .responses
            .iter()
            .filter(|(_, r)| r.watch_id == l.id)
            .flat_map(|(at, r)| r.events.iter().map(move |ev| (at, ev)))
            .filter_map(|(at, ev)| {
                let sent = sent_at(base, ev)?;
                (sent >= l.created + LATE_CATCH_UP).then(|| at.saturating_duration_since(sent))
            })
            .collect();
        let live_events = live.len();
        let (lp50, lp99, lmax) = percentiles(&mut live);
        eprintln!(
            "{run}: {} (created at revision {}, from {}): {summary}; reached revision {} {caught_up:?} after its creation; put-to-event once caught up: p50 {lp50:?}, p99 {lp99:?}, max {lmax:?} over {live_events} events",
            l.spec.name, l.revision, l.spec.start, l.revision,
        );
        let stuck = match (drained, late_after_slow) {
            (true, _) => "",
            (false, true) => " (it caught up only once the slow stream was read again)",
            (false, false) => " (it had not caught up even after the slow stream was read again)",
        };
        if caught_up.is_none_or(|d| d > LATE_CATCH_UP) {
            v.add(
                "catch-up",
                format!(
                    "created while the slow stream was stuck, it reached the revision it was created at {caught_up:?} later, not within {LATE_CATCH_UP:?}{stuck}"
                ),
            );
        }
        if lp99 > LATENCY_P99 {
            v.add(
                "latency",
                format!(
                    "put-to-event p99 {lp99:?} (max {lmax:?}) for writes sent {LATE_CATCH_UP:?} after its creation{stuck}"
                ),
            );
        }
        report.add(l.spec.name.clone(), v);
    }
    drop(rec);

    // The slow stream's watchers.
    for (i, spec) in slow_specs.iter().enumerate() {
        let id = i as i64 + 1;
        let responses: Vec<&WatchResponse> =
            slow_responses.iter().filter(|r| r.watch_id == id).collect();
        let upto = (!canceled.contains(&id)).then_some(slow_target(spec));
        let (mut v, summary) = check_watcher(spec, &responses, upto, &h);
        if canceled.contains(&id) {
            // A cancel is an acceptable end if it says why; what came before must be exact.
            v.kinds.remove("canceled");
            if responses.last().is_some_and(|r| r.cancel_reason.is_empty()) {
                v.add("canceled", "canceled without a reason".into());
            }
        }
        if let Err(e) = &slow_caught_up {
            v.add("caught up", e.clone());
        }
        if i < 4 {
            eprintln!("{run}: {}: {summary}", spec.name);
        }
        report.add(spec.name.clone(), v);
    }

    eprintln!(
        "{run}: server RSS {:.1} MiB before the writers, {:.1} MiB at most, {:.1} MiB after",
        mib(rss_before),
        mib(rss_max),
        mib(rss_after)
    );
    let mut v = Violations::default();
    if rss_max.saturating_sub(rss_before) > RSS_GROWTH {
        v.add(
            "memory",
            format!(
                "RSS grew by {:.1} MiB, over {:.0} MiB",
                mib(rss_max - rss_before),
                mib(RSS_GROWTH)
            ),
        );
    }
    report.add("server memory".into(), v);
    report.assert_clean(run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_costs_nobody_else() {
    let _serial = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let server = start_kv_server(&dir.path().join("data"), &[]);
        slow_consumer(&server.endpoint, server.pid(), "slow consumer").await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_costs_nobody_else_on_etcd() {
    let _serial = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let etcd = match start_etcd(&dir.path().join("etcd")) {
            Ok(p) => p,
            Err(why) => return eprintln!("SKIP slow_consumer_costs_nobody_else_on_etcd: {why}"),
        };
        slow_consumer(&etcd.endpoint, etcd.pid(), "etcd slow consumer").await;
    })
    .await
    .expect("test timed out");
}
