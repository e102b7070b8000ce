//! The multi-version store: revisions, records and the write transaction.
//!
//! History lives in the backend's `Kv` table keyed by [`Revision`]; each record is a whole
//! `mvccpb.KeyValue` (or a tombstone). The [`KeyIndex`] says which revision holds a key as of
//! any store revision. Writes of one apply batch first go to an [`Overlay`] that reads consult
//! before the backend, so a txn reads its own writes and the batch commits once.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use prost::bytes::{Buf, Bytes};

use crate::backend::{BackendRead, Table, WriteBatch};
use crate::error::{EngineError, Error as Failure, KvError};
use crate::key_index::{KeyIndex, KeyRange};
use crate::lease::LeaseTable;
use crate::proto::mvccpb::{Event, KeyValue, event::EventType};
use crate::revision::{REVISION_BYTES, Revision};

const RECORD_PUT: u8 = 0;
const RECORD_TOMBSTONE: u8 = 1;

/// A stored history entry: the key-value as written, or the tombstone that ended a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// True for a delete.
    pub tombstone: bool,
    /// For a put, the full key-value; for a tombstone, the key and mod revision.
    pub kv: KeyValue,
}

impl Record {
    /// Storage bytes: one kind byte, then the protobuf `KeyValue`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.kv.encoded_len());
        out.push(if self.tombstone {
            RECORD_TOMBSTONE
        } else {
            RECORD_PUT
        });
        self.kv
            .encode(&mut out)
            .expect("a Vec grows to fit any message");
        out
    }

    /// Decodes bytes written by [`Record::encode`]. The key and value come out as slices of
    /// `bytes`, not copies: a range reads many records into one buffer and decodes them all
    /// from it, instead of two allocations per key (a third of a large range's CPU).
    pub fn decode(mut bytes: Bytes) -> Result<Self, EngineError> {
        if bytes.is_empty() {
            return Err(EngineError::Corrupt("empty history record".into()));
        }
        let tombstone = match bytes.get_u8() {
            RECORD_PUT => false,
            RECORD_TOMBSTONE => true,
            other => return Err(EngineError::Corrupt(format!("unknown record kind {other}"))),
        };
        let kv = KeyValue::decode(bytes)
            .map_err(|e| EngineError::Corrupt(format!("undecodable history record: {e}")))?;
        Ok(Self { tombstone, kv })
    }
}

/// Uncommitted history writes of the current apply batch, layered over a backend read view.
/// `None` marks a deletion. (Metadata needs no overlay: apply never reads it back.) The
/// batch's changes are also kept as watch events, in order, for the watch hub.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    pub kv: BTreeMap<[u8; REVISION_BYTES], Option<Vec<u8>>>,
    pub events: Vec<Event>,
}

impl Overlay {
    /// Moves the overlay into a backend batch (its events stay behind).
    pub fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch::default();
        for (k, v) in self.kv {
            match v {
                Some(v) => batch.put(Table::Kv, k.to_vec(), v),
                None => batch.delete(Table::Kv, k.to_vec()),
            }
        }
        batch
    }
}

/// Where records are read from: a backend view, plus the batch's overlay while applying.
pub(crate) struct Source<'a> {
    pub backend: &'a dyn BackendRead,
    pub overlay: Option<&'a Overlay>,
}

/// Below this many records a range fetches them one by one.
const SCAN_MIN_RECORDS: usize = 64;

