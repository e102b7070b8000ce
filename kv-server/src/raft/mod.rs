//! The Raft write path (openraft 0.10.0-alpha.37).
//!
//! * [`LogStore`](log_store::LogStore): the Raft log and vote in a write-ahead log of their own,
//!   `<data_dir>/wal` ([`wal::Wal`]); see its module docs for the durability contract.
//! * [`StateMachine`](state_machine::StateMachine): adapter that drives an [`Applier`] (the MVCC
//!   engine) with batches of committed entries.
//! * [`GrpcNetwork`](network::GrpcNetwork) and [`PeerService`](peer::PeerService): the peer
//!   network on the peer URL, both directions.
//! * [`RaftNode`]: what the rest of the server uses: `start`, `propose`, `read_barrier`,
//!   `status`, `shutdown`.
//!
//! Commands and responses are opaque bytes ([`Command`], [`Response`]): the engine encodes its
//! commands itself (protobuf), which keeps the openraft type configuration non-generic.

mod forward;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod peer;
mod resolve;
pub mod state_machine;
pub mod types;
pub mod wal;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use openraft::BasicNode;
use openraft::Config;
use openraft::ReadPolicy;
use openraft::SnapshotPolicy;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::ClientWriteError;
use openraft::errors::Fatal;
use openraft::errors::InitializeError;
use openraft::errors::LinearizableReadError;
use serde::{Deserialize, Serialize};

pub use self::log_store::LogStore;
pub use self::membership::{MemberChange, MemberChangeError, RaftMember};
pub use self::network::GrpcNetwork;
pub use self::peer::PeerService;
pub use self::state_machine::SmMeta;
pub use self::state_machine::StateMachine;
pub use self::types::Command;
pub use self::types::Response;
pub use self::types::TypeConfig;

/// The openraft handle type used by [`RaftNode`].
pub type Raft<A> = openraft::Raft<TypeConfig, StateMachine<A>>;

/// How long [`RaftNode::start`] waits for this node to become leader.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);

/// What the Raft state machine drives (implemented by the MVCC engine elsewhere).
///
/// All methods are blocking; the Raft layer calls them from a blocking thread
/// (`tokio::task::spawn_blocking`), never concurrently with each other except [`Applier::meta`]
/// (calls to `apply_batch`, `snapshot`+`sync`, and `restore` are serialized by the adapter).
pub trait Applier: Send + Sync + 'static {
    /// Applies committed entries in log order in ONE storage transaction.
    ///
    /// `entries` are `(log index, command)`; indexes are consecutive and continue right after
    /// the last applied index. A `None` command is a blank/membership entry: the index advances,
    /// the data does not change (its response is ignored; return an empty `Vec`). `meta` is
    /// opaque bytes (the serialized last-applied log id + last membership, [`SmMeta`]) that must
    /// be stored atomically with the data and returned by [`Applier::meta`]. Returns exactly
    /// one response per entry, in order. May commit non-durably: the Raft log is the durable
    /// source and entries after the last durable meta are re-applied on restart.
    fn apply_batch(
        &self,
        entries: Vec<(u64, Option<&[u8]>)>,
        meta: Vec<u8>,
    ) -> Result<Vec<Vec<u8>>, io::Error>;

    /// Whether `apply_batch` of `entries` entries would run briefly and without disk I/O, so
    /// it may run on an async worker instead of costing two thread hand-offs. The default
    /// never claims so.
    fn apply_is_quick(&self, entries: usize) -> bool {
        let _ = entries;
        false
    }

    /// The meta stored by the last `apply_batch`/`restore` (`None` on a fresh store).
    fn meta(&self) -> Result<Option<Vec<u8>>, io::Error>;

    /// A consistent full copy of the state (including meta). Called right after
    /// [`Applier::sync`], with applies held back; calls `consistent` as soon as the state it
    /// copies is fixed, so that applies resume while the copy is serialized.
    fn snapshot(&self, consistent: &mut dyn FnMut()) -> Result<Vec<u8>, io::Error>;

    /// Replaces the whole state with a snapshot produced by `snapshot()`, durably.
    fn restore(&self, data: &[u8]) -> Result<(), io::Error>;

    /// Makes everything applied so far durable (fsync).
    fn sync(&self) -> Result<(), io::Error>;
}

/// Requests a follower forwards to the leader that are not log entries: the leader's
/// unreplicated state (lease clocks) answers them. Payloads are opaque to the Raft layer.
pub trait LeaderCalls: Send + Sync + 'static {
    /// Answers one forwarded request.
    fn handle(
        &self,
        request: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send + '_>>;
}

/// Configuration of a Raft node.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This node's Raft id (its member id).
    pub node_id: u64,
    /// The cluster id; peers of other clusters are refused.
    pub cluster_id: u64,
    /// The Raft log goes to `data_dir/wal` (the directory is created if missing).
    pub data_dir: PathBuf,
    /// The initial members (id → peer URL), this node among them.
    pub members: BTreeMap<u64, String>,
    /// Heartbeat, election and snapshot settings.
    pub timing: RaftTiming,
    /// TLS for dialing `https://` peers.
    pub peer_tls: tonic::transport::ClientTlsConfig,
    /// Bootstrap a new cluster from `members` when the log is empty (`--initial-cluster-state
    /// new`); otherwise wait to be added by an existing cluster.
    pub bootstrap: bool,
}

