//! The Raft log store: openraft's [`RaftLogStorage`] over the write-ahead log in
//! `<data_dir>/wal` ([`Wal`]).
//!
//! # Durability contract
//!
//! * [`append`](RaftLogStorage::append): openraft hands over a batch of entries (all client
//!   writes that queued up meanwhile). They are written in one `pwrite` and are readable by
//!   every log reader when `append` returns, so replication to followers starts at once. The
//!   [`IOFlushed`] callback runs only after an fdatasync covers them, on the WAL's sync thread,
//!   which serves every batch that queued while it synced with one fdatasync.
//! * [`save_vote`](RaftLogStorage::save_vote), [`truncate_after`](RaftLogStorage::truncate_after)
//!   and [`purge`](RaftLogStorage::purge) are durable before they return.
//! * [`save_committed`](RaftLogStorage::save_committed) is called by openraft on every commit
//!   advance. It only notes the id in memory; the next write stores it. Losing the latest
//!   committed id in a crash is allowed by openraft: the state machine then catches up once
//!   the leader re-commits. The entries it covers are durable before it is noted, so a
//!   recovered log never holds a committed id whose entries are missing.
//!
//! Writes come one at a time from openraft's core task and run on a blocking thread when
//! they sync; the append's write goes to the page cache, inline.
//!
//! A data dir from before the WAL holds the log in `raft.redb`: [`LogStore::open`] copies it
//! into a new WAL once, then removes it.

use crate::failpoint::{self, CrashPoint};
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
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::types::Entry;
use super::types::LogId;
use super::types::TypeConfig;
use super::types::Vote;
use super::wal::{RawEntry, Wal};

/// The log's directory inside the data dir.
pub const WAL_DIR: &str = "wal";
/// Where the log lived before the WAL (redb), migrated on open.
const LEGACY_LOG: &str = "raft.redb";

/// WAL-backed [`RaftLogStorage`] and [`RaftLogReader`]. Cheap to clone; clones share the log.
#[derive(Clone)]
pub struct LogStore {
    wal: Arc<Wal>,
    /// The committed id openraft last reported, encoded, not yet stored (see the module docs).
    committed: Arc<Mutex<Option<Vec<u8>>>>,
}

impl LogStore {
    /// The fsync latencies of the log.
    pub fn fsyncs(&self) -> Arc<crate::metrics::Histogram> {
        self.wal.fsyncs()
    }
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogStore")
    }
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
    /// Opens (creating if needed) the log of the member whose data dir is `data_dir`.
    ///
    /// Blocking; call it from a blocking context (e.g. `spawn_blocking`).
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let dir = data_dir.join(WAL_DIR);
        let legacy = data_dir.join(LEGACY_LOG);
        let wal = if !legacy.exists() {
            Wal::open(&dir)?
        } else if !dir.exists() {
            migrate(&legacy, &dir)?
        } else {
            // A migration finished but for removing the old file.
            std::fs::remove_file(&legacy)?;
            Wal::open(&dir)?
        };
        Ok(Self {
            wal,
            committed: Arc::new(Mutex::new(None)),
        })
    }

    /// The shared log, whose reference count tells when openraft's tasks let go of it.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }

    /// `true` if nothing was ever written: no vote, no log entry, nothing purged.
    pub fn is_pristine(&self) -> bool {
        self.wal.vote().is_none() && self.wal.purged().is_none() && self.wal.last_index().is_none()
    }

    /// Index of the last entry in the log (or of the last purged one if the log is empty).
    pub fn last_log_index(&self) -> Option<u64> {
        self.wal
            .last_index()
            .or_else(|| self.wal.purged().map(|(upto, _)| upto))
    }

    /// Test helper: forgets the saved committed log id (as a crash right after a non-durable
    /// `save_committed` would), by storing an empty one.
    #[cfg(test)]
    pub(crate) fn clear_committed(&self) -> io::Result<()> {
        self.pending_committed();
        let none: Option<LogId> = None;
        self.wal.save_committed(encode(&none)?)
    }

    /// Stores the noted committed id durably. Blocking.
    pub fn flush(&self) -> io::Result<()> {
        match self.pending_committed() {
            Some(committed) => self.wal.save_committed(committed),
            None => Ok(()),
        }
    }

    /// Takes the noted committed id, for the next write to store.
    fn pending_committed(&self) -> Option<Vec<u8>> {
        self.committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Copies the redb log at `legacy` into a new WAL in `dir`, then removes it. The WAL is built
/// under a temporary name and renamed into place, so a crash leaves either the old log or
/// the whole new one.
fn migrate(legacy: &Path, dir: &Path) -> io::Result<Arc<Wal>> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
    let db = redb::Database::open(legacy).map_err(io::Error::other)?;
    let tx = db.begin_read().map_err(io::Error::other)?;
    let building = dir.with_extension("migrating");
    if building.exists() {
        std::fs::remove_dir_all(&building)?;
    }
    let wal = Wal::open(&building)?;
    let meta = |key: &str| -> io::Result<Option<Vec<u8>>> {
        let table = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io::Error::other(e)),
        };
        Ok(table
            .get(key)
            .map_err(io::Error::other)?
            .map(|v| v.value().to_vec()))
    };
    if let Some(purged) = meta("last_purged")? {
        let id: LogId = decode(&purged)?;
        wal.purge(id.index, purged)?;
    }
    let committed = meta("committed")?;
    match tx.open_table(LOGS) {
        Ok(logs) => {
            let mut batch: Vec<RawEntry> = Vec::new();
            for item in logs.iter().map_err(io::Error::other)? {
                let (k, v) = item.map_err(io::Error::other)?;
                batch.push((k.value(), v.value().to_vec()));
                if batch.len() == 1024 {
                    wal.append(&batch, None)?;
                    batch.clear();
                }
            }
            wal.append(&batch, None)?;
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(io::Error::other(e)),
    }
    // The last write is durable, and its sync covers every entry written before it.
    if let Some(vote) = meta("vote")? {
        wal.save_vote(&vote, None)?;
    }
    wal.save_committed(committed.unwrap_or(encode(&None::<LogId>)?))?;
    wal.close();
    drop(wal);
    drop(tx);
    drop(db);
    std::fs::rename(&building, dir)?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    std::fs::remove_file(legacy)?;
    tracing::info!(
        "raft: log moved from {} to {}",
        legacy.display(),
        dir.display()
    );
    Wal::open(dir)
}

