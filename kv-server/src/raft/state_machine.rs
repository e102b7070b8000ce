//! [`RaftStateMachine`] adapter over an [`Applier`].
//!
//! * `apply()` drains the batch openraft hands in, computes the last applied log id and last
//!   membership after the batch, encodes them as the opaque `meta` ([`SmMeta`]) and calls
//!   [`Applier::apply_batch`] ONCE for the batch on a blocking thread, so data and meta are
//!   stored atomically in one engine transaction. Responses are sent in log order; blank and
//!   membership entries get an empty [`Response`] (never seen by a client).
//! * While this member waits on writes it forwarded, `apply()` also reports each applied
//!   entry to [`Outstanding`], so that a write whose answer was lost is recognized in the
//!   log (see `resolve`).
//! * `applied_state()` decodes [`Applier::meta`].
//! * Snapshots: the builder calls [`Applier::sync`] (so that every log entry openraft may purge
//!   after the snapshot is covered by durable engine state) and records the meta of the state
//!   it made durable; it serializes nothing. The engine's own durable state already is the
//!   snapshot (as etcd's backend file is), and openraft keeps only a built snapshot's meta,
//!   so when a follower needs one, `get_current_snapshot` serializes it ([`Applier::snapshot`])
//!   afresh, at the state applied by then, with a meta to match. Serializing at every build
//!   cost a copy of the whole store every `snapshot_count` writes (about a second and 400 MB
//!   at a million keys) to throw it away; keeping the data held that copy for good.
//!   Installing one calls [`Applier::restore`].
//!
//! Snapshot building runs concurrently with `apply()` (openraft spawns it), so a mutex shared by
//! the adapter and its builders serializes `apply_batch` against the `sync + meta + snapshot`
//! sequence, guaranteeing the snapshot data and its [`SnapshotMeta`] describe the same state.

use crate::failpoint::{self, CrashPoint};
use std::io;
use std::sync::Arc;
use std::sync::Mutex;

use super::log_store::blocking;
use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::storage::ApplyResponder;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use serde::Deserialize;
use serde::Serialize;

use super::Applier;
use super::resolve::Outstanding;
use super::types::LogId;
use super::types::Response;
use super::types::Snapshot;
use super::types::SnapshotData;
use super::types::SnapshotMeta;
use super::types::StoredMembership;
use super::types::TypeConfig;

/// Format version of the encoded [`SmMeta`].
const SM_META_VERSION: u8 = 1;

/// What the adapter stores in the applier's opaque `meta`: the Raft position of the state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmMeta {
    /// Last log id applied to the state.
    pub last_applied: Option<LogId>,
    /// Last membership applied to the state.
    pub last_membership: StoredMembership,
}

impl SmMeta {
    /// Encodes as `[version, postcard...]`.
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        postcard::to_extend(self, vec![SM_META_VERSION])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Decodes bytes produced by [`SmMeta::encode`].
    pub fn decode(b: &[u8]) -> io::Result<Self> {
        match b.split_first() {
            Some((&SM_META_VERSION, rest)) => postcard::from_bytes(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unknown raft state machine meta format",
            )),
        }
    }

    fn load<A: Applier>(applier: &A) -> io::Result<Self> {
        match applier.meta()? {
            None => Ok(Self::default()),
            Some(b) => Self::decode(&b),
        }
    }
}

/// The meta of openraft's "current snapshot" (its data is built when asked for).
type SharedSnapshot = Arc<Mutex<Option<SnapshotMeta>>>;

/// Makes the applier's state durable and its meta the current snapshot's, and returns that
/// snapshot: with its data serialized when `serialize` (a follower needs it), without when
/// openraft only marks a point to purge the log behind (the data then stays in the engine).
async fn snapshot_now<A: Applier>(
    applier: Arc<A>,
    apply_lock: Arc<Mutex<()>>,
    current: &SharedSnapshot,
    serialize: bool,
) -> io::Result<Snapshot> {
    let (meta, data) = blocking(move || {
        failpoint::crash(CrashPoint::SnapshotBuildStart);
        let mut applies_held = Some(lock(&apply_lock));
        // Make everything applied so far durable before openraft may purge the logs the
        // snapshot covers.
        applier.sync()?;
        failpoint::crash(CrashPoint::SnapshotBuildAfterSync);
        let meta = SmMeta::load(&*applier)?;
        if !serialize {
            return Ok((meta, Vec::new()));
        }
        // Applies resume once the copy's view is fixed: serializing a million keys took
        // about a second, and every write (and, through the state lock, every read) waited.
        let data = applier.snapshot(&mut || drop(applies_held.take()))?;
        failpoint::crash(CrashPoint::SnapshotBuildAfterSerialize);
        Ok((meta, data))
    })
    .await?;
    let meta = SnapshotMeta {
        last_log_id: meta.last_applied,
        last_membership: meta.last_membership,
    };
    tracing::info!("raft: snapshot {} ({} bytes serialized)", meta, data.len());
    *lock(current) = Some(meta.clone());
    Ok(Snapshot {
        meta,
        snapshot: std::io::Cursor::new(data),
    })
}

/// The [`RaftStateMachine`] driven by openraft.
pub struct StateMachine<A: Applier> {
    applier: Arc<A>,
    /// Serializes `apply_batch` against snapshot building.
    apply_lock: Arc<Mutex<()>>,
    /// Cached copy of the applier's meta (the adapter is the only writer).
    state: SmMeta,
    current_snapshot: SharedSnapshot,
    /// Forwarded writes this member waits to see applied.
    outstanding: Arc<Outstanding>,
}

