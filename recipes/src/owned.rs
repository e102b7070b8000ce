//! Keys a session owns: how they are created exactly once, what fences them, how their loss is
//! noticed, and how they are released (also when the owner is dropped mid-wait).

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use kv_client::{
    Client, Compare, CompareOp, EventKind, GetOptions, GetResponse, KeyValue, LeaseLost,
    PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};

use crate::error::{Error, Result};
use crate::session::Session;

/// How many times a guarded write is sent again after an unknown outcome.
const RESENDS: usize = 3;

/// A fencing token: the held key and its create revision. Tokens of successive holders of the
/// same lock (or leaders of the same election) are strictly increasing, so a resource that
/// remembers the highest token it saw can refuse a stale holder. Ordered by revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fence {
    /// The create revision of the key: the token proper.
    pub revision: i64,
    /// The key that holds the lock or leadership.
    pub key: Vec<u8>,
}

impl Fence {
    /// A compare that holds only while this token is current (its key still exists with this
    /// create revision): put it in a transaction's `when` so the write lands only if the
    /// holder still holds, even from a process that has no session of its own.
    pub fn is_current(&self) -> Compare {
        held(&self.key, self.revision)
    }
}

/// True while `key` is the one created at `revision`: the ownership test of every fence.
fn held(key: &[u8], revision: i64) -> Compare {
    Compare::create_revision(key, CompareOp::Equal, revision)
}

/// Why something held ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Loss {
    /// The session's lease ended.
    #[error("session lost: {0}")]
    SessionEnded(LeaseLost),
    /// The key was deleted: by the lease's expiry or by another client.
    #[error("the key was deleted")]
    KeyDeleted,
}

/// Sends a transaction whose compares make a second application a no-op (it then takes the
/// failure branch), again after an unknown outcome: its answer is right either way.
pub(crate) async fn send_guarded(client: &Client, txn: Txn) -> Result<TxnResponse> {
    let mut resends = 0;
    loop {
        match client.kv().txn(txn.clone()).await {
            Err(kv_client::Error::OutcomeUnknown(_)) if resends < RESENDS => resends += 1,
            other => return Ok(other?),
        }
    }
}

/// What to do with a result nobody is waiting for any more.
type Undo<T> = Box<dyn FnOnce(T) -> futures::future::BoxFuture<'static, ()> + Send>;

/// A result on its way to a caller that may have gone: dropped undelivered, it is undone.
struct Delivery<T: Send + 'static> {
    result: Option<T>,
    undo: Option<Undo<T>>,
}

impl<T: Send + 'static> Delivery<T> {
    fn accept(mut self) -> Option<T> {
        self.undo = None;
        self.result.take()
    }
}

impl<T: Send + 'static> Drop for Delivery<T> {
    fn drop(&mut self) {
        // Without a runtime what was taken lives until its lease ends.
        if let (Some(result), Some(undo)) = (self.result.take(), self.undo.take())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(undo(result));
        }
    }
}

/// Runs `work` (a write that takes something: a key, a queue item) on a task of its own and
/// returns its result; if the caller's future is dropped first (a timeout, a `select!`), the
/// work still finishes and `undo` gives back what it took, instead of leaving it held until
/// the session ends. Delivery is covered too: a result that reached the channel but not the
/// caller is undone as well.
pub(crate) async fn take_or_give_back<T, W, U, F>(work: W, undo: U) -> Result<T>
where
    T: Send + 'static,
    W: Future<Output = Result<T>> + Send + 'static,
    U: FnOnce(T) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (deliver, delivered) = tokio::sync::oneshot::channel::<Result<Delivery<T>>>();
    tokio::spawn(async move {
        let result = work.await.map(|taken| Delivery {
            result: Some(taken),
            undo: Some(Box::new(move |t| Box::pin(undo(t)))),
        });
        // Refused (the caller is gone): dropping the delivery undoes it.
        let _ = deliver.send(result);
    });
    match delivered.await {
        Ok(result) => result?
            .accept()
            .ok_or_else(|| Error::Protocol("a delivery without a result".into())),
        Err(_) => Err(Error::Protocol(
            "the claim's task ended without an answer".into(),
        )),
    }
}

/// The `n`th answer of a transaction, which the caller made a read.
pub(crate) fn read_answer(resp: &TxnResponse, n: usize) -> Result<&GetResponse> {
    match resp.responses.get(n) {
        Some(TxnOpResponse::Get(got)) => Ok(got),
        _ => Err(Error::Protocol(format!(
            "transaction answer {n} is not a read"
        ))),
    }
}

/// The outcome of [`claim`].
pub(crate) struct Claim {
    /// The key, now owned.
    pub owned: OwnedKey,
    /// The key's value if it existed before (this session had it already).
    pub existing: Option<KeyValue>,
    /// The answers of the extra reads, run in the same transaction.
    pub reads: Vec<GetResponse>,
}

