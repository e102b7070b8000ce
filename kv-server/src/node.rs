//! One member: the engine, the Raft node in front of it, its identity and its limits. The gRPC
//! services are thin adapters over this.

use crate::failpoint::{self, CrashPoint};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kv_core::command::{decode_command, decode_outcome, encode_command, encode_outcome};
use kv_core::proto::etcdserverpb::ResponseHeader;
use kv_core::proto::kvserverpb::{InternalRequest, InternalResponse, internal_request::Request};
use kv_core::{KvError, Store};
use prost::Message;
use tonic::Status;

use crate::errors::{engine_status, kv_status, raft_status};
use crate::identity::Identity;
use crate::lessor::{LeaseClock, Lessor};
use crate::raft::{Applier, RaftNode};

/// The engine as Raft sees it: log entries are protobuf `InternalRequest`s, responses are
/// encoded outcomes. Applied grants and revokes are reported to the lease clock.
pub struct EngineApplier {
    /// The state machine.
    pub store: Arc<Store>,
    /// The leader's lease clock.
    pub clock: Arc<LeaseClock>,
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
        for ((_, cmd), outcome) in decoded.iter().zip(&outcomes) {
            match (cmd.as_ref().and_then(|c| c.request.as_ref()), outcome) {
                (Some(Request::LeaseGrant(g)), Ok(_)) => self.clock.granted(g.id, g.ttl),
                (Some(Request::LeaseRevoke(r)), Ok(_)) => self.clock.revoked(r.id),
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
        Ok(self.store.restore(data)?)
    }

    fn sync(&self) -> Result<(), io::Error> {
        Ok(self.store.sync()?)
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
    next_request_id: AtomicU64,
}

impl Node {
    /// Wraps a started store and Raft node.
    pub fn new(
        store: Arc<Store>,
        raft: RaftNode<EngineApplier>,
        identity: Identity,
        client_urls: Vec<String>,
        limits: Limits,
        lessor: Arc<Lessor>,
    ) -> Self {
        Self {
            store,
            raft,
            identity,
            client_urls,
            limits,
            lessor,
            next_request_id: AtomicU64::new(1),
        }
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

    /// Proposes a request through Raft and waits for its applied outcome.
    pub async fn propose(&self, request: Request) -> Result<InternalResponse, Status> {
        let req = InternalRequest {
            header: None,
            id: self.next_request_id.fetch_add(1, Ordering::Relaxed),
            request: Some(request),
        };
        if req.encoded_len() > self.limits.max_request_bytes {
            return Err(kv_status(&KvError::RequestTooLarge));
        }
        let out = self
            .raft
            .propose(encode_command(&req))
            .await
            .map_err(|e| raft_status(&e))?;
        match decode_outcome(&out) {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(kv_status(&e)),
            Err(e) => Err(engine_status(&e)),
        }
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
        use kv_core::proto::kvserverpb::{internal_request, internal_response};
        match $node
            .propose(internal_request::Request::$variant($req))
            .await
        {
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
