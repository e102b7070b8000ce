//! A distributed counting semaphore: at most N holders at once, admitted in arrival order.
//!
//! Key layout: each acquisition writes `<name>/<lease hex>_<random hex>` on the session's
//! lease, so one session may hold several permits. An acquisition holds a permit when fewer
//! than N keys created before its own remain. A waiter watches the deletions under the name
//! and counts the older keys that go.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use kv_client::{Client, EventKind, GetOptions, WatchOptions};

use crate::error::{Error, Result};
use crate::owned::{Guard, OwnedKey, claim};
use crate::session::Session;

/// A named semaphore of N permits over a session. Every process using the name must agree on
/// N.
#[derive(Debug, Clone)]
pub struct Semaphore {
    session: Session,
    prefix: Vec<u8>,
    permits: usize,
}

/// A process-unique, unpredictable suffix for acquisition keys.
pub(crate) fn nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::collections::hash_map::RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

impl Semaphore {
    /// The semaphore `name` with `permits` permits, for `session`.
    pub fn new(session: &Session, name: impl AsRef<[u8]>, permits: usize) -> Result<Semaphore> {
        if permits == 0 {
            return Err(Error::Invalid(
                "a semaphore needs at least one permit".into(),
            ));
        }
        Ok(Semaphore {
            session: session.clone(),
            prefix: [name.as_ref(), b"/"].concat(),
            permits,
        })
    }

    async fn enqueue(&self) -> Result<OwnedKey> {
        let suffix = format!("{:x}_{:016x}", self.session.lease(), nonce());
        let key = [&self.prefix[..], suffix.as_bytes()].concat();
        Ok(claim(&self.session, &key, b"", vec![]).await?.owned)
    }

    /// Takes a permit, waiting for one if all N are held. Fails if the session ends while
    /// waiting; dropping the future gives up the place in the queue.
    pub async fn acquire(&self) -> Result<Guard> {
        let owned = self.enqueue().await?;
        let client = self.session.client();
        let permit = wait_for_permit(client, &self.prefix, owned.revision(), self.permits);
        owned.wait_turn(permit).await?;
        owned.check().await?;
        Ok(Guard::new(owned))
    }

    /// Takes a permit if one is free now; otherwise [`Error::NoPermit`].
    pub async fn try_acquire(&self) -> Result<Guard> {
        let owned = self.enqueue().await?;
        let older = older_keys(self.session.client(), &self.prefix, owned.revision()).await?;
        if older.0.len() < self.permits {
            return Ok(Guard::new(owned));
        }
        owned.release().await?;
        Err(Error::NoPermit)
    }

    /// How many permits are held or waited for right now.
    pub async fn holders(&self) -> Result<i64> {
        let got = self
            .session
            .client()
            .kv()
            .get(self.prefix.clone(), GetOptions::new().prefix().count_only())
            .await?;
        Ok(got.count)
    }
}

/// The keys under `prefix` created before `revision`, and the revision they were read at.
async fn older_keys(
    client: &Client,
    prefix: &[u8],
    revision: i64,
) -> Result<(HashSet<Vec<u8>>, i64)> {
    let got = client
        .kv()
        .get(
            prefix,
            GetOptions::new()
                .prefix()
                .keys_only()
                .max_create_revision(revision - 1),
        )
        .await?;
    Ok((
        got.kvs.into_iter().map(|kv| kv.key.to_vec()).collect(),
        got.revision,
    ))
}

/// Waits until fewer than `permits` keys created before `revision` remain under `prefix`.
async fn wait_for_permit(
    client: &Client,
    prefix: &[u8],
    revision: i64,
    permits: usize,
) -> Result<()> {
    'reread: loop {
        let (mut older, read_at) = older_keys(client, prefix, revision).await?;
        if older.len() < permits {
            return Ok(());
        }
        // Older keys only ever go away: count them out as they are deleted.
        let mut deletes = client.watch().watch(
            prefix,
            WatchOptions::new()
                .prefix()
                .start_revision(read_at + 1)
                .no_put(),
        );
        while let Some(update) = deletes.next().await {
            match update {
                Ok(u) => {
                    for e in u.events.iter().filter(|e| e.kind == EventKind::Delete) {
                        older.remove(&e.kv.key[..]);
                    }
                    if older.len() < permits {
                        return Ok(());
                    }
                }
                Err(kv_client::Error::WatchCompacted { .. }) => continue 'reread,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquisition_suffixes_do_not_repeat() {
        let seen: HashSet<u64> = (0..10_000).map(|_| nonce()).collect();
        assert_eq!(seen.len(), 10_000);
    }
}
