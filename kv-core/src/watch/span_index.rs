//! Which watchers a key hits: single-key watchers by exact key, range watchers in a map of
//! elementary segments. The boundaries of every registered range cut the key space into
//! segments; each segment holds the set of ranges that cover it whole, so "who watches key K"
//! is one ordered-map lookup (the segment containing K) plus the hits, however many watchers
//! there are.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

/// What one watcher watches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Span {
    /// One key.
    Key(Vec<u8>),
    /// Keys from `start` (inclusive) to `end` (exclusive); `None`: to the end of the key space.
    Range {
        /// First key.
        start: Vec<u8>,
        /// First key past the range, if bounded.
        end: Option<Vec<u8>>,
    },
}

impl Span {
    /// True when `key` is in the span.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            Span::Key(k) => k == key,
            Span::Range { start, end } => {
                key >= start.as_slice() && end.as_ref().is_none_or(|e| key < e.as_slice())
            }
        }
    }

    /// The smallest key in the span.
    pub fn start(&self) -> &[u8] {
        match self {
            Span::Key(k) => k,
            Span::Range { start, .. } => start,
        }
    }
}

/// Watcher ids by the keys they watch.
#[derive(Debug, Default)]
pub struct SpanIndex {
    /// Watchers of one key; usually one or a few, so a vector beats a set in memory.
    keys: HashMap<Vec<u8>, Vec<u64>>,
    /// Segment start -> ranges covering `[start, next start)`. The first boundary is always
    /// the empty key once any range is present.
    segments: BTreeMap<Vec<u8>, BTreeSet<u64>>,
}

impl SpanIndex {
    /// Adds watcher `id` over `span`.
    pub fn insert(&mut self, id: u64, span: &Span) {
        match span {
            Span::Key(k) => {
                let ids = self.keys.entry(k.clone()).or_default();
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Span::Range { start, end } => {
                self.split_at(start);
                if let Some(e) = end {
                    self.split_at(e);
                }
                for (_, set) in self.segments_of(start, end.as_deref()) {
                    set.insert(id);
                }
            }
        }
    }

    /// Removes watcher `id` over `span` (the span it was inserted with).
    pub fn remove(&mut self, id: u64, span: &Span) {
        match span {
            Span::Key(k) => {
                if let Some(ids) = self.keys.get_mut(k) {
                    ids.retain(|w| *w != id);
                    if ids.is_empty() {
                        self.keys.remove(k);
                    }
                }
            }
            Span::Range { start, end } => {
                for (_, set) in self.segments_of(start, end.as_deref()) {
                    set.remove(&id);
                }
                // Merge segments that became equal to their left neighbour, so the map does
                // not keep boundaries of ranges that are gone.
                self.merge_at(start);
                if let Some(e) = end {
                    self.merge_at(e);
                }
                if self.segments.len() == 1 && self.segments.values().all(BTreeSet::is_empty) {
                    self.segments.clear();
                }
            }
        }
    }

    /// Calls `hit` for every watcher whose span contains `key`.
    pub fn hits(&self, key: &[u8], mut hit: impl FnMut(u64)) {
        if let Some(set) = self.keys.get(key) {
            set.iter().for_each(|id| hit(*id));
        }
        if let Some((_, set)) = self
            .segments
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
        {
            set.iter().for_each(|id| hit(*id));
        }
    }

    /// Number of boundaries in the segment map (for tests: it shrinks back on removal).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Number of distinct watched single keys.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn split_at(&mut self, at: &[u8]) {
        if self.segments.is_empty() {
            self.segments.insert(Vec::new(), BTreeSet::new());
        }
        if self.segments.contains_key(at) {
            return;
        }
        let covering = self
            .segments
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(at)))
            .next_back()
            .map(|(_, set)| set.clone())
            .unwrap_or_default();
        self.segments.insert(at.to_vec(), covering);
    }

    fn merge_at(&mut self, at: &[u8]) {
        if at.is_empty() {
            return;
        }
        let Some(set) = self.segments.get(at) else {
            return;
        };
        let left = self
            .segments
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(at)))
            .next_back()
            .map(|(_, s)| s);
        if left == Some(set) {
            self.segments.remove(at);
        }
    }

    fn segments_of<'a>(
        &'a mut self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a mut BTreeSet<u64>)> {
        let upper = match end {
            Some(e) => Bound::Excluded(e.to_vec()),
            None => Bound::Unbounded,
        };
        self.segments
            .range_mut((Bound::Included(start.to_vec()), upper))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(start: &[u8], end: Option<&[u8]>) -> Span {
        Span::Range {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
        }
    }

    fn hits(index: &SpanIndex, key: &[u8]) -> Vec<u64> {
        let mut out = Vec::new();
        index.hits(key, |id| out.push(id));
        out.sort();
        out
    }

    #[test]
    fn keys_ranges_prefixes_and_open_ends() {
        let mut ix = SpanIndex::default();
        ix.insert(1, &Span::Key(b"b".to_vec()));
        ix.insert(2, &range(b"a", Some(b"c")));
        ix.insert(3, &range(b"b", None));
        ix.insert(4, &range(b"", None));
        assert_eq!(hits(&ix, b""), vec![4]);
        assert_eq!(hits(&ix, b"a"), vec![2, 4]);
        assert_eq!(hits(&ix, b"b"), vec![1, 2, 3, 4]);
        assert_eq!(hits(&ix, b"bz"), vec![2, 3, 4]);
        assert_eq!(hits(&ix, b"c"), vec![3, 4]);
        ix.remove(2, &range(b"a", Some(b"c")));
        ix.remove(3, &range(b"b", None));
        assert_eq!(hits(&ix, b"b"), vec![1, 4]);
        assert_eq!(ix.segment_count(), 1);
        ix.remove(4, &range(b"", None));
        ix.remove(1, &Span::Key(b"b".to_vec()));
        assert_eq!((ix.segment_count(), ix.key_count()), (0, 0));
    }

    proptest! {
        /// The index answers exactly what checking every span would.
        #[test]
        fn matches_a_scan(
            ops in proptest::collection::vec((any::<bool>(), 0u64..12, 0u8..6, 0u8..7, 0u8..3), 1..80),
            probes in proptest::collection::vec(0u8..7, 1..10),
        ) {
            let key = |b: u8| vec![b'a' + b];
            let mut ix = SpanIndex::default();
            let mut live: BTreeMap<u64, Span> = BTreeMap::new();
            for (add, id, a, b, kind) in ops {
                if add && !live.contains_key(&id) {
                    let span = match kind {
                        0 => Span::Key(key(a)),
                        1 if b > a => range(&key(a), Some(&key(b))),
                        _ => range(&key(a), None),
                    };
                    ix.insert(id, &span);
                    live.insert(id, span);
                } else if let Some(span) = live.remove(&id) {
                    ix.remove(id, &span);
                }
                for p in &probes {
                    let k = key(*p);
                    let want: Vec<u64> = live
                        .iter()
                        .filter(|(_, s)| s.contains(&k))
                        .map(|(id, _)| *id)
                        .collect();
                    prop_assert_eq!(hits(&ix, &k), want);
                }
            }
            for (id, span) in std::mem::take(&mut live) {
                ix.remove(id, &span);
            }
            prop_assert_eq!((ix.segment_count(), ix.key_count()), (0, 0));
        }
    }
}
