//! Leases: the replicated lease table and the leader's deadline queue.
//!
//! The table ([`LeaseTable`]) is replicated state: which leases exist, their granted TTL and
//! the keys attached to each. It changes only by applying log entries (grant, revoke, and puts
//! and deletes that attach or detach keys), so every member holds the same table. Only the
//! granted TTL is stored; attachments are derived from the keys' own `lease` field.
//!
//! Remaining time is not replicated: only the leader keeps it, in [`Deadlines`], and decides
//! expiry from it. The engine knows no clocks, so `Deadlines` takes every instant from its
//! caller.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::KvError;

/// The largest TTL a lease may be granted, in seconds (etcd's `MaxLeaseTTL`).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// The id meaning "no lease".
pub const NO_LEASE: i64 = 0;

/// One lease of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lease {
    /// The granted TTL in seconds.
    pub ttl: i64,
    /// The attached keys, in key order (so a revoke deletes them in the same order everywhere).
    pub keys: BTreeSet<Arc<[u8]>>,
}

/// The replicated lease table with the key attachments.
///
/// A key's bytes are allocated once and shared by the key-to-lease map and the lease's key
/// set, so a million attached keys cost one copy of each key.
#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    leases: BTreeMap<i64, Lease>,
    /// Every key attached to a lease, with that lease.
    attached: HashMap<Arc<[u8]>, i64>,
    /// Lease ids granted or revoked since the last [`LeaseTable::take_dirty`]: the records the
    /// store must write or delete with the batch.
    dirty: BTreeSet<i64>,
}

impl LeaseTable {
    /// True when `id` is no lease or an existing one (what a put may name).
    pub fn usable(&self, id: i64) -> bool {
        id == NO_LEASE || self.leases.contains_key(&id)
    }

    /// The lease `id`, if it exists.
    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Every key attached to a lease, with its lease, in no particular order.
    pub fn attached(&self) -> impl Iterator<Item = (&[u8], i64)> + '_ {
        self.attached.iter().map(|(key, lease)| (&key[..], *lease))
    }

    /// The lease `key` is attached to (`NO_LEASE`: none).
    pub fn lease_of(&self, key: &[u8]) -> i64 {
        self.attached.get(key).copied().unwrap_or(NO_LEASE)
    }

    /// Every lease as (id, granted TTL), in id order.
    pub fn iter(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.leases.iter().map(|(id, l)| (*id, l.ttl))
    }

    /// Number of leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when there is no lease.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Number of keys attached to some lease.
    pub fn attached_keys(&self) -> usize {
        self.attached.len()
    }

    /// Creates lease `id` with `ttl` seconds, with etcd's checks in etcd's order. The caller
    /// has already chosen a non-zero id and raised the TTL to the cluster's minimum.
    pub fn grant(&mut self, id: i64, ttl: i64) -> Result<(), KvError> {
        if id == NO_LEASE {
            return Err(KvError::LeaseNotFound);
        }
        if ttl > MAX_LEASE_TTL {
            return Err(KvError::LeaseTtlTooLarge);
        }
        if self.leases.contains_key(&id) {
            return Err(KvError::LeaseExists);
        }
        self.leases.insert(
            id,
            Lease {
                ttl,
                keys: BTreeSet::new(),
            },
        );
        self.dirty.insert(id);
        Ok(())
    }

    /// Removes lease `id` and detaches its keys; returns them in key order (the caller deletes
    /// them). `None` if there is no such lease.
    pub fn revoke(&mut self, id: i64) -> Option<Vec<Arc<[u8]>>> {
        let lease = self.leases.remove(&id)?;
        for key in &lease.keys {
            self.attached.remove(key);
        }
        self.dirty.insert(id);
        Some(lease.keys.into_iter().collect())
    }

    /// Records that `key` now belongs to `lease` (`NO_LEASE`: to none), detaching it from the
    /// lease it had. A lease that does not exist is treated as none (restore of old history).
    pub fn set_key_lease(&mut self, key: &[u8], lease: i64) {
        let lease = if self.leases.contains_key(&lease) {
            lease
        } else {
            NO_LEASE
        };
        match self.attached.get_key_value(key) {
            Some((_, &old)) if old == lease => {}
            Some((shared, &old)) => {
                let shared = shared.clone();
                if let Some(l) = self.leases.get_mut(&old) {
                    l.keys.remove(&shared);
                }
                if lease == NO_LEASE {
                    self.attached.remove(&shared);
                } else {
                    self.attach(shared, lease);
                }
            }
            None if lease == NO_LEASE => {}
            None => self.attach(Arc::from(key), lease),
        }
    }

    fn attach(&mut self, key: Arc<[u8]>, lease: i64) {
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.insert(key.clone());
        }
        self.attached.insert(key, lease);
    }

    /// The ids whose records changed since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<i64> {
        std::mem::take(&mut self.dirty)
    }

    /// Adds a lease read back from storage (not marked dirty).
    pub fn restore(&mut self, id: i64, ttl: i64) {
        self.leases.insert(
            id,
            Lease {
                ttl,
                keys: BTreeSet::new(),
            },
        );
    }
}

