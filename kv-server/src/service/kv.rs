//! `etcdserverpb.KV`: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use kv_core::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse, kv_server::Kv,
};
use kv_core::proto::kvserverpb::{internal_request::Request, internal_response::Response};
use kv_core::{txn_is_read_only, validation};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

use crate::errors::{error_status, kv_status};
use crate::node::Node;

/// The KV service.
pub struct KvService {
    node: Arc<Node>,
}

impl KvService {
    /// A KV service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

fn unexpected() -> Status {
    Status::internal("etcdserver: unexpected response type from apply")
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: GrpcRequest<RangeRequest>,
    ) -> Result<GrpcResponse<RangeResponse>, Status> {
        let req = request.into_inner();
        validation::check_range(&req).map_err(|e| kv_status(&e))?;
        if !req.serializable {
            self.node.linearize().await?;
        }
        let store = self.node.store.clone();
        // Large ranges do real work: keep it off the async workers.
        let mut resp = tokio::task::spawn_blocking(move || store.range(&req))
            .await
            .map_err(|_| Status::internal("etcdserver: range task failed"))?
            .map_err(|e| error_status(&e))?;
        self.node.fill(&mut resp.header);
        Ok(GrpcResponse::new(resp))
    }

    async fn put(
        &self,
        request: GrpcRequest<PutRequest>,
    ) -> Result<GrpcResponse<PutResponse>, Status> {
        let req = request.into_inner();
        validation::check_put(&req).map_err(|e| kv_status(&e))?;
        match self.node.propose(Request::Put(req)).await?.response {
            Some(Response::Put(mut resp)) => {
                self.node.fill(&mut resp.header);
                Ok(GrpcResponse::new(resp))
            }
            _ => Err(unexpected()),
        }
    }

    async fn delete_range(
        &self,
        request: GrpcRequest<DeleteRangeRequest>,
    ) -> Result<GrpcResponse<DeleteRangeResponse>, Status> {
        let req = request.into_inner();
        validation::check_delete(&req).map_err(|e| kv_status(&e))?;
        match self.node.propose(Request::DeleteRange(req)).await?.response {
            Some(Response::DeleteRange(mut resp)) => {
                self.node.fill(&mut resp.header);
                Ok(GrpcResponse::new(resp))
            }
            _ => Err(unexpected()),
        }
    }

    async fn txn(
        &self,
        request: GrpcRequest<TxnRequest>,
    ) -> Result<GrpcResponse<TxnResponse>, Status> {
        let req = request.into_inner();
        validation::check_txn(&req, self.node.limits.max_txn_ops).map_err(|e| kv_status(&e))?;
        let mut resp = if txn_is_read_only(&req) {
            // A read-only txn is a linearizable read: no log entry, as in etcd.
            self.node.linearize().await?;
            let store = self.node.store.clone();
            tokio::task::spawn_blocking(move || store.read_txn(&req))
                .await
                .map_err(|_| Status::internal("etcdserver: txn task failed"))?
                .map_err(|e| error_status(&e))?
        } else {
            match self.node.propose(Request::Txn(req)).await?.response {
                Some(Response::Txn(resp)) => resp,
                _ => return Err(unexpected()),
            }
        };
        self.node.fill(&mut resp.header);
        Ok(GrpcResponse::new(resp))
    }

    async fn compact(
        &self,
        request: GrpcRequest<CompactionRequest>,
    ) -> Result<GrpcResponse<CompactionResponse>, Status> {
        // Compaction is applied synchronously, so `physical` needs no extra wait.
        let req = request.into_inner();
        match self.node.propose(Request::Compaction(req)).await?.response {
            Some(Response::Compaction(mut resp)) => {
                self.node.fill(&mut resp.header);
                Ok(GrpcResponse::new(resp))
            }
            _ => Err(unexpected()),
        }
    }
}