/// Raft timing and snapshot settings (etcd's `--heartbeat-interval`, `--election-timeout`,
/// `--snapshot-count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTiming {
    /// Heartbeat interval in milliseconds.
    pub heartbeat_ms: u64,
    /// Election timeout in milliseconds; a follower waits a random time in `[t, 2t)`.
    pub election_timeout_ms: u64,
    /// Applied entries between snapshots.
    pub snapshot_count: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_timeout_ms: 1000,
            snapshot_count: 100_000,
        }
    }
}

/// Log entries kept behind a snapshot for followers that lag a little (etcd keeps 5,000).
pub const SNAPSHOT_CATCH_UP_ENTRIES: u64 = 5_000;

/// Errors of the Raft layer.
#[derive(thiserror::Error, Debug)]
pub enum RaftError {
    /// This node is not the leader; `leader`/`leader_addr` tell who is, if known. The proposal
    /// was NOT appended.
    #[error("not leader (leader: {leader:?})")]
    NotLeader {
        /// Known leader id.
        leader: Option<u64>,
        /// Known leader peer address.
        leader_addr: Option<String>,
    },
    /// The proposal was appended but discarded on a leader change; it may or may not have been
    /// committed (etcd: "leader changed").
    #[error("leader changed; proposal outcome unknown (new leader: {leader:?})")]
    LeaderChanged {
        /// Known leader id.
        leader: Option<u64>,
    },
    /// Local storage error.
    #[error("raft storage error: {0}")]
    Storage(#[from] io::Error),
    /// Raft stopped (shut down, panicked, or a fatal storage error) or another unexpected error.
    #[error("raft fatal error: {0}")]
    Fatal(String),
    /// An operation did not complete in time.
    #[error("raft timeout: {0}")]
    Timeout(String),
}

impl From<Fatal<TypeConfig>> for RaftError {
    fn from(e: Fatal<TypeConfig>) -> Self {
        RaftError::Fatal(e.to_string())
    }
}

/// Raft status snapshot for Maintenance.Status and response headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// This node's id.
    pub node_id: u64,
    /// Current leader, if known.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Index of the last log entry (0 if none).
    pub last_log_index: u64,
    /// Index of the last entry applied to the state machine (0 if none).
    pub applied_index: u64,
    /// Index of the last entry known committed on this node (0 if none).
    pub commit_index: u64,
}

/// This node's role as far as leases care: leading or not, and the term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Leadership {
    /// This node is the leader.
    pub leader: bool,
    /// The Raft term.
    pub term: u64,
}

/// What proposing on this member's own Raft came to.
enum WrittenHere {
    /// This member leads: the applier's response.
    Applied(Vec<u8>),
    /// Another member leads, or no member does (`None`).
    LeaderIs(Option<LeaderAt>),
}

/// Another member that leads: where to forward writes, and which leader (term and node) it
/// is, when this member knows the term's vote committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaderAt {
    /// Its peer URL.
    pub addr: String,
    /// The leader it is.
    pub id: Option<types::LeaderId>,
}

/// What became of a forwarded write whose answer was lost, as this member's log tells.
#[derive(Debug)]
enum Settled {
    /// Applied: the response this member's own apply produced.
    Applied(Vec<u8>),
    /// Never applied, and now never will be: it may be proposed again.
    Lost,
    /// Not known in time.
    Unknown,
}

/// How a proposal or read-index request forwarded to the leader failed, as sent back to the
/// follower that forwarded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardError {
    /// The receiver is not (or no longer) the leader; the proposal was not appended.
    NotLeader,
    /// The proposal was appended but discarded by a leader change: outcome unknown.
    LeaderChanged,
    /// Leadership could not be confirmed in time.
    Timeout,
    /// The receiver's Raft stopped.
    Fatal(String),
}

impl ForwardError {
    fn from_read(
        e: openraft::errors::RaftError<TypeConfig, LinearizableReadError<TypeConfig>>,
    ) -> Self {
        match e {
            openraft::errors::RaftError::APIError(LinearizableReadError::ForwardToLeader(_)) => {
                ForwardError::NotLeader
            }
            openraft::errors::RaftError::APIError(LinearizableReadError::QuorumNotEnough(_)) => {
                ForwardError::Timeout
            }
            openraft::errors::RaftError::Fatal(f) => ForwardError::Fatal(f.to_string()),
        }
    }

    fn into_raft_error(self) -> RaftError {
        match self {
            ForwardError::NotLeader => RaftError::NotLeader {
                leader: None,
                leader_addr: None,
            },
            ForwardError::LeaderChanged => RaftError::LeaderChanged { leader: None },
            ForwardError::Timeout => {
                RaftError::Timeout("leader could not confirm leadership".into())
            }
            ForwardError::Fatal(e) => RaftError::Fatal(e),
        }
    }
}

