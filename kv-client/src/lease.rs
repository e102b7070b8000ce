//! Leases: grant, revoke, time-to-live, list, and keep-alive handles on one shared stream.
//!
//! # Keep-alive
//!
//! Every [`KeepAlive`] handle of one client (all its clones and namespaced views) counts in
//! one [`Keeper`], kept in the client's shared state, and is served by one tokio task with one
//! `LeaseKeepAlive` stream renewing every kept lease. The task starts with the first handle
//! and stops, closing the stream, when no lease is left to renew; the next `keep_alive` starts
//! it again. The task holds a clone of the client (the keeper does not, or the client would
//! own itself), so handles keep renewing after the caller drops its clients.
//!
//! Per lease the task keeps at most one renewal in flight, and:
//! - renews a third of the last answered TTL after the last answer;
//! - takes the lease to be valid until *send time* of the answered request + TTL (the server
//!   renewed it no earlier than that), never later;
//! - reports it lost when the server answers TTL 0 (expired or revoked) or when that deadline
//!   passes without a renewal. Loss is final: the task stops renewing that lease, whatever a
//!   late answer says, since the caller may already have acted on it.
//!
//! When the stream fails, or a renewal is still unanswered when the next one is due (a hung
//! member), the task marks the endpoint failed, backs off with the client's schedule, and
//! reopens the stream on the next endpoint, renewing every lease at once.

use std::collections::{BTreeMap, VecDeque};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::client::Conn;
use kv_core::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseRevokeRequest, LeaseTimeToLiveRequest,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Streaming};

use crate::client::{Client, Idempotence, api};
use crate::error::{Error, Result};

/// A lease the server granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Its id (the one asked for, or the server's choice).
    pub id: i64,
    /// Its TTL in seconds: the one asked for, raised to the server's minimum.
    pub ttl: i64,
    /// The store revision when it was granted (a grant writes no revision).
    pub revision: i64,
}

/// What the server knows of a live lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeToLive {
    /// Seconds left.
    pub ttl: i64,
    /// The TTL it was granted with.
    pub granted_ttl: i64,
    /// The keys attached to it (when asked for), sorted (etcd lists them in no particular
    /// order), without the client's namespace; keys outside the namespace are left out.
    pub keys: Vec<Vec<u8>>,
}

/// Why a kept-alive lease is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    /// The server answered that the lease does not exist: it expired or was revoked.
    #[error("the lease expired or was revoked")]
    NotFound,
    /// No renewal succeeded before the lease's deadline (see [`KeepAlive::valid_until`]); the
    /// server may have expired it already, so the client stopped counting on it.
    #[error("the lease was not renewed before its deadline")]
    DeadlinePassed,
}

/// The lease API of a [`Client`]; the crate docs show a kept-alive lease end to end.
#[derive(Debug, Clone)]
pub struct Lease {
    client: Client,
}

impl Lease {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Grants a lease of `ttl` seconds with the server's choice of id (`None`) or `id`.
    ///
    /// Not resent after a failure that may have applied it: a grant with a server-chosen id
    /// could create a second lease, and one with an explicit id would answer
    /// [`Error::LeaseExists`] without telling whose grant made it.
    pub async fn grant(&self, ttl: i64, id: Option<i64>) -> Result<LeaseGrant> {
        let req = LeaseGrantRequest {
            ttl,
            id: id.unwrap_or(0),
        };
        let resp = self
            .client
            .call(Idempotence::Unsafe, |channel| async move {
                Ok(api::lease(channel).lease_grant(req).await?.into_inner())
            })
            .await?;
        if !resp.error.is_empty() {
            return Err(Error::Server {
                code: Code::Unknown,
                message: resp.error,
            });
        }
        Ok(LeaseGrant {
            id: resp.id,
            ttl: resp.ttl,
            revision: resp.header.map_or(0, |h| h.revision),
        })
    }

    /// Revokes lease `id`, deleting its keys; returns the revision of the revoke.
    ///
    /// Not resent after a failure that may have applied it. "A retry answered
    /// [`Error::LeaseNotFound`] means our revoke happened" is not sound: between the two
    /// attempts the lease may have been revoked and `id` granted again by someone else, and
    /// the retry would revoke their lease. After [`Error::OutcomeUnknown`], ask
    /// [`Lease::time_to_live`].
    pub async fn revoke(&self, id: i64) -> Result<i64> {
        let req = LeaseRevokeRequest { id };
        let resp = self
            .client
            .call(Idempotence::Unsafe, |channel| async move {
                Ok(api::lease(channel).lease_revoke(req).await?.into_inner())
            })
            .await?;
        Ok(resp.header.map_or(0, |h| h.revision))
    }