/// Creates `key` with `value` on the session's lease unless it exists, and runs `reads` in the
/// same transaction. The key's create revision orders the claimant among its rivals.
pub(crate) async fn claim(
    session: &Session,
    key: &[u8],
    value: &[u8],
    reads: Vec<TxnOp>,
) -> Result<Claim> {
    session.check()?;
    let put = TxnOp::put(key, value, PutOptions::new().lease(session.lease()));
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then(std::iter::once(put).chain(reads.iter().cloned()))
        .or_else(std::iter::once(TxnOp::get(key, GetOptions::new())).chain(reads.iter().cloned()));
    let client = session.client().clone();
    let undo_client = client.clone();
    let owned_key = key.to_vec();
    let resp = take_or_give_back(
        async move { send_guarded(&client, txn).await },
        move |resp: TxnResponse| async move {
            // Only a key this very send created is given back.
            if resp.succeeded {
                let _ = delete_if_owned(&undo_client, &owned_key, resp.revision).await;
            }
        },
    )
    .await?;
    let (revision, existing, first_read) = if resp.succeeded {
        (resp.revision, None, 1)
    } else {
        let kv = read_answer(&resp, 0)?
            .kvs
            .first()
            .cloned()
            .ok_or_else(|| Error::KeyDeleted(String::from_utf8_lossy(key).into_owned()))?;
        (kv.create_revision, Some(kv), 1)
    };
    let reads = (first_read..resp.responses.len())
        .map(|i| read_answer(&resp, i).cloned())
        .collect::<Result<_>>()?;
    Ok(Claim {
        owned: OwnedKey {
            session: session.clone(),
            key: key.to_vec(),
            revision,
            armed: true,
        },
        existing,
        reads,
    })
}

/// A key of a session, identified by its create revision. Dropped while still armed (a wait
/// abandoned, a guard not released), it deletes itself in the background.
pub(crate) struct OwnedKey {
    session: Session,
    key: Vec<u8>,
    revision: i64,
    armed: bool,
}

impl OwnedKey {
    /// Names a key owned earlier (for example by another process of the same session). It
    /// is not armed: dropping it leaves the key alone, since whoever made it decides its end.
    pub(crate) fn resume(session: &Session, key: Vec<u8>, revision: i64) -> OwnedKey {
        OwnedKey {
            session: session.clone(),
            key,
            revision,
            armed: false,
        }
    }

    /// Names a key this session just created (a claim): dropped while armed, it is deleted.
    pub(crate) fn created(session: &Session, key: Vec<u8>, revision: i64) -> OwnedKey {
        OwnedKey {
            session: session.clone(),
            key,
            revision,
            armed: true,
        }
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.key
    }

    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    pub(crate) fn fence(&self) -> Fence {
        Fence {
            revision: self.revision,
            key: self.key.clone(),
        }
    }

    /// True while the key is this one (not deleted, not re-created).
    pub(crate) fn is_owner(&self) -> Compare {
        held(&self.key, self.revision)
    }

    /// Fails unless the session lives and the key is still ours.
    pub(crate) async fn check(&self) -> Result<()> {
        self.session.check()?;
        let got = self
            .session
            .client()
            .kv()
            .get(&self.key, GetOptions::new())
            .await?;
        match got.kvs.first() {
            Some(kv) if kv.create_revision == self.revision => Ok(()),
            _ => Err(Error::KeyDeleted(
                String::from_utf8_lossy(&self.key).into_owned(),
            )),
        }
    }

    /// Resolves when the session ends or the key is deleted.
    pub(crate) async fn lost(&self) -> Loss {
        tokio::select! {
            why = self.session.lost() => Loss::SessionEnded(why),
            () = deleted(self.session.client(), &self.key, self.revision) => Loss::KeyDeleted,
        }
    }

    /// Runs `wait` (a wait for our turn; the caller confirms the key afterwards unless the
    /// wait did), then checks the session. Stops early with [`Error::SessionLost`] or [`Error::KeyDeleted`] when either goes
    /// meanwhile: the key's deletion is seen at once through a watch, not at the next renewal.
    pub(crate) async fn wait_turn(&self, wait: impl Future<Output = Result<()>>) -> Result<()> {
        let loss = tokio::select! {
            waited = wait => match waited {
                Ok(()) => return self.session.check(),
                Err(Error::KeyDeleted(_)) => Loss::KeyDeleted,
                Err(e) => return Err(e),
            },
            loss = self.lost() => loss,
        };
        Err(match loss {
            Loss::SessionEnded(why) => Error::SessionLost(why),
            // A deletion by the lease's end is a session loss; say so.
            Loss::KeyDeleted => match self
                .session
                .client()
                .lease()
                .time_to_live(self.session.lease(), false)
                .await
            {
                Ok(None) => Error::SessionLost(LeaseLost::NotFound),
                _ => Error::KeyDeleted(String::from_utf8_lossy(&self.key).into_owned()),
            },
        })
    }

    /// Deletes the key if it is still ours; true if it was.
    pub(crate) async fn release(self) -> Result<bool> {
        let delete = TxnOp::delete(self.key.clone(), Default::default());
        self.end_with(vec![delete]).await
    }

