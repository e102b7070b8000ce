//! A member's recent figures, sampled every second, so the dashboard draws revision and db
//! size over time from the moment it opens (the last ten minutes), not only from then on.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// Samples kept: ten minutes at one per second.
pub const SAMPLES: usize = 600;

/// How often a sample is taken.
pub const EVERY: Duration = Duration::from_secs(1);

/// One sample.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Sample {
    /// When, in ms since the Unix epoch.
    pub t: u64,
    /// The store revision.
    pub revision: i64,
    /// The database size in bytes.
    pub db_size: i64,
    /// Leases granted and not revoked.
    pub leases: usize,
    /// Watchers open on this member.
    pub watchers: usize,
}

/// The last [`SAMPLES`] samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Adds a sample, dropping the oldest beyond [`SAMPLES`].
    pub fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Every sample kept, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.iter().copied().collect()
    }
}

/// Samples `node` into `history` every [`EVERY`] until `stop`.
pub async fn sample(node: Arc<Node>, history: Arc<History>, stop: CancellationToken) {
    loop {
        // Cheap figures only: this runs every second on every member.
        let (leases, _) = node.store.lease_counts();
        history.push(Sample {
            t: super::now_ms(),
            revision: node.store.revision(),
            db_size: node.store.db_size(),
            leases,
            watchers: node.store.watch_hub().watcher_count(),
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_samples_in_order() {
        let h = History::default();
        for t in 0..(SAMPLES as u64 + 5) {
            h.push(Sample {
                t,
                revision: t as i64,
                db_size: 0,
                leases: 0,
                watchers: 0,
            });
        }
        let kept = h.samples();
        assert_eq!(kept.len(), SAMPLES);
        assert_eq!(kept[0].t, 5);
        assert_eq!(kept.last().map(|s| s.t), Some(SAMPLES as u64 + 4));
    }
}