    /// The remaining and granted TTL of lease `id`, and its keys if `keys`; `None` if the
    /// lease does not exist (etcd answers TTL -1).
    pub async fn time_to_live(&self, id: i64, keys: bool) -> Result<Option<TimeToLive>> {
        let req = LeaseTimeToLiveRequest { id, keys };
        let resp = self
            .client
            .call(Idempotence::Safe, |channel| async move {
                Ok(api::lease(channel)
                    .lease_time_to_live(req)
                    .await?
                    .into_inner())
            })
            .await?;
        if resp.ttl == -1 {
            return Ok(None);
        }
        let ns = self.client.namespace();
        let mut keys: Vec<Vec<u8>> = resp
            .keys
            .iter()
            .filter_map(|k| k.strip_prefix(ns).map(<[u8]>::to_vec))
            .collect();
        keys.sort_unstable();
        Ok(Some(TimeToLive {
            ttl: resp.ttl,
            granted_ttl: resp.granted_ttl,
            keys,
        }))
    }

    /// The ids of all live leases, ascending.
    pub async fn leases(&self) -> Result<Vec<i64>> {
        let resp = self
            .client
            .call(Idempotence::Safe, |channel| async move {
                Ok(api::lease(channel)
                    .lease_leases(LeaseLeasesRequest {})
                    .await?
                    .into_inner())
            })
            .await?;
        let mut ids: Vec<i64> = resp.leases.iter().map(|l| l.id).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Keeps lease `id` alive until the last handle for it is dropped (which stops renewing
    /// it; it does not revoke it). Returns once the server has renewed it once, with
    /// [`Error::LeaseNotFound`] if it does not exist, or [`Error::DeadlineExceeded`] if no
    /// renewal succeeded within the request timeout.
    ///
    /// All handles of the client, for any lease, share one stream (see the module docs).
    pub async fn keep_alive(&self, id: i64) -> Result<KeepAlive> {
        let registration = Keeper::register(&self.client, id);
        let timeout = self.client.options().request_timeout;
        let mut status = registration.status.clone();
        let first = status.wait_for(|s| s.ttl > 0 || s.lost.is_some());
        // Whether it timed out or not, the value read below tells what happened.
        let _ = tokio::time::timeout(timeout, first).await;
        let seen = status.borrow().clone();
        match seen.lost {
            Some(LeaseLost::NotFound) => Err(Error::LeaseNotFound),
            None if seen.ttl > 0 => Ok(KeepAlive {
                registration: Arc::new(registration),
            }),
            _ => Err(Error::DeadlineExceeded(format!(
                "no keep-alive answer for lease {id:#x} within {timeout:?}"
            ))),
        }
    }
}

/// A kept-alive lease. Cheap to clone; the lease is renewed while any handle for it (from
/// any `keep_alive` call on the same client) exists.
#[derive(Clone)]
pub struct KeepAlive {
    registration: Arc<Registration>,
}

impl KeepAlive {
    /// The lease id.
    pub fn id(&self) -> i64 {
        self.registration.id
    }

    /// The TTL in seconds the server gave in its last renewal.
    pub fn ttl(&self) -> i64 {
        self.registration.status.borrow().ttl
    }

    /// Until when the lease is known to live: the send time of the last answered renewal
    /// plus its TTL. Past it without a renewal the lease is reported lost.
    pub fn valid_until(&self) -> std::time::Instant {
        self.registration.status.borrow().valid_until.into_std()
    }

    /// Why the lease is lost, if it is.
    pub fn try_lost(&self) -> Option<LeaseLost> {
        self.registration.status.borrow().lost
    }

    /// Resolves when the lease is lost, with the reason; pending while it is kept alive.
    pub async fn lost(&self) -> LeaseLost {
        let mut status = self.registration.status.clone();
        // Err (sender gone) only after a loss, which the value read below shows.
        let _ = status.wait_for(|s| s.lost.is_some()).await;
        let seen = status.borrow().clone();
        match seen.lost {
            Some(why) => why,
            // Unreachable by construction; should it happen, nobody renews the lease any
            // more, so it is lost at its deadline.
            None => {
                tokio::time::sleep_until(seen.valid_until).await;
                LeaseLost::DeadlinePassed
            }
        }
    }
}

impl std::fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.registration.status.borrow();
        f.debug_struct("KeepAlive")
            .field("id", &self.registration.id)
            .field("ttl", &status.ttl)
            .field("lost", &status.lost)
            .finish()
    }
}

