//! Tests of the Raft write path with an in-memory [`Applier`].

use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use serde::Deserialize;
use serde::Serialize;
use tempfile::TempDir;

use super::*;

/// Upper bound of every test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct MemState {
    /// Every index passed to `apply_batch`, in call order (blank/membership included).
    applied: Vec<u64>,
    /// Normal commands, in apply order.
    cmds: Vec<(u64, Vec<u8>)>,
    meta: Option<Vec<u8>>,
}

/// In-memory applier. Its "persistence" is simply surviving in the `Arc` across a restart.
#[derive(Debug, Default)]
struct MemApplier {
    state: Mutex<MemState>,
    batches: Mutex<Vec<usize>>,
    /// Times the whole state was serialized.
    serialized: std::sync::atomic::AtomicUsize,
}

impl MemApplier {
    fn state(&self) -> MemState {
        self.state.lock().unwrap().clone()
    }
}

/// Response: applied index (8 bytes BE) followed by the command echoed.
fn response_of(index: u64, cmd: &[u8]) -> Vec<u8> {
    let mut r = index.to_be_bytes().to_vec();
    r.extend_from_slice(cmd);
    r
}

impl Applier for MemApplier {
    fn apply_batch(
        &self,
        entries: Vec<(u64, Option<&[u8]>)>,
        meta: Vec<u8>,
    ) -> Result<Vec<Vec<u8>>, io::Error> {
        let mut st = self.state.lock().unwrap();
        self.batches.lock().unwrap().push(entries.len());
        let mut out = Vec::with_capacity(entries.len());
        for (index, cmd) in entries {
            st.applied.push(index);
            match cmd {
                Some(c) => {
                    st.cmds.push((index, c.to_vec()));
                    out.push(response_of(index, c));
                }
                None => out.push(Vec::new()),
            }
        }
        st.meta = Some(meta);
        Ok(out)
    }

    fn meta(&self) -> Result<Option<Vec<u8>>, io::Error> {
        Ok(self.state.lock().unwrap().meta.clone())
    }

    fn snapshot(&self, consistent: &mut dyn FnMut()) -> Result<Vec<u8>, io::Error> {
        self.serialized
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let data = postcard::to_allocvec(&*self.state.lock().unwrap()).map_err(io::Error::other);
        consistent();
        data
    }

    fn restore(&self, data: &[u8]) -> Result<(), io::Error> {
        let st: MemState = postcard::from_bytes(data).map_err(io::Error::other)?;
        *self.state.lock().unwrap() = st;
        Ok(())
    }

    fn sync(&self) -> Result<(), io::Error> {
        Ok(())
    }
}

fn cfg(dir: &TempDir) -> RaftConfig {
    RaftConfig {
        node_id: 1,
        cluster_id: 7,
        data_dir: dir.path().join("data"),
        members: [(1, "http://127.0.0.1:2380".to_string())].into(),
        bootstrap: true,
        timing: RaftTiming::default(),
        peer_tls: tonic::transport::ClientTlsConfig::new(),
    }
}

/// Checks indexes are strictly consecutive (no gap, no re-apply).
fn assert_consecutive(applied: &[u64]) {
    for w in applied.windows(2) {
        assert_eq!(
            w[0] + 1,
            w[1],
            "applied indexes not consecutive: {applied:?}"
        );
    }
}

/// Waits until the (asynchronously published) status shows `index` applied.
async fn wait_status_applied(node: &RaftNode<MemApplier>, index: u64) {
    node.raft()
        .wait(Some(Duration::from_secs(5)))
        .applied_index_at_least(Some(index), "status shows applied")
        .await
        .unwrap();
}

