//! The hand-off of committed changes from apply to the watch hub.
//!
//! Without a feeder thread, apply hands each revision to the hub itself (tests, tools). With
//! one ([`Store::run_watch_feed`](crate::store::Store::run_watch_feed)), apply only queues the
//! batch's events and returns: fanning a revision out to a thousand watchers then overlaps
//! with the next write instead of delaying it. The queue is bounded, so a hub that falls
//! behind slows apply down to its own pace rather than growing without limit. Items keep
//! apply's order, so the hub still sees revisions in order.
//!
//! When the feeder is idle (nothing queued, nothing being delivered) and the caller says the
//! delivery is cheap (few watchers), apply delivers inline after all: waking the feeder
//! thread for every write cost two context switches per put, more than the delivery itself.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::proto::mvccpb::Event;

/// Batches queued for the feeder before apply waits.
pub const FEED_MAX_BATCHES: usize = 1024;

/// What apply hands to the hub.
#[derive(Debug)]
pub(crate) enum FeedItem {
    /// One apply batch's events, in order.
    Events(Vec<Event>),
    /// The state was replaced by a snapshot at this revision.
    Resync(i64),
}

#[derive(Debug, Default)]
struct FeedState {
    items: VecDeque<FeedItem>,
    /// The feeder took an item and has not finished delivering it.
    delivering: bool,
    threaded: bool,
    closed: bool,
}

/// The queue between apply and the feeder thread.
#[derive(Debug, Default)]
pub(crate) struct Feed {
    state: Mutex<FeedState>,
    changed: Condvar,
}

impl Feed {
    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` for the feeder, waiting while the queue is full; gives it back when no
    /// feeder runs, or when the feeder is idle and `cheap()` says delivery costs little (the
    /// caller then delivers it itself, before offering anything else, so order holds).
    /// `cheap` is asked only then: it may look at the hub, which a busy feeder holds.
    pub fn offer(&self, item: FeedItem, cheap: impl FnOnce() -> bool) -> Option<FeedItem> {
        let mut s = self.lock();
        if !s.threaded || (s.items.is_empty() && !s.delivering && cheap()) {
            return Some(item);
        }
        while s.items.len() >= FEED_MAX_BATCHES && !s.closed {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.closed {
            return Some(item);
        }
        s.items.push_back(item);
        self.changed.notify_all();
        None
    }

    /// Marks a feeder as running; false if one already is.
    pub fn start(&self) -> bool {
        let mut s = self.lock();
        if s.threaded && !s.closed {
            return false;
        }
        s.threaded = true;
        s.closed = false;
        true
    }

    /// Whether the queue has room to spare, so an offer now will not wait.
    pub fn has_room(&self) -> bool {
        self.lock().items.len() < FEED_MAX_BATCHES / 2
    }

    /// The next item for the feeder, waiting for one; `None` once closed and drained (the
    /// feeder then stops and apply delivers inline again). The item counts as being
    /// delivered until the feeder asks for the next one.
    pub fn next(&self) -> Option<FeedItem> {
        let mut s = self.lock();
        s.delivering = false;
        loop {
            if let Some(item) = s.items.pop_front() {
                s.delivering = true;
                self.changed.notify_all();
                return Some(item);
            }
            if s.closed {
                s.threaded = false;
                return None;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether a feeder runs.
    pub fn is_threaded(&self) -> bool {
        self.lock().threaded
    }

    /// Asks the feeder to stop once the queue is drained.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> FeedItem {
        FeedItem::Events(Vec::new())
    }

    #[test]
    fn cheap_items_skip_an_idle_feeder_but_never_overtake_queued_ones() {
        let feed = Feed::default();
        assert!(
            feed.offer(item(), || false).is_some(),
            "no feeder: given back"
        );
        assert!(feed.start());
        assert!(
            feed.offer(item(), || true).is_some(),
            "idle feeder: given back"
        );
        assert!(feed.offer(item(), || false).is_none(), "not cheap: queued");
        assert!(
            feed.offer(item(), || true).is_none(),
            "cheap, but an item is queued: queued behind it"
        );
        // A busy feeder holds the hub, so whether delivery is cheap is not even asked.
        assert!(
            feed.offer(item(), || panic!("asked while the feeder is busy"))
                .is_none()
        );
        assert!(feed.next().is_some());
        assert!(feed.next().is_some());
        assert!(
            feed.offer(item(), || true).is_none(),
            "still one queued and one being delivered"
        );
        assert!(feed.next().is_some());
        assert!(feed.next().is_some());
        assert!(
            feed.offer(item(), || true).is_none(),
            "the last item taken may still be in delivery"
        );
        feed.close();
        assert!(feed.next().is_some());
        assert!(feed.next().is_none(), "closed and drained");
        assert!(
            feed.offer(item(), || true).is_some(),
            "feeder gone: given back"
        );
    }
}
