//! Plain HTTP on the client port, beside gRPC, as etcd serves it: `/health`, `/version` and
//! `/metrics`, and the dashboard (`/ui`, see [`crate::ui`]). Requests are told apart by path;
//! HTTP/1.1 and HTTP/2 both work, so `curl`, Prometheus, browsers and load balancers' health
//! checks need nothing special.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use tonic::codegen::http::{Response, StatusCode, header};

use crate::node::Node;
use crate::service::maintenance::{API_VERSION, alarm_name};

/// How long `/health`'s read may take before the member counts as unhealthy.
pub const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// The HTTP routes of the client port.
pub fn routes(node: Arc<Node>, dashboard: &Arc<crate::ui::Dashboard>) -> axum::Router {
    let health_node = node.clone();
    dashboard
        .routes()
        .route(
            "/health",
            get(move |query: axum::extract::RawQuery| {
                let node = health_node.clone();
                async move { health(&node, query.0.as_deref()).await }
            }),
        )
        .route("/version", get(version))
        .route(
            "/metrics",
            get(move || {
                let node = node.clone();
                // A scrape reads /proc and lists the keyspace for the recipes' gauges: blocking
                // work, kept off the workers that serve gRPC.
                async move {
                    tokio::task::spawn_blocking(move || metrics(&node))
                        .await
                        .unwrap_or_else(|e| {
                            respond(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "text/plain; charset=utf-8",
                                format!("{e}\n"),
                            )
                        })
                }
            }),
        )
}

/// What an unknown path gets: a gRPC call the `Unimplemented` status (as tonic and grpc-go
/// answer), anything else 404, as etcd answers.
pub async fn not_found(request: axum::extract::Request) -> Response<Body> {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        let mut resp = respond(StatusCode::OK, "application/grpc", String::new());
        let headers = resp.headers_mut();
        headers.insert("grpc-status", header::HeaderValue::from_static("12"));
        return resp;
    }
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "404 page not found\n".into(),
    )
}

/// A response with `status`, a content type and `body` (every HTTP route's answers).
pub fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// `{"etcdserver":..., "etcdcluster":...}`, as etcd answers.
async fn version() -> Response<Body> {
    let body = serde_json::json!({
        "etcdserver": API_VERSION,
        "etcdcluster": crate::metrics::cluster_version(),
    });
    respond(StatusCode::OK, "application/json", body.to_string())
}

fn metrics(node: &Node) -> Response<Body> {
    respond(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        crate::metrics::scrape(node),
    )
}

/// etcd's health check: no alarm raised, a leader known, and a read served in time
/// (linearizable unless `?serializable=true`). 200 with `{"health":"true"}` when healthy,
/// else 503 with the reason etcd 3.5 gives.
async fn health(node: &Node, query: Option<&str>) -> Response<Body> {
    let serializable = query
        .unwrap_or("")
        .split('&')
        .any(|pair| pair == "serializable=true");
    let reason = unhealthy_because(node, serializable).await;
    let metrics = &node.metrics;
    let (status, healthy, reason) = match reason {
        None => {
            metrics.health_success.inc();
            (StatusCode::OK, "true", String::new())
        }
        Some(reason) => {
            metrics.health_failures.inc();
            tracing::warn!(%reason, "serving /health false");
            (StatusCode::SERVICE_UNAVAILABLE, "false", reason)
        }
    };
    let body = serde_json::json!({ "health": healthy, "reason": reason });
    respond(status, "application/json", body.to_string())
}

async fn unhealthy_because(node: &Node, serializable: bool) -> Option<String> {
    if let Some(alarm) = node.store.alarms().first() {
        return Some(format!("ALARM {}", alarm_name(alarm.alarm)));
    }
    if !node.raft.has_leader() {
        return Some("RAFT NO LEADER".into());
    }
    if !serializable {
        match tokio::time::timeout(HEALTH_READ_TIMEOUT, node.linearize()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Some(format!("QGET ERROR: {}", e.message())),
            Err(_) => return Some("QGET ERROR: timed out".into()),
        }
    }
    None
}
