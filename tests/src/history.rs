//! Recorded histories under faults: clients that put, get, delete and compare-and-swap a few
//! keys through any member and record each call's times and outcome, and watchers that
//! record every event they receive and resume after losing their member. The checkers then
//! judge the records: [`crate::linearizability`] the client history, [`check_watches`] the
//! watch logs.
//!
//! A request that fails after it may have reached a member has an unknown outcome and is
//! recorded so. A request refused before it left (the member's port is closed) is dropped:
//! it had no effect, and recording it as unknown would only widen the checker's search.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv_core::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kv_core::proto::etcdserverpb::request_op::Request as Op;
use kv_core::proto::etcdserverpb::watch_request::RequestUnion;
use kv_core::proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, WatchRequest, kv_client::KvClient, watch_client::WatchClient,
};
use kv_core::proto::mvccpb::event::EventType;
use tonic::transport::Channel;

use crate::linearizability::{Call, Operation, Outcome};
use crate::rng::Rng;

/// How long a recorded request may take before its outcome is unknown.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// A lazy channel to `endpoint` (`host:port`) whose calls time out after `timeout`.
pub fn channel(endpoint: &str, timeout: Duration) -> Channel {
    Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint URL")
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout)
        .connect_lazy()
}

/// True when `status` says the request never left this client: nothing was delivered.
fn not_sent(status: &tonic::Status) -> bool {
    let text = format!("{status:?}");
    status.code() == tonic::Code::Unavailable
        && (text.contains("onnection refused") || text.contains("tcp connect error"))
}

/// The shared record of a run's client operations.
pub struct Recorder {
    origin: Instant,
    ops: Mutex<Vec<Operation>>,
    acked: Mutex<Vec<AckedWrite>>,
    next_value: AtomicU64,
}

/// A write the store acknowledged, with the revision it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedWrite {
    /// The key written.
    pub key: Vec<u8>,
    /// The value written (`None`: a delete that removed the key).
    pub value: Option<Vec<u8>>,
    /// The revision of the write.
    pub revision: i64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            origin: Instant::now(),
            ops: Mutex::new(Vec::new()),
            acked: Mutex::new(Vec::new()),
            next_value: AtomicU64::new(1),
        }
    }
}

impl Recorder {
    /// The instant the history's clock counts from.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Nanoseconds since the recorder was made: the history's clock.
    pub fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Adds an operation to the history.
    pub fn record(&self, op: Operation) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    fn ack(&self, write: AckedWrite) {
        self.acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(write);
    }

    /// The operations recorded so far.
    pub fn operations(&self) -> Vec<Operation> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The acknowledged writes so far.
    pub fn acked(&self) -> Vec<AckedWrite> {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Counts of one client task's requests.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientCounts {
    /// Requests answered.
    pub answered: u64,
    /// Requests whose outcome is unknown.
    pub unknown: u64,
    /// Requests refused before they were sent.
    pub not_sent: u64,
}

/// A client's view of the cluster: the member it talks to, moving on after a failure.
struct Client {
    endpoints: Vec<String>,
    at: usize,
    kv: KvClient<Channel>,
}

impl Client {
    fn new(endpoints: Vec<String>, first: usize) -> Client {
        let at = first % endpoints.len();
        let kv = KvClient::new(channel(&endpoints[at], REQUEST_TIMEOUT));
        Client { endpoints, at, kv }
    }

