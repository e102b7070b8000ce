//! The recipes' state as this member's own store holds it (a local, serializable read), for
//! the dashboard and the `kv_recipe_*` metrics. `recipes::inspect` does the classifying.

use kv_core::Store;
use kv_core::proto::etcdserverpb::RangeRequest;
use recipes::inspect::Inspection;

/// Keys read at most per look: past this the views say `truncated`, so a huge keyspace costs
/// a bounded read per dashboard refresh or scrape.
pub const KEY_LIMIT: i64 = 20_000;

/// Locks, elections, queues and services as of this member's latest applied revision.
pub fn recipes_now(store: &Store) -> Inspection {
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        limit: KEY_LIMIT,
        serializable: true,
        ..Default::default()
    };
    match store.range(&all) {
        Ok(resp) => {
            let revision = resp.header.map_or(0, |h| h.revision);
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut found = Inspection::from_kvs(revision, &resp.kvs, now_ms);
            found.truncated = resp.more;
            found
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the keyspace for the recipes' state");
            Inspection::default()
        }
    }
}
