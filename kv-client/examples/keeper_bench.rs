//! What keeping many leases alive costs a client, against any etcd-v3 endpoint (kv-server or
//! etcd): a service registry client or a worker pool may hold thousands of leases on one
//! `Client`, and every one of them must be renewed in time.
//!
//! ```text
//! keeper_bench ENDPOINT LEASES SECONDS [TTL]
//! ```
//!
//! Grants LEASES leases (TTL seconds, default 3), keeps each alive with `keep_alive` on ONE
//! `Client` (so all renewals share one stream), then waits SECONDS. Prints this process's CPU
//! time per second over that window (utime + stime from `/proc`, setup excluded), how many
//! leases the client reported lost, and how many had expired on the server (found missing
//! when revoked at the end); any loss fails the run.

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use kv_client::{Client, ClientOptions};
use kv_tests::procfs::{clock_ticks_per_second, cpu_ticks};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Grants and keep-alive calls in flight during setup.
const SETUP_IN_FLIGHT: usize = 64;

async fn run(endpoint: &str, leases: usize, seconds: u64, ttl: i64) -> Result<()> {
    let client = Client::connect([endpoint], ClientOptions::default()).await?;
    let lease = client.lease();
    let kept: Vec<_> = stream::iter(0..leases)
        .map(|_| {
            let lease = lease.clone();
            async move {
                let grant = lease.grant(ttl, None).await?;
                lease.keep_alive(grant.id).await
            }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .try_collect()
        .await?;
    let pid = std::process::id();
    let (start, ticks) = (Instant::now(), cpu_ticks(pid)?);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let used = (cpu_ticks(pid)? - ticks) as f64 / clock_ticks_per_second() as f64;
    let elapsed = start.elapsed().as_secs_f64();
    let reported = kept.iter().filter(|k| k.try_lost().is_some()).count();
    // The server has the last word: a lease it no longer has was lost, reported or not.
    let ids: Vec<i64> = kept.iter().map(|k| k.id()).collect();
    drop(kept);
    let gone: usize = stream::iter(ids)
        .map(|id| {
            let lease = lease.clone();
            async move {
                match lease.revoke(id).await {
                    Ok(_) => Ok(0),
                    Err(kv_client::Error::LeaseNotFound) => Ok(1),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .try_fold(0, |sum, n| async move { Ok(sum + n) })
        .await?;
    println!(
        "{leases} leases (TTL {ttl} s) kept alive on one client for {elapsed:.1} s: client CPU {:.0} ms/s, {gone} expired on the server, {reported} reported lost",
        used / elapsed * 1000.0
    );
    if gone > 0 || reported > 0 {
        return Err(format!("{gone} of {leases} leases expired, {reported} reported lost").into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, endpoint, leases, seconds, rest @ ..] => leases
            .parse()
            .ok()
            .zip(seconds.parse().ok())
            .zip(rest.first().map_or(Some(3), |t| t.parse().ok()))
            .map(|((l, s), t)| (endpoint.clone(), l, s, t)),
        _ => None,
    };
    let Some((endpoint, leases, seconds, ttl)) = parsed else {
        eprintln!("usage: keeper_bench ENDPOINT LEASES SECONDS [TTL]");
        return ExitCode::from(2);
    };
    match run(&endpoint, leases, seconds, ttl).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keeper_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
