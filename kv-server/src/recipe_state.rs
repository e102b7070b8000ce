//! The recipes' state as this member's own store holds it (a local, serializable read), for
//! the dashboard and the `kv_recipe_*` metrics. `recipes::inspect` does the classifying.

use kv_core::Store;
use kv_core::proto::etcdserverpb::RangeRequest;
use recipes::inspect::Inspection;

/// Keys listed at most per look: past this the views say `truncated`, so a huge keyspace
/// costs a bounded read per dashboard refresh or scrape.
pub const KEY_LIMIT: usize = 20_000;

/// Locks, elections, queues and services as of this member's latest applied revision.
///
/// Key names are walked in the index (no records read), then only the values the
/// classification needs are read (keys on a lease, queue entries): the bulk of a keyspace is
/// application data whose values may be large, and a scrape must not copy them all.
pub fn recipes_now(store: &Store) -> Inspection {
    match read(store) {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the keyspace for the recipes' state");
            Inspection::default()
        }
    }
}

fn read(store: &Store) -> Result<Inspection, kv_core::Error> {
    let (revision, wanted, more) = store.list_keys(KEY_LIMIT, Inspection::wants_value);
    let mut kvs = Vec::with_capacity(wanted.len());
    for (key, _) in wanted {
        let one = store.range(&RangeRequest {
            key,
            revision,
            serializable: true,
            ..Default::default()
        })?;
        kvs.extend(one.kvs);
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut found = Inspection::from_kvs(revision, &kvs, now_ms);
    found.truncated = more;
    Ok(found)
}