    /// Applies `ops`, which must delete the key, in one transaction if the key is still
    /// ours; true if they were applied. A send whose answer is lost is sent again (the
    /// ownership compare makes a second landing a no-op), and a resend that finds the key
    /// gone while the session's lease still lives knows the lost send did it: a lease's end
    /// is the only other way a key of ours goes. Should every send fail, the key stays armed
    /// and is deleted in the background as it drops, so it is never left held and known to
    /// nobody until the session ends.
    pub(crate) async fn end_with(self, ops: Vec<TxnOp>) -> Result<bool> {
        let client = self.session.client().clone();
        let txn = Txn::new().when([self.is_owner()]).and_then(ops);
        let mut resends = 0;
        loop {
            match client.kv().txn(txn.clone()).await {
                Ok(resp) if resp.succeeded => {
                    self.detach();
                    return Ok(true);
                }
                Ok(_) => {
                    let landed = resends > 0
                        && matches!(
                            client
                                .lease()
                                .time_to_live(self.session.lease(), false)
                                .await,
                            Ok(Some(_))
                        );
                    self.detach();
                    return Ok(landed);
                }
                Err(kv_client::Error::OutcomeUnknown(_)) if resends < RESENDS => resends += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Stops caring for the key: it stays until deleted or its lease ends.
    pub(crate) fn detach(mut self) -> Fence {
        self.armed = false;
        self.fence()
    }
}

impl std::fmt::Debug for OwnedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedKey")
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("revision", &self.revision())
            .finish()
    }
}

impl Drop for OwnedKey {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.session.client().clone();
            let key = std::mem::take(&mut self.key);
            let revision = self.revision;
            runtime.spawn(async move {
                let _ = delete_if_owned(&client, &key, revision).await;
            });
        }
        // Without a runtime the key lives until its lease ends.
    }
}

async fn delete_if_owned(client: &Client, key: &[u8], revision: i64) -> Result<bool> {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, revision)])
        .and_then([TxnOp::delete(key, Default::default())]);
    Ok(send_guarded(client, txn).await?.succeeded)
}

/// Waits for a delete of `key` after revision `after`. Also returns when the watch cannot
/// tell (history compacted): callers re-read before trusting it.
pub(crate) async fn wait_deleted(client: &Client, key: &[u8], after: i64) -> Result<()> {
    let mut updates = client
        .watch()
        .watch(key, WatchOptions::new().start_revision(after + 1).no_put());
    while let Some(update) = updates.next().await {
        match update {
            Ok(u) if u.events.iter().any(|e| e.kind == EventKind::Delete) => return Ok(()),
            Ok(_) => {}
            Err(kv_client::Error::WatchCompacted { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Resolves once `key` with create revision `revision` no longer exists.
async fn deleted(client: &Client, key: &[u8], revision: i64) {
    let mut after = revision;
    loop {
        if wait_deleted(client, key, after).await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Confirm by reading, and watch on from there if the key is still ours.
        loop {
            match client.kv().get(key, GetOptions::new()).await {
                Ok(got) => {
                    if got.kvs.first().map(|kv| kv.create_revision) != Some(revision) {
                        return;
                    }
                    after = got.revision;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// A lock, read or write lock, or semaphore permit this session holds. Dropping it releases
/// it in the background; [`Guard::unlock`] releases it and says whether it was still held.
#[derive(Debug)]
pub struct Guard {
    owned: OwnedKey,
}

impl Guard {
    pub(crate) fn new(owned: OwnedKey) -> Guard {
        Guard { owned }
    }

    /// The key that holds it.
    pub fn key(&self) -> &[u8] {
        self.owned.key()
    }

    /// The fencing token: increases from one holder to the next.
    pub fn fence(&self) -> Fence {
        self.owned.fence()
    }

    /// A compare that holds only while this guard's key is in place: add it to your own
    /// transactions so a write from a holder that lost the lock is refused.
    pub fn is_owner(&self) -> Compare {
        self.owned.is_owner()
    }

    /// A transaction that runs its success branch only while this guard still holds.
    pub fn txn(&self) -> Txn {
        Txn::new().when([self.is_owner()])
    }

    /// Resolves when the hold ends without [`Guard::unlock`]: the session ended or the key
    /// was deleted. Pending while held.
    pub async fn lost(&self) -> Loss {
        self.owned.lost().await
    }

    /// Fails unless the session lives and the key is still in place (one read).
    pub async fn check(&self) -> Result<()> {
        self.owned.check().await
    }

    /// Releases the hold. Ok(false) if it had already been lost.
    pub async fn unlock(self) -> Result<bool> {
        self.owned.release().await
    }

    /// Gives up the guard without releasing: the key stays until deleted or its lease ends
    /// (what the server-side Lock service hands to its callers).
    pub fn detach(self) -> Fence {
        self.owned.detach()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_order_by_revision_whatever_the_key() {
        let older = Fence {
            revision: 7,
            key: b"lock/ff".to_vec(),
        };
        let newer = Fence {
            revision: 12,
            key: b"lock/01".to_vec(),
        };
        assert!(older < newer);
        assert_eq!([newer.clone(), older.clone()].iter().max(), Some(&newer));
    }
}
