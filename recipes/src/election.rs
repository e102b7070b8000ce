//! Leader election, compatible with etcd's `concurrency.Election` (and so with
//! `etcdctl elect`): Go and Rust candidates compete in the same election.
//!
//! Key layout: a candidate writes `<name>/<lease hex>` = its value on its session's lease. The
//! leader is the key with the lowest create revision; a candidate waits for the deletion of the
//! newest key created before its own (no herd). The leader's create revision is its fencing
//! token. Proclaiming rewrites the leader's value in place.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kv_client::{Client, EventKind, KeyValue, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::owned::{Fence, Loss, OwnedKey, claim};
use crate::predecessor::{oldest, wait_older_gone};
use crate::session::Session;

/// An election: campaign in it, or watch who leads it.
#[derive(Debug, Clone)]
pub struct Election {
    client: Client,
    prefix: Vec<u8>,
}

impl Election {
    /// The election `name`.
    pub fn new(client: &Client, name: impl AsRef<[u8]>) -> Election {
        Election {
            client: client.clone(),
            prefix: [name.as_ref(), b"/"].concat(),
        }
    }

    /// Runs for leader with `value`, and returns once elected. Fails if the session ends
    /// first; dropping the future withdraws the candidacy. A session already campaigning in
    /// this election continues that candidacy (with the new value).
    pub async fn campaign(&self, session: &Session, value: impl AsRef<[u8]>) -> Result<Leadership> {
        let value = value.as_ref();
        let key = [
            &self.prefix[..],
            format!("{:x}", session.lease()).as_bytes(),
        ]
        .concat();
        let claimed = claim(session, &key, value, vec![]).await?;
        let leadership = Leadership {
            owned: claimed.owned,
        };
        if claimed.existing.is_some_and(|kv| kv.value != value) {
            leadership.proclaim(value).await?;
        }
        let client = session.client();
        let older_gone = wait_older_gone(client, &self.prefix, &leadership.owned);
        leadership.owned.wait_turn(older_gone).await?;
        Ok(leadership)
    }

    /// The current leader's key-value (its create revision is the leadership's fence), or
    /// `None` when nobody leads.
    pub async fn leader(&self) -> Result<Option<KeyValue>> {
        let got = self.client.kv().get(self.prefix.clone(), oldest()).await?;
        Ok(got.kvs.into_iter().next())
    }

    /// A stream of leadership changes: first the current state (`Elected` or `Vacant`), then
    /// every change. It rides out reconnects and re-reads after a compaction, so it only ends
    /// on an error the client cannot recover from. Dropping it stops observing.
    pub fn observe(&self) -> Observer {
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(observe(self.client.clone(), self.prefix.clone(), tx));
        Observer { rx, task }
    }
}

/// A change of leadership seen by an [`Observer`].
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A new leader, with its key-value: key, `create_revision` (the fence), value, lease.
    Elected(KeyValue),
    /// The leader proclaimed a new value; the key-value after the change.
    Proclaimed(KeyValue),
    /// Nobody leads: the leader resigned, its session ended, or there was none yet.
    Vacant,
}

