//! The peer network, client side: openraft's RPCs to other members over gRPC on their peer
//! URLs (`kvserverpb.Peer`), plus the two calls a follower makes to the leader for clients:
//! forwarding a proposal and asking for a read index. Payloads are openraft's serde types in
//! postcard; every call carries our cluster id so a member of another cluster is refused.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};

use kv_core::proto::kvserverpb::{PeerRequest, PeerResponse, peer_client::PeerClient};
use openraft::RaftNetworkFactory;
use openraft::RaftNetworkV2;
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::RPCOption;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::types::Snapshot;
use super::types::SnapshotData;
use super::types::SnapshotMeta;
use super::types::TypeConfig;
use super::types::Vote;

/// Largest peer message (a whole snapshot travels in one, for now).
pub const MAX_PEER_MESSAGE_BYTES: usize = 1 << 30;
/// Bytes per message of a streamed snapshot.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Time to establish a peer connection.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a peer call failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer could not be reached or refused the call before handling it: nothing was done
    /// there, so the call may be retried.
    #[error("peer {addr} unavailable: {reason}")]
    NotDelivered {
        /// The peer URL.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The call failed or timed out after it may have been delivered: its effect is unknown.
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable {
        /// The peer URL.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The peer does not know the call (a member of an older version): nothing was done there.
    #[error("peer {addr} does not serve {call}")]
    Unsupported {
        /// The peer URL.
        addr: String,
        /// The call.
        call: String,
    },
    /// The peer answered with something we cannot decode.
    #[error("peer {addr} sent an undecodable answer: {reason}")]
    Garbled {
        /// The peer URL.
        addr: String,
        /// What failed.
        reason: String,
    },
}

/// A connection to one member's peer URL (lazy: connects on first use, reconnects on failure).
#[derive(Debug, Clone)]
pub struct PeerConnection {
    addr: String,
    cluster_id: u64,
    client: PeerClient<Channel>,
}

/// Which peer call to make.
#[derive(Debug, Clone, Copy)]
pub enum PeerCall {
    /// Raft replication.
    AppendEntries,
    /// Pipelined Raft replication.
    StreamAppend,
    /// A stream of forwarded client writes.
    ProposeStream,
    /// Raft election.
    Vote,
    /// Raft pre-vote.
    PreVote,
    /// Leadership transfer.
    TransferLeader,
    /// Forwarded client write.
    Propose,
    /// Read index from the leader.
    ReadIndex,
    /// Forwarded membership change.
    ChangeMembership,
    /// A request for the leader's unreplicated state (leases).
    LeaderCall,
    /// Cluster id of a member (for a member joining an existing cluster).
    Hello,
}

impl PeerConnection {
    /// A lazy connection to `addr` (a peer URL such as `http://127.0.0.1:2380`).
    pub fn new(addr: &str, cluster_id: u64, tls: &ClientTlsConfig) -> Result<Self, PeerError> {
        let unreachable = |reason: String| PeerError::Unreachable {
            addr: addr.to_string(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(PEER_CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if addr.starts_with("https://") {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| unreachable(e.to_string()))?;
        }
        let client = PeerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
        Ok(Self {
            addr: addr.to_string(),
            cluster_id,
            client,
        })
    }

    /// Sends raw bytes, bounded by `timeout`, and returns the raw answer.
    pub async fn call_raw(
        &self,
        call: PeerCall,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, PeerError> {
        if crate::failpoint::cut_off(&self.addr) {
            return Err(PeerError::NotDelivered {
                addr: self.addr.clone(),
                reason: "isolated by failpoint".into(),
            });
        }
        let mut req = tonic::Request::new(PeerRequest {
            cluster_id: self.cluster_id,
            data,
        });
        req.set_timeout(timeout);
        let mut c = self.client.clone();
        let fut = async move {
            match call {
                // The stream calls' one-request forms (`open_stream` opens the streams).
                PeerCall::AppendEntries | PeerCall::StreamAppend => c.append_entries(req).await,
                PeerCall::ProposeStream => c.propose(req).await,
                PeerCall::Vote => c.vote(req).await,
                PeerCall::PreVote => c.pre_vote(req).await,
                PeerCall::TransferLeader => c.transfer_leader(req).await,
                PeerCall::Propose => c.propose(req).await,
                PeerCall::ReadIndex => c.read_index(req).await,
                PeerCall::ChangeMembership => c.change_membership(req).await,
                PeerCall::LeaderCall => c.leader_call(req).await,
                PeerCall::Hello => c.hello(req).await,
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(resp)) => Ok(resp.into_inner().data),
            Ok(Err(status)) => Err(self.failed_call(call, status)),
            Err(_) => Err(PeerError::Unreachable {
                addr: self.addr.clone(),
                reason: format!("{call:?}: timed out after {timeout:?}"),
            }),
        }
    }

    /// Streams a snapshot: the vote and metadata first, then the data in chunks.
    pub async fn install_snapshot(
        &self,
        vote: &Vote,
        meta: &SnapshotMeta,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<SnapshotResponse<TypeConfig>, PeerError> {
        let garbled = |e: postcard::Error| PeerError::Garbled {
            addr: self.addr.clone(),
            reason: e.to_string(),
        };
        if crate::failpoint::cut_off(&self.addr) {
            return Err(PeerError::NotDelivered {
                addr: self.addr.clone(),
                reason: "isolated by failpoint".into(),
            });
        }
        let head = postcard::to_allocvec(&(vote, meta)).map_err(garbled)?;
        let cluster_id = self.cluster_id;
        let mut messages = vec![PeerRequest {
            cluster_id,
            data: head,
        }];
        messages.extend(data.chunks(SNAPSHOT_CHUNK_BYTES).map(|chunk| PeerRequest {
            cluster_id,
            data: chunk.to_vec(),
        }));
        let mut req = tonic::Request::new(tokio_stream::iter(messages));
        req.set_timeout(timeout);
        let mut c = self.client.clone();
        let answer = match tokio::time::timeout(timeout, c.install_snapshot(req)).await {
            Ok(Ok(resp)) => resp.into_inner().data,
            Ok(Err(status)) => {
                return Err(PeerError::Unreachable {
                    addr: self.addr.clone(),
                    reason: format!("InstallSnapshot: {}", status.message()),
                });
            }
            Err(_) => {
                return Err(PeerError::Unreachable {
                    addr: self.addr.clone(),
                    reason: format!("InstallSnapshot: timed out after {timeout:?}"),
                });
            }
        };
        postcard::from_bytes(&answer).map_err(garbled)
    }

    /// Opens a replication pipeline: each request of `input` is sent as soon as openraft
    /// yields it, without waiting for the answers to earlier ones, and the answers come back
    /// in order. The stream fails once an answer is owed and none has come for `ttl`.
    ///
    /// `input` is pumped by a task this pipeline owns, never handed to the HTTP/2 stream: the
    /// transport keeps polling a request body after the call is given up (an opening not
    /// answered in time, a stall), and openraft's request streams share their position, so a
    /// forgotten one went on taking requests meant for the next stream. It sent them where no
    /// one read the answers, and a follower lagged for good (the pipeline it was meant to get
    /// them from was left waiting). Dropping the pipeline now stops the pump and drops `input`.
    pub async fn stream_append<S>(
        &self,
        input: S,
        ttl: Duration,
    ) -> Result<
        impl Stream<Item = Result<StreamAppendResult<TypeConfig>, PeerError>> + use<S>,
        PeerError,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + 'static,
    {
        let owed = Arc::new(Owed::default());
        let sent = owed.clone();
        let cluster_id = self.cluster_id;
        let addr = self.addr.clone();
        // One request waits in the channel at most: openraft decides what to send next from
        // what was answered, so requests should not pile up ahead of the transport.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        // The request side ends (and the peer then ends its answers) when this member is
        // isolated, or if a request cannot be encoded, which serde types here never fail.
        // A request counts as owed once taken from openraft, so a transport that stops taking
        // them (flow control) shows as a stall too.
        let pump = tokio::spawn(async move {
            let mut input = std::pin::pin!(input);
            while let Some(req) = input.next().await {
                let data = match postcard::to_allocvec(&req) {
                    Ok(data) if !crate::failpoint::cut_off(&addr) => data,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(%addr, "cannot encode AppendEntries: {e}");
                        break;
                    }
                };
                sent.sent();
                if tx.send(PeerRequest { cluster_id, data }).await.is_err() {
                    break;
                }
            }
        });
        let pump = tokio_util::task::AbortOnDropHandle::new(pump);
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let answers = self
            .open_stream(PeerCall::StreamAppend, requests, MetadataMap::new(), ttl)
            .await?
            .into_inner();
        let addr = self.addr.clone();
        // The pump lives in the stream's state: it stops when the stream ends or is dropped.
        Ok(futures::stream::unfold(
            Some((answers, pump)),
            move |state| {
                let (owed, addr) = (owed.clone(), addr.clone());
                async move {
                    let (mut answers, pump) = state?;
                    let failed = |reason: String| {
                        Some((
                            Err(PeerError::Unreachable {
                                addr: addr.clone(),
                                reason,
                            }),
                            None,
                        ))
                    };
                    loop {
                        match tokio::time::timeout(ttl, answers.message()).await {
                            Err(_) if owed.stalled(ttl) => {
                                return failed(format!("StreamAppend: no answer for {ttl:?}"));
                            }
                            Err(_) => continue,
                            Ok(Ok(None)) => return None,
                            Ok(Err(status)) => {
                                return failed(format!("StreamAppend: {}", status.message()));
                            }
                            Ok(Ok(Some(_))) if crate::failpoint::cut_off(&addr) => {
                                return failed("StreamAppend: isolated by failpoint".into());
                            }
                            Ok(Ok(Some(answer))) => {
                                owed.answered();
                                return match postcard::from_bytes(&answer.data) {
                                    Ok(result) => Some((Ok(result), Some((answers, pump)))),
                                    Err(e) => Some((
                                        Err(PeerError::Garbled {
                                            addr: addr.clone(),
                                            reason: e.to_string(),
                                        }),
                                        None,
                                    )),
                                };
                            }
                        }
                    }
                }
            },
        ))
    }

    /// Opens a bidirectional stream (`StreamAppend` or `ProposeStream`) with `requests` as its
    /// sending half and `metadata` on its opening, waiting at most `timeout` for the peer to
    /// accept it. The answer's metadata is the peer's opening.
    pub async fn open_stream<S>(
        &self,
        call: PeerCall,
        requests: S,
        metadata: MetadataMap,
        timeout: Duration,
    ) -> Result<tonic::Response<tonic::Streaming<PeerResponse>>, PeerError>
    where
        S: Stream<Item = PeerRequest> + Send + 'static,
    {
        if crate::failpoint::cut_off(&self.addr) {
            return Err(PeerError::NotDelivered {
                addr: self.addr.clone(),
                reason: "isolated by failpoint".into(),
            });
        }
        let mut c = self.client.clone();
        let mut request = tonic::Request::new(requests);
        *request.metadata_mut() = metadata;
        let opened = async move {
            match call {
                PeerCall::StreamAppend => c.stream_append(request).await,
                PeerCall::ProposeStream => c.propose_stream(request).await,
                other => Err(tonic::Status::invalid_argument(format!(
                    "{other:?} is not a stream call"
                ))),
            }
        };
        match tokio::time::timeout(timeout, opened).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                Err(PeerError::Unsupported {
                    addr: self.addr.clone(),
                    call: format!("{call:?}"),
                })
            }
            Ok(Err(status)) => Err(self.failed_call(call, status)),
            Err(_) => Err(PeerError::Unreachable {
                addr: self.addr.clone(),
                reason: format!("{call:?}: no answer to the stream's opening in {timeout:?}"),
            }),
        }
    }

    /// The peer URL.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The cluster id every message carries.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// The error for a call the peer answered with `status`.
    fn failed_call(&self, call: PeerCall, status: tonic::Status) -> PeerError {
        // tonic reports a failed connection as Unavailable, and our Peer service answers
        // Unavailable only before handling a call (its Raft is stopped).
        if status.code() == tonic::Code::Unavailable {
            PeerError::NotDelivered {
                addr: self.addr.clone(),
                reason: format!("{call:?}: {}", status.message()),
            }
        } else {
            PeerError::Unreachable {
                addr: self.addr.clone(),
                reason: format!("{call:?}: {}", status.message()),
            }
        }
    }

    /// Sends a serde value and decodes a serde answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        call: PeerCall,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let data = postcard::to_allocvec(req).map_err(|e| PeerError::Garbled {
            addr: self.addr.clone(),
            reason: e.to_string(),
        })?;
        let answer = self.call_raw(call, data, timeout).await?;
        postcard::from_bytes(&answer).map_err(|e| PeerError::Garbled {
            addr: self.addr.clone(),
            reason: e.to_string(),
        })
    }
}

