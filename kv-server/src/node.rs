//! One member: the engine, the Raft node in front of it, its identity and its limits. The gRPC
//! services are thin adapters over this.

use crate::failpoint::{self, CrashPoint};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kv_core::auth::{AuthError, Caller};
use kv_core::command::{
    decode_command, decode_outcome, encode_command, encode_outcome, uses_space,
};
use kv_core::proto::etcdserverpb::{
    AlarmRequest, AlarmType, ResponseHeader, alarm_request::AlarmAction,
};
use kv_core::proto::kvserverpb::{
    InternalRequest, InternalResponse, RequestHeader, internal_request::Request,
    internal_response::Response,
};
use kv_core::{KvError, Store};
use prost::Message;
use tonic::Status;

use crate::auth::{Callers, Credentials, Tokens};
use crate::errors::{auth_status, engine_status, kv_status, raft_status};
use crate::identity::Identity;
use crate::lessor::{LeaseClock, Lessor};
use crate::metrics::Metrics;
use crate::raft::{Applier, RaftNode};

/// The engine as Raft sees it: log entries are protobuf `InternalRequest`s, responses are
/// encoded outcomes. Applied grants and revokes are reported to the lease clock, issued and
/// revoked tokens to the token keeper.
pub struct EngineApplier {
    /// The state machine.
    pub store: Arc<Store>,
    /// The leader's lease clock.
    pub clock: Arc<LeaseClock>,
    /// The tokens this member accepts.
    pub tokens: Arc<Tokens>,
    /// Where applied writes and commits are counted.
    pub metrics: Arc<Metrics>,
}

/// The largest apply batch run on an async worker: a few hundred small writes take well
/// under a millisecond, a larger batch (a catch-up) goes to a blocking thread.
const INLINE_APPLY_ENTRIES: usize = 256;

impl Applier for EngineApplier {
    fn apply_batch(
        &self,
        entries: Vec<(u64, Option<&[u8]>)>,
        meta: Vec<u8>,
    ) -> Result<Vec<Vec<u8>>, io::Error> {
        let mut decoded = Vec::with_capacity(entries.len());
        for (index, bytes) in entries {
            let cmd = match bytes {
                Some(b) => Some(decode_command(b)?),
                None => None,
            };
            decoded.push((index, cmd));
        }
        // The scan runs only under a harness: apply is the hot path.
        let compacts = failpoint::crash_armed()
            && decoded.iter().any(|(_, cmd)| {
                matches!(
                    cmd.as_ref().and_then(|c| c.request.as_ref()),
                    Some(Request::Compaction(_))
                )
            });
        if compacts {
            failpoint::crash(CrashPoint::CompactionStart);
        }
        let outcomes = self.store.apply_batch(&decoded, &meta)?;
        if compacts {
            failpoint::crash(CrashPoint::CompactionAfterApply);
        }
        let counts = &self.metrics;
        for ((_, cmd), outcome) in decoded.iter().zip(&outcomes) {
            match (cmd.as_ref().and_then(|c| c.request.as_ref()), outcome) {
                (Some(Request::Put(_)), Ok(_)) => counts.mvcc.put.inc(),
                (Some(Request::DeleteRange(_)), Ok(_)) => counts.mvcc.delete.inc(),
                (Some(Request::Txn(_)), Ok(resp)) => {
                    if let Some(Response::Txn(txn)) = &resp.response {
                        counts.mvcc.count_txn(txn);
                    }
                }
                (Some(Request::LeaseGrant(g)), Ok(_)) => {
                    counts.leases.granted.inc();
                    self.clock.granted(g.id, g.ttl)
                }
                (Some(Request::LeaseRevoke(r)), Ok(_)) => {
                    counts.leases.revoked.inc();
                    self.clock.revoked(r.id)
                }
                (Some(Request::Authenticate(a)), Ok(resp)) => {
                    if let Some(Response::Authenticate(issued)) = &resp.response {
                        self.tokens.assign(issued.token.clone(), a.name.clone());
                    }
                }
                (Some(Request::UserDelete(u)), Ok(_)) => self.tokens.invalidate_user(&u.name),
                (Some(Request::UserChangePassword(u)), Ok(_)) => {
                    self.tokens.invalidate_user(&u.name)
                }
                (Some(Request::AuthDisable(_)), Ok(_)) => self.tokens.clear(),
                _ => {}
            }
        }
        Ok(outcomes.iter().map(encode_outcome).collect())
    }

