//! One scrape of `/metrics`: the counters kept in [`Metrics`] plus gauges read from the
//! member's state now.

use std::sync::atomic::Ordering;

use super::process::ProcessStats;
use super::{Exposition, Metrics};
use crate::node::Node;
use crate::service::maintenance::API_VERSION;

/// The metrics text of `node`.
pub fn scrape(node: &Node) -> String {
    let m: &Metrics = &node.metrics;
    let mut out = Exposition::default();
    let raft = node.raft.status();
    let store = node.store.status_recent(crate::ui::IN_USE_MAX_AGE);
    let me = node.identity.member_id;
    let learner = node
        .raft
        .members()
        .iter()
        .any(|member| member.id == me && member.learner);

    // Server and Raft.
    let server_id = format!("{me:x}");
    out.gauges(
        "etcd_server_id",
        "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
        &[(&[("server_id", server_id.as_str())], 1.0)],
    );
    out.gauges(
        "etcd_server_version",
        "Which version is running. 1 for 'server_version' label with current version.",
        &[(&[("server_version", API_VERSION)], 1.0)],
    );
    // etcd labels the cluster version with major.minor ("3.4"), and /version says "3.4.0".
    let cluster_version = cluster_version();
    let minor = cluster_version.trim_end_matches(".0");
    out.gauges(
        "etcd_cluster_version",
        "Which version is running. 1 for 'cluster_version' label with current cluster version",
        &[(&[("cluster_version", minor)], 1.0)],
    );
    out.gauge(
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not.",
        flag(node.raft.has_leader()),
    );
    out.gauge(
        "etcd_server_is_leader",
        "Whether or not this member is a leader. 1 if is, 0 otherwise.",
        flag(raft.leader == Some(me)),
    );
    out.gauge(
        "etcd_server_is_learner",
        "Whether or not this member is a learner. 1 if is, 0 otherwise.",
        flag(learner),
    );
    out.counter(
        "etcd_server_leader_changes_seen_total",
        "The number of leader changes seen.",
        m.leader_changes.get(),
    );
    out.gauge(
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed.",
        raft.commit_index as f64,
    );
    out.gauge(
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied.",
        raft.applied_index as f64,
    );
    out.gauge(
        "etcd_server_proposals_pending",
        "The current number of pending proposals to commit.",
        m.proposals_pending.load(Ordering::Relaxed) as f64,
    );
    out.counter(
        "etcd_server_proposals_failed_total",
        "The total number of failed proposals seen.",
        m.proposals_failed.get(),
    );
    out.gauge(
        "etcd_server_quota_backend_bytes",
        "Current backend storage quota size in bytes.",
        node.store.config().quota_bytes as f64,
    );
    out.counter(
        "etcd_server_health_success",
        "The total number of successful health checks",
        m.health_success.get(),
    );
    out.counter(
        "etcd_server_health_failures",
        "The total number of failed health checks",
        m.health_failures.get(),
    );

    // Disk and network.
    out.histogram(
        "etcd_disk_wal_fsync_duration_seconds",
        "The latency distributions of fsync called by WAL.",
        &node.raft.wal_fsyncs(),
    );
    out.histogram(
        "etcd_disk_backend_commit_duration_seconds",
        "The latency distributions of commit called by backend.",
        &m.backend_commit,
    );
    let peers: Vec<(String, std::sync::Arc<super::Histogram>)> = m
        .peer_rtt
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(id, h)| (format!("{id:x}"), h.clone()))
        .collect();
    let rtts: Vec<_> = peers
        .iter()
        .map(|(id, h)| ([("To", id.as_str())], &**h))
        .collect();
    out.histograms(
        "etcd_network_peer_round_trip_time_seconds",
        "Round-Trip-Time histogram between peers",
        &rtts,
    );

    // MVCC.
    out.gauge(
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes.",
        store.db_size as f64,
    );
    out.gauge(
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "Total size of the underlying database logically in use in bytes.",
        store.db_size_in_use as f64,
    );
    out.gauge(
        "etcd_debugging_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes.",
        store.db_size as f64,
    );
    out.gauge(
        "etcd_debugging_mvcc_current_revision",
        "The current revision of store.",
        store.revision as f64,
    );
    out.gauge(
        "etcd_debugging_mvcc_compact_revision",
        "The revision of the last compaction in store.",
        store.compact_revision.max(0) as f64,
    );
    out.gauge(
        "etcd_debugging_mvcc_keys_total",
        "Total number of keys.",
        store.keys as f64,
    );
    for (name, counter) in [
        ("range", &m.mvcc.range),
        ("put", &m.mvcc.put),
        ("delete", &m.mvcc.delete),
        ("txn", &m.mvcc.txn),
    ] {
        out.counter(
            &format!("etcd_mvcc_{name}_total"),
            &format!("Total number of {name}s seen by this member."),
            counter.get(),
        );
    }
    let hub = node.store.watch_hub().stats();
    out.gauge(
        "etcd_debugging_mvcc_watch_stream_total",
        "Total number of watch streams.",
        hub.streams as f64,
    );
    out.gauge(
        "etcd_debugging_mvcc_watcher_total",
        "Total number of watchers.",
        hub.watchers as f64,
    );
    out.gauge(
        "etcd_debugging_mvcc_slow_watcher_total",
        "Total number of unsynced slow watchers.",
        (hub.unsynced + hub.victims) as f64,
    );

    // Leases.
    out.counter(
        "etcd_debugging_lease_granted_total",
        "The total number of granted leases.",
        m.leases.granted.get(),
    );
    out.counter(
        "etcd_debugging_lease_revoked_total",
        "The total number of revoked leases.",
        m.leases.revoked.get(),
    );
    out.counter(
        "etcd_debugging_lease_renewed_total",
        "The number of renewed leases seen by the leader.",
        m.leases.renewed.get(),
    );
    let (leases, attached) = node.store.lease_counts();
    out.gauge(
        "kv_leases",
        "Leases granted and not yet revoked.",
        leases as f64,
    );
    out.gauge(
        "kv_lease_attached_keys",
        "Keys attached to a lease.",
        attached as f64,
    );

    // Queue and service names are key names: with auth on, /metrics (open to anyone, as
    // etcd's) leaves out the series labelled with them.
    let named = !node.store.auth(|a| a.enabled());
    recipes(
        &mut out,
        &crate::recipe_state::recipes_now(&node.store),
        named,
    );
    m.grpc.render(&mut out);

    if let Some(p) = ProcessStats::read() {
        out.counter_f(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            p.cpu_seconds,
        );
        out.gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            p.resident_bytes as f64,
        );
        out.gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            p.virtual_bytes as f64,
        );
        out.gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            p.open_fds as f64,
        );
        out.gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            p.start_time_seconds,
        );
    }
    out.finish()
}

