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

use crate::node::Node;
use crate::propose_as;
use crate::service::BoxStream;

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
        let mut req = request.into_inner();
        if req.id == NO_LEASE {
            req.id = self.node.lessor.next_id();
        }
        // Raised here, not in apply, so every member applies the same TTL whatever its flags.
        req.ttl = req.ttl.max(self.node.lessor.min_ttl());
        Ok(Response::new(propose_as!(self.node, LeaseGrant, req)?))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(propose_as!(self.node, LeaseRevoke, req)?))
    }

    type LeaseKeepAliveStream = BoxStream<LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let node = self.node.clone();
        let answers = request
            .into_inner()
            .map(move |msg| {
                let node = node.clone();
                async move {
                    let req = msg.map_err(crate::oversize::as_etcd)?;
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
        let req = request.into_inner();
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
        _: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let leases = self
            .node
            .store
            .leases()
            .into_iter()
            .map(|(id, _)| LeaseStatus { id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: self.node.header(self.node.store.revision()),
            leases,
        }))
    }
}
