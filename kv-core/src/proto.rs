//! Generated etcd v3 wire types and gRPC services (from `kv-core/proto`).
//!
//! Module names mirror the protobuf packages, so generated cross-package
//! paths such as `super::mvccpb::KeyValue` resolve between siblings.

/// MVCC storage types: `KeyValue`, `Event` (etcd `mvccpb`).
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    rustdoc::all
)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// Auth storage types: `User`, `Role`, `Permission` (etcd `authpb`).
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    rustdoc::all
)]
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// etcd v3 client API: KV, Watch, Lease, Cluster, Maintenance, Auth (etcd `etcdserverpb`).
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    rustdoc::all
)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// Lock service (etcd `v3lockpb`).
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    rustdoc::all
)]
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

/// Election service (etcd `v3electionpb`).
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    rustdoc::all
)]
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

/// Internal replicated-log request/response envelopes (ours, `kvserverpb`).
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    rustdoc::all
)]
pub mod kvserverpb {
    tonic::include_proto!("kvserverpb");
}

/// The smallest key past every key starting with `prefix` (etcd's `GetPrefixRangeEnd`): the
/// `range_end` of a prefix request; `\0` (every key) for an empty or all-`0xff` prefix.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_ends_match_etcds() {
        use super::prefix_end;
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(b"p/"), b"p0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    use super::etcdserverpb::{
        self, CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest,
        kv_client::KvClient,
        kv_server::{Kv, KvServer},
        range_request::{SortOrder, SortTarget},
    };
    use prost::Message;

    #[test]
    fn range_request_field_tags() {
        let req = RangeRequest {
            key: b"a".to_vec(),
            range_end: b"b".to_vec(),
            limit: 5,
            revision: 7,
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Mod as i32,
            serializable: true,
            keys_only: true,
            count_only: true,
            min_mod_revision: 1,
            max_mod_revision: 2,
            min_create_revision: 3,
            max_create_revision: 4,
        };
        let bytes = req.encode_to_vec();
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0x0a, 1, b'a', // 1: key (len)
            0x12, 1, b'b', // 2: range_end (len)
            0x18, 5,       // 3: limit
            0x20, 7,       // 4: revision
            0x28, 2,       // 5: sort_order = DESCEND
            0x30, 3,       // 6: sort_target = MOD
            0x38, 1,       // 7: serializable
            0x40, 1,       // 8: keys_only
            0x48, 1,       // 9: count_only
            0x50, 1,       // 10: min_mod_revision
            0x58, 2,       // 11: max_mod_revision
            0x60, 3,       // 12: min_create_revision
            0x68, 4,       // 13: max_create_revision
        ];
        assert_eq!(bytes, expected);
        assert_eq!(RangeRequest::decode(bytes.as_slice()).unwrap(), req);
    }

    #[test]
    fn compare_lease_target_is_field_8() {
        use etcdserverpb::{
            Compare,
            compare::{CompareResult, CompareTarget, TargetUnion},
        };
        let cmp = Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Lease as i32,
            key: vec![],
            target_union: Some(TargetUnion::Lease(9)),
            range_end: vec![],
        };
        // target=LEASE(4) at field 2, then lease=9 at field 8.
        assert_eq!(cmp.encode_to_vec(), [0x10, 4, 0x40, 9]);
    }

    /// Compile-time check that the KV service surface exists with the expected methods.
    #[allow(dead_code)]
    async fn kv_surface<S: Kv>(svc: S, mut client: KvClient<tonic::transport::Channel>) {
        let _ = KvServer::new(svc);
        let _ = client.range(RangeRequest::default()).await;
        let _ = client.put(PutRequest::default()).await;
        let _ = client.delete_range(DeleteRangeRequest::default()).await;
        let _ = client.txn(TxnRequest::default()).await;
        let _ = client.compact(CompactionRequest::default()).await;
    }

    #[allow(dead_code)]
    async fn kv_trait_methods<S: Kv>(s: &S) {
        let _ = s.range(tonic::Request::new(RangeRequest::default())).await;
        let _ = s.put(tonic::Request::new(PutRequest::default())).await;
        let _ = s
            .delete_range(tonic::Request::new(DeleteRangeRequest::default()))
            .await;
        let _ = s.txn(tonic::Request::new(TxnRequest::default())).await;
        let _ = s
            .compact(tonic::Request::new(CompactionRequest::default()))
            .await;
    }
}