/// How long a proposal or linearizable read may wait for a leader, including forwarding
/// (etcd's request timeout is 5 s plus two election timeouts; ours stays under the clients'
/// usual deadlines).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts while the cluster has no leader.
const NO_LEADER_RETRY: Duration = Duration::from_millis(20);

/// A running Raft node. Cheap to clone (all clones share one node).
pub struct RaftNode<A: Applier> {
    inner: Arc<Inner<A>>,
}

impl<A: Applier> Clone for RaftNode<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<A: Applier> {
    node_id: u64,
    raft: Raft<A>,
    applier: Arc<A>,
    /// Taken (and the database closed) by `shutdown`.
    log_store: Mutex<Option<LogStore>>,
    cluster_id: u64,
    /// TLS for dialing `https://` peers.
    peer_tls: tonic::transport::ClientTlsConfig,
    /// Connections to other members' peer URLs for forwarding, by URL.
    peers: Mutex<BTreeMap<String, network::PeerConnection>>,
    /// The stream client writes are forwarded to the leader on, while this is a follower.
    forwarder: Mutex<Option<Arc<forward::Forwarder>>>,
    /// Who answers [`LeaderCalls`] forwarded here (set once the server is assembled).
    leader_calls: std::sync::OnceLock<Arc<dyn LeaderCalls>>,
    /// Linearizable reads waiting for the next shared read barrier.
    reads: Mutex<ReadBatch>,
    /// Forwarded writes waiting to be seen applied, shared with the state machine.
    outstanding: Arc<resolve::Outstanding>,
    /// The log's fsync latencies.
    wal_fsyncs: Arc<crate::metrics::Histogram>,
    /// When a leader's replication last reached this member, in nanoseconds after `epoch`
    /// (0: never).
    leader_contact: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

/// Reads waiting for a read barrier. Every read that arrives while a barrier is in flight
/// waits for the next one, which covers all of them (etcd's read loop does the same): a
/// barrier per read cost a round through the Raft core (and, with peers, a heartbeat round)
/// for each of them.
#[derive(Default)]
struct ReadBatch {
    waiting: Vec<tokio::sync::oneshot::Sender<Result<(), RaftError>>>,
    /// True while a task runs barriers for the waiting reads.
    running: bool,
}

/// The same error again, for every read that shared a barrier.
fn duplicate(e: &RaftError) -> RaftError {
    match e {
        RaftError::NotLeader {
            leader,
            leader_addr,
        } => RaftError::NotLeader {
            leader: *leader,
            leader_addr: leader_addr.clone(),
        },
        RaftError::LeaderChanged { leader } => RaftError::LeaderChanged { leader: *leader },
        RaftError::Storage(io) => RaftError::Storage(io::Error::new(io.kind(), io.to_string())),
        RaftError::Fatal(m) => RaftError::Fatal(m.clone()),
        RaftError::Timeout(m) => RaftError::Timeout(m.clone()),
    }
}

/// The openraft configuration used by [`RaftNode`].
pub fn raft_config(timing: RaftTiming) -> Result<Config, RaftError> {
    let config = Config {
        cluster_name: "kv".to_string(),
        heartbeat_interval: timing.heartbeat_ms,
        // openraft's followers refuse votes for `election_timeout_max` after the last word
        // from the leader (its leader lease), so `max` is what etcd calls the election
        // timeout: no member can be elected sooner. Timers fire from half of it, so the
        // first member to time out retries as soon as the leases lapse instead of a whole
        // timeout later (with [T, 2T], failover took 3-4 s against etcd's 1-2 s).
        election_timeout_min: (timing.election_timeout_ms / 2).max(timing.heartbeat_ms + 1),
        election_timeout_max: timing.election_timeout_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(timing.snapshot_count),
        // Logs covered by a snapshot kept for followers that lag a little. Purging is safe at
        // any value: the snapshot builder makes the applier durable first.
        max_in_snapshot_log_to_keep: SNAPSHOT_CATCH_UP_ENTRIES.min(timing.snapshot_count),
        purge_batch_size: timing.snapshot_count.min(1024),
        // A member that was partitioned away must not depose a healthy leader when it returns.
        enable_pre_vote: Some(true),
        // A restarted leader is a follower until it wins an election, as in etcd. openraft
        // would let one that came back before its followers timed out lead on in its old
        // term, but apply commits without a sync and the saved commit index trails: its
        // first reads were confirmed against a commit index from before writes it had
        // acknowledged, and answered from the state before them. A new term's leader first
        // commits an entry of its own, and reads wait for that.
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    config
        .validate()
        .map_err(|e| RaftError::Fatal(format!("invalid raft config: {e}")))
}

impl<A: Applier> RaftNode<A> {
    /// Opens the log store (creating it), builds the state machine adapter over `applier`, starts
    /// openraft, and if the log store is fresh (no vote, nothing in the log) initializes a
    /// one-member cluster `{node_id: peer_addr}`. Waits (at most [`LEADER_WAIT`] per step) until
    /// this node is leader and its state machine has applied the whole log (everything committed
    /// before the restart is replayed into the applier), then returns.
    pub async fn start(cfg: RaftConfig, applier: Arc<A>) -> Result<Self, RaftError> {
        let config = Arc::new(raft_config(cfg.timing)?);

        let outstanding = Arc::new(resolve::Outstanding::default());
        let (log_store, sm, pristine, last_log_index) = {
            let cfg = cfg.clone();
            let applier = applier.clone();
            let outstanding = outstanding.clone();
            tokio::task::spawn_blocking(move || -> io::Result<_> {
                std::fs::create_dir_all(&cfg.data_dir)?;
                let log_store = LogStore::open(&cfg.data_dir)?;
                let pristine = log_store.is_pristine();
                let last_log_index = log_store.last_log_index();
                let sm = StateMachine::new(applier, outstanding)?;
                Ok((log_store, sm, pristine, last_log_index))
            })
            .await
            .map_err(|e| RaftError::Fatal(e.to_string()))??
        };

        let network = GrpcNetwork::new(cfg.cluster_id, cfg.peer_tls.clone());
        let raft = Raft::new(cfg.node_id, config, network, log_store.clone(), sm).await?;
        let wal_fsyncs = log_store.fsyncs();
        let node = RaftNode {
            inner: Arc::new(Inner {
                node_id: cfg.node_id,
                raft,
                applier,
                log_store: Mutex::new(Some(log_store)),
                cluster_id: cfg.cluster_id,
                peer_tls: cfg.peer_tls.clone(),
                peers: Mutex::new(BTreeMap::new()),
                forwarder: Mutex::new(None),
                leader_calls: std::sync::OnceLock::new(),
                reads: Mutex::new(ReadBatch::default()),
                outstanding,
                wal_fsyncs,
                leader_contact: std::sync::atomic::AtomicU64::new(0),
                epoch: std::time::Instant::now(),
            }),
        };

        if pristine && cfg.bootstrap {
            let members: BTreeMap<u64, BasicNode> = cfg
                .members
                .iter()
                .map(|(id, url)| (*id, BasicNode::new(url)))
                .collect();
            // Every member of a new cluster initializes with the same membership; Raft's vote
            // then elects one leader (openraft documents this as safe).
            match node.inner.raft.initialize(members).await {
                Ok(()) => {}
                Err(openraft::errors::RaftError::APIError(InitializeError::NotAllowed(e))) => {
                    tracing::info!("raft: already initialized: {e}");
                }
                Err(openraft::errors::RaftError::APIError(e)) => {
                    return Err(RaftError::Fatal(format!("raft initialize: {e}")));
                }
                Err(openraft::errors::RaftError::Fatal(e)) => return Err(e.into()),
            }
        }

        if cfg.members.len() == 1 && cfg.members.contains_key(&cfg.node_id) {
            node.wait_single_member_ready(last_log_index).await?;
        }
        tracing::info!("raft: node {:x} started", cfg.node_id);
        Ok(node)
    }

    /// A lone member elects itself at once: wait for that, and for the state machine to have
    /// applied the whole log, so no read can be older than an acknowledged write even when the
    /// state machine lost non-durable applies or the saved committed id in a crash. (With
    /// peers, leadership and catch-up happen in the background and requests wait for them.)
    async fn wait_single_member_ready(&self, last_log_index: Option<u64>) -> Result<(), RaftError> {
        let id = self.inner.node_id;
        self.inner
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(
                |m| m.current_leader == Some(id) && m.state.is_leader(),
                "this node is leader",
            )
            .await
            .map_err(|e| RaftError::Timeout(format!("waiting for leadership: {e}")))?;
        if let Some(last) = last_log_index {
            self.inner
                .raft
                .wait(Some(LEADER_WAIT))
                .applied_index_at_least(Some(last), "state machine caught up with the log")
                .await
                .map_err(|e| {
                    RaftError::Timeout(format!("waiting for the state machine to catch up: {e}"))
                })?;
        }
        tokio::time::timeout(LEADER_WAIT, self.read_barrier())
            .await
            .map_err(|_| {
                RaftError::Timeout("waiting for the state machine to catch up".into())
            })??;
        Ok(())
    }

    /// Forwards `cmd` to the leader `to` (waiting at most `timeout`) and returns its answer,
    /// and whether the leader confirmed it appends the write only as `to.id`, so that a lost
    /// answer can be resolved from the log.
    async fn forward(
        &self,
        to: &LeaderAt,
        cmd: &[u8],
        timeout: Duration,
    ) -> (Result<Vec<u8>, network::PeerError>, bool) {
        let connect = || {
            self.peer(&to.addr)
                .map_err(|e| network::PeerError::NotDelivered {
                    addr: to.addr.clone(),
                    reason: e.to_string(),
                })
        };
        let forwarder = {
            let mut slot = self
                .inner
                .forwarder
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(f) if f.addr() == to.addr && f.meant() == to.id && f.usable() => f.clone(),
                _ => match connect() {
                    Ok(conn) => {
                        let f = Arc::new(forward::Forwarder::open(conn, to.id));
                        *slot = Some(f.clone());
                        f
                    }
                    Err(e) => return (Err(e), false),
                },
            }
        };
        let answer = match forwarder.forward(cmd, timeout).await {
            Err(network::PeerError::Unsupported { .. }) => match connect() {
                Ok(conn) => {
                    conn.call_raw(network::PeerCall::Propose, cmd.to_vec(), timeout)
                        .await
                }
                Err(e) => Err(e),
            },
            answer => answer,
        };
        (answer, forwarder.conditional())
    }

    /// A connection to the member at `addr`, reused across calls.
    pub(crate) fn peer(&self, addr: &str) -> Result<network::PeerConnection, RaftError> {
        let mut peers = self.inner.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = peers.get(addr) {
            return Ok(c.clone());
        }
        let conn = network::PeerConnection::new(addr, self.inner.cluster_id, &self.inner.peer_tls)
            .map_err(|e| RaftError::Fatal(e.to_string()))?;
        peers.insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    /// Proposes on this node only (the receiving end of a forwarded proposal); with `meant`,
    /// only while this node is that leader, so that the follower that forwarded it can tell
    /// from the log whether it was applied if the answer is lost (see `resolve`).
    pub async fn propose_here(
        &self,
        cmd: Vec<u8>,
        meant: Option<types::LeaderId>,
    ) -> Result<Vec<u8>, ForwardError> {
        let written = match meant {
            None => self.inner.raft.client_write(Command(cmd)).await,
            Some(leader) => {
                let (responder, answer) = openraft::impls::ProgressResponder::<
                    TypeConfig,
                    openraft::raft::ClientWriteResult<TypeConfig>,
                >::complete_only();
                let write = self.inner.raft.write(Command(cmd));
                if let Err(e) = write.with_leader(leader).responder(responder).await {
                    return Err(ForwardError::Fatal(e.to_string()));
                }
                match answer.await {
                    Ok(result) => result.map_err(openraft::errors::RaftError::APIError),
                    // The core stopped holding it: appended or not.
                    Err(_) => return Err(ForwardError::LeaderChanged),
                }
            }
        };
        match written {
            Ok(resp) => Ok(resp.data.0),
            Err(openraft::errors::RaftError::APIError(e)) => Err(match e {
                ClientWriteError::ForwardToLeader(_) => ForwardError::NotLeader,
                ClientWriteError::LogEntryDiscarded(_) => ForwardError::LeaderChanged,
                other => ForwardError::Fatal(other.to_string()),
            }),
            Err(openraft::errors::RaftError::Fatal(e)) => Err(ForwardError::Fatal(e.to_string())),
        }
    }

    /// Proposes `cmd` to this member's own Raft (waiting at most `timeout`): its response
    /// once applied here as leader, or the leader to forward it to (another member's URL, or
    /// none while there is no leader).
    async fn write_here(&self, cmd: &[u8], timeout: Duration) -> Result<WrittenHere, RaftError> {
        let write = self.inner.raft.client_write(Command(cmd.to_vec()));
        // A leader cut off from its quorum never commits: give up at the deadline, with the
        // outcome unknown (the entry may still commit after the partition heals).
        let Ok(written) = tokio::time::timeout(timeout, write).await else {
            return Err(RaftError::Timeout("proposal not committed in time".into()));
        };
        match written {
            Ok(resp) => Ok(WrittenHere::Applied(resp.data.0)),
            Err(openraft::errors::RaftError::APIError(e)) => match e {
                ClientWriteError::ForwardToLeader(f) => {
                    Ok(WrittenHere::LeaderIs(match (f.leader_id, f.leader_node) {
                        (Some(id), Some(node)) if id != self.inner.node_id => Some(LeaderAt {
                            addr: node.addr,
                            id: self
                                .leader_elsewhere()
                                .and_then(|l| l.id)
                                .filter(|l| l.node_id == id),
                        }),
                        _ => None,
                    }))
                }
                ClientWriteError::LogEntryDiscarded(f) => Err(RaftError::LeaderChanged {
                    leader: f.leader_id,
                }),
                other => Err(RaftError::Fatal(other.to_string())),
            },
            Err(openraft::errors::RaftError::Fatal(e)) => Err(e.into()),
        }
    }

    /// Proposes a command, waits until it is committed and applied, returns the applier's
    /// response. On a follower the proposal is forwarded to the leader; while there is no
    /// leader it waits (up to [`REQUEST_TIMEOUT`]) for one.
    pub async fn propose(&self, cmd: Vec<u8>) -> Result<Vec<u8>, RaftError> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        // A follower that knows the leader forwards at once; asking its own Raft core first
        // only to hear "forward to the leader" cost a round through the core per write.
        let mut known = self.leader_elsewhere();
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Every attempt so far is known not to have taken effect: say so, rather than
            // start one more that could not finish.
            if remaining.is_zero() {
                return Err(RaftError::NotLeader {
                    leader: None,
                    leader_addr: None,
                });
            }
            let target = match known.take() {
                Some(leader) => Some(leader),
                None => match self.write_here(&cmd, remaining).await? {
                    WrittenHere::Applied(out) => return Ok(out),
                    WrittenHere::LeaderIs(leader) => leader,
                },
            };
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            match target {
                Some(leader) if !remaining.is_zero() => {
                    if let Some(out) = self.forward_once(&leader, &cmd, deadline).await? {
                        return Ok(out);
                    }
                }
                _ => {}
            }
            tokio::time::sleep(NO_LEADER_RETRY.min(remaining)).await;
        }
    }