/// How many answers a replication pipeline is owed, and since when it last made progress: a
/// stream may rightly sit silent for minutes, but not while a request waits for its answer.
#[derive(Debug)]
struct Owed {
    state: Mutex<(u64, Instant)>,
}

impl Default for Owed {
    fn default() -> Self {
        Self {
            state: Mutex::new((0, Instant::now())),
        }
    }
}

impl Owed {
    fn sent(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 == 0 {
            state.1 = Instant::now();
        }
        state.0 += 1;
    }

    fn answered(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 = state.0.saturating_sub(1);
        state.1 = Instant::now();
    }

    /// True when an answer is owed and nothing has come for `ttl`.
    fn stalled(&self, ttl: Duration) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 > 0 && state.1.elapsed() >= ttl
    }
}

fn unreachable(e: PeerError) -> Unreachable<TypeConfig> {
    Unreachable::new(&e)
}

/// Creates peer connections for openraft.
#[derive(Debug, Clone)]
pub struct GrpcNetwork {
    cluster_id: u64,
    /// For `https://` peers.
    tls: ClientTlsConfig,
}

impl GrpcNetwork {
    /// A network for members of cluster `cluster_id`, dialing `https://` peers with `tls`.
    pub fn new(cluster_id: u64, tls: ClientTlsConfig) -> Self {
        Self { cluster_id, tls }
    }
}

