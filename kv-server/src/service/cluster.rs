//! `etcdserverpb.Cluster`: MemberList for this member. Membership changes arrive with the
//! replication issue and answer `Unimplemented` until then.

use std::sync::Arc;

use kv_core::proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse, cluster_server::Cluster,
};
use tonic::{Request, Response, Status};

use crate::node::Node;

/// The Cluster service.
pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    /// A Cluster service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    fn membership_not_yet() -> Status {
        Status::unimplemented(
            "kv-server: membership changes are not implemented in this version (single member)",
        )
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(Self::membership_not_yet())
    }

    async fn member_remove(
        &self,
        _: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(Self::membership_not_yet())
    }

    async fn member_update(
        &self,
        _: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Self::membership_not_yet())
    }

    async fn member_list(
        &self,
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let id = &self.node.identity;
        Ok(Response::new(MemberListResponse {
            header: self.node.header(self.node.store.revision()),
            members: vec![Member {
                id: id.member_id,
                name: id.name.clone(),
                peer_ur_ls: id.peer_urls.clone(),
                client_ur_ls: self.node.client_urls.clone(),
                is_learner: false,
            }],
        }))
    }

    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(Self::membership_not_yet())
    }
}
