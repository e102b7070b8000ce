//! `etcdserverpb.Lease`: LeaseGrant, LeaseRevoke, LeaseKeepAlive, LeaseTimeToLive, LeaseLeases.
//!
//! Grant and revoke go through the log; keep-alive and time-to-live are answered by the
//! leader's lease clock ([`crate::lessor`]); the list is read from the local table, as etcd.

use std::sync::Arc;

use futures::StreamExt;
use kv_core::lease::NO_LEASE;
use kv_core::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, lease_server::Lease,
};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Credentials;
use crate::node::Node;
use crate::propose_as;
use crate::service::BoxStream;
use kv_core::auth::{Access, AuthError, AuthState, Caller, requests::LeaseKeys};

/// Keep-alives of one stream being answered at once. Responses still leave in request order;
/// the window only matters when a follower forwards them to the leader.
const KEEPALIVE_WINDOW: usize = 64;

/// The Lease service.
pub struct LeaseService {
    node: Arc<Node>,
}

impl LeaseService {
    /// A Lease service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        // Anyone authenticated may grant (etcd 3.5.28 and later).
        self.node.check(|a| a.check_authenticated(&caller))?;
        let mut req = request.into_inner();
        if req.id == NO_LEASE {
            req.id = self.node.lessor.next_id();
        }
        // Raised here, not in apply, so every member applies the same TTL whatever its flags.
        req.ttl = req.ttl.max(self.node.lessor.min_ttl());
        Ok(Response::new(propose_as!(
            self.node, LeaseGrant, req, &caller
        )?))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        let req = request.into_inner();
        // A revoke deletes the lease's keys: WRITE on all of them (checked again at apply).
        self.node.check_with_leases(|a, keys| {
            lease_keys_allowed(a, &caller, Access::Write, keys, req.id)
        })?;
        Ok(Response::new(propose_as!(
            self.node,
            LeaseRevoke,
            req,
            &caller
        )?))
    }

    type LeaseKeepAliveStream = BoxStream<LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let node = self.node.clone();
        // Each keep-alive is checked with the stream's credentials (which also keeps its
        // token alive), as etcd 3.5.28 and later check them.
        let credentials = Arc::new(Credentials::of(&request));
        let answers = request
            .into_inner()
            .map(move |msg| {
                let node = node.clone();
                let credentials = credentials.clone();
                async move {
                    let req = msg.map_err(crate::oversize::as_etcd)?;
                    let caller = node.caller(&credentials).await?;
                    node.check_with_leases(|a, keys| {
                        lease_keys_allowed(a, &caller, Access::Write, keys, req.id)
                    })?;
                    // The header is taken before the renewal, as etcd does, so a client never
                    // sees a renewal at a revision after the lease's revoke.
                    let header = node.header(node.store.revision());
                    // An unknown or expired lease is answered with TTL 0, not an error.
                    let ttl = node.lessor.renew(req.id).await?.unwrap_or(0);
                    Ok(LeaseKeepAliveResponse {
                        header,
                        id: req.id,
                        ttl,
                    })
                }
            })
            .buffered(KEEPALIVE_WINDOW);
        // The stream ends with its first error. It is answered by the task that sends the
        // responses, not by a task of its own passing them on through a channel: that hop
        // cost a wake-up per keep-alive.
        let mut failed = false;
        let answers = answers.take_while(move |answer| {
            let go_on = !failed;
            failed = answer.is_err();
            std::future::ready(go_on)
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        let req = request.into_inner();
        self.node.check_with_leases(|a, keys| {
            a.check_authenticated(&caller)?;
            if req.keys {
                // Listing the keys reads them.
                a.check_lease_keys(&caller, Access::Read, keys, req.id)?;
            }
            Ok(())
        })?;
        let header = self.node.header(self.node.store.revision());
        let resp = match self.node.lessor.time_to_live(req.id, req.keys).await? {
            Some(t) => LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: t.remaining,
                granted_ttl: t.granted,
                keys: t.keys,
            },
            // etcd answers an unknown lease with TTL -1 rather than an error.
            None => LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        // The list names leases whose keys a user may not read: all of them readable, or an
        // admin (etcd 3.5.28 and later).
        let all = self.node.store.leases();
        self.node.check_with_leases(|a, keys| {
            a.check_authenticated(&caller)?;
            all.iter()
                .try_for_each(|(id, _)| a.check_lease_keys(&caller, Access::Read, keys, *id))
        })?;
        let leases = all.into_iter().map(|(id, _)| LeaseStatus { id }).collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: self.node.header(self.node.store.revision()),
            leases,
        }))
    }
}

/// Whether `caller`, authenticated, may have `access` to every key of `lease`.
fn lease_keys_allowed(
    auth: &AuthState,
    caller: &Caller,
    access: Access,
    keys: LeaseKeys<'_>,
    lease: i64,
) -> Result<(), AuthError> {
    auth.check_authenticated(caller)?;
    auth.check_lease_keys(caller, access, keys, lease)
}
