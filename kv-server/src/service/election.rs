//! `v3electionpb.Election`: Campaign, Proclaim, Leader, Observe and Resign, etcd's election
//! service, over [`recipes::Election`].
//!
//! As in etcd, a candidacy is `<name>/<lease hex>` = value on the caller's lease, and the
//! caller holds its leadership as a `LeaderKey` (name, key, create revision, lease) that it
//! hands back to proclaim or resign. The service keeps nothing between calls.

use std::sync::Arc;

use futures::StreamExt;
use kv_client::GetOptions;
use kv_core::proto::etcdserverpb::ResponseHeader;
use kv_core::proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse, election_server::Election as ElectionRpc,
};
use recipes::{Election, Leadership, Observation};
use tonic::{Request, Response, Status};

use crate::auth::Credentials;
use crate::errors::{MISSING_LEADER_KEY, NO_LEADER, client_status, recipe_status};
use crate::node::Node;
use crate::service::BoxStream;
use crate::service::loopback::{Loopback, authorize, authorize_key};

/// The Election service.
pub struct ElectionService {
    node: Arc<Node>,
    loopback: Loopback,
}

impl ElectionService {
    /// An Election service answering for `node`, running the recipe over `loopback`.
    pub fn new(node: Arc<Node>, loopback: Loopback) -> Self {
        Self { node, loopback }
    }

    /// A header at the store's revision, or at `at_least` if the store has not applied that
    /// far yet (a follower may lag the writes it forwarded).
    fn header(&self, at_least: i64) -> Option<ResponseHeader> {
        self.node.header(self.node.store.revision().max(at_least))
    }

    /// Proclaim's answer when the leader key's lease does not exist. etcd's proclaim compares
    /// the key's create revision before it writes on the lease, so a leadership that ended
    /// with its lease (the common case: the caller's lease expired) is "not leader" there, and
    /// only a key still in place, named with a wrong lease, fails on the lease. The recipe
    /// cannot run without a live session, so that compare is made by a read here.
    async fn proclaim_without_lease(&self, leader: &LeaderKey) -> Status {
        let client = match self.loopback.client().await {
            Ok(client) => client,
            Err(e) => return client_status(&e),
        };
        match client.kv().get(&leader.key, GetOptions::new()).await {
            Ok(got) if got.kvs.first().map(|kv| kv.create_revision) == Some(leader.rev) => {
                client_status(&kv_client::Error::LeaseNotFound)
            }
            Ok(_) => recipe_status(&recipes::Error::NotLeader),
            Err(e) => client_status(&e),
        }
    }
}

#[tonic::async_trait]
impl ElectionRpc for ElectionService {
    type ObserveStream = BoxStream<LeaderResponse>;

