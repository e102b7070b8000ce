//! Auto-compaction (`--auto-compaction-mode`/`--auto-compaction-retention`): a background task
//! that proposes Compaction requests through Raft like any client would.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::proto::etcdserverpb::CompactionRequest;
use kv_core::proto::kvserverpb::internal_request::Request;
use tokio_util::sync::CancellationToken;

use crate::config::Retention;
use crate::node::Node;

/// How often revision-mode compaction runs (etcd: every 5 minutes).
pub const REVISION_MODE_INTERVAL: Duration = Duration::from_secs(300);
/// Shortest sampling step of periodic mode.
pub const MIN_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Picks the revision a periodic compaction may compact to: the newest sample at least
/// `retention` old. Drops samples that are no longer needed.
fn periodic_target(
    samples: &mut VecDeque<(Instant, i64)>,
    now: Instant,
    retention: Duration,
) -> Option<i64> {
    let mut target = None;
    while let Some(&(at, rev)) = samples.front() {
        if now.duration_since(at) >= retention {
            target = Some(rev);
            samples.pop_front();
        } else {
            break;
        }
    }
    target
}

/// Runs until `cancel` fires.
pub async fn run(node: Arc<Node>, retention: Retention, cancel: CancellationToken) {
    let (interval, period) = match retention {
        Retention::Off => return,
        Retention::Period(d) => ((d / 10).max(MIN_SAMPLE_INTERVAL), Some(d)),
        Retention::Revisions(_) => (REVISION_MODE_INTERVAL, None),
    };
    let mut samples = VecDeque::new();
    let mut last = 0i64;
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let current = node.store.revision();
        let target = match (retention, period) {
            (Retention::Revisions(keep), _) => Some(current - keep),
            (_, Some(d)) => {
                samples.push_back((Instant::now(), current));
                periodic_target(&mut samples, Instant::now(), d)
            }
            _ => None,
        };
        let Some(target) = target.filter(|&t| t > last && t > 0) else {
            continue;
        };
        let req = CompactionRequest {
            revision: target,
            physical: false,
        };
        match node.propose(Request::Compaction(req)).await {
            Ok(_) => {
                tracing::info!(revision = target, "auto-compacted");
                last = target;
            }
            Err(e) => {
                tracing::debug!(revision = target, error = %e.message(), "auto-compaction skipped")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_keeps_the_window() {
        let t0 = Instant::now();
        let mut s: VecDeque<_> = [
            (t0, 5),
            (t0 + Duration::from_secs(10), 9),
            (t0 + Duration::from_secs(20), 12),
        ]
        .into();
        assert_eq!(
            periodic_target(&mut s, t0 + Duration::from_secs(5), Duration::from_secs(15)),
            None
        );
        assert_eq!(
            periodic_target(
                &mut s,
                t0 + Duration::from_secs(26),
                Duration::from_secs(15)
            ),
            Some(9)
        );
        assert_eq!(s.len(), 1);
    }
}
