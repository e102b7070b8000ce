//! A distributed readers-writer lock: readers share it, a writer holds it alone, and arrival
//! order decides, so a waiting writer is never starved by a stream of readers.
//!
//! Key layout: readers write `<name>/read/<lease hex>`, writers `<name>/write/<lease hex>`, on
//! their session's lease. A reader waits until every writer key created before its own is
//! gone; a writer waits until every key (reader or writer) created before its own is gone.
//! A reader that arrives after a waiting writer therefore queues behind it.

use crate::error::Result;
use crate::owned::{Guard, claim};
use crate::predecessor::wait_older_gone;
use crate::session::Session;

/// A named readers-writer lock over a session.
#[derive(Debug, Clone)]
pub struct RwLock {
    session: Session,
    prefix: Vec<u8>,
}

impl RwLock {
    /// The lock `name` for `session`.
    pub fn new(session: &Session, name: impl AsRef<[u8]>) -> RwLock {
        RwLock {
            session: session.clone(),
            prefix: [name.as_ref(), b"/"].concat(),
        }
    }

    fn key(&self, role: &str) -> Vec<u8> {
        [
            &self.prefix[..],
            format!("{role}/{:x}", self.session.lease()).as_bytes(),
        ]
        .concat()
    }

    /// Takes a shared hold, after the writers that arrived earlier are done.
    pub async fn read(&self) -> Result<Guard> {
        let writers = [&self.prefix[..], b"write/"].concat();
        self.acquire(self.key("read"), writers).await
    }

    /// Takes the exclusive hold, after everyone who arrived earlier is done.
    pub async fn write(&self) -> Result<Guard> {
        self.acquire(self.key("write"), self.prefix.clone()).await
    }

    /// Writes `key`, then waits for the keys under `blockers` that are older than it.
    async fn acquire(&self, key: Vec<u8>, blockers: Vec<u8>) -> Result<Guard> {
        let owned = claim(&self.session, &key, b"", vec![]).await?.owned;
        let client = self.session.client();
        owned
            .wait_turn(wait_older_gone(client, &blockers, &owned))
            .await?;
        Ok(Guard::new(owned))
    }
}
