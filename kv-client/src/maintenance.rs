//! Maintenance: member status, alarms, defragmentation, history hashes, leader transfer,
//! snapshot downloads.

use kv_core::proto::etcdserverpb::{
    AlarmRequest, DefragmentRequest, HashKvRequest, MoveLeaderRequest, SnapshotRequest,
    SnapshotResponse, StatusRequest, alarm_request::AlarmAction,
};

use crate::client::{Client, Idempotence, api};
use crate::error::Result;

/// What a member says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The member that answered.
    pub member_id: u64,
    /// The server's version string.
    pub version: String,
    /// The leader's id (0: none known).
    pub leader: u64,
    /// The Raft term.
    pub raft_term: u64,
    /// The last log index.
    pub raft_index: u64,
    /// The last applied log index.
    pub raft_applied_index: u64,
    /// The store revision.
    pub revision: i64,
    /// Backend size in bytes.
    pub db_size: i64,
    /// Backend bytes in use.
    pub db_size_in_use: i64,
    /// The member is a learner.
    pub is_learner: bool,
    /// Raised alarms and other errors, as the server words them.
    pub errors: Vec<String>,
}

/// An alarm raised on a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alarm {
    /// The member it concerns.
    pub member_id: u64,
    /// Its type (`NOSPACE` = 1, `CORRUPT` = 2, as etcd's `AlarmType`).
    pub alarm: i32,
}

/// The maintenance API of a [`Client`].
#[derive(Debug, Clone)]
pub struct Maintenance {
    client: Client,
}

impl Maintenance {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// The status of the member the client currently talks to (see
    /// [`Client::current_endpoint`]); after a failover, of the one that answered.
    pub async fn status(&self) -> Result<Status> {
        let resp = self
            .client
            .call(Idempotence::Safe, |channel| async move {
                Ok(api::maintenance(channel)
                    .status(StatusRequest {})
                    .await?
                    .into_inner())
            })
            .await?;
        let header = resp.header.unwrap_or_default();
        Ok(Status {
            member_id: header.member_id,
            version: resp.version,
            leader: resp.leader,
            raft_term: resp.raft_term,
            raft_index: resp.raft_index,
            raft_applied_index: resp.raft_applied_index,
            revision: header.revision,
            db_size: resp.db_size,
            db_size_in_use: resp.db_size_in_use,
            is_learner: resp.is_learner,
            errors: resp.errors,
        })
    }

    /// The alarms raised in the cluster.
    pub async fn alarms(&self) -> Result<Vec<Alarm>> {
        self.alarm(AlarmAction::Get, 0, 0).await
    }

    /// Clears alarm `alarm` of member `member_id` (0 and 0: every alarm, as etcdctl's
    /// `alarm disarm` does per raised alarm); returns the alarms cleared.
    pub async fn disarm(&self, member_id: u64, alarm: i32) -> Result<Vec<Alarm>> {
        self.alarm(AlarmAction::Deactivate, member_id, alarm).await
    }

    async fn alarm(&self, action: AlarmAction, member_id: u64, alarm: i32) -> Result<Vec<Alarm>> {
        let req = AlarmRequest {
            action: action as i32,
            member_id,
            alarm,
        };
        // Listing is a read, and clearing an alarm twice clears nothing more: both are safe.
        let resp = self
            .client
            .call(Idempotence::Safe, |channel| async move {
                Ok(api::maintenance(channel).alarm(req).await?.into_inner())
            })
            .await?;
        Ok(resp
            .alarms
            .into_iter()
            .map(|a| Alarm {
                member_id: a.member_id,
                alarm: a.alarm,
            })
            .collect())
    }

    /// Gives the current member's free backend space back to the file system.
    pub async fn defragment(&self) -> Result<()> {
        self.client
            .call(Idempotence::Safe, |channel| async move {
                api::maintenance(channel)
                    .defragment(DefragmentRequest {})
                    .await
                    .map(|_| ())
            })
            .await
    }

    /// The current member's hash of the history up to `revision` (0: all), with the
    /// compaction revision it covers; members that agree hold the same history.
    pub async fn hash_kv(&self, revision: i64) -> Result<(u32, i64)> {
        let resp = self
            .client
            .call(Idempotence::Safe, |channel| async move {
                Ok(api::maintenance(channel)
                    .hash_kv(HashKvRequest { revision })
                    .await?
                    .into_inner())
            })
            .await?;
        Ok((resp.hash, resp.compact_revision))
    }

    /// Starts downloading a snapshot of the current member's state (etcd's format: the body,
    /// then its SHA-256). Chunks come with the bytes still to come, for progress.
    pub async fn snapshot(&self) -> Result<SnapshotDownload> {
        let stream = self
            .client
            .call(Idempotence::Safe, |channel| async move {
                Ok(api::maintenance(channel)
                    .snapshot(SnapshotRequest {})
                    .await?
                    .into_inner())
            })
            .await?;
        Ok(SnapshotDownload { stream })
    }

    /// Hands leadership to member `target` (the request must reach the leader).
    pub async fn move_leader(&self, target: u64) -> Result<()> {
        self.client
            .call(Idempotence::Unsafe, |channel| async move {
                api::maintenance(channel)
                    .move_leader(MoveLeaderRequest { target_id: target })
                    .await
                    .map(|_| ())
            })
            .await
    }
}

/// A snapshot being downloaded, chunk by chunk.
#[derive(Debug)]
pub struct SnapshotDownload {
    stream: tonic::Streaming<SnapshotResponse>,
}

impl SnapshotDownload {
    /// The next chunk and how many bytes remain after it; `None` once all has arrived.
    pub async fn next_chunk(&mut self) -> Result<Option<(Vec<u8>, u64)>> {
        match self.stream.message().await {
            Ok(Some(chunk)) => Ok(Some((chunk.blob, chunk.remaining_bytes))),
            Ok(None) => Ok(None),
            Err(status) => Err(crate::error::Error::from_status(&status).0),
        }
    }
}
