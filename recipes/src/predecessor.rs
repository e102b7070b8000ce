//! Waiting one's turn: rivals are ordered by the create revision of their keys, and a waiter
//! watches only the newest key created before its own. When that key goes, the waiter looks
//! again, so a release wakes one waiter, not all of them (no herd).

use kv_client::{Client, GetOptions, SortOrder, SortTarget};

use crate::error::Result;
use crate::owned::wait_deleted;

/// Waits until no key under `prefix` created at or before revision `max_create` exists.
pub(crate) async fn wait_older_gone(client: &Client, prefix: &[u8], max_create: i64) -> Result<()> {
    loop {
        let newest_older = client
            .kv()
            .get(
                prefix,
                GetOptions::new()
                    .prefix()
                    .keys_only()
                    .sort(SortTarget::Create, SortOrder::Descend)
                    .max_create_revision(max_create)
                    .limit(1),
            )
            .await?;
        let Some(kv) = newest_older.kvs.first() else {
            return Ok(());
        };
        wait_deleted(client, &kv.key, newest_older.revision).await?;
    }
}

/// Read options for the oldest key under a prefix: the holder of a lock, the leader.
pub(crate) fn oldest() -> GetOptions {
    GetOptions::new()
        .prefix()
        .sort(SortTarget::Create, SortOrder::Ascend)
        .limit(1)
}
