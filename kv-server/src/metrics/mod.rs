//! A member's metrics in Prometheus' text format (version 0.0.4, what etcd serves on
//! `/metrics`), under etcd's names where etcd has the metric, so etcd's dashboards and alerts
//! work unchanged; `kv_*` names for what etcd does not have (recipe state).
//!
//! Counters and histograms are atomics bumped where things happen; gauges are read from the
//! member's live state when scraped, so they cost nothing between scrapes. Each member owns
//! its registry (no process-wide recorder), so several members in one process (tests, an
//! embedding) report separately.

pub mod grpc;
pub mod probe;
mod process;
mod render;
mod scrape;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use render::Exposition;
pub use scrape::{cluster_version, scrape};

/// etcd's buckets for disk latencies (`etcd_disk_wal_fsync_duration_seconds`,
/// `etcd_disk_backend_commit_duration_seconds`): 1 ms doubling to 8.192 s.
pub const DISK_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192,
];

/// etcd's buckets for `etcd_network_peer_round_trip_time_seconds`: 0.1 ms doubling to
/// 0.8192 s.
pub const PEER_RTT_BUCKETS: &[f64] = &[
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048,
    0.4096, 0.8192,
];

/// Prometheus' default buckets, which go-grpc-prometheus uses for
/// `grpc_server_handling_seconds`.
pub const GRPC_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Durations sorted into fixed buckets, with their count and sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative; the exposition adds them up), then one for +Inf.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (upper bounds in seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let slot = self
            .bounds
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(self.bounds.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// (upper bound, cumulative count) per bucket, the last one `+Inf`, and the sum in seconds.
    pub fn cumulative(&self) -> (Vec<(f64, u64)>, f64) {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, bucket) in self.buckets.iter().enumerate() {
            total += bucket.load(Ordering::Relaxed);
            out.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), total));
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (out, sum)
    }
}

/// What a member counts as it works; the gauges are read from its state at scrape time
/// (see `http::metrics`).
#[derive(Debug)]
pub struct Metrics {
    /// gRPC calls by method and code (`grpc_server_*`).
    pub grpc: grpc::GrpcMetrics,
    /// Durable commits of the engine's state (`etcd_disk_backend_commit_duration_seconds`).
    pub backend_commit: Histogram,
    /// Round trips of a small peer call, by peer member id
    /// (`etcd_network_peer_round_trip_time_seconds`).
    pub peer_rtt: Mutex<BTreeMap<u64, std::sync::Arc<Histogram>>>,
    /// Leaders this member has seen come to power (`etcd_server_leader_changes_seen_total`).
    pub leader_changes: Counter,
    /// Proposals that failed (`etcd_server_proposals_failed_total`).
    pub proposals_failed: Counter,
    /// Proposals in flight on this member (`etcd_server_proposals_pending`).
    pub proposals_pending: AtomicU64,
    /// Applied puts, deletes and write transactions; ranges served (`etcd_mvcc_*_total`).
    pub mvcc: MvccCounters,
    /// Applied lease grants and revokes, and keep-alives answered (`etcd_debugging_lease_*`).
    pub leases: LeaseCounters,
    /// Health checks answered on `/health`, by outcome (`etcd_server_health_*`).
    pub health_success: Counter,
    /// See `health_success`.
    pub health_failures: Counter,
}

/// Counters of the MVCC store, as etcd counts them: every range, put and delete, those inside
/// transactions too, and every transaction (read-only ones included).
#[derive(Debug, Default)]
pub struct MvccCounters {
    /// Ranges served by this member.
    pub range: Counter,
    /// Puts applied.
    pub put: Counter,
    /// Delete-ranges applied.
    pub delete: Counter,
    /// Transactions applied or served as reads by this member.
    pub txn: Counter,
}

