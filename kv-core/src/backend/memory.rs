//! An in-memory backend for tests and the property suite.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use super::{Backend, BackendError, BackendRead, Durability, Table, WriteBatch, WriteOp};

type Tables = [BTreeMap<Vec<u8>, Vec<u8>>; 2];

fn slot(table: Table) -> usize {
    match table {
        Table::Kv => 0,
        Table::Meta => 1,
    }
}

/// Two `BTreeMap`s behind one lock; a read view holds the read lock, so commits wait for it.
#[derive(Default)]
pub struct MemoryBackend {
    tables: RwLock<Tables>,
    /// Key and value bytes held, kept by commits so that `size` (asked on every apply for the
    /// quota) does not walk the maps.
    bytes: AtomicU64,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock_read(&self) -> RwLockReadGuard<'_, Tables> {
        // A poisoned lock means a panic mid-commit elsewhere; the maps are still consistent
        // because commit mutates only after building nothing fallible.
        self.tables.read().unwrap_or_else(|e| e.into_inner())
    }
}

struct MemoryRead<'a>(RwLockReadGuard<'a, Tables>);

impl BackendRead for MemoryRead<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self.0[slot(table)].get(key).cloned())
    }

    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), BackendError> {
        let upper = match to {
            Some(t) => Bound::Excluded(t),
            None => Bound::Unbounded,
        };
        if let Some(t) = to
            && t <= from
        {
            return Ok(());
        }
        for (k, v) in self.0[slot(table)].range::<[u8], _>((Bound::Included(from), upper)) {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }
}

impl Backend for MemoryBackend {
    fn read(&self) -> Result<Box<dyn BackendRead + '_>, BackendError> {
        Ok(Box::new(MemoryRead(self.lock_read())))
    }

    fn commit(&self, batch: WriteBatch, _durability: Durability) -> Result<(), BackendError> {
        let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
        let mut bytes = self.bytes.load(Ordering::Relaxed);
        for op in batch.ops {
            match op {
                WriteOp::Put(t, k, v) => {
                    let (klen, vlen) = (k.len() as u64, v.len() as u64);
                    match tables[slot(t)].insert(k, v) {
                        Some(old) => bytes = bytes - old.len() as u64 + vlen,
                        None => bytes += klen + vlen,
                    }
                }
                WriteOp::Delete(t, k) => {
                    if let Some(old) = tables[slot(t)].remove(&k) {
                        bytes -= (k.len() + old.len()) as u64;
                    }
                }
                WriteOp::Clear(t) => {
                    let table = std::mem::take(&mut tables[slot(t)]);
                    bytes -= table
                        .iter()
                        .map(|(k, v)| (k.len() + v.len()) as u64)
                        .sum::<u64>();
                }
            }
        }
        self.bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size_in_use()
    }

    fn size_in_use(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn defragment(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_follows_puts_overwrites_deletes_and_clears() {
        let b = MemoryBackend::new();
        let mut batch = WriteBatch::default();
        batch.put(Table::Kv, b"ab".to_vec(), b"123".to_vec());
        batch.put(Table::Meta, b"m".to_vec(), b"1".to_vec());
        b.commit(batch, Durability::Relaxed).unwrap();
        assert_eq!(b.size(), 7);
        let mut batch = WriteBatch::default();
        batch.put(Table::Kv, b"ab".to_vec(), b"1".to_vec());
        batch.delete(Table::Meta, b"m".to_vec());
        batch.delete(Table::Meta, b"absent".to_vec());
        b.commit(batch, Durability::Relaxed).unwrap();
        assert_eq!(b.size(), 3);
        let mut batch = WriteBatch::default();
        batch.ops.push(WriteOp::Clear(Table::Kv));
        batch.put(Table::Kv, b"x".to_vec(), Vec::new());
        b.commit(batch, Durability::Relaxed).unwrap();
        assert_eq!(b.size(), 1);
    }

    #[test]
    fn memory_backend_passes_the_suite() {
        super::super::suite::run(&mut || Box::new(MemoryBackend::new()));
    }
}
