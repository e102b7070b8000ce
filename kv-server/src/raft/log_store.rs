//! The Raft log store: a redb file (`raft.redb`) of its own.
//!
//! # Layout
//!
//! * table `raft_log`: `u64` log index → postcard-serialized [`Entry`].
//! * table `raft_meta`: `&str` → postcard bytes, keys [`KEY_VOTE`], [`KEY_COMMITTED`],
//!   [`KEY_LAST_PURGED`].
//!
//! # Durability contract
//!
//! * [`save_vote`](RaftLogStorage::save_vote): the vote is committed with
//!   [`Durability::Immediate`] (fsync) before the call returns.
//! * [`append`](RaftLogStorage::append): openraft hands over a batch of entries (all client
//!   writes that queued up while the previous batch was being flushed). The whole batch is
//!   written in ONE redb write transaction with ONE durable ([`Durability::Immediate`]) commit,
//!   so concurrent client writes share one fsync. The entries are durable *before* the
//!   [`IOFlushed`] callback is invoked, and readable by every [`LogStore`] clone (log readers)
//!   when `append` returns.
//! * [`truncate_after`](RaftLogStorage::truncate_after) and [`purge`](RaftLogStorage::purge) are
//!   durable ([`Durability::Immediate`]) before they return. Purge records the last purged log id
//!   and deletes the entries in the same transaction. Truncation deletes only a suffix and purge
//!   only a prefix, so the log never has holes.
//! * [`save_committed`](RaftLogStorage::save_committed) is called by openraft on every commit
//!   advance. It only notes the id in memory; the next write (append, vote, truncate, purge, or
//!   [`LogStore::flush`] at shutdown) stores it in its own transaction. A commit of its own
//!   cost every client write a redb commit (its page writes) and a hop to a blocking thread.
//!   The entries a committed id covers are durable before it is noted, so a recovered file
//!   never holds a committed id whose entries are missing. Losing the latest committed id on a
//!   crash is allowed by openraft: the state machine then catches up once the leader
//!   re-commits.
//!
//! All writes are serialized: openraft issues them one at a time from its core task, and every
//! write runs on a blocking thread (`spawn_blocking`) so the async runtime is never blocked by an
//! fsync. Reads (log readers) use redb read transactions (MVCC snapshots) and run inline.

use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;

use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use redb::Database;
use redb::Durability;
use redb::ReadableDatabase;
use redb::ReadableTable;
use redb::TableDefinition;
use redb::WriteTransaction;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::types::Entry;
use super::types::LogId;
use super::types::TypeConfig;
use super::types::Vote;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// redb's page cache for the log, which is appended to and read back near its end (by
/// replication); the default of 1 GiB only held entries long applied.
const CACHE_BYTES: usize = 32 << 20;
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

/// Meta key of the durable vote.
pub const KEY_VOTE: &str = "vote";
/// Meta key of the last committed log id (see the module docs for its durability).
pub const KEY_COMMITTED: &str = "committed";
/// Meta key of the last purged log id.
pub const KEY_LAST_PURGED: &str = "last_purged";

/// Redb-backed [`RaftLogStorage`] and [`RaftLogReader`]. Cheap to clone; clones share the
/// database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The committed id openraft last reported, encoded, not yet stored (see the module docs).
    committed: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogStore")
    }
}

fn io_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> io::Error {
    io::Error::other(e)
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    postcard::from_bytes(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Runs blocking storage work off the async workers.
pub(super) async fn blocking<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

impl LogStore {
    /// Opens (creating if needed) the log database at `path` and makes sure both tables exist.
    ///
    /// Blocking; call it from a blocking context (e.g. `spawn_blocking`).
    pub fn open(path: &Path) -> io::Result<Self> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(io_err)?;
        let mut tx = db.begin_write().map_err(io_err)?;
        tx.set_durability(Durability::Immediate).map_err(io_err)?;
        {
            tx.open_table(LOGS).map_err(io_err)?;
            tx.open_table(META).map_err(io_err)?;
        }
        tx.commit().map_err(io_err)?;
        Ok(Self {
            db: Arc::new(db),
            committed: Arc::new(Mutex::new(None)),
        })
    }

    /// The shared database handle.
    pub fn db(&self) -> &Arc<Database> {
        &self.db
    }

    /// `true` if nothing was ever written: no vote, no log entry, nothing purged.
    pub fn is_pristine(&self) -> io::Result<bool> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let meta = tx.open_table(META).map_err(io_err)?;
        let logs = tx.open_table(LOGS).map_err(io_err)?;
        Ok(meta.get(KEY_VOTE).map_err(io_err)?.is_none()
            && meta.get(KEY_LAST_PURGED).map_err(io_err)?.is_none()
            && logs.first().map_err(io_err)?.is_none())
    }

    /// Index of the last entry in the log (or of the last purged one if the log is empty).
    /// Blocking.
    pub fn last_log_index(&self) -> io::Result<Option<u64>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let logs = tx.open_table(LOGS).map_err(io_err)?;
        if let Some((k, _)) = logs.last().map_err(io_err)? {
            return Ok(Some(k.value()));
        }
        drop(logs);
        drop(tx);
        Ok(self.read_meta::<LogId>(KEY_LAST_PURGED)?.map(|l| l.index))
    }

    /// Test helper: forgets the saved committed log id (as a crash right after a non-durable
    /// `save_committed` would).
    #[cfg(test)]
    pub(crate) fn clear_committed(&self) -> io::Result<()> {
        self.pending_committed();
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut meta = tx.open_table(META).map_err(io_err)?;
            meta.remove(KEY_COMMITTED).map_err(io_err)?;
        }
        tx.commit().map_err(io_err)
    }

    /// Makes every previous (possibly non-durable) commit durable: an empty write transaction
    /// committed with [`Durability::Immediate`]. Blocking.
    pub fn flush(&self) -> io::Result<()> {
        write(&self.db, self.pending_committed(), |_| Ok(()))
    }

    /// Takes the noted committed id, for the next write to store.
    fn pending_committed(&self) -> Option<Vec<u8>> {
        self.committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Runs a durable write transaction on a blocking thread, storing the noted committed id
    /// in it too.
    async fn write_blocking<F>(&self, f: F) -> io::Result<()>
    where
        F: FnOnce(&WriteTransaction) -> io::Result<()> + Send + 'static,
    {
        let db = self.db.clone();
        let committed = self.pending_committed();
        blocking(move || write(&db, committed, f)).await
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let meta = tx.open_table(META).map_err(io_err)?;
        match meta.get(key).map_err(io_err)? {
            None => Ok(None),
            Some(v) => decode(v.value()).map(Some),
        }
    }
}