    /// Forwards `cmd` to the leader `to`: its outcome, or `None` when it was not applied and
    /// may be proposed again (the leader moved before appending it, or it never got there, or
    /// its answer was lost and this member's log shows it never took effect).
    async fn forward_once(
        &self,
        to: &LeaderAt,
        cmd: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<Option<Vec<u8>>, RaftError> {
        // Registered before it is sent, so before its entry can exist.
        let watch = to.id.map(|id| self.inner.outstanding.watch(cmd, id));
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (answer, conditional) = self.forward(to, cmd, remaining).await;
        let unknown = match answer {
            Ok(bytes) => {
                let answer: Result<Vec<u8>, ForwardError> = postcard::from_bytes(&bytes)
                    .map_err(|e| RaftError::Fatal(format!("bad forward answer: {e}")))?;
                match answer {
                    Ok(out) => return Ok(Some(out)),
                    // The leader moved before appending it, or is not the leader it was
                    // meant for: safe to retry.
                    Err(ForwardError::NotLeader) => return Ok(None),
                    Err(e) => e.into_raft_error(),
                }
            }
            // Never reached the leader (it is down, say): wait for a new one.
            Err(network::PeerError::NotDelivered { .. }) => return Ok(None),
            // It may have been proposed: never retry blindly.
            Err(e) => RaftError::Timeout(e.to_string()),
        };
        let Some(watch) = watch.filter(|_| conditional) else {
            return Err(unknown);
        };
        match self.settle(watch, deadline).await {
            Settled::Applied(out) => Ok(Some(out)),
            Settled::Lost => {
                tracing::debug!(
                    "raft: a forwarded write was lost with its leader; proposing again"
                );
                Ok(None)
            }
            Settled::Unknown => Err(unknown),
        }
    }

    /// Waits (until `deadline`) for this member's log to tell what became of the forwarded
    /// write `watch` stands for: applied, or lost for good once an entry of a later leader is
    /// applied without it (see `resolve`).
    async fn settle(
        &self,
        mut watch: resolve::Watch<'_>,
        deadline: tokio::time::Instant,
    ) -> Settled {
        let meant = watch.leader;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let waiter = self.inner.raft.wait(Some(remaining));
        let later = waiter.metrics(
            move |m| m.last_applied.as_ref().is_some_and(|l| l.leader_id > meant),
            "an entry of a later leader applied",
        );
        tokio::select! {
            applied = &mut watch.applied => match applied {
                Ok(out) => Settled::Applied(out),
                Err(_) => Settled::Unknown,
            },
            later = later => match (later, watch.applied.try_recv()) {
                // Reported before the entries after it were, so seen by now if applied.
                (_, Ok(out)) => Settled::Applied(out),
                (Ok(_), Err(_)) if !watch.missed_any() => Settled::Lost,
                _ => Settled::Unknown,
            },
        }
    }

    /// Linearizable read barrier: returns once this node's state machine has applied everything
    /// committed before the call. The leader confirms its leadership with a quorum (read
    /// index); a follower asks the leader for that index and waits until it has applied it.
    pub async fn read_barrier(&self) -> Result<(), RaftError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut batch = self.inner.reads.lock().unwrap_or_else(|e| e.into_inner());
            batch.waiting.push(done);
            !std::mem::replace(&mut batch.running, true)
        };
        if start {
            // On a task of its own: a read given up (its future dropped) must not strand the
            // others waiting for the same barrier.
            let node = self.clone();
            tokio::spawn(async move { node.run_read_barriers().await });
        }
        answer
            .await
            .unwrap_or_else(|_| Err(RaftError::Fatal("the read barrier task ended".into())))
    }

    /// Runs barriers while reads wait: each covers the reads that arrived before it began.
    async fn run_read_barriers(&self) {
        loop {
            let waiting = {
                let mut batch = self.inner.reads.lock().unwrap_or_else(|e| e.into_inner());
                if batch.waiting.is_empty() {
                    batch.running = false;
                    return;
                }
                std::mem::take(&mut batch.waiting)
            };
            let result = self.read_barrier_once().await;
            for read in waiting {
                let _ = read.send(result.as_ref().map(|_| ()).map_err(duplicate));
            }
        }
    }

    /// One read barrier, for the reads that arrived before it began.
    async fn read_barrier_once(&self) -> Result<(), RaftError> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let confirm = self.inner.raft.ensure_linearizable(ReadPolicy::ReadIndex);
            let Ok(confirmed) = tokio::time::timeout(remaining, confirm).await else {
                return Err(RaftError::Timeout(
                    "leadership not confirmed in time".into(),
                ));
            };
            let leader = match confirmed {
                Ok(_) => return Ok(()),
                Err(openraft::errors::RaftError::APIError(e)) => match e {
                    LinearizableReadError::ForwardToLeader(f) => f,
                    LinearizableReadError::QuorumNotEnough(q) => {
                        return Err(RaftError::Timeout(q.to_string()));
                    }
                },
                Err(openraft::errors::RaftError::Fatal(e)) => return Err(e.into()),
            };
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(RaftError::NotLeader {
                    leader: None,
                    leader_addr: None,
                });
            }
            if let (Some(id), Some(node)) = (leader.leader_id, leader.leader_node)
                && id != self.inner.node_id
            {
                let conn = self.peer(&node.addr)?;
                let answer: Result<u64, ForwardError> = match conn
                    .call(network::PeerCall::ReadIndex, &(), remaining)
                    .await
                {
                    Ok(answer) => answer,
                    // A read is safe to retry, whatever happened to the call.
                    Err(_) => Err(ForwardError::NotLeader),
                };
                match answer {
                    Ok(index) => {
                        return self
                            .inner
                            .raft
                            .wait(Some(remaining))
                            .applied_index_at_least(Some(index), "applied up to the read index")
                            .await
                            .map(|_| ())
                            .map_err(|e| RaftError::Timeout(e.to_string()));
                    }
                    Err(ForwardError::NotLeader) => {}
                    Err(e) => return Err(e.into_raft_error()),
                }
            }
            tokio::time::sleep(NO_LEADER_RETRY.min(remaining)).await;
        }
    }

    /// Snapshot of the Raft status, from openraft's metrics. The metrics are published by the
    /// Raft core asynchronously, so they may trail a just-returned `propose` by a moment.
    pub fn status(&self) -> RaftStatus {
        let rx = self.inner.raft.metrics();
        let m = rx.borrow_watched();
        RaftStatus {
            node_id: self.inner.node_id,
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
            commit_index: m.local_committed.as_ref().map(|l| l.index).unwrap_or(0),
        }
    }

    /// Resolves with the reason once the Raft core has stopped on a fatal error (a storage
    /// write that failed, a panic in the core): the member can then neither serve nor vote,
    /// so it must exit for its supervisor to restart it, as etcd does, not linger half alive.
    pub async fn stopped(&self) -> String {
        let mut rx = self.inner.raft.metrics();
        loop {
            if let Err(fatal) = &rx.borrow_watched().running_state {
                return fatal.to_string();
            }
            if rx.changed().await.is_err() {
                return "raft metrics closed".to_string();
            }
        }
    }

    /// Installs the handler of forwarded [`LeaderCalls`] (once; later calls are ignored).
    pub fn set_leader_calls(&self, handler: Arc<dyn LeaderCalls>) {
        let _ = self.inner.leader_calls.set(handler);
    }

    /// The handler of forwarded [`LeaderCalls`], once installed.
    pub fn leader_calls(&self) -> Option<Arc<dyn LeaderCalls>> {
        self.inner.leader_calls.get().cloned()
    }

    /// Sends a [`LeaderCalls`] request to the current leader and returns its answer. Errors
    /// when there is no known leader, the leader is this node, or the call fails.
    pub async fn call_leader(
        &self,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, network::PeerError> {
        let not_delivered = |reason: &str| network::PeerError::NotDelivered {
            addr: String::new(),
            reason: reason.into(),
        };
        let (leader, addr) = self
            .leader()
            .ok_or_else(|| not_delivered("no known leader"))?;
        if leader == self.inner.node_id {
            return Err(not_delivered("this is the leader"));
        }
        let conn = self
            .peer(&addr)
            .map_err(|e| not_delivered(&e.to_string()))?;
        conn.call_raw(network::PeerCall::LeaderCall, request, timeout)
            .await
    }

    /// Times one small call to the member at `addr` (at most `limit`): the peer round trip
    /// etcd's prober measures. `None` if the call failed.
    pub async fn round_trip(&self, addr: &str, limit: Duration) -> Option<Duration> {
        let conn = self.peer(addr).ok()?;
        let start = std::time::Instant::now();
        conn.call::<_, u64>(network::PeerCall::Hello, &(), limit)
            .await
            .ok()?;
        Some(start.elapsed())
    }

    /// Waits (at most `limit`) until the known leader differs from `seen`; returns it.
    pub async fn leader_change(&self, seen: Option<u64>, limit: Duration) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut rx = self.inner.raft.server_metrics();
        loop {
            let now = rx.borrow_watched().current_leader;
            if now != seen {
                return now;
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(remaining, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return rx.borrow_watched().current_leader,
            }
        }
    }

    /// Notes that a leader's replication (entries or a heartbeat) reached this member.
    pub fn leader_contacted(&self) {
        let nanos = u64::try_from(self.inner.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.inner
            .leader_contact
            .store(nanos.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a leader is in contact, as etcd's `has_leader` means it: this member leads and
    /// a quorum acknowledged it within an election timeout (always, alone), or it follows a
    /// leader whose replication reached it within an election timeout. Raft's own idea of the
    /// leader outlives the contact: a follower cut off keeps naming the last leader while its
    /// pre-votes fail, where etcd's pre-candidate forgets it.
    pub fn has_leader(&self) -> bool {
        let rx = self.inner.raft.metrics();
        let m = rx.borrow_watched();
        let Some(leader) = m.current_leader else {
            return false;
        };
        let timeout = Duration::from_millis(self.inner.raft.config().election_timeout_max);
        if leader == self.inner.node_id {
            if m.membership_config.membership().voter_ids().count() <= 1 {
                return m.state.is_leader();
            }
            return m
                .last_quorum_acked
                .as_ref()
                .is_some_and(|at| openraft::Instant::elapsed(&**at) <= timeout);
        }
        let contact = self
            .inner
            .leader_contact
            .load(std::sync::atomic::Ordering::Relaxed);
        contact > 0
            && self
                .inner
                .epoch
                .elapsed()
                .saturating_sub(Duration::from_nanos(contact))
                <= timeout
    }

    /// Whether this node leads, and in which term.
    pub fn leadership(&self) -> Leadership {
        let rx = self.inner.raft.metrics();
        let m = rx.borrow_watched();
        Leadership {
            leader: m.state.is_leader() && m.current_leader == Some(self.inner.node_id),
            term: m.current_term,
        }
    }

    /// Waits (at most `limit`) until [`RaftNode::leadership`] differs from `seen`; returns it.
    pub async fn leadership_change(&self, seen: Leadership, limit: Duration) -> Leadership {
        let deadline = tokio::time::Instant::now() + limit;
        // Server metrics change only with the vote, the role, the leader or the membership;
        // the full metrics change with every write, and would wake this loop for each.
        let mut rx = self.inner.raft.server_metrics();
        loop {
            let now = self.leadership();
            if now != seen {
                return now;
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(remaining, rx.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or Raft stopped publishing metrics.
                _ => return self.leadership(),
            }
        }
    }

    /// Waits (at most `limit`) until this node has applied everything it knows committed: a
    /// new leader may still be applying entries of the previous term.
    pub async fn wait_applied_committed(&self, limit: Duration) -> Result<(), RaftError> {
        let committed = self.status().commit_index;
        if self.status().applied_index >= committed {
            return Ok(());
        }
        self.inner
            .raft
            .wait(Some(limit))
            .applied_index_at_least(Some(committed), "applied everything committed")
            .await
            .map(|_| ())
            .map_err(|e| RaftError::Timeout(e.to_string()))
    }

    /// Waits (at most `limit`) until this node has applied the log up to `index`.
    pub async fn wait_applied(&self, index: u64, limit: Duration) -> Result<(), RaftError> {
        if self.status().applied_index >= index {
            return Ok(());
        }
        self.inner
            .raft
            .wait(Some(limit))
            .applied_index_at_least(Some(index), "applied up to an index")
            .await
            .map(|_| ())
            .map_err(|e| RaftError::Timeout(e.to_string()))
    }

    /// The fsync latencies of the Raft log (`etcd_disk_wal_fsync_duration_seconds`).
    pub fn wal_fsyncs(&self) -> Arc<crate::metrics::Histogram> {
        self.inner.wal_fsyncs.clone()
    }

    /// The state machine Raft applies to.
    pub fn applier(&self) -> &Arc<A> {
        &self.inner.applier
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// `true` if this node currently is the leader.
    pub fn is_leader(&self) -> bool {
        self.inner.raft.is_leader()
    }

    /// The underlying openraft handle (for the gRPC Raft service / membership changes).
    pub fn raft(&self) -> &Raft<A> {
        &self.inner.raft
    }

    /// Stops openraft, then makes the log store and the applier durable and closes the log
    /// database (waiting, at most 5 s, for openraft's tasks to release it). Idempotent.
    pub async fn shutdown(&self) -> Result<(), RaftError> {
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| RaftError::Fatal(format!("raft shutdown: {e}")))?;
        let log_store = self
            .inner
            .log_store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let applier = self.inner.applier.clone();
        let log_store = tokio::task::spawn_blocking(move || -> io::Result<Option<LogStore>> {
            if let Some(ls) = &log_store {
                ls.flush()?;
            }
            applier.sync()?;
            Ok(log_store)
        })
        .await
        .map_err(|e| RaftError::Fatal(e.to_string()))??;

        // openraft's state machine worker drops its log reader shortly after the core stops;
        // wait (bounded) for it so that the database file is closed when we return and the data
        // dir can be reopened right away.
        if let Some(ls) = log_store {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(ls.wal()) > 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if Arc::strong_count(ls.wal()) > 1 {
                tracing::warn!("raft: log still referenced after shutdown");
            }
        }
        Ok(())
    }
}
