//! A distributed mutex, compatible with etcd's `concurrency.Mutex`: Go and Rust processes
//! locking the same name exclude each other.
//!
//! Key layout: a contender writes `<name>/<lease id in hex>` (empty value) on its session's
//! lease. The holder is the key with the lowest create revision; the others wait, each for
//! the deletion of the newest key created before its own (FIFO, no herd). The holder's create
//! revision is its fencing token.

use kv_client::TxnOp;

use crate::error::{Error, Result};
use crate::owned::{Guard, OwnedKey, claim};
use crate::predecessor::{oldest, wait_older_gone};
use crate::session::Session;

/// A named lock over a session. Each session holds a given name at most once: locking again
/// while holding answers at once with the same key, as etcd's mutex does.
#[derive(Debug, Clone)]
pub struct Mutex {
    session: Session,
    prefix: Vec<u8>,
    key: Vec<u8>,
}

impl Mutex {
    /// The lock `name` for `session`.
    pub fn new(session: &Session, name: impl AsRef<[u8]>) -> Mutex {
        let prefix = [name.as_ref(), b"/"].concat();
        let key = [&prefix[..], format!("{:x}", session.lease()).as_bytes()].concat();
        Mutex {
            session: session.clone(),
            prefix,
            key,
        }
    }

    /// This session's key for the lock.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Writes our key (if absent) and says whether it is the oldest.
    async fn enqueue(&self) -> Result<(OwnedKey, bool)> {
        let read_holder = TxnOp::get(self.prefix.clone(), oldest());
        let claimed = claim(&self.session, &self.key, b"", vec![read_holder]).await?;
        let owned = claimed.owned;
        let holder = claimed.reads[0].kvs.first().map(|kv| kv.create_revision);
        let first = holder == Some(owned.revision());
        Ok((owned, first))
    }

    /// Takes the lock, waiting for the earlier contenders to release it. Fails if the session
    /// ends while waiting. Dropping the future gives up the place in the queue.
    pub async fn lock(&self) -> Result<Guard> {
        let (owned, first) = self.enqueue().await?;
        if first {
            // The claim itself found us oldest; the session is checked locally.
            self.session.check()?;
        } else {
            let client = self.session.client();
            let older_gone = wait_older_gone(client, &self.prefix, &owned);
            owned.wait_turn(older_gone).await?;
        }
        Ok(Guard::new(owned))
    }

    /// Takes the lock if nobody holds or waits for it; otherwise [`Error::Locked`].
    pub async fn try_lock(&self) -> Result<Guard> {
        let (owned, first) = self.enqueue().await?;
        if first {
            return Ok(Guard::new(owned));
        }
        owned.release().await?;
        Err(Error::Locked)
    }

    /// The key and create revision of the current holder, if any.
    pub async fn holder(&self) -> Result<Option<kv_client::KeyValue>> {
        let got = self
            .session
            .client()
            .kv()
            .get(self.prefix.clone(), oldest())
            .await?;
        Ok(got.kvs.into_iter().next())
    }
}
