//! Membership changes (etcd's MemberAdd/Remove/Update/Promote) executed by the leader, with
//! etcd's refusals: a duplicate id or peer URL, an unknown member, promoting a voter or a
//! learner that has not caught up, and removing a voter when too few would stay active.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::BasicNode;
use openraft::ChangeMembers;
use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ChangeMembershipError, ClientWriteError};
use serde::{Deserialize, Serialize};

use super::{Applier, REQUEST_TIMEOUT, RaftError, RaftNode};

/// A member heard from within this long counts as started for the quorum check.
pub const ACTIVE_WITHIN: Duration = Duration::from_secs(5);
/// A learner may be promoted once it has at least this share of the leader's log (etcd: 90%).
pub const PROMOTE_READY_RATIO: f64 = 0.9;

/// One change to the membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// Add a member (its id is derived from its peer URLs by the caller).
    Add {
        /// The new member's id.
        id: u64,
        /// Its peer URL.
        peer_url: String,
        /// Add as a non-voting learner.
        learner: bool,
    },
    /// Remove a member.
    Remove {
        /// The member.
        id: u64,
    },
    /// Change a member's peer URL.
    Update {
        /// The member.
        id: u64,
        /// Its new peer URL.
        peer_url: String,
    },
    /// Make a learner a voter.
    Promote {
        /// The learner.
        id: u64,
    },
}

/// Why a membership change was refused. Serializable: a follower relays the leader's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MemberChangeError {
    /// The id is already a member.
    #[error("etcdserver: member ID already exist")]
    MemberExists,
    /// Another member uses the peer URL.
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    /// No such member.
    #[error("etcdserver: member not found")]
    NotFound,
    /// Promote of a voter.
    #[error("etcdserver: can only promote a learner member")]
    NotLearner,
    /// Promote of a learner that lags.
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// Removing the voter would leave fewer active voters than a quorum.
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStarted,
    /// MoveLeader to a learner.
    #[error("etcdserver: bad leader transferee")]
    NotLearnerTransferee,
    /// The receiver is not the leader (the caller retries elsewhere).
    #[error("etcdserver: not leader")]
    NotLeader,
    /// The change could not be committed in time or Raft failed.
    #[error("{0}")]
    Raft(String),
}

/// One member as Raft's membership knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftMember {
    /// Member id.
    pub id: u64,
    /// Peer URL.
    pub peer_url: String,
    /// Non-voting.
    pub learner: bool,
}

fn raft_err(e: impl std::fmt::Display) -> MemberChangeError {
    MemberChangeError::Raft(e.to_string())
}

