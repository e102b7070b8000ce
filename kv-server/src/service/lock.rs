//! `v3lockpb.Lock`: Lock and Unlock, etcd's lock service, over [`recipes::Mutex`].
//!
//! As in etcd, the lock is `<name>/<lease hex>` on the caller's lease: the service takes the
//! lock and hands the key back; the caller keeps the lease alive and unlocks by deleting the
//! key (or lets the lease end).

use std::sync::Arc;

use kv_client::DeleteOptions;
use kv_core::proto::v3lockpb::{
    LockRequest, LockResponse, UnlockRequest, UnlockResponse, lock_server::Lock,
};
use recipes::Mutex;
use tonic::{Request, Response, Status};

use crate::auth::Credentials;
use crate::errors::{client_status, recipe_status};
use crate::node::Node;
use crate::service::loopback::{Loopback, authorize, authorize_key};

/// The Lock service.
pub struct LockService {
    node: Arc<Node>,
    loopback: Loopback,
}

impl LockService {
    /// A Lock service answering for `node`, running the recipe over `loopback`.
    pub fn new(node: Arc<Node>, loopback: Loopback) -> Self {
        Self { node, loopback }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    /// Waits as long as it takes. A caller that gives up cancels the call, which drops this
    /// future and with it the recipe's wait, and that deletes the waiting key (etcd unlocks in
    /// that case too).
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        authorize(
            &self.node,
            &Credentials::of(&request),
            &request.get_ref().name,
            request.get_ref().lease,
            true,
        )
        .await?;
        let req = request.into_inner();
        let fence = self
            .loopback
            .unless_stopped(async {
                // The session renews the lease while we wait, and is dropped (renewals stop,
                // the lease stays) once the lock is taken. etcd orphans its session before
                // waiting, so there a waiter's lease must be kept alive by the caller all
                // along; renewing it here as well changes nothing for a caller that does, and
                // a waiting caller that vanishes cancels the call (which deletes its key)
                // rather than relying on its lease to expire.
                let session = self
                    .loopback
                    .session(req.lease)
                    .await
                    .map_err(|e| recipe_status(&e))?;
                let guard = Mutex::new(&session, &req.name)
                    .lock()
                    .await
                    .map_err(|e| recipe_status(&e))?;
                // The key stays: from here on it is the caller's to delete.
                Ok(guard.detach())
            })
            .await?;
        // The store has applied our key; a follower's may lag the write it forwarded.
        let revision = self.node.store.revision().max(fence.revision);
        Ok(Response::new(LockResponse {
            header: self.node.header(revision),
            key: fence.key,
        }))
    }

    /// A plain delete of the key, whoever holds it, as etcd does.
    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        authorize_key(
            &self.node,
            &Credentials::of(&request),
            &request.get_ref().key,
        )
        .await?;
        let req = request.into_inner();
        let client = self
            .loopback
            .client()
            .await
            .map_err(|e| client_status(&e))?;
        let deleted = client
            .kv()
            .delete(&req.key, DeleteOptions::new())
            .await
            .map_err(|e| client_status(&e))?;
        Ok(Response::new(UnlockResponse {
            header: self.node.header(deleted.revision),
        }))
    }
}
