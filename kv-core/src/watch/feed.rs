//! The hand-off of committed changes from apply to the watch hub.
//!
//! Without a feeder thread, apply hands each revision to the hub itself (tests, tools). With
//! one ([`Store::run_watch_feed`](crate::store::Store::run_watch_feed)), apply only queues the
//! batch's events and returns: fanning a revision out to a thousand watchers then overlaps
//! with the next write instead of delaying it. The queue is bounded, so a hub that falls
//! behind slows apply down to its own pace rather than growing without limit. Items keep
//! apply's order, so the hub still sees revisions in order.

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
    /// feeder runs (the caller delivers it itself).
    pub fn offer(&self, item: FeedItem) -> Option<FeedItem> {
        let mut s = self.lock();
        if !s.threaded {
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

    /// The next item for the feeder, waiting for one; `None` once closed and drained (the
    /// feeder then stops and apply delivers inline again).
    pub fn next(&self) -> Option<FeedItem> {
        let mut s = self.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
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