/// Proposes `n` commands `"{tag}-{i}"` from `tasks` concurrent tasks; checks every response.
/// Returns the (index, cmd) pairs in index order.
async fn propose_many(
    node: &RaftNode<MemApplier>,
    tag: &str,
    n: usize,
    tasks: usize,
) -> Vec<(u64, Vec<u8>)> {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let node = node.clone();
        let tag = tag.to_string();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut i = t;
            while i < n {
                let cmd = format!("{tag}-{i}").into_bytes();
                let resp = node.propose(cmd.clone()).await.expect("propose");
                assert_eq!(
                    &resp[8..],
                    &cmd[..],
                    "response must echo this proposal's command"
                );
                let index = u64::from_be_bytes(resp[..8].try_into().unwrap());
                got.push((index, cmd));
                i += tasks;
            }
            got
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort();
    assert_eq!(all.len(), n);
    for w in all.windows(2) {
        assert!(w[0].0 < w[1].0, "two proposals got the same index");
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_propose_concurrent() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new().unwrap();
        let applier = Arc::new(MemApplier::default());
        let node = RaftNode::start(cfg(&dir), applier.clone()).await.unwrap();

        let proposed = propose_many(&node, "a", 200, 200).await;

        let st = applier.state();
        assert_consecutive(&st.applied);
        assert!(
            st.applied[0] <= 1,
            "log starts at index 0 or 1: {:?}",
            &st.applied[..3]
        );
        // The applier saw exactly the proposals, in index order.
        assert_eq!(st.cmds, proposed);

        // Metrics are published by the core shortly after the clients got their responses.
        let last = *st.applied.last().unwrap();
        wait_status_applied(&node, last).await;
        let status = node.status();
        assert_eq!(status.leader, Some(1));
        assert!(status.term >= 1);
        assert_eq!(status.applied_index, *st.applied.last().unwrap());
        assert_eq!(status.commit_index, status.applied_index);
        assert_eq!(status.last_log_index, status.applied_index);

        node.shutdown().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_restart_replays_log_into_fresh_applier() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new().unwrap();
        let first = Arc::new(MemApplier::default());
        let node = RaftNode::start(cfg(&dir), first.clone()).await.unwrap();
        propose_many(&node, "b", 50, 8).await;
        node.shutdown().await.unwrap();
        drop(node);
        let before = first.state();

        // A fresh applier (meta None): openraft must replay the whole log into it.
        let second = Arc::new(MemApplier::default());
        let node = RaftNode::start(cfg(&dir), second.clone()).await.unwrap();
        let after = second.state();
        assert_eq!(
            after.cmds, before.cmds,
            "the replay must reproduce every command in order"
        );
        assert_consecutive(&after.applied);
        assert_eq!(after.applied[0], before.applied[0]);
        // Possibly followed by a blank entry of a new term (unless openraft restored the
        // leadership of the previous term).
        assert_eq!(&after.applied[..before.applied.len()], &before.applied[..]);

        // Still writable after the restart.
        let more = propose_many(&node, "b2", 10, 4).await;
        assert!(more[0].0 > *before.applied.last().unwrap());
        assert_consecutive(&second.state().applied);
        node.shutdown().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_restart_with_persisted_applier_does_not_reapply() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new().unwrap();
        let applier = Arc::new(MemApplier::default());
        let node = RaftNode::start(cfg(&dir), applier.clone()).await.unwrap();
        propose_many(&node, "c", 50, 8).await;
        node.shutdown().await.unwrap();
        drop(node);
        let before = applier.state();

        // Same applier, state and meta kept.
        let node = RaftNode::start(cfg(&dir), applier.clone()).await.unwrap();
        let after = applier.state();
        assert_eq!(&after.applied[..before.applied.len()], &before.applied[..]);
        // Nothing re-applied: indexes stay strictly consecutive (at most a new blank entry).
        assert_consecutive(&after.applied);
        assert_eq!(after.cmds, before.cmds);

        propose_many(&node, "c2", 20, 4).await;
        let st = applier.state();
        assert_consecutive(&st.applied);
        assert_eq!(st.cmds.len(), 70);
        node.shutdown().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_restart_without_saved_committed_replays_whole_log() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new().unwrap();
        let first = Arc::new(MemApplier::default());
        let node = RaftNode::start(cfg(&dir), first.clone()).await.unwrap();
        propose_many(&node, "d", 30, 8).await;
        node.shutdown().await.unwrap();
        drop(node);
        let before = first.state();

        // Simulate a crash that lost the (non-durably saved) committed log id, with a state
        // machine that lost everything too.
        let ls = LogStore::open(&cfg(&dir).data_dir).unwrap();
        ls.clear_committed().unwrap();
        drop(ls);

        let second = Arc::new(MemApplier::default());
        let node = RaftNode::start(cfg(&dir), second.clone()).await.unwrap();
        // `start` returns only once every acknowledged write is visible again.
        let after = second.state();
        assert_eq!(after.cmds, before.cmds);
        assert_consecutive(&after.applied);
        node.shutdown().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_snapshot_purge_restart() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new().unwrap();
        let applier = Arc::new(MemApplier::default());
        let node = RaftNode::start(cfg(&dir), applier.clone()).await.unwrap();
        let proposed = propose_many(&node, "e", 40, 8).await;
        let last = proposed.last().unwrap().0;

        node.raft().trigger().snapshot().await.unwrap();
        node.raft()
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.snapshot.as_ref().map(|l| l.index) >= Some(last),
                "snapshot built",
            )
            .await
            .unwrap();
        // Building one only marks the durable state: the store is serialized when a
        // follower asks for it, not every `snapshot_count` writes.
        let serialized = || applier.serialized.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(serialized(), 0);
        let snap = node
            .raft()
            .get_snapshot()
            .await
            .unwrap()
            .expect("current snapshot");
        assert!(snap.meta.last_log_id.unwrap().index >= last);
        assert_eq!(serialized(), 1);
        // What a follower would install is the state the meta names, or a later one.
        let sent: MemState = postcard::from_bytes(snap.snapshot.get_ref()).unwrap();
        assert!(sent.applied.last().copied() >= Some(last));

        node.raft().trigger().purge_log(last).await.unwrap();
        node.raft()
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.purged.as_ref().map(|l| l.index) >= Some(last),
                "log purged",
            )
            .await
            .unwrap();
        node.shutdown().await.unwrap();
        drop(node);
        let before = applier.state();

        // Restart over a purged log with the persisted applier: no snapshot in memory any more,
        // openraft rebuilds one from the applier; nothing is re-applied.
        let node = RaftNode::start(cfg(&dir), applier.clone()).await.unwrap();
        propose_many(&node, "e2", 10, 4).await;
        let st = applier.state();
        assert_eq!(&st.applied[..before.applied.len()], &before.applied[..]);
        assert_consecutive(&st.applied);
        assert_eq!(st.cmds.len(), 50);
        node.shutdown().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_read_barrier() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new().unwrap();
        let applier = Arc::new(MemApplier::default());
        let node = RaftNode::start(cfg(&dir), applier.clone()).await.unwrap();
        node.read_barrier().await.unwrap();

        let resp = node.propose(b"x".to_vec()).await.unwrap();
        let index = u64::from_be_bytes(resp[..8].try_into().unwrap());
        node.read_barrier().await.unwrap();
        assert!(applier.state().applied.last().copied() >= Some(index));
        wait_status_applied(&node, index).await;
        assert!(node.status().applied_index >= index);
        assert!(node.is_leader());

        node.shutdown().await.unwrap();
        // After shutdown, calls fail instead of hanging.
        assert!(node.propose(b"y".to_vec()).await.is_err());
        assert!(node.read_barrier().await.is_err());
    })
    .await
    .expect("test timed out");
}

