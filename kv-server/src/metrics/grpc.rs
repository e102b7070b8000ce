//! gRPC call counts and latencies under go-grpc-prometheus' names, which etcd exports:
//! `grpc_server_started_total`, `grpc_server_handled_total` (by status code) and
//! `grpc_server_handling_seconds` (etcd has it with `--metrics extensive`; here always).
//!
//! A tower layer around the client router times each call from its arrival to its status:
//! the response headers of a trailers-only answer, else the trailers at the body's end. A
//! call dropped before its status (the client went away or gave up, while the handler waited
//! or mid-stream) counts as `Canceled`, so `started - handled` is the calls in flight.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::FutureExt;
use tonic::codegen::http;
use tower::{Layer, Service};

use super::render::Exposition;
use super::{Counter, GRPC_BUCKETS, Histogram};

/// Every method the client port serves, with go-grpc-prometheus' type of call.
const METHODS: &[(&str, &str, &str)] = &[
    ("etcdserverpb.KV", "Range", UNARY),
    ("etcdserverpb.KV", "Put", UNARY),
    ("etcdserverpb.KV", "DeleteRange", UNARY),
    ("etcdserverpb.KV", "Txn", UNARY),
    ("etcdserverpb.KV", "Compact", UNARY),
    ("etcdserverpb.Watch", "Watch", BIDI),
    ("etcdserverpb.Lease", "LeaseGrant", UNARY),
    ("etcdserverpb.Lease", "LeaseRevoke", UNARY),
    ("etcdserverpb.Lease", "LeaseKeepAlive", BIDI),
    ("etcdserverpb.Lease", "LeaseTimeToLive", UNARY),
    ("etcdserverpb.Lease", "LeaseLeases", UNARY),
    ("etcdserverpb.Cluster", "MemberAdd", UNARY),
    ("etcdserverpb.Cluster", "MemberRemove", UNARY),
    ("etcdserverpb.Cluster", "MemberUpdate", UNARY),
    ("etcdserverpb.Cluster", "MemberList", UNARY),
    ("etcdserverpb.Cluster", "MemberPromote", UNARY),
    ("etcdserverpb.Maintenance", "Alarm", UNARY),
    ("etcdserverpb.Maintenance", "Status", UNARY),
    ("etcdserverpb.Maintenance", "Defragment", UNARY),
    ("etcdserverpb.Maintenance", "Hash", UNARY),
    ("etcdserverpb.Maintenance", "HashKV", UNARY),
    ("etcdserverpb.Maintenance", "Snapshot", SERVER_STREAM),
    ("etcdserverpb.Maintenance", "MoveLeader", UNARY),
    ("etcdserverpb.Auth", "AuthEnable", UNARY),
    ("etcdserverpb.Auth", "AuthDisable", UNARY),
    ("etcdserverpb.Auth", "AuthStatus", UNARY),
    ("etcdserverpb.Auth", "Authenticate", UNARY),
    ("etcdserverpb.Auth", "UserAdd", UNARY),
    ("etcdserverpb.Auth", "UserGet", UNARY),
    ("etcdserverpb.Auth", "UserList", UNARY),
    ("etcdserverpb.Auth", "UserDelete", UNARY),
    ("etcdserverpb.Auth", "UserChangePassword", UNARY),
    ("etcdserverpb.Auth", "UserGrantRole", UNARY),
    ("etcdserverpb.Auth", "UserRevokeRole", UNARY),
    ("etcdserverpb.Auth", "RoleAdd", UNARY),
    ("etcdserverpb.Auth", "RoleGet", UNARY),
    ("etcdserverpb.Auth", "RoleList", UNARY),
    ("etcdserverpb.Auth", "RoleDelete", UNARY),
    ("etcdserverpb.Auth", "RoleGrantPermission", UNARY),
    ("etcdserverpb.Auth", "RoleRevokePermission", UNARY),
    ("v3lockpb.Lock", "Lock", UNARY),
    ("v3lockpb.Lock", "Unlock", UNARY),
    ("v3electionpb.Election", "Campaign", UNARY),
    ("v3electionpb.Election", "Proclaim", UNARY),
    ("v3electionpb.Election", "Leader", UNARY),
    ("v3electionpb.Election", "Observe", SERVER_STREAM),
    ("v3electionpb.Election", "Resign", UNARY),
    ("grpc.health.v1.Health", "Check", UNARY),
    ("grpc.health.v1.Health", "Watch", SERVER_STREAM),
];

const UNARY: &str = "unary";
const BIDI: &str = "bidi_stream";
const SERVER_STREAM: &str = "server_stream";

/// grpc-go's names of the status codes, by number (go-grpc-prometheus' `grpc_code` label).
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// The counts of one method.
#[derive(Debug)]
pub struct MethodStats {
    service: &'static str,
    method: &'static str,
    kind: &'static str,
    started: Counter,
    handled: [Counter; 17],
    handling: Histogram,
}

impl MethodStats {
    fn finish(&self, code: usize, started: Instant) {
        self.handled[code.min(CODES.len() - 1)].inc();
        self.handling.observe(started.elapsed());
    }
}

/// Counts of every method, by request path (`/service/method`).
#[derive(Debug)]
pub struct GrpcMetrics {
    /// Looked up on every call: foldhash, not SipHash (the keys are our own paths).
    methods: foldhash::HashMap<String, Arc<MethodStats>>,
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        let methods = METHODS
            .iter()
            .map(|&(service, method, kind)| {
                let stats = MethodStats {
                    service,
                    method,
                    kind,
                    started: Counter::default(),
                    handled: Default::default(),
                    handling: Histogram::new(GRPC_BUCKETS),
                };
                (format!("/{service}/{method}"), Arc::new(stats))
            })
            .collect();
        Self { methods }
    }
}

