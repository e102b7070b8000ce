//! The leader's side of leases: remaining time, keep-alives, time-to-live and expiry.
//!
//! Which leases exist is replicated state (the engine's lease table); how long each has left
//! lives only in the leader's [`LeaseClock`], as in etcd. A keep-alive restarts a lease's clock
//! without touching the log; a follower forwards keep-alives and time-to-live requests to the
//! leader. When the clock runs out, the leader proposes a revoke, so every member deletes the
//! same keys at the same revision. A member that becomes leader restarts every lease's clock
//! with the full TTL plus an election timeout, so an election never expires a lease early.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kv_core::Store;
use kv_core::lease::{Deadlines, Renewal, ttl_duration};
use kv_core::proto::etcdserverpb::LeaseRevokeRequest;
use kv_core::proto::kvserverpb::internal_request::Request;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::errors::raft_status;
use crate::node::{EngineApplier, Node};
use crate::raft::network::PeerError;
use crate::raft::{LeaderCalls, Leadership, REQUEST_TIMEOUT, RaftNode, RaftTiming};

/// How often the leader looks for expired leases. Finding none costs one heap peek.
const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// When an expired lease's revoke did not get through, the leader tries again this much later.
const REVOKE_RETRY: Duration = Duration::from_secs(3);
/// Revoke proposals in flight at once; more expired leases wait for the next tick.
const MAX_REVOKES_IN_FLIGHT: usize = 256;
/// Pause between attempts to reach a leader while there is none.
const NO_LEADER_RETRY: Duration = Duration::from_millis(20);

/// The leader's lease deadlines. Shared with the applier, which reports grants and revokes.
#[derive(Debug, Default)]
pub struct LeaseClock {
    state: Mutex<ClockState>,
}

#[derive(Debug, Default)]
struct ClockState {
    /// This member leads and keeps the clocks.
    primary: bool,
    deadlines: Deadlines,
}

impl LeaseClock {
    fn lock(&self) -> MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this member keeps lease clocks (it leads).
    pub fn is_primary(&self) -> bool {
        self.lock().primary
    }

    /// A grant was applied: on the leader, the lease's clock starts now.
    pub fn granted(&self, id: i64, ttl: i64) {
        let mut s = self.lock();
        if s.primary {
            s.deadlines.set(id, Instant::now() + ttl_duration(ttl));
        }
    }

    /// A revoke was applied: the lease has no clock any more.
    pub fn revoked(&self, id: i64) {
        self.lock().deadlines.remove(id);
    }

    /// This member became leader: every lease gets its full TTL plus `extend`. Primary is set
    /// before the table is read, so a grant applied meanwhile starts its own clock.
    fn promote(&self, store: &Store, extend: Duration) {
        self.lock().primary = true;
        let leases = store.leases();
        let start = Instant::now() + extend;
        let mut s = self.lock();
        for (id, ttl) in leases {
            s.deadlines.set(id, start + ttl_duration(ttl));
        }
    }

    /// This member stopped leading: its clocks mean nothing any more.
    fn demote(&self) {
        let mut s = self.lock();
        s.primary = false;
        s.deadlines.clear();
    }

    fn pop_expired(&self, limit: usize) -> Vec<i64> {
        let mut s = self.lock();
        if !s.primary {
            return Vec::new();
        }
        s.deadlines.pop_expired(Instant::now(), REVOKE_RETRY, limit)
    }
}

/// A lease request a follower forwards to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum LeaseCall {
    Renew(i64),
    TimeToLive { id: i64, keys: bool },
}

/// The leader's answer to a [`LeaseCall`].
#[derive(Debug, Clone, Serialize, Deserialize)]
enum LeaseAnswer {
    /// The TTL the lease was renewed for; `None`: no such lease (or it expired).
    Renewed(Option<i64>),
    /// The lease's time to live; `None`: no such lease.
    TimeToLive(Option<TimeToLive>),
    /// The receiver does not lead (any more): ask the new leader.
    NotLeader,
    /// The receiver failed to answer (its state machine lags, say); the text says why.
    Failed(String),
}

/// A lease's time to live, as LeaseTimeToLive reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeToLive {
    /// Whole seconds left.
    pub remaining: i64,
    /// The granted TTL.
    pub granted: i64,
    /// Attached keys in key order (only when asked for).
    pub keys: Vec<Vec<u8>>,
}

/// Lease ids chosen by this member, as etcd's request id generator: the member id's low 16
/// bits, then the start time in milliseconds (40 bits) and a counter (8 bits) that carries
/// into it, so ids from different members and restarts do not collide.
#[derive(Debug)]
struct LeaseIds {
    prefix: u64,
    suffix: AtomicU64,
}

impl LeaseIds {
    const SUFFIX_BITS: u32 = 48;
    const COUNTER_BITS: u32 = 8;

    fn new(member_id: u64) -> Self {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let ts_mask = (1u64 << (Self::SUFFIX_BITS - Self::COUNTER_BITS)) - 1;
        Self {
            prefix: (member_id & 0xffff) << Self::SUFFIX_BITS,
            suffix: AtomicU64::new((millis & ts_mask) << Self::COUNTER_BITS),
        }
    }

