//! The key-value API: get, put, delete, compact, with builder-style options and typed answers.

use kv_core::proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse as ProtoPutResponse, RangeRequest, RangeResponse,
    range_request::{SortOrder, SortTarget},
};
use kv_core::proto::mvccpb::KeyValue;

use crate::client::{Client, Idempotence, api};
use crate::error::Result;
use crate::txn::{Txn, TxnResponse};

pub use kv_core::proto::prefix_end;

/// Which keys a request covers, before the client's namespace is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Extent {
    /// The key alone.
    #[default]
    Key,
    /// Every key starting with the key.
    Prefix,
    /// Every key from the key on.
    FromKey,
    /// Keys from the key up to (not including) this one.
    Until(Vec<u8>),
}

impl Extent {
    /// The (key, range_end) pair on the wire, under `namespace`.
    pub(crate) fn encode(&self, namespace: &[u8], key: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut full = namespace.to_vec();
        full.extend_from_slice(key);
        let end = match self {
            Extent::Key => Vec::new(),
            Extent::Prefix => prefix_end(&full),
            Extent::FromKey if namespace.is_empty() => vec![0],
            // "Every key from here" stays inside the namespace.
            Extent::FromKey => prefix_end(namespace),
            Extent::Until(end) => {
                let mut e = namespace.to_vec();
                e.extend_from_slice(end);
                e
            }
        };
        (full, end)
    }
}

/// Takes the namespace off a key the server sent, in place: a large read returns thousands of
/// keys, and copying each one (as this did, even with no namespace) showed in its client CPU.
pub(crate) fn strip(namespace: &[u8], kv: &mut KeyValue) {
    if !namespace.is_empty() && kv.key.starts_with(namespace) {
        kv.key = kv.key.slice(namespace.len()..);
    }
}

/// Adds the builder methods that choose which keys a request covers.
macro_rules! extent_builders {
    ($options:ty) => {
        impl $options {
            /// Every key starting with the key.
            pub fn prefix(mut self) -> Self {
                self.extent = Extent::Prefix;
                self
            }
            /// Every key from the key on.
            pub fn from_key(mut self) -> Self {
                self.extent = Extent::FromKey;
                self
            }
            /// Keys from the key up to `end` (exclusive).
            pub fn range_end(mut self, end: impl Into<Vec<u8>>) -> Self {
                self.extent = Extent::Until(end.into());
                self
            }
        }
    };
}
pub(crate) use extent_builders;

extent_builders!(GetOptions);
extent_builders!(DeleteOptions);

/// Options of [`Kv::get`].
#[derive(Debug, Clone, Default)]
pub struct GetOptions {
    pub(crate) extent: Extent,
    pub(crate) limit: i64,
    pub(crate) revision: i64,
    pub(crate) serializable: bool,
    pub(crate) keys_only: bool,
    pub(crate) count_only: bool,
    pub(crate) sort: Option<(SortTarget, SortOrder)>,
    pub(crate) min_create_revision: i64,
    pub(crate) max_create_revision: i64,
    pub(crate) min_mod_revision: i64,
    pub(crate) max_mod_revision: i64,
}

impl GetOptions {
    /// The key alone, linearizable, at the current revision.
    pub fn new() -> Self {
        Self::default()
    }
    /// At most `n` key-values (`more` says whether there were others).
    pub fn limit(mut self, n: i64) -> Self {
        self.limit = n;
        self
    }
    /// As of revision `rev` (it must not be compacted).
    pub fn revision(mut self, rev: i64) -> Self {
        self.revision = rev;
        self
    }
    /// Answer from the member reached, without asking the leader (may be stale).
    pub fn serializable(mut self) -> Self {
        self.serializable = true;
        self
    }
    /// Keys and metadata without values.
    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }
    /// Only the count.
    pub fn count_only(mut self) -> Self {
        self.count_only = true;
        self
    }
    /// Sorted by `target` in `order`.
    pub fn sort(mut self, target: SortTarget, order: SortOrder) -> Self {
        self.sort = Some((target, order));
        self
    }
    /// Only keys created at or after revision `rev`.
    pub fn min_create_revision(mut self, rev: i64) -> Self {
        self.min_create_revision = rev;
        self
    }
    /// Only keys created at or before revision `rev` (with a sort and `limit(1)`: the newest
    /// key older than some revision, as lock waiters look up their predecessor).
    pub fn max_create_revision(mut self, rev: i64) -> Self {
        self.max_create_revision = rev;
        self
    }
    /// Only keys last modified at or after revision `rev`.
    pub fn min_mod_revision(mut self, rev: i64) -> Self {
        self.min_mod_revision = rev;
        self
    }
    /// Only keys last modified at or before revision `rev`.
    pub fn max_mod_revision(mut self, rev: i64) -> Self {
        self.max_mod_revision = rev;
        self
    }

    pub(crate) fn request(&self, namespace: &[u8], key: &[u8]) -> RangeRequest {
        let (key, range_end) = self.extent.encode(namespace, key);
        let (target, order) = self.sort.unwrap_or((SortTarget::Key, SortOrder::None));
        RangeRequest {
            key,
            range_end,
            limit: self.limit,
            revision: self.revision,
            sort_order: order as i32,
            sort_target: target as i32,
            serializable: self.serializable,
            keys_only: self.keys_only,
            count_only: self.count_only,
            min_create_revision: self.min_create_revision,
            max_create_revision: self.max_create_revision,
            min_mod_revision: self.min_mod_revision,
            max_mod_revision: self.max_mod_revision,
        }
    }
}

