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
//!   command carries an id drawn from a random start per process, so equal bytes are this
//!   very write). So the follower either sees its write applied, with the outcome its own
//!   apply produced, or sees a later leader's entry applied without it: then the write is
//!   lost for good and is proposed again.
//! * A snapshot installed meanwhile applies entries wholesale, unseen: the outcome then stays
//!   unknown, as before.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::oneshot;

use super::types::LeaderId;

/// A command's fingerprint, to find its registration by: a hash of its bytes (any fixed
/// seed; members need not agree). A match is then checked byte for byte.
fn fingerprint(command: &[u8]) -> u64 {
    foldhash::quality::FixedState::with_seed(0x6b76_7265_736f_6c76).hash_one(command)
}

/// One registered write.
struct Waiter {
    /// Tells registrations with the same fingerprint apart.
    serial: u64,
    leader: LeaderId,
    command: Vec<u8>,
    /// The applier's response, once an entry of `leader` with these bytes is applied.
    applied: oneshot::Sender<Vec<u8>>,
}

/// An applied entry that is a registered write: its position in the batch, and the
/// registration (fingerprint, serial).
pub(crate) type Found = (usize, u64, u64);

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
            command: command.to_vec(),
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

    /// Which of a batch's entries, (position, leader that appended it, command), are
    /// registered writes: the same leader and the same bytes.
    pub(crate) fn find(&self, entries: &[(usize, LeaderId, &[u8])]) -> Vec<Found> {
        let prints: Vec<u64> = entries.iter().map(|(_, _, c)| fingerprint(c)).collect();
        let waiting = self.lock();
        entries
            .iter()
            .zip(prints)
            .filter_map(|(&(at, leader, command), print)| {
                let list = waiting.get(&print)?;
                let waiter = list
                    .iter()
                    .find(|w| w.leader == leader && w.command == command)?;
                Some((at, print, waiter.serial))
            })
            .collect()
    }

    /// Hands the registrations [`find`](Self::find) found their responses (`response_at`
    /// of each position).
    pub(crate) fn applied<'a>(&self, found: &[Found], response_at: impl Fn(usize) -> &'a [u8]) {
        let mut waiting = self.lock();
        for &(at, print, serial) in found {
            let Some(list) = waiting.get_mut(&print) else {
                continue;
            };
            if let Some(i) = list.iter().position(|w| w.serial == serial) {
                let waiter = list.swap_remove(i);
                let _ = waiter.applied.send(response_at(at).to_vec());
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

    /// Runs one applied batch through the registry as the state machine does; each entry's
    /// response is its position.
    fn apply(registry: &Outstanding, batch: &[(LeaderId, &[u8])]) {
        let entries: Vec<_> = batch
            .iter()
            .enumerate()
            .map(|(at, &(leader, command))| (at, leader, command))
            .collect();
        let found = registry.find(&entries);
        let responses: Vec<Vec<u8>> = (0..batch.len()).map(|at| vec![at as u8]).collect();
        registry.applied(&found, |at| &responses[at]);
    }

    #[test]
    fn a_write_hears_of_its_own_entry_only() {
        let registry = Outstanding::default();
        assert!(!registry.any());
        let mut watch = registry.watch(b"put a", leader(3, 1));
        assert!(registry.any());
        // The same bytes appended by another leader cannot be this write (the leader refuses
        // a write meant for another); other bytes of the meant leader are other writes.
        apply(
            &registry,
            &[(leader(4, 2), b"put a"), (leader(3, 1), b"put b")],
        );
        assert!(watch.applied.try_recv().is_err());
        apply(
            &registry,
            &[(leader(3, 1), b"put c"), (leader(3, 1), b"put a")],
        );
        assert_eq!(watch.applied.try_recv(), Ok(vec![1]));
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
        apply(&registry, &[(leader(3, 1), b"put a")]);
        assert_eq!(second.applied.try_recv(), Ok(vec![0]));
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