impl<A: Applier> StateMachine<A> {
    /// Creates the adapter, reading the applier's current meta. Blocking.
    pub(crate) fn new(applier: Arc<A>, outstanding: Arc<Outstanding>) -> io::Result<Self> {
        let state = SmMeta::load(&*applier)?;
        Ok(Self {
            applier,
            apply_lock: Arc::new(Mutex::new(())),
            state,
            current_snapshot: Arc::new(Mutex::new(None)),
            outstanding,
        })
    }
}

/// Hands `items` (log index, command) to the applier as one batch.
fn apply_items<A: Applier>(
    applier: &A,
    items: &[(u64, Option<Vec<u8>>)],
    meta: Vec<u8>,
) -> io::Result<Vec<Vec<u8>>> {
    let batch: Vec<(u64, Option<&[u8]>)> = items.iter().map(|(i, d)| (*i, d.as_deref())).collect();
    applier.apply_batch(batch, meta)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds snapshots from the applier; see the module docs.
pub struct SnapshotBuilder<A: Applier> {
    applier: Arc<A>,
    apply_lock: Arc<Mutex<()>>,
    current_snapshot: SharedSnapshot,
}

impl<A: Applier> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<A> {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        snapshot_now(
            self.applier.clone(),
            self.apply_lock.clone(),
            &self.current_snapshot,
            false,
        )
        .await
    }
}

impl<A: Applier> RaftStateMachine<TypeConfig> for StateMachine<A> {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder<A>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applier = self.applier.clone();
        let state = blocking(move || SmMeta::load(&*applier)).await?;
        self.state = state.clone();
        Ok((state.last_applied, state.last_membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut items: Vec<(u64, Option<Vec<u8>>)> = Vec::new();
        let mut responders: Vec<Option<ApplyResponder<TypeConfig>>> = Vec::new();
        let mut next = self.state.clone();
        // Entries that may be writes this member forwarded (position, leader), looked up
        // only while some such write is outstanding.
        let watching = self.outstanding.any();
        let mut candidates = Vec::new();

        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id;
            let data = match entry.payload {
                EntryPayload::Blank => None,
                EntryPayload::Normal(cmd) => {
                    if watching {
                        candidates.push((items.len(), log_id.leader_id));
                    }
                    Some(cmd.0)
                }
                EntryPayload::Membership(m) => {
                    next.last_membership = StoredMembership::new(Some(log_id), m);
                    None
                }
            };
            items.push((log_id.index, data));
            responders.push(responder);
            next.last_applied = Some(log_id);
        }
        if items.is_empty() {
            return Ok(());
        }

        let found = if candidates.is_empty() {
            Vec::new()
        } else {
            let entries: Vec<_> = candidates
                .iter()
                .filter_map(|&(at, leader)| Some((at, leader, items[at].1.as_deref()?)))
                .collect();
            self.outstanding.find(&entries)
        };

        failpoint::crash(CrashPoint::ApplyStart);
        let meta = next.encode()?;
        let n = items.len();
        let applier = self.applier.clone();
        // A short batch that touches no disk runs right here; the lock is only tried, since a
        // snapshot build may hold it for long.
        let inline = if applier.apply_is_quick(n) {
            self.apply_lock
                .try_lock()
                .ok()
                .map(|_guard| apply_items(&*applier, &items, meta.clone()))
        } else {
            None
        };
        let responses = match inline {
            Some(responses) => responses?,
            None => {
                let apply_lock = self.apply_lock.clone();
                blocking(move || {
                    let _g = lock(&apply_lock);
                    apply_items(&*applier, &items, meta)
                })
                .await?
            }
        };
        if responses.len() != n {
            return Err(io::Error::other(format!(
                "applier returned {} responses for {} entries",
                responses.len(),
                n
            )));
        }
        self.state = next;
        if !found.is_empty() {
            self.outstanding
                .applied(&found, |at| responses[at].as_slice());
        }

        for (responder, resp) in responders.into_iter().zip(responses) {
            if let Some(r) = responder {
                r.send(Response(resp));
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            applier: self.applier.clone(),
            apply_lock: self.apply_lock.clone(),
            current_snapshot: self.current_snapshot.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        tracing::info!("raft: installing snapshot {} ({} bytes)", meta, data.len());
        // Entries inside it are not applied one by one: a forwarded write waiting to be seen
        // may be among them.
        self.outstanding.snapshot_installed();
        let applier = self.applier.clone();
        let apply_lock = self.apply_lock.clone();
        blocking(move || {
            let _g = lock(&apply_lock);
            failpoint::crash(CrashPoint::SnapshotInstallStart);
            applier.restore(&data)?;
            failpoint::crash(CrashPoint::SnapshotInstallAfterRestore);
            Ok(())
        })
        .await?;
        self.state = SmMeta {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
        };
        *lock(&self.current_snapshot) = Some(meta.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        if lock(&self.current_snapshot).is_none() {
            return Ok(None);
        }
        // Built now, from the state applied since: a later state than the current snapshot's
        // meta describes, never an earlier one, so the logs purged behind it stay covered.
        snapshot_now(
            self.applier.clone(),
            self.apply_lock.clone(),
            &self.current_snapshot,
            true,
        )
        .await
        .map(Some)
    }
}