    /// A fresh positive lease id.
    fn next(&self) -> i64 {
        loop {
            let suffix = self.suffix.fetch_add(1, Ordering::Relaxed) + 1;
            let id =
                (self.prefix | (suffix & ((1u64 << Self::SUFFIX_BITS) - 1))) & (i64::MAX as u64);
            if id != 0 {
                return id as i64;
            }
        }
    }
}

/// The smallest TTL a lease gets, in seconds: etcd's `minLeaseTTL`, one and a half election
/// timeouts (in whole heartbeats) rounded up, so a lease cannot expire during an election.
pub fn min_lease_ttl(timing: &RaftTiming) -> i64 {
    let heartbeat = timing.heartbeat_ms.max(1);
    let ticks = timing.election_timeout_ms / heartbeat;
    let millis = (3 * ticks / 2) * heartbeat;
    millis.div_ceil(1000) as i64
}

/// Leases on one member: its clock (kept while it leads), id choice, and the calls that read
/// or restart a clock, forwarded to the leader from a follower.
pub struct Lessor {
    /// Counts the keep-alives answered here.
    metrics: Arc<crate::metrics::Metrics>,
    store: Arc<Store>,
    raft: RaftNode<EngineApplier>,
    clock: Arc<LeaseClock>,
    /// Added to every TTL when this member becomes leader (etcd: the election timeout).
    extend: Duration,
    min_ttl: i64,
    ids: LeaseIds,
}

impl Lessor {
    /// The lessor of a member whose applier reports to `clock`.
    pub fn new(
        store: Arc<Store>,
        raft: RaftNode<EngineApplier>,
        clock: Arc<LeaseClock>,
        timing: &RaftTiming,
        member_id: u64,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            metrics,
            store,
            raft,
            clock,
            extend: Duration::from_millis(timing.election_timeout_ms),
            min_ttl: min_lease_ttl(timing),
            ids: LeaseIds::new(member_id),
        }
    }

    /// The smallest TTL a grant gets.
    pub fn min_ttl(&self) -> i64 {
        self.min_ttl
    }

    /// A lease id for a grant that did not name one.
    pub fn next_id(&self) -> i64 {
        self.ids.next()
    }

    /// Restarts lease `id`'s clock; answers the TTL it was renewed for, or `None` when the
    /// lease does not exist or already expired.
    pub async fn renew(&self, id: i64) -> Result<Option<i64>, Status> {
        match self.on_leader(LeaseCall::Renew(id)).await? {
            LeaseAnswer::Renewed(ttl) => Ok(ttl),
            other => Err(unexpected(other)),
        }
    }

    /// Lease `id`'s remaining and granted TTL (and keys if asked); `None` if it does not exist.
    pub async fn time_to_live(&self, id: i64, keys: bool) -> Result<Option<TimeToLive>, Status> {
        match self.on_leader(LeaseCall::TimeToLive { id, keys }).await? {
            LeaseAnswer::TimeToLive(ttl) => Ok(ttl),
            other => Err(unexpected(other)),
        }
    }

    /// Answers `call` here when this member leads, else at the leader; waits for a leader (up
    /// to [`REQUEST_TIMEOUT`]) while there is none. Both calls are safe to repeat.
    async fn on_leader(&self, call: LeaseCall) -> Result<LeaseAnswer, Status> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(raft_status(&crate::raft::RaftError::Timeout(
                    "no leader answered the lease request".into(),
                )));
            }
            if self.clock.is_primary() {
                match self.answer(&call, remaining).await {
                    LeaseAnswer::NotLeader => {}
                    LeaseAnswer::Failed(why) => return Err(Status::unavailable(why)),
                    answer => return Ok(answer),
                }
            } else {
                // Encoded only to forward: the leader answers from its clock without it.
                let request = postcard::to_allocvec(&call)
                    .map_err(|e| Status::internal(format!("cannot encode lease call: {e}")))?;
                match self.raft.call_leader(request, remaining).await {
                    Ok(bytes) => match postcard::from_bytes(&bytes) {
                        Ok(LeaseAnswer::NotLeader) => {}
                        Ok(LeaseAnswer::Failed(why)) => return Err(Status::unavailable(why)),
                        Ok(answer) => return Ok(answer),
                        Err(e) => {
                            return Err(Status::internal(format!("bad lease answer: {e}")));
                        }
                    },
                    Err(PeerError::NotDelivered { .. }) => {}
                    // Renewals and reads are safe to repeat, whatever happened to the call.
                    Err(e) => tracing::debug!(error = %e, "lease call to the leader failed"),
                }
            }
            tokio::time::sleep(NO_LEADER_RETRY.min(remaining)).await;
        }
    }

    /// Answers `call` from this member's clock, if it leads.
    async fn answer(&self, call: &LeaseCall, limit: Duration) -> LeaseAnswer {
        if !self.clock.is_primary() {
            return LeaseAnswer::NotLeader;
        }
        let id = match call {
            LeaseCall::Renew(id) | LeaseCall::TimeToLive { id, .. } => *id,
        };
        // A new leader may not have applied a grant the old one acknowledged yet: before
        // saying "no such lease", catch up with what is committed (as etcd's
        // `waitAppliedIndex`).
        let known = self.store.lease_ttl(id);
        if known.is_none()
            && let Err(e) = self.raft.wait_applied_committed(limit).await
        {
            return LeaseAnswer::Failed(raft_status(&e).message().to_string());
        }
        match call {
            LeaseCall::Renew(id) => LeaseAnswer::Renewed(self.renew_here(*id, known)),
            LeaseCall::TimeToLive { id, keys } => {
                LeaseAnswer::TimeToLive(self.time_to_live_here(*id, *keys))
            }
        }
    }

    /// Renews lease `id`, whose granted TTL is `known` if already read.
    fn renew_here(&self, id: i64, known: Option<i64>) -> Option<i64> {
        let ttl = match known {
            Some(ttl) => ttl,
            None => self.store.lease_ttl(id)?,
        };
        let now = Instant::now();
        let mut s = self.clock.lock();
        let renewal = s.deadlines.renew(id, ttl, now);
        if !matches!(renewal, Renewal::Expired) {
            self.metrics.leases.renewed.inc();
        }
        match renewal {
            Renewal::Renewed => Some(ttl),
            Renewal::Expired => None,
            // Granted while this member was taking over: its clock starts now.
            Renewal::Unknown => {
                s.deadlines.set(id, now + ttl_duration(ttl));
                Some(ttl)
            }
        }
    }

    fn time_to_live_here(&self, id: i64, keys: bool) -> Option<TimeToLive> {
        let (granted, attached) = self.store.lease(id)?;
        let remaining = self
            .clock
            .lock()
            .deadlines
            .remaining(id, Instant::now())
            .map_or(granted, |d| d.as_secs() as i64);
        Some(TimeToLive {
            remaining,
            granted,
            keys: if keys { attached } else { Vec::new() },
        })
    }
}

