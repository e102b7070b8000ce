//! Closed-loop lease benchmarks for any etcd-v3 endpoint (ours or etcd), so that the two can be
//! compared run for run: `kv-lease-bench ENDPOINT MODE [ARGS]`. Each mode prints one result line.
//!
//! - `grant IN_FLIGHT SECONDS`: LeaseGrant (TTL 60) with IN_FLIGHT concurrent requests; grants/s
//!   and p50/p99 latency. Nothing is revoked, so use a fresh server per run.
//! - `keepalive LEASES SECONDS [WINDOW]`: grants LEASES leases, then sends keep-alives over ONE
//!   LeaseKeepAlive stream, round-robin over the leases, with at most WINDOW (128) requests
//!   unanswered; keep-alives answered per second.
//! - `revoke KEYS`: grants one lease, attaches KEYS keys to it, times one LeaseRevoke and checks
//!   with a count-only range that the keys are gone.
//! - `idle LEASES SECONDS PID [KEYS_PER_LEASE]`: grants LEASES long (1 h) leases with
//!   KEYS_PER_LEASE (1) keys each, lets the server settle, then reads the CPU time the process
//!   PID spends over SECONDS of idleness (`/proc/PID/stat`) and its RSS (`/proc/PID/status`).
//!   An idle lease must cost the server nothing: this is where a per-tick scan over every lease
//!   shows up.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use kv_core::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, kv_client::KvClient, lease_client::LeaseClient, request_op,
};
use kv_tests::procfs::{clock_ticks_per_second, cpu_ticks, rss_kib};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Connections for the setup phases and for the grant workers (as `kv-load`).
const MAX_CONNECTIONS: usize = 8;
/// Requests in flight while setting up leases and keys.
const SETUP_IN_FLIGHT: usize = 64;
/// TTL of the leases the grant and keep-alive modes measure.
const BENCH_TTL: i64 = 60;
/// TTL of the leases that must outlive the run (revoke, idle).
const LONG_TTL: i64 = 3600;
/// Default bound on unanswered keep-alives on the one stream.
const KEEPALIVE_WINDOW: usize = 128;
/// Puts per setup txn in the idle mode (etcd's default `--max-txn-ops` is 128).
const PUTS_PER_TXN: usize = 100;
/// Value size of the attached keys.
const VALUE_BYTES: usize = 32;
/// Pause between setting up the idle mode and measuring, so that the setup's own work (commits,
/// GC, compaction of the write burst) is not billed to idleness.
const IDLE_SETTLE: Duration = Duration::from_secs(3);

fn usage() -> ! {
    eprintln!(
        "usage: kv-lease-bench ENDPOINT MODE [ARGS]\n  \
         grant IN_FLIGHT SECONDS\n  \
         keepalive LEASES SECONDS [WINDOW]\n  \
         revoke KEYS\n  \
         idle LEASES SECONDS PID [KEYS_PER_LEASE]"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    match args.get(i) {
        None => default,
        Some(s) => s.parse().unwrap_or_else(|_| usage()),
    }
}

async fn connect(endpoint: &str, n: usize) -> Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(
            Channel::from_shared(format!("http://{endpoint}"))?
                .connect()
                .await?,
        );
    }
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Grants `n` leases of `ttl` seconds with `SETUP_IN_FLIGHT` requests in flight; their ids.
async fn grant_many(channels: &[Channel], n: usize, ttl: i64) -> Result<Vec<i64>> {
    stream::iter(0..n)
        .map(|i| {
            let mut c = LeaseClient::new(channels[i % channels.len()].clone());
            async move {
                let r = c
                    .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                    .await?
                    .into_inner();
                if !r.error.is_empty() {
                    return Err(format!("grant: {}", r.error).into());
                }
                Ok::<_, Box<dyn Error + Send + Sync>>(r.id)
            }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .try_collect()
        .await
}

fn put_op(key: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key,
            value: vec![b'v'; VALUE_BYTES],
            lease,
            ..Default::default()
        })),
    }
}