/// Options of [`Kv::put`].
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub(crate) lease: i64,
    pub(crate) prev_kv: bool,
    pub(crate) ignore_value: bool,
    pub(crate) ignore_lease: bool,
}

impl PutOptions {
    /// A plain put.
    pub fn new() -> Self {
        Self::default()
    }
    /// Attach the key to lease `id`.
    pub fn lease(mut self, id: i64) -> Self {
        self.lease = id;
        self
    }
    /// Return the key-value it replaced.
    pub fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
    /// Keep the current value (update the lease only).
    pub fn ignore_value(mut self) -> Self {
        self.ignore_value = true;
        self
    }
    /// Keep the current lease.
    pub fn ignore_lease(mut self) -> Self {
        self.ignore_lease = true;
        self
    }

    pub(crate) fn request(&self, namespace: &[u8], key: &[u8], value: Vec<u8>) -> PutRequest {
        let mut full = namespace.to_vec();
        full.extend_from_slice(key);
        PutRequest {
            key: full,
            value,
            lease: self.lease,
            prev_kv: self.prev_kv,
            ignore_value: self.ignore_value,
            ignore_lease: self.ignore_lease,
        }
    }
}

/// Options of [`Kv::delete`].
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub(crate) extent: Extent,
    pub(crate) prev_kv: bool,
}

impl DeleteOptions {
    /// The key alone.
    pub fn new() -> Self {
        Self::default()
    }
    /// Return the deleted key-values.
    pub fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }

    pub(crate) fn request(&self, namespace: &[u8], key: &[u8]) -> DeleteRangeRequest {
        let (key, range_end) = self.extent.encode(namespace, key);
        DeleteRangeRequest {
            key,
            range_end,
            prev_kv: self.prev_kv,
        }
    }
}