impl GrpcMetrics {
    /// The counts of the method at `path`, if it is one this port serves.
    fn method(&self, path: &str) -> Option<&Arc<MethodStats>> {
        self.methods.get(path)
    }

    /// Calls handled so far by `service/method` with status `code` (a grpc-go code name).
    pub fn handled(&self, service: &str, method: &str, code: &str) -> u64 {
        let slot = CODES.iter().position(|c| *c == code);
        match (self.methods.get(&format!("/{service}/{method}")), slot) {
            (Some(stats), Some(slot)) => stats.handled[slot].get(),
            _ => 0,
        }
    }

    /// Writes the three families: every method's started count, its handled counts for the
    /// codes seen (OK always), and latencies of the methods called at least once.
    pub fn render(&self, out: &mut Exposition) {
        let mut methods: Vec<&Arc<MethodStats>> = self.methods.values().collect();
        methods.sort_by_key(|m| (m.service, m.method));
        let labels = |m: &MethodStats| {
            [
                ("grpc_method", m.method),
                ("grpc_service", m.service),
                ("grpc_type", m.kind),
            ]
        };
        let started: Vec<_> = methods
            .iter()
            .map(|m| (labels(m), m.started.get()))
            .collect();
        out.counters(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            &started,
        );
        let mut handled = Vec::new();
        for m in &methods {
            for (code, name) in CODES.iter().enumerate() {
                let n = m.handled[code].get();
                if n > 0 || code == 0 {
                    let [a, b, c] = labels(m);
                    handled.push(([("grpc_code", *name), a, b, c], n));
                }
            }
        }
        out.counters(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            &handled,
        );
        let timed: Vec<_> = methods
            .iter()
            .filter(|m| m.handling.count() > 0)
            .map(|m| (labels(m), &m.handling))
            .collect();
        out.histograms(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level \
             handled by the server.",
            &timed,
        );
    }
}

/// Wraps the client router to count its calls into `metrics` (none: the member's own
/// in-memory client, which etcd does not count either).
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Option<Arc<super::Metrics>>,
}

impl GrpcMetricsLayer {
    /// Counts into `metrics`, or nothing.
    pub fn new(metrics: Option<Arc<super::Metrics>>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetered {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct GrpcMetered<S> {
    inner: S,
    metrics: Option<Arc<super::Metrics>>,
}

/// Turns a metered call's response into one whose body records the call's end.
type Finish<B, E> = Box<dyn FnOnce(Result<http::Response<B>, E>) -> MeteredResult<B, E> + Send>;

type ResponseFuture<F, B, E> = futures::future::Either<
    futures::future::Map<F, Finish<B, E>>,
    futures::future::Map<F, fn(Result<http::Response<B>, E>) -> MeteredResult<B, E>>,
>;

type MeteredResult<B, E> = Result<http::Response<MeteredBody<B>>, E>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetered<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send,
    S::Error: 'static,
    ResBody: 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let stats = self
            .metrics
            .as_ref()
            .and_then(|m| m.grpc.method(req.uri().path()).cloned());
        let future = self.inner.call(req);
        let Some(stats) = stats else {
            return futures::future::Either::Right(
                future.map(unmetered::<ResBody, S::Error> as fn(_) -> _),
            );
        };
        stats.started.inc();
        // Dropped with the future if the call goes before its response: counted Canceled.
        let tally = Tally {
            stats,
            started: Instant::now(),
            done: false,
        };
        let finish: Finish<ResBody, S::Error> = Box::new(move |result| {
            result.map(|resp: http::Response<ResBody>| {
                let code = status_code(resp.headers());
                let (parts, body) = resp.into_parts();
                let tally = match code {
                    // Trailers-only: the status is in the headers and the body is empty.
                    Some(code) => {
                        tally.finish(code);
                        None
                    }
                    None => Some(tally),
                };
                http::Response::from_parts(parts, MeteredBody { inner: body, tally })
            })
        });
        futures::future::Either::Left(future.map(finish))
    }
}

fn unmetered<B, E>(result: Result<http::Response<B>, E>) -> MeteredResult<B, E> {
    result.map(|resp| resp.map(|inner| MeteredBody { inner, tally: None }))
}

/// The status code in `grpc-status`, if present (codes past the known ones as Unknown).
fn status_code(headers: &http::HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?;
    let code = value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|c| *c < CODES.len())
        .unwrap_or(UNKNOWN);
    Some(code)
}

/// A call being timed; dropped before [`Tally::finish`], it counts as `Canceled`.
#[derive(Debug)]
struct Tally {
    stats: Arc<MethodStats>,
    started: Instant,
    done: bool,
}

impl Tally {
    fn finish(mut self, code: usize) {
        self.stats.finish(code, self.started);
        self.done = true;
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if !self.done {
            self.stats.finish(CANCELED, self.started);
        }
    }
}

/// A response body that records its call's status when its trailers pass.
#[derive(Debug)]
pub struct MeteredBody<B> {
    inner: B,
    tally: Option<Tally>,
}

impl<B> http_body::Body for MeteredBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(t) = this.tally.take()
                {
                    t.finish(status_code(trailers).unwrap_or(0));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(t) = this.tally.take() {
                    t.finish(UNKNOWN);
                }
            }
            Poll::Ready(None) => {
                // Ended without trailers: tonic always sends them, so this is an OK that lost
                // its status on the way; count it as grpc-go would read it (no status, OK).
                if let Some(t) = this.tally.take() {
                    t.finish(0);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
