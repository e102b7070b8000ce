//! The Raft write path (openraft 0.10.0-alpha.37).
//!
//! * [`LogStore`](log_store::LogStore): the Raft log + vote in a redb file of its own,
//!   `<data_dir>/raft.redb`; see its module docs for the durability contract.
//! * [`StateMachine`](state_machine::StateMachine): adapter that drives an [`Applier`] (the MVCC
//!   engine) with batches of committed entries.
//! * [`NoNetwork`](network::NoNetwork): single-member clusters only for now.
//! * [`RaftNode`]: what the rest of the server uses: `start`, `propose`, `read_barrier`,
//!   `status`, `shutdown`.
//!
//! Commands and responses are opaque bytes ([`Command`], [`Response`]): the engine encodes its
//! commands itself (protobuf), which keeps the openraft type configuration non-generic.

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;

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
use openraft::errors::ForwardToLeader;
use openraft::errors::InitializeError;
use openraft::errors::LinearizableReadError;

pub use self::log_store::LogStore;
pub use self::network::NoNetwork;
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

    /// The meta stored by the last `apply_batch`/`restore` (`None` on a fresh store).
    fn meta(&self) -> Result<Option<Vec<u8>>, io::Error>;

    /// A consistent full copy of the state (including meta). Called right after [`Applier::sync`].
    fn snapshot(&self) -> Result<Vec<u8>, io::Error>;

    /// Replaces the whole state with a snapshot produced by `snapshot()`, durably.
    fn restore(&self, data: &[u8]) -> Result<(), io::Error>;

    /// Makes everything applied so far durable (fsync).
    fn sync(&self) -> Result<(), io::Error>;
}

/// Configuration of a Raft node.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This node's Raft id.
    pub node_id: u64,
    /// The Raft log goes to `data_dir/raft.redb` (the directory is created if missing).
    pub data_dir: PathBuf,
    /// e.g. `"http://127.0.0.1:2380"`; stored as this node's address in the membership.
    pub peer_addr: String,
}

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

fn not_leader(f: ForwardToLeader<TypeConfig>) -> RaftError {
    RaftError::NotLeader {
        leader: f.leader_id,
        leader_addr: f.leader_node.map(|n| n.addr),
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
}

/// The openraft configuration used by [`RaftNode`].
pub fn raft_config() -> Result<Config, RaftError> {
    let config = Config {
        cluster_name: "kv".to_string(),
        heartbeat_interval: 100,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(100_000),
        // Logs covered by a snapshot kept for slow followers. Purging is safe at any value: the
        // snapshot builder makes the applier durable first.
        max_in_snapshot_log_to_keep: 10_000,
        purge_batch_size: 1024,
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
        let config = Arc::new(raft_config()?);

        let (log_store, sm, pristine, last_log_index) = {
            let cfg = cfg.clone();
            let applier = applier.clone();
            tokio::task::spawn_blocking(move || -> io::Result<_> {
                std::fs::create_dir_all(&cfg.data_dir)?;
                let log_store = LogStore::open(&cfg.data_dir.join("raft.redb"))?;
                let pristine = log_store.is_pristine()?;
                let last_log_index = log_store.last_log_index()?;
                let sm = StateMachine::new(applier)?;
                Ok((log_store, sm, pristine, last_log_index))
            })
            .await
            .map_err(|e| RaftError::Fatal(e.to_string()))??
        };

        let raft = Raft::new(cfg.node_id, config, NoNetwork, log_store.clone(), sm).await?;
        let node = RaftNode {
            inner: Arc::new(Inner {
                node_id: cfg.node_id,
                raft,
                applier,
                log_store: Mutex::new(Some(log_store)),
            }),
        };

        if pristine {
            let members = BTreeMap::from([(cfg.node_id, BasicNode::new(&cfg.peer_addr))]);
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

        let id = cfg.node_id;
        node.inner
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(
                |m| m.current_leader == Some(id) && m.state.is_leader(),
                "this node is leader",
            )
            .await
            .map_err(|e| RaftError::Timeout(format!("waiting for leadership: {e}")))?;

        // Single-member cluster: every entry in the durable log was committed (quorum = this
        // node), and the leader re-commits all of it. Wait until the state machine has applied
        // the whole log, so that a state machine that lost non-durable applies, or a `committed`
        // id lost in a crash, can never serve a read older than an acknowledged write.
        if let Some(last) = last_log_index {
            node.inner
                .raft
                .wait(Some(LEADER_WAIT))
                .applied_index_at_least(Some(last), "state machine caught up with the log")
                .await
                .map_err(|e| {
                    RaftError::Timeout(format!("waiting for the state machine to catch up: {e}"))
                })?;
        }

        // Catch the state machine up with everything committed before serving anything.
        tokio::time::timeout(LEADER_WAIT, node.read_barrier())
            .await
            .map_err(|_| {
                RaftError::Timeout("waiting for the state machine to catch up".into())
            })??;

        tracing::info!("raft: node {} started as leader", cfg.node_id);
        Ok(node)
    }

    /// Proposes a command, waits until it is committed and applied, returns the applier's
    /// response.
    pub async fn propose(&self, cmd: Vec<u8>) -> Result<Vec<u8>, RaftError> {
        match self.inner.raft.client_write(Command(cmd)).await {
            Ok(resp) => Ok(resp.data.0),
            Err(openraft::errors::RaftError::APIError(e)) => Err(match e {
                ClientWriteError::ForwardToLeader(f) => not_leader(f),
                ClientWriteError::LogEntryDiscarded(f) => RaftError::LeaderChanged {
                    leader: f.leader_id,
                },
                other => RaftError::Fatal(other.to_string()),
            }),
            Err(openraft::errors::RaftError::Fatal(e)) => Err(e.into()),
        }
    }

    /// Linearizable read barrier: returns once this node's state machine has applied everything
    /// committed before the call (ReadIndex: leadership is confirmed, then the state machine is
    /// awaited up to the read log id).
    pub async fn read_barrier(&self) -> Result<(), RaftError> {
        match self
            .inner
            .raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
        {
            Ok(_) => Ok(()),
            Err(openraft::errors::RaftError::APIError(e)) => Err(match e {
                LinearizableReadError::ForwardToLeader(f) => not_leader(f),
                LinearizableReadError::QuorumNotEnough(q) => RaftError::Timeout(q.to_string()),
            }),
            Err(openraft::errors::RaftError::Fatal(e)) => Err(e.into()),
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
            while Arc::strong_count(ls.db()) > 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if Arc::strong_count(ls.db()) > 1 {
                tracing::warn!("raft: log database still referenced after shutdown");
            }
        }
        Ok(())
    }
}
