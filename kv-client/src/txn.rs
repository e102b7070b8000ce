//! Transactions: compares on the current state, then one branch of operations, in one
//! revision.

use kv_core::proto::etcdserverpb::{
    Compare as ProtoCompare, RequestOp, TxnRequest, TxnResponse as ProtoTxnResponse,
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    response_op::Response,
};

use crate::kv::{
    DeleteOptions, DeleteResponse, Extent, GetOptions, GetResponse, PutOptions, PutResponse,
};

/// How a compare relates the key's side to the given value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// Equal.
    Equal,
    /// Not equal.
    NotEqual,
    /// The key's side is greater.
    Greater,
    /// The key's side is less.
    Less,
}

impl CompareOp {
    fn proto(self) -> CompareResult {
        match self {
            CompareOp::Equal => CompareResult::Equal,
            CompareOp::NotEqual => CompareResult::NotEqual,
            CompareOp::Greater => CompareResult::Greater,
            CompareOp::Less => CompareResult::Less,
        }
    }
}

/// One condition of a transaction, on a key (or, with [`Compare::with_prefix`], on every key of
/// a prefix). A missing key has version, create and mod revision 0 and lease 0; a value compare
/// on a missing key is false.
#[derive(Debug, Clone, PartialEq)]
pub struct Compare {
    key: Vec<u8>,
    extent: Extent,
    op: CompareOp,
    target: TargetUnion,
}

impl Compare {
    fn new(key: impl Into<Vec<u8>>, op: CompareOp, target: TargetUnion) -> Self {
        Self {
            key: key.into(),
            extent: Extent::Key,
            op,
            target,
        }
    }
    /// The key's value `op` `value`.
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Self::new(key, op, TargetUnion::Value(value.into()))
    }
    /// The key's version (0: missing) `op` `version`.
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: i64) -> Self {
        Self::new(key, op, TargetUnion::Version(version))
    }
    /// The key's create revision `op` `revision`.
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Self {
        Self::new(key, op, TargetUnion::CreateRevision(revision))
    }
    /// The key's last modification revision `op` `revision`.
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Self {
        Self::new(key, op, TargetUnion::ModRevision(revision))
    }
    /// The key's lease `op` `lease`.
    pub fn lease(key: impl Into<Vec<u8>>, op: CompareOp, lease: i64) -> Self {
        Self::new(key, op, TargetUnion::Lease(lease))
    }
    /// Holds for every key starting with the key instead.
    pub fn with_prefix(mut self) -> Self {
        self.extent = Extent::Prefix;
        self
    }

    fn proto(&self, namespace: &[u8]) -> ProtoCompare {
        let (key, range_end) = self.extent.encode(namespace, &self.key);
        let target = match self.target {
            TargetUnion::Version(_) => CompareTarget::Version,
            TargetUnion::CreateRevision(_) => CompareTarget::Create,
            TargetUnion::ModRevision(_) => CompareTarget::Mod,
            TargetUnion::Value(_) => CompareTarget::Value,
            TargetUnion::Lease(_) => CompareTarget::Lease,
        };
        ProtoCompare {
            result: self.op.proto() as i32,
            target: target as i32,
            key,
            range_end,
            target_union: Some(self.target.clone()),
        }
    }
}

/// One operation of a transaction branch.
#[derive(Debug, Clone)]
pub enum TxnOp {
    /// A read, seeing the transaction's earlier writes.
    Get(Vec<u8>, GetOptions),
    /// A write.
    Put(Vec<u8>, Vec<u8>, PutOptions),
    /// A delete.
    Delete(Vec<u8>, DeleteOptions),
    /// A nested transaction.
    Txn(Txn),
}

impl TxnOp {
    /// A read of `key`.
    pub fn get(key: impl Into<Vec<u8>>, options: GetOptions) -> Self {
        TxnOp::Get(key.into(), options)
    }
    /// A write of `key`.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, options: PutOptions) -> Self {
        TxnOp::Put(key.into(), value.into(), options)
    }
    /// A delete of `key`.
    pub fn delete(key: impl Into<Vec<u8>>, options: DeleteOptions) -> Self {
        TxnOp::Delete(key.into(), options)
    }
    /// A nested transaction.
    pub fn txn(txn: Txn) -> Self {
        TxnOp::Txn(txn)
    }

    fn proto(&self, namespace: &[u8]) -> RequestOp {
        let request = match self {
            TxnOp::Get(k, o) => Request::RequestRange(o.request(namespace, k)),
            TxnOp::Put(k, v, o) => Request::RequestPut(o.request(namespace, k, v.clone())),
            TxnOp::Delete(k, o) => Request::RequestDeleteRange(o.request(namespace, k)),
            TxnOp::Txn(t) => Request::RequestTxn(t.request(namespace)),
        };
        RequestOp {
            request: Some(request),
        }
    }

    fn writes(&self) -> bool {
        match self {
            TxnOp::Get(..) => false,
            TxnOp::Put(..) | TxnOp::Delete(..) => true,
            TxnOp::Txn(t) => !t.is_read_only(),
        }
    }
}

/// A transaction: `when` every compare holds, `and_then` runs, otherwise `or_else`.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    compares: Vec<Compare>,
    success: Vec<TxnOp>,
    failure: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction (no compares: the success branch runs).
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds compares; all must hold.
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compares.extend(compares);
        self
    }
    /// Operations when the compares hold.
    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.success.extend(ops);
        self
    }
    /// Operations when some compare fails.
    pub fn or_else(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.failure.extend(ops);
        self
    }

    /// True when no branch writes (safe to retry).
    pub fn is_read_only(&self) -> bool {
        !self.success.iter().chain(&self.failure).any(TxnOp::writes)
    }

    pub(crate) fn request(&self, namespace: &[u8]) -> TxnRequest {
        TxnRequest {
            compare: self.compares.iter().map(|c| c.proto(namespace)).collect(),
            success: self.success.iter().map(|o| o.proto(namespace)).collect(),
            failure: self.failure.iter().map(|o| o.proto(namespace)).collect(),
        }
    }
}

/// One operation's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum TxnOpResponse {
    /// A read's answer.
    Get(GetResponse),
    /// A write's answer.
    Put(PutResponse),
    /// A delete's answer.
    Delete(DeleteResponse),
    /// A nested transaction's answer.
    Txn(TxnResponse),
}

/// What a transaction did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TxnResponse {
    /// The store revision after it.
    pub revision: i64,
    /// Whether the compares held (the success branch ran).
    pub succeeded: bool,
    /// The answers of the branch that ran, in order.
    pub responses: Vec<TxnOpResponse>,
}

impl TxnResponse {
    pub(crate) fn from_proto(namespace: &[u8], r: ProtoTxnResponse) -> Self {
        let responses = r
            .responses
            .into_iter()
            .filter_map(|op| {
                Some(match op.response? {
                    Response::ResponseRange(g) => {
                        TxnOpResponse::Get(GetResponse::from_proto(namespace, g))
                    }
                    Response::ResponsePut(p) => {
                        TxnOpResponse::Put(PutResponse::from_proto(namespace, p))
                    }
                    Response::ResponseDeleteRange(d) => {
                        TxnOpResponse::Delete(DeleteResponse::from_proto(namespace, d))
                    }
                    Response::ResponseTxn(t) => {
                        TxnOpResponse::Txn(TxnResponse::from_proto(namespace, t))
                    }
                })
            })
            .collect();
        Self {
            revision: r.header.map_or(0, |h| h.revision),
            succeeded: r.succeeded,
            responses,
        }
    }
}
