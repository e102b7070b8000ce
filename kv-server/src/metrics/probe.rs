//! What the metrics learn by looking rather than by being told: peer round trips, measured
//! with a small call every few seconds as etcd's prober does, and leader changes, seen on
//! Raft's status.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// How often each peer is probed (etcd probes every few seconds too).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(3);

/// How long a probe may take before it counts as lost (and is not recorded).
const PROBE_LIMIT: Duration = Duration::from_secs(2);

/// Probes every other member's peer URL every [`PROBE_INTERVAL`] until `stop`.
pub async fn probe_peers(node: Arc<Node>, stop: CancellationToken) {
    let me = node.identity.member_id;
    loop {
        let members = node.raft.members();
        node.metrics
            .retain_peers(|id| id != me && members.iter().any(|m| m.id == id));
        let probes = members.iter().filter(|m| m.id != me).map(|m| {
            let node = node.clone();
            async move {
                if let Some(took) = node.raft.round_trip(&m.peer_url, PROBE_LIMIT).await {
                    node.metrics.peer_rtt(m.id).observe(took);
                }
            }
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = futures::future::join_all(probes) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

/// Counts every leader this member sees come to power (the first one included, as etcd
/// counts it) until `stop`.
pub async fn count_leader_changes(node: Arc<Node>, stop: CancellationToken) {
    let mut seen = None;
    loop {
        let now = tokio::select! {
            _ = stop.cancelled() => return,
            now = node.raft.leader_change(seen, Duration::from_secs(60)) => now,
        };
        if now.is_some() && now != seen {
            node.metrics.leader_changes.inc();
        } else if now == seen {
            // Nothing changed within the wait: Raft stopped publishing (its core is gone), or
            // a long quiet spell. Either way, do not spin.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        seen = now;
    }
}
