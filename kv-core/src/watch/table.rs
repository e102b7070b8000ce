//! The hub's watchers by key, in a vector rather than a hash map.
//!
//! A revision under a prefix watched a thousand times visits a thousand watchers. In a hash
//! map each visit was a miss at a random place: loading the key to compare and then the
//! watcher's `next_rev` were three quarters of `WatchHub::notify`'s own time under
//! `watch-fanout`. Here a key's high half is its slot, and the hub visits the watchers a
//! revision hits sorted by key, so in memory order, which the CPU prefetches.

use std::collections::BTreeSet;

/// Values by `u64` key. A key is its slot's index (high 32 bits) and a count of inserts (low
/// 32 bits), so a key kept while the hub's lock is released (a catch-up read) does not name a
/// later value put in the same slot. Freed slots are reused lowest first, which keeps the
/// table dense and lets trailing free slots be given back.
#[derive(Debug)]
pub(super) struct WatcherTable<T> {
    slots: Vec<Option<(u32, T)>>,
    free: BTreeSet<u32>,
    len: usize,
    inserts: u32,
}

impl<T> Default for WatcherTable<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: BTreeSet::new(),
            len: 0,
            inserts: 0,
        }
    }
}

/// A key's slot index and insert count.
fn split(key: u64) -> (usize, u32) {
    ((key >> 32) as usize, key as u32)
}

/// The key of slot `index` holding the value of insert `count`: [`split`]'s inverse.
fn join(index: usize, count: u32) -> u64 {
    ((index as u64) << 32) | u64::from(count)
}

impl<T> WatcherTable<T> {
    /// The key the next [`Self::insert`] returns: the hub files it in its other indexes
    /// before the watcher is built.
    pub fn next_key(&self) -> u64 {
        let index = match self.free.first() {
            Some(&i) => i as usize,
            None => self.slots.len(),
        };
        join(index, self.inserts.wrapping_add(1))
    }

    /// Stores `value` under [`Self::next_key`], which it returns.
    pub fn insert(&mut self, value: T) -> u64 {
        let key = self.next_key();
        let (index, count) = split(key);
        self.inserts = count;
        if index == self.slots.len() {
            self.slots.push(Some((count, value)));
        } else {
            self.free.remove(&(index as u32));
            self.slots[index] = Some((count, value));
        }
        self.len += 1;
        key
    }

    /// The value under `key`.
    pub fn get(&self, key: &u64) -> Option<&T> {
        let (index, count) = split(*key);
        match self.slots.get(index) {
            Some(Some((c, v))) if *c == count => Some(v),
            _ => None,
        }
    }

    /// The value under `key`, to change.
    pub fn get_mut(&mut self, key: &u64) -> Option<&mut T> {
        let (index, count) = split(*key);
        match self.slots.get_mut(index) {
            Some(Some((c, v))) if *c == count => Some(v),
            _ => None,
        }
    }

    /// Takes the value under `key` out.
    pub fn remove(&mut self, key: &u64) -> Option<T> {
        self.get(key)?;
        let (index, _) = split(*key);
        let (_, value) = self.slots.get_mut(index)?.take()?;
        self.free.insert(index as u32);
        self.len -= 1;
        Some(value)
    }

    /// Every key, in slot order.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// Every key and value, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| slot.as_ref().map(|(count, v)| (join(i, *count), v)))
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gives back the free slots at the end, and the vector's spare room once it is mostly
    /// empty.
    pub fn shrink(&mut self) {
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
        self.free.split_off(&(self.slots.len() as u32));
        if self.slots.capacity() > 64 && self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to_fit();
        }
    }

    /// Slots held, free or not (for tests of the reuse).
    #[cfg(test)]
    pub fn slots(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_its_value_until_removed_and_never_a_later_one() {
        let mut t = WatcherTable::default();
        let a = t.insert("a");
        let b = t.insert("b");
        assert_eq!((t.get(&a), t.get(&b), t.len()), (Some(&"a"), Some(&"b"), 2));
        assert_eq!(t.remove(&a), Some("a"));
        assert_eq!(t.remove(&a), None);
        assert_eq!((t.get(&a), t.len()), (None, 1));
        // The freed slot is reused, under a new key: the old one stays dead.
        assert_eq!(t.next_key() >> 32, a >> 32);
        let c = t.insert("c");
        assert_eq!(c >> 32, a >> 32);
        assert_ne!(c, a);
        assert_eq!((t.get(&a), t.get(&c)), (None, Some(&"c")));
        assert!(t.get_mut(&a).is_none());
        *t.get_mut(&c).unwrap() = "c2";
        assert_eq!(t.get(&c), Some(&"c2"));
        assert_eq!(t.get(&(u64::MAX)), None, "a slot past the end is nobody");
    }

    #[test]
    fn keys_come_in_slot_order_and_free_slots_are_reused_lowest_first() {
        let mut t = WatcherTable::default();
        let keys: Vec<u64> = (0..6).map(|i| t.insert(i)).collect();
        t.remove(&keys[4]);
        t.remove(&keys[1]);
        let again = t.insert(10);
        assert_eq!(again >> 32, 1, "the lowest free slot");
        let listed: Vec<u64> = t.keys().collect();
        let mut sorted = listed.clone();
        sorted.sort_unstable();
        assert_eq!(listed, sorted, "slot order is key order");
        let values: Vec<i32> = t.iter().map(|(_, v)| *v).collect();
        assert_eq!(values, vec![0, 10, 2, 3, 5]);
    }

    #[test]
    fn shrinking_gives_back_trailing_free_slots_only() {
        let mut t = WatcherTable::default();
        let keys: Vec<u64> = (0..200).map(|i| t.insert(i)).collect();
        for k in &keys[1..] {
            t.remove(k);
        }
        t.remove(&keys[0]);
        let kept = t.insert(-1);
        t.shrink();
        assert_eq!((t.slots(), t.len()), (1, 1));
        assert_eq!(t.get(&kept), Some(&-1));
        // Slots given back are not handed out from the free list any more.
        let next = t.insert(7);
        assert_eq!(next >> 32, 1);
        assert_eq!(t.slots(), 2);
    }
}