/// openraft's client for one target member.
pub struct RaftPeer {
    conn: Result<PeerConnection, String>,
    /// Set once the target turned out not to know `StreamAppend` (a member of an older
    /// version, mid rolling upgrade): replication then goes one request at a time.
    sequential: Arc<AtomicBool>,
}

impl RaftPeer {
    fn conn(&self) -> Result<&PeerConnection, Unreachable<TypeConfig>> {
        self.conn.as_ref().map_err(Unreachable::from_string)
    }

    async fn rpc<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        call: PeerCall,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let conn = self.conn()?;
        conn.call(call, req, option.hard_ttl())
            .await
            .map_err(|e| RPCError::Unreachable(unreachable(e)))
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = RaftPeer;

    async fn new_client(&mut self, _target: u64, node: &openraft::BasicNode) -> Self::Network {
        RaftPeer {
            conn: PeerConnection::new(&node.addr, self.cluster_id, &self.tls)
                .map_err(|e| e.to_string()),
            sequential: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for RaftPeer {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(PeerCall::AppendEntries, &rpc, &option).await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        if self.sequential.load(Ordering::Relaxed) {
            return openraft::network::stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let conn = self.conn()?;
            let answers = match conn.stream_append(input, option.hard_ttl()).await {
                Ok(answers) => answers,
                Err(e @ PeerError::Unsupported { .. }) => {
                    // The requests this session took are resent by openraft's next session.
                    tracing::info!("{e}: replicating one request at a time");
                    self.sequential.store(true, Ordering::Relaxed);
                    return Err(RPCError::Unreachable(unreachable(e)));
                }
                Err(e) => return Err(RPCError::Unreachable(unreachable(e))),
            };
            let answers: BoxStream<'s, _> = Box::pin(
                answers.map(|answer| answer.map_err(|e| RPCError::Unreachable(unreachable(e)))),
            );
            Ok(answers)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(PeerCall::Vote, &rpc, &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(PeerCall::PreVote, &rpc, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let conn = self.conn()?;
        // A snapshot may take a while: allow it much longer than a heartbeat.
        let timeout = option.hard_ttl().max(Duration::from_secs(60));
        let data = snapshot.snapshot.into_inner();
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            answer = conn.install_snapshot(&vote, &snapshot.meta, data, timeout) => {
                answer.map_err(|e| StreamingError::Unreachable(unreachable(e)))
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(PeerCall::TransferLeader, &req, &option).await
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Poll};

    use tokio::net::TcpListener;
    use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
    use tonic::codegen::{Bytes, http};
    use tonic::server::NamedService;

    use super::*;

    /// A peer that accepts a stream call, answers its opening, and then neither answers nor
    /// reads anything: a member stopped (SIGSTOP) just after it took the call, while the
    /// kernel still takes the connection's bytes.
    #[derive(Clone)]
    struct Mute;

    impl NamedService for Mute {
        const NAME: &'static str = "kvserverpb.Peer";
    }

    /// A response body that never yields.
    struct Never;

    impl http_body::Body for Never {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
            Poll::Pending
        }
    }

    impl tower::Service<http::Request<tonic::body::Body>> for Mute {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
        >;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            Box::pin(async move {
                // Held unread for as long as the connection lasts.
                std::mem::forget(req);
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(tonic::body::Body::new(Never))
                    .unwrap_or_default();
                Ok(response)
            })
        }
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: Vec::new(),
        }
    }

    /// The bug behind a follower that stopped catching up after a pause: a pipeline that
    /// stalled was given up (dropped), but the transport kept its request stream and went on
    /// taking what openraft meant for the next pipeline.
    #[tokio::test]
    async fn a_pipeline_given_up_takes_no_more_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(Mute)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let conn =
            PeerConnection::new(&format!("http://{addr}"), 7, &ClientTlsConfig::new()).unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let taken = Arc::new(AtomicUsize::new(0));
        let counter = taken.clone();
        let input = UnboundedReceiverStream::new(rx).inspect(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        tx.send(heartbeat()).unwrap();
        let ttl = Duration::from_millis(100);
        let mut answers = Box::pin(conn.stream_append(input, ttl).await.unwrap());
        match tokio::time::timeout(Duration::from_secs(5), answers.next()).await {
            Ok(Some(Err(PeerError::Unreachable { reason, .. }))) => {
                assert!(reason.contains("no answer"), "{reason}")
            }
            other => panic!("the pipeline did not report the stall: {other:?}"),
        }
        drop(answers);
        let before = taken.load(Ordering::SeqCst);
        for _ in 0..10 {
            // Fails once the pipeline has dropped its input, as it should.
            let _ = tx.send(heartbeat());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            taken.load(Ordering::SeqCst),
            before,
            "a pipeline given up on went on taking requests"
        );
        assert!(
            tx.is_closed(),
            "a pipeline given up on still holds its input"
        );
        server.abort();
    }
}
