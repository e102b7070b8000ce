//! `etcdserverpb.Maintenance`: Status, Alarm, Defragment, Hash, HashKV, Snapshot, MoveLeader.

use std::sync::Arc;

use kv_core::proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, DowngradeRequest,
    DowngradeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest,
    MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
    alarm_request::AlarmAction, maintenance_server::Maintenance,
};
use tonic::{Request, Response, Status};

use crate::auth::Credentials;
use crate::errors::{auth_status_unmapped, engine_status, error_status};
use crate::node::Node;
use crate::propose_as;
use crate::raft::MemberChangeError;
use crate::service::BoxStream;
use crate::service::cluster::change_status;

/// The etcd API version this server speaks; clients read it from Status.
pub const API_VERSION: &str = "3.5.0";

/// Bytes per Snapshot message (etcd sends 32 KiB chunks).
pub const SNAPSHOT_CHUNK_BYTES: usize = 32 * 1024;

/// The Maintenance service.
pub struct MaintenanceService {
    node: Arc<Node>,
}

impl MaintenanceService {
    /// A Maintenance service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Refuses a caller without the root role, the way etcd refuses Defragment, Snapshot,
    /// Hash and HashKV: with the auth error unmapped (code Unknown, `auth: ...`).
    async fn admin_only<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let caller = self.node.caller(&Credentials::of(request)).await?;
        self.node
            .store
            .auth(|a| a.check_admin(&caller))
            .map_err(|e| auth_status_unmapped(&e))
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    type SnapshotStream = BoxStream<SnapshotResponse>;

    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        let req = request.into_inner();
        // Listing alarms needs a user, raising or clearing one the root role (etcd 3.5.29);
        // apply checks again.
        self.node.check(|a| {
            if req.action == AlarmAction::Get as i32 {
                a.check_authenticated(&caller)
            } else {
                a.check_admin(&caller)
            }
        })?;
        Ok(Response::new(propose_as!(self.node, Alarm, req, &caller)?))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        self.node.check(|a| a.check_authenticated(&caller))?;
        let raft = self.node.raft.status();
        let store = self.node.store.status();
        let errors = self
            .node
            .store
            .alarms()
            .iter()
            .map(|a| format!("memberID:{} alarm:{} ", a.member_id, alarm_name(a.alarm)))
            .collect();
        Ok(Response::new(StatusResponse {
            header: self.node.header(store.revision),
            version: API_VERSION.to_string(),
            db_size: store.db_size,
            leader: raft.leader.unwrap_or(0),
            raft_index: raft.last_log_index,
            raft_term: raft.term,
            raft_applied_index: raft.applied_index,
            errors,
            db_size_in_use: store.db_size_in_use,
            is_learner: self
                .node
                .raft
                .members()
                .iter()
                .any(|m| m.id == self.node.identity.member_id && m.learner),
        }))
    }

    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.admin_only(&request).await?;
        self.node
            .read(|s| s.defragment().map_err(|e| engine_status(&e)))
            .await?;
        Ok(Response::new(DefragmentResponse {
            header: self.node.header(self.node.store.revision()),
        }))
    }

    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.admin_only(&request).await?;
        let hash = self
            .node
            .read(|s| s.hash().map_err(|e| engine_status(&e)))
            .await?;
        Ok(Response::new(HashResponse {
            header: self.node.header(self.node.store.revision()),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.admin_only(&request).await?;
        let rev = request.into_inner().revision;
        let (hash, compact_revision, _) = self
            .node
            .read(move |s| s.hash_kv(rev).map_err(|e| error_status(&e)))
            .await?;
        Ok(Response::new(HashKvResponse {
            header: self.node.header(self.node.store.revision()),
            hash,
            compact_revision,
        }))
    }

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.admin_only(&request).await?;
        let data = self
            .node
            .read(|s| s.snapshot().map_err(|e| engine_status(&e)))
            .await?;
        let header = self.node.header(self.node.store.revision());
        let framed = frame_snapshot(&data);
        let total = framed.len();
        let chunks: Vec<Result<SnapshotResponse, Status>> = framed
            .chunks(SNAPSHOT_CHUNK_BYTES)
            .scan(0usize, |sent, chunk| {
                *sent += chunk.len();
                Some(Ok(SnapshotResponse {
                    header,
                    remaining_bytes: (total - *sent) as u64,
                    blob: chunk.to_vec(),
                }))
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        self.node.check(|a| a.check_admin(&caller))?;
        let target = request.into_inner().target_id;
        match self.node.raft.transfer_leadership(target).await {
            Ok(()) => {}
            Err(MemberChangeError::NotLeader) => {
                return Err(Status::failed_precondition("etcdserver: not leader"));
            }
            Err(e) => return Err(change_status(&e)),
        }
        Ok(Response::new(MoveLeaderResponse {
            header: self.node.header(self.node.store.revision()),
        }))
    }

    async fn downgrade(
        &self,
        _: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(Status::unimplemented(
            "kv-server: cluster downgrade is not supported",
        ))
    }
}

/// An alarm's name as etcd spells it (`NOSPACE`, `CORRUPT`).
pub fn alarm_name(alarm: i32) -> &'static str {
    kv_core::proto::etcdserverpb::AlarmType::try_from(alarm)
        .map(|t| t.as_str_name())
        .unwrap_or("UNKNOWN")
}

/// Frames a store snapshot for the Snapshot stream the way etcd clients check it: the body is
/// padded to a multiple of 512 bytes and followed by its SHA-256 (etcdctl refuses a download
/// whose length is not `512 * n + 32`). Body: the snapshot's length (u64, big-endian), the
/// snapshot, zero padding.
pub fn frame_snapshot(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut out = Vec::with_capacity(data.len() + 8 + 512 + 32);
    out.extend_from_slice(&(data.len() as u64).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    let sum = sha2::Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// Recovers the store snapshot from [`frame_snapshot`] output, checking the SHA-256.
pub fn unframe_snapshot(framed: &[u8]) -> Option<&[u8]> {
    use sha2::Digest;
    if framed.len() < 8 + 32 || !(framed.len() - 32).is_multiple_of(512) {
        return None;
    }
    let (body, sum) = framed.split_at(framed.len() - 32);
    if sha2::Sha256::digest(body).as_slice() != sum {
        return None;
    }
    let len = u64::from_be_bytes(body[..8].try_into().ok()?) as usize;
    body.get(8..8 + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_frame_has_etcds_shape_and_round_trips() {
        for size in [0usize, 1, 503, 504, 505, 4096] {
            let data: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let framed = frame_snapshot(&data);
            assert_eq!(framed.len() % 512, 32);
            assert_eq!(unframe_snapshot(&framed), Some(data.as_slice()));
            let mut bad = framed.clone();
            bad[3] ^= 1;
            assert_eq!(unframe_snapshot(&bad), None);
        }
    }
}
