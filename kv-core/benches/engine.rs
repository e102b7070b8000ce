//! Engine apply and range paths on the redb backend (what the server runs).
//! `cargo bench -p kv-core`.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kv_core::backend::RedbBackend;
use kv_core::proto::etcdserverpb::{PutRequest, RangeRequest};
use kv_core::proto::kvserverpb::{InternalRequest, internal_request::Request};
use kv_core::{Store, StoreConfig};

const VALUE_BYTES: usize = 256;
const PRELOADED_KEYS: usize = 10_000;

fn put(key: String) -> InternalRequest {
    InternalRequest {
        header: None,
        id: 0,
        request: Some(Request::Put(PutRequest {
            key: key.into_bytes(),
            value: vec![b'v'; VALUE_BYTES],
            ..Default::default()
        })),
    }
}

fn open(dir: &tempfile::TempDir) -> Store {
    let backend = RedbBackend::open(&dir.path().join("state.redb")).expect("open redb");
    Store::open(
        Box::new(backend),
        StoreConfig {
            member_id: 1,
            quota_bytes: 0,
        },
    )
    .expect("open store")
}

fn bench_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    for batch in [1usize, 64] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut index = 0u64;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("put_batch_{batch}"), |b| {
            b.iter_batched(
                || {
                    (0..batch)
                        .map(|_| {
                            index += 1;
                            (index, Some(put(format!("key/{index:012}"))))
                        })
                        .collect::<Vec<_>>()
                },
                |entries| store.apply_batch(&entries, b"meta").expect("apply"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn bench_range(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let entries: Vec<_> = (0..PRELOADED_KEYS)
        .map(|i| (i as u64 + 1, Some(put(format!("key/{i:06}")))))
        .collect();
    for chunk in entries.chunks(1000) {
        store.apply_batch(chunk, b"meta").unwrap();
    }
    let mut group = c.benchmark_group("range");
    let mut i = 0usize;
    group.throughput(Throughput::Elements(1));
    group.bench_function("single_key", |b| {
        b.iter(|| {
            i = (i + 7919) % PRELOADED_KEYS;
            let req = RangeRequest {
                key: format!("key/{i:06}").into_bytes(),
                ..Default::default()
            };
            store.range(&req).expect("range")
        })
    });
    group.bench_function("prefix_100_keys", |b| {
        b.iter(|| {
            let req = RangeRequest {
                key: b"key/0001".to_vec(),
                range_end: b"key/0002".to_vec(),
                ..Default::default()
            };
            let resp = store.range(&req).expect("range");
            assert_eq!(resp.kvs.len(), 100);
            resp
        })
    });
    group.sample_size(20);
    group.bench_function("all_10000_keys", |b| {
        b.iter(|| {
            let req = RangeRequest {
                key: b"key/".to_vec(),
                range_end: b"key0".to_vec(),
                ..Default::default()
            };
            store.range(&req).expect("range")
        })
    });
    group.finish();
}

criterion_group!(benches, bench_apply, bench_range);
criterion_main!(benches);