    fn apply_is_quick(&self, entries: usize) -> bool {
        entries <= INLINE_APPLY_ENTRIES && self.store.apply_is_quick()
    }

    fn meta(&self) -> Result<Option<Vec<u8>>, io::Error> {
        Ok(self.store.raft_meta())
    }

    fn snapshot(&self, consistent: &mut dyn FnMut()) -> Result<Vec<u8>, io::Error> {
        Ok(self.store.snapshot_then(consistent)?)
    }

    fn restore(&self, data: &[u8]) -> Result<(), io::Error> {
        self.store.restore(data)?;
        // The snapshot may stand for password changes and user deletions this member never
        // applied one by one, so no token it issued can be trusted: clients authenticate
        // again.
        self.tokens.clear();
        Ok(())
    }

    fn sync(&self) -> Result<(), io::Error> {
        let start = std::time::Instant::now();
        let synced = self.store.sync();
        self.metrics.backend_commit.observe(start.elapsed());
        Ok(synced?)
    }
}

/// One proposal in flight, counted in `etcd_server_proposals_pending` while it lives (also
/// when the caller goes away mid-proposal and its future is dropped).
struct Pending<'a>(&'a AtomicU64);

impl<'a> Pending<'a> {
    fn new(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Pending(count)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Request limits from the flags.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `--max-request-bytes`.
    pub max_request_bytes: usize,
    /// `--max-txn-ops`.
    pub max_txn_ops: usize,
}

/// A running member.
pub struct Node {
    /// The state machine.
    pub store: Arc<Store>,
    /// Raft in front of it.
    pub raft: RaftNode<EngineApplier>,
    /// Who this member is.
    pub identity: Identity,
    /// Advertised client URLs.
    pub client_urls: Vec<String>,
    /// Request limits.
    pub limits: Limits,
    /// Lease clocks, keep-alives and expiry.
    pub lessor: Arc<Lessor>,
    /// How callers are known: tokens, the loopback's token, certificates.
    pub callers: Callers,
    /// What this member counts (served on `/metrics`).
    pub metrics: Arc<Metrics>,
    /// Ids for proposals, counting up from a random start: a forwarded write whose answer is
    /// lost is recognized in the log by its bytes, so no two proposals may be equal (see
    /// `raft::resolve`), not even across members and restarts.
    next_request_id: AtomicU64,
}

/// A random start for [`Node`]'s proposal ids; the clock's nanoseconds if the OS has no
/// randomness to give.
fn request_id_start() -> u64 {
    use rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 8];
    match OsRng.try_fill_bytes(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// How long a request whose token was issued at a log index this member has not applied yet
/// waits for it (the token may come from an Authenticate just answered by another member).
pub const TOKEN_APPLY_WAIT: Duration = Duration::from_secs(5);

impl Node {
    /// Wraps a started store and Raft node; the metrics are the applier's.
    pub fn new(
        store: Arc<Store>,
        raft: RaftNode<EngineApplier>,
        identity: Identity,
        client_urls: Vec<String>,
        limits: Limits,
        lessor: Arc<Lessor>,
        callers: Callers,
    ) -> Self {
        Self {
            callers,
            metrics: raft.applier().metrics.clone(),
            store,
            raft,
            identity,
            client_urls,
            limits,
            lessor,
            next_request_id: AtomicU64::new(request_id_start()),
        }
    }

    /// Who sends a request, from its credentials: the user of its token (while auth is on;
    /// tokens are ignored while it is off, as in etcd), else, with `--client-cert-auth`, the
    /// common name of its verified client certificate, else nobody. The revision is the auth
    /// state's current one: a token stands for its user, whatever changed since it was issued.
    pub async fn caller(&self, credentials: &Credentials) -> Result<Caller, Status> {
        let (enabled, revision) = self.store.auth(|a| (a.enabled(), a.revision()));
        let nobody = Caller {
            user: None,
            revision,
        };
        if !enabled {
            return Ok(nobody);
        }
        let invalid = || auth_status(&AuthError::InvalidAuthToken);
        let Some(token) = credentials.token().map_err(|_| invalid())? else {
            // A token takes precedence over the certificate, as in etcd.
            if self.callers.client_cert_auth
                && let Some(user) = credentials.certificate_name()
            {
                return Ok(Caller::user(&user, revision));
            }
            return Ok(nobody);
        };
        if credentials.is_loopback(self.callers.loopback_token()) {
            return Ok(Caller::user(kv_core::auth::ROOT, revision));
        }
        let index = crate::auth::token_index(token).ok_or_else(invalid)?;
        if self.store.applied_index() < index {
            self.raft
                .wait_applied(index, TOKEN_APPLY_WAIT)
                .await
                .map_err(|_| invalid())?;
        }
        let user = self.callers.tokens.user_of(token).ok_or_else(invalid)?;
        // Re-read: the wait may have applied auth changes.
        let revision = self.store.auth(|a| a.revision());
        Ok(Caller::user(&user, revision))
    }

    /// Runs an auth check against the state as applied so far, as etcd's error status.
    pub fn check(
        &self,
        f: impl FnOnce(&kv_core::auth::AuthState) -> Result<(), AuthError>,
    ) -> Result<(), Status> {
        self.store.auth(f).map_err(|e| auth_status(&e))
    }

    /// A response header for `revision`, filled as etcd fills it.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: self.raft.status().term,
        })
    }

    /// Fills cluster, member and term into a header the engine produced.
    pub fn fill(&self, header: &mut Option<ResponseHeader>) {
        let revision = header.as_ref().map_or(0, |h| h.revision);
        *header = self.header(revision);
    }

    /// [`Node::check`] for checks that need leases' attached keys.
    pub fn check_with_leases(
        &self,
        f: impl FnOnce(
            &kv_core::auth::AuthState,
            kv_core::auth::requests::LeaseKeys<'_>,
        ) -> Result<(), AuthError>,
    ) -> Result<(), Status> {
        self.store.auth_with_leases(f).map_err(|e| auth_status(&e))
    }

    /// Proposes a request of the server's own (trusted: apply checks no permissions) through
    /// Raft and waits for its applied outcome.
    pub async fn propose(&self, request: Request) -> Result<InternalResponse, Status> {
        self.propose_with(request, None).await
    }

    /// Proposes a client's request through Raft, with the caller for apply's permission
    /// checks, and waits for its applied outcome.
    pub async fn propose_as_caller(
        &self,
        request: Request,
        caller: &Caller,
    ) -> Result<InternalResponse, Status> {
        let header = RequestHeader {
            username: caller.user.clone().unwrap_or_default(),
            auth_revision: caller.revision,
        };
        self.propose_with(request, Some(header)).await
    }

    async fn propose_with(
        &self,
        request: Request,
        header: Option<RequestHeader>,
    ) -> Result<InternalResponse, Status> {
        let req = InternalRequest {
            header,
            id: self.next_request_id.fetch_add(1, Ordering::Relaxed),
            request: Some(request),
        };
        let len = req.encoded_len();
        if let Some(request) = &req.request {
            self.check_quota(request, len).await?;
        }
        if len > self.limits.max_request_bytes {
            return Err(kv_status(&KvError::RequestTooLarge));
        }
        let pending = Pending::new(&self.metrics.proposals_pending);
        let proposed = self.raft.propose(encode_command(&req)).await;
        drop(pending);
        let out = proposed.map_err(|e| {
            self.metrics.proposals_failed.inc();
            raft_status(&e)
        })?;
        match decode_outcome(&out) {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(kv_status(&e)),
            Err(e) => Err(engine_status(&e)),
        }
    }

    /// etcd's quota: a member whose database would pass `--quota-backend-bytes` with
    /// `request` (`len` bytes encoded) proposes no write, and raises the NOSPACE alarm through Raft, after which
    /// every member refuses writes until it is disarmed. It is checked here, before
    /// proposing, because each member's file has a size of its own: checked when applying,
    /// members disagreed about which writes took effect.
    async fn check_quota(&self, request: &Request, len: usize) -> Result<(), Status> {
        let quota = self.store.config().quota_bytes;
        let size = self.store.db_size_seen();
        if quota == 0 || !uses_space(request) || size.saturating_add(len as u64) <= quota {
            return Ok(());
        }
        let member_id = self.identity.member_id;
        let nospace = AlarmType::Nospace as i32;
        let raised = self
            .store
            .alarms()
            .iter()
            .any(|a| a.member_id == member_id && a.alarm == nospace);
        if !raised {
            let alarm = AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id,
                alarm: nospace,
            };
            tracing::warn!(
                size,
                quota,
                "database space exceeded: raising the NOSPACE alarm"
            );
            if let Err(e) = Box::pin(self.propose(Request::Alarm(alarm))).await {
                tracing::warn!("the NOSPACE alarm was not raised: {}", e.message());
            }
        }
        Err(kv_status(&KvError::NoSpace))
    }

    /// Runs a read of the store: right here when `single_key` (one key costs microseconds,
    /// and the hop to a blocking thread and back cost two context switches, most of a get's
    /// CPU), else on the blocking pool, since large ranges and hashes do real work that must
    /// not stall the async workers.
    pub async fn read_sized<T: Send + 'static>(
        &self,
        single_key: bool,
        f: impl FnOnce(&Store) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        if single_key {
            f(&self.store)
        } else {
            self.read(f).await
        }
    }

    /// Runs a read of the store on the blocking pool: large ranges and hashes do real work
    /// that must not stall the async workers.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| Status::internal("etcdserver: read task failed"))?
    }

    /// Waits until this member has applied everything committed before the call, so a local
    /// read after it is linearizable.
    pub async fn linearize(&self) -> Result<(), Status> {
        self.raft.read_barrier().await.map_err(|e| raft_status(&e))
    }
}

