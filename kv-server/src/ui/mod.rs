//! The web dashboard on the client port: `/ui` is one self-contained page (HTML, CSS and
//! JavaScript in one file, embedded in the binary, so nothing is built or fetched), which
//! polls this member's JSON every second:
//!
//! - `/ui/api/state`: the cluster's members and leader, this member's figures, and the
//!   recipes' state (lock holders, election leaders, queue depths, service instances). With
//!   auth on it needs a root user's HTTP Basic credentials ([`access`]).
//! - `/ui/api/status`: this member's figures alone (numbers, like `/metrics`, and as open).
//!   The page asks every member for it at its advertised client URL, so the members table
//!   shows each one's own view (CORS allows it, for this route only).
//! - `/ui/api/history`: the last ten minutes of revision, db size, leases and watchers.

pub mod access;
pub mod history;

use std::sync::Arc;

use axum::body::Body;
use axum::routing::get;
use serde::Serialize;
use tonic::codegen::http::{HeaderMap, Response, StatusCode, header};

use crate::http::respond;
use crate::node::Node;
use crate::service::cluster::ClusterService;
use crate::service::maintenance::{API_VERSION, alarm_name};

/// The page.
const PAGE: &str = include_str!("dashboard.html");

/// Everything the dashboard's routes need.
pub struct Dashboard {
    node: Arc<Node>,
    history: Arc<history::History>,
    access: access::Access,
}

impl Dashboard {
    /// The dashboard of `node`, drawing on `history`.
    pub fn new(node: Arc<Node>, history: Arc<history::History>) -> Arc<Self> {
        Arc::new(Dashboard {
            access: access::Access::new(node.clone()),
            node,
            history,
        })
    }

    /// The dashboard's routes.
    pub fn routes(self: &Arc<Self>) -> axum::Router {
        let (state, status, past) = (self.clone(), self.clone(), self.clone());
        axum::Router::new()
            .route("/ui", get(|| async { page() }))
            .route("/ui/", get(|| async { page() }))
            .route(
                "/ui/api/state",
                get(move |headers: HeaderMap| {
                    let ui = state.clone();
                    async move {
                        if let Err(refused) = ui.access.check(&headers).await {
                            return refused;
                        }
                        let node = ui.node.clone();
                        match tokio::task::spawn_blocking(move || state_of(&node)).await {
                            Ok(state) => json(&state),
                            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                        }
                    }
                }),
            )
            .route(
                "/ui/api/status",
                get(move || {
                    let ui = status.clone();
                    // Other members' pages read this (numbers only, open like /metrics).
                    async move { allow_any_origin(json(&status_of(&ui.node))) }
                }),
            )
            .route(
                "/ui/api/history",
                get(move || {
                    let ui = past.clone();
                    async move { json(&serde_json::json!({ "samples": ui.history.samples() })) }
                }),
            )
    }
}

/// How old the database's bytes-in-use figure may be on the dashboard and `/metrics`: it is
/// costly to measure (see `Store::status_recent`), and both ask often.
pub const IN_USE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A member's own figures.
#[derive(Debug, Serialize)]
pub struct MemberStatus {
    /// Its id (hex).
    pub id: String,
    /// Its name.
    pub name: String,
    /// The etcd API version it speaks.
    pub version: String,
    /// The leader it follows (hex), if any.
    pub leader: Option<String>,
    /// A leader is in contact (`etcd_server_has_leader`).
    pub has_leader: bool,
    /// Its Raft term.
    pub term: u64,
    /// Its last log index.
    pub raft_index: u64,
    /// Its last applied index.
    pub applied_index: u64,
    /// Its store revision.
    pub revision: i64,
    /// Its compaction revision.
    pub compact_revision: i64,
    /// Its database size in bytes.
    pub db_size: i64,
    /// Its database bytes in use.
    pub db_size_in_use: i64,
    /// Keys with history.
    pub keys: usize,
    /// Leases granted.
    pub leases: usize,
    /// Keys attached to leases.
    pub lease_keys: usize,
    /// Watchers open on it.
    pub watchers: usize,
    /// Watch streams open on it.
    pub watch_streams: usize,
    /// Alarms raised.
    pub alarms: Vec<String>,
}

fn status_of(node: &Node) -> MemberStatus {
    let raft = node.raft.status();
    let store = node.store.status_recent(IN_USE_MAX_AGE);
    let (leases, lease_keys) = node.store.lease_counts();
    let hub = node.store.watch_hub().stats();
    MemberStatus {
        id: format!("{:x}", node.identity.member_id),
        name: node.identity.name.clone(),
        version: API_VERSION.to_string(),
        leader: raft.leader.map(|l| format!("{l:x}")),
        has_leader: node.raft.has_leader(),
        term: raft.term,
        raft_index: raft.last_log_index,
        applied_index: raft.applied_index,
        revision: store.revision,
        compact_revision: store.compact_revision,
        db_size: store.db_size,
        db_size_in_use: store.db_size_in_use,
        keys: store.keys,
        leases,
        lease_keys,
        watchers: hub.watchers,
        watch_streams: hub.streams,
        alarms: node
            .store
            .alarms()
            .iter()
            .map(|a| format!("{:x}: {}", a.member_id, alarm_name(a.alarm)))
            .collect(),
    }
}

/// A member as the cluster lists it.
#[derive(Debug, Serialize)]
struct ListedMember {
    id: String,
    name: String,
    client_urls: Vec<String>,
    peer_urls: Vec<String>,
    learner: bool,
}

/// What `/ui/api/state` answers.
#[derive(Debug, Serialize)]
struct State {
    now_ms: u64,
    status: MemberStatus,
    members: Vec<ListedMember>,
    recipes: recipes::inspect::Inspection,
}

fn state_of(node: &Node) -> State {
    let members = ClusterService::member_list(node)
        .into_iter()
        .map(|m| ListedMember {
            id: format!("{:x}", m.id),
            name: m.name,
            client_urls: m.client_ur_ls,
            peer_urls: m.peer_ur_ls,
            learner: m.is_learner,
        })
        .collect();
    State {
        now_ms: now_ms(),
        status: status_of(node),
        members,
        recipes: crate::recipe_state::recipes_now(&node.store),
    }
}

fn page() -> Response<Body> {
    respond(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_string())
}

fn json<T: Serialize>(value: &T) -> Response<Body> {
    match serde_json::to_string(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Lets pages of any origin read `resp`. Only the member status carries this: the recipes'
/// state names keys and holds values, which another site's page must not read.
fn allow_any_origin(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    resp
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", format!("{body}\n"))
}
