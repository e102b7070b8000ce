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
/// Key names are walked in the index and lease-bound keys taken from the lease table (no
/// records read), then only the values the classification needs are read: the bulk of a
/// keyspace is application data whose values may be large, and a scrape must not copy them
/// all.
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
    // Queue entries are found by walking key names; lease-bound keys (locks, elections,
    // services) from the lease table, so application data sorted before them cannot hide
    // them. Both are taken at one revision: the walk's.
    let (revision, walked, more) = store.list_keys(KEY_LIMIT, |key, lease| {
        lease == 0 && Inspection::wants_value(key, lease)
    });
    let (_, leased) = store.leased_keys(KEY_LIMIT);
    let truncated = more || leased.len() == KEY_LIMIT;
    let mut kvs = Vec::with_capacity(walked.len() + leased.len());
    for (key, _) in walked.into_iter().chain(leased) {
        let one = match store.range(&RangeRequest {
            key,
            revision,
            serializable: true,
            ..Default::default()
        }) {
            Ok(one) => one,
            // Applied past `revision` since and compacted: this look is out of date anyway.
            Err(kv_core::Error::Request(kv_core::KvError::Compacted { .. })) => continue,
            Err(e) => return Err(e),
        };
        kvs.extend(one.kvs);
    }
    let mut found = Inspection::from_kvs(revision, &kvs, crate::ui::now_ms());
    found.truncated = truncated;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::StoreConfig;
    use kv_core::backend::MemoryBackend;
    use kv_core::proto::etcdserverpb::{LeaseGrantRequest, PutRequest};
    use kv_core::proto::kvserverpb::{InternalRequest, internal_request::Request};

    fn put(key: String, lease: i64) -> Request {
        Request::Put(PutRequest {
            key: key.into_bytes(),
            // Empty, as a mutex's key is (a value would make it an election candidate).
            value: Vec::new(),
            lease,
            ..Default::default()
        })
    }

    /// Application data sorted before the recipes fills the key walk; lock holders are found
    /// through their leases all the same, and the look says it was cut short.
    #[test]
    fn locks_past_a_large_keyspace_are_found() {
        let config = StoreConfig {
            member_id: 1,
            quota_bytes: 0,
        };
        let store = Store::open(Box::new(MemoryBackend::new()), config).unwrap();
        let mut requests = vec![Request::LeaseGrant(LeaseGrantRequest { ttl: 60, id: 0x2a })];
        requests.extend((0..=KEY_LIMIT).map(|i| put(format!("data/{i:06}"), 0)));
        requests.push(put("locks/reindex/2a".into(), 0x2a));
        let batch: Vec<_> = requests
            .into_iter()
            .enumerate()
            .map(|(i, request)| {
                let index = i as u64 + 1;
                let cmd = InternalRequest {
                    header: None,
                    id: index,
                    request: Some(request),
                };
                (index, Some(cmd))
            })
            .collect();
        let outcomes = store.apply_batch(&batch, b"meta").unwrap();
        assert!(outcomes.iter().all(|o| o.is_ok()));
        let found = recipes_now(&store);
        assert!(found.truncated);
        assert_eq!(found.locks.len(), 1, "{found:?}");
        assert_eq!(found.locks[0].holders[0].key, "locks/reindex/2a");
    }
}