impl<A: Applier> RaftNode<A> {
    /// The current (effective) membership.
    pub fn members(&self) -> Vec<RaftMember> {
        let rx = self.inner.raft.metrics();
        let m = rx.borrow_watched();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| RaftMember {
                id: *id,
                peer_url: node.addr.clone(),
                learner: !voters.contains(id),
            })
            .collect()
    }

    /// Executes a membership change on the leader, or forwards it there.
    pub async fn change_members(&self, change: MemberChange) -> Result<(), MemberChangeError> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            if self.inner.raft.is_leader() {
                match self.change_members_here(change.clone()).await {
                    Err(MemberChangeError::NotLeader) => {}
                    other => return other,
                }
            } else if let Some(addr) = self.leader_addr() {
                let conn = self.peer(&addr).map_err(raft_err)?;
                match conn
                    .call::<_, Result<(), MemberChangeError>>(
                        super::network::PeerCall::ChangeMembership,
                        &change,
                        deadline.saturating_duration_since(tokio::time::Instant::now()),
                    )
                    .await
                {
                    Ok(Err(MemberChangeError::NotLeader)) => {}
                    Ok(answer) => return answer,
                    Err(super::network::PeerError::NotDelivered { .. }) => {}
                    Err(e) => return Err(raft_err(RaftError::Timeout(e.to_string()))),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(raft_err("etcdserver: no leader"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Hands leadership to voter `to` (Maintenance.MoveLeader) and waits until it leads.
    /// Only the leader may do this, as in etcd.
    pub async fn transfer_leadership(&self, to: u64) -> Result<(), MemberChangeError> {
        if !self.inner.raft.is_leader() {
            return Err(MemberChangeError::NotLeader);
        }
        if to == self.inner.node_id {
            return Ok(());
        }
        let target = self.members().into_iter().find(|m| m.id == to);
        match target {
            None => return Err(MemberChangeError::NotFound),
            Some(m) if m.learner => return Err(MemberChangeError::NotLearnerTransferee),
            Some(_) => {}
        }
        self.inner
            .raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(raft_err)?;
        self.inner
            .raft
            .wait(Some(REQUEST_TIMEOUT))
            .metrics(|m| m.current_leader == Some(to), "leadership transferred")
            .await
            .map(|_| ())
            .map_err(|_| {
                MemberChangeError::Raft(
                    "etcdserver: request timed out, leader transfer took too long".into(),
                )
            })
    }

    /// The current leader's peer URL, as far as this node knows.
    pub(crate) fn leader_addr(&self) -> Option<String> {
        self.leader().map(|(_, addr)| addr)
    }

    /// The current leader's id and peer URL, as far as this node knows. Read from the server
    /// metrics, which change only with the vote, role, leader or membership (the full
    /// metrics change with every write).
    pub(crate) fn leader(&self) -> Option<(u64, String)> {
        let rx = self.inner.raft.server_metrics();
        let m = rx.borrow_watched();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// The leader, when it is another member: its peer URL, and which leader it is once this
    /// member has seen the term's vote committed.
    pub(crate) fn leader_elsewhere(&self) -> Option<super::LeaderAt> {
        let rx = self.inner.raft.server_metrics();
        let m = rx.borrow_watched();
        let leader = m.current_leader.filter(|l| *l != self.inner.node_id)?;
        let node = m.membership_config.membership().get_node(&leader)?;
        let id =
            (m.vote.committed && m.vote.leader_id.node_id == leader).then_some(m.vote.leader_id);
        Some(super::LeaderAt {
            addr: node.addr.clone(),
            id,
        })
    }

    /// Executes a membership change, on the leader only.
    pub async fn change_members_here(&self, change: MemberChange) -> Result<(), MemberChangeError> {
        if !self.inner.raft.is_leader() {
            return Err(MemberChangeError::NotLeader);
        }
        let members = self.members();
        let find = |id: u64| members.iter().find(|m| m.id == id);
        let changes: ChangeMembers<u64, BasicNode> = match &change {
            MemberChange::Add {
                id,
                peer_url,
                learner,
            } => {
                // URL first: ids derive from peer URLs, so a reused URL is the likelier cause.
                if members.iter().any(|m| &m.peer_url == peer_url) {
                    return Err(MemberChangeError::PeerUrlExists);
                }
                if find(*id).is_some() {
                    return Err(MemberChangeError::MemberExists);
                }
                let node = BasicNode::new(peer_url);
                if *learner {
                    ChangeMembers::AddNodes(BTreeMap::from([(*id, node)]))
                } else {
                    ChangeMembers::AddVoters(BTreeMap::from([(*id, node)]))
                }
            }
            MemberChange::Remove { id } => {
                let member = find(*id).ok_or(MemberChangeError::NotFound)?;
                if member.learner {
                    ChangeMembers::RemoveNodes(BTreeSet::from([*id]))
                } else {
                    self.check_quorum_after_removal(&members, *id)?;
                    ChangeMembers::RemoveVoters(BTreeSet::from([*id]))
                }
            }
            MemberChange::Update { id, peer_url } => {
                find(*id).ok_or(MemberChangeError::NotFound)?;
                if members
                    .iter()
                    .any(|m| &m.peer_url == peer_url && m.id != *id)
                {
                    return Err(MemberChangeError::PeerUrlExists);
                }
                ChangeMembers::SetNodes(BTreeMap::from([(*id, BasicNode::new(peer_url))]))
            }
            MemberChange::Promote { id } => {
                let member = find(*id).ok_or(MemberChangeError::NotFound)?;
                if !member.learner {
                    return Err(MemberChangeError::NotLearner);
                }
                if !self.learner_ready(*id) {
                    return Err(MemberChangeError::LearnerNotReady);
                }
                ChangeMembers::AddVoterIds(BTreeSet::from([*id]))
            }
        };
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let committed = loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let commit = self.inner.raft.change_membership(changes.clone(), false);
            match tokio::time::timeout(remaining, commit).await {
                // A previous change (or a new leader's first membership entry) is not committed
                // yet: it will be shortly, so wait and try again, as etcd queues conf changes.
                Ok(Err(openraft::errors::RaftError::APIError(
                    ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_)),
                ))) if !remaining.is_zero() => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => break other,
            }
        };
        match committed {
            Ok(Ok(_)) => {
                if let MemberChange::Remove { id } = change {
                    // A removed learner stays in the node list unless dropped as well.
                    let still_there = self.members().iter().any(|m| m.id == id);
                    if still_there {
                        let drop_node = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
                        self.inner
                            .raft
                            .change_membership(drop_node, false)
                            .await
                            .map_err(raft_err)?;
                    }
                }
                Ok(())
            }
            Ok(Err(openraft::errors::RaftError::APIError(ClientWriteError::ForwardToLeader(
                _,
            )))) => Err(MemberChangeError::NotLeader),
            Ok(Err(e)) => Err(raft_err(e)),
            Err(_) => Err(raft_err("etcdserver: request timed out")),
        }
    }

    /// etcd's strict reconfiguration check: after removing `id`, the voters this leader has
    /// heard from recently must still form a quorum of the remaining voters.
    fn check_quorum_after_removal(
        &self,
        members: &[RaftMember],
        id: u64,
    ) -> Result<(), MemberChangeError> {
        let rx = self.inner.raft.metrics();
        let m = rx.borrow_watched();
        let remaining: Vec<u64> = members
            .iter()
            .filter(|m| !m.learner && m.id != id)
            .map(|m| m.id)
            .collect();
        let heartbeat = m.heartbeat.clone().unwrap_or_default();
        let active = remaining
            .iter()
            .filter(|v| {
                **v == self.inner.node_id
                    || heartbeat
                        .get(*v)
                        .and_then(|t| *t)
                        .is_some_and(|t| t.into_inner().elapsed() < ACTIVE_WITHIN)
            })
            .count();
        if remaining.is_empty() || active < remaining.len() / 2 + 1 {
            return Err(MemberChangeError::NotEnoughStarted);
        }
        Ok(())
    }

    /// True when the learner has replicated most of the leader's log.
    fn learner_ready(&self, id: u64) -> bool {
        let rx = self.inner.raft.metrics();
        let m = rx.borrow_watched();
        let last = m.last_log_index.unwrap_or(0);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&id).cloned().flatten())
            .map_or(0, |l| l.index);
        matched as f64 >= last as f64 * PROMOTE_READY_RATIO
    }
}