    /// Waits until elected. A caller that gives up cancels the call, which withdraws the
    /// candidacy (deletes its key), as etcd does. The lease is renewed while waiting, as in
    /// `Lock` (see there).
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let (name, lease) = (&request.get_ref().name, request.get_ref().lease);
        authorize(&self.node, &Credentials::of(&request), name, lease, true).await?;
        let req = request.into_inner();
        let (fence, lease) = self
            .loopback
            .unless_stopped(async {
                let session = self
                    .loopback
                    .session(req.lease)
                    .await
                    .map_err(|e| recipe_status(&e))?;
                let leadership = Election::new(session.client(), &req.name)
                    .campaign(&session, &req.value)
                    .await
                    .map_err(|e| recipe_status(&e))?;
                // The leadership outlives the call: the caller resigns it by its LeaderKey.
                Ok((leadership.detach(), session.lease()))
            })
            .await?;
        Ok(Response::new(CampaignResponse {
            header: self.header(fence.revision),
            leader: Some(LeaderKey {
                name: req.name,
                key: fence.key,
                rev: fence.revision,
                lease,
            }),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let credentials = Credentials::of(&request);
        let req = request.into_inner();
        let leader = req
            .leader
            .ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))?;
        authorize_key(&self.node, &credentials, &leader.key).await?;
        let session = match self.loopback.session(leader.lease).await {
            Ok(session) => session,
            Err(recipes::Error::Client(kv_client::Error::LeaseNotFound)) => {
                return Err(self.proclaim_without_lease(&leader).await);
            }
            Err(e) => return Err(recipe_status(&e)),
        };
        // A resumed leadership does not resign when dropped, also if this call is cancelled.
        Leadership::resume(&session, leader.key, leader.rev)
            .proclaim(&req.value)
            .await
            .map_err(|e| recipe_status(&e))?;
        Ok(Response::new(ProclaimResponse {
            header: self.header(0),
        }))
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        authorize(
            &self.node,
            &Credentials::of(&request),
            &request.get_ref().name,
            0,
            false,
        )
        .await?;
        let req = request.into_inner();
        let client = self
            .loopback
            .client()
            .await
            .map_err(|e| client_status(&e))?;
        let kv = Election::new(client, &req.name)
            .leader()
            .await
            .map_err(|e| recipe_status(&e))?
            .ok_or_else(|| Status::unknown(NO_LEADER))?;
        Ok(Response::new(LeaderResponse {
            header: self.header(kv.mod_revision),
            kv: Some(kv),
        }))
    }

    /// The current leader, then every proclamation, then the next leader, and so on. Like
    /// etcd's, it says nothing while nobody leads. Headers are at the store's revision when a
    /// leader is found and at the write's revision for a proclamation, where etcd sets them.
    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        authorize(
            &self.node,
            &Credentials::of(&request),
            &request.get_ref().name,
            0,
            false,
        )
        .await?;
        let req = request.into_inner();
        let client = self
            .loopback
            .client()
            .await
            .map_err(|e| client_status(&e))?;
        let node = self.node.clone();
        // The observer's channel gives backpressure; dropping the stream (the caller went
        // away) drops the observer, which stops its task.
        let updates = Election::new(client, &req.name)
            .observe()
            // A graceful stop waits for open streams: this one ends when the member stops.
            .take_until(self.loopback.stopping().cancelled_owned())
            .filter_map(move |seen| {
                let answer = match seen {
                    Ok(Observation::Elected(kv)) => Some(Ok(LeaderResponse {
                        header: node.header(node.store.revision().max(kv.mod_revision)),
                        kv: Some(kv),
                    })),
                    Ok(Observation::Proclaimed(kv)) => Some(Ok(LeaderResponse {
                        header: node.header(kv.mod_revision),
                        kv: Some(kv),
                    })),
                    Ok(Observation::Vacant) => None,
                    // The observer ends after an error it cannot recover from.
                    Err(e) => Some(Err(recipe_status(&e))),
                };
                std::future::ready(answer)
            });
        Ok(Response::new(updates.boxed()))
    }

    /// Deletes the leader key if it is still the one named; otherwise succeeds doing nothing.
    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let credentials = Credentials::of(&request);
        let req = request.into_inner();
        let leader = req
            .leader
            .ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))?;
        authorize_key(&self.node, &credentials, &leader.key).await?;
        let session = match self.loopback.session(leader.lease).await {
            Ok(session) => session,
            // The lease ended, and with it the leader key it held: nothing is left to resign.
            // (etcd resigns without looking at the lease, so it would also delete a key of
            // that create revision held on another lease, which only a forged LeaderKey can
            // name.)
            Err(recipes::Error::Client(kv_client::Error::LeaseNotFound)) => {
                return Ok(Response::new(ResignResponse {
                    header: self.header(0),
                }));
            }
            Err(e) => return Err(recipe_status(&e)),
        };
        Leadership::resume(&session, leader.key, leader.rev)
            .resign()
            .await
            .map_err(|e| recipe_status(&e))?;
        Ok(Response::new(ResignResponse {
            header: self.header(0),
        }))
    }
}