/// What a get found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GetResponse {
    /// The store revision the answer is for.
    pub revision: i64,
    /// The key-values, in the requested order.
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` let through.
    pub more: bool,
    /// How many keys matched.
    pub count: i64,
}

impl GetResponse {
    pub(crate) fn from_proto(namespace: &[u8], r: RangeResponse) -> Self {
        let mut kvs = r.kvs;
        kvs.iter_mut().for_each(|kv| strip(namespace, kv));
        Self {
            revision: r.header.map_or(0, |h| h.revision),
            kvs,
            more: r.more,
            count: r.count,
        }
    }
}

/// What a put did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PutResponse {
    /// The revision of the write.
    pub revision: i64,
    /// The key-value replaced, when asked for.
    pub prev_kv: Option<KeyValue>,
}

impl PutResponse {
    pub(crate) fn from_proto(namespace: &[u8], r: ProtoPutResponse) -> Self {
        let mut prev_kv = r.prev_kv;
        if let Some(kv) = &mut prev_kv {
            strip(namespace, kv);
        }
        Self {
            revision: r.header.map_or(0, |h| h.revision),
            prev_kv,
        }
    }
}

/// What a delete did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeleteResponse {
    /// The revision of the delete (the current one if nothing was deleted).
    pub revision: i64,
    /// How many keys were deleted.
    pub deleted: i64,
    /// The deleted key-values, when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

impl DeleteResponse {
    pub(crate) fn from_proto(namespace: &[u8], r: DeleteRangeResponse) -> Self {
        let mut prev_kvs = r.prev_kvs;
        prev_kvs.iter_mut().for_each(|kv| strip(namespace, kv));
        Self {
            revision: r.header.map_or(0, |h| h.revision),
            deleted: r.deleted,
            prev_kvs,
        }
    }
}

/// The key-value API of a [`Client`].
#[derive(Debug, Clone)]
pub struct Kv {
    client: Client,
}

impl Kv {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Reads `key` (or the range the options name). Retried through failover.
    pub async fn get(&self, key: impl AsRef<[u8]>, options: GetOptions) -> Result<GetResponse> {
        let ns = self.client.namespace();
        let req = options.request(ns, key.as_ref());
        let resp: RangeResponse = self
            .client
            .call(Idempotence::Safe, |channel| {
                let req = req.clone();
                async move { Ok(api::kv(channel).range(req).await?.into_inner()) }
            })
            .await?;
        Ok(GetResponse::from_proto(ns, resp))
    }

    /// Writes `key`. Resent after a failure only if it certainly was not applied; otherwise
    /// fails with [`crate::Error::OutcomeUnknown`].
    pub async fn put(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Vec<u8>>,
        options: PutOptions,
    ) -> Result<PutResponse> {
        let ns = self.client.namespace();
        let req = options.request(ns, key.as_ref(), value.into());
        let resp: ProtoPutResponse = self
            .client
            .call(Idempotence::Unsafe, |channel| {
                let req = req.clone();
                async move { Ok(api::kv(channel).put(req).await?.into_inner()) }
            })
            .await?;
        Ok(PutResponse::from_proto(ns, resp))
    }

    /// Deletes `key` (or the range the options name). Retried like a put.
    pub async fn delete(
        &self,
        key: impl AsRef<[u8]>,
        options: DeleteOptions,
    ) -> Result<DeleteResponse> {
        let ns = self.client.namespace();
        let req = options.request(ns, key.as_ref());
        let resp: DeleteRangeResponse = self
            .client
            .call(Idempotence::Unsafe, |channel| {
                let req = req.clone();
                async move { Ok(api::kv(channel).delete_range(req).await?.into_inner()) }
            })
            .await?;
        Ok(DeleteResponse::from_proto(ns, resp))
    }

    /// Runs a transaction. One without writes is retried like a get; one with writes like a
    /// put.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let ns = self.client.namespace();
        let idempotence = if txn.is_read_only() {
            Idempotence::Safe
        } else {
            Idempotence::Unsafe
        };
        let req = txn.request(ns);
        let resp = self
            .client
            .call(idempotence, |channel| {
                let req = req.clone();
                async move { Ok(api::kv(channel).txn(req).await?.into_inner()) }
            })
            .await?;
        Ok(TxnResponse::from_proto(ns, resp))
    }

    /// Compacts the history up to `revision`; returns the revision in the answer's header.
    /// Compacting twice to the same revision fails the second time, so it is not retried
    /// blindly either.
    pub async fn compact(&self, revision: i64, physical: bool) -> Result<i64> {
        let req = CompactionRequest { revision, physical };
        let resp = self
            .client
            .call(Idempotence::Unsafe, |channel| async move {
                Ok(api::kv(channel).compact(req).await?.into_inner())
            })
            .await?;
        Ok(resp.header.map_or(0, |h| h.revision))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn strip_takes_off_only_the_namespace() {
        let kv = |key: &[u8]| KeyValue {
            key: key.to_vec().into(),
            ..KeyValue::default()
        };
        let mut inside = kv(b"app/a");
        strip(b"app/", &mut inside);
        assert_eq!(inside.key, &b"a"[..]);
        let mut plain = kv(b"app/a");
        strip(b"", &mut plain);
        assert_eq!(plain.key, &b"app/a"[..]);
        let mut outside = kv(b"other/a");
        strip(b"app/", &mut outside);
        assert_eq!(outside.key, &b"other/a"[..]);
    }

    use super::*;

    #[test]
    fn extents_under_a_namespace_stay_inside_it() {
        assert_eq!(Extent::Key.encode(b"ns/", b"k"), (b"ns/k".to_vec(), vec![]));
        assert_eq!(
            Extent::Prefix.encode(b"ns/", b"k"),
            (b"ns/k".to_vec(), b"ns/l".to_vec())
        );
        assert_eq!(
            Extent::FromKey.encode(b"ns/", b"k"),
            (b"ns/k".to_vec(), b"ns0".to_vec())
        );
        assert_eq!(Extent::FromKey.encode(b"", b"k"), (b"k".to_vec(), vec![0]));
        assert_eq!(
            Extent::Until(b"z".to_vec()).encode(b"ns/", b"a"),
            (b"ns/a".to_vec(), b"ns/z".to_vec())
        );
    }
}
