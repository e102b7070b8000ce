//! The storage seam under the MVCC engine: two ordered byte tables with atomic batches.
//!
//! Contract every implementation keeps (checked by [`suite`]):
//! - `commit` applies a whole [`WriteBatch`] or nothing; readers never see half of one.
//! - `Durability::Immediate` returns only after the batch, and every batch committed before
//!   it, is on stable storage. `Durability::Relaxed` may lose the newest batches on a crash
//!   but never reorders them: after a crash the state is that of some prefix of commits.
//! - Keys iterate in byte order.

mod memory;
mod redb_file;

pub use memory::MemoryBackend;
pub use redb_file::RedbBackend;

/// The tables the engine keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    /// History: revision bytes to a key-value record or a tombstone.
    Kv,
    /// Engine metadata: applied index, compaction revision, alarms, identity.
    Meta,
}

impl Table {
    /// Every table, in a fixed order (used by snapshots).
    pub const ALL: [Table; 2] = [Table::Kv, Table::Meta];
}

/// How hard a commit must try before returning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On stable storage before `commit` returns.
    Immediate,
    /// Visible to readers at once, durable at the next immediate commit or `sync`.
    Relaxed,
}

/// One change inside a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Insert or overwrite a key.
    Put(Table, Vec<u8>, Vec<u8>),
    /// Remove a key (absent keys are fine).
    Delete(Table, Vec<u8>),
    /// Remove every key of a table (snapshot restore).
    Clear(Table),
}

/// An ordered list of changes applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// The changes, applied in order.
    pub ops: Vec<WriteOp>,
}

impl WriteBatch {
    /// Adds a put.
    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put(table, key.into(), value.into()));
    }

    /// Adds a delete.
    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete(table, key.into()));
    }

    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A storage failure. The engine treats every one as fatal for the apply that hit it.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The underlying file or device failed.
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The storage engine reported an error (corruption, bad file, ...).
    #[error("storage error: {0}")]
    Storage(String),
}

/// A consistent read view: everything committed before it was opened, nothing after.
pub trait BackendRead {
    /// Point lookup.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError>;
    /// Visits keys in `[from, to)` (`to = None`: to the end) in order until `visit` says stop.
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), BackendError>;
}

/// A transactional ordered store the MVCC engine persists into.
pub trait Backend: Send + Sync + 'static {
    /// Opens a consistent read view.
    fn read(&self) -> Result<Box<dyn BackendRead + '_>, BackendError>;
    /// Applies `batch` atomically with the given durability.
    fn commit(&self, batch: WriteBatch, durability: Durability) -> Result<(), BackendError>;
    /// Makes every earlier commit durable.
    fn sync(&self) -> Result<(), BackendError>;
    /// Bytes the store occupies (file size for a file backend).
    fn size(&self) -> u64;
    /// Bytes actually in use (at most `size`).
    fn size_in_use(&self) -> u64;
    /// Gives back free space (etcd's defragment).
    fn defragment(&self) -> Result<(), BackendError>;
}

/// The shared behaviour suite every backend must pass. Each function takes a fresh backend.
#[cfg(test)]
pub(crate) mod suite {
    use super::*;