impl Source<'_> {
    /// The records of `revs`, in that order. Many records whose revisions lie close together
    /// (a prefix written in a few transactions, say) are read in one ordered scan of the
    /// history instead of a B-tree descent each: a 10,000-key range spent a quarter of its
    /// time in those descents.
    pub fn records(&self, revs: &[Revision]) -> Result<Vec<Record>, EngineError> {
        let overlaid = self.overlay.is_some_and(|o| !o.kv.is_empty());
        let mut order: Vec<usize> = (0..revs.len()).collect();
        order.sort_unstable_by_key(|&i| revs[i]);
        let dense = match (order.first(), order.last()) {
            (Some(&lo), Some(&hi)) => {
                let span = revs[hi]
                    .main
                    .saturating_sub(revs[lo].main)
                    .saturating_add(1);
                span <= 2 * revs.len() as i64
            }
            _ => false,
        };
        if overlaid || revs.len() < SCAN_MIN_RECORDS || !dense {
            return revs.iter().map(|&rev| self.record(rev)).collect();
        }
        let (from, last) = (revs[order[0]].to_bytes(), revs[order[order.len() - 1]]);
        // Records' bytes are copied into a few chunk buffers; `spans` says where each lies.
        let mut chunks = Chunks::default();
        let mut spans: Vec<Option<Span>> = vec![None; revs.len()];
        let mut next = 0;
        self.backend
            .scan(Table::Kv, &from, None, &mut |key, value| {
                while next < order.len() && revs[order[next]].to_bytes().as_slice() < key {
                    // Not in storage; reported below as the point read would.
                    next += 1;
                }
                let mut span = None;
                while next < order.len() && revs[order[next]].to_bytes().as_slice() == key {
                    spans[order[next]] = Some(*span.get_or_insert_with(|| chunks.push(value)));
                    next += 1;
                }
                next < order.len() && Revision::from_bytes(key).is_none_or(|r| r < last)
            })?;
        let chunks = chunks.freeze();
        spans
            .into_iter()
            .zip(revs)
            .map(|(span, &rev)| match span {
                Some(span) => Record::decode(chunks[span.chunk].slice(span.start..span.end)),
                None => self.record(rev),
            })
            .collect()
    }

    pub fn record(&self, rev: Revision) -> Result<Record, EngineError> {
        let key = rev.to_bytes();
        let bytes = match self.overlay.and_then(|o| o.kv.get(&key)) {
            Some(Some(v)) => Some(v.clone()),
            Some(None) => None,
            None => self.backend.get(Table::Kv, &key)?,
        };
        let bytes = bytes.ok_or_else(|| {
            EngineError::Corrupt(format!(
                "index points at revision {}.{} which storage does not hold",
                rev.main, rev.sub
            ))
        })?;
        Record::decode(Bytes::from(bytes))
    }
}

/// Where one record's bytes lie in [`Chunks`].
#[derive(Debug, Clone, Copy)]
struct Span {
    chunk: usize,
    start: usize,
    end: usize,
}

/// Buffers that a scan copies many records into, so that decoded keys and values are slices
/// of a few allocations rather than two allocations each. Chunks stay below glibc's mmap
/// threshold, so they are reused from the heap rather than mapped and unmapped per read, and
/// no buffer is ever grown by copying.
#[derive(Debug, Default)]
struct Chunks {
    done: Vec<Vec<u8>>,
    open: Vec<u8>,
}

impl Chunks {
    const SIZE: usize = 64 * 1024;

    /// Copies `value` in and says where it went.
    fn push(&mut self, value: &[u8]) -> Span {
        if self.open.capacity() - self.open.len() < value.len() {
            let full = std::mem::replace(
                &mut self.open,
                Vec::with_capacity(Self::SIZE.max(value.len())),
            );
            if !full.is_empty() {
                self.done.push(full);
            }
        }
        let start = self.open.len();
        self.open.extend_from_slice(value);
        Span {
            chunk: self.done.len(),
            start,
            end: self.open.len(),
        }
    }

    /// The chunks, indexed as the spans say.
    fn freeze(mut self) -> Vec<Bytes> {
        self.done.push(self.open);
        self.done.into_iter().map(Bytes::from).collect()
    }
}

/// What a range read at one revision found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RangeResult {
    /// Key-values in key order (at most `limit` of them).
    pub kvs: Vec<KeyValue>,
    /// Number of keys in the range at that revision, regardless of `limit`.
    pub count: i64,
    /// The store revision the read answered for (the header revision).
    pub rev: i64,
}

/// Options of one engine-level range read.
#[derive(Debug, Clone, Copy, Default)]
pub struct RangeOptions {
    /// Revision to read at; `<= 0` means the current one.
    pub rev: i64,
    /// Maximum number of key-values to load; `<= 0` means all.
    pub limit: i64,
    /// Count only, load nothing.
    pub count_only: bool,
}