/// Number of keys from `key` up to `range_end`, by a count-only range.
async fn count(kv: &mut KvClient<Channel>, key: &[u8], range_end: &[u8]) -> Result<i64> {
    Ok(kv
        .range(RangeRequest {
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            count_only: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .count)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

async fn grant(endpoint: &str, in_flight: usize, seconds: u64) -> Result<()> {
    let channels = connect(endpoint, in_flight.min(MAX_CONNECTIONS)).await?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..in_flight {
        let mut client = LeaseClient::new(channels[w % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = client
                    .lease_grant(LeaseGrantRequest {
                        ttl: BENCH_TTL,
                        id: 0,
                    })
                    .await?
                    .into_inner();
                if !r.error.is_empty() {
                    return Err(format!("grant: {}", r.error).into());
                }
                lat.push(t.elapsed());
            }
            Ok::<_, Box<dyn Error + Send + Sync>>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    println!(
        "grant: in_flight {in_flight}: {:.0} grants/s p50 {:.2} ms p99 {:.2} ms ({} grants in {seconds} s)",
        all.len() as f64 / seconds as f64,
        ms(percentile(&all, 0.50)),
        ms(percentile(&all, 0.99)),
        all.len()
    );
    Ok(())
}

async fn keepalive(endpoint: &str, leases: usize, seconds: u64, window: usize) -> Result<()> {
    let channels = connect(endpoint, MAX_CONNECTIONS).await?;
    let ids = grant_many(&channels, leases, BENCH_TTL).await?;
    if ids.is_empty() {
        return Err("keepalive needs at least one lease".into());
    }
    let (tx, rx) = mpsc::channel::<LeaseKeepAliveRequest>(window);
    // One permit per request that may be unanswered; each response gives one back.
    let slots = Arc::new(Semaphore::new(window));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let sender = {
        let slots = slots.clone();
        tokio::spawn(async move {
            for id in ids.iter().cycle() {
                if Instant::now() >= deadline {
                    break;
                }
                let Ok(permit) = slots.acquire().await else {
                    break;
                };
                permit.forget();
                if tx.send(LeaseKeepAliveRequest { id: *id }).await.is_err() {
                    break;
                }
            }
            // Dropping `tx` ends the request stream.
        })
    };
    // The sender runs before the call is awaited: etcd sends the response headers only with
    // its first response, so awaiting them before any request would wait forever.
    let mut responses = LeaseClient::new(channels[0].clone())
        .lease_keep_alive(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut answered = 0u64;
    let mut lost = 0u64;
    let until = tokio::time::Instant::from_std(deadline);
    loop {
        match tokio::time::timeout_at(until, responses.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(r)) => {
                // TTL <= 0 means the server no longer knows the lease.
                if r?.ttl <= 0 {
                    lost += 1;
                }
                answered += 1;
                slots.add_permits(1);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    slots.close();
    sender.await?;
    if lost > 0 {
        return Err(format!("keepalive: {lost} responses reported an unknown lease").into());
    }
    println!(
        "keepalive: {leases} leases window {window}: {:.0} keep-alives/s ({answered} in {elapsed:.1} s, one stream)",
        answered as f64 / elapsed
    );
    Ok(())
}

async fn revoke(endpoint: &str, keys: usize) -> Result<()> {
    let channels = connect(endpoint, MAX_CONNECTIONS).await?;
    let id = grant_many(&channels[..1], 1, LONG_TTL).await?[0];
    let prefix = format!("lease-bench/revoke/{id:016x}/");
    let key = |i: usize| format!("{prefix}{i:08}").into_bytes();
    let started = Instant::now();
    stream::iter(0..keys)
        .map(|i| {
            let mut kv = KvClient::new(channels[i % channels.len()].clone());
            let key = key(i);
            async move {
                kv.put(PutRequest {
                    key,
                    value: vec![b'v'; VALUE_BYTES],
                    lease: id,
                    ..Default::default()
                })
                .await
            }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let setup = started.elapsed();
    let mut kv = KvClient::new(channels[0].clone());
    let (from, to) = (prefix.as_bytes(), format!("{prefix}\u{7f}").into_bytes());
    let before = count(&mut kv, from, &to).await?;
    let mut lease = LeaseClient::new(channels[0].clone());
    let t = Instant::now();
    lease.lease_revoke(LeaseRevokeRequest { id }).await?;
    let took = t.elapsed();
    let after = count(&mut kv, from, &to).await?;
    println!(
        "revoke: {keys} keys: revoke {:.2} ms; keys before {before} after {after} (setup {:.1} s)",
        ms(took),
        setup.as_secs_f64()
    );
    if before != keys as i64 || after != 0 {
        return Err(format!("revoke: expected {keys} keys before and 0 after").into());
    }
    Ok(())
}

async fn idle(
    endpoint: &str,
    leases: usize,
    seconds: u64,
    pid: u32,
    keys_per_lease: usize,
) -> Result<()> {
    // Fail before the long setup if the PID is wrong.
    cpu_ticks(pid)?;
    let channels = connect(endpoint, MAX_CONNECTIONS).await?;
    let started = Instant::now();
    let ids = grant_many(&channels, leases, LONG_TTL).await?;
    let keys: Vec<(Vec<u8>, i64)> = ids
        .iter()
        .flat_map(|&id| {
            (0..keys_per_lease).map(move |k| {
                (
                    format!("lease-bench/idle/{id:016x}/{k:04}").into_bytes(),
                    id,
                )
            })
        })
        .collect();
    let txns: Vec<TxnRequest> = keys
        .chunks(PUTS_PER_TXN)
        .map(|chunk| TxnRequest {
            success: chunk
                .iter()
                .map(|(key, id)| put_op(key.clone(), *id))
                .collect(),
            ..Default::default()
        })
        .collect();
    drop(keys);
    stream::iter(txns.into_iter().enumerate())
        .map(|(i, txn)| {
            let mut kv = KvClient::new(channels[i % channels.len()].clone());
            async move { kv.txn(txn).await }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let setup = started.elapsed();
    let mut kv = KvClient::new(channels[0].clone());
    let attached = count(&mut kv, b"lease-bench/idle/", b"lease-bench/idle0").await?;
    tokio::time::sleep(IDLE_SETTLE).await;
    let hz = clock_ticks_per_second();
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid)?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let c1 = cpu_ticks(pid)?;
    let window = t0.elapsed().as_secs_f64();
    let rss = rss_kib(pid)?;
    let cpu_seconds = (c1 - c0) as f64 / hz as f64;
    println!(
        "idle: {leases} leases x {keys_per_lease} keys ({attached} keys): cpu {:.2} % ({cpu_seconds:.2} s over {window:.1} s) rss {:.1} MiB (setup {:.1} s)",
        100.0 * cpu_seconds / window,
        rss as f64 / 1024.0,
        setup.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(endpoint), Some(mode)) = (args.get(1), args.get(2)) else {
        usage()
    };
    match mode.as_str() {
        "grant" => grant(endpoint, arg(&args, 3, 1usize).max(1), arg(&args, 4, 5)).await,
        "keepalive" => {
            let window = arg(&args, 5, KEEPALIVE_WINDOW).max(1);
            keepalive(endpoint, arg(&args, 3, 1000), arg(&args, 4, 5), window).await
        }
        "revoke" => revoke(endpoint, arg(&args, 3, 10_000)).await,
        "idle" => {
            let Some(pid) = args.get(5).and_then(|s| s.parse().ok()) else {
                usage()
            };
            idle(
                endpoint,
                arg(&args, 3, 100_000),
                arg(&args, 4, 20),
                pid,
                arg(&args, 6, 1),
            )
            .await
        }
        _ => usage(),
    }
}