impl MvccCounters {
    /// Counts a transaction and the operations of the branch that ran, nested ones too.
    pub fn count_txn(&self, txn: &kv_core::proto::etcdserverpb::TxnResponse) {
        use kv_core::proto::etcdserverpb::response_op::Response;
        self.txn.inc();
        for op in &txn.responses {
            match &op.response {
                Some(Response::ResponseRange(_)) => self.range.inc(),
                Some(Response::ResponsePut(_)) => self.put.inc(),
                Some(Response::ResponseDeleteRange(_)) => self.delete.inc(),
                Some(Response::ResponseTxn(nested)) => self.count_txn(nested),
                None => {}
            }
        }
    }
}

/// Counters of leases.
#[derive(Debug, Default)]
pub struct LeaseCounters {
    /// Grants applied.
    pub granted: Counter,
    /// Revokes applied (expiries included).
    pub revoked: Counter,
    /// Keep-alives answered by this member as leader.
    pub renewed: Counter,
}

impl Metrics {
    /// An empty registry. (The Raft log keeps its own fsync latencies, read at scrape.)
    pub fn new() -> Self {
        Self {
            grpc: grpc::GrpcMetrics::default(),
            backend_commit: Histogram::new(DISK_BUCKETS),
            peer_rtt: Mutex::new(BTreeMap::new()),
            leader_changes: Counter::default(),
            proposals_failed: Counter::default(),
            proposals_pending: AtomicU64::new(0),
            mvcc: MvccCounters::default(),
            leases: LeaseCounters::default(),
            health_success: Counter::default(),
            health_failures: Counter::default(),
        }
    }

    /// The round-trip histogram of peer `id`, created on first use.
    pub fn peer_rtt(&self, id: u64) -> std::sync::Arc<Histogram> {
        let mut peers = self.peer_rtt.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .entry(id)
            .or_insert_with(|| std::sync::Arc::new(Histogram::new(PEER_RTT_BUCKETS)))
            .clone()
    }

    /// Forgets peers that are no longer members.
    pub fn retain_peers(&self, members: impl Fn(u64) -> bool) {
        let mut peers = self.peer_rtt.lock().unwrap_or_else(|e| e.into_inner());
        peers.retain(|id, _| members(*id));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(1000)); // on the bound: counts in le="0.001"
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(3));
        let (buckets, sum) = h.cumulative();
        assert_eq!(buckets.len(), 3);
        assert_eq!(buckets[0], (0.001, 1));
        assert_eq!(buckets[1], (0.01, 2));
        assert_eq!(buckets[2].1, 3);
        assert!(buckets[2].0.is_infinite());
        assert!((sum - 3.006).abs() < 1e-9, "{sum}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn a_transaction_counts_its_operations_nested_ones_too() {
        use kv_core::proto::etcdserverpb::{
            DeleteRangeResponse, PutResponse, RangeResponse, ResponseOp, TxnResponse,
            response_op::Response,
        };
        let op = |r| ResponseOp { response: Some(r) };
        let nested = TxnResponse {
            responses: vec![op(Response::ResponsePut(PutResponse::default()))],
            ..Default::default()
        };
        let txn = TxnResponse {
            responses: vec![
                op(Response::ResponseRange(RangeResponse::default())),
                op(Response::ResponsePut(PutResponse::default())),
                op(Response::ResponseDeleteRange(DeleteRangeResponse::default())),
                op(Response::ResponseTxn(nested)),
            ],
            ..Default::default()
        };
        let m = MvccCounters::default();
        m.count_txn(&txn);
        assert_eq!(
            (m.txn.get(), m.range.get(), m.put.get(), m.delete.get()),
            (2, 1, 2, 1)
        );
    }

    #[test]
    fn peers_no_longer_members_are_forgotten() {
        let m = Metrics::default();
        m.peer_rtt(1).observe(Duration::from_millis(1));
        m.peer_rtt(2).observe(Duration::from_millis(1));
        m.retain_peers(|id| id == 2);
        let peers = m.peer_rtt.lock().unwrap();
        assert_eq!(peers.keys().copied().collect::<Vec<_>>(), vec![2]);
    }
}