/// Revision state, the key index and the lease table (a put checks and attaches leases in the
/// same transaction). Guarded by the state machine's lock.
#[derive(Debug, Clone)]
pub struct Mvcc {
    /// Leases and the keys attached to them.
    pub leases: LeaseTable,
    /// Which revision holds each key as of any revision.
    pub index: KeyIndex,
    /// The store revision: the revision of the last write transaction (1 when empty).
    pub current: i64,
    /// The newest compaction revision, -1 before the first compaction (as etcd).
    pub compacted: i64,
}

impl Default for Mvcc {
    fn default() -> Self {
        Self {
            leases: LeaseTable::default(),
            index: KeyIndex::new(),
            current: 1,
            compacted: -1,
        }
    }
}

impl Mvcc {
    /// Reads `range` as of `opts.rev`, with `cur` as the revision the reader stands at.
    /// Mirrors etcd's `rangeKeys`: future and compacted revisions are refused, the count
    /// covers the whole range, and at most `limit` values are loaded.
    pub(crate) fn range(
        &self,
        src: &Source<'_>,
        range: KeyRange<'_>,
        opts: RangeOptions,
        cur: i64,
    ) -> Result<RangeResult, Failure> {
        if opts.rev > cur {
            return Err(KvError::FutureRevision.into());
        }
        let rev = if opts.rev <= 0 { cur } else { opts.rev };
        if rev < self.compacted {
            return Err(KvError::Compacted {
                compact_revision: self.compacted,
            }
            .into());
        }
        let limit = if opts.limit <= 0 || opts.count_only {
            usize::MAX
        } else {
            opts.limit as usize
        };
        let mut revs = Vec::new();
        let mut count = 0i64;
        self.index.range(range, rev, |_, at| {
            count += 1;
            if revs.len() < limit && !opts.count_only {
                revs.push(at.modified);
            }
            true
        });
        let kvs = src.records(&revs)?.into_iter().map(|r| r.kv).collect();
        Ok(RangeResult {
            kvs,
            count,
            rev: cur,
        })
    }

    /// Decides which stored revisions a compaction at `at` removes: every history entry at
    /// or below `at` except those the index keeps.
    pub(crate) fn compact(
        &mut self,
        at: i64,
        src: &Source<'_>,
        overlay: &mut Overlay,
    ) -> Result<(), Failure> {
        if at <= self.compacted {
            return Err(KvError::Compacted {
                compact_revision: self.compacted,
            }
            .into());
        }
        if at > self.current {
            return Err(KvError::FutureRevision.into());
        }
        let keep: BTreeSet<Revision> = self.index.compact(at);
        let end = Revision::new(at + 1, 0).to_bytes();
        let mut doomed = Vec::new();
        src.backend.scan(Table::Kv, &[], Some(&end), &mut |k, _| {
            if let Some(r) = Revision::from_bytes(k)
                && !keep.contains(&r)
            {
                doomed.push(r.to_bytes());
            }
            true
        })?;
        for (k, v) in overlay.kv.iter_mut() {
            if k.as_slice() < end.as_slice()
                && Revision::from_bytes(k).is_some_and(|r| !keep.contains(&r))
            {
                *v = None;
            }
        }
        for k in doomed {
            overlay.kv.insert(k, None);
        }
        self.compacted = at;
        Ok(())
    }
}

/// One write transaction: every change gets revision `begin + 1` and the next sub-revision;
/// reads see the transaction's own earlier writes. The store revision moves only if something
/// changed, as in etcd.
pub(crate) struct WriteTxn<'a> {
    pub mvcc: &'a mut Mvcc,
    pub overlay: &'a mut Overlay,
    pub backend: &'a dyn BackendRead,
    begin: i64,
    changes: i64,
}

impl<'a> WriteTxn<'a> {
    pub fn begin(
        mvcc: &'a mut Mvcc,
        overlay: &'a mut Overlay,
        backend: &'a dyn BackendRead,
    ) -> Self {
        let begin = mvcc.current;
        Self {
            mvcc,
            overlay,
            backend,
            begin,
            changes: 0,
        }
    }

    /// The revision reads inside the txn stand at.
    pub fn read_rev(&self) -> i64 {
        if self.changes > 0 {
            self.begin + 1
        } else {
            self.begin
        }
    }

    /// The revision before the txn.
    pub fn begin_rev(&self) -> i64 {
        self.begin
    }

