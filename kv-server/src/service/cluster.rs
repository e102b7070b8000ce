//! `etcdserverpb.Cluster`: MemberList from Raft's membership and the attributes members
//! publish; MemberAdd/Remove/Update/Promote as Raft membership changes on the leader.

use std::sync::Arc;

use kv_core::proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse, cluster_server::Cluster,
};
use kv_core::proto::kvserverpb::MemberAttributes;
use tonic::{Code, Request, Response, Status};

use crate::auth::Credentials;
use crate::config::parse_url;
use crate::identity::member_id;
use crate::node::Node;
use crate::propose_as;
use crate::raft::{MemberChange, MemberChangeError};

/// The Cluster service.
pub struct ClusterService {
    node: Arc<Node>,
}

/// etcd's status for a refused membership change.
pub fn change_status(e: &MemberChangeError) -> Status {
    let code = match e {
        MemberChangeError::NotFound => Code::NotFound,
        MemberChangeError::NotLeader | MemberChangeError::Raft(_) => Code::Unavailable,
        _ => Code::FailedPrecondition,
    };
    Status::new(code, e.to_string())
}

fn bad_urls() -> Status {
    Status::invalid_argument("etcdserver: given member URLs are invalid")
}

/// Checks peer URLs as etcd does: at least one, each a valid http URL.
fn check_urls(urls: &[String]) -> Result<(), Status> {
    if urls.is_empty() || urls.iter().any(|u| parse_url("peer-urls", u).is_err()) {
        return Err(bad_urls());
    }
    Ok(())
}

impl ClusterService {
    /// A Cluster service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Every member: Raft's membership, with the names and client URLs members published
    /// (empty for a member that has not started yet, as etcd shows it).
    pub fn member_list(node: &Node) -> Vec<Member> {
        let published = node.store.members();
        node.raft
            .members()
            .into_iter()
            .map(|m| {
                let attrs = published.get(&m.id);
                Member {
                    id: m.id,
                    name: attrs.map(|a| a.name.clone()).unwrap_or_default(),
                    peer_ur_ls: vec![m.peer_url],
                    client_ur_ls: attrs.map(|a| a.client_ur_ls.clone()).unwrap_or_default(),
                    is_learner: m.learner,
                }
            })
            .collect()
    }

    fn header(&self) -> Option<kv_core::proto::etcdserverpb::ResponseHeader> {
        self.node.header(self.node.store.revision())
    }
}

impl ClusterService {
    /// Refuses a membership change from a caller without the root role.
    async fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let caller = self.node.caller(&Credentials::of(request)).await?;
        self.node.check(|a| a.check_admin(&caller))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.admin(&request).await?;
        let req = request.into_inner();
        check_urls(&req.peer_ur_ls)?;
        let id = member_id(&req.peer_ur_ls, &self.node.identity.cluster_token);
        let change = MemberChange::Add {
            id,
            peer_url: req.peer_ur_ls[0].clone(),
            learner: req.is_learner,
        };
        self.node
            .raft
            .change_members(change)
            .await
            .map_err(|e| change_status(&e))?;
        Ok(Response::new(MemberAddResponse {
            header: self.header(),
            member: Some(Member {
                id,
                name: String::new(),
                peer_ur_ls: req.peer_ur_ls,
                client_ur_ls: Vec::new(),
                is_learner: req.is_learner,
            }),
            members: Self::member_list(&self.node),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.admin(&request).await?;
        let id = request.into_inner().id;
        self.node
            .raft
            .change_members(MemberChange::Remove { id })
            .await
            .map_err(|e| change_status(&e))?;
        // Forget its published attributes too (best effort: MemberList shows only members
        // Raft knows, so stale attributes are invisible anyway).
        let forget = MemberAttributes {
            member: Some(Member {
                id,
                ..Default::default()
            }),
            removed: true,
        };
        let _ = propose_as!(self.node, MemberAttributes, forget);
        Ok(Response::new(MemberRemoveResponse {
            header: self.header(),
            members: Self::member_list(&self.node),
        }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.admin(&request).await?;
        let req = request.into_inner();
        check_urls(&req.peer_ur_ls)?;
        self.node
            .raft
            .change_members(MemberChange::Update {
                id: req.id,
                peer_url: req.peer_ur_ls[0].clone(),
            })
            .await
            .map_err(|e| change_status(&e))?;
        Ok(Response::new(MemberUpdateResponse {
            header: self.header(),
            members: Self::member_list(&self.node),
        }))
    }

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        // Any user may list members (etcd 3.5.29 and later).
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        self.node.check(|a| a.check_authenticated(&caller))?;
        Ok(Response::new(MemberListResponse {
            header: self.header(),
            members: Self::member_list(&self.node),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.admin(&request).await?;
        let id = request.into_inner().id;
        self.node
            .raft
            .change_members(MemberChange::Promote { id })
            .await
            .map_err(|e| change_status(&e))?;
        Ok(Response::new(MemberPromoteResponse {
            header: self.header(),
            members: Self::member_list(&self.node),
        }))
    }
}

/// Publishes this member's name and client URLs through the log once it runs (as etcd does),
/// retrying until a leader accepts them; does nothing when the cluster already has them.
pub async fn publish_attributes(node: Arc<Node>, cancel: tokio_util::sync::CancellationToken) {
    let me = Member {
        id: node.identity.member_id,
        name: node.identity.name.clone(),
        peer_ur_ls: node.identity.peer_urls.clone(),
        client_ur_ls: node.client_urls.clone(),
        is_learner: false,
    };
    loop {
        if node.store.members().get(&me.id) == Some(&me) {
            return;
        }
        let req = MemberAttributes {
            member: Some(me.clone()),
            removed: false,
        };
        if propose_as!(node, MemberAttributes, req).is_ok() {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}
