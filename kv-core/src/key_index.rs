//! The in-memory key index: for each key, its generations of revisions.
//!
//! A generation is the life of a key from creation to deletion; a delete appends a tombstone
//! revision to the current generation and opens a new, empty one. The index answers "which
//! revision holds key K as of store revision R", and it is rebuilt from the history table at
//! start-up, so it is never persisted itself.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use crate::revision::Revision;

/// One life of a key: from its creating put to the tombstone that ends it (if any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Generation {
    /// Number of puts in this generation (the key's `version` after the last one).
    version: i64,
    /// The creating revision.
    created: Revision,
    /// Every revision of the generation in order; the last one is a tombstone unless this is
    /// the key's newest generation.
    revs: Vec<Revision>,
}

/// Where a key stood as of some revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAt {
    /// Revision of the record holding the value.
    pub modified: Revision,
    /// Revision of the generation's creating put.
    pub created: Revision,
    /// The key's version at that point (1 after creation).
    pub version: i64,
}

/// All generations of one key. Invariant: never empty; only the last generation may be empty.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyHistory {
    generations: Vec<Generation>,
}

impl KeyHistory {
    fn new() -> Self {
        Self {
            generations: vec![Generation::default()],
        }
    }

    fn put(&mut self, rev: Revision) {
        let g = self
            .generations
            .last_mut()
            .expect("a key history always has a generation");
        if g.revs.is_empty() {
            g.created = rev;
        }
        g.revs.push(rev);
        g.version += 1;
    }

    /// Ends the current generation at `rev`. Returns false (and changes nothing) when the key
    /// is not live.
    fn tombstone(&mut self, rev: Revision) -> bool {
        if self.generations.last().is_none_or(|g| g.revs.is_empty()) {
            return false;
        }
        self.put(rev);
        self.generations.push(Generation::default());
        true
    }

    /// The generation live at `at`, as etcd's `findGeneration`.
    fn generation_at(&self, at: i64) -> Option<&Generation> {
        let last = self.generations.len() - 1;
        for (i, g) in self.generations.iter().enumerate().rev() {
            let Some(first) = g.revs.first() else {
                continue;
            };
            if i != last && g.revs.last().is_some_and(|t| t.main <= at) {
                // The generation was tombstoned at or before `at`.
                return None;
            }
            if first.main <= at {
                return Some(g);
            }
        }
        None
    }

    fn get(&self, at: i64) -> Option<KeyAt> {
        let g = self.generation_at(at)?;
        let n = g.revs.iter().rposition(|r| r.main <= at)?;
        Some(KeyAt {
            modified: g.revs[n],
            created: g.created,
            version: g.version - (g.revs.len() - n - 1) as i64,
        })
    }

    /// Drops history below `at`, recording in `keep` the revisions at or below `at` that must
    /// stay in storage (the newest one of a generation still live at `at`). Returns true when
    /// nothing is left and the key can leave the index. Mirrors etcd's `keyIndex.compact`.
    fn compact(&mut self, at: i64, keep: &mut BTreeSet<Revision>) -> bool {
        let mut idx = 0;
        while idx < self.generations.len() - 1 {
            let tomb = self.generations[idx]
                .revs
                .last()
                .map_or(i64::MIN, |r| r.main);
            if tomb > at {
                break;
            }
            idx += 1;
        }
        let is_last = idx == self.generations.len() - 1;
        let g = &mut self.generations[idx];
        if let Some(n) = g.revs.iter().rposition(|r| r.main <= at) {
            keep.insert(g.revs[n]);
            g.revs.drain(..n);
            if g.revs.len() == 1 && !is_last {
                keep.remove(&g.revs[0]);
                idx += 1;
            }
        }
        self.generations.drain(..idx);
        self.generations.len() == 1 && self.generations[0].revs.is_empty()
    }
}

/// The ordered index of every key that has history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyIndex {
    keys: BTreeMap<Vec<u8>, KeyHistory>,
}

/// Which keys a request covers, decoded from etcd's `key`/`range_end` convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRange<'a> {
    /// Exactly one key (`range_end` empty).
    Single(&'a [u8]),
    /// `[start, end)`; `end = None` means every key from `start` on (`range_end = "\0"`).
    Span(&'a [u8], Option<&'a [u8]>),
}

impl<'a> KeyRange<'a> {
    /// Decodes etcd's convention: empty `range_end` is one key, `"\0"` is "from key on".
    pub fn new(key: &'a [u8], range_end: &'a [u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key),
            [0] => KeyRange::Span(key, None),
            end => KeyRange::Span(key, Some(end)),
        }
    }

    /// True when `k` falls inside the range.
    pub fn contains(&self, k: &[u8]) -> bool {
        match *self {
            KeyRange::Single(key) => k == key,
            KeyRange::Span(start, end) => k >= start && end.is_none_or(|e| k < e),
        }
    }
}