/// What handles see of a kept lease; written by the keeper, one `watch` channel per lease.
#[derive(Debug, Clone)]
struct Liveness {
    /// TTL of the last renewal; 0 before the first.
    ttl: i64,
    /// Send time of the last answered renewal + its TTL (registration time before the first).
    valid_until: Instant,
    /// Set once, when the lease is lost.
    lost: Option<LeaseLost>,
}

/// One `keep_alive` call's claim on a lease; dropping it (with the last [`KeepAlive`] clone)
/// releases the claim.
struct Registration {
    id: i64,
    /// Which [`Kept`] entry for `id` this claim counts in.
    generation: u64,
    keeper: Arc<Keeper>,
    status: watch::Receiver<Liveness>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.keeper.unregister(self.id, self.generation);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent between statements, so a panic elsewhere leaves it usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The keep-alive state of one client: the kept leases, and the task renewing them over one
/// stream.
#[derive(Default)]
struct Keeper {
    /// A std mutex: held for bookkeeping only, never across an await.
    state: Mutex<State>,
    /// Wakes the task: a lease was added (renew it now) or released (maybe none is left).
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Leases with live claims, by id.
    leases: BTreeMap<i64, Kept>,
    /// The renewing task, if one was started; `None` once it decided to stop.
    task: Option<JoinHandle<()>>,
    next_generation: u64,
}

/// A lease the keeper renews (or, once lost, keeps reporting for its remaining handles).
struct Kept {
    /// Tells this entry from an earlier one for the same id (replaced after a loss).
    generation: u64,
    /// Live [`Registration`]s of this entry.
    claims: usize,
    status: watch::Sender<Liveness>,
    /// When to send the next renewal.
    next_renewal: Instant,
    /// Send time of this entry's unanswered renewal on the current stream.
    in_flight: Option<Instant>,
}

/// A renewal sent on the current stream and not yet answered.
struct Sent {
    id: i64,
    generation: u64,
    at: Instant,
}

/// What a pass over the kept leases decided.
enum Step {
    /// Wake again at this instant (or only when notified).
    Wait(Option<Instant>),
    /// Nothing left to renew: the task stops.
    Idle,
    /// The stream cannot carry renewals: a due one is still unanswered, or it is closed.
    Broken,
}

/// How a stream ended.
enum Ended {
    Idle,
    /// It failed; `answered` says whether it renewed anything first, `status` why (when the
    /// server said).
    Failed {
        answered: bool,
        status: Option<tonic::Status>,
    },
}

/// The renewal period for a TTL: a third of it, or the request timeout before the first
/// answer.
/// How early a renewal may go out, to share a pass with others due at about the same time
/// (the shortest renewal interval, for a 2 s TTL, is 666 ms).
const RENEW_SLACK: Duration = Duration::from_millis(25);

fn renew_interval(ttl: i64, request_timeout: Duration) -> Duration {
    match u64::try_from(ttl) {
        Ok(ttl) if ttl > 0 => Duration::from_millis(ttl.saturating_mul(1000) / 3),
        _ => request_timeout,
    }
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_answer(
    answers: &mut Option<Streaming<LeaseKeepAliveResponse>>,
) -> std::result::Result<Option<LeaseKeepAliveResponse>, tonic::Status> {
    match answers {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

impl Keeper {
    /// Claims lease `id`: joins its entry, or starts one (replacing a lost one) to be renewed
    /// at once; starts the task if none runs.
    fn register(client: &Client, id: i64) -> Registration {
        let keeper = client.shared::<Keeper>();
        let now = Instant::now();
        let mut state = lock(&keeper.state);
        let state = &mut *state;
        let joinable = state
            .leases
            .get(&id)
            .is_some_and(|k| k.status.borrow().lost.is_none());
        if !joinable {
            let generation = state.next_generation;
            state.next_generation += 1;
            let (status, _) = watch::channel(Liveness {
                ttl: 0,
                valid_until: now,
                lost: None,
            });
            let kept = Kept {
                generation,
                claims: 0,
                status,
                next_renewal: now,
                in_flight: None,
            };
            // A lost entry's handles keep their receivers, which still show the loss.
            state.leases.insert(id, kept);
        }
        let Some(kept) = state.leases.get_mut(&id) else {
            unreachable!("inserted above");
        };
        kept.claims += 1;
        let registration = Registration {
            id,
            generation: kept.generation,
            keeper: keeper.clone(),
            status: kept.status.subscribe(),
        };
        // A task that ended without saying so (its runtime shut down) counts as stopped.
        if state.task.as_ref().is_none_or(JoinHandle::is_finished) {
            let task = Task {
                client: client.clone(),
                keeper: keeper.clone(),
            };
            state.task = Some(tokio::spawn(task.run()));
        }
        keeper.wake.notify_one();
        registration
    }

    /// Releases a claim; the last one of an entry removes it (no more renewals).
    fn unregister(&self, id: i64, generation: u64) {
        let mut state = lock(&self.state);
        let Some(kept) = state.leases.get_mut(&id) else {
            return;
        };
        if kept.generation != generation {
            return;
        }
        kept.claims -= 1;
        if kept.claims == 0 {
            state.leases.remove(&id);
            self.wake.notify_one();
        }
    }
}

/// The renewing task of a [`Keeper`]: streams, one endpoint after another, until nothing is
/// left to renew.
struct Task {
    client: Client,
    keeper: Arc<Keeper>,
}

impl Task {
    async fn run(self) {
        let mut delays = self.client.backoff();
        loop {
            let (index, channel) = self.client.channel();
            let token = self.client.token();
            match self.session(channel).await {
                Ended::Idle => return,
                Ended::Failed {
                    status: Some(status),
                    ..
                } if self
                    .client
                    .wants_new_token(&crate::Error::from_status(&status).0) =>
                {
                    // The stream's token expired or went stale: renew it and reopen at once.
                    if self.client.renew_token(token.as_ref()).await.is_err()
                        && self.pause(self.client.options().max_backoff).await
                    {
                        return;
                    }
                }
                Ended::Failed { answered, .. } => {
                    self.client.endpoint_failed(index);
                    if answered {
                        delays = self.client.backoff();
                    }
                    let pause = delays.next().unwrap_or(self.client.options().max_backoff);
                    if self.pause(pause).await {
                        return;
                    }
                }
            }
        }
    }

    /// A new stream: nothing is in flight on it, and every lease is renewed at once.
    fn renew_all_now(&self) {
        let now = Instant::now();
        for kept in lock(&self.keeper.state).leases.values_mut() {
            kept.next_renewal = now;
            kept.in_flight = None;
        }
    }

    /// One pass over the kept leases: reports those past their deadline lost and, if a stream
    /// is given, sends the renewals due on it. Decides when to look again.
    fn tick(
        &self,
        mut stream: Option<(
            &mpsc::UnboundedSender<LeaseKeepAliveRequest>,
            &mut VecDeque<Sent>,
        )>,
    ) -> Step {
        let now = Instant::now();
        let timeout = self.client.options().request_timeout;
        let mut state = lock(&self.keeper.state);
        let mut wake_at = None;
        let mut live = 0;
        for (&id, kept) in &mut state.leases {
            let (ttl, valid_until, lost) = {
                let s = kept.status.borrow();
                (s.ttl, s.valid_until, s.lost.is_some())
            };
            if lost {
                continue;
            }
            if ttl > 0 {
                if valid_until <= now {
                    kept.status
                        .send_modify(|s| s.lost = Some(LeaseLost::DeadlinePassed));
                    continue;
                }
                wake_at = earliest(wake_at, valid_until);
            }
            live += 1;
            let Some((requests, sent)) = stream.as_mut() else {
                continue;
            };
            // Renewals due within RENEW_SLACK go out now, together: renewing a little early
            // is harmless, and it keeps passes few when deadlines are spread out.
            if kept.next_renewal <= now + RENEW_SLACK {
                if kept.in_flight.is_some() {
                    return Step::Broken;
                }
                if requests.send(LeaseKeepAliveRequest { id }).is_err() {
                    return Step::Broken;
                }
                sent.push_back(Sent {
                    id,
                    generation: kept.generation,
                    at: now,
                });
                kept.in_flight = Some(now);
                kept.next_renewal = now + renew_interval(ttl, timeout);
            }
            wake_at = earliest(wake_at, kept.next_renewal);
        }
        if live == 0 {
            // Under the lock, so a concurrent `register` sees the task gone and starts one.
            state.task = None;
            return Step::Idle;
        }
        Step::Wait(wake_at)
    }

    /// Applies an answer to the renewal it answers (the oldest unanswered one for its id:
    /// a server answers one lease's renewals in order). Returns the lease's next deadline
    /// (renewal or expiry), which the first answer can bring forward: until the TTL is
    /// known, the next renewal was set a request timeout away.
    fn answered(
        &self,
        answer: &LeaseKeepAliveResponse,
        sent: &mut VecDeque<Sent>,
    ) -> Option<Instant> {
        let now = Instant::now();
        let at = sent.iter().position(|s| s.id == answer.id)?;
        let request = sent.remove(at)?;
        let timeout = self.client.options().request_timeout;
        let mut state = lock(&self.keeper.state);
        let kept = state.leases.get_mut(&answer.id)?;
        // Released and claimed again since: the answer is for the old entry.
        if kept.generation != request.generation {
            return None;
        }
        kept.in_flight = None;
        if kept.status.borrow().lost.is_some() {
            return None;
        }
        let secs = u64::try_from(answer.ttl).ok()?;
        if secs == 0 {
            kept.status
                .send_modify(|s| s.lost = Some(LeaseLost::NotFound));
            return None;
        }
        kept.next_renewal = now + renew_interval(answer.ttl, timeout);
        let valid_until = request.at + Duration::from_secs(secs);
        kept.status.send_modify(|s| {
            s.ttl = answer.ttl;
            s.valid_until = s.valid_until.max(valid_until);
        });
        Some(kept.next_renewal.min(kept.status.borrow().valid_until))
    }

    /// Runs one stream on `channel` until it fails or nothing is left to renew.
    async fn session(&self, channel: Conn) -> Ended {
        let (requests, outgoing) = mpsc::unbounded_channel();
        // Unbounded, but holds at most one request per kept lease: one renewal in flight each.
        let mut sent = VecDeque::new();
        let mut answered = false;
        self.renew_all_now();
        // etcd sends no response headers before its first answer, so the call resolves only
        // after a request went out: the first tick queues the renewals before it is polled.
        let mut lease_client = api::lease(channel);
        let mut call = pin!(lease_client.lease_keep_alive(UnboundedReceiverStream::new(outgoing)));
        let mut answers = None;
        let mut wake_at = None;
        let mut look = true;
        loop {
            if look {
                wake_at = match self.tick(Some((&requests, &mut sent))) {
                    Step::Wait(at) => at,
                    Step::Idle => return Ended::Idle,
                    Step::Broken => {
                        return Ended::Failed {
                            answered,
                            status: None,
                        };
                    }
                };
            }
            look = true;
            tokio::select! {
                result = &mut call, if answers.is_none() => match result {
                    Ok(response) => answers = Some(response.into_inner()),
                    Err(status) => return Ended::Failed { answered, status: Some(status) },
                },
                message = next_answer(&mut answers) => match message {
                    Ok(Some(answer)) => {
                        answered = true;
                        // An answer changes only its own lease's deadlines, so the earliest
                        // deadline is the last pass's or this lease's new one: no pass over
                        // every lease until it comes. (A pass per answer made keeping n leases
                        // cost n^2 a round: 5,000 leases took half a core, 20,000 were lost.)
                        if let Some(at) = self.answered(&answer, &mut sent) {
                            wake_at = earliest(wake_at, at);
                        }
                        look = wake_at.is_none_or(|at| Instant::now() >= at);
                    }
                    Ok(None) => return Ended::Failed { answered, status: None },
                    Err(status) => return Ended::Failed { answered, status: Some(status) },
                },
                () = sleep_until(wake_at) => {}
                () = self.keeper.wake.notified() => {}
            }
        }
    }

    /// Waits `pause` between streams, still reporting leases lost at their deadlines; true if
    /// nothing is left to renew.
    async fn pause(&self, pause: Duration) -> bool {
        let end = Instant::now() + pause;
        loop {
            let wake_at = match self.tick(None) {
                Step::Wait(at) => at,
                Step::Idle => return true,
                Step::Broken => None,
            };
            if Instant::now() >= end {
                return false;
            }
            tokio::select! {
                () = tokio::time::sleep_until(end) => {}
                () = sleep_until(wake_at) => {}
                () = self.keeper.wake.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_come_at_a_third_of_the_ttl() {
        let timeout = Duration::from_secs(10);
        assert_eq!(renew_interval(3, timeout), Duration::from_secs(1));
        assert_eq!(renew_interval(2, timeout), Duration::from_millis(666));
        assert_eq!(renew_interval(0, timeout), timeout);
        assert_eq!(renew_interval(-1, timeout), timeout);
        assert_eq!(
            renew_interval(9_000_000_000, timeout),
            Duration::from_secs(3_000_000_000)
        );
    }
}