/// Quick throughput check (no assertion on time): 1000 proposals from 64 concurrent tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_quick_throughput() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new().unwrap();
        let applier = Arc::new(MemApplier::default());
        let node = RaftNode::start(cfg(&dir), applier.clone()).await.unwrap();

        let n = 1000;
        let start = Instant::now();
        propose_many(&node, "t", n, 64).await;
        let elapsed = start.elapsed();
        let batches = applier.batches.lock().unwrap().clone();
        println!(
            "raft quick check: {n} proposals / 64 tasks in {elapsed:?} = {:.0} proposals/s; {} apply batches (avg {:.1} entries)",
            n as f64 / elapsed.as_secs_f64(),
            batches.len(),
            batches.iter().sum::<usize>() as f64 / batches.len() as f64,
        );
        node.shutdown().await.unwrap();
    })
    .await
    .expect("test timed out");
}

/// openraft's own conformance suite for log storage + state machine.
mod suite {
    use openraft::ErrorSubject;
    use openraft::ErrorVerb;
    use openraft::StorageError;
    use openraft::testing::log::StoreBuilder;
    use openraft::testing::log::Suite;

    use super::*;

    struct Builder;

    fn sto_err(e: io::Error) -> StorageError<TypeConfig> {
        StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Read, e)
    }

    impl StoreBuilder<TypeConfig, LogStore, StateMachine<MemApplier>, TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(TempDir, LogStore, StateMachine<MemApplier>), StorageError<TypeConfig>>
        {
            let dir = TempDir::new().map_err(sto_err)?;
            let ls = LogStore::open(dir.path()).map_err(sto_err)?;
            let sm = StateMachine::new(Arc::new(MemApplier::default()), Arc::default())
                .map_err(sto_err)?;
            Ok((dir, ls, sm))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raft_openraft_storage_suite() {
        tokio::time::timeout(TEST_TIMEOUT, Suite::test_all(Builder))
            .await
            .expect("test timed out")
            .unwrap();
    }
}

