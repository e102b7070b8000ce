//! Membership: list, add, remove, update and promote members.

use kv_core::proto::etcdserverpb::{
    Member as ProtoMember, MemberAddRequest, MemberListRequest, MemberPromoteRequest,
    MemberRemoveRequest, MemberUpdateRequest,
};

use crate::client::{Client, Idempotence, api};
use crate::error::Result;

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: u64,
    /// Its name (empty until a newly added member has started).
    pub name: String,
    /// Where its peers reach it.
    pub peer_urls: Vec<String>,
    /// Where clients reach it (empty until it has started).
    pub client_urls: Vec<String>,
    /// A learner receives the log but does not vote.
    pub is_learner: bool,
}

impl From<ProtoMember> for Member {
    fn from(m: ProtoMember) -> Self {
        Self {
            id: m.id,
            name: m.name,
            peer_urls: m.peer_ur_ls,
            client_urls: m.client_ur_ls,
            is_learner: m.is_learner,
        }
    }
}

/// The membership API of a [`Client`]. Changes are not retried when their outcome is unknown:
/// list the members to find out.
#[derive(Debug, Clone)]
pub struct Cluster {
    client: Client,
}

impl Cluster {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Every member, voters and learners.
    pub async fn members(&self) -> Result<Vec<Member>> {
        let resp = self
            .client
            .call(Idempotence::Safe, |channel| async move {
                Ok(api::cluster(channel)
                    .member_list(MemberListRequest { linearizable: true })
                    .await?
                    .into_inner())
            })
            .await?;
        Ok(resp.members.into_iter().map(Member::from).collect())
    }

    /// Adds a member reachable at `peer_urls` (as a learner if asked); returns it.
    pub async fn add(&self, peer_urls: Vec<String>, is_learner: bool) -> Result<Member> {
        let req = MemberAddRequest {
            peer_ur_ls: peer_urls,
            is_learner,
        };
        let resp = self
            .client
            .call(Idempotence::Unsafe, |channel| {
                let req = req.clone();
                async move { Ok(api::cluster(channel).member_add(req).await?.into_inner()) }
            })
            .await?;
        Ok(resp.member.map(Member::from).unwrap_or(Member {
            id: 0,
            name: String::new(),
            peer_urls: req.peer_ur_ls,
            client_urls: Vec::new(),
            is_learner,
        }))
    }

    /// Removes member `id`; returns the members left.
    pub async fn remove(&self, id: u64) -> Result<Vec<Member>> {
        let resp = self
            .client
            .call(Idempotence::Unsafe, |channel| async move {
                Ok(api::cluster(channel)
                    .member_remove(MemberRemoveRequest { id })
                    .await?
                    .into_inner())
            })
            .await?;
        Ok(resp.members.into_iter().map(Member::from).collect())
    }

    /// Changes member `id`'s peer URLs; returns the members.
    pub async fn update(&self, id: u64, peer_urls: Vec<String>) -> Result<Vec<Member>> {
        let req = MemberUpdateRequest {
            id,
            peer_ur_ls: peer_urls,
        };
        let resp = self
            .client
            .call(Idempotence::Unsafe, |channel| {
                let req = req.clone();
                async move { Ok(api::cluster(channel).member_update(req).await?.into_inner()) }
            })
            .await?;
        Ok(resp.members.into_iter().map(Member::from).collect())
    }

    /// Makes learner `id` a voter; returns the members.
    pub async fn promote(&self, id: u64) -> Result<Vec<Member>> {
        let resp = self
            .client
            .call(Idempotence::Unsafe, |channel| async move {
                Ok(api::cluster(channel)
                    .member_promote(MemberPromoteRequest { id })
                    .await?
                    .into_inner())
            })
            .await?;
        Ok(resp.members.into_iter().map(Member::from).collect())
    }
}
