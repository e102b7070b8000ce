//! Waiting one's turn: rivals are ordered by the create revision of their keys, and a waiter
//! watches only the newest key created before its own. When that key goes, the waiter looks
//! again, so a release wakes one waiter, not all of them (no herd).

use kv_client::{Client, GetOptions, SortOrder, SortTarget, Txn, TxnOp};

use crate::error::{Error, Result};
use crate::owned::{OwnedKey, read_answer, wait_deleted};

/// Waits until no key under `prefix` created before `own` exists, and confirms `own` is
/// still in place: each look reads both in one transaction, so the turn is known one round
/// trip after the predecessor goes. [`Error::KeyDeleted`] if `own` went meanwhile.
pub(crate) async fn wait_older_gone(client: &Client, prefix: &[u8], own: &OwnedKey) -> Result<()> {
    let newest_older = GetOptions::new()
        .prefix()
        .keys_only()
        .sort(SortTarget::Create, SortOrder::Descend)
        .max_create_revision(own.revision() - 1)
        .limit(1);
    let look = Txn::new().and_then([
        TxnOp::get(prefix, newest_older),
        TxnOp::get(own.key(), GetOptions::new().keys_only()),
    ]);
    loop {
        let seen = client.kv().txn(look.clone()).await?;
        let mine = read_answer(&seen, 1)?
            .kvs
            .first()
            .map(|kv| kv.create_revision);
        if mine != Some(own.revision()) {
            return Err(Error::KeyDeleted(
                String::from_utf8_lossy(own.key()).into_owned(),
            ));
        }
        let Some(kv) = read_answer(&seen, 0)?.kvs.first() else {
            return Ok(());
        };
        wait_deleted(client, &kv.key, seen.revision).await?;
    }
}

/// Read options for the oldest key under a prefix: the holder of a lock, the leader.
pub(crate) fn oldest() -> GetOptions {
    GetOptions::new()
        .prefix()
        .sort(SortTarget::Create, SortOrder::Ascend)
        .limit(1)
}
