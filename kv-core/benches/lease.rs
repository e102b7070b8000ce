//! Lease costs in the engine: applying a grant, applying the revoke of a lease that holds many
//! keys (one revision deleting them all), and the leader's deadline queue with many leases,
//! whose idle check must not grow with the number of leases.
//! `cargo bench -p kv-core --bench lease`.

use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kv_core::backend::RedbBackend;
use kv_core::lease::{Deadlines, Renewal};
use kv_core::proto::etcdserverpb::{LeaseGrantRequest, LeaseRevokeRequest, PutRequest};
use kv_core::proto::kvserverpb::{InternalRequest, internal_request::Request};
use kv_core::{Store, StoreConfig};

const VALUE_BYTES: usize = 32;
/// Keys attached to the lease the revoke bench revokes.
const REVOKE_KEYS: usize = 10_000;
/// Leases in the large deadline queue.
const QUEUE_LEASES: i64 = 100_000;
/// Puts per applied batch while filling a store.
const SETUP_BATCH: usize = 1000;
const TTL: i64 = 60;
/// TTL of the renewals: long enough that no renewed lease falls due while the bench runs.
const LONG_TTL: i64 = 3600;

fn command(request: Request) -> Option<InternalRequest> {
    Some(InternalRequest {
        header: None,
        id: 0,
        request: Some(request),
    })
}

fn grant(id: i64) -> Option<InternalRequest> {
    command(Request::LeaseGrant(LeaseGrantRequest { ttl: TTL, id }))
}

fn open_redb(dir: &tempfile::TempDir) -> Store {
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

fn bench_grant(c: &mut Criterion) {
    let mut group = c.benchmark_group("lease_apply");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    // On redb, as the server runs. (`MemoryBackend` is no baseline here: its `size()`, which
    // every apply reads for the quota check, walks the whole map, so it measures the map.)
    let dir = tempfile::tempdir().unwrap();
    let store = open_redb(&dir);
    let mut index = 0u64;
    group.bench_function("grant_redb", |b| {
        b.iter(|| {
            index += 1;
            let out = store
                .apply_batch(&[(index, grant(index as i64))], b"meta")
                .expect("apply");
            assert!(out[0].is_ok());
            out
        })
    });
    group.finish();
}

/// A fresh redb store holding lease 1 with `REVOKE_KEYS` keys attached.
fn store_with_attached_keys() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_redb(&dir);
    let mut entries = vec![(1, grant(1))];
    entries.extend((0..REVOKE_KEYS).map(|i| {
        let put = PutRequest {
            key: format!("lease/key/{i:06}").into_bytes(),
            value: vec![b'v'; VALUE_BYTES],
            lease: 1,
            ..Default::default()
        };
        (i as u64 + 2, command(Request::Put(put)))
    }));
    for chunk in entries.chunks(SETUP_BATCH) {
        store.apply_batch(chunk, b"meta").expect("setup");
    }
    assert_eq!(store.lease_counts().1, REVOKE_KEYS);
    (dir, store)
}

fn bench_revoke(c: &mut Criterion) {
    let mut group = c.benchmark_group("lease_apply");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(REVOKE_KEYS as u64));
    let revoke = command(Request::LeaseRevoke(LeaseRevokeRequest { id: 1 }));
    group.bench_function(format!("revoke_{REVOKE_KEYS}_keys_redb"), |b| {
        b.iter_batched(
            store_with_attached_keys,
            |(dir, store)| {
                let index = REVOKE_KEYS as u64 + 2;
                let out = store
                    .apply_batch(&[(index, revoke.clone())], b"meta")
                    .expect("apply");
                assert!(out[0].is_ok());
                // Dropped after the timed part.
                (dir, store)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn bench_deadlines(c: &mut Criterion) {
    // The same checks at two sizes: a per-tick cost that grew with the leases would show.
    for leases in [1_000, QUEUE_LEASES] {
        bench_deadlines_with(c, leases);
    }
}

fn bench_deadlines_with(c: &mut Criterion, leases: i64) {
    let t0 = Instant::now();
    let far = t0 + Duration::from_secs(3600);
    let mut deadlines = Deadlines::default();
    for id in 1..=leases {
        deadlines.set(id, far);
    }
    let mut group = c.benchmark_group(format!("deadlines_{leases}_leases"));
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));
    let mut n = 0i64;
    group.bench_function("renew", |b| {
        b.iter(|| {
            // Round-robin over the leases, the clock moving 1 µs per keep-alive.
            n += 1;
            let id = n % leases + 1;
            let now = t0 + Duration::from_micros(n as u64);
            let r = deadlines.renew(id, LONG_TTL, now);
            assert_eq!(r, Renewal::Renewed);
            r
        })
    });
    // What the leader checks on every tick when nothing is due: after the renewals above the
    // heap holds stale entries too, which `earliest` drops once and then no longer sees.
    group.bench_function("earliest", |b| b.iter(|| deadlines.earliest()));
    let retry = Duration::from_secs(1);
    group.bench_function("pop_expired_none_due", |b| {
        b.iter(|| {
            let due = deadlines.pop_expired(t0 + Duration::from_secs(1), retry, 1000);
            assert!(due.is_empty());
            due
        })
    });
    group.finish();
    assert_eq!(deadlines.len(), leases as usize);
}

criterion_group!(benches, bench_grant, bench_revoke, bench_deadlines);
criterion_main!(benches);