    fn move_on(&mut self) {
        self.at = (self.at + 1) % self.endpoints.len();
        self.kv = KvClient::new(channel(&self.endpoints[self.at], REQUEST_TIMEOUT));
    }
}

/// A value as the workload wrote it (a decimal id); anything else reads as `u64::MAX`.
pub fn value_of(bytes: &[u8]) -> u64 {
    // A value this workload never wrote reads as one no write made, which the checker
    // then reports: a corrupted or invented value.
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The keys a workload uses under `prefix`.
pub fn workload_keys(prefix: &str, keys: usize) -> Vec<Vec<u8>> {
    (0..keys)
        .map(|k| format!("{prefix}k{k:02}").into_bytes())
        .collect()
}

/// Runs one client until `stop`: random puts, linearizable gets, deletes and CAS txns on
/// `keys`, recorded in `recorder`. `client` numbers it in the history.
pub async fn run_client(
    endpoints: Vec<String>,
    keys: Vec<Vec<u8>>,
    client: usize,
    seed: u64,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> ClientCounts {
    let mut rng = Rng::new(seed);
    let mut conn = Client::new(endpoints, client);
    let mut counts = ClientCounts::default();
    // The last value this client saw per key: a CAS expects it, so some CASes succeed.
    let mut seen: Vec<Option<u64>> = vec![None; keys.len()];
    while !stop.load(Ordering::Relaxed) {
        let k = rng.below(keys.len() as u64) as usize;
        let key = keys[k].clone();
        let roll = rng.below(100);
        let call = if roll < 35 {
            Call::Put {
                value: recorder.next_value.fetch_add(1, Ordering::Relaxed),
            }
        } else if roll < 70 {
            Call::Get
        } else if roll < 78 {
            Call::Delete
        } else {
            Call::Cas {
                expect: seen[k],
                value: recorder.next_value.fetch_add(1, Ordering::Relaxed),
            }
        };
        let (invoked, member) = (recorder.now(), conn.at);
        let answer = send(&mut conn.kv, &key, &call).await;
        let returned = recorder.now();
        let (outcome, returned, revision) = match answer {
            Ok((outcome, revision, changed)) => {
                counts.answered += 1;
                match outcome {
                    Outcome::Read(v) => seen[k] = v,
                    Outcome::Written | Outcome::Swapped(true) => {
                        if let Call::Put { value } | Call::Cas { value, .. } = call {
                            seen[k] = Some(value);
                        }
                    }
                    _ => {}
                }
                if changed {
                    let value = match &call {
                        Call::Put { value } | Call::Cas { value, .. } => {
                            Some(value.to_string().into_bytes())
                        }
                        _ => None,
                    };
                    recorder.ack(AckedWrite {
                        key: key.clone(),
                        value,
                        revision,
                    });
                }
                (outcome, Some(returned), revision)
            }
            Err(status) => {
                let gone = not_sent(&status);
                conn.move_on();
                tokio::time::sleep(Duration::from_millis(rng.range(20, 100))).await;
                if gone {
                    counts.not_sent += 1;
                    continue;
                }
                if matches!(call, Call::Get) {
                    // A failed read had no effect: nothing to record.
                    continue;
                }
                counts.unknown += 1;
                (Outcome::Unknown, None, 0)
            }
        };
        recorder.record(Operation {
            key,
            call,
            outcome,
            invoked,
            returned,
            client,
            member,
            revision,
        });
    }
    counts
}

/// Sends `call` on `key`; returns the outcome, the answer's header revision, and whether
/// the call changed the store (a write at that revision).
async fn send(
    kv: &mut KvClient<Channel>,
    key: &[u8],
    call: &Call,
) -> Result<(Outcome, i64, bool), tonic::Status> {
    let revision =
        |h: Option<kv_core::proto::etcdserverpb::ResponseHeader>| h.map_or(0, |h| h.revision);
    match call {
        Call::Put { value } => {
            let r = kv
                .put(PutRequest {
                    key: key.to_vec(),
                    value: value.to_string().into_bytes(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok((Outcome::Written, revision(r.header), true))
        }
        Call::Get => {
            let r = kv
                .range(RangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok((
                Outcome::Read(r.kvs.first().map(|kv| value_of(&kv.value))),
                revision(r.header),
                false,
            ))
        }
        Call::Delete => {
            let r = kv
                .delete_range(DeleteRangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let deleted = r.deleted > 0;
            Ok((Outcome::Deleted(deleted), revision(r.header), deleted))
        }
        Call::Cas { expect, value } => {
            let compare = match expect {
                Some(v) => Compare {
                    key: key.to_vec(),
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Value as i32,
                    target_union: Some(TargetUnion::Value(v.to_string().into_bytes())),
                    ..Default::default()
                },
                None => Compare {
                    key: key.to_vec(),
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Version as i32,
                    target_union: Some(TargetUnion::Version(0)),
                    ..Default::default()
                },
            };
            let put = RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: key.to_vec(),
                    value: value.to_string().into_bytes(),
                    ..Default::default()
                })),
            };
            let r = kv
                .txn(TxnRequest {
                    compare: vec![compare],
                    success: vec![put],
                    failure: vec![],
                })
                .await?
                .into_inner();
            Ok((
                Outcome::Swapped(r.succeeded),
                revision(r.header),
                r.succeeded,
            ))
        }
    }
}

/// One event as a watcher received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedEvent {
    /// The event's revision (its key's mod revision).
    pub revision: i64,
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for a delete).
    pub value: Vec<u8>,
    /// True for a delete.
    pub delete: bool,
}

/// What one watcher received: its events grouped by response, and how often it resumed.
#[derive(Debug, Default, Clone)]
pub struct WatchLog {
    /// Each non-empty response's events, in arrival order.
    pub responses: Vec<Vec<WatchedEvent>>,
    /// Times the watcher lost its stream and resumed on a member.
    pub resumes: u64,
    /// Why it ended early, if it did (a compaction past it, a deadline).
    pub ended: Option<String>,
}

impl WatchLog {
    /// Every event, in order.
    pub fn events(&self) -> impl Iterator<Item = &WatchedEvent> {
        self.responses.iter().flatten()
    }

    fn last_revision(&self) -> Option<i64> {
        self.responses
            .last()
            .and_then(|r| r.last())
            .map(|e| e.revision)
    }
}

/// Watches `prefix` from `start` through any of `endpoints`, resuming on another member
/// after losing a stream, until it has seen revision `until` (once that is set above zero)
/// or `deadline` passes.
pub async fn run_watcher(
    endpoints: Vec<String>,
    prefix: Vec<u8>,
    start: i64,
    until: Arc<AtomicI64>,
    first: usize,
    deadline: Instant,
) -> WatchLog {
    let mut log = WatchLog::default();
    let mut at = first % endpoints.len();
    let mut range_end = prefix.clone();
    if let Some(last) = range_end.last_mut() {
        *last += 1;
    }
    loop {
        let from = log.last_revision().map_or(start, |r| r + 1);
        let target = until.load(Ordering::Relaxed);
        if target > 0 && from > target {
            return log;
        }
        if Instant::now() >= deadline {
            log.ended = Some(format!("deadline passed before revision {target}"));
            return log;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: prefix.clone(),
                range_end: range_end.clone(),
                start_revision: from,
                ..Default::default()
            })),
        };
        let _ = tx.send(create).await;
        let mut client = WatchClient::new(channel(&endpoints[at], Duration::from_secs(3600)));
        let opened = tokio::time::timeout(
            Duration::from_secs(3),
            client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(s)) => s.into_inner(),
            _ => {
                at = (at + 1) % endpoints.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            // A member paused or cut off sends nothing: after a quiet spell the watcher
            // tries another member, as a client whose keep-alive pings go unanswered does.
            let next = tokio::time::timeout(Duration::from_secs(3), stream.message()).await;
            let resp = match next {
                Ok(Ok(Some(resp))) => resp,
                _ => break,
            };
            if resp.compact_revision > 0 {
                log.ended = Some(format!("compacted at {}", resp.compact_revision));
                return log;
            }
            if resp.canceled {
                break;
            }
            if !resp.events.is_empty() {
                log.responses.push(
                    resp.events
                        .into_iter()
                        .map(|e| {
                            let kv = e.kv.unwrap_or_default();
                            WatchedEvent {
                                revision: kv.mod_revision,
                                key: kv.key.to_vec(),
                                value: kv.value.to_vec(),
                                delete: e.r#type == EventType::Delete as i32,
                            }
                        })
                        .collect(),
                );
            }
            let target = until.load(Ordering::Relaxed);
            if target > 0 && log.last_revision().is_some_and(|r| r >= target) {
                return log;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        drop(tx);
        log.resumes += 1;
        at = (at + 1) % endpoints.len();
    }
}

/// Checks etcd's watch guarantees over `logs`, given the store's own event history
/// `reference` (a fresh watch over the same range after the run) and the writes clients
/// saw acknowledged. Returns the anomalies found.
///
/// - ordered: revisions never go back, and a later response starts past the earlier one's
///   last revision;
/// - unique: no event twice;
/// - atomic: a revision's events come in one response;
/// - reliable and resumable: every watcher, across its resumes, received exactly the
///   reference's events, with no gap and nothing invented;
/// - and the reference holds every acknowledged write at the revision it was given.
pub fn check_watches(
    logs: &[WatchLog],
    reference: &[WatchedEvent],
    acked: &[AckedWrite],
) -> Vec<String> {
    let mut anomalies = Vec::new();
    for (w, log) in logs.iter().enumerate() {
        if let Some(why) = &log.ended {
            anomalies.push(format!("watcher {w} ended early: {why}"));
        }
        let mut last: Option<i64> = None;
        let mut seen = HashSet::new();
        for (r, resp) in log.responses.iter().enumerate() {
            let first = resp[0].revision;
            if last.is_some_and(|l| first <= l) {
                anomalies.push(format!(
                    "watcher {w} response {r} starts at revision {first}, not past {last:?} \
                     (out of order, repeated, or a revision split across responses)"
                ));
            }
            for pair in resp.windows(2) {
                if pair[1].revision < pair[0].revision {
                    anomalies.push(format!("watcher {w} response {r} goes back in revision"));
                }
            }
            for e in resp {
                if !seen.insert((e.revision, e.key.clone())) {
                    anomalies.push(format!(
                        "watcher {w} got {:?} at {} twice",
                        String::from_utf8_lossy(&e.key),
                        e.revision
                    ));
                }
            }
            last = resp.last().map(|e| e.revision);
        }
        let got: Vec<&WatchedEvent> = log.events().collect();
        if got.len() != reference.len() || got.iter().zip(reference).any(|(a, b)| *a != b) {
            let at = got
                .iter()
                .zip(reference)
                .position(|(a, b)| *a != b)
                .unwrap_or(got.len().min(reference.len()));
            anomalies.push(format!(
                "watcher {w} received {} events, the store holds {}; first difference at \
                 {at}: got {:?}, store {:?}",
                got.len(),
                reference.len(),
                got.get(at),
                reference.get(at)
            ));
        }
    }
    let by_revision: std::collections::HashMap<i64, Vec<&WatchedEvent>> =
        reference.iter().fold(Default::default(), |mut m, e| {
            m.entry(e.revision).or_default().push(e);
            m
        });
    let first = reference.first().map_or(i64::MAX, |e| e.revision);
    for a in acked.iter().filter(|a| a.revision >= first) {
        let found = by_revision.get(&a.revision).is_some_and(|events| {
            events.iter().any(|e| {
                e.key == a.key
                    && match &a.value {
                        Some(v) => !e.delete && &e.value == v,
                        None => e.delete,
                    }
            })
        });
        if !found {
            anomalies.push(format!(
                "acknowledged write of {:?} at revision {} is not in the store's history",
                String::from_utf8_lossy(&a.key),
                a.revision
            ));
        }
    }
    anomalies
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(revision: i64, key: &str, value: &str) -> WatchedEvent {
        WatchedEvent {
            revision,
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            delete: false,
        }
    }

    fn log(responses: Vec<Vec<WatchedEvent>>) -> WatchLog {
        WatchLog {
            responses,
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_ordered_log_passes_and_each_guarantee_can_fail() {
        let reference = vec![ev(2, "a", "1"), ev(3, "b", "2"), ev(4, "a", "3")];
        let acked = vec![AckedWrite {
            key: b"b".to_vec(),
            value: Some(b"2".to_vec()),
            revision: 3,
        }];
        let good = log(vec![reference[..2].to_vec(), reference[2..].to_vec()]);
        assert!(check_watches(&[good], &reference, &acked).is_empty());

        let gap = log(vec![vec![reference[0].clone(), reference[2].clone()]]);
        assert!(!check_watches(&[gap], &reference, &acked).is_empty());
        let repeated = log(vec![reference[..2].to_vec(), reference[1..].to_vec()]);
        assert!(!check_watches(&[repeated], &reference, &acked).is_empty());
        let invented = log(vec![vec![
            ev(2, "a", "1"),
            ev(3, "b", "9"),
            ev(4, "a", "3"),
        ]]);
        assert!(!check_watches(&[invented], &reference, &acked).is_empty());

        let lost_ack = AckedWrite {
            key: b"c".to_vec(),
            value: Some(b"7".to_vec()),
            revision: 4,
        };
        let good = log(vec![reference.clone()]);
        assert_eq!(check_watches(&[good], &reference, &[lost_ack]).len(), 1);
    }

    #[test]
    fn a_revision_split_across_responses_is_not_atomic() {
        let reference = vec![ev(2, "a", "1"), ev(2, "b", "1")];
        let split = log(vec![vec![reference[0].clone()], vec![reference[1].clone()]]);
        assert!(!check_watches(&[split], &reference, &[]).is_empty());
    }
}