/// The cluster version as etcd reports it: the server's major.minor with patch 0.
pub fn cluster_version() -> String {
    let mut parts = API_VERSION.split('.');
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => format!("{major}.{minor}.0"),
        _ => API_VERSION.to_string(),
    }
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// The recipes' state as gauges: locks held and waited for, elections led, and, if `named`,
/// queue depths by queue and state and instances by service.
fn recipes(out: &mut Exposition, found: &recipes::inspect::Inspection, named: bool) {
    out.gauge(
        "kv_recipe_locks_held",
        "Locks (mutexes, read-write locks) with a holder.",
        found.locks.len() as f64,
    );
    out.gauge(
        "kv_recipe_lock_waiters",
        "Sessions waiting for a lock.",
        found.locks.iter().map(|l| l.waiting.len()).sum::<usize>() as f64,
    );
    out.gauge(
        "kv_recipe_elections_led",
        "Elections with a leader.",
        found.elections.len() as f64,
    );
    out.gauge(
        "kv_recipe_election_candidates",
        "Candidates waiting behind an election's leader.",
        found
            .elections
            .iter()
            .map(|e| e.candidates.len())
            .sum::<usize>() as f64,
    );
    out.gauge(
        "kv_recipe_scan_truncated",
        "1 when the keyspace is larger than one look reads, so recipes past it are not counted.",
        flag(found.truncated),
    );
    if !named {
        return;
    }
    let mut depths = Vec::new();
    for q in &found.queues {
        for (state, n) in [
            ("ready", q.ready),
            ("delayed", q.delayed),
            ("claimed", q.claimed),
            ("dead", q.dead),
        ] {
            depths.push(([("queue", q.name.as_str()), ("state", state)], n as f64));
        }
    }
    out.gauges(
        "kv_recipe_queue_items",
        "Items in a queue, by state.",
        &depths,
    );
    let instances: Vec<_> = found
        .services
        .iter()
        .map(|s| ([("service", s.name.as_str())], s.instances.len() as f64))
        .collect();
    out.gauges(
        "kv_recipe_service_instances",
        "Registered instances of a service.",
        &instances,
    );
}
