//! One revision's events for every synced watcher of one stream, built once.
//!
//! A write under a prefix watched a thousand times used to become a thousand responses, each
//! with its own event vector, and a thousand queue pushes. A [`Fanout`] is one queue item per
//! stream and revision instead: the events are shared, and each watcher is a few bytes naming
//! which of them it takes. The stream's sender turns it into responses only when it drains
//! its queue, merged with the same watchers' later revisions, so one allocation serves every
//! revision a watcher gets in that message.

use std::sync::Arc;

use crate::proto::etcdserverpb::{ResponseHeader, WatchResponse};
use crate::proto::mvccpb::Event;

/// One watcher's share of a [`Fanout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutWatcher {
    /// The id the client knows.
    pub watch_id: i64,
    /// The watcher asked for large responses to be split.
    pub fragment: bool,
    /// Its events are taken from [`Fanout::with_prev`] rather than [`Fanout::events`].
    pub prev_kv: bool,
    /// Where its event indices start in [`Fanout::picks`]...
    start: u32,
    /// ...and how many there are.
    len: u32,
}

/// One revision's events for the synced watchers of one stream they hit.
#[derive(Debug, Clone, Default)]
pub struct Fanout {
    /// The revision.
    pub revision: i64,
    /// The revision's events, as stored (no previous values); shared by all streams.
    pub events: Arc<[Event]>,
    /// Events with their previous value attached, for `prev_kv` watchers; shared likewise.
    pub with_prev: Arc<[Event]>,
    /// The watchers, in the hub's order.
    pub watchers: Vec<FanoutWatcher>,
    /// Every watcher's event indices, one run after another.
    picks: Vec<u32>,
}

impl Fanout {
    /// An empty fan-out of `revision` over shared `events` and `with_prev`.
    pub fn new(revision: i64, events: Arc<[Event]>, with_prev: Arc<[Event]>) -> Self {
        Self {
            revision,
            events,
            with_prev,
            watchers: Vec::new(),
            picks: Vec::new(),
        }
    }

    /// Adds a watcher taking the events at `picks` (indices into `events`, or into
    /// `with_prev` when `prev_kv`).
    pub fn push(
        &mut self,
        watch_id: i64,
        fragment: bool,
        prev_kv: bool,
        picks: impl IntoIterator<Item = u32>,
    ) {
        let start = self.picks.len();
        self.picks.extend(picks);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        self.watchers.push(FanoutWatcher {
            watch_id,
            fragment,
            prev_kv,
            start: count(start),
            len: count(self.picks.len() - start),
        });
    }

    /// The events of `watcher`, in revision order.
    pub fn events_of<'a>(&'a self, watcher: &FanoutWatcher) -> impl Iterator<Item = &'a Event> {
        let from = self.list_of(watcher);
        self.picks_of(watcher)
            .iter()
            .filter_map(move |&i| from.get(i as usize))
    }

    /// The list `watcher` takes its events from: [`Fanout::with_prev`] or [`Fanout::events`].
    pub fn list_of(&self, watcher: &FanoutWatcher) -> &Arc<[Event]> {
        if watcher.prev_kv {
            &self.with_prev
        } else {
            &self.events
        }
    }

    /// The indices into [`Fanout::list_of`] of `watcher`'s events, in revision order (not
    /// necessarily ascending: `with_prev` is filled in the order watchers first ask).
    pub fn picks_of(&self, watcher: &FanoutWatcher) -> &[u32] {
        let start = watcher.start as usize;
        let end = start + watcher.len as usize;
        self.picks.get(start..end).unwrap_or_default()
    }

    /// The response `watcher` gets for this revision alone.
    pub fn response(&self, watcher: &FanoutWatcher) -> WatchResponse {
        WatchResponse {
            header: Some(ResponseHeader {
                revision: self.revision,
                ..Default::default()
            }),
            watch_id: watcher.watch_id,
            events: self.events_of(watcher).cloned().collect(),
            ..Default::default()
        }
    }

    /// How many responses this stands for: what it weighs in a stream's bounded queue.
    pub fn weight(&self) -> usize {
        self.watchers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mvccpb::KeyValue;

    fn event(key: &str, prev: Option<&str>) -> Event {
        Event {
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec().into(),
                mod_revision: 7,
                ..Default::default()
            }),
            prev_kv: prev.map(|p| KeyValue {
                key: p.as_bytes().to_vec().into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn each_watcher_gets_its_picks_from_the_right_list() {
        let events: Arc<[Event]> = vec![event("a", None), event("b", None)].into();
        let with_prev: Arc<[Event]> = vec![event("b", Some("old b"))].into();
        let mut f = Fanout::new(7, events, with_prev);
        f.push(1, false, false, [0, 1]);
        f.push(2, true, true, [0]);
        f.push(3, false, false, [1]);
        assert_eq!(f.weight(), 3);
        let keys = |r: &WatchResponse| -> Vec<Vec<u8>> {
            r.events
                .iter()
                .map(|e| e.kv.as_ref().unwrap().key.to_vec())
                .collect()
        };
        let r1 = f.response(&f.watchers[0]);
        assert_eq!(keys(&r1), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(r1.header.unwrap().revision, 7);
        assert_eq!(r1.watch_id, 1);
        let r2 = f.response(&f.watchers[1]);
        assert_eq!(keys(&r2), vec![b"b".to_vec()]);
        assert!(r2.events[0].prev_kv.is_some());
        assert!(f.watchers[1].fragment);
        assert_eq!(keys(&f.response(&f.watchers[2])), vec![b"b".to_vec()]);
    }
}
