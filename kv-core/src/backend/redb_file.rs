//! The production backend: one redb file, two tables.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use redb::{Database, ReadOnlyTable, ReadableDatabase, TableDefinition};

use super::{Backend, BackendError, BackendRead, Durability, Table, WriteBatch, WriteOp};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");

fn storage(e: impl std::fmt::Display) -> BackendError {
    BackendError::Storage(e.to_string())
}

/// redb's page cache for the store. Its default (1 GiB per database) is a ceiling that a
/// store of a million keys reached, which put our resident memory far above etcd's for the
/// same data; the B-tree's interior pages, which every lookup touches, fit many times over,
/// and the rest is read through the OS page cache.
const CACHE_BYTES: usize = 128 << 20;

/// A redb database file. The `RwLock` exists only for defragment, which needs the database
/// exclusively; every other call takes it shared (redb serialises writers itself).
pub struct RedbBackend {
    db: RwLock<Database>,
    path: PathBuf,
}

impl RedbBackend {
    /// Opens `path`, creating an empty store when the file does not exist. An existing file is
    /// integrity-checked, so a corrupt or non-redb file is refused instead of trusted.
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        let mut builder = Database::builder();
        builder.set_cache_size(CACHE_BYTES);
        let db = if path.exists() {
            builder.set_check_integrity_on_open(true);
            builder.open(path).map_err(storage)?
        } else {
            builder.create(path).map_err(storage)?
        };
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(KV).map_err(storage)?;
        txn.open_table(META).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(Self {
            db: RwLock::new(db),
            path: path.to_path_buf(),
        })
    }

    fn db(&self) -> std::sync::RwLockReadGuard<'_, Database> {
        self.db.read().unwrap_or_else(|e| e.into_inner())
    }
}

struct RedbRead {
    kv: ReadOnlyTable<&'static [u8], &'static [u8]>,
    meta: ReadOnlyTable<&'static [u8], &'static [u8]>,
}

impl RedbRead {
    fn table(&self, table: Table) -> &ReadOnlyTable<&'static [u8], &'static [u8]> {
        match table {
            Table::Kv => &self.kv,
            Table::Meta => &self.meta,
        }
    }
}

impl BackendRead for RedbRead {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self
            .table(table)
            .get(key)
            .map_err(storage)?
            .map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), BackendError> {
        let t = self.table(table);
        let iter = match to {
            Some(to) if to <= from => return Ok(()),
            Some(to) => t.range::<&[u8]>(from..to).map_err(storage)?,
            None => t.range::<&[u8]>(from..).map_err(storage)?,
        };
        for item in iter {
            let (k, v) = item.map_err(storage)?;
            if !visit(k.value(), v.value()) {
                break;
            }
        }
        Ok(())
    }
}

impl Backend for RedbBackend {
    fn read(&self) -> Result<Box<dyn BackendRead + '_>, BackendError> {
        let txn = self.db().begin_read().map_err(storage)?;
        Ok(Box::new(RedbRead {
            kv: txn.open_table(KV).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
        }))
    }

    fn commit(&self, batch: WriteBatch, durability: Durability) -> Result<(), BackendError> {
        let db = self.db();
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(match durability {
            Durability::Immediate => redb::Durability::Immediate,
            Durability::Relaxed => redb::Durability::None,
        })
        .map_err(storage)?;
        {
            let mut kv = txn.open_table(KV).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            for op in &batch.ops {
                let table = match op {
                    WriteOp::Put(t, ..) | WriteOp::Delete(t, _) | WriteOp::Clear(t) => *t,
                };
                let target = match table {
                    Table::Kv => &mut kv,
                    Table::Meta => &mut meta,
                };
                match op {
                    WriteOp::Put(_, k, v) => {
                        target.insert(k.as_slice(), v.as_slice()).map_err(storage)?;
                    }
                    WriteOp::Delete(_, k) => {
                        target.remove(k.as_slice()).map_err(storage)?;
                    }
                    WriteOp::Clear(_) => target.retain(|_, _| false).map_err(storage)?,
                }
            }
        }
        txn.commit().map_err(storage)
    }

    fn sync(&self) -> Result<(), BackendError> {
        // An immediate commit makes every earlier non-durable commit durable with it.
        self.commit(WriteBatch::default(), Durability::Immediate)
    }

    fn size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    fn size_in_use(&self) -> u64 {
        let db = self.db();
        let stats = db.begin_write().and_then(|txn| {
            let stats = txn.stats().map_err(redb::TransactionError::from);
            txn.abort().ok();
            stats
        });
        match stats {
            Ok(s) => (s.allocated_pages() * s.page_size() as u64).min(self.size()),
            Err(_) => self.size(),
        }
    }

    fn defragment(&self) -> Result<(), BackendError> {
        self.sync()?;
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        while db.compact().map_err(storage)? {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redb_backend_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        super::super::suite::run(&mut || {
            n += 1;
            Box::new(RedbBackend::open(&dir.path().join(format!("db{n}"))).unwrap())
        });
    }

    #[test]
    fn durable_data_survives_reopen_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let b = RedbBackend::open(&path).unwrap();
            let mut batch = WriteBatch::default();
            batch.put(Table::Kv, b"k".to_vec(), b"v".to_vec());
            b.commit(batch, Durability::Relaxed).unwrap();
            b.sync().unwrap();
        }
        let b = RedbBackend::open(&path).unwrap();
        assert_eq!(
            b.read().unwrap().get(Table::Kv, b"k").unwrap(),
            Some(b"v".to_vec())
        );
        drop(b);
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
        assert!(RedbBackend::open(&junk).is_err());
        assert_eq!(std::fs::read(&junk).unwrap(), vec![0x42u8; 8192]);
    }
}
