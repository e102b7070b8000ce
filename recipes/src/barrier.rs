//! Barriers: a gate that holds everyone until it is released, and a double barrier that lets a
//! group of exactly N start together and finish together.
//!
//! Key layout. [`Barrier`]: the key `<name>` exists while the gate is held. [`DoubleBarrier`]:
//! each arrival writes `<name>/waiters/<lease hex>_<random hex>` on its session's lease; the
//! N-th arrival (by create revision) writes `<name>/ready`, which admits the group; the last
//! one to leave deletes it, which opens the name for the next round.

use kv_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};

use crate::error::{Error, Result};
use crate::owned::{OwnedKey, claim, wait_deleted};
use crate::semaphore::nonce;
use crate::session::Session;

/// A gate: [`Barrier::wait`] returns once nobody holds it.
#[derive(Debug, Clone)]
pub struct Barrier {
    client: Client,
    key: Vec<u8>,
}

impl Barrier {
    /// The barrier `name`.
    pub fn new(client: &Client, name: impl AsRef<[u8]>) -> Barrier {
        Barrier {
            client: client.clone(),
            key: name.as_ref().to_vec(),
        }
    }

    /// Closes the gate until [`Barrier::release`]; [`Error::BarrierHeld`] if it is closed.
    pub async fn hold(&self) -> Result<()> {
        self.hold_with(PutOptions::new()).await
    }

    /// Closes the gate for as long as `session` lives (or until released), so a crashed
    /// holder does not keep everyone waiting.
    pub async fn hold_in(&self, session: &Session) -> Result<()> {
        self.hold_with(PutOptions::new().lease(session.lease()))
            .await
    }

    async fn hold_with(&self, options: PutOptions) -> Result<()> {
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(self.key.clone(), "", options)]);
        if self.client.kv().txn(txn).await?.succeeded {
            Ok(())
        } else {
            Err(Error::BarrierHeld)
        }
    }

    /// Opens the gate: every waiter goes on.
    pub async fn release(&self) -> Result<()> {
        self.client
            .kv()
            .delete(&self.key, Default::default())
            .await?;
        Ok(())
    }

    /// Returns once the gate is open (at once if it is). Drop the future to stop waiting.
    pub async fn wait(&self) -> Result<()> {
        loop {
            let got = self.client.kv().get(&self.key, GetOptions::new()).await?;
            if got.kvs.is_empty() {
                return Ok(());
            }
            wait_deleted(&self.client, &self.key, got.revision).await?;
        }
    }
}

/// A double barrier: [`DoubleBarrier::enter`] returns once N participants have entered (and
/// never admits more than N to a round); [`Entered::leave`] returns once all of them left.
#[derive(Debug, Clone)]
pub struct DoubleBarrier {
    session: Session,
    waiters: Vec<u8>,
    ready: Vec<u8>,
    count: usize,
}

/// A participant inside a [`DoubleBarrier`]. Dropped without [`Entered::leave`], it withdraws
/// in the background, so the others' `leave` does not wait for it.
#[derive(Debug)]
pub struct Entered {
    barrier: DoubleBarrier,
    owned: OwnedKey,
}

impl DoubleBarrier {
    /// The double barrier `name` for groups of `count`, joined through `session`.
    pub fn new(session: &Session, name: impl AsRef<[u8]>, count: usize) -> Result<DoubleBarrier> {
        if count == 0 {
            return Err(Error::Invalid(
                "a double barrier needs at least one participant".into(),
            ));
        }
        let name = name.as_ref();
        Ok(DoubleBarrier {
            session: session.clone(),
            waiters: [name, b"/waiters/"].concat(),
            ready: [name, b"/ready"].concat(),
            count,
        })
    }

    /// Joins the current round and returns once it has N participants. Fails with
    /// [`Error::BarrierFull`] if N already arrived (come back after they leave), and with
    /// [`Error::SessionLost`] if the session ends while waiting. Dropping the future withdraws.
    pub async fn enter(&self) -> Result<Entered> {
        let key = [
            &self.waiters[..],
            format!("{:x}_{:016x}", self.session.lease(), nonce()).as_bytes(),
        ]
        .concat();
        // Who came before us and whether the round already started, read atomically with our
        // arrival, so the count cannot include anyone who arrived later or left meanwhile.
        let reads = vec![
            TxnOp::get(
                self.waiters.clone(),
                GetOptions::new().prefix().count_only(),
            ),
            TxnOp::get(self.ready.clone(), GetOptions::new()),
        ];
        let claimed = claim(&self.session, &key, b"", reads).await?;
        let owned = claimed.owned;
        let (arrived, started) = if claimed.existing.is_none() {
            (claimed.reads[0].count, !claimed.reads[1].kvs.is_empty())
        } else {
            // A resent arrival found its own key: count by create revision instead.
            let client = self.session.client();
            let older = GetOptions::new()
                .prefix()
                .count_only()
                .max_create_revision(owned.revision() - 1);
            let ready = client.kv().get(&self.ready, GetOptions::new()).await?;
            let before = client.kv().get(self.waiters.clone(), older).await?;
            let started = ready
                .kvs
                .first()
                .is_some_and(|kv| kv.mod_revision < owned.revision());
            (before.count + 1, started)
        };
        let position = usize::try_from(arrived).unwrap_or(usize::MAX);
        if started || position > self.count {
            owned.release().await?;
            return Err(Error::BarrierFull);
        }
        if position == self.count {
            self.session
                .client()
                .kv()
                .put(self.ready.clone(), "", PutOptions::new())
                .await?;
        } else {
            owned.wait_turn(self.wait_ready(owned.revision())).await?;
            owned.check().await?;
        }
        Ok(Entered {
            barrier: self.clone(),
            owned,
        })
    }

    /// Waits until `ready` is written after revision `after` (a `ready` left from an earlier
    /// round is older and does not count).
    async fn wait_ready(&self, after: i64) -> Result<()> {
        use futures::StreamExt;
        let client = self.session.client();
        loop {
            let got = client.kv().get(&self.ready, GetOptions::new()).await?;
            if got.kvs.first().is_some_and(|kv| kv.mod_revision > after) {
                return Ok(());
            }
            let mut puts = client.watch().watch(
                self.ready.clone(),
                WatchOptions::new()
                    .start_revision(got.revision + 1)
                    .no_delete(),
            );
            while let Some(update) = puts.next().await {
                match update {
                    Ok(u) if !u.events.is_empty() => return Ok(()),
                    Ok(_) => {}
                    Err(kv_client::Error::WatchCompacted { .. }) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

impl Entered {
    /// Leaves, and returns once every participant of the round has left (or withdrawn, or
    /// lost its session). Drop the future to stop waiting; the participant has left anyway.
    pub async fn leave(self) -> Result<()> {
        let Entered { barrier, owned } = self;
        owned.release().await?;
        let client = barrier.session.client();
        loop {
            let any = GetOptions::new().prefix().keys_only().limit(1);
            let got = client.kv().get(barrier.waiters.clone(), any).await?;
            let Some(kv) = got.kvs.first() else {
                // Everyone left: close the round (whoever gets here first does it).
                let ready = client.kv().get(&barrier.ready, GetOptions::new()).await?;
                if let Some(ready) = ready.kvs.first() {
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            barrier.ready.clone(),
                            CompareOp::Equal,
                            ready.mod_revision,
                        )])
                        .and_then([TxnOp::delete(barrier.ready.clone(), Default::default())]);
                    client.kv().txn(txn).await?;
                }
                return Ok(());
            };
            wait_deleted(client, &kv.key, got.revision).await?;
        }
    }
}