fn unexpected(answer: LeaseAnswer) -> Status {
    Status::new(
        Code::Internal,
        format!("etcdserver: unexpected lease answer {answer:?}"),
    )
}

impl LeaderCalls for Lessor {
    fn handle(
        &self,
        request: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send + '_>> {
        Box::pin(async move {
            let answer = match postcard::from_bytes::<LeaseCall>(&request) {
                Ok(call) => self.answer(&call, REQUEST_TIMEOUT).await,
                Err(e) => LeaseAnswer::Failed(format!("undecodable lease call: {e}")),
            };
            postcard::to_allocvec(&answer).unwrap_or_default()
        })
    }
}

/// Follows this member's leadership (promoting and demoting its clock) and, while it leads,
/// proposes a revoke for every lease whose time ran out. Runs until `cancel`.
pub async fn run(node: Arc<Node>, cancel: CancellationToken) {
    let lessor = node.lessor.clone();
    let revokes = Arc::new(Semaphore::new(MAX_REVOKES_IN_FLIGHT));
    let mut seen = Leadership::default();
    loop {
        let now = tokio::select! {
            _ = cancel.cancelled() => return,
            now = lessor.raft.leadership_change(seen, EXPIRY_TICK) => now,
        };
        if now != seen {
            if now.leader {
                tracing::info!(
                    term = now.term,
                    "leases: this member leads; lease clocks restart"
                );
                lessor.clock.promote(&lessor.store, lessor.extend);
            } else {
                lessor.clock.demote();
            }
            seen = now;
        }
        let expired = lessor.clock.pop_expired(revokes.available_permits());
        for id in expired {
            let Ok(permit) = revokes.clone().try_acquire_owned() else {
                break;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let revoke = Request::LeaseRevoke(LeaseRevokeRequest { id });
                match node.propose(revoke).await {
                    Ok(_) => tracing::debug!(lease = id, "leases: expired lease revoked"),
                    // Revoked meanwhile: nothing to retry.
                    Err(s) if s.code() == Code::NotFound => node.lessor.clock.revoked(id),
                    // The retry deadline brings it back if this member still leads.
                    Err(s) => {
                        tracing::warn!(lease = id, error = %s.message(), "leases: revoke of an expired lease failed")
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_ttl_is_etcds() {
        let t = |heartbeat_ms, election_timeout_ms| RaftTiming {
            heartbeat_ms,
            election_timeout_ms,
            ..RaftTiming::default()
        };
        // Defaults: 10 ticks of 100 ms -> 1.5 s -> 2 s.
        assert_eq!(min_lease_ttl(&t(100, 1000)), 2);
        assert_eq!(min_lease_ttl(&t(100, 2000)), 3);
        assert_eq!(min_lease_ttl(&t(50, 1000)), 2);
        assert_eq!(min_lease_ttl(&t(100, 150)), 1);
    }

    #[test]
    fn lease_ids_are_positive_distinct_and_carry_the_member() {
        let ids = LeaseIds::new(0xabcd_1234);
        let a = ids.next();
        let b = ids.next();
        assert!(a > 0 && b > 0 && a != b);
        assert_eq!((a as u64) >> 48, 0x1234 & 0x7fff);
    }
}
