//! The peer network, server side: `kvserverpb.Peer` on the peer URL, handing openraft's RPCs
//! to the local Raft and serving followers' forwarded proposals and read-index requests.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kv_core::proto::kvserverpb::{PeerRequest, PeerResponse, peer_server::Peer};
use openraft::ReadPolicy;
use openraft::raft::AppendEntriesRequest;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status, Streaming};

use super::types::{Snapshot, SnapshotMeta, TypeConfig, Vote};
use super::{Applier, ForwardError, MemberChange, MemberChangeError, RaftNode, forward};
use crate::service::BoxStream;

/// Answers to forwarded writes queued for one follower's stream before its proposers wait.
const FORWARDED_ANSWERS: usize = 1024;

/// The Peer service of one member.
pub struct PeerService<A: Applier> {
    node: RaftNode<A>,
    cluster_id: u64,
}

impl<A: Applier> PeerService<A> {
    /// Serves peers of cluster `cluster_id` from `node`.
    pub fn new(node: RaftNode<A>, cluster_id: u64) -> Self {
        Self { node, cluster_id }
    }

    fn open<T: DeserializeOwned>(&self, req: Request<PeerRequest>) -> Result<T, Status> {
        let req = req.into_inner();
        self.check_cluster(&req)?;
        decode(&req.data)
    }

    fn check_cluster(&self, req: &PeerRequest) -> Result<(), Status> {
        check_cluster(self.cluster_id, req)
    }
}

/// Refuses a message from another cluster, or any message while this member is isolated.
fn check_cluster(cluster_id: u64, req: &PeerRequest) -> Result<(), Status> {
    if crate::failpoint::isolated() {
        return Err(Status::unavailable("isolated by failpoint"));
    }
    if req.cluster_id != cluster_id {
        return Err(Status::failed_precondition(format!(
            "peer belongs to cluster {:x}, this member to {:x}",
            req.cluster_id, cluster_id
        )));
    }
    Ok(())
}

/// A peer message's payload.
fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, Status> {
    postcard::from_bytes(data)
        .map_err(|e| Status::invalid_argument(format!("undecodable peer message: {e}")))
}

/// An answer's payload.
fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    postcard::to_allocvec(value)
        .map_err(|e| Status::internal(format!("cannot encode peer answer: {e}")))
}

fn answer<T: Serialize>(value: &T) -> Result<Response<PeerResponse>, Status> {
    Ok(Response::new(PeerResponse {
        data: encode(value)?,
    }))
}

fn stopped(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft stopped: {e}"))
}