fn to_range<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let from = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(i) => i.saturating_add(1),
        Bound::Excluded(i) => *i,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (from, to) = to_range(&range);
        let mut out = Vec::new();
        self.wal.visit_entries(from, to, |bytes| {
            out.push(decode::<Entry>(bytes)?);
            Ok(())
        })?;
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.wal.vote().map(|v| decode(&v)).transpose()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> =
            self.wal.purged().map(|(_, b)| decode(&b)).transpose()?;
        let last = match self.wal.last_index() {
            None => None,
            Some(i) => match self.wal.entries(i, i + 1)?.first() {
                Some(bytes) => Some(decode::<Entry>(bytes)?.log_id),
                None => None,
            },
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = encode(vote)?;
        let wal = self.wal.clone();
        let committed = self.pending_committed();
        blocking(move || wal.save_vote(&bytes, committed)).await
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
        match noted.or_else(|| self.wal.committed()) {
            Some(bytes) => Ok(decode::<Option<LogId>>(&bytes)?),
            None => Ok(None),
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
        let mut encoded: Vec<RawEntry> = Vec::new();
        for entry in entries {
            encoded.push((entry.log_id.index, encode(&entry)?));
        }
        if encoded.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        // A page-cache write: readers (replication) see the entries when this returns.
        match self.wal.append(&encoded, self.pending_committed()) {
            Ok(file) => {
                self.wal.sync_later(
                    file,
                    Box::new(move |res| {
                        if let Err(e) = &res {
                            tracing::error!("raft log sync failed: {e}");
                        }
                        callback.io_completed(res);
                    }),
                );
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
        let wal = self.wal.clone();
        blocking(move || wal.truncate(from)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let bytes = encode(&log_id)?;
        let wal = self.wal.clone();
        failpoint::crash(CrashPoint::LogPurgeStart);
        blocking(move || wal.purge(log_id.index, bytes)).await?;
        tracing::info!("raft: log purged up to {}", log_id.index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{blank_ent, log_id};
    use redb::TableDefinition;

    #[tokio::test]
    async fn a_redb_log_from_before_the_wal_is_moved_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join(LEGACY_LOG);
        let vote = Vote::new(3, 1);
        let committed = Some(log_id::<TypeConfig>(3, 1, 7));
        {
            const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
            const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
            let db = redb::Database::create(&legacy).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut meta = tx.open_table(META).unwrap();
                meta.insert("vote", encode(&vote).unwrap().as_slice())
                    .unwrap();
                meta.insert("committed", encode(&committed).unwrap().as_slice())
                    .unwrap();
                let purged = log_id::<TypeConfig>(2, 1, 4);
                meta.insert("last_purged", encode(&purged).unwrap().as_slice())
                    .unwrap();
                let mut logs = tx.open_table(LOGS).unwrap();
                for i in 5..=9 {
                    let e = blank_ent::<TypeConfig>(3, 1, i);
                    logs.insert(i, encode(&e).unwrap().as_slice()).unwrap();
                }
            }
            tx.commit().unwrap();
        }

        let mut store = LogStore::open(dir.path()).unwrap();
        assert!(!legacy.exists(), "the old log is removed once moved");
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.read_committed().await.unwrap(), committed);
        let state = store.get_log_state().await.unwrap();
        assert_eq!(
            state.last_purged_log_id,
            Some(log_id::<TypeConfig>(2, 1, 4))
        );
        assert_eq!(state.last_log_id, Some(log_id::<TypeConfig>(3, 1, 9)));
        let entries = store.try_get_log_entries(0..100).await.unwrap();
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, vec![5, 6, 7, 8, 9]);
    }
}
