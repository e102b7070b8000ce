//! Learning the fate of a forwarded write whose answer was lost.
//!
//! A follower forwards a client's write to the leader. When the leader dies, or the
//! connection breaks, after the write was sent, no answer comes, and the write may or may
//! not commit. Reporting "request timed out" (as etcd does) leaves the client unsure whether
//! its lock, its queue claim or its put happened. We find out instead:
//!
//! * The leader appends a forwarded write only while it still is the leader the follower
//!   meant (openraft's conditional write, [`openraft::raft::WriteRequest::with_leader`]).
//!   So the write, if it is anywhere in the log, is in an entry of that leader.
//! * Leader ids never decrease along the log. Once this member has applied an entry of a
//!   later leader, every entry of the meant leader that will ever be committed is applied
//!   already.
//! * The follower registers the write before sending it ([`Outstanding::watch`]); its state
//!   machine reports every applied entry of the meant leader with the same bytes (the
//!   command carries an id unique to this member's process, so equal bytes are this very
//!   write). So the follower either sees its write applied, with the outcome its own apply
//!   produced, or sees a later leader's entry applied without it: then the write is lost for
//!   good and is proposed again.
//! * A snapshot installed meanwhile applies entries wholesale, unseen: the outcome then stays
//!   unknown, as before.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::oneshot;

use super::types::LeaderId;

/// A command's fingerprint: a hash of its bytes (any fixed seed; members need not agree).
pub(crate) fn fingerprint(command: &[u8]) -> u64 {
    foldhash::quality::FixedState::with_seed(0x6b76_7265_736f_6c76).hash_one(command)
}

/// One registered write.
struct Waiter {
    /// Tells registrations with the same fingerprint apart when one ends.
    serial: u64,
    leader: LeaderId,
    len: usize,
    /// The applier's response, once an entry of `leader` with these bytes is applied.
    applied: oneshot::Sender<Vec<u8>>,
}

/// The forwarded writes this member waits on, by fingerprint.
#[derive(Default)]
pub(crate) struct Outstanding {
    waiting: Mutex<HashMap<u64, Vec<Waiter>>>,
    /// Whether anything is registered: the apply path reads this and skips fingerprinting
    /// when nothing is.
    any: AtomicBool,
    serials: AtomicU64,
    /// Snapshots installed since the member started.
    installs: AtomicU64,
}

impl Outstanding {
    /// Registers `command`, about to be forwarded to `leader`; the registration lasts as long
    /// as the returned [`Watch`].
    pub(crate) fn watch(&self, command: &[u8], leader: LeaderId) -> Watch<'_> {
        let (tx, rx) = oneshot::channel();
        let print = fingerprint(command);
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        let mut waiting = self.lock();
        waiting.entry(print).or_default().push(Waiter {
            serial,
            leader,
            len: command.len(),
            applied: tx,
        });
        self.any.store(true, Ordering::SeqCst);
        Watch {
            registry: self,
            print,
            serial,
            installs: self.installs.load(Ordering::SeqCst),
            leader,
            applied: rx,
        }
    }

    /// Whether any write is registered. Read by the state machine before it takes a batch
    /// off the log: a write is registered before it is sent, so before its entry exists.
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::SeqCst)
    }

    /// Reports applied entries: (fingerprint, length, leader that appended it, response).
    pub(crate) fn applied<'a>(
        &self,
        entries: impl IntoIterator<Item = (u64, usize, LeaderId, &'a [u8])>,
    ) {
        let mut waiting = self.lock();
        for (print, len, leader, response) in entries {
            let Some(list) = waiting.get_mut(&print) else {
                continue;
            };
            if let Some(at) = list.iter().position(|w| w.leader == leader && w.len == len) {
                let waiter = list.swap_remove(at);
                let _ = waiter.applied.send(response.to_vec());
            }
            if list.is_empty() {
                waiting.remove(&print);
            }
        }
        self.any.store(!waiting.is_empty(), Ordering::SeqCst);
    }

    /// Notes that a snapshot is being installed: entries in it are applied unseen.
    pub(crate) fn snapshot_installed(&self) {
        self.installs.fetch_add(1, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<Waiter>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One forwarded write's registration in [`Outstanding`].
pub(crate) struct Watch<'a> {
    registry: &'a Outstanding,
    print: u64,
    serial: u64,
    /// Snapshots installed before the registration.
    installs: u64,
    /// The leader the write was sent to.
    pub leader: LeaderId,
    /// The applier's response, if this member applies the write.
    pub applied: oneshot::Receiver<Vec<u8>>,
}

impl Watch<'_> {
    /// Whether a snapshot was installed since the registration, so that the write may have
    /// been applied unseen.
    pub(crate) fn missed_any(&self) -> bool {
        self.registry.installs.load(Ordering::SeqCst) != self.installs
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut waiting = self.registry.lock();
        if let Some(list) = waiting.get_mut(&self.print) {
            list.retain(|w| w.serial != self.serial);
            if list.is_empty() {
                waiting.remove(&self.print);
            }
        }
        self.registry
            .any
            .store(!waiting.is_empty(), Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(term: u64, node_id: u64) -> LeaderId {
        LeaderId { term, node_id }
    }

    #[test]
    fn a_write_hears_of_its_own_entry_only() {
        let registry = Outstanding::default();
        assert!(!registry.any());
        let mut watch = registry.watch(b"put a", leader(3, 1));
        assert!(registry.any());
        let print = fingerprint(b"put a");
        // Same bytes appended by another leader: not this write (the leader refuses a write
        // meant for another, so it cannot be there).
        registry.applied([(print, 5, leader(4, 2), &b"other"[..])]);
        assert!(watch.applied.try_recv().is_err());
        registry.applied([(fingerprint(b"put b"), 5, leader(3, 1), &b"other"[..])]);
        assert!(watch.applied.try_recv().is_err());
        registry.applied([(print, 5, leader(3, 1), &b"ok"[..])]);
        assert_eq!(watch.applied.try_recv(), Ok(b"ok".to_vec()));
        assert!(!registry.any());
        drop(watch);
        assert!(!registry.any());
    }

    #[test]
    fn ending_one_registration_leaves_an_identical_one() {
        let registry = Outstanding::default();
        let first = registry.watch(b"put a", leader(3, 1));
        let mut second = registry.watch(b"put a", leader(3, 1));
        drop(first);
        assert!(registry.any());
        registry.applied([(fingerprint(b"put a"), 5, leader(3, 1), &b"ok"[..])]);
        assert_eq!(second.applied.try_recv(), Ok(b"ok".to_vec()));
    }

    #[test]
    fn a_snapshot_installed_meanwhile_is_noticed() {
        let registry = Outstanding::default();
        let watch = registry.watch(b"put a", leader(3, 1));
        assert!(!watch.missed_any());
        registry.snapshot_installed();
        assert!(watch.missed_any());
        assert!(!registry.watch(b"put b", leader(3, 1)).missed_any());
    }
}