/// One durable ([`Durability::Immediate`]) write transaction: `f`'s writes and, if given,
/// the committed id, in one commit. Every write of the log is durable.
fn write<F>(db: &Database, committed: Option<Vec<u8>>, f: F) -> io::Result<()>
where
    F: FnOnce(&WriteTransaction) -> io::Result<()>,
{
    let mut tx = db.begin_write().map_err(io_err)?;
    tx.set_durability(Durability::Immediate).map_err(io_err)?;
    if let Some(committed) = committed {
        let mut meta = tx.open_table(META).map_err(io_err)?;
        meta.insert(KEY_COMMITTED, committed.as_slice())
            .map_err(io_err)?;
    }
    f(&tx)?;
    tx.commit().map_err(io_err)
}

fn to_bounds<RB: RangeBounds<u64>>(range: &RB) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let logs = tx.open_table(LOGS).map_err(io_err)?;
        let mut out = Vec::new();
        for item in logs.range::<u64>(to_bounds(&range)).map_err(io_err)? {
            let (k, v) = item.map_err(io_err)?;
            let entry: Entry = decode(v.value())?;
            debug_assert_eq!(k.value(), entry.log_id.index);
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.read_meta(KEY_LAST_PURGED)?;
        let last = {
            let tx = self.db.begin_read().map_err(io_err)?;
            let logs = tx.open_table(LOGS).map_err(io_err)?;
            match logs.last().map_err(io_err)? {
                None => None,
                Some((_, v)) => Some(decode::<Entry>(v.value())?.log_id),
            }
        };
        let last_log_id = last.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = encode(vote)?;
        self.write_blocking(move |tx| {
            let mut meta = tx.open_table(META).map_err(io_err)?;
            meta.insert(KEY_VOTE, bytes.as_slice()).map_err(io_err)?;
            Ok(())
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let bytes = encode(&committed)?;
        *self.committed.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let noted = self
            .committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match noted {
            Some(bytes) => Ok(decode::<Option<LogId>>(&bytes)?),
            None => Ok(self.read_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten()),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            encoded.push((entry.log_id.index, encode(&entry)?));
        }
        if encoded.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        let res = self
            .write_blocking(move |tx| {
                let mut logs = tx.open_table(LOGS).map_err(io_err)?;
                for (index, bytes) in &encoded {
                    logs.insert(*index, bytes.as_slice()).map_err(io_err)?;
                }
                Ok(())
            })
            .await;
        match res {
            Ok(()) => {
                // The batch is durable (fsynced) at this point.
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                tracing::error!("raft log append failed: {e}");
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        tracing::debug!("raft log: truncate [{from}, +oo)");
        self.write_blocking(move |tx| {
            let mut logs = tx.open_table(LOGS).map_err(io_err)?;
            logs.retain_in::<u64, _>(from.., |_, _| false)
                .map_err(io_err)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        tracing::debug!("raft log: purge [0, {}]", log_id.index);
        let upto = log_id.index;
        let purged = encode(&log_id)?;
        self.write_blocking(move |tx| {
            let mut meta = tx.open_table(META).map_err(io_err)?;
            meta.insert(KEY_LAST_PURGED, purged.as_slice())
                .map_err(io_err)?;
            let mut logs = tx.open_table(LOGS).map_err(io_err)?;
            logs.retain_in::<u64, _>(..=upto, |_, _| false)
                .map_err(io_err)?;
            Ok(())
        })
        .await
    }
}