/// The stream returned by [`Election::observe`].
pub struct Observer {
    rx: mpsc::Receiver<Result<Observation>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream for Observer {
    type Item = Result<Observation>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Errors that pass with time (an election, a restart): observation goes on after them.
fn transient(e: &kv_client::Error) -> bool {
    e.is_retryable()
        || matches!(
            e,
            kv_client::Error::DeadlineExceeded(_) | kv_client::Error::OutcomeUnknown(_)
        )
}

/// Sends observations to `tx` until it is dropped or a fatal error was sent.
async fn observe(client: Client, prefix: Vec<u8>, tx: mpsc::Sender<Result<Observation>>) {
    // The leader last reported; None after a Vacant.
    let mut current: Option<KeyValue> = None;
    let mut reported = false;
    loop {
        let got = match client.kv().get(prefix.clone(), oldest()).await {
            Ok(got) => got,
            Err(e) if transient(&e) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let Some(leader) = got.kvs.into_iter().next() else {
            if current.take().is_some() || !reported {
                reported = true;
                if tx.send(Ok(Observation::Vacant)).await.is_err() {
                    return;
                }
            }
            // Wait for a candidate, then look again.
            let mut puts = client.watch().watch(
                prefix.clone(),
                WatchOptions::new()
                    .prefix()
                    .start_revision(got.revision + 1)
                    .no_delete(),
            );
            match first_event(&mut puts).await {
                Ok(_) => continue,
                Err(e) if recoverable(&e) => continue,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        };
        let same = current
            .as_ref()
            .is_some_and(|c| c.key == leader.key && c.create_revision == leader.create_revision);
        let news = match &current {
            _ if !same => Some(Observation::Elected(leader.clone())),
            // A proclamation hidden by a compaction shows as a newer value.
            Some(c) if c.mod_revision != leader.mod_revision => {
                Some(Observation::Proclaimed(leader.clone()))
            }
            _ => None,
        };
        reported = true;
        current = Some(leader.clone());
        if let Some(news) = news
            && tx.send(Ok(news)).await.is_err()
        {
            return;
        }
        // Follow the leader's key until it goes.
        let mut changes = client.watch().watch(
            leader.key.clone(),
            WatchOptions::new().start_revision(got.revision + 1),
        );
        loop {
            let update = match changes.next().await {
                Some(Ok(update)) => update,
                Some(Err(e)) if recoverable(&e) => break,
                Some(Err(e)) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
                None => break,
            };
            let mut ended = false;
            for event in update.events {
                let news = match event.kind {
                    EventKind::Put => {
                        current = Some(event.kv.clone());
                        Observation::Proclaimed(event.kv)
                    }
                    EventKind::Delete => {
                        current = None;
                        ended = true;
                        Observation::Vacant
                    }
                };
                if tx.send(Ok(news)).await.is_err() {
                    return;
                }
            }
            if ended {
                break;
            }
        }
    }
}

/// Watch errors after which reading again is the cure.
fn recoverable(e: &kv_client::Error) -> bool {
    transient(e) || matches!(e, kv_client::Error::WatchCompacted { .. })
}

/// The first event of a watch (or its error).
async fn first_event(
    updates: &mut kv_client::WatchStream,
) -> std::result::Result<(), kv_client::Error> {
    while let Some(update) = updates.next().await {
        if !update?.events.is_empty() {
            return Ok(());
        }
    }
    Ok(())
}

/// Being the leader of an election. Dropping it resigns in the background;
/// [`Leadership::detach`] keeps the leadership (until the session ends) without the handle.
#[derive(Debug)]
pub struct Leadership {
    owned: OwnedKey,
}

impl Leadership {
    /// Takes back a leadership known by its key and create revision (as the Election service's
    /// callers hold it). Nothing is checked: a stale one fails its next call with
    /// [`Error::NotLeader`]. Dropping the handle does not resign (only [`Leadership::resign`]
    /// does), so a call cancelled halfway cannot end a leadership it was only borrowing.
    pub fn resume(session: &Session, key: impl Into<Vec<u8>>, revision: i64) -> Leadership {
        Leadership {
            owned: OwnedKey::resume(session, key.into(), revision),
        }
    }

    /// The leader key.
    pub fn key(&self) -> &[u8] {
        self.owned.key()
    }

    /// The leader key's create revision.
    pub fn revision(&self) -> i64 {
        self.owned.revision()
    }

    /// The fencing token: increases from one leader to the next.
    pub fn fence(&self) -> Fence {
        self.owned.fence()
    }

    /// A compare that holds only while this leadership lasts, for the leader's own writes.
    pub fn is_leader(&self) -> kv_client::Compare {
        self.owned.is_owner()
    }

    /// A transaction that runs its success branch only while this leadership lasts.
    pub fn txn(&self) -> Txn {
        Txn::new().when([self.is_leader()])
    }

    /// Resolves when the leadership ends without [`Leadership::resign`].
    pub async fn lost(&self) -> Loss {
        self.owned.lost().await
    }

    /// Publishes a new value as the leader; [`Error::NotLeader`] if leadership was lost.
    pub async fn proclaim(&self, value: impl AsRef<[u8]>) -> Result<()> {
        let session = self.owned.session();
        let put = TxnOp::put(
            self.owned.key(),
            value.as_ref(),
            PutOptions::new().lease(session.lease()),
        );
        let resp = session
            .client()
            .kv()
            .txn(self.txn().and_then([put]))
            .await?;
        if resp.succeeded {
            Ok(())
        } else {
            Err(Error::NotLeader)
        }
    }

    /// Steps down (deletes the leader key if it is still ours); the next candidate leads.
    pub async fn resign(self) -> Result<()> {
        self.owned.release().await.map(|_| ())
    }

    /// Gives up the handle but not the leadership: it lasts until resigned through
    /// [`Leadership::resume`] or until the session ends.
    pub fn detach(self) -> Fence {
        self.owned.detach()
    }
}