/// Three in-process members, each serving `kvserverpb.Peer` on its own loopback port.
mod three_members {
    use std::convert::Infallible;
    use std::task::{Context, Poll};

    use kv_core::proto::kvserverpb::peer_server::PeerServer;
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::codegen::http;
    use tonic::server::NamedService;

    use super::*;
    use crate::raft::peer::PeerService;

    /// A member's Peer service as a member of an older version serves it: without the two
    /// stream calls, which it answers Unimplemented as any gRPC server answers unknown methods.
    #[derive(Clone)]
    struct WithoutStreams(PeerServer<PeerService<MemApplier>>);

    impl NamedService for WithoutStreams {
        const NAME: &'static str = <PeerServer<PeerService<MemApplier>> as NamedService>::NAME;
    }

    impl tower::Service<http::Request<tonic::body::Body>> for WithoutStreams {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
        >;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.0, cx)
        }

        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            let path = req.uri().path();
            if path.ends_with("/StreamAppend") || path.ends_with("/ProposeStream") {
                let answer = tonic::Status::unimplemented("").into_http();
                return Box::pin(async move { Ok(answer) });
            }
            Box::pin(self.0.call(req))
        }
    }

    struct Cluster {
        nodes: Vec<(RaftNode<MemApplier>, Arc<MemApplier>)>,
        servers: Vec<tokio::task::JoinHandle<()>>,
        _dirs: Vec<TempDir>,
    }

    impl Cluster {
        async fn start(streams: bool) -> Self {
            let mut listeners = Vec::new();
            let mut members = BTreeMap::new();
            for id in 1..=3u64 {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let url = format!("http://{}", listener.local_addr().unwrap());
                members.insert(id, url);
                listeners.push(listener);
            }
            let (mut nodes, mut servers, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
            for (listener, id) in listeners.into_iter().zip(1..=3u64) {
                let dir = TempDir::new().unwrap();
                let config = RaftConfig {
                    node_id: id,
                    members: members.clone(),
                    ..cfg(&dir)
                };
                let applier = Arc::new(MemApplier::default());
                let node = RaftNode::start(config, applier.clone()).await.unwrap();
                let service = PeerServer::new(PeerService::new(node.clone(), 7));
                let incoming = TcpListenerStream::new(listener);
                let router = if streams {
                    tonic::transport::Server::builder().add_service(service)
                } else {
                    tonic::transport::Server::builder().add_service(WithoutStreams(service))
                };
                servers.push(tokio::spawn(async move {
                    let _ = router.serve_with_incoming(incoming).await;
                }));
                nodes.push((node, applier));
                dirs.push(dir);
            }
            Self {
                nodes,
                servers,
                _dirs: dirs,
            }
        }

        /// A member that follows an elected leader.
        async fn follower(&self) -> &RaftNode<MemApplier> {
            loop {
                let leader = self.nodes[0].0.status().leader;
                let agreed = self.nodes.iter().all(|(n, _)| n.status().leader == leader);
                if let (Some(leader), true) = (leader, agreed) {
                    let follower = self
                        .nodes
                        .iter()
                        .find(|(n, _)| n.status().node_id != leader);
                    return &follower.unwrap().0;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// Waits until every member applied `cmds`, in the same order.
        async fn all_applied(&self, cmds: &[(u64, Vec<u8>)]) {
            for (node, applier) in &self.nodes {
                wait_status_applied(node, cmds.last().unwrap().0).await;
                let got: Vec<_> = applier
                    .state()
                    .cmds
                    .into_iter()
                    .filter(|(index, _)| *index >= cmds[0].0)
                    .collect();
                assert_eq!(
                    got,
                    cmds,
                    "member {} applied other commands",
                    node.status().node_id
                );
            }
        }

        async fn stop(self) {
            for (node, _) in &self.nodes {
                node.shutdown().await.unwrap();
            }
            for server in self.servers {
                server.abort();
            }
        }
    }

    /// Proposes `n` writes from `tasks` tasks through a follower of a new cluster whose
    /// members serve the streams or not, checks that every member applied them all in one
    /// order, and returns the follower's forwarder.
    async fn forward_through_a_follower(
        streams: bool,
        n: usize,
        tasks: usize,
    ) -> Arc<forward::Forwarder> {
        let cluster = Cluster::start(streams).await;
        let follower = cluster.follower().await;
        let proposed = propose_many(follower, "f", n, tasks).await;
        cluster.all_applied(&proposed).await;
        let forwarder = follower.inner.forwarder.lock().unwrap().clone().unwrap();
        cluster.stop().await;
        forwarder
    }

    /// Writes sent to a follower are forwarded on its one stream to the leader, all of them
    /// answered with their own outcome, and every member applies them through the pipelined
    /// replication stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_writes_share_one_stream_and_replicate() {
        let forwarder =
            tokio::time::timeout(TEST_TIMEOUT, forward_through_a_follower(true, 300, 32))
                .await
                .expect("test timed out");
        assert!(forwarder.usable() && !forwarder.unsupported());
        let streamed = forwarder.streamed();
        assert!(streamed >= 300, "only {streamed} writes went on the stream");
    }

    /// Members of an older version know neither stream: writes are forwarded one call each
    /// and replication goes one request at a time, and nothing is lost on the way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_without_the_streams_still_forward_and_replicate() {
        let forwarder =
            tokio::time::timeout(TEST_TIMEOUT, forward_through_a_follower(false, 100, 8))
                .await
                .expect("test timed out");
        assert!(forwarder.unsupported(), "the forwarder knows to go unary");
        assert!(
            forwarder.usable(),
            "and is kept, so later writes go unary at once"
        );
    }

    // Forwarded writes meant for one leader, and what a follower learns of them from its log.

    /// A follower, the leader and the follower's view of it, once the leader takes writes
    /// (a new leader refuses them until a quorum acknowledged it): one forwarded from the
    /// follower has been applied.
    async fn leader_of(
        cluster: &Cluster,
    ) -> (&RaftNode<MemApplier>, &RaftNode<MemApplier>, LeaderAt) {
        let follower = cluster.follower().await;
        follower.propose(b"first".to_vec()).await.unwrap();
        let at = follower.leader_elsewhere().expect("a leader elsewhere");
        let id = at.id.expect("the leader's term");
        let leader = cluster
            .nodes
            .iter()
            .map(|(n, _)| n)
            .find(|n| n.status().node_id == id.node_id)
            .expect("the leader is a member");
        (follower, leader, at)
    }

    /// A leader appends a forwarded write only as the leader it was meant for: one meant for
    /// another term is refused before it reaches the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_meant_for_another_leader_is_refused_unapplied() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let cluster = Cluster::start(true).await;
            let (_, leader, at) = leader_of(&cluster).await;
            let id = at.id.unwrap();
            let other = types::LeaderId {
                term: id.term + 1,
                ..id
            };
            assert_eq!(
                leader
                    .propose_here(b"meant-for-another".to_vec(), Some(other))
                    .await,
                Err(ForwardError::NotLeader)
            );
            let out = leader
                .propose_here(b"meant-for-this-one".to_vec(), Some(id))
                .await
                .expect("meant for this leader");
            let index = u64::from_be_bytes(out[..8].try_into().unwrap());
            for (node, applier) in &cluster.nodes {
                wait_status_applied(node, index).await;
                let cmds: Vec<Vec<u8>> = applier.state().cmds.into_iter().map(|(_, c)| c).collect();
                assert!(cmds.contains(&b"meant-for-this-one".to_vec()));
                assert!(!cmds.contains(&b"meant-for-another".to_vec()));
            }
            cluster.stop().await;
        })
        .await
        .expect("test timed out");
    }

    /// A follower that lost a forwarded write's answer learns its fate from its own log: the
    /// outcome of its own apply when the write is there, and "lost" once a later leader's
    /// entry is applied without it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_answer_is_settled_from_the_log() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let cluster = Cluster::start(true).await;
            let (follower, leader, at) = leader_of(&cluster).await;
            let id = at.id.unwrap();
            let soon = || tokio::time::Instant::now() + Duration::from_secs(20);

            // Appended and applied, its answer never heard by the follower.
            let watch = follower.inner.outstanding.watch(b"answer-lost", id);
            let answer = leader
                .propose_here(b"answer-lost".to_vec(), Some(id))
                .await
                .unwrap();
            match follower.settle(watch, soon()).await {
                Settled::Applied(out) => assert_eq!(out, answer),
                other => panic!("expected the write applied, got {other:?}"),
            }

            // Sent to a leader that died before appending it.
            let watch = follower.inner.outstanding.watch(b"never-appended", id);
            leader.shutdown().await.unwrap();
            match follower.settle(watch, soon()).await {
                Settled::Lost => {}
                other => panic!("expected the write lost, got {other:?}"),
            }
            let later = follower.status().leader.expect("a new leader");
            assert_ne!(later, id.node_id);

            // Within its deadline and without a later leader, nothing is known.
            let now = follower.leader_elsewhere().and_then(|l| l.id);
            let meant = now.unwrap_or(types::LeaderId {
                term: u64::MAX,
                node_id: 0,
            });
            let watch = follower.inner.outstanding.watch(b"still-unknown", meant);
            let brief = tokio::time::Instant::now() + Duration::from_millis(300);
            assert!(matches!(
                follower.settle(watch, brief).await,
                Settled::Unknown
            ));

            for (node, _) in &cluster.nodes {
                if node.status().node_id != id.node_id {
                    node.shutdown().await.unwrap();
                }
            }
            for server in &cluster.servers {
                server.abort();
            }
        })
        .await
        .expect("test timed out");
    }
}