/// Proposes `Request::$variant($req)` through `$node`, takes the matching
/// `Response::$variant` out of the outcome and fills its header. Evaluates to
/// `Result<_, Status>`.
#[macro_export]
macro_rules! propose_as {
    ($node:expr, $variant:ident, $req:expr) => {{
        $crate::propose_as!(@take $node, $node.propose(
            kv_core::proto::kvserverpb::internal_request::Request::$variant($req)
        ).await, $variant)
    }};
    // A client's request, checked at apply against `$caller`'s permissions.
    ($node:expr, $variant:ident, $req:expr, $caller:expr) => {{
        $crate::propose_as!(@take $node, $node.propose_as_caller(
            kv_core::proto::kvserverpb::internal_request::Request::$variant($req),
            $caller,
        ).await, $variant)
    }};
    (@take $node:expr, $out:expr, $variant:ident) => {{
        use kv_core::proto::kvserverpb::internal_response;
        match $out {
            Ok(internal_kv_out) => match internal_kv_out.response {
                Some(internal_response::Response::$variant(mut resp)) => {
                    $node.fill(&mut resp.header);
                    Ok(resp)
                }
                _ => Err(tonic::Status::internal(
                    "etcdserver: unexpected response type from apply",
                )),
            },
            Err(status) => Err(status),
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Applier;
    use kv_core::StoreConfig;
    use kv_core::backend::MemoryBackend;

    fn store() -> Arc<Store> {
        let config = StoreConfig {
            member_id: 1,
            quota_bytes: 0,
        };
        Arc::new(Store::open(Box::new(MemoryBackend::new()), config).unwrap())
    }

    /// A snapshot replaces users and passwords wholesale, so the tokens issued before it go.
    #[test]
    fn installing_a_snapshot_forgets_every_token() {
        let applier = EngineApplier {
            store: store(),
            clock: Arc::default(),
            tokens: Arc::new(Tokens::new(Duration::from_secs(300))),
            metrics: Arc::default(),
        };
        applier
            .tokens
            .assign("abcdefghijklmnop.7".into(), "alice".into());
        let snapshot = store().snapshot().unwrap();
        applier.restore(&snapshot).unwrap();
        assert_eq!(applier.tokens.user_of("abcdefghijklmnop.7"), None);
    }
}
