//! Starting and stopping a member: data dir, engine, Raft, gRPC listeners, shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use kv_client::coalesce::CoalescingStream;
use kv_core::backend::RedbBackend;
use kv_core::proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer,
};
use kv_core::proto::v3electionpb::election_server::ElectionServer;
use kv_core::proto::v3lockpb::lock_server::LockServer;
use kv_core::{Store, StoreConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterState, Flags, GRPC_OVERHEAD_BYTES, url_list};
use crate::identity::{self, STATE_FILE};
use crate::lessor::{LeaseClock, Lessor};
use crate::node::{EngineApplier, Limits, Node};
use crate::raft::network::{MAX_PEER_MESSAGE_BYTES, PeerCall, PeerConnection};
use crate::raft::{PeerService, RaftConfig, RaftNode};
use crate::service::{
    auth::AuthService, cluster::ClusterService, election::ElectionService, kv::KvService,
    lease::LeaseService, lock::LockService, loopback::Loopback, maintenance::MaintenanceService,
    watch::WatchService, watch_wire::WatchServer,
};
use kv_core::proto::kvserverpb::peer_server::PeerServer;
use tonic::transport::Server;

use crate::metrics::grpc::GrpcMetricsLayer;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A flag is invalid.
    #[error(transparent)]
    Flag(#[from] crate::config::FlagError),
    /// The data dir cannot be used.
    #[error(transparent)]
    DataDir(#[from] identity::DataDirError),
    /// The engine failed to open.
    #[error("cannot open the state in {path}: {source}")]
    Engine {
        /// The state file.
        path: String,
        /// The failure.
        source: kv_core::EngineError,
    },
    /// Raft failed.
    #[error(transparent)]
    Raft(#[from] crate::raft::RaftError),
    /// Binding or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The Raft core stopped on a fatal error while serving.
    #[error("raft stopped: {0}")]
    RaftStopped(String),
    /// Joining an existing cluster failed.
    #[error("{0}")]
    Join(String),
    /// gRPC transport failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// `--restore-from` could not seed the data dir.
    #[error("--restore-from: {0}")]
    Restore(String),
}

/// A started member: its node and the addresses it listens on.
pub struct Running {
    /// The member.
    pub node: Arc<Node>,
    /// Bound client addresses (ports resolved when 0 was asked for).
    pub client_addrs: Vec<SocketAddr>,
    serving: tokio::task::JoinSet<Result<(), tonic::transport::Error>>,
    cancel: CancellationToken,
}

/// Opens the data dir, the engine and Raft, and starts serving clients.
pub async fn start(flags: &Flags) -> Result<Running, ServerError> {
    let data_dir = flags.data_dir();
    let initial_cluster = flags.initial_cluster()?;
    let retention = flags.retention()?;
    let progress_interval = flags.watch_progress_interval()?;
    let timing = flags.raft_timing()?;
    let tokens = Arc::new(crate::auth::Tokens::new(flags.token_ttl()?));
    let addrs = flags.client_addrs()?;
    let tls = crate::tls::TlsSettings::from_flags(flags)?;
    // A member joining an existing cluster learns the cluster id from its peers, as etcd does.
    let known_cluster_id =
        if flags.initial_cluster_state == ClusterState::Existing && !identity::exists(&data_dir) {
            let own: Vec<String> = url_list(&flags.initial_advertise_peer_urls);
            let peers: Vec<String> = initial_cluster
                .iter()
                .filter(|(name, url)| name != &flags.name && !own.contains(url))
                .map(|(_, url)| url.clone())
                .collect();
            Some(fetch_cluster_id(&peers, &tls.peer_client).await?)
        } else {
            None
        };
    if flags.restore_from.is_some() {
        check_restore_target(&data_dir, flags.initial_cluster_state)?;
    }
    let identity = identity::prepare(
        &data_dir,
        &flags.name,
        &flags.initial_cluster_token,
        &initial_cluster,
        known_cluster_id,
    )?;
    let state_path = data_dir.join(STATE_FILE);
    let engine_err = |source| ServerError::Engine {
        path: state_path.display().to_string(),
        source,
    };
    let backend = RedbBackend::open(&state_path).map_err(|e| engine_err(e.into()))?;
    let store = Arc::new(
        Store::open(
            Box::new(backend),
            StoreConfig {
                member_id: identity.member_id,
                quota_bytes: flags.quota_bytes(),
            },
        )
        .map_err(engine_err)?,
    );
    if let Some(file) = &flags.restore_from
        && let Err(e) = restore(&store, file).await
    {
        // The data dir was empty or absent (checked above): leave it so, for a retry.
        drop(store);
        let _ = std::fs::remove_dir_all(&data_dir);
        return Err(e);
    }
    // Watch events reach the hub on a thread of their own, off the apply path.
    {
        let store = store.clone();
        std::thread::Builder::new()
            .name("watch-feed".into())
            .spawn(move || store.run_watch_feed())?;
    }
    // Bind the peer port before starting Raft so a taken port fails the start at once.
    let mut peer_listeners = Vec::new();
    for url in flags.peer_addrs()? {
        peer_listeners.push((TcpListener::bind(url.addr).await?, url.tls));
    }
    let members = identity::initial_members(&initial_cluster, &flags.initial_cluster_token)
        .into_iter()
        .map(|(id, _, urls)| (id, urls.into_iter().next().unwrap_or_default()))
        .collect();
    let clock = Arc::new(LeaseClock::default());
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let raft = RaftNode::start(
        RaftConfig {
            node_id: identity.member_id,
            cluster_id: identity.cluster_id,
            data_dir: data_dir.clone(),
            members,
            bootstrap: flags.initial_cluster_state == ClusterState::New,
            timing,
            peer_tls: tls.peer_client.clone(),
        },
        Arc::new(EngineApplier {
            store: store.clone(),
            clock: clock.clone(),
            tokens: tokens.clone(),
            metrics: metrics.clone(),
        }),
    )
    .await?;
    let lessor = Arc::new(Lessor::new(
        store.clone(),
        raft.clone(),
        clock,
        &timing,
        identity.member_id,
        metrics,
    ));
    raft.set_leader_calls(lessor.clone());
    let node = Arc::new(Node::new(
        store,
        raft,
        identity,
        url_list(&flags.advertise_client_urls),
        Limits {
            max_request_bytes: flags.max_request_bytes,
            max_txn_ops: flags.max_txn_ops,
        },
        lessor,
        crate::auth::Callers::new(tokens.clone(), tls.client_cert_auth)
            .map_err(std::io::Error::other)?,
    ));

    let cancel = CancellationToken::new();
    let publish = crate::service::cluster::publish_attributes(node.clone(), cancel.clone());
    if initial_cluster.len() == 1 {
        // As etcd, a member serves clients once its name and client URLs are published, so a
        // client's first member list shows them. Alone it is leader already, so this is one
        // local commit; members of a larger cluster publish in the background instead, since
        // their quorum may not be up yet.
        if tokio::time::timeout(Duration::from_secs(5), publish)
            .await
            .is_err()
        {
            tracing::warn!("member attributes not published yet; continuing in the background");
            tokio::spawn(crate::service::cluster::publish_attributes(
                node.clone(),
                cancel.clone(),
            ));
        }
    } else {
        tokio::spawn(publish);
    }
    let mut serving = tokio::task::JoinSet::new();
    for (listener, https) in peer_listeners {
        let bound = listener.local_addr()?;
        let peer = PeerServer::new(PeerService::new(
            node.raft.clone(),
            node.identity.cluster_id,
        ))
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let stop = cancel.clone();
        let mut builder = tonic::transport::Server::builder();
        if https {
            builder = builder.tls_config(tls.peer_server.clone().ok_or_else(no_tls)?)?;
        }
        serving.spawn(
            builder
                .add_service(peer)
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
        );
        tracing::info!(address = %bound, "listening for peers");
    }
    tokio::spawn(crate::lessor::run(node.clone(), cancel.clone()));
    tokio::spawn(crate::auth::sweep_tokens(tokens, cancel.clone()));
    tokio::spawn(crate::metrics::probe::probe_peers(
        node.clone(),
        cancel.clone(),
    ));
    tokio::spawn(crate::metrics::probe::count_leader_changes(
        node.clone(),
        cancel.clone(),
    ));
    let watch_wake = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(crate::service::watch::run(
        node.clone(),
        watch_wake.clone(),
        progress_interval,
        cancel.clone(),
    ));
    tokio::spawn(crate::compaction::run(
        node.clone(),
        retention,
        cancel.clone(),
    ));

    let max_decode = flags.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let mut listeners = Vec::new();
    for url in addrs {
        listeners.push((TcpListener::bind(url.addr).await?, url.tls));
    }
    let client_addrs = listeners
        .iter()
        .map(|(l, _)| l.local_addr())
        .collect::<Result<Vec<_>, _>>()?;
    let (loopback, loopback_incoming) =
        Loopback::new(node.callers.loopback_token(), cancel.clone());
    let history = Arc::new(crate::ui::history::History::default());
    tokio::spawn(crate::ui::history::sample(
        node.clone(),
        history.clone(),
        cancel.clone(),
    ));
    let services = ClientServices {
        dashboard: crate::ui::Dashboard::new(node.clone(), history),
        node: node.clone(),
        watch_wake,
        loopback,
        health: health_service,
        max_decode,
    };
    // The member's own client (the Lock and Election services' recipes) is served in memory.
    {
        let stop = cancel.clone();
        let incoming = futures::StreamExt::map(loopback_incoming, Ok::<_, std::io::Error>);
        let router = services.router(client_builder(None), false);
        serving.spawn(
            router.serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
        );
    }
    for ((listener, https), bound) in listeners.into_iter().zip(client_addrs.iter().copied()) {
        let mut builder = client_builder(Some(node.metrics.clone()));
        if https {
            builder = builder.tls_config(tls.client.clone().ok_or_else(no_tls)?)?;
        }
        let router = services.router(builder, true);
        let stop = cancel.clone();
        // Small request/response exchanges must not wait for Nagle + delayed ACK (~40 ms).
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            // Responses finished in one burst leave in one write (`coalesce` says why); not
            // under TLS, whose handshake would wait for a flush that does not come.
            .map_ok(move |s| {
                if https {
                    CoalescingStream::direct(s)
                } else {
                    CoalescingStream::new(s)
                }
            });
        serving.spawn(
            router.serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
        );
        let scheme = if https { "https" } else { "http" };
        tracing::info!(address = %bound, scheme, "ready to serve client requests");
    }
    Ok(Running {
        node,
        client_addrs,
        serving,
        cancel,
    })
}

/// Refuses to restore over a member's existing data, or into a member joining an existing
/// cluster (a restored cluster is a new one).
fn check_restore_target(
    data_dir: &std::path::Path,
    state: ClusterState,
) -> Result<(), ServerError> {
    if state == ClusterState::Existing {
        return Err(ServerError::Restore(
            "a restored member starts a new cluster (--initial-cluster-state new)".into(),
        ));
    }
    let occupied = std::fs::read_dir(data_dir).is_ok_and(|mut d| d.next().is_some());
    if occupied {
        return Err(ServerError::Restore(format!(
            "data dir {} already exists; restore into a new one",
            data_dir.display()
        )));
    }
    Ok(())
}

/// Seeds the fresh `store` from the snapshot in `file`, checking its SHA-256 first.
async fn restore(store: &Arc<Store>, file: &std::path::Path) -> Result<(), ServerError> {
    let failed = |what: String| ServerError::Restore(format!("{}: {what}", file.display()));
    let framed = tokio::fs::read(file)
        .await
        .map_err(|e| failed(e.to_string()))?;
    tracing::info!(file = %file.display(), bytes = framed.len(), "restoring from a snapshot: read");
    let store = store.clone();
    let revision = tokio::task::spawn_blocking(move || {
        let data = crate::service::maintenance::unframe_snapshot(&framed)
            .ok_or("not a snapshot, or its SHA-256 does not match its contents".to_string())?;
        tracing::info!(
            bytes = data.len(),
            "restoring from a snapshot: checksum verified"
        );
        store
            .restore_as_new_cluster(data)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(failed)?;
    tracing::info!(
        revision,
        "restoring from a snapshot: done; starting a new cluster"
    );
    Ok(())
}

/// A listener named `https://` whose TLS settings are missing: `TlsSettings::from_flags`
/// refuses such flags, so this is a bug if ever seen.
fn no_tls() -> ServerError {
    ServerError::Join("an https:// listener without TLS settings".into())
}

/// Everything the client listeners serve, to build one router per listener.
struct ClientServices<H> {
    node: Arc<Node>,
    watch_wake: Arc<tokio::sync::Notify>,
    loopback: Loopback,
    health: tonic_health::pb::health_server::HealthServer<H>,
    max_decode: usize,
    dashboard: Arc<crate::ui::Dashboard>,
}

/// The layers every client router has: gRPC metrics outermost, so they count the codes
/// clients see.
type ClientLayers = tower::layer::util::Stack<
    crate::oversize::OversizeStatusLayer,
    tower::layer::util::Stack<GrpcMetricsLayer, tower::layer::util::Identity>,
>;

/// A server builder for client listeners, counting calls into `metrics` (none for the
/// member's own in-memory client). HTTP/1.1 is accepted for `/health` and `/metrics`.
fn client_builder(metrics: Option<Arc<crate::metrics::Metrics>>) -> Server<ClientLayers> {
    Server::builder()
        .accept_http1(true)
        .layer(GrpcMetricsLayer::new(metrics))
        .layer(crate::oversize::OversizeStatusLayer)
}

impl<H: tonic_health::pb::health_server::Health> ClientServices<H> {
    /// The client services on `builder`, with the HTTP routes if `http`.
    fn router(
        &self,
        mut builder: Server<ClientLayers>,
        http: bool,
    ) -> tonic::transport::server::Router<ClientLayers> {
        let node = &self.node;
        let max_decode = self.max_decode;
        let loopback = &self.loopback;
        let watch_wake = &self.watch_wake;
        let mut routes = tonic::service::RoutesBuilder::default();
        routes
            .add_service(
                KvServer::new(KvService::new(node.clone())).max_decoding_message_size(max_decode),
            )
            .add_service(
                MaintenanceServer::new(MaintenanceService::new(node.clone()))
                    .max_decoding_message_size(max_decode),
            )
            .add_service(
                ClusterServer::new(ClusterService::new(node.clone()))
                    .max_decoding_message_size(max_decode),
            )
            .add_service(
                WatchServer::new(WatchService::new(node.clone(), watch_wake.clone()))
                    .max_decoding_message_size(max_decode),
            )
            .add_service(
                LeaseServer::new(LeaseService::new(node.clone()))
                    .max_decoding_message_size(max_decode),
            )
            .add_service(
                AuthServer::new(AuthService::new(node.clone()))
                    .max_decoding_message_size(max_decode),
            )
            .add_service(
                LockServer::new(LockService::new(node.clone(), loopback.clone()))
                    .max_decoding_message_size(max_decode),
            )
            .add_service(
                ElectionServer::new(ElectionService::new(node.clone(), loopback.clone()))
                    .max_decoding_message_size(max_decode),
            )
            .add_service(self.health.clone());
        let mut routes = routes.routes();
        if http {
            let merged = routes
                .into_axum_router()
                .merge(crate::http::routes(node.clone(), &self.dashboard))
                .fallback(crate::http::not_found);
            routes = tonic::service::Routes::from(merged);
        }
        builder.add_routes(routes)
    }
}

/// How long a stopping member lets open client calls finish before it closes them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long a joining member keeps asking its peers for the cluster id.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the existing members (by peer URL) for the cluster id.
async fn fetch_cluster_id(
    peers: &[String],
    tls: &tonic::transport::ClientTlsConfig,
) -> Result<u64, ServerError> {
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        for url in peers {
            if let Ok(conn) = PeerConnection::new(url, 0, tls)
                && let Ok(id) = conn
                    .call::<_, u64>(PeerCall::Hello, &(), Duration::from_secs(2))
                    .await
            {
                return Ok(id);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ServerError::Join(format!(
                "--initial-cluster-state existing: no existing member answered at {}",
                peers.join(",")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Running {
    /// A token that stops the member when cancelled.
    pub fn stopper(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Serves until stopped (or a listener fails), then shuts down Raft and syncs the state.
    pub async fn wait(mut self) -> Result<(), ServerError> {
        let mut result = Ok(());
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            reason = self.node.raft.stopped() => {
                tracing::error!(%reason, "raft stopped; the member exits");
                result = Err(ServerError::RaftStopped(reason));
                self.cancel.cancel();
            }
            Some(done) = self.serving.join_next() => {
                if let Ok(Err(e)) = done {
                    result = Err(e.into());
                }
                self.cancel.cancel();
            }
        }
        // Open calls get a grace period to finish; streams a client keeps open (a watch, a
        // keep-alive) would otherwise hold the stop forever. etcd also stops gracefully on a
        // deadline, then hard.
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(done) = self.serving.join_next().await {
                if let Ok(Err(e)) = done
                    && result.is_ok()
                {
                    result = Err(e.into());
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                grace = ?SHUTDOWN_GRACE,
                "closing the client calls still open after the grace period"
            );
            self.serving.abort_all();
            while self.serving.join_next().await.is_some() {}
        }
        self.node.raft.shutdown().await?;
        self.node.store.stop_watch_feed();
        let store = self.node.store.clone();
        tokio::task::spawn_blocking(move || store.sync())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .map_err(std::io::Error::from)?;
        tracing::info!("stopped");
        result
    }
}
