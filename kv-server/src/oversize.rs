//! Requests over the gRPC receive limit (`--max-request-bytes` plus framing head-room) are
//! refused by the transport before any handler runs. tonic words that as `OutOfRange`; etcd's
//! grpc-go answers `ResourceExhausted` "grpc: received message larger than max (N vs. M)", and
//! clients branch on the code. This layer rewrites tonic's status into grpc-go's.

use std::task::{Context, Poll};

use futures::FutureExt;
use tonic::Status;
use tonic::codegen::http;
use tower::{Layer, Service};

const TONIC_PREFIX: &str = "Error, decoded message length too large: found ";

/// `status` as etcd words it: grpc-go's for an oversized message, else unchanged. For
/// statuses that end a stream in its trailers, which the layer does not see.
pub fn as_etcd(status: Status) -> Status {
    rewrite(&status).unwrap_or(status)
}

/// grpc-go's status for an oversized message, if `status` is tonic's.
fn rewrite(status: &Status) -> Option<Status> {
    if status.code() != tonic::Code::OutOfRange {
        return None;
    }
    let rest = status.message().strip_prefix(TONIC_PREFIX)?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    Some(Status::resource_exhausted(format!(
        "grpc: received message larger than max ({found} vs. {limit})"
    )))
}

fn fix_response<B, E>(result: Result<http::Response<B>, E>) -> Result<http::Response<B>, E> {
    result.map(|mut resp| {
        if let Some(status) = Status::from_header_map(resp.headers())
            && let Some(fixed) = rewrite(&status)
        {
            let _ = fixed.add_header(resp.headers_mut());
        }
        resp
    })
}

/// The layer to add to the server.
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeStatusLayer;

impl<S> Layer<S> for OversizeStatusLayer {
    type Service = OversizeStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizeStatus { inner }
    }
}

/// The service the layer wraps around the gRPC router.
#[derive(Debug, Clone)]
pub struct OversizeStatus<S> {
    inner: S,
}

type Fixer<B, E> = fn(Result<http::Response<B>, E>) -> Result<http::Response<B>, E>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for OversizeStatus<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Map<S::Future, Fixer<ResBody, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        self.inner
            .call(req)
            .map(fix_response::<ResBody, S::Error> as Fixer<ResBody, S::Error>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonic_wording_becomes_grpc_gos() {
        let s = Status::out_of_range(
            "Error, decoded message length too large: found 2621450 bytes, the limit is: 2097152 bytes",
        );
        let fixed = rewrite(&s).unwrap();
        assert_eq!(fixed.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            fixed.message(),
            "grpc: received message larger than max (2621450 vs. 2097152)"
        );
        assert!(
            rewrite(&Status::out_of_range(
                "etcdserver: mvcc: required revision is a future revision"
            ))
            .is_none()
        );
    }
}