impl KeyIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a put of `key` at `rev`.
    pub fn put(&mut self, key: &[u8], rev: Revision) {
        if let Some(h) = self.keys.get_mut(key) {
            h.put(rev);
        } else {
            let mut h = KeyHistory::new();
            h.put(rev);
            self.keys.insert(key.to_vec(), h);
        }
    }

    /// Rebuilds a key's entry from a stored put at start-up. History below a compaction is
    /// gone, so the first record seen for a key may be mid-generation: it carries the
    /// generation's creating revision and version itself (etcd's `keyIndex.restore`).
    pub fn restore(&mut self, key: &[u8], created: i64, modified: Revision, version: i64) {
        match self.keys.get_mut(key) {
            Some(h) => h.put(modified),
            None => {
                let g = Generation {
                    version,
                    created: Revision::new(created, 0),
                    revs: vec![modified],
                };
                self.keys.insert(
                    key.to_vec(),
                    KeyHistory {
                        generations: vec![g],
                    },
                );
            }
        }
    }

    /// Records a delete of `key` at `rev`; false when the key is not live (nothing recorded).
    pub fn tombstone(&mut self, key: &[u8], rev: Revision) -> bool {
        self.keys.get_mut(key).is_some_and(|h| h.tombstone(rev))
    }

    /// Where `key` stood as of revision `at`, if it was live then.
    pub fn get(&self, key: &[u8], at: i64) -> Option<KeyAt> {
        self.keys.get(key)?.get(at)
    }

    /// Calls `visit` for each key live at `at` inside `range`, in key order, until it returns
    /// false.
    pub fn range(&self, range: KeyRange<'_>, at: i64, mut visit: impl FnMut(&[u8], KeyAt) -> bool) {
        match range {
            KeyRange::Single(key) => {
                if let Some(k) = self.get(key, at) {
                    visit(key, k);
                }
            }
            KeyRange::Span(start, end) => {
                if end.is_some_and(|e| e <= start) {
                    return;
                }
                let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
                for (key, h) in self.keys.range::<[u8], _>((Bound::Included(start), upper)) {
                    if let Some(k) = h.get(at)
                        && !visit(key, k)
                    {
                        break;
                    }
                }
            }
        }
    }

    /// Compacts every key's history at `at`; returns the revisions at or below `at` that stay.
    pub fn compact(&mut self, at: i64) -> BTreeSet<Revision> {
        let mut keep = BTreeSet::new();
        self.keys.retain(|_, h| !h.compact(at, &mut keep));
        keep
    }

    /// Number of keys with any history.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key has history.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    #[test]
    fn versions_and_generations() {
        let mut ix = KeyIndex::new();
        ix.put(b"a", r(2));
        ix.put(b"a", r(4));
        assert!(ix.tombstone(b"a", r(6)));
        assert!(!ix.tombstone(b"a", r(7)));
        ix.put(b"a", r(8));
        assert_eq!(ix.get(b"a", 1), None);
        let at3 = ix.get(b"a", 3).unwrap();
        assert_eq!((at3.modified, at3.created, at3.version), (r(2), r(2), 1));
        let at5 = ix.get(b"a", 5).unwrap();
        assert_eq!((at5.modified, at5.created, at5.version), (r(4), r(2), 2));
        assert_eq!(ix.get(b"a", 6), None);
        assert_eq!(ix.get(b"a", 7), None);
        let at9 = ix.get(b"a", 9).unwrap();
        assert_eq!((at9.modified, at9.created, at9.version), (r(8), r(8), 1));
    }

    #[test]
    fn compaction_keeps_the_visible_revision() {
        let mut ix = KeyIndex::new();
        ix.put(b"a", r(2));
        ix.put(b"a", r(3));
        ix.put(b"b", r(4));
        assert!(ix.tombstone(b"b", r(5)));
        ix.put(b"c", r(6));
        let keep = ix.compact(5);
        assert_eq!(keep.into_iter().collect::<Vec<_>>(), vec![r(3)]);
        assert_eq!(ix.get(b"a", 5).unwrap().modified, r(3));
        assert_eq!(ix.get(b"a", 5).unwrap().version, 2);
        assert_eq!(ix.get(b"b", 4), None);
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.get(b"c", 6).unwrap().modified, r(6));
    }

    #[test]
    fn compaction_before_tombstone_keeps_generation() {
        let mut ix = KeyIndex::new();
        ix.put(b"a", r(2));
        ix.put(b"a", r(3));
        assert!(ix.tombstone(b"a", r(5)));
        let keep = ix.compact(4);
        assert_eq!(keep.into_iter().collect::<Vec<_>>(), vec![r(3)]);
        assert_eq!(ix.get(b"a", 4).unwrap().modified, r(3));
        assert_eq!(ix.get(b"a", 5), None);
        let keep = ix.compact(5);
        assert!(keep.is_empty());
        assert!(ix.is_empty());
    }

    #[test]
    fn ranges() {
        let mut ix = KeyIndex::new();
        for (i, k) in [b"a", b"b", b"c", b"d"].iter().enumerate() {
            ix.put(*k, r(i as i64 + 2));
        }
        let collect = |range| {
            let mut out = Vec::new();
            ix.range(range, 10, |k, _| {
                out.push(k.to_vec());
                true
            });
            out
        };
        assert_eq!(
            collect(KeyRange::new(b"b", b"d")),
            vec![b"b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(collect(KeyRange::new(b"c", b"\0")).len(), 2);
        assert_eq!(collect(KeyRange::new(b"d", b"a")).len(), 0);
        assert_eq!(collect(KeyRange::new(b"z", b"")).len(), 0);
        assert_eq!(collect(KeyRange::new(b"\0", b"\0")).len(), 4);
    }
}
