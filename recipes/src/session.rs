//! A session: one lease kept alive in the background, which every key a recipe writes is
//! attached to. When the process dies (or is cut off for a TTL), the lease expires and the
//! cluster deletes those keys: locks are freed, candidacies withdrawn.

use std::sync::Arc;
use std::time::Instant;

use kv_client::{Client, KeepAlive, LeaseLost};

use crate::error::{Error, Result};

/// The TTL in seconds of a session's lease unless another is asked for (etcd's default).
pub const DEFAULT_TTL: i64 = 60;

/// A kept-alive lease shared by the recipes built on it. Cheap to clone; the lease is renewed
/// while any clone exists (dropping the last one stops renewing without revoking: the lease
/// then ends after its TTL; call [`Session::close`] to end it at once).
#[derive(Clone, Debug)]
pub struct Session {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    kept: KeepAlive,
}

impl Session {
    /// Grants a lease of [`DEFAULT_TTL`] seconds and keeps it alive.
    pub async fn new(client: &Client) -> Result<Session> {
        Self::with_ttl(client, DEFAULT_TTL).await
    }

    /// Grants a lease of `ttl` seconds and keeps it alive. A short TTL frees a crashed
    /// process's locks sooner, at the price of more renewals and less tolerance of pauses.
    pub async fn with_ttl(client: &Client, ttl: i64) -> Result<Session> {
        if ttl <= 0 {
            return Err(Error::Invalid(format!("session TTL {ttl} is not positive")));
        }
        let grant = client.lease().grant(ttl, None).await?;
        match client.lease().keep_alive(grant.id).await {
            Ok(kept) => Ok(Self::from_parts(client, kept)),
            Err(e) => {
                // Nobody will use the lease: end it now rather than after its TTL.
                let _ = client.lease().revoke(grant.id).await;
                Err(e.into())
            }
        }
    }

    /// Takes over an existing lease (for example after a restart that kept the id): keeps it
    /// alive from now on. Fails with `LeaseNotFound` if it already ended.
    pub async fn resume(client: &Client, lease: i64) -> Result<Session> {
        let kept = client.lease().keep_alive(lease).await?;
        Ok(Self::from_parts(client, kept))
    }

    fn from_parts(client: &Client, kept: KeepAlive) -> Session {
        Session {
            inner: Arc::new(Inner {
                client: client.clone(),
                kept,
            }),
        }
    }

    /// The lease id, which names this session's keys.
    pub fn lease(&self) -> i64 {
        self.inner.kept.id()
    }

    /// The lease's TTL in seconds, as the server last renewed it.
    pub fn ttl(&self) -> i64 {
        self.inner.kept.ttl()
    }

    /// The client the session was made with.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Until when the lease is known to be alive: the last renewal's send time plus the TTL.
    pub fn valid_until(&self) -> Instant {
        self.inner.kept.valid_until()
    }

    /// Why the session ended, if it did.
    pub fn try_lost(&self) -> Option<LeaseLost> {
        self.inner.kept.try_lost()
    }

    /// Resolves when the session ends (revoked, expired, or not renewed before its deadline);
    /// pending while it lives.
    pub async fn lost(&self) -> LeaseLost {
        self.inner.kept.lost().await
    }

    /// Fails with [`Error::SessionLost`] if the session has ended.
    pub(crate) fn check(&self) -> Result<()> {
        match self.try_lost() {
            Some(why) => Err(Error::SessionLost(why)),
            None => Ok(()),
        }
    }

    /// Revokes the lease: every key of the session is deleted now. Closing a session that
    /// already ended succeeds.
    pub async fn close(self) -> Result<()> {
        match self.inner.client.lease().revoke(self.lease()).await {
            Ok(_) | Err(kv_client::Error::LeaseNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
