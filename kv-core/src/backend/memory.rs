//! An in-memory backend for tests and the property suite.

use std::collections::BTreeMap;
use std::ops::Bound;
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
        for op in batch.ops {
            match op {
                WriteOp::Put(t, k, v) => {
                    tables[slot(t)].insert(k, v);
                }
                WriteOp::Delete(t, k) => {
                    tables[slot(t)].remove(&k);
                }
                WriteOp::Clear(t) => tables[slot(t)].clear(),
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size_in_use()
    }

    fn size_in_use(&self) -> u64 {
        let tables = self.lock_read();
        tables
            .iter()
            .flat_map(|t| t.iter())
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum()
    }

    fn defragment(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_backend_passes_the_suite() {
        super::super::suite::run(&mut || Box::new(MemoryBackend::new()));
    }
}