#[tonic::async_trait]
impl<A: Applier> Peer for PeerService<A> {
    async fn append_entries(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerResponse>, Status> {
        let rpc = self.open(request)?;
        let resp = self
            .node
            .raft()
            .append_entries(rpc)
            .await
            .map_err(stopped)?;
        // A leader of this cluster reached us, unless it was refused as stale.
        if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_)) {
            self.node.leader_contacted();
        }
        answer(&resp)
    }

    type StreamAppendStream = BoxStream<PeerResponse>;

    async fn stream_append(
        &self,
        request: Request<Streaming<PeerRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let cluster_id = self.cluster_id;
        // A bad message ends the requests; the answers to the good ones before it still go
        // back, then the stream ends with the reason.
        let refused: Arc<Mutex<Option<Status>>> = Arc::default();
        let refusal = refused.clone();
        let node = self.node.clone();
        let requests = request.into_inner().scan((), move |_, message| {
            let opened = message.and_then(|m| {
                check_cluster(cluster_id, &m)?;
                decode::<AppendEntriesRequest<TypeConfig>>(&m.data)
            });
            std::future::ready(match opened {
                Ok(req) => Some(req),
                Err(status) => {
                    *refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                    None
                }
            })
        });
        let answers = self.node.raft().stream_append(requests).map(move |result| {
            let result = result.map_err(stopped)?;
            // Accepted (or a log conflict, which a live leader resolves): a leader of this
            // cluster reached us. A refusal for a higher vote is a stale leader.
            if !matches!(
                result,
                Err(openraft::raft::StreamAppendError::HigherVote(_))
            ) {
                node.leader_contacted();
            }
            let data = encode(&result)?;
            Ok(PeerResponse { data })
        });
        let last = futures::stream::once(async move {
            refused.lock().unwrap_or_else(|e| e.into_inner()).take()
        })
        .filter_map(|refusal| std::future::ready(refusal.map(Err)));
        Ok(Response::new(Box::pin(answers.chain(last))))
    }

    async fn vote(&self, request: Request<PeerRequest>) -> Result<Response<PeerResponse>, Status> {
        let rpc = self.open(request)?;
        let resp = self.node.raft().vote(rpc).await.map_err(stopped)?;
        answer(&resp)
    }

    async fn pre_vote(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerResponse>, Status> {
        let rpc = self.open(request)?;
        let resp = self.node.raft().pre_vote(rpc).await.map_err(stopped)?;
        answer(&resp)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<PeerRequest>>,
    ) -> Result<Response<PeerResponse>, Status> {
        let mut stream = request.into_inner();
        let head = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check_cluster(&head)?;
        let (vote, meta): (Vote, SnapshotMeta) = postcard::from_bytes(&head.data)
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot header: {e}")))?;
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            self.check_cluster(&chunk)?;
            data.extend_from_slice(&chunk.data);
        }
        let snapshot = Snapshot {
            meta,
            snapshot: std::io::Cursor::new(data),
        };
        let resp = self
            .node
            .raft()
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(stopped)?;
        answer(&resp)
    }

    async fn transfer_leader(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerResponse>, Status> {
        let req = self.open(request)?;
        let resp = self
            .node
            .raft()
            .handle_transfer_leader(req)
            .await
            .map_err(stopped)?;
        answer(&resp)
    }

    async fn propose(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerResponse>, Status> {
        let req = request.into_inner();
        self.check_cluster(&req)?;
        let result: Result<Vec<u8>, ForwardError> = self.node.propose_here(req.data, None).await;
        answer(&result)
    }

    type ProposeStreamStream = BoxStream<PeerResponse>;

    async fn propose_stream(
        &self,
        request: Request<Streaming<PeerRequest>>,
    ) -> Result<Response<Self::ProposeStreamStream>, Status> {
        let meant = request
            .metadata()
            .get(forward::MEANT_LEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(forward::parse_leader);
        let mut inbound = request.into_inner();
        let (answers, rx) = tokio::sync::mpsc::channel(FORWARDED_ANSWERS);
        let (node, cluster_id) = (self.node.clone(), self.cluster_id);
        // Each write is proposed as it arrives, without waiting for those before it, as the
        // unary calls were; the answers go back as they come.
        tokio::spawn(async move {
            loop {
                let opened = inbound.message().await.and_then(|message| {
                    let Some(message) = message else {
                        return Ok(None);
                    };
                    check_cluster(cluster_id, &message)?;
                    forward::unframe(message.data)
                        .map(Some)
                        .ok_or_else(|| Status::invalid_argument("forwarded write without an id"))
                });
                let (id, cmd) = match opened {
                    Ok(Some(write)) => write,
                    Ok(None) => break,
                    Err(status) => {
                        let _ = answers.send(Err(status)).await;
                        break;
                    }
                };
                let (node, answers) = (node.clone(), answers.clone());
                tokio::spawn(async move {
                    let result: Result<Vec<u8>, ForwardError> = node.propose_here(cmd, meant).await;
                    let answer = encode(&result).map(|body| PeerResponse {
                        data: forward::frame(id, &body),
                    });
                    let _ = answers.send(answer).await;
                });
            }
        });
        let mut response =
            Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
                as Self::ProposeStreamStream);
        // Tells the follower its writes are appended only by the leader they were meant for.
        if let Some(value) = meant.and_then(|m| forward::leader_text(m).parse().ok()) {
            response.metadata_mut().insert(forward::MEANT_LEADER, value);
        }
        Ok(response)
    }

    async fn read_index(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerResponse>, Status> {
        let req = request.into_inner();
        self.check_cluster(&req)?;
        let result: Result<u64, ForwardError> = match self
            .node
            .raft()
            .get_read_linearizer(ReadPolicy::ReadIndex)
            .await
        {
            Ok(lin) => Ok(lin.read_log_id().index()),
            Err(e) => Err(ForwardError::from_read(e)),
        };
        answer(&result)
    }

    async fn change_membership(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerResponse>, Status> {
        let change: MemberChange = self.open(request)?;
        let result: Result<(), MemberChangeError> = self.node.change_members_here(change).await;
        answer(&result)
    }

    async fn leader_call(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerResponse>, Status> {
        let req = request.into_inner();
        self.check_cluster(&req)?;
        let handler = self
            .node
            .leader_calls()
            .ok_or_else(|| Status::unavailable("member still starting"))?;
        Ok(Response::new(PeerResponse {
            data: handler.handle(req.data).await,
        }))
    }

    async fn hello(&self, _: Request<PeerRequest>) -> Result<Response<PeerResponse>, Status> {
        answer(&self.cluster_id)
    }
}
