//! `etcdserverpb.KV`: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use kv_core::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse, kv_server::Kv,
};
use kv_core::{txn_is_read_only, txn_reads_single_keys, validation};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

use crate::auth::Credentials;
use crate::errors::{error_status, kv_status};
use crate::node::Node;
use crate::propose_as;

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

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: GrpcRequest<RangeRequest>,
    ) -> Result<GrpcResponse<RangeResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        let req = request.into_inner();
        validation::check_range(&req).map_err(|e| kv_status(&e))?;
        if !req.serializable {
            self.node.linearize().await?;
        }
        // Checked after the barrier, against permissions at least as new as the data.
        self.node.check(|a| a.check_range(&caller, &req))?;
        let single = req.range_end.is_empty();
        let mut resp = self
            .node
            .read_sized(single, move |store| {
                store.range(&req).map_err(|e| error_status(&e))
            })
            .await?;
        self.node.metrics.mvcc.range.inc();
        self.node.fill(&mut resp.header);
        Ok(GrpcResponse::new(resp))
    }

    async fn put(
        &self,
        request: GrpcRequest<PutRequest>,
    ) -> Result<GrpcResponse<PutResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        let req = request.into_inner();
        validation::check_put(&req).map_err(|e| kv_status(&e))?;
        // Refused at the door, so a caller without rights cannot fill the log; apply checks
        // again against the permissions of the moment.
        self.node
            .check_with_leases(|a, keys| a.check_put(&caller, &req, keys))?;
        Ok(GrpcResponse::new(propose_as!(
            self.node, Put, req, &caller
        )?))
    }

    async fn delete_range(
        &self,
        request: GrpcRequest<DeleteRangeRequest>,
    ) -> Result<GrpcResponse<DeleteRangeResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        let req = request.into_inner();
        validation::check_delete(&req).map_err(|e| kv_status(&e))?;
        self.node.check(|a| a.check_delete(&caller, &req))?;
        Ok(GrpcResponse::new(propose_as!(
            self.node,
            DeleteRange,
            req,
            &caller
        )?))
    }

    async fn txn(
        &self,
        request: GrpcRequest<TxnRequest>,
    ) -> Result<GrpcResponse<TxnResponse>, Status> {
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        let req = request.into_inner();
        validation::check_txn(&req, self.node.limits.max_txn_ops).map_err(|e| kv_status(&e))?;
        // Every compare and op of both branches, whichever runs; writes are checked again at
        // apply, reads are served under this check.
        self.node
            .check_with_leases(|a, keys| a.check_txn(&caller, &req, keys))?;
        if !txn_is_read_only(&req) {
            // A txn whose compares choose branches that write nothing (a failed
            // compare-and-swap, a lost race for a lock key) is a read: served as a
            // linearizable one, without a log entry and a disk sync. The first look, at this
            // member's state as it is, only decides whether to try (and while an apply holds
            // the state, it tries); the answer is taken after the read barrier, and a txn
            // that writes by then is proposed after all.
            if self.node.store.txn_would_write(&req).unwrap_or(false) {
                return Ok(GrpcResponse::new(propose_as!(
                    self.node, Txn, req, &caller
                )?));
            }
            self.node.linearize().await?;
            let read = req.clone();
            let answer = self
                .node
                .read_sized(txn_reads_single_keys(&req), move |store| {
                    store.txn_as_read(&read).map_err(|e| error_status(&e))
                })
                .await?;
            let Some(mut resp) = answer else {
                return Ok(GrpcResponse::new(propose_as!(
                    self.node, Txn, req, &caller
                )?));
            };
            self.node.metrics.mvcc.count_txn(&resp);
            self.node.fill(&mut resp.header);
            return Ok(GrpcResponse::new(resp));
        }
        // A read-only txn is a linearizable read: no log entry, as in etcd.
        self.node.linearize().await?;
        let mut resp = self
            .node
            .read_sized(txn_reads_single_keys(&req), move |store| {
                store.read_txn(&req).map_err(|e| error_status(&e))
            })
            .await?;
        self.node.metrics.mvcc.count_txn(&resp);
        self.node.fill(&mut resp.header);
        Ok(GrpcResponse::new(resp))
    }

    async fn compact(
        &self,
        request: GrpcRequest<CompactionRequest>,
    ) -> Result<GrpcResponse<CompactionResponse>, Status> {
        // Compaction is applied synchronously, so `physical` needs no extra wait.
        let caller = self.node.caller(&Credentials::of(&request)).await?;
        let req = request.into_inner();
        // Compaction destroys history for every user: admins only (etcd 3.5.28 and later).
        self.node.check(|a| a.check_admin(&caller))?;
        Ok(GrpcResponse::new(propose_as!(
            self.node, Compaction, req, &caller
        )?))
    }
}