    /// The compaction revision.
    pub fn compacted(&self) -> i64 {
        self.mvcc.compacted
    }

    pub fn range(&self, range: KeyRange<'_>, opts: RangeOptions) -> Result<RangeResult, Failure> {
        let src = Source {
            backend: self.backend,
            overlay: Some(self.overlay),
        };
        self.mvcc.range(&src, range, opts, self.read_rev())
    }

    /// Writes `key` and attaches it to `lease` (which the caller checked exists), detaching it
    /// from the lease it had; returns the revision of the write.
    pub fn put(&mut self, key: &[u8], value: prost::bytes::Bytes, lease: i64) -> i64 {
        let main = self.begin + 1;
        let rev = Revision::new(main, self.changes);
        let (create_revision, version) = match self.mvcc.index.get(key, main) {
            Some(at) => (at.created.main, at.version + 1),
            None => (main, 1),
        };
        let record = Record {
            tombstone: false,
            kv: KeyValue {
                key: key.to_vec().into(),
                create_revision,
                mod_revision: main,
                version,
                value,
                lease,
            },
        };
        self.overlay
            .kv
            .insert(rev.to_bytes(), Some(record.encode()));
        self.overlay.events.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(record.kv),
            prev_kv: None,
        });
        self.mvcc.index.put(key, rev);
        self.mvcc.leases.set_key_lease(key, lease);
        self.changes += 1;
        main
    }

    /// Deletes every live key in `range` (detaching them from their leases); returns the count
    /// and the revision reported back.
    pub fn delete_range(&mut self, range: KeyRange<'_>) -> (i64, i64) {
        let at = self.read_rev();
        let mut keys = Vec::new();
        self.mvcc.index.range(range, at, |k, _| {
            keys.push(k.to_vec());
            true
        });
        let main = self.begin + 1;
        for key in &keys {
            let rev = Revision::new(main, self.changes);
            if self.mvcc.index.tombstone(key, rev) {
                self.mvcc.leases.set_key_lease(key, crate::lease::NO_LEASE);
                let record = Record {
                    tombstone: true,
                    kv: KeyValue {
                        key: key.clone().into(),
                        mod_revision: main,
                        ..Default::default()
                    },
                };
                self.overlay
                    .kv
                    .insert(rev.to_bytes(), Some(record.encode()));
                self.overlay.events.push(Event {
                    r#type: EventType::Delete as i32,
                    kv: Some(record.kv),
                    prev_kv: None,
                });
                self.changes += 1;
            }
        }
        let rev = if !keys.is_empty() || self.changes > 0 {
            main
        } else {
            self.begin
        };
        (keys.len() as i64, rev)
    }

    /// Ends the txn: bumps the store revision when anything changed. Returns the revision the
    /// txn's response header reports.
    pub fn end(self) -> i64 {
        if self.changes > 0 {
            self.mvcc.current = self.begin + 1;
        }
        self.mvcc.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_garbage() {
        let r = Record {
            tombstone: false,
            kv: KeyValue {
                key: b"k".to_vec().into(),
                value: b"v".to_vec().into(),
                create_revision: 2,
                mod_revision: 3,
                version: 2,
                lease: 0,
            },
        };
        assert_eq!(Record::decode(r.encode().into()).unwrap(), r);
        assert!(Record::decode(Bytes::new()).is_err());
        assert!(Record::decode(Bytes::from_static(&[9, 1, 2])).is_err());
    }

    /// Records copied into chunks come back byte for byte, whether they fill a chunk
    /// exactly, spill into the next one, or are bigger than a chunk on their own.
    #[test]
    fn chunked_records_come_back_whole() {
        let sizes = [
            10,
            Chunks::SIZE - 10,
            1,
            Chunks::SIZE + 5,
            0,
            300,
            Chunks::SIZE,
            7,
        ];
        let values: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let mut chunks = Chunks::default();
        let spans: Vec<Span> = values.iter().map(|v| chunks.push(v)).collect();
        let frozen = chunks.freeze();
        assert!(
            frozen.len() > 1,
            "the values must spread over several chunks"
        );
        for (span, value) in spans.iter().zip(&values) {
            assert_eq!(&frozen[span.chunk][span.start..span.end], value.as_slice());
        }
    }
}