/// The stored form of a lease record: its granted TTL.
pub fn encode_ttl(ttl: i64) -> Vec<u8> {
    ttl.to_be_bytes().to_vec()
}

/// Reads a record written by [`encode_ttl`].
pub fn decode_ttl(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// What a keep-alive found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease's clock restarted; it lives `ttl` seconds from now.
    Renewed,
    /// The lease's time ran out; its revoke is on the way, so it cannot be renewed.
    Expired,
    /// The queue does not know the lease.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    /// The time ran out and a revoke was (or is being) proposed.
    expired: bool,
}

/// The leader's expiry clock: one deadline per lease, and a min-heap of deadlines so that
/// finding what expired costs O(log n) per expired lease and nothing per idle lease.
///
/// Renewals push a new heap entry instead of moving the old one; an entry counts only while
/// it matches the lease's current deadline, and the heap is rebuilt when stale entries
/// outnumber live ones.
#[derive(Debug, Default)]
pub struct Deadlines {
    current: HashMap<i64, Deadline>,
    queue: BinaryHeap<Reverse<(Instant, i64)>>,
}

impl Deadlines {
    /// Number of leases with a deadline.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// True when no lease has a deadline.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// Forgets every deadline (this member stopped leading).
    pub fn clear(&mut self) {
        self.current.clear();
        self.queue.clear();
    }

    /// Sets lease `id` to expire at `at` (a grant, a renewal, or a new leader's restart).
    pub fn set(&mut self, id: i64, at: Instant) {
        self.current.insert(id, Deadline { at, expired: false });
        self.push(id, at);
    }

    fn push(&mut self, id: i64, at: Instant) {
        self.queue.push(Reverse((at, id)));
        if self.queue.len() > 2 * self.current.len() + 1024 {
            self.queue = self
                .current
                .iter()
                .map(|(id, d)| Reverse((d.at, *id)))
                .collect();
        }
    }

    /// Forgets lease `id` (it was revoked).
    pub fn remove(&mut self, id: i64) {
        self.current.remove(&id);
    }

    /// Restarts the clock of lease `id` at `now` for `ttl` seconds, unless its time already
    /// ran out.
    pub fn renew(&mut self, id: i64, ttl: i64, now: Instant) -> Renewal {
        match self.current.get(&id) {
            None => Renewal::Unknown,
            Some(d) if d.expired || d.at <= now => Renewal::Expired,
            Some(_) => {
                self.set(id, now + ttl_duration(ttl));
                Renewal::Renewed
            }
        }
    }

    /// Time left to lease `id` at `now` (zero once expired); `None` if unknown.
    pub fn remaining(&self, id: i64, now: Instant) -> Option<Duration> {
        self.current.get(&id).map(|d| {
            if d.expired {
                Duration::ZERO
            } else {
                d.at.saturating_duration_since(now)
            }
        })
    }

    /// The earliest pending deadline, if any (stale heap entries are dropped on the way).
    pub fn earliest(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, id))) = self.queue.peek().copied() {
            if self.current.get(&id).is_some_and(|d| d.at == at) {
                return Some(at);
            }
            self.queue.pop();
        }
        None
    }

    /// Takes up to `limit` leases whose deadline is at or before `now`, marks them expired and
    /// gives each a retry deadline `retry` from now: if its revoke does not get through (the
    /// leader lost its quorum, say), it comes back then.
    pub fn pop_expired(&mut self, now: Instant, retry: Duration, limit: usize) -> Vec<i64> {
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(at) = self.earliest() else { break };
            if at > now {
                break;
            }
            let Some(Reverse((_, id))) = self.queue.pop() else {
                break;
            };
            let again = now + retry;
            self.current.insert(
                id,
                Deadline {
                    at: again,
                    expired: true,
                },
            );
            self.queue.push(Reverse((again, id)));
            out.push(id);
        }
        out
    }
}