    fn all(b: &dyn Backend, table: Table) -> Vec<(Vec<u8>, Vec<u8>)> {
        let r = b.read().unwrap();
        let mut out = Vec::new();
        r.scan(table, b"", None, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
        out
    }

    pub fn put_get_delete(b: &dyn Backend) {
        let mut batch = WriteBatch::default();
        batch.put(Table::Kv, b"b".to_vec(), b"2".to_vec());
        batch.put(Table::Kv, b"a".to_vec(), b"1".to_vec());
        batch.put(Table::Meta, b"a".to_vec(), b"meta".to_vec());
        b.commit(batch, Durability::Relaxed).unwrap();
        let r = b.read().unwrap();
        assert_eq!(r.get(Table::Kv, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(r.get(Table::Meta, b"a").unwrap(), Some(b"meta".to_vec()));
        assert_eq!(r.get(Table::Kv, b"zz").unwrap(), None);
        drop(r);
        let mut batch = WriteBatch::default();
        batch.delete(Table::Kv, b"a".to_vec());
        batch.delete(Table::Kv, b"missing".to_vec());
        b.commit(batch, Durability::Immediate).unwrap();
        assert_eq!(all(b, Table::Kv), vec![(b"b".to_vec(), b"2".to_vec())]);
        assert_eq!(all(b, Table::Meta).len(), 1);
    }

    pub fn scan_is_ordered_and_bounded(b: &dyn Backend) {
        let mut batch = WriteBatch::default();
        for k in [5u8, 1, 9, 3, 7] {
            batch.put(Table::Kv, vec![k], vec![k * 2]);
        }
        b.commit(batch, Durability::Relaxed).unwrap();
        let r = b.read().unwrap();
        let mut seen = Vec::new();
        r.scan(Table::Kv, &[3], Some(&[9]), &mut |k, _| {
            seen.push(k[0]);
            true
        })
        .unwrap();
        assert_eq!(seen, vec![3, 5, 7]);
        let mut first = Vec::new();
        r.scan(Table::Kv, &[0], None, &mut |k, _| {
            first.push(k[0]);
            first.len() < 2
        })
        .unwrap();
        assert_eq!(first, vec![1, 3]);
    }

    pub fn batch_is_ordered_and_clear_works(b: &dyn Backend) {
        let mut batch = WriteBatch::default();
        batch.put(Table::Kv, b"k".to_vec(), b"1".to_vec());
        batch.delete(Table::Kv, b"k".to_vec());
        batch.put(Table::Kv, b"k2".to_vec(), b"1".to_vec());
        batch.put(Table::Kv, b"k2".to_vec(), b"2".to_vec());
        b.commit(batch, Durability::Relaxed).unwrap();
        assert_eq!(all(b, Table::Kv), vec![(b"k2".to_vec(), b"2".to_vec())]);
        let mut batch = WriteBatch::default();
        batch.ops.push(WriteOp::Clear(Table::Kv));
        batch.put(Table::Kv, b"n".to_vec(), b"x".to_vec());
        b.commit(batch, Durability::Immediate).unwrap();
        assert_eq!(all(b, Table::Kv), vec![(b"n".to_vec(), b"x".to_vec())]);
    }

    pub fn read_view_is_stable(b: &dyn Backend) {
        let mut batch = WriteBatch::default();
        batch.put(Table::Kv, b"a".to_vec(), b"1".to_vec());
        b.commit(batch, Durability::Relaxed).unwrap();
        let view = b.read().unwrap();
        std::thread::scope(|scope| {
            // A backend may hold commits back while a view is open (the memory one does), so
            // the commit runs on another thread; either way the open view must not see it.
            let writer = scope.spawn(|| {
                let mut batch = WriteBatch::default();
                batch.put(Table::Kv, b"a".to_vec(), b"2".to_vec());
                b.commit(batch, Durability::Relaxed).unwrap();
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(view.get(Table::Kv, b"a").unwrap(), Some(b"1".to_vec()));
            drop(view);
            writer.join().unwrap();
        });
        assert_eq!(
            b.read().unwrap().get(Table::Kv, b"a").unwrap(),
            Some(b"2".to_vec())
        );
    }

    pub fn maintenance_keeps_data(b: &dyn Backend) {
        let mut batch = WriteBatch::default();
        batch.put(Table::Kv, b"a".to_vec(), b"2".to_vec());
        b.commit(batch, Durability::Relaxed).unwrap();
        assert!(b.size() >= b.size_in_use());
        b.sync().unwrap();
        b.defragment().unwrap();
        assert_eq!(
            b.read().unwrap().get(Table::Kv, b"a").unwrap(),
            Some(b"2".to_vec())
        );
    }

    /// Runs every case, each on a fresh backend from `make`.
    pub fn run(make: &mut dyn FnMut() -> Box<dyn Backend>) {
        put_get_delete(make().as_ref());
        scan_is_ordered_and_bounded(make().as_ref());
        batch_is_ordered_and_clear_works(make().as_ref());
        read_view_is_stable(make().as_ref());
        maintenance_keeps_data(make().as_ref());
    }
}