/// `ttl` seconds as a duration (negative counts as zero).
pub fn ttl_duration(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(t: &LeaseTable, id: i64) -> Vec<Vec<u8>> {
        t.get(id)
            .map(|l| l.keys.iter().map(|k| k.to_vec()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn grant_checks_in_etcds_order() {
        let mut t = LeaseTable::default();
        assert_eq!(t.grant(0, 5), Err(KvError::LeaseNotFound));
        assert_eq!(
            t.grant(1, MAX_LEASE_TTL + 1),
            Err(KvError::LeaseTtlTooLarge)
        );
        assert_eq!(t.grant(1, 5), Ok(()));
        assert_eq!(t.grant(1, 5), Err(KvError::LeaseExists));
        assert_eq!(t.grant(-7, MAX_LEASE_TTL), Ok(()));
        assert_eq!(t.take_dirty().into_iter().collect::<Vec<_>>(), vec![-7, 1]);
        assert!(t.take_dirty().is_empty());
    }

    #[test]
    fn keys_move_between_leases_and_leave_on_revoke() {
        let mut t = LeaseTable::default();
        t.grant(1, 10).unwrap();
        t.grant(2, 10).unwrap();
        t.set_key_lease(b"b", 1);
        t.set_key_lease(b"a", 1);
        t.set_key_lease(b"c", 2);
        assert_eq!(keys(&t, 1), vec![b"a".to_vec(), b"b".to_vec()]);
        t.set_key_lease(b"a", 2);
        assert_eq!(keys(&t, 1), vec![b"b".to_vec()]);
        assert_eq!(keys(&t, 2), vec![b"a".to_vec(), b"c".to_vec()]);
        t.set_key_lease(b"c", NO_LEASE);
        assert_eq!(keys(&t, 2), vec![b"a".to_vec()]);
        // A lease that does not exist attaches nothing.
        t.set_key_lease(b"z", 99);
        assert_eq!(t.attached_keys(), 2);
        let gone = t.revoke(2).unwrap();
        assert_eq!(
            gone.iter().map(|k| k.to_vec()).collect::<Vec<_>>(),
            vec![b"a".to_vec()]
        );
        assert_eq!(t.attached_keys(), 1);
        assert!(t.revoke(2).is_none());
        assert!(t.usable(0) && t.usable(1) && !t.usable(2));
    }

    #[test]
    fn deadlines_expire_in_order_and_renewal_moves_them() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut d = Deadlines::default();
        d.set(1, t0 + 3 * s);
        d.set(2, t0 + s);
        d.set(3, t0 + 2 * s);
        assert_eq!(d.renew(3, 5, t0), Renewal::Renewed);
        assert_eq!(d.earliest(), Some(t0 + s));
        assert_eq!(d.pop_expired(t0 + 3 * s, 10 * s, 100), vec![2, 1]);
        // Expired leases cannot be renewed and report no time left.
        assert_eq!(d.renew(1, 5, t0 + 3 * s), Renewal::Expired);
        assert_eq!(d.remaining(1, t0), Some(Duration::ZERO));
        assert_eq!(d.remaining(3, t0 + s), Some(4 * s));
        assert_eq!(d.renew(9, 5, t0), Renewal::Unknown);
        // The retry deadline brings an unrevoked lease back.
        assert_eq!(d.pop_expired(t0 + 5 * s, 10 * s, 100), vec![3]);
        // Equal deadlines come out in id order, and `limit` bounds one call.
        assert_eq!(d.pop_expired(t0 + 13 * s, 10 * s, 1), vec![1]);
        d.remove(2);
        assert_eq!(d.pop_expired(t0 + 100 * s, 10 * s, 100), vec![3, 1]);
    }

    #[test]
    fn stale_heap_entries_stay_bounded() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        for i in 0..10 {
            d.set(i, t0);
        }
        for round in 0..10_000u64 {
            d.set(round as i64 % 10, t0 + Duration::from_millis(round));
        }
        assert!(d.queue.len() <= 2 * d.len() + 1025);
        assert_eq!(d.len(), 10);
    }
}
